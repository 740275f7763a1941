//! The fleet snapshot: the fleet state last put in force, kept on the router's disk so
//! that a p25d that starts while etcd is unreachable filters with it.
//!
//! Written atomically (temporary file, fsync, rename, fsync of the directory, see
//! [`crate::runtime::write_atomically`]) after every apply. A snapshot that cannot be
//! read or parsed is reported and set aside as `<file>.corrupt-<unix time>`, never fatal:
//! the router then waits for etcd.

use std::{fs, io, path::Path, time::SystemTime};

use serde::{Deserialize, Serialize};

use super::{Error, values::AllowValue};
use crate::runtime::{unix, write_atomically};

/// The snapshot format version.
pub const SNAPSHOT_VERSION: u32 = 1;

/// The file name of the snapshot in the state directory.
pub const SNAPSHOT_FILE: &str = "fleet-snapshot.json";

/// What a router had in force, and at which etcd revision.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    /// Always [`SNAPSHOT_VERSION`].
    pub version: u32,
    /// The etcd prefix the state came from: a snapshot of another fleet is not used.
    pub prefix: String,
    /// The etcd revision of the state.
    pub revision: i64,
    /// The policy document in force (the last good one).
    pub policy: Option<String>,
    /// This router's interface override in force, if any.
    pub interfaces: Option<String>,
    /// The fleet allow entries in force, by key name.
    pub allow: std::collections::BTreeMap<String, AllowValue>,
}

impl Snapshot {
    /// Writes the snapshot to `path` atomically.
    pub fn save(&self, path: &Path) -> Result<(), Error> {
        let json = serde_json::to_vec_pretty(self).map_err(|e| Error::Snapshot {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        write_atomically(path, &json).map_err(|source| Error::Io {
            what: "writing the fleet snapshot",
            path: path.to_owned(),
            source,
        })
    }

    /// Reads the snapshot at `path`: `Ok(None)` if there is none. A snapshot that cannot
    /// be parsed, has another version or another prefix is an error naming the file and
    /// why; [`set_aside`] keeps it for a post-mortem.
    pub fn load(path: &Path, prefix: &str) -> Result<Option<Self>, Error> {
        let bytes = match fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(Error::Io {
                    what: "reading the fleet snapshot",
                    path: path.to_owned(),
                    source,
                });
            }
        };
        let bad = |message: String| Error::Snapshot {
            path: path.to_owned(),
            message,
        };
        let snapshot: Self =
            serde_json::from_slice(&bytes).map_err(|e| bad(format!("cannot parse it: {e}")))?;
        if snapshot.version != SNAPSHOT_VERSION {
            return Err(bad(format!(
                "version {} is not {SNAPSHOT_VERSION}",
                snapshot.version
            )));
        }
        if snapshot.prefix != prefix {
            return Err(bad(format!(
                "it holds the fleet state under {:?}, not under --etcd-prefix {prefix:?}",
                snapshot.prefix
            )));
        }
        Ok(Some(snapshot))
    }
}

/// Moves an unusable snapshot out of the way (`<file>.corrupt-<unix time>`), so that the
/// next save does not overwrite what an operator may want to look at. Returns the new
/// name.
pub fn set_aside(path: &Path) -> io::Result<std::path::PathBuf> {
    let aside = path.with_extension(format!("json.corrupt-{}", unix(SystemTime::now())));
    fs::rename(path, &aside)?;
    Ok(aside)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("p25-fleet-snapshot-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let _ = fs::create_dir_all(&dir);
        dir
    }

    fn sample() -> Snapshot {
        let mut allow = std::collections::BTreeMap::new();
        allow.insert(
            "192.0.2.25_32".to_owned(),
            AllowValue {
                prefix: "192.0.2.25/32".into(),
                comment: Some("relay".into()),
                expires: None,
            },
        );
        Snapshot {
            version: SNAPSHOT_VERSION,
            prefix: "/p25".into(),
            revision: 42,
            policy: Some("version: 1\nsubscribers: []\n".into()),
            interfaces: Some("- name: eth0\n  role: subscriber\n".into()),
            allow,
        }
    }

    #[test]
    fn snapshot_round_trips() -> Result<(), Box<dyn std::error::Error>> {
        let dir = temp_dir("round-trip");
        let path = dir.join(SNAPSHOT_FILE);
        assert_eq!(Snapshot::load(&path, "/p25")?, None);
        sample().save(&path)?;
        assert_eq!(Snapshot::load(&path, "/p25")?, Some(sample()));
        // No temporary file is left behind.
        let names: Vec<_> = fs::read_dir(&dir)?
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        let _ = fs::remove_dir_all(&dir);
        Ok(())
    }

    #[test]
    fn a_corrupt_snapshot_is_an_error_and_can_be_set_aside()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = temp_dir("corrupt");
        let path = dir.join(SNAPSHOT_FILE);
        for (bytes, expected) in [
            (b"{\"version\":1,".to_vec(), "cannot parse"),
            (
                serde_json::to_vec(&Snapshot {
                    version: 9,
                    ..sample()
                })?,
                "version 9",
            ),
            (
                serde_json::to_vec(&Snapshot {
                    prefix: "/other".into(),
                    ..sample()
                })?,
                "not under --etcd-prefix",
            ),
        ] {
            fs::write(&path, &bytes)?;
            let message = Snapshot::load(&path, "/p25")
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(message.contains(expected), "{message}");
            assert!(message.contains(SNAPSHOT_FILE), "{message}");
            let aside = set_aside(&path)?;
            assert!(!path.exists());
            assert_eq!(fs::read(&aside)?, bytes);
            fs::remove_file(aside)?;
        }
        let _ = fs::remove_dir_all(&dir);
        Ok(())
    }
}
