//! The drop-event log: events from the dataplane's ring buffer, written as JSON lines to
//! standard output or a file (reopened on SIGHUP for logrotate) by a thread of its own.

use std::{
    collections::HashMap,
    fs,
    io::{self, Write as _},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use aya::maps::{MapData, RingBuf};
use filter_common::abi::Event;
use filter_user::offenders::{Clock, address};
use serde::Serialize;
use tracing::{error, info, warn};

/// Where drop events go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventSink {
    /// Nowhere; the kernel is told to emit none.
    Off,
    /// Standard output (logs go to standard error, so the two never mix).
    Stdout,
    /// Appended to a file.
    File(PathBuf),
}

/// One drop event as written to the event log.
#[derive(Debug, Serialize)]
struct EventLine<'a> {
    time: String,
    interface: &'a str,
    hook: &'static str,
    direction: &'static str,
    family: &'static str,
    verdict: &'static str,
    /// `None` (null) only for a family the dataplane never emits.
    src: Option<IpAddr>,
    dst: Option<IpAddr>,
    sport: u16,
    dport: u16,
    tcp_flags: u8,
}

/// Interface names by index, for event lines. A name is looked up once and then kept
/// for at most [`NAME_TTL`]: an interface can be deleted and another created under the
/// same index with another name, and an event must not carry the old one for long.
#[derive(Debug)]
struct InterfaceNames {
    names: HashMap<u32, String>,
    /// When the cache was last emptied.
    since: Instant,
}

/// How long a looked-up interface name is trusted.
const NAME_TTL: Duration = Duration::from_secs(60);
/// Most names kept (a bound on memory whatever the events claim).
const MAX_NAMES: usize = 1024;

impl InterfaceNames {
    fn new(now: Instant) -> Self {
        Self {
            names: HashMap::new(),
            since: now,
        }
    }

    /// The name of `ifindex` at `now`, from the cache or from `lookup`.
    fn get(&mut self, ifindex: u32, now: Instant, lookup: impl FnOnce(u32) -> String) -> &str {
        if now.saturating_duration_since(self.since) >= NAME_TTL || self.names.len() >= MAX_NAMES {
            self.names.clear();
            self.since = now;
        }
        self.names.entry(ifindex).or_insert_with(|| lookup(ifindex))
    }
}

/// The kernel's name of `ifindex` now, or `ifindex-N` if it has none.
fn lookup_name(ifindex: u32) -> String {
    filter_user::sys::ifname(ifindex).unwrap_or_else(|| format!("ifindex-{ifindex}"))
}

/// Most events written per wake-up before yielding to the other tasks; the in-kernel rate
/// limit keeps the ring far below this anyway.
const MAX_EVENTS_PER_WAKE: usize = 4096;
/// Lines queued for the writer thread before new ones are dropped (and counted).
const WRITER_QUEUE: usize = 16 * 1024;

/// How many events reached the log, and how many were dropped because it was too slow.
#[derive(Debug, Default)]
pub struct EventCounts {
    pub written: AtomicU64,
    pub dropped: AtomicU64,
}

/// What the event writer thread receives: a line, or `None` to wake it up (a reopen was
/// requested and must not wait for the next event).
type WriterMsg = Option<Vec<u8>>;

/// Writes lines on a thread of its own: a sink that blocks (a full pipe, a slow disk) must
/// never stall the task that owns the maps and answers p25ctl. Reopens a file sink before
/// its next write once `reopen` is set (SIGHUP).
fn spawn_writer(
    mut out: EventOutput,
    counts: Arc<EventCounts>,
    reopen: Arc<AtomicBool>,
) -> io::Result<std::sync::mpsc::SyncSender<WriterMsg>> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<WriterMsg>(WRITER_QUEUE);
    std::thread::Builder::new()
        .name("p25d-events".into())
        .spawn(move || {
            let write = |out: &mut EventOutput, line: WriterMsg| {
                let Some(line) = line else { return };
                match out.write_all(&line) {
                    Ok(()) => {
                        counts.written.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        counts.dropped.fetch_add(1, Ordering::Relaxed);
                        warn!(error = %e, "writing a drop event failed");
                    }
                }
            };
            while let Ok(line) = rx.recv() {
                if reopen.swap(false, Ordering::Relaxed) {
                    out.reopen();
                }
                write(&mut out, line);
                // Write what else is queued, then flush once: lines appear promptly, and a
                // burst is written in one go.
                while let Ok(line) = rx.try_recv() {
                    write(&mut out, line);
                }
                if let Err(e) = out.flush() {
                    warn!(error = %e, "flushing the event log failed");
                }
            }
        })?;
    Ok(tx)
}

/// Where event lines are written: standard output, or a file that SIGHUP reopens.
#[derive(Debug)]
pub enum EventOutput {
    /// Standard output, a line at a time.
    Stdout(io::LineWriter<io::Stdout>),
    /// A file opened by [`open_log`].
    File {
        /// The path, to reopen.
        path: PathBuf,
        /// The open file.
        file: io::BufWriter<fs::File>,
    },
}

impl EventOutput {
    /// Reopens a file sink at its path (after logrotate renamed it). If that fails, lines
    /// keep going to the old file and the error is logged: losing the log would be worse.
    fn reopen(&mut self) {
        let Self::File { path, file } = self else {
            return;
        };
        if let Err(e) = file.flush() {
            warn!(error = %e, "flushing the event log before reopening it failed");
        }
        match open_log(path) {
            Ok(new) => {
                *file = io::BufWriter::new(new);
                info!(path = %path.display(), "reopened the event log");
            }
            Err(e) => error!(
                error = %format!("{e:#}"),
                "reopening the event log failed; events still go to the file open before"
            ),
        }
    }
}

impl io::Write for EventOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Stdout(out) => out.write(buf),
            Self::File { file, .. } => file.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Stdout(out) => out.flush(),
            Self::File { file, .. } => file.flush(),
        }
    }
}

/// Opens (creates) the event log for appending. A symlink in its place is refused
/// (O_NOFOLLOW): p25d runs with privileges, and whoever can write the log's directory must
/// not be able to point its writes at another file. Anything but a regular file (a FIFO
/// without reader, a device) is refused too, so opening never blocks.
fn open_log(path: &Path) -> Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let hint = "--events: a writable regular file, `-` for stdout, or `off`";
    let file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                anyhow::anyhow!(
                    "the event log {} is a symbolic link, which p25d does not follow; give \
                     the real path ({hint})",
                    path.display()
                )
            } else {
                anyhow::Error::new(e)
                    .context(format!("opening the event log {} ({hint})", path.display()))
            }
        })?;
    let meta = file
        .metadata()
        .with_context(|| format!("stat of the event log {}", path.display()))?;
    anyhow::ensure!(
        meta.is_file(),
        "the event log {} is not a regular file ({hint})",
        path.display()
    );
    Ok(file)
}

/// Opens the event sink at start-up, so that an unwritable `--events` path stops p25d with
/// the path and the reason instead of leaving it running without its event log. `None`
/// for `--events off`.
pub fn open_sink(sink: &EventSink) -> Result<Option<EventOutput>> {
    Ok(match sink {
        EventSink::Off => None,
        EventSink::Stdout => Some(EventOutput::Stdout(io::LineWriter::new(io::stdout()))),
        EventSink::File(path) => Some(EventOutput::File {
            path: path.clone(),
            file: io::BufWriter::new(open_log(path)?),
        }),
    })
}

/// Drains the ring buffer forever, writing one JSON line per event to `out`.
/// SIGHUP reopens a file sink (logrotate's postrotate sends it; the daemon's own handler
/// reloads the policy on the same signal).
pub async fn drain_events(ring: RingBuf<MapData>, out: EventOutput, counts: Arc<EventCounts>) {
    let reopen = Arc::new(AtomicBool::new(false));
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(hup) => Some(hup),
        Err(e) => {
            error!(error = %e, "no SIGHUP handler for the event log; it is never reopened");
            None
        }
    };
    let writer = match spawn_writer(out, counts.clone(), reopen.clone()) {
        Ok(writer) => writer,
        Err(e) => {
            error!(error = %e, "cannot start the event writer; events are not written");
            return;
        }
    };
    let mut fd = match filter_user::sys::readable_ring(ring) {
        Ok(fd) => fd,
        Err(e) => {
            error!(error = %e, "cannot poll the event ring buffer; events are not written");
            return;
        }
    };
    let mut names = InterfaceNames::new(Instant::now());
    loop {
        let readable = tokio::select! {
            readable = fd.readable_mut() => readable,
            Some(()) = async {
                match hup.as_mut() {
                    Some(hup) => hup.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                reopen.store(true, Ordering::Relaxed);
                // Wake the writer so the old file is let go of now, not at the next event.
                let _ = writer.try_send(None);
                continue;
            }
        };
        let mut guard = match readable {
            Ok(guard) => guard,
            Err(e) => {
                error!(error = %e, "polling the event ring buffer failed; events stop");
                return;
            }
        };
        let clock = Clock::now();
        let ring = guard.get_inner_mut();
        let mut count = 0;
        while count < MAX_EVENTS_PER_WAKE {
            let Some(item) = ring.next() else { break };
            count += 1;
            let Some(event) = filter_user::sys::read_pod::<Event>(&item) else {
                warn!(len = item.len(), "short record in the event ring buffer");
                continue;
            };
            drop(item);
            let line = EventLine {
                time: humantime::format_rfc3339_millis(clock.wall(event.ts_ns)).to_string(),
                interface: names.get(event.ifindex, Instant::now(), lookup_name),
                hook: event.hook.name(),
                direction: event.direction.name(),
                family: event.family.name(),
                verdict: event.verdict.name(),
                src: address(event.family, event.src),
                dst: address(event.family, event.dst),
                sport: event.sport,
                dport: event.dport,
                tcp_flags: event.tcp_flags,
            };
            let mut bytes = serde_json::to_vec(&line).unwrap_or_default();
            bytes.push(b'\n');
            if writer.try_send(Some(bytes)).is_err() {
                counts.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        if count < MAX_EVENTS_PER_WAKE {
            guard.clear_ready();
        } else {
            tokio::task::yield_now().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_are_looked_up_again_after_their_ttl() {
        let start = Instant::now();
        let mut names = InterfaceNames::new(start);
        assert_eq!(names.get(7, start, |_| "eth0".into()), "eth0");
        // Cached: the lookup is not asked again within the TTL.
        let later = start + NAME_TTL / 2;
        assert_eq!(names.get(7, later, |_| "renamed".into()), "eth0");
        // Past the TTL the kernel is asked again.
        let past = start + NAME_TTL;
        assert_eq!(names.get(7, past, |_| "renamed".into()), "renamed");
        // The cache stays bounded.
        for i in 0..=u32::try_from(MAX_NAMES).unwrap_or(u32::MAX) {
            names.get(i + 100, past, |i| format!("if{i}"));
        }
        assert!(names.names.len() <= MAX_NAMES);
    }
}
