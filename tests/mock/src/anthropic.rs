//! Anthropic's Messages API: `POST /v1/messages` (JSON and the typed event stream) and
//! `POST /v1/messages/count_tokens`, with Anthropic's authentication, error shapes and
//! rate-limit headers, written from Anthropic's documented formats.
//!
//! Keys behave as their spec says, in Anthropic's words: `rate_limit` is a 429
//! `rate_limit_error` (with `retry-after` and, for `reset_in`, `anthropic-ratelimit-*`),
//! `unauthorized` a 401 `authentication_error`, `forbidden` a 403 `permission_error`,
//! `insufficient_quota` Anthropic's 400 "credit balance is too low", `server_error` with status
//! 529 an `overloaded_error`. A request whose `tool_choice` forces a tool (`tool`, or `any`: the
//! first tool) gets a call of it with `{"city": "Paris"}`, whole or streamed; one with
//! `thinking` enabled gets a thinking block before its text.

use std::borrow::Cow;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::RETRY_AFTER;
use http::{HeaderMap, HeaderValue, StatusCode};
use serde::Deserialize;
use serde_json::json;

use crate::behavior::{Behavior, Mode, RateLimit};
use crate::body::MockBody;
use crate::event_list::EventList;
use crate::limits;
use crate::openai;
use crate::registry::Action;
use crate::reply;
use crate::request::{Endpoint, MockOptions};
use crate::service::App;

/// The message Anthropic sends with an exhausted prepaid balance.
pub const CREDIT_TOO_LOW: &str = "Your credit balance is too low to access the Anthropic API. \
     Please go to Plans & Billing to upgrade or purchase credits.";

/// The fields of a Messages request the mock reads.
#[derive(Deserialize, Debug, Default)]
struct MessagesRequest<'a> {
    #[serde(borrow)]
    model: Option<Cow<'a, str>>,
    stream: Option<bool>,
    max_tokens: Option<u64>,
    mock: Option<MockOptions>,
    tools: Option<Vec<ToolDef>>,
    tool_choice: Option<ToolChoice>,
    thinking: Option<Thinking>,
}

/// `thinking`: when enabled, the mock thinks (a fixed thought) before it answers.
#[derive(Deserialize, Debug)]
struct Thinking {
    #[serde(rename = "type")]
    kind: String,
}

/// The mock's thought, when asked to think.
const THOUGHT: &str = "The user says hi; a short greeting back will do.";

/// A tool the request offers (only its name matters to the mock).
#[derive(Deserialize, Debug)]
struct ToolDef {
    name: String,
}

/// `tool_choice`: `any` or `tool` makes the mock call a tool instead of writing text.
#[derive(Deserialize, Debug)]
struct ToolChoice {
    #[serde(rename = "type")]
    kind: String,
    name: Option<String>,
}

impl MessagesRequest<'_> {
    /// The tool the request forces (`tool_choice` `tool`, or `any`: the first tool offered).
    fn forced_tool(&self) -> Option<String> {
        let choice = self.tool_choice.as_ref()?;
        match choice.kind.as_str() {
            "tool" => choice.name.clone(),
            "any" => self.tools.as_ref()?.first().map(|t| t.name.clone()),
            _ => None,
        }
    }
}

/// What one Anthropic request came to, for the service to record.
pub struct Answer {
    /// The reply.
    pub response: http::Response<MockBody>,
    /// The delay before it.
    pub latency: Duration,
    /// The `x-api-key` as received (`""` when none).
    pub key: String,
    /// The model the body named.
    pub model: Option<String>,
}

/// `{"type":"error","error":{"type","message"}}`.
pub fn error(kind: &str, message: &str) -> Bytes {
    Bytes::from(json!({"type": "error", "error": {"type": kind, "message": message}}).to_string())
}

/// Answers one request to an Anthropic endpoint, in Anthropic's order: the key, the version
/// header, the body, then the key's behaviour.
pub fn answer(
    app: &App,
    endpoint: &Endpoint,
    headers: &HeaderMap,
    body: &[u8],
    n: u64,
    now: SystemTime,
    at: Instant,
) -> Answer {
    let key = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .map(str::to_string);
    let parsed = serde_json::from_slice::<MessagesRequest<'_>>(body);
    let model = parsed
        .as_ref()
        .ok()
        .and_then(|r| r.model.as_deref().map(str::to_string));
    let mut out = Answer {
        response: reply::json(StatusCode::OK, Bytes::new()),
        latency: app.default_latency,
        key: key.clone().unwrap_or_default(),
        model: model.clone(),
    };
    let Some(key) = key else {
        out.response = reply::json(
            StatusCode::UNAUTHORIZED,
            error("authentication_error", "x-api-key header is required"),
        );
        return out;
    };
    if headers.get("anthropic-version").is_none() {
        out.response = reply::json(
            StatusCode::BAD_REQUEST,
            error(
                "invalid_request_error",
                "anthropic-version: header is required",
            ),
        );
        return out;
    }
    let decision = app.registry.decide(&key, model.as_deref(), at);
    out.latency = decision.latency;
    let break_after = match decision.action {
        Action::UnknownKey => {
            out.response = reply::json(
                StatusCode::UNAUTHORIZED,
                error("authentication_error", "invalid x-api-key"),
            );
            return out;
        }
        Action::Misbehave(b) => match b.mode {
            Mode::BreakStream { after } => Some(after),
            _ => {
                out.response = behavior_error(&b, &key, now);
                return out;
            }
        },
        Action::Serve => None,
    };
    let cost = limits::request_tokens(body.len(), app.generation.completion_tokens);
    let verdict = app.registry.admit(&key, cost, at);
    if let Some(v) = verdict.filter(|v| !v.admitted) {
        out.response = limits::anthropic_refusal(&v, now);
        return out;
    }
    let request = match parsed {
        Ok(r) => r,
        Err(e) => {
            out.response = reply::json(
                StatusCode::BAD_REQUEST,
                error("invalid_request_error", &format!("invalid JSON body: {e}")),
            );
            return out;
        }
    };
    out.response = match endpoint {
        Endpoint::CountTokens => reply::json(
            StatusCode::OK,
            Bytes::from(json!({"input_tokens": input_tokens(body.len())}).to_string()),
        ),
        _ => message(app, &request, body.len(), n, break_after),
    };
    if let Some(v) = verdict {
        limits::anthropic_headers(&v, out.response.headers_mut(), now);
    }
    out
}

/// Input tokens "read": ceil(body length / 4), as the OpenAI side counts them.
fn input_tokens(body_len: usize) -> u64 {
    (body_len as u64).div_ceil(4)
}

/// A generated message, whole or as an event stream.
fn message(
    app: &App,
    r: &MessagesRequest<'_>,
    body_len: usize,
    n: u64,
    break_after: Option<u32>,
) -> http::Response<MockBody> {
    let Some(max_tokens) = r.max_tokens else {
        return reply::json(
            StatusCode::BAD_REQUEST,
            error("invalid_request_error", "max_tokens: Field required"),
        );
    };
    let mock = r.mock.as_ref();
    let wanted = mock
        .and_then(|m| m.completion_tokens)
        .unwrap_or(app.generation.completion_tokens);
    let tokens = wanted.min(max_tokens);
    let stop_reason = if tokens < wanted {
        "max_tokens"
    } else {
        "end_turn"
    };
    let id = app.ids.completion_id("msg", n).replace('-', "_");
    let model = r.model.as_deref().unwrap_or("claude-mock");
    let input = input_tokens(body_len);
    if let Some(tool) = r.forced_tool() {
        return tool_use(&id, model, &tool, input, r.stream == Some(true));
    }
    let thinks = r.thinking.as_ref().is_some_and(|t| t.kind == "enabled");
    if r.stream != Some(true) {
        let mut content = vec![json!({"type": "text", "text": openai::text(0, tokens)})];
        if thinks {
            content.insert(
                0,
                json!({"type": "thinking", "thinking": THOUGHT, "signature": "c2lnbmF0dXJl"}),
            );
        }
        let body = json!({
            "id": id, "type": "message", "role": "assistant", "model": model,
            "content": content,
            "stop_reason": stop_reason, "stop_sequence": null,
            "usage": {"input_tokens": input, "cache_creation_input_tokens": 0,
                      "cache_read_input_tokens": 0, "output_tokens": tokens},
        });
        let res = reply::json(StatusCode::OK, Bytes::from(body.to_string()));
        return match break_after {
            Some(_) => res.map(MockBody::truncate),
            None => res,
        };
    }
    let chunks = u64::from(
        mock.and_then(|m| m.chunks)
            .unwrap_or(app.generation.chunks)
            .max(1),
    );
    let interval = mock
        .and_then(|m| m.interval_ms)
        .map_or(app.generation.interval, Duration::from_millis);
    let mut events = vec![(
        event(
            "message_start",
            &json!({"type": "message_start", "message": {
                "id": id, "type": "message", "role": "assistant", "model": model,
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": input, "cache_creation_input_tokens": 0,
                          "cache_read_input_tokens": 0, "output_tokens": 1}}}),
        ),
        false,
    )];
    let text_index = u64::from(thinks);
    if thinks {
        for e in [
            json!({"type": "content_block_start", "index": 0,
                   "content_block": {"type": "thinking", "thinking": ""}}),
            json!({"type": "content_block_delta", "index": 0,
                   "delta": {"type": "thinking_delta", "thinking": THOUGHT}}),
            json!({"type": "content_block_delta", "index": 0,
                   "delta": {"type": "signature_delta", "signature": "c2lnbmF0dXJl"}}),
            json!({"type": "content_block_stop", "index": 0}),
        ] {
            let name = e["type"]
                .as_str()
                .unwrap_or("content_block_delta")
                .to_string();
            events.push((event(&name, &e), false));
        }
    }
    events.push((
        event(
            "content_block_start",
            &json!({"type": "content_block_start", "index": text_index,
                    "content_block": {"type": "text", "text": ""}}),
        ),
        false,
    ));
    events.push((event("ping", &json!({"type": "ping"})), false));
    for c in 0..chunks {
        let (from, to) = (tokens * c / chunks, tokens * (c + 1) / chunks);
        events.push((
            event(
                "content_block_delta",
                &json!({"type": "content_block_delta", "index": text_index,
                        "delta": {"type": "text_delta", "text": openai::text(from, to)}}),
            ),
            true,
        ));
    }
    events.push((
        event(
            "content_block_stop",
            &json!({"type": "content_block_stop", "index": text_index}),
        ),
        false,
    ));
    events.push((
        event(
            "message_delta",
            &json!({"type": "message_delta",
                    "delta": {"stop_reason": stop_reason, "stop_sequence": null},
                    "usage": {"output_tokens": tokens}}),
        ),
        false,
    ));
    events.push((
        event("message_stop", &json!({"type": "message_stop"})),
        false,
    ));
    reply::event_stream(MockBody::Events(EventList::new(
        events,
        interval,
        break_after,
    )))
}

/// A forced tool call: `{"city": "Paris"}` as the tool's input, whole or streamed in two parts.
fn tool_use(
    id: &str,
    model: &str,
    tool: &str,
    input: u64,
    stream: bool,
) -> http::Response<MockBody> {
    let call_id = format!("toolu_{id}");
    let usage = json!({"input_tokens": input, "output_tokens": 7});
    if !stream {
        let body = json!({
            "id": id, "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "tool_use", "id": call_id, "name": tool, "input": {"city": "Paris"}}],
            "stop_reason": "tool_use", "stop_sequence": null, "usage": usage,
        });
        return reply::json(StatusCode::OK, Bytes::from(body.to_string()));
    }
    let events = [
        event(
            "message_start",
            &json!({"type": "message_start", "message": {
            "id": id, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": input, "output_tokens": 1}}}),
        ),
        event(
            "content_block_start",
            &json!({"type": "content_block_start", "index": 0,
            "content_block": {"type": "tool_use", "id": call_id, "name": tool, "input": {}}}),
        ),
        event(
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": 0,
            "delta": {"type": "input_json_delta", "partial_json": "{\"city\": \"Pa"}}),
        ),
        event(
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": 0,
            "delta": {"type": "input_json_delta", "partial_json": "ris\"}"}}),
        ),
        event(
            "content_block_stop",
            &json!({"type": "content_block_stop", "index": 0}),
        ),
        event(
            "message_delta",
            &json!({"type": "message_delta",
            "delta": {"stop_reason": "tool_use", "stop_sequence": null}, "usage": {"output_tokens": 7}}),
        ),
        event("message_stop", &json!({"type": "message_stop"})),
    ];
    reply::event_stream(MockBody::Events(EventList::new(
        events.into_iter().map(|e| (e, false)).collect(),
        Duration::ZERO,
        None,
    )))
}

/// One SSE event with its `event:` name.
fn event(name: &str, data: &serde_json::Value) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

/// The error reply of a misbehaving key, in Anthropic's words.
fn behavior_error(b: &Behavior, key: &str, now: SystemTime) -> http::Response<MockBody> {
    let mut res = match &b.mode {
        Mode::RateLimit(rl) => {
            let mut res = reply::json(
                StatusCode::TOO_MANY_REQUESTS,
                error(
                    "rate_limit_error",
                    "This request would exceed the rate limit for your organization of 50 \
                     requests per minute.",
                ),
            );
            rate_limit_headers(rl, res.headers_mut(), now);
            res
        }
        Mode::Unauthorized => reply::json(
            StatusCode::UNAUTHORIZED,
            error("authentication_error", "invalid x-api-key"),
        ),
        Mode::Forbidden => reply::json(
            StatusCode::FORBIDDEN,
            error(
                "permission_error",
                "Your API key does not have permission to use the specified resource.",
            ),
        ),
        Mode::InsufficientQuota => reply::json(
            StatusCode::BAD_REQUEST,
            error("invalid_request_error", CREDIT_TOO_LOW),
        ),
        Mode::ServerError { status } if status.as_u16() == 529 => {
            reply::json(*status, error("overloaded_error", "Overloaded"))
        }
        Mode::ServerError { status } => {
            reply::json(*status, error("api_error", "Internal server error"))
        }
        Mode::BadRequest | Mode::Ok | Mode::BreakStream { .. } => reply::json(
            StatusCode::BAD_REQUEST,
            error(
                "invalid_request_error",
                "Invalid request (keygate-mock bad_request mode).",
            ),
        ),
    };
    if b.echo_key {
        let body = error("api_error", &format!("failed (key used: {key})"));
        *res.body_mut() = MockBody::full(body);
    }
    res
}

/// `retry-after` as configured, and Anthropic's reset headers for `reset_in`.
fn rate_limit_headers(rl: &RateLimit, h: &mut HeaderMap, now: SystemTime) {
    if let Some(secs) = rl.retry_after {
        h.insert(RETRY_AFTER, HeaderValue::from(secs));
    }
    h.insert(
        "anthropic-ratelimit-requests-limit",
        HeaderValue::from_static("50"),
    );
    if let Some(secs) = rl.reset_in {
        let at = humantime::format_rfc3339_seconds(now + Duration::from_secs(secs)).to_string();
        h.insert(
            "anthropic-ratelimit-requests-remaining",
            HeaderValue::from_static("0"),
        );
        if let Ok(v) = HeaderValue::from_str(&at) {
            h.insert("anthropic-ratelimit-requests-reset", v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::parse_inline;

    fn body_json(res: http::Response<MockBody>) -> serde_json::Value {
        let MockBody::Full(Some(bytes)) = res.into_body() else {
            panic!("not a full body");
        };
        serde_json::from_slice(&bytes).expect("json")
    }

    #[test]
    fn failure_modes_answer_in_anthropics_shape() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600);
        let cases = [
            ("429:retry_after=3:reset_in=20", 429, "rate_limit_error"),
            ("401", 401, "authentication_error"),
            ("403", 403, "permission_error"),
            ("insufficient_quota", 400, "invalid_request_error"),
            ("529", 529, "overloaded_error"),
            ("500", 500, "api_error"),
        ];
        for (spec, status, kind) in cases {
            let b = parse_inline(spec).expect("spec");
            let res = behavior_error(&b, "sk-ant-x", now);
            assert_eq!(res.status().as_u16(), status, "{spec}");
            let headers = res.headers().clone();
            let v = body_json(res);
            assert_eq!(v["type"], "error");
            assert_eq!(v["error"]["type"], kind, "{spec}");
            if status == 429 {
                assert_eq!(headers["retry-after"], "3");
                assert_eq!(headers["anthropic-ratelimit-requests-remaining"], "0");
                assert_eq!(
                    headers["anthropic-ratelimit-requests-reset"],
                    "2026-01-01T00:00:20Z"
                );
            }
        }
        let credit = body_json(behavior_error(
            &parse_inline("insufficient_quota").expect("spec"),
            "k",
            now,
        ));
        assert_eq!(credit["error"]["message"], CREDIT_TOO_LOW);
    }
}
