//! Interface change notifications from the kernel (rtnetlink `RTMGRP_LINK`).
//!
//! A recreated interface has no p25 attachment until the daemon notices it. Polling alone
//! (`--poll`, 1 s) leaves port 25 unfiltered on it for up to that long; listening to link
//! events shrinks the window to the time of one attach. Polling stays as the fallback, so a
//! missed or overflowed notification costs at most one poll interval.

use std::{io, os::fd::OwnedFd};

use tokio::io::unix::AsyncFd;

/// A netlink socket subscribed to link (interface) events.
#[derive(Debug)]
pub struct LinkWatch {
    fd: AsyncFd<OwnedFd>,
}

impl LinkWatch {
    /// Opens the socket in the daemon's network namespace.
    pub fn open() -> io::Result<Self> {
        let fd = filter_user::sys::readable_fd(filter_user::sys::link_events_socket()?)?;
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
                // Any datagram, even an empty one, means the socket had something to say.
                let err = match filter_user::sys::recv_nonblocking(self.fd.get_ref(), &mut buf) {
                    Ok(_) => {
                        got = true;
                        continue;
                    }
                    Err(err) => err,
                };
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
