//! Holding requests while no upstream of the serving set can take them.
//!
//! At start-up before the first set, while every process of the set is being restarted,
//! or while the operator has paused traffic, a new request waits here instead of getting
//! 503 at once. It waits without a lease (so it never delays a drain), in a FIFO bounded
//! by `max_held`, and is released in arrival order by whoever makes a set ready: an
//! upstream marked available, a swap, a resume. Nothing polls: each release is a
//! oneshot sent by that event, and the only timers are the request's own deadline and,
//! while upstreams are skipped after failed connects, the end of that period.
//!
//! A request dropped while waiting (its client went away) leaves the queue in its
//! `Drop`, so the bound counts only requests somebody still waits for.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;

/// Counters of the hold queue, for metrics and status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HoldSnapshot {
    /// Requests waiting now.
    pub held: usize,
    /// Requests that waited and were then routed to an upstream.
    pub released: u64,
    /// Requests answered 503 because their wait ran out.
    pub timed_out: u64,
    /// Requests answered 503 at once because `max_held` were already waiting.
    pub refused: u64,
}

/// An operator's pause: new requests are held until it ends.
#[derive(Debug, Clone, Copy)]
struct Pause {
    id: u64,
    /// The pause ends by itself then.
    until: Instant,
}

#[derive(Debug, Default)]
struct Queue {
    /// Waiting requests by ticket: arrival order, since tickets only grow.
    waiting: BTreeMap<u64, oneshot::Sender<()>>,
    next_ticket: u64,
    pause: Option<Pause>,
    next_pause: u64,
    /// The last pause that ended by itself, until its owner asks (see `resume`).
    expired: Option<u64>,
}

/// The queue and the pause, shared by every worker of the proxy.
#[derive(Debug, Default)]
pub(crate) struct Hold {
    queue: Mutex<Queue>,
    /// Mirrors `queue.pause.is_some()`, so the path of a request that needs no hold
    /// takes no lock.
    paused: AtomicBool,
    released: AtomicU64,
    timed_out: AtomicU64,
    refused: AtomicU64,
}

/// Leases on every set installed in one `Upstreams` (see `InFlight`), and a wake-up
/// when they reach zero: what a pause waits for. Each set holds the same counter, so a
/// request counts itself without reaching back to the `Upstreams`.
#[derive(Debug, Default)]
pub(crate) struct Leases {
    count: AtomicUsize,
    idle: Notify,
}

impl Leases {
    pub(crate) fn taken(&self) {
        self.count.fetch_add(1, Ordering::AcqRel);
    }

    /// The last one wakes whoever waits for quiet.
    pub(crate) fn dropped(&self) {
        if self.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle.notify_waiters();
        }
    }

    pub(crate) fn count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Resolves once no lease is held.
    pub(crate) async fn quiet(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            // Registered before the check, so a last drop in between still wakes us.
            notified.as_mut().enable();
            if self.count() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// What a waiting request learns from one look at the queue.
pub(crate) enum Turn {
    /// Go: the set is ready (the caller routes now).
    Ready,
    /// Wait for this release, or until this instant (then look again).
    Wait(oneshot::Receiver<()>, Instant),
    /// The queue is full.
    Full,
    /// The wait is over without a set.
    TimedOut,
}

impl Hold {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Acquire)
    }

    /// Ends a pause whose time is up; true if a pause is still on.
    fn pause_on(&self, q: &mut Queue, now: Instant) -> bool {
        match q.pause {
            Some(p) if p.until <= now => {
                q.pause = None;
                q.expired = Some(p.id);
                self.paused.store(false, Ordering::Release);
                false
            }
            Some(_) => true,
            None => false,
        }
    }

    /// One look at the queue for the request with `ticket`, whose own wait ends at
    /// `deadline`. `ready` says whether the serving set can take it, and when it might
    /// (the end of a passive-health period). Called under the same lock as
    /// [`release`](Self::release), so a release cannot slip between the look and the
    /// enqueue.
    pub(crate) fn look(
        &self,
        ticket: &mut Option<u64>,
        deadline: &mut Instant,
        hold_timeout: Duration,
        max_held: usize,
        ready: impl FnOnce() -> Result<(), Option<Duration>>,
    ) -> Turn {
        let now = Instant::now();
        let mut q = self.lock();
        let retry_in = if self.pause_on(&mut q, now) {
            None
        } else {
            match ready() {
                Ok(()) => {
                    if let Some(t) = ticket.take() {
                        q.waiting.remove(&t);
                    }
                    return Turn::Ready;
                }
                Err(retry_in) => retry_in,
            }
        };
        let wake_at = match q.pause {
            // While paused, the pause's end is what the request waits for; its own
            // wait starts over from there (a pause is bounded by the operator's timeout).
            Some(pause) => {
                *deadline = (*deadline).max(pause.until + hold_timeout);
                pause.until
            }
            None => {
                if *deadline <= now {
                    if let Some(t) = ticket.take() {
                        q.waiting.remove(&t);
                    }
                    self.timed_out.fetch_add(1, Ordering::Relaxed);
                    return Turn::TimedOut;
                }
                retry_in.map_or(*deadline, |d| (*deadline).min(now + d))
            }
        };
        let t = match *ticket {
            Some(t) => t,
            None => {
                if q.waiting.len() >= max_held {
                    self.refused.fetch_add(1, Ordering::Relaxed);
                    return Turn::Full;
                }
                let t = q.next_ticket;
                q.next_ticket += 1;
                *ticket = Some(t);
                t
            }
        };
        let (tx, rx) = oneshot::channel();
        q.waiting.insert(t, tx);
        Turn::Wait(rx, wake_at)
    }

    /// A request left the queue without being released (its client went away).
    pub(crate) fn leave(&self, ticket: u64) {
        self.lock().waiting.remove(&ticket);
    }

    /// A held request got its upstream.
    pub(crate) fn count_released(&self) {
        self.released.fetch_add(1, Ordering::Relaxed);
    }

    /// Releases every waiting request, oldest first, if the set is ready (`ready`) and
    /// no pause is on. Called by each event that can make it so.
    pub(crate) fn release(&self, ready: impl FnOnce() -> bool) {
        let mut q = self.lock();
        if q.waiting.is_empty() || self.pause_on(&mut q, Instant::now()) || !ready() {
            return;
        }
        while let Some((_, tx)) = q.waiting.pop_first() {
            // A receiver already gone was a client leaving: nothing to do.
            let _ = tx.send(());
        }
    }

    /// Starts (or extends) a pause that ends by itself after `timeout`; returns its id.
    pub(crate) fn pause(&self, timeout: Duration) -> u64 {
        let mut q = self.lock();
        q.next_pause += 1;
        let id = q.next_pause;
        q.pause = Some(Pause {
            id,
            until: Instant::now() + timeout,
        });
        self.paused.store(true, Ordering::Release);
        id
    }

    /// Ends the pause (`id`: only that one); true if one was on. With `id`, also true
    /// if that pause has just ended by itself (its time was up).
    pub(crate) fn resume(&self, id: Option<u64>) -> bool {
        let mut q = self.lock();
        let on = self.pause_on(&mut q, Instant::now());
        match q.pause {
            Some(p) if on && id.is_none_or(|id| id == p.id) => {
                q.pause = None;
                self.paused.store(false, Ordering::Release);
                true
            }
            _ if id.is_some() && q.expired == id => {
                q.expired = None;
                true
            }
            _ => false,
        }
    }

    /// When the pause on now ends by itself, if one is on.
    pub(crate) fn paused_until(&self) -> Option<Instant> {
        let mut q = self.lock();
        if self.pause_on(&mut q, Instant::now()) {
            q.pause.map(|p| p.until)
        } else {
            None
        }
    }

    pub(crate) fn snapshot(&self) -> HoldSnapshot {
        HoldSnapshot {
            held: self.lock().waiting.len(),
            released: self.released.load(Ordering::Relaxed),
            timed_out: self.timed_out.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
        }
    }
}

/// A request's place in the queue; leaving it (dropped with the request) frees it.
pub(crate) struct Place<'a> {
    pub(crate) hold: &'a Hold,
    pub(crate) ticket: Option<u64>,
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        if let Some(t) = self.ticket.take() {
            self.hold.leave(t);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn look(hold: &Hold, ticket: &mut Option<u64>, max_held: usize) -> Turn {
        let mut deadline = Instant::now() + Duration::from_secs(60);
        hold.look(
            ticket,
            &mut deadline,
            Duration::from_secs(60),
            max_held,
            || Err(None),
        )
    }

    #[test]
    fn the_queue_refuses_beyond_max_held_and_a_leaver_frees_its_place() {
        let hold = Hold::default();
        let (mut a, mut b) = (None, None);
        assert!(matches!(look(&hold, &mut a, 1), Turn::Wait(..)));
        assert!(matches!(look(&hold, &mut b, 1), Turn::Full));
        assert_eq!(hold.snapshot().refused, 1);
        hold.leave(a.expect("a ticket"));
        assert!(matches!(look(&hold, &mut b, 1), Turn::Wait(..)));
        assert_eq!(hold.snapshot().held, 1);
    }

    #[test]
    fn release_sends_to_every_waiter_only_when_ready() {
        let hold = Hold::default();
        let mut receivers = Vec::new();
        for _ in 0..3 {
            let mut ticket = None;
            match look(&hold, &mut ticket, 10) {
                Turn::Wait(rx, _) => receivers.push(rx),
                _ => panic!("expected to wait"),
            }
        }
        hold.release(|| false);
        assert!(receivers.iter_mut().all(|rx| rx.try_recv().is_err()));
        hold.release(|| true);
        assert!(receivers.iter_mut().all(|rx| rx.try_recv().is_ok()));
        assert_eq!(hold.snapshot().held, 0);
    }

    #[test]
    fn a_pause_that_ran_out_reports_to_its_own_resume_only() {
        let hold = Hold::default();
        let id = hold.pause(Duration::from_millis(1));
        std::thread::sleep(Duration::from_millis(5));
        assert!(hold.paused_until().is_none(), "ran out");
        assert!(!hold.resume(Some(id + 1)));
        assert!(hold.resume(Some(id)), "its own auto-resume learns it ended");
        assert!(!hold.resume(Some(id)));
        let id = hold.pause(Duration::from_secs(60));
        assert!(hold.is_paused());
        assert!(!hold.resume(Some(id - 1)), "an older pause's timer");
        assert!(hold.resume(None));
        assert!(!hold.is_paused());
    }
}
