//! The usage meter (SSE and JSON bodies) and the usage-chunk stripper, fed streams cut into any
//! chunks. Neither panics; what each holds between chunks stays bounded however long the stream
//! or its events; what they read and write does not depend on where the chunks were cut; the
//! stripper passes every byte through except whole usage-only events, and from a well-formed
//! stream removes exactly the usage chunk (unless it is larger than [`MAX_EVENT_BYTES`], which
//! cannot be a usage chunk and passes).
//!
//! Input: `flags seed repeat` then the stream. Flags: bit 0 SSE (else JSON), bit 1 build a
//! well-formed chat stream (bit 2: with CRLF line ends; bit 3: with a usage chunk padded by
//! `repeat` × 8 bytes) whose content chunks carry the NUL-separated pieces of the rest; without
//! bit 1, the rest is the stream. Bits 4 and 5 together make it large: the padding `repeat` × 8 KiB, the raw
//! stream the rest `repeat` × 256 times over (up to [`MAX_STREAM`]). `seed` fixes the chunk cuts.

use bytes::Bytes;
use keygate::usage::{Usage, UsageChunkStripper, UsageMeter, JSON_TAIL_BYTES, MAX_EVENT_BYTES};

use crate::alloc_count::assert_peak_below;
use crate::input::{chunk_ranges, Rng};

/// The longest stream a target builds: past [`MAX_EVENT_BYTES`], small enough for thousands
/// of runs a minute.
pub const MAX_STREAM: usize = 3 << 19;

/// The most the meter or the stripper may hold between chunks: the held event (a buffer that
/// may have grown to twice the hold limit) and the tail of an oversized event.
pub const HELD_BOUND: usize = 2 * MAX_EVENT_BYTES + 2 * JSON_TAIL_BYTES + 4096;

const SSE: &str = "text/event-stream";
const JSON: &str = "application/json";

/// Checks one input; see the module doc.
pub fn run(data: &[u8]) {
    let [flags, seed, repeat, ref rest @ ..] = *data else {
        return;
    };
    let sse = flags & 1 != 0;
    let content_type = if sse { SSE } else { JSON };
    let mut rng = Rng::new(u64::from(seed) ^ (data.len() as u64) << 8);
    // Large streams are slow to run: only when asked, so that most inputs run fast.
    let large = flags & 0x30 == 0x30;
    if flags & 2 != 0 {
        let pad = usize::from(repeat) * if large { 8 * 1024 } else { 8 };
        let stream = WellFormed::build(rest, flags & 4 != 0, flags & 8 != 0, pad);
        let (meter, out, stripper) = run_chunked(content_type, &stream.bytes, &mut rng);
        if sse {
            assert_eq!(
                meter, stream.usage,
                "usage metered from a well-formed stream"
            );
            assert_eq!(out, stream.expected_stripped(), "stripped stream");
            assert_eq!(stripper, stream.expected_stripped_usage(), "stripped usage");
        }
        check_chunking_independence(content_type, &stream.bytes, (meter, out, stripper));
    } else {
        let stream = repeated(rest, if large { repeat } else { 0 });
        let result = run_chunked(content_type, &stream, &mut rng);
        if !contains(&stream, b"usage") {
            assert_eq!(result.1, stream, "a stream without usage passes unchanged");
            assert_eq!(result.0, None);
        }
        assert!(result.1.len() <= stream.len());
        check_chunking_independence(content_type, &stream, result);
    }
}

/// What a run produced: the meter's usage, the stripper's output and its stripped usage.
type Outcome = (Option<Usage>, Vec<u8>, Option<Usage>);

/// Feeds `stream` in `rng`'s chunks to a meter and a stripper, checking after every chunk that
/// what they hold stays bounded.
fn run_chunked(content_type: &str, stream: &[u8], rng: &mut Rng) -> Outcome {
    let stream = Bytes::copy_from_slice(stream);
    let ranges = chunk_ranges(stream.len(), rng);
    let largest = ranges.iter().map(|r| r.len()).max().unwrap_or(0);
    let mut out = Vec::with_capacity(stream.len());
    let mut meter = UsageMeter::for_response(content_type);
    let mut stripper = UsageChunkStripper::new();
    // What the two hold, plus each chunk copied at most twice on the way through each (joined
    // with a held start, then released).
    let limit = 2 * HELD_BOUND + 4 * largest + (1 << 20);
    assert_peak_below("usage meter and stripper", limit, || {
        for range in ranges {
            let chunk = stream.slice(range);
            meter.feed(&chunk);
            let passed = stripper.filter(chunk);
            out.extend_from_slice(&passed);
            drop(passed);
            assert!(
                meter.buffered_bytes() <= HELD_BOUND,
                "the meter holds {} bytes",
                meter.buffered_bytes()
            );
            assert!(
                stripper.buffered_bytes() <= HELD_BOUND,
                "the stripper holds {} bytes",
                stripper.buffered_bytes()
            );
        }
    });
    out.extend_from_slice(&stripper.finish());
    let usage = meter.finish();
    assert_eq!(meter.finish(), usage, "finish answers the same twice");
    (usage, out, stripper.stripped_usage())
}

/// The same stream in one chunk gives the same outcome as cut into many.
fn check_chunking_independence(content_type: &str, stream: &[u8], chunked: Outcome) {
    let mut meter = UsageMeter::for_response(content_type);
    meter.feed(stream);
    let mut stripper = UsageChunkStripper::new();
    let mut out = stripper.filter(Bytes::copy_from_slice(stream)).to_vec();
    out.extend_from_slice(&stripper.finish());
    let whole = (meter.finish(), out, stripper.stripped_usage());
    assert_eq!(whole.0, chunked.0, "the meter depends on the chunking");
    assert!(
        whole.1 == chunked.1,
        "the stripper's output depends on the chunking"
    );
    assert_eq!(
        whole.2, chunked.2,
        "the stripped usage depends on the chunking"
    );
}

/// `data` `repeat` × 256 times over (once for 0), at most [`MAX_STREAM`] bytes.
fn repeated(data: &[u8], repeat: u8) -> Vec<u8> {
    if data.is_empty() {
        return Vec::new();
    }
    let times = (usize::from(repeat) * 256)
        .max(1)
        .min(MAX_STREAM / data.len())
        .max(1);
    data.repeat(times)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    memchr::memmem::find(haystack, needle).is_some()
}

/// A chat completion stream as OpenAI sends it with `include_usage`.
struct WellFormed {
    bytes: Vec<u8>,
    /// Where the usage chunk lies in `bytes`.
    usage_chunk: Option<std::ops::Range<usize>>,
    usage: Option<Usage>,
}

impl WellFormed {
    fn build(rest: &[u8], crlf: bool, with_usage: bool, pad: usize) -> Self {
        let eol = if crlf { "\r\n" } else { "\n" };
        let mut bytes = Vec::new();
        for piece in rest.split(|&b| b == 0) {
            let content = serde_json::Value::String(String::from_utf8_lossy(piece).into_owned());
            let event = format!(
                "data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\
                 \"choices\":[{{\"index\":0,\"delta\":{{\"content\":{content}}},\
                 \"finish_reason\":null}}],\"usage\":null}}{eol}{eol}"
            );
            bytes.extend_from_slice(event.as_bytes());
        }
        let (mut usage_chunk, mut usage) = (None, None);
        if with_usage {
            let prompt = rest.len() as u64;
            let completion = pad as u64 * 7;
            let pad = "x".repeat(pad);
            let event = format!(
                "data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\
                 \"choices\":[],\"pad\":\"{pad}\",\"usage\":{{\"prompt_tokens\":{prompt},\
                 \"completion_tokens\":{completion},\"total_tokens\":{}}}}}{eol}{eol}",
                prompt + completion
            );
            usage_chunk = Some(bytes.len()..bytes.len() + event.len());
            usage = Some(Usage { prompt, completion });
            bytes.extend_from_slice(event.as_bytes());
        }
        bytes.extend_from_slice(format!("data: [DONE]{eol}{eol}").as_bytes());
        WellFormed {
            bytes,
            usage_chunk,
            usage,
        }
    }

    /// A usage chunk within the hold limit is removed; a larger one passes.
    fn strippable(&self) -> Option<std::ops::Range<usize>> {
        self.usage_chunk
            .clone()
            .filter(|chunk| chunk.len() <= MAX_EVENT_BYTES)
    }

    fn expected_stripped(&self) -> Vec<u8> {
        match self.strippable() {
            Some(chunk) => [&self.bytes[..chunk.start], &self.bytes[chunk.end..]].concat(),
            None => self.bytes.clone(),
        }
    }

    fn expected_stripped_usage(&self) -> Option<Usage> {
        self.strippable().and(self.usage)
    }
}
