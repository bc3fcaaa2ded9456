//! The proxy's settings, with the defaults a production front proxy needs.

use std::time::Duration;

use ipnet::IpNet;

/// Every knob of the proxy. [`Default`] gives production defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct ProxyConfig {
    /// Longest time a client may take to send a request's headers, from its first byte
    /// (slowloris).
    pub client_header_timeout: Duration,
    /// An idle keep-alive client connection is closed after this.
    pub keepalive_timeout: Duration,
    /// Longest wait for a TCP connection to an upstream.
    pub connect_timeout: Duration,
    /// Longest wait for an upstream's response headers once the request is sent (then 504).
    pub response_timeout: Duration,
    /// A body that moves no byte for this long, either way, is cut.
    pub body_idle_timeout: Duration,
    /// Largest request body accepted (413 beyond); `None`: no limit.
    pub max_body_size: Option<u64>,
    /// Largest request head (request line and headers) accepted (431 beyond).
    pub max_header_size: usize,
    /// Client connections served at once; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// Peers whose X-Forwarded-* headers are kept (and appended to); from anyone else
    /// they are replaced.
    pub trusted_proxies: Vec<IpNet>,
    /// How long an upstream whose connect failed is skipped by the balancer.
    pub down_period: Duration,
    /// One log line per request (target `rolld::access`).
    pub access_log: bool,
    /// Threads serving client connections, each with its own event loop (default: one
    /// per core).
    pub workers: usize,
    /// Streams one HTTP/2 client connection may have open at once (its SETTINGS
    /// `MAX_CONCURRENT_STREAMS`; nginx's default is 128, HAProxy's 100). Each open stream
    /// holds at most one upstream connection, so this also bounds the upstream
    /// connections one client connection holds at once.
    pub http2_max_concurrent_streams: u32,
    /// How often an HTTP/2 connection is PINGed to check that the client is still there.
    pub http2_keepalive_interval: Duration,
    /// An HTTP/2 client that does not answer a PING within this is disconnected.
    pub http2_keepalive_timeout: Duration,
    /// An upgraded connection (a WebSocket tunnel) that carries no byte either way for
    /// this long is closed. One hour, as HAProxy's usual `timeout tunnel 1h`: nginx's
    /// 60 s `proxy_read_timeout` is the limit WebSocket users most often raise, and an
    /// app that pings its sockets less often than every minute must not see them cut
    /// when moving behind rolld. It frees the connection's `max_connections` slot
    /// and its place in a drain.
    pub tunnel_idle_timeout: Duration,
    /// An idle connection to an app process is kept this long for the next request, as
    /// nginx's upstream `keepalive_timeout` (60 s); past 4 s it carries only requests
    /// that may be sent again (see `pool`).
    pub upstream_keepalive_timeout: Duration,
    /// How long a request waits for a set while no upstream can take it (start-up,
    /// every process restarting) before it gets 503; zero answers 503 at once. During
    /// a pause, requests wait until the pause ends and then up to this.
    pub hold_timeout: Duration,
    /// Requests held at once; beyond, 503 at once. Each holds its head (at most
    /// `max_header_size`) and its connection's buffers, so this bounds the memory held
    /// requests take.
    pub max_held: usize,
    /// Times a request is sent again after it was written to an app process that failed
    /// before answering, when that is safe (see `retry`); 0: never.
    pub retries: u32,
    /// Largest streamed request body kept to be sent again; a larger one is not resent
    /// (a buffered body can always be read again).
    pub retry_body_limit: u64,
    /// Whether a request whose answer did not come within `response_timeout` is sent
    /// again: off, since the app may still be working on it.
    pub retry_timeouts: bool,
    /// The share (0.0 to 1.0) of the requests of the last 10 s that retries may add.
    pub retry_budget: f64,
    /// Retries per second allowed beyond that share (a quiet service still retries).
    pub retry_budget_floor: u32,
    /// Request and response buffering (see `buffer`).
    pub buffering: crate::buffer::BufferConfig,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            client_header_timeout: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(75),
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(60),
            body_idle_timeout: Duration::from_secs(60),
            max_body_size: Some(100 * 1024 * 1024),
            max_header_size: 64 * 1024,
            max_connections: 10_000,
            trusted_proxies: Vec::new(),
            down_period: Duration::from_secs(2),
            access_log: false,
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            http2_max_concurrent_streams: 100,
            http2_keepalive_interval: Duration::from_secs(30),
            http2_keepalive_timeout: Duration::from_secs(20),
            tunnel_idle_timeout: Duration::from_secs(3600),
            upstream_keepalive_timeout: Duration::from_secs(60),
            hold_timeout: Duration::from_secs(5),
            max_held: 1024,
            retries: 2,
            retry_body_limit: 64 * 1024,
            retry_timeouts: false,
            retry_budget: 0.2,
            retry_budget_floor: 10,
            buffering: crate::buffer::BufferConfig::default(),
        }
    }
}

impl ProxyConfig {
    pub(crate) fn trusts(&self, ip: std::net::IpAddr) -> bool {
        let ip = match ip {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, std::net::IpAddr::V4),
            v4 => v4,
        };
        self.trusted_proxies.iter().any(|net| net.contains(&ip))
    }
}
