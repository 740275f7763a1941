//! The monitoring artefacts in deploy/: alert rules (checked and unit-tested with
//! promtool), the example Prometheus configuration, and the Grafana dashboard (parsed, and
//! every PromQL expression in it checked against the exporter's metric names). Also proves
//! that the [`p25_tests::prometheus`] helper runs a real Prometheus that scrapes a target,
//! on the host's loopback and inside a network namespace.
//!
//! promtool and prometheus come from the Debian package `prometheus`, which
//! `cargo xtask setup` installs. Without them these tests fail: they never skip.

#![expect(
    clippy::indexing_slicing,
    reason = "only serde_json/serde_yaml `Value[key]`, which yields Null for a missing key \
              instead of panicking; the checks then fail with a message"
)]

use std::{
    collections::BTreeSet,
    io::{ErrorKind, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use p25_tests::{
    netns::Netns,
    prometheus::{P25_METRICS, Prometheus, dashboard_panels, label_values_selector},
};
use serde_json::Value;

/// Prometheus' own per-target metric, allowed in the dashboard besides the exporter's.
const PROMETHEUS_METRICS: &[&str] = &["up"];

/// PromQL functions and aggregations the dashboard and rules may use. A name outside this
/// list is an error rather than a guess, so a typo cannot pass as a metric name.
const FUNCTIONS: &[&str] = &[
    "abs",
    "absent",
    "avg",
    "avg_over_time",
    "bottomk",
    "ceil",
    "changes",
    "clamp_max",
    "clamp_min",
    "count",
    "delta",
    "deriv",
    "floor",
    "histogram_quantile",
    "idelta",
    "increase",
    "irate",
    "label_replace",
    "last_over_time",
    "max",
    "max_over_time",
    "min",
    "min_over_time",
    "rate",
    "resets",
    "round",
    "scalar",
    "sort",
    "sort_desc",
    "sum",
    "sum_over_time",
    "time",
    "timestamp",
    "topk",
    "vector",
];

/// Keywords that take a parenthesised list of label names.
const LABEL_LIST_KEYWORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// Other bare words that are not metric names.
const KEYWORDS: &[&str] = &[
    "and", "or", "unless", "offset", "bool", "inf", "nan", "atan2",
];

/// How long a scrape of the fake exporter may take to show up: with a 1 s interval this
/// is a handful of scrapes, with margin for a loaded machine.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(60);

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from(".."), Path::to_owned)
}

fn deploy(path: &str) -> PathBuf {
    workspace_root().join("deploy").join(path)
}

/// Runs promtool in the workspace root and returns its output; fails with both streams
/// on a non-zero exit, and with a pointer to `cargo xtask setup` when it is missing.
fn promtool(args: &[&str]) -> Result<String> {
    let output = Command::new("promtool")
        .args(args)
        .current_dir(workspace_root())
        .stdin(Stdio::null())
        .output();
    let output = match output {
        Ok(output) => output,
        Err(error) if error.kind() == ErrorKind::NotFound => bail!(
            "promtool is not installed ({error}): run `cargo xtask setup`, which installs \
             the Debian package prometheus"
        ),
        Err(error) => return Err(error).context("running promtool"),
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    ensure!(
        output.status.success(),
        "`promtool {}` failed ({}):\n{text}",
        args.join(" "),
        output.status
    );
    Ok(text)
}

#[test]
fn alert_rules_pass_promtool_check() -> Result<()> {
    let out = promtool(&["check", "rules", "deploy/prometheus/alerts.yml"])?;
    ensure!(
        out.contains("SUCCESS"),
        "unexpected promtool output:\n{out}"
    );
    Ok(())
}

/// alerts_test.yml: every rule fires on the input series meant to trigger it, and stays
/// silent on the ones that must not (a healthy router, a quiet router, a steady high
/// rate, a successful reload, an XDP-to-TC fallback).
#[test]
fn alert_rules_unit_tests_pass() -> Result<()> {
    let out = promtool(&["test", "rules", "deploy/prometheus/alerts_test.yml"])?;
    ensure!(
        out.contains("SUCCESS"),
        "unexpected promtool output:\n{out}"
    );
    Ok(())
}

/// The example configuration is valid and finds alerts.yml (promtool checks offline: it
/// does not contact the target).
#[test]
fn example_prometheus_config_is_valid() -> Result<()> {
    let out = promtool(&["check", "config", "deploy/prometheus/prometheus.yml"])?;
    ensure!(
        out.contains("is valid prometheus config file") && out.contains("SUCCESS: 1 rule files"),
        "unexpected promtool output:\n{out}"
    );
    Ok(())
}

fn read_yaml(path: &Path) -> Result<serde_yaml::Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_yaml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// The alerting rules of alerts.yml as (name, expr, rule).
fn alert_rules() -> Result<Vec<(String, String, serde_yaml::Value)>> {
    let rules = read_yaml(&deploy("prometheus/alerts.yml"))?;
    let mut out = Vec::new();
    for group in rules["groups"].as_sequence().context("no groups")? {
        for rule in group["rules"]
            .as_sequence()
            .context("group without rules")?
        {
            let Some(name) = rule["alert"].as_str() else {
                continue;
            };
            let expr = rule["expr"]
                .as_str()
                .with_context(|| format!("{name}: no expr"))?;
            out.push((name.to_owned(), expr.to_owned(), rule.clone()));
        }
    }
    ensure!(!out.is_empty(), "alerts.yml has no alerting rules");
    Ok(out)
}

/// Guards the unit tests themselves: promtool only checks the cases that exist, so a new
/// rule without a case (or with only "must not fire" cases) would pass unnoticed.
#[test]
fn every_alert_rule_has_a_firing_case_and_annotations() -> Result<()> {
    let tests = read_yaml(&deploy("prometheus/alerts_test.yml"))?;
    let mut fired = BTreeSet::new();
    for case in tests["tests"].as_sequence().context("no tests")? {
        for check in case["alert_rule_test"].as_sequence().into_iter().flatten() {
            let has_alerts = check["exp_alerts"]
                .as_sequence()
                .is_some_and(|alerts| !alerts.is_empty());
            if let (true, Some(name)) = (has_alerts, check["alertname"].as_str()) {
                fired.insert(name.to_owned());
            }
        }
    }
    for (name, _, rule) in alert_rules()? {
        ensure!(
            fired.contains(&name),
            "alert {name} has no case in alerts_test.yml where it fires"
        );
        ensure!(
            matches!(
                rule["labels"]["severity"].as_str(),
                Some("critical" | "warning" | "info")
            ),
            "alert {name} needs a severity label (critical, warning or info)"
        );
        for key in ["summary", "description"] {
            ensure!(
                rule["annotations"][key]
                    .as_str()
                    .is_some_and(|text| text.contains("{{ $labels.instance }}")),
                "alert {name}: annotation {key} missing or does not name the instance"
            );
        }
    }
    Ok(())
}

#[test]
fn alert_rules_use_only_exporter_metrics() -> Result<()> {
    for (name, expr, _) in alert_rules()? {
        check_known_metrics(&expr).with_context(|| format!("alert {name}"))?;
    }
    Ok(())
}

/// Every `datasource` object under `value` (panels, targets, variables).
fn datasources<'v>(value: &'v Value, out: &mut Vec<&'v Value>) {
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                if key == "datasource" {
                    out.push(child);
                } else {
                    datasources(child, out);
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|item| datasources(item, out)),
        _ => {}
    }
}

#[test]
fn grafana_dashboard_is_valid_and_uses_only_exporter_metrics() -> Result<()> {
    let path = deploy("grafana/p25.json");
    let text = std::fs::read_to_string(&path)?;
    let dashboard: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;

    // Importable: the data source is an input, and every reference goes through it.
    let inputs = dashboard["__inputs"].as_array().context("no __inputs")?;
    ensure!(
        inputs.iter().any(|input| input["name"] == "DS_PROMETHEUS"
            && input["type"] == "datasource"
            && input["pluginId"] == "prometheus"),
        "__inputs must declare the DS_PROMETHEUS Prometheus data source"
    );
    let mut sources = Vec::new();
    datasources(&dashboard, &mut sources);
    ensure!(!sources.is_empty(), "no datasource references");
    for source in sources {
        ensure!(
            source["uid"] == "${DS_PROMETHEUS}" && source["type"] == "prometheus",
            "datasource {source} must be {{\"type\": \"prometheus\", \"uid\": \"${{DS_PROMETHEUS}}\"}}"
        );
    }
    ensure!(
        dashboard["uid"].as_str().is_some_and(|uid| !uid.is_empty())
            && dashboard["title"].as_str().is_some(),
        "the dashboard needs a uid and a title"
    );

    let all = dashboard_panels(&dashboard);
    let mut ids = BTreeSet::new();
    let mut used = BTreeSet::new();
    let mut exprs = 0;
    for panel in &all {
        let title = panel["title"].as_str().unwrap_or("?");
        let id = panel["id"]
            .as_u64()
            .with_context(|| format!("panel {title:?} has no id"))?;
        ensure!(ids.insert(id), "panel id {id} is used twice");
        ensure!(
            panel["gridPos"]["w"].is_u64() && panel["gridPos"]["h"].is_u64(),
            "panel {title:?} has no gridPos"
        );
        if panel["type"] == "row" {
            continue;
        }
        let targets = panel["targets"].as_array().map_or(&[][..], Vec::as_slice);
        ensure!(!targets.is_empty(), "panel {title:?} has no query");
        for target in targets {
            let expr = target["expr"]
                .as_str()
                .with_context(|| format!("panel {title:?}: target without expr"))?;
            used.extend(check_known_metrics(expr).with_context(|| format!("panel {title:?}"))?);
            exprs += 1;
        }
    }
    for var in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if var["type"] != "query" {
            continue;
        }
        let query = var["query"]["query"]
            .as_str()
            .or_else(|| var["query"].as_str())
            .with_context(|| format!("variable {} has no query", var["name"]))?;
        used.extend(
            check_known_metrics(&label_values_selector(query)?)
                .with_context(|| format!("variable {}", var["name"]))?,
        );
    }
    // Renaming a metric must touch the dashboard: every one of them is shown somewhere.
    let unused: Vec<_> = P25_METRICS
        .iter()
        .filter(|name| !used.contains(**name))
        .collect();
    ensure!(unused.is_empty(), "the dashboard never shows {unused:?}");
    p25_tests::summary!(
        "dashboard: {} panels, {exprs} queries, {} metrics, all known",
        all.len(),
        used.len()
    );
    Ok(())
}

/// Fails unless every metric name in `expr` is the exporter's (or `up`); returns them.
fn check_known_metrics(expr: &str) -> Result<BTreeSet<String>> {
    let names = metric_names(expr)?;
    for name in &names {
        ensure!(
            P25_METRICS.contains(&name.as_str()) || PROMETHEUS_METRICS.contains(&name.as_str()),
            "{expr:?} uses {name:?}, which is not one of the exporter's metrics {P25_METRICS:?}"
        );
    }
    Ok(names)
}

/// The metric names a PromQL expression selects, found lexically: strings, label
/// matchers `{...}`, ranges `[...]`, `by (...)`-style label lists, numbers, durations and
/// Grafana variables are skipped; a word followed by `(` must be a known function; any
/// other word that is not a keyword or function is a metric name.
fn metric_names(expr: &str) -> Result<BTreeSet<String>> {
    ensure!(
        !expr.contains("__name__"),
        "{expr:?}: select metrics by name, not through __name__, so they can be checked"
    );
    let chars: Vec<char> = expr.chars().collect();
    let at = |i: usize| chars.get(i).copied();
    let mut names = BTreeSet::new();
    let mut i = 0;
    // Each round consumes at least one character.
    while let Some(c) = at(i) {
        if c == '"' || c == '\'' || c == '`' {
            i = skip_string(&chars, i)?;
        } else if c == '{' || c == '[' {
            i = skip_group(&chars, i, expr)?;
        } else if c == '$' {
            // Grafana variable: $name or ${name}.
            i += 1;
            if at(i) == Some('{') {
                i = skip_group(&chars, i, expr)?;
            } else {
                while at(i).is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                    i += 1;
                }
            }
        } else if c.is_ascii_digit() || c == '.' {
            // Numbers, durations (5m, 1h30m), hex and exponents.
            while at(i).is_some_and(|c| c.is_ascii_alphanumeric() || c == '.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while at(i).is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
                i += 1;
            }
            let word: String = chars.get(start..i).unwrap_or_default().iter().collect();
            let mut next = i;
            while at(next).is_some_and(char::is_whitespace) {
                next += 1;
            }
            let lower = word.to_ascii_lowercase();
            if LABEL_LIST_KEYWORDS.contains(&lower.as_str()) {
                if at(next) == Some('(') {
                    i = skip_group(&chars, next, expr)?;
                }
            } else if FUNCTIONS.contains(&word.as_str()) {
                // A function, or an aggregation (`sum by (x) (...)` has no `(` right after
                // `sum`); either way not a metric.
            } else if at(next) == Some('(') {
                bail!("{expr:?}: unknown function {word:?}");
            } else if !KEYWORDS.contains(&lower.as_str()) {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    Ok(names)
}

/// Index just past the string literal starting at `start`.
fn skip_string(chars: &[char], start: usize) -> Result<usize> {
    let quote = chars.get(start).copied();
    let mut i = start + 1;
    while let Some(c) = chars.get(i).copied() {
        if c == '\\' && quote != Some('`') {
            i += 2;
        } else if Some(c) == quote {
            return Ok(i + 1);
        } else {
            i += 1;
        }
    }
    bail!("unterminated string")
}

/// Index just past the bracketed group (`{}`, `[]` or `()`) opening at `start`, skipping
/// strings inside it.
fn skip_group(chars: &[char], start: usize, expr: &str) -> Result<usize> {
    let open = chars.get(start).copied();
    let close = match open {
        Some('{') => '}',
        Some('[') => ']',
        Some('(') => ')',
        _ => bail!("{expr:?}: no group at {start}"),
    };
    let mut i = start + 1;
    while let Some(c) = chars.get(i).copied() {
        if c == '"' || c == '\'' || c == '`' {
            i = skip_string(chars, i)?;
        } else if c == close {
            return Ok(i + 1);
        } else {
            i += 1;
        }
    }
    bail!("{expr:?}: unbalanced {open:?}")
}

/// The checker itself: it must find names wherever they hide, and only names.
#[test]
fn metric_name_extraction() -> Result<()> {
    let names =
        |expr: &str| -> Result<Vec<String>> { Ok(metric_names(expr)?.into_iter().collect()) };
    assert_eq!(
        names(
            r#"sum by (direction, family) (rate(p25_packets_total{verdict="dropped", instance=~"$instance"}[$__rate_interval]))"#
        )?,
        ["p25_packets_total"]
    );
    assert_eq!(
        names("time() - p25_last_sync_timestamp_seconds > 180 and on(instance) up == 1 offset 5m")?,
        ["p25_last_sync_timestamp_seconds", "up"]
    );
    assert_eq!(
        names(r#"sum(x{a="}{"}) / sum without (b) (y[1h:5m]) or vector(0)"#)?,
        ["x", "y"]
    );
    assert!(
        names("rat(p25_packets_total[5m])").is_err(),
        "unknown function"
    );
    assert!(names(r#"{__name__="p25_packets_total"}"#).is_err());
    assert!(
        check_known_metrics("rate(p25_packet_total[5m])").is_err(),
        "typo"
    );
    assert_eq!(
        label_values_selector(r#"label_values(p25_build_info{job="p25"}, instance)"#)?,
        r#"p25_build_info{job="p25"}"#
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The Prometheus helper, against a fake exporter
// ---------------------------------------------------------------------------------------

/// The fake exporter's whole exposition.
const DEMO_EXPOSITION: &str = "# HELP p25_demo_total A fixed value for the helper test.\n\
                               # TYPE p25_demo_total counter\n\
                               p25_demo_total 7\n";

/// Longest a fake exporter serves, in case its owner never stops it.
const EXPORTER_LIFETIME: Duration = Duration::from_secs(300);
/// How long the exporter's accept loop sleeps when no connection is waiting.
const ACCEPT_POLL: Duration = Duration::from_millis(20);

/// Serves [`DEMO_EXPOSITION`] over HTTP to every request, from a thread, until dropped.
struct StaticExporter {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl StaticExporter {
    /// Starts serving on a listener bound by the caller (in whatever namespace).
    fn spawn(listener: TcpListener) -> Result<Self> {
        let addr = listener.local_addr()?;
        // Non-blocking accept, so the thread notices `stop` without a connection.
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = thread::spawn({
            let stop = Arc::clone(&stop);
            move || serve(&listener, &stop)
        });
        Ok(Self {
            addr,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for StaticExporter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(listener: &TcpListener, stop: &AtomicBool) {
    let deadline = Instant::now() + EXPORTER_LIFETIME;
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        match listener.accept() {
            Ok((mut stream, _)) => {
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
                // Read the request header (bounded); its content does not matter.
                let mut request = Vec::new();
                let mut buf = [0_u8; 1024];
                while request.len() < 64 * 1024 && !request.ends_with(b"\r\n\r\n") {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(buf.get(..n).unwrap_or_default()),
                    }
                }
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{DEMO_EXPOSITION}",
                    DEMO_EXPOSITION.len()
                );
            }
            Err(error) if error.kind() == ErrorKind::WouldBlock => thread::sleep(ACCEPT_POLL),
            Err(_) => thread::sleep(ACCEPT_POLL),
        }
    }
}

/// Scrapes the fake exporter and reads the value back through the query API.
fn assert_scrapes_demo(prom: &Prometheus<'_>) -> Result<()> {
    prom.wait_for_value(r#"up{job="p25"}"#, |v| v == 1.0, SCRAPE_TIMEOUT)?;
    let value = prom.wait_for_value("p25_demo_total", |v| v == 7.0, SCRAPE_TIMEOUT)?;
    ensure!(value == 7.0, "p25_demo_total is {value}");
    // Labels come back too, and a query for nothing is None rather than an error.
    let series = prom.query_vector("p25_demo_total")?;
    ensure!(
        series.len() == 1
            && series
                .first()
                .is_some_and(|(labels, _)| labels.get("job").map(String::as_str) == Some("p25")),
        "unexpected series {series:?}"
    );
    ensure!(prom.query("p25_no_such_metric")?.is_none());
    ensure!(
        prom.query("sum(rate(").is_err(),
        "a bad query must be an error"
    );
    Ok(())
}

#[test]
fn prometheus_helper_scrapes_on_host_loopback() -> Result<()> {
    let exporter = StaticExporter::spawn(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?)?;
    let prom = Prometheus::builder(exporter.addr)
        .rule_file(deploy("prometheus/alerts.yml"))
        .start()?;
    let dir = prom.dir().to_owned();
    assert_scrapes_demo(&prom)?;
    // The rules load in a real server too, and a healthy target does not trip them.
    ensure!(
        prom.query(r#"ALERTS{alertname="P25DaemonDown"}"#)?
            .is_none(),
        "P25DaemonDown fired for a healthy target"
    );
    drop(prom);
    ensure!(!dir.exists(), "{} was not removed", dir.display());
    Ok(())
}

/// The same inside a network namespace: Prometheus is started through nsenter and the
/// helper's HTTP client connects from inside the namespace.
#[test]
fn prometheus_helper_scrapes_inside_a_netns() -> Result<()> {
    p25_tests::require_root();
    let netns = Netns::new("prom")?;
    let listener = netns.enter(|| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))??;
    let exporter = StaticExporter::spawn(listener)?;
    let prom = Prometheus::builder(exporter.addr).netns(&netns).start()?;
    assert_scrapes_demo(&prom)?;
    // The API is on the namespace's loopback, not the host's.
    ensure!(
        std::net::TcpStream::connect_timeout(&prom.api_addr(), Duration::from_secs(1)).is_err(),
        "prometheus in {} is reachable from the host namespace",
        netns.name()
    );
    Ok(())
}
