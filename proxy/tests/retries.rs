//! Sending a request again when its upstream fails under it: what is resent (idempotent
//! methods, `Idempotency-Key`, bodies kept whole), where (never the same upstream twice
//! in a row), what is not (POST, large bodies, timeouts by default, answers begun), the
//! retry budget, and the counters. The upstreams are scripted: `Script::Vanish` reads
//! a whole request and closes without answering, as a process killed after it received
//! the request.

mod support;

use std::time::{Duration, Instant};

use rolld_proxy::{Balance, ProxyConfig, StatsSnapshot};
use support::*;

fn config() -> ProxyConfig {
    ProxyConfig::default()
}

/// Without request buffering: bodies stream to the app as they arrive, and what is
/// resent is what was kept on the way (see `retry`).
fn streamed() -> ProxyConfig {
    let mut config = config();
    config.buffering.enabled = false;
    config
}

fn count(stats: &[(&'static str, u64)], reason: &str) -> u64 {
    stats
        .iter()
        .find(|(r, _)| *r == reason)
        .map_or_else(|| panic!("no reason {reason} in {stats:?}"), |(_, n)| *n)
}

fn retries(stats: &StatsSnapshot, reason: &str) -> u64 {
    count(&stats.retries, reason)
}

fn bad_gateways(stats: &StatsSnapshot, reason: &str) -> u64 {
    count(&stats.bad_gateways, reason)
}

fn request(method: &str, path: &str, headers: &str, body: &str) -> Vec<u8> {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[tokio::test]
async fn a_put_whose_process_dies_after_receiving_it_is_resent_whole_to_another_upstream() {
    for config in [config(), streamed()] {
        put_resent_whole(config).await;
    }
}

async fn put_resent_whole(config: ProxyConfig) {
    let dying = Upstream::start(Script::Vanish).await;
    let alive = Upstream::start(Script::Reply(ok("done"))).await;
    let front = Front::start(config, &[dying.addr, alive.addr], Balance::RoundRobin).await;
    for i in 0..8 {
        let body = format!("body of item {i}: {}", "x".repeat(3000));
        let answer = exchange(
            front.addr,
            &request("PUT", &format!("/item/{i}"), "", &body),
        )
        .await;
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("done"),
            "{answer}"
        );
        assert_eq!(
            alive.received().matches(&body).count(),
            1,
            "the app that answered got the whole body once"
        );
    }
    // A chunked body too.
    let answer = exchange(
        front.addr,
        b"PUT /chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let died_under = dying.received().matches("PUT /").count() as u64;
    assert!(
        died_under >= 1,
        "round robin sent some to the dying process first"
    );
    let stats = front.proxy.stats().snapshot();
    assert_eq!(retries(&stats, "no_answer"), died_under);
    assert_eq!(stats.responses[4], 0, "no 5xx: {stats:?}");
    assert!(
        alive.received().contains("hello world")
            || alive.received().contains("hello\r\n6\r\n world"),
        "the chunked body arrived whole: {}",
        alive.received()
    );
}

#[tokio::test]
async fn a_request_resent_to_another_upstream_carries_the_head_it_was_first_sent_with() {
    let dying = Upstream::start(Script::Vanish).await;
    let alive = Upstream::start(Script::Reply(ok("done"))).await;
    let front = Front::start(config(), &[dying.addr, alive.addr], Balance::RoundRobin).await;
    for i in 0..4 {
        let request = format!(
            "GET /item/{i}?q={i} HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 6.6.6.6\r\n\
             X-Note: {i}\r\nCookie: a=1\r\nCookie: b=2\r\nConnection: close, x-secret\r\n\
             X-Secret: 1\r\n\r\n"
        );
        let answer = exchange(front.addr, request.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    let heads = |received: String| -> Vec<String> {
        received
            .split("\r\n\r\n")
            .filter(|head| head.starts_with("GET "))
            .map(str::to_owned)
            .collect()
    };
    let first = heads(dying.received());
    assert!(
        !first.is_empty(),
        "round robin sent some to the dying process first"
    );
    let answered = heads(alive.received());
    for head in &first {
        assert_eq!(
            answered.iter().filter(|h| *h == head).count(),
            1,
            "resent as first sent: {head:?} among {answered:?}"
        );
        assert_eq!(head.matches("x-forwarded-for: ").count(), 1, "{head}");
        assert!(head.contains("x-forwarded-for: 127.0.0.1\r\n"), "{head}");
        assert!(head.contains("cookie: a=1\r\ncookie: b=2"), "{head}");
        assert!(
            !head.contains("6.6.6.6") && !head.to_ascii_lowercase().contains("secret"),
            "{head}"
        );
    }
}

#[tokio::test]
async fn a_body_still_arriving_when_its_process_dies_is_resent_whole_as_the_rest_arrives() {
    use tokio::io::AsyncWriteExt;
    let dying = Upstream::start(Script::VanishMidBody).await;
    let alive = Upstream::start(Script::Reply(ok("done"))).await;
    // Round robin's first pick is the first upstream: the dying one.
    let front = Front::start(streamed(), &[dying.addr, alive.addr], Balance::RoundRobin).await;
    let first = "a".repeat(1000);
    let second = "b".repeat(1000);
    let mut client = tokio::net::TcpStream::connect(front.addr)
        .await
        .expect("connect");
    client
        .write_all(
            format!("PUT /slow-upload HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\nConnection: close\r\n\r\n{first}")
                .as_bytes(),
        )
        .await
        .expect("send the first half");
    let deadline = Instant::now() + SOON;
    while dying.ended.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "the dying upstream got the request"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Give the proxy a moment to see its upstream gone before the rest arrives; either
    // order must end the same.
    tokio::time::sleep(Duration::from_millis(100)).await;
    client
        .write_all(second.as_bytes())
        .await
        .expect("send the second half");
    let answer = text(&read_until_closed(&mut client, SOON).await);
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with("done"),
        "{answer}"
    );
    assert!(
        alive.received().contains(&format!("{first}{second}")),
        "the whole body reached the upstream that answered: {}",
        alive.received().len()
    );
    assert!(dying.received().contains("PUT /slow-upload"));
    // Framed as the whole body, what was kept and what was still to come.
    assert!(
        alive
            .received()
            .to_ascii_lowercase()
            .contains("content-length: 2000\r\n"),
        "{}",
        alive
            .received()
            .lines()
            .take(8)
            .collect::<Vec<_>>()
            .join("\n")
    );
    let stats = front.proxy.stats().snapshot();
    assert_eq!(retries(&stats, "no_answer"), 1);
}

#[tokio::test]
async fn a_post_without_idempotency_key_is_not_resent_once_written() {
    let dying = Upstream::start(Script::Vanish).await;
    let alive = Upstream::start(Script::Reply(ok("done"))).await;
    let front = Front::start(config(), &[dying.addr, alive.addr], Balance::RoundRobin).await;
    let mut refused = 0;
    for i in 0..8 {
        let path = format!("/order/{i} ");
        let answer = exchange(front.addr, &request("POST", path.trim(), "", "pay 10")).await;
        let (at_dying, at_alive) = (
            dying.received().matches(&path).count(),
            alive.received().matches(&path).count(),
        );
        if answer.starts_with("HTTP/1.1 502") {
            refused += 1;
            assert_eq!(
                (at_dying, at_alive),
                (1, 0),
                "a 502 was sent once, to the process that died"
            );
        } else {
            assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
            assert_eq!((at_dying, at_alive), (0, 1), "sent once, answered");
        }
    }
    assert!(refused >= 1, "some POSTs went to the dying process");
    let stats = front.proxy.stats().snapshot();
    assert_eq!(bad_gateways(&stats, "not_idempotent"), refused);
    assert_eq!(retries(&stats, "no_answer"), 0);
}

#[tokio::test]
async fn a_post_with_idempotency_key_is_resent_and_succeeds() {
    let dying = Upstream::start(Script::Vanish).await;
    let alive = Upstream::start(Script::Reply(ok("done"))).await;
    let front = Front::start(config(), &[dying.addr, alive.addr], Balance::RoundRobin).await;
    for i in 0..8 {
        let path = format!("/order/{i} ");
        let answer = exchange(
            front.addr,
            &request(
                "POST",
                path.trim(),
                &format!("Idempotency-Key: key-{i}\r\n"),
                "pay 10",
            ),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert_eq!(alive.received().matches(&path).count(), 1);
        assert!(alive
            .received()
            .contains(&format!("idempotency-key: key-{i}")));
    }
    assert!(dying.received().matches("POST /order/").count() >= 1);
}

#[tokio::test]
async fn a_streamed_body_larger_than_retry_body_limit_is_not_resent_a_buffered_one_is() {
    for buffering in [false, true] {
        let dying = Upstream::start(Script::Vanish).await;
        let alive = Upstream::start(Script::Reply(ok("done"))).await;
        let mut config = ProxyConfig {
            retry_body_limit: 1024,
            ..config()
        };
        config.buffering.enabled = buffering;
        let front = Front::start(config, &[dying.addr, alive.addr], Balance::RoundRobin).await;
        let (mut refused, mut resent) = (0, 0);
        for i in 0..10 {
            // Even: within the limit (exactly at it), odd: one byte over.
            let body = "y".repeat(1024 + i % 2);
            let path = format!("/big/{i} ");
            let answer = exchange(front.addr, &request("PUT", path.trim(), "", &body)).await;
            let died_under = dying.received().matches(&path).count() == 1;
            let over = i % 2 == 1 && !buffering;
            match (answer.starts_with("HTTP/1.1 502"), over, died_under) {
                (true, true, true) => refused += 1,
                (false, false, true) => resent += 1,
                (false, _, false) => {}
                other => panic!("buffering {buffering}, {other:?}: {answer}"),
            }
        }
        assert!(resent >= 1, "buffering {buffering}: {refused} {resent}");
        if buffering {
            assert_eq!(refused, 0, "a buffered body is always resent");
        } else {
            assert!(refused >= 1, "{refused} {resent}");
        }
        let stats = front.proxy.stats().snapshot();
        assert_eq!(bad_gateways(&stats, "body_not_kept"), refused);
    }
}

#[tokio::test]
async fn every_upstream_failing_gets_at_most_the_budgets_share_of_retries_and_errors_at_once() {
    let a = Upstream::start(Script::Vanish).await;
    let b = Upstream::start(Script::Vanish).await;
    let config = ProxyConfig {
        retry_budget: 0.2,
        retry_budget_floor: 0,
        ..config()
    };
    let front = Front::start(config, &[a.addr, b.addr], Balance::RoundRobin).await;
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    for i in 0..100 {
        let sent = Instant::now();
        let answer = exchange(front.addr, &request("GET", &format!("/{i}"), "", "")).await;
        slowest = slowest.max(sent.elapsed());
        assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
    }
    // The budget looks back 10 s: all of it counts only if it ran within that.
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "{:?}",
        started.elapsed()
    );
    let at_apps =
        (a.received().matches("GET /").count() + b.received().matches("GET /").count()) as u64;
    let stats = front.proxy.stats().snapshot();
    let resent = at_apps - 100;
    assert_eq!(resent, retries(&stats, "no_answer"));
    assert!(
        (15..=20).contains(&resent),
        "retries counted at the apps: {resent} (20% of 100 at most)"
    );
    assert_eq!(
        bad_gateways(&stats, "budget"),
        stats.retries_refused_by_budget
    );
    assert!(stats.retries_refused_by_budget >= 70, "{stats:?}");
    assert!(
        slowest < Duration::from_secs(2),
        "errors come back at once: slowest {slowest:?}"
    );
}

#[tokio::test]
async fn a_request_resent_never_goes_to_the_same_upstream_twice_in_a_row() {
    let ups = [
        Upstream::start(Script::Vanish).await,
        Upstream::start(Script::Vanish).await,
        Upstream::start(Script::Vanish).await,
    ];
    let addrs: Vec<_> = ups.iter().map(|u| u.addr).collect();
    let front = Front::start(config(), &addrs, Balance::LeastConn).await;
    let answer = exchange(front.addr, &request("DELETE", "/thing", "", "")).await;
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
    let got: Vec<usize> = ups
        .iter()
        .map(|u| u.received().matches("DELETE /thing").count())
        .collect();
    assert_eq!(got, vec![1, 1, 1], "retries: 2, each to another upstream");
    let stats = front.proxy.stats().snapshot();
    assert_eq!(bad_gateways(&stats, "retries_spent"), 1);

    // Two upstreams and four retries: they alternate.
    let two = [
        Upstream::start(Script::Vanish).await,
        Upstream::start(Script::Vanish).await,
    ];
    let config = ProxyConfig {
        retries: 4,
        ..config()
    };
    let front = Front::start(config, &[two[0].addr, two[1].addr], Balance::LeastConn).await;
    let answer = exchange(front.addr, &request("GET", "/again", "", "")).await;
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
    let mut got: Vec<usize> = two
        .iter()
        .map(|u| u.received().matches("GET /again").count())
        .collect();
    got.sort_unstable();
    assert_eq!(got, vec![2, 3]);
}

#[tokio::test]
async fn a_response_timeout_is_not_resent_unless_retry_timeouts_says_so() {
    for retry_timeouts in [false, true] {
        let silent = Upstream::start(Script::Silent).await;
        let alive = Upstream::start(Script::Reply(ok("done"))).await;
        let config = ProxyConfig {
            response_timeout: Duration::from_millis(500),
            retry_timeouts,
            ..config()
        };
        // Round robin's first pick is the first upstream: the silent one.
        let front = Front::start(config, &[silent.addr, alive.addr], Balance::RoundRobin).await;
        let answer = exchange(front.addr, &request("GET", "/slow", "", "")).await;
        assert_eq!(silent.received().matches("GET /slow").count(), 1);
        let stats = front.proxy.stats().snapshot();
        if retry_timeouts {
            assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
            assert_eq!(alive.received().matches("GET /slow").count(), 1);
            assert_eq!(retries(&stats, "timeout"), 1);
        } else {
            assert!(answer.starts_with("HTTP/1.1 504"), "{answer}");
            assert_eq!(alive.received(), "", "the app may still be working on it");
            assert_eq!(retries(&stats, "timeout"), 0);
        }
    }
}

#[tokio::test]
async fn nothing_is_resent_once_the_answer_has_begun() {
    // A small answer of known length is read whole before the client gets a byte: one
    // broken after its head is a 502 saying so. A large one streams: broken as the app
    // broke it. Neither is sent again.
    let small = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial".to_vec();
    let large = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: 10000000\r\n\r\n{}",
        "p".repeat(100_000)
    )
    .into_bytes();
    for (answer_bytes, small) in [(small, true), (large, false)] {
        let breaking = Upstream::start(Script::ReplyAndClose(answer_bytes)).await;
        let alive = Upstream::start(Script::Reply(ok("done"))).await;
        // Small answers are read whole only with buffering on (the default).
        let config = if small { config() } else { streamed() };
        let front = Front::start(config, &[breaking.addr, alive.addr], Balance::RoundRobin).await;
        let answer = exchange(front.addr, &request("GET", "/begun", "", "")).await;
        if small {
            assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
            let stats = front.proxy.stats().snapshot();
            assert_eq!(bad_gateways(&stats, "answer_broken"), 1);
        } else {
            assert!(
                answer.starts_with("HTTP/1.1 200") && !answer.ends_with("done"),
                "a broken answer, as the app sent it: {}",
                &answer[..200.min(answer.len())]
            );
        }
        assert_eq!(alive.received(), "", "not resent");
    }
}

#[tokio::test]
async fn each_http2_stream_is_resent_or_refused_like_an_http1_request() {
    let dying = Upstream::start(Script::Vanish).await;
    let alive = Upstream::start(Script::Reply(ok("done"))).await;
    let front = Front::start(config(), &[dying.addr, alive.addr], Balance::RoundRobin).await;
    let tcp = tokio::net::TcpStream::connect(front.addr)
        .await
        .expect("connect");
    let (send, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut send = send.ready().await.expect("ready");
    let mut streams = Vec::new();
    for i in 0..10 {
        // Even: PUT (resent), odd: POST without a key (502 when its process died).
        let method = if i % 2 == 0 { "PUT" } else { "POST" };
        let req = http::Request::builder()
            .method(method)
            .uri(format!("http://x/stream/{i}"))
            .body(())
            .expect("request");
        let (response, mut body) = send.send_request(req, false).expect("send");
        body.send_data(bytes::Bytes::from(format!("body {i}")), true)
            .expect("body");
        streams.push((i, response));
        send = send.ready().await.expect("ready");
    }
    let mut refused = 0;
    for (i, response) in streams {
        let response = tokio::time::timeout(SOON, response)
            .await
            .expect("answered in time")
            .expect("response");
        let status = response.status().as_u16();
        let path = format!("/stream/{i} ");
        let died_under = dying.received().matches(&path).count();
        match (i % 2, status) {
            (0, 200) => assert_eq!(alive.received().matches(&path).count(), 1),
            (1, 200) => assert_eq!(
                (died_under, alive.received().matches(&path).count()),
                (0, 1)
            ),
            (1, 502) => {
                assert_eq!(
                    (died_under, alive.received().matches(&path).count()),
                    (1, 0)
                );
                refused += 1;
            }
            other => panic!("stream {i}: {other:?}"),
        }
    }
    let stats = front.proxy.stats().snapshot();
    assert_eq!(bad_gateways(&stats, "not_idempotent"), refused);
    assert!(retries(&stats, "no_answer") >= 1, "{stats:?}");
}

#[tokio::test]
async fn connects_to_a_large_set_that_refuses_them_stop_after_the_attempt_cap() {
    // Ten upstreams, none listening: each failed connect moves the request to the next,
    // up to 4 attempts (with `retries: 0`), then 502.
    let dead: Vec<_> = (0..10).map(|_| dead_port()).collect();
    let config = ProxyConfig {
        retries: 0,
        hold_timeout: Duration::ZERO,
        ..config()
    };
    let front = Front::start(config, &dead, Balance::RoundRobin).await;
    let answer = exchange(front.addr, &request("GET", "/", "", "")).await;
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
    let stats = front.proxy.stats().snapshot();
    assert_eq!(
        retries(&stats, "connect"),
        4,
        "each of the 4 failed connects counted"
    );
    assert_eq!(bad_gateways(&stats, "attempts"), 1, "{stats:?}");
    assert_eq!(bad_gateways(&stats, "connect"), 0, "{stats:?}");
}

#[tokio::test]
async fn a_request_whose_upstreams_keep_refusing_is_held_at_most_twice_then_gets_502() {
    // Both refuse: each round marks them down for a moment, the request is held until
    // one is back, and tries again; after its second hold it fails instead of going on.
    let dead = [dead_port(), dead_port()];
    let config = ProxyConfig {
        down_period: Duration::from_millis(100),
        hold_timeout: Duration::from_secs(10),
        ..config()
    };
    let front = Front::start(config, &dead, Balance::RoundRobin).await;
    let answer = tokio::time::timeout(
        Duration::from_secs(8),
        exchange(front.addr, &request("GET", "/", "", "")),
    )
    .await
    .expect("an answer long before the hold timeout");
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
    let stats = front.proxy.stats().snapshot();
    assert_eq!(bad_gateways(&stats, "connect"), 1, "{stats:?}");
    // Three rounds, two holds between: a round tries both upstreams (two counted
    // connects, the last round's second one failing the request) unless the second is
    // still marked down when the first comes back (it was marked a moment later), and
    // then tries one. A third hold would make seven when every round tries both.
    let connects = retries(&stats, "connect");
    assert!(
        (3..=5).contains(&connects),
        "three rounds of one or two connects, two holds between: {stats:?}"
    );
}

#[tokio::test]
async fn a_resent_request_whose_connects_then_fail_is_held_like_a_new_one() {
    // The request reaches A, which dies under it; resent, it finds B refusing. It was
    // written once, but no set's drain cut it: it waits for an upstream as a new request
    // would, rather than failing on the refused connect.
    let a = Upstream::start(Script::Vanish).await;
    let dead = dead_port();
    let config = ProxyConfig {
        down_period: Duration::from_millis(100),
        ..config()
    };
    let front = Front::start(config, &[a.addr, dead], Balance::RoundRobin).await;
    let answer = exchange(front.addr, &request("GET", "/", "", "")).await;
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
    let stats = front.proxy.stats().snapshot();
    // Held, it went back to A (B was down) until its retries were spent.
    assert_eq!(bad_gateways(&stats, "retries_spent"), 1, "{stats:?}");
    assert_eq!(bad_gateways(&stats, "connect"), 0, "{stats:?}");
    assert_eq!(a.received().matches("GET /").count(), 3, "{stats:?}");
}
