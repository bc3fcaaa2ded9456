//! The per-stream watchdog of HTTP/2: a stream whose response moves nothing for
//! `body_idle_timeout` is reset.
//!
//! hyper serves each HTTP/2 stream as a task of its own, and once it holds a chunk of the
//! response that the client's flow-control window has no room for, it stops polling the
//! body until the client opens the window. A client that never does (SETTINGS
//! `INITIAL_WINDOW_SIZE=0`, then silence while it still answers PINGs) would hold the
//! stream, its upstream connection and its [`InFlight`](crate::InFlight) lease forever,
//! and every roll would wait its full `drain_timeout`: the body's own idle timer never
//! runs, since nobody polls the body. So hyper spawns its streams through
//! [`StreamExecutor`], which wraps each in a [`Watched`] future with a timer of its own.
//! The response body reports its progress through the stream's [`Progress`] (found via
//! a task-local while hyper polls the stream); once the response is being sent, a stream
//! that makes none for the idle timeout is dropped, which resets it (`RST_STREAM`) and
//! releases its lease. While the request still waits for its response, the proxy's own
//! timeouts (connect, response) bound it instead.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};
use tracing::debug;

tokio::task_local! {
    /// The progress of the HTTP/2 stream being polled, if any.
    static STREAM: Arc<Progress>;
}

/// One HTTP/2 stream's progress, shared by its response body and its watchdog.
#[derive(Debug)]
pub(crate) struct Progress {
    /// The response is being sent: from now on the stream must make progress.
    sending: AtomicBool,
    /// When the response last moved, in ms since `epoch`.
    moved_ms: AtomicU64,
    epoch: Instant,
}

impl Progress {
    fn new() -> Self {
        Progress {
            sending: AtomicBool::new(false),
            moved_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// The stream polled now, if this runs inside one.
    pub(crate) fn current() -> Option<Arc<Progress>> {
        STREAM.try_with(Arc::clone).ok()
    }

    /// The response is handed to hyper: the watchdog runs from now on.
    pub(crate) fn sending(&self) {
        self.moved();
        self.sending.store(true, Ordering::Release);
    }

    /// A chunk of the response was taken.
    pub(crate) fn moved(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.moved_ms.store(ms, Ordering::Release);
    }

    fn deadline(&self, idle: Duration) -> Option<Instant> {
        self.sending.load(Ordering::Acquire).then(|| {
            self.epoch + Duration::from_millis(self.moved_ms.load(Ordering::Acquire)) + idle
        })
    }
}

/// Spawns hyper's HTTP/2 stream tasks, each under a watchdog.
#[derive(Clone, Copy, Debug)]
pub(crate) struct StreamExecutor {
    /// `body_idle_timeout`.
    pub(crate) idle: Duration,
}

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(Watched {
            inner: Box::pin(fut),
            progress: Arc::new(Progress::new()),
            idle: self.idle,
            sleep: None,
            armed_for: None,
        });
    }
}

/// A stream task that ends (and so resets the stream) once its response stalls.
struct Watched<F> {
    inner: Pin<Box<F>>,
    progress: Arc<Progress>,
    idle: Duration,
    /// Created when the response first waits.
    sleep: Option<Pin<Box<Sleep>>>,
    armed_for: Option<Instant>,
}

impl<F: Future<Output = ()>> Future for Watched<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let inner = this.inner.as_mut();
        if STREAM
            .sync_scope(this.progress.clone(), || inner.poll(cx))
            .is_ready()
        {
            return Poll::Ready(());
        }
        let Some(deadline) = this.progress.deadline(this.idle) else {
            return Poll::Pending;
        };
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if this.armed_for != Some(deadline) {
            sleep.as_mut().reset(deadline);
            this.armed_for = Some(deadline);
        }
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => {
                debug!(idle = ?this.idle, "HTTP/2 stream made no progress; resetting it");
                // Dropping the stream task resets the stream and drops its body.
                Poll::Ready(())
            }
            Poll::Pending => Poll::Pending,
        }
    }
}
