//! Offender (zombie) tracking in userspace: turning the kernel's OFFENDERS table into
//! evidence an abuse desk can hand to a customer, and deciding when a subscriber's blocked
//! attempts warrant an alert.
//!
//! The dataplane counts every blocked TCP/25 SYN per subscriber (IPv4 /32, IPv6 /64 by
//! default). It does not know about windows or thresholds: [`AlertTracker`] samples the
//! running counts and alerts once when a subscriber's attempts within the window reach the
//! threshold (MAAWG's operator practice: "over 100 messages in 5 minutes").

use std::{
    collections::{HashMap, VecDeque},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use filter_common::abi::{Family, OffenderKey, OffenderValue};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub use crate::sys::monotonic_ns;

/// One offender as `p25ctl top` and `p25ctl offenders` show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OffenderView {
    /// The subscriber: an IPv4 /32 or an IPv6 prefix (/64 by default).
    pub subscriber: IpNet,
    /// Blocked TCP/25 connection attempts (SYNs) since first seen.
    pub attempts: u64,
    /// First and latest attempt, RFC 3339 UTC.
    pub first_seen: String,
    pub last_seen: String,
    /// Destination of the latest attempt.
    pub last_destination: SocketAddr,
    /// `dropped`, or `would_drop` for a prefix in monitor mode.
    pub last_verdict: String,
    /// Unix seconds of `last_seen`, for filtering and sorting by tools.
    pub last_seen_unix: u64,
}

/// Clock offsets to turn the kernel's `CLOCK_MONOTONIC` stamps into wall-clock time.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    mono_ns: u64,
    wall: SystemTime,
}

impl Clock {
    /// Reads both clocks now.
    pub fn now() -> Self {
        Self {
            mono_ns: monotonic_ns(),
            wall: SystemTime::now(),
        }
    }

    /// The wall-clock time of a `bpf_ktime_get_ns` stamp.
    pub fn wall(&self, ktime_ns: u64) -> SystemTime {
        let ago = Duration::from_nanos(self.mono_ns.saturating_sub(ktime_ns));
        self.wall.checked_sub(ago).unwrap_or(UNIX_EPOCH)
    }
}

/// The subscriber prefix an offender key stands for.
pub fn subscriber(key: &OffenderKey) -> Option<IpNet> {
    let addr = address(key.family, key.addr)?;
    IpNet::new(addr, key.prefix_len).ok().map(|n| n.trunc())
}

/// The address of an offender key or a drop event: `bytes` holds an IPv4 address in its
/// first four bytes, or an IPv6 address; `None` for an unknown family.
pub fn address(family: Family, bytes: [u8; 16]) -> Option<IpAddr> {
    if family == Family::IPV4 {
        let [a, b, c, d, ..] = bytes;
        Some(IpAddr::V4(Ipv4Addr::new(a, b, c, d)))
    } else if family == Family::IPV6 {
        Some(IpAddr::V6(Ipv6Addr::from(bytes)))
    } else {
        None
    }
}

/// Converts the kernel entries to views, worst first (most attempts, then most recent).
pub fn views(entries: &[(OffenderKey, OffenderValue)], clock: &Clock) -> Vec<OffenderView> {
    let mut out: Vec<OffenderView> = entries
        .iter()
        .filter_map(|(key, value)| {
            let subscriber = subscriber(key)?;
            let dst = address(key.family, value.last_dst)?;
            let last = clock.wall(value.last_seen_ns);
            Some(OffenderView {
                subscriber,
                attempts: value.attempts,
                first_seen: crate::runtime::rfc3339(crate::runtime::unix(
                    clock.wall(value.first_seen_ns),
                )),
                last_seen: crate::runtime::rfc3339(crate::runtime::unix(last)),
                last_destination: SocketAddr::new(dst, value.last_dport),
                last_verdict: value.last_verdict.name().into(),
                last_seen_unix: crate::runtime::unix(last),
            })
        })
        .collect();
    out.sort_by(|a, b| {
        b.attempts
            .cmp(&a.attempts)
            .then(b.last_seen_unix.cmp(&a.last_seen_unix))
            .then(a.subscriber.cmp(&b.subscriber))
    });
    out
}

/// An alert: a subscriber reached the threshold within the window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Alert {
    /// The subscriber.
    pub key: OffenderKey,
    /// Attempts within the window when the alert fired.
    pub attempts_in_window: u64,
    /// Attempts since first seen.
    pub attempts_total: u64,
}

#[derive(Debug, Default)]
struct History {
    /// (sample time, running count), oldest first; at most ~[`SAMPLES_PER_WINDOW`] + 1.
    samples: VecDeque<(Duration, u64)>,
    /// When the last alert fired: no second alert until a full window has passed.
    alerted_at: Option<Duration>,
    /// The count when the last alert fired: attempts already reported never count towards
    /// the next alert, whatever the sampling granularity.
    alerted_count: u64,
}

/// Samples kept per window: the window is resolved to 1/SAMPLES_PER_WINDOW of its length,
/// and memory stays bounded by (offenders × samples) whatever the scan rate.
const SAMPLES_PER_WINDOW: u32 = 10;

/// Decides when an offender's blocked attempts warrant an alert.
///
/// Fed the running counts of the OFFENDERS table at each scan, it keeps a few samples per
/// subscriber and alerts when `count now - count at the window's start >= threshold`, at
/// most once per window per subscriber, and only for attempts not already reported by an
/// earlier alert. A subscriber first seen inside the window counts from zero.
#[derive(Debug)]
pub struct AlertTracker {
    threshold: u64,
    window: Duration,
    history: HashMap<OffenderKey, History>,
}

impl AlertTracker {
    /// `threshold` attempts within `window` (the MAAWG-derived default is 100 in 5 min).
    pub fn new(threshold: u64, window: Duration) -> Self {
        Self {
            threshold: threshold.max(1),
            window: window.max(Duration::from_secs(1)),
            history: HashMap::new(),
        }
    }

    /// Feeds one scan taken at `now` (monotonic time, as `bpf_ktime_get_ns`) and returns
    /// the alerts it triggers.
    pub fn observe(
        &mut self,
        now: Duration,
        entries: &[(OffenderKey, OffenderValue)],
    ) -> Vec<Alert> {
        let step = self.window / SAMPLES_PER_WINDOW;
        let window_start = now.saturating_sub(self.window);
        let mut alerts = Vec::new();
        for (key, value) in entries {
            let history = self.history.entry(*key).or_default();
            let first_seen = Duration::from_nanos(value.first_seen_ns);
            // The count at the start of the window: the newest sample at or before it, or
            // zero if the subscriber appeared inside the window.
            let baseline = if first_seen >= window_start {
                0
            } else {
                history
                    .samples
                    .iter()
                    .rev()
                    .find(|(t, _)| *t <= window_start)
                    .or(history.samples.front())
                    .map_or(value.attempts, |(_, count)| *count)
            };
            let in_window = value
                .attempts
                .saturating_sub(baseline.max(history.alerted_count));
            let cooled = history
                .alerted_at
                .is_none_or(|at| now.saturating_sub(at) >= self.window);
            if in_window >= self.threshold && cooled {
                history.alerted_at = Some(now);
                history.alerted_count = value.attempts;
                alerts.push(Alert {
                    key: *key,
                    attempts_in_window: in_window,
                    attempts_total: value.attempts,
                });
            }
            if history
                .samples
                .back()
                .is_none_or(|(t, _)| now.saturating_sub(*t) >= step)
            {
                history.samples.push_back((now, value.attempts));
            }
            // Keep one sample at or before the window start, drop anything older.
            while history.samples.len() > 1
                && history
                    .samples
                    .get(1)
                    .is_some_and(|(t, _)| *t <= window_start)
            {
                history.samples.pop_front();
            }
        }
        // Forget subscribers the kernel evicted or that went quiet for a whole window.
        let keep_after = window_start;
        let present: std::collections::HashSet<&OffenderKey> =
            entries.iter().map(|(k, _)| k).collect();
        self.history.retain(|key, h| {
            let recent = h.samples.back().is_some_and(|(t, _)| *t >= keep_after);
            let cooling = h.alerted_at.is_some_and(|at| at >= keep_after);
            (present.contains(key) && recent) || cooling
        });
        alerts
    }

    /// Subscribers currently tracked (for tests and metrics).
    pub fn tracked(&self) -> usize {
        self.history.len()
    }
}

#[cfg(test)]
#[expect(clippy::indexing_slicing, reason = "tests: a panic is a failure")]
mod tests {
    use filter_common::abi::Verdict;

    use super::*;

    fn key(last: u8) -> OffenderKey {
        OffenderKey {
            family: Family::IPV4,
            prefix_len: 32,
            _pad: [0; 2],
            addr: [100, 64, 1, last, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        }
    }

    fn value(attempts: u64, first_seen: Duration) -> OffenderValue {
        OffenderValue {
            attempts,
            first_seen_ns: first_seen.as_nanos() as u64,
            last_seen_ns: first_seen.as_nanos() as u64,
            last_verdict: Verdict::DROPPED,
            ..OffenderValue::default()
        }
    }

    const MIN: Duration = Duration::from_secs(60);

    #[test]
    fn a_burst_over_the_threshold_alerts_exactly_once() {
        let mut t = AlertTracker::new(100, 5 * MIN);
        let start = 10 * MIN;
        let mut alerts = 0;
        // 150 attempts arriving over 15 s, scanned every second, then quiet for 10 min.
        for s in 0..600u64 {
            let now = start + Duration::from_secs(s);
            let count = (s * 10).min(150);
            alerts += t.observe(now, &[(key(2), value(count, start))]).len();
        }
        assert_eq!(alerts, 1);
    }

    #[test]
    fn below_the_threshold_never_alerts() {
        let mut t = AlertTracker::new(100, 5 * MIN);
        let start = 10 * MIN;
        for s in 0..100u64 {
            let now = start + Duration::from_secs(s);
            assert!(t.observe(now, &[(key(3), value(99, start))]).is_empty());
        }
    }

    #[test]
    fn slow_and_steady_below_the_rate_does_not_alert() {
        // 1,000 attempts over 100 minutes is 50 per 5 minutes: never 100 in a window.
        let mut t = AlertTracker::new(100, 5 * MIN);
        let start = 10 * MIN;
        for s in (0..6000u64).step_by(5) {
            let now = start + Duration::from_secs(s);
            let count = s / 6;
            assert!(
                t.observe(now, &[(key(4), value(count, start))]).is_empty(),
                "alerted at {s} s"
            );
        }
    }

    #[test]
    fn a_persistent_offender_alerts_again_after_a_window() {
        let mut t = AlertTracker::new(100, 5 * MIN);
        let start = 10 * MIN;
        let mut fired = Vec::new();
        // 1 attempt per second for 20 minutes: 300 per window.
        for s in 0..1200u64 {
            let now = start + Duration::from_secs(s);
            if !t.observe(now, &[(key(5), value(s, start))]).is_empty() {
                fired.push(s);
            }
        }
        assert_eq!(fired.len(), 4, "fired at {fired:?}");
        assert!(fired.windows(2).all(|w| w[1] - w[0] >= 300));
    }

    #[test]
    fn quiet_subscribers_are_forgotten() {
        let mut t = AlertTracker::new(100, 5 * MIN);
        t.observe(10 * MIN, &[(key(6), value(5, 10 * MIN))]);
        assert_eq!(t.tracked(), 1);
        t.observe(20 * MIN, &[]);
        assert_eq!(t.tracked(), 0);
    }

    #[test]
    fn views_sort_worst_first_and_convert_keys() {
        let clock = Clock {
            mono_ns: 1_000_000_000_000,
            wall: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        };
        let mut v6 = OffenderKey {
            family: Family::IPV6,
            prefix_len: 64,
            _pad: [0; 2],
            addr: [0; 16],
        };
        v6.addr[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
        let entries = [
            (key(2), value(5, Duration::from_secs(900))),
            (v6, value(50, Duration::from_secs(990))),
        ];
        let views = views(&entries, &clock);
        assert_eq!(views.len(), 2);
        assert_eq!(views[0].subscriber.to_string(), "2001:db8::/64");
        assert_eq!(views[0].attempts, 50);
        assert_eq!(views[1].subscriber.to_string(), "100.64.1.2/32");
        assert_eq!(views[1].last_seen_unix, 1_700_000_000 - 100);
    }
}
