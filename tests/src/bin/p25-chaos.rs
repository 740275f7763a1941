//! The reliability suite: `cargo xtask chaos` builds everything and runs this (as root).
//!
//! Injects every fault of [`p25_tests::chaos`] into a running p25d under a SYN stream,
//! prints a table of the figures (SYNs lost and leaked, policy in force after invalid
//! reloads, recovery times), writes them as JSON, and exits non-zero if any invariant
//! failed.

use std::{fs, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context as _, Result};
use clap::Parser;
use p25_tests::chaos::{self, FaultReport, Plan};

/// Fault injection under a SYN stream, with figures.
#[derive(Debug, Parser)]
#[command(name = "p25-chaos")]
struct Args {
    /// The reduced plan of the test suite (every fault, fewer times) instead of the full one.
    #[arg(long)]
    reduced: bool,
    /// Override the number of policy reloads (alternating valid and invalid).
    #[arg(long)]
    reloads: Option<usize>,
    /// Override the number of kill -9 restarts.
    #[arg(long)]
    kills: Option<usize>,
    /// Override the number of interface flaps (each: down/up and delete/recreate).
    #[arg(long)]
    flaps: Option<usize>,
    /// Pause between two rounds of the SYN stream, in milliseconds.
    #[arg(long)]
    interval_ms: Option<u64>,
    /// Where to write the figures as JSON.
    #[arg(long, default_value = "target/chaos/chaos.json")]
    out: PathBuf,
}

fn main() -> ExitCode {
    match run(&Args::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(err) => {
            eprintln!("p25-chaos: error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<bool> {
    let mut plan = if args.reduced {
        Plan::reduced()
    } else {
        Plan::full()
    };
    plan.reloads = args.reloads.unwrap_or(plan.reloads);
    plan.kills = args.kills.unwrap_or(plan.kills);
    plan.flaps = args.flaps.unwrap_or(plan.flaps);
    if let Some(ms) = args.interval_ms {
        plan.interval = Duration::from_millis(ms);
    }
    println!("p25-chaos: {plan:?}");
    let report = chaos::run(&plan, &mut |fault: &FaultReport| {
        println!(
            "  {:<34} {} (lost {}, leaked {})",
            fault.fault,
            if fault.passed() { "ok" } else { "FAILED" },
            fault.lost(),
            fault.leaked()
        );
    })?;
    println!();
    print!("{}", report.table());
    if let Some(dir) = args.out.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::write(
        &args.out,
        serde_json::to_string_pretty(&report.record(&plan))?,
    )
    .with_context(|| format!("writing {}", args.out.display()))?;
    println!("figures written to {}", args.out.display());
    Ok(report.passed())
}
