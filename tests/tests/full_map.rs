//! A full allowlist map must not block the rest of a reconcile (issue 11, item 6): with
//! the kernel refusing allowlist inserts (E2BIG from the host hash, ENOSPC from the trie),
//! the subscriber prefixes and CONFIG still reach the maps, the entries that fit are in,
//! and what did not fit is counted, not lost silently.

use std::{collections::BTreeMap, time::SystemTime};

use anyhow::{Context as _, Result, ensure};
use filter_user::{desired::Desired, loader::Capacity, sync};
use p25_tests::harness::Harness;

/// Room for this many allowlist entries per family (host hash and trie alike).
const ROOM: u32 = 4;

#[test]
fn a_full_allowlist_map_does_not_block_subscribers_or_config() -> Result<()> {
    let mut harness = Harness::with_capacity(Capacity {
        subscribers: None,
        allow: Some(ROOM),
    })?;
    // Ten IPv4 hosts where four fit, plus two /24s for the trie (room for both).
    let hosts: String = (1..=10)
        .map(|i| format!("  - prefix: 100.64.1.{i}/32\n"))
        .collect();
    let text = format!(
        "version: 1\nsubscribers:\n  - prefix: 100.64.0.0/10\n  - prefix: 2001:db8::/32\n\
         allow:\n{hosts}  - prefix: 100.64.2.0/24\n  - prefix: 100.64.3.0/24\n"
    );
    let checked = p25_tests::harness::valid_policy(&text, "full-map.yaml")?;
    let runtime = BTreeMap::new();
    let config = p25_tests::harness::config_of(&checked.policy, 7);
    let target = Desired::new(config, &checked.policy, &runtime, SystemTime::now());

    let report = sync::reconcile(&mut harness.tables, &target)
        .context("a full allowlist map must not fail the reconcile")?;

    ensure!(
        report.allow_not_inserted == 10 - ROOM as usize,
        "{} allowlist entries reported as not inserted, want {}",
        report.allow_not_inserted,
        10 - ROOM
    );
    let subscribers = harness.tables.subscribers()?;
    ensure!(
        subscribers.len() == 2,
        "the subscriber prefixes must be in force despite the full allowlist: {subscribers:?}"
    );
    let config = harness.tables.config()?;
    ensure!(
        config.generation == 7,
        "CONFIG must be in force despite the full allowlist (generation {})",
        config.generation
    );
    let allow = harness.tables.allowlist()?;
    ensure!(
        allow.len() == ROOM as usize + 2,
        "the entries that fit must be in: {allow:?}"
    );
    Ok(())
}
