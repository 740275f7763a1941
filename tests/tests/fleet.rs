//! Fleet mode against a real etcd (issue 13, docs/fleet.md): three p25d routers, each in
//! its own network namespace with its own pins, follow one etcd (Debian's etcd-server,
//! tests/src/etcd.rs). Every verdict is read with BPF_PROG_TEST_RUN over the router's
//! pinned maps; every wait is bounded.

use std::{
    net::Ipv4Addr,
    sync::{Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use filter_common::classify::Action;
use filter_user::fleet::{
    Layout, Reason,
    views::{FleetAllowView, SourceView},
};
use p25_tests::{
    etcd::lab::{BUSINESS, FOLLOW_TIMEOUT, FleetLab, POLICY, PREFIX, Router},
    netns::wait_until,
    summary,
};

/// One fleet lab at a time: each starts an etcd and three p25d (each loading and
/// verifying the dataplane), and four of them at once on a loaded 2-CPU machine can take
/// longer than a daemon's start-up wait. Sequential, the four tests take about as long.
static ONE_LAB: Mutex<()> = Mutex::new(());

fn one_lab() -> MutexGuard<'static, ()> {
    // A test that failed while holding the lock poisoned it; the next may still run.
    ONE_LAB.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A subscriber with no allow entry: dropped until the fleet allows it.
const SUB: Ipv4Addr = Ipv4Addr::new(100, 64, 1, 10);
/// Another subscriber that nothing ever allows.
const OTHER: Ipv4Addr = Ipv4Addr::new(100, 64, 1, 11);

fn allow(lab: &FleetLab, ip: Ipv4Addr) -> Result<FleetAllowView> {
    let out = lab.fleet_ok(&[
        "allow",
        &ip.to_string(),
        "--comment",
        "fleet test",
        "--json",
    ])?;
    serde_json::from_str(&out).with_context(|| format!("p25ctl fleet allow printed {out}"))
}

/// A key in the watched range that routers ignore (neither the policy nor an allow entry).
fn padding_key(i: usize) -> String {
    format!("{PREFIX}/padding/{i}")
}

/// Waits until `router`'s metric `name{labels}` satisfies `ok`; returns the value.
fn wait_metric(
    router: &Router,
    name: &str,
    labels: &[(&str, &str)],
    ok: impl Fn(f64) -> bool,
) -> Result<f64> {
    let mut last = None;
    let done = wait_until(FOLLOW_TIMEOUT, Duration::from_millis(100), || {
        last = router.metric(name, labels)?;
        Ok(last.is_some_and(&ok))
    })?;
    ensure!(
        done,
        "{}: {name}{labels:?} is {last:?} after {FOLLOW_TIMEOUT:?}; its log:\n{}",
        router.name,
        router.daemon.log()
    );
    last.context("metric")
}

/// Waits until `router`'s status satisfies `ok`; returns it.
fn wait_source(router: &Router, ok: impl Fn(&SourceView) -> bool) -> Result<SourceView> {
    let mut last = None;
    let done = wait_until(FOLLOW_TIMEOUT, Duration::from_millis(100), || {
        let source = router.source()?;
        let hit = ok(&source);
        last = Some(source);
        Ok(hit)
    })?;
    ensure!(
        done,
        "{}: status source still {last:?} after {FOLLOW_TIMEOUT:?}; its log:\n{}",
        router.name,
        router.daemon.log()
    );
    last.context("source")
}

#[test]
fn fleet_allow_and_deny_reach_every_router_and_status_lists_them() -> Result<()> {
    let _one = one_lab();
    let mut lab = FleetLab::start(3, POLICY)?;
    lab.check_verdicts(SUB, Action::Drop)?;
    lab.check_verdicts(BUSINESS, Action::Pass)?;

    let allowed = allow(&lab, SUB)?;
    ensure!(
        allowed.key == format!("{PREFIX}/allow/100.64.1.10_32"),
        "key layout: {allowed:?}"
    );
    let took = lab.wait_verdicts(SUB, Action::Pass, FOLLOW_TIMEOUT)?;
    lab.check_verdicts(OTHER, Action::Drop)?;
    lab.wait_revision(allowed.revision)?;
    summary!("fleet allow reached 3 routers in {took:?}");

    let list = lab.fleet_ok(&["list", "--json"])?;
    ensure!(list.contains("100.64.1.10/32"), "fleet list: {list}");

    // Every router registered, with the revision it applied.
    let status = lab.fleet_status()?;
    let names: Vec<&str> = status
        .routers
        .iter()
        .map(|r| r.status.router.as_str())
        .collect();
    ensure!(
        names == ["edge-1", "edge-2", "edge-3"],
        "fleet status routers: {status:?}"
    );
    for router in &status.routers {
        ensure!(
            router.status.revision >= allowed.revision && router.in_sync && router.status.source_up,
            "fleet status: {router:?} (allow at revision {})",
            allowed.revision
        );
    }
    let text = lab.fleet_ok(&["status"])?;
    ensure!(
        ["edge-1", "edge-2", "edge-3"]
            .iter()
            .all(|name| text.contains(name)),
        "fleet status (text):\n{text}"
    );
    for router in &lab.routers {
        let revision = router.metric("p25_policy_revision", &[])?;
        ensure!(
            revision.is_some_and(|r| r >= allowed.revision as f64),
            "{}: p25_policy_revision {revision:?}",
            router.name
        );
        let up = router.metric("p25_policy_source_up", &[])?;
        ensure!(
            up == Some(1.0),
            "{}: p25_policy_source_up {up:?}",
            router.name
        );
    }

    lab.fleet_ok(&["deny", &SUB.to_string(), "--json"])?;
    let took = lab.wait_verdicts(SUB, Action::Drop, FOLLOW_TIMEOUT)?;
    lab.check_verdicts(BUSINESS, Action::Pass)?;
    summary!("fleet deny reached 3 routers in {took:?}");
    Ok(())
}

/// The lab policy with its subscriber prefix (line 7, column 13) made a /33: the check
/// fails there.
fn bad_policy() -> String {
    POLICY.replace("100.64.0.0/10", "100.64.0.0/33")
}

#[test]
fn fleet_refuses_invalid_policies_and_keeps_the_old_one() -> Result<()> {
    let _one = one_lab();
    let mut lab = FleetLab::start(3, POLICY)?;
    let before = lab.etcd.revision()?;

    // `fleet push` checks first and names file:line:col.
    let file = lab.etcd.dir.join("bad-policy.yaml");
    std::fs::write(&file, bad_policy())?;
    let out = lab.fleet(&["push", &file.display().to_string()])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success(),
        "fleet push of a bad policy succeeded"
    );
    let located = format!("{}:7:", file.display());
    ensure!(
        stderr.contains(&located),
        "fleet push should name {located}…, printed:\n{stderr}"
    );
    ensure!(
        lab.etcd.revision()? == before,
        "the refused push still wrote to etcd"
    );
    ensure!(
        lab.etcd.get(&format!("{PREFIX}/policy"))?.as_deref() == Some(POLICY),
        "the policy key changed"
    );

    // Behind push's back: straight into etcd.
    lab.etcd.put(&format!("{PREFIX}/policy"), &bad_policy())?;
    for router in &lab.routers {
        let source = wait_source(router, |s| {
            s.problems.iter().any(|p| {
                p.reason == Reason::PolicyInvalid && p.message.contains("etcd:/p25/policy:7:")
            })
        })?;
        ensure!(source.up, "{}: {source:?}", router.name);
        wait_metric(
            router,
            "p25_policy_source_errors_total",
            &[("reason", "policy_invalid")],
            |v| v >= 1.0,
        )?;
    }
    // The old policy is still in force: subscribers dropped, the business allowed.
    lab.check_verdicts(SUB, Action::Drop)?;
    lab.check_verdicts(BUSINESS, Action::Pass)?;
    let status = lab.fleet_status()?;
    for router in &status.routers {
        ensure!(
            router
                .status
                .error
                .as_deref()
                .is_some_and(|e| e.contains("etcd:/p25/policy"))
                && !router.in_sync,
            "fleet status should show the rejected policy: {router:?}"
        );
    }

    // A good push clears the error and takes effect (a new allow prefix in the document).
    let good = POLICY.replace("100.64.3.0/24", "100.64.4.0/24");
    let file = lab.etcd.dir.join("good-policy.yaml");
    std::fs::write(&file, &good)?;
    lab.fleet_ok(&["push", &file.display().to_string()])?;
    lab.wait_verdicts(Ipv4Addr::new(100, 64, 4, 1), Action::Pass, FOLLOW_TIMEOUT)?;
    lab.wait_verdicts(BUSINESS, Action::Drop, FOLLOW_TIMEOUT)?;
    for router in &lab.routers {
        wait_source(router, |s| s.problems.is_empty() && s.last_error.is_none())?;
    }
    Ok(())
}

#[test]
fn fleet_keeps_filtering_without_etcd_and_catches_up() -> Result<()> {
    let _one = one_lab();
    let mut lab = FleetLab::start(3, POLICY)?;
    let allowed = allow(&lab, SUB)?;
    lab.wait_verdicts(SUB, Action::Pass, FOLLOW_TIMEOUT)?;
    lab.wait_revision(allowed.revision)?;

    lab.etcd.kill()?;
    for router in &lab.routers {
        wait_metric(router, "p25_policy_source_up", &[], |v| v == 0.0)?;
        let source = router.source()?;
        ensure!(!source.up, "{}: {source:?}", router.name);
    }
    // Still filtering with the last policy, fleet entry included.
    lab.check_verdicts(SUB, Action::Pass)?;
    lab.check_verdicts(OTHER, Action::Drop)?;
    lab.check_verdicts(BUSINESS, Action::Pass)?;

    // Local p25ctl keeps working, and its entries combine with the fleet's.
    let local = Ipv4Addr::new(100, 64, 1, 12);
    let edge1 = lab.router("edge-1")?;
    edge1.daemon.ctl_ok(&["allow", &format!("{local}/32")])?;
    edge1.wait_verdict(local, Action::Pass, FOLLOW_TIMEOUT)?;
    edge1.wait_verdict(SUB, Action::Pass, FOLLOW_TIMEOUT)?;

    // A router that starts while etcd is down (with no pins left) starts from its
    // snapshot.
    let edge2 = lab.router("edge-2")?;
    edge2.restart_without_pins()?;
    edge2.wait_verdict(SUB, Action::Pass, FOLLOW_TIMEOUT)?;
    ensure!(
        edge2.verdict(OTHER)? == Action::Drop,
        "edge-2 lets {OTHER} through"
    );
    ensure!(
        edge2.verdict(BUSINESS)? == Action::Pass,
        "edge-2 lost the policy's allow entry"
    );
    let source = edge2.source()?;
    ensure!(
        !source.up && source.revision == allowed.revision,
        "edge-2 should run on its snapshot at revision {}: {source:?}",
        allowed.revision
    );
    ensure!(
        edge2.metric("p25_policy_source_up", &[])? == Some(0.0),
        "edge-2: source up without etcd"
    );

    // etcd back: every router reconnects, and a change made now arrives.
    lab.etcd.restart()?;
    let late = Ipv4Addr::new(100, 64, 1, 13);
    let allowed = allow(&lab, late)?;
    let took = lab.wait_verdicts(late, Action::Pass, FOLLOW_TIMEOUT)?;
    lab.wait_revision(allowed.revision)?;
    for router in &lab.routers {
        wait_metric(router, "p25_policy_source_up", &[], |v| v == 1.0)?;
    }
    summary!("after etcd came back, a fleet allow reached 3 routers in {took:?}");
    Ok(())
}

/// Padding written under the prefix while a router is frozen, to make etcd give up on its
/// watch: first more bytes than the HTTP/2 windows and socket buffers between etcd and the
/// router hold (so that etcd's send to it blocks), then more watch responses than etcd
/// queues for one watch stream (128), so that etcd takes the watcher out of its synced
/// set. A compaction past its position then cancels its watch with "required revision has
/// been compacted".
const PADDING_LARGE: usize = 40;
const PADDING_LARGE_BYTES: usize = 1 << 20;
const PADDING_SMALL: usize = 200;

#[test]
fn fleet_router_recovers_from_a_compacted_watch() -> Result<()> {
    // The padding must be inside what routers watch, or it would not slow the watch down.
    let (start, end) = Layout::new(PREFIX)?.watched_range();
    ensure!(
        (start.as_str()..end.as_str()).contains(&padding_key(0).as_str()),
        "padding key {} is outside the watched range {start}..{end}",
        padding_key(0)
    );
    let _one = one_lab();
    let mut lab = FleetLab::start(3, POLICY)?;
    let frozen = "edge-2";
    let router = lab.router(frozen)?;
    let compacted_before = router
        .metric("p25_policy_source_errors_total", &[("reason", "compacted")])?
        .unwrap_or(0.0);
    router.signal(libc::SIGSTOP)?;
    let result = (|| -> Result<i64> {
        let large = "x".repeat(PADDING_LARGE_BYTES);
        for i in 0..PADDING_LARGE + PADDING_SMALL {
            let value = if i < PADDING_LARGE {
                large.as_str()
            } else {
                "x"
            };
            lab.etcd.put(&padding_key(i), value)?;
        }
        let allowed = allow(&lab, SUB)?;
        lab.etcd
            .etcdctl(&["del", "--prefix", &format!("{PREFIX}/padding/")])?;
        let compacted = lab.etcd.compact_all()?;
        // The others follow while edge-2 is frozen.
        for router in lab.routers.iter_mut().filter(|r| r.name != frozen) {
            router.wait_verdict(SUB, Action::Pass, FOLLOW_TIMEOUT)?;
        }
        ensure!(compacted > allowed.revision);
        Ok(allowed.revision)
    })();
    // Thaw it whatever happened: the checks below (and a useful log) need it running.
    lab.router(frozen)?.signal(libc::SIGCONT)?;
    let revision = result?;
    let router = lab.router(frozen)?;
    router.wait_verdict(SUB, Action::Pass, FOLLOW_TIMEOUT)?;
    router.wait_revision(revision, FOLLOW_TIMEOUT)?;
    let compacted = wait_metric(
        router,
        "p25_policy_source_errors_total",
        &[("reason", "compacted")],
        |v| v > compacted_before,
    )?;
    summary!("{frozen} saw its watch compacted ({compacted} times) and recovered with a full read");
    ensure!(
        router.verdict(OTHER)? == Action::Drop,
        "{frozen} lets {OTHER} through"
    );
    Ok(())
}
