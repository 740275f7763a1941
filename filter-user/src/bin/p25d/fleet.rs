//! Fleet mode of p25d (`--etcd`): the policy comes from etcd instead of a file, follows
//! it live, and survives etcd's absence on a local snapshot. The rules are in
//! docs/fleet.md and in `filter_user::fleet`.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use filter_user::fleet::{Layout, etcd, keys::check_router_name, snapshot::SNAPSHOT_FILE};

/// Settings of fleet mode.
#[derive(Clone, Debug)]
pub struct FleetOptions {
    /// etcd endpoints.
    pub endpoints: Vec<String>,
    /// The key layout.
    pub layout: Layout,
    /// This router's name.
    pub router: String,
    /// Where the snapshot is kept.
    pub snapshot: PathBuf,
}

impl FleetOptions {
    /// From `--etcd`, `--etcd-prefix`, `--router` (default: the hostname) and `--state`
    /// (the snapshot goes beside it).
    pub fn new(etcd: &str, prefix: &str, router: Option<&str>, state: &Path) -> Result<Self> {
        let router = match router {
            Some(router) => router.to_owned(),
            None => hostname().context("--router is not given and the hostname is unknown")?,
        };
        check_router_name(&router)?;
        Ok(Self {
            endpoints: etcd::endpoints(etcd)?,
            layout: Layout::new(prefix)?,
            router,
            snapshot: state.parent().unwrap_or(Path::new(".")).join(SNAPSHOT_FILE),
        })
    }
}

/// The host's name (its UTS name, as `hostname` prints it).
fn hostname() -> Result<String> {
    let path = "/proc/sys/kernel/hostname";
    let name = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    Ok(name.trim().to_owned())
}
