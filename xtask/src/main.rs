//! `cargo xtask`: the one entry point for setting up, building, linting and testing p25.
//!
//! CI and the README both use `cargo xtask test`, so what a developer runs locally is
//! exactly what CI runs.

mod bench;
mod chaos;
mod cmd;
mod demo;
mod fuzz;
mod manpage;
mod package;
mod setup;

use std::process::ExitCode;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};

/// Developer tasks for p25, the eBPF port-25 filter.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install build and test prerequisites and mount the BPF filesystem (needs root).
    ///
    /// Installs nightly rust-src, bpf-linker (built against nightly's LLVM) and the Debian
    /// packages the tests call, and mounts bpffs at /sys/fs/bpf. Each step only acts when
    /// needed, so this is fast and safe to run every time.
    Setup,
    /// Run setup, then build every crate and target of the workspace.
    Build {
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
    },
    /// Run setup, check formatting, run clippy, then run the whole test suite as root.
    Test {
        /// Skip the formatting check and clippy (for quick local loops).
        #[arg(long)]
        no_lint: bool,
        /// Extra arguments for `cargo test`, after `--` (e.g. `-- differential`).
        #[arg(last = true)]
        cargo_test_args: Vec<String>,
    },
    /// The main command: a lab that shows p25 doing its job, with real SMTP (needs root).
    ///
    /// Runs setup, builds everything, creates network namespaces (subscribers, a spam bot,
    /// an allowlisted business, dual-stack and VLAN subscribers, a border router running
    /// p25d with policies/lab.yaml, an internet mail server on 25, 587 and 465), has every
    /// subscriber send mail with swaks and prints what happened, then shows `p25ctl top`,
    /// /metrics, `p25ctl allow`/`deny` and monitor mode. Exits non-zero if p25 misbehaved.
    /// Tears everything down at the end, and checks that nothing is left.
    ///
    /// With --fleet: two border routers following one etcd instead (docs/fleet.md): a
    /// fleet allow and deny taking effect on both, then etcd stopped while both keep
    /// filtering.
    Demo {
        /// Leave the lab up for exploring (remove it later with --down).
        #[arg(long, conflicts_with = "down")]
        keep: bool,
        /// Remove a lab left up by --keep (or by an interrupted run), then exit.
        #[arg(long)]
        down: bool,
        /// The fleet demo: two routers, one etcd (always torn down at the end).
        #[arg(long, conflicts_with_all = ["keep", "down"])]
        fleet: bool,
    },
    /// Run setup, then check formatting and run clippy.
    ///
    /// Setup is needed because clippy runs filter-user's build script, which builds the
    /// eBPF object with bpf-linker.
    Lint,
    /// Run setup, build release binaries, then run the benchmarks as root.
    ///
    /// Per-packet cost (BPF_PROG_TEST_RUN), veth drop throughput against an XDP_DROP floor
    /// and nftables, and the control plane at scale. Prints a table and writes JSON
    /// (target/bench/bench.json).
    Bench(bench::Args),
    /// Run setup, build, then the reliability suite as root (faults under a SYN stream).
    ///
    /// 100 policy reloads (valid and invalid alternating), 20 kill -9 restarts of p25d, 5
    /// flaps of the subscriber interface (down/up, delete/recreate), a start with bpffs
    /// unmounted and 4 concurrent p25ctl clients, under a SYN stream counted at the
    /// receiver. Prints a table, writes JSON (target/chaos/chaos.json) and exits non-zero
    /// if a blocked SYN leaked, an allowlisted or 587 SYN was lost, or an invalid policy
    /// replaced the one in force.
    Chaos(chaos::Args),
    /// Run setup, then the cargo-fuzz targets (policy parser, reference classifier, control
    /// request handler) for a bounded time each (installs cargo-fuzz if needed; uses
    /// nightly).
    ///
    /// A crash leaves its input in fuzz/artifacts/<target>/; once fixed, keep it in
    /// fuzz/regressions/<target>/, which `cargo test` replays without libFuzzer.
    Fuzz(fuzz::Args),
    /// Run setup, build release binaries, then the Debian package with cargo-deb.
    ///
    /// p25d and p25ctl in /usr/sbin, the systemd unit (installed, not enabled), a
    /// sysusers.d entry, a policy that filters nothing as the /etc/p25/policy.yaml
    /// conffile, man pages, completions, Prometheus rules and the Grafana dashboard.
    /// Prints the path of the .deb (default directory: <target>/debian).
    Package(package::Args),
}

fn main() -> ExitCode {
    match run(Cli::parse().task) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // Printed by hand rather than returned from main: anyhow's Debug output adds a
            // stack backtrace whenever RUST_BACKTRACE is set, which only buries the message
            // an operator needs.
            eprintln!("error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

fn run(task: Task) -> Result<()> {
    match task {
        Task::Setup => setup::run(),
        Task::Build { release } => build(release),
        Task::Test {
            no_lint,
            cargo_test_args,
        } => test(no_lint, &cargo_test_args),
        Task::Lint => {
            setup::run()?;
            lint()
        }
        Task::Bench(args) => bench::run(&args),
        Task::Chaos(args) => chaos::run(&args),
        Task::Fuzz(args) => fuzz::run(&args),
        Task::Package(args) => package::run(&args).map(drop),
        Task::Demo { keep, down, fleet } => demo::run(match (keep, down, fleet) {
            (_, _, true) => demo::Mode::Fleet,
            (_, true, false) => demo::Mode::Down,
            (true, false, false) => demo::Mode::Keep,
            (false, false, false) => demo::Mode::Run,
        }),
    }
}

/// Every host crate of the workspace: filter-ebpf and bench-ebpf only build for the BPF
/// target (filter-user's and bench's build scripts build them), so build, clippy and test
/// leave them out.
const HOST_CRATES: [&str; 5] = [
    "--workspace",
    "--exclude",
    "filter-ebpf",
    "--exclude",
    "bench-ebpf",
];

fn build(release: bool) -> Result<()> {
    setup::run()?;
    let mut cargo = cmd::cargo()?;
    cargo.arg("build").args(HOST_CRATES).arg("--all-targets");
    if release {
        cargo.arg("--release");
    }
    cmd::run(&mut cargo).context("build failed")
}

fn test(no_lint: bool, cargo_test_args: &[String]) -> Result<()> {
    setup::run()?;
    if !no_lint {
        lint()?;
    }
    let mut cargo = cmd::cargo()?;
    cargo
        // --no-fail-fast: one failing test binary must not hide failures in the others.
        .arg("test")
        .args(HOST_CRATES)
        .arg("--no-fail-fast")
        // The privileged tests never skip: without root they fail with a message saying
        // so, because a skipped kernel test proves nothing.
        .args(cargo_test_args);
    cmd::run(&mut cargo).context("tests failed")?;
    // Each fuzz target for a bounded time (the crashes once found are replayed by
    // `cargo test` above): about 3 × 30 s plus the first build (~8 min on 2 cores, cached).
    fuzz::run(&fuzz::Args {
        seconds: 30,
        target: None,
    })
    .context("fuzzing (cargo xtask fuzz) failed")?;
    // The README's main command is tested as such: it must pass and leave nothing behind.
    demo::run(demo::Mode::Run).context("the demo (cargo xtask demo) failed")?;
    demo::run(demo::Mode::Fleet).context("the fleet demo (cargo xtask demo --fleet) failed")?;
    println!("xtask test: all steps passed");
    Ok(())
}

/// The formatting check and clippy, shared by `lint` and `test`.
fn lint() -> Result<()> {
    cmd::run(cmd::cargo()?.args(["fmt", "--all", "--", "--check"]))
        .context("formatting check failed; run `cargo fmt --all` to fix it")?;
    cmd::run(cmd::cargo()?.arg("clippy").args(HOST_CRATES).args([
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))
    .context("clippy found problems")?;
    // The eBPF crates are linted as what they are: no_std programs for the BPF target, built by
    // nightly with build-std (host clippy would lint a binary that can never exist).
    let mut ebpf = std::process::Command::new("rustup");
    ebpf.current_dir(cmd::workspace_root()?)
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .args([
            "run",
            "nightly",
            "cargo",
            "clippy",
            "--package",
            "filter-ebpf",
            "--package",
            "bench-ebpf",
        ])
        .args([
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--release",
        ])
        .args(["--", "-D", "warnings"]);
    cmd::run(&mut ebpf).context("clippy found problems in the eBPF crate")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn test_passes_trailing_args_to_cargo_test() -> Result<()> {
        let cli = Cli::try_parse_from(["xtask", "test", "--no-lint", "--", "differential"])?;
        let Task::Test {
            no_lint,
            cargo_test_args,
        } = cli.task
        else {
            anyhow::bail!("parsed as {:?}", cli.task);
        };
        assert!(no_lint);
        assert_eq!(cargo_test_args, ["differential"]);
        Ok(())
    }
}
