//! Reject mode's answer to a blocked connection attempt: the SYN rewritten in place into
//! the TCP RST a closed port would send (RFC 9293 3.10.7.1), so that the client fails at
//! once with "connection refused" instead of hanging until its connect timeout.
//!
//! The reply reuses the frame: Ethernet addresses swapped, VLAN tags kept as they are,
//! PPPoE session header kept with its length fixed; a fresh IP header (no options or
//! extension headers, TTL/hop limit 64) with the addresses swapped; a bare 20-byte TCP
//! header with the ports swapped, `seq = 0`, `ack = SYN's seq + 1 (+ any SYN data)`,
//! flags RST|ACK, and correct checksums. The frame is cut to
//! [`rst_frame_len`] bytes (the hook shrinks it before calling [`write_rst`]).
//!
//! Shared with the host, so that the reference model builds byte for byte the frame the
//! XDP program transmits.

use crate::{
    abi::RejectFallback,
    classify::pppoe_length_offset,
    packet::{MAX_OFFSET, PacketBuf, PacketBufMut},
    track::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

const ETH_ALEN: usize = 6;
const IPV4_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
const TCP_HLEN: usize = 20;
const IPPROTO_TCP: u8 = 6;
/// TTL and hop limit of the reply: the usual initial value, as if the server answered.
const REPLY_TTL: u8 = 64;
/// IPv4 flags/fragment offset of the reply: Don't Fragment, like Linux's own RSTs.
const IPV4_DF: [u8; 2] = [0x40, 0x00];
/// IPv4 flags (reserved, DF, MF) and offset: only DF may be set in a SYN we answer.
const IPV4_MF_AND_OFFSET: u16 = 0x3FFF;

/// Whether the TCP segment at `l4`, in the IP packet at `l3`, is a connection attempt the
/// RST writer can answer: a SYN (without ACK, RST or FIN) in an unfragmented IPv4 packet
/// without options or an IPv6 packet without extension headers, with its whole TCP header
/// in the frame. `l4` is 0 when the ports are not visible (fragments).
#[inline(always)]
pub fn check<P: PacketBuf>(pkt: &P, l3: usize, l4: usize) -> Result<(), RejectFallback> {
    if l4 == 0 || l4 + TCP_HLEN > MAX_OFFSET {
        return Err(RejectFallback::NOT_SYN);
    }
    let [version, _] = pkt.load::<[u8; 2]>(l3).ok_or(RejectFallback::UNSUPPORTED)?;
    if version == 0x45 {
        let [frag_hi, frag_lo] = pkt
            .load::<[u8; 2]>(l3 + 6)
            .ok_or(RejectFallback::UNSUPPORTED)?;
        if l4 != l3 + IPV4_HLEN || u16::from_be_bytes([frag_hi, frag_lo]) & IPV4_MF_AND_OFFSET != 0
        {
            return Err(RejectFallback::UNSUPPORTED);
        }
    } else if version >> 4 != 6 || l4 != l3 + IPV6_HLEN {
        return Err(RejectFallback::UNSUPPORTED);
    }
    // The flags first: a non-SYN is the common reason, and says more than a short header.
    let Some([_offset, flags]) = pkt.load::<[u8; 2]>(l4 + 12) else {
        return Err(RejectFallback::UNSUPPORTED);
    };
    if flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) != TCP_SYN {
        return Err(RejectFallback::NOT_SYN);
    }
    // Two bytes at the very end of the header: the whole header is in the frame.
    if pkt.load::<[u8; 2]>(l4 + TCP_HLEN - 2).is_none() {
        return Err(RejectFallback::UNSUPPORTED);
    }
    Ok(())
}

/// Length of the RST frame built from a SYN whose TCP header is at `l4`.
#[inline(always)]
pub const fn rst_frame_len(l4: usize) -> usize {
    l4 + TCP_HLEN
}

/// Rewrites the SYN (IP header at `l3`, TCP header at `l4`, accepted by [`check`]) into
/// its RST, in place. The caller has already cut the frame to [`rst_frame_len`] or
/// leaves the rest as trailing bytes. Returns false if a read or write fell outside the
/// packet, which [`check`] rules out, but the kernel wants every access checked.
///
/// Written for the BPF stack: fields are read and written in pieces of at most 4 bytes and
/// the checksums are summed on the fly, so no header is ever built in a buffer.
#[inline(always)]
pub fn write_rst<P: PacketBufMut>(pkt: &mut P, l3: usize, l4: usize) -> bool {
    let l3 = l3 & MAX_OFFSET;
    let l4 = l4 & MAX_OFFSET;
    // Ethernet: swap the addresses; tags and ethertype stay.
    // One `let ... else` per load, never a tuple of Options: LLVM may fill a `None`'s
    // undefined payload from a register a helper call clobbered, which the verifier
    // rejects (`R1 !read_ok`).
    let Some(dst_mac) = pkt.load::<[u8; ETH_ALEN]>(0) else {
        return false;
    };
    let Some(src_mac) = pkt.load::<[u8; ETH_ALEN]>(ETH_ALEN) else {
        return false;
    };
    if !(pkt.store(0, src_mac) && pkt.store(ETH_ALEN, dst_mac)) {
        return false;
    }

    // Values are kept as integers, and each field is written as soon as it is known, so
    // that few live at once: the BPF stack has room for only a handful of spills.
    let Some(ports) = pkt.load::<[u8; 4]>(l4) else {
        return false;
    };
    let Some(seq) = pkt.load::<[u8; 4]>(l4 + 4) else {
        return false;
    };
    let Some([doff, _flags]) = pkt.load::<[u8; 2]>(l4 + 12) else {
        return false;
    };
    let Some([v, _]) = pkt.load::<[u8; 2]>(l3) else {
        return false;
    };
    let ipv4 = v == 0x45;
    let tcp_hlen = usize::from(doff >> 4) * 4;
    // Sequence space the SYN used: one for the SYN itself plus any data it carries (TCP
    // Fast Open), from the IP length. A bogus length only makes a wrong ack, which the
    // client ignores.
    let Some(len) = pkt.load::<[u8; 2]>(l3 + if ipv4 { 2 } else { 4 }) else {
        return false;
    };
    let ip_len = usize::from(u16::from_be_bytes(len));
    let payload = if ipv4 {
        ip_len.saturating_sub(IPV4_HLEN + tcp_hlen)
    } else {
        ip_len.saturating_sub(tcp_hlen)
    };
    let ack = u32::from_be_bytes(seq)
        .wrapping_add(1)
        .wrapping_add(payload as u32);
    let reply_ports = u32::from_be_bytes(ports).rotate_left(16);
    let offset_flags: u32 = (0x50 << 24) | (u32::from(TCP_RST | TCP_ACK) << 16);

    // TCP checksum: the pseudo-header (addresses, protocol, length) and the header, whose
    // zero fields (seq, window, urgent pointer, checksum itself) add nothing.
    let mut sum = sum32(sum32(sum32(0, reply_ports), ack), offset_flags)
        + u32::from(IPPROTO_TCP)
        + TCP_HLEN as u32;
    if !(pkt.store(l4, reply_ports.to_be_bytes())
        && pkt.store(l4 + 4, [0u8; 4])
        && pkt.store(l4 + 8, ack.to_be_bytes())
        && pkt.store(l4 + 12, offset_flags.to_be_bytes()))
    {
        return false;
    }

    let ip_total = if ipv4 {
        let Some(src) = pkt.load::<[u8; 4]>(l3 + 12) else {
            return false;
        };
        let Some(dst) = pkt.load::<[u8; 4]>(l3 + 16) else {
            return false;
        };
        let (src, dst) = (u32::from_be_bytes(src), u32::from_be_bytes(dst));
        let addresses = sum32(sum32(0, src), dst);
        sum += addresses;
        let head: u32 = (0x45 << 24) | (IPV4_HLEN + TCP_HLEN) as u32;
        // Identification 0: an atomic datagram (DF set) needs none (RFC 6864).
        let flags: u32 = u32::from(u16::from_be_bytes(IPV4_DF));
        let ttl_proto: u32 = (u32::from(REPLY_TTL) << 24) | (u32::from(IPPROTO_TCP) << 16);
        let check = csum_fold(sum32(sum32(sum32(addresses, head), flags), ttl_proto));
        if !(pkt.store(l3, head.to_be_bytes())
            && pkt.store(l3 + 4, flags.to_be_bytes())
            && pkt.store(l3 + 8, (ttl_proto | u32::from(check)).to_be_bytes())
            && pkt.store(l3 + 12, dst.to_be_bytes())
            && pkt.store(l3 + 16, src.to_be_bytes()))
        {
            return false;
        }
        IPV4_HLEN + TCP_HLEN
    } else {
        // Version 6, traffic class and flow label 0.
        let length_next_hop: u32 =
            ((TCP_HLEN as u32) << 16) | (u32::from(IPPROTO_TCP) << 8) | u32::from(REPLY_TTL);
        if !(pkt.store(l3, 0x6000_0000u32.to_be_bytes())
            && pkt.store(l3 + 4, length_next_hop.to_be_bytes()))
        {
            return false;
        }
        // Swap the addresses four bytes at a time.
        for word in 0..4 {
            let (src_at, dst_at) = (l3 + 8 + 4 * word, l3 + 24 + 4 * word);
            let Some(src) = pkt.load::<[u8; 4]>(src_at) else {
                return false;
            };
            let Some(dst) = pkt.load::<[u8; 4]>(dst_at) else {
                return false;
            };
            sum = sum32(sum32(sum, u32::from_be_bytes(src)), u32::from_be_bytes(dst));
            if !(pkt.store(src_at, dst) && pkt.store(dst_at, src)) {
                return false;
            }
        }
        IPV6_HLEN + TCP_HLEN
    };
    // PPPoE: the session header's length is the PPP payload, protocol field included.
    if let Some((offset, protocol_len)) = pppoe_length_offset(pkt, l3)
        && !pkt.store(offset, ((ip_total + protocol_len) as u16).to_be_bytes())
    {
        return false;
    }
    // Checksum and urgent pointer.
    pkt.store(l4 + 16, (u32::from(csum_fold(sum)) << 16).to_be_bytes())
}

/// Adds a 32-bit value as two 16-bit words to a one's-complement sum (RFC 1071).
#[inline(always)]
const fn sum32(sum: u32, value: u32) -> u32 {
    sum + (value >> 16) + (value & 0xFFFF)
}

/// Folds a sum into the 16-bit one's-complement checksum. Three folds suffice for any
/// sum of fewer than 2^16 words, without a loop the verifier must bound.
#[inline(always)]
const fn csum_fold(mut sum: u32) -> u16 {
    sum = (sum & 0xFFFF) + (sum >> 16);
    sum = (sum & 0xFFFF) + (sum >> 16);
    sum = (sum & 0xFFFF) + (sum >> 16);
    !(sum as u16)
}
