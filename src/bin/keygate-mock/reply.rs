//! Assembling responses: the headers every response carries, and the error replies of each mode.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER, SET_COOKIE};
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};

use crate::behavior::{Mode, RateLimit};
use crate::body::MockBody;
use crate::openai;
use crate::request::KeyStyle;

const JSON: HeaderValue = HeaderValue::from_static("application/json");
const EVENT_STREAM: HeaderValue = HeaderValue::from_static("text/event-stream");
const ZERO: HeaderValue = HeaderValue::from_static("0");

/// Numbers requests and renders their ids: a random per-process prefix, so two mocks (or two
/// runs) never hand out the same `x-request-id`, plus a counter.
pub struct Ids {
    prefix: u32,
    counter: AtomicU64,
}

impl Ids {
    /// A fresh sequence with a random prefix.
    pub fn new() -> Self {
        Ids {
            prefix: rand::random(),
            counter: AtomicU64::new(0),
        }
    }

    /// The next request number (1-based).
    pub fn next(&self) -> u64 {
        self.counter.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// `x-request-id` for request `n`, shaped like OpenAI's `req_` + 32 hex digits.
    pub fn request_id(&self, n: u64) -> HeaderValue {
        let id = format!("req_{:08x}{:024x}", self.prefix, n);
        HeaderValue::from_maybe_shared(Bytes::from(id)).expect("hex digits are a valid header")
    }

    /// A completion id for request `n` (`chatcmpl-…` / `cmpl-…`).
    pub fn completion_id(&self, prefix: &str, n: u64) -> String {
        format!("{prefix}-mock{:08x}{n:08x}", self.prefix)
    }
}

/// Per-process header values added to every response.
pub struct Common {
    /// `x-mock-name`, when `--name` was given.
    pub name: Option<HeaderValue>,
}

/// A JSON response with `status`.
pub fn json(status: StatusCode, body: impl Into<Bytes>) -> Response<MockBody> {
    let mut res = Response::new(MockBody::full(body));
    *res.status_mut() = status;
    res.headers_mut().insert(CONTENT_TYPE, JSON);
    res
}

/// An SSE response.
pub fn event_stream(body: MockBody) -> Response<MockBody> {
    let mut res = Response::new(body);
    let h = res.headers_mut();
    h.insert(CONTENT_TYPE, EVENT_STREAM);
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    res
}

/// Adds the headers every response carries (ids, OpenAI's org/project headers, a cookie a gateway
/// must strip, which header carried the key, the mock's name).
pub fn finish(
    res: &mut Response<MockBody>,
    common: &Common,
    request_id: HeaderValue,
    style: Option<KeyStyle>,
) {
    let h = res.headers_mut();
    h.insert("x-request-id", request_id);
    h.insert("openai-organization", HeaderValue::from_static("org-mock"));
    h.insert("openai-project", HeaderValue::from_static("proj_mock"));
    h.insert(SET_COOKIE, HeaderValue::from_static("__cf_bm=mock; path=/"));
    h.insert(
        "x-mock-key-header",
        style.map_or(HeaderValue::from_static("none"), KeyStyle::header_value),
    );
    if let Some(name) = &common.name {
        h.insert("x-mock-name", name.clone());
    }
}

/// The error reply of a misbehaving mode (`ok` and `break_stream` never get here; they are
/// answered by the endpoint itself).
pub fn mode_error(
    mode: &Mode,
    key: &str,
    model: Option<&str>,
    now: SystemTime,
) -> Response<MockBody> {
    let status = mode.status();
    match mode {
        Mode::RateLimit(rl) => {
            let mut res = json(
                status,
                openai::rate_limited(model, rl.org_wide, &retry_hint(rl)),
            );
            rate_limit_headers(rl, res.headers_mut(), now);
            res
        }
        Mode::Unauthorized => json(status, openai::invalid_key(key)),
        Mode::Forbidden => json(status, openai::forbidden()),
        Mode::InsufficientQuota => json(status, openai::insufficient_quota()),
        Mode::ServerError { status } => json(*status, openai::server_error(status.as_u16())),
        Mode::BadRequest | Mode::Ok | Mode::BreakStream { .. } => {
            json(StatusCode::BAD_REQUEST, openai::bad_request())
        }
    }
}

/// "Please try again in …" for the 429 message.
fn retry_hint(rl: &RateLimit) -> String {
    match (rl.retry_after_ms, rl.retry_after) {
        (Some(ms), _) => format!("{ms}ms"),
        (None, Some(s)) => format!("{s}s"),
        (None, None) => "20ms".to_string(),
    }
}

/// The rate-limit hints a 429 carries, as configured.
pub fn rate_limit_headers(rl: &RateLimit, h: &mut HeaderMap, now: SystemTime) {
    if let Some(secs) = rl.retry_after {
        let value = if rl.retry_after_date {
            httpdate::fmt_http_date(now + Duration::from_secs(secs))
        } else {
            secs.to_string()
        };
        h.insert(RETRY_AFTER, header(value));
    }
    if let Some(ms) = rl.retry_after_ms {
        h.insert(
            HeaderName::from_static("retry-after-ms"),
            header(ms.to_string()),
        );
    }
    if let Some(reset) = &rl.reset_requests {
        h.insert("x-ratelimit-reset-requests", reset.clone());
        h.insert("x-ratelimit-remaining-requests", ZERO);
    }
    if rl.org_wide {
        h.insert("x-ratelimit-remaining-requests", ZERO);
    }
}

/// A header value from text the mock generated itself (digits, dates).
fn header(value: String) -> HeaderValue {
    HeaderValue::from_maybe_shared(Bytes::from(value))
        .expect("generated header text is visible ASCII")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::parse_inline;
    use std::time::UNIX_EPOCH;

    fn error_for(spec: &str) -> Response<MockBody> {
        let b = parse_inline(spec).expect("spec");
        mode_error(
            &b.mode,
            "sk-test-123456789",
            Some("gpt-4o"),
            UNIX_EPOCH + Duration::from_secs(1_445_412_478),
        )
    }

    #[test]
    fn rate_limit_headers_as_configured() {
        let r = error_for("429:retry_after=2");
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["retry-after"], "2");
        assert!(r.headers().get("retry-after-ms").is_none());
        assert!(r.headers().get("x-ratelimit-remaining-requests").is_none());

        let r = error_for("429:retry_after=2:retry_after_date=true");
        assert_eq!(r.headers()["retry-after"], "Wed, 21 Oct 2015 07:28:00 GMT");

        let r = error_for("429:retry_after_ms=500:reset_requests=6m0s");
        assert_eq!(r.headers()["retry-after-ms"], "500");
        assert_eq!(r.headers()["x-ratelimit-reset-requests"], "6m0s");
        assert_eq!(r.headers()["x-ratelimit-remaining-requests"], "0");
        assert!(r.headers().get("retry-after").is_none());

        let r = error_for("429:org_wide=true");
        assert_eq!(r.headers()["x-ratelimit-remaining-requests"], "0");
    }

    #[test]
    fn statuses_per_mode() {
        assert_eq!(error_for("401").status(), 401);
        assert_eq!(error_for("403").status(), 403);
        assert_eq!(error_for("insufficient_quota").status(), 429);
        assert_eq!(error_for("503").status(), 503);
        assert_eq!(error_for("bad_request").status(), 400);
        assert_eq!(
            error_for("503").headers()["content-type"],
            "application/json"
        );
    }

    #[test]
    fn ids_are_unique_and_well_formed() {
        let ids = Ids::new();
        let (a, b) = (ids.next(), ids.next());
        assert_ne!(a, b);
        let id = ids.request_id(a);
        assert_eq!(id.len(), 36);
        assert!(id.to_str().is_ok_and(|s| s.starts_with("req_")));
    }
}
