//! The front listener: binding, the accept loop, and graceful shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use crate::activity::{ClientIo, Timeouts};
use crate::forward::{Client, Proxy};

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
    mut stopped: tokio::sync::watch::Receiver<Option<Duration>>,
) -> io::Result<()> {
    let listener = TcpListener::from_std(listener)?;
    let config = proxy.config().clone();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // Our own IO enforces the header and keep-alive timeouts (see `activity`).
        .header_read_timeout(None)
        .max_buf_size(config.max_header_size.max(8192))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(config.max_header_size.min(u32::MAX as usize) as u32);
    let timeouts = Timeouts::from_config(&config);
    let graceful = GracefulShutdown::new();
    let shutdown = async move {
        match stopped.wait_for(Option::is_some).await {
            Ok(grace) => grace.unwrap_or(Duration::ZERO),
            Err(_) => Duration::ZERO,
        }
    };
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
        let (io, activity) = ClientIo::new(stream, timeouts);
        let client = Arc::new(Client::new(peer, activity, &config));
        let proxy = proxy.clone();
        let service = service_fn(move |req| {
            let proxy = proxy.clone();
            let client = client.clone();
            async move { Ok::<_, Infallible>(proxy.handle(req, &client).await) }
        });
        let conn = builder
            .serve_connection_with_upgrades(io, service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(err) = conn.await {
                debug!(client = %peer, error = %err, "client connection ended");
            }
            drop(permit);
        });
    };

    drop(listener);
    let open = graceful.count();
    info!(
        connections = open,
        "front listener closed, waiting for {open} connection(s)"
    );
    if tokio::time::timeout(grace, graceful.shutdown())
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
