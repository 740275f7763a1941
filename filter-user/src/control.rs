//! The control protocol between `p25ctl` and `p25d` on a Unix socket (default
//! `/run/p25/p25.sock`, mode 0660), one request per connection:
//!
//! - the client writes one [`Request`] as a JSON line of at most [`MAX_REQUEST`] bytes;
//! - the daemon answers with one [`Response`] line, whose `data` is the typed view of
//!   that command ([`AllowedView`], [`StatusView`], ...). `list` and `offenders` are
//!   streamed: their `data` is a head with counts ([`ListHead`], [`OffendersHead`]),
//!   followed by one JSON line per row, so neither side ever holds the whole table as one
//!   JSON document;
//! - no line of the answer is longer than [`MAX_MESSAGE`]: the daemon never writes one,
//!   and the client refuses one.
//!
//! The daemon is the single writer of the maps; this socket is the only way to ask it to
//! change something. It is never exposed on a network port. The request handler itself
//! is [`handler::handle`], generic over the daemon's state so that the fuzz target runs
//! the very code p25d runs.

pub mod handler;

use std::{
    io::{BufRead, BufReader, Read as _, Write as _},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// Default socket path.
pub const DEFAULT_SOCKET: &str = "/run/p25/p25.sock";
/// Longest request line the daemon reads (with its newline); a longer one is refused.
/// Requests are small: the longest field is a 256-byte comment.
pub const MAX_REQUEST: usize = 64 * 1024;
/// Longest line of an answer, either side: the daemon never writes a longer one and the
/// client refuses it. Large tables are streamed one row per line, so a line is at most
/// a status page or one row with its 256-byte comment and owner.
pub const MAX_MESSAGE: usize = 1024 * 1024;

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
        /// Lifetime in seconds (1 to ten years); none means until removed.
        #[serde(default)]
        expires_in_secs: Option<u64>,
        /// New TCP/25 connections per minute each source inside may open.
        #[serde(default)]
        max_syn_per_minute: Option<u32>,
        /// How many of those at once (defaults to `max_syn_per_minute`).
        #[serde(default)]
        syn_burst: Option<u32>,
        /// Accept a prefix wider than the subscriber prefix it covers, or a default route.
        #[serde(default)]
        force: bool,
    },
    /// Remove a runtime allowlist entry.
    Deny {
        /// The prefix.
        prefix: IpNet,
    },
    /// The allowlist and subscriber prefixes (streamed).
    List,
    /// Interfaces, policy generation, reload results.
    Status,
    /// Counters.
    Stats,
    /// Re-read the policy file now.
    Reload,
    /// The offender table, worst first (streamed).
    Offenders {
        /// Only subscribers whose latest attempt is at most this many seconds old.
        #[serde(default)]
        since_secs: Option<u64>,
        /// At most this many rows.
        #[serde(default)]
        limit: Option<usize>,
    },
}

impl Request {
    /// The command's name, as on the wire and the command line.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Allow { .. } => "allow",
            Self::Deny { .. } => "deny",
            Self::List => "list",
            Self::Status => "status",
            Self::Stats => "stats",
            Self::Reload => "reload",
            Self::Offenders { .. } => "offenders",
        }
    }

    /// Whether the command changes the filter (and so needs an administrator).
    pub fn changes_state(&self) -> bool {
        matches!(self, Self::Allow { .. } | Self::Deny { .. } | Self::Reload)
    }
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

/// The daemon's answer: the first line of every answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response<T> {
    /// Success, with the command's typed view (for `list` and `offenders`, the head of
    /// the stream).
    Ok {
        /// The data.
        data: T,
    },
    /// Failure: nothing was changed.
    Error {
        /// What went wrong, for an operator.
        message: String,
    },
}

/// A whole error answer: one [`Response::Error`] line.
pub fn error_answer(message: String) -> Vec<u8> {
    let response: Response<()> = Response::Error { message };
    // A String and a tag always serialize; should that ever fail, an empty answer is
    // still an answer the client reports ("closed the connection").
    let mut line = serde_json::to_vec(&response).unwrap_or_default();
    line.push(b'\n');
    line
}

/// `p25ctl allow` data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllowedView {
    /// The prefix now allowed.
    pub prefix: IpNet,
    /// When it expires, RFC 3339, if ever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
    /// Its SYN limit per source, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_syn_per_minute: Option<u32>,
    /// The burst of that limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub syn_burst: Option<u32>,
}

/// `p25ctl deny` data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeniedView {
    /// The prefix removed from the runtime allowlist.
    pub prefix: IpNet,
}

/// `p25ctl reload` data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadView {
    /// Generation of the policy now in force.
    pub generation: u32,
}

/// Head of a streamed `list`: this many [`AllowEntryView`] lines follow, then this many
/// [`SubscriberView`] lines.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListHead {
    /// Allowlist rows that follow.
    pub allow: usize,
    /// Subscriber rows that follow them.
    pub subscribers: usize,
}

/// Head of a streamed `offenders`: this many [`OffenderView`](crate::offenders::OffenderView)
/// lines follow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OffendersHead {
    /// Rows that follow.
    pub offenders: usize,
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
    /// Where the policy comes from (a file or etcd) and how following it goes; absent
    /// when read from the pins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<crate::fleet::views::SourceView>,
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
    /// The daemon refused the request.
    #[error("{0}")]
    Refused(String),
}

/// One request's connection, from which the answer's lines are read.
#[derive(Debug)]
pub struct Answer {
    path: String,
    reader: BufReader<UnixStream>,
}

impl Answer {
    /// Reads the next line (at most [`MAX_MESSAGE`] bytes) as a `T`.
    pub fn line<T: DeserializeOwned>(&mut self) -> Result<T, ClientError> {
        let line = read_line(&mut self.reader, MAX_MESSAGE).map_err(|source| ClientError::Io {
            path: self.path.clone(),
            source,
        })?;
        let Some(line) = line else {
            return Err(ClientError::Protocol(
                "the daemon closed the connection".into(),
            ));
        };
        serde_json::from_slice(&line).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// Reads the first line, a [`Response`]: its data, or the daemon's refusal as
    /// [`ClientError::Refused`].
    pub fn head<T: DeserializeOwned>(&mut self) -> Result<T, ClientError> {
        match self.line::<Response<T>>()? {
            Response::Ok { data } => Ok(data),
            Response::Error { message } => Err(ClientError::Refused(message)),
        }
    }

    /// Reads `count` rows of a stream; a short stream is an error, never a short table.
    pub fn rows<T: DeserializeOwned>(&mut self, count: usize) -> Result<Vec<T>, ClientError> {
        // Grown as rows arrive: `count` comes from the other side.
        let mut rows = Vec::new();
        for _ in 0..count {
            rows.push(self.line()?);
        }
        Ok(rows)
    }
}

/// Reads one `\n`-terminated line of at most `cap` bytes (newline included); `None` at
/// the end of the stream. A longer line is an error, read no further than `cap`.
pub fn read_line(reader: &mut impl BufRead, cap: usize) -> std::io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    let limit = u64::try_from(cap).unwrap_or(u64::MAX);
    reader.by_ref().take(limit).read_until(b'\n', &mut line)?;
    if line.is_empty() {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') && line.len() >= cap {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a line longer than {cap} bytes"),
        ));
    }
    Ok(Some(line))
}

/// Sends one request; the answer is read from what this returns. Reads and writes each
/// wait at most `timeout`.
pub fn send(socket: &Path, req: &Request, timeout: Duration) -> Result<Answer, ClientError> {
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
    if line.len() > MAX_REQUEST {
        return Err(ClientError::Protocol(format!(
            "the request is {} bytes, longer than the {MAX_REQUEST} the daemon reads",
            line.len()
        )));
    }
    stream.write_all(&line).map_err(io)?;
    Ok(Answer {
        reader: BufReader::new(stream),
        path,
    })
}

/// Sends one request and reads its single-line answer as a `T`.
pub fn request<T: DeserializeOwned>(
    socket: &Path,
    req: &Request,
    timeout: Duration,
) -> Result<T, ClientError> {
    send(socket, req, timeout)?.head()
}

/// `list`: the head, then its rows.
pub fn list(socket: &Path, timeout: Duration) -> Result<ListView, ClientError> {
    let mut answer = send(socket, &Request::List, timeout)?;
    let head: ListHead = answer.head()?;
    Ok(ListView {
        allow: answer.rows(head.allow)?,
        subscribers: answer.rows(head.subscribers)?,
    })
}

/// `offenders` (and `top`): the head, then its rows.
pub fn offenders(
    socket: &Path,
    since_secs: Option<u64>,
    limit: Option<usize>,
    timeout: Duration,
) -> Result<Vec<crate::offenders::OffenderView>, ClientError> {
    let mut answer = send(socket, &Request::Offenders { since_secs, limit }, timeout)?;
    let head: OffendersHead = answer.head()?;
    answer.rows(head.offenders)
}
