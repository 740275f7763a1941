//! A fast path for the common shape of a policy document, read straight into [`RawPolicy`].
//!
//! serde_yaml (serde_norway) first loads the whole document as a list of events, each
//! owning its scalar, tag and anchor, and only then deserializes: for a million-entry
//! allowlist that is most of the load time and hundreds of MiB. This reader handles the
//! plain, line-oriented subset that policies are written in (block mappings, block
//! sequences of block or one-line flow mappings, simple plain or quoted scalars, comments)
//! in one pass over the text, building only the entries themselves.
//!
//! It never judges a document: whenever it meets anything outside that subset, or
//! anything serde_yaml would reject or read differently (unknown or repeated keys, missing
//! fields, values of another type, nulls, tags, anchors, multi-line scalars, tabs,
//! carriage returns, several documents...), it returns `None` and the caller takes the
//! serde_yaml path, which produces the located diagnostics. So for every document it
//! accepts, the result is the one serde_yaml would have given.

use std::borrow::Cow;

use super::{
    Attach, Fragments, PolicyAction, PolicyMode, Role, UnreadableTcpPolicy,
    raw::{RawDefaults, RawInterface, RawPolicy, RawSubscriber},
};

/// An allowlist entry, compactly: a million of them are read before any is checked, and
/// `RawAllow` (four strings and two numbers, nearly all of them absent) was 112 bytes
/// each. The fields are as in `RawAllow`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct FastAllow<'t> {
    pub prefix: &'t str,
    pub extra: Option<Box<AllowExtra<'t>>>,
}

/// The optional fields of an allowlist entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct AllowExtra<'t> {
    pub comment: Option<&'t str>,
    pub owner: Option<&'t str>,
    pub expires: Option<&'t str>,
    pub max_syn_per_minute: Option<u32>,
    pub syn_burst: Option<u32>,
}

/// Reads `text` as a version-1 policy, if it is within the subset (see the module). The
/// allowlist comes separately, compact; `allow` of the policy is left empty.
pub(super) fn read(text: &str) -> Option<(RawPolicy<'_>, Vec<FastAllow<'_>>)> {
    // Tabs, carriage returns and the other line breaks YAML knows would need libyaml's
    // exact rules; leave them to it.
    if text.contains(['\t', '\r', '\u{85}', '\u{2028}', '\u{2029}']) {
        return None;
    }
    // libyaml rejects non-printable characters anywhere, comments included (the `policy`
    // fuzz target found a NUL in a comment line, which this reader skipped): any such
    // character also goes to serde_yaml, which reports it with its position.
    if !text.chars().all(|c| c == '\n' || printable(c)) {
        return None;
    }
    let mut lines = Lines::new(text);
    let mut seen: Vec<&str> = Vec::new();
    let mut version = false;
    let mut allow_list = None;
    let mut policy = RawPolicy {
        _version: None,
        defaults: RawDefaults::default(),
        interfaces: Vec::new(),
        subscribers: Vec::new(),
        allow: Vec::new(),
        allow_empty_subscribers: false,
    };
    while let Some((indent, line)) = lines.next_content() {
        if indent != 0 {
            return None;
        }
        let (key, rest) = key_value(line)?;
        if seen.contains(&key) {
            return None;
        }
        seen.push(key);
        match key {
            "version" => {
                // Only a plain `1`: anything else is for the version probe to report.
                if scalar_block(rest)? != Scalar::Plain("1") {
                    return None;
                }
                version = true;
            }
            "allow_empty_subscribers" => {
                policy.allow_empty_subscribers = match scalar_block(rest)? {
                    Scalar::Plain("true") => true,
                    Scalar::Plain("false") => false,
                    _ => return None,
                };
            }
            "defaults" => {
                if !is_empty_value(rest)? {
                    return None;
                }
                policy.defaults = defaults(&mut lines)?;
            }
            "interfaces" => policy.interfaces = sequence(&mut lines, rest, interface)?,
            "subscribers" => policy.subscribers = sequence(&mut lines, rest, subscriber)?,
            "allow" => allow_list = Some(sequence(&mut lines, rest, allow)?),
            _ => return None,
        }
    }
    version.then(|| (policy, allow_list.unwrap_or_default()))
}

/// The text, line by line, skipping blank lines and comment lines.
struct Lines<'t> {
    rest: &'t str,
    /// A line read ahead and not consumed.
    peeked: Option<(usize, &'t str)>,
}

impl<'t> Lines<'t> {
    fn new(text: &'t str) -> Self {
        Self {
            rest: text,
            peeked: None,
        }
    }

    /// The next line with content: its indentation and the text after it (trailing
    /// spaces removed).
    fn next_content(&mut self) -> Option<(usize, &'t str)> {
        if let Some(line) = self.peeked.take() {
            return Some(line);
        }
        while !self.rest.is_empty() {
            let (line, rest) = self.rest.split_once('\n').unwrap_or((self.rest, ""));
            self.rest = rest;
            let content = line.trim_start_matches(' ');
            let content = content.trim_end_matches(' ');
            if content.is_empty() || content.starts_with('#') {
                continue;
            }
            return Some((line.len() - line.trim_start_matches(' ').len(), content));
        }
        None
    }

    fn peek(&mut self) -> Option<(usize, &'t str)> {
        if self.peeked.is_none() {
            self.peeked = self.next_content();
        }
        self.peeked
    }
}

/// A scalar as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scalar<'t> {
    Plain(&'t str),
    Quoted(&'t str),
}

impl<'t> Scalar<'t> {
    /// The value of a string field. A plain null is `None` in serde_yaml's eyes for an
    /// option, a type error for a string: not worth telling apart here.
    fn string(self) -> Option<&'t str> {
        match self {
            Self::Plain("null" | "Null" | "NULL" | "~") => None,
            Self::Plain(text) | Self::Quoted(text) => Some(text),
        }
    }

    /// The value of an integer field: decimal digits only, no sign, no leading zero.
    fn number<T: std::str::FromStr>(self) -> Option<T> {
        let Self::Plain(text) = self else {
            return None;
        };
        let digits = text.bytes().all(|b| b.is_ascii_digit());
        if !digits || text.is_empty() || (text.len() > 1 && text.starts_with('0')) {
            return None;
        }
        text.parse().ok()
    }

    fn word(self) -> Option<&'t str> {
        match self {
            Self::Plain(text) => Some(text),
            Self::Quoted(_) => None,
        }
    }
}

/// `key: rest` or `key:` with a simple lowercase key.
fn key_value(line: &str) -> Option<(&str, &str)> {
    let end = line.find(|c: char| !(c.is_ascii_lowercase() || c == '_'))?;
    let (key, rest) = line.split_at(end);
    let rest = rest.strip_prefix(':')?;
    if key.is_empty() || !(rest.is_empty() || rest.starts_with(' ')) {
        return None;
    }
    Some((key, rest.trim_start_matches(' ')))
}

/// Whether the value after a key is empty (a nested block follows, or null).
fn is_empty_value(rest: &str) -> Option<bool> {
    Some(rest.is_empty() || rest.starts_with('#'))
}

/// Whether what follows a closing quote or bracket ends the line: nothing, or a comment
/// after a space (a `#` right after the value does not start a comment).
fn ends_line(after: &str) -> bool {
    let trimmed = after.trim_start_matches(' ');
    trimmed.is_empty() || (trimmed.starts_with('#') && trimmed.len() < after.len())
}

/// Whether `c` may appear in a scalar this reader accepts: printable, and no line break
/// or byte order mark (libyaml's set of printable characters, minus line breaks).
fn printable(c: char) -> bool {
    matches!(c, ' '..='~' | '\u{a0}'..='\u{d7ff}' | '\u{e000}'..='\u{fffd}' | '\u{10000}'..)
        && c != '\u{feff}'
}

/// A scalar ending the line in block context, with an optional trailing comment.
fn scalar_block(rest: &str) -> Option<Scalar<'_>> {
    if let Some(quote @ ('"' | '\'')) = rest.chars().next() {
        let body = rest.get(1..)?;
        let end = body.find(quote)?;
        let (value, after) = body.split_at(end);
        let bad = value.contains(|c: char| c == '\\' || !printable(c));
        if bad || !ends_line(after.get(1..)?) {
            return None;
        }
        // `'it''s'` would need unescaping: `''` is found as the end and `'s'` is left.
        return Some(Scalar::Quoted(value));
    }
    let value = match rest.find(" #") {
        Some(at) => rest.get(..at)?.trim_end_matches(' '),
        None => rest,
    };
    plain(value, false).map(Scalar::Plain)
}

/// Checks a plain scalar: it must start with a letter or digit (no indicator, tag, anchor
/// or alias) and hold nothing that would end it or make it something else.
fn plain(value: &str, flow: bool) -> Option<&str> {
    let first = value.chars().next()?;
    if !first.is_ascii_alphanumeric() || value.ends_with(':') || value.contains(": ") {
        return None;
    }
    let flow_bad = |c: char| flow && matches!(c, ',' | '[' | ']' | '{' | '}');
    if value.contains(|c: char| !printable(c) || flow_bad(c)) || value.contains(" #") {
        return None;
    }
    Some(value)
}

/// The `defaults:` block.
fn defaults(lines: &mut Lines<'_>) -> Option<RawDefaults> {
    let mut defaults = RawDefaults::default();
    let mut seen: Vec<&str> = Vec::new();
    let Some((indent, _)) = lines.peek().filter(|&(indent, _)| indent > 0) else {
        // `defaults:` with nothing under it: null, read as the defaults.
        return Some(defaults);
    };
    while let Some((at, line)) = lines.peek() {
        if at == 0 {
            break;
        }
        if at != indent {
            return None;
        }
        lines.next_content();
        let (key, rest) = key_value(line)?;
        if seen.contains(&key) {
            return None;
        }
        seen.push(key);
        match key {
            "ports" => defaults.ports = Some(flow_numbers(rest)?),
            "reject_rate" => defaults.reject_rate = Some(scalar_block(rest)?.number()?),
            "reject_burst" => defaults.reject_burst = Some(scalar_block(rest)?.number()?),
            "mode" => defaults.mode = mode(scalar_block(rest)?)?,
            "action" => defaults.action = action(scalar_block(rest)?)?,
            "fragments" => {
                defaults.fragments = match scalar_block(rest)?.word()? {
                    "pass" => Fragments::Pass,
                    "drop" => Fragments::Drop,
                    _ => return None,
                }
            }
            "unreadable_tcp" => {
                defaults.unreadable_tcp = match scalar_block(rest)?.word()? {
                    "port25" => UnreadableTcpPolicy::Port25,
                    "pass" => UnreadableTcpPolicy::Pass,
                    _ => return None,
                }
            }
            _ => return None,
        }
    }
    Some(defaults)
}

/// `[25]`, `[25, 587]`, `[]`, with an optional trailing comment.
fn flow_numbers(rest: &str) -> Option<Vec<u16>> {
    let body = rest.strip_prefix('[')?;
    let (body, after) = body.split_once(']')?;
    if !ends_line(after) {
        return None;
    }
    let body = body.trim_matches(' ');
    if body.is_empty() {
        return Some(Vec::new());
    }
    body.split(',')
        .map(|item| Scalar::Plain(item.trim_matches(' ')).number())
        .collect()
}

fn mode(scalar: Scalar<'_>) -> Option<PolicyMode> {
    match scalar.word()? {
        "enforce" => Some(PolicyMode::Enforce),
        "monitor" => Some(PolicyMode::Monitor),
        _ => None,
    }
}

fn action(scalar: Scalar<'_>) -> Option<PolicyAction> {
    match scalar.word()? {
        "drop" => Some(PolicyAction::Drop),
        "reject" => Some(PolicyAction::Reject),
        _ => None,
    }
}

/// The fields of one mapping item, in order, without repeats.
type Fields<'t> = Vec<(&'t str, Scalar<'t>)>;

/// A block sequence of mappings after a top-level key (`rest` is the text after the
/// key), each item read by `item`.
fn sequence<'t, T>(
    lines: &mut Lines<'t>,
    rest: &'t str,
    item: fn(&Fields<'t>) -> Option<T>,
) -> Option<Vec<T>> {
    if rest.starts_with('[') {
        // Only the empty flow sequence.
        return flow_numbers(rest)?.is_empty().then(Vec::new);
    }
    if !is_empty_value(rest)? {
        return None;
    }
    let mut items = Vec::new();
    let Some((dash, _)) = lines.peek() else {
        return Some(items);
    };
    let mut fields: Fields<'t> = Vec::with_capacity(6);
    while let Some((at, line)) = lines.peek() {
        if at < dash || (at == 0 && !line.starts_with("- ")) {
            break;
        }
        if at != dash {
            return None;
        }
        lines.next_content();
        let body = line.strip_prefix("- ")?;
        let after = body.trim_start_matches(' ');
        fields.clear();
        if let Some(flow) = after.strip_prefix('{') {
            flow_mapping(flow, &mut fields)?;
        } else {
            // A block mapping: its keys all start in the column of the first.
            let column = at + line.len() - after.len();
            let (key, value) = key_value(after)?;
            push_field(&mut fields, key, scalar_block(value)?)?;
            while let Some((at, line)) = lines.peek() {
                if at != column {
                    break;
                }
                lines.next_content();
                let (key, value) = key_value(line)?;
                push_field(&mut fields, key, scalar_block(value)?)?;
            }
            // What follows must be the next item, or what comes after the sequence.
            if lines.peek().is_some_and(|(at, _)| at > dash) {
                return None;
            }
        }
        items.push(item(&fields)?);
    }
    Some(items)
}

fn push_field<'t>(fields: &mut Fields<'t>, key: &'t str, value: Scalar<'t>) -> Option<()> {
    if fields.iter().any(|(k, _)| *k == key) {
        return None;
    }
    fields.push((key, value));
    Some(())
}

/// `key: value, key: value }` on one line (the `{` already taken), plain or quoted
/// values, an optional trailing comment.
fn flow_mapping<'t>(mut rest: &'t str, fields: &mut Fields<'t>) -> Option<()> {
    loop {
        rest = rest.trim_start_matches(' ');
        if let Some(after) = rest.strip_prefix('}') {
            // `{}`, or a trailing comma, would need more care than it is worth.
            return (ends_line(after) && !fields.is_empty()).then_some(());
        }
        let end = rest.find(|c: char| !(c.is_ascii_lowercase() || c == '_'))?;
        let (key, after) = rest.split_at(end);
        rest = after.strip_prefix(": ")?.trim_start_matches(' ');
        let value;
        if let Some(quote @ ('"' | '\'')) = rest.chars().next() {
            let body = rest.get(1..)?;
            let end = body.find(quote)?;
            let text = body.get(..end)?;
            if text.contains(|c: char| c == '\\' || !printable(c)) {
                return None;
            }
            value = Scalar::Quoted(text);
            rest = body.get(end + 1..)?.trim_start_matches(' ');
        } else {
            let end = rest.find([',', '}'])?;
            let text = rest.get(..end)?.trim_end_matches(' ');
            value = Scalar::Plain(plain(text, true)?);
            rest = rest.get(end..)?;
        }
        if key.is_empty() {
            return None;
        }
        push_field(fields, key, value)?;
        if let Some(after) = rest.strip_prefix(',') {
            rest = after;
            if !rest.starts_with(' ') {
                return None;
            }
        } else if !rest.starts_with('}') {
            return None;
        }
    }
}

fn interface(fields: &Fields<'_>) -> Option<RawInterface> {
    let (mut name, mut role, mut attach) = (None, None, Attach::default());
    for &(key, value) in fields {
        match key {
            "name" => name = Some(value.string()?.to_owned()),
            "role" => {
                role = Some(match value.word()? {
                    "subscriber" => Role::Subscriber,
                    "upstream" => Role::Upstream,
                    _ => return None,
                });
            }
            "attach" => {
                attach = match value.word()? {
                    "xdp" => Attach::Xdp,
                    "tc" => Attach::Tc,
                    "auto" => Attach::Auto,
                    _ => return None,
                };
            }
            _ => return None,
        }
    }
    Some(RawInterface {
        name: name?,
        role: role?,
        attach,
    })
}

fn subscriber<'t>(fields: &Fields<'t>) -> Option<RawSubscriber<'t>> {
    let (mut prefix, mut mode_, mut action_) = (None, None, None);
    for &(key, value) in fields {
        match key {
            "prefix" => prefix = Some(Cow::Borrowed(value.string()?)),
            "mode" => mode_ = Some(mode(value)?),
            "action" => action_ = Some(action(value)?),
            _ => return None,
        }
    }
    Some(RawSubscriber {
        prefix: prefix?,
        mode: mode_,
        action: action_,
    })
}

fn allow<'t>(fields: &Fields<'t>) -> Option<FastAllow<'t>> {
    let mut prefix = None;
    let mut extra = AllowExtra::default();
    for &(key, value) in fields {
        match key {
            "prefix" => prefix = Some(value.string()?),
            "comment" => extra.comment = Some(value.string()?),
            "owner" => extra.owner = Some(value.string()?),
            "expires" => extra.expires = Some(value.string()?),
            "max_syn_per_minute" => extra.max_syn_per_minute = Some(value.number()?),
            "syn_burst" => extra.syn_burst = Some(value.number()?),
            _ => return None,
        }
    }
    Some(FastAllow {
        prefix: prefix?,
        extra: (extra != AllowExtra::default()).then(|| Box::new(extra)),
    })
}

/// The differential check behind the unit tests and the `policy` fuzz target: `Ok(true)`
/// when the fast reader read `text` and agrees with serde_yaml field by field, `Ok(false)`
/// when it stepped aside (serde_yaml alone decides), `Err` naming what differs otherwise.
pub(super) fn agrees_with_serde(text: &str) -> Result<bool, String> {
    let Some((fast, fast_allow)) = read(text) else {
        return Ok(false);
    };
    let slow = serde_yaml::from_str::<RawPolicy<'_>>(text)
        .map_err(|error| format!("the fast reader read a document serde_yaml rejects: {error}"))?;
    let fast_allow: Vec<super::raw::RawAllow<'_>> = fast_allow
        .into_iter()
        .map(|entry| {
            let extra = entry.extra.unwrap_or_default();
            super::raw::RawAllow {
                prefix: Cow::Borrowed(entry.prefix),
                comment: extra.comment.map(Cow::Borrowed),
                owner: extra.owner.map(Cow::Borrowed),
                expires: extra.expires.map(Cow::Borrowed),
                max_syn_per_minute: extra.max_syn_per_minute,
                syn_burst: extra.syn_burst,
            }
        })
        .collect();
    let differs = |what: &str, a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| {
        Err(format!(
            "fast and serde_yaml differ on {what}: {a:?} vs {b:?}"
        ))
    };
    if fast.defaults != slow.defaults {
        return differs("defaults", &fast.defaults, &slow.defaults);
    }
    if fast.interfaces != slow.interfaces {
        return differs("interfaces", &fast.interfaces, &slow.interfaces);
    }
    if fast.subscribers != slow.subscribers {
        return differs("subscribers", &fast.subscribers, &slow.subscribers);
    }
    if !fast.allow.is_empty() || fast_allow != slow.allow {
        return differs("allow", &fast_allow, &slow.allow);
    }
    if fast.allow_empty_subscribers != slow.allow_empty_subscribers {
        return differs(
            "allow_empty_subscribers",
            &fast.allow_empty_subscribers,
            &slow.allow_empty_subscribers,
        );
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// The fast reader must either step aside or agree with serde_yaml.
    #[expect(
        clippy::panic,
        reason = "a test failing with the document that broke it"
    )]
    fn agrees(text: &str) -> bool {
        agrees_with_serde(text).unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    fn yaml_files(dir: &Path, out: &mut Vec<(String, String)>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                yaml_files(&path, out);
            } else if path.extension().is_some_and(|e| e == "yaml")
                && let Ok(text) = std::fs::read_to_string(&path)
            {
                out.push((path.display().to_string(), text));
            }
        }
    }

    #[test]
    fn agrees_with_serde_on_the_corpus_and_example_policies() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut files = Vec::new();
        yaml_files(&root.join("policies"), &mut files);
        yaml_files(&root.join("tests/policies"), &mut files);
        assert!(files.len() > 20, "corpus not found");
        let mut fast = Vec::new();
        for (name, text) in &files {
            if agrees(text) {
                fast.push(name.clone());
            }
        }
        // The example policies are the shape the fast path exists for.
        for example in ["residential-isp", "university", "minimal", "lab"] {
            assert!(
                fast.iter()
                    .any(|n| n.ends_with(&format!("policies/{example}.yaml"))),
                "{example} took the slow path"
            );
        }
    }

    #[test]
    fn reads_the_benchmark_shape() {
        let text = "# generated\nversion: 1\ndefaults:\n  mode: enforce\n  fragments: pass\n  \
                    ports: [25]\ninterfaces:\n  - name: veth0\n    role: subscriber\n    \
                    attach: xdp\nsubscribers:\n  - { prefix: 100.64.0.0/26, mode: monitor }\n  \
                    - prefix: 100.64.0.64/26\n  - { prefix: 2001:db8:0:100::/56, mode: monitor }\n\
                    allow:\n  - prefix: 100.64.0.1/32\n  - prefix: 2001:db8::1/128\n";
        assert!(agrees(text));
    }

    #[test]
    fn steps_aside_or_agrees_on_tricky_documents() {
        let head = "version: 1\nsubscribers:\n  - prefix: 10.0.0.0/8\n";
        let cases = [
            "allow:\n  - prefix: 10.0.0.1\n    comment: foo #bar\n",
            "allow:\n  - prefix: 10.0.0.1\n    comment: foo#bar\n",
            "allow:\n  - prefix: 10.0.0.1\n    comment: 'it''s'\n",
            "allow:\n  - prefix: 10.0.0.1\n    comment: \"a \\\" b\"\n",
            "allow:\n  - prefix: 10.0.0.1\n    comment: \"x\"#y\n",
            "allow:\n  - prefix: 10.0.0.1\n    comment: \"x\" # y\n",
            "allow:\n  - prefix: 10.0.0.1\n    comment: null\n",
            "allow:\n  - prefix: 10.0.0.1\n    comment:\n",
            "allow:\n  - prefix: 10.0.0.1\n    comment: a\n      b\n",
            "allow:\n  - prefix: 10.0.0.1\n    comment: a\n   b\n",
            "allow:\n  - prefix: 10.0.0.1\n    comment: yes\n",
            "allow:\n  - prefix: 10.0.0.1\n    comment: 12\n",
            "allow:\n  - prefix: 10.0.0.1\n    comment: é ü\n",
            "allow:\n  - prefix: 10.0.0.1\n    prefix: 10.0.0.2\n",
            "allow:\n  - prefix: 10.0.0.1\n    max_syn_per_minute: 010\n",
            "allow:\n  - prefix: 10.0.0.1\n    max_syn_per_minute: 0\n",
            "allow:\n  - prefix: 10.0.0.1\n    max_syn_per_minute: 99999999999\n",
            "allow:\n  - prefix: 10.0.0.1\n    max_syn_per_minute: 30\n    syn_burst: 5\n",
            "allow:\n  - prefix: 10.0.0.1\n    expires: 2030-01-01T00:00:00Z\n",
            "allow:\n- prefix: 10.0.0.1\n- prefix: 10.0.0.2\n",
            "allow:\n  -   prefix: 10.0.0.1\n      comment: x\n",
            "allow:\n  - {prefix: 10.0.0.1}\n",
            "allow:\n  - { prefix: 2001:db8::, comment: x }\n",
            "allow:\n  - { prefix: 2001:db8::1, comment: 'a, b' }\n",
            "allow:\n  - { prefix: 10.0.0.1, }\n",
            "allow:\n  - { prefix: 10.0.0.1 } # c\n",
            "allow:\n  - { prefix: 10.0.0.1 }#c\n",
            "allow:\n  - {}\n",
            "allow: []\n",
            "allow:\n",
            "allow: ~\n",
            "allow:\n  - prefix: &a 10.0.0.1\n  - prefix: *a\n",
            "allow:\n  - prefix: !!str 10.0.0.1\n",
            "allow:\n  -\n    prefix: 10.0.0.1\n",
            "allow:\n  - prefix: 10.0.0.1\n  - prefix: 10.0.0.1\n",
            "defaults:\n",
            "defaults:\n  ports: []\n",
            "defaults:\n  ports: [25, 587]\n  reject_rate: 5\n",
            "defaults:\n  mode: Enforce\n",
            "defaults:\n  mode: monitor\n  mode: enforce\n",
            "defaults:\n  mode: monitor\n   action: drop\n",
            "allow_empty_subscribers: true\n",
            "allow_empty_subscribers: yes\n",
            "interfaces:\n  - name: eth0\n    role: upstream\n",
            "interfaces:\n  - name: 0\n    role: upstream\n    attach: tc\n",
            "interfaces:\n  - name: eth0\n",
            "unknown: 1\n",
            "---\nallow: []\n",
            "allow: []\n...\n",
            "allow: []\n---\nversion: 1\n",
        ];
        for case in cases {
            agrees(&format!("{head}{case}"));
        }
        // Not version 1, or none: the probe's business.
        for text in ["version: 2\n", "version: '1'\n", "subscribers: []\n", ""] {
            assert!(read(text).is_none(), "{text}");
        }
    }
}
