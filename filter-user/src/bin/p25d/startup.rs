//! Start-up and shutdown of the daemon's kernel and file-system state: the pin root's
//! writer lock, the socket's lock, bind and group, the runtime directory, and what to do
//! with pinned state of other ABI versions (refuse newer, migrate older, remove).

use std::{
    collections::BTreeMap,
    fs,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use filter_common::abi::ABI_VERSION;
use filter_user::{
    Dataplane, KernelTables,
    desired::{self, Counts},
    loader::{Hook, PinLayout, links_in},
    policy::{Attach, Policy, Role},
};
use tokio::net::UnixListener;
use tracing::{info, warn};

/// Refuses to start next to pinned state of a newer ABI version: its maps mean something
/// this build does not know, and its links filter with them. Neither is migrated nor
/// removed; the operator runs the newer p25d, or removes that state on purpose.
pub fn refuse_newer_versions(layout: &PinLayout) -> Result<()> {
    for (version, dir) in layout.other_versions() {
        if version > ABI_VERSION {
            bail!(
                "{} holds pinned state of ABI v{version}, newer than this p25d (ABI \
                 v{ABI_VERSION}); refusing to migrate or remove it. Run the newer p25d, or \
                 remove that state on purpose with `p25d detach --all-versions --pin-root {}`",
                dir.display(),
                layout.root().display()
            );
        }
    }
    Ok(())
}

/// Takes an exclusive lock next to the socket so two daemons never serve (and remove) the
/// same socket file. The maps are guarded by [`lock_pin_root`].
pub fn lock_socket(socket: &Path, group: Option<&str>) -> Result<fs::File> {
    let path = socket.with_extension("lock");
    if let Some(dir) = path.parent() {
        create_runtime_dir(dir, socket_gid(group)?)?;
    }
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening the lock file {}", path.display()))?;
    if !filter_user::sys::try_lock_exclusive(&file)
        .with_context(|| format!("locking {}", path.display()))?
    {
        bail!(
            "another p25d holds {} and serves the socket {}: give this one another --socket",
            path.display(),
            socket.display()
        );
    }
    Ok(file)
}

/// What holds a pin root's lock when it is taken, for the error message.
#[derive(Clone, Copy, Debug)]
pub enum LockFor {
    /// `p25d run`.
    Run,
    /// `p25d detach`.
    Detach,
}

/// How long `p25d detach` waits for the pin root's lock: 30 × 100 ms.
const DETACH_LOCK_TRIES: u32 = 30;
const DETACH_LOCK_PAUSE: Duration = Duration::from_millis(100);

/// Takes the writer lock of a pin root: one writer (a running p25d, or `p25d detach`) per
/// pin root, whatever socket each uses.
///
/// The lock is an flock on the pin root directory itself, on bpffs (flock works on any
/// inode there; bpffs cannot hold regular lock files). Unlike a lock file under /run
/// derived from the root's name, it needs no writable directory elsewhere, cannot be
/// dodged by spelling the same root differently (a symlink, `//`, a relative path), and
/// every mount namespace that sees the pins sees the lock (PrivateTmp, containers).
///
/// `p25d run` creates the root (mode 0700) if needed and fails at once if the lock is held;
/// `p25d detach` only locks an existing root (`None` when there is nothing to detach) and
/// waits up to 3 s for it. Detach removes the directory it locked, so
/// after taking the lock the path is checked to still name the locked directory; if not,
/// the lock is taken again on the new one.
pub fn lock_pin_root(root: &Path, purpose: LockFor) -> Result<Option<fs::File>> {
    for _ in 0..8 {
        match purpose {
            LockFor::Run => {
                use std::os::unix::fs::DirBuilderExt as _;
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(root)
                    .with_context(|| format!("creating the pin root {}", root.display()))?;
            }
            LockFor::Detach if !root.exists() => return Ok(None),
            LockFor::Detach => {}
        }
        let dir = match fs::File::open(root) {
            Ok(dir) => dir,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                let hint = if e.kind() == std::io::ErrorKind::PermissionDenied {
                    ": it must belong to the user p25d runs as, pins included (the systemd \
                     unit's ExecStartPre runs `chown -R p25:p25` on it)"
                } else {
                    ""
                };
                return Err(e).with_context(|| {
                    format!("opening the pin root {} to lock it{hint}", root.display())
                });
            }
        };
        // Detach gives a daemon that was just killed a moment to exit (its lock goes with
        // its last fd); a running daemon still refuses it after that.
        let tries = match purpose {
            LockFor::Run => 1,
            LockFor::Detach => DETACH_LOCK_TRIES,
        };
        let mut locked = false;
        for attempt in 0..tries {
            if attempt > 0 {
                std::thread::sleep(DETACH_LOCK_PAUSE);
            }
            if filter_user::sys::try_lock_exclusive(&dir)
                .with_context(|| format!("locking the pin root {}", root.display()))?
            {
                locked = true;
                break;
            }
        }
        if !locked {
            match purpose {
                LockFor::Run => bail!(
                    "another p25d is running on the pin root {} (it holds the pin root's \
                     lock): only one daemon may write these maps. Stop it first (`systemctl \
                     stop p25d`), or give this one another --pin-root",
                    root.display()
                ),
                LockFor::Detach => bail!(
                    "a p25d is running on the pin root {} (it holds the pin root's lock): \
                     stop it first (`systemctl stop p25d`), then detach; detaching under it \
                     would leave it writing to maps no program reads",
                    root.display()
                ),
            }
        }
        let held = dir
            .metadata()
            .with_context(|| format!("stat {}", root.display()))?;
        match fs::metadata(root) {
            Ok(now) if now.dev() == held.dev() && now.ino() == held.ino() => {
                return Ok(Some(dir));
            }
            // Removed (by the detach that held the lock) or replaced meanwhile: retry.
            _ => continue,
        }
    }
    bail!(
        "the pin root {} keeps being removed and recreated while p25d tries to lock it",
        root.display()
    )
}

/// Creates a runtime directory (socket, lock) that does not exist yet: mode 0750, in the
/// socket group if one is given, so the group can reach the socket inside (the umask is
/// 077). An existing directory is left as it is: systemd's RuntimeDirectory= sets its own.
fn create_runtime_dir(dir: &Path, group: Option<u32>) -> Result<()> {
    if dir.exists() {
        return Ok(());
    }
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    set_mode_and_group(dir, 0o750, group)
}

/// chmod, then chgrp if a group is given.
fn set_mode_and_group(path: &Path, mode: u32, group: Option<u32>) -> Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:04o} {}", path.display()))?;
    if let Some(gid) = group {
        std::os::unix::fs::chown(path, None, Some(gid))
            .with_context(|| format!("chgrp {gid} {}", path.display()))?;
    }
    Ok(())
}

/// The gid of `--socket-group`, if given.
fn socket_gid(group: Option<&str>) -> Result<Option<u32>> {
    group
        .map(|group| {
            filter_user::sys::group_id(group)?.with_context(|| format!("unknown group {group:?}"))
        })
        .transpose()
}

pub fn bind_socket(path: &Path, group: Option<&str>) -> Result<UnixListener> {
    let gid = socket_gid(group)?;
    if let Some(dir) = path.parent() {
        create_runtime_dir(dir, gid)?;
    }
    // A socket file left by a killed daemon: we hold the lock, so nobody else uses it.
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing stale {}", path.display())),
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    set_mode_and_group(path, 0o660, gid)?;
    Ok(listener)
}

/// Removes a whole pinned-state directory of another ABI version (links first).
pub fn remove_version_dir(dir: &Path) -> Result<usize> {
    let mut removed = 0;
    for sub in ["links", "maps"] {
        let path = dir.join(sub);
        let Ok(entries) = fs::read_dir(&path) else {
            continue;
        };
        for entry in entries.flatten() {
            fs::remove_file(entry.path())
                .with_context(|| format!("removing {}", entry.path().display()))?;
            removed += 1;
        }
        let _ = fs::remove_dir(&path);
    }
    let _ = fs::remove_dir(dir);
    Ok(removed)
}

/// Takes over pinned state left by older ABI versions, never leaving a live link on
/// unfilled maps:
/// 1. this version's maps are filled completely with the policy and runtime entries: the
///    caller's ([`crate::reload::Maps::put_in_force`], before this); then the per-source
///    SYN buckets are carried over from the old maps;
/// 2. each link moves: this build's program for the interface's role replaces the old
///    one in place (`bpf_link_update`), so the interface is never unfiltered, and the
///    link is re-pinned here;
/// 3. the old directory is removed.
///
/// A failed fill returns its error before this is called: the old links keep filtering
/// with the old maps, untouched, and p25d exits. `counts` are what the fill put in, for
/// the log.
pub fn migrate_older_versions(
    layout: &PinLayout,
    dataplane: &mut Dataplane,
    tables: &mut KernelTables,
    policy: &Policy,
    counts: Counts,
) -> Result<()> {
    let older: Vec<(u32, PathBuf)> = layout
        .other_versions()
        .into_iter()
        .filter(|(version, _)| *version < ABI_VERSION)
        .collect();
    if older.is_empty() {
        return Ok(());
    }
    info!(
        subscribers = counts.subscribers,
        allow = counts.allow_policy + counts.allow_runtime,
        "filled the new maps before migrating"
    );
    for (version, dir) in &older {
        match tables.import_syn_buckets(&dir.join("maps")) {
            Ok(n) => info!(version, buckets = n, "carried over SYN buckets"),
            // The buckets only refill early: an allowlisted source gets its burst again.
            Err(e) => warn!(version, error = %e, "could not carry over SYN buckets"),
        }
    }
    let roles: BTreeMap<&str, Role> = policy
        .interfaces
        .iter()
        .map(|i| (i.name.as_str(), i.role))
        .collect();
    for (version, dir) in &older {
        let version = *version;
        for (interface, hook, old) in links_in(&dir.join("links")) {
            // An interface no longer in the policy is detached by the first apply.
            let role = roles.get(interface.as_str()).copied().map_or(
                filter_common::classify::Role::Subscriber,
                desired::dataplane_role,
            );
            match dataplane.migrate_link(layout, &interface, hook, role, &old) {
                Ok(()) => {
                    info!(version, %interface, ?hook, "migrated link from ABI v{version}")
                }
                Err(e) => {
                    let e = format!("{:#}", anyhow::Error::from(e));
                    // A defunct link (its interface is gone) filters nothing; drop it.
                    warn!(version, %interface, ?hook, error = %e, "could not migrate link; removing it");
                    let _ = fs::remove_file(&old);
                }
            }
        }
        match remove_version_dir(dir) {
            Ok(n) => info!(version, removed = n, dir = %dir.display(), "removed old ABI state"),
            Err(e) => {
                warn!(version, error = %format!("{e:#}"), "removing old ABI state failed")
            }
        }
    }
    Ok(())
}

/// Which of the four programs the start-up verifies before the first attach. Until the
/// policy is known every one is wanted; [`Self::settle`] narrows it to the hooks the
/// policy's interfaces attach (`attach: auto` counts as XDP: TC only serves a fall-back,
/// and a program that is not verified here is verified on first use). The verifier thread
/// asks before each program, so the TC programs of an XDP-only router (about half of
/// the 0.45 s the verifier takes at 1.1M entries) are not verified while the maps fill.
#[derive(Debug)]
pub struct ProgramsWanted(std::sync::atomic::AtomicU8);

impl ProgramsWanted {
    const ALL: u8 = 0b1111;

    const fn bit(hook: Hook, role: filter_common::classify::Role) -> u8 {
        let hook = match hook {
            Hook::Xdp => 0,
            Hook::Tc => 2,
        };
        let role = match role {
            filter_common::classify::Role::Subscriber => 0,
            filter_common::classify::Role::Upstream => 1,
        };
        1 << (hook + role)
    }

    /// Everything wanted: the policy is not known yet.
    pub const fn all() -> Self {
        Self(std::sync::atomic::AtomicU8::new(Self::ALL))
    }

    /// Whether the program of `hook` and `role` is (still) wanted.
    pub fn wants(&self, hook: Hook, role: filter_common::classify::Role) -> bool {
        self.0.load(std::sync::atomic::Ordering::Relaxed) & Self::bit(hook, role) != 0
    }

    /// Narrows the set to what `policy` attaches (`None`: nothing more, p25d is about to
    /// exit).
    pub fn settle(&self, policy: Option<&Policy>) {
        let mut mask = 0;
        for interface in policy.map_or(&[][..], |p| &p.interfaces) {
            let hook = match interface.attach {
                Attach::Tc => Hook::Tc,
                Attach::Xdp | Attach::Auto => Hook::Xdp,
            };
            mask |= Self::bit(hook, desired::dataplane_role(interface.role));
        }
        self.0.store(mask, std::sync::atomic::Ordering::Relaxed);
    }
}
