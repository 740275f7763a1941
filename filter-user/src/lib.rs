//! p25 userspace library: the embedded eBPF object, loading and attaching it, typed access
//! to its maps, and the host-side instance of the shared classifier (the reference model).
//!
//! - [`loader`]: load and verify the programs, attach them.
//! - [`tables`]: the kernel's policy and counter maps, typed and validated.
//! - [`model`]: the same classifier on the host, over plain Rust tables.

pub mod loader;
pub mod model;
pub mod tables;

pub use loader::Dataplane;
pub use tables::{CounterSnapshot, KernelTables};

use ipnet::IpNet;

/// The eBPF object built by build.rs (aya-build), embedded so binaries are self-contained.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/filter-ebpf"));

/// Everything that can go wrong in this library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The object could not be parsed or its maps created.
    #[error("loading the p25 eBPF object failed")]
    Load(#[source] aya::EbpfError),
    /// The object lacks a program this library expects: a build mismatch.
    #[error("the p25 eBPF object has no program `{0}` (stale build?)")]
    MissingProgram(&'static str),
    /// The object lacks a map this library expects: a build mismatch.
    #[error("the p25 eBPF object has no map `{0}` (stale build?)")]
    MissingMap(&'static str),
    /// Loading (verifying), attaching or running a program failed.
    #[error("program `{name}`: {source}")]
    Program {
        /// The program.
        name: &'static str,
        /// What went wrong; for a verifier rejection this carries the verifier log.
        #[source]
        source: aya::programs::ProgramError,
    },
    /// A map operation failed.
    #[error("map `{name}`: {source}")]
    Map {
        /// The map.
        name: &'static str,
        /// What went wrong.
        #[source]
        source: aya::maps::MapError,
    },
    /// A prefix with bits set past its length: almost always a typo, and ambiguous.
    #[error("{net} has host bits set; the network is {}", net.trunc())]
    HostBits {
        /// The offending prefix.
        net: IpNet,
    },
}

/// Checks that `net` has no host bits set. The kernel would silently ignore them, which
/// would hide a typo such as 100.64.1.1/24 meant as /32.
pub fn check_prefix(net: IpNet) -> Result<IpNet, Error> {
    if net.trunc() == net {
        Ok(net)
    } else {
        Err(Error::HostBits { net })
    }
}
