//! A real etcd server for the fleet tests, the fleet demo and the propagation bench.
//!
//! The server is Debian's `etcd-server` (3.4, installed by `cargo xtask setup`), driven
//! through its own client `etcdctl` (package `etcd-client`), so that what the tests write
//! into the store does not go through the p25 code under test.
//!
//! Each [`Etcd`] is a single-member cluster with its own temporary data directory and free
//! ports, listening on loopback or, with [`Etcd::start_in`], on every address of a network
//! namespace the test created (so that routers in other namespaces reach it over veths).
//! Auto-compaction is off: tests compact with [`Etcd::compact`] when they mean to. `Drop`
//! kills the server and removes its directory, also when the test fails.

pub mod lab;

use std::{
    fs,
    net::{SocketAddr, TcpListener},
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};
use serde::Deserialize;

use crate::netns::{Netns, wait_until};

/// How long [`Etcd::start`] waits for the server to answer a health check.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);
/// `etcdctl --command-timeout`: every request the harness makes is small.
const COMMAND_TIMEOUT: &str = "--command-timeout=3s";
/// `etcdctl --dial-timeout`.
const DIAL_TIMEOUT: &str = "--dial-timeout=1s";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A single-member etcd cluster owned by a test.
#[derive(Debug)]
pub struct Etcd {
    /// Scratch directory: `data/` (the member's data) and `etcd-N.log` (one per start).
    pub dir: PathBuf,
    /// The namespace it runs in, if not the caller's.
    netns_path: Option<PathBuf>,
    /// The namespace's name, for messages.
    netns_name: Option<String>,
    client_port: u16,
    peer_port: u16,
    /// The address the client port listens on (`127.0.0.1`, or `0.0.0.0` in a namespace).
    listen_host: &'static str,
    child: Option<Child>,
    starts: u32,
}

/// `etcdctl ... -w json` output: the response header is all the harness reads.
#[derive(Debug, Deserialize)]
struct Header {
    revision: i64,
}

#[derive(Debug, Deserialize)]
struct WithHeader {
    header: Header,
}

#[derive(Debug, Deserialize)]
struct EndpointStatus {
    #[serde(rename = "Status")]
    status: StatusBody,
}

#[derive(Debug, Deserialize)]
struct StatusBody {
    header: Header,
    #[serde(rename = "dbSize")]
    db_size: i64,
}

impl Etcd {
    /// Starts etcd on 127.0.0.1 of the caller's namespace, with free ports.
    pub fn start() -> Result<Self> {
        let mut etcd = Self::prepare(None)?;
        etcd.launch()?;
        Ok(etcd)
    }

    /// Starts etcd inside `netns`, listening on every address there (clients in other
    /// namespaces connect over a veth; see [`Etcd::endpoint_on`]). The namespace must
    /// outlive the server (declare the [`Etcd`] after the [`Netns`]).
    pub fn start_in(netns: &Netns) -> Result<Self> {
        let mut etcd = Self::prepare(Some(netns))?;
        etcd.launch()?;
        Ok(etcd)
    }

    fn prepare(netns: Option<&Netns>) -> Result<Self> {
        crate::require_root();
        let id = format!(
            "p25t-etcd-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let dir = std::env::temp_dir().join(id);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // Two free ports: bound to port 0 and released at once. Another process could take
        // them in between; etcd then fails to listen and start() says so with its log.
        let free = || -> Result<[u16; 2]> {
            let a = TcpListener::bind("127.0.0.1:0")?;
            let b = TcpListener::bind("127.0.0.1:0")?;
            Ok([a.local_addr()?.port(), b.local_addr()?.port()])
        };
        let [client_port, peer_port] = match netns {
            Some(ns) => ns.enter(free)??,
            None => free()?,
        };
        Ok(Self {
            dir,
            netns_path: netns.map(Netns::path),
            netns_name: netns.map(|ns| ns.name().to_owned()),
            client_port,
            peer_port,
            listen_host: if netns.is_some() {
                "0.0.0.0"
            } else {
                "127.0.0.1"
            },
            child: None,
            starts: 0,
        })
    }

    /// The data directory (kept across [`Etcd::stop`] and [`Etcd::restart`]).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The client URL on loopback of the namespace etcd runs in.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// The client URL at `addr`, an address of etcd's namespace that clients elsewhere
    /// reach (only for [`Etcd::start_in`]).
    pub fn endpoint_on(&self, addr: std::net::IpAddr) -> String {
        format!("http://{}", SocketAddr::new(addr, self.client_port))
    }

    /// The client port.
    pub fn client_port(&self) -> u16 {
        self.client_port
    }

    /// Whether the server process is running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// The server's log of the latest start.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join(format!("etcd-{}.log", self.starts))).unwrap_or_default()
    }

    /// A command that runs `program` in etcd's namespace.
    fn command(&self, program: &str) -> Command {
        match &self.netns_path {
            Some(path) => {
                let mut cmd = Command::new("nsenter");
                cmd.arg(format!("--net={}", path.display()))
                    .arg("--")
                    .arg(program);
                cmd
            }
            None => Command::new(program),
        }
    }

    fn launch(&mut self) -> Result<()> {
        ensure!(self.child.is_none(), "etcd already running");
        self.starts += 1;
        let log_path = self.dir.join(format!("etcd-{}.log", self.starts));
        let log = fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = self.command("etcd");
        cmd.arg("--name=p25t")
            .arg(format!("--data-dir={}", self.data_dir().display()))
            .arg(format!(
                "--listen-client-urls=http://{}:{}",
                self.listen_host, self.client_port
            ))
            .arg(format!("--advertise-client-urls={}", self.endpoint()))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=p25t={peer}"))
            // Ignored when the data directory already holds a member (a restart).
            .arg("--initial-cluster-state=new")
            // The tests compact when they mean to (etcd's default, spelled out).
            .arg("--auto-compaction-retention=0")
            .arg("--logger=zap")
            .arg("--log-outputs=stderr")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd.spawn().with_context(
            || "spawning etcd (Debian package etcd-server; `cargo xtask setup` installs it)",
        )?;
        self.child = Some(child);
        let ready = wait_until(START_TIMEOUT, Duration::from_millis(100), || {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                bail!(
                    "etcd exited during start-up ({status}); its log {}:\n{}",
                    log_path.display(),
                    self.log()
                );
            }
            Ok(self
                .etcdctl_output(&["endpoint", "health"], None)
                .is_ok_and(|out| out.status.success()))
        })?;
        if !ready {
            let _ = self.kill();
            bail!(
                "etcd did not answer a health check on {} within {START_TIMEOUT:?}; its log \
                 {}:\n{}",
                self.endpoint(),
                log_path.display(),
                self.log()
            );
        }
        Ok(())
    }

    /// SIGKILLs the server (as a crash or a lost machine would), keeping its data.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().context("killing etcd")?;
            child.wait().context("reaping etcd")?;
        }
        Ok(())
    }

    /// Stops the server (SIGKILL; etcd's data survives that by design), keeping its data
    /// directory and ports for [`Etcd::restart`].
    pub fn stop(&mut self) -> Result<()> {
        self.kill()
    }

    /// Starts the server again on the same data directory and ports, and waits until it
    /// answers.
    pub fn restart(&mut self) -> Result<()> {
        self.kill()?;
        self.launch()
    }

    fn etcdctl_output(&self, args: &[&str], stdin: Option<&[u8]>) -> Result<Output> {
        let mut cmd = self.command("etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoint()))
            .arg(COMMAND_TIMEOUT)
            .arg(DIAL_TIMEOUT)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let Some(input) = stdin else {
            return cmd
                .stdin(Stdio::null())
                .output()
                .context("running etcdctl (Debian package etcd-client)");
        };
        let mut child = cmd
            .stdin(Stdio::piped())
            .spawn()
            .context("running etcdctl (Debian package etcd-client)")?;
        {
            use std::io::Write as _;
            let mut pipe = child.stdin.take().context("etcdctl stdin")?;
            pipe.write_all(input).context("writing to etcdctl")?;
        }
        child.wait_with_output().context("waiting for etcdctl")
    }

    /// Runs `etcdctl ARGS` against this server and returns its standard output; fails with
    /// its standard error.
    pub fn etcdctl(&self, args: &[&str]) -> Result<String> {
        let out = self.etcdctl_output(args, None)?;
        check(args, &out)
    }

    /// Puts `value` at `key` (through etcdctl, value on stdin so any text works) and
    /// returns the revision of the write.
    pub fn put(&self, key: &str, value: &str) -> Result<i64> {
        let args = ["put", "-w", "json", key];
        let out = self.etcdctl_output(&args, Some(value.as_bytes()))?;
        let text = check(&args, &out)?;
        let parsed: WithHeader =
            serde_json::from_str(&text).with_context(|| format!("etcdctl put printed {text}"))?;
        Ok(parsed.header.revision)
    }

    /// Deletes `key`; returns the revision after the delete.
    pub fn delete(&self, key: &str) -> Result<i64> {
        let args = ["del", "-w", "json", key];
        let text = self.etcdctl(&args)?;
        let parsed: WithHeader =
            serde_json::from_str(&text).with_context(|| format!("etcdctl del printed {text}"))?;
        Ok(parsed.header.revision)
    }

    /// The value at `key`, if any.
    pub fn get(&self, key: &str) -> Result<Option<String>> {
        let text = self.etcdctl(&["get", "--print-value-only", key])?;
        // etcdctl prints the value and a newline; nothing for a missing key.
        Ok(text.strip_suffix('\n').map(str::to_owned))
    }

    /// Keys under `prefix`.
    pub fn keys(&self, prefix: &str) -> Result<Vec<String>> {
        let text = self.etcdctl(&["get", "--prefix", "--keys-only", prefix])?;
        Ok(text
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect())
    }

    /// The store's current revision.
    pub fn revision(&self) -> Result<i64> {
        Ok(self.endpoint_status()?.header.revision)
    }

    /// The size of the backend database in bytes (before defragmentation).
    pub fn db_size(&self) -> Result<i64> {
        Ok(self.endpoint_status()?.db_size)
    }

    fn endpoint_status(&self) -> Result<StatusBody> {
        let args = ["endpoint", "status", "-w", "json"];
        let text = self.etcdctl(&args)?;
        let mut parsed: Vec<EndpointStatus> = serde_json::from_str(&text)
            .with_context(|| format!("etcdctl endpoint status printed {text}"))?;
        ensure!(parsed.len() == 1, "expected one endpoint, got {text}");
        Ok(parsed.remove(0).status)
    }

    /// Compacts the history up to `revision` (`etcdctl compaction --physical`): watches
    /// from older revisions are then cancelled with "required revision has been
    /// compacted".
    pub fn compact(&self, revision: i64) -> Result<()> {
        self.etcdctl(&["compaction", "--physical", &revision.to_string()])
            .map(drop)
    }

    /// Compacts the whole history (up to the current revision).
    pub fn compact_all(&self) -> Result<i64> {
        let revision = self.revision()?;
        self.compact(revision)?;
        Ok(revision)
    }

    /// Where etcd runs, for messages.
    pub fn place(&self) -> String {
        match &self.netns_name {
            Some(name) => format!("{} in netns {name}", self.endpoint()),
            None => self.endpoint(),
        }
    }
}

fn check(args: &[&str], out: &Output) -> Result<String> {
    ensure!(
        out.status.success(),
        "etcdctl {} failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.kill();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The harness itself: put, get, revision, compaction, restart on the same data.
    #[test]
    fn etcd_harness_round_trip() -> Result<()> {
        let mut etcd = Etcd::start()?;
        let rev = etcd.put("/p25t/a", "line 1\nline 2: x")?;
        assert_eq!(etcd.get("/p25t/a")?.as_deref(), Some("line 1\nline 2: x"));
        assert_eq!(etcd.revision()?, rev);
        let rev2 = etcd.put("/p25t/a", "v2")?;
        assert!(rev2 > rev);
        etcd.compact(rev2)?;
        // A read at a compacted revision is refused: compaction happened.
        let old = etcd.etcdctl(&["get", "--rev", &rev.to_string(), "/p25t/a"]);
        assert!(old.is_err(), "read at compacted revision {rev}: {old:?}");
        let dir = etcd.data_dir();
        etcd.restart()?;
        assert_eq!(etcd.get("/p25t/a")?.as_deref(), Some("v2"));
        assert_eq!(etcd.keys("/p25t/")?, vec!["/p25t/a".to_owned()]);
        etcd.stop()?;
        assert!(!etcd.is_running());
        assert!(etcd.etcdctl(&["get", "/p25t/a"]).is_err());
        drop(etcd);
        assert!(!dir.exists(), "{} left behind", dir.display());
        Ok(())
    }
}
