//! The daemon in memory: what the `control` fuzz target and the handler's tests run the
//! request handler on, in place of p25d's maps and state file.

use filter_common::abi::AllowValue;
use ipnet::IpNet;

use super::{AllowTables, Host, Parts};
use crate::{
    Error, check_prefix,
    control::{ReloadView, StatsView, StatusView},
    desired::Counts,
    offenders::OffenderView,
    policy::Policy,
    runtime::RuntimeStore,
};

/// Allowlist maps in memory: the fuzz target's and the tests' stand-in for the kernel's.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryTables(pub std::collections::BTreeMap<IpNet, AllowValue>);

impl AllowTables for MemoryTables {
    fn allow_covers(&self, prefix: IpNet) -> Result<bool, Error> {
        Ok(self.0.keys().any(|p| p.contains(&prefix)))
    }
    fn insert_allow(&mut self, prefix: IpNet, value: AllowValue) -> Result<(), Error> {
        self.0.insert(check_prefix(prefix)?, value);
        Ok(())
    }
    fn remove_allow(&mut self, prefix: IpNet) -> Result<bool, Error> {
        Ok(self.0.remove(&check_prefix(prefix)?).is_some())
    }
}

/// A daemon in memory: a policy, its allowlist in [`MemoryTables`] and a runtime store
/// that writes no file. What the handler does with it is what it does in p25d; status,
/// stats and offenders answer fixed views, reload re-applies the same policy.
#[derive(Debug)]
pub struct MemoryHost {
    /// The maps.
    pub tables: MemoryTables,
    /// The runtime allowlist.
    pub runtime: RuntimeStore,
    /// The policy in force.
    pub policy: Policy,
    /// Most runtime entries.
    pub max_runtime_entries: usize,
    /// Generation, bumped by each reload.
    pub generation: u32,
    /// Entry counts, kept by `allow` and `deny` as in p25d.
    pub counts: Counts,
}

impl MemoryHost {
    /// A host with `policy` in force (its allowlist written to the maps).
    pub fn new(policy: Policy, max_runtime_entries: usize) -> Self {
        let tables = MemoryTables(
            policy
                .allow
                .iter()
                .map(|a| {
                    (
                        a.prefix,
                        AllowValue::new(filter_common::abi::Origin::POLICY),
                    )
                })
                .collect(),
        );
        let counts = Counts {
            subscribers: policy.subscribers.len(),
            allow_policy: policy.allow_len(),
            allow_runtime: 0,
        };
        Self {
            tables,
            runtime: RuntimeStore::in_memory(),
            policy,
            max_runtime_entries,
            generation: 1,
            counts,
        }
    }
}

impl Host for MemoryHost {
    type Tables = MemoryTables;

    fn parts(&mut self) -> Parts<'_, MemoryTables> {
        Parts {
            tables: &mut self.tables,
            runtime: &mut self.runtime,
            policy: &self.policy,
            policy_source: "memory.yaml",
            admin_group: "p25-admin",
            max_runtime_entries: self.max_runtime_entries,
            counts: &mut self.counts,
        }
    }

    fn status(&self) -> Result<StatusView, String> {
        Ok(StatusView {
            generation: self.generation,
            allow: self.tables.0.len(),
            runtime_allow: self.runtime.entries().len(),
            subscribers: self.policy.subscribers.len(),
            ..StatusView::default()
        })
    }

    fn stats(&self) -> Result<StatsView, String> {
        Ok(StatsView::default())
    }

    fn reload(&mut self, _reason: &str) -> Result<ReloadView, String> {
        self.generation = self.generation.wrapping_add(1);
        Ok(ReloadView {
            generation: self.generation,
        })
    }

    fn offenders(
        &self,
        _since_secs: Option<u64>,
        _limit: Option<usize>,
    ) -> Result<Vec<OffenderView>, String> {
        Ok(Vec::new())
    }
}
