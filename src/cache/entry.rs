//! What the cache keeps of an answer, and the capture that collects it as it passes.
//!
//! Only a complete `200` is kept: a plain JSON body that parses whole, or a stream of
//! server-sent events that ended with `data: [DONE]` (Anthropic's: with `message_stop`). Its body is exactly what the client
//! received (after keygate hid a usage chunk it had asked for on the client's behalf), and of
//! its headers only those in [`KEPT_HEADERS`]: never one that names an account
//! (`openai-organization`, `openai-project`), sets a cookie or identifies the original request.

use crate::usage::Usage;
use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue};
use std::time::{Duration, Instant};

/// Upstream response headers a stored answer keeps; every other header is dropped.
pub const KEPT_HEADERS: &[&str] = &["content-type", "openai-version"];

/// Bookkeeping bytes counted for every entry beside its body and headers.
const ENTRY_OVERHEAD: usize = 128;

/// A stored answer.
#[derive(Debug)]
pub struct CachedAnswer {
    /// The kept headers.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The body as the client received it.
    pub body: Bytes,
    /// Whether the body is a stream of server-sent events.
    pub events: bool,
    /// The usage the upstream reported for it (what a hit saves).
    pub usage: Option<Usage>,
    /// When it was stored (by the cache's clock).
    pub stored_at: Instant,
    /// How long it may be served.
    pub ttl: Duration,
}

impl CachedAnswer {
    /// Bytes it takes in the store, for the store's size bound.
    pub fn weight(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len())
            .sum();
        ENTRY_OVERHEAD + headers + self.body.len()
    }

    /// Its age at `now`.
    pub fn age(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.stored_at)
    }
}

/// Collects an upstream `200` as it goes to the client, up to a size limit.
#[derive(Debug)]
pub struct Capture {
    headers: Vec<(HeaderName, HeaderValue)>,
    body: BytesMut,
    limit: usize,
    events: bool,
    abandoned: bool,
}

impl Capture {
    /// A capture of an answer with these response headers, abandoned past `limit` body bytes.
    pub fn new(headers: &HeaderMap, limit: usize) -> Self {
        let kept = KEPT_HEADERS
            .iter()
            .filter_map(|name| {
                let v = headers.get(*name)?;
                Some((HeaderName::from_static(name), v.clone()))
            })
            .collect();
        let events = headers
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| starts_with_ignore_case(v.as_bytes(), b"text/event-stream"));
        Self {
            headers: kept,
            body: BytesMut::new(),
            limit,
            events,
            abandoned: false,
        }
    }

    /// Adds the next piece of the body as the client receives it.
    pub fn feed(&mut self, chunk: &[u8]) {
        if self.abandoned {
            return;
        }
        if self.body.len() + chunk.len() > self.limit {
            // Too large to keep: stop holding it at once.
            self.abandoned = true;
            self.body = BytesMut::new();
            return;
        }
        self.body.extend_from_slice(chunk);
    }

    /// Whether the capture was given up (the answer is larger than the limit).
    pub fn abandoned(&self) -> bool {
        self.abandoned
    }

    /// The answer to store once the body has ended, or `None` when it is not complete (cut
    /// short, not valid JSON, a stream without its `[DONE]` or `message_stop`) or was too large.
    pub fn finish(self, usage: Option<Usage>, now: Instant, ttl: Duration) -> Option<CachedAnswer> {
        if self.abandoned {
            return None;
        }
        let complete = if self.events {
            ends_with_done(&self.body)
        } else {
            serde_json::from_slice::<serde::de::IgnoredAny>(&self.body).is_ok()
        };
        complete.then(|| CachedAnswer {
            headers: self.headers,
            body: self.body.freeze(),
            events: self.events,
            usage,
            stored_at: now,
            ttl,
        })
    }
}

fn starts_with_ignore_case(text: &[u8], prefix: &[u8]) -> bool {
    text.len() >= prefix.len() && text[..prefix.len()].eq_ignore_ascii_case(prefix)
}

/// Whether a stream ended as its API ends a whole one: OpenAI's last event is `data: [DONE]`,
/// Anthropic's is `message_stop` (an `error` event or a cut leaves something else last).
fn ends_with_done(body: &[u8]) -> bool {
    let trimmed = body.trim_ascii_end();
    let last_line = trimmed
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(trimmed, |i| &trimmed[i + 1..]);
    let Some(data) = last_line.strip_prefix(b"data:") else {
        return false;
    };
    let data = data.trim_ascii();
    data == b"[DONE]" || is_message_stop(data)
}

/// Whether an event's data is Anthropic's `{"type":"message_stop"}`.
fn is_message_stop(data: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Event<'a> {
        #[serde(rename = "type", borrow)]
        kind: Option<std::borrow::Cow<'a, str>>,
    }
    serde_json::from_slice::<Event>(data).is_ok_and(|e| e.kind.as_deref() == Some("message_stop"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn headers(content_type: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("content-type", content_type.parse().unwrap());
        h.insert("openai-organization", "org-secret".parse().unwrap());
        h.insert("openai-project", "proj_secret".parse().unwrap());
        h.insert("set-cookie", "__cf_bm=abc".parse().unwrap());
        h.insert("x-request-id", "req_1".parse().unwrap());
        h.insert("openai-version", "2020-10-01".parse().unwrap());
        h
    }

    #[test]
    fn an_anthropic_stream_is_whole_when_message_stop_comes_last() {
        let whole = b"event: message_start\ndata: {\"type\":\"message_start\"}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
        assert!(ends_with_done(whole));
        let errored = b"event: message_start\ndata: {\"type\":\"message_start\"}\n\nevent: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\"}}\n\n";
        assert!(!ends_with_done(errored));
        let cut = b"event: message_delta\ndata: {\"type\":\"message_delta\"}\n\n";
        assert!(!ends_with_done(cut));
        assert!(!ends_with_done(b"data: {\"type\":\"message_sto"));
        assert!(!ends_with_done(b"data: \"message_stop\"\n\n"));
    }

    fn finish(c: Capture) -> Option<CachedAnswer> {
        c.finish(None, Instant::now(), Duration::from_secs(60))
    }

    #[test]
    fn a_complete_json_answer_is_kept_without_account_headers() {
        let mut c = Capture::new(&headers("application/json"), 1024);
        c.feed(br#"{"id":"chatcmpl-1","#);
        c.feed(br#""choices":[]}"#);
        let a = finish(c).unwrap();
        assert!(!a.events);
        assert_eq!(&a.body[..], br#"{"id":"chatcmpl-1","choices":[]}"#);
        let names: Vec<&str> = a.headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["content-type", "openai-version"]);
    }

    #[test]
    fn a_truncated_json_answer_is_not_kept() {
        let mut c = Capture::new(&headers("application/json"), 1024);
        c.feed(br#"{"id":"chatcmpl-1","choi"#);
        assert!(finish(c).is_none());
    }

    #[test]
    fn a_stream_is_kept_only_when_it_ended_with_done() {
        let events = b"data: {\"a\":1}\n\ndata: {\"b\":2}\n\n";
        let mut cut = Capture::new(&headers("text/event-stream; charset=utf-8"), 1024);
        cut.feed(events);
        assert!(finish(cut).is_none());
        let mut whole = Capture::new(&headers("Text/Event-Stream"), 1024);
        whole.feed(events);
        whole.feed(b"data: [DONE]\n\n");
        let a = finish(whole).unwrap();
        assert!(a.events);
        assert!(a.body.ends_with(b"data: [DONE]\n\n"));
        let mut crlf = Capture::new(&headers("text/event-stream"), 1024);
        crlf.feed(b"data: {}\r\n\r\ndata:[DONE]\r\n\r\n");
        assert!(finish(crlf).is_some());
    }

    #[test]
    fn an_answer_over_the_limit_is_abandoned_and_let_go() {
        let mut c = Capture::new(&headers("application/json"), 10);
        c.feed(b"{\"a\":");
        assert!(!c.abandoned());
        c.feed(b"\"123456\"}");
        assert!(c.abandoned());
        assert_eq!(c.body.capacity(), 0, "the bytes held so far are released");
        c.feed(b"}");
        assert!(finish(c).is_none());
        let mut exact = Capture::new(&headers("application/json"), 9);
        exact.feed(b"{\"a\":123}");
        assert!(finish(exact).is_some(), "exactly the limit is kept");
    }

    #[test]
    fn weight_counts_body_headers_and_overhead() {
        let mut c = Capture::new(&headers("application/json"), 1024);
        c.feed(b"{}");
        let a = finish(c).unwrap();
        let header_bytes = "content-type".len()
            + "application/json".len()
            + "openai-version".len()
            + "2020-10-01".len();
        assert_eq!(a.weight(), ENTRY_OVERHEAD + header_bytes + 2);
    }
}
