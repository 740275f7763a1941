//! `cargo xtask chaos`: the reliability suite, `p25-chaos` (`tests/src/bin/p25-chaos.rs`,
//! library `p25_tests::chaos`; xtask itself stays free of aya).
//!
//! Faults (policy reloads, kill -9, interface flaps, bpffs unmounted, concurrent p25ctl)
//! under a SYN stream counted at the receiver; prints a table, writes JSON (default
//! target/chaos/chaos.json) and fails if an invariant broke. `cargo xtask test` runs a
//! reduced plan of the same suite as a normal test (`tests/tests/chaos.rs`).

use anyhow::{Context as _, Result};

use crate::{cmd, setup};

/// Options of `cargo xtask chaos` (passed on to p25-chaos).
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The reduced plan of the test suite instead of the full one (not for the record).
    #[arg(long)]
    reduced: bool,
    /// Policy reloads, alternating valid and invalid (full plan: 100).
    #[arg(long)]
    reloads: Option<usize>,
    /// kill -9 restarts of p25d (full plan: 20).
    #[arg(long)]
    kills: Option<usize>,
    /// Flaps of the subscriber-facing interface, each a down/up and a delete/recreate
    /// (full plan: 5).
    #[arg(long)]
    flaps: Option<usize>,
    /// Where to write the figures as JSON (default target/chaos/chaos.json).
    #[arg(long)]
    json: Option<String>,
}

/// Builds p25d, p25ctl and p25-chaos, then runs the suite as root.
pub fn run(args: &Args) -> Result<()> {
    setup::run()?;
    // p25-chaos runs the real daemon and CLI, found next to its own binary.
    cmd::run(cmd::cargo()?.args(["build", "--package", "filter-user", "--bins"]))
        .context("building p25d and p25ctl failed")?;
    let mut cargo = cmd::cargo()?;
    cargo.args([
        "run",
        "--quiet",
        "--package",
        "p25-tests",
        "--bin",
        "p25-chaos",
        "--",
    ]);
    if args.reduced {
        cargo.arg("--reduced");
    }
    let options = [
        ("--reloads", args.reloads.map(|v| v.to_string())),
        ("--kills", args.kills.map(|v| v.to_string())),
        ("--flaps", args.flaps.map(|v| v.to_string())),
        ("--out", args.json.clone()),
    ];
    for (flag, value) in options {
        if let Some(value) = value {
            cargo.arg(flag).arg(value);
        }
    }
    cmd::run(&mut cargo).context("the reliability suite failed (see the table above)")
}
