//! From text to a validated [`Policy`]: serde for syntax and types, then every semantic
//! rule, collecting all problems rather than stopping at the first.
//!
//! Why one long file (about 1,500 lines, then the tests): every rule reports through the
//! one `Checker`, which holds the positions, the list files' names and the diagnostics in
//! file order; the rules are its methods, in the order of the schema. The YAML types are
//! `raw.rs`, list-file reading `lists.rs`. The tests (about 600 lines) pin one message per
//! rule.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use filter_common::abi::{
    ALLOW_MAX_ENTRIES, MAX_RST_RATE, MAX_SYN_PER_MINUTE, SMTP_PORT, SUBSCRIBERS_MAX_ENTRIES,
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::{
    AllowEntry, Checked, DEFAULT_REJECT_BURST, DEFAULT_REJECT_RATE, Defaults, Diagnostic,
    Interface, MAX_TEXT_BYTES, POLICY_VERSION, Policy, PolicyError, SubscriberEntry, SynRateLimit,
    lists::{self, ListLine},
    raw::{
        At, RawAllow, RawDefaults, RawInterface, RawPolicy, RawSubscriber, Version, VersionProbe,
    },
};
use serde_saphyr::Location;

/// A position in the text, as a compiler prints it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Pos {
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub column: usize,
}

impl Pos {
    /// The start of the file: where a problem with the file as a whole is reported.
    pub const START: Self = Self { line: 1, column: 1 };

    fn of(location: &Location) -> Self {
        Self::new(location.line(), location.column())
    }

    fn new(line: u64, column: u64) -> Self {
        let line = usize::try_from(line).unwrap_or(usize::MAX);
        let column = usize::try_from(column).unwrap_or(usize::MAX);
        if line == 0 {
            return Self::START;
        }
        Self {
            line,
            column: column.max(1),
        }
    }

    /// Where a value is written (at the alias, if it is one, not at its anchor).
    fn at<T>(at: &At<T>) -> Self {
        Self::new(u64::from(at.line), u64::from(at.column))
    }
}

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

/// Largest policy document accepted, in bytes. A 1.1M-entry policy written inline is
/// about 38 MB; lists beyond that belong in list files.
pub const MAX_POLICY_BYTES: usize = 64 * 1024 * 1024;

/// Deepest nesting of YAML collections accepted. A policy needs four levels (the
/// document, a list, an entry, a flow list in it); the cap keeps a hostile document such
/// as 200,000 `[` from exhausting the parsers' stacks.
pub const MAX_DEPTH: usize = 32;

/// How far ahead an `expires` may lie: ten years. Further is a typo (9999 for 2029) or a
/// way around review, and times that far out do not fit every timestamp format.
pub const MAX_EXPIRY_AHEAD: Duration = Duration::from_secs(10 * 365 * 86_400 + 3 * 86_400);

/// At most this many list files per list: file numbers are kept in 16 bits per entry.
const MAX_LIST_FILES: usize = 1_000;

/// Parses and checks `text` as of `now` (for expiry) against `limits`.
pub(super) fn check(
    text: &str,
    file: &str,
    now: SystemTime,
    limits: Limits,
) -> Result<Checked, PolicyError> {
    // A byte order mark is not content; editors do not show it, so neither do
    // the positions.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let base = Path::new(file)
        .parent()
        .map_or_else(PathBuf::new, Path::to_path_buf);
    let mut checker = Checker {
        text,
        file,
        base,
        lists: Vec::new(),
        now,
        limits,
        errors: Vec::new(),
        warnings: Vec::new(),
    };
    let policy = match shape_problem(text) {
        Some((pos, message)) => {
            checker.error(pos, message);
            None
        }
        None => checker.run(),
    };
    let Checker {
        mut errors,
        mut warnings,
        ..
    } = checker;
    match policy {
        Some(mut policy) if errors.is_empty() => {
            policy.sort();
            // List files make several files: by file, then by position in it.
            warnings.sort_by(|a, b| (&a.file, a.line, a.column).cmp(&(&b.file, b.line, b.column)));
            Ok(Checked { policy, warnings })
        }
        _ => {
            errors.sort_by(|a, b| (&a.file, a.line, a.column).cmp(&(&b.file, b.line, b.column)));
            Err(PolicyError::Invalid(errors))
        }
    }
}

struct Checker<'t> {
    text: &'t str,
    file: &'t str,
    /// The directory list files are relative to.
    base: PathBuf,
    /// Display names of the list files read, numbered from 1 in [`Loc::file`].
    lists: Vec<String>,
    now: SystemTime,
    limits: Limits,
    errors: Vec<Diagnostic>,
    warnings: Vec<Diagnostic>,
}

/// A prefix as plain numbers (family, network address bits, length): cheap to compare
/// and to hash, in the same order as `IpNet`. A million-entry list is sorted and looked
/// up by these; through `IpNet` itself (a nested enum compare, SipHash) that took a third
/// of a `p25d check`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Key {
    v6: bool,
    addr: u128,
    len: u8,
}

impl Key {
    fn of(net: IpNet) -> Self {
        match net {
            IpNet::V4(n) => Self {
                v6: false,
                addr: u128::from(u32::from(n.network())),
                len: n.prefix_len(),
            },
            IpNet::V6(n) => Self {
                v6: true,
                addr: u128::from(n.network()),
                len: n.prefix_len(),
            },
        }
    }
}

/// A prefix as 18 bytes that sort like `IpNet` (family, address in network order,
/// length) by a plain byte comparison: a million-entry list sorts several times faster
/// than by `IpNet`'s nested comparison, in the same 18 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Packed([u8; 18]);

/// The byte order, compared as two integers: a derived order on the array called
/// `memcmp` for every comparison, a fifth of a million-entry check (perf record).
impl Ord for Packed {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.order_key().cmp(&other.order_key())
    }
}

impl PartialOrd for Packed {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Packed {
    /// The 18 bytes as big-endian integers, which compare like the bytes.
    fn order_key(&self) -> (u128, u16) {
        let [head @ .., a, b] = self.0;
        (u128::from_be_bytes(head), u16::from_be_bytes([a, b]))
    }

    fn of(net: IpNet) -> Self {
        let mut bytes = [0_u8; 18];
        match net {
            IpNet::V4(n) => {
                if let Some(addr) = bytes.get_mut(1..5) {
                    addr.copy_from_slice(&n.addr().octets());
                }
            }
            IpNet::V6(n) => {
                bytes[0] = 1;
                if let Some(addr) = bytes.get_mut(1..17) {
                    addr.copy_from_slice(&n.addr().octets());
                }
            }
        }
        bytes[17] = net.prefix_len();
        Self(bytes)
    }

    fn net(self) -> IpNet {
        let [family, addr @ .., len] = self.0;
        if family == 0 {
            let [a, b, c, d, ..] = addr;
            Ipv4Net::new(Ipv4Addr::new(a, b, c, d), len)
                .map_or_else(|_| IpNet::default(), IpNet::V4)
        } else {
            Ipv6Net::new(Ipv6Addr::from(addr), len).map_or_else(|_| IpNet::default(), IpNet::V6)
        }
    }
}

/// FxHash's mixing step: plenty for keys that are addresses (not attacker-chosen to
/// collide: a policy's author only slows their own check), and ten times cheaper than
/// SipHash.
#[derive(Default, Clone, Copy)]
struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.write_u64(u64::from(*byte));
        }
    }

    fn write_u8(&mut self, value: u8) {
        self.write_u64(u64::from(value));
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = (self.0.rotate_left(5) ^ value).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn write_u128(&mut self, value: u128) {
        // Both halves, low first; `as` keeps exactly the low 64 bits, which is the point.
        #[expect(clippy::cast_possible_truncation, reason = "splitting into halves")]
        let (low, high) = (value as u64, (value >> 64) as u64);
        self.write_u64(low);
        self.write_u64(high);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// The subscriber space, indexed for "does this prefix overlap it".
#[derive(Default)]
struct SubscriberSpace {
    prefixes: HashSet<Key, std::hash::BuildHasherDefault<KeyHasher>>,
    /// Network addresses of all prefixes (family, bits), to find those inside a given
    /// prefix.
    starts: BTreeSet<(bool, u128)>,
    /// The prefix lengths in use, per family (IPv4, IPv6): a supernet lookup only needs
    /// to try these, typically a handful, instead of every length up to /32 or /128
    /// (which made checking a million-entry allowlist take seconds).
    lengths_v4: BTreeSet<u8>,
    lengths_v6: BTreeSet<u8>,
}

impl SubscriberSpace {
    fn insert(&mut self, net: IpNet) {
        let key = Key::of(net);
        self.prefixes.insert(key);
        self.starts.insert((key.v6, key.addr));
        match net {
            IpNet::V4(_) => self.lengths_v4.insert(net.prefix_len()),
            IpNet::V6(_) => self.lengths_v6.insert(net.prefix_len()),
        };
    }

    /// Whether `net` shares any address with subscriber space. Two prefixes overlap only
    /// if one contains the other: either a subscriber prefix is a supernet of `net`, or
    /// one starts inside `net`.
    fn overlaps(&self, net: IpNet) -> bool {
        let key = Key::of(net);
        let (lengths, bits) = match net {
            IpNet::V4(_) => (&self.lengths_v4, 32_u32),
            IpNet::V6(_) => (&self.lengths_v6, 128_u32),
        };
        // The network of `key` at a shorter length `len`: its address with the low
        // `bits - len` bits cleared.
        let mask = |len: u8| match bits - u32::from(len) {
            128 => 0,
            host => u128::MAX << host,
        };
        let inside_one = lengths.range(..=key.len).any(|&len| {
            self.prefixes.contains(&Key {
                addr: key.addr & mask(len),
                len,
                ..key
            })
        });
        let last = key.addr | !mask(key.len) & (u128::MAX >> (128 - bits));
        inside_one
            || self
                .starts
                .range((key.v6, key.addr)..=(key.v6, last))
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

    /// The file named by `loc` and the position in it of the prefix written there;
    /// `at` is the position of an inline entry (`loc.file` 0).
    fn place(&self, loc: Loc, at: Pos) -> (String, Pos) {
        if loc.file == 0 {
            return (self.file.to_owned(), at);
        }
        let name = self
            .lists
            .get(usize::from(loc.file) - 1)
            .cloned()
            .unwrap_or_default();
        let pos = Pos {
            line: loc.line as usize,
            column: usize::from(loc.column),
        };
        (name, pos)
    }

    /// Reports a problem with the prefix written at `loc` (at `at` if inline).
    fn report(&mut self, loc: Loc, at: Pos, message: String, error: bool) {
        let (file, pos) = self.place(loc, at);
        let diagnostic = Diagnostic {
            file,
            line: pos.line,
            column: pos.column,
            message,
        };
        if error {
            self.errors.push(diagnostic);
        } else {
            self.warnings.push(diagnostic);
        }
    }

    /// Resolves and registers the list files named under `key`; unusable names are
    /// reported.
    fn list_files(&mut self, key: &'static str, names: &[At<String>]) -> Vec<(u16, PathBuf)> {
        let mut files = Vec::with_capacity(names.len());
        for spanned in names {
            let name = &spanned.value;
            let at = |_: &Self| Pos::at(spanned);
            if self.lists.len() >= MAX_LIST_FILES {
                let pos = at(self);
                self.error(
                    pos,
                    format!("too many list files: at most {MAX_LIST_FILES} are supported"),
                );
                break;
            }
            if name.trim().is_empty() {
                let pos = at(self);
                self.error(pos, format!("`{key}` names an empty path"));
                continue;
            }
            let path = self.base.join(name);
            if files.iter().any(|(_, p)| *p == path) {
                let pos = at(self);
                self.error(
                    pos,
                    format!("list file {name:?} is listed twice under `{key}`"),
                );
                continue;
            }
            self.lists.push(path.display().to_string());
            let id = u16::try_from(self.lists.len()).unwrap_or(u16::MAX);
            files.push((id, path));
        }
        files
    }

    /// Reads one list file, calling `each` per entry; a file that cannot be read is
    /// reported at its name in the policy.
    fn read_list(
        &mut self,
        key: &'static str,
        id: u16,
        path: &Path,
        mut each: impl FnMut(&mut Self, ListLine<'_>),
    ) {
        let result = lists::read(path, |line| {
            if let Some((column, tail)) = line.trailing {
                let name = self
                    .lists
                    .get(usize::from(id) - 1)
                    .cloned()
                    .unwrap_or_default();
                self.errors.push(Diagnostic {
                    file: name,
                    line: line.line as usize,
                    column: column as usize,
                    message: format!(
                        "unexpected {} after the prefix {:?}: a list file holds one prefix a \
                         line, optionally followed by `# comment`",
                        abbreviate(tail),
                        line.prefix
                    ),
                });
            }
            each(self, line);
        });
        if let Err(why) = result {
            let shown = path.display().to_string();
            let pos = top_level_key(self.text, key).unwrap_or(Pos::START);
            self.error(pos, format!("cannot read list file {shown}: {why}"));
        }
    }

    /// Reports a YAML error at its own location, with the message alone (no snippet of
    /// the text, no location repeated).
    fn yaml_error(&mut self, error: &serde_saphyr::Error) {
        let location = error.location();
        let mut pos = location.as_ref().map_or(Pos::START, Pos::of);
        let mut message = yaml_message(error);
        if location.is_some() {
            // The parser points just after a tab; the tab is what to fix.
            let before = Pos {
                column: pos.column.saturating_sub(1),
                ..pos
            };
            if self.char_at(pos) != Some('\t') && self.char_at(before) == Some('\t') {
                pos = before;
            }
            if self.char_at(pos) == Some('\t') {
                message.push_str(" (a tab: YAML indentation must use spaces)");
            }
            match message.as_str() {
                "expected mapping start" if pos.column == 1 && self.document_start(pos) => {
                    message = "expected a p25 policy: a mapping with `version: 1` and \
                               `subscribers`"
                        .to_owned();
                }
                "expected mapping start" => {
                    message = format!(
                        "expected a mapping (`key: value`) here, not {}",
                        self.token_at(pos)
                    );
                }
                "expected sequence start" => {
                    message = format!(
                        "expected a list (`- item` lines, or `[a, b]`) here, not {}",
                        self.token_at(pos)
                    );
                }
                "invalid u16" | "invalid u32" => {
                    let max = if message == "invalid u16" {
                        u64::from(u16::MAX)
                    } else {
                        u64::from(u32::MAX)
                    };
                    message = format!(
                        "invalid number {}: write a whole number from 0 to {max}",
                        self.token_at(pos)
                    );
                }
                _ if message.starts_with("duplicate mapping key: ") => {
                    // Without the parser's advice to its own callers about its options.
                    let key = message
                        .trim_start_matches("duplicate mapping key: ")
                        .split(", set DuplicateKeyPolicy")
                        .next()
                        .unwrap_or_default();
                    message = format!(
                        "duplicate key `{key}`: a key may appear only once in a mapping; \
                         merge the two"
                    );
                }
                _ if message.starts_with("multiple YAML documents") => {
                    pos = second_document(self.text).unwrap_or(pos);
                    message = "more than one document (a `---` line after content): a policy \
                               is one YAML document"
                        .to_owned();
                }
                _ => {}
            }
        }
        self.error(pos, message);
    }

    /// Whether `pos` is where the document's content starts (after comments and `---`).
    fn document_start(&self, pos: Pos) -> bool {
        yaml_lines(self.text)
            .enumerate()
            .find(|(_, line)| {
                let line = line.trim();
                !line.is_empty() && !line.starts_with('#') && line != "---"
            })
            .is_some_and(|(index, _)| index + 1 == pos.line)
    }

    /// The value written at `pos`, quoted for a message: up to the next space, comma or
    /// bracket.
    fn token_at(&self, pos: Pos) -> String {
        let line = self
            .text
            .lines()
            .nth(pos.line.saturating_sub(1))
            .unwrap_or("");
        let rest: String = line
            .chars()
            .skip(pos.column.saturating_sub(1))
            .take_while(|c| !matches!(c, ',' | ']' | '}' | '#') && !c.is_whitespace())
            .collect();
        if rest.is_empty() {
            "nothing".to_owned()
        } else {
            format!("`{}`", abbreviate(&rest).trim_matches('"'))
        }
    }

    fn char_at(&self, pos: Pos) -> Option<char> {
        yaml_lines(self.text)
            .nth(pos.line.checked_sub(1)?)?
            .chars()
            .nth(pos.column.checked_sub(1)?)
    }

    /// `None` when the document did not deserialize; errors are then in `self.errors`.
    fn run(&mut self) -> Option<Policy> {
        let raw = self.serde_raw()?;
        let defaults = self.defaults(raw.defaults);
        let interfaces = self.interfaces(raw.interfaces);
        let subscriber_files = self.list_files("subscriber_files", &raw.subscriber_files);
        let allow_files = self.list_files("allow_files", &raw.allow_files);
        let (subscribers, space) = self.subscribers(
            &raw.subscribers,
            &subscriber_files,
            raw.allow_empty_subscribers,
        );
        let (allow, allow_listed) = self.allow(&raw.allow, &allow_files, &space);
        // The document as written is no longer needed: give its memory back before the
        // caller builds anything else from the policy.
        drop(raw.subscribers);
        drop(raw.allow);
        drop(space);
        Some(Policy {
            version: POLICY_VERSION,
            defaults,
            interfaces,
            subscribers,
            allow,
            allow_listed,
            subscriber_files: subscriber_files.into_iter().map(|(_, p)| p).collect(),
            allow_files: allow_files.into_iter().map(|(_, p)| p).collect(),
            allow_empty_subscribers: raw.allow_empty_subscribers,
        })
    }

    /// The document through serde-saphyr, its version checked; `None` with the errors
    /// reported.
    fn serde_raw(&mut self) -> Option<RawPolicy> {
        let error = match serde_saphyr::from_str_with_options::<Option<RawPolicy>>(
            self.text,
            yaml_options(),
        ) {
            Ok(Some(mut raw)) => return self.version(raw.version.take()).then_some(raw),
            // Nothing but comments, or a lone `~`: one clear error, not one per field.
            Ok(None) => {
                self.error(Pos::START, EMPTY.to_owned());
                return None;
            }
            Err(error) => error,
        };
        // Which error to report depends on the version: read it alone (a second pass, on
        // the error path only).
        match serde_saphyr::from_str_with_options::<Option<VersionProbe>>(self.text, yaml_options())
        {
            Ok(Some(probe)) => {
                if self.version(probe.version) {
                    self.yaml_error(&error);
                }
            }
            Ok(None) => self.error(Pos::START, EMPTY.to_owned()),
            Err(probe_error) => self.yaml_error(&probe_error),
        }
        None
    }

    /// Checks `version`: a document of another version may follow another schema, and a
    /// flood of unknown-field errors would bury the one that matters. `false`: do not go
    /// on.
    fn version(&mut self, version: Option<At<Version>>) -> bool {
        let Some(version) = version else {
            // Missing (or empty) is likely an otherwise fine file: report it, and check the
            // rest.
            let pos = top_level_key(self.text, "version").unwrap_or(Pos::START);
            self.error(
                pos,
                format!(
                    "missing `version: {POLICY_VERSION}` (this p25 understands policy version \
                     {POLICY_VERSION})"
                ),
            );
            return true;
        };
        if version.value.number == Some(u64::from(POLICY_VERSION)) {
            return true;
        }
        let shown = &version.value.shown;
        let pos = Pos::at(&version);
        self.error(
            pos,
            format!(
                "unsupported policy version {shown} (this p25 understands version \
                 {POLICY_VERSION})"
            ),
        );
        false
    }

    fn defaults(&mut self, raw: RawDefaults) -> Defaults {
        let ports = match raw.ports {
            None => vec![SMTP_PORT],
            Some(ports) => {
                self.ports(&ports);
                ports.value.into_iter().map(|port| port.value).collect()
            }
        };
        let reject_rate = self.bounded("reject_rate", raw.reject_rate.as_ref(), MAX_RST_RATE);
        let reject_burst = self.bounded("reject_burst", raw.reject_burst.as_ref(), MAX_RST_RATE);
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
    fn bounded(&mut self, name: &str, value: Option<&At<u32>>, max: u32) -> Option<u32> {
        let spanned = value?;
        let value = spanned.value;
        if (1..=max).contains(&value) {
            return Some(value);
        }
        let pos = Pos::at(spanned);
        self.error(
            pos,
            format!("{name} {value} is out of range: it must be between 1 and {max}"),
        );
        None
    }

    fn ports(&mut self, ports: &At<Vec<At<u16>>>) {
        if ports.value.is_empty() {
            let pos = Pos::at(ports);
            self.error(
                pos,
                format!(
                    "`defaults.ports` is empty; write `ports: [{SMTP_PORT}]` or leave it out \
                     (port {SMTP_PORT} is the only port policy version 1 supports)"
                ),
            );
        }
        for spanned in &ports.value {
            let port = spanned.value;
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
            let pos = Pos::at(spanned);
            self.error(pos, message);
        }
    }

    fn interfaces(&mut self, raw: Vec<RawInterface>) -> Vec<Interface> {
        let mut first: HashMap<String, Pos> = HashMap::new();
        let mut interfaces = Vec::with_capacity(raw.len());
        for iface in raw {
            let pos = Pos::at(&iface.name);
            let name = iface.name.value;
            if let Some(problem) = interface_name_problem(&name) {
                self.error(pos, problem);
            } else if let Some(&earlier) = first.get(&name) {
                self.error(
                    pos,
                    format!(
                        "interface {name:?} is listed twice (first on line {})",
                        earlier.line
                    ),
                );
            } else {
                first.insert(name.clone(), pos);
            }
            interfaces.push(Interface {
                name,
                role: iface.role,
                attach: iface.attach,
            });
        }
        interfaces
    }

    fn subscribers(
        &mut self,
        raw: &[RawSubscriber],
        files: &[(u16, PathBuf)],
        allow_empty: bool,
    ) -> (Vec<SubscriberEntry>, SubscriberSpace) {
        let mut list = PrefixList::new("subscribers", raw.len(), self.limits.subscribers);
        let mut entries = Vec::with_capacity(raw.len());
        let mut space = SubscriberSpace::default();
        for (index, entry) in raw.iter().enumerate() {
            let Some(prefix) = self.prefix(
                &mut list,
                Loc::inline(index),
                Pos::at(&entry.prefix),
                &entry.prefix.value,
            ) else {
                continue;
            };
            space.insert(prefix);
            entries.push(SubscriberEntry {
                prefix,
                mode: entry.mode,
                action: entry.action,
            });
        }
        // Entries of list files take the policy's defaults.
        let mut listed = 0_usize;
        for (id, path) in files {
            self.read_list("subscriber_files", *id, path, |this, line| {
                listed += 1;
                let Some(prefix) =
                    this.prefix(&mut list, Loc::file(*id, &line), Pos::START, line.prefix)
                else {
                    return;
                };
                space.insert(prefix);
                entries.push(SubscriberEntry {
                    prefix,
                    mode: None,
                    action: None,
                });
            });
        }
        if raw.is_empty() && listed == 0 && !allow_empty {
            let pos = top_level_key(self.text, "subscribers").unwrap_or(Pos::START);
            self.error(
                pos,
                "no subscriber prefixes: p25 would filter nothing; list your subscribers' \
                 address space under `subscribers`, or set `allow_empty_subscribers: true` if \
                 that is intended"
                    .to_owned(),
            );
        }
        self.repeats_and_overflow(list, raw);
        (entries, space)
    }

    /// The inline allowlist entries, and the prefixes of the allow list files (sorted,
    /// without repeats).
    fn allow(
        &mut self,
        raw: &[RawAllow],
        files: &[(u16, PathBuf)],
        space: &SubscriberSpace,
    ) -> (Vec<AllowEntry>, Vec<IpNet>) {
        let len = raw.len();
        let mut list = PrefixList::new("allow", len, self.limits.allow);
        let mut entries = Vec::with_capacity(len);
        for (index, entry) in raw.iter().enumerate() {
            let prefix = self.prefix(
                &mut list,
                Loc::inline(index),
                Pos::at(&entry.prefix),
                &entry.prefix.value,
            );
            for (name, spanned) in [
                ("comment", &entry.extra().comment),
                ("owner", &entry.extra().owner),
            ] {
                if let Some(spanned) = spanned.as_ref().filter(|v| v.value.len() > MAX_TEXT_BYTES) {
                    let value = &spanned.value;
                    let pos = Pos::at(spanned);
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
            let expires_at = entry.extra().expires.as_ref().map_or(Pos::START, Pos::at);
            let expires = match entry
                .extra()
                .expires
                .as_ref()
                .map(|s| (s.value.as_str(), parse_expiry(&s.value)))
            {
                None => None,
                Some((text, Ok(at)))
                    if self
                        .now
                        .checked_add(MAX_EXPIRY_AHEAD)
                        .is_none_or(|limit| at > limit) =>
                {
                    let pos = expires_at;
                    self.error(
                        pos,
                        format!(
                            "expires {text} is more than 10 years ahead; an exemption that \
                             long belongs without `expires`, or write the year you meant"
                        ),
                    );
                    None
                }
                Some((text, Ok(at))) => {
                    if at <= self.now {
                        expired = true;
                        let pos = expires_at;
                        self.warning(
                            pos,
                            format!(
                                "allow entry {} expired at {text}; the daemon skips expired \
                                 entries",
                                entry.prefix.value
                            ),
                        );
                    }
                    Some(at)
                }
                Some((text, Err(why))) => {
                    let pos = expires_at;
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
                "max_syn_per_minute",
                entry.extra().max_syn_per_minute.as_ref(),
                MAX_SYN_PER_MINUTE,
            );
            let burst = self.bounded(
                "syn_burst",
                entry.extra().syn_burst.as_ref(),
                MAX_SYN_PER_MINUTE,
            );
            if let (None, Some(spanned)) =
                (&entry.extra().max_syn_per_minute, &entry.extra().syn_burst)
            {
                let burst = spanned.value;
                let pos = Pos::at(spanned);
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
                let pos = Pos::at(&entry.prefix);
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
                comment: entry
                    .extra()
                    .comment
                    .as_ref()
                    .map(|c| Box::from(c.value.as_str())),
                owner: entry
                    .extra()
                    .owner
                    .as_ref()
                    .map(|o| Box::from(o.value.as_str())),
                expires,
                syn_limit,
            });
        }
        // Entries of list files carry no SYN limit and no expiry (those stay in YAML):
        // only the prefix is kept.
        for (id, path) in files {
            self.read_list("allow_files", *id, path, |this, line| {
                this.prefix(&mut list, Loc::file(*id, &line), Pos::START, line.prefix);
            });
        }
        let noun = list.noun();
        let seen = self.repeats_and_overflow(list, raw);
        // Coverage of the listed entries, in one sweep over the sorted lists rather than
        // a lookup per entry (which was a fifth of a million-entry check).
        let mut subscribers: Vec<Key> = space.prefixes.iter().copied().collect();
        subscribers.sort_unstable();
        let outside = outside_entries(
            &subscribers,
            seen.iter()
                .filter(|(_, loc)| loc.file != 0)
                .map(|(packed, loc)| (Key::of(packed.net()), (packed.net(), *loc))),
        );
        for (net, loc) in outside {
            self.report(
                loc,
                Pos::START,
                format!(
                    "{noun} entry {net} lies outside all subscriber prefixes, so it can never \
                     change a verdict"
                ),
                false,
            );
        }
        let mut listed: Vec<IpNet> = seen
            .iter()
            .filter(|(_, loc)| loc.file != 0)
            .map(|(packed, _)| packed.net())
            .collect();
        drop(seen);
        listed.dedup();
        listed.shrink_to_fit();
        // Sorted by `repeats_and_overflow`; an inline entry and a listed one never share a
        // prefix in a valid policy.
        (entries, listed)
    }

    /// Reports the prefixes of a list that repeat an earlier one, and per address family
    /// the first that does not fit in the dataplane (duplicates not counted). Done on the
    /// sorted list rather than with a map while reading: at a million entries the map
    /// cost tens of MiB. Either finding is an error, so the entries and warnings the
    /// caller built meanwhile are discarded with the policy.
    fn repeats_and_overflow<E: Prefixed>(
        &mut self,
        mut list: PrefixList,
        entries: &[E],
    ) -> Vec<(Packed, Loc)> {
        let mut seen = std::mem::take(&mut list.seen);
        let limit = list.limit;
        let at = |loc: Loc| {
            if loc.file == 0 {
                entries
                    .get(loc.line as usize)
                    .map_or(Pos::START, Prefixed::at)
            } else {
                Pos::START
            }
        };
        seen.sort_unstable();
        let (mut v4, mut v6) = (0_usize, 0_usize);
        let mut first: Option<(IpNet, Loc)> = None;
        for &(packed, loc) in &seen {
            let net = packed.net();
            match first {
                Some((earlier_net, earlier)) if earlier_net == net => {
                    let (earlier_file, earlier_pos) = self.place(earlier, at(earlier));
                    let (file, _) = self.place(loc, at(loc));
                    let place = if earlier_file == file {
                        format!("line {}", earlier_pos.line)
                    } else {
                        format!("{earlier_file}:{}", earlier_pos.line)
                    };
                    self.report(
                        loc,
                        at(loc),
                        format!(
                            "duplicate {} prefix {net} (first listed {}{place})",
                            list.noun(),
                            if earlier_file == file { "on " } else { "at " },
                        ),
                        true,
                    );
                }
                _ => {
                    first = Some((net, loc));
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
            let mut firsts: Vec<Loc> = Vec::with_capacity(count);
            let mut last: Option<IpNet> = None;
            for &(packed, loc) in &seen {
                let net = packed.net();
                if last != Some(net) && matches!(net, IpNet::V4(_)) == v4_family {
                    firsts.push(loc);
                }
                last = Some(net);
            }
            firsts.sort_unstable();
            let Some(&loc) = firsts.get(limit) else {
                continue;
            };
            let family = if v4_family { "IPv4" } else { "IPv6" };
            self.report(
                loc,
                at(loc),
                format!(
                    "too many {family} {} prefixes: the dataplane holds at most {limit} per \
                     address family",
                    list.noun(),
                ),
                true,
            );
        }
        seen
    }

    /// Parses and checks the prefix `text` of `list`, written at `loc`; `None` if it is
    /// unusable (reported).
    fn prefix(&mut self, list: &mut PrefixList, loc: Loc, at: Pos, text: &str) -> Option<IpNet> {
        let problem = match crate::parse_prefix(text) {
            Err(problem) => problem.to_string(),
            Ok(net) if net.prefix_len() == 0 && list.name == "subscribers" => format!(
                "subscriber prefix {net} covers every address: the whole address space as \
                 subscriber space would block port 25 for every host, including your own mail \
                 servers"
            ),
            Ok(net) => match crate::check_prefix(net) {
                Err(crate::Error::HostBits { net }) => {
                    format!("{net} has host bits set; did you mean {}?", net.trunc())
                }
                Err(e) => e.to_string(),
                Ok(net) => {
                    // Duplicates and the per-family limit are found once the whole list is
                    // known, by `repeats_and_overflow`.
                    list.seen.push((Packed::of(net), loc));
                    return Some(net);
                }
            },
        };
        self.report(loc, at, problem, true);
        None
    }
}

/// The entries of `sorted` (by key) that share no address with any of `subscribers`
/// (sorted keys), found in one sweep: prefixes either nest or are disjoint, so the
/// subscriber prefixes open at an address form a stack.
fn outside_entries<T: Copy>(subscribers: &[Key], sorted: impl Iterator<Item = (Key, T)>) -> Vec<T> {
    let end = |k: &Key| {
        let bits = if k.v6 { 128 } else { 32 };
        let host = bits - u32::from(k.len);
        let span = if host == 128 {
            u128::MAX
        } else {
            (1_u128 << host) - 1
        };
        k.addr | span
    };
    let mut outside = Vec::new();
    let mut next = subscribers.iter().peekable();
    // Open subscriber prefixes, outermost first: (family, last address).
    let mut open: Vec<(bool, u128)> = Vec::new();
    for (key, item) in sorted {
        while let Some(sub) = next.next_if(|s| (s.v6, s.addr) <= (key.v6, key.addr)) {
            while open
                .last()
                .is_some_and(|&(v6, last)| v6 != sub.v6 || last < sub.addr)
            {
                open.pop();
            }
            open.push((sub.v6, end(sub)));
        }
        while open
            .last()
            .is_some_and(|&(v6, last)| v6 != key.v6 || last < key.addr)
        {
            open.pop();
        }
        // An open prefix contains the entry's first address; otherwise a subscriber
        // prefix may start inside the entry.
        let covered = !open.is_empty()
            || next
                .peek()
                .is_some_and(|s| s.v6 == key.v6 && s.addr <= end(&key));
        if !covered {
            outside.push(item);
        }
    }
    outside
}

/// Where a prefix was written: entry `line` of the inline list (`file` 0), or line `line`,
/// column `column` of list file number `file`. Eight bytes, since a million-entry list
/// keeps one per entry while it is checked; the derived order puts inline entries first,
/// then the files in the order the policy names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Loc {
    file: u16,
    line: u32,
    column: u16,
}

impl Loc {
    fn inline(index: usize) -> Self {
        Self {
            file: 0,
            line: u32::try_from(index).unwrap_or(u32::MAX),
            column: 0,
        }
    }

    fn file(id: u16, line: &ListLine<'_>) -> Self {
        Self {
            file: id,
            line: line.line,
            column: u16::try_from(line.column).unwrap_or(u16::MAX),
        }
    }
}

/// A raw list entry with a prefix as written.
trait Prefixed {
    /// Where the prefix is written.
    fn at(&self) -> Pos;
}

impl Prefixed for RawSubscriber {
    fn at(&self) -> Pos {
        Pos::at(&self.prefix)
    }
}

impl Prefixed for RawAllow {
    fn at(&self) -> Pos {
        Pos::at(&self.prefix)
    }
}

/// Bookkeeping for one prefix list (`subscribers` or `allow`).
struct PrefixList {
    name: &'static str,
    limit: usize,
    /// Every usable prefix with where it was written, for
    /// `Checker::repeats_and_overflow` (the position of an inline entry is in the raw
    /// list, which outlives this).
    seen: Vec<(Packed, Loc)>,
}

impl PrefixList {
    fn new(name: &'static str, len: usize, limit: usize) -> Self {
        Self {
            name,
            limit,
            seen: Vec::with_capacity(len),
        }
    }

    fn noun(&self) -> &'static str {
        if self.name == "subscribers" {
            "subscriber"
        } else {
            "allow"
        }
    }
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

/// A document too large or nested too deeply to hand to the YAML parser: the position
/// and the message. Checked first, on the text alone: deep nesting is what exhausts a
/// recursive parser's stack (200,000 `[` did), so it must be caught before parsing.
fn shape_problem(text: &str) -> Option<(Pos, String)> {
    if text.len() > MAX_POLICY_BYTES {
        return Some((
            Pos::START,
            format!(
                "the policy is {} bytes long; at most {MAX_POLICY_BYTES} bytes are allowed \
                 (keep long lists in `subscriber_files` and `allow_files`)",
                text.len()
            ),
        ));
    }
    let too_deep = |line: usize, column: usize| {
        Some((
            Pos { line, column },
            format!(
                "collections nested more than {MAX_DEPTH} levels deep; a p25 policy needs \
                 four"
            ),
        ))
    };
    // Flow collections (`[`, `{`) outside quotes and comments, and block levels (deeper
    // indentation, and `- ` items opened on one line), counted together.
    let mut flow = 0_usize;
    let mut indents: Vec<usize> = Vec::new();
    for (index, line) in yaml_lines(text).enumerate() {
        let number = index + 1;
        let content = line.trim_start_matches(' ');
        let indent = line.len() - content.len();
        if flow == 0 && !content.is_empty() && !content.starts_with('#') {
            while indents.last().is_some_and(|&top| top >= indent) {
                indents.pop();
            }
            indents.push(indent);
            let dashes = content
                .as_bytes()
                .chunks(2)
                .take_while(|pair| *pair == b"- ")
                .count();
            if indents.len() + dashes > MAX_DEPTH {
                return too_deep(number, indent + 1);
            }
        }
        let mut quote: Option<char> = None;
        let mut previous = ' ';
        for (column, c) in line.chars().enumerate() {
            match quote {
                Some('"') if c == '\\' && previous == '\\' => {
                    previous = ' ';
                    continue;
                }
                Some(q) if c == q && !(q == '"' && previous == '\\') => quote = None,
                Some(_) => {}
                None => match c {
                    '#' if previous.is_whitespace() || column == 0 => break,
                    '\'' | '"'
                        if matches!(previous, ' ' | '\t' | '[' | '{' | ',' | ':')
                            || column == 0 =>
                    {
                        quote = Some(c);
                    }
                    '[' | '{' => {
                        flow += 1;
                        if indents.len() + flow > MAX_DEPTH {
                            return too_deep(number, column + 1);
                        }
                    }
                    ']' | '}' => flow = flow.saturating_sub(1),
                    _ => {}
                },
            }
            previous = c;
        }
    }
    None
}

/// How serde-saphyr reads a policy: a budget sized for the largest document accepted
/// (its defaults stop at 250,000 nodes, a quarter of a big inline policy), the depth cap,
/// and one document only.
fn yaml_options() -> serde_saphyr::Options {
    let mut budget = serde_saphyr::Budget::default();
    // Every event and node takes at least a byte of text.
    budget.max_events = MAX_POLICY_BYTES;
    budget.max_nodes = MAX_POLICY_BYTES;
    budget.max_total_scalar_bytes = MAX_POLICY_BYTES;
    budget.max_reader_input_bytes = Some(MAX_POLICY_BYTES);
    budget.max_depth = MAX_DEPTH;
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    // `yes`, `on` and friends are strings, as in YAML 1.2: only `true` and `false` are
    // booleans.
    options.strict_booleans = true;
    options
}

/// The message of a YAML error without the snippet of text and the location, which the
/// diagnostic gives as `file:line:column`.
fn yaml_message(error: &serde_saphyr::Error) -> String {
    let message = error.without_snippet().to_string();
    let message = message.trim();
    // serde-saphyr appends ` at line L, column C`, and for a value reached through an
    // alias ` (defined at line …) (used at line …)`.
    let cut = [" (defined at line ", " (used at line ", " at line "]
        .iter()
        .filter_map(|suffix| message.find(suffix))
        .min();
    let message = cut.map_or(message, |at| message.get(..at).unwrap_or(message));
    message.trim_end().to_owned()
}

/// Where the top-level key `key` is written, for a problem with the key as a whole (its
/// value missing or empty, a list file it names unreadable). Top-level keys of a block
/// mapping start their line; `None` for a policy written otherwise.
fn top_level_key(text: &str, key: &str) -> Option<Pos> {
    yaml_lines(text).enumerate().find_map(|(index, line)| {
        let rest = line.strip_prefix(key)?;
        rest.trim_start_matches(' ')
            .starts_with(':')
            .then_some(Pos {
                line: index + 1,
                column: 1,
            })
    })
}

/// Where a second YAML document starts (serde-saphyr points at the content after it):
/// the first `---` line after some content.
fn second_document(text: &str) -> Option<Pos> {
    let mut content = false;
    for (index, line) in yaml_lines(text).enumerate() {
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

/// The lines of `text` as the YAML parser counts them: CR LF, a lone CR and LF each end
/// a line (YAML 1.2; `str::lines` would miss the lone CR and shift every position after
/// it).
fn yaml_lines(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(text);
    std::iter::from_fn(move || {
        let current = rest?;
        match current.find(['\r', '\n']) {
            Some(at) => {
                let (line, tail) = current.split_at(at);
                let tail = tail
                    .strip_prefix("\r\n")
                    .or_else(|| tail.get(1..))
                    .unwrap_or("");
                rest = (!tail.is_empty()).then_some(tail);
                Some(line)
            }
            None => {
                rest = None;
                Some(current)
            }
        }
    })
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
        assert_eq!(got, ["t.yaml:2:14: unclosed bracket '['"]);
        // A value reached through an alias: the parser's message names both places, the
        // diagnostic only where it is used.
        let got = errors(
            "version: 1\nsubscribers:\n  - prefix: &p 100.64.0.0/10\ndefaults:\n  reject_rate: *p\n",
        );
        assert_eq!(
            got,
            ["t.yaml:5:16: invalid number `*p`: write a whole number from 0 to 4294967295"]
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

    /// A policy in a fresh directory with list files beside it; the directory is removed
    /// on drop.
    struct Dir(PathBuf);

    impl Dir {
        fn new(tag: &str, files: &[(&str, &str)]) -> Self {
            let dir = std::env::temp_dir().join(format!("p25-lists-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            let _ = std::fs::create_dir_all(&dir);
            for (name, text) in files {
                let _ = std::fs::write(dir.join(name), text);
            }
            Self(dir)
        }

        fn check(&self, text: &str, limits: Limits) -> Result<Checked, Vec<String>> {
            let file = self.0.join("p.yaml").display().to_string();
            check(text, &file, SystemTime::now(), limits).map_err(|error| match error {
                PolicyError::Invalid(diagnostics) => diagnostics
                    .iter()
                    .map(|d| d.to_string().replace(&format!("{}/", self.0.display()), ""))
                    .collect(),
                other => vec![other.to_string()],
            })
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn list_files_feed_both_lists() -> Result<(), Vec<String>> {
        let dir = Dir::new(
            "ok",
            &[
                (
                    "subs.txt",
                    "# from the IPAM\n100.64.0.0/24\n\n  2001:db8::/48  # site 1\r\n",
                ),
                ("allow.txt", "100.64.0.25 # relay\n2001:db8::25\n"),
            ],
        );
        let text = "\
version: 1
defaults: { mode: monitor }
subscriber_files: [subs.txt]
allow_files:
  - allow.txt
subscribers:
  - prefix: 192.0.2.0/24
    mode: enforce
allow:
  - { prefix: 192.0.2.25, max_syn_per_minute: 10 }
";
        let checked = dir.check(text, Limits::DATAPLANE)?;
        assert!(checked.warnings.is_empty(), "{:?}", checked.warnings);
        let policy = checked.policy;
        let subs: Vec<_> = policy
            .subscribers
            .iter()
            .map(|s| (s.prefix.to_string(), s.mode))
            .collect();
        assert_eq!(
            subs,
            [
                ("100.64.0.0/24".to_owned(), None),
                (
                    "192.0.2.0/24".to_owned(),
                    Some(super::super::PolicyMode::Enforce)
                ),
                ("2001:db8::/48".to_owned(), None),
            ]
        );
        let listed: Vec<_> = policy
            .allow_listed
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(listed, ["100.64.0.25/32", "2001:db8::25/128"]);
        assert_eq!(policy.allow.len(), 1);
        assert_eq!(policy.allow_len(), 3);
        assert_eq!(policy.list_files().count(), 2);
        Ok(())
    }

    #[test]
    fn list_file_entries_follow_the_inline_rules() {
        let dir = Dir::new(
            "bad",
            &[
                ("a.txt", "100.64.0.0/24\n100.64.1.1/24\n  100.64.0.0/24\n"),
                ("b.txt", "192.0.2.0/24\n10.0.0.0/8 extra words\n"),
                ("c.txt", "100.64.0.9\n203.0.113.9\n"),
            ],
        );
        let text = "\
version: 1
subscriber_files: [a.txt, b.txt]
allow_files: [c.txt, missing.txt]
subscribers:
  - prefix: 192.0.2.0/24
allow:
  - prefix: 100.64.0.9
";
        let got = dir.check(text, Limits::DATAPLANE).err().unwrap_or_default();
        assert_eq!(
            got,
            [
                "a.txt:2:1: 100.64.1.1/24 has host bits set; did you mean 100.64.1.0/24?",
                "a.txt:3:3: duplicate subscriber prefix 100.64.0.0/24 (first listed on line 1)",
                "b.txt:1:1: duplicate subscriber prefix 192.0.2.0/24 (first listed at p.yaml:5)",
                "b.txt:2:12: unexpected \"extra words\" after the prefix \"10.0.0.0/8\": a list \
                 file holds one prefix a line, optionally followed by `# comment`",
                "c.txt:1:1: duplicate allow prefix 100.64.0.9/32 (first listed at p.yaml:7)",
                "p.yaml:3:1: cannot read list file missing.txt: No such file or directory (os \
                 error 2)",
            ]
        );
    }

    #[test]
    fn list_files_count_toward_capacity_and_coverage() {
        let dir = Dir::new("cap", &[("a.txt", "10.0.0.1\n10.0.0.2\n203.0.113.1\n")]);
        let text = "\
version: 1
subscribers: [{ prefix: 10.0.0.0/24 }]
allow_files: [a.txt]
allow: [{ prefix: 10.0.0.3 }]
";
        let limits = Limits {
            subscribers: 10,
            allow: 2,
        };
        assert_eq!(
            dir.check(text, limits).err().unwrap_or_default(),
            [
                "a.txt:2:1: too many IPv4 allow prefixes: the dataplane holds at most 2 per \
              address family"
            ]
        );
        let warnings = dir.check(text, Limits::DATAPLANE).map(|c| {
            c.warnings
                .iter()
                .map(|d| d.message.clone())
                .collect::<Vec<_>>()
        });
        assert_eq!(
            warnings,
            Ok(vec![
                "allow entry 203.0.113.1/32 lies outside all subscriber prefixes, so it can \
                 never change a verdict"
                    .to_owned()
            ])
        );
    }

    #[test]
    fn deep_nesting_is_refused_before_parsing() {
        let deep = format!(
            "version: 1\nallow: {}{}\n",
            "[".repeat(200_000),
            "]".repeat(200_000)
        );
        assert_eq!(
            errors(&deep),
            [format!(
                "t.yaml:2:{}: collections nested more than {MAX_DEPTH} levels deep; a p25 \
                 policy needs four",
                7 + MAX_DEPTH
            )]
        );
        let mut block = String::from("version: 1\nsubscribers:\n");
        for level in 0..40 {
            block.push_str(&" ".repeat(level));
            block.push_str("- \n");
        }
        assert_eq!(errors(&block).len(), 1);
        assert!(
            errors(&block)
                .iter()
                .all(|e| e.contains("nested more than"))
        );
        let dashes = format!("version: 1\nsubscribers:\n{}x\n", "- ".repeat(40));
        assert!(
            errors(&dashes)
                .iter()
                .all(|e| e.contains("nested more than"))
        );
        // Brackets in comments and quotes do not count.
        let quoted = format!(
            "version: 1 # {}\nsubscribers: [{{prefix: 10.0.0.0/8}}]\nallow: [{{prefix: 10.0.0.1, \
             comment: \"{}\"}}]\n",
            "[".repeat(100),
            "{".repeat(100)
        );
        assert_eq!(errors(&quoted), Vec::<String>::new());
    }

    #[test]
    fn expiry_more_than_ten_years_ahead_is_an_error() {
        let text = "\
version: 1
subscribers: [{prefix: 192.0.2.0/24}]
allow:
  - prefix: 192.0.2.25
    expires: \"9999-12-31T23:59:59-12:00\"
";
        let got = errors(text);
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(
            got.iter().all(|e| e.starts_with(
                "t.yaml:5:14: expires 9999-12-31T23:59:59-12:00 is more than 10 years ahead"
            )),
            "{got:?}"
        );
    }

    #[test]
    fn the_coverage_sweep_agrees_with_the_lookup() {
        let nets =
            |list: &[&str]| -> Vec<IpNet> { list.iter().filter_map(|s| s.parse().ok()).collect() };
        let subs = nets(&[
            "10.0.0.0/8",
            "10.1.0.0/16",
            "10.2.3.0/24",
            "192.0.2.0/24",
            "2001:db8::/32",
            "0.0.0.1/32",
        ]);
        let entries = nets(&[
            "0.0.0.0/0",
            "0.0.0.0/31",
            "0.0.0.2/32",
            "9.255.255.255/32",
            "10.0.0.1/32",
            "10.1.2.3/32",
            "10.255.255.255/32",
            "11.0.0.0/8",
            "192.0.0.0/16",
            "192.0.3.0/24",
            "192.0.2.255/32",
            "::/0",
            "2001:db8:ffff::/48",
            "2001:db9::/32",
            "::1/128",
            "ff00::/8",
        ]);
        let mut space = SubscriberSpace::default();
        for net in &subs {
            space.insert(*net);
        }
        let mut keys: Vec<Key> = subs.iter().map(|n| Key::of(*n)).collect();
        keys.sort_unstable();
        let mut sorted = entries.clone();
        sorted.sort_unstable_by_key(|n| Key::of(*n));
        let swept = outside_entries(&keys, sorted.iter().map(|n| (Key::of(*n), *n)));
        let looked_up: Vec<IpNet> = sorted
            .iter()
            .copied()
            .filter(|n| !space.overlaps(*n))
            .collect();
        assert_eq!(swept, looked_up);
        assert_eq!(
            swept.iter().map(ToString::to_string).collect::<Vec<_>>(),
            [
                "0.0.0.2/32",
                "9.255.255.255/32",
                "11.0.0.0/8",
                "192.0.3.0/24",
                "::1/128",
                "2001:db9::/32",
                "ff00::/8"
            ]
        );
    }

    #[test]
    fn keys_sort_like_prefixes() {
        let mut nets: Vec<IpNet> = [
            "2001:db8::/32",
            "10.0.0.0/8",
            "10.0.0.0/24",
            "0.0.0.0/0",
            "::/0",
            "255.255.255.255/32",
            "10.0.0.1/32",
            "2001:db8::1/128",
        ]
        .iter()
        .filter_map(|s| s.parse().ok())
        .collect();
        let mut by_key = nets.clone();
        nets.sort_unstable();
        by_key.sort_unstable_by_key(|n| Key::of(*n));
        assert_eq!(nets, by_key);
        let mut packed: Vec<Packed> = nets.iter().map(|n| Packed::of(*n)).collect();
        packed.reverse();
        packed.sort_unstable();
        assert_eq!(nets, packed.iter().map(|p| p.net()).collect::<Vec<_>>());
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
