//! Where the policy comes from. p25d reads its policy only through [`PolicySource`]: the
//! policy file (with the list files it names) today. Another source implements the same
//! trait and reaches the maps through the same reload path (`reload::reload`).

use std::{
    fs,
    future::Future,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    pin::Pin,
    time::SystemTime,
};

use std::collections::BTreeMap;

use filter_user::{
    fleet::{Reason, views::SourceView},
    policy::{self, Checked, Policy},
};

/// A source's health, for the metrics.
#[derive(Debug, Default)]
pub struct SourceHealth {
    /// The store revision in force (`p25_policy_revision`; 0 for a file).
    pub revision: i64,
    /// Whether the source is followed live (`p25_policy_source_up`).
    pub up: bool,
    /// Errors by reason since start (`p25_policy_source_errors_total`).
    pub errors: BTreeMap<Reason, u64>,
}

/// A source of policy documents.
pub trait PolicySource {
    /// How status, logs and control messages name the source (for a file, its path).
    fn name(&self) -> &str;

    /// Reads and checks the policy now: the checked policy, or why it is not usable (with
    /// the place, `file:line:column: message`). `in_force` is the policy now in force:
    /// while a new document is rejected, the source keeps watching what that one uses.
    fn load(&mut self, in_force: &Policy) -> Result<Checked, String>;

    /// Whether the policy may have changed since the last [`PolicySource::load`]; asked
    /// every `--poll`, so it must be cheap.
    fn changed(&self, in_force: &Policy) -> bool;

    /// Resolves when a source that is told of changes (rather than polled) has one to
    /// load; the loop then reloads. A polled source never resolves.
    fn notified(&mut self) -> Pin<Box<dyn Future<Output = ()> + '_>> {
        Box::pin(std::future::pending())
    }

    /// What became of the last loaded policy: put in force, or the error that kept it
    /// out (a source that reports its state elsewhere records it here).
    fn applied(&mut self, _result: Result<(), &str>) {}

    /// The source part of `p25ctl status`. A file is always "up": it is read when it
    /// changes, and a bad edit is a rejected reload, not a source failure.
    fn view(&self) -> SourceView {
        SourceView {
            kind: "file".into(),
            location: self.name().to_owned(),
            up: true,
            ..SourceView::default()
        }
    }

    /// Revision, liveness and error counts for the metrics.
    fn health(&self) -> SourceHealth {
        SourceHealth {
            up: true,
            ..SourceHealth::default()
        }
    }
}

/// The policy file and the list files it names.
#[derive(Debug)]
pub struct PolicyFile {
    path: PathBuf,
    /// The path as text, for [`PolicySource::name`].
    name: String,
    /// Stamps of the policy file and its list files as last read (see [`stamps`]).
    seen: Vec<Option<FileStamp>>,
}

impl PolicyFile {
    /// The policy at `path`; nothing is read until [`PolicySource::load`].
    pub fn new(path: PathBuf) -> Self {
        Self {
            name: path.display().to_string(),
            path,
            seen: Vec::new(),
        }
    }
}

impl PolicySource for PolicyFile {
    fn name(&self) -> &str {
        &self.name
    }

    fn load(&mut self, in_force: &Policy) -> Result<Checked, String> {
        // Stamped before reading, so that an edit during the read is seen next time. A
        // rejected file keeps the list files of the policy in force watched.
        self.seen = stamps(&self.path, in_force);
        let checked = policy::load(&self.path).map_err(|e| e.to_string())?;
        // The stamps of list files as of just after the read would miss an edit made
        // during it; the policy file's own stamp is the one taken before reading.
        let lists = stamps(&self.path, &checked.policy).into_iter().skip(1);
        self.seen.truncate(1);
        self.seen.extend(lists);
        Ok(checked)
    }

    fn changed(&self, in_force: &Policy) -> bool {
        stamps(&self.path, in_force) != self.seen
    }
}

/// Identifies a version of a file cheaply, to notice edits.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

/// Stamps of the policy file and of every list file it names, in that order: a change to
/// any of them is a change of the policy.
fn stamps(policy_file: &Path, policy: &Policy) -> Vec<Option<FileStamp>> {
    std::iter::once(policy_file)
        .chain(policy.list_files())
        .map(stamp)
        .collect()
}

fn stamp(path: &Path) -> Option<FileStamp> {
    let meta = fs::metadata(path).ok()?;
    Some(FileStamp {
        modified: meta.modified().ok(),
        len: meta.len(),
        inode: meta.ino(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory of its own under the temp dir, removed when dropped.
    struct Dir(PathBuf);

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn edits_of_the_policy_or_its_list_files_are_changes() -> Result<(), Box<dyn std::error::Error>>
    {
        let dir = Dir(std::env::temp_dir().join(format!("p25d-source-{}", std::process::id())));
        fs::create_dir_all(&dir.0)?;
        let path = dir.0.join("policy.yaml");
        let allow = dir.0.join("allow.txt");
        fs::write(&allow, "100.64.1.1/32\n")?;
        fs::write(
            &path,
            "version: 1\nsubscribers:\n  - prefix: 100.64.0.0/16\nallow_files: [allow.txt]\n",
        )?;
        let mut source = PolicyFile::new(path.clone());
        let in_force = source.load(&Policy::empty())?.policy;
        assert_eq!(source.name(), path.display().to_string());
        assert!(!source.changed(&in_force));
        // A list file edit (another length: the stamp does not rely on the clock alone).
        fs::write(&allow, "100.64.1.1/32\n100.64.1.2/32\n")?;
        assert!(source.changed(&in_force));
        let in_force = source.load(&in_force)?.policy;
        assert!(!source.changed(&in_force));
        // A broken policy is rejected, with its place; the list file of the policy in
        // force is still watched.
        fs::write(
            &path,
            "version: 1\nsubscribers:\n  - prefix: 100.64.0.0/33\n",
        )?;
        assert!(source.changed(&in_force));
        let error = source
            .load(&in_force)
            .err()
            .ok_or("a broken policy loaded")?;
        assert!(error.contains("policy.yaml:3:"), "{error}");
        assert!(!source.changed(&in_force));
        fs::write(&allow, "100.64.1.3/32\n")?;
        assert!(source.changed(&in_force));
        Ok(())
    }
}
