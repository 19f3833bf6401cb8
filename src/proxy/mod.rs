//! The Pingora `ProxyHttp` glue: each hook reads the request state and calls plain-Rust logic.
//!
//! ```text
//! request_filter          read body (bounded) · model/stream · route · alias rewrite
//! upstream_peer           key from the KeyPool · endpoint from the LoadBalancer
//! upstream_request_filter client credentials out · key in · Host · base path · Content-Length
//! request_body_filter     hand Pingora the full body for this attempt
//! upstream_response_filter 429 ⇒ cool · 401/403 ⇒ disable · 5xx ⇒ retry elsewhere
//! response_filter         drop account-revealing headers
//! ```

pub mod body_replay;
pub mod ctx;
pub mod errors;
pub mod headers;

use crate::access_log::{AccessEntry, AccessLog};
use crate::clients::addr::{client_ip, CidrList};
use crate::clients::{presented_token, ClientTable, IpLimiters};
use crate::clock::SharedClock;
use crate::config::StreamUsage;
use crate::keys::{DisableReason, Pick};
use crate::metrics::Metrics;
use crate::outcome::Outcome;
use crate::prober::{Suspect, SuspectSender};
use crate::request_body;
use crate::retry_after;
use crate::routes::{endpoint_needs_model, RouteTable};
use crate::strategy::{LatencyTable, RouteOrder};
use crate::upstream::Upstream;
use crate::usage::{UsageChunkStripper, UsageMeter};
use async_trait::async_trait;
use body_replay::BodyReadError;
use bytes::Bytes;
use ctx::{Attempt, RequestCtx};
use errors::LocalResponse;
use log::{debug, info, warn};
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorSource, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Per-route settings the proxy needs at run time.
#[derive(Debug, Clone)]
pub struct RoutePlan {
    /// Upstream indexes and the strategy that orders them per request.
    pub order: RouteOrder,
    /// No new attempt after this long since the request arrived.
    pub deadline: Option<Duration>,
    /// Extra attempts after a failed one.
    pub retries: u32,
    /// Response-header timeout per attempt.
    pub ttfb_timeout: Duration,
}

/// The gateway: everything the hooks need, shared by all worker threads.
pub struct Gateway {
    upstreams: Vec<Upstream>,
    routes: RouteTable,
    plans: Vec<RoutePlan>,
    max_body_bytes: usize,
    clock: SharedClock,
    suspects: SuspectSender,
    latency: LatencyTable,
    metrics: &'static Metrics,
    options: GatewayOptions,
}

/// Optional parts of the gateway: logging, metering and who may get in.
#[derive(Default)]
pub struct GatewayOptions {
    /// Where access log lines go.
    pub access_log: Option<AccessLog>,
    /// Streaming usage handling.
    pub stream_usage: StreamUsage,
    /// Clients with gateway tokens (empty: open gateway).
    pub clients: ClientTable,
    /// Per-IP limits for an open gateway.
    pub ip_limiters: Option<IpLimiters>,
    /// Proxies whose forwarded-for headers are believed.
    pub trusted_proxies: CidrList,
    /// User agents answered with 403.
    pub deny_user_agents: Vec<crate::glob::Glob>,
    /// Client addresses answered with 403.
    pub deny_cidrs: CidrList,
    /// Keep-alive idle timeout in seconds.
    pub idle_timeout_secs: Option<u64>,
    /// `(model, owner)` pairs for `GET /v1/models`.
    pub models: Vec<(String, String)>,
}

impl Gateway {
    /// Assembles the gateway from its parts; `plans[i]` belongs to route `i`.
    pub fn new(
        upstreams: Vec<Upstream>,
        routes: RouteTable,
        plans: Vec<RoutePlan>,
        max_body_bytes: usize,
        clock: SharedClock,
        suspects: SuspectSender,
        options: GatewayOptions,
    ) -> Arc<Self> {
        Arc::new(Self {
            routes,
            plans,
            max_body_bytes,
            latency: LatencyTable::new(upstreams.len()),
            upstreams,
            clock,
            suspects,
            metrics: crate::metrics::global(),
            options,
        })
    }

    /// Every client's name and limiter (for the state file).
    pub fn client_limiters(&self) -> Vec<(String, Arc<crate::clients::limits::Limiter>)> {
        self.options
            .clients
            .clients()
            .iter()
            .map(|c| (c.name.clone(), c.limiter.clone()))
            .collect()
    }

    /// The upstreams, in config order.
    pub fn upstreams(&self) -> &[Upstream] {
        &self.upstreams
    }

    fn plan(&self, ctx: &RequestCtx) -> Option<&RoutePlan> {
        ctx.route.and_then(|r| self.plans.get(r))
    }

    /// Whether some key not yet tried could take this request now.
    fn has_candidate(&self, ctx: &RequestCtx) -> bool {
        let Some(plan) = self.plan(ctx) else {
            return false;
        };
        if plan.deadline.is_some_and(|d| ctx.started.elapsed() >= d) {
            return false;
        }
        plan.order.upstreams().iter().any(|&u| {
            let up = &self.upstreams[u];
            if up.keys.is_empty() {
                return !ctx.tried.iter().any(|(tu, _)| *tu == u) && up.pick_endpoint().is_some();
            }
            let exclude = tried_keys(ctx, u);
            matches!(up.keys.pick(ctx.cooldown_model(), &exclude), Pick::Key(_))
        })
    }

    /// Chooses the next (upstream, key, endpoint), or the local answer when none is usable.
    fn choose(
        &self,
        ctx: &mut RequestCtx,
    ) -> std::result::Result<(Attempt, HttpPeer), LocalResponse> {
        let plan = self
            .plan(ctx)
            .ok_or_else(|| LocalResponse::bad_gateway("request was not routed"))?;
        if ctx.order.is_empty() {
            // Decided once per request, so retries walk the same fallback order.
            plan.order
                .order_into(&self.latency, &mut rand::rng(), &mut ctx.order);
        }
        let mut soonest: Option<Duration> = None;
        let mut endpoints_down = false;
        for &u in &ctx.order {
            let up = &self.upstreams[u];
            let key = if up.keys.is_empty() {
                if ctx.tried.iter().any(|(tu, _)| *tu == u) {
                    continue;
                }
                None
            } else {
                match up.keys.pick(ctx.cooldown_model(), &tried_keys(ctx, u)) {
                    Pick::Key(lease) => Some(lease),
                    Pick::AllCooling { retry_in } => {
                        soonest = Some(soonest.map_or(retry_in, |s| s.min(retry_in)));
                        continue;
                    }
                    Pick::AllDisabled | Pick::Exhausted => continue,
                }
            };
            let Some(endpoint) = up.pick_endpoint() else {
                endpoints_down = true;
                warn!("upstream {}: no live endpoint", up.name);
                continue;
            };
            let Some(peer) = up.peer(&endpoint, plan.ttfb_timeout) else {
                endpoints_down = true;
                continue;
            };
            ctx.tried
                .push((u, key.as_ref().map_or(usize::MAX, |k| k.index())));
            up.touch();
            let attempt = Attempt {
                upstream: u,
                key,
                endpoint,
                started: Instant::now(),
            };
            return Ok((attempt, peer));
        }
        Err(if let Some(wait) = soonest {
            LocalResponse::all_cooling(wait)
        } else if endpoints_down {
            LocalResponse::bad_gateway("No upstream endpoint is reachable.")
        } else {
            LocalResponse::all_disabled()
        })
    }

    /// Applies what an upstream status says about the key that got it.
    fn judge(&self, ctx: &RequestCtx, status: u16, resp: &ResponseHeader) -> Outcome {
        let outcome = Outcome::of(status);
        let Some(att) = ctx.current.as_ref() else {
            return outcome;
        };
        let up = &self.upstreams[att.upstream];
        let Some(lease) = att.key.as_ref() else {
            return outcome;
        };
        let idx = lease.index();
        let model = ctx.cooldown_model();
        match outcome {
            Outcome::Success => up.keys.on_success(idx, model),
            Outcome::RateLimited => {
                let wanted = retry_after::requested_cooldown(&resp.headers, self.clock.wall());
                match up.keys.account(idx) {
                    Some(account) if retry_after::is_org_wide_limit(&resp.headers, b"", None) => {
                        let account = account.to_string();
                        for k in up.keys.cool_down_account(&account, model, wanted) {
                            self.count_cooldown(up, k, "account_limit");
                        }
                    }
                    _ => {
                        up.keys.cool_down(idx, model, wanted);
                        self.count_cooldown(up, idx, "rate_limit");
                    }
                }
                if wanted.is_none() {
                    // No rate-limit header: this may be an empty quota, which only the body
                    // says. The body is gone when the request is retried, so ask the prober.
                    let _ = self.suspects.send(Suspect {
                        upstream: att.upstream,
                        key: idx,
                    });
                }
            }
            Outcome::KeyRefused(reason) => {
                if up.keys.disable(idx, reason) {
                    self.count_cooldown(up, idx, reason.as_str());
                }
            }
            Outcome::ServerError | Outcome::ClientError => {}
        }
        outcome
    }

    fn count_cooldown(&self, up: &Upstream, key: usize, reason: &str) {
        self.metrics
            .cooldowns
            .with_label_values(&[up.name.as_str(), up.keys.name(key), reason])
            .inc();
    }

    fn count_attempt(&self, ctx: &RequestCtx, outcome: &str) {
        if let Some(att) = ctx.current.as_ref() {
            let up = self.upstreams[att.upstream].name.as_str();
            self.metrics
                .attempts
                .with_label_values(&[up, outcome])
                .inc();
        }
    }

    /// Who is asking: denied addresses and agents, and (with clients) a valid gateway token.
    fn check_access(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> std::result::Result<(), LocalResponse> {
        let o = &self.options;
        if let Some(idle) = o.idle_timeout_secs {
            // Without this Pingora waits forever for the next request on a keep-alive connection.
            session.set_keepalive(Some(idle));
        }
        let peer = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        if let Some(peer) = peer {
            let ip = client_ip(peer, &session.req_header().headers, &o.trusted_proxies);
            ctx.client_ip = Some(ip);
            if o.deny_cidrs.contains(ip) {
                return Err(LocalResponse::denied());
            }
        }
        if !o.deny_user_agents.is_empty() {
            let ua = session
                .req_header()
                .headers
                .get(http::header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if o.deny_user_agents.iter().any(|g| g.matches(ua)) {
                return Err(LocalResponse::denied());
            }
        }
        if !o.clients.is_open() {
            let token = presented_token(&session.req_header().headers).unwrap_or(b"");
            let idx = o
                .clients
                .authenticate(token)
                .and_then(|c| o.clients.clients().iter().position(|x| std::ptr::eq(x, c)));
            match idx {
                Some(i) => ctx.client = Some(i),
                None => return Err(LocalResponse::bad_token()),
            }
        }
        Ok(())
    }

    /// Model permission and the client's (or the IP's) limits, once the body is known.
    fn admit(&self, ctx: &mut RequestCtx) -> std::result::Result<(), LocalResponse> {
        let o = &self.options;
        let client = ctx.client.map(|i| &o.clients.clients()[i]);
        if let (Some(c), Some(model)) = (client, ctx.model.as_deref()) {
            if !c.allows(model) {
                return Err(LocalResponse::model_not_allowed(model));
            }
        }
        let limiter = match (client, &o.ip_limiters, ctx.client_ip) {
            (Some(c), _, _) => Some(c.limiter.clone()),
            (None, Some(ips), Some(ip)) => Some(ips.get(ip)),
            _ => None,
        };
        let Some(limiter) = limiter else {
            return Ok(());
        };
        if limiter.limits().is_empty() {
            return Ok(());
        }
        // OpenAI's rule of thumb: about 4 bytes a token, plus what the answer may use.
        let estimate = (ctx.body.len() as u64).div_ceil(4) + ctx.max_tokens.unwrap_or(0);
        match limiter.admit(estimate) {
            Ok(a) => {
                ctx.admission = Some(a);
                Ok(())
            }
            Err(rejection) => {
                let who = client.map_or("-", |c| c.name.as_str());
                self.metrics
                    .client_rejections
                    .with_label_values(&[who, rejection.kind.as_str()])
                    .inc();
                Err(LocalResponse::client_limited(&rejection))
            }
        }
    }

    /// `GET /v1/models`: the models this client can reach through the routes.
    async fn answer_models(&self, session: &mut Session, ctx: &RequestCtx) -> Result<()> {
        let client = ctx.client.map(|i| &self.options.clients.clients()[i]);
        let data: Vec<serde_json::Value> = self
            .options
            .models
            .iter()
            .filter(|(m, _)| self.routes.route("/v1/chat/completions", Some(m)).is_some())
            .filter(|(m, _)| client.is_none_or(|c| c.allows(m)))
            .map(|(m, owner)| serde_json::json!({"id": m, "object": "model", "created": 0, "owned_by": owner}))
            .collect();
        let body = Bytes::from(serde_json::json!({"object": "list", "data": data}).to_string());
        let mut h = ResponseHeader::build(200, Some(2))?;
        h.insert_header("content-type", "application/json")?;
        h.insert_header("content-length", body.len().to_string())?;
        session.write_response_header(Box::new(h), false).await?;
        session.write_response_body(Some(body), true).await?;
        Ok(())
    }

    /// Feeds an attempt's network result to outlier ejection and the latency table.
    fn note_endpoint(&self, ctx: &RequestCtx, ok: bool) {
        let Some(att) = ctx.current.as_ref() else {
            return;
        };
        let up = &self.upstreams[att.upstream];
        if ok {
            up.endpoint_ok(&att.endpoint);
            self.latency.record(att.upstream, att.started.elapsed());
        } else {
            up.endpoint_failed(&att.endpoint);
            self.latency.penalize(att.upstream);
        }
    }

    /// A 429 body that reaches the client can be read: an empty quota disables the key, an
    /// organisation-wide limit cools every key of its account.
    fn judge_429_body(&self, ctx: &RequestCtx, body: &[u8]) {
        let Some(att) = ctx.current.as_ref() else {
            return;
        };
        let Some(lease) = att.key.as_ref() else {
            return;
        };
        let up = &self.upstreams[att.upstream];
        let idx = lease.index();
        if retry_after::quota_error_code(body).is_some() {
            up.keys.disable(idx, DisableReason::InsufficientQuota);
        } else if let Some(account) = up.keys.account(idx) {
            if retry_after::is_org_wide_limit(
                &http::HeaderMap::new(),
                body,
                up.org_limit_pattern.as_deref(),
            ) {
                let account = account.to_string();
                up.keys
                    .cool_down_account(&account, ctx.cooldown_model(), None);
            }
        }
    }

    async fn respond_local(&self, session: &mut Session, resp: &LocalResponse) -> Result<()> {
        self.metrics
            .local_responses
            .with_label_values(&[resp.reason()])
            .inc();
        let body = resp.body();
        let header = resp.header(body.len())?;
        session
            .write_response_header(Box::new(header), false)
            .await?;
        session.write_response_body(Some(body), true).await?;
        Ok(())
    }
}

fn tried_keys(ctx: &RequestCtx, upstream: usize) -> Vec<usize> {
    ctx.tried
        .iter()
        .filter(|(u, _)| *u == upstream)
        .map(|(_, k)| *k)
        .collect()
}

fn local_error(resp: LocalResponse, ctx: &mut RequestCtx) -> Box<Error> {
    let status = resp.status;
    ctx.local = Some(resp);
    let mut e = Error::explain(ErrorType::HTTPStatus(status), "answered by keygate");
    e.set_retry(false);
    e
}

/// Reads what routing needs from the request and picks the route, or says why not.
fn parse_and_route(
    gw: &Gateway,
    req: &RequestHeader,
    body: Bytes,
    ctx: &mut RequestCtx,
) -> std::result::Result<(), LocalResponse> {
    let path = req.uri.path();
    let needs_model = endpoint_needs_model(req.method.as_str(), path);
    let content_type = req
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mut json_info = None;
    if content_type.starts_with("multipart/form-data") {
        match request_body::multipart_field(&body, content_type, "model") {
            Ok(m) => ctx.model = m,
            Err(e) if needs_model => return Err(LocalResponse::bad_request(e.to_string())),
            Err(_) => {}
        }
    } else if !body.is_empty() && (needs_model || content_type.contains("json")) {
        match request_body::scan_json(&body) {
            Ok(info) => {
                ctx.model = info.model.clone();
                ctx.stream = info.stream;
                ctx.max_tokens = info.max_tokens;
                json_info = Some(info);
            }
            Err(e) if needs_model => return Err(LocalResponse::bad_request(e.to_string())),
            Err(_) => {}
        }
    }
    if needs_model && ctx.model.is_none() {
        return Err(LocalResponse::bad_request(
            "You must provide a model parameter.".to_string(),
        ));
    }
    let Some((idx, route)) = gw.routes.route(path, ctx.model.as_deref()) else {
        return Err(match ctx.model.as_deref() {
            Some(m) => LocalResponse::model_not_found(m),
            None => LocalResponse::new(
                404,
                "invalid_request_error",
                "unknown_url",
                format!("No route serves {} {path}.", req.method),
            ),
        });
    };
    ctx.route = Some(idx);
    ctx.body = body;
    if let (Some(new_model), Some(_)) = (route.rewrite_model.as_deref(), ctx.model.as_deref()) {
        if let Some(info) = json_info.as_ref() {
            ctx.body = Bytes::from(info.rewrite_model(&ctx.body, new_model));
        } else if let Some(b) =
            request_body::rewrite_multipart_field(&ctx.body, content_type, "model", new_model)
        {
            ctx.body = Bytes::from(b);
        }
        ctx.upstream_model = Some(new_model.to_string());
    }
    if gw.options.stream_usage == StreamUsage::Inject
        && ctx.stream
        && json_info.as_ref().is_some_and(|i| !i.include_usage)
    {
        // Rescan: the body may have been rewritten above.
        if let Ok(info) = request_body::scan_json(&ctx.body) {
            ctx.body = Bytes::from(info.inject_include_usage(&ctx.body));
            ctx.strip_usage = true;
        }
    }
    Ok(())
}

fn is_expect_continue(req: &RequestHeader) -> bool {
    req.headers
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// Pingora's `ProxyHttp` wrapper around a shared [`Gateway`].
pub struct GatewayProxy(pub Arc<Gateway>);

#[async_trait]
impl ProxyHttp for GatewayProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::new()
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let gw = &self.0;
        ctx.in_flight = Some(ctx::InFlight::new(&gw.metrics.in_flight));
        if let Some(problem) = headers::connection_header_problem(session.req_header()) {
            gw.respond_local(session, &LocalResponse::bad_request(problem))
                .await?;
            return Ok(true);
        }
        if let Err(resp) = gw.check_access(session, ctx) {
            gw.respond_local(session, &resp).await?;
            return Ok(true);
        }
        if session.req_header().method == http::Method::GET
            && matches!(
                session.req_header().uri.path(),
                "/v1/models" | "/v1/models/"
            )
        {
            gw.answer_models(session, ctx).await?;
            return Ok(true);
        }
        if is_expect_continue(session.req_header()) && !session.is_http2() {
            let cont = ResponseHeader::build(100, Some(0))?;
            session.write_response_header(Box::new(cont), false).await?;
        }
        ctx.has_body = !session.as_mut().is_body_empty();
        let body = match body_replay::read_body(session, gw.max_body_bytes).await {
            Ok(b) => b,
            Err(BodyReadError::TooLarge { limit }) => {
                gw.respond_local(session, &LocalResponse::too_large(limit))
                    .await?;
                return Ok(true);
            }
            Err(BodyReadError::ChunkedTooLarge) => {
                let r = LocalResponse::new(
                    411,
                    "invalid_request_error",
                    "length_required",
                    "Send a Content-Length header with request bodies over 64 KiB.",
                );
                gw.respond_local(session, &r).await?;
                return Ok(true);
            }
            Err(BodyReadError::Downstream(e)) => return Err(e),
        };
        let routed = parse_and_route(gw, session.req_header(), body, ctx);
        if let Err(resp) = routed.and_then(|()| gw.admit(ctx)) {
            gw.respond_local(session, &resp).await?;
            return Ok(true);
        }
        Ok(false)
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        // Release the previous attempt's key before choosing the next one.
        ctx.current = None;
        match self.0.choose(ctx) {
            Ok((attempt, peer)) => {
                ctx.attempts += 1;
                ctx.current = Some(attempt);
                Ok(Box::new(peer))
            }
            Err(local) => Err(local_error(local, ctx)),
        }
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let Some(att) = ctx.current.as_ref() else {
            return Error::e_explain(ErrorType::InternalError, "no attempt in progress");
        };
        let up = &self.0.upstreams[att.upstream];
        // Without a base path the client's path goes upstream unchanged: no rewrite needed.
        let path = (!up.base_path.is_empty()).then(|| {
            let client_path = session
                .req_header()
                .uri
                .path_and_query()
                .map_or("/", |p| p.as_str());
            up.upstream_path(client_path)
        });
        let credential = att.key.as_ref().and_then(|k| up.auth_value(k.index()));
        headers::prepare_upstream_request(
            upstream_request,
            up.auth,
            credential,
            &up.host_header,
            path.as_deref(),
            ctx.has_body.then_some(ctx.body.len()),
        )
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if !ctx.has_body {
            return Ok(());
        }
        // Pingora hands over only its retry buffer (the tail); send keygate's full copy instead,
        // once per attempt.
        if ctx.body_sent_for != ctx.attempts {
            ctx.body_sent_for = ctx.attempts;
            *body = Some(ctx.body.clone());
        } else {
            *body = None;
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let status = resp.status.as_u16();
        if status < 200 {
            return Ok(());
        }
        ctx.upstream_status = Some(status);
        let outcome = self.0.judge(ctx, status, resp);
        if let Some(att) = ctx.current.as_ref() {
            let ttfb = att.started.elapsed();
            ctx.ttfb = Some(ttfb);
            let up = self.0.upstreams[att.upstream].name.as_str();
            self.0
                .metrics
                .ttfb
                .with_label_values(&[up])
                .observe(ttfb.as_secs_f64());
        }
        self.0.count_attempt(ctx, outcome.label());
        self.0.note_endpoint(ctx, outcome != Outcome::ServerError);
        let retries = self.0.plan(ctx).map_or(0, |p| p.retries);
        if outcome.worth_retrying() && ctx.attempts <= retries && self.0.has_candidate(ctx) {
            let (up, key) = describe_attempt(&self.0, ctx);
            info!("upstream {up} key {key} answered {status}; retrying elsewhere");
            let mut e = Error::explain(
                ErrorType::HTTPStatus(status),
                "upstream answer worth retrying",
            );
            e.set_retry(true);
            return Err(e);
        }
        if status == 429 {
            ctx.error_body = Some(bytes::BytesMut::new());
        }
        if (200..300).contains(&status) {
            let content_type = resp
                .headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let meter = UsageMeter::for_response(content_type);
            if ctx.strip_usage && content_type.starts_with("text/event-stream") {
                ctx.stripper = Some(UsageChunkStripper::new());
            }
            ctx.usage_meter = Some(meter);
        }
        if matches!(outcome, Outcome::KeyRefused(_)) {
            // OpenAI's 401 bodies echo part of the key: never pass them on.
            let replacement = LocalResponse::upstream_auth_failed(status);
            let body = replacement.body();
            *resp = replacement.header(body.len())?;
            ctx.replace_body = Some(body);
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        _ctx: &mut RequestCtx,
    ) -> Result<()> {
        headers::sanitize_response(resp);
        Ok(())
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Duration>> {
        if let Some(replacement) = ctx.replace_body.take() {
            *body = Some(replacement);
        } else if ctx.upstream_status.is_some_and(|s| s == 401 || s == 403) {
            *body = None;
        }
        if let Some(meter) = ctx.usage_meter.as_mut() {
            if let Some(b) = body.as_ref() {
                meter.feed(b);
            }
            if end_of_stream {
                ctx.usage = meter.finish();
            }
        }
        if let Some(stripper) = ctx.stripper.as_mut() {
            let mut out = body.take().map(|b| stripper.filter(b)).unwrap_or_default();
            if end_of_stream {
                let rest = stripper.finish();
                if !rest.is_empty() {
                    let mut joined = bytes::BytesMut::from(&out[..]);
                    joined.extend_from_slice(&rest);
                    out = joined.freeze();
                }
            }
            // An empty chunk could read as the end of a chunked body: send nothing instead.
            *body = (!out.is_empty()).then_some(out);
        }
        if let Some(b) = body.as_ref() {
            ctx.bytes_sent += b.len();
        }
        if let Some(buf) = ctx.error_body.as_mut() {
            if let Some(chunk) = body.as_ref() {
                let room = retry_after::MAX_BODY_SCAN.saturating_sub(buf.len());
                buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            if end_of_stream {
                if let Some(buf) = ctx.error_body.take() {
                    self.0.judge_429_body(ctx, &buf);
                }
            }
        }
        Ok(None)
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("peer {peer}"));
        // Settle the flag first: reading an undecided retry flag panics.
        e.retry.decide_reuse(client_reused);
        let ours = matches!(e.etype(), ErrorType::HTTPStatus(_));
        if session.response_written().is_some() {
            // Bytes already reached the client: a retry would duplicate or splice responses.
            e.set_retry(false);
        } else if e.esource() == &ErrorSource::Downstream {
            // The client went away: nobody is left to answer, so spend no more upstream quota.
            e.set_retry(false);
        } else if !ours {
            if e.esource() == &ErrorSource::Upstream {
                // Reset or timeout before any answer: the endpoint's fault, not the client's.
                self.0.note_endpoint(ctx, false);
                let outcome = match e.etype() {
                    ErrorType::ReadTimedout | ErrorType::WriteTimedout => "timeout",
                    _ => "connect_error",
                };
                self.0.count_attempt(ctx, outcome);
            }
            let retries = self.0.plan(ctx).map_or(0, |p| p.retries);
            let retry = ctx.attempts <= retries && self.0.has_candidate(ctx);
            e.set_retry(retry);
        }
        e
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        self.0.note_endpoint(ctx, false);
        self.0.count_attempt(ctx, "connect_error");
        // The key was never used: let it be tried again on another endpoint.
        if let Some(att) = ctx.current.as_ref() {
            let u = att.upstream;
            let k = att.key.as_ref().map_or(usize::MAX, |k| k.index());
            if let Some(pos) = ctx.tried.iter().rposition(|t| *t == (u, k)) {
                ctx.tried.remove(pos);
            }
            warn!(
                "upstream {}: cannot connect to {peer}: {:?}",
                self.0.upstreams[u].name,
                e.etype()
            );
        }
        let retries = self.0.plan(ctx).map_or(0, |p| p.retries);
        e.set_retry(ctx.attempts <= retries);
        e
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let resp = match ctx.local.take() {
            Some(r) => Some(r),
            None => match e.etype() {
                ErrorType::ConnectTimedout
                | ErrorType::ConnectRefused
                | ErrorType::ConnectNoRoute
                | ErrorType::ConnectError
                | ErrorType::TLSHandshakeFailure
                | ErrorType::TLSHandshakeTimedout
                | ErrorType::InvalidCert
                | ErrorType::HandshakeError => Some(LocalResponse::bad_gateway(
                    "Could not connect to the upstream.",
                )),
                ErrorType::ReadTimedout | ErrorType::WriteTimedout => {
                    Some(LocalResponse::gateway_timeout())
                }
                ErrorType::HTTPStatus(code) => Some(LocalResponse::new(
                    *code,
                    "upstream_error",
                    "upstream_error",
                    "The upstream request failed.",
                )),
                ErrorType::InvalidHTTPHeader if e.esource() == &ErrorSource::Upstream => Some(
                    LocalResponse::bad_request("The request headers could not be forwarded."),
                ),
                _ => match e.esource() {
                    ErrorSource::Upstream => Some(LocalResponse::bad_gateway(
                        "The upstream connection failed.",
                    )),
                    ErrorSource::Downstream => None,
                    _ => Some(LocalResponse::new(
                        500,
                        "server_error",
                        "internal_error",
                        "keygate failed to handle the request.",
                    )),
                },
            },
        };
        let Some(resp) = resp else {
            return FailToProxy {
                error_code: 0,
                can_reuse_downstream: false,
            };
        };
        if ctx.note.is_none() {
            ctx.note = Some(resp.reason());
        }
        self.0
            .metrics
            .local_responses
            .with_label_values(&[resp.reason()])
            .inc();
        if session.response_written().is_none() {
            let body = resp.body();
            if let Ok(header) = resp.header(body.len()) {
                if let Err(err) = session.write_error_response(header, body).await {
                    debug!("could not send the error response: {err}");
                }
            }
        }
        FailToProxy {
            error_code: resp.status,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        let gw = &self.0;
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let route = ctx.route.map_or("-", |r| gw.routes.get(r).name.as_str());
        let (upstream, key) = match ctx.current.as_ref() {
            Some(att) => {
                let up = &gw.upstreams[att.upstream];
                let key = att.key.as_ref().map_or("-", |k| up.keys.name(k.index()));
                (up.name.as_str(), key)
            }
            None => ("-", "-"),
        };
        let m = gw.metrics;
        let mut status_buf = itoa::Buffer::new();
        m.requests
            .with_label_values(&[route, upstream, status_buf.format(status)])
            .inc();
        m.request_duration
            .with_label_values(&[route])
            .observe(ctx.started.elapsed().as_secs_f64());
        if ctx.attempts > 1 {
            m.retries
                .with_label_values(&[route])
                .inc_by(u64::from(ctx.attempts - 1));
        }
        let client_name = ctx
            .client
            .map_or("-", |i| gw.options.clients.clients()[i].name.as_str());
        if let Some(admission) = ctx.admission.take() {
            admission.settle(ctx.usage.map(|u| u.total()));
        }
        if let Some(usage) = ctx.usage {
            let model = m.model_label(
                ctx.upstream_model
                    .as_deref()
                    .or(ctx.model.as_deref())
                    .unwrap_or("-"),
            );
            m.tokens
                .with_label_values(&[model, upstream, client_name, "prompt"])
                .inc_by(usage.prompt);
            m.tokens
                .with_label_values(&[model, upstream, client_name, "completion"])
                .inc_by(usage.completion);
        }
        if let Some(log) = gw.options.access_log.as_ref() {
            log.write(&AccessEntry {
                time: crate::access_log::now_rfc3339(),
                client: client_name,
                method: session.req_header().method.as_str(),
                path: session.req_header().uri.path(),
                route,
                model: ctx.model.as_deref().unwrap_or("-"),
                upstream,
                key,
                attempts: ctx.attempts,
                status,
                bytes: ctx.bytes_sent,
                prompt_tokens: ctx.usage.map(|u| u.prompt),
                completion_tokens: ctx.usage.map(|u| u.completion),
                ttfb_ms: ctx.ttfb.map(|d| d.as_secs_f64() * 1000.0),
                total_ms: ctx.started.elapsed().as_secs_f64() * 1000.0,
                stream: ctx.stream,
                note: ctx.note.or_else(|| e.map(|e| e.etype().as_str())),
            });
        }
        debug!(
            "{} {} model={} upstream={upstream} key={key} attempts={} status={status} ms={}",
            session.req_header().method,
            session.req_header().uri.path(),
            ctx.model.as_deref().unwrap_or("-"),
            ctx.attempts,
            ctx.started.elapsed().as_millis(),
        );
        ctx.current = None;
    }

    fn suppress_proxy_warn_log(
        &self,
        _session: &Session,
        _ctx: &RequestCtx,
        error: &Error,
        _context: pingora_proxy::ProxyWarnLogContext,
    ) -> bool {
        // keygate logs its own retries at INFO with the key's name.
        matches!(error.etype(), ErrorType::HTTPStatus(_))
    }

    fn suppress_error_log(&self, _session: &Session, ctx: &RequestCtx, error: &Error) -> bool {
        // Local answers (all keys cooling, …) are expected outcomes, and a client hanging up is
        // the client's business: neither is an error of keygate's.
        ctx.local.is_some() || error.esource() == &ErrorSource::Downstream
    }
}

fn describe_attempt(gw: &Gateway, ctx: &RequestCtx) -> (String, String) {
    match ctx.current.as_ref() {
        Some(att) => {
            let up = &gw.upstreams[att.upstream];
            let key = att.key.as_ref().map_or_else(
                || "-".to_string(),
                |k| format!("{}/{}", up.name, up.keys.name(k.index())),
            );
            (up.name.clone(), key)
        }
        None => ("-".into(), "-".into()),
    }
}
