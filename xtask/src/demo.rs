//! `cargo xtask demo`: the lab that shows p25 doing its job with real SMTP.
//!
//! Runs setup, builds p25d, p25ctl and the demo (`tests/src/bin/p25-demo.rs`, which holds
//! the lab: xtask itself stays free of aya), runs it, and afterwards checks by name that
//! nothing of the lab is left: namespaces, pins, the scratch directory, processes.

use std::fs;
use std::path::Path;

use anyhow::{Context as _, Result, bail};

use crate::{cmd, setup};

/// Names the demo uses (kept in step with `p25_tests::smtp_lab`).
const NETNS_DIR: &str = "/run/netns";
const NETNS_PREFIX: &str = "p25demo-";
const LEFTOVER_PATHS: &[&str] = &[
    "/sys/fs/bpf/p25-demo",
    "/sys/fs/bpf/p25-demo-vlan",
    "/run/p25-demo",
];

/// What to do.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Run the demo and tear the lab down.
    #[default]
    Run,
    /// Run the demo and leave the lab up.
    Keep,
    /// Remove a lab left up by `--keep`.
    Down,
    /// The fleet demo (`tests/src/bin/p25-fleet-demo.rs`): two routers following one
    /// etcd. It names its namespaces and pins after its pid and checks itself that they are
    /// gone; the checks below (the SMTP demo's fixed names) still run.
    Fleet,
}

/// Runs the demo (after setup and a build) and, unless the lab is kept, verifies that it
/// left nothing behind.
pub fn run(mode: Mode) -> Result<()> {
    setup::run()?;
    cmd::run(cmd::cargo()?.args(["build", "--package", "filter-user", "--bins"]))
        .context("building p25d and p25ctl failed")?;
    let mut demo = cmd::cargo()?;
    demo.args([
        "run",
        "--quiet",
        "--package",
        "p25-tests",
        "--bin",
        if mode == Mode::Fleet {
            "p25-fleet-demo"
        } else {
            "p25-demo"
        },
        "--",
    ]);
    match mode {
        Mode::Run | Mode::Fleet => {}
        Mode::Keep => {
            demo.arg("--keep");
        }
        Mode::Down => {
            demo.arg("--down");
        }
    }
    let outcome = cmd::run(&mut demo).context("the demo failed");
    if mode != Mode::Keep {
        // Checked even when the demo failed: a failure must not leave the lab behind
        // either, and saying so helps more than the failure alone.
        let left = leftovers();
        if !left.is_empty() {
            bail!(
                "the demo left behind: {} (remove with `cargo xtask demo --down`){}",
                left.join(", "),
                outcome
                    .err()
                    .map(|e| format!("; also: {e:#}"))
                    .unwrap_or_default()
            );
        }
        println!("xtask demo: no lab namespaces, pins or processes left");
    }
    outcome
}

/// Namespaces, pin directories and processes of the demo that still exist.
fn leftovers() -> Vec<String> {
    let mut left = Vec::new();
    if let Ok(dir) = fs::read_dir(NETNS_DIR) {
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(NETNS_PREFIX) {
                left.push(format!("network namespace {name}"));
            }
        }
    }
    for path in LEFTOVER_PATHS {
        if Path::new(path).exists() {
            left.push((*path).to_owned());
        }
    }
    // Processes whose command line names the demo's state (p25d, the SMTP server).
    if let Ok(procs) = fs::read_dir("/proc") {
        for entry in procs.flatten() {
            let pid = entry.file_name().to_string_lossy().into_owned();
            if !pid.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if LEFTOVER_PATHS.iter().any(|p| cmdline.contains(p)) {
                left.push(format!("process {pid} ({})", cmdline.trim()));
            }
        }
    }
    left
}
