//! Why the proxy answered a request itself, and the one mapping to a status code.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use crate::body::ResponseBody;
use crate::retry::NotResent;

/// A request the proxy could not pass to an upstream, or whose upstream failed.
/// Details go to the log; the client gets only the status and a generic line.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no upstream is ready")]
    NoUpstream,
    #[error("no upstream became ready while the request was held ({waited:?})")]
    HoldTimedOut { waited: std::time::Duration },
    #[error("no upstream is ready and max_held requests are already held")]
    HoldFull,
    #[error("connecting to {upstream} failed: {source}")]
    Connect {
        upstream: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("upstream {upstream} failed: {source}; not resent: {not_resent}")]
    Upstream {
        upstream: std::net::SocketAddr,
        source: crate::exchange::UpstreamError,
        /// Why the request was not sent again (see `retry`).
        not_resent: NotResent,
    },
    #[error("every attempt to send the request failed")]
    Exhausted,
    #[error("upstream {upstream} sent no response headers within {after:?}")]
    Timeout {
        upstream: std::net::SocketAddr,
        after: std::time::Duration,
    },
    #[error("upstream {upstream} sent the head of a small answer but not all of its body within {after:?}")]
    AnswerStalled {
        upstream: std::net::SocketAddr,
        after: std::time::Duration,
    },
    #[error("upstream {upstream} took no request body bytes within {after:?}")]
    UploadStalled {
        upstream: std::net::SocketAddr,
        after: std::time::Duration,
    },
    #[error("request body larger than max_body_size")]
    BodyTooLarge,
    #[error("client sent no request body bytes within body_idle_timeout")]
    ClientBodyIdle,
    #[error("request is not valid for forwarding: {0}")]
    BadRequest(&'static str),
    #[error("no buffer room came free for the request body within body_idle_timeout")]
    BuffersFull,
    #[error("buffering the request body failed: {0}")]
    Spool(std::io::Error),
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoUpstream | ProxyError::HoldTimedOut { .. } | ProxyError::HoldFull => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::Connect { .. } | ProxyError::Upstream { .. } | ProxyError::Exhausted => {
                StatusCode::BAD_GATEWAY
            }
            ProxyError::Timeout { .. }
            | ProxyError::AnswerStalled { .. }
            | ProxyError::UploadStalled { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::ClientBodyIdle => StatusCode::REQUEST_TIMEOUT,
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::BuffersFull => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Spool(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Why a 502 was not avoided by sending the request again; None for other answers.
    pub fn not_resent(&self) -> Option<NotResent> {
        match self {
            ProxyError::Connect { .. } => Some(NotResent::Connect),
            ProxyError::Upstream { not_resent, .. } => Some(*not_resent),
            ProxyError::Exhausted => Some(NotResent::Attempts),
            _ => None,
        }
    }

    /// Whether the upstream failed (a release is judged on this), rather than the
    /// client or the proxy's own limits.
    pub fn blames_upstream(&self) -> bool {
        matches!(
            self,
            ProxyError::Connect { .. }
                | ProxyError::Upstream { .. }
                | ProxyError::Exhausted
                | ProxyError::Timeout { .. }
                | ProxyError::AnswerStalled { .. }
                | ProxyError::UploadStalled { .. }
        )
    }

    /// The answer the client sees.
    pub fn into_response(self) -> Response<ResponseBody> {
        let status = self.status();
        // The rest of the request body was not read: this connection cannot go on.
        let unread = matches!(
            self,
            ProxyError::BodyTooLarge
                | ProxyError::ClientBodyIdle
                | ProxyError::BadRequest(_)
                | ProxyError::UploadStalled { .. }
                | ProxyError::BuffersFull
                | ProxyError::Spool(_)
        );
        let body = match status {
            StatusCode::SERVICE_UNAVAILABLE => "503 Service Unavailable\n",
            StatusCode::BAD_GATEWAY => "502 Bad Gateway\n",
            StatusCode::GATEWAY_TIMEOUT => "504 Gateway Timeout\n",
            StatusCode::PAYLOAD_TOO_LARGE => "413 Payload Too Large\n",
            StatusCode::REQUEST_TIMEOUT => "408 Request Timeout\n",
            StatusCode::INTERNAL_SERVER_ERROR => "500 Internal Server Error\n",
            _ => "400 Bad Request\n",
        };
        let mut response = Response::new(ResponseBody::full(Bytes::from_static(body.as_bytes())));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if unread {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}
