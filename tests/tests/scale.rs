//! The dataplane at production scale: 100k subscriber prefixes and 1M allowlist entries,
//! IPv4 and IPv6 mixed. The programs are loaded (verified) against maps of that capacity,
//! filled, and must still agree with the reference model on every sampled packet.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Instant,
};

use anyhow::{Result, ensure};
use filter_common::abi::{AllowValue, Config, FragmentPolicy, Mode, Origin, SubscriberValue};
use filter_user::model::ModelTables;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use p25_tests::{
    harness::{Harness, Hook},
    packet::Pkt,
};
use rand::{Rng, SeedableRng, rngs::StdRng};

const SUBSCRIBERS_V4: usize = 50_000;
const SUBSCRIBERS_V6: usize = 50_000;
const ALLOW_V4: usize = 500_000;
const ALLOW_V6: usize = 500_000;
const SAMPLES: usize = 5_000;

/// A random /26 inside 100.64.0.0/10 (65,536 of them exist).
fn sub_v4(rng: &mut StdRng) -> Result<Ipv4Net> {
    let base = 0x6440_0000 | ((rng.random::<u32>() & 0xFFFF) << 6);
    Ok(Ipv4Net::new(Ipv4Addr::from(base), 26)?)
}

/// A random /56 inside 2001:db8::/32 (a bounded set, so allow entries can land in them).
fn sub_v6(rng: &mut StdRng) -> Result<Ipv6Net> {
    let site = u128::from(rng.random::<u32>() & 0x00FF_FFFF) << 72;
    Ok(Ipv6Net::new(
        Ipv6Addr::from((0x2001_0db8_u128 << 96) | site),
        56,
    )?)
}

fn inside_v4(rng: &mut StdRng, net: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(net.network()) | (rng.random::<u32>() & !u32::from(net.netmask())))
}

fn inside_v6(rng: &mut StdRng, net: Ipv6Net) -> Ipv6Addr {
    // Stay within a few hundred hosts per /56 so that allow entries get hit.
    let host = u128::from(rng.random::<u16>() & 0x1FF);
    Ipv6Addr::from(u128::from(net.network()) | host)
}

#[test]
fn one_million_allow_entries_and_100k_prefixes() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(0x5053_2525);
    let mut harness = Harness::new()?;
    let mut model = ModelTables::default();
    let config = Config {
        mode: Mode::ENFORCE,
        fragments: FragmentPolicy::DROP,
        generation: 1,
        ..Config::default()
    };
    harness.tables.set_config(config)?;
    model.config = config;

    let mut v4_subs = Vec::new();
    let mut v6_subs = Vec::new();
    let mut seen = HashSet::new();
    while v4_subs.len() < SUBSCRIBERS_V4 {
        let net = sub_v4(&mut rng)?;
        if seen.insert(IpNet::V4(net)) {
            v4_subs.push(net);
        }
    }
    while v6_subs.len() < SUBSCRIBERS_V6 {
        let net = sub_v6(&mut rng)?;
        if seen.insert(IpNet::V6(net)) {
            v6_subs.push(net);
        }
    }

    let started = Instant::now();
    for (i, net) in v4_subs
        .iter()
        .map(|n| IpNet::V4(*n))
        .chain(v6_subs.iter().map(|n| IpNet::V6(*n)))
        .enumerate()
    {
        // Every tenth prefix in monitor mode, so both modes are exercised at scale.
        let mode = if i % 10 == 0 {
            Mode::MONITOR
        } else {
            Mode::DEFAULT
        };
        harness
            .tables
            .insert_subscriber(net, SubscriberValue::new(mode))?;
        model.insert_subscriber(net, SubscriberValue::new(mode))?;
    }
    let mut allow = HashSet::new();
    let mut pick = 0_usize;
    while allow.len() < ALLOW_V4 + ALLOW_V6 {
        pick += 1;
        let net = if allow.len() < ALLOW_V4 {
            let sub = v4_subs.get(pick % v4_subs.len()).copied();
            sub.map(|s| IpNet::from(IpAddr::V4(inside_v4(&mut rng, s))))
        } else {
            let sub = v6_subs.get(pick % v6_subs.len()).copied();
            sub.map(|s| IpNet::from(IpAddr::V6(inside_v6(&mut rng, s))))
        };
        if let Some(net) = net
            && allow.insert(net)
        {
            let value = AllowValue::new(Origin::POLICY);
            harness.tables.insert_allow(net, value)?;
            model.insert_allow(net, value)?;
        }
    }
    let filled = started.elapsed();
    p25_tests::summary!(
        "filled {} subscriber prefixes and {} allowlist entries in {:.1} s",
        v4_subs.len() + v6_subs.len(),
        allow.len(),
        filled.as_secs_f64()
    );

    let mut compared = 0;
    let (mut matched, mut let_through) = (0_usize, 0_usize);
    for i in 0..SAMPLES {
        let pkt = if i % 2 == 0 {
            let sub = v4_subs.get(rng.random_range(0..v4_subs.len())).copied();
            let src = sub.map_or(Ipv4Addr::LOCALHOST, |s| inside_v4(&mut rng, s));
            Pkt::v4(src, 40000, Ipv4Addr::new(198, 51, 100, 25), 25)
        } else {
            let sub = v6_subs.get(rng.random_range(0..v6_subs.len())).copied();
            let src = sub.map_or(Ipv6Addr::LOCALHOST, |s| inside_v6(&mut rng, s));
            Pkt::v6(
                src,
                40000,
                Ipv6Addr::new(0x2001, 0xdb8, 0x25, 0, 0, 0, 0, 0x25),
                25,
            )
        };
        let frame = pkt.build();
        let expected = model.classify(&frame);
        if let Some(key) = expected.counter {
            if key.verdict.is_match() {
                matched += 1;
            } else {
                let_through += 1;
            }
        }
        for hook in Hook::ALL {
            let action = harness.run(hook, &frame)?;
            ensure!(
                action == expected.action,
                "{hook:?} returned {action:?} for {pkt:?}, model expected {expected:?}"
            );
        }
        compared += 1;
    }
    p25_tests::summary!(
        "{compared} packets compared at scale, 0 disagreements ({} matched a rule, {} allowlisted or passed)",
        matched,
        let_through
    );
    // Both outcomes must occur, or the sample proved nothing about the allowlist at scale.
    ensure!(
        matched > 100 && let_through > 100,
        "degenerate sample: {matched} matched, {let_through} let through"
    );
    Ok(())
}

/// The lab policy of the migration test: the lab's interfaces and two subscribers (one of
/// them allowlisted inline), plus a list file of a million allowlisted hosts.
const MIGRATION_POLICY: &str = r"version: 1
defaults:
  mode: enforce
  fragments: pass
interfaces:
  - name: r-sub
    role: subscriber
    attach: xdp
  - name: r-up
    role: upstream
    attach: tc
subscribers:
  - prefix: 100.64.0.0/10
  - prefix: 2001:db8:1::/48
allow:
  - prefix: 100.64.1.3/32
    comment: business customer
allow_files: [allow.txt]
";

/// Upgrading a real ABI v3 state that holds a million allowlist entries, under a SYN
/// stream: today's p25d fills its maps completely before it moves the links, so no blocked
/// SYN gets through and no allowlisted one is dropped during the move (issue 10).
///
/// The old state is real: the ABI v3 eBPF object of commit 9e32a0e (a checked-in fixture,
/// tests/fixtures/abi-v3), loaded, pinned, filled in v3's map layout and attached as pinned
/// links by a small test-side loader that mirrors 9e32a0e's p25d (`p25_tests::abi_v3`).
/// An object and a loader rather than 9e32a0e's p25d: the kernel state the migration takes
/// over is the object's and a few aya calls', reproduced exactly, while the old daemon
/// would add a binary of megabytes and could not read this policy (v3 had no allow list
/// files). See docs/dataplane.md, "Pins, reuse and migration".
#[test]
fn migration_with_a_million_entries_under_a_syn_stream_loses_and_leaks_nothing() -> Result<()> {
    use std::{
        fmt::Write as _,
        net::SocketAddrV4,
        sync::{
            Arc,
            atomic::{AtomicBool, Ordering},
        },
        thread,
        time::Duration,
    };

    use anyhow::Context as _;
    use p25_tests::{
        abi_v3,
        daemon::DaemonLab,
        lab::{SERVER4, SMTP, SUB4, SUB4_ALLOWED, Topology},
        traffic::{SynCounters, SynSender},
    };

    /// Most SYNs per source, and the time the stream may run: both bound the sender.
    const MAX_PER_SOURCE: u32 = 30_000;
    const MAX_STREAM: Duration = Duration::from_secs(120);
    const HOSTS: u32 = 1_000_000;

    let topology = Topology::build()?;
    let mut lab = DaemonLab::new(&topology.router)?;
    lab.set_start_timeout(Duration::from_secs(120));
    // A million allowlisted hosts: half IPv4 inside 100.64.0.0/10 (away from the lab's
    // 100.64.1.0/24), half IPv6 inside 2001:db8:1::/48.
    let mut list = String::with_capacity(30 * HOSTS as usize);
    for i in 0..HOSTS / 2 {
        writeln!(list, "{}", Ipv4Addr::from(0x6442_0000_u32 + i))?;
        writeln!(
            list,
            "{}",
            Ipv6Addr::from((0x2001_0db8_0001_u128 << 80) | u128::from(i + 0x1_0000))
        )?;
    }
    std::fs::write(lab.dir.join("allow.txt"), list).context("writing allow.txt")?;
    lab.write_policy(MIGRATION_POLICY)?;
    // The old state, as 9e32a0e's p25d left it after a `kill -9`; the lab's Drop removes
    // its pins with the new ones (`p25d detach --all-versions`).
    let policy = filter_user::policy::load(&lab.policy_path())
        .context("reading the migration policy")?
        .policy;
    let v3 = abi_v3::pin(&lab.pin_root, &topology.router, &policy, &[])?;
    drop(policy);
    p25_tests::summary!(
        "ABI v3 state: {} allowlist entries, {} subscriber prefixes, {} links, made in {:.1} s",
        v3.allow,
        v3.subscribers,
        v3.links.len(),
        v3.took.as_secs_f64()
    );
    ensure!(
        v3.allow == HOSTS as usize + 1 && v3.links.len() == 2,
        "unexpected v3 state: {v3:?}"
    );

    let counters = SynCounters::install(&topology.server, SMTP, &[SUB4, SUB4_ALLOWED])?;
    let allowed = SynSender::new(&topology.sub, SUB4_ALLOWED)?;
    let blocked = SynSender::new(&topology.sub, SUB4)?;
    let dst = SocketAddrV4::new(SERVER4, SMTP);
    // Warm up ARP on both sides so the first SYNs are not queued behind resolution.
    for sport in 1000..1010 {
        allowed.send(sport, dst)?;
        blocked.send(sport, dst)?;
        thread::sleep(Duration::from_millis(50));
    }
    let base_allowed = counters.settled(SUB4_ALLOWED)?;
    let base_blocked = counters.settled(SUB4)?;
    // The v3 programs filter for real before the upgrade.
    ensure!(base_allowed > 0, "the v3 links pass no allowlisted SYN");
    ensure!(
        base_blocked == 0,
        "the v3 links let {base_blocked} blocked SYNs through"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let sender = thread::spawn({
        let stop = Arc::clone(&stop);
        move || -> Result<u32> {
            let begin = Instant::now();
            let mut sent = 0;
            while sent < MAX_PER_SOURCE
                && begin.elapsed() < MAX_STREAM
                && !stop.load(Ordering::Relaxed)
            {
                let sport = 20_000 + (sent % 40_000) as u16;
                allowed.send(sport, dst)?;
                blocked.send(sport, dst)?;
                sent += 1;
                thread::sleep(Duration::from_millis(2));
            }
            Ok(sent)
        }
    });
    // Let the stream run on the old links first, then upgrade under it.
    thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let upgrade = lab.start();
    let took = started.elapsed();
    // And a little on the new links, then stop.
    thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let sent = sender
        .join()
        .map_err(|_| anyhow::anyhow!("sender panicked"))??;
    upgrade?;

    let moved = v3.check_migrated(
        &lab.pin_root,
        &lab.log(),
        &[("r-sub", "p25_xdp"), ("r-up", "p25_tc_upstream")],
    )?;
    let got_allowed = counters.settled(SUB4_ALLOWED)? - base_allowed;
    let got_blocked = counters.settled(SUB4)? - base_blocked;
    p25_tests::summary!(
        "migration of a real ABI v3 state with {HOSTS} allowlist entries under a SYN stream \
         (p25d start to ready {took:?}; {}): allowlisted \
         {got_allowed}/{sent} received, blocked {got_blocked}/{sent} leaked",
        moved.join("; ")
    );
    ensure!(
        got_allowed == u64::from(sent),
        "{} allowlisted SYNs lost",
        u64::from(sent) - got_allowed
    );
    ensure!(got_blocked == 0, "{got_blocked} blocked SYNs leaked");
    Ok(())
}
