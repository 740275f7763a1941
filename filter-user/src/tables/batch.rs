//! Batched map operations (`BPF_MAP_UPDATE_BATCH`, `BPF_MAP_DELETE_BATCH`,
//! `BPF_MAP_LOOKUP_BATCH`) for the policy tries, so that reconciling a million-entry
//! policy costs a few hundred syscalls instead of a few million.
//!
//! The LPM trie has the kernel's *generic* batch operations (`generic_map_*_batch` in
//! `kernel/bpf/lpm_trie.c`): the kernel still updates one element at a time, under the
//! same per-element atomicity as `BPF_MAP_UPDATE_ELEM`, so batching changes nothing about
//! what a packet can observe; it only removes the per-entry syscall round trip and copy.
//! aya 0.14 does not expose batch operations; [`crate::sys::bpf`] makes the calls.
//!
//! Kernels without batch support for the map answer `EINVAL`/`EOPNOTSUPP`; every function
//! here then falls back to the per-entry path, so callers never need to care.

use std::io;

use aya::{
    Pod,
    maps::{HashMap, IterableMap, LpmTrie, MapData, MapError, lpm_trie::Key},
};
use filter_common::abi::{AllowValue, Ipv4Key, Ipv6Key, SubscriberValue, map_names};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::{KernelTables, map_err, removed, v4_key, v6_key};
use crate::{
    Error, check_prefix,
    sys::{self, bpf::Batch},
};

/// `ENOTSUPP`: kernel-internal, but leaks to userspace from some map types.
const ENOTSUPP: i32 = 524;

/// Entries per batch syscall: large enough that the syscall cost vanishes, small enough
/// that the key and value buffers stay in cache-friendly sizes (a few hundred KiB).
const CHUNK: usize = 16_384;
/// Upper bound on batch reads of one map (see [`lookup_all`]).
const MAX_LOOKUP_ROUNDS: usize = 1 << 16;

/// Whether an error means "this map has no batch operations here".
fn unsupported(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP)
    )
}

/// A policy map: an LPM trie, or a hash of host entries keyed the same way (`Key` with
/// the full prefix length), so that batching and its per-entry fallback serve both.
pub(super) trait PolicyMap<K: Pod, V: Pod>: IterableMap<Key<K>, V> {
    fn insert_one(&mut self, key: &Key<K>, value: V) -> Result<(), MapError>;
    fn remove_one(&mut self, key: &Key<K>) -> Result<(), MapError>;
    /// Every entry, by iteration (when the kernel cannot batch-read the map).
    fn iterate(&self) -> Result<RawEntries<K, V>, MapError>;
}

impl<K: Pod, V: Pod> PolicyMap<K, V> for LpmTrie<MapData, K, V> {
    fn insert_one(&mut self, key: &Key<K>, value: V) -> Result<(), MapError> {
        self.insert(key, value, 0)
    }
    fn remove_one(&mut self, key: &Key<K>) -> Result<(), MapError> {
        self.remove(key)
    }
    fn iterate(&self) -> Result<RawEntries<K, V>, MapError> {
        self.iter().collect()
    }
}

impl<K: Pod, V: Pod> PolicyMap<K, V> for HashMap<MapData, Key<K>, V> {
    fn insert_one(&mut self, key: &Key<K>, value: V) -> Result<(), MapError> {
        self.insert(key, value, 0)
    }
    fn remove_one(&mut self, key: &Key<K>) -> Result<(), MapError> {
        self.remove(key)
    }
    fn iterate(&self) -> Result<RawEntries<K, V>, MapError> {
        self.iter().collect()
    }
}

fn syscall_error(name: &'static str, call: &'static str, io_error: io::Error) -> Error {
    Error::Map {
        name,
        source: MapError::SyscallError(aya::sys::SyscallError { call, io_error }),
    }
}

/// Outcome of trying a batch operation.
enum Batched<T> {
    Done(T),
    /// The kernel has no batch support for this map: use the per-entry path.
    Unsupported,
}

/// Upserts `entries` in chunks; `Unsupported` if the very first call says so.
fn update<K: Pod, V: Pod>(
    name: &'static str,
    trie: &impl IterableMap<Key<K>, V>,
    keys: &[Key<K>],
    values: &[V],
) -> Result<Batched<()>, Error> {
    let map = trie.map();
    let mut first = true;
    for (keys, values) in keys.chunks(CHUNK).zip(values.chunks(CHUNK)) {
        let mut done = 0_usize;
        // Each round makes progress or fails, so `keys.len() + 1` rounds always suffice.
        for _ in 0..=keys.len() {
            let (Some(k), Some(v)) = (keys.get(done..), values.get(done..)) else {
                break;
            };
            if k.is_empty() {
                break;
            }
            let Batch { count, result } = sys::bpf::map_update_batch(map, k, v);
            match result {
                Ok(()) => done = keys.len(),
                Err(e) if first && done == 0 && count == 0 && unsupported(&e) => {
                    return Ok(Batched::Unsupported);
                }
                // Interrupted part-way (e.g. a signal): carry on after what was applied.
                Err(e) if e.kind() == io::ErrorKind::Interrupted => done += count as usize,
                Err(e) => return Err(syscall_error(name, "bpf_map_update_batch", e)),
            }
            first = false;
        }
    }
    Ok(Batched::Done(()))
}

/// Deletes `keys` in chunks; keys that are already gone are skipped. Returns how many
/// were deleted, or `Unsupported`.
fn delete<K: Pod, V: Pod>(
    name: &'static str,
    trie: &impl IterableMap<Key<K>, V>,
    keys: &[Key<K>],
) -> Result<Batched<usize>, Error> {
    let map = trie.map();
    let mut deleted = 0;
    let mut first = true;
    for keys in keys.chunks(CHUNK) {
        let mut done = 0_usize;
        for _ in 0..=keys.len() {
            let Some(k) = keys.get(done..).filter(|k| !k.is_empty()) else {
                break;
            };
            let Batch { count, result } = sys::bpf::map_delete_batch::<_, V>(map, k);
            match result {
                Ok(()) => {
                    deleted += k.len();
                    done = keys.len();
                }
                Err(e) if first && done == 0 && count == 0 && unsupported(&e) => {
                    return Ok(Batched::Unsupported);
                }
                // The generic delete stops at the first missing key: skip it, go on.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    deleted += count as usize;
                    done += count as usize + 1;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                    deleted += count as usize;
                    done += count as usize;
                }
                Err(e) => return Err(syscall_error(name, "bpf_map_delete_batch", e)),
            }
            first = false;
        }
    }
    Ok(Batched::Done(deleted))
}

/// Every entry of a trie, as raw keys and values.
type RawEntries<K, V> = Vec<(Key<K>, V)>;

/// Entries split by family: IPv4 keys and values, IPv6 keys and values.
struct ByFamily<V> {
    k4: Vec<Key<Ipv4Key>>,
    v4: Vec<V>,
    k6: Vec<Key<Ipv6Key>>,
    v6: Vec<V>,
}

/// Reads every entry; `Unsupported` if the kernel cannot batch-read this map.
fn lookup_all<K: Pod, V: Pod>(
    name: &'static str,
    trie: &impl IterableMap<Key<K>, V>,
) -> Result<Batched<RawEntries<K, V>>, Error> {
    let map = trie.map();
    let mut out = Vec::new();
    let zero_key: Key<K> = sys::zeroed_pod();
    let zero_value: V = sys::zeroed_pod();
    let mut keys = vec![zero_key; CHUNK];
    let mut values = vec![zero_value; CHUNK];
    let mut cursor = zero_key;
    let mut next = zero_key;
    let mut first = true;
    // Every round returns at least one entry or ends the walk; the bound (a billion
    // entries) only guards against a map that keeps growing while we read it.
    for _ in 0..MAX_LOOKUP_ROUNDS {
        let Batch { count, result } = sys::bpf::map_lookup_batch(
            map,
            (!first).then_some(&cursor),
            &mut next,
            &mut keys,
            &mut values,
        );
        let got = keys.iter().zip(values.iter()).take(count as usize);
        match result {
            Ok(()) => out.extend(got.map(|(k, v)| (*k, *v))),
            // ENOENT: the walk reached the end; `count` entries came with it.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                out.extend(got.map(|(k, v)| (*k, *v)));
                return Ok(Batched::Done(out));
            }
            Err(e) if first && unsupported(&e) => return Ok(Batched::Unsupported),
            Err(e) => return Err(syscall_error(name, "bpf_map_lookup_batch", e)),
        }
        if count == 0 {
            return Ok(Batched::Done(out));
        }
        cursor = next;
        first = false;
    }
    Ok(Batched::Done(out))
}

fn split<V: Copy>(entries: &[(IpNet, V)]) -> Result<ByFamily<V>, Error> {
    let (mut k4, mut v4, mut k6, mut v6) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (net, value) in entries {
        match check_prefix(*net)? {
            IpNet::V4(net) => {
                k4.push(v4_key(net));
                v4.push(*value);
            }
            IpNet::V6(net) => {
                k6.push(v6_key(net));
                v6.push(*value);
            }
        }
    }
    Ok(ByFamily { k4, v4, k6, v6 })
}

/// Allowlist entries: host entries (/32, /128) go to the exact-match hashes, the rest to
/// the tries.
struct AllowSplit<V> {
    tries: ByFamily<V>,
    hosts: ByFamily<V>,
}

/// Upserts one family's allowlist entries (those `key` gives a key for; checked already):
/// host entries into the hash, wider prefixes into the trie (`names`: hash, trie).
fn upsert_family<K: Pod, V: Pod>(
    entries: &[(IpNet, V)],
    key: impl Fn(&IpNet) -> Option<Key<K>>,
    names: (&'static str, &'static str),
    hosts: &mut HashMap<MapData, Key<K>, V>,
    trie: &mut LpmTrie<MapData, K, V>,
) -> Result<(), Error> {
    let (mut host_keys, mut host_values, mut trie_keys, mut trie_values) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (net, value) in entries {
        if let Some(k) = key(net) {
            if net.prefix_len() == net.max_prefix_len() {
                host_keys.push(k);
                host_values.push(*value);
            } else {
                trie_keys.push(k);
                trie_values.push(*value);
            }
        }
    }
    upsert_into(names.0, hosts, &host_keys, &host_values)?;
    upsert_into(names.1, trie, &trie_keys, &trie_values)
}

fn split_allow_keys(nets: &[IpNet]) -> Result<AllowSplit<()>, Error> {
    let (hosts, tries): (Vec<IpNet>, Vec<IpNet>) = nets
        .iter()
        .partition(|net| net.prefix_len() == net.max_prefix_len());
    Ok(AllowSplit {
        tries: split_keys(&tries)?,
        hosts: split_keys(&hosts)?,
    })
}

fn split_keys(nets: &[IpNet]) -> Result<ByFamily<()>, Error> {
    let (mut k4, mut k6) = (Vec::new(), Vec::new());
    for net in nets {
        match check_prefix(*net)? {
            IpNet::V4(net) => k4.push(v4_key(net)),
            IpNet::V6(net) => k6.push(v6_key(net)),
        }
    }
    Ok(ByFamily {
        k4,
        v4: Vec::new(),
        k6,
        v6: Vec::new(),
    })
}

fn v4_net(key: &Key<Ipv4Key>) -> Option<IpNet> {
    let len = u8::try_from(key.prefix_len()).ok()?;
    Ipv4Net::new(key.data().into(), len).ok().map(IpNet::V4)
}

fn v6_net(key: &Key<Ipv6Key>) -> Option<IpNet> {
    let len = u8::try_from(key.prefix_len()).ok()?;
    Ipv6Net::new(key.data().into(), len).ok().map(IpNet::V6)
}

/// Upserts into one trie, batched or (if unsupported) entry by entry.
fn upsert_into<K: Pod, V: Pod>(
    name: &'static str,
    trie: &mut impl PolicyMap<K, V>,
    keys: &[Key<K>],
    values: &[V],
) -> Result<(), Error> {
    if keys.is_empty() {
        return Ok(());
    }
    match update(name, trie, keys, values)? {
        Batched::Done(()) => Ok(()),
        Batched::Unsupported => {
            for (key, value) in keys.iter().zip(values) {
                trie.insert_one(key, *value).map_err(map_err(name))?;
            }
            Ok(())
        }
    }
}

/// Deletes from one trie, batched or entry by entry; returns how many were deleted.
fn delete_from<K: Pod, V: Pod>(
    name: &'static str,
    trie: &mut impl PolicyMap<K, V>,
    keys: &[Key<K>],
) -> Result<usize, Error> {
    if keys.is_empty() {
        return Ok(0);
    }
    match delete(name, trie, keys)? {
        Batched::Done(n) => Ok(n),
        Batched::Unsupported => {
            let mut n = 0;
            for key in keys {
                n += usize::from(removed(name, trie.remove_one(key))?);
            }
            Ok(n)
        }
    }
}

/// Reads one trie, batched or by iteration.
fn read_all<K: Pod, V: Pod>(
    name: &'static str,
    trie: &impl PolicyMap<K, V>,
    net: fn(&Key<K>) -> Option<IpNet>,
) -> Result<Vec<(IpNet, V)>, Error> {
    let all = match lookup_all(name, trie)? {
        Batched::Done(all) => all,
        Batched::Unsupported => trie.iterate().map_err(map_err(name))?,
    };
    Ok(all
        .iter()
        .filter_map(|(k, v)| net(k).map(|n| (n, *v)))
        .collect())
}

/// Work below this many entries per family is not worth a thread.
const PARALLEL_MIN: usize = CHUNK;

/// Runs the IPv4 and the IPv6 half of one step, on two threads when each half has at
/// least `PARALLEL_MIN` entries (`smaller` is the size of the smaller half). The families
/// live in separate tries that no packet consults both of, so doing them side by side
/// keeps the order between the steps of a reconcile, which is what the safety of a live
/// update rests on; the kernel inserts into an LPM trie one entry at a time, so at a
/// million entries this nearly halves the wall time on a machine with a spare core.
fn both<A: Send, B: Send>(
    smaller: usize,
    v4: impl FnOnce() -> Result<A, Error> + Send,
    v6: impl FnOnce() -> Result<B, Error> + Send,
) -> Result<(A, B), Error> {
    if smaller < PARALLEL_MIN {
        return Ok((v4()?, v6()?));
    }
    std::thread::scope(|scope| {
        let v6 = scope.spawn(v6);
        let v4 = v4();
        let v6 = v6
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        Ok((v4?, v6?))
    })
}

impl KernelTables {
    /// Adds or replaces many allowlist prefixes with batched updates. Rejects host bits
    /// (before changing anything).
    pub fn insert_allow_many(&mut self, entries: &[(IpNet, AllowValue)]) -> Result<(), Error> {
        let mut v6 = 0;
        for (net, _) in entries {
            check_prefix(*net)?;
            v6 += usize::from(net.addr().is_ipv6());
        }
        let (allow_v4, allow_v6) = (&mut self.allow_v4, &mut self.allow_v6);
        let (host_v4, host_v6) = (&mut self.allow_host_v4, &mut self.allow_host_v6);
        // Each family's thread builds its own key and value buffers: at a million entries
        // that copying is a tenth of a second, and done up front it held up both threads.
        both(
            v6.min(entries.len() - v6),
            || {
                let key = |net: &IpNet| match net {
                    IpNet::V4(net) => Some(v4_key(*net)),
                    IpNet::V6(_) => None,
                };
                let names = (map_names::ALLOW_HOST_V4, map_names::ALLOW_V4);
                upsert_family(entries, key, names, host_v4, allow_v4)
            },
            || {
                let key = |net: &IpNet| match net {
                    IpNet::V6(net) => Some(v6_key(*net)),
                    IpNet::V4(_) => None,
                };
                let names = (map_names::ALLOW_HOST_V6, map_names::ALLOW_V6);
                upsert_family(entries, key, names, host_v6, allow_v6)
            },
        )
        .map(|((), ())| ())
    }

    /// Adds or replaces many subscriber prefixes with batched updates. Rejects host bits
    /// (before changing anything).
    pub fn insert_subscribers_many(
        &mut self,
        entries: &[(IpNet, SubscriberValue)],
    ) -> Result<(), Error> {
        let ByFamily { k4, v4, k6, v6 } = split(entries)?;
        let (sub_v4, sub_v6) = (&mut self.subscribers_v4, &mut self.subscribers_v6);
        both(
            k4.len().min(k6.len()),
            || upsert_into(map_names::SUBSCRIBERS_V4, sub_v4, &k4, &v4),
            || upsert_into(map_names::SUBSCRIBERS_V6, sub_v6, &k6, &v6),
        )?;
        self.insert_subscriber_hashes(entries)?;
        for (net, _) in entries {
            self.note_subscriber_added(*net);
        }
        // Only now may the dataplane probe a new length: its prefixes are all in the hash.
        self.publish_lengths()
    }

    /// Upserts subscriber prefixes into the hashes only (the tries have them already).
    pub(super) fn insert_subscriber_hashes(
        &mut self,
        entries: &[(IpNet, SubscriberValue)],
    ) -> Result<(), Error> {
        let ByFamily { k4, v4, k6, v6 } = split(entries)?;
        let (hash_v4, hash_v6) = (&mut self.subscribers_hash_v4, &mut self.subscribers_hash_v6);
        both(
            k4.len().min(k6.len()),
            || upsert_into(map_names::SUBSCRIBERS_HASH_V4, hash_v4, &k4, &v4),
            || upsert_into(map_names::SUBSCRIBERS_HASH_V6, hash_v6, &k6, &v6),
        )
        .map(|((), ())| ())
    }

    /// Removes many allowlist prefixes with batched deletes; returns how many were there.
    pub fn remove_allow_many(&mut self, nets: &[IpNet]) -> Result<usize, Error> {
        let AllowSplit { tries, hosts } = split_allow_keys(nets)?;
        let (allow_v4, allow_v6) = (&mut self.allow_v4, &mut self.allow_v6);
        let (host_v4, host_v6) = (&mut self.allow_host_v4, &mut self.allow_host_v6);
        both(
            (tries.k4.len() + hosts.k4.len()).min(tries.k6.len() + hosts.k6.len()),
            || {
                Ok(delete_from(map_names::ALLOW_V4, allow_v4, &tries.k4)?
                    + delete_from(map_names::ALLOW_HOST_V4, host_v4, &hosts.k4)?)
            },
            || {
                Ok(delete_from(map_names::ALLOW_V6, allow_v6, &tries.k6)?
                    + delete_from(map_names::ALLOW_HOST_V6, host_v6, &hosts.k6)?)
            },
        )
        .map(|(n4, n6)| n4 + n6)
    }

    /// Removes entries from the subscriber hashes only (the tries no longer hold them).
    pub(super) fn remove_subscriber_hashes(&mut self, nets: &[IpNet]) -> Result<(), Error> {
        let ByFamily { k4, k6, .. } = split_keys(nets)?;
        let (hash_v4, hash_v6) = (&mut self.subscribers_hash_v4, &mut self.subscribers_hash_v6);
        both(
            k4.len().min(k6.len()),
            || delete_from(map_names::SUBSCRIBERS_HASH_V4, hash_v4, &k4),
            || delete_from(map_names::SUBSCRIBERS_HASH_V6, hash_v6, &k6),
        )
        .map(drop)
    }

    /// Removes many subscriber prefixes with batched deletes; returns how many were there.
    pub fn remove_subscribers_many(&mut self, nets: &[IpNet]) -> Result<usize, Error> {
        self.remove_subscriber_hashes(nets)?;
        let ByFamily { k4, k6, .. } = split_keys(nets)?;
        let (sub_v4, sub_v6) = (&mut self.subscribers_v4, &mut self.subscribers_v6);
        let removed = both(
            k4.len().min(k6.len()),
            || delete_from(map_names::SUBSCRIBERS_V4, sub_v4, &k4),
            || delete_from(map_names::SUBSCRIBERS_V6, sub_v6, &k6),
        )
        .map(|(n4, n6)| n4 + n6)?;
        for net in nets {
            self.note_subscriber_removed(*net);
        }
        self.publish_lengths()?;
        Ok(removed)
    }

    /// All allowlist prefixes, IPv4 then IPv6 (host entries after the wider ones), read
    /// with batched lookups (entry by entry where the kernel cannot batch).
    pub fn allowlist(&self) -> Result<Vec<(IpNet, AllowValue)>, Error> {
        let (mut out, v6) = both(
            PARALLEL_MIN,
            || {
                let mut v4 = read_all(map_names::ALLOW_V4, &self.allow_v4, v4_net)?;
                v4.extend(read_all(
                    map_names::ALLOW_HOST_V4,
                    &self.allow_host_v4,
                    v4_net,
                )?);
                Ok(v4)
            },
            || {
                let mut v6 = read_all(map_names::ALLOW_V6, &self.allow_v6, v6_net)?;
                v6.extend(read_all(
                    map_names::ALLOW_HOST_V6,
                    &self.allow_host_v6,
                    v6_net,
                )?);
                Ok(v6)
            },
        )?;
        out.extend(v6);
        Ok(out)
    }

    /// What the subscriber hashes hold, IPv4 then IPv6 (the dataplane's fast path; the
    /// tries are the record they are repaired from).
    pub fn subscriber_hashes(&self) -> Result<Vec<(IpNet, SubscriberValue)>, Error> {
        let mut out = read_all(
            map_names::SUBSCRIBERS_HASH_V4,
            &self.subscribers_hash_v4,
            v4_net,
        )?;
        out.extend(read_all(
            map_names::SUBSCRIBERS_HASH_V6,
            &self.subscribers_hash_v6,
            v6_net,
        )?);
        Ok(out)
    }

    /// All subscriber prefixes, IPv4 then IPv6, read with batched lookups (entry by entry
    /// where the kernel cannot batch).
    pub fn subscribers(&self) -> Result<Vec<(IpNet, SubscriberValue)>, Error> {
        let mut out = read_all(map_names::SUBSCRIBERS_V4, &self.subscribers_v4, v4_net)?;
        out.extend(read_all(
            map_names::SUBSCRIBERS_V6,
            &self.subscribers_v6,
            v6_net,
        )?);
        Ok(out)
    }
}

impl KernelTables {
    /// Whether any allowlist entry covers `net` (a longest-prefix lookup of its network
    /// address at its length). One syscall: lets the daemon skip work for the common case
    /// of a new, uncovered runtime entry.
    pub fn allow_covers(&self, net: IpNet) -> Result<bool, Error> {
        // A host entry covers only itself; anything wider is in the tries.
        let found = match check_prefix(net)? {
            IpNet::V4(net) => self
                .allow_host_v4
                .get(&v4_key(net), 0)
                .map(drop)
                .or_else(|_| self.allow_v4.get(&v4_key(net), 0).map(drop)),
            IpNet::V6(net) => self
                .allow_host_v6
                .get(&v6_key(net), 0)
                .map(drop)
                .or_else(|_| self.allow_v6.get(&v6_key(net), 0).map(drop)),
        };
        match found {
            Ok(()) => Ok(true),
            Err(MapError::KeyNotFound) => Ok(false),
            Err(MapError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => {
                Ok(false)
            }
            Err(source) => Err(Error::Map {
                name: match net {
                    IpNet::V4(_) => map_names::ALLOW_V4,
                    IpNet::V6(_) => map_names::ALLOW_V6,
                },
                source,
            }),
        }
    }
}
