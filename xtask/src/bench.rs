//! `cargo xtask bench`: builds the release binaries and runs `p25-bench` (crate `bench`).
//!
//! A benchmark, not a timed test: it prints a table and writes JSON, and never fails
//! because a figure misses its target (it fails only if it cannot measure).

use anyhow::{Context as _, Result};

use crate::{cmd, setup};

/// Options of `cargo xtask bench` (passed on to p25-bench).
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Smoke run: small maps and policy, few rounds and packets (not for the record).
    #[arg(long)]
    quick: bool,
    /// Rounds of the per-packet benchmark (K, at least 15 for the record).
    #[arg(long)]
    rounds: Option<usize>,
    /// Packets per BPF_PROG_TEST_RUN call (at least 1M for the record).
    #[arg(long)]
    repeat: Option<u32>,
    /// Runs per configuration of the throughput benchmark (at least 5 for the record).
    #[arg(long)]
    runs: Option<usize>,
    /// Most frames per throughput run.
    #[arg(long)]
    frames: Option<u32>,
    /// Aimed length of one throughput run, seconds.
    #[arg(long)]
    run_seconds: Option<f64>,
    /// Distinct sources of the many-source floods (at least 65,536 for the record).
    #[arg(long)]
    sources: Option<usize>,
    /// `p25ctl fleet allow` samples of the fleet section (at least 100 for the record).
    #[arg(long)]
    fleet_allows: Option<usize>,
    /// Only these sections: dataplane, throughput, control, fleet (comma-separated).
    #[arg(long)]
    only: Option<String>,
    /// Where to write the JSON report (default target/bench/bench.json).
    #[arg(long)]
    json: Option<String>,
}

/// Builds p25d/p25ctl and p25-bench in release mode, then runs the benchmark as root.
pub fn run(args: &Args) -> Result<()> {
    setup::run()?;
    // p25-bench runs the real daemon and CLI, found next to its own binary.
    cmd::run(cmd::cargo()?.args(["build", "--release", "--package", "filter-user", "--bins"]))
        .context("building p25d and p25ctl failed")?;
    cmd::run(cmd::cargo()?.args(["build", "--release", "--package", "p25-bench"]))
        .context("building p25-bench failed")?;
    let mut cargo = cmd::cargo()?;
    cargo.args([
        "run",
        "--quiet",
        "--release",
        "--package",
        "p25-bench",
        "--",
    ]);
    if args.quick {
        cargo.arg("--quick");
    }
    let numbers = [
        ("--rounds", args.rounds.map(|v| v.to_string())),
        ("--repeat", args.repeat.map(|v| v.to_string())),
        ("--runs", args.runs.map(|v| v.to_string())),
        ("--frames", args.frames.map(|v| v.to_string())),
        ("--run-seconds", args.run_seconds.map(|v| v.to_string())),
        ("--sources", args.sources.map(|v| v.to_string())),
        ("--fleet-allows", args.fleet_allows.map(|v| v.to_string())),
        ("--only", args.only.clone()),
        ("--json", args.json.clone()),
    ];
    for (flag, value) in numbers {
        if let Some(value) = value {
            cargo.arg(flag).arg(value);
        }
    }
    cmd::run(&mut cargo).context("the benchmark failed")
}
