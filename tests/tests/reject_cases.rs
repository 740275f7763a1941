//! Reject mode and per-source SYN limits through BPF_PROG_TEST_RUN, next to the model.
//!
//! The RSTs the XDP program transmits are taken apart here with code of this file's own
//! (addresses, ports, flags, ack, and both checksums recomputed independently of
//! `filter_common::reject`), and must equal the model's byte for byte. TC cannot answer,
//! so it drops and counts why; so do the other fallbacks. SYN limits pass a burst and
//! drop the rest, or only count it in monitor mode.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Context as _, Result, ensure};
use filter_common::{
    abi::{
        AllowValue, BlockAction, Config, CounterKey, Direction, Family, Mode, Origin,
        RejectFallback, SubscriberValue, Verdict,
    },
    classify::Action,
};
use filter_user::model::{ModelBudget, ModelTables};
use p25_tests::{
    harness::{Harness, Hook},
    packet::{Pkt, Pppoe, TPID_8021AD, TPID_8021Q},
};

const SUB4: Ipv4Addr = Ipv4Addr::new(100, 64, 1, 2);
const SUB4_DROP: Ipv4Addr = Ipv4Addr::new(100, 64, 7, 2);
const SUB4_LIMITED: Ipv4Addr = Ipv4Addr::new(100, 64, 3, 4);
const SUB4_LIMITED_MONITOR: Ipv4Addr = Ipv4Addr::new(100, 64, 9, 4);
const NET4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 25);
const SUB6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 1, 0, 0, 0, 2);
const NET6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x25, 0, 0, 0, 0, 0x25);

/// Limit of the SYN-limited entries: one per minute (no refill during the test), burst 3.
const BURST: u32 = 3;

fn config(rst_rate: u32) -> Config {
    Config {
        mode: Mode::ENFORCE,
        action: BlockAction::REJECT,
        rst_rate,
        rst_burst: 1_000,
        ..Config::default()
    }
}

/// Loads the same policy into the kernel and the model: reject globally, one prefix that
/// drops, two SYN-limited allowlist entries (one in a monitor-mode prefix).
fn setup(rst_rate: u32) -> Result<(Harness, ModelTables)> {
    let mut harness = Harness::new()?;
    let mut model = ModelTables::default();
    let subscribers = [
        ("100.64.0.0/16", SubscriberValue::new(Mode::DEFAULT)),
        (
            "100.64.7.0/24",
            SubscriberValue::new(Mode::DEFAULT).with_action(BlockAction::DROP),
        ),
        ("100.64.9.0/24", SubscriberValue::new(Mode::MONITOR)),
        ("2001:db8:100::/48", SubscriberValue::new(Mode::DEFAULT)),
    ];
    for (net, value) in subscribers {
        harness.tables.insert_subscriber(net.parse()?, value)?;
        model.insert_subscriber(net.parse()?, value)?;
    }
    let limited = AllowValue::new(Origin::POLICY).with_syn_limit(1, BURST);
    for net in ["100.64.3.4/32", "100.64.9.4/32"] {
        harness.tables.insert_allow(net.parse()?, limited)?;
        model.insert_allow(net.parse()?, limited)?;
    }
    let c = config(rst_rate);
    harness.tables.set_config(c)?;
    model.config = c;
    Ok((harness, model))
}

fn fold(mut sum: u64) -> u16 {
    while sum > 0xFFFF {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    sum as u16
}

/// RFC 1071 sum of `bytes` (odd length padded), written out independently of the
/// dataplane's own.
fn ones_sum(bytes: &[u8]) -> u64 {
    bytes
        .chunks(2)
        .map(|c| {
            u64::from(c.first().copied().unwrap_or(0)) << 8
                | u64::from(c.get(1).copied().unwrap_or(0))
        })
        .sum()
}

fn be16(b: &[u8], at: usize) -> Result<u16> {
    let s = b.get(at..at + 2).context("short frame")?;
    Ok(u16::from_be_bytes(s.try_into()?))
}

fn be32(b: &[u8], at: usize) -> Result<u32> {
    let s = b.get(at..at + 4).context("short frame")?;
    Ok(u32::from_be_bytes(s.try_into()?))
}

fn bytes(b: &[u8], from: usize, len: usize) -> Result<&[u8]> {
    b.get(from..from + len).context("short frame")
}

/// Checks that `rst` is the well-formed answer to `syn`: the IP header starts at `l3` in
/// both. Returns a description of the RST for the report.
/// `pppoe`: the size of the PPP protocol field (2, 1 when compressed), 0 without PPPoE.
fn check_rst(syn: &[u8], rst: &[u8], l3: usize, v6: bool, pppoe: usize) -> Result<String> {
    let l4 = l3 + if v6 { 40 } else { 20 };
    ensure!(
        rst.len() == l4 + 20,
        "RST is {} bytes, expected {}",
        rst.len(),
        l4 + 20
    );
    ensure!(
        bytes(rst, 0, 6)? == bytes(syn, 6, 6)?,
        "destination MAC not swapped"
    );
    ensure!(
        bytes(rst, 6, 6)? == bytes(syn, 0, 6)?,
        "source MAC not swapped"
    );
    // Tags and ethertypes (and the PPPoE session id) are kept as they were.
    let l2_kept = if pppoe != 0 { l3 - 2 - pppoe } else { l3 };
    ensure!(
        bytes(rst, 12, l2_kept - 12)? == bytes(syn, 12, l2_kept - 12)?,
        "L2 headers changed"
    );
    let (src, dst, pseudo) = if v6 {
        ensure!(rst.get(l3).copied() == Some(0x60), "IPv6 version");
        ensure!(be16(rst, l3 + 4)? == 20, "IPv6 payload length");
        ensure!(
            rst.get(l3 + 6..l3 + 8) == Some(&[6, 64][..]),
            "next header / hop limit"
        );
        ensure!(
            bytes(rst, l3 + 8, 16)? == bytes(syn, l3 + 24, 16)?,
            "IPv6 source not swapped"
        );
        ensure!(
            bytes(rst, l3 + 24, 16)? == bytes(syn, l3 + 8, 16)?,
            "IPv6 destination not swapped"
        );
        (l3 + 8, l3 + 24, 16)
    } else {
        ensure!(rst.get(l3).copied() == Some(0x45), "IPv4 version/IHL");
        ensure!(be16(rst, l3 + 2)? == 40, "IPv4 total length");
        ensure!(
            rst.get(l3 + 8..l3 + 10) == Some(&[64, 6][..]),
            "TTL / protocol"
        );
        ensure!(be16(rst, l3 + 6)? & 0x3FFF == 0, "fragment bits");
        ensure!(
            fold(ones_sum(bytes(rst, l3, 20)?)) == 0xFFFF,
            "IPv4 header checksum invalid"
        );
        ensure!(
            bytes(rst, l3 + 12, 4)? == bytes(syn, l3 + 16, 4)?,
            "IPv4 source not swapped"
        );
        ensure!(
            bytes(rst, l3 + 16, 4)? == bytes(syn, l3 + 12, 4)?,
            "IPv4 destination not swapped"
        );
        (l3 + 12, l3 + 16, 4)
    };
    if pppoe != 0 {
        let ip_len = if v6 { 60 } else { 40 };
        ensure!(
            usize::from(be16(rst, l3 - 2 - pppoe)?) == ip_len + pppoe,
            "PPPoE length not fixed"
        );
    }
    ensure!(
        be16(rst, l4)? == be16(syn, l4 + 2)?,
        "source port not swapped"
    );
    ensure!(
        be16(rst, l4 + 2)? == be16(syn, l4)?,
        "destination port not swapped"
    );
    ensure!(be32(rst, l4 + 4)? == 0, "seq must be 0");
    let syn_payload = syn.len() - (l4 + 20);
    let want_ack = be32(syn, l4 + 4)?
        .wrapping_add(1)
        .wrapping_add(syn_payload as u32);
    ensure!(
        be32(rst, l4 + 8)? == want_ack,
        "ack {} != seq + 1 + data",
        be32(rst, l4 + 8)?
    );
    ensure!(
        rst.get(l4 + 12..l4 + 14) == Some(&[0x50, 0x14][..]),
        "offset/flags not RST|ACK"
    );
    // TCP checksum over the pseudo-header: addresses, zero, protocol, TCP length.
    let tcp = bytes(rst, l4, 20)?;
    let sum = ones_sum(bytes(rst, src, pseudo)?)
        + ones_sum(bytes(rst, dst, pseudo)?)
        + 6
        + 20
        + ones_sum(tcp);
    ensure!(fold(sum) == 0xFFFF, "TCP checksum invalid");
    Ok(format!("{}-byte RST, ack {want_ack}", rst.len()))
}

struct RstCase {
    name: &'static str,
    pkt: Pkt,
    l3: usize,
    /// Size of the PPP protocol field; 0 without PPPoE.
    pppoe: usize,
}

fn rst_cases() -> Vec<RstCase> {
    let v4 = |src, dst| Pkt::v4(src, 40001, dst, 25);
    let v6 = |src, dst| Pkt::v6(src, 40002, dst, 25);
    let pppoe = Pppoe {
        ver_type: 0x11,
        code: 0,
        protocol: None,
        compressed: false,
    };
    let mut with_data = v4(SUB4, NET4);
    with_data.payload = 17;
    with_data.seq = 0xFFFF_FFF0;
    vec![
        RstCase {
            name: "v4",
            pkt: v4(SUB4, NET4),
            l3: 14,
            pppoe: 0,
        },
        RstCase {
            name: "v6",
            pkt: v6(SUB6, NET6),
            l3: 14,
            pppoe: 0,
        },
        RstCase {
            name: "v4 VLAN",
            pkt: v4(SUB4, NET4).tags(&[TPID_8021Q]),
            l3: 18,
            pppoe: 0,
        },
        RstCase {
            name: "v6 VLAN",
            pkt: v6(SUB6, NET6).tags(&[TPID_8021Q]),
            l3: 18,
            pppoe: 0,
        },
        RstCase {
            name: "v4 QinQ",
            pkt: v4(SUB4, NET4).tags(&[TPID_8021AD, TPID_8021Q]),
            l3: 22,
            pppoe: 0,
        },
        RstCase {
            name: "v4 PPPoE",
            pkt: v4(SUB4, NET4).pppoe(pppoe),
            l3: 22,
            pppoe: 2,
        },
        RstCase {
            name: "v6 PPPoE in VLAN",
            pkt: v6(SUB6, NET6).tags(&[TPID_8021Q]).pppoe(pppoe),
            l3: 26,
            pppoe: 2,
        },
        RstCase {
            name: "v4 PPPoE, compressed protocol field",
            pkt: v4(SUB4, NET4).pppoe(Pppoe {
                compressed: true,
                ..pppoe
            }),
            l3: 21,
            pppoe: 1,
        },
        RstCase {
            name: "v6 PPPoE in QinQ, compressed protocol field",
            pkt: v6(SUB6, NET6)
                .tags(&[TPID_8021AD, TPID_8021Q])
                .pppoe(Pppoe {
                    compressed: true,
                    ..pppoe
                }),
            l3: 29,
            pppoe: 1,
        },
        RstCase {
            name: "v4 SYN with data, seq wrapping",
            pkt: with_data,
            l3: 14,
            pppoe: 0,
        },
    ]
}

fn key(family: Family, verdict: Verdict) -> CounterKey {
    CounterKey::new(Direction::EGRESS, family, verdict)
}

#[test]
fn xdp_answers_blocked_syns_with_valid_rsts_and_tc_drops() -> Result<()> {
    let (mut harness, model) = setup(1_000_000)?;
    let mut budget = ModelBudget {
        now_ns: 1 << 50,
        ..ModelBudget::default()
    };
    let mut report = Vec::new();
    for case in rst_cases() {
        let syn = case.pkt.build();
        let v6 = matches!(case.pkt.src, IpAddr::V6(_));
        let family = if v6 { Family::IPV6 } else { Family::IPV4 };

        let before = harness.tables.counters()?;
        let (action, rst) = harness.run_out(Hook::Xdp, &syn)?;
        let counted = harness.tables.counters()?.since(&before);
        let expected = model.run(&syn, true, &mut budget);
        ensure!(
            action == Action::Reject,
            "{}: XDP returned {action:?}",
            case.name
        );
        ensure!(
            expected.outcome.action == Action::Reject,
            "{}: model {expected:?}",
            case.name
        );
        ensure!(
            expected.reply.as_deref() == Some(&rst[..]),
            "{}: kernel and model RSTs differ",
            case.name
        );
        let described = check_rst(&syn, &rst, case.l3, v6, case.pppoe)
            .with_context(|| format!("{}: RST {rst:02x?}", case.name))?;
        ensure!(
            counted.verdict(key(family, Verdict::REJECTED)).packets == 1,
            "{}: not counted as rejected: {counted:?}",
            case.name
        );
        report.push(format!("{}: {described}", case.name));

        // TC cannot transmit: it drops, counts a drop and says why.
        let fallbacks = harness.tables.reject_fallbacks()?;
        let before = harness.tables.counters()?;
        let action = harness.run(Hook::Tc, &syn)?;
        let counted = harness.tables.counters()?.since(&before);
        let tc_hook = harness
            .tables
            .reject_fallbacks()?
            .get(&RejectFallback::TC_HOOK)
            .copied();
        ensure!(
            action == Action::Drop,
            "{}: TC returned {action:?}",
            case.name
        );
        ensure!(
            counted.verdict(key(family, Verdict::DROPPED)).packets == 1,
            "{}: TC counted {counted:?}",
            case.name
        );
        ensure!(
            tc_hook == fallbacks.get(&RejectFallback::TC_HOOK).map(|n| n + 1),
            "{}: tc_hook fallback not counted",
            case.name
        );
    }
    p25_tests::summary!("well-formed RSTs: {}", report.join("; "));
    Ok(())
}

#[test]
fn rejects_fall_back_to_drops_and_say_why() -> Result<()> {
    let (mut harness, model) = setup(1_000_000)?;
    let mut budget = ModelBudget {
        now_ns: 1 << 50,
        ..ModelBudget::default()
    };
    let mut ack = Pkt::v4(SUB4, 40003, NET4, 25);
    ack.flags = 0x10;
    let mut options = Pkt::v4(SUB4, 40004, NET4, 25);
    options.ipv4_option_words = 1;
    let cases = [
        (
            "ACK of an old connection",
            ack,
            Some(RejectFallback::NOT_SYN),
        ),
        ("IPv4 options", options, Some(RejectFallback::UNSUPPORTED)),
        (
            "drop-mode prefix",
            Pkt::v4(SUB4_DROP, 40005, NET4, 25),
            None,
        ),
    ];
    for (name, pkt, reason) in cases {
        let frame = pkt.build();
        let before = harness.tables.reject_fallbacks()?;
        let action = harness.run(Hook::Xdp, &frame)?;
        let after = harness.tables.reject_fallbacks()?;
        let expected = model.run(&frame, true, &mut budget);
        ensure!(action == Action::Drop, "{name}: XDP returned {action:?}");
        ensure!(expected.fallback == reason, "{name}: model {expected:?}");
        let moved: Vec<_> = after
            .iter()
            .filter(|(k, n)| before.get(k) != Some(n))
            .map(|(k, _)| *k)
            .collect();
        ensure!(
            moved == reason.into_iter().collect::<Vec<_>>(),
            "{name}: fallbacks moved {moved:?}"
        );
    }

    // An RST budget of zero: no reply, counted as rate-limited.
    let mut c = config(0);
    c.rst_burst = 0;
    harness.tables.set_config(c)?;
    let before = harness.tables.reject_fallbacks()?;
    let action = harness.run(Hook::Xdp, &Pkt::v4(SUB4, 40006, NET4, 25).build())?;
    let after = harness.tables.reject_fallbacks()?;
    ensure!(
        action == Action::Drop,
        "with no RST budget XDP returned {action:?}"
    );
    ensure!(
        after.get(&RejectFallback::RATE_LIMITED)
            == before
                .get(&RejectFallback::RATE_LIMITED)
                .map(|n| n + 1)
                .as_ref(),
        "rate_limited fallback not counted"
    );
    Ok(())
}

#[test]
fn rst_budget_caps_a_syn_flood() -> Result<()> {
    // 5 per second, burst 10: a tight flood of 200 SYNs gets about the burst.
    let (mut harness, _) = setup(5)?;
    let mut c = config(5);
    c.rst_burst = 10;
    harness.tables.set_config(c)?;
    let frame = Pkt::v4(SUB4, 40007, NET4, 25).build();
    let started = std::time::Instant::now();
    let mut sent = 0;
    for _ in 0..200 {
        if harness.run(Hook::Xdp, &frame)? == Action::Reject {
            sent += 1;
        }
    }
    // Per CPU: the test thread may have run on every CPU.
    let cpus = u32::try_from(std::thread::available_parallelism()?.get())?;
    let allowed = cpus * 10 + (5.0 * started.elapsed().as_secs_f64()).ceil() as u32 * cpus;
    p25_tests::summary!("SYN flood of 200: {sent} RSTs (at most {allowed})");
    ensure!(
        sent >= 10 && sent <= allowed,
        "{sent} RSTs, expected 10..={allowed}"
    );
    Ok(())
}

#[test]
fn syn_limits_pass_the_burst_and_drop_the_rest() -> Result<()> {
    let (mut harness, model) = setup(1_000_000)?;
    let mut budget = ModelBudget {
        now_ns: 1 << 50,
        ..ModelBudget::default()
    };
    for (src, monitor) in [(SUB4_LIMITED, false), (SUB4_LIMITED_MONITOR, true)] {
        let over = if monitor {
            Verdict::WOULD_RATE_LIMIT
        } else {
            Verdict::RATE_LIMITED
        };
        let mut verdicts = Vec::new();
        for i in 0..10u16 {
            let frame = Pkt::v4(src, 41000 + i, NET4, 25).build();
            for hook in [Hook::Xdp, Hook::Tc] {
                let before = harness.tables.counters()?;
                let action = harness.run(hook, &frame)?;
                let counted = harness.tables.counters()?.since(&before);
                let expected = model.run(&frame, hook == Hook::Xdp, &mut budget);
                ensure!(
                    action == expected.outcome.action,
                    "{src} {hook:?}: {action:?} vs model {expected:?}"
                );
                let verdict = expected.outcome.counter.map(|k| k.verdict);
                ensure!(
                    verdict.is_some_and(|v| counted.verdict(key(Family::IPV4, v)).packets == 1),
                    "{src} {hook:?}: counted {counted:?}, model {verdict:?}"
                );
                verdicts.push(verdict);
            }
        }
        let passed = verdicts
            .iter()
            .filter(|v| **v == Some(Verdict::ALLOWLISTED))
            .count();
        let limited = verdicts.iter().filter(|v| **v == Some(over)).count();
        ensure!(
            passed == BURST as usize && limited == 20 - BURST as usize,
            "{src}: {verdicts:?}"
        );
        // Not connection attempts: never limited.
        let mut ack = Pkt::v4(src, 41000, NET4, 25);
        ack.flags = 0x10;
        ensure!(
            harness.run(Hook::Xdp, &ack.build())? == Action::Pass,
            "{src}: ACK was limited"
        );
    }
    // The overflow is offender evidence.
    let offenders = harness.tables.offenders()?;
    for src in [SUB4_LIMITED, SUB4_LIMITED_MONITOR] {
        let entry = offenders
            .iter()
            .find(|(k, _)| k.addr.get(..4) == Some(&src.octets()[..]))
            .with_context(|| format!("{src} not in the offender table"))?;
        ensure!(
            entry.1.attempts == u64::from(20 - BURST),
            "{src}: {} attempts",
            entry.1.attempts
        );
    }
    Ok(())
}
