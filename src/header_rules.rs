//! Header rules: what leaves for the upstream and what comes back to the client.

use crate::config::AuthStyle;
use http::header::{HeaderName, HeaderValue};
use pingora_error::Result;
use pingora_http::{RequestHeader, ResponseHeader};

// Header names are constants, not strings: a string is parsed again on every request.
const API_KEY: HeaderName = HeaderName::from_static("api-key");
const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
const OPENAI_ORGANIZATION: HeaderName = HeaderName::from_static("openai-organization");
const OPENAI_PROJECT: HeaderName = HeaderName::from_static("openai-project");

/// Headers that choose the account a key acts for. A client's values never pass: against a key
/// of another account OpenAI answers 401 `mismatched_organization`, which would take the pool's
/// keys out one by one. Only a key's own configured values are sent.
pub const ACCOUNT_SCOPE_HEADERS: [HeaderName; 2] = [OPENAI_ORGANIZATION, OPENAI_PROJECT];

/// What one key puts on a request, built once per key: its credential header value and the
/// account-scope headers configured for it. Values are marked sensitive.
#[derive(Debug, Clone)]
pub struct Credential {
    /// The credential header value (`Bearer …` or the bare key), per the upstream's auth style.
    pub auth: HeaderValue,
    /// `OpenAI-Organization` to send, if configured for the key.
    pub organization: Option<HeaderValue>,
    /// `OpenAI-Project` to send, if configured for the key.
    pub project: Option<HeaderValue>,
}

impl Credential {
    /// The credential of a key with `secret` and optional account-scope values, in `auth` style.
    pub fn new(
        auth: AuthStyle,
        secret: &str,
        organization: Option<&str>,
        project: Option<&str>,
    ) -> Self {
        let scope = |v: Option<&str>| v.and_then(|v| HeaderValue::from_str(v).ok());
        Self {
            auth: auth_value(auth, secret),
            organization: scope(organization),
            project: scope(project),
        }
    }
}

/// Headers a client may use to send its own credential; never forwarded.
pub const CLIENT_CREDENTIAL_HEADERS: [HeaderName; 4] = [
    http::header::AUTHORIZATION,
    API_KEY,
    X_API_KEY,
    http::header::PROXY_AUTHORIZATION,
];

/// Response headers that tell a client which account served it, or set state on it.
pub const DROPPED_RESPONSE_HEADERS: [HeaderName; 3] = [
    http::header::SET_COOKIE,
    HeaderName::from_static("openai-organization"),
    HeaderName::from_static("openai-project"),
];

/// Problems Pingora would only report after connecting upstream: a `Connection` header that
/// nominates a protected field or is malformed. Mirrors pingora-proxy 0.9's checks.
pub fn connection_header_problem(req: &RequestHeader) -> Option<&'static str> {
    let mut count = 0;
    for token in req
        .headers
        .get_all(http::header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
    {
        count += 1;
        if count >= 10 {
            return Some("too many Connection header tokens");
        }
        if !token.iter().all(|b| is_tchar(*b)) {
            return Some("malformed token in the Connection header");
        }
        let lower = token.to_ascii_lowercase();
        if matches!(
            lower.as_slice(),
            b"host" | b"x-forwarded-for" | b"x-forwarded-host" | b"x-forwarded-proto"
        ) {
            return Some("the Connection header may not name a protected header");
        }
    }
    None
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The credential header value for a key in an auth style, marked sensitive: Pingora logs
/// request headers at DEBUG, and a sensitive value prints as "Sensitive".
pub fn auth_value(auth: AuthStyle, secret: &str) -> http::HeaderValue {
    let prefix = auth_header(auth).map_or("", |(_, p)| p);
    let mut value = HeaderValue::from_str(&format!("{prefix}{secret}"))
        // Secrets come from env vars or files; one with control characters cannot be sent.
        .unwrap_or_else(|_| HeaderValue::from_static(""));
    value.set_sensitive(true);
    value
}

/// Rewrites the outgoing request for one attempt: credentials out, ours in, Host, path, length.
///
/// `credential` is the key's prepared [`Credential`]; `path_and_query` is `None` when the
/// client's path is sent unchanged.
pub fn prepare_upstream_request(
    req: &mut RequestHeader,
    auth: AuthStyle,
    credential: Option<&Credential>,
    host: &HeaderValue,
    path_and_query: Option<&str>,
    body_len: Option<usize>,
) -> Result<()> {
    for h in CLIENT_CREDENTIAL_HEADERS
        .iter()
        .chain(&ACCOUNT_SCOPE_HEADERS)
    {
        req.remove_header(h);
    }
    // keygate already answered the client's 100-continue and holds the body.
    req.remove_header(&http::header::EXPECT);
    // Token accounting reads `usage` from the response: ask for it uncompressed.
    req.remove_header(&http::header::ACCEPT_ENCODING);
    if let (Some(cred), Some((name, _))) = (credential, auth_header(auth)) {
        if cred.auth.is_empty() {
            return Err(pingora_error::Error::explain(
                pingora_error::ErrorType::InternalError,
                "key is not a valid header value",
            ));
        }
        req.insert_header(name, cred.auth.clone())?;
    }
    if let Some(cred) = credential {
        if let Some(org) = &cred.organization {
            req.insert_header(OPENAI_ORGANIZATION, org.clone())?;
        }
        if let Some(project) = &cred.project {
            req.insert_header(OPENAI_PROJECT, project.clone())?;
        }
    }
    req.insert_header(http::header::HOST, host.clone())?;
    if let Some(path_and_query) = path_and_query {
        let uri: http::Uri = path_and_query.parse().map_err(|_| {
            pingora_error::Error::explain(
                pingora_error::ErrorType::InternalError,
                "bad upstream path",
            )
        })?;
        req.set_uri(uri);
    }
    if let Some(len) = body_len {
        req.remove_header(&http::header::TRANSFER_ENCODING);
        req.insert_header(http::header::CONTENT_LENGTH, HeaderValue::from(len))?;
    }
    Ok(())
}

/// The header an auth style uses, and the value prefix.
pub fn auth_header(auth: AuthStyle) -> Option<(HeaderName, &'static str)> {
    match auth {
        AuthStyle::Bearer => Some((http::header::AUTHORIZATION, "Bearer ")),
        AuthStyle::Azure => Some((HeaderName::from_static("api-key"), "")),
        AuthStyle::XApiKey => Some((HeaderName::from_static("x-api-key"), "")),
        AuthStyle::None => None,
    }
}

/// The `anthropic-version` keygate sends when the client sent none (Anthropic requires one).
pub const ANTHROPIC_VERSION: HeaderValue = HeaderValue::from_static("2023-06-01");
const ANTHROPIC_VERSION_HEADER: HeaderName = HeaderName::from_static("anthropic-version");

/// For an Anthropic upstream: adds `anthropic-version` when the client did not choose one. The
/// client's own `anthropic-version` and `anthropic-beta` pass unchanged (they choose the API's
/// behaviour, not the account), so one that is empty passes too and Anthropic judges it.
pub fn ensure_anthropic_version(req: &mut RequestHeader) -> Result<()> {
    if req.headers.get(&ANTHROPIC_VERSION_HEADER).is_none() {
        req.insert_header(ANTHROPIC_VERSION_HEADER, ANTHROPIC_VERSION)?;
    }
    Ok(())
}

/// Removes response headers that must not reach the client.
pub fn sanitize_response(resp: &mut ResponseHeader) {
    for h in &DROPPED_RESPONSE_HEADERS {
        resp.remove_header(h);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn request(headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build("POST", b"/v1/chat/completions", None).unwrap();
        for (k, v) in headers {
            r.append_header(k.to_string(), *v).unwrap();
        }
        r
    }

    #[test]
    fn client_credentials_are_replaced_by_exactly_one_pool_key() {
        let mut r = request(&[
            ("authorization", "Bearer client-token"),
            ("api-key", "client"),
            ("x-api-key", "client"),
        ]);
        prepare_upstream_request(
            &mut r,
            AuthStyle::Bearer,
            Some(&Credential::new(AuthStyle::Bearer, "sk-pool", None, None)),
            &HeaderValue::from_static("api.example"),
            Some("/v1/x"),
            Some(5),
        )
        .unwrap();
        let auth: Vec<_> = r.headers.get_all("authorization").iter().collect();
        assert_eq!(auth.len(), 1);
        assert_eq!(auth[0], "Bearer sk-pool");
        assert!(auth[0].is_sensitive());
        assert!(r.headers.get("api-key").is_none());
        assert!(r.headers.get("x-api-key").is_none());
        assert_eq!(r.headers.get("host").unwrap(), "api.example");
        assert_eq!(r.headers.get("content-length").unwrap(), "5");
    }

    #[test]
    fn a_clients_organization_and_project_never_reach_the_upstream() {
        let mut r = request(&[
            ("openai-organization", "org-client"),
            ("OpenAI-Project", "proj_client"),
        ]);
        let plain = Credential::new(AuthStyle::Bearer, "sk-pool", None, None);
        prepare_upstream_request(
            &mut r,
            AuthStyle::Bearer,
            Some(&plain),
            &HeaderValue::from_static("h"),
            None,
            None,
        )
        .unwrap();
        assert!(r.headers.get("openai-organization").is_none());
        assert!(r.headers.get("openai-project").is_none());
    }

    #[test]
    fn a_keys_configured_organization_and_project_replace_the_clients() {
        let mut r = request(&[
            ("openai-organization", "org-client"),
            ("openai-project", "proj_client"),
        ]);
        let scoped = Credential::new(
            AuthStyle::Bearer,
            "sk-pool",
            Some("org-pool"),
            Some("proj_pool"),
        );
        prepare_upstream_request(
            &mut r,
            AuthStyle::Bearer,
            Some(&scoped),
            &HeaderValue::from_static("h"),
            None,
            None,
        )
        .unwrap();
        let orgs: Vec<_> = r.headers.get_all("openai-organization").iter().collect();
        assert_eq!(orgs, vec!["org-pool"]);
        let projects: Vec<_> = r.headers.get_all("openai-project").iter().collect();
        assert_eq!(projects, vec!["proj_pool"]);
    }

    #[test]
    fn azure_style_uses_api_key_header() {
        let mut r = request(&[("authorization", "Bearer client")]);
        prepare_upstream_request(
            &mut r,
            AuthStyle::Azure,
            Some(&Credential::new(AuthStyle::Azure, "az", None, None)),
            &HeaderValue::from_static("h"),
            Some("/openai/x?api-version=1"),
            None,
        )
        .unwrap();
        assert_eq!(r.headers.get("api-key").unwrap(), "az");
        assert!(r.headers.get("authorization").is_none());
        assert_eq!(r.uri.to_string(), "/openai/x?api-version=1");
    }

    #[test]
    fn anthropic_requests_carry_the_key_in_x_api_key_and_a_version() {
        let mut r = request(&[
            ("authorization", "Bearer client"),
            ("x-api-key", "sk-ant-client"),
            ("anthropic-beta", "prompt-caching-2024-07-31"),
        ]);
        prepare_upstream_request(
            &mut r,
            AuthStyle::XApiKey,
            Some(&Credential::new(
                AuthStyle::XApiKey,
                "sk-ant-pool",
                None,
                None,
            )),
            &HeaderValue::from_static("h"),
            None,
            None,
        )
        .unwrap();
        ensure_anthropic_version(&mut r).unwrap();
        let keys: Vec<_> = r.headers.get_all("x-api-key").iter().collect();
        assert_eq!(keys, vec!["sk-ant-pool"]);
        assert!(r.headers.get("authorization").is_none());
        assert_eq!(r.headers.get("anthropic-version").unwrap(), "2023-06-01");
        assert_eq!(
            r.headers.get("anthropic-beta").unwrap(),
            "prompt-caching-2024-07-31"
        );
    }

    #[test]
    fn a_clients_anthropic_version_is_kept() {
        let mut r = request(&[("anthropic-version", "2099-01-01")]);
        ensure_anthropic_version(&mut r).unwrap();
        let versions: Vec<_> = r.headers.get_all("anthropic-version").iter().collect();
        assert_eq!(versions, vec!["2099-01-01"]);
    }

    #[test]
    fn debug_output_of_upstream_request_hides_the_key() {
        let mut r = request(&[]);
        prepare_upstream_request(
            &mut r,
            AuthStyle::Bearer,
            Some(&Credential::new(
                AuthStyle::Bearer,
                "sk-canary-123456",
                None,
                None,
            )),
            &HeaderValue::from_static("h"),
            Some("/"),
            None,
        )
        .unwrap();
        assert!(!format!("{r:?}").contains("canary"));
    }

    #[test]
    fn connection_naming_host_is_a_problem_but_authorization_is_not() {
        assert!(
            connection_header_problem(&request(&[("connection", "keep-alive, host")])).is_some()
        );
        assert!(connection_header_problem(&request(&[("connection", "\"x\"")])).is_some());
        assert!(connection_header_problem(&request(&[("connection", "authorization")])).is_none());
    }

    #[test]
    fn account_revealing_response_headers_are_dropped() {
        let mut resp = ResponseHeader::build(200, None).unwrap();
        resp.append_header("set-cookie", "a=b").unwrap();
        resp.append_header("openai-organization", "org").unwrap();
        resp.append_header("openai-project", "p").unwrap();
        resp.append_header("x-request-id", "r").unwrap();
        sanitize_response(&mut resp);
        assert!(resp.headers.get("set-cookie").is_none());
        assert!(resp.headers.get("openai-organization").is_none());
        assert!(resp.headers.get("openai-project").is_none());
        assert!(resp.headers.get("x-request-id").is_some());
    }
}
