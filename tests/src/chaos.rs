//! The reliability suite (`cargo xtask chaos`): faults injected into a running p25d under
//! a continuous, bounded SYN stream, counted at the receiver.
//!
//! Every phase builds its own lab ([`Topology`], [`DaemonLab`]), so that one fault's debris
//! cannot explain another's figures, and so that the lab's listeners (which live at most
//! [`crate::lab::LISTENER_LIFETIME`]) outlive the phase. In each phase a sender thread
//! sends, every [`Plan::interval`], three crafted SYNs from the subscriber namespace:
//!
//! - allowlisted source ([`SUB4_ALLOWED`]) to port 25: must all arrive ("lost" otherwise);
//! - plain subscriber ([`SUB4`]) to port 587: must all arrive;
//! - plain subscriber ([`SUB4`]) to port 25: must never arrive ("leaked" otherwise).
//!
//! The server namespace counts them with nftables ([`SynCounters`]), read once the stream
//! has stopped and the counters have settled. Probing connections (for recovery times)
//! come from a separate allowlisted address, [`PROBE4`], that the counters ignore.
//!
//! A link that is down or absent cannot carry packets at all, so while the subscriber
//! link is down or deleted the stream is paused (the sender acknowledges, so nothing is
//! half sent) and resumed only when the link is back: for a recreated interface, only once
//! p25d reports it attached again. The time a recreated interface spends unfiltered is
//! reported as its own figure (`unfiltered window`) instead of being hidden in the counts.

use std::{
    collections::BTreeSet,
    fs,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, ensure};
use filter_common::abi::Origin;
use filter_user::{KernelTables, loader::PinLayout};
use ipnet::IpNet;
use serde::Serialize;

use crate::{
    daemon::{DaemonLab, bin},
    lab::{
        GW_OUTSIDER4, GW_OUTSIDER6, GW_SUB4, GW_SUB6, OUTSIDER4, OUTSIDER6, SERVER4, SMTP, SUB4,
        SUB4_ALLOWED, SUB6, SUB6_ALLOWED, SUBMISSION, Topology,
    },
    netns::{Netns, veth, wait_until},
    traffic::{SynCounters, SynSender},
};

/// A second allowlisted subscriber address, for probing connections: its SYNs are not
/// counted, so probes never disturb the stream's figures.
pub const PROBE4: Ipv4Addr = Ipv4Addr::new(100, 64, 1, 4);

/// The policy of every phase: the lab's subscriber space, [`SUB4_ALLOWED`] and [`PROBE4`]
/// allowlisted, and a `MARKER` entry that tells valid policies apart (see
/// [`valid_policy`]).
const POLICY: &str = crate::lab_policy!(
    "defaults:\n  mode: enforce\n  fragments: pass\n",
    crate::lab_allow_business!(),
    "  - prefix: 100.64.1.4/32
    comment: chaos probe
  - prefix: MARKER/32
    comment: which valid policy is in force
",
);

/// Policies that p25d must reject; each breaks a different layer (YAML syntax, schema,
/// semantics, encoding, emptiness). Reload `i` of the invalid ones uses `INVALID[i % len]`.
const INVALID: &[(&str, &str)] = &[
    (
        "bad prefix length",
        "version: 1\nsubscribers:\n  - prefix: 100.64.1.0/33\n",
    ),
    (
        "YAML syntax",
        "version: 1\nsubscribers: [\n  - prefix: 100.64.1.0/24\n",
    ),
    (
        "unknown key",
        "version: 1\nsubscribrs:\n  - prefix: 100.64.1.0/24\n",
    ),
    (
        "host bits set",
        "version: 1\nsubscribers:\n  - prefix: 100.64.1.1/24\n",
    ),
    ("empty file", ""),
    ("wrong version", "version: 99\n"),
    (
        "unknown interface role",
        "version: 1\ninterfaces:\n  - name: r-sub\n    role: sideways\n",
    ),
    ("truncated", "version: 1\nallow:\n  - prefix: 100.64.1."),
];

/// A connect that must succeed gets this long per attempt.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// Upper bound on any single recovery (after that the fault counts as failed).
const RECOVERY_LIMIT: Duration = Duration::from_secs(20);
/// Upper bound on one phase's stream, whatever happens (the listeners live 120 s).
const STREAM_LIMIT: Duration = Duration::from_secs(100);
/// How long p25d stays dead after each `kill -9`: filtering must go on meanwhile.
const DEAD_TIME: Duration = Duration::from_millis(300);

/// How much of each fault to inject.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    /// Policy reloads, alternating valid (even) and invalid (odd).
    pub reloads: usize,
    /// `kill -9` and restart cycles of p25d.
    pub kills: usize,
    /// Flaps of the subscriber-facing interface; each is a down/up and a delete/recreate.
    pub flaps: usize,
    /// Concurrent p25ctl clients.
    pub clients: usize,
    /// allow/deny commands per client.
    pub ops_per_client: usize,
    /// Pause between two rounds of the SYN stream (three SYNs per round).
    #[serde(rename = "interval_ms", serialize_with = "as_ms")]
    pub interval: Duration,
}

impl Plan {
    /// The full run of issue 7: 100 reloads, 20 kills, 5 flaps, 4 clients.
    pub fn full() -> Self {
        Self {
            reloads: 100,
            kills: 20,
            flaps: 5,
            clients: 4,
            ops_per_client: 50,
            interval: Duration::from_millis(4),
        }
    }

    /// A reduced run for `cargo test`: every fault, fewer times.
    pub fn reduced() -> Self {
        Self {
            reloads: 10,
            kills: 3,
            flaps: 1,
            clients: 4,
            ops_per_client: 10,
            interval: Duration::from_millis(4),
        }
    }
}

/// Sent and received SYNs of one class.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Tally {
    /// SYNs the sender handed to the kernel.
    pub sent: u64,
    /// SYNs the receiver counted.
    pub received: u64,
}

/// Invalid reloads after which the previous policy was verifiably in force, of all.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Kept {
    /// Reloads that left the previous policy in force.
    pub kept: usize,
    /// Invalid reloads in all.
    pub of: usize,
}

/// The figures of one fault.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FaultReport {
    /// Which fault.
    pub fault: String,
    /// How many times it was injected.
    pub iterations: usize,
    /// Allowlisted source to 25 (must all arrive).
    pub allowed_25: Tally,
    /// Subscriber to 587 (must all arrive).
    pub sub_587: Tally,
    /// Subscriber to 25 (must never arrive).
    pub blocked_25: Tally,
    /// Invalid reloads after which the previous policy was verifiably in force, of all
    /// invalid reloads (reload phase only).
    pub old_policy_kept: Option<Kept>,
    /// Recovery time after each injection, in milliseconds.
    pub recovery_ms: Vec<f64>,
    /// Time from each injection to p25d answering `p25ctl status` again (restarts only), in
    /// milliseconds.
    pub ready_ms: Vec<f64>,
    /// Time the stream was paused (link down or absent), in milliseconds.
    pub paused_ms: f64,
    /// For recreated interfaces: time from the new interface's creation to p25d reporting
    /// it attached, in milliseconds. Unfiltered meanwhile.
    pub unfiltered_ms: Vec<f64>,
    /// Other facts worth printing.
    pub notes: Vec<String>,
    /// Broken invariants; empty when the fault passed.
    pub failures: Vec<String>,
}

impl FaultReport {
    fn new(fault: &str, iterations: usize) -> Self {
        Self {
            fault: fault.to_owned(),
            iterations,
            ..Self::default()
        }
    }

    /// Lost allowlisted-to-25 SYNs plus lost 587 SYNs.
    pub fn lost(&self) -> u64 {
        self.allowed_25
            .sent
            .saturating_sub(self.allowed_25.received)
            + self.sub_587.sent.saturating_sub(self.sub_587.received)
    }

    /// Blocked SYNs that arrived.
    pub fn leaked(&self) -> u64 {
        self.blocked_25.received
    }

    /// Whether every invariant held.
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }

    fn fail(&mut self, failure: String) {
        self.failures.push(failure);
    }

    /// Checks the stream invariants: nothing lost, nothing leaked, and no class received
    /// more than was sent (which would mean the counting is wrong).
    fn check_stream(&mut self) {
        if self.leaked() > 0 {
            self.fail(format!("{} blocked SYNs leaked", self.leaked()));
        }
        if self.lost() > 0 {
            self.fail(format!(
                "{} allowlisted/587 SYNs lost (allowlisted {}/{}, 587 {}/{})",
                self.lost(),
                self.allowed_25.received,
                self.allowed_25.sent,
                self.sub_587.received,
                self.sub_587.sent
            ));
        }
        for (name, tally) in [("allowlisted", self.allowed_25), ("587", self.sub_587)] {
            if tally.received > tally.sent {
                self.fail(format!(
                    "{name}: {} received but {} sent: the counting is off",
                    tally.received, tally.sent
                ));
            }
        }
        if self.allowed_25.sent == 0 {
            self.fail("the stream sent nothing".to_owned());
        }
    }

    /// The fault's figures as `p25-chaos --out` writes them.
    fn record(&self) -> FaultRecord<'_> {
        FaultRecord {
            report: self,
            lost: self.lost(),
            leaked: self.leaked(),
            recovery_ms_max: max(&self.recovery_ms),
            recovery_ms_median: median(&self.recovery_ms),
            passed: self.passed(),
        }
    }
}

/// One fault in the JSON: the report's fields, then the figures derived from them.
#[derive(Debug, Serialize)]
pub struct FaultRecord<'a> {
    #[serde(flatten)]
    report: &'a FaultReport,
    lost: u64,
    leaked: u64,
    recovery_ms_max: f64,
    recovery_ms_median: f64,
    passed: bool,
}

/// The whole run as `p25-chaos --out` writes it.
#[derive(Debug, Serialize)]
pub struct RunRecord<'a> {
    plan: &'a Plan,
    seconds: f64,
    passed: bool,
    faults: Vec<FaultRecord<'a>>,
}

/// The whole run.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// One entry per fault, in the order run.
    pub faults: Vec<FaultReport>,
    /// Wall time of the run, in seconds.
    pub seconds: f64,
}

impl Report {
    /// Whether every fault passed.
    pub fn passed(&self) -> bool {
        self.faults.iter().all(FaultReport::passed)
    }

    /// The report as `p25-chaos --out` writes it (serialize it with serde_json).
    pub fn record<'a>(&'a self, plan: &'a Plan) -> RunRecord<'a> {
        RunRecord {
            plan,
            seconds: self.seconds,
            passed: self.passed(),
            faults: self.faults.iter().map(FaultReport::record).collect(),
        }
    }

    /// A table of the figures, one row per fault, then the failures if any.
    pub fn table(&self) -> String {
        let mut out = format!(
            "{:<34} {:>5} {:>15} {:>15} {:>11} {:>10} {:>14}  {}\n",
            "fault", "n", "allowlisted:25", "587", "leaked:25", "old kept", "recovery ms", "result"
        );
        out.push_str(&format!(
            "{:<34} {:>5} {:>15} {:>15} {:>11} {:>10} {:>14}\n",
            "", "", "recv/sent", "recv/sent", "recv/sent", "", "median/max"
        ));
        for f in &self.faults {
            let recovery = if f.recovery_ms.is_empty() {
                "-".to_owned()
            } else {
                format!("{:.0}/{:.0}", median(&f.recovery_ms), max(&f.recovery_ms))
            };
            out.push_str(&format!(
                "{:<34} {:>5} {:>15} {:>15} {:>11} {:>10} {:>14}  {}\n",
                f.fault,
                f.iterations,
                format!("{}/{}", f.allowed_25.received, f.allowed_25.sent),
                format!("{}/{}", f.sub_587.received, f.sub_587.sent),
                format!("{}/{}", f.blocked_25.received, f.blocked_25.sent),
                f.old_policy_kept
                    .map_or("-".to_owned(), |k| format!("{}/{}", k.kept, k.of)),
                recovery,
                if f.passed() { "ok" } else { "FAILED" }
            ));
        }
        for f in &self.faults {
            if !f.ready_ms.is_empty() {
                out.push_str(&format!(
                    "  {}: p25d answering status after median {:.0} ms, max {:.0} ms\n",
                    f.fault,
                    median(&f.ready_ms),
                    max(&f.ready_ms)
                ));
            }
            for note in &f.notes {
                out.push_str(&format!("  {}: {note}\n", f.fault));
            }
            for failure in &f.failures {
                out.push_str(&format!("  {} FAILED: {failure}\n", f.fault));
            }
        }
        out.push_str(&format!(
            "lost allowlisted/587 SYNs: {}, leaked blocked SYNs: {}, {:.0} s: {}\n",
            self.faults.iter().map(FaultReport::lost).sum::<u64>(),
            self.faults.iter().map(FaultReport::leaked).sum::<u64>(),
            self.seconds,
            if self.passed() { "PASSED" } else { "FAILED" }
        ));
        out
    }
}

fn max(values: &[f64]) -> f64 {
    values.iter().copied().fold(0.0, f64::max)
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(0.0)
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 10.0
}

/// A duration in (fractional) milliseconds, for the JSON.
fn as_ms<S: serde::Serializer>(d: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_f64(d.as_secs_f64() * 1e3)
}

/// One phase of the suite: its fault's name (the table's row, the JSON's `fault`) and the
/// function that injects it, given the plan and that name.
type Phase = (&'static str, fn(&Plan, &str) -> Result<FaultReport>);

/// Every phase, in the order run; the names are written here only.
const PHASES: &[Phase] = &[
    ("start with bpffs unmounted", bpffs_unmounted),
    ("policy reloads (valid/invalid)", reloads),
    ("kill -9 and restart p25d", kills),
    ("r-sub down/up", flaps_down_up),
    ("r-sub delete/recreate", flaps_recreate),
    ("concurrent p25ctl allow/deny", concurrent_ctl),
];

/// Runs every fault of `plan`, printing each phase's row as it completes (through
/// `progress`). Errors are for a lab that could not be built; a broken invariant is a
/// failure in the report instead, so the other faults still run.
pub fn run(plan: &Plan, progress: &mut dyn FnMut(&FaultReport)) -> Result<Report> {
    crate::require_root();
    // Build (or find) the binaries first, so that no recovery time includes a build.
    bin("p25d")?;
    bin("p25ctl")?;
    let start = Instant::now();
    let mut report = Report::default();
    for &(name, phase) in PHASES {
        let fault = phase(plan, name).unwrap_or_else(|e| {
            let mut fault = FaultReport::new(name, 0);
            fault.fail(format!("the phase could not run: {e:#}"));
            fault
        });
        progress(&fault);
        report.faults.push(fault);
    }
    report.seconds = start.elapsed().as_secs_f64();
    Ok(report)
}

/// The lab of one phase: topology, probe address, counters. The daemon is separate
/// because one phase starts it its own way.
struct Lab {
    topology: Topology,
}

impl Lab {
    fn build() -> Result<Self> {
        let topology = Topology::build()?;
        topology.sub.add_addr("s0", &format!("{PROBE4}/24"))?;
        Ok(Self { topology })
    }

    fn daemon(&self) -> Result<DaemonLab> {
        let mut lab = DaemonLab::new(&self.topology.router)?;
        // A slow file poll: re-attaching a recreated interface must come from p25d's
        // rtnetlink link notifications, and the unfiltered window measures exactly that.
        // Reloads in this suite go through `p25ctl reload`, so they do not need the poll.
        lab.run_args(&["--poll", "10s"]);
        lab.write_policy(&valid_policy(0))?;
        Ok(lab)
    }

    /// One probing connection from [`PROBE4`] to the server's port 25.
    fn probe(&self) -> Result<bool> {
        Ok(self
            .topology
            .sub
            .connect_from(
                PROBE4.into(),
                None,
                SocketAddr::new(SERVER4.into(), SMTP),
                PROBE_TIMEOUT,
            )?
            .is_ok())
    }

    /// Waits until a probe connects; the time it took, or `None` after [`RECOVERY_LIMIT`].
    fn until_probe_connects(&self, since: Instant) -> Result<Option<Duration>> {
        let ok = wait_until(RECOVERY_LIMIT, Duration::from_millis(20), || self.probe())?;
        Ok(ok.then(|| since.elapsed()))
    }
}

/// Policy `n` of a series: the same verdicts for the stream, but its own marker entry
/// (100.64.77.x/32), so the allowlist in the kernel tells which policy is in force.
fn valid_policy(n: usize) -> String {
    POLICY.replace("MARKER", &marker(n).to_string())
}

fn marker(n: usize) -> Ipv4Addr {
    Ipv4Addr::new(100, 64, 77, (n % 250 + 1) as u8)
}

/// The receiver's counters for the three classes, and the stream's baselines.
struct Counting<'a> {
    port25: SynCounters<'a>,
    port587: SynCounters<'a>,
    base: [u64; 3],
}

impl<'a> Counting<'a> {
    fn install(server: &'a Netns) -> Result<Self> {
        let port25 = SynCounters::install(server, SMTP, &[SUB4, SUB4_ALLOWED])?;
        let port587 = SynCounters::install(server, SUBMISSION, &[SUB4])?;
        let mut counting = Self {
            port25,
            port587,
            base: [0; 3],
        };
        counting.base = counting.read()?;
        Ok(counting)
    }

    /// Settled counts: allowlisted→25, subscriber→587, subscriber→25.
    fn read(&self) -> Result<[u64; 3]> {
        Ok([
            self.port25.settled(SUB4_ALLOWED)?,
            self.port587.settled(SUB4)?,
            self.port25.settled(SUB4)?,
        ])
    }

    /// Fills the tallies of `fault` from the stream's sent counts and the counters.
    fn finish(&self, fault: &mut FaultReport, sent: [u64; 3]) -> Result<()> {
        let now = self.read()?;
        let got =
            |i: usize| now.get(i).copied().unwrap_or(0) - self.base.get(i).copied().unwrap_or(0);
        fault.allowed_25 = Tally {
            sent: sent[0],
            received: got(0),
        };
        fault.sub_587 = Tally {
            sent: sent[1],
            received: got(1),
        };
        fault.blocked_25 = Tally {
            sent: sent[2],
            received: got(2),
        };
        fault.check_stream();
        Ok(())
    }
}

/// The SYN stream: a sender thread, pausable, bounded in time ([`STREAM_LIMIT`]).
struct Stream {
    stop: Arc<AtomicBool>,
    pause: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
    errors: Arc<AtomicU64>,
    paused_for: Duration,
    thread: Option<JoinHandle<Result<[u64; 3]>>>,
}

impl Stream {
    fn start(sub: &Netns, interval: Duration) -> Result<Self> {
        let allowed = SynSender::new(sub, SUB4_ALLOWED)?;
        let blocked = SynSender::new(sub, SUB4)?;
        let smtp = SocketAddrV4::new(SERVER4, SMTP);
        let submission = SocketAddrV4::new(SERVER4, SUBMISSION);
        let stop = Arc::new(AtomicBool::new(false));
        let pause = Arc::new(AtomicBool::new(false));
        let paused = Arc::new(AtomicBool::new(false));
        let errors = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, pause, paused, errors) =
                (stop.clone(), pause.clone(), paused.clone(), errors.clone());
            thread::spawn(move || -> Result<[u64; 3]> {
                let started = Instant::now();
                let mut sent = [0_u64; 3];
                let mut round: u32 = 0;
                while !stop.load(Ordering::SeqCst) && started.elapsed() < STREAM_LIMIT {
                    if pause.load(Ordering::SeqCst) {
                        paused.store(true, Ordering::SeqCst);
                        thread::sleep(Duration::from_millis(2));
                        continue;
                    }
                    paused.store(false, Ordering::SeqCst);
                    // Source ports cycle through a range of their own, away from the
                    // probes' ephemeral ports.
                    let sport = 20_000 + (round % 10_000) as u16;
                    round = round.wrapping_add(1);
                    for (i, (sender, dst)) in
                        [(&allowed, smtp), (&blocked, submission), (&blocked, smtp)]
                            .into_iter()
                            .enumerate()
                    {
                        // A failed send never reached the wire: it is counted apart, not
                        // as sent (it would otherwise show up as "lost").
                        match sender.send(sport, dst) {
                            Ok(()) => {
                                if let Some(n) = sent.get_mut(i) {
                                    *n += 1;
                                }
                            }
                            Err(_) => {
                                errors.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                    }
                    thread::sleep(interval);
                }
                Ok(sent)
            })
        };
        Ok(Self {
            stop,
            pause,
            paused,
            errors,
            paused_for: Duration::ZERO,
            thread: Some(thread),
        })
    }

    /// Pauses the stream and waits until the sender is idle and what it sent has landed.
    fn pause(&self) -> Result<Instant> {
        self.pause.store(true, Ordering::SeqCst);
        let idle = wait_until(Duration::from_secs(5), Duration::from_millis(1), || {
            Ok(self.paused.load(Ordering::SeqCst))
        })?;
        ensure!(idle, "the sender did not pause within 5 s");
        // Packets already handed to the kernel cross three namespaces in well under this.
        thread::sleep(Duration::from_millis(100));
        Ok(Instant::now())
    }

    fn resume(&mut self, paused_at: Instant) {
        self.paused_for += paused_at.elapsed();
        self.pause.store(false, Ordering::SeqCst);
    }

    /// Stops the sender; what it sent per class, and the send errors.
    fn finish(mut self) -> Result<([u64; 3], u64, Duration)> {
        self.stop.store(true, Ordering::SeqCst);
        let sent = self
            .thread
            .take()
            .context("stream already finished")?
            .join()
            .map_err(|_| anyhow!("the sender thread panicked"))??;
        Ok((sent, self.errors.load(Ordering::SeqCst), self.paused_for))
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Runs `faults` under the stream in a fresh lab with a started daemon, then fills in the
/// stream's figures.
fn under_stream(
    plan: &Plan,
    name: &str,
    iterations: usize,
    faults: impl FnOnce(&Lab, &mut DaemonLab, &mut Stream, &mut FaultReport) -> Result<()>,
) -> Result<FaultReport> {
    let lab = Lab::build()?;
    let mut daemon = lab.daemon()?;
    daemon.start()?;
    let mut fault = FaultReport::new(name, iterations);
    let counting = Counting::install(&lab.topology.server)?;
    // Warm up ARP on both links so the first SYNs are not queued behind resolution.
    ensure!(
        lab.until_probe_connects(Instant::now())?.is_some(),
        "the probe does not connect before any fault:\n{}",
        daemon.log()
    );
    let mut stream = Stream::start(&lab.topology.sub, plan.interval)?;
    // The stream runs a moment before the first fault and after the last one, so every
    // fault is surrounded by traffic.
    thread::sleep(Duration::from_millis(300));
    let outcome = faults(&lab, &mut daemon, &mut stream, &mut fault);
    thread::sleep(Duration::from_millis(300));
    let (sent, errors, paused) = stream.finish()?;
    fault.paused_ms = ms(paused);
    if errors > 0 {
        fault.notes.push(format!(
            "{errors} sends failed (never on the wire, not counted)"
        ));
    }
    counting.finish(&mut fault, sent)?;
    if let Err(e) = outcome {
        fault.fail(format!("{e:#}\n{}", daemon.log()));
    }
    if !daemon.status().is_ok_and(|s| s.daemon) {
        fault.fail(format!(
            "p25d is not answering at the end:\n{}",
            daemon.log()
        ));
    }
    Ok(fault)
}

/// The generation in force, as the daemon reports it.
fn generation(daemon: &DaemonLab) -> Result<u64> {
    Ok(u64::from(daemon.status()?.generation))
}

/// What the kernel has in force: the IPv4 allowlist and the CONFIG generation, read from
/// the pinned maps (not from the daemon, which could be wrong about them).
fn kernel_state(daemon: &DaemonLab) -> Result<(BTreeSet<IpNet>, BTreeSet<IpNet>, u32)> {
    let tables = KernelTables::open_pinned(&PinLayout::new(&daemon.pin_root))
        .context("opening the pinned maps")?;
    let mut policy = BTreeSet::new();
    let mut runtime = BTreeSet::new();
    for (net, value) in tables.allowlist()? {
        if value.origin == Origin::RUNTIME {
            runtime.insert(net);
        } else {
            policy.insert(net);
        }
    }
    Ok((policy, runtime, tables.config()?.generation))
}

fn expected_allow(n: usize) -> Result<BTreeSet<IpNet>> {
    [
        "100.64.1.3/32",
        "100.64.1.4/32",
        &format!("{}/32", marker(n)),
    ]
    .iter()
    .map(|p| p.parse().with_context(|| format!("prefix {p}")))
    .collect()
}

fn reloads(plan: &Plan, name: &str) -> Result<FaultReport> {
    under_stream(plan, name, plan.reloads, |_lab, daemon, _stream, fault| {
        let only_v4 = |set: BTreeSet<IpNet>| -> BTreeSet<IpNet> {
            set.into_iter()
                .filter(|n| matches!(n, IpNet::V4(_)))
                .collect()
        };
        let mut good = 0; // the valid policy in force
        let (mut kept, mut invalid) = (0, 0);
        for i in 0..plan.reloads {
            // A short gap, so that the reloads are spread over the stream and p25d's
            // own file watcher (100 ms poll) races some of them.
            thread::sleep(Duration::from_millis(20));
            let t0 = Instant::now();
            if i % 2 == 0 {
                good = i / 2 + 1;
                let before = generation(daemon)?;
                daemon.write_policy(&valid_policy(good))?;
                daemon.ctl_ok(&["reload"])?;
                let after = generation(daemon)?;
                let (allow, _, generation) = kernel_state(daemon)?;
                fault.recovery_ms.push(ms(t0.elapsed()));
                ensure!(
                    after > before,
                    "reload {i}: the generation did not move ({before} → {after})"
                );
                ensure!(
                    only_v4(allow.clone()) == expected_allow(good)?
                        && u64::from(generation) == after,
                    "reload {i}: the kernel has {allow:?} at generation {generation}, \
                         expected policy {good} at generation {after}"
                );
            } else {
                invalid += 1;
                let (what, text) = INVALID
                    .get(invalid % INVALID.len())
                    .copied()
                    .unwrap_or(("empty file", ""));
                let generation = generation(daemon)?;
                let failed = daemon.status()?.reloads_failed;
                daemon.write_policy(text)?;
                let out = daemon.ctl(&["reload"])?;
                let rejected = !out.status.success()
                    && !String::from_utf8_lossy(&out.stderr).trim().is_empty();
                let status = daemon.status()?;
                let (allow, _, in_kernel) = kernel_state(daemon)?;
                fault.recovery_ms.push(ms(t0.elapsed()));
                let old_in_force = rejected
                    && u64::from(status.generation) == generation
                    && status.reloads_failed > failed
                    && u64::from(in_kernel) == generation
                    && only_v4(allow.clone()) == expected_allow(good)?;
                if old_in_force {
                    kept += 1;
                } else {
                    fault.fail(format!(
                        "invalid reload {i} ({what}): rejected={rejected}, status {status:?}, \
                             kernel {allow:?} at generation {in_kernel}; expected policy {good} \
                             at generation {generation}"
                    ));
                }
            }
        }
        fault.old_policy_kept = Some(Kept { kept, of: invalid });
        fault.notes.push(format!(
            "recovery = reload round trip: write, `p25ctl reload`, status and pinned maps \
                 checked; {} kinds of invalid policy",
            INVALID.len()
        ));
        Ok(())
    })
}

fn kills(plan: &Plan, name: &str) -> Result<FaultReport> {
    under_stream(plan, name, plan.kills, |lab, daemon, _stream, fault| {
        let mut adopted = 0;
        for i in 0..plan.kills {
            let before = generation(daemon)?;
            let t0 = Instant::now();
            daemon.kill9()?;
            // Filtering goes on from the pins while nobody runs: the stream checks it.
            thread::sleep(DEAD_TIME);
            ensure!(
                !daemon.status()?.daemon,
                "kill {i}: status should come from the pins"
            );
            daemon.start()?;
            fault.ready_ms.push(ms(t0.elapsed()));
            let recovered = lab
                .until_probe_connects(t0)?
                .with_context(|| format!("kill {i}: no probe connected"))?;
            fault.recovery_ms.push(ms(recovered));
            let after = generation(daemon)?;
            ensure!(
                after > before,
                "kill {i}: the generation went {before} → {after}"
            );
            if daemon.log().contains("adopted=true") {
                adopted += 1;
            }
        }
        ensure!(
            adopted == plan.kills,
            "only {adopted} of {} restarts adopted the pinned links",
            plan.kills
        );
        fault.notes.push(format!(
            "recovery = kill → daemon answering `p25ctl status` and a probe connecting, \
                 including {} ms dead on purpose",
            DEAD_TIME.as_millis()
        ));
        Ok(())
    })
}

fn interface_attached(daemon: &DaemonLab, name: &str) -> Result<bool> {
    Ok(daemon
        .status()?
        .interfaces
        .iter()
        .any(|i| i.name == name && i.attached))
}

/// Whether `dev` in `netns` is operationally up.
fn link_up(netns: &Netns, dev: &str) -> Result<bool> {
    Ok(netns
        .ip(&["-o", "link", "show", "dev", dev])
        .is_ok_and(|out| out.contains("state UP")))
}

fn flaps_down_up(plan: &Plan, name: &str) -> Result<FaultReport> {
    under_stream(plan, name, plan.flaps, |lab, daemon, stream, fault| {
        let router = &lab.topology.router;
        for i in 0..plan.flaps {
            let paused = stream.pause()?;
            let t0 = Instant::now();
            router.ip(&["link", "set", "r-sub", "down"])?;
            thread::sleep(Duration::from_millis(200));
            router.ip(&["link", "set", "r-sub", "up"])?;
            let up = wait_until(RECOVERY_LIMIT, Duration::from_millis(10), || {
                Ok(link_up(router, "r-sub")? && link_up(&lab.topology.sub, "s0")?)
            })?;
            ensure!(up, "flap {i}: the link did not come up");
            stream.resume(paused);
            let recovered = lab
                .until_probe_connects(t0)?
                .with_context(|| format!("flap {i}: no probe connected"))?;
            fault.recovery_ms.push(ms(recovered));
            ensure!(
                interface_attached(daemon, "r-sub")?,
                "flap {i}: r-sub not attached:\n{}",
                daemon.log()
            );
        }
        fault.notes.push(
            "stream paused from just before `down` until both ends are up again; \
                 recovery = down → a probe connects (includes 200 ms down on purpose)"
                .to_owned(),
        );
        Ok(())
    })
}

/// [`Topology::recreate_subscriber_link`], plus the probe address, returning when the new
/// interface was created (before it is addressed), which is when it starts to exist
/// without a program.
fn recreate_subscriber_link(topology: &Topology) -> Result<Instant> {
    let (sub, router) = (&topology.sub, &topology.router);
    router.ip(&["link", "del", "r-sub"])?;
    veth(sub, "s0", router, "r-sub")?;
    let created = Instant::now();
    for addr in [SUB4, SUB4_ALLOWED, PROBE4, OUTSIDER4] {
        sub.add_addr("s0", &format!("{addr}/24"))?;
    }
    for addr in [SUB6, SUB6_ALLOWED, OUTSIDER6] {
        sub.add_addr("s0", &format!("{addr}/64"))?;
    }
    for addr in [GW_SUB4, GW_OUTSIDER4] {
        router.add_addr("r-sub", &format!("{addr}/24"))?;
    }
    for addr in [GW_SUB6, GW_OUTSIDER6] {
        router.add_addr("r-sub", &format!("{addr}/64"))?;
    }
    sub.add_route("default", &GW_SUB4.to_string())?;
    sub.add_route("default", &GW_SUB6.to_string())?;
    Ok(created)
}

fn flaps_recreate(plan: &Plan, name: &str) -> Result<FaultReport> {
    under_stream(plan, name, plan.flaps, |lab, daemon, stream, fault| {
        for i in 0..plan.flaps {
            let paused = stream.pause()?;
            let t0 = Instant::now();
            let created = recreate_subscriber_link(&lab.topology)?;
            // The new interface has no program until p25d notices it: that window is
            // unfiltered, so the stream only resumes once p25d reports it attached.
            let attached = wait_until(RECOVERY_LIMIT, Duration::from_millis(5), || {
                interface_attached(daemon, "r-sub")
            })?;
            ensure!(
                attached,
                "recreate {i}: r-sub not re-attached:\n{}",
                daemon.log()
            );
            fault.unfiltered_ms.push(ms(created.elapsed()));
            stream.resume(paused);
            let recovered = lab
                .until_probe_connects(t0)?
                .with_context(|| format!("recreate {i}: no probe connected"))?;
            fault.recovery_ms.push(ms(recovered));
        }
        fault.notes.push(format!(
                "stream paused while the link is absent and until p25d re-attached it; \
                 the new interface was unfiltered for {:.0}-{:.0} ms (veth created → p25d \
                 reports it attached, polled through p25ctl status; p25d re-attaches on rtnetlink link \
                 events, its --poll is 10 s here); recovery = delete → a probe connects",
                fault
                    .unfiltered_ms
                    .iter()
                    .copied()
                    .fold(f64::INFINITY, f64::min),
                max(&fault.unfiltered_ms)
            ));
        Ok(())
    })
}

fn concurrent_ctl(plan: &Plan, name: &str) -> Result<FaultReport> {
    under_stream(
        plan,
        name,
        plan.clients * plan.ops_per_client,
        |_lab, daemon, _stream, fault| {
            let daemon = &*daemon;
            let t0 = Instant::now();
            // Each client toggles its own 8 addresses (100.64.(20+c).1-8, subscriber space,
            // no traffic): allow if absent, deny if present. What it leaves allowed is the
            // expected runtime allowlist.
            let results: Vec<Result<(BTreeSet<IpNet>, Vec<f64>)>> = thread::scope(|s| {
                let handles: Vec<_> = (0..plan.clients)
                    .map(|c| {
                        s.spawn(move || -> Result<(BTreeSet<IpNet>, Vec<f64>)> {
                            let mut allowed = BTreeSet::new();
                            let mut latencies = Vec::new();
                            for j in 0..plan.ops_per_client {
                                let addr = Ipv4Addr::new(100, 64, 20 + c as u8, (j % 8 + 1) as u8);
                                let net: IpNet = IpNet::new(IpAddr::V4(addr), 32)?;
                                let t = Instant::now();
                                if allowed.contains(&net) {
                                    daemon.ctl_ok(&["deny", &addr.to_string()])?;
                                    allowed.remove(&net);
                                } else {
                                    daemon.ctl_ok(&[
                                        "allow",
                                        &addr.to_string(),
                                        "--comment",
                                        &format!("client {c} op {j}"),
                                    ])?;
                                    allowed.insert(net);
                                }
                                latencies.push(ms(t.elapsed()));
                            }
                            Ok((allowed, latencies))
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join()
                            .unwrap_or_else(|_| Err(anyhow!("a client thread panicked")))
                    })
                    .collect()
            });
            let mut expected = BTreeSet::new();
            let mut latencies = Vec::new();
            for result in results {
                let (allowed, l) = result?;
                expected.extend(allowed);
                latencies.extend(l);
            }
            let elapsed = t0.elapsed();
            fault.recovery_ms.push(ms(elapsed));
            let listed: BTreeSet<IpNet> = daemon.runtime_allow()?.into_iter().collect();
            let (_, in_kernel, _) = kernel_state(daemon)?;
            ensure!(
                listed == expected,
                "p25ctl list shows {listed:?}, the clients left {expected:?}"
            );
            ensure!(
                in_kernel == expected,
                "the pinned maps hold {in_kernel:?}, the clients left {expected:?}"
            );
            let state = fs::read_to_string(daemon.dir.join("state.json")).unwrap_or_default();
            ensure!(
                expected
                    .iter()
                    .all(|net| state.contains(&net.addr().to_string())),
                "the state file misses entries: {state}"
            );
            fault.notes.push(format!(
                "{} commands in {:.1} s, all succeeded; per command median {:.0} ms, max {:.0} ms; \
                 {} entries left, identical in p25ctl list, the pinned maps and the state \
                 file; recovery column = wall time of the whole burst",
                latencies.len(),
                elapsed.as_secs_f64(),
                median(&latencies),
                max(&latencies),
                expected.len()
            ));
            Ok(())
        },
    )
}

/// What p25d runs under in the "bpffs unmounted" phase: a private mount namespace
/// (private propagation: nothing leaks back to the host's mounts) in which every bpffs
/// stacked on /sys/fs/bpf is unmounted and checked gone before p25d starts; it must mount
/// its own. The namespace, and its bpffs, die with p25d.
const WITHOUT_BPFFS: &[&str] = &[
    "unshare",
    "--mount",
    "--propagation",
    "private",
    "--",
    "sh",
    "-c",
    r#"
        for _ in 1 2 3 4 5 6 7 8; do
            mountpoint -q /sys/fs/bpf || break
            umount /sys/fs/bpf || exit 97
        done
        mountpoint -q /sys/fs/bpf && exit 98
        grep -q ' /sys/fs/bpf bpf ' /proc/self/mounts && exit 99
        exec "$@"
    "#,
    "sh",
];

fn host_has_bpffs() -> bool {
    crate::bpffs_mounted(Path::new("/sys/fs/bpf"))
}

fn bpffs_unmounted(plan: &Plan, name: &str) -> Result<FaultReport> {
    let mut fault = FaultReport::new(name, 1);
    ensure!(
        host_has_bpffs(),
        "the host has no bpffs at /sys/fs/bpf to begin with"
    );
    let lab = Lab::build()?;
    let mut daemon = lab.daemon()?;
    daemon.wrap(WITHOUT_BPFFS);
    let counting = Counting::install(&lab.topology.server)?;
    let t0 = Instant::now();
    daemon.start()?;
    fault.ready_ms.push(ms(t0.elapsed()));
    let recovered = lab
        .until_probe_connects(t0)?
        .context("no probe connected")?;
    fault.recovery_ms.push(ms(recovered));
    let log = daemon.log();
    if !log.contains("mounted bpffs") {
        fault.fail(format!("p25d did not say it mounted bpffs:\n{log}"));
    }
    if !host_has_bpffs() {
        fault.fail("the host's /sys/fs/bpf was unmounted".to_owned());
    }
    if Path::new(&daemon.pin_root).exists() {
        fault.fail("the pins are visible on the host's bpffs: not a private mount".to_owned());
    }
    let stream = Stream::start(&lab.topology.sub, plan.interval)?;
    thread::sleep(Duration::from_secs(3));
    let (sent, errors, _) = stream.finish()?;
    if errors > 0 {
        fault
            .notes
            .push(format!("{errors} sends failed (not counted)"));
    }
    counting.finish(&mut fault, sent)?;
    fault.notes.push(
        "p25d in a private mount namespace with /sys/fs/bpf unmounted mounted bpffs itself; \
         the host's bpffs untouched; recovery = spawn → status answered and a probe connects"
            .to_owned(),
    );
    drop(daemon);
    Ok(fault)
}

#[cfg(test)]
#[expect(clippy::indexing_slicing, reason = "tests: a panic is a failure")]
mod tests {
    use super::*;

    /// The JSON keeps the fields and derived figures that `p25-chaos --out` always wrote.
    #[test]
    fn the_json_record_has_every_figure() -> Result<()> {
        let mut fault = FaultReport::new("a fault", 2);
        fault.blocked_25 = Tally {
            sent: 3,
            received: 1,
        };
        fault.old_policy_kept = Some(Kept { kept: 4, of: 5 });
        fault.recovery_ms = vec![1.0, 3.0, 2.0];
        let report = Report {
            faults: vec![fault],
            seconds: 1.5,
        };
        let json = serde_json::to_value(report.record(&Plan::reduced()))?;
        let keys = |value: &serde_json::Value| -> Vec<String> {
            let mut keys: Vec<String> = value
                .as_object()
                .map(|o| o.keys().cloned().collect())
                .unwrap_or_default();
            keys.sort();
            keys
        };
        assert_eq!(keys(&json), ["faults", "passed", "plan", "seconds"]);
        assert_eq!(
            keys(&json["plan"]),
            [
                "clients",
                "flaps",
                "interval_ms",
                "kills",
                "ops_per_client",
                "reloads"
            ]
        );
        let fault = &json["faults"][0];
        assert_eq!(
            keys(fault),
            [
                "allowed_25",
                "blocked_25",
                "failures",
                "fault",
                "iterations",
                "leaked",
                "lost",
                "notes",
                "old_policy_kept",
                "passed",
                "paused_ms",
                "ready_ms",
                "recovery_ms",
                "recovery_ms_max",
                "recovery_ms_median",
                "sub_587",
                "unfiltered_ms",
            ]
        );
        assert_eq!(json["plan"]["interval_ms"], 4.0);
        assert_eq!(fault["fault"], "a fault");
        assert_eq!(fault["leaked"], 1);
        assert_eq!(fault["blocked_25"]["sent"], 3);
        assert_eq!(fault["old_policy_kept"]["kept"], 4);
        assert_eq!(fault["old_policy_kept"]["of"], 5);
        assert_eq!(fault["recovery_ms_median"], 2.0);
        assert_eq!(fault["recovery_ms_max"], 3.0);
        assert_eq!(fault["passed"], true);
        Ok(())
    }
}
