//! Runtime allowlist entries (`p25ctl allow`), persisted so they survive policy reloads and
//! daemon restarts.
//!
//! The state file is JSON, written atomically (temporary file in the same directory,
//! fsync, rename, fsync of the directory): a crash leaves either the old or the new file,
//! never a torn one. A file that exists but cannot be parsed is an error, never silently
//! replaced: losing an operator's exemptions would break someone's mail. A file that
//! parses but holds bad entries (host bits, an expiry centuries ahead, a SYN limit out of
//! range, a hand edit gone wrong) loads without them: each is logged with the file, the
//! prefix and the reason, and the file as found is kept beside it (`<file>.rejected-<unix
//! time>`) before the next save leaves the bad entries out.
//!
//! Over 500 lines because of its tests (the last third): every way a state file can be
//! wrong is one.

use std::{
    collections::BTreeMap,
    fs,
    io::{self, Write as _},
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use filter_common::abi::{AllowValue, MAX_SYN_PER_MINUTE, Origin};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{Error, check_prefix, policy::MAX_TEXT_BYTES};

const STATE_VERSION: u32 = 1;
/// Longest lifetime of a runtime entry: ten years (of 365.25 days). Longer is a typo
/// (`8000y` for `8000s`) or a permanent entry in disguise: leave the expiry out for that.
pub const MAX_LIFETIME_SECS: u64 = 10 * 36_525 * 86_400 / 100;
/// Default cap on runtime entries (`p25d run --max-runtime-entries`). Runtime entries are
/// for tickets and incidents; thousands of them belong in the policy file, where they are
/// reviewed and versioned.
pub const DEFAULT_MAX_RUNTIME_ENTRIES: u64 = 10_000;

/// One runtime allowlist entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeEntry {
    /// The prefix.
    pub prefix: IpNet,
    /// Why it was added, by whom.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// When it was added (seconds since the Unix epoch).
    pub added_unix: u64,
    /// When it expires (seconds since the Unix epoch), if ever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_unix: Option<u64>,
    /// New TCP/25 connections per minute each source inside may open, if limited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_syn_per_minute: Option<u32>,
    /// How many of those may come at once (defaults to a minute's worth).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub syn_burst: Option<u32>,
}

impl RuntimeEntry {
    /// Whether the entry has expired at `now`.
    pub fn expired(&self, now: SystemTime) -> bool {
        self.expires_unix.is_some_and(|e| unix(now) >= e)
    }

    /// The ALLOW map value of this entry: runtime origin, and its SYN limit if any (the
    /// burst defaults to the per-minute rate, as in the policy).
    pub fn allow_value(&self) -> AllowValue {
        let value = AllowValue::new(Origin::RUNTIME);
        match self.max_syn_per_minute {
            Some(rate) => value.with_syn_limit(rate, self.syn_burst.unwrap_or(rate)),
            None => value,
        }
    }

    /// Checks everything a request or the state file may get wrong, against the clock
    /// `now_unix`: host bits, comment length, an expiry more than
    /// [`MAX_LIFETIME_SECS`] ahead, and the SYN limit's range (as the policy checks it).
    pub fn validate(&self, now_unix: u64) -> Result<(), String> {
        check_prefix(self.prefix).map_err(|e| e.to_string())?;
        if let Some(comment) = &self.comment
            && comment.len() > MAX_TEXT_BYTES
        {
            return Err(format!(
                "comment is {} bytes, longer than {MAX_TEXT_BYTES}",
                comment.len()
            ));
        }
        if let Some(expires) = self.expires_unix
            && expires.saturating_sub(now_unix) > MAX_LIFETIME_SECS
        {
            return Err(format!(
                "expires {} ({expires} s after the epoch), more than 10 years ahead; \
                 the longest lifetime is 10 years, a permanent entry has no expiry",
                rfc3339(expires)
            ));
        }
        check_syn_limit(self.max_syn_per_minute, self.syn_burst)
    }
}

/// Checks a SYN limit as the policy does: both in `1..=MAX_SYN_PER_MINUTE`, and no burst
/// without a rate.
pub fn check_syn_limit(per_minute: Option<u32>, burst: Option<u32>) -> Result<(), String> {
    for (name, value) in [("max_syn_per_minute", per_minute), ("syn_burst", burst)] {
        if let Some(value) = value
            && !(1..=MAX_SYN_PER_MINUTE).contains(&value)
        {
            return Err(format!(
                "{name} {value} is out of range: use 1 to {MAX_SYN_PER_MINUTE}"
            ));
        }
    }
    if let (None, Some(burst)) = (per_minute, burst) {
        return Err(format!(
            "syn_burst {burst} without max_syn_per_minute: a burst only sizes a limit; \
             add max_syn_per_minute"
        ));
    }
    Ok(())
}

/// The state file as read: entries are parsed one by one, so that one bad entry does not
/// make the whole file unreadable.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFileIn {
    version: u32,
    allow: Vec<serde_json::Value>,
}

#[derive(Serialize)]
struct StateFileOut<'a> {
    version: u32,
    allow: Vec<&'a RuntimeEntry>,
}

/// An entry of the state file left out when loading it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    /// Its position in the file's `allow` list (0-based).
    pub index: usize,
    /// Its prefix as written, or `?` if it has none.
    pub prefix: String,
    /// Why it was left out.
    pub reason: String,
}

/// Seconds since the Unix epoch (0 before it).
pub fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Formats Unix seconds as RFC 3339 (UTC), for every `u64`: years past 9999 (which RFC
/// 3339 cannot express, and which made humantime panic) are written with as many digits
/// as they need, so a bad value shows up in the output instead of crashing the daemon.
pub fn rfc3339(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm, for
/// unsigned days: every step stays far inside u64 for any `days` a u64 of seconds gives).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    // Shifted to 0000-03-01, so that leap days end each 400-year era.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// The runtime allowlist and its state file.
#[derive(Debug)]
pub struct RuntimeStore {
    /// `None`: kept in memory only (the control fuzz target).
    path: Option<PathBuf>,
    entries: BTreeMap<IpNet, RuntimeEntry>,
    skipped: Vec<Skipped>,
}

impl RuntimeStore {
    /// Opens the store at `path`; a missing file is an empty store. Bad entries are left
    /// out (see [`RuntimeStore::skipped`]), each logged with the file, prefix and reason.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, Error> {
        let path = path.into();
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok(Self {
                    path: Some(path),
                    entries: BTreeMap::new(),
                    skipped: Vec::new(),
                });
            }
            Err(source) => {
                return Err(Error::Io {
                    what: "reading the runtime state file",
                    path,
                    source,
                });
            }
        };
        let file: StateFileIn = serde_json::from_slice(&bytes).map_err(|e| Error::State {
            path: path.clone(),
            message: format!("cannot parse ({e}); fix or move it away, it is not overwritten"),
        })?;
        if file.version != STATE_VERSION {
            return Err(Error::State {
                path,
                message: format!(
                    "state version {} is not {STATE_VERSION}; it is not overwritten",
                    file.version
                ),
            });
        }
        let (entries, skipped) = Self::check_entries(file.allow, unix(SystemTime::now()));
        for s in &skipped {
            tracing::warn!(
                file = %path.display(),
                index = s.index,
                prefix = %s.prefix,
                reason = %s.reason,
                "runtime state entry skipped; the rest of the file is in force"
            );
        }
        if !skipped.is_empty() {
            // The next save writes the good entries only; keep what the operator had.
            let kept = path.with_extension(format!("rejected-{}", unix(SystemTime::now())));
            match fs::write(&kept, &bytes) {
                Ok(()) => {
                    tracing::warn!(file = %path.display(), copy = %kept.display(), skipped = skipped.len(), "the state file as found is kept beside it")
                }
                Err(e) => {
                    tracing::warn!(file = %path.display(), copy = %kept.display(), error = %e, "could not keep a copy of the state file as found")
                }
            }
        }
        Ok(Self {
            path: Some(path),
            entries,
            skipped,
        })
    }

    /// A store that lives in memory only and never touches a file (the fuzz target's).
    pub fn in_memory() -> Self {
        Self {
            path: None,
            entries: BTreeMap::new(),
            skipped: Vec::new(),
        }
    }

    /// Parses and validates the `allow` list of a state file, entry by entry.
    fn check_entries(
        raw: Vec<serde_json::Value>,
        now_unix: u64,
    ) -> (BTreeMap<IpNet, RuntimeEntry>, Vec<Skipped>) {
        let mut entries = BTreeMap::new();
        let mut skipped = Vec::new();
        for (index, value) in raw.into_iter().enumerate() {
            let prefix = match &value {
                serde_json::Value::Object(map) => match map.get("prefix") {
                    Some(serde_json::Value::String(p)) => p.clone(),
                    _ => "?".to_owned(),
                },
                _ => "?".to_owned(),
            };
            let entry = match serde_json::from_value::<RuntimeEntry>(value) {
                Ok(entry) => entry,
                Err(e) => {
                    skipped.push(Skipped {
                        index,
                        prefix,
                        reason: e.to_string(),
                    });
                    continue;
                }
            };
            let checked = entry.validate(now_unix).and_then(|()| {
                if entries.contains_key(&entry.prefix) {
                    Err("a second entry for the same prefix".to_owned())
                } else {
                    Ok(())
                }
            });
            match checked {
                Ok(()) => {
                    entries.insert(entry.prefix, entry);
                }
                Err(reason) => skipped.push(Skipped {
                    index,
                    prefix,
                    reason,
                }),
            }
        }
        (entries, skipped)
    }

    /// The entries, by prefix.
    pub fn entries(&self) -> &BTreeMap<IpNet, RuntimeEntry> {
        &self.entries
    }

    /// The entries of the state file left out when it was opened, and why.
    pub fn skipped(&self) -> &[Skipped] {
        &self.skipped
    }

    /// The state file, or a note that there is none.
    pub fn path_display(&self) -> String {
        self.path
            .as_ref()
            .map_or_else(|| "(in memory)".to_owned(), |p| p.display().to_string())
    }

    fn state_error(&self, message: String) -> Error {
        Error::State {
            path: self.path.clone().unwrap_or_default(),
            message,
        }
    }

    /// Adds or replaces an entry and persists the store. The entry is validated first
    /// ([`RuntimeEntry::validate`]); nothing changes if it is bad or persisting fails.
    pub fn add(&mut self, entry: RuntimeEntry) -> Result<(), Error> {
        entry
            .validate(unix(SystemTime::now()))
            .map_err(|m| self.state_error(m))?;
        let previous = self.entries.insert(entry.prefix, entry.clone());
        if let Err(e) = self.save() {
            match previous {
                Some(old) => self.entries.insert(entry.prefix, old),
                None => self.entries.remove(&entry.prefix),
            };
            return Err(e);
        }
        Ok(())
    }

    /// Removes an entry and persists the store; `Ok(None)` if it was not there.
    pub fn remove(&mut self, prefix: IpNet) -> Result<Option<RuntimeEntry>, Error> {
        let Some(old) = self.entries.remove(&prefix) else {
            return Ok(None);
        };
        if let Err(e) = self.save() {
            self.entries.insert(prefix, old);
            return Err(e);
        }
        Ok(Some(old))
    }

    /// Removes the entries expired at `now`, persists, and returns them.
    pub fn expire(&mut self, now: SystemTime) -> Result<Vec<RuntimeEntry>, Error> {
        let expired: Vec<IpNet> = self
            .entries
            .values()
            .filter(|e| e.expired(now))
            .map(|e| e.prefix)
            .collect();
        if expired.is_empty() {
            return Ok(Vec::new());
        }
        let before = self.entries.clone();
        let removed: Vec<RuntimeEntry> = expired
            .iter()
            .filter_map(|p| self.entries.remove(p))
            .collect();
        if let Err(e) = self.save() {
            self.entries = before;
            return Err(e);
        }
        Ok(removed)
    }

    fn save(&self) -> Result<(), Error> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let file = StateFileOut {
            version: STATE_VERSION,
            allow: self.entries.values().collect(),
        };
        let json = serde_json::to_vec_pretty(&file).map_err(|e| self.state_error(e.to_string()))?;
        write_atomically(path, &json).map_err(|source| Error::Io {
            what: "writing the runtime state file",
            path: path.clone(),
            source,
        })
    }
}

/// Writes `bytes` to `path` so that readers see either the old or the new content.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomically_with(path, bytes, |dir| fs::File::open(dir)?.sync_all())
}

/// [`write_atomically`] with the directory sync as a parameter, for tests.
///
/// Once the rename has happened the new content is what readers (and the next p25d) see,
/// so an error after it (the directory fsync) is a warning: reporting a failure would make
/// the caller roll back its in-memory state to something no longer on disk.
fn write_atomically_with(
    path: &Path,
    bytes: &[u8],
    sync_dir: impl FnOnce(&Path) -> io::Result<()>,
) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut file = fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
        return result;
    }
    if let Err(e) = sync_dir(dir) {
        tracing::warn!(
            path = %path.display(),
            error = %e,
            "the new state file is in place but syncing its directory failed: a power loss \
             now could bring back the previous version"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("p25-runtime-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir.join("state.json")
    }

    #[test]
    fn entries_survive_reopen_and_expire() -> Result<(), Box<dyn std::error::Error>> {
        let path = scratch("reopen");
        let mut store = RuntimeStore::open(&path)?;
        let prefix: IpNet = "100.64.1.2/32".parse()?;
        store.add(RuntimeEntry {
            prefix,
            comment: Some("ticket 42".into()),
            added_unix: 1,
            expires_unix: Some(100),
            max_syn_per_minute: None,
            syn_burst: None,
        })?;
        let reopened = RuntimeStore::open(&path)?;
        assert_eq!(reopened.entries().len(), 1);
        let mut reopened = reopened;
        assert!(
            reopened
                .expire(UNIX_EPOCH + Duration::from_secs(50))?
                .is_empty()
        );
        assert_eq!(
            reopened
                .expire(UNIX_EPOCH + Duration::from_secs(100))?
                .len(),
            1
        );
        assert!(RuntimeStore::open(&path)?.entries().is_empty());
        let _ = fs::remove_dir_all(path.parent().unwrap_or(Path::new("/nonexistent")));
        Ok(())
    }

    #[test]
    fn a_corrupt_state_file_is_an_error_not_an_empty_store()
    -> Result<(), Box<dyn std::error::Error>> {
        let path = scratch("corrupt");
        write_atomically(&path, b"{ not json")?;
        let err = RuntimeStore::open(&path)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("not overwritten"), "{err}");
        assert_eq!(fs::read(&path)?, b"{ not json");
        let _ = fs::remove_dir_all(path.parent().unwrap_or(Path::new("/nonexistent")));
        Ok(())
    }

    #[test]
    fn an_error_after_the_rename_is_a_warning_not_a_failure()
    -> Result<(), Box<dyn std::error::Error>> {
        let path = scratch("after-rename");
        let dir = path
            .parent()
            .ok_or("scratch path has no directory")?
            .to_owned();
        fs::create_dir_all(&dir)?;
        fs::write(&path, b"old")?;
        write_atomically_with(&path, b"new", |_| Err(io::Error::other("fsync failed")))?;
        assert_eq!(fs::read(&path)?, b"new");
        // A failure before the rename still fails and leaves the old content.
        let missing = dir.join("no-such-dir/sub/state.json");
        fs::write(dir.join("no-such-dir"), b"a file, not a directory")?;
        assert!(write_atomically_with(&missing, b"x", |_| Ok(())).is_err());
        assert_eq!(fs::read(&path)?, b"new");
        let _ = fs::remove_dir_all(&dir);
        Ok(())
    }

    #[test]
    fn host_bits_are_rejected() -> Result<(), Box<dyn std::error::Error>> {
        let path = scratch("hostbits");
        let mut store = RuntimeStore::open(&path)?;
        let bad = store.add(RuntimeEntry {
            prefix: "100.64.1.2/24".parse()?,
            comment: None,
            added_unix: 1,
            expires_unix: None,
            max_syn_per_minute: None,
            syn_burst: None,
        });
        assert!(bad.is_err());
        assert!(
            !path.exists(),
            "nothing may be written for a rejected entry"
        );
        Ok(())
    }

    #[test]
    fn rfc3339_is_total() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(253_402_300_799), "9999-12-31T23:59:59Z");
        assert_eq!(rfc3339(253_402_300_800), "10000-01-01T00:00:00Z");
        // Agrees with humantime wherever humantime can format at all.
        for secs in [
            1,
            59,
            86_399,
            86_400,
            68_169_600,
            4_102_444_800,
            253_402_300_799,
        ] {
            assert_eq!(
                rfc3339(secs),
                humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs))
                    .to_string()
            );
        }
        // What crashed p25d: `--expires 8000y`, and u64::MAX.
        assert!(rfc3339(u64::MAX).starts_with("584554051223-"));
        assert!(rfc3339(8000 * 31_557_600).starts_with("9970-"));
    }

    fn entry(
        prefix: &str,
        expires_unix: Option<u64>,
    ) -> Result<RuntimeEntry, Box<dyn std::error::Error>> {
        Ok(RuntimeEntry {
            prefix: prefix.parse()?,
            comment: None,
            added_unix: 1,
            expires_unix,
            max_syn_per_minute: None,
            syn_burst: None,
        })
    }

    #[test]
    fn expiry_and_syn_limits_are_bounded() -> Result<(), Box<dyn std::error::Error>> {
        let now = unix(SystemTime::now());
        let path = scratch("bounded");
        let mut store = RuntimeStore::open(&path)?;
        let far = store.add(entry(
            "100.64.1.2/32",
            Some(now.saturating_add(8000 * 31_557_600)),
        )?);
        let err = far.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("more than 10 years"), "{err}");
        assert!(store.add(entry("100.64.1.2/32", Some(u64::MAX))?).is_err());
        store.add(entry("100.64.1.2/32", Some(now + MAX_LIFETIME_SECS))?)?;
        let mut limited = entry("100.64.1.3/32", None)?;
        limited.syn_burst = Some(5);
        assert!(store.add(limited.clone()).is_err(), "burst without rate");
        limited.max_syn_per_minute = Some(MAX_SYN_PER_MINUTE + 1);
        assert!(store.add(limited.clone()).is_err(), "rate out of range");
        limited.max_syn_per_minute = Some(30);
        store.add(limited.clone())?;
        assert_eq!(limited.allow_value().syn_per_minute, 30);
        assert_eq!(limited.allow_value().syn_burst, 5);
        let reopened = RuntimeStore::open(&path)?;
        assert_eq!(reopened.entries().len(), 2);
        assert!(reopened.skipped().is_empty());
        let _ = fs::remove_dir_all(path.parent().unwrap_or(Path::new("/nonexistent")));
        Ok(())
    }

    #[test]
    fn bad_state_entries_are_skipped_not_fatal() -> Result<(), Box<dyn std::error::Error>> {
        let path = scratch("bad-entries");
        let text = r#"{"version": 1, "allow": [
            {"prefix": "100.64.1.2/32", "added_unix": 1},
            {"prefix": "100.64.1.3/32", "added_unix": 1, "expires_unix": 18446744073709551615},
            {"prefix": "100.64.1.4/24", "added_unix": 1},
            {"prefix": "not an address", "added_unix": 1},
            {"prefix": "100.64.1.5/32", "added_unix": 1, "max_syn_per_minute": 0},
            {"prefix": "100.64.1.2/32", "added_unix": 2},
            42
        ]}"#;
        write_atomically(&path, text.as_bytes())?;
        let store = RuntimeStore::open(&path)?;
        assert_eq!(
            store
                .entries()
                .keys()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            vec!["100.64.1.2/32"]
        );
        let reasons: Vec<(usize, &str)> = store
            .skipped()
            .iter()
            .map(|s| (s.index, s.prefix.as_str()))
            .collect();
        assert_eq!(
            reasons,
            vec![
                (1, "100.64.1.3/32"),
                (2, "100.64.1.4/24"),
                (3, "not an address"),
                (4, "100.64.1.5/32"),
                (5, "100.64.1.2/32"),
                (6, "?")
            ]
        );
        assert!(
            store
                .skipped()
                .first()
                .is_some_and(|s| s.reason.contains("10 years")),
            "{:?}",
            store.skipped()
        );
        // The file as found is kept beside it.
        let dir = path.parent().unwrap_or(Path::new("/nonexistent"));
        let kept = fs::read_dir(dir)?
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains("rejected-"))
            .count();
        assert_eq!(kept, 1);
        let _ = fs::remove_dir_all(dir);
        Ok(())
    }
}
