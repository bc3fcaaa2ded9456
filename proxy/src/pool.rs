//! Keep-alive connections to one upstream.
//!
//! The pool belongs to its [`Upstream`](crate::Upstream), so it dies with the set of its
//! generation: a connection to a process being drained is never handed to a new request.
//! It is ours rather than a generic client's because rolld must know that a connect
//! failed before anything was sent, to retry the request on another upstream.

use std::io;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::net::TcpStream;

pub(crate) use crate::exchange::Conn;

/// Idle connections kept per upstream and worker thread (like nginx's `keepalive`):
/// enough for a few hundred concurrent clients; a burst beyond it closes the surplus
/// instead of holding its buffers.
const MAX_IDLE: usize = 64;
/// An idle connection older than this is closed rather than reused: app servers close
/// idle keep-alive connections themselves (5 s is common), and reusing one at that
/// moment would fail the request.
const IDLE_TIMEOUT: Duration = Duration::from_secs(4);

struct Idle {
    conn: Box<Conn>,
    /// When it went idle, in `clock::ms`.
    since_ms: u64,
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

    /// A connection to send on: an idle one that is still open if there is one, else a
    /// new one.
    pub(crate) async fn checkout(&self, connect_timeout: Duration) -> io::Result<Box<Conn>> {
        while let Some(idle) = self.pop() {
            if crate::clock::ms().saturating_sub(idle.since_ms) > IDLE_TIMEOUT.as_millis() as u64
                || !idle.conn.is_open()
            {
                continue;
            }
            let mut conn = idle.conn;
            conn.reused = true;
            return Ok(conn);
        }
        self.connect(connect_timeout).await
    }

    /// A new connection, never a pooled one.
    pub(crate) async fn connect(&self, connect_timeout: Duration) -> io::Result<Box<Conn>> {
        let stream =
            match tokio::time::timeout(connect_timeout, TcpStream::connect(self.addr)).await {
                Ok(stream) => stream?,
                Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
            };
        stream.set_nodelay(true)?;
        Ok(Conn::new(stream))
    }

    /// Returns a connection whose last exchange completed.
    pub(crate) fn checkin(&self, mut conn: Box<Conn>) {
        conn.shrink();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(Idle {
                conn,
                since_ms: crate::clock::ms(),
            });
        }
    }
}
