//! The daemon's event loop. One task owns the dataplane and all state; control
//! connections, signals and timers send it work, so every map change is serialized.
//!
//! [`Daemon`] only composes the parts that own their state: the policy source, the maps
//! with the state in force ([`Maps`]), the interfaces, the offender watch and the event
//! log's counters.

use std::{fs, sync::Arc};

use anyhow::{Context as _, Result};
use filter_user::{
    Dataplane, KernelTables,
    control::{
        ReloadView, StatsView, StatusView,
        handler::{self, Host, Parts},
    },
    desired,
    loader::{PinLayout, ensure_bpffs},
    offenders::OffenderView,
    policy::Policy,
    runtime::RuntimeStore,
};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::{info, warn};

use crate::{
    MetricsListen, RunArgs,
    alerts::{self, OffenderWatch},
    events::{self, EventSink},
    http::{self, MetricsJob},
    interfaces::Interfaces,
    reload::{self, Maps},
    snapshot,
    socket::{self, Job},
    source::{PolicyFile, PolicySource},
    startup::{self, LockFor, lock_pin_root},
};

/// The running daemon: the parts the loop composes.
pub struct Daemon {
    pub(crate) opts: RunArgs,
    pub(crate) layout: PinLayout,
    /// Where the policy comes from: the one place that reads it.
    pub(crate) source: Box<dyn PolicySource>,
    pub(crate) maps: Maps,
    pub(crate) interfaces: Interfaces,
    pub(crate) offenders: OffenderWatch,
    pub(crate) event_counts: Arc<events::EventCounts>,
}

/// How the first policy arrives: the file's check runs on a thread beside the BPF load;
/// the fleet source has its state already.
enum Start {
    Checking(
        std::thread::JoinHandle<(
            PolicyFile,
            Result<filter_user::policy::Checked, String>,
            std::time::Duration,
        )>,
    ),
    Ready(Box<(crate::fleet::Source, filter_user::policy::Checked)>),
}

/// The daemon's own settings that go into CONFIG (with the policy's).
fn settings(opts: &RunArgs, cpus: u32) -> desired::Settings {
    let (events_rate, events_burst) = if opts.events == EventSink::Off {
        (0, 0)
    } else {
        (opts.events_rate, opts.events_burst)
    };
    desired::Settings {
        offender_v6_prefix: opts.offender_v6_prefix,
        events_rate,
        events_burst,
        cpus,
    }
}

/// Runs p25d until SIGTERM or SIGINT. `fleet`: follow the fleet policy in etcd (`--etcd`)
/// instead of the policy file.
pub async fn run(opts: RunArgs, fleet: Option<crate::fleet::FleetOptions>) -> Result<()> {
    if ensure_bpffs().context("mounting bpffs")? {
        info!("mounted bpffs at /sys/fs/bpf");
    }
    filter_user::sys::tune_allocator();
    let started = std::time::Instant::now();
    // The file is checked on a thread of its own while the BPF object is loaded and
    // verified: at 1.1M entries each is a few tenths of a second of CPU, and a router
    // has a second core for the one while the other runs. The fleet source starts from
    // etcd, or from its snapshot while etcd is down, before anything is loaded.
    let start = match fleet {
        Some(fleet) => Start::Ready(Box::new(crate::fleet::Source::start(fleet).await?)),
        None => {
            let mut file = PolicyFile::new(opts.policy.clone());
            Start::Checking(
                std::thread::Builder::new()
                    .name("p25d-check".into())
                    .spawn(move || {
                        let checked = file.load(&Policy::empty());
                        (file, checked, started.elapsed())
                    })
                    .context("starting the policy check")?,
            )
        }
    };
    let runtime = RuntimeStore::open(&opts.state).context("opening the runtime state")?;
    // The event log first: an unusable --events path must stop p25d before it creates or
    // touches anything under the pin root.
    let event_output = events::open_sink(&opts.events)?;
    let layout = opts.layout();
    let _pin_lock = lock_pin_root(layout.root(), LockFor::Run)?;
    let _socket_lock = startup::lock_socket(&opts.socket, opts.socket_group.as_deref())?;

    let adopting = layout.dir().exists();
    startup::refuse_newer_versions(&layout)?;
    let mut dataplane = Dataplane::open_pinned_maps(&layout).context("loading the dataplane")?;
    let tables = dataplane.take_tables()?;
    let events = dataplane.take_events()?;
    // The verifier (about 0.45 s for all four programs) runs on a thread of its own while
    // the policy is checked and the maps are filled: the programs' map references were
    // resolved when the object was loaded, so the maps can be written meanwhile. Once the
    // policy is known it verifies only what the policy attaches (see ProgramsWanted).
    // Nothing attaches before both are done, so no link ever sees a half-filled map.
    let wanted = Arc::new(startup::ProgramsWanted::all());
    let verifying = {
        let wanted = wanted.clone();
        std::thread::Builder::new()
            .name("p25d-verify".into())
            .spawn(move || {
                let result = dataplane
                    .load_programs_wanted(|hook, role| wanted.wants(hook, role))
                    .map(|()| dataplane);
                (result, started.elapsed())
            })
            .context("starting the program load")?
    };
    let (mut source, checked, check_time): (Box<dyn PolicySource>, _, _) = match start {
        Start::Ready(ready) => {
            let (source, checked) = *ready;
            (Box::new(source), Ok(checked), started.elapsed())
        }
        Start::Checking(check) => {
            let (file, checked, time) = check.join().map_err(|_| {
                anyhow::anyhow!("the policy check stopped without an answer (a bug)")
            })?;
            (Box::new(file), checked, time)
        }
    };
    let checked = match checked {
        Ok(checked) => checked,
        Err(e) => {
            // Nothing is attached yet; what this start pinned afresh goes again, and the
            // pin root too if that leaves it empty (as `p25d detach` leaves it), so that
            // a bad policy leaves nothing behind, as before the check moved beside the load.
            wanted.settle(None);
            drop(tables);
            drop(events);
            drop(verifying.join());
            if !adopting {
                let _ = startup::remove_version_dir(&layout.dir());
                let _ = fs::remove_dir(layout.root());
            }
            return Err(anyhow::Error::msg(e))
                .with_context(|| format!("the policy {} is not usable", source.name()));
        }
    };
    wanted.settle(Some(&checked.policy));
    for warning in &checked.warnings {
        warn!(%warning, "policy warning");
    }
    let generation = tables.config()?.generation;
    // Possible CPUs: the event rate limit is per CPU, so the total is split over them.
    let cpus = aya::util::nr_cpus()
        .map(|n| u32::try_from(n).unwrap_or(u32::MAX).max(1))
        .unwrap_or(1);
    let mut maps = Maps::new(tables, runtime, settings(&opts, cpus), generation);
    let report = maps.put_in_force(checked.policy)?;
    let fill_time = started.elapsed();
    let (loaded, load_time) = verifying
        .join()
        .map_err(|_| anyhow::anyhow!("the program load stopped without an answer (a bug)"))?;
    let mut dataplane = loaded.context("loading the dataplane")?;
    info!(
        pins = %layout.dir().display(),
        adopting,
        generation,
        check_ms = check_time.as_millis(),
        filled_ms = fill_time.as_millis(),
        verified_ms = load_time.as_millis(),
        "dataplane loaded"
    );
    // Links attach, or move over from older ABI versions, only onto the filled maps.
    maps.migrate(&layout, &mut dataplane)?;
    let mut interfaces = Interfaces::new(dataplane, layout.clone());
    interfaces.sync(maps.policy());
    reload::log_in_force(&maps, &report, "start");
    source.applied(Ok(()));
    let mut daemon = Daemon {
        offenders: OffenderWatch::new(opts.alert_threshold, opts.alert_window),
        event_counts: Arc::new(events::EventCounts::default()),
        opts,
        layout,
        source,
        maps,
        interfaces,
    };

    let opts = &daemon.opts;
    let listener = startup::bind_socket(&opts.socket, opts.socket_group.as_deref())?;
    let (jobs_tx, mut jobs) = mpsc::channel::<Job>(64);
    let admin_gid = filter_user::sys::group_id(&opts.admin_group).ok().flatten();
    if admin_gid.is_none() {
        warn!(group = %opts.admin_group, "the admin group does not exist: only root may change the filter (allow, deny, reload)");
    }
    tokio::spawn(socket::accept_loop(listener, jobs_tx, admin_gid));
    let (metrics_tx, mut metrics_jobs) = mpsc::channel::<MetricsJob>(16);
    if let MetricsListen::At(addr) = opts.metrics_listen {
        http::serve_metrics(addr, metrics_tx).await?;
    }
    if let Some(out) = event_output {
        tokio::spawn(events::drain_events(
            events,
            out,
            daemon.event_counts.clone(),
        ));
    }

    let mut hup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut poll = tokio::time::interval(opts.poll);
    // The first resync one period from now, not at once (an interval's first tick is
    // immediate): the start-up `apply` has just read the maps back, and a second
    // read-back of a million entries right after "ready" cost a second of CPU and
    // tens of MiB while the first requests waited.
    let mut resync =
        tokio::time::interval_at(tokio::time::Instant::now() + opts.resync, opts.resync);
    let mut scan = tokio::time::interval(opts.offender_scan);
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
        daemon.maps.generation(),
        opts.socket.display()
    )) {
        warn!(error = %e, "telling the service manager p25d is ready failed");
    }
    info!(socket = %opts.socket.display(), "ready");
    loop {
        // Expiry acts on time: sleep until the next entry expires (at most an hour at a
        // time, so that a clock step is noticed), not until the next resync.
        let expiry = daemon.maps.next_expiry_in();
        tokio::select! {
            () = tokio::time::sleep(expiry) => { daemon.maps.expire_due(); }
            Some((line, peer, reply)) = jobs.recv() => {
                let answer = handler::handle(&mut daemon, &peer, &line);
                let _ = reply.send(answer);
            }
            _ = hup.recv() => { let _ = daemon.reload("SIGHUP"); }
            () = daemon.source.notified() => { let _ = daemon.reload("policy source changed"); }
            () = async {
                match &links {
                    Some(watch) => watch.changed().await,
                    None => std::future::pending().await,
                }
            } => {
                daemon.interfaces.check();
            }
            _ = poll.tick() => {
                if daemon.source.changed(daemon.maps.policy()) {
                    let _ = daemon.reload("policy file changed");
                }
                daemon.interfaces.check();
            }
            _ = resync.tick() => { daemon.maps.resync(); }
            _ = scan.tick() => { daemon.offenders.scan(&daemon.maps.tables); }
            Some(reply) = metrics_jobs.recv() => {
                let _ = reply.send(snapshot::render(&daemon));
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
    /// Re-reads the policy from its source and puts it in force (see [`reload::reload`]).
    fn reload(&mut self, reason: &str) -> Result<ReloadView, String> {
        reload::reload(
            self.source.as_mut(),
            &mut self.maps,
            &mut self.interfaces,
            reason,
        )
    }

    fn status(&self) -> Result<StatusView> {
        let config = self.maps.tables.config()?;
        let health = &self.maps.health;
        Ok(StatusView {
            daemon: true,
            policy: self.source.name().to_owned(),
            generation: config.generation,
            mode: config.mode.name().into(),
            fragments: config.fragments.name().into(),
            reloads_ok: health.reloads_ok,
            reloads_failed: health.reloads_failed,
            last_error: health.last_error.clone(),
            interfaces: self.interfaces.views(),
            subscribers: self.maps.counts().subscribers,
            allow: self.maps.allow_in_maps(),
            runtime_allow: self.maps.runtime.entries().len(),
            pins: self.layout.dir().display().to_string(),
            source: Some(self.source.view()),
        })
    }
}

/// The control handler's view of the daemon (see `filter_user::control::handler`).
impl Host for Daemon {
    type Tables = KernelTables;

    fn parts(&mut self) -> Parts<'_, KernelTables> {
        self.maps.parts(
            self.source.name(),
            &self.opts.admin_group,
            self.opts.max_runtime_entries,
        )
    }

    fn status(&self) -> Result<StatusView, String> {
        Daemon::status(self).map_err(|e| format!("{e:#}"))
    }

    fn stats(&self) -> Result<StatsView, String> {
        self.maps
            .tables
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
        alerts::views(&self.maps.tables, since_secs, limit).map_err(|e| e.to_string())
    }
}
