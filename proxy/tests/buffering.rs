//! Request and response buffering over real sockets: a request body is read whole
//! before any upstream is picked (under the body limits), an answer is read as fast as
//! the upstream writes it and its lease ends then, streaming answers stay streamed, and
//! the memory and disk caps hold.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rolld_proxy::{Balance, ProxyConfig};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Polls `cond` every 10 ms until it holds, failing the test after `SOON`.
async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + SOON;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// An upstream that answers every request with `head` and then `total` bytes (byte i
/// is `i % 251`), counting the bytes its socket took in `written`.
async fn writer(head: String, total: usize) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let written = Arc::new(AtomicUsize::new(0));
    let count = written.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let (head, count) = (head.clone(), count.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while find(&buf, b"\r\n\r\n").is_none() {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                if stream.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let body: Vec<u8> = (0..total).map(|i| (i % 251) as u8).collect();
                for piece in body.chunks(64 * 1024) {
                    if stream.write_all(piece).await.is_err() {
                        return;
                    }
                    count.fetch_add(piece.len(), Ordering::SeqCst);
                }
                // Keep the connection until the proxy closes it.
                let _ = stream.read(&mut chunk).await;
            });
        }
    });
    (addr, written)
}

/// A client connection whose receive buffer stays small, so it reads at its own pace.
async fn slow_reader(addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    socket.connect(addr).await.expect("connect")
}

/// Reads the answer's head, returning it and the body bytes read with it.
async fn read_head(stream: &mut TcpStream) -> (String, Vec<u8>) {
    let got = read_until(stream, b"\r\n\r\n", 1, SOON).await;
    let end = find(&got, b"\r\n\r\n").expect("an answer head") + 4;
    (text(&got[..end]).to_ascii_lowercase(), got[end..].to_vec())
}

/// Reads the rest of a `Connection: close` answer and checks its bytes.
async fn read_body(stream: &mut TcpStream, mut body: Vec<u8>, total: usize) {
    // Through a 4 KiB window: a few seconds on a quiet machine; bounded generously.
    body.extend(read_until_closed(stream, Duration::from_secs(90)).await);
    assert_eq!(body.len(), total, "body length");
    assert!(
        body.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8),
        "wrong bytes in the body"
    );
}

/// 32 MiB: more than the kernel's socket buffers on every side can hold (a few MiB
/// each with Linux's defaults), so a streamed answer the client does not read blocks
/// its upstream.
const BIG: usize = 32 << 20;

/// Sends `GET path` for a `BIG` answer with `headers`, reads only the head, and waits
/// until the upstream has written 2 MiB. Returns the front, the client connection,
/// the head, the body bytes read with it, and the upstream's counter.
async fn big_answer(
    cfg: ProxyConfig,
    headers: &str,
    path: &str,
) -> (Front, TcpStream, String, Vec<u8>, Arc<AtomicUsize>) {
    let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {BIG}\r\n{headers}\r\n");
    let (addr, written) = writer(head, BIG).await;
    let front = Front::start(cfg, &[addr], Balance::LeastConn).await;
    let mut client = slow_reader(front.addr).await;
    client
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("send");
    let (head, body) = read_head(&mut client).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    wait_for("the upstream to write 2 MiB", || {
        written.load(Ordering::SeqCst) >= 2 << 20
    })
    .await;
    (front, client, head, body, written)
}

#[tokio::test]
async fn an_answer_is_read_whole_from_the_app_while_its_client_reads_nothing() {
    let (front, mut client, _, body, written) =
        big_answer(ProxyConfig::default(), "", "/download").await;
    // The whole answer reaches rolld's buffer (memory, then disk) and the request
    // leaves the in-flight count, while the client has read nothing but the head.
    wait_for("the upstream to write everything", || {
        written.load(Ordering::SeqCst) == BIG
    })
    .await;
    wait_for("the lease to end", || {
        front.upstreams.current().in_flight() == 0
    })
    .await;
    let stats = front.proxy.buffer_stats();
    assert_eq!(stats.responses_spilled, 1, "{stats:?}");
    assert!(stats.memory_bytes <= 64 * 1024, "{stats:?}");
    assert!(
        stats.disk_bytes >= (BIG / 2) as u64,
        "most of the answer is on disk: {stats:?}"
    );
    read_body(&mut client, body, BIG).await;
    wait_for("the buffers to be given back", || {
        let s = front.proxy.buffer_stats();
        s.memory_bytes == 0 && s.disk_bytes == 0
    })
    .await;
}

/// Each kind of answer that must stream: read by rolld only as fast as its client
/// reads, holding its lease (and the app's worker) until the client has it all.
async fn streams(cfg: ProxyConfig, headers: &str, path: &str) {
    let (front, mut client, head, body, written) = big_answer(cfg, headers, path).await;
    assert!(
        !head.contains("x-accel-buffering"),
        "the header is rolld's, not the client's: {head}"
    );
    let stats = front.proxy.buffer_stats();
    assert_eq!(
        (stats.memory_bytes, stats.disk_bytes),
        (0, 0),
        "streamed, not buffered"
    );
    assert_eq!(front.upstreams.current().in_flight(), 1);
    assert!(written.load(Ordering::SeqCst) < BIG, "the upstream is held");
    read_body(&mut client, body, BIG).await;
    wait_for("the lease to end", || {
        front.upstreams.current().in_flight() == 0
    })
    .await;
}

#[tokio::test]
async fn server_sent_events_stream() {
    streams(
        ProxyConfig::default(),
        "Content-Type: text/event-stream\r\n",
        "/events",
    )
    .await;
}

#[tokio::test]
async fn an_answer_marked_x_accel_buffering_no_streams() {
    streams(ProxyConfig::default(), "X-Accel-Buffering: no\r\n", "/big").await;
}

#[tokio::test]
async fn a_path_opted_out_streams() {
    let mut cfg = ProxyConfig::default();
    cfg.buffering.unbuffered_paths = vec!["/live/".into()];
    streams(cfg, "", "/live/feed").await;
}

#[tokio::test]
async fn buffering_turned_off_streams() {
    let mut cfg = ProxyConfig::default();
    cfg.buffering.enabled = false;
    streams(cfg, "", "/big").await;
}

#[tokio::test]
async fn a_request_body_is_read_whole_before_an_upstream_is_picked() {
    let up = Upstream::start(Script::Reply(ok("stored"))).await;
    let front = Front::start(ProxyConfig::default(), &[up.addr], Balance::LeastConn).await;
    let mut client = TcpStream::connect(front.addr).await.expect("connect");
    let body: Vec<u8> = (0..200_000).map(|i| (i % 253) as u8).collect();
    client
        .write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
        .await
        .expect("head");
    let chunk = |data: &[u8]| {
        let mut c = format!("{:x}\r\n", data.len()).into_bytes();
        c.extend_from_slice(data);
        c.extend_from_slice(b"\r\n");
        c
    };
    client
        .write_all(&chunk(&body[..100_000]))
        .await
        .expect("first half");
    // rolld holds the first half (memory, then disk) and has not picked an upstream.
    // The spill is counted after the disk's share is taken and the bytes written: wait
    // for both, as the proxy's thread may be between the two.
    wait_for(
        "the first half in rolld's buffer, part of it on disk",
        || {
            let s = front.proxy.buffer_stats();
            s.memory_bytes + s.disk_bytes >= 100_000 && s.requests_spilled == 1
        },
    )
    .await;
    assert_eq!(front.upstreams.current().in_flight(), 0);
    assert_eq!(up.connections.load(Ordering::SeqCst), 0);
    client
        .write_all(&chunk(&body[100_000..]))
        .await
        .expect("second half");
    client.write_all(b"0\r\n\r\n").await.expect("end");
    let answer = text(&read_until_closed(&mut client, SOON).await);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let got = up.received.lock().expect("lock").clone();
    let end = find(&got, b"\r\n\r\n").expect("head") + 4;
    let head = text(&got[..end]).to_ascii_lowercase();
    assert!(head.contains("content-length: 200000\r\n"), "{head}");
    assert!(!head.contains("transfer-encoding"), "{head}");
    assert_eq!(&got[end..], body.as_slice(), "the body as sent");
    wait_for("the buffers to be given back", || {
        let s = front.proxy.buffer_stats();
        s.memory_bytes == 0 && s.disk_bytes == 0
    })
    .await;
}

#[tokio::test]
async fn the_body_limits_apply_while_rolld_reads_a_body() {
    let up = Upstream::start(Script::Reply(ok("stored"))).await;
    let cfg = ProxyConfig {
        body_idle_timeout: Duration::from_secs(1),
        max_body_size: Some(1000),
        ..ProxyConfig::default()
    };
    let front = Front::start(cfg, &[up.addr], Balance::LeastConn).await;
    // A body that stops: 408 after body_idle_timeout.
    let mut client = TcpStream::connect(front.addr).await.expect("connect");
    client
        .write_all(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nhalf")
        .await
        .expect("send");
    let answer = text(&read_until_closed(&mut client, SOON).await);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    // A chunked body larger than max_body_size: 413.
    let mut big = b"POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..3 {
        big.extend_from_slice(format!("190\r\n{}\r\n", "y".repeat(400)).as_bytes());
    }
    big.extend_from_slice(b"0\r\n\r\n");
    let answer = text(&raw(front.addr, &big, SOON).await);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    // Neither reached the app.
    assert_eq!(up.connections.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn when_the_disk_cap_is_used_up_a_body_waits_for_room_then_gets_503() {
    // The first request's body fills the disk cap and stays buffered: its upstream
    // never answers, and a request body is kept until the answer (it may be sent again).
    let up = Upstream::start(Script::HeadOnly).await;
    let mut cfg = ProxyConfig {
        body_idle_timeout: Duration::from_secs(1),
        ..ProxyConfig::default()
    };
    cfg.buffering.request_buffer = 1024;
    cfg.buffering.memory = 1024;
    cfg.buffering.disk = 100 * 1024;
    let front = Front::start(cfg, &[up.addr], Balance::LeastConn).await;
    let post = |n: usize| {
        let mut r =
            format!("POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: {n}\r\n\r\n").into_bytes();
        r.extend(std::iter::repeat_n(b'z', n));
        r
    };
    let mut first = TcpStream::connect(front.addr).await.expect("connect");
    first.write_all(&post(96 * 1024)).await.expect("send");
    wait_for("the first body sent to the app", || {
        up.connections.load(Ordering::SeqCst) == 1
    })
    .await;
    let stats = front.proxy.buffer_stats();
    assert_eq!(
        stats.memory_bytes + stats.disk_bytes,
        96 * 1024,
        "{stats:?}"
    );
    assert!(stats.memory_bytes <= 1024, "{stats:?}");
    // The second finds at most 5 KiB of room: it waits for more, and none comes.
    let answer = text(&raw(front.addr, &post(20 * 1024), SOON).await);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    let stats = front.proxy.buffer_stats();
    assert!(stats.disk_bytes <= 100 * 1024, "{stats:?}");
    assert_eq!(
        up.connections.load(Ordering::SeqCst),
        1,
        "it reached no app"
    );
    drop(first);
}

#[tokio::test]
async fn the_memory_budget_holds_under_many_bodies_at_once() {
    let up = Upstream::start(Script::Reply(ok("stored"))).await;
    let mut cfg = ProxyConfig::default();
    cfg.buffering.request_buffer = 64 * 1024;
    cfg.buffering.memory = 256 * 1024;
    let front = Front::start(cfg, &[up.addr], Balance::LeastConn).await;
    // 20 clients each send 64 KiB and hold the last byte back: 1.25 MiB waiting.
    let mut clients = Vec::new();
    for _ in 0..20 {
        let mut c = TcpStream::connect(front.addr).await.expect("connect");
        let mut r =
            b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 65537\r\nConnection: close\r\n\r\n"
                .to_vec();
        r.extend(std::iter::repeat_n(b'm', 65536));
        c.write_all(&r).await.expect("send");
        clients.push(c);
    }
    wait_for("every body buffered", || {
        let s = front.proxy.buffer_stats();
        s.memory_bytes + s.disk_bytes == 20 * 65536
    })
    .await;
    let stats = front.proxy.buffer_stats();
    assert!(stats.memory_bytes <= 256 * 1024, "{stats:?}");
    assert!(stats.requests_spilled >= 16, "{stats:?}");
    for c in clients.iter_mut() {
        c.write_all(b"m").await.expect("last byte");
    }
    for c in clients.iter_mut() {
        let answer = text(&read_until_closed(c, SOON).await);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    wait_for("the buffers to be given back", || {
        let s = front.proxy.buffer_stats();
        s.memory_bytes == 0 && s.disk_bytes == 0
    })
    .await;
}

#[tokio::test]
async fn an_answer_beyond_the_caps_is_read_at_its_clients_pace() {
    for (disk, max_file) in [(1 << 20, 1 << 30), (1 << 30, 0)] {
        let mut cfg = ProxyConfig::default();
        cfg.buffering.disk = disk;
        cfg.buffering.max_response_file = max_file;
        let (front, mut client, _, body, written) = big_answer(cfg, "", "/big").await;
        let stats = front.proxy.buffer_stats();
        // Its memory share plus at most one chunk read from the app.
        assert!(stats.memory_bytes <= 64 * 1024 + 64 * 1024, "{stats:?}");
        assert!(stats.disk_bytes <= disk.min(max_file), "{stats:?}");
        assert!(written.load(Ordering::SeqCst) < BIG, "the app is held");
        assert_eq!(front.upstreams.current().in_flight(), 1);
        let t = std::time::Instant::now();
        read_body(&mut client, body, BIG).await;
        eprintln!(
            "case disk {disk} file {max_file}: read in {:?}",
            t.elapsed()
        );
        let stats = front.proxy.buffer_stats();
        assert!(stats.disk_bytes <= disk.min(max_file), "{stats:?}");
    }
}

/// A request body to an opted-out path, or with buffering off, goes to the app as it
/// arrives: the app is connected to before the body ends.
#[tokio::test]
async fn a_request_body_streams_on_an_opted_out_path_and_with_buffering_off() {
    for (enabled, path) in [(true, "/upload/live"), (false, "/anything")] {
        let up = Upstream::start(Script::Reply(ok("stored"))).await;
        let mut cfg = ProxyConfig::default();
        cfg.buffering.enabled = enabled;
        cfg.buffering.unbuffered_paths = vec!["/upload/".into()];
        let front = Front::start(cfg, &[up.addr], Balance::LeastConn).await;
        let mut client = TcpStream::connect(front.addr).await.expect("connect");
        client
            .write_all(
                format!("POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nfirst\r\n")
                    .as_bytes(),
            )
            .await
            .expect("head and a first chunk");
        wait_for("the app connected to while the body arrives", || {
            up.connections.load(Ordering::SeqCst) == 1
        })
        .await;
        let stats = front.proxy.buffer_stats();
        assert_eq!((stats.memory_bytes, stats.disk_bytes), (0, 0), "{path}");
        client
            .write_all(b"6\r\nsecond\r\n0\r\n\r\n")
            .await
            .expect("the rest");
        let answer = text(&read_until_closed(&mut client, SOON).await);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let got = up.received().to_ascii_lowercase();
        assert!(got.contains("transfer-encoding: chunked"), "{got}");
        assert!(got.contains("first") && got.contains("second"), "{got}");
    }
}

/// 48 KiB: above what is read whole outside the budget (16 KiB), within `response_buffer`.
const MEDIUM: usize = 48 * 1024;

/// Sends `GET /medium` with `Connection: close` through `front` from a client that reads
/// nothing yet.
async fn ask(front: &Front) -> TcpStream {
    let mut client = slow_reader(front.addr).await;
    client
        .write_all(b"GET /medium HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("send");
    client
}

/// An upstream that answers `len` bytes (byte i is `i % 251`): the head and the first
/// `len * 5 / 12` at once (20 KiB of `MEDIUM`), the rest once `gate` opens (never, if it
/// is never opened).
async fn gated_writer(gate: Arc<tokio::sync::Semaphore>, len: usize) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let gate = gate.clone();
            tokio::spawn(async move {
                let _ = read_until(&mut stream, b"\r\n\r\n", 1, SOON).await;
                let body: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n\r\n");
                let first = len * 5 / 12;
                if stream.write_all(head.as_bytes()).await.is_err()
                    || stream.write_all(&body[..first]).await.is_err()
                {
                    return;
                }
                let Ok(_open) = gate.acquire().await else {
                    return;
                };
                let _ = stream.write_all(&body[first..]).await;
                let mut rest = [0u8; 1];
                let _ = stream.read(&mut rest).await;
            });
        }
    });
    addr
}

/// An answer that fits in `response_buffer` while the memory budget has room for it is
/// read whole in memory before its head goes out, its share of the budget taken up front
/// (before its bytes have all come) and given back once it is sent; an answer that finds
/// no room left goes through the pump instead, its head on its way at once.
#[tokio::test]
async fn an_answer_that_fits_in_memory_takes_its_share_of_the_budget_until_sent() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let addr = gated_writer(gate.clone(), MEDIUM).await;
    let mut cfg = ProxyConfig::default();
    cfg.buffering.memory = 64 * 1024;
    let front = Front::start(cfg, &[addr], Balance::LeastConn).await;
    let mut first = ask(&front).await;
    // 20 KiB have come, 48 KiB are held.
    wait_for("the first answer's share taken", || {
        front.proxy.buffer_stats().memory_bytes == MEDIUM as u64
    })
    .await;
    // No room left for a second one: its head comes while its app still holds the rest.
    let mut second = ask(&front).await;
    let (head, second_body) = read_head(&mut second).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    gate.add_permits(2);
    let (head, first_body) = read_head(&mut first).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(
        head.contains(&format!("content-length: {MEDIUM}\r\n")),
        "{head}"
    );
    read_body(&mut first, first_body, MEDIUM).await;
    read_body(&mut second, second_body, MEDIUM).await;
    wait_for("the buffers to be given back", || {
        let s = front.proxy.buffer_stats();
        s.memory_bytes == 0 && s.disk_bytes == 0
    })
    .await;
    assert_eq!(front.upstreams.current().in_flight(), 0);
}

/// An answer read whole that stalls midway gets a 504 rather than a cut body, and gives
/// its share of the budget back. A small one is read whole even with no memory budget
/// left (it takes none).
#[tokio::test]
async fn an_answer_read_whole_that_stalls_midway_gets_504() {
    for (len, memory) in [(MEDIUM, 64 * 1024), (1200, 0)] {
        let addr = gated_writer(Arc::new(tokio::sync::Semaphore::new(0)), len).await;
        let mut cfg = ProxyConfig {
            body_idle_timeout: Duration::from_millis(500),
            ..ProxyConfig::default()
        };
        cfg.buffering.memory = memory;
        let front = Front::start(cfg, &[addr], Balance::LeastConn).await;
        let mut client = ask(&front).await;
        let answer = text(&read_until_closed(&mut client, SOON).await);
        assert!(answer.starts_with("HTTP/1.1 504"), "{len} bytes: {answer}");
        wait_for("the lease to end", || {
            front.upstreams.current().in_flight() == 0
        })
        .await;
        assert_eq!(
            front.proxy.buffer_stats().memory_bytes,
            0,
            "its share is back"
        );
    }
}
