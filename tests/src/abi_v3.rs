//! Real pinned state of ABI v3, for the migration tests: the eBPF object of commit 9e32a0e
//! (the last with ABI v3), checked in as `tests/fixtures/abi-v3/p25.bpf.o` (how it was
//! built: the README there), loaded, pinned, filled and attached the way 9e32a0e's p25d
//! did it.
//!
//! Why an object and a small loader rather than 9e32a0e's p25d itself: the kernel state a
//! migration takes over (programs, maps, links, pins) comes from the object and from a
//! handful of aya calls, and both are reproduced exactly here (the object is 141 KB); the
//! old daemon adds only its policy file format (v3 knew no allow list files, so it could
//! not even read the 1M-entry test policy) and its runtime state file ([`write_state_file`]
//! writes v3's), at the cost of a binary of megabytes in the repository (today's release
//! p25d is 2.7 MB stripped and xz'd).
//!
//! What this mirrors of 9e32a0e, step by step (`filter-user/src/loader.rs`,
//! `tables.rs`, `tables/batch.rs`, `sync.rs`, `bin/p25d/daemon.rs` of that commit):
//! 1. `Dataplane::open_pinned`: every map pinned at `<root>/v3/maps/<NAME>` through aya's
//!    `EbpfLoader::map_pin_path`, both programs (`p25_xdp`, `p25_tc`) loaded, and the ABI
//!    record `{3, 0x636a_3d87}` written;
//! 2. `Daemon::apply` → `sync::reconcile`: the allowlist tries, then the subscriber tries
//!    (`BPF_MAP_UPDATE_BATCH` in chunks of 16,384), then CONFIG;
//! 3. `Daemon::attach` → `Dataplane::attach_pinned`: per interface of the policy, XDP
//!    (native) or tcx ingress, whatever its role (v3 had one program per hook), the link
//!    pinned at `<root>/v3/links/<iface>:xdp` or `:tc`.
//!
//! The v3 key and value types of the policy maps (LPM keys, `SubscriberValue`,
//! `AllowValue`, `AbiRecord`) have the same fields and sizes as today's (9e32a0e's
//! abi.rs against today's), so today's types are used for them (the sizes asserted below); CONFIG was 24 bytes in v3 (v4 added `unreadable_tcp`), so it
//! is written as v3's bytes.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use aya::{
    EbpfLoader, Pod,
    maps::{Array, Map, MapData, lpm_trie::Key},
    programs::{
        SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
    },
};
use filter_common::abi::{
    AbiRecord, AllowValue, BlockAction, FragmentPolicy, Ipv4Key, Ipv6Key, Mode, Origin,
    SubscriberValue,
};
use filter_user::policy::{Attach, Policy};
use ipnet::IpNet;

use crate::netns::{Netns, wait_until};

/// The ABI version of the fixture.
pub const VERSION: u32 = 3;
/// The commit the fixture was built from.
pub const COMMIT: &str = "9e32a0edc7195d6603fd953f8ad42d06131cb70d";

/// The ABI v3 object (tests/fixtures/abi-v3/p25.bpf.o).
static OBJECT: &[u8] = aya::include_bytes_aligned!("../fixtures/abi-v3/p25.bpf.o");

/// v3's `AbiRecord::CURRENT`: its `LAYOUT_FINGERPRINT` (FNV-1a over v3's sizes and counts;
/// recomputed from 9e32a0e's `filter-common/src/abi.rs` as the README says).
const RECORD: AbiRecord = AbiRecord {
    version: VERSION,
    fingerprint: 0x636a_3d87,
};

/// v3's `map_names::ALL`.
const MAPS: [&str; 15] = [
    "SUBSCRIBERS_V4",
    "SUBSCRIBERS_V6",
    "ALLOW_V4",
    "ALLOW_V6",
    "CONFIG",
    "COUNTERS",
    "PARSE_COUNTERS",
    "ABI",
    "OFFENDERS",
    "EVENTS",
    "EVENT_STATS",
    "EVENT_BUCKET",
    "RST_BUCKET",
    "REJECT_FALLBACKS",
    "SYN_BUCKETS",
];

/// v3's batch size (`tables/batch.rs` `CHUNK`).
const CHUNK: usize = 16_384;
/// v3's `--offender-v6-prefix` default.
const OFFENDER_V6_PREFIX: u8 = 64;

// Today's types stand in for v3's where the layout did not change.
const _: () = assert!(size_of::<SubscriberValue>() == 4);
const _: () = assert!(size_of::<AllowValue>() == 12);
const _: () = assert!(size_of::<AbiRecord>() == 8);
const _: () = assert!(size_of::<Ipv4Key>() == 4 && size_of::<Ipv6Key>() == 16);

/// A link v3 pinned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct V3Link {
    /// The interface.
    pub interface: String,
    /// The pin name's suffix: `xdp` or `tc`.
    pub hook: &'static str,
    /// The kernel's link id: a link moved in place keeps it.
    pub link_id: u32,
    /// The kernel's id of v3's program on the link.
    pub program_id: u32,
}

/// What [`pin`] made.
#[derive(Debug)]
pub struct V3State {
    /// `<root>/v3`.
    pub dir: PathBuf,
    /// The links, as pinned under `dir/links`.
    pub links: Vec<V3Link>,
    /// The kernel's ids of v3's maps.
    pub map_ids: Vec<u32>,
    /// Allowlist entries written.
    pub allow: usize,
    /// Subscriber prefixes written.
    pub subscribers: usize,
    /// Time to load, fill and attach.
    pub took: Duration,
}

/// Creates the state 9e32a0e's p25d would leave under `root` for `policy` and the runtime
/// (`p25ctl allow`) entries `runtime` (no event log, as the lab's p25d runs), attached to
/// the interfaces of `netns`, and returns without a daemon: the pins keep it filtering, as
/// after a `kill -9`. The runtime entries' state file is [`write_state_file`]'s.
pub fn pin(root: &Path, netns: &Netns, policy: &Policy, runtime: &[IpNet]) -> Result<V3State> {
    let started = Instant::now();
    let dir = root.join(format!("v{VERSION}"));
    let maps_dir = dir.join("maps");
    fs::create_dir_all(&maps_dir).with_context(|| format!("creating {}", maps_dir.display()))?;

    // 1. Load with every map pinned (created here, as on a fresh v3 router).
    let paths: Vec<(&str, PathBuf)> = MAPS.iter().map(|n| (*n, maps_dir.join(n))).collect();
    let mut loader = EbpfLoader::new();
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader.load(OBJECT).context("loading the ABI v3 object")?;
    let xdp: &mut Xdp = program(&mut ebpf, "p25_xdp")?;
    xdp.load().context("verifying v3's p25_xdp")?;
    let tc: &mut SchedClassifier = program(&mut ebpf, "p25_tc")?;
    tc.load().context("verifying v3's p25_tc")?;
    let mut abi: Array<&mut MapData, AbiRecord> = Array::try_from(map_mut(&mut ebpf, "ABI")?)?;
    abi.set(0, RECORD, 0).context("writing v3's ABI record")?;

    // 2. Fill: allowlist, subscribers, CONFIG (v3's reconcile order).
    let now = SystemTime::now();
    let mut allow: BTreeMap<IpNet, AllowValue> = policy
        .allow_listed
        .iter()
        .map(|net| (*net, AllowValue::new(Origin::POLICY)))
        .collect();
    for entry in policy.allow.iter().filter(|a| !a.is_expired(now)) {
        let value = AllowValue::new(Origin::POLICY);
        let value = entry
            .syn_limit
            .map_or(value, |l| value.with_syn_limit(l.per_minute, l.burst));
        allow.insert(entry.prefix, value);
    }
    for net in runtime {
        allow
            .entry(*net)
            .or_insert(AllowValue::new(Origin::RUNTIME));
    }
    fill_tries(&ebpf, "ALLOW_V4", "ALLOW_V6", &allow)?;
    let subscribers: BTreeMap<IpNet, SubscriberValue> = policy
        .subscribers
        .iter()
        .map(|s| {
            let mode = s.mode.map_or(Mode::DEFAULT, Mode::from);
            let action = s.action.map_or(BlockAction::DEFAULT, BlockAction::from);
            (s.prefix, SubscriberValue::new(mode).with_action(action))
        })
        .collect();
    fill_tries(&ebpf, "SUBSCRIBERS_V4", "SUBSCRIBERS_V6", &subscribers)?;
    let mut config: Array<&mut MapData, [u8; 24]> = Array::try_from(map_mut(&mut ebpf, "CONFIG")?)?;
    config
        .set(0, config_v3(policy)?, 0)
        .context("writing v3's CONFIG")?;

    // 3. Attach and pin the links, inside the namespace whose interfaces they filter.
    let links_dir = dir.join("links");
    fs::create_dir_all(&links_dir).with_context(|| format!("creating {}", links_dir.display()))?;
    for interface in &policy.interfaces {
        let name = interface.name.as_str();
        let link = netns.enter(|| -> Result<(&'static str, FdLink)> {
            Ok(match interface.attach {
                // v3's `attach: auto` tried native XDP first, as here; its fall-back to tc
                // is left out (the lab's veths take native XDP).
                Attach::Xdp | Attach::Auto => {
                    let xdp: &mut Xdp = program(&mut ebpf, "p25_xdp")?;
                    let id = xdp
                        .attach(name, XdpMode::Driver)
                        .with_context(|| format!("attaching v3's p25_xdp to {name}"))?;
                    ("xdp", FdLink::try_from(xdp.take_link(id)?)?)
                }
                Attach::Tc => {
                    let tc: &mut SchedClassifier = program(&mut ebpf, "p25_tc")?;
                    let id = tc
                        .attach(name, TcAttachType::Ingress)
                        .with_context(|| format!("attaching v3's p25_tc to {name}"))?;
                    ("tc", FdLink::try_from(tc.take_link(id)?)?)
                }
            })
        })??;
        let (hook, link) = link;
        let path = links_dir.join(format!("{name}:{hook}"));
        link.pin(&path)
            .with_context(|| format!("pinning {}", path.display()))?;
    }
    drop(ebpf);
    let links = links_in(&links_dir)?;
    let map_ids = paths
        .iter()
        .map(|(name, path)| {
            let info = MapData::from_pin(path)
                .and_then(|map| map.info())
                .with_context(|| format!("reading v3's pinned {name}"))?;
            Ok(info.id())
        })
        .collect::<Result<_>>()?;
    Ok(V3State {
        dir,
        links,
        map_ids,
        allow: allow.len(),
        subscribers: subscribers.len(),
        took: started.elapsed(),
    })
}

impl V3State {
    /// Checks that today's p25d, started on this state under `pin_root` and logging `log`,
    /// migrated it: the new maps filled before any link moved, v3's SYN buckets read
    /// without complaint, every v3 link moved in place
    /// (same kernel link, now under `v<ABI_VERSION>/links`) onto today's program named in
    /// `programs` (`(interface, program)`), and the v3 directory gone. Returns how many
    /// links moved.
    pub fn check_migrated(
        &self,
        pin_root: &Path,
        log: &str,
        programs: &[(&str, &str)],
    ) -> Result<Vec<String>> {
        let moved_line = format!("migrated link from ABI v{VERSION}");
        ensure!(
            log.find("filled the new maps before migrating")
                .zip(log.find(&moved_line))
                .is_some_and(|(filled, moved)| filled < moved),
            "the maps must be filled before the links move:\n{log}"
        );
        for failure in ["could not carry over SYN buckets", "could not migrate link"] {
            ensure!(!log.contains(failure), "p25d said {failure:?}:\n{log}");
        }
        let moved = log.matches(&moved_line).count();
        ensure!(
            moved == self.links.len(),
            "{moved} of the {} v3 links migrated:\n{log}",
            self.links.len()
        );
        ensure!(!self.dir.exists(), "the v3 state should be gone:\n{log}");
        let new_dir = pin_root
            .join(format!("v{}", filter_common::abi::ABI_VERSION))
            .join("links");
        let now = links_in(&new_dir)?;
        let mut report = Vec::new();
        for old in &self.links {
            let Some(new) = now
                .iter()
                .find(|l| l.interface == old.interface && l.hook == old.hook)
            else {
                bail!(
                    "the v3 link {old:?} is not pinned under {}",
                    new_dir.display()
                );
            };
            ensure!(
                new.link_id == old.link_id,
                "{}:{} is a new link ({}), not v3's ({}) moved in place",
                old.interface,
                old.hook,
                new.link_id,
                old.link_id
            );
            let name = program_name(new.program_id)?;
            let expected = programs
                .iter()
                .find(|(interface, _)| *interface == old.interface)
                .map(|(_, program)| *program);
            ensure!(
                new.program_id != old.program_id && Some(name.as_str()) == expected,
                "{}:{} runs program {} ({name}), expected today's {expected:?} in place of \
                 v3's {}",
                old.interface,
                old.hook,
                new.program_id,
                old.program_id
            );
            report.push(format!(
                "{}:{} link {} moved in place, program {} (v3 p25_{}) -> {} ({name})",
                old.interface, old.hook, old.link_id, old.program_id, old.hook, new.program_id
            ));
        }
        // Their last references were the pins and the links: both gone, the kernel frees
        // them (the ids go at once, the memory after an RCU grace period).
        let released = wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
            let loaded = loaded_program_ids()?;
            Ok(self.links.iter().all(|l| !loaded.contains(&l.program_id))
                && self
                    .map_ids
                    .iter()
                    .all(|id| aya::maps::MapInfo::from_id(*id).is_err()))
        })?;
        ensure!(
            released,
            "v3's programs or maps are still loaded after the migration: programs {:?}, \
             maps {:?}",
            self.links.iter().map(|l| l.program_id).collect::<Vec<_>>(),
            self.map_ids
        );
        Ok(report)
    }
}

/// Writes the runtime state file 9e32a0e's p25d kept for the `p25ctl allow` entries
/// `runtime` (its `runtime.rs`: state version 1, no comment, no expiry), added now.
pub fn write_state_file(path: &Path, runtime: &[IpNet]) -> Result<()> {
    let added_unix = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let allow: Vec<serde_json::Value> = runtime
        .iter()
        .map(|net| serde_json::json!({ "prefix": net.to_string(), "added_unix": added_unix }))
        .collect();
    let text = serde_json::to_string_pretty(&serde_json::json!({ "version": 1, "allow": allow }))?;
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// The links pinned in a `links/` directory (of any ABI version), by pin name.
pub fn links_in(dir: &Path) -> Result<Vec<V3Link>> {
    let mut links = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        let Some((interface, hook)) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.rsplit_once(':'))
        else {
            continue;
        };
        let hook = match hook {
            "xdp" => "xdp",
            "tc" => "tc",
            _ => continue,
        };
        let link = FdLink::from(
            PinnedLink::from_pin(&path).with_context(|| format!("opening {}", path.display()))?,
        );
        let info = link
            .info()
            .with_context(|| format!("link info of {}", path.display()))?;
        links.push(V3Link {
            interface: interface.to_owned(),
            hook,
            link_id: info.id(),
            program_id: info.program_id(),
        });
    }
    links.sort_by(|a, b| (&a.interface, a.hook).cmp(&(&b.interface, b.hook)));
    Ok(links)
}

/// The kernel's ids of every loaded program.
fn loaded_program_ids() -> Result<std::collections::HashSet<u32>> {
    aya::programs::loaded_programs()
        .map(|info| Ok(info?.id()))
        .collect()
}

/// The name of the loaded program with kernel id `id` (at most 15 characters).
pub fn program_name(id: u32) -> Result<String> {
    for info in aya::programs::loaded_programs() {
        let info = info?;
        if info.id() == id {
            return Ok(info.name_as_str().unwrap_or_default().to_owned());
        }
    }
    bail!("no loaded program has id {id}")
}

/// v3's `Daemon::desired` config, in v3's 24-byte layout: mode, fragments,
/// offender_v6_prefix, action (one byte each), then generation, event_rate, event_burst,
/// rst_rate, rst_burst (u32 each, native endian). Generation 1 (the first apply), events
/// off (the lab runs no event log), the RST bucket split over the CPUs.
fn config_v3(policy: &Policy) -> Result<[u8; 24]> {
    let cpus = aya::util::nr_cpus()
        .map_err(|(_, e)| anyhow!("counting CPUs: {e}"))
        .map(|n| u32::try_from(n).unwrap_or(u32::MAX).max(1))?;
    let defaults = &policy.defaults;
    let mut bytes = vec![
        Mode::from(defaults.mode).0,
        FragmentPolicy::from(defaults.fragments).0,
        OFFENDER_V6_PREFIX,
        BlockAction::from(defaults.action).0,
    ];
    let words: [u32; 5] = [
        1,
        0,
        0,
        defaults.reject_rate.div_ceil(cpus),
        defaults.reject_burst.div_ceil(cpus).max(1),
    ];
    for word in words {
        bytes.extend(word.to_ne_bytes());
    }
    let bytes: [u8; 24] = bytes
        .try_into()
        .map_err(|b: Vec<u8>| anyhow!("v3's CONFIG is 24 bytes, not {}", b.len()))?;
    Ok(bytes)
}

fn program<'a, T>(ebpf: &'a mut aya::Ebpf, name: &str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = ebpf
        .program_mut(name)
        .with_context(|| format!("the v3 object has no program {name}"))?;
    Ok(program.try_into()?)
}

fn map_mut<'a>(ebpf: &'a mut aya::Ebpf, name: &str) -> Result<&'a mut Map> {
    ebpf.map_mut(name)
        .with_context(|| format!("the v3 object has no map {name}"))
}

fn lpm_map<'a>(ebpf: &'a aya::Ebpf, name: &str) -> Result<&'a MapData> {
    match ebpf.map(name) {
        Some(Map::LpmTrie(data)) => Ok(data),
        _ => bail!("the v3 object has no LPM trie {name}"),
    }
}

/// Writes `entries` into a family's pair of tries, by batches as v3 did.
fn fill_tries<V: Pod>(
    ebpf: &aya::Ebpf,
    v4: &str,
    v6: &str,
    entries: &BTreeMap<IpNet, V>,
) -> Result<()> {
    let mut keys4 = Vec::new();
    let mut keys6 = Vec::new();
    for (net, value) in entries {
        let len = u32::from(net.prefix_len());
        match net {
            IpNet::V4(net) => keys4.push((Key::new(len, Ipv4Key::from(net.network())), *value)),
            IpNet::V6(net) => keys6.push((Key::new(len, Ipv6Key::from(net.network())), *value)),
        }
    }
    update_batches(lpm_map(ebpf, v4)?, v4, &keys4)?;
    update_batches(lpm_map(ebpf, v6)?, v6, &keys6)
}

fn update_batches<K: Pod, V: Pod>(
    map: &MapData,
    name: &str,
    entries: &[(Key<K>, V)],
) -> Result<()> {
    for chunk in entries.chunks(CHUNK) {
        let (keys, values): (Vec<Key<K>>, Vec<V>) = chunk.iter().copied().unzip();
        let batch = filter_user::sys::bpf::map_update_batch(map, &keys, &values);
        batch
            .result
            .with_context(|| format!("filling v3's {name}"))?;
        ensure!(
            batch.count as usize == keys.len(),
            "filling v3's {name}: {} of {} entries written",
            batch.count,
            keys.len()
        );
    }
    Ok(())
}
