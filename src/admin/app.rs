//! The Pingora glue of the admin listener: answers the status page's own requests
//! ([`super::page`]), otherwise reads a request (body capped), hands it to [`Admin::serve`],
//! writes the JSON answer. Also the real [`Probes`] over the upstreams.

use super::api::{too_large, AdminRequest, MAX_BODY_BYTES};
use super::views::EndpointView;
use super::{Admin, AdminResponse, Probes};
use crate::keys::KeyIndex;
use crate::prober::ProbeKind;
use crate::upstream::probe::{self, ProbeAnswer};
use crate::upstream::Upstream;
use async_trait::async_trait;
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::connectors::http::Connector;
use pingora_core::protocols::http::ServerSession;
use std::sync::Arc;
use std::time::Duration;

/// Timeout of a test probe.
const TEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Probes through Pingora's connector, as the background prober sends them.
pub struct UpstreamProbes {
    upstreams: Arc<[Upstream]>,
    connector: Connector,
}

impl UpstreamProbes {
    /// Probes of these upstreams.
    pub fn new(upstreams: Arc<[Upstream]>) -> Self {
        Self {
            upstreams,
            connector: Connector::new(None),
        }
    }
}

#[async_trait]
impl Probes for UpstreamProbes {
    fn endpoints(&self, u: usize) -> Vec<EndpointView> {
        let Some(up) = self.upstreams.get(u) else {
            return Vec::new();
        };
        let backends = up.endpoints.backends();
        backends
            .get_backend()
            .iter()
            .map(|b| {
                let ejected = b.addr.as_inet().is_some_and(|a| up.outliers.is_ejected(*a));
                EndpointView {
                    addr: b.addr.to_string(),
                    healthy: backends.ready(b),
                    ejected,
                }
            })
            .collect()
    }

    async fn send(&self, u: usize, k: KeyIndex, kind: ProbeKind) -> Result<ProbeAnswer, String> {
        let up = self.upstreams.get(u).ok_or("no such upstream")?;
        let req = crate::prober::request(up, kind);
        probe::send(&self.connector, up, Some(k), &req, TEST_TIMEOUT)
            .await
            .map_err(|e| e.etype().as_str().to_string())
    }
}

/// The admin listener's app.
pub struct AdminApp(pub Arc<Admin>);

/// Reads the body, at most [`MAX_BODY_BYTES`] + 1 bytes; `Err` if the client sent more.
async fn read_body(session: &mut ServerSession) -> Result<Vec<u8>, ()> {
    let declared = session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(());
    }
    let mut body = Vec::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                body.extend_from_slice(&chunk);
                if body.len() > MAX_BODY_BYTES {
                    return Err(());
                }
            }
            Ok(None) => return Ok(body),
            // A broken body is answered as empty; the API then refuses what needs one.
            Err(_) => return Ok(body),
        }
    }
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> http::Response<Vec<u8>> {
        let header = session.req_header();
        if let Some(page) = super::page::answer(header.method.as_str(), header.uri.path()) {
            return page;
        }
        let answer = match read_body(session).await {
            Err(()) => {
                // Not worth reading the rest: the connection closes after this answer.
                session.set_keepalive(None);
                let e = too_large();
                AdminResponse {
                    status: e.status,
                    body: e.body().to_vec(),
                }
            }
            Ok(body) => {
                let header = session.req_header();
                let method = header.method.as_str().to_string();
                let path = header.uri.path().to_string();
                let authorization = header
                    .headers
                    .get(http::header::AUTHORIZATION)
                    .map(|v| v.as_bytes().to_vec());
                let req = AdminRequest {
                    method: &method,
                    path: &path,
                    authorization: authorization.as_deref(),
                    body: &body,
                };
                // An oversized body without a declared length is caught above; the API checks
                // the length too, for its own callers.
                self.0.serve(&req).await
            }
        };
        http::Response::builder()
            .status(answer.status)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::CONTENT_LENGTH, answer.body.len())
            .header(http::header::CACHE_CONTROL, "no-store")
            .body(answer.body)
            .unwrap_or_default()
    }
}
