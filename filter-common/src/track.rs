//! What the hooks record about a packet after its verdict: the offender it is evidence
//! against, and whether the event rate limit lets a drop event through.
//!
//! Shared with the host so that the reference model and the unit tests run exactly the code
//! the dataplane runs.

use crate::{
    abi::{
        Bucket, Config, DEFAULT_OFFENDER_V6_PREFIX, Direction, Event, Family, MAX_EVENT_RATE,
        OffenderKey,
    },
    classify::Outcome,
    packet::{MAX_OFFSET, PacketBuf},
};

/// Nano-tokens per token in a [`Bucket`].
const NANO: u64 = 1_000_000_000;
/// Longest idle time the bucket refill looks at. Longer gaps refill the bucket completely
/// anyway (at [`MAX_EVENT_RATE`] and any sane burst), and the clamp keeps
/// `elapsed * rate` far below `u64::MAX`.
const MAX_REFILL_NS: u64 = 1_000 * NANO;

/// TCP flag bits (RFC 9293).
pub const TCP_SYN: u8 = 0x02;
/// TCP flag bits (RFC 9293).
pub const TCP_ACK: u8 = 0x10;
/// Offset of the flags byte in the TCP header.
const TCP_FLAGS_OFFSET: usize = 13;

/// Whether an outcome is worth recording: a rule matched (drop or would-drop).
#[inline(always)]
pub fn is_event(outcome: &Outcome) -> bool {
    matches!(outcome.counter, Some(key) if key.verdict.is_match())
}

/// Fills the packet part of `event` (rule, addresses, ports, TCP flags) for an outcome a
/// rule matched, reading them back from the packet at the offsets the classifier found.
/// Leaves `ts_ns`, `ifindex` and `hook` to the caller. Returns false (and leaves the event
/// unusable) when the outcome has no counter.
///
/// The eBPF hooks fill a per-CPU scratch `Event` in place, which keeps 56 bytes off the
/// 512-byte BPF stack.
#[inline(always)]
pub fn fill_event<P: PacketBuf>(pkt: &P, outcome: &Outcome, event: &mut Event) -> bool {
    let Some(key) = outcome.counter else {
        return false;
    };
    event.direction = key.direction;
    event.family = key.family;
    event.verdict = key.verdict;
    event.src = [0; 16];
    event.dst = [0; 16];
    let l3 = usize::from(outcome.l3);
    if key.family == Family::IPV4 {
        if let (Some(src), Some(dst)) = (pkt.load::<[u8; 4]>(l3 + 12), pkt.load::<[u8; 4]>(l3 + 16))
        {
            let ([s0, s1, s2, s3], [d0, d1, d2, d3]) = (src, dst);
            event.src = [s0, s1, s2, s3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
            event.dst = [d0, d1, d2, d3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        }
    } else if let (Some(src), Some(dst)) =
        (pkt.load::<[u8; 16]>(l3 + 8), pkt.load::<[u8; 16]>(l3 + 24))
    {
        event.src = src;
        event.dst = dst;
    }
    let l4 = usize::from(outcome.l4);
    event.sport = 0;
    event.dport = 0;
    event.tcp_flags = 0;
    if l4 != 0 {
        if let Some([a, b, c, d]) = pkt.load::<[u8; 4]>(l4) {
            event.sport = u16::from_be_bytes([a, b]);
            event.dport = u16::from_be_bytes([c, d]);
        }
        // Optional: a header cut after the ports still had its verdict. Two bytes (data
        // offset, flags) rather than one: for a 1-byte load LLVM rewrites `p + 1 > end` as
        // `p >= end`, which the verifier cannot turn into a packet range.
        if l4 + TCP_FLAGS_OFFSET <= MAX_OFFSET
            && let Some([_offset, flags]) = pkt.load::<[u8; 2]>(l4 + TCP_FLAGS_OFFSET - 1)
        {
            event.tcp_flags = flags;
        }
    }
    event._pad = [0; 3];
    true
}

/// The offender an event is evidence against: a subscriber's blocked (or, in monitor
/// mode, would-be-blocked) attempt to open a TCP connection to port 25. Only SYNs without
/// ACK count, so that retransmitted data or RSTs of one connection are not counted again.
#[inline(always)]
pub fn offender_key(event: &Event, config: &Config) -> Option<OffenderKey> {
    if event.direction != Direction::EGRESS
        || !event.verdict.is_match()
        || event.tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN
    {
        return None;
    }
    let prefix_len = if event.family == Family::IPV4 {
        32
    } else if config.offender_v6_prefix == 0 || config.offender_v6_prefix > 128 {
        DEFAULT_OFFENDER_V6_PREFIX
    } else {
        config.offender_v6_prefix
    };
    Some(OffenderKey {
        family: event.family,
        prefix_len,
        _pad: [0; 2],
        addr: mask(event.src, prefix_len),
    })
}

/// Keeps the first `prefix_len` bits of `addr`.
#[inline(always)]
fn mask(addr: [u8; 16], prefix_len: u8) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut bits = u32::from(prefix_len);
    // A fixed trip count and iterators instead of indexing: the verifier sees a bounded loop
    // and the eBPF build has no panic path.
    for (o, a) in out.iter_mut().zip(addr.iter()) {
        *o = if bits >= 8 {
            *a
        } else if bits == 0 {
            0
        } else {
            *a & (0xFFu8 << (8 - bits))
        };
        bits = bits.saturating_sub(8);
    }
    out
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
    if rate == 0 {
        return false;
    }
    let burst = if config.event_burst == 0 {
        1
    } else {
        config.event_burst
    };
    let capacity = u64::from(burst) * NANO;
    let mut elapsed = now_ns.saturating_sub(bucket.last_ns);
    if elapsed > MAX_REFILL_NS {
        elapsed = MAX_REFILL_NS;
    }
    let mut tokens = bucket.nano_tokens.saturating_add(elapsed * u64::from(rate));
    if tokens > capacity {
        tokens = capacity;
    }
    bucket.last_ns = now_ns;
    if tokens >= NANO {
        bucket.nano_tokens = tokens - NANO;
        true
    } else {
        bucket.nano_tokens = tokens;
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::Verdict;

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
        assert_eq!(key.addr, e.src);

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
    fn bucket_off_when_rate_is_zero() {
        let mut bucket = Bucket::default();
        assert!(!take_event_token(&mut bucket, &Config::default(), 1 << 40));
    }
}
