//! rolld's own HTTP/1 server serves the common request (a head with no body); every
//! other head goes to hyper on the same connection. What a client sees must not tell
//! the two apart: framing, keep-alive, `Date`, order, errors, a graceful stop.

mod support;

use std::time::Duration;

use rolld_proxy::{Balance, ProxyConfig};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn front_for(upstream: &Upstream) -> Front {
    Front::start(ProxyConfig::default(), &[upstream.addr], Balance::LeastConn).await
}

/// Reads one answer with a `Content-Length` (or none) off a kept connection.
async fn answer(stream: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let head = tokio::time::timeout(SOON, read_head(stream, &mut buf)).await;
    assert!(head == Ok(true), "an answer's head in time: {}", text(&buf));
    let end = find(&buf, b"\r\n\r\n").expect("head end") + 4;
    let head = text(&buf[..end]).to_ascii_lowercase();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .map_or(0, |v| v.trim().parse::<usize>().expect("a length"));
    while buf.len() < end + length {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(SOON, stream.read(&mut chunk))
            .await
            .expect("the body in time")
            .expect("read");
        assert!(n > 0, "closed mid-body: {}", text(&buf));
        buf.extend_from_slice(&chunk[..n]);
    }
    text(&buf)
}

#[tokio::test]
async fn a_get_is_answered_with_its_length_and_a_date_and_the_connection_serves_the_next() {
    let up = Upstream::start(Script::Reply(ok("hello"))).await;
    let front = front_for(&up).await;
    let mut s = TcpStream::connect(front.addr).await.expect("connect");
    for path in ["/1", "/2", "/3"] {
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
        s.write_all(request.as_bytes()).await.expect("send");
        let got = answer(&mut s).await;
        assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
        assert!(got.contains("content-length: 5\r\n"), "{got}");
        assert!(got.contains("\r\ndate: "), "{got}");
        assert!(!got.contains("connection: close"), "{got}");
        assert!(got.ends_with("\r\n\r\nhello"), "{got}");
    }
    assert_eq!(up.received().matches("GET /").count(), 3);
    assert_eq!(
        up.connections.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "one upstream connection, kept"
    );
}

#[tokio::test]
async fn connection_close_is_answered_with_connection_close_and_the_connection_ends() {
    let up = Upstream::start(Script::Reply(ok("bye"))).await;
    let front = front_for(&up).await;
    let got = exchange(
        front.addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
    assert!(got.contains("connection: close\r\n"), "{got}");
    assert!(got.ends_with("bye"), "{got}");
}

/// Bodies, HTTP/1.0 and `Expect` are hyper's: a connection that mixes them with plain
/// GETs, pipelined in one write, gets every answer, in order.
#[tokio::test]
async fn requests_left_to_hyper_and_plain_gets_on_one_connection_are_answered_in_order() {
    let up = Upstream::start(Script::Reply(ok("x"))).await;
    let front = front_for(&up).await;
    let answer = exchange(
        front.addr,
        b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n\
          POST /2 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
          GET /3 HTTP/1.1\r\nHost: x\r\n\r\n\
          POST /4 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n\
          GET /5 HTTP/1.0\r\nHost: x\r\n\r\n",
    )
    .await;
    assert_eq!(answer.matches("200 OK").count(), 5, "{answer}");
    let got = up.received();
    let at = |what: &str| got.find(what).unwrap_or_else(|| panic!("{what} in {got}"));
    assert!(at("GET /1") < at("POST /2"), "{got}");
    assert!(at("POST /2") < at("hello"), "{got}");
    assert!(at("hello") < at("GET /3"), "{got}");
    assert!(at("GET /3") < at("POST /4"), "{got}");
    assert!(at("abc") < at("GET /5"), "{got}");
}

/// After hyper served a request with a body, the idle connection comes back to rolld's
/// own server and still answers.
#[tokio::test]
async fn a_connection_goes_on_after_a_request_hyper_served() {
    let up = Upstream::start(Script::Reply(ok("x"))).await;
    let front = front_for(&up).await;
    let mut s = TcpStream::connect(front.addr).await.expect("connect");
    s.write_all(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
        .await
        .expect("send");
    assert!(answer(&mut s).await.starts_with("HTTP/1.1 200"));
    // Long enough for hyper to give the idle connection back.
    tokio::time::sleep(Duration::from_millis(400)).await;
    for _ in 0..3 {
        s.write_all(b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("send");
        assert!(answer(&mut s).await.starts_with("HTTP/1.1 200"));
    }
    assert_eq!(up.received().matches("GET /b").count(), 3);
}

#[tokio::test]
async fn heads_that_are_not_http_get_400_and_reach_no_app() {
    let up = Upstream::start(Script::Reply(ok("x"))).await;
    let front = front_for(&up).await;
    for bad in [
        &b"GET /a<b HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: x\r\nNo colon here\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nBad\x01Name: y\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nX: a\x7fb\r\n\r\n",
    ] {
        let got = exchange(front.addr, bad).await;
        assert!(got.starts_with("HTTP/1.1 400"), "{:?}: {got}", text(bad));
    }
    assert_eq!(up.received(), "", "nothing reached the app");
}

#[tokio::test]
async fn an_answer_of_unknown_length_reaches_the_client_in_chunks() {
    let up = Upstream::start(Script::ReplyAndClose(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nno length here".to_vec(),
    ))
    .await;
    let front = front_for(&up).await;
    let got = exchange(
        front.addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(got.contains("transfer-encoding: chunked\r\n"), "{got}");
    let body = &got[got.find("\r\n\r\n").expect("head end") + 4..];
    let mut whole = String::new();
    let mut rest = body;
    loop {
        let (size, after) = rest.split_once("\r\n").expect("a chunk size line");
        let size = usize::from_str_radix(size, 16).expect("hex size");
        if size == 0 {
            assert_eq!(after, "\r\n", "the last chunk ends the body");
            break;
        }
        whole.push_str(&after[..size]);
        rest = after[size..].strip_prefix("\r\n").expect("chunk end");
    }
    assert_eq!(whole, "no length here");
}

#[tokio::test]
async fn a_head_request_gets_the_apps_length_and_no_body() {
    let up = Upstream::start(Script::Reply(
        b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n".to_vec(),
    ))
    .await;
    let front = front_for(&up).await;
    let mut s = TcpStream::connect(front.addr).await.expect("connect");
    s.write_all(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\nHEAD /next HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("send");
    let got = text(&read_until_closed(&mut s, SOON).await);
    let (first, second) = got.split_at(got.find("\r\n\r\n").expect("head end") + 4);
    assert!(first.contains("content-length: 1234\r\n"), "{got}");
    assert!(
        second.starts_with("HTTP/1.1 200"),
        "no body before the next answer: {got}"
    );
    assert!(second.ends_with("\r\n\r\n"), "{got}");
}

/// Sends a GET to an app that answers `answer` a byte every `gap`, starts a graceful
/// stop once the app has the request, and returns all the client got before the
/// connection closed, with the stop's handle.
async fn answered_across_a_stop(
    answer: Vec<u8>,
    gap: Duration,
) -> (String, tokio::task::JoinHandle<std::io::Result<()>>) {
    let up = Upstream::start(Script::Trickle(answer, gap)).await;
    let mut front = front_for(&up).await;
    let mut s = TcpStream::connect(front.addr).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("send");
    let deadline = tokio::time::Instant::now() + SOON;
    while !up.received().contains("GET / ") {
        assert!(tokio::time::Instant::now() < deadline, "request never sent");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let stopped = front.shutdown(Duration::from_secs(30));
    let got = text(&read_until_closed(&mut s, SOON).await);
    (got, stopped)
}

/// A graceful stop while a request is in progress: the client gets the whole answer,
/// told that the connection closes, and then the close.
#[tokio::test]
async fn a_graceful_stop_answers_the_request_in_progress_with_connection_close() {
    let (got, stopped) = answered_across_a_stop(ok("slowly"), Duration::from_millis(20)).await;
    assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
    assert!(got.contains("connection: close\r\n"), "{got}");
    assert!(got.ends_with("slowly"), "{got}");
    tokio::time::timeout(SOON, stopped)
        .await
        .expect("stopped in time")
        .expect("join")
        .expect("serve");
}

/// A head that trickles in a byte at a time, however long, is read as it comes and
/// answered once whole.
#[tokio::test]
async fn a_long_head_sent_a_byte_at_a_time_is_answered() {
    let up = Upstream::start(Script::Reply(ok("x"))).await;
    let front = front_for(&up).await;
    let mut s = TcpStream::connect(front.addr).await.expect("connect");
    s.set_nodelay(true).expect("nodelay");
    // Longer than one read's room: the buffer grows as the head comes.
    let head = format!(
        "GET /slow HTTP/1.1\r\nHost: x\r\nX-Long: {}\r\n\r\n",
        "v".repeat(6000)
    );
    for byte in head.as_bytes() {
        s.write_all(&[*byte]).await.expect("send");
    }
    assert!(answer(&mut s).await.starts_with("HTTP/1.1 200"));
    assert!(up.received().contains(&"v".repeat(6000)));
}

/// A head that grows past `max_header_size` without ending is refused once it does,
/// not read on until the header timeout.
#[tokio::test]
async fn a_head_growing_past_the_limit_without_an_end_gets_431_at_once() {
    let up = Upstream::start(Script::Reply(ok("x"))).await;
    let cfg = ProxyConfig {
        max_header_size: 8192,
        ..ProxyConfig::default()
    };
    let front = Front::start(cfg, &[up.addr], Balance::LeastConn).await;
    let lines: String = (0..12)
        .map(|i| format!("X-Filler-{i}: {}\r\n", "f".repeat(1000)))
        .collect();
    let unended = format!("GET / HTTP/1.1\r\nHost: x\r\n{lines}");
    let mut s = TcpStream::connect(front.addr).await.expect("connect");
    s.write_all(unended.as_bytes()).await.expect("send");
    let got = text(&read_until_closed(&mut s, SOON).await);
    assert!(got.starts_with("HTTP/1.1 431"), "{got}");
    assert_eq!(up.received(), "");
}

/// Answers larger than the in-memory buffer (read through rolld's buffer, some of them
/// from a file) and smaller ones, on one connection: each whole, the connection kept.
#[tokio::test]
async fn large_and_small_answers_of_known_length_keep_their_connection() {
    for size in [100, 70 * 1024, 300 * 1024] {
        let body = "b".repeat(size);
        let up = Upstream::start(Script::Reply(ok(&body))).await;
        let front = front_for(&up).await;
        let mut s = TcpStream::connect(front.addr).await.expect("connect");
        for _ in 0..3 {
            s.write_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .expect("send");
            let got = answer(&mut s).await;
            assert!(got.starts_with("HTTP/1.1 200"), "{size}");
            assert!(got.ends_with(&body), "{size}: the whole body");
            assert!(!got.contains("connection: close"), "{size}");
        }
    }
}

/// Many requests, one after another and pipelined in batches, on one connection: its
/// read buffer is used up and renewed along the way, and every request is answered.
#[tokio::test]
async fn hundreds_of_requests_on_one_connection_are_all_answered() {
    let up = Upstream::start(Script::Reply(ok("fine"))).await;
    let front = front_for(&up).await;
    let mut s = TcpStream::connect(front.addr).await.expect("connect");
    // First 32 requests of 128 bytes in one write: a first read fills the buffer to
    // its last byte, which ends the last request.
    let short = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    let filled = short.replace("GET /", &format!("GET /{}", "q".repeat(128 - short.len())));
    assert_eq!(filled.len(), 128);
    s.write_all(filled.repeat(32).as_bytes())
        .await
        .expect("send");
    let got = read_until(&mut s, b"fine", 32, SOON).await;
    assert_eq!(text(&got).matches("fine").count(), 32);
    let request = format!(
        "GET /{} HTTP/1.1\r\nHost: x\r\nUser-Agent: test\r\n\r\n",
        "p".repeat(100)
    );
    for _ in 0..100 {
        s.write_all(request.as_bytes()).await.expect("send");
        assert!(answer(&mut s).await.ends_with("fine"));
    }
    for _ in 0..20 {
        s.write_all(request.repeat(10).as_bytes())
            .await
            .expect("send");
        let got = read_until(&mut s, b"fine", 10, SOON).await;
        assert_eq!(text(&got).matches("fine").count(), 10);
    }
    assert_eq!(up.received().matches("GET /").count(), 332);
}

/// An answer written during a graceful stop's grace period carries the date it was
/// written at, not the date the stop came.
#[tokio::test]
async fn an_answer_during_the_grace_period_has_a_current_date() {
    // The answer's head comes whole about 4 s after the request.
    let (got, _stopped) = answered_across_a_stop(ok("late"), Duration::from_millis(100)).await;
    let read_at = std::time::SystemTime::now();
    assert!(got.ends_with("late"), "{got}");
    let date = got
        .lines()
        .find_map(|l| l.strip_prefix("date: "))
        .expect("a date");
    let when = httpdate::parse_http_date(date).expect("an HTTP date");
    let age = read_at.duration_since(when).unwrap_or_default();
    assert!(age < Duration::from_secs(3), "{date} is {age:?} old");
}
