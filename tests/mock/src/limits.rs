//! Per-key request and token limits per minute (`limit:rpm=60:tpm=100000`), as OpenAI and
//! Anthropic enforce them: a fixed one-minute window that starts with the first request after the
//! last one ended, the remaining budget and the time to the window's end on every answer, and a
//! 429 past the limit. The minute can be scaled (`--time-scale 60`: a mock minute lasts one real
//! second; the reset headers then tell real time), so benches run in seconds.

use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::RETRY_AFTER;
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};

use crate::body::MockBody;
use crate::{anthropic, openai, reply};

/// A key's limits per (scaled) minute; `None`: unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limits {
    /// Requests per minute.
    pub rpm: Option<u64>,
    /// Tokens per minute.
    pub tpm: Option<u64>,
}

/// One key's use of its current window.
#[derive(Debug, Clone, Copy, Default)]
pub struct Window {
    start: Option<Instant>,
    requests: u64,
    tokens: u64,
}

/// What one request found: whether it is admitted, and what its answer's headers say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// Within both limits (and counted), or refused (and not counted).
    pub admitted: bool,
    /// The limits.
    pub limits: Limits,
    /// Requests left in the window after this one.
    pub remaining_requests: u64,
    /// Tokens left in the window after this one.
    pub remaining_tokens: u64,
    /// Real time until the window ends and the budget is whole again.
    pub reset: Duration,
}

impl Window {
    /// Starts a new window at `now` if the current one has ended.
    fn roll(&mut self, now: Instant, minute: Duration) {
        let ended = self
            .start
            .is_none_or(|s| now.saturating_duration_since(s) >= minute);
        if ended {
            *self = Window {
                start: Some(now),
                requests: 0,
                tokens: 0,
            };
        }
    }

    fn reset_in(&self, now: Instant, minute: Duration) -> Duration {
        self.start
            .map_or(minute, |s| (s + minute).saturating_duration_since(now))
    }

    /// Counts one request costing `tokens`, if both limits allow it.
    pub fn admit(
        &mut self,
        limits: Limits,
        tokens: u64,
        now: Instant,
        minute: Duration,
    ) -> Verdict {
        self.roll(now, minute);
        let fits_requests = limits.rpm.is_none_or(|l| self.requests < l);
        let fits_tokens = limits
            .tpm
            .is_none_or(|l| self.tokens.saturating_add(tokens) <= l);
        let admitted = fits_requests && fits_tokens;
        if admitted {
            self.requests += 1;
            self.tokens = self.tokens.saturating_add(tokens);
        }
        Verdict {
            admitted,
            limits,
            remaining_requests: limits.rpm.map_or(0, |l| l.saturating_sub(self.requests)),
            remaining_tokens: limits.tpm.map_or(0, |l| l.saturating_sub(self.tokens)),
            reset: self.reset_in(now, minute),
        }
    }

    /// Spends `requests` and `tokens` of the window as traffic from elsewhere would.
    pub fn consume(&mut self, requests: u64, tokens: u64, now: Instant, minute: Duration) {
        self.roll(now, minute);
        self.requests = self.requests.saturating_add(requests);
        self.tokens = self.tokens.saturating_add(tokens);
    }
}

/// What a request costs against `tpm`: its prompt (a token per 4 bytes of body, as usage
/// counts it) and the completion the mock will generate.
pub fn request_tokens(body_len: usize, completion_tokens: u64) -> u64 {
    (body_len as u64)
        .div_ceil(4)
        .saturating_add(completion_tokens)
}

/// OpenAI's duration format (Go's `time.Duration`): `120ms`, `1.5s`, `6m0s`.
pub fn go_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{}.{:03}s", ms / 1000, ms % 1000)
    } else {
        format!("{}m{}.{:03}s", ms / 60_000, (ms / 1000) % 60, ms % 1000)
    }
}

fn value(text: String) -> HeaderValue {
    HeaderValue::from_str(&text).unwrap_or(HeaderValue::from_static("0"))
}

/// OpenAI's `x-ratelimit-*` headers for the configured limits.
pub fn openai_headers(v: &Verdict, h: &mut HeaderMap) {
    let reset = value(go_duration(v.reset));
    insert(v, h, &reset, |part, kind| {
        format!("x-ratelimit-{part}-{kind}")
    });
}

/// Anthropic's `anthropic-ratelimit-*` headers (resets as RFC 3339 times) for the limits.
pub fn anthropic_headers(v: &Verdict, h: &mut HeaderMap, now: SystemTime) {
    let reset = value(humantime::format_rfc3339_millis(now + v.reset).to_string());
    insert(v, h, &reset, |part, kind| {
        format!("anthropic-ratelimit-{kind}-{part}")
    });
}

/// The limit, remaining and reset headers of each configured limit, named by `name(part, kind)`.
fn insert(
    v: &Verdict,
    h: &mut HeaderMap,
    reset: &HeaderValue,
    name: impl Fn(&str, &str) -> String,
) {
    for (kind, limit, remaining) in [
        ("requests", v.limits.rpm, v.remaining_requests),
        ("tokens", v.limits.tpm, v.remaining_tokens),
    ] {
        let Some(limit) = limit else { continue };
        let header = |part: &str| HeaderName::try_from(name(part, kind));
        if let (Ok(l), Ok(r), Ok(t)) = (header("limit"), header("remaining"), header("reset")) {
            h.insert(l, value(limit.to_string()));
            h.insert(r, value(remaining.to_string()));
            h.insert(t, reset.clone());
        }
    }
}

/// `Retry-After` (whole seconds, rounded up) and `retry-after-ms` until the window ends.
fn retry_headers(v: &Verdict, h: &mut HeaderMap) {
    let ms = v.reset.as_millis().max(1);
    h.insert(RETRY_AFTER, value(ms.div_ceil(1000).to_string()));
    h.insert(
        HeaderName::from_static("retry-after-ms"),
        value(ms.to_string()),
    );
}

/// The 429 of a request past the limit, OpenAI's way.
pub fn openai_refusal(v: &Verdict, model: Option<&str>) -> Response<MockBody> {
    let hint = go_duration(v.reset);
    let mut res = reply::json(
        StatusCode::TOO_MANY_REQUESTS,
        openai::rate_limited(model, false, &hint),
    );
    openai_headers(v, res.headers_mut());
    retry_headers(v, res.headers_mut());
    res
}

/// The 429 of a request past the limit, Anthropic's way.
pub fn anthropic_refusal(v: &Verdict, now: SystemTime) -> Response<MockBody> {
    let body: Bytes = anthropic::error(
        "rate_limit_error",
        "This request would exceed your organization's rate limit.",
    );
    let mut res = reply::json(StatusCode::TOO_MANY_REQUESTS, body);
    anthropic_headers(v, res.headers_mut(), now);
    retry_headers(v, res.headers_mut());
    res
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    fn limits(rpm: u64, tpm: Option<u64>) -> Limits {
        Limits {
            rpm: Some(rpm),
            tpm,
        }
    }

    #[test]
    fn requests_past_the_limit_are_refused_until_the_window_ends() {
        let t0 = Instant::now();
        let mut w = Window::default();
        for left in (0..3).rev() {
            let v = w.admit(limits(3, None), 10, t0, MINUTE);
            assert!(v.admitted);
            assert_eq!(v.remaining_requests, left);
        }
        let v = w.admit(limits(3, None), 10, t0 + Duration::from_secs(20), MINUTE);
        assert!(!v.admitted);
        assert_eq!(v.remaining_requests, 0);
        assert_eq!(v.reset, Duration::from_secs(40));
        let v = w.admit(limits(3, None), 10, t0 + MINUTE, MINUTE);
        assert!(v.admitted, "a new window starts whole");
        assert_eq!(v.remaining_requests, 2);
        assert_eq!(v.reset, MINUTE);
    }

    #[test]
    fn tokens_limit_refuses_a_request_that_does_not_fit() {
        let t0 = Instant::now();
        let mut w = Window::default();
        assert!(w.admit(limits(100, Some(100)), 60, t0, MINUTE).admitted);
        let v = w.admit(limits(100, Some(100)), 60, t0, MINUTE);
        assert!(!v.admitted);
        assert_eq!(v.remaining_tokens, 40, "a refused request spends nothing");
        assert!(w.admit(limits(100, Some(100)), 40, t0, MINUTE).admitted);
    }

    #[test]
    fn a_scaled_minute_resets_in_real_time() {
        let t0 = Instant::now();
        let second = Duration::from_secs(1);
        let mut w = Window::default();
        assert!(w.admit(limits(1, None), 1, t0, second).admitted);
        let v = w.admit(limits(1, None), 1, t0 + Duration::from_millis(250), second);
        assert!(!v.admitted);
        assert_eq!(v.reset, Duration::from_millis(750));
        assert!(w.admit(limits(1, None), 1, t0 + second, second).admitted);
    }

    #[test]
    fn consumption_from_elsewhere_spends_the_window() {
        let t0 = Instant::now();
        let mut w = Window::default();
        w.consume(2, 0, t0, MINUTE);
        let v = w.admit(limits(3, None), 1, t0, MINUTE);
        assert!(v.admitted);
        assert_eq!(v.remaining_requests, 0);
        assert!(!w.admit(limits(3, None), 1, t0, MINUTE).admitted);
    }

    #[test]
    fn headers_carry_limit_remaining_and_reset() {
        let v = Verdict {
            admitted: true,
            limits: limits(60, Some(1000)),
            remaining_requests: 59,
            remaining_tokens: 900,
            reset: Duration::from_millis(1500),
        };
        let mut h = HeaderMap::new();
        openai_headers(&v, &mut h);
        assert_eq!(h["x-ratelimit-limit-requests"], "60");
        assert_eq!(h["x-ratelimit-remaining-requests"], "59");
        assert_eq!(h["x-ratelimit-reset-requests"], "1.500s");
        assert_eq!(h["x-ratelimit-remaining-tokens"], "900");
        let mut h = HeaderMap::new();
        anthropic_headers(&v, &mut h, SystemTime::UNIX_EPOCH);
        assert_eq!(h["anthropic-ratelimit-requests-remaining"], "59");
        assert_eq!(
            h["anthropic-ratelimit-tokens-reset"],
            "1970-01-01T00:00:01.500Z"
        );
        let rpm_only = Verdict {
            limits: limits(60, None),
            ..v
        };
        let mut h = HeaderMap::new();
        openai_headers(&rpm_only, &mut h);
        assert!(h.get("x-ratelimit-limit-tokens").is_none());
    }

    #[test]
    fn refusal_is_a_429_with_retry_after() {
        let v = Verdict {
            admitted: false,
            limits: limits(60, None),
            remaining_requests: 0,
            remaining_tokens: 0,
            reset: Duration::from_millis(1200),
        };
        let r = openai_refusal(&v, Some("gpt-4o"));
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["retry-after"], "2");
        assert_eq!(r.headers()["retry-after-ms"], "1200");
        assert_eq!(r.headers()["x-ratelimit-remaining-requests"], "0");
        let r = anthropic_refusal(&v, SystemTime::UNIX_EPOCH);
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["anthropic-ratelimit-requests-remaining"], "0");
    }

    #[test]
    fn go_durations() {
        assert_eq!(go_duration(Duration::from_millis(120)), "120ms");
        assert_eq!(go_duration(Duration::from_millis(6500)), "6.500s");
        assert_eq!(go_duration(Duration::from_secs(360)), "6m0.000s");
    }
}
