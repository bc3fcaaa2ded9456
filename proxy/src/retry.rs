//! Sending a request again after its upstream failed before answering.
//!
//! An app process may die under a request at any moment (a crash, an OOM kill, a
//! SIGKILL). A request whose upstream failed before any byte of the answer came back is
//! sent again to another upstream when that is safe: its method is idempotent (RFC 9110)
//! or it carries an `Idempotency-Key`, and its body, if any, was kept whole ([`Kept`],
//! bounded by `retry_body_limit`). What was never written is always safe (the forwarding
//! code resends it without asking here).
//!
//! Retries add load exactly when a set is failing, so a [`RetryBudget`] caps them at a
//! share of the request rate, as Envoy's and Finagle's retry budgets do: a set where
//! every request fails gets at most that share more, and the requests beyond it get
//! their error at once.
//!
//! This module decides and counts; `forward` sends.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::HeaderName;

use crate::body::{RequestBody, Upload};
use crate::buffer::SpooledBody;
use crate::exchange::{OutHead, Outgoing};

/// The header of the IETF draft many APIs use: a request carrying it may be sent twice.
pub(crate) static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// Why a request was sent again (the `reason` label of the retry metrics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryReason {
    /// Connecting failed; nothing was sent.
    Connect,
    /// The connection closed before the request was written (a kept-alive connection
    /// the app had just closed); nothing was sent.
    Unsent,
    /// The request was written and the connection failed before the answer's head.
    NoAnswer,
    /// No answer within `response_timeout` (only with `retry_timeouts`).
    Timeout,
}

impl RetryReason {
    pub const ALL: [RetryReason; 4] = [
        RetryReason::Connect,
        RetryReason::Unsent,
        RetryReason::NoAnswer,
        RetryReason::Timeout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RetryReason::Connect => "connect",
            RetryReason::Unsent => "unsent",
            RetryReason::NoAnswer => "no_answer",
            RetryReason::Timeout => "timeout",
        }
    }
}

/// Why a request whose upstream failed got 502 instead of being sent again (the
/// `reason` label of the 502 metric, and the end of the 502's log line).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotResent {
    /// Connecting failed on every upstream it could go to.
    Connect,
    /// Written once, and its method may not be repeated (POST, PATCH...) without an
    /// `Idempotency-Key`.
    NotIdempotent,
    /// Its body is larger than `retry_body_limit`, or has trailers: it was not kept.
    BodyNotKept,
    /// Its body was still arriving from the client when the upstream failed: the part
    /// not yet read went with the failed attempt.
    BodyUnread,
    /// A protocol upgrade (WebSocket): never repeated.
    Upgrade,
    /// The retry budget is spent.
    Budget,
    /// It was sent `retries` times more already.
    RetriesSpent,
    /// Its set's drain timed out: its requests are being cut on purpose.
    DrainCut,
    /// Every attempt failed before any was written (a bound on the attempts).
    Attempts,
    /// The head of an answer read whole came, then its body broke off (see
    /// `forward`'s `read_answer`): the answer had begun.
    AnswerBroken,
}

impl NotResent {
    pub const ALL: [NotResent; 10] = [
        NotResent::Connect,
        NotResent::NotIdempotent,
        NotResent::BodyNotKept,
        NotResent::BodyUnread,
        NotResent::Upgrade,
        NotResent::Budget,
        NotResent::RetriesSpent,
        NotResent::DrainCut,
        NotResent::Attempts,
        NotResent::AnswerBroken,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            NotResent::Connect => "connect",
            NotResent::NotIdempotent => "not_idempotent",
            NotResent::BodyNotKept => "body_not_kept",
            NotResent::BodyUnread => "body_unread",
            NotResent::Upgrade => "upgrade",
            NotResent::Budget => "budget",
            NotResent::RetriesSpent => "retries_spent",
            NotResent::DrainCut => "drain_cut",
            NotResent::Attempts => "attempts",
            NotResent::AnswerBroken => "answer_broken",
        }
    }
}

impl fmt::Display for NotResent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NotResent::Connect => "no upstream could be connected to",
            NotResent::NotIdempotent => {
                "its method is not idempotent and it has no Idempotency-Key, and it was written"
            }
            NotResent::BodyNotKept => {
                "its body was not kept (larger than retry_body_limit, or with trailers)"
            }
            NotResent::BodyUnread => "its body was still arriving when the upstream failed",
            NotResent::Upgrade => "a protocol upgrade is never repeated",
            NotResent::Budget => "the retry budget is spent",
            NotResent::RetriesSpent => "it was already resent `retries` times",
            NotResent::DrainCut => "its set's drain timed out (cut on purpose)",
            NotResent::Attempts => "every attempt failed",
            NotResent::AnswerBroken => {
                "its answer had begun: the head came, then the body broke off"
            }
        })
    }
}

/// What became of one request's attempts so far, across everything that sends it again.
#[derive(Debug, Default)]
pub(crate) struct Tries {
    /// It went out to an app once (see `Upstreams::fall_back`).
    pub(crate) written: bool,
    /// Times it was sent again after it had been written once (bounded by `retries`).
    pub(crate) resent: u32,
    /// Times it was sent again, for whatever reason (its access log line says so).
    pub(crate) again: u32,
    /// Times it waited for a set (see `hold`) after its attempts found no upstream.
    pub(crate) holds: usize,
}

/// What it takes to send a request again: its head, and its body as it was kept.
pub(crate) struct Replay {
    /// The head as first written: shared, not copied (most requests never need it).
    head: OutHead,
    /// The body as it streamed by; `None`: no body, or a buffered one.
    body: Option<Arc<Kept>>,
    /// The body read completely before the request went out (see `buffer`): it can
    /// always be read again.
    spooled: Option<Arc<SpooledBody>>,
}

impl Replay {
    /// What it takes to send this request again, or why it cannot be once written.
    /// `keyed`: whether it has an `Idempotency-Key`. `spooled` is its body if it was
    /// buffered; else `body_end` says the request has no body, `body_at_least` how many
    /// bytes it has at least; a body is kept up to `limit` bytes.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn of(
        method: &http::Method,
        keyed: bool,
        head: &OutHead,
        spooled: Option<Arc<SpooledBody>>,
        body_end: bool,
        body_at_least: u64,
        upgrade: bool,
        limit: u64,
    ) -> Result<Replay, NotResent> {
        if upgrade {
            return Err(NotResent::Upgrade);
        }
        if !method.is_idempotent() && !keyed {
            return Err(NotResent::NotIdempotent);
        }
        let body = if body_end || spooled.is_some() {
            None
        } else if body_at_least > limit {
            return Err(NotResent::BodyNotKept);
        } else {
            Some(Arc::new(Kept::new(limit)))
        };
        Ok(Replay {
            head: head.clone(),
            body,
            spooled,
        })
    }

    /// Where the request body is kept while it is sent the first time.
    pub(crate) fn kept(&self) -> Option<Arc<Kept>> {
        self.body.clone()
    }

    /// The request again, or why it cannot be rebuilt. A body that was still arriving
    /// goes on from where the failed attempt left it (`idle`: `body_idle_timeout`).
    pub(crate) async fn build(
        &self,
        upload: &Arc<Upload>,
        idle: Duration,
    ) -> Result<Outgoing, NotResent> {
        let body = match (&self.spooled, &self.body) {
            (Some(spooled), _) => RequestBody::spooled(spooled.reader(), upload.clone()),
            (None, None) => RequestBody::empty(),
            (None, Some(kept)) => {
                let (chunks, rest) = kept.take().await?;
                RequestBody::again(chunks, rest, kept.clone(), idle, upload.clone())
            }
        };
        Ok(Outgoing {
            head: self.head.clone(),
            body,
        })
    }
}

/// A request body as it streams to its upstream, kept to be sent again: the chunks
/// are the same `Bytes` (reference-counted, not copied), up to a limit. When an attempt
/// fails while the body is still arriving, the part not read yet comes back here
/// ([`Rest`]), so the next attempt sends what was kept and then the rest.
#[derive(Debug)]
pub(crate) struct Kept {
    limit: u64,
    state: Mutex<KeptState>,
    /// Told when a failed attempt's body hands its rest back.
    handed: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct KeptState {
    chunks: Vec<Bytes>,
    len: u64,
    /// The whole body went by.
    ended: bool,
    /// Past the limit, or trailers: nothing is kept any more.
    given_up: bool,
    /// What the client had not sent yet when an attempt failed.
    rest: Option<Rest>,
}

/// The part of a request body not read yet, handed back by a failed attempt.
pub(crate) struct Rest {
    pub(crate) body: crate::body::ClientBody,
    /// Bytes still allowed by `max_body_size`.
    pub(crate) remaining: u64,
}

impl fmt::Debug for Rest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rest")
            .field("remaining", &self.remaining)
            .finish()
    }
}

/// How long a resend waits for the failed attempt to hand its body's rest back (hyper
/// drops a failed connection's request a moment after reporting the failure).
const HAND_BACK_WAIT: Duration = Duration::from_secs(1);

impl Kept {
    fn new(limit: u64) -> Self {
        Kept {
            limit,
            state: Mutex::default(),
            handed: tokio::sync::Notify::new(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, KeptState> {
        // A poisoned lock means a panic mid-push; the worst is a body not resent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A chunk went by; `ended` when it was the last.
    pub(crate) fn keep(&self, chunk: &Bytes, ended: bool) {
        let mut state = self.state();
        if state.given_up {
            return;
        }
        state.len += chunk.len() as u64;
        if state.len > self.limit {
            *state = KeptState {
                given_up: true,
                ..KeptState::default()
            };
            return;
        }
        state.chunks.push(chunk.clone());
        state.ended |= ended;
    }

    /// The body ended.
    pub(crate) fn end(&self) {
        self.state().ended = true;
        self.handed.notify_waiters();
    }

    /// The body cannot be kept (trailers): it will not be sent again.
    pub(crate) fn give_up(&self) {
        *self.state() = KeptState {
            given_up: true,
            ..KeptState::default()
        };
    }

    /// A failed attempt's body was dropped before its end: `rest` is what follows.
    pub(crate) fn hand_back(&self, rest: Rest) {
        {
            let mut state = self.state();
            // A body not kept is not sent again: its rest can go at once.
            if !state.given_up {
                state.rest = Some(rest);
            }
        }
        self.handed.notify_waiters();
    }

    /// The body as kept, and the rest of it if it had not all arrived, to send again;
    /// waits a moment for the failed attempt to end or hand its rest back.
    async fn take(&self) -> Result<(VecDeque<Bytes>, Option<Rest>), NotResent> {
        let deadline = tokio::time::Instant::now() + HAND_BACK_WAIT;
        loop {
            let handed = self.handed.notified();
            tokio::pin!(handed);
            handed.as_mut().enable();
            {
                let mut state = self.state();
                if state.given_up {
                    return Err(NotResent::BodyNotKept);
                }
                let rest = state.rest.take();
                if state.ended || rest.is_some() {
                    return Ok((state.chunks.iter().cloned().collect(), rest));
                }
            }
            if tokio::time::timeout_at(deadline, handed).await.is_err() {
                return Err(NotResent::BodyUnread);
            }
        }
    }
}

/// Seconds of traffic the budget looks back on (Finagle's default TTL).
const WINDOW_SECS: u64 = 10;

/// Caps retries at a share of the requests of the last [`WINDOW_SECS`] seconds, with a
/// floor of retries per second always allowed (so that a quiet service still gets its
/// rare retry). Counting a request is a few relaxed atomic operations; taking a retry
/// (rare) takes a lock so that concurrent retries cannot overdraw it.
#[derive(Debug)]
pub(crate) struct RetryBudget {
    /// Retries allowed per million requests.
    per_million: u64,
    /// Retries per second allowed whatever the request rate.
    floor: u64,
    slots: [Slot; WINDOW_SECS as usize],
    taking: Mutex<()>,
}

/// One second of the window.
#[derive(Debug, Default)]
struct Slot {
    /// The second (of `clock::ms`, plus one) these counts are of.
    second: AtomicU64,
    requests: AtomicU64,
    /// Retries paid from the share.
    shared: AtomicU64,
    /// Retries paid from the floor.
    floor: AtomicU64,
}

impl RetryBudget {
    /// A budget of `share` (0.0 to 1.0) of the requests, and `floor` retries per second.
    pub(crate) fn new(share: f64, floor: u32) -> Self {
        RetryBudget {
            per_million: (share.clamp(0.0, 1.0) * 1e6).round() as u64,
            floor: u64::from(floor),
            slots: Default::default(),
            taking: Mutex::new(()),
        }
    }

    fn now(&self) -> u64 {
        // Plus one: a slot never used says second 0.
        crate::clock::ms() / 1000 + 1
    }

    /// The slot of `second`, emptied if it held an older second. A request counted by
    /// another thread at the very moment a slot is emptied may be lost: the budget is
    /// a bound on load, not an account.
    fn slot(&self, second: u64) -> &Slot {
        let slot = &self.slots[(second % WINDOW_SECS) as usize];
        let seen = slot.second.load(Ordering::Acquire);
        if seen != second
            && slot
                .second
                .compare_exchange(seen, second, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            slot.requests.store(0, Ordering::Relaxed);
            slot.shared.store(0, Ordering::Relaxed);
            slot.floor.store(0, Ordering::Relaxed);
        }
        slot
    }

    /// Counts a new request.
    pub(crate) fn request(&self) {
        self.request_at(self.now());
    }

    fn request_at(&self, second: u64) {
        self.slot(second).requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes one retry from the budget; false when it is spent.
    pub(crate) fn withdraw(&self) -> bool {
        self.withdraw_at(self.now())
    }

    fn withdraw_at(&self, second: u64) -> bool {
        let _one_at_a_time = self.taking.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.slot(second);
        if current.floor.load(Ordering::Relaxed) < self.floor {
            current.floor.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        let (mut requests, mut retries) = (0, 0);
        for slot in &self.slots {
            let at = slot.second.load(Ordering::Acquire);
            if at + WINDOW_SECS > second && at <= second {
                requests += slot.requests.load(Ordering::Relaxed);
                retries += slot.shared.load(Ordering::Relaxed);
            }
        }
        if (retries + 1) * 1_000_000 <= requests * self.per_million {
            current.shared.fetch_add(1, Ordering::Relaxed);
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;
    use std::time::Instant;

    #[test]
    fn the_share_of_the_window_caps_retries() {
        let budget = RetryBudget::new(0.2, 0);
        for _ in 0..100 {
            budget.request_at(1);
        }
        let taken = (0..100).filter(|_| budget.withdraw_at(1)).count();
        assert_eq!(taken, 20, "20% of 100 requests");
        // Later in the window, more requests earn more retries.
        for _ in 0..10 {
            budget.request_at(5);
        }
        assert_eq!((0..100).filter(|_| budget.withdraw_at(5)).count(), 2);
        // Once the first second has left the window, its requests and retries are gone.
        assert_eq!(
            (0..100).filter(|_| budget.withdraw_at(11)).count(),
            0,
            "10 requests of second 5, 22 retries of the window: nothing left"
        );
        assert_eq!((0..100).filter(|_| budget.withdraw_at(16)).count(), 0);
        for _ in 0..50 {
            budget.request_at(30);
        }
        assert_eq!((0..100).filter(|_| budget.withdraw_at(30)).count(), 10);
    }

    #[test]
    fn every_second_of_the_window_counts() {
        let budget = RetryBudget::new(0.2, 0);
        for second in 1..=10 {
            for _ in 0..10 {
                budget.request_at(second);
            }
        }
        assert_eq!(
            (0..100).filter(|_| budget.withdraw_at(10)).count(),
            20,
            "20% of the 100 requests of seconds 1 to 10"
        );
    }

    #[test]
    fn requests_leave_the_window_after_ten_seconds() {
        let budget = RetryBudget::new(0.2, 0);
        for _ in 0..100 {
            budget.request_at(1);
        }
        assert!(
            !budget.withdraw_at(11),
            "second 1 is out of the window at 11"
        );
        let budget = RetryBudget::new(0.2, 0);
        for _ in 0..100 {
            budget.request_at(1);
        }
        assert!(!budget.withdraw_at(25), "and long after");
        assert!(budget.withdraw_at(10), "but in it at 10");
    }

    #[test]
    fn the_floor_of_each_second_comes_with_the_clock() {
        let budget = RetryBudget::new(0.0, 1);
        let second = budget.now();
        assert!(budget.withdraw());
        if budget.now() == second {
            assert!(!budget.withdraw(), "one a second");
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while budget.now() == second {
            assert!(Instant::now() < deadline, "the clock moves");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(budget.withdraw(), "the next second has its own");
    }

    #[test]
    fn the_floor_allows_retries_per_second_without_requests() {
        let budget = RetryBudget::new(0.2, 3);
        assert_eq!((0..10).filter(|_| budget.withdraw_at(1)).count(), 3);
        assert_eq!((0..10).filter(|_| budget.withdraw_at(1)).count(), 0);
        assert_eq!((0..10).filter(|_| budget.withdraw_at(2)).count(), 3);
        let none = RetryBudget::new(0.0, 0);
        for _ in 0..1000 {
            none.request_at(1);
        }
        assert!(!none.withdraw_at(1), "a zero budget allows nothing");
        let all = RetryBudget::new(1.0, 0);
        all.request_at(1);
        assert!(all.withdraw_at(1));
        assert!(!all.withdraw_at(1), "100%: one retry per request");
    }

    fn parts(method: &str, key: bool) -> http::request::Parts {
        let mut req = Request::builder().method(method).uri("/x");
        if key {
            req = req.header("Idempotency-Key", "k1");
        }
        req.body(()).expect("request").into_parts().0
    }

    /// A request's head, and what it takes to send it again.
    fn replay_of(
        parts: &http::request::Parts,
        body_end: bool,
        body_at_least: u64,
        upgrade: bool,
    ) -> Result<Replay, NotResent> {
        let head = OutHead::new(parts, None, &RequestBody::empty(), upgrade);
        let keyed = parts.headers.contains_key(&IDEMPOTENCY_KEY);
        Replay::of(
            &parts.method,
            keyed,
            &head,
            None,
            body_end,
            body_at_least,
            upgrade,
            10,
        )
    }

    #[test]
    fn only_idempotent_or_keyed_requests_with_small_bodies_are_kept() {
        for method in ["GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"] {
            assert!(replay_of(&parts(method, false), true, 0, false).is_ok());
        }
        for method in ["POST", "PATCH", "CONNECT"] {
            assert_eq!(
                replay_of(&parts(method, false), true, 0, false).err(),
                Some(NotResent::NotIdempotent)
            );
            assert!(replay_of(&parts(method, true), true, 0, false).is_ok());
        }
        assert_eq!(
            replay_of(&parts("PUT", false), false, 11, false).err(),
            Some(NotResent::BodyNotKept)
        );
        assert_eq!(
            replay_of(&parts("GET", false), true, 0, true).err(),
            Some(NotResent::Upgrade)
        );
    }

    #[test]
    fn a_request_built_again_has_the_same_head() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        let (parts, ()) = Request::builder()
            .method("GET")
            .uri("/x?y=1")
            .header("host", "app")
            .header("cookie", "a=1")
            .header("x-many", "1")
            .header("cookie", "b=2")
            .header("x-many", "2")
            .body(())
            .expect("request")
            .into_parts();
        let replay = replay_of(&parts, true, 0, false).expect("kept");
        let again = rt
            .block_on(replay.build(&Upload::new(), Duration::from_secs(5)))
            .expect("built");
        assert_eq!(
            std::str::from_utf8(again.head.as_bytes()).expect("ASCII"),
            "GET /x?y=1 HTTP/1.1\r\nhost: app\r\ncookie: a=1\r\ncookie: b=2\r\n\
             x-many: 1\r\nx-many: 2\r\n\r\n",
            "the same bytes, repeated fields in their order"
        );
    }

    #[test]
    fn a_kept_body_replays_whole_or_says_why_not() {
        use http_body_util::BodyExt;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        let idle = Duration::from_secs(5);
        rt.block_on(async {
            let upload = Upload::new();
            let replay = replay_of(&parts("PUT", false), false, 0, false).expect("kept");
            let kept = replay.kept().expect("a body");
            kept.keep(&Bytes::from_static(b"hello"), false);
            assert_eq!(
                replay.build(&upload, idle).await.err(),
                Some(NotResent::BodyUnread),
                "not all of it, and no rest handed back"
            );
            kept.keep(&Bytes::from_static(b"!"), false);
            kept.end();
            let req = replay.build(&upload, idle).await.expect("whole");
            assert!(req.head.as_bytes().starts_with(b"PUT /x "));
            let body = req.body.collect().await.expect("body").to_bytes();
            assert_eq!(&body[..], b"hello!");
            assert!(replay.build(&upload, idle).await.is_ok(), "and again");
            kept.keep(&Bytes::from_static(b"12345"), true);
            assert_eq!(
                replay.build(&upload, idle).await.err(),
                Some(NotResent::BodyNotKept),
                "past the limit"
            );
            let replay = replay_of(&parts("PUT", false), false, 0, false).expect("kept");
            replay.kept().expect("a body").give_up();
            assert_eq!(
                replay.build(&upload, idle).await.err(),
                Some(NotResent::BodyNotKept)
            );
        });
    }

    #[test]
    fn a_resend_waits_a_moment_for_the_failed_attempt_to_let_go_of_the_body() {
        use http_body_util::BodyExt;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let replay = replay_of(&parts("PUT", false), false, 0, false).expect("kept");
            let kept = replay.kept().expect("a body");
            kept.keep(&Bytes::from_static(b"late"), false);
            let ends = kept.clone();
            let ending = tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                ends.end();
            });
            let req = replay
                .build(&Upload::new(), Duration::from_secs(5))
                .await
                .expect("the body ended while the resend waited");
            let body = req.body.collect().await.expect("body").to_bytes();
            assert_eq!(&body[..], b"late");
            ending.await.expect("task");
        });
    }
}
