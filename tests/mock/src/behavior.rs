//! What a key does: the validated behaviour types and the pure decision "misbehave on this request?".
//!
//! Parsing lives in `spec.rs`; the per-process table of keys lives in `registry.rs`.

use std::fmt;
use std::time::{Duration, Instant};

use http::{HeaderValue, StatusCode};

use crate::limits::{Limits, Window};

/// Parameters of the `rate_limit` mode: which rate-limit hints the 429 carries.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RateLimit {
    /// Seconds for `Retry-After` (a number, or a date that far ahead when `retry_after_date`).
    pub retry_after: Option<u64>,
    /// Milliseconds for `retry-after-ms`.
    pub retry_after_ms: Option<u64>,
    /// Send `Retry-After` as an IMF-fixdate `retry_after` seconds ahead instead of a number.
    pub retry_after_date: bool,
    /// Value for `x-ratelimit-reset-requests` (OpenAI's `6m0s` style); also sends remaining = 0.
    pub reset_requests: Option<HeaderValue>,
    /// The limit is the organization's, not the key's: says so in the body, and remaining = 0.
    pub org_wide: bool,
    /// Anthropic only: `anthropic-ratelimit-requests-reset` this many seconds ahead, with
    /// `anthropic-ratelimit-requests-remaining: 0`.
    pub reset_in: Option<u64>,
}

/// How a key misbehaves (or not).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Serve normally.
    Ok,
    /// 429 `rate_limit_exceeded`.
    RateLimit(RateLimit),
    /// 401 `invalid_api_key`.
    Unauthorized,
    /// 403 `unsupported_country_region_territory`.
    Forbidden,
    /// 429 `insufficient_quota`.
    InsufficientQuota,
    /// A 5xx with OpenAI's `server_error` body.
    ServerError {
        /// The status, 500..=599.
        status: StatusCode,
    },
    /// 400 `invalid_request_error`.
    BadRequest,
    /// 200, then the connection drops: after `after` SSE chunks, or mid-body for non-stream responses.
    BreakStream {
        /// SSE chunks sent before the break.
        after: u32,
    },
}

impl Mode {
    /// The canonical name used in YAML and in the inline grammar.
    pub fn name(&self) -> &'static str {
        match self {
            Mode::Ok => "ok",
            Mode::RateLimit(_) => "rate_limit",
            Mode::Unauthorized => "unauthorized",
            Mode::Forbidden => "forbidden",
            Mode::InsufficientQuota => "insufficient_quota",
            Mode::ServerError { .. } => "server_error",
            Mode::BadRequest => "bad_request",
            Mode::BreakStream { .. } => "break_stream",
        }
    }

    /// The status the response starts with (`break_stream` starts as a normal 200).
    pub fn status(&self) -> StatusCode {
        match self {
            Mode::Ok | Mode::BreakStream { .. } => StatusCode::OK,
            Mode::RateLimit(_) | Mode::InsufficientQuota => StatusCode::TOO_MANY_REQUESTS,
            Mode::Unauthorized => StatusCode::UNAUTHORIZED,
            Mode::Forbidden => StatusCode::FORBIDDEN,
            Mode::ServerError { status } => *status,
            Mode::BadRequest => StatusCode::BAD_REQUEST,
        }
    }
}

/// One key's full behaviour: a mode plus when it applies and how slow the key is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Behavior {
    /// What the key does when it misbehaves.
    pub mode: Mode,
    /// Misbehave only for the first N matching requests (counted since start/reset/change).
    pub first: Option<u64>,
    /// Misbehave only during this long after start/reset/change.
    pub window: Option<Duration>,
    /// Delay before the response header; replaces `--latency` for this key, and applies whether
    /// or not the key currently misbehaves.
    pub latency: Option<Duration>,
    /// Misbehave only for requests naming one of these models (others are served normally and
    /// do not count towards `first`).
    pub models: Option<Vec<String>>,
    /// The error reply carries the whole key in its message, as a careless relay might: for
    /// tests proving a gateway never passes a key on (OpenAI itself echoes a masked part).
    pub echo_key: bool,
    /// Requests and tokens per minute (mode `limit`): past them, a 429.
    pub limits: Option<Limits>,
}

impl Behavior {
    /// A key that always serves normally.
    #[cfg(test)]
    pub fn ok() -> Self {
        Behavior {
            mode: Mode::Ok,
            first: None,
            window: None,
            latency: None,
            models: None,
            echo_key: false,
            limits: None,
        }
    }

    /// Whether the `models` filter lets this request's model be affected.
    pub fn applies_to(&self, model: Option<&str>) -> bool {
        match (&self.models, model) {
            (None, _) => true,
            (Some(list), Some(m)) => list.iter().any(|x| x == m),
            (Some(_), None) => false,
        }
    }

    /// The pure decision: does the `nth` matching request (1-based), arriving `elapsed` after the
    /// key's start/reset, misbehave? With both `first` and `window` set, both must still hold.
    pub fn misbehaves(&self, nth: u64, elapsed: Duration) -> bool {
        if self.mode == Mode::Ok {
            return false;
        }
        let within_first = self.first.is_none_or(|n| nth <= n);
        let within_window = self.window.is_none_or(|w| elapsed < w);
        within_first && within_window
    }
}

/// The run-time state of one listed key: its behaviour and the counters `first`/`window` read.
#[derive(Debug, Clone)]
pub struct KeyState {
    /// The key's behaviour.
    pub behavior: std::sync::Arc<Behavior>,
    /// Requests matching the `models` filter since `since`.
    pub matched: u64,
    /// When the current `first`/`window` period started.
    pub since: Instant,
    /// The use of the current minute, for `limits`.
    pub window: Window,
}

impl KeyState {
    /// Fresh state starting at `now`.
    pub fn new(behavior: std::sync::Arc<Behavior>, now: Instant) -> Self {
        KeyState {
            behavior,
            matched: 0,
            since: now,
            window: Window::default(),
        }
    }

    /// Counts a request for `model` arriving at `now` and says whether it misbehaves.
    pub fn on_request(&mut self, model: Option<&str>, now: Instant) -> bool {
        if self.behavior.mode == Mode::Ok || !self.behavior.applies_to(model) {
            return false;
        }
        self.matched += 1;
        self.behavior
            .misbehaves(self.matched, now.saturating_duration_since(self.since))
    }

    /// Restarts `first` and `window` from `now`.
    pub fn restart(&mut self, now: Instant) {
        self.matched = 0;
        self.window = Window::default();
        self.since = now;
    }
}

/// Renders the behaviour in the inline grammar (`MODE[:param=value]*`), so it round-trips through
/// `spec::parse_inline`.
impl fmt::Display for Behavior {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.limits {
            Some(l) => {
                f.write_str("limit")?;
                if let Some(rpm) = l.rpm {
                    write!(f, ":rpm={rpm}")?;
                }
                if let Some(tpm) = l.tpm {
                    write!(f, ":tpm={tpm}")?;
                }
            }
            None => f.write_str(self.mode.name())?,
        }
        match &self.mode {
            Mode::RateLimit(rl) => {
                if let Some(s) = rl.retry_after {
                    write!(f, ":retry_after={s}")?;
                }
                if let Some(ms) = rl.retry_after_ms {
                    write!(f, ":retry_after_ms={ms}")?;
                }
                if rl.retry_after_date {
                    f.write_str(":retry_after_date=true")?;
                }
                if let Some(r) = &rl.reset_requests {
                    write!(
                        f,
                        ":reset_requests={}",
                        String::from_utf8_lossy(r.as_bytes())
                    )?;
                }
                if rl.org_wide {
                    f.write_str(":org_wide=true")?;
                }
            }
            Mode::ServerError { status } => write!(f, ":status={}", status.as_u16())?,
            Mode::BreakStream { after } => write!(f, ":after={after}")?,
            _ => {}
        }
        if let Some(n) = self.first {
            write!(f, ":first={n}")?;
        }
        if let Some(w) = self.window {
            write!(f, ":window={}", humantime::format_duration(w))?;
        }
        if let Some(l) = self.latency {
            write!(f, ":latency={}", humantime::format_duration(l))?;
        }
        if let Some(models) = &self.models {
            write!(f, ":models={}", models.join(","))?;
        }
        if self.echo_key {
            f.write_str(":echo_key=true")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn with(mode: Mode) -> Behavior {
        Behavior {
            mode,
            ..Behavior::ok()
        }
    }

    #[test]
    fn permanent_without_first_or_window() {
        let b = with(Mode::Unauthorized);
        assert!(b.misbehaves(1, Duration::ZERO));
        assert!(b.misbehaves(1_000_000, Duration::from_secs(86_400)));
    }

    #[test]
    fn ok_never_misbehaves() {
        assert!(!Behavior::ok().misbehaves(1, Duration::ZERO));
    }

    #[test]
    fn first_limits_by_count() {
        let b = Behavior {
            first: Some(3),
            ..with(Mode::RateLimit(RateLimit::default()))
        };
        assert!(b.misbehaves(1, Duration::ZERO));
        assert!(b.misbehaves(3, Duration::ZERO));
        assert!(!b.misbehaves(4, Duration::ZERO));
    }

    #[test]
    fn window_limits_by_time() {
        let b = Behavior {
            window: Some(Duration::from_secs(2)),
            ..with(Mode::BadRequest)
        };
        assert!(b.misbehaves(100, Duration::from_millis(1999)));
        assert!(!b.misbehaves(1, Duration::from_secs(2)));
    }

    #[test]
    fn first_and_window_must_both_hold() {
        let b = Behavior {
            first: Some(2),
            window: Some(Duration::from_secs(1)),
            ..with(Mode::Forbidden)
        };
        assert!(b.misbehaves(2, Duration::from_millis(10)));
        assert!(!b.misbehaves(3, Duration::from_millis(10)));
        assert!(!b.misbehaves(1, Duration::from_secs(1)));
    }

    #[test]
    fn state_counts_and_restarts() {
        let t0 = Instant::now();
        let b = Behavior {
            first: Some(2),
            ..with(Mode::InsufficientQuota)
        };
        let mut s = KeyState::new(Arc::new(b), t0);
        assert!(s.on_request(Some("gpt-4o"), t0));
        assert!(s.on_request(None, t0));
        assert!(!s.on_request(None, t0));
        s.restart(t0 + Duration::from_secs(5));
        assert!(s.on_request(None, t0 + Duration::from_secs(5)));
    }

    #[test]
    fn state_window_measured_from_since() {
        let t0 = Instant::now();
        let b = Behavior {
            window: Some(Duration::from_secs(2)),
            ..with(Mode::Unauthorized)
        };
        let mut s = KeyState::new(Arc::new(b), t0);
        assert!(s.on_request(None, t0 + Duration::from_millis(1500)));
        assert!(!s.on_request(None, t0 + Duration::from_millis(2500)));
        s.restart(t0 + Duration::from_secs(10));
        assert!(s.on_request(None, t0 + Duration::from_millis(11_000)));
    }

    #[test]
    fn models_filter_skips_and_does_not_count_other_models() {
        let t0 = Instant::now();
        let b = Behavior {
            first: Some(1),
            models: Some(vec!["gpt-4o".into()]),
            ..with(Mode::RateLimit(RateLimit::default()))
        };
        let mut s = KeyState::new(Arc::new(b), t0);
        assert!(!s.on_request(Some("gpt-4o-mini"), t0));
        assert!(!s.on_request(None, t0));
        assert!(s.on_request(Some("gpt-4o"), t0));
        assert!(!s.on_request(Some("gpt-4o"), t0));
        assert_eq!(s.matched, 2);
    }

    #[test]
    fn statuses() {
        assert_eq!(with(Mode::BreakStream { after: 1 }).mode.status(), 200);
        assert_eq!(with(Mode::InsufficientQuota).mode.status(), 429);
        let s = StatusCode::SERVICE_UNAVAILABLE;
        assert_eq!(with(Mode::ServerError { status: s }).mode.status(), 503);
    }
}
