//! p25 userspace library: the embedded eBPF object, loading and attaching it, typed access
//! to its maps, the policy and how it reaches the maps, and the host-side instance of the
//! shared classifier (the reference model). `docs/architecture.md` draws the data flow.
//!
//! - [`loader`]: load and verify the programs, pin and attach them, adopt pinned state.
//! - [`tables`]: the kernel's policy and counter maps, typed and validated.
//! - [`policy`]: the YAML policy and its list files, checked with located diagnostics.
//! - [`runtime`]: the `p25ctl allow` entries and their state file.
//! - [`desired`]: policy and runtime entries as the entries the maps should hold.
//! - [`sync`]: the difference between two states, applied in the safe order.
//! - [`control`]: the p25ctl ↔ p25d socket protocol and its request handler.
//! - [`metrics`], [`offenders`]: the Prometheus exposition, the abuse-desk views.
//! - [`model`]: the same classifier on the host, over plain Rust tables.
//! - [`cli_docs`]: man pages and completions from the binaries' clap definitions.
//! - [`sys`]: every operating-system interface beyond std and aya (bpf(2) batches, locks,
//!   groups, interface names, bpffs, clocks, netlink), and nearly all of the `unsafe`.
//!
//! [`parse_prefix`] reads a prefix as an operator writes it (the policy checker, p25ctl);
//! [`check_prefix`] refuses host bits and IPv4-mapped prefixes wherever one comes from.

pub mod cli_docs;
pub mod control;
pub mod desired;
pub mod fleet;
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

use std::{net::IpAddr, str::FromStr as _};

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
    /// Text that is neither an address nor a prefix in CIDR notation.
    #[error("invalid prefix {text:?}: {why}")]
    InvalidPrefix {
        /// The text as written.
        text: String,
        /// Which part is wrong.
        why: String,
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

/// Parses a prefix as written: CIDR, or a bare address meaning a host route. Errors say
/// which part is wrong, since "invalid IP address syntax" alone leaves the operator to
/// guess. Host bits are accepted here (the policy checker words that error its own way);
/// [`check_prefix`] refuses them.
pub fn parse_prefix(text: &str) -> Result<IpNet, Error> {
    // The common case through std's address parsers, which are several times faster than
    // ipnet's; anything else (and every error) through ipnet, for its exact judgement.
    let (addr, len) = match text.split_once('/') {
        Some((addr, len)) => (addr, Some(len)),
        None => (text, None),
    };
    let fast = match (IpAddr::from_str(addr), len) {
        (Ok(addr), None) => Some(IpNet::from(addr)),
        (Ok(addr), Some(len))
            if (1..=3).contains(&len.len()) && len.bytes().all(|b| b.is_ascii_digit()) =>
        {
            len.parse::<u8>()
                .ok()
                .and_then(|len| IpNet::new(addr, len).ok())
        }
        _ => None,
    };
    if let Some(net) = fast {
        return Ok(net);
    }
    if let Ok(net) = IpNet::from_str(text) {
        return Ok(net);
    }
    let invalid = |why: String| Error::InvalidPrefix {
        text: text.to_owned(),
        why,
    };
    let Some((addr, len)) = text.split_once('/') else {
        return IpAddr::from_str(text)
            .map(IpNet::from)
            .map_err(|_| invalid("not an IPv4 or IPv6 address or prefix".to_owned()));
    };
    let Ok(addr) = IpAddr::from_str(addr) else {
        return Err(invalid(format!("{addr:?} is not an IPv4 or IPv6 address")));
    };
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let digits = !len.is_empty() && len.bytes().all(|b| b.is_ascii_digit());
    Err(invalid(match len.parse::<u32>() {
        Ok(len) if digits && len > max => format!(
            "prefix length {len} is longer than {max}, the most an {} prefix can have",
            if addr.is_ipv4() { "IPv4" } else { "IPv6" }
        ),
        _ => format!("prefix length {len:?} is not a number from 0 to {max}"),
    }))
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
    fn prefix_errors_name_the_problem() {
        let cases = [
            ("10.0.0.0/33", "prefix length 33 is longer than 32"),
            ("::/200", "prefix length 200 is longer than 128"),
            (
                "10.0.0.0/x",
                "prefix length \"x\" is not a number from 0 to 32",
            ),
            (
                "10.0.0.0/",
                "prefix length \"\" is not a number from 0 to 32",
            ),
            ("10.0.0.0/-1", "prefix length \"-1\" is not a number"),
            ("10.0.0/8", "\"10.0.0\" is not an IPv4 or IPv6 address"),
            ("mail.example", "not an IPv4 or IPv6 address or prefix"),
            ("300.1.1.1", "not an IPv4 or IPv6 address or prefix"),
        ];
        for (text, want) in cases {
            let got = parse_prefix(text).err().map(|e| e.to_string());
            assert!(
                got.as_ref()
                    .is_some_and(|got| got.starts_with(&format!("invalid prefix {text:?}: "))
                        && got.contains(want)),
                "{text}: {got:?}"
            );
        }
    }

    #[test]
    fn bare_addresses_are_host_prefixes_and_host_bits_are_left_to_check_prefix() {
        for (text, want) in [
            ("192.0.2.1", "192.0.2.1/32"),
            ("2001:db8::1", "2001:db8::1/128"),
            ("100.64.1.0/24", "100.64.1.0/24"),
            ("100.64.1.1/24", "100.64.1.1/24"),
        ] {
            assert_eq!(
                parse_prefix(text).map(|n| n.to_string()).ok().as_deref(),
                Some(want),
                "{text}"
            );
        }
        let host_bits = parse_prefix("100.64.1.1/24").and_then(check_prefix);
        assert!(matches!(host_bits, Err(Error::HostBits { .. })));
    }

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
