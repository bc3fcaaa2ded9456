//! A front connection's IO, aware of whether one of its requests is in progress.
//!
//! hyper's own header timeout also runs while a keep-alive connection waits idle, so the
//! two client timeouts are kept here instead: while no request is in progress, the
//! connection may stay silent for `keepalive_timeout`, and once a request's first byte
//! arrives its headers must be complete within `client_header_timeout`. A response the
//! client stops reading is cut after `body_idle_timeout`.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use crate::config::ProxyConfig;

/// Shared by a connection's IO and its requests.
#[derive(Debug)]
pub(crate) struct Activity {
    /// Requests of this connection in progress (several on HTTP/2).
    busy: AtomicUsize,
    /// Requests ever started on this connection.
    started: AtomicU64,
    /// When the last request ended, in ms since `epoch`.
    idle_since_ms: AtomicU64,
    epoch: Instant,
    /// The connection task, parked in a read while a request was in progress: when the
    /// last request ends it must wake to start the keep-alive clock.
    parked: Mutex<Option<Waker>>,
}

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Activity {
            busy: AtomicUsize::new(0),
            started: AtomicU64::new(0),
            idle_since_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            parked: Mutex::new(None),
        })
    }

    /// Marks a request in progress until the returned guard drops.
    pub(crate) fn begin(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::AcqRel);
        self.started.fetch_add(1, Ordering::AcqRel);
        Busy(self.clone())
    }

    fn idle_since(&self) -> Instant {
        self.epoch + Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire))
    }
}

/// A request in progress on its connection.
#[derive(Debug)]
pub(crate) struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        let a = &self.0;
        let since = a.epoch.elapsed().as_millis() as u64;
        a.idle_since_ms.store(since, Ordering::Release);
        if a.busy.fetch_sub(1, Ordering::AcqRel) == 1 {
            let parked = a.parked.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(waker) = parked {
                waker.wake();
            }
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Timeouts {
    header: Duration,
    keepalive: Duration,
    write_idle: Duration,
}

impl Timeouts {
    pub(crate) fn from_config(config: &ProxyConfig) -> Self {
        Timeouts {
            header: config.client_header_timeout,
            keepalive: config.keepalive_timeout,
            write_idle: config.body_idle_timeout,
        }
    }
}

/// The client's TCP stream with the timeouts above.
pub(crate) struct ClientIo {
    io: TokioIo<TcpStream>,
    activity: Arc<Activity>,
    timeouts: Timeouts,
    /// First byte of a request whose headers are not complete yet, and how many
    /// requests had started then (a later one means those headers did complete).
    header_started: Option<(Instant, u64)>,
    /// Since when writes make no progress.
    write_stalled: Option<Instant>,
    sleep: Pin<Box<Sleep>>,
    armed_for: Option<Instant>,
}

impl ClientIo {
    pub(crate) fn new(stream: TcpStream, timeouts: Timeouts) -> (Self, Arc<Activity>) {
        let activity = Activity::new();
        let io = ClientIo {
            io: TokioIo::new(stream),
            activity: activity.clone(),
            timeouts,
            header_started: None,
            write_stalled: None,
            sleep: Box::pin(tokio::time::sleep(Duration::ZERO)),
            armed_for: None,
        };
        (io, activity)
    }

    fn read_deadline(&mut self, cx: &mut Context<'_>) -> Option<Instant> {
        let started = self.activity.started.load(Ordering::Acquire);
        if self.header_started.is_some_and(|(_, n)| n != started) {
            self.header_started = None;
        }
        if self.activity.busy.load(Ordering::Acquire) > 0 {
            let mut parked = self
                .activity
                .parked
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if !parked.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *parked = Some(cx.waker().clone());
            }
            drop(parked);
            // The request may have ended while we registered.
            if self.activity.busy.load(Ordering::Acquire) > 0 {
                return None;
            }
        }
        Some(match self.header_started {
            Some((start, _)) => start + self.timeouts.header,
            None => self.activity.idle_since() + self.timeouts.keepalive,
        })
    }

    /// Waits for the earliest deadline; Ready means it has passed.
    fn poll_deadline(&mut self, cx: &mut Context<'_>, reading: bool) -> Poll<io::Error> {
        let read = if reading {
            self.read_deadline(cx)
        } else {
            None
        };
        let write = self.write_stalled.map(|s| s + self.timeouts.write_idle);
        let Some(deadline) = [read, write].into_iter().flatten().min() else {
            return Poll::Pending;
        };
        if self.armed_for != Some(deadline) {
            self.sleep.as_mut().reset(deadline);
            self.armed_for = Some(deadline);
        }
        match self.sleep.as_mut().poll(cx) {
            Poll::Ready(()) => {
                let what = if write.is_some_and(|w| w <= deadline) {
                    "client stopped reading the response"
                } else if self.header_started.is_some() {
                    "client did not send its request headers in time"
                } else {
                    "idle keep-alive connection"
                };
                Poll::Ready(io::Error::new(io::ErrorKind::TimedOut, what))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Read for ClientIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(result) => {
                // Bytes (or the end) while no request is in progress: a request begins.
                if this.header_started.is_none() && this.activity.busy.load(Ordering::Acquire) == 0
                {
                    let started = this.activity.started.load(Ordering::Acquire);
                    this.header_started = Some((Instant::now(), started));
                }
                Poll::Ready(result)
            }
            Poll::Pending => this.poll_deadline(cx, true).map(Err),
        }
    }
}

impl ClientIo {
    /// Tracks a write's progress: a write that stays pending past `body_idle_timeout`
    /// fails, so a client that stopped reading does not hold its connection forever.
    fn written(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match polled {
            Poll::Ready(result) => {
                self.write_stalled = None;
                Poll::Ready(result)
            }
            Poll::Pending => {
                self.write_stalled.get_or_insert_with(Instant::now);
                self.poll_deadline(cx, false).map(Err)
            }
        }
    }
}

impl Write for ClientIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        this.written(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.written(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
