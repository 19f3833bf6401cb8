//! One-off requests keygate makes on its own: key probes and keep-warm pings.
//!
//! They go through Pingora's connector with the same peer settings (TLS, CA, SNI, timeouts) as
//! proxied traffic, so a probe that passes means the proxy path works too.

use super::Upstream;
use crate::header_rules::prepare_upstream_request;
use bytes::{Bytes, BytesMut};
use pingora_core::connectors::http::Connector;
use pingora_error::{Error, ErrorType, Result};
use pingora_http::RequestHeader;
use std::time::Duration;

/// Longest body prefix kept from a probe answer (enough for an error object).
const BODY_PREFIX: usize = 16 * 1024;

/// What a probe got back.
#[derive(Debug, Clone)]
pub struct ProbeAnswer {
    /// HTTP status.
    pub status: u16,
    /// The start of the body.
    pub body: Bytes,
}

/// A request keygate sends by itself.
#[derive(Debug, Clone)]
pub struct ProbeRequest<'a> {
    /// `GET` or `POST`.
    pub method: &'a str,
    /// Client-style path, e.g. `/v1/models` (the upstream's base path is added).
    pub path: &'a str,
    /// JSON body for POST.
    pub body: Option<Bytes>,
}

/// Sends `req` to `up` with key `key` (by index; `None` for keyless upstreams).
pub async fn send(
    connector: &Connector,
    up: &Upstream,
    key: Option<usize>,
    req: &ProbeRequest<'_>,
    timeout: Duration,
) -> Result<ProbeAnswer> {
    let endpoint = up
        .pick_endpoint()
        .ok_or_else(|| Error::explain(ErrorType::ConnectNoRoute, "no live endpoint"))?;
    let peer = up
        .peer(&endpoint, timeout)
        .ok_or_else(|| Error::explain(ErrorType::ConnectNoRoute, "endpoint has no IP address"))?;
    let fut = async {
        let (mut session, _reused) = connector.get_http_session(&peer).await?;
        let mut header = RequestHeader::build(req.method, req.path.as_bytes(), None)?;
        header.insert_header("content-type", "application/json")?;
        header.insert_header("user-agent", concat!("keygate/", env!("CARGO_PKG_VERSION")))?;
        let path = up.upstream_path(req.path);
        prepare_upstream_request(
            &mut header,
            up.auth,
            key.and_then(|k| up.credential(k)),
            &up.host_header,
            Some(&path),
            req.body.as_ref().map(Bytes::len),
        )?;
        if up.api == crate::config::Api::Anthropic {
            crate::header_rules::ensure_anthropic_version(&mut header)?;
        }
        session.write_request_header(Box::new(header)).await?;
        if let Some(body) = req.body.clone() {
            session.write_request_body(body, true).await?;
        }
        session.finish_request_body().await?;
        session.read_response_header().await?;
        let status = session.response_header().map_or(0, |h| h.status.as_u16());
        let mut body = BytesMut::new();
        while body.len() < BODY_PREFIX {
            match session.read_response_body().await? {
                Some(chunk) => body.extend_from_slice(&chunk),
                None => break,
            }
        }
        body.truncate(BODY_PREFIX);
        // Not returned to the pool: probes are rare and a half-read body cannot be reused.
        session.shutdown().await;
        Ok(ProbeAnswer {
            status,
            body: body.freeze(),
        })
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(Error::explain(ErrorType::ReadTimedout, "probe timed out")),
    }
}
