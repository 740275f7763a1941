//! The policy checker against files: a corpus of broken policies, each stating on its
//! first line the diagnostic it must produce (`# expect: LINE:COLUMN: substring`), and the
//! example policies shipped in `policies/`, which must be valid.
//!
//! These tests need no privileges: they only parse text.

use std::{
    fmt::Write as _,
    fs,
    net::Ipv6Addr,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail, ensure};
use filter_common::abi::SUBSCRIBERS_MAX_ENTRIES;
use filter_user::policy::{self, Diagnostic, PolicyError};
use ipnet::IpNet;

/// The fewest broken policies the corpus may hold: every rule needs at least one.
const CORPUS_MIN_FILES: usize = 30;

fn crate_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The `.yaml` files in `dir`, sorted so that the report is stable.
fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>> {
    p25_tests::files_in(dir, |path| p25_tests::has_extension(path, "yaml"))
}

fn name_of(path: &Path) -> String {
    path.file_name()
        .map_or_else(String::new, |name| name.to_string_lossy().into_owned())
}

/// What a corpus file's first line says it must produce.
struct Expectation {
    line: usize,
    column: usize,
    needle: String,
}

fn expectation(text: &str) -> Result<Expectation> {
    let first = text.lines().next().unwrap_or_default();
    let rest = first
        .strip_prefix("# expect: ")
        .context("the first line must be `# expect: LINE:COLUMN: substring`")?;
    let mut parts = rest.splitn(3, ':');
    let (Some(line), Some(column), Some(needle)) = (parts.next(), parts.next(), parts.next())
    else {
        bail!("the first line must be `# expect: LINE:COLUMN: substring`, not {first:?}");
    };
    let needle = needle.trim();
    ensure!(
        !needle.is_empty(),
        "the expected message substring is empty"
    );
    Ok(Expectation {
        line: line.trim().parse().context("LINE is not a number")?,
        column: column.trim().parse().context("COLUMN is not a number")?,
        needle: needle.to_owned(),
    })
}

#[test]
fn every_bad_policy_fails_with_the_expected_diagnostic() -> Result<()> {
    let dir = crate_dir().join("policies/bad");
    let files = yaml_files(&dir)?;
    ensure!(
        files.len() >= CORPUS_MIN_FILES,
        "the corpus in {} has {} files, fewer than {CORPUS_MIN_FILES}",
        dir.display(),
        files.len()
    );

    let mut table = String::new();
    let mut mismatches = Vec::new();
    for path in &files {
        let name = name_of(path);
        let text = fs::read_to_string(path).with_context(|| format!("reading {name}"))?;
        let expected = expectation(&text).with_context(|| format!("in {name}"))?;
        let (verdict, got) = match policy::parse(&text, &name) {
            Ok(checked) => (
                "FAIL",
                format!("parsed, {} warnings", checked.warnings.len()),
            ),
            Err(PolicyError::Invalid(diagnostics)) => {
                let hit = diagnostics.iter().any(|d| {
                    d.line == expected.line
                        && d.column == expected.column
                        && d.message.contains(&expected.needle)
                });
                let lines = text.lines().count();
                let out_of_file = diagnostics.iter().any(|d| d.line > lines.max(1));
                let got = diagnostics
                    .iter()
                    .map(|d| format!("{}:{}: {}", d.line, d.column, d.message))
                    .collect::<Vec<_>>()
                    .join("\n        ");
                (if hit && !out_of_file { "ok" } else { "FAIL" }, got)
            }
            Err(other) => ("FAIL", other.to_string()),
        };
        let want = format!("{}:{}: {}", expected.line, expected.column, expected.needle);
        writeln!(table, "{verdict:4} {name}\n  want  {want}\n  got   {got}")?;
        if verdict != "ok" {
            mismatches.push(format!("{name}: want {want}\n    got {got}"));
        }
    }
    println!("{table}");
    ensure!(
        mismatches.is_empty(),
        "{} of {} corpus files did not produce the expected diagnostic:\n{}",
        mismatches.len(),
        files.len(),
        mismatches.join("\n")
    );
    Ok(())
}

fn example(name: &str) -> Result<PathBuf> {
    let path = crate_dir().join("../policies").join(name);
    ensure!(path.is_file(), "missing example policy {}", path.display());
    Ok(path)
}

fn load(path: &Path) -> Result<policy::Checked> {
    policy::load(path).map_err(|error| anyhow::anyhow!("{error}"))
}

#[test]
fn example_policies_are_valid() -> Result<()> {
    let dir = crate_dir().join("../policies");
    let files = yaml_files(&dir)?;
    for name in [
        "residential-isp.yaml",
        "university.yaml",
        "minimal.yaml",
        "lab.yaml",
    ] {
        ensure!(
            files.iter().any(|path| name_of(path) == name),
            "policies/{name} is missing"
        );
    }
    for path in &files {
        let checked = load(path)?;
        for warning in &checked.warnings {
            println!("{warning}");
        }
    }
    // These two are what operators copy and what the demo lab runs: not even a warning.
    for name in ["residential-isp.yaml", "lab.yaml"] {
        let checked = load(&example(name)?)?;
        ensure!(
            checked.warnings.is_empty(),
            "policies/{name} has warnings:\n{}",
            display_all(&checked.warnings)
        );
    }
    Ok(())
}

fn display_all(diagnostics: &[Diagnostic]) -> String {
    diagnostics
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn lab_policy_has_the_lab_topology() -> Result<()> {
    let policy = load(&example("lab.yaml")?)?.policy;
    let prefixes = |list: Vec<IpNet>| {
        let mut list = list;
        list.sort();
        list
    };
    let subscribers = prefixes(policy.subscribers.iter().map(|s| s.prefix).collect());
    let monitored: Vec<IpNet> = policy
        .subscribers
        .iter()
        .filter(|s| s.mode == Some(policy::PolicyMode::Monitor))
        .map(|s| s.prefix)
        .collect();
    let allowed = prefixes(policy.allow.iter().map(|a| a.prefix).collect());
    let want = |list: &[&str]| -> Result<Vec<IpNet>> {
        let mut nets = list
            .iter()
            .map(|s| s.parse::<IpNet>())
            .collect::<Result<Vec<_>, _>>()?;
        nets.sort();
        Ok(nets)
    };
    ensure!(
        subscribers == want(&["100.64.0.0/16", "2001:db8:100::/48", "100.64.9.0/24"])?,
        "lab subscribers: {subscribers:?}"
    );
    ensure!(
        monitored == want(&["100.64.9.0/24"])?,
        "lab monitor prefixes: {monitored:?}"
    );
    ensure!(
        allowed == want(&["100.64.3.0/24", "2001:db8:100:3::/64"])?,
        "lab allowlist: {allowed:?}"
    );
    let interfaces: Vec<_> = policy
        .interfaces
        .iter()
        .map(|i| (i.name.as_str(), i.role, i.attach))
        .collect();
    ensure!(
        interfaces
            == [
                ("r-sub", policy::Role::Subscriber, policy::Attach::Xdp),
                ("r-vlan", policy::Role::Subscriber, policy::Attach::Xdp),
                ("r-up", policy::Role::Upstream, policy::Attach::Tc),
            ],
        "lab interfaces: {interfaces:?}"
    );
    Ok(())
}

#[test]
fn allow_entry_outside_subscriber_space_is_a_located_warning() -> Result<()> {
    let text = "\
version: 1
subscribers:
  - prefix: 100.64.0.0/10
  - prefix: 2001:db8:100::/48
allow:
  - prefix: 100.64.3.0/24          # inside: fine
  - prefix: 10.0.0.0/8             # contains no subscriber, in none: useless
  - { owner: noc, prefix: 2001:db8:200::/48 }
  - prefix: 100.0.0.0/8            # contains subscriber space: it does change verdicts
";
    let checked = policy::parse(text, "warn.yaml").map_err(|e| anyhow::anyhow!("{e}"))?;
    let got: Vec<String> = checked.warnings.iter().map(ToString::to_string).collect();
    let want = [
        "warn.yaml:7:13: allow entry 10.0.0.0/8 lies outside all subscriber prefixes, so it \
         can never change a verdict",
        "warn.yaml:8:27: allow entry 2001:db8:200::/48 lies outside all subscriber prefixes, \
         so it can never change a verdict",
    ];
    ensure!(got == want, "warnings: {got:#?}");
    Ok(())
}

#[test]
fn expired_allow_entry_is_a_warning_not_an_error() -> Result<()> {
    let text = "\
version: 1
subscribers: [{ prefix: 192.0.2.0/24 }]
allow:
  - prefix: 192.0.2.25/32
    expires: 2001-09-09T01:46:40Z
  - prefix: 192.0.2.26/32
    expires: 2030-01-01T00:00:00+02:00
";
    let checked = policy::parse(text, "expiry.yaml").map_err(|e| anyhow::anyhow!("{e}"))?;
    let got: Vec<String> = checked.warnings.iter().map(ToString::to_string).collect();
    ensure!(
        got == ["expiry.yaml:5:14: allow entry 192.0.2.25/32 expired at \
                 2001-09-09T01:46:40Z; the daemon skips expired entries"],
        "warnings: {got:#?}"
    );
    ensure!(checked.policy.allow.len() == 2, "the expired entry is kept");
    Ok(())
}

#[test]
fn diagnostic_displays_like_a_compiler() -> Result<()> {
    let diagnostic = Diagnostic {
        file: "policies/lab.yaml".to_owned(),
        line: 12,
        column: 5,
        message: "duplicate allow prefix 100.64.3.0/24 (first listed on line 9)".to_owned(),
    };
    ensure!(
        diagnostic.to_string()
            == "policies/lab.yaml:12:5: duplicate allow prefix 100.64.3.0/24 (first listed on \
                line 9)"
    );

    let text = "version: 1\nsubscribers:\n  - prefix: 100.64.1.1/24\n  - prefix: 10.0.0.0/33\n";
    let Err(error) = policy::parse(text, "p.yaml") else {
        bail!("a policy with two bad prefixes parsed");
    };
    ensure!(
        error.to_string()
            == "p.yaml:3:13: 100.64.1.1/24 has host bits set; did you mean 100.64.1.0/24?\n\
                p.yaml:4:13: invalid prefix \"10.0.0.0/33\": prefix length 33 is longer than \
                32, the most an IPv4 prefix can have",
        "every diagnostic, one per line: {error}"
    );
    Ok(())
}

/// Rule 13 at the real capacity (a file too big for the corpus). The allowlist limit
/// (2M entries) is the same code path, tested with small limits in filter-user.
#[test]
fn subscriber_capacity_is_enforced_per_family() -> Result<()> {
    let capacity = usize::try_from(SUBSCRIBERS_MAX_ENTRIES)?;
    let mut text = String::from("version: 1\nsubscribers:\n  - prefix: 100.64.0.0/10\n");
    // One more IPv6 prefix than fits; the IPv4 one above does not count against them.
    for i in 0..=capacity {
        let net = Ipv6Addr::from(0x2001_0db8_u128 << 96 | (i as u128) << 64);
        writeln!(text, "  - prefix: {net}/64")?;
    }
    let Err(PolicyError::Invalid(diagnostics)) = policy::parse(&text, "big.yaml") else {
        bail!("a policy over capacity parsed");
    };
    let got: Vec<String> = diagnostics.iter().map(ToString::to_string).collect();
    let want = format!(
        "big.yaml:{}:13: too many IPv6 subscriber prefixes: the dataplane holds at most \
         {capacity} per address family",
        capacity + 4
    );
    ensure!(got == [want], "{got:#?}");
    Ok(())
}

#[test]
fn load_names_the_missing_file() -> Result<()> {
    let path = crate_dir().join("policies/does-not-exist.yaml");
    match policy::load(&path) {
        Err(error @ PolicyError::Io { .. }) => {
            let message = error.to_string();
            ensure!(
                message.contains("does-not-exist.yaml"),
                "the I/O error does not name the file: {message}"
            );
            Ok(())
        }
        other => bail!("loading a missing file gave {other:?}"),
    }
}

/// `p25d check` is what an operator runs before deploying a policy: it must print the
/// located diagnostic and exit non-zero on a broken file, and exit 0 on a good one, without
/// touching the kernel (it runs here without any pin root or bpffs access).
#[test]
fn p25d_check_exit_codes() -> Result<()> {
    let p25d = p25_tests::daemon::bin("p25d")?;
    let good = example("residential-isp.yaml")?;
    let out = std::process::Command::new(&p25d)
        .arg("check")
        .arg(&good)
        .output()
        .context("running p25d check")?;
    ensure!(
        out.status.success(),
        "p25d check rejected a good policy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(String::from_utf8_lossy(&out.stdout).contains(": ok: "));

    let bad = crate_dir().join("policies/bad/allow-flow-entry-host-bits.yaml");
    let want = expectation(&fs::read_to_string(&bad)?)?;
    let out = std::process::Command::new(&p25d)
        .arg("check")
        .arg(&bad)
        .output()
        .context("running p25d check")?;
    ensure!(
        out.status.code() == Some(1),
        "p25d check exited {:?} on a broken policy",
        out.status.code()
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let location = format!("{}:{}:{}:", bad.display(), want.line, want.column);
    ensure!(
        stderr.contains(&location) && stderr.contains(&want.needle),
        "p25d check printed {stderr:?}, expected {location} ... {}",
        want.needle
    );

    let out = std::process::Command::new(&p25d)
        .arg("check")
        .arg(crate_dir().join("policies/does-not-exist.yaml"))
        .output()
        .context("running p25d check")?;
    ensure!(!out.status.success(), "p25d check accepted a missing file");
    Ok(())
}
