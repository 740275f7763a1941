//! A real Prometheus server for tests: scrapes one target, on the host's loopback or
//! inside a [`Netns`], and answers PromQL queries through its HTTP API.
//!
//! ```no_run
//! # fn demo() -> anyhow::Result<()> {
//! use std::time::Duration;
//! use p25_tests::prometheus::Prometheus;
//!
//! let prom = Prometheus::builder("127.0.0.1:9725".parse()?).start()?;
//! prom.wait_for_value("up", |v| v == 1.0, Duration::from_secs(30))?;
//! let dropped = prom.query(r#"sum(p25_packets_total{verdict="dropped"})"#)?;
//! # let _ = dropped; Ok(()) }
//! ```
//!
//! Each server gets its own scratch directory (config, TSDB, log), a free port on
//! 127.0.0.1 and a 1 s scrape and rule-evaluation interval. Dropping it kills the process
//! and removes the directory, also when the test fails.
//!
//! HTTP is spoken with std's `TcpStream` (HTTP/1.0, one request per connection) rather
//! than a client crate or curl: everything is plain HTTP on loopback, and the socket has
//! to be created *inside* the network namespace when Prometheus runs in one, which
//! [`Netns::enter`] does for a std socket but which no HTTP client crate supports, and
//! curl would need nsenter plus another package. HTTP/1.0 also means the server answers
//! without chunked transfer encoding, so the body is simply everything after the header.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs::{self, File},
    io::{self, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::Value;

use crate::netns::{Netns, wait_until};

/// Every metric p25d's exporter serves (issue 4). The dashboard and alert-rule tests check
/// that they use no other name, so that they cannot drift from the exporter.
pub const P25_METRICS: &[&str] = &[
    "p25_packets_total",
    "p25_bytes_total",
    "p25_parse_outcomes_total",
    "p25_policy_reloads_total",
    "p25_policy_generation",
    "p25_policy_revision",
    "p25_policy_source_up",
    "p25_policy_source_errors_total",
    "p25_last_sync_timestamp_seconds",
    "p25_allowlist_entries",
    "p25_subscriber_prefixes",
    "p25_offenders",
    "p25_offender_alerts_total",
    "p25_events_total",
    "p25_interface_attached",
    "p25_build_info",
];

/// How long Prometheus gets to become ready. It usually takes well under a second; the
/// margin is for a loaded 2-core CI machine replaying nothing (fresh TSDB).
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How often readiness and query conditions are polled.
const POLL: Duration = Duration::from_millis(200);
/// Connect, read and write timeout of one HTTP request.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest HTTP response read; query results in tests are tiny.
const MAX_RESPONSE: u64 = 16 << 20;
/// Attempts at starting on a free port: the port is picked by binding port 0 and closing
/// the socket, so on the host another process can take it before Prometheus binds it.
const START_ATTEMPTS: usize = 3;
/// Bytes of Prometheus' log quoted in an error.
const LOG_TAIL: usize = 4000;

static NEXT_DIR: AtomicU32 = AtomicU32::new(0);

/// What to start: see [`Prometheus::builder`].
#[derive(Debug, Clone)]
pub struct Builder<'a> {
    netns: Option<&'a Netns>,
    target: SocketAddr,
    job: String,
    interval: Duration,
    rule_files: Vec<PathBuf>,
}

impl<'a> Builder<'a> {
    /// Runs Prometheus inside `netns` (through `nsenter`); the target address and the
    /// API's 127.0.0.1 are then the namespace's, not the host's.
    #[must_use]
    pub fn netns(mut self, netns: &'a Netns) -> Self {
        self.netns = Some(netns);
        self
    }

    /// The `job` label of the scraped series (default `p25`, what alerts.yml selects).
    #[must_use]
    pub fn job(mut self, job: &str) -> Self {
        job.clone_into(&mut self.job);
        self
    }

    /// Scrape and rule evaluation interval (default 1 s).
    #[must_use]
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// Loads a rule file (e.g. deploy/prometheus/alerts.yml), so that `ALERTS{...}` can be
    /// queried. Relative paths are taken from the current directory.
    #[must_use]
    pub fn rule_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.rule_files.push(path.into());
        self
    }

    /// Starts Prometheus and waits until it reports ready.
    pub fn start(self) -> Result<Prometheus<'a>> {
        ensure!(
            !self.job.is_empty()
                && self
                    .job
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
            "job name {:?} must be non-empty ASCII letters, digits, '_' or '-'",
            self.job
        );
        ensure!(
            self.interval >= Duration::from_millis(100),
            "scrape interval {:?} is too short",
            self.interval
        );
        let dir = ScratchDir::new()?;
        let config = dir.path().join("prometheus.yml");
        fs::write(&config, self.config()?)
            .with_context(|| format!("writing {}", config.display()))?;
        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            let port = self.free_port()?;
            let child = self.spawn(&dir, &config, port)?;
            let prom = Prometheus {
                child,
                api: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)),
                netns: self.netns,
                log: dir.path().join("prometheus.log"),
                dir_path: dir.path().to_owned(),
                scratch: None,
            };
            match prom.wait_ready() {
                // Only a lost race for the port is worth another try.
                Err(error) if format!("{error:#}").contains("address already in use") => {
                    last_error = Some(error);
                }
                Ok(mut prom) => {
                    // The server takes the directory guard: see `Prometheus::scratch`.
                    prom.scratch = Some(dir);
                    return Ok(prom);
                }
                Err(error) => return Err(error),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("prometheus did not start")))
    }

    /// The configuration file. JSON is valid YAML, and serde_json quotes paths and
    /// addresses (IPv6 ones included) correctly.
    fn config(&self) -> Result<String> {
        let interval = format!("{}ms", self.interval.as_millis());
        let mut rule_files = Vec::new();
        for path in &self.rule_files {
            let path = fs::canonicalize(path)
                .with_context(|| format!("rule file {} not found", path.display()))?;
            rule_files.push(path.display().to_string());
        }
        let config = serde_json::json!({
            "global": {
                "scrape_interval": interval,
                // Must not exceed the interval; the default (10 s) would.
                "scrape_timeout": interval,
                "evaluation_interval": interval,
            },
            "rule_files": rule_files,
            "scrape_configs": [{
                "job_name": self.job,
                "static_configs": [{ "targets": [self.target.to_string()] }],
            }],
        });
        serde_json::to_string_pretty(&config).context("serialising the Prometheus config")
    }

    /// A port that is free on 127.0.0.1 where Prometheus will run.
    fn free_port(&self) -> Result<u16> {
        let bind = || -> io::Result<u16> {
            let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
            Ok(listener.local_addr()?.port())
        };
        let port = match self.netns {
            Some(netns) => netns.enter(bind)?,
            None => bind(),
        };
        port.context("finding a free port on 127.0.0.1")
    }

    /// Starts the process; fails if it cannot be started at all.
    fn spawn(&self, dir: &ScratchDir, config: &Path, port: u16) -> Result<Child> {
        let log_path = dir.path().join("prometheus.log");
        let log =
            File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let log_err = log.try_clone().context("duplicating the log file handle")?;
        let mut cmd = match self.netns {
            Some(netns) => {
                let mut cmd = Command::new("nsenter");
                // nsenter only changes the network namespace and then execs, so the child
                // is Prometheus itself and killing it kills the server.
                cmd.arg(format!("--net={}", netns.path().display()))
                    .arg("--")
                    .arg("prometheus");
                cmd
            }
            None => Command::new("prometheus"),
        };
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        match cmd.spawn() {
            Ok(child) => Ok(child),
            Err(error) if error.kind() == io::ErrorKind::NotFound => bail!(
                "`prometheus` (or nsenter) is not installed ({error}); \
                 run `cargo xtask setup`, which installs the Debian package prometheus"
            ),
            Err(error) => Err(error).context("starting prometheus"),
        }
    }
}

/// A running Prometheus server, killed (and its files removed) when dropped.
#[derive(Debug)]
pub struct Prometheus<'a> {
    child: Child,
    api: SocketAddr,
    netns: Option<&'a Netns>,
    log: PathBuf,
    dir_path: PathBuf,
    /// Owns the directory once started (a failed attempt leaves it to `Builder::start` for
    /// the next one). Declared last, so it is removed after Drop has killed the process.
    scratch: Option<ScratchDir>,
}

impl<'a> Prometheus<'a> {
    /// A Prometheus that will scrape `target` (`HOST:PORT`, path /metrics) as job `p25`.
    pub fn builder(target: SocketAddr) -> Builder<'a> {
        Builder {
            netns: None,
            target,
            job: "p25".to_owned(),
            interval: Duration::from_secs(1),
            rule_files: Vec::new(),
        }
    }

    /// Where the HTTP API listens (127.0.0.1 of the namespace it runs in).
    pub fn api_addr(&self) -> SocketAddr {
        self.api
    }

    /// The scratch directory: config, TSDB and `prometheus.log`.
    pub fn dir(&self) -> &Path {
        &self.dir_path
    }

    /// The end of Prometheus' log, for error messages.
    pub fn log_tail(&self) -> String {
        let log = fs::read(&self.log).unwrap_or_default();
        let start = log.len().saturating_sub(LOG_TAIL);
        String::from_utf8_lossy(log.get(start..).unwrap_or_default()).into_owned()
    }

    /// Evaluates an instant query now. `None` when the result is empty; an error when
    /// it has several series (aggregate them, e.g. with `sum(...)`) or the query fails.
    pub fn query(&self, expr: &str) -> Result<Option<f64>> {
        let series = self.query_vector(expr)?;
        match series.as_slice() {
            [] => Ok(None),
            [(_, value)] => Ok(Some(*value)),
            _ => bail!(
                "query {expr:?} returned {} series, expected at most one: {series:?}",
                series.len()
            ),
        }
    }

    /// Evaluates an instant query now and returns every series with its labels (a scalar
    /// result is one series without labels).
    pub fn query_vector(&self, expr: &str) -> Result<Vec<(BTreeMap<String, String>, f64)>> {
        let path = format!("/api/v1/query?query={}", percent_encode(expr));
        let (status, body) = self.get(&path)?;
        let json: Value = serde_json::from_str(&body)
            .with_context(|| format!("query {expr:?}: HTTP {status}, body is not JSON: {body}"))?;
        if json.get("status").and_then(Value::as_str) != Some("success") {
            bail!(
                "query {expr:?} failed (HTTP {status}): {}: {}",
                json.get("errorType").and_then(Value::as_str).unwrap_or("?"),
                json.get("error").and_then(Value::as_str).unwrap_or(&body)
            );
        }
        parse_result(json.get("data").unwrap_or(&Value::Null))
            .with_context(|| format!("query {expr:?}: unexpected result {body}"))
    }

    /// Polls `expr` (which must return at most one series) until `predicate` holds for
    /// its value, and returns that value. Fails on timeout with the last value seen.
    pub fn wait_for_value(
        &self,
        expr: &str,
        mut predicate: impl FnMut(f64) -> bool,
        timeout: Duration,
    ) -> Result<f64> {
        let mut last = None;
        let met = wait_until(timeout, POLL, || {
            last = self.query(expr)?;
            Ok(last.is_some_and(&mut predicate))
        })?;
        match last {
            Some(value) if met => Ok(value),
            _ => bail!(
                "after {timeout:?}, {expr:?} is {last:?}, which does not satisfy the condition\n\
                 --- prometheus log (tail) ---\n{}",
                self.log_tail()
            ),
        }
    }

    /// Waits until `/-/ready` answers 200, failing early if the process exits.
    fn wait_ready(mut self) -> Result<Self> {
        let mut exited = None;
        let ready = wait_until(READY_TIMEOUT, POLL, || {
            if let Some(status) = self.child.try_wait().context("polling prometheus")? {
                exited = Some(status);
                return Ok(true);
            }
            // Refused connections are expected until it listens.
            Ok(self.get("/-/ready").is_ok_and(|(status, _)| status == 200))
        })?;
        if let Some(status) = exited {
            bail!(
                "prometheus exited before it was ready ({status})\n\
                 --- prometheus log (tail) ---\n{}",
                self.log_tail()
            );
        }
        ensure!(
            ready,
            "prometheus not ready on {} after {READY_TIMEOUT:?}\n--- prometheus log (tail) ---\n{}",
            self.api,
            self.log_tail()
        );
        Ok(self)
    }

    /// One HTTP/1.0 GET to the API: returns the status code and the body.
    fn get(&self, path: &str) -> Result<(u16, String)> {
        let connect = || TcpStream::connect_timeout(&self.api, HTTP_TIMEOUT);
        let mut stream = match self.netns {
            Some(netns) => netns.enter(connect)?,
            None => connect(),
        }
        .with_context(|| format!("connecting to prometheus on {}", self.api))?;
        stream.set_read_timeout(Some(HTTP_TIMEOUT))?;
        stream.set_write_timeout(Some(HTTP_TIMEOUT))?;
        write!(
            stream,
            "GET {path} HTTP/1.0\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.api
        )
        .with_context(|| format!("sending GET {path}"))?;
        let mut response = Vec::new();
        stream
            .take(MAX_RESPONSE)
            .read_to_end(&mut response)
            .with_context(|| format!("reading the response to GET {path}"))?;
        parse_http_response(&response).with_context(|| format!("GET {path}"))
    }
}

impl Drop for Prometheus<'_> {
    fn drop(&mut self) {
        // SIGKILL: nothing in the TSDB needs saving, the directory goes next.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Splits an HTTP response into its status code and body.
fn parse_http_response(response: &[u8]) -> Result<(u16, String)> {
    let text = String::from_utf8_lossy(response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("HTTP response without an end of header")?;
    let status_line = head.lines().next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("bad HTTP status line {status_line:?}"))?;
    Ok((status, body.to_owned()))
}

/// The `data` of a query response as (labels, value) pairs.
fn parse_result(data: &Value) -> Result<Vec<(BTreeMap<String, String>, f64)>> {
    let result = data.get("result").context("no result")?;
    match data.get("resultType").and_then(Value::as_str) {
        Some("vector") => result
            .as_array()
            .context("vector result is not an array")?
            .iter()
            .map(|series| {
                let labels = series
                    .get("metric")
                    .and_then(Value::as_object)
                    .map(|labels| {
                        labels
                            .iter()
                            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                            .collect()
                    })
                    .unwrap_or_default();
                Ok((labels, sample_value(series.get("value"))?))
            })
            .collect(),
        Some("scalar") => Ok(vec![(BTreeMap::new(), sample_value(Some(result))?)]),
        other => bail!("result type {other:?}: use an instant vector or scalar expression"),
    }
}

/// The value of a `[timestamp, "value"]` pair (Prometheus sends values as strings, so
/// that NaN and ±Inf survive JSON).
fn sample_value(sample: Option<&Value>) -> Result<f64> {
    let text = sample
        .and_then(|s| s.get(1))
        .and_then(Value::as_str)
        .context("sample is not [timestamp, \"value\"]")?;
    text.parse()
        .with_context(|| format!("sample value {text:?} is not a number"))
}

/// Percent-encodes everything but RFC 3986's unreserved characters, for a query string.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

/// A directory of its own under the system temp dir (`p25-prom-PID-N`), removed on drop.
/// The tests crate has no `tempfile` dependency, and this is all that is needed.
#[derive(Debug)]
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new() -> Result<Self> {
        let n = NEXT_DIR.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("p25-prom-{}-{n}", std::process::id()));
        // A leftover from an earlier process with the same pid would hold a stale TSDB.
        if path.exists() {
            fs::remove_dir_all(&path)
                .with_context(|| format!("removing stale {}", path.display()))?;
        }
        fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        // Best effort: failing to clean up must not hide the test's own result.
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Every panel of a Grafana dashboard, rows' nested panels included.
pub fn dashboard_panels(dashboard: &Value) -> Vec<Value> {
    fn walk(list: Option<&Value>, out: &mut Vec<Value>) {
        for panel in list.and_then(Value::as_array).into_iter().flatten() {
            out.push(panel.clone());
            walk(panel.get("panels"), out);
        }
    }
    let mut out = Vec::new();
    walk(dashboard.get("panels"), &mut out);
    out
}

/// The series selector of Grafana's `label_values(selector, label)` (its second
/// argument is a label name, not a metric); other queries are returned as they are.
pub fn label_values_selector(query: &str) -> Result<String> {
    let Some(args) = query.trim().strip_prefix("label_values(") else {
        return Ok(query.to_owned());
    };
    let args = args
        .strip_suffix(')')
        .with_context(|| format!("unbalanced {query:?}"))?;
    // label_values(label) has no selector at all.
    Ok(args
        .rsplit_once(',')
        .map_or_else(String::new, |(selector, _)| selector.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_encoding_keeps_only_unreserved() {
        assert_eq!(
            percent_encode(r#"sum(x{a="b c"}[5m])"#),
            "sum%28x%7Ba%3D%22b%20c%22%7D%5B5m%5D%29"
        );
    }

    #[test]
    fn http_response_is_split() -> Result<()> {
        let (status, body) =
            parse_http_response(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nready\r\n")?;
        assert_eq!((status, body.as_str()), (200, "ready\r\n"));
        assert!(parse_http_response(b"garbage").is_err());
        Ok(())
    }

    #[test]
    fn results_are_parsed() -> Result<()> {
        let vector = serde_json::json!({
            "resultType": "vector",
            "result": [{"metric": {"job": "p25"}, "value": [1.5, "7"]}],
        });
        let series = parse_result(&vector)?;
        assert_eq!(series.len(), 1);
        assert_eq!(series.first().map(|s| s.1), Some(7.0));
        let scalar = serde_json::json!({"resultType": "scalar", "result": [1.5, "+Inf"]});
        assert_eq!(
            parse_result(&scalar)?.first().map(|s| s.1),
            Some(f64::INFINITY)
        );
        let matrix = serde_json::json!({"resultType": "matrix", "result": []});
        assert!(parse_result(&matrix).is_err());
        Ok(())
    }
}
