//! Man pages and shell completions generated from the binaries' clap definitions.
//!
//! The CLI structs stay in the binaries (p25d, p25ctl); `p25d __generate-docs DIR` (same for
//! p25ctl) hands the binary's `clap::Command` to [`write`](fn@write) through [`generate_if_asked`].
//! It is deliberately not a clap subcommand, so that it appears neither in `--help` nor in
//! the completions. `cargo xtask package` runs both and ships the result, so the pages can
//! never disagree with `--help`.
//!
//! Layout under `DIR`, named as Debian installs them:
//!
//! ```text
//! man8/p25ctl.8  man8/p25ctl-allow.8 ...      one page per binary and per subcommand
//! bash-completion/p25ctl                       /usr/share/bash-completion/completions/
//! zsh/_p25ctl                                  /usr/share/zsh/vendor-completions/
//! fish/p25ctl.fish                             /usr/share/fish/vendor_completions.d/
//! ```

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
};

use clap_complete::{Generator, Shell};

/// The first argument that makes a binary write its docs instead of running.
pub const GENERATE_ARG: &str = "__generate-docs";

/// Why the man pages or completions could not be written.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Creating or writing one of the output files failed.
    #[error("writing {path}: {source} (is the output directory writable?)")]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// The man section of both binaries: system administration commands.
pub const MAN_SECTION: &str = "8";

/// If the binary was started as `BIN __generate-docs DIR`, writes the docs of `C` into
/// `DIR`, reports on stdout or stderr and returns the exit code; otherwise returns `None`
/// and the binary parses its arguments as usual.
pub fn generate_if_asked<C: clap::CommandFactory>() -> Option<std::process::ExitCode> {
    let mut args = std::env::args_os().skip(1);
    if args.next()? != GENERATE_ARG {
        return None;
    }
    let cmd = C::command();
    let name = cmd.get_name().to_owned();
    let Some(out) = args.next() else {
        eprintln!("{name}: usage: {name} {GENERATE_ARG} DIR");
        return Some(std::process::ExitCode::FAILURE);
    };
    match write(cmd, Path::new(&out)) {
        Ok(files) => {
            println!(
                "{name}: wrote {} files under {}",
                files.len(),
                out.display()
            );
            Some(std::process::ExitCode::SUCCESS)
        }
        Err(err) => {
            eprintln!("{name}: error: {err}");
            Some(std::process::ExitCode::FAILURE)
        }
    }
}

/// Writes the man pages (one per command and visible subcommand, section 8) and the bash,
/// zsh and fish completions of `cmd` under `out`. Returns the files written.
pub fn write(cmd: clap::Command, out: &Path) -> Result<Vec<PathBuf>, Error> {
    let name = cmd.get_name().to_owned();
    let mut cmd = cmd.disable_help_subcommand(true).bin_name(&name);
    // Builds the display names (`p25ctl-allow`) the subcommand pages are named after.
    cmd.build();
    let mut written = Vec::new();

    let man_dir = out.join(format!("man{MAN_SECTION}"));
    create_dir(&man_dir)?;
    write_pages(&cmd, &man_dir, &mut written)?;

    for (shell, dir, file) in [
        (Shell::Bash, "bash-completion", name.clone()),
        (Shell::Zsh, "zsh", format!("_{name}")),
        (Shell::Fish, "fish", format!("{name}.fish")),
    ] {
        let dir = out.join(dir);
        create_dir(&dir)?;
        let path = dir.join(file);
        let mut text = Vec::new();
        shell.generate(&cmd, &mut text);
        write_file(&path, &text)?;
        written.push(path);
    }
    Ok(written)
}

/// Writes the page of `cmd`, then those of its visible subcommands, recursively.
fn write_pages(cmd: &clap::Command, dir: &Path, written: &mut Vec<PathBuf>) -> Result<(), Error> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_pages(sub, dir, written)?;
    }
    let man = clap_mangen::Man::new(cmd.clone())
        .section(MAN_SECTION)
        .manual("p25 manual")
        .source(format!("p25 {}", env!("CARGO_PKG_VERSION")));
    let path = dir.join(man.get_filename());
    let mut text = Vec::new();
    man.render(&mut text).map_err(|source| Error::Write {
        path: path.clone(),
        source,
    })?;
    write_file(&path, &text)?;
    written.push(path);
    Ok(())
}

fn create_dir(dir: &Path) -> Result<(), Error> {
    fs::create_dir_all(dir).map_err(|source| Error::Write {
        path: dir.to_path_buf(),
        source,
    })
}

fn write_file(path: &Path, text: &[u8]) -> Result<(), Error> {
    fs::File::create(path)
        .and_then(|mut file| file.write_all(text))
        .map_err(|source| Error::Write {
            path: path.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, clap::Parser)]
    #[command(name = "demo")]
    struct Cli {
        #[command(subcommand)]
        command: Command,
    }

    #[derive(Debug, clap::Subcommand)]
    enum Command {
        /// Shown.
        #[command(after_help = "Examples:\n  demo shown --flag")]
        Shown {
            /// A flag.
            #[arg(long)]
            flag: bool,
        },
        /// Not shown.
        #[command(hide = true)]
        Hidden,
        /// Shown too.
        Other,
    }

    #[test]
    fn writes_pages_for_visible_subcommands_and_three_completions() -> anyhow::Result<()> {
        use clap::CommandFactory as _;
        let out = std::env::temp_dir().join(format!("p25-cli-docs-{}", std::process::id()));
        let _ = fs::remove_dir_all(&out);
        let written = write(Cli::command(), &out)?;
        let names: Vec<String> = written
            .iter()
            .filter_map(|p| p.strip_prefix(&out).ok())
            .map(|p| p.display().to_string())
            .collect();
        let page = fs::read_to_string(out.join("man8/demo-shown.8"))?;
        fs::remove_dir_all(&out)?;
        assert_eq!(
            names,
            [
                "man8/demo-shown.8",
                "man8/demo-other.8",
                "man8/demo.8",
                "bash-completion/demo",
                "zsh/_demo",
                "fish/demo.fish"
            ]
        );
        assert!(page.contains(".TH demo-shown 8"), "{page}");
        assert!(page.contains("demo shown \\-\\-flag"), "{page}");
        Ok(())
    }
}
