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
pub mod gateway;
pub mod headers;
pub mod routing;

use crate::access_log::AccessEntry;
use crate::outcome::Outcome;
use crate::retry_after;
use crate::usage::{UsageChunkStripper, UsageMeter};
use async_trait::async_trait;
use body_replay::BodyReadError;
use bytes::Bytes;
use ctx::RequestCtx;
use errors::LocalResponse;
use log::{debug, info, warn};
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorSource, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};
use std::sync::Arc;
use std::time::Duration;

use gateway::{describe_attempt, local_error};
pub use gateway::{Gateway, GatewayOptions, RoutePlan};
use routing::parse_and_route;

/// Whether the client waits for `100 Continue` before sending its body.
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
            if let Some(h) = self.0.series.ttfb(att.upstream) {
                h.observe(ttfb.as_secs_f64());
            }
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
        gw.count_request(ctx, status, route, upstream);
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
