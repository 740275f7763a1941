//! The control socket's connections: who is calling (SO_PEERCRED, SO_PEERGROUPS), how
//! many may call at once, reading one request line and writing its answer with timeouts.
//! The request itself is handled by the task that owns the maps
//! ([`filter_user::control::handler::handle`]); this side only carries bytes.

use std::{sync::Arc, time::Duration};

use filter_user::control::{error_answer, handler::Peer};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};
use tracing::warn;

/// One control request: its line, who sent it, and where the answer goes.
pub type Job = (Vec<u8>, Peer, oneshot::Sender<Vec<u8>>);

/// Control connections served at once from users other than root. Root is never turned
/// away: an operator must be able to allow, deny and reload during a flood of idle
/// connections.
const MAX_CONNECTIONS: usize = 128;
/// Control connections served at once per non-root user, so that one local user cannot
/// take every slot.
const MAX_CONNECTIONS_PER_UID: usize = 8;
/// How long a client may take to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one chunk of an answer may wait for the client to read: a client that stops
/// reading a long `list` is dropped after this.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Answers are written in chunks of this size, each under [`WRITE_TIMEOUT`].
const WRITE_CHUNK: usize = 64 * 1024;

/// Counts the open control connections of each non-root user.
#[derive(Debug, Default)]
struct PerUid(std::sync::Mutex<std::collections::HashMap<u32, usize>>);

/// A slot taken from [`PerUid`], given back when the connection ends.
struct UidSlot {
    counts: Arc<PerUid>,
    uid: u32,
}

impl PerUid {
    fn take(self: &Arc<Self>, uid: u32) -> Option<UidSlot> {
        let mut counts = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = counts.entry(uid).or_default();
        if *count >= MAX_CONNECTIONS_PER_UID {
            return None;
        }
        *count += 1;
        Some(UidSlot {
            counts: self.clone(),
            uid,
        })
    }
}

impl Drop for UidSlot {
    fn drop(&mut self) {
        let mut counts = self
            .counts
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(count) = counts.get_mut(&self.uid) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.remove(&self.uid);
            }
        }
    }
}

/// Who is on the other end: SO_PEERCRED for uid, gid and pid, SO_PEERGROUPS for the
/// supplementary groups. An administrator is root or a member of `admin_gid`.
fn peer(stream: &UnixStream, admin_gid: Option<u32>) -> std::io::Result<Peer> {
    let cred = stream.peer_cred()?;
    let uid = cred.uid();
    let admin = uid == 0
        || admin_gid.is_some_and(|gid| {
            cred.gid() == gid || filter_user::sys::peer_groups(stream).contains(&gid)
        });
    Ok(Peer {
        uid,
        pid: cred.pid(),
        admin,
    })
}

pub async fn accept_loop(listener: UnixListener, jobs: mpsc::Sender<Job>, admin_gid: Option<u32>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let per_uid = Arc::new(PerUid::default());
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                warn!(error = %e, "accepting a control connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let peer = match peer(&stream, admin_gid) {
            Ok(peer) => peer,
            Err(e) => {
                warn!(error = %e, "control connection without peer credentials; closed");
                continue;
            }
        };
        // Root is served whatever the load; everyone else within the caps.
        let permits = if peer.uid == 0 {
            None
        } else {
            let Some(uid_slot) = per_uid.take(peer.uid) else {
                refuse(&stream, peer, "too many connections from your user");
                continue;
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                refuse(&stream, peer, "too many control connections");
                continue;
            };
            Some((uid_slot, permit))
        };
        let jobs = jobs.clone();
        tokio::spawn(async move {
            serve(stream, peer, jobs).await;
            drop(permits);
        });
    }
}

/// Turns a connection away with a one-line error, written only if the socket takes it at
/// once (a fresh socket's buffer always does).
fn refuse(stream: &UnixStream, peer: Peer, why: &str) {
    warn!(uid = peer.uid, pid = ?peer.pid, reason = why, "control connection refused");
    let message = format!(
        "{why} (at most {MAX_CONNECTIONS_PER_UID} per user, {MAX_CONNECTIONS} in all); try again"
    );
    let _ = stream.try_write(&error_answer(message));
}

/// One request, one answer. Malformed input gets an error answer, never a crash; a client
/// that sends nothing, or stops reading, is dropped after a timeout.
async fn serve(stream: UnixStream, peer: Peer, jobs: mpsc::Sender<Job>) {
    let (read, mut write) = stream.into_split();
    // One byte more than the cap, so that the handler sees (and refuses) a longer line.
    let cap = u64::try_from(filter_user::control::MAX_REQUEST + 1).unwrap_or(u64::MAX);
    let mut reader = BufReader::new(read).take(cap);
    let mut line = Vec::new();
    let answer =
        match tokio::time::timeout(REQUEST_TIMEOUT, reader.read_until(b'\n', &mut line)).await {
            Ok(Ok(_)) => {
                let (tx, rx) = oneshot::channel();
                if jobs.send((line, peer, tx)).await.is_err() {
                    error_answer("the daemon is shutting down".into())
                } else {
                    rx.await
                        .unwrap_or_else(|_| error_answer("the daemon dropped the request".into()))
                }
            }
            Ok(Err(e)) => error_answer(format!("reading the request: {e}")),
            Err(_) => error_answer("timed out waiting for the request".into()),
        };
    for chunk in answer.chunks(WRITE_CHUNK) {
        match tokio::time::timeout(WRITE_TIMEOUT, write.write_all(chunk)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return,
            Err(_) => {
                warn!(uid = peer.uid, pid = ?peer.pid, "control client stopped reading; dropped");
                return;
            }
        }
    }
}
