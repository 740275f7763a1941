//! `cargo xtask package`: the Debian package, built with cargo-deb.
//!
//! What goes into it is declared in filter-user/Cargo.toml (`[package.metadata.deb]`);
//! install, upgrade and purge behaviour lives in deploy/debian/{postinst,prerm,postrm}.
//! This task builds the release binaries, generates what the package ships besides them
//! (man pages and completions from the binaries' clap definitions, p25-policy(5) from
//! docs/policy.md) under `<target>/release/p25-docs`, then runs cargo-deb without letting
//! it rebuild.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail, ensure};

use crate::{cmd, manpage, setup};

/// Arguments of `cargo xtask package`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where to write the .deb (a directory); default `<target>/debian`.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Builds the package and returns the path of the .deb.
pub fn run(args: &Args) -> Result<PathBuf> {
    setup::run()?;
    cmd::run(cmd::cargo()?.args(["build", "--release", "--package", "filter-user", "--bins"]))
        .context("building the release binaries failed")?;
    let release = cmd::target_dir()?.join("release");
    let docs = release.join("p25-docs");
    generate_docs(&release, &docs)?;

    let out = match &args.out {
        Some(dir) => dir.clone(),
        None => cmd::target_dir()?.join("debian"),
    };
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let mut deb = cmd::cargo()?;
    deb.args(["deb", "--package", "filter-user", "--no-build", "--output"])
        .arg(&out);
    println!("$ {}", cmd::display(&deb));
    let printed = cmd::output(&mut deb).context("cargo deb failed")?;
    // cargo-deb prints the path of the package it wrote as its last line.
    let path = printed
        .lines()
        .rev()
        .map(str::trim)
        .find(|line| line.ends_with(".deb"))
        .map(PathBuf::from)
        .with_context(|| format!("cargo deb printed no .deb path:\n{printed}"))?;
    ensure!(
        path.is_file(),
        "cargo deb reported {} but there is no such file",
        path.display()
    );
    println!("package: {}", path.display());
    Ok(path)
}

/// Man pages (gzipped, as Debian installs them) and completions under `docs`.
fn generate_docs(release: &Path, docs: &Path) -> Result<()> {
    if docs.exists() {
        fs::remove_dir_all(docs).with_context(|| format!("removing stale {}", docs.display()))?;
    }
    for bin in ["p25d", "p25ctl"] {
        cmd::run(
            Command::new(release.join(bin))
                .arg("__generate-docs")
                .arg(docs),
        )
        .with_context(|| format!("{bin} could not write its man pages and completions"))?;
    }
    let policy_md = cmd::workspace_root()?.join("docs/policy.md");
    let markdown = fs::read_to_string(&policy_md)
        .with_context(|| format!("reading {}", policy_md.display()))?;
    let man5 = docs.join("man5");
    fs::create_dir_all(&man5).with_context(|| format!("creating {}", man5.display()))?;
    let page = manpage::render(
        &markdown,
        "p25-policy",
        "5",
        "the p25 policy file, /etc/p25/policy.yaml",
        &changelog_date()?,
    );
    let policy_page = man5.join("p25-policy.5");
    fs::write(&policy_page, page).with_context(|| format!("writing {}", policy_page.display()))?;

    let mut pages = Vec::new();
    for section in ["man5", "man8"] {
        let dir = docs.join(section);
        for entry in fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
            pages.push(
                entry
                    .with_context(|| format!("listing {}", dir.display()))?
                    .path(),
            );
        }
    }
    if pages.is_empty() {
        bail!("no man pages were generated under {}", docs.display());
    }
    // -n: no name or time stamp inside, so that the package is reproducible (lintian).
    cmd::run(Command::new("gzip").args(["-9nf"]).args(&pages)).context("compressing man pages")
}

/// The date of the newest entry of deploy/debian/changelog as YYYY-MM-DD, for the man
/// page footers: a fixed date keeps the package reproducible.
fn changelog_date() -> Result<String> {
    let path = cmd::workspace_root()?.join("deploy/debian/changelog");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let line = text
        .lines()
        .find(|l| l.starts_with(" -- "))
        .with_context(|| format!("{}: no ` -- maintainer  date` line", path.display()))?;
    // ` -- Name <mail>  Fri, 04 Dec 2026 12:00:00 +0000`
    let date = line
        .rsplit("  ")
        .next()
        .with_context(|| format!("{}: no date in {line:?}", path.display()))?;
    parse_rfc2822_date(date)
        .with_context(|| format!("{}: cannot read the date {date:?}", path.display()))
}

fn parse_rfc2822_date(date: &str) -> Option<String> {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let mut words = date.split_whitespace().skip(1);
    let day: u8 = words.next()?.parse().ok()?;
    let month = words.next()?;
    let month = MONTHS.iter().position(|m| *m == month)? + 1;
    let year: u16 = words.next()?.parse().ok()?;
    Some(format!("{year:04}-{month:02}-{day:02}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changelog_dates_become_iso_dates() {
        assert_eq!(
            parse_rfc2822_date("Fri, 04 Dec 2026 12:00:00 +0000").as_deref(),
            Some("2026-12-04")
        );
        assert_eq!(parse_rfc2822_date("Fri, 04 Foo 2026 12:00:00 +0000"), None);
    }

    #[test]
    fn the_changelog_has_a_date() -> Result<()> {
        assert!(changelog_date()?.starts_with("20"));
        Ok(())
    }
}
