//! Per-client (or per-IP) limits: requests per minute, tokens per minute, concurrent requests and
//! a token budget per UTC day or month. Plain Rust with an injected clock; no sockets.
//!
//! Minute limits use sliding windows (a log of admissions over the last 60 s), so "60 per minute"
//! never lets 120 through in a minute, unlike a token bucket that starts full and refills.

use crate::clock::SharedClock;
use jiff::civil::Time;
use jiff::tz::Offset;
use jiff::Timestamp;
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const MINUTE: Duration = Duration::from_secs(60);

/// The calendar period of a budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Period {
    /// A UTC calendar day.
    Day,
    /// A UTC calendar month.
    Month,
}

/// A token budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Tokens allowed per period.
    pub tokens: u64,
    /// The period.
    pub per: Period,
}

/// What one client (or IP) may do.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Requests per minute.
    pub rpm: Option<u32>,
    /// Tokens per minute (estimated at admission, corrected from `usage`).
    pub tpm: Option<u64>,
    /// Requests in flight at once.
    pub concurrency: Option<u32>,
    /// Token budget per UTC day or month.
    pub budget: Option<Budget>,
}

impl Limits {
    /// One instance's share of these limits among `instances` (each at least 1): what it admits
    /// alone while the store that shares the limits is unreachable.
    pub fn share(&self, instances: u32) -> Limits {
        let n = instances.max(1);
        Limits {
            rpm: self.rpm.map(|v| v.div_ceil(n).max(1)),
            tpm: self.tpm.map(|v| v.div_ceil(u64::from(n)).max(1)),
            concurrency: self.concurrency.map(|v| v.div_ceil(n).max(1)),
            budget: self.budget.map(|b| Budget {
                tokens: b.tokens.div_ceil(u64::from(n)).max(1),
                per: b.per,
            }),
        }
    }

    /// Whether any limit is set.
    pub fn is_empty(&self) -> bool {
        self.rpm.is_none()
            && self.tpm.is_none()
            && self.concurrency.is_none()
            && self.budget.is_none()
    }
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    /// Requests per minute.
    Requests,
    /// Tokens per minute.
    Tokens,
    /// Concurrent requests.
    Concurrency,
    /// The day's or month's budget.
    Budget,
}

impl LimitKind {
    /// Label for metrics and the error `code`.
    pub fn as_str(self) -> &'static str {
        match self {
            LimitKind::Requests => "rate_limit_requests",
            LimitKind::Tokens => "rate_limit_tokens",
            LimitKind::Concurrency => "concurrency_limit",
            LimitKind::Budget => "budget_exhausted",
        }
    }
}

/// A refused request: which limit, when to retry, and OpenAI-style header values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The limit that refused.
    pub kind: LimitKind,
    /// How long until a retry can pass.
    pub retry_after: Duration,
    /// `x-ratelimit-*` headers to send.
    pub headers: Vec<(&'static str, String)>,
}

#[derive(Debug, Default)]
struct State {
    requests: VecDeque<Instant>,
    tokens: VecDeque<(Instant, i64)>,
    token_sum: i64,
    in_flight: u32,
    budget_period: u64,
    budget_used: u64,
}

/// The limits of one client with their running counts.
#[derive(Debug)]
pub struct Limiter {
    limits: Limits,
    clock: SharedClock,
    state: Mutex<State>,
}

/// An admitted request: holds a concurrency slot until dropped, and its token estimate until
/// [`Admission::settle`] corrects it.
#[derive(Debug)]
pub struct Admission {
    limiter: Arc<Limiter>,
    estimate: u64,
    settled: bool,
    /// When it took its place in the minute window (to give the place back).
    admitted_at: Instant,
}

impl Admission {
    /// Adds `tokens` to the estimate once more is known (the request was admitted on its
    /// announced size, before its body said how long an answer it asks for). Counted in the
    /// minute window like the first estimate; never refuses: the request is already in.
    pub fn add_tokens(&mut self, tokens: u64) {
        if tokens == 0 {
            return;
        }
        self.estimate = self.estimate.saturating_add(tokens);
        if self.limiter.limits.tpm.is_some() {
            let now = self.limiter.clock.now();
            let more = i64::try_from(tokens).unwrap_or(i64::MAX);
            let mut st = self.limiter.state.lock();
            st.tokens.push_back((now, more));
            st.token_sum = st.token_sum.saturating_add(more);
        }
    }

    /// The tokens this admission is charged for so far.
    pub fn estimate(&self) -> u64 {
        self.estimate
    }

    /// Replaces the token estimate with what the upstream reported (or keeps the estimate when
    /// it reported nothing) and charges the budget.
    pub fn settle(mut self, actual: Option<u64>) {
        self.settled = true;
        self.limiter.settle(self.estimate, actual);
    }

    /// Gives back what admission took from the minute windows (its request and its token
    /// estimate) and charges the budget nothing: the request was answered without spending
    /// anything upstream (a cache hit). The concurrency slot is freed on drop, as always.
    pub fn refund(mut self) {
        self.settled = true;
        if self.limiter.limits.rpm.is_some() {
            let mut st = self.limiter.state.lock();
            if let Some(i) = st.requests.iter().rposition(|t| *t == self.admitted_at) {
                st.requests.remove(i);
            }
        }
        self.limiter.settle(self.estimate, Some(0));
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut st = self.limiter.state.lock();
        st.in_flight = st.in_flight.saturating_sub(1);
        drop(st);
        if !self.settled {
            // The request ended without an answer: its estimate stays in the minute window.
            self.limiter.charge_budget(0);
        }
    }
}

/// The budget period holding `wall` (an opaque number) and the time left in it.
pub fn period_id(per: Period, wall: SystemTime) -> (u64, Duration) {
    let secs = wall.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let day = secs / 86_400;
    match per {
        Period::Day => (day, Duration::from_secs((day + 1) * 86_400 - secs)),
        // Past jiff's range (the year 9999), which no wall clock reaches, budgets go daily.
        Period::Month => month_period(secs)
            .unwrap_or_else(|| (day, Duration::from_secs((day + 1) * 86_400 - secs))),
    }
}

/// The UTC month holding `secs` (since the epoch) as `year * 12 + month`, and the time from then
/// to the start of the next month; `None` outside jiff's range.
fn month_period(secs: u64) -> Option<(u64, Duration)> {
    let now = Timestamp::from_second(i64::try_from(secs).ok()?).ok()?;
    let date = Offset::UTC.to_datetime(now).date();
    let next_month = date.last_of_month().tomorrow().ok()?;
    let next = Offset::UTC
        .to_timestamp(next_month.to_datetime(Time::midnight()))
        .ok()?;
    let id = u64::try_from(date.year()).ok()? * 12 + u64::try_from(date.month()).ok()?;
    let left = u64::try_from(next.as_second()).ok()?.saturating_sub(secs);
    Some((id, Duration::from_secs(left)))
}

/// OpenAI writes resets like `1.5s` or `6m0s`.
pub fn reset_text(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 60_000 {
        format!("{}.{:03}s", ms / 1000, ms % 1000)
    } else {
        format!("{}m{}s", ms / 60_000, (ms % 60_000) / 1000)
    }
}

impl Limiter {
    /// A limiter with these limits.
    pub fn new(limits: Limits, clock: SharedClock) -> Arc<Self> {
        Arc::new(Self {
            limits,
            clock,
            state: Mutex::new(State::default()),
        })
    }

    /// The limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Admits a request estimated at `estimate` tokens, or says which limit refuses it.
    pub fn admit(self: &Arc<Self>, estimate: u64) -> Result<Admission, Rejection> {
        let now = self.clock.now();
        let wall = self.clock.wall();
        let l = self.limits;
        let mut st = self.state.lock();
        prune(&mut st, now);
        if let Some(b) = l.budget {
            let (id, until_next) = period_id(b.per, wall);
            if st.budget_period != id {
                st.budget_period = id;
                st.budget_used = 0;
            }
            if st.budget_used >= b.tokens {
                return Err(self.reject(&st, LimitKind::Budget, until_next, now));
            }
        }
        if let Some(c) = l.concurrency {
            if st.in_flight >= c {
                return Err(self.reject(&st, LimitKind::Concurrency, Duration::from_secs(1), now));
            }
        }
        if let Some(rpm) = l.rpm {
            if st.requests.len() >= rpm as usize {
                let wait = st
                    .requests
                    .front()
                    .map_or(MINUTE, |t| (*t + MINUTE).saturating_duration_since(now));
                return Err(self.reject(&st, LimitKind::Requests, wait, now));
            }
        }
        let estimate_i = i64::try_from(estimate).unwrap_or(i64::MAX);
        if let Some(tpm) = l.tpm {
            let tpm_i = i64::try_from(tpm).unwrap_or(i64::MAX);
            // A request larger than the whole limit still passes into an empty window, or it never could.
            if st.token_sum > 0 && st.token_sum.saturating_add(estimate_i) > tpm_i {
                let wait = self.token_wait(&st, estimate_i, tpm_i, now);
                return Err(self.reject(&st, LimitKind::Tokens, wait, now));
            }
        }
        if l.rpm.is_some() {
            st.requests.push_back(now);
        }
        if l.tpm.is_some() {
            st.tokens.push_back((now, estimate_i));
            st.token_sum = st.token_sum.saturating_add(estimate_i);
        }
        st.in_flight += 1;
        Ok(Admission {
            limiter: self.clone(),
            estimate,
            settled: false,
            admitted_at: now,
        })
    }

    /// Time until enough of the window expires for `need` more tokens.
    fn token_wait(&self, st: &State, need: i64, tpm: i64, now: Instant) -> Duration {
        let mut sum = st.token_sum;
        for (t, n) in &st.tokens {
            sum -= n;
            if sum + need <= tpm {
                return (*t + MINUTE).saturating_duration_since(now);
            }
        }
        MINUTE
    }

    fn reject(
        &self,
        st: &State,
        kind: LimitKind,
        retry_after: Duration,
        now: Instant,
    ) -> Rejection {
        let mut headers = Vec::new();
        if let Some(rpm) = self.limits.rpm {
            let reset = st.requests.front().map_or(Duration::ZERO, |t| {
                (*t + MINUTE).saturating_duration_since(now)
            });
            headers.push(("x-ratelimit-limit-requests", rpm.to_string()));
            headers.push((
                "x-ratelimit-remaining-requests",
                (rpm as usize).saturating_sub(st.requests.len()).to_string(),
            ));
            headers.push(("x-ratelimit-reset-requests", reset_text(reset)));
        }
        if let Some(tpm) = self.limits.tpm {
            let used = u64::try_from(st.token_sum.max(0)).unwrap_or(0);
            let reset = st.tokens.front().map_or(Duration::ZERO, |(t, _)| {
                (*t + MINUTE).saturating_duration_since(now)
            });
            headers.push(("x-ratelimit-limit-tokens", tpm.to_string()));
            headers.push((
                "x-ratelimit-remaining-tokens",
                tpm.saturating_sub(used).to_string(),
            ));
            headers.push(("x-ratelimit-reset-tokens", reset_text(reset)));
        }
        Rejection {
            kind,
            retry_after: retry_after.max(Duration::from_millis(1)),
            headers,
        }
    }

    fn settle(&self, estimate: u64, actual: Option<u64>) {
        let used = actual.unwrap_or(estimate);
        if let Some(actual) = actual {
            if self.limits.tpm.is_some() {
                let now = self.clock.now();
                let delta = i64::try_from(actual)
                    .unwrap_or(i64::MAX)
                    .saturating_sub(i64::try_from(estimate).unwrap_or(i64::MAX));
                let mut st = self.state.lock();
                // The correction is dated now: the tokens were spent when the answer came.
                st.tokens.push_back((now, delta));
                st.token_sum = st.token_sum.saturating_add(delta);
            }
        }
        self.charge_budget(used);
    }

    fn charge_budget(&self, tokens: u64) {
        let Some(b) = self.limits.budget else { return };
        let (id, _) = period_id(b.per, self.clock.wall());
        let mut st = self.state.lock();
        if st.budget_period != id {
            st.budget_period = id;
            st.budget_used = 0;
        }
        st.budget_used = st.budget_used.saturating_add(tokens);
    }

    /// Tokens charged to the current budget period: (period id, used).
    pub fn budget_used(&self) -> (u64, u64) {
        let st = self.state.lock();
        (st.budget_period, st.budget_used)
    }

    /// Restores budget usage (from the state file) if it is for the current period.
    pub fn restore_budget(&self, period: u64, used: u64) {
        let Some(b) = self.limits.budget else { return };
        let (id, _) = period_id(b.per, self.clock.wall());
        if id == period {
            let mut st = self.state.lock();
            st.budget_period = id;
            st.budget_used = st.budget_used.max(used);
        }
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> u32 {
        self.state.lock().in_flight
    }
}

fn prune(st: &mut State, now: Instant) {
    while st
        .requests
        .front()
        .is_some_and(|t| now.saturating_duration_since(*t) >= MINUTE)
    {
        st.requests.pop_front();
    }
    while let Some((t, n)) = st.tokens.front().copied() {
        if now.saturating_duration_since(t) < MINUTE {
            break;
        }
        st.tokens.pop_front();
        st.token_sum -= n;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    fn limiter(limits: Limits) -> (Arc<Limiter>, Arc<ManualClock>) {
        let clock = ManualClock::new();
        (Limiter::new(limits, clock.clone()), clock)
    }

    #[test]
    fn an_instance_share_divides_every_limit_and_never_reaches_zero() {
        let l = Limits {
            rpm: Some(600),
            tpm: Some(10_000),
            concurrency: Some(2),
            budget: Some(Budget {
                tokens: 1_000,
                per: Period::Day,
            }),
        };
        let s = l.share(3);
        assert_eq!(s.rpm, Some(200));
        assert_eq!(s.tpm, Some(3_334));
        assert_eq!(s.concurrency, Some(1));
        assert_eq!(
            s.budget.map(|b| (b.tokens, b.per)),
            Some((334, Period::Day))
        );
        assert_eq!(l.share(1), l);
        assert_eq!(l.share(0), l, "0 instances is taken as 1");
        assert_eq!(Limits::default().share(4), Limits::default());
    }

    #[test]
    fn rpm_admits_exactly_the_limit_per_sliding_minute() {
        let (l, clock) = limiter(Limits {
            rpm: Some(60),
            ..Limits::default()
        });
        let mut passed = 0;
        for _ in 0..120 {
            if let Ok(a) = l.admit(1) {
                a.settle(Some(1));
                passed += 1;
            }
            clock.advance(Duration::from_millis(400)); // 120 requests over 48 s
        }
        assert_eq!(passed, 60);
        clock.advance(Duration::from_secs(13));
        assert!(l.admit(1).is_ok(), "the first admissions left the window");
    }

    #[test]
    fn rpm_rejection_says_when_to_retry_with_openai_headers() {
        let (l, clock) = limiter(Limits {
            rpm: Some(2),
            ..Limits::default()
        });
        l.admit(0).unwrap().settle(None);
        clock.advance(Duration::from_secs(10));
        l.admit(0).unwrap().settle(None);
        let r = l.admit(0).unwrap_err();
        assert_eq!(r.kind, LimitKind::Requests);
        assert_eq!(r.retry_after, Duration::from_secs(50));
        assert!(r
            .headers
            .contains(&("x-ratelimit-remaining-requests", "0".to_string())));
        assert!(r
            .headers
            .contains(&("x-ratelimit-limit-requests", "2".to_string())));
    }

    #[test]
    fn a_refunded_admission_gives_back_its_request_tokens_and_budget() {
        let (l, _clock) = limiter(Limits {
            rpm: Some(1),
            tpm: Some(100),
            budget: Some(Budget {
                tokens: 50,
                per: Period::Day,
            }),
            ..Limits::default()
        });
        for _ in 0..5 {
            let mut a = l.admit(60).unwrap();
            a.add_tokens(30);
            assert_eq!(l.in_flight(), 1);
            a.refund();
            assert_eq!(l.in_flight(), 0);
        }
        assert_eq!(l.budget_used().1, 0);
        // The one request a minute is still free, and its estimate fits the empty window.
        l.admit(90).unwrap().settle(Some(40));
        assert_eq!(l.admit(1).unwrap_err().kind, LimitKind::Requests);
        assert_eq!(l.budget_used().1, 40);
    }

    #[test]
    fn tpm_is_corrected_by_reported_usage() {
        let (l, _clock) = limiter(Limits {
            tpm: Some(1000),
            ..Limits::default()
        });
        // Estimated small, but each answer reports 400 tokens.
        for _ in 0..3 {
            l.admit(10).unwrap().settle(Some(400));
        }
        let r = l.admit(10).unwrap_err();
        assert_eq!(r.kind, LimitKind::Tokens);
    }

    #[test]
    fn tokens_added_after_admission_count_against_the_next_request() {
        let (l, _clock) = limiter(Limits {
            tpm: Some(1000),
            ..Limits::default()
        });
        let mut a = l.admit(100).unwrap();
        a.add_tokens(u64::MAX);
        a.add_tokens(0);
        assert_eq!(l.admit(10).unwrap_err().kind, LimitKind::Tokens);
        a.settle(None);
    }

    #[test]
    fn a_request_bigger_than_tpm_passes_an_empty_window() {
        let (l, _clock) = limiter(Limits {
            tpm: Some(100),
            ..Limits::default()
        });
        assert!(l.admit(500).is_ok());
    }

    #[test]
    fn concurrency_slots_are_returned_on_drop() {
        let (l, _clock) = limiter(Limits {
            concurrency: Some(2),
            ..Limits::default()
        });
        let a = l.admit(0).unwrap();
        let _b = l.admit(0).unwrap();
        assert_eq!(l.admit(0).unwrap_err().kind, LimitKind::Concurrency);
        drop(a);
        assert!(l.admit(0).is_ok());
    }

    #[test]
    fn budget_runs_out_and_resets_with_the_utc_day() {
        let (l, clock) = limiter(Limits {
            budget: Some(Budget {
                tokens: 100,
                per: Period::Day,
            }),
            ..Limits::default()
        });
        l.admit(0).unwrap().settle(Some(60));
        l.admit(0).unwrap().settle(Some(60));
        let r = l.admit(0).unwrap_err();
        assert_eq!(r.kind, LimitKind::Budget);
        assert!(r.retry_after <= Duration::from_secs(86_400));
        clock.advance(r.retry_after + Duration::from_secs(1));
        assert!(l.admit(0).is_ok(), "a new day, a new budget");
    }

    /// `y-m-d h:00:00` UTC.
    fn utc(y: i16, m: i8, d: i8, h: i8) -> SystemTime {
        let at = jiff::civil::date(y, m, d).at(h, 0, 0, 0);
        SystemTime::from(Offset::UTC.to_timestamp(at).unwrap())
    }

    #[test]
    fn month_periods_follow_the_calendar() {
        // 2024-02-29 12:00 UTC: the month ends in 12 h + 0 days.
        let (id, left) = period_id(Period::Month, utc(2024, 2, 29, 12));
        assert_eq!(id, 2024 * 12 + 2);
        assert_eq!(left, Duration::from_secs(43_200));
        assert_eq!(
            period_id(Period::Month, utc(2023, 12, 31, 0)).0,
            2023 * 12 + 12
        );
        assert_eq!(
            period_id(Period::Month, utc(2024, 1, 1, 0)).0,
            2024 * 12 + 1
        );
        // 2000 is a leap year, 2100 is not.
        let day = Duration::from_secs(86_400);
        assert_eq!(period_id(Period::Month, utc(2000, 2, 28, 0)).1, 2 * day);
        assert_eq!(period_id(Period::Month, utc(2100, 2, 28, 0)).1, day);
        assert_eq!(period_id(Period::Month, utc(1970, 1, 1, 0)).1, 31 * day);
    }

    #[test]
    fn reset_text_uses_openai_durations() {
        assert_eq!(reset_text(Duration::from_millis(1500)), "1.500s");
        assert_eq!(reset_text(Duration::from_secs(360)), "6m0s");
    }
}
