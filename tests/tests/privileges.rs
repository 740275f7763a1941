//! p25d's privileges and files, with the real binaries: one writer per pin root (a second
//! p25d and `p25d detach` are refused while one runs), zero timer periods refused by the
//! flags, the event log (no symlinks, reopened on SIGHUP for logrotate), and p25d filtering
//! as an unprivileged user with only CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON, as the
//! systemd unit runs it; `p25ctl allow` refusing IPv4-mapped IPv6 prefixes.

use std::{
    fs,
    net::{IpAddr, SocketAddr, SocketAddrV4},
    os::unix::fs::MetadataExt as _,
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};
use p25_tests::{
    daemon::{DaemonLab, bin},
    lab::{SERVER4, SMTP, SUB4, SUBMISSION, Topology},
    netns::{Netns, wait_until},
    traffic::SynSender,
};

const POLICY: &str = p25_tests::lab_policy!();

/// Interfaces that do not exist in a bare namespace are reported and skipped; enough for
/// tests that need a running daemon but no traffic.
const NO_INTERFACES: &str = "version: 1\nsubscribers:\n  - prefix: 100.64.1.0/24\n";

/// A daemon for `netns` with [`NO_INTERFACES`] and no metrics endpoint (tests that share a
/// namespace would fight over its port), not started.
fn bare_lab(netns: &Netns) -> Result<DaemonLab> {
    let mut lab = DaemonLab::new(netns)?;
    lab.write_policy(NO_INTERFACES)?;
    lab.run_args(&["--metrics-listen", "off"]);
    Ok(lab)
}

const SETTLE: Duration = Duration::from_secs(15);
const POLL: Duration = Duration::from_millis(100);

/// The unit's capabilities, as setpriv names them.
const UNIT_CAPS: &[&str] = &["bpf", "net_admin", "perfmon"];
/// CAP_NET_ADMIN (12), CAP_PERFMON (38), CAP_BPF (39) as a capability mask.
const UNIT_CAP_MASK: u64 = (1 << 12) | (1 << 38) | (1 << 39);
/// A uid/gid nobody else uses; setpriv needs no passwd entry for it.
const UNPRIVILEGED: u32 = 64_025;

/// A second p25d on the same pin root is refused, whatever socket it uses; so is
/// `p25d detach`; both work once the first daemon is gone.
#[test]
fn one_writer_per_pin_root() -> Result<()> {
    let netns = Netns::new("lock")?;
    let mut first = bare_lab(&netns)?;
    first.start()?;

    let mut second = bare_lab(&netns)?;
    second.pin_root.clone_from(&first.pin_root);
    ensure!(
        second.socket() != first.socket(),
        "the second daemon needs its own socket"
    );
    let (status, log) = second.run_to_exit(Duration::from_secs(15))?;
    ensure!(
        !status.success(),
        "a second p25d on the same pins must not start:\n{log}"
    );
    ensure!(
        log.contains("another p25d is running on the pin root")
            && log.contains(&first.pin_root.display().to_string()),
        "the refusal should say why and name the pin root:\n{log}"
    );
    // Refused before touching anything: the first daemon still answers, pins intact.
    ensure!(first.status()?.daemon, "the first p25d stopped answering");

    let detach = |lab: &DaemonLab| -> Result<std::process::Output> {
        Command::new(bin("p25d")?)
            .args(["detach", "--pin-root"])
            .arg(&lab.pin_root)
            .output()
            .context("running p25d detach")
    };
    let out = detach(&first)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success(),
        "detach must be refused while p25d runs"
    );
    ensure!(
        stderr.contains("a p25d is running on the pin root") && stderr.contains("stop it first"),
        "detach should say a daemon runs and what to do: {stderr}"
    );
    ensure!(
        first.pin_root.join("v3").exists() || first.pin_root.read_dir()?.next().is_some(),
        "detach removed pins although it was refused"
    );
    ensure!(
        first.status()?.daemon,
        "p25d stopped answering after the detach"
    );

    first.kill9()?;
    let out = detach(&first)?;
    ensure!(
        out.status.success(),
        "detach after the daemon stopped: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        !first.pin_root.exists(),
        "detach left {}",
        first.pin_root.display()
    );
    // With the root gone, a daemon can take it again.
    second.start()?;
    Ok(())
}

/// Zero periods would panic in tokio's interval (and a zero alert window sees nothing):
/// clap refuses them with the flag's name, before p25d touches anything.
#[test]
fn zero_intervals_are_refused_by_the_flags() -> Result<()> {
    for flag in ["--poll", "--resync", "--offender-scan", "--alert-window"] {
        let out = Command::new(bin("p25d")?)
            .args(["run", flag, "0s", "--pin-root", "/nonexistent/p25-zero"])
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.code() == Some(2),
            "{flag} 0s: expected a usage error (exit 2), got {}: {stderr}",
            out.status
        );
        ensure!(
            stderr.contains(flag) && stderr.contains("is zero"),
            "{flag} 0s: the message should name the flag and say why: {stderr}"
        );
    }
    Ok(())
}

/// An event log path that is a symbolic link is refused at start-up (p25d never writes
/// through a link someone else could point anywhere).
#[test]
fn an_event_log_symlink_is_refused() -> Result<()> {
    let netns = Netns::new("evsym")?;
    let mut lab = bare_lab(&netns)?;
    let target = lab.dir.join("elsewhere");
    fs::write(&target, b"")?;
    let link = lab.dir.join("events.jsonl");
    std::os::unix::fs::symlink(&target, &link)?;
    let link_arg = link.to_string_lossy().into_owned();
    lab.run_args(&["--events", &link_arg]);
    let (status, log) = lab.run_to_exit(Duration::from_secs(15))?;
    ensure!(
        !status.success(),
        "p25d must refuse a symlinked event log:\n{log}"
    );
    ensure!(
        log.contains("symbolic link") && log.contains(&link_arg),
        "the error should name the path and say it is a symlink:\n{log}"
    );
    ensure!(
        fs::read(&target)?.is_empty(),
        "something was written through the link"
    );
    Ok(())
}

fn event_lines(path: &std::path::Path) -> usize {
    fs::read_to_string(path).map_or(0, |text| text.lines().count())
}

fn send_syns(sender: &SynSender, first_port: u16, count: u16) -> Result<()> {
    for i in 0..count {
        sender.send(first_port + i, SocketAddrV4::new(SERVER4, SMTP))?;
    }
    Ok(())
}

/// logrotate: the event log is renamed, p25d gets SIGHUP, and later events go to a new
/// file at the configured path, none to the renamed one.
#[test]
fn sighup_reopens_the_event_log() -> Result<()> {
    let topology = Topology::build()?;
    let mut lab = DaemonLab::with_policy(&topology.router, POLICY)?;
    let events = lab.dir.join("events.jsonl");
    let events_arg = events.to_string_lossy().into_owned();
    lab.run_args(&["--events", &events_arg]);
    lab.start()?;
    let sender = SynSender::new(&topology.sub, SUB4)?;

    send_syns(&sender, 41_000, 5)?;
    ensure!(
        wait_until(SETTLE, POLL, || Ok(event_lines(&events) >= 5))?,
        "5 blocked SYNs should give 5 events, found {}:\n{}",
        event_lines(&events),
        lab.log()
    );
    let rotated = lab.dir.join("events.jsonl.1");
    fs::rename(&events, &rotated)?;
    let pid = lab.pid().context("p25d is not running")?;
    let status = Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()?;
    ensure!(status.success(), "kill -HUP {pid} failed");
    // The reopen is asynchronous: wait for the new file, which SIGHUP alone creates.
    ensure!(
        wait_until(SETTLE, POLL, || Ok(events.exists()))?,
        "no new event log after SIGHUP:\n{}",
        lab.log()
    );
    let before = event_lines(&rotated);
    send_syns(&sender, 42_000, 5)?;
    ensure!(
        wait_until(SETTLE, POLL, || Ok(event_lines(&events) >= 5))?,
        "events after SIGHUP should go to the new {}, found {} lines there:\n{}",
        events.display(),
        event_lines(&events),
        lab.log()
    );
    let new = fs::read_to_string(&events)?;
    ensure!(
        new.lines().all(|l| l.contains("\"sport\":42")),
        "the new log holds events from before the rotation:\n{new}"
    );
    ensure!(
        event_lines(&rotated) == before,
        "events kept going to the rotated file"
    );
    ensure!(lab.status()?.daemon, "p25d stopped answering");
    Ok(())
}

/// The `Uid:` and `CapEff:` of a running process.
fn uid_and_caps(pid: u32) -> Result<(u32, u64)> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .with_context(|| format!("no {name} in /proc/{pid}/status"))
    };
    let uid = field("Uid:")?
        .split_whitespace()
        .next()
        .context("empty Uid:")?
        .parse()?;
    let caps = u64::from_str_radix(field("CapEff:")?, 16)?;
    Ok((uid, caps))
}

/// As the unit runs it: p25d as a user that is not root, with exactly CAP_BPF,
/// CAP_NET_ADMIN and CAP_PERFMON, creates its pins, filters (port 25 dropped, 587
/// passes), takes a runtime allow entry and adopts its own pins after a restart.
#[test]
fn p25d_filters_as_an_unprivileged_user_with_three_capabilities() -> Result<()> {
    let topology = Topology::build()?;
    let mut lab = DaemonLab::with_policy(&topology.router, POLICY)?;
    fs::set_permissions(
        lab.policy_path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )?;
    lab.run_as(UNPRIVILEGED, UNIT_CAPS)?;
    lab.start()?;

    let pid = lab.pid().context("p25d is not running")?;
    let (uid, caps) = uid_and_caps(pid)?;
    ensure!(
        uid == UNPRIVILEGED,
        "p25d runs as uid {uid}, not {UNPRIVILEGED}"
    );
    ensure!(
        caps == UNIT_CAP_MASK,
        "p25d's effective capabilities are {caps:#x}, want exactly {UNIT_CAP_MASK:#x}"
    );
    let owner = fs::metadata(&lab.pin_root)?.uid();
    ensure!(owner == UNPRIVILEGED, "the pin root belongs to uid {owner}");

    let sub = &topology.sub;
    let server = |port| SocketAddr::new(IpAddr::V4(SERVER4), port);
    let connects = |port, timeout| -> Result<bool> {
        Ok(sub
            .connect_from(IpAddr::V4(SUB4), None, server(port), timeout)?
            .is_ok())
    };
    ensure!(
        connects(SUBMISSION, Duration::from_secs(5))?,
        "587 must pass under the unprivileged p25d"
    );
    ensure!(
        !connects(SMTP, Duration::from_millis(1200))?,
        "port 25 from a subscriber must be dropped under the unprivileged p25d; status: \
         {:?}\np25d log:\n{}",
        lab.status().map(|s| s.interfaces),
        lab.log()
    );

    lab.ctl_ok(&["allow", "100.64.1.2"])?;
    ensure!(
        wait_until(SETTLE, POLL, || connects(SMTP, Duration::from_millis(1200)))?,
        "after p25ctl allow, port 25 should pass"
    );
    let state = lab.dir.join("state.json");
    let meta = fs::metadata(&state)?;
    ensure!(
        meta.uid() == UNPRIVILEGED && meta.mode() & 0o077 == 0,
        "the state file should be private to p25d's user (umask 077): uid {} mode {:o}",
        meta.uid(),
        meta.mode() & 0o777
    );

    // A restart as the same user adopts the pins it created.
    lab.kill9()?;
    lab.start()?;
    if !lab.log().contains("adopted=true") {
        bail!("the restarted p25d did not adopt its pins:\n{}", lab.log());
    }
    ensure!(
        connects(SMTP, Duration::from_secs(5))?,
        "the runtime allow entry should survive the restart"
    );
    lab.ctl_ok(&["deny", "100.64.1.2"])?;
    ensure!(
        wait_until(SETTLE, POLL, || Ok(!connects(
            SMTP,
            Duration::from_millis(1200)
        )?))?,
        "after p25ctl deny, port 25 should be dropped again"
    );
    Ok(())
}

/// `p25ctl allow` refuses an IPv4-mapped IPv6 prefix, naming the IPv4 form, and the daemon
/// keeps no entry for it.
#[test]
fn p25ctl_allow_refuses_ipv4_mapped_ipv6() -> Result<()> {
    let netns = Netns::new("mapped")?;
    let mut lab = bare_lab(&netns)?;
    lab.start()?;
    for (arg, v4) in [
        ("::ffff:192.0.2.1", "use 192.0.2.1/32"),
        ("::ffff:100.64.1.0/120", "use 100.64.1.0/24"),
    ] {
        let out = lab.ctl(&["allow", arg])?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success(), "p25ctl allow {arg} must fail");
        ensure!(
            stderr.contains("IPv4-mapped") && stderr.contains(v4),
            "p25ctl allow {arg}: the message should name the IPv4 form ({v4}): {stderr}"
        );
    }
    let list = lab.list()?;
    ensure!(
        list.allow
            .iter()
            .all(|a| !a.prefix.to_string().contains("ffff")),
        "a mapped prefix reached the allowlist: {list:?}"
    );
    Ok(())
}

/// Outside systemd (which creates /run/p25 itself), p25d creates the socket's directory
/// 0750 in the socket group so that group can reach the 0660 socket, although its umask
/// is 077.
#[test]
fn a_new_socket_directory_is_reachable_by_the_socket_group() -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    const GROUP: &str = "nogroup";
    let gid: u32 = fs::read_to_string("/etc/group")?
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{GROUP}:x:"))?
                .split(':')
                .next()?
                .parse()
                .ok()
        })
        .with_context(|| format!("no group {GROUP} in /etc/group"))?;
    let netns = Netns::new("sockdir")?;
    let mut lab = bare_lab(&netns)?;
    let dir = lab.dir.join("run");
    lab.set_socket(dir.join("p25.sock"));
    lab.run_args(&["--socket-group", GROUP]);
    lab.start()?;
    for (path, mode) in [(dir.clone(), 0o750), (lab.socket(), 0o660)] {
        let meta = fs::metadata(&path)?;
        ensure!(
            meta.permissions().mode() & 0o777 == mode && meta.gid() == gid,
            "{}: mode {:o} gid {}, want {mode:o} and the group {GROUP} ({gid})",
            path.display(),
            meta.permissions().mode() & 0o777,
            meta.gid()
        );
    }
    Ok(())
}
