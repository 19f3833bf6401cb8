//! What each key of one upstream has been doing: requests and errors over the last minute and
//! the last hour, when it was last used, its last error (status and a sanitised message), and
//! when the prober looks at it next. The admin API shows it per key.
//!
//! Recording happens once per upstream attempt, so it is a few atomic operations on the key's
//! own counters: no allocation and no lock shared between keys (a key's last error sits behind
//! that key's own small lock, taken only when an attempt failed).
//!
//! The windows are rings of 60 buckets, per second for the minute and per minute for the hour,
//! so "the last minute" covers the current second and the 59 before it (59 to 60 s), and "the
//! last hour" the current minute and the 59 before it.

use crate::append_only::AppendOnly;
use crate::clock::SharedClock;
use crate::error_body::MAX_ERROR_BODY;
use crate::keys::KeyIndex;
use crate::outcome::Outcome;
use crate::redact;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Longest error message kept, in characters (a longer one is cut and ends in `…`).
pub const MAX_MESSAGE_CHARS: usize = 200;

/// Buckets per window.
const SLOTS: u64 = 60;
/// A bucket packs its slot stamp and two counts into one `u64`, so that moving it to a new slot
/// and counting are one compare-and-swap: 24 bits of stamp, 20 bits per count.
const COUNT_BITS: u32 = 20;
const COUNT_MAX: u64 = (1 << COUNT_BITS) - 1;
const STAMP_BITS: u32 = 24;
const STAMP_MASK: u64 = (1 << STAMP_BITS) - 1;
/// Bytes of a body read for its message: enough for any error text, and a bound on the work
/// of scrubbing a large HTML error page.
const MESSAGE_SOURCE_BYTES: usize = 4 * 1024;

/// How one upstream attempt with a key ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptEnd<'a> {
    /// The upstream answered with this final status.
    Answered(u16),
    /// No answer came (a connect error, a timeout, a connection that broke); the text says which.
    NoAnswer(&'a str),
}

impl AttemptEnd<'_> {
    /// Whether the attempt counts as a success: only an answer whose outcome is
    /// [`Outcome::Success`]; every other answer and every missing answer is an error.
    pub fn is_success(self) -> bool {
        matches!(self, AttemptEnd::Answered(s) if Outcome::of(s) == Outcome::Success)
    }
}

/// One key's activity as the admin API shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ActivityView {
    /// Attempts over the last minute.
    pub requests_1m: u64,
    /// Failed attempts over the last minute.
    pub errors_1m: u64,
    /// Attempts over the last hour.
    pub requests_1h: u64,
    /// Failed attempts over the last hour.
    pub errors_1h: u64,
    /// How long ago the key was last used; `None` if never since start.
    pub last_used_ms_ago: Option<u64>,
    /// The key's last failed attempt; `None` if none since start.
    pub last_error: Option<LastErrorView>,
    /// How long until the prober probes the key; `None` when the key is not waiting for a probe
    /// (0 when one is due or under way).
    pub next_probe_in_ms: Option<u64>,
}

/// A key's last failed attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LastErrorView {
    /// The upstream's status; `None` when no answer came.
    pub status: Option<u16>,
    /// What went wrong: the upstream's error message with the key and account ids masked, or
    /// the status's reason phrase, or what kept the answer from coming (`timeout`, …).
    pub message: String,
    /// How long ago it happened.
    pub ms_ago: u64,
}

/// The activity of every key of one upstream, by [`KeyIndex`].
pub struct KeyActivity {
    clock: SharedClock,
    /// Every time below is kept as milliseconds after this instant.
    born: Instant,
    keys: AppendOnly<KeySlot>,
}

impl std::fmt::Debug for KeyActivity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyActivity")
            .field("keys", &self.keys.len())
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct KeySlot {
    minute: Window,
    hour: Window,
    /// Milliseconds after `born` of the last attempt, plus one (0: never).
    last_used: AtomicU64,
    /// Milliseconds after `born` of the next probe, plus one (0: none planned).
    next_probe: AtomicU64,
    last_error: Mutex<LastError>,
}

#[derive(Default)]
struct LastError {
    /// Milliseconds after `born`; `None` until the first error.
    at: Option<u64>,
    status: Option<u16>,
    /// Reused from error to error, so recording one allocates only while it grows.
    message: String,
}

/// A ring of [`SLOTS`] buckets, each stamped with the slot (second or minute) it counts.
struct Window {
    buckets: [AtomicU64; SLOTS as usize],
}

impl Default for Window {
    fn default() -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

fn pack(stamp: u64, requests: u64, errors: u64) -> u64 {
    ((stamp & STAMP_MASK) << (2 * COUNT_BITS)) | (requests << COUNT_BITS) | errors
}

fn unpack(bucket: u64) -> (u64, u64, u64) {
    (
        bucket >> (2 * COUNT_BITS),
        (bucket >> COUNT_BITS) & COUNT_MAX,
        bucket & COUNT_MAX,
    )
}

/// How many slots `stamp` lies before `slot`, modulo the stamp's width (a stamp ahead of `slot`
/// gives a huge age).
fn age(slot: u64, stamp: u64) -> u64 {
    slot.wrapping_sub(stamp) & STAMP_MASK
}

impl Window {
    /// Counts one attempt (and one error if `error`) in `slot`.
    fn add(&self, slot: u64, error: bool) {
        let bucket = &self.buckets[(slot % SLOTS) as usize];
        let mut current = bucket.load(Ordering::Relaxed);
        loop {
            let (stamp, requests, errors) = unpack(current);
            let (requests, errors) = match age(slot, stamp) {
                0 => (requests, errors),
                // A racing attempt that read a later clock has moved the bucket on already:
                // this late count belongs to a slot that is gone, and would only wipe it.
                a if a > STAMP_MASK / 2 => return,
                _ => (0, 0),
            };
            let next = pack(
                slot,
                (requests + 1).min(COUNT_MAX),
                (errors + u64::from(error)).min(COUNT_MAX),
            );
            match bucket.compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return,
                Err(seen) => current = seen,
            }
        }
    }

    /// (attempts, errors) of `slot` alone; zero when its bucket has moved on or holds an
    /// older slot.
    fn at(&self, slot: u64) -> (u64, u64) {
        let (stamp, requests, errors) =
            unpack(self.buckets[(slot % SLOTS) as usize].load(Ordering::Relaxed));
        if age(slot, stamp) == 0 {
            (requests, errors)
        } else {
            (0, 0)
        }
    }

    /// (attempts, errors) of the [`SLOTS`] slots ending with `slot`.
    fn sum(&self, slot: u64) -> (u64, u64) {
        self.buckets
            .iter()
            .map(|b| unpack(b.load(Ordering::Relaxed)))
            .filter(|&(stamp, _, _)| age(slot, stamp) < SLOTS)
            .fold((0, 0), |(r, e), (_, requests, errors)| {
                (r + requests, e + errors)
            })
    }
}

impl KeyActivity {
    /// Activity counters for `keys` keys (indices `0..keys`), timed by `clock`.
    pub fn new(keys: usize, clock: SharedClock) -> Self {
        Self {
            born: clock.now(),
            clock,
            keys: AppendOnly::new((0..keys).map(|_| KeySlot::default()).collect()),
        }
    }

    /// Counts keys up to index `len - 1` too (keys added to the pool at run time). Callers
    /// that grow it take turns, as the pool's additions do.
    pub fn grow_to(&self, len: usize) {
        while self.keys.len() < len {
            self.keys.push(KeySlot::default());
        }
    }

    /// How many keys are counted.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no key is counted.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    fn ms_since_born(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.born).as_millis()).unwrap_or(u64::MAX)
    }

    fn now_ms(&self) -> u64 {
        self.ms_since_born(self.clock.now())
    }

    /// Records one attempt with key `idx` (an index out of range is ignored). A failed attempt
    /// becomes the key's last error, with the status's reason phrase (or the `NoAnswer` text)
    /// as its message until [`KeyActivity::note_error_body`] brings the upstream's own.
    pub fn record(&self, idx: KeyIndex, end: AttemptEnd<'_>) {
        let Some(key) = self.keys.get(idx) else {
            return;
        };
        let now = self.now_ms();
        let error = !end.is_success();
        key.minute.add(now / 1_000, error);
        key.hour.add(now / 60_000, error);
        key.last_used.fetch_max(now + 1, Ordering::Relaxed);
        if !error {
            return;
        }
        let (status, message) = match end {
            AttemptEnd::Answered(s) => (
                Some(s),
                http::StatusCode::from_u16(s)
                    .ok()
                    .and_then(|c| c.canonical_reason())
                    .unwrap_or(""),
            ),
            AttemptEnd::NoAnswer(what) => (None, what),
        };
        let mut last = key.last_error.lock();
        if last.at.is_some_and(|at| at > now) {
            return; // a later error was recorded meanwhile
        }
        last.at = Some(now);
        last.status = status;
        last.message.clear();
        last.message.push_str(message);
    }

    /// Gives the key's last error the message of the upstream's error `body` (masked with the
    /// key's `secret`, see [`error_message`]), when that last error is still an answer with
    /// this `status`.
    pub fn note_error_body(&self, idx: KeyIndex, status: u16, body: &[u8], secret: &[u8]) {
        let Some(key) = self.keys.get(idx) else {
            return;
        };
        let message = error_message(body, secret);
        if message.is_empty() {
            return;
        }
        let mut last = key.last_error.lock();
        if last.status == Some(status) {
            last.message = message;
        }
    }

    /// Notes when key `idx` is probed next (`None`: it is not waiting for a probe).
    pub fn set_next_probe(&self, idx: KeyIndex, at: Option<Instant>) {
        if let Some(key) = self.keys.get(idx) {
            let stored = at.map_or(0, |at| self.ms_since_born(at).saturating_add(1));
            key.next_probe.store(stored, Ordering::Relaxed);
        }
    }

    /// Key `idx`'s activity now (all empty for an index out of range).
    pub fn snapshot(&self, idx: KeyIndex) -> ActivityView {
        let Some(key) = self.keys.get(idx) else {
            return ActivityView::default();
        };
        let now = self.now_ms();
        let (requests_1m, errors_1m) = key.minute.sum(now / 1_000);
        let (requests_1h, errors_1h) = key.hour.sum(now / 60_000);
        let ago = |stored: u64| (stored != 0).then(|| now.saturating_sub(stored - 1));
        let last_error = {
            let last = key.last_error.lock();
            last.at.map(|at| LastErrorView {
                status: last.status,
                message: last.message.clone(),
                ms_ago: now.saturating_sub(at),
            })
        };
        let next_probe = key.next_probe.load(Ordering::Relaxed);
        ActivityView {
            requests_1m,
            errors_1m,
            requests_1h,
            errors_1h,
            last_used_ms_ago: ago(key.last_used.load(Ordering::Relaxed)),
            last_error,
            next_probe_in_ms: (next_probe != 0).then(|| (next_probe - 1).saturating_sub(now)),
        }
    }
}

/// Requests and errors of every key together, one entry per minute, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MinuteRates {
    /// Attempts per minute.
    pub requests: Vec<u64>,
    /// Failed attempts per minute.
    pub errors: Vec<u64>,
}

impl KeyActivity {
    /// Attempts and errors of all keys together in each of the last `minutes` minutes (at most
    /// an hour's worth), oldest first; the last entry is the current, partial minute.
    pub fn per_minute(&self, minutes: usize) -> MinuteRates {
        let minutes = (minutes as u64).min(SLOTS);
        let current = self.now_ms() / 60_000;
        let mut rates = MinuteRates {
            requests: Vec::with_capacity(minutes as usize),
            errors: Vec::with_capacity(minutes as usize),
        };
        for back in (0..minutes).rev() {
            let (requests, errors) = match current.checked_sub(back) {
                Some(slot) => self.keys.iter().fold((0, 0), |(r, e), k| {
                    let (kr, ke) = k.hour.at(slot);
                    (r + kr, e + ke)
                }),
                None => (0, 0), // before keygate started
            };
            rates.requests.push(requests);
            rates.errors.push(errors);
        }
        rates
    }
}

/// The message of an upstream error body, fit to show an operator: `error.message` of an
/// OpenAI- or Anthropic-shaped body (or `error` when it is a string, or a top-level `message`),
/// else the body's text; any run of the key's `secret` and any account id masked
/// ([`redact::scrub`]), control characters and runs of white space made one space, and at most
/// [`MAX_MESSAGE_CHARS`] characters.
pub fn error_message(body: &[u8], secret: &[u8]) -> String {
    let mut text = json_message(body)
        .map(String::into_bytes)
        .unwrap_or_else(|| body[..body.len().min(MESSAGE_SOURCE_BYTES)].to_vec());
    // Scrubbed whole before it is cut, so that a key cut short is still recognised.
    redact::scrub(&mut text, secret);
    let text = String::from_utf8_lossy(&text);
    let mut out = String::with_capacity(MAX_MESSAGE_CHARS.min(text.len()));
    let mut chars = 0;
    for word in text.split(|c: char| c.is_whitespace() || c.is_control()) {
        if word.is_empty() {
            continue;
        }
        for c in (chars > 0).then_some(' ').into_iter().chain(word.chars()) {
            if chars == MAX_MESSAGE_CHARS {
                out.pop();
                out.push('…');
                return out;
            }
            out.push(c);
            chars += 1;
        }
    }
    out
}

/// `error.message`, `error` or `message` of a JSON error body.
fn json_message(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Envelope {
        error: Option<ErrorField>,
        message: Option<serde_json::Value>,
    }
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum ErrorField {
        Object {
            #[serde(default)]
            message: Option<serde_json::Value>,
        },
        Text(String),
        Other(serde::de::IgnoredAny),
    }
    if body.len() > MAX_ERROR_BODY {
        return None;
    }
    let envelope: Envelope = serde_json::from_slice(body).ok()?;
    let text = |v: Option<serde_json::Value>| match v {
        Some(serde_json::Value::String(s)) => Some(s),
        _ => None,
    };
    match envelope.error {
        Some(ErrorField::Object { message }) => text(message),
        Some(ErrorField::Text(s)) => Some(s),
        _ => None,
    }
    .or_else(|| text(envelope.message))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::clock::{Clock, ManualClock};
    use std::sync::Arc;
    use std::time::Duration;

    fn activity(keys: usize) -> (KeyActivity, Arc<ManualClock>) {
        let clock = ManualClock::new();
        (KeyActivity::new(keys, clock.clone()), clock)
    }

    #[test]
    fn only_a_successful_answer_is_a_success() {
        for s in [200, 201, 204, 304] {
            assert!(AttemptEnd::Answered(s).is_success(), "{s}");
        }
        for s in [400, 401, 403, 404, 429, 500, 502, 529] {
            assert!(!AttemptEnd::Answered(s).is_success(), "{s}");
        }
        assert!(!AttemptEnd::NoAnswer("timeout").is_success());
    }

    #[test]
    fn a_new_key_has_no_activity() {
        let (a, _) = activity(2);
        assert_eq!(a.snapshot(0), ActivityView::default());
        assert_eq!(a.snapshot(7), ActivityView::default());
    }

    #[test]
    fn requests_and_errors_are_counted_per_key() {
        let (a, _) = activity(2);
        a.record(0, AttemptEnd::Answered(200));
        a.record(0, AttemptEnd::Answered(429));
        a.record(0, AttemptEnd::NoAnswer("timeout"));
        a.record(1, AttemptEnd::Answered(200));
        let v = a.snapshot(0);
        assert_eq!((v.requests_1m, v.errors_1m), (3, 2));
        assert_eq!((v.requests_1h, v.errors_1h), (3, 2));
        let v = a.snapshot(1);
        assert_eq!((v.requests_1m, v.errors_1m), (1, 0));
        assert_eq!(v.last_error, None);
    }

    #[test]
    fn the_minute_window_slides_second_by_second() {
        let (a, clock) = activity(1);
        a.record(0, AttemptEnd::Answered(500));
        clock.advance(Duration::from_secs(30));
        a.record(0, AttemptEnd::Answered(200));
        clock.advance(Duration::from_secs(29));
        assert_eq!(a.snapshot(0).requests_1m, 2);
        // 60 s after the first attempt its second has left the window; the second is still in.
        clock.advance(Duration::from_secs(1));
        let v = a.snapshot(0);
        assert_eq!((v.requests_1m, v.errors_1m), (1, 0));
        clock.advance(Duration::from_secs(30));
        assert_eq!(a.snapshot(0).requests_1m, 0);
        // The hour still holds both.
        assert_eq!(a.snapshot(0).requests_1h, 2);
        assert_eq!(a.snapshot(0).errors_1h, 1);
    }

    #[test]
    fn the_hour_window_slides_minute_by_minute_and_old_buckets_are_reused_from_zero() {
        let (a, clock) = activity(1);
        for _ in 0..5 {
            a.record(0, AttemptEnd::Answered(429));
        }
        clock.advance(Duration::from_secs(59 * 60));
        a.record(0, AttemptEnd::Answered(200));
        let v = a.snapshot(0);
        assert_eq!((v.requests_1m, v.requests_1h, v.errors_1h), (1, 6, 5));
        clock.advance(Duration::from_secs(60));
        let v = a.snapshot(0);
        assert_eq!((v.requests_1m, v.requests_1h, v.errors_1h), (0, 1, 0));
        // Two hours on, the same buckets count afresh: nothing of the old counts comes back.
        clock.advance(Duration::from_secs(2 * 3600));
        a.record(0, AttemptEnd::Answered(200));
        let v = a.snapshot(0);
        assert_eq!(
            (v.requests_1m, v.errors_1m, v.requests_1h, v.errors_1h),
            (1, 0, 1, 0)
        );
    }

    #[test]
    fn a_late_count_never_wipes_a_bucket_a_later_slot_took() {
        let w = Window::default();
        w.add(SLOTS + 3, false);
        w.add(3, true); // same bucket, a slot that is gone
        assert_eq!(w.sum(SLOTS + 3), (1, 0));
    }

    #[test]
    fn counts_saturate_instead_of_spilling_into_the_stamp() {
        let w = Window::default();
        w.buckets[5].store(pack(5, COUNT_MAX, COUNT_MAX), Ordering::Relaxed);
        w.add(5, true);
        assert_eq!(w.sum(5), (COUNT_MAX, COUNT_MAX));
        assert_eq!(unpack(w.buckets[5].load(Ordering::Relaxed)).0, 5);
    }

    #[test]
    fn last_used_is_the_latest_attempt() {
        let (a, clock) = activity(1);
        a.record(0, AttemptEnd::Answered(200));
        clock.advance(Duration::from_millis(1_500));
        assert_eq!(a.snapshot(0).last_used_ms_ago, Some(1_500));
        a.record(0, AttemptEnd::NoAnswer("connect_error"));
        clock.advance(Duration::from_millis(20));
        assert_eq!(a.snapshot(0).last_used_ms_ago, Some(20));
    }

    #[test]
    fn the_last_error_is_kept_across_later_successes() {
        let (a, clock) = activity(1);
        a.record(0, AttemptEnd::Answered(503));
        clock.advance(Duration::from_secs(2));
        a.record(0, AttemptEnd::NoAnswer("timeout"));
        clock.advance(Duration::from_secs(3));
        a.record(0, AttemptEnd::Answered(200));
        let v = a.snapshot(0);
        assert_eq!(
            v.last_error,
            Some(LastErrorView {
                status: None,
                message: "timeout".into(),
                ms_ago: 3_000
            })
        );
        a.record(0, AttemptEnd::Answered(429));
        let e = a.snapshot(0).last_error.unwrap();
        assert_eq!(
            (e.status, e.message.as_str(), e.ms_ago),
            (Some(429), "Too Many Requests", 0)
        );
    }

    #[test]
    fn the_error_body_gives_the_last_error_its_message_with_the_key_masked() {
        let (a, _) = activity(1);
        let secret = b"sk-proj-abcdefghijklmnop0123456789";
        a.record(0, AttemptEnd::Answered(401));
        let body = br#"{"error":{"message":"Incorrect API key provided: sk-proj-abcdefghijklmnop0123456789. Org org-AbCdEf123456 says no.","type":"invalid_request_error","code":"invalid_api_key"}}"#;
        a.note_error_body(0, 401, body, secret);
        let e = a.snapshot(0).last_error.unwrap();
        assert_eq!(e.status, Some(401));
        assert!(
            e.message.starts_with("Incorrect API key provided: "),
            "{}",
            e.message
        );
        assert!(!e.message.contains("abcdefgh"), "{}", e.message);
        assert!(!e.message.contains("AbCdEf123456"), "{}", e.message);
        assert!(e.message.contains("org-"), "{}", e.message);
    }

    #[test]
    fn a_body_for_another_status_does_not_rename_the_last_error() {
        let (a, _) = activity(1);
        a.record(0, AttemptEnd::Answered(429));
        a.record(0, AttemptEnd::NoAnswer("timeout"));
        a.note_error_body(0, 429, br#"{"error":{"message":"slow down"}}"#, b"");
        assert_eq!(a.snapshot(0).last_error.unwrap().message, "timeout");
    }

    #[test]
    fn messages_come_from_every_usual_error_shape() {
        let anthropic =
            br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
        assert_eq!(error_message(anthropic, b""), "Overloaded");
        assert_eq!(
            error_message(br#"{"error":"bad gateway"}"#, b""),
            "bad gateway"
        );
        assert_eq!(error_message(br#"{"message":"no route"}"#, b""), "no route");
        assert_eq!(
            error_message(b"<html>\r\n<h1>502   Bad\tGateway</h1>\n</html>", b""),
            "<html> <h1>502 Bad Gateway</h1> </html>"
        );
        assert_eq!(error_message(b"", b""), "");
    }

    #[test]
    fn a_long_message_is_cut_to_the_limit_with_an_ellipsis() {
        let long = format!(r#"{{"error":{{"message":"{}"}}}}"#, "é".repeat(500));
        let m = error_message(long.as_bytes(), b"");
        assert_eq!(m.chars().count(), MAX_MESSAGE_CHARS);
        assert!(m.ends_with('…'));
        let exact = "x".repeat(MAX_MESSAGE_CHARS);
        assert_eq!(error_message(exact.as_bytes(), b""), exact);
    }

    #[test]
    fn a_key_at_the_cut_is_masked_before_the_cut() {
        let secret = b"sk-0123456789abcdefghij";
        let body = format!(
            "{}{}",
            "a".repeat(MAX_MESSAGE_CHARS - 4),
            "sk-0123456789abcdefghij"
        );
        let m = error_message(body.as_bytes(), secret);
        assert!(!m.contains("sk-0"), "{m}");
        assert!(m.ends_with("***…"), "{m}");
    }

    #[test]
    fn the_next_probe_counts_down_and_clears() {
        let (a, clock) = activity(2);
        assert_eq!(a.snapshot(0).next_probe_in_ms, None);
        a.set_next_probe(0, Some(clock.now() + Duration::from_secs(30)));
        clock.advance(Duration::from_secs(10));
        assert_eq!(a.snapshot(0).next_probe_in_ms, Some(20_000));
        assert_eq!(a.snapshot(1).next_probe_in_ms, None);
        clock.advance(Duration::from_secs(25));
        assert_eq!(
            a.snapshot(0).next_probe_in_ms,
            Some(0),
            "overdue reads as due now"
        );
        a.set_next_probe(0, None);
        assert_eq!(a.snapshot(0).next_probe_in_ms, None);
        a.set_next_probe(9, Some(clock.now())); // out of range: ignored
    }

    #[test]
    fn the_view_serialises_with_the_field_names_the_admin_api_shows() {
        let (a, clock) = activity(1);
        a.record(0, AttemptEnd::NoAnswer("connect_error"));
        clock.advance(Duration::from_millis(5));
        let json = serde_json::to_value(a.snapshot(0)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "requests_1m": 1, "errors_1m": 1, "requests_1h": 1, "errors_1h": 1,
                "last_used_ms_ago": 5,
                "last_error": { "status": null, "message": "connect_error", "ms_ago": 5 },
                "next_probe_in_ms": null
            })
        );
    }

    #[test]
    fn per_minute_sums_all_keys_minute_by_minute_oldest_first() {
        let (a, clock) = activity(3);
        a.record(0, AttemptEnd::Answered(200));
        a.record(1, AttemptEnd::Answered(500));
        clock.advance(Duration::from_secs(60));
        a.record(2, AttemptEnd::Answered(200));
        clock.advance(Duration::from_secs(2 * 60));
        a.record(0, AttemptEnd::Answered(429));
        a.record(1, AttemptEnd::NoAnswer("timeout"));
        a.record(2, AttemptEnd::Answered(200));
        let r = a.per_minute(5);
        // Minutes 0, 1, 2, 3 since start, and one before keygate started.
        assert_eq!(r.requests, vec![0, 2, 1, 0, 3]);
        assert_eq!(r.errors, vec![0, 1, 0, 0, 2]);
        // The current minute is the last entry, partial: a record now adds to it.
        a.record(0, AttemptEnd::Answered(200));
        assert_eq!(a.per_minute(1).requests, vec![4]);
    }

    #[test]
    fn per_minute_forgets_minutes_that_left_the_window() {
        let (a, clock) = activity(1);
        a.record(0, AttemptEnd::Answered(500));
        clock.advance(Duration::from_secs(14 * 60));
        assert_eq!(a.per_minute(15).requests[0], 1);
        assert_eq!(a.per_minute(15).errors[0], 1);
        clock.advance(Duration::from_secs(60));
        assert_eq!(
            a.per_minute(15),
            MinuteRates {
                requests: vec![0; 15],
                errors: vec![0; 15]
            }
        );
        // An hour on, the same bucket is not read as this minute's.
        clock.advance(Duration::from_secs(45 * 60));
        assert_eq!(a.per_minute(1).requests, vec![0]);
        assert_eq!(a.per_minute(60).requests.iter().sum::<u64>(), 0);
    }

    #[test]
    fn per_minute_reads_at_most_an_hour() {
        let (a, _) = activity(1);
        let r = a.per_minute(500);
        assert_eq!((r.requests.len(), r.errors.len()), (60, 60));
        assert_eq!(a.per_minute(0), MinuteRates::default());
    }

    #[test]
    fn concurrent_recording_loses_no_count() {
        let (a, _) = activity(1);
        let a = Arc::new(a);
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let a = a.clone();
                std::thread::spawn(move || {
                    for i in 0..1_000 {
                        let status = if (i + t) % 4 == 0 { 500 } else { 200 };
                        a.record(0, AttemptEnd::Answered(status));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let v = a.snapshot(0);
        assert_eq!((v.requests_1m, v.errors_1m), (4_000, 1_000));
    }
}
