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
/// moment would fail the request. [`Pool::sweep`] closes it even if no request comes.
const IDLE_TIMEOUT: Duration = Duration::from_secs(4);

struct Idle {
    conn: Box<Conn>,
    /// When it went idle, in `clock::ms`.
    since_ms: u64,
}

impl Idle {
    /// Whether it may carry another request: not idle too long, not closed by the app.
    fn is_usable(&self, now_ms: u64) -> bool {
        now_ms.saturating_sub(self.since_ms) <= IDLE_TIMEOUT.as_millis() as u64
            && self.conn.is_open()
    }
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

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        // A poisoned lock only means another request panicked mid-push; the Vec is fine.
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pop(&self) -> Option<Idle> {
        self.idle().pop()
    }

    /// A connection to send on: an idle one that is still open if there is one, else a
    /// new one.
    pub(crate) async fn checkout(&self, connect_timeout: Duration) -> io::Result<Box<Conn>> {
        while let Some(idle) = self.pop() {
            if !idle.is_usable(crate::clock::ms()) {
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
        let mut idle = self.idle();
        if idle.len() < MAX_IDLE {
            idle.push(Idle {
                conn,
                since_ms: crate::clock::ms(),
            });
        }
    }

    /// Closes the idle connections that no request may take any more: idle too long,
    /// or closed by the app. Without it, those left under the ones in use stay open
    /// (half-closed by the app, for most) until the set is replaced.
    pub(crate) fn sweep(&self) {
        let now_ms = crate::clock::ms();
        let mut done = Vec::new();
        {
            let mut idle = self.idle();
            let mut i = 0;
            while i < idle.len() {
                if idle[i].is_usable(now_ms) {
                    i += 1;
                } else {
                    done.push(idle.remove(i));
                }
            }
        }
        // Closed outside the lock.
        drop(done);
    }

    #[cfg(test)]
    fn idle_count(&self) -> usize {
        self.idle().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// A sweep keeps a fresh, open connection, and drops one the app closed at once,
    /// long before the idle timeout would.
    #[tokio::test]
    async fn a_sweep_keeps_an_open_connection_and_drops_one_the_app_closed() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let pool = Pool::new(listener.local_addr().expect("addr"));
        let conn = pool
            .checkout(Duration::from_secs(5))
            .await
            .expect("connect");
        let (app_side, _) = listener.accept().await.expect("accept");
        pool.checkin(conn);
        pool.sweep();
        assert_eq!(pool.idle_count(), 1, "a fresh open connection was dropped");

        drop(app_side);
        let closed_at = Instant::now();
        while pool.idle_count() == 1 {
            assert!(
                closed_at.elapsed() < IDLE_TIMEOUT / 2,
                "a connection the app closed is still pooled"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
            pool.sweep();
        }
    }
}
