//! Reading what routing needs from a request (model, stream, token limit) and choosing its route,
//! with alias rewrites and stream-usage injection applied to the body that goes upstream.

use super::ctx::RequestCtx;
use super::gateway::Gateway;
use crate::config::StreamUsage;
use crate::local_response::LocalResponse;
use crate::request_body;
use crate::routes::{model_field, ModelField, MAX_MODEL_NAME};
use crate::translate;
use bytes::Bytes;
use pingora_http::RequestHeader;

/// Reads what routing needs from the request and picks the route, or says why not. `body` is
/// `None` when the request has none.
pub(crate) fn parse_and_route(
    gw: &Gateway,
    req: &RequestHeader,
    body: Option<Bytes>,
    ctx: &mut RequestCtx,
) -> std::result::Result<(), LocalResponse> {
    let has_body = body.is_some();
    let mut body = body.unwrap_or_default();
    let path = req.uri.path();
    let field = model_field(req.method.as_str(), path);
    let needs_model = field != ModelField::Absent;
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
    if ctx
        .model
        .as_deref()
        .is_some_and(|m| m.len() > MAX_MODEL_NAME)
    {
        // Model names become cooldown entries, metric labels and log fields: bound them.
        return Err(LocalResponse::bad_request(format!(
            "The model name is longer than {MAX_MODEL_NAME} bytes."
        )));
    }
    if field == ModelField::Required && ctx.model.is_none() {
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
    if gw.plans.get(idx).is_some_and(|p| !p.affinity.is_empty()) {
        // Hashed from the client's body, before any rewrite below.
        ctx.affinity = json_info
            .as_ref()
            .and_then(|i| i.affinity(&body))
            .map(|(_, hash)| hash);
    }
    if let (Some(new_model), Some(_)) = (route.rewrite_model.as_deref(), ctx.model.as_deref()) {
        if let Some(info) = json_info.as_ref() {
            body = Bytes::from(info.rewrite_model(&body, new_model));
        } else if let Some(b) =
            request_body::rewrite_multipart_field(&body, content_type, "model", new_model)
        {
            body = Bytes::from(b);
        }
        ctx.upstream_model = Some(new_model.to_string());
    }
    if let Some(t) = gw.plans.get(idx).and_then(|p| p.translate) {
        if field == ModelField::Absent || !path_is_chat(path) {
            return Err(LocalResponse::new(
                404,
                "invalid_request_error",
                "unknown_url",
                format!(
                    "This route translates only POST /v1/chat/completions, not {} {path}.",
                    req.method
                ),
            ));
        }
        let translated = translate::messages_request(&body, None, t.default_max_tokens)
            .map_err(|e| LocalResponse::bad_request(e.to_string()))?;
        body = Bytes::from(translated);
        ctx.translate = true;
        ctx.translate_usage = json_info.as_ref().is_some_and(|i| i.include_usage);
    }
    // Anthropic's streams always report usage, and its API refuses `stream_options`.
    if gw.options.stream_usage == StreamUsage::Inject
        && !ctx.translate
        && !crate::routes::is_anthropic_endpoint(path)
        && ctx.stream
        && json_info.as_ref().is_some_and(|i| !i.include_usage)
    {
        // Rescan: the body may have been rewritten above.
        if let Ok(info) = request_body::scan_json(&body) {
            body = Bytes::from(info.inject_include_usage(&body));
            ctx.strip_usage = true;
        }
    }
    ctx.body = has_body.then_some(body);
    Ok(())
}

/// Whether `path` is a chat completions endpoint (any base path; query string ignored).
fn path_is_chat(path: &str) -> bool {
    let path = path.split(['?', '#']).next().unwrap_or(path);
    path.trim_end_matches('/').ends_with("/chat/completions")
}
