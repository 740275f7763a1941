//! `cargo xtask fuzz`: runs the cargo-fuzz targets of `fuzz/` for a bounded time each.
//!
//! Targets: `policy` (the policy parser on arbitrary bytes) and `classifier` (the
//! reference classifier on arbitrary frames under a fuzzer-chosen policy) and `control`
//! (p25d's control-socket request handler on arbitrary request lines); their checks are
//! in `fuzz/src/lib.rs`. Each starts from the kept inputs (`fuzz/seeds/<target>/`,
//! `fuzz/regressions/<target>/`) plus a local corpus (`fuzz/corpus/<target>/`, not
//! committed). A crash leaves its input in `fuzz/artifacts/<target>/`: fix the code, then
//! keep the input in `fuzz/regressions/<target>/`, which `cargo test` replays
//! (`tests/tests/fuzz_regressions.rs`) without libFuzzer.
//!
//! cargo-fuzz needs nightly (`-Z` sanitizer flags) and is installed on demand.

use std::{fs, process::Command};

use anyhow::{Context as _, Result, bail};

use crate::{cmd, setup};

/// The fuzz targets, in the order they run.
pub const TARGETS: [&str; 3] = ["policy", "classifier", "control"];

/// Pinned: 0.13.2 builds with the toolchains here (newer releases may need a newer rustc).
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Options of `cargo xtask fuzz`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Seconds of fuzzing per target (after the build).
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Only this target (policy, classifier or control); all of them by default.
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(TARGETS))]
    pub target: Option<String>,
}

/// Runs setup, installs cargo-fuzz if needed, then fuzzes each target for `seconds`.
pub fn run(args: &Args) -> Result<()> {
    setup::run()?;
    ensure_cargo_fuzz()?;
    let root = cmd::workspace_root()?;
    let fuzz_dir = root.join("fuzz");
    // Inside the workspace's (ignored) target directory, not fuzz/target.
    let target_dir = cmd::target_dir()?.join("fuzz");
    let targets: Vec<&str> = match &args.target {
        Some(one) => vec![one.as_str()],
        None => TARGETS.to_vec(),
    };
    for target in targets {
        let corpus = fuzz_dir.join("corpus").join(target);
        fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
        let mut fuzz = nightly_cargo(&fuzz_dir);
        fuzz.args(["fuzz", "run", target, "--target-dir"])
            .arg(&target_dir)
            .arg(&corpus);
        // Read-only seed directories: libFuzzer writes new inputs to the first one only.
        for kind in ["seeds", "regressions"] {
            let dir = fuzz_dir.join(kind).join(target);
            if dir.is_dir() {
                fuzz.arg(dir);
            }
        }
        if target == "policy" {
            // The rejected-policy corpus of the parser's own tests.
            fuzz.arg(root.join("tests/policies/bad"));
        }
        fuzz.arg("--").args([
            format!("-max_total_time={}", args.seconds),
            // The filter-user crate is large under ASan; the default 2 GB is tight.
            "-rss_limit_mb=4096".to_owned(),
        ]);
        cmd::run(&mut fuzz).with_context(|| {
            format!(
                "fuzz target {target} failed: its input is in fuzz/artifacts/{target}/; fix \
                 the code, then keep the input in fuzz/regressions/{target}/"
            )
        })?;
    }
    println!("xtask fuzz: no crash in {} s per target", args.seconds);
    Ok(())
}

/// `cargo` of the nightly toolchain, run in `dir` (like the eBPF lint: rustup picks the
/// toolchain, so the environment of the stable cargo running xtask must not leak in).
fn nightly_cargo(dir: &std::path::Path) -> Command {
    let mut cargo = Command::new("rustup");
    cargo
        .current_dir(dir)
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .args(["run", "nightly", "cargo"]);
    cargo
}

/// Installs cargo-fuzz unless a working one is in PATH.
fn ensure_cargo_fuzz() -> Result<()> {
    let probe = cmd::output(nightly_cargo(&cmd::workspace_root()?).args(["fuzz", "--version"]));
    if let Ok(version) = probe {
        println!("setup: cargo-fuzz: {}", version.trim());
        return Ok(());
    }
    println!("setup: cargo-fuzz: missing; installing {CARGO_FUZZ_VERSION} (takes ~2 min)");
    let mut install = nightly_cargo(&cmd::workspace_root()?);
    install.args([
        "install",
        "--locked",
        "cargo-fuzz",
        "--version",
        CARGO_FUZZ_VERSION,
    ]);
    cmd::run(&mut install).context("installing cargo-fuzz failed")?;
    if cmd::output(nightly_cargo(&cmd::workspace_root()?).args(["fuzz", "--version"])).is_err() {
        bail!(
            "cargo-fuzz was installed but `cargo fuzz --version` still fails (is ~/.cargo/bin in PATH?)"
        );
    }
    Ok(())
}
