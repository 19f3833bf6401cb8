//! An Anthropic Messages answer as an OpenAI chat completion, and Anthropic's errors in OpenAI's
//! error shape.

use super::stream::StreamTranslator;
use serde_json::{json, Value};

/// OpenAI's `finish_reason` for Anthropic's `stop_reason`.
pub(super) fn finish_reason(stop_reason: Option<&str>) -> &'static str {
    match stop_reason {
        Some("max_tokens") => "length",
        Some("tool_use") => "tool_calls",
        Some("refusal") => "content_filter",
        // end_turn, stop_sequence, pause_turn, and whatever comes next.
        _ => "stop",
    }
}

/// The chat completion for a successful Messages answer `body`, `created` at that Unix time;
/// `None` when `body` is not a Messages answer (it then passes as it came).
pub fn chat_completion(body: &[u8], created: u64) -> Option<Vec<u8>> {
    let msg: Value = serde_json::from_slice(body).ok()?;
    if msg.get("type").and_then(Value::as_str) != Some("message") {
        return None;
    }
    let blocks: &[Value] = msg
        .get("content")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice);
    let text: String = blocks
        .iter()
        .filter(|b| b.get("type").and_then(Value::as_str) == Some("text"))
        .filter_map(|b| b.get("text").and_then(Value::as_str))
        .collect();
    let reasoning: String = blocks
        .iter()
        .filter(|b| b.get("type").and_then(Value::as_str) == Some("thinking"))
        .filter_map(|b| b.get("thinking").and_then(Value::as_str))
        .collect();
    let calls = super::tools::tool_calls(blocks);
    let mut message = json!({"role": "assistant", "content": text, "refusal": null});
    if !reasoning.is_empty() {
        message["reasoning_content"] = Value::String(reasoning);
    }
    if !calls.is_empty() {
        if text.is_empty() {
            message["content"] = Value::Null;
        }
        message["tool_calls"] = Value::Array(calls);
    }
    let usage = msg.get("usage").unwrap_or(&Value::Null);
    let count = |k: &str| usage.get(k).and_then(Value::as_u64).unwrap_or(0);
    let cached = count("cache_read_input_tokens");
    let prompt = count("input_tokens")
        .saturating_add(count("cache_creation_input_tokens"))
        .saturating_add(cached);
    let completion = count("output_tokens");
    let out = json!({
        "id": msg.get("id").cloned().unwrap_or(Value::Null),
        "object": "chat.completion",
        "created": created,
        "model": msg.get("model").cloned().unwrap_or(Value::Null),
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": null,
            "finish_reason": finish_reason(msg.get("stop_reason").and_then(Value::as_str)),
        }],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt.saturating_add(completion),
            "prompt_tokens_details": {"cached_tokens": cached},
        },
    });
    Some(out.to_string().into_bytes())
}

/// An Anthropic error body (`{"type":"error","error":{"type","message"}}`) in OpenAI's shape,
/// keeping Anthropic's type; `None` when `body` is not one.
pub fn openai_error(body: &[u8]) -> Option<Vec<u8>> {
    let v: Value = serde_json::from_slice(body).ok()?;
    if v.get("type").and_then(Value::as_str) != Some("error") {
        return None;
    }
    let error = v.get("error")?;
    let kind = error.get("type").and_then(Value::as_str)?;
    let message = error.get("message").and_then(Value::as_str).unwrap_or("");
    let out = json!({"error": {"message": message, "type": kind, "param": null, "code": kind}});
    Some(out.to_string().into_bytes())
}

/// The largest upstream answer held for translation (a non-streamed answer is bounded by its
/// `max_tokens`; this is far above any).
pub const MAX_ANSWER_BYTES: usize = 32 * 1024 * 1024;

/// Turns an Anthropic answer into an OpenAI one as it passes: an event stream event by event
/// (see [`StreamTranslator`]); any other answer held whole until it ends, then a Messages answer
/// as a chat completion, an Anthropic error in OpenAI's shape, anything else as it came.
#[derive(Debug)]
pub enum AnswerTranslator {
    /// A whole answer, held.
    Whole {
        /// A 2xx answer (a message), else an error.
        success: bool,
        /// Unix seconds for `created`.
        created: u64,
        /// What arrived so far.
        held: Vec<u8>,
        /// It outgrew [`MAX_ANSWER_BYTES`].
        too_large: bool,
    },
    /// A successful event stream.
    Stream(StreamTranslator),
}

impl AnswerTranslator {
    /// A translator for an answer with this status and `Content-Type`, `created` at that Unix
    /// time; `include_usage`: the client of a stream asked for the usage chunk.
    pub fn new(status: u16, content_type: &str, created: u64, include_usage: bool) -> Self {
        let success = (200..300).contains(&status);
        if success && is_event_stream(content_type) {
            return AnswerTranslator::Stream(StreamTranslator::new(created, include_usage));
        }
        AnswerTranslator::Whole {
            success,
            created,
            held: Vec::new(),
            too_large: false,
        }
    }

    /// Whether the answer is translated as a stream (its `Content-Type` stays).
    pub fn is_stream(&self) -> bool {
        matches!(self, AnswerTranslator::Stream(_))
    }

    /// Takes the next chunk of the answer; returns what can go to the client now. A whole answer
    /// beyond [`MAX_ANSWER_BYTES`] drops the rest.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<u8> {
        match self {
            AnswerTranslator::Stream(s) => s.feed(chunk),
            AnswerTranslator::Whole {
                held, too_large, ..
            } => {
                if held.len() + chunk.len() > MAX_ANSWER_BYTES {
                    *too_large = true;
                } else {
                    held.extend_from_slice(chunk);
                }
                Vec::new()
            }
        }
    }

    /// The rest of the translated answer, at its end.
    pub fn finish(&mut self) -> Vec<u8> {
        match self {
            AnswerTranslator::Stream(s) => s.finish(),
            AnswerTranslator::Whole {
                success,
                created,
                held,
                too_large,
            } => {
                let held = std::mem::take(held);
                if *too_large {
                    let error = json!({"error": {"message": "The upstream answer is too large to translate.",
                        "type": "upstream_error", "param": null, "code": "upstream_error"}});
                    return error.to_string().into_bytes();
                }
                let translated = if *success {
                    chat_completion(&held, *created)
                } else {
                    openai_error(&held)
                };
                translated.unwrap_or(held)
            }
        }
    }
}

/// Whether a `Content-Type` is `text/event-stream` (any case, parameters allowed).
fn is_event_stream(content_type: &str) -> bool {
    content_type
        .trim_start()
        .get(..17)
        .is_some_and(|p| p.eq_ignore_ascii_case("text/event-stream"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn every_corpus_answer_translates_as_recorded() {
        for (name, case) in super::super::corpus("answers") {
            let body = case["anthropic"].to_string();
            let got = if case["error"] == true {
                openai_error(body.as_bytes())
            } else {
                chat_completion(body.as_bytes(), 1_767_225_600)
            };
            let got: Value = serde_json::from_slice(&got.expect(&name)).unwrap();
            assert_eq!(got, case["openai"], "{name}");
        }
    }

    #[test]
    fn an_answer_split_into_chunks_is_translated_whole_at_its_end() {
        let body = br#"{"id":"msg_1","type":"message","model":"m","content":[{"type":"text","text":"Hi"}],"stop_reason":"end_turn","usage":{"input_tokens":1,"output_tokens":2}}"#;
        let mut t = AnswerTranslator::new(200, "application/json", 5, false);
        assert!(!t.is_stream());
        for chunk in body.chunks(7) {
            assert!(t.feed(chunk).is_empty());
        }
        let v: Value = serde_json::from_slice(&t.finish()).unwrap();
        assert_eq!(v["choices"][0]["message"]["content"], "Hi");
        assert_eq!(v["created"], 5);
        // An error is never a stream, whatever its content type says.
        let mut t = AnswerTranslator::new(529, "text/event-stream", 5, false);
        assert!(!t.is_stream());
        t.feed(br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#);
        let v: Value = serde_json::from_slice(&t.finish()).unwrap();
        assert_eq!(v["error"]["type"], "overloaded_error");
        let mut t = AnswerTranslator::new(502, "text/html", 5, false);
        t.feed(b"<html>bad gateway</html>");
        assert_eq!(t.finish(), b"<html>bad gateway</html>");
        let t = AnswerTranslator::new(200, "Text/Event-Stream; charset=utf-8", 5, true);
        assert!(t.is_stream());
    }

    #[test]
    fn stop_reasons_map_to_finish_reasons() {
        for (stop, finish) in [
            (Some("end_turn"), "stop"),
            (Some("stop_sequence"), "stop"),
            (Some("max_tokens"), "length"),
            (Some("tool_use"), "tool_calls"),
            (Some("refusal"), "content_filter"),
            (Some("something_new"), "stop"),
            (None, "stop"),
        ] {
            assert_eq!(finish_reason(stop), finish, "{stop:?}");
        }
    }

    #[test]
    fn bodies_that_are_not_anthropics_pass_as_they_came() {
        for body in [
            &b"<html>502</html>"[..],
            b"{\"error\":{\"message\":\"x\"}}",
            b"",
            b"{\"type\":\"ping\"}",
        ] {
            assert_eq!(chat_completion(body, 0), None);
            assert_eq!(openai_error(body), None);
        }
    }
}
