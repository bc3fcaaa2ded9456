//! Slow clients and a fast one, synchronous apps (the example backend's
//! `--sync-workers` mode and the real gunicorn), and rolld in front of them: what the
//! buffering tests (`buffering.rs`) and the starvation tests (`starvation.rs`) share.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::support::*;

/// Bytes each slow client sends or reads. 256 KiB at 20 KiB/s: about 13 s per transfer,
/// long enough that two workers could serve only a handful of the 40 slow clients in
/// that time without buffering.
pub const SIZE: usize = 256 * 1024;
/// Bytes per second of each slow client.
pub const RATE: usize = 20 * 1024;
/// Slow uploaders, and as many slow downloaders.
pub const SLOW: usize = 20;
/// Longest a slow transfer may take before the test gives it up: a bound, not a check.
pub const TRANSFER_LIMIT: Duration = Duration::from_secs(120);

/// Byte `i` of a download (the sync backend's and the gunicorn app's `/bytes`).
pub fn download_byte(i: usize) -> u8 {
    (i % 251) as u8
}

/// Byte `i` of uploader `k`'s body.
pub fn upload_byte(k: usize, i: usize) -> u8 {
    ((i + 7 * k) % 253) as u8
}

/// Splits a `Connection: close` answer read to its end into status and body.
pub fn parse(answer: &[u8]) -> Result<(u16, &[u8]), String> {
    let end = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no head in {} bytes", answer.len()))?;
    let head = String::from_utf8_lossy(&answer[..end]);
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status in {head}"))?;
    Ok((status, &answer[end + 4..]))
}

pub fn connect(port: u16, recv_buffer: Option<usize>) -> std::io::Result<TcpStream> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    if let Some(size) = recv_buffer {
        // Set before connecting, so the kernel does not grow it: the client really
        // reads at its own pace instead of the kernel's buffers reading for it.
        socket.set_recv_buffer_size(size)?;
    }
    socket.connect_timeout(&addr.into(), Duration::from_secs(10))?;
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(Duration::from_secs(1)))?;
    stream.set_write_timeout(Some(Duration::from_secs(1)))?;
    Ok(stream)
}

/// Reads until the peer closes, at most `rate` bytes per second (unbounded if `None`),
/// giving up at `deadline` or when `stop` is set. `progress` counts bytes read.
pub fn read_all(
    stream: &mut TcpStream,
    rate: Option<usize>,
    deadline: Instant,
    stop: &AtomicBool,
    mut progress: impl FnMut(&[u8]),
) -> Result<Vec<u8>, String> {
    let started = Instant::now();
    let mut out = Vec::new();
    let mut buf = vec![0u8; 2048];
    loop {
        if Instant::now() > deadline || stop.load(Ordering::Relaxed) {
            return Err(format!("gave up after {} bytes", out.len()));
        }
        if let Some(rate) = rate {
            let allowed = (started.elapsed().as_secs_f64() * rate as f64) as usize;
            if out.len() >= allowed {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
        }
        match stream.read(&mut buf) {
            Ok(0) => return Ok(out),
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                progress(&out);
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => return Err(format!("read failed after {} bytes: {e}", out.len())),
        }
    }
}

/// What the slow clients did.
#[derive(Default)]
pub struct Outcome {
    /// Completed transfers with the right bytes, and how long each took.
    pub good: Vec<Duration>,
    pub errors: Vec<String>,
}

/// 20 slow uploaders and 20 slow downloaders, each in its own thread, bounded by
/// `TRANSFER_LIMIT` and by `stop`.
pub struct SlowClients {
    pub threads: Vec<JoinHandle<()>>,
    pub outcome: Arc<Mutex<Outcome>>,
    /// Downloads whose answer head has arrived.
    pub heads: Arc<AtomicUsize>,
    /// Uploads that have sent their first 8 KiB.
    pub uploading: Arc<AtomicUsize>,
    /// Transfers completed so far (good or not).
    pub done: Arc<AtomicUsize>,
    pub stop: Arc<AtomicBool>,
}

impl SlowClients {
    pub fn start(port: u16) -> SlowClients {
        let outcome = Arc::new(Mutex::new(Outcome::default()));
        let heads = Arc::new(AtomicUsize::new(0));
        let uploading = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for k in 0..SLOW {
            let (out, finished, halt) = (outcome.clone(), done.clone(), stop.clone());
            let under_way = uploading.clone();
            threads.push(std::thread::spawn(move || {
                let started = Instant::now();
                let result = upload(port, k, &halt, &under_way);
                finished.fetch_add(1, Ordering::SeqCst);
                let mut outcome = out.lock().expect("lock");
                match result {
                    Ok(()) => outcome.good.push(started.elapsed()),
                    Err(e) => outcome.errors.push(format!("upload {k}: {e}")),
                }
            }));
            let (out, finished, halt) = (outcome.clone(), done.clone(), stop.clone());
            let heads = heads.clone();
            threads.push(std::thread::spawn(move || {
                let started = Instant::now();
                let result = download(port, &heads, &halt);
                finished.fetch_add(1, Ordering::SeqCst);
                let mut outcome = out.lock().expect("lock");
                match result {
                    Ok(()) => outcome.good.push(started.elapsed()),
                    Err(e) => outcome.errors.push(format!("download {k}: {e}")),
                }
            }));
        }
        SlowClients {
            threads,
            outcome,
            heads,
            uploading,
            done,
            stop,
        }
    }

    /// Waits for every transfer (each bounds itself) and returns what they did.
    pub fn finish(self) -> Outcome {
        for thread in self.threads {
            thread.join().expect("slow client thread");
        }
        std::mem::take(&mut *self.outcome.lock().expect("lock"))
    }

    /// Cuts every transfer short and waits for the threads.
    /// Stops every transfer; returns the errors they met.
    pub fn abandon(self) -> Vec<String> {
        self.stop.store(true, Ordering::SeqCst);
        for thread in self.threads {
            let _ = thread.join();
        }
        let outcome = self.outcome.lock().expect("lock");
        outcome.errors.clone()
    }
}

/// POSTs `SIZE` bytes at `RATE` and checks the echo.
pub fn upload(
    port: u16,
    k: usize,
    stop: &AtomicBool,
    uploading: &AtomicUsize,
) -> Result<(), String> {
    let deadline = Instant::now() + TRANSFER_LIMIT;
    let mut stream = connect(port, None).map_err(|e| format!("connect: {e}"))?;
    let head = format!(
        "POST /echo HTTP/1.1\r\nHost: app\r\nContent-Length: {SIZE}\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(head.as_bytes())
        .map_err(|e| format!("head: {e}"))?;
    let body: Vec<u8> = (0..SIZE).map(|i| upload_byte(k, i)).collect();
    let started = Instant::now();
    let mut sent = 0;
    while sent < SIZE {
        if Instant::now() > deadline || stop.load(Ordering::Relaxed) {
            return Err(format!("gave up after sending {sent} bytes"));
        }
        let allowed = (started.elapsed().as_secs_f64() * RATE as f64) as usize;
        if sent >= allowed {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        let end = (sent + 2048).min(SIZE);
        match stream.write(&body[sent..end]) {
            Ok(n) => {
                if sent < 8192 && sent + n >= 8192 {
                    uploading.fetch_add(1, Ordering::SeqCst);
                }
                sent += n;
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => return Err(format!("write failed after {sent} bytes: {e}")),
        }
    }
    let answer = read_all(&mut stream, None, deadline, stop, |_| {})?;
    let (status, echoed) = parse(&answer)?;
    if status != 200 || echoed != body.as_slice() {
        return Err(format!(
            "answer {status} with {} bytes, not the {SIZE} bytes sent",
            echoed.len()
        ));
    }
    Ok(())
}

/// GETs `SIZE` bytes, reading them at `RATE` through a small receive buffer, and checks
/// every byte.
pub fn download(port: u16, heads: &AtomicUsize, stop: &AtomicBool) -> Result<(), String> {
    let deadline = Instant::now() + TRANSFER_LIMIT;
    let mut stream = connect(port, Some(4096)).map_err(|e| format!("connect: {e}"))?;
    let head = format!("GET /bytes?n={SIZE} HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n");
    stream
        .write_all(head.as_bytes())
        .map_err(|e| format!("head: {e}"))?;
    let mut counted = false;
    let answer = read_all(&mut stream, Some(RATE), deadline, stop, |got| {
        if !counted && got.windows(4).any(|w| w == b"\r\n\r\n") {
            counted = true;
            heads.fetch_add(1, Ordering::SeqCst);
        }
    })?;
    let (status, body) = parse(&answer)?;
    if status != 200 || body.len() != SIZE {
        return Err(format!("answer {status} with {} bytes", body.len()));
    }
    if let Some(i) = (0..SIZE).find(|&i| body[i] != download_byte(i)) {
        return Err(format!("byte {i} is wrong"));
    }
    Ok(())
}

/// A fast client: one small request after the other (100 ms apart), each on a new
/// connection, until stopped or for at most two minutes. Each request's time, or its
/// failure, is recorded; a request gives up after `patience`.
pub struct FastClient {
    pub thread: JoinHandle<Vec<Result<Duration, String>>>,
    pub stop: Arc<AtomicBool>,
    pub count: Arc<AtomicUsize>,
}

impl FastClient {
    pub fn start(port: u16, patience: Duration) -> FastClient {
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicUsize::new(0));
        let (halt, counter) = (stop.clone(), count.clone());
        let thread = std::thread::spawn(move || {
            let mut results = Vec::new();
            let started = Instant::now();
            while !halt.load(Ordering::Relaxed)
                && started.elapsed() < Duration::from_secs(120)
                && results.len() < 2000
            {
                let at = Instant::now();
                results.push(fast_request(port, patience).map(|()| at.elapsed()));
                counter.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(100));
            }
            results
        });
        FastClient {
            thread,
            stop,
            count,
        }
    }

    pub fn finish(self) -> Vec<Result<Duration, String>> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().expect("fast client thread")
    }
}

pub fn fast_request(port: u16, patience: Duration) -> Result<(), String> {
    let deadline = Instant::now() + patience;
    let mut stream = connect(port, None).map_err(|e| format!("connect: {e}"))?;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let never = AtomicBool::new(false);
    let answer = read_all(&mut stream, None, deadline, &never, |_| {})
        .map_err(|e| format!("no answer within {patience:?} ({e})"))?;
    match parse(&answer)? {
        (200, body) if body.starts_with(b"hello from ") => Ok(()),
        (status, body) => Err(format!("{status}: {}", String::from_utf8_lossy(body))),
    }
}

/// rolld with `cmd` (with `{port}`) as its only process per set, and an admin
/// listener on the returned port.
pub fn start(cmd: &str, proxy: &str) -> (Rolld, Fixture, u16) {
    let admin = free_ports(1)[0];
    let fixture = Fixture::new(1).cmd(cmd).extra(&format!(
        "  drain_timeout: 60s\nadmin: 127.0.0.1:{admin}\nproxy:\n{proxy}"
    ));
    let rolld = Rolld::start(&fixture);
    (rolld, fixture, admin)
}

/// Whether the app on `port` answers a GET within 300 ms (a free worker took it).
pub fn answers_at_once(port: u16) -> bool {
    let Ok(mut stream) = connect(port, None) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(300)));
    if stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 64];
    matches!(stream.read(&mut buf), Ok(n) if n > 0)
}

/// The value of an unlabelled metric in `/metrics`.
pub fn metric(admin: u16, name: &str) -> Option<u64> {
    let text = get_blocking(admin, "/metrics").ok()?.1;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

pub fn sync_backend() -> String {
    format!("{BACKEND} {{port}} --sync-workers 2")
}

/// The load of the issue, buffered: every fast request is answered in under 1 s while
/// the slow transfers last many seconds, and every slow transfer gets its bytes.
pub fn slow_clients_do_not_hold_workers(cmd: &str) {
    let (rolld, fixture, admin) = start(cmd, "  access_log: false\n");
    let slow = SlowClients::start(fixture.listen);
    let fast = FastClient::start(fixture.listen, Duration::from_secs(10));
    wait_until("answers buffered on disk", SOON, || {
        metric(admin, "rolld_buffer_disk_bytes").is_some_and(|n| n > 0)
    });
    let outcome = slow.finish();
    let fast = fast.finish();
    assert!(
        outcome.errors.is_empty(),
        "slow transfers failed: {:?}",
        outcome.errors
    );
    assert_eq!(outcome.good.len(), 2 * SLOW);
    let shortest = outcome.good.iter().min().copied().unwrap_or_default();
    // The clients really were slow: the transfers lasted many seconds.
    assert!(
        shortest >= Duration::from_secs(8),
        "a slow transfer took only {shortest:?}"
    );
    let slowest_fast = fast
        .iter()
        .map(|r| r.as_ref().copied().map_err(Clone::clone))
        .collect::<Result<Vec<_>, _>>()
        .unwrap_or_else(|e| panic!("a fast request failed: {e}"))
        .into_iter()
        .max()
        .unwrap_or_default();
    assert!(
        fast.len() >= 40,
        "only {} fast requests during the slow transfers",
        fast.len()
    );
    eprintln!(
        "{} fast requests, slowest {slowest_fast:?}; slow transfers took {shortest:?} to {:?}",
        fast.len(),
        outcome.good.iter().max().copied().unwrap_or_default()
    );
    assert!(
        slowest_fast < Duration::from_secs(1),
        "a fast request took {slowest_fast:?}"
    );
    // Every upload (256 KiB, over the 64 KiB in memory) went to disk, and so did the
    // answers the slow downloaders read; once all is sent, nothing is left buffered.
    assert_eq!(
        metric(admin, "rolld_buffer_requests_spilled_total"),
        Some(20)
    );
    let answers = metric(admin, "rolld_buffer_responses_spilled_total").unwrap_or(0);
    assert!(answers >= 20, "{answers} answers spilled");
    wait_until("the buffers emptied", SOON, || {
        metric(admin, "rolld_buffer_memory_bytes") == Some(0)
            && metric(admin, "rolld_buffer_disk_bytes") == Some(0)
    });
    let (_, status, _) = rolld.control("status", &[]);
    assert!(
        status.contains("spilled to disk so far: 20 request(s)"),
        "{status}"
    );
    drop(rolld);
}

pub fn slow_clients_starve_workers_without_buffering(cmd: &str) {
    let (rolld, fixture, _) = start(cmd, "  buffering: false\n");
    let slow = SlowClients::start(fixture.listen);
    // Let the slow clients take the workers first: every upload under way, and the
    // app's own port (past rolld) no longer answering at once. Not waiting for a
    // download's head: when both workers take uploads first, no head comes until those
    // uploads end, many seconds later, when the workers are free again.
    wait_until("slow uploads under way", SOON, || {
        slow.uploading.load(Ordering::SeqCst) == SLOW
    });
    let app = fixture.sets[0][0];
    wait_until("the app's workers held by the slow uploads", SOON, || {
        !answers_at_once(app)
    });
    let fast = FastClient::start(fixture.listen, Duration::from_secs(3));
    wait_until("five fast requests", SOON, || {
        fast.count.load(Ordering::SeqCst) >= 5
    });
    let fast = fast.finish();
    let slow_errors = slow.abandon();
    let log = rolld.log();
    drop(rolld);
    let starved = fast
        .iter()
        .filter(|r| {
            r.as_ref()
                .map_or(true, |took| *took >= Duration::from_secs(1))
        })
        .count();
    eprintln!("without buffering: {fast:?}");
    assert!(
        starved >= 3,
        "only {starved} of {} fast requests waited 1 s or more: {fast:?}; slow clients' errors: {:?}; rolld's log ends: {}",
        fast.len(),
        &slow_errors[..slow_errors.len().min(5)],
        log.lines().rev().take(15).collect::<Vec<_>>().join("\n")
    );
}

/// Bytes of an answer larger than the kernel's socket buffers between the app, rolld and
/// the client can hold (a few MiB each way on loopback): unbuffered, its app could not
/// finish writing it before the client reads.
pub const LARGE: usize = 32 << 20;

/// Downloads `LARGE` bytes through a small receive buffer: reads the head, counts it in
/// `heads`, reads nothing more until `go`, then reads the rest and checks every byte.
pub fn large_download(port: u16, heads: &AtomicUsize, go: &AtomicBool) -> Result<(), String> {
    let deadline = Instant::now() + TRANSFER_LIMIT;
    let mut stream = connect(port, Some(4096)).map_err(|e| format!("connect: {e}"))?;
    let head = format!("GET /bytes?n={LARGE} HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n");
    stream
        .write_all(head.as_bytes())
        .map_err(|e| format!("head: {e}"))?;
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        if Instant::now() > deadline {
            return Err("no head".into());
        }
        match stream.read(&mut buf) {
            Ok(0) => return Err("closed before its head".into()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
    }
    heads.fetch_add(1, Ordering::SeqCst);
    while !go.load(Ordering::SeqCst) {
        if Instant::now() > deadline {
            return Err("never told to read".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let never = AtomicBool::new(false);
    let rest = read_all(&mut stream, None, deadline, &never, |_| {})?;
    got.extend_from_slice(&rest);
    let (status, body) = parse(&got)?;
    if status != 200 || body.len() != LARGE {
        return Err(format!("answer {status} with {} bytes", body.len()));
    }
    if let Some(i) = (0..LARGE).find(|&i| body[i] != download_byte(i)) {
        return Err(format!("byte {i} is wrong"));
    }
    Ok(())
}

/// The gunicorn binary. Without one the test fails, telling how to install it, unless
/// `ROLLD_SKIP_GUNICORN=1` asks to skip it (then it says so loudly); under CI a missing
/// gunicorn always fails: `.ci/run` installs it.
pub fn gunicorn() -> Option<PathBuf> {
    let found = ["/usr/bin/gunicorn", "/usr/local/bin/gunicorn"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists());
    if found.is_none() {
        let ci = std::env::var("CI").as_deref() == Ok("true");
        let skip = std::env::var("ROLLD_SKIP_GUNICORN").as_deref() == Ok("1");
        assert!(
            skip && !ci,
            "gunicorn is not installed: `apt-get install -y gunicorn`, or set ROLLD_SKIP_GUNICORN=1 to skip the gunicorn tests{}",
            if ci { " (not under CI: .ci/run must install it)" } else { "" }
        );
        eprintln!(
            "SKIPPED (ROLLD_SKIP_GUNICORN=1): gunicorn is not installed; this test did not run"
        );
    }
    found
}

/// A WSGI app with the sync backend's endpoints.
pub const WSGI_APP: &str = r#"
import os

def app(environ, start_response):
    path = environ.get("PATH_INFO", "/")
    query = dict(kv.split("=", 1) for kv in environ.get("QUERY_STRING", "").split("&") if "=" in kv)
    if environ["REQUEST_METHOD"] == "POST":
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length)
    elif path == "/health":
        body = b"ok\n"
    elif path == "/bytes":
        n = int(query.get("n", "0"))
        body = bytes(i % 251 for i in range(n))
    else:
        body = ("hello from %s (pid %d)\n" % (os.environ.get("PORT", "?"), os.getpid())).encode()
    start_response("200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", str(len(body)))])
    return [body]
"#;

/// gunicorn with two sync workers serving `WSGI_APP`, written into `dir`.
pub fn gunicorn_cmd(gunicorn: &std::path::Path, dir: &std::path::Path) -> String {
    std::fs::write(dir.join("app.py"), WSGI_APP).expect("write app.py");
    format!(
        "{} --workers 2 --worker-class sync --bind 127.0.0.1:{{port}} --chdir {} --timeout 120 app:app",
        gunicorn.display(),
        dir.display()
    )
}
