//! End to end: the real p25d and p25ctl on the namespace lab (see `p25_tests::lab`).
//!
//! One daemon per test, with private pins, socket and state, running in the router
//! namespace with XDP on the subscriber side and TC on the upstream side, per its policy.

use std::{
    net::{IpAddr, SocketAddr, SocketAddrV4},
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use filter_common::abi::{ABI_VERSION, Config};
use filter_user::control::Source;
use ipnet::IpNet;
use p25_tests::{
    abi_v3,
    daemon::DaemonLab,
    lab::{SERVER4, SERVER6, SMTP, SUB4, SUB4_ALLOWED, SUB6, SUB6_ALLOWED, SUBMISSION, Topology},
    netns::{Netns, wait_until},
    traffic::{SynCounters, SynSender},
};

const POLICY: &str = p25_tests::lab_policy!(
    "defaults:\n  mode: enforce\n  fragments: pass\n",
    p25_tests::lab_allow_business!(),
    "  - prefix: 2001:db8:1::3/128\n    comment: business customer\n",
);

/// A connect that should fail must not complete within this (the SYN is dropped).
const BLOCKED: Duration = Duration::from_millis(1200);
/// Time for a verdict change (reload, allow) to be visible to a new connection.
const CONVERGE: Duration = Duration::from_secs(8);

fn connects(sub: &Netns, src: IpAddr, dst: SocketAddr, timeout: Duration) -> Result<bool> {
    Ok(sub.connect_from(src, None, dst, timeout)?.is_ok())
}

/// Polls until a connection from `src` to `dst` succeeds (`want`) or times out (`!want`).
fn expect(sub: &Netns, src: IpAddr, dst: SocketAddr, want: bool, what: &str) -> Result<()> {
    let ok = wait_until(CONVERGE, Duration::from_millis(50), || {
        Ok(connects(sub, src, dst, BLOCKED)? == want)
    })?;
    let verb = if want { "connect" } else { "be blocked" };
    ensure!(
        ok,
        "{what}: {src} → {dst} should {verb} (waited {CONVERGE:?})"
    );
    Ok(())
}

/// The lab policy is in force: port 25 blocked for [`SUB4`], open for [`SUB4_ALLOWED`].
fn expect_policy(sub: &Netns, when: &str) -> Result<()> {
    expect(
        sub,
        SUB4.into(),
        smtp4(),
        false,
        &format!("subscriber {when}"),
    )?;
    expect(
        sub,
        SUB4_ALLOWED.into(),
        smtp4(),
        true,
        &format!("allowlisted {when}"),
    )
}

fn smtp4() -> SocketAddr {
    SocketAddr::new(SERVER4.into(), SMTP)
}

fn smtp6() -> SocketAddr {
    SocketAddr::new(SERVER6.into(), SMTP)
}

fn generation(lab: &DaemonLab) -> Result<u32> {
    Ok(lab.status()?.generation)
}

#[test]
fn allow_deny_reload_broken_policy_and_kill9_restart() -> Result<()> {
    let topology = Topology::build()?;
    let sub = &topology.sub;
    let mut lab = DaemonLab::with_policy(&topology.router, POLICY)?;
    lab.start()?;

    // Baseline: the policy's verdicts.
    expect_policy(sub, "baseline")?;
    expect(
        sub,
        SUB4.into(),
        SocketAddr::new(SERVER4.into(), SUBMISSION),
        true,
        "587",
    )?;
    let status = lab.status()?;
    let attached: Vec<_> = status
        .interfaces
        .iter()
        .map(|i| (i.name.as_str(), i.hook.as_str(), i.attached))
        .collect();
    ensure!(
        attached == vec![("r-sub", "xdp", true), ("r-up", "tc", true)],
        "status interfaces: {attached:?}\n{}",
        lab.log()
    );

    // p25ctl allow / deny change the verdict for a real connection.
    lab.ctl_ok(&["allow", &SUB4.to_string(), "--comment", "ticket 7"])?;
    expect(sub, SUB4.into(), smtp4(), true, "after p25ctl allow")?;
    let runtime = lab.runtime_allow()?;
    ensure!(
        runtime == [IpNet::from(IpAddr::from(SUB4))],
        "runtime entries shown apart: {runtime:?}"
    );
    lab.ctl_ok(&["deny", &SUB4.to_string()])?;
    expect(sub, SUB4.into(), smtp4(), false, "after p25ctl deny")?;

    // Bad input: clear error, non-zero exit, nothing changed.
    let before = lab.list()?;
    for args in [
        vec!["allow", "300.1.2.3"],
        vec!["allow", "100.64.1.1/24"],
        vec!["allow", "mail.example.net"],
        vec!["deny", "100.64.1.3"],
        vec!["frobnicate"],
    ] {
        let out = lab.ctl(&args)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success(), "p25ctl {args:?} should fail");
        ensure!(
            !stderr.trim().is_empty(),
            "p25ctl {args:?} failed without a message"
        );
    }
    let host_bits =
        String::from_utf8_lossy(&lab.ctl(&["allow", "100.64.1.1/24"])?.stderr).into_owned();
    ensure!(
        host_bits.contains("100.64.1.0/24"),
        "host-bits error should name the network: {host_bits}"
    );
    let from_policy =
        String::from_utf8_lossy(&lab.ctl(&["deny", "100.64.1.3"])?.stderr).into_owned();
    ensure!(
        from_policy.contains("policy"),
        "denying a policy entry should say so: {from_policy}"
    );
    ensure!(
        lab.list()? == before,
        "rejected commands must not change anything"
    );

    // Editing the policy file changes verdicts without a restart.
    let g0 = generation(&lab)?;
    let edited = POLICY.replace(
        "  - prefix: 100.64.1.3/32\n",
        "  - prefix: 100.64.1.2/32\n    comment: added by edit\n  - prefix: 100.64.1.3/32\n",
    );
    lab.write_policy(&edited)?;
    expect(sub, SUB4.into(), smtp4(), true, "after editing the policy")?;
    ensure!(
        generation(&lab)? > g0,
        "the generation must move on a reload"
    );
    lab.write_policy(POLICY)?;
    expect(
        sub,
        SUB4.into(),
        smtp4(),
        false,
        "after reverting the policy",
    )?;

    // A broken policy is rejected; the old verdicts stay in force.
    let g1 = generation(&lab)?;
    lab.write_policy("version: 1\nsubscribers:\n  - prefix: 100.64.1.0/33\n")?;
    let rejected = wait_until(CONVERGE, Duration::from_millis(50), || {
        Ok(lab.status()?.reloads_failed >= 1)
    })?;
    ensure!(rejected, "the broken policy should be counted as rejected");
    let reload = lab.ctl(&["reload"])?;
    ensure!(
        !reload.status.success(),
        "p25ctl reload of a broken policy must fail"
    );
    let status = lab.status()?;
    ensure!(
        status
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("policy.yaml:3:")),
        "the rejection should name file:line: {status:?}"
    );
    ensure!(
        generation(&lab)? == g1,
        "a rejected policy must not change the generation"
    );
    expect_policy(sub, "under a broken policy")?;
    lab.write_policy(POLICY)?;

    // A runtime allow (IPv6 this time) that must survive a crash and a restart.
    lab.ctl_ok(&["allow", "2001:db8:1::2", "--comment", "survives"])?;
    let smtp6 = SocketAddr::new(SERVER6.into(), SMTP);
    expect(
        sub,
        SUB6.into(),
        smtp6,
        true,
        "runtime-allowed IPv6 subscriber",
    )?;

    // kill -9: filtering continues from the pins, read commands fall back to them.
    let g2 = generation(&lab)?;
    lab.kill9()?;
    expect_policy(sub, "with the daemon dead")?;
    expect(
        sub,
        SUB6.into(),
        smtp6,
        true,
        "runtime entry with the daemon dead",
    )?;
    let from_pins = lab.status()?;
    ensure!(
        !from_pins.daemon,
        "status should come from the pins: {from_pins:?}"
    );
    ensure!(
        from_pins.interfaces.len() == 2,
        "both pinned links should be listed: {from_pins:?}"
    );
    ensure!(
        lab.ctl(&["allow", "100.64.1.9"])?.status.code() == Some(1),
        "changes must fail while the daemon is down"
    );

    // A new daemon adopts the state and reconciles.
    lab.start()?;
    ensure!(
        generation(&lab)? > g2,
        "the new daemon continues the generation"
    );
    ensure!(
        lab.log().contains("adopted=true"),
        "links should be adopted:\n{}",
        lab.log()
    );
    expect(sub, SUB6.into(), smtp6, true, "runtime entry after restart")?;
    expect_policy(sub, "after restart")?;
    let list = lab.list()?;
    ensure!(
        list.allow
            .iter()
            .any(|e| e.prefix.to_string() == "2001:db8:1::2/128" && e.source == Source::Runtime),
        "the runtime entry survives the restart: {list:?}"
    );
    Ok(())
}

#[test]
fn fifty_reloads_under_a_syn_stream_lose_and_leak_nothing() -> Result<()> {
    const PER_SOURCE: u16 = 1500;
    const RELOADS: usize = 50;
    let topology = Topology::build()?;
    let mut lab = DaemonLab::with_policy(&topology.router, POLICY)?;
    lab.start()?;
    let counters = SynCounters::install(&topology.server, SMTP, &[SUB4, SUB4_ALLOWED])?;
    let allowed = SynSender::new(&topology.sub, SUB4_ALLOWED)?;
    let blocked = SynSender::new(&topology.sub, SUB4)?;
    // Warm up ARP on both sides so the first SYNs are not queued behind resolution.
    expect(&topology.sub, SUB4_ALLOWED.into(), smtp4(), true, "warm-up")?;
    let base_allowed = counters.settled(SUB4_ALLOWED)?;
    let base_blocked = counters.settled(SUB4)?;

    let dst = SocketAddrV4::new(SERVER4, SMTP);
    let sender = thread::spawn(move || -> Result<()> {
        for i in 0..PER_SOURCE {
            let sport = 20_000 + i;
            allowed.send(sport, dst)?;
            blocked.send(sport, dst)?;
            thread::sleep(Duration::from_millis(4));
        }
        Ok(())
    });
    // Alternate between two valid policies that differ in unrelated entries, so every
    // reload really rewrites the maps.
    let other = POLICY.replace(
        "subscribers:\n",
        "subscribers:\n  - prefix: 100.64.200.0/24\n    mode: monitor\n",
    ) + "  - prefix: 100.64.7.7/32\n";
    for i in 0..RELOADS {
        lab.write_policy(if i % 2 == 0 { &other } else { POLICY })?;
        lab.ctl_ok(&["reload"])?;
    }
    sender
        .join()
        .map_err(|_| anyhow::anyhow!("sender panicked"))??;

    let got_allowed = counters.settled(SUB4_ALLOWED)? - base_allowed;
    let got_blocked = counters.settled(SUB4)? - base_blocked;
    let reloads = lab.status()?.reloads_ok;
    p25_tests::summary!(
        "{RELOADS} reloads under a SYN stream: allowlisted {got_allowed}/{PER_SOURCE} received, \
         blocked {got_blocked}/{PER_SOURCE} leaked ({reloads} reloads applied)"
    );
    ensure!(
        reloads as usize >= RELOADS,
        "only {reloads} reloads were applied"
    );
    ensure!(
        got_allowed == u64::from(PER_SOURCE),
        "{} allowlisted SYNs lost",
        u64::from(PER_SOURCE) - got_allowed
    );
    ensure!(got_blocked == 0, "{got_blocked} blocked SYNs leaked");
    Ok(())
}

fn interface_attached(lab: &DaemonLab, name: &str) -> Result<bool> {
    Ok(lab
        .status()?
        .interfaces
        .iter()
        .any(|i| i.name == name && i.attached))
}

#[test]
fn flapped_and_recreated_interfaces_are_filtered_again() -> Result<()> {
    let topology = Topology::build()?;
    let sub = &topology.sub;
    let mut lab = DaemonLab::with_policy(&topology.router, POLICY)?;
    lab.start()?;
    expect(sub, SUB4.into(), smtp4(), false, "baseline")?;

    // Down and up: the XDP link survives; filtering continues.
    topology.router.ip(&["link", "set", "r-sub", "down"])?;
    topology.router.ip(&["link", "set", "r-sub", "up"])?;
    expect(
        sub,
        SUB4.into(),
        SocketAddr::new(SERVER4.into(), SUBMISSION),
        true,
        "587 after a flap",
    )?;
    expect(sub, SUB4.into(), smtp4(), false, "subscriber after a flap")?;

    // Delete and recreate: the old link died with the interface; the daemon must notice
    // and attach to the new one.
    topology.recreate_subscriber_link()?;
    let back = wait_until(CONVERGE, Duration::from_millis(100), || {
        interface_attached(&lab, "r-sub")
    })?;
    ensure!(
        back,
        "r-sub was not re-attached after being recreated:\n{}",
        lab.log()
    );
    expect(
        sub,
        SUB4.into(),
        SocketAddr::new(SERVER4.into(), SUBMISSION),
        true,
        "587 on the new link",
    )?;
    expect_policy(sub, "on the recreated link")?;
    Ok(())
}

#[test]
fn sighup_reloads_the_policy() -> Result<()> {
    let topology = Topology::build()?;
    let mut lab = DaemonLab::with_policy(&topology.router, POLICY)?;
    lab.start()?;
    let before = lab.status()?.reloads_ok;
    let pid = lab.pid().context("daemon pid")?;
    let kill = std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()?;
    ensure!(kill.success(), "kill -HUP failed");
    let reloaded = wait_until(CONVERGE, Duration::from_millis(50), || {
        Ok(lab.status()?.reloads_ok > before)
    })?;
    ensure!(reloaded, "SIGHUP did not reload:\n{}", lab.log());
    Ok(())
}

/// Creates a map with `bpftool map create` and pins it at `path` (`spec`: type, key,
/// value, entries and name, in bpftool's words), as another build of p25 might have.
fn pin_map(path: &std::path::Path, spec: &[&str]) -> Result<()> {
    let out = std::process::Command::new("bpftool")
        .args(["map", "create"])
        .arg(path)
        .args(spec)
        .output()?;
    ensure!(
        out.status.success(),
        "bpftool map create {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Pins left by another build must be reported, never reused and misread.
#[test]
fn incompatible_pinned_maps_are_reported() -> Result<()> {
    let topology = Topology::build()?;
    // A CONFIG map whose value is twice the size this build uses.
    let config_size = (2 * size_of::<Config>()).to_string();
    let mut lab = DaemonLab::with_policy(&topology.router, POLICY)?;
    let maps = lab.pin_root.join(format!("v{ABI_VERSION}/maps"));
    std::fs::create_dir_all(&maps)?;
    let config = maps.join("CONFIG");
    pin_map(
        &config,
        &[
            "type",
            "array",
            "key",
            "4",
            "value",
            &config_size,
            "entries",
            "1",
            "name",
            "CONFIG",
        ],
    )?;
    let (status, log) = lab.run_to_exit(Duration::from_secs(15))?;
    ensure!(
        !status.success(),
        "p25d must refuse incompatible pins:\n{log}"
    );
    ensure!(
        log.contains("CONFIG")
            && log.contains(&format!("value {config_size} bytes"))
            && log.contains(&format!(
                "expected type Array, key 4 bytes, value {} bytes",
                size_of::<Config>()
            )),
        "the error should name the map and both layouts:\n{log}"
    );
    ensure!(
        !lab.pin_root.join(format!("v{ABI_VERSION}/links")).exists(),
        "nothing may be attached:\n{log}"
    );

    // The right type and sizes, but a capacity too small to hold what this build needs.
    let mut lab = DaemonLab::with_policy(&topology.router, POLICY)?;
    let maps = lab.pin_root.join(format!("v{ABI_VERSION}/maps"));
    std::fs::create_dir_all(&maps)?;
    let buckets = maps.join("SYN_BUCKETS");
    pin_map(
        &buckets,
        &[
            "type",
            "lru_hash",
            "key",
            "20",
            "value",
            "16",
            "entries",
            "16",
            "name",
            "SYN_BUCKETS",
        ],
    )?;
    let (status, log) = lab.run_to_exit(Duration::from_secs(15))?;
    ensure!(
        !status.success(),
        "p25d must refuse a pin too small:\n{log}"
    );
    ensure!(
        log.contains("SYN_BUCKETS")
            && log.contains("16 entries")
            && log.contains("at least 65536 entries"),
        "the error should name the map and both capacities:\n{log}"
    );

    // An ABI record of another version, with the right sizes everywhere.
    let mut lab = DaemonLab::with_policy(&topology.router, POLICY)?;
    let maps = lab.pin_root.join(format!("v{ABI_VERSION}/maps"));
    std::fs::create_dir_all(&maps)?;
    let abi = maps.join("ABI");
    for args in [
        vec![
            "map",
            "create",
            abi.to_str().unwrap_or_default(),
            "type",
            "array",
            "key",
            "4",
            "value",
            "8",
            "entries",
            "1",
            "name",
            "ABI",
        ],
        vec![
            "map",
            "update",
            "pinned",
            abi.to_str().unwrap_or_default(),
            "key",
            "0",
            "0",
            "0",
            "0",
            "value",
            "99",
            "0",
            "0",
            "0",
            "1",
            "2",
            "3",
            "4",
        ],
    ] {
        let out = std::process::Command::new("bpftool").args(&args).output()?;
        ensure!(
            out.status.success(),
            "bpftool {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let (status, log) = lab.run_to_exit(Duration::from_secs(15))?;
    ensure!(
        !status.success(),
        "p25d must refuse a foreign ABI record:\n{log}"
    );
    ensure!(
        log.contains("ABI version 99"),
        "the error should name the version found:\n{log}"
    );
    Ok(())
}

/// A real ABI v3 state (the object of commit 9e32a0e, pinned, filled and attached as its
/// p25d did: `p25_tests::abi_v3`) is taken over without a gap: the new maps are filled
/// first, each v3 link gets today's program for its role in place and moves to the new
/// directory, and the v3 directory disappears. The business customer has a SYN limit, so
/// v3's own SYN_BUCKETS holds its bucket, which must be carried over; a `p25ctl allow`
/// entry in v3's runtime state file stays allowlisted. The 1M-entry version under a SYN
/// stream is in scale.rs.
#[test]
fn state_of_abi_v3_is_migrated_without_a_gap() -> Result<()> {
    const V3_POLICY: &str = p25_tests::lab_policy!(
        "defaults:\n  mode: enforce\n  fragments: pass\n",
        "allow:\n  - prefix: 100.64.1.3/32\n    comment: business customer\n",
        "    max_syn_per_minute: 600\n",
    );
    let topology = Topology::build()?;
    let sub = &topology.sub;
    let mut lab = DaemonLab::with_policy(&topology.router, V3_POLICY)?;
    let policy = filter_user::policy::load(&lab.policy_path())
        .context("reading the lab policy")?
        .policy;
    let runtime = [IpNet::from(IpAddr::from(SUB6_ALLOWED))];
    abi_v3::write_state_file(&lab.dir.join("state.json"), &runtime)?;
    let v3 = abi_v3::pin(&lab.pin_root, &topology.router, &policy, &runtime)?;
    expect_policy(sub, "under the ABI v3 links")?;
    expect(sub, SUB6.into(), smtp6(), false, "v6 subscriber under v3")?;
    expect(
        sub,
        SUB6_ALLOWED.into(),
        smtp6(),
        true,
        "v6 runtime entry under v3",
    )?;

    lab.start()?;
    let moved = v3.check_migrated(
        &lab.pin_root,
        &lab.log(),
        &[("r-sub", "p25_xdp"), ("r-up", "p25_tc_upstream")],
    )?;
    p25_tests::summary!("ABI v3 -> v{ABI_VERSION}: {}", moved.join("; "));
    // The business customer's SYNs through the v3 links filled v3's bucket for it.
    ensure!(
        lab.log()
            .contains("carried over SYN buckets version=3 buckets=1"),
        "v3's SYN bucket should be carried over:\n{}",
        lab.log()
    );
    for name in ["r-sub", "r-up"] {
        ensure!(
            interface_attached(&lab, name)?,
            "{name} should be attached after migration:\n{}",
            lab.log()
        );
    }
    expect_policy(sub, "after migration")?;
    expect(
        sub,
        SUB6.into(),
        smtp6(),
        false,
        "v6 subscriber after migration",
    )?;
    ensure!(
        lab.runtime_allow()? == runtime,
        "v3's runtime entry should be kept: {:?}",
        lab.runtime_allow()?
    );
    expect(
        sub,
        SUB6_ALLOWED.into(),
        smtp6(),
        true,
        "v6 runtime entry after migration",
    )?;
    Ok(())
}

/// State pinned by a newer ABI version is neither migrated nor removed: p25d refuses to
/// start with a message naming the directory, and the newer links keep filtering.
#[test]
fn state_of_a_newer_abi_version_is_left_alone() -> Result<()> {
    let topology = Topology::build()?;
    let sub = &topology.sub;
    let mut lab = DaemonLab::with_policy(&topology.router, POLICY)?;
    lab.start()?;
    lab.kill9()?;
    let newer = lab.pin_root.join(format!("v{}", ABI_VERSION + 1));
    std::fs::rename(lab.pin_root.join(format!("v{ABI_VERSION}")), &newer)
        .context("renaming the pin directory on bpffs")?;
    let (status, log) = lab.run_to_exit(Duration::from_secs(15))?;
    ensure!(
        !status.success(),
        "p25d must refuse newer pinned state:\n{log}"
    );
    ensure!(
        log.contains(&newer.display().to_string()) && log.contains("newer"),
        "the error should name the newer state:\n{log}"
    );
    ensure!(
        newer.join("links").read_dir()?.count() == 2 && newer.join("maps").exists(),
        "the newer state must be untouched:\n{log}"
    );
    ensure!(
        !lab.pin_root.join(format!("v{ABI_VERSION}")).exists(),
        "nothing of this version may be created:\n{log}"
    );
    expect(sub, SUB4.into(), smtp4(), false, "newer links still filter")?;
    Ok(())
}

/// An `--events` path p25d cannot write is a start-up error naming the path, not a daemon
/// that runs on without its event log; nothing gets loaded or attached.
#[test]
fn unwritable_event_log_is_a_start_up_error() -> Result<()> {
    let netns = Netns::new("evt")?;
    let mut lab = DaemonLab::with_policy(&netns, POLICY)?;
    let path = lab.dir.join("no-such-dir/events.jsonl");
    let path_arg = path.to_string_lossy().into_owned();
    lab.run_args(&["--events", &path_arg]);
    let (status, log) = lab.run_to_exit(Duration::from_secs(15))?;
    ensure!(!status.success(), "p25d must refuse to start:\n{log}");
    ensure!(
        log.contains(&path_arg) && log.contains("--events"),
        "the error should name the path and the flag:\n{log}"
    );
    ensure!(
        !lab.pin_root.exists(),
        "nothing may be pinned before the event log is open:\n{log}"
    );
    Ok(())
}
