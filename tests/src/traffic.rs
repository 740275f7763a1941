//! Bounded SYN streams and receiver-side counting, for "nothing lost, nothing leaked"
//! checks that do not depend on TCP's retransmissions.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::netns::Netns;

/// A raw TCP socket bound to a source address inside a namespace, for crafted SYNs.
#[derive(Debug)]
pub struct SynSender {
    fd: OwnedFd,
    src: Ipv4Addr,
}

impl SynSender {
    /// Opens the socket inside `netns` (the socket stays in that namespace).
    pub fn new(netns: &Netns, src: Ipv4Addr) -> Result<Self> {
        let fd = netns.enter(|| -> Result<OwnedFd> {
            // SAFETY: plain socket(2) call.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_TCP) };
            ensure!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
            // SAFETY: we own the fresh fd.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            let addr = sockaddr(SocketAddrV4::new(src, 0));
            // SAFETY: addr is a valid sockaddr_in for the duration of the call.
            let ret = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&raw const addr).cast(),
                    size_of::<libc::sockaddr_in>() as u32,
                )
            };
            ensure!(
                ret == 0,
                "binding the raw socket to {src}: {}",
                std::io::Error::last_os_error()
            );
            Ok(fd)
        })??;
        Ok(Self { fd, src })
    }

    /// Sends one SYN from `sport` to `dst`.
    pub fn send(&self, sport: u16, dst: SocketAddrV4) -> Result<()> {
        let segment = syn(self.src, sport, *dst.ip(), dst.port());
        let addr = sockaddr(SocketAddrV4::new(*dst.ip(), 0));
        // SAFETY: valid buffer and sockaddr for the duration of the call.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                segment.as_ptr().cast(),
                segment.len(),
                0,
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_in>() as u32,
            )
        };
        ensure!(
            sent == segment.len() as isize,
            "sendto: {}",
            std::io::Error::last_os_error()
        );
        Ok(())
    }
}

fn sockaddr(addr: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr.ip().octets()),
        },
        sin_zero: [0; 8],
    }
}

/// A 20-byte TCP SYN with a valid checksum.
pub fn syn(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    let mut tcp = Vec::with_capacity(20);
    tcp.extend(sport.to_be_bytes());
    tcp.extend(dport.to_be_bytes());
    tcp.extend(u32::from(sport).wrapping_mul(2_654_435_761).to_be_bytes()); // seq
    tcp.extend([0; 4]); // ack
    tcp.extend([5 << 4, 0x02]); // 5-word header, SYN
    tcp.extend(64240_u16.to_be_bytes());
    tcp.extend([0; 4]); // checksum (below), urgent pointer
    let words = |bytes: &[u8]| -> u32 {
        bytes
            .chunks_exact(2)
            .map(|w| match w {
                [hi, lo] => u32::from(u16::from_be_bytes([*hi, *lo])),
                _ => 0,
            })
            .sum()
    };
    // Pseudo-header: addresses, protocol, TCP length.
    let mut sum = words(&src.octets()) + words(&dst.octets()) + 6 + 20 + words(&tcp);
    while sum > 0xFFFF {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    if let Some(slot) = tcp.get_mut(16..18) {
        slot.copy_from_slice(&(!(sum as u16)).to_be_bytes());
    }
    tcp
}

/// nftables counters in a namespace, one per source address, for SYNs to a port: the
/// receiver's own count of what arrived.
#[derive(Debug)]
pub struct SynCounters<'a> {
    netns: &'a Netns,
    sources: Vec<Ipv4Addr>,
    port: u16,
}

impl<'a> SynCounters<'a> {
    /// Installs the counters (a private table, gone with the namespace).
    pub fn install(netns: &'a Netns, port: u16, sources: &[Ipv4Addr]) -> Result<Self> {
        netns.exec(&["nft", "add", "table", "inet", "p25t"])?;
        netns.exec(&[
            "nft",
            "add",
            "chain",
            "inet",
            "p25t",
            "count",
            "{ type filter hook prerouting priority -500; policy accept; }",
        ])?;
        for src in sources {
            netns.exec(&[
                "nft",
                "add",
                "rule",
                "inet",
                "p25t",
                "count",
                "ip",
                "saddr",
                &src.to_string(),
                "tcp",
                "dport",
                &port.to_string(),
                "tcp",
                "flags",
                "syn",
                "counter",
            ])?;
        }
        Ok(Self {
            netns,
            sources: sources.to_vec(),
            port,
        })
    }

    /// SYNs received from `src` so far.
    pub fn received(&self, src: Ipv4Addr) -> Result<u64> {
        ensure!(self.sources.contains(&src), "no counter for {src}");
        let listing = self
            .netns
            .exec(&["nft", "list", "chain", "inet", "p25t", "count"])?;
        let needle = format!("ip saddr {src} tcp dport {}", self.port);
        let line = listing
            .lines()
            .find(|l| l.contains(&needle))
            .with_context(|| format!("no counter line for {src} in:\n{listing}"))?;
        let packets = line
            .split_whitespace()
            .skip_while(|w| *w != "packets")
            .nth(1)
            .context("counter line without packets")?;
        Ok(packets.parse()?)
    }

    /// Waits until the counter for `src` stops moving (in-flight packets have landed).
    pub fn settled(&self, src: Ipv4Addr) -> Result<u64> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut last = self.received(src)?;
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
            let now = self.received(src)?;
            if now == last {
                return Ok(now);
            }
            last = now;
        }
        bail!("the counter for {src} kept moving for 5 s")
    }
}
