//! Endpoint outlier ejection, after Envoy's consecutive-5xx detector.
//!
//! One [`OutlierDetector`] per upstream watches that upstream's endpoints (resolved addresses).
//! The proxy reports each attempt's network-level outcome: [`OutlierDetector::on_failure`] for a
//! connect error, a timeout or an answer that [`FailureCount::is_failure`] counts (by default
//! only the gateway errors 502, 503 and 504, as Envoy's `consecutive_gateway_failure`),
//! [`OutlierDetector::on_success`] for any other answer. Local events (a client's own limit, a
//! client abort) are simply not reported: they say nothing about the endpoint.
//!
//! As in Envoy, ejection never goes below a healthy floor: the last endpoint of an upstream that
//! is still in rotation stays, whatever it answers. An upstream whose host name resolves to one
//! address (Azure, a relay) is thus never ejected: ejecting it would turn every request into a
//! local 502 for minutes, which is worse than passing its failures on (and retrying elsewhere).
//!
//! The detector only keeps the books; the caller acts on them. On [`Verdict::Eject`] it disables
//! the endpoint in Pingora's `LoadBalancer`; a timer calls [`OutlierDetector::due_returns`] and
//! re-enables what comes back (Pingora still wants the health check to pass before traffic
//! flows). Nothing in Pingora re-enables a backend we disabled, so the detector keeps counting an
//! endpoint as ejected until `due_returns` has handed it back: the two views never disagree.

use crate::clock::SharedClock;
use log::info;
use parking_lot::Mutex;
use serde::Deserialize;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Which upstream answers count as failures of the endpoint that sent them. Connect errors and
/// timeouts always count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum FailureCount {
    /// 502, 503 and 504: the endpoint, or what stands behind it, could not serve. Any other
    /// answer, a 500 included, shows a working endpoint: a relay answers 500 to inputs it
    /// cannot handle, which any client can send on purpose.
    #[default]
    #[serde(rename = "gateway_errors")]
    GatewayErrors,
    /// Every 5xx answer.
    #[serde(rename = "all_5xx")]
    All5xx,
}

impl FailureCount {
    /// Whether an answer with `status` counts against the endpoint that sent it.
    pub fn is_failure(self, status: u16) -> bool {
        match self {
            Self::GatewayErrors => matches!(status, 502..=504),
            Self::All5xx => (500..=599).contains(&status),
        }
    }
}

/// When an endpoint is ejected and for how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutlierPolicy {
    /// Consecutive failures (connect errors, timeouts, and answers `count` counts) that eject
    /// an endpoint; 0 counts as 1.
    pub consecutive: u32,
    /// The first ejection's length; the n-th ejection in a row lasts n times as long.
    pub base_ejection: Duration,
    /// The longest any ejection lasts.
    pub max_ejection: Duration,
    /// The share of the upstream's endpoints that may be ejected at once (values above 100 count
    /// as 100); one endpoint is always ejectable whatever the share, but never the last one in
    /// rotation.
    pub max_ejection_percent: u8,
    /// Which answers count as failures.
    pub count: FailureCount,
}

impl Default for OutlierPolicy {
    /// Envoy's defaults: 5 failures, 30 s growing per ejection in a row up to 300 s, at most half
    /// of the endpoints out, only gateway errors counted.
    fn default() -> Self {
        Self {
            consecutive: 5,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            max_ejection_percent: 50,
            count: FailureCount::GatewayErrors,
        }
    }
}

/// What the caller does with an endpoint after reporting a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Leave it in rotation.
    Keep,
    /// Take it out of rotation; [`OutlierDetector::due_returns`] hands it back after `for_`.
    Eject {
        /// How long the ejection lasts.
        for_: Duration,
    },
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct EndpointState {
    /// Failures since the last success, ejection or return.
    consecutive_failures: u32,
    /// Ejections not separated by a success after a return: the multiplier of the next one.
    ejections_in_row: u32,
    /// Set while ejected, until `due_returns` hands the endpoint back.
    ejected_until: Option<Instant>,
    /// Whether the percent cap holding this endpoint back has been logged, so a busy failing
    /// endpoint logs it once rather than on every request.
    cap_logged: bool,
}

#[derive(Debug, Default)]
struct Inner {
    /// Only endpoints with something to remember: a healthy endpoint's entry is dropped on its
    /// next success, so addresses that come and go with DNS do not pile up.
    endpoints: HashMap<SocketAddr, EndpointState>,
    /// Endpoints known from discovery, for the percent cap.
    known: usize,
}

impl Inner {
    fn ejected_count(&self) -> usize {
        self.endpoints
            .values()
            .filter(|s| s.ejected_until.is_some())
            .count()
    }
}

/// The outlier books of one upstream's endpoints; shared by every worker thread.
#[derive(Debug)]
pub struct OutlierDetector {
    upstream: String,
    policy: OutlierPolicy,
    clock: SharedClock,
    inner: Mutex<Inner>,
}

impl OutlierDetector {
    /// A detector for the upstream named `upstream` (the name appears in its log lines).
    pub fn new(upstream: &str, policy: OutlierPolicy, clock: SharedClock) -> Self {
        Self {
            upstream: upstream.to_owned(),
            policy,
            clock,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Sets how many endpoints discovery currently knows for the upstream, the base of the
    /// percent cap. Until it is called, the endpoints that have reported failures stand in.
    pub fn set_endpoint_count(&self, n: usize) {
        self.inner.lock().known = n;
    }

    /// Whether an answer with `status` counts against the endpoint (see [`FailureCount`]).
    pub fn is_failure(&self, status: u16) -> bool {
        self.policy.count.is_failure(status)
    }

    /// Records a failure of `ep` (a connect error, a timeout, or an answer
    /// [`OutlierDetector::is_failure`] counts); says whether to eject it now.
    ///
    /// Failures reported while `ep` is ejected are ignored: they are late answers to requests
    /// sent before the ejection and must not lengthen the next one.
    pub fn on_failure(&self, ep: SocketAddr) -> Verdict {
        let threshold = self.policy.consecutive.max(1);
        let mut guard = self.inner.lock();
        let inner = &mut *guard;
        let failures = {
            let state = inner.endpoints.entry(ep).or_default();
            if state.ejected_until.is_some() {
                return Verdict::Keep;
            }
            state.consecutive_failures = state.consecutive_failures.saturating_add(1);
            state.consecutive_failures
        };
        if failures < threshold {
            return Verdict::Keep;
        }

        let known = inner.known.max(inner.endpoints.len());
        let ejected = inner.ejected_count();
        let allowed = max_ejectable(known, self.policy.max_ejection_percent);
        let Some(state) = inner.endpoints.get_mut(&ep) else {
            return Verdict::Keep;
        };
        if ejected >= allowed {
            // Keep counting: the next failure after room opens ejects it.
            if !state.cap_logged {
                state.cap_logged = true;
                if ejected + 1 >= known {
                    info!(
                        "upstream {}: endpoint {ep} not ejected after {failures} consecutive \
                         failures: it is the last endpoint in rotation",
                        self.upstream
                    );
                } else {
                    info!(
                        "upstream {}: endpoint {ep} not ejected after {failures} consecutive \
                         failures: {ejected} of {known} endpoints already ejected (max {}%)",
                        self.upstream,
                        self.policy.max_ejection_percent.min(100)
                    );
                }
            }
            return Verdict::Keep;
        }

        state.ejections_in_row = state.ejections_in_row.saturating_add(1);
        let for_ = self
            .policy
            .base_ejection
            .saturating_mul(state.ejections_in_row)
            .min(self.policy.max_ejection);
        state.ejected_until = Some(self.clock.now() + for_);
        state.consecutive_failures = 0;
        state.cap_logged = false;
        info!(
            "upstream {}: endpoint {ep} ejected for {for_:?} after {failures} consecutive failures",
            self.upstream
        );
        Verdict::Eject { for_ }
    }

    /// Records a good answer from `ep`: its failure count starts over, and once it is back in
    /// rotation, so does the ejection multiplier.
    pub fn on_success(&self, ep: SocketAddr) {
        let mut inner = self.inner.lock();
        let Some(state) = inner.endpoints.get_mut(&ep) else {
            return;
        };
        state.consecutive_failures = 0;
        state.cap_logged = false;
        // A success while ejected is a late answer to an earlier request: it does not prove the
        // endpoint recovered, so the multiplier waits for a success after the return.
        if state.ejected_until.is_none() {
            inner.endpoints.remove(&ep);
        }
    }

    /// Endpoints whose ejection time is over; the detector counts them as back in rotation, and
    /// the caller re-enables them in Pingora.
    pub fn due_returns(&self) -> Vec<SocketAddr> {
        let now = self.clock.now();
        let mut inner = self.inner.lock();
        let mut back = Vec::new();
        for (ep, state) in &mut inner.endpoints {
            if state.ejected_until.is_some_and(|until| until <= now) {
                state.ejected_until = None;
                state.consecutive_failures = 0;
                info!(
                    "upstream {}: endpoint {ep} returns after its ejection ({} in a row)",
                    self.upstream, state.ejections_in_row
                );
                back.push(*ep);
            }
        }
        back
    }

    /// When the earliest current ejection ends, so the caller's timer can sleep until then.
    pub fn next_return(&self) -> Option<Instant> {
        self.inner
            .lock()
            .endpoints
            .values()
            .filter_map(|s| s.ejected_until)
            .min()
    }

    /// Whether `ep` is ejected (until `due_returns` hands it back).
    pub fn is_ejected(&self, ep: SocketAddr) -> bool {
        self.inner
            .lock()
            .endpoints
            .get(&ep)
            .is_some_and(|s| s.ejected_until.is_some())
    }

    /// How many endpoints are ejected now.
    pub fn ejected_count(&self) -> usize {
        self.inner.lock().ejected_count()
    }
}

/// How many of `known` endpoints may be out at once: the percent share rounded down but at least
/// one, so that one bad endpoint among a few can go, and never all of them: the last endpoint in
/// rotation stays (a single-endpoint upstream is never ejected).
fn max_ejectable(known: usize, percent: u8) -> usize {
    let percent = usize::from(percent.min(100));
    (known.saturating_mul(percent) / 100)
        .max(1)
        .min(known.saturating_sub(1))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::clock::{Clock, ManualClock};
    use std::sync::Arc;

    fn ep(n: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, n], 443))
    }

    fn detector(endpoints: usize) -> (OutlierDetector, Arc<ManualClock>) {
        let clock = ManualClock::new();
        let d = OutlierDetector::new("openai", OutlierPolicy::default(), clock.clone());
        d.set_endpoint_count(endpoints);
        (d, clock)
    }

    /// Reports `n` failures and returns the last verdict.
    fn fail(d: &OutlierDetector, e: SocketAddr, n: u32) -> Verdict {
        let mut last = Verdict::Keep;
        for _ in 0..n {
            last = d.on_failure(e);
        }
        last
    }

    fn secs(s: u64) -> Verdict {
        Verdict::Eject {
            for_: Duration::from_secs(s),
        }
    }

    /// Ejects `e`, lets the ejection run out and hands it back, without any success.
    fn eject_and_return(d: &OutlierDetector, clock: &ManualClock, e: SocketAddr) -> Verdict {
        let v = fail(d, e, 5);
        clock.advance(Duration::from_secs(300));
        assert_eq!(d.due_returns(), vec![e]);
        v
    }

    #[test]
    fn four_failures_keep_and_the_fifth_ejects_for_30s() {
        let (d, _) = detector(4);
        assert_eq!(fail(&d, ep(1), 4), Verdict::Keep);
        assert!(!d.is_ejected(ep(1)));
        assert_eq!(d.on_failure(ep(1)), secs(30));
        assert!(d.is_ejected(ep(1)));
        assert_eq!(d.ejected_count(), 1);
    }

    #[test]
    fn a_success_in_between_resets_the_failure_count() {
        let (d, _) = detector(4);
        fail(&d, ep(1), 4);
        d.on_success(ep(1));
        assert_eq!(fail(&d, ep(1), 4), Verdict::Keep);
        assert_eq!(d.on_failure(ep(1)), secs(30));
    }

    #[test]
    fn failures_of_other_endpoints_do_not_add_up() {
        let (d, _) = detector(4);
        fail(&d, ep(1), 4);
        assert_eq!(fail(&d, ep(2), 4), Verdict::Keep);
        assert_eq!(d.ejected_count(), 0);
    }

    #[test]
    fn ejections_in_a_row_grow_linearly_up_to_the_cap() {
        let (d, clock) = detector(4);
        let lengths: Vec<Verdict> = (0..12)
            .map(|_| eject_and_return(&d, &clock, ep(1)))
            .collect();
        let expected: Vec<Verdict> = [30, 60, 90, 120, 150, 180, 210, 240, 270, 300, 300, 300]
            .into_iter()
            .map(secs)
            .collect();
        assert_eq!(lengths, expected);
    }

    #[test]
    fn ejected_endpoint_is_due_only_when_its_time_is_over() {
        let (d, clock) = detector(4);
        fail(&d, ep(1), 5);
        assert_eq!(d.next_return(), Some(clock.now() + Duration::from_secs(30)));
        clock.advance(Duration::from_secs(29));
        assert!(d.due_returns().is_empty());
        assert!(d.is_ejected(ep(1)));
        clock.advance(Duration::from_secs(1));
        assert_eq!(d.due_returns(), vec![ep(1)]);
        assert!(!d.is_ejected(ep(1)));
        assert_eq!(d.ejected_count(), 0);
        assert_eq!(d.next_return(), None);
        // Handed back once only.
        assert!(d.due_returns().is_empty());
    }

    #[test]
    fn returned_endpoint_needs_a_full_streak_to_be_ejected_again() {
        let (d, clock) = detector(4);
        eject_and_return(&d, &clock, ep(1));
        assert_eq!(fail(&d, ep(1), 4), Verdict::Keep);
        assert_eq!(d.on_failure(ep(1)), secs(60));
    }

    #[test]
    fn failures_while_ejected_are_ignored() {
        let (d, clock) = detector(4);
        fail(&d, ep(1), 5);
        assert_eq!(fail(&d, ep(1), 20), Verdict::Keep);
        clock.advance(Duration::from_secs(30));
        assert_eq!(d.due_returns(), vec![ep(1)]);
        assert_eq!(fail(&d, ep(1), 4), Verdict::Keep);
        assert_eq!(d.on_failure(ep(1)), secs(60));
    }

    #[test]
    fn percent_cap_with_four_endpoints_at_half_allows_two_ejected_not_three() {
        let (d, _) = detector(4);
        assert_eq!(fail(&d, ep(1), 5), secs(30));
        assert_eq!(fail(&d, ep(2), 5), secs(30));
        assert_eq!(fail(&d, ep(3), 5), Verdict::Keep);
        assert_eq!(fail(&d, ep(3), 5), Verdict::Keep);
        assert!(!d.is_ejected(ep(3)));
        assert_eq!(d.ejected_count(), 2);
    }

    #[test]
    fn capped_endpoint_is_ejected_on_its_next_failure_once_room_exists() {
        let (d, clock) = detector(2);
        assert_eq!(fail(&d, ep(1), 5), secs(30));
        assert_eq!(fail(&d, ep(2), 7), Verdict::Keep);
        clock.advance(Duration::from_secs(30));
        assert_eq!(d.due_returns(), vec![ep(1)]);
        assert_eq!(d.on_failure(ep(2)), secs(30));
    }

    #[test]
    fn a_single_endpoint_is_never_ejected_whatever_the_percent() {
        for percent in [0, 50, 100] {
            let clock = ManualClock::new();
            let policy = OutlierPolicy {
                max_ejection_percent: percent,
                ..OutlierPolicy::default()
            };
            let d = OutlierDetector::new("relay", policy, clock);
            d.set_endpoint_count(1);
            assert_eq!(fail(&d, ep(1), 50), Verdict::Keep, "{percent}%");
            assert!(!d.is_ejected(ep(1)));
        }
    }

    #[test]
    fn the_last_endpoint_in_rotation_stays_even_at_100_percent() {
        let clock = ManualClock::new();
        let policy = OutlierPolicy {
            max_ejection_percent: 100,
            ..OutlierPolicy::default()
        };
        let d = OutlierDetector::new("openai", policy, clock.clone());
        d.set_endpoint_count(3);
        assert_eq!(fail(&d, ep(1), 5), secs(30));
        assert_eq!(fail(&d, ep(2), 5), secs(30));
        assert_eq!(
            fail(&d, ep(3), 20),
            Verdict::Keep,
            "the last one in rotation"
        );
        assert_eq!(d.ejected_count(), 2);
        // Once another endpoint is back, the failing one may go.
        clock.advance(Duration::from_secs(30));
        assert_eq!(d.due_returns().len(), 2);
        assert_eq!(d.on_failure(ep(3)), secs(30));
    }

    #[test]
    fn at_least_one_of_two_endpoints_is_ejectable_at_a_low_percent() {
        let clock = ManualClock::new();
        let policy = OutlierPolicy {
            max_ejection_percent: 0,
            ..OutlierPolicy::default()
        };
        let d = OutlierDetector::new("openai", policy, clock);
        d.set_endpoint_count(2);
        assert_eq!(fail(&d, ep(1), 5), secs(30));
        assert_eq!(fail(&d, ep(2), 5), Verdict::Keep);
    }

    #[test]
    fn two_endpoints_at_half_allow_one_ejected() {
        let (d, _) = detector(2);
        assert_eq!(fail(&d, ep(1), 5), secs(30));
        assert_eq!(fail(&d, ep(2), 5), Verdict::Keep);
    }

    #[test]
    fn without_an_endpoint_count_the_failing_endpoints_stand_in() {
        let clock = ManualClock::new();
        let d = OutlierDetector::new("openai", OutlierPolicy::default(), clock);
        // One endpoint seen: it may be the only one, so it stays.
        assert_eq!(fail(&d, ep(1), 5), Verdict::Keep);
        // Two endpoints seen, half of them may be out.
        assert_eq!(fail(&d, ep(2), 5), secs(30));
        assert_eq!(d.on_failure(ep(1)), Verdict::Keep);
    }

    #[test]
    fn success_after_return_resets_the_multiplier() {
        let (d, clock) = detector(4);
        assert_eq!(eject_and_return(&d, &clock, ep(1)), secs(30));
        assert_eq!(eject_and_return(&d, &clock, ep(1)), secs(60));
        d.on_success(ep(1));
        assert_eq!(fail(&d, ep(1), 5), secs(30));
    }

    #[test]
    fn success_while_ejected_does_not_reset_the_multiplier() {
        let (d, clock) = detector(4);
        fail(&d, ep(1), 5);
        d.on_success(ep(1));
        assert!(d.is_ejected(ep(1)));
        clock.advance(Duration::from_secs(30));
        assert_eq!(d.due_returns(), vec![ep(1)]);
        assert_eq!(fail(&d, ep(1), 5), secs(60));
    }

    #[test]
    fn zero_consecutive_counts_as_one() {
        let clock = ManualClock::new();
        let policy = OutlierPolicy {
            consecutive: 0,
            ..OutlierPolicy::default()
        };
        let d = OutlierDetector::new("openai", policy, clock);
        d.set_endpoint_count(4);
        assert_eq!(d.on_failure(ep(1)), secs(30));
    }

    #[test]
    fn only_gateway_errors_count_by_default_and_every_5xx_when_configured() {
        let d = FailureCount::default();
        assert_eq!(d, FailureCount::GatewayErrors);
        for status in [502, 503, 504] {
            assert!(d.is_failure(status), "{status}");
            assert!(FailureCount::All5xx.is_failure(status), "{status}");
        }
        for status in [500, 501, 505, 599] {
            assert!(!d.is_failure(status), "{status}");
            assert!(FailureCount::All5xx.is_failure(status), "{status}");
        }
        for status in [200, 400, 404, 429, 499, 600] {
            assert!(!d.is_failure(status), "{status}");
            assert!(!FailureCount::All5xx.is_failure(status), "{status}");
        }
        let (det, _) = detector(4);
        assert!(!det.is_failure(500));
        assert!(det.is_failure(503));
    }

    #[test]
    fn failure_count_reads_its_config_spelling() {
        let parse = |s: &str| serde_json::from_str::<FailureCount>(s);
        assert_eq!(
            parse("\"gateway_errors\"").unwrap(),
            FailureCount::GatewayErrors
        );
        assert_eq!(parse("\"all_5xx\"").unwrap(), FailureCount::All5xx);
        assert!(parse("\"all5xx\"").is_err());
    }

    #[test]
    fn detector_is_shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<OutlierDetector>();
    }
}
