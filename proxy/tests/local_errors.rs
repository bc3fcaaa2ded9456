//! A shortage of file descriptors in rolld is not a failure of the app: it must not
//! mark a healthy upstream down. Its own test binary, since running out of descriptors
//! would fail any test running beside it.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rolld_proxy::{Balance, ProxyConfig};
use support::*;
use tokio::net::TcpStream;

async fn get(
    sender: &mut hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    uri: &str,
    hosts: &[&'static str],
) -> (u16, String) {
    let mut req = http::Request::get(uri)
        .body(Empty::<Bytes>::new())
        .expect("request");
    for host in hosts {
        req.headers_mut()
            .append(http::header::HOST, http::HeaderValue::from_static(host));
    }
    let response = tokio::time::timeout(SOON, sender.send_request(req))
        .await
        .expect("answered in time")
        .expect("answer");
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn running_out_of_file_descriptors_does_not_mark_the_upstream_down() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let up = Upstream::start(Script::Reply(ok("fine"))).await;
    let cfg = ProxyConfig {
        down_period: Duration::from_secs(600),
        // One worker, known to be up once it has answered: a worker still building
        // its runtime would take (or give back) descriptors behind the test's back.
        workers: 1,
        ..ProxyConfig::default()
    };
    let front = Front::start(cfg, &[up.addr], Balance::LeastConn).await;
    // An HTTP/2 connection, accepted and set up before descriptors run out, so that
    // requests need no new descriptor on the client side.
    let stream = TcpStream::connect(front.addr).await.expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let uri = format!("http://{}/", front.addr);
    // The proxy's only worker has accepted it once it answers; this answer needs no
    // upstream.
    let (status, _) = get(&mut sender, &uri, &["a.test", "b.test"]).await;
    assert_eq!(status, 400);

    // Use up every descriptor the limit allows.
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    let open = std::fs::read_dir("/proc/self/fd").map_or(64, |d| d.count()) as u64;
    setrlimit(Resource::RLIMIT_NOFILE, open + 32, hard).expect("setrlimit");
    let mut hoard = Vec::new();
    for _ in 0..100_000 {
        match std::fs::File::open("/dev/null") {
            Ok(file) => hoard.push(file),
            Err(_) => break,
        }
    }
    let (status, _) = get(&mut sender, &uri, &[]).await;
    drop(hoard);
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).expect("restore the limit");
    assert_eq!(status, 502, "connecting failed for want of a descriptor");

    // Descriptors are back: the upstream was never down.
    let (status, body) = get(&mut sender, &uri, &[]).await;
    assert_eq!((status, body.as_str()), (200, "fine"));
}
