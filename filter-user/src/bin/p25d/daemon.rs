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
use filter_common::abi::{
    ABI_VERSION, AllowValue, BlockAction, Config, FragmentPolicy, Mode, Origin, SubscriberValue,
    iface_slot,
};
use filter_user::{
    Dataplane, KernelTables, check_prefix,
    control::{
        AllowEntryView, InterfaceView, ListView, Request, Response, Source, StatsView, StatusView,
        SubscriberView,
    },
    loader::{
        Hook, PinLayout, ensure_bpffs, ifindex, links_in, pinned_link_ifindex, pinned_link_status,
    },
    metrics,
    offenders::{self, AlertTracker, monotonic_ns},
    policy::{self, AllowEntry, Attach, Policy, Role},
    runtime::{RuntimeEntry, RuntimeStore, rfc3339, unix},
    sync::{Desired, reconcile},
};
use ipnet::IpNet;
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
}

/// Identifies a version of the policy file cheaply, to notice edits.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
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

type Job = (Request, oneshot::Sender<Response>);

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
    seen: Option<FileStamp>,
    interfaces: BTreeMap<String, IfaceState>,
    /// Unix time of the last successful reconcile (for the staleness alert).
    last_sync_unix: f64,
    alerts: AlertTracker,
    offender_alerts: u64,
    offenders_tracked: usize,
    event_counts: Arc<observe::EventCounts>,
    /// Possible CPUs: the event rate limit is per CPU, so the total is split over them.
    cpus: u32,
}

pub async fn run(opts: Options) -> Result<()> {
    if ensure_bpffs().context("mounting bpffs")? {
        info!("mounted bpffs at /sys/fs/bpf");
    }
    let checked = policy::load(&opts.policy)
        .with_context(|| format!("the policy {} is not usable", opts.policy.display()))?;
    for warning in &checked.warnings {
        warn!(%warning, "policy warning");
    }
    let seen = stamp(&opts.policy);
    let runtime = RuntimeStore::open(&opts.state).context("opening the runtime state")?;
    let _lock = lock(&opts.socket)?;
    let event_output = observe::open_sink(&opts.events)?;

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
        opts,
        _dataplane: dataplane,
        tables,
        runtime,
        // Replaced by `apply` below; a copy of a million-entry policy just for this would
        // double the daemon's peak memory.
        policy: Policy {
            version: policy::POLICY_VERSION,
            defaults: policy::Defaults::default(),
            interfaces: Vec::new(),
            subscribers: Vec::new(),
            allow: Vec::new(),
            allow_empty_subscribers: true,
        },
        generation,
        reloads_ok: 0,
        reloads_failed: 0,
        last_error: None,
        seen,
        interfaces: BTreeMap::new(),
    };
    daemon.migrate_other_versions(&checked.policy)?;
    daemon.apply(checked.policy, "start")?;

    let listener = bind_socket(&daemon.opts.socket, daemon.opts.socket_group.as_deref())?;
    let (jobs_tx, mut jobs) = mpsc::channel::<Job>(64);
    tokio::spawn(accept_loop(listener, jobs_tx));
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

    info!(socket = %daemon.opts.socket.display(), "ready");
    loop {
        tokio::select! {
            Some((request, reply)) = jobs.recv() => {
                let response = daemon.handle(request);
                let _ = reply.send(response);
            }
            _ = hup.recv() => { daemon.reload("SIGHUP"); }
            () = async {
                match &links {
                    Some(watch) => watch.changed().await,
                    None => std::future::pending().await,
                }
            } => {
                daemon.check_interfaces();
            }
            _ = poll.tick() => {
                if stamp(&daemon.opts.policy) != daemon.seen {
                    daemon.reload("policy file changed");
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

/// Takes an exclusive lock next to the socket so two daemons never write the same maps.
fn lock(socket: &Path) -> Result<fs::File> {
    let path = socket.with_extension("lock");
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening the lock file {}", path.display()))?;
    use std::os::fd::AsRawFd as _;
    // SAFETY: flock on a valid fd we own.
    let ret = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if ret != 0 {
        bail!(
            "another p25d holds {} (only one daemon may write the maps)",
            path.display()
        );
    }
    Ok(file)
}

fn bind_socket(path: &Path, group: Option<&str>) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // A socket file left by a killed daemon: we hold the lock, so nobody else uses it.
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing stale {}", path.display())),
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o660))
        .with_context(|| format!("chmod 0660 {}", path.display()))?;
    if let Some(group) = group {
        let gid = group_id(group).with_context(|| format!("unknown group {group:?}"))?;
        std::os::unix::fs::chown(path, None, Some(gid))
            .with_context(|| format!("chgrp {group} {}", path.display()))?;
    }
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

async fn accept_loop(listener: UnixListener, jobs: mpsc::Sender<Job>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve(stream, jobs.clone()));
            }
            Err(e) => {
                warn!(error = %e, "accepting a control connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// One request, one response. Malformed input gets an error response, never a crash.
async fn serve(stream: UnixStream, jobs: mpsc::Sender<Job>) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read).take(64 * 1024);
    let mut line = String::new();
    let response =
        match tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut line)).await {
            Ok(Ok(_)) => match serde_json::from_str::<Request>(&line) {
                Ok(request) => {
                    let (tx, rx) = oneshot::channel();
                    if jobs.send((request, tx)).await.is_err() {
                        Response::Error {
                            message: "the daemon is shutting down".into(),
                        }
                    } else {
                        rx.await.unwrap_or(Response::Error {
                            message: "the daemon dropped the request".into(),
                        })
                    }
                }
                Err(e) => Response::Error {
                    message: format!("malformed request: {e}"),
                },
            },
            Ok(Err(e)) => Response::Error {
                message: format!("reading the request: {e}"),
            },
            Err(_) => Response::Error {
                message: "timed out waiting for the request".into(),
            },
        };
    let mut bytes = serde_json::to_vec(&response).unwrap_or_default();
    bytes.push(b'\n');
    let _ = write.write_all(&bytes).await;
}

use tokio::io::AsyncReadExt as _;

fn ok(data: impl serde::Serialize) -> Response {
    match serde_json::to_value(data) {
        Ok(data) => Response::Ok { data },
        Err(e) => Response::Error {
            message: e.to_string(),
        },
    }
}

/// The ALLOW value of a policy entry: its origin and SYN limit.
pub(crate) fn policy_allow_value(entry: &AllowEntry) -> AllowValue {
    let value = AllowValue::new(Origin::POLICY);
    match entry.syn_limit {
        Some(limit) => value.with_syn_limit(limit.per_minute, limit.burst),
        None => value,
    }
}

impl Daemon {
    /// The maps' target state for `policy`, the runtime entries, and `generation`.
    fn desired(&self, policy: &Policy, generation: u32) -> Desired {
        let now = SystemTime::now();
        let (event_rate, event_burst) = if self.opts.events == EventSink::Off {
            (0, 0)
        } else {
            // The kernel's bucket is per CPU; split the operator's total evenly, rounding
            // up so that a small total never becomes zero.
            (
                self.opts.events_rate.div_ceil(self.cpus),
                self.opts.events_burst.div_ceil(self.cpus).max(1),
            )
        };
        let config = Config {
            mode: policy.defaults.mode.into(),
            fragments: FragmentPolicy::from(policy.defaults.fragments),
            unreadable_tcp: policy.defaults.unreadable_tcp.into(),
            _pad: [0; 3],
            offender_v6_prefix: self.opts.offender_v6_prefix,
            action: policy.defaults.action.into(),
            generation,
            event_rate,
            event_burst,
            // Per CPU in the kernel, like the event bucket: split the policy's router-wide
            // rate so that a flood spread over every CPU still gets at most about it.
            rst_rate: policy.defaults.reject_rate.div_ceil(self.cpus),
            rst_burst: policy.defaults.reject_burst.div_ceil(self.cpus).max(1),
        };
        let subscribers = policy
            .subscribers
            .iter()
            .map(|s| {
                let mode = s.mode.map_or(Mode::DEFAULT, Mode::from);
                let action = s.action.map_or(BlockAction::DEFAULT, BlockAction::from);
                (s.prefix, SubscriberValue::new(mode).with_action(action))
            })
            .collect();
        let mut allow: BTreeMap<IpNet, AllowValue> = policy
            .allow
            .iter()
            .filter(|a| a.expires.is_none_or(|e| e > now))
            .map(|a| (a.prefix, policy_allow_value(a)))
            .collect();
        for entry in self.runtime.entries().values() {
            if !entry.expired(now) {
                allow
                    .entry(entry.prefix)
                    .or_insert(AllowValue::new(Origin::RUNTIME));
            }
        }
        Desired {
            config,
            subscribers,
            allow,
        }
    }

    /// Puts `policy` in force: attach its interfaces, reconcile the maps, bump the
    /// generation. Only errors of the maps themselves fail it.
    fn apply(&mut self, policy: Policy, reason: &str) -> Result<()> {
        let generation = self.generation.wrapping_add(1);
        let desired = self.desired(&policy, generation);
        let report = reconcile(&mut self.tables, &desired).context("updating the maps")?;
        self.synced();
        self.generation = generation;
        self.sync_interfaces(&policy);
        self.policy = policy;
        info!(
            reason,
            generation,
            added = report.added,
            updated = report.updated,
            removed = report.removed,
            subscribers = desired.subscribers.len(),
            allow = desired.allow.len(),
            "policy in force"
        );
        Ok(())
    }

    /// Re-reads the policy file. A bad file is rejected and counted; the old policy stays.
    fn reload(&mut self, reason: &str) -> Response {
        self.seen = stamp(&self.opts.policy);
        let checked = match policy::load(&self.opts.policy) {
            Ok(checked) => checked,
            Err(e) => {
                self.reloads_failed += 1;
                let message = e.to_string();
                error!(reason, error = %message, generation = self.generation, "policy rejected; the previous policy stays in force");
                self.last_error = Some(message.clone());
                return Response::Error { message };
            }
        };
        for warning in &checked.warnings {
            warn!(%warning, "policy warning");
        }
        match self.apply(checked.policy, reason) {
            Ok(()) => {
                self.reloads_ok += 1;
                self.last_error = None;
                ok(serde_json::json!({ "generation": self.generation }))
            }
            Err(e) => {
                self.reloads_failed += 1;
                let message = format!("{e:#}");
                error!(reason, error = %message, "applying the policy failed");
                self.last_error = Some(message.clone());
                Response::Error { message }
            }
        }
    }

    /// Periodic repair: expire runtime entries and re-apply the desired state, so drift
    /// (say, an entry deleted with bpftool) does not persist.
    fn resync(&mut self) {
        match self.runtime.expire(SystemTime::now()) {
            Ok(expired) => {
                for entry in expired {
                    info!(prefix = %entry.prefix, "runtime allow entry expired");
                }
            }
            Err(e) => error!(error = %e, "expiring runtime entries failed"),
        }
        let desired = self.desired(&self.policy, self.generation);
        match reconcile(&mut self.tables, &desired) {
            Ok(report) => {
                self.synced();
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
        let desired = self.desired(policy, self.generation.wrapping_add(1));
        let report = reconcile(&mut self.tables, &desired).with_context(|| {
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
            subscribers = desired.subscribers.len(),
            allow = desired.allow.len(),
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
    fn offender_views(&self, since_secs: Option<u64>, limit: Option<usize>) -> Response {
        match self.tables.offenders() {
            Ok(entries) => {
                let views = offenders::views(&entries, &offenders::Clock::now());
                let now = unix(SystemTime::now());
                ok(filter_user::control::filter_offenders(
                    views, since_secs, limit, now,
                ))
            }
            Err(e) => Response::Error {
                message: e.to_string(),
            },
        }
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
        let desired = self.desired(&self.policy, self.generation);
        let allow_policy = desired
            .allow
            .values()
            .filter(|v| v.origin == Origin::POLICY)
            .count();
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
            allow_policy,
            allow_runtime: desired.allow.len() - allow_policy,
            subscriber_prefixes: desired.subscribers.len(),
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

    fn handle(&mut self, request: Request) -> Response {
        match request {
            Request::Allow {
                prefix,
                comment,
                expires_in_secs,
            } => self.allow(prefix, comment, expires_in_secs),
            Request::Deny { prefix } => self.deny(prefix),
            Request::List => ok(self.list()),
            Request::Status => match self.status() {
                Ok(s) => ok(s),
                Err(e) => Response::Error {
                    message: format!("{e:#}"),
                },
            },
            Request::Stats => match self.tables.counters() {
                Ok(c) => ok(StatsView::from(&c)),
                Err(e) => Response::Error {
                    message: e.to_string(),
                },
            },
            Request::Reload => self.reload("p25ctl reload"),
            Request::Offenders { since_secs, limit } => self.offender_views(since_secs, limit),
        }
    }

    fn allow(
        &mut self,
        prefix: IpNet,
        comment: Option<String>,
        expires_in: Option<u64>,
    ) -> Response {
        if let Err(e) = check_prefix(prefix) {
            return Response::Error {
                message: e.to_string(),
            };
        }
        let now = unix(SystemTime::now());
        let entry = RuntimeEntry {
            prefix,
            comment,
            added_unix: now,
            expires_unix: expires_in.map(|s| now.saturating_add(s)),
        };
        if let Err(e) = self.runtime.add(entry.clone()) {
            return Response::Error {
                message: e.to_string(),
            };
        }
        // Write just this entry instead of a full reconcile, which reads every map entry
        // back (seconds at a million entries). A policy entry keeps its origin, as in
        // `desired`; only a prefix the maps already cover can be one, so the scan of the
        // policy is skipped in the common case. The periodic resync still repairs drift.
        let now = SystemTime::now();
        let in_policy = self.tables.allow_covers(prefix).unwrap_or(true)
            && self
                .policy
                .allow
                .iter()
                .any(|a| a.prefix == prefix && !a.is_expired(now));
        let written = if in_policy {
            Ok(())
        } else {
            self.tables
                .insert_allow(prefix, AllowValue::new(Origin::RUNTIME))
        };
        if let Err(e) = written {
            return Response::Error {
                message: format!(
                    "saved, but updating the maps failed (the next resync retries): {e}"
                ),
            };
        }
        info!(%prefix, expires = ?entry.expires_unix.map(rfc3339), "runtime allow added");
        ok(serde_json::json!({ "prefix": prefix, "expires": entry.expires_unix.map(rfc3339) }))
    }

    fn deny(&mut self, prefix: IpNet) -> Response {
        if let Err(e) = check_prefix(prefix) {
            return Response::Error {
                message: e.to_string(),
            };
        }
        match self.runtime.remove(prefix) {
            Ok(Some(_)) => {}
            Ok(None) => {
                let in_policy = self.policy.allow.iter().any(|a| a.prefix == prefix);
                let message = if in_policy {
                    format!(
                        "{prefix} comes from the policy file {}; remove it there",
                        self.opts.policy.display()
                    )
                } else {
                    format!("{prefix} is not in the runtime allowlist (see `p25ctl list`)")
                };
                return Response::Error { message };
            }
            Err(e) => {
                return Response::Error {
                    message: e.to_string(),
                };
            }
        }
        // Remove just this entry (see `allow`), unless the policy allows the same prefix.
        let now = SystemTime::now();
        let in_policy = self
            .policy
            .allow
            .iter()
            .any(|a| a.prefix == prefix && !a.is_expired(now));
        let removed = if in_policy {
            Ok(false)
        } else {
            self.tables.remove_allow(prefix)
        };
        if let Err(e) = removed {
            return Response::Error {
                message: format!(
                    "removed from the state, but updating the maps failed (the next resync retries): {e}"
                ),
            };
        }
        info!(%prefix, "runtime allow removed");
        ok(serde_json::json!({ "prefix": prefix }))
    }

    fn list(&self) -> ListView {
        let mut allow: BTreeMap<IpNet, AllowEntryView> = BTreeMap::new();
        for a in &self.policy.allow {
            allow.insert(
                a.prefix,
                AllowEntryView {
                    prefix: a.prefix,
                    source: Source::Policy,
                    comment: a.comment.as_deref().map(str::to_owned),
                    owner: a.owner.as_deref().map(str::to_owned),
                    expires: a.expires.map(|e| rfc3339(unix(e))),
                    max_syn_per_minute: a.syn_limit.map(|l| l.per_minute),
                    syn_burst: a.syn_limit.map(|l| l.burst),
                },
            );
        }
        for r in self.runtime.entries().values() {
            allow
                .entry(r.prefix)
                .and_modify(|v| v.source = Source::PolicyAndRuntime)
                .or_insert(AllowEntryView {
                    prefix: r.prefix,
                    source: Source::Runtime,
                    comment: r.comment.clone(),
                    owner: None,
                    expires: r.expires_unix.map(rfc3339),
                    max_syn_per_minute: None,
                    syn_burst: None,
                });
        }
        ListView {
            allow: allow.into_values().collect(),
            subscribers: self
                .policy
                .subscribers
                .iter()
                .map(|s| SubscriberView {
                    prefix: s.prefix,
                    mode: s.mode.map_or(Mode::DEFAULT, Mode::from).name().into(),
                    action: s
                        .action
                        .map_or(BlockAction::DEFAULT, BlockAction::from)
                        .name()
                        .into(),
                })
                .collect(),
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

    fn status(&self) -> Result<StatusView> {
        let config = self.tables.config()?;
        let interfaces = self.interface_views();
        Ok(StatusView {
            daemon: true,
            policy: self.opts.policy.display().to_string(),
            generation: config.generation,
            mode: config.mode.name().into(),
            fragments: config.fragments.name().into(),
            reloads_ok: self.reloads_ok,
            reloads_failed: self.reloads_failed,
            last_error: self.last_error.clone(),
            interfaces,
            subscribers: self.tables.subscribers()?.len(),
            allow: self.tables.allowlist()?.len(),
            runtime_allow: self.runtime.entries().len(),
            pins: self.opts.layout.dir().display().to_string(),
        })
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
