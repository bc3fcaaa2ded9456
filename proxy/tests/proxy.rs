//! The proxy, end to end over real sockets: headers, upgrades, retries, balancing,
//! timeouts, limits, errors, protocols and shutdown.

mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rolld_proxy::{Balance, ProxyConfig};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn config() -> ProxyConfig {
    ProxyConfig::default()
}

async fn front_for(upstream: &Upstream) -> Front {
    Front::start(config(), &[upstream.addr], Balance::LeastConn).await
}

// ---- headers ----------------------------------------------------------------------------

#[tokio::test]
async fn hop_by_hop_request_headers_stay_on_their_hop_and_forwarding_headers_are_set() {
    let up = Upstream::start(Script::Reply(ok("hi"))).await;
    let front = front_for(&up).await;
    let answer = raw(
        front.addr,
        b"GET /a?b=1 HTTP/1.1\r\nHost: example.test\r\nConnection: keep-alive, X-Secret, close\r\nKeep-Alive: timeout=5\r\nX-Secret: 1\r\nTE: trailers\r\nProxy-Connection: keep-alive\r\nProxy: http://evil.test\r\nUpgrade: h2c\r\nX-Kept: yes\r\n\r\n",
        SOON,
    )
    .await;
    assert!(
        text(&answer).starts_with("HTTP/1.1 200"),
        "{}",
        text(&answer)
    );
    let got = up.received().to_ascii_lowercase();
    assert!(got.starts_with("get /a?b=1 http/1.1\r\n"), "{got}");
    assert!(
        got.contains("host: example.test\r\n"),
        "Host is preserved: {got}"
    );
    assert!(got.contains("x-kept: yes\r\n"));
    for gone in [
        "keep-alive:",
        "x-secret",
        "te:",
        "proxy-connection",
        "proxy:",
        "upgrade:",
        "connection: keep-alive",
    ] {
        assert!(
            !got.contains(gone),
            "`{gone}` must not reach the upstream: {got}"
        );
    }
    assert!(got.contains("x-forwarded-for: 127.0.0.1\r\n"), "{got}");
    assert!(got.contains("x-real-ip: 127.0.0.1\r\n"));
    assert!(got.contains("x-forwarded-proto: http\r\n"));
    assert!(got.contains("x-forwarded-host: example.test\r\n"));
}

#[tokio::test]
async fn an_upgrade_to_http2_is_answered_over_http1_and_not_passed_on() {
    // What `curl --http2` sends over plain HTTP.
    let up = Upstream::start(Script::Reply(ok("hi"))).await;
    let front = front_for(&up).await;
    let answer = raw(
        front.addr,
        b"GET / HTTP/1.1\r\nHost: example.test\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n",
        SOON,
    )
    .await;
    let answer = text(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("hi"), "{answer}");
    let got = up.received().to_ascii_lowercase();
    for gone in ["upgrade", "http2-settings"] {
        assert!(
            !got.contains(gone),
            "`{gone}` must not reach the upstream: {got}"
        );
    }
}

#[tokio::test]
async fn hop_by_hop_response_headers_stay_on_their_hop() {
    let up = Upstream::start(Script::Reply(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: X-Internal\r\nX-Internal: 1\r\nKeep-Alive: timeout=3\r\nX-App: yes\r\n\r\nhi"
            .to_vec(),
    ))
    .await;
    let front = front_for(&up).await;
    let answer = get_once(front.addr).await.to_ascii_lowercase();
    assert!(answer.contains("x-app: yes"), "{answer}");
    assert!(!answer.contains("x-internal"), "{answer}");
    assert!(!answer.contains("keep-alive:"), "{answer}");
    assert!(answer.ends_with("\r\n\r\nhi"), "{answer}");
}

#[tokio::test]
async fn x_forwarded_for_from_an_untrusted_client_is_replaced() {
    let up = Upstream::start(Script::Reply(ok("hi"))).await;
    let front = front_for(&up).await;
    raw(
        front.addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\nX-Forwarded-Proto: https\r\nConnection: close\r\n\r\n",
        SOON,
    )
    .await;
    let got = up.received().to_ascii_lowercase();
    assert!(!got.contains("6.6.6.6"), "{got}");
    assert!(got.contains("x-forwarded-for: 127.0.0.1\r\n"));
    assert!(got.contains("x-forwarded-proto: http\r\n"));
}

#[tokio::test]
async fn x_forwarded_for_from_a_trusted_proxy_is_extended() {
    let up = Upstream::start(Script::Reply(ok("hi"))).await;
    let mut cfg = config();
    cfg.trusted_proxies = vec!["127.0.0.0/8".parse().expect("net")];
    let front = Front::start(cfg, &[up.addr], Balance::LeastConn).await;
    raw(
        front.addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 203.0.113.9\r\nX-Forwarded-Proto: https\r\nConnection: close\r\n\r\n",
        SOON,
    )
    .await;
    let got = up.received().to_ascii_lowercase();
    assert!(
        got.contains("x-forwarded-for: 203.0.113.9, 127.0.0.1\r\n"),
        "{got}"
    );
    assert!(got.contains("x-real-ip: 203.0.113.9\r\n"), "{got}");
    assert!(got.contains("x-forwarded-proto: https\r\n"), "{got}");
}

// ---- request framing --------------------------------------------------------------------

#[tokio::test]
async fn a_request_with_content_length_and_chunked_never_smuggles_a_second_request() {
    for buffering in [true, false] {
        smuggling_attempt(buffering).await;
    }
}

async fn smuggling_attempt(buffering: bool) {
    let up = Upstream::start(Script::Reply(ok("hi"))).await;
    let mut cfg = config();
    cfg.buffering.enabled = buffering;
    let front = Front::start(cfg, &[up.addr], Balance::LeastConn).await;
    let answer = raw(
        front.addr,
        b"POST /first HTTP/1.1\r\nHost: x\r\nContent-Length: 48\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        SOON,
    )
    .await;
    // As the README says: refused with 400, and the connection closed after it (`raw`
    // reads until it closes); nothing reaches the upstream.
    let answer = text(&answer);
    assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{answer}");
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_eq!(
        up.connections.load(Ordering::SeqCst),
        0,
        "reached the upstream: {}",
        up.received()
    );
}

#[tokio::test]
async fn an_invalid_chunked_body_is_rejected() {
    let up = Upstream::start(Script::Reply(ok("hi"))).await;
    let front = front_for(&up).await;
    let answer = exchange(front.addr, b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\nnot hex\r\n0\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(
        !up.received().contains("not hex"),
        "a body that cannot be read is not passed on: {}",
        up.received()
    );
}

#[tokio::test]
async fn oversize_headers_get_431() {
    let up = Upstream::start(Script::Reply(ok("hi"))).await;
    let mut cfg = config();
    cfg.max_header_size = 8192;
    let front = Front::start(cfg, &[up.addr], Balance::LeastConn).await;
    let big = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    let answer = exchange(front.addr, big.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    assert_eq!(
        up.connections.load(Ordering::SeqCst),
        0,
        "nothing reached the upstream"
    );
}

#[tokio::test]
async fn a_body_over_max_body_size_gets_413() {
    let up = Upstream::start(Script::Reply(ok("hi"))).await;
    let mut cfg = config();
    cfg.max_body_size = Some(1000);
    let front = Front::start(cfg, &[up.addr], Balance::LeastConn).await;
    // Announced by Content-Length: refused before any upstream is contacted.
    let answer = exchange(
        front.addr,
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert_eq!(up.connections.load(Ordering::SeqCst), 0);
    // Chunked, growing past the limit on the way.
    let mut req = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..3 {
        req.extend_from_slice(format!("1f4\r\n{}\r\n", "b".repeat(500)).as_bytes());
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let answer = exchange(front.addr, &req).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    // Within the limit it passes, up to exactly the limit; one byte more does not.
    let answer = exchange(
        front.addr,
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    for (len, status) in [(1000, "200"), (1001, "413")] {
        let mut req = format!(
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
        )
        .into_bytes();
        req.resize(req.len() + len, b'a');
        let answer = exchange(front.addr, &req).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{len} bytes: {answer}"
        );
    }
}

// ---- upgrades -----------------------------------------------------------------------------

#[tokio::test]
async fn an_upgrade_passes_through_and_counts_as_in_flight_until_it_closes() {
    let up = Upstream::start(Script::UpgradeEcho).await;
    let front = front_for(&up).await;
    let mut s = TcpStream::connect(front.addr).await.expect("connect");
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
        .await
        .expect("send");
    let head = read_until(&mut s, b"\r\n\r\n", 1, SOON).await;
    assert!(text(&head).starts_with("HTTP/1.1 101"), "{}", text(&head));
    assert!(up.received().to_ascii_lowercase().contains("upgrade: echo"));
    s.write_all(b"ping").await.expect("send");
    let mut echo = [0u8; 4];
    s.read_exact(&mut echo).await.expect("echo");
    assert_eq!(&echo, b"ping");
    let set = front.upstreams.current();
    assert_eq!(set.in_flight(), 1, "the upgraded connection is in flight");
    drop(set);
    let mut drain = front
        .upstreams
        .swap(std::sync::Arc::new(rolld_proxy::UpstreamSet::empty()));
    assert!(
        drain
            .wait_timeout(Duration::from_millis(300))
            .await
            .is_err(),
        "the drain waits for the tunnel"
    );
    drop(s);
    drain
        .wait_timeout(SOON)
        .await
        .expect("the drain ends when the tunnel closes");
}

// ---- retries and balancing ----------------------------------------------------------------

#[tokio::test]
async fn a_refused_connection_is_retried_on_another_upstream() {
    let up = Upstream::start(Script::Reply(ok("alive"))).await;
    let front = Front::start(config(), &[dead_port(), up.addr], Balance::RoundRobin).await;
    for _ in 0..10 {
        // A POST too: nothing was sent, so any method is safe to retry.
        let answer = exchange(
            front.addr,
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi",
        )
        .await;
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("alive"),
            "{answer}"
        );
    }
}

#[tokio::test]
async fn round_robin_alternates_exactly() {
    let a = Upstream::start(Script::Reply(ok("a"))).await;
    let b = Upstream::start(Script::Reply(ok("b"))).await;
    let front = Front::start(config(), &[a.addr, b.addr], Balance::RoundRobin).await;
    let mut answers = String::new();
    for _ in 0..10 {
        let answer = get_once(front.addr).await;
        answers.push_str(&answer[answer.len() - 1..]);
    }
    assert_eq!(answers.matches('a').count(), 5, "{answers}");
    assert!(
        answers == "ababababab" || answers == "bababababa",
        "{answers}"
    );
}

#[tokio::test]
async fn least_conn_sends_new_requests_to_the_idle_upstream() {
    let slow = Upstream::start(Script::Silent).await;
    let fast = Upstream::start(Script::Reply(ok("fast"))).await;
    let front = Front::start(config(), &[slow.addr, fast.addr], Balance::LeastConn).await;
    // Occupy the slow one (it never answers).
    let mut hold = Vec::new();
    while slow.connections.load(Ordering::SeqCst) == 0 {
        let mut s = TcpStream::connect(front.addr).await.expect("connect");
        s.write_all(b"GET /hold HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("send");
        hold.push(s);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    hold.truncate(hold.len());
    for _ in 0..10 {
        let answer = get_once(front.addr).await;
        assert!(answer.ends_with("fast"), "{answer}");
    }
}

// ---- timeouts ----------------------------------------------------------------------------

#[tokio::test]
async fn an_upstream_that_never_answers_gives_504() {
    let up = Upstream::start(Script::Silent).await;
    let mut cfg = config();
    cfg.response_timeout = Duration::from_millis(500);
    let front = Front::start(cfg, &[up.addr], Balance::LeastConn).await;
    let answer = get_once(front.addr).await;
    assert!(answer.starts_with("HTTP/1.1 504"), "{answer}");
    assert!(
        answer.ends_with("504 Gateway Timeout\n"),
        "a short plain body: {answer}"
    );
}

/// Writes `bytes` one at a time, `gap` apart, for at most `limit`: whether the proxy
/// cut the connection first (a write failed).
async fn trickle(s: &mut TcpStream, bytes: &[u8], gap: Duration, limit: Duration) -> bool {
    let started = Instant::now();
    for byte in bytes {
        if s.write_all(&[*byte]).await.is_err() {
            return true;
        }
        tokio::time::sleep(gap).await;
        if started.elapsed() > limit {
            break;
        }
    }
    false
}

#[tokio::test]
async fn a_client_sending_headers_one_byte_at_a_time_is_cut_at_the_header_timeout() {
    let up = Upstream::start(Script::Reply(ok("hi"))).await;
    let mut cfg = config();
    cfg.client_header_timeout = Duration::from_secs(1);
    let front = Front::start(cfg, &[up.addr], Balance::LeastConn).await;
    let mut s = TcpStream::connect(front.addr).await.expect("connect");
    let started = Instant::now();
    let request =
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let cut = trickle(
        &mut s,
        request,
        Duration::from_millis(100),
        Duration::from_secs(6),
    )
    .await;
    let rest = read_until_closed(&mut s, Duration::from_secs(3)).await;
    assert!(
        cut || !text(&rest).contains("200 OK"),
        "the slow client was served: {}",
        text(&rest)
    );
    assert!(started.elapsed() < Duration::from_secs(8));
    assert_eq!(up.connections.load(Ordering::SeqCst), 0);
}

/// The header timeout holds for every request of a keep-alive connection, not only its
/// first: a next request whose head trickles in is cut a header timeout after its
/// first byte, long before the keep-alive timeout.
#[tokio::test]
async fn a_next_request_whose_head_trickles_in_is_cut_at_the_header_timeout() {
    let up = Upstream::start(Script::Reply(ok("hi"))).await;
    let mut cfg = config();
    cfg.client_header_timeout = Duration::from_secs(1);
    cfg.keepalive_timeout = Duration::from_secs(60);
    let front = Front::start(cfg, &[up.addr], Balance::LeastConn).await;
    let mut s = TcpStream::connect(front.addr).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("send");
    let first = read_until(&mut s, b"hi", 1, SOON).await;
    assert!(text(&first).starts_with("HTTP/1.1 200"), "{}", text(&first));
    let started = Instant::now();
    let request = b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    // 200 ms apart: about 16 s for the whole head.
    trickle(
        &mut s,
        request,
        Duration::from_millis(200),
        Duration::from_secs(8),
    )
    .await;
    let rest = read_until_closed(&mut s, SOON).await;
    assert!(
        !text(&rest).contains("200 OK"),
        "the slow request was served: {}",
        text(&rest)
    );
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "cut after {:?}, not at the header timeout",
        started.elapsed()
    );
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_keepalive_timeout() {
    let up = Upstream::start(Script::Reply(ok("hi"))).await;
    let mut cfg = config();
    cfg.keepalive_timeout = Duration::from_millis(700);
    cfg.client_header_timeout = Duration::from_secs(30);
    let front = Front::start(cfg, &[up.addr], Balance::LeastConn).await;
    let mut s = TcpStream::connect(front.addr).await.expect("connect");
    // Requests 300 ms apart for 1.5 s, each within the timeout: the clock starts over
    // at each one, counted from the last, however old the connection is.
    for _ in 0..6 {
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("send");
        let first = read_until(&mut s, b"hi", 1, SOON).await;
        assert!(text(&first).starts_with("HTTP/1.1 200"));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("send");
    let last = read_until(&mut s, b"hi", 1, SOON).await;
    assert!(text(&last).starts_with("HTTP/1.1 200"));
    let started = Instant::now();
    let rest = read_until_closed(&mut s, SOON).await;
    assert!(rest.is_empty());
    let idle = started.elapsed();
    assert!(
        idle >= Duration::from_millis(500) && idle < Duration::from_secs(10),
        "closed after {idle:?}"
    );
}

/// The keep-alive clock runs only between requests: a request whose answer takes
/// several keep-alive timeouts is answered, whether the answer is buffered or streamed,
/// and the connection closes once it has stayed idle.
#[tokio::test]
async fn a_request_longer_than_the_keepalive_timeout_is_answered() {
    for buffering in [true, false] {
        let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi".to_vec();
        // 38 bytes 40 ms apart: about 1.5 s, five keep-alive timeouts.
        let up = Upstream::start(Script::Trickle(answer, Duration::from_millis(40))).await;
        let mut cfg = config();
        cfg.buffering.enabled = buffering;
        cfg.keepalive_timeout = Duration::from_millis(300);
        cfg.client_header_timeout = Duration::from_secs(30);
        let front = Front::start(cfg, &[up.addr], Balance::LeastConn).await;
        let mut s = TcpStream::connect(front.addr).await.expect("connect");
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("send");
        let got = read_until_closed(&mut s, SOON).await;
        let got = text(&got);
        assert!(
            got.starts_with("HTTP/1.1 200") && got.ends_with("\r\n\r\nhi"),
            "buffering {buffering}: {got}"
        );
    }
}

/// An upstream may answer before it has read the request's body. The rest of that
/// body, arriving after the answer and a pause long enough for an idle connection to
/// give back its buffers, is still body: never read as a next request, even when the
/// bytes so far ended like a message head and the rest looks like one.
#[tokio::test]
async fn the_rest_of_a_body_after_an_early_answer_is_never_a_next_request() {
    let up = Upstream::start(Script::AnswerAtHead(ok("early"))).await;
    let mut cfg = config();
    cfg.buffering.enabled = false;
    let front = Front::start(cfg, &[up.addr], Balance::LeastConn).await;
    let first = b"field=1\r\n\r\n";
    let rest = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut s = TcpStream::connect(front.addr).await.expect("connect");
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        first.len() + rest.len()
    );
    s.write_all(&[head.as_bytes(), first].concat())
        .await
        .expect("send the head and the first part of the body");
    let answer = read_until(&mut s, b"early", 1, SOON).await;
    assert!(
        text(&answer).starts_with("HTTP/1.1 200"),
        "{}",
        text(&answer)
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    // The connection may have closed meanwhile (the body was not wanted); then the
    // write fails, and that is fine too.
    let _ = s.write_all(rest).await;
    let mut more = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut more)).await;
    assert!(
        !text(&more).contains("HTTP/1.1"),
        "the rest of the body was answered as a request: {}",
        text(&more)
    );
    let seen = up.received().to_ascii_lowercase();
    assert_eq!(
        seen.matches("x-forwarded-for").count(),
        1,
        "one request reached the upstream: {seen}"
    );
}

/// A streamed answer (buffering off) that stalls is cut: the client has its head.
#[tokio::test]
async fn an_upstream_body_that_stalls_is_cut_after_the_idle_timeout() {
    let up = Upstream::start(Script::Reply(
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial".to_vec(),
    ))
    .await;
    let mut cfg = config();
    cfg.buffering.enabled = false;
    cfg.body_idle_timeout = Duration::from_millis(500);
    let front = Front::start(cfg, &[up.addr], Balance::LeastConn).await;
    let started = Instant::now();
    let answer = raw(front.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", SOON).await;
    assert!(started.elapsed() < Duration::from_secs(10));
    let answer = text(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with("partial"),
        "{answer}"
    );
    assert_eq!(front.upstreams.current().in_flight(), 0);
}

/// What a POST announcing 10 bytes of body and sending 3 gets, read until closed.
async fn stalled_body(addr: std::net::SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
        .await
        .expect("send");
    text(&read_until_closed(&mut s, SOON).await)
}

#[tokio::test]
async fn a_client_body_that_stalls_gets_408() {
    let up = Upstream::start(Script::Reply(ok("hi"))).await;
    let mut cfg = config();
    cfg.body_idle_timeout = Duration::from_millis(500);
    let front = Front::start(cfg, &[up.addr], Balance::LeastConn).await;
    let answer = stalled_body(front.addr).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
}

/// Without buffering, the body streams to the app: a client that stalls or sends too much
/// still gets 408 or 413, its own fault, not a 502 blaming the app.
#[tokio::test]
async fn a_streamed_client_body_that_stalls_or_grows_too_large_gets_408_or_413() {
    let up = Upstream::start(Script::Silent).await;
    let mut cfg = config();
    cfg.buffering.enabled = false;
    cfg.body_idle_timeout = Duration::from_millis(500);
    cfg.max_body_size = Some(1000);
    cfg.response_timeout = Duration::from_secs(20);
    let front = Front::start(cfg, &[up.addr], Balance::LeastConn).await;
    let answer = stalled_body(front.addr).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    let mut big = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..3 {
        big.extend_from_slice(format!("1f4\r\n{}\r\n", "b".repeat(500)).as_bytes());
    }
    big.extend_from_slice(b"0\r\n\r\n");
    let answer = text(&raw(front.addr, &big, SOON).await);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
}

// ---- failures ------------------------------------------------------------------------------

/// A small answer is buffered whole before the client gets its head: one that breaks
/// off or stalls after its head becomes a 502 or a 504, never a short success, and the
/// client's connection serves on.
#[tokio::test]
async fn a_small_buffered_answer_that_breaks_off_or_stalls_gets_502_or_504() {
    let mut cfg = config();
    cfg.body_idle_timeout = Duration::from_millis(500);
    for (script, status) in [
        (
            Script::ReplyAndClose(
                b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this".to_vec(),
            ),
            "HTTP/1.1 502",
        ),
        (
            Script::Reply(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial".to_vec()),
            "HTTP/1.1 504",
        ),
    ] {
        let up = Upstream::start(script).await;
        let front = Front::start(cfg.clone(), &[up.addr], Balance::LeastConn).await;
        let mut s = TcpStream::connect(front.addr).await.expect("connect");
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("send");
        let answer = text(&read_until(&mut s, b"Gateway\n", 1, SOON).await);
        assert!(answer.starts_with(status), "{answer}");
        assert!(!answer.contains("only this") && !answer.contains("partial"));
        assert_eq!(front.upstreams.current().in_flight(), 0);
        // Still open: the next request on it is answered.
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("send again");
        let again = text(&read_until_closed(&mut s, SOON).await);
        assert!(again.starts_with("HTTP/1.1 "), "{again}");
    }
}

/// A streamed answer (buffering off) that breaks off is broken for the client too.
#[tokio::test]
async fn an_upstream_closing_mid_body_gives_a_broken_body_not_a_short_success() {
    let up = Upstream::start(Script::ReplyAndClose(
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this".to_vec(),
    ))
    .await;
    let mut cfg = config();
    cfg.buffering.enabled = false;
    let front = Front::start(cfg.clone(), &[up.addr], Balance::LeastConn).await;
    let answer = exchange(front.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    // The client sees the announced length and fewer bytes, then the connection closes.
    assert!(answer.contains("content-length: 100"), "{answer}");
    assert!(answer.ends_with("only this"), "{answer}");
    // The same through a chunked upstream response: no terminating chunk.
    let up = Upstream::start(Script::ReplyAndClose(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n".to_vec(),
    ))
    .await;
    let front = Front::start(cfg, &[up.addr], Balance::LeastConn).await;
    let answer = exchange(front.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(
        answer.contains("abcd") && !answer.ends_with("0\r\n\r\n"),
        "{answer}"
    );
}

#[tokio::test]
async fn errors_are_502_503_with_retry_after_and_short_plain_bodies() {
    // Without holding: today's immediate answers.
    let config = || ProxyConfig {
        hold_timeout: Duration::ZERO,
        ..ProxyConfig::default()
    };
    let front = Front::start(config(), &[], Balance::LeastConn).await;
    let answer = get_once(front.addr).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("retry-after: 1"),
        "{answer}"
    );
    let front = Front::start(config(), &[dead_port()], Balance::LeastConn).await;
    let answer = get_once(front.addr).await;
    assert!(
        answer.starts_with("HTTP/1.1 502") && answer.ends_with("502 Bad Gateway\n"),
        "{answer}"
    );
    assert!(answer
        .to_ascii_lowercase()
        .contains("content-type: text/plain"));
}

#[tokio::test]
async fn a_client_that_goes_away_cancels_the_upstream_request_and_the_count_goes_down() {
    let up = Upstream::start(Script::Silent).await;
    let front = front_for(&up).await;
    let mut s = TcpStream::connect(front.addr).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("send");
    // Wait until the upstream holds the request: a client that leaves
    // earlier cancels it before it is sent, and the upstream sees nothing.
    let deadline = Instant::now() + SOON;
    while front.upstreams.current().in_flight() == 0 || !up.received().contains("GET / ") {
        assert!(
            Instant::now() < deadline,
            "the request never reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(s);
    while front.upstreams.current().in_flight() != 0 || up.closed_early.load(Ordering::SeqCst) == 0
    {
        assert!(
            Instant::now() < deadline,
            "in flight stays {}",
            front.upstreams.current().in_flight()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---- protocols -----------------------------------------------------------------------------

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let a = Upstream::start(Script::Reply(ok("x"))).await;
    let front = front_for(&a).await;
    let answer = exchange(front.addr, b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\nGET /3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert_eq!(answer.matches("HTTP/1.1 200").count(), 3, "{answer}");
    let got = a.received();
    let (p1, p2, p3) = (got.find("GET /1"), got.find("GET /2"), got.find("GET /3"));
    assert!(p1 < p2 && p2 < p3 && p1.is_some(), "{got}");
}

/// An idle HTTP/1 connection gives hyper's buffers back between requests and is
/// served again when the client speaks: nothing of a request may get lost on the way,
/// however its bytes are cut, and whatever came before it on the connection.
#[tokio::test]
async fn a_keep_alive_connection_serves_every_request_however_its_bytes_arrive() {
    let up = Upstream::start(Script::Reply(ok("x"))).await;
    let front = front_for(&up).await;
    let mut s = TcpStream::connect(front.addr).await.expect("connect");
    // One request, then one more after a pause.
    s.write_all(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("send");
    assert!(next_answer(&mut s).await.starts_with("HTTP/1.1 200"));
    tokio::time::sleep(Duration::from_millis(50)).await;
    // A whole request and half of the next one, the rest after the first is answered.
    s.write_all(b"GET /2 HTTP/1.1\r\nHost: x\r\n\r\nGET /3 HTTP/1.1\r\nHo")
        .await
        .expect("send");
    assert!(next_answer(&mut s).await.starts_with("HTTP/1.1 200"));
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.write_all(b"st: x\r\n\r\n").await.expect("send");
    assert!(next_answer(&mut s).await.starts_with("HTTP/1.1 200"));
    // A request cut right before its final CRLF, and one a byte at a time.
    s.write_all(b"GET /4 HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("send");
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.write_all(b"\r\n").await.expect("send");
    assert!(next_answer(&mut s).await.starts_with("HTTP/1.1 200"));
    for byte in b"GET /5 HTTP/1.1\r\nHost: x\r\n\r\n" {
        s.write_all(&[*byte]).await.expect("send");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(next_answer(&mut s).await.starts_with("HTTP/1.1 200"));
    // A request with a body, then bodyless ones again.
    s.write_all(b"POST /6 HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nbody")
        .await
        .expect("send");
    assert!(next_answer(&mut s).await.starts_with("HTTP/1.1 200"));
    s.write_all(b"GET /7 HTTP/1.1\r\nHost: x\r\n\r\nGET /8 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("send");
    let rest = text(&read_until_closed(&mut s, SOON).await);
    assert_eq!(rest.matches("HTTP/1.1 200").count(), 2, "{rest}");
    let got = up.received();
    let order: Vec<_> = (1..=8).map(|i| got.find(&format!(" /{i} HTTP"))).collect();
    assert!(order.iter().all(Option::is_some), "{got}");
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{got}");
    assert!(got.contains("\r\n\r\nbody"), "{got}");
}

/// Reads the next whole answer (each has the body "x").
async fn next_answer(s: &mut TcpStream) -> String {
    text(&read_until(s, b"\r\n\r\nx", 1, SOON).await)
}

#[tokio::test]
async fn head_and_304_answers_leak_no_body_into_the_next_response() {
    let up = Upstream::start(Script::Reply(
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\nETag: \"x\"\r\n\r\n".to_vec(),
    ))
    .await;
    let front = front_for(&up).await;
    let mut s = TcpStream::connect(front.addr).await.expect("connect");
    s.write_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.expect("send");
    let answer = text(&read_until_closed(&mut s, SOON).await);
    assert_eq!(answer.matches("HTTP/1.1 304").count(), 2, "{answer}");
    assert!(answer.ends_with("\r\n\r\n"), "no body bytes: {answer:?}");

    let up = Upstream::start(Script::Reply(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n".to_vec(),
    ))
    .await;
    let front = front_for(&up).await;
    let mut s = TcpStream::connect(front.addr).await.expect("connect");
    s.write_all(b"HEAD /a HTTP/1.1\r\nHost: x\r\n\r\nHEAD /b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.expect("send");
    let answer = text(&read_until_closed(&mut s, SOON).await);
    assert_eq!(answer.matches("HTTP/1.1 200").count(), 2, "{answer}");
    assert!(answer.to_ascii_lowercase().contains("content-length: 5"));
    assert!(answer.ends_with("\r\n\r\n"), "{answer:?}");
}

#[tokio::test]
async fn expect_100_continue_is_answered_then_the_body_is_forwarded() {
    let up = Upstream::start(Script::Reply(ok("got it"))).await;
    let front = front_for(&up).await;
    let mut s = TcpStream::connect(front.addr).await.expect("connect");
    s.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n").await.expect("send");
    let interim = read_until(&mut s, b"\r\n\r\n", 1, SOON).await;
    assert!(
        text(&interim).starts_with("HTTP/1.1 100"),
        "{}",
        text(&interim)
    );
    s.write_all(b"hello").await.expect("body");
    let answer = text(&read_until_closed(&mut s, SOON).await);
    assert!(answer.ends_with("got it"), "{answer}");
    let got = up.received().to_ascii_lowercase();
    assert!(
        got.ends_with("\r\n\r\nhello") && !got.contains("expect:"),
        "{got}"
    );
}

#[tokio::test]
async fn connection_close_is_honoured() {
    let up = Upstream::start(Script::Reply(ok("hi"))).await;
    let front = front_for(&up).await;
    let mut s = TcpStream::connect(front.addr).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("send");
    let started = Instant::now();
    let answer = text(&read_until_closed(&mut s, SOON).await);
    assert!(
        answer.ends_with("hi") && started.elapsed() < Duration::from_secs(5),
        "{answer}"
    );
}

#[tokio::test]
async fn http2_with_prior_knowledge_is_served_on_the_same_port() {
    let up = Upstream::start(Script::Reply(ok("over h2"))).await;
    let front = front_for(&up).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let uri: http::Uri = format!("http://{}/h2", front.addr).parse().expect("uri");
    let response = client.get(uri).await.expect("h2 request");
    assert_eq!(response.version(), http::Version::HTTP_2);
    use http_body_util::BodyExt;
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    assert_eq!(&body[..], b"over h2");
    assert!(
        up.received().starts_with("GET /h2 HTTP/1.1\r\n"),
        "HTTP/1.1 to the upstream"
    );
}

// ---- load and shutdown --------------------------------------------------------------------

#[tokio::test]
async fn five_hundred_slow_clients_do_not_stop_a_normal_request() {
    // Both ends of every connection live in this process: make room for them.
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < 4096 && hard > soft {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard.min(65536), hard);
        }
    }
    let up = Upstream::start(Script::Reply(ok("served"))).await;
    let front = front_for(&up).await;
    let mut slow = Vec::new();
    for _ in 0..500 {
        let mut s = TcpStream::connect(front.addr).await.expect("connect");
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .await
            .expect("partial headers");
        slow.push(s);
    }
    let started = Instant::now();
    let answer = get_once(front.addr).await;
    assert!(answer.ends_with("served"), "{answer}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn at_max_connections_new_clients_wait_instead_of_failing() {
    let up = Upstream::start(Script::Reply(ok("hi"))).await;
    let mut cfg = config();
    cfg.max_connections = 2;
    let front = Front::start(cfg, &[up.addr], Balance::LeastConn).await;
    // Two keep-alive clients, each answered once, so both surely hold a slot: with a
    // socket per worker the kernel may queue a later client on a worker that accepts
    // it before an earlier one on the other.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut client = TcpStream::connect(front.addr).await.expect("connect");
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("send");
        read_until(&mut client, b"hi", 1, SOON).await;
        held.push(client);
    }
    let third = tokio::spawn({
        let addr = front.addr;
        async move {
            text(
                &raw(
                    addr,
                    b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                    SOON,
                )
                .await,
            )
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !third.is_finished(),
        "a third client is not served while two connections are open"
    );
    drop(held.pop());
    let answer = third.await.expect("task");
    assert!(answer.ends_with("hi"), "served once a slot frees: {answer}");
}

/// A client whose request came while it waited for a slot is served once the slot
/// frees, at once: its bytes, seen before it got the slot, are not forgotten.
#[tokio::test]
async fn a_request_sent_while_waiting_for_a_slot_is_answered_when_the_slot_frees() {
    let up = Upstream::start(Script::Reply(ok("hi"))).await;
    let mut cfg = config();
    cfg.max_connections = 1;
    cfg.workers = 1;
    let front = Front::start(cfg, &[up.addr], Balance::LeastConn).await;
    let mut first = TcpStream::connect(front.addr).await.expect("connect");
    first
        .write_all(b"GET / HTTP/1.1\r\n")
        .await
        .expect("half a head");
    let mut second = TcpStream::connect(front.addr).await.expect("connect");
    second
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("send");
    // rolld has accepted the second client once its listener's queue is empty; it then
    // waits for the only slot, which the first holds, and must not answer meanwhile.
    let deadline = Instant::now() + Duration::from_secs(10);
    while accept_queue(front.addr) != Some(0) {
        assert!(
            Instant::now() < deadline,
            "rolld never accepted the second client: queue {:?}",
            accept_queue(front.addr)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut byte = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(200), second.read(&mut byte)).await;
    assert!(
        early.is_err(),
        "answered while the only slot was taken: {early:?}"
    );
    drop(first);
    let answer = read_until_closed(&mut second, Duration::from_secs(5)).await;
    assert!(text(&answer).ends_with("hi"), "{}", text(&answer));
}

#[tokio::test]
async fn shutdown_closes_idle_connections_and_lets_busy_ones_finish_with_connection_close() {
    let up = Upstream::start(Script::Reply(ok("late"))).await;
    let silent = Upstream::start(Script::Silent).await;
    let _ = silent;
    let mut front = front_for(&up).await;
    // An idle keep-alive connection.
    let mut idle = TcpStream::connect(front.addr).await.expect("connect");
    idle.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("send");
    read_until(&mut idle, b"late", 1, SOON).await;
    let done = front.shutdown(SOON);
    let rest = read_until_closed(&mut idle, SOON).await;
    assert!(
        rest.is_empty(),
        "idle connection closed without another answer"
    );
    tokio::time::timeout(SOON, done)
        .await
        .expect("shutdown finishes")
        .expect("task")
        .expect("serve");
    assert!(
        TcpStream::connect(front.addr).await.is_err(),
        "no longer accepting"
    );
}

#[tokio::test]
async fn a_busy_connection_gets_connection_close_on_shutdown() {
    let up = Upstream::start(Script::Silent).await;
    let mut cfg = config();
    cfg.response_timeout = Duration::from_millis(800);
    let mut front = Front::start(cfg, &[up.addr], Balance::LeastConn).await;
    let mut s = TcpStream::connect(front.addr).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("send");
    let deadline = Instant::now() + SOON;
    while up.connections.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let done = front.shutdown(SOON);
    let answer = text(&read_until_closed(&mut s, SOON).await).to_ascii_lowercase();
    assert!(
        answer.starts_with("http/1.1 504"),
        "the busy request still gets its answer: {answer}"
    );
    assert!(answer.contains("connection: close"), "{answer}");
    tokio::time::timeout(SOON, done)
        .await
        .expect("shutdown finishes")
        .expect("task")
        .expect("serve");
}

#[tokio::test]
async fn an_upstream_that_closes_kept_alive_connections_causes_no_client_error() {
    // The app closes every connection after answering, without saying so: the pooled
    // connection is dead when the next request takes it, and that request is sent again.
    let up = Upstream::start(Script::ReplyAndClose(ok("fine"))).await;
    let front = front_for(&up).await;
    let mut s = TcpStream::connect(front.addr).await.expect("connect");
    for i in 0..10 {
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("send");
        let answer = text(&read_until(&mut s, b"fine", 1, SOON).await);
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("fine"),
            "request {i}: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An answer read whole goes back to the pool with its connection, which the next
/// request (from the same client connection, so the same worker's pool) takes: one
/// connection to the app for many requests, small answers or not.
#[tokio::test]
async fn answers_read_whole_leave_their_upstream_connection_to_the_next_request() {
    for size in [3, 40 * 1024] {
        let body = format!("{}end", "b".repeat(size - 3));
        let up = Upstream::start(Script::Reply(ok(&body))).await;
        let front = front_for(&up).await;
        let mut s = TcpStream::connect(front.addr).await.expect("connect");
        for i in 0..5 {
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .expect("send");
            let answer = text(&read_until(&mut s, b"end", 1, SOON).await);
            assert!(
                answer.starts_with("HTTP/1.1 200"),
                "{size} bytes, {i}: {answer}"
            );
            assert!(answer.ends_with(&body), "{size} bytes, {i}");
        }
        assert_eq!(up.connections.load(Ordering::SeqCst), 1, "{size} bytes");
    }
}

#[tokio::test]
async fn an_upstream_answer_with_both_framings_loses_its_content_length_and_its_connection() {
    let up = Upstream::start(Script::Reply(
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n".to_vec(),
    ))
    .await;
    let front = front_for(&up).await;
    for _ in 0..2 {
        let answer = get_once(front.addr).await;
        let lower = answer.to_ascii_lowercase();
        assert!(!lower.contains("content-length: 3"), "{answer}");
        assert!(lower.contains("ok"), "{answer}");
    }
    assert_eq!(
        up.connections.load(Ordering::SeqCst),
        2,
        "that upstream connection was not reused"
    );
}

// ---- hardening (issue 10) -------------------------------------------------------------------

/// Anything but one `Transfer-Encoding: chunked` is refused before routing, as nginx and
/// HAProxy do: a proxy and an app that read the framing differently smuggle requests.
/// That includes a tab around `chunked` (which the parser would trim as optional
/// whitespace) and a `Content-Length` beside it.
#[tokio::test]
async fn a_transfer_encoding_other_than_one_chunked_gets_400_and_reaches_no_upstream() {
    let up = Upstream::start(Script::Reply(ok("hi"))).await;
    let front = front_for(&up).await;
    for te in [
        "Transfer-Encoding: chunked, chunked\r\n",
        "Transfer-Encoding: gzip, chunked\r\n",
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
        "Transfer-Encoding: identity, chunked\r\n",
        "Transfer-Encoding: chunked,\r\n",
        "Transfer-Encoding: ,chunked\r\n",
        "Transfer-Encoding: chunked\t\r\n",
        "Transfer-Encoding:\tchunked\r\n",
        "transfer-encoding: chunked\t \r\n",
        "Transfer-Encoding: chunked\r\nContent-Length: 4\r\n",
        "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
    ] {
        let request = format!("POST / HTTP/1.1\r\nHost: x\r\n{te}\r\n2\r\nhi\r\n0\r\n\r\n");
        let answer = exchange(front.addr, request.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{te:?}: {answer}");
        assert_eq!(
            up.connections.load(Ordering::SeqCst),
            0,
            "{te:?} reached the upstream: {}",
            up.received()
        );
    }
    // One plain `chunked`, in any case, passes.
    let answer = exchange(
        front.addr,
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: Chunked\r\nConnection: close\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // A tab elsewhere in a head is no concern, and a refused head leaves nothing behind
    // for the connection's next request.
    let answer = exchange(
        front.addr,
        b"POST / HTTP/1.1\r\nHost: x\r\nX-Note: a\tb\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test]
async fn a_request_with_two_host_headers_gets_400_and_reaches_no_upstream() {
    let up = Upstream::start(Script::Reply(ok("hi"))).await;
    let front = front_for(&up).await;
    let answer = exchange(
        front.addr,
        b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_eq!(up.connections.load(Ordering::SeqCst), 0);
}

/// Behind trusted proxies the client is the rightmost address that is not one of
/// them (nginx's `real_ip_recursive on`): the leftmost entries are whatever the client
/// wrote.
#[tokio::test]
async fn x_real_ip_behind_trusted_proxies_is_the_rightmost_untrusted_address() {
    let up = Upstream::start(Script::Reply(ok("hi"))).await;
    let mut cfg = config();
    cfg.trusted_proxies = vec![
        "127.0.0.0/8".parse().expect("net"),
        "10.0.0.0/8".parse().expect("net"),
    ];
    let front = Front::start(cfg, &[up.addr], Balance::LeastConn).await;
    raw(
        front.addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 6.6.6.6, 203.0.113.9\r\nX-Forwarded-For: 10.1.2.3\r\nConnection: close\r\n\r\n",
        SOON,
    )
    .await;
    let got = up.received().to_ascii_lowercase();
    assert!(got.contains("x-real-ip: 203.0.113.9\r\n"), "{got}");
    assert!(
        got.contains("x-forwarded-for: 6.6.6.6, 203.0.113.9, 10.1.2.3, 127.0.0.1\r\n"),
        "{got}"
    );
}

/// An HTTP/2 client connection, spoken with the `h2` crate so the test controls flow
/// control and PINGs. The connection task runs (answering PINGs) until the client
/// closes; `closed` resolves when it has.
struct H2Client {
    send: h2::client::SendRequest<bytes::Bytes>,
    ping: h2::PingPong,
    closed: tokio::task::JoinHandle<()>,
}

async fn h2_client(addr: std::net::SocketAddr, window: u32) -> H2Client {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (send, mut conn) = h2::client::Builder::new()
        .initial_window_size(window)
        .handshake::<_, bytes::Bytes>(tcp)
        .await
        .expect("h2 handshake");
    let ping = conn.ping_pong().expect("ping_pong");
    let closed = tokio::spawn(async move {
        let _ = conn.await;
    });
    let send = tokio::time::timeout(SOON, send.ready())
        .await
        .expect("ready in time")
        .expect("ready");
    H2Client { send, ping, closed }
}

fn h2_get(path: &str) -> http::Request<()> {
    http::Request::get(format!("http://x{path}"))
        .body(())
        .expect("request")
}

/// The attack of issue 10: a client grants no flow-control window, asks for large
/// answers on many streams and goes quiet, still answering PINGs. hyper then never
/// polls those bodies again; the stream watchdog resets them after `body_idle_timeout`
/// so they leave the in-flight count and a drain can finish. (Buffered, the answers
/// leave the count once the app has sent them: this is about streamed ones.)
#[tokio::test]
async fn an_http2_client_that_never_opens_its_window_does_not_hold_requests_in_flight() {
    let big = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: 1048576\r\n\r\n{}",
        "x".repeat(1 << 20)
    );
    let up = Upstream::start(Script::Reply(big.into_bytes())).await;
    let mut cfg = config();
    cfg.body_idle_timeout = Duration::from_secs(1);
    cfg.buffering.enabled = false;
    let front = Front::start(cfg, &[up.addr], Balance::LeastConn).await;
    let mut client = h2_client(front.addr, 0).await;
    let started = Instant::now();
    let mut answers = Vec::new();
    for i in 0..20 {
        let (answer, _) = client
            .send
            .send_request(h2_get(&format!("/big/{i}")), true)
            .expect("open a stream");
        answers.push(answer);
    }
    // Every stream gets its head (not flow-controlled), then nothing can move; on a
    // slow machine a stream may already be reset when its head is read.
    let mut heads = 0;
    for answer in answers.iter_mut() {
        match tokio::time::timeout(SOON, answer)
            .await
            .expect("head in time")
        {
            Ok(head) => {
                assert_eq!(head.status(), 200);
                heads += 1;
            }
            Err(err) => assert_eq!(err.reason(), Some(h2::Reason::CANCEL), "{err}"),
        }
    }
    assert!(heads > 0, "no stream was answered");
    let mut drain = front
        .upstreams
        .swap(std::sync::Arc::new(rolld_proxy::UpstreamSet::empty()));
    drain
        .wait_timeout(Duration::from_secs(15))
        .await
        .expect("the stalled streams leave the drain");
    // Reset for making no progress, not for anything earlier.
    let took = started.elapsed();
    eprintln!("stalled streams reset and drained {took:?} after they opened");
    assert!(took >= Duration::from_millis(900), "reset after {took:?}");
    // The client is still connected, and served.
    assert!(!client.closed.is_finished());
    let _ = client.ping.ping(h2::Ping::opaque()).await.expect("pong");
}

/// A whole HTTP/1.0 request shorter than the HTTP/2 preface is answered at once: the
/// sniffing stops at the first byte that is not the preface's.
#[tokio::test]
async fn a_request_shorter_than_the_http2_preface_is_answered() {
    let up = Upstream::start(Script::Reply(ok("hi"))).await;
    let front = front_for(&up).await;
    let request = b"GET / HTTP/1.0\r\n\r\n";
    assert!(request.len() < 24, "shorter than the preface");
    let answer = tokio::time::timeout(Duration::from_secs(5), raw(front.addr, request, SOON))
        .await
        .expect("answered within 5 s, long before the header timeout");
    let answer = text(&answer);
    assert!(
        answer.starts_with("HTTP/1.0 200") && answer.ends_with("hi"),
        "{answer}"
    );
}

/// A client that resets its connection while its first bytes could still be an HTTP/2
/// preface frees its `max_connections` slot at once: the error ends the sniffing.
#[tokio::test]
async fn a_reset_during_the_preface_sniffing_frees_the_connection() {
    let up = Upstream::start(Script::Reply(ok("hi"))).await;
    let mut cfg = config();
    cfg.max_connections = 1;
    let front = Front::start(cfg, &[up.addr], Balance::LeastConn).await;
    let first = std::net::TcpStream::connect(front.addr).expect("connect");
    std::io::Write::write_all(&mut &first, b"PRI").expect("send a preface's start");
    let sock = socket2::SockRef::from(&first);
    sock.set_linger(Some(Duration::ZERO)).expect("linger 0");
    // Time for the proxy to read the bytes and wait for more, as it would for a slow
    // client (the outcome is the same if the reset comes first).
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(first); // a reset, with linger 0
    let answer = tokio::time::timeout(
        Duration::from_secs(10),
        raw(
            front.addr,
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            SOON,
        ),
    )
    .await
    .expect("the next client is served within 10 s");
    assert!(text(&answer).ends_with("hi"), "{}", text(&answer));
}

/// An HTTP/2 preface that arrives in pieces, its end in one packet with the client's
/// first frame, is still read as HTTP/2: the sniffing reads no byte past the preface.
#[tokio::test]
async fn an_http2_preface_in_pieces_is_still_http2() {
    let up = Upstream::start(Script::Reply(ok("hi"))).await;
    let front = front_for(&up).await;
    let mut tcp = TcpStream::connect(front.addr).await.expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    let preface: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    tcp.write_all(&preface[..10]).await.expect("send a piece");
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The rest of the preface and an empty SETTINGS frame.
    tcp.write_all(&[&preface[10..], b"\0\0\0\x04\0\0\0\0\0"].concat())
        .await
        .expect("send the rest");
    let mut first = [0u8; 9];
    tokio::time::timeout(SOON, tcp.read_exact(&mut first))
        .await
        .expect("an answer in time")
        .expect("the server's first frame");
    // A frame header: 3 bytes of length, then the type; SETTINGS is 0x4 on stream 0.
    assert_eq!(
        (first[3], &first[5..9]),
        (0x4, &[0u8, 0, 0, 0][..]),
        "the server's first frame is SETTINGS, not {:?}",
        String::from_utf8_lossy(&first)
    );
}

/// What rolld grants an HTTP/2 client before it passes anything on: 256 KiB of request
/// body a stream and 1 MiB a connection (hyper's default is 1 MiB for each), read from
/// the server's first frames as a client receives them.
#[tokio::test]
async fn an_http2_client_may_send_256_kib_a_stream_and_1_mib_a_connection_ahead() {
    let up = Upstream::start(Script::Reply(ok("hi"))).await;
    let front = front_for(&up).await;
    let mut tcp = TcpStream::connect(front.addr).await.expect("connect");
    // The preface and an empty SETTINGS frame.
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .expect("send the preface");
    let (mut stream_window, mut connection_increment) = (None, None);
    let mut got = Vec::new();
    tokio::time::timeout(SOON, async {
        while stream_window.is_none() || connection_increment.is_none() {
            let mut chunk = [0u8; 1024];
            let n = tcp.read(&mut chunk).await.expect("read");
            assert!(n > 0, "closed after {got:?}");
            got.extend_from_slice(&chunk[..n]);
            // Each complete frame: 3 bytes of length, type, flags, 4 of stream id.
            let mut at = 0;
            while got.len() >= at + 9 {
                let len = u32::from_be_bytes([0, got[at], got[at + 1], got[at + 2]]) as usize;
                let (kind, flags) = (got[at + 3], got[at + 4]);
                let Some(payload) = got.get(at + 9..at + 9 + len) else {
                    break;
                };
                match kind {
                    // SETTINGS, not an ack: 6-byte entries; 0x4 is INITIAL_WINDOW_SIZE.
                    0x4 if flags & 1 == 0 => {
                        for entry in payload.chunks_exact(6) {
                            if u16::from_be_bytes([entry[0], entry[1]]) == 0x4 {
                                stream_window = Some(u32::from_be_bytes([
                                    entry[2], entry[3], entry[4], entry[5],
                                ]));
                            }
                        }
                    }
                    // WINDOW_UPDATE on the connection (stream 0).
                    0x8 if got[at + 5..at + 9] == [0, 0, 0, 0] => {
                        connection_increment = Some(
                            u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]])
                                & 0x7fff_ffff,
                        );
                    }
                    _ => {}
                }
                at += 9 + len;
            }
            got.drain(..at);
        }
    })
    .await
    .expect("the server's SETTINGS and WINDOW_UPDATE in time");
    assert_eq!(stream_window, Some(256 * 1024));
    // The connection starts at 65,535 bytes and grows to 1 MiB.
    assert_eq!(connection_increment, Some(1024 * 1024 - 65_535));
}

#[tokio::test]
async fn an_http2_client_may_open_at_most_100_streams_at_once() {
    let up = Upstream::start(Script::Reply(ok("hi"))).await;
    let front = front_for(&up).await;
    let client = h2_client(front.addr, 65_535).await;
    // The server's SETTINGS arrive with its first frames; the first answer has them.
    let mut send = client.send.clone();
    let (answer, _) = send.send_request(h2_get("/"), true).expect("stream");
    tokio::time::timeout(SOON, answer)
        .await
        .expect("in time")
        .expect("answer");
    assert_eq!(send.current_max_send_streams(), 100);
}

/// Suspected in issue 10 and true: a PING (or WINDOW_UPDATE) on an idle HTTP/2
/// connection started the header clock, closing it after `client_header_timeout`
/// instead of `keepalive_timeout`.
#[tokio::test]
async fn an_idle_http2_connection_that_pings_stays_open_for_the_keepalive_timeout() {
    let up = Upstream::start(Script::Reply(ok("hi"))).await;
    let mut cfg = config();
    cfg.client_header_timeout = Duration::from_millis(500);
    cfg.keepalive_timeout = Duration::from_secs(3);
    let front = Front::start(cfg, &[up.addr], Balance::LeastConn).await;
    let mut client = h2_client(front.addr, 65_535).await;
    let (answer, _) = client.send.send_request(h2_get("/"), true).expect("stream");
    let mut body = tokio::time::timeout(SOON, answer)
        .await
        .expect("in time")
        .expect("answer")
        .into_body();
    while let Some(chunk) = body.data().await {
        chunk.expect("body");
    }
    let idle_from = Instant::now();
    client
        .ping
        .ping(h2::Ping::opaque())
        .await
        .expect("pong on an idle connection");
    tokio::time::timeout(SOON, &mut client.closed)
        .await
        .expect("closed at the keep-alive timeout")
        .expect("task");
    let idle = idle_from.elapsed();
    eprintln!("idle HTTP/2 connection closed after {idle:?}");
    assert!(
        idle >= Duration::from_millis(2500),
        "closed after {idle:?} of idleness"
    );
}

/// `response_timeout` times the app's answer from the end of the request body, as
/// nginx's `proxy_read_timeout` does: a steady upload slower than it is no timeout.
#[tokio::test]
async fn an_upload_slower_than_the_response_timeout_but_steady_succeeds() {
    let up = Upstream::start(Script::Reply(ok("stored"))).await;
    let mut cfg = config();
    cfg.response_timeout = Duration::from_millis(600);
    cfg.body_idle_timeout = Duration::from_secs(5);
    let front = Front::start(cfg, &[up.addr], Balance::LeastConn).await;
    let mut s = TcpStream::connect(front.addr).await.expect("connect");
    s.write_all(
        b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 8\r\nConnection: close\r\n\r\n",
    )
    .await
    .expect("head");
    let started = Instant::now();
    for byte in b"12345678" {
        // Two seconds in all, a byte every 250 ms.
        tokio::time::sleep(Duration::from_millis(250)).await;
        s.write_all(&[*byte]).await.expect("body byte");
    }
    let answer = text(&read_until_closed(&mut s, SOON).await);
    assert!(started.elapsed() >= Duration::from_millis(1800));
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with("stored"),
        "{answer}"
    );
    assert!(up.received().ends_with("\r\n\r\n12345678"));
}

/// An upgraded connection keeps its `max_connections` slot until its tunnel ends, and
/// a tunnel idle for `tunnel_idle_timeout` ends (freeing the slot and the drain).
#[tokio::test]
async fn a_tunnel_keeps_its_connection_slot_until_it_ends_at_the_idle_timeout() {
    let up = Upstream::start(Script::UpgradeEcho).await;
    let ok_up = Upstream::start(Script::Reply(ok("next"))).await;
    let mut cfg = config();
    cfg.max_connections = 1;
    cfg.tunnel_idle_timeout = Duration::from_secs(1);
    let front = Front::start(cfg, &[up.addr], Balance::LeastConn).await;
    let mut tunnel = TcpStream::connect(front.addr).await.expect("connect");
    tunnel
        .write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
        .await
        .expect("send");
    let head = read_until(&mut tunnel, b"\r\n\r\n", 1, SOON).await;
    assert!(text(&head).starts_with("HTTP/1.1 101"), "{}", text(&head));
    tunnel.write_all(b"ping").await.expect("send");
    let mut echo = [0u8; 4];
    tunnel.read_exact(&mut echo).await.expect("echo");
    let last_byte = Instant::now();
    // Later requests go to another app, so the only connection to `up` is the tunnel.
    front
        .upstreams
        .swap(std::sync::Arc::new(rolld_proxy::UpstreamSet::new(
            2,
            &[ok_up.addr],
            Balance::LeastConn,
        )));
    // A second client waits for the slot, which the tunnel holds until it is closed
    // for idleness.
    let answer = get_once(front.addr).await;
    let waited = last_byte.elapsed();
    eprintln!("second client served {waited:?} after the tunnel's last byte");
    assert!(answer.ends_with("next"), "{answer}");
    assert!(
        waited >= Duration::from_millis(500),
        "served after {waited:?}, while the tunnel held the only slot"
    );
    let rest = read_until_closed(&mut tunnel, SOON).await;
    assert!(rest.is_empty(), "the idle tunnel was closed");
    assert!(last_byte.elapsed() < Duration::from_secs(15));
}

/// Found by the header property test: a `Connection` value with a byte beyond ASCII
/// was skipped whole, so the headers it named reached the app; and a client could
/// name `Host` to strip it.
#[tokio::test]
async fn headers_named_by_a_connection_value_with_obs_text_are_still_removed_but_host_stays() {
    let up = Upstream::start(Script::Reply(ok("hi"))).await;
    let front = front_for(&up).await;
    let mut s = TcpStream::connect(front.addr).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: example.test\r\nConnection: x-secret, \xe9t\xe9, host\r\nX-Secret: 1\r\n\r\n")
        .await
        .expect("send");
    let answer = text(&read_until(&mut s, b"hi", 1, SOON).await);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let got = up.received().to_ascii_lowercase();
    assert!(got.starts_with("get / http/1.1\r\n"), "{got}");
    assert!(!got.contains("x-secret"), "{got}");
    assert!(got.contains("host: example.test\r\n"), "{got}");
}

/// As nginx's `proxy_read_timeout`: the response timeout is the longest silence while
/// the answer's head arrives, not a bound on its whole arrival.
#[tokio::test]
async fn an_answer_head_that_arrives_slowly_but_steadily_is_no_timeout() {
    let head = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n".to_vec();
    let up = Upstream::start(Script::Trickle(head, Duration::from_millis(50))).await;
    let mut cfg = config();
    cfg.response_timeout = Duration::from_millis(700);
    let front = Front::start(cfg, &[up.addr], Balance::LeastConn).await;
    let started = Instant::now();
    let answer = get_once(front.addr).await;
    // 38 bytes, 50 ms apart: about 1.9 s in all.
    assert!(started.elapsed() >= Duration::from_millis(1500));
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

/// A small answer is buffered whole before the client gets it, however many reads its
/// body takes.
#[tokio::test]
async fn a_small_answer_whose_body_trickles_in_arrives_whole() {
    let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789".to_vec();
    let up = Upstream::start(Script::Trickle(answer, Duration::from_millis(10))).await;
    let front = Front::start(config(), &[up.addr], Balance::LeastConn).await;
    let answer = get_once(front.addr).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("content-length: 10\r\n"), "{answer}");
    assert!(answer.ends_with("\r\n\r\n0123456789"), "{answer}");
}

/// An app that stops reading the request body is the app's fault: 504 once no byte
/// has gone to it for `body_idle_timeout`, instead of waiting for ever (the response
/// timeout only starts at the end of the body).
#[tokio::test]
async fn an_upstream_that_stops_reading_the_request_body_gives_504() {
    let up = Upstream::start(Script::HeadOnly).await;
    let mut cfg = config();
    cfg.body_idle_timeout = Duration::from_secs(1);
    let front = Front::start(cfg, &[up.addr], Balance::LeastConn).await;
    let size = 64 << 20;
    let mut s = TcpStream::connect(front.addr).await.expect("connect");
    s.write_all(format!("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n").as_bytes())
        .await
        .expect("head");
    let (mut read, mut write) = s.into_split();
    let writer = tokio::spawn(async move {
        let chunk = vec![b'b'; 1 << 20];
        for _ in 0..64 {
            if write.write_all(&chunk).await.is_err() {
                return;
            }
        }
        // Everything written: keep the connection open until the answer.
        std::future::pending::<()>().await;
    });
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(SOON, async {
        let mut chunk = [0u8; 4096];
        while find(&answer, b"\r\n\r\n").is_none() {
            match read.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => answer.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    writer.abort();
    let answer = text(&answer);
    assert!(answer.starts_with("HTTP/1.1 504"), "{answer}");
}

/// A pooled connection that no request takes for longer than
/// `upstream_keepalive_timeout` is closed by rolld on its own, without a request to find
/// it stale, a roll or anything else to come: an app's connections are not held open,
/// half-closed, after a burst of traffic has gone.
#[tokio::test]
async fn a_pooled_connection_left_idle_is_closed_without_a_request_to_find_it() {
    let up = Upstream::start(Script::Reply(ok("hi"))).await;
    let cfg = ProxyConfig {
        upstream_keepalive_timeout: Duration::from_secs(2),
        ..config()
    };
    let front = Front::start(cfg, &[up.addr], Balance::LeastConn).await;
    let answer = get_once(front.addr).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(up.connections.load(Ordering::SeqCst), 1);
    let idle_since = Instant::now();
    let deadline = idle_since + SOON;
    while up.ended.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "the idle pooled connection is still open after {SOON:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        idle_since.elapsed() >= Duration::from_millis(1900),
        "closed after {:?}: a connection idle for less than upstream_keepalive_timeout is kept",
        idle_since.elapsed()
    );
}

/// rolld's own idle keep-alive connections to a replaced set's processes close with
/// the set, so a drain that counts connections on the old ports is not held up by them.
#[tokio::test]
async fn idle_pooled_connections_to_a_replaced_set_are_closed_with_it() {
    let up = Upstream::start(Script::Reply(ok("hi"))).await;
    let front = front_for(&up).await;
    let mut s = TcpStream::connect(front.addr).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("send");
    let answer = text(&read_until(&mut s, b"hi", 1, SOON).await);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(up.connections.load(Ordering::SeqCst), 1);
    let mut drain = front
        .upstreams
        .swap(std::sync::Arc::new(rolld_proxy::UpstreamSet::empty()));
    drain.wait_timeout(SOON).await.expect("nothing in flight");
    let deadline = Instant::now() + SOON;
    while up.ended.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "the pooled connection to the replaced set is still open"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
