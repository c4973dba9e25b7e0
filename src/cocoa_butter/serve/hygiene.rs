//! Connection hygiene on every listener (HTTP, gRPC, metrics): a bound on
//! the connections one listener and the whole process hold, an idle
//! timeout on every connection, and the descriptor budget they leave for
//! NATS, the stores and the other rooms.
//!
//! One room's port must never take the others down: a few hundred stalled
//! sockets once exhausted the process's descriptors, and then every other
//! listener and a NATS reconnect failed with "Too many open files". So a
//! connection is admitted only when both its listener's and the process's
//! budget have room; over either it is closed at accept (the client sees
//! its connection closed before any answer) and counted, and the log says
//! so at most once per interval. Every admitted connection is closed once
//! neither side has sent a byte for `limits.idle_timeout`; HTTP/1 requests
//! must finish their headers within `limits.header_read_timeout` (hyper's
//! own check, set in `servers.rs`).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;

/// Descriptors kept out of the connection budget for everything that is
/// not a client connection: the NATS connection and its reconnects, files
/// the rooms read, the runtime's own (epoll, signals, pipes).
pub const DESCRIPTOR_RESERVE: u64 = 128;

/// How often a refusal is logged at most (the rest are counted).
const LOG_EVERY: Duration = Duration::from_secs(10);

/// The process's descriptor limit as raised at start, and what is left of
/// it for client connections.
#[derive(Debug, Clone, Copy)]
pub struct DescriptorBudget {
    /// The soft limit before the raise.
    pub was: u64,
    /// The soft limit now (the hard limit, unless raising failed).
    pub soft: u64,
    pub hard: u64,
}

impl DescriptorBudget {
    /// Raises the soft open-file limit to the hard limit, as Go's runtime
    /// does at start (systemd's default soft limit of 1024 is meant for
    /// `select(2)` users; the hard limit is what the operator allows).
    pub fn raise() -> Self {
        use nix::sys::resource::{Resource, getrlimit, setrlimit};
        match getrlimit(Resource::RLIMIT_NOFILE) {
            Ok((soft, hard)) => {
                let raised = if soft < hard {
                    match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                        Ok(()) => hard,
                        Err(err) => {
                            tracing::warn!(
                                error = %err,
                                soft,
                                hard,
                                "cannot raise the open-file limit to its hard limit"
                            );
                            soft
                        }
                    }
                } else {
                    soft
                };
                DescriptorBudget {
                    was: soft,
                    soft: raised,
                    hard,
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot read the open-file limit");
                DescriptorBudget {
                    was: 1024,
                    soft: 1024,
                    hard: 1024,
                }
            }
        }
    }

    /// Client connections the process may hold at once: the configured
    /// bound, lowered to what the descriptor limit leaves after the reserve.
    pub fn connections(&self, configured: usize) -> usize {
        let room = self.soft.saturating_sub(DESCRIPTOR_RESERVE).max(16);
        configured.min(usize::try_from(room).unwrap_or(usize::MAX))
    }
}

/// The process-wide connection budget, shared by every listener.
#[derive(Clone)]
pub struct ProcessBudget {
    slots: Arc<Semaphore>,
}

impl ProcessBudget {
    pub fn new(connections: usize) -> Self {
        ProcessBudget {
            slots: Arc::new(Semaphore::new(connections)),
        }
    }
}

/// What one listener is allowed and what it reports.
#[derive(Clone)]
pub struct ListenerLimits {
    /// `http`, `grpc` or `metrics`: the `listener` label and the log field.
    pub listener: &'static str,
    pub max_connections: usize,
    pub idle_timeout: Duration,
    pub process: ProcessBudget,
    pub refused: Counter,
    pub open: Gauge,
}

/// Everything a server applies to its connections: the listener's limits
/// and the protocol timers (`[limits]`).
#[derive(Clone)]
pub struct ConnectionSettings {
    pub limits: ListenerLimits,
    /// TLS on the listener (`[tls]`); the metrics port stays plain.
    pub tls: Option<std::sync::Arc<crate::cocoa_butter::tls::ServerTls>>,
    pub header_read_timeout: Duration,
    pub http2_keepalive_interval: Duration,
    pub http2_keepalive_timeout: Duration,
    pub max_concurrent_streams: u32,
}

/// HTTP/2 streams a client may open and reset before the server has seen
/// them, per connection: the bound against "rapid reset" (CVE-2023-44487).
pub const MAX_PENDING_RESETS: usize = 20;

/// A bound TCP listener that admits connections within its limits.
pub struct GuardedListener {
    inner: TcpListener,
    limits: ListenerLimits,
    slots: Arc<Semaphore>,
    log: RateLimitedLog,
}

impl GuardedListener {
    pub fn new(inner: TcpListener, limits: ListenerLimits) -> Self {
        GuardedListener {
            inner,
            slots: Arc::new(Semaphore::new(limits.max_connections)),
            limits,
            log: RateLimitedLog::default(),
        }
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    /// The next admitted connection. Connections over a budget are closed
    /// here and counted; accept errors (out of descriptors) back off
    /// briefly instead of spinning, logged at most once per interval.
    pub async fn accept(&mut self) -> (GuardedStream, SocketAddr) {
        loop {
            let (tcp, peer) = match self.inner.accept().await {
                Ok(accepted) => accepted,
                Err(err) => {
                    self.log.warn(self.limits.listener, || {
                        format!("cannot accept a connection: {err}")
                    });
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let listener_slot = self.slots.clone().try_acquire_owned();
            let process_slot = self.limits.process.slots.clone().try_acquire_owned();
            let (Ok(listener_slot), Ok(process_slot)) = (listener_slot, process_slot) else {
                // Dropping the socket closes it before anything is read.
                drop(tcp);
                self.limits.refused.inc();
                let listener = self.limits.listener;
                self.log.warn(listener, || {
                    format!(
                        "refusing connections over the bound (limits.max_connections_per_listener \
                         or limits.max_connections); last from {peer}"
                    )
                });
                continue;
            };
            if let Err(err) = tcp.set_nodelay(true) {
                tracing::debug!(error = %err, "cannot set TCP_NODELAY");
            }
            self.limits.open.inc();
            return (
                GuardedStream {
                    inner: tcp,
                    idle_timeout: self.limits.idle_timeout,
                    idle: Box::pin(tokio::time::sleep(self.limits.idle_timeout)),
                    _slots: (listener_slot, process_slot),
                    open: self.limits.open.clone(),
                },
                peer,
            );
        }
    }
}

impl axum::serve::Listener for GuardedListener {
    type Io = GuardedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        GuardedListener::accept(self).await
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        GuardedListener::local_addr(self)
    }
}

/// An admitted connection: holds its two slots until closed, and fails
/// with `TimedOut` once neither side has moved a byte for the idle timeout
/// (the server then closes it).
pub struct GuardedStream {
    inner: TcpStream,
    idle_timeout: Duration,
    idle: Pin<Box<Sleep>>,
    _slots: (OwnedSemaphorePermit, OwnedSemaphorePermit),
    open: Gauge,
}

impl GuardedStream {
    pub fn peer_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.peer_addr()
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn moved(&mut self) {
        let deadline = tokio::time::Instant::now() + self.idle_timeout;
        self.idle.as_mut().reset(deadline);
    }

    /// What a write came back with, seen by the idle timer: bytes written
    /// move it on; a write still pending past it (a client that stopped
    /// reading our answer) fails.
    fn after_write(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<std::io::Result<usize>>,
    ) -> Poll<std::io::Result<usize>> {
        match polled {
            Poll::Ready(Ok(written)) => {
                if written > 0 {
                    self.moved();
                }
                Poll::Ready(Ok(written))
            }
            Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
            Poll::Pending if self.idle_expired(cx) => Poll::Ready(Err(idle_error())),
            Poll::Pending => Poll::Pending,
        }
    }

    fn idle_expired(&mut self, cx: &mut Context<'_>) -> bool {
        self.idle.as_mut().poll(cx).is_ready()
    }
}

impl Drop for GuardedStream {
    fn drop(&mut self) {
        self.open.dec();
    }
}

fn idle_error() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "no bytes either way for limits.idle_timeout",
    )
}

impl AsyncRead for GuardedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    self.moved();
                }
                Poll::Ready(result)
            }
            Poll::Pending if self.idle_expired(cx) => Poll::Ready(Err(idle_error())),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncWrite for GuardedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        self.after_write(cx, polled)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.after_write(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for GuardedStream {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// One warning per interval per listener, with how many were suppressed,
/// so a flood of refusals cannot flood the log.
#[derive(Default)]
struct RateLimitedLog {
    last: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

impl RateLimitedLog {
    fn warn(&self, listener: &'static str, message: impl FnOnce() -> String) {
        let now = Instant::now();
        let mut last = match self.last.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        if last.is_some_and(|at| now.duration_since(at) < LOG_EVERY) {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        *last = Some(now);
        let suppressed = self.suppressed.swap(0, Ordering::Relaxed);
        let message = message();
        tracing::warn!(listener, suppressed, "{message}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_leaves_the_reserve_to_everything_else() {
        let budget = DescriptorBudget {
            was: 1024,
            soft: 1024,
            hard: 1024,
        };
        assert_eq!(
            budget.connections(10_000),
            1024 - DESCRIPTOR_RESERVE as usize
        );
        assert_eq!(budget.connections(100), 100);
    }

    #[test]
    fn refusals_are_logged_once_per_interval() {
        let log = RateLimitedLog::default();
        let mut calls = 0;
        for _ in 0..100 {
            log.warn("http", || {
                calls += 1;
                String::new()
            });
        }
        assert_eq!(calls, 1);
        assert_eq!(log.suppressed.load(Ordering::Relaxed), 99);
    }
}
