//! Replays the fuzz targets' kept inputs without libFuzzer or nightly: every file under
//! `fuzz/regressions/<target>/` (crashes once found, fixed since) and `fuzz/seeds/<target>/`
//! goes through the very checks the fuzz targets run (`fuzz/src/lib.rs`, compiled here as a
//! module), so a regression fails `cargo test`.

use std::{
    fs,
    panic::{AssertUnwindSafe, catch_unwind},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, ensure};

#[path = "../../fuzz/src/lib.rs"]
mod checks;

/// Runs `check` on every file of `fuzz/{regressions,seeds}/<target>/`; fails naming each
/// file whose check panicked.
fn replay(target: &str, check: fn(&[u8])) -> Result<()> {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut files: Vec<PathBuf> = Vec::new();
    for kind in ["regressions", "seeds"] {
        let dir = fuzz.join(kind).join(target);
        if dir.is_dir() {
            files.extend(p25_tests::files_in(&dir, |path| {
                path.file_name().is_some_and(|n| n != "README.md")
            })?);
        }
    }
    ensure!(
        !files.is_empty(),
        "no inputs for {target} under {}",
        fuzz.display()
    );
    let mut failed = Vec::new();
    for path in &files {
        let data = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        if catch_unwind(AssertUnwindSafe(|| check(&data))).is_err() {
            failed.push(path.display().to_string());
        }
    }
    p25_tests::summary!("fuzz {target}: {} kept inputs replayed", files.len());
    ensure!(
        failed.is_empty(),
        "{target}: these inputs fail again: {failed:?}"
    );
    Ok(())
}

#[test]
fn policy_parser_regressions() -> Result<()> {
    replay("policy", checks::policy)
}

#[test]
fn classifier_regressions() -> Result<()> {
    replay("classifier", checks::classifier)
}

#[test]
fn control_handler_regressions() -> Result<()> {
    replay("control", checks::control)
}
