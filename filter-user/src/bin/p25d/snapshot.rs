//! What `/metrics` shows, gathered from the parts of the daemon that know it: the maps'
//! counters, the state in force, the interfaces, the offender watch and the event log.

use std::collections::BTreeMap;

use anyhow::Result;
use filter_common::abi::Counter;
use filter_user::metrics::{self, Snapshot};
use tracing::error;

use crate::{alerts, daemon::Daemon};

/// One `/metrics` page, or why there is none (logged too).
pub fn render(daemon: &Daemon) -> Result<String, String> {
    let snapshot = take(daemon).map_err(|e| {
        let message = format!("reading the maps for metrics failed: {e:#}");
        error!(error = %message, "no metrics page");
        message
    })?;
    metrics::render(&snapshot).map_err(|e| {
        error!(error = %e, "rendering metrics failed");
        e.to_string()
    })
}

fn take(daemon: &Daemon) -> Result<Snapshot> {
    let maps = &daemon.maps;
    let tables = &maps.tables;
    let slot_names = daemon.interfaces.slot_names();
    let mut packets = BTreeMap::new();
    for ((slot, key), counter) in tables.interface_counters()? {
        let interface = match slot_names.get(&slot) {
            Some(names) => names.join("+"),
            None => format!("ifindex-slot-{slot}"),
        };
        let total = packets.entry((interface, key)).or_default();
        *total = Counter::plus(*total, counter);
    }
    let top = daemon.opts.metrics_top_offenders;
    let top_offenders = if top == 0 {
        Vec::new()
    } else {
        alerts::views(tables, None, Some(top))?
            .into_iter()
            .map(|v| (v.subscriber.to_string(), v.attempts))
            .collect()
    };
    let counts = maps.counts();
    let events = &daemon.event_counts;
    let source = daemon.source.health();
    Ok(Snapshot {
        packets,
        parse: tables.counters()?.parse,
        reloads_ok: maps.health.reloads_ok,
        reloads_failed: maps.health.reloads_failed,
        generation: maps.generation(),
        last_sync_unix: maps.health.last_sync_unix,
        allow_policy: counts.allow_policy,
        allow_runtime: counts.allow_runtime,
        allow_not_inserted: maps.allow_not_inserted(),
        subscriber_prefixes: counts.subscribers,
        offenders: daemon.offenders.tracked,
        offender_alerts: daemon.offenders.alerts_raised,
        events: tables.event_stats()?,
        reject_fallbacks: tables.reject_fallbacks()?,
        events_written: events.written.load(std::sync::atomic::Ordering::Relaxed),
        events_log_dropped: events.dropped.load(std::sync::atomic::Ordering::Relaxed),
        interfaces: daemon
            .interfaces
            .views()
            .into_iter()
            .map(|v| (v.name, v.hook, v.attached))
            .collect(),
        top_offenders,
        policy_revision: source.revision,
        policy_source_up: source.up,
        policy_source_errors: source.errors,
    })
}
