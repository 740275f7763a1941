//! systemd readiness notification (`Type=notify`), a few lines over a Unix datagram socket
//! instead of a dependency: one `READY=1` datagram to `$NOTIFY_SOCKET`.

use std::{
    ffi::OsStr,
    io,
    os::unix::{ffi::OsStrExt as _, net::UnixDatagram},
    path::Path,
};

/// Tells the service manager that p25d is ready (the policy is in force and the control
/// socket listens), with `status` as the unit's status line. Returns false when not started
/// by a service manager that asked for it (no `$NOTIFY_SOCKET`).
pub fn ready(status: &str) -> io::Result<bool> {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    send_ready(&target, status).map(|()| true)
}

/// Sends the `READY=1` datagram to `target`, a socket path or `@` and an abstract name.
fn send_ready(target: &OsStr, status: &str) -> io::Result<()> {
    // A newline would start another assignment in the message.
    let status = status.replace('\n', " ");
    let message = format!("READY=1\nSTATUS={status}\n");
    let socket = UnixDatagram::unbound()?;
    let bytes = target.as_bytes();
    let sent = match bytes.strip_prefix(b"@") {
        // An abstract socket: systemd may pass `@name`.
        Some(name) => {
            use std::os::linux::net::SocketAddrExt as _;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            socket.send_to_addr(message.as_bytes(), &addr)?
        }
        None => socket.send_to(message.as_bytes(), Path::new(OsStr::from_bytes(bytes)))?,
    };
    if sent != message.len() {
        return Err(io::Error::other(format!(
            "short write to NOTIFY_SOCKET: {sent} of {} bytes",
            message.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_reaches_a_path_socket() -> Result<(), Box<dyn std::error::Error>> {
        let dir = std::env::temp_dir().join(format!("p25d-notify-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("notify.sock");
        let listener = UnixDatagram::bind(&path)?;
        send_ready(path.as_os_str(), "filtering")?;
        let mut buf = [0u8; 256];
        let n = listener.recv(&mut buf)?;
        assert_eq!(buf.get(..n), Some(&b"READY=1\nSTATUS=filtering\n"[..]));
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }
}
