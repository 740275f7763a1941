//! Running the real `p25d` and `p25ctl` binaries in tests.
//!
//! Every [`DaemonLab`] has its own pin root on bpffs, socket, state file and policy file,
//! so tests run in parallel, and its `Drop` kills the daemon and removes every pin (the
//! daemon deliberately leaves them behind when it stops).

use std::{
    fs,
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    sync::{
        OnceLock,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};
use filter_user::{
    control::{ListView, StatsView, StatusView},
    offenders::OffenderView,
};

use crate::netns::{Netns, wait_until};

/// Path of a binary of the workspace (`p25d`, `p25ctl`), built once per test process.
///
/// The tests crate is not the package that owns these binaries, so cargo does not hand us
/// `CARGO_BIN_EXE_*`; instead build them (a no-op when up to date) into the target
/// directory this test executable lives in.
pub fn bin(name: &str) -> Result<PathBuf> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let dir = BUILT
        .get_or_init(|| {
            let exe = std::env::current_exe().map_err(|e| e.to_string())?;
            // target/<profile>/deps/<test> → target/<profile>; a binary of this crate
            // (the demo) lives in target/<profile> itself.
            let exe_dir = exe.parent().ok_or("executable has no directory")?;
            let profile_dir = if exe_dir.file_name().is_some_and(|n| n == "deps") {
                exe_dir
                    .parent()
                    .ok_or("test executable has no profile directory")?
            } else {
                exe_dir
            }
            .to_path_buf();
            let target_dir = profile_dir.parent().ok_or("no target directory")?;
            let release = profile_dir.file_name().is_some_and(|n| n == "release");
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let mut cmd = Command::new(cargo);
            cmd.args(["build", "--quiet", "--package", "filter-user", "--bins"])
                .arg("--target-dir")
                .arg(target_dir);
            if release {
                cmd.arg("--release");
            }
            let status = cmd
                .status()
                .map_err(|e| format!("running cargo build: {e}"))?;
            if !status.success() {
                return Err(format!("cargo build of the p25 binaries failed: {status}"));
            }
            Ok(profile_dir)
        })
        .as_ref()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(dir.join(name))
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A p25d with private pins, socket, state and policy, running inside a namespace.
#[derive(Debug)]
pub struct DaemonLab {
    /// Scratch directory: policy, state, socket, logs.
    pub dir: PathBuf,
    /// Root of this lab's pins on bpffs.
    pub pin_root: PathBuf,
    /// The namespace the daemon runs in (path of its netns file).
    netns_path: PathBuf,
    child: Option<Child>,
    starts: u32,
    /// Extra arguments for `p25d run`.
    args: Vec<String>,
    /// A command (and its arguments) p25d runs under, such as `setpriv ...`.
    wrapper: Vec<String>,
    /// The control socket; `p25.sock` in `dir` unless [`DaemonLab::set_socket`] chose.
    socket: Option<PathBuf>,
    /// Where p25d and p25ctl are taken from; the workspace's build ([`bin`]) if unset.
    bin_dir: Option<PathBuf>,
    /// How long [`DaemonLab::start`] waits for p25d to answer (15 s unless set).
    start_timeout: Duration,
}

impl DaemonLab {
    /// Prepares (does not start) a daemon for the namespace `netns`.
    pub fn new(netns: &Netns) -> Result<Self> {
        crate::require_root();
        let id = format!(
            "p25t-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        Self::at(
            netns,
            std::env::temp_dir().join(&id),
            PathBuf::from("/sys/fs/bpf").join(id),
        )
    }

    /// Prepares (does not start) a daemon for the namespace `netns` with the policy `text`.
    pub fn with_policy(netns: &Netns, text: &str) -> Result<Self> {
        let lab = Self::new(netns)?;
        lab.write_policy(text)?;
        Ok(lab)
    }

    /// Prepares (does not start) a daemon for `netns` with a chosen scratch directory and
    /// pin root, for the demo lab, whose state must be findable by `--down`. The directory
    /// is emptied first; both are removed on drop, like [`DaemonLab::new`]'s.
    pub fn at(netns: &Netns, dir: PathBuf, pin_root: PathBuf) -> Result<Self> {
        crate::require_root();
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self {
            dir,
            pin_root,
            netns_path: netns.path(),
            child: None,
            starts: 0,
            args: Vec::new(),
            wrapper: Vec::new(),
            socket: None,
            bin_dir: None,
            start_timeout: Duration::from_secs(15),
        })
    }

    /// How long [`DaemonLab::start`] waits for p25d to answer: start-up with a million
    /// entries takes longer than the default 15 s on a loaded machine.
    pub fn set_start_timeout(&mut self, timeout: Duration) {
        self.start_timeout = timeout;
    }

    /// Runs p25d and p25ctl from `dir` (e.g. the installed package's /usr/sbin) instead of
    /// the workspace's build.
    pub fn use_binaries(&mut self, dir: impl Into<PathBuf>) {
        self.bin_dir = Some(dir.into());
    }

    /// The p25d or p25ctl this lab runs.
    fn binary(&self, name: &str) -> Result<PathBuf> {
        match &self.bin_dir {
            Some(dir) => Ok(dir.join(name)),
            None => bin(name),
        }
    }

    /// Adds arguments to every later `p25d run` of this lab.
    pub fn run_args(&mut self, args: &[&str]) {
        self.args.extend(args.iter().map(|a| (*a).to_owned()));
    }

    /// Runs every later `p25d run` of this lab under `wrapper`, a command that ends by
    /// executing its arguments (the p25d command line), inside the lab's network namespace.
    pub fn wrap(&mut self, wrapper: &[&str]) {
        self.wrapper = wrapper.iter().map(|a| (*a).to_owned()).collect();
    }

    /// Runs every later `p25d run` of this lab as user and group `id` (no supplementary
    /// groups) holding exactly the capabilities `caps` (setpriv names such as `bpf`), as the
    /// systemd unit does. The lab's directory is handed to that user; the pin root is left
    /// for p25d to create.
    pub fn run_as(&mut self, id: u32, caps: &[&str]) -> Result<()> {
        std::os::unix::fs::chown(&self.dir, Some(id), Some(id))
            .with_context(|| format!("chown {id}:{id} {}", self.dir.display()))?;
        let caps = std::iter::once("-all".to_owned())
            .chain(caps.iter().map(|cap| format!("+{cap}")))
            .collect::<Vec<_>>()
            .join(",");
        self.wrapper = vec![
            "setpriv".into(),
            format!("--reuid={id}"),
            format!("--regid={id}"),
            "--clear-groups".into(),
            format!("--inh-caps={caps}"),
            format!("--ambient-caps={caps}"),
            format!("--bounding-set={caps}"),
            "--".into(),
        ];
        Ok(())
    }

    /// The policy file the daemon watches.
    pub fn policy_path(&self) -> PathBuf {
        self.dir.join("policy.yaml")
    }

    /// The control socket.
    pub fn socket(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(|| self.dir.join("p25.sock"))
    }

    /// Puts the control socket at `path` for every later start (it should be inside
    /// `dir`, which is removed on drop).
    pub fn set_socket(&mut self, path: PathBuf) {
        self.socket = Some(path);
    }

    /// Writes the policy file atomically (the daemon never sees half a file).
    pub fn write_policy(&self, text: &str) -> Result<()> {
        let tmp = self.dir.join(".policy.tmp");
        fs::write(&tmp, text)?;
        fs::rename(&tmp, self.policy_path())?;
        Ok(())
    }

    /// Starts p25d and waits until it answers `p25ctl status`.
    pub fn start(&mut self) -> Result<()> {
        ensure!(self.child.is_none(), "p25d already running");
        self.starts += 1;
        let log = fs::File::create(self.dir.join(format!("p25d-{}.log", self.starts)))?;
        let child = self.run_command(log)?.spawn().context("spawning p25d")?;
        self.child = Some(child);
        let ready = wait_until(self.start_timeout, Duration::from_millis(50), || {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("p25d exited during start-up ({status}):\n{}", self.log());
            }
            Ok(self.ctl(&["status", "--json"])?.status.success() && self.status()?.daemon)
        })?;
        ensure!(
            ready,
            "p25d did not answer within {:?}:\n{}",
            self.start_timeout,
            self.log()
        );
        Ok(())
    }

    /// `nsenter … p25d run` with this lab's files and extra arguments, logging to `log`.
    fn run_command(&self, log: fs::File) -> Result<Command> {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.netns_path.display()))
            .args(&self.wrapper)
            .arg(self.binary("p25d")?)
            .arg("run")
            // A quick resync unless the test chose its own (e.g. to show that expiry does
            // not wait for it).
            .args(if self.args.iter().any(|a| a == "--resync") {
                &[][..]
            } else {
                &["--resync", "2s"][..]
            })
            // Quick file polling unless the test chose its own (e.g. to show that
            // interface changes are picked up from link notifications, not by polling).
            .args(if self.args.iter().any(|a| a == "--poll") {
                &[][..]
            } else {
                &["--poll", "100ms"][..]
            })
            .args(&self.args);
        // In fleet mode the policy comes from etcd (`--etcd` conflicts with `--policy`).
        if !self.args.iter().any(|a| a == "--etcd") {
            cmd.arg("--policy").arg(self.policy_path());
        }
        cmd.arg("--state")
            .arg(self.dir.join("state.json"))
            .arg("--socket")
            .arg(self.socket())
            .arg("--pin-root")
            .arg(&self.pin_root)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        Ok(cmd)
    }

    /// Starts p25d and waits (up to `timeout`) for it to exit, for start-up failures.
    /// Returns its exit status and log.
    pub fn run_to_exit(&mut self, timeout: Duration) -> Result<(std::process::ExitStatus, String)> {
        ensure!(self.child.is_none(), "p25d already running");
        self.starts += 1;
        let log_path = self.dir.join(format!("p25d-{}.log", self.starts));
        let log = fs::File::create(&log_path)?;
        let mut child = self.run_command(log)?.spawn().context("spawning p25d")?;
        let mut status = None;
        wait_until(timeout, Duration::from_millis(50), || {
            status = child.try_wait()?;
            Ok(status.is_some())
        })?;
        let Some(status) = status else {
            let _ = child.kill();
            let _ = child.wait();
            bail!("p25d kept running, expected it to exit:\n{}", self.log());
        };
        Ok((status, self.log()))
    }

    /// The daemon's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The daemon's log of the latest start.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join(format!("p25d-{}.log", self.starts))).unwrap_or_default()
    }

    /// SIGKILLs the daemon: no chance to clean up, as in a crash.
    pub fn kill9(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().context("killing p25d")?;
            child.wait()?;
        }
        Ok(())
    }

    /// Runs p25ctl against this daemon (or its pins) and returns its output.
    pub fn ctl(&self, args: &[&str]) -> Result<Output> {
        Command::new(self.binary("p25ctl")?)
            .arg("--socket")
            .arg(self.socket())
            .arg("--pin-root")
            .arg(&self.pin_root)
            .args(args)
            .output()
            .context("running p25ctl")
    }

    /// Runs p25ctl and fails unless it succeeds; returns stdout.
    pub fn ctl_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.ctl(args)?;
        ensure!(
            out.status.success(),
            "p25ctl {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `p25ctl status --json`.
    pub fn status(&self) -> Result<StatusView> {
        self.ctl_json(&["status", "--json"])
    }

    /// `p25ctl list --json`.
    pub fn list(&self) -> Result<ListView> {
        self.ctl_json(&["list", "--json"])
    }

    /// The runtime allowlist (`p25ctl allow` entries) as `p25ctl list` shows it, in its
    /// order.
    pub fn runtime_allow(&self) -> Result<Vec<ipnet::IpNet>> {
        Ok(self
            .list()?
            .allow
            .iter()
            .filter(|e| e.source == filter_user::control::Source::Runtime)
            .map(|e| e.prefix)
            .collect())
    }

    /// `p25ctl stats --json`.
    pub fn stats(&self) -> Result<StatsView> {
        self.ctl_json(&["stats", "--json"])
    }

    /// `p25ctl top --json --limit N`.
    pub fn top(&self, limit: usize) -> Result<Vec<OffenderView>> {
        self.ctl_json(&["top", "--json", "--limit", &limit.to_string()])
    }

    /// Runs p25ctl (which must succeed) and reads its `--json` output as a `T`.
    pub fn ctl_json<T: serde::de::DeserializeOwned>(&self, args: &[&str]) -> Result<T> {
        let out = self.ctl_ok(args)?;
        serde_json::from_str(&out).with_context(|| format!("p25ctl {args:?} printed {out}"))
    }
}

impl Drop for DaemonLab {
    fn drop(&mut self) {
        let _ = self.kill9();
        // The daemon leaves its pins on purpose; the test must not. The workspace's p25d
        // detaches, since a lab's own binary may be gone by now (a purged package).
        if let Ok(p25d) = bin("p25d") {
            let _ = Command::new(p25d)
                .args(["detach", "--all-versions", "--pin-root"])
                .arg(&self.pin_root)
                .output();
        }
        let _ = fs::remove_dir_all(&self.pin_root);
        let _ = fs::remove_dir_all(&self.dir);
    }
}
