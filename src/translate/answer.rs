//! An Anthropic Messages answer as an OpenAI chat completion, and Anthropic's errors in OpenAI's
//! error shape.

use serde_json::{json, Value};

/// OpenAI's `finish_reason` for Anthropic's `stop_reason`.
fn finish_reason(stop_reason: Option<&str>) -> &'static str {
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
    let text: String = msg
        .get("content")
        .and_then(Value::as_array)
        .map(|blocks| {
            blocks
                .iter()
                .filter(|b| b.get("type").and_then(Value::as_str) == Some("text"))
                .filter_map(|b| b.get("text").and_then(Value::as_str))
                .collect()
        })
        .unwrap_or_default();
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
            "message": {"role": "assistant", "content": text, "refusal": null},
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

/// An upstream answer held whole until it ends, then handed back translated: a Messages answer
/// as a chat completion, an Anthropic error in OpenAI's shape, anything else as it came.
#[derive(Debug)]
pub struct AnswerTranslator {
    success: bool,
    held: Vec<u8>,
    too_large: bool,
}

impl AnswerTranslator {
    /// A translator for an answer with this status.
    pub fn new(status: u16) -> Self {
        Self {
            success: (200..300).contains(&status),
            held: Vec::new(),
            too_large: false,
        }
    }

    /// Takes the next chunk of the answer; beyond [`MAX_ANSWER_BYTES`] the rest is dropped.
    pub fn push(&mut self, chunk: &[u8]) {
        if self.held.len() + chunk.len() > MAX_ANSWER_BYTES {
            self.too_large = true;
            return;
        }
        self.held.extend_from_slice(chunk);
    }

    /// The translated answer, at its end (`created`: Unix seconds for a chat completion).
    pub fn finish(&mut self, created: u64) -> Vec<u8> {
        let held = std::mem::take(&mut self.held);
        if self.too_large {
            let error = json!({"error": {"message": "The upstream answer is too large to translate.",
                "type": "upstream_error", "param": null, "code": "upstream_error"}});
            return error.to_string().into_bytes();
        }
        let translated = if self.success {
            chat_completion(&held, created)
        } else {
            openai_error(&held)
        };
        translated.unwrap_or(held)
    }
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
        let mut t = AnswerTranslator::new(200);
        for chunk in body.chunks(7) {
            t.push(chunk);
        }
        let v: Value = serde_json::from_slice(&t.finish(5)).unwrap();
        assert_eq!(v["choices"][0]["message"]["content"], "Hi");
        assert_eq!(v["created"], 5);
        let mut t = AnswerTranslator::new(529);
        t.push(br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#);
        let v: Value = serde_json::from_slice(&t.finish(5)).unwrap();
        assert_eq!(v["error"]["type"], "overloaded_error");
        let mut t = AnswerTranslator::new(502);
        t.push(b"<html>bad gateway</html>");
        assert_eq!(t.finish(5), b"<html>bad gateway</html>");
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
