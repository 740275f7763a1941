//! What `p25ctl fleet` prints with `--json`, and the fleet part of `p25ctl status`.

use serde::{Deserialize, Serialize};

use super::{Problem, values::RouterStatus};

/// `p25ctl fleet push`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushView {
    /// The key written.
    pub key: String,
    /// The revision of the write.
    pub revision: i64,
    /// Subscriber prefixes and allowlist entries of the document.
    pub subscribers: usize,
    /// Allowlist entries written in the document.
    pub allow: usize,
    /// Warnings of the check, `file:line:col: message`.
    pub warnings: Vec<String>,
}

/// One fleet allow entry (`p25ctl fleet allow`, `list`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetAllowView {
    /// The key.
    pub key: String,
    /// The prefix (as stored; for a bad value, as far as it could be read).
    pub prefix: String,
    /// The comment.
    pub comment: Option<String>,
    /// The expiry (RFC 3339), if any.
    pub expires: Option<String>,
    /// The revision of its last change.
    pub revision: i64,
    /// Why routers skip it, if they do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `p25ctl fleet deny`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetDenyView {
    /// The key removed.
    pub key: String,
    /// The prefix.
    pub prefix: String,
    /// The revision of the delete.
    pub revision: i64,
}

/// `p25ctl fleet list`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetListView {
    /// The revision the list was read at.
    pub revision: i64,
    /// The entries, by key.
    pub allow: Vec<FleetAllowView>,
}

/// One router in `p25ctl fleet status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouterView {
    /// What the router registered.
    #[serde(flatten)]
    pub status: RouterStatus,
    /// Seconds since its lease was last renewed (it renews every few seconds while it
    /// runs; the registration disappears 10 s after the last renewal).
    pub last_seen_secs_ago: Option<i64>,
    /// Whether it has applied the latest change of the policy and allow keys, without
    /// error.
    pub in_sync: bool,
}

/// `p25ctl fleet status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetStatusView {
    /// The store's revision when read.
    pub revision: i64,
    /// The revision of the latest change to the policy or an allow entry (what a router
    /// must have applied to be in sync).
    pub latest_change: i64,
    /// Every registered router, by name.
    pub routers: Vec<RouterView>,
}

/// The policy source part of `p25ctl status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceView {
    /// `file` or `etcd`.
    pub kind: String,
    /// The file, or the etcd endpoints and prefix.
    pub location: String,
    /// The router name (etcd).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router: Option<String>,
    /// The etcd revision in force (0 for a file).
    pub revision: i64,
    /// Whether the source is followed live (always true for a file).
    pub up: bool,
    /// Fleet allow entries in force.
    #[serde(default)]
    pub fleet_allow: usize,
    /// The last error talking to the source, if the latest attempt failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// What is wrong with the fleet state in force (each left out or kept back).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<Problem>,
}
