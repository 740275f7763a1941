//! Support code for the p25 integration tests (the tests themselves are in `tests/tests/`).
//!
//! - [`harness`]: load the real programs and run them with BPF_PROG_TEST_RUN.
//! - [`packet`]: build frames (VLAN, QinQ, PPPoE, IPv4 options, IPv6 extension headers).
//! - [`etcd`]: a real etcd server (temporary data, free ports) for the fleet tests.
//! - [`netns`]: network namespaces with cleanup on drop, for real-traffic tests.
//! - [`lab`]: the shared topology (subscriber, router, server) and its policy
//!   ([`lab_policy!`]); [`daemon`]: a real p25d and p25ctl per test; [`traffic`]: bounded
//!   SYN streams counted at the receiver; [`exporter`], [`prometheus`]: `/metrics` and a
//!   real Prometheus.
//! - [`abi_v3`]: real pinned state of ABI v3 (the object of commit 9e32a0e, loaded, filled
//!   and attached as its p25d did), for the migration tests.
//! - [`chaos`]: the reliability suite of `cargo xtask chaos` (faults under a SYN stream).
//! - [`smtp_lab`]: the SMTP lab (real swaks, aiosmtpd and p25d) of the e2e tests and the
//!   demo.
//! - [`vlan_tag`], [`veth_xdp`]: lab plumbing: an 802.1Q-tagged veth link without the 8021q
//!   module, and the XDP program a veth peer needs to receive XDP_TX'd frames (reject
//!   mode's RSTs).
//!
//! Small shared helpers live here: [`require_root`] and [`effective_uid`],
//! [`bpffs_mounted`], [`files_in`], [`summary!`].
//!
//! Every test here needs root (CAP_BPF and CAP_NET_ADMIN). Without it they fail with a
//! message saying so: they never skip, because a skipped kernel test proves nothing.

pub mod abi_v3;
pub mod chaos;
pub mod daemon;
pub mod demo;
pub mod etcd;
pub mod exporter;
pub mod harness;
pub mod lab;
pub mod netns;
pub mod packet;
pub mod pins;
pub mod prometheus;
pub mod smtp_lab;
pub mod traffic;
pub mod veth_xdp;
pub mod vlan_tag;

/// The effective uid of this process: the one root check of the tests, the demo, chaos
/// and bench binaries (xtask has its own, as it builds before anything that links aya).
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Fails the calling test unless it runs as root.
///
/// # Panics
///
/// When not root: that is the point.
#[track_caller]
pub fn require_root() {
    let euid = effective_uid();
    assert!(
        euid == 0,
        "p25's tests load eBPF programs and create network namespaces, so they must run \
         as root (euid is {euid}); run `cargo xtask test` as root"
    );
}

/// Whether a BPF filesystem is mounted at `path` (the usual place is /sys/fs/bpf): the
/// daemon's own check, so that tests and p25d agree.
pub fn bpffs_mounted(path: &std::path::Path) -> bool {
    filter_user::sys::bpffs_mounted(path)
}

/// The files in `dir` that `keep` accepts, sorted by path so that reports are stable.
///
/// # Errors
///
/// When `dir` cannot be listed; the message names it.
pub fn files_in(
    dir: &std::path::Path,
    keep: impl Fn(&std::path::Path) -> bool,
) -> anyhow::Result<Vec<std::path::PathBuf>> {
    use anyhow::Context as _;
    let listing = || format!("listing {}", dir.display());
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(listing)? {
        let path = entry.with_context(listing)?.path();
        if path.is_file() && keep(&path) {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Whether `path` ends in `.ext`.
pub fn has_extension(path: &std::path::Path, ext: &str) -> bool {
    path.extension().is_some_and(|e| e == ext)
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
