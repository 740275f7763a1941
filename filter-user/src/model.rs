//! The host-side reference model: the shared classifier over plain Rust tables.
//!
//! The longest-prefix match here is deliberately naive (one hash lookup per prefix length
//! in use) so that it shares nothing with the kernel's LPM trie it is checked against.

use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
};

use filter_common::{
    abi::{AllowValue, Config, Ipv4Key, Ipv6Key, SubscriberValue},
    classify::{Outcome, Tables, classify},
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
        classify(&frame, self)
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
    fn allowed_v4(&self, addr: Ipv4Key) -> bool {
        self.allow.lookup(IpAddr::V4(addr.into())).is_some()
    }
    fn allowed_v6(&self, addr: Ipv6Key) -> bool {
        self.allow.lookup(IpAddr::V6(addr.into())).is_some()
    }
}
