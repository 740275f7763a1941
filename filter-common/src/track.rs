//! What the hooks do after the classifier's verdict: the stateful part of the decision
//! (per-source SYN limits of allowlist entries, the RST budget of reject mode; see
//! [`resolve`]), the offender a packet is evidence against, and whether the event rate
//! limit lets a drop event through.
//!
//! Shared with the host so that the reference model and the unit tests run exactly the code
//! the dataplane runs.

use crate::{
    abi::{
        Bucket, Config, DEFAULT_OFFENDER_V6_PREFIX, Direction, Event, Family, MAX_EVENT_RATE,
        MAX_RST_RATE, MAX_SYN_PER_MINUTE, OffenderKey, OffenderValue, RejectFallback, Verdict,
    },
    classify::{Action, Outcome, SynLimit},
    packet::{MAX_OFFSET, PacketBuf},
};

/// Nano-tokens per token in a [`Bucket`].
const NANO: u64 = 1_000_000_000;
/// Idle time after which a bucket is simply full. Below it, `elapsed * rate` stays under
/// `u64::MAX` for every rate the ABI allows (at most 1e6 per second or per minute).
/// About 2.8 hours: only a burst larger than that much refill is affected, and then only
/// in the operator's favour (a long-idle source gets its whole burst back).
const MAX_REFILL_NS: u64 = 10_000 * NANO;

/// Units per token of a per-minute bucket: elapsed nanoseconds times a per-minute rate.
const PER_MINUTE_UNIT: u64 = 60 * NANO;

/// TCP flag bits (RFC 9293).
pub const TCP_SYN: u8 = 0x02;
/// TCP flag bits (RFC 9293).
pub const TCP_ACK: u8 = 0x10;
/// TCP flag bits (RFC 9293).
pub const TCP_RST: u8 = 0x04;
/// TCP flag bits (RFC 9293).
pub const TCP_FIN: u8 = 0x01;
/// Offset of the flags byte in the TCP header.
const TCP_FLAGS_OFFSET: usize = 13;

/// Whether an outcome is worth recording: blocked, or would have been (after
/// [`resolve`]: dropped, rejected, rate-limited, or the monitor-mode variants).
#[inline(always)]
pub fn is_event(outcome: &Outcome) -> bool {
    matches!(outcome.counter, Some(key) if key.verdict.is_blocked())
}

/// Whether the classifier's `outcome` is already final: a pass that [`resolve`] leaves as
/// it is (no reject to answer, no SYN limit to take a token from) and that is not an
/// event. The eBPF hooks count such an outcome at once, without calling their
/// post-verdict function: allowlisted sources without a SYN limit and sources outside
/// subscriber space, the common port-25 classes, pay no call.
#[inline(always)]
pub fn is_final(outcome: &Outcome) -> bool {
    let Some(key) = outcome.counter else {
        return outcome.action == Action::Pass;
    };
    let syn_limited = key.verdict == Verdict::ALLOWLISTED
        && key.direction == Direction::EGRESS
        && outcome.limit.per_minute != 0;
    outcome.action == Action::Pass && !syn_limited && !key.verdict.is_blocked()
}

/// The state [`resolve`] needs: the kernel keeps it in maps with `bpf_ktime_get_coarse_ns`,
/// the reference model in plain Rust with a fixed clock.
pub trait Budget {
    /// Takes a token from the SYN bucket of `source` (a new source starts with a full
    /// bucket); false when it is empty.
    fn syn_token(&mut self, source: &OffenderKey, limit: &SynLimit) -> bool;
    /// Takes a token from the RST budget; false when it is empty.
    fn rst_token(&mut self) -> bool;
}

/// The flags byte of the TCP header at `l4` (two bytes are loaded, see [`fill_event`]).
#[inline(always)]
fn tcp_flags<P: PacketBuf>(pkt: &P, l4: usize) -> Option<u8> {
    if l4 == 0 || l4 + TCP_FLAGS_OFFSET > MAX_OFFSET {
        return None;
    }
    pkt.load::<[u8; 2]>(l4 + TCP_FLAGS_OFFSET - 1)
        .map(|[_offset, flags]| flags)
}

/// Whether `flags` open a connection: SYN, without ACK, RST or FIN.
#[inline(always)]
const fn is_connection_attempt(flags: u8) -> bool {
    flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_SYN
}

/// The stateful part of the verdict, shared by both hooks and the model:
///
/// - an egress SYN let through by an allowlist entry with a SYN limit takes a token from
///   its source's bucket; without one it becomes [`Verdict::RATE_LIMITED`] (dropped) or,
///   in monitor mode, [`Verdict::WOULD_RATE_LIMIT`] (passed);
/// - an [`Action::Reject`] stays a reject (verdict [`Verdict::REJECTED`]) only for a SYN
///   the RST writer can answer, on a hook that can transmit (`can_tx`: XDP), with a token
///   from the RST budget; otherwise it becomes a drop (verdict stays
///   [`Verdict::DROPPED`]) and the reason is returned, for REJECT_FALLBACKS.
///
/// The budget is asked last, so that a token is spent only on an RST that is sent.
#[inline(always)]
pub fn resolve<P: PacketBuf, B: Budget>(
    pkt: &P,
    outcome: &mut Outcome,
    config: &Config,
    can_tx: bool,
    budget: &mut B,
) -> Option<RejectFallback> {
    let key = outcome.counter.as_mut()?;
    if outcome.action == Action::Reject {
        let fallback = match crate::reject::check(pkt, outcome.l3.into(), outcome.l4.into()) {
            Err(reason) => Some(reason),
            Ok(()) if !can_tx => Some(RejectFallback::TC_HOOK),
            Ok(()) if !budget.rst_token() => Some(RejectFallback::RATE_LIMITED),
            Ok(()) => None,
        };
        if fallback.is_some() {
            outcome.action = Action::Drop;
        } else {
            key.verdict = Verdict::REJECTED;
        }
        return fallback;
    }
    if key.verdict == Verdict::ALLOWLISTED
        && key.direction == Direction::EGRESS
        && outcome.limit.per_minute != 0
        && tcp_flags(pkt, outcome.l4.into()).is_some_and(is_connection_attempt)
        && let Some(src) = source(pkt, key.family, outcome.l3.into())
    {
        let source = subscriber_key(key.family, src, config);
        if !budget.syn_token(&source, &outcome.limit) {
            if outcome.limit.monitor {
                key.verdict = Verdict::WOULD_RATE_LIMIT;
            } else {
                key.verdict = Verdict::RATE_LIMITED;
                outcome.action = Action::Drop;
            }
        }
    }
    None
}

/// The source address of the IP header at `l3` (IPv4 in the first 4 bytes).
#[inline(always)]
fn source<P: PacketBuf>(pkt: &P, family: Family, l3: usize) -> Option<[u8; 16]> {
    if family == Family::IPV4 {
        let [a, b, c, d] = pkt.load::<[u8; 4]>(l3 + 12)?;
        Some([a, b, c, d, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    } else {
        pkt.load::<[u8; 16]>(l3 + 8)
    }
}

/// Fills the packet part of `event` (rule, addresses, ports, TCP flags) for an outcome a
/// rule matched, reading them back from the packet at the offsets the classifier found.
/// Leaves `ts_ns`, `ifindex` and `hook` to the caller. Returns false (and leaves the event
/// unusable) when the outcome has no counter.
///
/// The eBPF hooks fill a per-CPU scratch `Event` in place, which keeps 56 bytes off the
/// 512-byte BPF stack. The addresses and the ports-flags-padding tail are written as
/// 8-byte words ([`write_word`]): assigned as byte arrays (alignment 1), their zeroing
/// and copying became calls to a byte-at-a-time `memset` and `memmove` in the BPF object,
/// about a tenth of an IPv4 drop's time (perf); and a whole-struct assignment builds the
/// struct on the stack first, which `p25_tc_verdict`'s frame has no room for.
#[inline(always)]
pub fn fill_event<P: PacketBuf>(pkt: &P, outcome: &Outcome, event: &mut Event) -> bool {
    let Some(key) = outcome.counter else {
        return false;
    };
    event.direction = key.direction;
    event.family = key.family;
    event.verdict = key.verdict;
    let l3 = usize::from(outcome.l3);
    let target = core::ptr::from_mut(event);
    if key.family == Family::IPV4 {
        let (s, d) = match (pkt.load::<[u8; 4]>(l3 + 12), pkt.load::<[u8; 4]>(l3 + 16)) {
            (Some([s0, s1, s2, s3]), Some([d0, d1, d2, d3])) => (
                u64::from_ne_bytes([s0, s1, s2, s3, 0, 0, 0, 0]),
                u64::from_ne_bytes([d0, d1, d2, d3, 0, 0, 0, 0]),
            ),
            _ => (0, 0),
        };
        // SAFETY: checked word offsets of Event.
        unsafe {
            write_word(target, EVENT_SRC, s);
            write_word(target, EVENT_SRC + 8, 0);
            write_word(target, EVENT_DST, d);
            write_word(target, EVENT_DST + 8, 0);
        }
    } else {
        // One address at a time, each written as soon as it is loaded: loading both first
        // (as the IPv4 branch does) spilled the 32 bytes out of the registers, and on TC,
        // where the loads go through stack buffers, `p25_tc_verdict`'s frame grew past
        // what the verifier allows for the hook's call chain. (Both loads lie inside the
        // IPv6 header the classifier has already read, so neither fails in practice.)
        let [s0, s1] = pkt.load::<[u8; 16]>(l3 + 8).map_or([0; 2], words);
        // SAFETY: checked word offsets of Event.
        unsafe {
            write_word(target, EVENT_SRC, s0);
            write_word(target, EVENT_SRC + 8, s1);
        }
        let [d0, d1] = pkt.load::<[u8; 16]>(l3 + 24).map_or([0; 2], words);
        // SAFETY: checked word offsets of Event.
        unsafe {
            write_word(target, EVENT_DST, d0);
            write_word(target, EVENT_DST + 8, d1);
        }
    }
    let l4 = usize::from(outcome.l4);
    let (mut sport, mut dport, mut tcp_flags) = ([0; 2], [0; 2], 0);
    if l4 != 0 {
        if let Some([a, b, c, d]) = pkt.load::<[u8; 4]>(l4) {
            // Host order in the event, as in the struct's definition.
            sport = u16::from_be_bytes([a, b]).to_ne_bytes();
            dport = u16::from_be_bytes([c, d]).to_ne_bytes();
        }
        // Optional: a header cut after the ports still had its verdict. Two bytes (data
        // offset, flags) rather than one: for a 1-byte load LLVM rewrites `p + 1 > end` as
        // `p >= end`, which the verifier cannot turn into a packet range.
        if l4 + TCP_FLAGS_OFFSET <= MAX_OFFSET
            && let Some([_offset, flags]) = pkt.load::<[u8; 2]>(l4 + TCP_FLAGS_OFFSET - 1)
        {
            tcp_flags = flags;
        }
    }
    let [p0, p1] = sport;
    let [q0, q1] = dport;
    // SAFETY: a checked word offset of Event.
    unsafe {
        // sport, dport, tcp_flags and the three padding bytes (zero).
        write_word(
            target,
            EVENT_TAIL,
            u64::from_ne_bytes([p0, p1, q0, q1, tcp_flags, 0, 0, 0]),
        );
    }
    true
}

/// A 16-byte address as its two big-endian halves (the first 8 bytes in the first): the
/// form the 64-bit prefix masks work on.
#[inline(always)]
pub fn be_halves(addr: [u8; 16]) -> [u64; 2] {
    let [hi, lo] = words(addr);
    [u64::from_be(hi), u64::from_be(lo)]
}

/// A 16-byte address as two words with the same bytes in memory.
#[inline(always)]
fn words(addr: [u8; 16]) -> [u64; 2] {
    let [
        a0,
        a1,
        a2,
        a3,
        a4,
        a5,
        a6,
        a7,
        b0,
        b1,
        b2,
        b3,
        b4,
        b5,
        b6,
        b7,
    ] = addr;
    [
        u64::from_ne_bytes([a0, a1, a2, a3, a4, a5, a6, a7]),
        u64::from_ne_bytes([b0, b1, b2, b3, b4, b5, b6, b7]),
    ]
}

// Byte offsets of the 8-byte words that are read and written whole (see [`fill_event`]),
// and the layout they rely on: each lies on an 8-byte boundary of a struct aligned to 8,
// inside it, and covers exactly the fields named (integers and padding arrays, for which
// any bytes are valid).
const EVENT_SRC: usize = 16;
const EVENT_DST: usize = 32;
/// `sport`, `dport`, `tcp_flags`, `_pad`.
const EVENT_TAIL: usize = 48;
const OFFENDER_ATTEMPTS: usize = 0;
const OFFENDER_FIRST_SEEN: usize = 8;
const OFFENDER_LAST_SEEN: usize = 16;
const OFFENDER_LAST_DST: usize = 24;
/// `last_dport`, `last_verdict`, `_pad`.
const OFFENDER_TAIL: usize = 40;
const _: () = {
    use core::mem::offset_of;
    assert!(align_of::<Event>() == 8 && size_of::<Event>() == 56);
    assert!(offset_of!(Event, src) == EVENT_SRC && offset_of!(Event, dst) == EVENT_DST);
    assert!(offset_of!(Event, sport) == EVENT_TAIL && offset_of!(Event, dport) == EVENT_TAIL + 2);
    assert!(offset_of!(Event, tcp_flags) == EVENT_TAIL + 4);
    assert!(offset_of!(Event, _pad) == EVENT_TAIL + 5);
    assert!(align_of::<OffenderValue>() == 8 && size_of::<OffenderValue>() == 48);
    assert!(offset_of!(OffenderValue, attempts) == OFFENDER_ATTEMPTS);
    assert!(offset_of!(OffenderValue, first_seen_ns) == OFFENDER_FIRST_SEEN);
    assert!(offset_of!(OffenderValue, last_seen_ns) == OFFENDER_LAST_SEEN);
    assert!(offset_of!(OffenderValue, last_dst) == OFFENDER_LAST_DST);
    assert!(offset_of!(OffenderValue, last_dport) == OFFENDER_TAIL);
    assert!(offset_of!(OffenderValue, last_verdict) == OFFENDER_TAIL + 2);
    assert!(offset_of!(OffenderValue, _pad) == OFFENDER_TAIL + 3);
};

/// Writes the 8-byte word at byte `offset` of `target`, with one aligned store.
///
/// Volatile, so that LLVM keeps it one store: it merges runs of plain stores of zero into
/// a `memset` call, which is what these words are here to avoid (see [`fill_event`]).
///
/// # Safety
///
/// `offset` must be one of the word offsets of `T` checked above.
#[inline(always)]
unsafe fn write_word<T>(target: *mut T, offset: usize, word: u64) {
    // SAFETY: the caller passes a checked offset: aligned, in bounds, plain bytes.
    unsafe {
        target
            .cast::<u8>()
            .add(offset)
            .cast::<u64>()
            .write_volatile(word);
    }
}

/// Reads the 8-byte word at byte `offset` of `source`, with one aligned load.
///
/// # Safety
///
/// As for [`write_word`].
#[inline(always)]
unsafe fn read_word<T>(source: &T, offset: usize) -> u64 {
    // SAFETY: as for `write_word`; the bytes are initialised integers.
    unsafe {
        core::ptr::from_ref(source)
            .cast::<u8>()
            .add(offset)
            .cast::<u64>()
            .read()
    }
}

/// The offender record of a subscriber's first attempt, `event`.
///
/// Written word by word into an uninitialised value for the reason given at
/// [`fill_event`]: a struct literal zeroes the padding with a call to `memset`.
#[inline(always)]
pub fn first_attempt(event: &Event) -> OffenderValue {
    let mut value = core::mem::MaybeUninit::<OffenderValue>::uninit();
    let target = value.as_mut_ptr();
    // SAFETY: checked offsets of OffenderValue and Event; all six words of the value are
    // written, so it is initialised.
    unsafe {
        write_word(target, OFFENDER_ATTEMPTS, 1);
        write_word(target, OFFENDER_FIRST_SEEN, event.ts_ns);
        write_word(target, OFFENDER_LAST_SEEN, event.ts_ns);
        write_latest(target, event);
        value.assume_init()
    }
}

/// Adds the attempt in `event` to `value`, in place (a CPU's share of the evidence, whose
/// first attempt may have been on another CPU: then `first_seen_ns` is still 0 here).
#[inline(always)]
pub fn note_attempt(value: &mut OffenderValue, event: &Event) {
    value.attempts = value.attempts.wrapping_add(1);
    if value.first_seen_ns == 0 {
        value.first_seen_ns = event.ts_ns;
    }
    value.last_seen_ns = event.ts_ns;
    // SAFETY: a whole, live OffenderValue.
    unsafe { write_latest(core::ptr::from_mut(value), event) };
}

/// Writes the latest attempt's part of an offender record from `event`: `last_dst`, then
/// `last_dport`, `last_verdict` and the zero padding as one word.
///
/// # Safety
///
/// `target` must point to an `OffenderValue` this code may write.
#[inline(always)]
unsafe fn write_latest(target: *mut OffenderValue, event: &Event) {
    let [p0, p1] = event.dport.to_ne_bytes();
    let tail = u64::from_ne_bytes([p0, p1, event.verdict.0, 0, 0, 0, 0, 0]);
    // SAFETY: checked word offsets of OffenderValue and Event.
    unsafe {
        write_word(target, OFFENDER_LAST_DST, read_word(event, EVENT_DST));
        write_word(
            target,
            OFFENDER_LAST_DST + 8,
            read_word(event, EVENT_DST + 8),
        );
        write_word(target, OFFENDER_TAIL, tail);
    }
}

/// The offender an event is evidence against: a subscriber's blocked (or, in monitor
/// mode, would-be-blocked) attempt to open a TCP connection to port 25. Only SYNs without
/// ACK count, so that retransmitted data or RSTs of one connection are not counted again.
#[inline(always)]
pub fn offender_key(event: &Event, config: &Config) -> Option<OffenderKey> {
    if event.direction != Direction::EGRESS
        || !event.verdict.is_blocked()
        || event.tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN
    {
        return None;
    }
    // The source as two aligned words of the event, not sixteen byte loads.
    // SAFETY: checked word offsets of Event.
    let [hi, lo] = unsafe { [read_word(event, EVENT_SRC), read_word(event, EVENT_SRC + 8)] };
    Some(key_of(
        event.family,
        [u64::from_be(hi), u64::from_be(lo)],
        config,
    ))
}

/// One subscriber, the unit of the offender table and of the SYN limits: an IPv4 /32, or
/// an IPv6 [`Config::offender_v6_prefix`] (a /64 by default, so that rotating addresses
/// inside it neither hides an offender nor escapes a limit).
#[inline(always)]
pub fn subscriber_key(family: Family, addr: [u8; 16], config: &Config) -> OffenderKey {
    key_of(family, be_halves(addr), config)
}

/// [`subscriber_key`] of an address given as two big-endian halves (the first 8 bytes in
/// `hi`). The prefix is kept with two 64-bit masks rather than a loop over the bytes: the
/// byte loop cost the dataplane about 45 ns per offender attempt.
#[inline(always)]
fn key_of(family: Family, [hi, lo]: [u64; 2], config: &Config) -> OffenderKey {
    let prefix_len = if family == Family::IPV4 {
        32
    } else if config.offender_v6_prefix == 0 || config.offender_v6_prefix > 128 {
        DEFAULT_OFFENDER_V6_PREFIX
    } else {
        config.offender_v6_prefix
    };
    let (hi, lo) = if prefix_len <= 64 {
        (hi & mask64(prefix_len), 0)
    } else {
        (hi, lo & mask64(prefix_len - 64))
    };
    let [a0, a1, a2, a3, a4, a5, a6, a7] = hi.to_be_bytes();
    let [b0, b1, b2, b3, b4, b5, b6, b7] = lo.to_be_bytes();
    OffenderKey {
        family,
        prefix_len,
        _pad: [0; 2],
        addr: [
            a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, b2, b3, b4, b5, b6, b7,
        ],
    }
}

/// The first `bits` bits of a 64-bit word set (all of them from 64 on).
#[inline(always)]
pub const fn mask64(bits: u8) -> u64 {
    if bits == 0 {
        0
    } else if bits >= 64 {
        u64::MAX
    } else {
        u64::MAX << (64 - bits)
    }
}

/// Whether a drop event may be emitted at `now_ns`, taking a token if so.
///
/// A token bucket per CPU: `config.event_rate` tokens per second, at most
/// `config.event_burst` saved. Integer-only and division-free, for the kernel.
#[inline(always)]
pub fn take_event_token(bucket: &mut Bucket, config: &Config, now_ns: u64) -> bool {
    let rate = if config.event_rate > MAX_EVENT_RATE {
        MAX_EVENT_RATE
    } else {
        config.event_rate
    };
    take_token(bucket, rate, config.event_burst, NANO, now_ns)
}

/// Whether reject mode may send an RST at `now_ns`, taking a token if so: a per-CPU
/// bucket of `config.rst_rate` tokens per second, `config.rst_burst` saved.
#[inline(always)]
pub fn take_rst_token(bucket: &mut Bucket, config: &Config, now_ns: u64) -> bool {
    let rate = if config.rst_rate > MAX_RST_RATE {
        MAX_RST_RATE
    } else {
        config.rst_rate
    };
    let burst = if config.rst_burst > MAX_RST_RATE {
        MAX_RST_RATE
    } else {
        config.rst_burst
    };
    take_token(bucket, rate, burst, NANO, now_ns)
}

/// A full SYN bucket for a source first seen at `now_ns`.
#[inline(always)]
pub fn full_syn_bucket(limit: &SynLimit, now_ns: u64) -> Bucket {
    Bucket {
        nano_tokens: u64::from(clamp_burst(limit.burst)) * PER_MINUTE_UNIT,
        last_ns: now_ns,
    }
}

/// Whether a source with `limit` may open one more connection at `now_ns`, taking a token
/// if so: `limit.per_minute` tokens per minute, `limit.burst` saved.
#[inline(always)]
pub fn take_syn_token(bucket: &mut Bucket, limit: &SynLimit, now_ns: u64) -> bool {
    let rate = if limit.per_minute > MAX_SYN_PER_MINUTE {
        MAX_SYN_PER_MINUTE
    } else {
        limit.per_minute
    };
    take_token(
        bucket,
        rate,
        clamp_burst(limit.burst),
        PER_MINUTE_UNIT,
        now_ns,
    )
}

#[inline(always)]
const fn clamp_burst(burst: u32) -> u32 {
    if burst == 0 {
        1
    } else if burst > MAX_SYN_PER_MINUTE {
        MAX_SYN_PER_MINUTE
    } else {
        burst
    }
}

/// The token bucket behind every rate limit here: `rate` tokens per `unit` nanoseconds...
/// kept as `unit` sub-tokens per token, so that refilling is one multiplication
/// (`elapsed_ns * rate`) and no division is needed in the kernel. At most `burst` tokens
/// (at least 1) are saved; a rate of 0 grants nothing.
#[inline(always)]
fn take_token(bucket: &mut Bucket, rate: u32, burst: u32, unit: u64, now_ns: u64) -> bool {
    if rate == 0 {
        return false;
    }
    let burst = if burst == 0 { 1 } else { burst };
    let capacity = u64::from(burst) * unit;
    let elapsed = now_ns.saturating_sub(bucket.last_ns);
    let mut tokens = if elapsed >= MAX_REFILL_NS {
        capacity
    } else {
        bucket.nano_tokens.saturating_add(elapsed * u64::from(rate))
    };
    if tokens > capacity {
        tokens = capacity;
    }
    bucket.last_ns = now_ns;
    if tokens >= unit {
        bucket.nano_tokens = tokens - unit;
        true
    } else {
        bucket.nano_tokens = tokens;
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::{CounterKey, HookKind, ParseOutcome, Verdict};

    /// A budget that must not be asked.
    struct NoBudget;

    impl Budget for NoBudget {
        fn syn_token(&mut self, _: &OffenderKey, _: &SynLimit) -> bool {
            unreachable!("asked for a SYN token")
        }
        fn rst_token(&mut self) -> bool {
            unreachable!("asked for an RST token")
        }
    }

    /// An IPv4 SYN 100.64.1.2:40000 -> 198.51.100.25:25, IPv4 header at 14, TCP at 34.
    fn ipv4_syn_frame() -> [u8; 54] {
        let mut frame = [0u8; 54];
        frame[12..14].copy_from_slice(&[0x08, 0x00]);
        frame[14] = 0x45;
        frame[23] = 6;
        frame[26..30].copy_from_slice(&[100, 64, 1, 2]);
        frame[30..34].copy_from_slice(&[198, 51, 100, 25]);
        frame[34..36].copy_from_slice(&40000u16.to_be_bytes());
        frame[36..38].copy_from_slice(&25u16.to_be_bytes());
        frame[47] = TCP_SYN;
        frame
    }

    /// Every outcome `is_final` calls final is one `resolve` leaves unchanged without asking
    /// a budget, and not an event; and it calls some outcomes final and others not.
    #[test]
    fn final_outcomes_are_left_alone_by_resolve() {
        // A SYN to port 25, which a SYN limit or a reject would act on.
        let frame = ipv4_syn_frame();
        let packet: &[u8] = &frame;
        let (mut finals, mut others) = (0, 0);
        for action in [Action::Pass, Action::Drop, Action::Reject] {
            for direction in [Direction::EGRESS, Direction::INBOUND] {
                for verdict in Verdict::ALL {
                    for per_minute in [0, 1] {
                        for counter in [
                            None,
                            Some(CounterKey::new(direction, Family::IPV4, verdict)),
                        ] {
                            let outcome = Outcome {
                                action,
                                parse: ParseOutcome::TCP,
                                counter,
                                l3: 14,
                                l4: 34,
                                limit: SynLimit {
                                    per_minute,
                                    burst: 1,
                                    monitor: false,
                                },
                            };
                            if !is_final(&outcome) {
                                others += 1;
                                continue;
                            }
                            finals += 1;
                            let mut resolved = outcome;
                            let config = Config::default();
                            let fallback =
                                resolve(&packet, &mut resolved, &config, true, &mut NoBudget);
                            assert_eq!((fallback, resolved), (None, outcome));
                            assert!(!is_event(&outcome));
                        }
                    }
                }
            }
        }
        assert!(finals > 0 && others > 0, "{finals} final, {others} not");
    }

    fn event(direction: Direction, family: Family, verdict: Verdict, flags: u8) -> Event {
        let mut src = [0u8; 16];
        for (i, b) in src.iter_mut().enumerate() {
            *b = 0xA0 + i as u8;
        }
        Event {
            direction,
            family,
            verdict,
            src,
            sport: 40000,
            dport: 25,
            tcp_flags: flags,
            ..Event::default()
        }
    }

    #[test]
    fn only_blocked_egress_syns_make_offenders() {
        let config = Config::default();
        let syn = TCP_SYN;
        let e = Direction::EGRESS;
        let v4 = Family::IPV4;
        assert!(offender_key(&event(e, v4, Verdict::DROPPED, syn), &config).is_some());
        assert!(offender_key(&event(e, v4, Verdict::WOULD_DROP, syn), &config).is_some());
        assert!(offender_key(&event(e, v4, Verdict::ALLOWLISTED, syn), &config).is_none());
        assert!(offender_key(&event(e, v4, Verdict::PASSED, syn), &config).is_none());
        assert!(offender_key(&event(e, v4, Verdict::DROPPED, syn | TCP_ACK), &config).is_none());
        assert!(offender_key(&event(e, v4, Verdict::DROPPED, 0), &config).is_none());
        let inbound = event(Direction::INBOUND, v4, Verdict::DROPPED, syn);
        assert!(offender_key(&inbound, &config).is_none());
    }

    #[test]
    fn ipv4_keys_are_the_host_and_ipv6_keys_the_configured_prefix() {
        let mut config = Config::default();
        let e = event(Direction::EGRESS, Family::IPV4, Verdict::DROPPED, TCP_SYN);
        let key = offender_key(&e, &config).unwrap_or_default();
        assert_eq!(key.prefix_len, 32);
        assert_eq!(key.addr.get(..4), e.src.get(..4));
        assert!(key.addr.iter().skip(4).all(|b| *b == 0));

        let e = event(Direction::EGRESS, Family::IPV6, Verdict::DROPPED, TCP_SYN);
        let key = offender_key(&e, &config).unwrap_or_default();
        assert_eq!(key.prefix_len, 64);
        assert_eq!(key.addr.get(..8), e.src.get(..8));
        assert!(key.addr.iter().skip(8).all(|b| *b == 0));

        config.offender_v6_prefix = 60;
        let key = offender_key(&e, &config).unwrap_or_default();
        assert_eq!(key.prefix_len, 60);
        assert_eq!(key.addr.get(7), Some(&(0xA7 & 0xF0)));
        assert_eq!(key.addr.get(8), Some(&0));

        config.offender_v6_prefix = 128;
        let key = offender_key(&e, &config).unwrap_or_default();
        assert_eq!(key.addr, e.src);
    }

    #[test]
    fn masks_keep_exactly_the_prefix() {
        let all = [0xFFu8; 16];
        let mut config = Config::default();
        for len in 1..=128u8 {
            config.offender_v6_prefix = len;
            let key = subscriber_key(Family::IPV6, all, &config);
            assert_eq!(key.prefix_len, len);
            let ones: u32 = key.addr.iter().map(|b| b.count_ones()).sum();
            assert_eq!(ones, u32::from(len), "length {len}");
            // The set bits are the leading ones.
            let value = u128::from_be_bytes(key.addr);
            assert_eq!(value.leading_ones(), u32::from(len), "length {len}");
        }
        // Out of range: the default length.
        for len in [0, 129, 200] {
            config.offender_v6_prefix = len;
            let key = subscriber_key(Family::IPV6, all, &config);
            assert_eq!(key.prefix_len, DEFAULT_OFFENDER_V6_PREFIX);
            assert_eq!(u128::from_be_bytes(key.addr).leading_ones(), 64);
        }
        // IPv4: the /32, whatever the IPv6 length.
        let key = subscriber_key(Family::IPV4, all, &config);
        assert_eq!(
            (key.prefix_len, key.addr),
            (
                32,
                [0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
            )
        );
    }

    /// The word writes put every field where a field-by-field assignment would, and zero
    /// the padding.
    #[test]
    fn offender_records_match_their_fields() {
        let mut e = event(Direction::EGRESS, Family::IPV6, Verdict::DROPPED, TCP_SYN);
        e.ts_ns = 7_000;
        e.dst = core::array::from_fn(|i| 0x10 + i as u8);
        e.dport = 2525;
        let first = first_attempt(&e);
        let expected = OffenderValue {
            attempts: 1,
            first_seen_ns: 7_000,
            last_seen_ns: 7_000,
            last_dst: e.dst,
            last_dport: 2525,
            last_verdict: Verdict::DROPPED,
            _pad: [0; 5],
        };
        assert_eq!(first, expected);

        let mut later = e;
        later.ts_ns = 9_000;
        later.dst = [0xEE; 16];
        later.dport = 25;
        later.verdict = Verdict::WOULD_DROP;
        let mut value = OffenderValue {
            _pad: [0xAA; 5],
            ..first
        };
        note_attempt(&mut value, &later);
        assert_eq!(
            value,
            OffenderValue {
                attempts: 2,
                first_seen_ns: 7_000,
                last_seen_ns: 9_000,
                last_dst: [0xEE; 16],
                last_dport: 25,
                last_verdict: Verdict::WOULD_DROP,
                _pad: [0; 5],
            }
        );
        // A share another CPU created: its first attempt on this CPU sets first_seen.
        let mut share = OffenderValue::default();
        note_attempt(&mut share, &later);
        assert_eq!((share.attempts, share.first_seen_ns), (1, 9_000));
    }

    /// `fill_event` writes addresses, ports, flags and zero padding over whatever the
    /// scratch slot held, and keeps the caller's fields.
    #[test]
    fn events_are_filled_over_old_contents() {
        let frame = ipv4_syn_frame();
        let packet: &[u8] = &frame;
        let outcome = Outcome {
            action: Action::Drop,
            parse: ParseOutcome::TCP,
            counter: Some(CounterKey::new(
                Direction::EGRESS,
                Family::IPV4,
                Verdict::DROPPED,
            )),
            l3: 14,
            l4: 34,
            limit: SynLimit::default(),
        };
        let mut slot = Event {
            ts_ns: 5,
            ifindex: 9,
            hook: HookKind::TC,
            src: [0xFF; 16],
            dst: [0xFF; 16],
            sport: 1,
            dport: 2,
            tcp_flags: 0xFF,
            _pad: [0xFF; 3],
            ..Event::default()
        };
        assert!(fill_event(&packet, &outcome, &mut slot));
        let mut src = [0; 16];
        src[..4].copy_from_slice(&[100, 64, 1, 2]);
        let mut dst = [0; 16];
        dst[..4].copy_from_slice(&[198, 51, 100, 25]);
        assert_eq!(
            slot,
            Event {
                ts_ns: 5,
                ifindex: 9,
                direction: Direction::EGRESS,
                family: Family::IPV4,
                verdict: Verdict::DROPPED,
                hook: HookKind::TC,
                src,
                dst,
                sport: 40000,
                dport: 25,
                tcp_flags: TCP_SYN,
                _pad: [0; 3],
            }
        );
    }

    /// The same for IPv6, whose addresses are written one at a time, and for a frame cut
    /// after the ports: no flags, and no stale flags or padding left from the slot.
    #[test]
    fn ipv6_events_are_filled_over_old_contents() {
        let src: [u8; 16] = core::array::from_fn(|i| 0x20 + i as u8);
        let dst: [u8; 16] = core::array::from_fn(|i| 0x40 + i as u8);
        // Ethernet, the IPv6 header at 14 (next header TCP), the ports at 54, nothing after.
        let mut frame = [0u8; 58];
        frame[12..14].copy_from_slice(&[0x86, 0xDD]);
        frame[14] = 0x60;
        frame[20] = 6;
        frame[22..38].copy_from_slice(&src);
        frame[38..54].copy_from_slice(&dst);
        frame[54..56].copy_from_slice(&40000u16.to_be_bytes());
        frame[56..58].copy_from_slice(&25u16.to_be_bytes());
        let packet: &[u8] = &frame;
        let outcome = Outcome {
            action: Action::Drop,
            parse: ParseOutcome::TCP,
            counter: Some(CounterKey::new(
                Direction::EGRESS,
                Family::IPV6,
                Verdict::DROPPED,
            )),
            l3: 14,
            l4: 54,
            limit: SynLimit::default(),
        };
        let mut slot = Event {
            src: [0xFF; 16],
            dst: [0xFF; 16],
            tcp_flags: 0xFF,
            _pad: [0xFF; 3],
            ..Event::default()
        };
        assert!(fill_event(&packet, &outcome, &mut slot));
        assert_eq!((slot.src, slot.dst), (src, dst));
        assert_eq!((slot.sport, slot.dport), (40000, 25));
        assert_eq!((slot.tcp_flags, slot._pad), (0, [0; 3]));
        assert_eq!(
            (slot.family, slot.verdict),
            (Family::IPV6, Verdict::DROPPED)
        );
    }

    #[test]
    fn bucket_allows_burst_then_rate() {
        let config = Config {
            event_rate: 10,
            event_burst: 5,
            ..Config::default()
        };
        let mut bucket = Bucket::default();
        let start = 5_000 * NANO;
        // A long idle period fills the bucket to its burst, not beyond.
        let granted = (0..100)
            .filter(|_| take_event_token(&mut bucket, &config, start))
            .count();
        assert_eq!(granted, 5);
        // One second later: `rate` more tokens, capped by the burst.
        let later = start + NANO;
        let granted = (0..100)
            .filter(|_| take_event_token(&mut bucket, &config, later))
            .count();
        assert_eq!(granted, 5, "capped by the burst");
        // 10 s of a flood at 100 pkt/s: about rate * 10 s events.
        let granted = (1..=1000u64)
            .filter(|i| take_event_token(&mut bucket, &config, later + i * NANO / 100))
            .count();
        assert!((99..=101).contains(&granted), "granted {granted}");
    }

    #[test]
    fn syn_bucket_grants_burst_then_per_minute() {
        let limit = SynLimit {
            per_minute: 60,
            burst: 10,
            monitor: false,
        };
        let start = 7 * NANO;
        let mut bucket = full_syn_bucket(&limit, start);
        let granted = (0..100)
            .filter(|_| take_syn_token(&mut bucket, &limit, start))
            .count();
        assert_eq!(granted, 10);
        // 60 per minute is one per second: 30 s of a flood passes about 30.
        let granted = (1..=3000u64)
            .filter(|i| take_syn_token(&mut bucket, &limit, start + i * NANO / 100))
            .count();
        assert!((29..=31).contains(&granted), "granted {granted}");
    }

    #[test]
    fn rst_bucket_off_when_rate_is_zero() {
        let mut bucket = Bucket::default();
        assert!(!take_rst_token(&mut bucket, &Config::default(), 1 << 40));
    }

    #[test]
    fn bucket_off_when_rate_is_zero() {
        let mut bucket = Bucket::default();
        assert!(!take_event_token(&mut bucket, &Config::default(), 1 << 40));
    }
}
