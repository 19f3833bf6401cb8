//! An Anthropic Messages event stream as an OpenAI `chat.completion.chunk` stream, event by
//! event: `message_start` opens the assistant's turn, each `text_delta` becomes a content chunk
//! (each `thinking_delta` a `reasoning_content` one; signatures have no OpenAI counterpart),
//! `message_delta` gives the finish reason (and the cumulative output tokens), `message_stop`
//! ends with the usage chunk (when the client asked for `stream_options.include_usage`) and
//! `data: [DONE]`. A mid-stream `error` event becomes an OpenAI error object, as OpenAI sends
//! one, and ends the stream. `ping` and block boundaries have no OpenAI counterpart.

use super::answer::finish_reason;
use serde_json::{json, Value};

/// The largest event held while it arrives (Anthropic's events are small: a text delta).
pub const MAX_EVENT_BYTES: usize = 1024 * 1024;

/// Translates one stream as its bytes pass; holds at most one incomplete event.
#[derive(Debug)]
pub struct StreamTranslator {
    created: u64,
    include_usage: bool,
    held: Vec<u8>,
    /// How much of `held` is known to hold no event end, so a long event arriving in many
    /// chunks is scanned once, not once per chunk.
    scanned: usize,
    id: Value,
    model: Value,
    prompt: u64,
    cached: u64,
    completion: u64,
    finish: Option<&'static str>,
    done: bool,
    /// Anthropic's block index of each tool call so far, in OpenAI's order.
    tool_blocks: Vec<u64>,
}

impl StreamTranslator {
    /// A translator for a stream `created` at that Unix time; `include_usage`: the client asked
    /// for the usage chunk.
    pub fn new(created: u64, include_usage: bool) -> Self {
        Self {
            created,
            include_usage,
            held: Vec::new(),
            scanned: 0,
            id: Value::Null,
            model: Value::Null,
            prompt: 0,
            cached: 0,
            completion: 0,
            finish: None,
            done: false,
            tool_blocks: Vec::new(),
        }
    }

    /// Takes the next bytes of the Anthropic stream; returns the OpenAI bytes they make.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        self.held.extend_from_slice(chunk);
        // An end (`\n\n` or `\n\r\n`) may straddle the previous chunk's last two bytes.
        let mut from = self.scanned.saturating_sub(2);
        while let Some((end, skip)) = event_end(&self.held[from..]) {
            let end = from + end;
            let event: Vec<u8> = self.held.drain(..end + skip).take(end).collect();
            self.on_event(&event, &mut out);
            from = 0;
        }
        self.scanned = self.held.len();
        if self.held.len() > MAX_EVENT_BYTES {
            // Not an Anthropic stream: nothing sensible can come of it.
            self.held.clear();
            self.scanned = 0;
        }
        out
    }

    /// The end of the stream: whatever a last event without its blank line says, and the end
    /// marker when the upstream never sent `message_stop` (a cut stream still ends cleanly for
    /// the client's parser, which then sees no finish reason).
    pub fn finish(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        let rest = std::mem::take(&mut self.held);
        self.scanned = 0;
        if !rest.iter().all(u8::is_ascii_whitespace) {
            self.on_event(&rest, &mut out);
        }
        if !self.done {
            self.done = true;
            out.extend_from_slice(b"data: [DONE]\n\n");
        }
        out
    }

    fn on_event(&mut self, event: &[u8], out: &mut Vec<u8>) {
        if self.done {
            return;
        }
        let Some(data) = event_data(event) else {
            return;
        };
        let Ok(v) = serde_json::from_slice::<Value>(&data) else {
            return;
        };
        match v.get("type").and_then(Value::as_str) {
            Some("message_start") => {
                let msg = v.get("message").unwrap_or(&Value::Null);
                self.id = msg.get("id").cloned().unwrap_or(Value::Null);
                self.model = msg.get("model").cloned().unwrap_or(Value::Null);
                self.read_usage(msg.get("usage"));
                self.chunk(out, json!({"role": "assistant", "content": ""}), None);
            }
            Some("content_block_start") => {
                let block = v.get("content_block").unwrap_or(&Value::Null);
                if block.get("type").and_then(Value::as_str) == Some("tool_use") {
                    let index = self.tool_blocks.len();
                    self.tool_blocks
                        .push(v.get("index").and_then(Value::as_u64).unwrap_or(0));
                    let call = json!({
                        "index": index,
                        "id": block.get("id").cloned().unwrap_or(Value::Null),
                        "type": "function",
                        "function": {"name": block.get("name").cloned().unwrap_or(Value::Null), "arguments": ""},
                    });
                    self.chunk(out, json!({"tool_calls": [call]}), None);
                }
            }
            Some("content_block_delta") => {
                let delta = v.get("delta").unwrap_or(&Value::Null);
                match delta.get("type").and_then(Value::as_str) {
                    Some("text_delta") => {
                        let text = delta.get("text").cloned().unwrap_or(Value::Null);
                        self.chunk(out, json!({"content": text}), None);
                    }
                    Some("thinking_delta") => {
                        let text = delta.get("thinking").cloned().unwrap_or(Value::Null);
                        self.chunk(out, json!({"reasoning_content": text}), None);
                    }
                    Some("input_json_delta") => {
                        let block = v.get("index").and_then(Value::as_u64).unwrap_or(0);
                        let Some(index) = self.tool_blocks.iter().position(|b| *b == block) else {
                            return;
                        };
                        let part = delta.get("partial_json").cloned().unwrap_or(Value::Null);
                        let call = json!({"index": index, "function": {"arguments": part}});
                        self.chunk(out, json!({"tool_calls": [call]}), None);
                    }
                    _ => {}
                }
            }
            Some("message_delta") => {
                self.read_usage(v.get("usage"));
                let stop = v.pointer("/delta/stop_reason").and_then(Value::as_str);
                let finish = finish_reason(stop);
                self.finish = Some(finish);
                self.chunk(out, json!({}), Some(finish));
            }
            Some("message_stop") => {
                if self.include_usage {
                    let usage = self.usage();
                    let chunk = json!({
                        "id": self.id, "object": "chat.completion.chunk", "created": self.created,
                        "model": self.model, "choices": [], "usage": usage,
                    });
                    sse(out, &chunk);
                }
                out.extend_from_slice(b"data: [DONE]\n\n");
                self.done = true;
            }
            Some("error") => {
                let error = v.get("error").unwrap_or(&Value::Null);
                let kind = error.get("type").cloned().unwrap_or(Value::Null);
                let message = error.get("message").cloned().unwrap_or(Value::Null);
                sse(
                    out,
                    &json!({"error": {"message": message, "type": kind, "param": null, "code": kind}}),
                );
                self.done = true;
            }
            // ping, content_block_stop, and whatever comes next.
            _ => {}
        }
    }

    /// Cumulative counts: each replaces what was read before, none is added twice.
    fn read_usage(&mut self, usage: Option<&Value>) {
        let Some(usage) = usage.filter(|u| u.is_object()) else {
            return;
        };
        let count = |k: &str| usage.get(k).and_then(Value::as_u64);
        if let Some(input) = count("input_tokens") {
            let created = count("cache_creation_input_tokens").unwrap_or(0);
            self.cached = count("cache_read_input_tokens").unwrap_or(0);
            self.prompt = input.saturating_add(created).saturating_add(self.cached);
        }
        if let Some(output) = count("output_tokens") {
            self.completion = output;
        }
    }

    fn usage(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "total_tokens": self.prompt.saturating_add(self.completion),
            "prompt_tokens_details": {"cached_tokens": self.cached},
        })
    }

    fn chunk(&self, out: &mut Vec<u8>, delta: Value, finish: Option<&str>) {
        let mut chunk = json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        });
        if self.include_usage {
            chunk["usage"] = Value::Null;
        }
        sse(out, &chunk);
    }
}

/// `data: <json>` and the blank line.
fn sse(out: &mut Vec<u8>, value: &Value) {
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(value.to_string().as_bytes());
    out.extend_from_slice(b"\n\n");
}

/// Where the first event in `held` ends (before its blank line) and how long that blank line is.
fn event_end(held: &[u8]) -> Option<(usize, usize)> {
    let mut i = 0;
    while i < held.len() {
        if held[i] == b'\n' {
            let rest = &held[i + 1..];
            if rest.first() == Some(&b'\n') {
                return Some((i, 2));
            }
            if rest.starts_with(b"\r\n") {
                return Some((i, 3));
            }
        }
        i += 1;
    }
    None
}

/// The joined `data:` lines of an event; `None` when it has none.
fn event_data(event: &[u8]) -> Option<Vec<u8>> {
    let mut data: Option<Vec<u8>> = None;
    for line in event.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(rest) = line.strip_prefix(b"data:") {
            let rest = rest.strip_prefix(b" ").unwrap_or(rest);
            let d = data.get_or_insert_with(Vec::new);
            if !d.is_empty() {
                d.push(b'\n');
            }
            d.extend_from_slice(rest);
        }
    }
    data
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The events of an OpenAI stream: each `data:` payload parsed (`[DONE]` as a string), so
    /// that the comparison does not depend on key order. Every event must be one `data:` line.
    fn events(text: &str) -> Vec<Value> {
        assert!(text.ends_with("\n\n"), "{text:?}");
        text.trim_end()
            .split("\n\n")
            .map(|e| {
                let data = e.strip_prefix("data: ").unwrap_or_else(|| panic!("{e:?}"));
                assert!(!data.contains('\n'), "{e:?}");
                if data == "[DONE]" {
                    Value::String(data.into())
                } else {
                    serde_json::from_str(data).unwrap()
                }
            })
            .collect()
    }

    /// Every stream of the corpus, fed whole, byte by byte and cut at every offset, must come out
    /// as recorded.
    #[test]
    fn every_corpus_stream_translates_as_recorded() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/translate/streams");
        let cases: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap())
                .unwrap();
        for case in cases.as_array().unwrap() {
            let name = case["name"].as_str().unwrap();
            let include_usage = case["include_usage"].as_bool().unwrap();
            let input = std::fs::read(dir.join(format!("{name}.anthropic.sse"))).unwrap();
            let want = std::fs::read_to_string(dir.join(format!("{name}.openai.sse"))).unwrap();
            let run = |pieces: &[&[u8]]| {
                let mut t = StreamTranslator::new(1_767_225_600, include_usage);
                let mut out = Vec::new();
                for p in pieces {
                    out.extend(t.feed(p));
                }
                out.extend(t.finish());
                String::from_utf8(out).unwrap()
            };
            let want = events(&want);
            assert_eq!(events(&run(&[&input])), want, "{name}");
            let bytes: Vec<&[u8]> = input.chunks(1).collect();
            assert_eq!(events(&run(&bytes)), want, "{name} byte by byte");
            for cut in (0..input.len()).step_by(7) {
                let got = events(&run(&[&input[..cut], &input[cut..]]));
                assert_eq!(got, want, "{name} cut at {cut}");
            }
        }
    }

    #[test]
    fn a_stream_cut_short_still_ends_with_done() {
        let mut t = StreamTranslator::new(1, false);
        let mut out = t.feed(b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"model\":\"c\",\"usage\":{\"input_tokens\":3}}}\n\nevent: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}");
        out.extend(t.finish());
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("\"content\":\"Hi\""), "{text}");
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
        assert_eq!(text.matches("[DONE]").count(), 1);
    }

    #[test]
    fn junk_never_grows_the_held_bytes_without_bound() {
        let mut t = StreamTranslator::new(1, false);
        for _ in 0..3 {
            assert!(t.feed(&vec![b'x'; MAX_EVENT_BYTES]).is_empty());
        }
        assert!(t.held.len() <= MAX_EVENT_BYTES);
        assert_eq!(t.finish(), b"data: [DONE]\n\n");
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_in_any_chunks_never_panic_and_end_with_one_done(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
            cut in 0usize..512,
        ) {
            let cut = cut.min(bytes.len());
            let mut t = StreamTranslator::new(1, true);
            let mut out = t.feed(&bytes[..cut]);
            out.extend(t.feed(&bytes[cut..]));
            out.extend(t.finish());
            proptest::prop_assert!(t.held.is_empty());
            let text = String::from_utf8_lossy(&out);
            proptest::prop_assert!(text.matches("data: [DONE]").count() <= 1);
        }
    }
}
