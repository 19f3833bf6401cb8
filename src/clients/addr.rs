//! The client's address: the TCP peer, or, when the peer is a trusted proxy, the address the
//! proxies report in the one header configured (`client_ip_header`).

use ipnet::IpNet;
use std::net::IpAddr;

/// A list of CIDR blocks.
#[derive(Debug, Clone, Default)]
pub struct CidrList(Vec<IpNet>);

impl CidrList {
    /// Parses `10.0.0.0/8`-style blocks; a bare address is a /32 (or /128).
    pub fn parse(items: &[String]) -> Result<Self, String> {
        let mut out = Vec::new();
        for item in items {
            let net = item
                .parse::<IpNet>()
                .or_else(|_| item.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| format!("not a CIDR block or IP address: {item:?}"))?;
            out.push(net);
        }
        Ok(Self(out))
    }

    /// Whether `ip` is in any block (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.0.iter().any(|n| n.contains(&ip))
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// `ip` with an IPv4-mapped IPv6 address (`::ffff:10.0.0.1`) turned into the IPv4 address.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The header trusted proxies report the client address in (`client_ip_header`).
///
/// Only one is believed: a proxy that appends to one header passes the others through as the
/// client sent them, so reading a second header would let the client choose its address.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ClientIpHeader {
    /// `X-Forwarded-For: client, proxy1, proxy2` (nginx, HAProxy, cloud load balancers).
    #[default]
    XForwardedFor,
    /// RFC 7239 `Forwarded: for=client, for=proxy1`.
    Forwarded,
    /// `X-Real-IP: client`, set (not appended) by the proxy.
    XRealIp,
}

impl ClientIpHeader {
    /// Every accepted config spelling, as written in error messages.
    pub const NAMES: &'static str = "x-forwarded-for, forwarded or x-real-ip";

    /// The header named `name` (any case).
    pub fn parse(name: &str) -> Option<Self> {
        let name = name.trim();
        [
            ("x-forwarded-for", Self::XForwardedFor),
            ("forwarded", Self::Forwarded),
            ("x-real-ip", Self::XRealIp),
        ]
        .into_iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, h)| h)
    }

    /// The header's name on the wire.
    pub fn name(self) -> &'static str {
        match self {
            Self::XForwardedFor => "x-forwarded-for",
            Self::Forwarded => "forwarded",
            Self::XRealIp => "x-real-ip",
        }
    }
}

/// The proxies whose reports are believed, and the header they report in.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies {
    /// Their addresses.
    pub cidrs: CidrList,
    /// The one header read.
    pub header: ClientIpHeader,
}

/// One entry of a forwarding header, read from the right.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hop {
    /// An address.
    Addr(IpAddr),
    /// Anything else: garbage, `unknown`, an obfuscated `_name`, an element without `for=`.
    Unusable,
}

/// The client address for a request from `peer` with these headers.
///
/// Reports are believed only from trusted proxies: the configured header (all its lines, in
/// order) is walked from the right, every trusted hop is skipped, and the first untrusted one is
/// the client. A hop that does not parse ends the walk at the last trusted address: the client is
/// then the nearest trusted proxy, which forwarded something keygate cannot read.
pub fn client_ip(peer: IpAddr, headers: &http::HeaderMap, trusted: &TrustedProxies) -> IpAddr {
    let peer = canonical(peer);
    if trusted.cidrs.is_empty() || !trusted.cidrs.contains(peer) {
        return peer;
    }
    let mut hops = Vec::new();
    for line in headers.get_all(trusted.header.name()) {
        hops_of_line(trusted.header, line.as_bytes(), &mut hops);
    }
    let mut last_trusted = peer;
    for hop in hops.into_iter().rev() {
        match hop {
            Hop::Addr(ip) if trusted.cidrs.contains(ip) => last_trusted = canonical(ip),
            Hop::Addr(ip) => return canonical(ip),
            Hop::Unusable => return last_trusted,
        }
    }
    last_trusted
}

/// Appends the hops of one header line, left to right. Empty list elements are ignored, as
/// HTTP's list syntax asks.
fn hops_of_line(header: ClientIpHeader, line: &[u8], out: &mut Vec<Hop>) {
    for element in split_outside_quotes(line, b',') {
        let element = element.trim_ascii();
        if element.is_empty() {
            continue;
        }
        let hop = match header {
            ClientIpHeader::Forwarded => forwarded_for(element),
            ClientIpHeader::XForwardedFor | ClientIpHeader::XRealIp => std::str::from_utf8(element)
                .ok()
                .and_then(parse_node)
                .map_or(Hop::Unusable, Hop::Addr),
        };
        out.push(hop);
    }
}

/// The `for=` of one `Forwarded` element (`for=192.0.2.1;proto=https`): exactly one is needed.
fn forwarded_for(element: &[u8]) -> Hop {
    let mut found = None;
    for pair in split_outside_quotes(element, b';') {
        let Ok(pair) = std::str::from_utf8(pair) else {
            return Hop::Unusable;
        };
        let Some((name, value)) = pair.split_once('=') else {
            return Hop::Unusable;
        };
        if !name.trim().eq_ignore_ascii_case("for") {
            continue;
        }
        if found.is_some() {
            return Hop::Unusable;
        }
        let value = value.trim();
        let value = match value.strip_prefix('"') {
            Some(rest) => match rest.strip_suffix('"') {
                Some(inner) => inner,
                None => return Hop::Unusable,
            },
            None => value,
        };
        match parse_node(value) {
            Some(ip) => found = Some(ip),
            None => return Hop::Unusable,
        }
    }
    found.map_or(Hop::Unusable, Hop::Addr)
}

/// Splits `bytes` at `sep` where it is not inside a quoted string (`"a,b"`, with `\` escapes).
fn split_outside_quotes(bytes: &[u8], sep: u8) -> impl Iterator<Item = &[u8]> {
    let mut in_quotes = false;
    let mut escaped = false;
    bytes.split(move |&b| {
        if escaped {
            escaped = false;
        } else if in_quotes && b == b'\\' {
            escaped = true;
        } else if b == b'"' {
            in_quotes = !in_quotes;
        } else if b == sep && !in_quotes {
            return true;
        }
        false
    })
}

/// An address with an optional port: `192.0.2.1`, `192.0.2.1:80`, `2001:db8::1`,
/// `[2001:db8::1]`, `[2001:db8::1]:4711` (RFC 7239 also allows an obfuscated port, `:_p1`).
fn parse_node(text: &str) -> Option<IpAddr> {
    if let Some(rest) = text.strip_prefix('[') {
        let (ip, after) = rest.split_once(']')?;
        let ip = ip.parse::<std::net::Ipv6Addr>().ok()?;
        return (after.is_empty() || after.strip_prefix(':').is_some_and(valid_port))
            .then_some(IpAddr::V6(ip));
    }
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some(ip);
    }
    let (ip, port) = text.rsplit_once(':')?;
    let ip = ip.parse::<std::net::Ipv4Addr>().ok()?;
    valid_port(port).then_some(IpAddr::V4(ip))
}

/// A port number or an RFC 7239 obfuscated port (`_` then letters, digits, `.`, `_`, `-`).
fn valid_port(port: &str) -> bool {
    match port.strip_prefix('_') {
        Some(obf) => {
            !obf.is_empty()
                && obf
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        }
        None => port.parse::<u16>().is_ok(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use ClientIpHeader::{Forwarded, XForwardedFor, XRealIp};

    fn headers(pairs: &[(&'static str, &[u8])]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, http::HeaderValue::from_bytes(v).unwrap());
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Proxies in 10.0.0.0/8 and ::1, reporting in `header`.
    fn trusted(header: ClientIpHeader) -> TrustedProxies {
        TrustedProxies {
            cidrs: CidrList::parse(&["10.0.0.0/8".into(), "::1".into()]).unwrap(),
            header,
        }
    }

    #[test]
    fn forwarded_headers_from_untrusted_peers_are_ignored() {
        let h = headers(&[("x-forwarded-for", b"1.2.3.4")]);
        let peer = ip("203.0.113.9");
        assert_eq!(client_ip(peer, &h, &trusted(XForwardedFor)), peer);
        assert_eq!(client_ip(peer, &h, &TrustedProxies::default()), peer);
    }

    /// (what the case proves, header believed, peer, header lines, client address).
    type Case = (
        &'static str,
        ClientIpHeader,
        &'static str,
        &'static [(&'static str, &'static [u8])],
        &'static str,
    );

    const CASES: &[Case] = &[
        // The usual chains.
        (
            "no header: the proxy itself",
            XForwardedFor,
            "10.0.0.2",
            &[],
            "10.0.0.2",
        ),
        (
            "the rightmost untrusted hop is the client",
            XForwardedFor,
            "10.0.0.2",
            &[("x-forwarded-for", b"198.51.100.7, 10.1.1.1")],
            "198.51.100.7",
        ),
        (
            "every trusted hop is skipped; all trusted: the farthest proxy",
            XForwardedFor,
            "10.0.0.2",
            &[("x-forwarded-for", b"10.9.9.9, 10.1.1.1")],
            "10.9.9.9",
        ),
        (
            "lines are read in order as one list",
            XForwardedFor,
            "10.0.0.2",
            &[
                ("x-forwarded-for", b"6.6.6.6"),
                ("x-forwarded-for", b"198.51.100.7, 10.1.1.1"),
            ],
            "198.51.100.7",
        ),
        (
            "a trusted proxy's own line after the client's",
            XForwardedFor,
            "10.0.0.2",
            &[
                ("x-forwarded-for", b"198.51.100.7"),
                ("x-forwarded-for", b"10.1.1.1"),
            ],
            "198.51.100.7",
        ),
        (
            "empty list elements are ignored",
            XForwardedFor,
            "10.0.0.2",
            &[("x-forwarded-for", b" , 198.51.100.7,, 10.1.1.1 ,")],
            "198.51.100.7",
        ),
        (
            "IPv4-mapped IPv6 hops count as IPv4",
            XForwardedFor,
            "::ffff:10.0.0.2",
            &[("x-forwarded-for", b"198.51.100.7, ::ffff:10.1.1.1")],
            "198.51.100.7",
        ),
        (
            "ports some load balancers append",
            XForwardedFor,
            "10.0.0.2",
            &[("x-forwarded-for", b"[2001:db8::7]:443, 10.1.1.1:5000")],
            "2001:db8::7",
        ),
        // Spoofing attempts.
        (
            "values the client put in front are never reached",
            XForwardedFor,
            "10.0.0.2",
            &[("x-forwarded-for", b"6.6.6.6, 10.0.0.1, 198.51.100.7")],
            "198.51.100.7",
        ),
        (
            "a client-sent Forwarded is ignored when XFF is believed",
            XForwardedFor,
            "10.0.0.2",
            &[
                ("forwarded", b"for=6.6.6.6"),
                ("x-forwarded-for", b"198.51.100.7"),
            ],
            "198.51.100.7",
        ),
        (
            "a client-sent X-Real-IP is ignored when XFF is believed",
            XForwardedFor,
            "10.0.0.2",
            &[
                ("x-real-ip", b"6.6.6.6"),
                ("x-forwarded-for", b"198.51.100.7"),
            ],
            "198.51.100.7",
        ),
        (
            "a client-sent XFF is ignored when Forwarded is believed",
            Forwarded,
            "10.0.0.2",
            &[
                ("x-forwarded-for", b"6.6.6.6"),
                ("forwarded", b"for=198.51.100.7"),
            ],
            "198.51.100.7",
        ),
        (
            "a client-sent XFF is ignored when X-Real-IP is believed",
            XRealIp,
            "10.0.0.2",
            &[
                ("x-forwarded-for", b"6.6.6.6"),
                ("x-real-ip", b"198.51.100.7"),
            ],
            "198.51.100.7",
        ),
        (
            "the believed header missing: the proxy, not another header",
            Forwarded,
            "10.0.0.2",
            &[("x-forwarded-for", b"6.6.6.6")],
            "10.0.0.2",
        ),
        // Malformed hops end the walk at the last trusted address.
        (
            "a malformed hop behind a trusted one: that trusted proxy",
            XForwardedFor,
            "10.0.0.2",
            &[("x-forwarded-for", b"198.51.100.7, garbage, 10.1.1.1")],
            "10.1.1.1",
        ),
        (
            "a malformed rightmost hop: the peer",
            XForwardedFor,
            "10.0.0.2",
            &[("x-forwarded-for", b"198.51.100.7, 300.1.1.1")],
            "10.0.0.2",
        ),
        (
            "a hop with a bad port is malformed",
            XForwardedFor,
            "10.0.0.2",
            &[("x-forwarded-for", b"198.51.100.7, 1.2.3.4:99999")],
            "10.0.0.2",
        ),
        (
            "non-UTF-8 bytes are a malformed hop",
            XForwardedFor,
            "10.0.0.2",
            &[("x-forwarded-for", b"198.51.100.7, \xff\xfe")],
            "10.0.0.2",
        ),
        (
            "XFF's `unknown` is a malformed hop",
            XForwardedFor,
            "10.0.0.2",
            &[("x-forwarded-for", b"198.51.100.7, unknown, 10.1.1.1")],
            "10.1.1.1",
        ),
        // RFC 7239 Forwarded.
        (
            "Forwarded: bracketed IPv6 with a port, then a plain address",
            Forwarded,
            "10.0.0.2",
            &[(
                "forwarded",
                br#"for=192.0.2.60;proto=https, for="[2001:db8::1]:4711""#,
            )],
            "2001:db8::1",
        ),
        (
            "Forwarded: a quoted IPv4 with a port; any case of `for`",
            Forwarded,
            "10.0.0.2",
            &[("forwarded", br#"For="192.0.2.61:80";by=10.0.0.2"#)],
            "192.0.2.61",
        ),
        (
            "Forwarded: trusted hops skipped, IPv6 proxies too",
            Forwarded,
            "::1",
            &[("forwarded", br#"for=192.0.2.60, for="[::1]", for=10.1.1.1"#)],
            "192.0.2.60",
        ),
        (
            "Forwarded: an obfuscated port is fine",
            Forwarded,
            "10.0.0.2",
            &[("forwarded", br#"for="[2001:db8::1]:_p1""#)],
            "2001:db8::1",
        ),
        (
            "Forwarded: an obfuscated identifier ends the walk",
            Forwarded,
            "10.0.0.2",
            &[("forwarded", b"for=192.0.2.60, for=_hidden, for=10.1.1.1")],
            "10.1.1.1",
        ),
        (
            "Forwarded: `unknown` ends the walk",
            Forwarded,
            "10.0.0.2",
            &[("forwarded", b"for=192.0.2.60, for=unknown")],
            "10.0.0.2",
        ),
        (
            "Forwarded: an element without `for` ends the walk",
            Forwarded,
            "10.0.0.2",
            &[("forwarded", b"for=192.0.2.60, proto=https")],
            "10.0.0.2",
        ),
        (
            "Forwarded: two `for` in one element end the walk",
            Forwarded,
            "10.0.0.2",
            &[("forwarded", b"for=192.0.2.60;for=10.1.1.1")],
            "10.0.0.2",
        ),
        (
            "Forwarded: an unterminated quote ends the walk",
            Forwarded,
            "10.0.0.2",
            &[("forwarded", br#"for=192.0.2.60, for="10.1.1.1"#)],
            "10.0.0.2",
        ),
        (
            "Forwarded: a comma inside quotes does not split the element",
            Forwarded,
            "10.0.0.2",
            &[("forwarded", br#"for=192.0.2.60;x="a,for=6.6.6.6""#)],
            "192.0.2.60",
        ),
        (
            "Forwarded: brackets with junk after them",
            Forwarded,
            "10.0.0.2",
            &[("forwarded", br#"for=192.0.2.60, for="[2001:db8::1]x""#)],
            "10.0.0.2",
        ),
        (
            "Forwarded: lines in order, the client's first",
            Forwarded,
            "10.0.0.2",
            &[
                ("forwarded", b"for=6.6.6.6"),
                ("forwarded", b"for=192.0.2.60"),
            ],
            "192.0.2.60",
        ),
        // X-Real-IP.
        (
            "X-Real-IP: the address the proxy set",
            XRealIp,
            "10.0.0.2",
            &[("x-real-ip", b"198.51.100.7")],
            "198.51.100.7",
        ),
        (
            "X-Real-IP: garbage means the proxy",
            XRealIp,
            "10.0.0.2",
            &[("x-real-ip", b"not-an-ip")],
            "10.0.0.2",
        ),
    ];

    #[test]
    fn the_believed_header_is_walked_from_the_right_through_trusted_hops() {
        for (what, header, peer, lines, want) in CASES {
            let got = client_ip(ip(peer), &headers(lines), &trusted(*header));
            assert_eq!(got, ip(want), "{what}");
        }
    }

    #[test]
    fn header_names_parse_in_any_case() {
        assert_eq!(
            ClientIpHeader::parse("X-Forwarded-For"),
            Some(XForwardedFor)
        );
        assert_eq!(ClientIpHeader::parse("forwarded"), Some(Forwarded));
        assert_eq!(ClientIpHeader::parse(" X-REAL-IP "), Some(XRealIp));
        assert_eq!(ClientIpHeader::parse("x-forwarded"), None);
        assert_eq!(ClientIpHeader::default(), XForwardedFor);
    }

    #[test]
    fn cidr_lists_reject_junk_and_match_mapped_addresses() {
        assert!(CidrList::parse(&["10.0.0.0/33".into()]).is_err());
        assert!(CidrList::parse(&["nope".into()]).is_err());
        let l = CidrList::parse(&["192.168.0.0/16".into(), "::1".into()]).unwrap();
        assert!(l.contains(ip("192.168.4.5")));
        assert!(l.contains(ip("::ffff:192.168.4.5")));
        assert!(l.contains(ip("::1")));
        assert!(!l.contains(ip("10.0.0.1")));
    }
}
