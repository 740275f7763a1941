//! End to end with real SMTP: swaks clients in subscriber namespaces, aiosmtpd on the
//! "internet" host, and the real p25d on the border router with `policies/lab.yaml`
//! (see `p25_tests::smtp_lab` for the topology). Mail counts as delivered only when swaks
//! finished the transaction *and* the server logged the message.
//!
//! Each test builds its own lab (unique namespaces, pins, socket, scratch directory), so
//! they run in parallel with each other and with the other test binaries.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use p25_tests::{
    netns::wait_until,
    smtp_lab::{
        Attempt, DELIVERY_TIMEOUT, MAILING_SUBSCRIBERS, Naming, Outcome, PORTS, Role, SERVER4,
        SMTP, SUBMISSION, SUBMISSIONS, SmtpLab, spec,
    },
    summary,
    traffic::{SynCounters, SynSender},
};

/// Time for a runtime allow or deny to reach the maps.
const CONVERGE: Duration = Duration::from_secs(8);

/// Runs one attempt and checks its outcome; returns it for the summary.
fn check(lab: &SmtpLab, role: Role, src: IpAddr, port: u16, want: &Outcome) -> Result<Attempt> {
    let attempt = lab.send_mail(role, src, port, want.timeout())?;
    ensure!(
        &attempt.outcome == want,
        "{role:?} {src} → port {port}: expected {}, got {}\n--- swaks transcript ---\n{}",
        want.describe(),
        attempt.outcome.describe(),
        attempt.transcript
    );
    Ok(attempt)
}

/// 25 blocked for subscribers, delivered for the allowlisted business customer and for
/// non-subscriber space; 587 and 465 always delivered. IPv4, IPv6 and the VLAN-tagged
/// link, every host with every address it has.
#[test]
fn smtp_verdicts_over_ipv4_ipv6_and_vlan() -> Result<()> {
    let lab = SmtpLab::build(Naming::Test)?;
    let mut attempts = 0;
    for role in MAILING_SUBSCRIBERS.into_iter().chain([Role::Infra]) {
        let host = spec(role).context("host")?;
        for src in host.sources() {
            for port in PORTS {
                check(&lab, role, src, port, &host.expected(port))?;
                attempts += 1;
            }
        }
    }
    let delivered = lab.deliveries()?.len();
    summary!(
        "e2e: {attempts} swaks attempts over IPv4, IPv6 and VLAN {}: all as expected, \
         {delivered} messages at the server",
        p25_tests::smtp_lab::VLAN_ID
    );

    // The VLAN subscriber becomes allowlisted at run time: port 25 then passes over the
    // tagged link too, and is blocked again after the deny.
    let vlan = spec(Role::Vlan).context("vlan host")?;
    for src in [IpAddr::V4(vlan.v4), IpAddr::V6(vlan.v6.context("v6")?.0)] {
        lab.daemon
            .ctl_ok(&["allow", &src.to_string(), "--comment", "e2e"])?;
        let passed = wait_until(CONVERGE, Duration::from_millis(100), || {
            Ok(lab
                .send_mail(Role::Vlan, src, SMTP, DELIVERY_TIMEOUT)?
                .outcome
                == Outcome::Delivered)
        })?;
        ensure!(
            passed,
            "VLAN {src}: port 25 not delivered after p25ctl allow"
        );
        lab.daemon.ctl_ok(&["deny", &src.to_string()])?;
        check(&lab, Role::Vlan, src, SMTP, &Outcome::Blocked)?;
        check(&lab, Role::Vlan, src, SUBMISSION, &Outcome::Delivered)?;
    }
    Ok(())
}

/// MAAWG practice 6: segments from source port 25 injected from the upstream side are
/// dropped towards a non-allowlisted subscriber and pass towards an allowlisted one,
/// counted at the receivers.
#[test]
fn spoofed_source_port_25_from_upstream() -> Result<()> {
    const COUNT: u16 = 200;
    const DPORT: u16 = 2525;
    let lab = SmtpLab::build(Naming::Test)?;
    let targets: Vec<(Role, Ipv4Addr, bool)> = [Role::Residential, Role::Vlan, Role::Business]
        .into_iter()
        .map(|role| {
            let host = spec(role).context("host")?;
            Ok((role, host.v4, host.port25_passes))
        })
        .collect::<Result<_>>()?;
    let counters = targets
        .iter()
        .map(|(role, _, _)| SynCounters::install(&lab.host(*role)?.netns, DPORT, &[SERVER4]))
        .collect::<Result<Vec<_>>>()?;
    // Warm up ARP/ND along the path with real mail, so that no injected segment waits for
    // neighbour resolution.
    for (role, addr, _) in &targets {
        check(
            &lab,
            *role,
            IpAddr::V4(*addr),
            SUBMISSION,
            &Outcome::Delivered,
        )?;
    }
    let sender = SynSender::new(&lab.internet, SERVER4)?;
    for _ in 0..COUNT {
        for (_, addr, _) in &targets {
            sender.send(SMTP, SocketAddrV4::new(*addr, DPORT))?;
        }
    }
    for ((role, addr, passes), counter) in targets.iter().zip(&counters) {
        let got = counter.settled(SERVER4)?;
        let want = if *passes { u64::from(COUNT) } else { 0 };
        summary!("spoofing: {COUNT} segments from port 25 → {role:?} {addr}: {got} received");
        ensure!(
            got == want,
            "{role:?} {addr}: {got} of {COUNT} spoofed segments arrived, expected {want}"
        );
    }
    let dropped = lab.verdict_packets("inbound", "ipv4", "dropped")?;
    ensure!(
        dropped >= 2 * u64::from(COUNT),
        "p25 counted {dropped} inbound drops, expected at least {}",
        2 * COUNT
    );
    Ok(())
}

/// The policy's monitor pool: port-25 mail is delivered, and p25's would-drop counter
/// equals what the server received from that subscriber on port 25, packet for packet.
#[test]
fn monitor_mode_delivers_and_counts_would_drop() -> Result<()> {
    const MAILS: usize = 5;
    let lab = SmtpLab::build(Naming::Test)?;
    let pool = spec(Role::NewPool).context("pool host")?;
    let src = IpAddr::V4(pool.v4);
    lab.internet.exec(&["nft", "add", "table", "inet", "e2e"])?;
    lab.internet.exec(&[
        "nft",
        "add",
        "chain",
        "inet",
        "e2e",
        "count",
        "{ type filter hook prerouting priority -500; policy accept; }",
    ])?;
    let rule = |flags: &str| -> Result<()> {
        let mut args = vec!["nft", "add", "rule", "inet", "e2e", "count", "ip", "saddr"];
        let addr = pool.v4.to_string();
        args.extend([addr.as_str(), "tcp", "dport", "25"]);
        args.extend(flags.split_whitespace());
        args.push("counter");
        lab.internet.exec(&args).map(drop)
    };
    rule("")?;
    rule("tcp flags syn")?;
    let before = lab.verdict_packets("egress", "ipv4", "would_drop")?;
    for _ in 0..MAILS {
        check(&lab, Role::NewPool, src, SMTP, &Outcome::Delivered)?;
    }
    // Submission is not counted: 587 and 465 never touch the rules.
    check(&lab, Role::NewPool, src, SUBMISSIONS, &Outcome::Delivered)?;
    let listing = lab
        .internet
        .exec(&["nft", "list", "chain", "inet", "e2e", "count"])?;
    let counts: Vec<u64> = listing
        .lines()
        .filter(|l| l.contains("counter packets"))
        .filter_map(|l| {
            l.split_whitespace()
                .skip_while(|w| *w != "packets")
                .nth(1)
                .and_then(|n| n.parse().ok())
        })
        .collect();
    let [received, syns] = *counts.as_slice() else {
        anyhow::bail!("unexpected nft listing:\n{listing}");
    };
    let would_drop = lab.verdict_packets("egress", "ipv4", "would_drop")? - before;
    let dropped = lab.verdict_packets("egress", "ipv4", "dropped")?;
    summary!(
        "monitor mode: {MAILS} mails delivered ({syns} connection attempts, {received} \
         packets to port 25); would_drop +{would_drop}, dropped {dropped}"
    );
    ensure!(
        syns == MAILS as u64,
        "the server saw {syns} SYNs for {MAILS} mails"
    );
    ensure!(
        would_drop == received,
        "would_drop grew by {would_drop}, but the server received {received} packets to 25"
    );
    ensure!(dropped == 0, "monitor mode dropped {dropped} packets");
    Ok(())
}
