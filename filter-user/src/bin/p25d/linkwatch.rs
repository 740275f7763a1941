//! Interface change notifications from the kernel (rtnetlink `RTMGRP_LINK`).
//!
//! A recreated interface has no p25 attachment until the daemon notices it. Polling alone
//! (`--poll`, 1 s) leaves port 25 unfiltered on it for up to that long; listening to link
//! events shrinks the window to the time of one attach. Polling stays as the fallback, so a
//! missed or overflowed notification costs at most one poll interval.

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use tokio::io::unix::AsyncFd;

/// A netlink socket subscribed to link (interface) events.
#[derive(Debug)]
pub struct LinkWatch {
    fd: AsyncFd<OwnedFd>,
}

impl LinkWatch {
    /// Opens the socket in the daemon's network namespace.
    pub fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2) call; the result is checked before use.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_nl is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        addr.nl_groups = libc::RTMGRP_LINK as u32;
        // SAFETY: `addr` is a valid sockaddr_nl for the duration of the call.
        let ret = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the AsyncFd owns the OwnedFd, so the descriptor stays open and the same
        // for the AsyncFd's whole life.
        let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(Self { fd })
    }

    /// Waits for at least one link event and drains all pending ones. On a socket error it
    /// logs once and never returns again: polling remains.
    pub async fn changed(&self) {
        if let Err(e) = self.next().await {
            tracing::warn!(error = %e, "interface notifications failed; relying on --poll");
            std::future::pending::<()>().await;
        }
    }

    /// One batch of link events. The content does not matter: the caller re-checks every
    /// policy interface, which is cheap.
    async fn next(&self) -> io::Result<()> {
        let mut buf = [0u8; 8192];
        loop {
            let mut guard = self.fd.readable().await?;
            let mut got = false;
            // Bounded: a socket buffer holds a finite number of messages; stop early anyway
            // so that a storm of events cannot starve the other tasks.
            for _ in 0..256 {
                // SAFETY: `buf` is valid for writes of its length.
                let n = unsafe {
                    libc::recv(
                        self.fd.get_ref().as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        0,
                    )
                };
                if n > 0 {
                    got = true;
                    continue;
                }
                let err = io::Error::last_os_error();
                match err.kind() {
                    io::ErrorKind::WouldBlock => {
                        guard.clear_ready();
                        break;
                    }
                    // ENOBUFS: events were lost; that still means "something changed".
                    _ if err.raw_os_error() == Some(libc::ENOBUFS) => got = true,
                    io::ErrorKind::Interrupted => {}
                    _ => return Err(err),
                }
            }
            if got {
                return Ok(());
            }
        }
    }
}
