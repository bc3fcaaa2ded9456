//! TLS on the front listener: the server settings, choosing a certificate by SNI, and
//! swapping the certificates while connections are served.
//!
//! It knows nothing of files: the caller parses certificates and keys and hands over
//! [`Certificate`]s. Settings are rustls's with the ring provider, TLS 1.2 and 1.3
//! only, ALPN `h2` and `http/1.1`, and session resumption by both a session cache
//! (TLS 1.2 ids) and tickets (TLS 1.3 and 1.2).
//!
//! Rotation swaps one [`ArcSwap`] that the resolver reads on every handshake: a new
//! handshake sees the new certificates, an established connection keeps the one it
//! was made with (rustls holds it), and nothing else is rebuilt.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::HeaderValue;
use rustls::server::{ClientHello, ResolvesServerCert, ServerSessionMemoryCache};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

/// Sessions (TLS 1.2 session ids) remembered for resumption, as nginx's
/// `ssl_session_cache shared:SSL:1m` holds about 4000.
const SESSION_CACHE: usize = 4096;

/// One certificate chain with its key, and the names (SANs) it serves.
#[derive(Clone, Debug)]
pub struct Certificate {
    /// DNS names, lowercase; `*.example.com` serves one label under example.com.
    pub names: Vec<String>,
    pub key: Arc<CertifiedKey>,
}

/// The certificates of one moment, indexed by name.
#[derive(Debug)]
struct Store {
    /// The first is the default, for clients that send no (or an unknown) name.
    certificates: Vec<Arc<CertifiedKey>>,
    exact: HashMap<String, usize>,
    /// `*.example.com` as `example.com`.
    wildcard: HashMap<String, usize>,
}

impl Store {
    fn new(certificates: &[Certificate]) -> Self {
        let mut store = Store {
            certificates: Vec::with_capacity(certificates.len()),
            exact: HashMap::new(),
            wildcard: HashMap::new(),
        };
        for (i, cert) in certificates.iter().enumerate() {
            store.certificates.push(cert.key.clone());
            for name in &cert.names {
                let name = name.to_ascii_lowercase();
                // The first certificate naming a host wins, as listed.
                match name.strip_prefix("*.") {
                    Some(parent) => store.wildcard.entry(parent.to_string()).or_insert(i),
                    None => store.exact.entry(name).or_insert(i),
                };
            }
        }
        store
    }

    fn pick(&self, server_name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let index = server_name
            .map(|name| name.trim_end_matches('.').to_ascii_lowercase())
            .and_then(|name| {
                self.exact.get(&name).copied().or_else(|| {
                    let (_, parent) = name.split_once('.')?;
                    self.wildcard.get(parent).copied()
                })
            })
            .unwrap_or(0);
        self.certificates.get(index).cloned()
    }
}

/// Chooses each handshake's certificate from the current [`Store`].
#[derive(Debug)]
struct Resolver(ArcSwap<Store>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.load().pick(hello.server_name())
    }
}

/// Why certificates were refused.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("no certificate given")]
    NoCertificate,
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
}

/// The TLS side of a front listener, shared by all its connections.
pub struct Tls {
    acceptor: tokio_rustls::TlsAcceptor,
    resolver: Arc<Resolver>,
    /// Longest time from accepting a connection to the end of its handshake.
    pub(crate) handshake_timeout: Duration,
    /// The `Strict-Transport-Security` header added to every response, if any.
    pub(crate) hsts: Option<HeaderValue>,
    stats: TlsStats,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("resolver", &self.resolver)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("hsts", &self.hsts)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// TLS with `certificates` (the first is the default), a handshake timeout, and
    /// HSTS for `hsts` if given.
    pub fn new(
        certificates: &[Certificate],
        handshake_timeout: Duration,
        hsts: Option<Duration>,
    ) -> Result<Tls, TlsError> {
        if certificates.is_empty() {
            return Err(TlsError::NoCertificate);
        }
        let resolver = Arc::new(Resolver(ArcSwap::from_pointee(Store::new(certificates))));
        // ring: builds with a C compiler alone (aws-lc-rs needs cmake too).
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        config.session_storage = ServerSessionMemoryCache::new(SESSION_CACHE);
        config.ticketer = rustls::crypto::ring::Ticketer::new()?;
        let hsts = hsts.map(|age| {
            HeaderValue::from_str(&format!("max-age={}", age.as_secs()))
                .expect("a number is a valid header value")
        });
        Ok(Tls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            resolver,
            handshake_timeout,
            hsts,
            stats: TlsStats::default(),
        })
    }

    /// Serves `certificates` to new handshakes from now on; connections already
    /// established keep theirs. An empty list is refused and changes nothing.
    pub fn rotate(&self, certificates: &[Certificate]) -> Result<(), TlsError> {
        if certificates.is_empty() {
            return Err(TlsError::NoCertificate);
        }
        self.resolver.0.store(Arc::new(Store::new(certificates)));
        Ok(())
    }

    /// Handshake counters so far.
    pub fn stats(&self) -> &TlsStats {
        &self.stats
    }

    pub(crate) fn acceptor(&self) -> &tokio_rustls::TlsAcceptor {
        &self.acceptor
    }
}

/// Why a handshake failed, as counted in [`TlsStats`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// No complete handshake within the handshake timeout.
    Timeout,
    /// The client closed the connection during the handshake.
    Closed,
    /// Nothing both sides support: TLS version, cipher suite, ALPN protocol.
    Incompatible,
    /// The client sent an alert (it refused rolld's certificate, for example).
    Alert,
    /// Bytes that are not a TLS handshake (plain HTTP on the TLS port, say).
    BadMessage,
    /// Anything else (socket errors).
    Other,
}

impl HandshakeFailure {
    pub const ALL: [HandshakeFailure; 6] = [
        HandshakeFailure::Timeout,
        HandshakeFailure::Closed,
        HandshakeFailure::Incompatible,
        HandshakeFailure::Alert,
        HandshakeFailure::BadMessage,
        HandshakeFailure::Other,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::Closed => "closed",
            HandshakeFailure::Incompatible => "incompatible",
            HandshakeFailure::Alert => "alert",
            HandshakeFailure::BadMessage => "bad_message",
            HandshakeFailure::Other => "other",
        }
    }

    pub(crate) fn of(err: &io::Error) -> Self {
        if err.kind() == io::ErrorKind::UnexpectedEof {
            return HandshakeFailure::Closed;
        }
        match err
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            Some(rustls::Error::PeerIncompatible(_) | rustls::Error::NoApplicationProtocol) => {
                HandshakeFailure::Incompatible
            }
            Some(rustls::Error::AlertReceived(_)) => HandshakeFailure::Alert,
            Some(
                rustls::Error::InvalidMessage(_)
                | rustls::Error::InappropriateHandshakeMessage { .. }
                | rustls::Error::InappropriateMessage { .. }
                | rustls::Error::PeerMisbehaved(_),
            ) => HandshakeFailure::BadMessage,
            _ if matches!(
                err.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            ) =>
            {
                HandshakeFailure::Closed
            }
            _ => HandshakeFailure::Other,
        }
    }
}

/// Handshake counters: relaxed atomics, one increment or two per connection.
#[derive(Debug, Default)]
pub struct TlsStats {
    handshakes: AtomicU64,
    failures: [AtomicU64; 6],
    /// TLS 1.2, TLS 1.3.
    versions: [AtomicU64; 2],
    /// h2, http/1.1, none.
    alpn: [AtomicU64; 3],
    resumed: AtomicU64,
}

/// A copy of [`TlsStats`] at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsStatsSnapshot {
    /// Handshakes completed.
    pub handshakes: u64,
    /// Resumed sessions among them.
    pub resumed: u64,
    pub failures: Vec<(HandshakeFailure, u64)>,
    /// By version: `TLSv1.2`, `TLSv1.3`.
    pub versions: Vec<(&'static str, u64)>,
    /// By negotiated protocol: `h2`, `http/1.1`, `none`.
    pub alpn: Vec<(&'static str, u64)>,
}

impl TlsStats {
    pub(crate) fn failed(&self, why: HandshakeFailure) {
        let i = HandshakeFailure::ALL
            .iter()
            .position(|&f| f == why)
            .unwrap_or(HandshakeFailure::ALL.len() - 1);
        self.failures[i].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn completed(&self, connection: &rustls::ServerConnection) {
        self.handshakes.fetch_add(1, Ordering::Relaxed);
        let version = match connection.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => 1,
            _ => 0,
        };
        self.versions[version].fetch_add(1, Ordering::Relaxed);
        let alpn = match connection.alpn_protocol() {
            Some(b"h2") => 0,
            Some(_) => 1,
            None => 2,
        };
        self.alpn[alpn].fetch_add(1, Ordering::Relaxed);
        if connection.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
            self.resumed.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn snapshot(&self) -> TlsStatsSnapshot {
        let load = |n: &AtomicU64| n.load(Ordering::Relaxed);
        TlsStatsSnapshot {
            handshakes: load(&self.handshakes),
            resumed: load(&self.resumed),
            failures: HandshakeFailure::ALL
                .iter()
                .zip(&self.failures)
                .map(|(&f, n)| (f, load(n)))
                .collect(),
            versions: vec![
                ("TLSv1.2", load(&self.versions[0])),
                ("TLSv1.3", load(&self.versions[1])),
            ],
            alpn: vec![
                ("h2", load(&self.alpn[0])),
                ("http/1.1", load(&self.alpn[1])),
                ("none", load(&self.alpn[2])),
            ],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certificate(names: &[&str]) -> Certificate {
        let key = rcgen::KeyPair::generate().expect("key");
        let params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .expect("params");
        let cert = params.self_signed(&key).expect("cert");
        let der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let signer = rustls::crypto::ring::sign::any_supported_type(&der).expect("signer");
        Certificate {
            names: names.iter().map(|n| n.to_string()).collect(),
            key: Arc::new(CertifiedKey::new(vec![cert.der().clone()], signer)),
        }
    }

    #[test]
    fn names_pick_their_certificate_and_anything_else_the_first() {
        let (a, b, c) = (
            certificate(&["a.test"]),
            certificate(&["*.b.test", "b.test"]),
            certificate(&["x.b.test"]),
        );
        let store = Store::new(&[a.clone(), b.clone(), c.clone()]);
        let pick = |name: Option<&str>| store.pick(name).expect("a certificate");
        assert!(Arc::ptr_eq(&pick(Some("a.test")), &a.key));
        assert!(
            Arc::ptr_eq(&pick(Some("A.Test.")), &a.key),
            "case and root dot"
        );
        assert!(Arc::ptr_eq(&pick(Some("b.test")), &b.key));
        assert!(Arc::ptr_eq(&pick(Some("y.b.test")), &b.key), "wildcard");
        assert!(
            Arc::ptr_eq(&pick(Some("x.b.test")), &c.key),
            "exact beats wildcard"
        );
        assert!(
            Arc::ptr_eq(&pick(Some("z.y.b.test")), &a.key),
            "one label only"
        );
        assert!(Arc::ptr_eq(&pick(Some("other.test")), &a.key));
        assert!(Arc::ptr_eq(&pick(None), &a.key));
    }

    #[test]
    fn rotation_refuses_an_empty_list_and_keeps_serving() {
        let (a, b) = (certificate(&["a.test"]), certificate(&["a.test"]));
        let tls = Tls::new(std::slice::from_ref(&a), Duration::from_secs(1), None).expect("tls");
        assert!(tls.rotate(&[]).is_err());
        assert!(Arc::ptr_eq(
            &tls.resolver.0.load().pick(None).expect("a"),
            &a.key
        ));
        tls.rotate(std::slice::from_ref(&b)).expect("rotate");
        assert!(Arc::ptr_eq(
            &tls.resolver.0.load().pick(None).expect("b"),
            &b.key
        ));
    }
}
