//! The control plane at scale, with the real release `p25d` and `p25ctl`, for a policy of
//! 1.1M entries (100k subscriber prefixes, 1M allowlist entries) written two ways: with
//! the big lists in list files (`subscriber_files`, `allow_files`: what the targets are
//! for) and, for comparison, inline in the YAML document. For each:
//!
//! - `p25d check`: wall time and peak RSS of the check of the files;
//! - cold start: a fresh pin root; time from spawning p25d to its "policy in force" log
//!   line, split at "dataplane loaded" (the policy check, then the fill of the maps, and
//!   beside both on a thread of its own the programs' verification) and the attach after
//!   it;
//! - idle RSS: the daemon's VmRSS a moment after start-up;
//! - a 1% diff: the files rewritten with 1% of their entries changed, then `p25ctl
//!   reload`, which returns once the new policy is in the maps; the daemon's peak RSS
//!   during it (VmHWM, reset just before through `/proc/PID/clear_refs`);
//! - one `p25ctl allow`: time from spawning p25ctl until a BPF_PROG_TEST_RUN of p25_xdp
//!   over the daemon's pinned maps turns from drop to pass, for a fresh subscriber address;
//! - peak RSS of the daemon over the whole run (VmHWM).
//!
//! Wall times on a shared machine move with its load; next to each the CPU time it
//! took (of the `p25d check` child from `wait4`, of the daemon from `/proc/PID/stat`),
//! which does not, or much less.
//!
//! The daemon runs in a throwaway namespace, with its own pin root, socket and files;
//! everything is removed afterwards (the daemon itself leaves its pins on purpose).

use std::{
    collections::HashSet,
    fmt::Write as _,
    fs,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result, ensure};
use aya::programs::{TestRun as _, TestRunOptions};
use filter_user::Dataplane;
use p25_tests::packet::Pkt;

use crate::{
    daemon::{Daemon, log_field, log_time, write_atomically},
    netns::{Netns, veth},
    scale::{self, PolicySet},
    stats::Stats,
};

/// Target: spawn to policy in force, seconds (list files).
pub const TARGET_COLD_S: f64 = 1.0;
/// Target: reload of a 1% diff, seconds (list files).
pub const TARGET_DIFF_S: f64 = 0.5;
/// Target: `p25d check`, seconds (list files).
pub const TARGET_CHECK_S: f64 = 0.5;
/// Target: one `p25ctl allow` until the verdict changes, milliseconds.
pub const TARGET_ALLOW_MS: f64 = 5.0;
/// Target: daemon RSS when idle, MiB (list files).
pub const TARGET_IDLE_RSS_MIB: f64 = 64.0;
/// Target: daemon peak RSS during a reload, MiB (list files).
pub const TARGET_RELOAD_RSS_MIB: f64 = 128.0;

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

/// Settings.
#[derive(Clone, Debug)]
pub struct Options {
    /// Where the release p25d and p25ctl are.
    pub bin_dir: PathBuf,
    /// Single-allow samples.
    pub allows: usize,
}

/// How the policy is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// The big lists in `subscriber_files` and `allow_files`.
    ListFiles,
    /// Everything in the YAML document.
    InlineYaml,
}

/// The whole section: list files (judged against the targets) and inline YAML (for
/// comparison).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    /// The policy in list files.
    pub list_files: Run,
    /// The same policy inline.
    pub inline_yaml: Run,
}

/// One layout's figures.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Run {
    /// How the policy was written.
    pub layout: Layout,
    /// Subscriber prefixes + allowlist entries in the policy.
    pub policy_entries: usize,
    /// Size of the policy's files, bytes.
    pub policy_bytes: usize,
    /// `p25d check` wall time, seconds.
    pub check_seconds: f64,
    /// `p25d check` peak RSS, MiB.
    pub check_rss_mib: f64,
    /// `p25d check` CPU time (user + system), seconds.
    pub check_cpu_seconds: f64,
    /// Spawn to "policy in force", seconds.
    pub cold_seconds: f64,
    /// Spawn to "dataplane loaded" (the policy check and the fill of the maps, and beside
    /// them on a thread of its own the programs' verification), seconds.
    pub cold_parse_and_load_seconds: f64,
    /// When, from p25d's start, the policy check was done, the maps filled, and the
    /// programs verified (p25d's "dataplane loaded" line), seconds: which of the parallel
    /// parts set the cold start.
    pub cold_checked_at_seconds: f64,
    pub cold_filled_at_seconds: f64,
    pub cold_verified_at_seconds: f64,
    /// "dataplane loaded" to "policy in force" (the attach), seconds.
    pub cold_reconcile_seconds: f64,
    /// The daemon's CPU time (user + system, all threads) from spawn to "ready", seconds.
    pub cold_cpu_seconds: f64,
    /// Daemon VmRSS after start-up, MiB.
    pub idle_rss_mib: f64,
    /// Entries changed by the diff.
    pub diff_changed_entries: usize,
    /// `p25ctl reload` wall time with the 1% diff, seconds.
    pub diff_reload_seconds: f64,
    /// Daemon peak RSS during that reload, MiB.
    pub reload_peak_rss_mib: f64,
    /// The daemon's CPU time during that reload, seconds.
    pub diff_reload_cpu_seconds: f64,
    /// Spawn of `p25ctl allow` to the verdict change, ms.
    pub allow_verdict_ms: Stats,
    /// Spawn of `p25ctl allow` to its exit, ms.
    pub allow_ctl_exit_ms: Stats,
    /// The daemon's CPU time per `p25ctl allow` (over all of them), ms.
    pub allow_daemon_cpu_ms: f64,
    /// Daemon peak RSS over the whole run (VmHWM since the last reset: the reload and
    /// the allows), MiB.
    pub peak_rss_mib: f64,
    /// Daemon peak RSS of the cold start (VmHWM before the reset), MiB.
    pub cold_peak_rss_mib: f64,
}

impl Run {
    /// Whether every target is met.
    pub fn met(&self) -> bool {
        self.cold_seconds <= TARGET_COLD_S
            && self.diff_reload_seconds <= TARGET_DIFF_S
            && self.check_seconds <= TARGET_CHECK_S
            && self.allow_verdict_ms.median <= TARGET_ALLOW_MS
            && self.idle_rss_mib <= TARGET_IDLE_RSS_MIB
            && self.reload_peak_rss_mib <= TARGET_RELOAD_RSS_MIB
    }
}

impl Report {
    /// The section as text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let (l, i) = (&self.list_files, &self.inline_yaml);
        let ok = |b: bool| if b { "ok" } else { "MISS" };
        let _ = writeln!(
            out,
            "\nControl plane (release p25d/p25ctl, policy of {} entries: list files {:.1} MB, \
             inline YAML {:.1} MB)",
            l.policy_entries,
            l.policy_bytes as f64 / 1e6,
            i.policy_bytes as f64 / 1e6
        );
        let _ = writeln!(
            out,
            "{:<34} {:>12} {:>12}   target (list files)",
            "measure", "list files", "inline YAML"
        );
        let mut row = |name: &str, a: f64, b: f64, unit: &str, target: Option<(f64, bool)>| {
            let target = target.map_or(String::new(), |(t, met)| {
                format!("<= {t} {unit} {}", ok(met))
            });
            let _ = writeln!(
                out,
                "{name:<34} {a:>9.3} {unit:<3}{b:>9.3} {unit:<3}  {target}"
            );
        };
        row(
            "p25d check",
            l.check_seconds,
            i.check_seconds,
            "s",
            Some((TARGET_CHECK_S, l.check_seconds <= TARGET_CHECK_S)),
        );
        row(
            "  CPU time",
            l.check_cpu_seconds,
            i.check_cpu_seconds,
            "s",
            None,
        );
        row(
            "p25d check peak RSS",
            l.check_rss_mib,
            i.check_rss_mib,
            "MiB",
            None,
        );
        row(
            "spawn to policy in force",
            l.cold_seconds,
            i.cold_seconds,
            "s",
            Some((TARGET_COLD_S, l.cold_seconds <= TARGET_COLD_S)),
        );
        row(
            "  check + fill beside verify",
            l.cold_parse_and_load_seconds,
            i.cold_parse_and_load_seconds,
            "s",
            None,
        );
        for (label, list, inline) in [
            (
                "    check done (p25d's clock)",
                l.cold_checked_at_seconds,
                i.cold_checked_at_seconds,
            ),
            (
                "    maps filled",
                l.cold_filled_at_seconds,
                i.cold_filled_at_seconds,
            ),
            (
                "    programs verified",
                l.cold_verified_at_seconds,
                i.cold_verified_at_seconds,
            ),
        ] {
            row(label, list, inline, "s", None);
        }
        row(
            "  attach",
            l.cold_reconcile_seconds,
            i.cold_reconcile_seconds,
            "s",
            None,
        );
        row(
            "  CPU time (daemon, to ready)",
            l.cold_cpu_seconds,
            i.cold_cpu_seconds,
            "s",
            None,
        );
        row(
            "cold start peak RSS",
            l.cold_peak_rss_mib,
            i.cold_peak_rss_mib,
            "MiB",
            None,
        );
        row(
            "idle RSS",
            l.idle_rss_mib,
            i.idle_rss_mib,
            "MiB",
            Some((TARGET_IDLE_RSS_MIB, l.idle_rss_mib <= TARGET_IDLE_RSS_MIB)),
        );
        row(
            &format!("1% diff reload ({} entries)", l.diff_changed_entries),
            l.diff_reload_seconds,
            i.diff_reload_seconds,
            "s",
            Some((TARGET_DIFF_S, l.diff_reload_seconds <= TARGET_DIFF_S)),
        );
        row(
            "  CPU time (daemon)",
            l.diff_reload_cpu_seconds,
            i.diff_reload_cpu_seconds,
            "s",
            None,
        );
        row(
            "peak RSS during the reload",
            l.reload_peak_rss_mib,
            i.reload_peak_rss_mib,
            "MiB",
            Some((
                TARGET_RELOAD_RSS_MIB,
                l.reload_peak_rss_mib <= TARGET_RELOAD_RSS_MIB,
            )),
        );
        row(
            "p25ctl allow -> verdict (median)",
            l.allow_verdict_ms.median,
            i.allow_verdict_ms.median,
            "ms",
            Some((
                TARGET_ALLOW_MS,
                l.allow_verdict_ms.median <= TARGET_ALLOW_MS,
            )),
        );
        row(
            "  max",
            l.allow_verdict_ms.max,
            i.allow_verdict_ms.max,
            "ms",
            None,
        );
        row(
            "p25ctl allow exit (median)",
            l.allow_ctl_exit_ms.median,
            i.allow_ctl_exit_ms.median,
            "ms",
            None,
        );
        row(
            "  daemon CPU per allow",
            l.allow_daemon_cpu_ms,
            i.allow_daemon_cpu_ms,
            "ms",
            None,
        );
        let _ = writeln!(out, "list files: all targets {}", ok(l.met()));
        out
    }
}

fn since(from: SystemTime, to: SystemTime) -> f64 {
    to.duration_since(from).map_or(0.0, |d| d.as_secs_f64())
}

/// A memory figure of `/proc/PID/status` (`VmHWM`, `VmRSS`), MiB.
fn vm_mib(pid: u32, field: &str) -> Result<f64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {field} for {pid}"))?;
    Ok(kib / 1024.0)
}

/// CPU time (user + system, all threads) of `pid` so far, seconds.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The fields after the command name (which may hold spaces) in parentheses; utime
    // and stime are fields 14 and 15, in clock ticks.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .with_context(|| format!("no command name in /proc/{pid}/stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<f64> {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .with_context(|| format!("no field {} in /proc/{pid}/stat", i + 3))
    };
    // SAFETY: sysconf reads a constant of the system; no memory is involved.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ensure!(hz > 0, "sysconf(_SC_CLK_TCK) failed");
    // Fields 14 and 15 are at 11 and 12 after the state (field 3).
    Ok((ticks(11)? + ticks(12)?) / hz as f64)
}

fn timeval_seconds(t: libc::timeval) -> f64 {
    t.tv_sec as f64 + t.tv_usec as f64 / 1e6
}

/// Resets the peak RSS (VmHWM) of `pid` to its current RSS.
fn reset_hwm(pid: u32) -> Result<()> {
    fs::write(format!("/proc/{pid}/clear_refs"), "5")
        .with_context(|| format!("resetting VmHWM of {pid}"))
}

/// Runs `p25d check` on `policy`: (wall seconds, peak RSS MiB, CPU seconds).
fn check(bin_dir: &Path, policy: &Path) -> Result<(f64, f64, f64)> {
    let started = Instant::now();
    let child = Command::new(bin_dir.join("p25d"))
        .arg("check")
        .arg(policy)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("spawning p25d check")?;
    let pid = libc::pid_t::try_from(child.id()).context("pid out of range")?;
    let mut status = 0;
    // SAFETY: all-zero is a valid rusage (plain integers), filled in by wait4.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child, with valid pointers; `child` is not waited again
    // (dropping a Child does not wait).
    let ret = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let seconds = started.elapsed().as_secs_f64();
    ensure!(ret == pid, "wait4 for p25d check failed");
    ensure!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "p25d check {} failed (status {status})",
        policy.display()
    );
    drop(child);
    // ru_maxrss is in KiB on Linux.
    Ok((
        seconds,
        usage.ru_maxrss as f64 / 1024.0,
        timeval_seconds(usage.ru_utime) + timeval_seconds(usage.ru_stime),
    ))
}

/// Writes `set` (with the subscriber modes in `toggled` flipped) as the daemon's policy
/// in `layout`; returns the bytes written.
fn write_policy(
    daemon: &Daemon,
    set: &PolicySet,
    toggled: &HashSet<usize>,
    layout: Layout,
) -> Result<usize> {
    match layout {
        Layout::InlineYaml => {
            let text = scale::yaml(set, "cp0", toggled);
            write_atomically(&daemon.policy(), &text)?;
            Ok(text.len())
        }
        Layout::ListFiles => {
            let files = scale::list_files(set, "cp0", toggled);
            // Lists first: the daemon notices the policy file last, whole.
            write_atomically(&daemon.dir.join("subscribers.txt"), &files.subscribers)?;
            write_atomically(&daemon.dir.join("allow.txt"), &files.allow)?;
            write_atomically(&daemon.policy(), &files.policy)?;
            Ok(files.len())
        }
    }
}

/// Runs the section: list files, then inline YAML.
pub fn run(opts: &Options, set: &PolicySet) -> Result<Report> {
    Ok(Report {
        list_files: run_layout(opts, set, Layout::ListFiles)?,
        inline_yaml: run_layout(opts, set, Layout::InlineYaml)?,
    })
}

fn run_layout(opts: &Options, set: &PolicySet, layout: Layout) -> Result<Run> {
    eprintln!("  control: {layout:?}");
    let ns = Netns::new("cp")?;
    veth(&ns, "cp0", &ns, "cp1")?;
    // The list files go in before p25d starts; the policy names them.
    let (text, lists) = match layout {
        Layout::InlineYaml => (scale::yaml(set, "cp0", &HashSet::new()), None),
        Layout::ListFiles => {
            let files = scale::list_files(set, "cp0", &HashSet::new());
            (files.policy.clone(), Some(files))
        }
    };
    let extra: Vec<(&str, &str)> = lists.as_ref().map_or_else(Vec::new, |files| {
        vec![
            ("subscribers.txt", files.subscribers.as_str()),
            ("allow.txt", files.allow.as_str()),
        ]
    });
    let policy_bytes = lists.as_ref().map_or(text.len(), scale::ListFiles::len);
    let mut daemon = Daemon::start_with(&opts.bin_dir, &ns, "cp", &text, &extra)?;
    drop(extra);
    drop(lists);
    let spawned = daemon.spawned;
    let log = daemon.wait_for_log("ready", Duration::from_secs(300))?;
    let loaded = log_time(&log, "dataplane loaded").context("no 'dataplane loaded' line")?;
    let in_force = log_time(&log, "policy in force").context("no 'policy in force' line")?;
    let cold_seconds = since(spawned, in_force);
    let loaded_ms = |field: &str| {
        log_field(&log, "dataplane loaded", field)
            .map(|ms| ms as f64 / 1e3)
            .with_context(|| format!("no {field} on the 'dataplane loaded' line"))
    };
    eprintln!("  control: cold load + reconcile {cold_seconds:.3} s");
    let pid = daemon.pid().context("p25d not running")?;
    let cold_cpu_seconds = cpu_seconds(pid)?;
    // A moment for the allocator to settle, then the daemon at rest.
    std::thread::sleep(Duration::from_millis(500));
    let idle_rss_mib = vm_mib(pid, "VmRSS")?;
    let cold_peak_rss_mib = vm_mib(pid, "VmHWM")?;
    eprintln!("  control: idle RSS {idle_rss_mib:.1} MiB (cold peak {cold_peak_rss_mib:.1} MiB)");
    let (check_seconds, check_rss_mib, check_cpu_seconds) = check(&opts.bin_dir, &daemon.policy())?;
    eprintln!(
        "  control: p25d check {check_seconds:.3} s ({check_cpu_seconds:.3} s CPU), \
         {check_rss_mib:.0} MiB"
    );

    // 1% diff.
    let (changed_set, toggled, diff_changed_entries) = scale::one_percent_diff(set, 0xD1FF)?;
    write_policy(&daemon, &changed_set, &toggled, layout)?;
    reset_hwm(pid)?;
    let cpu_before = cpu_seconds(pid)?;
    let started = Instant::now();
    let out = daemon.ctl(&["reload"]).output().context("p25ctl reload")?;
    let diff_reload_seconds = started.elapsed().as_secs_f64();
    let diff_reload_cpu_seconds = cpu_seconds(pid)? - cpu_before;
    let reload_peak_rss_mib = vm_mib(pid, "VmHWM")?;
    ensure!(
        out.status.success(),
        "p25ctl reload failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "  control: 1% diff reload {diff_reload_seconds:.3} s ({diff_reload_cpu_seconds:.3} s CPU), \
         peak RSS {reload_peak_rss_mib:.1} MiB"
    );

    // Single allows, observed through our own instance of p25_xdp over the pinned maps.
    let mut probe =
        Dataplane::open_pinned(&daemon.layout()).context("opening the daemon's pinned maps")?;
    let (mut verdict_ms, mut exit_ms) = (Vec::new(), Vec::new());
    let cpu_before = cpu_seconds(pid)?;
    for ip in set.probes.fresh_v4.iter().take(opts.allows) {
        let (v, e) = one_allow(&daemon, &mut probe, *ip, set.probes.mx_v4)?;
        verdict_ms.push(v);
        exit_ms.push(e);
    }
    drop(probe);
    let allow_daemon_cpu_ms =
        (cpu_seconds(pid)? - cpu_before) * 1e3 / verdict_ms.len().max(1) as f64;
    let allow_verdict_ms = Stats::of(&verdict_ms).context("no allow samples")?;
    eprintln!(
        "  control: p25ctl allow -> verdict {:.2} ms median",
        allow_verdict_ms.median
    );
    let peak_rss_mib = vm_mib(pid, "VmHWM")?;
    drop(daemon);
    drop(ns);
    Ok(Run {
        layout,
        policy_entries: set.subscribers.len() + set.allow.len(),
        policy_bytes,
        check_seconds,
        check_rss_mib,
        check_cpu_seconds,
        cold_seconds,
        cold_parse_and_load_seconds: since(spawned, loaded),
        cold_reconcile_seconds: since(loaded, in_force),
        cold_checked_at_seconds: loaded_ms("check_ms")?,
        cold_filled_at_seconds: loaded_ms("filled_ms")?,
        cold_verified_at_seconds: loaded_ms("verified_ms")?,
        cold_cpu_seconds,
        idle_rss_mib,
        diff_changed_entries,
        diff_reload_seconds,
        reload_peak_rss_mib,
        diff_reload_cpu_seconds,
        allow_verdict_ms,
        allow_ctl_exit_ms: Stats::of(&exit_ms).context("no allow samples")?,
        allow_daemon_cpu_ms,
        peak_rss_mib,
        cold_peak_rss_mib,
    })
}

/// One `p25ctl allow`: (ms until the verdict changed, ms until p25ctl exited).
fn one_allow(
    daemon: &Daemon,
    probe: &mut Dataplane,
    ip: Ipv4Addr,
    mx: Ipv4Addr,
) -> Result<(f64, f64)> {
    let frame = Pkt::tcp(IpAddr::V4(ip), 40_000, IpAddr::V4(mx), 25).build();
    let verdict = |probe: &mut Dataplane| -> Result<u32> {
        let opts = TestRunOptions {
            data_in: Some(&frame),
            ..TestRunOptions::default()
        };
        Ok(probe.xdp()?.test_run(opts)?.return_value)
    };
    ensure!(
        verdict(probe)? == XDP_DROP,
        "{ip} is not dropped before the allow; the probe address is wrong"
    );
    let prefix = format!("{ip}/32");
    let started = Instant::now();
    let mut child = daemon
        .ctl(&["allow", &prefix, "--comment", "p25-bench"])
        .spawn()
        .context("spawning p25ctl allow")?;
    // A test run takes microseconds: poll without sleeping, bounded in count and time.
    let mut changed = None;
    for _ in 0..50_000_000_u32 {
        if verdict(probe)? == XDP_PASS {
            changed = Some(started.elapsed());
            break;
        }
        if started.elapsed() > Duration::from_secs(30) {
            break;
        }
    }
    let status = child.wait()?;
    let exited = started.elapsed();
    ensure!(status.success(), "p25ctl allow {prefix} failed ({status})");
    let changed = changed.with_context(|| format!("the verdict for {ip} never changed"))?;
    Ok((changed.as_secs_f64() * 1e3, exited.as_secs_f64() * 1e3))
}
