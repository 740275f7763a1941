//! Runtime allowlist entries (`p25ctl allow`), persisted so they survive policy reloads and
//! daemon restarts.
//!
//! The state file is JSON, written atomically (temporary file in the same directory,
//! fsync, rename, fsync of the directory): a crash leaves either the old or the new file,
//! never a torn one. A file that exists but cannot be parsed is an error, never silently
//! replaced: losing an operator's exemptions would break someone's mail.

use std::{
    collections::BTreeMap,
    fs,
    io::{self, Write as _},
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{Error, check_prefix};

const STATE_VERSION: u32 = 1;
/// Longest comment accepted, like the policy file's limit.
pub const MAX_COMMENT: usize = 256;

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
}

impl RuntimeEntry {
    /// Whether the entry has expired at `now`.
    pub fn expired(&self, now: SystemTime) -> bool {
        self.expires_unix.is_some_and(|e| unix(now) >= e)
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    allow: Vec<RuntimeEntry>,
}

/// Seconds since the Unix epoch (0 before it).
pub fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Formats Unix seconds as RFC 3339 (UTC).
pub fn rfc3339(secs: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

/// The runtime allowlist and its state file.
#[derive(Debug)]
pub struct RuntimeStore {
    path: PathBuf,
    entries: BTreeMap<IpNet, RuntimeEntry>,
}

impl RuntimeStore {
    /// Opens the store at `path`; a missing file is an empty store.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, Error> {
        let path = path.into();
        let entries = match fs::read(&path) {
            Ok(bytes) => {
                let file: StateFile = serde_json::from_slice(&bytes).map_err(|e| Error::State {
                    path: path.clone(),
                    message: format!(
                        "cannot parse ({e}); fix or move it away, it is not overwritten"
                    ),
                })?;
                if file.version != STATE_VERSION {
                    return Err(Error::State {
                        path,
                        message: format!("state version {} is not {STATE_VERSION}", file.version),
                    });
                }
                file.allow.into_iter().map(|e| (e.prefix, e)).collect()
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => {
                return Err(Error::Io {
                    what: "reading the runtime state file",
                    path,
                    source,
                });
            }
        };
        Ok(Self { path, entries })
    }

    /// The entries, by prefix.
    pub fn entries(&self) -> &BTreeMap<IpNet, RuntimeEntry> {
        &self.entries
    }

    /// Adds or replaces an entry and persists the store. Nothing changes if persisting
    /// fails.
    pub fn add(&mut self, entry: RuntimeEntry) -> Result<(), Error> {
        check_prefix(entry.prefix)?;
        if entry
            .comment
            .as_ref()
            .is_some_and(|c| c.len() > MAX_COMMENT)
        {
            return Err(Error::State {
                path: self.path.clone(),
                message: format!("comment longer than {MAX_COMMENT} bytes"),
            });
        }
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
        let file = StateFile {
            version: STATE_VERSION,
            allow: self.entries.values().cloned().collect(),
        };
        let json = serde_json::to_vec_pretty(&file).map_err(|e| Error::State {
            path: self.path.clone(),
            message: e.to_string(),
        })?;
        write_atomically(&self.path, &json).map_err(|source| Error::Io {
            what: "writing the runtime state file",
            path: self.path.clone(),
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
        });
        assert!(bad.is_err());
        assert!(
            !path.exists(),
            "nothing may be written for a rejected entry"
        );
        Ok(())
    }
}
