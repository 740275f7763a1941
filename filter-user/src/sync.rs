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

/// The changes that turn `actual` into `desired`: `(upserts, removals)`. `actual` is
/// sorted here and walked alongside `desired` (both in `IpNet` order), rather than put in
/// a second map: at a million entries that map cost tens of MiB and a second of inserts.
fn diff<V: PartialEq + Copy>(
    mut actual: Vec<(IpNet, V)>,
    desired: &BTreeMap<IpNet, V>,
    report: &mut SyncReport,
) -> (Vec<(IpNet, V)>, Vec<IpNet>) {
    actual.sort_unstable_by_key(|(net, _)| *net);
    let mut upserts = Vec::new();
    let mut removals = Vec::new();
    let mut have = actual.into_iter().peekable();
    for (net, value) in desired {
        // Everything in the maps that sorts before `net` is not wanted.
        while let Some((stale, _)) = have.next_if(|(old, _)| old < net) {
            removals.push(stale);
        }
        match have.next_if(|(old, _)| old == net) {
            None => {
                report.added += 1;
                upserts.push((*net, *value));
            }
            Some((_, old)) if old != *value => {
                report.updated += 1;
                upserts.push((*net, *value));
            }
            Some(_) => {}
        }
    }
    removals.extend(have.map(|(net, _)| net));
    report.removed += removals.len();
    (upserts, removals)
}

/// Applies the difference between the maps and `desired`, in the safe order above.
pub fn reconcile(tables: &mut KernelTables, desired: &Desired) -> Result<SyncReport, Error> {
    let mut report = SyncReport::default();
    // One trie read back at a time, so that only one copy of the maps' content is held.
    let (allow_upserts, allow_removals) =
        diff(tables.allowlist_batched()?, &desired.allow, &mut report);
    let (sub_upserts, sub_removals) = diff(
        tables.subscribers_batched()?,
        &desired.subscribers,
        &mut report,
    );

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
        let d: IpNet = "2001:db9::/32".parse()?;
        // Unsorted, as the kernel returns them.
        let actual = vec![(d, 1), (b, 1), (a, 1)];
        let desired = BTreeMap::from([(b, 2), (c, 1)]);
        let mut report = SyncReport::default();
        let (upserts, removals) = diff(actual, &desired, &mut report);
        assert_eq!(upserts, vec![(b, 2), (c, 1)]);
        assert_eq!(removals, vec![a, d]);
        assert_eq!(
            report,
            SyncReport {
                added: 1,
                updated: 1,
                removed: 2
            }
        );
        Ok(())
    }
}
