//! p25 userspace library: the embedded eBPF object, loading and attaching it, typed access
//! to its maps, and the host-side instance of the shared classifier (the reference model).
//!
//! - [`loader`]: load and verify the programs, attach them.
//! - [`tables`]: the kernel's policy and counter maps, typed and validated.
//! - [`model`]: the same classifier on the host, over plain Rust tables.
//! - [`sys`]: every operating-system interface beyond std and aya (bpf(2) batches, locks,
//!   groups, interface names, bpffs, clocks, netlink), and nearly all of the `unsafe`.

pub mod cli_docs;
pub mod control;
pub mod desired;
pub mod loader;
pub mod metrics;
pub mod model;
pub mod offenders;
pub mod policy;
pub mod runtime;
pub mod sync;
pub mod sys;
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
    /// An IPv4-mapped IPv6 prefix (inside ::ffff:0:0/96). No IPv6 packet carries such an
    /// address on the wire: IPv4 traffic is matched by IPv4 prefixes, so the entry would
    /// silently match nothing.
    #[error(
        "{net} is an IPv4-mapped IPv6 prefix, which no packet carries (IPv4 traffic is \
         matched by IPv4 prefixes); use {v4}"
    )]
    Ipv4Mapped {
        /// The offending prefix.
        net: IpNet,
        /// The IPv4 prefix it stands for.
        v4: ipnet::Ipv4Net,
    },
}

/// Checks that `net` has no host bits set (the kernel would silently ignore them, which
/// would hide a typo such as 100.64.1.1/24 meant as /32) and is not an IPv4-mapped IPv6
/// prefix (it would match nothing; see [`Error::Ipv4Mapped`]).
pub fn check_prefix(net: IpNet) -> Result<IpNet, Error> {
    if net.trunc() != net {
        return Err(Error::HostBits { net });
    }
    if let Some(v4) = ipv4_mapped(net) {
        return Err(Error::Ipv4Mapped { net, v4 });
    }
    Ok(net)
}

/// The IPv4 prefix an IPv6 prefix inside ::ffff:0:0/96 stands for; `None` for any other
/// prefix. Wider prefixes that merely contain ::ffff:0:0/96 (::/0, ::/64) are not mapped
/// addresses and are left to the other checks.
pub fn ipv4_mapped(net: IpNet) -> Option<ipnet::Ipv4Net> {
    let IpNet::V6(v6) = net else { return None };
    let len = v6.prefix_len().checked_sub(96)?;
    let v4 = v6.addr().to_ipv4_mapped()?;
    ipnet::Ipv4Net::new(v4, len).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_mapped_prefixes_are_refused_with_the_ipv4_form()
    -> Result<(), Box<dyn std::error::Error>> {
        for (text, v4) in [
            ("::ffff:192.0.2.1/128", "192.0.2.1/32"),
            ("::ffff:198.51.100.0/120", "198.51.100.0/24"),
            ("::ffff:0:0/96", "0.0.0.0/0"),
        ] {
            let result = check_prefix(text.parse()?);
            assert!(
                matches!(&result, Err(Error::Ipv4Mapped { .. })),
                "{text}: expected Ipv4Mapped, got {result:?}"
            );
            let message = result.err().map(|e| e.to_string()).unwrap_or_default();
            assert!(message.contains(&format!("use {v4}")), "{text}: {message}");
        }
        // Neighbours of the mapped range, and wider prefixes containing it, stay usable.
        for text in [
            "::/0",
            "::/64",
            "::fffe:c000:201/128",
            "2001:db8::/32",
            "::1/128",
        ] {
            let net: IpNet = text.parse()?;
            assert_eq!(check_prefix(net)?, net, "{text}");
        }
        Ok(())
    }
}
