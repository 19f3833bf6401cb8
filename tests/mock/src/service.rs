//! Handling one API request: read it, let the key's behaviour decide, answer, count it.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use sha2::{Digest, Sha256};

use crate::anthropic;
use crate::behavior::{Behavior, Mode};
use crate::body::MockBody;
use crate::debug;
use crate::limits;
use crate::openai::{self, Completion, Flavor, Usage};
use crate::registry::{Action, Registry};
use crate::reply::{self, Common, Ids};
use crate::request::{self, EmbeddingsRequest, Endpoint, GenRequest, KeyStyle};
use crate::sse::{SseBody, StreamPlan};
use crate::stats::{Record, Stats};

/// Largest request body read (audio uploads included); beyond it the request gets a 413.
const MAX_BODY: usize = 256 << 20;

/// Defaults for generated replies, from the command line.
#[derive(Debug, Clone)]
pub struct Generation {
    /// Content chunks per stream (`--chunks`).
    pub chunks: u32,
    /// Pause between chunks (`--chunk-interval`).
    pub interval: Duration,
    /// Completion tokens per reply (`--completion-tokens`).
    pub completion_tokens: u64,
}

/// Everything shared by all connections of one mock process.
pub struct App {
    /// Key behaviours and counters.
    pub registry: Registry,
    /// Request statistics.
    pub stats: Stats,
    /// Listed models.
    pub models: Vec<String>,
    /// `GET /v1/models`, rendered once.
    pub models_json: Bytes,
    /// Reply shape defaults.
    pub generation: Generation,
    /// `--name`.
    pub name: Option<String>,
    /// Headers for every response.
    pub common: Common,
    /// Request numbering.
    pub ids: Ids,
    /// Latency for requests no key decides (missing key, unknown path).
    pub default_latency: Duration,
    /// Files and batches, and the accounts they belong to.
    pub objects: crate::objects::Objects,
}

/// The hyper service entry point.
pub async fn handle(
    app: Arc<App>,
    req: Request<Incoming>,
) -> Result<Response<MockBody>, Infallible> {
    let n = app.ids.next();
    let (mut res, style) = if req.uri().path().starts_with("/_mock/") {
        (debug::handle(&app, req).await, None)
    } else {
        api(&app, req, n).await
    };
    reply::finish(&mut res, &app.common, app.ids.request_id(n), style);
    Ok(res)
}

/// What the request gets, decided before any reply is built.
enum Outcome {
    MissingKey,
    NotFound,
    InvalidKey,
    BadBody(String),
    Fail(Arc<Behavior>),
    Serve { break_after: Option<u32> },
}

/// The parsed body, borrowing from the request bytes.
enum Parsed<'a> {
    Generation(GenRequest<'a>),
    Embeddings(EmbeddingsRequest<'a>),
    Nothing,
    Invalid(String),
}

/// One API request, returning the reply (before the common headers) and the key's header style.
/// The latency sleep comes last, after the request is counted, so `/_mock/stats` shows it at once.
async fn api(app: &App, req: Request<Incoming>, n: u64) -> (Response<MockBody>, Option<KeyStyle>) {
    let at = Instant::now();
    let (parts, body) = req.into_parts();
    let credential = request::credential(&parts.headers);
    let style = credential.as_ref().map(|(_, s)| *s);
    let endpoint = request::route(&parts.method, parts.uri.path());
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            let res = reply::json(
                StatusCode::PAYLOAD_TOO_LARGE,
                openai::error(
                    &format!("request body: {e}"),
                    "invalid_request_error",
                    None,
                    None,
                ),
            );
            return (res, style);
        }
    };
    let body_sha256: [u8; 32] = Sha256::digest(&body).into();
    if matches!(endpoint, Endpoint::Messages | Endpoint::CountTokens) {
        let now = SystemTime::now();
        let a = anthropic::answer(app, &endpoint, &parts.headers, &body, n, now, at);
        app.stats.record(Record {
            key: a.key,
            model: a.model,
            status: a.response.status().as_u16(),
            method: parts.method,
            uri: parts.uri,
            headers: parts.headers,
            body_len: body.len(),
            body_sha256,
            at,
        });
        if !a.latency.is_zero() {
            tokio::time::sleep(a.latency).await;
        }
        return (a.response, Some(KeyStyle::XApiKey));
    }

    let key_now = credential.as_ref().map_or("", |(k, _)| k.as_str());
    let object_answer = match endpoint {
        Endpoint::NotFound if credential.is_some() => {
            app.objects
                .answer(&parts.method, parts.uri.path(), &body, key_now)
        }
        Endpoint::Chat | Endpoint::Completions => app.objects.foreign(key_now, &body),
        _ => None,
    };
    if let Some(res) = object_answer {
        app.stats.record(Record {
            key: key_now.to_string(),
            model: None,
            status: res.status().as_u16(),
            method: parts.method,
            uri: parts.uri,
            headers: parts.headers,
            body_len: body.len(),
            body_sha256,
            at,
        });
        return (res, style);
    }
    let parsed = parse(&endpoint, &body);
    let model: Option<&str> = match &parsed {
        Parsed::Generation(g) => g.model.as_deref(),
        Parsed::Embeddings(e) => e.model.as_deref(),
        _ if endpoint == Endpoint::Transcriptions => request::multipart_field(&body, "model"),
        _ => None,
    }
    .or_else(|| request::azure_deployment(parts.uri.path()));

    let (outcome, latency) = decide(app, credential.as_ref(), &endpoint, model, &parsed, at);
    let key = credential.map(|(k, _)| k).unwrap_or_default();
    let now = SystemTime::now();
    let verdict = match outcome {
        Outcome::Serve { .. } => {
            let cost = limits::request_tokens(body.len(), app.generation.completion_tokens);
            app.registry.admit(&key, cost, at)
        }
        _ => None,
    };
    let mut res = match outcome {
        Outcome::Serve { .. } if verdict.is_some_and(|v| !v.admitted) => verdict.map_or_else(
            || reply::json(StatusCode::OK, Bytes::new()),
            |v| limits::openai_refusal(&v, model),
        ),
        Outcome::MissingKey => reply::json(StatusCode::UNAUTHORIZED, openai::missing_key()),
        Outcome::NotFound => reply::json(
            StatusCode::NOT_FOUND,
            openai::not_found(parts.method.as_str(), parts.uri.path()),
        ),
        Outcome::InvalidKey => reply::json(StatusCode::UNAUTHORIZED, openai::invalid_key(&key)),
        Outcome::BadBody(detail) => {
            reply::json(StatusCode::BAD_REQUEST, openai::invalid_json(&detail))
        }
        Outcome::Fail(b) => reply::behavior_error(&b, &key, model, now),
        Outcome::Serve { break_after } => serve(
            app,
            &endpoint,
            &parsed,
            model,
            body.len(),
            n,
            now,
            break_after,
        ),
    };
    if let Some(v) = verdict.filter(|v| v.admitted) {
        limits::openai_headers(&v, res.headers_mut());
    }

    app.stats.record(Record {
        key,
        model: model.map(str::to_string),
        status: res.status().as_u16(),
        method: parts.method,
        uri: parts.uri,
        headers: parts.headers,
        body_len: body.len(),
        body_sha256,
        at,
    });
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    (res, style)
}

fn parse<'a>(endpoint: &Endpoint, body: &'a [u8]) -> Parsed<'a> {
    let result = match endpoint {
        Endpoint::Chat | Endpoint::Completions => {
            serde_json::from_slice(body).map(Parsed::Generation)
        }
        Endpoint::Embeddings => serde_json::from_slice(body).map(Parsed::Embeddings),
        _ => Ok(Parsed::Nothing),
    };
    result.unwrap_or_else(|e| Parsed::Invalid(e.to_string()))
}

/// Authentication, routing and the key's behaviour, in OpenAI's order: a missing key beats a
/// bad path, a key's failure beats a bad body.
fn decide(
    app: &App,
    credential: Option<&(String, KeyStyle)>,
    endpoint: &Endpoint,
    model: Option<&str>,
    parsed: &Parsed<'_>,
    at: Instant,
) -> (Outcome, Duration) {
    let Some((key, _)) = credential else {
        return (Outcome::MissingKey, app.default_latency);
    };
    if *endpoint == Endpoint::NotFound {
        return (Outcome::NotFound, app.default_latency);
    }
    let decision = app.registry.decide(key, model, at);
    let break_after = match decision.action {
        Action::UnknownKey => return (Outcome::InvalidKey, decision.latency),
        Action::Misbehave(b) => match b.mode {
            Mode::BreakStream { after } => Some(after),
            _ => return (Outcome::Fail(b), decision.latency),
        },
        Action::Serve => None,
    };
    let outcome = match parsed {
        Parsed::Invalid(e) => Outcome::BadBody(e.clone()),
        _ => Outcome::Serve { break_after },
    };
    (outcome, decision.latency)
}

/// The endpoint's normal reply; `break_after` turns it into a broken one.
#[allow(clippy::too_many_arguments)]
fn serve(
    app: &App,
    endpoint: &Endpoint,
    parsed: &Parsed<'_>,
    model: Option<&str>,
    body_len: usize,
    n: u64,
    now: SystemTime,
    break_after: Option<u32>,
) -> Response<MockBody> {
    let res = match (endpoint, parsed) {
        (Endpoint::Chat, Parsed::Generation(g)) => {
            generate(app, Flavor::Chat, g, model, body_len, n, now, break_after)
        }
        (Endpoint::Completions, Parsed::Generation(g)) => {
            generate(app, Flavor::Text, g, model, body_len, n, now, break_after)
        }
        (Endpoint::Embeddings, Parsed::Embeddings(e)) => {
            let dims = e.dimensions.unwrap_or(8).clamp(1, 4096);
            let base64 = e.encoding_format.as_deref() == Some("base64");
            let model = model.unwrap_or("text-embedding-3-small");
            reply::json(
                StatusCode::OK,
                openai::embeddings(model, e.input_count(), dims, base64, body_len),
            )
        }
        (Endpoint::Models, _) => reply::json(StatusCode::OK, app.models_json.clone()),
        (Endpoint::Model(id), _) if app.models.iter().any(|m| m == id) => {
            reply::json(StatusCode::OK, openai::model_object(id))
        }
        (Endpoint::Model(id), _) => reply::json(StatusCode::NOT_FOUND, openai::model_not_found(id)),
        (Endpoint::Transcriptions, _) => {
            reply::json(StatusCode::OK, Bytes::from_static(openai::TRANSCRIPTION))
        }
        // Parsing follows the endpoint, so other pairs cannot occur; answer like an unknown path.
        _ => reply::json(StatusCode::NOT_FOUND, openai::not_found("POST", "")),
    };
    match break_after {
        Some(_) => res.map(MockBody::truncate),
        None => res,
    }
}

/// A (chat) completion, whole or streamed.
#[allow(clippy::too_many_arguments)]
fn generate(
    app: &App,
    flavor: Flavor,
    g: &GenRequest<'_>,
    model: Option<&str>,
    body_len: usize,
    n: u64,
    now: SystemTime,
    break_after: Option<u32>,
) -> Response<MockBody> {
    let mock = g.mock.as_ref();
    let wanted = mock
        .and_then(|m| m.completion_tokens)
        .unwrap_or(app.generation.completion_tokens);
    let cap = g.max_completion_tokens.or(g.max_tokens);
    let tokens = cap.map_or(wanted, |c| wanted.min(c));
    let finish_reason = if tokens < wanted { "length" } else { "stop" };
    let id = app.ids.completion_id(
        match flavor {
            Flavor::Chat => "chatcmpl",
            Flavor::Text => "cmpl",
        },
        n,
    );
    let created = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let model = model.unwrap_or("gpt-4o-mini");
    let usage = Usage::new(body_len, tokens);
    if g.stream != Some(true) {
        let c = Completion {
            id: &id,
            created,
            model,
            usage,
            finish_reason,
        };
        return reply::json(StatusCode::OK, openai::completion(flavor, &c));
    }
    let plan = StreamPlan {
        flavor,
        id,
        created,
        model: model.to_string(),
        usage,
        finish_reason,
        chunks: mock.and_then(|m| m.chunks).unwrap_or(app.generation.chunks),
        interval: mock
            .and_then(|m| m.interval_ms)
            .map_or(app.generation.interval, Duration::from_millis),
        include_usage: g
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        break_after,
    };
    reply::event_stream(MockBody::Sse(SseBody::new(plan)))
}
