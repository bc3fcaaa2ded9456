//! Header rewriting between client and upstream: hop-by-hop headers stay on their hop,
//! and the upstream learns who the client is.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
/// Never forwarded: a CGI app would read it as its outgoing proxy (httpoxy).
static PROXY: HeaderName = HeaderName::from_static("proxy");

/// Whether the request asks to switch protocols (WebSocket and others). An upgrade to
/// HTTP/2 alone (`Upgrade: h2c`, as `curl --http2` sends over plain HTTP) is not passed
/// on: rolld answers it over HTTP/1.1, as the server may, rather than let the app turn
/// the connection into a tunnel whose requests no drain could count.
pub(crate) fn is_upgrade(headers: &HeaderMap) -> bool {
    let offers_other_than_h2c = headers
        .get_all(header::UPGRADE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .any(|p| !p.is_empty() && !p.eq_ignore_ascii_case(b"h2c"));
    offers_other_than_h2c && connection_has(headers, "upgrade")
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    connection_tokens(headers).any(|t| t.eq_ignore_ascii_case(token.as_bytes()))
}

/// The tokens of every `Connection` header, as bytes: a value with bytes beyond ASCII
/// (obs-text) still names its other headers.
fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &[u8]> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// Removes the headers that describe one connection rather than the message: the fixed
/// list and every header the `Connection` header names. With `upgrade`, `Upgrade` and
/// `Connection: upgrade` survive so the next hop can switch protocols too.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // Most messages carry none of them: one pass over the names they have costs less
    // than a lookup of each name removed below.
    if !upgrade && !headers.keys().any(is_hop_by_hop) {
        return;
    }
    if headers.contains_key(header::CONNECTION) {
        // The usual tokens name no header or one removed below anyway; only other
        // tokens cost an allocation.
        let named: Vec<HeaderName> = connection_tokens(headers)
            .filter(|t| {
                !["close", "keep-alive", "upgrade", "te"]
                    .iter()
                    .any(|k| t.eq_ignore_ascii_case(k.as_bytes()))
            })
            .filter_map(|t| HeaderName::from_bytes(t).ok())
            // A client must not be able to drop the request's Host on the way.
            .filter(|name| name != header::HOST)
            .collect();
        for name in named {
            headers.remove(&name);
        }
        headers.remove(header::CONNECTION);
    }
    for name in ALWAYS_REMOVED {
        headers.remove(name);
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

/// What `strip_hop_by_hop` removes from every message, whatever `Connection` names.
static ALWAYS_REMOVED: [&HeaderName; 7] = [
    &KEEP_ALIVE,
    &PROXY_CONNECTION,
    &PROXY,
    &header::TE,
    &header::TRAILER,
    &header::TRANSFER_ENCODING,
    &header::PROXY_AUTHENTICATE,
];

/// Whether `strip_hop_by_hop` has a header of this name to remove or rewrite, whatever
/// `Connection` names.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION || name == header::UPGRADE || ALWAYS_REMOVED.contains(&name)
}

/// Makes a request's map of fields the app's: its host in `Host` (HTTP/2 and the
/// absolute form carry it in the URI), no field of its hop (see `strip_hop_by_hop`), no
/// `Expect` (rolld answers `100-continue` itself when the body is first read, and the
/// app gets the body without the handshake); and says what the app is told of the
/// client, `(address, trusted, https)` (see `Forwarding`).
pub(crate) fn for_app(
    parts: &mut http::request::Parts,
    upgrade: bool,
    (client_ip, trusted, https): (&HeaderValue, bool, bool),
    trusts: &dyn Fn(IpAddr) -> bool,
) -> Forwarding {
    if parts.headers.get(header::HOST).is_none() {
        if let Some(value) = parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            parts.headers.insert(header::HOST, value);
        }
    }
    strip_hop_by_hop(&mut parts.headers, upgrade);
    parts.headers.remove(header::EXPECT);
    Forwarding::of(&parts.headers, client_ip, trusted, https, trusts)
}

/// Whether a client's field, by its name, goes to the app as the client wrote it, on a
/// request that `h1` took (no upgrade, a `Connection` that names no field) from a
/// client that is no trusted proxy: the fields `strip_hop_by_hop` removes and those
/// `Forwarding` writes in their place stay behind, as they do from the request's map.
pub(crate) fn passes_as_written(name: &[u8]) -> bool {
    let held_back = [&header::CONNECTION, &header::UPGRADE]
        .into_iter()
        .chain(ALWAYS_REMOVED)
        .chain(FORWARDING);
    !held_back.into_iter().any(|held| {
        let held = held.as_str().as_bytes();
        held.len() == name.len() && held.eq_ignore_ascii_case(name)
    })
}

/// Why a request's framing or routing headers cannot be forwarded safely, if they
/// cannot: a `Transfer-Encoding` other than exactly one `chunked` (a proxy and an app
/// that read such framing differently smuggle requests; nginx and HAProxy refuse it
/// too), or more than one `Host`.
pub(crate) fn ambiguous(headers: &HeaderMap) -> Option<&'static str> {
    // One pass over the fields costs less than a lookup of each name.
    let (mut te, mut chunked, mut hosts) = (0, true, 0);
    for (name, value) in headers {
        if name == header::TRANSFER_ENCODING {
            te += 1;
            chunked &= value.as_bytes().eq_ignore_ascii_case(b"chunked");
        } else if name == header::HOST {
            hosts += 1;
        }
    }
    if te > 1 || !chunked {
        return Some("Transfer-Encoding other than one `chunked`");
    }
    if hosts > 1 {
        return Some("more than one Host header");
    }
    None
}

/// What the upstream is told of the client: `X-Forwarded-For`, `X-Real-IP`,
/// `X-Forwarded-Proto` and `X-Forwarded-Host`. From a trusted proxy, the forwarding
/// headers it sent are kept and the client's address is appended; from anyone else they
/// are replaced, so a client cannot claim another address.
///
/// The request's own map is left as it is: the fields are written into the head that
/// goes to the app (see `exchange`), in place of the request's fields of these names,
/// which costs less than inserting four fields into a map sized for the request's own.
#[derive(Clone, Debug)]
pub(crate) struct Forwarding {
    /// rolld's value of each name of `FORWARDING`, if it writes one.
    values: [Option<HeaderValue>; 4],
    /// The request came from a trusted proxy: its own fields of a name rolld writes no
    /// value for go on. From anyone else, every field of these names is left out.
    trusted: bool,
}

/// The names `Forwarding` writes, in the order of its arrays.
static FORWARDING: [&HeaderName; 4] = [
    &X_FORWARDED_FOR,
    &X_REAL_IP,
    &X_FORWARDED_PROTO,
    &X_FORWARDED_HOST,
];

impl Forwarding {
    /// `client_ip` is the peer's address; `trusted` whether the peer is a trusted proxy,
    /// `trusts` which addresses are; `https` whether the client's connection is TLS.
    pub(crate) fn of(
        headers: &HeaderMap,
        client_ip: &HeaderValue,
        trusted: bool,
        https: bool,
        trusts: &dyn Fn(IpAddr) -> bool,
    ) -> Self {
        let host = headers.get(header::HOST).cloned();
        if !trusted {
            return Forwarding::untrusted(host, client_ip, https);
        }
        let proto = HeaderValue::from_static(if https { "https" } else { "http" });
        let chain: Vec<u8> = headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .map(HeaderValue::as_bytes)
            .filter(|v| !v.is_empty())
            .chain(std::iter::once(client_ip.as_bytes()))
            .collect::<Vec<_>>()
            .join(&b", "[..]);
        let real = real_ip(&chain, trusts).unwrap_or_else(|| client_ip.clone());
        // A chain that is no header value keeps the fields it was made of.
        let chain = HeaderValue::from_bytes(&chain).ok();
        // A trusted proxy's protocol and host stand; rolld's fill in for missing ones.
        let proto = (!headers.contains_key(&X_FORWARDED_PROTO)).then_some(proto);
        let host = if headers.contains_key(&X_FORWARDED_HOST) {
            None
        } else {
            host
        };
        Forwarding {
            values: [chain, Some(real), proto, host],
            trusted,
        }
    }

    /// What the app is told of a client that is no trusted proxy, whose request's
    /// `Host` is `host`: every forwarding field is rolld's.
    pub(crate) fn untrusted(
        host: Option<HeaderValue>,
        client_ip: &HeaderValue,
        https: bool,
    ) -> Self {
        let proto = HeaderValue::from_static(if https { "https" } else { "http" });
        Forwarding {
            values: [
                Some(client_ip.clone()),
                Some(client_ip.clone()),
                Some(proto),
                host,
            ],
            trusted: false,
        }
    }

    /// Whether a field the request came with goes on to the app.
    pub(crate) fn keeps(&self, name: &HeaderName) -> bool {
        // Every name of `FORWARDING` starts with an `x`: most fields are settled by it.
        if !name.as_str().starts_with('x') {
            return true;
        }
        !FORWARDING
            .iter()
            .zip(&self.values)
            .any(|(forwarding, value)| name == *forwarding && (value.is_some() || !self.trusted))
    }

    /// The fields rolld writes.
    pub(crate) fn fields(&self) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> {
        FORWARDING
            .iter()
            .zip(&self.values)
            .filter_map(|(name, value)| Some((*name, value.as_ref()?)))
    }

    /// Bytes the fields take in a head.
    pub(crate) fn len(&self) -> usize {
        self.fields()
            .map(|(name, value)| name.as_str().len() + value.len() + 4)
            .sum()
    }

    /// `headers` as the app gets them: what `keeps` keeps, then `fields`.
    #[cfg(test)]
    pub(crate) fn applied(&self, headers: &HeaderMap) -> HeaderMap {
        let mut out = HeaderMap::new();
        for (name, value) in headers.iter().filter(|(name, _)| self.keeps(name)) {
            out.append(name.clone(), value.clone());
        }
        for (name, value) in self.fields() {
            out.append(name.clone(), value.clone());
        }
        out
    }
}

/// A client's address as its forwarding fields carry it, written as `Display` writes
/// it. An IPv4 address is written by hand: through `Display` it was the largest of
/// rolld's own costs in a new connection's setup, which a client that opens a
/// connection per request pays on every request.
pub(crate) fn ip_value(ip: IpAddr) -> HeaderValue {
    let IpAddr::V4(v4) = ip else {
        return HeaderValue::from_str(&ip.to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
    };
    let mut text = [0u8; 15]; // "255.255.255.255"
    let mut len = 0;
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            text[len] = b'.';
            len += 1;
        }
        if octet >= 100 {
            text[len] = b'0' + octet / 100;
            len += 1;
        }
        if octet >= 10 {
            text[len] = b'0' + octet / 10 % 10;
            len += 1;
        }
        text[len] = b'0' + octet % 10;
        len += 1;
    }
    HeaderValue::from_bytes(&text[..len]).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// The client's address in an `X-Forwarded-For` chain (ending with our peer): walking
/// from the right, the first address that is not a trusted proxy, as nginx's
/// `real_ip_recursive on` does. Everything left of it was written by the client. An
/// entry that is not an address ends the walk at the last address vouched for; when
/// every entry is trusted, the leftmost.
fn real_ip(chain: &[u8], trusts: &dyn Fn(IpAddr) -> bool) -> Option<HeaderValue> {
    let chain = std::str::from_utf8(chain).ok()?;
    let mut vouched: Option<IpAddr> = None;
    for entry in chain.rsplit(',').map(str::trim).filter(|e| !e.is_empty()) {
        let Some(ip) = parse_ip(entry) else {
            break;
        };
        vouched = Some(ip);
        if !trusts(ip) {
            break;
        }
    }
    vouched.and_then(|ip| HeaderValue::from_str(&ip.to_string()).ok())
}

/// An address as proxies write it: bare, `ip:port`, or `[v6]:port`.
fn parse_ip(entry: &str) -> Option<IpAddr> {
    entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<std::net::SocketAddr>().ok().map(|s| s.ip()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_address_is_written_as_display_writes_it() {
        let mut addresses: Vec<IpAddr> = Vec::new();
        for octet in 0..=255u8 {
            addresses.push(IpAddr::from([octet, 0, 10, 255]));
            addresses.push(IpAddr::from([1, octet, 99, 100]));
            addresses.push(IpAddr::from([127, 0, octet, 1]));
            addresses.push(IpAddr::from([9, 200, 0, octet]));
        }
        addresses.push("::1".parse().expect("v6"));
        addresses.push("::ffff:10.1.2.3".parse().expect("mapped v4"));
        addresses.push("2001:db8::ff00:42:8329".parse().expect("v6"));
        for ip in addresses {
            assert_eq!(ip_value(ip).to_str().expect("text"), ip.to_string());
        }
    }

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
    fn each_hop_by_hop_header_is_removed_even_alone() {
        for name in [
            "connection",
            "keep-alive",
            "proxy-connection",
            "proxy",
            "te",
            "trailer",
            "transfer-encoding",
            "proxy-authenticate",
            "upgrade",
        ] {
            let mut h = map(&[("x-kept", "yes"), (name, "x")]);
            strip_hop_by_hop(&mut h, false);
            let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
            assert_eq!(names, vec!["x-kept"], "{name} alone");
        }
        let mut none = map(&[("host", "a"), ("x-kept", "yes")]);
        strip_hop_by_hop(&mut none, false);
        assert_eq!(none, map(&[("host", "a"), ("x-kept", "yes")]));
    }

    #[test]
    fn an_upgrade_to_http2_alone_is_no_upgrade() {
        let curl = map(&[
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
        ]);
        assert!(!is_upgrade(&curl));
        let upper = map(&[("connection", "upgrade"), ("upgrade", " H2C ")]);
        assert!(!is_upgrade(&upper));
        let both = map(&[("connection", "upgrade"), ("upgrade", "h2c, websocket")]);
        assert!(is_upgrade(&both));
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
    fn framing_or_routing_that_two_readers_could_read_apart_is_ambiguous() {
        for sound in [
            &[("host", "a"), ("transfer-encoding", "chunked")][..],
            &[("host", "a"), ("transfer-encoding", "Chunked")],
            &[("x-a", "1")],
        ] {
            assert_eq!(ambiguous(&map(sound)), None, "{sound:?}");
        }
        for (fields, why) in [
            (
                &[("transfer-encoding", "gzip, chunked")][..],
                "Transfer-Encoding other than one `chunked`",
            ),
            (
                &[
                    ("transfer-encoding", "chunked"),
                    ("transfer-encoding", "chunked"),
                ],
                "Transfer-Encoding other than one `chunked`",
            ),
            (
                &[("transfer-encoding", "identity")],
                "Transfer-Encoding other than one `chunked`",
            ),
            (
                &[("host", "a"), ("x-a", "1"), ("host", "a")],
                "more than one Host header",
            ),
        ] {
            assert_eq!(ambiguous(&map(fields)), Some(why), "{fields:?}");
        }
    }

    #[test]
    fn spoofed_forwarding_headers_are_replaced() {
        let h = map(&[("x-forwarded-for", "1.2.3.4"), ("host", "example.test")]);
        let h = Forwarding::of(
            &h,
            &HeaderValue::from_static("127.0.0.1"),
            false,
            false,
            &|_| false,
        )
        .applied(&h);
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(h["x-forwarded-for"], "127.0.0.1");
        assert_eq!(h["x-forwarded-host"], "example.test");
        assert_eq!(h["x-forwarded-proto"], "http");
    }

    #[test]
    fn a_tls_client_is_forwarded_as_https() {
        let h = map(&[("x-forwarded-proto", "http"), ("host", "example.test")]);
        let h = Forwarding::of(
            &h,
            &HeaderValue::from_static("127.0.0.1"),
            false,
            true,
            &|_| false,
        )
        .applied(&h);
        assert_eq!(h.get_all("x-forwarded-proto").iter().count(), 1);
        assert_eq!(h["x-forwarded-proto"], "https");
        let h = map(&[("host", "example.test")]);
        let h = Forwarding::of(
            &h,
            &HeaderValue::from_static("10.0.0.1"),
            true,
            true,
            &|_| true,
        )
        .applied(&h);
        assert_eq!(h["x-forwarded-proto"], "https");
    }

    #[test]
    fn a_trusted_proxy_chain_is_kept_and_extended() {
        let h = map(&[
            ("x-forwarded-for", "203.0.113.7, 10.0.0.2"),
            ("x-forwarded-proto", "https"),
            ("host", "example.test"),
        ]);
        let h = Forwarding::of(
            &h,
            &HeaderValue::from_static("10.0.0.3"),
            true,
            false,
            &|ip| ip.to_string().starts_with("10."),
        )
        .applied(&h);
        let all = |name: &str| -> Vec<&str> {
            h.get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect()
        };
        assert_eq!(all("x-forwarded-for"), ["203.0.113.7, 10.0.0.2, 10.0.0.3"]);
        assert_eq!(all("x-real-ip"), ["203.0.113.7"]);
        assert_eq!(
            all("x-forwarded-proto"),
            ["https"],
            "the proxy's own stands"
        );
        assert_eq!(
            all("x-forwarded-host"),
            ["example.test"],
            "rolld's fills in"
        );
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Names a rewrite cares about, and some it does not.
        const NAMES: &[&str] = &[
            "connection",
            "keep-alive",
            "proxy-connection",
            "proxy",
            "te",
            "trailer",
            "transfer-encoding",
            "proxy-authenticate",
            "upgrade",
            "host",
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-forwarded-host",
            "x-real-ip",
            "x-secret",
            "content-length",
            "cookie",
        ];
        /// Header values from bytes a client can send: visible ASCII, spaces, tabs and
        /// obs-text, often built from header names and addresses.
        fn value() -> impl Strategy<Value = HeaderValue> {
            let token = prop_oneof![
                proptest::sample::select(NAMES).prop_map(str::to_string),
                "(10|127|203)\\.[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}(:[0-9]{1,5})?",
                "\\[?[0-9a-f:]{2,20}\\]?",
                "[ -~]{0,12}",
                proptest::collection::vec(0x80u8..=0xff, 1..4)
                    .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
            ];
            proptest::collection::vec(
                (
                    token,
                    proptest::sample::select(&[",", ", ", " ,\t", ";"][..]),
                ),
                0..5,
            )
            .prop_map(|parts| {
                parts
                    .into_iter()
                    .map(|(t, sep)| format!("{t}{sep}"))
                    .collect::<String>()
            })
            .prop_map(|text| {
                // Raw bytes, as hyper hands them over (obs-text included).
                let bytes: Vec<u8> = text
                    .chars()
                    .map(|c| if c.is_ascii() { c as u8 } else { 0xe9 })
                    .collect();
                HeaderValue::from_bytes(&bytes).unwrap_or_else(|_| HeaderValue::from_static("x"))
            })
        }

        fn header_map() -> impl Strategy<Value = HeaderMap> {
            let name = prop_oneof![
                4 => proptest::sample::select(NAMES).prop_map(HeaderName::from_static),
                1 => "[a-z][a-z0-9-]{0,10}".prop_map(|n| HeaderName::from_bytes(n.as_bytes()).expect("a token")),
            ];
            proptest::collection::vec((name, value()), 0..12).prop_map(|pairs| {
                let mut map = HeaderMap::new();
                for (name, value) in pairs {
                    map.append(name, value);
                }
                map
            })
        }

        fn named_by_connection(headers: &HeaderMap) -> Vec<Vec<u8>> {
            headers
                .get_all(header::CONNECTION)
                .iter()
                .flat_map(|v| v.as_bytes().split(|b| *b == b','))
                .map(|t| t.trim_ascii().to_ascii_lowercase())
                .filter(|t| !t.is_empty())
                .collect()
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

            #[test]
            fn hop_by_hop_headers_never_survive(mut headers in header_map(), upgrade in any::<bool>()) {
                let named = named_by_connection(&headers);
                let host = headers.get_all(header::HOST).iter().cloned().collect::<Vec<_>>();
                let _ = ambiguous(&headers);
                let _ = is_upgrade(&headers);
                strip_hop_by_hop(&mut headers, upgrade);
                for gone in ["keep-alive", "proxy-connection", "proxy", "te", "trailer", "transfer-encoding", "proxy-authenticate"] {
                    prop_assert!(!headers.contains_key(gone), "{gone} survived: {headers:?}");
                }
                for token in &named {
                    if (upgrade && (token == b"upgrade" || token == b"connection")) || token == b"host" {
                        continue;
                    }
                    let Ok(name) = HeaderName::from_bytes(token) else {
                        continue;
                    };
                    prop_assert!(!headers.contains_key(&name), "{:?}, named by Connection, survived: {headers:?}", String::from_utf8_lossy(token));
                }
                prop_assert_eq!(headers.get_all(header::HOST).iter().cloned().collect::<Vec<_>>(), host, "Host is never removed");
                if upgrade {
                    let values: Vec<&[u8]> = headers.get_all(header::CONNECTION).iter().map(HeaderValue::as_bytes).collect();
                    prop_assert_eq!(values, vec![&b"upgrade"[..]]);
                } else {
                    prop_assert!(!headers.contains_key(header::CONNECTION));
                    prop_assert!(!headers.contains_key(header::UPGRADE));
                }
            }

            #[test]
            fn forwarding_headers_are_well_formed(
                headers in header_map(),
                trusted in any::<bool>(),
                client in any::<[u8; 4]>(),
                trusted_first_octet in any::<u8>(),
            ) {
                let client = IpAddr::from(client);
                let client_value = HeaderValue::from_str(&client.to_string()).expect("an address");
                let trusts = |ip: IpAddr| match ip {
                    IpAddr::V4(v4) => v4.octets()[0] == trusted_first_octet,
                    IpAddr::V6(_) => false,
                };
                let headers = Forwarding::of(&headers, &client_value, trusted, false, &trusts)
                    .applied(&headers);
                let xff: Vec<_> = headers.get_all("x-forwarded-for").iter().collect();
                prop_assert_eq!(xff.len(), 1);
                let chain = xff[0].as_bytes();
                prop_assert!(chain.ends_with(client_value.as_bytes()), "{:?}", xff[0]);
                if !trusted {
                    prop_assert_eq!(xff[0], &client_value);
                }
                let real: Vec<_> = headers.get_all("x-real-ip").iter().collect();
                prop_assert_eq!(real.len(), 1);
                let real = real[0].to_str().ok().and_then(|r| r.parse::<IpAddr>().ok());
                prop_assert!(real.is_some(), "X-Real-IP is an address: {headers:?}");
                if !trusts(client) || !trusted {
                    // From an untrusted peer, or a peer we trust that is not a proxy
                    // by address, the peer itself is the client.
                    if !trusted {
                        prop_assert_eq!(real, Some(client));
                    }
                }
                prop_assert!(headers.get_all("x-forwarded-proto").iter().count() >= 1);
            }
        }
    }

    #[test]
    fn the_real_ip_is_the_rightmost_untrusted_entry() {
        let trusts = |ip: IpAddr| ip.to_string().starts_with("10.");
        let real = |chain: &str| real_ip(chain.as_bytes(), &trusts).map(|v| v.as_bytes().to_vec());
        assert_eq!(
            real("6.6.6.6, 203.0.113.7, 10.0.0.2, 10.0.0.3"),
            Some(b"203.0.113.7".to_vec())
        );
        assert_eq!(real("10.0.0.1, 10.0.0.2"), Some(b"10.0.0.1".to_vec()));
        assert_eq!(real("garbage, 10.0.0.2"), Some(b"10.0.0.2".to_vec()));
        assert_eq!(
            real("[2001:db8::1]:443, 10.0.0.2"),
            Some(b"2001:db8::1".to_vec())
        );
        assert_eq!(
            real("203.0.113.7:8080,10.0.0.2"),
            Some(b"203.0.113.7".to_vec())
        );
    }
}
