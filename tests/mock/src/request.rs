//! Reading requests: the credential and its header style, the endpoint, and the JSON fields the
//! mock needs (serde skips everything else without building it).

use std::borrow::Cow;

use http::{HeaderMap, HeaderValue, Method};
use serde::Deserialize;

/// Which header carried the credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyStyle {
    /// `Authorization: Bearer X`.
    Bearer,
    /// `api-key: X` (Azure OpenAI).
    Azure,
    /// `x-api-key: X`.
    XApiKey,
}

impl KeyStyle {
    /// The `x-mock-key-header` value.
    pub fn header_value(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            KeyStyle::Bearer => "bearer",
            KeyStyle::Azure => "azure",
            KeyStyle::XApiKey => "x-api-key",
        })
    }
}

/// The credential and its style; `Authorization: Bearer` wins, then `api-key`, then `x-api-key`.
/// Empty values and non-Bearer authorization schemes count as absent.
pub fn credential(headers: &HeaderMap) -> Option<(String, KeyStyle)> {
    if let Some(v) = headers.get(http::header::AUTHORIZATION) {
        let v = v.as_bytes();
        if v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer ") {
            if let Some(key) = non_empty(&v[7..]) {
                return Some((key, KeyStyle::Bearer));
            }
        }
    }
    for (name, style) in [
        ("api-key", KeyStyle::Azure),
        ("x-api-key", KeyStyle::XApiKey),
    ] {
        if let Some(key) = headers.get(name).and_then(|v| non_empty(v.as_bytes())) {
            return Some((key, style));
        }
    }
    None
}

fn non_empty(raw: &[u8]) -> Option<String> {
    let s = String::from_utf8_lossy(raw);
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_string())
}

/// The API endpoints, matched on the end of the path so any prefix (`/openai/v1/…`, Azure's
/// `/openai/deployments/{d}/…`) works.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST …/chat/completions`.
    Chat,
    /// `POST …/completions` (legacy).
    Completions,
    /// `POST …/embeddings`.
    Embeddings,
    /// `GET …/models`.
    Models,
    /// `GET …/models/{id}`.
    Model(String),
    /// `POST …/audio/transcriptions`.
    Transcriptions,
    /// `POST …/v1/messages` (Anthropic).
    Messages,
    /// `POST …/v1/messages/count_tokens` (Anthropic).
    CountTokens,
    /// Anything else.
    NotFound,
}

/// Maps method and path to an endpoint.
pub fn route(method: &Method, path: &str) -> Endpoint {
    let path = path.trim_end_matches('/');
    let post = *method == Method::POST;
    let get = *method == Method::GET;
    if post && path.ends_with("/v1/messages") {
        Endpoint::Messages
    } else if post && path.ends_with("/v1/messages/count_tokens") {
        Endpoint::CountTokens
    } else if post && path.ends_with("/chat/completions") {
        Endpoint::Chat
    } else if post && path.ends_with("/completions") {
        Endpoint::Completions
    } else if post && path.ends_with("/embeddings") {
        Endpoint::Embeddings
    } else if post && path.ends_with("/audio/transcriptions") {
        Endpoint::Transcriptions
    } else if get && path.ends_with("/models") {
        Endpoint::Models
    } else if let (true, Some(at)) = (get, path.find("/models/")) {
        Endpoint::Model(path[at + "/models/".len()..].to_string())
    } else {
        Endpoint::NotFound
    }
}

/// The deployment name in an Azure path (`/openai/deployments/{d}/…`), used as the model when
/// the body names none.
pub fn azure_deployment(path: &str) -> Option<&str> {
    let rest = &path[path.find("/deployments/")? + "/deployments/".len()..];
    let name = rest.split('/').next()?;
    (!name.is_empty()).then_some(name)
}

/// The fields of a (chat) completion request the mock reads.
#[derive(Deserialize, Debug, Default)]
pub struct GenRequest<'a> {
    /// Model name.
    #[serde(borrow)]
    pub model: Option<Cow<'a, str>>,
    /// Stream the reply as SSE.
    pub stream: Option<bool>,
    /// `stream_options.include_usage`.
    pub stream_options: Option<StreamOptions>,
    /// Caps completion tokens.
    pub max_tokens: Option<u64>,
    /// Newer name for `max_tokens`.
    pub max_completion_tokens: Option<u64>,
    /// Per-request overrides of the mock's stream shape.
    pub mock: Option<MockOptions>,
}

/// `stream_options`.
#[derive(Deserialize, Debug, Default)]
pub struct StreamOptions {
    /// Send a final usage chunk (and `"usage": null` on the others).
    pub include_usage: Option<bool>,
}

/// The request body's `"mock"` object.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct MockOptions {
    /// Content chunks in a stream.
    pub chunks: Option<u32>,
    /// Milliseconds between chunks.
    pub interval_ms: Option<u64>,
    /// Completion tokens to generate (before the `max_tokens` cap).
    pub completion_tokens: Option<u64>,
}

/// The fields of an embeddings request the mock reads.
#[derive(Deserialize, Debug)]
pub struct EmbeddingsRequest<'a> {
    /// Model name.
    #[serde(borrow)]
    pub model: Option<Cow<'a, str>>,
    /// A string, a list of strings, a token list, or a list of token lists.
    pub input: Option<serde_json::Value>,
    /// Vector length (default 8: the mock is about plumbing, not vectors).
    pub dimensions: Option<usize>,
    /// `float` or `base64`.
    #[serde(borrow)]
    pub encoding_format: Option<Cow<'a, str>>,
}

impl EmbeddingsRequest<'_> {
    /// How many vectors to return.
    pub fn input_count(&self) -> usize {
        match &self.input {
            Some(serde_json::Value::Array(items)) => {
                let nested = items.iter().all(|i| {
                    matches!(
                        i,
                        serde_json::Value::String(_) | serde_json::Value::Array(_)
                    )
                });
                if nested && !items.is_empty() {
                    items.len()
                } else {
                    1
                }
            }
            _ => 1,
        }
    }
}

/// The text of multipart field `name` (e.g. `model` of an audio upload); a plain byte scan, no
/// full multipart parse.
pub fn multipart_field<'a>(body: &'a [u8], name: &str) -> Option<&'a str> {
    use memchr::memmem::find;
    let needle = format!("name=\"{name}\"");
    let at = find(body, needle.as_bytes())? + needle.len();
    let start = at + find(&body[at..], b"\r\n\r\n")? + 4;
    let len = find(&body[start..], b"\r\n")?;
    std::str::from_utf8(&body[start..start + len]).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn credential_styles() {
        let c = |p: &[(&'static str, &'static str)]| credential(&headers(p));
        assert_eq!(
            c(&[("authorization", "Bearer sk-a")]),
            Some(("sk-a".into(), KeyStyle::Bearer))
        );
        assert_eq!(
            c(&[("authorization", "bearer  sk-a ")]),
            Some(("sk-a".into(), KeyStyle::Bearer))
        );
        assert_eq!(
            c(&[("api-key", "sk-z")]),
            Some(("sk-z".into(), KeyStyle::Azure))
        );
        assert_eq!(
            c(&[("x-api-key", "sk-x")]),
            Some(("sk-x".into(), KeyStyle::XApiKey))
        );
        assert_eq!(
            c(&[("authorization", "Basic abc"), ("x-api-key", "sk-x")]),
            Some(("sk-x".into(), KeyStyle::XApiKey))
        );
        assert_eq!(
            c(&[("api-key", "sk-z"), ("authorization", "Bearer sk-a")]),
            Some(("sk-a".into(), KeyStyle::Bearer))
        );
        assert_eq!(c(&[("authorization", "Bearer ")]), None);
        assert_eq!(c(&[("api-key", "  ")]), None);
        assert_eq!(c(&[]), None);
    }

    #[test]
    fn routes_by_suffix() {
        let post = |p: &str| route(&Method::POST, p);
        let get = |p: &str| route(&Method::GET, p);
        assert_eq!(post("/v1/chat/completions"), Endpoint::Chat);
        assert_eq!(post("/openai/v1/chat/completions/"), Endpoint::Chat);
        assert_eq!(
            post("/openai/deployments/gpt4/chat/completions"),
            Endpoint::Chat
        );
        assert_eq!(post("/v1/completions"), Endpoint::Completions);
        assert_eq!(post("/v1/embeddings"), Endpoint::Embeddings);
        assert_eq!(post("/v1/audio/transcriptions"), Endpoint::Transcriptions);
        assert_eq!(get("/v1/models"), Endpoint::Models);
        assert_eq!(get("/v1/models/gpt-4o"), Endpoint::Model("gpt-4o".into()));
        assert_eq!(get("/v1/chat/completions"), Endpoint::NotFound);
        assert_eq!(post("/v1/models"), Endpoint::NotFound);
        assert_eq!(post("/v1/nope"), Endpoint::NotFound);
    }

    #[test]
    fn azure_deployment_name() {
        assert_eq!(
            azure_deployment("/openai/deployments/my-gpt/chat/completions"),
            Some("my-gpt")
        );
        assert_eq!(azure_deployment("/v1/chat/completions"), None);
        assert_eq!(azure_deployment("/openai/deployments/"), None);
    }

    #[test]
    fn parses_generation_fields_and_skips_the_rest() {
        let body = br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],
            "stream":true,"stream_options":{"include_usage":true},"max_tokens":3,
            "mock":{"chunks":3,"interval_ms":300}}"#;
        let r: GenRequest = serde_json::from_slice(body).expect("valid");
        assert_eq!(r.model.as_deref(), Some("gpt-4o"));
        assert_eq!(r.stream, Some(true));
        assert_eq!(r.stream_options.and_then(|o| o.include_usage), Some(true));
        assert_eq!(r.max_tokens, Some(3));
        let mock = r.mock.expect("mock present");
        assert_eq!((mock.chunks, mock.interval_ms), (Some(3), Some(300)));
        assert!(serde_json::from_slice::<GenRequest>(br#"{"mock":{"chunkz":1}}"#).is_err());
    }

    #[test]
    fn embedding_inputs() {
        let count = |b: &str| {
            serde_json::from_str::<EmbeddingsRequest>(b)
                .expect("valid")
                .input_count()
        };
        assert_eq!(count(r#"{"input":"a"}"#), 1);
        assert_eq!(count(r#"{"input":["a","b","c"]}"#), 3);
        assert_eq!(count(r#"{"input":[1,2,3]}"#), 1);
        assert_eq!(count(r#"{"input":[[1],[2]]}"#), 2);
    }

    #[test]
    fn multipart_model() {
        let body = b"--x\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\nRIFF\r\n--x\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--x--\r\n";
        assert_eq!(multipart_field(body, "model"), Some("whisper-1"));
        assert_eq!(multipart_field(body, "language"), None);
    }
}
