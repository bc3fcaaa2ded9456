//! Header rewriting between client and upstream: hop-by-hop headers stay on their hop,
//! and the upstream learns who the client is.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
/// Never forwarded: a CGI app would read it as its outgoing proxy (httpoxy).
static PROXY: HeaderName = HeaderName::from_static("proxy");

/// Whether the request asks to switch protocols (WebSocket and others).
pub(crate) fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE) && connection_has(headers, "upgrade")
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Removes the headers that describe one connection rather than the message: the fixed
/// list and every header the `Connection` header names. With `upgrade`, `Upgrade` and
/// `Connection: upgrade` survive so the next hop can switch protocols too.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    if headers.contains_key(header::CONNECTION) {
        // The usual tokens name no header or one removed below anyway; only other
        // tokens cost an allocation.
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|t| {
                !["close", "keep-alive", "upgrade", "te"]
                    .iter()
                    .any(|k| t.eq_ignore_ascii_case(k))
            })
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(&name);
        }
        headers.remove(header::CONNECTION);
    }
    for name in [&KEEP_ALIVE, &PROXY_CONNECTION, &PROXY] {
        headers.remove(name);
    }
    headers.remove(header::TE);
    headers.remove(header::TRAILER);
    headers.remove(header::TRANSFER_ENCODING);
    headers.remove(header::PROXY_AUTHENTICATE);
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

/// Tells the upstream who the client is. From a trusted proxy, the forwarding headers
/// it sent are kept and the client's address is appended; from anyone else they are
/// replaced, so a client cannot claim another address.
pub(crate) fn set_forwarded(headers: &mut HeaderMap, client_ip: &HeaderValue, trusted: bool) {
    if trusted {
        let chain: Vec<u8> = headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .map(HeaderValue::as_bytes)
            .filter(|v| !v.is_empty())
            .chain(std::iter::once(client_ip.as_bytes()))
            .collect::<Vec<_>>()
            .join(&b", "[..]);
        // The first address in the chain is the original client, as the proxy before us
        // saw it.
        let real = headers
            .get(&X_FORWARDED_FOR)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .and_then(|v| HeaderValue::from_str(v.trim()).ok())
            .unwrap_or_else(|| client_ip.clone());
        if let Ok(value) = HeaderValue::from_bytes(&chain) {
            headers.insert(&X_FORWARDED_FOR, value);
        }
        headers.insert(&X_REAL_IP, real);
        if !headers.contains_key(&X_FORWARDED_PROTO) {
            headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_static("http"));
        }
        if !headers.contains_key(&X_FORWARDED_HOST) {
            if let Some(host) = headers.get(header::HOST).cloned() {
                headers.insert(&X_FORWARDED_HOST, host);
            }
        }
        return;
    }
    headers.insert(&X_FORWARDED_FOR, client_ip.clone());
    headers.insert(&X_REAL_IP, client_ip.clone());
    headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    match headers.get(header::HOST).cloned() {
        Some(host) => headers.insert(&X_FORWARDED_HOST, host),
        None => headers.remove(&X_FORWARDED_HOST),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_names_are_removed() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("transfer-encoding", "chunked"),
            ("te", "trailers"),
            ("proxy", "http://evil"),
            ("upgrade", "websocket"),
            ("x-kept", "yes"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["x-kept"]);
    }

    #[test]
    fn an_upgrade_keeps_its_upgrade_headers() {
        let mut h = map(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert!(is_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(
            h.get("upgrade").map(|v| v.as_bytes()),
            Some(&b"websocket"[..])
        );
        assert_eq!(
            h.get("connection").map(|v| v.as_bytes()),
            Some(&b"upgrade"[..])
        );
    }

    #[test]
    fn spoofed_forwarding_headers_are_replaced() {
        let mut h = map(&[("x-forwarded-for", "1.2.3.4"), ("host", "example.test")]);
        set_forwarded(&mut h, &HeaderValue::from_static("127.0.0.1"), false);
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(h["x-forwarded-for"], "127.0.0.1");
        assert_eq!(h["x-forwarded-host"], "example.test");
    }

    #[test]
    fn a_trusted_proxy_chain_is_kept_and_extended() {
        let mut h = map(&[
            ("x-forwarded-for", "203.0.113.7, 10.0.0.2"),
            ("x-forwarded-proto", "https"),
            ("host", "example.test"),
        ]);
        set_forwarded(&mut h, &HeaderValue::from_static("10.0.0.3"), true);
        assert_eq!(h["x-forwarded-for"], "203.0.113.7, 10.0.0.2, 10.0.0.3");
        assert_eq!(h["x-real-ip"], "203.0.113.7");
        assert_eq!(h["x-forwarded-proto"], "https");
    }
}
