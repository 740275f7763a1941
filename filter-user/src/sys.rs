//! Every operating-system interface p25 uses beyond std and aya, in one place.
//!
//! - [`bpf`]: the `bpf(2)` commands aya 0.14 lacks (batched map operations, the ifindex
//!   of a pinned link), over aya-obj's generated kernel bindings.
//! - Locks ([`try_lock_exclusive`]), groups ([`group_id`], [`peer_groups`]), interface
//!   names ([`ifindex`], [`ifname`]), bpffs ([`bpffs_mounted`], [`mount_bpffs`]), clocks
//!   ([`monotonic_ns`]), process credentials and mask ([`is_root`], [`set_umask`]),
//!   interface events ([`link_events_socket`], [`recv_nonblocking`]), readiness
//!   ([`readable_fd`], [`readable_ring`]), the allocator ([`tune_allocator`],
//!   [`release_free_memory`]) and reading map records ([`read_pod`], [`zeroed_pod`]).
//!
//! Most of it is safe rustix. What rustix cannot do (`bpf(2)`, `getgrnam_r`,
//! `SO_PEERGROUPS`, glibc's allocator knobs, registering a descriptor with tokio) is the
//! only `unsafe` in filter-user's library and daemon, each block with its SAFETY note.
//! Helpers other crates can reuse instead of their own copies: [`is_root`],
//! [`bpffs_mounted`], [`ifindex`].

pub mod bpf;

use std::{
    ffi::CString,
    fs::File,
    io,
    os::fd::{AsFd, AsRawFd as _, OwnedFd},
    path::Path,
};

use aya::{
    Pod,
    maps::{MapData, RingBuf},
};
use rustix::{
    fs::{FlockOperation, flock},
    net::{AddressFamily, SocketFlags, SocketType, netlink},
};
use tokio::io::{Interest, unix::AsyncFd};

/// `BPF_FS_MAGIC` (include/uapi/linux/magic.h): the `f_type` of a bpffs mount.
const BPF_FS_MAGIC: u64 = 0xcafe_4a11;

/// Takes an exclusive `flock` on `file` without waiting: `Ok(false)` if another open file
/// description holds it. The lock lasts as long as the file stays open.
pub fn try_lock_exclusive(file: &File) -> io::Result<bool> {
    match flock(file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// The id of group `name` (`getgrnam_r`, so also NSS groups, and thread-safe unlike
/// `getgrnam`); `Ok(None)` if there is no such group.
pub fn group_id(name: &str) -> io::Result<Option<u32>> {
    let c_name = CString::new(name).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("group name {name:?} contains a NUL byte"),
        )
    })?;
    // The string buffer grows on ERANGE; 1 MiB holds any sane group's member list.
    let mut size = 1024;
    while size <= 1 << 20 {
        let mut buf = vec![0 as libc::c_char; size];
        // SAFETY: `group` is plain C data for which all-zero is valid; getgrnam_r fills it.
        let mut group: libc::group = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::group = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call: `c_name` NUL-terminated, `group`
        // and `found` writable, `buf` writable for `buf.len()` bytes. The strings in
        // `group` point into `buf`, which we do not read; only `gr_gid` is copied out.
        let ret = unsafe {
            libc::getgrnam_r(
                c_name.as_ptr(),
                &raw mut group,
                buf.as_mut_ptr(),
                buf.len(),
                &raw mut found,
            )
        };
        match ret {
            0 if found.is_null() => return Ok(None),
            0 => return Ok(Some(group.gr_gid)),
            libc::ERANGE => size *= 4,
            // "Not found" comes back as one of these from some NSS modules.
            libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM => return Ok(None),
            errno => return Err(io::Error::from_raw_os_error(errno)),
        }
    }
    Err(io::Error::other(format!(
        "the entry of group {name} is larger than 1 MiB"
    )))
}

/// The supplementary groups of a Unix socket's peer as the kernel recorded them at
/// connect time (`SO_PEERGROUPS`); empty if the kernel cannot tell.
pub fn peer_groups(socket: &impl AsFd) -> Vec<u32> {
    let mut groups = vec![0 as libc::gid_t; 256];
    let mut len = libc::socklen_t::try_from(groups.len() * size_of::<libc::gid_t>())
        .unwrap_or(libc::socklen_t::MAX);
    // SAFETY: getsockopt writes at most `len` bytes into `groups`, which holds that many,
    // and updates `len` to the bytes written; the fd is borrowed, so open for the call.
    let ret = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERGROUPS,
            groups.as_mut_ptr().cast(),
            &raw mut len,
        )
    };
    if ret != 0 {
        return Vec::new();
    }
    let count = usize::try_from(len).unwrap_or(0) / size_of::<libc::gid_t>();
    groups.truncate(count);
    groups
}

/// A socket for the interface ioctls (`SIOCGIFINDEX`, `SIOCGIFNAME`), which work on any
/// socket; created per call, in the calling thread's network namespace, as glibc does.
fn ioctl_socket() -> io::Result<OwnedFd> {
    Ok(rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::DGRAM,
        SocketFlags::CLOEXEC,
        None,
    )?)
}

/// The index of `interface` in this thread's network namespace; `None` if there is none.
pub fn ifindex(interface: &str) -> Option<u32> {
    let socket = ioctl_socket().ok()?;
    rustix::net::netdevice::name_to_index(&socket, interface)
        .ok()
        .filter(|index| *index != 0)
}

/// The name of the interface with index `index` in this thread's network namespace.
pub fn ifname(index: u32) -> Option<String> {
    let socket = ioctl_socket().ok()?;
    rustix::net::netdevice::index_to_name(&socket, index).ok()
}

/// Whether `path` lies on a mounted bpffs (`statfs`); false if it does not exist.
pub fn bpffs_mounted(path: &Path) -> bool {
    rustix::fs::statfs(path).is_ok_and(|fs| fs.f_type as u64 == BPF_FS_MAGIC)
}

/// Mounts a bpffs at `path` (which must exist).
pub fn mount_bpffs(path: &Path) -> io::Result<()> {
    rustix::mount::mount("bpf", path, "bpf", rustix::mount::MountFlags::empty(), None)?;
    Ok(())
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock `bpf_ktime_get_ns` reads.
pub fn monotonic_ns() -> u64 {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    (now.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(now.tv_nsec as u64)
}

/// Whether the process runs with effective uid 0.
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Sets the process's file mode creation mask (e.g. `0o077`).
pub fn set_umask(mask: u32) {
    rustix::process::umask(rustix::fs::Mode::from_bits_truncate(mask));
}

/// `RTMGRP_LINK` (include/uapi/linux/rtnetlink.h): the link (interface) event group.
const RTMGRP_LINK: u32 = 1;

/// A non-blocking rtnetlink socket subscribed to link (interface) events, in the calling
/// thread's network namespace.
pub fn link_events_socket() -> io::Result<OwnedFd> {
    let socket = rustix::net::socket_with(
        AddressFamily::NETLINK,
        SocketType::RAW,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        // NETLINK_ROUTE is protocol 0.
        None,
    )?;
    rustix::net::bind(&socket, &netlink::SocketAddrNetlink::new(0, RTMGRP_LINK))?;
    Ok(socket)
}

/// One `recv(2)` into `buf` without waiting (`WouldBlock` when nothing is queued).
pub fn recv_nonblocking(socket: &impl AsFd, buf: &mut [u8]) -> io::Result<usize> {
    let (n, _) = rustix::net::recv(socket, buf, rustix::net::RecvFlags::DONTWAIT)?;
    Ok(n)
}

/// Registers an owned descriptor with the tokio reactor for read readiness.
pub fn readable_fd(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd owns the OwnedFd, whose descriptor stays open and the same until
    // the AsyncFd drops it (OwnedFd cannot be re-pointed).
    unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.map_err(io::Error::from)
}

/// Registers a ring buffer map with the tokio reactor for read readiness.
pub fn readable_ring(ring: RingBuf<MapData>) -> io::Result<AsyncFd<RingBuf<MapData>>> {
    // SAFETY: the RingBuf owns its map fd for as long as it lives, and the AsyncFd owns the
    // RingBuf, so the fd stays open and the same until the AsyncFd is dropped.
    unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }.map_err(io::Error::from)
}

/// Makes every allocation of 1 MiB or more a mapping of its own, returned to the system
/// when freed. glibc's default raises that threshold to the largest block freed so far
/// (up to 32 MiB), after which the per-reload scratch lists of a million-entry policy
/// (tens of MiB each) land in the heap and stay in the daemon's resident set.
pub fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes allocator parameters; called before any large
    // allocation.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

/// Hands freed heap memory back to the system (glibc's `malloc_trim`), so that a
/// process's idle footprint is what it holds rather than its peak.
pub fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free heap pages to the kernel; it touches no
    // memory the program holds.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Reads a `T` from the start of `bytes` (a map or ring buffer record); `None` if it is
/// shorter than a `T`.
pub fn read_pod<T: Pod>(bytes: &[u8]) -> Option<T> {
    let bytes = bytes.get(..size_of::<T>())?;
    // SAFETY: `bytes` holds size_of::<T>() initialised bytes, read unaligned, and T is
    // Pod: every bit pattern is a valid T.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// An all-zero `T`, e.g. to fill a buffer the kernel writes map entries into.
pub fn zeroed_pod<T: Pod>() -> T {
    // SAFETY: T is Pod: every bit pattern, all-zero included, is a valid T.
    unsafe { std::mem::zeroed() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loopback_interface_has_a_name_and_an_index() {
        let index = ifindex("lo");
        assert!(index.is_some(), "every network namespace has lo");
        assert_eq!(index.and_then(ifname).as_deref(), Some("lo"));
        assert_eq!(ifindex("no-such-if0"), None);
        assert_eq!(ifindex("a\0b"), None);
        assert_eq!(ifindex(&"x".repeat(40)), None);
    }

    #[test]
    fn a_second_exclusive_lock_is_refused_until_the_first_is_dropped() -> io::Result<()> {
        let path = std::env::temp_dir().join(format!("p25-sys-lock-{}", std::process::id()));
        let first = File::create(&path)?;
        let second = File::open(&path)?;
        assert!(try_lock_exclusive(&first)?);
        assert!(!try_lock_exclusive(&second)?);
        drop(first);
        assert!(try_lock_exclusive(&second)?);
        std::fs::remove_file(&path)
    }

    #[test]
    fn groups_resolve_by_name() -> io::Result<()> {
        assert_eq!(group_id("root")?, Some(0));
        assert_eq!(group_id("p25-no-such-group")?, None);
        assert!(group_id("a\0b").is_err());
        Ok(())
    }

    #[test]
    fn the_monotonic_clock_moves_forward() {
        let a = monotonic_ns();
        let b = monotonic_ns();
        assert!(a > 0 && b >= a);
    }

    #[test]
    fn bpffs_is_told_from_other_filesystems() -> io::Result<()> {
        assert!(!bpffs_mounted(Path::new("/proc")));
        assert!(!bpffs_mounted(Path::new("/no/such/path")));
        // Whatever this machine has at /sys/fs/bpf, statfs agrees with the mount table.
        let listed = std::fs::read_to_string("/proc/self/mounts")?
            .lines()
            .any(|line| {
                let mut fields = line.split_whitespace();
                fields.nth(1) == Some("/sys/fs/bpf") && fields.next() == Some("bpf")
            });
        assert_eq!(bpffs_mounted(Path::new("/sys/fs/bpf")), listed);
        Ok(())
    }

    #[test]
    fn pod_records_read_only_when_long_enough() {
        let bytes = [1u8, 0, 0, 0, 9];
        assert_eq!(read_pod::<u32>(&bytes), Some(1));
        assert_eq!(read_pod::<u64>(&bytes), None);
        assert_eq!(zeroed_pod::<u64>(), 0);
    }
}
