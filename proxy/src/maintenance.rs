//! Maintenance mode: every request is answered 503 with the operator's page and a
//! `Retry-After`, at once, without holding and without reaching an app.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use crate::body::ResponseBody;

/// Seconds a client is told to wait before trying again during maintenance.
const RETRY_AFTER: &str = "30";

/// The answer to every request while maintenance is on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaintenancePage {
    body: Bytes,
    content_type: HeaderValue,
}

impl MaintenancePage {
    /// A page of HTML (`html`) or plain text.
    pub fn new(body: impl Into<Bytes>, html: bool) -> Self {
        MaintenancePage {
            body: body.into(),
            content_type: HeaderValue::from_static(if html {
                "text/html; charset=utf-8"
            } else {
                "text/plain; charset=utf-8"
            }),
        }
    }

    /// The page when the operator gives none.
    pub fn plain() -> Self {
        Self::new(
            Bytes::from_static(b"503 Service Unavailable: down for maintenance\n"),
            false,
        )
    }

    /// Whether the page is HTML.
    pub fn is_html(&self) -> bool {
        self.content_type.as_bytes().starts_with(b"text/html")
    }

    pub fn len(&self) -> usize {
        self.body.len()
    }

    pub fn is_empty(&self) -> bool {
        self.body.is_empty()
    }

    pub(crate) fn response(&self) -> Response<ResponseBody> {
        let mut response = Response::new(ResponseBody::full(self.body.clone()));
        *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, self.content_type.clone());
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER));
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        response
    }
}
