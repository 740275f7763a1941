//! The typed values stored under the fleet's keys, and their checks.

use std::time::{Duration, SystemTime};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::keys::allow_key_name;
use crate::{
    check_prefix,
    policy::{AllowEntry, MAX_EXPIRY_AHEAD, MAX_TEXT_BYTES},
};

/// The value of `<prefix>/allow/<key>`, as stored (JSON).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllowValue {
    /// The exempted prefix, canonical, host bits clear (`192.0.2.25/32`).
    pub prefix: String,
    /// Why, for whom.
    #[serde(default)]
    pub comment: Option<String>,
    /// When the entry stops counting: RFC 3339 in UTC (`2030-01-01T00:00:00Z`), or null.
    #[serde(default)]
    pub expires: Option<String>,
}

/// A fleet allow entry that passed [`check_allow`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleetAllow {
    /// The exempted prefix.
    pub prefix: IpNet,
    /// Why, for whom.
    pub comment: Option<Box<str>>,
    /// When it ends.
    pub expires: Option<SystemTime>,
}

impl FleetAllow {
    /// The entry as a policy allowlist entry (owner `fleet`), for the desired state.
    pub fn to_policy_entry(&self) -> AllowEntry {
        AllowEntry {
            prefix: self.prefix,
            comment: self.comment.clone(),
            owner: Some("fleet".into()),
            expires: self.expires,
            syn_limit: None,
        }
    }

    /// The stored form.
    pub fn to_value(&self) -> AllowValue {
        AllowValue {
            prefix: self.prefix.to_string(),
            comment: self.comment.as_deref().map(str::to_owned),
            expires: self
                .expires
                .map(|at| humantime::format_rfc3339_seconds(at).to_string()),
        }
    }
}

/// Checks the value stored under allow key `<name>`: JSON of [`AllowValue`], a prefix
/// without host bits that is the one the key names, a comment of at most
/// [`MAX_TEXT_BYTES`] bytes without control characters, an expiry in RFC 3339 (UTC) at
/// most ten years after `now`. The error says what is wrong with which value.
pub fn check_allow(name: &str, bytes: &[u8], now: SystemTime) -> Result<FleetAllow, String> {
    let value: AllowValue = serde_json::from_slice(bytes).map_err(|e| {
        format!(
            "not a fleet allow entry ({e}); expected JSON such as \
             {{\"prefix\":\"192.0.2.25/32\",\"comment\":\"relay\",\"expires\":null}}"
        )
    })?;
    let prefix: IpNet = value.prefix.parse().map_err(|_| {
        format!(
            "prefix {:?} is not a CIDR prefix such as 192.0.2.25/32",
            value.prefix
        )
    })?;
    let prefix = check_prefix(prefix).map_err(|e| e.to_string())?;
    let expected = allow_key_name(prefix);
    if name != expected {
        return Err(format!(
            "the key names {name:?} but the value holds {prefix}, whose key is {expected:?}: \
             write it with `p25ctl fleet allow`"
        ));
    }
    if let Some(comment) = &value.comment {
        check_text(comment)?;
    }
    let expires = match &value.expires {
        None => None,
        Some(text) => Some(check_expiry(text, now)?),
    };
    Ok(FleetAllow {
        prefix,
        comment: value.comment.map(String::into_boxed_str),
        expires,
    })
}

/// Checks a comment: at most [`MAX_TEXT_BYTES`] bytes, no control characters (it ends
/// up in logs and tables).
pub fn check_text(comment: &str) -> Result<(), String> {
    if comment.len() > MAX_TEXT_BYTES {
        return Err(format!(
            "the comment is {} bytes long; at most {MAX_TEXT_BYTES} are allowed",
            comment.len()
        ));
    }
    if comment.chars().any(char::is_control) {
        return Err(format!(
            "the comment {comment:?} contains control characters"
        ));
    }
    Ok(())
}

/// Parses an expiry: RFC 3339 in UTC, at most [`MAX_EXPIRY_AHEAD`] after `now`.
pub fn check_expiry(text: &str, now: SystemTime) -> Result<SystemTime, String> {
    let at = humantime::parse_rfc3339(text).map_err(|e| {
        format!(
            "expires {text:?} is not an RFC 3339 time in UTC such as 2030-01-01T00:00:00Z ({e})"
        )
    })?;
    let limit = now.checked_add(MAX_EXPIRY_AHEAD).unwrap_or(now);
    if at > limit {
        return Err(format!(
            "expires {text} is more than 10 years ahead; leave it out for an entry without \
             expiry, or write the year you meant"
        ));
    }
    Ok(at)
}

/// The value of `<prefix>/routers/<name>/status`: the router's registration, put under a
/// lease so that it disappears when the router stops renewing it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouterStatus {
    /// The router's name (`--router`).
    pub router: String,
    /// The etcd revision of the fleet state in force.
    pub revision: i64,
    /// When that state was put in force (RFC 3339, UTC).
    pub applied_at: String,
    /// The p25d version.
    pub version: String,
    /// Whether the router follows etcd right now (false while it runs on a snapshot).
    pub source_up: bool,
    /// The last problem with the fleet state (a rejected policy document, a bad value).
    #[serde(default)]
    pub error: Option<String>,
}

/// The time a `--expires` duration from `now` ends, as an RFC 3339 UTC string.
pub fn expires_after(now: SystemTime, after: Duration) -> String {
    humantime::format_rfc3339_seconds(now + after).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> SystemTime {
        humantime::parse_rfc3339("2026-12-01T00:00:00Z").unwrap_or(SystemTime::UNIX_EPOCH)
    }

    #[test]
    fn a_good_value_round_trips() -> Result<(), String> {
        let bytes =
            br#"{"prefix":"192.0.2.25/32","comment":"relay","expires":"2027-01-01T00:00:00Z"}"#;
        let entry = check_allow("192.0.2.25_32", bytes, now())?;
        assert_eq!(entry.prefix.to_string(), "192.0.2.25/32");
        assert_eq!(entry.comment.as_deref(), Some("relay"));
        let value = entry.to_value();
        assert_eq!(value.expires.as_deref(), Some("2027-01-01T00:00:00Z"));
        let again = serde_json::to_vec(&value).map_err(|e| e.to_string())?;
        assert_eq!(check_allow("192.0.2.25_32", &again, now())?, entry);
        // The policy entry carries the owner `fleet`.
        assert_eq!(entry.to_policy_entry().owner.as_deref(), Some("fleet"));
        // Optional fields may be left out.
        check_allow("192.0.2.0_24", br#"{"prefix":"192.0.2.0/24"}"#, now())?;
        Ok(())
    }

    #[test]
    fn bad_values_say_what_is_wrong() {
        for (name, bytes, expected) in [
            ("192.0.2.25_32", &b"not json"[..], "not a fleet allow entry"),
            (
                "192.0.2.25_32",
                br#"{"prefix":"192.0.2.25/32","x":1}"#,
                "unknown field",
            ),
            (
                "192.0.2.25_32",
                br#"{"prefix":"banana"}"#,
                "not a CIDR prefix",
            ),
            ("192.0.2.0_24", br#"{"prefix":"192.0.2.1/24"}"#, "host bits"),
            (
                "192.0.2.26_32",
                br#"{"prefix":"192.0.2.25/32"}"#,
                "the key names",
            ),
            (
                "192.0.2.25_32",
                br#"{"prefix":"192.0.2.25/32","expires":"tomorrow"}"#,
                "not an RFC 3339",
            ),
            (
                "192.0.2.25_32",
                br#"{"prefix":"192.0.2.25/32","expires":"2099-01-01T00:00:00Z"}"#,
                "more than 10 years",
            ),
            (
                "192.0.2.25_32",
                br#"{"prefix":"192.0.2.25/32","comment":"a\u0007b"}"#,
                "control characters",
            ),
        ] {
            let message = check_allow(name, bytes, now()).err().unwrap_or_default();
            assert!(message.contains(expected), "{name}: {message:?}");
        }
        let long = format!(
            r#"{{"prefix":"192.0.2.25/32","comment":"{}"}}"#,
            "x".repeat(257)
        );
        assert!(check_allow("192.0.2.25_32", long.as_bytes(), now()).is_err());
    }
}
