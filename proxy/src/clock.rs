//! The time as a client connection's task sees it: the clock is read once per poll of
//! the task, and that reading stands for the rest of the poll.
//!
//! A request reads the time about ten times (when bytes moved, for its timeouts; when
//! it began and was answered, for the stats and the access log; the age of a pooled
//! connection), each a read of the system clock with its conversions. Within one poll
//! those readings would differ by microseconds, so the first stands for the poll, as
//! nginx keeps one time per turn of its event loop. Outside a [`Clocked`] poll, `now`
//! reads the clock: a task that is not clocked (a timer, a tunnel, a buffer's pump)
//! never sees a time from another task's poll.
//!
//! The times that are shared between tasks (when bytes last moved, when a connection
//! went idle) are kept as [`ms`], milliseconds since the first reading, in atomics.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug)]
enum Reading {
    /// No clocked poll is running on this thread.
    Outside,
    /// In a clocked poll that has not read the clock yet.
    Unread,
    /// In a clocked poll that read this, `ms` after the epoch.
    Read(Instant, u64),
}

thread_local! {
    static READING: Cell<Reading> = const { Cell::new(Reading::Outside) };
}

/// The time: in a clocked poll, the one it read first.
pub(crate) fn now() -> Instant {
    read().0
}

/// [`now`] in milliseconds since the epoch, the first reading of the process.
pub(crate) fn ms() -> u64 {
    read().1
}

/// The time `ms` milliseconds after the epoch.
pub(crate) fn at_ms(ms: u64) -> Instant {
    epoch() + Duration::from_millis(ms)
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn read() -> (Instant, u64) {
    let fresh = || {
        let at = Instant::now();
        (at, at.saturating_duration_since(epoch()).as_millis() as u64)
    };
    READING.with(|reading| match reading.get() {
        Reading::Read(at, ms) => (at, ms),
        Reading::Outside => fresh(),
        Reading::Unread => {
            let (at, ms) = fresh();
            reading.set(Reading::Read(at, ms));
            (at, ms)
        }
    })
}

/// [`now`] for tokio's timers.
pub(crate) fn tokio_now() -> tokio::time::Instant {
    tokio::time::Instant::from_std(now())
}

pin_project_lite::pin_project! {
    /// A future each of whose polls sees one time (see the module docs).
    pub(crate) struct Clocked<F> {
        #[pin]
        inner: F,
    }
}

impl<F> Clocked<F> {
    pub(crate) fn new(inner: F) -> Self {
        Clocked { inner }
    }
}

impl<F: Future> Future for Clocked<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        /// Puts the reading back however the poll ends, a panic included.
        struct Restore(Reading);
        impl Drop for Restore {
            fn drop(&mut self) {
                READING.with(|reading| reading.set(self.0));
            }
        }
        // A clocked poll within another keeps the outer one's reading.
        let outer = READING.with(|reading| {
            let outer = reading.get();
            if matches!(outer, Reading::Outside) {
                reading.set(Reading::Unread);
            }
            outer
        });
        let _restore = Restore(outer);
        self.project().inner.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Reads the time twice a poll, a while apart, for `polls` polls.
    struct Reader {
        polls: usize,
        seen: Vec<(Instant, Instant)>,
    }

    impl Future for Reader {
        type Output = Vec<(Instant, Instant)>;

        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
            let first = now();
            std::thread::sleep(Duration::from_millis(2));
            let second = now();
            self.seen.push((first, second));
            if self.seen.len() == self.polls {
                return Poll::Ready(std::mem::take(&mut self.seen));
            }
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    fn reader(polls: usize) -> Reader {
        Reader {
            polls,
            seen: Vec::new(),
        }
    }

    #[tokio::test]
    async fn a_clocked_poll_sees_one_time_and_the_next_poll_a_later_one() {
        let seen = Clocked::new(reader(3)).await;
        for (first, second) in &seen {
            assert_eq!(first, second, "one time within a poll");
        }
        for pair in seen.windows(2) {
            assert!(
                pair[1].0 >= pair[0].1 + Duration::from_millis(2),
                "{seen:?}"
            );
        }
    }

    #[tokio::test]
    async fn outside_a_clocked_poll_the_clock_is_read_each_time() {
        let seen = reader(1).await;
        assert!(
            seen[0].1 >= seen[0].0 + Duration::from_millis(2),
            "{seen:?}"
        );
        // Also after a clocked poll ended on this thread, and after one panicked.
        let _ = Clocked::new(reader(1)).await;
        let seen = reader(1).await;
        assert!(
            seen[0].1 >= seen[0].0 + Duration::from_millis(2),
            "{seen:?}"
        );
        let panicked = std::panic::catch_unwind(|| {
            let waker = std::task::Waker::noop();
            let mut cx = Context::from_waker(waker);
            let mut clocked = std::pin::pin!(Clocked::new(async {
                now();
                panic!("in a clocked poll")
            }));
            let _ = clocked.as_mut().poll(&mut cx);
        });
        assert!(panicked.is_err());
        let seen = reader(1).await;
        assert!(
            seen[0].1 >= seen[0].0 + Duration::from_millis(2),
            "{seen:?}"
        );
    }

    #[tokio::test]
    async fn a_clocked_poll_inside_another_keeps_its_time() {
        let seen = Clocked::new(async {
            let before = now();
            std::thread::sleep(Duration::from_millis(2));
            let inner = Clocked::new(reader(1)).await;
            (before, inner[0].0, now())
        })
        .await;
        assert_eq!(seen.0, seen.1);
        assert_eq!(seen.0, seen.2);
    }
}
