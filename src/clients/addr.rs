//! The client's address: the TCP peer, or, when the peer is a trusted proxy, the address the
//! proxy reports in `X-Forwarded-For` or `Forwarded`.

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

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The client address for a request from `peer` with these headers.
///
/// Forwarded addresses are believed only from trusted proxies; the chain is read from the
/// right, skipping trusted hops, so a client cannot smuggle an address in front of it.
pub fn client_ip(peer: IpAddr, headers: &http::HeaderMap, trusted: &CidrList) -> IpAddr {
    let peer = canonical(peer);
    if trusted.is_empty() || !trusted.contains(peer) {
        return peer;
    }
    let mut hops: Vec<IpAddr> = Vec::new();
    for v in headers.get_all("forwarded") {
        let Ok(s) = v.to_str() else { continue };
        for element in s.split(',') {
            for pair in element.split(';') {
                let Some((k, val)) = pair.trim().split_once('=') else {
                    continue;
                };
                if k.trim().eq_ignore_ascii_case("for") {
                    if let Some(ip) = parse_forwarded_node(val.trim()) {
                        hops.push(ip);
                    }
                }
            }
        }
    }
    if hops.is_empty() {
        for v in headers.get_all("x-forwarded-for") {
            let Ok(s) = v.to_str() else { continue };
            hops.extend(s.split(',').filter_map(|h| h.trim().parse::<IpAddr>().ok()));
        }
    }
    hops.into_iter()
        .rev()
        .map(canonical)
        .find(|ip| !trusted.contains(*ip))
        .unwrap_or(peer)
}

/// `for=` values: `192.0.2.1`, `"[2001:db8::1]:4711"`, `"192.0.2.1:80"`.
fn parse_forwarded_node(v: &str) -> Option<IpAddr> {
    let v = v.trim_matches('"');
    if let Some(rest) = v.strip_prefix('[') {
        return rest.split(']').next()?.parse().ok();
    }
    v.parse()
        .ok()
        .or_else(|| v.rsplit_once(':').and_then(|(h, _)| h.parse().ok()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn forwarded_headers_from_untrusted_peers_are_ignored() {
        let trusted = CidrList::parse(&["10.0.0.0/8".into()]).unwrap();
        let h = headers(&[("x-forwarded-for", "1.2.3.4")]);
        assert_eq!(
            client_ip(ip("203.0.113.9"), &h, &trusted),
            ip("203.0.113.9")
        );
        assert_eq!(
            client_ip(ip("203.0.113.9"), &h, &CidrList::default()),
            ip("203.0.113.9")
        );
    }

    #[test]
    fn the_rightmost_untrusted_hop_is_the_client() {
        let trusted = CidrList::parse(&["10.0.0.0/8".into()]).unwrap();
        // The client prepended a fake; the proxy appended the real address.
        let h = headers(&[("x-forwarded-for", "6.6.6.6, 198.51.100.7, 10.1.1.1")]);
        assert_eq!(client_ip(ip("10.0.0.2"), &h, &trusted), ip("198.51.100.7"));
    }

    #[test]
    fn rfc7239_forwarded_is_understood() {
        let trusted = CidrList::parse(&["127.0.0.1".into()]).unwrap();
        let h = headers(&[(
            "forwarded",
            r#"for="[2001:db8::1]:4711";proto=https, for=192.0.2.60"#,
        )]);
        assert_eq!(client_ip(ip("127.0.0.1"), &h, &trusted), ip("192.0.2.60"));
        let h = headers(&[("forwarded", r#"for="192.0.2.61:80""#)]);
        assert_eq!(client_ip(ip("127.0.0.1"), &h, &trusted), ip("192.0.2.61"));
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
