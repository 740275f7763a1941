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

use super::{Attach, Fragments, PolicyAction, PolicyMode, Role};

/// Only `version`, read before anything else: a document of another version may follow
/// another schema, and its unknown fields would only bury the one error that matters.
#[derive(Deserialize)]
#[serde(expecting = "a p25 policy: a mapping with `version: 1` and `subscribers`")]
pub(super) struct VersionProbe {
    #[serde(default)]
    pub version: Option<Spanned<Version>>,
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
    // Checked by the probe; declared so that it is not an unknown field.
    #[serde(default, rename = "version")]
    pub _version: Option<IgnoredAny>,
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
    pub subscriber_files: Vec<Spanned<String>>,
    /// List files of allowlist prefixes, relative to the policy file.
    #[serde(default, deserialize_with = "null_as_default")]
    pub allow_files: Vec<Spanned<String>>,
}

#[derive(Debug, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "the `defaults` mapping")]
pub(super) struct RawDefaults {
    #[serde(default)]
    pub mode: PolicyMode,
    #[serde(default)]
    pub fragments: Fragments,
    // `None` when absent, so that an explicitly empty list can be told from a missing one.
    #[serde(default)]
    pub ports: Option<Spanned<Vec<Spanned<u16>>>>,
    #[serde(default)]
    pub action: PolicyAction,
    #[serde(default)]
    pub reject_rate: Option<Spanned<u32>>,
    #[serde(default)]
    pub reject_burst: Option<Spanned<u32>>,
}

#[derive(Debug, PartialEq, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "an interface mapping (`name`, `role`, `attach`)"
)]
pub(super) struct RawInterface {
    pub name: Spanned<String>,
    pub role: Role,
    #[serde(default)]
    pub attach: Attach,
}

#[derive(Debug, PartialEq, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a subscriber mapping (`prefix`, optional `mode`, `action`)"
)]
pub(super) struct RawSubscriber {
    pub prefix: Spanned<String>,
    #[serde(default)]
    pub mode: Option<PolicyMode>,
    #[serde(default)]
    pub action: Option<PolicyAction>,
}

#[derive(Debug, PartialEq, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "an allow mapping (`prefix`, optional `comment`, `owner`, `expires`, \
                 `max_syn_per_minute`, `syn_burst`)"
)]
pub(super) struct RawAllow {
    pub prefix: Spanned<String>,
    #[serde(default)]
    pub comment: Option<Spanned<String>>,
    #[serde(default)]
    pub owner: Option<Spanned<String>>,
    #[serde(default)]
    pub expires: Option<Spanned<String>>,
    #[serde(default)]
    pub max_syn_per_minute: Option<Spanned<u32>>,
    #[serde(default)]
    pub syn_burst: Option<Spanned<u32>>,
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
