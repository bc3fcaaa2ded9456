//! Behaviour that only an exact test tells apart from a near miss: each test here fails
//! for a wrong line that the broader tests let through (found by mutation testing).

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rolld_proxy::{Balance, ProxyConfig};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An upstream whose first connection answers one request, then reads the next one and
/// closes without a word (an app process that died holding it); every later connection
/// answers everything. What it received, per connection, is recorded.
struct DiesOnSecondRequest {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<String>>>,
}

impl DiesOnSecondRequest {
    async fn start() -> DiesOnSecondRequest {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let seen = requests.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let n = connections.fetch_add(1, Ordering::SeqCst);
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut answered = 0;
                    loop {
                        let Some(request) = read_one(&mut stream).await else {
                            return;
                        };
                        seen.lock().expect("lock").push(request);
                        if n == 0 && answered == 1 {
                            return; // read it whole, then gone: the connection closes
                        }
                        let _ = stream.write_all(&ok("fine")).await;
                        answered += 1;
                    }
                });
            }
        });
        DiesOnSecondRequest { addr, requests }
    }

    fn count(&self, method: &str) -> usize {
        self.requests
            .lock()
            .expect("lock")
            .iter()
            .filter(|r| r.starts_with(method))
            .count()
    }
}

/// One request head and its Content-Length body; None at end of stream.
async fn read_one(stream: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            let head = text(&buf[..end]).to_ascii_lowercase();
            let body = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + body {
                return Some(text(&buf));
            }
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Sends `request` on `stream` and reads one answer with a Content-Length body.
async fn ask(stream: &mut TcpStream, request: &[u8]) -> String {
    stream.write_all(request).await.expect("send");
    let answer = read_until(stream, b"\r\n\r\n", 1, SOON).await;
    let head = text(&answer).to_ascii_lowercase();
    let body: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let have = answer.len() - find(&answer, b"\r\n\r\n").map_or(answer.len(), |i| i + 4);
    let mut rest = vec![0u8; body.saturating_sub(have)];
    stream
        .read_exact(&mut rest)
        .await
        .expect("the answer's body");
    text(&answer) + &text(&rest)
}

#[tokio::test]
async fn a_get_on_a_reused_connection_the_app_closed_after_reading_is_sent_again() {
    let up = DiesOnSecondRequest::start().await;
    let front = Front::start(ProxyConfig::default(), &[up.addr], Balance::LeastConn).await;
    let mut client = TcpStream::connect(front.addr).await.expect("connect");
    let first = ask(&mut client, b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    // The pooled connection is taken again, the app reads the GET and closes: nothing
    // was answered and a GET may be sent twice, so it goes again on a new connection.
    let second = ask(&mut client, b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(second.starts_with("HTTP/1.1 200"), "{second}");
    assert!(second.ends_with("fine"), "{second}");
    assert_eq!(up.count("GET /b"), 2, "sent, lost, sent again");
}

#[tokio::test]
async fn a_post_on_a_reused_connection_the_app_closed_after_reading_gets_502_and_is_not_resent() {
    let up = DiesOnSecondRequest::start().await;
    let front = Front::start(ProxyConfig::default(), &[up.addr], Balance::LeastConn).await;
    let mut client = TcpStream::connect(front.addr).await.expect("connect");
    let first = ask(&mut client, b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    // The app may have acted on the POST before it died: it is not sent again.
    let second = ask(
        &mut client,
        b"POST /pay HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
    )
    .await;
    assert!(second.starts_with("HTTP/1.1 502"), "{second}");
    assert_eq!(up.count("POST /pay"), 1, "the POST reached the app once");
}

/// A pause in the traffic leaves the app's connections in the pool, to be reused when
/// requests come back. One that idled past 4 s, when the app may be closing it, takes
/// only a request that would be sent again whole: a GET reuses it; a POST, a PUT whose
/// body is still coming, or a GET with `retries: 0` goes out on a new connection.
#[tokio::test]
async fn after_a_pause_only_a_request_that_can_be_sent_again_reuses_the_apps_connection() {
    async fn connections_after_a_pause(next: &[u8], retries: u32) -> usize {
        let up = Upstream::start(Script::Reply(ok("end"))).await;
        let cfg = ProxyConfig {
            retries,
            ..ProxyConfig::default()
        };
        let front = Front::start(cfg, &[up.addr], Balance::LeastConn).await;
        // One client connection: one worker, so one pool.
        let mut s = TcpStream::connect(front.addr).await.expect("connect");
        for (i, request) in [&b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..], next]
            .into_iter()
            .enumerate()
        {
            if i > 0 {
                // Longer than a pooled connection may idle and still take any request.
                tokio::time::sleep(std::time::Duration::from_millis(4500)).await;
            }
            let answer = ask(&mut s, request).await;
            assert!(
                answer.starts_with("HTTP/1.1 200") && answer.ends_with("end"),
                "request {i}: {answer}"
            );
        }
        up.connections.load(Ordering::SeqCst)
    }
    let get = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    let (get_again, post, put, get_no_retries) = tokio::join!(
        connections_after_a_pause(get, 2),
        connections_after_a_pause(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
            2
        ),
        connections_after_a_pause(
            b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nbody",
            2
        ),
        connections_after_a_pause(get, 0),
    );
    assert_eq!(
        get_again, 1,
        "a GET after a pause did not reuse the app's connection"
    );
    assert_eq!(
        get_no_retries, 2,
        "with `retries: 0`, a GET after a pause was sent on an aged connection"
    );
    assert_eq!(
        post, 2,
        "a POST after a pause was sent on an aged connection"
    );
    assert_eq!(
        put, 2,
        "a PUT with a body after a pause was sent on an aged connection"
    );
}

#[tokio::test]
async fn at_most_64_idle_connections_per_upstream_are_kept() {
    // 70 requests at once, each held by the upstream until all 70 have arrived: 70
    // upstream connections. Once answered, the pool keeps 64 and closes the other 6.
    const BURST: usize = 70;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let arrived = Arc::new(tokio::sync::Semaphore::new(0));
    let closed = Arc::new(AtomicUsize::new(0));
    let (a, c) = (arrived.clone(), closed.clone());
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let (arrived, closed) = (a.clone(), c.clone());
            tokio::spawn(async move {
                while read_one(&mut stream).await.is_some() {
                    arrived.add_permits(1);
                    // Answer once every request of the burst is here.
                    let all = arrived.acquire_many(BURST as u32).await.expect("permits");
                    all.forget();
                    arrived.add_permits(BURST);
                    let _ = stream.write_all(&ok("hi")).await;
                }
                closed.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    // One pool: the cap is per upstream and worker thread.
    let cfg = ProxyConfig {
        workers: 1,
        ..ProxyConfig::default()
    };
    let front = Front::start(cfg, &[addr], Balance::LeastConn).await;
    let clients: Vec<_> = (0..BURST)
        .map(|_| tokio::spawn(get_once(front.addr)))
        .collect();
    for client in clients {
        assert!(client.await.expect("client").ends_with("hi"));
    }
    let deadline = tokio::time::Instant::now() + SOON;
    while closed.load(Ordering::SeqCst) < BURST - 64 {
        assert!(tokio::time::Instant::now() < deadline, "surplus closed");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(closed.load(Ordering::SeqCst), BURST - 64, "64 kept idle");
}

#[tokio::test]
async fn more_workers_than_cores_all_serve() {
    // Upstream connection pools are per worker thread, shared when workers outnumber them.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let up = Upstream::start(Script::Reply(ok("hi"))).await;
    let cfg = ProxyConfig {
        workers: (4 * cores).min(256),
        ..ProxyConfig::default()
    };
    let front = Front::start(cfg, &[up.addr], Balance::LeastConn).await;
    // Many connections, so that every worker thread accepts some.
    for _ in 0..300 {
        let answer = get_once(front.addr).await;
        assert!(answer.ends_with("hi"), "{answer}");
    }
}

/// Waits until the proxy counts `n` idle buffer releases.
async fn wait_idle_releases(front: &Front, n: u64) {
    let deadline = tokio::time::Instant::now() + SOON;
    while front.proxy.stats().snapshot().idle_releases < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{n} idle release(s) within {SOON:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn an_idle_keep_alive_connection_gives_its_buffers_back_and_serves_the_next_request() {
    let up = Upstream::start(Script::Reply(ok("hi"))).await;
    let front = Front::start(ProxyConfig::default(), &[up.addr], Balance::LeastConn).await;
    let mut client = TcpStream::connect(front.addr).await.expect("connect");
    for round in 1..=3 {
        let answer = ask(&mut client, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(answer.ends_with("hi"), "{answer}");
        // Between requests the connection holds no buffers (counted when released).
        wait_idle_releases(&front, round).await;
    }
}

#[tokio::test]
async fn a_busy_keep_alive_connection_keeps_its_state_between_back_to_back_requests() {
    let up = Upstream::start(Script::Reply(ok("hi"))).await;
    let front = Front::start(ProxyConfig::default(), &[up.addr], Balance::LeastConn).await;
    let mut client = TcpStream::connect(front.addr).await.expect("connect");
    for _ in 0..50 {
        let answer = ask(&mut client, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(answer.ends_with("hi"), "{answer}");
    }
    // Rebuilt between requests only after a pause of a quarter of a second, which a
    // stalled test machine may cause now and then, not after each of these.
    let released = front.proxy.stats().snapshot().idle_releases;
    assert!(
        released <= 5,
        "{released} releases in 50 back-to-back requests"
    );
    // Idle now: the state goes back.
    wait_idle_releases(&front, released + 1).await;
}

#[tokio::test]
async fn shutdown_closes_an_idle_connection_within_a_second() {
    let up = Upstream::start(Script::Reply(ok("hi"))).await;
    let mut front = Front::start(ProxyConfig::default(), &[up.addr], Balance::LeastConn).await;
    let mut client = TcpStream::connect(front.addr).await.expect("connect");
    let answer = ask(&mut client, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(answer.ends_with("hi"), "{answer}");
    wait_idle_releases(&front, 1).await;
    // A long grace period: an idle connection must not wait for it.
    let done = front.shutdown(std::time::Duration::from_secs(60));
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(std::time::Duration::from_secs(5), client.read(&mut byte))
        .await
        .expect("the idle connection is closed, not left open until the grace period");
    assert!(matches!(read, Ok(0)), "closed without a word: {read:?}");
    tokio::time::timeout(SOON, done)
        .await
        .expect("shutdown finishes")
        .expect("task")
        .expect("serve");
}
