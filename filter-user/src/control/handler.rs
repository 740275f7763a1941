//! The request handler of the control socket: bytes of one request in, bytes of the
//! answer out. p25d runs it on its state; the `control` fuzz target runs the same function
//! on an in-memory state ([`Host`] is all that differs), so what is fuzzed is what runs.
//!
//! No panic path: every failure is an error answer. Allow, deny and list live here in
//! full; status, stats, reload and offenders read the daemon's maps and come from the
//! [`Host`].

use std::{path::Path, time::SystemTime};

use filter_common::abi::{AllowValue, BlockAction, Mode};
use ipnet::IpNet;
use serde::Serialize;

use super::{
    AllowEntryView, AllowedView, DeniedView, ListHead, MAX_MESSAGE, MAX_REQUEST, OffendersHead,
    ReloadView, Request, Response, Source, StatsView, StatusView, SubscriberView,
};
use crate::{
    Error, KernelTables, check_prefix,
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
    /// Its file, for messages.
    pub policy_path: &'a Path,
    /// The group whose members may change the filter (besides root), for messages.
    pub admin_group: &'a str,
    /// Most runtime entries.
    pub max_runtime_entries: usize,
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
    let request = match parse(line) {
        Ok(request) => request,
        Err(message) => {
            error_line(&mut out, message);
            return out;
        }
    };
    let command = request.name();
    if request.changes_state() {
        if !peer.admin {
            let group = host.parts().admin_group.to_owned();
            tracing::warn!(command, uid = peer.uid, pid = ?peer.pid, "control command refused: not an administrator");
            error_line(
                &mut out,
                format!(
                    "permission denied: `{command}` changes the filter and needs root or \
                     membership in the group {group} (you are uid {}); read-only commands \
                     (status, list, stats, top, offenders) need only the socket group",
                    peer.uid
                ),
            );
            return out;
        }
        tracing::info!(command, uid = peer.uid, pid = ?peer.pid, request = %String::from_utf8_lossy(line).trim_end(), "control command");
    }
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
            single(&mut out, allow(&mut host.parts(), peer, asked));
        }
        Request::Deny { prefix } => single(&mut out, deny(&mut host.parts(), peer, prefix)),
        Request::List => list(&mut out, &host.parts()),
        Request::Status => single(&mut out, host.status()),
        Request::Stats => single(&mut out, host.stats()),
        Request::Reload => single(&mut out, host.reload("p25ctl reload")),
        Request::Offenders { since_secs, limit } => match host.offenders(since_secs, limit) {
            Ok(rows) => {
                if encode(
                    &mut out,
                    &ok(OffendersHead {
                        offenders: rows.len(),
                    }),
                ) {
                    for row in &rows {
                        encode(&mut out, row);
                    }
                }
            }
            Err(message) => error_line(&mut out, message),
        },
    }
    out
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

fn ok<T>(data: T) -> Response<T> {
    Response::Ok { data }
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
    let response: Response<()> = Response::Error { message };
    // A String and a tag always serialize.
    if let Ok(bytes) = serde_json::to_vec(&response) {
        out.extend_from_slice(&bytes);
    }
    out.push(b'\n');
}

fn single<T: Serialize>(out: &mut Vec<u8>, result: Result<T, String>) {
    match result {
        Ok(data) => {
            encode(out, &ok(data));
        }
        Err(message) => error_line(out, message),
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
    policy
        .subscribers
        .iter()
        .find(|s| s.prefix.prefix_len() > prefix.prefix_len() && prefix.contains(&s.prefix))
        .map(|s| {
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
    if !parts.runtime.entries().contains_key(&prefix) && entries >= parts.max_runtime_entries {
        return Err(format!(
            "the runtime allowlist is full ({entries} entries, the most p25d --max-runtime-entries \
             allows): remove some with `p25ctl deny`, or move them into the policy file {}",
            parts.policy_path.display()
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
    parts
        .runtime
        .add(entry.clone())
        .map_err(|e| e.to_string())?;
    // Write just this entry instead of a full reconcile, which reads every map entry
    // back (seconds at a million entries). A policy entry keeps its origin and limit, as
    // in the daemon's desired state; only a prefix the maps already cover can be one, so
    // the scan of the policy is skipped in the common case. The periodic resync still
    // repairs drift.
    let now = SystemTime::now();
    let in_policy = parts.tables.allow_covers(prefix).unwrap_or(true)
        && parts
            .policy
            .allow
            .iter()
            .any(|a| a.prefix == prefix && !a.is_expired(now));
    if !in_policy {
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
    match parts.runtime.remove(prefix) {
        Ok(Some(_)) => {}
        Ok(None) => {
            return Err(if parts.policy.allow.iter().any(|a| a.prefix == prefix) {
                format!(
                    "{prefix} comes from the policy file {}; remove it there",
                    parts.policy_path.display()
                )
            } else {
                format!("{prefix} is not in the runtime allowlist (see `p25ctl list`)")
            });
        }
        Err(e) => return Err(e.to_string()),
    }
    // Remove just this entry (see `allow`), unless the policy allows the same prefix.
    let now = SystemTime::now();
    let in_policy = parts
        .policy
        .allow
        .iter()
        .any(|a| a.prefix == prefix && !a.is_expired(now));
    if !in_policy {
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
    let shared: std::collections::BTreeSet<IpNet> = parts
        .policy
        .allow
        .iter()
        .filter(|a| runtime.contains_key(&a.prefix))
        .map(|a| a.prefix)
        .collect();
    let head = ListHead {
        allow: parts.policy.allow.len() + runtime.len().saturating_sub(shared.len()),
        subscribers: parts.policy.subscribers.len(),
    };
    if !encode(out, &ok(head)) {
        return;
    }
    for a in &parts.policy.allow {
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
