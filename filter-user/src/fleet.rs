//! Fleet mode: many routers follow one policy from etcd (`p25d run --etcd`), and keep
//! filtering when etcd is gone. The layout, the consistency model and the failure modes
//! are in docs/fleet.md.
//!
//! This is the part that needs no etcd: the key layout ([`keys`]), the typed values
//! ([`values`]), the local snapshot ([`snapshot`]), the watch state machine
//! ([`follower`]), and composing the fleet state into a policy ([`Composer`]), checked by
//! the same code as a policy file. The etcd client side lives in p25d (bin/p25d/fleet.rs)
//! and p25ctl (`p25ctl fleet`).

#[cfg(feature = "etcd")]
pub mod etcd;
pub mod follower;
pub mod keys;
pub mod snapshot;
pub mod values;
pub mod views;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};

use crate::policy::{
    self, AllowEntry, Checked, Diagnostic, Interface, MAX_POLICY_BYTES, Policy, PolicyError,
};
pub use follower::{Follower, State};
pub use keys::Layout;
pub use snapshot::Snapshot;

/// Everything that can go wrong in the fleet library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `--etcd-prefix` is unusable.
    #[error("--etcd-prefix {prefix:?}: {why}")]
    Prefix {
        /// As given.
        prefix: String,
        /// What is wrong.
        why: String,
    },
    /// `--router` is unusable.
    #[error("--router {name:?}: {why}")]
    RouterName {
        /// As given.
        name: String,
        /// What is wrong.
        why: String,
    },
    /// The snapshot file is unusable.
    #[error("fleet snapshot {}: {message}", path.display())]
    Snapshot {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// `--etcd` is unusable.
    #[error("--etcd {text:?}: {why}")]
    Endpoints {
        /// As given.
        text: String,
        /// What is wrong.
        why: String,
    },
    /// An etcd request failed.
    #[error("etcd: {what}: {message}")]
    Etcd {
        /// What was being done.
        what: &'static str,
        /// Why it failed: the client error as text (its own display already holds its
        /// causes, so it is not chained again).
        message: String,
    },
    /// An etcd request took too long.
    #[error("etcd: {what}: no answer within {after:?}; is etcd running and reachable?")]
    Timeout {
        /// What was being done.
        what: &'static str,
        /// How long was waited.
        after: Duration,
    },
    /// A file operation failed.
    #[error("{what} ({}): {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// On what.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
}

/// Why the fleet state could not be used as it is: the `reason` label of
/// `p25_policy_source_errors_total`. A closed set, so that the label stays bounded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// etcd could not be reached, or the connection broke.
    Connect,
    /// The watch was cancelled by a compaction (a full read follows).
    Compacted,
    /// `<prefix>/policy` is missing.
    PolicyMissing,
    /// `<prefix>/policy` was rejected by the policy check.
    PolicyInvalid,
    /// This router's interface override was rejected.
    InterfacesInvalid,
    /// A fleet allow entry was rejected (and skipped).
    AllowInvalid,
    /// Writing the snapshot failed.
    Snapshot,
    /// Registering the router (lease, status put) failed.
    Register,
}

impl Reason {
    /// Every reason, for metrics that export a zero for each.
    pub const ALL: [Reason; 8] = [
        Reason::Connect,
        Reason::Compacted,
        Reason::PolicyMissing,
        Reason::PolicyInvalid,
        Reason::InterfacesInvalid,
        Reason::AllowInvalid,
        Reason::Snapshot,
        Reason::Register,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Reason::Connect => "connect",
            Reason::Compacted => "compacted",
            Reason::PolicyMissing => "policy_missing",
            Reason::PolicyInvalid => "policy_invalid",
            Reason::InterfacesInvalid => "interfaces_invalid",
            Reason::AllowInvalid => "allow_invalid",
            Reason::Snapshot => "snapshot",
            Reason::Register => "register",
        }
    }
}

/// One problem with the fleet state, for logs, status and the error counter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// Why.
    pub reason: Reason,
    /// What, naming the key (`etcd:/p25/allow/...`) and the value.
    pub message: String,
}

/// The name of a key in diagnostics: `etcd:<key>`.
pub fn source_name(key: &str) -> String {
    format!("etcd:{key}")
}

/// Checks a policy document stored at `name` (`etcd:/p25/policy`) with the policy file's
/// checks, diagnostics included. List files (`subscriber_files`, `allow_files`) are
/// refused: there is no directory to read them from, and a router would otherwise read
/// whatever its own disk holds under that name.
pub fn check_document(text: &str, name: &str) -> Result<Checked, PolicyError> {
    if text.len() <= MAX_POLICY_BYTES {
        let lists = list_keys(text, name);
        if !lists.is_empty() {
            return Err(PolicyError::Invalid(lists));
        }
    }
    policy::parse(text, name)
}

/// Diagnostics for the list-file keys of a document, if it is YAML that has them (any
/// other problem is left to the policy check, which reports it properly).
fn list_keys(text: &str, name: &str) -> Vec<Diagnostic> {
    #[derive(Deserialize)]
    struct ListKeys {
        #[serde(default)]
        subscriber_files: Option<serde_saphyr::Spanned<serde::de::IgnoredAny>>,
        #[serde(default)]
        allow_files: Option<serde_saphyr::Spanned<serde::de::IgnoredAny>>,
    }
    let Ok(Some(keys)) = serde_saphyr::from_str::<Option<ListKeys>>(text) else {
        return Vec::new();
    };
    [
        ("subscriber_files", keys.subscriber_files),
        ("allow_files", keys.allow_files),
    ]
    .into_iter()
    .filter_map(|(key, at)| {
        let at = at?.referenced;
        Some(Diagnostic {
            file: name.to_owned(),
            line: usize::try_from(at.line()).unwrap_or(usize::MAX),
            column: usize::try_from(at.column()).unwrap_or(usize::MAX),
            message: format!(
                "`{key}` cannot be used in a policy stored in etcd (there is no directory to \
                 read list files from); put the entries inline, or each allow entry under \
                 the fleet's allow/ keys with `p25ctl fleet allow`"
            ),
        })
    })
    .collect()
}

/// Lines put in front of an interface override to check it as a policy document.
const OVERRIDE_HEAD: &str = "version: 1\nallow_empty_subscribers: true\ninterfaces:\n";

/// Checks an interface override (`<prefix>/routers/<name>/interfaces`, the YAML of a
/// policy's `interfaces` list) with the policy check, diagnostics located in the override
/// itself (`name:line:col`).
pub fn check_interfaces(text: &str, name: &str) -> Result<Vec<Interface>, PolicyError> {
    // A block sequence may sit at the key's own indentation, so the override goes under
    // `interfaces:` as written and only the line numbers need shifting back.
    let head_lines = OVERRIDE_HEAD.lines().count();
    let document = format!("{OVERRIDE_HEAD}{text}");
    match policy::parse(&document, name) {
        Ok(checked) => Ok(checked.policy.interfaces),
        Err(PolicyError::Invalid(diagnostics)) => Err(PolicyError::Invalid(
            diagnostics
                .into_iter()
                .map(|d| Diagnostic {
                    line: d.line.saturating_sub(head_lines).max(1),
                    ..d
                })
                .collect(),
        )),
        Err(e) => Err(e),
    }
}

/// The fleet state composed into a policy.
#[derive(Debug)]
pub struct Composed {
    /// The policy to put in force: the document (the last good one), this router's
    /// interfaces, the fleet allow entries merged into its allowlist.
    pub checked: Checked,
    /// What was wrong and left out (a rejected document keeps the previous one).
    pub problems: Vec<Problem>,
    /// What is in force, to persist.
    pub snapshot: Snapshot,
    /// Fleet allow entries in force.
    pub fleet_allow: usize,
}

/// Composes the fleet state into policies, keeping the last good document and interface
/// override, so that a bad value never takes away what was in force.
#[derive(Debug)]
pub struct Composer {
    layout: Layout,
    router: String,
    /// The last good document: its text and the checked policy.
    document: Option<(String, Checked)>,
    /// The last good override: its text and interfaces.
    interfaces: Option<(String, Vec<Interface>)>,
    /// Each allow value as last checked, by name: its bytes and the result.
    checked_allow: BTreeMap<String, (Vec<u8>, Result<values::FleetAllow, String>)>,
}

impl Composer {
    /// A composer for `router` in the fleet under `layout`.
    pub fn new(layout: Layout, router: &str) -> Self {
        Self {
            layout,
            router: router.to_owned(),
            document: None,
            interfaces: None,
            checked_allow: BTreeMap::new(),
        }
    }

    /// Whether a good document was ever seen (without one there is nothing to apply).
    pub fn has_document(&self) -> bool {
        self.document.is_some()
    }

    /// Composes `state` at `now`. Fails only when no usable document was ever seen; every
    /// other problem is in [`Composed::problems`].
    pub fn compose(&mut self, state: &State, now: SystemTime) -> Result<Composed, Vec<Problem>> {
        let mut problems = Vec::new();
        let policy_name = source_name(&self.layout.policy());
        let fallback = if self.document.is_some() {
            "the last good document stays in force"
        } else {
            "there is no policy to put in force"
        };
        match &state.policy {
            None => problems.push(Problem {
                reason: Reason::PolicyMissing,
                message: format!(
                    "{policy_name} does not exist; {fallback} (store one with `p25ctl fleet push`)"
                ),
            }),
            Some(text) => problems.extend(keep_good(
                &mut self.document,
                text,
                |t| check_document(t, &policy_name),
                (Reason::PolicyInvalid, &policy_name, fallback),
            )),
        }
        let Some((document_text, document)) = &self.document else {
            return Err(problems);
        };
        let interfaces_name = source_name(&self.layout.interfaces(&self.router));
        let fallback = if self.interfaces.is_some() {
            "the last good override stays in force"
        } else {
            "the policy's interfaces are in force"
        };
        match &state.interfaces {
            None => self.interfaces = None,
            Some(text) => problems.extend(keep_good(
                &mut self.interfaces,
                text,
                |t| check_interfaces(t, &interfaces_name),
                (Reason::InterfacesInvalid, &interfaces_name, fallback),
            )),
        }
        let mut policy: Policy = document.policy.clone();
        if let Some((_, interfaces)) = &self.interfaces {
            policy.interfaces = interfaces.clone();
        }
        let mut snapshot_allow = BTreeMap::new();
        let mut fleet = Vec::new();
        // Values are checked once: a change to one entry of a long fleet allowlist must not
        // parse all the others again.
        let mut checked_allow = BTreeMap::new();
        for (name, bytes) in &state.allow {
            let result = match self.checked_allow.remove(name) {
                Some((old_bytes, result)) if old_bytes == *bytes => result,
                _ => values::check_allow(name, bytes, now),
            };
            match &result {
                Ok(entry) => {
                    snapshot_allow.insert(name.clone(), entry.to_value());
                    fleet.push(entry.to_policy_entry());
                }
                Err(why) => problems.push(Problem {
                    reason: Reason::AllowInvalid,
                    message: format!(
                        "{}: {why}; entry skipped",
                        source_name(&format!("{}{name}", self.layout.allow_dir()))
                    ),
                }),
            }
            checked_allow.insert(name.clone(), (bytes.clone(), result));
        }
        self.checked_allow = checked_allow;
        let fleet_allow = fleet.len();
        merge_allow(&mut policy, fleet);
        Ok(Composed {
            checked: Checked {
                policy,
                warnings: document.warnings.clone(),
            },
            problems,
            snapshot: Snapshot {
                version: snapshot::SNAPSHOT_VERSION,
                prefix: self.layout.prefix().to_owned(),
                revision: state.revision,
                policy: Some(document_text.clone()),
                interfaces: self.interfaces.as_ref().map(|(t, _)| t.clone()),
                allow: snapshot_allow,
            },
            fleet_allow,
        })
    }
}

/// Takes `text` as the new `last` good value if `check` passes; otherwise `last` stays and
/// the problem (`why`: the reason, the key's name, what stays in force) is returned.
fn keep_good<T>(
    last: &mut Option<(String, T)>,
    text: &str,
    check: impl FnOnce(&str) -> Result<T, PolicyError>,
    (reason, name, fallback): (Reason, &str, &str),
) -> Option<Problem> {
    if last.as_ref().is_some_and(|(t, _)| t == text) {
        return None;
    }
    match check(text) {
        Ok(value) => {
            *last = Some((text.to_owned(), value));
            None
        }
        Err(e) => Some(Problem {
            reason,
            message: format!("{e}\n{name} rejected; {fallback}"),
        }),
    }
}

/// Merges allow entries into a policy's allowlist as a union: a prefix the policy already
/// lists keeps one entry, the one that lasts longer (no expiry lasts longest), so the
/// prefix stays allowed while either source holds it. Linear after sorting `entries`: a
/// fleet allowlist may be long.
pub fn merge_allow(policy: &mut Policy, entries: impl IntoIterator<Item = AllowEntry>) {
    fn lasts(e: &AllowEntry) -> (u8, SystemTime) {
        e.expires.map_or((1, SystemTime::UNIX_EPOCH), |t| (0, t))
    }
    // Listed entries never expire: for their prefixes the union is the listed one.
    let mut extra: Vec<AllowEntry> = entries
        .into_iter()
        .filter(|e| policy.allow_listed.binary_search(&e.prefix).is_err())
        .collect();
    extra.sort_by_key(|e| e.prefix);
    extra.dedup_by_key(|e| e.prefix);
    let mut old = std::mem::take(&mut policy.allow).into_iter().peekable();
    let mut extra = extra.into_iter().peekable();
    let mut merged = Vec::with_capacity(old.len() + extra.len());
    loop {
        let order = match (old.peek(), extra.peek()) {
            (Some(a), Some(b)) => a.prefix.cmp(&b.prefix),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => break,
        };
        match order {
            std::cmp::Ordering::Less => merged.extend(old.next()),
            std::cmp::Ordering::Greater => merged.extend(extra.next()),
            std::cmp::Ordering::Equal => {
                if let (Some(mut kept), Some(other)) = (old.next(), extra.next()) {
                    if lasts(&other) > lasts(&kept) {
                        kept.expires = other.expires;
                    }
                    merged.push(kept);
                }
            }
        }
    }
    policy.allow = merged;
}

/// The state of a snapshot, to start a [`Follower`] from.
pub fn state_of(snapshot: &Snapshot) -> State {
    State {
        revision: snapshot.revision,
        policy: snapshot.policy.clone(),
        interfaces: snapshot.interfaces.clone(),
        allow: snapshot
            .allow
            .iter()
            .filter_map(|(name, value)| Some((name.clone(), serde_json::to_vec(value).ok()?)))
            .collect(),
    }
}

/// Capped exponential backoff with jitter, for reconnecting to etcd: 100 ms, 200 ms, …
/// up to [`Backoff::CAP`], each drawn from [wait/2, wait] so that a fleet that lost etcd
/// together does not come back in lockstep.
#[derive(Clone, Debug, Default)]
pub struct Backoff {
    failures: u32,
}

impl Backoff {
    /// The first wait.
    pub const BASE: Duration = Duration::from_millis(100);
    /// The longest wait.
    pub const CAP: Duration = Duration::from_secs(5);

    /// The wait before the next attempt, given a random `jitter` in [0, 1).
    pub fn next(&mut self, jitter: f64) -> Duration {
        let exp = Self::BASE
            .saturating_mul(1u32 << self.failures.min(16))
            .min(Self::CAP);
        self.failures = self.failures.saturating_add(1);
        exp.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
    }

    /// A success: the next failure starts from [`Backoff::BASE`] again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "version: 1
interfaces:
  - name: eth1
    role: subscriber
subscribers:
  - prefix: 100.64.0.0/16
allow:
  - prefix: 100.64.3.0/24
    comment: business
";

    fn now() -> SystemTime {
        humantime::parse_rfc3339("2026-12-01T00:00:00Z").unwrap_or(SystemTime::UNIX_EPOCH)
    }

    fn composer() -> Composer {
        Composer::new(Layout::new("/p25").unwrap_or_else(|_| unreachable!()), "r1")
    }

    fn state(policy: Option<&str>, allow: &[(&str, &str)]) -> State {
        State {
            revision: 7,
            policy: policy.map(str::to_owned),
            interfaces: None,
            allow: allow
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.as_bytes().to_vec()))
                .collect(),
        }
    }

    #[test]
    fn list_files_are_refused_with_their_position() {
        let text =
            "version: 1\nsubscribers: []\nallow_empty_subscribers: true\nallow_files:\n  - a.txt\n";
        let message = check_document(text, "etcd:/p25/policy")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            message.starts_with("etcd:/p25/policy:5:3: `allow_files` cannot"),
            "{message}"
        );
    }

    #[test]
    fn documents_are_checked_like_files() {
        let text = "version: 1\nsubscribers:\n  - prefix: 100.64.0.1/16\n";
        let message = check_document(text, "etcd:/p25/policy")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(message.starts_with("etcd:/p25/policy:3:13:"), "{message}");
        assert!(check_document(DOC, "etcd:/p25/policy").is_ok());
    }

    #[test]
    fn interface_overrides_are_checked_in_place() -> Result<(), PolicyError> {
        let interfaces =
            check_interfaces("- name: r-up\n  role: upstream\n  attach: tc\n", "etcd:x")?;
        assert_eq!(interfaces.len(), 1);
        assert_eq!(interfaces.first().map(|i| i.name.as_str()), Some("r-up"));
        let message = check_interfaces("- name: eth0\n  role: sideways\n", "etcd:x")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(message.starts_with("etcd:x:2:"), "{message}");
        Ok(())
    }

    #[test]
    fn composing_merges_fleet_entries_and_skips_bad_ones() -> Result<(), Vec<Problem>> {
        let mut c = composer();
        let composed = c.compose(
            &state(
                Some(DOC),
                &[
                    (
                        "192.0.2.25_32",
                        r#"{"prefix":"192.0.2.25/32","comment":"relay"}"#,
                    ),
                    ("100.64.3.0_24", r#"{"prefix":"100.64.3.0/24"}"#),
                    ("192.0.2.26_32", r#"{"prefix":"192.0.2.99/32"}"#),
                ],
            ),
            now(),
        )?;
        let allow: Vec<String> = composed
            .checked
            .policy
            .allow
            .iter()
            .map(|a| a.prefix.to_string())
            .collect();
        assert_eq!(allow, ["100.64.3.0/24", "192.0.2.25/32"]);
        assert_eq!(composed.fleet_allow, 2);
        assert_eq!(composed.problems.len(), 1);
        assert!(
            composed
                .problems
                .iter()
                .all(|p| p.reason == Reason::AllowInvalid
                    && p.message.starts_with("etcd:/p25/allow/192.0.2.26_32: "))
        );
        // The snapshot holds what is in force: the two good entries.
        assert_eq!(composed.snapshot.allow.len(), 2);
        assert_eq!(composed.snapshot.revision, 7);
        Ok(())
    }

    #[test]
    fn a_changed_value_is_checked_again() -> Result<(), Vec<Problem>> {
        let mut c = composer();
        let good = r#"{"prefix":"192.0.2.25/32"}"#;
        let bad = r#"{"prefix":"192.0.2.25/32","expires":"later"}"#;
        for (value, problems, allow) in [(good, 0, 2), (bad, 1, 1), (bad, 1, 1), (good, 0, 2)] {
            let composed = c.compose(&state(Some(DOC), &[("192.0.2.25_32", value)]), now())?;
            assert_eq!(composed.problems.len(), problems, "{value}");
            assert_eq!(composed.checked.policy.allow.len(), allow, "{value}");
        }
        Ok(())
    }

    #[test]
    fn a_bad_document_keeps_the_last_good_one() -> Result<(), Vec<Problem>> {
        let mut c = composer();
        assert!(
            c.compose(&state(Some("version: 2\n"), &[]), now())
                .is_err_and(|p| p.iter().any(|p| p.reason == Reason::PolicyInvalid))
        );
        c.compose(&state(Some(DOC), &[]), now())?;
        let composed = c.compose(
            &state(
                Some("version: 1\nsubscribers: [banana]\n"),
                &[("192.0.2.25_32", r#"{"prefix":"192.0.2.25/32"}"#)],
            ),
            now(),
        )?;
        assert_eq!(composed.problems.len(), 1);
        assert!(composed.problems.iter().all(
            |p| p.reason == Reason::PolicyInvalid && p.message.contains("etcd:/p25/policy:2:")
        ));
        // The good document's subscribers, the new allow entry.
        assert_eq!(composed.checked.policy.subscribers.len(), 1);
        assert_eq!(composed.checked.policy.allow.len(), 2);
        assert_eq!(composed.snapshot.policy.as_deref(), Some(DOC));
        // A deleted document likewise.
        let composed = c.compose(&state(None, &[]), now())?;
        assert!(
            composed
                .problems
                .iter()
                .any(|p| p.reason == Reason::PolicyMissing)
        );
        assert_eq!(composed.checked.policy.subscribers.len(), 1);
        Ok(())
    }

    #[test]
    fn an_override_replaces_the_interfaces() -> Result<(), Vec<Problem>> {
        let mut c = composer();
        let mut s = state(Some(DOC), &[]);
        s.interfaces = Some("- name: r-sub\n  role: subscriber\n".into());
        let composed = c.compose(&s, now())?;
        let names: Vec<&str> = composed
            .checked
            .policy
            .interfaces
            .iter()
            .map(|i| i.name.as_str())
            .collect();
        assert_eq!(names, ["r-sub"]);
        // A bad override keeps the good one.
        s.interfaces = Some("- name: r-sub\n  role: nope\n".into());
        let composed = c.compose(&s, now())?;
        assert!(
            composed
                .problems
                .iter()
                .any(|p| p.reason == Reason::InterfacesInvalid)
        );
        assert_eq!(composed.checked.policy.interfaces.len(), 1);
        assert!(
            composed
                .snapshot
                .interfaces
                .is_some_and(|t| t.contains("subscriber"))
        );
        // Removing it brings back the document's.
        s.interfaces = None;
        let composed = c.compose(&s, now())?;
        assert_eq!(
            composed
                .checked
                .policy
                .interfaces
                .first()
                .map(|i| i.name.as_str()),
            Some("eth1")
        );
        Ok(())
    }

    #[test]
    fn merged_entries_last_as_long_as_either_source() -> Result<(), Box<dyn std::error::Error>> {
        let mut policy = Policy::empty();
        let soon = now() + Duration::from_secs(60);
        policy.allow.push(AllowEntry {
            expires: Some(soon),
            ..AllowEntry::listed("192.0.2.0/24".parse()?)
        });
        merge_allow(
            &mut policy,
            [
                AllowEntry::listed("192.0.2.0/24".parse()?),
                AllowEntry::listed("198.51.100.0/24".parse()?),
            ],
        );
        assert_eq!(policy.allow.len(), 2);
        assert_eq!(policy.allow.first().and_then(|a| a.expires), None);
        // Many entries in any order come out sorted, once each, listed ones left out.
        policy.allow_listed = vec!["203.0.113.0/24".parse()?];
        let many: Vec<AllowEntry> = (0..=255u8)
            .rev()
            .chain([7, 7])
            .map(|i| format!("100.64.{i}.0/24").parse().map(AllowEntry::listed))
            .chain(["203.0.113.0/24".parse().map(AllowEntry::listed)])
            .collect::<Result<_, _>>()?;
        merge_allow(&mut policy, many);
        assert_eq!(policy.allow.len(), 258);
        assert!(policy.allow.is_sorted_by(|a, b| a.prefix < b.prefix));
        Ok(())
    }

    #[test]
    fn snapshots_restore_the_state() -> Result<(), Vec<Problem>> {
        let mut c = composer();
        let composed = c.compose(
            &state(
                Some(DOC),
                &[("192.0.2.25_32", r#"{"prefix":"192.0.2.25/32"}"#)],
            ),
            now(),
        )?;
        let restored = state_of(&composed.snapshot);
        let again = composer().compose(&restored, now())?;
        assert_eq!(again.checked.policy, composed.checked.policy);
        assert!(again.problems.is_empty());
        Ok(())
    }

    #[test]
    fn backoff_grows_to_a_cap_with_jitter_and_resets() {
        let mut b = Backoff::default();
        assert_eq!(b.next(1.0), Duration::from_millis(100));
        assert_eq!(b.next(1.0), Duration::from_millis(200));
        assert_eq!(b.next(0.0), Duration::from_millis(200));
        for _ in 0..40 {
            assert!(b.next(1.0) <= Backoff::CAP);
        }
        assert_eq!(b.next(1.0), Backoff::CAP);
        assert_eq!(b.next(0.0), Backoff::CAP / 2);
        b.reset();
        assert_eq!(b.next(1.0), Backoff::BASE);
    }
}
