//! Pinned state on bpffs: where it lives ([`PinLayout`]), what a pinned map must look like
//! for this build to reuse it (the map specs and [`check_pinned_maps`]), and the pinned
//! links as found (status, detach, removal). Loading and attaching are the parent's.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, MapData, MapType},
    programs::links::{FdLink, LinkInfo, LinkType, PinnedLink},
};
use filter_common::abi::{
    ABI_VERSION, ALLOW_HOST_MAX_ENTRIES, ALLOW_MAX_ENTRIES, AbiRecord, AllowValue, Bucket,
    CONFIG_INDEX, COUNTER_SLOTS, COUNTERS_ENTRIES, Config, Counter, EVENTS_RING_BYTES, EventStat,
    Ipv4Key, Ipv6Key, OFFENDERS_MAX_ENTRIES, OffenderKey, OffenderValue, ParseOutcome,
    RejectFallback, SUBSCRIBERS_MAX_ENTRIES, SYN_BUCKETS_MAX_ENTRIES, SubscriberLengths,
    SubscriberValue, map_names,
};

use super::Hook;
use crate::{Error, sys::bpf::pinned_link_ifindex};

/// Where the pinned state lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinLayout {
    root: PathBuf,
}

impl PinLayout {
    /// A layout under `root` (normally [`super::DEFAULT_PIN_ROOT`]).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of this build's ABI version.
    pub fn dir(&self) -> PathBuf {
        self.root.join(format!("v{ABI_VERSION}"))
    }

    /// Pin path of a map.
    pub fn map(&self, name: &str) -> PathBuf {
        self.dir().join("maps").join(name)
    }

    /// Directory of the link pins.
    pub fn links_dir(&self) -> PathBuf {
        self.dir().join("links")
    }

    /// Pin path of the link of `hook` on `interface`.
    pub fn link(&self, interface: &str, hook: Hook) -> PathBuf {
        self.links_dir()
            .join(format!("{interface}:{}", hook.suffix()))
    }

    /// Pinned state of other ABI versions under the root: `(version, dir)`.
    pub fn other_versions(&self) -> Vec<(u32, PathBuf)> {
        let Ok(entries) = fs::read_dir(&self.root) else {
            return Vec::new();
        };
        entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let version = name.strip_prefix('v')?.parse::<u32>().ok()?;
                (version != ABI_VERSION).then(|| (version, e.path()))
            })
            .collect()
    }

    /// The pinned links: `(interface, hook, path)`.
    pub fn pinned_links(&self) -> Vec<(String, Hook, PathBuf)> {
        links_in(&self.links_dir())
    }
}

/// The link pins in a `links/` directory of any ABI version: `(interface, hook, path)`.
pub fn links_in(dir: &Path) -> Vec<(String, Hook, PathBuf)> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut links: Vec<_> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let (interface, suffix) = name.rsplit_once(':')?;
            let hook = match suffix {
                "xdp" => Hook::Xdp,
                "tc" => Hook::Tc,
                _ => return None,
            };
            Some((interface.to_owned(), hook, e.path()))
        })
        .collect();
    links.sort();
    links
}

/// What a pinned map must look like for this build to reuse it.
struct MapSpec {
    name: &'static str,
    map_type: MapType,
    key_size: usize,
    value_size: usize,
    /// The least capacity this build needs: a smaller map would silently refuse entries
    /// (policy maps) or miss indices (counter arrays). The policy tries' capacity is the
    /// loader's default; a daemon never sizes them differently.
    max_entries: u32,
    /// Creation flags, exactly: `BPF_F_NO_PREALLOC` for the LPM tries (the kernel requires
    /// it) and the policy hashes (2M entries per family would otherwise be hundreds of MiB
    /// of kernel memory taken up front), none elsewhere.
    /// Flags change what a map is (preallocation, LRU sharing between CPUs, read-only
    /// program access), so a pin with others is another map.
    flags: u32,
}

/// `BPF_F_NO_PREALLOC`, which the kernel requires of LPM tries and the policy hashes use.
const NO_PREALLOC: u32 = 1;

const LPM_PREFIX_LEN: usize = size_of::<u32>();

const MAP_SPECS: [MapSpec; 20] = [
    MapSpec {
        name: map_names::SUBSCRIBERS_HASH_V4,
        map_type: MapType::Hash,
        key_size: LPM_PREFIX_LEN + size_of::<Ipv4Key>(),
        value_size: size_of::<SubscriberValue>(),
        max_entries: SUBSCRIBERS_MAX_ENTRIES,
        flags: NO_PREALLOC,
    },
    MapSpec {
        name: map_names::SUBSCRIBERS_HASH_V6,
        map_type: MapType::Hash,
        key_size: LPM_PREFIX_LEN + size_of::<Ipv6Key>(),
        value_size: size_of::<SubscriberValue>(),
        max_entries: SUBSCRIBERS_MAX_ENTRIES,
        flags: NO_PREALLOC,
    },
    MapSpec {
        name: map_names::SUB_LENGTHS,
        map_type: MapType::Array,
        key_size: size_of::<u32>(),
        value_size: size_of::<SubscriberLengths>(),
        max_entries: 1,
        flags: 0,
    },
    MapSpec {
        name: map_names::SUBSCRIBERS_V4,
        map_type: MapType::LpmTrie,
        key_size: LPM_PREFIX_LEN + size_of::<Ipv4Key>(),
        value_size: size_of::<SubscriberValue>(),
        max_entries: SUBSCRIBERS_MAX_ENTRIES,
        flags: NO_PREALLOC,
    },
    MapSpec {
        name: map_names::SUBSCRIBERS_V6,
        map_type: MapType::LpmTrie,
        key_size: LPM_PREFIX_LEN + size_of::<Ipv6Key>(),
        value_size: size_of::<SubscriberValue>(),
        max_entries: SUBSCRIBERS_MAX_ENTRIES,
        flags: NO_PREALLOC,
    },
    MapSpec {
        name: map_names::ALLOW_V4,
        map_type: MapType::LpmTrie,
        key_size: LPM_PREFIX_LEN + size_of::<Ipv4Key>(),
        value_size: size_of::<AllowValue>(),
        max_entries: ALLOW_MAX_ENTRIES,
        flags: NO_PREALLOC,
    },
    MapSpec {
        name: map_names::ALLOW_V6,
        map_type: MapType::LpmTrie,
        key_size: LPM_PREFIX_LEN + size_of::<Ipv6Key>(),
        value_size: size_of::<AllowValue>(),
        max_entries: ALLOW_MAX_ENTRIES,
        flags: NO_PREALLOC,
    },
    MapSpec {
        name: map_names::ALLOW_HOST_V4,
        map_type: MapType::Hash,
        key_size: LPM_PREFIX_LEN + size_of::<Ipv4Key>(),
        value_size: size_of::<AllowValue>(),
        max_entries: ALLOW_HOST_MAX_ENTRIES,
        flags: NO_PREALLOC,
    },
    MapSpec {
        name: map_names::ALLOW_HOST_V6,
        map_type: MapType::Hash,
        key_size: LPM_PREFIX_LEN + size_of::<Ipv6Key>(),
        value_size: size_of::<AllowValue>(),
        max_entries: ALLOW_HOST_MAX_ENTRIES,
        flags: NO_PREALLOC,
    },
    MapSpec {
        name: map_names::CONFIG,
        map_type: MapType::Array,
        key_size: size_of::<u32>(),
        value_size: size_of::<Config>(),
        max_entries: 1,
        flags: 0,
    },
    MapSpec {
        name: map_names::COUNTERS,
        map_type: MapType::PerCpuArray,
        key_size: size_of::<u32>(),
        value_size: size_of::<Counter>(),
        max_entries: COUNTERS_ENTRIES,
        flags: 0,
    },
    MapSpec {
        name: map_names::PARSE_COUNTERS,
        map_type: MapType::PerCpuArray,
        key_size: size_of::<u32>(),
        value_size: size_of::<Counter>(),
        max_entries: ParseOutcome::COUNT as u32,
        flags: 0,
    },
    MapSpec {
        name: map_names::ABI,
        map_type: MapType::Array,
        key_size: size_of::<u32>(),
        value_size: size_of::<AbiRecord>(),
        max_entries: 1,
        flags: 0,
    },
    MapSpec {
        name: map_names::OFFENDERS,
        map_type: MapType::LruPerCpuHash,
        key_size: size_of::<OffenderKey>(),
        value_size: size_of::<OffenderValue>(),
        max_entries: OFFENDERS_MAX_ENTRIES,
        flags: 0,
    },
    MapSpec {
        name: map_names::EVENTS,
        map_type: MapType::RingBuf,
        key_size: 0,
        value_size: 0,
        max_entries: EVENTS_RING_BYTES,
        flags: 0,
    },
    MapSpec {
        name: map_names::EVENT_STATS,
        map_type: MapType::PerCpuArray,
        key_size: size_of::<u32>(),
        value_size: size_of::<u64>(),
        max_entries: EventStat::COUNT as u32,
        flags: 0,
    },
    MapSpec {
        name: map_names::EVENT_BUCKET,
        map_type: MapType::PerCpuArray,
        key_size: size_of::<u32>(),
        value_size: size_of::<Bucket>(),
        max_entries: 1,
        flags: 0,
    },
    MapSpec {
        name: map_names::RST_BUCKET,
        map_type: MapType::PerCpuArray,
        key_size: size_of::<u32>(),
        value_size: size_of::<Bucket>(),
        max_entries: 1,
        flags: 0,
    },
    MapSpec {
        name: map_names::REJECT_FALLBACKS,
        map_type: MapType::PerCpuArray,
        key_size: size_of::<u32>(),
        value_size: size_of::<u64>(),
        max_entries: RejectFallback::COUNT as u32,
        flags: 0,
    },
    MapSpec {
        name: map_names::SYN_BUCKETS,
        map_type: MapType::LruHash,
        key_size: size_of::<OffenderKey>(),
        value_size: size_of::<Bucket>(),
        max_entries: SYN_BUCKETS_MAX_ENTRIES,
        flags: 0,
    },
];

// Keep the spec table and the list of maps in step.
const _: () = assert!(MAP_SPECS.len() == map_names::ALL.len());
const _: () = assert!(COUNTER_SLOTS > 0 && ParseOutcome::COUNT > 0);
const _: () = assert!(SUBSCRIBERS_MAX_ENTRIES > 0 && ALLOW_MAX_ENTRIES > 0);

/// Checks that the link pinned at `path` is of the kind `hook` makes (an XDP link, a tcx
/// link) before anything reuses it: a pin of another kind is not ours to update.
pub(super) fn check_link_type(link: &FdLink, hook: Hook, path: &Path) -> Result<(), Error> {
    let expected = match hook {
        Hook::Xdp => LinkType::Xdp,
        Hook::Tc => LinkType::Tcx,
    };
    let found = link.info().ok().and_then(|info| info.link_type().ok());
    if found == Some(expected) {
        Ok(())
    } else {
        Err(Error::IncompatiblePin {
            path: path.to_owned(),
            found: format!("link type {found:?}"),
            expected: format!("link type {expected:?}"),
        })
    }
}

/// A pinned link as found on bpffs.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LinkStatus {
    /// Interface name (from the pin name).
    pub interface: String,
    /// Hook.
    pub hook: Hook,
    /// The interface index the link is attached to; `None` once the interface is gone
    /// (the link is then defunct and no longer filters).
    pub ifindex: Option<u32>,
    /// The kernel's program id.
    pub program_id: Option<u32>,
}

/// Reads the state of every pinned link under `layout`.
pub fn pinned_link_status(layout: &PinLayout) -> Vec<LinkStatus> {
    layout
        .pinned_links()
        .into_iter()
        .map(|(interface, hook, path)| {
            let link = PinnedLink::from_pin(&path).ok().map(FdLink::from);
            LinkStatus {
                interface,
                hook,
                ifindex: pinned_link_ifindex(&path),
                program_id: link
                    .as_ref()
                    .and_then(|l| l.info().ok())
                    .map(|info: LinkInfo| info.program_id()),
            }
        })
        .collect()
}

/// Unpins the link of `hook` on `interface`; the link (and so the attachment) goes away
/// with its last reference. `Ok(false)` if there was none.
pub fn detach_pinned(layout: &PinLayout, interface: &str, hook: Hook) -> Result<bool, Error> {
    let path = layout.link(interface, hook);
    if !path.exists() {
        return Ok(false);
    }
    remove_pin(&path)?;
    Ok(true)
}

/// Removes all pinned state of this ABI version: links first (so nothing filters with
/// half-removed maps), then maps, then the directories. Returns the number of pins removed.
pub fn remove_all_pins(layout: &PinLayout) -> Result<usize, Error> {
    let mut removed = 0;
    for (_, _, path) in layout.pinned_links() {
        remove_pin(&path)?;
        removed += 1;
    }
    for name in map_names::ALL {
        let path = layout.map(name);
        if path.exists() {
            remove_pin(&path)?;
            removed += 1;
        }
    }
    for dir in [layout.links_dir(), layout.dir().join("maps"), layout.dir()] {
        remove_empty_dir(&dir)?;
    }
    remove_empty_dir(layout.root())?;
    Ok(removed)
}

fn remove_empty_dir(dir: &Path) -> Result<(), Error> {
    match fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        // Something else still lives there (another version, an operator's pin): leave it.
        Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => Ok(()),
        Err(source) => Err(Error::Io {
            what: "removing a pin directory",
            path: dir.to_owned(),
            source,
        }),
    }
}

pub(super) fn remove_pin(path: &Path) -> Result<(), Error> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::Io {
            what: "removing a pin",
            path: path.to_owned(),
            source,
        }),
    }
}

/// Checks every map already pinned under `layout` against what this build expects, so an
/// incompatible pin is reported instead of being reused and misread.
pub(crate) fn check_pinned_maps(layout: &PinLayout) -> Result<(), Error> {
    for spec in &MAP_SPECS {
        let path = layout.map(spec.name);
        if !path.exists() {
            continue;
        }
        let map = MapData::from_pin(&path).map_err(|source| Error::Map {
            name: spec.name,
            source,
        })?;
        let info = map.info().map_err(|source| Error::Map {
            name: spec.name,
            source,
        })?;
        let map_type = info.map_type().ok();
        let found = format!(
            "type {map_type:?}, key {} bytes, value {} bytes, {} entries, flags {:#x}",
            info.key_size(),
            info.value_size(),
            info.max_entries(),
            info.map_flags()
        );
        if map_type != Some(spec.map_type)
            || info.key_size() as usize != spec.key_size
            || info.value_size() as usize != spec.value_size
            || info.max_entries() < spec.max_entries
            || info.map_flags() != spec.flags
        {
            return Err(Error::IncompatiblePin {
                path,
                found,
                expected: format!(
                    "type {:?}, key {} bytes, value {} bytes, at least {} entries, flags {:#x}",
                    spec.map_type, spec.key_size, spec.value_size, spec.max_entries, spec.flags
                ),
            });
        }
    }
    // The record itself: a pin with the right sizes but another ABI version or
    // fingerprint is just as incompatible.
    let path = layout.map(map_names::ABI);
    if path.exists() {
        let map = MapData::from_pin(&path).map_err(|source| Error::Map {
            name: map_names::ABI,
            source,
        })?;
        let abi: Array<MapData, AbiRecord> =
            Array::try_from(aya::maps::Map::Array(map)).map_err(|source| Error::Map {
                name: map_names::ABI,
                source,
            })?;
        let found = abi.get(&CONFIG_INDEX, 0).map_err(|source| Error::Map {
            name: map_names::ABI,
            source,
        })?;
        if found != AbiRecord::default() && !found.is_compatible() {
            return Err(Error::AbiMismatch {
                found,
                expected: AbiRecord::CURRENT,
            });
        }
    }
    Ok(())
}

/// Mounts bpffs at /sys/fs/bpf if nothing is mounted there yet (some distributions leave
/// it unmounted; pins need it). Returns whether it mounted it.
pub fn ensure_bpffs() -> Result<bool, Error> {
    let bpffs = Path::new("/sys/fs/bpf");
    if crate::sys::bpffs_mounted(bpffs) {
        return Ok(false);
    }
    fs::create_dir_all(bpffs).map_err(|source| Error::Io {
        what: "creating the bpffs mount point",
        path: bpffs.to_owned(),
        source,
    })?;
    crate::sys::mount_bpffs(bpffs).map_err(|source| Error::Io {
        what: "mounting bpffs",
        path: bpffs.to_owned(),
        source,
    })?;
    Ok(true)
}
