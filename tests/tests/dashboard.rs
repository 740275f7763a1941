//! The Grafana dashboard (deploy/grafana/p25.json), checked by the real Prometheus: every
//! PromQL expression of every panel, and every template variable's series selector, is run
//! against a Prometheus server scraping a p25d in the lab while it filters traffic of
//! every kind the dashboard shows (dropped, allowlisted, monitor-mode would-drop, an
//! offender alert, drop events, a rejected reload). Each must parse and return data.
//!
//! Grafana's variables are replaced as Grafana would for "All": `$instance` and
//! `$interface` by `.*`, `$__rate_interval` by four scrape intervals (Grafana's rule).
#![expect(
    clippy::indexing_slicing,
    reason = "serde_json's Value index returns Null for a missing key; it never panics"
)]

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};
use p25_tests::{
    daemon::DaemonLab,
    exporter::METRICS_ADDR,
    lab::{POLICY_HEAD, SERVER4, SMTP, SUB4, SUB4_ALLOWED, Topology},
    netns::wait_until,
    prometheus::{Prometheus, dashboard_panels, label_values_selector},
    traffic::SynSender,
};
use serde_json::Value;

/// Enforced subscribers, a monitor-mode part of them, one allowlisted business.
fn policy() -> String {
    format!(
        "{POLICY_HEAD}subscribers:
  - prefix: 100.64.1.0/24
  - prefix: 100.64.1.128/25
    mode: monitor
allow:
  - prefix: 100.64.1.3/32
    comment: business customer
"
    )
}

/// A subscriber inside the monitor-mode prefix.
const MONITORED4: Ipv4Addr = Ipv4Addr::new(100, 64, 1, 200);
/// Nobody answers at this address, so SYNs to it cause no replies.
const NOWHERE4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 99);
const SCRAPE: Duration = Duration::from_secs(1);
/// Grafana's `$__rate_interval` is at least four scrape intervals.
const RATE_INTERVAL: &str = "4s";
/// Panels that must show more than zero with the lab's traffic, not only a series: the
/// traffic of each kind reaches the panel made for it.
const NONZERO: &[&str] = &[
    "panel \"Dropped by direction and family\"",
    "panel \"Dropped bytes by direction and family\"",
    "panel \"Would drop (monitor mode)\"",
    "panel \"Allowlisted\"",
    "panel \"Dropped by interface\"",
    "panel \"Offenders\"",
    "panel \"Reload failures (24h)\"",
    "panel \"Allowlist entries\"",
    "panel \"Subscriber prefixes\"",
    "panel \"Hooks\"",
];

/// Time for every panel to have data: a few scrapes after the traffic.
const SETTLE: Duration = Duration::from_secs(45);

/// The dashboard's queries with Grafana's variables substituted, by panel title.
fn queries() -> Result<Vec<(String, String)>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/p25.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let dashboard: Value = serde_json::from_str(&text)?;
    let mut out = Vec::new();
    for panel in dashboard_panels(&dashboard) {
        let title = panel["title"].as_str().unwrap_or("?").to_owned();
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"]
                .as_str()
                .with_context(|| format!("panel {title:?}: target without expr"))?;
            out.push((format!("panel {title:?}"), substitute(expr)?));
        }
    }
    for var in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|var| var["type"] == "query")
    {
        let query = var["query"]["query"]
            .as_str()
            .or_else(|| var["query"].as_str())
            .with_context(|| format!("variable {} has no query", var["name"]))?;
        out.push((
            format!("variable {}", var["name"]),
            substitute(&label_values_selector(query)?)?,
        ));
    }
    ensure!(!out.is_empty(), "no queries in {}", path.display());
    Ok(out)
}

/// Replaces Grafana's variables as for the "All" choice; fails on any other variable.
fn substitute(expr: &str) -> Result<String> {
    let expr = expr
        .replace("$__rate_interval", RATE_INTERVAL)
        .replace("$instance", ".*")
        .replace("$interface", ".*");
    ensure!(
        !expr.contains('$'),
        "{expr:?} uses a Grafana variable this test does not know"
    );
    Ok(expr)
}

#[test]
fn variables_are_substituted_like_grafana_all() -> Result<()> {
    assert_eq!(
        substitute(r#"rate(x{instance=~"$instance"}[$__rate_interval])"#)?,
        r#"rate(x{instance=~".*"}[4s])"#
    );
    ensure!(substitute("x{a=\"$other\"}").is_err());
    Ok(())
}

fn send_syns(sender: &SynSender, dst: SocketAddrV4, count: u16) -> Result<()> {
    for i in 0..count {
        sender.send(40_000 + i, dst)?;
    }
    Ok(())
}

#[test]
fn every_dashboard_query_parses_and_returns_data_in_the_lab() -> Result<()> {
    let queries = queries()?;
    for panel in NONZERO {
        ensure!(
            queries.iter().any(|(what, _)| what == panel),
            "the dashboard has no {panel}"
        );
    }
    let topology = Topology::build()?;
    topology.sub.add_addr("s0", &format!("{MONITORED4}/24"))?;
    let mut lab = DaemonLab::new(&topology.router)?;
    lab.write_policy(&policy())?;
    lab.run_args(&["--alert-threshold", "20", "--offender-scan", "200ms"]);
    lab.start()?;
    let prometheus = Prometheus::builder(METRICS_ADDR)
        .netns(&topology.router)
        .job("p25")
        .interval(SCRAPE)
        .start()?;

    // A parse error fails at once, before any traffic: no waiting can fix it.
    for (what, expr) in &queries {
        prometheus
            .query_vector(expr)
            .with_context(|| format!("{what}: Prometheus rejects {expr:?}"))?;
    }

    // Counters must be seen at zero first, or `increase()` cannot see them go up.
    prometheus.wait_for_value(
        r#"count(p25_policy_reloads_total{job="p25"})"#,
        |v| v >= 1.0,
        SETTLE,
    )?;
    std::thread::sleep(SCRAPE * 2);

    // Traffic of every kind the dashboard shows, and a rejected reload.
    let smtp = SocketAddrV4::new(SERVER4, SMTP);
    let nowhere = SocketAddrV4::new(NOWHERE4, SMTP);
    send_syns(&SynSender::new(&topology.sub, SUB4)?, smtp, 50)?;
    send_syns(&SynSender::new(&topology.sub, SUB4_ALLOWED)?, nowhere, 20)?;
    send_syns(&SynSender::new(&topology.sub, MONITORED4)?, nowhere, 20)?;
    lab.write_policy("version: 1\nsubscribers: [ this is not yaml\n")?;
    let rejected = wait_until(Duration::from_secs(15), Duration::from_millis(100), || {
        Ok(prometheus
            .query(r#"sum(p25_policy_reloads_total{result="failure"})"#)?
            .is_some_and(|v| v >= 1.0))
    })?;
    ensure!(
        rejected,
        "the broken policy was never counted as a failed reload"
    );
    lab.write_policy(&policy())?;

    let mut empty = Vec::new();
    let (blocked, allowed, monitored) = (
        SynSender::new(&topology.sub, SUB4)?,
        SynSender::new(&topology.sub, SUB4_ALLOWED)?,
        SynSender::new(&topology.sub, MONITORED4)?,
    );
    let all_data = wait_until(SETTLE, Duration::from_millis(500), || {
        // Traffic keeps flowing, so that rates over the short window stay non-zero.
        send_syns(&blocked, smtp, 5)?;
        send_syns(&allowed, nowhere, 5)?;
        send_syns(&monitored, nowhere, 5)?;
        empty.clear();
        for (what, expr) in &queries {
            let series = prometheus.query_vector(expr)?;
            if series.is_empty() {
                empty.push(format!("{what}: no data: {expr}"));
            } else if NONZERO.contains(&what.as_str()) && !series.iter().any(|(_, v)| *v > 0.0) {
                empty.push(format!("{what}: only zeros {series:?}: {expr}"));
            }
        }
        Ok(empty.is_empty())
    })?;
    if !all_data {
        bail!(
            "after {SETTLE:?} of traffic these dashboard queries still show nothing:\n{}\n\
             --- p25d log ---\n{}",
            empty.join("\n"),
            lab.log()
        );
    }
    p25_tests::summary!(
        "dashboard: {} queries parsed by Prometheus, every one returns data in the lab",
        queries.len()
    );
    Ok(())
}
