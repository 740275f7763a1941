//! The one packet classifier: parse, then the two MAAWG rules.
//!
//! It is generic over where bytes come from ([`PacketBuf`]) and where policy comes from
//! ([`Tables`]). The eBPF programs instantiate it with the XDP/TC contexts and the BPF
//! maps; the tests instantiate it with `&[u8]` and plain Rust maps, which makes this very
//! code the reference model that the kernel's behaviour is compared against.
//!
//! Rules (everything else passes, and ports 587/465 are never looked at):
//! - egress: TCP destination port 25, source in SUBSCRIBERS, source not in ALLOW → drop;
//! - inbound (MAAWG practice 6): TCP source port 25, destination in SUBSCRIBERS,
//!   destination not in ALLOW → drop.
//!
//! The egress rule is about a subscriber's own traffic, so it applies only where the
//! attachment's [`Role`] is `subscriber`: on an `upstream` attachment a packet with a
//! (spoofed) subscriber source is internet traffic, and only the inbound rule applies.
//! The role is a compile-time choice of entry point (`p25_xdp` / `p25_xdp_upstream`, ...),
//! so it costs the dataplane nothing per packet.
//!
//! TCP whose ports cannot be read because of its headers (an IPv6 extension header chain
//! longer than [`MAX_IPV6_EXT_HEADERS`], a first fragment whose header chain runs past its
//! end) is, by default, treated as TCP to port 25 under the egress rule
//! ([`UnreadableTcp::PORT25`]): a subscriber cannot hide port 25 behind headers.
//!
//! Verifier notes: every helper is `#[inline(always)]` (BPF calls take at most five
//! arguments, and inlining lets the verifier see constant offsets); loops have constant
//! trip counts; variable offsets are checked against [`MAX_OFFSET`] before every read.

use crate::{
    abi::{
        AllowValue, BlockAction, Config, CounterKey, Direction, Family, FragmentPolicy, Ipv4Key,
        Ipv6Key, Mode, ParseOutcome, SMTP_PORT, SubscriberValue, UnreadableTcp, Verdict,
    },
    packet::{MAX_OFFSET, PacketBuf, Plain, load_be16},
};

/// VLAN tags (802.1Q and 802.1ad, in any order) parsed before giving up.
pub const MAX_VLAN_TAGS: usize = 2;
/// IPv6 extension headers walked before giving up.
pub const MAX_IPV6_EXT_HEADERS: usize = 8;

const ETH_HLEN: usize = 14;
const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
/// Pre-standard QinQ outer tag, still emitted by some access gear.
const ETH_P_QINQ_LEGACY: u16 = 0x9100;
const ETH_P_PPPOE_SESSION: u16 = 0x8864;
const VLAN_HLEN: usize = 4;
const PPPOE_HLEN: usize = 8;
/// A PPPoE session header whose PPP protocol field is compressed to one byte (RFC 1661
/// 6.5, protocol-field compression): version/type, code, session id, length, protocol.
const PPPOE_PFC_HLEN: usize = 7;
/// RFC 2516: version 1, type 1.
const PPPOE_VER_TYPE: u8 = 0x11;
const PPP_IPV4: u16 = 0x0021;
const PPP_IPV6: u16 = 0x0057;

const IPV4_MIN_HLEN: usize = 20;
const IPV4_MF: u16 = 0x2000;
const IPV4_OFFSET_MASK: u16 = 0x1FFF;
const IPV6_HLEN: usize = 40;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
const IPPROTO_DSTOPTS: u8 = 60;
const IPV6_FRAG_OFFSET_MASK: u16 = 0xFFF8;
const IPV6_FRAG_MF: u16 = 0x0001;

/// Which side of the router the attachment faces; chosen per entry point.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Role {
    /// Towards subscribers: both rules, SYN limits, offender evidence and reject mode.
    #[default]
    Subscriber,
    /// Towards the internet: the inbound rule only. A packet arriving here with a
    /// subscriber source address is spoofed (or misrouted), never a subscriber's egress.
    Upstream,
}

/// Policy lookups the classifier needs. Keys are network-order address bytes.
pub trait Tables {
    /// The global configuration.
    fn config(&self) -> Config;
    /// Longest-prefix match of `addr` in the IPv4 subscriber prefixes.
    fn subscriber_v4(&self, addr: Ipv4Key) -> Option<SubscriberValue>;
    /// Longest-prefix match of `addr` in the IPv6 subscriber prefixes.
    fn subscriber_v6(&self, addr: Ipv6Key) -> Option<SubscriberValue>;
    /// Longest-prefix match of `addr` in the IPv4 allowlist.
    fn allow_v4(&self, addr: Ipv4Key) -> Option<AllowValue>;
    /// Longest-prefix match of `addr` in the IPv6 allowlist.
    fn allow_v6(&self, addr: Ipv6Key) -> Option<AllowValue>;
}

/// What the hook should do with the packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Let it through.
    Pass,
    /// Drop it.
    Drop,
    /// Drop it, and answer it with a TCP RST if the hook can (reject mode; see
    /// [`crate::track::resolve`], which turns it into `Drop` where it cannot).
    Reject,
}

/// The SYN rate limit of the allowlist entry that let an egress packet through.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SynLimit {
    /// New connections per minute per source; 0: no limit.
    pub per_minute: u32,
    /// Bucket size.
    pub burst: u32,
    /// The subscriber prefix is in monitor mode: over the limit is counted, not dropped.
    pub monitor: bool,
}

/// The full result for one packet: the action plus exactly what to count.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Outcome {
    /// What to do.
    pub action: Action,
    /// The parse counter to bump (always exactly one).
    pub parse: ParseOutcome,
    /// The verdict counter to bump, when one of the rules looked at the packet.
    pub counter: Option<CounterKey>,
    /// Offset of the IP header; meaningful only when `counter` is set. Offsets rather
    /// than addresses and ports, so that the common path copies nothing: the hook reads the
    /// flow back (with [`crate::track::fill_event`]) only for a drop or would-drop.
    pub l3: u16,
    /// Offset of the TCP header, or 0 when the ports are not visible (fragments).
    pub l4: u16,
    /// For an egress verdict [`Verdict::ALLOWLISTED`]: the entry's SYN limit, which the
    /// hook enforces with per-source state ([`crate::track::resolve`]).
    pub limit: SynLimit,
}

impl Outcome {
    #[inline(always)]
    const fn pass(parse: ParseOutcome) -> Self {
        Self {
            action: Action::Pass,
            parse,
            counter: None,
            l3: 0,
            l4: 0,
            limit: SynLimit {
                per_minute: 0,
                burst: 0,
                monitor: false,
            },
        }
    }

    /// The outcome as three integers, for [`Outcome::unpack`]. The eBPF hooks hand the
    /// classifier's outcome to their post-verdict code, a BPF global function, this way:
    /// its arguments may only be scalars (and the context), and the verifier checks it once,
    /// with every argument unknown, rather than once for each of the parse paths.
    ///
    /// Word 0: `l3` (bits 0-15), `l4` (16-31), the counter key's direction (32-39), family
    /// (40-47) and verdict (48-55), the parse outcome (56-63). Word 1: the SYN limit's
    /// `per_minute` (0-31) and `burst` (32-63). Word 2: the action (bits 0-7), whether
    /// there is a counter key (8), the limit's `monitor` (9).
    #[inline(always)]
    pub const fn pack(&self) -> [u64; 3] {
        let (key, has_key) = match self.counter {
            Some(key) => (key, 1),
            None => (CounterKey::new(Direction(0), Family(0), Verdict(0)), 0),
        };
        let action = match self.action {
            Action::Pass => 0,
            Action::Drop => 1,
            Action::Reject => 2,
        };
        [
            self.l3 as u64
                | (self.l4 as u64) << 16
                | (key.direction.0 as u64) << 32
                | (key.family.0 as u64) << 40
                | (key.verdict.0 as u64) << 48
                | (self.parse.0 as u64) << 56,
            self.limit.per_minute as u64 | (self.limit.burst as u64) << 32,
            action | has_key << 8 | (self.limit.monitor as u64) << 9,
        ]
    }

    /// The outcome [`Outcome::pack`] turned into `words`.
    #[inline(always)]
    pub const fn unpack(words: [u64; 3]) -> Self {
        let [outcome, limit, flags] = words;
        // Only `pack` writes these words, so the action byte is 0, 1 or 2.
        let action = match flags as u8 {
            1 => Action::Drop,
            2 => Action::Reject,
            _ => Action::Pass,
        };
        let counter = if flags & 1 << 8 != 0 {
            Some(CounterKey::new(
                Direction((outcome >> 32) as u8),
                Family((outcome >> 40) as u8),
                Verdict((outcome >> 48) as u8),
            ))
        } else {
            None
        };
        Self {
            action,
            parse: ParseOutcome((outcome >> 56) as u8),
            counter,
            l3: outcome as u16,
            l4: (outcome >> 16) as u16,
            limit: SynLimit {
                per_minute: limit as u32,
                burst: (limit >> 32) as u32,
                monitor: flags & 1 << 9 != 0,
            },
        }
    }
}

/// An address family's lookups, so the rules are written once for IPv4 and IPv6.
trait Address: Copy {
    const FAMILY: Family;
    fn subscriber<T: Tables>(self, tables: &T) -> Option<SubscriberValue>;
    fn allowed<T: Tables>(self, tables: &T) -> Option<AllowValue>;
}

impl Address for Ipv4Key {
    const FAMILY: Family = Family::IPV4;
    #[inline(always)]
    fn subscriber<T: Tables>(self, tables: &T) -> Option<SubscriberValue> {
        tables.subscriber_v4(self)
    }
    #[inline(always)]
    fn allowed<T: Tables>(self, tables: &T) -> Option<AllowValue> {
        tables.allow_v4(self)
    }
}

impl Address for Ipv6Key {
    const FAMILY: Family = Family::IPV6;
    #[inline(always)]
    fn subscriber<T: Tables>(self, tables: &T) -> Option<SubscriberValue> {
        tables.subscriber_v6(self)
    }
    #[inline(always)]
    fn allowed<T: Tables>(self, tables: &T) -> Option<AllowValue> {
        tables.allow_v6(self)
    }
}

/// Classifies one Ethernet frame seen on an attachment of `role`.
#[inline(always)]
pub fn classify<P: PacketBuf, T: Tables>(pkt: &P, tables: &T, role: Role) -> Outcome {
    let ctx = Ctx { tables, role };
    match parse_l2(pkt) {
        Ok((ETH_P_IPV4, offset)) => classify_ipv4(pkt, offset, &ctx),
        Ok((ETH_P_IPV6, offset)) => classify_ipv6(pkt, offset, &ctx),
        Ok(_) => Outcome::pass(ParseOutcome::NOT_IP),
        Err(outcome) => Outcome::pass(outcome),
    }
}

/// The tables and the attachment's role, passed down together.
struct Ctx<'a, T> {
    tables: &'a T,
    role: Role,
}

#[inline(always)]
const fn is_vlan(ethertype: u16) -> bool {
    ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD || ethertype == ETH_P_QINQ_LEGACY
}

/// Ethernet, up to [`MAX_VLAN_TAGS`] tags, then an optional PPPoE session header.
/// Returns the ethertype of the IP header (PPP protocols are mapped to ethertypes) and
/// its offset.
#[inline(always)]
fn parse_l2<P: PacketBuf>(pkt: &P) -> Result<(u16, usize), ParseOutcome> {
    let mut ethertype = load_be16(pkt, ETH_HLEN - 2).ok_or(ParseOutcome::TRUNCATED)?;
    let mut offset = ETH_HLEN;
    for _ in 0..MAX_VLAN_TAGS {
        if !is_vlan(ethertype) {
            break;
        }
        // A tag is TCI (2 bytes) then the encapsulated ethertype.
        ethertype = load_be16(pkt, offset + 2).ok_or(ParseOutcome::TRUNCATED)?;
        offset += VLAN_HLEN;
    }
    if is_vlan(ethertype) {
        return Err(ParseOutcome::VLAN_TOO_DEEP);
    }
    if ethertype == ETH_P_PPPOE_SESSION {
        let [
            ver_type,
            code,
            _sid_hi,
            _sid_lo,
            _len_hi,
            _len_lo,
            proto_hi,
            proto_lo,
        ] = pkt
            .load::<[u8; PPPOE_HLEN]>(offset)
            .ok_or(ParseOutcome::TRUNCATED)?;
        // Session data frames have code 0; anything else is not carrying our traffic.
        if ver_type != PPPOE_VER_TYPE || code != 0 {
            return Err(ParseOutcome::PPPOE_NOT_IP);
        }
        // A PPP protocol's first byte is even and its last byte odd (RFC 1661 2): an odd
        // first byte is a protocol compressed to that one byte (protocol-field
        // compression), and what we loaded as its second byte is already the IP header.
        let protocol = if proto_hi & 1 == 1 {
            offset += PPPOE_PFC_HLEN;
            u16::from(proto_hi)
        } else {
            offset += PPPOE_HLEN;
            u16::from_be_bytes([proto_hi, proto_lo])
        };
        ethertype = match protocol {
            PPP_IPV4 => ETH_P_IPV4,
            PPP_IPV6 => ETH_P_IPV6,
            _ => return Err(ParseOutcome::PPPOE_NOT_IP),
        };
    }
    Ok((ethertype, offset))
}

#[inline(always)]
fn classify_ipv4<P: PacketBuf, T: Tables>(pkt: &P, offset: usize, ctx: &Ctx<'_, T>) -> Outcome {
    let Some(header) = pkt.load::<[u8; IPV4_MIN_HLEN]>(offset) else {
        return Outcome::pass(ParseOutcome::TRUNCATED);
    };
    let [
        version_ihl,
        _tos,
        _len_hi,
        _len_lo,
        _id_hi,
        _id_lo,
        frag_hi,
        frag_lo,
        _ttl,
        protocol,
        _csum_hi,
        _csum_lo,
        s0,
        s1,
        s2,
        s3,
        d0,
        d1,
        d2,
        d3,
    ] = header;
    let ihl = usize::from(version_ihl & 0x0F);
    if version_ihl >> 4 != 4 || ihl < 5 {
        return Outcome::pass(ParseOutcome::BAD_IP_HEADER);
    }
    if protocol != IPPROTO_TCP {
        return Outcome::pass(ParseOutcome::NOT_TCP);
    }
    let src = Ipv4Key([s0, s1, s2, s3]);
    let dst = Ipv4Key([d0, d1, d2, d3]);
    let frag = u16::from_be_bytes([frag_hi, frag_lo]);
    if frag & IPV4_OFFSET_MASK != 0 {
        return fragment(ParseOutcome::NON_FIRST_FRAGMENT, offset, src, dst, ctx);
    }
    // IHL counts 32-bit words and is at most 15, so options never push this past 60.
    let l4 = offset + ihl * 4;
    classify_tcp(pkt, offset, l4, frag & IPV4_MF != 0, src, dst, ctx)
}

#[inline(always)]
const fn is_ipv6_ext(next: u8) -> bool {
    matches!(
        next,
        IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_FRAGMENT | IPPROTO_AH | IPPROTO_DSTOPTS
    )
}

/// The fixed IPv6 header (RFC 8200 3): version to hop limit, then the addresses.
#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv6Header {
    fixed: [u8; 8],
    src: [u8; 16],
    dst: [u8; 16],
}
const _: () = assert!(size_of::<Ipv6Header>() == IPV6_HLEN);
// SAFETY: byte arrays only: no padding, alignment 1, every pattern valid.
unsafe impl Plain for Ipv6Header {}

#[inline(always)]
fn classify_ipv6<P: PacketBuf, T: Tables>(pkt: &P, offset: usize, ctx: &Ctx<'_, T>) -> Outcome {
    // One load and one bounds check for the whole fixed header, its addresses kept as
    // arrays: with three loads (fixed part, source, destination) LLVM hoisted the byte
    // reads of one above the bounds check of another, and the verifier, which cannot tell
    // that the failed check makes the later one fail too, walked a path that spills a
    // register never written (`R5 !read_ok`).
    let Some(Ipv6Header { fixed, src, dst }) = pkt.load::<Ipv6Header>(offset) else {
        return Outcome::pass(ParseOutcome::TRUNCATED);
    };
    let [
        version_tc,
        _tc_flow,
        _flow1,
        _flow2,
        _len_hi,
        _len_lo,
        mut next,
        _hop_limit,
    ] = fixed;
    if version_tc >> 4 != 6 {
        return Outcome::pass(ParseOutcome::BAD_IP_HEADER);
    }
    let (src, dst) = (Ipv6Key(src), Ipv6Key(dst));

    let mut l4 = offset + IPV6_HLEN;
    let mut more_fragments = false;
    let mut non_first_fragment = false;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        if l4 > MAX_OFFSET {
            return cut_short(more_fragments, offset, src, dst, ctx);
        }
        match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let Some([next_header, len]) = pkt.load::<[u8; 2]>(l4) else {
                    return cut_short(more_fragments, offset, src, dst, ctx);
                };
                next = next_header;
                // RFC 8200: length in 8-octet units, not counting the first 8.
                l4 += (usize::from(len) + 1) * 8;
            }
            IPPROTO_AH => {
                let Some([next_header, len]) = pkt.load::<[u8; 2]>(l4) else {
                    return cut_short(more_fragments, offset, src, dst, ctx);
                };
                next = next_header;
                // RFC 4302: length in 4-octet units, minus 2.
                l4 += (usize::from(len) + 2) * 4;
            }
            IPPROTO_FRAGMENT => {
                let Some([next_header, _reserved, off_hi, off_lo]) = pkt.load::<[u8; 4]>(l4) else {
                    return cut_short(more_fragments, offset, src, dst, ctx);
                };
                next = next_header;
                l4 += 8;
                let frag = u16::from_be_bytes([off_hi, off_lo]);
                more_fragments = frag & IPV6_FRAG_MF != 0;
                if frag & IPV6_FRAG_OFFSET_MASK != 0 {
                    non_first_fragment = true;
                    break;
                }
            }
            _ => break,
        }
    }

    if non_first_fragment {
        // The fragment header names the first header of the fragmentable part: TCP, or an
        // extension header that may precede it. Either way the ports are out of sight.
        return if next == IPPROTO_TCP || is_ipv6_ext(next) {
            fragment(ParseOutcome::NON_FIRST_FRAGMENT, offset, src, dst, ctx)
        } else {
            Outcome::pass(ParseOutcome::NOT_TCP)
        };
    }
    if next == IPPROTO_TCP {
        classify_tcp(pkt, offset, l4, more_fragments, src, dst, ctx)
    } else if is_ipv6_ext(next) {
        // Whatever lies behind the chain may be TCP to port 25.
        unreadable(ParseOutcome::EXT_CHAIN_TOO_LONG, offset, src, dst, ctx)
    } else {
        Outcome::pass(ParseOutcome::NOT_TCP)
    }
}

/// Reads the ports at `l4` and applies the rules.
#[inline(always)]
fn classify_tcp<P: PacketBuf, T: Tables, A: Address>(
    pkt: &P,
    l3: usize,
    l4: usize,
    more_fragments: bool,
    src: A,
    dst: A,
    ctx: &Ctx<'_, T>,
) -> Outcome {
    let ports = if l4 > MAX_OFFSET {
        None
    } else {
        pkt.load::<[u8; 4]>(l4)
    };
    match ports {
        Some([sport_hi, sport_lo, dport_hi, dport_lo]) => {
            let sport = u16::from_be_bytes([sport_hi, sport_lo]);
            let dport = u16::from_be_bytes([dport_hi, dport_lo]);
            let (action, counter, limit) =
                decide(ctx, src, dst, dport == SMTP_PORT, sport == SMTP_PORT);
            Outcome {
                action,
                parse: ParseOutcome::TCP,
                counter,
                // Both are below MAX_OFFSET here, so they fit.
                l3: l3 as u16,
                l4: l4 as u16,
                limit,
            }
        }
        None => cut_short(more_fragments, l3, src, dst, ctx),
    }
}

/// The frame ends before the ports. A first fragment must hold the whole header chain
/// (RFC 7112), so one cut short is a sender hiding its ports: a fragment, and unreadable
/// TCP. Anything else is a truncated packet, which no receiver accepts: it passes.
#[inline(always)]
fn cut_short<T: Tables, A: Address>(
    more_fragments: bool,
    l3: usize,
    src: A,
    dst: A,
    ctx: &Ctx<'_, T>,
) -> Outcome {
    if more_fragments {
        fragment(ParseOutcome::SHORT_FIRST_FRAGMENT, l3, src, dst, ctx)
    } else {
        Outcome::pass(ParseOutcome::TRUNCATED)
    }
}

/// A TCP fragment without visible ports: under `fragments: drop` (fail closed) a match of
/// both rules, so that only allowlisted or non-subscriber traffic gets through. Otherwise a
/// non-first fragment passes, and a first fragment cut short is unreadable TCP.
#[inline(always)]
fn fragment<T: Tables, A: Address>(
    parse: ParseOutcome,
    l3: usize,
    src: A,
    dst: A,
    ctx: &Ctx<'_, T>,
) -> Outcome {
    if ctx.tables.config().fragments != FragmentPolicy::DROP {
        return if parse == ParseOutcome::SHORT_FIRST_FRAGMENT {
            unreadable(parse, l3, src, dst, ctx)
        } else {
            Outcome::pass(parse)
        };
    }
    matched(parse, l3, src, dst, ctx, true)
}

/// TCP (or possibly TCP) whose ports cannot be read: under
/// [`UnreadableTcp::PORT25`] the egress rule applies as for TCP to port 25 (its parse
/// outcome says why); under [`UnreadableTcp::PASS`] it passes.
#[inline(always)]
fn unreadable<T: Tables, A: Address>(
    parse: ParseOutcome,
    l3: usize,
    src: A,
    dst: A,
    ctx: &Ctx<'_, T>,
) -> Outcome {
    if ctx.tables.config().unreadable_tcp == UnreadableTcp::PASS {
        return Outcome::pass(parse);
    }
    matched(parse, l3, src, dst, ctx, false)
}

/// Ports out of sight, treated as destination port 25 (and as source port 25 too when
/// `inbound`).
#[inline(always)]
fn matched<T: Tables, A: Address>(
    parse: ParseOutcome,
    l3: usize,
    src: A,
    dst: A,
    ctx: &Ctx<'_, T>,
    inbound: bool,
) -> Outcome {
    let (action, counter, limit) = decide(ctx, src, dst, true, inbound);
    if counter.is_none() {
        return Outcome::pass(parse);
    }
    Outcome {
        action,
        parse,
        counter,
        l3: l3 as u16,
        l4: 0,
        limit,
    }
}

/// Applies the egress rule (if `egress` and the attachment faces subscribers) and the
/// inbound rule (if `inbound`). One verdict is counted: the first rule that matched, else
/// the first rule evaluated. Only the egress rule rejects and carries a SYN limit: both
/// are about a subscriber's own connection attempts.
#[inline(always)]
fn decide<T: Tables, A: Address>(
    ctx: &Ctx<'_, T>,
    src: A,
    dst: A,
    egress: bool,
    inbound: bool,
) -> (Action, Option<CounterKey>, SynLimit) {
    let tables = ctx.tables;
    let mut first = None;
    let mut limit = SynLimit::default();
    if egress && ctx.role == Role::Subscriber {
        let (verdict, block, egress_limit) = rule(tables, src);
        let key = CounterKey::new(Direction::EGRESS, A::FAMILY, verdict);
        if verdict.is_match() {
            return (action_of(verdict, block), Some(key), limit);
        }
        first = Some(key);
        limit = egress_limit;
    }
    if inbound {
        let (verdict, _, _) = rule(tables, dst);
        let key = CounterKey::new(Direction::INBOUND, A::FAMILY, verdict);
        if verdict.is_match() || first.is_none() {
            return (
                action_of(verdict, BlockAction::DROP),
                Some(key),
                SynLimit::default(),
            );
        }
    }
    (Action::Pass, first, limit)
}

/// One rule, given that its port matched: `subscriber` is the address that must be in
/// subscriber space (the source for egress, the destination for inbound). Returns the
/// verdict, the prefix's block action and, when allowlisted, the entry's SYN limit.
#[inline(always)]
fn rule<T: Tables, A: Address>(tables: &T, subscriber: A) -> (Verdict, BlockAction, SynLimit) {
    let Some(prefix) = subscriber.subscriber(tables) else {
        return (Verdict::PASSED, BlockAction::DROP, SynLimit::default());
    };
    let config = tables.config();
    let monitor = prefix.mode.effective(config.mode) == Mode::MONITOR;
    if let Some(allow) = subscriber.allowed(tables) {
        let limit = SynLimit {
            per_minute: allow.syn_per_minute,
            burst: allow.syn_burst,
            monitor,
        };
        return (Verdict::ALLOWLISTED, BlockAction::DROP, limit);
    }
    let block = prefix.action.effective(config.action);
    if monitor {
        (Verdict::WOULD_DROP, block, SynLimit::default())
    } else {
        (Verdict::DROPPED, block, SynLimit::default())
    }
}

#[inline(always)]
fn action_of(verdict: Verdict, block: BlockAction) -> Action {
    if verdict != Verdict::DROPPED {
        Action::Pass
    } else if block == BlockAction::REJECT {
        Action::Reject
    } else {
        Action::Drop
    }
}

/// When the IP header at `l3` is carried in PPPoE: the offset of the session header's
/// length field and the size of the PPP protocol field (2, or 1 under protocol-field
/// compression), which the length counts.
///
/// Walks the layer-2 headers again from the front rather than reading backwards from
/// `l3`: offsets that only grow from constants keep the verifier's packet ranges simple
/// (a read at `l3 - n` is one LLVM may turn into a negative packet offset, which the
/// verifier refuses).
#[inline(always)]
pub fn pppoe_length_offset<P: PacketBuf>(pkt: &P, l3: usize) -> Option<(usize, usize)> {
    let mut at = ETH_HLEN - 2;
    for _ in 0..=MAX_VLAN_TAGS {
        let ethertype = load_be16(pkt, at)?;
        if ethertype == ETH_P_PPPOE_SESSION {
            let session = at + 2;
            let [_, _, _, _, _, _, proto_hi, _] = pkt.load::<[u8; PPPOE_HLEN]>(session)?;
            let (hlen, protocol_len) = if proto_hi & 1 == 1 {
                (PPPOE_PFC_HLEN, 1)
            } else {
                (PPPOE_HLEN, 2)
            };
            return (session + hlen == l3).then_some((session + 4, protocol_len));
        }
        if !is_vlan(ethertype) {
            return None;
        }
        at += VLAN_HLEN;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every field survives `pack` and `unpack`, at its extremes and with the others set,
    /// so that one field bleeding into another's bits shows.
    #[test]
    fn outcome_packs_and_unpacks() {
        let keys = [
            None,
            Some(CounterKey::new(
                Direction::EGRESS,
                Family::IPV4,
                Verdict::DROPPED,
            )),
            Some(CounterKey::new(
                Direction::INBOUND,
                Family::IPV6,
                Verdict::WOULD_RATE_LIMIT,
            )),
            Some(CounterKey::new(
                Direction(u8::MAX),
                Family(u8::MAX),
                Verdict(u8::MAX),
            )),
        ];
        let mut checked = 0;
        for action in [Action::Pass, Action::Drop, Action::Reject] {
            for counter in keys {
                for (l3, l4) in [
                    (0, 0),
                    (14, 34),
                    (MAX_OFFSET as u16, 0),
                    (u16::MAX, u16::MAX),
                ] {
                    for (per_minute, burst) in [(0, 0), (1, u32::MAX), (u32::MAX, 7)] {
                        for monitor in [false, true] {
                            for parse in [ParseOutcome::TCP, ParseOutcome(u8::MAX)] {
                                let outcome = Outcome {
                                    action,
                                    parse,
                                    counter,
                                    l3,
                                    l4,
                                    limit: SynLimit {
                                        per_minute,
                                        burst,
                                        monitor,
                                    },
                                };
                                assert_eq!(Outcome::unpack(outcome.pack()), outcome);
                                checked += 1;
                            }
                        }
                    }
                }
            }
        }
        assert_eq!(checked, 3 * 4 * 4 * 3 * 2 * 2);
    }
}
