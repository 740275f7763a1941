//! The Debian package, end to end on this machine (CI runs as root on a throwaway VM):
//! `cargo xtask package` builds it, lintian finds no error, `dpkg -i` installs it, the
//! installed `p25d check` accepts the shipped policy, `systemd-analyze verify` accepts the
//! installed unit, the installed p25d filters in a network namespace (port 25 dropped, 587
//! passes), an upgrade to a newer package keeps filtering, and a purge leaves nothing of
//! the package behind while the filter, which only `p25d detach` removes, keeps
//! filtering.
//!
//! The package is purged at the end, also on failure, and no p25d is left running. Cost:
//! a release build of filter-user (incremental after the first; ~10 min cold on 2 cores),
//! lintian ~10 s, the rest ~20 s. Runs are serialized by /tmp/p25-package.lock, since
//! there is only one /usr/sbin/p25d per machine.

use std::{
    collections::BTreeSet,
    fs, io,
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};
use p25_tests::{
    daemon::DaemonLab,
    lab::{POLICY_HEAD, SERVER4, SMTP, SUB4, SUBMISSION, Topology},
    netns::{Netns, wait_until},
};

const PACKAGE: &str = "p25";
const LOCK: &str = "/tmp/p25-package.lock";
const UNIT: &str = "/lib/systemd/system/p25d.service";

/// The test's own policy: the lab's subscriber prefix, attached in the router namespace.
fn policy() -> String {
    format!("{POLICY_HEAD}subscribers:\n  - prefix: 100.64.1.0/24\n")
}

/// A blocked connect must not complete within this (the SYN is dropped).
const BLOCKED_TIMEOUT: Duration = Duration::from_millis(1500);
/// An allowed connect gets this long, to absorb ARP on first use and a SYN retransmit.
const REACH_TIMEOUT: Duration = Duration::from_secs(5);

#[test]
fn debian_package_installs_filters_upgrades_and_purges() -> Result<()> {
    p25_tests::require_root();
    let _lock = Lock::take(LOCK)?;
    ensure!(
        !is_installed()?,
        "the {PACKAGE} package is already installed on this machine; this test installs and \
         purges it, so remove it first (`dpkg --purge {PACKAGE}`)"
    );
    let work = std::env::temp_dir().join(format!("p25t-package-{}", std::process::id()));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    let result = scenario(&work);
    let _ = fs::remove_dir_all(&work);
    result
}

fn scenario(work: &Path) -> Result<()> {
    let deb = build_package(&work.join("v1"))?;
    // The same content as a newer Debian revision: what an upgrade installs.
    let newer = repackage(&work.join("v2"), "2")?;
    lintian(&deb)?;
    let files = package_files(&deb)?;

    // Purge keeps the system user and groups, as Debian does; the test removes those it
    // made itself, after the purge (guards drop in reverse order).
    let _accounts = Accounts::missing()?;
    // Purges on drop (also on failure); declared before the lab so that it is dropped
    // after the daemon below has been killed.
    let _installed = Installed;
    run(Command::new("dpkg").arg("-i").arg(&deb))?;
    ensure!(
        is_installed()?,
        "dpkg -i succeeded but {PACKAGE} is not installed"
    );

    // postinst: the user and groups exist; the unit is installed but not enabled.
    for (db, name) in ACCOUNTS {
        run(Command::new("getent").args([db, name]))
            .with_context(|| format!("postinst did not create {db} entry {name}"))?;
    }
    let wants = Path::new("/etc/systemd/system/multi-user.target.wants/p25d.service");
    ensure!(
        !wants.exists(),
        "installing must not enable p25d ({} exists)",
        wants.display()
    );

    // The shipped policy is valid and filters nothing.
    let check = run(Command::new("/usr/sbin/p25d").args(["check", "/etc/p25/policy.yaml"]))?;
    ensure!(
        check.contains("0 subscriber prefixes") && check.contains("0 interfaces"),
        "the shipped policy must list no subscriber space and no interface: {check}"
    );
    run(Command::new("systemd-analyze").args(["verify", UNIT]))
        .context("systemd-analyze verify rejects the installed unit")?;
    run(Command::new("man").args(["-w", "5", "p25-policy"]))
        .context("man does not find the installed p25-policy(5)")?;

    // The installed p25d with the shipped policy runs and filters nothing: no interface
    // attached, no subscriber prefix, port 25 connects.
    let topology = Topology::build()?;
    let mut lab = DaemonLab::new(&topology.router)?;
    lab.use_binaries("/usr/sbin");
    lab.write_policy(&fs::read_to_string("/etc/p25/policy.yaml")?)?;
    lab.start()?;
    let status = lab.status()?;
    ensure!(
        status.interfaces.is_empty() && status.subscribers == 0,
        "with the shipped policy p25d must attach nothing and know no subscriber: {status:?}"
    );
    expect_connects(&topology.sub, SocketAddr::new(IpAddr::V4(SERVER4), SMTP))
        .context("the shipped policy must not filter port 25")?;
    lab.kill9()?;

    // With a policy that lists subscriber space, the installed binaries filter: port 25
    // dropped, 587 passes.
    lab.write_policy(&policy())?;
    lab.start()?;
    expect_filtering(&topology, "installed p25d")?;

    // An upgrade replaces the binaries under the running daemon: filtering goes on. The
    // daemon is then restarted (what postinst's try-restart does under systemd), and the
    // new p25d adopts the pinned programs and maps.
    // The operator's edit of the conffile survives the upgrade.
    let conffile = Path::new("/etc/p25/policy.yaml");
    let edited = format!(
        "{}\n# edited by the operator\n",
        fs::read_to_string(conffile)?
    );
    fs::write(conffile, &edited)?;
    run(Command::new("dpkg").arg("-i").arg(&newer))?;
    ensure!(
        fs::read_to_string(conffile)? == edited,
        "the upgrade replaced the operator's {}",
        conffile.display()
    );
    expect_filtering(&topology, "after the upgrade, old p25d still running")?;
    lab.kill9()?;
    expect_filtering(&topology, "after the upgrade, p25d stopped (pins only)")?;
    lab.start()?;
    ensure!(
        lab.log().contains("adopting=true"),
        "the upgraded p25d did not adopt the pinned state:\n{}",
        lab.log()
    );
    expect_filtering(&topology, "after the upgrade, new p25d")?;

    // Purge with the daemon stopped: every file of the package goes, the filter stays.
    lab.kill9()?;
    run(Command::new("dpkg").args(["--purge", PACKAGE]))?;
    ensure!(!is_installed()?, "{PACKAGE} is still installed after purge");
    let left: Vec<&PathBuf> = files.iter().filter(|path| path.exists()).collect();
    ensure!(left.is_empty(), "purge left files of the package: {left:?}");
    for dir in [
        "/etc/p25",
        "/var/lib/p25",
        "/usr/share/p25",
        "/usr/share/doc/p25",
    ] {
        ensure!(!Path::new(dir).exists(), "purge left {dir}");
    }
    expect_blocked(&topology.sub, SocketAddr::new(IpAddr::V4(SERVER4), SMTP))
        .context("purging the package must not detach the filter")?;
    Ok(())
}

/// Port 25 from a subscriber is dropped, 587 connects.
fn expect_filtering(topology: &Topology, when: &str) -> Result<()> {
    let server = IpAddr::V4(SERVER4);
    expect_connects(&topology.sub, SocketAddr::new(server, SUBMISSION))
        .with_context(|| format!("{when}: 587 must pass"))?;
    expect_blocked(&topology.sub, SocketAddr::new(server, SMTP))
        .with_context(|| format!("{when}: 25 must be dropped"))
}

fn expect_connects(sub: &Netns, dst: SocketAddr) -> Result<()> {
    let mut last = String::new();
    let connected = wait_until(REACH_TIMEOUT, Duration::from_millis(100), || {
        match sub.connect_from(IpAddr::V4(SUB4), None, dst, Duration::from_secs(2))? {
            Ok(_) => Ok(true),
            Err(error) => {
                last = error.to_string();
                Ok(false)
            }
        }
    })?;
    ensure!(connected, "{SUB4} -> {dst} did not connect: {last}");
    Ok(())
}

fn expect_blocked(sub: &Netns, dst: SocketAddr) -> Result<()> {
    match sub.connect_from(IpAddr::V4(SUB4), None, dst, BLOCKED_TIMEOUT)? {
        Ok(_) => bail!("{SUB4} -> {dst} connected: the SYN was not dropped"),
        Err(error) if error.kind() == io::ErrorKind::TimedOut => Ok(()),
        Err(error) => bail!("{SUB4} -> {dst} failed otherwise than by a timeout: {error}"),
    }
}

/// `cargo xtask package --out DIR`; returns the .deb.
fn build_package(out: &Path) -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    run(Command::new(cargo)
        .current_dir(workspace_root())
        .args(["xtask", "package", "--out"])
        .arg(out))
    .context("cargo xtask package failed")?;
    only_deb(out)
}

/// The package `cargo xtask package` just built, again, as Debian revision `revision`.
fn repackage(out: &Path, revision: &str) -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    run(Command::new(cargo)
        .current_dir(workspace_root())
        .args(["deb", "--package", "filter-user", "--no-build"])
        .args(["--deb-revision", revision, "--output"])
        .arg(out))
    .context("cargo deb (repackaging as a newer revision) failed")?;
    only_deb(out)
}

fn only_deb(dir: &Path) -> Result<PathBuf> {
    let debs = p25_tests::files_in(dir, |path| p25_tests::has_extension(path, "deb"))?;
    match debs.as_slice() {
        [one] => Ok(one.clone()),
        other => bail!("expected one .deb in {}, found {other:?}", dir.display()),
    }
}

/// Runs lintian: no error allowed. Warnings are printed (docs/operations.md lists them
/// with their reasons).
fn lintian(deb: &Path) -> Result<()> {
    let out = Command::new("lintian")
        .arg("--display-info")
        .arg(deb)
        .output()
        .context("running lintian (install it with `cargo xtask setup`)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    println!("lintian:\n{text}");
    let errors: Vec<&str> = text.lines().filter(|l| l.starts_with("E: ")).collect();
    ensure!(errors.is_empty(), "lintian errors:\n{}", errors.join("\n"));
    // lintian exits non-zero on errors only (and on its own failure).
    ensure!(
        out.status.success(),
        "lintian failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The regular files (and symlinks) the package ships, as absolute paths.
fn package_files(deb: &Path) -> Result<BTreeSet<PathBuf>> {
    let listing = run(Command::new("dpkg-deb").arg("--contents").arg(deb))?;
    let files: BTreeSet<PathBuf> = listing
        .lines()
        .filter(|line| !line.starts_with('d'))
        .filter_map(|line| line.split_whitespace().nth(5))
        .map(|path| Path::new("/").join(path.trim_start_matches("./")))
        .collect();
    ensure!(
        files.contains(Path::new("/usr/sbin/p25d")),
        "the package has no /usr/sbin/p25d:\n{listing}"
    );
    Ok(files)
}

fn is_installed() -> Result<bool> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", PACKAGE])
        .output()
        .context("running dpkg-query")?;
    Ok(String::from_utf8_lossy(&out.stdout).contains("ok installed"))
}

/// Runs `cmd`, fails with its output unless it succeeds; returns stdout.
fn run(cmd: &mut Command) -> Result<String> {
    let line = format!("{cmd:?}");
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().with_context(|| format!("starting {line}"))?;
    let stdout = String::from_utf8_lossy(&stdout).into_owned();
    ensure!(
        status.success(),
        "{line} failed ({status}):\n{stdout}{}",
        String::from_utf8_lossy(&stderr)
    );
    Ok(stdout)
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// The accounts postinst creates (sysusers.d/p25.conf), as `getent` databases and names.
const ACCOUNTS: [(&str, &str); 3] = [("passwd", "p25"), ("group", "p25"), ("group", "p25-admin")];

/// The accounts of [`ACCOUNTS`] that did not exist before the test; deleted when dropped.
struct Accounts(Vec<(&'static str, &'static str)>);

impl Accounts {
    fn missing() -> Result<Self> {
        let mut missing = Vec::new();
        for (db, name) in ACCOUNTS {
            let known = Command::new("getent")
                .args([db, name])
                .output()
                .context("running getent")?
                .status
                .success();
            if !known {
                missing.push((db, name));
            }
        }
        Ok(Self(missing))
    }
}

impl Drop for Accounts {
    fn drop(&mut self) {
        // ACCOUNTS lists the user first: its primary group cannot go while it exists.
        for (db, name) in &self.0 {
            let tool = if *db == "passwd" {
                "userdel"
            } else {
                "groupdel"
            };
            let _ = Command::new(tool).arg(name).output();
        }
    }
}

/// Purges the package when dropped, so that a failing test leaves nothing installed.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        if is_installed().unwrap_or(true) {
            let _ = Command::new("dpkg").args(["--purge", PACKAGE]).output();
        }
    }
}

/// An exclusive flock, released when dropped (with the file descriptor).
struct Lock {
    _file: fs::File,
}

impl Lock {
    fn take(path: &str) -> Result<Self> {
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("opening {path}"))?;
        // SAFETY: flock on a descriptor we own; no memory is passed.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc != 0 {
            return Err(io::Error::last_os_error()).with_context(|| format!("locking {path}"));
        }
        Ok(Self { _file: file })
    }
}
