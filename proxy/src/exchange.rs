//! One HTTP/1.1 exchange with an upstream, driven by the request's own task.
//!
//! rolld speaks to its apps itself rather than through a generic client, which runs
//! each connection in a task of its own and passes every request and answer across
//! channels: two task wake-ups and two moves of each message per request, the largest
//! share of the proxy's own work on a small answer. Here the request's task writes the
//! request and reads the answer's head; the answer's body reads on from the same
//! socket, and gives the connection back, with its read buffer, once the answer is
//! whole and the request was sent whole. It also tells what the retry rules must know:
//! whether any byte of a request was written.
//!
//! A request's body is sent while its answer is read: an app may answer before it has
//! read all of the body (a refusal, or a stream that echoes), and the rest is still
//! sent as the answer's body is read.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode};
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::body::{BoxError, RequestBody};
use crate::headers::Forwarding;
use crate::moved::{Moved, Tracked};

/// Most fields an answer's head may have, as hyper's client allows.
const MAX_HEADERS: usize = 100;
/// Largest answer head: a larger one gets a 502 (nginx's `proxy_buffer_size` is 4-8 KiB).
const MAX_HEAD: usize = 64 * 1024;
/// What a read of the socket asks for at least.
const READ_SIZE: usize = 8 * 1024;
/// What a read asks for at most, while a body of known length has more to come.
const MAX_READ: usize = 64 * 1024;
/// Buffers handed to one vectored write.
const MAX_SLICES: usize = 16;

/// Why an exchange with an upstream failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("the connection closed before the answer was complete")]
    Closed,
    #[error("invalid answer: {0}")]
    Invalid(&'static str),
    #[error(
        "the answer's head is larger than {MAX_HEAD} bytes or has more than {MAX_HEADERS} fields"
    )]
    HeadTooLarge,
}

/// A request that failed on its connection.
pub(crate) enum SendError {
    /// Not a byte of it was written: it may go out again on another connection,
    /// whatever its method.
    Unsent(Box<Outgoing>, UpstreamError),
    /// Its body failed on the client's side (too large, idle, broken).
    Body(BoxError),
    /// Written, at least in part, and no answer came: the app may have acted on it.
    Failed(UpstreamError),
}

/// One HTTP/1.1 connection to an upstream.
pub(crate) struct Conn {
    io: Tracked<TcpStream>,
    /// What was read from the app and not consumed yet: first `rest`, then `buf`.
    buf: BytesMut,
    /// What came after the answer's head in the read that completed it.
    rest: Bytes,
    /// Taken from the pool rather than freshly connected.
    pub(crate) reused: bool,
    /// When the connection last read bytes from the upstream.
    pub(crate) reads: Arc<Moved>,
}

impl Conn {
    /// Boxed once for its life: the pool and each answer's body move it around.
    pub(crate) fn new(stream: TcpStream) -> Box<Self> {
        let reads = Arc::new(Moved::new());
        Box::new(Conn {
            io: Tracked::new(stream, reads.clone()),
            buf: BytesMut::new(),
            rest: Bytes::new(),
            reused: false,
            reads,
        })
    }

    /// Whether an idle connection can carry a request: the app has not closed it, and
    /// has sent nothing (bytes that answer no request mean it is out of step; none were
    /// left over when it was given back, see `Answer::take_conn`). Looks at the socket
    /// only when the runtime saw it become readable.
    pub(crate) fn is_open(&self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match self.io.get_ref().poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => {
                let mut byte = [0u8; 1];
                matches!(self.io.get_ref().try_read(&mut byte),
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }

    /// Lets go of a large read buffer before the connection waits in the pool: a large
    /// answer's reads must not stay held by every idle connection.
    pub(crate) fn shrink(&mut self) {
        if self.buf.capacity() > 2 * READ_SIZE {
            self.buf = BytesMut::new();
        }
    }

    /// Lets go of the read buffer of a connection waiting in the pool: the next request
    /// on it reads into a new one.
    pub(crate) fn release_buffer(&mut self) {
        if self.buf.is_empty() && self.rest.is_empty() {
            self.buf = BytesMut::new();
            self.rest = Bytes::new();
        }
    }

    #[cfg(test)]
    pub(crate) fn buffer_capacity(&self) -> usize {
        self.buf.capacity()
    }

    #[cfg(test)]
    pub(crate) fn reserve_buffer_for_test(&mut self) {
        self.buf.reserve(READ_SIZE);
    }

    /// Sends `req` and reads its answer's head. The answer's body reads on from this
    /// connection, and hands it back when it can carry another request.
    pub(crate) async fn send(
        mut self: Box<Self>,
        req: Outgoing,
    ) -> Result<Response<Answer>, SendError> {
        let Outgoing { head: out, body } = req;
        let mut upload = Upload::new(&out, body);
        let head = poll_fn(|cx| self.poll_head(cx, &mut upload)).await;
        let head = match head {
            Ok(head) => head,
            Err(Failure::Body(err)) => return Err(SendError::Body(err)),
            Err(Failure::Upstream(err)) if !upload.written => {
                let Upload { body, .. } = upload;
                return Err(SendError::Unsent(
                    Box::new(Outgoing { head: out, body }),
                    err,
                ));
            }
            Err(Failure::Upstream(err)) => return Err(SendError::Failed(err)),
        };
        let Head {
            parts: head,
            framing,
            keep_alive,
        } = head;
        let framing = match framing {
            Framing::Upgrade if !out.asks_upgrade => {
                return Err(SendError::Failed(UpstreamError::Invalid(
                    "101 Switching Protocols to a request that asked for no upgrade",
                )))
            }
            _ if out.no_body && framing != Framing::Upgrade => Framing::Length(0),
            framing => framing,
        };
        let state = match framing {
            Framing::Length(0) => Decode::Done,
            Framing::Length(n) => Decode::Length(n),
            Framing::Chunked => {
                // Chunked framing is decoded from `buf` alone.
                let rest = std::mem::take(&mut self.rest);
                self.buf.extend_from_slice(&rest);
                Decode::Chunked(Chunked::Size)
            }
            Framing::Close => Decode::Close,
            Framing::Upgrade => Decode::Upgrade,
        };
        let upload = (!upload.finished()).then(|| Box::new(upload));
        let answer = Answer {
            conn: Some(self),
            state,
            keep_alive,
            upload,
            handed: false,
            deferred: None,
        };
        Ok(Response::from_parts(head, answer))
    }

    /// Sends what the request has to send, and reads the answer's head.
    fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
        upload: &mut Upload,
    ) -> Poll<Result<Head, Failure>> {
        if !upload.finished() {
            match upload.poll_send(&mut self.io, cx) {
                Poll::Ready(Ok(())) | Poll::Pending => {}
                Poll::Ready(Err(Failure::Upstream(err))) if upload.written => {
                    // Written in part: the app may have answered before it stopped
                    // reading (a refusal of the body). Its answer is read if it came;
                    // the connection is not used again.
                    upload.abandon();
                    return match self.poll_parse(cx) {
                        Poll::Ready(Ok(mut head)) => {
                            head.keep_alive = false;
                            Poll::Ready(Ok(head))
                        }
                        _ => Poll::Ready(Err(Failure::Upstream(err))),
                    };
                }
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
            }
        }
        match self.poll_parse(cx) {
            Poll::Ready(Ok(head)) => Poll::Ready(Ok(head)),
            Poll::Ready(Err(err)) => Poll::Ready(Err(Failure::Upstream(err))),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Reads until an answer's head (past any interim 1xx answer) is whole.
    fn poll_parse(&mut self, cx: &mut Context<'_>) -> Poll<Result<Head, UpstreamError>> {
        loop {
            if !self.buf.is_empty() {
                match parse_head(&mut self.buf)? {
                    Some((Parsed::Interim, rest)) => {
                        self.buf.extend_from_slice(&rest);
                        continue;
                    }
                    Some((Parsed::Final(head), rest)) => {
                        self.rest = rest;
                        return Poll::Ready(Ok(head));
                    }
                    None if self.buf.len() >= MAX_HEAD => {
                        return Poll::Ready(Err(UpstreamError::HeadTooLarge))
                    }
                    None => {}
                }
            }
            match self.poll_fill(cx, READ_SIZE) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(UpstreamError::Closed)),
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err.into())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// Reads what the socket has, `want` bytes at most (at least `READ_SIZE` of room),
    /// after what the buffer holds. Ready(0) is the end of the connection.
    fn poll_fill(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        let want = want.clamp(READ_SIZE, MAX_READ);
        if self.buf.capacity() - self.buf.len() < want {
            self.buf.reserve(want);
        }
        let spare = self.buf.spare_capacity_mut();
        let mut read = ReadBuf::uninit(spare);
        match Pin::new(&mut self.io).poll_read(cx, &mut read) {
            Poll::Ready(Ok(())) => {
                let n = read.filled().len();
                // SAFETY: the reader initialized the first `n` bytes of the spare
                // capacity it was given, and said so.
                unsafe { self.buf.set_len(self.buf.len() + n) };
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Why sending a request or reading its answer's head failed.
enum Failure {
    /// The client's body failed.
    Body(BoxError),
    Upstream(UpstreamError),
}

/// How an answer's body is delimited (RFC 9112, section 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked,
    /// Until the app closes the connection.
    Close,
    /// 101 Switching Protocols: the connection is the tunnel's from here on.
    Upgrade,
}

struct Head {
    parts: http::response::Parts,
    framing: Framing,
    keep_alive: bool,
}

enum Parsed {
    /// A 1xx answer other than 101: consumed, the final one follows.
    Interim,
    Final(Head),
}

/// Parses an answer's head from the front of `buf` once it is whole: the head, and
/// the bytes after it. The field values are slices of the bytes read, not copies.
fn parse_head(buf: &mut BytesMut) -> Result<Option<(Parsed, Bytes)>, UpstreamError> {
    if !ends_head(buf, 0) {
        return Ok(None);
    }
    let bytes = buf.split().freeze();
    let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut []);
    let status = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut parsed,
        &bytes,
        &mut headers,
    );
    let len = match status {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => {
            return Err(UpstreamError::Invalid("malformed head"));
        }
        Err(httparse::Error::TooManyHeaders) => return Err(UpstreamError::HeadTooLarge),
        Err(_) => return Err(UpstreamError::Invalid("malformed head")),
    };
    let rest = bytes.slice(len..);
    let code = parsed.code.unwrap_or(0);
    let status = StatusCode::from_u16(code).map_err(|_| UpstreamError::Invalid("bad status"))?;
    let http10 = parsed.version == Some(0);
    if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
        return Ok(Some((Parsed::Interim, rest)));
    }
    let mut map = HeaderMap::with_capacity(parsed.headers.len());
    // Which fields that decide the framing the head has, and the length: noted on the
    // way, rather than looked up in the map one by one.
    let (mut te, mut connection) = (false, false);
    let mut length = ContentLength::Absent;
    for field in parsed.headers.iter() {
        let name = HeaderName::from_bytes(field.name.as_bytes())
            .map_err(|_| UpstreamError::Invalid("bad field name"))?;
        // SAFETY: httparse lets through only the bytes a field value may hold (no
        // control byte but tab, no DEL), which are those `HeaderValue` requires.
        let value =
            unsafe { HeaderValue::from_maybe_shared_unchecked(bytes.slice_ref(field.value)) };
        if name == header::TRANSFER_ENCODING {
            te = true;
        } else if name == header::CONTENT_LENGTH {
            length.add(field.value);
        } else if name == header::CONNECTION {
            connection = true;
        }
        map.append(name, value);
    }
    let reason = parsed
        .reason
        .filter(|r| !r.is_empty() && Some(*r) != status.canonical_reason())
        .map(|r| bytes.slice_ref(r.as_bytes()));
    let closes = connection && has_token(&map, &header::CONNECTION, "close");
    let mut keep_alive = !http10 && !closes;
    let framing = if status == StatusCode::SWITCHING_PROTOCOLS {
        Framing::Upgrade
    } else if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        Framing::Length(0)
    } else if te {
        // With both framings the message is ambiguous: the chunked one wins, and the
        // connection that spoke that way is not used again.
        if map.remove(header::CONTENT_LENGTH).is_some() {
            keep_alive = false;
        }
        if last_coding_is_chunked(&map) {
            Framing::Chunked
        } else {
            keep_alive = false;
            Framing::Close
        }
    } else if let Some(length) = length.value()? {
        Framing::Length(length)
    } else {
        keep_alive = false;
        Framing::Close
    };
    // The client's hop speaks its own version: the answer is not marked HTTP/1.0.
    let (mut parts, ()) = Response::new(()).into_parts();
    parts.status = status;
    parts.headers = map;
    if let Some(reason) = reason {
        if let Ok(reason) = hyper::ext::ReasonPhrase::try_from(reason) {
            parts.extensions.insert(reason);
        }
    }
    let head = Head {
        parts,
        framing,
        keep_alive,
    };
    Ok(Some((Parsed::Final(head), rest)))
}

/// Whether a comma-separated field holds `token` (any case).
fn has_token(map: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    map.get_all(name).iter().any(|value| {
        value
            .to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// Whether the last coding of `Transfer-Encoding` is `chunked`.
fn last_coding_is_chunked(map: &HeaderMap) -> bool {
    map.get_all(header::TRANSFER_ENCODING)
        .iter()
        .next_back()
        .and_then(|value| value.to_str().ok())
        .and_then(|v| v.rsplit(',').next())
        .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"))
}

/// The answer's `Content-Length`, read field by field: the same number however often
/// it is repeated, or invalid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ContentLength {
    Absent,
    Is(u64),
    Invalid(&'static str),
}

impl ContentLength {
    /// Adds the value of one more `Content-Length` field.
    fn add(&mut self, value: &[u8]) {
        for part in value.split(|b| *b == b',') {
            let part = part.trim_ascii();
            let n = part.iter().try_fold(0u64, |n, &digit| {
                if !digit.is_ascii_digit() {
                    return None;
                }
                n.checked_mul(10)?.checked_add(u64::from(digit - b'0'))
            });
            *self = match (*self, n) {
                (ContentLength::Invalid(why), _) => ContentLength::Invalid(why),
                (_, None) => ContentLength::Invalid("bad Content-Length"),
                (_, Some(_)) if part.is_empty() => ContentLength::Invalid("bad Content-Length"),
                (ContentLength::Is(l), Some(n)) if l != n => {
                    ContentLength::Invalid("conflicting Content-Length")
                }
                (_, Some(n)) => ContentLength::Is(n),
            };
        }
    }

    /// The length, if the head gave one.
    fn value(self) -> Result<Option<u64>, UpstreamError> {
        match self {
            ContentLength::Absent => Ok(None),
            ContentLength::Is(n) => Ok(Some(n)),
            ContentLength::Invalid(why) => Err(UpstreamError::Invalid(why)),
        }
    }
}

/// Whether `buf` holds the empty line that ends a head (a bare LF ends lines too, as
/// httparse allows), looking from `from` on: bytes looked at before need no second
/// look, so a head that trickles in costs its length, not its length squared.
pub(crate) fn ends_head(buf: &[u8], from: usize) -> bool {
    let from = from.saturating_sub(2).min(buf.len());
    memchr::memchr_iter(b'\n', &buf[from..])
        .any(|at| matches!(&buf[from + at + 1..], [b'\n', ..] | [b'\r', b'\n', ..]))
}

/// A request as it goes to an app: its head, encoded once (a resend writes the same
/// bytes, see `retry`), and its body.
pub(crate) struct Outgoing {
    pub(crate) head: OutHead,
    pub(crate) body: RequestBody,
}

/// Whether a request of this method without a body must say so: one whose request
/// usually has a body (`POST`, `PUT`, ...) gets `Content-Length: 0`.
fn says_no_body(method: &Method) -> bool {
    !matches!(
        *method,
        Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS
    )
}

/// The start of a request's head as its app gets it, written by `h1` while it parsed
/// the client's head: the request line, then the client's fields that go on
/// (`headers::passes_as_written`) as the client wrote them; `OutHead::from_fields` ends
/// it. Only for a request without a body, that asks no upgrade, from a client that is
/// no trusted proxy. Its `Request` then has no fields of its own (an empty map): what
/// rolld must know of them is here. Building the map and encoding it again was about
/// 6% of the proxy's user-space work on a small request.
pub(crate) struct Fields {
    bytes: BytesMut,
    /// The value of the request's `Host` (for `X-Forwarded-Host`).
    pub(crate) host: Option<HeaderValue>,
    /// Whether the request has an `Idempotency-Key` (see `retry`).
    pub(crate) keyed: bool,
}

impl Fields {
    /// The request line of a request; `room`: the bytes its fields take at most.
    pub(crate) fn new(method: &Method, target: &[u8], room: usize) -> Self {
        let mut bytes =
            BytesMut::with_capacity(method.as_str().len() + target.len() + room + FIELDS_ROOM);
        bytes.put_slice(method.as_str().as_bytes());
        bytes.put_u8(b' ');
        bytes.put_slice(target);
        bytes.put_slice(b" HTTP/1.1\r\n");
        Fields {
            bytes,
            host: None,
            keyed: false,
        }
    }

    /// Adds a field as the client wrote it.
    pub(crate) fn push(&mut self, name: &[u8], value: &[u8]) {
        self.bytes.put_slice(name);
        self.bytes.put_slice(b": ");
        self.bytes.put_slice(value);
        self.bytes.put_slice(b"\r\n");
    }
}

/// Room for what `OutHead::from_fields` adds to a head without a long `Host`: the
/// forwarding fields (an IPv6 address twice) and `Content-Length: 0`.
const FIELDS_ROOM: usize = 192;

/// A request's head as an app gets it, with how its body is framed.
#[derive(Clone, Debug)]
pub(crate) struct OutHead {
    bytes: Bytes,
    /// A `HEAD` request: its answer has no body whatever its head says.
    no_body: bool,
    /// As the client's request was judged: an `Upgrade` field alone, or one offering
    /// only h2c, asks for none.
    asks_upgrade: bool,
    chunked: bool,
    /// The body's `Content-Length`.
    length: u64,
}

impl OutHead {
    /// The head of a request of these `parts` and forwarding fields, whose body `body`
    /// is (or one of the same framing: a body sent again); `upgrade`: whether it asks
    /// to switch protocols (see `headers::is_upgrade`).
    pub(crate) fn new(
        parts: &http::request::Parts,
        forwarding: Option<&Forwarding>,
        body: &RequestBody,
        upgrade: bool,
    ) -> Self {
        let mut head =
            BytesMut::with_capacity(head_capacity(parts) + forwarding.map_or(0, Forwarding::len));
        let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        head.put_slice(parts.method.as_str().as_bytes());
        head.put_u8(b' ');
        head.put_slice(target.as_bytes());
        head.put_slice(b" HTTP/1.1\r\n");
        let fields = parts
            .headers
            .iter()
            .filter(|(name, _)| forwarding.is_none_or(|f| f.keeps(name)))
            .chain(forwarding.into_iter().flat_map(Forwarding::fields));
        let mut had_length = false;
        for (name, value) in fields {
            if name == header::CONTENT_LENGTH {
                had_length = true;
                continue;
            }
            if name == header::TRANSFER_ENCODING {
                continue;
            }
            head.put_slice(name.as_str().as_bytes());
            head.put_slice(b": ");
            head.put_slice(value.as_bytes());
            head.put_slice(b"\r\n");
        }
        let mut chunked = false;
        let mut length = 0;
        match body.size_hint().exact() {
            Some(0) if body.is_end_stream() => {
                if says_no_body(&parts.method) || had_length {
                    head.put_slice(b"content-length: 0\r\n");
                }
            }
            Some(n) => {
                // Writing into a BytesMut cannot fail.
                let _ = write!(head, "content-length: {n}\r\n");
                length = n;
            }
            None => {
                head.put_slice(b"transfer-encoding: chunked\r\n");
                chunked = true;
            }
        }
        head.put_slice(b"\r\n");
        OutHead {
            bytes: head.freeze(),
            no_body: parts.method == Method::HEAD,
            asks_upgrade: upgrade,
            chunked,
            length,
        }
    }

    /// The head of a request without a body whose start `h1` wrote (see `Fields`),
    /// with these forwarding fields.
    pub(crate) fn from_fields(fields: Fields, forwarding: &Forwarding, method: &Method) -> Self {
        let mut head = fields.bytes;
        head.reserve(forwarding.len() + b"content-length: 0\r\n\r\n".len());
        for (name, value) in forwarding.fields() {
            head.put_slice(name.as_str().as_bytes());
            head.put_slice(b": ");
            head.put_slice(value.as_bytes());
            head.put_slice(b"\r\n");
        }
        if says_no_body(method) {
            head.put_slice(b"content-length: 0\r\n");
        }
        head.put_slice(b"\r\n");
        OutHead {
            bytes: head.freeze(),
            no_body: method == Method::HEAD,
            asks_upgrade: false,
            chunked: false,
            length: 0,
        }
    }

    /// The head as written.
    #[cfg(test)]
    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// A request being written: its head, then its body, framed.
struct Upload {
    /// The head, until written.
    head: Bytes,
    body: RequestBody,
    /// The body's end is queued.
    ended: bool,
    chunked: bool,
    /// Bytes the body still owes its `Content-Length`.
    owed: u64,
    out: VecDeque<Bytes>,
    /// Any byte of the request was written.
    written: bool,
}

impl Upload {
    fn new(head: &OutHead, body: RequestBody) -> Self {
        let ended = body.is_end_stream() && head.length == 0 && !head.chunked;
        Upload {
            head: head.bytes.clone(),
            body,
            ended,
            chunked: head.chunked,
            owed: head.length,
            out: VecDeque::new(),
            written: false,
        }
    }

    fn finished(&self) -> bool {
        self.ended && self.head.is_empty() && self.out.is_empty()
    }

    /// Stops sending: the connection failed under it.
    fn abandon(&mut self) {
        self.ended = true;
        self.head.clear();
        self.out.clear();
    }

    /// Writes what is queued, and takes the body's next frames, until all is sent or
    /// the socket or the body has nothing more for now.
    fn poll_send(
        &mut self,
        io: &mut Tracked<TcpStream>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), Failure>> {
        loop {
            // The head goes alone: the body is first polled once it is written, so that
            // a request of which no byte was written still has its whole body.
            while !self.head.is_empty() {
                let n = ready!(poll_write(io, cx, &[IoSlice::new(&self.head)]))?;
                self.written = true;
                self.head.advance(n);
            }
            while !self.out.is_empty() {
                let mut slices = [IoSlice::new(&[]); MAX_SLICES];
                let mut n = 0;
                for (slice, bytes) in slices.iter_mut().zip(self.out.iter()) {
                    *slice = IoSlice::new(bytes);
                    n += 1;
                }
                let written = ready!(poll_write(io, cx, &slices[..n]))?;
                self.written = true;
                self.advance(written);
            }
            if self.ended {
                return Poll::Ready(Ok(()));
            }
            if !self.chunked && self.owed == 0 && self.body.is_end_stream() {
                self.ended = true;
                continue;
            }
            match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => self.queue(data)?,
                    Err(frame) => {
                        if let (true, Ok(trailers)) = (self.chunked, frame.into_trailers()) {
                            self.queue_end(Some(&trailers));
                        }
                    }
                },
                Poll::Ready(Some(Err(err))) => return Poll::Ready(Err(Failure::Body(err))),
                Poll::Ready(None) => {
                    if self.owed > 0 {
                        return Poll::Ready(Err(Failure::Body(
                            "the request body ended before its Content-Length".into(),
                        )));
                    }
                    self.queue_end(None);
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// Queues one chunk of the body, framed.
    fn queue(&mut self, data: Bytes) -> Result<(), Failure> {
        if data.is_empty() {
            return Ok(());
        }
        if self.chunked {
            let mut size = BytesMut::with_capacity(20);
            // Writing into a BytesMut cannot fail.
            let _ = write!(size, "{:x}\r\n", data.len());
            self.out.push_back(size.freeze());
            self.out.push_back(data);
            self.out.push_back(Bytes::from_static(b"\r\n"));
            return Ok(());
        }
        let len = data.len() as u64;
        if len > self.owed {
            return Err(Failure::Body(
                "the request body is longer than its Content-Length".into(),
            ));
        }
        self.owed -= len;
        self.out.push_back(data);
        Ok(())
    }

    /// Queues the body's end (the last chunk and trailers, when chunked).
    fn queue_end(&mut self, trailers: Option<&HeaderMap>) {
        self.ended = true;
        if !self.chunked {
            return;
        }
        match trailers {
            None => self.out.push_back(Bytes::from_static(b"0\r\n\r\n")),
            Some(trailers) => {
                let mut end = BytesMut::from(&b"0\r\n"[..]);
                for (name, value) in trailers {
                    end.put_slice(name.as_str().as_bytes());
                    end.put_slice(b": ");
                    end.put_slice(value.as_bytes());
                    end.put_slice(b"\r\n");
                }
                end.put_slice(b"\r\n");
                self.out.push_back(end.freeze());
            }
        }
    }

    /// Drops what a write of the queued body took.
    fn advance(&mut self, mut written: usize) {
        while written > 0 {
            let Some(front) = self.out.front_mut() else {
                return;
            };
            if written >= front.len() {
                written -= front.len();
                self.out.pop_front();
            } else {
                front.advance(written);
                return;
            }
        }
    }
}

/// One write of `slices`: how many bytes the socket took, never none.
fn poll_write(
    io: &mut Tracked<TcpStream>,
    cx: &mut Context<'_>,
    slices: &[IoSlice<'_>],
) -> Poll<Result<usize, Failure>> {
    Poll::Ready(match ready!(Pin::new(io).poll_write_vectored(cx, slices)) {
        Ok(0) => Err(Failure::Upstream(UpstreamError::Io(
            io::ErrorKind::WriteZero.into(),
        ))),
        Ok(n) => Ok(n),
        Err(err) => Err(Failure::Upstream(err.into())),
    })
}

/// Room for a request's head, written once.
fn head_capacity(parts: &http::request::Parts) -> usize {
    let fields: usize = parts
        .headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    let target = parts.uri.path_and_query().map_or(1, |p| p.as_str().len());
    parts.method.as_str().len() + target + fields + 64
}

/// Where an answer's body stands.
#[derive(Debug)]
enum Decode {
    Length(u64),
    Chunked(Chunked),
    Close,
    Upgrade,
    Done,
}

/// Where a chunked body stands.
#[derive(Debug)]
enum Chunked {
    /// Before a chunk's size line.
    Size,
    /// Within a chunk: this many data bytes left.
    Data(u64),
    /// After a chunk's data, before its CRLF.
    DataEnd,
    /// After the last chunk: trailer fields (boxed once there is one), then an empty
    /// line.
    Trailers(Option<Box<HeaderMap>>),
}

/// What chunked framing gave.
enum Step {
    Data(Bytes),
    Trailers(HeaderMap),
    End,
    /// More must be read first.
    More,
}

/// An answer's body, read from the connection its head came on.
pub(crate) struct Answer {
    conn: Option<Box<Conn>>,
    state: Decode,
    keep_alive: bool,
    /// What is left to send of the request's body.
    upload: Option<Box<Upload>>,
    /// Data was handed on since the body last waited.
    handed: bool,
    /// A failure held back until the data before it has been handed on (see
    /// `poll_frame`).
    deferred: Option<UpstreamError>,
}

impl Answer {
    /// The connection, once the answer has been read whole and the request sent
    /// whole, when it can carry another request.
    pub(crate) fn take_conn(&mut self) -> Option<Box<Conn>> {
        if !matches!(self.state, Decode::Done) || !self.keep_alive || self.upload.is_some() {
            return None;
        }
        self.conn
            .take()
            .filter(|conn| conn.buf.is_empty() && conn.rest.is_empty())
    }

    /// The connection of a 101 answer, as the tunnel's: what the app sent after the
    /// head comes first.
    pub(crate) fn upgraded(mut self) -> Option<Upgraded> {
        if !matches!(self.state, Decode::Upgrade) {
            return None;
        }
        let mut conn = self.conn.take()?;
        let mut prefix = BytesMut::from(conn.rest);
        prefix.extend_from_slice(&conn.buf);
        conn.buf.clear();
        Some(Upgraded {
            prefix: prefix.freeze(),
            io: conn.io,
        })
    }

    fn fail(&mut self, err: UpstreamError) -> Poll<Option<Result<Frame<Bytes>, UpstreamError>>> {
        self.state = Decode::Done;
        self.keep_alive = false;
        self.conn = None;
        Poll::Ready(Some(Err(err)))
    }

    /// Decodes chunked framing from what the buffer holds.
    fn decode_chunked(conn: &mut Conn, state: &mut Chunked) -> Result<Step, UpstreamError> {
        loop {
            match state {
                Chunked::Size => {
                    let Some(line) = take_line(&mut conn.buf)? else {
                        return Ok(Step::More);
                    };
                    let size = chunk_size(&line)?;
                    *state = if size == 0 {
                        Chunked::Trailers(None)
                    } else {
                        Chunked::Data(size)
                    };
                }
                Chunked::Data(left) => {
                    if conn.buf.is_empty() {
                        return Ok(Step::More);
                    }
                    let n = (*left).min(conn.buf.len() as u64) as usize;
                    let data = conn.buf.split_to(n).freeze();
                    *left -= n as u64;
                    if *left == 0 {
                        *state = Chunked::DataEnd;
                    }
                    return Ok(Step::Data(data));
                }
                Chunked::DataEnd => {
                    let Some(line) = take_line(&mut conn.buf)? else {
                        return Ok(Step::More);
                    };
                    if !line.is_empty() {
                        return Err(UpstreamError::Invalid("chunk data longer than its size"));
                    }
                    *state = Chunked::Size;
                }
                Chunked::Trailers(fields) => {
                    let Some(line) = take_line(&mut conn.buf)? else {
                        return Ok(Step::More);
                    };
                    if line.is_empty() {
                        let fields = fields.take();
                        *state = Chunked::Size;
                        return Ok(match fields {
                            Some(fields) => Step::Trailers(*fields),
                            None => Step::End,
                        });
                    }
                    if fields.as_ref().is_some_and(|f| f.len() >= MAX_HEADERS) {
                        return Err(UpstreamError::HeadTooLarge);
                    }
                    // A field that is not one is dropped: trailers are metadata the
                    // answer is whole without.
                    if let Some((name, value)) = trailer_field(&line) {
                        fields.get_or_insert_default().append(name, value);
                    }
                }
            }
        }
    }
}

/// A trailer field from its line.
fn trailer_field(line: &Bytes) -> Option<(HeaderName, HeaderValue)> {
    let colon = memchr::memchr(b':', line)?;
    let name = HeaderName::from_bytes(&line[..colon]).ok()?;
    let value = line.slice(colon + 1..);
    let value = value.slice_ref(value.trim_ascii());
    Some((name, HeaderValue::from_maybe_shared(value).ok()?))
}

/// The longest line of chunked framing (a size with its extensions, a trailer field).
const MAX_LINE: usize = 8 * 1024;

/// Takes one CRLF-ended line off the front of `buf`, without its CRLF.
fn take_line(buf: &mut BytesMut) -> Result<Option<Bytes>, UpstreamError> {
    match memchr::memchr(b'\n', buf) {
        Some(end) => {
            if end == 0 || buf[end - 1] != b'\r' {
                return Err(UpstreamError::Invalid("chunked framing line without CRLF"));
            }
            let line = buf.split_to(end + 1).freeze();
            Ok(Some(line.slice(..end - 1)))
        }
        None if buf.len() > MAX_LINE => {
            Err(UpstreamError::Invalid("chunked framing line too long"))
        }
        None => Ok(None),
    }
}

/// A chunk's size, from its line (extensions after `;` are ignored).
fn chunk_size(line: &[u8]) -> Result<u64, UpstreamError> {
    let digits = line.split(|&b| b == b';').next().unwrap_or_default();
    let digits = digits.trim_ascii_end();
    if digits.is_empty() || digits.len() > 15 {
        return Err(UpstreamError::Invalid("bad chunk size"));
    }
    let mut size: u64 = 0;
    for &b in digits {
        let digit = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            b'A'..=b'F' => b - b'A' + 10,
            _ => return Err(UpstreamError::Invalid("bad chunk size")),
        };
        size = size * 16 + u64::from(digit);
    }
    Ok(size)
}

impl Body for Answer {
    type Data = Bytes;
    type Error = UpstreamError;

    /// A failure that comes right behind data (the app sent its last bytes and
    /// closed) is reported on the next poll, after the body has waited once: hyper
    /// drops what it has not written yet when a body fails, and the client is to get
    /// every byte that came before the break.
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamError>>> {
        let this = self.get_mut();
        if let Some(err) = this.deferred.take() {
            return Poll::Ready(Some(Err(err)));
        }
        match this.poll_decoded(cx) {
            Poll::Ready(Some(Err(err))) if this.handed => {
                this.handed = false;
                this.deferred = Some(err);
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Poll::Ready(Some(Ok(frame))) => {
                this.handed = true;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Pending => {
                this.handed = false;
                Poll::Pending
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, Decode::Done | Decode::Upgrade) && self.deferred.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            Decode::Done | Decode::Upgrade => SizeHint::with_exact(0),
            Decode::Length(left) => SizeHint::with_exact(left),
            Decode::Chunked(_) | Decode::Close => SizeHint::default(),
        }
    }
}

impl Answer {
    /// The body's next frame, as the framing gives it.
    fn poll_decoded(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamError>>> {
        let this = self;
        let Some(conn) = this.conn.as_mut() else {
            return Poll::Ready(None);
        };
        if let Some(upload) = this.upload.as_mut() {
            match upload.poll_send(&mut conn.io, cx) {
                Poll::Ready(Ok(())) => this.upload = None,
                Poll::Ready(Err(_)) => {
                    // The answer goes on; the connection is not used again.
                    this.upload = None;
                    this.keep_alive = false;
                }
                Poll::Pending => {}
            }
        }
        loop {
            match &mut this.state {
                Decode::Done | Decode::Upgrade => return Poll::Ready(None),
                Decode::Length(left) => {
                    if !conn.rest.is_empty() {
                        let n = (*left).min(conn.rest.len() as u64) as usize;
                        let data = conn.rest.split_to(n);
                        *left -= n as u64;
                        if *left == 0 {
                            this.state = Decode::Done;
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    if !conn.buf.is_empty() {
                        let n = (*left).min(conn.buf.len() as u64) as usize;
                        let data = conn.buf.split_to(n).freeze();
                        *left -= n as u64;
                        if *left == 0 {
                            this.state = Decode::Done;
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    let want = usize::try_from(*left).unwrap_or(MAX_READ);
                    match conn.poll_fill(cx, want) {
                        Poll::Ready(Ok(0)) => return this.fail(UpstreamError::Closed),
                        Poll::Ready(Ok(_)) => {}
                        Poll::Ready(Err(err)) => return this.fail(err.into()),
                        Poll::Pending => return Poll::Pending,
                    }
                }
                Decode::Chunked(state) => match Answer::decode_chunked(conn, state) {
                    Ok(Step::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(Step::Trailers(fields)) => {
                        this.state = Decode::Done;
                        return Poll::Ready(Some(Ok(Frame::trailers(fields))));
                    }
                    Ok(Step::End) => {
                        this.state = Decode::Done;
                        return Poll::Ready(None);
                    }
                    Ok(Step::More) => match conn.poll_fill(cx, READ_SIZE) {
                        Poll::Ready(Ok(0)) => return this.fail(UpstreamError::Closed),
                        Poll::Ready(Ok(_)) => {}
                        Poll::Ready(Err(err)) => return this.fail(err.into()),
                        Poll::Pending => return Poll::Pending,
                    },
                    Err(err) => return this.fail(err),
                },
                Decode::Close => {
                    if !conn.rest.is_empty() {
                        let data = std::mem::take(&mut conn.rest);
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    if !conn.buf.is_empty() {
                        let data = conn.buf.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    match conn.poll_fill(cx, READ_SIZE) {
                        Poll::Ready(Ok(0)) => {
                            this.state = Decode::Done;
                            return Poll::Ready(None);
                        }
                        Poll::Ready(Ok(_)) => {}
                        Poll::Ready(Err(err)) => return this.fail(err.into()),
                        Poll::Pending => return Poll::Pending,
                    }
                }
            }
        }
    }
}

/// An upstream connection after 101 Switching Protocols.
pub(crate) struct Upgraded {
    /// What the app sent after its head, read with it.
    prefix: Bytes,
    io: Tracked<TcpStream>,
}

impl AsyncRead for Upgraded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let bytes = self.prefix.split_to(n);
            buf.put_slice(&bytes);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Upgraded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    fn head(bytes: &[u8]) -> (Head, Bytes) {
        let mut buf = BytesMut::from(bytes);
        match parse_head(&mut buf) {
            Ok(Some((Parsed::Final(head), rest))) => (head, rest),
            Ok(Some((Parsed::Interim, _))) => panic!("interim"),
            Ok(None) => panic!("partial"),
            Err(err) => panic!("{err}"),
        }
    }

    #[test]
    fn a_field_value_with_a_control_byte_or_del_is_refused() {
        for bad in [&b"a\x01b"[..], b"a\x7fb", b"a\rb", b"\x00"] {
            let mut buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\nX-A: "[..]);
            buf.extend_from_slice(bad);
            buf.extend_from_slice(b"\r\nContent-Length: 0\r\n\r\n");
            assert!(
                matches!(parse_head(&mut buf), Err(UpstreamError::Invalid(_))),
                "{bad:?}"
            );
        }
        // Tab, and bytes beyond ASCII (obs-text), are a value's.
        let (head, _) = head(b"HTTP/1.1 200 OK\r\nX-A: a\tb \xe9\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(head.parts.headers["x-a"].as_bytes(), b"a\tb \xe9");
    }

    #[test]
    fn a_head_is_parsed_only_once_it_is_whole() {
        for partial in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r",
            b"HTTP/1.1 200 OK\r\n",
            b"HTTP/1.1 2",
        ] {
            let mut buf = BytesMut::from(partial);
            assert!(matches!(parse_head(&mut buf), Ok(None)), "{partial:?}");
            assert_eq!(&buf[..], partial, "a partial head stays in the buffer");
        }
        let (head, rest) = head(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokNEXT");
        assert_eq!(head.framing, Framing::Length(2));
        assert!(head.keep_alive);
        assert_eq!(&rest[..], b"okNEXT");
        // Lines ended by a bare LF end a head too.
        let (head, rest) = head_lf();
        assert_eq!(head.framing, Framing::Length(1));
        assert_eq!(&rest[..], b"x");
    }

    fn head_lf() -> (Head, Bytes) {
        head(b"HTTP/1.1 200 OK\nContent-Length: 1\n\nx")
    }

    #[test]
    fn the_framing_of_an_answer_follows_rfc_9112() {
        let cases: [(&[u8], Framing, bool); 11] = [
            (
                b"HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\nContent-Length: 0\r\n\r\n",
                Framing::Length(0),
                false,
            ),
            (
                b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\n",
                Framing::Length(1),
                true,
            ),
            (
                b"HTTP/1.1 204 No Content\r\nContent-Length: 9\r\n\r\n",
                Framing::Length(0),
                true,
            ),
            (
                b"HTTP/1.1 304 Not Modified\r\n\r\n",
                Framing::Length(0),
                true,
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                Framing::Chunked,
                true,
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, CHUNKED\r\n\r\n",
                Framing::Chunked,
                true,
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
                Framing::Close,
                false,
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
                Framing::Chunked,
                false,
            ),
            (b"HTTP/1.1 200 OK\r\n\r\n", Framing::Close, false),
            (
                b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
                Framing::Upgrade,
                true,
            ),
            (
                b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\n",
                Framing::Length(3),
                false,
            ),
        ];
        for (bytes, framing, keep_alive) in cases {
            let (head, _) = head(bytes);
            let shown = String::from_utf8_lossy(bytes);
            assert_eq!(head.framing, framing, "{shown}");
            assert_eq!(head.keep_alive, keep_alive, "{shown}");
        }
        let (head, _) =
            head(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert!(
            !head.parts.headers.contains_key(header::CONTENT_LENGTH),
            "beside chunked framing, a length is dropped"
        );
    }

    #[test]
    fn interim_answers_are_consumed_and_the_rest_kept() {
        let mut buf = BytesMut::from(&b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n"[..]);
        match parse_head(&mut buf) {
            Ok(Some((Parsed::Interim, rest))) => assert_eq!(&rest[..], b"HTTP/1.1 200 OK\r\n"),
            _ => panic!("not an interim answer"),
        }
    }

    #[test]
    fn a_content_length_is_digits_and_one_number() {
        let length = |values: &[&str]| {
            let mut length = ContentLength::Absent;
            for v in values {
                length.add(v.as_bytes());
            }
            length.value().ok().flatten()
        };
        assert_eq!(length(&["0"]), Some(0));
        assert_eq!(length(&["42"]), Some(42));
        assert_eq!(length(&["42", "42"]), Some(42));
        assert_eq!(length(&["42, 42"]), Some(42));
        assert_eq!(length(&[" 7 ,7"]), Some(7));
        assert_eq!(length(&["18446744073709551615"]), Some(u64::MAX));
        for bad in [
            &["4 2"][..],
            &["+4"],
            &["-1"],
            &["0x10"],
            &[""],
            &["1,"],
            &["1", "2"],
            &["99999999999999999999"],
        ] {
            assert_eq!(length(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_chunk_size_is_hex_with_extensions_ignored() {
        assert_eq!(chunk_size(b"0").ok(), Some(0));
        assert_eq!(chunk_size(b"1a").ok(), Some(26));
        assert_eq!(chunk_size(b"FF;name=\"x;y\"").ok(), Some(255));
        assert_eq!(chunk_size(b"10 ").ok(), Some(16));
        assert_eq!(
            chunk_size(b"fffffffffffffff").ok(),
            Some(0xfff_ffff_ffff_ffff)
        );
        for bad in [
            &b""[..],
            b";x",
            b"g",
            b"-1",
            b" 1",
            b"1 2",
            b"1000000000000000",
        ] {
            assert!(
                chunk_size(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn chunked_framing_lines_end_with_crlf() {
        let mut buf = BytesMut::from(&b"abc\r\nrest"[..]);
        assert_eq!(
            take_line(&mut buf).ok().flatten().as_deref(),
            Some(&b"abc"[..])
        );
        assert_eq!(&buf[..], b"rest");
        assert!(matches!(take_line(&mut buf), Ok(None)));
        let mut bare = BytesMut::from(&b"abc\nrest"[..]);
        assert!(take_line(&mut bare).is_err());
        let mut long = BytesMut::from(&vec![b'1'; MAX_LINE + 1][..]);
        assert!(take_line(&mut long).is_err());
    }

    /// A scripted app on a real socket: answers its first connection with `answer`,
    /// then closes it when `close`, else waits for the other end to close.
    async fn app(answer: &'static [u8], close: bool) -> std::net::SocketAddr {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            if let Ok((mut stream, _)) = listener.accept().await {
                let _ = stream.write_all(answer).await;
                if close {
                    return;
                }
                let mut sink = [0u8; 1024];
                while let Ok(1..) = tokio::io::AsyncReadExt::read(&mut stream, &mut sink).await {}
            }
        });
        addr
    }

    async fn answer(addr: std::net::SocketAddr) -> Answer {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (parts, body) = Request::new(RequestBody::empty()).into_parts();
        let head = OutHead::new(&parts, None, &body, false);
        match Conn::new(stream).send(Outgoing { head, body }).await {
            Ok(response) => response.into_body(),
            Err(_) => panic!("the exchange failed"),
        }
    }

    #[tokio::test]
    async fn a_chunked_body_gives_its_data_then_its_trailers_then_its_connection() {
        use http_body_util::BodyExt;
        let addr = app(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
            3\r\nabc\r\n2\r\nde\r\n0\r\nX-Sum: 5\r\n\r\n",
            false,
        )
        .await;
        let mut body = answer(addr).await;
        let mut data = Vec::new();
        let mut trailers = None;
        while let Some(frame) = body.frame().await {
            let frame = frame.expect("frame");
            match frame.into_data() {
                Ok(chunk) => data.extend_from_slice(&chunk),
                Err(frame) => trailers = frame.into_trailers().ok(),
            }
        }
        assert_eq!(data, b"abcde");
        let trailers = trailers.expect("trailers");
        assert_eq!(
            trailers.get("x-sum").map(HeaderValue::as_bytes),
            Some(&b"5"[..])
        );
        assert!(body.is_end_stream());
        assert!(
            body.take_conn().is_some(),
            "a whole answer gives its connection back"
        );
    }

    #[tokio::test]
    async fn a_body_cut_short_fails_after_its_data_and_gives_no_connection_back() {
        use http_body_util::BodyExt;
        let addr = app(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", true).await;
        let mut body = answer(addr).await;
        assert_eq!(body.size_hint().exact(), Some(10));
        let first = body.frame().await.expect("a frame").expect("data");
        assert_eq!(first.into_data().ok().as_deref(), Some(&b"abc"[..]));
        assert!(!body.is_end_stream());
        assert!(body.take_conn().is_none(), "not before the answer is whole");
        let next = tokio::time::timeout(std::time::Duration::from_secs(20), body.frame()).await;
        assert!(
            matches!(next, Ok(Some(Err(_)))),
            "the break is reported after the data"
        );
        assert!(body.take_conn().is_none(), "never after it broke off");
    }

    #[test]
    fn a_trailer_field_is_a_name_a_colon_and_a_value() {
        let field = trailer_field(&Bytes::from_static(b"X-Sum:  42 ")).expect("field");
        assert_eq!(field.0, "x-sum");
        assert_eq!(field.1, "42");
        assert!(trailer_field(&Bytes::from_static(b"no colon")).is_none());
        assert!(trailer_field(&Bytes::from_static(b"bad name: v")).is_none());
    }
}
