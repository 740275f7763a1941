//! The kernel's maps, typed: policy (subscribers, allowlist, config), statistics (verdict,
//! parse and event counters, summed over CPUs) and the offender table.
//!
//! Why one file of this length: every method works on the same private map handles, and
//! the subscriber index (which prefix lengths are in use) must change with every write to
//! the subscriber maps; split by map, that invariant would be spread over files. The
//! batched operations, which need the handles but not the index, are the child module
//! `batch`.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
};

use aya::{
    Ebpf,
    maps::{
        Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, PerCpuHashMap, lpm_trie::Key,
    },
};
use filter_common::{
    abi::{
        AllowValue, Bucket, CONFIG_INDEX, COUNTER_SLOTS, COUNTERS_ENTRIES, Config, Counter,
        CounterKey, EventStat, Ipv4Key, Ipv6Key, MAX_SUBSCRIBER_LENGTHS, OffenderKey,
        OffenderValue, ParseOutcome, RejectFallback, SubscriberLengths, SubscriberValue, map_names,
    },
    classify::Outcome,
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::{Error, check_prefix};

// Batched policy-map operations (`insert_allow_many` etc.) and the one reader of the
// policy maps (`subscribers`, `allowlist`); a child module so that it can use the private
// map handles without widening this module's API.
mod batch;

/// Typed handles on all of the object's maps.
pub struct KernelTables {
    subscribers_v4: LpmTrie<MapData, Ipv4Key, SubscriberValue>,
    subscribers_v6: LpmTrie<MapData, Ipv6Key, SubscriberValue>,
    subscribers_hash_v4: HashMap<MapData, Key<Ipv4Key>, SubscriberValue>,
    subscribers_hash_v6: HashMap<MapData, Key<Ipv6Key>, SubscriberValue>,
    sub_lengths: Array<MapData, SubscriberLengths>,
    /// The subscriber prefixes in the maps, to know the lengths in use without reading
    /// the maps back; filled from the tries when the tables are opened.
    subscriber_nets: BTreeSet<IpNet>,
    /// How many of them have each (is IPv6, prefix length): the lengths in use.
    length_counts: BTreeMap<(bool, u8), usize>,
    /// What SUB_LENGTHS holds (written only when it changes).
    published_lengths: Option<SubscriberLengths>,
    allow_v4: LpmTrie<MapData, Ipv4Key, AllowValue>,
    allow_v6: LpmTrie<MapData, Ipv6Key, AllowValue>,
    allow_host_v4: HashMap<MapData, Key<Ipv4Key>, AllowValue>,
    allow_host_v6: HashMap<MapData, Key<Ipv6Key>, AllowValue>,
    config: Array<MapData, Config>,
    counters: PerCpuArray<MapData, Counter>,
    parse_counters: PerCpuArray<MapData, Counter>,
    event_stats: PerCpuArray<MapData, u64>,
    offenders: PerCpuHashMap<MapData, OffenderKey, OffenderValue>,
    reject_fallbacks: PerCpuArray<MapData, u64>,
    syn_buckets: HashMap<MapData, OffenderKey, Bucket>,
}

impl std::fmt::Debug for KernelTables {
    // aya's Array and PerCpuArray do not implement Debug; the handles carry nothing an
    // operator could use anyway.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelTables").finish_non_exhaustive()
    }
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, Error>
where
    T: TryFrom<Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(Error::MissingMap(name))?;
    T::try_from(map).map_err(|source| Error::Map { name, source })
}

fn v4_key(net: Ipv4Net) -> Key<Ipv4Key> {
    Key::new(u32::from(net.prefix_len()), Ipv4Key::from(net.network()))
}

fn v6_key(net: Ipv6Net) -> Key<Ipv6Key> {
    Key::new(u32::from(net.prefix_len()), Ipv6Key::from(net.network()))
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> Error {
    move |source| Error::Map { name, source }
}

/// Turns "no such key" into `Ok(false)`: removing what is not there is not an error for a
/// reconciler, while any other failure is.
fn removed(name: &'static str, result: Result<(), MapError>) -> Result<bool, Error> {
    match result {
        Ok(()) => Ok(true),
        Err(MapError::KeyNotFound) => Ok(false),
        Err(MapError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(Error::Map { name, source }),
    }
}

impl KernelTables {
    /// Takes the maps out of a loaded object.
    pub fn from_ebpf(ebpf: &mut Ebpf) -> Result<Self, Error> {
        let mut tables = Self {
            subscribers_v4: take(ebpf, map_names::SUBSCRIBERS_V4)?,
            subscribers_v6: take(ebpf, map_names::SUBSCRIBERS_V6)?,
            subscribers_hash_v4: take(ebpf, map_names::SUBSCRIBERS_HASH_V4)?,
            subscribers_hash_v6: take(ebpf, map_names::SUBSCRIBERS_HASH_V6)?,
            sub_lengths: take(ebpf, map_names::SUB_LENGTHS)?,
            subscriber_nets: BTreeSet::new(),
            length_counts: BTreeMap::new(),
            published_lengths: None,
            allow_v4: take(ebpf, map_names::ALLOW_V4)?,
            allow_v6: take(ebpf, map_names::ALLOW_V6)?,
            allow_host_v4: take(ebpf, map_names::ALLOW_HOST_V4)?,
            allow_host_v6: take(ebpf, map_names::ALLOW_HOST_V6)?,
            config: take(ebpf, map_names::CONFIG)?,
            counters: take(ebpf, map_names::COUNTERS)?,
            parse_counters: take(ebpf, map_names::PARSE_COUNTERS)?,
            event_stats: take(ebpf, map_names::EVENT_STATS)?,
            offenders: take(ebpf, map_names::OFFENDERS)?,
            reject_fallbacks: take(ebpf, map_names::REJECT_FALLBACKS)?,
            syn_buckets: take(ebpf, map_names::SYN_BUCKETS)?,
        };
        // The writer's handle (p25d): the hashes and SUB_LENGTHS are brought in line with
        // the tries of a previous run before anything else is written.
        tables.repair_subscriber_index()?;
        Ok(tables)
    }

    /// Learns the subscriber prefixes already in the tries (pinned maps of a previous run)
    /// and what SUB_LENGTHS holds. Reads only: a reader such as `p25ctl list` opens the
    /// pins while p25d may be changing them, and p25d must stay their single writer. A
    /// reader that once "repaired" SUB_LENGTHS from a trie it read before p25d filled it
    /// published "no lengths", and p25d, believing its own copy, never wrote them back:
    /// every subscriber passed until the next writer came along (seen in CI's chaos run).
    fn with_subscriber_index(mut self) -> Result<Self, Error> {
        let existing = self.subscribers()?;
        self.index_subscribers(&existing);
        self.published_lengths = Some(self.subscriber_lengths()?);
        Ok(self)
    }

    /// Rebuilds the in-memory index of the subscriber prefixes from `entries`.
    fn index_subscribers(&mut self, entries: &[(IpNet, SubscriberValue)]) {
        self.subscriber_nets.clear();
        self.length_counts.clear();
        for (net, _) in entries {
            self.note_subscriber_added(*net);
        }
    }

    /// What SUB_LENGTHS holds now.
    pub fn subscriber_lengths(&self) -> Result<SubscriberLengths, Error> {
        self.sub_lengths
            .get(&0, 0)
            .map_err(map_err(map_names::SUB_LENGTHS))
    }

    /// Makes the subscriber hashes and SUB_LENGTHS agree with the tries, whatever changed
    /// them behind this handle's back (a previous p25d that died mid-update, an entry
    /// deleted with bpftool, another writer). Only the writer calls this: at start-up and
    /// in every [`crate::sync::reconcile`]. Returns the tries' contents, which the caller
    /// diffs next, so they are read once.
    ///
    /// Order, for the packets in flight: missing and changed hash entries first, then
    /// SUB_LENGTHS (a length is probed only once its prefixes are in the hash), then the
    /// hash entries the tries no longer hold.
    pub fn repair_subscriber_index(&mut self) -> Result<Vec<(IpNet, SubscriberValue)>, Error> {
        let mut tries = self.subscribers()?;
        tries.sort_unstable_by_key(|(net, _)| *net);
        let mut hashes = self.subscriber_hashes()?;
        hashes.sort_unstable_by_key(|(net, _)| *net);
        let mut report = crate::sync::SyncReport::default();
        let (upserts, removals) =
            crate::sync::diff(hashes.into_iter(), tries.iter().copied(), &mut report);
        self.index_subscribers(&tries);
        if !upserts.is_empty() {
            self.insert_subscriber_hashes(&upserts)?;
        }
        // Read back rather than trusted: the map is what the dataplane sees.
        self.published_lengths = Some(self.subscriber_lengths()?);
        self.publish_lengths()?;
        if !removals.is_empty() {
            self.remove_subscriber_hashes(&removals)?;
        }
        Ok(tries)
    }

    /// Records a subscriber prefix now in the maps (idempotent).
    pub(super) fn note_subscriber_added(&mut self, net: IpNet) {
        if self.subscriber_nets.insert(net) {
            *self
                .length_counts
                .entry((net.addr().is_ipv6(), net.prefix_len()))
                .or_default() += 1;
        }
    }

    /// Records a subscriber prefix no longer in the maps (idempotent).
    pub(super) fn note_subscriber_removed(&mut self, net: IpNet) {
        if self.subscriber_nets.remove(&net) {
            let key = (net.addr().is_ipv6(), net.prefix_len());
            if let Some(count) = self.length_counts.get_mut(&key) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    self.length_counts.remove(&key);
                }
            }
        }
    }

    /// Writes SUB_LENGTHS from the prefixes in the maps, if that changes it: per family
    /// the lengths in use, longest first, or "walk the trie" when there are more than
    /// [`MAX_SUBSCRIBER_LENGTHS`]. Called after inserts (a new length is probed only once
    /// its prefixes are in the hash) and after removals.
    fn publish_lengths(&mut self) -> Result<(), Error> {
        fn lengths(nets: impl Iterator<Item = u8>) -> ([u8; MAX_SUBSCRIBER_LENGTHS], u8, u8) {
            let set: BTreeSet<u8> = nets.collect();
            let mut out = [0u8; MAX_SUBSCRIBER_LENGTHS];
            if set.len() > MAX_SUBSCRIBER_LENGTHS {
                return (out, 0, 0);
            }
            for (slot, len) in out.iter_mut().zip(set.iter().rev()) {
                *slot = *len;
            }
            (out, set.len() as u8, 1)
        }
        let (v4, v4_count, v4_hash) = lengths(
            self.length_counts
                .keys()
                .filter(|(v6, _)| !v6)
                .map(|(_, len)| *len),
        );
        let (v6, v6_count, v6_hash) = lengths(
            self.length_counts
                .keys()
                .filter(|(v6, _)| *v6)
                .map(|(_, len)| *len),
        );
        let wanted = SubscriberLengths {
            v4,
            v6,
            v4_count,
            v6_count,
            v4_hash,
            v6_hash,
            _pad: [0; 4],
        };
        if self.published_lengths != Some(wanted) {
            self.sub_lengths
                .set(0, wanted, 0)
                .map_err(map_err(map_names::SUB_LENGTHS))?;
            self.published_lengths = Some(wanted);
        }
        Ok(())
    }

    /// Opens the maps pinned under `layout`, e.g. for read-only tools while the daemon is
    /// down (or starting). The layout is checked first, like the daemon does, so nothing is
    /// misread. Opening writes nothing (see `with_subscriber_index`); only the
    /// methods that say so change the maps.
    pub fn open_pinned(layout: &crate::loader::PinLayout) -> Result<Self, Error> {
        crate::loader::check_pinned_maps(layout)?;
        #[expect(
            clippy::items_after_statements,
            reason = "a helper local to this constructor"
        )]
        fn open<T>(
            layout: &crate::loader::PinLayout,
            name: &'static str,
            wrap: fn(MapData) -> Map,
        ) -> Result<T, Error>
        where
            T: TryFrom<Map, Error = MapError>,
        {
            let data = MapData::from_pin(layout.map(name)).map_err(map_err(name))?;
            T::try_from(wrap(data)).map_err(map_err(name))
        }
        Self {
            subscribers_v4: open(layout, map_names::SUBSCRIBERS_V4, Map::LpmTrie)?,
            subscribers_v6: open(layout, map_names::SUBSCRIBERS_V6, Map::LpmTrie)?,
            subscribers_hash_v4: open(layout, map_names::SUBSCRIBERS_HASH_V4, Map::HashMap)?,
            subscribers_hash_v6: open(layout, map_names::SUBSCRIBERS_HASH_V6, Map::HashMap)?,
            sub_lengths: open(layout, map_names::SUB_LENGTHS, Map::Array)?,
            subscriber_nets: BTreeSet::new(),
            length_counts: BTreeMap::new(),
            published_lengths: None,
            allow_v4: open(layout, map_names::ALLOW_V4, Map::LpmTrie)?,
            allow_v6: open(layout, map_names::ALLOW_V6, Map::LpmTrie)?,
            allow_host_v4: open(layout, map_names::ALLOW_HOST_V4, Map::HashMap)?,
            allow_host_v6: open(layout, map_names::ALLOW_HOST_V6, Map::HashMap)?,
            config: open(layout, map_names::CONFIG, Map::Array)?,
            counters: open(layout, map_names::COUNTERS, Map::PerCpuArray)?,
            parse_counters: open(layout, map_names::PARSE_COUNTERS, Map::PerCpuArray)?,
            event_stats: open(layout, map_names::EVENT_STATS, Map::PerCpuArray)?,
            offenders: open(layout, map_names::OFFENDERS, Map::PerCpuLruHashMap)?,
            reject_fallbacks: open(layout, map_names::REJECT_FALLBACKS, Map::PerCpuArray)?,
            syn_buckets: open(layout, map_names::SYN_BUCKETS, Map::LruHashMap)?,
        }
        .with_subscriber_index()
    }

    /// Adds or replaces a subscriber prefix (trie and hash, then the lengths in use).
    /// Rejects host bits.
    pub fn insert_subscriber(&mut self, net: IpNet, value: SubscriberValue) -> Result<(), Error> {
        match check_prefix(net)? {
            IpNet::V4(net) => {
                self.subscribers_v4
                    .insert(&v4_key(net), value, 0)
                    .map_err(map_err(map_names::SUBSCRIBERS_V4))?;
                self.subscribers_hash_v4
                    .insert(v4_key(net), value, 0)
                    .map_err(map_err(map_names::SUBSCRIBERS_HASH_V4))?;
            }
            IpNet::V6(net) => {
                self.subscribers_v6
                    .insert(&v6_key(net), value, 0)
                    .map_err(map_err(map_names::SUBSCRIBERS_V6))?;
                self.subscribers_hash_v6
                    .insert(v6_key(net), value, 0)
                    .map_err(map_err(map_names::SUBSCRIBERS_HASH_V6))?;
            }
        }
        self.note_subscriber_added(net);
        self.publish_lengths()?;
        Ok(())
    }

    /// Removes a subscriber prefix; `Ok(false)` if it was not there.
    pub fn remove_subscriber(&mut self, net: IpNet) -> Result<bool, Error> {
        let was = match check_prefix(net)? {
            IpNet::V4(net) => {
                let _ = removed(
                    map_names::SUBSCRIBERS_HASH_V4,
                    self.subscribers_hash_v4.remove(&v4_key(net)),
                )?;
                removed(
                    map_names::SUBSCRIBERS_V4,
                    self.subscribers_v4.remove(&v4_key(net)),
                )?
            }
            IpNet::V6(net) => {
                let _ = removed(
                    map_names::SUBSCRIBERS_HASH_V6,
                    self.subscribers_hash_v6.remove(&v6_key(net)),
                )?;
                removed(
                    map_names::SUBSCRIBERS_V6,
                    self.subscribers_v6.remove(&v6_key(net)),
                )?
            }
        };
        self.note_subscriber_removed(net);
        self.publish_lengths()?;
        Ok(was)
    }

    /// Adds or replaces an allowlist prefix. Rejects host bits. Host entries (/32, /128)
    /// go to the exact-match hashes, wider prefixes to the tries.
    pub fn insert_allow(&mut self, net: IpNet, value: AllowValue) -> Result<(), Error> {
        match check_prefix(net)? {
            IpNet::V4(net) if net.prefix_len() == 32 => self
                .allow_host_v4
                .insert(v4_key(net), value, 0)
                .map_err(map_err(map_names::ALLOW_HOST_V4)),
            IpNet::V6(net) if net.prefix_len() == 128 => self
                .allow_host_v6
                .insert(v6_key(net), value, 0)
                .map_err(map_err(map_names::ALLOW_HOST_V6)),
            IpNet::V4(net) => self
                .allow_v4
                .insert(&v4_key(net), value, 0)
                .map_err(map_err(map_names::ALLOW_V4)),
            IpNet::V6(net) => self
                .allow_v6
                .insert(&v6_key(net), value, 0)
                .map_err(map_err(map_names::ALLOW_V6)),
        }
    }

    /// Removes an allowlist prefix; `Ok(false)` if it was not there.
    pub fn remove_allow(&mut self, net: IpNet) -> Result<bool, Error> {
        match check_prefix(net)? {
            IpNet::V4(net) if net.prefix_len() == 32 => removed(
                map_names::ALLOW_HOST_V4,
                self.allow_host_v4.remove(&v4_key(net)),
            ),
            IpNet::V6(net) if net.prefix_len() == 128 => removed(
                map_names::ALLOW_HOST_V6,
                self.allow_host_v6.remove(&v6_key(net)),
            ),
            IpNet::V4(net) => removed(map_names::ALLOW_V4, self.allow_v4.remove(&v4_key(net))),
            IpNet::V6(net) => removed(map_names::ALLOW_V6, self.allow_v6.remove(&v6_key(net))),
        }
    }

    /// Removes every subscriber and allowlist entry (tests use it between rounds).
    pub fn clear_policy(&mut self) -> Result<(), Error> {
        for (net, _) in self.subscribers()? {
            self.remove_subscriber(net)?;
        }
        for (net, _) in self.allowlist()? {
            self.remove_allow(net)?;
        }
        Ok(())
    }

    /// The global configuration.
    pub fn config(&self) -> Result<Config, Error> {
        self.config
            .get(&CONFIG_INDEX, 0)
            .map_err(map_err(map_names::CONFIG))
    }

    /// Replaces the global configuration.
    pub fn set_config(&mut self, config: Config) -> Result<(), Error> {
        self.config
            .set(CONFIG_INDEX, config, 0)
            .map_err(map_err(map_names::CONFIG))
    }

    /// One verdict counter, summed over CPUs and interfaces.
    pub fn verdict_counter(&self, key: CounterKey) -> Result<Counter, Error> {
        let mut total = Counter::default();
        for slot in 0..filter_common::abi::IFACE_SLOTS {
            let index = slot * COUNTER_SLOTS + key.index();
            total = total.plus(sum(&self.counters, index, map_names::COUNTERS)?);
        }
        Ok(total)
    }

    /// Every non-zero verdict counter by interface slot (see
    /// [`filter_common::abi::iface_slot`]), summed over CPUs.
    pub fn interface_counters(&self) -> Result<BTreeMap<(u32, CounterKey), Counter>, Error> {
        let mut out = BTreeMap::new();
        for index in 0..COUNTERS_ENTRIES {
            let total = sum(&self.counters, index, map_names::COUNTERS)?;
            if total == Counter::default() {
                continue;
            }
            if let Some(key) = CounterKey::from_index(index % COUNTER_SLOTS) {
                out.insert((index / COUNTER_SLOTS, key), total);
            }
        }
        Ok(out)
    }

    /// The event outcome counters (emitted, rate-limited, ring full), summed over CPUs.
    pub fn event_stats(&self) -> Result<BTreeMap<EventStat, u64>, Error> {
        let mut out = BTreeMap::new();
        for stat in 0..EventStat::COUNT {
            let values = self
                .event_stats
                .get(&u32::from(stat), 0)
                .map_err(map_err(map_names::EVENT_STATS))?;
            let total = values.iter().fold(0u64, |acc, v| acc.wrapping_add(*v));
            out.insert(EventStat(stat), total);
        }
        Ok(out)
    }

    /// Why reject mode fell back to dropping (see [`RejectFallback`]), summed over CPUs.
    pub fn reject_fallbacks(&self) -> Result<BTreeMap<RejectFallback, u64>, Error> {
        let mut out = BTreeMap::new();
        for reason in 0..RejectFallback::COUNT {
            let values = self
                .reject_fallbacks
                .get(&u32::from(reason), 0)
                .map_err(map_err(map_names::REJECT_FALLBACKS))?;
            let total = values.iter().fold(0u64, |acc, v| acc.wrapping_add(*v));
            out.insert(RejectFallback(reason), total);
        }
        Ok(out)
    }

    /// Forgets every per-source SYN bucket, so that every source starts again with a full
    /// bucket (tests use it between rounds). Returns how many there were.
    pub fn clear_syn_buckets(&mut self) -> Result<usize, Error> {
        let keys = self.syn_buckets.keys().filter_map(Result::ok).collect();
        remove_keys(map_names::SYN_BUCKETS, keys, |key| {
            self.syn_buckets.remove(key)
        })
    }

    /// Forgets every offender (tests use it between rounds). Returns how many there were.
    pub fn clear_offenders(&mut self) -> Result<usize, Error> {
        let keys = self.offenders.keys().filter_map(Result::ok).collect();
        remove_keys(map_names::OFFENDERS, keys, |key| self.offenders.remove(key))
    }

    /// Copies the per-source SYN buckets of an older ABI version's pinned maps (in
    /// `maps_dir`) into this table, so that a migration does not hand every rate-limited
    /// source a fresh burst. The bucket layout has not changed since ABI v3; a pin of
    /// another layout is refused. Returns how many buckets were copied.
    pub fn import_syn_buckets(&mut self, maps_dir: &std::path::Path) -> Result<usize, Error> {
        let name = map_names::SYN_BUCKETS;
        let path = maps_dir.join(name);
        let data = MapData::from_pin(&path).map_err(map_err(name))?;
        let info = data.info().map_err(map_err(name))?;
        if info.key_size() as usize != size_of::<OffenderKey>()
            || info.value_size() as usize != size_of::<Bucket>()
        {
            return Err(Error::IncompatiblePin {
                path,
                found: format!(
                    "key {} bytes, value {} bytes",
                    info.key_size(),
                    info.value_size()
                ),
                expected: format!(
                    "key {} bytes, value {} bytes",
                    size_of::<OffenderKey>(),
                    size_of::<Bucket>()
                ),
            });
        }
        let old: HashMap<MapData, OffenderKey, Bucket> =
            HashMap::try_from(Map::LruHashMap(data)).map_err(map_err(name))?;
        let mut copied = 0;
        // Entries evicted while being read are skipped: they would have started full anyway.
        for (key, bucket) in old.iter().filter_map(Result::ok) {
            self.syn_buckets
                .insert(key, bucket, 0)
                .map_err(map_err(name))?;
            copied += 1;
        }
        Ok(copied)
    }

    /// Every subscriber in the offender table, its CPUs' shares summed (see
    /// [`merge_offender`]). Entries that vanish while being read (the LRU evicts them under
    /// load) are skipped, not errors.
    pub fn offenders(&self) -> Result<Vec<(OffenderKey, OffenderValue)>, Error> {
        let mut out = Vec::new();
        for item in self.offenders.iter() {
            match item {
                Ok((key, shares)) => {
                    let merged = merge_offender(shares.iter());
                    if merged.attempts != 0 {
                        out.push((key, merged));
                    }
                }
                Err(MapError::KeyNotFound) => {}
                Err(source) => {
                    return Err(Error::Map {
                        name: map_names::OFFENDERS,
                        source,
                    });
                }
            }
        }
        Ok(out)
    }

    /// One parse-outcome counter, summed over CPUs.
    pub fn parse_counter(&self, outcome: ParseOutcome) -> Result<Counter, Error> {
        sum(
            &self.parse_counters,
            outcome.index(),
            map_names::PARSE_COUNTERS,
        )
    }

    /// Reads all counters, summed over CPUs (and, for verdicts, over interfaces).
    pub fn counters(&self) -> Result<CounterSnapshot, Error> {
        let mut snapshot = CounterSnapshot::default();
        for index in 0..COUNTER_SLOTS {
            if let Some(key) = CounterKey::from_index(index) {
                snapshot.verdicts.insert(key, Counter::default());
            }
        }
        for ((_, key), counter) in self.interface_counters()? {
            let total = snapshot.verdicts.entry(key).or_default();
            *total = total.plus(counter);
        }
        for index in 0..ParseOutcome::COUNT {
            let total = sum(
                &self.parse_counters,
                u32::from(index),
                map_names::PARSE_COUNTERS,
            )?;
            snapshot.parse.insert(ParseOutcome(index), total);
        }
        Ok(snapshot)
    }
}

/// One subscriber's evidence from its per-CPU shares: attempts summed, the first attempt
/// the earliest of any CPU, the latest attempt (time, destination, verdict) that of the CPU
/// that saw the most recent one. A CPU that never saw the subscriber has a zero share.
pub fn merge_offender<'a>(shares: impl IntoIterator<Item = &'a OffenderValue>) -> OffenderValue {
    let mut merged = OffenderValue::default();
    for share in shares.into_iter().filter(|s| s.attempts != 0) {
        merged.attempts = merged.attempts.wrapping_add(share.attempts);
        if merged.first_seen_ns == 0 || share.first_seen_ns < merged.first_seen_ns {
            merged.first_seen_ns = share.first_seen_ns;
        }
        if share.last_seen_ns >= merged.last_seen_ns {
            merged.last_seen_ns = share.last_seen_ns;
            merged.last_dst = share.last_dst;
            merged.last_dport = share.last_dport;
            merged.last_verdict = share.last_verdict;
        }
    }
    merged
}

/// Removes `keys` (read from the map just before) one by one; keys that vanished meanwhile
/// (LRU eviction) are not errors. Returns how many keys there were.
fn remove_keys(
    name: &'static str,
    keys: Vec<OffenderKey>,
    mut remove: impl FnMut(&OffenderKey) -> Result<(), MapError>,
) -> Result<usize, Error> {
    for key in &keys {
        removed(name, remove(key))?;
    }
    Ok(keys.len())
}

fn sum(
    map: &PerCpuArray<MapData, Counter>,
    index: u32,
    name: &'static str,
) -> Result<Counter, Error> {
    let values = map.get(&index, 0).map_err(map_err(name))?;
    Ok(values
        .iter()
        .fold(Counter::default(), |acc, c| acc.plus(*c)))
}

/// All counters at one moment, summed over CPUs. Also the model of what the hooks count:
/// [`CounterSnapshot::record`] does for an [`Outcome`] what the eBPF `run` does.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CounterSnapshot {
    /// Verdict counters by key.
    pub verdicts: BTreeMap<CounterKey, Counter>,
    /// Parse-outcome counters.
    pub parse: BTreeMap<ParseOutcome, Counter>,
}

impl CounterSnapshot {
    /// One verdict counter (zero if absent).
    pub fn verdict(&self, key: CounterKey) -> Counter {
        self.verdicts.get(&key).copied().unwrap_or_default()
    }

    /// One parse counter (zero if absent).
    pub fn parse(&self, outcome: ParseOutcome) -> Counter {
        self.parse.get(&outcome).copied().unwrap_or_default()
    }

    /// Counts one packet of `bytes` with this outcome, as the dataplane does.
    pub fn record(&mut self, outcome: &Outcome, bytes: u64) {
        let one = Counter { packets: 1, bytes };
        let parse = self.parse.entry(outcome.parse).or_default();
        *parse = parse.plus(one);
        if let Some(key) = outcome.counter {
            let verdict = self.verdicts.entry(key).or_default();
            *verdict = verdict.plus(one);
        }
    }

    /// What was counted since `earlier`, with zero entries dropped so that snapshots
    /// compare by what actually happened.
    #[must_use]
    pub fn since(&self, earlier: &Self) -> Self {
        fn diff<K: Ord + Copy>(
            now: &BTreeMap<K, Counter>,
            then: &BTreeMap<K, Counter>,
        ) -> BTreeMap<K, Counter> {
            now.iter()
                .filter_map(|(k, c)| {
                    let before = then.get(k).copied().unwrap_or_default();
                    let d = Counter {
                        packets: c.packets.wrapping_sub(before.packets),
                        bytes: c.bytes.wrapping_sub(before.bytes),
                    };
                    (d != Counter::default()).then_some((*k, d))
                })
                .collect()
        }
        Self {
            verdicts: diff(&self.verdicts, &earlier.verdicts),
            parse: diff(&self.parse, &earlier.parse),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(attempts: u64, first: u64, last: u64, dport: u16) -> OffenderValue {
        OffenderValue {
            attempts,
            first_seen_ns: first,
            last_seen_ns: last,
            last_dport: dport,
            ..OffenderValue::default()
        }
    }

    #[test]
    fn per_cpu_offender_shares_merge_into_one_record() {
        let shares = [
            share(0, 0, 0, 0),
            share(3, 200, 900, 25),
            share(5, 100, 700, 26),
            share(0, 0, 0, 0),
        ];
        let merged = merge_offender(shares.iter());
        assert_eq!(merged.attempts, 8);
        assert_eq!(merged.first_seen_ns, 100);
        assert_eq!(merged.last_seen_ns, 900);
        assert_eq!(merged.last_dport, 25);
        assert_eq!(merge_offender([].iter()).attempts, 0);
    }
}
