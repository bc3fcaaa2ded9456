//! Keep-alive connections to one upstream.
//!
//! The pool belongs to its [`Upstream`](crate::Upstream), so it dies with the set of its
//! generation: a connection to a process being drained is never handed to a new request.
//! It is ours rather than a generic client's because rolld must know that a connect
//! failed before anything was sent, to retry the request on another upstream.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tracing::debug;

use crate::body::RequestBody;
use crate::moved::{Moved, Tracked};

/// Idle connections kept per upstream and worker thread (like nginx's `keepalive`):
/// enough for a few hundred concurrent clients; a burst beyond it closes the surplus
/// instead of holding its buffers.
const MAX_IDLE: usize = 64;
/// An idle connection older than this is closed rather than reused: app servers close
/// idle keep-alive connections themselves (5 s is common), and reusing one at that
/// moment would fail the request.
const IDLE_TIMEOUT: Duration = Duration::from_secs(4);
/// Longest wait for an idle connection to finish its previous exchange.
const READY_TIMEOUT: Duration = Duration::from_millis(500);

/// One HTTP/1.1 connection to an upstream.
pub(crate) struct Conn {
    pub(crate) sender: http1::SendRequest<RequestBody>,
    /// Taken from the pool rather than freshly connected.
    pub(crate) reused: bool,
    /// When the connection last read bytes from the upstream.
    pub(crate) reads: Arc<Moved>,
}

struct Idle {
    sender: http1::SendRequest<RequestBody>,
    since: Instant,
    reads: Arc<Moved>,
}

pub(crate) struct Pool {
    addr: SocketAddr,
    idle: Mutex<Vec<Idle>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("addr", &self.addr).finish()
    }
}

impl Pool {
    pub(crate) fn new(addr: SocketAddr) -> Self {
        Pool {
            addr,
            idle: Mutex::new(Vec::new()),
        }
    }

    fn pop(&self) -> Option<Idle> {
        // A poisoned lock only means another request panicked mid-push; the Vec is fine.
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop()
    }

    /// A ready connection: an idle one if there is one, else a new one.
    pub(crate) async fn checkout(&self, connect_timeout: Duration) -> io::Result<Conn> {
        while let Some(mut idle) = self.pop() {
            if idle.since.elapsed() > IDLE_TIMEOUT || idle.sender.is_closed() {
                continue;
            }
            if let Ok(Ok(())) = tokio::time::timeout(READY_TIMEOUT, idle.sender.ready()).await {
                return Ok(Conn {
                    sender: idle.sender,
                    reused: true,
                    reads: idle.reads,
                });
            }
        }
        self.connect(connect_timeout).await
    }

    /// A new connection, never a pooled one.
    pub(crate) async fn connect(&self, connect_timeout: Duration) -> io::Result<Conn> {
        let stream =
            match tokio::time::timeout(connect_timeout, TcpStream::connect(self.addr)).await {
                Ok(stream) => stream?,
                Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
            };
        stream.set_nodelay(true)?;
        let reads = Arc::new(Moved::new());
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(Tracked::new(stream, reads.clone())))
            .await
            .map_err(io::Error::other)?;
        let addr = self.addr;
        tokio::spawn(async move {
            if let Err(err) = conn.with_upgrades().await {
                debug!(upstream = %addr, error = %err, "upstream connection ended");
            }
        });
        Ok(Conn {
            sender,
            reused: false,
            reads,
        })
    }

    /// Returns a connection whose last exchange completed.
    pub(crate) fn checkin(&self, conn: Conn) {
        if conn.sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(Idle {
                sender: conn.sender,
                since: Instant::now(),
                reads: conn.reads,
            });
        }
    }
}
