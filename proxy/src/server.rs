//! The front listener: binding, the accept loop, and graceful shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use hyper::body::{Body, Incoming};
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::TokioTimer;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info, warn};

use crate::activity::{ClientIo, Timeouts};
use crate::body::{ClientBody, ResponseBody};
use crate::clock::Clocked;
use crate::config::ProxyConfig;
use crate::forward::{Client, Proxy};
use crate::tls::{HandshakeFailure, Tls};
use crate::watchdog::StreamExecutor;

/// What an HTTP/2 client with prior knowledge sends first.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// HTTP/2 flow-control windows rolld grants a client: how much of request bodies it
/// may send ahead, per stream and per connection.
const STREAM_WINDOW: u32 = 256 * 1024;
const CONNECTION_WINDOW: u32 = 1024 * 1024;

/// Pending connections the kernel queues before rolld accepts them.
const BACKLOG: i32 = 1024;

/// Binds a listener: SO_REUSEADDR so a restarted rolld binds at once, a real backlog,
/// close-on-exec so app processes never inherit it, `TCP_NODELAY` before it listens,
/// so that every client it accepts has it too (see [`nodelay`]), and SO_REUSEPORT, for
/// the sockets of [`bind_for_workers`] beside it. Another process listening on `addr`
/// is still an error, as without SO_REUSEPORT: a bind without it is tried first. Once
/// rolld listens, a process of the user that bound it (root, with `user:`) could join
/// with SO_REUSEPORT of its own and take a share of the clients; any other is refused.
pub fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    if addr.port() != 0 {
        drop(bound(addr, false)?);
    }
    listen_on(addr)
}

/// Binds a front listener for `workers` proxy workers: a socket for each, all on
/// `addr` (see [`Listener`]). Called before rolld gives up root: the kernel takes
/// sockets into one SO_REUSEPORT group only from the user that bound the first.
pub fn bind_for_workers(addr: SocketAddr, workers: usize) -> io::Result<Listener> {
    let first = bind(addr)?;
    // Port 0 chose a port: the other sockets listen on that one.
    let addr = first.local_addr()?;
    let mut sockets = vec![first];
    for _ in 1..workers {
        sockets.push(listen_on(addr)?);
    }
    Ok(Listener { sockets })
}

/// A socket bound to `addr` with the options of a front listener.
fn bound(addr: SocketAddr, reuse_port: bool) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_cloexec(true)?;
    socket.set_nodelay(true)?;
    socket.set_reuse_port(reuse_port)?;
    socket.bind(&addr.into())?;
    Ok(socket)
}

/// A front listener on `addr`, beside any other rolld socket listening there.
fn listen_on(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = bound(addr, true)?;
    socket.listen(BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// The listening sockets of one front address, from [`bind_for_workers`]: one for
/// each proxy worker, all on the same address, so that the kernel hands each new
/// client to one worker's socket and wakes that worker alone (one socket shared by the
/// workers wakes every one of them for each client, and all but one find nothing to
/// accept). A listener made from one socket is shared by all workers.
#[derive(Debug)]
pub struct Listener {
    /// Never empty.
    sockets: Vec<std::net::TcpListener>,
}

impl Listener {
    /// The address its sockets listen on.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.sockets[0].local_addr()
    }

    /// The sockets worker `id` of `workers` accepts from: its own, and every socket
    /// beyond the number of workers is taken by one of them too (one nobody accepted
    /// from would hold its clients until it closed); with fewer sockets than workers,
    /// workers share them.
    fn for_worker(&self, id: usize, workers: usize) -> io::Result<Vec<std::net::TcpListener>> {
        let count = self.sockets.len();
        if count < workers {
            return Ok(vec![self.sockets[id % count].try_clone()?]);
        }
        self.sockets
            .iter()
            .skip(id)
            .step_by(workers.max(1))
            .map(std::net::TcpListener::try_clone)
            .collect()
    }
}

impl From<std::net::TcpListener> for Listener {
    fn from(socket: std::net::TcpListener) -> Self {
        Listener {
            sockets: vec![socket],
        }
    }
}

thread_local! {
    /// Which proxy worker thread this is (0 on any other thread).
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The proxy worker running on this thread, for per-worker state such as pools.
pub(crate) fn worker_id() -> usize {
    WORKER.with(std::cell::Cell::get)
}

/// Serves `listener` until `shutdown` resolves to a grace period, then stops accepting,
/// lets each connection finish its current exchange (idle keep-alive connections close
/// at once, busy HTTP/1 ones answer with `Connection: close`, HTTP/2 ones get GOAWAY)
/// for up to that grace period, and returns.
///
/// Connections are served by `config.workers` threads, each with a runtime of its own,
/// each accepting from a socket of its own on the listener's address where it has one
/// (see [`Listener`]): a request and its upstream connection stay on one thread, as in
/// nginx's workers, with no wake-ups across threads. Upgraded connections
/// go on after this returns (a drain waits for them); the worker threads end with the
/// process.
pub async fn serve(
    listener: impl Into<Listener>,
    proxy: Arc<Proxy>,
    shutdown: impl Future<Output = Duration>,
) -> io::Result<()> {
    serve_fronts(vec![(listener.into(), Front::Plain)], proxy, shutdown).await
}

/// What a front listener speaks.
#[derive(Clone, Debug)]
pub enum Front {
    /// Plain HTTP/1 and HTTP/2 (prior knowledge).
    Plain,
    /// Plain HTTP that answers every request with a 308 to the same URL over HTTPS on
    /// `https_port`, reading no request body.
    RedirectToHttps { https_port: u16 },
    /// TLS, then HTTP/2 or HTTP/1 as ALPN chose.
    Tls(Arc<Tls>),
}

/// [`serve`] for several listeners at once, each speaking its [`Front`]: the same
/// workers accept from all of them, and `max_connections` holds for all together.
pub async fn serve_fronts(
    listeners: Vec<(Listener, Front)>,
    proxy: Arc<Proxy>,
    shutdown: impl Future<Output = Duration>,
) -> io::Result<()> {
    let workers = proxy.config().workers.max(1);
    let (stop, stopped) = tokio::sync::watch::channel(None::<Duration>);
    // Shared by all workers: max_connections holds for the listener as a whole.
    let slots = Arc::new(Semaphore::new(proxy.config().max_connections.max(1)));
    let mut done = Vec::with_capacity(workers);
    for id in 0..workers {
        let mut own = Vec::new();
        for (listener, front) in &listeners {
            for socket in listener.for_worker(id, workers)? {
                own.push((socket, front.clone()));
            }
        }
        let listeners = own;
        let (proxy, stopped, slots) = (proxy.clone(), stopped.clone(), slots.clone());
        let (finished, finished_rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name(format!("rolld-proxy-{id}"))
            .spawn(move || {
                WORKER.with(|w| w.set(id));
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(err) => {
                        let _ = finished.send(Err(err));
                        return;
                    }
                };
                let result = runtime.block_on(accept(listeners, proxy, slots, stopped));
                let _ = finished.send(result);
                // Keep the runtime for the tasks that outlive the listener (tunnels of
                // upgraded connections); the process ends them.
                runtime.block_on(std::future::pending::<()>());
            })?;
        done.push(finished_rx);
    }
    // Only the workers' clones may keep the sockets listening: once they stop accepting,
    // new clients must be refused, not queued in a backlog nobody reads.
    drop(listeners);
    let grace = shutdown.await;
    let _ = stop.send(Some(grace));
    let mut result = Ok(());
    for finished in done {
        match finished.await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => result = Err(err),
            Err(_) => result = Err(io::Error::other("a proxy worker thread ended early")),
        }
    }
    result
}

/// One worker's accept loops (one per listener) and graceful shutdown.
async fn accept(
    listeners: Vec<(std::net::TcpListener, Front)>,
    proxy: Arc<Proxy>,
    slots: Arc<Semaphore>,
    stopped: watch::Receiver<Option<Duration>>,
) -> io::Result<()> {
    // tokio interrupts its own event loop (an eventfd write, then one more epoll_wait)
    // whenever a new timer is due before every armed one: with a single busy client,
    // that is each request's response timeout. A tick every second keeps an earlier
    // timer armed, so request timers never do. It also keeps the `Date` of answers
    // current (see `h1`), and closes this worker's pooled upstream connections that
    // idled too long or that the app closed.
    let upstreams = proxy.upstreams().clone();
    let keepalive = proxy.config().upstream_keepalive_timeout;
    let ticker = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            crate::h1::refresh_date();
            upstreams.sweep_idle(keepalive);
        }
    });
    let protocols = Arc::new(Protocols::new(proxy.config()));
    // Every connection task holds a clone; `recv` returns None once all have ended.
    let (open, mut all_closed) = mpsc::channel::<()>(1);
    let mut loops = tokio::task::JoinSet::new();
    for (listener, front) in listeners {
        // Set on the listener (again, for one not made by `bind`), where Linux copies
        // it into each socket it accepts from then on.
        if let Err(err) = socket2::SockRef::from(&listener).set_nodelay(true) {
            debug!(error = %err, "set_nodelay on the listener failed");
        }
        let listener = TcpListener::from_std(listener)?;
        let shared = Shared {
            proxy: proxy.clone(),
            protocols: protocols.clone(),
            front,
            stopped: stopped.clone(),
            _open: open.clone(),
        };
        loops.spawn(accept_loop(listener, shared, slots.clone()));
    }
    let mut grace = Duration::ZERO;
    while let Some(ended) = loops.join_next().await {
        if let Ok(wait) = ended {
            grace = grace.max(wait);
        }
    }

    let count = open.strong_count() - 1;
    drop(open);
    info!(
        connections = count,
        "front listener closed, waiting for {count} connection(s)"
    );
    if tokio::time::timeout(grace, all_closed.recv())
        .await
        .is_err()
    {
        warn!(
            ?grace,
            "connections still open after the grace period; closing them"
        );
    }
    // Only now: the answers of the grace period carry a current `Date` too.
    ticker.abort();
    Ok(())
}

/// What every connection of one listener of a worker shares.
#[derive(Clone)]
struct Shared {
    proxy: Arc<Proxy>,
    protocols: Arc<Protocols>,
    front: Front,
    stopped: watch::Receiver<Option<Duration>>,
    /// Held while a connection is open, for the shutdown to wait on.
    _open: mpsc::Sender<()>,
}

/// Accepts from one listener until told to stop; returns the grace period, having
/// closed the listener.
async fn accept_loop(listener: TcpListener, shared: Shared, slots: Arc<Semaphore>) -> Duration {
    let shutdown = stopping(shared.stopped.clone());
    tokio::pin!(shutdown);
    let mut nodelay_inherited = None;
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(err) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            grace = &mut shutdown => return grace,
        };
        // At once, before anything below waits: an event epoll gave meanwhile would be
        // lost to it.
        wait_for_first_bytes(&stream);
        // Backpressure: at max_connections the loop holds the client it accepted and
        // stops accepting, and new clients wait in the kernel's queue instead of being
        // refused or crashing rolld. The slot is taken after the accept so that a loop
        // waiting on one listener holds none that another listener's clients need.
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return Duration::ZERO,
            },
            grace = &mut shutdown => return grace,
        };
        nodelay(&stream, &mut nodelay_inherited);
        let conn = Connection {
            stream,
            peer,
            shared: shared.clone(),
            slot: permit,
        };
        // Each poll of a connection's task reads the clock once (see `clock`). The
        // connection's future is boxed where it is made: spawning moves what it is
        // given through several layers of tokio, and a pointer is cheaper to move than
        // the future (about 700 instructions a new connection).
        match &shared.front {
            Front::Tls(tls) => {
                tokio::spawn(Clocked::new(Box::pin(conn.serve_tls(tls.clone()))));
            }
            Front::Plain | Front::RedirectToHttps { .. } => {
                tokio::spawn(Clocked::new(Box::pin(conn.serve())));
            }
        }
    }
}

/// Turns Nagle's algorithm off for an accepted client: rolld writes whole answers, and
/// a small one must not wait for the client's ACK of the last. Linux copies the
/// listener's `TCP_NODELAY` into the sockets it accepts, which spares a system call per
/// connection; whether it did is asked of a loop's first connection, and where it did
/// not (another system, or a client queued before the listener had it), each
/// connection gets it set.
fn nodelay(stream: &TcpStream, inherited: &mut Option<bool>) {
    let set = match *inherited {
        Some(inherited) => inherited,
        None => {
            let set = stream.nodelay().unwrap_or(false);
            *inherited = Some(set);
            set
        }
    };
    if !set {
        if let Err(err) = stream.set_nodelay(true) {
            debug!(error = %err, "set_nodelay failed");
        }
    }
}

/// Makes the first read of an accepted client wait for epoll to say its bytes came.
/// tokio takes a socket it accepted as readable, so that read would otherwise ask the
/// kernel at once, and a client's request mostly arrives a moment after its connect:
/// the answer is "nothing yet" (`EAGAIN`), one system call for nothing on three new
/// connections of four under load. Bytes that came before the socket was added to
/// epoll are reported by epoll all the same, at its next wait: this must be called
/// before the worker's event loop turns again after the accept, or an event it gave
/// for those bytes meanwhile is lost (epoll reports an edge once).
fn wait_for_first_bytes(stream: &TcpStream) {
    // Not readable until epoll says so: a `WouldBlock` from `try_io` clears the flag
    // without a system call.
    let _ = stream.try_io(tokio::io::Interest::READABLE, || {
        Err::<(), _>(io::ErrorKind::WouldBlock.into())
    });
}

/// The HTTP/1 and HTTP/2 settings every connection of a worker is served with.
struct Protocols {
    http1: http1::Builder,
    http2: http2::Builder<StreamExecutor>,
    timeouts: Timeouts,
}

impl Protocols {
    fn new(config: &ProxyConfig) -> Self {
        let mut h1 = http1::Builder::new();
        h1.timer(TokioTimer::new())
            // Our own IO enforces the header and keep-alive timeouts (see `activity`).
            .header_read_timeout(None)
            .max_buf_size(config.max_header_size.max(8192))
            .keep_alive(true);
        let mut h2 = http2::Builder::new(StreamExecutor {
            idle: config.body_idle_timeout,
        });
        h2.timer(TokioTimer::new())
            .max_header_list_size(config.max_header_size.min(u32::MAX as usize) as u32)
            .max_concurrent_streams(config.http2_max_concurrent_streams.max(1))
            // What a client may send before rolld has passed it on: 256 KiB a stream,
            // 1 MiB a connection (hyper's default is 1 MiB for each).
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            // A client that stops answering PINGs is gone, whatever its streams say.
            .keep_alive_interval(config.http2_keepalive_interval)
            .keep_alive_timeout(config.http2_keepalive_timeout);
        Protocols {
            http1: h1,
            http2: h2,
            timeouts: Timeouts::from_config(config),
        }
    }
}

/// Resolves to the grace period once the listener is told to stop (see `Stopping`).
fn stopping(stopped: watch::Receiver<Option<Duration>>) -> Stopping {
    Stopping {
        signal: stopped.clone(),
        wait: Box::pin(wait_for_stop(stopped)),
        waker: None,
        stopped: None,
    }
}

async fn wait_for_stop(mut stopped: watch::Receiver<Option<Duration>>) -> Duration {
    match stopped.wait_for(Option::is_some).await {
        Ok(grace) => grace.unwrap_or(Duration::ZERO),
        Err(_) => Duration::ZERO,
    }
}

/// The stop signal as a connection waits for it: polled beside the connection on every
/// wake-up of its task, several times a request. Until the signal changes, a poll by the
/// task already registered is one atomic load, not a new registration with the channel.
/// Once it has resolved it stays resolved: a connection handed from rolld's own HTTP/1
/// server to hyper's after the stop (see `h1`) polls it again.
struct Stopping {
    /// Tells whether the signal changed since the connection began.
    signal: watch::Receiver<Option<Duration>>,
    wait: Pin<Box<dyn Future<Output = Duration> + Send>>,
    /// The task `wait` will wake.
    waker: Option<Waker>,
    /// The grace period, once the stop came.
    stopped: Option<Duration>,
}

impl Future for Stopping {
    type Output = Duration;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Duration> {
        let this = &mut *self;
        if let Some(grace) = this.stopped {
            return Poll::Ready(grace);
        }
        let unchanged = this.signal.has_changed().is_ok_and(|changed| !changed);
        if unchanged && this.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            return Poll::Pending;
        }
        let polled = this.wait.as_mut().poll(cx);
        this.waker = Some(cx.waker().clone());
        if let Poll::Ready(grace) = polled {
            this.stopped = Some(grace);
        }
        polled
    }
}

/// One accepted client connection, until it closes.
struct Connection {
    stream: TcpStream,
    peer: SocketAddr,
    /// Its `_open` sender is held until the connection ends.
    shared: Shared,
    /// One of max_connections; shared with an upgraded connection's tunnel, which
    /// keeps it after this connection hands over its socket.
    slot: OwnedSemaphorePermit,
}

impl Connection {
    /// Serves HTTP/2 (prior knowledge) or HTTP/1. An HTTP/1 connection is served by
    /// rolld's own server (see `h1`) and, for the heads it hands over, by a hyper
    /// connection; either ends when the connection goes idle and hands the socket back
    /// (see `activity`), so an idle client holds no buffers.
    async fn serve(self) {
        let Connection {
            stream,
            peer,
            // `shared._open` is held until this returns.
            shared,
            slot,
        } = self;
        let Shared {
            proxy,
            protocols,
            stopped,
            front,
            ..
        } = &shared;
        let (mut io, activity) = ClientIo::new(stream, protocols.timeouts);
        let client = Arc::new(Client::new(peer, activity, proxy.config(), slot, false));
        let own_client = client.clone();
        let redirect = match front {
            Front::RedirectToHttps { https_port } => Some(*https_port),
            _ => None,
        };
        let counted = proxy.clone();
        let proxy = proxy.clone();
        let service = service_fn(move |req: hyper::Request<Incoming>| {
            // In progress from now, not from the future's first poll: hyper may hold a
            // parsed request a while before polling it.
            let busy = client.begin(!req.body().is_end_stream());
            let proxy = proxy.clone();
            let client = client.clone();
            async move {
                if let Some(https_port) = redirect {
                    let response = redirect_to_https(&req, https_port);
                    return Ok::<_, Infallible>(response.map(|body| body.holding(Some(busy))));
                }
                Ok::<_, Infallible>(
                    proxy
                        .handle(req.map(ClientBody::from), None, &client, busy)
                        .await,
                )
            }
        });

        // One future for the connection's life: it stays registered with the channel
        // instead of registering anew for every request. Once it resolves, every path
        // below returns.
        let stop = stopping(stopped.clone());
        tokio::pin!(stop);

        // HTTP/2 with prior knowledge, or HTTP/1.
        let h2 = tokio::select! {
            sniffed = io.starts_with(H2_PREFACE) => match sniffed {
                Ok(h2) => h2,
                Err(err) => {
                    debug!(client = %peer, error = %err, "client connection ended before a request");
                    return;
                }
            },
            _ = &mut stop => return,
        };
        if h2 {
            io.multiplex();
            // Boxed, as the HTTP/1 connection below: the task of an idle connection
            // then holds no room for either.
            let mut conn = Box::pin(protocols.http2.serve_connection(io, service));
            let result = tokio::select! {
                result = conn.as_mut() => result,
                _ = &mut stop => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(err) = result {
                debug!(client = %peer, error = %err, "client connection ended");
            }
            return;
        }

        io.allow_shedding();
        // rolld's own HTTP/1 server takes the common requests, hyper the others (see
        // `h1`); the redirecting listener leaves all of them to hyper.
        let own = redirect.is_none();
        loop {
            // rolld's own server first; hyper's takes the heads it hands over.
            let to_hyper = !own || {
                // Boxed, as hyper's connection below: an idle connection's task holds
                // room for neither.
                let served = Box::pin(crate::h1::serve(
                    &mut io,
                    &own_client,
                    &counted,
                    stop.as_mut(),
                ));
                match served.await {
                    crate::h1::Left::Closed => return,
                    crate::h1::Left::Idle => false,
                    crate::h1::Left::ToHyper => true,
                }
            };
            if to_hyper {
                let mut conn = Box::new(
                    protocols
                        .http1
                        .serve_connection(io, service.clone())
                        .with_upgrades(),
                );
                let result = tokio::select! {
                    result = &mut conn => result,
                    _ = &mut stop => {
                        std::pin::Pin::new(&mut *conn).graceful_shutdown();
                        if let Err(err) = (&mut conn).await {
                            debug!(client = %peer, error = %err, "client connection ended");
                        }
                        return;
                    }
                };
                if let Err(err) = result {
                    debug!(client = %peer, error = %err, "client connection ended");
                    return;
                }
                // Upgraded: the tunnel has the socket now.
                let Some(parts) = (*conn).into_parts() else {
                    return;
                };
                io = parts.io;
                if !io.take_shed(parts.read_buf) {
                    return;
                }
            }
            counted.stats().count_idle_release();
            // Idle between requests, holding no buffer: wait for the next bytes.
            tokio::select! {
                ready = io.ready() => if let Err(err) = ready {
                    debug!(client = %peer, error = %err, "client connection ended");
                    return;
                },
                _ = &mut stop => return,
            }
        }
    }
}

impl Connection {
    /// The TLS handshake, within its timeout and holding the connection's
    /// `max_connections` slot, then HTTP/2 or HTTP/1 as ALPN chose. No shedding here:
    /// an idle TLS connection's state is rustls's, which a shed would not give back.
    async fn serve_tls(self, tls: Arc<Tls>) {
        let Connection {
            stream,
            peer,
            // `shared._open` is held until this returns.
            shared,
            slot,
        } = self;
        let stop = stopping(shared.stopped.clone());
        tokio::pin!(stop);
        let handshake = tokio::time::timeout(tls.handshake_timeout, tls.acceptor().accept(stream));
        let stream = tokio::select! {
            done = handshake => match done {
                Ok(Ok(stream)) => stream,
                Ok(Err(err)) => {
                    let why = HandshakeFailure::of(&err);
                    tls.stats().failed(why);
                    debug!(client = %peer, error = %err, reason = why.as_str(), "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tls.stats().failed(HandshakeFailure::Timeout);
                    debug!(client = %peer, "TLS handshake timed out");
                    return;
                }
            },
            _ = &mut stop => return,
        };
        let (_, session) = stream.get_ref();
        tls.stats().completed(session);
        let h2 = session.alpn_protocol() == Some(&b"h2"[..]);

        let Shared {
            proxy, protocols, ..
        } = &shared;
        let (mut io, activity) = ClientIo::new(stream, protocols.timeouts);
        let client = Arc::new(Client::new(peer, activity, proxy.config(), slot, true));
        let hsts = tls.hsts.clone();
        let proxy = proxy.clone();
        let service = service_fn(move |req: hyper::Request<Incoming>| {
            let busy = client.begin(!req.body().is_end_stream());
            let proxy = proxy.clone();
            let client = client.clone();
            let hsts = hsts.clone();
            async move {
                let mut response = proxy
                    .handle(req.map(ClientBody::from), None, &client, busy)
                    .await;
                if let Some(hsts) = hsts {
                    response
                        .headers_mut()
                        .entry(http::header::STRICT_TRANSPORT_SECURITY)
                        .or_insert(hsts);
                }
                Ok::<_, Infallible>(response)
            }
        });

        let result = if h2 {
            io.multiplex();
            let mut conn = Box::pin(protocols.http2.serve_connection(io, service));
            tokio::select! {
                result = conn.as_mut() => result,
                _ = &mut stop => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            }
        } else {
            let mut conn = Box::pin(
                protocols
                    .http1
                    .serve_connection(io, service)
                    .with_upgrades(),
            );
            tokio::select! {
                result = conn.as_mut() => result,
                _ = &mut stop => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            }
        };
        if let Err(err) = result {
            debug!(client = %peer, error = %err, "client connection ended");
        }
    }
}

/// The answer of a [`Front::RedirectToHttps`] listener: 308 to the same host, path
/// and query over HTTPS (308, unlike 301, keeps the method and body). The body is not
/// read; a request that has one ends its connection.
fn redirect_to_https(
    req: &hyper::Request<Incoming>,
    https_port: u16,
) -> http::Response<ResponseBody> {
    use http::{header, HeaderValue, StatusCode};
    let host = req
        .uri()
        .authority()
        .map(|a| a.host().to_string())
        .or_else(|| {
            let value = req.headers().get(header::HOST)?.to_str().ok()?;
            let authority: http::uri::Authority = value.parse().ok()?;
            Some(authority.host().to_string())
        });
    let location = host.and_then(|host| {
        let port = if https_port == 443 {
            String::new()
        } else {
            format!(":{https_port}")
        };
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        HeaderValue::from_str(&format!("https://{host}{port}{path}")).ok()
    });
    let mut response = http::Response::new(ResponseBody::empty());
    match location {
        Some(location) => {
            *response.status_mut() = StatusCode::PERMANENT_REDIRECT;
            response.headers_mut().insert(header::LOCATION, location);
        }
        None => *response.status_mut() = StatusCode::BAD_REQUEST,
    }
    if !req.body().is_end_stream() {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_stop_signal_stays_resolved_once_it_came() {
        let (tell, told) = watch::channel(None);
        let mut stop = stopping(told);
        tell.send(Some(Duration::from_secs(3))).expect("send");
        assert_eq!((&mut stop).await, Duration::from_secs(3));
        // Polled again (a connection handed on after the stop): the same answer, at once.
        assert_eq!((&mut stop).await, Duration::from_secs(3));
    }

    /// Two clients accepted from a listener with or without `TCP_NODELAY`: each has
    /// it once `nodelay` saw it, and what the first said is kept for the second.
    async fn accepted_with_nodelay(on_listener: bool) -> (Vec<bool>, Option<bool>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        socket2::SockRef::from(&listener)
            .set_nodelay(on_listener)
            .expect("set_nodelay on the listener");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let listener = TcpListener::from_std(listener).expect("listener");
        let mut inherited = None;
        let mut set = Vec::new();
        for _ in 0..2 {
            let _client = TcpStream::connect(addr).await.expect("connect");
            let (stream, _) = listener.accept().await.expect("accept");
            nodelay(&stream, &mut inherited);
            set.push(stream.nodelay().expect("nodelay"));
        }
        (set, inherited)
    }

    #[tokio::test]
    async fn accepted_clients_have_nodelay_from_the_listener_or_set_one_by_one() {
        assert_eq!(
            accepted_with_nodelay(true).await,
            (vec![true, true], Some(true))
        );
        assert_eq!(
            accepted_with_nodelay(false).await,
            (vec![true, true], Some(false))
        );
    }

    #[test]
    fn an_address_another_socket_listens_on_is_refused_as_without_reuseport() {
        let first = bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let addr = first.local_addr().expect("addr");
        let again = bind(addr).map(|_| ()).map_err(|err| err.kind());
        assert_eq!(again, Err(io::ErrorKind::AddrInUse));
        let plain = std::net::TcpListener::bind(addr)
            .map(|_| ())
            .map_err(|err| err.kind());
        assert_eq!(plain, Err(io::ErrorKind::AddrInUse));
        drop(first);
        bind(addr).expect("free again once the first is closed");
    }

    /// 64 clients of a listener bound for two workers reach both workers' sockets,
    /// each of which gets some: the kernel spreads them, and each socket has its own
    /// queue.
    #[test]
    fn each_worker_listens_on_a_socket_of_its_own_and_gets_clients() {
        let listener = bind_for_workers("127.0.0.1:0".parse().expect("addr"), 2).expect("bind");
        let mut sockets = [0, 1].map(|id| listener.for_worker(id, 2).expect("a worker's socket"));
        let [Some(first), Some(second)] = sockets.each_mut().map(Vec::pop) else {
            panic!("one socket for each worker")
        };
        let addr = listener.local_addr().expect("addr");
        assert_eq!(second.local_addr().expect("addr"), addr);
        let clients: Vec<_> = (0..64)
            .map(|_| std::net::TcpStream::connect(addr).expect("connect"))
            .collect();
        // Accepted as they come (the kernel may queue a client just after its
        // connect returned), until all are.
        let (mut to_first, mut to_second) = (0, 0);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while to_first + to_second < clients.len() {
            assert!(
                std::time::Instant::now() < deadline,
                "not every client came"
            );
            to_first += std::iter::from_fn(|| first.accept().ok()).count();
            to_second += std::iter::from_fn(|| second.accept().ok()).count();
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(
            to_first > 0 && to_second > 0,
            "{to_first} and {to_second} clients"
        );
    }

    /// Sockets beyond the number of workers are each taken by one worker.
    #[test]
    fn every_socket_has_a_worker_whatever_their_numbers() {
        let listener = bind_for_workers("127.0.0.1:0".parse().expect("addr"), 3).expect("bind");
        let count = |id, workers| listener.for_worker(id, workers).expect("sockets").len();
        assert_eq!((count(0, 2), count(1, 2)), (2, 1));
        assert_eq!((count(0, 3), count(1, 3), count(2, 3)), (1, 1, 1));
        assert_eq!((count(0, 4), count(3, 4)), (1, 1));
    }

    /// A listener made elsewhere, without SO_REUSEPORT, is shared by the workers.
    #[test]
    fn a_listener_without_reuseport_is_shared() {
        let socket = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        socket.set_nonblocking(true).expect("nonblocking");
        let listener = Listener::from(socket);
        let second = listener.for_worker(1, 2).expect("second worker's listener");
        assert_eq!(second.len(), 1);
        let second = &second[0];
        let _client =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while second.accept().is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "the client never came"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// An accepted client is not taken as readable before epoll says so, and its
    /// bytes are read whether they came before or after the accept.
    #[tokio::test]
    async fn the_first_read_of_a_client_waits_for_its_bytes_whenever_they_came() {
        async fn readable(stream: &TcpStream) -> bool {
            std::future::poll_fn(|cx| Poll::Ready(stream.poll_read_ready(cx).is_ready())).await
        }
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        for sent_before_accept in [true, false] {
            let mut client = TcpStream::connect(addr).await.expect("connect");
            if sent_before_accept {
                client.write_all(b"early").await.expect("send");
                // Queued in the kernel before the socket is accepted and added to epoll.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let (mut stream, _) = listener.accept().await.expect("accept");
            assert!(
                readable(&stream).await,
                "tokio takes an accepted socket as readable"
            );
            wait_for_first_bytes(&stream);
            assert!(!readable(&stream).await, "not until epoll says so");
            if !sent_before_accept {
                client.write_all(b"early").await.expect("send");
            }
            let mut got = [0u8; 5];
            tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut got))
                .await
                .expect("read in time")
                .expect("read");
            assert_eq!(&got, b"early");
        }
    }

    #[tokio::test]
    async fn a_bound_front_listener_hands_its_clients_nodelay() {
        let listener = bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let addr = listener.local_addr().expect("addr");
        // Queued before anything but `bind` touched the listener.
        let _client = std::net::TcpStream::connect(addr).expect("connect");
        let listener = TcpListener::from_std(listener).expect("listener");
        let (stream, _) = listener.accept().await.expect("accept");
        assert!(stream.nodelay().expect("nodelay"));
    }
}
