//! The proxy's TLS front: rotation swaps the certificate for new handshakes while an
//! established connection goes on, and TLS requests are forwarded as https.

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rolld_proxy::tls::{Certificate, Tls};
use rolld_proxy::{Balance, Front, Proxy, ProxyConfig, UpstreamSet, Upstreams};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use support::*;

struct Ca {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

fn ca() -> Ca {
    let key = rcgen::KeyPair::generate().expect("CA key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key).expect("CA");
    Ca { cert, key }
}

/// A leaf for `a.test` signed by `ca`, as the proxy takes it, and its DER.
fn leaf(ca: &Ca) -> (Certificate, Vec<u8>) {
    let key = rcgen::KeyPair::generate().expect("key");
    let params = rcgen::CertificateParams::new(vec!["a.test".to_string()]).expect("params");
    let cert = params.signed_by(&key, &ca.cert, &ca.key).expect("leaf");
    let der = PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let signer = rustls::crypto::ring::sign::any_supported_type(&der).expect("signer");
    let certified = rustls::sign::CertifiedKey::new(vec![cert.der().clone()], signer);
    (
        Certificate {
            names: vec!["a.test".into()],
            key: Arc::new(certified),
        },
        cert.der().to_vec(),
    )
}

type Conn = (
    hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    Vec<u8>,
);

/// A client trusting `ca`, speaking `versions`; it remembers sessions to resume.
fn client(
    ca: &Ca,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(ca.cert.der().to_vec()))
        .expect("root");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// A TLS connection to `addr` as `a.test`, trusting `ca`: the HTTP/1 sender and the
/// certificate the handshake got.
async fn connect(addr: std::net::SocketAddr, ca: &Ca) -> Conn {
    let (send, served, _) = connect_with(addr, client(ca, rustls::DEFAULT_VERSIONS)).await;
    (send, served)
}

/// [`connect`] with `config`; also says whether the session was resumed.
async fn connect_with(
    addr: std::net::SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> (
    hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    Vec<u8>,
    bool,
) {
    let tls = handshake(addr, config).await;
    let served = tls.get_ref().1.peer_certificates().expect("certs")[0].to_vec();
    let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("http1");
    tokio::spawn(conn);
    (send, served, resumed)
}

/// A TLS connection to `addr` as `a.test`, its handshake done.
async fn handshake(
    addr: std::net::SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from("a.test").expect("name");
    tokio::time::timeout(
        SOON,
        tokio_rustls::TlsConnector::from(config).connect(name, tcp),
    )
    .await
    .expect("handshake in time")
    .expect("handshake")
}

async fn get(
    send: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
) -> (u16, String, Option<String>) {
    send.ready().await.expect("ready");
    let req = http::Request::get("/")
        .header("host", "a.test")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let res = send.send_request(req).await.expect("response");
    let status = res.status().as_u16();
    let hsts = res
        .headers()
        .get("strict-transport-security")
        .map(|v| v.to_str().unwrap_or_default().to_string());
    let body = res.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned(), hsts)
}

/// Serves `tls` in front of `up` on a free port.
fn serve(
    up: &Upstream,
    tls: Arc<Tls>,
) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<Duration>) {
    let listener = rolld_proxy::bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
    let addr = listener.local_addr().expect("addr");
    let upstreams = Arc::new(Upstreams::new());
    upstreams.swap(Arc::new(UpstreamSet::new(
        1,
        &[up.addr],
        Balance::LeastConn,
    )));
    let proxy = Arc::new(Proxy::new(upstreams, ProxyConfig::default()));
    let (stop, stopped) = tokio::sync::oneshot::channel::<Duration>();
    tokio::spawn(rolld_proxy::serve_fronts(
        vec![(listener.into(), Front::Tls(tls))],
        proxy,
        async move { stopped.await.unwrap_or(Duration::ZERO) },
    ));
    (addr, stop)
}

/// A TLS connection the proxy closes (`Connection: close`) ends with TLS's
/// `close_notify`: the client can tell the answer was complete, not truncated.
#[tokio::test]
async fn a_tls_connection_closed_by_the_proxy_ends_with_close_notify() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = Upstream::start(Script::Reply(ok("hi"))).await;
    let ca = ca();
    let (cert, _) = leaf(&ca);
    let tls = Arc::new(Tls::new(&[cert], Duration::from_secs(5), None).expect("tls"));
    let (addr, _stop) = serve(&up, tls);
    let mut stream = handshake(addr, client(&ca, rustls::DEFAULT_VERSIONS)).await;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
        .await
        .expect("send");
    let mut answer = Vec::new();
    // rustls reports a close without close_notify as an UnexpectedEof error.
    let read = tokio::time::timeout(SOON, stream.read_to_end(&mut answer))
        .await
        .expect("closed in time");
    let answer = String::from_utf8_lossy(&answer);
    assert!(read.is_ok(), "{read:?} after {answer:?}");
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with("hi"),
        "{answer}"
    );
}

#[tokio::test]
async fn sessions_resume_over_tls_1_3_tickets_and_the_tls_1_2_session_cache() {
    let up = Upstream::start(Script::Reply(ok("hi"))).await;
    let ca = ca();
    let (cert, _) = leaf(&ca);
    let tls = Arc::new(Tls::new(&[cert], Duration::from_secs(5), None).expect("tls"));
    let (addr, _stop) = serve(&up, tls.clone());
    for versions in [
        &[&rustls::version::TLS13][..],
        &[&rustls::version::TLS12][..],
    ] {
        let config = client(&ca, versions);
        let (mut first, _, resumed) = connect_with(addr, config.clone()).await;
        assert!(!resumed, "{versions:?}: a first handshake is a full one");
        // A request, so that the client has read the session tickets sent after the
        // handshake (TLS 1.3).
        assert_eq!(get(&mut first).await.0, 200);
        let (mut second, _, resumed) = connect_with(addr, config).await;
        assert!(resumed, "{versions:?}: the second handshake resumes");
        assert_eq!(get(&mut second).await.0, 200);
    }
    let stats = tls.stats().snapshot();
    assert_eq!((stats.handshakes, stats.resumed), (4, 2), "{stats:?}");
    assert!(stats.versions.contains(&("TLSv1.2", 2)), "{stats:?}");
    assert!(stats.versions.contains(&("TLSv1.3", 2)), "{stats:?}");
}

#[tokio::test]
async fn rotation_serves_new_handshakes_while_an_established_connection_goes_on() {
    let up = Upstream::start(Script::Reply(ok("hi"))).await;
    let ca = ca();
    let ((first, first_der), (second, second_der)) = (leaf(&ca), leaf(&ca));
    let tls = Arc::new(
        Tls::new(
            &[first],
            Duration::from_secs(5),
            Some(Duration::from_secs(3600)),
        )
        .expect("tls"),
    );
    let listener = rolld_proxy::bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
    let addr = listener.local_addr().expect("addr");
    let upstreams = Arc::new(Upstreams::new());
    upstreams.swap(Arc::new(UpstreamSet::new(
        1,
        &[up.addr],
        Balance::LeastConn,
    )));
    let proxy = Arc::new(Proxy::new(upstreams, ProxyConfig::default()));
    let (stop, stopped) = tokio::sync::oneshot::channel::<Duration>();
    let server = tokio::spawn(rolld_proxy::serve_fronts(
        vec![(listener.into(), Front::Tls(tls.clone()))],
        proxy,
        async move { stopped.await.unwrap_or(Duration::ZERO) },
    ));

    let (mut old, served) = connect(addr, &ca).await;
    assert_eq!(served, first_der);
    let (status, body, hsts) = get(&mut old).await;
    assert_eq!((status, body.as_str()), (200, "hi"));
    assert_eq!(hsts.as_deref(), Some("max-age=3600"));
    assert!(
        up.received()
            .to_ascii_lowercase()
            .contains("x-forwarded-proto: https\r\n"),
        "{}",
        up.received()
    );

    tls.rotate(&[second]).expect("rotate");
    let (mut new, served) = connect(addr, &ca).await;
    assert_eq!(
        served, second_der,
        "a new handshake gets the new certificate"
    );
    assert_eq!(get(&mut new).await.0, 200);
    // The connection made before the rotation goes on.
    assert_eq!(get(&mut old).await.0, 200);

    let stats = tls.stats().snapshot();
    assert_eq!(stats.handshakes, 2);
    assert!(stats.alpn.contains(&("http/1.1", 2)), "{stats:?}");

    drop((old, new));
    let _ = stop.send(Duration::from_secs(1));
    tokio::time::timeout(SOON, server)
        .await
        .expect("shut down in time")
        .expect("task")
        .expect("served");
}

#[tokio::test]
async fn a_tls_keep_alive_connection_idle_for_a_while_serves_its_next_request() {
    let up = Upstream::start(Script::Reply(ok("hi"))).await;
    let ca = ca();
    let (cert, _) = leaf(&ca);
    let tls = Arc::new(Tls::new(&[cert], Duration::from_secs(5), None).expect("tls"));
    let (addr, _stop) = serve(&up, tls);
    let (mut send, _) = connect(addr, &ca).await;
    assert_eq!(get(&mut send).await.0, 200);
    // Idle longer than an HTTP/1 connection over TCP waits before it gives hyper's state
    // back: a TLS connection keeps its state, and goes on.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(get(&mut send).await.0, 200);
}
