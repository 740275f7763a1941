//! The host-side reference model: the shared classifier over plain Rust tables.
//!
//! The longest-prefix match here is deliberately naive (one hash lookup per prefix length
//! in use) so that it shares nothing with the kernel's LPM trie it is checked against.

use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
};

use filter_common::{
    abi::{
        AllowValue, Bucket, Config, Ipv4Key, Ipv6Key, OffenderKey, RejectFallback, SubscriberValue,
    },
    classify::{Action, Outcome, Role, SynLimit, Tables, classify},
    reject::{rst_frame_len, write_rst},
    track::{Budget, full_syn_bucket, resolve, take_rst_token, take_syn_token},
};
use ipnet::IpNet;

use crate::{Error, check_prefix};

/// Prefix table with longest-prefix-match lookup.
#[derive(Clone, Debug)]
struct Lpm<V> {
    entries: HashMap<IpNet, V>,
    v4_lengths: BTreeSet<u8>,
    v6_lengths: BTreeSet<u8>,
}

impl<V> Default for Lpm<V> {
    fn default() -> Self {
        Self {
            entries: HashMap::new(),
            v4_lengths: BTreeSet::new(),
            v6_lengths: BTreeSet::new(),
        }
    }
}

impl<V: Copy> Lpm<V> {
    fn insert(&mut self, net: IpNet, value: V) {
        match net {
            IpNet::V4(_) => self.v4_lengths.insert(net.prefix_len()),
            IpNet::V6(_) => self.v6_lengths.insert(net.prefix_len()),
        };
        self.entries.insert(net, value);
    }

    fn lookup(&self, addr: IpAddr) -> Option<V> {
        let lengths = match addr {
            IpAddr::V4(_) => &self.v4_lengths,
            IpAddr::V6(_) => &self.v6_lengths,
        };
        lengths.iter().rev().find_map(|&len| {
            let net = IpNet::new(addr, len).ok()?.trunc();
            self.entries.get(&net).copied()
        })
    }
}

/// Policy tables for the reference model, mirroring the kernel maps.
#[derive(Clone, Debug, Default)]
pub struct ModelTables {
    /// The global configuration (the CONFIG map).
    pub config: Config,
    /// The role of the attachment the frames arrive on (which entry point runs them).
    pub role: Role,
    subscribers: Lpm<SubscriberValue>,
    allow: Lpm<AllowValue>,
}

impl ModelTables {
    /// Adds or replaces a subscriber prefix. Rejects host bits, like the kernel tables.
    pub fn insert_subscriber(&mut self, net: IpNet, value: SubscriberValue) -> Result<(), Error> {
        self.subscribers.insert(check_prefix(net)?, value);
        Ok(())
    }

    /// Adds or replaces an allowlist prefix. Rejects host bits, like the kernel tables.
    pub fn insert_allow(&mut self, net: IpNet, value: AllowValue) -> Result<(), Error> {
        self.allow.insert(check_prefix(net)?, value);
        Ok(())
    }

    /// Classifies a frame exactly as the dataplane would with the same tables.
    pub fn classify(&self, frame: &[u8]) -> Outcome {
        classify(&frame, self, self.role)
    }
}

impl Tables for ModelTables {
    fn config(&self) -> Config {
        self.config
    }
    fn subscriber_v4(&self, addr: Ipv4Key) -> Option<SubscriberValue> {
        self.subscribers.lookup(IpAddr::V4(addr.into()))
    }
    fn subscriber_v6(&self, addr: Ipv6Key) -> Option<SubscriberValue> {
        self.subscribers.lookup(IpAddr::V6(addr.into()))
    }
    fn allow_v4(&self, addr: Ipv4Key) -> Option<AllowValue> {
        self.allow.lookup(IpAddr::V4(addr.into()))
    }
    fn allow_v6(&self, addr: Ipv6Key) -> Option<AllowValue> {
        self.allow.lookup(IpAddr::V6(addr.into()))
    }
}

/// The model's version of the dataplane's stateful budgets: per-source SYN buckets and
/// one RST bucket (the kernel has one per CPU), on a clock that only moves when told to.
///
/// With a frozen clock the model agrees with the kernel exactly when the kernel's clock
/// does not matter either: limits of at most one SYN per minute within a test shorter
/// than a minute, or limits and RST rates too large to run out. The differential test
/// picks its policies accordingly.
#[derive(Clone, Debug, Default)]
pub struct ModelBudget {
    /// `CLOCK_MONOTONIC` nanoseconds as the model sees them.
    pub now_ns: u64,
    /// The global configuration (for the RST rate).
    pub config: Config,
    /// SYN buckets per source.
    pub syn: HashMap<OffenderKey, Bucket>,
    /// The RST bucket.
    pub rst: Bucket,
}

impl Budget for ModelBudget {
    fn syn_token(&mut self, source: &OffenderKey, limit: &SynLimit) -> bool {
        let now = self.now_ns;
        let bucket = self
            .syn
            .entry(*source)
            .or_insert_with(|| full_syn_bucket(limit, now));
        take_syn_token(bucket, limit, now)
    }

    fn rst_token(&mut self) -> bool {
        take_rst_token(&mut self.rst, &self.config, self.now_ns)
    }
}

/// What one hook does with one frame, per the model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelRun {
    /// The outcome after [`resolve`]: the final action and verdict.
    pub outcome: Outcome,
    /// Why a reject became a drop, if it did.
    pub fallback: Option<RejectFallback>,
    /// For [`Action::Reject`]: the RST frame the hook transmits.
    pub reply: Option<Vec<u8>>,
}

impl ModelTables {
    /// Classifies and resolves a frame as the XDP program (`xdp`) or the TC program would,
    /// with `budget` as the stateful part, and builds the RST where the XDP program
    /// would send one.
    pub fn run(&self, frame: &[u8], xdp: bool, budget: &mut ModelBudget) -> ModelRun {
        let mut outcome = classify(&frame, self, self.role);
        budget.config = self.config;
        let fallback = if outcome.counter.is_some() {
            resolve(&frame, &mut outcome, &self.config, xdp, budget)
        } else {
            None
        };
        let reply = (outcome.action == Action::Reject).then(|| {
            let l4 = usize::from(outcome.l4);
            let mut reply = frame.to_vec();
            reply.truncate(rst_frame_len(l4));
            let written = write_rst(&mut reply.as_mut_slice(), usize::from(outcome.l3), l4);
            debug_assert!(
                written,
                "reject::check accepted a frame write_rst cannot answer"
            );
            reply
        });
        ModelRun {
            outcome,
            fallback,
            reply,
        }
    }
}
