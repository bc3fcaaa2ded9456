//! The admin listener (`admin:` in the config): `/metrics` in the Prometheus text
//! format, `/status` (the JSON of `rolld status --json`) and `/healthz`. At most
//! [`MAX_CONNECTIONS`] clients at once, each with a header timeout and a lifetime.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use rolld_proxy::tls::Tls;
use rolld_proxy::Proxy;
use tracing::{debug, warn};

use crate::status::Board;

/// Admin clients served at once (scrapers, health checks: a handful).
const MAX_CONNECTIONS: usize = 64;
/// A request's headers must arrive within this (and an idle keep-alive connection
/// closes after it).
const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// No admin connection lives longer than this, busy or not.
const CONNECTION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Renders the metrics from the live counters on every scrape.
#[derive(Debug)]
struct Collector {
    board: Arc<Board>,
    proxy: Option<Arc<Proxy>>,
    tls: Option<Arc<Tls>>,
}

impl prometheus_client::collector::Collector for Collector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use std::sync::atomic::Ordering::Relaxed;
        let counter = |encoder: &mut DescriptorEncoder,
                       name: &str,
                       help: &str,
                       value: u64|
         -> Result<(), std::fmt::Error> {
            encoder
                .encode_descriptor(name, help, None, MetricType::Counter)?
                .encode_counter::<NoLabelSet, _, u64>(&value, None)
        };
        if let Some(proxy) = &self.proxy {
            let stats = proxy.stats().snapshot();
            let mut family = encoder.encode_descriptor(
                "rolld_http_requests",
                "Responses sent to clients, by status class.",
                None,
                MetricType::Counter,
            )?;
            for (i, n) in stats.responses.iter().enumerate() {
                let class = format!("{}xx", i + 1);
                family
                    .encode_family(&[("class", class.as_str())])?
                    .encode_counter::<NoLabelSet, _, u64>(n, None)?;
            }
            encoder
                .encode_descriptor(
                    "rolld_upstream_response_seconds",
                    "Time until an app process's response headers.",
                    None,
                    MetricType::Histogram,
                )?
                .encode_histogram::<NoLabelSet>(
                    stats.response_seconds_sum,
                    stats.response_count,
                    &stats.buckets,
                    None,
                )?;
            let in_flight = proxy.upstreams().current().in_flight() as i64;
            encoder
                .encode_descriptor(
                    "rolld_requests_in_flight",
                    "Requests in flight on the serving set.",
                    None,
                    MetricType::Gauge,
                )?
                .encode_gauge(&in_flight)?;
            counter(
                &mut encoder,
                "rolld_idle_buffer_releases",
                "Times an idle HTTP/1 client connection gave its buffers back.",
                stats.idle_releases,
            )?;
            let by_reason = |encoder: &mut DescriptorEncoder,
                             name: &str,
                             help: &str,
                             values: &[(&str, u64)]|
             -> Result<(), std::fmt::Error> {
                let mut family =
                    encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
                for (reason, n) in values {
                    family
                        .encode_family(&[("reason", *reason)])?
                        .encode_counter::<NoLabelSet, _, u64>(n, None)?;
                }
                Ok(())
            };
            by_reason(
                &mut encoder,
                "rolld_retries",
                "Requests sent again after their app process failed before answering, by reason (connect, unsent, no_answer, timeout).",
                &stats.retries,
            )?;
            counter(
                &mut encoder,
                "rolld_retries_refused_by_budget",
                "Requests not sent again because the retry budget was spent (they got 502 at once).",
                stats.retries_refused_by_budget,
            )?;
            by_reason(
                &mut encoder,
                "rolld_bad_gateway",
                "502 answers, by why the request was not sent again.",
                &stats.bad_gateways,
            )?;
            let held = proxy.upstreams().held();
            encoder
                .encode_descriptor(
                    "rolld_requests_held",
                    "Requests waiting now for a set that can take them (hold_timeout, pause).",
                    None,
                    MetricType::Gauge,
                )?
                .encode_gauge(&(held.held as i64))?;
            counter(
                &mut encoder,
                "rolld_held_requests_released",
                "Held requests that were then sent to an app.",
                held.released,
            )?;
            counter(
                &mut encoder,
                "rolld_held_requests_timed_out",
                "Held requests answered 503 because no set became ready in time.",
                held.timed_out,
            )?;
            counter(
                &mut encoder,
                "rolld_held_requests_refused",
                "Requests answered 503 at once because max_held requests were already held.",
                held.refused,
            )?;
            let buffers = proxy.buffer_stats();
            encoder
                .encode_descriptor(
                    "rolld_buffer_memory_bytes",
                    "Bytes of request bodies and answers buffered in memory now.",
                    None,
                    MetricType::Gauge,
                )?
                .encode_gauge(&(buffers.memory_bytes as i64))?;
            encoder
                .encode_descriptor(
                    "rolld_buffer_disk_bytes",
                    "Bytes of request bodies and answers buffered in temporary files now.",
                    None,
                    MetricType::Gauge,
                )?
                .encode_gauge(&(buffers.disk_bytes as i64))?;
            counter(
                &mut encoder,
                "rolld_buffer_requests_spilled",
                "Request bodies that went to a temporary file (over request_buffer or the memory budget).",
                buffers.requests_spilled,
            )?;
            counter(
                &mut encoder,
                "rolld_buffer_responses_spilled",
                "Answers that went to a temporary file (over response_buffer or the memory budget).",
                buffers.responses_spilled,
            )?;
            let paused = i64::from(proxy.upstreams().paused_until().is_some());
            encoder
                .encode_descriptor(
                    "rolld_paused",
                    "1 while a pause (`rolld pause`) holds new requests.",
                    None,
                    MetricType::Gauge,
                )?
                .encode_gauge(&paused)?;
            let maintenance = i64::from(proxy.maintenance().is_some());
            encoder
                .encode_descriptor(
                    "rolld_maintenance",
                    "1 while maintenance mode answers every request with its page.",
                    None,
                    MetricType::Gauge,
                )?
                .encode_gauge(&maintenance)?;
        }
        if let Some(tls) = &self.tls {
            let stats = tls.stats().snapshot();
            counter(
                &mut encoder,
                "rolld_tls_handshakes",
                "TLS handshakes completed.",
                stats.handshakes,
            )?;
            counter(
                &mut encoder,
                "rolld_tls_resumed_sessions",
                "TLS handshakes that resumed an earlier session.",
                stats.resumed,
            )?;
            let labelled = |encoder: &mut DescriptorEncoder,
                            name: &str,
                            help: &str,
                            label: &str,
                            values: &[(&str, u64)]|
             -> Result<(), std::fmt::Error> {
                let mut family =
                    encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
                for (value, n) in values {
                    family
                        .encode_family(&[(label, *value)])?
                        .encode_counter::<NoLabelSet, _, u64>(n, None)?;
                }
                Ok(())
            };
            let failures: Vec<(&str, u64)> = stats
                .failures
                .iter()
                .map(|(why, n)| (why.as_str(), *n))
                .collect();
            labelled(
                &mut encoder,
                "rolld_tls_handshake_failures",
                "TLS handshakes that failed, by reason.",
                "reason",
                &failures,
            )?;
            labelled(
                &mut encoder,
                "rolld_tls_connections",
                "TLS connections, by protocol version.",
                "version",
                &stats.versions,
            )?;
            labelled(
                &mut encoder,
                "rolld_tls_alpn",
                "TLS connections, by the protocol ALPN chose.",
                "protocol",
                &stats.alpn,
            )?;
            let now = std::time::SystemTime::now();
            let mut family = encoder.encode_descriptor(
                "rolld_tls_certificate_days_left",
                "Whole days until each TLS certificate expires.",
                None,
                MetricType::Gauge,
            )?;
            for cert in self.board.certificates() {
                let name = cert.names.first().cloned().unwrap_or_default();
                family
                    .encode_family(&[("name", name.as_str())])?
                    .encode_gauge(&cert.days_left(now))?;
            }
        }
        counter(
            &mut encoder,
            "rolld_rolls_started",
            "Rolls started.",
            self.board.rolls_started.load(Relaxed),
        )?;
        counter(
            &mut encoder,
            "rolld_rolls_succeeded",
            "Rolls that ended with the new set serving.",
            self.board.rolls_succeeded.load(Relaxed),
        )?;
        counter(
            &mut encoder,
            "rolld_rolls_rolled_back",
            "Rolls that failed and left the old set serving.",
            self.board.rolls_rolled_back.load(Relaxed),
        )?;
        counter(
            &mut encoder,
            "rolld_process_restarts",
            "App processes restarted after dying.",
            self.board.restarts.load(Relaxed),
        )?;
        counter(
            &mut encoder,
            "rolld_log_lines_dropped",
            "Log and app output lines dropped because rolld's stdout or stderr was stalled or closed.",
            crate::logs::dropped(),
        )?;
        let mut family = encoder.encode_descriptor(
            "rolld_rollbacks_after_switch",
            "Releases rolled back during their canary or bake, by reason.",
            None,
            MetricType::Counter,
        )?;
        for (reason, n) in crate::rollout::Reason::ALL
            .iter()
            .zip(&self.board.rollbacks_after_switch)
        {
            family
                .encode_family(&[("reason", reason.label())])?
                .encode_counter::<NoLabelSet, _, u64>(&n.load(Relaxed), None)?;
        }
        encoder
            .encode_descriptor(
                "rolld_rollout_error_rate",
                "The new set's failed share of requests at the last look of a canary or bake.",
                None,
                MetricType::Gauge,
            )?
            .encode_gauge(&self.board.judged_error_rate())?;
        let phase = self.board.rollout_phase();
        let mut family = encoder.encode_descriptor(
            "rolld_rollout_phase",
            "1 for the phase of the roll in progress (canary or bake), else 0.",
            None,
            MetricType::Gauge,
        )?;
        for each in [crate::rollout::Phase::Canary, crate::rollout::Phase::Bake] {
            let name = each.to_string();
            family
                .encode_family(&[("phase", name.as_str())])?
                .encode_gauge(&i64::from(phase == Some(each)))?;
        }
        let drain = encoder.encode_descriptor(
            "rolld_drain_seconds",
            "How long draining an old set took.",
            None,
            MetricType::Histogram,
        )?;
        self.board.drain_seconds.encode(drain)?;
        Ok(())
    }
}

/// Serves the admin endpoints on `listener` until the runtime stops.
pub fn serve(
    listener: std::net::TcpListener,
    board: Arc<Board>,
    proxy: Option<Arc<Proxy>>,
    tls: Option<Arc<Tls>>,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Collector {
        board: board.clone(),
        proxy: proxy.clone(),
        tls,
    }));
    let registry = Arc::new(registry);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            // At the cap, more clients wait in the kernel's accept queue.
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(err) => {
                    crate::control::accept_failed("admin", &err).await;
                    continue;
                }
            };
            let (registry, board, proxy) = (registry.clone(), board.clone(), proxy.clone());
            let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let response = route(req.uri().path(), &registry, &board, proxy.as_deref());
                async move { Ok::<_, Infallible>(response) }
            });
            tokio::spawn(async move {
                let _slot = slot;
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service);
                match tokio::time::timeout(CONNECTION_TIMEOUT, conn).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => debug!("admin connection: {e}"),
                    Err(_) => debug!("admin connection open too long; closed"),
                }
            });
        }
    });
    Ok(())
}

fn route(
    path: &str,
    registry: &Registry,
    board: &Board,
    proxy: Option<&Proxy>,
) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match path {
        "/metrics" => {
            let mut text = String::new();
            match prometheus_client::encoding::text::encode(&mut text, registry) {
                Ok(()) => (
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    text,
                ),
                Err(e) => {
                    warn!("encoding metrics failed: {e}");
                    (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "text/plain",
                        "metrics encoding failed\n".into(),
                    )
                }
            }
        }
        "/status" => {
            let snapshot = board.snapshot(proxy);
            let json = serde_json::to_string_pretty(&snapshot).unwrap_or_else(|_| "{}".into());
            (StatusCode::OK, "application/json", json + "\n")
        }
        "/healthz" => match board.snapshot(None).generation {
            Some(_) => (StatusCode::OK, "text/plain", "ok\n".into()),
            None => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                "starting\n".into(),
            ),
        },
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics, /status or /healthz\n".into(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = header::HeaderValue::from_str(content_type) {
        response.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    response
}
