//! The control protocol between `p25ctl` and `p25d`: one JSON request and one JSON
//! response per connection on a Unix socket (default `/run/p25/p25.sock`, mode 0660).
//!
//! The daemon is the single writer of the maps; this socket is the only way to ask it to
//! change something. It is never exposed on a network port.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Default socket path.
pub const DEFAULT_SOCKET: &str = "/run/p25/p25.sock";
/// Longest request or response line accepted (a 1M-entry list is about 100 MB; the CLI
/// and daemon both refuse anything absurd rather than exhaust memory).
pub const MAX_MESSAGE: usize = 512 * 1024 * 1024;

/// A request to the daemon.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Add a runtime allowlist entry.
    Allow {
        /// The prefix (host bits must be clear).
        prefix: IpNet,
        /// Free text: ticket, customer, operator.
        #[serde(default)]
        comment: Option<String>,
        /// Lifetime in seconds; none means until removed.
        #[serde(default)]
        expires_in_secs: Option<u64>,
    },
    /// Remove a runtime allowlist entry.
    Deny {
        /// The prefix.
        prefix: IpNet,
    },
    /// The allowlist and subscriber prefixes.
    List,
    /// Interfaces, policy generation, reload results.
    Status,
    /// Counters.
    Stats,
    /// Re-read the policy file now.
    Reload,
    /// The offender table, worst first.
    Offenders {
        /// Only subscribers whose latest attempt is at most this many seconds old.
        #[serde(default)]
        since_secs: Option<u64>,
        /// At most this many rows.
        #[serde(default)]
        limit: Option<usize>,
    },
}

/// Applies `p25ctl top`/`offenders` filters to views sorted worst first.
pub fn filter_offenders(
    views: Vec<crate::offenders::OffenderView>,
    since_secs: Option<u64>,
    limit: Option<usize>,
    now_unix: u64,
) -> Vec<crate::offenders::OffenderView> {
    views
        .into_iter()
        .filter(|v| since_secs.is_none_or(|s| v.last_seen_unix.saturating_add(s) >= now_unix))
        .take(limit.unwrap_or(usize::MAX))
        .collect()
}

/// The daemon's answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    /// Success, with command-specific data (`null` when there is none).
    Ok {
        /// The data.
        data: serde_json::Value,
    },
    /// Failure: nothing was changed.
    Error {
        /// What went wrong, for an operator.
        message: String,
    },
}

/// Where an allowlist entry comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// The policy file.
    Policy,
    /// `p25ctl allow`.
    Runtime,
    /// Both (the policy entry is in force; the runtime one outlives its removal).
    PolicyAndRuntime,
}

/// One allowlist entry as `p25ctl list` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllowEntryView {
    /// The prefix.
    pub prefix: IpNet,
    /// Where it comes from.
    pub source: Source,
    /// Comment, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// Owner (policy entries), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Expiry, RFC 3339, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
    /// New TCP/25 connections per minute each source inside may open, if limited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_syn_per_minute: Option<u32>,
    /// Burst of that limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub syn_burst: Option<u32>,
}

/// One subscriber prefix as `p25ctl list` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscriberView {
    /// The prefix.
    pub prefix: IpNet,
    /// `enforce`, `monitor` or `default` (follows the global mode).
    pub mode: String,
    /// `drop`, `reject` or `default` (follows the global action).
    #[serde(default)]
    pub action: String,
}

/// `p25ctl list` data.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListView {
    /// Allowlist entries.
    pub allow: Vec<AllowEntryView>,
    /// Subscriber prefixes.
    pub subscribers: Vec<SubscriberView>,
}

/// One counter row.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterView {
    /// `egress` or `inbound`; empty for parse outcomes.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub direction: String,
    /// `ipv4` or `ipv6`; empty for parse outcomes.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub family: String,
    /// Verdict or parse outcome name.
    pub name: String,
    /// Packets.
    pub packets: u64,
    /// Bytes.
    pub bytes: u64,
}

/// `p25ctl stats` data.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsView {
    /// Verdict counters.
    pub verdicts: Vec<CounterView>,
    /// Parse-outcome counters.
    pub parse: Vec<CounterView>,
}

impl From<&crate::CounterSnapshot> for StatsView {
    fn from(snapshot: &crate::CounterSnapshot) -> Self {
        Self {
            verdicts: snapshot
                .verdicts
                .iter()
                .map(|(k, c)| CounterView {
                    direction: k.direction.name().into(),
                    family: k.family.name().into(),
                    name: k.verdict.name().into(),
                    packets: c.packets,
                    bytes: c.bytes,
                })
                .collect(),
            parse: snapshot
                .parse
                .iter()
                .map(|(p, c)| CounterView {
                    direction: String::new(),
                    family: String::new(),
                    name: p.name().into(),
                    packets: c.packets,
                    bytes: c.bytes,
                })
                .collect(),
        }
    }
}

/// One interface as `p25ctl status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceView {
    /// Name.
    pub name: String,
    /// `subscriber` or `upstream` (empty when read from pins without the policy).
    #[serde(default)]
    pub role: String,
    /// `xdp` or `tc`.
    pub hook: String,
    /// Whether the pinned link is live on the interface as it exists now.
    pub attached: bool,
    /// Why not, or how (e.g. "fell back to tc: ...").
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub note: String,
}

/// `p25ctl status` data.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusView {
    /// Whether this came from a running daemon (false: read from pins).
    pub daemon: bool,
    /// Policy file.
    #[serde(default)]
    pub policy: String,
    /// Generation of the policy in force.
    pub generation: u32,
    /// Global mode in force.
    pub mode: String,
    /// Fragment policy in force.
    pub fragments: String,
    /// Successful reloads since start.
    #[serde(default)]
    pub reloads_ok: u64,
    /// Rejected reloads since start.
    #[serde(default)]
    pub reloads_failed: u64,
    /// Error of the last rejected reload, if the last reload failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Interfaces.
    pub interfaces: Vec<InterfaceView>,
    /// Subscriber prefixes in the maps.
    pub subscribers: usize,
    /// Allowlist entries in the maps.
    pub allow: usize,
    /// Runtime allowlist entries.
    #[serde(default)]
    pub runtime_allow: usize,
    /// Pin directory.
    pub pins: String,
}

/// Errors of the client side.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nobody listens on the socket.
    #[error("p25d is not running (nothing listens on {path}): {source}")]
    NotRunning {
        /// The socket path.
        path: String,
        /// Why connecting failed.
        #[source]
        source: std::io::Error,
    },
    /// The conversation failed half-way.
    #[error("talking to p25d on {path}: {source}")]
    Io {
        /// The socket path.
        path: String,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The daemon answered something this client cannot read.
    #[error("unreadable answer from p25d: {0}")]
    Protocol(String),
}

/// Sends one request and waits (up to `timeout`) for the response.
pub fn request(socket: &Path, req: &Request, timeout: Duration) -> Result<Response, ClientError> {
    let path = socket.display().to_string();
    let io = |source| ClientError::Io {
        path: path.clone(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(|source| ClientError::NotRunning {
        path: path.clone(),
        source,
    })?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut line = serde_json::to_vec(req).map_err(|e| ClientError::Protocol(e.to_string()))?;
    line.push(b'\n');
    stream.write_all(&line).map_err(io)?;
    let mut reader = BufReader::new(stream);
    let mut answer = Vec::new();
    reader.read_until(b'\n', &mut answer).map_err(io)?;
    if answer.is_empty() {
        return Err(ClientError::Protocol(
            "the daemon closed the connection".into(),
        ));
    }
    serde_json::from_slice(&answer).map_err(|e| ClientError::Protocol(e.to_string()))
}
