//! Every subcommand of p25d and p25ctl shows at least one example in `--help`, and the
//! hidden `__generate-docs` writes man pages and completions that never mention it.

use std::process::Command;

use anyhow::{Context as _, Result, ensure};
use p25_tests::daemon::bin;

/// The subcommands `BIN --help` lists (clap's "Commands:" block), without `help`.
fn subcommands(binary: &str) -> Result<Vec<String>> {
    let help = run(binary, &["--help"])?;
    let commands = help
        .split("Commands:")
        .nth(1)
        .with_context(|| format!("{binary} --help lists no commands:\n{help}"))?;
    Ok(commands
        .lines()
        .skip(1)
        .take_while(|line| line.starts_with("  "))
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_owned)
        .collect())
}

fn run(binary: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(bin(binary)?)
        .args(args)
        .output()
        .with_context(|| format!("running {binary}"))?;
    ensure!(
        out.status.success(),
        "{binary} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn every_subcommand_help_has_an_example() -> Result<()> {
    for binary in ["p25d", "p25ctl"] {
        let commands = subcommands(binary)?;
        ensure!(commands.len() >= 3, "{binary}: only {commands:?}");
        for command in &commands {
            let help = run(binary, &[command, "--help"])?;
            ensure!(
                help.contains("Example") && help.contains(&format!("{binary} ")),
                "`{binary} {command} --help` shows no example:\n{help}"
            );
        }
    }
    Ok(())
}

#[test]
fn generated_docs_cover_every_subcommand_and_hide_the_generator() -> Result<()> {
    let out = std::env::temp_dir().join(format!("p25t-docs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let result = (|| -> Result<()> {
        for binary in ["p25d", "p25ctl"] {
            run(binary, &["__generate-docs", &out.to_string_lossy()])?;
            for command in subcommands(binary)? {
                let page = out.join(format!("man8/{binary}-{command}.8"));
                ensure!(page.is_file(), "no {}", page.display());
            }
            for file in [
                format!("man8/{binary}.8"),
                format!("bash-completion/{binary}"),
                format!("zsh/_{binary}"),
                format!("fish/{binary}.fish"),
            ] {
                let text = std::fs::read_to_string(out.join(&file))
                    .with_context(|| format!("reading {file}"))?;
                ensure!(
                    !text.contains("generate-docs"),
                    "{file} mentions the hidden generator"
                );
            }
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&out);
    result
}
