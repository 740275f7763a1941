//! p25 userspace library: the embedded eBPF object, loading and attaching it, typed access
//! to its maps, and the host-side instance of the shared classifier (the reference model).
//!
//! - [`loader`]: load and verify the programs, attach them.
//! - [`tables`]: the kernel's policy and counter maps, typed and validated.
//! - [`model`]: the same classifier on the host, over plain Rust tables.

pub mod cli_docs;
pub mod control;
pub mod loader;
pub mod metrics;
pub mod model;
pub mod offenders;
pub mod policy;
pub mod runtime;
pub mod sync;
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
    /// A file or directory operation failed.
    #[error("{what} ({}): {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// On what.
        path: std::path::PathBuf,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// Pinned maps were created by an incompatible build.
    #[error(
        "the pinned maps were created with ABI version {} (layout {:#010x}) but this build uses \
         version {} (layout {:#010x}); remove them with `p25d detach` or run the matching p25d",
        found.version, found.fingerprint, expected.version, expected.fingerprint
    )]
    AbiMismatch {
        /// The record found in the pinned ABI map.
        found: filter_common::abi::AbiRecord,
        /// This build's record.
        expected: filter_common::abi::AbiRecord,
    },
    /// A pinned map's layout differs from what this build expects.
    #[error(
        "pinned map {} has {found}, expected {expected}; it was created by another p25 build: \
         remove it with `p25d detach`",
        path.display()
    )]
    IncompatiblePin {
        /// The pin.
        path: std::path::PathBuf,
        /// Its layout.
        found: String,
        /// The layout this build needs.
        expected: String,
    },
    /// The interface does not exist (in this network namespace).
    #[error("no network interface named {0:?}")]
    NoSuchInterface(String),
    /// A link could not be converted or updated.
    #[error("{what}: {source}")]
    Link {
        /// What was being done.
        what: &'static str,
        /// Why it failed.
        #[source]
        source: aya::programs::links::LinkError,
    },
    /// Pinning failed.
    #[error("pinning {}: {source}", path.display())]
    Pin {
        /// Where.
        path: std::path::PathBuf,
        /// Why it failed.
        #[source]
        source: aya::pin::PinError,
    },
    /// The runtime state file is unusable.
    #[error("runtime state file {}: {message}", path.display())]
    State {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        message: String,
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
