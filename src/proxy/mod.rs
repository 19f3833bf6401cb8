//! The Pingora `ProxyHttp` glue: each hook reads the request state and calls plain-Rust logic.
//!
//! ```text
//! request_filter          read body (bounded) · model/stream · route · alias rewrite
//!                         · response cache: answer a hit, or note the miss (cached.rs)
//! upstream_peer           key from the KeyPool · endpoint from the LoadBalancer
//! upstream_request_filter client credentials out · key in · Host · base path · Content-Length
//! request_body_filter     hand Pingora the full body for this attempt
//! upstream_response_filter 429 ⇒ cool · 401/403 ⇒ disable · 5xx ⇒ retry elsewhere
//! response_filter         drop account-revealing headers
//! response_body_filter    usage · usage-chunk hiding · error scrubbing · cache capture
//! ```

pub mod body_replay;
pub mod cached;
pub mod ctx;
pub mod gateway;
pub mod owned;
pub mod respond;
pub mod routing;

use crate::access_log::AccessEntry;
use crate::error_body;
use crate::header_rules;
use crate::key_activity::AttemptEnd;
use crate::local_response::LocalResponse;
use crate::outcome::Outcome;
use crate::redact::ErrorBodyScrubber;
use crate::retry_policy::{self, Answer, AttemptResult, ClientProgress, Decision, RetryBudget};
use crate::usage::{UsageChunkStripper, UsageMeter};
use async_trait::async_trait;
use body_replay::BodyReadError;
use bytes::Bytes;
use ctx::RequestCtx;
use log::{debug, info, warn};
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorSource, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gateway::describe_attempt;
pub use gateway::{Gateway, GatewayOptions};
use routing::parse_and_route;

/// Whether the client waits for `100 Continue` before sending its body.
fn is_expect_continue(req: &RequestHeader) -> bool {
    req.headers
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// Whether an upstream response header announces an empty body.
fn has_no_body(resp: &ResponseHeader) -> bool {
    resp.headers
        .get(http::header::CONTENT_LENGTH)
        .is_some_and(|v| v.as_bytes().trim_ascii() == b"0")
}

/// How much of an answer the client has received so far.
fn client_progress(session: &Session) -> ClientProgress {
    match session.response_written() {
        None => ClientProgress::Nothing,
        Some(h) if h.status.is_informational() => ClientProgress::Interim,
        Some(_) => ClientProgress::Answering,
    }
}

/// Pingora's `ProxyHttp` wrapper around a shared [`Gateway`].
pub struct GatewayProxy(pub Arc<Gateway>);

/// keygate's answer to a body it could not take.
fn body_error_answer(e: &BodyReadError) -> LocalResponse {
    match e {
        BodyReadError::TooLarge { limit } => LocalResponse::too_large(*limit),
        BodyReadError::ChunkedTooLarge => LocalResponse::new(
            411,
            "invalid_request_error",
            "length_required",
            "Send a Content-Length header with request bodies over 64 KiB.",
        ),
        BodyReadError::TimedOut(limit) => LocalResponse::body_timeout(*limit),
        BodyReadError::Busy => LocalResponse::busy(),
        BodyReadError::Malformed(_) => {
            LocalResponse::bad_request("The request body's chunked framing is invalid.")
        }
        BodyReadError::Downstream(_) => {
            LocalResponse::bad_request("The request body could not be read.")
        }
    }
}

impl GatewayProxy {
    /// What refuses a request before its body is read: an announced body over the size limit,
    /// and the client's (or the address's) request limits.
    async fn before_body(
        &self,
        ctx: &mut RequestCtx,
        announced: Option<usize>,
    ) -> std::result::Result<(), LocalResponse> {
        let gw = &self.0;
        if announced.is_some_and(|len| len > gw.bodies.max_bytes) {
            return Err(LocalResponse::too_large(gw.bodies.max_bytes));
        }
        gw.admit_request(ctx, announced.unwrap_or(0)).await
    }

    /// Asks the retry policy about the attempt that just ended and keeps its decision there.
    fn decide(&self, session: &Session, ctx: &mut RequestCtx, result: AttemptResult) -> Decision {
        let gw = &self.0;
        let budget = gw.plan(ctx).map_or(
            RetryBudget {
                retries: 0,
                deadline: None,
            },
            |p| p.budget,
        );
        let decision = retry_policy::decide(
            result,
            client_progress(session),
            &ctx.log,
            budget,
            Instant::now(),
            || gw.has_candidate(ctx),
        );
        if let Some(att) = ctx.attempt.as_mut() {
            att.decision = Some(decision.clone());
        }
        decision
    }
}

#[async_trait]
impl ProxyHttp for GatewayProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::new()
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let gw = &self.0;
        ctx.in_flight = Some(ctx::InFlight::new(&gw.metrics.in_flight));
        if let Some(problem) = header_rules::connection_header_problem(session.req_header()) {
            gw.respond_local(session, &LocalResponse::bad_request(problem))
                .await?;
            return Ok(true);
        }
        if let Err(resp) = gw.check_access(session, ctx) {
            gw.respond_local(session, &resp).await?;
            return Ok(true);
        }
        // Answered here when upstreams declare their models; otherwise the upstream's own list
        // passes through the routes like any request.
        if !gw.options.models.is_empty()
            && session.req_header().method == http::Method::GET
            && matches!(
                session.req_header().uri.path(),
                "/v1/models" | "/v1/models/"
            )
        {
            gw.answer_models(session, ctx).await?;
            return Ok(true);
        }
        // Everything that can refuse the request without its body does so before a byte of it
        // is read (and before any `100 Continue` invites it).
        let announced = body_replay::content_length(session);
        if let Err(resp) = self.before_body(ctx, announced).await {
            gw.respond_local(session, &resp).await?;
            return Ok(true);
        }
        let has_body = !session.as_mut().is_body_empty();
        if has_body {
            // Room for the first bytes now; the rest as they arrive (see `body_budget`).
            let room = announced
                .unwrap_or(body_replay::RETRY_BUFFER_LIMIT)
                .min(crate::body_budget::FIRST_ROOM);
            let bodies = &gw.bodies;
            match bodies.budget.reserve(room, bodies.budget_wait).await {
                Some(permit) => ctx.body_permit = Some(permit),
                None => {
                    gw.respond_local(session, &LocalResponse::busy()).await?;
                    return Ok(true);
                }
            }
        }
        if is_expect_continue(session.req_header()) && !session.is_http2() {
            let cont = ResponseHeader::build(100, Some(0))?;
            session.write_response_header(Box::new(cont), false).await?;
        }
        let limits = body_replay::BodyLimits {
            max: gw.bodies.max_bytes,
            deadline: gw.bodies.timeout,
            room: ctx.body_permit.as_mut(),
            room_wait: gw.bodies.budget_wait,
        };
        let body = match body_replay::read_body(session, limits).await {
            Ok(b) => b,
            Err(BodyReadError::Downstream(e)) => return Err(e),
            // Through Pingora's error path, which closes the connection: where the next
            // request would start is unknown.
            Err(e @ BodyReadError::Malformed(_)) => {
                return Err(respond::local_error(body_error_answer(&e)))
            }
            Err(e) => {
                gw.respond_local(session, &body_error_answer(&e)).await?;
                return Ok(true);
            }
        };
        let routed = parse_and_route(gw, session.req_header(), has_body.then_some(body), ctx);
        let admitted = routed.and_then(|()| gw.admit_model(ctx, announced.unwrap_or(0)));
        if let Err(resp) = admitted {
            gw.respond_local(session, &resp).await?;
            return Ok(true);
        }
        if let Err(resp) = gw.note_objects(session.req_header(), ctx).await {
            gw.respond_local(session, &resp).await?;
            return Ok(true);
        }
        // After the limits decided the client may ask, before a key is chosen: a hit spends none.
        gw.answer_from_cache(session, ctx).await
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        // Release the previous attempt's key before choosing the next one.
        ctx.attempt = None;
        match self.0.choose(ctx) {
            Ok((attempt, peer)) => {
                ctx.attempt = Some(attempt);
                Ok(Box::new(peer))
            }
            Err(local) => Err(respond::local_error(local)),
        }
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let Some(att) = ctx.attempt.as_ref() else {
            return Error::e_explain(ErrorType::InternalError, "no attempt in progress");
        };
        let up = &self.0.upstreams[att.upstream];
        // Without a base path the client's path goes upstream unchanged: no rewrite needed.
        let path = if ctx.translate {
            // A translated chat completion goes to Anthropic's Messages endpoint.
            Some(up.upstream_path("/v1/messages"))
        } else {
            (!up.base_path.is_empty()).then(|| {
                let client_path = session
                    .req_header()
                    .uri
                    .path_and_query()
                    .map_or("/", |p| p.as_str());
                up.upstream_path(client_path)
            })
        };
        let credential = att.key_index().and_then(|k| up.credential(k));
        header_rules::prepare_upstream_request(
            upstream_request,
            up.auth,
            credential,
            &up.host_header,
            path.as_deref(),
            ctx.body.as_ref().map(Bytes::len),
        )?;
        if up.api == crate::config::Api::Anthropic {
            header_rules::ensure_anthropic_version(upstream_request)?;
        }
        Ok(())
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let (Some(full), Some(att)) = (ctx.body.as_ref(), ctx.attempt.as_mut()) else {
            return Ok(());
        };
        // Pingora hands over only its retry buffer (the tail); send keygate's full copy instead,
        // once per attempt.
        *body = if att.body_sent {
            None
        } else {
            att.body_sent = true;
            Some(full.clone())
        };
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let status = resp.status.as_u16();
        if status < 200 {
            return Ok(());
        }
        let gw = &self.0;
        let outcome = gw.judge(ctx, status, resp);
        if let Some(att) = ctx.attempt.as_mut() {
            let ttfb = att.started.elapsed();
            att.status = Some(status);
            att.ttfb = Some(ttfb);
            if let Some(h) = gw.series.ttfb(att.upstream) {
                h.observe(ttfb.as_secs_f64());
            }
        }
        gw.count_attempt(ctx, outcome.label());
        gw.note_activity(ctx, AttemptEnd::Answered(status));
        gw.note_answer(ctx, status);
        let result = AttemptResult::Answered { status, outcome };
        if self.decide(session, ctx, result) == Decision::TryElsewhere {
            let (up, key) = describe_attempt(gw, ctx);
            info!("upstream {up} key {key} answered {status}; retrying elsewhere");
            return Err(respond::try_elsewhere(status));
        }
        gw.note_owned_answer(ctx, status);
        let strip_usage = ctx.strip_usage;
        let translate = ctx.translate.then_some(ctx.translate_usage);
        let Some(att) = ctx.attempt.as_mut() else {
            return Ok(());
        };
        if status >= 400 {
            // Read as it passes: its error code says what the answer means for the key (a 401,
            // 403 or 429; an Anthropic 400 may say the key's credit balance is gone), and its
            // message becomes the key's last error.
            att.error_body = Some(bytes::BytesMut::new());
        }
        if (200..300).contains(&status) {
            let content_type = resp
                .headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if strip_usage && content_type.starts_with("text/event-stream") {
                att.stripper = Some(UsageChunkStripper::new());
            }
            att.usage_meter = Some(UsageMeter::for_response(content_type));
        }
        if status >= 300 && !matches!(outcome, Outcome::KeyRefused(_)) {
            // Relays may echo the key in an error; OpenAI names the organisation in its 429s.
            att.scrubber = Some(ErrorBodyScrubber::new(error_body::MAX_ERROR_BODY));
        }
        if matches!(outcome, Outcome::KeyRefused(_)) {
            // OpenAI's 401 bodies echo part of the key: never pass them on.
            let replacement = LocalResponse::upstream_auth_failed(status);
            if has_no_body(resp) {
                // No body will come, so no body filter runs to send the replacement: keygate
                // answers instead.
                return Err(respond::local_error(replacement));
            }
            let body = respond::body_for(session, &replacement);
            *resp = respond::header(&replacement, body.len())?;
            att.replace_body = Some(body);
        } else if let Some(include_usage) = translate {
            let content_type = resp
                .headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let created = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let translator = crate::translate::AnswerTranslator::new(
                status,
                content_type,
                created,
                include_usage,
            );
            // The answer is rewritten as it passes: its length changes.
            resp.remove_header(&http::header::CONTENT_LENGTH);
            if !session.is_http2() {
                resp.insert_header(http::header::TRANSFER_ENCODING, "chunked")?;
            }
            if !translator.is_stream() {
                resp.insert_header(http::header::CONTENT_TYPE, "application/json")?;
            }
            att.translator = Some(Box::new(translator));
        }
        gw.capture_answer(ctx, resp);
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        header_rules::sanitize_response(resp);
        cached::mark_response(resp, ctx)
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Duration>> {
        if ctx.body_permit.take().is_some() {
            // The answer is on its way to the client: no attempt will replay the body again.
            ctx.body = None;
        }
        let Some(att) = ctx.attempt.as_mut() else {
            return Ok(None);
        };
        // The upstream's own error body is read before anything replaces it.
        let mut finished_error_body = None;
        if let Some(buf) = att.error_body.as_mut() {
            if let Some(chunk) = body.as_ref() {
                let room = error_body::MAX_ERROR_BODY.saturating_sub(buf.len());
                buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            if end_of_stream {
                finished_error_body = att.error_body.take();
            }
        }
        if let Some(replacement) = att.replace_body.take() {
            *body = Some(replacement);
        } else if att.status.is_some_and(|s| s == 401 || s == 403) {
            *body = None;
        }
        if let Some(meter) = att.usage_meter.as_mut() {
            if let Some(b) = body.as_ref() {
                meter.feed(b);
            }
            if end_of_stream {
                ctx.usage = meter.finish();
            }
        }
        if let Some(ids) = att.ids.as_mut() {
            if let Some(b) = body.as_ref() {
                ids.feed(b);
            }
            if end_of_stream || ids.is_full() {
                if let Some(ids) = att.ids.take() {
                    self.0.record_created(ctx, &ids.ids());
                }
            }
        }
        let Some(att) = ctx.attempt.as_mut() else {
            return Ok(None);
        };
        if let Some(translator) = att.translator.as_mut() {
            let mut out = body.take().map(|b| translator.feed(&b)).unwrap_or_default();
            if end_of_stream {
                out.extend(translator.finish());
            }
            // An empty chunk could read as the end of a chunked body: send nothing instead.
            *body = (!out.is_empty()).then(|| Bytes::from(out));
        }
        if let Some(stripper) = att.stripper.as_mut() {
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
        let up = &self.0.upstreams[att.upstream];
        let anthropic = up.api == crate::config::Api::Anthropic;
        let secret = att
            .key_index()
            .map_or(&b""[..], |k| up.keys.secret(k).expose().as_bytes());
        if let Some(scrubber) = att.scrubber.as_mut() {
            let mut out = body.take().and_then(|chunk| scrubber.feed(&chunk, secret));
            if end_of_stream {
                if let Some(rest) = scrubber.finish(secret) {
                    out.get_or_insert_with(Vec::new).extend_from_slice(&rest);
                }
            }
            *body = out.filter(|o| !o.is_empty()).map(Bytes::from);
        }
        if let Some(b) = body.as_ref() {
            ctx.bytes_sent += b.len();
        }
        let status = att.status;
        if let (Some(buf), Some(status)) = (finished_error_body, status) {
            self.0.note_error_body(ctx, status, &buf);
            if status == 429 {
                self.0.judge_429_body(ctx, &buf);
            } else if status == 400 && anthropic {
                self.0.judge_400_body(ctx, &buf);
            } else if matches!(status, 401 | 403) {
                self.0.judge_refusal_body(ctx, status, &buf);
            }
        }
        self.0.feed_capture(ctx, body.as_ref(), end_of_stream);
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
        let decision = if respond::is_try_elsewhere(&e) {
            // upstream_response_filter asked the policy already: nothing went to the client since.
            Decision::TryElsewhere
        } else if let Some(local) = respond::carried_answer(&e) {
            // A hook decided keygate answers itself.
            Decision::Answer(Answer::Local(local.clone()))
        } else {
            let result = respond::attempt_result(&e);
            if matches!(
                result,
                AttemptResult::TimedOut | AttemptResult::Broke | AttemptResult::ConnectFailed
            ) {
                // Reset or timeout before any answer: the endpoint's fault, not the client's.
                self.0.note_endpoint(ctx, false);
                let label = if result == AttemptResult::TimedOut {
                    "timeout"
                } else {
                    "connect_error"
                };
                self.0.count_attempt(ctx, label);
                if ctx.attempt.as_ref().is_some_and(|a| a.status.is_none()) {
                    // An answer that breaks off later was counted when its header came.
                    let what = match result {
                        AttemptResult::TimedOut => "timeout",
                        AttemptResult::Broke => "connection broke",
                        _ => "connect error",
                    };
                    self.0.note_activity(ctx, AttemptEnd::NoAnswer(what));
                }
            }
            self.decide(session, ctx, result)
        };
        e.set_retry(decision == Decision::TryElsewhere);
        e
    }

    fn fail_to_connect(
        &self,
        session: &mut Session,
        peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        self.0.note_endpoint(ctx, false);
        self.0.count_attempt(ctx, "connect_error");
        self.0
            .note_activity(ctx, AttemptEnd::NoAnswer("connect error"));
        if let Some(att) = ctx.attempt.as_ref() {
            // The key was never used: let it be tried again on another endpoint.
            ctx.log.release(att.upstream, att.key_index());
            warn!(
                "upstream {}: cannot connect to {peer}: {:?}",
                self.0.upstreams[att.upstream].name,
                e.etype()
            );
        }
        let decision = self.decide(session, ctx, AttemptResult::ConnectFailed);
        e.set_retry(decision == Decision::TryElsewhere);
        e
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let stored = ctx.attempt.as_ref().and_then(|a| a.decision.clone());
        let answer = match (respond::carried_answer(e), stored) {
            (Some(local), _) => Answer::Local(local.clone()),
            (None, Some(Decision::Answer(a @ (Answer::Local(_) | Answer::Nobody)))) => a,
            // A retry was decided but could not happen, or the error came outside an attempt.
            _ => retry_policy::answer_after_failure(respond::attempt_result(e)),
        };
        let Answer::Local(resp) = answer else {
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
        if client_progress(session) != ClientProgress::Answering {
            // An interim `100 Continue` is not the answer: the real one can still be written.
            if let Err(err) = respond::write_error(session, &resp).await {
                debug!("could not send the error response: {err}");
            }
        }
        FailToProxy {
            error_code: resp.status,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        let gw = &self.0;
        let status = session
            .response_written()
            .filter(|r| !r.status.is_informational())
            .map_or(0, |r| r.status.as_u16());
        let route = ctx.route.map_or("-", |r| gw.routes.get(r).name.as_str());
        let (upstream, key) = match ctx.attempt.as_ref() {
            Some(att) => {
                let up = &gw.upstreams[att.upstream];
                let key = att.key_index().map_or("-", |k| up.keys.name(k));
                (up.name.as_str(), key)
            }
            None => ("-", "-"),
        };
        let m = gw.metrics;
        let attempts = ctx.log.attempts();
        let client_name = ctx
            .client
            .map_or("-", |i| gw.options.clients.clients()[i].name.as_str());
        // Tokens first: a scrape that sees the request counted sees its tokens too.
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
        gw.count_request(ctx, status, route, upstream);
        gw.count_cache(ctx, route);
        if attempts > 1 {
            m.retries
                .with_label_values(&[route])
                .inc_by(u64::from(attempts - 1));
        }
        if let Some(admission) = ctx.admission.take() {
            admission.settle(ctx.usage.map(|u| u.total()));
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
                attempts,
                status,
                bytes: ctx.bytes_sent,
                prompt_tokens: ctx.usage.map(|u| u.prompt),
                completion_tokens: ctx.usage.map(|u| u.completion),
                ttfb_ms: ctx
                    .attempt
                    .as_ref()
                    .and_then(|a| a.ttfb)
                    .map(|d| d.as_secs_f64() * 1000.0),
                total_ms: ctx.started.elapsed().as_secs_f64() * 1000.0,
                stream: ctx.stream,
                note: ctx.note.or_else(|| e.map(|e| e.etype().as_str())),
                cache: ctx.cache.as_ref().map(|c| c.result.as_str()),
            });
        }
        debug!(
            "{} {} model={} upstream={upstream} key={key} attempts={attempts} status={status} ms={}",
            session.req_header().method,
            session.req_header().uri.path(),
            ctx.model.as_deref().unwrap_or("-"),
            ctx.started.elapsed().as_millis(),
        );
        ctx.attempt = None;
    }

    fn suppress_proxy_warn_log(
        &self,
        _session: &Session,
        _ctx: &RequestCtx,
        error: &Error,
        _context: pingora_proxy::ProxyWarnLogContext,
    ) -> bool {
        // keygate logs its own retries at INFO with the key's name.
        respond::is_try_elsewhere(error)
    }

    fn suppress_error_log(&self, _session: &Session, _ctx: &RequestCtx, error: &Error) -> bool {
        // Local answers (all keys cooling, …) are expected outcomes, and a client hanging up is
        // the client's business: neither is an error of keygate's.
        respond::carried_answer(error).is_some() || error.esource() == &ErrorSource::Downstream
    }
}
