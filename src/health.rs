//! Readiness polling and smoke tests, each bounded by a deadline.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::{Health, HttpCheck, Statuses};
use crate::generation::ProcessState;

/// Why a process is not ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotReady {
    /// The port refuses connections (or the probe failed before HTTP).
    Refused(String),
    /// The HTTP check answered, with a status it does not accept.
    Status {
        wanted: Statuses,
        got: http::StatusCode,
    },
    /// The HTTP check did not complete.
    Http(String),
    /// The probe took longer than its timeout.
    Timeout,
}

impl fmt::Display for NotReady {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NotReady::Refused(e) => write!(f, "port does not accept connections ({e})"),
            NotReady::Status { wanted, got } => {
                write!(f, "answered {got}, accepted {wanted}")
            }
            NotReady::Http(e) => write!(f, "health check failed: {e}"),
            NotReady::Timeout => write!(f, "probe timed out"),
        }
    }
}

pub fn local(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// One probe: the port accepts a connection and, with an HTTP check, answers it.
pub async fn probe(port: u16, http: Option<&HttpCheck>, timeout: Duration) -> Result<(), NotReady> {
    let probe = async {
        let stream = TcpStream::connect(local(port))
            .await
            .map_err(|e| NotReady::Refused(e.to_string()))?;
        match http {
            None => Ok(()),
            Some(check) => get(stream, port, check).await,
        }
    };
    tokio::time::timeout(timeout, probe)
        .await
        .unwrap_or(Err(NotReady::Timeout))
}

async fn get(stream: TcpStream, port: u16, check: &HttpCheck) -> Result<(), NotReady> {
    let http_err = |e: hyper::Error| NotReady::Http(e.to_string());
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
            .await
            .map_err(http_err)?;
    let conn = tokio::spawn(conn);
    let request = http::Request::get(check.path.as_str())
        .header(http::header::HOST, format!("127.0.0.1:{port}"))
        .header(http::header::USER_AGENT, "rolld-health")
        .body(Empty::new())
        .map_err(|e| NotReady::Http(e.to_string()))?;
    let response = sender.send_request(request).await.map_err(http_err);
    conn.abort();
    let got = response?.status();
    if check.status.accepts(got.as_u16()) {
        Ok(())
    } else {
        Err(NotReady::Status {
            wanted: check.status.clone(),
            got,
        })
    }
}

/// Why a new process never became ready.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartFailed {
    #[error("process on port {port} exited during start-up ({how})")]
    Exited { port: u16, how: String },
    #[error("process on port {port} not ready after {}: {last}", humantime::format_duration(*.waited))]
    Timeout {
        port: u16,
        waited: Duration,
        last: NotReady,
    },
}

/// Polls `port` until it passes `health`, the process exits, or `start_timeout` passes.
pub async fn wait_ready(
    port: u16,
    health: &Health,
    mut state: watch::Receiver<ProcessState>,
) -> Result<(), StartFailed> {
    let deadline = Instant::now() + health.start_timeout;
    loop {
        if let ProcessState::Exited(how) = &*state.borrow_and_update() {
            return Err(StartFailed::Exited {
                port,
                how: how.clone(),
            });
        }
        let last = match probe(port, health.http.as_ref(), health.timeout).await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            return Err(StartFailed::Timeout {
                port,
                waited: health.start_timeout,
                last,
            });
        }
        let pause = tokio::time::sleep_until((Instant::now() + health.interval).min(deadline));
        tokio::select! {
            () = pause => {}
            // The process changed state (it may have exited): look at once.
            changed = state.changed() => if changed.is_err() {
                return Err(StartFailed::Exited { port, how: "stopped".into() });
            },
        }
    }
}

/// The original smoke test: `GET /` (or `check.path`) on every port answers a status
/// the check accepts. Redirects are not followed: a login redirect is an answer.
pub async fn check_all_http_ports(
    ports: &[u16],
    check: &HttpCheck,
    timeout: Duration,
) -> Result<(), String> {
    for &port in ports {
        probe(port, Some(check), timeout).await.map_err(|e| {
            format!(
                "smoke test check_all_http_ports: port {port}: GET {}: {e}",
                check.path
            )
        })?;
    }
    Ok(())
}
