//! The fleet's key layout in etcd (docs/fleet.md, "Key layout"):
//!
//! | key | value |
//! | --- | --- |
//! | `<prefix>/policy` | the policy document (YAML), checked like a file |
//! | `<prefix>/allow/<key>` | one fleet allow entry, JSON ([`super::values::AllowValue`]) |
//! | `<prefix>/routers/<name>/interfaces` | YAML override of the policy's `interfaces` |
//! | `<prefix>/routers/<name>/status` | the router's registration, under a lease |
//!
//! `<key>` is the prefix in canonical text with `/` replaced by `_` (`192.0.2.25_32`), so
//! that an allow is one put and a deny one delete, and each key names its entry.

use ipnet::IpNet;

use super::Error;

/// The key prefix used when `--etcd-prefix` is not given.
pub const DEFAULT_PREFIX: &str = "/p25";

/// Longest router name: a hostname label is at most 63 bytes, a FQDN 253.
pub const MAX_ROUTER_NAME: usize = 253;

/// The keys of one fleet, under one prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// The prefix, starting with `/`, without a trailing `/`.
    prefix: String,
}

/// What a key under the prefix is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Key {
    /// `<prefix>/policy`.
    Policy,
    /// `<prefix>/allow/<name>`, with the name (not yet checked against the value).
    Allow(String),
    /// `<prefix>/routers/<router>/interfaces`.
    Interfaces(String),
    /// `<prefix>/routers/<router>/status`.
    Status(String),
    /// Anything else under (or outside) the prefix: ignored.
    Other,
}

impl Layout {
    /// The layout under `prefix` (`/p25`; a trailing `/` is dropped). Refuses a prefix
    /// that does not start with `/`, is only `/`, or holds whitespace or control
    /// characters (a key prefix that cannot be typed back is a trap).
    pub fn new(prefix: &str) -> Result<Self, Error> {
        let trimmed = prefix.trim_end_matches('/');
        let bad = |why: &str| Error::Prefix {
            prefix: prefix.to_owned(),
            why: why.to_owned(),
        };
        if !trimmed.starts_with('/') {
            return Err(bad("it must start with `/`, as in /p25"));
        }
        if trimmed.len() < 2 {
            return Err(bad(
                "`/` alone would put p25's keys among everything else in etcd; use /p25",
            ));
        }
        if trimmed.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad("it must not contain whitespace or control characters"));
        }
        Ok(Self {
            prefix: trimmed.to_owned(),
        })
    }

    /// The prefix as given, without a trailing `/`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `<prefix>/`: everything of this fleet (a range read with `with_prefix`).
    pub fn root(&self) -> String {
        format!("{}/", self.prefix)
    }

    /// `<prefix>/policy`.
    pub fn policy(&self) -> String {
        format!("{}/policy", self.prefix)
    }

    /// `<prefix>/allow/`: every fleet allow entry.
    pub fn allow_dir(&self) -> String {
        format!("{}/allow/", self.prefix)
    }

    /// `<prefix>/allow/<key>` of `net`.
    pub fn allow(&self, net: IpNet) -> String {
        format!("{}{}", self.allow_dir(), allow_key_name(net))
    }

    /// `<prefix>/routers/`: every router's keys.
    pub fn routers_dir(&self) -> String {
        format!("{}/routers/", self.prefix)
    }

    /// `<prefix>/routers/<router>/interfaces`.
    pub fn interfaces(&self, router: &str) -> String {
        format!("{}{router}/interfaces", self.routers_dir())
    }

    /// `<prefix>/routers/<router>/status`.
    pub fn status(&self, router: &str) -> String {
        format!("{}{router}/status", self.routers_dir())
    }

    /// The watched range that holds the policy and the allow entries, as (start, end):
    /// `<prefix>/allow/` sorts right before `<prefix>/policy`, so one contiguous range
    /// `[<prefix>/allow/, <prefix>/policy\0)` covers both and leaves out the routers'
    /// status keys, which change after every apply on every router (watching them
    /// would send each router every other router's registration).
    pub fn watched_range(&self) -> (String, String) {
        (self.allow_dir(), format!("{}\0", self.policy()))
    }

    /// What `key` is.
    pub fn classify(&self, key: &[u8]) -> Key {
        let Ok(key) = std::str::from_utf8(key) else {
            return Key::Other;
        };
        let Some(rest) = key
            .strip_prefix(self.prefix.as_str())
            .and_then(|r| r.strip_prefix('/'))
        else {
            return Key::Other;
        };
        if rest == "policy" {
            return Key::Policy;
        }
        if let Some(name) = rest.strip_prefix("allow/") {
            return Key::Allow(name.to_owned());
        }
        if let Some(router) = rest.strip_prefix("routers/") {
            if let Some(name) = router.strip_suffix("/interfaces")
                && !name.contains('/')
            {
                return Key::Interfaces(name.to_owned());
            }
            if let Some(name) = router.strip_suffix("/status")
                && !name.contains('/')
            {
                return Key::Status(name.to_owned());
            }
        }
        Key::Other
    }
}

/// The `<key>` of a fleet allow entry: the prefix in canonical text, `/` as `_`.
pub fn allow_key_name(net: IpNet) -> String {
    net.to_string().replace('/', "_")
}

/// The prefix a `<key>` names, if it is one in canonical form.
pub fn parse_allow_key_name(name: &str) -> Option<IpNet> {
    let net: IpNet = name.replacen('_', "/", 1).parse().ok()?;
    (allow_key_name(net) == name).then_some(net)
}

/// Checks a router name (`--router`, a key component): 1 to [`MAX_ROUTER_NAME`] bytes
/// of letters, digits, `.`, `-` and `_`, as a hostname is, and not `.` or `..`.
pub fn check_router_name(name: &str) -> Result<(), Error> {
    let bad = |why: &str| Error::RouterName {
        name: name.to_owned(),
        why: why.to_owned(),
    };
    if name.is_empty() || name.len() > MAX_ROUTER_NAME {
        return Err(bad("it must be 1 to 253 bytes long"));
    }
    if name == "." || name == ".." {
        return Err(bad("`.` and `..` are not names"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
    {
        return Err(bad(&format!(
            "{c:?} is not allowed; use letters, digits, `.`, `-` and `_` (a hostname)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_documented_layout() -> Result<(), Box<dyn std::error::Error>> {
        let layout = Layout::new("/p25/")?;
        assert_eq!(layout.prefix(), "/p25");
        assert_eq!(layout.policy(), "/p25/policy");
        assert_eq!(
            layout.allow("192.0.2.25/32".parse()?),
            "/p25/allow/192.0.2.25_32"
        );
        assert_eq!(
            layout.allow("2001:db8::/48".parse()?),
            "/p25/allow/2001:db8::_48"
        );
        assert_eq!(layout.interfaces("r1"), "/p25/routers/r1/interfaces");
        assert_eq!(layout.status("r1"), "/p25/routers/r1/status");
        let (start, end) = layout.watched_range();
        for inside in [layout.policy(), layout.allow("192.0.2.25/32".parse()?)] {
            assert!(
                start <= inside && inside < end,
                "{inside} outside the range"
            );
        }
        for outside in [
            layout.status("r1"),
            layout.interfaces("r1"),
            "/p25/policy2".into(),
        ] {
            assert!(
                !(start <= outside && outside < end),
                "{outside} inside the range"
            );
        }
        Ok(())
    }

    #[test]
    fn keys_classify_back() -> Result<(), Box<dyn std::error::Error>> {
        let layout = Layout::new("/fleet/a")?;
        assert_eq!(layout.classify(b"/fleet/a/policy"), Key::Policy);
        assert_eq!(
            layout.classify(b"/fleet/a/allow/192.0.2.0_24"),
            Key::Allow("192.0.2.0_24".into())
        );
        assert_eq!(
            layout.classify(b"/fleet/a/routers/r-1/interfaces"),
            Key::Interfaces("r-1".into())
        );
        assert_eq!(
            layout.classify(b"/fleet/a/routers/r-1/status"),
            Key::Status("r-1".into())
        );
        for other in [
            &b"/fleet/a/policy/x"[..],
            b"/fleet/ab/policy",
            b"/fleet/a/routers/x/y/status",
            b"/other",
            b"\xff",
        ] {
            assert_eq!(layout.classify(other), Key::Other, "{other:?}");
        }
        Ok(())
    }

    #[test]
    fn allow_key_names_round_trip_and_refuse_non_canonical_forms()
    -> Result<(), Box<dyn std::error::Error>> {
        for text in ["192.0.2.25/32", "198.51.100.0/24", "2001:db8:40::/64"] {
            let net: IpNet = text.parse()?;
            assert_eq!(parse_allow_key_name(&allow_key_name(net)), Some(net));
        }
        for bad in ["192.0.2.25", "192.0.2.025_32", "2001:DB8::_32", "x_1", ""] {
            assert_eq!(parse_allow_key_name(bad), None, "{bad}");
        }
        Ok(())
    }

    #[test]
    fn prefixes_and_router_names_are_checked() {
        for bad in ["p25", "/", "//", "/p 25", ""] {
            assert!(Layout::new(bad).is_err(), "{bad:?}");
        }
        for good in ["r1", "edge-7.ams", "a_b"] {
            assert!(check_router_name(good).is_ok(), "{good}");
        }
        for bad in ["", ".", "..", "a/b", "a b", &"x".repeat(254)] {
            assert!(check_router_name(bad).is_err(), "{bad:?}");
        }
    }
}
