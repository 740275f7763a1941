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
//! direction.
//!
//! Two ways to find the difference: [`apply_diff`] compares the desired state with the
//! one last put in force (a reload, an expiry: no map is read), and [`reconcile`] reads
//! the maps back and compares them with the desired state (start-up, and the periodic
//! resync that repairs drift made behind p25d's back, such as an entry deleted with
//! bpftool).
//!
//! A full allowlist map (the kernel refuses an insert with E2BIG or ENOSPC) does not stop
//! the rest: the subscriber changes, CONFIG and the removals still apply, the refused
//! inserts are tried again once the removals made room, and what still does not fit is
//! counted in [`SyncReport::allow_not_inserted`] for the caller to report.
//!
//! The steps use the kernel's batch commands where it has them (the LPM trie's generic
//! batch operations still apply one entry at a time, under the same per-entry atomicity),
//! which turns a million-entry reconcile from millions of syscalls into hundreds. A
//! reconcile reads the allowlist maps back (the IPv4 and IPv6 ones in parallel), diffs and
//! drops that copy before it reads the subscriber maps, so it never holds both read-backs.

use std::io;

use aya::maps::MapError;
use filter_common::abi::{AllowValue, SubscriberValue};
use ipnet::IpNet;

use crate::{Error, KernelTables, desired::Desired};

/// What a reconcile changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SyncReport {
    /// Entries inserted.
    pub added: usize,
    /// Entries whose value changed.
    pub updated: usize,
    /// Entries removed.
    pub removed: usize,
    /// Allowlist entries that are wanted but not in the maps because the allowlist map is
    /// full. Everything else was applied.
    pub allow_not_inserted: usize,
}

impl SyncReport {
    /// Whether anything changed.
    pub fn changed(&self) -> bool {
        self.added + self.updated + self.removed > 0
    }
}

/// The changes that turn `have` into `want`, both sorted by prefix: `(upserts,
/// removals)`. Walked side by side, so neither side is copied into a map: at a million
/// entries a map cost tens of MiB and a second of inserts.
pub(crate) fn diff<V: PartialEq + Copy>(
    have: impl Iterator<Item = (IpNet, V)>,
    want: impl Iterator<Item = (IpNet, V)>,
    report: &mut SyncReport,
) -> (Vec<(IpNet, V)>, Vec<IpNet>) {
    let mut upserts = Vec::new();
    let mut removals = Vec::new();
    let mut have = have.peekable();
    for (net, value) in want {
        // Everything held that sorts before `net` is not wanted.
        while let Some((stale, _)) = have.next_if(|(old, _)| *old < net) {
            removals.push(stale);
        }
        match have.next_if(|(old, _)| *old == net) {
            None => {
                report.added += 1;
                upserts.push((net, value));
            }
            Some((_, old)) if old != value => {
                report.updated += 1;
                upserts.push((net, value));
            }
            Some(_) => {}
        }
    }
    removals.extend(have.map(|(net, _)| net));
    report.removed += removals.len();
    (upserts, removals)
}

/// The map changes of one reconcile, in the order they are applied.
#[derive(Debug, Default)]
struct Plan {
    allow_upserts: Vec<(IpNet, AllowValue)>,
    sub_upserts: Vec<(IpNet, SubscriberValue)>,
    sub_removals: Vec<IpNet>,
    allow_removals: Vec<IpNet>,
}

/// Whether `error` is the kernel refusing an insert into a full map.
pub fn is_map_full(error: &Error) -> bool {
    let Error::Map {
        source: MapError::SyscallError(e),
        ..
    } = error
    else {
        return false;
    };
    matches!(e.io_error.raw_os_error(), Some(libc::E2BIG | libc::ENOSPC))
        || e.io_error.kind() == io::ErrorKind::StorageFull
}

/// Applies `plan` in the safe order above, then `config` if given.
fn execute(
    tables: &mut KernelTables,
    plan: &Plan,
    config: Option<filter_common::abi::Config>,
    report: &mut SyncReport,
) -> Result<(), Error> {
    let full = match tables.insert_allow_many(&plan.allow_upserts) {
        Ok(()) => false,
        Err(e) if is_map_full(&e) => true,
        Err(e) => return Err(e),
    };
    tables.insert_subscribers_many(&plan.sub_upserts)?;
    if let Some(config) = config {
        tables.set_config(config)?;
    }
    tables.remove_subscribers_many(&plan.sub_removals)?;
    tables.remove_allow_many(&plan.allow_removals)?;
    if full {
        // The removals may have made room. Entry by entry, so that what still does not
        // fit is counted exactly (this is the rare path of an over-full policy).
        for &(net, value) in &plan.allow_upserts {
            match tables.insert_allow(net, value) {
                Ok(()) => {}
                Err(e) if is_map_full(&e) => report.allow_not_inserted += 1,
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// Reads the maps back and applies the difference to `desired`, in the safe order above.
pub fn reconcile(tables: &mut KernelTables, desired: &Desired) -> Result<SyncReport, Error> {
    let mut report = SyncReport::default();
    let mut have = tables.allowlist()?;
    have.sort_unstable_by_key(|(net, _)| *net);
    let (allow_upserts, allow_removals) = diff(have.into_iter(), desired.allow(), &mut report);
    // The subscriber hashes and SUB_LENGTHS are derived from the tries: repaired first,
    // so that the diff below (against the tries) leaves all three in line.
    let have = tables.repair_subscriber_index()?;
    let (sub_upserts, sub_removals) = diff(have.into_iter(), desired.subscribers(), &mut report);
    let plan = Plan {
        allow_upserts,
        sub_upserts,
        sub_removals,
        allow_removals,
    };
    let config = (tables.config()? != desired.config).then_some(desired.config);
    execute(tables, &plan, config, &mut report)?;
    Ok(report)
}

/// Applies the difference between `old`, the state last put in force, and `new`, without
/// reading the maps. Only correct if the maps hold `old`: after an error, or with
/// [`SyncReport::allow_not_inserted`] above zero, the next change must be a
/// [`reconcile`].
pub fn apply_diff(
    tables: &mut KernelTables,
    old: &Desired,
    new: &Desired,
) -> Result<SyncReport, Error> {
    let mut report = SyncReport::default();
    let (allow_upserts, allow_removals) = diff(old.allow(), new.allow(), &mut report);
    let (sub_upserts, sub_removals) = diff(old.subscribers(), new.subscribers(), &mut report);
    let plan = Plan {
        allow_upserts,
        sub_upserts,
        sub_removals,
        allow_removals,
    };
    let config = (old.config != new.config).then_some(new.config);
    execute(tables, &plan, config, &mut report)?;
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
        let have = vec![(a, 1), (b, 1), (d, 1)];
        let want = vec![(b, 2), (c, 1)];
        let mut report = SyncReport::default();
        let (upserts, removals) = diff(have.into_iter(), want.into_iter(), &mut report);
        assert_eq!(upserts, vec![(b, 2), (c, 1)]);
        assert_eq!(removals, vec![a, d]);
        assert_eq!(
            report,
            SyncReport {
                added: 1,
                updated: 1,
                removed: 2,
                allow_not_inserted: 0,
            }
        );
        Ok(())
    }

    #[test]
    fn a_full_map_is_recognized_by_its_errno() {
        let full = |errno| Error::Map {
            name: "ALLOW_V4",
            source: MapError::SyscallError(aya::sys::SyscallError {
                call: "bpf_map_update_batch",
                io_error: io::Error::from_raw_os_error(errno),
            }),
        };
        assert!(is_map_full(&full(libc::E2BIG)));
        assert!(is_map_full(&full(libc::ENOSPC)));
        assert!(!is_map_full(&full(libc::EPERM)));
        assert!(!is_map_full(&Error::MissingMap("ALLOW_V4")));
    }
}
