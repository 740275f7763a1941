//! The checks behind the fuzz targets, shared with the regression test.
//!
//! `fuzz_targets/*.rs` hand libFuzzer's input to [`policy`] and [`classifier`]; the tests
//! crate compiles this very file (`tests/tests/fuzz_regressions.rs`) and replays every
//! input kept under `fuzz/regressions/<target>/`, so CI checks the crashes once found
//! without nightly or libFuzzer. A broken invariant panics: that is how both see it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use filter_common::{
    abi::{
        AllowValue, Config, Direction, FragmentPolicy, Mode, Origin, ParseOutcome, SubscriberValue,
        UnreadableTcp, Verdict,
    },
    classify::{Action, Role},
};
use filter_user::{
    model::ModelTables,
    policy::{self, Diagnostic, PolicyError},
};
use ipnet::IpNet;

/// Reports a broken invariant.
#[expect(
    clippy::panic,
    reason = "a panic is how libFuzzer and the regression test see a broken invariant"
)]
#[track_caller]
fn violated(what: String) -> ! {
    panic!("invariant broken: {what}")
}

// ---------------------------------------------------------------------------------------
// Policy parser
// ---------------------------------------------------------------------------------------

/// The policy parser on arbitrary bytes (decoded lossily, as a text editor would): it
/// never panics nor exhausts its stack (the nesting cap is checked before parsing), and
/// every diagnostic (error or warning) names the file and points at a real line and
/// column with a message.
pub fn policy(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    match policy::parse(&text, "fuzz.yaml") {
        Ok(checked) => {
            for warning in &checked.warnings {
                located(warning, &text);
            }
        }
        Err(PolicyError::Invalid(diagnostics)) => {
            if diagnostics.is_empty() {
                violated("a rejection without a diagnostic".to_owned());
            }
            for diagnostic in &diagnostics {
                located(diagnostic, &text);
            }
        }
        Err(other) => violated(format!(
            "parse from text failed without a diagnostic: {other}"
        )),
    }
}

/// The lines of `text` as YAML counts them: CR LF, a lone CR and LF end a line (YAML 1.2,
/// which serde-saphyr's line numbers follow; the stray CR was found by the fuzzer).
fn yaml_lines(text: &str) -> Vec<&str> {
    let mut lines = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find(['\r', '\n']) {
        let (line, tail) = rest.split_at(at);
        lines.push(line);
        let mut chars = tail.chars();
        let first = chars.next();
        rest = chars.as_str();
        if first == Some('\r') {
            rest = rest.strip_prefix('\n').unwrap_or(rest);
        }
    }
    lines.push(rest);
    lines
}

/// Whether `diagnostic` points inside `text` (or just past its end).
fn located(diagnostic: &Diagnostic, text: &str) {
    let lines = yaml_lines(text);
    let Diagnostic {
        file,
        line,
        column,
        message,
    } = diagnostic;
    if file != "fuzz.yaml" || message.trim().is_empty() || *line == 0 || *column == 0 {
        violated(format!("malformed diagnostic {diagnostic:?}"));
    }
    // One past the last line is where "unexpected end of file" points.
    let Some(content) = lines
        .get(line - 1)
        .or(Some(&"").filter(|_| *line == lines.len() + 1))
    else {
        violated(format!(
            "diagnostic on line {line} of a {}-line file: {diagnostic}",
            lines.len()
        ));
    };
    // One past the last character is where "expected more" points.
    if *column > content.chars().count() + 1 {
        violated(format!(
            "diagnostic on column {column} of a {}-character line: {diagnostic}",
            content.chars().count()
        ));
    }
}

// ---------------------------------------------------------------------------------------
// Reference classifier
// ---------------------------------------------------------------------------------------

/// Candidate subscriber prefixes; the input's second byte selects which are in force.
/// Catch-all prefixes are there so that random addresses hit the rules.
const SUBSCRIBERS: [&str; 7] = [
    "100.64.0.0/10",
    "0.0.0.0/0",
    "198.51.100.0/24",
    "100.64.1.2/32",
    "2001:db8::/32",
    "::/0",
    "2001:db8:1::2/128",
];
/// Candidate allowlist prefixes; the input's third byte selects which are in force.
const ALLOW: [&str; 6] = [
    "100.64.1.3/32",
    "100.64.0.0/16",
    "128.0.0.0/1",
    "2001:db8:1::3/128",
    "2001:db8::/48",
    "8000::/1",
];
/// Bytes of the input that choose the policy; the rest is the frame.
const HEADER: usize = 5;

/// The policy chosen by the header, as prefixes (for the independent checks) and tables.
struct Chosen {
    config: Config,
    subscribers: Vec<(IpNet, Mode)>,
    allow: Vec<IpNet>,
    tables: ModelTables,
}

fn prefix(text: &str) -> IpNet {
    text.parse()
        .unwrap_or_else(|_| violated(format!("bad candidate prefix {text}")))
}

/// Header: `[flags, subscriber mask, allow mask, modes lo, modes hi]`. Flags: bits 0-1 the
/// global mode (3 is unknown, which must enforce), bit 2 fragments fail closed, bit 3
/// unreadable TCP fails open (`unreadable_tcp: pass`), bit 4 the frames arrive on an
/// upstream attachment (inbound rule only). Each
/// subscriber prefix `i` takes its mode from bits `2i..2i+2` of the modes.
fn choose(header: [u8; HEADER]) -> Chosen {
    let [flags, subscriber_mask, allow_mask, modes_lo, modes_hi] = header;
    let modes = u16::from_le_bytes([modes_lo, modes_hi]);
    let config = Config {
        mode: Mode(flags & 3),
        fragments: if flags & 4 == 0 {
            FragmentPolicy::PASS
        } else {
            FragmentPolicy::DROP
        },
        unreadable_tcp: if flags & 8 == 0 {
            UnreadableTcp::PORT25
        } else {
            UnreadableTcp::PASS
        },
        ..Config::default()
    };
    let mut tables = ModelTables::default();
    tables.config = config;
    tables.role = if flags & 16 == 0 {
        Role::Subscriber
    } else {
        Role::Upstream
    };
    let mut subscribers = Vec::new();
    for (i, text) in SUBSCRIBERS.iter().enumerate() {
        if subscriber_mask & (1 << i) != 0 {
            let net = prefix(text);
            let mode = Mode(((modes >> (2 * i)) & 3) as u8);
            if tables
                .insert_subscriber(net, SubscriberValue::new(mode))
                .is_err()
            {
                violated(format!("the model rejected {net}"));
            }
            subscribers.push((net, mode));
        }
    }
    let mut allow = Vec::new();
    for (i, text) in ALLOW.iter().enumerate() {
        if allow_mask & (1 << i) != 0 {
            let net = prefix(text);
            if tables
                .insert_allow(net, AllowValue::new(Origin::POLICY))
                .is_err()
            {
                violated(format!("the model rejected {net}"));
            }
            allow.push(net);
        }
    }
    Chosen {
        config,
        subscribers,
        allow,
        tables,
    }
}

fn be16(frame: &[u8], at: usize) -> Option<u16> {
    let bytes = frame.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes(bytes.try_into().ok()?))
}

/// Source and destination address of the IP header at `l3`, read without the classifier.
fn addresses(frame: &[u8], l3: usize) -> Option<(IpAddr, IpAddr)> {
    let header = frame.get(l3..)?;
    match header.first()? >> 4 {
        4 => {
            let src: [u8; 4] = header.get(12..16)?.try_into().ok()?;
            let dst: [u8; 4] = header.get(16..20)?.try_into().ok()?;
            Some((Ipv4Addr::from(src).into(), Ipv4Addr::from(dst).into()))
        }
        6 => {
            let src: [u8; 16] = header.get(8..24)?.try_into().ok()?;
            let dst: [u8; 16] = header.get(24..40)?.try_into().ok()?;
            Some((Ipv6Addr::from(src).into(), Ipv6Addr::from(dst).into()))
        }
        _ => None,
    }
}

/// The reference classifier on an arbitrary frame (after a [`HEADER`] that chooses the
/// policy): it never panics, is deterministic, and never blocks what the rules spare:
///
/// - nothing is blocked without a subscriber prefix in force, or when every prefix in
///   force is effectively in monitor mode;
/// - a blocked frame carries an unfavourable verdict counter and a plausible IP offset;
/// - a blocked frame with visible ports has source or destination port 25, and one to
///   587 or 465 is blocked only by the inbound rule (source port 25);
/// - a blocked frame without visible ports is a fragment and fragments fail closed, or it
///   is unreadable TCP (extension header chain too long, first fragment cut short) from a
///   subscriber under `unreadable_tcp: port25`, judged by the egress rule;
/// - on an upstream attachment only the inbound rule blocks;
/// - the address the rule is about (the source for egress, the destination for inbound)
///   lies in a subscriber prefix and in no allowlist prefix, checked with plain prefix
///   containment, independently of the model's longest-prefix match.
pub fn classifier(data: &[u8]) {
    let (header, frame) = data.split_at(HEADER.min(data.len()));
    let mut padded = [0_u8; HEADER];
    for (slot, byte) in padded.iter_mut().zip(header) {
        *slot = *byte;
    }
    let chosen = choose(padded);
    let outcome = chosen.tables.classify(frame);
    if chosen.tables.classify(frame) != outcome {
        violated("the classifier is not deterministic".to_owned());
    }
    if let Some(_counter) = outcome.counter {
        let l3 = usize::from(outcome.l3);
        if l3 < 14 || l3 >= frame.len() {
            violated(format!(
                "counted with IP offset {l3} in a {}-byte frame",
                frame.len()
            ));
        }
    }
    if outcome.action == Action::Pass {
        return;
    }
    let what = format!("{outcome:?} for frame {frame:02x?}");
    if chosen.subscribers.is_empty() {
        violated(format!("blocked without subscriber prefixes: {what}"));
    }
    if chosen
        .subscribers
        .iter()
        .all(|(_, mode)| mode.effective(chosen.config.mode) == Mode::MONITOR)
    {
        violated(format!("blocked in monitor mode: {what}"));
    }
    let Some(counter) = outcome.counter else {
        violated(format!("blocked without a verdict counter: {what}"));
    };
    if [Verdict::PASSED, Verdict::WOULD_DROP, Verdict::ALLOWLISTED].contains(&counter.verdict) {
        violated(format!(
            "blocked with verdict {:?}: {what}",
            counter.verdict
        ));
    }
    let l4 = usize::from(outcome.l4);
    if l4 == 0 {
        let fragment = [
            ParseOutcome::NON_FIRST_FRAGMENT,
            ParseOutcome::SHORT_FIRST_FRAGMENT,
        ]
        .contains(&outcome.parse);
        let closed_fragment = fragment && chosen.config.fragments == FragmentPolicy::DROP;
        let unreadable = [
            ParseOutcome::EXT_CHAIN_TOO_LONG,
            ParseOutcome::SHORT_FIRST_FRAGMENT,
        ]
        .contains(&outcome.parse)
            && chosen.config.unreadable_tcp == UnreadableTcp::PORT25
            && counter.direction == Direction::EGRESS;
        if !closed_fragment && !unreadable {
            violated(format!(
                "blocked without ports, neither a fail-closed fragment nor unreadable TCP \
                 under unreadable_tcp: port25: {what}"
            ));
        }
    } else {
        let (Some(sport), Some(dport)) = (be16(frame, l4), be16(frame, l4 + 2)) else {
            violated(format!("blocked with ports beyond the frame: {what}"));
        };
        if sport != 25 && dport != 25 {
            violated(format!("blocked {sport} → {dport}, neither is 25: {what}"));
        }
        if [587, 465].contains(&dport) && sport != 25 {
            violated(format!("blocked submission port {dport}: {what}"));
        }
        if outcome.parse != ParseOutcome::TCP {
            violated(format!(
                "blocked with ports but parse {:?}: {what}",
                outcome.parse
            ));
        }
    }
    if chosen.tables.role == Role::Upstream && counter.direction != Direction::INBOUND {
        violated(format!(
            "upstream attachment blocked by the egress rule: {what}"
        ));
    }
    let Some((src, dst)) = addresses(frame, usize::from(outcome.l3)) else {
        violated(format!("blocked, but no IP header at the offset: {what}"));
    };
    let subject = if counter.direction == Direction::INBOUND {
        dst
    } else {
        src
    };
    if !chosen
        .subscribers
        .iter()
        .any(|(net, _)| net.contains(&subject))
    {
        violated(format!("blocked {subject}, not a subscriber: {what}"));
    }
    if chosen.allow.iter().any(|net| net.contains(&subject)) {
        violated(format!("blocked {subject}, which is allowlisted: {what}"));
    }
}

// ---------------------------------------------------------------------------------------
// Control protocol
// ---------------------------------------------------------------------------------------

/// The policy behind the control target: subscriber space in both families, one policy
/// allowlist entry in each, one of them with a SYN limit.
const CONTROL_POLICY: &str = "version: 1
subscribers:
  - prefix: 100.64.0.0/16
  - prefix: 2001:db8:1::/48
    mode: monitor
allow:
  - prefix: 100.64.9.0/24
    comment: relay
    max_syn_per_minute: 60
  - prefix: 2001:db8:1:9::/64
";

/// The control request handler that p25d runs (`filter_user::control::handler::handle`)
/// on arbitrary bytes: the first byte picks the peer (bit 0: administrator or not), the
/// rest is split into request lines, run one after the other against one in-memory
/// daemon. Every answer is well-formed JSON lines within the size cap (a streamed list
/// has as many rows as its head announces), a non-administrator changes nothing, and
/// after every request the allowlist maps hold exactly the policy's and the runtime
/// entries, each of them valid (expiry at most ten years ahead).
pub fn control(data: &[u8]) {
    use filter_user::control::{
        ListHead, MAX_MESSAGE, OffendersHead, Request, Response,
        handler::{MemoryHost, Peer, handle},
    };

    static POLICY: std::sync::OnceLock<Option<policy::Policy>> = std::sync::OnceLock::new();
    let Some(policy) = POLICY
        .get_or_init(|| {
            policy::parse(CONTROL_POLICY, "control.yaml")
                .ok()
                .map(|c| c.policy)
        })
        .clone()
    else {
        violated("the control target's policy does not parse".into());
    };
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let peer = Peer {
        uid: if first & 1 == 1 { 0 } else { 65534 },
        pid: Some(1),
        admin: first & 1 == 1,
    };
    let mut host = MemoryHost::new(policy, 8);
    let now = filter_user::runtime::unix(std::time::SystemTime::now());
    for line in rest.split(|&b| b == b'\n').take(32) {
        let before = (
            host.tables.clone(),
            host.runtime.entries().clone(),
            host.generation,
        );
        let mut request_line = line.to_vec();
        request_line.push(b'\n');
        let answer = handle(&mut host, &peer, &request_line);
        // Well-formed: JSON lines, each within the cap.
        if answer.last() != Some(&b'\n') {
            violated(format!("answer does not end a line: {answer:?}"));
        }
        let lines: Vec<&[u8]> = answer
            .strip_suffix(b"\n")
            .unwrap_or(&answer)
            .split(|&b| b == b'\n')
            .collect();
        if let Some(long) = lines.iter().find(|l| l.len() >= MAX_MESSAGE) {
            violated(format!("a line of {} bytes", long.len()));
        }
        let Some(head) = lines.first() else {
            violated("an empty answer".into());
        };
        let head: Response<serde_json::Value> = match serde_json::from_slice(head) {
            Ok(head) => head,
            Err(e) => violated(format!(
                "unreadable head ({e}): {:?}",
                String::from_utf8_lossy(head)
            )),
        };
        let request = std::str::from_utf8(line)
            .ok()
            .and_then(|text| serde_json::from_str::<Request>(text).ok());
        match (&head, &request) {
            (Response::Ok { data }, Some(Request::List)) => {
                let Ok(counts) = serde_json::from_value::<ListHead>(data.clone()) else {
                    violated(format!("list head {data}"));
                };
                if lines.len() != 1 + counts.allow + counts.subscribers {
                    violated(format!(
                        "list announced {counts:?}, sent {} lines",
                        lines.len()
                    ));
                }
            }
            (Response::Ok { data }, Some(Request::Offenders { .. })) => {
                if serde_json::from_value::<OffendersHead>(data.clone()).is_err() {
                    violated(format!("offenders head {data}"));
                }
            }
            (Response::Ok { .. }, None) => {
                violated(format!(
                    "ok for an unreadable request {:?}",
                    String::from_utf8_lossy(line)
                ));
            }
            _ => {
                if lines.len() != 1 {
                    violated(format!("{} lines for a single answer", lines.len()));
                }
            }
        }
        if !peer.admin
            && before
                != (
                    host.tables.clone(),
                    host.runtime.entries().clone(),
                    host.generation,
                )
        {
            violated(format!(
                "a non-administrator changed the state: {:?}",
                String::from_utf8_lossy(line)
            ));
        }
        // The maps hold the policy's entries and the runtime ones, nothing else.
        let mut expected: std::collections::BTreeSet<IpNet> =
            host.policy.allow.iter().map(|a| a.prefix).collect();
        expected.extend(host.runtime.entries().keys().copied());
        let in_maps: std::collections::BTreeSet<IpNet> = host.tables.0.keys().copied().collect();
        if expected != in_maps {
            violated(format!("maps {in_maps:?} but policy+runtime {expected:?}"));
        }
        for entry in host.runtime.entries().values() {
            if let Err(e) = entry.validate(now) {
                violated(format!(
                    "an invalid runtime entry was accepted: {entry:?}: {e}"
                ));
            }
            if !host.policy.allow.iter().any(|a| a.prefix == entry.prefix)
                && host.tables.0.get(&entry.prefix) != Some(&entry.allow_value())
            {
                violated(format!(
                    "the map value of {} is not the entry's",
                    entry.prefix
                ));
            }
        }
    }
}
