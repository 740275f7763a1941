//! Offender alerts: every `--offender-scan`, the offender table is read and a subscriber
//! that made `--alert-threshold` blocked attempts within `--alert-window` is logged as an
//! `offender_alert` event.

use std::time::{Duration, SystemTime};

use filter_user::{
    KernelTables,
    control::filter_offenders,
    offenders::{self, AlertTracker, OffenderView, monotonic_ns},
    runtime::unix,
};
use tracing::warn;

/// The alert state and what the last scan saw.
#[derive(Debug)]
pub struct OffenderWatch {
    tracker: AlertTracker,
    threshold: u64,
    window: Duration,
    /// Alerts raised since the daemon started.
    pub alerts_raised: u64,
    /// Subscribers in the offender table at the last scan.
    pub tracked: usize,
}

impl OffenderWatch {
    /// Alerts at `threshold` attempts within `window`.
    pub fn new(threshold: u64, window: Duration) -> Self {
        Self {
            tracker: AlertTracker::new(threshold, window),
            threshold,
            window,
            alerts_raised: 0,
            tracked: 0,
        }
    }

    /// Reads the offender table and raises the alerts it warrants.
    pub fn scan(&mut self, tables: &KernelTables) {
        let entries = match tables.offenders() {
            Ok(entries) => entries,
            Err(e) => {
                warn!(error = %e, "reading the offender table failed");
                return;
            }
        };
        self.tracked = entries.len();
        let now = Duration::from_nanos(monotonic_ns());
        for alert in self.tracker.observe(now, &entries) {
            self.alerts_raised += 1;
            let subscriber = offenders::subscriber(&alert.key)
                .map(|s| s.to_string())
                .unwrap_or_default();
            warn!(
                event = "offender_alert",
                %subscriber,
                attempts_in_window = alert.attempts_in_window,
                attempts_total = alert.attempts_total,
                threshold = self.threshold,
                window_secs = self.window.as_secs(),
                "offender alert: subscriber exceeded the blocked port-25 attempt threshold"
            );
        }
    }
}

/// The offender table as views, worst first, filtered as `p25ctl top` asks.
pub fn views(
    tables: &KernelTables,
    since_secs: Option<u64>,
    limit: Option<usize>,
) -> Result<Vec<OffenderView>, filter_user::Error> {
    let entries = tables.offenders()?;
    let views = offenders::views(&entries, &offenders::Clock::now());
    Ok(filter_offenders(
        views,
        since_secs,
        limit,
        unix(SystemTime::now()),
    ))
}
