//! Following the fleet state in etcd, as a pure state machine: the p25d side feeds it
//! what etcd said ([`Event`]) and does what it answers ([`Step`]), so that every rule of
//! the consistency model is tested here without an etcd.
//!
//! The rules (docs/fleet.md, "Consistency model"):
//! - The state comes from one full read at one revision (an [`Event::Full`]); a watch
//!   then starts at that revision + 1 and its changes are applied in order.
//! - Until a full read has completed, watch changes are ignored: a router that starts
//!   from its snapshot never deletes what the snapshot holds on the word of a partial
//!   view. A full read replaces the state whole, deletions included.
//! - A watch cancelled because its start revision was compacted away asks for a new full
//!   read ([`Step::ReadAll`]); the state in force stays until that read completes.
//! - A broken connection changes nothing in force; the router reconnects, reads in full
//!   again and watches from there (also after a reconnect, never from a stale revision).

use std::collections::BTreeMap;

use super::keys::{Key, Layout};

/// A key and its value, as etcd returns them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kv {
    /// The key.
    pub key: Vec<u8>,
    /// The value.
    pub value: Vec<u8>,
    /// The revision of its last change.
    pub mod_revision: i64,
}

/// One change seen by the watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// A put.
    Put(Kv),
    /// A delete, at `mod_revision`.
    Delete {
        /// The key.
        key: Vec<u8>,
        /// The revision of the delete.
        mod_revision: i64,
    },
}

/// What etcd said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A full read of the fleet's keys, at `revision`.
    Full {
        /// The revision the read was served at.
        revision: i64,
        /// Every key under the prefix.
        kvs: Vec<Kv>,
    },
    /// One watch response's changes, in revision order.
    Changes(Vec<Change>),
    /// The watch was cancelled: its start revision is older than `compact_revision`.
    Compacted {
        /// The oldest revision etcd still has.
        compact_revision: i64,
    },
    /// The connection to etcd broke (or could not be made).
    Down,
}

/// What the caller does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing changed.
    Nothing,
    /// The fleet state changed: compose and apply it.
    Apply,
    /// Only the revision moved (a change to a key that does not concern this router):
    /// report it, nothing to apply.
    Advance,
    /// Read everything again and restart the watch after it.
    ReadAll,
}

/// The fleet state as this router sees it: raw values, checked when composed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct State {
    /// The revision the state is complete at.
    pub revision: i64,
    /// `<prefix>/policy`.
    pub policy: Option<String>,
    /// `<prefix>/routers/<this router>/interfaces`.
    pub interfaces: Option<String>,
    /// `<prefix>/allow/<name>` by name, raw.
    pub allow: BTreeMap<String, Vec<u8>>,
}

/// Follows the fleet state for one router.
#[derive(Debug)]
pub struct Follower {
    layout: Layout,
    router: String,
    state: State,
    /// Whether a full read completed since the last connection or compaction.
    synced: bool,
    /// The revision of the full read the current watch started after.
    read_at: i64,
}

impl Follower {
    /// A follower with no state yet (or the state of a snapshot, see
    /// [`Follower::with_state`]).
    pub fn new(layout: Layout, router: &str) -> Self {
        Self::with_state(layout, router, State::default())
    }

    /// A follower that starts from `state` (a snapshot), not yet synced.
    pub fn with_state(layout: Layout, router: &str, state: State) -> Self {
        Self {
            layout,
            router: router.to_owned(),
            state,
            synced: false,
            read_at: 0,
        }
    }

    /// The state as of [`State::revision`].
    pub fn state(&self) -> &State {
        &self.state
    }

    /// Whether the state is complete and followed live (a full read completed and the
    /// connection has not broken since).
    pub fn synced(&self) -> bool {
        self.synced
    }

    /// The revision a watch started now starts at: the last full read's + 1.
    pub fn watch_from(&self) -> i64 {
        self.read_at.saturating_add(1)
    }

    /// Takes in what etcd said; answers what to do.
    pub fn on_event(&mut self, event: Event) -> Step {
        match event {
            Event::Full { revision, kvs } => {
                let mut state = State {
                    revision,
                    ..State::default()
                };
                for kv in kvs {
                    self.put(&mut state, kv);
                }
                self.synced = true;
                self.read_at = revision;
                let changed = !same_content(&state, &self.state);
                let moved = state.revision != self.state.revision;
                self.state = state;
                if changed {
                    Step::Apply
                } else if moved {
                    Step::Advance
                } else {
                    Step::Nothing
                }
            }
            Event::Changes(changes) => {
                if !self.synced {
                    // Before the full read (or after a compaction, before the new one):
                    // the full read will bring these, and a delete now could remove an
                    // entry the snapshot holds and the store still has.
                    return Step::Nothing;
                }
                let before = self.state.clone();
                for change in changes {
                    let revision = match &change {
                        Change::Put(kv) => kv.mod_revision,
                        Change::Delete { mod_revision, .. } => *mod_revision,
                    };
                    // The full read already holds everything up to `read_at`.
                    if revision <= self.read_at {
                        continue;
                    }
                    self.state.revision = self.state.revision.max(revision);
                    match change {
                        Change::Put(kv) => {
                            let mut state = std::mem::take(&mut self.state);
                            self.put(&mut state, kv);
                            self.state = state;
                        }
                        Change::Delete { key, .. } => self.delete(&key),
                    }
                }
                if !same_content(&before, &self.state) {
                    Step::Apply
                } else if before.revision != self.state.revision {
                    Step::Advance
                } else {
                    Step::Nothing
                }
            }
            Event::Compacted { .. } => {
                self.synced = false;
                Step::ReadAll
            }
            Event::Down => {
                self.synced = false;
                Step::Nothing
            }
        }
    }

    fn put(&self, state: &mut State, kv: Kv) {
        let text = || String::from_utf8_lossy(&kv.value).into_owned();
        match self.layout.classify(&kv.key) {
            Key::Policy => state.policy = Some(text()),
            Key::Allow(name) => {
                state.allow.insert(name, kv.value);
            }
            Key::Interfaces(router) if router == self.router => state.interfaces = Some(text()),
            Key::Interfaces(_) | Key::Status(_) | Key::Other => {}
        }
    }

    fn delete(&mut self, key: &[u8]) {
        match self.layout.classify(key) {
            Key::Policy => self.state.policy = None,
            Key::Allow(name) => {
                self.state.allow.remove(&name);
            }
            Key::Interfaces(router) if router == self.router => self.state.interfaces = None,
            Key::Interfaces(_) | Key::Status(_) | Key::Other => {}
        }
    }
}

/// Whether two states hold the same values (whatever their revisions).
fn same_content(a: &State, b: &State) -> bool {
    a.policy == b.policy && a.interfaces == b.interfaces && a.allow == b.allow
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout::new("/p25").unwrap_or_else(|_| unreachable!())
    }

    fn kv(key: &str, value: &str, mod_revision: i64) -> Kv {
        Kv {
            key: key.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
            mod_revision,
        }
    }

    fn put(key: &str, value: &str, mod_revision: i64) -> Change {
        Change::Put(kv(key, value, mod_revision))
    }

    fn delete(key: &str, mod_revision: i64) -> Change {
        Change::Delete {
            key: key.as_bytes().to_vec(),
            mod_revision,
        }
    }

    fn snapshot_state() -> State {
        let mut allow = BTreeMap::new();
        allow.insert("192.0.2.25_32".to_owned(), b"{}".to_vec());
        State {
            revision: 10,
            policy: Some("old".into()),
            interfaces: None,
            allow,
        }
    }

    #[test]
    fn a_full_read_then_the_watch_builds_the_state() {
        let mut f = Follower::new(layout(), "r1");
        let step = f.on_event(Event::Full {
            revision: 5,
            kvs: vec![
                kv("/p25/policy", "doc", 2),
                kv("/p25/allow/192.0.2.25_32", "a", 3),
                kv("/p25/routers/r1/interfaces", "mine", 4),
                kv("/p25/routers/r2/interfaces", "theirs", 5),
                kv("/p25/routers/r2/status", "{}", 5),
            ],
        });
        assert_eq!(step, Step::Apply);
        assert!(f.synced());
        assert_eq!(f.watch_from(), 6);
        assert_eq!(f.state().policy.as_deref(), Some("doc"));
        assert_eq!(f.state().interfaces.as_deref(), Some("mine"));
        assert_eq!(f.state().allow.len(), 1);

        let step = f.on_event(Event::Changes(vec![
            put("/p25/allow/192.0.2.26_32", "b", 6),
            delete("/p25/allow/192.0.2.25_32", 7),
        ]));
        assert_eq!(step, Step::Apply);
        assert_eq!(f.state().revision, 7);
        assert_eq!(
            f.state().allow.keys().collect::<Vec<_>>(),
            ["192.0.2.26_32"]
        );
        // Another router's override moves the revision, nothing to apply.
        let step = f.on_event(Event::Changes(vec![put(
            "/p25/routers/r2/interfaces",
            "x",
            8,
        )]));
        assert_eq!(step, Step::Advance);
        assert_eq!(f.state().revision, 8);
        // A change the full read already held (replayed) is skipped.
        let step = f.on_event(Event::Changes(vec![delete("/p25/policy", 5)]));
        assert_eq!(step, Step::Nothing);
        assert_eq!(f.state().policy.as_deref(), Some("doc"));
    }

    #[test]
    fn nothing_is_deleted_before_the_initial_sync() {
        let mut f = Follower::with_state(layout(), "r1", snapshot_state());
        assert!(!f.synced());
        // A watch change before the full read (a misbehaving caller, or a stale stream)
        // must not remove what the snapshot holds.
        let step = f.on_event(Event::Changes(vec![
            delete("/p25/allow/192.0.2.25_32", 11),
            delete("/p25/policy", 12),
        ]));
        assert_eq!(step, Step::Nothing);
        assert_eq!(f.state(), &snapshot_state());
        // The full read is the truth, deletions included.
        let step = f.on_event(Event::Full {
            revision: 12,
            kvs: vec![kv("/p25/policy", "new", 12)],
        });
        assert_eq!(step, Step::Apply);
        assert!(f.state().allow.is_empty());
        assert_eq!(f.state().policy.as_deref(), Some("new"));
    }

    #[test]
    fn a_full_read_of_the_snapshot_state_only_advances() {
        let mut f = Follower::with_state(layout(), "r1", snapshot_state());
        let step = f.on_event(Event::Full {
            revision: 20,
            kvs: vec![
                kv("/p25/policy", "old", 1),
                kv("/p25/allow/192.0.2.25_32", "{}", 2),
            ],
        });
        assert_eq!(step, Step::Advance);
        assert_eq!(f.state().revision, 20);
    }

    #[test]
    fn compaction_asks_for_a_full_read_and_keeps_the_state_in_force() {
        let mut f = Follower::new(layout(), "r1");
        f.on_event(Event::Full {
            revision: 5,
            kvs: vec![kv("/p25/allow/192.0.2.25_32", "a", 3)],
        });
        let before = f.state().clone();
        assert_eq!(
            f.on_event(Event::Compacted {
                compact_revision: 50
            }),
            Step::ReadAll
        );
        assert!(!f.synced());
        assert_eq!(f.state(), &before);
        // Until the new full read, changes are ignored (they belong to the old watch).
        assert_eq!(
            f.on_event(Event::Changes(vec![delete("/p25/allow/192.0.2.25_32", 51)])),
            Step::Nothing
        );
        assert_eq!(f.state(), &before);
        // The new read resumes the watch after its own revision.
        f.on_event(Event::Full {
            revision: 60,
            kvs: vec![kv("/p25/allow/192.0.2.25_32", "a", 3)],
        });
        assert!(f.synced());
        assert_eq!(f.watch_from(), 61);
    }

    #[test]
    fn a_broken_connection_keeps_the_state_and_needs_a_new_read() {
        let mut f = Follower::new(layout(), "r1");
        f.on_event(Event::Full {
            revision: 5,
            kvs: vec![kv("/p25/policy", "doc", 2)],
        });
        assert_eq!(f.on_event(Event::Down), Step::Nothing);
        assert!(!f.synced());
        assert_eq!(f.state().policy.as_deref(), Some("doc"));
        assert_eq!(
            f.on_event(Event::Changes(vec![delete("/p25/policy", 6)])),
            Step::Nothing
        );
        assert_eq!(f.state().policy.as_deref(), Some("doc"));
    }
}
