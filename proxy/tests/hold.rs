//! Holding requests while no upstream can take them: arrival order, the timeout, the
//! bound, clients that go away, connect failures, HTTP/2 streams, pause and
//! maintenance; over real sockets.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rolld_proxy::{Balance, MaintenancePage, ProxyConfig, UpstreamSet};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A hold longer than any wait of these tests for an answer (`SOON`): a request
/// answered in time was released by an event, not by the end of its hold.
const LONG: Duration = Duration::from_secs(120);

fn holding(timeout: Duration, max_held: usize) -> ProxyConfig {
    ProxyConfig {
        hold_timeout: timeout,
        max_held,
        // One worker: released requests connect in the order they were woken.
        workers: 1,
        ..ProxyConfig::default()
    }
}

/// An upstream that records the path of each request in the order its connection was
/// accepted, and answers `ok PATH`.
struct Ordered {
    addr: SocketAddr,
    paths: Arc<Mutex<Vec<(usize, String)>>>,
}

impl Ordered {
    async fn start_on(listener: TcpListener) -> Ordered {
        let addr = listener.local_addr().expect("addr");
        let paths = Arc::new(Mutex::new(Vec::new()));
        let seen = paths.clone();
        tokio::spawn(async move {
            let mut n = 0;
            while let Ok((mut stream, _)) = listener.accept().await {
                let (index, seen) = (n, seen.clone());
                n += 1;
                tokio::spawn(async move {
                    let head = read_until(&mut stream, b"\r\n\r\n", 1, SOON).await;
                    let path = text(&head)
                        .split(' ')
                        .nth(1)
                        .unwrap_or_default()
                        .to_string();
                    seen.lock().expect("lock").push((index, path.clone()));
                    let body = format!("ok {path}");
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(answer.as_bytes()).await;
                    let mut rest = [0u8; 1024];
                    while let Ok(n) = stream.read(&mut rest).await {
                        if n == 0 {
                            break;
                        }
                    }
                });
            }
        });
        Ordered { addr, paths }
    }

    async fn start() -> Ordered {
        Ordered::start_on(TcpListener::bind("127.0.0.1:0").await.expect("bind")).await
    }

    /// Paths in the order their connections were accepted.
    fn in_order(&self) -> Vec<String> {
        let mut paths = self.paths.lock().expect("lock").clone();
        paths.sort();
        paths.into_iter().map(|(_, p)| p).collect()
    }
}

/// Sends `GET path` on a new connection and returns the connection, unread.
async fn send_get(addr: SocketAddr, path: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("send");
    stream
}

async fn answer(mut stream: TcpStream) -> String {
    text(&read_until_closed(&mut stream, SOON).await)
}

/// Waits until `n` requests are held.
async fn wait_held(front: &Front, n: usize) {
    let start = Instant::now();
    while front.upstreams.held().held != n {
        assert!(
            start.elapsed() < SOON,
            "{n} held requests expected: {:?}",
            front.upstreams.held()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn held_requests_are_released_in_arrival_order_once_a_set_is_installed() {
    let front = Front::start(holding(LONG, 100), &[], Balance::LeastConn).await;
    let mut waiting = Vec::new();
    for i in 0..6 {
        waiting.push(send_get(front.addr, &format!("/{i}")).await);
        wait_held(&front, i + 1).await;
    }
    let up = Ordered::start().await;
    front.upstreams.swap(Arc::new(UpstreamSet::new(
        2,
        &[up.addr],
        Balance::LeastConn,
    )));
    for (i, stream) in waiting.into_iter().enumerate() {
        let answer = answer(stream).await;
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with(&format!("ok /{i}")),
            "{answer}"
        );
    }
    let order: Vec<String> = (0..6).map(|i| format!("/{i}")).collect();
    assert_eq!(up.in_order(), order, "released in arrival order");
    let held = front.upstreams.held();
    assert_eq!((held.held, held.released, held.timed_out), (0, 6, 0));
}

#[tokio::test]
async fn a_request_held_past_hold_timeout_gets_503_with_retry_after() {
    let front = Front::start(
        holding(Duration::from_millis(400), 100),
        &[],
        Balance::LeastConn,
    )
    .await;
    let start = Instant::now();
    let answer = get_once(front.addr).await;
    let took = start.elapsed();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("retry-after: 1"),
        "{answer}"
    );
    assert!(took >= Duration::from_millis(400), "held first: {took:?}");
    assert_eq!(front.upstreams.held().timed_out, 1);
    assert_eq!(front.upstreams.held().held, 0);
}

#[tokio::test]
async fn with_hold_timeout_zero_a_request_gets_503_at_once() {
    let front = Front::start(holding(Duration::ZERO, 100), &[], Balance::LeastConn).await;
    let start = Instant::now();
    let answer = get_once(front.addr).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(start.elapsed() < Duration::from_secs(10));
    assert_eq!(front.upstreams.held(), Default::default());
}

#[tokio::test]
async fn beyond_max_held_a_request_gets_503_at_once() {
    let front = Front::start(holding(LONG, 2), &[], Balance::LeastConn).await;
    let first = send_get(front.addr, "/a").await;
    let second = send_get(front.addr, "/b").await;
    wait_held(&front, 2).await;
    let start = Instant::now();
    let third = get_once(front.addr).await;
    assert!(third.starts_with("HTTP/1.1 503"), "{third}");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "refused at once, not held (for SOON): {:?}",
        start.elapsed()
    );
    assert_eq!(front.upstreams.held().refused, 1);
    let up = Ordered::start().await;
    front.upstreams.swap(Arc::new(UpstreamSet::new(
        2,
        &[up.addr],
        Balance::LeastConn,
    )));
    assert!(answer(first).await.ends_with("ok /a"));
    assert!(answer(second).await.ends_with("ok /b"));
}

#[tokio::test]
async fn a_client_that_goes_away_leaves_the_queue_and_frees_its_place() {
    let front = Front::start(holding(LONG, 1), &[], Balance::LeastConn).await;
    let gone = send_get(front.addr, "/gone").await;
    wait_held(&front, 1).await;
    drop(gone);
    wait_held(&front, 0).await;
    // Its place is free: the next request is held, not refused.
    let next = send_get(front.addr, "/next").await;
    wait_held(&front, 1).await;
    assert_eq!(front.upstreams.held().refused, 0);
    let up = Ordered::start().await;
    front.upstreams.swap(Arc::new(UpstreamSet::new(
        2,
        &[up.addr],
        Balance::LeastConn,
    )));
    assert!(answer(next).await.ends_with("ok /next"));
    assert_eq!(up.in_order(), vec!["/next".to_string()], "/gone never sent");
}

#[tokio::test]
async fn a_request_whose_connects_all_fail_is_held_until_its_upstream_is_back() {
    let port = dead_port();
    let front = Front::start(holding(LONG, 100), &[port], Balance::LeastConn).await;
    let waiting = send_get(front.addr, "/again").await;
    wait_held(&front, 1).await;
    // The process is back on its port, and the supervisor says so.
    let up = Ordered::start_on(TcpListener::bind(port).await.expect("rebind")).await;
    front.upstreams.current().upstreams()[0].set_available(true);
    let answer = answer(waiting).await;
    assert!(answer.ends_with("ok /again"), "{answer}");
    assert_eq!(up.in_order(), vec!["/again".to_string()]);
}

#[tokio::test]
async fn a_request_is_held_while_its_only_upstream_is_unavailable() {
    let up = Ordered::start().await;
    let front = Front::start(holding(LONG, 100), &[up.addr], Balance::LeastConn).await;
    let upstream = front.upstreams.current().upstreams()[0].clone();
    upstream.set_available(false);
    let waiting = send_get(front.addr, "/later").await;
    wait_held(&front, 1).await;
    assert!(up.in_order().is_empty());
    upstream.set_available(true);
    assert!(answer(waiting).await.ends_with("ok /later"));
}

#[tokio::test]
async fn an_http2_stream_is_held_and_released_like_a_request() {
    let front = Front::start(holding(LONG, 100), &[], Balance::LeastConn).await;
    let tcp = TcpStream::connect(front.addr).await.expect("connect");
    let (mut send, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut streams = Vec::new();
    for i in 0..3 {
        let req = http::Request::get(format!("http://x/h2-{i}"))
            .body(())
            .expect("request");
        let (response, _) = send.send_request(req, true).expect("send");
        streams.push(response);
        wait_held(&front, i + 1).await;
    }
    let up = Ordered::start().await;
    front.upstreams.swap(Arc::new(UpstreamSet::new(
        2,
        &[up.addr],
        Balance::LeastConn,
    )));
    for (i, response) in streams.into_iter().enumerate() {
        let response = tokio::time::timeout(SOON, response)
            .await
            .expect("in time")
            .expect("response");
        assert_eq!(response.status(), 200);
        let mut body = response.into_body();
        let mut got = Vec::new();
        while let Some(chunk) = body.data().await {
            got.extend_from_slice(&chunk.expect("chunk"));
        }
        assert_eq!(text(&got), format!("ok /h2-{i}"));
    }
}

#[tokio::test]
async fn a_pause_holds_requests_although_a_set_is_ready_and_resume_releases_them() {
    let up = Ordered::start().await;
    let front = Front::start(holding(Duration::ZERO, 100), &[up.addr], Balance::LeastConn).await;
    let id = front.upstreams.pause(SOON);
    assert!(front.upstreams.paused_until().is_some());
    let waiting = send_get(front.addr, "/paused").await;
    wait_held(&front, 1).await;
    assert!(
        up.in_order().is_empty(),
        "nothing reaches the app while paused"
    );
    assert!(
        !front.upstreams.resume(Some(id + 1)),
        "another pause's auto-resume does not end this one"
    );
    assert!(front.upstreams.resume(Some(id)));
    assert!(answer(waiting).await.ends_with("ok /paused"));
    assert!(front.upstreams.paused_until().is_none());
}

#[tokio::test]
async fn a_pause_ends_by_itself_after_its_timeout() {
    let up = Ordered::start().await;
    let front = Front::start(holding(Duration::ZERO, 100), &[up.addr], Balance::LeastConn).await;
    let start = Instant::now();
    front.upstreams.pause(Duration::from_millis(500));
    let answer = get_once(front.addr).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        start.elapsed() >= Duration::from_millis(500),
        "held until the pause ended: {:?}",
        start.elapsed()
    );
    assert!(front.upstreams.paused_until().is_none());
}

#[tokio::test]
async fn quiet_resolves_when_the_last_request_in_flight_ends() {
    let up = Upstream::start(Script::Silent).await;
    let front = Front::start(holding(LONG, 100), &[up.addr], Balance::LeastConn).await;
    assert_eq!(front.upstreams.leases(), 0);
    tokio::time::timeout(SOON, front.upstreams.quiet())
        .await
        .expect("quiet with nothing in flight");
    let stream = send_get(front.addr, "/").await;
    let start = Instant::now();
    while front.upstreams.leases() != 1 {
        assert!(start.elapsed() < SOON, "the request never got in flight");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let upstreams = front.upstreams.clone();
    let quiet = tokio::spawn(async move { upstreams.quiet().await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!quiet.is_finished(), "a request is still in flight");
    // The client leaves: its request is cancelled, the lease goes, quiet resolves.
    drop(stream);
    tokio::time::timeout(SOON, quiet)
        .await
        .expect("quiet once the request ended")
        .expect("task");
    assert_eq!(front.upstreams.leases(), 0);
}

#[tokio::test]
async fn maintenance_answers_every_request_with_its_page_and_nothing_reaches_the_app() {
    let up = Ordered::start().await;
    let front = Front::start(holding(LONG, 100), &[up.addr], Balance::LeastConn).await;
    front
        .proxy
        .set_maintenance(Some(MaintenancePage::new(&b"<h1>back soon</h1>"[..], true)));
    let start = Instant::now();
    let answer = get_once(front.addr).await;
    assert!(start.elapsed() < Duration::from_secs(10), "not held");
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    let lower = answer.to_ascii_lowercase();
    assert!(lower.contains("content-type: text/html"), "{answer}");
    assert!(lower.contains("retry-after: "), "{answer}");
    assert!(answer.ends_with("<h1>back soon</h1>"), "{answer}");
    assert!(up.in_order().is_empty());
    front.proxy.set_maintenance(None);
    assert!(get_once(front.addr).await.ends_with("ok /"));
}
