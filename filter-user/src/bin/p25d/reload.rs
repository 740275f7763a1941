//! The state in force and how it changes: a reload puts a new policy in force, the expiry
//! timer takes expired entries out, the resync repairs drift. All three go through
//! [`Maps::update`]: the desired state (`filter_user::desired`) brought into the maps by
//! `filter_user::sync`, by the difference when the maps are known to match the state
//! last put in force, by reading them back otherwise.

use std::time::{Duration, SystemTime};

use anyhow::{Context as _, Result};
use filter_user::{
    Dataplane, KernelTables,
    control::{MAX_ERROR, ReloadView, handler::Parts, shorten},
    desired::{self, Counts, Desired, Expiries},
    loader::PinLayout,
    policy::Policy,
    runtime::RuntimeStore,
    sync::{self, SyncReport},
};
use tracing::{error, info, warn};

use crate::{interfaces::Interfaces, source::PolicySource, startup};

/// How the daemon has fared, for status and metrics.
#[derive(Debug, Default)]
pub struct Health {
    /// Policies put in force by a reload.
    pub reloads_ok: u64,
    /// Reloads that failed (a rejected policy, or maps that could not be updated).
    pub reloads_failed: u64,
    /// The last failure, until a reload succeeds.
    pub last_error: Option<String>,
    /// Unix time of the last successful update of the maps (for the staleness alert).
    pub last_sync_unix: f64,
}

/// What the maps hold: the policy last put in force, as of when.
struct InForce {
    policy: Policy,
    generation: u32,
    /// The moment the desired state now in the maps was taken at (expired entries as of
    /// then are not in them).
    applied_at: SystemTime,
    /// Entry counts, counted when the state was put in force and kept by allow and deny.
    counts: Counts,
    /// Allowlist entries the last update could not insert because the map is full.
    allow_not_inserted: usize,
    /// When the policy's entries expire.
    expiries: Expiries,
}

/// The policy maps, the runtime allowlist, and the state in force in them. The only
/// writer of the maps.
pub struct Maps {
    /// The pinned maps.
    pub tables: KernelTables,
    /// The runtime allowlist (`p25ctl allow`), persisted.
    pub runtime: RuntimeStore,
    settings: desired::Settings,
    in_force: InForce,
    /// Whether the maps may differ from the state last put in force (start-up, a failed
    /// or partial update): the next change then reads them back instead of diffing.
    dirty: bool,
    /// Whether the last expiry update failed: the timer then waits before retrying.
    expiry_failed: bool,
    /// Reload and sync outcomes.
    pub health: Health,
}

impl Maps {
    /// Maps whose content is unknown (adopted pins, an older p25d): the first update
    /// reads them back. `generation` is the one CONFIG holds now.
    pub fn new(
        tables: KernelTables,
        runtime: RuntimeStore,
        settings: desired::Settings,
        generation: u32,
    ) -> Self {
        Self {
            tables,
            runtime,
            settings,
            in_force: InForce {
                // Replaced by the first apply; a copy of a million-entry policy just for
                // this would double the daemon's peak memory.
                policy: Policy::empty(),
                generation,
                applied_at: SystemTime::UNIX_EPOCH,
                counts: Counts::default(),
                allow_not_inserted: 0,
                expiries: Expiries::default(),
            },
            dirty: true,
            expiry_failed: false,
            health: Health::default(),
        }
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        &self.in_force.policy
    }

    /// The generation in force.
    pub fn generation(&self) -> u32 {
        self.in_force.generation
    }

    /// Entry counts of the state in force.
    pub fn counts(&self) -> Counts {
        self.in_force.counts
    }

    /// Allowlist entries the last update could not insert (the map is full).
    pub fn allow_not_inserted(&self) -> usize {
        self.in_force.allow_not_inserted
    }

    /// Allowlist entries in the maps: from the counts of the state in force, not by
    /// walking a million map entries per call; drift behind p25d's back is repaired by
    /// the resync.
    pub fn allow_in_maps(&self) -> usize {
        let counts = self.in_force.counts;
        (counts.allow_policy + counts.allow_runtime)
            .saturating_sub(self.in_force.allow_not_inserted)
    }

    /// What the control handler reads and writes.
    pub fn parts<'a>(
        &'a mut self,
        policy_source: &'a str,
        admin_group: &'a str,
        max_runtime_entries: usize,
    ) -> Parts<'a, KernelTables> {
        Parts {
            tables: &mut self.tables,
            runtime: &mut self.runtime,
            policy: &self.in_force.policy,
            policy_source,
            admin_group,
            max_runtime_entries,
            counts: &mut self.in_force.counts,
        }
    }

    /// Takes over the links of older ABI versions (see
    /// [`startup::migrate_older_versions`]). Only after [`Self::put_in_force`] has filled
    /// this version's maps with the policy the links will filter with, and before the
    /// interfaces are synced.
    pub fn migrate(&mut self, layout: &PinLayout, dataplane: &mut Dataplane) -> Result<()> {
        startup::migrate_older_versions(
            layout,
            dataplane,
            &mut self.tables,
            &self.in_force.policy,
            self.in_force.counts,
        )
    }

    /// Brings the maps from the state last put in force to `new` (`None`: the policy in
    /// force) at `now`: by the difference, or by reading the maps back if they may have
    /// drifted. Records what is then in force; installing a new policy is the caller's.
    fn update(
        &mut self,
        new: Option<&Policy>,
        generation: u32,
        now: SystemTime,
    ) -> Result<SyncReport> {
        let runtime = self.runtime.entries();
        let old = &self.in_force;
        let new = new.unwrap_or(&old.policy);
        let config = desired::config(new, &self.settings, generation);
        let target = Desired::new(config, new, runtime, now);
        let result = if self.dirty {
            sync::reconcile(&mut self.tables, &target)
        } else {
            let config = desired::config(&old.policy, &self.settings, old.generation);
            let before = Desired::new(config, &old.policy, runtime, old.applied_at);
            sync::apply_diff(&mut self.tables, &before, &target)
        };
        let counts = target.counts();
        drop(target);
        let report = match result {
            Ok(report) => report,
            Err(e) => {
                self.dirty = true;
                return Err(e).context("updating the maps");
            }
        };
        self.in_force.counts = counts;
        self.in_force.applied_at = now;
        self.in_force.allow_not_inserted = report.allow_not_inserted;
        // What did not fit is retried (by reading the maps back) at the next change.
        self.dirty = report.allow_not_inserted > 0;
        if report.allow_not_inserted > 0 {
            let message = format!(
                "the allowlist map is full: {} allowlist entries are not in the maps (the \
                 other changes are); remove entries or raise the capacity",
                report.allow_not_inserted
            );
            error!(not_inserted = report.allow_not_inserted, "{message}");
            self.health.last_error = Some(message);
        }
        self.health.last_sync_unix = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        Ok(report)
    }

    /// Puts `policy` in force in the maps under the next generation. Only errors of the
    /// maps themselves fail it; the interfaces are the caller's (see [`apply`]).
    pub fn put_in_force(&mut self, policy: Policy) -> Result<SyncReport> {
        let generation = self.in_force.generation.wrapping_add(1);
        let report = self.update(Some(&policy), generation, SystemTime::now())?;
        self.in_force.generation = generation;
        self.in_force.expiries = Expiries::of(&policy);
        // The old policy goes only now: it was the "before" of the difference.
        self.in_force.policy = policy;
        filter_user::sys::release_free_memory();
        Ok(report)
    }

    /// How long until the next entry of the state in force expires (an hour if none, at
    /// most an hour so that a clock step is noticed). Asked on every turn of the loop.
    pub fn next_expiry_in(&self) -> Duration {
        const IDLE: Duration = Duration::from_secs(3600);
        const RETRY: Duration = Duration::from_secs(5);
        let next = self
            .in_force
            .expiries
            .next_after(self.in_force.applied_at, self.runtime.entries());
        let wait = next.map_or(IDLE, |at| {
            at.duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO)
        });
        if self.expiry_failed {
            wait.max(RETRY).min(IDLE)
        } else {
            wait.min(IDLE)
        }
    }

    /// Takes what has expired out of the maps (the difference between the state in force
    /// and the same state now), then out of the runtime store.
    pub fn expire_due(&mut self) {
        let now = SystemTime::now();
        let result = self.update(None, self.in_force.generation, now);
        self.expiry_failed = result.is_err();
        match result {
            Ok(report) if report.changed() => {
                info!(
                    removed = report.removed,
                    updated = report.updated,
                    "expired allowlist entries left the maps"
                );
            }
            Ok(_) => {}
            Err(e) => {
                error!(error = %format!("{e:#}"), "removing expired entries failed; the next resync retries")
            }
        }
        match self.runtime.expire(now) {
            Ok(expired) => {
                for entry in expired {
                    info!(prefix = %entry.prefix, "runtime allow entry expired");
                }
            }
            Err(e) => error!(error = %e, "expiring runtime entries failed"),
        }
    }

    /// Periodic repair: read the maps back and re-apply the state in force, so drift
    /// (say, an entry deleted with bpftool, or a runtime entry whose write failed) does
    /// not persist.
    pub fn resync(&mut self) {
        self.expire_due();
        self.dirty = true;
        match self.update(None, self.in_force.generation, SystemTime::now()) {
            Ok(report) if report.changed() => {
                info!(
                    added = report.added,
                    updated = report.updated,
                    removed = report.removed,
                    "resync repaired drift"
                );
            }
            Ok(_) => {}
            Err(e) => error!(error = %e, "resync failed"),
        }
    }
}

/// Puts `policy` in force: reconcile the maps, bump the generation, attach its
/// interfaces.
pub fn apply(
    maps: &mut Maps,
    interfaces: &mut Interfaces,
    policy: Policy,
    reason: &str,
) -> Result<()> {
    let report = maps.put_in_force(policy)?;
    interfaces.sync(maps.policy());
    log_in_force(maps, &report, reason);
    Ok(())
}

/// Logs the policy now in force and what putting it in force changed.
pub fn log_in_force(maps: &Maps, report: &SyncReport, reason: &str) {
    let counts = maps.counts();
    info!(
        reason,
        generation = maps.generation(),
        added = report.added,
        updated = report.updated,
        removed = report.removed,
        subscribers = counts.subscribers,
        allow = counts.allow_policy + counts.allow_runtime,
        allow_not_inserted = report.allow_not_inserted,
        "policy in force"
    );
}

/// Reads the policy from `source` and puts it in force. A rejected policy is counted and
/// reported; the policy in force stays.
pub fn reload(
    source: &mut dyn PolicySource,
    maps: &mut Maps,
    interfaces: &mut Interfaces,
    reason: &str,
) -> Result<ReloadView, String> {
    let checked = match source.load(maps.policy()) {
        Ok(checked) => checked,
        Err(message) => {
            maps.health.reloads_failed += 1;
            error!(reason, error = %message, generation = maps.generation(), "policy rejected; the previous policy stays in force");
            maps.health.last_error = Some(shorten(message.clone(), MAX_ERROR));
            return Err(message);
        }
    };
    for warning in &checked.warnings {
        warn!(%warning, "policy warning");
    }
    maps.health.last_error = None;
    let result = apply(maps, interfaces, checked.policy, reason).map_err(|e| format!("{e:#}"));
    source.applied(result.as_ref().copied().map_err(String::as_str));
    match result {
        Ok(()) => {
            maps.health.reloads_ok += 1;
            Ok(ReloadView {
                generation: maps.generation(),
            })
        }
        Err(message) => {
            maps.health.reloads_failed += 1;
            error!(reason, error = %message, "applying the policy failed");
            maps.health.last_error = Some(shorten(message.clone(), MAX_ERROR));
            Err(message)
        }
    }
}
