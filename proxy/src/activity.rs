//! A front connection's IO, aware of whether one of its requests is in progress.
//!
//! hyper's own header timeout also runs while a keep-alive connection waits idle, so the
//! two client timeouts are kept here instead: while no request is in progress, the
//! connection may stay silent for `keepalive_timeout`, and once a request's first byte
//! arrives its headers must be complete within `client_header_timeout`. A response the
//! client stops reading is cut after `body_idle_timeout`.
//!
//! It also lets an idle HTTP/1 connection give back hyper's per-connection state (its
//! 8 KiB read and write buffers) between requests: once a response is flushed, hyper
//! provably holds no bytes of a next request, and the connection has stayed idle for a
//! moment (`SHED_AFTER`), the read that waits reports "end of stream" to hyper instead.
//! hyper ends that connection cleanly, `server` takes the socket back with `into_parts`,
//! waits for the client's next bytes without any buffer, and starts a new hyper
//! connection on it. An idle keep-alive connection then
//! costs a socket, a timer and this struct, as in nginx.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use hyper::rt::{Read, ReadBufCursor, Write};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use crate::config::ProxyConfig;

/// How long an HTTP/1 connection stays idle before it gives hyper's state back: a busy
/// keep-alive client's next request comes sooner, and building that state anew for
/// every request costs more CPU than holding it that long.
const SHED_AFTER: Duration = Duration::from_millis(250);

/// The most a read of a new connection's first bytes takes (see
/// [`ClientIo::starts_with`]): room for most request heads.
const SNIFF_READ: usize = 2048;

/// Shared by a connection's IO and its requests.
#[derive(Debug)]
pub(crate) struct Activity {
    /// Requests of this connection in progress (several on HTTP/2).
    busy: AtomicUsize,
    /// Requests ever started on this connection.
    started: AtomicU64,
    /// The number (in `started`) of the last request that came with a body.
    bodied: AtomicU64,
    /// When the last request ended (or the connection began), in `clock::ms`.
    idle_since_ms: AtomicU64,
    /// The connection task, parked in a read while a request was in progress: when the
    /// last request ends it must wake to start the keep-alive clock.
    parked: Mutex<Option<Waker>>,
    /// The raw head of the request being read had unsound framing (see `HeadScan`);
    /// taken by that request.
    unsound_framing: AtomicBool,
}

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Activity {
            busy: AtomicUsize::new(0),
            started: AtomicU64::new(0),
            bodied: AtomicU64::new(0),
            idle_since_ms: AtomicU64::new(crate::clock::ms()),
            parked: Mutex::new(None),
            unsound_framing: AtomicBool::new(false),
        })
    }

    /// Whether the request just handed over had unsound framing, as its client wrote
    /// it (see `HeadScan`).
    pub(crate) fn take_unsound_framing(&self) -> bool {
        self.unsound_framing.swap(false, Ordering::AcqRel)
    }

    /// Marks a request in progress until the returned guard drops.
    pub(crate) fn begin(self: &Arc<Self>, with_body: bool) -> Busy {
        self.busy.fetch_add(1, Ordering::AcqRel);
        let number = self.started.fetch_add(1, Ordering::AcqRel) + 1;
        if with_body {
            self.bodied.store(number, Ordering::Release);
        }
        Busy(self.clone())
    }

    fn idle_since(&self) -> Instant {
        Instant::from_std(crate::clock::at_ms(
            self.idle_since_ms.load(Ordering::Acquire),
        ))
    }
}

/// A request in progress on its connection.
#[derive(Debug)]
pub(crate) struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        let a = &self.0;
        a.idle_since_ms.store(crate::clock::ms(), Ordering::Release);
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

/// The client's stream (TCP, or TLS over TCP) with the timeouts above.
pub(crate) struct ClientIo<S = TcpStream> {
    stream: S,
    /// Bytes already read from the client, handed to hyper before the socket's.
    prefix: Bytes,
    activity: Arc<Activity>,
    timeouts: Timeouts,
    /// First byte of a request whose headers are not complete yet, and how many
    /// requests had started then (a later one means those headers did complete).
    header_started: Option<(Instant, u64)>,
    /// Since when writes make no progress.
    write_stalled: Option<Instant>,
    sleep: Pin<Box<Sleep>>,
    armed_for: Option<Instant>,
    /// Whether this connection may end its hyper connection while idle (HTTP/1 only).
    sheddable: bool,
    /// HTTP/2: bytes while no request is in progress are not a request's head (PING,
    /// WINDOW_UPDATE, SETTINGS come any time), so they start no header clock and an
    /// idle connection stays open for `keepalive_timeout`.
    multiplexed: bool,
    /// The last four bytes handed to hyper.
    tail: [u8; 4],
    /// Requests started when bytes were last handed to hyper.
    read_at: u64,
    /// Requests started when a flush last completed with no request in progress and
    /// nothing written since.
    flushed_at: Option<u64>,
    /// hyper was told "end of stream" to give its state back; the socket stays open.
    shed: bool,
    head: HeadScan,
}

/// Looks at the raw bytes of an HTTP/1 request head for framing that the parser would
/// make look sound: a `Transfer-Encoding` value with a tab in it (tabs around values
/// are trimmed as optional whitespace, so `chunked<TAB>` reaches rolld as `chunked`)
/// and a `Content-Length` beside a `Transfer-Encoding` (the parser drops the length).
/// A proxy in front of rolld may read such a head another way and frame the body by its
/// length, which smuggles a request; rolld refuses both, as nginx does. Only heads that
/// start while no request is in progress are looked at (pipelined heads are not).
#[derive(Debug, Default)]
struct HeadScan {
    /// Within a head.
    on: bool,
    /// Bytes of the current line so far (without `\r`).
    column: usize,
    /// Bytes of `transfer-encoding:` and of `content-length:` the current line starts
    /// with.
    matched: [usize; 2],
    /// Which of the two fields the head had.
    seen: [bool; 2],
    tab: bool,
}

impl HeadScan {
    const NAMES: [&'static [u8]; 2] = [b"transfer-encoding:", b"content-length:"];

    fn start() -> Self {
        HeadScan {
            on: true,
            ..HeadScan::default()
        }
    }

    /// Scans `bytes`; true when the head they complete has unsound framing.
    fn scan(&mut self, bytes: &[u8]) -> bool {
        if !self.on {
            return false;
        }
        let mut rest = bytes;
        while let Some((&b, after)) = rest.split_first() {
            rest = after;
            match b {
                b'\n' if self.column == 0 => {
                    // The empty line: the head is complete.
                    self.on = false;
                    return self.tab || self.seen == [true, true];
                }
                b'\n' => {
                    self.column = 0;
                    self.matched = [0, 0];
                }
                b'\r' => {}
                _ => {
                    for (field, name) in Self::NAMES.iter().enumerate() {
                        let matched = &mut self.matched[field];
                        if *matched == name.len() {
                            // In the value of this field.
                            self.tab |= field == 0 && b == b'\t';
                        } else if *matched == self.column
                            && b.to_ascii_lowercase() == name[*matched]
                        {
                            *matched += 1;
                            self.seen[field] |= *matched == name.len();
                        }
                    }
                    self.column += 1;
                    if self.settled() {
                        // Skip to the line's end (or past these bytes: the rest of the
                        // line, in the next read, is skipped the same way).
                        match memchr::memchr(b'\n', rest) {
                            Some(end) => rest = &rest[end..],
                            None => return false,
                        }
                    }
                }
            }
        }
        false
    }

    /// Whether the rest of the current line can change no verdict: no field name can
    /// still match, and it is not the value of `Transfer-Encoding` (whose tabs count).
    fn settled(&self) -> bool {
        let [te, cl] = self.matched;
        let [te_name, cl_name] = Self::NAMES;
        te != self.column && te != te_name.len() && (cl != self.column || cl == cl_name.len())
    }
}

impl<S> ClientIo<S> {
    pub(crate) fn new(stream: S, timeouts: Timeouts) -> (Self, Arc<Activity>) {
        let activity = Activity::new();
        let io = ClientIo {
            stream,
            prefix: Bytes::new(),
            activity: activity.clone(),
            timeouts,
            header_started: None,
            write_stalled: None,
            sleep: Box::pin(tokio::time::sleep(Duration::ZERO)),
            armed_for: None,
            sheddable: false,
            multiplexed: false,
            tail: [0; 4],
            read_at: 0,
            flushed_at: None,
            shed: false,
            head: HeadScan::default(),
        };
        (io, activity)
    }

    /// Serves HTTP/2 from now on (see `multiplexed`): the preface read so far started
    /// no request.
    pub(crate) fn multiplex(&mut self) {
        self.multiplexed = true;
        self.header_started = None;
        self.head.on = false;
    }

    /// Whether hyper, asking for bytes now, is idle between requests with nothing of
    /// the next one buffered: every request it started has its response flushed, a
    /// request began after the last bytes it got (so it parsed them), that request had
    /// no body (which hyper might still be reading), and the bytes ended a message head
    /// (so no partial next head sits in its buffer).
    fn may_shed(&self) -> bool {
        let started = self.activity.started.load(Ordering::Acquire);
        self.sheddable
            && self.prefix.is_empty()
            && self.read_at < started
            && self.activity.bodied.load(Ordering::Acquire) != started
            && self.flushed_at == Some(started)
            && &self.tail == b"\r\n\r\n"
            && self.activity.busy.load(Ordering::Acquire) == 0
    }

    /// Notes bytes handed to hyper.
    fn handed(&mut self, bytes: &[u8]) {
        if bytes.len() >= 4 {
            self.tail.copy_from_slice(&bytes[bytes.len() - 4..]);
        } else {
            self.tail.rotate_left(bytes.len());
            self.tail[4 - bytes.len()..].copy_from_slice(bytes);
        }
        self.read_at = self.activity.started.load(Ordering::Acquire);
        if !self.head.on && !self.multiplexed && self.activity.busy.load(Ordering::Acquire) == 0 {
            self.head = HeadScan::start();
        }
        if self.head.scan(bytes) {
            self.activity.unsound_framing.store(true, Ordering::Release);
        }
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
        match self.poll_deadline_or_shed(cx, reading, None) {
            Poll::Ready(Expired::Timeout(err)) => Poll::Ready(err),
            _ => Poll::Pending,
        }
    }

    /// As `poll_deadline`, with one more deadline: when to shed hyper's state.
    fn poll_deadline_or_shed(
        &mut self,
        cx: &mut Context<'_>,
        reading: bool,
        shed_at: Option<Instant>,
    ) -> Poll<Expired> {
        let read = if reading {
            self.read_deadline(cx)
        } else {
            None
        };
        let write = self.write_stalled.map(|s| s + self.timeouts.write_idle);
        let Some(deadline) = [read, write, shed_at].into_iter().flatten().min() else {
            return Poll::Pending;
        };
        // The timer is re-armed only for an earlier deadline: one that fires before
        // the deadline it is for now (which moves with every request) is re-armed
        // then, once, instead of on every request of a busy connection.
        if self.armed_for.is_none_or(|armed| armed > deadline) {
            self.sleep.as_mut().reset(deadline);
            self.armed_for = Some(deadline);
        }
        let mut fired = self.sleep.as_mut().poll(cx);
        if fired.is_ready() && self.armed_for.is_some_and(|armed| armed < deadline) {
            self.sleep.as_mut().reset(deadline);
            self.armed_for = Some(deadline);
            fired = self.sleep.as_mut().poll(cx);
        }
        match fired {
            Poll::Ready(()) if shed_at == Some(deadline) => Poll::Ready(Expired::Shed),
            Poll::Ready(()) => {
                let what = if write.is_some_and(|w| w <= deadline) {
                    "client stopped reading the response"
                } else if self.header_started.is_some() {
                    "client did not send its request headers in time"
                } else {
                    "idle keep-alive connection"
                };
                Poll::Ready(Expired::Timeout(io::Error::new(
                    io::ErrorKind::TimedOut,
                    what,
                )))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Which deadline of a connection passed.
enum Expired {
    /// The connection stayed idle `SHED_AFTER`: time to give hyper's state back.
    Shed,
    Timeout(io::Error),
}

/// Only plain TCP connections sniff the HTTP/2 preface and give hyper's state back
/// while idle: a TLS connection learns its protocol from ALPN, and its idle state is
/// rustls's, which a shed would not give back.
impl ClientIo<TcpStream> {
    /// Lets this (HTTP/1) connection give hyper's state back while idle (see the
    /// module docs).
    pub(crate) fn allow_shedding(&mut self) {
        self.sheddable = true;
    }

    /// Whether the last hyper connection ended because this IO shed it while idle
    /// (rather than the client closing or an error): the socket can serve again.
    /// Clears the mark for the next hyper connection, which first gets `leftover`.
    pub(crate) fn take_shed(&mut self, leftover: Bytes) -> bool {
        let shed = std::mem::take(&mut self.shed);
        if shed && !leftover.is_empty() {
            self.prefix = leftover;
        }
        shed
    }

    /// Waits, with no buffer held, until the client sends something (or closes), or
    /// fails when the keep-alive or header timeout passes first.
    pub(crate) fn ready(&mut self) -> impl Future<Output = io::Result<()>> + '_ {
        std::future::poll_fn(move |cx| {
            if !self.prefix.is_empty() {
                return Poll::Ready(Ok(()));
            }
            match self.stream.poll_read_ready(cx) {
                Poll::Ready(result) => Poll::Ready(result),
                Poll::Pending => self.poll_deadline(cx, true).map(Err),
            }
        })
    }

    /// Waits, with no buffer held, for the client's next request on a connection that
    /// rolld's own HTTP/1 server serves (see `h1`): true when bytes came (or the end),
    /// false once the connection stayed idle `SHED_AFTER`, when the caller gives its
    /// buffer back and waits on with `ready`. Fails at the keep-alive timeout.
    pub(crate) fn ready_or_shed(&mut self) -> impl Future<Output = io::Result<bool>> + '_ {
        std::future::poll_fn(move |cx| {
            if !self.prefix.is_empty() {
                return Poll::Ready(Ok(true));
            }
            match self.stream.poll_read_ready(cx) {
                Poll::Ready(result) => Poll::Ready(result.map(|()| true)),
                Poll::Pending => {
                    let shed_at = self.activity.idle_since() + SHED_AFTER;
                    match self.poll_deadline_or_shed(cx, true, Some(shed_at)) {
                        Poll::Ready(Expired::Shed) => Poll::Ready(Ok(false)),
                        Poll::Ready(Expired::Timeout(err)) => Poll::Ready(Err(err)),
                        Poll::Pending => Poll::Pending,
                    }
                }
            }
        })
    }

    /// Reads what the client sent into `buf` for rolld's own HTTP/1 server: `Ok(0)` at
    /// the end of the stream. While no request is in progress, the keep-alive and header
    /// timeouts hold as for hyper. `buf` must have room.
    pub(crate) fn poll_read_into(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut bytes::BytesMut,
    ) -> Poll<io::Result<usize>> {
        let n = if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.capacity() - buf.len());
            buf.extend_from_slice(&self.prefix.split_to(n));
            n
        } else {
            let mut read = tokio::io::ReadBuf::uninit(buf.spare_capacity_mut());
            match Pin::new(&mut self.stream).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) => {
                    let n = read.filled().len();
                    // SAFETY: tokio's ReadBuf filled the first `n` bytes of the spare
                    // capacity it was given.
                    unsafe { buf.set_len(buf.len() + n) };
                    n
                }
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                Poll::Pending => return self.poll_deadline(cx, true).map(Err),
            }
        };
        if self.header_started.is_none() && self.activity.busy.load(Ordering::Acquire) == 0 {
            let started = self.activity.started.load(Ordering::Acquire);
            self.header_started = Some((crate::clock::tokio_now(), started));
        }
        Poll::Ready(Ok(n))
    }

    /// Hands `bytes`, read by rolld's own HTTP/1 server, to the next hyper connection
    /// as if unread.
    pub(crate) fn unread(&mut self, bytes: Bytes) {
        debug_assert!(self.prefix.is_empty());
        self.prefix = bytes;
    }

    /// Reads the client's first bytes until they tell whether they start with `want`:
    /// true if all of `want` came, false at the first byte that differs. Each read
    /// takes what the client sent, up to [`SNIFF_READ`] bytes: a whole small request
    /// head in one system call, not the length of `want` first and the rest after it.
    /// The bytes read are handed on later (to rolld's own HTTP/1 server or hyper), as
    /// if unread. Fails at end of stream, or at the keep-alive or header timeout.
    pub(crate) async fn starts_with(&mut self, want: &[u8]) -> io::Result<bool> {
        debug_assert!(want.len() < SNIFF_READ && self.prefix.is_empty());
        // On the heap, not in the connection's future; read as `poll_read_into` reads,
        // so that a short read tells tokio the socket is drained and the next read
        // waits for the client instead of asking the kernel.
        let mut got = bytes::BytesMut::with_capacity(SNIFF_READ);
        loop {
            match std::future::poll_fn(|cx| self.poll_read_into(cx, &mut got)).await {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(_) => {
                    let compared = got.len().min(want.len());
                    let matches = got[..compared] == want[..compared];
                    if !matches || got.len() >= want.len() {
                        self.prefix = got.freeze();
                        return Ok(matches);
                    }
                }
                Err(err) => return Err(err),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Read for ClientIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let polled = if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            let bytes = this.prefix.split_to(n);
            buf.put_slice(&bytes);
            this.handed(&bytes);
            Ok(())
        } else {
            // SAFETY: tokio's ReadBuf writes only initialized bytes into the unfilled
            // part it is given and reports how many; hyper's cursor is advanced by
            // exactly that many.
            let mut read = tokio::io::ReadBuf::uninit(unsafe { buf.as_mut() });
            match Pin::new(&mut this.stream).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) => {
                    let n = read.filled().len();
                    if n > 0 {
                        this.handed(read.filled());
                    }
                    // SAFETY: the first `n` bytes were just filled.
                    unsafe { buf.advance(n) };
                    Ok(())
                }
                Poll::Ready(Err(err)) => Err(err),
                Poll::Pending => {
                    let shed_at = this
                        .may_shed()
                        .then(|| this.activity.idle_since() + SHED_AFTER);
                    return match this.poll_deadline_or_shed(cx, true, shed_at) {
                        Poll::Ready(Expired::Shed) => {
                            // "End of stream" while idle: hyper ends this connection
                            // cleanly and `server` serves the socket again later.
                            this.shed = true;
                            Poll::Ready(Ok(()))
                        }
                        Poll::Ready(Expired::Timeout(err)) => Poll::Ready(Err(err)),
                        Poll::Pending => Poll::Pending,
                    };
                }
            }
        };
        // Bytes (or the end) while no request is in progress: a request begins.
        if this.header_started.is_none()
            && !this.multiplexed
            && this.activity.busy.load(Ordering::Acquire) == 0
        {
            let started = this.activity.started.load(Ordering::Acquire);
            this.header_started = Some((crate::clock::tokio_now(), started));
        }
        Poll::Ready(polled)
    }
}

impl<S> ClientIo<S> {
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
                self.flushed_at = None;
                Poll::Ready(result)
            }
            Poll::Pending => {
                self.write_stalled.get_or_insert_with(Instant::now);
                self.poll_deadline(cx, false).map(Err)
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Write for ClientIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.written(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.written(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.stream).poll_flush(cx);
        if let Poll::Ready(Ok(())) = polled {
            // hyper flushes after writing all it buffered: with no request in progress,
            // every response so far is on the wire.
            if this.activity.busy.load(Ordering::Acquire) == 0 {
                this.flushed_at = Some(this.activity.started.load(Ordering::Acquire));
            }
        }
        polled
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.shed {
            // hyper ended its connection because we told it so: the socket stays open.
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::HeadScan;

    /// The verdict on a head, whichever reads its bytes arrive in.
    fn unsound(head: &[u8]) -> bool {
        let whole = HeadScan::start().scan(head);
        for cut in 0..head.len() {
            let mut scan = HeadScan::start();
            let split = scan.scan(&head[..cut]) || scan.scan(&head[cut..]);
            assert_eq!(split, whole, "cut at {cut}");
        }
        whole
    }

    #[test]
    fn framing_the_parser_would_trim_or_drop_is_unsound() {
        assert!(unsound(
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\t\r\n\r\n"
        ));
        assert!(unsound(
            b"POST / HTTP/1.1\r\nTRANSFER-ENCODING:\tchunked\r\n\r\n"
        ));
        assert!(unsound(
            b"POST / HTTP/1.1\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n"
        ));
        // After lines that are skipped whole, in whatever reads they arrive.
        assert!(unsound(
            b"POST /a/long/path?q=1 HTTP/1.1\r\nUser-Agent: a client\r\nContent-Type: x\r\nConnection: keep-alive\r\nContent-Length: 3\r\nCookie: a=b\r\nTransfer-Encoding: chunked\r\n\r\n"
        ));
    }

    #[test]
    fn the_rest_of_a_line_that_is_no_framing_field_is_skipped() {
        // Skipped bytes are not looked at: the line's column stops where its name
        // stopped matching either field.
        let mut scan = HeadScan::start();
        assert!(!scan.scan(b"Host: example.test"));
        assert_eq!(scan.column, 1, "ruled out at `H`");
        let mut scan = HeadScan::start();
        assert!(!scan.scan(b"Connection: keep-alive"));
        assert_eq!(scan.column, 4, "`conn` is as far as `content-length:` goes");
        let mut scan = HeadScan::start();
        assert!(!scan.scan(b"Content-Length: 12345"));
        assert_eq!(scan.column, 15, "a length's digits change nothing");
        let mut scan = HeadScan::start();
        assert!(!scan.scan(b"Transfer-Encoding: chunked"));
        assert_eq!(
            scan.column, 26,
            "its value is read whole: a tab there counts"
        );
    }

    #[test]
    fn tabs_elsewhere_and_one_framing_are_sound() {
        assert!(!unsound(
            b"POST / HTTP/1.1\r\nX-Transfer-Encoding: chunked\t\r\nTransfer-Encoding: chunked\r\nX-Note: a\tb\r\n\r\n"
        ));
        assert!(!unsound(b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\n"));
        // A value that names a framing field is no framing field.
        assert!(!unsound(
            b"POST / HTTP/1.1\r\nX-Note: transfer-encoding: chunked\t\r\nContent-Length: 3\r\nX-Also: content-length: 1\r\n\r\n"
        ));
        // Fields that only begin like a framing field do not count as one.
        assert!(!unsound(
            b"POST / HTTP/1.1\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"
        ));
        assert!(!unsound(
            b"POST / HTTP/1.1\r\nTE: trailers\r\nContent-Length: 3\r\n\r\n"
        ));
        // What follows the head (a body) is not looked at.
        assert!(!unsound(
            b"POST / HTTP/1.1\r\nContent-Length: 40\r\n\r\nTransfer-Encoding: chunked\t\r\n\r\n"
        ));
    }
}
