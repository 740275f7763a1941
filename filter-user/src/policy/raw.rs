//! The policy document as written. Values whose validity is a matter of policy rather than
//! of type (prefixes, names, timestamps) stay strings here, so that `check` can report all
//! of them instead of serde stopping at the first. Every value a semantic rule may
//! complain about is `Spanned`: serde-saphyr records where it is written, so a diagnostic
//! points at it without a second pass over the text.

use std::fmt;

use serde::{
    Deserialize, Deserializer,
    de::{self, IgnoredAny, MapAccess, SeqAccess, Visitor},
};
use serde_saphyr::Spanned;

use super::{Attach, Fragments, PolicyAction, PolicyMode, Role, UnreadableTcpPolicy};

/// Only `version`, read when the whole document did not deserialize: a document of
/// another version may follow another schema, and its unknown fields would only bury the
/// one error that matters.
#[derive(Deserialize)]
#[serde(expecting = "a p25 policy: a mapping with `version: 1` and `subscribers`")]
pub(super) struct VersionProbe {
    #[serde(default)]
    pub version: Option<At<Version>>,
}

/// A `version` value of any type, as shown in an error, and as a number if it is one.
pub(super) struct Version {
    /// The value as the error shows it: a number as written, a string quoted.
    pub shown: String,
    pub number: Option<u64>,
}

impl<'de> Deserialize<'de> for Version {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(VersionVisitor)
    }
}

struct VersionVisitor;

impl VersionVisitor {
    fn other(shown: &str) -> Version {
        Version {
            shown: shown.to_owned(),
            number: None,
        }
    }
}

impl<'de> Visitor<'de> for VersionVisitor {
    type Value = Version;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a policy version number")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Version, E> {
        Ok(Version {
            shown: v.to_string(),
            number: Some(v),
        })
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Version, E> {
        Ok(Version {
            shown: v.to_string(),
            number: u64::try_from(v).ok(),
        })
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Version, E> {
        Ok(Self::other(&v.to_string()))
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Version, E> {
        Ok(Self::other(&v.to_string()))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Version, E> {
        Ok(Self::other(&format!("{v:?}")))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Version, E> {
        Ok(Self::other("null"))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Version, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Self::other("(a list)"))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Version, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Self::other("(a mapping)"))
    }
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a p25 policy: a mapping with `version: 1` and `subscribers`"
)]
pub(super) struct RawPolicy {
    /// Checked before anything else is.
    #[serde(default)]
    pub version: Option<At<Version>>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub defaults: RawDefaults,
    #[serde(default, deserialize_with = "null_as_default")]
    pub interfaces: Vec<RawInterface>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub subscribers: Vec<RawSubscriber>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub allow: Vec<RawAllow>,
    #[serde(default)]
    pub allow_empty_subscribers: bool,
    /// List files of subscriber prefixes, relative to the policy file.
    #[serde(default, deserialize_with = "null_as_default")]
    pub subscriber_files: Vec<At<String>>,
    /// List files of allowlist prefixes, relative to the policy file.
    #[serde(default, deserialize_with = "null_as_default")]
    pub allow_files: Vec<At<String>>,
}

#[derive(Debug, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "the `defaults` mapping")]
pub(super) struct RawDefaults {
    #[serde(default)]
    pub mode: PolicyMode,
    #[serde(default)]
    pub fragments: Fragments,
    #[serde(default)]
    pub unreadable_tcp: UnreadableTcpPolicy,
    // `None` when absent, so that an explicitly empty list can be told from a missing one.
    #[serde(default)]
    pub ports: Option<At<Vec<At<u16>>>>,
    #[serde(default)]
    pub action: PolicyAction,
    #[serde(default)]
    pub reject_rate: Option<At<u32>>,
    #[serde(default)]
    pub reject_burst: Option<At<u32>>,
}

#[derive(Debug, PartialEq, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "an interface mapping (`name`, `role`, `attach`)"
)]
pub(super) struct RawInterface {
    pub name: At<String>,
    pub role: Role,
    #[serde(default)]
    pub attach: Attach,
}

/// A value and where it is written (at the alias, if it is one, not at its anchor): what
/// `Spanned` gives, in 8 bytes of position rather than two full locations, since a
/// million-entry list keeps one per entry.
#[derive(Debug, PartialEq)]
pub(super) struct At<T> {
    pub value: T,
    pub line: u32,
    pub column: u32,
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for At<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let spanned = Spanned::<T>::deserialize(deserializer)?;
        let at = spanned.referenced;
        Ok(Self {
            value: spanned.value,
            line: u32::try_from(at.line()).unwrap_or(u32::MAX),
            column: u32::try_from(at.column()).unwrap_or(u32::MAX),
        })
    }
}

#[derive(Debug, PartialEq, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a subscriber mapping (`prefix`, optional `mode`, `action`)"
)]
pub(super) struct RawSubscriber {
    pub prefix: At<Box<str>>,
    #[serde(default)]
    pub mode: Option<PolicyMode>,
    #[serde(default)]
    pub action: Option<PolicyAction>,
}

/// An allowlist entry as written, kept compact: most entries are a prefix alone, so the
/// other fields live in a box that only the entries having them allocate.
#[derive(Debug, PartialEq)]
pub(super) struct RawAllow {
    pub prefix: At<Box<str>>,
    pub extra: Option<Box<AllowExtra>>,
}

/// The fields of an allowlist entry besides its prefix.
#[derive(Debug, PartialEq, Default)]
pub(super) struct AllowExtra {
    pub comment: Option<At<String>>,
    pub owner: Option<At<String>>,
    pub expires: Option<At<String>>,
    pub max_syn_per_minute: Option<At<u32>>,
    pub syn_burst: Option<At<u32>>,
}

impl RawAllow {
    pub fn extra(&self) -> &AllowExtra {
        static NONE: AllowExtra = AllowExtra {
            comment: None,
            owner: None,
            expires: None,
            max_syn_per_minute: None,
            syn_burst: None,
        };
        self.extra.as_deref().unwrap_or(&NONE)
    }
}

/// `RawAllow` as serde derives it (for the error messages of unknown and missing
/// fields), compacted as soon as it is read.
#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "an allow mapping (`prefix`, optional `comment`, `owner`, `expires`, \
                 `max_syn_per_minute`, `syn_burst`)"
)]
struct AllowAsWritten {
    prefix: At<Box<str>>,
    #[serde(default)]
    comment: Option<At<String>>,
    #[serde(default)]
    owner: Option<At<String>>,
    #[serde(default)]
    expires: Option<At<String>>,
    #[serde(default)]
    max_syn_per_minute: Option<At<u32>>,
    #[serde(default)]
    syn_burst: Option<At<u32>>,
}

impl<'de> Deserialize<'de> for RawAllow {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let written = AllowAsWritten::deserialize(deserializer)?;
        let extra = AllowExtra {
            comment: written.comment,
            owner: written.owner,
            expires: written.expires,
            max_syn_per_minute: written.max_syn_per_minute,
            syn_burst: written.syn_burst,
        };
        Ok(Self {
            prefix: written.prefix,
            extra: (extra != AllowExtra::default()).then(|| Box::new(extra)),
        })
    }
}

/// A key present with nothing after it (`allow:` with every entry commented out) means
/// "none", not a type error.
fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}
