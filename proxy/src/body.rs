//! The bodies that cross the proxy, without boxing.
//!
//! [`ResponseBody`] carries the request's [`InFlight`] lease: hyper streams a body after
//! the service future has returned, so the lease must live in the body to count the
//! request until its last byte is sent or the client goes away.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::access::AccessLog;
use crate::activity::Busy;
use crate::exchange::Answer;
use crate::retry::{Kept, Rest};
use crate::upstream::InFlight;
use crate::watchdog::Progress;

/// Why a body was cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyError {
    /// The request body grew past `max_body_size`.
    TooLarge,
    /// No byte moved for `body_idle_timeout`.
    Idle,
}

impl fmt::Display for BodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BodyError::TooLarge => "request body larger than max_body_size",
            BodyError::Idle => "body idle for longer than body_idle_timeout",
        })
    }
}

impl std::error::Error for BodyError {}

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The client's request body could not be read (invalid chunked framing, the client
/// went away): the request is the client's fault, not the upstream's.
#[derive(Debug)]
pub struct ClientBodyFailed(pub hyper::Error);

impl fmt::Display for ClientBodyFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "reading the client's request body failed: {}", self.0)
    }
}

impl std::error::Error for ClientBodyFailed {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

/// Cuts a body that moves no byte for a while. The timer is only created once the body
/// actually waits, so a body that is read in one go costs nothing.
struct IdleTimer {
    timeout: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl IdleTimer {
    fn new(timeout: Duration) -> Self {
        IdleTimer {
            timeout,
            sleep: None,
        }
    }

    fn progress(&mut self) {
        if let Some(sleep) = self.sleep.as_mut() {
            sleep.as_mut().reset(Instant::now() + self.timeout);
        }
    }

    /// Called when the body is pending: Ready means it has been idle too long.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let timeout = self.timeout;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        sleep.as_mut().poll(cx)
    }
}

/// Where a request stands on its way to its upstream, for the clock of its answer:
/// `response_timeout` runs from the end of the request body and from each read of the
/// answer's head (as nginx's `proxy_read_timeout` does), not over connecting and the
/// client's upload. While the body is sent, each chunk must follow the last within
/// `body_idle_timeout`: when none does, the app is blamed if its socket takes no more
/// bytes (504), else the client (408). The body's own idle timer cannot tell: the exchange
/// stops polling a body it cannot write, so that timer never fires then.
#[derive(Debug)]
pub(crate) struct Upload {
    phase: AtomicU8,
    /// When the request last moved, in `clock::ms`.
    moved_ms: AtomicU64,
    /// Reads of the upstream connection the request went out on: while the answer's
    /// head arrives, each read restarts `response_timeout`.
    reads: std::sync::Mutex<Option<Arc<crate::moved::Moved>>>,
}

/// Who let a request's clock run out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stalled {
    /// The app, answering: no response head within `response_timeout`.
    Answer,
    /// The app, reading the request body: its socket took no byte.
    Upstream,
    /// The client, sending its body.
    Client,
}

/// Connecting (bounded by `connect_timeout`); nothing of the request is sent yet.
const CONNECTING: u8 = 0;
/// Connected, sending the body.
const SENDING: u8 = 1;
/// Request sent, waiting for the answer.
const SENT: u8 = 2;

impl Upload {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Upload {
            phase: AtomicU8::new(CONNECTING),
            moved_ms: AtomicU64::new(crate::clock::ms()),
            reads: std::sync::Mutex::new(None),
        })
    }

    fn moved(&self) {
        self.moved_ms.store(crate::clock::ms(), Ordering::Release);
    }

    fn enter(&self, phase: u8) {
        self.moved();
        self.phase.store(phase, Ordering::Release);
    }

    /// Back to waiting for an upstream (held after every connect failed): no clock
    /// runs but the hold's own.
    pub(crate) fn held(&self) {
        self.enter(CONNECTING);
    }

    /// A connection to the upstream, whose reads are `reads`, is ready and the request
    /// goes out now.
    pub(crate) fn connected(&self, with_body: bool, reads: Arc<crate::moved::Moved>) {
        *self.reads.lock().unwrap_or_else(|e| e.into_inner()) = Some(reads);
        self.enter(if with_body { SENDING } else { SENT });
    }

    fn conn(&self) -> Option<Arc<crate::moved::Moved>> {
        self.reads.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// When the clock runs out, if it runs: `None` while connecting.
    pub(crate) fn deadline(&self, response: Duration, body_idle: Duration) -> Option<Instant> {
        let after = match self.phase.load(Ordering::Acquire) {
            SENDING => body_idle,
            SENT => response,
            _ => return None,
        };
        let moved = Instant::from_std(crate::clock::at_ms(self.moved_ms.load(Ordering::Acquire)));
        let read = self.conn().map(|reads| reads.at());
        Some(read.map_or(moved, |read| read.max(moved)) + after)
    }

    /// Who is to blame once the clock has run out.
    pub(crate) fn stalled(&self) -> Stalled {
        if self.phase.load(Ordering::Acquire) == SENT {
            Stalled::Answer
        } else if self.conn().is_some_and(|conn| conn.write_blocked()) {
            Stalled::Upstream
        } else {
            Stalled::Client
        }
    }
}

/// A client's request body as its front connection hands it over: hyper's, or none at
/// all for a request that rolld's own HTTP/1 server read (see `h1`), which serves only
/// requests without a body.
#[derive(Debug)]
pub enum ClientBody {
    Empty,
    Streamed(Incoming),
}

impl From<Incoming> for ClientBody {
    fn from(body: Incoming) -> Self {
        ClientBody::Streamed(body)
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ClientBody::Empty => Poll::Ready(None),
            ClientBody::Streamed(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Empty => true,
            ClientBody::Streamed(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Empty => SizeHint::with_exact(0),
            ClientBody::Streamed(body) => body.size_hint(),
        }
    }
}

/// A client's request body on its way to an upstream, bounded in size and idleness.
pub struct RequestBody {
    /// `None` for a request rebuilt to be sent again, and for a body buffered before
    /// it was sent.
    inner: Option<ClientBody>,
    /// A body read completely before the request went out (see `buffer`).
    spooled: Option<crate::buffer::SpooledReader>,
    /// A request sent again: its body as it was kept the first time (see `retry`).
    again: VecDeque<Bytes>,
    /// Where the chunks are kept while they go by, to send the request again.
    kept: Option<Arc<Kept>>,
    /// Bytes still allowed.
    remaining: u64,
    idle: IdleTimer,
    /// Told when the body moves and when it ends.
    upload: Option<Arc<Upload>>,
}

impl RequestBody {
    pub(crate) fn new(
        inner: ClientBody,
        limit: Option<u64>,
        idle: Duration,
        upload: Arc<Upload>,
    ) -> Self {
        RequestBody {
            inner: Some(inner),
            spooled: None,
            again: VecDeque::new(),
            kept: None,
            remaining: limit.unwrap_or(u64::MAX),
            idle: IdleTimer::new(idle),
            upload: Some(upload),
        }
    }

    pub(crate) fn empty() -> Self {
        RequestBody {
            inner: None,
            spooled: None,
            again: VecDeque::new(),
            kept: None,
            remaining: 0,
            idle: IdleTimer::new(Duration::MAX),
            upload: None,
        }
    }

    /// A body sent again: `chunks`, as kept so far, then `rest` (what the client had
    /// not sent yet when the last attempt failed), kept in turn in `kept`.
    pub(crate) fn again(
        chunks: VecDeque<Bytes>,
        rest: Option<Rest>,
        kept: Arc<Kept>,
        idle: Duration,
        upload: Arc<Upload>,
    ) -> Self {
        let (inner, remaining) = match rest {
            Some(Rest { body, remaining }) => (Some(body), remaining),
            None => (None, 0),
        };
        RequestBody {
            inner,
            spooled: None,
            again: chunks,
            kept: Some(kept),
            remaining,
            idle: IdleTimer::new(idle),
            upload: Some(upload),
        }
    }

    /// A body that rolld has read completely already (its limits were checked then).
    pub(crate) fn spooled(reader: crate::buffer::SpooledReader, upload: Arc<Upload>) -> Self {
        RequestBody {
            inner: None,
            spooled: Some(reader),
            again: VecDeque::new(),
            kept: None,
            remaining: 0,
            idle: IdleTimer::new(Duration::MAX),
            upload: Some(upload),
        }
    }

    /// Keeps the chunks in `kept` as they go by (see `retry`).
    pub(crate) fn keeping(mut self, kept: Option<Arc<Kept>>) -> Self {
        self.kept = kept;
        self
    }

    /// The body moved; `done` when that was its end.
    fn moved(&self, done: bool) {
        if let Some(upload) = &self.upload {
            if done {
                upload.enter(SENT);
            } else {
                upload.moved();
            }
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(spooled) = this.spooled.as_mut() {
            return Poll::Ready(match spooled.next_chunk() {
                Ok(Some(data)) => {
                    let done = spooled.remaining() == 0;
                    this.moved(done);
                    Some(Ok(Frame::data(data)))
                }
                Ok(None) => {
                    this.moved(true);
                    None
                }
                Err(err) => Some(Err(err.into())),
            });
        }
        if let Some(chunk) = this.again.pop_front() {
            let done = this.again.is_empty() && this.inner.as_ref().is_none_or(Body::is_end_stream);
            this.moved(done);
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(&mut *inner).poll_frame(cx);
        let ended = inner.is_end_stream();
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                this.moved(ended);
                this.idle.progress();
                if let Some(kept) = &this.kept {
                    match frame.data_ref() {
                        Some(data) => kept.keep(data, ended),
                        None => kept.give_up(),
                    }
                }
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    if len > this.remaining {
                        this.inner = None;
                        return Poll::Ready(Some(Err(BodyError::TooLarge.into())));
                    }
                    this.remaining -= len;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(err))) => Poll::Ready(Some(Err(ClientBodyFailed(err).into()))),
            Poll::Ready(None) => {
                if let Some(kept) = &this.kept {
                    kept.end();
                }
                this.moved(true);
                Poll::Ready(None)
            }
            Poll::Pending => match this.idle.poll_expired(cx) {
                Poll::Ready(()) => {
                    this.inner = None;
                    Poll::Ready(Some(Err(BodyError::Idle.into())))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        if let Some(spooled) = &self.spooled {
            return spooled.remaining() == 0;
        }
        self.again.is_empty() && self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        if let Some(spooled) = &self.spooled {
            return SizeHint::with_exact(spooled.remaining());
        }
        // A body sent again: what was kept, then what the client has still to send.
        let kept: u64 = self.again.iter().map(|c| c.len() as u64).sum();
        let Some(inner) = self.inner.as_ref() else {
            return SizeHint::with_exact(kept);
        };
        let rest = inner.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower().saturating_add(kept));
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper.saturating_add(kept));
        }
        hint
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        // Dropped before its end (its upstream failed mid-body): what the client has
        // not sent yet goes back to be sent again with what was kept.
        if let (Some(kept), Some(body)) = (self.kept.as_ref(), self.inner.take()) {
            if !body.is_end_stream() {
                kept.hand_back(Rest {
                    body,
                    remaining: self.remaining,
                });
            }
        }
    }
}

/// What the proxy sends back to a client.
pub struct ResponseBody {
    kind: Kind,
    /// Keeps the client connection's request in progress until hyper drops the body.
    _busy: Option<Busy>,
    /// The HTTP/2 stream's watchdog, told of every chunk taken.
    progress: Option<Arc<Progress>>,
}

enum Kind {
    /// Streamed from an upstream, holding the request's lease.
    Upstream(UpstreamBody),
    /// Read from rolld's buffer, which the app fills (see `buffer`).
    Buffered(crate::buffer::BufferedResponse),
    /// An answer read whole from the app before it is sent (see `forward`), with its
    /// share of the buffers' memory, if it takes one.
    Read {
        chunks: Chunks,
        _share: Option<crate::buffer::MemoryShare>,
    },
    /// An answer of the proxy's own (errors).
    Full(Option<Bytes>),
}

/// The data of an answer, chunk after chunk as it came: the usual one chunk without a
/// queue to allocate.
#[derive(Debug, Default)]
pub(crate) struct Chunks {
    first: Option<Bytes>,
    rest: VecDeque<Bytes>,
}

impl Chunks {
    pub(crate) fn push(&mut self, data: Bytes) {
        if data.is_empty() {
            return;
        }
        if self.first.is_none() && self.rest.is_empty() {
            self.first = Some(data);
        } else {
            self.rest.push_back(data);
        }
    }

    /// The bytes they hold.
    pub(crate) fn len(&self) -> u64 {
        let first = self.first.as_ref().map_or(0, Bytes::len);
        (first + self.rest.iter().map(Bytes::len).sum::<usize>()) as u64
    }

    fn pop(&mut self) -> Option<Bytes> {
        self.first.take().or_else(|| self.rest.pop_front())
    }

    fn is_empty(&self) -> bool {
        self.first.is_none() && self.rest.is_empty()
    }
}

impl ResponseBody {
    pub(crate) fn full(bytes: Bytes) -> Self {
        ResponseBody {
            kind: Kind::Full(Some(bytes)),
            _busy: None,
            progress: None,
        }
    }

    pub(crate) fn empty() -> Self {
        ResponseBody {
            kind: Kind::Full(None),
            _busy: None,
            progress: None,
        }
    }

    /// An upstream's body.
    pub(crate) fn upstream(body: UpstreamBody) -> Self {
        ResponseBody {
            kind: Kind::Upstream(body),
            _busy: None,
            progress: None,
        }
    }

    /// An upstream's answer, read whole, holding `share` of the buffers' memory until
    /// it is dropped.
    pub(crate) fn read(chunks: Chunks, share: Option<crate::buffer::MemoryShare>) -> Self {
        ResponseBody {
            kind: Kind::Read {
                chunks,
                _share: share,
            },
            _busy: None,
            progress: None,
        }
    }

    /// An upstream's body, buffered.
    pub(crate) fn buffered(body: crate::buffer::BufferedResponse) -> Self {
        ResponseBody {
            kind: Kind::Buffered(body),
            _busy: None,
            progress: None,
        }
    }

    /// Keeps the client connection's request in progress until this body is dropped.
    pub(crate) fn holding(mut self, busy: Option<Busy>) -> Self {
        self._busy = busy;
        self
    }

    /// Reports progress to the HTTP/2 stream's watchdog, which starts now.
    pub(crate) fn watched(mut self, progress: Arc<Progress>) -> Self {
        progress.sending();
        self.progress = Some(progress);
        self
    }
}

/// An upstream's response body. When it ends cleanly the connection goes back to the
/// pool; when it fails or is dropped early the connection is closed.
pub struct UpstreamBody {
    body: Answer,
    lease: Option<InFlight>,
    idle: IdleTimer,
    access: Option<Box<AccessLog>>,
}

impl UpstreamBody {
    pub(crate) fn new(
        body: Answer,
        lease: InFlight,
        idle: Duration,
        access: Option<Box<AccessLog>>,
    ) -> Self {
        UpstreamBody {
            body,
            lease: Some(lease),
            idle: IdleTimer::new(idle),
            access,
        }
    }

    fn finish(&mut self) {
        if let (Some(conn), Some(lease)) = (self.body.take_conn(), self.lease.as_ref()) {
            lease.upstream().pool().checkin(conn);
        }
        self.lease = None;
    }

    fn fail(&mut self, why: &dyn fmt::Display) {
        if let Some(lease) = self.lease.as_ref() {
            tracing::warn!(upstream = %lease.upstream().addr(), "response body cut: {why}");
            lease.cut_mid_answer();
        }
        if let Some(access) = self.access.as_mut() {
            access.complete = false;
        }
        self.lease = None;
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // Bodies that are empty from the start (HEAD, 204, 304) are never polled.
        if self.body.is_end_stream() {
            self.finish();
        } else if let Some(access) = self.access.as_mut() {
            access.complete = false;
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = this.poll_kind(cx);
        if let (Some(progress), Poll::Ready(Some(Ok(_)))) = (&this.progress, &polled) {
            progress.moved();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(bytes) => bytes.is_none(),
            Kind::Read { chunks, .. } => chunks.is_empty(),
            Kind::Upstream(up) => up.body.is_end_stream(),
            Kind::Buffered(buffered) => buffered.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            Kind::Full(None) => SizeHint::with_exact(0),
            Kind::Read { chunks, .. } => SizeHint::with_exact(chunks.len()),
            Kind::Upstream(up) => up.body.size_hint(),
            Kind::Buffered(buffered) => buffered.size_hint(),
        }
    }
}

impl ResponseBody {
    fn poll_kind(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.kind {
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Read { chunks, .. } => Poll::Ready(chunks.pop().map(|b| Ok(Frame::data(b)))),
            Kind::Buffered(buffered) => buffered.poll_frame(cx),
            Kind::Upstream(up) => match Pin::new(&mut up.body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    up.idle.progress();
                    if let (Some(access), Some(data)) = (up.access.as_mut(), frame.data_ref()) {
                        access.bytes += data.len() as u64;
                    }
                    if up.body.is_end_stream() {
                        up.finish();
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(Some(Err(err))) => {
                    up.fail(&err);
                    Poll::Ready(Some(Err(err.into())))
                }
                Poll::Ready(None) => {
                    up.finish();
                    Poll::Ready(None)
                }
                Poll::Pending => match up.idle.poll_expired(cx) {
                    Poll::Ready(()) => {
                        up.fail(&BodyError::Idle);
                        Poll::Ready(Some(Err(BodyError::Idle.into())))
                    }
                    Poll::Pending => Poll::Pending,
                },
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[test]
    fn an_answer_read_whole_goes_out_chunk_after_chunk_as_it_came() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let mut chunks = Chunks::default();
        for piece in ["hello", "", " ", "world"] {
            chunks.push(Bytes::from_static(piece.as_bytes()));
        }
        assert_eq!(chunks.len(), 11);
        let mut body = ResponseBody::read(chunks, None);
        assert!(!body.is_end_stream());
        assert_eq!(body.size_hint().exact(), Some(11));
        let mut got = Vec::new();
        rt.block_on(async {
            while let Some(frame) = body.frame().await {
                got.push(frame.expect("frame").into_data().expect("data"));
            }
        });
        assert_eq!(got, ["hello", " ", "world"], "empty chunks are no frames");
        assert!(body.is_end_stream());
        assert_eq!(body.size_hint().exact(), Some(0));
        let mut one = ResponseBody::read(Chunks::default(), None);
        assert!(one.is_end_stream(), "nothing to send");
        assert!(rt.block_on(one.frame()).is_none());
    }
}
