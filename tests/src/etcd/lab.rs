//! A fleet lab: one etcd and N p25d routers following it, each router in its own network
//! namespace with its own pin root, for the fleet tests, `cargo xtask demo --fleet` and the
//! propagation bench.
//!
//! ```text
//!   netns ctl: etcd (0.0.0.0:PORT), p25ctl fleet, etcdctl
//!     c1 198.51.100.1/30 ── up0 198.51.100.2/30  netns edge-1: p25d --etcd --router edge-1
//!     c2 198.51.100.5/30 ── up0 198.51.100.6/30  netns edge-2: ...               (sub0 ⇄ sub0p)
//! ```
//!
//! Each router's verdict is read with BPF_PROG_TEST_RUN of `p25_xdp` over its pinned maps
//! (a [`Harness`] opened on the pins), so a check takes microseconds and needs no traffic.
//! Dropping the lab stops the routers (and removes their pins), then etcd, then the
//! namespaces.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    process::{Command, Output},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use filter_common::classify::{Action, Role};
use filter_user::{
    Dataplane,
    control::StatusView,
    fleet::views::{FleetStatusView, SourceView},
    loader::PinLayout,
};

use super::Etcd;
use crate::{
    daemon::{DaemonLab, bin},
    exporter,
    harness::{Harness, Hook},
    netns::{Netns, veth, wait_until},
    packet::Pkt,
};

/// The fleet's key prefix in the lab (the default).
pub const PREFIX: &str = "/p25";
/// Where probe SYNs go: a mail server on the "internet".
pub const MX: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 25);
/// How long a router may take to follow a change before a wait gives up. Generous: the
/// machine running the tests may be busy; the bench measures the real figure.
pub const FOLLOW_TIMEOUT: Duration = Duration::from_secs(20);

/// The lab's fleet policy: subscribers are 100.64.0.0/10 (so a probe from there to port
/// 25 is dropped unless allowlisted), one business prefix allowlisted, `sub0` attached.
pub const POLICY: &str = "\
version: 1
interfaces:
  - name: sub0
    role: subscriber
    attach: xdp
subscribers:
  - prefix: 100.64.0.0/10
allow:
  - prefix: 100.64.3.0/24
    comment: business customer
";

/// A subscriber address the lab policy allowlists (100.64.3.0/24).
pub const BUSINESS: Ipv4Addr = Ipv4Addr::new(100, 64, 3, 10);

/// One router of the lab.
#[derive(Debug)]
pub struct Router {
    /// Its name in the fleet (`--router`).
    pub name: String,
    /// Its verdict probe (dropped before the daemon, which removes the pins).
    probe: Option<Harness>,
    /// Its daemon.
    pub daemon: DaemonLab,
    /// Its namespace.
    pub netns: Netns,
}

impl Router {
    /// p25_xdp's verdict on a SYN from `src` to port 25 of [`MX`], over the router's pins.
    pub fn verdict(&mut self, src: Ipv4Addr) -> Result<Action> {
        if self.probe.is_none() {
            let mut dataplane = Dataplane::open_pinned(&PinLayout::new(&self.daemon.pin_root))
                .with_context(|| format!("opening {}'s pinned maps", self.name))?;
            let tables = dataplane.take_tables()?;
            self.probe = Some(Harness {
                dataplane,
                tables,
                role: Role::Subscriber,
            });
        }
        let probe = self.probe.as_mut().context("probe")?;
        let frame = Pkt::v4(src, 40_000, MX, 25).build();
        probe.run(Hook::Xdp, &frame)
    }

    /// `p25ctl status --json` of this router.
    pub fn status(&self) -> Result<StatusView> {
        self.daemon.status()
    }

    /// The policy source part of the status (fails if the daemon does not report one).
    pub fn source(&self) -> Result<SourceView> {
        self.status()?
            .source
            .with_context(|| format!("{}: p25ctl status --json has no source", self.name))
    }

    /// The router's `/metrics`.
    pub fn metrics(&self) -> Result<String> {
        exporter::scrape(&self.netns)
    }

    /// The value of a metric series (see [`exporter::metric`]).
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Result<Option<f64>> {
        Ok(exporter::metric(&self.metrics()?, name, labels))
    }

    /// Sends `signal` to the daemon (SIGSTOP / SIGCONT to freeze it).
    pub fn signal(&self, signal: libc::c_int) -> Result<()> {
        let pid = self.daemon.pid().context("the daemon is not running")?;
        let pid = libc::pid_t::try_from(pid)?;
        // SAFETY: kill has no memory preconditions; the pid is our own child's.
        let rc = unsafe { libc::kill(pid, signal) };
        ensure!(
            rc == 0,
            "kill({pid}, {signal}): {}",
            std::io::Error::last_os_error()
        );
        Ok(())
    }

    /// Waits until the router's verdict on `src` is `want`; returns how long that took.
    pub fn wait_verdict(
        &mut self,
        src: Ipv4Addr,
        want: Action,
        timeout: Duration,
    ) -> Result<Duration> {
        let start = Instant::now();
        let mut last = None;
        let ok = wait_until(timeout, Duration::from_millis(5), || {
            let verdict = self.verdict(src)?;
            last = Some(verdict);
            Ok(verdict == want)
        })?;
        ensure!(
            ok,
            "{}: verdict on {src} is {last:?}, not {want:?}, after {timeout:?}; its log:\n{}",
            self.name,
            self.daemon.log()
        );
        Ok(start.elapsed())
    }

    /// Waits until the router reports a policy revision of at least `revision` from a live
    /// source.
    pub fn wait_revision(&self, revision: i64, timeout: Duration) -> Result<SourceView> {
        let mut last = None;
        let ok = wait_until(timeout, Duration::from_millis(50), || {
            let source = self.source()?;
            let done = source.up && source.revision >= revision;
            last = Some(source);
            Ok(done)
        })?;
        ensure!(
            ok,
            "{}: not at revision {revision} after {timeout:?}: {last:?}; its log:\n{}",
            self.name,
            self.daemon.log()
        );
        last.context("no status")
    }
}

/// One etcd and N routers following it.
#[derive(Debug)]
pub struct FleetLab {
    /// The routers, in order (`edge-1`, `edge-2`, ...). Dropped first.
    pub routers: Vec<Router>,
    /// The store.
    pub etcd: Etcd,
    /// The namespace of etcd and of the fleet's operators (p25ctl fleet, etcdctl).
    pub ctl: Netns,
    /// Where p25d and p25ctl come from; the workspace's build ([`bin`]) if unset.
    bin_dir: Option<PathBuf>,
}

impl FleetLab {
    /// Starts etcd, puts `policy` at `<prefix>/policy`, and starts `routers` routers
    /// following it; returns once each has applied that policy.
    pub fn start(routers: usize, policy: &str) -> Result<Self> {
        Self::start_with(routers, policy, None)
    }

    /// [`FleetLab::start`] with p25d and p25ctl taken from `bin_dir` (the bench's release
    /// build) instead of the workspace's build.
    pub fn start_with(routers: usize, policy: &str, bin_dir: Option<PathBuf>) -> Result<Self> {
        ensure!(
            (1..=60).contains(&routers),
            "a fleet lab has 1 to 60 routers (a /30 each in 198.51.100.0/24), not {routers}"
        );
        let ctl = Netns::new("fleet-ctl")?;
        let etcd = Etcd::start_in(&ctl)?;
        let revision = etcd.put(&format!("{PREFIX}/policy"), policy)?;
        let mut lab = Self {
            routers: Vec::new(),
            etcd,
            ctl,
            bin_dir,
        };
        for i in 1..=routers {
            lab.add_router(i)?;
        }
        for router in &lab.routers {
            router.wait_revision(revision, FOLLOW_TIMEOUT)?;
        }
        Ok(lab)
    }

    fn add_router(&mut self, i: usize) -> Result<()> {
        let name = format!("edge-{i}");
        let netns = Netns::new(&name)?;
        let base = u8::try_from(4 * (i - 1)).context("router index")?;
        let ctl_if = format!("c{i}");
        veth(&self.ctl, &ctl_if, &netns, "up0")?;
        let ctl_addr = Ipv4Addr::new(198, 51, 100, base + 1);
        self.ctl.add_addr(&ctl_if, &format!("{ctl_addr}/30"))?;
        netns.add_addr("up0", &format!("198.51.100.{}/30", base + 2))?;
        // The subscriber-facing interface the policy attaches to.
        netns.ip(&[
            "link", "add", "sub0", "type", "veth", "peer", "name", "sub0p",
        ])?;
        netns.ip(&["link", "set", "sub0", "up"])?;
        netns.ip(&["link", "set", "sub0p", "up"])?;
        let mut daemon = DaemonLab::new(&netns)?;
        if let Some(dir) = &self.bin_dir {
            daemon.use_binaries(dir);
        }
        let endpoint = self.etcd.endpoint_on(IpAddr::V4(ctl_addr));
        daemon.run_args(&["--etcd", &endpoint, "--router", &name]);
        daemon.start().with_context(|| format!("starting {name}"))?;
        self.routers.push(Router {
            name,
            probe: None,
            daemon,
            netns,
        });
        Ok(())
    }

    fn binary(&self, name: &str) -> Result<PathBuf> {
        match &self.bin_dir {
            Some(dir) => Ok(dir.join(name)),
            None => bin(name),
        }
    }

    /// `p25ctl fleet --etcd ... ARGS` in the operators' namespace (not run yet).
    pub fn fleet_command(&self, args: &[&str]) -> Result<Command> {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.ctl.path().display()))
            .arg("--")
            .arg(self.binary("p25ctl")?)
            .args([
                "fleet",
                "--etcd",
                &self.etcd.endpoint(),
                "--etcd-prefix",
                PREFIX,
            ])
            .args(args);
        Ok(cmd)
    }

    /// Runs `p25ctl fleet --etcd ... ARGS` in the operators' namespace.
    pub fn fleet(&self, args: &[&str]) -> Result<Output> {
        self.fleet_command(args)?
            .output()
            .context("running p25ctl fleet")
    }

    /// [`FleetLab::fleet`], which must succeed; returns its standard output.
    pub fn fleet_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.fleet(args)?;
        ensure!(
            out.status.success(),
            "p25ctl fleet {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `p25ctl fleet status --json`.
    pub fn fleet_status(&self) -> Result<FleetStatusView> {
        let out = self.fleet_ok(&["status", "--json"])?;
        serde_json::from_str(&out).with_context(|| format!("p25ctl fleet status printed {out}"))
    }

    /// Fails unless every router's verdict on `src` is `want` right now.
    pub fn check_verdicts(&mut self, src: Ipv4Addr, want: Action) -> Result<()> {
        for router in &mut self.routers {
            let got = router.verdict(src)?;
            ensure!(
                got == want,
                "{}: {src} is {got:?}, expected {want:?}",
                router.name
            );
        }
        Ok(())
    }

    /// Waits until every router's verdict on `src` is `want`; returns how long the slowest
    /// took (measured from the call).
    pub fn wait_verdicts(
        &mut self,
        src: Ipv4Addr,
        want: Action,
        timeout: Duration,
    ) -> Result<Duration> {
        let start = Instant::now();
        for router in &mut self.routers {
            let left = timeout.saturating_sub(start.elapsed());
            router.wait_verdict(src, want, left)?;
        }
        Ok(start.elapsed())
    }

    /// Waits until every router reports at least `revision` from a live source.
    pub fn wait_revision(&self, revision: i64) -> Result<()> {
        for router in &self.routers {
            router.wait_revision(revision, FOLLOW_TIMEOUT)?;
        }
        Ok(())
    }

    /// The router called `name`.
    pub fn router(&mut self, name: &str) -> Result<&mut Router> {
        match self.routers.iter_mut().find(|r| r.name == name) {
            Some(router) => Ok(router),
            None => bail!("no router {name} in the lab"),
        }
    }
}

impl Router {
    /// Restarts the daemon from nothing but its state directory: SIGKILL, then every pin
    /// removed (`p25d detach --all-versions`), then a fresh start. What it enforces
    /// afterwards came from its state files (the fleet snapshot), not from maps left
    /// behind.
    pub fn restart_without_pins(&mut self) -> Result<()> {
        self.probe = None;
        self.daemon.kill9()?;
        let out = Command::new(bin("p25d")?)
            .args(["detach", "--all-versions", "--pin-root"])
            .arg(&self.daemon.pin_root)
            .output()
            .context("running p25d detach")?;
        ensure!(
            out.status.success(),
            "p25d detach --pin-root {}: {}",
            self.daemon.pin_root.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(
            PinLayout::new(&self.daemon.pin_root)
                .pinned_links()
                .is_empty(),
            "{}: links still pinned after detach",
            self.name
        );
        self.daemon
            .start()
            .with_context(|| format!("restarting {}", self.name))
    }
}
