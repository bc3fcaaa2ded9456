//! The upstreams a request can be routed to.
//!
//! One [`UpstreamSet`] per generation of app processes, immutable once built, installed
//! behind a single [`Upstreams`] swap so that everything a request needs (addresses,
//! counters, connection pools) comes from one atomic load. A request owns an
//! [`InFlight`] lease on its set from routing until its response ends; the set is
//! dropped when the last lease goes, and that drop *is* the end of the drain.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::drain::Drain;
use crate::pool::Pool;

/// How a request picks its upstream within a set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Balance {
    /// The upstream with the fewest requests in flight; ties rotate so load spreads.
    #[default]
    LeastConn,
    /// Each upstream in turn.
    RoundRobin,
}

impl std::fmt::Display for Balance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Balance::LeastConn => "least_conn",
            Balance::RoundRobin => "round_robin",
        })
    }
}

/// One app process as the proxy sees it.
#[derive(Debug)]
pub struct Upstream {
    addr: SocketAddr,
    /// Requests routed here whose response has not ended yet.
    in_flight: AtomicUsize,
    /// Set by the supervisor: false while the process is dead or restarting.
    available: AtomicBool,
    /// Passive health: after a failed connect, skipped until this instant (see [`now_ms`]).
    down_until_ms: AtomicU64,
    /// Idle keep-alive connections to this process, one pool per proxy worker thread
    /// so that a connection is only used by the thread whose event loop drives it;
    /// dies with the set.
    pools: Box<[Pool]>,
}

impl Upstream {
    fn new(addr: SocketAddr) -> Self {
        Upstream {
            addr,
            in_flight: AtomicUsize::new(0),
            available: AtomicBool::new(true),
            down_until_ms: AtomicU64::new(0),
            pools: (0..pool_count()).map(|_| Pool::new(addr)).collect(),
        }
    }

    /// This thread's pool of connections to the upstream.
    pub(crate) fn pool(&self) -> &Pool {
        &self.pools[crate::server::worker_id() % self.pools.len()]
    }

    /// The process's listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Requests currently routed to this upstream.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Marks the process as (un)able to take requests. The supervisor calls this when a
    /// process dies and again once its replacement is ready.
    pub fn set_available(&self, available: bool) {
        self.available.store(available, Ordering::Release);
        if available {
            self.down_until_ms.store(0, Ordering::Relaxed);
        }
    }

    /// Whether the balancer may pick this upstream now.
    pub fn is_available(&self) -> bool {
        self.available.load(Ordering::Acquire)
            && self.down_until_ms.load(Ordering::Relaxed) <= now_ms()
    }

    /// Passive health: a connect failed, so skip this upstream for `period`.
    pub(crate) fn mark_down_for(&self, period: Duration) {
        let until = now_ms() + period.as_millis() as u64;
        self.down_until_ms.store(until, Ordering::Relaxed);
    }
}

/// One pool per possible worker thread.
fn pool_count() -> usize {
    static COUNT: OnceLock<usize> = OnceLock::new();
    *COUNT.get_or_init(|| {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .max(1)
    })
}

/// Milliseconds since the first call; cheap monotonic time for passive health.
fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// The upstreams of one generation. Immutable: a new generation builds a new set.
#[derive(Debug)]
pub struct UpstreamSet {
    generation: u64,
    upstreams: Box<[Arc<Upstream>]>,
    balance: Balance,
    /// Round-robin cursor, and where least-conn starts scanning so ties rotate.
    cursor: AtomicUsize,
    /// Never sent on: dropping it with the set wakes every [`Drain`] of this set.
    pub(crate) dropped: watch::Sender<()>,
}

impl UpstreamSet {
    /// A set for `generation` with one upstream per address.
    pub fn new(generation: u64, addrs: &[SocketAddr], balance: Balance) -> Self {
        UpstreamSet {
            generation,
            upstreams: addrs.iter().map(|&a| Arc::new(Upstream::new(a))).collect(),
            balance,
            cursor: AtomicUsize::new(0),
            dropped: watch::Sender::new(()),
        }
    }

    /// The empty set: every request gets 503 until a real set is installed.
    pub fn empty() -> Self {
        Self::new(0, &[], Balance::default())
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn upstreams(&self) -> &[Arc<Upstream>] {
        &self.upstreams
    }

    /// The upstream for `addr`, for the supervisor to mark (un)available.
    pub fn get(&self, addr: SocketAddr) -> Option<&Arc<Upstream>> {
        self.upstreams.iter().find(|u| u.addr == addr)
    }

    pub fn is_empty(&self) -> bool {
        self.upstreams.is_empty()
    }

    /// Requests in flight on this set, all upstreams together.
    pub fn in_flight(&self) -> usize {
        self.upstreams.iter().map(|u| u.in_flight()).sum()
    }

    /// Picks an available upstream not in `tried` (a bit mask of indexes; sets larger
    /// than 64 simply do not exclude beyond that).
    fn pick(&self, tried: u64) -> Option<usize> {
        let n = self.upstreams.len();
        if n == 0 {
            return None;
        }
        let start = self.cursor.fetch_add(1, Ordering::Relaxed);
        let candidates = (0..n)
            .map(|i| (start + i) % n)
            .filter(|&i| i >= 64 || tried & (1 << i) == 0)
            .filter(|&i| self.upstreams[i].is_available());
        match self.balance {
            Balance::RoundRobin => candidates.into_iter().next(),
            // min_by_key keeps the first of equal keys, and the scan starts at a rotating
            // index, so ties spread over the set.
            Balance::LeastConn => candidates.min_by_key(|&i| self.upstreams[i].in_flight()),
        }
    }
}

/// A request's hold on one upstream of one set, from routing until its response ends.
/// Holding the set keeps its [`Drain`] waiting; dropping the lease releases both.
#[derive(Debug)]
pub struct InFlight {
    set: Arc<UpstreamSet>,
    index: usize,
    /// Indexes already tried by this request (retries go elsewhere).
    tried: u64,
}

impl InFlight {
    /// Routes a request: picks an upstream of `set` and counts the request on it.
    pub fn route(set: Arc<UpstreamSet>) -> Option<InFlight> {
        let index = set.pick(0)?;
        set.upstreams[index]
            .in_flight
            .fetch_add(1, Ordering::Relaxed);
        Some(InFlight {
            set,
            index,
            tried: 0,
        })
    }

    /// Moves this request to another upstream of the same set after a failed connect.
    /// Returns false when no other upstream is available (the lease stays where it was).
    pub fn reroute(&mut self) -> bool {
        if self.index < 64 {
            self.tried |= 1 << self.index;
        }
        let Some(next) = self.set.pick(self.tried) else {
            return false;
        };
        self.set.upstreams[next]
            .in_flight
            .fetch_add(1, Ordering::Relaxed);
        self.set.upstreams[self.index]
            .in_flight
            .fetch_sub(1, Ordering::Relaxed);
        self.index = next;
        true
    }

    pub fn upstream(&self) -> &Arc<Upstream> {
        &self.set.upstreams[self.index]
    }

    pub fn generation(&self) -> u64 {
        self.set.generation
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.set.upstreams[self.index]
            .in_flight
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// The proxy's current upstream set: one atomic pointer, swapped per generation.
#[derive(Debug)]
pub struct Upstreams {
    current: ArcSwap<UpstreamSet>,
}

impl Default for Upstreams {
    fn default() -> Self {
        Self::new()
    }
}

impl Upstreams {
    /// Starts with the empty set (503 for every request).
    pub fn new() -> Self {
        Upstreams {
            current: ArcSwap::from_pointee(UpstreamSet::empty()),
        }
    }

    /// The set new requests are routed to now.
    pub fn current(&self) -> Arc<UpstreamSet> {
        self.current.load_full()
    }

    /// Installs `next` for every request routed from now on, and returns the drain of
    /// the set it replaced. Requests that loaded the old set before the swap are counted
    /// by it: arc-swap turns every outstanding load into a real reference during `swap`.
    pub fn swap(&self, next: Arc<UpstreamSet>) -> Drain {
        let old = self.current.swap(next);
        Drain::new(old)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(n: u16) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| SocketAddr::from(([127, 0, 0, 1], 10_000 + i)))
            .collect()
    }

    #[test]
    fn a_set_knows_its_generation_and_finds_its_upstreams_by_address() {
        let list = addrs(3);
        let set = Arc::new(UpstreamSet::new(9, &list, Balance::LeastConn));
        assert_eq!(set.generation(), 9);
        assert!(!set.is_empty());
        assert!(UpstreamSet::empty().is_empty());
        let found: Vec<SocketAddr> = set.upstreams().iter().map(|u| u.addr()).collect();
        assert_eq!(found, list);
        assert_eq!(set.get(list[2]).map(|u| u.addr()), Some(list[2]));
        assert!(set.get(SocketAddr::from(([127, 0, 0, 1], 9))).is_none());
        let lease = InFlight::route(set.clone()).expect("upstream");
        assert_eq!(lease.generation(), 9);
    }

    #[test]
    fn an_upstream_marked_down_is_skipped_for_that_period_then_comes_back() {
        let set = Arc::new(UpstreamSet::new(1, &addrs(1), Balance::LeastConn));
        let upstream = &set.upstreams()[0];
        upstream.mark_down_for(Duration::from_secs(3600));
        assert!(!upstream.is_available(), "down for an hour");
        assert!(InFlight::route(set.clone()).is_none());
        upstream.mark_down_for(Duration::from_millis(30));
        let deadline = Instant::now() + Duration::from_secs(5);
        while !upstream.is_available() {
            assert!(Instant::now() < deadline, "available again after 30 ms");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn reroute_works_past_the_64th_upstream() {
        // The tried-mask holds 64 upstreams; larger sets must not overflow it.
        let set = Arc::new(UpstreamSet::new(1, &addrs(66), Balance::RoundRobin));
        let mut lease = (0..200)
            .filter_map(|_| InFlight::route(set.clone()))
            .find(|l| l.index == 64)
            .expect("round robin reaches index 64");
        assert!(lease.reroute());
        assert_ne!(lease.index, 64);
    }

    #[test]
    fn least_conn_prefers_the_idlest_and_spreads_ties() {
        let set = Arc::new(UpstreamSet::new(1, &addrs(3), Balance::LeastConn));
        let leases: Vec<_> = (0..3)
            .map(|_| InFlight::route(set.clone()).expect("set has upstreams"))
            .collect();
        let mut picked: Vec<_> = leases.iter().map(|l| l.index).collect();
        picked.sort_unstable();
        assert_eq!(
            picked,
            vec![0, 1, 2],
            "three requests spread over three idle upstreams"
        );
        drop(leases);
        assert_eq!(set.in_flight(), 0);
    }

    #[test]
    fn round_robin_visits_each_in_turn() {
        let set = Arc::new(UpstreamSet::new(1, &addrs(2), Balance::RoundRobin));
        let a = InFlight::route(set.clone()).expect("upstream").index;
        let b = InFlight::route(set.clone()).expect("upstream").index;
        assert_ne!(a, b);
    }

    #[test]
    fn unavailable_upstreams_are_skipped_and_reroute_avoids_tried_ones() {
        let set = Arc::new(UpstreamSet::new(1, &addrs(3), Balance::LeastConn));
        set.upstreams[1].set_available(false);
        for _ in 0..10 {
            let lease = InFlight::route(set.clone()).expect("upstream");
            assert_ne!(lease.index, 1);
        }
        let mut lease = InFlight::route(set.clone()).expect("upstream");
        let first = lease.index;
        assert!(lease.reroute());
        assert_ne!(lease.index, first);
        assert!(!lease.reroute(), "both available upstreams were tried");
        assert_eq!(set.in_flight(), 1);
    }

    #[test]
    fn an_upstream_whose_connect_failed_is_skipped_for_a_while() {
        let set = Arc::new(UpstreamSet::new(1, &addrs(2), Balance::RoundRobin));
        set.upstreams[0].mark_down_for(Duration::from_secs(60));
        for _ in 0..10 {
            assert_eq!(InFlight::route(set.clone()).expect("upstream").index, 1);
        }
        set.upstreams[0].set_available(true);
        let picked: Vec<_> = (0..4)
            .map(|_| InFlight::route(set.clone()).expect("upstream").index)
            .collect();
        assert!(picked.contains(&0), "available again: {picked:?}");
    }

    #[test]
    fn empty_set_routes_nothing() {
        assert!(InFlight::route(Arc::new(UpstreamSet::empty())).is_none());
    }
}
