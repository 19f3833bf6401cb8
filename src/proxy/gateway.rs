//! The gateway's shared state and the decisions the hooks ask of it: which key and endpoint
//! take an attempt, what an upstream answer means for the key, who may get in, and how much.

use super::ctx::{Attempt, RequestCtx};
use super::respond;
use crate::access_log::AccessLog;
use crate::body_budget::BodyBudget;
use crate::clients::addr::{client_ip, CidrList, TrustedProxies};
use crate::clients::{presented_token, ClientTable, IpLimiters};
use crate::clock::SharedClock;
use crate::config::{Config, StreamUsage};
use crate::error_body::{self, Refusal};
use crate::key_activity::AttemptEnd;
use crate::keys::{Affinity, DisableReason, KeyIndex, Pick, RateReport};
use crate::local_response::LocalResponse;
use crate::metrics::{Metrics, RequestSeries};
use crate::outcome::Outcome;
use crate::prober::{Suspect, SuspectKind, SuspectSender};
use crate::retry_after;
use crate::retry_policy::RetryBudget;
use crate::routes::{RoutePlan, RouteTable};
use crate::shared::{Admitted, SharedLimits, Verdict};
use crate::strategy::{LatencyTable, RouteOrder};
use crate::upstream::{EndpointService, Upstream};
use bytes::Bytes;
use log::warn;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::Result;
use pingora_http::ResponseHeader;
use pingora_proxy::Session;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc::UnboundedReceiver;

/// The gateway: everything the hooks need, shared by all worker threads.
pub struct Gateway {
    pub(crate) upstreams: Arc<[Upstream]>,
    pub(crate) routes: RouteTable,
    pub(crate) plans: Vec<RoutePlan>,
    pub(crate) bodies: BodyRules,
    pub(crate) clock: SharedClock,
    pub(crate) suspects: SuspectSender,
    pub(crate) latency: LatencyTable,
    pub(crate) metrics: &'static Metrics,
    pub(crate) series: RequestSeries,
    pub(crate) options: GatewayOptions,
    /// Client limits shared with other instances, when `redis:` is configured.
    pub(crate) shared_limits: std::sync::OnceLock<Arc<SharedLimits>>,
    /// The accounts that own the objects keygate saw created.
    pub(crate) resources: Arc<crate::resources::Resources>,
}

/// How request bodies are taken: how large, how fast, and how many bytes at once.
#[derive(Debug, Clone)]
pub struct BodyRules {
    /// Largest body accepted (413 beyond).
    pub max_bytes: usize,
    /// The whole body must arrive within this (408 beyond).
    pub timeout: Duration,
    /// Bytes held across all requests at once.
    pub budget: BodyBudget,
    /// How long a body waits for room in the budget before its 503.
    pub budget_wait: Duration,
}

impl BodyRules {
    /// The rules of a validated config.
    pub fn of(config: &Config) -> Self {
        let capacity = config
            .max_buffered_bytes
            .unwrap_or_else(|| crate::body_budget::default_capacity(config.max_body_bytes));
        Self {
            max_bytes: config.max_body_bytes,
            timeout: config.guards.body_timeout,
            budget: BodyBudget::new(capacity).observed(std::sync::Arc::new(|held| {
                let held = i64::try_from(held).unwrap_or(i64::MAX);
                crate::metrics::global().buffered_body_bytes.set(held);
            })),
            budget_wait: crate::body_budget::DEFAULT_WAIT,
        }
    }
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
    /// Proxies whose forwarded-for header is believed.
    pub trusted_proxies: TrustedProxies,
    /// User agents answered with 403.
    pub deny_user_agents: Vec<crate::glob::Glob>,
    /// Client addresses answered with 403.
    pub deny_cidrs: CidrList,
    /// `(model, owner)` pairs for `GET /v1/models`.
    pub models: Vec<(String, String)>,
    /// The response cache, when a route has `cache:`.
    pub cache: Option<crate::cache::ResponseCache>,
}

/// A gateway built from the config, with what must run beside it.
pub struct BuiltGateway {
    /// The gateway.
    pub gateway: Arc<Gateway>,
    /// One endpoint resolver and health checker per upstream.
    pub endpoint_services: Vec<EndpointService>,
    /// Keys the proxy suspects of an empty quota, for the prober.
    pub suspects: UnboundedReceiver<Suspect>,
}

impl Gateway {
    /// Builds the upstreams, routes and plans of a validated config.
    pub fn build(config: &Config, clock: SharedClock, options: GatewayOptions) -> BuiltGateway {
        let mut upstreams = Vec::new();
        let mut endpoint_services = Vec::new();
        for u in &config.upstreams {
            let (up, service) = Upstream::build(u, clock.clone());
            upstreams.push(up);
            endpoint_services.push(service);
        }
        let routes = RouteTable::new(config.routes.iter().map(|r| r.spec.clone()).collect());
        let plans = config
            .routes
            .iter()
            .map(|r| RoutePlan {
                order: RouteOrder::new(
                    r.strategy,
                    r.upstreams.clone(),
                    r.weights.clone(),
                    r.explore,
                ),
                budget: RetryBudget {
                    retries: r.retries,
                    deadline: r.deadline,
                },
                ttfb_timeout: r.ttfb_timeout,
                translate: r.translate,
                affinity: r
                    .upstreams
                    .iter()
                    .copied()
                    .filter(|&u| {
                        r.affinity.unwrap_or(config.upstreams[u].affinity) == Affinity::Prompt
                    })
                    .collect(),
            })
            .collect();
        let (suspects, rx) = crate::prober::suspect_channel();
        let gateway = Gateway::new(
            upstreams.into(),
            routes,
            plans,
            BodyRules::of(config),
            clock,
            suspects,
            options,
        );
        BuiltGateway {
            gateway,
            endpoint_services,
            suspects: rx,
        }
    }

    /// Assembles the gateway from its parts; `plans[i]` belongs to route `i`.
    pub fn new(
        upstreams: Arc<[Upstream]>,
        routes: RouteTable,
        plans: Vec<RoutePlan>,
        bodies: BodyRules,
        clock: SharedClock,
        suspects: SuspectSender,
        options: GatewayOptions,
    ) -> Arc<Self> {
        let metrics = crate::metrics::global();
        let route_names: Vec<(&str, &[usize])> = (0..routes.len())
            .map(|i| {
                let ups = plans.get(i).map_or(&[][..], |p| p.order.upstreams());
                (routes.get(i).name.as_str(), ups)
            })
            .collect();
        let upstream_names: Vec<&str> = upstreams.iter().map(|u| u.name.as_str()).collect();
        let series = RequestSeries::new(metrics, &route_names, &upstream_names);
        Arc::new(Self {
            routes,
            plans,
            bodies,
            latency: LatencyTable::new(upstreams.len()),
            upstreams,
            resources: Arc::new(crate::resources::Resources::new(
                super::owned::MAX_IDS,
                super::owned::ID_TTL,
                clock.clone(),
            )),
            clock,
            suspects,
            metrics,
            series,
            options,
            shared_limits: std::sync::OnceLock::new(),
        })
    }

    /// Counts client limits in the store shared with other instances from now on (set once,
    /// at start).
    pub fn share_limits(&self, limits: Arc<SharedLimits>) {
        let _ = self.shared_limits.set(limits);
    }

    /// The accounts that own the objects keygate saw created (for the state file and sharing).
    pub fn resources(&self) -> &Arc<crate::resources::Resources> {
        &self.resources
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

    /// The upstreams, shared (for the background prober).
    pub fn shared_upstreams(&self) -> Arc<[Upstream]> {
        self.upstreams.clone()
    }

    /// The route plan of the request's route.
    pub(crate) fn plan(&self, ctx: &RequestCtx) -> Option<&RoutePlan> {
        ctx.route.and_then(|r| self.plans.get(r))
    }

    /// Whether some key not yet tried could take this request now.
    pub(crate) fn has_candidate(&self, ctx: &RequestCtx) -> bool {
        let Some(plan) = self.plan(ctx) else {
            return false;
        };
        plan.order.upstreams().iter().any(|&u| {
            let up = &self.upstreams[u];
            if up.keys.is_empty() {
                // An object's owner is an account, which only keys have.
                return ctx.requirement().is_none()
                    && !ctx.log.tried_upstream(u)
                    && up.pick_endpoint().is_some();
            }
            // Asks without picking: a pick would move the rotation past a key nobody used.
            self.excluded_keys(ctx, u)
                .is_some_and(|ex| up.keys.has_usable(ctx.cooldown_model(), &ex))
        })
    }

    /// Chooses the next (upstream, key, endpoint), or the local answer when none is usable.
    pub(crate) fn choose(
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
                if ctx.log.tried_upstream(u) || ctx.requirement().is_some() {
                    continue;
                }
                None
            } else {
                let Some(excluded) = self.excluded_keys(ctx, u) else {
                    continue;
                };
                match self.pick_key(plan, u, ctx, &excluded) {
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
            if let Some(lease) = &key {
                // Headroom: the request now counts against the key's limits, and a key left
                // with nothing rests before the upstream refuses its next request.
                if up
                    .keys
                    .note_sent(lease.index(), ctx.cooldown_model())
                    .started
                {
                    self.count_cooldown(up, lease.index(), "headroom");
                }
            }
            let attempt = Attempt::new(u, key, endpoint);
            ctx.log.begin(u, attempt.key_index());
            up.touch();
            return Ok((attempt, peer));
        }
        Err(if let Some(need) = ctx.requirement() {
            super::owned::owner_unavailable(need, soonest.or_else(|| self.owner_wait(need)))
        } else if let Some(wait) = soonest {
            LocalResponse::all_cooling(wait)
        } else if endpoints_down {
            LocalResponse::bad_gateway("No upstream endpoint is reachable.")
        } else {
            LocalResponse::all_disabled()
        })
    }

    /// A key of upstream `u` for the request's next attempt, none of `excluded` (the tried keys,
    /// and other accounts' keys when the request names an account's objects): by prompt
    /// affinity when the route asks it of `u` and the request yielded a hash (a retry goes to
    /// the next key in its rendezvous order), else by the upstream's key policy.
    fn pick_key(
        &self,
        plan: &RoutePlan,
        u: usize,
        ctx: &RequestCtx,
        excluded: &[KeyIndex],
    ) -> Pick {
        let keys = &self.upstreams[u].keys;
        match ctx.affinity.filter(|_| plan.affinity.contains(&u)) {
            Some(hash) => keys.pick_affine(hash, ctx.cooldown_model(), excluded),
            None => keys.pick(ctx.cooldown_model(), excluded),
        }
    }

    /// Applies what an upstream status says about the key that got it.
    pub(crate) fn judge(
        &self,
        ctx: &mut RequestCtx,
        status: u16,
        resp: &ResponseHeader,
    ) -> Outcome {
        let outcome = Outcome::of(status);
        let Some(att) = ctx.attempt.as_ref() else {
            return outcome;
        };
        let up = &self.upstreams[att.upstream];
        let Some(lease) = att.key.as_ref() else {
            return outcome;
        };
        let (u, idx) = (att.upstream, lease.index());
        let model = ctx.cooldown_model();
        match outcome {
            Outcome::Success => up.keys.on_success(idx, model),
            Outcome::RateLimited => {
                let wanted = retry_after::requested_cooldown(&resp.headers, self.clock.wall());
                let account = up
                    .keys
                    .account(idx)
                    .filter(|_| retry_after::is_org_wide_limit(&resp.headers, b"", None));
                let reason = match account {
                    Some(_) => "account_limit",
                    None => "rate_limit",
                };
                // One answer, one strike: the key's own, then the rest of its account.
                if up.keys.on_rate_limit(idx, model, wanted).started {
                    self.count_cooldown(up, idx, reason);
                }
                if let Some(account) = account {
                    for k in up.keys.cool_down_account(account, model, wanted, Some(idx)) {
                        self.count_cooldown(up, k, reason);
                    }
                }
                if wanted.is_none() {
                    // No rate-limit header: this may be an empty quota, which only the body
                    // says. The body is gone when the request is retried, so ask the prober.
                    let _ = self.suspects.send(Suspect {
                        upstream: u,
                        key: idx,
                        kind: SuspectKind::EmptyQuota,
                    });
                }
                if let Some(att) = ctx.attempt.as_mut() {
                    att.requested_cooldown = wanted;
                }
            }
            Outcome::KeyRefused(DisableReason::Forbidden) => {
                // A 403 is about permission: mostly this model (a project without access) or this
                // place (a region), seldom the key. The key rests for this model only, and a probe
                // decides whether the key itself is refused.
                up.keys.cool_down(idx, model, Some(up.probe_interval));
                self.count_cooldown(up, idx, DisableReason::Forbidden.as_str());
                let _ = self.suspects.send(Suspect {
                    upstream: att.upstream,
                    key: idx,
                    kind: SuspectKind::Refused,
                });
            }
            Outcome::KeyRefused(reason) => {
                if up.keys.disable(idx, reason) {
                    self.count_cooldown(up, idx, reason.as_str());
                }
            }
            Outcome::ServerError | Outcome::ClientError => {}
        }
        // After the 429 handling, so that a 429's own cooldown counts as the 429's.
        let report = RateReport::from_headers(&resp.headers, self.clock.wall());
        if !report.is_empty()
            && up
                .keys
                .note_limits(idx, ctx.cooldown_model(), &report)
                .started
        {
            self.count_cooldown(up, idx, "headroom");
        }
        outcome
    }

    /// Counts a key leaving rotation in `keygate_key_cooldowns_total`.
    pub(crate) fn count_cooldown(&self, up: &Upstream, key: usize, reason: &str) {
        self.metrics
            .cooldowns
            .with_label_values(&[up.name.as_str(), up.keys.name(key), reason])
            .inc();
    }

    /// Counts the current attempt's outcome in `keygate_upstream_attempts_total`.
    pub(crate) fn count_attempt(&self, ctx: &RequestCtx, outcome: &str) {
        let Some(att) = ctx.attempt.as_ref() else {
            return;
        };
        let resolved = if outcome == Outcome::Success.label() {
            self.series.attempt_ok(att.upstream)
        } else {
            None
        };
        match resolved {
            Some(counter) => counter.inc(),
            None => {
                let up = self.upstreams[att.upstream].name.as_str();
                self.metrics
                    .attempts
                    .with_label_values(&[up, outcome])
                    .inc();
            }
        }
    }

    /// Records how the current attempt ended in its key's activity (for the admin API).
    pub(crate) fn note_activity(&self, ctx: &RequestCtx, end: AttemptEnd<'_>) {
        let Some(att) = ctx.attempt.as_ref() else {
            return;
        };
        if let Some(idx) = att.key_index() {
            self.upstreams[att.upstream].activity.record(idx, end);
        }
    }

    /// Gives the current attempt's key its last error's message, read from the upstream's error
    /// `body` (masked there: the body may echo the key).
    pub(crate) fn note_error_body(&self, ctx: &RequestCtx, status: u16, body: &[u8]) {
        let Some(att) = ctx.attempt.as_ref() else {
            return;
        };
        let Some(idx) = att.key_index() else {
            return;
        };
        let up = &self.upstreams[att.upstream];
        let secret = up.keys.secret(idx).expose().as_bytes();
        up.activity.note_error_body(idx, status, body, secret);
    }

    /// Counts a finished request in `keygate_requests_total` and its duration; `route` and
    /// `upstream` are the label values (`-` when there was none).
    pub(crate) fn count_request(&self, ctx: &RequestCtx, status: u16, route: &str, upstream: &str) {
        let resolved = match (status, ctx.route, ctx.attempt.as_ref()) {
            (200, Some(r), Some(att)) => self.series.request_ok(r, att.upstream),
            _ => None,
        };
        match resolved {
            Some(counter) => counter.inc(),
            None => {
                let mut status_buf = itoa::Buffer::new();
                self.metrics
                    .requests
                    .with_label_values(&[route, upstream, status_buf.format(status)])
                    .inc();
            }
        }
        let elapsed = ctx.started.elapsed().as_secs_f64();
        match ctx.route.and_then(|r| self.series.duration(r)) {
            Some(h) => h.observe(elapsed),
            None => self
                .metrics
                .request_duration
                .with_label_values(&[route])
                .observe(elapsed),
        }
    }

    /// Who is asking: denied addresses and agents, and (with clients) a valid gateway token.
    pub(crate) fn check_access(
        &self,
        session: &Session,
        ctx: &mut RequestCtx,
    ) -> std::result::Result<(), LocalResponse> {
        let o = &self.options;
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

    /// The client's (or the IP's) limits, checked before the body is read: the token estimate
    /// starts from the announced body size and is completed by [`Gateway::admit_model`].
    pub(crate) async fn admit_request(
        &self,
        ctx: &mut RequestCtx,
        announced_len: usize,
    ) -> std::result::Result<(), LocalResponse> {
        let o = &self.options;
        let client = ctx.client.map(|i| &o.clients.clients()[i]);
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
        let estimate = token_estimate(announced_len, None);
        let shared = self.shared_limits.get().zip(ctx.client);
        let admitted = match shared {
            None => limiter.admit(estimate).map(Admitted::local),
            Some((shared, i)) => match shared.admit(i, estimate).await {
                Verdict::Admitted(a) => Ok(a),
                Verdict::Refused(r) => Err(r),
                // Redis is away: this instance admits its share of the limits on its own.
                Verdict::Unavailable(_) => match shared.fallback(i) {
                    Some(local) => local.admit(estimate).map(|admission| Admitted::Local {
                        admission,
                        shared: Some((shared.clone(), i)),
                    }),
                    None => limiter.admit(estimate).map(Admitted::local),
                },
            },
        };
        match admitted {
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

    /// Once the body is known: the client's model permission, and the rest of the token estimate
    /// (what the answer may use) charged to its limits.
    pub(crate) fn admit_model(
        &self,
        ctx: &mut RequestCtx,
        announced_len: usize,
    ) -> std::result::Result<(), LocalResponse> {
        let o = &self.options;
        let client = ctx.client.map(|i| &o.clients.clients()[i]);
        if let (Some(c), Some(model)) = (client, ctx.model.as_deref()) {
            if !c.allows(model) {
                return Err(LocalResponse::model_not_allowed(model));
            }
        }
        let full = token_estimate(ctx.body_len(), ctx.max_tokens);
        if let Some(admission) = ctx.admission.as_mut() {
            admission.add_tokens(full.saturating_sub(token_estimate(announced_len, None)));
        }
        Ok(())
    }

    /// `GET /v1/models`: the models this client can reach through the routes.
    pub(crate) async fn answer_models(
        &self,
        session: &mut Session,
        ctx: &RequestCtx,
    ) -> Result<()> {
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

    /// Feeds an upstream answer to outlier ejection (whose policy decides whether `status`
    /// counts against the endpoint) and the latency table (where any server error penalises).
    pub(crate) fn note_answer(&self, ctx: &RequestCtx, status: u16) {
        let Some(att) = ctx.attempt.as_ref() else {
            return;
        };
        let up = &self.upstreams[att.upstream];
        up.endpoint_answered(&att.endpoint, status);
        if Outcome::of(status) == Outcome::ServerError {
            self.latency.penalize(att.upstream);
        } else {
            self.latency.record(att.upstream, att.started.elapsed());
        }
    }

    /// Feeds an attempt's network result to outlier ejection and the latency table: `ok` false
    /// for a connect error, a timeout or a broken connection.
    pub(crate) fn note_endpoint(&self, ctx: &RequestCtx, ok: bool) {
        let Some(att) = ctx.attempt.as_ref() else {
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
    /// organisation-wide limit rests every other key of its account as long as the 429 asked
    /// (its own cooldown was set by [`Gateway::judge`]; one answer is one strike).
    pub(crate) fn judge_429_body(&self, ctx: &RequestCtx, body: &[u8]) {
        let Some(att) = ctx.attempt.as_ref() else {
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
                let (model, wanted) = (ctx.cooldown_model(), att.requested_cooldown);
                for k in up.keys.cool_down_account(account, model, wanted, Some(idx)) {
                    self.count_cooldown(up, k, "account_limit");
                }
            }
        }
    }

    /// An Anthropic 400 that says the credit balance is too low is the key's, not the request's:
    /// the key leaves rotation for every model until a probe finds credit again. The client
    /// gets this one 400 (the body is only read as it passes); later requests use other keys.
    pub(crate) fn judge_400_body(&self, ctx: &RequestCtx, body: &[u8]) {
        let Some(att) = ctx.attempt.as_ref() else {
            return;
        };
        let Some(idx) = att.key_index() else {
            return;
        };
        let up = &self.upstreams[att.upstream];
        if error_body::is_credit_exhausted(body)
            && up.keys.disable(idx, DisableReason::InsufficientQuota)
        {
            warn!(
                "key {}/{}: Anthropic says its credit balance is too low (400)",
                up.name,
                up.keys.name(idx)
            );
            self.count_cooldown(up, idx, DisableReason::InsufficientQuota.as_str());
        }
    }

    /// A 401/403 that reaches the client can be read: a body that blames the request clears the
    /// key's disable (it rests for this model only); one that blames the key disables it.
    pub(crate) fn judge_refusal_body(&self, ctx: &RequestCtx, status: u16, body: &[u8]) {
        let Some(att) = ctx.attempt.as_ref() else {
            return;
        };
        let Some(idx) = att.key_index() else {
            return;
        };
        let up = &self.upstreams[att.upstream];
        match (status, error_body::refusal(body)) {
            (401, Refusal::Request) => {
                up.keys.enable(idx);
                up.keys
                    .cool_down(idx, ctx.cooldown_model(), Some(up.probe_interval));
            }
            (403, Refusal::Key) if up.keys.disable(idx, DisableReason::Forbidden) => {
                self.count_cooldown(up, idx, DisableReason::Forbidden.as_str());
            }
            _ => {}
        }
    }

    pub(crate) async fn respond_local(
        &self,
        session: &mut Session,
        resp: &LocalResponse,
    ) -> Result<()> {
        self.metrics
            .local_responses
            .with_label_values(&[resp.reason()])
            .inc();
        respond::write(session, resp).await
    }
}

/// A request's token estimate before its answer: OpenAI's rule of thumb of about 4 bytes a token
/// for the prompt, plus what the answer may use. Saturates: `max_tokens` is the client's number.
pub(crate) fn token_estimate(body_len: usize, max_tokens: Option<u64>) -> u64 {
    (body_len as u64)
        .div_ceil(4)
        .saturating_add(max_tokens.unwrap_or(0))
}

/// (upstream, upstream/key) names of the current attempt, for logs.
pub(crate) fn describe_attempt(gw: &Gateway, ctx: &RequestCtx) -> (String, String) {
    match ctx.attempt.as_ref() {
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::config::source::MemorySource;

    const TWO_KEYS: &str = "listen: [ { addr: 127.0.0.1:8080 } ]\nupstreams:\n  up:\n    url: http://127.0.0.1:9\n    health: { enabled: false }\n    keys: [ { name: a, env: KA }, { name: b, env: KB } ]\nroutes:\n  - { upstreams: [up] }\n";

    static ONE_ACCOUNT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        TWO_KEYS
            .replace("env: KA }", "env: KA, account: org-1 }")
            .replace("env: KB }", "env: KB, account: org-1 }")
    });

    /// The config of [`TWO_KEYS`] without its second key.
    fn one_key() -> String {
        TWO_KEYS.replace(", { name: b, env: KB }", "")
    }

    /// A gateway on `yaml` (keys `KA`, `KB` set) whose endpoints are resolved, on a manual clock.
    async fn gateway(yaml: &str) -> (Arc<Gateway>, Arc<ManualClock>) {
        let (gw, clock, _) = gateway_with_suspects(yaml).await;
        (gw, clock)
    }

    /// Like [`gateway`], keeping what the gateway tells the prober.
    async fn gateway_with_suspects(
        yaml: &str,
    ) -> (Arc<Gateway>, Arc<ManualClock>, UnboundedReceiver<Suspect>) {
        let source = MemorySource::new()
            .with_env("KA", "sk-test-a")
            .with_env("KB", "sk-test-b")
            .with_env("KC", "sk-test-c");
        let config =
            crate::config::load_str_with(std::path::Path::new("test.yaml"), yaml, &source).unwrap();
        let clock = ManualClock::new();
        let built = Gateway::build(&config, clock.clone(), GatewayOptions::default());
        for up in built.gateway.upstreams() {
            up.endpoints.update().await.unwrap();
        }
        (built.gateway, clock, built.suspects)
    }

    fn request(model: &str) -> RequestCtx {
        let mut ctx = RequestCtx::new();
        ctx.route = Some(0);
        ctx.model = Some(model.to_string());
        ctx
    }

    /// Chooses an attempt for `ctx` and keeps it there, as `upstream_peer` does.
    fn attempt(gw: &Gateway, ctx: &mut RequestCtx) -> Result<String, LocalResponse> {
        ctx.attempt = None;
        let (att, _peer) = gw.choose(ctx)?;
        let name = gw.upstreams[att.upstream]
            .keys
            .name(att.key_index().unwrap())
            .to_string();
        ctx.attempt = Some(att);
        Ok(name)
    }

    fn answer(status: u16, headers: &[(&str, &str)]) -> ResponseHeader {
        let mut h = ResponseHeader::build(status, None).unwrap();
        for (k, v) in headers {
            h.insert_header(k.to_string(), *v).unwrap();
        }
        h
    }

    #[tokio::test]
    async fn each_attempt_lands_in_its_keys_activity_with_the_error_message_masked() {
        let (gw, clock) = gateway(TWO_KEYS).await;
        let up = &gw.upstreams()[0];
        let (a, b) = (
            up.keys.index_of("a").unwrap(),
            up.keys.index_of("b").unwrap(),
        );
        let key_of = |status: u16| {
            let mut ctx = request("gpt-4o");
            let name = attempt(&gw, &mut ctx).unwrap();
            gw.judge(&mut ctx, status, &answer(status, &[]));
            gw.note_activity(&ctx, AttemptEnd::Answered(status));
            (name, ctx)
        };
        // Round robin: one key answers 200, the other 401 with a body that echoes its secret.
        let (first, _) = key_of(200);
        let (second, ctx) = key_of(401);
        assert_eq!((first.as_str(), second.as_str()), ("a", "b"));
        let body = br#"{"error":{"message":"Incorrect API key provided: sk-test-b","code":"invalid_api_key"}}"#;
        gw.note_error_body(&ctx, 401, body);
        // The next attempt on key a never connects.
        let mut ctx = request("gpt-4o");
        attempt(&gw, &mut ctx).unwrap();
        gw.note_activity(&ctx, AttemptEnd::NoAnswer("connect error"));
        clock.advance(Duration::from_millis(250));

        let va = up.activity.snapshot(a);
        assert_eq!((va.requests_1m, va.errors_1m), (2, 1));
        let err = va.last_error.unwrap();
        assert_eq!((err.status, err.message.as_str()), (None, "connect error"));
        let vb = up.activity.snapshot(b);
        assert_eq!((vb.requests_1m, vb.errors_1m, vb.requests_1h), (1, 1, 1));
        assert_eq!(vb.last_used_ms_ago, Some(250));
        let err = vb.last_error.unwrap();
        assert_eq!(err.status, Some(401));
        assert!(
            err.message.starts_with("Incorrect API key provided: "),
            "{}",
            err.message
        );
        assert!(!err.message.contains("sk-test-b"), "{}", err.message);
    }

    #[tokio::test]
    async fn a_request_never_gets_the_same_key_twice_and_then_has_no_candidate() {
        let (gw, _) = gateway(TWO_KEYS).await;
        let mut ctx = request("gpt-4o");
        let first = attempt(&gw, &mut ctx).unwrap();
        assert!(gw.has_candidate(&ctx));
        let second = attempt(&gw, &mut ctx).unwrap();
        assert_ne!(first, second);
        assert_eq!(ctx.log.attempts(), 2);
        assert!(!gw.has_candidate(&ctx), "both keys tried");
    }

    #[tokio::test]
    async fn keys_all_cooling_get_a_local_429_with_the_shortest_wait() {
        let (gw, _) = gateway(TWO_KEYS).await;
        for wait in ["7", "3"] {
            let mut ctx = request("gpt-4o");
            attempt(&gw, &mut ctx).unwrap();
            let outcome = gw.judge(&mut ctx, 429, &answer(429, &[("retry-after", wait)]));
            assert_eq!(outcome, Outcome::RateLimited);
        }
        let err = attempt(&gw, &mut request("gpt-4o")).unwrap_err();
        assert_eq!(err.status, 429);
        assert_eq!(err.retry_after, Some(3));
    }

    #[tokio::test]
    async fn a_429_rests_the_key_for_its_model_only_and_ends_on_time() {
        let (gw, clock) = gateway(TWO_KEYS).await;
        let mut ctx = request("gpt-4o");
        let limited = attempt(&gw, &mut ctx).unwrap();
        gw.judge(&mut ctx, 429, &answer(429, &[("retry-after", "2")]));
        for _ in 0..4 {
            assert_ne!(attempt(&gw, &mut request("gpt-4o")).unwrap(), limited);
        }
        let other_model: Vec<String> = (0..4)
            .map(|_| attempt(&gw, &mut request("gpt-4o-mini")).unwrap())
            .collect();
        assert!(other_model.contains(&limited), "{other_model:?}");
        clock.advance(Duration::from_millis(2001));
        let after: Vec<String> = (0..4)
            .map(|_| attempt(&gw, &mut request("gpt-4o")).unwrap())
            .collect();
        assert!(after.contains(&limited), "back after its rest: {after:?}");
    }

    #[tokio::test]
    async fn an_answer_reporting_its_last_request_rests_the_key_until_the_reset() {
        let (gw, clock) = gateway(TWO_KEYS).await;
        let mut ctx = request("gpt-4o");
        let spent = attempt(&gw, &mut ctx).unwrap();
        let outcome = gw.judge(
            &mut ctx,
            200,
            &answer(
                200,
                &[
                    ("x-ratelimit-limit-requests", "60"),
                    ("x-ratelimit-remaining-requests", "0"),
                    ("x-ratelimit-reset-requests", "3s"),
                ],
            ),
        );
        assert_eq!(outcome, Outcome::Success);
        for _ in 0..4 {
            assert_ne!(attempt(&gw, &mut request("gpt-4o")).unwrap(), spent);
        }
        let other_model: Vec<String> = (0..4)
            .map(|_| attempt(&gw, &mut request("gpt-4o-mini")).unwrap())
            .collect();
        assert!(other_model.contains(&spent), "{other_model:?}");
        let up = &gw.upstreams()[0];
        let idx = up.keys.index_of(&spent).unwrap();
        let rested = gw
            .metrics
            .cooldowns
            .with_label_values(&[up.name.as_str(), spent.as_str(), "headroom"])
            .get();
        assert_eq!(rested, 1, "counted as a headroom rest");
        assert_eq!(up.keys.headroom(idx, "gpt-4o"), 0);
        clock.advance(Duration::from_millis(3001));
        let after: Vec<String> = (0..4)
            .map(|_| attempt(&gw, &mut request("gpt-4o")).unwrap())
            .collect();
        assert!(after.contains(&spent), "back after the reset: {after:?}");
    }

    #[tokio::test]
    async fn a_401_disables_the_key_for_every_model_and_503_follows_when_none_is_left() {
        let (gw, _) = gateway(&one_key()).await;
        let mut ctx = request("gpt-4o");
        attempt(&gw, &mut ctx).unwrap();
        let outcome = gw.judge(&mut ctx, 401, &answer(401, &[]));
        assert_eq!(outcome, Outcome::KeyRefused(DisableReason::Unauthorized));
        for model in ["gpt-4o", "gpt-4o-mini"] {
            let err = attempt(&gw, &mut request(model)).unwrap_err();
            assert_eq!(err.status, 503, "{model}");
        }
    }

    #[tokio::test]
    async fn a_403_rests_the_key_for_its_model_only_and_asks_the_prober_about_the_key() {
        let (gw, _, mut suspects) = gateway_with_suspects(TWO_KEYS).await;
        let mut ctx = request("gpt-4o");
        let refused = attempt(&gw, &mut ctx).unwrap();
        let outcome = gw.judge(&mut ctx, 403, &answer(403, &[]));
        assert_eq!(outcome, Outcome::KeyRefused(DisableReason::Forbidden));
        let suspect = suspects.try_recv().unwrap();
        assert_eq!(suspect.kind, SuspectKind::Refused);
        for _ in 0..4 {
            assert_ne!(attempt(&gw, &mut request("gpt-4o")).unwrap(), refused);
        }
        let other_model: Vec<String> = (0..4)
            .map(|_| attempt(&gw, &mut request("gpt-4o-mini")).unwrap())
            .collect();
        assert!(other_model.contains(&refused), "{other_model:?}");
    }

    #[tokio::test]
    async fn a_passed_on_401_that_blames_the_request_gives_the_key_back() {
        let (gw, _) = gateway(&one_key()).await;
        let mut ctx = request("gpt-4o");
        attempt(&gw, &mut ctx).unwrap();
        gw.judge(&mut ctx, 401, &answer(401, &[]));
        assert_eq!(
            attempt(&gw, &mut request("gpt-4o")).unwrap_err().status,
            503
        );
        let body = br#"{"error":{"message":"OpenAI-Organization header should match organization for API key","type":"invalid_request_error","code":"mismatched_organization"}}"#;
        gw.judge_refusal_body(&ctx, 401, body);
        assert_eq!(
            attempt(&gw, &mut request("gpt-4o-mini")).unwrap(),
            "a",
            "usable again for other models"
        );
        assert_eq!(
            attempt(&gw, &mut request("gpt-4o")).unwrap_err().status,
            429,
            "rests for the refused model"
        );
    }

    #[tokio::test]
    async fn a_passed_on_403_that_blames_the_key_disables_it() {
        let (gw, _) = gateway(&one_key()).await;
        let mut ctx = request("gpt-4o");
        attempt(&gw, &mut ctx).unwrap();
        gw.judge(&mut ctx, 403, &answer(403, &[]));
        let body = br#"{"error":{"message":"Incorrect API key provided","type":"invalid_request_error","code":"invalid_api_key"}}"#;
        gw.judge_refusal_body(&ctx, 403, body);
        assert_eq!(
            attempt(&gw, &mut request("gpt-4o-mini"))
                .unwrap_err()
                .status,
            503
        );
    }

    /// [`one_key`] on an Anthropic upstream.
    fn one_anthropic_key() -> String {
        one_key().replace(
            "    url: http://127.0.0.1:9\n",
            "    url: http://127.0.0.1:9\n    api: anthropic\n",
        )
    }

    #[tokio::test]
    async fn an_anthropic_credit_400_disables_the_key_for_every_model() {
        let yaml = one_anthropic_key();
        assert!(yaml.contains("api: anthropic"));
        let (gw, _) = gateway(&yaml).await;
        let mut ctx = request("claude-sonnet-4-5");
        attempt(&gw, &mut ctx).unwrap();
        assert_eq!(
            gw.judge(&mut ctx, 400, &answer(400, &[])),
            Outcome::ClientError
        );
        let other = br#"{"type":"error","error":{"type":"invalid_request_error","message":"max_tokens: Field required"}}"#;
        gw.judge_400_body(&ctx, other);
        assert_eq!(
            attempt(&gw, &mut request("claude-sonnet-4-5")).unwrap(),
            "a"
        );
        let credit = br#"{"type":"error","error":{"type":"invalid_request_error","message":"Your credit balance is too low to access the Anthropic API. Please go to Plans & Billing to upgrade or purchase credits."}}"#;
        gw.judge_400_body(&ctx, credit);
        for model in ["claude-sonnet-4-5", "claude-haiku-4-5"] {
            assert_eq!(
                attempt(&gw, &mut request(model)).unwrap_err().status,
                503,
                "{model}"
            );
        }
    }

    #[tokio::test]
    async fn an_anthropic_529_is_the_services_overload_not_the_keys() {
        let (gw, _) = gateway(&one_anthropic_key()).await;
        let mut ctx = request("claude-sonnet-4-5");
        attempt(&gw, &mut ctx).unwrap();
        let outcome = gw.judge(&mut ctx, 529, &answer(529, &[("retry-after", "30")]));
        assert_eq!(outcome, Outcome::ServerError);
        assert!(outcome.worth_retrying());
        assert_eq!(
            attempt(&gw, &mut request("claude-sonnet-4-5")).unwrap(),
            "a"
        );
    }

    #[tokio::test]
    async fn an_anthropic_429_rests_the_key_until_the_exhausted_limit_resets() {
        let (gw, clock) = gateway(&one_anthropic_key()).await;
        let mut ctx = request("claude-sonnet-4-5");
        attempt(&gw, &mut ctx).unwrap();
        let reset =
            jiff::Timestamp::try_from(crate::clock::Clock::wall(&*clock) + Duration::from_secs(40))
                .unwrap()
                .to_string();
        let outcome = gw.judge(
            &mut ctx,
            429,
            &answer(
                429,
                &[
                    ("anthropic-ratelimit-tokens-remaining", "0"),
                    ("anthropic-ratelimit-tokens-reset", reset.as_str()),
                ],
            ),
        );
        assert_eq!(outcome, Outcome::RateLimited);
        let err = attempt(&gw, &mut request("claude-sonnet-4-5")).unwrap_err();
        assert_eq!(err.status, 429);
        let wait = err.retry_after.unwrap();
        assert!((39..=41).contains(&wait), "{wait}");
    }

    #[tokio::test]
    async fn an_upstream_without_keys_is_tried_once_per_request() {
        let yaml = "listen: [ { addr: 127.0.0.1:8080 } ]\nupstreams:\n  open:\n    url: http://127.0.0.1:9\n    auth: none\n    health: { enabled: false }\nroutes:\n  - { upstreams: [open] }\n";
        let (gw, _) = gateway(yaml).await;
        let mut ctx = request("gpt-4o");
        let (att, _) = gw.choose(&mut ctx).unwrap();
        assert!(att.key.is_none());
        ctx.attempt = Some(att);
        assert!(!gw.has_candidate(&ctx));
    }

    #[test]
    fn the_token_estimate_never_overflows() {
        assert_eq!(token_estimate(400, Some(100)), 200);
        assert_eq!(token_estimate(1, None), 1);
        assert_eq!(token_estimate(usize::MAX, Some(u64::MAX)), u64::MAX);
        assert_eq!(token_estimate(8, Some(u64::MAX - 1)), u64::MAX);
    }

    const ORG_WIDE_BODY: &[u8] = br#"{"error":{"message":"Rate limit reached for gpt-4o in organization org-x on requests per min","type":"requests","code":"rate_limit_exceeded"}}"#;

    /// The remaining cooldowns of key `name` of the first upstream, by model.
    fn cooldowns(gw: &Gateway, name: &str) -> Vec<(Option<String>, Duration)> {
        let keys = &gw.upstreams[0].keys;
        match &keys.status()[keys.index_of(name).unwrap()].state {
            crate::keys::KeyState::Cooling { cooldowns } => cooldowns
                .iter()
                .map(|c| (c.model.clone(), c.remaining))
                .collect(),
            _ => Vec::new(),
        }
    }

    #[tokio::test]
    async fn an_account_wide_429_rests_every_key_of_the_account_as_long_as_asked() {
        let (gw, clock) = gateway(&ONE_ACCOUNT).await;
        let mut ctx = request("gpt-4o");
        attempt(&gw, &mut ctx).unwrap();
        // The 429 passes through (nothing left to retry): its body says organisation-wide.
        gw.judge(&mut ctx, 429, &answer(429, &[("retry-after", "30")]));
        gw.judge_429_body(&ctx, ORG_WIDE_BODY);
        clock.advance(Duration::from_secs(3));
        for name in ["a", "b"] {
            let left = cooldowns(&gw, name);
            assert_eq!(left.len(), 1, "{name}: {left:?}");
            assert_eq!(left[0].1, Duration::from_secs(27), "{name}");
        }
        let err = attempt(&gw, &mut request("gpt-4o")).unwrap_err();
        assert_eq!((err.status, err.retry_after), (429, Some(27)));
    }

    #[tokio::test]
    async fn the_429_that_passes_through_is_one_strike_for_its_key() {
        let (gw, _) = gateway(&ONE_ACCOUNT).await;
        let mut ctx = request("gpt-4o");
        let limited = attempt(&gw, &mut ctx).unwrap();
        gw.judge(&mut ctx, 429, &answer(429, &[]));
        gw.judge_429_body(&ctx, ORG_WIDE_BODY);
        // No header: every key of the account gets the first backoff step, once.
        for name in ["a", "b"] {
            let left = cooldowns(&gw, name);
            assert_eq!(
                left,
                vec![(Some("gpt-4o".to_string()), Duration::from_secs(1))],
                "{name} (the limited key is {limited})"
            );
        }
    }

    #[tokio::test]
    async fn asking_for_a_candidate_between_attempts_leaves_the_rotation_alone() {
        let yaml = TWO_KEYS.replace(
            "{ name: b, env: KB }",
            "{ name: b, env: KB }, { name: c, env: KC }",
        );
        let (gw, _) = gateway(&yaml).await;
        let order: Vec<String> = (0..6)
            .map(|_| {
                let mut ctx = request("gpt-4o");
                let name = attempt(&gw, &mut ctx).unwrap();
                // The retry policy asks this after an attempt fails.
                assert!(gw.has_candidate(&ctx));
                name
            })
            .collect();
        assert_eq!(order, ["a", "b", "c", "a", "b", "c"]);
    }

    #[tokio::test]
    async fn an_unrouted_request_cannot_be_sent() {
        let (gw, _) = gateway(TWO_KEYS).await;
        let mut ctx = RequestCtx::new();
        assert!(gw.choose(&mut ctx).is_err());
        assert!(!gw.has_candidate(&ctx));
    }
}
