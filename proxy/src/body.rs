//! The bodies that cross the proxy, without boxing.
//!
//! [`ResponseBody`] carries the request's [`InFlight`] lease: hyper streams a body after
//! the service future has returned, so the lease must live in the body to count the
//! request until its last byte is sent or the client goes away.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use crate::pool::Conn;
use crate::upstream::InFlight;

/// A client's request body on its way to an upstream.
pub struct RequestBody {
    /// `None` for a request rebuilt to be sent again, which never had a body.
    inner: Option<Incoming>,
}

impl RequestBody {
    pub(crate) fn new(inner: Incoming) -> Self {
        RequestBody { inner: Some(inner) }
    }

    pub(crate) fn empty() -> Self {
        RequestBody { inner: None }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match &mut self.get_mut().inner {
            Some(inner) => Pin::new(inner).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

/// What the proxy sends back to a client.
pub enum ResponseBody {
    /// Streamed from an upstream, holding the request's lease.
    Upstream(UpstreamBody),
    /// An answer of the proxy's own (errors).
    Full(Option<Bytes>),
}

impl ResponseBody {
    pub(crate) fn full(bytes: Bytes) -> Self {
        ResponseBody::Full(Some(bytes))
    }

    pub(crate) fn empty() -> Self {
        ResponseBody::Full(None)
    }
}

/// An upstream's response body. When it ends cleanly the connection goes back to the
/// pool; when it fails or is dropped early the connection is closed.
pub struct UpstreamBody {
    body: Incoming,
    lease: Option<InFlight>,
    conn: Option<Conn>,
}

impl UpstreamBody {
    pub(crate) fn new(body: Incoming, lease: InFlight, conn: Option<Conn>) -> Self {
        UpstreamBody {
            body,
            lease: Some(lease),
            conn,
        }
    }

    fn finish(&mut self) {
        if let (Some(conn), Some(lease)) = (self.conn.take(), self.lease.as_ref()) {
            lease.upstream().pool.checkin(conn);
        }
        self.lease = None;
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // Bodies that are empty from the start (HEAD, 204, 304) are never polled.
        if self.body.is_end_stream() {
            self.finish();
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ResponseBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            ResponseBody::Upstream(up) => {
                let polled = Pin::new(&mut up.body).poll_frame(cx);
                match &polled {
                    Poll::Ready(None) => up.finish(),
                    Poll::Ready(Some(Ok(_))) if up.body.is_end_stream() => up.finish(),
                    Poll::Ready(Some(Err(_))) => {
                        up.conn = None;
                        up.lease = None;
                    }
                    _ => {}
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Full(bytes) => bytes.is_none(),
            ResponseBody::Upstream(up) => up.body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Full(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            ResponseBody::Full(None) => SizeHint::with_exact(0),
            ResponseBody::Upstream(up) => up.body.size_hint(),
        }
    }
}
