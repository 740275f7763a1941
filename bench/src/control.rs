//! The control plane at scale, with the real release `p25d` and `p25ctl`:
//!
//! - cold start: a fresh pin root and a 1.1M-entry policy (100k subscriber prefixes, 1M
//!   allowlist entries); time from spawning p25d to its "policy in force" log line, split
//!   at "dataplane loaded" (parse, validate, load and verify) and the reconcile after it;
//! - a 1% diff: the policy file rewritten with 1% of its entries changed, then
//!   `p25ctl reload`, which returns once the new policy is in the maps;
//! - one `p25ctl allow`: time from spawning p25ctl until a BPF_PROG_TEST_RUN of p25_xdp
//!   over the daemon's pinned maps turns from drop to pass, for a fresh subscriber address;
//! - peak RSS of the daemon (VmHWM).
//!
//! The daemon runs in a throwaway namespace, with its own pin root, socket and files;
//! everything is removed afterwards (the daemon itself leaves its pins on purpose).

use std::{
    collections::HashSet,
    fmt::Write as _,
    fs,
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result, ensure};
use aya::programs::{TestRun as _, TestRunOptions};
use filter_user::Dataplane;
use p25_tests::packet::Pkt;

use crate::{
    daemon::{Daemon, log_time, write_atomically},
    netns::{Netns, veth},
    scale::{self, PolicySet},
    stats::Stats,
};

/// Target: cold load and reconcile of the 1M-entry policy, seconds.
pub const TARGET_COLD_S: f64 = 2.0;
/// Target: one `p25ctl allow` until the verdict changes, milliseconds.
pub const TARGET_ALLOW_MS: f64 = 5.0;
/// Target: daemon peak RSS, MiB.
pub const TARGET_RSS_MIB: f64 = 64.0;

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

/// The whole section.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    /// Subscriber prefixes + allowlist entries in the policy.
    pub policy_entries: usize,
    /// Size of the policy file, bytes.
    pub policy_bytes: usize,
    /// Spawn to "policy in force", seconds.
    pub cold_seconds: f64,
    /// Spawn to "dataplane loaded" (read, parse, validate, load and verify), seconds.
    pub cold_parse_and_load_seconds: f64,
    /// "dataplane loaded" to "policy in force" (reconcile and attach), seconds.
    pub cold_reconcile_seconds: f64,
    /// Entries changed by the diff.
    pub diff_changed_entries: usize,
    /// `p25ctl reload` wall time with the 1% diff, seconds.
    pub diff_reload_seconds: f64,
    /// Spawn of `p25ctl allow` to the verdict change, ms.
    pub allow_verdict_ms: Stats,
    /// Spawn of `p25ctl allow` to its exit, ms.
    pub allow_ctl_exit_ms: Stats,
    /// Daemon peak RSS (VmHWM), MiB.
    pub peak_rss_mib: f64,
    /// Targets met.
    pub met_cold: bool,
    /// See above.
    pub met_allow: bool,
    /// See above.
    pub met_rss: bool,
}

impl Report {
    /// The section as text.
    pub fn render(&self) -> String {
        let ok = |b: bool| if b { "ok" } else { "MISS" };
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\nControl plane (release p25d/p25ctl, policy of {} entries, {:.1} MB of YAML)",
            self.policy_entries,
            self.policy_bytes as f64 / 1e6
        );
        let _ = writeln!(
            out,
            "cold load + reconcile      {:>9.3} s   (parse+load {:.3} s, reconcile {:.3} s)  target <= {TARGET_COLD_S} s {}",
            self.cold_seconds,
            self.cold_parse_and_load_seconds,
            self.cold_reconcile_seconds,
            ok(self.met_cold)
        );
        let _ = writeln!(
            out,
            "1% diff reload ({} entries) {:>8.3} s   (p25ctl reload, returns once applied)",
            self.diff_changed_entries, self.diff_reload_seconds
        );
        let _ = writeln!(
            out,
            "p25ctl allow -> verdict    {:>9.2} ms  median (min {:.2}, max {:.2}, n={}; p25ctl exit {:.2} ms)  target <= {TARGET_ALLOW_MS} ms {}",
            self.allow_verdict_ms.median,
            self.allow_verdict_ms.min,
            self.allow_verdict_ms.max,
            self.allow_verdict_ms.n,
            self.allow_ctl_exit_ms.median,
            ok(self.met_allow)
        );
        let _ = writeln!(
            out,
            "p25d peak RSS (VmHWM)      {:>9.1} MiB  target <= {TARGET_RSS_MIB} MiB {}",
            self.peak_rss_mib,
            ok(self.met_rss)
        );
        out
    }
}

fn since(from: SystemTime, to: SystemTime) -> f64 {
    to.duration_since(from).map_or(0.0, |d| d.as_secs_f64())
}

fn vm_hwm_mib(pid: u32) -> Result<f64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmHWM")?;
    Ok(kib / 1024.0)
}

/// Runs the section.
pub fn run(opts: &Options, set: &PolicySet) -> Result<Report> {
    let ns = Netns::new("cp")?;
    veth(&ns, "cp0", &ns, "cp1")?;
    let text = scale::yaml(set, "cp0", &HashSet::new());

    // Cold start.
    let mut daemon = Daemon::start(&opts.bin_dir, &ns, "cp", &text)?;
    let spawned = daemon.spawned;
    let log = daemon.wait_for_log("ready", Duration::from_secs(300))?;
    let loaded = log_time(&log, "dataplane loaded").context("no 'dataplane loaded' line")?;
    let in_force = log_time(&log, "policy in force").context("no 'policy in force' line")?;
    let cold_seconds = since(spawned, in_force);
    eprintln!("  control: cold load + reconcile {cold_seconds:.3} s");

    // 1% diff.
    let (changed_set, toggled, diff_changed_entries) = scale::one_percent_diff(set, 0xD1FF)?;
    write_atomically(
        &daemon.policy(),
        &scale::yaml(&changed_set, "cp0", &toggled),
    )?;
    let started = Instant::now();
    let out = daemon.ctl(&["reload"]).output().context("p25ctl reload")?;
    let diff_reload_seconds = started.elapsed().as_secs_f64();
    ensure!(
        out.status.success(),
        "p25ctl reload failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("  control: 1% diff reload {diff_reload_seconds:.3} s");

    // Single allows, observed through our own instance of p25_xdp over the pinned maps.
    let mut probe =
        Dataplane::open_pinned(&daemon.layout()).context("opening the daemon's pinned maps")?;
    let (mut verdict_ms, mut exit_ms) = (Vec::new(), Vec::new());
    for ip in set.probes.fresh_v4.iter().take(opts.allows) {
        let (v, e) = one_allow(&daemon, &mut probe, *ip, set.probes.mx_v4)?;
        verdict_ms.push(v);
        exit_ms.push(e);
    }
    drop(probe);
    let allow_verdict_ms = Stats::of(&verdict_ms).context("no allow samples")?;
    eprintln!(
        "  control: p25ctl allow -> verdict {:.2} ms median",
        allow_verdict_ms.median
    );
    let peak_rss_mib = vm_hwm_mib(daemon.pid().context("p25d not running")?)?;
    drop(daemon);
    drop(ns);
    Ok(Report {
        policy_entries: set.subscribers.len() + set.allow.len(),
        policy_bytes: text.len(),
        cold_seconds,
        cold_parse_and_load_seconds: since(spawned, loaded),
        cold_reconcile_seconds: since(loaded, in_force),
        diff_changed_entries,
        diff_reload_seconds,
        met_allow: allow_verdict_ms.median <= TARGET_ALLOW_MS,
        allow_verdict_ms,
        allow_ctl_exit_ms: Stats::of(&exit_ms).context("no allow samples")?,
        met_cold: cold_seconds <= TARGET_COLD_S,
        met_rss: peak_rss_mib <= TARGET_RSS_MIB,
        peak_rss_mib,
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
