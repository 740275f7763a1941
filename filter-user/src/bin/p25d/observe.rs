//! The daemon's outputs for humans and machines besides the control socket: the
//! Prometheus `/metrics` endpoint and the JSON-lines drop-event log.

use std::{
    collections::HashMap,
    fs,
    io::{self, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result};
use axum::{Router, http::header, response::IntoResponse, routing::get};
use aya::maps::{MapData, RingBuf};
use filter_common::abi::{Event, Family};
use filter_user::{metrics, offenders::Clock};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
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

/// A request for a metrics page, answered by the task that owns the maps.
pub type MetricsJob = oneshot::Sender<String>;

/// Serves `/metrics` on `addr`, with a connection cap and timeouts ([`LimitedListener`]).
/// Binding happens before this returns, so a taken port is a startup error and not a
/// silent background failure.
pub async fn serve_metrics(addr: SocketAddr, jobs: mpsc::Sender<MetricsJob>) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics endpoint {addr}"))?;
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let jobs = jobs.clone();
                async move {
                    let (tx, rx) = oneshot::channel();
                    let body = if jobs.send(tx).await.is_ok() {
                        rx.await.unwrap_or_default()
                    } else {
                        String::new()
                    };
                    if body.is_empty() {
                        return (
                            axum::http::StatusCode::SERVICE_UNAVAILABLE,
                            "p25d is shutting down\n",
                        )
                            .into_response();
                    }
                    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], body).into_response()
                }
            }),
        )
        .route("/", get(|| async { "p25d: metrics at /metrics\n" }));
    info!(%addr, max_connections = METRICS_MAX_CONNECTIONS, "serving Prometheus metrics at /metrics");
    let listener = LimitedListener {
        inner: listener,
        open: Open::default(),
        epoch: tokio::time::Instant::now(),
    };
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            error!(error = %e, "the metrics endpoint stopped");
        }
    });
    Ok(())
}

/// Connections the metrics endpoint serves at once. Prometheus needs one or two; the rest
/// is room for curl and a second scraper.
pub const METRICS_MAX_CONNECTIONS: usize = 32;
/// A new connection must have its first answer written within this long, headers and all
/// (slowloris: a client that trickles its request gets this much, not forever).
pub const METRICS_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// After an answer, a kept-alive connection is closed when no further answer is written
/// within this long (Prometheus's default 15 s scrape interval reuses it; a slower one
/// reconnects).
pub const METRICS_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The open connections of the metrics endpoint, oldest answer first.
#[derive(Debug, Default)]
struct Open {
    conns: std::sync::Mutex<Vec<OpenConn>>,
}

#[derive(Debug)]
struct OpenConn {
    /// When it last had an answer written (or was accepted), in ms since `epoch`.
    last_answer_ms: Arc<AtomicU64>,
    /// Closes it.
    evict: oneshot::Sender<()>,
}

/// A TCP listener that keeps at most [`METRICS_MAX_CONNECTIONS`] open: when full, a new
/// connection evicts the one that has gone longest without an answer (idle or
/// trickling), so idle connections cannot lock Prometheus out. Each connection is a
/// [`LimitedStream`] with the header and idle timeouts.
struct LimitedListener {
    inner: tokio::net::TcpListener,
    open: Open,
    epoch: tokio::time::Instant,
}

impl axum::serve::Listener for LimitedListener {
    type Io = LimitedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (stream, addr) = match self.inner.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, mostly: wait for some to close.
                    warn!(error = %e, "accepting a metrics connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let now_ms = elapsed_ms(self.epoch);
            let last_answer_ms = Arc::new(AtomicU64::new(now_ms));
            let (evict, evicted) = oneshot::channel();
            {
                let mut conns = self
                    .open
                    .conns
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                // Connections whose stream is gone dropped their receiver.
                conns.retain(|c| !c.evict.is_closed());
                if conns.len() >= METRICS_MAX_CONNECTIONS {
                    let oldest = conns
                        .iter()
                        .enumerate()
                        .min_by_key(|(_, c)| c.last_answer_ms.load(Ordering::Relaxed))
                        .map(|(i, _)| i);
                    if let Some(i) = oldest {
                        let old = conns.swap_remove(i);
                        let _ = old.evict.send(());
                    }
                }
                conns.push(OpenConn {
                    last_answer_ms: last_answer_ms.clone(),
                    evict,
                });
            }
            let stream = LimitedStream {
                inner: stream,
                deadline: Box::pin(tokio::time::sleep(METRICS_HEADER_TIMEOUT)),
                evicted,
                last_answer_ms,
                epoch: self.epoch,
            };
            return (stream, addr);
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

fn elapsed_ms(epoch: tokio::time::Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// A metrics connection: closed (an I/O error to hyper) when its deadline passes or it is
/// evicted. The deadline starts at [`METRICS_HEADER_TIMEOUT`] and moves to
/// [`METRICS_IDLE_TIMEOUT`] past every write.
struct LimitedStream {
    inner: tokio::net::TcpStream,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
    evicted: oneshot::Receiver<()>,
    last_answer_ms: Arc<AtomicU64>,
    epoch: tokio::time::Instant,
}

impl LimitedStream {
    /// An error if the connection must close now; registers the wake-ups otherwise.
    fn expired(&mut self, cx: &mut std::task::Context<'_>) -> Option<io::Error> {
        if std::pin::Pin::new(&mut self.evicted).poll(cx).is_ready() {
            return Some(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "evicted: too many metrics connections",
            ));
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            return Some(io::Error::new(
                io::ErrorKind::TimedOut,
                "metrics connection timed out",
            ));
        }
        None
    }
}

impl tokio::io::AsyncRead for LimitedStream {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        if let Some(e) = self.expired(cx) {
            return std::task::Poll::Ready(Err(e));
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for LimitedStream {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        let this = &mut *self;
        match std::pin::Pin::new(&mut this.inner).poll_write(cx, buf) {
            std::task::Poll::Ready(Ok(n)) => {
                if n > 0 {
                    this.last_answer_ms
                        .store(elapsed_ms(this.epoch), Ordering::Relaxed);
                    this.deadline
                        .as_mut()
                        .reset(tokio::time::Instant::now() + METRICS_IDLE_TIMEOUT);
                }
                std::task::Poll::Ready(Ok(n))
            }
            std::task::Poll::Pending => match this.expired(cx) {
                // A client that stops reading its answer is dropped at the deadline too.
                Some(e) => std::task::Poll::Ready(Err(e)),
                None => std::task::Poll::Pending,
            },
            other => other,
        }
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
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
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    tcp_flags: u8,
}

fn address(family: Family, bytes: [u8; 16]) -> IpAddr {
    if family == Family::IPV4 {
        let [a, b, c, d, ..] = bytes;
        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
    } else {
        IpAddr::V6(Ipv6Addr::from(bytes))
    }
}

fn interface_name(cache: &mut HashMap<u32, String>, ifindex: u32) -> &str {
    cache.entry(ifindex).or_insert_with(|| {
        filter_user::sys::ifname(ifindex).unwrap_or_else(|| format!("ifindex-{ifindex}"))
    })
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
    let mut names = HashMap::new();
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
                interface: interface_name(&mut names, event.ifindex),
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
        // Forget interface names now and then: an interface can be recreated under the same
        // index with another name.
        if names.len() > 1024 {
            names.clear();
        }
    }
}
