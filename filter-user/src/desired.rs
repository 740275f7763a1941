//! What the policy maps should hold: the translation of a [`Policy`] and the runtime
//! allowlist into prefix → value sets and the CONFIG entry, as of a moment (expired
//! entries are left out).
//!
//! Nothing is materialized: a [`Desired`] borrows the policy and the runtime entries and
//! yields its entries in prefix order, so that a million-entry policy is held once (by
//! the daemon, compactly) and two desired states can be compared by walking them side by
//! side (`sync::apply_diff`). The map layout is `sync`'s and `tables`' business; this
//! module only says which prefix should carry which value.
//!
//! A little over 500 lines: the last 200 or so are its unit tests.

use std::{collections::BTreeMap, iter::Peekable, time::SystemTime};

use filter_common::abi::{
    AllowValue, BlockAction, Config, FragmentPolicy, Mode, Origin, SubscriberValue,
};
use ipnet::IpNet;

use crate::{
    policy::{AllowEntry, Policy, Role, SubscriberEntry},
    runtime::RuntimeEntry,
};

/// Daemon settings that end up in CONFIG next to the policy's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// `--offender-v6-prefix`.
    pub offender_v6_prefix: u8,
    /// Events per second for the whole router; 0 when events are off.
    pub events_rate: u32,
    /// Events at once for the whole router; 0 when events are off.
    pub events_burst: u32,
    /// Possible CPUs: the kernel's token buckets are per CPU.
    pub cpus: u32,
}

/// The CONFIG entry for `policy` under `settings`, stamped with `generation`.
pub fn config(policy: &Policy, settings: &Settings, generation: u32) -> Config {
    let cpus = settings.cpus.max(1);
    let (event_rate, event_burst) = if settings.events_rate == 0 && settings.events_burst == 0 {
        (0, 0)
    } else {
        // The kernel's bucket is per CPU; split the operator's total evenly, rounding up
        // so that a small total never becomes zero.
        (
            settings.events_rate.div_ceil(cpus),
            settings.events_burst.div_ceil(cpus).max(1),
        )
    };
    Config {
        mode: policy.defaults.mode.into(),
        fragments: FragmentPolicy::from(policy.defaults.fragments),
        unreadable_tcp: policy.defaults.unreadable_tcp.into(),
        _pad: [0; 3],
        offender_v6_prefix: settings.offender_v6_prefix,
        action: policy.defaults.action.into(),
        generation,
        event_rate,
        event_burst,
        // Per CPU in the kernel, like the event bucket: split the policy's router-wide
        // rate so that a flood spread over every CPU still gets at most about it.
        rst_rate: policy.defaults.reject_rate.div_ceil(cpus),
        rst_burst: policy.defaults.reject_burst.div_ceil(cpus).max(1),
    }
}

/// The dataplane's role for a policy interface role.
pub fn dataplane_role(role: Role) -> filter_common::classify::Role {
    match role {
        Role::Subscriber => filter_common::classify::Role::Subscriber,
        Role::Upstream => filter_common::classify::Role::Upstream,
    }
}

/// The SUBSCRIBERS value of a policy entry: its own mode and action, or "follow CONFIG".
pub fn subscriber_value(entry: &SubscriberEntry) -> SubscriberValue {
    let mode = entry.mode.map_or(Mode::DEFAULT, Mode::from);
    let action = entry.action.map_or(BlockAction::DEFAULT, BlockAction::from);
    SubscriberValue::new(mode).with_action(action)
}

/// The ALLOW value of a policy entry: its origin and SYN limit.
pub fn policy_allow_value(entry: &AllowEntry) -> AllowValue {
    let value = AllowValue::new(Origin::POLICY);
    match entry.syn_limit {
        Some(limit) => value.with_syn_limit(limit.per_minute, limit.burst),
        None => value,
    }
}

/// Whether `policy` allows exactly `prefix` at `now`: a list-file entry, or an inline
/// entry that has not expired. Such a prefix carries the policy's value in the maps, and a
/// runtime entry for it adds nothing. Binary searches: the lists must be sorted, as
/// [`crate::policy::parse`] returns them.
pub fn policy_allows(policy: &Policy, prefix: IpNet, now: SystemTime) -> bool {
    policy.allow_listed.binary_search(&prefix).is_ok()
        || policy
            .allow
            .binary_search_by_key(&prefix, |a| a.prefix)
            .ok()
            .and_then(|i| policy.allow.get(i))
            .is_some_and(|a| !a.is_expired(now))
}

/// Whether a runtime entry counts in [`Counts::allow_runtime`] at `now`: it has not
/// expired and the policy does not allow the same prefix.
pub fn runtime_counts(policy: &Policy, entry: &RuntimeEntry, now: SystemTime) -> bool {
    !entry.expired(now) && !policy_allows(policy, entry.prefix, now)
}

/// How many entries a desired state has, counted once when it is put in force (not per
/// `/metrics` scrape).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    /// Subscriber prefixes.
    pub subscribers: usize,
    /// Allowlist prefixes from the policy (inline and list files), not expired.
    pub allow_policy: usize,
    /// Allowlist prefixes from the runtime list only (not expired, not also in the
    /// policy).
    pub allow_runtime: usize,
}

/// The maps' target state: `policy` and `runtime` as of `now`, with `config`.
///
/// The policy's lists must be sorted by prefix (as [`crate::policy::parse`] returns
/// them); [`Desired::new`] checks that and sorts a copy otherwise.
#[derive(Clone, Debug)]
pub struct Desired<'a> {
    /// The CONFIG entry.
    pub config: Config,
    policy: std::borrow::Cow<'a, Policy>,
    runtime: &'a BTreeMap<IpNet, RuntimeEntry>,
    now: SystemTime,
}

impl<'a> Desired<'a> {
    /// The desired state of `policy` and `runtime` at `now`.
    pub fn new(
        config: Config,
        policy: &'a Policy,
        runtime: &'a BTreeMap<IpNet, RuntimeEntry>,
        now: SystemTime,
    ) -> Self {
        let sorted = policy.subscribers.is_sorted_by_key(|s| s.prefix)
            && policy.allow.is_sorted_by_key(|a| a.prefix)
            && policy.allow_listed.is_sorted();
        let policy = if sorted {
            std::borrow::Cow::Borrowed(policy)
        } else {
            let mut copy = policy.clone();
            copy.sort();
            std::borrow::Cow::Owned(copy)
        };
        Self {
            config,
            policy,
            runtime,
            now,
        }
    }

    /// The moment this state is taken at.
    pub fn now(&self) -> SystemTime {
        self.now
    }

    /// Subscriber prefixes and their values, in prefix order.
    pub fn subscribers(&self) -> impl Iterator<Item = (IpNet, SubscriberValue)> + '_ {
        self.policy
            .subscribers
            .iter()
            .map(|s| (s.prefix, subscriber_value(s)))
    }

    /// Allowlist prefixes and their values, in prefix order: the policy's entries that
    /// have not expired (an inline one carries its SYN limit), then, for prefixes the
    /// policy does not have, the runtime entries that have not expired.
    pub fn allow(&self) -> impl Iterator<Item = (IpNet, AllowValue)> + '_ {
        let now = self.now;
        let inline = self
            .policy
            .allow
            .iter()
            .filter(move |a| !a.is_expired(now))
            .map(|a| (a.prefix, policy_allow_value(a)));
        let listed = self
            .policy
            .allow_listed
            .iter()
            .map(|net| (*net, AllowValue::new(Origin::POLICY)));
        let runtime = self
            .runtime
            .values()
            .filter(move |r| !r.expired(now))
            .map(|r| (r.prefix, r.allow_value()));
        Merge::new(Merge::new(inline, listed), runtime)
    }

    /// The value `prefix` should have in the allowlist, if any.
    pub fn allow_value(&self, prefix: IpNet) -> Option<AllowValue> {
        let policy = &self.policy;
        if let Ok(i) = policy.allow.binary_search_by_key(&prefix, |a| a.prefix) {
            let entry = policy.allow.get(i)?;
            if !entry.is_expired(self.now) {
                return Some(policy_allow_value(entry));
            }
        }
        if policy.allow_listed.binary_search(&prefix).is_ok() {
            return Some(AllowValue::new(Origin::POLICY));
        }
        self.runtime
            .get(&prefix)
            .filter(|r| !r.expired(self.now))
            .map(RuntimeEntry::allow_value)
    }

    /// Counts the entries: the inline allowlist and the runtime entries are walked (they
    /// are short), the lists from files are only measured. Call it when the state is put
    /// in force and cache the result.
    pub fn counts(&self) -> Counts {
        let policy = &self.policy;
        let inline = policy
            .allow
            .iter()
            .filter(|a| !a.is_expired(self.now))
            .count();
        Counts {
            subscribers: policy.subscribers.len(),
            allow_policy: inline + policy.allow_listed.len(),
            allow_runtime: self
                .runtime
                .values()
                .filter(|r| runtime_counts(policy, r, self.now))
                .count(),
        }
    }
}

/// When entries of a policy in force expire: the inline allowlist's expiries, sorted once
/// when the policy is put in force (list files carry no expiry, so this is short). The
/// daemon asks for the next one on every turn of its loop, so this never walks the policy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Expiries(Vec<SystemTime>);

impl Expiries {
    /// The expiries of `policy`.
    pub fn of(policy: &Policy) -> Self {
        let mut at: Vec<SystemTime> = policy.allow.iter().filter_map(|a| a.expires).collect();
        at.sort_unstable();
        Self(at)
    }

    /// The first moment after `after` at which a policy entry or one of `runtime` (few:
    /// capped by --max-runtime-entries) expires: when the maps must change next without
    /// anyone asking.
    pub fn next_after(
        &self,
        after: SystemTime,
        runtime: &BTreeMap<IpNet, RuntimeEntry>,
    ) -> Option<SystemTime> {
        let policy = self
            .0
            .get(self.0.partition_point(|at| *at <= after))
            .copied();
        let runtime = runtime
            .values()
            .filter_map(|r| r.expires_unix)
            .map(|secs| SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs))
            .filter(|at| *at > after)
            .min();
        policy.into_iter().chain(runtime).min()
    }
}

/// Two iterators sorted by prefix, merged; on a prefix both have, the left one's entry
/// wins and the right one's is skipped.
struct Merge<L: Iterator, R: Iterator> {
    left: Peekable<L>,
    right: Peekable<R>,
}

impl<L, R, V> Merge<L, R>
where
    L: Iterator<Item = (IpNet, V)>,
    R: Iterator<Item = (IpNet, V)>,
{
    fn new(left: L, right: R) -> Self {
        Self {
            left: left.peekable(),
            right: right.peekable(),
        }
    }
}

impl<L, R, V> Iterator for Merge<L, R>
where
    L: Iterator<Item = (IpNet, V)>,
    R: Iterator<Item = (IpNet, V)>,
{
    type Item = (IpNet, V);

    fn next(&mut self) -> Option<Self::Item> {
        match (self.left.peek(), self.right.peek()) {
            (Some((l, _)), Some((r, _))) if r < l => self.right.next(),
            (Some((l, _)), Some((r, _))) if r == l => {
                self.right.next();
                self.left.next()
            }
            (Some(_), _) => self.left.next(),
            (None, _) => self.right.next(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::policy::{PolicyAction, PolicyMode, SynRateLimit};

    fn net(s: &str) -> IpNet {
        s.parse()
            .unwrap_or_else(|_| IpNet::from(std::net::IpAddr::from([0_u8; 4])))
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn policy() -> Policy {
        let mut policy = Policy::empty();
        policy.subscribers = vec![
            SubscriberEntry {
                prefix: net("100.64.0.0/10"),
                mode: None,
                action: None,
            },
            SubscriberEntry {
                prefix: net("2001:db8::/32"),
                mode: Some(PolicyMode::Monitor),
                action: Some(PolicyAction::Reject),
            },
        ];
        policy.allow = vec![
            AllowEntry {
                syn_limit: Some(SynRateLimit {
                    per_minute: 60,
                    burst: 5,
                }),
                ..AllowEntry::listed(net("100.64.0.1/32"))
            },
            AllowEntry {
                expires: Some(at(1_000)),
                ..AllowEntry::listed(net("100.64.0.3/32"))
            },
        ];
        policy.allow_listed = vec![net("100.64.0.2/32"), net("2001:db8::2/128")];
        policy
    }

    fn runtime(entries: &[(&str, Option<u64>)]) -> BTreeMap<IpNet, RuntimeEntry> {
        entries
            .iter()
            .map(|(prefix, expires)| {
                let prefix = net(prefix);
                let entry = RuntimeEntry {
                    prefix,
                    comment: None,
                    added_unix: 0,
                    expires_unix: *expires,
                    max_syn_per_minute: None,
                    syn_burst: None,
                };
                (prefix, entry)
            })
            .collect()
    }

    #[test]
    fn allow_merges_inline_listed_and_runtime_in_prefix_order() {
        let policy = policy();
        // 100.64.0.2 is listed and also runtime: the policy's value wins.
        let runtime = runtime(&[("100.64.0.2/32", None), ("100.64.0.9/32", Some(2_000))]);
        let desired = Desired::new(Config::default(), &policy, &runtime, at(500));
        let got: Vec<(String, Origin, u32)> = desired
            .allow()
            .map(|(n, v)| (n.to_string(), v.origin, v.syn_per_minute))
            .collect();
        let want = [
            ("100.64.0.1/32", Origin::POLICY, 60),
            ("100.64.0.2/32", Origin::POLICY, 0),
            ("100.64.0.3/32", Origin::POLICY, 0),
            ("100.64.0.9/32", Origin::RUNTIME, 0),
            ("2001:db8::2/128", Origin::POLICY, 0),
        ]
        .map(|(n, o, s)| (n.to_owned(), o, s));
        assert_eq!(got, want);
        assert_eq!(
            desired.counts(),
            Counts {
                subscribers: 2,
                allow_policy: 4,
                allow_runtime: 1
            }
        );
        let expiries = Expiries::of(&policy);
        assert_eq!(expiries.next_after(at(500), &runtime), Some(at(1_000)));
        assert_eq!(expiries.next_after(at(1_000), &runtime), Some(at(2_000)));
        assert_eq!(
            desired
                .allow_value(net("100.64.0.1/32"))
                .map(|v| v.syn_burst),
            Some(5)
        );
        assert_eq!(desired.allow_value(net("100.64.0.7/32")), None);
    }

    #[test]
    fn expired_entries_leave_the_desired_state() {
        let policy = policy();
        let runtime = runtime(&[("100.64.0.9/32", Some(2_000))]);
        let later = Desired::new(Config::default(), &policy, &runtime, at(2_000));
        let prefixes: Vec<String> = later.allow().map(|(n, _)| n.to_string()).collect();
        assert_eq!(
            prefixes,
            ["100.64.0.1/32", "100.64.0.2/32", "2001:db8::2/128"]
        );
        assert_eq!(Expiries::of(&policy).next_after(at(2_000), &runtime), None);
        assert_eq!(later.allow_value(net("100.64.0.3/32")), None);
    }

    #[test]
    fn subscriber_values_and_config_follow_the_policy() {
        let mut policy = policy();
        // Unsorted input is sorted, not misread.
        policy.subscribers.reverse();
        let runtime = BTreeMap::new();
        let settings = Settings {
            offender_v6_prefix: 64,
            events_rate: 100,
            events_burst: 1,
            cpus: 3,
        };
        let config = config(&policy, &settings, 7);
        assert_eq!(
            (config.generation, config.event_rate, config.event_burst),
            (7, 34, 1)
        );
        assert_eq!(config.rst_rate, 34);
        let desired = Desired::new(config, &policy, &runtime, at(0));
        let subs: Vec<(String, Mode, BlockAction)> = desired
            .subscribers()
            .map(|(n, v)| (n.to_string(), v.mode, v.action))
            .collect();
        assert_eq!(
            subs,
            [
                (
                    "100.64.0.0/10".to_owned(),
                    Mode::DEFAULT,
                    BlockAction::DEFAULT
                ),
                (
                    "2001:db8::/32".to_owned(),
                    Mode::MONITOR,
                    BlockAction::REJECT
                ),
            ]
        );
        let off = Settings {
            events_rate: 0,
            events_burst: 0,
            ..settings
        };
        let config = super::config(&policy, &off, 1);
        assert_eq!((config.event_rate, config.event_burst), (0, 0));
    }

    #[test]
    fn policy_allows_and_runtime_counts_agree_with_counts() {
        let policy = policy();
        // Listed (never expires), inline, inline until 1 000, and one the policy lacks.
        for (prefix, before, after) in [
            ("100.64.0.2/32", true, true),
            ("100.64.0.1/32", true, true),
            ("100.64.0.3/32", true, false),
            ("100.64.0.7/32", false, false),
        ] {
            assert_eq!(
                policy_allows(&policy, net(prefix), at(999)),
                before,
                "{prefix}"
            );
            assert_eq!(
                policy_allows(&policy, net(prefix), at(1_000)),
                after,
                "{prefix}"
            );
        }
        let runtime = runtime(&[
            ("100.64.0.3/32", None),
            ("100.64.0.7/32", None),
            ("100.64.0.8/32", Some(900)),
        ]);
        for now in [at(0), at(999), at(1_000)] {
            let counted = runtime
                .values()
                .filter(|r| runtime_counts(&policy, r, now))
                .count();
            let desired = Desired::new(Config::default(), &policy, &runtime, now);
            assert_eq!(counted, desired.counts().allow_runtime, "{now:?}");
        }
        // 100.64.0.3 counts as runtime once the policy's entry for it has expired.
        let desired = Desired::new(Config::default(), &policy, &runtime, at(1_000));
        assert_eq!(desired.counts().allow_runtime, 2);
    }

    #[test]
    fn dataplane_roles_follow_the_policy_roles() {
        use filter_common::classify::Role as Dataplane;
        assert_eq!(dataplane_role(Role::Subscriber), Dataplane::Subscriber);
        assert_eq!(dataplane_role(Role::Upstream), Dataplane::Upstream);
    }
}
