//! Waiting for a replaced upstream set to have exactly zero requests in flight.
//!
//! Nothing is counted here: every request owns a reference to the set it was routed
//! to, so the set is dropped exactly when its last request ends, and the drop wakes the
//! waiter. A count that must be kept in sync by hand could drift; ownership cannot.

use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::watch;

use crate::upstream::UpstreamSet;

/// The drain of one replaced upstream set.
#[derive(Debug)]
pub struct Drain {
    generation: u64,
    set: Weak<UpstreamSet>,
    dropped: watch::Receiver<()>,
}

/// The drain timed out with requests still in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainTimedOut {
    /// Requests still in flight when the timeout passed.
    pub in_flight: usize,
}

impl Drain {
    pub(crate) fn new(old: Arc<UpstreamSet>) -> Self {
        let dropped = old.dropped.subscribe();
        Drain {
            generation: old.generation(),
            set: Arc::downgrade(&old),
            dropped,
        }
    }

    /// The generation of the set being drained.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Requests still in flight on the old set.
    pub fn in_flight(&self) -> usize {
        self.set.upgrade().map_or(0, |set| set.in_flight())
    }

    /// Resolves when the old set's last request has ended.
    pub async fn wait(&mut self) {
        // The sender is never used, so `changed` returns only when it is dropped with
        // the set. If it is already gone this returns at once.
        while self.dropped.changed().await.is_ok() {}
    }

    /// [`wait`](Self::wait), bounded by `timeout`.
    pub async fn wait_timeout(&mut self, timeout: Duration) -> Result<(), DrainTimedOut> {
        match tokio::time::timeout(timeout, self.wait()).await {
            Ok(()) => Ok(()),
            Err(_) => {
                // The caller cuts what is left; the proxy must not resend it elsewhere.
                if let Some(set) = self.set.upgrade() {
                    set.cut.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                Err(DrainTimedOut {
                    in_flight: self.in_flight(),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::{Balance, InFlight, Upstreams};
    use std::net::SocketAddr;

    fn set(generation: u64) -> Arc<UpstreamSet> {
        let addr = SocketAddr::from(([127, 0, 0, 1], 1));
        Arc::new(UpstreamSet::new(generation, &[addr], Balance::LeastConn))
    }

    #[tokio::test]
    async fn drain_resolves_at_once_when_nothing_is_in_flight() {
        let upstreams = Upstreams::new();
        upstreams.swap(set(7));
        let mut drain = upstreams.swap(set(8));
        assert_eq!(drain.generation(), 7);
        assert_eq!(drain.in_flight(), 0);
        drain
            .wait_timeout(Duration::from_secs(5))
            .await
            .expect("no request was in flight");
    }

    #[tokio::test]
    async fn drain_waits_for_a_request_routed_before_the_swap() {
        let upstreams = Upstreams::new();
        upstreams.swap(set(1));
        let lease = InFlight::route(upstreams.current()).expect("upstream");
        let second = InFlight::route(upstreams.current()).expect("upstream");
        let mut drain = upstreams.swap(set(2));
        assert_eq!(drain.in_flight(), 2);
        let cut = drain.wait_timeout(Duration::from_millis(50)).await;
        assert_eq!(cut, Err(DrainTimedOut { in_flight: 2 }));
        drop(second);
        assert_eq!(drain.in_flight(), 1);
        let waiter = tokio::spawn(async move { drain.wait().await });
        drop(lease);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("drain ends when the last request ends")
            .expect("waiter task");
    }
}
