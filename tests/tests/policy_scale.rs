//! End to end, the control plane's handling of list files, expiry and drift: the real
//! p25d and p25ctl on the namespace lab (see `p25_tests::lab`), one daemon per test.
//!
//! - An allowlist entry that expires (from the policy, or from `p25ctl allow --expires`)
//!   turns a delivered port-25 connection into a blocked one within a second of its
//!   expiry, with the resync pushed out to an hour so that only the expiry timer can do it.
//! - Entries from list files filter like inline ones, and editing a list file reloads.
//! - An allowlist entry deleted behind p25d's back (as with bpftool) is restored by the
//!   resync.

use std::{
    net::{IpAddr, SocketAddr},
    thread,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result, ensure};
use p25_tests::{
    daemon::DaemonLab,
    lab::{SERVER4, SMTP, SUB4, SUB4_ALLOWED, Topology},
    netns::{Netns, wait_until},
};

/// A connect that should fail must not complete within this (the SYN is dropped).
const BLOCKED: Duration = Duration::from_millis(800);
/// Time for a verdict change (reload, allow) to be visible to a new connection.
const CONVERGE: Duration = Duration::from_secs(8);
/// How soon after its expiry an entry must have left the maps.
const EXPIRY_SLACK: Duration = Duration::from_secs(1);

fn smtp4() -> SocketAddr {
    SocketAddr::new(SERVER4.into(), SMTP)
}

fn connects(sub: &Netns, src: IpAddr, timeout: Duration) -> Result<bool> {
    Ok(sub.connect_from(src, None, smtp4(), timeout)?.is_ok())
}

/// Polls until a connection from `src` succeeds (`want`) or is blocked (`!want`).
fn expect(sub: &Netns, src: IpAddr, want: bool, what: &str, lab: &DaemonLab) -> Result<()> {
    let ok = wait_until(CONVERGE, Duration::from_millis(50), || {
        Ok(connects(sub, src, BLOCKED)? == want)
    })?;
    let verb = if want { "connect" } else { "be blocked" };
    ensure!(
        ok,
        "{what}: {src} should {verb} (waited {CONVERGE:?})\n{}",
        lab.log()
    );
    Ok(())
}

/// Sleeps until `at` (bounded: `at` is seconds away in these tests).
fn sleep_until(at: SystemTime) {
    if let Ok(wait) = at.duration_since(SystemTime::now()) {
        thread::sleep(wait.min(Duration::from_secs(60)));
    }
}

/// Delivered before `expires`, blocked from `expires + EXPIRY_SLACK` on: one connection
/// attempt right at that moment, so a removal at the next resync (an hour away) or late
/// by more than the slack fails the test.
fn delivered_then_blocked(
    sub: &Netns,
    src: IpAddr,
    expires: SystemTime,
    what: &str,
    lab: &DaemonLab,
) -> Result<()> {
    ensure!(
        connects(sub, src, Duration::from_secs(2))?,
        "{what}: {src} should connect before the entry expires\n{}",
        lab.log()
    );
    sleep_until(expires + EXPIRY_SLACK);
    let started = Instant::now();
    let delivered = connects(sub, src, BLOCKED)?;
    ensure!(
        !delivered,
        "{what}: {src} still connects {EXPIRY_SLACK:?} after the entry expired (attempt took \
         {:?})\n{}",
        started.elapsed(),
        lab.log()
    );
    Ok(())
}

fn policy(allow: &str) -> String {
    format!(
        "version: 1
interfaces:
  - name: r-sub
    role: subscriber
    attach: xdp
  - name: r-up
    role: upstream
    attach: tc
subscribers:
  - prefix: 100.64.1.0/24
  - prefix: 2001:db8:1::/64
{allow}"
    )
}

#[test]
fn expired_entries_leave_the_maps_within_a_second() -> Result<()> {
    let topology = Topology::build()?;
    let sub = &topology.sub;
    let mut lab = DaemonLab::new(&topology.router)?;
    lab.run_args(&["--resync", "1h"]);
    // Whole seconds: RFC 3339 without a fraction, and runtime expiry is in seconds.
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .context("clock")?
        .as_secs();
    let expires = SystemTime::UNIX_EPOCH + Duration::from_secs(now + 6);
    lab.write_policy(&policy(&format!(
        "allow:\n  - prefix: {SUB4_ALLOWED}/32\n    expires: {}\n",
        filter_user::runtime::rfc3339(now + 6)
    )))?;
    lab.start()?;
    delivered_then_blocked(
        sub,
        SUB4_ALLOWED.into(),
        expires,
        "policy entry with expires",
        &lab,
    )?;

    // The same for an entry of `p25ctl allow --expires`.
    lab.ctl_ok(&["allow", &SUB4.to_string(), "--expires", "4s"])?;
    let runtime_expires = SystemTime::now() + Duration::from_secs(4);
    delivered_then_blocked(
        sub,
        SUB4.into(),
        runtime_expires,
        "p25ctl allow --expires",
        &lab,
    )?;
    ensure!(
        lab.list()?
            .allow
            .iter()
            .all(|e| e.source != filter_user::control::Source::Runtime),
        "the expired runtime entry must leave the store too"
    );
    Ok(())
}

#[test]
fn list_files_filter_and_reload_when_edited() -> Result<()> {
    let topology = Topology::build()?;
    let sub = &topology.sub;
    let mut lab = DaemonLab::new(&topology.router)?;
    let lists = lab.dir.join("lists");
    std::fs::create_dir_all(&lists)?;
    let write = |name: &str, text: &str| -> Result<()> {
        let tmp = lists.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, lists.join(name))?;
        Ok(())
    };
    write("subscribers.txt", "# IPAM export\n100.64.1.0/24\n")?;
    write("allow.txt", &format!("{SUB4_ALLOWED}   # customer 1\n"))?;
    lab.write_policy(
        "version: 1
interfaces:
  - { name: r-sub, role: subscriber, attach: xdp }
  - { name: r-up, role: upstream, attach: tc }
subscriber_files: [lists/subscribers.txt]
allow_files: [lists/allow.txt]
",
    )?;
    lab.start()?;
    expect(sub, SUB4.into(), false, "subscriber from a list file", &lab)?;
    expect(
        sub,
        SUB4_ALLOWED.into(),
        true,
        "allowlisted in a list file",
        &lab,
    )?;
    let reloads = lab.status()?.reloads_ok;

    // Editing the allow list file alone reloads the policy.
    write("allow.txt", &format!("{SUB4}\n"))?;
    expect(sub, SUB4.into(), true, "added to the list file", &lab)?;
    expect(
        sub,
        SUB4_ALLOWED.into(),
        false,
        "removed from the list file",
        &lab,
    )?;
    ensure!(
        lab.status()?.reloads_ok > reloads,
        "editing a list file should count as a reload"
    );

    // A broken list file is rejected with file:line:col; the previous policy stays.
    write("allow.txt", &format!("{SUB4}\n100.64.1.9/24\n"))?;
    let rejected = wait_until(CONVERGE, Duration::from_millis(50), || {
        Ok(lab
            .status()?
            .last_error
            .is_some_and(|e| e.contains("allow.txt:2:1: 100.64.1.9/24 has host bits set")))
    })?;
    ensure!(
        rejected,
        "the broken list file should be reported:\n{}",
        lab.log()
    );
    expect(
        sub,
        SUB4.into(),
        true,
        "previous policy stays in force",
        &lab,
    )?;

    // `p25ctl deny` of a listed entry is refused: it comes from the policy.
    let out = lab.ctl(&["deny", &SUB4.to_string()])?;
    ensure!(!out.status.success(), "deny of a listed entry must fail");
    expect(
        sub,
        SUB4.into(),
        true,
        "a refused deny changes nothing",
        &lab,
    )?;
    Ok(())
}

#[test]
fn resync_restores_an_entry_deleted_behind_the_daemons_back() -> Result<()> {
    let topology = Topology::build()?;
    let sub = &topology.sub;
    let mut lab = DaemonLab::new(&topology.router)?;
    lab.run_args(&["--resync", "2s"]);
    lab.write_policy(&policy(&format!("allow:\n  - prefix: {SUB4_ALLOWED}/32\n")))?;
    lab.start()?;
    expect(sub, SUB4_ALLOWED.into(), true, "allowlisted", &lab)?;
    // Delete the entry from the pinned maps with a second handle on them, as bpftool
    // would: p25d is not told.
    let mut tables = filter_user::KernelTables::open_pinned(&filter_user::loader::PinLayout::new(
        &lab.pin_root,
    ))?;
    let net = ipnet::IpNet::from(IpAddr::V4(SUB4_ALLOWED));
    ensure!(tables.remove_allow(net)?, "the entry was not in the maps");
    drop(tables);
    // Blocked now (the drift is real), then repaired by the resync.
    ensure!(
        !connects(sub, SUB4_ALLOWED.into(), BLOCKED)?,
        "the entry deleted with bpftool should no longer allow"
    );
    expect(
        sub,
        SUB4_ALLOWED.into(),
        true,
        "after the resync repaired it",
        &lab,
    )?;
    Ok(())
}
