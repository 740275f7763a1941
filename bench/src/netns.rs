//! Benchmark namespaces: the test suite's self-deleting namespaces
//! ([`p25_tests::netns::Netns`]: deleted on drop, also on error and panic; `enter`, `ip`,
//! `exec`, [`veth`]) under names `p25b-PID-N-ROLE`, unique to this process so that a
//! benchmark never touches anything it did not create, plus what only the benchmark needs.

use std::{
    ops::Deref,
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, Result};
pub use p25_tests::netns::veth;

use crate::sys;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns(p25_tests::netns::Netns);

impl Deref for Netns {
    type Target = p25_tests::netns::Netns;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Netns {
    /// Creates `p25b-PID-N-ROLE` with `lo` up.
    pub fn new(role: &str) -> Result<Self> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("p25b-{}-{n}-{role}", std::process::id());
        Ok(Self(p25_tests::netns::Netns::named(&name)?))
    }

    /// Runs a command with `ip netns exec`, which also remounts /sys for the namespace:
    /// needed to reach /sys/class/net/<dev> of the namespace's devices.
    pub fn exec_with_sys(&self, args: &[&str]) -> Result<String> {
        sys::run(
            Command::new("ip")
                .args(["netns", "exec", self.name()])
                .args(args),
        )
    }

    /// The interface index of `dev` in this namespace.
    pub fn ifindex(&self, dev: &str) -> Result<u32> {
        let out = self.ip(&["-o", "link", "show", "dev", dev])?;
        out.split(':')
            .next()
            .and_then(|n| n.trim().parse().ok())
            .with_context(|| format!("no ifindex for {dev} in {out:?}"))
    }

    /// The MAC address of `dev` in this namespace.
    pub fn mac(&self, dev: &str) -> Result<[u8; 6]> {
        let out = self.ip(&["-o", "link", "show", "dev", dev])?;
        let text = out
            .split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .with_context(|| format!("no MAC for {dev} in {out:?}"))?;
        let mut mac = [0_u8; 6];
        let mut parts = text.split(':');
        for byte in &mut mac {
            *byte = u8::from_str_radix(parts.next().unwrap_or(""), 16)
                .with_context(|| format!("bad MAC {text:?}"))?;
        }
        Ok(mac)
    }
}

/// Removes namespaces and pins left by a p25-bench that was killed (names carry the pid,
/// so only those of processes that no longer exist are touched).
pub fn sweep_stale() {
    sweep(
        |pid| !PathBuf::from(format!("/proc/{pid}")).exists(),
        &["p25b-"],
    );
}

/// Name prefixes of what this process creates: its own (`p25b-PID-*`), and those of the
/// test-suite labs the fleet section runs (`p25t-etcd-PID-*` for etcd's data,
/// `p25t-PID-*` for namespaces, pins and daemon directories). Only the first is swept
/// for processes that are gone: the others could belong to a test run.
const OWN_PREFIXES: &[&str] = &["p25b-", "p25t-etcd-", "p25t-"];

/// Removes every namespace, pin directory and temporary file of this process: what a
/// signal handler does before exiting (no destructor runs then).
pub fn sweep_own() {
    let me = std::process::id();
    sweep(|pid| pid == me, OWN_PREFIXES);
}

/// Removes the namespaces (`PREFIX-PID-*`: with them their veths, XDP links and nftables
/// tables), the pin directories (`/sys/fs/bpf/PREFIX-PID-*`) and the temporary files and
/// directories (`$TMPDIR/PREFIX-PID-*`) of the processes `select` picks, for each of
/// `prefixes` (the first that matches a name is the one whose PID is read).
fn sweep(select: impl Fn(u32) -> bool, prefixes: &[&str]) {
    let selected = |name: &str| {
        prefixes
            .iter()
            .find_map(|prefix| name.strip_prefix(prefix))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(&select)
    };
    if let Ok(list) = sys::cmd(&["ip", "netns", "list"]) {
        for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
            if selected(name) {
                eprintln!("p25-bench: removing namespace {name}");
                let _ = sys::cmd(&["ip", "netns", "del", name]);
            }
        }
    }
    for dir in [PathBuf::from("/sys/fs/bpf"), std::env::temp_dir()] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if selected(&name) {
                eprintln!("p25-bench: removing {}", entry.path().display());
                let path = entry.path();
                let _ = std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
            }
        }
    }
}
