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
pub const MAX_IDLE: usize = 64;
/// An idle connection this young may carry any request. App servers close idle
/// keep-alive connections themselves (5 s is common), and a request written at that
/// very moment fails after it was sent, which only a request that can be sent again
/// survives. An older one carries only such requests (see [`Pool::checkout`]), up to
/// `upstream_keepalive_timeout` (60 s, as nginx's); then it is closed. Keeping them
/// lets traffic that pauses for a few seconds come back to warm connections instead
/// of connecting to every process anew. A connection the app closed is dropped as soon
/// as that is seen.
const SAFE_IDLE: Duration = Duration::from_secs(4);

struct Idle {
    conn: Box<Conn>,
    /// When it went idle, in `clock::ms`.
    since_ms: u64,
}

impl Idle {
    /// Whether it may carry another request: not idle longer than `timeout`, not closed
    /// by the app.
    fn is_usable(&self, now_ms: u64, timeout: Duration) -> bool {
        self.idle_ms(now_ms) <= timeout.as_millis() as u64 && self.conn.is_open()
    }

    /// Whether it idled longer than [`SAFE_IDLE`]: the app may close it any moment.
    fn is_aged(&self, now_ms: u64) -> bool {
        self.idle_ms(now_ms) > SAFE_IDLE.as_millis() as u64
    }

    fn idle_ms(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.since_ms)
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

    /// The most recently pooled connection, unless `aged_ok` is false and it idled
    /// longer than [`SAFE_IDLE`] (then so did all the others: they are kept for requests
    /// that may take them).
    fn pop(&self, aged_ok: bool, now_ms: u64) -> Option<Idle> {
        let mut idle = self.idle();
        if !aged_ok && idle.last()?.is_aged(now_ms) {
            return None;
        }
        idle.pop()
    }

    /// A connection to send on: an idle one that is still open if there is one, else a
    /// new one. `resendable` says whether the request could be sent again if the
    /// connection failed after it was written; only such a request takes a connection
    /// that idled longer than [`SAFE_IDLE`], which the app may be closing right then.
    /// One idle longer than `keepalive` is closed.
    pub(crate) async fn checkout(
        &self,
        connect_timeout: Duration,
        keepalive: Duration,
        resendable: bool,
    ) -> io::Result<Box<Conn>> {
        match self.take(resendable, crate::clock::ms(), keepalive) {
            Some(conn) => Ok(conn),
            None => self.connect(connect_timeout).await,
        }
    }

    /// The idle connection [`checkout`](Pool::checkout) would take at `now_ms`, if any.
    fn take(&self, resendable: bool, now_ms: u64, keepalive: Duration) -> Option<Box<Conn>> {
        while let Some(idle) = self.pop(resendable, now_ms) {
            if !idle.is_usable(now_ms, keepalive) {
                continue;
            }
            let mut conn = idle.conn;
            conn.reused = true;
            return Some(conn);
        }
        None
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

    /// Closes the idle connections that no request may take any more: idle longer than
    /// `keepalive`, or closed by the app. Without it, those left under the ones in use
    /// stay open (half-closed by the app, for most) until the set is replaced. The ones
    /// kept that idled longer than [`SAFE_IDLE`] let go of their read buffers: a pause in
    /// the traffic holds sockets, not memory.
    pub(crate) fn sweep(&self, keepalive: Duration) {
        self.sweep_at(crate::clock::ms(), keepalive);
    }

    fn sweep_at(&self, now_ms: u64, keepalive: Duration) {
        let mut done = Vec::new();
        {
            let mut idle = self.idle();
            let mut i = 0;
            while i < idle.len() {
                if idle[i].is_usable(now_ms, keepalive) {
                    if idle[i].is_aged(now_ms) {
                        idle[i].conn.release_buffer();
                    }
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

    /// When the most recently pooled connection went idle, and its read buffer's size.
    #[cfg(test)]
    fn newest(&self) -> (u64, usize) {
        let idle = self.idle();
        let newest = idle.last().expect("a pooled connection");
        (newest.since_ms, newest.conn.buffer_capacity())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;
    use tokio::io::AsyncReadExt;

    const SOON: Duration = Duration::from_secs(20);
    const KEEPALIVE: Duration = Duration::from_secs(60);

    /// A pooled connection to a listener that accepted it, and the app's end of it.
    async fn pooled() -> (Pool, TcpStream, tokio::net::TcpListener) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let pool = Pool::new(listener.local_addr().expect("addr"));
        let conn = pool
            .checkout(Duration::from_secs(5), KEEPALIVE, true)
            .await
            .expect("connect");
        let (app_side, _) = listener.accept().await.expect("accept");
        pool.checkin(conn);
        (pool, app_side, listener)
    }

    /// A sweep keeps a fresh, open connection, and drops one the app closed at once,
    /// long before the idle timeout would.
    #[tokio::test]
    async fn a_sweep_keeps_an_open_connection_and_drops_one_the_app_closed() {
        let (pool, app_side, _listener) = pooled().await;
        pool.sweep(KEEPALIVE);
        assert_eq!(pool.idle_count(), 1, "a fresh open connection was dropped");

        drop(app_side);
        let closed_at = Instant::now();
        while pool.idle_count() == 1 {
            assert!(
                closed_at.elapsed() < SAFE_IDLE / 2,
                "a connection the app closed is still pooled"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
            pool.sweep(KEEPALIVE);
        }
    }

    /// Up to 4 s idle, any request takes the connection; past that, while the app may be
    /// closing it, only one that could be sent again does, and the others leave it for
    /// such a request.
    #[tokio::test]
    async fn a_connection_idle_past_the_safe_age_goes_only_to_a_request_that_can_be_resent() {
        let (pool, _app, _listener) = pooled().await;
        let (since, _) = pool.newest();
        let safe = SAFE_IDLE.as_millis() as u64;

        let young = pool
            .take(false, since + safe, KEEPALIVE)
            .expect("a young connection");
        assert!(young.reused);
        pool.checkin(young);
        let (since, _) = pool.newest();

        assert!(
            pool.take(false, since + safe + 1, KEEPALIVE).is_none(),
            "a request that cannot be sent again took an aged connection"
        );
        assert_eq!(pool.idle_count(), 1, "the aged connection was not kept");
        assert!(
            pool.take(true, since + safe + 1, KEEPALIVE).is_some(),
            "a request that can be sent again did not take the aged connection"
        );
        assert_eq!(pool.idle_count(), 0);
    }

    /// A connection idle for the whole idle timeout is kept, and closed after it: by
    /// the sweep, or by the request that finds it too old.
    #[tokio::test]
    async fn an_idle_connection_is_kept_for_the_idle_timeout_and_closed_after() {
        let limit = KEEPALIVE.as_millis() as u64;
        for by_request in [false, true] {
            let (pool, mut app, _listener) = pooled().await;
            let (since, _) = pool.newest();
            pool.sweep_at(since + limit, KEEPALIVE);
            assert_eq!(pool.idle_count(), 1, "closed before the idle timeout");

            if by_request {
                assert!(pool.take(true, since + limit + 1, KEEPALIVE).is_none());
            } else {
                pool.sweep_at(since + limit + 1, KEEPALIVE);
            }
            assert_eq!(pool.idle_count(), 0, "kept past the idle timeout");
            let mut byte = [0u8; 1];
            let read = tokio::time::timeout(SOON, app.read(&mut byte)).await;
            assert!(
                matches!(read, Ok(Ok(0))),
                "the app's end is still open: {read:?}"
            );
        }
    }

    /// Past 4 s idle, a kept connection holds its socket, not its read buffer.
    #[tokio::test]
    async fn a_sweep_lets_an_aged_connection_release_its_read_buffer() {
        let (pool, _app, _listener) = pooled().await;
        let mut conn = pool.take(true, 0, KEEPALIVE).expect("pooled");
        conn.reserve_buffer_for_test();
        pool.checkin(conn);
        let (since, capacity) = pool.newest();
        assert!(capacity > 0);
        let safe = SAFE_IDLE.as_millis() as u64;

        pool.sweep_at(since + safe, KEEPALIVE);
        assert_eq!(
            pool.newest().1,
            capacity,
            "a young connection lost its buffer"
        );
        pool.sweep_at(since + safe + 1, KEEPALIVE);
        assert_eq!(pool.idle_count(), 1);
        assert_eq!(pool.newest().1, 0, "an aged connection kept its buffer");
    }
}
