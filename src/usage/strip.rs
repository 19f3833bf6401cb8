//! [`UsageChunkStripper`]: hides the usage-only chunk keygate asked for on a client's behalf.

use std::ops::Range;

use bytes::{Bytes, BytesMut};
use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::Value;

use super::json_scan::{has_empty_choices, has_usage_object, USAGE_KEY};
use super::sse::{event_data, Events, Leftover, SseFramer};
use super::{usage_from_value, Usage, MAX_EVENT_BYTES};

/// What the stripper needs from an event's JSON to call it usage-only.
#[derive(Deserialize)]
struct ChunkShape {
    choices: Option<Vec<IgnoredAny>>,
    usage: Option<Value>,
}

/// Removes usage-only chunks (`"choices":[]` with a `usage` object) from an SSE stream, passing
/// everything else through byte-for-byte.
///
/// Events are released as soon as they are complete, in order; an event larger than
/// [`MAX_EVENT_BYTES`] cannot be a usage chunk and is passed through as it arrives instead of
/// being held whole.
#[derive(Debug, Default)]
pub struct UsageChunkStripper {
    /// Cuts the stream into events and holds the incomplete last one, not yet sent.
    framer: SseFramer,
    stripped: Option<Usage>,
}

impl UsageChunkStripper {
    /// A stripper for one stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Returns the bytes to send downstream now: all complete events except usage-only ones. An
    /// incomplete trailing event is held until it completes (so it is never half-sent and then
    /// found to be a usage chunk).
    ///
    /// Takes the chunk as [`Bytes`] so that the common case, a chunk of whole events none of
    /// which is removed, returns the same buffer without copying.
    pub fn filter(&mut self, chunk: Bytes) -> Bytes {
        if chunk.is_empty() {
            return chunk;
        }
        let mut release = Release {
            chunk: &chunk,
            out: Output::Nothing,
            stripped: &mut self.stripped,
        };
        self.framer.feed(&chunk, &mut release);
        release.out.into_bytes(&chunk)
    }

    /// At end of stream: whatever is still held (an incomplete event) is released as is.
    pub fn finish(&mut self) -> Bytes {
        match self.framer.finish() {
            Leftover::Held(held) => held.freeze(),
            Leftover::Nothing | Leftover::Oversized => Bytes::new(),
        }
    }

    /// The usage of the last usage-only chunk removed so far, if it had token counts.
    pub fn stripped_usage(&self) -> Option<Usage> {
        self.stripped
    }

    /// Bytes the stripper holds allocated between chunks, which stays bounded whatever the
    /// stream (for the fuzz targets' memory check; not part of the API).
    #[doc(hidden)]
    pub fn buffered_bytes(&self) -> usize {
        self.framer.buffered_bytes()
    }
}

/// What one [`UsageChunkStripper::filter`] call releases of the events the framer hands on.
struct Release<'a> {
    chunk: &'a Bytes,
    out: Output,
    /// The stripper's [`UsageChunkStripper::stripped_usage`].
    stripped: &'a mut Option<Usage>,
}

impl Events for Release<'_> {
    fn whole(&mut self, _: &[u8], range: Range<usize>) {
        if !is_usage_only(&self.chunk[range.clone()], self.stripped) {
            self.out.keep(self.chunk, range);
        }
    }

    fn joined(&mut self, event: &mut BytesMut) {
        if !is_usage_only(event, self.stripped) {
            self.out.push_owned(self.chunk, std::mem::take(event));
        }
    }

    fn outgrown(&mut self, held: &mut BytesMut) {
        log::debug!(
            "usage stripper: passing through an SSE event larger than {MAX_EVENT_BYTES} bytes \
             without holding it"
        );
        if !held.is_empty() {
            self.out.push_owned(self.chunk, std::mem::take(held));
        }
    }

    fn part(&mut self, _: &[u8], range: Range<usize>) {
        self.out.keep(self.chunk, range);
    }

    fn end(&mut self) {}
}

/// Whether `event` is a usage-only chunk; if so and it has token counts, they go to `stripped`.
///
/// An event over [`MAX_EVENT_BYTES`] never is, even when it arrives whole or is joined from a
/// held start: one cut into parts has gone out already, and the answer must not depend on where
/// the chunks were cut.
fn is_usage_only(event: &[u8], stripped: &mut Option<Usage>) -> bool {
    if event.len() > MAX_EVENT_BYTES || USAGE_KEY.find(event).is_none() {
        return false;
    }
    let data = event_data(event);
    // Cheap checks first: every chunk of an include_usage stream mentions `"usage":null`.
    if !has_usage_object(&data) || !has_empty_choices(&data) {
        return false;
    }
    let Ok(shape) = serde_json::from_slice::<ChunkShape>(&data) else {
        return false;
    };
    let usage_only = shape.choices.is_some_and(|choices| choices.is_empty())
        && matches!(shape.usage, Some(Value::Object(_)));
    if usage_only {
        if let Some(usage) = shape.usage.as_ref().and_then(usage_from_value) {
            *stripped = Some(usage);
        }
    }
    usage_only
}

/// The bytes one [`UsageChunkStripper::filter`] call releases: while they are one contiguous run
/// of the input chunk they stay a range of it (zero-copy); they are copied only once a removed
/// event or a held one makes that impossible.
enum Output {
    Nothing,
    Slice(Range<usize>),
    Owned(BytesMut),
}

impl Output {
    fn keep(&mut self, chunk: &Bytes, range: Range<usize>) {
        match self {
            Output::Nothing => *self = Output::Slice(range),
            Output::Slice(kept) if kept.end == range.start => kept.end = range.end,
            Output::Slice(kept) => {
                let mut buf = BytesMut::with_capacity(kept.len() + range.len());
                buf.extend_from_slice(&chunk[kept.clone()]);
                buf.extend_from_slice(&chunk[range]);
                *self = Output::Owned(buf);
            }
            Output::Owned(buf) => buf.extend_from_slice(&chunk[range]),
        }
    }

    fn push_owned(&mut self, chunk: &Bytes, bytes: BytesMut) {
        match self {
            Output::Nothing => *self = Output::Owned(bytes),
            Output::Slice(kept) => {
                let mut buf = BytesMut::with_capacity(kept.len() + bytes.len());
                buf.extend_from_slice(&chunk[kept.clone()]);
                buf.extend_from_slice(&bytes);
                *self = Output::Owned(buf);
            }
            Output::Owned(buf) => buf.extend_from_slice(&bytes),
        }
    }

    fn into_bytes(self, chunk: &Bytes) -> Bytes {
        match self {
            Output::Nothing => Bytes::new(),
            Output::Slice(range) => chunk.slice(range),
            Output::Owned(buf) => buf.freeze(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::usage::test_fixtures::*;
    use proptest::prelude::*;
    use serde_json::json;

    // ---- stripper ----

    #[test]
    fn stripper_removes_exactly_the_usage_chunk_at_every_split_point() {
        let head = content_chunk("héllo 🌍") + &content_chunk("!");
        let stream = head.clone() + &usage_chunk(12, 34) + DONE;
        let expected = head + DONE;
        let bytes = stream.as_bytes();
        for cut in 0..=bytes.len() {
            let (out, stripper) = strip_all(pieces(bytes, &[cut]));
            assert_eq!(String::from_utf8(out).unwrap(), expected, "cut at {cut}");
            assert_eq!(stripper.stripped_usage(), usage(12, 34), "cut at {cut}");
        }
    }

    #[test]
    fn stripper_removes_the_usage_chunk_for_every_pair_of_cuts_with_crlf() {
        let stream = (content_chunk("é") + &usage_chunk(1, 2) + DONE).replace('\n', "\r\n");
        let expected = (content_chunk("é") + DONE).replace('\n', "\r\n");
        let bytes = stream.as_bytes();
        for first in 0..=bytes.len() {
            for second in first..=bytes.len() {
                let (out, _) = strip_all(pieces(bytes, &[first, second]));
                assert_eq!(out, expected.as_bytes(), "cuts at {first}, {second}");
            }
        }
    }

    #[test]
    fn stripper_passes_whole_events_without_copying() {
        let input = Bytes::from(content_chunk("a") + &content_chunk("b") + DONE);
        let mut stripper = UsageChunkStripper::new();
        let out = stripper.filter(input.clone());
        assert_eq!(out.as_ptr(), input.as_ptr());
        assert_eq!(out.len(), input.len());
        assert!(stripper.finish().is_empty());
    }

    #[test]
    fn stripper_releases_complete_events_at_once_and_holds_only_the_partial_one() {
        let first = content_chunk("a");
        let second = content_chunk("b");
        let input = Bytes::from(first.clone() + &second[..10]);
        let mut stripper = UsageChunkStripper::new();
        let out = stripper.filter(input.clone());
        // Still zero-copy: a prefix of the input.
        assert_eq!(out.as_ptr(), input.as_ptr());
        assert_eq!(out, first.as_bytes());
        let out = stripper.filter(Bytes::copy_from_slice(&second.as_bytes()[10..]));
        assert_eq!(out, second.as_bytes());
        assert!(stripper.finish().is_empty());
    }

    #[test]
    fn stripper_finish_releases_an_incomplete_event_as_is() {
        let mut stripper = UsageChunkStripper::new();
        let partial = usage_chunk(1, 1);
        let partial = partial.trim_end();
        assert!(stripper
            .filter(Bytes::copy_from_slice(partial.as_bytes()))
            .is_empty());
        assert_eq!(stripper.finish(), partial.as_bytes());
        assert_eq!(stripper.stripped_usage(), None);
    }

    #[test]
    fn stripper_keeps_usage_with_choices_null_usage_and_done() {
        let with_choices =
            "data: {\"choices\":[{\"delta\":{}}],\"usage\":{\"prompt_tokens\":1}}\n\n";
        let null_usage = "data: {\"choices\":[],\"usage\":null}\n\n";
        let nested_only = "data: {\"choices\":[],\"x\":{\"usage\":{\"prompt_tokens\":1}}}\n\n";
        let stream = format!("{with_choices}{null_usage}{nested_only}{DONE}");
        let (out, stripper) = strip_all([stream.as_bytes()]);
        assert_eq!(out, stream.as_bytes());
        assert_eq!(stripper.stripped_usage(), None);
    }

    #[test]
    fn stripper_passes_an_oversized_event_through_without_holding_it() {
        let big = content_chunk(&"z".repeat(MAX_EVENT_BYTES + 10));
        let stream = big.clone() + &usage_chunk(3, 3) + DONE;
        let expected = big + DONE;
        for size in [64 * 1024, MAX_EVENT_BYTES - 1, 5 * MAX_EVENT_BYTES] {
            let mut stripper = UsageChunkStripper::new();
            let mut out = Vec::new();
            for chunk in stream.as_bytes().chunks(size) {
                out.extend_from_slice(&stripper.filter(Bytes::copy_from_slice(chunk)));
                assert!(stripper.framer.held_len() <= MAX_EVENT_BYTES);
            }
            out.extend_from_slice(&stripper.finish());
            assert!(out == expected.as_bytes(), "chunks of {size}");
            assert_eq!(stripper.stripped_usage(), usage(3, 3));
        }
    }

    #[test]
    fn stripper_passes_an_oversized_usage_only_event_however_the_stream_is_cut() {
        // Found by the fuzz target: held in parts it passed, arriving whole it was removed.
        let padded = usage_chunk(5, 6).replacen(
            "\"choices\"",
            &format!("\"pad\":\"{}\",\"choices\"", "x".repeat(MAX_EVENT_BYTES)),
            1,
        );
        let stream = content_chunk("a") + &padded + DONE;
        for size in [64 * 1024, stream.len()] {
            let (out, stripper) = strip_all(stream.as_bytes().chunks(size));
            assert!(
                out == stream.as_bytes(),
                "chunks of {size}: {} bytes out",
                out.len()
            );
            assert_eq!(stripper.stripped_usage(), None, "chunks of {size}");
        }
    }

    /// One generated SSE event: its text, whether the stripper must remove it, and the usage a
    /// meter reads from it.
    #[derive(Debug, Clone)]
    struct Event {
        text: String,
        usage_only: bool,
        usage: Option<Usage>,
    }

    fn event(text: String, usage_only: bool, usage: Option<Usage>) -> Event {
        Event {
            text,
            usage_only,
            usage,
        }
    }

    fn any_event() -> impl Strategy<Value = Event> {
        let counts = (0u64..1_000_000, 0u64..1_000_000);
        let split_usage_only = |(p, c)| {
            let text = format!(
                "data: {{\"choices\": [],\ndata: \"usage\": \
                 {{\"input_tokens\": {p}, \"output_tokens\": {c}}}}}\n\n"
            );
            event(text, true, usage(p, c))
        };
        let usage_with_choices = |(p, c)| {
            let text = format!(
                "data: {{\"choices\":[{{\"delta\":{{}}}}],\
                 \"usage\":{{\"prompt_tokens\":{p},\"completion_tokens\":{c}}}}}\n\n"
            );
            event(text, false, usage(p, c))
        };
        let responses_delta = |s| {
            let text = format!(
                "event: response.output_text.delta\ndata: {}\n\n",
                json!({"delta": s})
            );
            event(text, false, None)
        };
        let kind = prop_oneof![
            any::<String>().prop_map(|s| event(content_chunk(&s), false, None)),
            counts
                .clone()
                .prop_map(|(p, c)| event(usage_chunk(p, c), true, usage(p, c))),
            counts.clone().prop_map(split_usage_only),
            counts.prop_map(usage_with_choices),
            Just(event(DONE.to_string(), false, None)),
            Just(event(": keep-alive\n\n".to_string(), false, None)),
            any::<String>().prop_map(responses_delta),
        ];
        (kind, any::<bool>()).prop_map(|(mut event, crlf)| {
            if crlf {
                event.text = event.text.replace('\n', "\r\n");
            }
            event
        })
    }

    fn joined<'a>(events: impl IntoIterator<Item = &'a Event>, partial: &str) -> String {
        events
            .into_iter()
            .map(|e| e.text.as_str())
            .collect::<String>()
            + partial
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn stripper_output_is_the_input_minus_usage_only_events_for_any_chunking(
            events in proptest::collection::vec(any_event(), 0..12),
            partial in prop_oneof![
                Just(""),
                Just("data: {\"choices\":["),
                Just("data: {\"choices\":[],\"usage\":{"),
            ],
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..10),
        ) {
            let input = joined(&events, partial);
            let expected = joined(events.iter().filter(|e| !e.usage_only), partial);
            let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(input.len() + 1)).collect();
            cuts.sort_unstable();
            let chunks = pieces(input.as_bytes(), &cuts);

            let (out, stripper) = strip_all(chunks.iter().copied());
            prop_assert!(out == expected.as_bytes());
            let last_stripped = events.iter().rev().find(|e| e.usage_only).and_then(|e| e.usage);
            prop_assert_eq!(stripper.stripped_usage(), last_stripped);

            // The meter on the same chunks: the last usage, each usage event parsed once.
            let mut meter = metered(SSE, chunks.iter().copied());
            prop_assert_eq!(meter.finish(), events.iter().rev().find_map(|e| e.usage));
            let with_usage = events.iter().filter(|e| e.usage.is_some()).count() as u32;
            let partial_with_usage = u32::from(partial.contains("usage"));
            prop_assert_eq!(parses(&meter), with_usage + partial_with_usage);
        }
    }
}
