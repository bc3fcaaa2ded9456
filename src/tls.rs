//! Certificate files: read, checked (key matches, not expired), and turned into the
//! proxy's certificates, with the names and expiry that `rolld check`, `rolld status`
//! and the expiry warning show. The proxy's `tls` module serves them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rolld_proxy::tls::Certificate;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use serde::{Deserialize, Serialize};

/// A certificate is warned about from this long before it expires.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);

/// One `tls.certificates` entry: the files, as resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// What the files held: the proxy's certificate and what to show about it.
#[derive(Clone, Debug)]
pub struct Loaded {
    pub certificate: Certificate,
    pub info: CertInfo,
}

/// A certificate as `rolld check` and `rolld status` show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertInfo {
    pub cert: PathBuf,
    /// DNS names (SANs; the subject's CN when there is none).
    pub names: Vec<String>,
    /// Unix time (seconds) after which it is no longer valid.
    pub not_after: i64,
}

impl CertInfo {
    /// Whole days from `now` until it expires (negative once expired).
    pub fn days_left(&self, now: SystemTime) -> i64 {
        (self.not_after - unix(now)).div_euclid(24 * 3600)
    }

    /// The expiry as a UTC date and time, e.g. `2027-02-24 06:04:40 UTC`.
    pub fn expires(&self) -> String {
        let when = UNIX_EPOCH + Duration::from_secs(self.not_after.max(0) as u64);
        let text = humantime::format_rfc3339_seconds(when).to_string();
        text.replace('T', " ").replace('Z', " UTC")
    }
}

fn unix(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

/// Reads and checks one certificate and its key. Errors name the file and what is
/// wrong with it.
pub fn load(files: &CertFiles, now: SystemTime) -> Result<Loaded, String> {
    let (cert_path, key_path) = (&files.cert, &files.key);
    let cert_pem = read(cert_path)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not a PEM certificate ({e})", cert_path.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "{}: holds no certificate (expected -----BEGIN CERTIFICATE-----)",
            cert_path.display()
        ));
    }
    let key_pem = read(key_path)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| format!("{}: no private key in it ({e})", key_path.display()))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| {
        format!(
            "{}: a key rolld cannot use ({e}); use an RSA, ECDSA P-256/P-384 or Ed25519 key",
            key_path.display()
        )
    })?;

    let (_, x509) = x509_parser::parse_x509_certificate(&chain[0]).map_err(|e| {
        format!(
            "{}: the certificate cannot be parsed ({e})",
            cert_path.display()
        )
    })?;
    let validity = x509.validity();
    let not_after = validity.not_after.timestamp();
    let not_before = validity.not_before.timestamp();
    let info = CertInfo {
        cert: cert_path.clone(),
        names: names(&x509),
        not_after,
    };
    if info.names.is_empty() {
        return Err(format!(
            "{}: the certificate names no host (no DNS name in its SAN or CN)",
            cert_path.display()
        ));
    }
    if not_after < unix(now) {
        return Err(format!(
            "{}: the certificate expired on {}",
            cert_path.display(),
            info.expires()
        ));
    }
    if not_before > unix(now) {
        return Err(format!(
            "{}: the certificate is not valid before {}",
            cert_path.display(),
            validity.not_before
        ));
    }

    let certified = CertifiedKey::new(chain, signer);
    certified.keys_match().map_err(|e| {
        format!(
            "{}: the key does not match the certificate {} ({e})",
            key_path.display(),
            cert_path.display()
        )
    })?;
    Ok(Loaded {
        certificate: Certificate {
            names: info.names.clone(),
            key: Arc::new(certified),
        },
        info,
    })
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// The DNS names a certificate serves: its SAN DNS entries, or the subject's CN when
/// it has no SAN extension (as old certificates do).
fn names(x509: &x509_parser::certificate::X509Certificate<'_>) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    if let Ok(Some(san)) = x509.subject_alternative_name() {
        return san
            .value
            .general_names
            .iter()
            .filter_map(|name| match name {
                GeneralName::DNSName(dns) => Some(dns.to_ascii_lowercase()),
                _ => None,
            })
            .collect();
    }
    x509.subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok())
        .map(str::to_ascii_lowercase)
        .collect()
}

/// Logs a warning for each certificate that expires within [`EXPIRY_WARNING`].
pub fn warn_expiring(infos: &[CertInfo], now: SystemTime) {
    for info in infos {
        if info.not_after - unix(now) < EXPIRY_WARNING.as_secs() as i64 {
            tracing::warn!(
                cert = %info.cert.display(),
                names = ?info.names,
                days_left = info.days_left(now),
                "TLS certificate expires on {}; replace it and run `rolld reload`",
                info.expires()
            );
        }
    }
}
