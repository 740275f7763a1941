//! The policy at realistic scale, generated deterministically: subscriber prefixes and
//! allowlist entries, IPv4 and IPv6 mixed, as in `tests/tests/scale.rs`: /26 subscriber
//! blocks in 100.64.0.0/10 and /56 sites in 2001:db8::/32, allowlist hosts inside them.

use std::{
    collections::HashSet,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use anyhow::{Context as _, Result, ensure};
use filter_common::abi::Mode;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use rand::{Rng as _, SeedableRng as _, rngs::StdRng};

/// How many entries of each kind.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Scale {
    /// IPv4 subscriber prefixes (/26).
    pub subs_v4: usize,
    /// IPv6 subscriber prefixes (/56).
    pub subs_v6: usize,
    /// IPv4 allowlist hosts (/32).
    pub allow_v4: usize,
    /// IPv6 allowlist hosts (/128).
    pub allow_v6: usize,
}

impl Scale {
    /// What the issue asks for: 100k subscriber prefixes and 1M allowlist entries.
    pub const FULL: Self = Self {
        subs_v4: 50_000,
        subs_v6: 50_000,
        allow_v4: 500_000,
        allow_v6: 500_000,
    };
    /// For smoke runs (`--quick`).
    pub const QUICK: Self = Self {
        subs_v4: 1_000,
        subs_v6: 1_000,
        allow_v4: 10_000,
        allow_v6: 10_000,
    };

    /// Subscriber prefixes in all.
    pub const fn subscribers(&self) -> usize {
        self.subs_v4 + self.subs_v6
    }

    /// Allowlist entries in all.
    pub const fn allow(&self) -> usize {
        self.allow_v4 + self.allow_v6
    }
}

/// Addresses with a known place in the policy, for the benchmark packets.
#[derive(Clone, Copy, Debug)]
pub struct Probes {
    /// Inside a subscriber prefix, not allowlisted.
    pub sub_v4: Ipv4Addr,
    /// Allowlisted (and inside a subscriber prefix).
    pub allowed_v4: Ipv4Addr,
    /// Outside subscriber space.
    pub outside_v4: Ipv4Addr,
    /// Inside a subscriber prefix, not allowlisted.
    pub sub_v6: Ipv6Addr,
    /// Destination of port-25 traffic (outside subscriber space).
    pub mx_v4: Ipv4Addr,
    /// Destination of port-25 traffic (outside subscriber space).
    pub mx_v6: Ipv6Addr,
    /// Subscriber addresses that are not allowlisted, for the single-allow latency runs.
    pub fresh_v4: [Ipv4Addr; 32],
}

/// A generated policy.
#[derive(Clone, Debug)]
pub struct PolicySet {
    /// Subscriber prefixes, IPv4 first.
    pub subscribers: Vec<IpNet>,
    /// Allowlist entries, IPv4 first.
    pub allow: Vec<IpNet>,
    /// Probe addresses.
    pub probes: Probes,
}

fn sub_v4(rng: &mut StdRng) -> Result<Ipv4Net> {
    let base = 0x6440_0000 | ((rng.random::<u32>() & 0xFFFF) << 6);
    Ok(Ipv4Net::new(Ipv4Addr::from(base), 26)?)
}

fn sub_v6(rng: &mut StdRng) -> Result<Ipv6Net> {
    let site = u128::from(rng.random::<u32>() & 0x00FF_FFFF) << 72;
    Ok(Ipv6Net::new(
        Ipv6Addr::from((0x2001_0db8_u128 << 96) | site),
        56,
    )?)
}

fn host_v4(rng: &mut StdRng, net: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(net.network()) | (rng.random::<u32>() & !u32::from(net.netmask())))
}

fn host_v6(rng: &mut StdRng, net: Ipv6Net) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(net.network()) | u128::from(rng.random::<u16>() & 0x1FF))
}

/// Generates the policy (same `seed`, same policy).
pub fn generate(scale: Scale, seed: u64) -> Result<PolicySet> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut seen = HashSet::new();
    let mut v4 = Vec::with_capacity(scale.subs_v4);
    let mut v6 = Vec::with_capacity(scale.subs_v6);
    // 65,536 /26 blocks and 16M /56 sites exist, so these loops end quickly; the bound
    // only guards against an impossible scale.
    for _ in 0..scale.subs_v4.saturating_mul(20) {
        if v4.len() == scale.subs_v4 {
            break;
        }
        let net = sub_v4(&mut rng)?;
        if seen.insert(IpNet::V4(net)) {
            v4.push(net);
        }
    }
    for _ in 0..scale.subs_v6.saturating_mul(20) {
        if v6.len() == scale.subs_v6 {
            break;
        }
        let net = sub_v6(&mut rng)?;
        if seen.insert(IpNet::V6(net)) {
            v6.push(net);
        }
    }
    ensure!(
        v4.len() == scale.subs_v4 && v6.len() == scale.subs_v6,
        "cannot generate {scale:?}"
    );
    let mut allow = HashSet::with_capacity(scale.allow());
    let mut allow_list = Vec::with_capacity(scale.allow());
    for i in 0..scale.allow().saturating_mul(20) {
        if allow_list.len() == scale.allow() {
            break;
        }
        let ip = if allow_list.len() < scale.allow_v4 {
            let sub = v4.get(i % v4.len()).copied().context("no v4 subscribers")?;
            IpAddr::V4(host_v4(&mut rng, sub))
        } else {
            let sub = v6.get(i % v6.len()).copied().context("no v6 subscribers")?;
            IpAddr::V6(host_v6(&mut rng, sub))
        };
        let net = IpNet::from(ip);
        if allow.insert(net) {
            allow_list.push(net);
        }
    }
    ensure!(
        allow_list.len() == scale.allow(),
        "cannot generate {scale:?}"
    );

    let not_allowed_v4 = |rng: &mut StdRng, taken: &HashSet<IpNet>| -> Result<Ipv4Addr> {
        for _ in 0..10_000 {
            let index = rng.random_range(0..v4.len());
            // Probes must sit in an enforcing prefix, so that their verdict is a drop.
            if subscriber_mode(index) == Mode::MONITOR {
                continue;
            }
            let sub = v4.get(index).copied().context("no v4 subscribers")?;
            let ip = host_v4(rng, sub);
            if !allow.contains(&IpNet::from(IpAddr::V4(ip)))
                && !taken.contains(&IpNet::from(IpAddr::V4(ip)))
            {
                return Ok(ip);
            }
        }
        anyhow::bail!("no subscriber address outside the allowlist found")
    };
    let mut taken = HashSet::new();
    let sub_v4 = not_allowed_v4(&mut rng, &taken)?;
    taken.insert(IpNet::from(IpAddr::V4(sub_v4)));
    let mut fresh_v4 = [Ipv4Addr::UNSPECIFIED; 32];
    for slot in &mut fresh_v4 {
        *slot = not_allowed_v4(&mut rng, &taken)?;
        taken.insert(IpNet::from(IpAddr::V4(*slot)));
    }
    let allowed_v4 = match allow_list.get(1) {
        Some(IpNet::V4(net)) => net.addr(),
        _ => anyhow::bail!("no IPv4 allowlist entry"),
    };
    let sub_v6 = (0..10_000)
        .find_map(|_| {
            let index = rng.random_range(0..v6.len());
            if subscriber_mode(v4.len() + index) == Mode::MONITOR {
                return None;
            }
            let sub = v6.get(index).copied()?;
            // Hosts above 0x1FF are never allowlisted (see host_v6).
            Some(Ipv6Addr::from(u128::from(sub.network()) | 0x1_0000))
        })
        .context("no v6 subscriber")?;
    let subscribers = v4
        .iter()
        .map(|n| IpNet::V4(*n))
        .chain(v6.iter().map(|n| IpNet::V6(*n)))
        .collect();
    Ok(PolicySet {
        subscribers,
        allow: allow_list,
        probes: Probes {
            sub_v4,
            allowed_v4,
            outside_v4: Ipv4Addr::new(198, 51, 100, 7),
            sub_v6,
            mx_v4: Ipv4Addr::new(203, 0, 113, 25),
            mx_v6: Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 0x25),
            fresh_v4,
        },
    })
}

/// Every tenth subscriber prefix is in monitor mode (as in the scale test), so both modes
/// live in the trie; the probes' prefixes may be either, which does not change the cost.
fn subscriber_mode(i: usize) -> Mode {
    if i.is_multiple_of(10) {
        Mode::MONITOR
    } else {
        Mode::DEFAULT
    }
}

/// The policy as a p25d policy file (YAML), attaching to `interface` with XDP. The modes
/// of the subscriber prefixes whose index is in `toggled` are flipped (for the diff).
pub fn yaml(set: &PolicySet, interface: &str, toggled: &HashSet<usize>) -> String {
    let mut out = String::with_capacity(40 * (set.subscribers.len() + set.allow.len()) + 512);
    out.push_str("# Generated by p25-bench: the control-plane benchmark policy.\nversion: 1\n");
    out.push_str("defaults:\n  mode: enforce\n  fragments: pass\n  ports: [25]\n");
    let _ = write!(
        out,
        "interfaces:\n  - name: {interface}\n    role: subscriber\n    attach: xdp\n"
    );
    out.push_str("subscribers:\n");
    for (i, net) in set.subscribers.iter().enumerate() {
        let monitor = (subscriber_mode(i) == Mode::MONITOR) != toggled.contains(&i);
        if monitor {
            let _ = writeln!(out, "  - {{ prefix: {net}, mode: monitor }}");
        } else {
            let _ = writeln!(out, "  - prefix: {net}");
        }
    }
    out.push_str("allow:\n");
    for net in &set.allow {
        let _ = writeln!(out, "  - prefix: {net}");
    }
    out
}

/// The policy as p25d files with the big lists in list files: the YAML document (which
/// keeps the subscriber prefixes in monitor mode inline, since entries of a list file
/// take the defaults), `subscribers.txt` and `allow.txt`, named relative to the YAML.
#[derive(Clone, Debug)]
pub struct ListFiles {
    /// The policy document.
    pub policy: String,
    /// `subscriber_files` content: one prefix a line.
    pub subscribers: String,
    /// `allow_files` content: one prefix a line.
    pub allow: String,
}

impl ListFiles {
    /// Bytes of all three files.
    pub fn len(&self) -> usize {
        self.policy.len() + self.subscribers.len() + self.allow.len()
    }
}

/// `set` as list files (see [`ListFiles`]), attaching to `interface` with XDP, with the
/// modes of the subscriber prefixes in `toggled` flipped (for the diff).
pub fn list_files(set: &PolicySet, interface: &str, toggled: &HashSet<usize>) -> ListFiles {
    let mut policy = String::with_capacity(64 * set.subscribers.len() / 10 + 512);
    policy.push_str(
        "# Generated by p25-bench: the control-plane benchmark policy, lists in list files.\n\
         version: 1\ndefaults:\n  mode: enforce\n  fragments: pass\n  ports: [25]\n",
    );
    let _ = write!(
        policy,
        "interfaces:\n  - name: {interface}\n    role: subscriber\n    attach: xdp\n"
    );
    policy.push_str("subscriber_files: [subscribers.txt]\nallow_files: [allow.txt]\n");
    policy.push_str("subscribers:\n");
    let mut subscribers = String::with_capacity(24 * set.subscribers.len());
    subscribers.push_str("# Generated by p25-bench: subscriber prefixes in enforce mode.\n");
    for (i, net) in set.subscribers.iter().enumerate() {
        let monitor = (subscriber_mode(i) == Mode::MONITOR) != toggled.contains(&i);
        if monitor {
            let _ = writeln!(policy, "  - {{ prefix: {net}, mode: monitor }}");
        } else {
            let _ = writeln!(subscribers, "{net}");
        }
    }
    let mut allow = String::with_capacity(24 * set.allow.len());
    allow.push_str("# Generated by p25-bench: allowlisted hosts.\n");
    for net in &set.allow {
        let _ = writeln!(allow, "{net}");
    }
    ListFiles {
        policy,
        subscribers,
        allow,
    }
}

/// A 1% change of `set`: every 100th allowlist entry replaced by a new host of the same
/// subscriber space, and the mode of every 100th subscriber prefix flipped. Returns the
/// new set, the flipped subscriber indices, and how many map entries change.
pub fn one_percent_diff(set: &PolicySet, seed: u64) -> Result<(PolicySet, HashSet<usize>, usize)> {
    let mut rng = StdRng::seed_from_u64(seed);
    // Never allowlist a probe address: the latency runs need them to start as drops.
    let existing: HashSet<IpNet> = set
        .allow
        .iter()
        .copied()
        .chain(
            set.probes
                .fresh_v4
                .iter()
                .chain([&set.probes.sub_v4])
                .map(|ip| IpNet::from(IpAddr::V4(*ip))),
        )
        .collect();
    let mut added = HashSet::new();
    let mut allow = set.allow.clone();
    let mut replaced = 0;
    for (i, slot) in allow.iter_mut().enumerate() {
        if i % 100 != 50 {
            continue;
        }
        let mut found = None;
        for _ in 0..1_000 {
            let candidate = match *slot {
                IpNet::V4(net) => {
                    let host = u32::from(net.addr()) & !0x3F | (rng.random::<u32>() & 0x3F);
                    IpNet::from(IpAddr::V4(Ipv4Addr::from(host)))
                }
                IpNet::V6(net) => {
                    let host =
                        u128::from(net.addr()) & !0xFFFF | u128::from(rng.random::<u16>() | 0x200);
                    IpNet::from(IpAddr::V6(Ipv6Addr::from(host)))
                }
            };
            if !existing.contains(&candidate) && added.insert(candidate) {
                found = Some(candidate);
                break;
            }
        }
        *slot = found.context("no free address for the diff")?;
        replaced += 1;
    }
    let toggled: HashSet<usize> = (0..set.subscribers.len())
        .filter(|i| i % 100 == 7)
        .collect();
    let changed = 2 * replaced + toggled.len();
    Ok((
        PolicySet {
            subscribers: set.subscribers.clone(),
            allow,
            probes: set.probes,
        },
        toggled,
        changed,
    ))
}
