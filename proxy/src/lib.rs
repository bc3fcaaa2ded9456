//! rolld's reverse proxy: the front listener that app processes are rolled behind.
//!
//! It knows nothing of processes or configuration files. Its caller builds an
//! [`UpstreamSet`] per generation, installs it with [`Upstreams::swap`], and waits on
//! the returned [`Drain`] until the old set has exactly zero requests in flight.
//!
//! # Layout
//! - [`upstream`]: the swappable set of upstreams, balancing, and the per-request lease.
//! - [`drain`]: waiting for a replaced set's last request.
//! - `hold`: the queue requests wait in while no upstream can take them, and the pause.
//! - `maintenance`: the page every request gets while maintenance is on.
//! - [`config`]: every setting, with production defaults.
//! - `forward`: the per-request path (route, rewrite, send, stream back).
//! - `h1`: rolld's own HTTP/1 server, for the bodiless requests most clients send.
//! - `exchange`: one HTTP/1.1 exchange with an app, driven by the request's own task.
//! - `pool`: keep-alive connections to each upstream.
//! - `retry`: what is safe to send again after an upstream failed under a request,
//!   the kept body, and the retry budget.
//! - `body`: request and response bodies, the response carrying the lease.
//! - [`buffer`]: request and response buffering (memory, then unlinked temporary
//!   files, within a global budget), so slow clients never hold an app worker.
//! - `headers`: hop-by-hop and forwarding headers.
//! - `moved`: when a socket last read bytes, for idle timeouts.
//! - `clock`: the time, read once per poll of a client connection's task.
//! - `activity`: the client connection's IO: header and keep-alive timeouts, and
//!   giving hyper's buffers back while a connection is idle.
//! - `access`: the access log line.
//! - `watchdog`: resetting an HTTP/2 stream whose response makes no progress.
//! - [`stats`]: traffic counters for metrics.
//! - [`error`]: failures the proxy answers itself, mapped to status codes in one place.
//! - [`tls`]: TLS settings, certificates chosen by SNI and swapped on rotation, and
//!   handshake counters.
//! - [`server`]: binding, accepting (plain, TLS, or redirecting to HTTPS), graceful
//!   shutdown.

mod access;
mod activity;
mod body;
pub mod buffer;
mod clock;
pub mod config;
pub mod drain;
pub mod error;
mod exchange;
mod forward;
mod h1;
mod headers;
mod hold;
mod maintenance;
mod moved;
mod pool;
mod retry;
pub mod server;
pub mod stats;
pub mod tls;
pub mod upstream;
mod watchdog;

pub use body::{BodyError, RequestBody, ResponseBody};
pub use buffer::{BufferConfig, BufferStats, SpooledBody};
pub use config::ProxyConfig;
pub use drain::{Drain, DrainTimedOut};
pub use error::ProxyError;
pub use exchange::UpstreamError;
pub use forward::{Client, Proxy};
pub use hold::HoldSnapshot;
pub use maintenance::MaintenancePage;
pub use pool::MAX_IDLE as MAX_IDLE_UPSTREAM_CONNECTIONS;
pub use server::{bind, bind_for_workers, serve, serve_fronts, Front, Listener};
pub use stats::{Stats, StatsSnapshot};
pub use upstream::{Balance, InFlight, OutcomeCounts, Outcomes, Upstream, UpstreamSet, Upstreams};
