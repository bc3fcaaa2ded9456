//! Forwarding one request: route it, rewrite it, send it, and hand back a response
//! whose body carries the request's lease.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use http::uri::PathAndQuery;
use http::{header, HeaderValue, Request, Response, StatusCode, Uri};
use hyper::body::Body;
use hyper_util::rt::TokioIo;
use tracing::{debug, warn};

use crate::access::AccessLog;
use crate::activity::{Activity, Busy};
use crate::body::{
    BodyError, Chunks, ClientBody, RequestBody, ResponseBody, Stalled, Upload, UpstreamBody,
};
use crate::buffer::{self, BufferStats, Buffers, SpoolError, SpooledBody};
use crate::config::ProxyConfig;
use crate::error::ProxyError;
use crate::exchange::{Answer, Fields, OutHead, Outgoing, SendError, Upgraded, UpstreamError};
use crate::headers::{self, Forwarding};
use crate::maintenance::MaintenancePage;
use crate::moved::{Moved, Tracked};
use crate::retry::{NotResent, Replay, RetryBudget, RetryReason, Tries, IDEMPOTENCY_KEY};
use crate::stats::Stats;
use crate::upstream::{InFlight, Upstreams};
use crate::watchdog::Progress;

/// The reverse proxy: shared by every connection of the front listener.
#[derive(Debug)]
pub struct Proxy {
    upstreams: Arc<Upstreams>,
    config: ProxyConfig,
    stats: Stats,
    /// What sending requests again may add to the traffic (see `retry`).
    retry_budget: RetryBudget,
    /// While set, every request gets this page (503) and nothing reaches an app.
    maintenance: arc_swap::ArcSwapOption<MaintenancePage>,
    /// Request and response buffers, and their budget.
    buffers: Arc<Buffers>,
    /// What a request's answer clock is built with, before its first deadline: any
    /// instant will do, as it is set before it is first polled.
    unset: tokio::time::Instant,
}

/// Who is on the other end of a front connection, computed once per connection.
#[derive(Debug)]
pub struct Client {
    pub addr: SocketAddr,
    ip: HeaderValue,
    /// Whether its X-Forwarded-* headers are kept.
    trusted: bool,
    /// Whether it came over TLS (`X-Forwarded-Proto: https`).
    https: bool,
    activity: Arc<Activity>,
    /// The connection's `max_connections` slot, held by the connection and by the
    /// tunnel of an upgrade on it, until both have ended.
    slot: Arc<tokio::sync::OwnedSemaphorePermit>,
}

impl Client {
    /// Marks a request of this client's connection in progress until the guard drops.
    pub(crate) fn begin(&self, with_body: bool) -> Busy {
        self.activity.begin(with_body)
    }

    /// Whether it is a trusted proxy, whose forwarding fields go on.
    pub(crate) fn trusted(&self) -> bool {
        self.trusted
    }

    pub(crate) fn new(
        addr: SocketAddr,
        activity: Arc<Activity>,
        config: &ProxyConfig,
        slot: tokio::sync::OwnedSemaphorePermit,
        https: bool,
    ) -> Self {
        Client {
            addr,
            ip: headers::ip_value(addr.ip()),
            trusted: config.trusts(addr.ip()),
            https,
            activity,
            slot: Arc::new(slot),
        }
    }
}

impl Proxy {
    pub fn new(upstreams: Arc<Upstreams>, config: ProxyConfig) -> Self {
        Proxy {
            upstreams,
            retry_budget: RetryBudget::new(config.retry_budget, config.retry_budget_floor),
            buffers: Buffers::new(config.buffering.clone()),
            config,
            stats: Stats::default(),
            maintenance: arc_swap::ArcSwapOption::empty(),
            unset: tokio::time::Instant::now(),
        }
    }

    /// Turns maintenance on (with its page) or off. Requests in flight go on.
    pub fn set_maintenance(&self, page: Option<MaintenancePage>) {
        self.maintenance.store(page.map(Arc::new));
    }

    /// The page served while maintenance is on.
    pub fn maintenance(&self) -> Option<Arc<MaintenancePage>> {
        self.maintenance.load_full()
    }

    /// Counters of the traffic so far.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// What the request and response buffers hold now.
    pub fn buffer_stats(&self) -> BufferStats {
        self.buffers.stats()
    }

    pub fn upstreams(&self) -> &Arc<Upstreams> {
        &self.upstreams
    }

    pub fn config(&self) -> &ProxyConfig {
        &self.config
    }

    /// Answers one client request, from an upstream or with an error of the proxy's own.
    /// `busy` marks the request in progress on its connection from the moment hyper
    /// handed it over; the response body holds it until hyper has taken all of it,
    /// error answers included (see `activity`).
    pub(crate) async fn handle(
        &self,
        req: Request<ClientBody>,
        fields: Option<Fields>,
        client: &Client,
        busy: Busy,
    ) -> Response<ResponseBody> {
        let mut busy = Some(busy);
        let started = crate::clock::now();
        let access = self.config.access_log.then(|| {
            Box::new(AccessLog {
                client: client.addr,
                method: req.method().clone(),
                path: req
                    .uri()
                    .path_and_query()
                    .map_or_else(|| "/".to_string(), |p| p.to_string()),
                status: StatusCode::OK,
                upstream: None,
                retries: 0,
                bytes: 0,
                started,
                complete: true,
            })
        });
        let method = req.method().clone();
        let forwarded = match self.maintenance.load_full() {
            _ if client.activity.take_unsound_framing() => Err((
                Ok(ProxyError::BadRequest(
                    "Transfer-Encoding with a tab, or with Content-Length",
                )),
                access,
            )),
            Some(page) => Err((Err(page), access)),
            None => self
                .forward(req, fields, client, &mut busy, access)
                .await
                .map_err(|(err, access)| (Ok(err), access)),
        };
        let response = match forwarded {
            Ok(response) => {
                self.stats.count_response(response.status());
                response
            }
            Err((err, access)) => {
                let response = match err {
                    Ok(err) => {
                        if let Some(why) = err.not_resent() {
                            self.stats.count_bad_gateway(why);
                        }
                        match &err {
                            ProxyError::NoUpstream
                            | ProxyError::HoldTimedOut { .. }
                            | ProxyError::HoldFull => {
                                debug!(client = %client.addr, %method, "503: {err}")
                            }
                            _ => {
                                warn!(client = %client.addr, %method, "{}: {err}", err.status().as_u16())
                            }
                        }
                        err.into_response()
                    }
                    Err(page) => page.response(),
                };
                let response = response.map(|body| body.holding(busy));
                self.stats.count_response(response.status());
                if let Some(mut access) = access {
                    access.status = response.status();
                    access.bytes = response.body().size_hint().exact().unwrap_or(0);
                }
                response
            }
        };
        // On HTTP/2, the stream must now make progress (see `watchdog`).
        match Progress::current() {
            Some(progress) => response.map(|body| body.watched(progress)),
            None => response,
        }
    }

    /// `fields`: the request's fields as `h1` wrote them for the app, if it did (then
    /// `req` has none of its own, and `h1` took only a request this needs not judge:
    /// no body, no upgrade, one `Host` at most, a `Connection` that names no field).
    async fn forward(
        &self,
        mut req: Request<ClientBody>,
        fields: Option<Fields>,
        client: &Client,
        busy: &mut Option<Busy>,
        mut access: Option<Box<AccessLog>>,
    ) -> Result<Response<ResponseBody>, (ProxyError, Option<Box<AccessLog>>)> {
        if let Some(why) = headers::ambiguous(req.headers()) {
            return Err((ProxyError::BadRequest(why), access));
        }
        if let Some(limit) = self.config.max_body_size {
            if req.body().size_hint().lower() > limit {
                return Err((ProxyError::BodyTooLarge, access));
            }
        }
        // A buffered request body is read completely before an upstream is picked.
        let buffered = self.buffers.buffers_path(req.uri().path());
        let spooled = match self.spool(&mut req, buffered).await {
            Ok(spooled) => spooled,
            Err(err) => return Err((err, access)),
        };
        let lease = match self.admit().await {
            Ok(lease) => lease,
            Err(err) => return Err((err, access)),
        };
        let mut lease = Some(lease);

        let Prepared {
            mut req,
            replay,
            upload,
            client_upgrade,
        } = self.prepare(req, fields, spooled, client);
        self.retry_budget.request();
        let sending = crate::clock::now();
        let mut tries = Tries::default();
        let sent = loop {
            let sent = self
                .deliver(req, &replay, &mut lease, &upload, &mut tries)
                .await;
            match sent {
                None if self.config.retry_timeouts && upload.stalled() == Stalled::Answer => {
                    let again = match lease.as_ref() {
                        Some(held) => self.again(&replay, held, &upload, &mut tries).await,
                        None => Err(NotResent::Attempts),
                    };
                    match again {
                        Ok(again) => {
                            self.retried(&mut tries, RetryReason::Timeout);
                            debug!(upstream = ?lease.as_ref().map(|l| l.upstream().addr()), after = ?self.config.response_timeout, "no answer in time; sending the request again to another upstream");
                            if let Err(err) = self.move_on(&mut lease, &upload).await {
                                return Err((err, access));
                            }
                            req = again;
                        }
                        Err(why) => {
                            debug!(upstream = ?lease.as_ref().map(|l| l.upstream().addr()), "no answer in time; not resent: {why}");
                            break None;
                        }
                    }
                }
                sent => break sent,
            }
        };
        // Only a request held again after its connects failed, and whose hold ended
        // without a set, has no lease; `send` said so in its error.
        let upstream = lease.as_ref().map(|l| l.upstream().addr());
        if let Some(access) = access.as_mut() {
            access.upstream = upstream;
            access.retries = tries.again;
        }
        let (Some(lease), Some(upstream)) = (lease, upstream) else {
            let err = match sent {
                Some(Err(err)) => err,
                _ => ProxyError::NoUpstream,
            };
            return Err((err, access));
        };
        let response = match sent {
            Some(Ok(sent)) => {
                self.stats
                    .observe_upstream(crate::clock::now().duration_since(sending));
                lease.answered(sent.status().as_u16());
                sent
            }
            Some(Err(err)) => {
                if err.blames_upstream() {
                    lease.failed();
                }
                return Err((err, access));
            }
            None => {
                let err = match upload.stalled() {
                    Stalled::Answer => ProxyError::Timeout {
                        upstream,
                        after: self.config.response_timeout,
                    },
                    Stalled::Upstream => ProxyError::UploadStalled {
                        upstream,
                        after: self.config.body_idle_timeout,
                    },
                    Stalled::Client => ProxyError::ClientBodyIdle,
                };
                if err.blames_upstream() {
                    lease.failed();
                }
                return Err((err, access));
            }
        };
        if let Some(access) = access.as_mut() {
            access.status = response.status();
        }

        let (mut parts, body) = response.into_parts();
        // Only an upgrade request gets a 101 this far (see `exchange`).
        if let (Some(client_upgrade), StatusCode::SWITCHING_PROTOCOLS) =
            (client_upgrade, parts.status)
        {
            let Some(upstream_io) = body.upgraded() else {
                let source = UpstreamError::Invalid("101 Switching Protocols without a tunnel");
                let not_resent = NotResent::AnswerBroken;
                return Err((
                    ProxyError::Upstream {
                        upstream,
                        source,
                        not_resent,
                    },
                    access,
                ));
            };
            let held = Held {
                lease,
                _busy: busy.take(),
                _slot: client.slot.clone(),
            };
            let idle = self.config.tunnel_idle_timeout;
            tokio::spawn(tunnel(client_upgrade, upstream_io, held, idle));
            return Ok(Response::from_parts(parts, ResponseBody::empty()));
        }

        headers::strip_hop_by_hop(&mut parts.headers, false);
        let buffers = Buffers::buffers_answer(&mut parts.headers);
        let buffer_answer = buffered && !body.is_end_stream() && buffers;
        if buffer_answer {
            let idle = self.config.body_idle_timeout;
            // Known to fit in memory: read whole right here (a small one outside the
            // budget, as hyper's own write buffer is).
            let share = match body.size_hint().exact() {
                Some(len) if len <= SMALL_ANSWER => Some(None),
                Some(len) => self.buffers.memory_share(len).map(Some),
                None => None,
            };
            if let Some(share) = share {
                return self
                    .read_answer(parts, body, share, lease, access, busy)
                    .await;
            }
            let body = buffer::buffer_answer(&self.buffers, body, lease, idle, access);
            return Ok(Response::from_parts(
                parts,
                ResponseBody::buffered(body).holding(busy.take()),
            ));
        }
        let body = UpstreamBody::new(body, lease, self.config.body_idle_timeout, access);
        Ok(Response::from_parts(
            parts,
            ResponseBody::upstream(body).holding(busy.take()),
        ))
    }

    /// The request as it goes to the app (see `exchange`), with what it takes to send it
    /// again. Not part of `forward`'s future: what it builds on the way (the request's
    /// parts, its forwarding fields) would take room there for the whole exchange.
    fn prepare(
        &self,
        mut req: Request<ClientBody>,
        fields: Option<Fields>,
        spooled: Option<Arc<SpooledBody>>,
        client: &Client,
    ) -> Prepared {
        let upgrade = fields.is_none() && headers::is_upgrade(req.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        let (forwarding, keyed) = match &fields {
            Some(fields) => (
                Forwarding::untrusted(fields.host.clone(), &client.ip, client.https),
                fields.keyed,
            ),
            None => {
                let forwarding = headers::for_app(
                    &mut parts,
                    upgrade,
                    (&client.ip, client.trusted, client.https),
                    &|ip| self.config.trusts(ip),
                );
                (forwarding, parts.headers.contains_key(&IDEMPOTENCY_KEY))
            }
        };
        parts.uri = origin_form(std::mem::take(&mut parts.uri));
        parts.version = http::Version::HTTP_11;

        let upload = Upload::new();
        if let Some(spooled) = &spooled {
            // Its length is known now: sent with `Content-Length`, which every app
            // server reads (some refuse chunked requests).
            parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(spooled.len()));
        }
        let body = match &spooled {
            Some(spooled) => RequestBody::spooled(spooled.reader(), upload.clone()),
            None => RequestBody::new(
                body,
                self.config.max_body_size,
                self.config.body_idle_timeout,
                upload.clone(),
            ),
        };
        let head = match fields {
            Some(fields) => OutHead::from_fields(fields, &forwarding, &parts.method),
            None => OutHead::new(&parts, Some(&forwarding), &body, upgrade),
        };
        // What it takes to send the request again if its upstream fails under it after
        // it was written (the app crashed, or closed the idle connection at that
        // moment): kept only when that is safe (see `retry`). A buffered body can always
        // be read again.
        let replay = Replay::of(
            &parts.method,
            keyed,
            &head,
            spooled.clone(),
            body.is_end_stream(),
            body.size_hint().lower(),
            upgrade,
            self.config.retry_body_limit,
        );
        let body = match &spooled {
            Some(_) => body,
            None => body.keeping(replay.as_ref().ok().and_then(Replay::kept)),
        };
        Prepared {
            req: Outgoing { head, body },
            replay,
            upload,
            client_upgrade,
        }
    }

    /// Sends `req` (see `send`) under the clock of its answer: `None` when
    /// `response_timeout` or `body_idle_timeout` ran out first (see `Upload`).
    async fn deliver(
        &self,
        req: Outgoing,
        replay: &Result<Replay, NotResent>,
        slot: &mut Option<InFlight>,
        upload: &Arc<Upload>,
        tries: &mut Tries,
    ) -> Option<Result<Response<Answer>, ProxyError>> {
        let send = self.send(req, replay, slot, upload, tries);
        tokio::pin!(send);
        // One timer for the request, moved as the deadline moves.
        let sleep = tokio::time::sleep_until(self.unset);
        tokio::pin!(sleep);
        let mut armed = None;
        let (response, idle) = (self.config.response_timeout, self.config.body_idle_timeout);
        std::future::poll_fn(|cx| {
            if let Poll::Ready(sent) = send.as_mut().poll(cx) {
                return Poll::Ready(Some(sent));
            }
            // The request moves only while `send` is polled (its connection is written
            // and read, its body read, all in this task): the deadline is looked at
            // after each poll rather than told of every move.
            // No clock while connecting: `connect_timeout` is the connect's own.
            let Some(deadline) = upload.deadline(response, idle) else {
                return Poll::Pending;
            };
            if armed != Some(deadline) {
                sleep.as_mut().reset(deadline);
                armed = Some(deadline);
            }
            sleep.as_mut().poll(cx).map(|()| None)
        })
        .await
    }

    /// Reads the request body into a buffer when it is buffered: it has a body, its
    /// path is buffered, and it is no upgrade (whose bytes after the head are the
    /// tunnel's).
    async fn spool(
        &self,
        req: &mut Request<ClientBody>,
        buffered: bool,
    ) -> Result<Option<Arc<SpooledBody>>, ProxyError> {
        if !buffered || req.body().is_end_stream() || headers::is_upgrade(req.headers()) {
            return Ok(None);
        }
        let body = self
            .buffers
            .spool_request(
                req.body_mut(),
                self.config.max_body_size,
                self.config.body_idle_timeout,
            )
            .await
            .map_err(|err| match err {
                SpoolError::Idle => ProxyError::ClientBodyIdle,
                SpoolError::TooLarge => ProxyError::BodyTooLarge,
                SpoolError::Unreadable => {
                    ProxyError::BadRequest("the request body could not be read")
                }
                SpoolError::Full => ProxyError::BuffersFull,
                SpoolError::Io(err) => ProxyError::Spool(err),
            })?;
        Ok(Some(Arc::new(body)))
    }

    /// Reads an answer of known length that fits in memory (most of an API's) whole,
    /// right here in the request's own task: no pump task and no pipe. `share` is what
    /// it holds of the buffers' memory until it is sent (none for a small one). The
    /// app's connection goes back to the pool, and the lease ends, before the client
    /// gets a byte. An answer that breaks off, or stalls `body_idle_timeout` between two
    /// chunks, gets a 502 or 504 instead of a cut answer. Its access log line is written
    /// now, with the bytes it will send.
    async fn read_answer(
        &self,
        parts: http::response::Parts,
        mut body: Answer,
        share: Option<buffer::MemoryShare>,
        lease: InFlight,
        access: Option<Box<AccessLog>>,
        busy: &mut Option<Busy>,
    ) -> Result<Response<ResponseBody>, (ProxyError, Option<Box<AccessLog>>)> {
        let upstream = lease.upstream().addr();
        let idle = self.config.body_idle_timeout;
        match read_whole(&mut body, idle).await {
            Ok(chunks) => {
                if let Some(conn) = body.take_conn() {
                    lease.upstream().pool().checkin(conn);
                }
                drop(lease);
                if let Some(mut access) = access {
                    access.bytes = chunks.len();
                }
                Ok(Response::from_parts(
                    parts,
                    ResponseBody::read(chunks, share).holding(busy.take()),
                ))
            }
            Err(Unread::Broken(source)) => {
                lease.cut_mid_answer();
                let not_resent = NotResent::AnswerBroken;
                Err((
                    ProxyError::Upstream {
                        upstream,
                        source,
                        not_resent,
                    },
                    access,
                ))
            }
            Err(Unread::Stalled) => {
                lease.cut_mid_answer();
                Err((
                    ProxyError::AnswerStalled {
                        upstream,
                        after: idle,
                    },
                    access,
                ))
            }
        }
    }

    /// A lease for a new request, held while no upstream can take it (see `hold`).
    async fn admit(&self) -> Result<InFlight, ProxyError> {
        self.upstreams
            .admit(self.config.hold_timeout, self.config.max_held)
            .await
    }

    /// Whether a request with no upstream to go to waits rather than fails.
    fn holds(&self) -> bool {
        !self.config.hold_timeout.is_zero() || self.upstreams.paused_until().is_some()
    }

    /// Sends `req` to the lease's upstream. Connect failures move the request to another
    /// upstream of the set (nothing was sent, so any method is safe); so does a
    /// connection that closed before the request was written. A request written to an
    /// upstream that failed before any byte of its answer came back goes to another
    /// upstream when `replay` says it is safe and the budget allows (see `retry`);
    /// otherwise its 502 says why not.
    async fn send(
        &self,
        mut req: Outgoing,
        replay: &Result<Replay, NotResent>,
        slot: &mut Option<InFlight>,
        upload: &Arc<Upload>,
        tries: &mut Tries,
    ) -> Result<Response<Answer>, ProxyError> {
        // A request sent again goes out on a new connection: an idle one may be as
        // stale as the one that failed.
        let mut fresh = tries.written;
        let mut attempt = 0;
        while attempt < MAX_ATTEMPTS + self.config.retries as usize {
            attempt += 1;
            let Some(lease) = slot.as_mut() else {
                return Err(ProxyError::NoUpstream);
            };
            let upstream = lease.upstream().clone();
            let checkout = if fresh {
                upstream.pool().connect(self.config.connect_timeout).await
            } else {
                // A connection the app may be closing right now is only for a request
                // that would go out again whole if it failed there after being written.
                let resendable =
                    self.config.retries > 0 && replay.is_ok() && req.body.is_end_stream();
                upstream
                    .pool()
                    .checkout(
                        self.config.connect_timeout,
                        self.config.upstream_keepalive_timeout,
                        resendable,
                    )
                    .await
            };
            let conn = match checkout {
                Ok(conn) => conn,
                Err(source) => {
                    if !blames_upstream(&source) {
                        // Short of descriptors or local ports: the next upstream would
                        // fail the same way, and marking this one down would turn a
                        // shortage of ours into 503s for everyone.
                        return Err(ProxyError::Connect {
                            upstream: upstream.addr(),
                            source,
                        });
                    }
                    upstream.mark_down_for(self.config.down_period);
                    if !lease.reroute() && !self.upstreams.fall_back(lease, tries.written) {
                        // A request already written to a process of a set whose drain
                        // timed out was cut on purpose: it fails visibly, and is not run
                        // again elsewhere.
                        let cut = tries.written && lease.is_cut();
                        if !self.holds() || tries.holds >= MAX_HOLDS || cut {
                            return Err(ProxyError::Connect {
                                upstream: upstream.addr(),
                                source,
                            });
                        }
                        // Nothing was sent: wait, without a lease, for a set that can
                        // take the request (the processes are likely being restarted).
                        debug!(upstream = %upstream.addr(), error = %source, "connect failed on every upstream; holding the request");
                        *slot = None;
                        upload.held();
                        *slot = Some(self.admit().await?);
                        tries.holds += 1;
                        // A new set or a restarted process: the attempts start over.
                        attempt = 0;
                        fresh = true;
                        self.retried(tries, RetryReason::Connect);
                        continue;
                    }
                    self.retried(tries, RetryReason::Connect);
                    warn!(upstream = %upstream.addr(), error = %source, "connect failed, trying another upstream");
                    continue;
                }
            };
            upload.connected(!req.body.is_end_stream(), conn.reads.clone());
            let reused = conn.reused;
            let err = match conn.send(req).await {
                Ok(response) => return Ok(response),
                Err(SendError::Body(err)) => return Err(client_fault(err)),
                Err(SendError::Unsent(unsent, err)) => {
                    // Never written: safe to send again, whatever the method.
                    if !reused {
                        // Even a new connection failed: the process is likely gone.
                        upstream.mark_down_for(self.config.down_period);
                        if !lease.reroute() {
                            self.upstreams.fall_back(lease, tries.written);
                        }
                    }
                    self.retried(tries, RetryReason::Unsent);
                    debug!(upstream = %upstream.addr(), error = %err, "connection closed before the request was written; sending it on a new connection");
                    req = *unsent;
                    fresh = true;
                    continue;
                }
                Err(SendError::Failed(err)) => err,
            };
            // Written: the app may have received it, and may have acted on it.
            req = match self.again(replay, lease, upload, tries).await {
                Ok(again) => again,
                Err(not_resent) => {
                    return Err(ProxyError::Upstream {
                        upstream: upstream.addr(),
                        source: err,
                        not_resent,
                    })
                }
            };
            self.retried(tries, RetryReason::NoAnswer);
            debug!(upstream = %upstream.addr(), error = %err, "upstream failed before answering; sending the request again to another upstream");
            // A process that reset a request is usually dying, and so may its peers be
            // (a release that crashes, every process killed at once). Until a process
            // is dead, connects to it still succeed and the request dies with it; a
            // moment later they are refused, which holds the request until a process
            // is back instead of spending its resends.
            tokio::time::sleep(RESEND_BACKOFF * tries.resent).await;
            // Not marked down: a process that died is the supervisor's to report (it
            // restarts it); one that resets a request is skipped by this request only.
            self.move_on(slot, upload).await?;
            fresh = true;
        }
        Err(ProxyError::Exhausted)
    }

    /// Counts a request sent again.
    fn retried(&self, tries: &mut Tries, reason: RetryReason) {
        tries.again += 1;
        self.stats.count_retry(reason);
    }

    /// The request rebuilt to be sent again, after the upstream it was written to
    /// failed before answering (or did not answer in time), or why it is not.
    async fn again(
        &self,
        replay: &Result<Replay, NotResent>,
        lease: &InFlight,
        upload: &Arc<Upload>,
        tries: &mut Tries,
    ) -> Result<Outgoing, NotResent> {
        tries.written = true;
        if lease.is_cut() {
            return Err(NotResent::DrainCut);
        }
        let replay = replay.as_ref().map_err(|why| *why)?;
        if tries.resent >= self.config.retries {
            return Err(NotResent::RetriesSpent);
        }
        let again = replay.build(upload, self.config.body_idle_timeout).await?;
        // Last: a retry that would not happen anyway takes nothing from the budget.
        if !self.retry_budget.withdraw() {
            self.stats.count_retry_refused();
            return Err(NotResent::Budget);
        }
        tries.resent += 1;
        Ok(again)
    }

    /// Moves a request to be sent again to another upstream: of its set, never the one
    /// that just failed; else of the set new requests go to, or the standby. Without
    /// one it is routed again as a new request, waiting for a set that can take it
    /// (see `hold`): a set of one process whose process died serves it once restarted.
    /// Bounded by `retries`, as each move follows a resend.
    async fn move_on(
        &self,
        slot: &mut Option<InFlight>,
        upload: &Upload,
    ) -> Result<(), ProxyError> {
        let Some(lease) = slot.as_mut() else {
            return Err(ProxyError::NoUpstream);
        };
        // The failed attempt's clock stops; the next one starts its own.
        upload.held();
        if lease.move_on() || self.upstreams.fall_back(lease, true) {
            return Ok(());
        }
        *slot = None;
        *slot = Some(self.admit().await?);
        Ok(())
    }
}

/// A request made ready for its app (see `Proxy::prepare`).
struct Prepared {
    req: Outgoing,
    /// What it takes to send it again, or why it cannot be.
    replay: Result<Replay, NotResent>,
    /// The clock of its exchange.
    upload: Arc<Upload>,
    /// The client's side of an upgrade it asks for.
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
}

/// Largest answer of known length that is read whole outside the buffer budget (see
/// `read_answer`): what one write hands to the kernel at once, so its bytes leave rolld
/// as soon as the client connection takes a write, as hyper's own write buffer does.
/// A larger one, up to `response_buffer`, takes its share of the budget.
const SMALL_ANSWER: u64 = 16 * 1024;

/// Why an answer read whole did not arrive whole.
enum Unread {
    Broken(UpstreamError),
    /// No chunk for `body_idle_timeout`.
    Stalled,
}

/// All of an answer's data, chunk after chunk, each within `idle` of the last.
/// Trailers are dropped, as for any answer rolld buffers.
async fn read_whole(body: &mut Answer, idle: Duration) -> Result<Chunks, Unread> {
    use http_body_util::BodyExt;
    let mut chunks = Chunks::default();
    loop {
        // A small answer is mostly read already: its frames need no clock.
        let ready = std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *body).poll_frame(cx)));
        let frame = match ready.await {
            Poll::Ready(frame) => frame,
            Poll::Pending => match tokio::time::timeout(idle, body.frame()).await {
                Ok(frame) => frame,
                Err(_) => return Err(Unread::Stalled),
            },
        };
        match frame {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    chunks.push(data);
                }
                // Its length is all here: no need to wait for the end to be signalled.
                if body.is_end_stream() {
                    return Ok(chunks);
                }
            }
            None => return Ok(chunks),
            Some(Err(err)) => return Err(Unread::Broken(err)),
        }
    }
}

/// Whether a failed connect says the upstream is down (refused, timed out, unreachable,
/// reset), rather than this machine being short of something (EMFILE, ENFILE,
/// EADDRNOTAVAIL, ENOBUFS...), which says nothing about the upstream.
fn blames_upstream(err: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        err.kind(),
        ConnectionRefused
            | TimedOut
            | HostUnreachable
            | NetworkUnreachable
            | ConnectionReset
            | ConnectionAborted
    )
}

/// What a request whose body failed before it was sent whole gets: the client's body
/// was too large, idle, broken, or not as long as it said; or its buffer could not be
/// read back.
fn client_fault(err: crate::body::BoxError) -> ProxyError {
    let err = match err.downcast::<std::io::Error>() {
        Ok(err) => return ProxyError::Spool(*err),
        Err(err) => err,
    };
    match err.downcast_ref::<BodyError>() {
        Some(BodyError::TooLarge) => ProxyError::BodyTooLarge,
        Some(BodyError::Idle) => ProxyError::ClientBodyIdle,
        None => ProxyError::BadRequest("the request body could not be read"),
    }
}

/// Attempts at sending one request beyond its `retries`: connects to other upstreams
/// and resends of what was never written.
const MAX_ATTEMPTS: usize = 4;

/// How long a request waits before it is sent again after the process it was written
/// to failed before answering, times the resends so far.
const RESEND_BACKOFF: Duration = Duration::from_millis(20);

/// Times one request is held again after every connect of its set failed, or after no
/// other upstream could take it again: a process that is marked ready but refuses
/// connections must not hold a request for ever.
const MAX_HOLDS: usize = 2;

/// The request target as an upstream expects it: path and query only.
fn origin_form(uri: Uri) -> Uri {
    if uri.scheme().is_none() && uri.authority().is_none() {
        return uri;
    }
    let path = uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    Uri::from(path)
}

/// What an upgraded connection holds until its tunnel ends: its lease (a drain waits
/// for the tunnel), its request's place on the connection, and the connection's
/// `max_connections` slot.
struct Held {
    lease: InFlight,
    _busy: Option<Busy>,
    _slot: Arc<tokio::sync::OwnedSemaphorePermit>,
}

/// Carries bytes both ways after a protocol switch, until either side closes or no
/// byte has moved either way for `idle`.
async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    upstream: Upgraded,
    held: Held,
    idle: std::time::Duration,
) {
    let addr = held.lease.upstream().addr();
    let client = match client.await {
        Ok(client) => client,
        Err(err) => {
            debug!(upstream = %addr, error = %err, "upgrade failed");
            return;
        }
    };
    let moved = Arc::new(Moved::new());
    let mut client = Tracked::new(TokioIo::new(client), moved.clone());
    let mut upstream = Tracked::new(upstream, moved.clone());
    let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
    tokio::pin!(copy);
    loop {
        tokio::select! {
            copied = &mut copy => {
                if let Err(err) = copied {
                    debug!(upstream = %addr, error = %err, "upgraded connection ended");
                }
                break;
            }
            () = tokio::time::sleep_until(moved.at() + idle) => {
                if moved.at() + idle <= tokio::time::Instant::now() {
                    debug!(upstream = %addr, ?idle, "upgraded connection idle; closing it");
                    break;
                }
            }
        }
    }
    drop(held);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_failures_of_the_upstream_mark_it_down() {
        use std::io::{Error, ErrorKind};
        for kind in [
            ErrorKind::ConnectionRefused,
            ErrorKind::TimedOut,
            ErrorKind::HostUnreachable,
            ErrorKind::NetworkUnreachable,
            ErrorKind::ConnectionReset,
        ] {
            assert!(blames_upstream(&Error::from(kind)), "{kind:?}");
        }
        // EMFILE, ENFILE, EADDRNOTAVAIL, ENOBUFS on Linux.
        for errno in [24, 23, 99, 105] {
            assert!(
                !blames_upstream(&Error::from_raw_os_error(errno)),
                "{errno}"
            );
        }
    }

    #[test]
    fn absolute_form_becomes_origin_form() {
        let uri: Uri = "http://example.test/a?b=1".parse().expect("uri");
        assert_eq!(origin_form(uri), "/a?b=1");
        let uri: Uri = "/x".parse().expect("uri");
        assert_eq!(origin_form(uri), "/x");
    }
}
