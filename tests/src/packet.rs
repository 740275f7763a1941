//! Frame builder for classifier tests: Ethernet, VLAN/QinQ tags, PPPoE, IPv4 with options
//! and fragment fields, IPv6 with extension-header chains, TCP or another protocol.
//!
//! Checksums are left zero: BPF_PROG_TEST_RUN does not verify them and the classifier does
//! not read them. Real-traffic tests use real sockets instead.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// 802.1Q customer tag.
pub const TPID_8021Q: u16 = 0x8100;
/// 802.1ad service tag.
pub const TPID_8021AD: u16 = 0x88A8;
/// Pre-standard QinQ outer tag.
pub const TPID_QINQ_LEGACY: u16 = 0x9100;
/// TCP.
pub const IPPROTO_TCP: u8 = 6;
/// UDP.
pub const IPPROTO_UDP: u8 = 17;
/// IPv4 "more fragments" flag in the flags/offset field.
pub const IPV4_MF: u16 = 0x2000;

/// An IPv6 extension header to put in the chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ext {
    /// Hop-by-hop options; the length field (8-octet units beyond the first 8).
    HopByHop(u8),
    /// Routing header; length field as above.
    Routing(u8),
    /// Destination options; length field as above.
    DestOpts(u8),
    /// Fragment header: offset in 8-octet units, and the M flag.
    Fragment {
        /// Fragment offset (13 bits).
        offset: u16,
        /// More fragments follow.
        more: bool,
    },
    /// Authentication header; its length field (4-octet units, minus 2).
    Ah(u8),
}

impl Ext {
    /// The IPv6 next-header value naming this header.
    pub const fn protocol(self) -> u8 {
        match self {
            Self::HopByHop(_) => 0,
            Self::Routing(_) => 43,
            Self::DestOpts(_) => 60,
            Self::Fragment { .. } => 44,
            Self::Ah(_) => 51,
        }
    }

    fn encode(self, next: u8, out: &mut Vec<u8>) {
        match self {
            Self::HopByHop(len) | Self::Routing(len) | Self::DestOpts(len) => {
                out.extend([next, len]);
                out.resize(out.len() + (usize::from(len) + 1) * 8 - 2, 0);
            }
            Self::Fragment { offset, more } => {
                let field = (offset << 3) | u16::from(more);
                out.extend([next, 0]);
                out.extend(field.to_be_bytes());
                out.extend(0x1234_5678_u32.to_be_bytes());
            }
            Self::Ah(len) => {
                out.extend([next, len]);
                out.resize(out.len() + (usize::from(len) + 2) * 4 - 2, 0);
            }
        }
    }
}

/// The PPPoE session header to put between the tags and the IP header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pppoe {
    /// Version/type byte (0x11 is the only valid one).
    pub ver_type: u8,
    /// Code (0 for session data).
    pub code: u8,
    /// PPP protocol; `None` means the right one for the IP version.
    pub protocol: Option<u16>,
    /// Protocol-field compression (RFC 1661 6.5): the protocol is written as its low byte
    /// only.
    pub compressed: bool,
}

impl Default for Pppoe {
    fn default() -> Self {
        Self {
            ver_type: 0x11,
            code: 0,
            protocol: None,
            compressed: false,
        }
    }
}

/// A frame description. Start from [`Pkt::tcp`] and adjust fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pkt {
    /// VLAN TPIDs, outermost first.
    pub tags: Vec<u16>,
    /// PPPoE session header, if any.
    pub pppoe: Option<Pppoe>,
    /// Ethertype to use instead of the IP one (e.g. ARP), if any.
    pub ethertype: Option<u16>,
    /// Source address (its family selects IPv4 or IPv6).
    pub src: IpAddr,
    /// Destination address (must be the same family as `src`).
    pub dst: IpAddr,
    /// Overrides the version nibble of the IP header.
    pub ip_version: Option<u8>,
    /// IPv4 IHL override (words); default 5 + options.
    pub ihl: Option<u8>,
    /// IPv4 option words (0..=10).
    pub ipv4_option_words: u8,
    /// IPv4 flags and fragment offset field, raw.
    pub ipv4_frag: u16,
    /// IPv6 extension headers, in order.
    pub ipv6_ext: Vec<Ext>,
    /// Transport protocol.
    pub protocol: u8,
    /// TCP source port.
    pub sport: u16,
    /// TCP destination port.
    pub dport: u16,
    /// Payload bytes after the transport header.
    pub payload: usize,
    /// TCP flags (SYN unless changed).
    pub flags: u8,
    /// TCP sequence number.
    pub seq: u32,
}

impl Pkt {
    /// A TCP SYN from `src:sport` to `dst:dport`, untagged.
    pub fn tcp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> Self {
        Self {
            tags: Vec::new(),
            pppoe: None,
            ethertype: None,
            src,
            dst,
            ip_version: None,
            ihl: None,
            ipv4_option_words: 0,
            ipv4_frag: 0,
            ipv6_ext: Vec::new(),
            protocol: IPPROTO_TCP,
            sport,
            dport,
            payload: 0,
            flags: 0x02,
            seq: 1,
        }
    }

    /// Shorthand for an IPv4 TCP SYN.
    pub fn v4(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Self {
        Self::tcp(src.into(), sport, dst.into(), dport)
    }

    /// Shorthand for an IPv6 TCP SYN.
    pub fn v6(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16) -> Self {
        Self::tcp(src.into(), sport, dst.into(), dport)
    }

    /// Builder-style field setters.
    #[must_use]
    pub fn tags(mut self, tags: &[u16]) -> Self {
        self.tags = tags.to_vec();
        self
    }

    /// Adds a PPPoE session header.
    #[must_use]
    pub fn pppoe(mut self, pppoe: Pppoe) -> Self {
        self.pppoe = Some(pppoe);
        self
    }

    /// Sets the IPv6 extension-header chain.
    #[must_use]
    pub fn ext(mut self, ext: &[Ext]) -> Self {
        self.ipv6_ext = ext.to_vec();
        self
    }

    /// Sets the transport protocol.
    #[must_use]
    pub fn protocol(mut self, protocol: u8) -> Self {
        self.protocol = protocol;
        self
    }

    /// Sets the IPv4 fragment field.
    #[must_use]
    pub fn ipv4_frag(mut self, field: u16) -> Self {
        self.ipv4_frag = field;
        self
    }

    /// Encodes the frame.
    pub fn build(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128 + self.payload);
        out.extend([0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02]);
        for (i, tpid) in self.tags.iter().enumerate() {
            out.extend(tpid.to_be_bytes());
            // Distinct VLAN IDs per level, priority 0.
            out.extend((100_u16 + i as u16).to_be_bytes());
        }
        let is_v6 = self.src.is_ipv6();
        let ip_ethertype: u16 = if is_v6 { 0x86DD } else { 0x0800 };
        let ip = self.ip_header_and_payload();
        match (self.ethertype, self.pppoe) {
            (Some(ethertype), _) => out.extend(ethertype.to_be_bytes()),
            (None, Some(pppoe)) => {
                out.extend(0x8864_u16.to_be_bytes());
                let protocol = pppoe
                    .protocol
                    .unwrap_or(if is_v6 { 0x0057 } else { 0x0021 });
                out.extend([pppoe.ver_type, pppoe.code]);
                out.extend(0x0001_u16.to_be_bytes());
                if pppoe.compressed {
                    out.extend(((ip.len() + 1) as u16).to_be_bytes());
                    out.push(protocol.to_be_bytes()[1]);
                } else {
                    out.extend(((ip.len() + 2) as u16).to_be_bytes());
                    out.extend(protocol.to_be_bytes());
                }
            }
            (None, None) => out.extend(ip_ethertype.to_be_bytes()),
        }
        out.extend(ip);
        out
    }

    fn transport(&self) -> Vec<u8> {
        let mut l4 = Vec::new();
        l4.extend(self.sport.to_be_bytes());
        l4.extend(self.dport.to_be_bytes());
        if self.protocol == IPPROTO_TCP {
            l4.extend(self.seq.to_be_bytes());
            l4.extend(0_u32.to_be_bytes()); // ack
            l4.extend([5 << 4, self.flags]); // data offset 5 words
            l4.extend(64240_u16.to_be_bytes());
            l4.extend([0, 0, 0, 0]); // checksum, urgent pointer
        } else {
            l4.extend([0, 8, 0, 0]); // UDP-like length and checksum
        }
        l4.resize(l4.len() + self.payload, 0);
        l4
    }

    fn ip_header_and_payload(&self) -> Vec<u8> {
        let l4 = self.transport();
        let mut out = Vec::new();
        match (self.src, self.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                let ihl = self.ihl.unwrap_or(5 + self.ipv4_option_words);
                let version = self.ip_version.unwrap_or(4);
                let header_len = 20 + 4 * usize::from(self.ipv4_option_words);
                out.push((version << 4) | (ihl & 0x0F));
                out.push(0);
                out.extend(((header_len + l4.len()) as u16).to_be_bytes());
                out.extend(0x4242_u16.to_be_bytes());
                out.extend(self.ipv4_frag.to_be_bytes());
                out.extend([64, self.protocol, 0, 0]);
                out.extend(src.octets());
                out.extend(dst.octets());
                // NOP options: what matters is their length.
                out.resize(header_len, 1);
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                let mut chain = Vec::new();
                for (i, ext) in self.ipv6_ext.iter().enumerate() {
                    let next = self
                        .ipv6_ext
                        .get(i + 1)
                        .map_or(self.protocol, |e| e.protocol());
                    ext.encode(next, &mut chain);
                }
                let first = self
                    .ipv6_ext
                    .first()
                    .map_or(self.protocol, |e| e.protocol());
                let version = self.ip_version.unwrap_or(6);
                out.extend([version << 4, 0, 0, 0]);
                out.extend(((chain.len() + l4.len()) as u16).to_be_bytes());
                out.extend([first, 64]);
                out.extend(src.octets());
                out.extend(dst.octets());
                out.extend(chain);
            }
            // Mixed families cannot be put on the wire: emit no IP header at all, which
            // the classifier sees as a truncated frame.
            _ => return Vec::new(),
        }
        out.extend(l4);
        out
    }
}
