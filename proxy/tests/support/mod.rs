//! Test support for the proxy: the real proxy on 127.0.0.1, in front of scripted
//! upstreams that record the bytes they receive, and raw clients that can send what a
//! well-behaved client never would.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rolld_proxy::{Balance, Proxy, ProxyConfig, UpstreamSet, Upstreams};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

pub const SOON: Duration = Duration::from_secs(20);

/// rolld's proxy, serving on a free port.
pub struct Front {
    pub addr: SocketAddr,
    pub upstreams: Arc<Upstreams>,
    pub proxy: Arc<Proxy>,
    stop: Option<oneshot::Sender<Duration>>,
    pub task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Front {
    pub async fn start(config: ProxyConfig, upstreams: &[SocketAddr], balance: Balance) -> Front {
        // A socket for each worker, as rolld binds its front.
        let listener =
            rolld_proxy::bind_for_workers("127.0.0.1:0".parse().expect("addr"), config.workers)
                .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let set = Arc::new(Upstreams::new());
        if !upstreams.is_empty() {
            set.swap(Arc::new(UpstreamSet::new(1, upstreams, balance)));
        }
        let proxy = Arc::new(Proxy::new(set.clone(), config));
        let (stop, rx) = oneshot::channel();
        let task = tokio::spawn(rolld_proxy::serve(listener, proxy.clone(), async move {
            rx.await.unwrap_or(Duration::ZERO)
        }));
        Front {
            addr,
            upstreams: set,
            proxy,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Starts a graceful shutdown with `grace`; the returned handle resolves when done.
    pub fn shutdown(&mut self, grace: Duration) -> tokio::task::JoinHandle<std::io::Result<()>> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(grace);
        }
        self.task.take().expect("not shut down yet")
    }
}

impl Drop for Front {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// What a scripted upstream does with each request it receives.
#[derive(Clone)]
pub enum Script {
    /// Answer with these bytes, keep the connection.
    Reply(Vec<u8>),
    /// Answer with these bytes, then close.
    ReplyAndClose(Vec<u8>),
    /// Read the request, never answer.
    Silent,
    /// Answer `101`, then echo every byte.
    UpgradeEcho,
    /// Answer with these bytes, a byte at a time, this long apart.
    Trickle(Vec<u8>, Duration),
    /// Read the request's head, then neither read its body nor answer.
    HeadOnly,
    /// Read the whole request, then close without answering: a process killed after
    /// it received a request.
    Vanish,
    /// Read the request's head (and what came with it), then close: a process killed
    /// while the request body was still arriving.
    VanishMidBody,
    /// Answer with these bytes as soon as the request's head is read, then read (and
    /// record) whatever else comes, answering nothing more.
    AnswerAtHead(Vec<u8>),
}

/// An upstream that records every byte it receives.
pub struct Upstream {
    pub addr: SocketAddr,
    pub received: Arc<Mutex<Vec<u8>>>,
    pub connections: Arc<std::sync::atomic::AtomicUsize>,
    /// Set when a connection the upstream was answering is closed by the proxy.
    pub closed_early: Arc<std::sync::atomic::AtomicUsize>,
    /// Connections that have ended, whoever closed them.
    pub ended: Arc<std::sync::atomic::AtomicUsize>,
}

impl Upstream {
    pub async fn start(script: Script) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("addr");
        let received = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let closed_early = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let ended = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (rec, conns, closed) = (received.clone(), connections.clone(), closed_early.clone());
        let gone = ended.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                conns.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let (script, rec, closed, gone) =
                    (script.clone(), rec.clone(), closed.clone(), gone.clone());
                tokio::spawn(async move {
                    serve_scripted(stream, script, rec, closed).await;
                    gone.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                });
            }
        });
        Upstream {
            addr,
            received,
            connections,
            closed_early,
            ended,
        }
    }

    pub fn received(&self) -> String {
        String::from_utf8_lossy(&self.received.lock().expect("lock")).into_owned()
    }
}

/// Reads one request (head and body) from `stream`; None at end of stream.
async fn read_request(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    record: &Mutex<Vec<u8>>,
) -> Option<Vec<u8>> {
    loop {
        if let Some(end) = find(buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let mut total = end + 4;
            if let Some(cl) = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
            {
                total += cl;
            } else if head.contains("transfer-encoding: chunked") {
                match find(&buf[end + 4..], b"0\r\n\r\n") {
                    Some(i) => total += i + 5,
                    None => total = usize::MAX,
                }
            }
            if buf.len() >= total {
                let request: Vec<u8> = buf.drain(..total).collect();
                record.lock().expect("lock").extend_from_slice(&request);
                return Some(request);
            }
        }
        let mut chunk = [0u8; 8192];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => {
                record.lock().expect("lock").extend_from_slice(buf);
                return None;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads into `buf` until it holds a whole request head; false if the peer closed first.
pub async fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 1024];
    while find(buf, b"\r\n\r\n").is_none() {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    true
}

async fn serve_scripted(
    mut stream: TcpStream,
    script: Script,
    record: Arc<Mutex<Vec<u8>>>,
    closed: Arc<std::sync::atomic::AtomicUsize>,
) {
    let mut buf = Vec::new();
    if let Script::VanishMidBody | Script::HeadOnly | Script::AnswerAtHead(_) = script {
        if !read_head(&mut stream, &mut buf).await {
            return;
        }
        record.lock().expect("lock").extend_from_slice(&buf);
        if let Script::AnswerAtHead(answer) = &script {
            if stream.write_all(answer).await.is_err() {
                return;
            }
            let mut chunk = [0u8; 4096];
            while let Ok(n @ 1..) = stream.read(&mut chunk).await {
                record.lock().expect("lock").extend_from_slice(&chunk[..n]);
            }
            return;
        }
        if let Script::HeadOnly = script {
            // Hold the connection, reading nothing more, until the test ends.
            std::future::pending::<()>().await;
        }
        return;
    }
    while read_request(&mut stream, &mut buf, &record).await.is_some() {
        match &script {
            Script::Reply(bytes) => {
                if stream.write_all(bytes).await.is_err() {
                    closed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    return;
                }
            }
            Script::ReplyAndClose(bytes) => {
                let _ = stream.write_all(bytes).await;
                return;
            }
            Script::Silent => {
                let mut rest = [0u8; 1024];
                // Wait for the proxy to close (EOF or reset).
                while let Ok(n) = stream.read(&mut rest).await {
                    if n == 0 {
                        break;
                    }
                }
                closed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                return;
            }
            Script::Trickle(bytes, gap) => {
                for byte in bytes {
                    tokio::time::sleep(*gap).await;
                    if stream.write_all(&[*byte]).await.is_err() {
                        closed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        return;
                    }
                }
            }
            Script::HeadOnly | Script::Vanish | Script::VanishMidBody | Script::AnswerAtHead(_) => {
                return
            }
            Script::UpgradeEcho => {
                let _ = stream
                    .write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n")
                    .await;
                let mut chunk = [0u8; 4096];
                loop {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if stream.write_all(&chunk[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// `HTTP/1.1 200` with `body`.
pub fn ok(body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Sends raw bytes and reads until the proxy closes or `deadline` passes.
pub async fn raw(addr: SocketAddr, request: &[u8], deadline: Duration) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr)
        .await
        .expect("connect to the proxy");
    stream.write_all(request).await.expect("send");
    read_until_closed(&mut stream, deadline).await
}

/// Sends `request` on a new connection and returns everything the proxy answered.
pub async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
    text(&raw(addr, request, SOON).await)
}

/// `GET /` on a new connection that closes after the answer.
pub async fn get_once(addr: SocketAddr) -> String {
    exchange(
        addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await
}

/// Reads until the proxy closes the connection (end of stream or reset). A connection
/// still open at `deadline` fails the test: it is not the same as closed.
pub async fn read_until_closed(stream: &mut TcpStream, deadline: Duration) -> Vec<u8> {
    let mut out = Vec::new();
    let closed = tokio::time::timeout(deadline, async {
        let mut chunk = [0u8; 8192];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the connection was still open after {deadline:?}, having sent {:?}",
        text(&out)
    );
    out
}

/// Reads until `needle` has been seen `times` times, or `deadline` passes.
pub async fn read_until(
    stream: &mut TcpStream,
    needle: &[u8],
    times: usize,
    deadline: Duration,
) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(deadline, async {
        let mut chunk = [0u8; 8192];
        while out.windows(needle.len()).filter(|w| *w == needle).count() < times {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    out
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A port with nothing listening on it.
pub fn dead_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

/// How many connections wait in the accept queue of the IPv4 listener on `addr`: the
/// `rx_queue` of its LISTEN row in /proc/net/tcp. None when it is not listed.
pub fn accept_queue(addr: SocketAddr) -> Option<usize> {
    let SocketAddr::V4(v4) = addr else {
        return None;
    };
    let local = format!(
        "{:08X}:{:04X}",
        u32::from_le_bytes(v4.ip().octets()),
        v4.port()
    );
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.get(1) != Some(&local.as_str()) || fields.get(3) != Some(&"0A") {
            return None;
        }
        let (_, rx_queue) = fields.get(4)?.split_once(':')?;
        usize::from_str_radix(rx_queue, 16).ok()
    })
}
