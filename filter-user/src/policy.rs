//! The policy file: what p25 filters, where, and who is exempt.
//!
//! A policy is a YAML document (schema version 1, described in `docs/policy.md`). Loading
//! one either yields a [`Checked`] policy, possibly with warnings, or fails with every
//! problem found, each located at `file:line:column` like a compiler diagnostic, so that
//! an operator can fix a whole file in one go rather than one error per reload.
//!
//! Inside: `raw` is the document as written, deserialized by serde-saphyr (which catches
//! syntax, types and unknown fields, with their location, and gives every value that a
//! semantic rule may complain about its position through `Spanned`); `lists` streams the
//! list files (`subscriber_files`, `allow_files`) that keep big lists out of the YAML;
//! `check` applies the semantic rules (prefixes, duplicates, ports, limits, expiry) to
//! both and reports all of them.

mod check;
mod lists;
mod raw;

use std::{
    fmt,
    path::{Path, PathBuf},
    time::SystemTime,
};

pub use check::{MAX_DEPTH, MAX_EXPIRY_AHEAD, MAX_POLICY_BYTES};
pub use lists::MAX_LIST_FILE_BYTES;

use filter_common::abi::{BlockAction, FragmentPolicy, Mode};
use ipnet::IpNet;
use serde::{Deserialize, Serialize, Serializer};

/// The only schema version this build understands.
pub const POLICY_VERSION: u32 = 1;

/// Longest `comment` or `owner` accepted on an allowlist entry, in bytes. Free text ends
/// up in logs and status output, where a pasted e-mail thread does not belong.
pub const MAX_TEXT_BYTES: usize = 256;

/// A validated policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Policy {
    /// Schema version; always [`POLICY_VERSION`] once validated.
    pub version: u32,
    /// Global settings.
    pub defaults: Defaults,
    /// Interfaces to attach to.
    pub interfaces: Vec<Interface>,
    /// Subscriber address space, whose port-25 traffic is filtered.
    pub subscribers: Vec<SubscriberEntry>,
    /// Exemptions written in the policy document: authorized relays, customers with
    /// their own mail servers.
    pub allow: Vec<AllowEntry>,
    /// Exemptions from the allow list files, sorted: prefixes only (no SYN limit, no
    /// expiry), so that a million of them cost 18 bytes each.
    pub allow_listed: Vec<IpNet>,
    /// The subscriber list files, as resolved against the policy file's directory.
    pub subscriber_files: Vec<PathBuf>,
    /// The allow list files, likewise.
    pub allow_files: Vec<PathBuf>,
    /// Whether an empty subscriber list was declared intentional.
    pub allow_empty_subscribers: bool,
}

impl Policy {
    /// A policy with no entries and default settings (what a daemon holds before its
    /// first policy is in force).
    pub fn empty() -> Self {
        Self {
            version: POLICY_VERSION,
            defaults: Defaults::default(),
            interfaces: Vec::new(),
            subscribers: Vec::new(),
            allow: Vec::new(),
            allow_listed: Vec::new(),
            subscriber_files: Vec::new(),
            allow_files: Vec::new(),
            allow_empty_subscribers: true,
        }
    }

    /// Sorts the lists by prefix, the order [`crate::desired::Desired`] walks them in
    /// (a parsed policy already is).
    pub fn sort(&mut self) {
        self.subscribers.sort_by_key(|s| s.prefix);
        self.allow.sort_by_key(|a| a.prefix);
        self.allow_listed.sort_unstable();
    }

    /// Every list file the policy reads: a change to any of them is a change of the
    /// policy.
    pub fn list_files(&self) -> impl Iterator<Item = &Path> {
        self.subscriber_files
            .iter()
            .chain(&self.allow_files)
            .map(PathBuf::as_path)
    }

    /// How many allowlist entries the policy has, inline and from list files.
    pub fn allow_len(&self) -> usize {
        self.allow.len() + self.allow_listed.len()
    }

    /// The policy's allowlist entry for exactly `prefix`, if any (a listed one carries no
    /// comment, owner, expiry or limit). A binary search: the lists must be sorted, as
    /// [`parse`] returns them (see [`Policy::sort`]).
    pub fn allow_entry(&self, prefix: IpNet) -> Option<AllowEntry> {
        if let Ok(i) = self.allow.binary_search_by_key(&prefix, |a| a.prefix) {
            return self.allow.get(i).cloned();
        }
        self.allow_listed
            .binary_search(&prefix)
            .ok()
            .map(|_| AllowEntry::listed(prefix))
    }

    /// A subscriber prefix strictly inside `prefix` (narrower than it and covered by
    /// it), if any: what makes an allowlist entry of `prefix` exempt a whole subscriber
    /// block. A binary search to where `prefix`'s addresses begin, then a walk over the
    /// subscriber prefixes inside its range only: `p25ctl allow` of a host looks at the
    /// few entries at that one address instead of all 100k subscribers (a linear scan
    /// was about a millisecond of every allow). The lists must be sorted, as [`parse`]
    /// returns them.
    pub fn subscriber_inside(&self, prefix: IpNet) -> Option<&SubscriberEntry> {
        let (first, last) = (prefix.network(), prefix.broadcast());
        // The smallest key at `first`: prefixes sort by (family, address, length).
        let start = IpNet::new(first, 0).ok()?;
        let from = self.subscribers.partition_point(|s| s.prefix < start);
        self.subscribers
            .get(from..)?
            .iter()
            .take_while(|s| {
                let network = s.prefix.network();
                network.is_ipv4() == first.is_ipv4() && network <= last
            })
            .find(|s| s.prefix.prefix_len() > prefix.prefix_len() && prefix.contains(&s.prefix))
    }

    /// Every allowlist entry, inline ones first, then listed ones in prefix order.
    pub fn allow_entries(&self) -> impl Iterator<Item = AllowEntry> + '_ {
        self.allow
            .iter()
            .cloned()
            .chain(self.allow_listed.iter().map(|net| AllowEntry::listed(*net)))
    }
}

/// Global settings (`defaults:`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Defaults {
    /// Mode of every subscriber prefix that does not set its own.
    pub mode: PolicyMode,
    /// Treatment of TCP fragments whose ports cannot be seen.
    pub fragments: Fragments,
    /// Treatment of subscriber TCP whose ports cannot be read because of its headers.
    pub unreadable_tcp: UnreadableTcpPolicy,
    /// Ports the rules apply to; version 1 supports exactly `[25]`.
    pub ports: Vec<u16>,
    /// What a block does, for every subscriber prefix that does not set its own.
    pub action: PolicyAction,
    /// RSTs reject mode sends per second, for the whole router.
    pub reject_rate: u32,
    /// RSTs reject mode may send at once.
    pub reject_burst: u32,
}

/// Default of `defaults.reject_rate`: RSTs per second for the whole router. Enough for
/// every mail client of a large access network retrying at once, far too few to reflect
/// a flood at anyone.
pub const DEFAULT_REJECT_RATE: u32 = 100;
/// Default of `defaults.reject_burst`.
pub const DEFAULT_REJECT_BURST: u32 = 20;

impl Default for Defaults {
    fn default() -> Self {
        Self {
            mode: PolicyMode::default(),
            fragments: Fragments::default(),
            unreadable_tcp: UnreadableTcpPolicy::default(),
            ports: vec![filter_common::abi::SMTP_PORT],
            action: PolicyAction::default(),
            reject_rate: DEFAULT_REJECT_RATE,
            reject_burst: DEFAULT_REJECT_BURST,
        }
    }
}

/// An interface to attach the filter to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Interface {
    /// Linux interface name.
    pub name: String,
    /// Which side of the router it faces.
    pub role: Role,
    /// Which hook to use.
    pub attach: Attach,
}

/// A subscriber prefix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SubscriberEntry {
    /// The prefix, host bits clear.
    pub prefix: IpNet,
    /// Its own mode; `None` follows [`Defaults::mode`].
    pub mode: Option<PolicyMode>,
    /// Its own block action; `None` follows [`Defaults::action`].
    pub action: Option<PolicyAction>,
}

/// An allowlist entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AllowEntry {
    /// The exempted prefix, host bits clear.
    pub prefix: IpNet,
    // Boxed `str` rather than `String`: the daemon keeps every entry for its lifetime, and
    // at a million entries the unused capacity words were 16 MiB each.
    /// Why it is exempt.
    pub comment: Option<Box<str>>,
    /// Who asked for it, so that stale entries can be chased.
    pub owner: Option<Box<str>>,
    /// When the exemption ends; the daemon skips expired entries.
    #[serde(serialize_with = "serialize_expiry")]
    pub expires: Option<SystemTime>,
    /// The limit on new port-25 connections per source, if any.
    pub syn_limit: Option<SynRateLimit>,
}

/// `max_syn_per_minute` (and `syn_burst`) of an allowlist entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct SynRateLimit {
    /// New TCP/25 connections per minute per source.
    pub per_minute: u32,
    /// How many may be opened at once; defaults to `per_minute`.
    pub burst: u32,
}

impl AllowEntry {
    /// An entry of an allow list file: the prefix alone.
    pub fn listed(prefix: IpNet) -> Self {
        Self {
            prefix,
            comment: None,
            owner: None,
            expires: None,
            syn_limit: None,
        }
    }

    /// Whether the entry has expired at `now` (an entry expiring exactly now has).
    pub fn is_expired(&self, now: SystemTime) -> bool {
        self.expires.is_some_and(|at| at <= now)
    }
}

// Printed as RFC 3339, as written in the file, rather than serde's seconds-and-nanos
// struct that nobody can read.
fn serialize_expiry<S: Serializer>(
    expires: &Option<SystemTime>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match expires {
        Some(at) => serializer.collect_str(&humantime::format_rfc3339(*at)),
        None => serializer.serialize_none(),
    }
}

/// Enforcement mode of the policy or of one prefix.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyMode {
    /// Drop what matches.
    #[default]
    Enforce,
    /// Count what would be dropped, but pass it (roll-out).
    Monitor,
}

impl From<PolicyMode> for Mode {
    fn from(mode: PolicyMode) -> Self {
        match mode {
            PolicyMode::Enforce => Self::ENFORCE,
            PolicyMode::Monitor => Self::MONITOR,
        }
    }
}

/// What a block does (`action:`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyAction {
    /// Drop silently.
    #[default]
    Drop,
    /// Drop, and answer connection attempts with a TCP RST (XDP attachments; TC falls
    /// back to drop).
    Reject,
}

impl From<PolicyAction> for BlockAction {
    fn from(action: PolicyAction) -> Self {
        match action {
            PolicyAction::Drop => Self::DROP,
            PolicyAction::Reject => Self::REJECT,
        }
    }
}

/// Treatment of TCP fragments whose ports cannot be seen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fragments {
    /// Fail open.
    #[default]
    Pass,
    /// Fail closed: treat as port 25 in subscriber space.
    Drop,
}

impl From<Fragments> for FragmentPolicy {
    fn from(fragments: Fragments) -> Self {
        match fragments {
            Fragments::Pass => Self::PASS,
            Fragments::Drop => Self::DROP,
        }
    }
}

/// Treatment of TCP from a subscriber whose ports cannot be read because of its headers
/// (IPv6 extension header chain too long, first fragment cut short).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnreadableTcpPolicy {
    /// Fail closed: treat it as TCP to port 25.
    #[default]
    Port25,
    /// Fail open.
    Pass,
}

impl From<UnreadableTcpPolicy> for filter_common::abi::UnreadableTcp {
    fn from(policy: UnreadableTcpPolicy) -> Self {
        match policy {
            UnreadableTcpPolicy::Port25 => Self::PORT25,
            UnreadableTcpPolicy::Pass => Self::PASS,
        }
    }
}

/// Which side of the router an interface faces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Towards subscribers.
    Subscriber,
    /// Towards the rest of the Internet.
    Upstream,
}

/// Which hook to attach with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Attach {
    /// XDP (ingress only).
    Xdp,
    /// TC (clsact or tcx).
    Tc,
    /// Let the daemon choose.
    #[default]
    Auto,
}

/// A policy that passed validation, and what is worth a look even so.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Checked {
    /// The policy.
    pub policy: Policy,
    /// Things that are legal but probably not what the operator meant, in file order.
    pub warnings: Vec<Diagnostic>,
}

/// One finding, located in the policy file.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Diagnostic {
    /// The file as named by the caller.
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub column: usize,
    /// What is wrong, naming the offending value.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.column, self.message
        )
    }
}

/// Why a policy could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file could not be read.
    #[error("cannot read policy file {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
    /// The file was read but is not a valid policy. Never empty.
    #[error("{}", DisplayLines(.0))]
    Invalid(Vec<Diagnostic>),
}

/// Every diagnostic on its own line, as a compiler would print them.
struct DisplayLines<'a>(&'a [Diagnostic]);

impl fmt::Display for DisplayLines<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, diagnostic) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{diagnostic}")?;
        }
        Ok(())
    }
}

/// Parses and validates policy `text`; `file` names it in diagnostics, and list files
/// are read relative to its directory.
pub fn parse(text: &str, file: &str) -> Result<Checked, PolicyError> {
    check::check(text, file, SystemTime::now(), check::Limits::DATAPLANE)
}

/// Reads, parses and validates the policy file at `path` (and the list files it names,
/// relative to its directory).
pub fn load(path: &Path) -> Result<Checked, PolicyError> {
    let io = |source| PolicyError::Io {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    let name = path.display().to_string();
    // Refused before reading: the cap is there so that a wrong path (a disk image, a log)
    // is not read into memory.
    if len > MAX_POLICY_BYTES as u64 {
        return Err(PolicyError::Invalid(vec![Diagnostic {
            file: name,
            line: 1,
            column: 1,
            message: format!(
                "the policy is {len} bytes long; at most {MAX_POLICY_BYTES} bytes are allowed \
                 (keep long lists in `subscriber_files` and `allow_files`)"
            ),
        }]));
    }
    let mut text = String::new();
    std::io::Read::read_to_string(
        &mut std::io::Read::take(file, MAX_POLICY_BYTES as u64 + 1),
        &mut text,
    )
    .map_err(io)?;
    parse(&text, &name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscriber_inside_finds_covered_blocks_only() -> Result<(), Box<dyn std::error::Error>> {
        let checked = parse(
            "version: 1\nsubscribers:\n  - prefix: 100.64.0.0/16\n  - prefix: 100.65.0.0/24\n\
             \x20 - prefix: 100.65.1.0/24\n  - prefix: 2001:db8:1::/48\n",
            "test.yaml",
        )?;
        let policy = checked.policy;
        let inside = |p: &str| -> Result<Option<String>, ipnet::AddrParseError> {
            Ok(policy
                .subscriber_inside(p.parse()?)
                .map(|s| s.prefix.to_string()))
        };
        // Wider than a subscriber prefix: found, whichever family.
        assert_eq!(inside("100.64.0.0/10")?.as_deref(), Some("100.64.0.0/16"));
        assert_eq!(inside("100.65.1.0/31")?, None);
        assert_eq!(inside("100.65.0.0/23")?.as_deref(), Some("100.65.0.0/24"));
        assert_eq!(inside("2001:db8::/32")?.as_deref(), Some("2001:db8:1::/48"));
        // Equal to, inside of, or beside a subscriber prefix: none.
        for p in [
            "100.64.0.0/16",
            "100.64.3.4/32",
            "100.65.2.0/24",
            "100.66.0.0/15",
            "2001:db8:1::/48",
            "2001:db8:2::/48",
            "192.0.2.0/24",
        ] {
            assert_eq!(inside(p)?, None, "{p}");
        }
        Ok(())
    }
}
