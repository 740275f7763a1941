//! The daemon's event loop. One task owns the dataplane and all state; control
//! connections, signals and timers send it work, so every map change is serialized.

use std::{
    collections::BTreeMap,
    fs,
    net::SocketAddr,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering},
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result, bail};
use aya::programs::XdpMode;
use filter_common::abi::{ABI_VERSION, iface_slot};
use filter_user::{
    Dataplane, KernelTables,
    control::{
        InterfaceView, ReloadView, StatsView, StatusView, error_answer,
        handler::{self, Host, Parts, Peer},
    },
    desired::{self, Counts, Desired},
    loader::{
        Hook, PinLayout, ensure_bpffs, ifindex, links_in, pinned_link_ifindex, pinned_link_status,
    },
    metrics,
    offenders::{self, AlertTracker, OffenderView, monotonic_ns},
    policy::{self, Attach, Policy, Role},
    runtime::{RuntimeStore, unix},
    sync::{self, SyncReport},
};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    signal::unix::{SignalKind, signal},
    sync::{mpsc, oneshot},
};
use tracing::{error, info, warn};

pub use crate::observe::EventSink;
use crate::observe::{self, MetricsJob};

/// Settings of `p25d run`.
#[derive(Debug)]
pub struct Options {
    pub policy: PathBuf,
    pub state: PathBuf,
    pub socket: PathBuf,
    pub socket_group: Option<String>,
    pub layout: PinLayout,
    pub resync: Duration,
    pub poll: Duration,
    pub metrics_listen: Option<SocketAddr>,
    pub metrics_top_offenders: usize,
    pub offender_v6_prefix: u8,
    pub alert_threshold: u64,
    pub alert_window: Duration,
    pub offender_scan: Duration,
    pub events: EventSink,
    pub events_rate: u32,
    pub events_burst: u32,
    /// Group whose members may change the filter (besides root).
    pub admin_group: String,
    /// Most runtime allowlist entries.
    pub max_runtime_entries: usize,
    /// Follow the fleet policy in etcd (`--etcd`) instead of the policy file.
    pub fleet: Option<crate::fleet::FleetOptions>,
}

/// Identifies a version of the policy file cheaply, to notice edits.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

/// Stamps of the policy file and of every list file it names, in that order: a change to
/// any of them is a change of the policy.
fn stamps(policy_file: &Path, policy: &Policy) -> Vec<Option<FileStamp>> {
    std::iter::once(policy_file)
        .chain(policy.list_files())
        .map(stamp)
        .collect()
}

fn stamp(path: &Path) -> Option<FileStamp> {
    let meta = fs::metadata(path).ok()?;
    Some(FileStamp {
        modified: meta.modified().ok(),
        len: meta.len(),
        inode: meta.ino(),
    })
}

/// What the daemon knows about one policy interface.
#[derive(Clone, Debug)]
struct IfaceState {
    role: Role,
    attach: Attach,
    hook: Option<Hook>,
    ifindex: Option<u32>,
    note: String,
}

/// One control request: its line, who sent it, and where the answer goes.
type Job = (Vec<u8>, Peer, oneshot::Sender<Vec<u8>>);

struct Daemon {
    opts: Options,
    _dataplane: Dataplane,
    tables: KernelTables,
    runtime: RuntimeStore,
    policy: Policy,
    generation: u32,
    reloads_ok: u64,
    reloads_failed: u64,
    last_error: Option<String>,
    /// Stamps of the policy file and its list files as last read (see [`stamps`]).
    seen: Vec<Option<FileStamp>>,
    /// The moment the desired state now in the maps was taken at (expired entries as of
    /// then are not in them).
    applied_at: SystemTime,
    /// Whether the maps may differ from the state last put in force (start-up, a failed
    /// or partial update): the next change then reads them back instead of diffing.
    dirty: bool,
    /// Entry counts of the state in force, counted when it was put in force.
    counts: Counts,
    /// Allowlist entries the last update could not insert because the map is full.
    allow_not_inserted: usize,
    /// When the inline allowlist entries of the policy in force expire, sorted (list
    /// files carry no expiry, so this is short).
    policy_expiries: Vec<SystemTime>,
    /// Whether the last expiry update failed: the timer then waits before retrying.
    expiry_failed: bool,

    interfaces: BTreeMap<String, IfaceState>,
    /// Unix time of the last successful reconcile (for the staleness alert).
    last_sync_unix: f64,
    alerts: AlertTracker,
    offender_alerts: u64,
    offenders_tracked: usize,
    event_counts: Arc<observe::EventCounts>,
    /// Possible CPUs: the event rate limit is per CPU, so the total is split over them.
    cpus: u32,
    /// Fleet mode: the policy comes from etcd (see fleet.rs), not from `opts.policy`.
    fleet: Option<crate::fleet::Source>,
}

pub async fn run(opts: Options) -> Result<()> {
    if ensure_bpffs().context("mounting bpffs")? {
        info!("mounted bpffs at /sys/fs/bpf");
    }
    tune_allocator();
    let (checked, fleet) = match opts.fleet.clone() {
        Some(fleet) => {
            let (source, checked) = crate::fleet::Source::start(fleet).await?;
            (checked, Some(source))
        }
        None => (
            policy::load(&opts.policy)
                .with_context(|| format!("the policy {} is not usable", opts.policy.display()))?,
            None,
        ),
    };
    for warning in &checked.warnings {
        warn!(%warning, "policy warning");
    }
    let seen = stamps(&opts.policy, &checked.policy);
    let runtime = RuntimeStore::open(&opts.state).context("opening the runtime state")?;
    // The event log first: an unusable --events path must stop p25d before it creates or
    // touches anything under the pin root.
    let event_output = observe::open_sink(&opts.events)?;
    let _pin_lock = lock_pin_root(opts.layout.root(), LockFor::Run)?;
    let _socket_lock = lock_socket(&opts.socket, opts.socket_group.as_deref())?;

    let adopting = opts.layout.dir().exists();
    refuse_newer_versions(&opts.layout)?;
    let mut dataplane = Dataplane::open_pinned(&opts.layout).context("loading the dataplane")?;
    let tables = dataplane.take_tables()?;
    let events = dataplane.take_events()?;
    let generation = tables.config()?.generation;
    let cpus = aya::util::nr_cpus()
        .map(|n| u32::try_from(n).unwrap_or(u32::MAX).max(1))
        .unwrap_or(1);
    info!(pins = %opts.layout.dir().display(), adopting, generation, "dataplane loaded");

    let alerts = AlertTracker::new(opts.alert_threshold, opts.alert_window);
    let mut daemon = Daemon {
        alerts,
        offender_alerts: 0,
        offenders_tracked: 0,
        event_counts: Arc::new(observe::EventCounts::default()),
        last_sync_unix: 0.0,
        cpus,
        fleet,
        opts,
        _dataplane: dataplane,
        tables,
        runtime,
        // Replaced by `apply` below; a copy of a million-entry policy just for this would
        // double the daemon's peak memory.
        policy: Policy::empty(),
        generation,
        reloads_ok: 0,
        reloads_failed: 0,
        last_error: None,
        seen,
        applied_at: SystemTime::UNIX_EPOCH,
        // Whatever the maps hold (adopted pins, an older p25d) is read back once.
        dirty: true,
        counts: Counts::default(),
        allow_not_inserted: 0,
        policy_expiries: Vec::new(),
        expiry_failed: false,
        interfaces: BTreeMap::new(),
    };
    daemon.migrate_other_versions(&checked.policy)?;
    daemon.apply(checked.policy, "start")?;

    let listener = bind_socket(&daemon.opts.socket, daemon.opts.socket_group.as_deref())?;
    let (jobs_tx, mut jobs) = mpsc::channel::<Job>(64);
    let admin_gid = group_id(&daemon.opts.admin_group);
    if admin_gid.is_none() {
        warn!(group = %daemon.opts.admin_group, "the admin group does not exist: only root may change the filter (allow, deny, reload)");
    }
    tokio::spawn(accept_loop(listener, jobs_tx, admin_gid));
    let (metrics_tx, mut metrics_jobs) = mpsc::channel::<MetricsJob>(16);
    if let Some(addr) = daemon.opts.metrics_listen {
        observe::serve_metrics(addr, metrics_tx).await?;
    }
    if let Some(out) = event_output {
        tokio::spawn(observe::drain_events(
            events,
            out,
            daemon.event_counts.clone(),
        ));
    }

    let mut hup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut poll = tokio::time::interval(daemon.opts.poll);
    let mut resync = tokio::time::interval(daemon.opts.resync);
    let mut scan = tokio::time::interval(daemon.opts.offender_scan);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    scan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let links = match crate::linkwatch::LinkWatch::open() {
        Ok(watch) => Some(watch),
        Err(e) => {
            warn!(error = %e, "no interface notifications; interface changes are seen by --poll only");
            None
        }
    };

    // The policy is in force and the socket listens: tell systemd (Type=notify).
    if let Err(e) = crate::notify::ready(&format!(
        "filtering; policy generation {}; socket {}",
        daemon.generation,
        daemon.opts.socket.display()
    )) {
        warn!(error = %e, "telling the service manager p25d is ready failed");
    }
    info!(socket = %daemon.opts.socket.display(), "ready");
    loop {
        // Expiry acts on time: sleep until the next entry expires (at most an hour at a
        // time, so that a clock step is noticed), not until the next resync.
        let expiry = daemon.next_expiry_in();
        tokio::select! {
            () = tokio::time::sleep(expiry) => { daemon.expire_due(); }
            Some((line, peer, reply)) = jobs.recv() => {
                let answer = handler::handle(&mut daemon, &peer, &line);
                let _ = reply.send(answer);
            }
            _ = hup.recv() => { let _ = daemon.reload("SIGHUP"); }
            () = async {
                match daemon.fleet.as_mut() {
                    Some(fleet) => fleet.changed().await,
                    None => std::future::pending().await,
                }
            } => {
                let _ = daemon.reload("etcd change");
            }
            () = async {
                match &links {
                    Some(watch) => watch.changed().await,
                    None => std::future::pending().await,
                }
            } => {
                daemon.check_interfaces();
            }
            _ = poll.tick() => {
                if daemon.fleet.is_none() && stamps(&daemon.opts.policy, &daemon.policy) != daemon.seen {
                    let _ = daemon.reload("policy file changed");
                }
                daemon.check_interfaces();
            }
            _ = resync.tick() => { daemon.resync(); }
            _ = scan.tick() => { daemon.scan_offenders(); }
            Some(reply) = metrics_jobs.recv() => {
                let _ = reply.send(daemon.render_metrics());
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    // Deliberately no detach: the pinned links keep filtering until the next p25d adopts
    // them (or `p25d detach` removes them).
    let _ = fs::remove_file(&daemon.opts.socket);
    info!("stopping; filtering continues from the pinned programs");
    Ok(())
}

/// Refuses to start next to pinned state of a newer ABI version: its maps mean something
/// this build does not know, and its links filter with them. Neither is migrated nor
/// removed; the operator runs the newer p25d, or removes that state on purpose.
fn refuse_newer_versions(layout: &PinLayout) -> Result<()> {
    for (version, dir) in layout.other_versions() {
        if version > ABI_VERSION {
            bail!(
                "{} holds pinned state of ABI v{version}, newer than this p25d (ABI \
                 v{ABI_VERSION}); refusing to migrate or remove it. Run the newer p25d, or \
                 remove that state on purpose with `p25d detach --all-versions --pin-root {}`",
                dir.display(),
                layout.root().display()
            );
        }
    }
    Ok(())
}

/// The dataplane's role for a policy interface role.
fn dataplane_role(role: Role) -> filter_common::classify::Role {
    match role {
        Role::Subscriber => filter_common::classify::Role::Subscriber,
        Role::Upstream => filter_common::classify::Role::Upstream,
    }
}

/// Takes an exclusive lock next to the socket so two daemons never serve (and remove) the
/// same socket file. The maps are guarded by [`lock_pin_root`].
fn lock_socket(socket: &Path, group: Option<&str>) -> Result<fs::File> {
    let path = socket.with_extension("lock");
    if let Some(dir) = path.parent() {
        create_runtime_dir(dir, socket_gid(group)?)?;
    }
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening the lock file {}", path.display()))?;
    if !try_flock(&file) {
        bail!(
            "another p25d holds {} and serves the socket {}: give this one another --socket",
            path.display(),
            socket.display()
        );
    }
    Ok(file)
}

/// An exclusive, non-blocking flock; false if someone else holds it.
fn try_flock(file: &fs::File) -> bool {
    use std::os::fd::AsRawFd as _;
    // SAFETY: flock on a valid fd we own.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// What holds a pin root's lock when it is taken, for the error message.
#[derive(Clone, Copy, Debug)]
pub enum LockFor {
    /// `p25d run`.
    Run,
    /// `p25d detach`.
    Detach,
}

/// How long `p25d detach` waits for the pin root's lock: 30 × 100 ms.
const DETACH_LOCK_TRIES: u32 = 30;
const DETACH_LOCK_PAUSE: Duration = Duration::from_millis(100);

/// Takes the writer lock of a pin root: one writer (a running p25d, or `p25d detach`) per
/// pin root, whatever socket each uses.
///
/// The lock is an flock on the pin root directory itself, on bpffs (flock works on any
/// inode there; bpffs cannot hold regular lock files). Unlike a lock file under /run
/// derived from the root's name, it needs no writable directory elsewhere, cannot be
/// dodged by spelling the same root differently (a symlink, `//`, a relative path), and
/// every mount namespace that sees the pins sees the lock (PrivateTmp, containers).
///
/// `p25d run` creates the root (mode 0700) if needed and fails at once if the lock is held;
/// `p25d detach` only locks an existing root (`None` when there is nothing to detach) and
/// waits up to 3 s for it. Detach removes the directory it locked, so
/// after taking the lock the path is checked to still name the locked directory; if not,
/// the lock is taken again on the new one.
pub fn lock_pin_root(root: &Path, purpose: LockFor) -> Result<Option<fs::File>> {
    for _ in 0..8 {
        match purpose {
            LockFor::Run => {
                use std::os::unix::fs::DirBuilderExt as _;
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(root)
                    .with_context(|| format!("creating the pin root {}", root.display()))?;
            }
            LockFor::Detach if !root.exists() => return Ok(None),
            LockFor::Detach => {}
        }
        let dir = match fs::File::open(root) {
            Ok(dir) => dir,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                let hint = if e.kind() == std::io::ErrorKind::PermissionDenied {
                    ": it must belong to the user p25d runs as, pins included (the systemd \
                     unit's ExecStartPre runs `chown -R p25:p25` on it)"
                } else {
                    ""
                };
                return Err(e).with_context(|| {
                    format!("opening the pin root {} to lock it{hint}", root.display())
                });
            }
        };
        // Detach gives a daemon that was just killed a moment to exit (its lock goes with
        // its last fd); a running daemon still refuses it after that.
        let tries = match purpose {
            LockFor::Run => 1,
            LockFor::Detach => DETACH_LOCK_TRIES,
        };
        let mut locked = false;
        for attempt in 0..tries {
            if attempt > 0 {
                std::thread::sleep(DETACH_LOCK_PAUSE);
            }
            if try_flock(&dir) {
                locked = true;
                break;
            }
        }
        if !locked {
            match purpose {
                LockFor::Run => bail!(
                    "another p25d is running on the pin root {} (it holds the pin root's \
                     lock): only one daemon may write these maps. Stop it first (`systemctl \
                     stop p25d`), or give this one another --pin-root",
                    root.display()
                ),
                LockFor::Detach => bail!(
                    "a p25d is running on the pin root {} (it holds the pin root's lock): \
                     stop it first (`systemctl stop p25d`), then detach; detaching under it \
                     would leave it writing to maps no program reads",
                    root.display()
                ),
            }
        }
        let held = dir
            .metadata()
            .with_context(|| format!("stat {}", root.display()))?;
        match fs::metadata(root) {
            Ok(now) if now.dev() == held.dev() && now.ino() == held.ino() => {
                return Ok(Some(dir));
            }
            // Removed (by the detach that held the lock) or replaced meanwhile: retry.
            _ => continue,
        }
    }
    bail!(
        "the pin root {} keeps being removed and recreated while p25d tries to lock it",
        root.display()
    )
}

/// Creates a runtime directory (socket, lock) that does not exist yet: mode 0750, in the
/// socket group if one is given, so the group can reach the socket inside (the umask is
/// 077). An existing directory is left as it is: systemd's RuntimeDirectory= sets its own.
fn create_runtime_dir(dir: &Path, group: Option<u32>) -> Result<()> {
    if dir.exists() {
        return Ok(());
    }
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    set_mode_and_group(dir, 0o750, group)
}

/// chmod, then chgrp if a group is given.
fn set_mode_and_group(path: &Path, mode: u32, group: Option<u32>) -> Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:04o} {}", path.display()))?;
    if let Some(gid) = group {
        std::os::unix::fs::chown(path, None, Some(gid))
            .with_context(|| format!("chgrp {gid} {}", path.display()))?;
    }
    Ok(())
}

/// The gid of `--socket-group`, if given.
fn socket_gid(group: Option<&str>) -> Result<Option<u32>> {
    group
        .map(|group| group_id(group).with_context(|| format!("unknown group {group:?}")))
        .transpose()
}

fn bind_socket(path: &Path, group: Option<&str>) -> Result<UnixListener> {
    let gid = socket_gid(group)?;
    if let Some(dir) = path.parent() {
        create_runtime_dir(dir, gid)?;
    }
    // A socket file left by a killed daemon: we hold the lock, so nobody else uses it.
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing stale {}", path.display())),
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    set_mode_and_group(path, 0o660, gid)?;
    Ok(listener)
}

fn group_id(name: &str) -> Option<u32> {
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: getgrnam returns a pointer into static storage or NULL; we copy the gid out
    // immediately and the daemon is single-threaded here.
    let group = unsafe { libc::getgrnam(name.as_ptr()) };
    // SAFETY: checked for NULL first.
    (!group.is_null()).then(|| unsafe { (*group).gr_gid })
}

/// Control connections served at once from users other than root. Root is never turned
/// away: an operator must be able to allow, deny and reload during a flood of idle
/// connections.
const MAX_CONNECTIONS: usize = 128;
/// Control connections served at once per non-root user, so that one local user cannot
/// take every slot.
const MAX_CONNECTIONS_PER_UID: usize = 8;
/// How long a client may take to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one chunk of an answer may wait for the client to read: a client that stops
/// reading a long `list` is dropped after this.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Answers are written in chunks of this size, each under [`WRITE_TIMEOUT`].
const WRITE_CHUNK: usize = 64 * 1024;

/// Counts the open control connections of each non-root user.
#[derive(Debug, Default)]
struct PerUid(std::sync::Mutex<std::collections::HashMap<u32, usize>>);

/// A slot taken from [`PerUid`], given back when the connection ends.
struct UidSlot {
    counts: Arc<PerUid>,
    uid: u32,
}

impl PerUid {
    fn take(self: &Arc<Self>, uid: u32) -> Option<UidSlot> {
        let mut counts = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = counts.entry(uid).or_default();
        if *count >= MAX_CONNECTIONS_PER_UID {
            return None;
        }
        *count += 1;
        Some(UidSlot {
            counts: self.clone(),
            uid,
        })
    }
}

impl Drop for UidSlot {
    fn drop(&mut self) {
        let mut counts = self
            .counts
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(count) = counts.get_mut(&self.uid) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.remove(&self.uid);
            }
        }
    }
}

/// The supplementary groups of the peer as the kernel recorded them at connect time
/// (SO_PEERGROUPS); empty if the kernel cannot tell.
fn peer_groups(stream: &UnixStream) -> Vec<u32> {
    use std::os::fd::AsRawFd as _;
    let mut groups = vec![0 as libc::gid_t; 256];
    let mut len = libc::socklen_t::try_from(groups.len() * size_of::<libc::gid_t>())
        .unwrap_or(libc::socklen_t::MAX);
    // SAFETY: getsockopt writes at most `len` bytes into `groups`, which holds that many,
    // and updates `len` to the bytes written; the fd is the stream's, open while borrowed.
    let ret = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERGROUPS,
            groups.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if ret != 0 {
        return Vec::new();
    }
    let count = usize::try_from(len).unwrap_or(0) / size_of::<libc::gid_t>();
    groups.truncate(count);
    groups
}

/// Who is on the other end: SO_PEERCRED for uid, gid and pid, SO_PEERGROUPS for the
/// supplementary groups. An administrator is root or a member of `admin_gid`.
fn peer(stream: &UnixStream, admin_gid: Option<u32>) -> std::io::Result<Peer> {
    let cred = stream.peer_cred()?;
    let uid = cred.uid();
    let admin = uid == 0
        || admin_gid.is_some_and(|gid| cred.gid() == gid || peer_groups(stream).contains(&gid));
    Ok(Peer {
        uid,
        pid: cred.pid(),
        admin,
    })
}

async fn accept_loop(listener: UnixListener, jobs: mpsc::Sender<Job>, admin_gid: Option<u32>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let per_uid = Arc::new(PerUid::default());
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                warn!(error = %e, "accepting a control connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let peer = match peer(&stream, admin_gid) {
            Ok(peer) => peer,
            Err(e) => {
                warn!(error = %e, "control connection without peer credentials; closed");
                continue;
            }
        };
        // Root is served whatever the load; everyone else within the caps.
        let permits = if peer.uid == 0 {
            None
        } else {
            let Some(uid_slot) = per_uid.take(peer.uid) else {
                refuse(&stream, peer, "too many connections from your user");
                continue;
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                refuse(&stream, peer, "too many control connections");
                continue;
            };
            Some((uid_slot, permit))
        };
        let jobs = jobs.clone();
        tokio::spawn(async move {
            serve(stream, peer, jobs).await;
            drop(permits);
        });
    }
}

/// Turns a connection away with a one-line error, written only if the socket takes it at
/// once (a fresh socket's buffer always does).
fn refuse(stream: &UnixStream, peer: Peer, why: &str) {
    warn!(uid = peer.uid, pid = ?peer.pid, reason = why, "control connection refused");
    let message = format!(
        "{why} (at most {MAX_CONNECTIONS_PER_UID} per user, {MAX_CONNECTIONS} in all); try again"
    );
    let _ = stream.try_write(&error_answer(message));
}

/// One request, one answer. Malformed input gets an error answer, never a crash; a client
/// that sends nothing, or stops reading, is dropped after a timeout.
async fn serve(stream: UnixStream, peer: Peer, jobs: mpsc::Sender<Job>) {
    let (read, mut write) = stream.into_split();
    // One byte more than the cap, so that the handler sees (and refuses) a longer line.
    let cap = u64::try_from(filter_user::control::MAX_REQUEST + 1).unwrap_or(u64::MAX);
    let mut reader = BufReader::new(read).take(cap);
    let mut line = Vec::new();
    let answer =
        match tokio::time::timeout(REQUEST_TIMEOUT, reader.read_until(b'\n', &mut line)).await {
            Ok(Ok(_)) => {
                let (tx, rx) = oneshot::channel();
                if jobs.send((line, peer, tx)).await.is_err() {
                    error_answer("the daemon is shutting down".into())
                } else {
                    rx.await
                        .unwrap_or_else(|_| error_answer("the daemon dropped the request".into()))
                }
            }
            Ok(Err(e)) => error_answer(format!("reading the request: {e}")),
            Err(_) => error_answer("timed out waiting for the request".into()),
        };
    for chunk in answer.chunks(WRITE_CHUNK) {
        match tokio::time::timeout(WRITE_TIMEOUT, write.write_all(chunk)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return,
            Err(_) => {
                warn!(uid = peer.uid, pid = ?peer.pid, "control client stopped reading; dropped");
                return;
            }
        }
    }
}

use tokio::io::AsyncReadExt as _;

impl Daemon {
    /// The daemon's own settings that go into CONFIG.
    fn settings(&self) -> desired::Settings {
        let (events_rate, events_burst) = if self.opts.events == EventSink::Off {
            (0, 0)
        } else {
            (self.opts.events_rate, self.opts.events_burst)
        };
        desired::Settings {
            offender_v6_prefix: self.opts.offender_v6_prefix,
            events_rate,
            events_burst,
            cpus: self.cpus,
        }
    }

    /// Brings the maps from the state last put in force (`self.policy` at
    /// `self.applied_at`) to `new` (`None`: the policy in force) at `now`: by the
    /// difference, or by reading the maps back if they may have drifted (`self.dirty`).
    /// Records what is then in force; installing a new policy is the caller's.
    fn update_maps(
        &mut self,
        new: Option<&Policy>,
        generation: u32,
        now: SystemTime,
    ) -> Result<SyncReport> {
        let settings = self.settings();
        let runtime = self.runtime.entries();
        let new = new.unwrap_or(&self.policy);
        let config = desired::config(new, &settings, generation);
        let target = Desired::new(config, new, runtime, now);
        let result = if self.dirty {
            sync::reconcile(&mut self.tables, &target)
        } else {
            let config = desired::config(&self.policy, &settings, self.generation);
            let old = Desired::new(config, &self.policy, runtime, self.applied_at);
            sync::apply_diff(&mut self.tables, &old, &target)
        };
        let counts = target.counts();
        drop(target);
        let report = match result {
            Ok(report) => report,
            Err(e) => {
                self.dirty = true;
                return Err(e).context("updating the maps");
            }
        };
        self.counts = counts;
        self.applied_at = now;
        self.allow_not_inserted = report.allow_not_inserted;
        // What did not fit is retried (by reading the maps back) at the next change.
        self.dirty = report.allow_not_inserted > 0;
        if report.allow_not_inserted > 0 {
            let message = format!(
                "the allowlist map is full: {} allowlist entries are not in the maps (the \
                 other changes are); remove entries or raise the capacity",
                report.allow_not_inserted
            );
            error!(not_inserted = report.allow_not_inserted, "{message}");
            self.last_error = Some(message);
        }
        self.synced();
        Ok(report)
    }

    /// Puts `policy` in force: attach its interfaces, reconcile the maps, bump the
    /// generation. Only errors of the maps themselves fail it.
    fn apply(&mut self, policy: Policy, reason: &str) -> Result<()> {
        let generation = self.generation.wrapping_add(1);
        let report = self.update_maps(Some(&policy), generation, SystemTime::now())?;
        self.generation = generation;
        self.sync_interfaces(&policy);
        self.policy_expiries = policy.allow.iter().filter_map(|a| a.expires).collect();
        self.policy_expiries.sort_unstable();
        // The old policy goes only now: it was the "before" of the difference.
        self.policy = policy;
        release_free_memory();
        info!(
            reason,
            generation,
            added = report.added,
            updated = report.updated,
            removed = report.removed,
            subscribers = self.counts.subscribers,
            allow = self.counts.allow_policy + self.counts.allow_runtime,
            allow_not_inserted = report.allow_not_inserted,
            "policy in force"
        );
        Ok(())
    }

    /// How long until the next entry of the state in force expires (an hour if none).
    /// Called on every turn of the loop, so it looks only at the cached expiries of the
    /// policy and at the runtime entries (few), never at the whole policy.
    fn next_expiry_in(&self) -> Duration {
        const IDLE: Duration = Duration::from_secs(3600);
        const RETRY: Duration = Duration::from_secs(5);
        let after = self.applied_at;
        let policy = self
            .policy_expiries
            .get(self.policy_expiries.partition_point(|at| *at <= after))
            .copied();
        let runtime = self
            .runtime
            .entries()
            .values()
            .filter_map(|r| r.expires_unix)
            .map(|secs| SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
            .filter(|at| *at > after)
            .min();
        let next = policy.into_iter().chain(runtime).min();
        let wait = next.map_or(IDLE, |at| {
            at.duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO)
        });
        if self.expiry_failed {
            wait.max(RETRY).min(IDLE)
        } else {
            wait.min(IDLE)
        }
    }

    /// Takes what has expired out of the maps (the difference between the state in force
    /// and the same state now), then out of the runtime store.
    fn expire_due(&mut self) {
        let now = SystemTime::now();
        let result = self.update_maps(None, self.generation, now);
        self.expiry_failed = result.is_err();
        match result {
            Ok(report) if report.changed() => {
                info!(
                    removed = report.removed,
                    updated = report.updated,
                    "expired allowlist entries left the maps"
                );
            }
            Ok(_) => {}
            Err(e) => {
                error!(error = %format!("{e:#}"), "removing expired entries failed; the next resync retries")
            }
        }
        match self.runtime.expire(now) {
            Ok(expired) => {
                for entry in expired {
                    info!(prefix = %entry.prefix, "runtime allow entry expired");
                }
            }
            Err(e) => error!(error = %e, "expiring runtime entries failed"),
        }
    }

    /// Where the policy comes from: the policy file, or in fleet mode the fleet state in
    /// etcd (composed by fleet.rs). The one place that knows; everything after it is the
    /// same reconcile for both.
    fn load_policy(&mut self) -> Result<policy::Checked, String> {
        match &mut self.fleet {
            Some(fleet) => fleet.compose(),
            None => policy::load(&self.opts.policy).map_err(|e| e.to_string()),
        }
    }

    /// Re-reads the policy (see [`Daemon::load_policy`]). A bad policy is rejected and
    /// counted; the old policy stays.
    fn reload(&mut self, reason: &str) -> Result<ReloadView, String> {
        // Stamped before reading, so that an edit during the read is seen next time. A
        // rejected file keeps the list files of the policy in force watched.
        self.seen = stamps(&self.opts.policy, &self.policy);
        let checked = match self.load_policy() {
            Ok(checked) => checked,
            Err(message) => {
                self.reloads_failed += 1;
                error!(reason, error = %message, generation = self.generation, "policy rejected; the previous policy stays in force");
                self.last_error = Some(message.clone());
                return Err(message);
            }
        };
        for warning in &checked.warnings {
            warn!(%warning, "policy warning");
        }
        let seen = stamps(&self.opts.policy, &checked.policy);
        // The stamps of list files as of just after the read would miss an edit made
        // during it; the policy file's own stamp is the one taken before reading.
        self.seen = self
            .seen
            .iter()
            .take(1)
            .cloned()
            .chain(seen.into_iter().skip(1))
            .collect();
        self.last_error = None;
        let result = self.apply(checked.policy, reason);
        if let Some(fleet) = &mut self.fleet {
            match &result {
                Ok(()) => fleet.applied(),
                Err(e) => fleet.apply_failed(&format!("{e:#}")),
            }
        }
        match result {
            Ok(()) => {
                self.reloads_ok += 1;
                Ok(ReloadView {
                    generation: self.generation,
                })
            }
            Err(e) => {
                self.reloads_failed += 1;
                let message = format!("{e:#}");
                error!(reason, error = %message, "applying the policy failed");
                self.last_error = Some(message.clone());
                Err(message)
            }
        }
    }

    /// Periodic repair: read the maps back and re-apply the state in force, so drift
    /// (say, an entry deleted with bpftool, or a runtime entry whose write failed) does
    /// not persist.
    fn resync(&mut self) {
        self.expire_due();
        self.dirty = true;
        let result = self.update_maps(None, self.generation, SystemTime::now());
        match result {
            Ok(report) => {
                if report.changed() {
                    info!(
                        added = report.added,
                        updated = report.updated,
                        removed = report.removed,
                        "resync repaired drift"
                    );
                }
            }
            Err(e) => error!(error = %e, "resync failed"),
        }
    }

    /// Takes over pinned state left by older ABI versions, never leaving a live link on
    /// unfilled maps:
    /// 1. fill this version's maps completely: the policy and runtime entries, then the
    ///    per-source SYN buckets carried over from the old maps;
    /// 2. move each link: this build's program for the interface's role replaces the old
    ///    one in place (`bpf_link_update`), so the interface is never unfiltered, and the
    ///    link is re-pinned here;
    /// 3. remove the old directory.
    ///
    /// A failed fill returns the error before any link moved: the old links keep
    /// filtering with the old maps, untouched, and p25d exits.
    fn migrate_other_versions(&mut self, policy: &Policy) -> Result<()> {
        let layout = self.opts.layout.clone();
        let older: Vec<(u32, PathBuf)> = layout
            .other_versions()
            .into_iter()
            .filter(|(version, _)| *version < ABI_VERSION)
            .collect();
        if older.is_empty() {
            return Ok(());
        }
        let config = desired::config(policy, &self.settings(), self.generation.wrapping_add(1));
        let target = Desired::new(config, policy, self.runtime.entries(), SystemTime::now());
        let counts = target.counts();
        let report = sync::reconcile(&mut self.tables, &target).with_context(|| {
            format!(
                "filling the ABI v{ABI_VERSION} maps before taking over the links of {}; \
                 the old links and maps are untouched and still filtering",
                older
                    .iter()
                    .map(|(_, dir)| dir.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
        info!(
            added = report.added,
            subscribers = counts.subscribers,
            allow = counts.allow_policy + counts.allow_runtime,
            "filled the new maps before migrating"
        );
        for (version, dir) in &older {
            match self.tables.import_syn_buckets(&dir.join("maps")) {
                Ok(n) => info!(version, buckets = n, "carried over SYN buckets"),
                // The buckets only refill early: an allowlisted source gets its burst again.
                Err(e) => warn!(version, error = %e, "could not carry over SYN buckets"),
            }
        }
        let roles: BTreeMap<&str, Role> = policy
            .interfaces
            .iter()
            .map(|i| (i.name.as_str(), i.role))
            .collect();
        for (version, dir) in &older {
            let version = *version;
            for (interface, hook, old) in links_in(&dir.join("links")) {
                // An interface no longer in the policy is detached by the first apply.
                let role = roles
                    .get(interface.as_str())
                    .copied()
                    .map_or(filter_common::classify::Role::Subscriber, dataplane_role);
                match self
                    ._dataplane
                    .migrate_link(&layout, &interface, hook, role, &old)
                {
                    Ok(()) => {
                        info!(version, %interface, ?hook, "migrated link from ABI v{version}")
                    }
                    Err(e) => {
                        let e = format!("{:#}", anyhow::Error::from(e));
                        // A defunct link (its interface is gone) filters nothing; drop it.
                        warn!(version, %interface, ?hook, error = %e, "could not migrate link; removing it");
                        let _ = fs::remove_file(&old);
                    }
                }
            }
            match remove_version_dir(dir) {
                Ok(n) => info!(version, removed = n, dir = %dir.display(), "removed old ABI state"),
                Err(e) => {
                    warn!(version, error = %format!("{e:#}"), "removing old ABI state failed")
                }
            }
        }
        Ok(())
    }

    fn synced(&mut self) {
        self.last_sync_unix = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
    }

    /// Reads the offender table and raises the alerts it warrants.
    fn scan_offenders(&mut self) {
        let entries = match self.tables.offenders() {
            Ok(entries) => entries,
            Err(e) => {
                warn!(error = %e, "reading the offender table failed");
                return;
            }
        };
        self.offenders_tracked = entries.len();
        let now = Duration::from_nanos(monotonic_ns());
        for alert in self.alerts.observe(now, &entries) {
            self.offender_alerts += 1;
            let subscriber = offenders::subscriber(&alert.key)
                .map(|s| s.to_string())
                .unwrap_or_default();
            warn!(
                event = "offender_alert",
                %subscriber,
                attempts_in_window = alert.attempts_in_window,
                attempts_total = alert.attempts_total,
                threshold = self.opts.alert_threshold,
                window_secs = self.opts.alert_window.as_secs(),
                "offender alert: subscriber exceeded the blocked port-25 attempt threshold"
            );
        }
    }

    /// The offender table as views, filtered as asked.
    fn offender_views(
        &self,
        since_secs: Option<u64>,
        limit: Option<usize>,
    ) -> Result<Vec<OffenderView>, String> {
        let entries = self.tables.offenders().map_err(|e| e.to_string())?;
        let views = offenders::views(&entries, &offenders::Clock::now());
        let now = unix(SystemTime::now());
        Ok(filter_user::control::filter_offenders(
            views, since_secs, limit, now,
        ))
    }

    /// One `/metrics` page. Empty on failure (the HTTP side answers 503), with the reason
    /// logged.
    fn render_metrics(&self) -> String {
        match self.metrics_snapshot() {
            Ok(snapshot) => metrics::render(&snapshot).unwrap_or_else(|e| {
                error!(error = %e, "rendering metrics failed");
                String::new()
            }),
            Err(e) => {
                error!(error = %format!("{e:#}"), "reading the maps for metrics failed");
                String::new()
            }
        }
    }

    fn metrics_snapshot(&self) -> Result<metrics::Snapshot> {
        // Interface slot → the attached interfaces' names (normally one).
        let mut slot_names: BTreeMap<u32, Vec<&str>> = BTreeMap::new();
        for (name, state) in &self.interfaces {
            if let Some(ifindex) = state.ifindex {
                slot_names
                    .entry(iface_slot(ifindex))
                    .or_default()
                    .push(name);
            }
        }
        let mut packets = BTreeMap::new();
        for ((slot, key), counter) in self.tables.interface_counters()? {
            let interface = match slot_names.get(&slot) {
                Some(names) => names.join("+"),
                None => format!("ifindex-slot-{slot}"),
            };
            let total = packets.entry((interface, key)).or_default();
            *total = filter_common::abi::Counter::plus(*total, counter);
        }
        let allow_runtime = self.allow_runtime_count();
        let (policy_revision, policy_source_up, policy_source_errors) = match &self.fleet {
            Some(fleet) => fleet.metrics(),
            None => (0, true, BTreeMap::new()),
        };
        let top_offenders = if self.opts.metrics_top_offenders == 0 {
            Vec::new()
        } else {
            let entries = self.tables.offenders()?;
            offenders::views(&entries, &offenders::Clock::now())
                .into_iter()
                .take(self.opts.metrics_top_offenders)
                .map(|v| (v.subscriber.to_string(), v.attempts))
                .collect()
        };
        Ok(metrics::Snapshot {
            packets,
            parse: self.tables.counters()?.parse,
            reloads_ok: self.reloads_ok,
            reloads_failed: self.reloads_failed,
            generation: self.generation,
            last_sync_unix: self.last_sync_unix,
            allow_policy: self.counts.allow_policy,
            allow_runtime,
            allow_not_inserted: self.allow_not_inserted,
            subscriber_prefixes: self.counts.subscribers,
            offenders: self.offenders_tracked,
            offender_alerts: self.offender_alerts,
            events: self.tables.event_stats()?,
            reject_fallbacks: self.tables.reject_fallbacks()?,
            events_written: self.event_counts.written.load(Ordering::Relaxed),
            events_log_dropped: self.event_counts.dropped.load(Ordering::Relaxed),
            interfaces: self
                .interface_views()
                .into_iter()
                .map(|v| (v.name, v.hook, v.attached))
                .collect(),
            top_offenders,
            policy_revision,
            policy_source_up,
            policy_source_errors,
        })
    }

    /// Attaches the policy's interfaces and detaches pinned links of interfaces that left
    /// the policy.
    fn sync_interfaces(&mut self, policy: &Policy) {
        let wanted: BTreeMap<String, (Role, Attach)> = policy
            .interfaces
            .iter()
            .map(|i| (i.name.clone(), (i.role, i.attach)))
            .collect();
        for (interface, hook, _) in self.opts.layout.pinned_links() {
            if !wanted.contains_key(&interface) {
                match filter_user::loader::detach_pinned(&self.opts.layout, &interface, hook) {
                    Ok(_) => {
                        info!(%interface, ?hook, "detached: interface no longer in the policy")
                    }
                    Err(e) => error!(%interface, error = %e, "detaching failed"),
                }
            }
        }
        self.interfaces.retain(|name, _| wanted.contains_key(name));
        for (name, (role, attach)) in wanted {
            let state = self.interfaces.entry(name.clone()).or_insert(IfaceState {
                role,
                attach,
                hook: None,
                ifindex: None,
                note: String::new(),
            });
            // A role change swaps the attachment's program (in place, no gap).
            let changed = state.attach != attach || state.role != role;
            state.role = role;
            state.attach = attach;
            if changed || state.hook.is_none() {
                self.attach(&name);
            }
        }
    }

    /// Attaches (or adopts) one interface per its attach method.
    fn attach(&mut self, name: &str) {
        let Some(state) = self.interfaces.get(name).cloned() else {
            return;
        };
        if ifindex(name).is_none() {
            let note = "interface not present; will attach when it appears".to_owned();
            if state.note != note {
                warn!(
                    interface = name,
                    "interface not present; will attach when it appears"
                );
            }
            self.set_state(name, None, None, note);
            return;
        }
        let layout = self.opts.layout.clone();
        let dataplane = &mut self._dataplane;
        let try_hook = |dataplane: &mut Dataplane, hook: Hook| {
            dataplane.attach_pinned(
                &layout,
                name,
                hook,
                dataplane_role(state.role),
                XdpMode::Driver,
            )
        };
        let (hook, result, note) = match state.attach {
            Attach::Xdp => (Hook::Xdp, try_hook(dataplane, Hook::Xdp), String::new()),
            Attach::Tc => (Hook::Tc, try_hook(dataplane, Hook::Tc), String::new()),
            Attach::Auto => match try_hook(dataplane, Hook::Xdp) {
                Ok(attached) => (Hook::Xdp, Ok(attached), String::new()),
                Err(e) => {
                    let e = format!("{:#}", anyhow::Error::from(e));
                    let note = format!("native XDP unavailable ({e}); fell back to tc");
                    warn!(interface = name, reason = %e, "native XDP unavailable; falling back to TC");
                    (Hook::Tc, try_hook(dataplane, Hook::Tc), note)
                }
            },
        };
        // A method change leaves the other hook's link pinned: remove it.
        let other = if hook == Hook::Xdp {
            Hook::Tc
        } else {
            Hook::Xdp
        };
        match result {
            Ok(attached) => {
                let _ = filter_user::loader::detach_pinned(&layout, name, other);
                info!(interface = name, ?hook, ifindex = attached.ifindex, adopted = attached.adopted, role = ?state.role, "attached");
                self.set_state(name, Some(hook), Some(attached.ifindex), note);
            }
            Err(e) => {
                let e = format!("{:#}", anyhow::Error::from(e));
                error!(interface = name, ?hook, error = %e, "attaching failed");
                self.set_state(name, None, None, format!("attach failed: {e}"));
            }
        }
    }

    fn set_state(&mut self, name: &str, hook: Option<Hook>, ifindex: Option<u32>, note: String) {
        if let Some(state) = self.interfaces.get_mut(name) {
            state.hook = hook;
            state.ifindex = ifindex;
            state.note = note;
        }
    }

    /// Interface hotplug: re-attach an interface that appeared, or that was deleted and
    /// recreated (its old link died with it).
    fn check_interfaces(&mut self) {
        let names: Vec<String> = self.interfaces.keys().cloned().collect();
        for name in names {
            let Some(state) = self.interfaces.get(&name).cloned() else {
                continue;
            };
            let now = ifindex(&name);
            let live = state
                .hook
                .map(|hook| pinned_link_ifindex(&self.opts.layout.link(&name, hook)));
            let healthy = now.is_some() && live == Some(now) && state.ifindex == now;
            if now.is_some() && !healthy {
                info!(interface = %name, ifindex = ?now, "interface (re)appeared; attaching");
                self.attach(&name);
            } else if now.is_none() && state.ifindex.is_some() {
                warn!(interface = %name, "interface disappeared; will re-attach when it returns");
                self.set_state(&name, state.hook, None, "interface disappeared".into());
            }
        }
    }

    fn interface_views(&self) -> Vec<InterfaceView> {
        let links = pinned_link_status(&self.opts.layout);
        self.interfaces
            .iter()
            .map(|(name, state)| {
                let live = links.iter().any(|l| {
                    &l.interface == name
                        && Some(l.hook) == state.hook
                        && l.ifindex.is_some()
                        && l.ifindex == state.ifindex
                });
                InterfaceView {
                    name: name.clone(),
                    role: format!("{:?}", state.role).to_lowercase(),
                    hook: state
                        .hook
                        .map(|h| format!("{h:?}").to_lowercase())
                        .unwrap_or_default(),
                    attached: live,
                    note: state.note.clone(),
                }
            })
            .collect()
    }

    /// Runtime allowlist entries in force that the policy does not also list. The policy's
    /// counts are taken when a state is put in force; runtime entries change in between
    /// (`p25ctl allow`/`deny`) and are few (capped by --max-runtime-entries), so they are
    /// counted when asked.
    fn allow_runtime_count(&self) -> usize {
        let now = SystemTime::now();
        let policy_has = |prefix| {
            self.policy
                .allow_entry(prefix)
                .is_some_and(|a| !a.is_expired(now))
        };
        self.runtime
            .entries()
            .values()
            .filter(|r| !r.expired(now) && !policy_has(r.prefix))
            .count()
    }

    fn status(&self) -> Result<StatusView> {
        let config = self.tables.config()?;
        let interfaces = self.interface_views();
        Ok(StatusView {
            daemon: true,
            policy: match &self.fleet {
                Some(fleet) => fleet.policy_name(),
                None => self.opts.policy.display().to_string(),
            },
            generation: config.generation,
            mode: config.mode.name().into(),
            fragments: config.fragments.name().into(),
            reloads_ok: self.reloads_ok,
            reloads_failed: self.reloads_failed,
            last_error: self.last_error.clone(),
            interfaces,
            // From the counts of the state in force, not by walking a million map entries
            // per call; drift behind p25d's back is repaired by the resync.
            subscribers: self.counts.subscribers,
            allow: (self.counts.allow_policy + self.allow_runtime_count())
                .saturating_sub(self.allow_not_inserted),
            runtime_allow: self.runtime.entries().len(),
            pins: self.opts.layout.dir().display().to_string(),
            source: Some(match &self.fleet {
                Some(fleet) => fleet.view(),
                None => filter_user::fleet::views::SourceView {
                    kind: "file".into(),
                    location: self.opts.policy.display().to_string(),
                    up: true,
                    ..Default::default()
                },
            }),
        })
    }
}

/// The control handler's view of the daemon (see `filter_user::control::handler`).
impl Host for Daemon {
    type Tables = KernelTables;

    fn parts(&mut self) -> Parts<'_, KernelTables> {
        Parts {
            tables: &mut self.tables,
            runtime: &mut self.runtime,
            policy: &self.policy,
            policy_path: &self.opts.policy,
            admin_group: &self.opts.admin_group,
            max_runtime_entries: self.opts.max_runtime_entries,
        }
    }

    fn status(&self) -> Result<StatusView, String> {
        Daemon::status(self).map_err(|e| format!("{e:#}"))
    }

    fn stats(&self) -> Result<StatsView, String> {
        self.tables
            .counters()
            .map(|c| StatsView::from(&c))
            .map_err(|e| e.to_string())
    }

    fn reload(&mut self, reason: &str) -> Result<ReloadView, String> {
        Daemon::reload(self, reason)
    }

    fn offenders(
        &self,
        since_secs: Option<u64>,
        limit: Option<usize>,
    ) -> Result<Vec<OffenderView>, String> {
        self.offender_views(since_secs, limit)
    }
}

/// Makes every allocation of 1 MiB or more a mapping of its own, returned to the system
/// when freed. glibc's default raises that threshold to the largest block freed so far
/// (up to 32 MiB), after which the per-reload scratch lists of a million-entry policy
/// (tens of MiB each) land in the heap and stay in the daemon's resident set.
fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes allocator parameters; called before any large
    // allocation.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

/// Hands the heap memory freed by a reload (the previous policy, the check's scratch
/// lists) back to the system, so that the daemon's idle footprint is the policy in force
/// rather than the peak of the last reload.
fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free heap pages to the kernel; it touches no
    // memory the program holds.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Removes a whole pinned-state directory of another ABI version (links first).
pub fn remove_version_dir(dir: &Path) -> Result<usize> {
    let mut removed = 0;
    for sub in ["links", "maps"] {
        let path = dir.join(sub);
        let Ok(entries) = fs::read_dir(&path) else {
            continue;
        };
        for entry in entries.flatten() {
            fs::remove_file(entry.path())
                .with_context(|| format!("removing {}", entry.path().display()))?;
            removed += 1;
        }
        let _ = fs::remove_dir(&path);
    }
    let _ = fs::remove_dir(dir);
    Ok(removed)
}
