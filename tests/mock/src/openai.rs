//! OpenAI-shaped JSON bodies: completions, chunks, embeddings, models and error objects.
//!
//! Everything is serialized from borrowed structs straight into one buffer, so a response body
//! costs one allocation.

use bytes::Bytes;
use serde::{Serialize, Serializer};

/// Token accounting, as in OpenAI's `usage` object.
#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    /// Tokens "read": ceil(request body length / 4), deterministic on purpose.
    pub prompt_tokens: u64,
    /// Tokens "written".
    pub completion_tokens: u64,
    /// The sum of both.
    pub total_tokens: u64,
}

impl Usage {
    /// Usage for a request body of `body_len` bytes answered with `completion_tokens` tokens.
    pub fn new(body_len: usize, completion_tokens: u64) -> Self {
        let prompt_tokens = (body_len as u64).div_ceil(4);
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

/// Which response family: chat (`/chat/completions`) or legacy text (`/completions`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// `chat.completion` / `chat.completion.chunk`.
    Chat,
    /// `text_completion`.
    Text,
}

/// The words the mock "generates"; token `i` is `WORDS[i % len]`, and the very first token has no
/// leading space, so any split of the token range concatenates to the same text.
const WORDS: [&str; 6] = [" This", " is", " a", " mock", " reply", "."];

/// The generated text for tokens `from..to`.
pub fn text(from: u64, to: u64) -> String {
    let mut s = String::with_capacity(((to - from.min(to)) * 6) as usize);
    for i in from..to {
        let w = WORDS[(i % WORDS.len() as u64) as usize];
        s.push_str(if i == 0 { &w[1..] } else { w });
    }
    s
}

/// A generated completion: who, what, and how many tokens.
pub struct Completion<'a> {
    /// Response id (`chatcmpl-…` or `cmpl-…`).
    pub id: &'a str,
    /// Unix seconds.
    pub created: u64,
    /// Model echoed back.
    pub model: &'a str,
    /// Token accounting; `usage.completion_tokens` tokens of text are generated.
    pub usage: Usage,
    /// `stop`, or `length` when `max_tokens` cut the reply short.
    pub finish_reason: &'a str,
}

#[derive(Serialize)]
struct ChatCompletion<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [ChatChoice<'a>; 1],
    usage: Usage,
    system_fingerprint: &'static str,
}

#[derive(Serialize)]
struct ChatChoice<'a> {
    index: u32,
    message: Message<'a>,
    logprobs: Option<()>,
    finish_reason: &'a str,
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'static str,
    content: &'a str,
    refusal: Option<()>,
}

#[derive(Serialize)]
struct TextCompletion<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [TextChoice<'a>; 1],
    #[serde(skip_serializing_if = "UsageField::is_absent")]
    usage: UsageField,
}

#[derive(Serialize)]
struct TextChoice<'a> {
    text: &'a str,
    index: u32,
    logprobs: Option<()>,
    finish_reason: Option<&'a str>,
}

/// The `usage` member of stream chunks: absent, `null` (include_usage, not last), or the totals.
#[derive(Clone, Copy)]
pub enum UsageField {
    /// Not serialized.
    Absent,
    /// `"usage": null`.
    Null,
    /// `"usage": {…}`.
    Some(Usage),
}

impl UsageField {
    fn is_absent(&self) -> bool {
        matches!(self, UsageField::Absent)
    }
}

impl Serialize for UsageField {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            UsageField::Some(u) => u.serialize(s),
            _ => s.serialize_none(),
        }
    }
}

/// The whole non-stream completion body.
pub fn completion(flavor: Flavor, c: &Completion<'_>) -> Bytes {
    let content = text(0, c.usage.completion_tokens);
    match flavor {
        Flavor::Chat => to_bytes(&ChatCompletion {
            id: c.id,
            object: "chat.completion",
            created: c.created,
            model: c.model,
            choices: [ChatChoice {
                index: 0,
                message: Message {
                    role: "assistant",
                    content: &content,
                    refusal: None,
                },
                logprobs: None,
                finish_reason: c.finish_reason,
            }],
            usage: c.usage,
            system_fingerprint: "fp_mock",
        }),
        Flavor::Text => to_bytes(&TextCompletion {
            id: c.id,
            object: "text_completion",
            created: c.created,
            model: c.model,
            choices: [TextChoice {
                text: &content,
                index: 0,
                logprobs: None,
                finish_reason: Some(c.finish_reason),
            }],
            usage: UsageField::Some(c.usage),
        }),
    }
}

#[derive(Serialize)]
struct ChatChunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    system_fingerprint: &'static str,
    choices: &'a [ChunkChoice<'a>],
    #[serde(skip_serializing_if = "UsageField::is_absent")]
    usage: UsageField,
}

#[derive(Serialize)]
struct ChunkChoice<'a> {
    index: u32,
    delta: Delta<'a>,
    logprobs: Option<()>,
    finish_reason: Option<&'a str>,
}

#[derive(Serialize)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
}

/// One SSE content chunk (`data: {…}\n\n`): chunk `index` of `chunks`, carrying its share of the
/// tokens; the first names the role, the last carries the finish reason.
pub fn stream_chunk(
    flavor: Flavor,
    c: &Completion<'_>,
    index: u32,
    chunks: u32,
    usage: UsageField,
) -> Bytes {
    let tokens = c.usage.completion_tokens;
    let (from, to) = (
        tokens * u64::from(index) / u64::from(chunks),
        tokens * u64::from(index + 1) / u64::from(chunks),
    );
    let piece = text(from, to);
    let finish = (index + 1 == chunks).then_some(c.finish_reason);
    match flavor {
        Flavor::Chat => sse(&ChatChunk {
            id: c.id,
            object: "chat.completion.chunk",
            created: c.created,
            model: c.model,
            system_fingerprint: "fp_mock",
            choices: &[ChunkChoice {
                index: 0,
                delta: Delta {
                    role: (index == 0).then_some("assistant"),
                    content: Some(&piece),
                },
                logprobs: None,
                finish_reason: finish,
            }],
            usage,
        }),
        Flavor::Text => sse(&TextCompletion {
            id: c.id,
            object: "text_completion",
            created: c.created,
            model: c.model,
            choices: [TextChoice {
                text: &piece,
                index: 0,
                logprobs: None,
                finish_reason: finish,
            }],
            usage,
        }),
    }
}

/// The final usage-only chunk sent when `stream_options.include_usage` is true.
pub fn usage_chunk(flavor: Flavor, c: &Completion<'_>) -> Bytes {
    let object = match flavor {
        Flavor::Chat => "chat.completion.chunk",
        Flavor::Text => "text_completion",
    };
    sse(&ChatChunk {
        id: c.id,
        object,
        created: c.created,
        model: c.model,
        system_fingerprint: "fp_mock",
        choices: &[],
        usage: UsageField::Some(c.usage),
    })
}

/// The stream terminator.
pub const DONE: &[u8] = b"data: [DONE]\n\n";

#[derive(Serialize)]
struct EmbeddingList<'a> {
    object: &'static str,
    data: Vec<Embedding>,
    model: &'a str,
    usage: EmbeddingUsage,
}

#[derive(Serialize)]
struct Embedding {
    object: &'static str,
    index: usize,
    embedding: EmbeddingValue,
}

#[derive(Serialize)]
#[serde(untagged)]
enum EmbeddingValue {
    Floats(Vec<f32>),
    Base64(String),
}

#[derive(Serialize)]
struct EmbeddingUsage {
    prompt_tokens: u64,
    total_tokens: u64,
}

/// An embedding list with `inputs` vectors of `dims` deterministic values, as floats or as
/// base64 little-endian f32 (`encoding_format: base64`, what the Python SDK asks for by default).
pub fn embeddings(model: &str, inputs: usize, dims: usize, base64: bool, body_len: usize) -> Bytes {
    let data = (0..inputs)
        .map(|index| {
            let values = (0..dims).map(|j| ((index * 31 + j * 17) % 100) as f32 / 100.0 - 0.5);
            let embedding = if base64 {
                let raw: Vec<u8> = values.flat_map(f32::to_le_bytes).collect();
                EmbeddingValue::Base64(base64_encode(&raw))
            } else {
                EmbeddingValue::Floats(values.collect())
            };
            Embedding {
                object: "embedding",
                index,
                embedding,
            }
        })
        .collect();
    let tokens = (body_len as u64).div_ceil(4);
    to_bytes(&EmbeddingList {
        object: "list",
        data,
        model,
        usage: EmbeddingUsage {
            prompt_tokens: tokens,
            total_tokens: tokens,
        },
    })
}

/// Standard base64 with padding.
fn base64_encode(raw: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(raw.len().div_ceil(3) * 4);
    for group in raw.chunks(3) {
        let b = [
            group[0],
            group.get(1).copied().unwrap_or(0),
            group.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= group.len() {
                out.push(ALPHABET[((n >> shift) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[derive(Serialize)]
struct ModelObject<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    owned_by: &'static str,
}

#[derive(Serialize)]
struct ModelList<'a> {
    object: &'static str,
    data: Vec<ModelObject<'a>>,
}

/// A fixed creation time for listed models (2024-05-13), so the list is byte-for-byte stable.
const MODEL_CREATED: u64 = 1_715_558_400;

/// `GET /v1/models`.
pub fn model_list(models: &[String]) -> Bytes {
    to_bytes(&ModelList {
        object: "list",
        data: models.iter().map(|m| model_object_of(m)).collect(),
    })
}

/// `GET /v1/models/{id}`.
pub fn model_object(id: &str) -> Bytes {
    to_bytes(&model_object_of(id))
}

fn model_object_of(id: &str) -> ModelObject<'_> {
    ModelObject {
        id,
        object: "model",
        created: MODEL_CREATED,
        owned_by: "keygate-mock",
    }
}

/// `POST /v1/audio/transcriptions`.
pub const TRANSCRIPTION: &[u8] = br#"{"text":"mock"}"#;

#[derive(Serialize)]
struct ErrorEnvelope<'a> {
    error: ErrorObject<'a>,
}

#[derive(Serialize)]
struct ErrorObject<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

/// `{"error":{"message","type","param","code"}}`.
pub fn error(message: &str, kind: &str, param: Option<&str>, code: Option<&str>) -> Bytes {
    to_bytes(&ErrorEnvelope {
        error: ErrorObject {
            message,
            kind,
            param,
            code,
        },
    })
}

/// 401 for a request without any credential.
pub fn missing_key() -> Bytes {
    error(
        "You didn't provide an API key. You need to provide your API key in an Authorization \
         header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
        "invalid_request_error",
        None,
        Some("missing_api_key"),
    )
}

/// 401 for a refused key; like OpenAI it echoes a masked part of the key (gateways should scrub it).
pub fn invalid_key(key: &str) -> Bytes {
    let message = format!(
        "Incorrect API key provided: {}. You can find your API key at \
         https://platform.openai.com/account/api-keys.",
        mask_key(key)
    );
    error(
        &message,
        "invalid_request_error",
        None,
        Some("invalid_api_key"),
    )
}

/// An error body whose message also names the whole `key` (`echo_key`), as a careless relay's
/// would; a body that is not an error envelope is returned unchanged.
pub fn echo_key(body: &[u8], key: &str) -> Bytes {
    let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return Bytes::copy_from_slice(body);
    };
    let Some(message) = v.pointer_mut("/error/message") else {
        return Bytes::copy_from_slice(body);
    };
    let echoed = format!("{} (key used: {key})", message.as_str().unwrap_or_default());
    *message = serde_json::Value::String(echoed);
    to_bytes(&v)
}

/// OpenAI-style masking: the first 4 characters (half of a short key), stars, then the last 4
/// characters of keys long enough that this still hides most of them.
pub fn mask_key(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    let n = chars.len();
    let head = if n >= 8 { 4 } else { n / 2 };
    let tail = if n >= 12 { 4 } else { 0 };
    let stars = (n - head - tail).max(3);
    let mut out: String = chars[..head].iter().collect();
    out.extend(std::iter::repeat_n('*', stars));
    out.extend(chars[n - tail..].iter());
    out
}

/// The organisation and project ids the mock's messages name, shaped like OpenAI's.
pub const ORG_ID: &str = "org-M0ckOrgan1zat10nId0000";
/// See [`ORG_ID`].
pub const PROJECT_ID: &str = "proj_M0ckPr0ject1d00000000";

/// 429 `rate_limit_exceeded`; `org_wide` names the organization's limit, else the project's.
pub fn rate_limited(model: Option<&str>, org_wide: bool, retry_in: &str) -> Bytes {
    let scope = if org_wide {
        format!("organization {ORG_ID}")
    } else {
        format!("project {PROJECT_ID}")
    };
    let message = format!(
        "Rate limit reached for {} in {scope} on requests per min (RPM): Limit 3, Used 3, \
         Requested 1. Please try again in {retry_in}. Visit \
         https://platform.openai.com/account/rate-limits to learn more.",
        model.unwrap_or("requests"),
    );
    error(&message, "requests", None, Some("rate_limit_exceeded"))
}

/// 429 `insufficient_quota`.
pub fn insufficient_quota() -> Bytes {
    error(
        "You exceeded your current quota, please check your plan and billing details. For more \
         information on this error, read the docs: \
         https://platform.openai.com/docs/guides/error-codes/api-errors.",
        "insufficient_quota",
        None,
        Some("insufficient_quota"),
    )
}

/// 403 as OpenAI sends it for a refused region.
pub fn forbidden() -> Bytes {
    error(
        "Country, region, or territory not supported",
        "request_forbidden",
        None,
        Some("unsupported_country_region_territory"),
    )
}

/// A 5xx body; 503 gets OpenAI's overload wording.
pub fn server_error(status: u16) -> Bytes {
    let message = if status == 503 {
        "The engine is currently overloaded, please try again later."
    } else {
        "The server had an error while processing your request. Sorry about that!"
    };
    error(message, "server_error", None, None)
}

/// 400 from the `bad_request` mode.
pub fn bad_request() -> Bytes {
    error(
        "Invalid request (keygate-mock bad_request mode).",
        "invalid_request_error",
        None,
        Some("invalid_request_error"),
    )
}

/// 400 for a body that is not the JSON the endpoint expects.
pub fn invalid_json(detail: &str) -> Bytes {
    let message = format!(
        "We could not parse the JSON body of your request. (HINT: This likely means you aren't \
         using your HTTP library correctly. The OpenAI API expects a JSON payload.) Detail: {detail}"
    );
    error(&message, "invalid_request_error", None, None)
}

/// 404 for an unknown path, worded like OpenAI.
pub fn not_found(method: &str, path: &str) -> Bytes {
    error(
        &format!("Invalid URL ({method} {path})"),
        "invalid_request_error",
        None,
        None,
    )
}

/// 404 for `GET /v1/models/{id}` of an unknown model.
pub fn model_not_found(id: &str) -> Bytes {
    error(
        &format!("The model `{id}` does not exist or you do not have access to it."),
        "invalid_request_error",
        None,
        Some("model_not_found"),
    )
}

fn to_bytes<T: Serialize>(value: &T) -> Bytes {
    let mut buf = Vec::with_capacity(512);
    serde_json::to_writer(&mut buf, value).expect("response structs have string keys only");
    Bytes::from(buf)
}

/// `data: <json>\n\n` in one buffer.
fn sse<T: Serialize>(value: &T) -> Bytes {
    let mut buf = Vec::with_capacity(384);
    buf.extend_from_slice(b"data: ");
    serde_json::to_writer(&mut buf, value).expect("chunk structs have string keys only");
    buf.extend_from_slice(b"\n\n");
    Bytes::from(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn json(b: &[u8]) -> Value {
        serde_json::from_slice(b).expect("valid json")
    }

    fn sample(usage: Usage) -> Completion<'static> {
        Completion {
            id: "chatcmpl-1",
            created: 7,
            model: "gpt-4o",
            usage,
            finish_reason: "stop",
        }
    }

    #[test]
    fn usage_rounds_up() {
        assert_eq!(Usage::new(0, 12).prompt_tokens, 0);
        assert_eq!(Usage::new(1, 12).prompt_tokens, 1);
        assert_eq!(Usage::new(8, 12).prompt_tokens, 2);
        assert_eq!(Usage::new(9, 12).total_tokens, 15);
    }

    #[test]
    fn text_splits_concatenate() {
        let whole = text(0, 13);
        assert!(whole.starts_with("This is a mock reply."));
        assert_eq!(
            format!("{}{}{}", text(0, 4), text(4, 9), text(9, 13)),
            whole
        );
        assert_eq!(text(3, 3), "");
    }

    #[test]
    fn chat_completion_shape() {
        let v = json(&completion(Flavor::Chat, &sample(Usage::new(40, 6))));
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(
            v["choices"][0]["message"]["content"],
            "This is a mock reply."
        );
        assert_eq!(v["usage"]["prompt_tokens"], 10);
        assert_eq!(v["usage"]["total_tokens"], 16);
        let v = json(&completion(Flavor::Text, &sample(Usage::new(4, 2))));
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["choices"][0]["text"], "This is");
    }

    #[test]
    fn stream_chunks_shape() {
        let c = sample(Usage::new(4, 12));
        let first = stream_chunk(Flavor::Chat, &c, 0, 3, UsageField::Null);
        let text0 = std::str::from_utf8(&first).expect("utf8");
        assert!(text0.starts_with("data: {") && text0.ends_with("}\n\n"));
        let v = json(&first[6..]);
        assert_eq!(v["object"], "chat.completion.chunk");
        assert_eq!(v["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(v["choices"][0]["finish_reason"], Value::Null);
        assert_eq!(v["usage"], Value::Null);
        assert!(v.as_object().is_some_and(|o| o.contains_key("usage")));
        let last = json(&stream_chunk(Flavor::Chat, &c, 2, 3, UsageField::Absent)[6..]);
        assert_eq!(last["choices"][0]["finish_reason"], "stop");
        assert!(last.get("usage").is_none());
        assert!(last["choices"][0]["delta"].get("role").is_none());
        let u = json(&usage_chunk(Flavor::Chat, &c)[6..]);
        assert_eq!(u["choices"], Value::Array(vec![]));
        assert_eq!(u["usage"]["completion_tokens"], 12);
    }

    #[test]
    fn embeddings_shape() {
        let v = json(&embeddings("text-embedding-3-small", 2, 4, false, 10));
        assert_eq!(v["data"][1]["index"], 1);
        assert_eq!(v["data"][0]["embedding"].as_array().map(Vec::len), Some(4));
        assert_eq!(v["usage"]["prompt_tokens"], 3);
        let v = json(&embeddings("e", 1, 3, true, 10));
        // 3 floats = 12 bytes = 16 base64 characters.
        assert_eq!(v["data"][0]["embedding"].as_str().map(str::len), Some(16));
    }

    #[test]
    fn base64_matches_known_vectors() {
        assert_eq!(base64_encode(b""), "");
        assert_eq!(base64_encode(b"f"), "Zg==");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert_eq!(base64_encode(b"foo"), "Zm9v");
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn masks_keys() {
        assert_eq!(mask_key("sk-c"), "sk***");
        assert_eq!(mask_key("sk-abcdef"), "sk-a*****");
        assert_eq!(mask_key("sk-live-1234567890abcd"), "sk-l**************abcd");
        assert_eq!(mask_key(""), "***");
        let body = invalid_key("sk-live-1234567890abcd");
        let v = json(&body);
        assert_eq!(v["error"]["code"], "invalid_api_key");
        assert!(v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("Incorrect API key provided: sk-l***")));
        assert!(!String::from_utf8_lossy(&body).contains("1234567890"));
    }

    #[test]
    fn echo_key_adds_the_whole_key_to_the_message_only() {
        let key = "sk-live-1234567890abcd";
        let v = json(&echo_key(&invalid_key(key), key));
        let message = v["error"]["message"].as_str().unwrap_or_default();
        assert!(message.starts_with("Incorrect API key provided: sk-l***"));
        assert!(message.ends_with("(key used: sk-live-1234567890abcd)"));
        assert_eq!(v["error"]["code"], "invalid_api_key");
        let v = json(&echo_key(&forbidden(), key));
        assert!(v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains(key)));
        assert_eq!(&echo_key(b"not json", key)[..], b"not json");
        assert_eq!(&echo_key(b"{}", key)[..], b"{}");
    }

    #[test]
    fn error_shapes() {
        let v = json(&missing_key());
        assert_eq!(v["error"]["code"], "missing_api_key");
        assert_eq!(v["error"]["param"], Value::Null);
        let v = json(&insufficient_quota());
        assert_eq!(v["error"]["type"], "insufficient_quota");
        let v = json(&rate_limited(Some("gpt-4o"), true, "2s"));
        assert!(
            v["error"]["message"].as_str().is_some_and(|m| m
                .contains(&format!("organization {ORG_ID}"))
                && m.contains("gpt-4o"))
        );
        let v = json(&rate_limited(None, false, "2s"));
        assert!(v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.contains("organization")));
        assert_eq!(json(&server_error(503))["error"]["type"], "server_error");
        assert_eq!(
            json(&not_found("GET", "/x"))["error"]["message"],
            "Invalid URL (GET /x)"
        );
    }

    #[test]
    fn model_list_shape() {
        let v = json(&model_list(&["a".to_string(), "b".to_string()]));
        assert_eq!(v["object"], "list");
        assert_eq!(v["data"][1]["id"], "b");
        assert_eq!(json(&model_object("a"))["object"], "model");
    }
}
