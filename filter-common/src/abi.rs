//! The binary interface between the eBPF programs and userspace.
//!
//! Every type here is stored in a BPF map, so its layout is part of the ABI: `#[repr(C)]`,
//! explicit `_pad` fields (the kernel compares key bytes, so padding must be zeroed and
//! visible), and a `const` size assertion. Enumerations are `u8` newtypes with associated
//! constants rather than Rust `enum`s, because a map can hold any byte and reading an
//! out-of-range discriminant into a Rust enum would be undefined behaviour. They are
//! declared with `abi_enum!` (abi/macros.rs), which writes the constants, `name()`,
//! `COUNT` and `ALL` from one list; a new one also goes into `layout_fingerprint()`.
//!
//! Changing any layout here, or the meaning of a field, requires bumping [`ABI_VERSION`]:
//! pinned maps outlive the programs that created them. [`LAYOUT_FINGERPRINT`] hashes the
//! size and field offsets of every map type and the value of every enumeration constant,
//! and a unit test pins it, so a change that forgets the bump fails the tests.

use core::mem::{offset_of, size_of};

// `abi_enum!` and `layout_of!`, used below.
#[macro_use]
mod macros;

/// Version of the map layouts below. Recorded next to the pinned maps so that a newer
/// daemon never misreads maps pinned by an older one.
pub const ABI_VERSION: u32 = 4;

/// Names of the maps, shared so that userspace cannot drift from the object file.
pub mod map_names {
    /// LPM trie of subscriber IPv4 prefixes → [`super::SubscriberValue`].
    pub const SUBSCRIBERS_V4: &str = "SUBSCRIBERS_V4";
    /// LPM trie of subscriber IPv6 prefixes → [`super::SubscriberValue`].
    pub const SUBSCRIBERS_V6: &str = "SUBSCRIBERS_V6";
    /// LPM trie of allowlisted IPv4 prefixes → [`super::AllowValue`].
    pub const ALLOW_V4: &str = "ALLOW_V4";
    /// LPM trie of allowlisted IPv6 prefixes → [`super::AllowValue`].
    pub const ALLOW_V6: &str = "ALLOW_V6";
    /// Hash of the IPv4 subscriber prefixes, keyed by LPM key (prefix length and masked
    /// address), probed once per length in use ([`SUB_LENGTHS`]).
    pub const SUBSCRIBERS_HASH_V4: &str = "SUBSCRIBERS_HASH_V4";
    /// Hash of the IPv6 subscriber prefixes, as [`SUBSCRIBERS_HASH_V4`].
    pub const SUBSCRIBERS_HASH_V6: &str = "SUBSCRIBERS_HASH_V6";
    /// Single-entry array: the subscriber prefix lengths in use
    /// ([`super::SubscriberLengths`]).
    pub const SUB_LENGTHS: &str = "SUB_LENGTHS";
    /// Hash of allowlisted IPv4 host entries (/32), in front of [`ALLOW_V4`]: LPM key
    /// (prefix length 32) → [`super::AllowValue`].
    pub const ALLOW_HOST_V4: &str = "ALLOW_HOST_V4";
    /// Hash of allowlisted IPv6 host entries (/128), in front of [`ALLOW_V6`].
    pub const ALLOW_HOST_V6: &str = "ALLOW_HOST_V6";
    /// Single-entry array holding the global [`super::Config`].
    pub const CONFIG: &str = "CONFIG";
    /// Per-CPU array of verdict counters, indexed by [`super::counter_index`] (interface
    /// slot and [`super::CounterKey`]).
    pub const COUNTERS: &str = "COUNTERS";
    /// Per-CPU array of parse-outcome counters, indexed by [`super::ParseOutcome`].
    pub const PARSE_COUNTERS: &str = "PARSE_COUNTERS";
    /// Single-entry array holding the [`super::AbiRecord`] of whoever created the maps.
    /// The dataplane never reads it: it exists so that pinned maps describe themselves.
    pub const ABI: &str = "ABI";
    /// LRU hash of offenders: [`super::OffenderKey`] → [`super::OffenderValue`].
    pub const OFFENDERS: &str = "OFFENDERS";
    /// Ring buffer of sampled [`super::Event`]s.
    pub const EVENTS: &str = "EVENTS";
    /// Per-CPU array of event outcomes (`u64`), indexed by [`super::EventStat`].
    pub const EVENT_STATS: &str = "EVENT_STATS";
    /// Per-CPU token bucket ([`super::Bucket`]) that rate-limits [`EVENTS`].
    pub const EVENT_BUCKET: &str = "EVENT_BUCKET";
    /// Per-CPU token bucket ([`super::Bucket`]) that rate-limits the TCP RSTs of reject
    /// mode.
    pub const RST_BUCKET: &str = "RST_BUCKET";
    /// Per-CPU array of reject fallbacks (`u64`), indexed by [`super::RejectFallback`].
    pub const REJECT_FALLBACKS: &str = "REJECT_FALLBACKS";
    /// LRU hash of per-source SYN token buckets for rate-limited allowlist entries:
    /// [`super::OffenderKey`] → [`super::Bucket`].
    pub const SYN_BUCKETS: &str = "SYN_BUCKETS";

    /// Every map, in creation order.
    pub const ALL: [&str; 20] = [
        SUBSCRIBERS_V4,
        SUBSCRIBERS_V6,
        SUBSCRIBERS_HASH_V4,
        SUBSCRIBERS_HASH_V6,
        SUB_LENGTHS,
        ALLOW_V4,
        ALLOW_V6,
        ALLOW_HOST_V4,
        ALLOW_HOST_V6,
        CONFIG,
        COUNTERS,
        PARSE_COUNTERS,
        ABI,
        OFFENDERS,
        EVENTS,
        EVENT_STATS,
        EVENT_BUCKET,
        RST_BUCKET,
        REJECT_FALLBACKS,
        SYN_BUCKETS,
    ];
}

/// Names of the programs in the object file.
pub mod program_names {
    /// The XDP entry point.
    pub const XDP: &str = "p25_xdp";
    /// The TC (clsact/tcx) entry point.
    pub const TC: &str = "p25_tc";
    /// The XDP entry point for an `upstream` attachment: the inbound rule only.
    pub const XDP_UPSTREAM: &str = "p25_xdp_upstream";
    /// The TC entry point for an `upstream` attachment: the inbound rule only.
    pub const TC_UPSTREAM: &str = "p25_tc_upstream";
}

/// Default capacity of the subscriber tries (per family). LPM tries are not preallocated,
/// so capacity costs nothing until used; 100k prefixes is the scale the project tests.
pub const SUBSCRIBERS_MAX_ENTRIES: u32 = 1 << 18;
/// Default capacity of the allowlist tries (per family); sized for 1M entries with room.
pub const ALLOW_MAX_ENTRIES: u32 = 1 << 21;
/// Default capacity of the allowlist host hashes (per family): host entries are nearly all
/// of a big allowlist. Not preallocated either.
pub const ALLOW_HOST_MAX_ENTRIES: u32 = 1 << 21;

/// Default capacity of the offender LRU: how many subscribers (IPv4 /32, IPv6 /64 by
/// default) with blocked port-25 attempts are remembered before the least recently seen
/// is evicted.
pub const OFFENDERS_MAX_ENTRIES: u32 = 1 << 16;
/// Size of the event ring buffer in bytes (a power-of-two multiple of the page size):
/// [`EVENTS_RING_EVENTS`] (4,096) events, which the daemon drains many times a second.
pub const EVENTS_RING_BYTES: u32 = 256 * 1024;
/// Events the ring buffer holds when full: each record is an [`Event`] behind the
/// kernel's 8-byte record header (`BPF_RINGBUF_HDR_SZ`), rounded up to 8 bytes.
pub const EVENTS_RING_EVENTS: u32 =
    EVENTS_RING_BYTES / (size_of::<Event>() as u32 + 8).next_multiple_of(8);
const _: () = assert!(EVENTS_RING_EVENTS == 4096);
/// Default capacity of the SYN_BUCKETS LRU: how many sources of rate-limited allowlist
/// entries have a live bucket. An evicted source starts again with a full bucket, so the
/// table only needs to hold the sources active within one refill period.
pub const SYN_BUCKETS_MAX_ENTRIES: u32 = 1 << 16;

/// The well-known SMTP relay port (RFC 5321) this whole project is about.
pub const SMTP_PORT: u16 = 25;

/// IPv4 address bytes in network order: the data part of an IPv4 LPM key.
///
/// A newtype rather than a `u32` so that no caller can accidentally store a host-order
/// integer: the LPM trie matches prefixes bit by bit from the first byte.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ipv4Key(pub [u8; 4]);

/// IPv6 address bytes in network order: the data part of an IPv6 LPM key.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ipv6Key(pub [u8; 16]);

impl From<core::net::Ipv4Addr> for Ipv4Key {
    fn from(addr: core::net::Ipv4Addr) -> Self {
        Self(addr.octets())
    }
}

impl From<Ipv4Key> for core::net::Ipv4Addr {
    fn from(key: Ipv4Key) -> Self {
        Self::from(key.0)
    }
}

impl From<core::net::Ipv6Addr> for Ipv6Key {
    fn from(addr: core::net::Ipv6Addr) -> Self {
        Self(addr.octets())
    }
}

impl From<Ipv6Key> for core::net::Ipv6Addr {
    fn from(key: Ipv6Key) -> Self {
        Self::from(key.0)
    }
}

abi_enum! {
    /// Enforcement mode. `DEFAULT` only makes sense on a prefix: it defers to the global
    /// mode. An unknown value is labelled `enforce`, as [`Mode::effective`] treats it.
    pub struct Mode(u8), dense, unknown "enforce" {
        /// On a prefix: use the global mode. As the global mode: enforce.
        DEFAULT = 0 => "default",
        /// Drop what matches.
        ENFORCE = 1 => "enforce",
        /// Count what would have been dropped, but pass it (safe roll-out).
        MONITOR = 2 => "monitor",
    }
}

impl Mode {
    /// The mode in force for a prefix whose own mode is `self` under global mode `global`.
    /// A prefix's explicit mode overrides the global default; anything unknown enforces,
    /// because a filter that silently stops filtering is the worse failure.
    #[inline(always)]
    pub const fn effective(self, global: Self) -> Self {
        let mode = if self.0 == Self::DEFAULT.0 {
            global
        } else {
            self
        };
        if mode.0 == Self::MONITOR.0 {
            Self::MONITOR
        } else {
            Self::ENFORCE
        }
    }
}

abi_enum! {
    /// What to do with a TCP fragment whose ports cannot be seen (a non-first fragment, or
    /// a first fragment too short to hold them) when it touches subscriber space. Anything
    /// but `DROP` passes, so an unknown value is labelled `pass`.
    pub struct FragmentPolicy(u8), dense, unknown "pass" {
        /// Fail open: pass it (counted as a parse outcome only).
        PASS = 0 => "pass",
        /// Fail closed: treat it as a port-25 match of both rules (drop, or would-drop in
        /// monitor mode), unless the subscriber address is allowlisted.
        DROP = 1 => "drop",
    }
}

abi_enum! {
    /// What to do with TCP from a subscriber source whose ports cannot be read because of
    /// its headers: an IPv6 extension header chain longer than
    /// [`crate::classify::MAX_IPV6_EXT_HEADERS`], or a first fragment whose header chain
    /// runs past its end (RFC 7112 requires the whole chain in the first fragment).
    /// Anything but `PASS` fails closed, so an unknown value is labelled `port25`.
    pub struct UnreadableTcp(u8), dense, unknown "port25" {
        /// Fail closed (the default, and what a zeroed CONFIG means): treat it as TCP to
        /// port 25 under the egress rule, so a non-allowlisted subscriber source is dropped.
        PORT25 = 0 => "port25",
        /// Fail open: pass it (counted as a parse outcome only).
        PASS = 1 => "pass",
    }
}

abi_enum! {
    /// Where an allowlist entry came from, so that tools reading the pinned maps directly
    /// can tell policy entries from runtime (`p25ctl allow`) entries. Starts at 1, so a
    /// zeroed value is `unknown`.
    pub struct Origin(u8), sparse, unknown "unknown" {
        /// From the policy file.
        POLICY = 1 => "policy",
        /// Added at run time by an operator.
        RUNTIME = 2 => "runtime",
    }
}

abi_enum! {
    /// What an enforced egress block does with the packet. `DEFAULT` only makes sense on a
    /// prefix: it defers to [`Config::action`]. An unknown value is labelled `drop`, as
    /// [`BlockAction::effective`] treats it.
    pub struct BlockAction(u8), dense, unknown "drop" {
        /// On a prefix: use the global action. As the global action: drop.
        DEFAULT = 0 => "default",
        /// Drop silently.
        DROP = 1 => "drop",
        /// Drop, and answer a connection attempt (a SYN) with a TCP RST where the hook can
        /// (XDP_TX), so that the client fails at once instead of timing out.
        REJECT = 2 => "reject",
    }
}

impl BlockAction {
    /// The action in force for a prefix whose own action is `self` under global action
    /// `global`. Anything unknown drops: a reject is a courtesy, a drop is always safe.
    #[inline(always)]
    pub const fn effective(self, global: Self) -> Self {
        let action = if self.0 == Self::DEFAULT.0 {
            global
        } else {
            self
        };
        if action.0 == Self::REJECT.0 {
            Self::REJECT
        } else {
            Self::DROP
        }
    }
}

/// Value of the SUBSCRIBERS tries.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SubscriberValue {
    /// The prefix's own mode; [`Mode::DEFAULT`] defers to [`Config::mode`].
    pub mode: Mode,
    /// The prefix's own block action; [`BlockAction::DEFAULT`] defers to
    /// [`Config::action`].
    pub action: BlockAction,
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<SubscriberValue>() == 4);

impl SubscriberValue {
    /// A value with the given mode, the default action and zeroed padding.
    pub const fn new(mode: Mode) -> Self {
        Self {
            mode,
            action: BlockAction::DEFAULT,
            _pad: [0; 2],
        }
    }

    /// The same value with its own block action.
    #[must_use]
    pub const fn with_action(self, action: BlockAction) -> Self {
        Self { action, ..self }
    }
}

/// Most prefix lengths per family the dataplane probes in the subscriber hashes; with more
/// lengths in use the family's lookups walk the trie instead.
pub const MAX_SUBSCRIBER_LENGTHS: usize = 8;

/// The single entry of SUB_LENGTHS, written by the control plane whenever the set of
/// subscriber prefix lengths in use changes: per family, whether the hash is in use and
/// its lengths, longest first. All zeroes (a fresh map) means: walk the tries.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SubscriberLengths {
    /// IPv4 lengths in use, longest first; the first `v4_count` are meaningful.
    pub v4: [u8; MAX_SUBSCRIBER_LENGTHS],
    /// IPv6 lengths in use, longest first; the first `v6_count` are meaningful.
    pub v6: [u8; MAX_SUBSCRIBER_LENGTHS],
    pub v4_count: u8,
    pub v6_count: u8,
    /// 1: IPv4 lookups probe SUBSCRIBERS_HASH_V4; anything else: the trie.
    pub v4_hash: u8,
    /// 1: IPv6 lookups probe SUBSCRIBERS_HASH_V6; anything else: the trie.
    pub v6_hash: u8,
    pub _pad: [u8; 4],
}
const _: () = assert!(size_of::<SubscriberLengths>() == 24);

/// Value of the ALLOW tries.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AllowValue {
    /// Where the entry came from; the dataplane does not read it.
    pub origin: Origin,
    pub _pad: [u8; 3],
    /// New TCP/25 connections (egress SYNs) each source inside the entry may open per
    /// minute; 0 means unlimited. Sources are IPv4 /32s and IPv6
    /// [`Config::offender_v6_prefix`] prefixes, as in the offender table.
    pub syn_per_minute: u32,
    /// Bucket size of that limit: SYNs a source may send at once after being idle (at
    /// least 1 when a limit is set).
    pub syn_burst: u32,
}
const _: () = assert!(size_of::<AllowValue>() == 12);

/// Upper bound of [`AllowValue::syn_per_minute`] and [`AllowValue::syn_burst`]; keeps the
/// bucket arithmetic far from overflow.
pub const MAX_SYN_PER_MINUTE: u32 = 1_000_000;

impl AllowValue {
    /// A value with the given origin, no SYN limit and zeroed padding.
    pub const fn new(origin: Origin) -> Self {
        Self {
            origin,
            _pad: [0; 3],
            syn_per_minute: 0,
            syn_burst: 0,
        }
    }

    /// The same value with a SYN rate limit (0 per minute: unlimited).
    #[must_use]
    pub const fn with_syn_limit(self, per_minute: u32, burst: u32) -> Self {
        Self {
            syn_per_minute: per_minute,
            syn_burst: burst,
            ..self
        }
    }
}

/// The single entry of the CONFIG array. All zeroes (the state of a freshly created map)
/// means: enforce, fragments fail open, unreadable TCP from subscribers treated as port 25,
/// generation 0, offenders keyed by IPv6 /64, no drop events, blocks drop (no RSTs). Nothing is dropped until subscriber prefixes are loaded,
/// so the zero state is safe.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Config {
    /// Global mode; prefixes with [`Mode::DEFAULT`] follow it.
    pub mode: Mode,
    /// Treatment of TCP fragments without visible ports.
    pub fragments: FragmentPolicy,
    /// Prefix length that identifies one IPv6 subscriber in the offender table; 0 means
    /// [`DEFAULT_OFFENDER_V6_PREFIX`]. Per-/128 keys would be trivially evaded by a host
    /// that rotates addresses inside its /64.
    pub offender_v6_prefix: u8,
    /// Global block action; prefixes with [`BlockAction::DEFAULT`] follow it.
    pub action: BlockAction,
    /// Written by the control plane so that anyone reading the pinned map can tell which
    /// policy is in force. The dataplane never reads it.
    pub generation: u32,
    /// Drop events allowed per second **per CPU** (the bucket is per CPU so that CPUs never
    /// contend); 0 disables events.
    pub event_rate: u32,
    /// Burst size of each CPU's event bucket (at least 1 when events are on).
    pub event_burst: u32,
    /// TCP RSTs reject mode may send per second **per CPU** (like the event bucket); a
    /// rejected SYN beyond it is dropped silently. 0 sends none.
    pub rst_rate: u32,
    /// Burst size of each CPU's RST bucket (at least 1 when RSTs are on).
    pub rst_burst: u32,
    /// TCP from a subscriber whose ports cannot be read: port 25 (0) or pass.
    pub unreadable_tcp: UnreadableTcp,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<Config>() == 28);

/// Offender key length for IPv6 when [`Config::offender_v6_prefix`] is 0.
pub const DEFAULT_OFFENDER_V6_PREFIX: u8 = 64;
/// Upper bound of [`Config::event_rate`]; keeps the bucket arithmetic far from overflow.
pub const MAX_EVENT_RATE: u32 = 1_000_000;
/// Upper bound of [`Config::rst_rate`] and [`Config::rst_burst`].
pub const MAX_RST_RATE: u32 = 1_000_000;

/// Index of the only CONFIG entry (and of the only ABI entry).
pub const CONFIG_INDEX: u32 = 0;

/// The value of the ABI map: which layout the pinned maps were created with.
///
/// The version alone relies on every layout change bumping it; the fingerprint catches a
/// forgotten bump, because it is computed from the sizes and field offsets of every key
/// and value type and from every enumeration constant.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AbiRecord {
    /// [`ABI_VERSION`] of the creator.
    pub version: u32,
    /// [`LAYOUT_FINGERPRINT`] of the creator.
    pub fingerprint: u32,
}
const _: () = assert!(size_of::<AbiRecord>() == 8);

impl AbiRecord {
    /// The record this build writes and expects.
    pub const CURRENT: Self = Self {
        version: ABI_VERSION,
        fingerprint: LAYOUT_FINGERPRINT,
    };

    /// Records that earlier builds wrote for exactly this layout: builds of ABI v4 before
    /// the fingerprint covered offsets and constant values hashed sizes and counts only
    /// (FNV-1a, `0x608b_1cc3`; a unit test recomputes it from the current types). A v4
    /// router upgraded to this build keeps its pinned maps instead of being refused.
    /// Entries of an older version never match once [`ABI_VERSION`] is bumped (each
    /// version pins under its own directory, and the version is compared too), so they
    /// can go with the next bump.
    pub const SAME_LAYOUT: [Self; 1] = [Self {
        version: 4,
        fingerprint: 0x608b_1cc3,
    }];

    /// Whether maps carrying this record can be used by this build: the current record,
    /// or an earlier build's record of the same layout.
    pub fn is_compatible(self) -> bool {
        self == Self::CURRENT
            || Self::SAME_LAYOUT
                .iter()
                .any(|same| same.version == ABI_VERSION && *same == self)
    }
}

/// FNV-1a over a sequence of `u32` layout facts (sizes, offsets, counts, constant values),
/// each hashed as its four little-endian bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Fingerprint(u32);

impl Fingerprint {
    const EMPTY: Self = Self(0x811c_9dc5);

    const fn part(self, part: u32) -> Self {
        let mut hash = self.0;
        let mut byte = 0;
        while byte < 4 {
            hash ^= (part >> (byte * 8)) & 0xff;
            hash = hash.wrapping_mul(0x0100_0193);
            byte += 1;
        }
        Self(hash)
    }

    const fn parts(mut self, parts: &[u32]) -> Self {
        let mut rest = parts;
        while let [first, tail @ ..] = rest {
            self = self.part(*first);
            rest = tail;
        }
        self
    }
}

/// The layout this build's maps have: every map type's size and field offsets, every
/// enumeration's values, and the constants that size or index the maps. Stored in the
/// ABI map (see [`AbiRecord`]).
pub const LAYOUT_FINGERPRINT: u32 = layout_fingerprint().0;

const fn layout_fingerprint() -> Fingerprint {
    let fp = Fingerprint::EMPTY
        .parts(&layout_of!(Ipv4Key { 0 }))
        .parts(&layout_of!(Ipv6Key { 0 }))
        .parts(&layout_of!(SubscriberValue { mode, action, _pad }))
        .parts(&layout_of!(SubscriberLengths {
            v4,
            v6,
            v4_count,
            v6_count,
            v4_hash,
            v6_hash,
            _pad
        }))
        .parts(&layout_of!(AllowValue {
            origin,
            _pad,
            syn_per_minute,
            syn_burst
        }))
        .parts(&layout_of!(Config {
            mode,
            fragments,
            offender_v6_prefix,
            action,
            generation,
            event_rate,
            event_burst,
            rst_rate,
            rst_burst,
            unreadable_tcp,
            _pad
        }))
        .parts(&layout_of!(Counter { packets, bytes }))
        .parts(&layout_of!(CounterKey {
            direction,
            family,
            verdict,
            _pad
        }))
        .parts(&layout_of!(AbiRecord {
            version,
            fingerprint
        }))
        .parts(&layout_of!(OffenderKey {
            family,
            prefix_len,
            _pad,
            addr
        }))
        .parts(&layout_of!(OffenderValue {
            attempts,
            first_seen_ns,
            last_seen_ns,
            last_dst,
            last_dport,
            last_verdict,
            _pad
        }))
        .parts(&layout_of!(Event {
            ts_ns,
            ifindex,
            direction,
            family,
            verdict,
            hook,
            src,
            dst,
            sport,
            dport,
            tcp_flags,
            _pad
        }))
        .parts(&layout_of!(Bucket {
            nano_tokens,
            last_ns
        }))
        .parts(&[
            COUNTER_SLOTS,
            IFACE_SLOTS,
            CONFIG_INDEX,
            MAX_SUBSCRIBER_LENGTHS as u32,
            DEFAULT_OFFENDER_V6_PREFIX as u32,
        ]);
    let fp = Mode::fingerprint(fp);
    let fp = FragmentPolicy::fingerprint(fp);
    let fp = UnreadableTcp::fingerprint(fp);
    let fp = Origin::fingerprint(fp);
    let fp = BlockAction::fingerprint(fp);
    let fp = Direction::fingerprint(fp);
    let fp = Family::fingerprint(fp);
    let fp = Verdict::fingerprint(fp);
    let fp = ParseOutcome::fingerprint(fp);
    let fp = HookKind::fingerprint(fp);
    let fp = EventStat::fingerprint(fp);
    RejectFallback::fingerprint(fp)
}

abi_enum! {
    /// Which rule a verdict counter belongs to.
    pub struct Direction(u8), dense, unknown "unknown" {
        /// Traffic to TCP port 25 (the egress rule: subscriber source).
        EGRESS = 0 => "egress",
        /// Traffic from TCP port 25 (the inbound rule, MAAWG practice 6: subscriber
        /// destination).
        INBOUND = 1 => "inbound",
    }
}

abi_enum! {
    /// Address family of a verdict counter.
    pub struct Family(u8), dense, unknown "unknown" {
        /// IPv4.
        IPV4 = 0 => "ipv4",
        /// IPv6.
        IPV6 = 1 => "ipv6",
    }
}

abi_enum! {
    /// What happened to a packet that one of the rules looked at.
    pub struct Verdict(u8), dense, unknown "unknown" {
        /// The rule's port matched but the subscriber address is not in subscriber space.
        PASSED = 0 => "passed",
        /// Dropped.
        DROPPED = 1 => "dropped",
        /// Would have been dropped, passed because of monitor mode.
        WOULD_DROP = 2 => "would_drop",
        /// Would have been dropped, passed because the address is allowlisted (and, for a
        /// rate-limited entry, within its SYN limit).
        ALLOWLISTED = 3 => "allowlisted",
        /// Dropped, and answered with a TCP RST (reject mode, XDP only, egress SYNs).
        REJECTED = 4 => "rejected",
        /// An allowlisted source's egress SYN over its `max_syn_per_minute`: dropped.
        RATE_LIMITED = 5 => "rate_limited",
        /// As [`Verdict::RATE_LIMITED`], but passed because of monitor mode.
        WOULD_RATE_LIMIT = 6 => "would_rate_limit",
    }
}

impl Verdict {
    /// Whether the rule matched (a drop or a monitor-mode would-drop). The classifier
    /// decides only these; the hooks may turn them into the later verdicts.
    #[inline(always)]
    pub const fn is_match(self) -> bool {
        self.0 == Self::DROPPED.0 || self.0 == Self::WOULD_DROP.0
    }
    /// Whether the packet was blocked or would have been: every verdict that is evidence
    /// against the subscriber (events, offender table).
    #[inline(always)]
    pub const fn is_blocked(self) -> bool {
        self.0 == Self::DROPPED.0
            || self.0 == Self::WOULD_DROP.0
            || self.0 == Self::REJECTED.0
            || self.0 == Self::RATE_LIMITED.0
            || self.0 == Self::WOULD_RATE_LIMIT.0
    }
}

/// Identifies one verdict counter. The COUNTERS map is an array, so the key is turned into
/// a dense index by [`CounterKey::index`]:
///
/// ```text
/// index = (direction * Family::COUNT + family) * Verdict::COUNT + verdict
/// ```
///
/// Userspace walks all [`COUNTER_SLOTS`] indices and maps them back with
/// [`CounterKey::from_index`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CounterKey {
    pub direction: Direction,
    pub family: Family,
    pub verdict: Verdict,
    pub _pad: u8,
}
const _: () = assert!(size_of::<CounterKey>() == 4);

/// Number of verdict counters per interface slot.
pub const COUNTER_SLOTS: u32 =
    Direction::COUNT as u32 * Family::COUNT as u32 * Verdict::COUNT as u32;

/// Number of interface slots in the COUNTERS map. An interface's slot is its ifindex
/// modulo this (see [`iface_slot`]): an array index costs the dataplane nothing, where a
/// hash keyed by ifindex would cost a lookup per counted packet. Two attached interfaces
/// can share a slot; the daemon detects that and labels the slot with both names.
pub const IFACE_SLOTS: u32 = 64;

/// Number of entries in the COUNTERS map.
pub const COUNTERS_ENTRIES: u32 = IFACE_SLOTS * COUNTER_SLOTS;

/// The interface slot of an ifindex.
#[inline(always)]
pub const fn iface_slot(ifindex: u32) -> u32 {
    ifindex % IFACE_SLOTS
}

/// Index into the COUNTERS map: `iface_slot(ifindex) * COUNTER_SLOTS + key.index()`.
#[inline(always)]
pub const fn counter_index(ifindex: u32, key: CounterKey) -> u32 {
    iface_slot(ifindex) * COUNTER_SLOTS + key.index()
}

impl CounterKey {
    /// A key with zeroed padding.
    pub const fn new(direction: Direction, family: Family, verdict: Verdict) -> Self {
        Self {
            direction,
            family,
            verdict,
            _pad: 0,
        }
    }

    /// Dense index into the COUNTERS array.
    #[inline(always)]
    pub const fn index(self) -> u32 {
        (self.direction.0 as u32 * Family::COUNT as u32 + self.family.0 as u32)
            * Verdict::COUNT as u32
            + self.verdict.0 as u32
    }

    /// Inverse of [`CounterKey::index`]; `None` past [`COUNTER_SLOTS`].
    pub const fn from_index(index: u32) -> Option<Self> {
        if index >= COUNTER_SLOTS {
            return None;
        }
        let verdict = (index % Verdict::COUNT as u32) as u8;
        let rest = index / Verdict::COUNT as u32;
        let family = (rest % Family::COUNT as u32) as u8;
        let direction = (rest / Family::COUNT as u32) as u8;
        Some(Self::new(
            Direction(direction),
            Family(family),
            Verdict(verdict),
        ))
    }
}

abi_enum! {
    /// How far the parser got with a packet. Exactly one parse counter is bumped per
    /// packet; `COUNT` is the size of the PARSE_COUNTERS map.
    ///
    /// Everything except [`ParseOutcome::TCP`] and the two fragment outcomes fails open:
    /// the packet passes, because a filter must drop only on a positive port-25 match.
    pub struct ParseOutcome(u8), dense, unknown "unknown" {
        /// Parsed down to the TCP ports.
        TCP = 0 => "tcp",
        /// Not IPv4 or IPv6 (ARP, LLDP, PPPoE discovery, ...).
        NOT_IP = 1 => "not_ip",
        /// IP, but not TCP (UDP, ICMP, ESP, ...).
        NOT_TCP = 2 => "not_tcp",
        /// A header was cut short by the end of the frame.
        TRUNCATED = 3 => "truncated",
        /// More than [`crate::classify::MAX_VLAN_TAGS`] VLAN tags.
        VLAN_TOO_DEEP = 4 => "vlan_too_deep",
        /// A PPPoE session frame carrying something other than IPv4/IPv6 (LCP, IPCP, ...).
        PPPOE_NOT_IP = 5 => "pppoe_not_ip",
        /// IP version field disagrees with the ethertype, or an IPv4 IHL below 5.
        BAD_IP_HEADER = 6 => "bad_ip_header",
        /// More than [`crate::classify::MAX_IPV6_EXT_HEADERS`] IPv6 extension headers.
        EXT_CHAIN_TOO_LONG = 7 => "ext_chain_too_long",
        /// A TCP fragment with a non-zero offset: it carries no ports.
        NON_FIRST_FRAGMENT = 8 => "non_first_fragment",
        /// A first TCP fragment too short to hold the ports.
        SHORT_FIRST_FRAGMENT = 9 => "short_first_fragment",
    }
}

/// One counter cell (one CPU's share in a per-CPU map).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Counter {
    pub packets: u64,
    /// Bytes as the hook saw them (XDP: the frame; TC: `skb->len`).
    pub bytes: u64,
}
const _: () = assert!(size_of::<Counter>() == 16);

impl Counter {
    /// Adds `other` to `self`, wrapping like the kernel's counters do.
    #[must_use]
    pub const fn plus(self, other: Self) -> Self {
        Self {
            packets: self.packets.wrapping_add(other.packets),
            bytes: self.bytes.wrapping_add(other.bytes),
        }
    }
}

/// Key of the OFFENDERS LRU: one subscriber, as an address masked to its family's
/// subscriber length (IPv4 /32; IPv6 [`Config::offender_v6_prefix`], /64 by default).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OffenderKey {
    pub family: Family,
    /// Number of leading bits of `addr` that are significant (the rest are zero).
    pub prefix_len: u8,
    pub _pad: [u8; 2],
    /// Network-order address; IPv4 uses the first 4 bytes.
    pub addr: [u8; 16],
}
const _: () = assert!(size_of::<OffenderKey>() == 20);

/// Value of the OFFENDERS LRU: the evidence an abuse desk hands to the customer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct OffenderValue {
    /// Blocked TCP/25 connection attempts (SYNs dropped, or would-dropped in monitor mode).
    pub attempts: u64,
    /// `CLOCK_MONOTONIC_COARSE` (bpf_ktime_get_coarse_ns, one tick of resolution) of the
    /// first and the latest attempt, on the CPU of this share.
    pub first_seen_ns: u64,
    pub last_seen_ns: u64,
    /// Destination of the latest attempt (network order; IPv4 in the first 4 bytes).
    pub last_dst: [u8; 16],
    /// Destination port of the latest attempt (host order).
    pub last_dport: u16,
    /// Verdict of the latest attempt (one of the [`Verdict::is_blocked`] verdicts).
    pub last_verdict: Verdict,
    pub _pad: [u8; 5],
}
const _: () = assert!(size_of::<OffenderValue>() == 48);

abi_enum! {
    /// Which hook produced an [`Event`].
    pub struct HookKind(u8), dense, unknown "unknown" {
        /// The XDP program.
        XDP = 0 => "xdp",
        /// The TC classifier.
        TC = 1 => "tc",
    }
}

/// One sampled drop (or would-drop) event in the EVENTS ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Event {
    /// `CLOCK_MONOTONIC_COARSE` nanoseconds (bpf_ktime_get_coarse_ns).
    pub ts_ns: u64,
    /// Interface the packet was seen on.
    pub ifindex: u32,
    pub direction: Direction,
    pub family: Family,
    pub verdict: Verdict,
    pub hook: HookKind,
    /// Network-order addresses; IPv4 uses the first 4 bytes.
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Host-order ports; both 0 for a fragment without visible ports.
    pub sport: u16,
    pub dport: u16,
    /// TCP flags byte (0 when not visible).
    pub tcp_flags: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<Event>() == 56);

/// Per-CPU token bucket state of the event rate limit. Tokens are kept in units of
/// 1e-9 token so that refilling needs only a multiplication (no division in the kernel).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Bucket {
    pub nano_tokens: u64,
    pub last_ns: u64,
}
const _: () = assert!(size_of::<Bucket>() == 16);

abi_enum! {
    /// What happened to one would-be event: the index into EVENT_STATS.
    pub struct EventStat(u8), dense, unknown "unknown" {
        /// Written to the ring buffer.
        EMITTED = 0 => "emitted",
        /// Suppressed by the rate limit.
        RATE_LIMITED = 1 => "rate_limited",
        /// Lost because the ring buffer was full (userspace too slow).
        RING_FULL = 2 => "ring_full",
    }
}

abi_enum! {
    /// Why reject mode dropped a SYN silently instead of answering it with an RST: the
    /// index into REJECT_FALLBACKS (`COUNT` is its size). A fallback always drops, so
    /// reject mode never blocks less than drop mode.
    pub struct RejectFallback(u8), dense, unknown "unknown" {
        /// The TC hook saw it: a classifier cannot transmit a reply (only XDP has XDP_TX).
        TC_HOOK = 0 => "tc_hook",
        /// The per-CPU RST bucket was empty (`Config::rst_rate`): the router must not
        /// become a reflector for spoofed SYNs.
        RATE_LIMITED = 1 => "rate_limited",
        /// Not a connection attempt (anything but a SYN without ACK/RST/FIN): RSTs answer
        /// SYNs only, and a fragment without visible TCP header gets none.
        NOT_SYN = 2 => "not_syn",
        /// A header layout the RST writer does not build: IPv4 options or fragments, IPv6
        /// extension headers, a TCP header cut short.
        UNSUPPORTED = 3 => "unsupported_header",
        /// Shrinking or rewriting the frame failed in the kernel.
        TX_FAILED = 4 => "tx_failed",
    }
}

#[cfg(test)]
mod tests;
