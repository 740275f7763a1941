//! Loading the object, verifying its programs, and attaching them.

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        SchedClassifier, TcAttachType, Xdp, XdpMode, tc::SchedClassifierLinkId, xdp::XdpLinkId,
    },
};
use filter_common::abi::program_names;

use crate::{EBPF_OBJECT, Error, KernelTables};

/// Capacities of the policy maps. Defaults come from the object (see
/// `filter_common::abi`); tests and benchmarks may size them differently.
#[derive(Clone, Copy, Debug, Default)]
pub struct Capacity {
    /// Per-family capacity of the subscriber tries, if not the object's default.
    pub subscribers: Option<u32>,
    /// Per-family capacity of the allowlist tries, if not the object's default.
    pub allow: Option<u32>,
}

/// The loaded p25 object: both programs verified and ready to attach or test-run.
#[derive(Debug)]
pub struct Dataplane {
    ebpf: Ebpf,
}

impl Dataplane {
    /// Loads the embedded object with default map capacities and verifies both programs.
    pub fn load() -> Result<Self, Error> {
        Self::load_with(Capacity::default())
    }

    /// Loads the embedded object with the given capacities and verifies both programs.
    pub fn load_with(capacity: Capacity) -> Result<Self, Error> {
        use filter_common::abi::map_names::{ALLOW_V4, ALLOW_V6, SUBSCRIBERS_V4, SUBSCRIBERS_V6};
        let mut loader = EbpfLoader::new();
        if let Some(n) = capacity.subscribers {
            loader.map_max_entries(SUBSCRIBERS_V4, n);
            loader.map_max_entries(SUBSCRIBERS_V6, n);
        }
        if let Some(n) = capacity.allow {
            loader.map_max_entries(ALLOW_V4, n);
            loader.map_max_entries(ALLOW_V6, n);
        }
        let ebpf = loader.load(EBPF_OBJECT).map_err(Error::Load)?;
        let mut dataplane = Self { ebpf };
        dataplane
            .xdp()?
            .load()
            .map_err(|source| program_error(program_names::XDP, source))?;
        dataplane
            .tc()?
            .load()
            .map_err(|source| program_error(program_names::TC, source))?;
        Ok(dataplane)
    }

    /// The XDP program.
    pub fn xdp(&mut self) -> Result<&mut Xdp, Error> {
        let name = program_names::XDP;
        self.ebpf
            .program_mut(name)
            .ok_or(Error::MissingProgram(name))?
            .try_into()
            .map_err(|source| program_error(name, source))
    }

    /// The TC program.
    pub fn tc(&mut self) -> Result<&mut SchedClassifier, Error> {
        let name = program_names::TC;
        self.ebpf
            .program_mut(name)
            .ok_or(Error::MissingProgram(name))?
            .try_into()
            .map_err(|source| program_error(name, source))
    }

    /// Attaches the XDP program to `interface`. The link lives as long as `self`.
    pub fn attach_xdp(&mut self, interface: &str, mode: XdpMode) -> Result<XdpLinkId, Error> {
        self.xdp()?
            .attach(interface, mode)
            .map_err(|source| program_error(program_names::XDP, source))
    }

    /// Attaches the TC program to `interface` (tcx on kernels that have it). The link lives
    /// as long as `self`.
    pub fn attach_tc(
        &mut self,
        interface: &str,
        attach_type: TcAttachType,
    ) -> Result<SchedClassifierLinkId, Error> {
        self.tc()?
            .attach(interface, attach_type)
            .map_err(|source| program_error(program_names::TC, source))
    }

    /// Takes the maps out of the object as typed tables. Call once; the programs keep
    /// their own references to the maps.
    pub fn take_tables(&mut self) -> Result<KernelTables, Error> {
        KernelTables::from_ebpf(&mut self.ebpf)
    }
}

fn program_error(name: &'static str, source: aya::programs::ProgramError) -> Error {
    Error::Program { name, source }
}
