//! An XDP program that passes everything, for the subscriber's end of a veth pair whose
//! other end answers with XDP_TX (reject mode).
//!
//! Why: a veth delivers an XDP_TX'd frame into its peer's XDP ring, and the kernel only
//! kicks the peer's NAPI to drain that ring when the peer has an XDP program of its own
//! (`veth_xdp_flush`). Without one the frame is dropped (no NAPI at all: counted in the
//! sender's `xdp_tx_errors`) or, with GRO enabled on the peer, sits in the ring until some
//! other packet happens to wake the peer. A physical NIC has no such coupling: this is
//! lab plumbing, like [`crate::vlan_tag`].

use std::os::fd::OwnedFd;

use anyhow::Result;

use crate::{
    netns::Netns,
    vlan_tag::{EXIT, MOV64_IMM, attach, insn, load},
};

const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
const XDP_PASS: i32 = 2;

/// `return XDP_PASS;` attached (native mode) to an interface; detached on drop.
#[derive(Debug)]
pub struct XdpPass {
    _link: OwnedFd,
}

impl XdpPass {
    /// Attaches the program to `ifname` in `netns`.
    pub fn attach(netns: &Netns, ifname: &str) -> Result<Self> {
        let program = [insn(MOV64_IMM, 0, 0, 0, XDP_PASS), insn(EXIT, 0, 0, 0, 0)];
        let prog = load("p25lab_xdp_pass", BPF_PROG_TYPE_XDP, &program)?;
        let link = netns.enter(|| attach(&prog, ifname, BPF_XDP))??;
        Ok(Self { _link: link })
    }
}
