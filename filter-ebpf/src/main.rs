//! The p25 dataplane: an XDP program and a TC classifier around the one shared classifier
//! in `filter_common::classify`. Only the mapping of an [`Action`] to a return code
//! differs between the two hooks.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{TC_ACT_PIPE, TC_ACT_SHOT, xdp_action},
    helpers::bpf_skb_load_bytes,
    macros::{classifier, map, xdp},
    maps::{Array, LpmTrie, PerCpuArray, lpm_trie::Key},
    programs::{TcContext, XdpContext},
};
use filter_common::{
    abi::{
        ALLOW_MAX_ENTRIES, AbiRecord, AllowValue, CONFIG_INDEX, COUNTER_SLOTS, Config, Counter,
        Ipv4Key, Ipv6Key, ParseOutcome, SUBSCRIBERS_MAX_ENTRIES, SubscriberValue,
    },
    classify::{Action, Tables, classify},
    packet::{OFFSET_MASK, PacketBuf, Plain},
};

// Policy maps: written only by the control plane.
#[map]
static SUBSCRIBERS_V4: LpmTrie<Ipv4Key, SubscriberValue> =
    LpmTrie::with_max_entries(SUBSCRIBERS_MAX_ENTRIES, 0);
#[map]
static SUBSCRIBERS_V6: LpmTrie<Ipv6Key, SubscriberValue> =
    LpmTrie::with_max_entries(SUBSCRIBERS_MAX_ENTRIES, 0);
#[map]
static ALLOW_V4: LpmTrie<Ipv4Key, AllowValue> = LpmTrie::with_max_entries(ALLOW_MAX_ENTRIES, 0);
#[map]
static ALLOW_V6: LpmTrie<Ipv6Key, AllowValue> = LpmTrie::with_max_entries(ALLOW_MAX_ENTRIES, 0);
#[map]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

// Written once by the control plane when it creates the maps; see AbiRecord.
#[map]
static ABI: Array<AbiRecord> = Array::with_max_entries(1, 0);

// Statistics maps: written only by the dataplane, per CPU so no two CPUs share a line.
#[map]
static COUNTERS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);
#[map]
static PARSE_COUNTERS: PerCpuArray<Counter> =
    PerCpuArray::with_max_entries(ParseOutcome::COUNT as u32, 0);

/// The BPF maps as the classifier's [`Tables`].
struct Maps;

impl Tables for Maps {
    #[inline(always)]
    fn config(&self) -> Config {
        CONFIG.get(CONFIG_INDEX).copied().unwrap_or_default()
    }
    #[inline(always)]
    fn subscriber_v4(&self, addr: Ipv4Key) -> Option<SubscriberValue> {
        SUBSCRIBERS_V4.get(Key::new(32, addr)).copied()
    }
    #[inline(always)]
    fn subscriber_v6(&self, addr: Ipv6Key) -> Option<SubscriberValue> {
        SUBSCRIBERS_V6.get(Key::new(128, addr)).copied()
    }
    #[inline(always)]
    fn allowed_v4(&self, addr: Ipv4Key) -> bool {
        ALLOW_V4.get(Key::new(32, addr)).is_some()
    }
    #[inline(always)]
    fn allowed_v6(&self, addr: Ipv6Key) -> bool {
        ALLOW_V6.get(Key::new(128, addr)).is_some()
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

/// Classifies, counts, and returns the action. Shared by both hooks.
#[inline(always)]
fn run<P: PacketBuf>(packet: &P, bytes: u64) -> Action {
    let outcome = classify(packet, &Maps);
    bump(&PARSE_COUNTERS, outcome.parse.index(), bytes);
    if let Some(key) = outcome.counter {
        bump(&COUNTERS, key.index(), bytes);
    }
    outcome.action
}

#[xdp]
pub fn p25_xdp(ctx: XdpContext) -> u32 {
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    match run(&XdpPacket(&ctx), bytes) {
        Action::Pass => xdp_action::XDP_PASS,
        Action::Drop => xdp_action::XDP_DROP,
    }
}

#[classifier]
pub fn p25_tc(ctx: TcContext) -> i32 {
    let bytes = u64::from(ctx.len());
    // TC_ACT_PIPE: no opinion, continue with the next program (TCX_NEXT under tcx).
    match run(&TcPacket(&ctx), bytes) {
        Action::Pass => TC_ACT_PIPE,
        Action::Drop => TC_ACT_SHOT,
    }
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
