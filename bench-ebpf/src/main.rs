//! Benchmark-only eBPF programs, built by `p25-bench` and never shipped with p25:
//!
//! - floors: the cheapest possible program of each hook (`floor_xdp_pass`,
//!   `floor_tc_ok`, `floor_xdp_drop`), so that p25's own cost can be stated as "p25 minus
//!   the floor measured in the same round";
//! - `gen_xdp_tx`: the traffic generator for the veth throughput benchmark, run by
//!   BPF_PROG_TEST_RUN with `BPF_F_TEST_XDP_LIVE_FRAMES` (the kernel here has no pktgen).
//!   It can rewrite the source address of every frame from a table, cycling through it,
//!   so that a flood comes from many sources (the many-source floods).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{TC_ACT_OK, xdp_action},
    macros::{classifier, map, xdp},
    maps::{Array, PerCpuArray},
    programs::{TcContext, XdpContext},
};

/// What the generator writes into every frame before sending it.
///
/// Live-frames mode recycles its pages without re-initialising them, so a frame comes
/// back with whatever the receiver did to it: a router that forwarded it decremented the
/// TTL (and patched the IPv4 checksum to match). Without a restore the TTL would reach
/// zero after 64 laps and the router would start answering with ICMP instead of doing
/// the work being measured. With a source table, the source address (and the IPv4
/// checksum that goes with it) changes from frame to frame as well.
///
/// Layout shared with `bench/src/throughput.rs` (written there as 8 bytes).
#[repr(C)]
#[derive(Clone, Copy)]
struct GenConfig {
    /// IPv4 TTL of the template frame.
    ipv4_ttl: u8,
    /// IPv6 hop limit of the template frame.
    ipv6_hop_limit: u8,
    /// IPv4 header checksum of the template frame (network order), valid with `ipv4_ttl`;
    /// used when there is no source table.
    ipv4_csum: [u8; 2],
    /// Entries of `GEN_SOURCES` in use; 0 keeps the template's source address.
    sources: u32,
}

/// One source address of the rotation (written as 20 bytes by `bench/src/throughput.rs`).
#[repr(C)]
#[derive(Clone, Copy)]
struct GenSource {
    /// The address: 4 bytes for IPv4 (rest unused), 16 for IPv6.
    addr: [u8; 16],
    /// IPv4 header checksum of the template frame with this source (network order).
    ipv4_csum: [u8; 2],
    _pad: [u8; 2],
}

/// Capacity of the source table (the floods use 65,536 sources).
const GEN_SOURCES_MAX: u32 = 1 << 17;

#[map]
static GEN_CONFIG: Array<GenConfig> = Array::with_max_entries(1, 0);

#[map]
static GEN_SOURCES: Array<GenSource> = Array::with_max_entries(GEN_SOURCES_MAX, 0);

/// Index of the next source, per CPU (the generator runs on one CPU; per-CPU keeps it
/// free of atomics anyway).
#[map]
static GEN_CURSOR: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IPV4: [u8; 2] = [0x08, 0x00];
const ETH_P_IPV6: [u8; 2] = [0x86, 0xDD];
const IPV4_TTL: usize = ETH_HLEN + 8;
const IPV4_CSUM: usize = ETH_HLEN + 10;
const IPV4_SRC: usize = ETH_HLEN + 12;
const IPV4_END: usize = ETH_HLEN + 20;
const IPV6_HOP_LIMIT: usize = ETH_HLEN + 7;
const IPV6_SRC: usize = ETH_HLEN + 8;
const IPV6_END: usize = ETH_HLEN + 40;

#[xdp]
pub fn floor_xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[xdp]
pub fn floor_xdp_drop(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_DROP
}

#[classifier]
pub fn floor_tc_ok(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

/// Rewrites an untagged IPv4/IPv6 frame (TTL or hop limit, and the next source address
/// of the table if one is set), then bounces it out of the interface it was "received"
/// on (in live-frames mode XDP_TX becomes a redirect to that device, i.e. a transmit to
/// the veth peer). The number of frames is bounded by the test run's `repeat`.
#[xdp]
pub fn gen_xdp_tx(ctx: XdpContext) -> u32 {
    rewrite(&ctx);
    xdp_action::XDP_TX
}

/// The next source of the rotation, if a table is set.
#[inline(always)]
fn next_source(config: &GenConfig) -> Option<&'static GenSource> {
    if config.sources == 0 {
        return None;
    }
    let cursor = GEN_CURSOR.get_ptr_mut(0)?;
    // SAFETY: the pointer comes from the map lookup above and points at this CPU's u32;
    // nothing else runs on this CPU while the program does.
    let index = unsafe { *cursor };
    let index = if index >= config.sources { 0 } else { index };
    // SAFETY: as above.
    unsafe { *cursor = index + 1 };
    GEN_SOURCES.get(index)
}

#[inline(always)]
fn rewrite(ctx: &XdpContext) {
    let Some(config) = GEN_CONFIG.get(0) else {
        return;
    };
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + ETH_HLEN > end {
        return;
    }
    let source = next_source(config);
    // SAFETY: [start, start + ETH_HLEN) is inside the frame (checked above).
    let ethertype = unsafe { *((start + ETH_HLEN - 2) as *const [u8; 2]) };
    if ethertype == ETH_P_IPV4 && start + IPV4_END <= end {
        let (addr, csum) = match source {
            Some(s) => {
                let [a, b, c, d, ..] = s.addr;
                (Some([a, b, c, d]), s.ipv4_csum)
            }
            None => (None, config.ipv4_csum),
        };
        // SAFETY: the IPv4 header [ETH_HLEN, IPV4_END) is inside the frame (checked).
        unsafe {
            *((start + IPV4_TTL) as *mut u8) = config.ipv4_ttl;
            *((start + IPV4_CSUM) as *mut [u8; 2]) = csum;
            if let Some(addr) = addr {
                *((start + IPV4_SRC) as *mut [u8; 4]) = addr;
            }
        }
    } else if ethertype == ETH_P_IPV6 && start + IPV6_END <= end {
        // SAFETY: the IPv6 header [ETH_HLEN, IPV6_END) is inside the frame (checked).
        unsafe {
            *((start + IPV6_HOP_LIMIT) as *mut u8) = config.ipv6_hop_limit;
            if let Some(s) = source {
                *((start + IPV6_SRC) as *mut [u8; 16]) = s.addr;
            }
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable by construction: nothing here indexes or unwraps, and the verifier
    // rejects any program whose panic path survives optimisation.
    // SAFETY: see above.
    unsafe { core::hint::unreachable_unchecked() }
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
