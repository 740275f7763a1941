//! Policy sync: reconcile what the maps hold with what they should hold.
//!
//! Never clear-and-refill: the maps are live. The diff is applied as
//! 1. insert new and changed allowlist entries (a relay is allowed before anything else
//!    changes, so no authorized relay is ever missing),
//! 2. insert new and changed subscriber prefixes,
//! 3. write the global config (mode, fragments, generation),
//! 4. remove stale subscriber prefixes,
//! 5. remove stale allowlist entries.
//!
//! Every step is an atomic per-entry map update, so at no instant does a packet see a
//! state that is neither the old policy nor on the way to the new one in the safe
//! direction. The steps use the kernel's batch commands where it has them (the LPM trie's
//! generic batch operations still apply one entry at a time, under the same per-entry
//! atomicity), which turns a million-entry reconcile from millions of syscalls into
//! hundreds.

use std::collections::BTreeMap;

use filter_common::abi::{AllowValue, Config, SubscriberValue};
use ipnet::IpNet;

use crate::{Error, KernelTables};

/// What the maps should hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    /// The CONFIG entry.
    pub config: Config,
    /// Subscriber prefixes.
    pub subscribers: BTreeMap<IpNet, SubscriberValue>,
    /// Allowlist prefixes (policy and runtime merged).
    pub allow: BTreeMap<IpNet, AllowValue>,
}

/// What a reconcile changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SyncReport {
    /// Entries inserted.
    pub added: usize,
    /// Entries whose value changed.
    pub updated: usize,
    /// Entries removed.
    pub removed: usize,
}

impl SyncReport {
    /// Whether anything changed.
    pub fn changed(&self) -> bool {
        self.added + self.updated + self.removed > 0
    }
}

/// The changes that turn `actual` into `desired`: `(upserts, removals)`.
fn diff<V: PartialEq + Copy>(
    actual: &BTreeMap<IpNet, V>,
    desired: &BTreeMap<IpNet, V>,
    report: &mut SyncReport,
) -> (Vec<(IpNet, V)>, Vec<IpNet>) {
    let mut upserts = Vec::new();
    for (net, value) in desired {
        match actual.get(net) {
            None => {
                report.added += 1;
                upserts.push((*net, *value));
            }
            Some(old) if old != value => {
                report.updated += 1;
                upserts.push((*net, *value));
            }
            Some(_) => {}
        }
    }
    let removals: Vec<IpNet> = actual
        .keys()
        .filter(|net| !desired.contains_key(net))
        .copied()
        .collect();
    report.removed += removals.len();
    (upserts, removals)
}

/// Applies the difference between the maps and `desired`, in the safe order above.
pub fn reconcile(tables: &mut KernelTables, desired: &Desired) -> Result<SyncReport, Error> {
    let mut report = SyncReport::default();
    let actual_allow: BTreeMap<_, _> = tables.allowlist_batched()?.into_iter().collect();
    let actual_subscribers: BTreeMap<_, _> = tables.subscribers_batched()?.into_iter().collect();
    let (allow_upserts, allow_removals) = diff(&actual_allow, &desired.allow, &mut report);
    let (sub_upserts, sub_removals) = diff(&actual_subscribers, &desired.subscribers, &mut report);

    tables.insert_allow_many(&allow_upserts)?;
    tables.insert_subscribers_many(&sub_upserts)?;
    if tables.config()? != desired.config {
        tables.set_config(desired.config)?;
    }
    tables.remove_subscribers_many(&sub_removals)?;
    tables.remove_allow_many(&allow_removals)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_counts_adds_updates_and_removals() -> Result<(), ipnet::AddrParseError> {
        let a: IpNet = "100.64.0.0/24".parse()?;
        let b: IpNet = "100.64.1.0/24".parse()?;
        let c: IpNet = "2001:db8::/32".parse()?;
        let actual = BTreeMap::from([(a, 1), (b, 1)]);
        let desired = BTreeMap::from([(b, 2), (c, 1)]);
        let mut report = SyncReport::default();
        let (upserts, removals) = diff(&actual, &desired, &mut report);
        assert_eq!(upserts, vec![(b, 2), (c, 1)]);
        assert_eq!(removals, vec![a]);
        assert_eq!(
            report,
            SyncReport {
                added: 1,
                updated: 1,
                removed: 1
            }
        );
        Ok(())
    }
}
