//! Fleet mode of p25d (`--etcd`): the policy comes from etcd instead of a file, is
//! followed live, and survives etcd's absence on a local snapshot. The rules (what is
//! read when, what is never deleted early, how compaction and dead connections are
//! handled) are in docs/fleet.md and `filter_user::fleet::follower`.
//!
//! A task of its own talks to etcd: it reads the fleet state in full, watches it, keeps
//! the router's registration alive and reconnects with backoff. It hands the state to the
//! daemon through [`Shared`] and a sequence number; the daemon composes it into a policy
//! and puts it in force through the same reload as a policy file (`Daemon::reload`), then
//! reports the revision it applied back for the registration and the snapshot.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result, bail};
use etcd_client::{Client, EventType, LeaseKeepAliveStream, LeaseKeeper, PutOptions, WatchOptions};
use filter_user::{
    fleet::{
        self, Backoff, Composer, Follower, Layout, Problem, Reason, State,
        etcd::{self, within},
        follower::{Change, Event, Kv, Step},
        keys::check_router_name,
        snapshot::{self, SNAPSHOT_FILE, Snapshot},
        values::RouterStatus,
        views::SourceView,
    },
    policy::Checked,
};
use tokio::sync::watch;
use tracing::{error, info, warn};

/// How long changes are collected before they are applied: a burst of puts (a script
/// allowing a hundred prefixes) becomes one reconcile, at a small cost in latency.
const DEBOUNCE: Duration = Duration::from_millis(10);
/// How long p25d waits for etcd at start before it starts from its snapshot.
const START_WAIT: Duration = Duration::from_secs(3);
/// The registration lease's time to live: a router that stops renewing it disappears
/// from `p25ctl fleet status` this long after.
pub const LEASE_TTL_SECS: i64 = 10;
/// How often the lease is renewed.
const LEASE_RENEW: Duration = Duration::from_secs(3);

/// Settings of fleet mode.
#[derive(Clone, Debug)]
pub struct FleetOptions {
    /// etcd endpoints.
    pub endpoints: Vec<String>,
    /// The key layout.
    pub layout: Layout,
    /// This router's name.
    pub router: String,
    /// Where the snapshot is kept.
    pub snapshot: PathBuf,
}

impl FleetOptions {
    /// From `--etcd`, `--etcd-prefix`, `--router` (default: the hostname) and `--state`
    /// (the snapshot goes beside it).
    pub fn new(etcd: &str, prefix: &str, router: Option<&str>, state: &Path) -> Result<Self> {
        let router = match router {
            Some(router) => router.to_owned(),
            None => hostname().context("--router is not given and the hostname is unknown")?,
        };
        check_router_name(&router)?;
        Ok(Self {
            endpoints: etcd::endpoints(etcd)?,
            layout: Layout::new(prefix)?,
            router,
            snapshot: state.parent().unwrap_or(Path::new(".")).join(SNAPSHOT_FILE),
        })
    }

    /// Where the policy comes from, for status and logs.
    fn location(&self) -> String {
        format!(
            "{} prefix {}",
            self.endpoints.join(","),
            self.layout.prefix()
        )
    }
}

/// The host's name (its UTS name, as `hostname` prints it).
fn hostname() -> Result<String> {
    let path = "/proc/sys/kernel/hostname";
    let name = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    Ok(name.trim().to_owned())
}

/// What the etcd task shares with the daemon.
#[derive(Debug, Default)]
struct Shared {
    /// The fleet state as last read or watched.
    state: State,
    /// Whether the state is followed live: connected, read in full, watched.
    up: bool,
    /// The last connection problem, cleared by a successful full read.
    last_error: Option<String>,
    /// Problems counted, by reason.
    errors: BTreeMap<Reason, u64>,
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    // The data stays consistent whatever panicked: every write is a plain assignment.
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

fn count(shared: &Mutex<Shared>, reason: Reason) {
    *lock(shared).errors.entry(reason).or_default() += 1;
}

/// What the daemon put in force, for the registration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Applied {
    revision: i64,
    applied_at: String,
    error: Option<String>,
}

/// The daemon's side of fleet mode: the policy source.
#[derive(Debug)]
pub struct Source {
    opts: FleetOptions,
    shared: Arc<Mutex<Shared>>,
    /// Bumped by the task whenever there is something to apply.
    notify: watch::Receiver<u64>,
    /// The sequence number last composed.
    seen: u64,
    /// When the pending change is due (the first notice plus [`DEBOUNCE`]).
    due: Option<tokio::time::Instant>,
    applied: watch::Sender<Applied>,
    composer: Composer,
    /// The snapshot of the last composition, saved once it is in force.
    pending: Option<Snapshot>,
    /// The revision in force.
    revision: i64,
    /// What is wrong with the state in force.
    problems: Vec<Problem>,
    fleet_allow: usize,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Source {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Source {
    /// Starts following etcd: the snapshot first (if any), then up to [`START_WAIT`] for
    /// etcd's full state. Returns the policy to start with: etcd's if it came in time and
    /// holds a usable document, else the snapshot's. Fails when neither is usable.
    pub async fn start(opts: FleetOptions) -> Result<(Self, Checked)> {
        let mut composer = Composer::new(opts.layout.clone(), &opts.router);
        let mut errors = BTreeMap::new();
        let mut initial = State::default();
        let mut from_snapshot = None;
        match Snapshot::load(&opts.snapshot, opts.layout.prefix()) {
            Ok(Some(snap)) => {
                let state = fleet::state_of(&snap);
                match composer.compose(&state, SystemTime::now()) {
                    Ok(composed) => {
                        info!(snapshot = %opts.snapshot.display(), revision = snap.revision, "fleet snapshot read");
                        from_snapshot = Some(composed.checked);
                        initial = state;
                    }
                    Err(problems) => {
                        warn!(snapshot = %opts.snapshot.display(), problems = %messages(&problems), "the fleet snapshot holds no usable policy; ignored")
                    }
                }
            }
            Ok(None) => {}
            Err(e) => {
                *errors.entry(Reason::Snapshot).or_default() += 1;
                match snapshot::set_aside(&opts.snapshot) {
                    Ok(aside) => {
                        error!(error = %e, kept = %aside.display(), "the fleet snapshot is unusable; ignored and kept aside")
                    }
                    Err(io) => {
                        error!(error = %e, rename_error = %io, "the fleet snapshot is unusable; ignored")
                    }
                }
            }
        }
        let shared = Arc::new(Mutex::new(Shared {
            state: initial.clone(),
            errors,
            ..Shared::default()
        }));
        let (notify_tx, mut notify) = watch::channel(0u64);
        let (applied, applied_rx) = watch::channel(Applied::default());
        let follower = Follower::with_state(opts.layout.clone(), &opts.router, initial);
        let task = tokio::spawn(follow(
            opts.clone(),
            shared.clone(),
            notify_tx,
            applied_rx,
            follower,
        ));
        let deadline = tokio::time::Instant::now() + START_WAIT;
        while !lock(&shared).up {
            if tokio::time::timeout_at(deadline, notify.changed())
                .await
                .is_err()
            {
                break;
            }
        }
        let seen = *notify.borrow_and_update();
        let (up, state, last_error) = {
            let s = lock(&shared);
            (s.up, s.state.clone(), s.last_error.clone())
        };
        let checked = if up {
            match composer.compose(&state, SystemTime::now()) {
                Ok(composed) => {
                    info!(revision = state.revision, endpoints = %opts.location(), "following the fleet policy in etcd");
                    composed.checked
                }
                Err(problems) => match from_snapshot {
                    Some(checked) => {
                        warn!(problems = %messages(&problems), "etcd holds no usable policy; starting from the snapshot");
                        checked
                    }
                    None => {
                        task.abort();
                        bail!(
                            "etcd ({}) holds no usable policy and there is no snapshot at {}: \
                             push one with `p25ctl fleet push FILE`\n{}",
                            opts.location(),
                            opts.snapshot.display(),
                            messages(&problems)
                        );
                    }
                },
            }
        } else {
            match from_snapshot {
                Some(checked) => {
                    warn!(error = last_error.as_deref().unwrap_or("no answer"), snapshot = %opts.snapshot.display(), "etcd is unreachable; filtering with the snapshot until it answers");
                    checked
                }
                None => {
                    task.abort();
                    bail!(
                        "etcd ({}) did not answer within {START_WAIT:?} ({}) and there is no usable \
                         snapshot at {}: there is no policy to filter with. Start etcd, or run \
                         with --policy FILE",
                        opts.location(),
                        last_error.as_deref().unwrap_or("no answer"),
                        opts.snapshot.display()
                    );
                }
            }
        };
        Ok((
            Self {
                opts,
                shared,
                notify,
                // Different from any sequence number: the first turn of the daemon's loop
                // composes again and reports the state in force (registration, snapshot).
                seen: seen.wrapping_sub(1),
                due: None,
                applied,
                composer,
                pending: None,
                revision: 0,
                problems: Vec::new(),
                fleet_allow: 0,
                task,
            },
            Checked {
                policy: checked.policy,
                warnings: checked.warnings,
            },
        ))
    }

    /// Resolves when there is fleet state to compose, [`DEBOUNCE`] after the first change
    /// noticed. Cancel-safe: what is pending stays pending, and due when it was, until
    /// [`Source::compose`] takes it (the daemon's loop drops this future whenever another
    /// event comes first).
    pub async fn changed(&mut self) {
        loop {
            let current = *self.notify.borrow();
            if current != self.seen {
                let due = *self
                    .due
                    .get_or_insert_with(|| tokio::time::Instant::now() + DEBOUNCE);
                tokio::time::sleep_until(due).await;
                return;
            }
            if self.notify.changed().await.is_err() {
                // The task ended (it only does when aborted): nothing more will come.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Composes the fleet state into the policy to put in force. A rejected document or
    /// value keeps what was in force and is counted once, logged and shown in status.
    pub fn compose(&mut self) -> Result<Checked, String> {
        self.seen = *self.notify.borrow_and_update();
        self.due = None;
        let state = lock(&self.shared).state.clone();
        let result = self.composer.compose(&state, SystemTime::now());
        let problems = match &result {
            Ok(composed) => composed.problems.clone(),
            Err(problems) => problems.clone(),
        };
        for problem in problems.iter().filter(|p| !self.problems.contains(p)) {
            count(&self.shared, problem.reason);
            error!(
                reason = problem.reason.label(),
                revision = state.revision,
                "{}",
                problem.message
            );
        }
        self.problems = problems;
        match result {
            Ok(composed) => {
                self.fleet_allow = composed.fleet_allow;
                self.pending = Some(composed.snapshot);
                Ok(composed.checked)
            }
            Err(problems) => Err(messages(&problems)),
        }
    }

    /// The composed state is in force: persist it and report it in the registration.
    pub fn applied(&mut self) {
        let Some(snapshot) = self.pending.take() else {
            return;
        };
        self.revision = snapshot.revision;
        if let Err(e) = snapshot.save(&self.opts.snapshot) {
            count(&self.shared, Reason::Snapshot);
            error!(error = %e, "writing the fleet snapshot failed; a restart while etcd is down would start from an older one");
        }
        self.report(None);
    }

    /// Putting the composed state in force failed (the maps): reported in the
    /// registration; the snapshot keeps the state that is in force.
    pub fn apply_failed(&mut self, message: &str) {
        self.pending = None;
        self.report(Some(message.to_owned()));
    }

    fn report(&mut self, failure: Option<String>) {
        let error = failure.or_else(|| self.problems.first().map(|p| p.message.clone()));
        self.applied.send_replace(Applied {
            revision: self.revision,
            applied_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            error,
        });
    }

    /// The policy source part of `p25ctl status`.
    pub fn view(&self) -> SourceView {
        let shared = lock(&self.shared);
        SourceView {
            kind: "etcd".into(),
            location: self.opts.location(),
            router: Some(self.opts.router.clone()),
            revision: self.revision,
            up: shared.up,
            fleet_allow: self.fleet_allow,
            last_error: shared.last_error.clone(),
            problems: self.problems.clone(),
        }
    }

    /// The name policy diagnostics use for the document.
    pub fn policy_name(&self) -> String {
        fleet::source_name(&self.opts.layout.policy())
    }

    /// The revision in force, whether etcd is followed live, and the errors by reason
    /// (for the metrics).
    pub fn metrics(&self) -> (i64, bool, BTreeMap<Reason, u64>) {
        let shared = lock(&self.shared);
        (self.revision, shared.up, shared.errors.clone())
    }
}

/// Problems as lines.
fn messages(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| p.message.as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

/// A jitter in [0, 1) for the backoff: a fleet that lost etcd together must not come
/// back in lockstep, and the sub-second clock differs enough between routers for that.
fn jitter() -> f64 {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    f64::from(nanos % 1_000_000) / 1_000_000.0
}

/// The etcd task: sessions (connect, read, watch), with backoff between them. Runs until
/// the daemon drops its [`Source`].
async fn follow(
    opts: FleetOptions,
    shared: Arc<Mutex<Shared>>,
    notify: watch::Sender<u64>,
    mut applied: watch::Receiver<Applied>,
    mut follower: Follower,
) {
    let mut backoff = Backoff::default();
    loop {
        let (reason, error) = session(
            &opts,
            &shared,
            &notify,
            &mut applied,
            &mut follower,
            &mut backoff,
        )
        .await;
        follower.on_event(Event::Down);
        let was_up = {
            let mut s = lock(&shared);
            let was_up = s.up;
            s.up = false;
            s.last_error = Some(format!("{error:#}"));
            *s.errors.entry(reason).or_default() += 1;
            was_up
        };
        let wait = backoff.next(jitter());
        if was_up {
            error!(error = %format!("{error:#}"), retry_in = ?wait, "lost etcd; the policy in force stays, reconnecting");
        } else {
            warn!(error = %format!("{error:#}"), retry_in = ?wait, "etcd unreachable; the policy in force stays, retrying");
        }
        tokio::time::sleep(wait).await;
    }
}

/// Hands a step of the follower to the daemon.
fn publish(shared: &Mutex<Shared>, notify: &watch::Sender<u64>, follower: &Follower, step: Step) {
    let became_up = {
        let mut s = lock(shared);
        match step {
            Step::Apply => s.state = follower.state().clone(),
            Step::Advance => s.state.revision = follower.state().revision,
            Step::Nothing | Step::ReadAll => {}
        }
        let became_up = follower.synced() && !s.up;
        s.up = follower.synced();
        if became_up {
            s.last_error = None;
        }
        became_up
    };
    if matches!(step, Step::Apply | Step::Advance) || became_up {
        notify.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// One connection to etcd: full read, registration, watch; again after a compaction.
/// Returns only on failure, with the reason to count.
async fn session(
    opts: &FleetOptions,
    shared: &Mutex<Shared>,
    notify: &watch::Sender<u64>,
    applied: &mut watch::Receiver<Applied>,
    follower: &mut Follower,
    backoff: &mut Backoff,
) -> (Reason, anyhow::Error) {
    let mut client = match etcd::connect(&opts.endpoints).await {
        Ok(client) => client,
        Err(e) => return (Reason::Connect, e.into()),
    };
    let mut lease: Option<Lease> = None;
    loop {
        let (revision, kvs) = match etcd::read_all(&mut client, &opts.layout).await {
            Ok(read) => read,
            Err(e) => return (Reason::Connect, e.into()),
        };
        let step = follower.on_event(Event::Full { revision, kvs });
        publish(shared, notify, follower, step);
        backoff.reset();
        info!(revision, "fleet state read from etcd");
        let now = applied.borrow_and_update().clone();
        if let Err(e) = register(&mut client, opts, &mut lease, &now).await {
            return (Reason::Register, e);
        }
        match watch(
            &mut client,
            opts,
            shared,
            notify,
            applied,
            follower,
            &mut lease,
        )
        .await
        {
            Ok(()) => {
                count(shared, Reason::Compacted);
                warn!(
                    revision = follower.state().revision,
                    "the watch fell behind a compaction; reading the fleet state again"
                );
            }
            Err(e) => return e,
        }
    }
}

/// The registration lease and its keepalive stream.
struct Lease {
    id: i64,
    keeper: LeaseKeeper,
    stream: LeaseKeepAliveStream,
}

/// Puts this router's status under its lease (granting one first if needed). Not before
/// the daemon has put a state in force: a p25d that then fails to start (say, because
/// another one holds the pin root) must not overwrite the running router's registration.
async fn register(
    client: &mut Client,
    opts: &FleetOptions,
    lease: &mut Option<Lease>,
    applied: &Applied,
) -> Result<()> {
    if applied.applied_at.is_empty() {
        return Ok(());
    }
    if lease.is_none() {
        let granted = within(
            "granting the registration lease",
            client.lease_grant(LEASE_TTL_SECS, None),
        )
        .await?;
        let (keeper, stream) = within(
            "keeping the registration lease alive",
            client.lease_keep_alive(granted.id()),
        )
        .await?;
        *lease = Some(Lease {
            id: granted.id(),
            keeper,
            stream,
        });
    }
    let id = lease.as_ref().map_or(0, |l| l.id);
    let status = RouterStatus {
        router: opts.router.clone(),
        revision: applied.revision,
        applied_at: applied.applied_at.clone(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        source_up: true,
        error: applied.error.clone(),
    };
    let value = serde_json::to_vec(&status)?;
    within(
        "registering the router",
        client.put(
            opts.layout.status(&opts.router),
            value,
            Some(PutOptions::new().with_lease(id)),
        ),
    )
    .await?;
    Ok(())
}

/// Renews the lease once; a lease etcd no longer knows (expired while we were away) is
/// dropped so that [`register`] grants a new one.
async fn renew(lease: &mut Option<Lease>) -> Result<()> {
    let Some(l) = lease.as_mut() else {
        return Ok(());
    };
    l.keeper
        .keep_alive()
        .await
        .context("renewing the registration lease")?;
    let answer = within("renewing the registration lease", l.stream.message()).await?;
    match answer {
        Some(response) if response.ttl() > 0 => Ok(()),
        Some(_) => {
            warn!(
                lease = l.id,
                "the registration lease expired; registering again"
            );
            *lease = None;
            Ok(())
        }
        None => bail!("etcd closed the lease keepalive stream"),
    }
}

/// Watches the fleet's keys from after the last full read. Returns `Ok` when a
/// compaction requires a new full read, `Err` when the connection is unusable.
async fn watch(
    client: &mut Client,
    opts: &FleetOptions,
    shared: &Mutex<Shared>,
    notify: &watch::Sender<u64>,
    applied: &mut watch::Receiver<Applied>,
    follower: &mut Follower,
    lease: &mut Option<Lease>,
) -> Result<(), (Reason, anyhow::Error)> {
    let connect = |e: anyhow::Error| (Reason::Connect, e);
    let from = follower.watch_from();
    let (start, end) = opts.layout.watched_range();
    let mut stream = within(
        "watching the fleet state",
        client.watch(
            start,
            Some(
                WatchOptions::new()
                    .with_range(end)
                    .with_start_revision(from),
            ),
        ),
    )
    .await
    .map_err(|e| connect(e.into()))?;
    stream
        .watch(
            opts.layout.interfaces(&opts.router),
            Some(WatchOptions::new().with_start_revision(from)),
        )
        .await
        .map_err(|e| connect(e.into()))?;
    let mut renew_tick = tokio::time::interval(LEASE_RENEW);
    renew_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    renew_tick.tick().await;
    loop {
        tokio::select! {
            message = stream.message() => {
                let response = match message {
                    Ok(Some(response)) => response,
                    Ok(None) => return Err(connect(anyhow::anyhow!("etcd closed the watch stream"))),
                    Err(e) => return Err(connect(anyhow::Error::from(e).context("watching the fleet state"))),
                };
                if response.canceled() {
                    if response.compact_revision() > 0 {
                        follower.on_event(Event::Compacted {
                            compact_revision: response.compact_revision(),
                        });
                        return Ok(());
                    }
                    return Err(connect(anyhow::anyhow!(
                        "etcd cancelled the watch: {}",
                        response.cancel_reason()
                    )));
                }
                let changes: Vec<Change> = response
                    .events()
                    .iter()
                    .filter_map(|event| {
                        let kv = event.kv()?;
                        Some(match event.event_type() {
                            EventType::Put => Change::Put(Kv {
                                key: kv.key().to_vec(),
                                value: kv.value().to_vec(),
                                mod_revision: kv.mod_revision(),
                            }),
                            EventType::Delete => Change::Delete {
                                key: kv.key().to_vec(),
                                mod_revision: kv.mod_revision(),
                            },
                        })
                    })
                    .collect();
                if !changes.is_empty() {
                    let step = follower.on_event(Event::Changes(changes));
                    publish(shared, notify, follower, step);
                }
            }
            _ = renew_tick.tick() => {
                renew(lease).await.map_err(|e| (Reason::Register, e))?;
                if lease.is_none() {
                    let now = applied.borrow().clone();
                    register(client, opts, lease, &now).await.map_err(|e| (Reason::Register, e))?;
                }
            }
            changed = applied.changed() => {
                if changed.is_err() {
                    // The daemon is gone; park until the task is aborted.
                    std::future::pending::<()>().await;
                }
                let now = applied.borrow_and_update().clone();
                register(client, opts, lease, &now).await.map_err(|e| (Reason::Register, e))?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_checked_and_the_snapshot_goes_beside_the_state() -> Result<()> {
        let opts = FleetOptions::new(
            "http://127.0.0.1:2379,127.0.0.2:2379",
            "/fleet/",
            Some("edge-1"),
            Path::new("/var/lib/p25/runtime-allow.json"),
        )?;
        assert_eq!(opts.endpoints.len(), 2);
        assert_eq!(opts.layout.prefix(), "/fleet");
        assert_eq!(opts.snapshot, Path::new("/var/lib/p25/fleet-snapshot.json"));
        // The hostname is the default name, and it is a valid one here.
        let opts = FleetOptions::new("127.0.0.1:2379", "/p25", None, Path::new("s.json"))?;
        assert_eq!(opts.router, hostname()?);
        for (etcd, prefix, router) in [
            ("", "/p25", "r1"),
            ("127.0.0.1:2379", "p25", "r1"),
            ("127.0.0.1:2379", "/p25", "r/1"),
        ] {
            assert!(
                FleetOptions::new(etcd, prefix, Some(router), Path::new("s.json")).is_err(),
                "{etcd:?} {prefix:?} {router:?}"
            );
        }
        Ok(())
    }

    #[test]
    fn jitter_stays_in_range() {
        for _ in 0..100 {
            let j = jitter();
            assert!((0.0..1.0).contains(&j), "{j}");
        }
    }
}
