//! Real TCP traffic through a router namespace with p25 attached, IPv4 and IPv6.
//!
//! ```text
//!   sub netns                      router netns                        server netns
//!   s0 ─────────────────────── r-sub [p25_xdp]     r-up [p25_tc ingress] ───── u0
//!   100.64.1.2   (subscriber)   100.64.1.1          198.51.100.1          198.51.100.25
//!   100.64.1.3   (allowlisted)  192.0.2.1                                 listens on
//!   192.0.2.10   (not a sub.)   2001:db8:1::1       2001:db8:2::1         25, 587, 465
//!   2001:db8:1::2 / ::3         2001:db8:ff::1                            2001:db8:2::25
//!   2001:db8:ff::10
//!   listens on 2525
//! ```
//!
//! Policy: subscribers 100.64.1.0/24 and 2001:db8:1::/64; allowlist 100.64.1.3/32 and
//! 2001:db8:1::3/128. A connect that completes proves the handshake went both ways; a
//! blocked connect times out, because the filter drops the SYN silently.
//!
//! Each test builds its own topology with unique namespace names (so the two tests run in
//! parallel) and loads its own private dataplane (so its counters are its own). The
//! namespaces are deleted by their guards, also on failure, which removes the veths; the
//! dataplane is dropped first, which detaches the programs. Nothing is pinned.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};
use aya::programs::{TcAttachType, XdpMode};
use filter_common::abi::{
    AllowValue, CounterKey, Direction, Family, Mode, Origin, SubscriberValue, Verdict,
};
use filter_user::{CounterSnapshot, Dataplane, KernelTables};
use p25_tests::{
    lab::{
        OUTSIDER4, OUTSIDER6, SERVER4, SERVER6, SMTP, SUB_PORT, SUB4, SUB4_ALLOWED, SUB6,
        SUB6_ALLOWED, SUBMISSION, SUBMISSIONS, Topology,
    },
    netns::{Netns, wait_until},
};

/// A connect that should fail must not complete within this (the SYN is dropped).
const BLOCKED_TIMEOUT: Duration = Duration::from_millis(1500);
/// A connect that should succeed gets this long in total, to absorb ARP/ND on first use.
const REACH_TIMEOUT: Duration = Duration::from_secs(5);
/// One attempt within [`REACH_TIMEOUT`] (covers TCP's own 1 s SYN retransmission).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause between attempts within [`REACH_TIMEOUT`].
const RETRY_INTERVAL: Duration = Duration::from_millis(100);

/// The addresses one test run uses: everything in one family.
struct Plan {
    family: Family,
    subscriber: IpAddr,
    allowed: IpAddr,
    outsider: IpAddr,
    server: IpAddr,
}

const PLAN_V4: Plan = Plan {
    family: Family::IPV4,
    subscriber: IpAddr::V4(SUB4),
    allowed: IpAddr::V4(SUB4_ALLOWED),
    outsider: IpAddr::V4(OUTSIDER4),
    server: IpAddr::V4(SERVER4),
};

const PLAN_V6: Plan = Plan {
    family: Family::IPV6,
    subscriber: IpAddr::V6(SUB6),
    allowed: IpAddr::V6(SUB6_ALLOWED),
    outsider: IpAddr::V6(OUTSIDER6),
    server: IpAddr::V6(SERVER6),
};

#[test]
fn ipv4_real_traffic_through_attached_programs() -> Result<()> {
    run(&PLAN_V4)
}

#[test]
fn ipv6_real_traffic_through_attached_programs() -> Result<()> {
    run(&PLAN_V6)
}

/// Loads a private dataplane with the test policy and attaches it inside the router:
/// XDP (native) on the subscriber-facing veth, TC ingress on the upstream-facing one.
fn attach(router: &Netns) -> Result<(Dataplane, KernelTables)> {
    let mut dataplane = Dataplane::load().context("loading the p25 dataplane")?;
    let mut tables = dataplane.take_tables()?;
    let subscriber = SubscriberValue::new(Mode::DEFAULT);
    let allow = AllowValue::new(Origin::POLICY);
    tables.insert_subscriber("100.64.1.0/24".parse()?, subscriber)?;
    tables.insert_subscriber("2001:db8:1::/64".parse()?, subscriber)?;
    tables.insert_allow(format!("{SUB4_ALLOWED}/32").parse()?, allow)?;
    tables.insert_allow(format!("{SUB6_ALLOWED}/128").parse()?, allow)?;
    router.enter(|| -> Result<()> {
        dataplane
            .attach_xdp("r-sub", XdpMode::Driver)
            .context("attaching p25_xdp (native mode) to r-sub in the router netns")?;
        dataplane
            .attach_tc("r-up", TcAttachType::Ingress)
            .context("attaching p25_tc to r-up ingress in the router netns")?;
        Ok(())
    })??;
    Ok((dataplane, tables))
}

fn run(plan: &Plan) -> Result<()> {
    p25_tests::require_root();
    let family = plan.family.name();
    let topology = Topology::build().context("building the namespace topology")?;
    let (sub, server) = (&topology.sub, &topology.server);
    let smtp = SocketAddr::new(plan.server, SMTP);
    let to_subscriber = SocketAddr::new(plan.subscriber, SUB_PORT);
    let to_allowed = SocketAddr::new(plan.allowed, SUB_PORT);

    // The topology must carry port 25 both ways before the filter exists; otherwise a
    // "blocked" result below would prove nothing about the filter.
    expect_connects(
        sub,
        plan.subscriber,
        None,
        smtp,
        &format!("topology broken ({family}, no filter attached yet): subscriber"),
    )?;
    expect_connects(
        server,
        plan.server,
        Some(SMTP),
        to_subscriber,
        &format!("topology broken ({family}, no filter attached yet): server from port 25"),
    )?;

    // Declared after the topology, so dropped (detached) before the namespaces go.
    let (_dataplane, tables) = attach(&topology.router)?;

    // Ports other than 25 are untouched, both ways: with the filter in place, the
    // topology still works. A failure here is not a port-25 verdict.
    expect_connects(
        sub,
        plan.subscriber,
        None,
        SocketAddr::new(plan.server, SUBMISSION),
        &format!("topology broken or filter overreaching ({family}, filter attached): subscriber"),
    )?;
    expect_connects(
        server,
        plan.server,
        None,
        to_subscriber,
        &format!(
            "topology broken or filter overreaching ({family}, filter attached): \
             server from an ephemeral port"
        ),
    )?;

    // 1. Egress rule: a subscriber cannot reach port 25.
    expect_blocked(sub, plan.subscriber, None, smtp, "subscriber")?;
    // 2. Submission ports stay open for the same subscriber.
    expect_connects(
        sub,
        plan.subscriber,
        None,
        SocketAddr::new(plan.server, SUBMISSIONS),
        "subscriber",
    )?;
    // 3. The allowlisted subscriber reaches port 25.
    expect_connects(sub, plan.allowed, None, smtp, "allowlisted subscriber")?;
    // 4. A source outside subscriber space reaches port 25.
    expect_connects(sub, plan.outsider, None, smtp, "non-subscriber")?;
    // 5. Inbound rule: traffic from port 25 to a subscriber is dropped on r-up (TC),
    //    unless the subscriber is allowlisted.
    expect_blocked(server, plan.server, Some(SMTP), to_subscriber, "server")?;
    expect_connects(server, plan.server, Some(SMTP), to_allowed, "server")?;

    // 6. The kernel counted what happened.
    let counters = tables.counters().context("reading the verdict counters")?;
    let f = plan.family;
    let sub_ip = plan.subscriber;
    let allowed_ip = plan.allowed;
    let outsider_ip = plan.outsider;
    let expected = [
        (
            Direction::EGRESS,
            Verdict::DROPPED,
            format!("the SYNs of {sub_ip} → {smtp} were dropped by XDP"),
        ),
        (
            Direction::EGRESS,
            Verdict::ALLOWLISTED,
            format!("{allowed_ip} → {smtp} passed as allowlisted"),
        ),
        (
            Direction::EGRESS,
            Verdict::PASSED,
            format!("{outsider_ip} → {smtp} passed as a non-subscriber"),
        ),
        (
            Direction::INBOUND,
            Verdict::DROPPED,
            format!("the SYNs of {smtp} → {to_subscriber} were dropped by TC"),
        ),
        (
            Direction::INBOUND,
            Verdict::ALLOWLISTED,
            format!("{smtp} → {to_allowed} passed as allowlisted"),
        ),
        (
            Direction::INBOUND,
            Verdict::PASSED,
            format!("the SYN-ACKs of {smtp} → {outsider_ip} passed as a non-subscriber"),
        ),
    ];
    for (direction, verdict, what) in &expected {
        at_least(&counters, CounterKey::new(*direction, f, *verdict), what)?;
    }
    // Nothing ran in monitor mode, and no packet of the other family was on port 25.
    let other = if f == Family::IPV4 {
        Family::IPV6
    } else {
        Family::IPV4
    };
    for direction in [Direction::EGRESS, Direction::INBOUND] {
        for verdict in (0..Verdict::COUNT).map(Verdict) {
            let key = CounterKey::new(direction, other, verdict);
            exactly_zero(&counters, key, "this test sent no such traffic")?;
        }
        let key = CounterKey::new(direction, f, Verdict::WOULD_DROP);
        exactly_zero(&counters, key, "no prefix is in monitor mode")?;
    }
    Ok(())
}

/// Expects a connect from `src` to `dst` to complete within [`REACH_TIMEOUT`] (retrying,
/// to absorb first-packet ARP/ND). `who` describes the source in the failure message.
fn expect_connects(
    netns: &Netns,
    src: IpAddr,
    src_port: Option<u16>,
    dst: SocketAddr,
    who: &str,
) -> Result<()> {
    let mut last_error: Option<io::Error> = None;
    let connected = wait_until(REACH_TIMEOUT, RETRY_INTERVAL, || {
        match netns.connect_from(src, src_port, dst, ATTEMPT_TIMEOUT)? {
            Ok(_stream) => Ok(true),
            Err(error) => {
                last_error = Some(error);
                Ok(false)
            }
        }
    })?;
    ensure!(
        connected,
        "{who} {} → {dst} should connect but did not within {REACH_TIMEOUT:?} (last error: {})",
        source(src, src_port),
        last_error.map_or_else(|| "none".to_owned(), |e| e.to_string()),
    );
    Ok(())
}

/// Expects a connect from `src` to `dst` to time out: the filter drops the SYN silently,
/// so anything else (a reset, an unreachable error) is a topology problem, not a verdict.
fn expect_blocked(
    netns: &Netns,
    src: IpAddr,
    src_port: Option<u16>,
    dst: SocketAddr,
    who: &str,
) -> Result<()> {
    let src = source(src, src_port);
    match netns.connect_from(src.ip(), src_port, dst, BLOCKED_TIMEOUT)? {
        Ok(_stream) => bail!("{who} {src} → {dst} should be blocked but connected"),
        Err(error) if error.kind() == io::ErrorKind::TimedOut => Ok(()),
        Err(error) => bail!(
            "{who} {src} → {dst} should be blocked (SYN dropped, so the connect times out) \
             but failed differently: {error}"
        ),
    }
}

/// How a source reads in messages: the address, with the port when it is fixed.
fn source(ip: IpAddr, port: Option<u16>) -> SourceAddr {
    SourceAddr { ip, port }
}

struct SourceAddr {
    ip: IpAddr,
    port: Option<u16>,
}

impl SourceAddr {
    fn ip(&self) -> IpAddr {
        self.ip
    }
}

impl std::fmt::Display for SourceAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.port {
            Some(port) => SocketAddr::new(self.ip, port).fmt(f),
            None => self.ip.fmt(f),
        }
    }
}

fn counter_name(key: CounterKey) -> String {
    format!(
        "{}/{}/{}",
        key.direction.name(),
        key.family.name(),
        key.verdict.name()
    )
}

fn at_least(counters: &CounterSnapshot, key: CounterKey, because: &str) -> Result<()> {
    let packets = counters.verdict(key).packets;
    ensure!(
        packets >= 1,
        "counter {} should be ≥ 1 because {because}, but it is {packets}",
        counter_name(key)
    );
    Ok(())
}

fn exactly_zero(counters: &CounterSnapshot, key: CounterKey, because: &str) -> Result<()> {
    let packets = counters.verdict(key).packets;
    ensure!(
        packets == 0,
        "counter {} should be 0 because {because}, but it is {packets}",
        counter_name(key)
    );
    Ok(())
}
