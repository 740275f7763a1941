//! The benchmark-only eBPF object (crate `bench-ebpf`): floor programs and the generator.

use anyhow::{Context as _, Result};
use aya::{
    Ebpf,
    programs::{SchedClassifier, Xdp},
};

/// The object built by build.rs.
static BENCH_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bench-ebpf"));

/// `XDP_PASS` and nothing else.
pub const XDP_PASS_FLOOR: &str = "floor_xdp_pass";
/// `XDP_DROP` and nothing else.
pub const XDP_DROP_FLOOR: &str = "floor_xdp_drop";
/// `TC_ACT_OK` and nothing else.
pub const TC_OK_FLOOR: &str = "floor_tc_ok";
/// The live-frames XDP_TX generator.
pub const GENERATOR: &str = "gen_xdp_tx";
/// The generator's configuration (TTL, hop limit, checksum, number of sources).
pub const GEN_CONFIG: &str = "GEN_CONFIG";
/// The generator's table of rotating source addresses.
pub const GEN_SOURCES: &str = "GEN_SOURCES";

/// The loaded benchmark object, every program verified.
#[derive(Debug)]
pub struct BenchObject {
    ebpf: Ebpf,
}

impl BenchObject {
    /// Loads and verifies all programs.
    pub fn load() -> Result<Self> {
        let mut ebpf = Ebpf::load(BENCH_OBJECT).context("loading the bench eBPF object")?;
        for name in [XDP_PASS_FLOOR, XDP_DROP_FLOOR, GENERATOR] {
            let prog: &mut Xdp = ebpf
                .program_mut(name)
                .with_context(|| format!("no program {name}"))?
                .try_into()?;
            prog.load().with_context(|| format!("loading {name}"))?;
        }
        let tc: &mut SchedClassifier = ebpf
            .program_mut(TC_OK_FLOOR)
            .context("no TC floor")?
            .try_into()?;
        tc.load().context("loading the TC floor")?;
        Ok(Self { ebpf })
    }

    /// An XDP program by name.
    pub fn xdp(&mut self, name: &str) -> Result<&mut Xdp> {
        Ok(self
            .ebpf
            .program_mut(name)
            .with_context(|| format!("no program {name}"))?
            .try_into()?)
    }

    /// The TC floor.
    pub fn tc_floor(&mut self) -> Result<&mut SchedClassifier> {
        Ok(self
            .ebpf
            .program_mut(TC_OK_FLOOR)
            .context("no TC floor")?
            .try_into()?)
    }

    /// The underlying object (for its maps).
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }
}
