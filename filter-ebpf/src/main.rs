//! The p25 dataplane: an XDP program and a TC classifier around the one shared classifier
//! in `filter_common::classify` and the shared post-verdict code in `filter_common::track`.
//! The hooks differ in the mapping of an [`Action`] to a return code, and in that only XDP
//! can answer a rejected SYN with an RST (XDP_TX). Each hook has an entry point per
//! attachment [`Role`]: `p25_xdp` / `p25_tc` for subscriber-facing interfaces, and
//! `p25_xdp_upstream` / `p25_tc_upstream`, which apply the inbound rule only.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{
        __sk_buff, BPF_F_NO_PREALLOC, BPF_NOEXIST, TC_ACT_PIPE, TC_ACT_SHOT, xdp_action, xdp_md,
    },
    helpers::{bpf_ktime_get_coarse_ns, bpf_skb_load_bytes, bpf_xdp_adjust_tail},
    macros::{classifier, map, xdp},
    maps::{
        Array, HashMap, LpmTrie, LruHashMap, LruPerCpuHashMap, PerCpuArray, RingBuf, lpm_trie::Key,
    },
    programs::{TcContext, XdpContext},
};
use filter_common::{
    abi::{
        ALLOW_HOST_MAX_ENTRIES, ALLOW_MAX_ENTRIES, AbiRecord, AllowValue, BlockAction, Bucket,
        CONFIG_INDEX, COUNTERS_ENTRIES, Config, Counter, CounterKey, Direction, EVENTS_RING_BYTES,
        Event, EventStat, Family, HookKind, Ipv4Key, Ipv6Key, Mode, OFFENDERS_MAX_ENTRIES,
        OffenderKey, OffenderValue, ParseOutcome, RejectFallback, SUBSCRIBERS_MAX_ENTRIES,
        SYN_BUCKETS_MAX_ENTRIES, SubscriberLengths, SubscriberValue, Verdict, counter_index,
    },
    classify::{Action, Outcome, Role, SynLimit, Tables, classify},
    packet::{OFFSET_MASK, PacketBuf, PacketBufMut, Plain},
    reject::{rst_frame_len, write_rst},
    track::{
        Budget, be_halves, fill_event, first_attempt, full_syn_bucket, is_event, is_final, mask64,
        note_attempt, offender_key, resolve, take_event_token, take_rst_token, take_syn_token,
    },
};

// Policy maps: written only by the control plane.
#[map]
static SUBSCRIBERS_V4: LpmTrie<Ipv4Key, SubscriberValue> =
    LpmTrie::with_max_entries(SUBSCRIBERS_MAX_ENTRIES, 0);
#[map]
static SUBSCRIBERS_V6: LpmTrie<Ipv6Key, SubscriberValue> =
    LpmTrie::with_max_entries(SUBSCRIBERS_MAX_ENTRIES, 0);
// The subscriber prefixes again, in hashes keyed by LPM key: with few prefix lengths in
// use (SUB_LENGTHS), a lookup is one hash probe per length, longest first, instead of a walk
// down a trie of 100k entries. The tries stay complete and answer when too many lengths are
// in use.
#[map]
static SUBSCRIBERS_HASH_V4: HashMap<Key<Ipv4Key>, SubscriberValue> =
    HashMap::with_max_entries(SUBSCRIBERS_MAX_ENTRIES, BPF_F_NO_PREALLOC);
#[map]
static SUBSCRIBERS_HASH_V6: HashMap<Key<Ipv6Key>, SubscriberValue> =
    HashMap::with_max_entries(SUBSCRIBERS_MAX_ENTRIES, BPF_F_NO_PREALLOC);
#[map]
static SUB_LENGTHS: Array<SubscriberLengths> = Array::with_max_entries(1, 0);
#[map]
static ALLOW_V4: LpmTrie<Ipv4Key, AllowValue> = LpmTrie::with_max_entries(ALLOW_MAX_ENTRIES, 0);
#[map]
static ALLOW_V6: LpmTrie<Ipv6Key, AllowValue> = LpmTrie::with_max_entries(ALLOW_MAX_ENTRIES, 0);
// Host entries (/32, /128) of the allowlist, nearly all of a big one: one hash lookup
// instead of a walk down a deep trie. The tries above keep only the wider prefixes.
#[map]
static ALLOW_HOST_V4: HashMap<Key<Ipv4Key>, AllowValue> =
    HashMap::with_max_entries(ALLOW_HOST_MAX_ENTRIES, BPF_F_NO_PREALLOC);
#[map]
static ALLOW_HOST_V6: HashMap<Key<Ipv6Key>, AllowValue> =
    HashMap::with_max_entries(ALLOW_HOST_MAX_ENTRIES, BPF_F_NO_PREALLOC);
#[map]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

// Written once by the control plane when it creates the maps; see AbiRecord.
#[map]
static ABI: Array<AbiRecord> = Array::with_max_entries(1, 0);

// Statistics maps: written only by the dataplane, per CPU so no two CPUs share a line.
#[map]
static COUNTERS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(COUNTERS_ENTRIES, 0);
#[map]
static PARSE_COUNTERS: PerCpuArray<Counter> =
    PerCpuArray::with_max_entries(ParseOutcome::COUNT as u32, 0);
#[map]
static EVENT_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(EventStat::COUNT as u32, 0);

// Offender evidence: one entry per subscriber with a value per CPU, so that a flood from one
// source spread over CPUs never bounces a cache line or takes a bucket lock on the hot path
// (the entry is looked up and changed in place; only a miss inserts). The control plane
// sums the CPUs. LRU so that a flood of distinct sources evicts the stalest instead of
// failing inserts.
#[map]
static OFFENDERS: LruPerCpuHashMap<OffenderKey, OffenderValue> =
    LruPerCpuHashMap::with_max_entries(OFFENDERS_MAX_ENTRIES, 0);

// Sampled drop events for the daemon, and the per-CPU token bucket that keeps a flood from
// overwhelming it.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_RING_BYTES, 0);
#[map]
static EVENT_BUCKET: PerCpuArray<Bucket> = PerCpuArray::with_max_entries(1, 0);
// Reject mode: the per-CPU RST budget, and why rejects fell back to drops.
#[map]
static RST_BUCKET: PerCpuArray<Bucket> = PerCpuArray::with_max_entries(1, 0);
#[map]
static REJECT_FALLBACKS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(RejectFallback::COUNT as u32, 0);
// SYN limits of allowlist entries: one bucket per source, shared by all CPUs (a limit per
// customer, not per CPU), LRU so that many sources evict the idlest.
#[map]
static SYN_BUCKETS: LruHashMap<OffenderKey, Bucket> =
    LruHashMap::with_max_entries(SYN_BUCKETS_MAX_ENTRIES, 0);

// Per-CPU scratch space for the event being built: an Event on the stack would crowd the
// 512-byte BPF stack the classifier already uses. Not part of the ABI (never pinned).
#[map]
static SCRATCH: PerCpuArray<Event> = PerCpuArray::with_max_entries(1, 0);

/// The BPF maps as the classifier's [`Tables`].
struct Maps;

impl Tables for Maps {
    #[inline(always)]
    fn config(&self) -> Config {
        CONFIG.get(CONFIG_INDEX).copied().unwrap_or_default()
    }
    #[inline(always)]
    fn subscriber_v4(&self, addr: Ipv4Key) -> Option<SubscriberValue> {
        let lengths = SUB_LENGTHS.get(0)?;
        if lengths.v4_hash != 1 {
            return SUBSCRIBERS_V4.get(Key::new(32, addr)).copied();
        }
        let bits = u32::from_be_bytes(addr.0);
        for len in lengths.v4.iter().take(usize::from(lengths.v4_count)) {
            let mask = match *len {
                0 => 0,
                n if n >= 32 => u32::MAX,
                n => u32::MAX << (32 - n),
            };
            let key = Key::new(u32::from(*len), Ipv4Key((bits & mask).to_be_bytes()));
            // SAFETY: copied out at once; the control plane writes whole elements.
            if let Some(value) = unsafe { SUBSCRIBERS_HASH_V4.get(&key) } {
                return Some(*value);
            }
        }
        None
    }
    #[inline(always)]
    fn subscriber_v6(&self, addr: Ipv6Key) -> Option<SubscriberValue> {
        let found = subscriber_probe_v6(&Key::new(128, addr));
        if found & FOUND == 0 {
            return None;
        }
        let [mode, action, ..] = found.to_le_bytes();
        Some(SubscriberValue {
            mode: Mode(mode),
            action: BlockAction(action),
            _pad: [0; 2],
        })
    }
    // A host entry is the most specific match there is, so a hit in the hash is the
    // longest-prefix answer; only a miss asks the trie of wider prefixes.
    #[inline(always)]
    fn allow_v4(&self, addr: Ipv4Key) -> Option<AllowValue> {
        let key = Key::new(32, addr);
        // SAFETY: the value is copied out at once; the control plane replaces values with
        // whole-element updates.
        if let Some(value) = unsafe { ALLOW_HOST_V4.get(&key) } {
            return Some(*value);
        }
        ALLOW_V4.get(key).copied()
    }
    #[inline(always)]
    fn allow_v6(&self, addr: Ipv6Key) -> Option<AllowValue> {
        let key = Key::new(128, addr);
        // SAFETY: as above.
        if let Some(value) = unsafe { ALLOW_HOST_V6.get(&key) } {
            return Some(*value);
        }
        ALLOW_V6.get(key).copied()
    }
}

/// Bit of [`subscriber_probe_v6`]'s result: a prefix matched (its mode and action are the
/// two low bytes).
const FOUND: u64 = 1 << 32;

/// Longest-prefix match of the IPv6 address in `host` (a /128 LPM key) among the subscriber prefixes: one
/// probe of SUBSCRIBERS_HASH_V6 per length in use, longest first, or the trie when
/// SUB_LENGTHS says so (more than 8 lengths, or a zeroed map). Returns [`FOUND`] with the
/// value's mode and action in the low bytes, or 0.
///
/// Its own BPF function, taking the key on the caller's stack (as a trie lookup would) and
/// returning a scalar: inlined, or taking the address as two 64-bit halves, the probe's
/// byte shuffling was copied into every call site of the classifier (both rules,
/// fragments, unreadable TCP) and the hook's frame grew from 280 to 432 bytes, past the 512
/// bytes the verifier allows for a call chain with the RST writer.
#[inline(never)]
fn subscriber_probe_v6(host: &Key<Ipv6Key>) -> u64 {
    let pack = |value: &SubscriberValue| {
        FOUND | u64::from(value.mode.0) | (u64::from(value.action.0) << 8)
    };
    let Some(lengths) = SUB_LENGTHS.get(0) else {
        return 0;
    };
    if lengths.v6_hash != 1 {
        return SUBSCRIBERS_V6.get(host).map_or(0, pack);
    }
    let [hi, lo] = be_halves(host.data.0);
    for len in lengths.v6.iter().take(usize::from(lengths.v6_count)) {
        // Two 64-bit masks, as for offender keys: no loop over the 16 bytes.
        let (hi, lo) = if *len <= 64 {
            (hi & mask64(*len), 0)
        } else {
            (hi, lo & mask64(*len - 64))
        };
        let [a0, a1, a2, a3, a4, a5, a6, a7] = hi.to_be_bytes();
        let [b0, b1, b2, b3, b4, b5, b6, b7] = lo.to_be_bytes();
        let key = Key::new(
            u32::from(*len),
            Ipv6Key([
                a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, b2, b3, b4, b5, b6, b7,
            ]),
        );
        // SAFETY: read at once; the control plane writes whole elements.
        if let Some(value) = unsafe { SUBSCRIBERS_HASH_V6.get(&key) } {
            return pack(value);
        }
    }
    0
}

/// The stateful budgets of [`resolve`], in maps, and the packet's one clock read.
struct MapBudget<'a> {
    config: &'a Config,
    /// `CLOCK_MONOTONIC_COARSE` ns, read at most once per packet, and only by a packet that needs
    /// it (a SYN limit, an RST, an event); 0 until then.
    now: u64,
}

impl MapBudget<'_> {
    /// The packet's timestamp, from the coarse clock (`CLOCK_MONOTONIC_COARSE`, one tick
    /// of resolution): the token buckets only need elapsed time at that grain, and the
    /// offender record's "first/last seen" are shown in seconds. Reading the fine clock
    /// costs more in a VM (a pvclock read per call).
    #[inline(always)]
    fn now(&mut self) -> u64 {
        if self.now == 0 {
            // SAFETY: a helper without arguments or side effects.
            self.now = unsafe { bpf_ktime_get_coarse_ns() };
        }
        self.now
    }
}

impl Budget for MapBudget<'_> {
    #[inline(always)]
    fn syn_token(&mut self, source: &OffenderKey, limit: &SynLimit) -> bool {
        let now = self.now();
        if let Some(bucket) = SYN_BUCKETS.get_ptr_mut(source) {
            // SAFETY: a live map value. CPUs racing on one source's bucket can each take
            // the same token (plain loads and stores): a source spread over several CPUs
            // may exceed its limit by at most one token per racing CPU.
            return take_syn_token(unsafe { &mut *bucket }, limit, now);
        }
        let mut bucket = full_syn_bucket(limit, now);
        let granted = take_syn_token(&mut bucket, limit, now);
        // If the insert fails, the source is not limited this time: failing open on an
        // allowlisted source is the safe side.
        let _ = SYN_BUCKETS.insert(source, bucket, 0);
        granted
    }

    #[inline(always)]
    fn rst_token(&mut self) -> bool {
        let Some(bucket) = RST_BUCKET.get_ptr_mut(0) else {
            return false;
        };
        let now = self.now();
        // SAFETY: per-CPU slot, only this CPU touches it.
        take_rst_token(unsafe { &mut *bucket }, self.config, now)
    }
}

/// Bounded read from `[start, end)`: the `data_end` check the verifier insists on.
#[inline(always)]
fn load_direct<T: Plain>(start: usize, end: usize, offset: usize) -> Option<T> {
    // The classifier never asks past MAX_OFFSET, so the mask is an identity; it is here so
    // the verifier sees a bounded variable offset.
    let ptr = start + (offset & OFFSET_MASK);
    if ptr + size_of::<T>() > end {
        return None;
    }
    // SAFETY: [ptr, ptr + size_of::<T>()) lies inside the packet (checked above), and T is
    // Plain, so any bytes are a valid T.
    Some(unsafe { core::ptr::read_unaligned(ptr as *const T) })
}

struct XdpPacket<'a>(&'a XdpContext);

impl PacketBuf for XdpPacket<'_> {
    #[inline(always)]
    fn load<T: Plain>(&self, offset: usize) -> Option<T> {
        load_direct(self.0.data(), self.0.data_end(), offset)
    }
}

impl PacketBufMut for XdpPacket<'_> {
    #[inline(always)]
    fn store<T: Plain>(&mut self, offset: usize, value: T) -> bool {
        let ptr = self.0.data() + (offset & OFFSET_MASK);
        if ptr + size_of::<T>() > self.0.data_end() {
            return false;
        }
        // SAFETY: [ptr, ptr + size_of::<T>()) lies inside the packet (checked above), which
        // XDP may write.
        unsafe { core::ptr::write_unaligned(ptr as *mut T, value) };
        true
    }
}

struct TcPacket<'a>(&'a TcContext);

impl PacketBuf for TcPacket<'_> {
    #[inline(always)]
    fn load<T: Plain>(&self, offset: usize) -> Option<T> {
        // Headers are normally in the linear area; a GRO'd or fragmented skb can hold them
        // in pages, where only bpf_skb_load_bytes reaches. Falling back keeps a port-25
        // packet from slipping through just because of how the stack laid it out.
        load_direct(self.0.data(), self.0.data_end(), offset)
            .or_else(|| load_skb_bytes(self.0, offset))
    }
}

/// `bpf_skb_load_bytes` into a zeroed `T`. Not aya's `TcContext::load`: that returns a
/// `MaybeUninit`-backed value, and on its error path LLVM may copy the uninitialised bytes
/// from a register the helper call clobbered, which the verifier rejects (`R1 !read_ok`).
#[inline(always)]
fn load_skb_bytes<T: Plain>(ctx: &TcContext, offset: usize) -> Option<T> {
    // SAFETY: T is Plain, so all-zero bytes are a valid T.
    let mut value: T = unsafe { core::mem::zeroed() };
    // SAFETY: the helper writes at most size_of::<T>() bytes into `value`, which is exactly
    // that large; it reads the skb, which the context owns for this call.
    let ret = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb as *const _,
            (offset & OFFSET_MASK) as u32,
            (&raw mut value).cast(),
            size_of::<T>() as u32,
        )
    };
    (ret == 0).then_some(value)
}

#[inline(always)]
fn bump(map: &PerCpuArray<Counter>, index: u32, bytes: u64) {
    if let Some(counter) = map.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot is only touched by this CPU, and BPF programs are not
        // preempted by one another on the same CPU for the same hook.
        let counter = unsafe { &mut *counter };
        counter.packets = counter.packets.wrapping_add(1);
        counter.bytes = counter.bytes.wrapping_add(bytes);
    }
}

#[inline(always)]
fn bump_stat(stat: EventStat) {
    if let Some(value) = EVENT_STATS.get_ptr_mut(stat.index()) {
        // SAFETY: per-CPU slot, as in `bump`.
        unsafe { *value = (*value).wrapping_add(1) };
    }
}

#[inline(always)]
fn bump_fallback(reason: RejectFallback) {
    if let Some(value) = REJECT_FALLBACKS.get_ptr_mut(reason.index()) {
        // SAFETY: per-CPU slot, as in `bump`.
        unsafe { *value = (*value).wrapping_add(1) };
    }
}

/// What the post-verdict functions ([`p25_xdp_verdict`], [`p25_tc_verdict`]) hand back to
/// their hook, in the one scalar a BPF global function returns: the action (bits 0-3),
/// whether the SCRATCH event was filled and is left for the hook to record (4), the counter
/// key's direction (8-15), family (16-23) and verdict (24-31), and, for a reject, the IP and
/// TCP header offsets (32-45, 46-59; offsets are below 2^14, see `OFFSET_MASK`).
#[derive(Clone, Copy)]
struct Settled(u64);

impl Settled {
    const EVENT: u64 = 1 << 4;

    /// The value a post-verdict function returned. Through `black_box`: LLVM sees the
    /// callee's body and would drop the masks in [`Settled::offsets`] as redundant, while
    /// the verifier knows nothing of a global function's result and needs them.
    #[inline(always)]
    fn from(returned: u64) -> Self {
        Self(core::hint::black_box(returned))
    }

    #[inline(always)]
    fn new(outcome: &Outcome, key: CounterKey, event: bool) -> Self {
        let action = match outcome.action {
            Action::Pass => 0,
            Action::Drop => 1,
            Action::Reject => 2,
        };
        let (l3, l4) = if outcome.action == Action::Reject {
            (u64::from(outcome.l3), u64::from(outcome.l4))
        } else {
            (0, 0)
        };
        Self(
            action
                | if event { Self::EVENT } else { 0 }
                | u64::from(key.direction.0) << 8
                | u64::from(key.family.0) << 16
                | u64::from(key.verdict.0) << 24
                | (l3 & OFFSET_MASK as u64) << 32
                | (l4 & OFFSET_MASK as u64) << 46,
        )
    }

    #[inline(always)]
    fn action(self) -> Action {
        match self.0 & 0xF {
            1 => Action::Drop,
            2 => Action::Reject,
            _ => Action::Pass,
        }
    }

    #[inline(always)]
    fn event(self) -> bool {
        self.0 & Self::EVENT != 0
    }

    /// The same, with the event already recorded: the hook has nothing left to record.
    #[inline(always)]
    fn recorded(self) -> Self {
        Self(self.0 & !Self::EVENT)
    }

    #[inline(always)]
    fn key(self) -> CounterKey {
        CounterKey::new(
            Direction((self.0 >> 8) as u8),
            Family((self.0 >> 16) as u8),
            Verdict((self.0 >> 24) as u8),
        )
    }

    /// The IP and TCP header offsets of a reject, masked, so that the verifier, to which
    /// the returned scalar is unknown, sees them bounded.
    #[inline(always)]
    fn offsets(self) -> (u16, u16) {
        let mask = OFFSET_MASK as u64;
        (
            ((self.0 >> 32) & mask) as u16,
            ((self.0 >> 46) & mask) as u16,
        )
    }
}

/// The code between the classifier's verdict and the counters, for an outcome a rule
/// matched (packed by [`Outcome::pack`]): resolves the stateful part of the verdict and
/// fills the SCRATCH event of a drop or would-drop. Shared by both hooks' post-verdict
/// functions. Counting and writing an RST are left to the hook, and so is recording the
/// event, except that [`p25_xdp_verdict`] records a final one itself (see there for why).
#[inline(always)]
fn settle<P: PacketBuf>(
    packet: &P,
    words: [u64; 3],
    ifindex: u32,
    hook: HookKind,
    config: &Config,
) -> Settled {
    let mut outcome = Outcome::unpack(words);
    // The offsets are below MAX_OFFSET by construction, but the verifier checks this code
    // with its arguments unknown: give it the bound again.
    outcome.l3 &= OFFSET_MASK as u16;
    outcome.l4 &= OFFSET_MASK as u16;
    let mut budget = MapBudget { config, now: 0 };
    if let Some(reason) = resolve(
        packet,
        &mut outcome,
        config,
        hook == HookKind::XDP,
        &mut budget,
    ) {
        bump_fallback(reason);
    }
    let Some(key) = outcome.counter else {
        // Never taken: an outcome without a counter key is a pass, which the hooks count
        // without calling this (and `resolve` keeps the key).
        return Settled(0);
    };
    // Only drops and would-drops get this far with an event: the common path pays
    // nothing more.
    let mut filled = false;
    if is_event(&outcome)
        && let Some(event) = SCRATCH.get_ptr_mut(0)
    {
        // SAFETY: per-CPU slot, only this CPU touches it during this run.
        let event = unsafe { &mut *event };
        if fill_event(packet, &outcome, event) {
            event.ifindex = ifindex;
            event.hook = hook;
            // The one clock read (or the one the budgets already made).
            event.ts_ns = budget.now();
            filled = true;
        }
    }
    Settled::new(&outcome, key, filled)
}

/// Bumps the verdict counter of `key` and, when `event` (the SCRATCH event was filled and
/// not yet recorded), records the event with the final verdict.
#[inline(always)]
fn finish(key: CounterKey, event: bool, bytes: u64, ifindex: u32) {
    bump(&COUNTERS, counter_index(ifindex, key), bytes);
    if event && let Some(slot) = SCRATCH.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, only this CPU touches it during this run.
        let slot = unsafe { &mut *slot };
        slot.verdict = key.verdict;
        record(slot);
    }
}

/// Turns the SYN in `ctx` into its RST, in place: shrinks the frame to the reply's length,
/// then rewrites it. False if the kernel refused either step (the packet is then dropped;
/// [`filter_common::reject::check`] has made sure it is large enough). Not inlined: the
/// rewrite's temporaries get their own frame instead of adding to the hook's.
#[inline(never)]
fn transmit_rst(ctx: &XdpContext, l3: u16, l4: u16) -> bool {
    let len = ctx.data_end() - ctx.data();
    let want = rst_frame_len(usize::from(l4));
    if want > len {
        return false;
    }
    // SAFETY: shrinking the frame by a non-negative amount smaller than its length; packet
    // pointers are re-read from the context afterwards.
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, -((len - want) as i32)) } != 0 {
        return false;
    }
    write_rst(&mut XdpPacket(ctx), usize::from(l3), usize::from(l4))
}

/// Offender tracking and the sampled event for a drop or would-drop whose verdict changed
/// after [`p25_xdp_verdict`] (an RST that could not be sent), or seen by TC. Not inlined: a
/// separate frame keeps the hooks' stack small.
#[inline(never)]
fn record(event: &mut Event) {
    record_with(event, &Maps.config());
}

/// [`record`]'s work, with the CONFIG the caller already read.
#[inline(always)]
fn record_with(event: &mut Event, config: &Config) {
    let now = event.ts_ns;
    if let Some(key) = offender_key(event, config) {
        track_offender(&key, event);
    }
    if config.event_rate == 0 {
        return;
    }
    let Some(bucket) = EVENT_BUCKET.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU slot, only this CPU touches it.
    if !take_event_token(unsafe { &mut *bucket }, config, now) {
        bump_stat(EventStat::RATE_LIMITED);
        return;
    }
    match EVENTS.output::<Event>(&*event, 0) {
        Ok(()) => bump_stat(EventStat::EMITTED),
        Err(_) => bump_stat(EventStat::RING_FULL),
    }
}

/// Adds the attempt in `event` to this CPU's share of the subscriber's evidence: looked up
/// and changed in place ([`note_attempt`]), inserted only on a miss ([`first_attempt`]). A
/// CPU's share may be zero when another CPU created the entry (the kernel zeroes the other
/// CPUs' values of a new entry).
#[inline(always)]
fn track_offender(key: &OffenderKey, event: &Event) {
    if let Some(value) = OFFENDERS.get_ptr_mut(key) {
        // SAFETY: this CPU's value of a live entry; no other CPU touches it.
        note_attempt(unsafe { &mut *value }, event);
        return;
    }
    // NOEXIST: if another CPU created the entry in the meantime, add to this CPU's share
    // instead of resetting the others'.
    if OFFENDERS
        .insert(key, first_attempt(event), u64::from(BPF_NOEXIST))
        .is_err()
        && let Some(existing) = OFFENDERS.get_ptr_mut(key)
    {
        // SAFETY: as above.
        note_attempt(unsafe { &mut *existing }, event);
    }
}

// `#[inline(always)]` under the macro applies to the function the macro wraps: without it,
// once the hook grew past LLVM's inlining budget, every packet paid a BPF-to-BPF call from
// the entry point into the hook (see docs/dataplane.md, non-25 cost).
#[xdp]
#[inline(always)]
pub fn p25_xdp(ctx: XdpContext) -> u32 {
    xdp_hook(&ctx, Role::Subscriber)
}

#[xdp]
#[inline(always)]
pub fn p25_xdp_upstream(ctx: XdpContext) -> u32 {
    xdp_hook(&ctx, Role::Upstream)
}

/// The hooks' part before the post-verdict call, shared by XDP and TC: classifies and
/// counts the parse outcome. A final pass (nothing stateful to do: `is_final`) is counted
/// here too and gives `None`, without the call; anything else comes back packed for it.
/// `ifindex` is read only for a packet a rule looked at: on XDP it is three dependent loads
/// (`xdp_md.ingress_ifindex` is rewritten to the device's field), which the common path,
/// port-25-free traffic, does not need.
#[inline(always)]
fn classify_counted<P: PacketBuf>(
    packet: &P,
    bytes: u64,
    ifindex: impl Fn() -> u32,
    role: Role,
) -> Option<[u64; 3]> {
    let outcome = classify(packet, &Maps, role);
    bump(&PARSE_COUNTERS, outcome.parse.index(), bytes);
    if is_final(&outcome) {
        if let Some(key) = outcome.counter {
            bump(&COUNTERS, counter_index(ifindex(), key), bytes);
        }
        return None;
    }
    Some(outcome.pack())
}

#[inline(always)]
fn xdp_hook(ctx: &XdpContext, role: Role) -> u32 {
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let ifindex = || ctx.ingress_ifindex() as u32;
    let Some([a, b, c]) = classify_counted(&XdpPacket(ctx), bytes, ifindex, role) else {
        return xdp_action::XDP_PASS;
    };
    let ifindex = ifindex();
    // SAFETY: `ctx.ctx` is this program's context, valid for the whole run.
    let settled = Settled::from(unsafe { p25_xdp_verdict(ctx.ctx, a, b, c) });
    let mut key = settled.key();
    let action = match settled.action() {
        Action::Reject => {
            // The SYN becomes its RST, in place, and goes back out (XDP_TX). If that
            // fails it is dropped instead, counted as a `tx_failed` fallback and as a
            // drop, never passed.
            let (l3, l4) = settled.offsets();
            if transmit_rst(ctx, l3, l4) {
                xdp_action::XDP_TX
            } else {
                bump_fallback(RejectFallback::TX_FAILED);
                key.verdict = Verdict::DROPPED;
                xdp_action::XDP_DROP
            }
        }
        Action::Drop => xdp_action::XDP_DROP,
        Action::Pass => xdp_action::XDP_PASS,
    };
    finish(key, settled.event(), bytes, ifindex);
    action
}

/// The XDP hooks' code after the classifier's verdict, for a packet a rule looked at: the
/// stateful part of the verdict and the event ([`settle`]). Returns a [`Settled`].
///
/// A BPF global function (exported, so its BTF linkage is global): the verifier checks it
/// once, on its own, with the packed outcome unknown, and each call only as a call with
/// scalar arguments. Inlined, or as a static BPF function (which the verifier checks again
/// at every call, with the caller's registers), it is verified once per parse path of the
/// classifier (tags, PPPoE, IHL, extension headers), each with its own known offsets and
/// verdict, and all four programs pass the 1,000,000-instruction limit. Hiding the packed
/// outcome with `core::hint::black_box` or an empty `asm!` does not help: that hides it
/// from LLVM, not from the verifier, which follows registers and stack spills through both
/// (measured: over the limit). Before this, the outcome went through a per-CPU map slot
/// and back (volatile), whose loads the verifier cannot know; see docs/dataplane.md,
/// "Verifier notes". A final pass (`is_final`) does not come here: the call costs more
/// than the map round trip did, and the hook counts such a pass itself.
///
/// It calls nothing with a frame of its own: the verifier sums the frames of a call chain
/// (512 bytes at most), and hook (192 bytes; `p25_tc` 248) + this (216 with the inlined
/// recording; TC 184) + `transmit_rst` (192) or `record` (144) is too deep. So the hook
/// counts and writes the RST after it returns, and records a reject's event (whose verdict
/// the RST may still change); a drop's or a pass's event is recorded here, inlined
/// ([`record_with`]), which saves a call and a second CONFIG read per drop. What the hook
/// still has live after the call (the context, length, the returned scalar) is the same on
/// every parse path, and the verifier walks that code about once.
///
/// # Safety
///
/// `ctx` must be the context of the running XDP program.
#[unsafe(no_mangle)]
#[inline(never)]
pub unsafe extern "C" fn p25_xdp_verdict(ctx: *mut xdp_md, a: u64, b: u64, c: u64) -> u64 {
    let ctx = XdpContext::new(ctx);
    let ifindex = ctx.ingress_ifindex() as u32;
    let config = Maps.config();
    let settled = settle(&XdpPacket(&ctx), [a, b, c], ifindex, HookKind::XDP, &config);
    // A drop or pass is final here, so its event is recorded here, with the CONFIG already
    // read, instead of in a second call from the hook. Only a reject can still change its
    // verdict (an RST that cannot be sent is a drop), so the hook records that one.
    if settled.event()
        && settled.action() != Action::Reject
        && let Some(slot) = SCRATCH.get_ptr_mut(0)
    {
        // SAFETY: per-CPU slot, only this CPU touches it during this run; `settle` filled
        // it with the final verdict.
        record_with(unsafe { &mut *slot }, &config);
        return settled.recorded().0;
    }
    settled.0
}

#[classifier]
#[inline(always)]
pub fn p25_tc(ctx: TcContext) -> i32 {
    tc_hook(&ctx, Role::Subscriber)
}

#[classifier]
#[inline(always)]
pub fn p25_tc_upstream(ctx: TcContext) -> i32 {
    tc_hook(&ctx, Role::Upstream)
}

#[inline(always)]
fn tc_hook(ctx: &TcContext, role: Role) -> i32 {
    let bytes = u64::from(ctx.len());
    // SAFETY: the context's skb pointer is valid for the whole program run.
    let ifindex = || unsafe { (*ctx.skb.skb).ifindex };
    let Some([a, b, c]) = classify_counted(&TcPacket(ctx), bytes, ifindex, role) else {
        // TC_ACT_PIPE: no opinion, continue with the next program (TCX_NEXT under tcx).
        return TC_ACT_PIPE;
    };
    // SAFETY: `ctx.skb.skb` is this program's context, valid for the whole run.
    let settled = Settled::from(unsafe { p25_tc_verdict(ctx.skb.skb, a, b, c) });
    finish(settled.key(), settled.event(), bytes, ifindex());
    // `resolve` never leaves a Reject standing on TC; were it to, dropping is the safe
    // reading.
    match settled.action() {
        Action::Pass => TC_ACT_PIPE,
        Action::Drop | Action::Reject => TC_ACT_SHOT,
    }
}

/// The TC hooks' code after the classifier's verdict: as [`p25_xdp_verdict`] (a BPF global
/// function, for the same reasons). Returns a [`Settled`].
///
/// # Safety
///
/// `skb` must be the context of the running TC program.
#[unsafe(no_mangle)]
#[inline(never)]
pub unsafe extern "C" fn p25_tc_verdict(skb: *mut __sk_buff, a: u64, b: u64, c: u64) -> u64 {
    let ctx = TcContext::new(skb);
    // SAFETY: the context's skb pointer is valid for the whole program run.
    let ifindex = unsafe { (*skb).ifindex };
    settle(
        &TcPacket(&ctx),
        [a, b, c],
        ifindex,
        HookKind::TC,
        &Maps.config(),
    )
    .0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable by construction: the workspace lints deny indexing and unwrap, and the
    // verifier rejects any program whose panic path survives optimisation.
    // SAFETY: see above.
    unsafe { core::hint::unreachable_unchecked() }
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
