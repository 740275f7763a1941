//! Loading the object, verifying its programs, attaching them, and pinned state.
//!
//! Pinned layout (the daemon's; tests use private, unpinned copies):
//!
//! ```text
//! <root>/                     default /sys/fs/bpf/p25
//!   v<ABI_VERSION>/
//!     maps/<MAP NAME>         every map, including ABI (the layout record)
//!     links/<iface>:xdp       XDP link on <iface>
//!     links/<iface>:tc        tcx ingress link on <iface>
//!
//! (bpffs refuses names containing a dot; interface names cannot contain a colon.)
//! ```
//!
//! Pins keep filtering running while no daemon does: a pinned link holds its program,
//! which holds its maps. aya reuses a pinned map without checking its layout, so
//! [`Dataplane::open_pinned`] checks every existing pin (type, key and value sizes) and the
//! ABI record before reusing anything.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData, MapType},
    programs::{
        ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, LinkInfo, LinkType, PinnedLink},
        tc::{SchedClassifierLink, SchedClassifierLinkId},
        xdp::{XdpLink, XdpLinkId},
    },
};
use filter_common::{
    abi::{
        ABI_VERSION, ALLOW_HOST_MAX_ENTRIES, ALLOW_MAX_ENTRIES, AbiRecord, AllowValue, Bucket,
        CONFIG_INDEX, COUNTER_SLOTS, COUNTERS_ENTRIES, Config, Counter, EVENTS_RING_BYTES,
        EventStat, Ipv4Key, Ipv6Key, OFFENDERS_MAX_ENTRIES, OffenderKey, OffenderValue,
        ParseOutcome, RejectFallback, SUBSCRIBERS_MAX_ENTRIES, SYN_BUCKETS_MAX_ENTRIES,
        SubscriberLengths, SubscriberValue, map_names, program_names,
    },
    classify::Role,
};

pub use crate::sys::{bpf::pinned_link_ifindex, ifindex};
use crate::{EBPF_OBJECT, Error, KernelTables};

/// Default root of the pinned state.
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/p25";

/// Capacities of the policy maps. Defaults come from the object (see
/// `filter_common::abi`); tests and benchmarks may size them differently.
#[derive(Clone, Copy, Debug, Default)]
pub struct Capacity {
    /// Per-family capacity of the subscriber tries, if not the object's default.
    pub subscribers: Option<u32>,
    /// Per-family capacity of the allowlist tries and host hashes, if not the object's
    /// default.
    pub allow: Option<u32>,
}

/// Which hook a link uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Hook {
    /// XDP (native if the driver supports it, else generic).
    Xdp,
    /// TC ingress (tcx).
    Tc,
}

impl Hook {
    const fn suffix(self) -> &'static str {
        match self {
            Self::Xdp => "xdp",
            Self::Tc => "tc",
        }
    }
}

/// Where the pinned state lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinLayout {
    root: PathBuf,
}

impl PinLayout {
    /// A layout under `root` (normally [`DEFAULT_PIN_ROOT`]).
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

/// The loaded p25 object: both programs verified and ready to attach or test-run.
#[derive(Debug)]
pub struct Dataplane {
    ebpf: Ebpf,
}

impl Dataplane {
    /// Loads the embedded object with default map capacities and private (unpinned) maps,
    /// and verifies both programs.
    pub fn load() -> Result<Self, Error> {
        Self::load_with(Capacity::default())
    }

    /// Loads the embedded object with the given capacities and private maps.
    pub fn load_with(capacity: Capacity) -> Result<Self, Error> {
        let mut loader = EbpfLoader::new();
        set_capacity(&mut loader, capacity);
        Self::finish(&mut loader)
    }

    /// Loads the object with its maps pinned under `layout`: existing pins are reused
    /// after their layout has been checked (so a daemon restart keeps all state), missing
    /// ones are created and pinned.
    pub fn open_pinned(layout: &PinLayout) -> Result<Self, Error> {
        let mut dataplane = Self::open_pinned_maps(layout)?;
        dataplane.load_programs()?;
        Ok(dataplane)
    }

    /// [`Self::open_pinned`] without verifying the programs: the maps are created (or
    /// reused) and pinned, the programs still have to go through [`Self::load_programs`]
    /// before anything attaches or test-runs them. p25d fills the maps on one core while
    /// the verifier runs on the other (about 0.45 s for the four programs).
    pub fn open_pinned_maps(layout: &PinLayout) -> Result<Self, Error> {
        check_pinned_maps(layout)?;
        let maps_dir = layout.dir().join("maps");
        fs::create_dir_all(&maps_dir).map_err(|source| Error::Io {
            what: "creating the pin directory",
            path: maps_dir.clone(),
            source,
        })?;
        let paths: Vec<(&'static str, PathBuf)> = map_names::ALL
            .iter()
            .map(|name| (*name, layout.map(name)))
            .collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let ebpf = loader.load(EBPF_OBJECT).map_err(Error::Load)?;
        let mut dataplane = Self { ebpf };
        dataplane.stamp_abi()?;
        Ok(dataplane)
    }

    fn finish(loader: &mut EbpfLoader<'_>) -> Result<Self, Error> {
        let ebpf = loader.load(EBPF_OBJECT).map_err(Error::Load)?;
        let mut dataplane = Self { ebpf };
        dataplane.load_programs()?;
        Ok(dataplane)
    }

    /// Verifies and loads the four programs (XDP and TC for both roles). Their map
    /// references were resolved when the object was loaded, so the maps may already be
    /// taken out ([`Self::take_tables`]) and written meanwhile.
    pub fn load_programs(&mut self) -> Result<(), Error> {
        self.load_programs_wanted(|_, _| true)
    }

    /// Verifies and loads the programs `wanted` asks for, in the order XDP subscriber, XDP
    /// upstream, TC subscriber, TC upstream, asking again before each: a caller that learns
    /// only later which ones it needs (p25d, while it checks its policy) can stop the rest.
    /// A program skipped here is verified on first use ([`Self::xdp_for`],
    /// [`Self::tc_for`]).
    pub fn load_programs_wanted(
        &mut self,
        wanted: impl Fn(Hook, Role) -> bool,
    ) -> Result<(), Error> {
        for role in [Role::Subscriber, Role::Upstream] {
            if wanted(Hook::Xdp, role) {
                self.xdp_for(role)?;
            }
        }
        for role in [Role::Subscriber, Role::Upstream] {
            if wanted(Hook::Tc, role) {
                self.tc_for(role)?;
            }
        }
        Ok(())
    }

    /// Whether the program of `hook` and `role` is verified and loaded already.
    pub fn is_loaded(&self, hook: Hook, role: Role) -> bool {
        let name = match hook {
            Hook::Xdp => xdp_name(role),
            Hook::Tc => tc_name(role),
        };
        self.ebpf.program(name).is_some_and(|p| p.fd().is_ok())
    }

    /// Writes the ABI record into a fresh ABI map, or checks the one already there.
    fn stamp_abi(&mut self) -> Result<(), Error> {
        let name = map_names::ABI;
        let map = self.ebpf.map_mut(name).ok_or(Error::MissingMap(name))?;
        let mut abi: Array<&mut MapData, AbiRecord> =
            Array::try_from(map).map_err(|source| Error::Map { name, source })?;
        let found = abi
            .get(&CONFIG_INDEX, 0)
            .map_err(|source| Error::Map { name, source })?;
        if found == AbiRecord::default() {
            abi.set(CONFIG_INDEX, AbiRecord::CURRENT, 0)
                .map_err(|source| Error::Map { name, source })
        } else if found.is_compatible() {
            Ok(())
        } else {
            Err(Error::AbiMismatch {
                found,
                expected: AbiRecord::CURRENT,
            })
        }
    }

    /// The XDP program of a subscriber-facing attachment.
    pub fn xdp(&mut self) -> Result<&mut Xdp, Error> {
        self.xdp_for(Role::Subscriber)
    }

    /// The TC program of a subscriber-facing attachment.
    pub fn tc(&mut self) -> Result<&mut SchedClassifier, Error> {
        self.tc_for(Role::Subscriber)
    }

    /// The XDP program of an attachment of `role`, verified and loaded on first use.
    pub fn xdp_for(&mut self, role: Role) -> Result<&mut Xdp, Error> {
        verified(
            &mut self.ebpf,
            xdp_name(role),
            |p: &Xdp| p.fd().is_ok(),
            Xdp::load,
        )
    }

    /// The TC program of an attachment of `role`, verified and loaded on first use.
    pub fn tc_for(&mut self, role: Role) -> Result<&mut SchedClassifier, Error> {
        verified(
            &mut self.ebpf,
            tc_name(role),
            |p: &SchedClassifier| p.fd().is_ok(),
            SchedClassifier::load,
        )
    }

    /// Attaches the subscriber-facing XDP program to `interface`. The link lives as long
    /// as `self`.
    pub fn attach_xdp(&mut self, interface: &str, mode: XdpMode) -> Result<XdpLinkId, Error> {
        self.attach_xdp_as(interface, Role::Subscriber, mode)
    }

    /// Attaches the XDP program of `role` to `interface`. The link lives as long as `self`.
    pub fn attach_xdp_as(
        &mut self,
        interface: &str,
        role: Role,
        mode: XdpMode,
    ) -> Result<XdpLinkId, Error> {
        self.xdp_for(role)?
            .attach(interface, mode)
            .map_err(|source| program_error(xdp_name(role), source))
    }

    /// Attaches the subscriber-facing TC program to `interface` (tcx on kernels that have
    /// it). The link lives as long as `self`.
    pub fn attach_tc(
        &mut self,
        interface: &str,
        attach_type: TcAttachType,
    ) -> Result<SchedClassifierLinkId, Error> {
        self.attach_tc_as(interface, Role::Subscriber, attach_type)
    }

    /// Attaches the TC program of `role` to `interface`. The link lives as long as `self`.
    pub fn attach_tc_as(
        &mut self,
        interface: &str,
        role: Role,
        attach_type: TcAttachType,
    ) -> Result<SchedClassifierLinkId, Error> {
        self.tc_for(role)?
            .attach(interface, attach_type)
            .map_err(|source| program_error(tc_name(role), source))
    }

    /// Makes sure `hook` runs this object's program for `role` on `interface` through a
    /// pinned link
    /// at `layout.link(interface, hook)`, which keeps it attached after this process exits.
    ///
    /// An existing pinned link is upgraded in place (`bpf_link_update`, via aya's
    /// `attach_to_link`): the program is swapped atomically, with no instant unfiltered.
    /// A pinned link whose interface has gone away (or was recreated) cannot be updated;
    /// it is unpinned and a new link is created. A role change is an upgrade too: the
    /// role's program replaces the other in place.
    pub fn attach_pinned(
        &mut self,
        layout: &PinLayout,
        interface: &str,
        hook: Hook,
        role: Role,
        xdp_mode: XdpMode,
    ) -> Result<Attached, Error> {
        let path = layout.link(interface, hook);
        let ifindex = ifindex(interface).ok_or_else(|| Error::NoSuchInterface(interface.into()))?;
        if let Ok(pinned) = PinnedLink::from_pin(&path) {
            let linked_ifindex = pinned_link_ifindex(&path);
            let link = FdLink::from(pinned);
            if let Err(err) = check_link_type(&link, hook, &path) {
                tracing::warn!(%interface, ?hook, error = %err, "pinned link is not ours; replacing it");
            } else if linked_ifindex == Some(ifindex) {
                match self.upgrade(hook, role, link) {
                    Ok(_) => {
                        return Ok(Attached {
                            ifindex,
                            adopted: true,
                        });
                    }
                    Err(err) => {
                        tracing::warn!(%interface, ?hook, error = %err, "pinned link cannot be updated; replacing it");
                    }
                }
            } else {
                tracing::info!(%interface, ?hook, ?linked_ifindex, ifindex, "pinned link belongs to a vanished interface; replacing it");
            }
            remove_pin(&path)?;
        }
        let fd_link = match hook {
            Hook::Xdp => {
                let id = self.attach_xdp_as(interface, role, xdp_mode)?;
                let link = self
                    .xdp_for(role)?
                    .take_link(id)
                    .map_err(|source| program_error(xdp_name(role), source))?;
                FdLink::try_from(link).map_err(|source| Error::Link {
                    what: "an XDP link without bpf_link support cannot be pinned",
                    source,
                })?
            }
            Hook::Tc => {
                let id = self.attach_tc_as(interface, role, TcAttachType::Ingress)?;
                let link = self
                    .tc_for(role)?
                    .take_link(id)
                    .map_err(|source| program_error(tc_name(role), source))?;
                FdLink::try_from(link).map_err(|source| Error::Link {
                    what: "a netlink TC attachment cannot be pinned (kernel without tcx?)",
                    source,
                })?
            }
        };
        let links_dir = layout.links_dir();
        fs::create_dir_all(&links_dir).map_err(|source| Error::Io {
            what: "creating the link pin directory",
            path: links_dir,
            source,
        })?;
        fd_link.pin(&path).map_err(|source| Error::Pin {
            path: path.clone(),
            source,
        })?;
        Ok(Attached {
            ifindex,
            adopted: false,
        })
    }

    /// Moves a link pinned by another ABI version's state (at `old`) into `layout`: its
    /// program is swapped for this object's in place (`bpf_link_update`), so the interface
    /// is never unfiltered; then it is pinned here and unpinned there.
    pub fn migrate_link(
        &mut self,
        layout: &PinLayout,
        interface: &str,
        hook: Hook,
        role: Role,
        old: &Path,
    ) -> Result<(), Error> {
        let pinned = PinnedLink::from_pin(old).map_err(|source| Error::Link {
            what: "opening a pinned link of another ABI version",
            source,
        })?;
        let link = FdLink::from(pinned);
        check_link_type(&link, hook, old)?;
        let link = self.upgrade(hook, role, link)?;
        let links_dir = layout.links_dir();
        fs::create_dir_all(&links_dir).map_err(|source| Error::Io {
            what: "creating the link pin directory",
            path: links_dir,
            source,
        })?;
        let new = layout.link(interface, hook);
        remove_pin(&new)?;
        link.pin(&new).map_err(|source| Error::Pin {
            path: new.clone(),
            source,
        })?;
        remove_pin(old)
    }

    /// Swaps this object's program into an existing link and hands the link back.
    fn upgrade(&mut self, hook: Hook, role: Role, link: FdLink) -> Result<FdLink, Error> {
        let taken = |source| Error::Link {
            what: "taking the updated link back from aya",
            source,
        };
        Ok(match hook {
            Hook::Xdp => {
                let link = XdpLink::try_from(link).map_err(|source| Error::Link {
                    what: "the pinned link is not an XDP link",
                    source,
                })?;
                let prog = self.xdp_for(role)?;
                let id = prog
                    .attach_to_link(link)
                    .map_err(|source| program_error(xdp_name(role), source))?;
                // Take it out of the program's link set: the pin owns the attachment, and
                // dropping this object must not touch it.
                let link = prog
                    .take_link(id)
                    .map_err(|source| program_error(xdp_name(role), source))?;
                FdLink::try_from(link).map_err(taken)?
            }
            Hook::Tc => {
                let link = SchedClassifierLink::try_from(link).map_err(|source| Error::Link {
                    what: "the pinned link is not a tcx link",
                    source,
                })?;
                let prog = self.tc_for(role)?;
                let id = prog
                    .attach_to_link(link)
                    .map_err(|source| program_error(tc_name(role), source))?;
                let link = prog
                    .take_link(id)
                    .map_err(|source| program_error(tc_name(role), source))?;
                FdLink::try_from(link).map_err(taken)?
            }
        })
    }

    /// Takes the maps out of the object as typed tables. Call once; the programs keep
    /// their own references to the maps.
    pub fn take_tables(&mut self) -> Result<KernelTables, Error> {
        KernelTables::from_ebpf(&mut self.ebpf)
    }

    /// Takes the drop-event ring buffer out of the object, for the one reader that drains
    /// it.
    pub fn take_events(&mut self) -> Result<aya::maps::RingBuf<MapData>, Error> {
        let name = map_names::EVENTS;
        let map = self.ebpf.take_map(name).ok_or(Error::MissingMap(name))?;
        aya::maps::RingBuf::try_from(map).map_err(|source| Error::Map { name, source })
    }
}

/// Checks that the link pinned at `path` is of the kind `hook` makes (an XDP link, a tcx
/// link) before anything reuses it: a pin of another kind is not ours to update.
fn check_link_type(link: &FdLink, hook: Hook, path: &Path) -> Result<(), Error> {
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

/// The result of [`Dataplane::attach_pinned`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attached {
    /// The interface's index now.
    pub ifindex: u32,
    /// True when an existing pinned link was upgraded in place.
    pub adopted: bool,
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

fn remove_pin(path: &Path) -> Result<(), Error> {
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

fn set_capacity(loader: &mut EbpfLoader<'_>, capacity: Capacity) {
    if let Some(n) = capacity.subscribers {
        loader.map_max_entries(map_names::SUBSCRIBERS_V4, n);
        loader.map_max_entries(map_names::SUBSCRIBERS_V6, n);
        loader.map_max_entries(map_names::SUBSCRIBERS_HASH_V4, n);
        loader.map_max_entries(map_names::SUBSCRIBERS_HASH_V6, n);
    }
    if let Some(n) = capacity.allow {
        loader.map_max_entries(map_names::ALLOW_V4, n);
        loader.map_max_entries(map_names::ALLOW_V6, n);
        loader.map_max_entries(map_names::ALLOW_HOST_V4, n);
        loader.map_max_entries(map_names::ALLOW_HOST_V6, n);
    }
}

/// The XDP entry point of `role`.
pub const fn xdp_name(role: Role) -> &'static str {
    match role {
        Role::Subscriber => program_names::XDP,
        Role::Upstream => program_names::XDP_UPSTREAM,
    }
}

/// The TC entry point of `role`.
pub const fn tc_name(role: Role) -> &'static str {
    match role {
        Role::Subscriber => program_names::TC,
        Role::Upstream => program_names::TC_UPSTREAM,
    }
}

/// The program `name` as a `T`, verified and loaded first if it is not yet (aya refuses a
/// second load of the same program).
fn verified<'a, T>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
    loaded: impl FnOnce(&T) -> bool,
    load: impl FnOnce(&mut T) -> Result<(), ProgramError>,
) -> Result<&'a mut T, Error>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let program: &'a mut T = ebpf
        .program_mut(name)
        .ok_or(Error::MissingProgram(name))?
        .try_into()
        .map_err(|source| program_error(name, source))?;
    if !loaded(program) {
        load(program).map_err(|source| program_error(name, source))?;
    }
    Ok(program)
}

fn program_error(name: &'static str, source: ProgramError) -> Error {
    Error::Program { name, source }
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
