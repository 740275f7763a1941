//! Reading p25d's Prometheus endpoint from inside the namespace p25d runs in, for tests
//! and the demo: one `GET /metrics`, and the value of a series in the text format.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};

use crate::netns::Netns;

/// Where p25d serves metrics by default (inside its own network namespace).
pub const METRICS_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9725);

/// `GET /metrics` from inside `netns`: the body, after checking the status and that the
/// content type is Prometheus' text format.
pub fn scrape(netns: &Netns) -> Result<String> {
    let response = netns
        .enter(|| -> Result<Vec<u8>> {
            let mut stream = TcpStream::connect_timeout(&METRICS_ADDR, Duration::from_secs(5))
                .with_context(|| format!("connecting to p25d's metrics on {METRICS_ADDR}"))?;
            stream.set_read_timeout(Some(Duration::from_secs(10)))?;
            stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
            let mut body = Vec::new();
            stream.take(16 << 20).read_to_end(&mut body)?;
            Ok(body)
        })?
        .context("GET /metrics")?;
    let text = String::from_utf8(response).context("metrics are not UTF-8")?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("no HTTP header/body split")?;
    ensure!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    ensure!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "wrong content type: {head}"
    );
    Ok(body.to_owned())
}

/// The value of the series `name{labels...}` (the labels given must match; others may
/// exist), summed over matching series; `None` when no series matches or a value is not a
/// number.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut total = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ')?;
        let (series_name, series_labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if series_name != name {
            continue;
        }
        let matches = labels.iter().all(|(k, v)| {
            series_labels
                .split(',')
                .any(|kv| kv == format!("{k}=\"{v}\""))
        });
        if matches {
            *total.get_or_insert(0.0) += value.parse::<f64>().ok()?;
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::metric;

    #[test]
    fn series_are_matched_by_name_and_label_subset_and_summed() {
        let text = "# HELP p25_packets_total x\n\
                    p25_packets_total{interface=\"a\",verdict=\"dropped\"} 3\n\
                    p25_packets_total{interface=\"b\",verdict=\"dropped\"} 4\n\
                    p25_packets_total{interface=\"b\",verdict=\"passed\"} 9\n\
                    p25_policy_generation 2\n";
        assert_eq!(
            metric(text, "p25_packets_total", &[("verdict", "dropped")]),
            Some(7.0)
        );
        assert_eq!(metric(text, "p25_policy_generation", &[]), Some(2.0));
        assert_eq!(metric(text, "p25_packets", &[]), None);
        assert_eq!(
            metric(text, "p25_packets_total", &[("verdict", "rejected")]),
            None
        );
    }
}
