//! rolld's own HTTP/1 server, for the request most clients send: a head with no body
//! (`GET`, `HEAD`, `DELETE`, ... with neither `Content-Length` nor `Transfer-Encoding`),
//! no upgrade, no `Expect`, no `TE`, over HTTP/1.1.
//!
//! hyper's general server spent about 10,000 instructions on such a request, 40% of
//! the proxy's (its dispatcher, a body channel, a read buffer it sizes twice, the
//! keep-alive reads). Here a request is read into one buffer the connection keeps
//! while busy, parsed in place, and its answer written with one vectored write where
//! it fits.
//! Every other head, and anything this server would have to judge (a malformed head,
//! one too large, a body to read), goes to hyper whole, as unread bytes, and hyper
//! serves that connection as before until it goes idle (see `server`). What the two
//! servers do alike: keep-alive per `Connection`, pipelining, `Date`, the framing of
//! the answer, a client that goes away cancelling its request, the client timeouts of
//! `activity`, and a graceful stop that answers the request in progress with
//! `Connection: close`.

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::Poll;
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, StatusCode, Uri};
use hyper::body::{Body, SizeHint};
use hyper::rt::Write;
use tokio::net::TcpStream;
use tracing::debug;

use crate::activity::ClientIo;
use crate::body::{ClientBody, ResponseBody};
use crate::exchange::{ends_head, Fields};
use crate::forward::{Client, Proxy};
use crate::headers;

/// The fields a head may have for this server to take it; a head with more goes to
/// hyper.
const MAX_FIELDS: usize = 64;

/// The room a read is given.
const READ_SIZE: usize = 4096;

/// What `take_request` found in the bytes read so far.
// Returned once a request and taken apart at once: boxing the request would cost an
// allocation for nothing.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Taken {
    /// The head is not complete yet.
    Partial,
    /// A head for hyper: the bytes are left as they were.
    Other,
    /// A request this server serves (its head taken from the buffer), whether its
    /// client asked to close the connection after it, and its fields as the app gets
    /// them when they were written as the head was parsed (then the request's own map
    /// is empty).
    Request(Request<ClientBody>, bool, Option<Fields>),
}

/// Takes the request head at the start of `buf` if it is one this server serves.
/// `max_head` bounds a head: a longer one goes to hyper, which answers it. With
/// `as_written` (a client that is no trusted proxy, whose forwarding fields rolld
/// replaces), the fields are written for the app at once (see `exchange::Fields`);
/// else they go into the request's map.
pub(crate) fn take_request(buf: &mut BytesMut, max_head: usize, as_written: bool) -> Taken {
    let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_FIELDS];
    let mut parsed = httparse::Request::new(&mut []);
    let len = match parsed.parse_with_uninit_headers(buf, &mut fields) {
        Ok(httparse::Status::Complete(len)) if len <= max_head => len,
        Ok(httparse::Status::Partial) if buf.len() < max_head => return Taken::Partial,
        // Malformed, too many fields, too long: hyper answers those.
        _ => return Taken::Other,
    };
    if parsed.version != Some(1) {
        return Taken::Other;
    }
    let (Some(method), Some(target)) = (parsed.method, parsed.path) else {
        return Taken::Other;
    };
    // Origin form only: absolute form, `*` and CONNECT's authority go to hyper.
    if !target.starts_with('/') {
        return Taken::Other;
    }
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Taken::Other;
    };
    let base = buf.as_ptr() as usize;
    let at = |s: &[u8]| (s.as_ptr() as usize - base, s.len());
    let mut written = as_written.then(|| Fields::new(&method, target.as_bytes(), len));
    let target = at(target.as_bytes());
    // Where each field is, for the map: only when the fields are not written at once.
    let mut spans = Vec::new();
    let mut host = None;
    let mut close = false;
    for field in parsed.headers.iter() {
        let name = field.name.as_bytes();
        let refused: &[u8] = match name.len() {
            2 => b"te",
            6 => b"expect",
            7 => b"upgrade",
            14 => b"content-length",
            17 => b"transfer-encoding",
            10 if name.eq_ignore_ascii_case(b"connection") => {
                match closes(field.value) {
                    Some(asked) => close |= asked,
                    None => return Taken::Other,
                }
                b""
            }
            _ => b"",
        };
        if !refused.is_empty() && name.eq_ignore_ascii_case(refused) {
            return Taken::Other;
        }
        let Some(fields) = written.as_mut() else {
            spans.push((at(name).0, name.len(), at(field.value).0, field.value.len()));
            continue;
        };
        if name.len() == 4 && name.eq_ignore_ascii_case(b"host") {
            if host.is_some() {
                // Which one routes? The map's path refuses the request.
                return Taken::Other;
            }
            host = Some(at(field.value));
        } else if name.len() == 15 && name.eq_ignore_ascii_case(b"idempotency-key") {
            fields.keyed = true;
        }
        if headers::passes_as_written(name) {
            fields.push(name, field.value);
        }
    }
    let head = buf.split_to(len).freeze();
    let built = match written {
        Some(mut fields) => {
            // SAFETY: as in `request`.
            fields.host = host.map(|(value_at, value_len)| unsafe {
                HeaderValue::from_maybe_shared_unchecked(head.slice(value_at..value_at + value_len))
            });
            request(&head, method, target, &[])
                // The app gets the target as the map's path sends it (a URI that is not
                // the target as written, a fragment dropped, goes that way).
                .filter(|req| {
                    req.uri().path_and_query().map(|p| p.as_str().len()) == Some(target.1)
                })
                .map(|req| (req, Some(fields)))
        }
        None => request(&head, method, target, &spans).map(|req| (req, None)),
    };
    match built {
        Some((req, fields)) => Taken::Request(req, close, fields),
        None => {
            // Put the head back for hyper, which answers it.
            let mut whole = BytesMut::with_capacity(head.len() + buf.len());
            whole.extend_from_slice(&head);
            whole.extend_from_slice(buf);
            *buf = whole;
            Taken::Other
        }
    }
}

/// Whether a `Connection` value asks to close: `None` for a token other than `close`
/// and `keep-alive` (a hop-by-hop field or an upgrade, which hyper handles).
fn closes(value: &[u8]) -> Option<bool> {
    let mut close = false;
    for token in value.split(|&b| b == b',') {
        let token = token.trim_ascii();
        if token.eq_ignore_ascii_case(b"close") {
            close = true;
        } else if !token.eq_ignore_ascii_case(b"keep-alive") && !token.is_empty() {
            return None;
        }
    }
    Some(close)
}

/// The request of a parsed head; `None` if a part of it is no valid URI or field.
fn request(
    head: &Bytes,
    method: Method,
    (target_at, target_len): (usize, usize),
    spans: &[(usize, usize, usize, usize)],
) -> Option<Request<ClientBody>> {
    let uri = Uri::from_maybe_shared(head.slice(target_at..target_at + target_len)).ok()?;
    let mut headers = HeaderMap::with_capacity(spans.len());
    for &(name_at, name_len, value_at, value_len) in spans {
        let name = HeaderName::from_bytes(&head[name_at..name_at + name_len]).ok()?;
        // SAFETY: httparse lets through only the bytes a field value may hold (no
        // control byte but tab, no DEL), which are those `HeaderValue` requires.
        let value = unsafe {
            HeaderValue::from_maybe_shared_unchecked(head.slice(value_at..value_at + value_len))
        };
        headers.append(name, value);
    }
    let mut req = Request::new(ClientBody::Empty);
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    Some(req)
}

thread_local! {
    /// Today's `Date` value, refreshed once a second by the worker (see `refresh_date`).
    static DATE: RefCell<(u64, [u8; 29])> = const { RefCell::new((0, [0; 29])) };
}

/// Refreshes this thread's `Date` value; each proxy worker calls it once a second.
pub(crate) fn refresh_date() {
    let now = SystemTime::now();
    let second = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with(|date| {
        let mut date = date.borrow_mut();
        if date.0 != second {
            let text = httpdate::fmt_http_date(now);
            if text.len() == 29 {
                date.1.copy_from_slice(text.as_bytes());
                date.0 = second;
            }
        }
    });
}

fn put_date(out: &mut BytesMut) {
    DATE.with(|date| {
        if date.borrow().0 == 0 {
            refresh_date();
        }
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(&date.borrow().1);
        out.extend_from_slice(b"\r\n");
    });
}

/// How an answer's body goes on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    /// No body: a `HEAD` request's answer, 1xx, 204 and 304.
    None,
    /// `Content-Length`: exactly this many bytes.
    Length(u64),
    Chunked,
}

/// Writes the head of an answer into `out` and says how its body is framed (the
/// answer's own `Content-Length` if it has one, else its body's exact size, else
/// chunked) and whether the connection closes after it (`close`, or the answer says
/// so). `Date` is added if the answer has none, `Connection: close` when it closes and
/// does not say so. One pass over the answer's fields.
fn encode_head(
    out: &mut BytesMut,
    parts: &http::response::Parts,
    head_request: bool,
    close: bool,
    hint: &SizeHint,
) -> (Framing, bool) {
    let status = parts.status;
    let bodiless = head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.extend_from_slice(b" ");
    match parts.extensions.get::<hyper::ext::ReasonPhrase>() {
        Some(reason) => out.extend_from_slice(reason.as_bytes()),
        None => out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes()),
    }
    out.extend_from_slice(b"\r\n");
    let mut dated = false;
    let mut says_close = false;
    let mut length = None;
    for (name, value) in parts.headers.iter() {
        if name == header::TRANSFER_ENCODING {
            // Hop-by-hop: the framing of this hop is rolld's to choose.
            continue;
        } else if name == header::CONTENT_LENGTH && !bodiless {
            // The first length that is a number frames the body; any other is
            // dropped, and a body without one is framed by its own size.
            let parsed = std::str::from_utf8(value.as_bytes())
                .ok()
                .and_then(|v| v.parse::<u64>().ok());
            if length.is_some() || parsed.is_none() {
                continue;
            }
            length = parsed;
        } else if name == header::DATE {
            dated = true;
        } else if name == header::CONNECTION {
            says_close |= closes(value.as_bytes()).unwrap_or(false);
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !dated {
        put_date(out);
    }
    let framing = match length {
        _ if bodiless => Framing::None,
        Some(length) => Framing::Length(length),
        None => match hint.exact() {
            Some(length) => {
                out.extend_from_slice(b"content-length: ");
                out.extend_from_slice(length.to_string().as_bytes());
                out.extend_from_slice(b"\r\n");
                Framing::Length(length)
            }
            None => {
                out.extend_from_slice(b"transfer-encoding: chunked\r\n");
                Framing::Chunked
            }
        },
    };
    if close && !says_close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    (framing, close || says_close)
}

/// Writes `bufs` whole, in order, with as few writes as the socket allows.
async fn write_all(io: &mut ClientIo<TcpStream>, bufs: &mut [&[u8]]) -> io::Result<()> {
    let mut first = 0;
    poll_fn(|cx| loop {
        while first < bufs.len() && bufs[first].is_empty() {
            first += 1;
        }
        if first == bufs.len() {
            return Poll::Ready(Ok(()));
        }
        let mut slices = [IoSlice::new(&[]); 4];
        let count = (bufs.len() - first).min(slices.len());
        for (slice, buf) in slices.iter_mut().zip(&bufs[first..first + count]) {
            *slice = IoSlice::new(buf);
        }
        match Pin::new(&mut *io).poll_write_vectored(cx, &slices[..count]) {
            Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            Poll::Ready(Ok(mut n)) => {
                while n > 0 {
                    let take = n.min(bufs[first].len());
                    bufs[first] = &bufs[first][take..];
                    n -= take;
                    if bufs[first].is_empty() {
                        first += 1;
                    }
                }
            }
            Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
            Poll::Pending => return Poll::Pending,
        }
    })
    .await
}

/// Why a body could not be written whole.
fn broken(what: &str) -> io::Error {
    io::Error::other(what.to_string())
}

/// Writes an answer: its head, then its body as `framing` says, each frame as it
/// comes. A small answer whose body is already here goes out in one write.
async fn write_answer(
    io: &mut ClientIo<TcpStream>,
    head: &[u8],
    mut body: ResponseBody,
    framing: Framing,
) -> io::Result<()> {
    if framing == Framing::None {
        return write_all(io, &mut [head]).await;
    }
    let mut head = Some(head);
    let mut left = match framing {
        Framing::Length(length) => length,
        _ => u64::MAX,
    };
    loop {
        let frame = match head {
            // The head waits for the body's first frame only if it is already here.
            Some(h) => match poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await {
                Poll::Ready(frame) => frame,
                Poll::Pending => {
                    write_all(io, &mut [h]).await?;
                    head = None;
                    continue;
                }
            },
            None => poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await,
        };
        let data = match frame {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                // Trailers: sent only to clients that ask for them, which hyper serves.
                Err(_) => continue,
            },
            Some(Err(err)) => return Err(broken(&format!("the answer's body failed: {err}"))),
            None => {
                let end: &[u8] = match framing {
                    Framing::Chunked => b"0\r\n\r\n",
                    _ if left > 0 => {
                        return Err(broken("the answer's body ended before its length"))
                    }
                    _ => b"",
                };
                return write_all(io, &mut [head.unwrap_or_default(), end]).await;
            }
        };
        if data.is_empty() {
            continue;
        }
        let ends = body.is_end_stream();
        match framing {
            Framing::Length(_) => {
                if data.len() as u64 > left {
                    return Err(broken("the answer's body is longer than its length"));
                }
                left -= data.len() as u64;
                write_all(io, &mut [head.unwrap_or_default(), &data]).await?;
                if ends && left > 0 {
                    return Err(broken("the answer's body ended before its length"));
                }
            }
            _ => {
                let size = format!("{:x}\r\n", data.len());
                let end: &[u8] = if ends { b"\r\n0\r\n\r\n" } else { b"\r\n" };
                write_all(
                    io,
                    &mut [head.unwrap_or_default(), size.as_bytes(), &data, end],
                )
                .await?;
            }
        }
        head = None;
        if ends {
            return Ok(());
        }
    }
}

/// How a connection left this server.
pub(crate) enum Left {
    /// The connection is done: closed, failed or told to stop.
    Closed,
    /// A head for hyper, handed back to the connection's IO as unread bytes.
    ToHyper,
    /// The connection stayed idle a while: serve it again once the client sends more.
    Idle,
}

/// Serves requests on a plain HTTP/1 connection whose client has sent something, for
/// as long as they are requests this server takes (see the module docs).
pub(crate) async fn serve<S: Future<Output = Duration>>(
    io: &mut ClientIo<TcpStream>,
    client: &Client,
    proxy: &Proxy,
    mut stop: Pin<&mut S>,
) -> Left {
    let max_head = proxy.config().max_header_size.max(1024);
    let peer = client.addr;
    let mut buf = BytesMut::new();
    let mut stopping = false;
    loop {
        // A head: read until it is whole, or until it is clearly one for hyper. It is
        // parsed once its end is here (or it is too long to be one).
        let mut seen = 0;
        let (req, asked_close, fields) = loop {
            let whole = ends_head(&buf, seen) || buf.len() >= max_head;
            seen = buf.len();
            match if whole {
                take_request(&mut buf, max_head, !client.trusted())
            } else {
                Taken::Partial
            } {
                Taken::Partial => {}
                Taken::Other => {
                    io.unread(buf.split().freeze());
                    return Left::ToHyper;
                }
                Taken::Request(req, close, fields) => break (req, close, fields),
            }
            if buf.capacity() - buf.len() < READ_SIZE / 4 {
                buf.reserve(READ_SIZE);
            }
            let read = poll_fn(|cx| {
                if !stopping && stop.as_mut().poll(cx).is_ready() {
                    stopping = true;
                }
                io.poll_read_into(cx, &mut buf)
            });
            match read.await {
                Ok(0) => return Left::Closed,
                Ok(_) => {}
                Err(err) => {
                    debug!(client = %peer, error = %err, "client connection ended");
                    return Left::Closed;
                }
            }
            if stopping && buf.is_empty() {
                return Left::Closed;
            }
        };

        // The answer, watching the client meanwhile: one that goes away cancels its
        // request; what it sends next (a pipelined request) waits in the buffer.
        let head_request = req.method() == Method::HEAD;
        let busy = client.begin(false);
        // In place: this future is boxed by the connection and dropped when it idles,
        // so an idle connection holds no room for a request's state as it is; a box of
        // its own would cost each request an allocation and a copy of its 3.7 KB.
        let mut handling = std::pin::pin!(proxy.handle(req, fields, client, busy));
        if buf.capacity() - buf.len() < READ_SIZE / 4 {
            buf.reserve(READ_SIZE);
        }
        let answered = poll_fn(|cx| {
            if let Poll::Ready(response) = handling.as_mut().poll(cx) {
                return Poll::Ready(Some(response));
            }
            if !stopping && stop.as_mut().poll(cx).is_ready() {
                stopping = true;
            }
            // Only while nothing of a next request is here, as hyper does: a client
            // that pipelined one and then closed its side still gets this answer.
            if buf.is_empty() {
                match io.poll_read_into(cx, &mut buf) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(None),
                    Poll::Ready(Ok(_)) | Poll::Pending => {}
                }
            }
            Poll::Pending
        })
        .await;
        let Some(response) = answered else {
            debug!(client = %peer, "client went away before its answer; request cancelled");
            return Left::Closed;
        };
        let (parts, body) = response.into_parts();
        let mut head = BytesMut::with_capacity(256);
        let hint = body.size_hint();
        let (framing, close) = encode_head(
            &mut head,
            &parts,
            head_request,
            asked_close || stopping,
            &hint,
        );
        // The answer's fields share the bytes of its upstream connection's buffer: they
        // must not stay with this connection while it idles.
        drop(parts);
        let written = write_answer(io, &head, body, framing).await;
        drop(head);
        if let Err(err) = written {
            debug!(client = %peer, error = %err, "client connection ended");
            return Left::Closed;
        }
        if close {
            // The caller drops the socket at once: its close sends what is queued,
            // then the FIN, as a shutdown first would, one system call fewer.
            return Left::Closed;
        }

        // Between requests.
        if !buf.is_empty() {
            continue;
        }
        let waited = tokio::select! {
            biased;
            _ = stop.as_mut() => return Left::Closed,
            ready = io.ready_or_shed() => ready,
        };
        match waited {
            Ok(true) => continue,
            Ok(false) => {}
            Err(err) => {
                debug!(client = %peer, error = %err, "client connection ended");
                return Left::Closed;
            }
        }
        // Idle a while: the buffer (and this future, which the caller boxes) goes back;
        // the caller waits for the next bytes with neither.
        return Left::Idle;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body::RequestBody;
    use crate::exchange::OutHead;
    use crate::headers::Forwarding;

    /// Takes a head with its fields into the request's map.
    fn take(bytes: &[u8]) -> (Taken, BytesMut) {
        take_as(bytes, false)
    }

    fn take_as(bytes: &[u8], as_written: bool) -> (Taken, BytesMut) {
        let mut buf = BytesMut::from(bytes);
        let taken = take_request(&mut buf, 1024, as_written);
        (taken, buf)
    }

    /// The head is left whole, for hyper, whichever way its fields would be taken.
    fn left_to_hyper(bytes: &[u8]) {
        for as_written in [false, true] {
            let (taken, buf) = take_as(bytes, as_written);
            assert!(
                matches!(taken, Taken::Other),
                "{:?} ({as_written})",
                String::from_utf8_lossy(bytes)
            );
            assert_eq!(&buf[..], bytes, "the bytes are left as they were");
        }
    }

    /// The head the app gets for a request taken with its fields written at once, from
    /// a client at 10.0.0.1.
    fn written_head(bytes: &[u8]) -> (String, bool) {
        let (Taken::Request(req, _, Some(fields)), _) = take_as(bytes, true) else {
            panic!("not taken with its fields written")
        };
        assert!(
            req.headers().is_empty(),
            "the request's own map stays empty"
        );
        let ip = HeaderValue::from_static("10.0.0.1");
        let forwarding = Forwarding::untrusted(fields.host.clone(), &ip, false);
        let keyed = fields.keyed;
        let head = OutHead::from_fields(fields, &forwarding, req.method());
        (String::from_utf8_lossy(head.as_bytes()).into_owned(), keyed)
    }

    /// The head the app gets for the same request with its fields in the request's
    /// map, as `forward` makes it, from the same client.
    fn mapped_head(bytes: &[u8]) -> (String, bool) {
        let (Taken::Request(req, _, None), _) = take_as(bytes, false) else {
            panic!("not taken into a map")
        };
        let (mut parts, _) = req.into_parts();
        let ip = HeaderValue::from_static("10.0.0.1");
        let forwarding = headers::for_app(&mut parts, false, (&ip, false, false), &|_| false);
        let keyed = parts.headers.contains_key(&crate::retry::IDEMPOTENCY_KEY);
        let head = OutHead::new(&parts, Some(&forwarding), &RequestBody::empty(), false);
        (String::from_utf8_lossy(head.as_bytes()).into_owned(), keyed)
    }

    /// A head's request line, and its fields with their names in lower case, sorted.
    fn normalized(head: &str) -> (String, Vec<(String, String)>) {
        let mut lines = head.split("\r\n");
        let first = lines.next().unwrap_or_default().to_string();
        let mut fields: Vec<_> = lines
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (name, value) = l.split_once(": ").expect("a field");
                (name.to_ascii_lowercase(), value.to_string())
            })
            .collect();
        fields.sort();
        (first, fields)
    }

    #[test]
    fn fields_written_at_once_leave_behind_those_of_the_hop_and_the_forwarding_ones() {
        let (head, keyed) = written_head(
            b"DELETE /a?b=1 HTTP/1.1\r\nHost: example.test\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nX-Forwarded-For: 6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\nx-forwarded-proto: https\r\nX-Forwarded-Host: evil\r\nProxy: http://evil\r\nProxy-Connection: close\r\nTrailer: x\r\nProxy-Authenticate: x\r\nIdempotency-Key: k\r\nAccept:  */* \r\nX-Forwarded: kept\r\n\r\n",
        );
        assert_eq!(
            head,
            "DELETE /a?b=1 HTTP/1.1\r\nHost: example.test\r\nIdempotency-Key: k\r\nAccept: */*\r\nX-Forwarded: kept\r\nx-forwarded-for: 10.0.0.1\r\nx-real-ip: 10.0.0.1\r\nx-forwarded-proto: http\r\nx-forwarded-host: example.test\r\n\r\n"
        );
        assert!(keyed);
        // A method whose request usually has a body says it has none; a bare LF ends a
        // line the app gets with CRLF.
        let (head, keyed) = written_head(b"POST /p HTTP/1.1\nhost: h\n\n");
        assert_eq!(
            head,
            "POST /p HTTP/1.1\r\nhost: h\r\nx-forwarded-for: 10.0.0.1\r\nx-real-ip: 10.0.0.1\r\nx-forwarded-proto: http\r\nx-forwarded-host: h\r\ncontent-length: 0\r\n\r\n"
        );
        assert!(!keyed);
        // Which of two hosts routes is for the map's path to refuse (see `forward`).
        let two_hosts = b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n";
        let (taken, buf) = take_as(two_hosts, true);
        assert!(matches!(taken, Taken::Other));
        assert_eq!(&buf[..], two_hosts);
        assert!(matches!(take(two_hosts).0, Taken::Request(..)));
        // A target the URI does not keep as written (a fragment) goes the map's way,
        // which sends the URI's.
        let fragment = b"GET /a?b#c HTTP/1.1\r\nHost: h\r\n\r\n";
        assert!(matches!(take_as(fragment, true).0, Taken::Other));
        assert!(mapped_head(fragment).0.starts_with("GET /a?b HTTP/1.1\r\n"));
    }

    mod written_as_mapped {
        use super::*;
        use proptest::prelude::*;

        /// Names of every kind: kept, of the hop, rolld's forwarding ones, refused here,
        /// noted, in any case; and others.
        fn name() -> impl Strategy<Value = String> {
            let known = prop::sample::select(vec![
                "Host",
                "Connection",
                "Keep-Alive",
                "Proxy-Connection",
                "Proxy",
                "Trailer",
                "Proxy-Authenticate",
                "X-Forwarded-For",
                "X-Real-IP",
                "X-Forwarded-Proto",
                "X-Forwarded-Host",
                "Idempotency-Key",
                "TE",
                "Upgrade",
                "Expect",
                "Content-Length",
                "Transfer-Encoding",
                "Accept",
                "User-Agent",
                "Cookie",
                "X-Forwarded",
                "Forwarded",
                "Date",
                "Via",
            ]);
            prop_oneof![
                (known, any::<bool>()).prop_map(|(name, upper)| if upper {
                    name.to_ascii_uppercase()
                } else {
                    name.to_ascii_lowercase()
                }),
                "[A-Za-z][A-Za-z0-9!#$%&'*+.^_`|~-]{0,20}",
            ]
        }

        fn value(name: &str) -> BoxedStrategy<String> {
            if name.eq_ignore_ascii_case("connection") {
                prop::sample::select(vec!["close", "keep-alive", "Keep-Alive, close", "x"])
                    .prop_map(str::to_string)
                    .boxed()
            } else {
                "[!-~]([ -~]{0,30}[!-~])?".boxed()
            }
        }

        fn head() -> impl Strategy<Value = String> {
            let method =
                prop::sample::select(vec!["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"]);
            let field = name().prop_flat_map(|name| (Just(name.clone()), value(&name)));
            let target = prop_oneof![Just("/p?q=1".to_string()), "/[!-~]{0,24}"];
            (method, target, prop::collection::vec(field, 0..12)).prop_map(
                |(method, target, fields)| {
                    let fields: String = fields
                        .iter()
                        .map(|(n, v)| format!("{n}: {v}\r\n"))
                        .collect();
                    format!("{method} {target} HTTP/1.1\r\n{fields}\r\n")
                },
            )
        }

        proptest! {
            #[test]
            fn an_app_gets_the_same_fields_either_way(head in head()) {
                let written = take_as(head.as_bytes(), true).0;
                let mapped = take_as(head.as_bytes(), false).0;
                match (&written, &mapped) {
                    (Taken::Request(..), Taken::Request(..)) => {
                        let (written, written_keyed) = written_head(head.as_bytes());
                        let (mapped, mapped_keyed) = mapped_head(head.as_bytes());
                        prop_assert_eq!(normalized(&written), normalized(&mapped));
                        prop_assert_eq!(written_keyed, mapped_keyed);
                    }
                    (Taken::Other, Taken::Other) => {}
                    // Two hosts, which the map's path refuses (see `forward`), or a
                    // target the URI does not keep as written: the map's path only.
                    (Taken::Other, Taken::Request(req, ..)) => {
                        let target = head.split(' ').nth(1);
                        prop_assert!(
                            headers::ambiguous(req.headers()).is_some()
                                || req.uri().path_and_query().map(|p| p.as_str()) != target
                        );
                    }
                    _ => prop_assert!(false, "taken one way and not the other"),
                }
            }
        }
    }

    #[test]
    fn a_bodiless_request_is_taken_with_its_fields_and_what_follows_is_left() {
        // `User-Agent` and `Keep-Alive` are as long as `Connection`: neither is one.
        let (taken, buf) = take(
            b"GET /a?b=1 HTTP/1.1\r\nHost: x\r\nX-One: 1\r\nx-one: 2\r\nAccept:  */* \r\nUser-Agent: a b\r\nKeep-Alive: timeout=5\r\n\r\nGET /next",
        );
        let Taken::Request(req, close, None) = taken else {
            panic!("not taken")
        };
        assert!(!close);
        assert_eq!(req.method(), Method::GET);
        assert_eq!(req.uri(), "/a?b=1");
        assert_eq!(req.version(), http::Version::HTTP_11);
        assert_eq!(req.headers()["host"], "x");
        let ones: Vec<_> = req.headers().get_all("x-one").iter().collect();
        assert_eq!(ones, ["1", "2"]);
        assert_eq!(req.headers()["accept"], "*/*");
        assert_eq!(req.headers()["user-agent"], "a b");
        assert!(req.body().is_end_stream());
        assert_eq!(&buf[..], b"GET /next");
    }

    #[test]
    fn connection_close_is_noted_and_keep_alive_is_not_a_close() {
        for (value, close) in [
            ("close", true),
            ("Keep-Alive", false),
            ("keep-alive, CLOSE", true),
            (" close ", true),
        ] {
            let head = format!("GET / HTTP/1.1\r\nConnection: {value}\r\n\r\n");
            for as_written in [false, true] {
                let (Taken::Request(_, asked, _), _) = take_as(head.as_bytes(), as_written) else {
                    panic!("{value}: not taken")
                };
                assert_eq!(asked, close, "{value}");
            }
        }
    }

    #[test]
    fn heads_with_a_body_an_upgrade_or_another_protocol_are_left_to_hyper() {
        left_to_hyper(b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi");
        left_to_hyper(b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
        left_to_hyper(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n");
        left_to_hyper(b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n");
        left_to_hyper(b"GET / HTTP/1.1\r\nUpgrade: h2c\r\n\r\n");
        left_to_hyper(b"GET / HTTP/1.1\r\nConnection: keep-alive, X-Secret\r\n\r\n");
        left_to_hyper(b"GET / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n");
        left_to_hyper(b"GET / HTTP/1.1\r\nTE: trailers\r\n\r\n");
        left_to_hyper(b"GET / HTTP/1.0\r\n\r\n");
        left_to_hyper(b"GET http://x/ HTTP/1.1\r\n\r\n");
        left_to_hyper(b"OPTIONS * HTTP/1.1\r\n\r\n");
        left_to_hyper(b"CONNECT x:443 HTTP/1.1\r\n\r\n");
    }

    #[test]
    fn heads_that_need_an_error_answer_are_left_to_hyper() {
        // Malformed: no colon, a space before it, a bad method.
        left_to_hyper(b"GET / HTTP/1.1\r\nNoColon\r\n\r\n");
        left_to_hyper(b"GET / HTTP/1.1\r\nHost : x\r\n\r\n");
        left_to_hyper(b"G(T / HTTP/1.1\r\n\r\n");
        // A target the parser allows and the URI does not: put back after the split.
        left_to_hyper(b"GET /a<b HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\n\r\n");
        // Too long, complete or not.
        let long = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(1100));
        left_to_hyper(long.as_bytes());
        left_to_hyper(&long.as_bytes()[..1050]);
        // A head not ended by the limit: no longer one to wait for.
        left_to_hyper(&long.as_bytes()[..1024]);
        assert!(matches!(take(&long.as_bytes()[..1023]).0, Taken::Partial));
        // More fields than taken here.
        let many: String = (0..MAX_FIELDS + 1)
            .map(|i| format!("X-{i}: 1\r\n"))
            .collect();
        let mut buf = BytesMut::from(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes());
        assert!(matches!(
            take_request(&mut buf, 64 * 1024, true),
            Taken::Other
        ));
    }

    #[test]
    fn a_head_not_ended_yet_is_partial_and_left_as_it_is() {
        let (taken, buf) = take(b"GET / HTTP/1.1\r\nHost: x\r\n");
        assert!(matches!(taken, Taken::Partial));
        assert_eq!(&buf[..], b"GET / HTTP/1.1\r\nHost: x\r\n");
    }

    fn encoded(
        status: u16,
        fields: &[(&str, &str)],
        head_request: bool,
        close: bool,
        hint: SizeHint,
    ) -> (String, Framing) {
        let mut response = http::Response::new(());
        *response.status_mut() = StatusCode::from_u16(status).expect("status");
        for (name, value) in fields {
            response.headers_mut().append(
                HeaderName::from_bytes(name.as_bytes()).expect("name"),
                HeaderValue::from_str(value).expect("value"),
            );
        }
        let (parts, ()) = response.into_parts();
        let mut out = BytesMut::new();
        let (framing, closes) = encode_head(&mut out, &parts, head_request, close, &hint);
        assert!(closes || !close, "a close asked for is a close");
        (String::from_utf8(out.to_vec()).expect("utf-8"), framing)
    }

    #[test]
    fn an_answer_is_framed_by_its_length_its_size_or_chunks() {
        let (head, framing) = encoded(
            200,
            &[("content-length", "5"), ("date", "then")],
            false,
            false,
            SizeHint::default(),
        );
        assert_eq!(framing, Framing::Length(5));
        assert_eq!(
            head,
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ndate: then\r\n\r\n"
        );
        let (head, framing) = encoded(404, &[], false, false, SizeHint::with_exact(7));
        assert_eq!(framing, Framing::Length(7));
        assert!(
            head.starts_with("HTTP/1.1 404 Not Found\r\ndate: "),
            "{head}"
        );
        assert!(head.ends_with("\r\ncontent-length: 7\r\n\r\n"), "{head}");
        let (head, framing) = encoded(
            200,
            &[("transfer-encoding", "chunked")],
            false,
            false,
            SizeHint::default(),
        );
        assert_eq!(framing, Framing::Chunked);
        assert_eq!(head.matches("transfer-encoding").count(), 1, "{head}");
        assert!(
            head.ends_with("transfer-encoding: chunked\r\n\r\n"),
            "{head}"
        );
        // A length that is no number is replaced by what the body says.
        let (head, framing) = encoded(
            200,
            &[("content-length", "five")],
            false,
            false,
            SizeHint::with_exact(5),
        );
        assert_eq!(framing, Framing::Length(5));
        assert!(head.contains("content-length: 5\r\n"), "{head}");
        assert_eq!(head.matches("content-length").count(), 1, "{head}");
        // Of two lengths, the first frames the body and the second is dropped.
        let (head, framing) = encoded(
            200,
            &[("content-length", "3"), ("content-length", "4")],
            false,
            false,
            SizeHint::default(),
        );
        assert_eq!(framing, Framing::Length(3));
        assert_eq!(head.matches("content-length").count(), 1, "{head}");
    }

    #[test]
    fn answers_that_have_no_body_keep_their_fields_and_get_no_framing() {
        for (status, head_request) in [(200, true), (204, false), (304, false), (103, false)] {
            let (head, framing) = encoded(
                status,
                &[("content-length", "12")],
                head_request,
                false,
                SizeHint::default(),
            );
            assert_eq!(framing, Framing::None, "{status}");
            assert!(head.contains("content-length: 12\r\n"), "{head}");
            assert!(!head.contains("transfer-encoding"), "{head}");
        }
        let (head, _) = encoded(200, &[], true, false, SizeHint::with_exact(0));
        assert!(!head.contains("content-length"), "{head}");
    }

    #[test]
    fn a_closing_answer_says_so_once_and_a_reason_of_the_apps_own_is_kept() {
        let (head, _) = encoded(200, &[], false, true, SizeHint::with_exact(0));
        assert!(head.ends_with("connection: close\r\n\r\n"), "{head}");
        let (head, _) = encoded(
            200,
            &[("connection", "close")],
            false,
            true,
            SizeHint::with_exact(0),
        );
        assert_eq!(head.matches("connection").count(), 1, "{head}");
        // An answer that says it closes closes, whatever the request asked.
        let mut response = http::Response::new(());
        response
            .headers_mut()
            .insert("connection", HeaderValue::from_static("close"));
        let (parts, ()) = response.into_parts();
        let (_, closes) = encode_head(
            &mut BytesMut::new(),
            &parts,
            false,
            false,
            &SizeHint::with_exact(0),
        );
        assert!(closes);
        let mut response = http::Response::new(());
        response
            .extensions_mut()
            .insert(hyper::ext::ReasonPhrase::from_static(b"Fine Indeed"));
        let (parts, ()) = response.into_parts();
        let mut out = BytesMut::new();
        encode_head(&mut out, &parts, false, false, &SizeHint::with_exact(0));
        assert!(out.starts_with(b"HTTP/1.1 200 Fine Indeed\r\n"));
        let (head, _) = encoded(599, &[], false, false, SizeHint::with_exact(0));
        assert!(head.starts_with("HTTP/1.1 599 \r\n"), "{head}");
    }

    #[test]
    fn the_date_is_an_http_date_of_now() {
        // On a thread whose date was never refreshed, as on one that was.
        let fresh = std::thread::spawn(|| encoded(200, &[], false, false, SizeHint::with_exact(0)))
            .join()
            .expect("thread");
        refresh_date();
        for (head, _) in [
            fresh,
            encoded(200, &[], false, false, SizeHint::with_exact(0)),
        ] {
            check_date(&head);
        }
    }

    #[tokio::test]
    async fn buffers_are_written_whole_in_order_and_empty_ones_are_no_write() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let mut peer = client.expect("connect");
        let (stream, _) = accepted.expect("accept");
        let timeouts =
            crate::activity::Timeouts::from_config(&crate::config::ProxyConfig::default());
        let (mut io, _activity) = ClientIo::new(stream, timeouts);
        // Nothing to write, however many empty buffers: done, not a failed write.
        write_all(&mut io, &mut [b"", b""]).await.expect("nothing");
        write_all(&mut io, &mut [b"", b"ab", b"", b"cde", b"f"])
            .await
            .expect("write");
        let mut got = [0u8; 6];
        peer.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"abcdef");
    }

    fn check_date(head: &str) {
        let date = head
            .lines()
            .find_map(|l| l.strip_prefix("date: "))
            .expect("a date");
        let when = httpdate::parse_http_date(date).expect("an HTTP date");
        let off = SystemTime::now()
            .duration_since(when)
            .unwrap_or_else(|e| e.duration());
        assert!(off < Duration::from_secs(5), "{date}");
    }
}
