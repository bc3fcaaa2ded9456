//! The access log: one line per request, written when its response ends.

use std::net::SocketAddr;
use std::time::Instant;

use http::{Method, StatusCode};

/// What the access log line of one request says; filled in as the response streams.
#[derive(Debug)]
pub(crate) struct AccessLog {
    pub client: SocketAddr,
    pub method: Method,
    pub path: String,
    pub status: StatusCode,
    pub upstream: Option<SocketAddr>,
    /// Times the request was sent again (see `retry`).
    pub retries: u32,
    pub bytes: u64,
    pub started: Instant,
    /// False when the body was cut (client gone, upstream failed, idle).
    pub complete: bool,
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        tracing::info!(
            target: "rolld::access",
            client = %self.client,
            method = %self.method,
            path = %self.path,
            status = self.status.as_u16(),
            upstream = %self.upstream.map_or_else(|| "-".to_string(), |u| u.to_string()),
            bytes = self.bytes,
            retries = self.retries,
            duration_ms = crate::clock::now()
                .duration_since(self.started)
                .as_secs_f64()
                * 1000.0,
            complete = self.complete,
        );
    }
}
