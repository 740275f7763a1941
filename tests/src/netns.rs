//! Network namespaces for real-traffic tests: namespaces that delete themselves, veth
//! links, addresses and routes, entering a namespace on the current thread, and plain TCP
//! clients and listeners (std and libc only).
//!
//! Every namespace gets a name unique to the process and the call (`p25t-PID-N-ROLE`), so
//! tests can build their topologies in parallel. Interface names only have to be unique
//! within a namespace, so fixed short names are fine; they must fit in 15 bytes.
//!
//! Nothing here sleeps for a fixed time to "let things settle": wait for a condition with
//! [`wait_until`], which is bounded in time and in rounds.

use std::{
    ffi::c_int,
    fs::File,
    io,
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::PathBuf,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use ipnet::IpNet;

/// Where `ip netns add` mounts its namespaces.
pub const NETNS_RUN_DIR: &str = "/run/netns";
/// Prefix of every namespace these helpers create, so leftovers are easy to spot.
pub const NETNS_PREFIX: &str = "p25t-";
/// Longest interface name Linux accepts (IFNAMSIZ - 1).
pub const MAX_IFNAME_LEN: usize = 15;

static NEXT_NETNS: AtomicU32 = AtomicU32::new(0);

/// A network namespace that is deleted when dropped, also when the test panics.
///
/// Sockets created inside keep the namespace alive until they are closed, so drop
/// listeners and other sockets before (declare them after) the namespace.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a namespace named `p25t-PID-N-ROLE` and sets its `lo` up. `role` is only
    /// there to make the name readable in `ip netns list`.
    pub fn new(role: &str) -> Result<Self> {
        let id = NEXT_NETNS.fetch_add(1, Ordering::Relaxed);
        let name = format!("{NETNS_PREFIX}{}-{id}-{role}", std::process::id());
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "add", &name]);
        run(cmd)?;
        // From here on the guard owns the namespace: any later failure deletes it.
        let netns = Self { name };
        netns.ip(&["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    /// Creates a namespace with exactly this name (for the demo lab, whose names must be
    /// known to `cargo xtask demo --down` in another process) and sets its `lo` up. Fails
    /// if the name is taken, leaving the existing namespace alone.
    pub fn named(name: &str) -> Result<Self> {
        ensure!(
            !PathBuf::from(NETNS_RUN_DIR).join(name).exists(),
            "network namespace {name} already exists"
        );
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "add", name]);
        run(cmd)?;
        let netns = Self {
            name: name.to_owned(),
        };
        netns.ip(&["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    /// The namespace's name, as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind mount that holds the namespace (what `setns` and `nsenter` open).
    pub fn path(&self) -> PathBuf {
        PathBuf::from(NETNS_RUN_DIR).join(&self.name)
    }

    /// Runs `ip -n NAME ARGS...` and returns its standard output.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new("ip");
        cmd.arg("-n").arg(&self.name).args(args);
        run(cmd)
    }

    /// Runs a command inside the namespace and returns its standard output: `ip` commands
    /// through `ip -n NAME`, anything else through `nsenter --net=/run/netns/NAME`.
    /// Fails with the command line and its standard error on a non-zero exit.
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        let Some((program, rest)) = args.split_first() else {
            bail!("exec in netns {}: empty command", self.name);
        };
        if *program == "ip" {
            return self.ip(rest);
        }
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path().display()))
            .arg("--")
            .args(args);
        run(cmd)
    }

    /// Runs `f` on the current thread inside the namespace, then moves the thread back to
    /// the namespace it was in, also when `f` panics.
    ///
    /// Network namespaces are per thread, so this does not affect other threads (other
    /// tests included). What `f` creates stays where it was created: a socket remains in
    /// this namespace, and an XDP or TC link remains on this namespace's interface.
    pub fn enter<T>(&self, f: impl FnOnce() -> T) -> Result<T> {
        let original = File::open("/proc/thread-self/ns/net")
            .context("opening the current thread's network namespace")?;
        let target = File::open(self.path())
            .with_context(|| format!("opening {}", self.path().display()))?;
        setns(&target).with_context(|| format!("entering netns {}", self.name))?;
        let _restore = Restore(original);
        Ok(f())
    }

    /// Adds an address (`ADDR/LEN`) to `dev`. IPv6 addresses are added with `nodad`, so
    /// they are usable at once instead of after duplicate address detection.
    pub fn add_addr(&self, dev: &str, addr: &str) -> Result<()> {
        let net: IpNet = addr
            .parse()
            .with_context(|| format!("{addr:?} is not ADDRESS/PREFIX_LEN"))?;
        let mut args = vec!["addr", "add", addr, "dev", dev];
        if matches!(net, IpNet::V6(_)) {
            args.push("nodad");
        }
        self.ip(&args).map(drop)
    }

    /// Adds several addresses to `dev`, see [`Netns::add_addr`].
    pub fn add_addrs(&self, dev: &str, addrs: &[&str]) -> Result<()> {
        addrs.iter().try_for_each(|addr| self.add_addr(dev, addr))
    }

    /// Adds a route to `dest` (a prefix or `default`) through the gateway `via`. The
    /// family is taken from the gateway.
    pub fn add_route(&self, dest: &str, via: &str) -> Result<()> {
        let gateway: IpAddr = via
            .parse()
            .with_context(|| format!("gateway {via:?} is not an IP address"))?;
        let family = if gateway.is_ipv4() { "-4" } else { "-6" };
        self.ip(&[family, "route", "add", dest, "via", via])
            .map(drop)
    }

    /// Sets a sysctl inside the namespace (`sysctl -w KEY=VALUE`).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.exec(&["sysctl", "-w", &format!("{key}={value}")])
            .map(drop)
    }

    /// Turns the namespace into a router: IPv4 and IPv6 forwarding on all interfaces.
    pub fn enable_forwarding(&self) -> Result<()> {
        self.sysctl("net.ipv4.ip_forward", "1")?;
        self.sysctl("net.ipv6.conf.all.forwarding", "1")
    }

    /// Starts a [`Listener`] on `addrs` inside this namespace.
    pub fn listen(&self, addrs: &[SocketAddr], lifetime: Duration) -> Result<Listener> {
        Listener::spawn(self, addrs, lifetime)
    }

    /// [`connect_from`] inside this namespace. The outer error means the namespace could
    /// not be entered; the inner result is the connection attempt's.
    pub fn connect_from(
        &self,
        src: IpAddr,
        src_port: Option<u16>,
        dst: SocketAddr,
        timeout: Duration,
    ) -> Result<io::Result<TcpStream>> {
        self.enter(|| connect_from(src, src_port, dst, timeout))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Best effort: a failure here must not hide the test's own failure. Deleting the
        // namespace also destroys its interfaces (and so the veth peers elsewhere).
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Moves the thread back to its original namespace when dropped.
struct Restore(File);

impl Drop for Restore {
    fn drop(&mut self) {
        if let Err(error) = setns(&self.0) {
            // Carrying on in the wrong namespace would make whatever follows act on the
            // wrong interfaces and sockets, silently. Stop the whole test binary instead.
            eprintln!("cannot return to the original network namespace: {error}; aborting");
            std::process::abort();
        }
    }
}

fn setns(ns: &File) -> io::Result<()> {
    // SAFETY: setns takes a descriptor we own for the duration of the call and has no
    // memory preconditions; it only changes the calling thread's network namespace.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Creates a veth pair: `a_if` in `a` and `b_if` in `b`, both set up.
pub fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> Result<()> {
    for name in [a_if, b_if] {
        ensure!(
            !name.is_empty() && name.len() <= MAX_IFNAME_LEN,
            "interface name {name:?} must be 1 to {MAX_IFNAME_LEN} bytes long"
        );
    }
    a.ip(&[
        "link",
        "add",
        a_if,
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ])?;
    a.ip(&["link", "set", a_if, "up"])?;
    b.ip(&["link", "set", b_if, "up"])?;
    Ok(())
}

/// Calls `condition` every `interval` until it returns `Ok(true)` (then `Ok(true)`), it
/// fails (then that error), or `timeout` has passed (then `Ok(false)`). It is always
/// called at least once, and at most `timeout / interval + 2` times.
pub fn wait_until(
    timeout: Duration,
    interval: Duration,
    mut condition: impl FnMut() -> Result<bool>,
) -> Result<bool> {
    let interval = interval.max(Duration::from_millis(1));
    let start = Instant::now();
    let rounds = (timeout.as_millis() / interval.as_millis()).saturating_add(2);
    for _ in 0..rounds {
        if condition()? {
            return Ok(true);
        }
        let left = timeout.saturating_sub(start.elapsed());
        if left.is_zero() {
            break;
        }
        thread::sleep(interval.min(left));
    }
    Ok(false)
}

/// Runs a command and returns its standard output, or an error with the command line and
/// its standard error.
fn run(mut cmd: Command) -> Result<String> {
    let line = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|arg| arg.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run `{line}`"))?;
    if !output.status.success() {
        bail!(
            "`{line}` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

// ---------------------------------------------------------------------------------------
// TCP
// ---------------------------------------------------------------------------------------

/// How long a listener thread sleeps when no connection is waiting.
const ACCEPT_POLL: Duration = Duration::from_millis(10);
/// Connections accepted from one socket in one round before looking at the others.
const MAX_ACCEPTS_PER_ROUND: usize = 64;
/// Listen backlog.
const LISTEN_BACKLOG: c_int = 128;
/// `poll` calls one connect may make (it only repeats on EINTR).
const MAX_POLL_ROUNDS: usize = 1000;

/// The unspecified IPv6 address and `port`: with [`Listener`], a dual-stack socket that
/// accepts IPv4 and IPv6.
pub fn dual_stack(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED), port)
}

/// TCP listeners on one or more addresses, accepting (and at once closing) connections on
/// a background thread. The thread stops when the listener is dropped or after its
/// lifetime, whichever comes first; every round of its loop is bounded.
///
/// A connect succeeds as soon as the kernel completes the handshake, so tests only need
/// the accept loop to keep the backlog from filling up.
#[derive(Debug)]
pub struct Listener {
    addrs: Vec<SocketAddr>,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl Listener {
    /// Binds every address of `addrs` inside `netns` (an unspecified IPv6 address binds
    /// dual stack, IPV6_V6ONLY off) and starts accepting.
    ///
    /// The sockets set SO_REUSEADDR and SO_REUSEPORT, so a client socket that also sets
    /// them (see [`connect_from`] with a source port) can use the same port as a source.
    pub fn spawn(netns: &Netns, addrs: &[SocketAddr], lifetime: Duration) -> Result<Self> {
        let sockets = netns.enter(|| {
            addrs
                .iter()
                .map(|addr| {
                    listen_socket(*addr)
                        .with_context(|| format!("listening on {addr} in netns {}", netns.name()))
                })
                .collect::<Result<Vec<_>>>()
        })??;
        let bound = sockets
            .iter()
            .map(TcpListener::local_addr)
            .collect::<io::Result<Vec<_>>>()?;
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let thread = {
            let (stop, accepted) = (Arc::clone(&stop), Arc::clone(&accepted));
            thread::Builder::new()
                .name(format!("listen-{}", netns.name()))
                .spawn(move || accept_loop(&sockets, &stop, &accepted, lifetime))
                .context("starting a listener thread")?
        };
        Ok(Self {
            addrs: bound,
            stop,
            accepted,
            thread: Some(thread),
        })
    }

    /// The bound addresses.
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Connections accepted so far, on all addresses.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            // The thread notices the flag within one ACCEPT_POLL; a panic in it has
            // already been printed and must not turn into a second panic here.
            let _ = thread.join();
        }
    }
}

fn accept_loop(
    listeners: &[TcpListener],
    stop: &AtomicBool,
    accepted: &AtomicUsize,
    lifetime: Duration,
) {
    let start = Instant::now();
    // Idle rounds sleep ACCEPT_POLL; busy rounds do not, hence the margin.
    let rounds = (lifetime.as_millis() / ACCEPT_POLL.as_millis())
        .saturating_mul(4)
        .saturating_add(1);
    for _ in 0..rounds {
        if stop.load(Ordering::Relaxed) || start.elapsed() >= lifetime {
            return;
        }
        let mut idle = true;
        for listener in listeners {
            for _ in 0..MAX_ACCEPTS_PER_ROUND {
                match listener.accept() {
                    Ok((stream, _peer)) => {
                        accepted.fetch_add(1, Ordering::Relaxed);
                        idle = false;
                        drop(stream);
                    }
                    // WouldBlock, or a transient error (ECONNABORTED...): next round.
                    Err(_) => break,
                }
            }
        }
        if idle {
            thread::sleep(ACCEPT_POLL);
        }
    }
}

/// Connects to `dst` from `src` (port `src_port`, or an ephemeral one), in the calling
/// thread's network namespace (use [`Netns::enter`] or [`Netns::connect_from`]).
///
/// Success means the TCP handshake completed. A handshake that does not complete within
/// `timeout` (for example because a filter dropped the SYN) is an error of kind
/// [`io::ErrorKind::TimedOut`]; a reset is [`io::ErrorKind::ConnectionRefused`].
///
/// The socket sets SO_REUSEADDR, and SO_REUSEPORT when `src_port` is given, so a fixed
/// source port (25) can be used repeatedly and next to a [`Listener`] on that port.
pub fn connect_from(
    src: IpAddr,
    src_port: Option<u16>,
    dst: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    if src.is_ipv4() != dst.is_ipv4() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("source {src} and destination {dst} are of different families"),
        ));
    }
    let fd = new_socket(dst)?;
    set_int_opt(&fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    if src_port.is_some() {
        set_int_opt(&fd, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
    }
    bind(&fd, SocketAddr::new(src, src_port.unwrap_or(0)))?;
    let raw = RawAddr::new(dst);
    let (addr, len) = raw.as_ptr();
    // SAFETY: `addr` points to a sockaddr of `len` bytes owned by `raw`, alive for the
    // whole call; the descriptor is ours.
    let rc = unsafe { libc::connect(fd.as_raw_fd(), addr, len) };
    if rc != 0 {
        let error = io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(error);
        }
        if !wait_writable(&fd, timeout)? {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no TCP handshake from {src} to {dst} within {timeout:?}"),
            ));
        }
        let so_error = get_int_opt(&fd, libc::SOL_SOCKET, libc::SO_ERROR)?;
        if so_error != 0 {
            return Err(io::Error::from_raw_os_error(so_error));
        }
    }
    let stream = TcpStream::from(fd);
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// Whether the socket became writable (the nonblocking connect finished, one way or the
/// other) within `timeout`.
fn wait_writable(fd: &OwnedFd, timeout: Duration) -> io::Result<bool> {
    let deadline = Instant::now() + timeout;
    for _ in 0..MAX_POLL_ROUNDS {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        let millis = c_int::try_from(left.as_millis())
            .unwrap_or(c_int::MAX)
            .max(1);
        let mut pollfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: one valid, exclusively borrowed pollfd, and a count of one.
        let ready = unsafe { libc::poll(&mut pollfd, 1, millis) };
        if ready > 0 {
            return Ok(true);
        }
        if ready < 0 {
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::Interrupted {
                return Err(error);
            }
        }
    }
    Ok(false)
}

/// A nonblocking TCP listener socket bound to `addr`.
fn listen_socket(addr: SocketAddr) -> io::Result<TcpListener> {
    let fd = new_socket(addr)?;
    set_int_opt(&fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    set_int_opt(&fd, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
    if addr.is_ipv6() {
        set_int_opt(&fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 0)?;
    }
    bind(&fd, addr)?;
    // SAFETY: plain syscall on a descriptor we own.
    if unsafe { libc::listen(fd.as_raw_fd(), LISTEN_BACKLOG) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(TcpListener::from(fd))
}

/// A nonblocking, close-on-exec TCP socket of `addr`'s family.
fn new_socket(addr: SocketAddr) -> io::Result<OwnedFd> {
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: socket has no memory preconditions; the result is checked below.
    let fd = unsafe {
        libc::socket(
            family,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh, valid descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn bind(fd: &OwnedFd, addr: SocketAddr) -> io::Result<()> {
    let raw = RawAddr::new(addr);
    let (ptr, len) = raw.as_ptr();
    // SAFETY: `ptr` points to a sockaddr of `len` bytes owned by `raw`, alive for the call.
    if unsafe { libc::bind(fd.as_raw_fd(), ptr, len) } != 0 {
        let error = io::Error::last_os_error();
        return Err(io::Error::new(
            error.kind(),
            format!("bind to {addr}: {error}"),
        ));
    }
    Ok(())
}

fn set_int_opt(fd: &OwnedFd, level: c_int, name: c_int, value: c_int) -> io::Result<()> {
    let len = size_of::<c_int>() as libc::socklen_t;
    // SAFETY: `value` is a c_int that lives for the call and `len` is its size.
    let rc =
        unsafe { libc::setsockopt(fd.as_raw_fd(), level, name, (&raw const value).cast(), len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn get_int_opt(fd: &OwnedFd, level: c_int, name: c_int) -> io::Result<c_int> {
    let mut value: c_int = 0;
    let mut len = size_of::<c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are valid for writes and `len` is `value`'s size.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw mut value).cast(),
            &raw mut len,
        )
    };
    if rc == 0 {
        Ok(value)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A socket address in the kernel's layout.
enum RawAddr {
    V4(libc::sockaddr_in),
    V6(libc::sockaddr_in6),
}

impl RawAddr {
    fn new(addr: SocketAddr) -> Self {
        match addr {
            SocketAddr::V4(addr) => Self::V4(libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: addr.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(addr.ip().octets()),
                },
                sin_zero: [0; 8],
            }),
            SocketAddr::V6(addr) => Self::V6(libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: addr.port().to_be(),
                sin6_flowinfo: addr.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: addr.ip().octets(),
                },
                sin6_scope_id: addr.scope_id(),
            }),
        }
    }

    fn as_ptr(&self) -> (*const libc::sockaddr, libc::socklen_t) {
        match self {
            Self::V4(sin) => (
                (&raw const *sin).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            ),
            Self::V6(sin6) => (
                (&raw const *sin6).cast(),
                size_of::<libc::sockaddr_in6>() as libc::socklen_t,
            ),
        }
    }
}
