//! Token accounting from OpenAI-compatible responses, read as the body streams past.
//!
//! Upstreams report what a request cost in a `usage` object: `prompt_tokens`/`completion_tokens`
//! (chat, completions; embeddings only have `prompt_tokens`) or `input_tokens`/`output_tokens`
//! (the Responses API). Where it sits depends on the response:
//!
//! - a plain JSON body has it at the top level, near the end;
//! - a chat stream (SSE) has it in a last chunk `{"choices":[],"usage":{..}}` when the request set
//!   `stream_options.include_usage` (every other chunk then says `"usage":null`);
//! - a Responses API stream has it in `response.completed` as `response.usage`.
//! - an Anthropic Messages stream has the input in `message_start` as `message.usage` and the
//!   cumulative output in each `message_delta`'s `usage`: the last one counts, on top of the
//!   input already read (prompt-cache tokens, which Anthropic reports beside `input_tokens`,
//!   count as input).
//!
//! [`UsageMeter`] reads it from the body chunks as the proxy forwards them, without ever buffering
//! the body: a JSON body leaves only its last [`JSON_TAIL_BYTES`] in a ring buffer, a stream only
//! its incomplete last event (up to [`MAX_EVENT_BYTES`]). Chunks without usage cost a `memchr`
//! scan and nothing else: no JSON parsing, no allocation.
//!
//! [`UsageChunkStripper`] hides the usage-only chunk from clients that did not ask for it (keygate
//! asks for it on their behalf so that every stream can be metered), passing every other byte
//! through unchanged and, where it can, without copying.
//!
//! Layout: `sse` cuts a stream into events (one framer, shared by the meter and the stripper),
//! `json_scan` looks for keys in JSON text without parsing it, `json_tail` keeps and reads the end
//! of a JSON body, `meter` and `strip` are the two consumers.

mod json_scan;
mod json_tail;
mod meter;
mod sse;
mod strip;
#[cfg(test)]
mod test_fixtures;

pub use meter::UsageMeter;
pub use strip::UsageChunkStripper;

use serde::Deserialize;
use serde_json::Value;

/// How much of the end of a JSON body [`UsageMeter`] keeps. OpenAI puts `usage` last and it is a
/// few hundred bytes; 16 KiB also leaves room for providers that append other fields after it.
pub const JSON_TAIL_BYTES: usize = 16 * 1024;

/// The largest SSE event kept whole between chunks. Usage chunks are well under 1 KiB and a
/// `response.completed` event repeats the whole response, so 1 MiB is generous. Rather than grow
/// without bound, the meter reads a larger event from its last [`JSON_TAIL_BYTES`] only (where
/// `usage` is), and the stripper passes it through unexamined (it cannot be a usage-only chunk).
pub const MAX_EVENT_BYTES: usize = 1024 * 1024;

/// Tokens one request used, as the upstream reported them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Input tokens (`prompt_tokens` or `input_tokens`).
    pub prompt: u64,
    /// Output tokens (`completion_tokens` or `output_tokens`); 0 for embeddings.
    pub completion: u64,
}

impl Usage {
    /// Prompt plus completion tokens (saturating: the numbers come from the network).
    pub fn total(&self) -> u64 {
        self.prompt.saturating_add(self.completion)
    }
}

/// The `usage` object as sent. Both spellings are separate fields rather than `#[serde(alias)]`:
/// with an alias, a provider that sends both (`prompt_tokens` and `input_tokens`) would fail the
/// whole parse with "duplicate field", and that request would go unmetered.
///
/// Anthropic reports prompt-cache tokens beside `input_tokens`, not inside it
/// (`cache_creation_input_tokens`, `cache_read_input_tokens`); they are input all the same, so
/// they are added to it, as OpenAI's `prompt_tokens` already includes its cached tokens.
#[derive(Deserialize)]
struct RawUsage {
    prompt_tokens: Option<u64>,
    input_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    output_tokens: Option<u64>,
    total_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
}

impl RawUsage {
    /// Input tokens: `prompt_tokens`, else `input_tokens` plus Anthropic's cache tokens.
    fn prompt(&self) -> Option<u64> {
        self.prompt_tokens.or_else(|| {
            let cached = self
                .cache_creation_input_tokens
                .unwrap_or(0)
                .saturating_add(self.cache_read_input_tokens.unwrap_or(0));
            self.input_tokens.map(|i| i.saturating_add(cached))
        })
    }

    /// Output tokens as reported, without deriving them from a total.
    fn completion(&self) -> Option<u64> {
        self.completion_tokens.or(self.output_tokens)
    }

    /// `None` when the object has no token count at all (`{}`), which says nothing about cost.
    /// A missing completion count is `total - prompt`: embeddings send only those two, and the
    /// difference is then 0.
    fn into_usage(self) -> Option<Usage> {
        let prompt = self.prompt();
        let completion = self.completion();
        if prompt.is_none() && completion.is_none() {
            return None;
        }
        let prompt = prompt.unwrap_or(0);
        let completion = completion
            .or_else(|| self.total_tokens.map(|total| total.saturating_sub(prompt)))
            .unwrap_or(0);
        Some(Usage { prompt, completion })
    }
}

/// Usage from an already parsed `usage` value; `None` unless it is an object with token counts.
fn usage_from_value(value: &Value) -> Option<Usage> {
    if !value.is_object() {
        return None;
    }
    RawUsage::deserialize(value).ok()?.into_usage()
}

/// The counts a `usage` value reports, each `None` when absent: Anthropic's `message_delta`
/// events report only some (always the cumulative `output_tokens`).
fn usage_parts(value: &Value) -> Option<(Option<u64>, Option<u64>)> {
    if !value.is_object() {
        return None;
    }
    let raw = RawUsage::deserialize(value).ok()?;
    Some((raw.prompt(), raw.completion()))
}

/// Usage from the object that starts at `object[0]`, ignoring whatever follows it. An object cut
/// short (the body ended inside it) fails to parse and gives `None`, never a guess.
fn usage_from_object_prefix(object: &[u8]) -> Option<Usage> {
    let mut values = serde_json::Deserializer::from_slice(object).into_iter::<RawUsage>();
    match values.next() {
        Some(Ok(raw)) => raw.into_usage(),
        _ => None,
    }
}
