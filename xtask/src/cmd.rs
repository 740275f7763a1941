//! Small helpers for running external commands.
//!
//! Every command that changes something is echoed before it runs, so an operator reading a
//! CI log can see (and copy-paste) exactly what xtask did. A failing command becomes an
//! error that names the command line and its exit status instead of a bare "exit 1".

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};

/// Root of the cargo workspace (the parent of this crate's directory).
///
/// Computed from the compile-time manifest dir so that `cargo xtask` behaves the same
/// whichever directory it is started from.
pub fn workspace_root() -> Result<PathBuf> {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map(Path::to_path_buf)
        .with_context(|| format!("xtask crate dir {} has no parent", manifest_dir.display()))
}

/// Cargo's target directory: `$CARGO_TARGET_DIR`, or `target` in the workspace root.
pub fn target_dir() -> Result<PathBuf> {
    Ok(std::env::var_os("CARGO_TARGET_DIR")
        .filter(|dir| !dir.is_empty())
        .map_or(workspace_root()?.join("target"), PathBuf::from))
}

/// A `cargo` command that runs from the workspace root.
///
/// Uses the very cargo binary that started us (`$CARGO`, set by `cargo run`), so the nested
/// builds use the same toolchain as the `cargo xtask` invocation itself.
pub fn cargo() -> Result<Command> {
    let program = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(program);
    cmd.current_dir(workspace_root()?);
    Ok(cmd)
}

/// Echoes `cmd`, runs it with inherited stdio and fails unless it exits successfully.
pub fn run(cmd: &mut Command) -> Result<()> {
    let line = display(cmd);
    println!("$ {line}");
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{line}` (is it installed and in PATH?)"))?;
    if !status.success() {
        bail!("command failed ({status}): {line}");
    }
    Ok(())
}

/// Runs `cmd` quietly and returns its stdout; on failure the error carries its stderr.
///
/// For read-only queries (versions, paths, lists) whose output we parse, so they are not
/// echoed: they would only clutter the "ok" lines of a no-op setup.
pub fn output(cmd: &mut Command) -> Result<String> {
    let line = display(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start `{line}` (is it installed and in PATH?)"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        bail!("command failed ({}): {line}\n{}", out.status, stderr.trim());
    }
    String::from_utf8(out.stdout).with_context(|| format!("`{line}` printed non-UTF-8 output"))
}

/// Renders `cmd` as a shell command line, including the environment changes made on it.
///
/// Removed variables are shown as `env -u NAME` so the printed line, pasted into a shell,
/// does what xtask did.
pub fn display(cmd: &Command) -> String {
    let mut words = Vec::new();
    let mut removed = Vec::new();
    let mut set = Vec::new();
    for (key, value) in cmd.get_envs() {
        match value {
            Some(value) => set.push(format!("{}={}", key.to_string_lossy(), quote(value))),
            None => removed.push(key.to_string_lossy().into_owned()),
        }
    }
    if !removed.is_empty() {
        words.push("env".to_owned());
        for key in removed {
            words.push("-u".to_owned());
            words.push(key);
        }
    }
    words.extend(set);
    words.push(quote(cmd.get_program()));
    words.extend(cmd.get_args().map(quote));
    words.join(" ")
}

/// Quotes one word for a POSIX shell, leaving plain words untouched for readability.
fn quote(word: &OsStr) -> String {
    let word = word.to_string_lossy();
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain {
        word.into_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_shows_env_changes_and_quotes() {
        let mut cmd = Command::new("cargo");
        cmd.args(["fmt", "--all", "it's here"])
            .env("A", "x y")
            .env_remove("RUSTC");
        assert_eq!(
            display(&cmd),
            r"env -u RUSTC A='x y' cargo fmt --all 'it'\''s here'"
        );
    }

    #[test]
    fn run_reports_failing_command_and_status() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "exit 3"]);
        let err = run(&mut cmd)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("exit status: 3"), "{err}");
        assert!(err.contains("sh -c 'exit 3'"), "{err}");
    }
}
