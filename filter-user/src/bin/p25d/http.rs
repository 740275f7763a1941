//! The Prometheus `/metrics` endpoint: axum on the daemon's runtime, behind a listener
//! that caps connections and times out slow or idle ones. The page itself comes from the
//! task that owns the maps (`snapshot::render`).

use std::{
    io,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result};
use axum::{Router, http::header, response::IntoResponse, routing::get};
use filter_user::metrics;
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

/// A request for a metrics page, answered by the task that owns the maps: the page, or
/// why the maps could not be read.
pub type MetricsJob = oneshot::Sender<Result<String, String>>;

/// Serves `/metrics` on `addr`, with a connection cap and timeouts ([`LimitedListener`]).
/// Binding happens before this returns, so a taken port is a startup error and not a
/// silent background failure.
pub async fn serve_metrics(addr: SocketAddr, jobs: mpsc::Sender<MetricsJob>) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics endpoint {addr}"))?;
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let jobs = jobs.clone();
                async move { metrics_page(&jobs).await }
            }),
        )
        .route("/", get(|| async { "p25d: metrics at /metrics\n" }));
    info!(%addr, max_connections = METRICS_MAX_CONNECTIONS, "serving Prometheus metrics at /metrics");
    let listener = LimitedListener {
        inner: listener,
        open: Open::default(),
        epoch: tokio::time::Instant::now(),
    };
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            error!(error = %e, "the metrics endpoint stopped");
        }
    });
    Ok(())
}

/// Asks the task that owns the maps for a page: 200 with it, 500 with the error when the
/// maps could not be read, 503 only when that task is gone (p25d is stopping).
async fn metrics_page(jobs: &mpsc::Sender<MetricsJob>) -> axum::response::Response {
    use axum::http::StatusCode;
    let (tx, rx) = oneshot::channel();
    let answer = match jobs.send(tx).await {
        Ok(()) => rx.await.ok(),
        Err(_) => None,
    };
    match answer {
        Some(Ok(body)) => ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], body).into_response(),
        Some(Err(message)) => {
            (StatusCode::INTERNAL_SERVER_ERROR, format!("{message}\n")).into_response()
        }
        None => (StatusCode::SERVICE_UNAVAILABLE, "p25d is shutting down\n").into_response(),
    }
}

/// Connections the metrics endpoint serves at once. Prometheus needs one or two; the rest
/// is room for curl and a second scraper.
pub const METRICS_MAX_CONNECTIONS: usize = 32;
/// A new connection must have its first answer written within this long, headers and all
/// (slowloris: a client that trickles its request gets this much, not forever).
pub const METRICS_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// After an answer, a kept-alive connection is closed when no further answer is written
/// within this long (Prometheus's default 15 s scrape interval reuses it; a slower one
/// reconnects).
pub const METRICS_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The open connections of the metrics endpoint, oldest answer first.
#[derive(Debug, Default)]
struct Open {
    conns: std::sync::Mutex<Vec<OpenConn>>,
}

#[derive(Debug)]
struct OpenConn {
    /// When it last had an answer written (or was accepted), in ms since `epoch`.
    last_answer_ms: Arc<AtomicU64>,
    /// Closes it.
    evict: oneshot::Sender<()>,
}

/// A TCP listener that keeps at most [`METRICS_MAX_CONNECTIONS`] open: when full, a new
/// connection evicts the one that has gone longest without an answer (idle or
/// trickling), so idle connections cannot lock Prometheus out. Each connection is a
/// [`LimitedStream`] with the header and idle timeouts.
struct LimitedListener {
    inner: tokio::net::TcpListener,
    open: Open,
    epoch: tokio::time::Instant,
}

impl axum::serve::Listener for LimitedListener {
    type Io = LimitedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (stream, addr) = match self.inner.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, mostly: wait for some to close.
                    warn!(error = %e, "accepting a metrics connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let now_ms = elapsed_ms(self.epoch);
            let last_answer_ms = Arc::new(AtomicU64::new(now_ms));
            let (evict, evicted) = oneshot::channel();
            {
                let mut conns = self
                    .open
                    .conns
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                // Connections whose stream is gone dropped their receiver.
                conns.retain(|c| !c.evict.is_closed());
                if conns.len() >= METRICS_MAX_CONNECTIONS {
                    let oldest = conns
                        .iter()
                        .enumerate()
                        .min_by_key(|(_, c)| c.last_answer_ms.load(Ordering::Relaxed))
                        .map(|(i, _)| i);
                    if let Some(i) = oldest {
                        let old = conns.swap_remove(i);
                        let _ = old.evict.send(());
                    }
                }
                conns.push(OpenConn {
                    last_answer_ms: last_answer_ms.clone(),
                    evict,
                });
            }
            let stream = LimitedStream {
                inner: stream,
                deadline: Box::pin(tokio::time::sleep(METRICS_HEADER_TIMEOUT)),
                evicted,
                last_answer_ms,
                epoch: self.epoch,
            };
            return (stream, addr);
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

fn elapsed_ms(epoch: tokio::time::Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// A metrics connection: closed (an I/O error to hyper) when its deadline passes or it is
/// evicted. The deadline starts at [`METRICS_HEADER_TIMEOUT`] and moves to
/// [`METRICS_IDLE_TIMEOUT`] past every write.
struct LimitedStream {
    inner: tokio::net::TcpStream,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
    evicted: oneshot::Receiver<()>,
    last_answer_ms: Arc<AtomicU64>,
    epoch: tokio::time::Instant,
}

impl LimitedStream {
    /// An error if the connection must close now; registers the wake-ups otherwise.
    fn expired(&mut self, cx: &mut std::task::Context<'_>) -> Option<io::Error> {
        if std::pin::Pin::new(&mut self.evicted).poll(cx).is_ready() {
            return Some(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "evicted: too many metrics connections",
            ));
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            return Some(io::Error::new(
                io::ErrorKind::TimedOut,
                "metrics connection timed out",
            ));
        }
        None
    }
}

impl tokio::io::AsyncRead for LimitedStream {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        if let Some(e) = self.expired(cx) {
            return std::task::Poll::Ready(Err(e));
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for LimitedStream {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        let this = &mut *self;
        match std::pin::Pin::new(&mut this.inner).poll_write(cx, buf) {
            std::task::Poll::Ready(Ok(n)) => {
                if n > 0 {
                    this.last_answer_ms
                        .store(elapsed_ms(this.epoch), Ordering::Relaxed);
                    this.deadline
                        .as_mut()
                        .reset(tokio::time::Instant::now() + METRICS_IDLE_TIMEOUT);
                }
                std::task::Poll::Ready(Ok(n))
            }
            std::task::Poll::Pending => match this.expired(cx) {
                // A client that stops reading its answer is dropped at the deadline too.
                Some(e) => std::task::Poll::Ready(Err(e)),
                None => std::task::Poll::Pending,
            },
            other => other,
        }
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;

    use super::*;

    #[test]
    fn a_failed_read_is_a_500_and_only_stopping_is_a_503() -> Result<(), Box<dyn std::error::Error>>
    {
        let runtime = tokio::runtime::Builder::new_current_thread().build()?;
        runtime.block_on(async {
            let (tx, mut rx) = mpsc::channel::<MetricsJob>(1);
            let owner = tokio::spawn(async move {
                if let Some(reply) = rx.recv().await {
                    let _ = reply.send(Ok("p25_reloads_total 1\n".into()));
                }
                if let Some(reply) = rx.recv().await {
                    let _ = reply.send(Err("reading the maps failed: EPERM".into()));
                }
                // The task that owns the maps ends here, as when p25d stops.
            });
            let page = metrics_page(&tx).await;
            assert_eq!(page.status(), StatusCode::OK);
            let page = metrics_page(&tx).await;
            assert_eq!(page.status(), StatusCode::INTERNAL_SERVER_ERROR);
            let body = axum::body::to_bytes(page.into_body(), 1 << 16).await?;
            assert!(String::from_utf8_lossy(&body).contains("EPERM"), "{body:?}");
            owner.await?;
            let page = metrics_page(&tx).await;
            assert_eq!(page.status(), StatusCode::SERVICE_UNAVAILABLE);
            Ok(())
        })
    }
}
