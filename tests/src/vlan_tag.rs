//! An 802.1Q-tagged link without the kernel's 8021q module: two four-instruction TC
//! programs, attached with tcx, push VLAN tag on egress and pop it on ingress. Put on both
//! ends of a veth pair (with VLAN TX offload off, so that the tag is written into the
//! frame rather than kept in packet metadata), every frame on that link carries the tag,
//! exactly as on a trunk port carrying one VLAN.
//!
//! Why not `ip link add ... type vlan`: the kernels this project runs on in CI are built
//! without CONFIG_VLAN_8021Q (and so without bridge VLAN filtering). The programs use the
//! kernel's own `bpf_skb_vlan_push` / `bpf_skb_vlan_pop` helpers. On the ingress side the
//! tag is popped at tcx ingress, which runs after XDP: an XDP program on the same
//! interface (p25_xdp) sees the tagged frame.
//!
//! The programs are assembled here as raw eBPF instructions and loaded with the bpf(2)
//! syscall, so the tests crate needs no second BPF object.

use std::{
    ffi::CString,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
};

use anyhow::{Context as _, Result, ensure};

use crate::netns::Netns;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;
const HELPER_SKB_VLAN_PUSH: i32 = 18;
const HELPER_SKB_VLAN_POP: i32 = 19;
/// tcx verdict "next": let any later program (and then the stack) have the packet.
const TCX_NEXT: i32 = -1;
/// Size of the bpf_attr buffer handed to the kernel: larger than every field we set, and
/// zero beyond them, which the kernel requires.
const ATTR_LEN: usize = 128;

/// One eBPF instruction: opcode, registers (dst low nibble, src high), offset, immediate.
pub(crate) const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> [u8; 8] {
    let off = off.to_le_bytes();
    let imm = imm.to_le_bytes();
    [
        code,
        (src << 4) | dst,
        off[0],
        off[1],
        imm[0],
        imm[1],
        imm[2],
        imm[3],
    ]
}

pub(crate) const MOV64_IMM: u8 = 0xb7;
const CALL: u8 = 0x85;
pub(crate) const EXIT: u8 = 0x95;

/// `bpf_skb_vlan_push(skb, htons(ETH_P_8021Q), vid); return TCX_NEXT;` (r1 holds skb).
fn push_program(vid: u16) -> Vec<[u8; 8]> {
    vec![
        // htons(0x8100) read as a little-endian u16.
        insn(MOV64_IMM, 2, 0, 0, 0x0081),
        insn(MOV64_IMM, 3, 0, 0, i32::from(vid)),
        insn(CALL, 0, 0, 0, HELPER_SKB_VLAN_PUSH),
        insn(MOV64_IMM, 0, 0, 0, TCX_NEXT),
        insn(EXIT, 0, 0, 0, 0),
    ]
}

/// `bpf_skb_vlan_pop(skb); return TCX_NEXT;`: a no-op on an untagged frame.
fn pop_program() -> Vec<[u8; 8]> {
    vec![
        insn(CALL, 0, 0, 0, HELPER_SKB_VLAN_POP),
        insn(MOV64_IMM, 0, 0, 0, TCX_NEXT),
        insn(EXIT, 0, 0, 0, 0),
    ]
}

fn put(attr: &mut [u8; ATTR_LEN], offset: usize, bytes: &[u8]) {
    if let Some(slot) = attr.get_mut(offset..offset + bytes.len()) {
        slot.copy_from_slice(bytes);
    }
}

fn bpf(cmd: libc::c_long, attr: &mut [u8; ATTR_LEN]) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a zero-initialised buffer of ATTR_LEN bytes laid out as the
    // kernel's union bpf_attr for `cmd`; every pointer stored in it points to memory the
    // caller keeps alive for the duration of the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), ATTR_LEN) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn fd_from(rc: libc::c_long) -> Result<OwnedFd> {
    let fd = i32::try_from(rc).context("bpf(2) returned an out-of-range descriptor")?;
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Loads `program` (raw instructions) as a program of `prog_type`, GPL-licensed.
pub(crate) fn load(name: &str, prog_type: u32, program: &[[u8; 8]]) -> Result<OwnedFd> {
    let code: Vec<u8> = program.iter().flatten().copied().collect();
    let license = CString::new("GPL")?;
    let mut log = vec![0_u8; 4096];
    let mut attr = [0_u8; ATTR_LEN];
    put(&mut attr, 0, &prog_type.to_ne_bytes());
    put(&mut attr, 4, &(program.len() as u32).to_ne_bytes());
    put(&mut attr, 8, &(code.as_ptr() as u64).to_ne_bytes());
    put(&mut attr, 16, &(license.as_ptr() as u64).to_ne_bytes());
    put(&mut attr, 24, &1_u32.to_ne_bytes()); // log_level
    put(&mut attr, 28, &(log.len() as u32).to_ne_bytes());
    put(&mut attr, 32, &(log.as_mut_ptr() as u64).to_ne_bytes());
    let mut prog_name = [0_u8; 16];
    for (slot, byte) in prog_name.iter_mut().zip(name.bytes().take(15)) {
        *slot = byte;
    }
    put(&mut attr, 48, &prog_name);
    match bpf(BPF_PROG_LOAD, &mut attr) {
        Ok(rc) => fd_from(rc),
        Err(error) => {
            let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
            let text = String::from_utf8_lossy(log.get(..end).unwrap_or_default());
            Err(error).with_context(|| format!("loading the {name} program: {text}"))
        }
    }
}

/// Attaches `prog` with a bpf link of `attach_type` (tcx, XDP) to `ifname` in the calling
/// thread's namespace.
pub(crate) fn attach(prog: &OwnedFd, ifname: &str, attach_type: u32) -> Result<OwnedFd> {
    let cname = CString::new(ifname)?;
    // SAFETY: a valid NUL-terminated name; the call only reads it.
    let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    ensure!(ifindex != 0, "no interface {ifname}");
    let mut attr = [0_u8; ATTR_LEN];
    put(&mut attr, 0, &(prog.as_raw_fd() as u32).to_ne_bytes());
    put(&mut attr, 4, &ifindex.to_ne_bytes());
    put(&mut attr, 8, &attach_type.to_ne_bytes());
    let rc = bpf(BPF_LINK_CREATE, &mut attr)
        .with_context(|| format!("attaching a program to {ifname} (attach type {attach_type})"))?;
    fd_from(rc)
}

/// The four tcx links that make `a_if` (in `a`) and `b_if` (in `b`) a VLAN-tagged link.
/// Dropping it detaches them (as does deleting either interface).
#[derive(Debug)]
pub struct TaggedLink {
    links: Vec<(String, OwnedFd)>,
}

impl TaggedLink {
    /// Tags every frame on the veth pair `a_if`/`b_if` with `vid`, both ways.
    pub fn new(a: &Netns, a_if: &str, b: &Netns, b_if: &str, vid: u16) -> Result<Self> {
        let push = load(
            "p25lab_vlan_push",
            BPF_PROG_TYPE_SCHED_CLS,
            &push_program(vid),
        )?;
        let pop = load("p25lab_vlan_pop", BPF_PROG_TYPE_SCHED_CLS, &pop_program())?;
        let mut links = Vec::new();
        for (netns, ifname) in [(a, a_if), (b, b_if)] {
            // Without TX VLAN offload the kernel writes the tag into the frame before
            // the veth hands it over, so the other end's XDP program sees it.
            netns.exec(&["ethtool", "-K", ifname, "txvlan", "off"])?;
            let (egress, ingress) = netns.enter(|| -> Result<(OwnedFd, OwnedFd)> {
                Ok((
                    attach(&push, ifname, BPF_TCX_EGRESS)?,
                    attach(&pop, ifname, BPF_TCX_INGRESS)?,
                ))
            })??;
            links.push((format!("{}-{ifname}-egress", netns.name()), egress));
            links.push((format!("{}-{ifname}-ingress", netns.name()), ingress));
        }
        Ok(Self { links })
    }

    /// Pins the links under `dir` (on bpffs) so that they outlive this process: for the
    /// demo's `--keep`. Removing the pins (or the interfaces) detaches them.
    pub fn pin(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        for (name, fd) in &self.links {
            let path = CString::new(dir.join(name).to_string_lossy().into_owned())?;
            let mut attr = [0_u8; ATTR_LEN];
            put(&mut attr, 0, &(path.as_ptr() as u64).to_ne_bytes());
            put(&mut attr, 8, &(fd.as_raw_fd() as u32).to_ne_bytes());
            bpf(BPF_OBJ_PIN, &mut attr)
                .with_context(|| format!("pinning a VLAN link at {}/{name}", dir.display()))?;
        }
        Ok(())
    }
}
