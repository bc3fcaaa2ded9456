//! TLS on the front listener, with real clients: curl over HTTP/1.1 and HTTP/2,
//! openssl s_client, and a rustls client. Every certificate and key is generated here
//! (rcgen), signed by a test CA made for the test.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use nix::sys::signal::Signal;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

/// A test certificate authority.
struct Ca {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl Ca {
    fn new() -> Ca {
        let key = rcgen::KeyPair::generate().expect("CA key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "rolld test CA");
        let cert = params.self_signed(&key).expect("CA certificate");
        Ca { cert, key }
    }

    fn pem(&self) -> String {
        self.cert.pem()
    }

    /// A leaf for `names` valid for `days` from now (negative: expired), ECDSA P-256.
    fn leaf(&self, names: &[&str], days: i64) -> Leaf {
        let key = rcgen::KeyPair::generate().expect("leaf key");
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(names.clone()).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, names[0].clone());
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(400);
        params.not_after = now + time::Duration::days(days);
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("leaf certificate");
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }
}

struct Leaf {
    cert_pem: String,
    key_pem: String,
    der: Vec<u8>,
}

impl Leaf {
    /// Writes `NAME.pem` and `NAME.key` in `dir` (rename over, so rolld never reads
    /// half a file).
    fn write(&self, dir: &Path, name: &str) {
        for (ext, text) in [("pem", &self.cert_pem), ("key", &self.key_pem)] {
            let tmp = dir.join(format!("{name}.{ext}.tmp"));
            std::fs::write(&tmp, text).expect("write");
            std::fs::rename(&tmp, dir.join(format!("{name}.{ext}"))).expect("rename");
        }
    }
}

/// A running rolld with a plain and a TLS listener, its CA and its ports.
struct TlsRolld {
    rolld: Rolld,
    https: u16,
    ca: PathBuf,
}

/// Starts rolld on `fixture` with a `tls:` section (certificate files `certs`, written
/// beside the config by `prepare`) plus `tls_extra` lines, and waits for its first set.
fn start(
    fixture: &Fixture,
    certs: &[&str],
    tls_extra: &str,
    top: &str,
    prepare: impl FnOnce(&Path),
    ca: &Ca,
) -> TlsRolld {
    let https = free_ports(1)[0];
    let list: String = certs
        .iter()
        .map(|c| format!("    - {{cert: {c}.pem, key: {c}.key}}\n"))
        .collect();
    let yaml = format!(
        "{top}{}tls:\n  listen: 127.0.0.1:{https}\n  certificates:\n{list}{tls_extra}",
        fixture.yaml()
    );
    let ca_pem = ca.pem();
    let rolld = Rolld::spawn_with(&yaml, fixture.listen, |dir| {
        std::fs::write(dir.join("ca.pem"), ca_pem).expect("write CA");
        prepare(dir);
    });
    rolld.wait_log("roll finished", 1);
    let ca = rolld.dir.path().join("ca.pem");
    TlsRolld { rolld, https, ca }
}

/// `curl` against `name` on the TLS port: (exit code, stdout).
fn curl(t: &TlsRolld, name: &str, args: &[&str], path: &str) -> (Option<i32>, String) {
    let out = output_within(
        Command::new("curl")
            .args(["-sS", "--max-time", "20", "--cacert"])
            .arg(&t.ca)
            .arg("--resolve")
            .arg(format!("{name}:{}:127.0.0.1", t.https))
            .args(args)
            .arg(format!("https://{name}:{}{path}", t.https)),
        Duration::from_secs(60),
    );
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn client_config(ca: &Path, alpn: &[&[u8]], sni: bool) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("CA file") {
        roots.add(cert.expect("CA cert")).expect("add CA");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config.enable_sni = sni;
    Arc::new(config)
}

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

async fn connect(port: u16, name: &str, config: Arc<rustls::ClientConfig>) -> Result<Tls, String> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let name = ServerName::try_from(name.to_string()).map_err(|e| e.to_string())?;
    let connecting = tokio_rustls::TlsConnector::from(config).connect(name, tcp);
    match tokio::time::timeout(SOON, connecting).await {
        Ok(Ok(tls)) => Ok(tls),
        Ok(Err(e)) => Err(format!("handshake: {e}")),
        Err(_) => Err("handshake timed out".into()),
    }
}

/// The certificate a fresh handshake with `name` gets, in DER.
fn served_cert(port: u16, name: &str, ca: &Path, sni: bool) -> Result<Vec<u8>, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let tls = connect(port, name, client_config(ca, &[b"http/1.1"], sni)).await?;
        let (_, session) = tls.get_ref();
        Ok(session
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.to_vec())
            .unwrap_or_default())
    })
}

#[test]
fn curl_gets_http1_and_http2_over_tls_as_https_with_hsts() {
    if !tool("curl") {
        return;
    }
    let ca = Ca::new();
    let leaf = ca.leaf(&["a.test"], 30);
    let fixture = Fixture::new(1);
    let t = start(
        &fixture,
        &["a"],
        "  hsts: 1y\n",
        "",
        |d| leaf.write(d, "a"),
        &ca,
    );

    let (code, out) = curl(
        &t,
        "a.test",
        &["--http1.1", "-D", "-", "-w", "\nversion %{http_version}"],
        "/header?name=x-forwarded-proto",
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("\r\n\r\nhttps\nversion 1.1"), "{out}");
    assert!(
        out.to_ascii_lowercase()
            .contains("strict-transport-security: max-age=31557600"),
        "{out}"
    );

    let (code, out) = curl(
        &t,
        "a.test",
        &["--http2", "-w", "\nversion %{http_version}"],
        "/header?name=x-forwarded-proto",
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("https\nversion 2"), "{out}");

    // A POST body through HTTP/2 over TLS comes back whole.
    let body = "x".repeat(300_000);
    let upload = t.rolld.dir.path().join("upload");
    std::fs::write(&upload, &body).expect("write");
    let data = format!("@{}", upload.display());
    let (code, out) = curl(&t, "a.test", &["--http2", "--data-binary", &data], "/echo");
    assert_eq!(code, Some(0));
    assert_eq!(out, body);

    // The plain listener still says http.
    let (_, proto) = get_blocking(fixture.listen, "/header?name=x-forwarded-proto").expect("plain");
    assert_eq!(proto, "http");

    // `rolld status` shows the certificate's names and days to expiry.
    let (_, status, _) = t.rolld.control("status", &[]);
    // 30 days less the seconds since the certificate was made, rounded either way.
    assert!(
        status.contains("certificate a.test: 29 days to expiry")
            || status.contains("certificate a.test: 30 days to expiry"),
        "{status}"
    );
}

#[test]
fn sni_picks_the_certificate_by_name_and_the_first_without_sni() {
    let ca = Ca::new();
    let a = ca.leaf(&["a.test"], 90);
    let b = ca.leaf(&["*.b.test", "b.test"], 90);
    let fixture = Fixture::new(1);
    let t = start(
        &fixture,
        &["a", "b"],
        "",
        "",
        |d| {
            a.write(d, "a");
            b.write(d, "b");
        },
        &ca,
    );
    let port = t.https;
    assert_eq!(
        served_cert(port, "a.test", &t.ca, true).expect("a.test"),
        a.der
    );
    assert_eq!(
        served_cert(port, "b.test", &t.ca, true).expect("b.test"),
        b.der
    );
    assert_eq!(
        served_cert(port, "x.b.test", &t.ca, true).expect("wildcard"),
        b.der
    );
    // A wildcard covers one label only: the default answers, and does not verify.
    let deep = served_cert(port, "y.x.b.test", &t.ca, true);
    assert!(deep.is_err(), "{deep:?}");
    // Without SNI the first certificate answers: it verifies as a.test, not as b.test.
    assert_eq!(
        served_cert(port, "a.test", &t.ca, false).expect("no SNI"),
        a.der
    );
    assert!(served_cert(port, "b.test", &t.ca, false).is_err());
}

#[test]
fn openssl_is_refused_tls_1_1_and_served_tls_1_2() {
    if !tool("openssl") {
        return;
    }
    let ca = Ca::new();
    let leaf = ca.leaf(&["a.test"], 90);
    let fixture = Fixture::new(1);
    let t = start(&fixture, &["a"], "", "", |d| leaf.write(d, "a"), &ca);
    let s_client = |version: &str| {
        let out = output_within(
            Command::new("openssl")
                .args(["s_client", "-connect"])
                .arg(format!("127.0.0.1:{}", t.https))
                .args(["-servername", "a.test", version, "-CAfile"])
                .arg(&t.ca)
                .stdin(std::process::Stdio::null()),
            Duration::from_secs(60),
        );
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, out) = s_client("-tls1_1");
    assert!(!ok, "TLS 1.1 must be refused: {out}");
    assert!(out.contains("no peer certificate available"), "{out}");
    let (ok, out) = s_client("-tls1_2");
    assert!(ok, "{out}");
    assert!(out.contains("Protocol  : TLSv1.2"), "{out}");
    assert!(out.contains("Verify return code: 0 (ok)"), "{out}");
    let (ok, out) = s_client("-tls1_3");
    assert!(ok && out.contains("TLSv1.3"), "{out}");
}

#[test]
fn a_client_that_never_says_hello_is_cut_at_the_handshake_timeout_and_frees_its_slot() {
    let ca = Ca::new();
    let leaf = ca.leaf(&["a.test"], 90);
    let fixture = Fixture::new(1);
    let admin = free_ports(1)[0];
    // One connection at a time: the silent client holds the only slot.
    let top = format!("admin: 127.0.0.1:{admin}\nproxy:\n  max_connections: 1\n  workers: 1\n");
    let t = start(
        &fixture,
        &["a"],
        "  handshake_timeout: 1s\n",
        &top,
        |d| leaf.write(d, "a"),
        &ca,
    );
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let mut silent = tokio::net::TcpStream::connect(("127.0.0.1", t.https))
            .await
            .expect("connect");
        let started = Instant::now();
        // A real client meanwhile: it waits for the slot, then is served.
        let config = client_config(&t.ca, &[b"http/1.1"], true);
        let https = t.https;
        let waiting = tokio::spawn(async move { connect(https, "a.test", config).await });
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(SOON, silent.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "the silent connection is closed: {read:?}"
        );
        assert!(
            started.elapsed() >= Duration::from_millis(900),
            "not before the timeout"
        );
        let tls = waiting
            .await
            .expect("task")
            .expect("handshake after the slot freed");
        drop(tls);
    });
    // The client's side of a TLS 1.3 handshake ends before the server has read the
    // client's Finished: wait for the server to count it.
    let mut metrics = String::new();
    wait_until("the server counts the completed handshake", SOON, || {
        metrics = get_blocking(admin, "/metrics")
            .map(|(_, m)| m)
            .unwrap_or_default();
        metrics.contains("rolld_tls_handshakes_total 1")
    });
    assert!(
        metrics.contains("rolld_tls_handshake_failures_total{reason=\"timeout\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("rolld_tls_connections_total{version=\"TLSv1.3\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("rolld_tls_alpn_total{protocol=\"http/1.1\"} 1"),
        "{metrics}"
    );
}

#[test]
fn the_plain_listener_redirects_to_https_with_path_and_query_and_keeps_alive() {
    let ca = Ca::new();
    let leaf = ca.leaf(&["a.test"], 90);
    let fixture = Fixture::new(1);
    let t = start(
        &fixture,
        &["a"],
        "  redirect_http: true\n",
        "",
        |d| leaf.write(d, "a"),
        &ca,
    );
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", fixture.listen))
            .await
            .expect("connect");
        let https = t.https;
        for (path, host, location) in [
            (
                "/a/b?c=d&e=%20f",
                "a.test",
                format!("https://a.test:{https}/a/b?c=d&e=%20f"),
            ),
            ("/", "a.test:80", format!("https://a.test:{https}/")),
            ("/x?y", "[::1]:8080", format!("https://[::1]:{https}/x?y")),
        ] {
            conn.write_all(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
                .await
                .expect("write");
            let head = read_head(&mut conn).await;
            assert!(head.starts_with("HTTP/1.1 308"), "{head}");
            assert!(
                head.to_ascii_lowercase()
                    .contains(&format!("location: {}\r\n", location.to_ascii_lowercase())),
                "{head}"
            );
            assert!(head.contains("content-length: 0"), "{head}");
        }
    });
}

/// Reads one response head (the redirects have no body) from a keep-alive connection.
async fn read_head(conn: &mut tokio::net::TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(SOON, conn.read(&mut byte))
            .await
            .expect("an answer in time")
            .expect("read");
        assert_eq!(
            n,
            1,
            "connection closed after {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
        assert!(head.len() < 64 * 1024);
    }
    String::from_utf8_lossy(&head).into_owned()
}

#[test]
fn rolld_check_shows_names_and_expiry_and_refuses_bad_certificates() {
    let ca = Ca::new();
    let good = ca.leaf(&["a.test", "*.a.test"], 10);
    let other = ca.leaf(&["a.test"], 90);
    let expired = ca.leaf(&["old.test"], -2);
    let dir = tempfile::tempdir().expect("dir");
    good.write(dir.path(), "good");
    expired.write(dir.path(), "expired");
    std::fs::write(dir.path().join("mismatch.pem"), &good.cert_pem).expect("write");
    std::fs::write(dir.path().join("mismatch.key"), &other.key_pem).expect("write");
    let check = |cert: &str| {
        let yaml = format!(
            "tls:\n  listen: 127.0.0.1:8443\n  certificates:\n    - {{cert: {cert}.pem, key: {cert}.key}}\napp-servers:\n  cmd: 'x {{port}}'\n  workset:\n    - numprocs: [9001]\n    - numprocs: [9002]\n"
        );
        let config = dir.path().join("rolld.yml");
        std::fs::write(&config, yaml).expect("write");
        let out = output_within(
            Command::new(ROLLD).arg("check").arg(&config),
            Duration::from_secs(60),
        );
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (code, out) = check("good");
    assert_eq!(code, Some(0), "{out}");
    let shown = format!(
        "certificate:  {} (default): a.test, *.a.test (expires ",
        dir.path().join("good.pem").display()
    );
    assert!(out.contains(&shown), "{out}");
    assert!(
        out.contains("in 9 days)") || out.contains("in 10 days)"),
        "{out}"
    );

    let (code, out) = check("mismatch");
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("tls.certificates[0]"), "{out}");
    assert!(
        out.contains("mismatch.key: the key does not match the certificate"),
        "{out}"
    );

    let (code, out) = check("expired");
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("expired.pem: the certificate expired on"),
        "{out}"
    );

    let (code, out) = check("missing");
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("cannot read") && out.contains("missing.pem"),
        "{out}"
    );
}

#[test]
fn a_certificate_near_expiry_is_warned_about_in_the_log() {
    let ca = Ca::new();
    let leaf = ca.leaf(&["soon.test"], 5);
    let fixture = Fixture::new(1);
    let t = start(&fixture, &["soon"], "", "", |d| leaf.write(d, "soon"), &ca);
    t.rolld.wait_log("TLS certificate expires on", 1);
}

/// One HTTPS connection of the load: HTTP/1.1 or HTTP/2 over TLS.
enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

async fn open(port: u16, ca: &Path, h2: bool) -> Result<Sender, String> {
    let alpn: &[&[u8]] = if h2 { &[b"h2"] } else { &[b"http/1.1"] };
    let tls = connect(port, "a.test", client_config(ca, alpn, true)).await?;
    let io = TokioIo::new(tls);
    if h2 {
        let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(|e| format!("h2 handshake: {e}"))?;
        tokio::spawn(conn);
        Ok(Sender::H2(send))
    } else {
        let (send, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| format!("h1 handshake: {e}"))?;
        tokio::spawn(conn);
        Ok(Sender::H1(send))
    }
}

/// The n-th request of the load and the exact body that must come back.
fn nth(n: usize) -> (http::Request<Full<Bytes>>, Option<Vec<u8>>) {
    let delay = (n * 37) % 100;
    if n % 2 == 0 {
        let req = http::Request::get(format!("https://a.test/?delay={delay}"))
            .header("host", "a.test")
            .body(Full::new(Bytes::new()))
            .expect("request");
        (req, None)
    } else {
        let body = format!("payload {n} ").repeat(20 + n % 300).into_bytes();
        let req = http::Request::post(format!("https://a.test/echo?delay={delay}"))
            .header("host", "a.test")
            .body(Full::new(Bytes::from(body.clone())))
            .expect("request");
        (req, Some(body))
    }
}

async fn send(sender: &mut Sender, n: usize) -> Result<(), String> {
    let (req, expected) = nth(n);
    let response = match sender {
        Sender::H1(s) => {
            s.ready().await.map_err(|e| format!("ready: {e}"))?;
            let mut req = req;
            *req.uri_mut() = req
                .uri()
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .parse()
                .expect("path");
            s.send_request(req).await
        }
        Sender::H2(s) => s.send_request(req).await,
    }
    .map_err(|e| format!("request {n}: {e}"))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body {n}: {e}"))?
        .to_bytes();
    let good = status == 200
        && match &expected {
            Some(e) => body == e[..],
            None => body.starts_with(b"hello from "),
        };
    if good {
        Ok(())
    } else {
        Err(format!(
            "request {n}: {status} {:?}",
            String::from_utf8_lossy(&body[..body.len().min(80)])
        ))
    }
}

#[test]
fn rolls_and_a_certificate_rotation_under_https_load_lose_no_request() {
    let ca = Ca::new();
    let first = ca.leaf(&["a.test"], 90);
    let second = ca.leaf(&["a.test"], 120);
    let fixture = Fixture::new(2);
    let t = start(&fixture, &["a"], "", "", |d| first.write(d, "a"), &ca);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let counter = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    // 16 HTTP/1.1 keep-alive connections, and 4 HTTP/2 connections with 4 streams
    // at a time each.
    for w in 0..20 {
        let h2 = w >= 16;
        let streams = if h2 { 4 } else { 1 };
        let (stop, ok, errors, counter) =
            (stop.clone(), ok.clone(), errors.clone(), counter.clone());
        let (port, ca) = (t.https, t.ca.clone());
        workers.push(rt.spawn(async move {
            let started = Instant::now();
            let mut sender: Option<Sender> = None;
            while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(120) {
                let n = counter.fetch_add(streams, Ordering::Relaxed);
                if n > 200_000 {
                    break;
                }
                let Some(s) = sender.as_mut() else {
                    match open(port, &ca, h2).await {
                        Ok(s) => sender = Some(s),
                        Err(e) => errors.lock().expect("lock").push(e),
                    }
                    continue;
                };
                let results = match s {
                    Sender::H1(_) => vec![send(s, n).await],
                    Sender::H2(h2) => {
                        let mut tasks = Vec::new();
                        for i in 0..streams {
                            let mut one = Sender::H2(h2.clone());
                            tasks.push(tokio::spawn(async move { send(&mut one, n + i).await }));
                        }
                        let mut results = Vec::new();
                        for task in tasks {
                            results.push(task.await.unwrap_or_else(|e| Err(e.to_string())));
                        }
                        results
                    }
                };
                for result in results {
                    match result {
                        Ok(()) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            errors.lock().expect("lock").push(e);
                            sender = None;
                        }
                    }
                }
            }
        }));
    }
    wait_until("load to flow", SOON, || ok.load(Ordering::Relaxed) > 100);
    for roll in 1..=3u64 {
        if roll == 2 {
            // Rotation during the same load: new handshakes see the new certificate.
            second.write(t.rolld.dir.path(), "a");
        }
        t.rolld.signal(Signal::SIGHUP);
        t.rolld.wait_log("roll finished", roll as usize + 1);
        let before = ok.load(Ordering::Relaxed);
        wait_until("requests after the roll", SOON, || {
            ok.load(Ordering::Relaxed) > before + 500
        });
        let served = served_cert(t.https, "a.test", &t.ca, true).expect("a handshake");
        let wanted = if roll >= 2 { &second.der } else { &first.der };
        assert!(&served == wanted, "roll {roll}: the wrong certificate");
    }
    stop.store(true, Ordering::Relaxed);
    rt.block_on(async {
        for w in workers {
            w.await.expect("load worker");
        }
    });
    let errors = errors.lock().expect("lock");
    assert_none_failed(ok.load(Ordering::Relaxed), &errors);
    assert!(ok.load(Ordering::Relaxed) > 1000, "the load ran");
}

#[test]
fn a_broken_new_certificate_is_refused_on_reload_and_the_old_one_keeps_serving() {
    let ca = Ca::new();
    let first = ca.leaf(&["a.test"], 90);
    let other = ca.leaf(&["a.test"], 90);
    let fixture = Fixture::new(1);
    let t = start(&fixture, &["a"], "", "", |d| first.write(d, "a"), &ca);
    // A new certificate whose key was not replaced with it.
    std::fs::write(t.rolld.dir.path().join("a.pem"), &other.cert_pem).expect("write");
    let (code, _, err) = t.rolld.control("reload", &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("a.key: the key does not match the certificate"),
        "{err}"
    );
    assert!(err.contains("the current set keeps serving"), "{err}");
    assert_eq!(
        served_cert(t.https, "a.test", &t.ca, true).expect("still served"),
        first.der
    );
    // Fixed: the next reload serves it.
    std::fs::write(t.rolld.dir.path().join("a.key"), &other.key_pem).expect("write");
    let (code, _, err) = t.rolld.control("reload", &[]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        served_cert(t.https, "a.test", &t.ca, true).expect("served"),
        other.der
    );
}

#[test]
fn tls_binds_its_privileged_port_and_reads_the_key_as_root_then_runs_as_the_user() {
    if !root_or_skip("dropping privileges after binding the TLS port") {
        return;
    }
    let nobody = nix::unistd::User::from_name("nobody")
        .expect("lookup")
        .expect("user nobody exists");
    let (_bin, backend) = world_readable_copy(BACKEND);
    let fixture = Fixture::new(1).cmd(format!("{} {{port}}", backend.display()));
    let ca = Ca::new();
    let leaf = ca.leaf(&["a.test"], 90);
    // Only root can bind it: serving on it proves the bind came before the switch.
    let https = free_privileged_port();
    let yaml = format!(
        "user: nobody\n{}tls:\n  listen: 127.0.0.1:{https}\n  certificates:\n    - {{cert: a.pem, key: a.key}}\n",
        fixture.yaml()
    );
    let ca_pem = ca.pem();
    let rolld = Rolld::spawn_with(&yaml, fixture.listen, |dir| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, PermissionsExt::from_mode(0o755)).expect("chmod");
        std::fs::write(dir.join("ca.pem"), ca_pem).expect("write CA");
        leaf.write(dir, "a");
        // The key is root's alone, as in /etc/ssl/private.
        std::fs::set_permissions(dir.join("a.key"), PermissionsExt::from_mode(0o600))
            .expect("chmod key");
    });
    rolld.wait_log("roll finished", 1);
    let status = std::fs::read_to_string(format!("/proc/{}/status", rolld.pid())).expect("status");
    let uid: u32 = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("uid");
    assert_eq!(uid, nobody.uid.as_raw(), "rolld runs as nobody");
    let ca_file = rolld.dir.path().join("ca.pem");
    assert_eq!(
        served_cert(https, "a.test", &ca_file, true).expect("served"),
        leaf.der
    );
    // A reload reads the files as nobody: a key only root can read refuses it, saying
    // so, and the certificate read at start keeps serving.
    let (code, _, err) = rolld.control("reload", &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("cannot read") && err.contains("a.key"),
        "{err}"
    );
    assert_eq!(
        served_cert(https, "a.test", &ca_file, true).expect("still served"),
        leaf.der
    );
}

#[test]
fn a_websocket_over_tls_echoes_across_a_roll() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let ca = Ca::new();
    let leaf = ca.leaf(&["a.test"], 90);
    let fixture = Fixture::new(1);
    let t = start(&fixture, &["a"], "", "", |d| leaf.write(d, "a"), &ca);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let tls = connect(
            t.https,
            "a.test",
            client_config(&t.ca, &[b"http/1.1"], true),
        )
        .await
        .expect("TLS");
        let (mut ws, response) = tokio_tungstenite::client_async("wss://a.test/ws", tls)
            .await
            .expect("WebSocket handshake over TLS");
        assert_eq!(response.status(), 101);
        for text in ["before the roll", "during the roll"] {
            if text == "during the roll" {
                t.rolld.signal(Signal::SIGHUP);
                t.rolld.wait_log("draining 1 request(s) in flight", 1);
            }
            ws.send(Message::text(text)).await.expect("send");
            let echo = tokio::time::timeout(SOON, ws.next())
                .await
                .expect("echo in time")
                .expect("echo")
                .expect("frame");
            assert_eq!(echo, Message::text(text));
        }
        ws.close(None).await.expect("close");
    });
    t.rolld.wait_log("roll finished", 2);
}
