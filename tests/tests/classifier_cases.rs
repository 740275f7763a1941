//! Hand-written packets for every rule and every parse path, IPv4 and IPv6.
//!
//! Each case states its expected outcome. The test checks that the reference model, the
//! XDP program and the TC program (both through BPF_PROG_TEST_RUN) all produce it,
//! counters included, and that the table covers every parse outcome and every verdict
//! counter: a path nobody wrote a case for fails the test. Cases marked upstream run the
//! upstream entry points (`p25_xdp_upstream`, `p25_tc_upstream`) and the model with
//! `Role::Upstream`.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, Ipv6Addr},
};

use anyhow::Result;
use filter_common::{
    abi::{
        AllowValue, BlockAction, COUNTER_SLOTS, Config, CounterKey, Direction, Family,
        FragmentPolicy, Mode, Origin, ParseOutcome, SubscriberValue, UnreadableTcp, Verdict,
    },
    classify::{Action, Outcome, Role, SynLimit},
};
use filter_user::{CounterSnapshot, model::ModelTables};
use ipnet::IpNet;
use p25_tests::{
    harness::{Harness, Hook, tc_can_run},
    packet::{Ext, IPPROTO_UDP, IPV4_MF, Pkt, Pppoe, TPID_8021AD, TPID_8021Q, TPID_QINQ_LEGACY},
};

// Subscriber space, with a monitor-mode and an explicitly enforcing sub-prefix.
const SUB4: Ipv4Addr = Ipv4Addr::new(100, 64, 1, 2);
const SUB4_ALLOWED: Ipv4Addr = Ipv4Addr::new(100, 64, 1, 3);
const SUB4_ALLOWED_RANGE: Ipv4Addr = Ipv4Addr::new(100, 64, 2, 9);
const SUB4_MONITOR: Ipv4Addr = Ipv4Addr::new(100, 64, 9, 5);
const SUB4_ENFORCE: Ipv4Addr = Ipv4Addr::new(100, 64, 8, 5);
const NET4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 25);
const OTHER4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);

const SUB6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 1, 0, 0, 0, 2);
const SUB6_ALLOWED: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 1, 0, 0, 0, 3);
const SUB6_MONITOR: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 9, 0, 0, 0, 5);
const SUB6_ENFORCE: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 8, 0, 0, 0, 5);
const NET6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x25, 0, 0, 0, 0, 0x25);
const OTHER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 0x10);

/// The subscriber prefixes and allowlist every case runs against.
struct Policy {
    subscribers: Vec<(IpNet, SubscriberValue)>,
    allow: Vec<(IpNet, AllowValue)>,
}

fn policy() -> Result<Policy> {
    let sub = |net: &str, mode| -> Result<_> { Ok((net.parse()?, SubscriberValue::new(mode))) };
    let allow = |net: &str| -> Result<_> { Ok((net.parse()?, AllowValue::new(Origin::POLICY))) };
    Ok(Policy {
        subscribers: vec![
            sub("100.64.0.0/16", Mode::DEFAULT)?,
            sub("100.64.9.0/24", Mode::MONITOR)?,
            sub("100.64.8.0/24", Mode::ENFORCE)?,
            sub("2001:db8:100::/48", Mode::DEFAULT)?,
            sub("2001:db8:100:9::/64", Mode::MONITOR)?,
            sub("2001:db8:100:8::/64", Mode::ENFORCE)?,
        ],
        allow: vec![
            allow("100.64.1.3/32")?,
            allow("100.64.2.0/28")?,
            allow("2001:db8:100:1::3/128")?,
        ],
    })
}

struct Case {
    name: &'static str,
    config: Config,
    frame: Vec<u8>,
    expected: Outcome,
    role: Role,
}

const ENFORCE: Config = Config {
    mode: Mode::ENFORCE,
    fragments: FragmentPolicy::PASS,
    offender_v6_prefix: 0,
    action: BlockAction::DEFAULT,
    generation: 0,
    event_rate: 0,
    event_burst: 0,
    rst_rate: 0,
    rst_burst: 0,
    unreadable_tcp: UnreadableTcp::PORT25,
    _pad: [0; 3],
};
const UNREADABLE_PASS: Config = Config {
    unreadable_tcp: UnreadableTcp::PASS,
    ..ENFORCE
};
const GLOBAL_MONITOR: Config = Config {
    mode: Mode::MONITOR,
    ..ENFORCE
};
const FRAGMENTS_DROP: Config = Config {
    fragments: FragmentPolicy::DROP,
    ..ENFORCE
};

fn outcome(
    action: Action,
    parse: ParseOutcome,
    counter: Option<(Direction, Family, Verdict)>,
) -> Outcome {
    Outcome {
        action,
        parse,
        counter: counter.map(|(d, f, v)| CounterKey::new(d, f, v)),
        // Offsets are the classifier's business; cases compare the verdict (see `essence`).
        l3: 0,
        l4: 0,
        limit: SynLimit::default(),
    }
}

/// What a case states: the action and what is counted (not the header offsets).
fn essence(o: &Outcome) -> (Action, ParseOutcome, Option<CounterKey>) {
    (o.action, o.parse, o.counter)
}

/// Parse-only outcome: passes, no verdict counter.
fn parsed(parse: ParseOutcome) -> Outcome {
    outcome(Action::Pass, parse, None)
}

/// A TCP packet that a rule looked at.
fn ruled(direction: Direction, family: Family, verdict: Verdict) -> Outcome {
    let action = if verdict == Verdict::DROPPED {
        Action::Drop
    } else {
        Action::Pass
    };
    outcome(
        action,
        ParseOutcome::TCP,
        Some((direction, family, verdict)),
    )
}

fn with_parse(mut o: Outcome, parse: ParseOutcome) -> Outcome {
    o.parse = parse;
    o
}

use Direction as D;
use Family as F;
use ParseOutcome as P;
use Verdict as V;

#[expect(clippy::too_many_lines, reason = "one flat table reads best")]
fn cases() -> Vec<Case> {
    let case = |name, config, pkt: Pkt, expected| Case {
        name,
        config,
        frame: pkt.build(),
        expected,
        role: Role::Subscriber,
    };
    let upstream = |name, config, pkt: Pkt, expected| Case {
        name,
        config,
        frame: pkt.build(),
        expected,
        role: Role::Upstream,
    };
    let frame_case = |name, frame: Vec<u8>, expected| Case {
        name,
        config: ENFORCE,
        frame,
        expected,
        role: Role::Subscriber,
    };
    let v4 = Pkt::v4;
    let v6 = Pkt::v6;
    let truncate = |pkt: Pkt, by: usize| {
        let mut frame = pkt.build();
        frame.truncate(frame.len().saturating_sub(by));
        frame
    };
    // A first fragment whose extension header chain runs past its end: a destination-
    // options header of 24 bytes cut after 8.
    let v6_chain_cut = |src| {
        truncate(
            v6(src, 40000, NET6, 25).ext(&[
                Ext::Fragment {
                    offset: 0,
                    more: true,
                },
                Ext::DestOpts(2),
            ]),
            // The last 16 bytes of the options header and the TCP header.
            16 + 20,
        )
    };
    vec![
        // --- The egress rule.
        case(
            "v4 subscriber to 25 is dropped",
            ENFORCE,
            v4(SUB4, 40000, NET4, 25),
            ruled(D::EGRESS, F::IPV4, V::DROPPED),
        ),
        case(
            "v6 subscriber to 25 is dropped",
            ENFORCE,
            v6(SUB6, 40000, NET6, 25),
            ruled(D::EGRESS, F::IPV6, V::DROPPED),
        ),
        case(
            "v4 subscriber to 587 passes untouched",
            ENFORCE,
            v4(SUB4, 40000, NET4, 587),
            parsed(P::TCP),
        ),
        case(
            "v4 subscriber to 465 passes untouched",
            ENFORCE,
            v4(SUB4, 40000, NET4, 465),
            parsed(P::TCP),
        ),
        case(
            "v6 subscriber to 587 passes untouched",
            ENFORCE,
            v6(SUB6, 40000, NET6, 587),
            parsed(P::TCP),
        ),
        case(
            "v6 subscriber to 465 passes untouched",
            ENFORCE,
            v6(SUB6, 40000, NET6, 465),
            parsed(P::TCP),
        ),
        case(
            "v4 subscriber to 443 passes untouched",
            ENFORCE,
            v4(SUB4, 40000, NET4, 443),
            parsed(P::TCP),
        ),
        case(
            "v4 allowlisted /32 to 25 passes",
            ENFORCE,
            v4(SUB4_ALLOWED, 40000, NET4, 25),
            ruled(D::EGRESS, F::IPV4, V::ALLOWLISTED),
        ),
        case(
            "v4 allowlisted /28 member to 25 passes",
            ENFORCE,
            v4(SUB4_ALLOWED_RANGE, 40000, NET4, 25),
            ruled(D::EGRESS, F::IPV4, V::ALLOWLISTED),
        ),
        case(
            "v6 allowlisted to 25 passes",
            ENFORCE,
            v6(SUB6_ALLOWED, 40000, NET6, 25),
            ruled(D::EGRESS, F::IPV6, V::ALLOWLISTED),
        ),
        case(
            "v4 non-subscriber to 25 passes",
            ENFORCE,
            v4(OTHER4, 40000, NET4, 25),
            ruled(D::EGRESS, F::IPV4, V::PASSED),
        ),
        case(
            "v6 non-subscriber to 25 passes",
            ENFORCE,
            v6(OTHER6, 40000, NET6, 25),
            ruled(D::EGRESS, F::IPV6, V::PASSED),
        ),
        // --- The inbound rule (MAAWG practice 6).
        case(
            "v4 from 25 into subscriber space is dropped",
            ENFORCE,
            v4(NET4, 25, SUB4, 40000),
            ruled(D::INBOUND, F::IPV4, V::DROPPED),
        ),
        case(
            "v6 from 25 into subscriber space is dropped",
            ENFORCE,
            v6(NET6, 25, SUB6, 40000),
            ruled(D::INBOUND, F::IPV6, V::DROPPED),
        ),
        case(
            "v4 from 25 to an allowlisted subscriber passes",
            ENFORCE,
            v4(NET4, 25, SUB4_ALLOWED, 40000),
            ruled(D::INBOUND, F::IPV4, V::ALLOWLISTED),
        ),
        case(
            "v6 from 25 to an allowlisted subscriber passes",
            ENFORCE,
            v6(NET6, 25, SUB6_ALLOWED, 40000),
            ruled(D::INBOUND, F::IPV6, V::ALLOWLISTED),
        ),
        case(
            "v4 from 25 to a non-subscriber passes",
            ENFORCE,
            v4(NET4, 25, OTHER4, 40000),
            ruled(D::INBOUND, F::IPV4, V::PASSED),
        ),
        case(
            "v6 from 25 to a non-subscriber passes",
            ENFORCE,
            v6(NET6, 25, OTHER6, 40000),
            ruled(D::INBOUND, F::IPV6, V::PASSED),
        ),
        case(
            "v4 from 587 into subscriber space passes untouched",
            ENFORCE,
            v4(NET4, 587, SUB4, 40000),
            parsed(P::TCP),
        ),
        case(
            "v6 from 465 into subscriber space passes untouched",
            ENFORCE,
            v6(NET6, 465, SUB6, 40000),
            parsed(P::TCP),
        ),
        // --- Both ports 25: the first rule that matches decides and is counted.
        case(
            "v4 25->25 from a subscriber: egress drops",
            ENFORCE,
            v4(SUB4, 25, NET4, 25),
            ruled(D::EGRESS, F::IPV4, V::DROPPED),
        ),
        case(
            "v4 25->25 into subscriber space: inbound drops",
            ENFORCE,
            v4(NET4, 25, SUB4, 25),
            ruled(D::INBOUND, F::IPV4, V::DROPPED),
        ),
        case(
            "v6 25->25 outside subscriber space: egress verdict counted",
            ENFORCE,
            v6(NET6, 25, OTHER6, 25),
            ruled(D::EGRESS, F::IPV6, V::PASSED),
        ),
        // --- Monitor mode, per prefix and global.
        case(
            "v4 monitor prefix: would drop, passes",
            ENFORCE,
            v4(SUB4_MONITOR, 40000, NET4, 25),
            ruled(D::EGRESS, F::IPV4, V::WOULD_DROP),
        ),
        case(
            "v6 monitor prefix: would drop, passes",
            ENFORCE,
            v6(SUB6_MONITOR, 40000, NET6, 25),
            ruled(D::EGRESS, F::IPV6, V::WOULD_DROP),
        ),
        case(
            "v4 monitor prefix inbound: would drop",
            ENFORCE,
            v4(NET4, 25, SUB4_MONITOR, 40000),
            ruled(D::INBOUND, F::IPV4, V::WOULD_DROP),
        ),
        case(
            "v6 monitor prefix inbound: would drop",
            ENFORCE,
            v6(NET6, 25, SUB6_MONITOR, 40000),
            ruled(D::INBOUND, F::IPV6, V::WOULD_DROP),
        ),
        case(
            "v4 global monitor: would drop",
            GLOBAL_MONITOR,
            v4(SUB4, 40000, NET4, 25),
            ruled(D::EGRESS, F::IPV4, V::WOULD_DROP),
        ),
        case(
            "v6 global monitor: would drop",
            GLOBAL_MONITOR,
            v6(SUB6, 40000, NET6, 25),
            ruled(D::EGRESS, F::IPV6, V::WOULD_DROP),
        ),
        case(
            "v4 explicit enforce prefix beats global monitor",
            GLOBAL_MONITOR,
            v4(SUB4_ENFORCE, 40000, NET4, 25),
            ruled(D::EGRESS, F::IPV4, V::DROPPED),
        ),
        case(
            "v6 explicit enforce prefix beats global monitor",
            GLOBAL_MONITOR,
            v6(SUB6_ENFORCE, 40000, NET6, 25),
            ruled(D::EGRESS, F::IPV6, V::DROPPED),
        ),
        case(
            "v4 global monitor, allowlisted still allowlisted",
            GLOBAL_MONITOR,
            v4(SUB4_ALLOWED, 40000, NET4, 25),
            ruled(D::EGRESS, F::IPV4, V::ALLOWLISTED),
        ),
        // --- Layer 2: VLAN, QinQ, PPPoE.
        case(
            "v4 802.1Q to 25 is dropped",
            ENFORCE,
            v4(SUB4, 40000, NET4, 25).tags(&[TPID_8021Q]),
            ruled(D::EGRESS, F::IPV4, V::DROPPED),
        ),
        case(
            "v6 802.1Q to 25 is dropped",
            ENFORCE,
            v6(SUB6, 40000, NET6, 25).tags(&[TPID_8021Q]),
            ruled(D::EGRESS, F::IPV6, V::DROPPED),
        ),
        case(
            "v4 QinQ 802.1ad+802.1Q to 25 is dropped",
            ENFORCE,
            v4(SUB4, 40000, NET4, 25).tags(&[TPID_8021AD, TPID_8021Q]),
            ruled(D::EGRESS, F::IPV4, V::DROPPED),
        ),
        case(
            "v6 QinQ 0x9100+802.1Q to 25 is dropped",
            ENFORCE,
            v6(SUB6, 40000, NET6, 25).tags(&[TPID_QINQ_LEGACY, TPID_8021Q]),
            ruled(D::EGRESS, F::IPV6, V::DROPPED),
        ),
        case(
            "three VLAN tags fail open",
            ENFORCE,
            v4(SUB4, 40000, NET4, 25).tags(&[TPID_8021AD, TPID_8021Q, TPID_8021Q]),
            parsed(P::VLAN_TOO_DEEP),
        ),
        case(
            "v4 PPPoE to 25 is dropped",
            ENFORCE,
            v4(SUB4, 40000, NET4, 25).pppoe(Pppoe::default()),
            ruled(D::EGRESS, F::IPV4, V::DROPPED),
        ),
        case(
            "v6 PPPoE to 25 is dropped",
            ENFORCE,
            v6(SUB6, 40000, NET6, 25).pppoe(Pppoe::default()),
            ruled(D::EGRESS, F::IPV6, V::DROPPED),
        ),
        case(
            "v4 VLAN+PPPoE to 25 is dropped",
            ENFORCE,
            v4(SUB4, 40000, NET4, 25)
                .tags(&[TPID_8021Q])
                .pppoe(Pppoe::default()),
            ruled(D::EGRESS, F::IPV4, V::DROPPED),
        ),
        case(
            "v6 QinQ+PPPoE to 25 is dropped",
            ENFORCE,
            v6(SUB6, 40000, NET6, 25)
                .tags(&[TPID_8021AD, TPID_8021Q])
                .pppoe(Pppoe::default()),
            ruled(D::EGRESS, F::IPV6, V::DROPPED),
        ),
        case(
            "v4 PPPoE to 587 passes untouched",
            ENFORCE,
            v4(SUB4, 40000, NET4, 587).pppoe(Pppoe::default()),
            parsed(P::TCP),
        ),
        case(
            "v4 PPPoE with a compressed protocol field to 25 is dropped",
            ENFORCE,
            v4(SUB4, 40000, NET4, 25).pppoe(Pppoe {
                compressed: true,
                ..Pppoe::default()
            }),
            ruled(D::EGRESS, F::IPV4, V::DROPPED),
        ),
        case(
            "v6 PPPoE with a compressed protocol field behind QinQ to 25 is dropped",
            ENFORCE,
            v6(SUB6, 40000, NET6, 25)
                .tags(&[TPID_8021AD, TPID_8021Q])
                .pppoe(Pppoe {
                    compressed: true,
                    ..Pppoe::default()
                }),
            ruled(D::EGRESS, F::IPV6, V::DROPPED),
        ),
        case(
            "v4 PPPoE with a compressed protocol field to 587 passes untouched",
            ENFORCE,
            v4(SUB4, 40000, NET4, 587).pppoe(Pppoe {
                compressed: true,
                ..Pppoe::default()
            }),
            parsed(P::TCP),
        ),
        case(
            "PPPoE carrying compressed LCP-range protocol is not IP",
            ENFORCE,
            v4(SUB4, 40000, NET4, 25).pppoe(Pppoe {
                protocol: Some(0x0023),
                compressed: true,
                ..Pppoe::default()
            }),
            parsed(P::PPPOE_NOT_IP),
        ),
        case(
            "PPPoE carrying LCP is not IP",
            ENFORCE,
            v4(SUB4, 40000, NET4, 25).pppoe(Pppoe {
                protocol: Some(0xC021),
                ..Pppoe::default()
            }),
            parsed(P::PPPOE_NOT_IP),
        ),
        case(
            "PPPoE with a non-zero code is not data",
            ENFORCE,
            v4(SUB4, 40000, NET4, 25).pppoe(Pppoe {
                code: 0x09,
                ..Pppoe::default()
            }),
            parsed(P::PPPOE_NOT_IP),
        ),
        case(
            "PPPoE with a bad version is not data",
            ENFORCE,
            v4(SUB4, 40000, NET4, 25).pppoe(Pppoe {
                ver_type: 0x21,
                ..Pppoe::default()
            }),
            parsed(P::PPPOE_NOT_IP),
        ),
        case(
            "ARP is not IP",
            ENFORCE,
            Pkt {
                ethertype: Some(0x0806),
                ..v4(SUB4, 40000, NET4, 25)
            },
            parsed(P::NOT_IP),
        ),
        frame_case(
            "15-byte frame with IPv4 ethertype is truncated",
            truncate(v4(SUB4, 40000, NET4, 25), 39),
            parsed(P::TRUNCATED),
        ),
        frame_case(
            "VLAN tag cut short is truncated",
            {
                let mut f = v4(SUB4, 40000, NET4, 25).tags(&[TPID_8021Q]).build();
                f.truncate(16);
                f
            },
            parsed(P::TRUNCATED),
        ),
        frame_case(
            "PPPoE header cut short is truncated",
            {
                let mut f = v4(SUB4, 40000, NET4, 25).pppoe(Pppoe::default()).build();
                f.truncate(18);
                f
            },
            parsed(P::TRUNCATED),
        ),
        // --- IPv4.
        case(
            "v4 with 40 bytes of options to 25 is dropped",
            ENFORCE,
            Pkt {
                ipv4_option_words: 10,
                ..v4(SUB4, 40000, NET4, 25)
            },
            ruled(D::EGRESS, F::IPV4, V::DROPPED),
        ),
        case(
            "v4 with options to 587 passes untouched",
            ENFORCE,
            Pkt {
                ipv4_option_words: 3,
                ..v4(SUB4, 40000, NET4, 587)
            },
            parsed(P::TCP),
        ),
        case(
            "v4 IHL below 5 is a bad header",
            ENFORCE,
            Pkt {
                ihl: Some(4),
                ..v4(SUB4, 40000, NET4, 25)
            },
            parsed(P::BAD_IP_HEADER),
        ),
        case(
            "v4 ethertype with version 6 is a bad header",
            ENFORCE,
            Pkt {
                ip_version: Some(6),
                ..v4(SUB4, 40000, NET4, 25)
            },
            parsed(P::BAD_IP_HEADER),
        ),
        case(
            "v4 IHL pointing past the frame is truncated",
            ENFORCE,
            Pkt {
                ihl: Some(15),
                ..v4(SUB4, 40000, NET4, 25)
            },
            parsed(P::TRUNCATED),
        ),
        frame_case(
            "v4 header cut short is truncated",
            truncate(v4(SUB4, 40000, NET4, 25), 21),
            parsed(P::TRUNCATED),
        ),
        frame_case(
            "v4 TCP ports cut short is truncated",
            truncate(v4(SUB4, 40000, NET4, 25), 17),
            parsed(P::TRUNCATED),
        ),
        case(
            "v4 UDP to 25 is not TCP",
            ENFORCE,
            v4(SUB4, 40000, NET4, 25).protocol(IPPROTO_UDP),
            parsed(P::NOT_TCP),
        ),
        case(
            "v4 first fragment is classified by its TCP header",
            ENFORCE,
            v4(SUB4, 40000, NET4, 25).ipv4_frag(IPV4_MF),
            ruled(D::EGRESS, F::IPV4, V::DROPPED),
        ),
        case(
            "v4 non-first fragment fails open",
            ENFORCE,
            v4(SUB4, 40000, NET4, 25).ipv4_frag(185),
            parsed(P::NON_FIRST_FRAGMENT),
        ),
        case(
            "v4 non-first fragment, fail-closed: dropped",
            FRAGMENTS_DROP,
            v4(SUB4, 40000, NET4, 80).ipv4_frag(IPV4_MF | 185),
            with_parse(ruled(D::EGRESS, F::IPV4, V::DROPPED), P::NON_FIRST_FRAGMENT),
        ),
        case(
            "v4 non-first fragment into subscriber space, fail-closed: dropped",
            FRAGMENTS_DROP,
            v4(NET4, 80, SUB4, 40000).ipv4_frag(185),
            with_parse(
                ruled(D::INBOUND, F::IPV4, V::DROPPED),
                P::NON_FIRST_FRAGMENT,
            ),
        ),
        case(
            "v4 non-first fragment from allowlisted, fail-closed: passes",
            FRAGMENTS_DROP,
            v4(SUB4_ALLOWED, 40000, NET4, 25).ipv4_frag(185),
            with_parse(
                ruled(D::EGRESS, F::IPV4, V::ALLOWLISTED),
                P::NON_FIRST_FRAGMENT,
            ),
        ),
        case(
            "v4 non-first fragment outside subscriber space, fail-closed: passes",
            FRAGMENTS_DROP,
            v4(OTHER4, 40000, NET4, 25).ipv4_frag(185),
            with_parse(ruled(D::EGRESS, F::IPV4, V::PASSED), P::NON_FIRST_FRAGMENT),
        ),
        case(
            "v4 non-first UDP fragment is not TCP",
            FRAGMENTS_DROP,
            v4(SUB4, 40000, NET4, 25)
                .protocol(IPPROTO_UDP)
                .ipv4_frag(185),
            parsed(P::NOT_TCP),
        ),
        frame_case(
            "v4 first fragment too short for ports is unreadable TCP: dropped",
            truncate(v4(SUB4, 40000, NET4, 25).ipv4_frag(IPV4_MF), 18),
            with_parse(
                ruled(D::EGRESS, F::IPV4, V::DROPPED),
                P::SHORT_FIRST_FRAGMENT,
            ),
        ),
        Case {
            name: "v4 first fragment too short for ports, unreadable_tcp pass: fails open",
            config: UNREADABLE_PASS,
            frame: truncate(v4(SUB4, 40000, NET4, 25).ipv4_frag(IPV4_MF), 18),
            expected: parsed(P::SHORT_FIRST_FRAGMENT),
            role: Role::Subscriber,
        },
        Case {
            name: "v4 first fragment too short for ports, fail-closed: dropped",
            config: FRAGMENTS_DROP,
            frame: truncate(v4(SUB4, 40000, NET4, 25).ipv4_frag(IPV4_MF), 18),
            expected: with_parse(
                ruled(D::EGRESS, F::IPV4, V::DROPPED),
                P::SHORT_FIRST_FRAGMENT,
            ),
            role: Role::Subscriber,
        },
        // --- IPv6 extension headers.
        case(
            "v6 hop-by-hop, routing, dest-opts chain to 25 is dropped",
            ENFORCE,
            v6(SUB6, 40000, NET6, 25).ext(&[Ext::HopByHop(0), Ext::Routing(2), Ext::DestOpts(1)]),
            ruled(D::EGRESS, F::IPV6, V::DROPPED),
        ),
        case(
            "v6 AH to 25 is dropped",
            ENFORCE,
            v6(SUB6, 40000, NET6, 25).ext(&[Ext::Ah(4)]),
            ruled(D::EGRESS, F::IPV6, V::DROPPED),
        ),
        case(
            "v6 ext chain to 587 passes untouched",
            ENFORCE,
            v6(SUB6, 40000, NET6, 587).ext(&[Ext::HopByHop(0), Ext::DestOpts(0)]),
            parsed(P::TCP),
        ),
        case(
            "v6 eight extension headers still parse",
            ENFORCE,
            v6(SUB6, 40000, NET6, 25).ext(&[Ext::DestOpts(0); 8]),
            ruled(D::EGRESS, F::IPV6, V::DROPPED),
        ),
        case(
            "v6 nine extension headers from a subscriber are unreadable TCP: dropped",
            ENFORCE,
            v6(SUB6, 40000, NET6, 587).ext(&[Ext::DestOpts(0); 9]),
            with_parse(ruled(D::EGRESS, F::IPV6, V::DROPPED), P::EXT_CHAIN_TOO_LONG),
        ),
        case(
            "v6 nine extension headers from an allowlisted source pass",
            ENFORCE,
            v6(SUB6_ALLOWED, 40000, NET6, 25).ext(&[Ext::DestOpts(0); 9]),
            with_parse(
                ruled(D::EGRESS, F::IPV6, V::ALLOWLISTED),
                P::EXT_CHAIN_TOO_LONG,
            ),
        ),
        case(
            "v6 nine extension headers from outside subscriber space pass",
            ENFORCE,
            v6(OTHER6, 40000, NET6, 25).ext(&[Ext::DestOpts(0); 9]),
            with_parse(ruled(D::EGRESS, F::IPV6, V::PASSED), P::EXT_CHAIN_TOO_LONG),
        ),
        case(
            "v6 nine extension headers, unreadable_tcp pass: fail open",
            UNREADABLE_PASS,
            v6(SUB6, 40000, NET6, 25).ext(&[Ext::DestOpts(0); 9]),
            parsed(P::EXT_CHAIN_TOO_LONG),
        ),
        frame_case(
            "v6 first fragment whose header chain runs past its end: dropped",
            v6_chain_cut(SUB6),
            with_parse(
                ruled(D::EGRESS, F::IPV6, V::DROPPED),
                P::SHORT_FIRST_FRAGMENT,
            ),
        ),
        Case {
            name: "v6 first fragment whose chain runs past its end, unreadable_tcp pass: \
                   fails open",
            config: UNREADABLE_PASS,
            frame: v6_chain_cut(SUB6),
            expected: parsed(P::SHORT_FIRST_FRAGMENT),
            role: Role::Subscriber,
        },
        Case {
            name: "v6 first fragment whose chain runs past its end, monitor: would drop",
            config: GLOBAL_MONITOR,
            frame: v6_chain_cut(SUB6),
            expected: with_parse(
                ruled(D::EGRESS, F::IPV6, V::WOULD_DROP),
                P::SHORT_FIRST_FRAGMENT,
            ),
            role: Role::Subscriber,
        },
        // --- Upstream attachments: the inbound rule only.
        upstream(
            "upstream: v4 SYN to 25 with a spoofed subscriber source passes uncounted",
            ENFORCE,
            v4(SUB4, 40000, NET4, 25),
            parsed(P::TCP),
        ),
        upstream(
            "upstream: v6 SYN to 25 with a spoofed subscriber source passes uncounted",
            ENFORCE,
            v6(SUB6, 40000, NET6, 25),
            parsed(P::TCP),
        ),
        upstream(
            "upstream: v4 from 25 into subscriber space is dropped",
            ENFORCE,
            v4(NET4, 25, SUB4, 40000),
            ruled(D::INBOUND, F::IPV4, V::DROPPED),
        ),
        upstream(
            "upstream: v6 from 25 into monitor space would drop",
            ENFORCE,
            v6(NET6, 25, SUB6_MONITOR, 40000),
            ruled(D::INBOUND, F::IPV6, V::WOULD_DROP),
        ),
        upstream(
            "upstream: 25 to 25 from a subscriber to a subscriber takes the inbound rule",
            ENFORCE,
            v4(SUB4, 25, SUB4_MONITOR, 25),
            ruled(D::INBOUND, F::IPV4, V::WOULD_DROP),
        ),
        upstream(
            "upstream: v6 nine extension headers from a subscriber pass",
            ENFORCE,
            v6(SUB6, 40000, NET6, 25).ext(&[Ext::DestOpts(0); 9]),
            parsed(P::EXT_CHAIN_TOO_LONG),
        ),
        Case {
            name: "upstream: first fragment cut short from a subscriber passes",
            config: ENFORCE,
            frame: v6_chain_cut(SUB6),
            expected: parsed(P::SHORT_FIRST_FRAGMENT),
            role: Role::Upstream,
        },
        upstream(
            "upstream: v4 non-first fragment from a subscriber, fail-closed: inbound only",
            FRAGMENTS_DROP,
            v4(SUB4, 40000, NET4, 25).ipv4_frag(185),
            with_parse(ruled(D::INBOUND, F::IPV4, V::PASSED), P::NON_FIRST_FRAGMENT),
        ),
        case(
            "v6 first fragment is classified by its TCP header",
            ENFORCE,
            v6(SUB6, 40000, NET6, 25).ext(&[Ext::Fragment {
                offset: 0,
                more: true,
            }]),
            ruled(D::EGRESS, F::IPV6, V::DROPPED),
        ),
        case(
            "v6 non-first fragment fails open",
            ENFORCE,
            v6(SUB6, 40000, NET6, 25).ext(&[Ext::Fragment {
                offset: 100,
                more: false,
            }]),
            parsed(P::NON_FIRST_FRAGMENT),
        ),
        case(
            "v6 non-first fragment, fail-closed: dropped",
            FRAGMENTS_DROP,
            v6(SUB6, 40000, NET6, 25).ext(&[
                Ext::HopByHop(0),
                Ext::Fragment {
                    offset: 100,
                    more: true,
                },
            ]),
            with_parse(ruled(D::EGRESS, F::IPV6, V::DROPPED), P::NON_FIRST_FRAGMENT),
        ),
        case(
            "v6 non-first fragment from allowlisted, fail-closed: passes",
            FRAGMENTS_DROP,
            v6(SUB6_ALLOWED, 40000, NET6, 25).ext(&[Ext::Fragment {
                offset: 100,
                more: false,
            }]),
            with_parse(
                ruled(D::EGRESS, F::IPV6, V::ALLOWLISTED),
                P::NON_FIRST_FRAGMENT,
            ),
        ),
        case(
            "v6 non-first fragment into monitor space, fail-closed: would drop",
            FRAGMENTS_DROP,
            v6(NET6, 25, SUB6_MONITOR, 40000).ext(&[Ext::Fragment {
                offset: 100,
                more: false,
            }]),
            with_parse(
                ruled(D::INBOUND, F::IPV6, V::WOULD_DROP),
                P::NON_FIRST_FRAGMENT,
            ),
        ),
        case(
            "v6 non-first UDP fragment is not TCP",
            FRAGMENTS_DROP,
            v6(SUB6, 40000, NET6, 25)
                .protocol(IPPROTO_UDP)
                .ext(&[Ext::Fragment {
                    offset: 100,
                    more: false,
                }]),
            parsed(P::NOT_TCP),
        ),
        frame_case(
            "v6 first fragment too short for ports is unreadable TCP: dropped",
            truncate(
                v6(SUB6, 40000, NET6, 25).ext(&[Ext::Fragment {
                    offset: 0,
                    more: true,
                }]),
                18,
            ),
            with_parse(
                ruled(D::EGRESS, F::IPV6, V::DROPPED),
                P::SHORT_FIRST_FRAGMENT,
            ),
        ),
        case(
            "v6 UDP to 25 is not TCP",
            ENFORCE,
            v6(SUB6, 40000, NET6, 25).protocol(IPPROTO_UDP),
            parsed(P::NOT_TCP),
        ),
        case(
            "v6 no-next-header is not TCP",
            ENFORCE,
            v6(SUB6, 40000, NET6, 25).protocol(59),
            parsed(P::NOT_TCP),
        ),
        case(
            "v6 ethertype with version 4 is a bad header",
            ENFORCE,
            Pkt {
                ip_version: Some(4),
                ..v6(SUB6, 40000, NET6, 25)
            },
            parsed(P::BAD_IP_HEADER),
        ),
        frame_case(
            "v6 header cut short is truncated",
            truncate(v6(SUB6, 40000, NET6, 25), 21),
            parsed(P::TRUNCATED),
        ),
        frame_case(
            "v6 extension header cut short is truncated",
            truncate(v6(SUB6, 40000, NET6, 25).ext(&[Ext::DestOpts(2)]), 40),
            parsed(P::TRUNCATED),
        ),
        frame_case(
            "v6 TCP ports cut short is truncated",
            truncate(v6(SUB6, 40000, NET6, 25).ext(&[Ext::HopByHop(0)]), 17),
            parsed(P::TRUNCATED),
        ),
        frame_case(
            "v6 ext header length pointing past the frame is truncated",
            {
                // A destination-options header that claims 2 KiB.
                let mut f = v6(SUB6, 40000, NET6, 25).ext(&[Ext::DestOpts(0)]).build();
                if let Some(len) = f.get_mut(14 + 40 + 1) {
                    *len = 255;
                }
                f
            },
            parsed(P::TRUNCATED),
        ),
    ]
}

#[test]
fn every_rule_and_parse_path_matches_model_xdp_and_tc() -> Result<()> {
    let mut harness = Harness::new()?;
    let mut model = ModelTables::default();
    let Policy { subscribers, allow } = policy()?;
    for (net, value) in subscribers {
        harness.tables.insert_subscriber(net, value)?;
        model.insert_subscriber(net, value)?;
    }
    for (net, value) in allow {
        harness.tables.insert_allow(net, value)?;
        model.insert_allow(net, value)?;
    }

    let cases = cases();
    let mut failures = Vec::new();
    let mut tc_impossible = 0;
    for case in &cases {
        harness.tables.set_config(case.config)?;
        model.config = case.config;
        model.role = case.role;
        harness.role = case.role;

        let from_model = model.classify(&case.frame);
        if essence(&from_model) != essence(&case.expected) {
            failures.push(format!(
                "{}: model says {from_model:?}, expected {:?}",
                case.name, case.expected
            ));
        }
        let mut want = CounterSnapshot::default();
        want.record(&case.expected, case.frame.len() as u64);
        for hook in Hook::ALL {
            if hook == Hook::Tc && !tc_can_run(&case.frame) {
                tc_impossible += 1;
                continue;
            }
            let before = harness.tables.counters()?;
            let action = harness.run(hook, &case.frame)?;
            let counted = harness.tables.counters()?.since(&before);
            if action != case.expected.action {
                failures.push(format!(
                    "{}: {hook:?} returned {action:?}, expected {:?}",
                    case.name, case.expected.action
                ));
            }
            if counted != want {
                failures.push(format!(
                    "{}: {hook:?} counted {counted:?}, expected {want:?}",
                    case.name
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );

    // Coverage: every parse outcome and every verdict counter the classifier decides has at
    // least one case. The verdicts the hooks derive afterwards (rejected, rate-limited) are
    // covered by tests/tests/reject_cases.rs.
    let parse: BTreeSet<_> = cases.iter().map(|c| c.expected.parse).collect();
    let missing_parse: Vec<_> = (0..ParseOutcome::COUNT)
        .map(ParseOutcome)
        .filter(|p| !parse.contains(p))
        .map(ParseOutcome::name)
        .collect();
    assert!(
        missing_parse.is_empty(),
        "no case for parse outcomes {missing_parse:?}"
    );
    let counters: BTreeSet<_> = cases.iter().filter_map(|c| c.expected.counter).collect();
    let missing_counters: Vec<_> = (0..COUNTER_SLOTS)
        .filter_map(CounterKey::from_index)
        .filter(|k| k.verdict.0 < Verdict::REJECTED.0)
        .filter(|k| !counters.contains(k))
        .map(|k| {
            format!(
                "{}/{}/{}",
                k.direction.name(),
                k.family.name(),
                k.verdict.name()
            )
        })
        .collect();
    assert!(
        missing_counters.is_empty(),
        "no case for counters {missing_counters:?}"
    );
    p25_tests::summary!(
        "{} hand-written cases agree across model, XDP and TC \
         ({tc_impossible} too short for the kernel's skb test run: XDP and model only)",
        cases.len()
    );
    Ok(())
}

#[test]
fn host_bits_are_rejected_by_both_table_kinds() -> Result<()> {
    let mut harness = Harness::new()?;
    let net: IpNet = "100.64.1.1/24".parse()?;
    let value = SubscriberValue::new(Mode::DEFAULT);
    let kernel = harness.tables.insert_subscriber(net, value);
    let model = ModelTables::default().insert_subscriber(net, value);
    for result in [kernel, model] {
        let err = result.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            err.contains("100.64.1.0/24"),
            "expected a host-bits error naming the network, got {err:?}"
        );
    }
    assert!(
        harness.tables.subscribers()?.is_empty(),
        "a rejected prefix must not be inserted"
    );
    Ok(())
}
