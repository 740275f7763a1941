//! Observability, end to end with the real p25d in network namespaces: exact packet counts
//! on `/metrics` (checked by `promtool check metrics` and by a real Prometheus server),
//! offender tracking (`p25ctl top`, `p25ctl offenders`, one alert per burst, IPv6 /64
//! aggregation), and the rate-limited JSON event log.

use std::{
    io::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use filter_user::offenders::OffenderView;
use p25_tests::{
    daemon::DaemonLab,
    exporter::{METRICS_ADDR, metric, scrape},
    lab::{OUTSIDER4, SERVER4, SERVER6, SMTP, SUB4, SUB4_ALLOWED, Topology},
    netns::{Netns, wait_until},
    prometheus::{P25_METRICS, Prometheus},
    traffic::SynSender,
};
use serde_json::Value;

/// Not `lab_policy!`: the IPv6 subscriber prefix is a /48, wider than the /64 an offender
/// is grouped by, so that [`ipv6_rotation_inside_one_64_is_one_offender`] tells the two
/// apart.
const POLICY: &str = r"version: 1
interfaces:
  - name: r-sub
    role: subscriber
    attach: xdp
  - name: r-up
    role: upstream
    attach: tc
subscribers:
  - prefix: 100.64.1.0/24
  - prefix: 2001:db8:1::/48
allow:
  - prefix: 100.64.1.3/32
    comment: business customer
";

/// Time for counters, scans and scrapes to catch up.
const SETTLE: Duration = Duration::from_secs(15);
const POLL: Duration = Duration::from_millis(100);
/// Nobody answers at this address, so SYNs to it cause no replies to count as well.
const NOWHERE4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 99);

fn rsub(verdict: &'static str) -> [(&'static str, &'static str); 4] {
    [
        ("interface", "r-sub"),
        ("direction", "egress"),
        ("family", "ipv4"),
        ("verdict", verdict),
    ]
}

fn send_syns(sub: &Netns, src: Ipv4Addr, dst: SocketAddrV4, count: u16) -> Result<()> {
    let sender = SynSender::new(sub, src)?;
    for i in 0..count {
        sender.send(40_000 + i, dst)?;
    }
    Ok(())
}

fn top(lab: &DaemonLab) -> Result<Vec<OffenderView>> {
    lab.top(10)
}

fn promtool_accepts(metrics: &str) -> Result<()> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running promtool (install it with `cargo xtask setup`)")?;
    child
        .stdin
        .take()
        .context("promtool stdin")?
        .write_all(metrics.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "promtool check metrics rejected p25d's output: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// One subscriber sends 150 SYNs to port 25: every count is exact, on `/metrics`, in
/// `p25ctl stats`, in a real Prometheus, in `p25ctl top`, in the event log; one alert.
#[test]
fn a_150_syn_burst_is_counted_exactly_everywhere_and_alerts_once() -> Result<()> {
    const BLOCKED: u16 = 150;
    const ALLOWED: u16 = 40;
    const OUTSIDE: u16 = 30;

    let topology = Topology::build()?;
    let mut lab = DaemonLab::with_policy(&topology.router, POLICY)?;
    let events = lab.dir.join("events.jsonl");
    let events_arg = events.to_string_lossy().into_owned();
    lab.run_args(&["--events", &events_arg, "--offender-scan", "200ms"]);
    lab.start()?;
    let prometheus = Prometheus::builder(METRICS_ADDR)
        .netns(&topology.router)
        .job("p25")
        .interval(Duration::from_secs(1))
        .start()?;

    let sub = &topology.sub;
    send_syns(sub, SUB4, SocketAddrV4::new(SERVER4, SMTP), BLOCKED)?;
    send_syns(
        sub,
        SUB4_ALLOWED,
        SocketAddrV4::new(NOWHERE4, SMTP),
        ALLOWED,
    )?;
    send_syns(sub, OUTSIDER4, SocketAddrV4::new(NOWHERE4, SMTP), OUTSIDE)?;

    // Exact counts on /metrics, per interface and verdict.
    let mut text = String::new();
    let counted = wait_until(SETTLE, POLL, || {
        text = scrape(&topology.router)?;
        Ok(
            metric(&text, "p25_packets_total", &rsub("dropped")) == Some(f64::from(BLOCKED))
                && metric(&text, "p25_packets_total", &rsub("allowlisted"))
                    == Some(f64::from(ALLOWED))
                && metric(&text, "p25_packets_total", &rsub("passed")) == Some(f64::from(OUTSIDE)),
        )
    })?;
    ensure!(counted, "metrics never matched the packets sent:\n{text}");
    promtool_accepts(&text)?;
    // Everything served is documented: the dashboard and alert tests check against
    // P25_METRICS, plus the diagnostics that no dashboard panel needs.
    for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        let name = line.split_whitespace().nth(2).unwrap_or_default();
        ensure!(
            P25_METRICS.contains(&name)
                || [
                    "p25_events_written_total",
                    "p25_events_log_dropped_total",
                    "p25_offender_attempts",
                    "p25_reject_fallbacks_total",
                    "p25_allowlist_entries_not_inserted"
                ]
                .contains(&name),
            "undocumented metric {name}"
        );
    }

    // p25ctl stats agrees (summed over interfaces; nothing else dropped anywhere).
    let dropped: u64 = lab
        .stats()?
        .verdicts
        .iter()
        .filter(|v| v.name == "dropped")
        .map(|v| v.packets)
        .sum();
    ensure!(
        dropped == u64::from(BLOCKED),
        "p25ctl stats says {dropped} dropped"
    );

    // A real Prometheus server scraping p25d sees the same number through its query API.
    let query = r#"sum(p25_packets_total{job="p25",interface="r-sub",direction="egress",verdict="dropped"})"#;
    let seen = prometheus.wait_for_value(query, |v| v == f64::from(BLOCKED), SETTLE)?;
    ensure!(seen == f64::from(BLOCKED));

    // The offender is first in `p25ctl top` with exactly the attempts sent.
    let mut rows = Vec::new();
    let tracked = wait_until(SETTLE, POLL, || {
        rows = top(&lab)?;
        Ok(rows
            .first()
            .is_some_and(|r| r.attempts == u64::from(BLOCKED)))
    })?;
    ensure!(tracked, "p25ctl top: {rows:?}");
    let first = rows.first().context("no offender")?;
    ensure!(
        first.subscriber.to_string() == "100.64.1.2/32",
        "top offender {first:?}"
    );
    ensure!(
        first.last_destination.to_string() == format!("{SERVER4}:{SMTP}"),
        "{first:?}"
    );
    ensure!(
        rows.len() == 1,
        "only the blocked subscriber offends: {rows:?}"
    );
    let csv = lab.ctl_ok(&["offenders", "--since", "1h", "--format", "csv"])?;
    ensure!(
        csv.lines()
            .nth(1)
            .is_some_and(|l| l.starts_with("100.64.1.2/32,150,")),
        "p25ctl offenders csv:\n{csv}"
    );

    // Exactly one alert for the burst, in the log and in the metrics, even after more
    // scans have run.
    let alerted = wait_until(SETTLE, POLL, || {
        Ok(metric(&scrape(&topology.router)?, "p25_offender_alerts_total", &[]) == Some(1.0))
    })?;
    ensure!(alerted, "no offender alert:\n{}", lab.log());
    std::thread::sleep(Duration::from_millis(1000));
    let alerts = lab.log().matches("offender alert:").count();
    ensure!(alerts == 1, "{alerts} alerts logged:\n{}", lab.log());
    ensure!(
        lab.log().contains("subscriber=100.64.1.2/32"),
        "the alert names the subscriber:\n{}",
        lab.log()
    );

    // Event log: every blocked SYN was either emitted or suppressed by the kernel's rate
    // limit; every emitted one was written as a JSON line with the right fields.
    let mut emitted = 0.0;
    let written = wait_until(SETTLE, POLL, || {
        let text = scrape(&topology.router)?;
        emitted = metric(&text, "p25_events_total", &[("result", "emitted")]).unwrap_or(-1.0);
        let limited = metric(&text, "p25_events_total", &[("result", "rate_limited")]);
        let full = metric(&text, "p25_events_total", &[("result", "ring_full")]);
        let written = metric(&text, "p25_events_written_total", &[]);
        Ok(Some(emitted) == written
            && Some(emitted + limited.unwrap_or(0.0) + full.unwrap_or(0.0))
                == Some(f64::from(BLOCKED)))
    })?;
    ensure!(
        written,
        "event counters do not add up:\n{}",
        scrape(&topology.router)?
    );
    let log = std::fs::read_to_string(&events).context("reading the event log")?;
    let lines: Vec<Value> = log
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .context("event log line is not JSON")?;
    ensure!(
        lines.len() as f64 == emitted,
        "{} lines, {emitted} emitted",
        lines.len()
    );
    ensure!(emitted >= 1.0, "no event was emitted");
    for line in &lines {
        ensure!(
            line["src"] == SUB4.to_string()
                && line["dst"] == SERVER4.to_string()
                && line["dport"] == SMTP
                && line["verdict"] == "dropped"
                && line["direction"] == "egress"
                && line["interface"] == "r-sub"
                && line["hook"] == "xdp"
                && line["tcp_flags"] == 2
                && line["time"].as_str().is_some_and(|t| t.ends_with('Z')),
            "unexpected event {line}"
        );
    }
    Ok(())
}

/// A host that rotates its IPv6 address inside its /64 is still one offender.
#[test]
fn ipv6_rotation_inside_one_64_is_one_offender() -> Result<()> {
    let topology = Topology::build()?;
    let mut lab = DaemonLab::with_policy(&topology.router, POLICY)?;
    lab.run_args(&["--offender-scan", "200ms"]);
    lab.start()?;
    let sub = &topology.sub;
    let dst = SocketAddr::new(SERVER6.into(), SMTP);
    let sources: Vec<Ipv6Addr> = (0x100..0x108)
        .map(|host| Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0xa, 0xb, 0xc, host))
        .collect();
    for src in &sources {
        sub.ip(&["addr", "add", &format!("{src}/64"), "dev", "s0", "nodad"])?;
    }
    for src in &sources {
        // Well under the initial SYN retransmission timeout (1 s): one SYN per source.
        let attempt = sub.connect_from(IpAddr::V6(*src), None, dst, Duration::from_millis(300))?;
        ensure!(
            attempt.is_err(),
            "{src} reached port 25: it must be blocked"
        );
    }
    let mut rows = Vec::new();
    let tracked = wait_until(SETTLE, POLL, || {
        rows = top(&lab)?;
        Ok(rows.len() == 1
            && rows
                .first()
                .is_some_and(|r| r.attempts == sources.len() as u64))
    })?;
    ensure!(
        tracked,
        "expected one /64 offender with {} attempts: {rows:?}",
        sources.len()
    );
    let first = rows.first().context("no offender")?;
    ensure!(
        first.subscriber.to_string() == "2001:db8:1::/64",
        "{first:?}"
    );
    Ok(())
}

/// A flood cannot overwhelm the event log: the kernel emits at most the configured burst
/// plus rate, and counts the rest as rate-limited.
#[test]
fn drop_events_are_rate_limited_in_the_kernel() -> Result<()> {
    const FLOOD: u16 = 2_000;
    const RATE: f64 = 10.0;
    const BURST: f64 = 10.0;
    let topology = Topology::build()?;
    let mut lab = DaemonLab::with_policy(&topology.router, POLICY)?;
    let events = lab.dir.join("events.jsonl");
    let events_arg = events.to_string_lossy().into_owned();
    lab.run_args(&[
        "--events",
        &events_arg,
        "--events-rate",
        "10",
        "--events-burst",
        "10",
    ]);
    lab.start()?;
    let start = Instant::now();
    send_syns(&topology.sub, SUB4, SocketAddrV4::new(SERVER4, SMTP), FLOOD)?;
    let (mut emitted, mut limited) = (0.0, 0.0);
    let counted = wait_until(SETTLE, POLL, || {
        let text = scrape(&topology.router)?;
        emitted = metric(&text, "p25_events_total", &[("result", "emitted")]).unwrap_or(0.0);
        limited = metric(&text, "p25_events_total", &[("result", "rate_limited")]).unwrap_or(0.0);
        Ok(emitted + limited == f64::from(FLOOD))
    })?;
    let elapsed = start.elapsed().as_secs_f64();
    ensure!(counted, "{emitted} emitted + {limited} limited != {FLOOD}");
    // The per-CPU split rounds up, so allow one extra token per CPU and second.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let ceiling = BURST + cpus + (RATE + cpus) * (elapsed + 1.0);
    ensure!(
        emitted >= 1.0 && emitted <= ceiling,
        "{emitted} events emitted in {elapsed:.1} s (at most {ceiling:.0} allowed)"
    );
    ensure!(limited > 0.0, "nothing was rate-limited");
    Ok(())
}
