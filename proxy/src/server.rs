//! The front listener: binding, the accept loop, and graceful shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

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

/// Settings of the front connections.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Longest time a client may take to send a request's headers.
    pub header_read_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            header_read_timeout: Duration::from_secs(30),
        }
    }
}

/// Serves `listener` until `shutdown` resolves, then stops accepting, lets each
/// connection finish its current exchange (idle keep-alive connections close at once)
/// for up to `grace`, and returns.
pub async fn serve(
    listener: std::net::TcpListener,
    proxy: Arc<Proxy>,
    config: ServerConfig,
    shutdown: impl Future<Output = ()>,
    grace: impl Future<Output = Duration>,
) -> io::Result<()> {
    let listener = TcpListener::from_std(listener)?;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout)
        .keep_alive(true);
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);

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
            () = &mut shutdown => break,
        };
        if let Err(err) = stream.set_nodelay(true) {
            debug!(client = %peer, error = %err, "set_nodelay failed");
        }
        let proxy = proxy.clone();
        let client = Client::new(peer);
        let service = service_fn(move |req| {
            let proxy = proxy.clone();
            let client = client.clone();
            async move { Ok::<_, Infallible>(proxy.handle(req, &client).await) }
        });
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(err) = conn.await {
                debug!(client = %peer, error = %err, "client connection ended");
            }
        });
    }

    drop(listener);
    let grace = grace.await;
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
