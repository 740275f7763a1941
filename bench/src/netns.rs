//! Network namespaces that delete themselves (also on error and panic), veth pairs, and
//! running code or commands inside a namespace. Names are `p25b-PID-N-ROLE`, unique to
//! this process, so a benchmark never touches anything it did not create.

use std::{
    fs::File,
    io,
    os::fd::AsRawFd as _,
    path::PathBuf,
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, Result, bail};

use crate::sys;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `p25b-PID-N-ROLE` with `lo` up.
    pub fn new(role: &str) -> Result<Self> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("p25b-{}-{n}-{role}", std::process::id());
        sys::cmd(&["ip", "netns", "add", &name])?;
        let netns = Self { name };
        netns.ip(&["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    /// The name `ip netns` knows.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace file.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `ip -n NAME ARGS...`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        sys::run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// Runs a command inside the namespace with `nsenter --net` (which keeps the host's
    /// /sys/fs/bpf in view).
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        sys::run(
            Command::new("nsenter")
                .arg(format!("--net={}", self.path().display()))
                .arg("--")
                .args(args),
        )
    }

    /// Runs a command with `ip netns exec`, which also remounts /sys for the namespace:
    /// needed to reach /sys/class/net/<dev> of the namespace's devices.
    pub fn exec_with_sys(&self, args: &[&str]) -> Result<String> {
        sys::run(
            Command::new("ip")
                .args(["netns", "exec", &self.name])
                .args(args),
        )
    }

    /// Runs `f` on this thread inside the namespace, then returns the thread to where it
    /// was, also if `f` panics.
    pub fn enter<T>(&self, f: impl FnOnce() -> T) -> Result<T> {
        let original = File::open("/proc/thread-self/ns/net").context("opening own netns")?;
        let target = File::open(self.path())
            .with_context(|| format!("opening {}", self.path().display()))?;
        setns(&target).with_context(|| format!("entering netns {}", self.name))?;
        let _restore = Restore(original);
        Ok(f())
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

impl Drop for Netns {
    fn drop(&mut self) {
        // Best effort; deleting the namespace also deletes its interfaces, and with them
        // any XDP attachment and qdisc.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

struct Restore(File);

impl Drop for Restore {
    fn drop(&mut self) {
        if let Err(error) = setns(&self.0) {
            // Going on in the wrong namespace would act on the wrong interfaces.
            eprintln!("cannot return to the original network namespace: {error}; aborting");
            std::process::abort();
        }
    }
}

fn setns(ns: &File) -> io::Result<()> {
    // SAFETY: setns on a descriptor we own; affects only this thread's netns.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Removes namespaces and pins left by a p25-bench that was killed (names carry the pid,
/// so only those of processes that no longer exist are touched).
pub fn sweep_stale() {
    let Ok(list) = sys::cmd(&["ip", "netns", "list"]) else {
        return;
    };
    let dead = |name: &str| {
        name.strip_prefix("p25b-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| !PathBuf::from(format!("/proc/{pid}")).exists())
    };
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        if dead(name) {
            eprintln!("p25-bench: removing stale namespace {name}");
            let _ = sys::cmd(&["ip", "netns", "del", name]);
        }
    }
    if let Ok(entries) = std::fs::read_dir("/sys/fs/bpf") {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if dead(&name) {
                eprintln!("p25-bench: removing stale pins {name}");
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// A veth pair `a_if` (in `a`) / `b_if` (in `b`), both up.
pub fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> Result<()> {
    for name in [a_if, b_if] {
        if name.is_empty() || name.len() > 15 {
            bail!("interface name {name:?} must be 1 to 15 bytes");
        }
    }
    a.ip(&[
        "link",
        "add",
        a_if,
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ])?;
    a.ip(&["link", "set", a_if, "up"])?;
    b.ip(&["link", "set", b_if, "up"])?;
    Ok(())
}
