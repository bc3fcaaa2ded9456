//! The example app that rolld runs in `examples/rolld.yml` and in its tests.
//!
//! `rolld-example-backend PORT [--unhealthy] [--start-delay MS] [--ignore-term]
//! [--root-status CODE] [--fail-share PERCENT] [--crash-after MS]` listens on
//! 127.0.0.1:PORT (`--ignore-term`: SIGTERM does not stop it). A bad release, for the
//! rollout guard's tests: `--fail-share 20` answers 500 to every fifth request other
//! than `/health` (exactly 20%, evenly spread); `--crash-after MS` exits with status 1
//! MS after its first health check passed.
//! - `GET /` answers `hello from PORT (pid PID)`; with `--root-status CODE`, `GET /`
//!   answers CODE instead (a 3xx with `Location: /login`, as an app behind a login does);
//! - `?delay=MS` on any path delays the answer;
//! - `GET /pid` answers the pid; `GET /health` answers 200 (503 with `--unhealthy`);
//! - `GET /env?name=VAR` answers the value of an environment variable;
//! - `GET /header?name=NAME` answers the value of a request header (as rolld forwarded it);
//! - `GET /log?msg=TEXT` prints TEXT on stdout;
//! - `GET /stream?chunks=N&delay=MS` streams N numbered chunks, MS apart;
//! - `GET /bytes?n=N` answers N bytes;
//! - `POST` (any path) echoes the request body as it arrives; `PUT` reads all of it
//!   first, then answers it back (as an app that stores it would);
//! - with `--effects DIR`, `/effect?id=ID` (any method) appends a line `ID` to
//!   `DIR/effects` (which survives the process: a test counts what was executed, once
//!   per request or not) and answers `done ID from PORT`; with `&die=1`, the first
//!   process to receive that ID (it creates `DIR/died-ID`) exits at once instead,
//!   without answering, after reading the whole request; `/vanish` appends `vanish` to
//!   `DIR/effects` and closes the connection without answering;
//! - `Upgrade: websocket` is a WebSocket echo (every text and binary message comes back);
//!   any other `Upgrade:` switches protocols (101) and echoes raw bytes.
//!
//! `--sync-workers N` makes it a synchronous app server instead, as gunicorn's sync
//! worker, unicorn or one-thread Puma: N workers (threads) take connections from one
//! listener, each serving one request at a time with blocking reads and writes, and
//! closing the connection after it (`Connection: close`). A worker stays busy for as
//! long as its client takes to send the request and read the answer. It serves
//! `/health`, `/pid`, `GET /bytes?n=N` (N bytes, byte i being `i % 251`), `POST` (echoes
//! a `Content-Length` body), `?delay=MS`, and anything else with `hello from PORT (pid
//! PID)`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

type Body = BoxBody<Bytes, hyper::Error>;

struct Options {
    port: u16,
    unhealthy: bool,
    start_delay: Duration,
    root_status: Option<StatusCode>,
    fail_share: u64,
    crash_after: Option<Duration>,
    effects: Option<std::path::PathBuf>,
    /// Serve synchronously with this many workers.
    sync_workers: Option<usize>,
}

fn parse_args() -> Result<Options, String> {
    let mut args = std::env::args().skip(1);
    let mut port = None;
    let mut unhealthy = false;
    let mut start_delay = Duration::ZERO;
    let mut root_status = None;
    let mut fail_share = 0;
    let mut crash_after = None;
    let mut effects = None;
    let mut sync_workers = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--unhealthy" => unhealthy = true,
            "--ignore-term" => {
                use nix::sys::signal::{signal, SigHandler, Signal};
                // SAFETY: SIG_IGN runs no code in a signal context.
                let _ = unsafe { signal(Signal::SIGTERM, SigHandler::SigIgn) };
            }
            "--start-delay" => {
                let ms = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or("--start-delay takes milliseconds")?;
                start_delay = Duration::from_millis(ms);
            }
            "--root-status" => {
                let code = args
                    .next()
                    .and_then(|v| v.parse::<u16>().ok())
                    .and_then(|c| StatusCode::from_u16(c).ok())
                    .ok_or("--root-status takes an HTTP status code")?;
                root_status = Some(code);
            }
            "--fail-share" => {
                fail_share = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|p| *p <= 100)
                    .ok_or("--fail-share takes a percent from 0 to 100")?;
            }
            "--crash-after" => {
                let ms = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or("--crash-after takes milliseconds")?;
                crash_after = Some(Duration::from_millis(ms));
            }
            "--effects" => {
                effects = Some(
                    args.next()
                        .map(std::path::PathBuf::from)
                        .ok_or("--effects takes a folder")?,
                )
            }
            "--sync-workers" => {
                sync_workers = Some(
                    args.next()
                        .and_then(|v| v.parse().ok())
                        .filter(|n| (1..=256).contains(n))
                        .ok_or("--sync-workers takes a count from 1 to 256")?,
                );
            }
            "--port" => port = args.next().and_then(|v| v.parse().ok()),
            other => {
                port = Some(
                    other
                        .parse()
                        .map_err(|_| format!("`{other}` is not a port"))?,
                )
            }
        }
    }
    let port = port.ok_or("usage: rolld-example-backend PORT [--unhealthy] [--start-delay MS]")?;
    Ok(Options {
        port,
        unhealthy,
        start_delay,
        root_status,
        fail_share,
        crash_after,
        effects,
        sync_workers,
    })
}

fn query(req: &Request<Incoming>, key: &str) -> Option<u64> {
    req.uri()
        .query()?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.parse().ok())
}

fn full(text: impl Into<Bytes>) -> Body {
    Full::new(text.into())
        .map_err(|never| match never {})
        .boxed()
}

/// Requests answered other than `/health`, for `--fail-share`.
static ANSWERED: AtomicU64 = AtomicU64::new(0);
/// Set by the first passed health check, for `--crash-after`.
static HEALTHY: std::sync::OnceLock<()> = std::sync::OnceLock::new();

/// What `/vanish` returns: hyper closes the connection without an answer.
#[derive(Debug)]
struct Vanish;

impl std::fmt::Display for Vanish {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("closing without an answer (/vanish)")
    }
}

impl std::error::Error for Vanish {}

/// Appends `line` to `DIR/effects`: one write, so lines of processes side by side
/// never mix.
fn record(dir: &std::path::Path, line: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("effects"))?;
    file.write_all(format!("{line}\n").as_bytes())
}

/// `/effect` and `/vanish` (see the module doc).
async fn effect(
    req: Request<Incoming>,
    port: u16,
    dir: &std::path::Path,
) -> Result<Response<Body>, Vanish> {
    if req.uri().path() == "/vanish" {
        let _ = record(dir, "vanish");
        return Err(Vanish);
    }
    let id = query(&req, "id").unwrap_or(0);
    let die = query(&req, "die") == Some(1);
    // Received whole before anything happens.
    let _ = req.into_body().collect().await;
    if die
        && std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(dir.join(format!("died-{id}")))
            .is_ok()
    {
        eprintln!("exiting on purpose under request {id} (/effect?die=1)");
        std::process::exit(1);
    }
    if let Err(err) = record(dir, &id.to_string()) {
        let mut r = Response::new(full(format!("cannot record {id}: {err}\n")));
        *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        return Ok(r);
    }
    Ok(Response::new(full(format!("done {id} from {port}\n"))))
}

async fn handle(
    mut req: Request<Incoming>,
    port: u16,
    options: Arc<Options>,
) -> Result<Response<Body>, Vanish> {
    let (unhealthy, root_status) = (options.unhealthy, options.root_status);
    if req.uri().path() == "/health" {
        if !unhealthy && HEALTHY.set(()).is_ok() {
            if let Some(after) = options.crash_after {
                tokio::spawn(async move {
                    tokio::time::sleep(after).await;
                    eprintln!("crashing on purpose (--crash-after)");
                    std::process::exit(1);
                });
            }
        }
    } else if options.fail_share > 0 {
        // Request n fails when n * share crosses a hundred: exactly the share, spread.
        let n = ANSWERED.fetch_add(1, Ordering::Relaxed);
        if (n + 1) * options.fail_share / 100 > n * options.fail_share / 100 {
            let mut r = Response::new(full(format!(
                "failing on purpose from {port} (pid {})\n",
                std::process::id()
            )));
            *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            return Ok(r);
        }
    }
    if let Some(ms) = query(&req, "delay") {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let websocket = req
        .headers()
        .get(http::header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    if let (true, Some(key)) = (websocket, req.headers().get("sec-websocket-key").cloned()) {
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let Ok(upgraded) = upgrade.await else { return };
            let mut ws =
                WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
            // Echo every text and binary message; pings are answered by tungstenite.
            while let Some(Ok(message)) = ws.next().await {
                if (message.is_text() || message.is_binary()) && ws.send(message).await.is_err() {
                    break;
                }
            }
        });
        let mut response = Response::new(full(Bytes::new()));
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = response.headers_mut();
        headers.insert(
            http::header::UPGRADE,
            http::HeaderValue::from_static("websocket"),
        );
        headers.insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("upgrade"),
        );
        if let Ok(accept) = http::HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
            headers.insert("sec-websocket-accept", accept);
        }
        return Ok(response);
    }
    if req.headers().contains_key(http::header::UPGRADE) {
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(upgraded) = upgrade.await {
                let mut io = TokioIo::new(upgraded);
                let mut buf = [0u8; 4096];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        let mut response = Response::new(full(Bytes::new()));
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        response.headers_mut().insert(
            http::header::UPGRADE,
            http::HeaderValue::from_static("echo"),
        );
        response.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("upgrade"),
        );
        return Ok(response);
    }
    if let Some(dir) = options.effects.as_deref() {
        if matches!(req.uri().path(), "/effect" | "/vanish") {
            return effect(req, port, dir).await;
        }
    }
    if req.method() == Method::POST {
        return Ok(Response::new(req.into_body().boxed()));
    }
    if req.method() == Method::PUT {
        let body = match req.into_body().collect().await {
            Ok(body) => body.to_bytes(),
            Err(_) => return Err(Vanish),
        };
        return Ok(Response::new(full(body)));
    }
    let response = match req.uri().path() {
        "/" if root_status.is_some() => {
            let status = root_status.unwrap_or(StatusCode::OK);
            let mut r = Response::new(full(format!("{status} from {port}\n")));
            *r.status_mut() = status;
            if status.is_redirection() {
                r.headers_mut().insert(
                    http::header::LOCATION,
                    http::HeaderValue::from_static("/login"),
                );
            }
            r
        }
        "/pid" => Response::new(full(std::process::id().to_string())),
        "/log" => {
            // A line on stdout, for tests of rolld's log files.
            let msg = req
                .uri()
                .query()
                .and_then(|q| q.strip_prefix("msg="))
                .unwrap_or("");
            println!("{msg}");
            Response::new(full("logged\n"))
        }
        "/env" => {
            let name = req
                .uri()
                .query()
                .and_then(|q| q.strip_prefix("name="))
                .unwrap_or("");
            Response::new(full(std::env::var(name).unwrap_or_default()))
        }
        "/header" => {
            let name = req
                .uri()
                .query()
                .and_then(|q| q.strip_prefix("name="))
                .unwrap_or("");
            let value = req
                .headers()
                .get(name)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
            Response::new(full(value.unwrap_or_default()))
        }
        "/health" if unhealthy => {
            let mut r = Response::new(full("unhealthy\n"));
            *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            r
        }
        "/health" => Response::new(full("ok\n")),
        "/bytes" => {
            let n = query(&req, "n").unwrap_or(0) as usize;
            Response::new(full(vec![b'x'; n]))
        }
        "/stream" => {
            let chunks = query(&req, "chunks").unwrap_or(3);
            let pause = Duration::from_millis(query(&req, "chunk_delay").unwrap_or(10));
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            tokio::spawn(async move {
                for i in 0..chunks {
                    if tx.send(Bytes::from(format!("chunk {i}\n"))).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(pause).await;
                }
            });
            Response::new(Chunks(rx).boxed())
        }
        _ => Response::new(full(format!(
            "hello from {port} (pid {})\n",
            std::process::id()
        ))),
    };
    Ok(response)
}

/// A body fed by a channel: each message is one chunk on the wire.
struct Chunks(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for Chunks {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        self.get_mut()
            .0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok(Frame::data(c))))
    }
}

fn main() {
    let options = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("rolld-example-backend: {e}");
            std::process::exit(2);
        }
    };
    if let Some(workers) = options.sync_workers {
        std::thread::sleep(options.start_delay);
        sync::serve(options.port, workers);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build();
    match runtime {
        Ok(runtime) => runtime.block_on(serve(options)),
        Err(e) => {
            eprintln!("rolld-example-backend: cannot start a runtime: {e}");
            std::process::exit(1);
        }
    }
}

async fn serve(options: Options) {
    tokio::time::sleep(options.start_delay).await;
    let addr = SocketAddr::from(([127, 0, 0, 1], options.port));
    let listener = match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("rolld-example-backend: cannot listen on {addr}: {e}");
            std::process::exit(1);
        }
    };
    println!("listening on {addr} (pid {})", std::process::id());
    let port = options.port;
    let options = Arc::new(options);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let options = options.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(req, port, options.clone()));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
    }
}

/// The synchronous mode (`--sync-workers N`): blocking calls, one request per worker.
mod sync {
    use std::io::{self, Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::Arc;
    use std::time::Duration;

    /// Largest request head read.
    const MAX_HEAD: usize = 64 * 1024;

    pub fn serve(port: u16, workers: usize) -> ! {
        let listener = match TcpListener::bind(("127.0.0.1", port)) {
            Ok(l) => Arc::new(l),
            Err(e) => {
                eprintln!("rolld-example-backend: cannot listen on 127.0.0.1:{port}: {e}");
                std::process::exit(1);
            }
        };
        println!(
            "listening on 127.0.0.1:{port} (pid {}), {workers} synchronous worker(s)",
            std::process::id()
        );
        let threads: Vec<_> = (0..workers)
            .map(|_| {
                let listener = listener.clone();
                std::thread::spawn(move || loop {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let _ = answer(stream, port);
                        }
                        // Out of descriptors, say: try again soon.
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                })
            })
            .collect();
        for thread in threads {
            let _ = thread.join();
        }
        std::process::exit(1);
    }

    /// Serves one request on `stream`, then closes it.
    fn answer(mut stream: TcpStream, port: u16) -> io::Result<()> {
        stream.set_nodelay(true)?;
        let mut data = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        let head_end = loop {
            if let Some(at) = data.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            if data.len() > MAX_HEAD {
                return Err(io::Error::other("request head too large"));
            }
            let n = stream.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            data.extend_from_slice(&buf[..n]);
        };
        let head = String::from_utf8_lossy(&data[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let mut first = lines.next().unwrap_or("").split(' ');
        let method = first.next().unwrap_or("").to_string();
        let target = first.next().unwrap_or("/").to_string();
        let length: Option<usize> = lines
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.trim().parse().ok());
        let mut body = data.split_off(head_end);
        if let Some(length) = length {
            while body.len() < length {
                let n = stream.read(&mut buf)?;
                if n == 0 {
                    return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
                }
                body.extend_from_slice(&buf[..n]);
            }
            body.truncate(length);
        }
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let param = |key: &str| -> Option<u64> {
            query
                .split('&')
                .filter_map(|kv| kv.split_once('='))
                .find(|(k, _)| *k == key)
                .and_then(|(_, v)| v.parse().ok())
        };
        if let Some(ms) = param("delay") {
            std::thread::sleep(Duration::from_millis(ms));
        }
        let (status, answer) = if method == "POST" {
            if length.is_none() {
                (
                    "411 Length Required",
                    b"a body needs Content-Length\n".to_vec(),
                )
            } else {
                ("200 OK", body)
            }
        } else {
            match path {
                "/health" => ("200 OK", b"ok\n".to_vec()),
                "/pid" => ("200 OK", std::process::id().to_string().into_bytes()),
                "/bytes" => {
                    let n = param("n").unwrap_or(0) as usize;
                    ("200 OK", (0..n).map(|i| (i % 251) as u8).collect())
                }
                _ => (
                    "200 OK",
                    format!("hello from {port} (pid {})\n", std::process::id()).into_bytes(),
                ),
            }
        };
        let head = format!(
            "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            answer.len()
        );
        stream.write_all(head.as_bytes())?;
        // Blocks for as long as the client takes to read it: the worker serves nobody
        // else meanwhile.
        stream.write_all(&answer)?;
        stream.flush()?;
        // The request was read to its end: closing sends no reset over unread bytes.
        let _ = stream.shutdown(std::net::Shutdown::Both);
        Ok(())
    }
}
