//! `p25-bench`: p25's benchmarks, normally run through `cargo xtask bench`.
//!
//! 1. dataplane: per-packet cost of `p25_xdp` and `p25_tc` under BPF_PROG_TEST_RUN, net
//!    of a trivial program of the same hook, per packet class (IPv4, IPv6, tags, PPPoE,
//!    extension headers), maps at full scale;
//! 2. throughput: floods through a veth into a router namespace pinned to one CPU, p25's
//!    XDP program against the floor of the same verdict in the same run: drop floods from
//!    one source (also against nftables) and from 65,536 rotating sources, pass floods
//!    from rotating allowlisted sources, IPv4 and IPv6;
//! 3. control: p25d loading and reconciling a 1M-entry policy (cold and as a 1% diff),
//!    the latency of one `p25ctl allow`, and the daemon's peak RSS;
//! 4. fleet: propagation latency of `p25ctl fleet allow` through one etcd to three p25d
//!    routers (p50 and p99 over 100 allows).
//!
//! The dataplane sections measure the maps as `p25d run` fills them from the generated
//! policy (the benchmark opens them through the daemon's pins), so they do not depend on
//! the map layout.
//!
//! Prints a table and writes JSON. Everything it creates (namespaces, pins, nft tables,
//! processes, temporary files) is removed on exit, also on failure and on SIGINT,
//! SIGTERM or SIGHUP; leftovers of a run killed otherwise are removed by the next one.

mod control;
mod daemon;
mod dataplane;
mod fleet;
mod floors;
mod netns;
mod report;
mod scale;
mod stats;
mod sys;
mod throughput;

use std::{collections::HashSet, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context as _, Result};
use clap::{Parser, ValueEnum};
use filter_user::Dataplane;

/// p25 benchmarks: dataplane cost per packet, veth drop throughput against nftables, and
/// the control plane at scale. Needs root.
#[derive(Debug, Parser)]
#[command(name = "p25-bench")]
struct Cli {
    /// Rounds of the per-packet benchmark (K; the issue asks for at least 15).
    #[arg(long, default_value_t = 15)]
    rounds: usize,
    /// Packets per BPF_PROG_TEST_RUN call in the per-packet benchmark.
    #[arg(long, default_value_t = 1_000_000)]
    repeat: u32,
    /// Runs per configuration of the throughput benchmark (at least 5 for the report).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Most frames the generator sends per throughput run.
    #[arg(long, default_value_t = 10_000_000)]
    frames: u32,
    /// Aimed length of one throughput run, seconds (sized from the warm-up rate).
    #[arg(long, default_value_t = 3.0)]
    run_seconds: f64,
    /// Distinct sources of the many-source floods (at most 131,072).
    #[arg(long, default_value_t = 65_536)]
    sources: usize,
    /// Single `p25ctl allow` latency samples.
    #[arg(long, default_value_t = 20)]
    allows: usize,
    /// `p25ctl fleet allow` samples of the fleet section (100 for the record).
    #[arg(long, default_value_t = 100)]
    fleet_allows: usize,
    /// Routers following the one etcd in the fleet section.
    #[arg(long, default_value_t = 3)]
    fleet_routers: usize,
    /// Smoke run: small maps and policy, few rounds and packets. Not for the record.
    #[arg(long)]
    quick: bool,
    /// Only these sections (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Section>,
    /// Where to write the JSON report.
    #[arg(long, default_value = "target/bench/bench.json")]
    json: PathBuf,
    /// Directory holding the release `p25d` and `p25ctl` (default: next to this binary).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

/// A benchmark section.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Section {
    /// Per-packet cost (BPF_PROG_TEST_RUN).
    Dataplane,
    /// Floods through veth against XDP_DROP / XDP_PASS floors and nftables.
    Throughput,
    /// p25d and p25ctl at scale.
    Control,
    /// Propagation of a fleet allow through etcd to every router.
    Fleet,
}

fn main() -> ExitCode {
    if let Err(err) = sys::on_signal_exit(|| {
        daemon::kill_all();
        // The fleet section's etcd and routers (children started by the test-suite lab).
        sys::kill_children();
        netns::sweep_own();
    }) {
        eprintln!("p25-bench: error: {err:#}");
        return ExitCode::FAILURE;
    }
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("p25-bench: error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

fn run(mut cli: Cli) -> Result<()> {
    sys::require_root()?;
    netns::sweep_stale();
    let wants = |s: Section| cli.only.is_empty() || cli.only.contains(&s);
    let scale = if cli.quick {
        cli.rounds = cli.rounds.min(3);
        cli.repeat = cli.repeat.min(100_000);
        cli.runs = cli.runs.min(2);
        cli.frames = cli.frames.min(1_000_000);
        cli.run_seconds = cli.run_seconds.min(0.3);
        cli.sources = cli.sources.min(4_096);
        cli.allows = cli.allows.min(5);
        cli.fleet_allows = cli.fleet_allows.min(10);
        scale::Scale::QUICK
    } else {
        scale::Scale::FULL
    };
    let cpus = sys::online_cpus();
    let bin_dir = match cli.bin_dir.clone() {
        Some(dir) => dir,
        None => std::env::current_exe()?
            .parent()
            .context("binary has no directory")?
            .to_path_buf(),
    };
    let mut report = report::Report::new(&cli_summary(&cli), scale)?;
    let needs_set =
        wants(Section::Dataplane) || wants(Section::Throughput) || wants(Section::Control);
    let set = if needs_set {
        eprintln!(
            "p25-bench: generating the policy ({} subscriber prefixes, {} allowlist entries)",
            scale.subscribers(),
            scale.allow()
        );
        scale::generate(scale, 0x5053_2525)?
    } else {
        // Only the fleet section, which brings its own policy: skip the big generation.
        scale::generate(scale::Scale::QUICK, 0x5053_2525)?
    };

    if wants(Section::Dataplane) || wants(Section::Throughput) {
        // p25d loads the policy into its pinned maps, as on a router; the benchmark opens
        // them through the pins with its own instance of the programs.
        eprintln!("p25-bench: loading the policy through p25d");
        let ns = netns::Netns::new("dp")?;
        netns::veth(&ns, "dp0", &ns, "dp1")?;
        let mut daemon = daemon::Daemon::start(
            &bin_dir,
            &ns,
            "dp",
            &scale::yaml(&set, "dp0", &HashSet::new()),
        )?;
        let log = daemon.wait_for_log("ready", Duration::from_secs(300))?;
        let in_force =
            daemon::log_time(&log, "policy in force").context("no 'policy in force' line")?;
        let seconds = in_force
            .duration_since(daemon.spawned)
            .map_or(0.0, |d| d.as_secs_f64());
        report.policy_load_seconds = Some(seconds);
        eprintln!("p25-bench: policy in force after {seconds:.2} s");
        let mut dataplane =
            Dataplane::open_pinned(&daemon.layout()).context("opening p25d's pinned maps")?;
        let mut bench = floors::BenchObject::load()?;
        if wants(Section::Dataplane) {
            eprintln!("p25-bench: dataplane cost per packet (BPF_PROG_TEST_RUN)");
            let opts = dataplane::Options {
                rounds: cli.rounds,
                repeat: cli.repeat,
                cpu: cpus.saturating_sub(1),
            };
            sys::pin_to_cpu(0, opts.cpu)?;
            report.dataplane = Some(dataplane::run(opts, &mut dataplane, &mut bench, &set)?);
        }
        if wants(Section::Throughput) {
            eprintln!("p25-bench: floods through veth (XDP floors, p25, nftables)");
            let opts = throughput::Options {
                runs: cli.runs,
                frames: cli.frames,
                run_seconds: cli.run_seconds,
                sources: cli.sources,
                dut_cpu: 0,
                gen_cpu: cpus.saturating_sub(1),
            };
            report.throughput = Some(throughput::run(opts, &mut dataplane, &mut bench, &set)?);
        }
        drop(dataplane);
        drop(daemon);
        drop(ns);
    }
    if wants(Section::Control) {
        eprintln!("p25-bench: control plane (p25d, p25ctl)");
        report.control = Some(control::run(
            &control::Options {
                bin_dir: bin_dir.clone(),
                allows: cli.allows,
            },
            &set,
        )?);
    }
    if wants(Section::Fleet) {
        eprintln!("p25-bench: fleet propagation (etcd, p25ctl fleet allow, routers' verdicts)");
        report.fleet = Some(fleet::run(&fleet::Options {
            bin_dir: bin_dir.clone(),
            allows: cli.fleet_allows,
            routers: cli.fleet_routers,
        })?);
    }
    report.finish();
    report.print();
    report.write_json(&cli.json)?;
    eprintln!("p25-bench: JSON written to {}", cli.json.display());
    Ok(())
}

fn cli_summary(cli: &Cli) -> String {
    format!("{cli:?}")
}
