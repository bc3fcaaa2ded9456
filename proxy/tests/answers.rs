//! How rolld reads its apps' answers (its own HTTP/1.1 exchange): every framing an
//! app may use, interim answers, answers that come before the request is sent whole,
//! malformed answers, and when an upstream connection may carry the next request.

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use rolld_proxy::{Balance, ProxyConfig};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One proxy worker: each worker has its own pool of upstream connections, and the tests
/// count the connections that carry one client connection after another.
fn config() -> ProxyConfig {
    ProxyConfig {
        workers: 1,
        ..ProxyConfig::default()
    }
}

async fn front_for(upstream: &Upstream) -> Front {
    Front::start(config(), &[upstream.addr], Balance::LeastConn).await
}

/// An HTTP/2 client (prior knowledge) on a new connection to `addr`.
async fn h2_client(addr: std::net::SocketAddr) -> h2::client::SendRequest<bytes::Bytes> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (send, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

/// The body of an HTTP/1.1 answer read until the proxy closed (`Connection: close`
/// requests), decoded from chunked framing when it is chunked.
fn body_of(answer: &str) -> String {
    let Some((head, body)) = answer.split_once("\r\n\r\n") else {
        return String::new();
    };
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return body.to_string();
    }
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || after.len() < size {
            break;
        }
        out.push_str(&after[..size]);
        rest = after[size..].strip_prefix("\r\n").unwrap_or(&after[size..]);
    }
    out
}

#[tokio::test]
async fn a_chunked_answer_with_extensions_and_trailers_arrives_whole_a_byte_at_a_time() {
    let answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
        5;name=value\r\nhello\r\n6 \r\n world\r\n0\r\nX-Checksum: 42\r\n\r\n"
        .to_vec();
    let up = Upstream::start(Script::Trickle(answer, Duration::from_millis(1))).await;
    let front = front_for(&up).await;
    let mut s = TcpStream::connect(front.addr).await.expect("connect");
    for _ in 0..2 {
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("send");
        let answer = text(&read_until(&mut s, b"0\r\n\r\n", 1, SOON).await);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert_eq!(body_of(&answer), "hello world", "{answer}");
    }
    assert_eq!(
        up.connections.load(Ordering::SeqCst),
        1,
        "the connection of a whole chunked answer carries the next request"
    );
}

#[tokio::test]
async fn a_trailer_section_with_a_malformed_line_still_ends_the_answer() {
    let up = Upstream::start(Script::Reply(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
        2\r\nok\r\n0\r\nX-Checksum: 42\r\nbroken trailer line\r\n\r\n"
            .to_vec(),
    ))
    .await;
    let front = front_for(&up).await;
    for _ in 0..2 {
        let answer = get_once(front.addr).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert_eq!(body_of(&answer), "ok", "{answer}");
        assert!(answer.ends_with("0\r\n\r\n"), "{answer}");
    }
    assert_eq!(up.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn trailers_of_a_chunked_answer_reach_an_http2_client() {
    let up = Upstream::start(Script::Reply(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
        2\r\nok\r\n0\r\nX-Checksum: 42\r\n\r\n"
            .to_vec(),
    ))
    .await;
    let mut config = config();
    // Streamed, as trailers only are: a buffered answer keeps its data alone.
    config.buffering.enabled = false;
    let front = Front::start(config, &[up.addr], Balance::LeastConn).await;
    let mut send = h2_client(front.addr).await;
    let req = http::Request::get("http://x/").body(()).expect("request");
    let (response, _) = send.send_request(req, true).expect("send");
    let response = tokio::time::timeout(SOON, response)
        .await
        .expect("in time")
        .expect("response");
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut data = Vec::new();
    while let Some(chunk) = tokio::time::timeout(SOON, body.data())
        .await
        .expect("in time")
    {
        data.extend_from_slice(&chunk.expect("data"));
    }
    assert_eq!(data, b"ok");
    let trailers = tokio::time::timeout(SOON, body.trailers())
        .await
        .expect("in time")
        .expect("trailers")
        .expect("some trailers");
    assert_eq!(
        trailers.get("x-checksum").map(|v| v.as_bytes()),
        Some(&b"42"[..])
    );
}

#[tokio::test]
async fn interim_answers_before_the_final_one_are_passed_over() {
    let up = Upstream::start(Script::Reply(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n\
        HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal"
            .to_vec(),
    ))
    .await;
    let front = front_for(&up).await;
    for _ in 0..2 {
        let answer = get_once(front.addr).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert_eq!(body_of(&answer), "final", "{answer}");
        assert!(!answer.contains("103"), "{answer}");
    }
    assert_eq!(up.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_answer_to_head_has_no_body_and_leaves_its_connection_for_the_next_request() {
    let up = Upstream::start(Script::Reply(
        b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n".to_vec(),
    ))
    .await;
    let front = front_for(&up).await;
    let mut s = TcpStream::connect(front.addr).await.expect("connect");
    for _ in 0..3 {
        s.write_all(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("send");
        let answer = text(&read_until(&mut s, b"\r\n\r\n", 1, SOON).await);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            answer.to_ascii_lowercase().contains("content-length: 1234"),
            "{answer}"
        );
    }
    assert_eq!(up.connections.load(Ordering::SeqCst), 1);
    assert_eq!(
        up.received().matches("HEAD / HTTP/1.1").count(),
        3,
        "{}",
        up.received()
    );
}

#[tokio::test]
async fn an_answer_without_a_length_ends_when_the_app_closes() {
    let up = Upstream::start(Script::ReplyAndClose(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it, until the end".to_vec(),
    ))
    .await;
    let front = front_for(&up).await;
    for _ in 0..2 {
        let answer = get_once(front.addr).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert_eq!(body_of(&answer), "all of it, until the end", "{answer}");
    }
}

#[tokio::test]
async fn answers_that_say_they_end_the_connection_are_not_followed_by_another_request() {
    for answer in [
        "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
        "HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
        "HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\nContent-Length: 2\r\n\r\nok",
    ] {
        let up = Upstream::start(Script::Reply(answer.as_bytes().to_vec())).await;
        let front = front_for(&up).await;
        for _ in 0..2 {
            let got = get_once(front.addr).await;
            assert!(got.starts_with("HTTP/1.1 200"), "{answer:?}: {got}");
            assert_eq!(body_of(&got), "ok", "{answer:?}: {got}");
        }
        assert_eq!(up.connections.load(Ordering::SeqCst), 2, "{answer:?}");
    }
}

#[tokio::test]
async fn an_answer_whose_head_cannot_be_read_gets_502_and_its_connection_is_dropped() {
    let huge = format!(
        "HTTP/1.1 200 OK\r\nX-Big: {}\r\nContent-Length: 2\r\n\r\nok",
        "a".repeat(70 * 1024)
    );
    let many: String = (0..101).map(|i| format!("X-F{i}: v\r\n")).collect();
    let many = format!("HTTP/1.1 200 OK\r\n{many}Content-Length: 2\r\n\r\nok");
    for answer in [
        "HTTP/1.1 200 OK\r\nContent-Length: 1x\r\n\r\nok".to_string(),
        "HTTP/1.1 200 OK\r\nContent-Length: -2\r\n\r\nok".to_string(),
        "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok".to_string(),
        "HTTP/1.1 200 OK\r\nContent-Length: 2, 3\r\n\r\nok".to_string(),
        "HTTP/1.1 2x0 OK\r\nContent-Length: 2\r\n\r\nok".to_string(),
        "HTTP/1.1 200 OK\r\nBad Name: v\r\nContent-Length: 2\r\n\r\nok".to_string(),
        "SMTP ready\r\n\r\n".to_string(),
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n".to_string(),
        huge,
        many,
    ] {
        let up = Upstream::start(Script::Reply(answer.clone().into_bytes())).await;
        let front = front_for(&up).await;
        let got = get_once(front.addr).await;
        assert!(
            got.starts_with("HTTP/1.1 502"),
            "{:?}: {got}",
            &answer[..answer.len().min(60)]
        );
    }
    // The same number twice is one length.
    let up = Upstream::start(Script::Reply(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok".to_vec(),
    ))
    .await;
    let front = front_for(&up).await;
    let got = get_once(front.addr).await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert_eq!(body_of(&got), "ok");
}

#[tokio::test]
async fn a_chunked_answer_with_a_bad_chunk_is_cut_not_passed_as_whole() {
    let up = Upstream::start(Script::Reply(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\nzz\r\nmore\r\n0\r\n\r\n"
            .to_vec(),
    ))
    .await;
    let front = front_for(&up).await;
    let got = get_once(front.addr).await;
    assert!(
        !got.ends_with("0\r\n\r\n"),
        "a cut answer is never ended as if whole: {got}"
    );
    assert!(!got.contains("more"), "{got}");
}

#[tokio::test]
async fn a_reason_phrase_of_the_apps_own_is_kept() {
    let up = Upstream::start(Script::Reply(
        b"HTTP/1.1 200 Fine Indeed\r\nContent-Length: 2\r\n\r\nok".to_vec(),
    ))
    .await;
    let front = front_for(&up).await;
    let got = get_once(front.addr).await;
    assert!(got.starts_with("HTTP/1.1 200 Fine Indeed\r\n"), "{got}");
    // An answer with no reason phrase gets the usual one.
    let up = Upstream::start(Script::Reply(
        b"HTTP/1.1 404\r\nContent-Length: 2\r\n\r\nno".to_vec(),
    ))
    .await;
    let front = front_for(&up).await;
    let got = get_once(front.addr).await;
    assert!(got.starts_with("HTTP/1.1 404 Not Found\r\n"), "{got}");
}

#[tokio::test]
async fn bytes_an_app_sends_right_after_its_101_reach_the_client() {
    let up = Upstream::start(Script::Reply(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\nwelcome"
            .to_vec(),
    ))
    .await;
    let front = front_for(&up).await;
    let mut s = TcpStream::connect(front.addr).await.expect("connect");
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
        .await
        .expect("send");
    let got = text(&read_until(&mut s, b"welcome", 1, SOON).await);
    assert!(got.starts_with("HTTP/1.1 101"), "{got}");
    assert!(got.ends_with("\r\n\r\nwelcome"), "{got}");
}

/// A streamed request body of no stated length goes to the app chunked, ended, and with
/// its trailer fields.
#[tokio::test]
async fn a_request_body_without_a_length_goes_chunked_to_the_app() {
    let mut config = config();
    config.buffering.enabled = false;
    let up = Upstream::start(Script::Reply(ok("got"))).await;
    let front = Front::start(config.clone(), &[up.addr], Balance::LeastConn).await;
    let got = exchange(
        front.addr,
        b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
        5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    )
    .await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    let received = up.received().to_ascii_lowercase();
    assert!(
        received.contains("transfer-encoding: chunked\r\n"),
        "{received}"
    );
    assert!(!received.contains("content-length"), "{received}");
    assert!(
        received.ends_with("\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
        "{received:?}"
    );

    let up = Upstream::start(Script::AnswerAtHead(ok("got"))).await;
    let front = Front::start(config, &[up.addr], Balance::LeastConn).await;
    let mut s = TcpStream::connect(front.addr).await.expect("connect");
    s.write_all(b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTE: trailers\r\n\r\n2\r\nhi\r\n0\r\nX-Sum: 2\r\n\r\n")
        .await
        .expect("send");
    let deadline = tokio::time::Instant::now() + SOON;
    while !up
        .received()
        .to_ascii_lowercase()
        .ends_with("2\r\nhi\r\n0\r\nx-sum: 2\r\n\r\n")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the body's end and trailers never reached the app: {:?}",
            up.received()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// An HTTP/2 upload ends with its last DATA frame, which can come with the end of the
/// stream: the app must still get the chunked body's last chunk.
#[tokio::test]
async fn an_http2_upload_of_no_stated_length_reaches_the_app_ended() {
    let mut config = config();
    config.buffering.enabled = false;
    let up = Upstream::start(Script::Reply(ok("got"))).await;
    let front = Front::start(config, &[up.addr], Balance::LeastConn).await;
    let mut send = h2_client(front.addr).await;
    let req = http::Request::post("http://x/up")
        .body(())
        .expect("request");
    let (response, mut body) = send.send_request(req, false).expect("send");
    body.send_data(bytes::Bytes::from_static(b"hello"), true)
        .expect("send data");
    let response = tokio::time::timeout(SOON, response)
        .await
        .expect("an answer in time")
        .expect("response");
    assert_eq!(response.status(), 200);
    let received = up.received().to_ascii_lowercase();
    assert!(
        received.ends_with("\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
        "{received:?}"
    );
}

/// An HTTP/2 client may end a stream with an empty DATA frame after the last bytes of a
/// body of stated length: the body is whole then, not short.
#[tokio::test]
async fn an_http2_upload_whose_end_comes_after_its_bytes_is_whole() {
    let mut config = config();
    config.buffering.enabled = false;
    // The app is slow to answer, so that the stream's end comes before its answer.
    let up = Upstream::start(Script::Trickle(ok("got"), Duration::from_millis(20))).await;
    let front = Front::start(config, &[up.addr], Balance::LeastConn).await;
    let mut send = h2_client(front.addr).await;
    let req = http::Request::post("http://x/up")
        .header("content-length", "5")
        .body(())
        .expect("request");
    let (response, mut body) = send.send_request(req, false).expect("send");
    body.send_data(bytes::Bytes::from_static(b"hello"), false)
        .expect("send data");
    // Sent only once the app has the body's bytes, as a client that learns late that
    // nothing follows.
    let deadline = tokio::time::Instant::now() + SOON;
    while !up.received().ends_with("hello") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            up.received()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    body.send_data(bytes::Bytes::new(), true)
        .expect("end the stream");
    let response = tokio::time::timeout(SOON, response)
        .await
        .expect("an answer in time")
        .expect("response");
    assert_eq!(response.status(), 200);
    assert!(
        up.received().ends_with("content-length: 5\r\n\r\nhello"),
        "{:?}",
        up.received()
    );
}

/// A large streamed upload to an app that is slow to start reading fills the socket, so
/// that writes take part of what is queued: every byte must still arrive once, in order.
#[tokio::test]
async fn a_large_upload_to_a_slow_reader_arrives_whole_and_in_order() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = tokio::spawn(async move {
        let Ok((mut stream, _)) = listener.accept().await else {
            return;
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 65536];
        while !buf.ends_with(b"\r\n0\r\n\r\n") {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let head_end = find(&buf, b"\r\n\r\n").map_or(0, |i| i + 4);
        let body = body_of(&format!(
            "{}{}",
            String::from_utf8_lossy(&buf[..head_end]),
            String::from_utf8_lossy(&buf[head_end..])
        ));
        let answer = format!("{} {}", body.len(), checksum(body.as_bytes()));
        let _ = stream.write_all(&ok(&answer)).await;
    });
    let mut config = config();
    config.buffering.enabled = false;
    let front = Front::start(config, &[addr], Balance::LeastConn).await;
    let mut s = TcpStream::connect(front.addr).await.expect("connect");
    s.write_all(
        b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
    )
    .await
    .expect("send");
    let mut sent = Vec::new();
    for i in 0..128u32 {
        let part: Vec<u8> = (0..65536u32)
            .map(|j| b'a' + ((i * 7 + j) % 26) as u8)
            .collect();
        s.write_all(format!("{:x}\r\n", part.len()).as_bytes())
            .await
            .expect("send");
        s.write_all(&part).await.expect("send");
        s.write_all(b"\r\n").await.expect("send");
        sent.extend_from_slice(&part);
    }
    s.write_all(b"0\r\n\r\n").await.expect("send");
    let got = text(&read_until_closed(&mut s, SOON).await);
    assert!(
        got.starts_with("HTTP/1.1 200"),
        "{}",
        &got[..got.len().min(200)]
    );
    assert_eq!(body_of(&got), format!("{} {}", sent.len(), checksum(&sent)));
    app.abort();
}

/// A position-sensitive checksum: a lost, repeated or swapped run of bytes changes it.
fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0u64, |sum, &b| {
        sum.wrapping_mul(31).wrapping_add(u64::from(b))
    })
}

/// A POST is not sent again once written (see `retry`), so it must never go out on a
/// pooled connection that the app has closed while it waited.
#[tokio::test]
async fn a_pooled_connection_the_app_closed_while_idle_is_not_used() {
    let up = Upstream::start(Script::ReplyAndClose(ok("fine"))).await;
    let front = front_for(&up).await;
    let mut s = TcpStream::connect(front.addr).await.expect("connect");
    for i in 0..3 {
        s.write_all(b"POST /order HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx")
            .await
            .expect("send");
        let answer = text(&read_until(&mut s, b"fine", 1, SOON).await);
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("fine"),
            "request {i}: {answer}"
        );
        // The app has closed that connection; rolld's event loop sees its end within
        // microseconds, well inside this margin.
        let deadline = tokio::time::Instant::now() + SOON;
        while up.ended.load(Ordering::SeqCst) <= i {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the app never closed"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(up.connections.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_101_to_a_request_that_asked_for_no_upgrade_gets_502() {
    let up = Upstream::start(Script::UpgradeEcho).await;
    let front = front_for(&up).await;
    // `Upgrade` without `Connection: upgrade` is no upgrade; nor is one offering h2c only.
    for fields in [
        "Upgrade: echo\r\n",
        "Connection: upgrade\r\nUpgrade: h2c\r\n",
    ] {
        let request = format!("GET / HTTP/1.1\r\nHost: x\r\n{fields}Connection: close\r\n\r\n");
        let got = exchange(front.addr, request.as_bytes()).await;
        assert!(got.starts_with("HTTP/1.1 502"), "{fields:?}: {got}");
    }
}

/// An app that answers as soon as it has the head, then echoes the request body as it
/// reads it: the rest of the body must still be sent while the answer is read.
#[tokio::test]
async fn an_app_that_echoes_the_body_while_reading_it_gets_all_of_it() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = tokio::spawn(async move {
        let Ok((mut stream, _)) = listener.accept().await else {
            return;
        };
        let mut buf = Vec::new();
        if !read_head(&mut stream, &mut buf).await {
            return;
        }
        let head_end = find(&buf, b"\r\n\r\n").map_or(0, |i| i + 4);
        let mut echoed = buf.split_off(head_end);
        let mut chunk = [0u8; 4096];
        if stream
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 30000\r\n\r\n")
            .await
            .is_err()
        {
            return;
        }
        let mut sent = 0;
        loop {
            if !echoed.is_empty() {
                if stream.write_all(&echoed).await.is_err() {
                    return;
                }
                sent += echoed.len();
                echoed.clear();
            }
            if sent >= 30000 {
                return;
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => echoed.extend_from_slice(&chunk[..n]),
            }
        }
    });
    // Streamed both ways, as the paths of such an app are.
    let mut config = config();
    config.buffering.enabled = false;
    let front = Front::start(config, &[addr], Balance::LeastConn).await;
    let mut s = TcpStream::connect(front.addr).await.expect("connect");
    s.write_all(
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 30000\r\nConnection: close\r\n\r\n",
    )
    .await
    .expect("send");
    // The body goes in three parts, each sent only once the last has come back.
    let mut got = Vec::new();
    for part in 0..3u8 {
        s.write_all(&vec![b'a' + part; 10000])
            .await
            .expect("send a part");
        let want = (part as usize + 1) * 10000;
        let deadline = tokio::time::Instant::now() + SOON;
        let mut chunk = [0u8; 8192];
        while got.len() < want || find(&got, b"\r\n\r\n").is_none_or(|i| got.len() - i - 4 < want) {
            let read = tokio::time::timeout_at(deadline, s.read(&mut chunk)).await;
            match read {
                Ok(Ok(n @ 1..)) => got.extend_from_slice(&chunk[..n]),
                _ => panic!("part {part} did not come back: {} bytes so far", got.len()),
            }
        }
    }
    let text = text(&got);
    assert!(
        text.starts_with("HTTP/1.1 200"),
        "{}",
        &text[..60.min(text.len())]
    );
    let body = &got[find(&got, b"\r\n\r\n").map_or(0, |i| i + 4)..];
    assert_eq!(body.len(), 30000);
    assert!(body[..10000].iter().all(|&b| b == b'a'));
    assert!(body[20000..].iter().all(|&b| b == b'c'));
    app.abort();
}
