//! The response cache's glue: look up once the request is routed and admitted, write a hit,
//! capture a miss's `200` as it passes, and store it when it ended whole. The decisions are in
//! [`crate::cache`].

use super::ctx::RequestCtx;
use super::gateway::Gateway;
use crate::cache::control::Control;
use crate::cache::entry::Capture;
use crate::cache::flight::Leader;
use crate::cache::key::CacheKey;
use crate::cache::store::Found;
use crate::cache::{self, CachePolicy, CacheResult, Lookup, Plan, Request};
use bytes::Bytes;
use pingora_error::Result;
use pingora_http::ResponseHeader;
use pingora_proxy::Session;

/// The response header that says what the cache did.
pub const CACHE_HEADER: &str = "x-keygate-cache";

/// A cached route's request: what the cache did, and for a miss what its answer is stored
/// under.
pub struct CacheState {
    /// Hit, miss or bypass.
    pub result: CacheResult,
    /// The route's settings.
    pub policy: CachePolicy,
    /// The key a miss's answer is stored under (`None`: not stored).
    pub key: Option<CacheKey>,
    /// Held by the first of identical misses: its followers wake when it is dropped.
    pub leader: Option<Leader>,
    /// Tokens a hit saved (its stored usage).
    pub saved_tokens: u64,
}

impl Gateway {
    /// On a cached route: answers from the cache (`Ok(true)`), or notes the miss or bypass and
    /// lets the request go upstream. Called once the route and the client are known.
    pub(crate) async fn answer_from_cache(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<bool> {
        let (Some(cache), Some(route)) = (self.options.cache.as_ref(), ctx.route) else {
            return Ok(false);
        };
        let Some(policy) = cache.policy(route).copied() else {
            return Ok(false);
        };
        let req = session.req_header();
        let content_type = req
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let control = Control::parse(
            req.headers
                .get_all(http::header::CACHE_CONTROL)
                .iter()
                .map(|v| v.as_bytes()),
        );
        let request = Request {
            method: req.method.as_str(),
            path: req.uri.path_and_query().map_or("/", |p| p.as_str()),
            content_type,
            body: ctx.body.as_deref(),
            route: self.routes.get(route).name.as_str(),
            model: ctx.upstream_model.as_deref().or(ctx.model.as_deref()),
            client: ctx
                .client
                .map(|i| self.options.clients.clients()[i].name.as_str()),
            stream: ctx.stream,
            usage_injected: ctx.strip_usage,
            control,
        };
        let mut state = CacheState {
            result: CacheResult::Bypass,
            policy,
            key: None,
            leader: None,
            saved_tokens: 0,
        };
        let Plan::Use {
            key,
            lookup,
            max_age,
        } = cache::plan(&policy, &request)
        else {
            ctx.cache = Some(Box::new(state));
            return Ok(false);
        };
        match cache.lookup(key, lookup, max_age).await {
            Lookup::Hit(found) => {
                state.result = CacheResult::Hit;
                state.saved_tokens = found.answer.usage.map_or(0, |u| u.total());
                if let Some(admission) = ctx.admission.take() {
                    // A hit spends nothing upstream: its place in the client's limits goes back.
                    if policy.charge_hits {
                        admission.settle(found.answer.usage.map(|u| u.total()));
                    } else {
                        admission.refund();
                    }
                }
                ctx.bytes_sent = found.answer.body.len();
                ctx.cache = Some(Box::new(state));
                write_hit(session, &found).await?;
                Ok(true)
            }
            Lookup::Miss(leader) => {
                state.result = CacheResult::Miss;
                state.key = Some(key);
                state.leader = leader;
                ctx.cache = Some(Box::new(state));
                Ok(false)
            }
        }
    }

    /// Starts capturing the answer of a miss when the upstream's `200` arrives.
    pub(crate) fn capture_answer(&self, ctx: &mut RequestCtx, resp: &ResponseHeader) {
        let Some(state) = ctx.cache.as_ref().filter(|s| s.key.is_some()) else {
            return;
        };
        if resp.status.as_u16() != 200 {
            return;
        }
        if let Some(att) = ctx.attempt.as_mut() {
            att.capture = Some(Box::new(Capture::new(
                &resp.headers,
                state.policy.max_entry,
            )));
        }
    }

    /// Feeds the capture the body the client receives; stores the answer once it ended whole.
    pub(crate) fn feed_capture(
        &self,
        ctx: &mut RequestCtx,
        body: Option<&Bytes>,
        end_of_stream: bool,
    ) {
        let (Some(att), Some(state)) = (ctx.attempt.as_mut(), ctx.cache.as_mut()) else {
            return;
        };
        let Some(capture) = att.capture.as_mut() else {
            return;
        };
        if let Some(b) = body {
            capture.feed(b);
        }
        if capture.abandoned() {
            // Too large to store: nothing will come for the followers to wait for.
            att.capture = None;
            state.leader = None;
            return;
        }
        if !end_of_stream {
            return;
        }
        let (Some(capture), Some(key), Some(cache)) =
            (att.capture.take(), state.key, self.options.cache.as_ref())
        else {
            return;
        };
        if cache.store(key, *capture, ctx.usage, state.policy.ttl) {
            self.metrics
                .cache_bytes
                .set(i64::try_from(cache.bytes()).unwrap_or(i64::MAX));
        }
        // Stored (or found incomplete): the followers may look now.
        state.leader = None;
    }

    /// Counts a cached route's request in the cache metrics.
    pub(crate) fn count_cache(&self, ctx: &RequestCtx, route: &str) {
        let Some(state) = ctx.cache.as_ref() else {
            return;
        };
        let m = self.metrics;
        m.cache_requests
            .with_label_values(&[route, state.result.as_str()])
            .inc();
        if state.saved_tokens > 0 {
            m.cache_tokens_saved
                .with_label_values(&[route])
                .inc_by(state.saved_tokens);
        }
        if let Some(cache) = self.options.cache.as_ref() {
            m.cache_bytes
                .set(i64::try_from(cache.bytes()).unwrap_or(i64::MAX));
        }
    }
}

/// Adds `x-keygate-cache: miss|bypass` to an upstream answer on a cached route.
pub(crate) fn mark_response(resp: &mut ResponseHeader, ctx: &RequestCtx) -> Result<()> {
    if let Some(state) = ctx.cache.as_ref() {
        resp.insert_header(CACHE_HEADER, state.result.as_str())?;
    }
    Ok(())
}

/// Writes a stored answer: its kept headers, `x-keygate-cache: hit` and `Age`.
async fn write_hit(session: &mut Session, found: &Found) -> Result<()> {
    let answer = &found.answer;
    let mut h = ResponseHeader::build(200, Some(answer.headers.len() + 3))?;
    for (name, value) in &answer.headers {
        h.insert_header(name.clone(), value.clone())?;
    }
    h.insert_header(http::header::CONTENT_LENGTH, answer.body.len().to_string())?;
    h.insert_header(CACHE_HEADER, CacheResult::Hit.as_str())?;
    h.insert_header(http::header::AGE, found.age.as_secs().to_string())?;
    session.write_response_header(Box::new(h), false).await?;
    session
        .write_response_body(Some(answer.body.clone()), true)
        .await?;
    Ok(())
}
