//! The retry policy: after every attempt, one decision — try another key or upstream, or answer.
//!
//! Pingora reports the end of an attempt in three hooks (a response header arrived, the
//! connection failed during the exchange, no connection could be made). Each hook turns what it
//! saw into an [`AttemptResult`] and asks [`decide`]; no hook decides on its own. The rules, in
//! the order they apply:
//!
//! 1. The client is gone: nobody is left to answer, so no more upstream quota is spent.
//! 2. A final response header already reached the client: another attempt would splice two
//!    answers. An interim `100 Continue` does not count: the answer is still to come.
//! 3. The result is final by nature: a success, or a failure that is the request's own fault.
//! 4. The attempt budget (`retries`), the route's `deadline` or the candidates are spent.
//!
//! Otherwise the request is tried elsewhere. When it is not, the same module says what the client
//! gets: the upstream's own answer, keygate's error for the failure, or nothing.

use crate::keys::KeyIndex;
use crate::local_response::LocalResponse;
use crate::outcome::Outcome;
use std::time::{Duration, Instant};

/// What one attempt came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptResult {
    /// The upstream answered with a final response header.
    Answered {
        /// Its status.
        status: u16,
        /// What that status (and what is known of the body) means for key and endpoint.
        outcome: Outcome,
    },
    /// No connection could be made: refused, unreachable, TLS handshake failed, or too slow.
    ConnectFailed,
    /// No response header arrived within the attempt's time-to-first-byte limit.
    TimedOut,
    /// The connection broke before or while the answer came (reset, closed, garbled).
    Broke,
    /// The request cannot be forwarded as the client sent it (a header Pingora will not send).
    Unforwardable,
    /// The client went away.
    ClientGone,
    /// keygate itself failed.
    Internal,
}

impl AttemptResult {
    /// Whether another key, endpoint or upstream could do better.
    fn worth_retrying(self) -> bool {
        match self {
            AttemptResult::Answered { outcome, .. } => outcome.worth_retrying(),
            AttemptResult::ConnectFailed | AttemptResult::TimedOut | AttemptResult::Broke => true,
            AttemptResult::Unforwardable | AttemptResult::ClientGone | AttemptResult::Internal => {
                false
            }
        }
    }
}

/// How much of an answer the client has received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientProgress {
    /// Nothing yet.
    Nothing,
    /// Only an interim response (`100 Continue`): the final answer is still to come.
    Interim,
    /// A final response header, perhaps with body bytes: the answer has begun.
    Answering,
}

/// A route's limits on trying again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryBudget {
    /// Extra attempts after the first (`retries: 2` means at most 3 attempts).
    pub retries: u32,
    /// No new attempt starts once this long has passed since the request arrived.
    pub deadline: Option<Duration>,
}

/// One (upstream, key) pair a request has used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tried {
    /// Index of the upstream.
    pub upstream: usize,
    /// The key, or `None` for an upstream without keys (`auth: none`).
    pub key: Option<KeyIndex>,
}

/// The attempts of one request: when it arrived, how many attempts began, which keys they used.
#[derive(Debug, Clone)]
pub struct AttemptLog {
    started: Instant,
    attempts: u32,
    tried: Vec<Tried>,
}

impl AttemptLog {
    /// An empty log for a request that arrived at `started`.
    pub fn new(started: Instant) -> Self {
        Self {
            started,
            attempts: 0,
            tried: Vec::new(),
        }
    }

    /// When the request arrived.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Attempts begun so far.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Notes an attempt beginning on `upstream` with `key`.
    pub fn begin(&mut self, upstream: usize, key: Option<KeyIndex>) {
        self.attempts += 1;
        self.tried.push(Tried { upstream, key });
    }

    /// Forgets the latest use of (`upstream`, `key`): a connection that was never made never used
    /// the key, so it may be tried again on another endpoint.
    pub fn release(&mut self, upstream: usize, key: Option<KeyIndex>) {
        let wanted = Tried { upstream, key };
        if let Some(pos) = self.tried.iter().rposition(|t| *t == wanted) {
            self.tried.remove(pos);
        }
    }

    /// Keys of `upstream` already used by this request.
    pub fn tried_keys(&self, upstream: usize) -> Vec<KeyIndex> {
        self.tried
            .iter()
            .filter(|t| t.upstream == upstream)
            .filter_map(|t| t.key)
            .collect()
    }

    /// Whether this request already used `upstream` (for upstreams without keys).
    pub fn tried_upstream(&self, upstream: usize) -> bool {
        self.tried.iter().any(|t| t.upstream == upstream)
    }
}

/// What the client gets when the request is not tried again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The upstream's own answer passes through.
    Upstream,
    /// keygate answers with this error.
    Local(LocalResponse),
    /// Nothing more can be written: the client is gone, or its answer already began.
    Nobody,
}

/// The policy's verdict on one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Try another key, endpoint or upstream.
    TryElsewhere,
    /// Stop here and answer.
    Answer(Answer),
}

/// Decides what follows an attempt. `candidates_left` is asked only when everything else
/// allows another attempt (finding one costs a key pick).
pub fn decide(
    result: AttemptResult,
    progress: ClientProgress,
    log: &AttemptLog,
    budget: RetryBudget,
    now: Instant,
    candidates_left: impl FnOnce() -> bool,
) -> Decision {
    if result == AttemptResult::ClientGone || progress == ClientProgress::Answering {
        return Decision::Answer(Answer::Nobody);
    }
    let final_answer = match result {
        AttemptResult::Answered { .. } => Answer::Upstream,
        other => answer_after_failure(other),
    };
    if !result.worth_retrying() || !within_budget(log, budget, now) || !candidates_left() {
        return Decision::Answer(final_answer);
    }
    Decision::TryElsewhere
}

/// Whether the budget allows another attempt now.
pub fn within_budget(log: &AttemptLog, budget: RetryBudget, now: Instant) -> bool {
    let past_deadline = budget
        .deadline
        .is_some_and(|d| now.saturating_duration_since(log.started) >= d);
    log.attempts <= budget.retries && !past_deadline
}

/// keygate's answer when an attempt ended without an answer that can pass through: the failure,
/// in OpenAI's error shape. Also used when a retry was decided but could not happen.
pub fn answer_after_failure(result: AttemptResult) -> Answer {
    match result {
        AttemptResult::Answered { status, .. } => Answer::Local(LocalResponse::new(
            status,
            "upstream_error",
            "upstream_error",
            "The upstream request failed.",
        )),
        AttemptResult::ConnectFailed => Answer::Local(LocalResponse::bad_gateway(
            "Could not connect to the upstream.",
        )),
        AttemptResult::TimedOut => Answer::Local(LocalResponse::gateway_timeout()),
        AttemptResult::Broke => Answer::Local(LocalResponse::bad_gateway(
            "The upstream connection failed.",
        )),
        AttemptResult::Unforwardable => Answer::Local(LocalResponse::bad_request(
            "The request headers could not be forwarded.",
        )),
        AttemptResult::ClientGone => Answer::Nobody,
        AttemptResult::Internal => Answer::Local(LocalResponse::new(
            500,
            "server_error",
            "internal_error",
            "keygate failed to handle the request.",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::DisableReason;

    const BUDGET: RetryBudget = RetryBudget {
        retries: 2,
        deadline: Some(Duration::from_secs(10)),
    };

    fn answered(status: u16) -> AttemptResult {
        AttemptResult::Answered {
            status,
            outcome: Outcome::of(status),
        }
    }

    /// A log of `attempts` attempts for a request that arrived `age` ago (seen from `now`).
    fn log_at(attempts: u32, age: Duration) -> (AttemptLog, Instant) {
        let started = Instant::now();
        let mut log = AttemptLog::new(started);
        for k in 0..attempts {
            log.begin(0, Some(k as usize));
        }
        (log, started + age)
    }

    fn code(decision: &Decision) -> Option<u16> {
        match decision {
            Decision::Answer(Answer::Local(r)) => Some(r.status),
            _ => None,
        }
    }

    #[test]
    fn every_row_of_the_policy_table_decides_as_documented() {
        use AttemptResult as R;
        use ClientProgress as P;
        let young = Duration::from_secs(1);
        let old = Duration::from_secs(11);
        let retry = Decision::TryElsewhere;
        let pass = Decision::Answer(Answer::Upstream);
        let nobody = Decision::Answer(Answer::Nobody);
        // (result, progress, attempts so far, request age, candidates left, expected)
        let rows: Vec<(AttemptResult, ClientProgress, u32, Duration, bool, Decision)> = vec![
            // Key-bound and server failures go elsewhere while budget and candidates last.
            (answered(429), P::Nothing, 1, young, true, retry.clone()),
            (answered(401), P::Nothing, 1, young, true, retry.clone()),
            (answered(403), P::Nothing, 2, young, true, retry.clone()),
            (answered(500), P::Nothing, 1, young, true, retry.clone()),
            (answered(503), P::Interim, 1, young, true, retry.clone()),
            (R::ConnectFailed, P::Nothing, 1, young, true, retry.clone()),
            (R::TimedOut, P::Nothing, 1, young, true, retry.clone()),
            (R::Broke, P::Interim, 2, young, true, retry.clone()),
            // Success and the request's own faults pass through as the upstream said.
            (answered(200), P::Nothing, 1, young, true, pass.clone()),
            (answered(400), P::Nothing, 1, young, true, pass.clone()),
            (answered(404), P::Nothing, 1, young, true, pass.clone()),
            (answered(501), P::Nothing, 1, young, true, pass.clone()),
            // Budget spent: the last upstream answer passes through...
            (answered(429), P::Nothing, 3, young, true, pass.clone()),
            (answered(502), P::Nothing, 3, young, true, pass.clone()),
            // ...deadline passed...
            (answered(429), P::Nothing, 1, old, true, pass.clone()),
            // ...no candidate left.
            (answered(429), P::Nothing, 1, young, false, pass.clone()),
            // A failure with nothing to pass on gets keygate's error instead.
            (
                R::ConnectFailed,
                P::Nothing,
                3,
                young,
                true,
                Decision::Answer(answer_after_failure(R::ConnectFailed)),
            ),
            (
                R::ConnectFailed,
                P::Nothing,
                1,
                old,
                true,
                Decision::Answer(answer_after_failure(R::ConnectFailed)),
            ),
            (
                R::ConnectFailed,
                P::Nothing,
                1,
                young,
                false,
                Decision::Answer(answer_after_failure(R::ConnectFailed)),
            ),
            (
                R::TimedOut,
                P::Nothing,
                1,
                old,
                true,
                Decision::Answer(answer_after_failure(R::TimedOut)),
            ),
            (
                R::Broke,
                P::Nothing,
                3,
                young,
                true,
                Decision::Answer(answer_after_failure(R::Broke)),
            ),
            (
                R::Unforwardable,
                P::Nothing,
                1,
                young,
                true,
                Decision::Answer(answer_after_failure(R::Unforwardable)),
            ),
            (
                R::Internal,
                P::Nothing,
                1,
                young,
                true,
                Decision::Answer(answer_after_failure(R::Internal)),
            ),
            // A client that left gets nothing and costs nothing more.
            (R::ClientGone, P::Nothing, 1, young, true, nobody.clone()),
            (R::ClientGone, P::Interim, 1, young, true, nobody.clone()),
            // Once the answer began, nothing else can be written.
            (R::Broke, P::Answering, 1, young, true, nobody.clone()),
            (R::TimedOut, P::Answering, 1, young, true, nobody.clone()),
            (answered(429), P::Answering, 1, young, true, nobody.clone()),
        ];
        for (i, (result, progress, attempts, age, candidates, expected)) in
            rows.into_iter().enumerate()
        {
            let (log, now) = log_at(attempts, age);
            let got = decide(result, progress, &log, BUDGET, now, || candidates);
            assert_eq!(got, expected, "row {i}: {result:?} {progress:?} attempts={attempts} age={age:?} candidates={candidates}");
        }
    }

    #[test]
    fn retries_two_means_at_most_three_attempts() {
        let young = Duration::from_millis(1);
        for (attempts, expected) in [(1, true), (2, true), (3, false)] {
            let (log, now) = log_at(attempts, young);
            let got = decide(
                answered(429),
                ClientProgress::Nothing,
                &log,
                BUDGET,
                now,
                || true,
            );
            assert_eq!(
                got == Decision::TryElsewhere,
                expected,
                "after attempt {attempts}"
            );
        }
    }

    #[test]
    fn deadline_stops_connect_failures_like_any_other_failure() {
        let budget = RetryBudget {
            retries: 10,
            deadline: Some(Duration::from_millis(500)),
        };
        let (log, now) = log_at(1, Duration::from_millis(499));
        let before = decide(
            AttemptResult::ConnectFailed,
            ClientProgress::Nothing,
            &log,
            budget,
            now,
            || true,
        );
        assert_eq!(before, Decision::TryElsewhere);
        let (log, now) = log_at(1, Duration::from_millis(500));
        let at = decide(
            AttemptResult::ConnectFailed,
            ClientProgress::Nothing,
            &log,
            budget,
            now,
            || true,
        );
        assert_eq!(code(&at), Some(502));
    }

    #[test]
    fn candidates_are_looked_for_only_when_everything_else_allows_a_retry() {
        let (log, now) = log_at(3, Duration::ZERO);
        let asked = std::cell::Cell::new(false);
        decide(
            answered(429),
            ClientProgress::Nothing,
            &log,
            BUDGET,
            now,
            || {
                asked.set(true);
                true
            },
        );
        assert!(!asked.get(), "budget spent: no pick needed");
        let (log, now) = log_at(1, Duration::ZERO);
        decide(
            answered(200),
            ClientProgress::Nothing,
            &log,
            BUDGET,
            now,
            || {
                asked.set(true);
                true
            },
        );
        assert!(!asked.get(), "success: no pick needed");
    }

    #[test]
    fn failures_without_an_answer_map_to_openai_shaped_gateway_errors() {
        let status = |r| match answer_after_failure(r) {
            Answer::Local(l) => Some(l.status),
            _ => None,
        };
        assert_eq!(status(AttemptResult::ConnectFailed), Some(502));
        assert_eq!(status(AttemptResult::Broke), Some(502));
        assert_eq!(status(AttemptResult::TimedOut), Some(504));
        assert_eq!(status(AttemptResult::Unforwardable), Some(400));
        assert_eq!(status(AttemptResult::Internal), Some(500));
        assert_eq!(status(answered(429)), Some(429));
        assert_eq!(
            answer_after_failure(AttemptResult::ClientGone),
            Answer::Nobody
        );
    }

    #[test]
    fn a_connection_never_made_gives_its_key_back_to_the_request() {
        let mut log = AttemptLog::new(Instant::now());
        log.begin(0, Some(4));
        log.begin(1, None);
        assert_eq!(log.tried_keys(0), vec![4]);
        log.release(0, Some(4));
        assert!(log.tried_keys(0).is_empty());
        assert_eq!(
            log.attempts(),
            2,
            "the attempt still counts against the budget"
        );
        assert!(log.tried_upstream(1));
    }

    #[test]
    fn key_refusals_are_retried_whatever_their_reason() {
        let (log, now) = log_at(1, Duration::ZERO);
        for reason in [DisableReason::Unauthorized, DisableReason::Forbidden] {
            let result = AttemptResult::Answered {
                status: 401,
                outcome: Outcome::KeyRefused(reason),
            };
            let got = decide(result, ClientProgress::Nothing, &log, BUDGET, now, || true);
            assert_eq!(got, Decision::TryElsewhere);
        }
    }
}
