//! The `/_mock/*` endpoints tests drive the mock with (no credential needed, never counted):
//! `GET /_mock/stats`, `POST /_mock/reset[?restore=true]`, `GET|POST /_mock/behavior`,
//! `POST /_mock/consume` (spend a `limit` key's minute as traffic from elsewhere would).

use std::time::Instant;

use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::json;

use crate::body::MockBody;
use crate::reply;
use crate::service::App;
use crate::spec;

/// Body of `POST /_mock/behavior` (YAML or JSON): `spec` is a mapping, an inline string, or
/// `null` to unlist the key.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Update {
    key: String,
    spec: serde_yaml::Value,
}

/// Answers one debug request.
pub async fn handle(app: &App, req: Request<Incoming>) -> Response<MockBody> {
    let path = req.uri().path().trim_end_matches('/');
    match (req.method().clone(), path) {
        (Method::GET, "/_mock/stats") => {
            reply::json(StatusCode::OK, app.stats.to_json(app.name.as_deref()))
        }
        (Method::POST, "/_mock/reset") => {
            let restore = req.uri().query().is_some_and(|q| {
                q.split('&')
                    .any(|p| p == "restore" || p == "restore=true" || p == "restore=1")
            });
            app.registry.reset(Instant::now(), restore);
            app.stats.reset();
            ok(json!({"ok": true, "restored": restore}))
        }
        (Method::GET, "/_mock/behavior") => {
            let keys: serde_json::Map<String, serde_json::Value> = app
                .registry
                .snapshot()
                .into_iter()
                .map(|(k, spec)| (k, spec.into()))
                .collect();
            ok(json!({ "keys": keys }))
        }
        (Method::POST, "/_mock/behavior") => match set_behavior(app, req).await {
            Ok(v) => ok(v),
            Err(message) => refused(&message),
        },
        (Method::POST, "/_mock/consume") => match consume(app, req).await {
            Ok(v) => ok(v),
            Err(message) => refused(&message),
        },
        _ => reply::json(
            StatusCode::NOT_FOUND,
            crate::openai::not_found(req.method().as_str(), req.uri().path()),
        ),
    }
}

/// A control request's body (YAML or JSON) as `T`; `shape` says what was expected.
async fn read_body<T: serde::de::DeserializeOwned>(
    req: Request<Incoming>,
    shape: &str,
) -> Result<T, String> {
    let body = req
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("reading body: {e}"))?
        .to_bytes();
    serde_yaml::from_slice(&body).map_err(|e| format!("expected {shape}: {e}"))
}

async fn set_behavior(app: &App, req: Request<Incoming>) -> Result<serde_json::Value, String> {
    let update: Update = read_body(req, "{key: SECRET, spec: SPEC}").await?;
    let behavior = match update.spec {
        serde_yaml::Value::Null => None,
        value => Some(spec::from_value(value).map_err(|e| format!("key `{}`: {e}", update.key))?),
    };
    let shown = behavior.as_ref().map(ToString::to_string);
    app.registry.set(&update.key, behavior, Instant::now());
    Ok(json!({"key": update.key, "behavior": shown}))
}

/// Body of `POST /_mock/consume`: spend this much of a `limit` key's current minute.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Consume {
    key: String,
    #[serde(default)]
    requests: u64,
    #[serde(default)]
    tokens: u64,
}

async fn consume(app: &App, req: Request<Incoming>) -> Result<serde_json::Value, String> {
    let c: Consume = read_body(req, "{key: SECRET, requests: N, tokens: N}").await?;
    if !app
        .registry
        .consume(&c.key, c.requests, c.tokens, Instant::now())
    {
        return Err(format!("key `{}` has no limits", c.key));
    }
    Ok(json!({"key": c.key, "requests": c.requests, "tokens": c.tokens}))
}

/// A 400 saying what was wrong with a control request.
fn refused(message: &str) -> Response<MockBody> {
    reply::json(
        StatusCode::BAD_REQUEST,
        serde_json::to_vec(&json!({"error": {"message": message, "type": "mock_error"}}))
            .unwrap_or_default(),
    )
}

fn ok(v: serde_json::Value) -> Response<MockBody> {
    reply::json(StatusCode::OK, serde_json::to_vec(&v).unwrap_or_default())
}
