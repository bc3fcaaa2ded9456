//! The front listener: binding, the accept loop, and graceful shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
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
use crate::config::ProxyConfig;
use crate::forward::{Client, Proxy};
use crate::watchdog::StreamExecutor;

/// What an HTTP/2 client with prior knowledge sends first.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// HTTP/2 flow-control windows rolld grants a client: how much of request bodies it
/// may send ahead, per stream and per connection.
const STREAM_WINDOW: u32 = 256 * 1024;
const CONNECTION_WINDOW: u32 = 1024 * 1024;

/// Pending connections the kernel queues before rolld accepts them.
const BACKLOG: i32 = 1024;

/// Binds the front listener: SO_REUSEADDR so a restarted rolld binds at once, a real
/// backlog, and close-on-exec so app processes never inherit it.
pub fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_cloexec(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
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
/// accepting from the same listener: a request and its upstream connection stay on one
/// thread, as in nginx's workers, with no wake-ups across threads. Upgraded connections
/// go on after this returns (a drain waits for them); the worker threads end with the
/// process.
pub async fn serve(
    listener: std::net::TcpListener,
    proxy: Arc<Proxy>,
    shutdown: impl Future<Output = Duration>,
) -> io::Result<()> {
    let workers = proxy.config().workers.max(1);
    let (stop, stopped) = tokio::sync::watch::channel(None::<Duration>);
    // Shared by all workers: max_connections holds for the listener as a whole.
    let slots = Arc::new(Semaphore::new(proxy.config().max_connections.max(1)));
    let mut done = Vec::with_capacity(workers);
    for id in 0..workers {
        let listener = listener.try_clone()?;
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
                let result = runtime.block_on(accept(listener, proxy, slots, stopped));
                let _ = finished.send(result);
                // Keep the runtime for the tasks that outlive the listener (tunnels of
                // upgraded connections); the process ends them.
                runtime.block_on(std::future::pending::<()>());
            })?;
        done.push(finished_rx);
    }
    // Only the workers' clones may keep the socket listening: once they stop accepting,
    // new clients must be refused, not queued in a backlog nobody reads.
    drop(listener);
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

/// One worker's accept loop and graceful shutdown.
async fn accept(
    listener: std::net::TcpListener,
    proxy: Arc<Proxy>,
    slots: Arc<Semaphore>,
    stopped: watch::Receiver<Option<Duration>>,
) -> io::Result<()> {
    let listener = TcpListener::from_std(listener)?;
    // tokio interrupts its own event loop (an eventfd write, then one more epoll_wait)
    // whenever a new timer is due before every armed one: with a single busy client,
    // that is each request's response timeout. A tick every second keeps an earlier
    // timer armed, so request timers never do.
    let ticker = tokio::spawn(async {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
        }
    });
    let protocols = Arc::new(Protocols::new(proxy.config()));
    // Every connection task holds a clone; `recv` returns None once all have ended.
    let (open, mut all_closed) = mpsc::channel::<()>(1);
    let shutdown = stopping(stopped.clone());
    tokio::pin!(shutdown);

    let grace = loop {
        // Backpressure: at max_connections the loop stops accepting, and new clients
        // wait in the kernel's queue instead of being refused or crashing rolld.
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break Duration::ZERO,
            },
            grace = &mut shutdown => break grace,
        };
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
            grace = &mut shutdown => break grace,
        };
        if let Err(err) = stream.set_nodelay(true) {
            debug!(client = %peer, error = %err, "set_nodelay failed");
        }
        let conn = Connection {
            stream,
            peer,
            proxy: proxy.clone(),
            protocols: protocols.clone(),
            stopped: stopped.clone(),
            _open: open.clone(),
            slot: permit,
        };
        tokio::spawn(conn.serve());
    };

    drop(listener);
    ticker.abort();
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
    Ok(())
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

/// Resolves to the grace period once the listener is told to stop.
async fn stopping(mut stopped: watch::Receiver<Option<Duration>>) -> Duration {
    match stopped.wait_for(Option::is_some).await {
        Ok(grace) => grace.unwrap_or(Duration::ZERO),
        Err(_) => Duration::ZERO,
    }
}

/// One accepted client connection, until it closes.
struct Connection {
    stream: TcpStream,
    peer: SocketAddr,
    proxy: Arc<Proxy>,
    protocols: Arc<Protocols>,
    stopped: watch::Receiver<Option<Duration>>,
    /// Held while the connection is open, for the shutdown to wait on.
    _open: mpsc::Sender<()>,
    /// One of max_connections; shared with an upgraded connection's tunnel, which
    /// keeps it after this connection hands over its socket.
    slot: OwnedSemaphorePermit,
}

impl Connection {
    /// Serves HTTP/2 (prior knowledge) or HTTP/1. An HTTP/1 connection is served by
    /// one hyper connection after another: when one goes idle it ends and hands the
    /// socket back (see `activity`), so an idle client holds no buffers.
    async fn serve(self) {
        let Connection {
            stream,
            peer,
            proxy,
            protocols,
            stopped,
            // Held until this returns.
            _open,
            slot,
        } = self;
        let (mut io, activity) = ClientIo::new(stream, protocols.timeouts);
        let client = Arc::new(Client::new(peer, activity, proxy.config(), slot));
        let counted = proxy.clone();
        let service = service_fn(move |req: hyper::Request<Incoming>| {
            // In progress from now, not from the future's first poll: hyper may hold a
            // parsed request a while before polling it.
            let busy = client.begin(!req.body().is_end_stream());
            let proxy = proxy.clone();
            let client = client.clone();
            async move { Ok::<_, Infallible>(proxy.handle(req, &client, busy).await) }
        });

        // One future for the connection's life: it stays registered with the channel
        // instead of registering anew for every request. Once it resolves, every path
        // below returns.
        let stop = stopping(stopped);
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
        loop {
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
