//! The Prometheus exposition of p25d: what the daemon knows, rendered with the
//! `prometheus` crate in the classic text format (`text/plain; version=0.0.4`).
//!
//! The daemon gathers a [`Snapshot`] on its own task (it owns the maps) and this module
//! turns it into text, so rendering is a pure function that tests can check with
//! `promtool check metrics`.
//!
//! Naming follows Prometheus conventions: counters end in `_total`, times are seconds,
//! and labels are bounded (interface names from the policy, fixed enumerations). A raw
//! subscriber address becomes a label only when the operator opts in, and then only for
//! the top N offenders.

use std::collections::BTreeMap;

use filter_common::abi::{Counter, CounterKey, EventStat, ParseOutcome, RejectFallback};
use prometheus::{Encoder as _, GaugeVec, IntCounterVec, IntGaugeVec, Opts, Registry};

/// Content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Default listen address of the exporter: loopback only, like node_exporter behind a
/// reverse proxy; exposing it is an explicit operator decision.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9725";

/// Everything the exporter shows, gathered at one moment.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Verdict counters by interface name (or `ifindex-slot-N` for a slot no attached
    /// interface maps to).
    pub packets: BTreeMap<(String, CounterKey), Counter>,
    /// Parse-outcome counters.
    pub parse: BTreeMap<ParseOutcome, Counter>,
    /// Policy reloads since the daemon started.
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    /// Generation of the policy in force.
    pub generation: u32,
    /// Unix time of the last successful reconcile of the maps.
    pub last_sync_unix: f64,
    /// Allowlist entries by source.
    pub allow_policy: usize,
    pub allow_runtime: usize,
    /// Allowlist entries wanted but not in the maps because the allowlist map is full.
    pub allow_not_inserted: usize,
    /// Subscriber prefixes in force.
    pub subscriber_prefixes: usize,
    /// Subscribers in the offender table.
    pub offenders: usize,
    /// Offender alerts since the daemon started.
    pub offender_alerts: u64,
    /// Event outcomes (emitted, rate-limited, ring full).
    pub events: BTreeMap<EventStat, u64>,
    /// Why reject mode dropped instead of answering (see [`RejectFallback`]).
    pub reject_fallbacks: BTreeMap<RejectFallback, u64>,
    /// Events the daemon read and wrote out.
    pub events_written: u64,
    /// Events the daemon read but dropped because its log sink was too slow.
    pub events_log_dropped: u64,
    /// (interface, hook, attached).
    pub interfaces: Vec<(String, String, bool)>,
    /// Top offenders by attempts, only when the operator opted in.
    pub top_offenders: Vec<(String, u64)>,
    /// The etcd revision of the fleet state in force (0 with a policy file).
    pub policy_revision: i64,
    /// Whether the policy source is followed live (a policy file always is; etcd while
    /// connected and synced).
    pub policy_source_up: bool,
    /// Policy source errors by reason (see [`crate::fleet::Reason`]).
    pub policy_source_errors: BTreeMap<crate::fleet::Reason, u64>,
}

/// Errors of rendering (only a programming error in metric definitions can cause one).
#[derive(Debug, thiserror::Error)]
#[error("rendering metrics: {0}")]
pub struct RenderError(#[from] prometheus::Error);

fn counter_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntCounterVec, prometheus::Error> {
    let vec = IntCounterVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(vec.clone()))?;
    Ok(vec)
}

fn gauge_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntGaugeVec, prometheus::Error> {
    let vec = IntGaugeVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(vec.clone()))?;
    Ok(vec)
}

fn gauge(registry: &Registry, name: &str, help: &str, value: i64) -> Result<(), prometheus::Error> {
    gauge_vec(registry, name, help, &[])?
        .with_label_values::<&str>(&[])
        .set(value);
    Ok(())
}

fn int(value: impl TryInto<i64>) -> i64 {
    value.try_into().unwrap_or(i64::MAX)
}

/// Renders a snapshot in the Prometheus text format.
pub fn render(s: &Snapshot) -> Result<String, RenderError> {
    let r = Registry::new();

    let packets = counter_vec(
        &r,
        "p25_packets_total",
        "Packets a port-25 rule looked at, by interface, rule direction, address family and verdict.",
        &["interface", "direction", "family", "verdict"],
    )?;
    let bytes = counter_vec(
        &r,
        "p25_bytes_total",
        "Bytes of the packets counted in p25_packets_total.",
        &["interface", "direction", "family", "verdict"],
    )?;
    for ((interface, key), counter) in &s.packets {
        let labels = [
            interface.as_str(),
            key.direction.name(),
            key.family.name(),
            key.verdict.name(),
        ];
        packets.with_label_values(&labels).inc_by(counter.packets);
        bytes.with_label_values(&labels).inc_by(counter.bytes);
    }

    let parse = counter_vec(
        &r,
        "p25_parse_outcomes_total",
        "Packets by how far the parser got; everything but tcp and the fragment outcomes fails open.",
        &["reason"],
    )?;
    for outcome in 0..ParseOutcome::COUNT {
        let outcome = ParseOutcome(outcome);
        let value = s.parse.get(&outcome).map_or(0, |c| c.packets);
        parse.with_label_values(&[outcome.name()]).inc_by(value);
    }

    let reloads = counter_vec(
        &r,
        "p25_policy_reloads_total",
        "Policy reloads since p25d started, by result; a failed reload leaves the previous policy in force.",
        &["result"],
    )?;
    reloads.with_label_values(&["success"]).inc_by(s.reloads_ok);
    reloads
        .with_label_values(&["failure"])
        .inc_by(s.reloads_failed);

    gauge(
        &r,
        "p25_policy_generation",
        "Generation of the policy in force (also in the pinned CONFIG map).",
        i64::from(s.generation),
    )?;
    gauge(
        &r,
        "p25_policy_revision",
        "etcd revision of the fleet policy state in force; 0 when the policy comes from a file.",
        s.policy_revision,
    )?;
    gauge(
        &r,
        "p25_policy_source_up",
        "1 while the policy source is followed live (etcd connected and synced; always 1 for a file), 0 while p25d filters with the last state it applied.",
        i64::from(s.policy_source_up),
    )?;
    let source_errors = counter_vec(
        &r,
        "p25_policy_source_errors_total",
        "Problems with the policy source, by reason; a rejected value leaves what was in force.",
        &["reason"],
    )?;
    for reason in crate::fleet::Reason::ALL {
        let value = s.policy_source_errors.get(&reason).copied().unwrap_or(0);
        source_errors
            .with_label_values(&[reason.label()])
            .inc_by(value);
    }
    let last_sync = GaugeVec::new(
        Opts::new(
            "p25_last_sync_timestamp_seconds",
            "Unix time of the last successful reconcile of the maps with the desired state.",
        ),
        &[],
    )?;
    r.register(Box::new(last_sync.clone()))?;
    last_sync
        .with_label_values::<&str>(&[])
        .set(s.last_sync_unix);

    let allow = gauge_vec(
        &r,
        "p25_allowlist_entries",
        "Allowlist entries in force, by source (policy file or p25ctl allow).",
        &["source"],
    )?;
    allow
        .with_label_values(&["policy"])
        .set(int(s.allow_policy));
    allow
        .with_label_values(&["runtime"])
        .set(int(s.allow_runtime));
    gauge(
        &r,
        "p25_allowlist_entries_not_inserted",
        "Allowlist entries of the policy or p25ctl allow that are not in the maps because \
         the allowlist map is full (0 when all fit).",
        int(s.allow_not_inserted),
    )?;
    gauge(
        &r,
        "p25_subscriber_prefixes",
        "Subscriber prefixes in force.",
        int(s.subscriber_prefixes),
    )?;
    gauge(
        &r,
        "p25_offenders",
        "Subscribers in the offender table (blocked port-25 attempts, not yet evicted).",
        int(s.offenders),
    )?;
    counter_vec(
        &r,
        "p25_offender_alerts_total",
        "Times a subscriber exceeded the blocked-attempt threshold within the alert window.",
        &[],
    )?
    .with_label_values::<&str>(&[])
    .inc_by(s.offender_alerts);

    let events = counter_vec(
        &r,
        "p25_events_total",
        "Sampled drop events by outcome: emitted, or lost to the in-kernel rate limit or a full ring buffer.",
        &["result"],
    )?;
    for stat in 0..EventStat::COUNT {
        let stat = EventStat(stat);
        let value = s.events.get(&stat).copied().unwrap_or(0);
        events.with_label_values(&[stat.name()]).inc_by(value);
    }
    let fallbacks = counter_vec(
        &r,
        "p25_reject_fallbacks_total",
        "Blocked packets of reject-mode prefixes dropped without an RST, by reason: tc_hook (TC cannot transmit), rate_limited (RST budget), not_syn, unsupported_header, tx_failed.",
        &["reason"],
    )?;
    for reason in 0..RejectFallback::COUNT {
        let reason = RejectFallback(reason);
        let value = s.reject_fallbacks.get(&reason).copied().unwrap_or(0);
        fallbacks.with_label_values(&[reason.name()]).inc_by(value);
    }
    counter_vec(
        &r,
        "p25_events_written_total",
        "Drop events p25d read from the ring buffer and wrote to its event log.",
        &[],
    )?
    .with_label_values::<&str>(&[])
    .inc_by(s.events_written);
    counter_vec(
        &r,
        "p25_events_log_dropped_total",
        "Drop events read from the ring buffer but not written because the event log was too slow.",
        &[],
    )?
    .with_label_values::<&str>(&[])
    .inc_by(s.events_log_dropped);

    let attached = gauge_vec(
        &r,
        "p25_interface_attached",
        "1 when the policy's interface has a live p25 attachment on this hook, else 0.",
        &["interface", "hook"],
    )?;
    for (interface, hook, live) in &s.interfaces {
        attached
            .with_label_values(&[interface.as_str(), hook.as_str()])
            .set(i64::from(*live));
    }

    if !s.top_offenders.is_empty() {
        let top = gauge_vec(
            &r,
            "p25_offender_attempts",
            "Blocked port-25 attempts of the top offenders (opt-in: labels carry subscriber addresses).",
            &["subscriber"],
        )?;
        for (subscriber, attempts) in &s.top_offenders {
            top.with_label_values(&[subscriber.as_str()])
                .set(int(*attempts));
        }
    }

    gauge_vec(
        &r,
        "p25_build_info",
        "Build of the running p25d; always 1.",
        &["version", "abi"],
    )?
    .with_label_values(&[
        env!("CARGO_PKG_VERSION"),
        &filter_common::abi::ABI_VERSION.to_string(),
    ])
    .set(1);

    let mut out = Vec::new();
    prometheus::TextEncoder::new().encode(&r.gather(), &mut out)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

#[cfg(test)]
mod tests {
    use filter_common::abi::{Direction, Family, Verdict};

    use super::*;

    fn sample() -> Snapshot {
        let mut s = Snapshot::default();
        s.packets.insert(
            (
                "r-sub".into(),
                CounterKey::new(Direction::EGRESS, Family::IPV4, Verdict::DROPPED),
            ),
            Counter {
                packets: 7,
                bytes: 420,
            },
        );
        s.reloads_failed = 2;
        s.generation = 5;
        s.interfaces.push(("r-sub".into(), "xdp".into(), true));
        s
    }

    #[test]
    fn renders_counters_with_total_suffix_and_bounded_labels() -> Result<(), RenderError> {
        let text = render(&sample())?;
        assert!(text.contains(
            r#"p25_packets_total{direction="egress",family="ipv4",interface="r-sub",verdict="dropped"} 7"#
        ));
        assert!(text.contains(r#"p25_policy_reloads_total{result="failure"} 2"#));
        assert!(text.contains("p25_policy_generation 5"));
        assert!(text.contains("p25_policy_revision 0"));
        assert!(text.contains("p25_policy_source_up 0"));
        assert!(text.contains(r#"p25_policy_source_errors_total{reason="policy_invalid"} 0"#));
        assert!(text.contains(r#"p25_parse_outcomes_total{reason="truncated"} 0"#));
        assert!(text.contains("# TYPE p25_packets_total counter"));
        assert!(!text.contains("p25_offender_attempts"), "opt-in only");
        Ok(())
    }

    #[test]
    fn top_offenders_appear_only_when_given() -> Result<(), RenderError> {
        let mut s = sample();
        s.top_offenders.push(("100.64.1.2/32".into(), 150));
        let text = render(&s)?;
        assert!(text.contains(r#"p25_offender_attempts{subscriber="100.64.1.2/32"} 150"#));
        Ok(())
    }
}
