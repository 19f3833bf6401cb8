//! Per-request state kept across Pingora's hooks and across retry attempts.

use super::errors::LocalResponse;
use crate::clients::limits::Admission;
use crate::keys::KeyLease;
use crate::usage::{Usage, UsageChunkStripper, UsageMeter};
use bytes::Bytes;
use pingora_load_balancing::Backend;
use pingora_prometheus::prometheus;
use std::time::Instant;

/// One try of a request against one upstream key and endpoint.
pub struct Attempt {
    /// Index of the upstream.
    pub upstream: usize,
    /// The key in use (none for `auth: none` upstreams); released on drop.
    pub key: Option<KeyLease>,
    /// The endpoint in use.
    pub endpoint: Backend,
    /// When the attempt started, for time to first byte.
    pub started: Instant,
}

/// What a request carries through the hooks.
pub struct RequestCtx {
    /// When keygate took the request.
    pub started: Instant,
    /// The (possibly rewritten) body, replayed on every attempt.
    pub body: Bytes,
    /// Whether the request had a body that keygate must supply to the upstream.
    pub has_body: bool,
    /// The attempt number whose body has been handed to Pingora.
    pub body_sent_for: u32,
    /// `model` as the client asked.
    pub model: Option<String>,
    /// `model` as sent upstream (after an alias rewrite).
    pub upstream_model: Option<String>,
    /// Whether the client asked for a stream.
    pub stream: bool,
    /// `max_tokens` (or its newer names) from the body.
    pub max_tokens: Option<u64>,
    /// Index of the matched route.
    pub route: Option<usize>,
    /// Upstreams in the order this request tries them.
    pub order: Vec<usize>,
    /// Attempts made so far.
    pub attempts: u32,
    /// (upstream, key) pairs already tried for this request.
    pub tried: Vec<(usize, usize)>,
    /// The attempt in flight.
    pub current: Option<Attempt>,
    /// A response keygate must write itself (from `fail_to_proxy`).
    pub local: Option<LocalResponse>,
    /// A replacement body for an upstream response (sanitised 401/403).
    pub replace_body: Option<Bytes>,
    /// Status of the last upstream response.
    pub upstream_status: Option<u16>,
    /// The start of a 429 body being passed to the client, read for quota and org-wide signs.
    pub error_body: Option<bytes::BytesMut>,
    /// Counts the request in `keygate_in_flight_requests` while it lives.
    pub in_flight: Option<InFlight>,
    /// Time to the response header of the last attempt.
    pub ttfb: Option<std::time::Duration>,
    /// Response body bytes sent to the client.
    pub bytes_sent: usize,
    /// Why keygate answered by itself, for the access log.
    pub note: Option<&'static str>,
    /// Reads `usage` from the response as it passes.
    pub usage_meter: Option<UsageMeter>,
    /// Tokens the upstream reported.
    pub usage: Option<Usage>,
    /// keygate asked for stream usage the client did not: hide the usage chunk.
    pub strip_usage: bool,
    /// Does the hiding.
    pub stripper: Option<UsageChunkStripper>,
    /// Index of the authenticated client.
    pub client: Option<usize>,
    /// The client's address (behind trusted proxies: the forwarded one).
    pub client_ip: Option<std::net::IpAddr>,
    /// The request's place in its client's limits.
    pub admission: Option<Admission>,
}

/// Holds one unit of the in-flight gauge; gives it back when the request ends, however it ends.
pub struct InFlight(prometheus::IntGauge);

impl InFlight {
    /// Increments `gauge` until dropped.
    pub fn new(gauge: &prometheus::IntGauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl RequestCtx {
    /// A fresh context.
    pub fn new() -> Self {
        Self {
            started: Instant::now(),
            body: Bytes::new(),
            has_body: false,
            body_sent_for: 0,
            model: None,
            upstream_model: None,
            stream: false,
            max_tokens: None,
            route: None,
            order: Vec::new(),
            attempts: 0,
            tried: Vec::new(),
            current: None,
            local: None,
            replace_body: None,
            upstream_status: None,
            error_body: None,
            in_flight: None,
            ttfb: None,
            bytes_sent: 0,
            note: None,
            usage_meter: None,
            usage: None,
            strip_usage: false,
            stripper: None,
            client: None,
            client_ip: None,
            admission: None,
        }
    }

    /// The model name used for key cooldowns: the one sent upstream.
    pub fn cooldown_model(&self) -> &str {
        self.upstream_model
            .as_deref()
            .or(self.model.as_deref())
            .unwrap_or("")
    }
}

impl Default for RequestCtx {
    fn default() -> Self {
        Self::new()
    }
}
