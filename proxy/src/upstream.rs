//! The upstreams a request can be routed to.
//!
//! One [`UpstreamSet`] per generation of app processes, immutable once built, installed
//! behind a single [`Upstreams`] swap so that everything a request needs (addresses,
//! counters, connection pools) comes from one atomic load. A request owns an
//! [`InFlight`] lease on its set from routing until its response ends; the set is
//! dropped when the last lease goes, and that drop *is* the end of the drain.
//!
//! During a canary a second set takes an exact share of new requests; each request
//! still holds a lease on exactly the set it was routed to, so both sets drain exactly.
//! Every set counts what became of its requests ([`Outcomes`]): that count is what a
//! release is judged on after the switch.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::sync::watch;

use crate::drain::Drain;
use crate::error::ProxyError;
use crate::hold::{Hold, HoldSnapshot, Leases, Place, Turn};
use crate::pool::Pool;

/// The [`Upstreams`] a set is installed in, filled in by [`Upstreams::swap`]: how an
/// upstream marked available releases held requests.
type Owner = Arc<OnceLock<Weak<Shared>>>;

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
    /// Passive health: after a failed connect, skipped until this instant (in `clock::ms`).
    down_until_ms: AtomicU64,
    /// Idle keep-alive connections to this process, one pool per proxy worker thread
    /// so that a connection is only used by the thread whose event loop drives it;
    /// dies with the set.
    pools: Box<[Pool]>,
    owner: Owner,
}

impl Upstream {
    fn new(addr: SocketAddr, owner: Owner) -> Self {
        Upstream {
            addr,
            in_flight: AtomicUsize::new(0),
            available: AtomicBool::new(true),
            down_until_ms: AtomicU64::new(0),
            pools: (0..pool_count()).map(|_| Pool::new(addr)).collect(),
            owner,
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
    /// process dies and again once its replacement is ready, which releases the
    /// requests held meanwhile.
    pub fn set_available(&self, available: bool) {
        self.available.store(available, Ordering::Release);
        if available {
            self.down_until_ms.store(0, Ordering::Relaxed);
            if let Some(shared) = self.owner.get().and_then(Weak::upgrade) {
                shared.release();
            }
        }
    }

    /// How long until passive health lets the balancer pick this upstream again, if
    /// the supervisor counts it available.
    fn up_in(&self) -> Option<Duration> {
        if !self.available.load(Ordering::Acquire) {
            return None;
        }
        let until = self.down_until_ms.load(Ordering::Relaxed);
        Some(Duration::from_millis(
            until.saturating_sub(crate::clock::ms()),
        ))
    }

    /// Whether the balancer may pick this upstream now.
    pub fn is_available(&self) -> bool {
        // The clock is read only while a mark is set, and a mark that ran out is
        // cleared, so the usual pick over the set reads no clock at all.
        let until = self.down_until_ms.load(Ordering::Relaxed);
        if until != 0 {
            if until > crate::clock::ms() {
                return false;
            }
            // Unless a newer mark (another failure) came meanwhile.
            let _ =
                self.down_until_ms
                    .compare_exchange(until, 0, Ordering::Relaxed, Ordering::Relaxed);
        }
        self.available.load(Ordering::Acquire)
    }

    /// Passive health: a connect failed, so skip this upstream for `period`.
    pub(crate) fn mark_down_for(&self, period: Duration) {
        let until = crate::clock::ms() + period.as_millis() as u64;
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

/// The upstreams of one generation. Immutable: a new generation builds a new set.
#[derive(Debug)]
pub struct UpstreamSet {
    generation: u64,
    upstreams: Box<[Arc<Upstream>]>,
    balance: Balance,
    /// Round-robin cursor, and where least-conn starts scanning so ties rotate.
    cursor: AtomicUsize,
    /// Set when a drain of this set timed out: its requests are being cut on purpose,
    /// and one that was already sent is not resent elsewhere.
    pub(crate) cut: AtomicBool,
    /// What became of the requests routed to this set; shared so that it can be read
    /// without holding the set (which would keep its drain waiting).
    outcomes: Arc<Outcomes>,
    /// Never sent on: dropping it with the set wakes every [`Drain`] of this set.
    pub(crate) dropped: watch::Sender<()>,
    owner: Owner,
    /// The lease counter of the [`Upstreams`] the set is installed in.
    leases: OnceLock<Arc<Leases>>,
}

/// What became of one set's requests: counted once per request, when its answer (or
/// the proxy's own error answer) is decided.
#[derive(Debug, Default)]
pub struct Outcomes {
    /// Requests with an outcome: answered by the upstream, or failed by it.
    requests: AtomicU64,
    /// 5xx answers of the upstream, passed on to the client.
    server_errors: AtomicU64,
    /// Connect and read failures and timeouts of the upstream, answered by the proxy
    /// with 502/504, and answers the upstream broke off mid-body.
    upstream_errors: AtomicU64,
}

/// A reading of [`Outcomes`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OutcomeCounts {
    pub requests: u64,
    pub server_errors: u64,
    pub upstream_errors: u64,
}

impl OutcomeCounts {
    /// Requests that failed, whichever way.
    pub fn failed(&self) -> u64 {
        self.server_errors + self.upstream_errors
    }

    /// The failed share of requests, 0.0 to 1.0 (0.0 without requests).
    pub fn failure_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.failed() as f64 / self.requests as f64
        }
    }
}

impl Outcomes {
    pub fn counts(&self) -> OutcomeCounts {
        OutcomeCounts {
            requests: self.requests.load(Ordering::Relaxed),
            server_errors: self.server_errors.load(Ordering::Relaxed),
            upstream_errors: self.upstream_errors.load(Ordering::Relaxed),
        }
    }
}

impl UpstreamSet {
    /// A set for `generation` with one upstream per address.
    pub fn new(generation: u64, addrs: &[SocketAddr], balance: Balance) -> Self {
        let owner = Owner::default();
        UpstreamSet {
            generation,
            upstreams: addrs
                .iter()
                .map(|&a| Arc::new(Upstream::new(a, owner.clone())))
                .collect(),
            balance,
            cursor: AtomicUsize::new(0),
            cut: AtomicBool::new(false),
            outcomes: Arc::default(),
            dropped: watch::Sender::new(()),
            owner,
            leases: OnceLock::new(),
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

    /// What became of this set's requests so far.
    pub fn outcomes(&self) -> &Arc<Outcomes> {
        &self.outcomes
    }

    /// Requests in flight on this set, all upstreams together.
    pub fn in_flight(&self) -> usize {
        self.upstreams.iter().map(|u| u.in_flight()).sum()
    }

    /// Whether a request can be routed now; if not, how long until passive health may
    /// let one through (None: only the supervisor can make it so).
    fn ready(&self) -> Result<(), Option<Duration>> {
        if self.upstreams.iter().any(|u| u.is_available()) {
            return Ok(());
        }
        Err(self.upstreams.iter().filter_map(|u| u.up_in()).min())
    }

    /// Picks an available upstream not in `tried` (a bit mask of indexes; sets larger
    /// than 64 simply do not exclude beyond that) and other than `not`.
    fn pick(&self, tried: u64, not: Option<usize>) -> Option<usize> {
        let n = self.upstreams.len();
        if n == 0 {
            return None;
        }
        let start = self.cursor.fetch_add(1, Ordering::Relaxed);
        let candidates = (0..n)
            .map(|i| (start + i) % n)
            .filter(|&i| i >= 64 || tried & (1 << i) == 0)
            .filter(|&i| Some(i) != not)
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
        let index = set.pick(0, None)?;
        set.upstreams[index]
            .in_flight
            .fetch_add(1, Ordering::Relaxed);
        if let Some(leases) = set.leases.get() {
            leases.taken();
        }
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
        let Some(next) = self.set.pick(self.tried, Some(self.index)) else {
            return false;
        };
        self.move_to(next);
        true
    }

    /// Moves this request to another upstream of the same set after the one it was
    /// sent to failed under it: one it has not tried if there is one, else any other
    /// (never the same twice in a row). Returns false when the set has no other
    /// upstream available (the lease stays where it was).
    pub fn move_on(&mut self) -> bool {
        if self.reroute() {
            return true;
        }
        let Some(next) = self.set.pick(0, Some(self.index)) else {
            return false;
        };
        // A new round over the set (the next failure marks where it happened).
        self.tried = 0;
        self.move_to(next);
        true
    }

    fn move_to(&mut self, next: usize) {
        self.set.upstreams[next]
            .in_flight
            .fetch_add(1, Ordering::Relaxed);
        self.set.upstreams[self.index]
            .in_flight
            .fetch_sub(1, Ordering::Relaxed);
        self.index = next;
    }

    pub fn upstream(&self) -> &Arc<Upstream> {
        &self.set.upstreams[self.index]
    }

    pub fn generation(&self) -> u64 {
        self.set.generation
    }

    /// Whether its set's drain timed out: its requests are being cut on purpose.
    pub fn is_cut(&self) -> bool {
        self.set.cut.load(Ordering::Relaxed)
    }

    /// Counts the upstream's answer on the set: a 5xx is a failure of the release.
    pub fn answered(&self, status: u16) {
        let outcomes = &self.set.outcomes;
        outcomes.requests.fetch_add(1, Ordering::Relaxed);
        if status >= 500 {
            outcomes.server_errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts an answer the upstream broke off (a reset or a stall mid-body): its
    /// request, already counted as answered, failed after all.
    pub fn cut_mid_answer(&self) {
        self.set
            .outcomes
            .upstream_errors
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a failure of the upstream the proxy answered itself (502, 504).
    pub fn failed(&self) {
        let outcomes = &self.set.outcomes;
        outcomes.requests.fetch_add(1, Ordering::Relaxed);
        outcomes.upstream_errors.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.set.upstreams[self.index]
            .in_flight
            .fetch_sub(1, Ordering::Relaxed);
        if let Some(leases) = self.set.leases.get() {
            leases.dropped();
        }
    }
}

/// The proxy's current upstream set: one atomic pointer, swapped per generation, and
/// during a canary the set that takes a share of new requests, and the requests held
/// while no set can take them.
#[derive(Debug)]
pub struct Upstreams {
    shared: Arc<Shared>,
}

/// What the sets installed in an [`Upstreams`] reach back to.
#[derive(Debug)]
struct Shared {
    current: ArcSwap<UpstreamSet>,
    canary: ArcSwapOption<Canary>,
    /// The set kept to go back to during a bake: it takes a request only when the
    /// current set has no upstream able to (all of its processes died at once).
    standby: ArcSwapOption<UpstreamSet>,
    hold: Hold,
    leases: Arc<Leases>,
}

impl Shared {
    /// Whether a new request can be routed now (to the current set, or else to the
    /// standby); if not, how long until passive health may let one through.
    fn ready(&self) -> Result<(), Option<Duration>> {
        let current = self.current.load().ready();
        let standby = match self.standby.load().as_ref() {
            Some(set) => set.ready(),
            None => return current,
        };
        match (current, standby) {
            (Ok(()), _) | (_, Ok(())) => Ok(()),
            (Err(a), Err(b)) => Err(a.into_iter().chain(b).min()),
        }
    }

    /// Releases the held requests if a set can take them now.
    fn release(&self) {
        self.hold.release(|| self.ready().is_ok());
    }
}

/// A set taking an exact share of new requests beside the current one.
#[derive(Debug)]
struct Canary {
    set: Arc<UpstreamSet>,
    /// Its share, in millionths.
    per_million: u64,
    /// Requests routed while this canary ran; request n goes to the canary when
    /// `n * share` crosses a whole number, so after N requests it had floor(N * share).
    routed: AtomicU64,
}

impl Canary {
    fn takes_next(&self) -> bool {
        let n = self.routed.fetch_add(1, Ordering::Relaxed);
        (n + 1) * self.per_million / MILLION > n * self.per_million / MILLION
    }
}

const MILLION: u64 = 1_000_000;

impl Default for Upstreams {
    fn default() -> Self {
        Self::new()
    }
}

impl Upstreams {
    /// Starts with the empty set (503 for every request).
    pub fn new() -> Self {
        Upstreams {
            shared: Arc::new(Shared {
                current: ArcSwap::from_pointee(UpstreamSet::empty()),
                canary: ArcSwapOption::empty(),
                standby: ArcSwapOption::empty(),
                hold: Hold::default(),
                leases: Arc::default(),
            }),
        }
    }

    /// Routes a new request: to the canary when it is its turn (and it has an
    /// available upstream), else to the current set.
    pub fn route(&self) -> Option<InFlight> {
        if let Some(canary) = self.shared.canary.load().as_ref() {
            if canary.takes_next() {
                if let Some(lease) = InFlight::route(canary.set.clone()) {
                    return Some(lease);
                }
            }
        }
        InFlight::route(self.current()).or_else(|| self.on_standby())
    }

    /// A lease on the standby set, if there is one with an available upstream.
    fn on_standby(&self) -> Option<InFlight> {
        self.shared
            .standby
            .load()
            .as_ref()
            .and_then(|set| InFlight::route(set.clone()))
    }

    /// Moves a request that could not connect anywhere in its set (nothing was sent
    /// yet) to the current set, if it was routed to another one before a swap, or else
    /// to the standby set. Returns false when there is nowhere else to go.
    /// `written`: the request already went out once; it moves only if its set was not
    /// cut on purpose (a drain that timed out), since then its process died under it.
    pub fn fall_back(&self, lease: &mut InFlight, written: bool) -> bool {
        if written && lease.set.cut.load(Ordering::Relaxed) {
            return false;
        }
        let current = self.shared.current.load();
        if !Arc::ptr_eq(&current, &lease.set) {
            if let Some(moved) = InFlight::route(current.clone()) {
                *lease = moved;
                return true;
            }
        }
        let on_standby = self
            .shared
            .standby
            .load()
            .as_ref()
            .is_some_and(|s| Arc::ptr_eq(s, &lease.set));
        if on_standby {
            return false;
        }
        match self.on_standby() {
            Some(standby) => {
                *lease = standby;
                true
            }
            None => false,
        }
    }

    /// Keeps `set` (or none) to go back to; returns the drain of the standby it replaced.
    pub fn set_standby(&self, set: Option<Arc<UpstreamSet>>) -> Option<Drain> {
        if let Some(set) = &set {
            self.adopt(set);
        }
        let old = self.shared.standby.swap(set)?;
        Some(Drain::new(old))
    }

    /// Makes the standby set the current one again and returns the drain of the set it
    /// replaced; `None` when there is no standby.
    pub fn restore_standby(&self) -> Option<Drain> {
        let set = self.shared.standby.load_full()?;
        let drain = self.swap(set);
        self.shared.standby.store(None);
        Some(drain)
    }

    /// Sends `per_million` millionths of new requests to `set`, beside the current set.
    pub fn start_canary(&self, set: Arc<UpstreamSet>, per_million: u32) {
        self.adopt(&set);
        self.shared.canary.store(Some(Arc::new(Canary {
            set,
            per_million: u64::from(per_million).min(MILLION),
            routed: AtomicU64::new(0),
        })));
    }

    /// The canary set, if one takes requests now.
    pub fn canary(&self) -> Option<Arc<UpstreamSet>> {
        self.shared.canary.load().as_ref().map(|c| c.set.clone())
    }

    /// Stops sending requests to the canary; returns the drain of its set.
    pub fn end_canary(&self) -> Option<Drain> {
        let canary = self.shared.canary.swap(None)?;
        Some(Drain::new(canary.set.clone()))
    }

    /// Makes the canary the current set (all new requests go to it) and returns the
    /// drain of the set it replaced; `None` when no canary runs.
    pub fn promote_canary(&self) -> Option<Drain> {
        let set = self.canary()?;
        let drain = self.swap(set);
        self.shared.canary.store(None);
        Some(drain)
    }

    /// The set new requests are routed to now.
    pub fn current(&self) -> Arc<UpstreamSet> {
        self.shared.current.load_full()
    }

    /// Closes the calling proxy worker's idle connections to the installed sets'
    /// processes that no request may take any more (see `Pool::sweep`). Each worker
    /// calls it every second; a replaced set's pools close with the set.
    pub(crate) fn sweep_idle(&self, keepalive: Duration) {
        let standby = self.shared.standby.load_full();
        for set in [Some(self.current()), self.canary(), standby]
            .into_iter()
            .flatten()
        {
            for upstream in set.upstreams() {
                upstream.pool().sweep(keepalive);
            }
        }
    }

    /// Installs `next` for every request routed from now on (the held ones first, if it
    /// can take them), and returns the drain of the set it replaced. Requests that
    /// loaded the old set before the swap are counted by it: arc-swap turns every
    /// outstanding load into a real reference during `swap`.
    pub fn swap(&self, next: Arc<UpstreamSet>) -> Drain {
        self.adopt(&next);
        let old = self.shared.current.swap(next);
        self.shared.release();
        Drain::new(old)
    }

    /// Makes `set` release held requests when one of its upstreams becomes available,
    /// and count its leases here. A set installed elsewhere before keeps its first owner.
    fn adopt(&self, set: &UpstreamSet) {
        let _ = set.owner.set(Arc::downgrade(&self.shared));
        let _ = set.leases.set(self.shared.leases.clone());
    }

    /// Holds every new request until [`resume`](Self::resume), or until `timeout` has
    /// passed, whichever comes first. Requests in flight go on. Returns the pause's id.
    pub fn pause(&self, timeout: Duration) -> u64 {
        self.shared.hold.pause(timeout)
    }

    /// Ends the pause (with `id`, only if it is still that pause) and releases the held
    /// requests if a set can take them. Returns whether a pause was on.
    pub fn resume(&self, id: Option<u64>) -> bool {
        let resumed = self.shared.hold.resume(id);
        self.shared.release();
        resumed
    }

    /// When the pause on now ends by itself, if one is on.
    pub fn paused_until(&self) -> Option<tokio::time::Instant> {
        self.shared.hold.paused_until()
    }

    /// Requests holding a lease on any set installed here: in flight to an app.
    pub fn leases(&self) -> usize {
        self.shared.leases.count()
    }

    /// Resolves once no request is in flight to any set installed here.
    pub async fn quiet(&self) {
        self.shared.leases.quiet().await
    }

    /// Counters of the held requests.
    pub fn held(&self) -> HoldSnapshot {
        self.shared.hold.snapshot()
    }

    /// A lease on the serving set for a new request: at once if it can take it, else
    /// after waiting in the hold queue (see `hold`) for up to `hold_timeout`, longer
    /// while paused. With `hold_timeout` zero and no pause, today's immediate 503.
    pub(crate) async fn admit(
        &self,
        hold_timeout: Duration,
        max_held: usize,
    ) -> Result<InFlight, ProxyError> {
        let shared = &self.shared;
        if !shared.hold.is_paused() {
            if let Some(lease) = self.route() {
                return Ok(lease);
            }
            if hold_timeout.is_zero() {
                return Err(ProxyError::NoUpstream);
            }
        }
        let mut place = Place {
            hold: &shared.hold,
            ticket: None,
        };
        let mut deadline = tokio::time::Instant::now() + hold_timeout;
        let mut waited = false;
        // Ready but not routable means the set changed between the two looks; a few
        // such races in a row are as good as no upstream.
        let mut races = 0;
        loop {
            let turn = shared.hold.look(
                &mut place.ticket,
                &mut deadline,
                hold_timeout,
                max_held,
                || shared.ready(),
            );
            match turn {
                Turn::Ready => {
                    if let Some(lease) = self.route() {
                        if waited {
                            shared.hold.count_released();
                        }
                        return Ok(lease);
                    }
                    races += 1;
                    if races > 8 {
                        return Err(ProxyError::NoUpstream);
                    }
                }
                Turn::Wait(released, wake_at) => {
                    waited = true;
                    tokio::select! {
                        _ = released => {}
                        () = tokio::time::sleep_until(wake_at) => {
                            // The pause's end or a passive-health period's: the event
                            // that nobody else announces.
                            shared.release();
                        }
                    }
                }
                Turn::Full => return Err(ProxyError::HoldFull),
                Turn::TimedOut => {
                    return Err(ProxyError::HoldTimedOut {
                        waited: hold_timeout,
                    })
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

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
        // A mark that ran out is cleared; the next failure marks it down again.
        upstream.mark_down_for(Duration::from_secs(3600));
        assert!(
            !upstream.is_available(),
            "down again after the next failure"
        );
        upstream.set_available(true);
        assert!(upstream.is_available(), "ready again: the mark is gone");
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
    fn move_on_never_picks_the_failed_upstream_and_goes_round_the_set() {
        let set = Arc::new(UpstreamSet::new(1, &addrs(3), Balance::LeastConn));
        let mut lease = InFlight::route(set.clone()).expect("upstream");
        let mut seen = vec![lease.index];
        for _ in 0..12 {
            let before = lease.index;
            assert!(lease.move_on());
            assert_ne!(lease.index, before, "never the same twice in a row");
            seen.push(lease.index);
        }
        for i in 0..3 {
            assert!(seen.contains(&i), "{seen:?}");
        }
        assert_eq!(set.in_flight(), 1);
        let alone = Arc::new(UpstreamSet::new(1, &addrs(2), Balance::LeastConn));
        alone.upstreams[1].set_available(false);
        let mut lease = InFlight::route(alone.clone()).expect("upstream");
        assert!(!lease.move_on(), "no other upstream available");
        assert_eq!(lease.index, 0);
        // Past the 64th upstream too.
        let big = Arc::new(UpstreamSet::new(1, &addrs(66), Balance::RoundRobin));
        let mut lease = (0..200)
            .filter_map(|_| InFlight::route(big.clone()))
            .find(|l| l.index == 65)
            .expect("round robin reaches index 65");
        for _ in 0..70 {
            let before = lease.index;
            assert!(lease.move_on());
            assert_ne!(lease.index, before);
        }
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
    fn a_canary_takes_its_exact_share_and_both_sets_drain_exactly() {
        let upstreams = Upstreams::new();
        upstreams.swap(Arc::new(UpstreamSet::new(1, &addrs(2), Balance::LeastConn)));
        upstreams.start_canary(
            Arc::new(UpstreamSet::new(2, &addrs(1), Balance::LeastConn)),
            100_000,
        );
        let leases: Vec<InFlight> = (0..1000)
            .map(|_| upstreams.route().expect("upstream"))
            .collect();
        let canary = leases.iter().filter(|l| l.generation() == 2).count();
        assert_eq!(canary, 100, "10% of 1000, exactly");
        // Every tenth request, not a burst.
        assert_eq!(leases[9].generation(), 2);
        assert_eq!(leases[8].generation(), 1);
        let mut canary_drain = upstreams.end_canary().expect("a canary ran");
        assert_eq!(canary_drain.in_flight(), 100);
        assert!(upstreams.canary().is_none());
        assert!((0..50).all(|_| upstreams.route().expect("upstream").generation() == 1));
        leases.iter().for_each(|l| l.answered(200));
        drop(leases);
        assert_eq!(canary_drain.in_flight(), 0);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(canary_drain.wait_timeout(Duration::from_secs(5)))
            .expect("the canary set is gone with its last request");
    }

    #[test]
    fn a_promoted_canary_serves_everything_and_the_old_set_drains() {
        let upstreams = Upstreams::new();
        upstreams.swap(Arc::new(UpstreamSet::new(1, &addrs(1), Balance::LeastConn)));
        let old = upstreams.route().expect("upstream");
        upstreams.start_canary(
            Arc::new(UpstreamSet::new(2, &addrs(1), Balance::LeastConn)),
            500_000,
        );
        let drain = upstreams.promote_canary().expect("a canary ran");
        assert_eq!(drain.generation(), 1);
        assert_eq!(drain.in_flight(), 1);
        assert!((0..20).all(|_| upstreams.route().expect("upstream").generation() == 2));
        drop(old);
        assert_eq!(drain.in_flight(), 0);
        assert!(upstreams.promote_canary().is_none());
    }

    #[test]
    fn the_standby_set_takes_requests_only_when_the_current_one_cannot() {
        let upstreams = Upstreams::new();
        let current = Arc::new(UpstreamSet::new(2, &addrs(1), Balance::LeastConn));
        upstreams.swap(current.clone());
        upstreams.set_standby(Some(Arc::new(UpstreamSet::new(
            1,
            &addrs(1),
            Balance::LeastConn,
        ))));
        assert!((0..10).all(|_| upstreams.route().expect("upstream").generation() == 2));
        let mut lease = upstreams.route().expect("upstream");
        assert!(
            upstreams.fall_back(&mut lease, false),
            "a failed connect moves over"
        );
        assert_eq!(lease.generation(), 1);
        assert!(
            upstreams.fall_back(&mut lease, false),
            "and back to the current set"
        );
        assert_eq!(lease.generation(), 2);
        current.upstreams()[0].set_available(false);
        assert!(
            upstreams.fall_back(&mut lease, false),
            "the current set has none left"
        );
        assert_eq!(lease.generation(), 1);
        assert!(
            !upstreams.fall_back(&mut lease, false),
            "nowhere else to go"
        );
        assert_eq!(upstreams.route().expect("standby").generation(), 1);
        let drain = upstreams.restore_standby().expect("a standby");
        assert_eq!(drain.generation(), 2);
        assert_eq!(upstreams.current().generation(), 1);
        assert!(upstreams.restore_standby().is_none());
        drop(lease);
        let gone = upstreams.set_standby(None);
        assert!(gone.is_none());
        // A request sent once in a set cut on purpose stays there.
        let cut = Arc::new(UpstreamSet::new(3, &addrs(1), Balance::LeastConn));
        cut.cut.store(true, Ordering::Relaxed);
        let mut lease = InFlight::route(cut).expect("upstream");
        assert!(!upstreams.fall_back(&mut lease, true));
        assert!(
            upstreams.fall_back(&mut lease, false),
            "never sent: it moves"
        );
    }

    #[test]
    fn outcomes_count_answers_5xx_and_upstream_failures() {
        let set = Arc::new(UpstreamSet::new(1, &addrs(1), Balance::LeastConn));
        let outcomes = set.outcomes().clone();
        for status in [200, 302, 404, 500, 503] {
            InFlight::route(set.clone())
                .expect("upstream")
                .answered(status);
        }
        InFlight::route(set.clone()).expect("upstream").failed();
        let reset = InFlight::route(set.clone()).expect("upstream");
        reset.answered(200);
        reset.cut_mid_answer();
        let counts = outcomes.counts();
        assert_eq!(
            counts,
            OutcomeCounts {
                requests: 7,
                server_errors: 2,
                upstream_errors: 2
            }
        );
        assert_eq!(counts.failed(), 4);
        assert!((counts.failure_rate() - 4.0 / 7.0).abs() < 1e-9);
        drop(set);
        assert_eq!(
            outcomes.counts().requests,
            7,
            "readable after the set is gone"
        );
    }

    #[test]
    fn empty_set_routes_nothing() {
        assert!(InFlight::route(Arc::new(UpstreamSet::empty())).is_none());
    }
}
