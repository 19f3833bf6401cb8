//! Per-request and per-attempt state, kept across Pingora's hooks.
//!
//! A [`RequestCtx`] lives as long as the request: what was asked and by whom, the attempt log,
//! and what went back to the client. An [`Attempt`] lives from `upstream_peer` until the next
//! attempt replaces it (the last one stays for logging): the key and endpoint in use and the
//! state of that upstream's answer as it passes.

use crate::body_budget::BodyPermit;
use crate::keys::KeyLease;
use crate::redact::ErrorBodyScrubber;
use crate::retry_policy::{AttemptLog, Decision};
use crate::shared::Admitted;
use crate::usage::{Usage, UsageChunkStripper, UsageMeter};
use bytes::{Bytes, BytesMut};
use pingora_load_balancing::Backend;
use pingora_prometheus::prometheus;
use std::time::{Duration, Instant};

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
    /// Whether keygate's copy of the body was handed to Pingora for this attempt.
    pub body_sent: bool,
    /// The upstream's final response status, once its header arrived.
    pub status: Option<u16>,
    /// Time to that response header.
    pub ttfb: Option<Duration>,
    /// What the retry policy decided about this attempt.
    pub decision: Option<Decision>,
    /// A replacement for the upstream's body (a sanitised 401/403).
    pub replace_body: Option<Bytes>,
    /// The start of an error body being passed to the client: a 429's read for quota and
    /// org-wide signs, a 401/403's for whom it blames, every one's for the key's last error.
    pub error_body: Option<BytesMut>,
    /// What that 429 asked for in its headers (`Retry-After` …), for an org-wide limit its
    /// body reveals.
    pub requested_cooldown: Option<Duration>,
    /// Reads `usage` from a successful answer as it passes.
    pub usage_meter: Option<UsageMeter>,
    /// Hides the usage chunk keygate asked for on the client's behalf.
    pub stripper: Option<UsageChunkStripper>,
    /// Masks the key and account ids out of an error body passed to the client.
    pub scrubber: Option<ErrorBodyScrubber>,
    /// Turns an Anthropic answer into an OpenAI one, on a translating route (boxed, like the
    /// other rarely used parts, to keep the per-attempt state small to move).
    pub translator: Option<Box<crate::translate::AnswerTranslator>>,
    /// Collects a cache miss's answer for the response cache.
    pub capture: Option<Box<crate::cache::entry::Capture>>,
    /// Collects the start of an answer that may create account-scoped objects, for their ids.
    pub ids: Option<Box<crate::resources::capture::IdCapture>>,
}

impl Attempt {
    /// A fresh attempt on `upstream` with `key` at `endpoint`, starting now.
    pub fn new(upstream: usize, key: Option<KeyLease>, endpoint: Backend) -> Self {
        Self {
            upstream,
            key,
            endpoint,
            started: Instant::now(),
            body_sent: false,
            status: None,
            ttfb: None,
            decision: None,
            replace_body: None,
            error_body: None,
            requested_cooldown: None,
            usage_meter: None,
            stripper: None,
            scrubber: None,
            translator: None,
            capture: None,
            ids: None,
        }
    }

    /// The index of the key in use, if any.
    pub fn key_index(&self) -> Option<usize> {
        self.key.as_ref().map(KeyLease::index)
    }
}

/// What a request carries through the hooks.
pub struct RequestCtx {
    /// When keygate took the request.
    pub started: Instant,
    /// The (possibly rewritten) body, replayed on every attempt; `None` without a body.
    pub body: Option<Bytes>,
    /// `model` as the client asked.
    pub model: Option<String>,
    /// `model` as sent upstream (after an alias rewrite).
    pub upstream_model: Option<String>,
    /// Whether the client asked for a stream.
    pub stream: bool,
    /// `max_tokens` (or its newer names) from the body.
    pub max_tokens: Option<u64>,
    /// keygate asked for stream usage the client did not: hide the usage chunk.
    pub strip_usage: bool,
    /// Index of the matched route.
    pub route: Option<usize>,
    /// Upstreams in the order this request tries them (decided at the first attempt).
    pub order: Vec<usize>,
    /// Index of the authenticated client.
    pub client: Option<usize>,
    /// The client's address (behind trusted proxies: the forwarded one).
    pub client_ip: Option<std::net::IpAddr>,
    /// The request's place in its client's limits.
    pub admission: Option<Admitted>,
    /// The body's room in the budget of buffered bytes, held while the body may be replayed.
    pub body_permit: Option<BodyPermit>,
    /// Counts the request in `keygate_in_flight_requests` while it lives.
    pub in_flight: Option<InFlight>,
    /// Attempts so far and the keys they used.
    pub log: AttemptLog,
    /// The attempt in flight, or the last one.
    pub attempt: Option<Attempt>,
    /// Response body bytes sent to the client.
    pub bytes_sent: usize,
    /// Tokens the upstream reported.
    pub usage: Option<Usage>,
    /// Why keygate answered by itself, for the access log.
    pub note: Option<&'static str>,
    /// The body went upstream translated (OpenAI chat completion to Anthropic message): its
    /// answer comes back translated too.
    pub translate: bool,
    /// With `translate`: the client's stream asked for the usage chunk.
    pub translate_usage: bool,
    /// What the response cache did, on a cached route (boxed: most routes have no cache).
    pub cache: Option<Box<super::cached::CacheState>>,
    /// The account-scoped objects the request names or may create (boxed: most have none).
    pub owned: Option<Box<super::owned::OwnedState>>,
    /// The request's prompt-affinity hash, when its route uses affinity and the body has one.
    pub affinity: Option<u64>,
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
        let started = Instant::now();
        Self {
            started,
            body: None,
            model: None,
            upstream_model: None,
            stream: false,
            max_tokens: None,
            strip_usage: false,
            route: None,
            order: Vec::new(),
            client: None,
            client_ip: None,
            admission: None,
            body_permit: None,
            in_flight: None,
            log: AttemptLog::new(started),
            attempt: None,
            bytes_sent: 0,
            usage: None,
            note: None,
            translate: false,
            translate_usage: false,
            cache: None,
            owned: None,
            affinity: None,
        }
    }

    /// The account whose keys alone may serve this request, when it names its objects.
    pub fn requirement(&self) -> Option<&crate::resources::Requirement> {
        self.owned.as_deref().and_then(|o| o.need.as_ref())
    }

    /// The model name used for key cooldowns: the one sent upstream.
    pub fn cooldown_model(&self) -> &str {
        self.upstream_model
            .as_deref()
            .or(self.model.as_deref())
            .unwrap_or("")
    }

    /// The body's length, for the token estimate (0 without a body).
    pub fn body_len(&self) -> usize {
        self.body.as_ref().map_or(0, Bytes::len)
    }
}

impl Default for RequestCtx {
    fn default() -> Self {
        Self::new()
    }
}
