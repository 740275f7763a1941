//! The fleet demo: `cargo xtask demo --fleet` builds everything and runs this.
//!
//! Two border routers (p25d in their own network namespaces, with their own pins) follow
//! one etcd (the lab of `p25_tests::etcd::lab`, as in the fleet tests). The demo shows what
//! an operator does and sees: `p25ctl fleet status`, a fleet allow and deny taking effect
//! on both routers, then etcd stopped while both keep filtering with what they applied.
//! Each router's verdict on a SYN to port 25 is read with BPF_PROG_TEST_RUN of its own
//! `p25_xdp` over its pinned maps. Every result is also checked: the demo exits non-zero if
//! p25 did not do its job. The lab is torn down at the end, and the demo checks that its
//! namespaces and pins are gone.

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use filter_common::classify::Action;
use p25_tests::{
    demo::{Checks, heading},
    etcd::lab::{BUSINESS, FOLLOW_TIMEOUT, FleetLab, POLICY, PREFIX},
    netns::NETNS_RUN_DIR,
};

/// A residential subscriber: port 25 blocked until the fleet allows it.
const RESIDENTIAL: Ipv4Addr = Ipv4Addr::new(100, 64, 1, 10);
/// A subscriber allowed before etcd goes away.
const RELAY: Ipv4Addr = Ipv4Addr::new(100, 64, 2, 25);

fn main() -> ExitCode {
    if let Some(bad) = std::env::args().nth(1) {
        eprintln!("p25-fleet-demo: unknown argument {bad:?} (use `cargo xtask demo --fleet`)");
        return ExitCode::FAILURE;
    }
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(err) => {
            eprintln!("p25-fleet-demo: error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<bool> {
    let started = Instant::now();
    println!("p25 fleet demo: two border routers follow one policy from etcd, and keep");
    println!("filtering when etcd is gone (docs/fleet.md).");
    println!("building the lab: etcd and two p25d routers in network namespaces ...");
    let mut lab = FleetLab::start(2, POLICY)?;
    let mut checks = Checks::default();
    let namespaces: Vec<PathBuf> = std::iter::once(lab.ctl.path())
        .chain(lab.routers.iter().map(|r| r.netns.path()))
        .collect();
    let pins: Vec<PathBuf> = lab
        .routers
        .iter()
        .map(|r| r.daemon.pin_root.clone())
        .collect();
    println!(
        "  etcd {}; routers {} (p25d --etcd ... --router NAME), the fleet policy at {PREFIX}/policy:",
        lab.etcd.place(),
        lab.routers
            .iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    );
    for line in POLICY.lines() {
        println!("    | {line}");
    }

    heading("p25ctl fleet status: every router and the revision it enforces");
    print!("{}", lab.fleet_ok(&["status"])?);

    heading("Before: port 25 from a residential subscriber and from the business");
    verdict_table(
        &mut lab,
        &mut checks,
        &[
            (RESIDENTIAL, Action::Drop, "residential"),
            (BUSINESS, Action::Pass, "business (policy allow)"),
        ],
    )?;

    heading("p25ctl fleet allow: one put in etcd, every router applies it");
    let ip = RESIDENTIAL.to_string();
    print!(
        "{}",
        lab.fleet_ok(&[
            "allow",
            &ip,
            "--comment",
            "demo: ticket 4711",
            "--expires",
            "1d"
        ])?
    );
    let took = lab.wait_verdicts(RESIDENTIAL, Action::Pass, FOLLOW_TIMEOUT);
    println!(
        "  both routers pass {ip} -> port 25 {}",
        after(&mut checks, &took, "fleet allow reaches both routers")
    );
    print!("{}", lab.fleet_ok(&["list"])?);

    heading("p25ctl fleet deny: removed everywhere");
    print!("{}", lab.fleet_ok(&["deny", &ip])?);
    let took = lab.wait_verdicts(RESIDENTIAL, Action::Drop, FOLLOW_TIMEOUT);
    println!(
        "  both routers drop {ip} -> port 25 again {}",
        after(&mut checks, &took, "fleet deny reaches both routers")
    );

    heading("etcd stops: the routers keep filtering with what they applied");
    print!(
        "{}",
        lab.fleet_ok(&["allow", &RELAY.to_string(), "--comment", "demo: relay"])?
    );
    let relay_ok = lab
        .wait_verdicts(RELAY, Action::Pass, FOLLOW_TIMEOUT)
        .is_ok();
    checks.check(relay_ok, "fleet allow of the relay before etcd stops");
    lab.etcd.stop()?;
    println!("  etcd stopped (SIGKILL)");
    for router in &lab.routers {
        let down =
            p25_tests::netns::wait_until(FOLLOW_TIMEOUT, Duration::from_millis(100), || {
                Ok(router.metric("p25_policy_source_up", &[])? == Some(0.0))
            })?;
        let source = router.source()?;
        println!(
            "  {}: p25_policy_source_up 0, enforcing revision {} ({})  {}",
            router.name,
            source.revision,
            short(source.last_error.as_deref().unwrap_or("no error")),
            checks.check(
                down && !source.up,
                format!("{} notices that etcd is gone", router.name)
            )
        );
    }
    verdict_table(
        &mut lab,
        &mut checks,
        &[
            (RESIDENTIAL, Action::Drop, "residential"),
            (BUSINESS, Action::Pass, "business (policy allow)"),
            (RELAY, Action::Pass, "relay (fleet allow)"),
        ],
    )?;

    heading("Result");
    let ok = checks.failed.is_empty();
    if ok {
        println!(
            "all {} checks as expected: one fleet allow or deny reached both routers, and \
             both kept filtering without etcd",
            checks.passed
        );
    } else {
        println!(
            "{} checks as expected, {} NOT:",
            checks.passed,
            checks.failed.len()
        );
        for what in &checks.failed {
            println!("  - {what}");
        }
    }

    heading("Teardown");
    drop(lab);
    let left: Vec<String> = namespaces
        .iter()
        .chain(&pins)
        .filter(|p| p.exists())
        .map(|p| p.display().to_string())
        .collect();
    let clean = left.is_empty();
    println!(
        "  routers stopped, pins removed, etcd stopped and its data removed, {} namespaces \
         deleted ({NETNS_RUN_DIR}): {}",
        namespaces.len(),
        checks.check(clean, format!("nothing left behind (left: {left:?})"))
    );
    println!("fleet demo done in {:.0?}", started.elapsed());
    Ok(ok && clean)
}

/// "after 12.3ms  ok" for a wait that succeeded (checked as `what`), the error otherwise.
fn after(checks: &mut Checks, took: &Result<Duration>, what: &str) -> String {
    let text = took
        .as_ref()
        .map_or_else(|e| format!("(not: {e:#})"), |d| format!("after {d:.1?}"));
    format!("{text}  {}", checks.check(took.is_ok(), what))
}

/// The start of an error message (the full text is in `p25ctl status`).
fn short(text: &str) -> String {
    const MAX: usize = 72;
    match text.char_indices().nth(MAX) {
        Some((end, _)) => format!("{}...", &text[..end]),
        None => text.to_owned(),
    }
}

/// Prints every router's verdict on each `(source, expected, label)` and checks it.
fn verdict_table(
    lab: &mut FleetLab,
    checks: &mut Checks,
    rows: &[(Ipv4Addr, Action, &str)],
) -> Result<()> {
    for (ip, want, label) in rows {
        for router in &mut lab.routers {
            let got = router
                .verdict(*ip)
                .with_context(|| format!("{}'s verdict on {ip}", router.name))?;
            println!(
                "  {:<7} {ip:<13} -> :25  {:<26} {got:?}  {}",
                router.name,
                label,
                checks.check(
                    got == *want,
                    format!(
                        "{}: {ip} ({label}) is {got:?}, expected {want:?}",
                        router.name
                    )
                )
            );
        }
    }
    Ok(())
}
