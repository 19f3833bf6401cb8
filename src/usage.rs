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
//!
//! [`UsageMeter`] reads it from the body chunks as the proxy forwards them, without ever buffering
//! the body: a JSON body leaves only its last [`JSON_TAIL_BYTES`] in a ring buffer, a stream only
//! its incomplete last event (up to [`MAX_EVENT_BYTES`]). Chunks without usage cost a `memchr` scan and nothing else: no JSON
//! parsing, no allocation.
//!
//! [`UsageChunkStripper`] hides the usage-only chunk from clients that did not ask for it (keygate
//! asks for it on their behalf so that every stream can be metered), passing every other byte
//! through unchanged and, where it can, without copying.

use std::borrow::Cow;
use std::ops::Range;
use std::sync::LazyLock;

use bytes::{Bytes, BytesMut};
use memchr::memmem;
use serde::de::IgnoredAny;
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

/// Capacity kept in a buffer after a large event went through it, so that one huge event does not
/// pin a megabyte for the rest of a long stream.
const RETAINED_CAPACITY: usize = 64 * 1024;

static USAGE_KEY: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\"usage\""));
static CHOICES_KEY: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\"choices\""));

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
#[derive(Deserialize)]
struct RawUsage {
    prompt_tokens: Option<u64>,
    input_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    output_tokens: Option<u64>,
    total_tokens: Option<u64>,
}

impl RawUsage {
    /// `None` when the object has no token count at all (`{}`), which says nothing about cost.
    /// A missing completion count is `total - prompt`: embeddings send only those two, and the
    /// difference is then 0.
    fn into_usage(self) -> Option<Usage> {
        let prompt = self.prompt_tokens.or(self.input_tokens);
        let completion = self.completion_tokens.or(self.output_tokens);
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

/// Usage from the object that starts at `object[0]`, ignoring whatever follows it. An object cut
/// short (the body ended inside it) fails to parse and gives `None`, never a guess.
fn usage_from_object_prefix(object: &[u8]) -> Option<Usage> {
    let mut values = serde_json::Deserializer::from_slice(object).into_iter::<RawUsage>();
    match values.next() {
        Some(Ok(raw)) => raw.into_usage(),
        _ => None,
    }
}

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
}

/// The last [`JSON_TAIL_BYTES`] of a body, as a ring: each byte is copied once on the way in,
/// and the ring is straightened once, at the end.
#[derive(Debug, Default)]
struct JsonTail {
    ring: Vec<u8>,
    /// Where the oldest byte is once the ring is full (0 until then).
    head: usize,
}

impl JsonTail {
    fn push(&mut self, mut data: &[u8]) {
        if data.len() >= JSON_TAIL_BYTES {
            self.ring.clear();
            self.ring
                .extend_from_slice(&data[data.len() - JSON_TAIL_BYTES..]);
            self.head = 0;
            return;
        }
        if self.ring.len() < JSON_TAIL_BYTES {
            let n = data.len().min(JSON_TAIL_BYTES - self.ring.len());
            self.ring.extend_from_slice(&data[..n]);
            data = &data[n..];
        }
        // Anything left over means the ring is full: overwrite the oldest bytes.
        while !data.is_empty() {
            let n = data.len().min(JSON_TAIL_BYTES - self.head);
            self.ring[self.head..self.head + n].copy_from_slice(&data[..n]);
            self.head = (self.head + n) % JSON_TAIL_BYTES;
            data = &data[n..];
        }
    }

    fn contiguous(&mut self) -> &[u8] {
        self.ring.rotate_left(self.head);
        self.head = 0;
        &self.ring
    }
}

/// The last `usage` object in the tail of a JSON body: a top-level one if there is any, else the
/// last at any depth.
///
/// Top level is preferred because that is where every OpenAI response reports the request's own
/// usage, while a nested `usage` (in metadata, or an echoed sub-response) may describe something
/// else. The tail may start anywhere, even inside a string, but a well-formed body ends outside
/// any string at depth 0, so walking backwards from the end knows the depth and string state of
/// every byte. A `"usage"` inside a string cannot be mistaken for a key: its quotes are escaped.
fn last_usage_in_json(text: &[u8]) -> Option<Usage> {
    let mut depth: i64 = 0;
    let mut in_string = false;
    let mut nested = None;
    for i in (0..text.len()).rev() {
        let byte = text[i];
        if in_string {
            if byte == b'"' && !is_escaped(text, i) {
                // The opening quote of a string: maybe the key `"usage"`.
                in_string = false;
                if let Some(open) = object_value_of_key(text, i, b"\"usage\"") {
                    if depth == 1 {
                        if let Some(usage) = usage_from_object_prefix(&text[open..]) {
                            return Some(usage);
                        }
                    } else if nested.is_none() {
                        nested = usage_from_object_prefix(&text[open..]);
                    }
                }
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'}' | b']' => depth += 1,
            b'{' | b'[' => depth -= 1,
            _ => {}
        }
    }
    nested
}

/// Whether the quote at `text[at]` is escaped (preceded by an odd number of backslashes).
fn is_escaped(text: &[u8], at: usize) -> bool {
    text[..at].iter().rev().take_while(|&&b| b == b'\\').count() % 2 == 1
}

fn skip_ws(text: &[u8]) -> &[u8] {
    let n = text
        .iter()
        .take_while(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
        .count();
    &text[n..]
}

/// When `text[at..]` is `key` (quotes included) followed by `:` and an object, where that object
/// starts.
fn object_value_of_key(text: &[u8], at: usize, key: &[u8]) -> Option<usize> {
    let after_key = text.get(at..)?.strip_prefix(key)?;
    let value = skip_ws(skip_ws(after_key).strip_prefix(b":")?);
    (value.first() == Some(&b'{')).then(|| text.len() - value.len())
}

/// Whether `text` has a `"usage"` key whose value is an object (not `null`), anywhere.
fn has_usage_object(text: &[u8]) -> bool {
    USAGE_KEY
        .find_iter(text)
        .any(|at| object_value_of_key(text, at, b"\"usage\"").is_some())
}

/// Whether `text` has a `"choices"` key whose value is an empty array, anywhere.
fn has_empty_choices(text: &[u8]) -> bool {
    CHOICES_KEY.find_iter(text).any(|at| {
        let after_key = &text[at + b"\"choices\"".len()..];
        skip_ws(after_key)
            .strip_prefix(b":")
            .and_then(|value| skip_ws(value).strip_prefix(b"["))
            .is_some_and(|inside| skip_ws(inside).first() == Some(&b']'))
    })
}

/// End (exclusive) of the first blank line in `chunk` that ends an event, given the last bytes
/// already held of that same event (`held`, in which no blank line was found before).
///
/// A blank line is `\n\n` or `\n\r\n` (which covers `\r\n\r\n`); only the end of `held` matters,
/// for a blank line split across chunks. Lone-`\r` line endings are not recognised: no
/// OpenAI-compatible server is known to send them.
fn first_boundary(held: &[u8], chunk: &[u8]) -> Option<usize> {
    match held {
        [.., b'\n'] => match chunk {
            [b'\n', ..] => return Some(1),
            [b'\r', b'\n', ..] => return Some(2),
            _ => {}
        },
        [.., b'\n', b'\r'] if chunk.first() == Some(&b'\n') => return Some(1),
        _ => {}
    }
    memchr::memchr_iter(b'\n', chunk).find_map(|at| match chunk.get(at + 1) {
        Some(b'\n') => Some(at + 2),
        Some(b'\r') if chunk.get(at + 2) == Some(&b'\n') => Some(at + 3),
        _ => None,
    })
}

/// Keeps only the last two bytes of `kept` followed by `more`: all [`first_boundary`] needs of
/// an event that is being skipped.
fn keep_last_two(kept: &mut Vec<u8>, more: &[u8]) {
    if more.len() >= 2 {
        kept.clear();
        kept.extend_from_slice(&more[more.len() - 2..]);
    } else {
        kept.extend_from_slice(more);
        let excess = kept.len().saturating_sub(2);
        kept.drain(..excess);
    }
    if kept.capacity() > RETAINED_CAPACITY {
        kept.shrink_to(RETAINED_CAPACITY);
    }
}

/// The `data:` lines of one event, joined by `\n` as the SSE spec says. Borrowed (no allocation)
/// when there is at most one, which is what OpenAI sends.
fn event_data(event: &[u8]) -> Cow<'_, [u8]> {
    let mut first: Option<&[u8]> = None;
    let mut joined: Option<Vec<u8>> = None;
    for line in event.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(value) = data_field(line) else {
            continue;
        };
        match (&mut joined, first) {
            (Some(buf), _) => {
                buf.push(b'\n');
                buf.extend_from_slice(value);
            }
            (None, None) => first = Some(value),
            (None, Some(earlier)) => {
                let mut buf = Vec::with_capacity(earlier.len() + 1 + value.len());
                buf.extend_from_slice(earlier);
                buf.push(b'\n');
                buf.extend_from_slice(value);
                joined = Some(buf);
            }
        }
    }
    match (joined, first) {
        (Some(buf), _) => Cow::Owned(buf),
        (None, Some(value)) => Cow::Borrowed(value),
        (None, None) => Cow::Borrowed(&[]),
    }
}

/// The value of a `data` field line (one leading space removed), or `None` for other lines.
fn data_field(line: &[u8]) -> Option<&[u8]> {
    let rest = line.strip_prefix(b"data")?;
    if rest.is_empty() {
        return Some(rest);
    }
    let value = rest.strip_prefix(b":")?;
    Some(value.strip_prefix(b" ").unwrap_or(value))
}

/// What the meter needs from an event's JSON; every other field is skipped unparsed.
#[derive(Deserialize)]
struct EventPayload {
    usage: Option<Value>,
    response: Option<ResponsePayload>,
}

/// The `response` object of a Responses API event.
#[derive(Deserialize)]
struct ResponsePayload {
    usage: Option<Value>,
}

/// Usage from one event's data: top-level `usage` (chat, completions), else `response.usage`
/// (Responses API).
fn event_usage(data: &[u8]) -> Option<Usage> {
    let payload: EventPayload = serde_json::from_slice(data).ok()?;
    payload
        .usage
        .as_ref()
        .and_then(usage_from_value)
        .or_else(|| payload.response?.usage.as_ref().and_then(usage_from_value))
}

#[derive(Debug, Default)]
struct SseMeter {
    /// The incomplete last event; while `oversized`, only its last two bytes (for
    /// [`first_boundary`]).
    held: Vec<u8>,
    /// The current event outgrew [`MAX_EVENT_BYTES`]: only its tail is kept, in case it ends
    /// with usage (a Responses API `response.completed` repeats the whole output, base64 images
    /// included, and reports `usage` last).
    oversized: Option<Box<JsonTail>>,
    last: Option<Usage>,
    /// Events parsed as JSON, to prove that each is parsed at most once.
    #[cfg(test)]
    parses: u32,
}

impl SseMeter {
    fn feed(&mut self, chunk: &[u8]) {
        if chunk.is_empty() {
            return;
        }
        let mut rest = chunk;
        if self.oversized.is_some() || !self.held.is_empty() {
            let Some(end) = first_boundary(&self.held, chunk) else {
                self.hold(chunk);
                return;
            };
            let completion = &chunk[..end];
            if let Some(mut tail) = self.oversized.take() {
                tail.push(completion);
                self.on_oversized_event(tail.contiguous());
            } else if self.held.len() + end > MAX_EVENT_BYTES {
                // Judged by its full size, like an event that arrives in one chunk, so that
                // what is read does not depend on where the chunks were cut.
                let mut tail = JsonTail::default();
                tail.push(&self.held);
                tail.push(completion);
                self.on_oversized_event(tail.contiguous());
            } else {
                let mut event = std::mem::take(&mut self.held);
                event.extend_from_slice(completion);
                self.on_event(&event);
                // Reuse the allocation for the next split event.
                self.held = event;
            }
            self.held.clear();
            if self.held.capacity() > RETAINED_CAPACITY {
                self.held.shrink_to(RETAINED_CAPACITY);
            }
            rest = &chunk[end..];
        }
        while let Some(end) = first_boundary(&[], rest) {
            let event = &rest[..end];
            if end > MAX_EVENT_BYTES {
                self.on_oversized_event(&event[end - JSON_TAIL_BYTES..]);
            } else {
                self.on_event(event);
            }
            rest = &rest[end..];
        }
        if !rest.is_empty() {
            self.hold(rest);
        }
    }

    fn hold(&mut self, bytes: &[u8]) {
        if let Some(tail) = &mut self.oversized {
            tail.push(bytes);
        } else if self.held.len() + bytes.len() > MAX_EVENT_BYTES {
            log::debug!(
                "usage meter: an SSE event is larger than {MAX_EVENT_BYTES} bytes; \
                 reading usage from its last {JSON_TAIL_BYTES} bytes only"
            );
            let mut tail = Box::<JsonTail>::default();
            tail.push(&self.held);
            tail.push(bytes);
            self.oversized = Some(tail);
        } else {
            self.held.extend_from_slice(bytes);
            return;
        }
        keep_last_two(&mut self.held, bytes);
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
        if let Some(usage) = event_usage(&data) {
            self.last = Some(usage);
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

    fn finish(&mut self) -> Option<Usage> {
        if let Some(mut tail) = self.oversized.take() {
            self.on_oversized_event(tail.contiguous());
        } else if !self.held.is_empty() {
            let event = std::mem::take(&mut self.held);
            self.on_event(&event);
        }
        self.held = Vec::new();
        self.last
    }
}

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
    /// The incomplete last event, not yet sent.
    held: BytesMut,
    /// An event too large to hold is being passed through; `carry` has its last two bytes.
    passing: bool,
    carry: Vec<u8>,
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
        let mut out = Output::Nothing;
        let mut pos = 0;
        if self.passing {
            let Some(end) = first_boundary(&self.carry, &chunk) else {
                keep_last_two(&mut self.carry, &chunk);
                return chunk;
            };
            self.passing = false;
            self.carry.clear();
            out.keep(&chunk, 0..end);
            pos = end;
        } else if !self.held.is_empty() {
            let Some(end) = first_boundary(&self.held, &chunk) else {
                self.hold(&chunk, 0, &mut out);
                return out.into_bytes(&chunk);
            };
            let mut event = std::mem::take(&mut self.held);
            event.extend_from_slice(&chunk[..end]);
            if !self.is_usage_only(&event) {
                out.push_owned(&chunk, event);
            }
            pos = end;
        }
        while let Some(len) = first_boundary(&[], &chunk[pos..]) {
            let event = pos..pos + len;
            if !self.is_usage_only(&chunk[event.clone()]) {
                out.keep(&chunk, event);
            }
            pos += len;
        }
        if pos < chunk.len() {
            self.hold(&chunk, pos, &mut out);
        }
        out.into_bytes(&chunk)
    }

    /// At end of stream: whatever is still held (an incomplete event) is released as is.
    pub fn finish(&mut self) -> Bytes {
        self.passing = false;
        self.carry.clear();
        std::mem::take(&mut self.held).freeze()
    }

    /// The usage of the last usage-only chunk removed so far, if it had token counts.
    pub fn stripped_usage(&self) -> Option<Usage> {
        self.stripped
    }

    /// Holds `chunk[from..]`, the start of an event; if that makes the event too large to be a
    /// usage chunk, releases it into `out` and passes the rest of the event through instead.
    fn hold(&mut self, chunk: &Bytes, from: usize, out: &mut Output) {
        let tail = &chunk[from..];
        if self.held.len() + tail.len() <= MAX_EVENT_BYTES {
            self.held.extend_from_slice(tail);
            return;
        }
        log::debug!(
            "usage stripper: passing through an SSE event larger than {MAX_EVENT_BYTES} bytes \
             without holding it"
        );
        let held = std::mem::take(&mut self.held);
        self.carry.clear();
        keep_last_two(&mut self.carry, &held[held.len().saturating_sub(2)..]);
        keep_last_two(&mut self.carry, tail);
        if !held.is_empty() {
            out.push_owned(chunk, held);
        }
        out.keep(chunk, from..chunk.len());
        self.passing = true;
    }

    fn is_usage_only(&mut self, event: &[u8]) -> bool {
        if USAGE_KEY.find(event).is_none() {
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
                self.stripped = Some(usage);
            }
        }
        usage_only
    }
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
    use proptest::prelude::*;
    use serde_json::json;

    const SSE: &str = "text/event-stream";
    const JSON: &str = "application/json";

    fn usage(prompt: u64, completion: u64) -> Option<Usage> {
        Some(Usage { prompt, completion })
    }

    fn metered<'a>(content_type: &str, chunks: impl IntoIterator<Item = &'a [u8]>) -> UsageMeter {
        let mut meter = UsageMeter::for_response(content_type);
        for chunk in chunks {
            meter.feed(chunk);
        }
        meter
    }

    fn meter_once(content_type: &str, body: &[u8]) -> Option<Usage> {
        metered(content_type, [body]).finish()
    }

    /// `bytes` cut at the given (sorted) offsets.
    fn pieces<'a>(bytes: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
        let mut out = Vec::new();
        let mut start = 0;
        for &cut in cuts {
            out.push(&bytes[start..cut]);
            start = cut;
        }
        out.push(&bytes[start..]);
        out
    }

    fn parses(meter: &UsageMeter) -> u32 {
        match &meter.mode {
            Mode::Sse(sse) => sse.parses,
            Mode::Json(_) => panic!("not an SSE meter"),
        }
    }

    fn sse_held_len(meter: &UsageMeter) -> usize {
        match &meter.mode {
            Mode::Sse(sse) => sse.held.len(),
            Mode::Json(_) => panic!("not an SSE meter"),
        }
    }

    fn content_chunk(content: &str) -> String {
        let chunk = json!({
            "id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "gpt-4o",
            "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": null}],
            "usage": null,
        });
        format!("data: {chunk}\n\n")
    }

    fn usage_chunk(prompt: u64, completion: u64) -> String {
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

    const DONE: &str = "data: [DONE]\n\n";

    fn strip_all<'a>(chunks: impl IntoIterator<Item = &'a [u8]>) -> (Vec<u8>, UsageChunkStripper) {
        let mut stripper = UsageChunkStripper::new();
        let mut out = Vec::new();
        for chunk in chunks {
            out.extend_from_slice(&stripper.filter(Bytes::copy_from_slice(chunk)));
        }
        out.extend_from_slice(&stripper.finish());
        (out, stripper)
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
            assert!(tail.ring.len() <= JSON_TAIL_BYTES);
        }
        assert_eq!(meter.finish(), usage(7, 524288));
    }

    #[test]
    fn json_huge_body_fed_in_one_chunk_is_read() {
        assert_eq!(meter_once(JSON, &huge_body()), usage(7, 524288));
    }

    #[test]
    fn json_ring_keeps_exactly_the_last_bytes_for_any_chunk_size() {
        let body: Vec<u8> = (0..3 * JSON_TAIL_BYTES + 5)
            .map(|i| (i % 251) as u8)
            .collect();
        for size in [
            1,
            7,
            1000,
            JSON_TAIL_BYTES - 1,
            JSON_TAIL_BYTES,
            JSON_TAIL_BYTES + 3,
        ] {
            let mut tail = JsonTail::default();
            body.chunks(size).for_each(|chunk| tail.push(chunk));
            assert_eq!(
                tail.contiguous(),
                &body[body.len() - JSON_TAIL_BYTES..],
                "{size}"
            );
        }
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
                assert!(stripper.held.len() <= MAX_EVENT_BYTES);
            }
            out.extend_from_slice(&stripper.finish());
            assert!(out == expected.as_bytes(), "chunks of {size}");
            assert_eq!(stripper.stripped_usage(), usage(3, 3));
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
