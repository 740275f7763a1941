//! Support code for the p25 integration tests (the tests themselves are in `tests/tests/`).
//!
//! - [`harness`]: load the real programs and run them with BPF_PROG_TEST_RUN.
//! - [`packet`]: build frames (VLAN, QinQ, PPPoE, IPv4 options, IPv6 extension headers).
//! - [`etcd`]: a real etcd server (temporary data, free ports) for the fleet tests.
//! - [`netns`]: network namespaces with cleanup on drop, for real-traffic tests.
//! - [`chaos`]: the reliability suite of `cargo xtask chaos` (faults under a SYN stream).
//! - [`smtp_lab`]: the SMTP lab (real swaks, aiosmtpd and p25d) of the e2e tests and the
//!   demo.
//! - [`vlan_tag`], [`veth_xdp`]: lab plumbing: an 802.1Q-tagged veth link without the 8021q
//!   module, and the XDP program a veth peer needs to receive XDP_TX'd frames (reject
//!   mode's RSTs).
//!
//! Every test here needs root (CAP_BPF and CAP_NET_ADMIN). Without it they fail with a
//! message saying so: they never skip, because a skipped kernel test proves nothing.

pub mod chaos;
pub mod daemon;
pub mod etcd;
pub mod exporter;
pub mod harness;
pub mod lab;
pub mod netns;
pub mod packet;
pub mod prometheus;
pub mod smtp_lab;
pub mod traffic;
pub mod veth_xdp;
pub mod vlan_tag;

/// Fails the calling test unless it runs as root.
///
/// # Panics
///
/// When not root: that is the point.
#[track_caller]
pub fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "p25's tests load eBPF programs and create network namespaces, so they must run \
         as root (euid is {euid}); run `cargo xtask test` as root"
    );
}

/// Prints a summary line that stays visible in `cargo test` output even when the test
/// passes: libtest captures `print!`, not direct writes to the stderr handle.
#[macro_export]
macro_rules! summary {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}
