//! The policy document as written. Values whose validity is a matter of policy rather than
//! of type (prefixes, names, timestamps) stay strings here, so that `check` can report all
//! of them instead of serde stopping at the first. The strings of list entries borrow from
//! the text where they can: a million owned prefixes were a million allocations.

use std::borrow::Cow;

use serde::{Deserialize, Deserializer, de::IgnoredAny};

use super::{Attach, Fragments, PolicyAction, PolicyMode, Role, UnreadableTcpPolicy};

/// Only `version`, read before anything else: a document of another version may follow
/// another schema, and its unknown fields would only bury the one error that matters.
#[derive(Deserialize)]
#[serde(expecting = "a p25 policy: a mapping with `version: 1` and `subscribers`")]
pub(super) struct VersionProbe {
    #[serde(default)]
    pub version: Option<serde_yaml::Value>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a p25 policy: a mapping with `version: 1` and `subscribers`"
)]
pub(super) struct RawPolicy<'t> {
    // Checked by the probe; declared so that it is not an unknown field.
    #[serde(default, rename = "version")]
    pub _version: Option<IgnoredAny>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub defaults: RawDefaults,
    #[serde(default, deserialize_with = "null_as_default")]
    pub interfaces: Vec<RawInterface>,
    #[serde(default, deserialize_with = "null_as_default")]
    #[serde(borrow)]
    pub subscribers: Vec<RawSubscriber<'t>>,
    #[serde(default, deserialize_with = "null_as_default")]
    #[serde(borrow)]
    pub allow: Vec<RawAllow<'t>>,
    #[serde(default)]
    pub allow_empty_subscribers: bool,
    /// List files of subscriber prefixes, relative to the policy file.
    #[serde(default, deserialize_with = "null_as_default")]
    pub subscriber_files: Vec<String>,
    /// List files of allowlist prefixes, relative to the policy file.
    #[serde(default, deserialize_with = "null_as_default")]
    pub allow_files: Vec<String>,
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
    pub ports: Option<Vec<u16>>,
    #[serde(default)]
    pub action: PolicyAction,
    #[serde(default)]
    pub reject_rate: Option<u32>,
    #[serde(default)]
    pub reject_burst: Option<u32>,
}

#[derive(Debug, PartialEq, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "an interface mapping (`name`, `role`, `attach`)"
)]
pub(super) struct RawInterface {
    pub name: String,
    pub role: Role,
    #[serde(default)]
    pub attach: Attach,
}

#[derive(Debug, PartialEq, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a subscriber mapping (`prefix`, optional `mode`, `action`)"
)]
pub(super) struct RawSubscriber<'t> {
    #[serde(borrow)]
    pub prefix: Cow<'t, str>,
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
pub(super) struct RawAllow<'t> {
    #[serde(borrow)]
    pub prefix: Cow<'t, str>,
    #[serde(default, borrow)]
    pub comment: Option<Cow<'t, str>>,
    #[serde(default, borrow)]
    pub owner: Option<Cow<'t, str>>,
    #[serde(default, borrow)]
    pub expires: Option<Cow<'t, str>>,
    #[serde(default)]
    pub max_syn_per_minute: Option<u32>,
    #[serde(default)]
    pub syn_burst: Option<u32>,
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
