//! The daemon's event loop. One task owns the dataplane and all state; control
//! connections, signals and timers send it work, so every map change is serialized.

use std::{
    collections::BTreeMap,
    fs,
    os::unix::fs::MetadataExt as _,
    path::Path,
    sync::{Arc, atomic::Ordering},
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result};
use filter_user::{
    Dataplane, KernelTables,
    control::{
        ReloadView, StatsView, StatusView,
        handler::{self, Host, Parts},
    },
    desired::{self, Counts, Desired},
    loader::{PinLayout, ensure_bpffs},
    metrics,
    offenders::{self, AlertTracker, OffenderView, monotonic_ns},
    policy::{self, Policy},
    runtime::{RuntimeStore, unix},
    sync::{self, SyncReport},
};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::{error, info, warn};

use crate::{
    MetricsListen, RunArgs,
    interfaces::Interfaces,
    observe::{self, EventSink, MetricsJob},
    socket::{self, Job},
    startup::{self, LockFor, lock_pin_root},
};

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

struct Daemon {
    opts: RunArgs,
    /// The pinned state under `--pin-root`.
    layout: PinLayout,
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

    interfaces: Interfaces,
    /// Unix time of the last successful reconcile (for the staleness alert).
    last_sync_unix: f64,
    alerts: AlertTracker,
    offender_alerts: u64,
    offenders_tracked: usize,
    event_counts: Arc<observe::EventCounts>,
    /// Possible CPUs: the event rate limit is per CPU, so the total is split over them.
    cpus: u32,
}

pub async fn run(opts: RunArgs) -> Result<()> {
    if ensure_bpffs().context("mounting bpffs")? {
        info!("mounted bpffs at /sys/fs/bpf");
    }
    tune_allocator();
    let checked = policy::load(&opts.policy)
        .with_context(|| format!("the policy {} is not usable", opts.policy.display()))?;
    for warning in &checked.warnings {
        warn!(%warning, "policy warning");
    }
    let seen = stamps(&opts.policy, &checked.policy);
    let runtime = RuntimeStore::open(&opts.state).context("opening the runtime state")?;
    // The event log first: an unusable --events path must stop p25d before it creates or
    // touches anything under the pin root.
    let event_output = observe::open_sink(&opts.events)?;
    let layout = opts.layout();
    let _pin_lock = lock_pin_root(layout.root(), LockFor::Run)?;
    let _socket_lock = startup::lock_socket(&opts.socket, opts.socket_group.as_deref())?;

    let adopting = layout.dir().exists();
    startup::refuse_newer_versions(&layout)?;
    let mut dataplane = Dataplane::open_pinned(&layout).context("loading the dataplane")?;
    let tables = dataplane.take_tables()?;
    let events = dataplane.take_events()?;
    let generation = tables.config()?.generation;
    let cpus = aya::util::nr_cpus()
        .map(|n| u32::try_from(n).unwrap_or(u32::MAX).max(1))
        .unwrap_or(1);
    info!(pins = %layout.dir().display(), adopting, generation, "dataplane loaded");

    let alerts = AlertTracker::new(opts.alert_threshold, opts.alert_window);
    let mut daemon = Daemon {
        alerts,
        offender_alerts: 0,
        offenders_tracked: 0,
        event_counts: Arc::new(observe::EventCounts::default()),
        last_sync_unix: 0.0,
        cpus,
        opts,
        interfaces: Interfaces::new(dataplane, layout.clone()),
        layout,
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
    };
    {
        let config = desired::config(
            &checked.policy,
            &daemon.settings(),
            daemon.generation.wrapping_add(1),
        );
        let target = Desired::new(
            config,
            &checked.policy,
            daemon.runtime.entries(),
            SystemTime::now(),
        );
        startup::migrate_older_versions(
            &daemon.layout,
            daemon.interfaces.dataplane(),
            &mut daemon.tables,
            &checked.policy,
            &target,
        )?;
    }
    daemon.apply(checked.policy, "start")?;

    let listener = startup::bind_socket(&daemon.opts.socket, daemon.opts.socket_group.as_deref())?;
    let (jobs_tx, mut jobs) = mpsc::channel::<Job>(64);
    let admin_gid = startup::group_id(&daemon.opts.admin_group);
    if admin_gid.is_none() {
        warn!(group = %daemon.opts.admin_group, "the admin group does not exist: only root may change the filter (allow, deny, reload)");
    }
    tokio::spawn(socket::accept_loop(listener, jobs_tx, admin_gid));
    let (metrics_tx, mut metrics_jobs) = mpsc::channel::<MetricsJob>(16);
    if let MetricsListen::At(addr) = daemon.opts.metrics_listen {
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
                match &links {
                    Some(watch) => watch.changed().await,
                    None => std::future::pending().await,
                }
            } => {
                daemon.interfaces.check();
            }
            _ = poll.tick() => {
                if stamps(&daemon.opts.policy, &daemon.policy) != daemon.seen {
                    let _ = daemon.reload("policy file changed");
                }
                daemon.interfaces.check();
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
        self.interfaces.sync(&policy);
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

    /// Re-reads the policy file. A bad file is rejected and counted; the old policy stays.
    fn reload(&mut self, reason: &str) -> Result<ReloadView, String> {
        // Stamped before reading, so that an edit during the read is seen next time. A
        // rejected file keeps the list files of the policy in force watched.
        self.seen = stamps(&self.opts.policy, &self.policy);
        let checked = match policy::load(&self.opts.policy) {
            Ok(checked) => checked,
            Err(e) => {
                self.reloads_failed += 1;
                let message = e.to_string();
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
        match self.apply(checked.policy, reason) {
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
        let slot_names = self.interfaces.slot_names();
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
                .interfaces
                .views()
                .into_iter()
                .map(|v| (v.name, v.hook, v.attached))
                .collect(),
            top_offenders,
        })
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
        let interfaces = self.interfaces.views();
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
            // From the counts of the state in force, not by walking a million map entries
            // per call; drift behind p25d's back is repaired by the resync.
            subscribers: self.counts.subscribers,
            allow: (self.counts.allow_policy + self.allow_runtime_count())
                .saturating_sub(self.allow_not_inserted),
            runtime_allow: self.runtime.entries().len(),
            pins: self.layout.dir().display().to_string(),
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
