//! When bytes last moved on a socket: the clock of idle timeouts that count reads
//! (an upgraded connection's tunnel, an upstream's answer). A leaf module.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// When bytes were last read, shared by the readers that count.
#[derive(Debug)]
pub(crate) struct Moved {
    /// When, in `clock::ms`.
    ms: AtomicU64,
    /// The last write found the socket full.
    write_blocked: AtomicBool,
}

impl Moved {
    pub(crate) fn new() -> Self {
        Moved {
            ms: AtomicU64::new(crate::clock::ms()),
            write_blocked: AtomicBool::new(false),
        }
    }

    /// Bytes moved now.
    pub(crate) fn now(&self) {
        self.ms.store(crate::clock::ms(), Ordering::Relaxed);
    }

    /// Whether the peer takes no more bytes: the last write found the socket full.
    pub(crate) fn write_blocked(&self) -> bool {
        self.write_blocked.load(Ordering::Relaxed)
    }

    /// When bytes last moved (at creation, if never).
    pub(crate) fn at(&self) -> Instant {
        Instant::from_std(crate::clock::at_ms(self.ms.load(Ordering::Relaxed)))
    }
}

pin_project_lite::pin_project! {
    /// An IO noting in a [`Moved`] each read that returns bytes, and whether its last
    /// write found the socket full.
    pub(crate) struct Tracked<T> {
        #[pin]
        io: T,
        moved: Arc<Moved>,
    }
}

impl<T> Tracked<T> {
    pub(crate) fn new(io: T, moved: Arc<Moved>) -> Self {
        Tracked { io, moved }
    }

    pub(crate) fn get_ref(&self) -> &T {
        &self.io
    }
}

impl<T: AsyncRead> AsyncRead for Tracked<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let polled = this.io.poll_read(cx, buf);
        if buf.filled().len() > before {
            this.moved.now();
        }
        polled
    }
}

impl<T: AsyncWrite> AsyncWrite for Tracked<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        let polled = this.io.poll_write(cx, buf);
        this.moved
            .write_blocked
            .store(polled.is_pending(), Ordering::Relaxed);
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        let polled = this.io.poll_write_vectored(cx, bufs);
        this.moved
            .write_blocked
            .store(polled.is_pending(), Ordering::Relaxed);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}
