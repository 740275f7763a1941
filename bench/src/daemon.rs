//! The release `p25d` run the way an operator runs it, in a throwaway namespace with its
//! own pin root, socket and files. The dataplane sections load their policy through it
//! (so the benchmark never depends on the map layout: p25d fills the maps, the benchmark
//! opens them through [`filter_user::Dataplane::open_pinned`]), and the control section
//! times it.
//!
//! Cleanup: `Drop` stops the daemon and removes its pins and files, also on error and
//! panic. The daemon is started with `PR_SET_PDEATHSIG`, so it dies with p25-bench even
//! when p25-bench is killed, and its directories carry p25-bench's pid, so
//! [`crate::netns::sweep`] removes them after a signal or at the next start.

use std::{
    fs,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result, bail, ensure};
use filter_user::loader::PinLayout;

use crate::netns::Netns;

/// Pids of the daemons running now, for [`kill_all`].
static RUNNING: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// Kills and reaps every daemon still running: called on a signal, before the sweep, so
/// that no daemon writes its pins or files again after they are removed.
pub fn kill_all() {
    let pids = RUNNING
        .lock()
        .map(|mut pids| std::mem::take(&mut *pids))
        .unwrap_or_default();
    for pid in pids {
        let Ok(pid) = libc::pid_t::try_from(pid) else {
            continue;
        };
        // SAFETY: plain syscalls on a child of this process that has not been reaped (it
        // is removed from RUNNING before `Drop` reaps it).
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
    }
}

/// A running p25d with private files and pins; `Drop` stops it and removes everything.
#[derive(Debug)]
pub struct Daemon {
    /// Policy, socket, state and log.
    pub dir: PathBuf,
    /// The daemon's `--pin-root`.
    pub pin_root: PathBuf,
    bin_dir: PathBuf,
    child: Option<Child>,
    /// When p25d was spawned.
    pub spawned: SystemTime,
}

impl Daemon {
    /// Spawns `p25d run` in `ns` with the policy `text` and waits (bounded) until it is
    /// ready. `role` makes the directory and pin names unique within this process.
    pub fn start(bin_dir: &Path, ns: &Netns, role: &str, text: &str) -> Result<Self> {
        Self::start_with(bin_dir, ns, role, text, &[])
    }

    /// [`Daemon::start`] with more files (`(name, content)`) in the daemon's directory
    /// beside the policy, such as the list files it names.
    pub fn start_with(
        bin_dir: &Path,
        ns: &Netns,
        role: &str,
        text: &str,
        files: &[(&str, &str)],
    ) -> Result<Self> {
        for bin in ["p25d", "p25ctl"] {
            ensure!(
                bin_dir.join(bin).exists(),
                "{} not found; build it with `cargo build --release -p filter-user --bins` \
                 (cargo xtask bench does)",
                bin_dir.join(bin).display()
            );
        }
        let id = format!("p25b-{}-{role}", std::process::id());
        let mut daemon = Self {
            dir: std::env::temp_dir().join(&id),
            pin_root: PathBuf::from("/sys/fs/bpf").join(&id),
            bin_dir: bin_dir.to_path_buf(),
            child: None,
            spawned: SystemTime::now(),
        };
        let _ = fs::remove_dir_all(&daemon.dir);
        fs::create_dir_all(&daemon.dir)
            .with_context(|| format!("creating {}", daemon.dir.display()))?;
        for (name, content) in files {
            write_atomically(&daemon.dir.join(name), content)?;
        }
        write_atomically(&daemon.policy(), text)?;
        let log = fs::File::create(daemon.log())?;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", ns.path().display()))
            .arg(bin_dir.join("p25d"))
            .args([
                "run",
                "--poll",
                "1h",
                "--resync",
                "1h",
                "--log-format",
                "json",
            ])
            .arg("--policy")
            .arg(daemon.policy())
            .arg("--state")
            .arg(daemon.dir.join("state.json"))
            .arg("--socket")
            .arg(daemon.socket())
            .arg("--pin-root")
            .arg(&daemon.pin_root)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // SAFETY: prctl is async-signal-safe and touches only the child's own state.
        unsafe {
            cmd.pre_exec(|| {
                // Dies with the thread that spawned it (p25-bench's main thread), also
                // when p25-bench is killed; survives nsenter's exec of p25d.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        daemon.spawned = SystemTime::now();
        let child = cmd.spawn().context("spawning p25d")?;
        if let Ok(mut pids) = RUNNING.lock() {
            pids.push(child.id());
        }
        daemon.child = Some(child);
        daemon.wait_for_log("ready", Duration::from_secs(300))?;
        Ok(daemon)
    }

    /// The policy file.
    pub fn policy(&self) -> PathBuf {
        self.dir.join("policy.yaml")
    }

    /// The control socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("p25.sock")
    }

    /// The JSON log.
    pub fn log(&self) -> PathBuf {
        self.dir.join("p25d.log")
    }

    /// The daemon's pinned state.
    pub fn layout(&self) -> PinLayout {
        PinLayout::new(&self.pin_root)
    }

    /// `p25ctl` aimed at this daemon.
    pub fn ctl(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(self.bin_dir.join("p25ctl"));
        cmd.arg("--socket")
            .arg(self.socket())
            .arg("--pin-root")
            .arg(&self.pin_root)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        cmd
    }

    /// The daemon's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Waits (bounded) for `message` in the daemon's log; fails early if the daemon
    /// exits. Returns the log.
    pub fn wait_for_log(&mut self, message: &str, timeout: Duration) -> Result<String> {
        let started = Instant::now();
        // 20 ms polls: the bound is timeout / 20 ms rounds.
        let rounds = timeout.as_millis() / 20 + 1;
        for _ in 0..rounds {
            let log = fs::read_to_string(self.log()).unwrap_or_default();
            if log_time(&log, message).is_some() {
                return Ok(log);
            }
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("p25d exited ({status}) before {message:?}:\n{log}");
            }
            if started.elapsed() > timeout {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("p25d did not log {message:?} within {timeout:?}")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(mut pids) = RUNNING.lock() {
                pids.retain(|pid| *pid != child.id());
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new(self.bin_dir.join("p25d"))
            .args(["detach", "--all-versions", "--pin-root"])
            .arg(&self.pin_root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = fs::remove_dir_all(&self.pin_root);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Timestamp of the first JSON log line whose message is `message`.
pub fn log_time(log: &str, message: &str) -> Option<SystemTime> {
    log.lines().find_map(|line| {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        if v.pointer("/fields/message")?.as_str()? != message {
            return None;
        }
        humantime::parse_rfc3339_weak(v.get("timestamp")?.as_str()?).ok()
    })
}

/// A numeric field of the first JSON log line whose message is `message`.
pub fn log_field(log: &str, message: &str, field: &str) -> Option<u64> {
    log.lines().find_map(|line| {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        if v.pointer("/fields/message")?.as_str()? != message {
            return None;
        }
        // tracing writes a u128 (`Duration::as_millis`) as a string, smaller integers as
        // numbers.
        let value = v.pointer(&format!("/fields/{field}"))?;
        value
            .as_u64()
            .or_else(|| value.as_str().and_then(|s| s.parse().ok()))
    })
}

/// Writes `text` to a temporary file beside `path`, then renames it into place.
pub fn write_atomically(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}
