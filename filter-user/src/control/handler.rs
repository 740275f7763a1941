//! The request handler of the control socket: bytes of one request in, bytes of the
//! answer out. p25d runs it on its state; the `control` fuzz target runs the same function
//! on an in-memory state ([`Host`] is all that differs), so what is fuzzed is what runs.
//!
//! No panic path: every failure is an error answer. Allow, deny and list live here in
//! full; status, stats, reload and offenders read the daemon's maps and come from the
//! [`Host`].
//!
//! Longer than 500 lines on purpose: about 300 of them are the unit tests at the end,
//! which drive [`handle`] through [`MemoryHost`] as the fuzz target does.

mod memory;

use std::time::SystemTime;

pub use memory::{MemoryHost, MemoryTables};

use filter_common::abi::{AllowValue, BlockAction, Mode};
use ipnet::IpNet;
use serde::Serialize;

use super::{
    AllowEntryView, AllowedView, DeniedView, ListHead, MAX_MESSAGE, MAX_REQUEST, OffendersHead,
    ReloadView, Request, Response, Source, StatsView, StatusView, SubscriberView,
};
use crate::{
    Error, KernelTables, check_prefix,
    desired::{self, Counts},
    offenders::OffenderView,
    policy::Policy,
    runtime::{MAX_LIFETIME_SECS, RuntimeEntry, RuntimeStore, rfc3339, unix},
};

/// Who sent a request, from the socket's peer credentials (SO_PEERCRED).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    /// User id.
    pub uid: u32,
    /// Process id, when the kernel knows it.
    pub pid: Option<i32>,
    /// Whether the peer may change the filter: root, or a member of the admin group.
    pub admin: bool,
}

/// The allowlist maps as the handler writes them.
pub trait AllowTables {
    /// Whether some allowlist entry covers `prefix` (a cheap pre-check).
    fn allow_covers(&self, prefix: IpNet) -> Result<bool, Error>;
    /// Adds or replaces an entry.
    fn insert_allow(&mut self, prefix: IpNet, value: AllowValue) -> Result<(), Error>;
    /// Removes an entry; `Ok(false)` if it was not there.
    fn remove_allow(&mut self, prefix: IpNet) -> Result<bool, Error>;
}

impl AllowTables for KernelTables {
    fn allow_covers(&self, prefix: IpNet) -> Result<bool, Error> {
        KernelTables::allow_covers(self, prefix)
    }
    fn insert_allow(&mut self, prefix: IpNet, value: AllowValue) -> Result<(), Error> {
        KernelTables::insert_allow(self, prefix, value)
    }
    fn remove_allow(&mut self, prefix: IpNet) -> Result<bool, Error> {
        KernelTables::remove_allow(self, prefix)
    }
}

/// What the handler reads and writes of the daemon's state.
#[derive(Debug)]
pub struct Parts<'a, T> {
    /// The allowlist maps.
    pub tables: &'a mut T,
    /// The runtime allowlist.
    pub runtime: &'a mut RuntimeStore,
    /// The policy in force.
    pub policy: &'a Policy,
    /// Where it comes from (the policy file's path), for messages.
    pub policy_source: &'a str,
    /// The group whose members may change the filter (besides root), for messages.
    pub admin_group: &'a str,
    /// Most runtime entries.
    pub max_runtime_entries: usize,
    /// Entry counts of the state in force, kept up to date by `allow` and `deny` (so that
    /// status and metrics never count).
    pub counts: &'a mut Counts,
}

/// The daemon as the handler sees it.
pub trait Host {
    /// Its allowlist maps.
    type Tables: AllowTables;
    /// Its state.
    fn parts(&mut self) -> Parts<'_, Self::Tables>;
    /// `status`.
    fn status(&self) -> Result<StatusView, String>;
    /// `stats`.
    fn stats(&self) -> Result<StatsView, String>;
    /// `reload`: re-read the policy file and put it in force.
    fn reload(&mut self, reason: &str) -> Result<ReloadView, String>;
    /// `offenders`: the offender table, worst first, filtered.
    fn offenders(
        &self,
        since_secs: Option<u64>,
        limit: Option<usize>,
    ) -> Result<Vec<OffenderView>, String>;
}

/// Handles one request line from `peer`; returns the whole answer (JSON lines).
pub fn handle<H: Host>(host: &mut H, peer: &Peer, line: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let request = match admit(host, peer, line) {
        Ok(request) => request,
        Err(message) => {
            respond::<()>(&mut out, Err(message));
            return out;
        }
    };
    match request {
        Request::Allow {
            prefix,
            comment,
            expires_in_secs,
            max_syn_per_minute,
            syn_burst,
            force,
        } => {
            let asked = Allow {
                prefix,
                comment,
                expires_in_secs,
                max_syn_per_minute,
                syn_burst,
                force,
            };
            respond(&mut out, allow(&mut host.parts(), peer, asked));
        }
        Request::Deny { prefix } => {
            respond(&mut out, deny(&mut host.parts(), peer, prefix));
        }
        Request::List => list(&mut out, &host.parts()),
        Request::Status => {
            respond(&mut out, host.status());
        }
        Request::Stats => {
            respond(&mut out, host.stats());
        }
        Request::Reload => {
            respond(&mut out, host.reload("p25ctl reload"));
        }
        Request::Offenders { since_secs, limit } => match host.offenders(since_secs, limit) {
            Ok(rows) => {
                let head = OffendersHead {
                    offenders: rows.len(),
                };
                if respond(&mut out, Ok(head)) {
                    for row in &rows {
                        encode(&mut out, row);
                    }
                }
            }
            Err(message) => {
                respond::<OffendersHead>(&mut out, Err(message));
            }
        },
    }
    out
}

/// The request of `line` if `peer` may make it: parsed, and for a command that changes the
/// filter, sent by an administrator (and then logged).
fn admit<H: Host>(host: &mut H, peer: &Peer, line: &[u8]) -> Result<Request, String> {
    let request = parse(line)?;
    let command = request.name();
    if !request.changes_state() {
        return Ok(request);
    }
    if !peer.admin {
        let group = host.parts().admin_group.to_owned();
        tracing::warn!(command, uid = peer.uid, pid = ?peer.pid, "control command refused: not an administrator");
        return Err(format!(
            "permission denied: `{command}` changes the filter and needs root or membership \
             in the group {group} (you are uid {}); read-only commands (status, list, stats, \
             top, offenders) need only the socket group",
            peer.uid
        ));
    }
    // The request as sent, cut at 1 KiB (a request may be 64 KiB of comment).
    let shown: String = String::from_utf8_lossy(line)
        .trim_end()
        .chars()
        .take(1024)
        .collect();
    tracing::info!(command, uid = peer.uid, pid = ?peer.pid, request = %shown, "control command");
    Ok(request)
}

/// A request line to a [`Request`], or the reason it is not one.
fn parse(line: &[u8]) -> Result<Request, String> {
    if line.len() > MAX_REQUEST {
        return Err(format!(
            "request of {} bytes refused: the longest is {MAX_REQUEST}",
            line.len()
        ));
    }
    let text = std::str::from_utf8(line).map_err(|e| format!("malformed request: {e}"))?;
    serde_json::from_str(text).map_err(|e| format!("malformed request: {e}"))
}

/// Appends `value` as one JSON line unless it would be longer than [`MAX_MESSAGE`] (then
/// an error line instead, and `false`).
fn encode<T: Serialize>(out: &mut Vec<u8>, value: &T) -> bool {
    match serde_json::to_vec(value) {
        Ok(bytes) if bytes.len() < MAX_MESSAGE => {
            out.extend_from_slice(&bytes);
            out.push(b'\n');
            true
        }
        Ok(bytes) => {
            error_line(
                out,
                format!(
                    "the answer is {} bytes, longer than {MAX_MESSAGE}",
                    bytes.len()
                ),
            );
            false
        }
        Err(e) => {
            error_line(out, format!("encoding the answer failed: {e}"));
            false
        }
    }
}

fn error_line(out: &mut Vec<u8>, message: String) {
    out.extend_from_slice(&super::error_answer(message));
}

/// The one conversion of a command's result to the first line of its answer: `ok` with
/// the view, or `error` with the message. `false` if the answer ends there (an error).
fn respond<T: Serialize>(out: &mut Vec<u8>, result: Result<T, String>) -> bool {
    match result {
        Ok(data) => encode(out, &Response::Ok { data }),
        Err(message) => {
            error_line(out, message);
            false
        }
    }
}

/// The fields of an allow request.
struct Allow {
    prefix: IpNet,
    comment: Option<String>,
    expires_in_secs: Option<u64>,
    max_syn_per_minute: Option<u32>,
    syn_burst: Option<u32>,
    force: bool,
}

/// Why `prefix` needs `--force`, if it does: a default route, or wider than a subscriber
/// prefix it covers (it would exempt more than that subscriber block, perhaps all of it).
fn needs_force(prefix: IpNet, policy: &Policy) -> Option<String> {
    if prefix.prefix_len() == 0 {
        return Some(format!(
            "{prefix} would exempt every subscriber from the port-25 rules"
        ));
    }
    policy.subscriber_inside(prefix).map(|s| {
        format!(
            "{prefix} is wider than the subscriber prefix {} it covers: it would exempt \
                 all of that subscriber space",
            s.prefix
        )
    })
}

fn allow<T: AllowTables>(
    parts: &mut Parts<'_, T>,
    peer: &Peer,
    asked: Allow,
) -> Result<AllowedView, String> {
    let prefix = check_prefix(asked.prefix).map_err(|e| e.to_string())?;
    let now_unix = unix(SystemTime::now());
    let expires_unix = match asked.expires_in_secs {
        None => None,
        Some(0) => return Err("expires_in_secs 0: an entry must live at least 1 s".into()),
        Some(secs) if secs > MAX_LIFETIME_SECS => {
            return Err(format!(
                "expires_in_secs {secs} is more than 10 years ({MAX_LIFETIME_SECS} s); use a \
                 shorter --expires, or none for an entry that stays until `p25ctl deny`"
            ));
        }
        Some(secs) => Some(now_unix.saturating_add(secs)),
    };
    if !asked.force
        && let Some(why) = needs_force(prefix, parts.policy)
    {
        return Err(format!(
            "{why}; if that is really meant, repeat with --force"
        ));
    }
    let entries = parts.runtime.entries().len();
    let replaced = parts.runtime.entries().get(&prefix).cloned();
    if replaced.is_none() && entries >= parts.max_runtime_entries {
        return Err(format!(
            "the runtime allowlist is full ({entries} entries, the most p25d --max-runtime-entries \
             allows): remove some with `p25ctl deny`, or move them into the policy {}",
            parts.policy_source
        ));
    }
    let entry = RuntimeEntry {
        prefix,
        comment: asked.comment,
        added_unix: now_unix,
        expires_unix,
        max_syn_per_minute: asked.max_syn_per_minute,
        syn_burst: asked.syn_burst,
    };
    // Write just this entry instead of a full reconcile, which reads every map entry
    // back (seconds at a million entries). A policy entry keeps its origin and limit, as
    // in the daemon's desired state; only a prefix the maps already cover can be one (an
    // entry the full map refused is not, and gets the runtime value). The periodic resync
    // still repairs drift.
    let now = SystemTime::now();
    let policy = parts.policy;
    let in_policy = parts.tables.allow_covers(prefix).unwrap_or(true)
        && desired::policy_allows(policy, prefix, now);
    // The map first, then the state file: the verdict changes without waiting for the
    // file's two fsyncs (1 to 15 ms on a busy disk, most of an allow), and a failed save
    // undoes the map write, so that the answer stays all or nothing. An entry the store
    // would refuse never reaches the map.
    let write_first = !in_policy && entry.validate(now_unix).is_ok();
    let previous = parts.runtime.entries().get(&prefix).cloned();
    if write_first {
        parts
            .tables
            .insert_allow(prefix, entry.allow_value())
            .map_err(|e| format!("updating the maps failed; nothing was changed: {e}"))?;
    }
    if let Err(e) = parts.runtime.add(entry.clone()) {
        let mut message = e.to_string();
        if write_first {
            let undone = match previous.filter(|p| !p.expired(now)) {
                Some(old) => parts.tables.insert_allow(prefix, old.allow_value()),
                None => parts.tables.remove_allow(prefix).map(drop),
            };
            if let Err(undo) = undone {
                message = format!(
                    "{message}; undoing the map write failed too (the next resync \
                     repairs it): {undo}"
                );
            }
        }
        return Err(message);
    }
    let counted = |entry: &RuntimeEntry| desired::runtime_counts(policy, entry, now);
    let (was, is) = (replaced.as_ref().is_some_and(counted), counted(&entry));
    parts.counts.allow_runtime =
        (parts.counts.allow_runtime + usize::from(is)).saturating_sub(usize::from(was));
    if !in_policy && !write_first {
        // Only if the store accepted what `validate` refused a moment earlier.
        parts
            .tables
            .insert_allow(prefix, entry.allow_value())
            .map_err(|e| {
                format!("saved, but updating the maps failed (the next resync retries): {e}")
            })?;
    }
    let expires = entry.expires_unix.map(rfc3339);
    let value = entry.allow_value();
    tracing::info!(%prefix, expires = ?expires, syn_per_minute = value.syn_per_minute, uid = peer.uid, pid = ?peer.pid, force = asked.force, "runtime allow added");
    Ok(AllowedView {
        prefix,
        expires,
        max_syn_per_minute: entry.max_syn_per_minute,
        syn_burst: entry.max_syn_per_minute.map(|_| value.syn_burst),
    })
}

fn deny<T: AllowTables>(
    parts: &mut Parts<'_, T>,
    peer: &Peer,
    prefix: IpNet,
) -> Result<DeniedView, String> {
    let prefix = check_prefix(prefix).map_err(|e| e.to_string())?;
    let now = SystemTime::now();
    match parts.runtime.remove(prefix) {
        Ok(Some(removed)) => {
            if desired::runtime_counts(parts.policy, &removed, now) {
                parts.counts.allow_runtime = parts.counts.allow_runtime.saturating_sub(1);
            }
        }
        Ok(None) => {
            return Err(if parts.policy.allow_entry(prefix).is_some() {
                format!(
                    "{prefix} comes from the policy {}; remove it there",
                    parts.policy_source
                )
            } else {
                format!("{prefix} is not in the runtime allowlist (see `p25ctl list`)")
            });
        }
        Err(e) => return Err(e.to_string()),
    }
    // Remove just this entry (see `allow`), unless the policy allows the same prefix.
    if !desired::policy_allows(parts.policy, prefix, now) {
        parts.tables.remove_allow(prefix).map_err(|e| {
            format!(
                "removed from the state, but updating the maps failed (the next resync retries): {e}"
            )
        })?;
    }
    tracing::info!(%prefix, uid = peer.uid, pid = ?peer.pid, "runtime allow removed");
    Ok(DeniedView { prefix })
}

/// `list`, streamed: a [`ListHead`], then one line per allowlist entry (policy entries in
/// policy order, then the runtime entries the policy does not have), then one per
/// subscriber prefix. Rows are encoded as they are made: no table of views is built, the
/// answer's bytes are the only copy.
fn list<T>(out: &mut Vec<u8>, parts: &Parts<'_, T>) {
    let runtime = parts.runtime.entries();
    // Runtime entries the policy also has, shown once as `policy_and_runtime`. Policy
    // prefixes are unique (the policy check refuses duplicates).
    let shared: std::collections::BTreeSet<IpNet> = runtime
        .keys()
        .filter(|prefix| parts.policy.allow_entry(**prefix).is_some())
        .copied()
        .collect();
    let head = ListHead {
        allow: parts.policy.allow_len() + runtime.len().saturating_sub(shared.len()),
        subscribers: parts.policy.subscribers.len(),
    };
    if !respond(out, Ok(head)) {
        return;
    }
    // Entries of list files are made on the fly (prefix only): no copy of the list.
    for a in parts.policy.allow_entries() {
        encode(
            out,
            &AllowEntryView {
                prefix: a.prefix,
                source: if runtime.contains_key(&a.prefix) {
                    Source::PolicyAndRuntime
                } else {
                    Source::Policy
                },
                comment: a.comment.as_deref().map(str::to_owned),
                owner: a.owner.as_deref().map(str::to_owned),
                expires: a.expires.map(|e| rfc3339(unix(e))),
                max_syn_per_minute: a.syn_limit.map(|l| l.per_minute),
                syn_burst: a.syn_limit.map(|l| l.burst),
            },
        );
    }
    for r in runtime.values().filter(|r| !shared.contains(&r.prefix)) {
        let value = r.allow_value();
        encode(
            out,
            &AllowEntryView {
                prefix: r.prefix,
                source: Source::Runtime,
                comment: r.comment.clone(),
                owner: None,
                expires: r.expires_unix.map(rfc3339),
                max_syn_per_minute: r.max_syn_per_minute,
                syn_burst: r.max_syn_per_minute.map(|_| value.syn_burst),
            },
        );
    }
    for s in &parts.policy.subscribers {
        encode(
            out,
            &SubscriberView {
                prefix: s.prefix,
                mode: s.mode.map_or(Mode::DEFAULT, Mode::from).name().into(),
                action: s
                    .action
                    .map_or(BlockAction::DEFAULT, BlockAction::from)
                    .name()
                    .into(),
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{AllowEntryView, read_line};

    const ROOT: Peer = Peer {
        uid: 0,
        pid: Some(1),
        admin: true,
    };
    const NOBODY: Peer = Peer {
        uid: 65534,
        pid: Some(2),
        admin: false,
    };

    fn host() -> Result<MemoryHost, Box<dyn std::error::Error>> {
        let checked = crate::policy::parse(
            "version: 1\nsubscribers:\n  - prefix: 100.64.0.0/16\n  - prefix: 2001:db8:1::/48\n\
             allow:\n  - prefix: 100.64.9.0/24\n    comment: relay\n",
            "test.yaml",
        )?;
        Ok(MemoryHost::new(checked.policy, 3))
    }

    /// Sends `request` (JSON) and returns the answer's lines.
    fn ask(host: &mut MemoryHost, peer: &Peer, request: &str) -> Vec<String> {
        let out = handle(host, peer, format!("{request}\n").as_bytes());
        let mut reader = std::io::Cursor::new(out);
        let mut lines = Vec::new();
        while let Ok(Some(line)) = read_line(&mut reader, MAX_MESSAGE) {
            lines.push(String::from_utf8_lossy(&line).trim_end().to_owned());
        }
        lines
    }

    fn error_of(lines: &[String]) -> String {
        match lines
            .first()
            .map(|l| serde_json::from_str::<Response<()>>(l))
        {
            Some(Ok(Response::Error { message })) => message,
            other => format!("not an error: {other:?}"),
        }
    }

    fn allowed(lines: &[String]) -> Result<AllowedView, String> {
        match lines
            .first()
            .map(|l| serde_json::from_str::<Response<AllowedView>>(l))
        {
            Some(Ok(Response::Ok { data })) => Ok(data),
            other => Err(format!("{other:?}")),
        }
    }

    #[test]
    fn far_expiry_is_an_error_not_a_crash() -> Result<(), Box<dyn std::error::Error>> {
        let mut host = host()?;
        let years_8000 = 8000 * 31_557_600_u64;
        for secs in [years_8000, u64::MAX, MAX_LIFETIME_SECS + 1, 0] {
            let lines = ask(
                &mut host,
                &ROOT,
                &format!(
                    r#"{{"command":"allow","prefix":"100.64.1.2/32","expires_in_secs":{secs}}}"#
                ),
            );
            let error = error_of(&lines);
            assert!(error.contains("expires_in_secs"), "{secs}: {error}");
        }
        assert!(host.runtime.entries().is_empty());
        let ok = allowed(&ask(
            &mut host,
            &ROOT,
            &format!(
                r#"{{"command":"allow","prefix":"100.64.1.2/32","expires_in_secs":{MAX_LIFETIME_SECS}}}"#
            ),
        ))?;
        assert!(ok.expires.is_some());
        Ok(())
    }

    #[test]
    fn changes_need_an_administrator() -> Result<(), Box<dyn std::error::Error>> {
        let mut host = host()?;
        for request in [
            r#"{"command":"allow","prefix":"100.64.1.2/32"}"#,
            r#"{"command":"deny","prefix":"100.64.9.0/24"}"#,
            r#"{"command":"reload"}"#,
        ] {
            let error = error_of(&ask(&mut host, &NOBODY, request));
            assert!(
                error.contains("permission denied") && error.contains("p25-admin"),
                "{error}"
            );
        }
        assert!(host.runtime.entries().is_empty());
        assert_eq!(host.generation, 1);
        // Read-only commands are open.
        for request in [
            r#"{"command":"status"}"#,
            r#"{"command":"list"}"#,
            r#"{"command":"stats"}"#,
            r#"{"command":"offenders"}"#,
        ] {
            let lines = ask(&mut host, &NOBODY, request);
            assert!(
                lines
                    .first()
                    .is_some_and(|l| l.starts_with(r#"{"result":"ok""#)),
                "{lines:?}"
            );
        }
        Ok(())
    }

    #[test]
    fn wide_prefixes_need_force() -> Result<(), Box<dyn std::error::Error>> {
        let mut host = host()?;
        for prefix in ["0.0.0.0/0", "::/0", "100.0.0.0/8", "2001:db8::/32"] {
            let request = format!(r#"{{"command":"allow","prefix":"{prefix}"}}"#);
            let error = error_of(&ask(&mut host, &ROOT, &request));
            assert!(error.contains("--force"), "{prefix}: {error}");
        }
        assert!(host.runtime.entries().is_empty());
        // The subscriber prefix itself, and anything inside it, is fine.
        allowed(&ask(
            &mut host,
            &ROOT,
            r#"{"command":"allow","prefix":"100.64.0.0/16"}"#,
        ))?;
        allowed(&ask(
            &mut host,
            &ROOT,
            r#"{"command":"allow","prefix":"0.0.0.0/0","force":true}"#,
        ))?;
        assert_eq!(host.runtime.entries().len(), 2);
        Ok(())
    }

    #[test]
    fn a_failed_save_undoes_the_map_write() -> Result<(), Box<dyn std::error::Error>> {
        let dir = std::env::temp_dir().join(format!("p25-handler-undo-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let mut host = host()?;
        host.runtime = RuntimeStore::open(dir.join("state.json"))?;
        let allowed = allowed(&ask(
            &mut host,
            &ROOT,
            r#"{"command":"allow","prefix":"100.64.1.1/32","max_syn_per_minute":60}"#,
        ))?;
        assert_eq!(allowed.max_syn_per_minute, Some(60));
        let net: IpNet = "100.64.1.1/32".parse()?;
        let before = host.tables.0.get(&net).copied();
        assert!(before.is_some());
        // The state file can no longer be written: both allows fail, and the maps keep
        // what they held (the old value of a replaced entry, nothing for a new one).
        std::fs::remove_dir_all(&dir)?;
        std::fs::write(&dir, b"not a directory")?;
        for prefix in ["100.64.1.1/32", "100.64.1.2/32"] {
            let request = format!(r#"{{"command":"allow","prefix":"{prefix}"}}"#);
            let error = error_of(&ask(&mut host, &ROOT, &request));
            assert!(error.contains("state"), "{prefix}: {error}");
        }
        assert_eq!(host.tables.0.get(&net).copied(), before);
        assert!(!host.tables.0.contains_key(&"100.64.1.2/32".parse()?));
        assert_eq!(host.runtime.entries().len(), 1);
        std::fs::remove_file(&dir)?;
        Ok(())
    }

    #[test]
    fn runtime_entries_are_capped() -> Result<(), Box<dyn std::error::Error>> {
        let mut host = host()?;
        for i in 1..=3 {
            allowed(&ask(
                &mut host,
                &ROOT,
                &format!(r#"{{"command":"allow","prefix":"100.64.2.{i}/32"}}"#),
            ))?;
        }
        let error = error_of(&ask(
            &mut host,
            &ROOT,
            r#"{"command":"allow","prefix":"100.64.2.4/32"}"#,
        ));
        assert!(error.contains("full (3 entries"), "{error}");
        // Replacing an existing entry is not a new one.
        allowed(&ask(
            &mut host,
            &ROOT,
            r#"{"command":"allow","prefix":"100.64.2.1/32","comment":"again"}"#,
        ))?;
        Ok(())
    }

    #[test]
    fn syn_limits_reach_the_map_and_the_list() -> Result<(), Box<dyn std::error::Error>> {
        let mut host = host()?;
        let view = allowed(&ask(
            &mut host,
            &ROOT,
            r#"{"command":"allow","prefix":"100.64.3.1/32","max_syn_per_minute":30}"#,
        ))?;
        assert_eq!(
            (view.max_syn_per_minute, view.syn_burst),
            (Some(30), Some(30))
        );
        let prefix: IpNet = "100.64.3.1/32".parse()?;
        let value = host
            .tables
            .0
            .get(&prefix)
            .copied()
            .ok_or("not in the map")?;
        assert_eq!((value.syn_per_minute, value.syn_burst), (30, 30));
        let error = error_of(&ask(
            &mut host,
            &ROOT,
            r#"{"command":"allow","prefix":"100.64.3.2/32","syn_burst":5}"#,
        ));
        assert!(error.contains("without max_syn_per_minute"), "{error}");
        let error = error_of(&ask(
            &mut host,
            &ROOT,
            r#"{"command":"allow","prefix":"100.64.3.2/32","max_syn_per_minute":0}"#,
        ));
        assert!(error.contains("out of range"), "{error}");
        // list: head, then the rows it announces.
        let lines = ask(&mut host, &NOBODY, r#"{"command":"list"}"#);
        let first = lines.first().ok_or("no answer")?;
        let head = match serde_json::from_str::<Response<ListHead>>(first)? {
            Response::Ok { data } => data,
            Response::Error { message } => return Err(message.into()),
        };
        assert_eq!((head.allow, head.subscribers), (2, 2));
        assert_eq!(lines.len(), 5);
        let row: AllowEntryView = serde_json::from_str(lines.get(2).ok_or("no row")?)?;
        assert_eq!(
            (row.prefix, row.source, row.max_syn_per_minute),
            (prefix, Source::Runtime, Some(30))
        );
        Ok(())
    }

    #[test]
    fn bad_requests_are_answered() -> Result<(), Box<dyn std::error::Error>> {
        let mut host = host()?;
        let long = format!(
            r#"{{"command":"allow","prefix":"100.64.1.2/32","comment":"{}"}}"#,
            "x".repeat(MAX_REQUEST)
        );
        for request in [
            "",
            "{",
            "\u{0}",
            r#"{"command":"frobnicate"}"#,
            r#"{"command":"allow","prefix":"100.64.1.2/24"}"#,
            long.as_str(),
        ] {
            let lines = ask(&mut host, &ROOT, request);
            assert_eq!(lines.len(), 1, "{lines:?}");
            assert!(!error_of(&lines).starts_with("not an error"), "{lines:?}");
        }
        let invalid_utf8 = handle(&mut host, &ROOT, b"\xff\xfe\n");
        assert!(String::from_utf8_lossy(&invalid_utf8).contains("malformed request"));
        Ok(())
    }

    #[test]
    fn allow_and_deny_keep_the_runtime_count() -> Result<(), Box<dyn std::error::Error>> {
        let mut host = host()?;
        // (who, command, prefix, whether it succeeds, the runtime count after it)
        let steps = [
            (ROOT, "allow", "100.64.4.1/32", true, 1),
            // Replacing an entry is not a second one.
            (ROOT, "allow", "100.64.4.1/32", true, 1),
            // The policy already allows 100.64.9.0/24: a runtime entry for it adds nothing,
            // and removing it takes nothing away.
            (ROOT, "allow", "100.64.9.0/24", true, 1),
            (ROOT, "deny", "100.64.9.0/24", true, 1),
            // A refused request changes nothing.
            (NOBODY, "deny", "100.64.4.1/32", false, 1),
            (ROOT, "deny", "100.64.4.1/32", true, 0),
            (ROOT, "deny", "100.64.4.1/32", false, 0),
        ];
        for (peer, command, prefix, succeeds, count) in steps {
            let request = format!(r#"{{"command":"{command}","prefix":"{prefix}"}}"#);
            let lines = ask(&mut host, &peer, &request);
            let ok = lines
                .first()
                .is_some_and(|l| l.starts_with(r#"{"result":"ok""#));
            assert_eq!(ok, succeeds, "{request}: {lines:?}");
            assert_eq!(host.counts.allow_runtime, count, "{request}");
        }
        assert_eq!(host.counts.allow_policy, 1);
        Ok(())
    }
}
