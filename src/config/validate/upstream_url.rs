//! An upstream's `url`: scheme, host, port, path prefix and the `Host` header they make.

use super::Scope;
use crate::config::ConfigError;

/// The parts of a base URL keygate connects with.
pub(super) struct BaseUrl {
    /// `https` when true.
    pub tls: bool,
    /// Host name or IP literal (no brackets).
    pub host: String,
    /// Port (default by scheme).
    pub port: u16,
    /// `Host` header value.
    pub host_header: http::HeaderValue,
    /// Path prefix without a trailing slash.
    pub base_path: String,
}

/// Parses `upstreams.NAME.url`: http or https, a host, no credentials, query or fragment.
pub(super) fn base_url(at: &Scope, raw: &str) -> Result<BaseUrl, ConfigError> {
    let err = |reason: String| at.err("url", reason);
    let url = url::Url::parse(raw).map_err(|_| err(format!("not a URL: {raw:?}")))?;
    let tls = match url.scheme() {
        "https" => true,
        "http" => false,
        _ => {
            return Err(err(format!(
                "not a URL: {raw:?} (expected http:// or https://)"
            )))
        }
    };
    let host = match url.host() {
        Some(url::Host::Domain(d)) => d.to_string(),
        Some(url::Host::Ipv4(ip)) => ip.to_string(),
        Some(url::Host::Ipv6(ip)) => ip.to_string(),
        None => return Err(err(format!("no host in {raw:?}"))),
    };
    if !url.username().is_empty() || url.password().is_some() {
        return Err(err(
            "credentials in the URL are not allowed; use keys".into()
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(err(format!(
            "a base URL takes no query or fragment: {raw:?}"
        )));
    }
    let port = url
        .port_or_known_default()
        .unwrap_or(if tls { 443 } else { 80 });
    let host_header = host_header_value(&host, port, tls)
        .ok_or_else(|| err(format!("the host cannot be sent as a Host header: {raw:?}")))?;
    Ok(BaseUrl {
        tls,
        host,
        port,
        host_header,
        base_path: url.path().trim_end_matches('/').to_string(),
    })
}

/// `Host` for an upstream: IPv6 literals in brackets, the port only when it is not the scheme's.
fn host_header_value(host: &str, port: u16, tls: bool) -> Option<http::HeaderValue> {
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    let value = if port == if tls { 443 } else { 80 } {
        host
    } else {
        format!("{host}:{port}")
    };
    http::HeaderValue::try_from(value).ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::test_support::*;
    use super::host_header_value;

    #[test]
    fn host_header_has_the_port_only_when_it_is_not_the_schemes_default() {
        assert_eq!(
            host_header_value("api.openai.com", 443, true).unwrap(),
            "api.openai.com"
        );
        assert_eq!(host_header_value("relay", 80, false).unwrap(), "relay");
        assert_eq!(host_header_value("relay", 443, false).unwrap(), "relay:443");
        assert_eq!(
            host_header_value("127.0.0.1", 8080, false).unwrap(),
            "127.0.0.1:8080"
        );
    }

    #[test]
    fn host_header_puts_ipv6_literals_in_brackets() {
        assert_eq!(host_header_value("::1", 8443, true).unwrap(), "[::1]:8443");
        assert_eq!(host_header_value("::1", 443, true).unwrap(), "[::1]");
    }

    #[test]
    fn url_mistakes_are_named() {
        let cases = [
            (
                "\"htp:/x\"",
                "not a URL: \"htp:/x\" (expected http:// or https://)",
            ),
            ("relay.example", "not a URL: \"relay.example\""),
            ("\"http://\"", "not a URL: \"http://\""),
            (
                "ftp://relay.example",
                "not a URL: \"ftp://relay.example\" (expected http:// or https://)",
            ),
            (
                "\"https://user:pw@relay.example\"",
                "credentials in the URL are not allowed; use keys",
            ),
            (
                "\"https://user@relay.example\"",
                "credentials in the URL are not allowed; use keys",
            ),
            (
                "\"https://relay.example/v1?x=1\"",
                "a base URL takes no query or fragment: \"https://relay.example/v1?x=1\"",
            ),
            (
                "\"https://relay.example/#top\"",
                "a base URL takes no query or fragment: \"https://relay.example/#top\"",
            ),
        ];
        for (url, reason) in cases {
            let upstream = format!("url: {url}\nkeys: [ {{ name: a, env: KG_TEST_KEY }} ]");
            let yaml = config("", &upstream, ROUTE);
            expect_error(&yaml, &source(), "upstreams.openai.url", reason);
        }
    }

    #[test]
    fn url_parts_are_kept() {
        let upstream =
            "url: \"https://[::1]:8443/openai/\"\nkeys: [ { name: a, env: KG_TEST_KEY } ]";
        let loaded = load(&config("", upstream, ROUTE), &source()).unwrap();
        let u = &loaded.upstreams[0];
        assert!(u.tls);
        assert_eq!((u.host.as_str(), u.port), ("::1", 8443));
        assert_eq!(u.host_header, "[::1]:8443");
        assert_eq!(u.base_path, "/openai");
    }
}
