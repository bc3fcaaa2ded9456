//! rolld's reverse proxy: the front listener that app processes are rolled behind.
//!
//! It knows nothing of processes or configuration files. Its caller builds an
//! [`UpstreamSet`] per generation, installs it with [`Upstreams::swap`], and waits on
//! the returned [`Drain`] until the old set has exactly zero requests in flight.
//!
//! # Layout
//! - [`upstream`]: the swappable set of upstreams, balancing, and the per-request lease.
//! - [`drain`]: waiting for a replaced set's last request.
//! - `forward`: the per-request path (route, rewrite, send, stream back).
//! - `pool`: keep-alive connections to each upstream.
//! - `body`: request and response bodies, the response carrying the lease.
//! - `headers`: hop-by-hop and forwarding headers.
//! - [`error`]: failures the proxy answers itself, mapped to status codes in one place.
//! - [`server`]: binding, accepting, graceful shutdown.

mod body;
pub mod drain;
pub mod error;
mod forward;
mod headers;
mod pool;
pub mod server;
pub mod upstream;

pub use body::{RequestBody, ResponseBody};
pub use drain::{Drain, DrainTimedOut};
pub use error::ProxyError;
pub use forward::{Client, Proxy, ProxyConfig};
pub use server::{bind, serve, ServerConfig};
pub use upstream::{Balance, InFlight, Upstream, UpstreamSet, Upstreams};
