//! [`UsageMeter`]: the usage a response reports, read from its body chunks as they pass.

use std::ops::Range;

use bytes::BytesMut;
use serde::Deserialize;
use serde_json::Value;

use super::json_scan::{has_usage_object, USAGE_KEY};
use super::json_tail::{last_usage_in_json, JsonTail};
use super::sse::{event_data, Events, Leftover, SseFramer};
use super::{usage_from_value, Usage, JSON_TAIL_BYTES, MAX_EVENT_BYTES};

/// Feeds on response body chunks as they pass; never holds more than a small bounded tail.
///
/// Call [`feed`](Self::feed) with every body chunk, then [`finish`](Self::finish) at the end.
#[derive(Debug)]
pub struct UsageMeter {
    mode: Mode,
}

#[derive(Debug)]
enum Mode {
    Json(JsonTail),
    Sse(SseMeter),
}

impl UsageMeter {
    /// A meter for a response of this `Content-Type`: SSE when it starts with `text/event-stream`
    /// (any case), a JSON body otherwise.
    pub fn for_response(content_type: &str) -> UsageMeter {
        let is_sse = content_type
            .trim_start()
            .as_bytes()
            .get(..b"text/event-stream".len())
            .is_some_and(|prefix| prefix.eq_ignore_ascii_case(b"text/event-stream"));
        let mode = if is_sse {
            Mode::Sse(SseMeter::default())
        } else {
            Mode::Json(JsonTail::default())
        };
        UsageMeter { mode }
    }

    /// Takes the next chunk of the response body.
    pub fn feed(&mut self, chunk: &[u8]) {
        match &mut self.mode {
            Mode::Json(tail) => tail.push(chunk),
            Mode::Sse(sse) => sse.feed(chunk),
        }
    }

    /// The usage the response reported, read at the end of the body; the last one seen wins.
    ///
    /// For JSON, that is the last top-level `usage` object in the tail; when there is none, the
    /// last `usage` object at any depth. For SSE, a final event that lacks its closing blank line
    /// is still read, since metering should not depend on the upstream's last two bytes.
    /// Calling it again gives the same answer.
    pub fn finish(&mut self) -> Option<Usage> {
        match &mut self.mode {
            Mode::Json(tail) => last_usage_in_json(tail.contiguous()),
            Mode::Sse(sse) => sse.finish(),
        }
    }

    /// Bytes the meter holds allocated between chunks, which stays bounded whatever the body
    /// (for the fuzz targets' memory check; not part of the API).
    #[doc(hidden)]
    pub fn buffered_bytes(&self) -> usize {
        match &self.mode {
            Mode::Json(tail) => tail.buffered_bytes(),
            Mode::Sse(sse) => {
                let oversized = sse.events.oversized.as_ref().map_or(0, |tail| {
                    std::mem::size_of::<JsonTail>() + tail.buffered_bytes()
                });
                sse.framer.buffered_bytes() + oversized
            }
        }
    }

    /// How many SSE events were parsed as JSON: each must be parsed at most once.
    #[cfg(test)]
    pub(super) fn sse_parses(&self) -> u32 {
        match &self.mode {
            Mode::Sse(sse) => sse.events.parses,
            Mode::Json(_) => panic!("not an SSE meter"),
        }
    }
}

/// What the meter needs from an event's JSON; every other field is skipped unparsed.
#[derive(Deserialize)]
struct EventPayload {
    #[serde(rename = "type")]
    kind: Option<String>,
    usage: Option<Value>,
    response: Option<ResponsePayload>,
    message: Option<ResponsePayload>,
}

/// The `response` object of a Responses API event, or the `message` of Anthropic's
/// `message_start`.
#[derive(Deserialize)]
struct ResponsePayload {
    usage: Option<Value>,
}

/// What one event says about usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Report {
    /// The whole usage so far: it replaces what was read before.
    Whole(Usage),
    /// Anthropic's `message_delta`: cumulative counts for what it names (always the output
    /// tokens; newer versions repeat the input ones); the others stay as read before.
    Update {
        prompt: Option<u64>,
        completion: Option<u64>,
    },
}

/// Usage from one event's data: top-level `usage` (chat, completions; Anthropic's
/// `message_delta`, which updates), else `response.usage` (Responses API), else
/// `message.usage` (Anthropic's `message_start`).
fn event_usage(data: &[u8]) -> Option<Report> {
    let payload: EventPayload = serde_json::from_slice(data).ok()?;
    if payload.kind.as_deref() == Some("message_delta") {
        let (prompt, completion) = super::usage_parts(payload.usage.as_ref()?)?;
        return Some(Report::Update { prompt, completion });
    }
    payload
        .usage
        .as_ref()
        .and_then(usage_from_value)
        .or_else(|| payload.response?.usage.as_ref().and_then(usage_from_value))
        .or_else(|| payload.message?.usage.as_ref().and_then(usage_from_value))
        .map(Report::Whole)
}

/// The meter of an SSE response: the framer cuts the events, [`EventUsage`] reads them.
#[derive(Debug, Default)]
struct SseMeter {
    framer: SseFramer,
    events: EventUsage,
}

impl SseMeter {
    fn feed(&mut self, chunk: &[u8]) {
        self.framer.feed(chunk, &mut self.events);
    }

    fn finish(&mut self) -> Option<Usage> {
        match self.framer.finish() {
            Leftover::Nothing => {}
            Leftover::Oversized => self.events.end(),
            Leftover::Held(event) => self.events.on_event(&event),
        }
        self.events.last
    }
}

/// The usage read from the events of a stream so far.
#[derive(Debug, Default)]
struct EventUsage {
    /// The current event outgrew [`MAX_EVENT_BYTES`]: only its tail is kept, in case it ends
    /// with usage (a Responses API `response.completed` repeats the whole output, base64 images
    /// included, and reports `usage` last).
    oversized: Option<Box<JsonTail>>,
    last: Option<Usage>,
    /// Events parsed as JSON, to prove that each is parsed at most once.
    #[cfg(test)]
    parses: u32,
}

impl Events for EventUsage {
    fn whole(&mut self, chunk: &[u8], range: Range<usize>) {
        self.on_whole_event(&chunk[range]);
    }

    fn joined(&mut self, event: &mut BytesMut) {
        self.on_whole_event(event);
    }

    /// From here on only the event's tail is kept.
    fn outgrown(&mut self, held: &mut BytesMut) {
        log::debug!(
            "usage meter: an SSE event is larger than {MAX_EVENT_BYTES} bytes; \
             reading usage from its last {JSON_TAIL_BYTES} bytes only"
        );
        let mut tail = Box::<JsonTail>::default();
        tail.push(held);
        self.oversized = Some(tail);
    }

    fn part(&mut self, chunk: &[u8], range: Range<usize>) {
        self.oversized.get_or_insert_default().push(&chunk[range]);
    }

    fn end(&mut self) {
        if let Some(mut tail) = self.oversized.take() {
            self.on_oversized_event(tail.contiguous());
        }
    }
}

impl EventUsage {
    /// A whole event. One larger than [`MAX_EVENT_BYTES`] is read from its tail, as if it had
    /// come in parts, so that what is read does not depend on where the chunks were cut.
    fn on_whole_event(&mut self, event: &[u8]) {
        if event.len() > MAX_EVENT_BYTES {
            self.on_oversized_event(&event[event.len() - JSON_TAIL_BYTES..]);
        } else {
            self.on_event(event);
        }
    }

    fn on_event(&mut self, event: &[u8]) {
        // The common case, a content chunk, leaves here after one memchr-speed scan.
        if USAGE_KEY.find(event).is_none() {
            return;
        }
        let data = event_data(event);
        // With include_usage every chunk says `"usage":null`: only an object is worth a parse.
        if !has_usage_object(&data) {
            return;
        }
        #[cfg(test)]
        {
            self.parses += 1;
        }
        match event_usage(&data) {
            Some(Report::Whole(usage)) => self.last = Some(usage),
            Some(Report::Update { prompt, completion }) => {
                // Cumulative counts: they replace, never add to, what `message_start` said.
                let before = self.last.unwrap_or_default();
                self.last = Some(Usage {
                    prompt: prompt.unwrap_or(before.prompt),
                    completion: completion.unwrap_or(before.completion),
                });
            }
            None => {}
        }
    }

    /// Reads the usage from the last [`JSON_TAIL_BYTES`] of an event too large to keep whole,
    /// as for a JSON body: `usage` at the top of the event's JSON (chat), else the last nested
    /// one (`response.usage`). Usage further from the event's end than that goes unread.
    fn on_oversized_event(&mut self, tail: &[u8]) {
        if !has_usage_object(tail) {
            return;
        }
        #[cfg(test)]
        {
            self.parses += 1;
        }
        if let Some(usage) = last_usage_in_json(tail) {
            self.last = Some(usage);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::usage::test_fixtures::*;
    use serde_json::json;

    fn meter_once(content_type: &str, body: &[u8]) -> Option<Usage> {
        metered(content_type, [body]).finish()
    }

    fn sse_held_len(meter: &UsageMeter) -> usize {
        match &meter.mode {
            Mode::Sse(sse) => sse.framer.held_len(),
            Mode::Json(_) => panic!("not an SSE meter"),
        }
    }

    // ---- content types ----

    #[test]
    fn event_stream_content_types_select_sse_in_any_case_with_parameters() {
        for ct in [
            SSE,
            "text/event-stream; charset=utf-8",
            " Text/Event-Stream",
        ] {
            assert!(
                matches!(UsageMeter::for_response(ct).mode, Mode::Sse(_)),
                "{ct}"
            );
        }
        for ct in [
            JSON,
            "application/json; charset=utf-8",
            "text/plain",
            "",
            "text/event",
        ] {
            assert!(
                matches!(UsageMeter::for_response(ct).mode, Mode::Json(_)),
                "{ct}"
            );
        }
    }

    // ---- JSON bodies ----

    #[test]
    fn json_usage_at_the_end_is_read() {
        let body = json!({
            "id": "chatcmpl-1", "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"}}],
            "usage": {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21,
                      "completion_tokens_details": {"reasoning_tokens": 0}},
        });
        assert_eq!(meter_once(JSON, body.to_string().as_bytes()), usage(9, 12));
        let pretty = serde_json::to_string_pretty(&body).unwrap();
        assert_eq!(meter_once(JSON, pretty.as_bytes()), usage(9, 12));
    }

    #[test]
    fn json_top_level_usage_wins_over_nested_ones_before_and_after_it() {
        let body = br#"{"a": {"usage": {"prompt_tokens": 1, "completion_tokens": 1}},
            "usage" : { "prompt_tokens": 10, "completion_tokens": 20 },
            "b": [{"usage": {"prompt_tokens": 3, "completion_tokens": 3}}],
            "c": {"d": {"usage": {"prompt_tokens": 4, "completion_tokens": 4}}}}"#;
        assert_eq!(meter_once(JSON, body), usage(10, 20));
    }

    #[test]
    fn json_without_top_level_usage_takes_the_last_nested_one() {
        let body = br#"{"a": {"usage": {"prompt_tokens": 1, "completion_tokens": 1}},
            "b": {"usage": {"prompt_tokens": 2, "completion_tokens": 2}}, "c": 3}"#;
        assert_eq!(meter_once(JSON, body), usage(2, 2));
        let array = br#"[{"usage": {"prompt_tokens": 5, "completion_tokens": 6}}]"#;
        assert_eq!(meter_once(JSON, array), usage(5, 6));
    }

    #[test]
    fn json_without_usage_or_with_null_or_empty_usage_gives_none() {
        for body in [
            &br#"{"id": "x", "choices": []}"#[..],
            br#"{"id": "x", "usage": null}"#,
            br#"{"id": "x", "usage": {}}"#,
            br#"{"id": "x", "usage": {"prompt_tokens": "9"}}"#,
            br#"{"id": "x", "usage": 5}"#,
            b"",
            b"<html>502 Bad Gateway</html>",
        ] {
            assert_eq!(
                meter_once(JSON, body),
                None,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn json_usage_key_quoted_inside_a_string_is_not_taken_for_a_key() {
        let body = br#"{"usage": {"prompt_tokens": 1, "completion_tokens": 2},
            "note": "he wrote \"usage\": {\"prompt_tokens\": 99} and \\\"usage\\\": {}"}"#;
        assert_eq!(meter_once(JSON, body), usage(1, 2));
        let only_in_string = br#"{"note": "\"usage\": {\"prompt_tokens\": 99}"}"#;
        assert_eq!(meter_once(JSON, only_in_string), None);
    }

    #[test]
    fn json_embeddings_usage_has_no_completion_tokens() {
        let body = json!({
            "object": "list",
            "data": [{"object": "embedding", "index": 0, "embedding": [0.1, -0.2]}],
            "model": "text-embedding-3-small",
            "usage": {"prompt_tokens": 8, "total_tokens": 8},
        });
        assert_eq!(meter_once(JSON, body.to_string().as_bytes()), usage(8, 0));
    }

    #[test]
    fn json_responses_api_input_and_output_tokens_are_read() {
        let body = json!({
            "id": "resp_1", "object": "response", "status": "completed",
            "output": [{"type": "message", "content": [{"type": "output_text", "text": "Hi"}]}],
            "usage": {"input_tokens": 36, "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens": 87, "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": 123},
        });
        assert_eq!(meter_once(JSON, body.to_string().as_bytes()), usage(36, 87));
    }

    #[test]
    fn json_usage_with_both_spellings_is_still_read() {
        let body = br#"{"usage": {"prompt_tokens": 3, "input_tokens": 3,
            "completion_tokens": 4, "output_tokens": 4}}"#;
        assert_eq!(meter_once(JSON, body), usage(3, 4));
    }

    fn huge_body() -> Vec<u8> {
        let content = "lorem ipsum dolor sit amet, é 🌍 ".repeat(2 * 1024 * 1024 / 32);
        let body = json!({
            "id": "chatcmpl-1", "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 524288, "total_tokens": 524295},
        });
        let body = body.to_string().into_bytes();
        assert!(body.len() > 2 * 1024 * 1024);
        body
    }

    #[test]
    fn json_huge_body_fed_in_7_byte_chunks_keeps_only_a_bounded_tail() {
        let body = huge_body();
        let mut meter = UsageMeter::for_response(JSON);
        for chunk in body.chunks(7) {
            meter.feed(chunk);
            let Mode::Json(tail) = &meter.mode else {
                panic!()
            };
            assert!(tail.len() <= JSON_TAIL_BYTES);
        }
        assert_eq!(meter.finish(), usage(7, 524288));
    }

    #[test]
    fn json_huge_body_fed_in_one_chunk_is_read() {
        assert_eq!(meter_once(JSON, &huge_body()), usage(7, 524288));
    }

    #[test]
    fn json_usage_object_cut_by_the_tail_gives_none() {
        // The `"usage"` key falls outside the kept tail; only the object's second half is left.
        let pad = "x".repeat(JSON_TAIL_BYTES + 100);
        let body = format!(
            r#"{{"choices": [], "usage": {{"prompt_tokens": 1, "pad": "{pad}",
                "completion_tokens": 2}}}}"#
        );
        assert_eq!(meter_once(JSON, body.as_bytes()), None);
        let in_chunks = metered(JSON, body.as_bytes().chunks(999)).finish();
        assert_eq!(in_chunks, None);
    }

    #[test]
    fn json_body_ending_inside_the_usage_object_gives_none() {
        let body = br#"{"id": "x", "usage": {"prompt_tokens": 1, "completion_tok"#;
        assert_eq!(meter_once(JSON, body), None);
        let body = br#"{"id": "x", "usage": {"prompt_tokens": 1, "completion_tokens": 2"#;
        assert_eq!(meter_once(JSON, body), None);
    }

    #[test]
    fn finish_can_be_called_twice() {
        let mut meter = metered(JSON, [&br#"{"usage": {"prompt_tokens": 1}}"#[..]]);
        assert_eq!(meter.finish(), usage(1, 0));
        assert_eq!(meter.finish(), usage(1, 0));
        let mut meter = metered(SSE, [usage_chunk(4, 5).as_bytes()]);
        assert_eq!(meter.finish(), usage(4, 5));
        assert_eq!(meter.finish(), usage(4, 5));
    }

    // ---- SSE streams ----

    #[test]
    fn sse_event_split_across_two_chunks_is_still_parsed_once() {
        // A multi-byte content so that some splits land inside a UTF-8 character.
        let stream = content_chunk("héllo 🌍") + &usage_chunk(12, 34);
        let bytes = stream.as_bytes();
        for cut in 0..=bytes.len() {
            let mut meter = metered(SSE, pieces(bytes, &[cut]));
            assert_eq!(parses(&meter), 1, "cut at {cut}");
            assert_eq!(meter.finish(), usage(12, 34), "cut at {cut}");
            assert_eq!(parses(&meter), 1, "cut at {cut}");
        }
    }

    #[test]
    fn sse_stream_cut_at_every_pair_of_offsets_is_read_once() {
        let stream = content_chunk("é🌍") + &usage_chunk(3, 4) + DONE;
        let bytes = stream.as_bytes();
        for first in 0..=bytes.len() {
            for second in first..=bytes.len() {
                let mut meter = metered(SSE, pieces(bytes, &[first, second]));
                assert_eq!(meter.finish(), usage(3, 4), "cuts at {first}, {second}");
                assert_eq!(parses(&meter), 1, "cuts at {first}, {second}");
            }
        }
    }

    #[test]
    fn sse_byte_by_byte_is_read_once() {
        let stream = content_chunk("a") + &content_chunk("b") + &usage_chunk(1, 2) + DONE;
        let mut meter = metered(SSE, stream.as_bytes().chunks(1));
        assert_eq!(meter.finish(), usage(1, 2));
        assert_eq!(parses(&meter), 1);
    }

    #[test]
    fn sse_without_usage_gives_none_and_parses_nothing() {
        // include_usage not set: no usage key at all; and chunks that carry `"usage":null`.
        let plain = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n".to_string();
        for stream in [
            plain + DONE,
            content_chunk("a") + &content_chunk("b") + DONE,
        ] {
            let mut meter = metered(SSE, [stream.as_bytes()]);
            assert_eq!(meter.finish(), None);
            assert_eq!(parses(&meter), 0);
        }
    }

    #[test]
    fn sse_crlf_line_endings_are_split_at_every_offset() {
        let stream = (content_chunk("x") + &usage_chunk(5, 6) + DONE).replace('\n', "\r\n");
        let bytes = stream.as_bytes();
        for cut in 0..=bytes.len() {
            let mut meter = metered(SSE, pieces(bytes, &[cut]));
            assert_eq!(meter.finish(), usage(5, 6), "cut at {cut}");
            assert_eq!(parses(&meter), 1, "cut at {cut}");
        }
    }

    #[test]
    fn sse_multiple_data_lines_are_joined_with_newlines() {
        let stream = "data: {\"choices\": [],\ndata: \"usage\":\ndata: {\"prompt_tokens\": 2,\n\
                      data:\"completion_tokens\": 3}}\n\n";
        let bytes = stream.as_bytes();
        for cut in 0..=bytes.len() {
            assert_eq!(
                metered(SSE, pieces(bytes, &[cut])).finish(),
                usage(2, 3),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn sse_responses_api_completed_event_is_read() {
        let completed = json!({
            "type": "response.completed",
            "response": {
                "id": "resp_1", "object": "response", "status": "completed",
                "output": [{"type": "message", "content": [{"type": "output_text", "text": "Hi"}]}],
                "usage": {"input_tokens": 11, "output_tokens": 22, "total_tokens": 33},
            },
        });
        let created =
            json!({"type": "response.created", "response": {"id": "resp_1", "usage": null}});
        let delta = json!({"type": "response.output_text.delta", "delta": "Hi"});
        let stream = format!(
            "event: response.created\ndata: {created}\n\n\
             event: response.output_text.delta\ndata: {delta}\n\n\
             event: response.completed\ndata: {completed}\n\n"
        );
        let bytes = stream.as_bytes();
        for cut in 0..=bytes.len() {
            let mut meter = metered(SSE, pieces(bytes, &[cut]));
            assert_eq!(meter.finish(), usage(11, 22), "cut at {cut}");
            assert_eq!(parses(&meter), 1, "cut at {cut}");
        }
    }

    #[test]
    fn sse_last_usage_seen_wins() {
        let stream = usage_chunk(1, 1) + &content_chunk("a") + &usage_chunk(2, 3) + DONE;
        assert_eq!(meter_once(SSE, stream.as_bytes()), usage(2, 3));
    }

    #[test]
    fn sse_final_event_without_its_blank_line_is_read_at_finish() {
        let stream = content_chunk("a") + usage_chunk(7, 8).trim_end();
        let mut meter = metered(SSE, [stream.as_bytes()]);
        assert_eq!(parses(&meter), 0);
        assert_eq!(meter.finish(), usage(7, 8));
    }

    #[test]
    fn sse_comments_event_lines_and_blank_line_runs_do_not_disturb_splitting() {
        let stream = format!(
            ": keep-alive\n\n\n\nevent: message\nid: 3\n{}\r\n\r\n{DONE}",
            usage_chunk(9, 9).trim_end()
        );
        let bytes = stream.as_bytes();
        for cut in 0..=bytes.len() {
            assert_eq!(
                metered(SSE, pieces(bytes, &[cut])).finish(),
                usage(9, 9),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn sse_oversized_event_is_not_held_and_later_events_still_count() {
        let big = content_chunk(&"z".repeat(MAX_EVENT_BYTES + MAX_EVENT_BYTES / 2));
        let stream = big.clone() + &usage_chunk(1, 2) + DONE;
        for size in [7 * 1024, 100_000, 3 * MAX_EVENT_BYTES] {
            let mut meter = UsageMeter::for_response(SSE);
            for chunk in stream.as_bytes().chunks(size) {
                meter.feed(chunk);
                assert!(sse_held_len(&meter) <= MAX_EVENT_BYTES, "chunks of {size}");
            }
            assert_eq!(meter.finish(), usage(1, 2), "chunks of {size}");
            assert_eq!(parses(&meter), 1, "chunks of {size}");
        }
        // Wherever the oversized event's blank line is cut, the next event starts after it.
        let bytes = stream.as_bytes();
        for cut in big.len() - 4..=big.len() + 4 {
            let mut meter = metered(SSE, pieces(bytes, &[MAX_EVENT_BYTES / 2, cut]));
            assert_eq!(meter.finish(), usage(1, 2), "cut at {cut}");
            assert_eq!(parses(&meter), 1, "cut at {cut}");
        }
    }

    #[test]
    fn buffered_bytes_count_the_held_event_stay_bounded_and_fall_once_it_is_gone() {
        let big = content_chunk(&"z".repeat(2 * MAX_EVENT_BYTES));
        let stream = big + &usage_chunk(1, 2) + DONE;
        for size in [7 * 1024, 100_000] {
            let mut meter = UsageMeter::for_response(SSE);
            let mut most = 0;
            for chunk in stream.as_bytes().chunks(size) {
                meter.feed(chunk);
                most = most.max(meter.buffered_bytes());
            }
            assert!(
                most >= MAX_EVENT_BYTES / 2,
                "chunks of {size}: at most {most}"
            );
            assert!(
                most <= 2 * MAX_EVENT_BYTES + 2 * JSON_TAIL_BYTES,
                "chunks of {size}: {most}"
            );
            assert!(meter.buffered_bytes() <= 64 * 1024, "chunks of {size}");
        }
        let mut meter = UsageMeter::for_response(JSON);
        meter.feed(&vec![b' '; 3 * JSON_TAIL_BYTES]);
        assert!(meter.buffered_bytes() <= 2 * JSON_TAIL_BYTES);
    }

    #[test]
    fn sse_oversized_responses_event_is_read_from_its_tail_whatever_the_chunking() {
        // A response.completed that repeats a large base64 image, with usage after it.
        let image = "A".repeat(MAX_EVENT_BYTES);
        let completed = json!({
            "type": "response.completed",
            "response": {
                "output": [{"type": "image_generation_call", "result": image}],
                "usage": {"input_tokens": 99, "output_tokens": 1},
            },
        });
        let stream =
            usage_chunk(1, 2) + &format!("event: response.completed\ndata: {completed}\n\n");
        for size in [7 * 1024, 100_000, MAX_EVENT_BYTES - 1, 3 * MAX_EVENT_BYTES] {
            let mut meter = metered(SSE, stream.as_bytes().chunks(size));
            assert!(sse_held_len(&meter) <= MAX_EVENT_BYTES);
            assert_eq!(meter.finish(), usage(99, 1), "chunks of {size}");
        }
        // Stream cut before the blank line: the tail is still read at finish.
        let unterminated = stream.trim_end();
        assert_eq!(
            metered(SSE, unterminated.as_bytes().chunks(65536)).finish(),
            usage(99, 1)
        );
    }

    #[test]
    fn sse_usage_far_from_the_end_of_an_oversized_event_goes_unread() {
        let early_usage = format!(
            "data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":99}},\"pad\":\"{}\"}}\n\n",
            "p".repeat(MAX_EVENT_BYTES)
        );
        let stream = usage_chunk(1, 2) + &early_usage + DONE;
        for size in [7 * 1024, 3 * MAX_EVENT_BYTES] {
            let mut meter = metered(SSE, stream.as_bytes().chunks(size));
            assert_eq!(meter.finish(), usage(1, 2), "chunks of {size}");
        }
    }

    // ---- Anthropic ----

    /// A Messages stream as Anthropic documents it: input (with cache tokens) in
    /// `message_start`, cumulative output in each `message_delta`.
    fn anthropic_stream(deltas: &[u64]) -> String {
        let mut out = String::from(
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"claude-sonnet-4-5\",\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":25,\"cache_creation_input_tokens\":10,\"cache_read_input_tokens\":5,\"output_tokens\":1}}}\n\n\
             event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n\
             event: ping\ndata: {\"type\": \"ping\"}\n\n\
             event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello\"}}\n\n\
             event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
        );
        for d in deltas {
            out.push_str(&format!(
                "event: message_delta\ndata: {{\"type\":\"message_delta\",\"delta\":{{\"stop_reason\":\"end_turn\",\"stop_sequence\":null}},\"usage\":{{\"output_tokens\":{d}}}}}\n\n"
            ));
        }
        out.push_str("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n");
        out
    }

    #[test]
    fn anthropic_json_usage_counts_cache_tokens_as_input() {
        let body = json!({
            "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
            "content": [{"type": "text", "text": "Hi"}],
            "stop_reason": "end_turn", "stop_sequence": null,
            "usage": {"input_tokens": 12, "cache_creation_input_tokens": 100,
                      "cache_read_input_tokens": 3, "output_tokens": 7},
        });
        assert_eq!(meter_once(JSON, body.to_string().as_bytes()), usage(115, 7));
        let plain = br#"{"type":"message","usage":{"input_tokens":12,"output_tokens":7}}"#;
        assert_eq!(meter_once(JSON, plain), usage(12, 7));
    }

    #[test]
    fn anthropic_stream_takes_input_from_message_start_and_output_from_the_last_delta() {
        let stream = anthropic_stream(&[15]);
        assert_eq!(meter_once(SSE, stream.as_bytes()), usage(40, 15));
        // Cumulative counts: three deltas are not added up.
        let stream = anthropic_stream(&[5, 9, 15]);
        assert_eq!(meter_once(SSE, stream.as_bytes()), usage(40, 15));
    }

    #[test]
    fn anthropic_stream_cut_anywhere_is_read_the_same() {
        let stream = anthropic_stream(&[4, 15]);
        let bytes = stream.as_bytes();
        for cut in 0..=bytes.len() {
            let meter_usage = metered(SSE, [&bytes[..cut], &bytes[cut..]]).finish();
            assert_eq!(meter_usage, usage(40, 15), "cut at {cut}");
        }
        assert_eq!(metered(SSE, bytes.chunks(1)).finish(), usage(40, 15));
    }

    #[test]
    fn anthropic_delta_that_repeats_the_input_replaces_it() {
        let stream = anthropic_stream(&[]).replace(
            "event: message_stop",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"input_tokens\":30,\"cache_read_input_tokens\":2,\"output_tokens\":8}}\n\nevent: message_stop",
        );
        assert_eq!(meter_once(SSE, stream.as_bytes()), usage(32, 8));
    }

    #[test]
    fn anthropic_stream_cut_before_its_delta_keeps_the_start_and_an_error_event_adds_nothing() {
        let full = anthropic_stream(&[15]);
        let cut = &full[..full.find("event: message_delta").unwrap()];
        assert_eq!(meter_once(SSE, cut.as_bytes()), usage(40, 1));
        let errored = format!(
            "{cut}event: error\ndata: {{\"type\":\"error\",\"error\":{{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}}}\n\n"
        );
        assert_eq!(meter_once(SSE, errored.as_bytes()), usage(40, 1));
    }

    #[test]
    fn a_delta_alone_counts_its_output() {
        let only = "event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":3}}\n\n";
        assert_eq!(meter_once(SSE, only.as_bytes()), usage(0, 3));
        let junk = "event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":\"3\"}}\n\n";
        assert_eq!(meter_once(SSE, junk.as_bytes()), None);
    }
}
