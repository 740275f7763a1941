//! From text to a validated [`Policy`]: serde for syntax and types, then every semantic
//! rule, collecting all problems rather than stopping at the first.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::IpAddr,
    str::FromStr,
    time::{Duration, SystemTime},
};

use filter_common::abi::{
    ALLOW_MAX_ENTRIES, MAX_RST_RATE, MAX_SYN_PER_MINUTE, SMTP_PORT, SUBSCRIBERS_MAX_ENTRIES,
};
use ipnet::IpNet;

use super::{
    AllowEntry, Checked, DEFAULT_REJECT_BURST, DEFAULT_REJECT_RATE, Defaults, Diagnostic,
    Interface, MAX_TEXT_BYTES, POLICY_VERSION, Policy, PolicyError, SubscriberEntry, SynRateLimit,
    fast::{self, FastAllow},
    locate::{Expect, Locator, Seg},
    raw::{RawAllow, RawDefaults, RawInterface, RawPolicy, RawSubscriber, VersionProbe},
    scan::Pos,
};

/// Capacity of the dataplane's tries, per address family. A parameter so that tests can
/// exercise the limit without a million-line policy.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    pub subscribers: usize,
    pub allow: usize,
}

impl Limits {
    pub const DATAPLANE: Self = Self {
        subscribers: SUBSCRIBERS_MAX_ENTRIES as usize,
        allow: ALLOW_MAX_ENTRIES as usize,
    };
}

/// Longest interface name Linux accepts (IFNAMSIZ minus the terminating NUL).
const IFNAME_MAX_BYTES: usize = 15;

/// Ports that must never be filtered: message submission (RFC 6409) and submission over
/// implicit TLS (RFC 8314), which subscribers need to reach their mail providers.
const SUBMISSION_PORTS: [u16; 2] = [587, 465];

const EMPTY: &str = "the policy is empty: it needs at least `version: 1` and `subscribers`";

/// Parses and checks `text` as of `now` (for expiry) against `limits`.
pub(super) fn check(
    text: &str,
    file: &str,
    now: SystemTime,
    limits: Limits,
) -> Result<Checked, PolicyError> {
    // serde_yaml reads a byte order mark as content; editors do not show it, so neither do
    // the positions.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut checker = Checker {
        locator: Locator::new(text),
        text,
        file,
        now,
        limits,
        errors: Vec::new(),
        warnings: Vec::new(),
    };
    let policy = checker.run();
    let Checker {
        mut errors,
        mut warnings,
        ..
    } = checker;
    match policy {
        Some(policy) if errors.is_empty() => {
            warnings.sort_by_key(|d| (d.line, d.column));
            Ok(Checked { policy, warnings })
        }
        _ => {
            errors.sort_by_key(|d| (d.line, d.column));
            Err(PolicyError::Invalid(errors))
        }
    }
}

struct Checker<'t> {
    locator: Locator<'t>,
    text: &'t str,
    file: &'t str,
    now: SystemTime,
    limits: Limits,
    errors: Vec<Diagnostic>,
    warnings: Vec<Diagnostic>,
}

/// The subscriber space, indexed for "does this prefix overlap it".
#[derive(Default)]
struct SubscriberSpace {
    prefixes: HashSet<IpNet>,
    /// Network addresses of all prefixes, to find those inside a given prefix.
    starts: BTreeSet<IpAddr>,
    /// The prefix lengths in use, per family (IPv4, IPv6): a supernet lookup only needs
    /// to try these, typically a handful, instead of every length up to /32 or /128
    /// (which made checking a million-entry allowlist take seconds).
    lengths_v4: BTreeSet<u8>,
    lengths_v6: BTreeSet<u8>,
}

impl SubscriberSpace {
    fn insert(&mut self, net: IpNet) {
        self.prefixes.insert(net);
        self.starts.insert(net.network());
        match net {
            IpNet::V4(_) => self.lengths_v4.insert(net.prefix_len()),
            IpNet::V6(_) => self.lengths_v6.insert(net.prefix_len()),
        };
    }

    /// Whether `net` shares any address with subscriber space. Two prefixes overlap only
    /// if one contains the other: either a subscriber prefix is a supernet of `net`, or
    /// one starts inside `net`.
    fn overlaps(&self, net: IpNet) -> bool {
        let lengths = match net {
            IpNet::V4(_) => &self.lengths_v4,
            IpNet::V6(_) => &self.lengths_v6,
        };
        let inside_one = lengths.range(..=net.prefix_len()).any(|len| {
            IpNet::new(net.network(), *len).is_ok_and(|s| self.prefixes.contains(&s.trunc()))
        });
        inside_one
            || self
                .starts
                .range(net.network()..=net.broadcast())
                .next()
                .is_some()
    }
}

impl<'t> Checker<'t> {
    fn diagnostic(&self, pos: Pos, message: String) -> Diagnostic {
        Diagnostic {
            file: self.file.to_owned(),
            line: pos.line,
            column: pos.column,
            message,
        }
    }

    fn error(&mut self, pos: Pos, message: String) {
        let diagnostic = self.diagnostic(pos, message);
        self.errors.push(diagnostic);
    }

    fn warning(&mut self, pos: Pos, message: String) {
        let diagnostic = self.diagnostic(pos, message);
        self.warnings.push(diagnostic);
    }

    /// Reports a serde_yaml error at its own location, without the location repeated in
    /// the message.
    fn serde_error(&mut self, error: &serde_yaml::Error) {
        let location = error.location();
        let pos = location.as_ref().map_or(Pos::START, |location| Pos {
            line: location.line(),
            column: location.column(),
        });
        let mut message = error.to_string();
        if location.is_some() {
            let suffix = format!(" at line {} column {}", pos.line, pos.column);
            if let Some(at) = message.find(&suffix) {
                message.replace_range(at..at + suffix.len(), "");
            }
            // libyaml's message for a tab says nothing about tabs.
            if self.char_at(pos) == Some('\t') {
                message.push_str(" (a tab: YAML indentation must use spaces)");
            }
        } else if message == "EOF while parsing a value" {
            EMPTY.clone_into(&mut message);
        }
        let pos = if location.is_none() && message.contains("more than one document") {
            second_document(self.text).unwrap_or(pos)
        } else {
            pos
        };
        self.error(pos, message);
    }

    fn char_at(&self, pos: Pos) -> Option<char> {
        self.text
            .lines()
            .nth(pos.line.checked_sub(1)?)?
            .chars()
            .nth(pos.column.checked_sub(1)?)
    }

    /// `None` when the document did not deserialize; errors are then in `self.errors`.
    fn run(&mut self) -> Option<Policy> {
        // The fast reader takes the common shape of a policy in one pass; anything else,
        // and every document with a syntax or type error, goes through serde_yaml, which
        // locates its errors.
        let (raw, fast_allow) = match fast::read(self.text) {
            Some((raw, allow)) => (raw, Some(allow)),
            None => (self.serde_raw()?, None),
        };
        let defaults = self.defaults(raw.defaults);
        let interfaces = self.interfaces(raw.interfaces);
        let (subscribers, space) = self.subscribers(&raw.subscribers, raw.allow_empty_subscribers);
        let allow = match &fast_allow {
            Some(fast_allow) => self.allow(fast_allow, &space),
            None => self.allow(&raw.allow, &space),
        };
        // The document as written is no longer needed: give its memory back before the
        // caller builds anything else from the policy.
        drop(raw.subscribers);
        drop(raw.allow);
        drop(fast_allow);
        drop(space);
        Some(Policy {
            version: POLICY_VERSION,
            defaults,
            interfaces,
            subscribers,
            allow,
            allow_empty_subscribers: raw.allow_empty_subscribers,
        })
    }

    /// The document through serde_yaml, after the version probe; `None` with the errors
    /// reported.
    fn serde_raw(&mut self) -> Option<RawPolicy<'t>> {
        if !self.version()? {
            return None;
        }
        match serde_yaml::from_str::<RawPolicy>(self.text) {
            Ok(raw) => Some(raw),
            Err(error) => {
                self.serde_error(&error);
                None
            }
        }
    }

    /// Checks `version` first: a document of another version may follow another schema,
    /// and a flood of unknown-field errors would bury the one that matters. `Some(false)`:
    /// do not go on; `None`: the document did not even parse.
    fn version(&mut self) -> Option<bool> {
        let probe = match serde_yaml::from_str::<Option<VersionProbe>>(self.text) {
            Ok(Some(probe)) => probe,
            // Nothing but comments, or a lone `~`: one clear error, not one per field.
            Ok(None) => {
                self.error(Pos::START, EMPTY.to_owned());
                return None;
            }
            Err(error) => {
                self.serde_error(&error);
                return None;
            }
        };
        let Some(version) = probe.version else {
            // Missing (or empty) is likely an otherwise fine file: report it, and check the
            // rest.
            let pos = self
                .locator
                .key(&[Seg::Key("version")])
                .unwrap_or(Pos::START);
            self.error(
                pos,
                format!(
                    "missing `version: {POLICY_VERSION}` (this p25 understands policy version \
                     {POLICY_VERSION})"
                ),
            );
            return Some(true);
        };
        if version.as_u64() == Some(u64::from(POLICY_VERSION)) {
            return Some(true);
        }
        let (shown, text) = match &version {
            serde_yaml::Value::Number(n) => (n.to_string(), Some(n.to_string())),
            serde_yaml::Value::String(s) => (format!("{s:?}"), Some(s.clone())),
            other => (
                serde_yaml::to_string(other)
                    .map_or_else(|_| "?".to_owned(), |s| s.trim().to_owned()),
                None,
            ),
        };
        let expect = text.as_deref().map_or(Expect::Any, Expect::Text);
        let pos = self.locator.value(&[Seg::Key("version")], expect);
        self.error(
            pos,
            format!(
                "unsupported policy version {shown} (this p25 understands version \
                 {POLICY_VERSION})"
            ),
        );
        Some(false)
    }

    fn defaults(&mut self, raw: RawDefaults) -> Defaults {
        let ports = match raw.ports {
            None => vec![SMTP_PORT],
            Some(ports) => {
                self.ports(&ports);
                ports
            }
        };
        let reject_rate = self.bounded(
            &[Seg::Key("defaults"), Seg::Key("reject_rate")],
            raw.reject_rate,
            MAX_RST_RATE,
        );
        let reject_burst = self.bounded(
            &[Seg::Key("defaults"), Seg::Key("reject_burst")],
            raw.reject_burst,
            MAX_RST_RATE,
        );
        Defaults {
            mode: raw.mode,
            fragments: raw.fragments,
            unreadable_tcp: raw.unreadable_tcp,
            ports,
            action: raw.action,
            reject_rate: reject_rate.unwrap_or(DEFAULT_REJECT_RATE),
            reject_burst: reject_burst.unwrap_or(DEFAULT_REJECT_BURST),
        }
    }

    /// A count that must lie in `1..=max` (rates, bursts): the value, or an error at it.
    fn bounded(&mut self, path: &[Seg], value: Option<u32>, max: u32) -> Option<u32> {
        let value = value?;
        if (1..=max).contains(&value) {
            return Some(value);
        }
        let name = match path.last() {
            Some(Seg::Key(name)) => *name,
            _ => "value",
        };
        let pos = self.locator.value(path, Expect::Text(&value.to_string()));
        self.error(
            pos,
            format!("{name} {value} is out of range: it must be between 1 and {max}"),
        );
        None
    }

    fn ports(&mut self, ports: &[u16]) {
        if ports.is_empty() {
            let pos = self
                .locator
                .value(&[Seg::Key("defaults"), Seg::Key("ports")], Expect::Any);
            self.error(
                pos,
                format!(
                    "`defaults.ports` is empty; write `ports: [{SMTP_PORT}]` or leave it out \
                     (port {SMTP_PORT} is the only port policy version 1 supports)"
                ),
            );
        }
        for (index, &port) in ports.iter().enumerate() {
            let message = if SUBMISSION_PORTS.contains(&port) {
                format!(
                    "port {port} must not be filtered: submission ports 587 and 465 must stay \
                     open, they are how subscribers reach their mail providers (RFC 5068, RFC \
                     8314)"
                )
            } else if port != SMTP_PORT {
                format!(
                    "port {port} is not supported: only port {SMTP_PORT} is supported in \
                     policy version 1"
                )
            } else {
                continue;
            };
            let path = [
                Seg::Key("defaults"),
                Seg::Key("ports"),
                Seg::Index {
                    index,
                    len: ports.len(),
                },
            ];
            let pos = self.locator.value(&path, Expect::Text(&port.to_string()));
            self.error(pos, message);
        }
    }

    fn interfaces(&mut self, raw: Vec<RawInterface>) -> Vec<Interface> {
        let len = raw.len();
        let path = |index| {
            [
                Seg::Key("interfaces"),
                Seg::Index { index, len },
                Seg::Key("name"),
            ]
        };
        let mut first: HashMap<String, usize> = HashMap::new();
        let mut interfaces = Vec::with_capacity(len);
        for (index, iface) in raw.into_iter().enumerate() {
            if let Some(problem) = interface_name_problem(&iface.name) {
                let pos = self.locator.value(&path(index), Expect::Text(&iface.name));
                self.error(pos, problem);
            } else if let Some(&earlier) = first.get(&iface.name) {
                let pos = self.locator.value(&path(index), Expect::Text(&iface.name));
                let earlier = self
                    .locator
                    .value(&path(earlier), Expect::Text(&iface.name));
                self.error(
                    pos,
                    format!(
                        "interface {:?} is listed twice (first on line {})",
                        iface.name, earlier.line
                    ),
                );
            } else {
                first.insert(iface.name.clone(), index);
            }
            interfaces.push(Interface {
                name: iface.name,
                role: iface.role,
                attach: iface.attach,
            });
        }
        interfaces
    }

    fn subscribers(
        &mut self,
        raw: &[RawSubscriber],
        allow_empty: bool,
    ) -> (Vec<SubscriberEntry>, SubscriberSpace) {
        if raw.is_empty() && !allow_empty {
            let pos = self
                .locator
                .key(&[Seg::Key("subscribers")])
                .unwrap_or(Pos::START);
            self.error(
                pos,
                "no subscriber prefixes: p25 would filter nothing; list your subscribers' \
                 address space under `subscribers`, or set `allow_empty_subscribers: true` if \
                 that is intended"
                    .to_owned(),
            );
        }
        let mut list = PrefixList::new("subscribers", raw.len(), self.limits.subscribers);
        let mut entries = Vec::with_capacity(raw.len());
        let mut space = SubscriberSpace::default();
        for (index, entry) in raw.iter().enumerate() {
            let Some(prefix) = self.prefix(&mut list, index, raw) else {
                continue;
            };
            space.insert(prefix);
            entries.push(SubscriberEntry {
                prefix,
                mode: entry.mode,
                action: entry.action,
            });
        }
        self.repeats_and_overflow(list, raw);
        (entries, space)
    }

    fn allow<E: AllowFields>(&mut self, raw: &[E], space: &SubscriberSpace) -> Vec<AllowEntry> {
        let len = raw.len();
        let mut list = PrefixList::new("allow", len, self.limits.allow);
        let mut entries = Vec::with_capacity(len);
        for (index, entry) in raw.iter().enumerate() {
            let field = |name| [Seg::Key("allow"), Seg::Index { index, len }, Seg::Key(name)];
            let prefix = self.prefix(&mut list, index, raw);
            for (name, value) in [("comment", entry.comment()), ("owner", entry.owner())] {
                if let Some(value) = value.filter(|v| v.len() > MAX_TEXT_BYTES) {
                    let pos = self.locator.value(&field(name), Expect::Text(value));
                    self.error(
                        pos,
                        format!(
                            "{name} {} is {} bytes long; at most {MAX_TEXT_BYTES} bytes are \
                             allowed",
                            abbreviate(value),
                            value.len()
                        ),
                    );
                }
            }
            let mut expired = false;
            let expires = match entry.expires().map(|s| (s, parse_expiry(s))) {
                None => None,
                Some((text, Ok(at))) => {
                    if at <= self.now {
                        expired = true;
                        let pos = self.locator.value(&field("expires"), Expect::Text(text));
                        self.warning(
                            pos,
                            format!(
                                "allow entry {} expired at {text}; the daemon skips expired \
                                 entries",
                                entry.prefix()
                            ),
                        );
                    }
                    Some(at)
                }
                Some((text, Err(why))) => {
                    let pos = self.locator.value(&field("expires"), Expect::Text(text));
                    self.error(
                        pos,
                        format!(
                            "invalid expires {text:?}: {why}; write an RFC 3339 timestamp such \
                             as 2027-01-31T00:00:00Z"
                        ),
                    );
                    None
                }
            };
            let per_minute = self.bounded(
                &field("max_syn_per_minute"),
                entry.max_syn_per_minute(),
                MAX_SYN_PER_MINUTE,
            );
            let burst = self.bounded(&field("syn_burst"), entry.syn_burst(), MAX_SYN_PER_MINUTE);
            if let (None, Some(burst)) = (entry.max_syn_per_minute(), entry.syn_burst()) {
                let pos = self
                    .locator
                    .value(&field("syn_burst"), Expect::Text(&burst.to_string()));
                self.error(
                    pos,
                    format!(
                        "syn_burst {burst} without max_syn_per_minute: a burst only sizes a \
                         limit; add `max_syn_per_minute`"
                    ),
                );
            }
            // The burst defaults to a minute's worth: "300 per minute" may all come at once.
            let syn_limit = per_minute.map(|per_minute| SynRateLimit {
                per_minute,
                burst: burst.unwrap_or(per_minute),
            });
            let Some(prefix) = prefix else {
                continue;
            };
            // An expired entry already has its warning; a second one would be noise.
            if !expired && !space.overlaps(prefix) {
                let pos = self
                    .locator
                    .value(&field("prefix"), Expect::Text(entry.prefix()));
                self.warning(
                    pos,
                    format!(
                        "allow entry {prefix} lies outside all subscriber prefixes, so it can \
                         never change a verdict"
                    ),
                );
            }
            entries.push(AllowEntry {
                prefix,
                comment: entry.comment().map(Box::from),
                owner: entry.owner().map(Box::from),
                expires,
                syn_limit,
            });
        }
        self.repeats_and_overflow(list, raw);
        entries
    }

    /// Reports the prefixes of a list that repeat an earlier one, and per address family
    /// the first that does not fit in the dataplane (duplicates not counted). Done on the
    /// sorted list rather than with a map while reading: at a million entries the map
    /// cost tens of MiB. Either finding is an error, so the entries and warnings the
    /// caller built meanwhile are discarded with the policy.
    fn repeats_and_overflow<E: Prefixed>(&mut self, mut list: PrefixList, entries: &[E]) {
        let mut seen = std::mem::take(&mut list.seen);
        let limit = list.limit;
        let text = |index: usize| entries.get(index).map_or("", Prefixed::prefix);
        seen.sort_unstable();
        let (mut v4, mut v6) = (0_usize, 0_usize);
        let mut first: Option<(IpNet, usize)> = None;
        for &(net, index) in &seen {
            match first {
                Some((earlier_net, earlier)) if earlier_net == net => {
                    let earlier = self
                        .locator
                        .value(&list.path(earlier), Expect::Text(text(earlier)));
                    let pos = self
                        .locator
                        .value(&list.path(index), Expect::Text(text(index)));
                    self.error(
                        pos,
                        format!(
                            "duplicate {} prefix {net} (first listed on line {})",
                            list.noun(),
                            earlier.line
                        ),
                    );
                }
                _ => {
                    first = Some((net, index));
                    match net {
                        IpNet::V4(_) => v4 += 1,
                        IpNet::V6(_) => v6 += 1,
                    }
                }
            }
        }
        for (count, v4_family) in [(v4, true), (v6, false)] {
            if count <= limit {
                continue;
            }
            // The first occurrences of the family, in file order: the one at `limit` is
            // the first that does not fit.
            let mut firsts: Vec<usize> = Vec::with_capacity(count);
            let mut last: Option<IpNet> = None;
            for &(net, index) in &seen {
                if last != Some(net) && matches!(net, IpNet::V4(_)) == v4_family {
                    firsts.push(index);
                }
                last = Some(net);
            }
            firsts.sort_unstable();
            let Some(&index) = firsts.get(limit) else {
                continue;
            };
            let pos = self
                .locator
                .value(&list.path(index), Expect::Text(text(index)));
            let family = if v4_family { "IPv4" } else { "IPv6" };
            self.error(
                pos,
                format!(
                    "too many {family} {} prefixes: the dataplane holds at most {limit} per \
                     address family",
                    list.noun(),
                ),
            );
        }
    }

    /// Parses and checks the prefix of entry `index` of `entries`; `None` if it is
    /// unusable (reported).
    fn prefix<E: Prefixed>(
        &mut self,
        list: &mut PrefixList,
        index: usize,
        entries: &[E],
    ) -> Option<IpNet> {
        let text = entries.get(index)?.prefix();
        let path = list.path(index);
        let problem = match parse_prefix(text) {
            Err(problem) => problem,
            Ok(net) if net.prefix_len() == 0 && list.name == "subscribers" => format!(
                "subscriber prefix {net} covers every address: the whole address space as \
                 subscriber space would block port 25 for every host, including your own mail \
                 servers"
            ),
            Ok(net) if crate::check_prefix(net).is_err() => {
                format!("{net} has host bits set; did you mean {}?", net.trunc())
            }
            Ok(net) => {
                // Duplicates and the per-family limit are found once the whole list is
                // known, by `repeats_and_overflow`.
                list.seen.push((net, index));
                return Some(net);
            }
        };
        let pos = self.locator.value(&path, Expect::Text(text));
        self.error(pos, problem);
        None
    }
}

/// A raw list entry with a prefix as written.
trait Prefixed {
    fn prefix(&self) -> &str;
}

impl Prefixed for RawSubscriber<'_> {
    fn prefix(&self) -> &str {
        &self.prefix
    }
}

impl Prefixed for RawAllow<'_> {
    fn prefix(&self) -> &str {
        &self.prefix
    }
}

impl Prefixed for FastAllow<'_> {
    fn prefix(&self) -> &str {
        self.prefix
    }
}

/// An allowlist entry as written: serde's, or the fast reader's compact one.
trait AllowFields: Prefixed {
    fn comment(&self) -> Option<&str>;
    fn owner(&self) -> Option<&str>;
    fn expires(&self) -> Option<&str>;
    fn max_syn_per_minute(&self) -> Option<u32>;
    fn syn_burst(&self) -> Option<u32>;
}

impl AllowFields for RawAllow<'_> {
    fn comment(&self) -> Option<&str> {
        self.comment.as_deref()
    }
    fn owner(&self) -> Option<&str> {
        self.owner.as_deref()
    }
    fn expires(&self) -> Option<&str> {
        self.expires.as_deref()
    }
    fn max_syn_per_minute(&self) -> Option<u32> {
        self.max_syn_per_minute
    }
    fn syn_burst(&self) -> Option<u32> {
        self.syn_burst
    }
}

impl AllowFields for FastAllow<'_> {
    fn comment(&self) -> Option<&str> {
        self.extra.as_ref()?.comment
    }
    fn owner(&self) -> Option<&str> {
        self.extra.as_ref()?.owner
    }
    fn expires(&self) -> Option<&str> {
        self.extra.as_ref()?.expires
    }
    fn max_syn_per_minute(&self) -> Option<u32> {
        self.extra.as_ref()?.max_syn_per_minute
    }
    fn syn_burst(&self) -> Option<u32> {
        self.extra.as_ref()?.syn_burst
    }
}

/// Bookkeeping for one prefix list (`subscribers` or `allow`).
struct PrefixList {
    name: &'static str,
    len: usize,
    limit: usize,
    /// Every usable prefix with its index, for `Checker::repeats_and_overflow` (the text
    /// as written is in the raw list, which outlives this).
    seen: Vec<(IpNet, usize)>,
}

impl PrefixList {
    fn new(name: &'static str, len: usize, limit: usize) -> Self {
        Self {
            name,
            len,
            limit,
            seen: Vec::with_capacity(len),
        }
    }

    fn path(&self, index: usize) -> [Seg; 3] {
        [
            Seg::Key(self.name),
            Seg::Index {
                index,
                len: self.len,
            },
            Seg::Key("prefix"),
        ]
    }

    fn noun(&self) -> &'static str {
        if self.name == "subscribers" {
            "subscriber"
        } else {
            "allow"
        }
    }
}

/// Parses a prefix as written: CIDR, or a bare address meaning a host route. Errors say
/// which part is wrong, since "invalid IP address syntax" alone leaves the operator to
/// guess.
fn parse_prefix(text: &str) -> Result<IpNet, String> {
    if let Ok(net) = IpNet::from_str(text) {
        return Ok(net);
    }
    let invalid = |why: String| format!("invalid prefix {text:?}: {why}");
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

/// Why `name` cannot be a Linux interface name (the kernel's `dev_valid_name`), if it
/// cannot.
fn interface_name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("interface name is empty".to_owned());
    }
    if name.len() > IFNAME_MAX_BYTES {
        return Some(format!(
            "interface name {name:?} is {} bytes long; Linux interface names have at most \
             {IFNAME_MAX_BYTES}",
            name.len()
        ));
    }
    if name == "." || name == ".." {
        return Some(format!("{name:?} is not a valid interface name"));
    }
    let bad = name
        .chars()
        .find(|&c| c == '/' || c == ':' || c == '\0' || c.is_whitespace())?;
    let what = match bad {
        '/' => "'/'",
        ':' => "':' (an alias label such as eth0:1 is not an interface)",
        '\0' => "NUL",
        _ => "whitespace",
    };
    Some(format!(
        "invalid interface name {name:?}: Linux interface names cannot contain {what}"
    ))
}

/// Parses an RFC 3339 timestamp. humantime reads only UTC (`Z`, `+00:00`, or no zone);
/// numeric offsets, which RFC 3339 allows, are applied here.
fn parse_expiry(text: &str) -> Result<SystemTime, String> {
    let Some((local, offset)) = split_offset(text) else {
        return humantime::parse_rfc3339_weak(text).map_err(|e| e.to_string());
    };
    let local = humantime::parse_rfc3339_weak(&format!("{local}Z")).map_err(|e| e.to_string())?;
    // The written time is UTC plus the offset.
    let utc = if offset >= 0 {
        local.checked_sub(Duration::from_secs(offset.unsigned_abs()))
    } else {
        local.checked_add(Duration::from_secs(offset.unsigned_abs()))
    };
    utc.ok_or_else(|| "timestamp is out of range".to_owned())
}

/// Splits `2027-01-31T09:00:00+02:00` into the local time and the offset in seconds.
fn split_offset(text: &str) -> Option<(&str, i64)> {
    let split = text.len().checked_sub(6)?;
    let (local, offset) = (text.get(..split)?, text.get(split..)?);
    let sign = match offset.as_bytes().first()? {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let number = |range: std::ops::Range<usize>| {
        offset
            .get(range)
            .filter(|d| d.bytes().all(|b| b.is_ascii_digit()))?
            .parse::<i64>()
            .ok()
    };
    let (hours, minutes) = (number(1..3)?, number(4..6)?);
    // Only after a full time of day: a bare date also ends in "-dd".
    if offset.get(3..4) != Some(":") || local.len() < 19 || hours > 23 || minutes > 59 {
        return None;
    }
    Some((local, sign * (hours * 3600 + minutes * 60)))
}

/// Where a second YAML document starts (serde_yaml gives no position for that error):
/// the first `---` line after some content.
fn second_document(text: &str) -> Option<Pos> {
    let mut content = false;
    for (index, line) in text.lines().enumerate() {
        let marker = line
            .strip_prefix("---")
            .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t']));
        if marker && content {
            return Some(Pos {
                line: index + 1,
                column: 1,
            });
        }
        let trimmed = line.trim_start();
        content |= !marker && !trimmed.is_empty() && !trimmed.starts_with('#');
    }
    None
}

/// Quotes the start of a long text, enough to recognize it.
fn abbreviate(text: &str) -> String {
    const SHOWN: usize = 40;
    match text.char_indices().nth(SHOWN) {
        Some((end, _)) => format!("{:?}…", text.get(..end).unwrap_or(text)),
        None => format!("{text:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str, now: SystemTime, limits: Limits) -> Result<Checked, Vec<String>> {
        check(text, "t.yaml", now, limits).map_err(|error| match error {
            PolicyError::Invalid(diagnostics) => {
                diagnostics.iter().map(ToString::to_string).collect()
            }
            other => vec![other.to_string()],
        })
    }

    fn run(text: &str) -> Result<Checked, Vec<String>> {
        at(text, SystemTime::now(), Limits::DATAPLANE)
    }

    fn errors(text: &str) -> Vec<String> {
        run(text).err().unwrap_or_default()
    }

    fn warnings(text: &str) -> Vec<String> {
        run(text).map_or_else(
            |errors| errors,
            |checked| checked.warnings.iter().map(ToString::to_string).collect(),
        )
    }

    #[test]
    fn every_semantic_error_is_reported_in_file_order() {
        let text = "\
version: 1
defaults:
  ports: [587, 25]
interfaces:
  - { name: eth0/1, role: subscriber }
  - { name: eth2, role: upstream }
  - { name: eth2, role: upstream }
subscribers:
  - prefix: 100.64.1.1/24
  - prefix: 198.51.100.0/24
  - prefix: 198.51.100.0/24
allow:
  - prefix: 192.0.2.0/33
    expires: soon
";
        let got = errors(text);
        let want = [
            "t.yaml:3:11: port 587",
            "t.yaml:5:13: invalid interface name \"eth0/1\"",
            "t.yaml:7:13: interface \"eth2\" is listed twice (first on line 6)",
            "t.yaml:9:13: 100.64.1.1/24 has host bits set",
            "t.yaml:11:13: duplicate subscriber prefix 198.51.100.0/24 (first listed on line 10)",
            "t.yaml:13:13: invalid prefix \"192.0.2.0/33\"",
            "t.yaml:14:14: invalid expires \"soon\"",
        ];
        assert_eq!(got.len(), want.len(), "{got:#?}");
        for (got, want) in got.iter().zip(want) {
            assert!(
                got.starts_with(want),
                "{got:?} does not start with {want:?}"
            );
        }
    }

    #[test]
    fn a_valid_policy_converts_with_defaults() -> Result<(), Vec<String>> {
        let text = "\
version: 1
interfaces:
  - name: eth1
    role: subscriber
subscribers:
  - prefix: 100.64.0.0/10
  - prefix: 2001:db8::/32
    mode: monitor
allow:
  - prefix: 100.64.0.25
    comment: relay
  - prefix: 2001:db8::25
";
        let checked = run(text)?;
        assert!(checked.warnings.is_empty(), "{:?}", checked.warnings);
        let policy = checked.policy;
        assert_eq!(policy.version, 1);
        assert_eq!(policy.defaults, Defaults::default());
        assert_eq!(policy.defaults.ports, [25]);
        let iface = policy.interfaces.first().map(|i| (i.role, i.attach));
        assert_eq!(
            iface,
            Some((super::super::Role::Subscriber, super::super::Attach::Auto))
        );
        let modes: Vec<_> = policy.subscribers.iter().map(|s| s.mode).collect();
        assert_eq!(modes, [None, Some(super::super::PolicyMode::Monitor)]);
        // Bare addresses are host routes.
        let allow: Vec<String> = policy.allow.iter().map(|a| a.prefix.to_string()).collect();
        assert_eq!(allow, ["100.64.0.25/32", "2001:db8::25/128"]);
        Ok(())
    }

    #[test]
    fn version_other_than_1_is_the_only_error() {
        let text = "version: 2\nsubscribers: {whatever: [1]}\nnew_field: true\n";
        assert_eq!(
            errors(text),
            ["t.yaml:1:10: unsupported policy version 2 (this p25 understands version 1)"]
        );
        let text = "# v\nversion:\nsubscribers: [{prefix: 10.0.0.0/8}]\n";
        assert_eq!(
            errors(text),
            ["t.yaml:2:1: missing `version: 1` (this p25 understands policy version 1)"]
        );
    }

    #[test]
    fn missing_version_does_not_hide_other_errors() {
        let text = "subscribers:\n  - prefix: 10.0.0.1/8\n";
        let got = errors(text);
        assert_eq!(got.len(), 2, "{got:#?}");
        assert!(
            got.iter()
                .any(|e| e.starts_with("t.yaml:1:1: missing `version: 1`"))
        );
        assert!(
            got.iter()
                .any(|e| e.starts_with("t.yaml:2:13: 10.0.0.1/8 has host bits"))
        );
    }

    #[test]
    fn limits_are_per_family_and_reported_once() {
        let text = "\
version: 1
subscribers:
  - prefix: 10.0.0.0/24
  - prefix: 10.0.1.0/24
  - prefix: 2001:db8::/48
  - prefix: 10.0.2.0/24
  - prefix: 10.0.3.0/24
  - prefix: 2001:db8:1::/48
allow:
  - prefix: 10.0.0.1
  - prefix: 2001:db8::1
  - prefix: 10.0.0.2
";
        let limits = Limits {
            subscribers: 2,
            allow: 1,
        };
        let got = at(text, SystemTime::now(), limits)
            .err()
            .unwrap_or_default();
        assert_eq!(
            got,
            [
                "t.yaml:6:13: too many IPv4 subscriber prefixes: the dataplane holds at most 2 \
                 per address family",
                "t.yaml:12:13: too many IPv4 allow prefixes: the dataplane holds at most 1 per \
                 address family",
            ]
        );
    }

    #[test]
    fn whole_space_is_refused_for_subscribers_only() {
        let text =
            "version: 1\nsubscribers: [{prefix: 10.0.0.0/8}]\nallow: [{prefix: 0.0.0.0/0}]\n";
        assert_eq!(warnings(text), Vec::<String>::new());
    }

    #[test]
    fn coverage_warnings_consider_both_containment_directions() {
        let text = "\
version: 1
subscribers:
  - prefix: 100.64.0.0/10
  - prefix: 100.64.9.0/24
allow:
  - prefix: 100.64.9.9
  - prefix: 100.0.0.0/8
  - prefix: 100.128.0.0/10
  - prefix: 2001:db8::/32
";
        assert_eq!(
            warnings(text),
            [
                "t.yaml:8:13: allow entry 100.128.0.0/10 lies outside all subscriber prefixes, \
                 so it can never change a verdict",
                "t.yaml:9:13: allow entry 2001:db8::/32 lies outside all subscriber prefixes, \
                 so it can never change a verdict",
            ]
        );
    }

    #[test]
    fn empty_subscribers_can_be_declared_intentional() {
        let text = "version: 1\nallow_empty_subscribers: true\n";
        assert_eq!(warnings(text), Vec::<String>::new());
        let text = "version: 1\nsubscribers:\nallow:\n";
        assert_eq!(
            errors(text)
                .iter()
                .map(|e| e.get(..16).unwrap_or(e))
                .collect::<Vec<_>>(),
            ["t.yaml:2:1: no s"]
        );
    }

    #[test]
    fn expiry_accepts_rfc3339_offsets() {
        let utc = parse_expiry("2027-01-31T00:00:00Z");
        assert!(utc.is_ok());
        assert_eq!(parse_expiry("2027-01-31T02:00:00+02:00"), utc);
        assert_eq!(parse_expiry("2027-01-30T18:30:00-05:30"), utc);
        assert_eq!(parse_expiry("2027-01-31T00:00:00+00:00"), utc);
        assert_eq!(parse_expiry("2027-01-31 00:00:00"), utc);
        assert_eq!(
            parse_expiry("2027-01-31T01:00:00.5+01:00")
                .ok()
                .zip(utc.clone().ok())
                .and_then(|(a, b)| a.duration_since(b).ok()),
            Some(Duration::from_millis(500))
        );
        assert!(parse_expiry("2027-01-31").is_err());
        assert!(parse_expiry("2027-01-31T00:00:00+24:00").is_err());
        assert!(parse_expiry("tomorrow").is_err());
    }

    #[test]
    fn expiry_is_judged_against_now() {
        let text = "\
version: 1
subscribers: [{prefix: 192.0.2.0/24}]
allow:
  - prefix: 192.0.2.25
    expires: 2030-06-01T00:00:00Z
";
        let before =
            humantime::parse_rfc3339("2030-05-31T23:59:59Z").unwrap_or(SystemTime::UNIX_EPOCH);
        let after =
            humantime::parse_rfc3339("2030-06-01T00:00:00Z").unwrap_or(SystemTime::UNIX_EPOCH);
        let count = |now| {
            at(text, now, Limits::DATAPLANE).map(|checked| {
                let expired = checked
                    .policy
                    .allow
                    .iter()
                    .filter(|a| a.is_expired(now))
                    .count();
                (checked.warnings.len(), expired)
            })
        };
        assert_eq!(count(before), Ok((0, 0)));
        assert_eq!(count(after), Ok((1, 1)));
    }

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
        ];
        for (text, want) in cases {
            let got = parse_prefix(text).err().unwrap_or_default();
            assert!(got.contains(want), "{text}: {got}");
        }
        assert_eq!(
            parse_prefix("192.0.2.1").map(|n| n.to_string()),
            Ok("192.0.2.1/32".to_owned())
        );
    }

    #[test]
    fn interface_names_follow_the_kernel() {
        for good in ["eth0", "r-sub", "enp3s0f1.100", "a", "123456789012345"] {
            assert_eq!(interface_name_problem(good), None, "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            "1234567890123456",
            "eth0:1",
            "a/b",
            "a b",
            "a\tb",
        ] {
            assert!(interface_name_problem(bad).is_some(), "{bad:?}");
        }
    }

    #[test]
    fn crlf_and_byte_order_mark_do_not_shift_locations() {
        let lf = "version: 1\nsubscribers:\n  - prefix: 10.0.0.0/8\n  - prefix: 10.0.0.0/8\n";
        let crlf = lf.replace('\n', "\r\n");
        let bom = format!("\u{feff}{lf}");
        let want = ["t.yaml:4:13: duplicate subscriber prefix 10.0.0.0/8 (first listed on line 3)"];
        assert_eq!(errors(lf), want);
        assert_eq!(errors(&crlf), want);
        assert_eq!(errors(&bom), want);
    }

    #[test]
    fn yaml_errors_do_not_repeat_their_location() {
        let got = errors("version: 1\nsubscribers: [\n");
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(
            got.iter().all(|e| !e.contains(" at line 3 column 1,")),
            "{got:?}"
        );
    }

    #[test]
    fn the_policy_serializes_for_status_output() -> Result<(), Vec<String>> {
        let text = "\
version: 1
subscribers: [{prefix: 192.0.2.0/24, mode: monitor}]
allow: [{prefix: 192.0.2.25, owner: ops, expires: 2030-06-01T00:00:00Z}]
";
        let checked = run(text)?;
        let json = serde_json::to_value(&checked.policy).map_err(|e| vec![e.to_string()])?;
        assert_eq!(
            json.pointer("/allow/0/expires"),
            Some(&"2030-06-01T00:00:00Z".into())
        );
        assert_eq!(
            json.pointer("/allow/0/prefix"),
            Some(&"192.0.2.25/32".into())
        );
        assert_eq!(json.pointer("/subscribers/0/mode"), Some(&"monitor".into()));
        assert_eq!(json.pointer("/defaults/fragments"), Some(&"pass".into()));
        Ok(())
    }

    #[test]
    fn modes_map_onto_the_abi() {
        use filter_common::abi::{FragmentPolicy, Mode};

        use super::super::{Fragments, PolicyMode};
        assert_eq!(Mode::from(PolicyMode::Enforce), Mode::ENFORCE);
        assert_eq!(Mode::from(PolicyMode::Monitor), Mode::MONITOR);
        assert_eq!(FragmentPolicy::from(Fragments::Pass), FragmentPolicy::PASS);
        assert_eq!(FragmentPolicy::from(Fragments::Drop), FragmentPolicy::DROP);
    }
}
