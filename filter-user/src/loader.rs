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
    fs,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData},
    programs::{
        ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, SchedClassifierLinkId},
        xdp::{XdpLink, XdpLinkId},
    },
};
use filter_common::{
    abi::{AbiRecord, CONFIG_INDEX, map_names, program_names},
    classify::Role,
};

// Pinned state (layout, map specs, link status, removal): a child module so that the
// loading and attaching here stay readable on their own.
mod pins;

pub(crate) use pins::check_pinned_maps;
pub use pins::{
    LinkStatus, PinLayout, detach_pinned, ensure_bpffs, links_in, pinned_link_status,
    remove_all_pins,
};
use pins::{check_link_type, remove_pin};

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

/// The result of [`Dataplane::attach_pinned`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attached {
    /// The interface's index now.
    pub ifindex: u32,
    /// True when an existing pinned link was upgraded in place.
    pub adopted: bool,
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
