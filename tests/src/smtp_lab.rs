//! The SMTP lab: subscribers with a real SMTP client (swaks), a border router running the
//! real p25d with `policies/lab.yaml`, and an "internet" host with a real SMTP server
//! (aiosmtpd) on 25, 587 and 465. Used by the end-to-end tests (`tests/tests/e2e.rs`) and
//! by the demo (`cargo xtask demo`, `src/bin/p25-demo.rs`).
//!
//! ```text
//!  residential 100.64.1.10 ─┐
//!  infected    100.64.2.66 ─┤   switch          router (p25d)                internet
//!  business    100.64.3.25 ─┤  ┌──────┐   ┌─────────────────────────┐
//!    + 2001:db8:100:3::25   ├──┤ br0  ├───┤ r-sub  [p25_xdp]        │
//!  dual-stack  100.64.4.46 ─┤  └──────┘   │                 r-up [p25_tc] ── eth0
//!    + 2001:db8:100:4::46   │             │ r-vlan [p25_xdp]        │   198.51.100.25
//!  new pool    100.64.9.9  ─┤             └──┬──────────────────────┘   2001:db8:2::25
//!  infra       192.0.2.10  ─┘                │ 802.1Q VLAN 100          aiosmtpd on
//!    + 2001:db8:ff::10                       │ (every frame tagged)     25, 587, 465
//!  vlan        100.64.5.50 ──────────────────┘
//!    + 2001:db8:100:5::50
//! ```
//!
//! The subscribers (and the ISP's own infrastructure host, outside subscriber space) share
//! one L2 segment, a bridge in the switch namespace, each in its own subnet with the
//! router's address in it as gateway. The new-pool subscriber is in the prefix the policy
//! keeps in monitor mode. The VLAN subscriber has its own trunk link to the router on
//! which every frame carries an 802.1Q tag (see [`crate::vlan_tag`]), so p25_xdp on
//! `r-vlan` parses the VLAN header.
//!
//! Delivery is judged at both ends: swaks must finish the SMTP transaction (exit 0) *and*
//! the server must have logged the message (each attempt has a unique envelope sender).
//!
//! Cleanup: dropping the lab stops p25d and removes its pins, stops the SMTP server, kills
//! anything still running inside the lab's namespaces and deletes them, then removes the
//! scratch directory. The demo's `--keep` instead forgets the lab ([`SmtpLab::keep`]);
//! [`teardown_demo`] removes such a lab by its fixed names.

#![expect(
    clippy::indexing_slicing,
    reason = "serde_json::Value indexing yields Null for a missing key; it never panics"
)]

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::Value;

use crate::{
    daemon::{DaemonLab, bin},
    netns::{NETNS_RUN_DIR, Netns, veth, wait_until},
    vlan_tag::TaggedLink,
};

/// The lab policy, exactly the file shipped in `policies/`.
pub const LAB_POLICY: &str = include_str!("../../policies/lab.yaml");
/// The SMTP server script (run by Debian's python3, which has aiosmtpd).
const SERVER_SCRIPT: &str = include_str!("smtp_server.py");
/// Debian's interpreter: python3-aiosmtpd installs into its dist-packages, which another
/// python3 earlier in PATH (pyenv, a venv) would not see.
const PYTHON: &str = "/usr/bin/python3";

pub const SMTP: u16 = 25;
pub const SUBMISSION: u16 = 587;
pub const SUBMISSIONS: u16 = 465;
/// The three ports every subscriber tries.
pub const PORTS: [u16; 3] = [SMTP, SUBMISSION, SUBMISSIONS];

/// The VLAN the VLAN subscriber is on.
pub const VLAN_ID: u16 = 100;
/// The router's subscriber-facing interface (XDP), as in the lab policy.
pub const ROUTER_SUB_IF: &str = "r-sub";
/// The router's VLAN trunk towards the VLAN subscriber (XDP), as in the lab policy.
pub const ROUTER_VLAN_IF: &str = "r-vlan";
/// The router's upstream interface (TC), as in the lab policy.
pub const ROUTER_UP_IF: &str = "r-up";

pub const SERVER4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 25);
pub const SERVER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 0x25);
const GW_UP4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const GW_UP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 1);

/// Fixed names of the demo lab (the tests use unique `p25t-PID-N-ROLE` names).
pub const DEMO_NETNS_PREFIX: &str = "p25demo-";
/// The demo's pin root: its own, so a real p25 install under /sys/fs/bpf/p25 is untouched.
pub const DEMO_PIN_ROOT: &str = "/sys/fs/bpf/p25-demo";
/// The demo's scratch directory (policy, state, socket, certificate, logs).
pub const DEMO_DIR: &str = "/run/p25-demo";
/// Where `--keep` pins the VLAN tagging links so that they outlive the demo process.
pub const DEMO_VLAN_PIN_DIR: &str = "/sys/fs/bpf/p25-demo-vlan";

/// Upper bound on the SMTP server's life in the tests, should a test hang or be killed.
const TEST_SERVER_LIFETIME: Duration = Duration::from_secs(600);
/// Upper bound on the SMTP server's life in the demo (long, for `--keep`).
const DEMO_SERVER_LIFETIME: Duration = Duration::from_secs(8 * 3600);
/// swaks' own timeout per step (connect included) when the attempt is expected to be
/// blocked: a dropped SYN shows up as this.
pub const BLOCK_TIMEOUT: Duration = Duration::from_secs(2);
/// swaks' timeout per step when delivery is expected: generous, so that a loaded machine
/// (CI runs the tests in parallel on two cores) is not mistaken for a block.
pub const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);
/// Hard limit on one swaks run, after which it is killed.
const SWAKS_LIMIT: Duration = Duration::from_secs(60);

/// Who a lab host is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// A residential subscriber.
    Residential,
    /// An "infected" subscriber: a spam bot hammering port 25.
    Infected,
    /// A business customer on the allowlist (policy), dual-stack.
    Business,
    /// A dual-stack residential subscriber.
    DualStack,
    /// A dual-stack subscriber behind an 802.1Q VLAN.
    Vlan,
    /// A subscriber in the pool the policy keeps in monitor mode.
    NewPool,
    /// ISP infrastructure outside subscriber space (its port 25 is never filtered).
    Infra,
}

/// The subscribers whose mail both the demo's table and the e2e test send: every role
/// but the monitor-mode pool (shown on its own) and the infrastructure host.
pub const MAILING_SUBSCRIBERS: [Role; 5] = [
    Role::Residential,
    Role::Infected,
    Role::Business,
    Role::DualStack,
    Role::Vlan,
];

/// One host of the lab: its addresses and where it is attached.
#[derive(Clone, Copy, Debug)]
pub struct HostSpec {
    pub role: Role,
    /// Short name: namespace role and switch port suffix (at most 8 bytes).
    pub short: &'static str,
    /// What the demo table calls it.
    pub label: &'static str,
    pub v4: Ipv4Addr,
    pub gw4: Ipv4Addr,
    pub v6: Option<(Ipv6Addr, Ipv6Addr)>,
    pub vlan: Option<u16>,
    /// Whether p25 should let its port-25 mail through (policy allowlist, monitor mode,
    /// or outside subscriber space).
    pub port25_passes: bool,
}

impl HostSpec {
    /// The addresses this host sends from: its IPv4 address, then its IPv6 one if any.
    pub fn sources(&self) -> Vec<IpAddr> {
        let mut all = vec![IpAddr::V4(self.v4)];
        all.extend(self.v6.map(|(addr, _)| IpAddr::V6(addr)));
        all
    }

    /// What p25 must do to this host's mail on `port`: deliver it, unless it is port 25
    /// and the host's port-25 mail does not pass.
    pub fn expected(&self, port: u16) -> Outcome {
        if port != SMTP || self.port25_passes {
            Outcome::Delivered
        } else {
            Outcome::Blocked
        }
    }
}

const fn v6(a: u16, b: u16, c: u16, d: u16, host: u16) -> Ipv6Addr {
    Ipv6Addr::new(a, b, c, d, 0, 0, 0, host)
}

/// Every host, in the order the demo shows them.
pub static HOSTS: [HostSpec; 7] = [
    HostSpec {
        role: Role::Residential,
        short: "resi",
        label: "residential",
        v4: Ipv4Addr::new(100, 64, 1, 10),
        gw4: Ipv4Addr::new(100, 64, 1, 1),
        v6: None,
        vlan: None,
        port25_passes: false,
    },
    HostSpec {
        role: Role::Infected,
        short: "bot",
        label: "infected (spam bot)",
        v4: Ipv4Addr::new(100, 64, 2, 66),
        gw4: Ipv4Addr::new(100, 64, 2, 1),
        v6: None,
        vlan: None,
        port25_passes: false,
    },
    HostSpec {
        role: Role::Business,
        short: "biz",
        label: "business (allowlisted)",
        v4: Ipv4Addr::new(100, 64, 3, 25),
        gw4: Ipv4Addr::new(100, 64, 3, 1),
        v6: Some((
            v6(0x2001, 0xdb8, 0x100, 3, 0x25),
            v6(0x2001, 0xdb8, 0x100, 3, 1),
        )),
        vlan: None,
        port25_passes: true,
    },
    HostSpec {
        role: Role::DualStack,
        short: "dual",
        label: "dual-stack",
        v4: Ipv4Addr::new(100, 64, 4, 46),
        gw4: Ipv4Addr::new(100, 64, 4, 1),
        v6: Some((
            v6(0x2001, 0xdb8, 0x100, 4, 0x46),
            v6(0x2001, 0xdb8, 0x100, 4, 1),
        )),
        vlan: None,
        port25_passes: false,
    },
    HostSpec {
        role: Role::Vlan,
        short: "vlan",
        label: "VLAN 100",
        v4: Ipv4Addr::new(100, 64, 5, 50),
        gw4: Ipv4Addr::new(100, 64, 5, 1),
        v6: Some((
            v6(0x2001, 0xdb8, 0x100, 5, 0x50),
            v6(0x2001, 0xdb8, 0x100, 5, 1),
        )),
        vlan: Some(VLAN_ID),
        port25_passes: false,
    },
    HostSpec {
        role: Role::NewPool,
        short: "pool",
        label: "new pool (monitor)",
        v4: Ipv4Addr::new(100, 64, 9, 9),
        gw4: Ipv4Addr::new(100, 64, 9, 1),
        v6: None,
        vlan: None,
        port25_passes: true,
    },
    HostSpec {
        role: Role::Infra,
        short: "infra",
        label: "ISP infrastructure",
        v4: Ipv4Addr::new(192, 0, 2, 10),
        gw4: Ipv4Addr::new(192, 0, 2, 1),
        v6: Some((
            v6(0x2001, 0xdb8, 0xff, 0, 0x10),
            v6(0x2001, 0xdb8, 0xff, 0, 1),
        )),
        vlan: None,
        port25_passes: true,
    },
];

/// The spec of a role ([`HOSTS`] lists every role once; a unit test checks it).
pub fn spec(role: Role) -> Option<&'static HostSpec> {
    HOSTS.iter().find(|h| h.role == role)
}

/// How the lab names its namespaces and where it keeps its state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Naming {
    /// Unique names, private pins and scratch directory: tests run in parallel.
    Test,
    /// The demo's fixed names ([`DEMO_NETNS_PREFIX`], [`DEMO_PIN_ROOT`], [`DEMO_DIR`]).
    Demo,
}

/// A lab host and its namespace.
#[derive(Debug)]
pub struct Host {
    pub spec: &'static HostSpec,
    pub netns: Netns,
}

/// What became of one SMTP attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// swaks completed the transaction and the server logged the message.
    Delivered,
    /// The TCP connection never came up within swaks' timeout: the SYN was dropped.
    Blocked,
    /// Anything else (refused, TLS failure, swaks succeeded but the server saw nothing...).
    Failed(String),
}

impl Outcome {
    /// The swaks timeout to use when expecting this outcome.
    pub fn timeout(&self) -> Duration {
        match self {
            Self::Blocked => BLOCK_TIMEOUT,
            _ => DELIVERY_TIMEOUT,
        }
    }

    /// Short form for tables.
    pub fn describe(&self) -> String {
        match self {
            Self::Delivered => "delivered".to_owned(),
            Self::Blocked => "BLOCKED (no answer: SYN dropped)".to_owned(),
            Self::Failed(why) => format!("FAILED: {why}"),
        }
    }
}

/// One swaks run.
#[derive(Clone, Debug)]
pub struct Attempt {
    pub role: Role,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub port: u16,
    pub outcome: Outcome,
    pub elapsed: Duration,
    /// swaks' transcript (both streams).
    pub transcript: String,
}

/// A swaks run in progress.
#[derive(Debug)]
pub struct PendingAttempt {
    role: Role,
    src: IpAddr,
    dst: IpAddr,
    port: u16,
    sender: String,
    transcript: PathBuf,
    child: Child,
    started: Instant,
}

/// The SMTP server process; killed on drop.
#[derive(Debug)]
struct SmtpServer {
    child: Child,
    log: PathBuf,
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Removes a directory on drop.
#[derive(Debug)]
struct ScratchDir(PathBuf);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Creates a namespace for a role, named as the [`Naming`] says.
type NetnsMaker = Box<dyn Fn(&str) -> Result<Netns>>;

static NEXT_LAB: AtomicU32 = AtomicU32::new(0);
static NEXT_MAIL: AtomicU32 = AtomicU32::new(0);

/// The whole lab. Fields drop in declaration order: the daemon (its pins) and the server
/// first, then the namespaces, then the scratch directory. [`Drop`] for the lab itself
/// runs before all of them and kills whatever else still runs in the namespaces.
#[derive(Debug)]
pub struct SmtpLab {
    /// The running p25d (inside the router namespace).
    pub daemon: DaemonLab,
    server: SmtpServer,
    vlan: TaggedLink,
    /// Subscribers and the infrastructure host, in [`HOSTS`] order.
    pub hosts: Vec<Host>,
    pub internet: Netns,
    pub router: Netns,
    pub switch: Netns,
    dir: ScratchDir,
}

impl SmtpLab {
    /// Builds the topology, starts the SMTP server and p25d with the lab policy, and
    /// waits until both answer.
    pub fn build(naming: Naming) -> Result<Self> {
        crate::require_root();
        let (dir, new_netns): (PathBuf, NetnsMaker) = match naming {
            Naming::Test => (
                std::env::temp_dir().join(format!(
                    "p25t-{}-smtp{}",
                    std::process::id(),
                    NEXT_LAB.fetch_add(1, Ordering::Relaxed)
                )),
                Box::new(Netns::new),
            ),
            Naming::Demo => (
                PathBuf::from(DEMO_DIR),
                Box::new(|role: &str| Netns::named(&format!("{DEMO_NETNS_PREFIX}{role}"))),
            ),
        };
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let dir = ScratchDir(dir);

        let switch = new_netns("switch")?;
        let router = new_netns("router")?;
        let internet = new_netns("internet")?;
        let hosts = HOSTS
            .iter()
            .map(|spec| {
                Ok(Host {
                    spec,
                    netns: new_netns(spec.short)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let vlan = wire(&switch, &router, &internet, &hosts)?;

        let server = start_server(&internet, &dir.0, naming)?;
        let mut daemon = match naming {
            Naming::Test => DaemonLab::new(&router)?,
            Naming::Demo => {
                DaemonLab::at(&router, dir.0.join("p25d"), PathBuf::from(DEMO_PIN_ROOT))?
            }
        };
        daemon.write_policy(LAB_POLICY)?;
        daemon
            .start()
            .context("starting p25d with policies/lab.yaml")?;
        Ok(Self {
            daemon,
            server,
            vlan,
            hosts,
            internet,
            router,
            switch,
            dir,
        })
    }

    /// Leaves the whole lab running (namespaces, p25d, pins, SMTP server) for exploring;
    /// [`teardown_demo`] removes it later.
    pub fn keep(self) -> Result<()> {
        self.vlan.pin(Path::new(DEMO_VLAN_PIN_DIR))?;
        std::mem::forget(self);
        Ok(())
    }

    /// The scratch directory (certificate, server log, transcripts).
    pub fn dir(&self) -> &Path {
        &self.dir.0
    }

    /// The host of a role.
    pub fn host(&self, role: Role) -> Result<&Host> {
        self.hosts
            .iter()
            .find(|h| h.spec.role == role)
            .with_context(|| format!("no {role:?} host in the lab"))
    }

    /// Every namespace of the lab.
    pub fn namespaces(&self) -> Vec<&Netns> {
        let mut all = vec![&self.switch, &self.router, &self.internet];
        all.extend(self.hosts.iter().map(|h| &h.netns));
        all
    }

    /// Starts one swaks run from `src` (an address of `role`'s host) to the server's
    /// address of the same family on `port`: plain on 25, STARTTLS on 587, implicit TLS
    /// on 465. `timeout` is swaks' per-step timeout ([`BLOCK_TIMEOUT`] or
    /// [`DELIVERY_TIMEOUT`]).
    pub fn spawn_mail(
        &self,
        role: Role,
        src: IpAddr,
        port: u16,
        timeout: Duration,
    ) -> Result<PendingAttempt> {
        let host = self.host(role)?;
        let dst: IpAddr = if src.is_ipv4() {
            SERVER4.into()
        } else {
            SERVER6.into()
        };
        let n = NEXT_MAIL.fetch_add(1, Ordering::Relaxed);
        let sender = format!("{}-{n}@subscribers.lab.example", host.spec.short);
        let transcript = self.dir.0.join(format!("swaks-{n}.txt"));
        let out = fs::File::create(&transcript)
            .with_context(|| format!("creating {}", transcript.display()))?;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", host.netns.path().display()))
            .args(["--", "swaks", "--server"])
            .arg(dst.to_string())
            .args(["--port", &port.to_string()])
            .args(["--local-interface", &src.to_string()])
            .args(["--from", &sender, "--to", "postmaster@mx.lab.example"])
            // No DNS in the lab: name ourselves instead of letting swaks look it up.
            .args([
                "--helo",
                &format!("{}.subscribers.lab.example", host.spec.short),
            ])
            .args(["--timeout", &format!("{}s", timeout.as_secs().max(1))])
            .args([
                "--header",
                &format!("Subject: p25 lab: {} to port {port}", host.spec.label),
            ])
            .args(["--body", "Sent by the p25 lab through the border router."]);
        match port {
            SUBMISSION => {
                cmd.arg("--tls");
            }
            SUBMISSIONS => {
                cmd.arg("--tls-on-connect");
            }
            _ => {}
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("starting swaks (installed by `cargo xtask setup`)")?;
        Ok(PendingAttempt {
            role,
            src,
            dst,
            port,
            sender,
            transcript,
            child,
            started: Instant::now(),
        })
    }

    /// Waits for a swaks run (killing it past `SWAKS_LIMIT`) and judges the outcome.
    pub fn finish(&self, mut pending: PendingAttempt) -> Result<Attempt> {
        let mut status = None;
        wait_until(SWAKS_LIMIT, Duration::from_millis(20), || {
            status = pending.child.try_wait()?;
            Ok(status.is_some())
        })?;
        let elapsed = pending.started.elapsed();
        let Some(status) = status else {
            let _ = pending.child.kill();
            let _ = pending.child.wait();
            bail!(
                "swaks from {} to port {} still ran after {SWAKS_LIMIT:?}",
                pending.src,
                pending.port
            );
        };
        let transcript = fs::read_to_string(&pending.transcript).unwrap_or_default();
        let seen = self.server_saw(&pending.sender, pending.port)?;
        let outcome = if status.success() && seen {
            Outcome::Delivered
        } else if status.success() {
            Outcome::Failed("swaks succeeded but the server logged no message".to_owned())
        } else if seen {
            Outcome::Failed(format!(
                "swaks failed ({status}) but the server got the mail"
            ))
        } else if transcript.contains("Error connecting") && transcript.contains("timeout") {
            Outcome::Blocked
        } else {
            let last = transcript
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or_default();
            Outcome::Failed(format!("swaks {status}: {}", last.trim()))
        };
        Ok(Attempt {
            role: pending.role,
            src: pending.src,
            dst: pending.dst,
            port: pending.port,
            outcome,
            elapsed,
            transcript,
        })
    }

    /// One swaks run, start to end.
    pub fn send_mail(
        &self,
        role: Role,
        src: IpAddr,
        port: u16,
        timeout: Duration,
    ) -> Result<Attempt> {
        let pending = self.spawn_mail(role, src, port, timeout)?;
        self.finish(pending)
    }

    /// Whether the server logged a message from `sender` received on `port`.
    fn server_saw(&self, sender: &str, port: u16) -> Result<bool> {
        Ok(self
            .deliveries()?
            .iter()
            .any(|d| d["mail_from"] == sender && d["port"] == port))
    }

    /// Every message the server received so far (one JSON object each: port, peer, tls,
    /// mail_from, rcpt_tos, bytes).
    pub fn deliveries(&self) -> Result<Vec<Value>> {
        let text = match fs::read_to_string(&self.server.log) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e).context("reading the SMTP server's log"),
        };
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).with_context(|| format!("server log line {l:?}")))
            .collect()
    }

    /// `p25ctl stats --json`: packets of the verdict counters matching direction
    /// (`egress`/`inbound`), family (`ipv4`/`ipv6`) and verdict, summed over any further
    /// breakdown (such as per interface).
    pub fn verdict_packets(&self, direction: &str, family: &str, verdict: &str) -> Result<u64> {
        Ok(self
            .daemon
            .stats()?
            .verdicts
            .iter()
            .filter(|r| r.direction == direction && r.family == family && r.name == verdict)
            .map(|r| r.packets)
            .sum())
    }

    /// IDs of the BPF links pinned by p25d (to check later that they are gone).
    pub fn pinned_link_ids(&self) -> Result<Vec<u64>> {
        pinned_link_ids(&self.daemon.pin_root)
    }
}

impl Drop for SmtpLab {
    fn drop(&mut self) {
        // Whatever still runs in the lab (a swaks the caller abandoned, the server, the
        // daemon) would keep its namespace alive after `ip netns del`; the daemon and the
        // server are killed again by their own guards, which is harmless.
        for netns in self.namespaces() {
            kill_processes_in(netns.name());
        }
    }
}

/// Wires the namespaces together and addresses everything; returns the VLAN tagging.
fn wire(switch: &Netns, router: &Netns, internet: &Netns, hosts: &[Host]) -> Result<TaggedLink> {
    switch.ip(&["link", "add", "br0", "type", "bridge"])?;
    // No MLD querier in the lab: without snooping, IPv6 neighbour discovery is flooded.
    switch.ip(&[
        "link",
        "set",
        "br0",
        "type",
        "bridge",
        "mcast_snooping",
        "0",
    ])?;
    switch.ip(&["link", "set", "br0", "up"])?;
    veth(router, ROUTER_SUB_IF, switch, "sw-rtr")?;
    switch.ip(&["link", "set", "sw-rtr", "master", "br0"])?;

    let mut vlan = None;
    for host in hosts {
        let spec = host.spec;
        let router_dev = match spec.vlan {
            Some(id) => {
                veth(&host.netns, "eth0", router, ROUTER_VLAN_IF)?;
                vlan = Some(TaggedLink::new(
                    &host.netns,
                    "eth0",
                    router,
                    ROUTER_VLAN_IF,
                    id,
                )?);
                ROUTER_VLAN_IF
            }
            None => {
                let port = format!("sw-{}", spec.short);
                veth(&host.netns, "eth0", switch, &port)?;
                switch.ip(&["link", "set", &port, "master", "br0"])?;
                ROUTER_SUB_IF
            }
        };
        host.netns.add_addr("eth0", &format!("{}/24", spec.v4))?;
        router.add_addr(router_dev, &format!("{}/24", spec.gw4))?;
        host.netns.add_route("default", &spec.gw4.to_string())?;
        if let Some((addr, gw)) = spec.v6 {
            host.netns.add_addr("eth0", &format!("{addr}/64"))?;
            router.add_addr(router_dev, &format!("{gw}/64"))?;
            host.netns.add_route("default", &gw.to_string())?;
        }
    }

    veth(router, ROUTER_UP_IF, internet, "eth0")?;
    router.add_addrs(
        ROUTER_UP_IF,
        &[&format!("{GW_UP4}/24"), &format!("{GW_UP6}/64")],
    )?;
    internet.add_addrs(
        "eth0",
        &[&format!("{SERVER4}/24"), &format!("{SERVER6}/64")],
    )?;
    internet.add_route("default", &GW_UP4.to_string())?;
    internet.add_route("default", &GW_UP6.to_string())?;
    router.enable_forwarding()?;
    vlan.context("the lab has no VLAN host")
}

/// Creates a throwaway self-signed certificate in `dir` and starts the SMTP server in
/// `internet`, waiting until it listens.
fn start_server(internet: &Netns, dir: &Path, naming: Naming) -> Result<SmtpServer> {
    let (cert, key) = (dir.join("mx-cert.pem"), dir.join("mx-key.pem"));
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .arg("ec_paramgen_curve:prime256v1")
        .args(["-nodes", "-days", "2", "-subj", "/CN=mx.lab.example"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdin(Stdio::null())
        .output()
        .context("running openssl to make the lab's certificate")?;
    ensure!(
        out.status.success(),
        "openssl req failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let script = dir.join("smtp_server.py");
    fs::write(&script, SERVER_SCRIPT)?;
    let (log, ready) = (dir.join("deliveries.jsonl"), dir.join("smtp-ready"));
    let lifetime = match naming {
        Naming::Test => TEST_SERVER_LIFETIME,
        Naming::Demo => DEMO_SERVER_LIFETIME,
    };
    let server_log = fs::File::create(dir.join("smtp-server.log"))?;
    let child = Command::new("nsenter")
        .arg(format!("--net={}", internet.path().display()))
        .args(["--", PYTHON, "-u"])
        .arg(&script)
        .arg("--cert")
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .arg("--log")
        .arg(&log)
        .arg("--ready")
        .arg(&ready)
        .args(["--lifetime", &lifetime.as_secs().to_string()])
        .stdin(Stdio::null())
        .stdout(server_log.try_clone()?)
        .stderr(server_log)
        .spawn()
        .context("starting the SMTP server (python3-aiosmtpd)")?;
    let mut server = SmtpServer { child, log };
    let up = wait_until(Duration::from_secs(20), Duration::from_millis(50), || {
        if let Some(status) = server.child.try_wait()? {
            bail!(
                "the SMTP server exited ({status}):\n{}",
                fs::read_to_string(dir.join("smtp-server.log")).unwrap_or_default()
            );
        }
        Ok(ready.exists())
    })?;
    ensure!(up, "the SMTP server did not listen within 20 s");
    Ok(server)
}

/// IDs of the BPF links pinned under `pin_root` (any ABI version).
pub fn pinned_link_ids(pin_root: &Path) -> Result<Vec<u64>> {
    let mut ids = Vec::new();
    let Ok(versions) = fs::read_dir(pin_root) else {
        return Ok(ids);
    };
    for version in versions.flatten() {
        let Ok(links) = fs::read_dir(version.path().join("links")) else {
            continue;
        };
        for link in links.flatten() {
            let out = Command::new("bpftool")
                .args(["link", "show", "pinned"])
                .arg(link.path())
                .arg("--json")
                .output()
                .context("running bpftool")?;
            if let Ok(info) = serde_json::from_slice::<Value>(&out.stdout)
                && let Some(id) = info["id"].as_u64()
            {
                ids.push(id);
            }
        }
    }
    Ok(ids)
}

/// Which of `ids` the kernel still has as BPF links.
pub fn live_links(ids: &[u64]) -> Result<Vec<u64>> {
    let out = Command::new("bpftool")
        .args(["link", "list", "--json"])
        .output()
        .context("running bpftool link list")?;
    let links: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    Ok(links
        .as_array()
        .map(|all| {
            all.iter()
                .filter_map(|l| l["id"].as_u64())
                .filter(|id| ids.contains(id))
                .collect()
        })
        .unwrap_or_default())
}

/// SIGKILLs every process inside the namespace `name` (all of them were started by the
/// lab: server, daemon, clients).
fn kill_processes_in(name: &str) {
    let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() else {
        return;
    };
    for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        if let Ok(pid) = pid.parse::<libc::pid_t>()
            && pid > 1
        {
            // SAFETY: kill(2) with a pid read from the kernel's list for our namespace.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

/// The demo lab's namespaces that exist right now.
pub fn demo_namespaces() -> Vec<String> {
    fs::read_dir(NETNS_RUN_DIR)
        .map(|dir| {
            let mut names: Vec<String> = dir
                .flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with(DEMO_NETNS_PREFIX))
                .collect();
            names.sort();
            names
        })
        .unwrap_or_default()
}

/// What a demo lab left behind: namespaces, pins, scratch directory.
pub fn demo_leftovers() -> Vec<String> {
    let mut left: Vec<String> = demo_namespaces()
        .into_iter()
        .map(|n| format!("network namespace {n}"))
        .collect();
    if Path::new(DEMO_PIN_ROOT).exists() {
        left.push(format!("pins under {DEMO_PIN_ROOT}"));
    }
    if Path::new(DEMO_DIR).exists() {
        left.push(format!("directory {DEMO_DIR}"));
    }
    if Path::new(DEMO_VLAN_PIN_DIR).exists() {
        left.push(format!("VLAN link pins under {DEMO_VLAN_PIN_DIR}"));
    }
    left
}

/// Removes a demo lab left running (`--keep`, or a crashed run), from its fixed names:
/// kills the processes in its namespaces (p25d, the SMTP server), detaches and unpins
/// p25, deletes the namespaces and the scratch directory. Returns what it removed.
pub fn teardown_demo() -> Result<Vec<String>> {
    let found = demo_leftovers();
    let namespaces = demo_namespaces();
    for name in &namespaces {
        kill_processes_in(name);
    }
    let link_ids = pinned_link_ids(Path::new(DEMO_PIN_ROOT))?;
    if Path::new(DEMO_PIN_ROOT).exists() {
        let out = Command::new(bin("p25d")?)
            .args(["detach", "--all-versions", "--pin-root", DEMO_PIN_ROOT])
            .output()
            .context("running p25d detach")?;
        ensure!(
            out.status.success(),
            "p25d detach --pin-root {DEMO_PIN_ROOT} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let _ = fs::remove_dir_all(DEMO_PIN_ROOT);
    }
    for name in &namespaces {
        let out = Command::new("ip").args(["netns", "del", name]).output()?;
        ensure!(
            out.status.success(),
            "ip netns del {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    if Path::new(DEMO_DIR).exists() {
        fs::remove_dir_all(DEMO_DIR).with_context(|| format!("removing {DEMO_DIR}"))?;
    }
    if Path::new(DEMO_VLAN_PIN_DIR).exists() {
        fs::remove_dir_all(DEMO_VLAN_PIN_DIR)
            .with_context(|| format!("removing {DEMO_VLAN_PIN_DIR}"))?;
    }
    wait_links_gone(&link_ids)?;
    Ok(found)
}

/// Waits until none of the BPF links `ids` exists any more (namespaces are destroyed
/// asynchronously by the kernel, and their links with them).
pub fn wait_links_gone(ids: &[u64]) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    let gone = wait_until(Duration::from_secs(15), Duration::from_millis(100), || {
        Ok(live_links(ids)?.is_empty())
    })?;
    ensure!(
        gone,
        "BPF links {:?} still exist after teardown",
        live_links(ids)?
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_role_once_and_names_fit() {
        for (i, host) in HOSTS.iter().enumerate() {
            assert_eq!(spec(host.role).map(|s| s.short), Some(host.short));
            assert!(HOSTS.iter().skip(i + 1).all(|h| h.role != host.role));
            // "sw-" + short is a switch port name: at most 15 bytes.
            assert!(host.short.len() <= 8, "{}", host.short);
        }
    }
}
