//! Translation between OpenAI's Chat Completions API and Anthropic's Messages API, for routes
//! with `translate: openai` whose upstreams speak Anthropic's API: an OpenAI client's
//! `POST /v1/chat/completions` becomes a Messages request, and the Messages answer becomes a
//! chat completion. Plain Rust on whole JSON values, no sockets.
//!
//! Built so far: text conversations (system and developer messages, text parts, `max_tokens`
//! with a configured default since Anthropic requires one, `temperature`, `top_p`, `stop`,
//! `user`, `reasoning_effort` as thinking, images, function tools with `tool_choice`, tool calls and their results), whole and
//! streamed,
//! answers with their stop reasons, tool calls, thinking (as `reasoning_content`) and usage
//! (`stream_options.include_usage` included), and Anthropic's errors in OpenAI's shape, mid-stream
//! ones too. Everything else a request may ask for (audio and file parts, `n > 1`, `logprobs`, unknown
//! parameters) is refused with a 400 that names it, never half-translated.
//!
//! Layout: `request` maps the client's request, `answer` maps the upstream's answer and errors,
//! `stream` maps an event stream event by event, `tools` maps tools and tool calls both ways.
//! The golden corpus under `tests/corpus/translate/` is checked pair by pair at the bottom of
//! each.

mod answer;
mod request;
mod stream;
mod tools;

pub use answer::{chat_completion, openai_error, AnswerTranslator, MAX_ANSWER_BYTES};
pub use request::messages_request;
pub use stream::StreamTranslator;

/// Why a request cannot be translated; the `Display` text is meant for the client, in the
/// `message` of an OpenAI-style 400 error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TranslateError {
    /// The body is not a JSON object.
    #[error("The request body must be a JSON object: {0}.")]
    NotJson(String),
    /// A parameter keygate does not translate (yet), or a value of it that has no Anthropic
    /// equivalent.
    #[error("'{param}' cannot be translated for this Anthropic route: {why}.")]
    Unsupported {
        /// The parameter (`stream`, `tools`, `messages[2].content[1]`, …).
        param: String,
        /// What about it.
        why: String,
    },
    /// A parameter with a value of the wrong type or shape.
    #[error("Invalid value for '{param}': {why}.")]
    Invalid {
        /// The parameter.
        param: String,
        /// What is wrong.
        why: String,
    },
}

impl TranslateError {
    /// The request parameter the error is about, for the `param` field of the error.
    pub fn param(&self) -> Option<&str> {
        match self {
            TranslateError::NotJson(_) => None,
            TranslateError::Unsupported { param, .. } | TranslateError::Invalid { param, .. } => {
                Some(param)
            }
        }
    }
}

/// `Unsupported` for `param`.
fn unsupported(param: impl Into<String>, why: impl Into<String>) -> TranslateError {
    TranslateError::Unsupported {
        param: param.into(),
        why: why.into(),
    }
}

/// `Invalid` for `param`.
fn invalid(param: impl Into<String>, why: impl Into<String>) -> TranslateError {
    TranslateError::Invalid {
        param: param.into(),
        why: why.into(),
    }
}

/// The golden corpus: `(file name, JSON)` of every file in `tests/corpus/translate/<dir>`.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
fn corpus(dir: &str) -> Vec<(String, serde_json::Value)> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus/translate")
        .join(dir);
    let mut files: Vec<_> = std::fs::read_dir(&path)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no corpus in {}", path.display());
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            let value =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p.file_name().unwrap().to_string_lossy().into_owned(), value)
        })
        .collect()
}
