//! What the meter's, the stripper's and the framer's tests share: streams, chunkings, helpers.

#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use serde_json::json;

use super::{Usage, UsageChunkStripper, UsageMeter};

pub(super) const SSE: &str = "text/event-stream";
pub(super) const JSON: &str = "application/json";
pub(super) const DONE: &str = "data: [DONE]\n\n";

pub(super) fn usage(prompt: u64, completion: u64) -> Option<Usage> {
    Some(Usage { prompt, completion })
}

pub(super) fn metered<'a>(
    content_type: &str,
    chunks: impl IntoIterator<Item = &'a [u8]>,
) -> UsageMeter {
    let mut meter = UsageMeter::for_response(content_type);
    for chunk in chunks {
        meter.feed(chunk);
    }
    meter
}

/// `bytes` cut at the given (sorted) offsets.
pub(super) fn pieces<'a>(bytes: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut start = 0;
    for &cut in cuts {
        out.push(&bytes[start..cut]);
        start = cut;
    }
    out.push(&bytes[start..]);
    out
}

/// How many SSE events the meter parsed as JSON.
pub(super) fn parses(meter: &UsageMeter) -> u32 {
    meter.sse_parses()
}

pub(super) fn content_chunk(content: &str) -> String {
    let chunk = json!({
        "id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "gpt-4o",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": null}],
        "usage": null,
    });
    format!("data: {chunk}\n\n")
}

pub(super) fn usage_chunk(prompt: u64, completion: u64) -> String {
    let chunk = json!({
        "id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "gpt-4o",
        "choices": [],
        "usage": {
            "prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": 0},
        },
    });
    format!("data: {chunk}\n\n")
}

pub(super) fn strip_all<'a>(
    chunks: impl IntoIterator<Item = &'a [u8]>,
) -> (Vec<u8>, UsageChunkStripper) {
    let mut stripper = UsageChunkStripper::new();
    let mut out = Vec::new();
    for chunk in chunks {
        out.extend_from_slice(&stripper.filter(Bytes::copy_from_slice(chunk)));
    }
    out.extend_from_slice(&stripper.finish());
    (out, stripper)
}
