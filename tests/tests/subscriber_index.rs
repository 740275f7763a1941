//! The subscriber hashes and SUB_LENGTHS are derived from the tries, and only p25d writes
//! them. A CI run of the chaos suite once leaked 94 of 165 blocked SYNs: a read-only
//! opener of the pins (`p25ctl list`, the suite's own check) "repaired" SUB_LENGTHS from a
//! trie it read while p25d was filling it, and p25d trusted its cached copy and never wrote
//! the right lengths back. These tests pin both halves of the fix: opening the pins to read
//! writes nothing, and a reconcile repairs whatever another writer did.

use std::{collections::BTreeMap, time::SystemTime};

use anyhow::{Context as _, Result, ensure};
use aya::maps::{Array, HashMap, Map, MapData, lpm_trie::Key};
use filter_common::abi::{Ipv4Key, SubscriberLengths, SubscriberValue, map_names};
use filter_user::{Dataplane, KernelTables, desired::Desired, loader::PinLayout, sync};
use ipnet::IpNet;

const POLICY: &str = "version: 1
subscribers:
  - prefix: 100.64.0.0/10
  - prefix: 100.64.1.0/24
  - prefix: 2001:db8::/32
allow:
  - prefix: 100.64.1.4/32
";

fn lengths(layout: &PinLayout) -> Result<SubscriberLengths> {
    let data = MapData::from_pin(layout.map(map_names::SUB_LENGTHS))?;
    let map: Array<MapData, SubscriberLengths> = Array::try_from(Map::Array(data))?;
    Ok(map.get(&0, 0)?)
}

/// What a reader that read the tries before p25d filled them used to publish: "probe the
/// hashes, at no length" (a zeroed entry would be safe: it means "walk the tries"), so every
/// subscriber passed. Plus one IPv4 hash entry deleted.
fn emptied() -> SubscriberLengths {
    SubscriberLengths {
        v4_hash: 1,
        v6_hash: 1,
        ..SubscriberLengths::default()
    }
}

/// Another writer's damage: SUB_LENGTHS as [`emptied`] and one IPv4 hash entry deleted.
fn damage(layout: &PinLayout) -> Result<()> {
    let data = MapData::from_pin(layout.map(map_names::SUB_LENGTHS))?;
    let mut map: Array<MapData, SubscriberLengths> = Array::try_from(Map::Array(data))?;
    map.set(0, emptied(), 0)?;
    let data = MapData::from_pin(layout.map(map_names::SUBSCRIBERS_HASH_V4))?;
    let mut hash: HashMap<MapData, Key<Ipv4Key>, SubscriberValue> =
        HashMap::try_from(Map::HashMap(data))?;
    hash.remove(&Key::new(24, Ipv4Key([100, 64, 1, 0])))?;
    Ok(())
}

fn sorted(mut v: Vec<(IpNet, SubscriberValue)>) -> Vec<(IpNet, SubscriberValue)> {
    v.sort_unstable_by_key(|(net, _)| *net);
    v
}

#[test]
fn readers_write_nothing_and_a_reconcile_repairs_the_subscriber_index() -> Result<()> {
    let pins = p25_tests::pins::TempPins::new("subidx")?;
    let layout = pins.layout();

    let checked = p25_tests::harness::valid_policy(POLICY, "subscriber-index.yaml")?;
    let runtime = BTreeMap::new();
    let config = p25_tests::harness::config_of(&checked.policy, 3);
    let target = Desired::new(config, &checked.policy, &runtime, SystemTime::now());

    let mut dataplane = Dataplane::open_pinned(layout).context("creating the pins")?;
    let mut writer = dataplane.take_tables()?;
    sync::reconcile(&mut writer, &target)?;
    let good = lengths(layout)?;
    ensure!(
        good.v4_hash == 1 && good.v4_count == 2 && good.v4[..2] == [24, 10],
        "IPv4 lengths after the first reconcile: {good:?}"
    );
    ensure!(
        good.v6_hash == 1 && good.v6_count == 1 && good.v6[0] == 32,
        "IPv6 lengths after the first reconcile: {good:?}"
    );
    let tries = sorted(writer.subscribers()?);
    ensure!(sorted(writer.subscriber_hashes()?) == tries);

    // A reader opens the pins after the damage: it must leave it as it found it (before
    // the fix it rewrote both, from whatever the tries held at that instant).
    damage(layout)?;
    let reader = KernelTables::open_pinned(layout).context("opening the pins to read")?;
    ensure!(
        reader.subscribers()?.len() == 3,
        "the reader sees the subscriber prefixes"
    );
    ensure!(
        lengths(layout)? == emptied(),
        "opening the pins to read wrote SUB_LENGTHS"
    );
    ensure!(
        writer.subscriber_hashes()?.len() == 2,
        "opening the pins to read wrote the subscriber hashes"
    );
    drop(reader);

    // The writer's next reconcile finds nothing to change in the tries, yet repairs the
    // derived maps (before the fix its cached copy of SUB_LENGTHS hid the damage for good).
    let report = sync::reconcile(&mut writer, &target)?;
    ensure!(!report.changed(), "the tries were intact: {report:?}");
    ensure!(
        lengths(layout)? == good,
        "SUB_LENGTHS not repaired: {:?}",
        lengths(layout)?
    );
    ensure!(
        sorted(writer.subscriber_hashes()?) == tries,
        "the subscriber hashes were not repaired"
    );

    // A hash entry the tries do not hold (a stale writer's leftover) is removed as well.
    let data = MapData::from_pin(layout.map(map_names::SUBSCRIBERS_HASH_V4))?;
    let mut hash: HashMap<MapData, Key<Ipv4Key>, SubscriberValue> =
        HashMap::try_from(Map::HashMap(data))?;
    hash.insert(
        Key::new(16, Ipv4Key([198, 51, 0, 0])),
        SubscriberValue::default(),
        0,
    )?;
    sync::reconcile(&mut writer, &target)?;
    ensure!(
        sorted(writer.subscriber_hashes()?) == tries,
        "a stale hash entry survived the reconcile"
    );
    ensure!(lengths(layout)? == good);

    // And a writer opening the pins (p25d after a restart) repairs at once.
    damage(layout)?;
    drop(writer);
    drop(dataplane);
    let mut dataplane = Dataplane::open_pinned(layout).context("reopening the pins")?;
    let writer = dataplane.take_tables()?;
    ensure!(lengths(layout)? == good, "a restarted writer must repair");
    ensure!(sorted(writer.subscriber_hashes()?) == tries);
    Ok(())
}
