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
        Verdict,
    },
    classify::Action,
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

/// The lines of `text` as YAML counts them: CR LF, a lone CR, LF, NEL, LS and PS all end
/// a line (YAML 1.1, which the parser's line numbers follow; found by the fuzzer with a
/// stray CR).
fn yaml_lines(text: &str) -> Vec<&str> {
    let mut lines = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find(['\r', '\n', '\u{85}', '\u{2028}', '\u{2029}']) {
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
/// global mode (3 is unknown, which must enforce), bit 2 fragments fail closed. Each
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
        ..Config::default()
    };
    let mut tables = ModelTables::default();
    tables.config = config;
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
/// - a blocked frame without visible ports is a fragment, and fragments fail closed;
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
        if !fragment || chosen.config.fragments != FragmentPolicy::DROP {
            violated(format!(
                "blocked without ports, not a fail-closed fragment: {what}"
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
