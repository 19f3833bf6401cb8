//! Headroom: what each key has left of its upstream's rate limits, so that a key about to run
//! out rests before the upstream answers 429, and [`super::KeyPolicy::Headroom`] can prefer the
//! keys with the most left.
//!
//! Every answer may say how much is left: OpenAI's `x-ratelimit-{limit,remaining,reset}-
//! {requests,tokens}` (resets as durations, `6m0s`), Anthropic's `anthropic-ratelimit-
//! {requests,tokens}-{limit,remaining,reset}` (resets as RFC 3339 times). Those numbers lag:
//! requests sent since the answer's request was counted are not in them. So the tracker keeps,
//! per key and model (OpenAI's limits are per model; Anthropic's per model class), the last
//! report less what keygate has sent since, and counts the limit whole again once its reset has
//! passed. Tokens are charged per request at the average the report implies (tokens used over
//! requests used in the current window), since a request's cost is only known after it.
//!
//! Everything here is plain arithmetic on times in nanoseconds since the pool's epoch, so tests
//! drive it with plain numbers. Keys that never report cost one atomic load per question.

use crate::append_only::AppendOnly;
use crate::retry_after::{parse_openai_duration, parse_rfc3339, MAX_REQUESTED};
use http::HeaderMap;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

/// The most models one key tracks headroom for, whatever model names clients send (as with
/// [`super::MAX_MODEL_COOLDOWNS`]); a new model past it replaces the one whose report is oldest.
pub const MAX_MODEL_HEADROOMS: usize = 64;

/// A limit larger than this reads as junk (no upstream grants a trillion per minute).
const MAX_LIMIT: u64 = 1_000_000_000_000;

/// [`score`](Headroom::score) of a key with all of its limits left, or reporting nothing.
pub const FULL: u32 = 1_000_000;

/// The limit, remaining and reset headers of each limit: names spelled out, so that reading
/// an answer allocates nothing.
const OPENAI_REQUESTS: [&str; 3] = [
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
];
const OPENAI_TOKENS: [&str; 3] = [
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
];
const ANTHROPIC_REQUESTS: [&str; 3] = [
    "anthropic-ratelimit-requests-limit",
    "anthropic-ratelimit-requests-remaining",
    "anthropic-ratelimit-requests-reset",
];
const ANTHROPIC_TOKENS: [&str; 3] = [
    "anthropic-ratelimit-tokens-limit",
    "anthropic-ratelimit-tokens-remaining",
    "anthropic-ratelimit-tokens-reset",
];

/// One limit as an answer reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reported {
    /// The limit per window.
    pub limit: u64,
    /// What was left of it.
    pub remaining: u64,
    /// How long until it is whole again.
    pub reset: Duration,
}

/// What one answer said about its key's limits; empty when it said nothing usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RateReport {
    /// The requests limit.
    pub requests: Option<Reported>,
    /// The tokens limit.
    pub tokens: Option<Reported>,
}

impl RateReport {
    /// Reads OpenAI's headers, or else Anthropic's (their resets relative to `now`). A limit is
    /// taken only whole and sane: limit, remaining and reset all present, numbers plain decimal,
    /// the limit between 1 and a trillion, remaining at most the limit, the reset parseable;
    /// anything else (junk, negative, huge, missing) leaves that limit out. Never panics.
    pub fn from_headers(headers: &HeaderMap, now: SystemTime) -> Self {
        let openai = |[limit, remaining, reset]: [&str; 3]| {
            reported(
                header(headers, limit),
                header(headers, remaining),
                header(headers, reset).and_then(parse_openai_duration),
            )
        };
        let report = RateReport {
            requests: openai(OPENAI_REQUESTS),
            tokens: openai(OPENAI_TOKENS),
        };
        if !report.is_empty() {
            return report;
        }
        let anthropic = |[limit, remaining, reset]: [&str; 3]| {
            let reset = header(headers, reset).and_then(parse_rfc3339).map(|at| {
                at.duration_since(now)
                    .unwrap_or(Duration::ZERO)
                    .min(MAX_REQUESTED)
            });
            reported(header(headers, limit), header(headers, remaining), reset)
        };
        RateReport {
            requests: anthropic(ANTHROPIC_REQUESTS),
            tokens: anthropic(ANTHROPIC_TOKENS),
        }
    }

    /// Whether it holds no limit.
    pub fn is_empty(&self) -> bool {
        self.requests.is_none() && self.tokens.is_none()
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name)?.to_str().ok().map(str::trim)
}

/// A plain decimal count (no sign, no fraction).
fn count(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn reported(
    limit: Option<&str>,
    remaining: Option<&str>,
    reset: Option<Duration>,
) -> Option<Reported> {
    let limit = count(limit?).filter(|l| (1..=MAX_LIMIT).contains(l))?;
    let remaining = count(remaining?).filter(|r| *r <= limit)?;
    Some(Reported {
        limit,
        remaining,
        reset: reset?,
    })
}

/// One limit's estimate.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    limit: u64,
    /// Left by the last report, less what was sent since.
    left: u64,
    /// When it is whole again, in nanoseconds since the epoch.
    reset_at: u64,
}

impl Bucket {
    fn new(r: Reported, now: u64) -> Self {
        let reset = u64::try_from(r.reset.as_nanos()).unwrap_or(u64::MAX);
        Bucket {
            limit: r.limit,
            left: r.remaining,
            reset_at: now.saturating_add(reset),
        }
    }

    /// Whether the estimate still holds (its reset is ahead).
    fn live(&self, now: u64) -> bool {
        now < self.reset_at
    }

    /// Left now: the estimate, or the whole limit once the reset has passed.
    fn left(&self, now: u64) -> u64 {
        if self.live(now) {
            self.left
        } else {
            self.limit
        }
    }

    /// Parts per million of the limit left now.
    fn score(&self, now: u64) -> u32 {
        let ppm = u128::from(self.left(now)) * u128::from(FULL) / u128::from(self.limit);
        u32::try_from(ppm).unwrap_or(FULL).min(FULL)
    }
}

/// One model's limits on one key.
struct Entry {
    model: Box<str>,
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
    /// What one request costs against `tokens`, as the last report implied.
    tokens_per_request: u64,
    /// When the last report came, for eviction.
    reported_at: u64,
}

impl Entry {
    fn score(&self, now: u64) -> u32 {
        let r = self.requests.map_or(FULL, |b| b.score(now));
        let t = self.tokens.map_or(FULL, |b| b.score(now));
        r.min(t)
    }

    /// How long to rest when the estimate says the next request would be refused: until the
    /// latest reset among the exhausted limits. `None` while there is room.
    fn rest(&self, now: u64) -> Option<Duration> {
        let requests_out = self.requests.filter(|b| b.live(now) && b.left == 0);
        let tokens_out = self
            .tokens
            .filter(|b| b.live(now) && (b.left == 0 || b.left < self.tokens_per_request));
        let until = requests_out
            .into_iter()
            .chain(tokens_out)
            .map(|b| b.reset_at)
            .max()?;
        Some(Duration::from_nanos(until - now))
    }

    /// Charges one request sent now.
    fn charge(&mut self, now: u64) {
        if let Some(b) = self.requests.as_mut().filter(|b| b.live(now)) {
            b.left = b.left.saturating_sub(1);
        }
        let cost = self.tokens_per_request;
        if let Some(b) = self.tokens.as_mut().filter(|b| b.live(now)) {
            b.left = b.left.saturating_sub(cost);
        }
    }

    /// Takes a report in, less `unseen` requests sent that it may not count yet.
    fn take(&mut self, report: &RateReport, unseen: u64, now: u64) {
        if let (Some(r), Some(t)) = (report.requests, report.tokens) {
            if let Some(cost) = (t.limit - t.remaining).checked_div(r.limit - r.remaining) {
                self.tokens_per_request = cost;
            }
        }
        self.requests = report.requests.map(|r| {
            let mut b = Bucket::new(r, now);
            b.left = b.left.saturating_sub(unseen);
            b
        });
        let cost = unseen.saturating_mul(self.tokens_per_request);
        self.tokens = report.tokens.map(|t| {
            let mut b = Bucket::new(t, now);
            b.left = b.left.saturating_sub(cost);
            b
        });
        self.reported_at = now;
    }
}

/// One key's entries; the flag lets keys that never reported skip the lock.
#[derive(Default)]
struct KeyHeadroom {
    has_data: AtomicBool,
    entries: Mutex<Vec<Entry>>,
}

/// The headroom of every key of one pool, by key index. Grows on the first report of a key
/// added at run time; a key it has not grown to yet reads as having reported nothing.
pub struct Headroom {
    keys: AppendOnly<KeyHeadroom>,
    grow: Mutex<()>,
}

impl Headroom {
    /// Room for `keys` keys (more are added on demand).
    pub fn new(keys: usize) -> Self {
        Headroom {
            keys: AppendOnly::new((0..keys).map(|_| KeyHeadroom::default()).collect()),
            grow: Mutex::new(()),
        }
    }

    fn key(&self, idx: usize) -> Option<&KeyHeadroom> {
        self.keys
            .get(idx)
            .filter(|k| k.has_data.load(Ordering::Acquire))
    }

    /// Whether key `idx` ever reported a limit (otherwise its score is [`FULL`] at any time).
    pub fn reports(&self, idx: usize) -> bool {
        self.key(idx).is_some()
    }

    fn key_or_grow(&self, idx: usize) -> &KeyHeadroom {
        if idx >= self.keys.len() {
            let _turn = self.grow.lock();
            while self.keys.len() <= idx {
                self.keys.push(KeyHeadroom::default());
            }
        }
        &self.keys[idx]
    }

    /// Parts per million of key `idx`'s limits for `model` left now, the least of requests and
    /// tokens; [`FULL`] for a key that reported nothing for `model` or whose resets passed.
    pub fn score(&self, idx: usize, model: &str, now: u64) -> u32 {
        let Some(key) = self.key(idx) else {
            return FULL;
        };
        let entries = key.entries.lock();
        entries
            .iter()
            .find(|e| &*e.model == model)
            .map_or(FULL, |e| e.score(now))
    }

    /// A request sent on key `idx` for `model` now: charged to its estimate. Returns how long
    /// the key should rest when that leaves nothing for the next one.
    pub fn sent(&self, idx: usize, model: &str, now: u64) -> Option<Duration> {
        let key = self.key(idx)?;
        let mut entries = key.entries.lock();
        let entry = entries.iter_mut().find(|e| &*e.model == model)?;
        entry.charge(now);
        entry.rest(now)
    }

    /// An answer on key `idx` for `model` reported `report`, while `unseen` other requests on
    /// the key were in flight (sent, perhaps not counted in the report yet: counted against it,
    /// erring towards resting early rather than meeting a 429). Returns how long the key should
    /// rest when nothing is left for the next request.
    pub fn report(
        &self,
        idx: usize,
        model: &str,
        report: &RateReport,
        unseen: u64,
        now: u64,
    ) -> Option<Duration> {
        if report.is_empty() {
            return None;
        }
        let key = self.key_or_grow(idx);
        let mut entries = key.entries.lock();
        let pos = match entries.iter().position(|e| &*e.model == model) {
            Some(pos) => pos,
            None => {
                if entries.len() >= MAX_MODEL_HEADROOMS {
                    if let Some(oldest) = (0..entries.len()).min_by_key(|&i| entries[i].reported_at)
                    {
                        entries.swap_remove(oldest);
                    }
                }
                entries.push(Entry {
                    model: model.into(),
                    requests: None,
                    tokens: None,
                    tokens_per_request: 0,
                    reported_at: now,
                });
                entries.len() - 1
            }
        };
        key.has_data.store(true, Ordering::Release);
        let entry = &mut entries[pos];
        entry.take(report, unseen, now);
        entry.rest(now)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use std::time::UNIX_EPOCH;

    const SEC: u64 = 1_000_000_000;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn openai(limit: &str, remaining: &str, reset: &str) -> HeaderMap {
        headers(&[
            ("x-ratelimit-limit-requests", limit),
            ("x-ratelimit-remaining-requests", remaining),
            ("x-ratelimit-reset-requests", reset),
        ])
    }

    fn requests(limit: u64, remaining: u64, reset_secs: u64) -> RateReport {
        RateReport {
            requests: Some(Reported {
                limit,
                remaining,
                reset: Duration::from_secs(reset_secs),
            }),
            tokens: None,
        }
    }

    #[test]
    fn openai_headers_are_read() {
        let h = headers(&[
            ("x-ratelimit-limit-requests", "60"),
            ("x-ratelimit-remaining-requests", "59"),
            ("x-ratelimit-reset-requests", "1s"),
            ("x-ratelimit-limit-tokens", "150000"),
            ("x-ratelimit-remaining-tokens", "149984"),
            ("x-ratelimit-reset-tokens", "6m0s"),
        ]);
        let r = RateReport::from_headers(&h, UNIX_EPOCH);
        assert_eq!(
            r.requests,
            Some(Reported {
                limit: 60,
                remaining: 59,
                reset: Duration::from_secs(1)
            })
        );
        assert_eq!(r.tokens.map(|t| t.reset), Some(Duration::from_secs(360)));
    }

    #[test]
    fn anthropic_headers_are_read_relative_to_now() {
        let h = headers(&[
            ("anthropic-ratelimit-requests-limit", "50"),
            ("anthropic-ratelimit-requests-remaining", "10"),
            ("anthropic-ratelimit-requests-reset", "1970-01-01T00:00:30Z"),
        ]);
        let now = UNIX_EPOCH + Duration::from_secs(10);
        let r = RateReport::from_headers(&h, now);
        assert_eq!(r.requests.map(|q| q.reset), Some(Duration::from_secs(20)));
        assert_eq!(r.requests.map(|q| q.remaining), Some(10));
        assert!(r.tokens.is_none());
        let past = UNIX_EPOCH + Duration::from_secs(100);
        let r = RateReport::from_headers(&h, past);
        assert_eq!(r.requests.map(|q| q.reset), Some(Duration::ZERO));
    }

    #[test]
    fn junk_negative_huge_and_missing_values_are_ignored() {
        for (limit, remaining, reset) in [
            ("abc", "1", "1s"),
            ("60", "-1", "1s"),
            ("-60", "1", "1s"),
            ("60", "1", "soon"),
            ("60", "1", "-1s"),
            ("0", "0", "1s"),
            ("60", "61", "1s"),
            ("99999999999999999999999", "1", "1s"),
            ("2000000000000", "1", "1s"),
            ("60.5", "1", "1s"),
            ("", "1", "1s"),
            ("60", "", "1s"),
        ] {
            let r = RateReport::from_headers(&openai(limit, remaining, reset), UNIX_EPOCH);
            assert!(r.is_empty(), "{limit} {remaining} {reset}: {r:?}");
        }
        let missing = headers(&[
            ("x-ratelimit-limit-requests", "60"),
            ("x-ratelimit-remaining-requests", "6"),
        ]);
        assert!(RateReport::from_headers(&missing, UNIX_EPOCH).is_empty());
        assert!(RateReport::from_headers(&HeaderMap::new(), UNIX_EPOCH).is_empty());
        let mut bytes = HeaderMap::new();
        bytes.insert(
            "x-ratelimit-limit-requests",
            HeaderValue::from_bytes(b"6\xff0").unwrap(),
        );
        assert!(RateReport::from_headers(&bytes, UNIX_EPOCH).is_empty());
    }

    #[test]
    fn keys_that_report_nothing_have_full_headroom() {
        let h = Headroom::new(2);
        assert_eq!(h.score(0, "gpt-4o", 0), FULL);
        assert_eq!(h.score(99, "gpt-4o", 0), FULL, "beyond the pool's start");
        assert_eq!(h.sent(0, "gpt-4o", 0), None);
        assert_eq!(h.report(0, "gpt-4o", &RateReport::default(), 0, 0), None);
        assert_eq!(h.score(0, "gpt-4o", 0), FULL);
    }

    #[test]
    fn sent_requests_are_charged_until_the_next_report() {
        let h = Headroom::new(1);
        assert_eq!(h.report(0, "m", &requests(10, 5, 60), 0, 0), None);
        assert_eq!(h.score(0, "m", 0), FULL / 2);
        h.sent(0, "m", SEC);
        h.sent(0, "m", SEC);
        assert_eq!(h.score(0, "m", SEC), FULL * 3 / 10);
        assert_eq!(h.score(0, "other", SEC), FULL, "per model");
        h.report(0, "m", &requests(10, 4, 59), 0, 2 * SEC);
        assert_eq!(
            h.score(0, "m", 2 * SEC),
            FULL * 4 / 10,
            "a report replaces the estimate"
        );
    }

    #[test]
    fn requests_in_flight_count_against_a_report() {
        let h = Headroom::new(1);
        h.report(0, "m", &requests(10, 5, 60), 3, 0);
        assert_eq!(h.score(0, "m", 0), FULL * 2 / 10);
    }

    #[test]
    fn the_limit_is_whole_again_after_its_reset() {
        let h = Headroom::new(1);
        h.report(0, "m", &requests(10, 1, 30), 0, 0);
        assert_eq!(h.score(0, "m", 29 * SEC), FULL / 10);
        assert_eq!(h.score(0, "m", 30 * SEC), FULL);
        assert_eq!(h.sent(0, "m", 31 * SEC), None, "no rest after the reset");
    }

    #[test]
    fn a_key_about_to_run_out_rests_until_its_reset() {
        let h = Headroom::new(1);
        assert_eq!(h.report(0, "m", &requests(10, 2, 30), 0, 0), None);
        assert_eq!(h.sent(0, "m", 10 * SEC), None);
        assert_eq!(
            h.sent(0, "m", 10 * SEC),
            Some(Duration::from_secs(20)),
            "the last request left"
        );
        assert_eq!(
            h.report(0, "m", &requests(10, 0, 5), 0, 12 * SEC),
            Some(Duration::from_secs(5)),
            "a report of nothing left"
        );
    }

    #[test]
    fn tokens_are_charged_at_the_reported_average_and_predict_too() {
        let h = Headroom::new(1);
        let report = RateReport {
            requests: Some(Reported {
                limit: 100,
                remaining: 98,
                reset: Duration::from_secs(60),
            }),
            tokens: Some(Reported {
                limit: 1000,
                remaining: 300,
                reset: Duration::from_secs(40),
            }),
        };
        // 700 tokens over 2 requests: 350 a request, so 300 left cannot take the next one.
        assert_eq!(
            h.report(0, "m", &report, 0, 0),
            Some(Duration::from_secs(40))
        );
        assert_eq!(h.score(0, "m", 0), FULL * 3 / 10, "the least of the two");
    }

    #[test]
    fn models_per_key_are_bounded() {
        let h = Headroom::new(1);
        for i in 0..(MAX_MODEL_HEADROOMS as u64 + 10) {
            h.report(0, &format!("m{i}"), &requests(10, 5, 60), 0, i);
        }
        let k = h.key(0).unwrap();
        assert_eq!(k.entries.lock().len(), MAX_MODEL_HEADROOMS);
        assert_eq!(h.score(0, "m0", 100), FULL, "the oldest report went");
        assert_eq!(h.score(0, "m73", 100), FULL / 2);
    }

    #[test]
    fn keys_added_later_grow_the_tracker() {
        let h = Headroom::new(0);
        h.report(3, "m", &requests(10, 5, 60), 0, 0);
        assert_eq!(h.score(3, "m", 0), FULL / 2);
        assert_eq!(h.score(2, "m", 0), FULL);
    }
}
