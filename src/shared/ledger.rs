//! An instance's local side of a client's shared limits: a lease of requests and tokens granted
//! by Redis, spent without asking Redis again, and the corrections that wait for the next call.
//!
//! One Redis round trip buys a lease of a fraction of each limit (so that all instances' unspent
//! leases together stay within a few per cent of it); requests are then admitted from it locally
//! until it runs out or after [`LEASE_TTL`], when what is left is given back to the window it
//! was counted in. Token corrections (real usage against the reservation) and budget spending
//! on the local share are sent with the next call, or by the periodic flush. Plain Rust, no
//! socket: the calls to Redis are made by [`super::limits`].

use std::time::{Duration, Instant};

/// How long a lease may be spent: a request admitted from it is counted in Redis at most this
/// long before it happened.
pub const LEASE_TTL: Duration = Duration::from_secs(1);

/// Each instance's lease is at most this fraction of a limit, divided by the instances: all
/// leases together stay within 1/40 (2.5 %) of it.
pub const LEASE_SHARE: u64 = 40;

/// What one request needs from the lease.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Need {
    /// 1 when the client has an rpm limit.
    pub requests: u64,
    /// Its token reservation when the client has a tpm limit.
    pub tokens: u64,
    /// Its token reservation when the client has a budget.
    pub budget: u64,
}

/// The part of a grant not yet spent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// The second (Unix time, Redis's clock) whose window buckets counted the grant.
    pub sec: u64,
    /// The budget period it was granted in.
    pub period: u64,
    /// When it stops being spent.
    pub until: Instant,
    /// Requests left.
    pub requests: u64,
    /// Tokens per minute left.
    pub tokens: u64,
    /// Budget tokens left.
    pub budget: u64,
}

/// What the next call to Redis carries besides a request for a new lease.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outgoing {
    /// The second whose buckets get the unused requests and tokens back.
    pub return_sec: u64,
    /// Unused requests of an ended lease.
    pub return_requests: u64,
    /// Unused tokens of an ended lease.
    pub return_tokens: u64,
    /// Tokens to add to the minute window now (real usage minus reservations).
    pub tpm_delta: i64,
    /// Tokens to add to the budget of the period (negative: unused lease, refunds).
    pub budget_delta: i64,
}

impl Outgoing {
    /// Whether there is nothing to send.
    pub fn is_empty(&self) -> bool {
        *self == Outgoing::default()
    }
}

/// One client's lease and pending corrections on this instance.
#[derive(Debug, Default)]
pub struct Ledger {
    lease: Option<Lease>,
    tpm_delta: i64,
    /// (period, tokens) not yet added to that period's budget.
    budget: Option<(u64, i64)>,
}

impl Ledger {
    /// Takes `need` from the lease if it is live, of budget period `period`, and covers it;
    /// the second the lease was counted in, or `None` (then a call to Redis is due).
    pub fn take(&mut self, need: &Need, now: Instant, period: u64) -> Option<u64> {
        let lease = self.lease.as_mut()?;
        let covers = now < lease.until
            && lease.period == period
            && lease.requests >= need.requests
            && lease.tokens >= need.tokens
            && lease.budget >= need.budget;
        if !covers {
            return None;
        }
        lease.requests -= need.requests;
        lease.tokens -= need.tokens;
        lease.budget -= need.budget;
        Some(lease.sec)
    }

    /// Everything to send now: corrections, and the rest of the lease when `end_lease` is true
    /// or the lease has expired (it is then ended). Leaves the ledger without what it returns.
    pub fn outgoing(&mut self, now: Instant, period: u64, end_lease: bool) -> Outgoing {
        let mut out = Outgoing {
            tpm_delta: std::mem::take(&mut self.tpm_delta),
            ..Outgoing::default()
        };
        if let Some((p, delta)) = self.budget.take() {
            // A correction for a period that has ended has no budget left to change.
            if p == period {
                out.budget_delta = delta;
            }
        }
        let ended = self
            .lease
            .is_some_and(|l| end_lease || now >= l.until || l.period != period);
        if ended {
            if let Some(l) = self.lease.take() {
                out.return_sec = l.sec;
                out.return_requests = l.requests;
                out.return_tokens = l.tokens;
                if l.period == period {
                    out.budget_delta -= i64::try_from(l.budget).unwrap_or(i64::MAX);
                }
            }
        }
        out
    }

    /// Keeps a new lease (what a grant left after the request that asked for it). A lease
    /// another request of this instance was granted meanwhile is merged into it, never lost: its
    /// requests and tokens are already counted in Redis (a second or so earlier, which the
    /// window can bear).
    pub fn grant(&mut self, mut lease: Lease) {
        if let Some(old) = self.lease.take() {
            lease.requests += old.requests;
            lease.tokens += old.tokens;
            if old.period == lease.period {
                lease.budget += old.budget;
            }
        }
        self.lease = Some(lease);
    }

    /// Adds corrections for the minute window and period `period`'s budget.
    pub fn correct(&mut self, tpm: i64, budget: i64, period: u64) {
        self.tpm_delta = self.tpm_delta.saturating_add(tpm);
        if budget != 0 {
            let entry = match self.budget {
                Some((p, d)) if p == period => d,
                // A newer period: the older correction no longer matters.
                _ => 0,
            };
            self.budget = Some((period, entry.saturating_add(budget)));
        }
    }

    /// Gives one request back to the lease counted in second `sec`, if it is still the live
    /// lease (a cache hit refunds its place); true if it could.
    pub fn give_back_request(&mut self, sec: u64) -> bool {
        match self.lease.as_mut() {
            Some(l) if l.sec == sec => {
                l.requests += 1;
                true
            }
            _ => false,
        }
    }

    /// Puts back what a failed call carried: the corrections and an unused lease's budget are
    /// sent later; its unused requests and minute tokens are not (they age out of the minute
    /// window by themselves).
    pub fn restore(&mut self, out: &Outgoing, period: u64) {
        self.tpm_delta = self.tpm_delta.saturating_add(out.tpm_delta);
        let unused_budget_returned = out.budget_delta;
        if unused_budget_returned != 0 {
            self.correct(0, unused_budget_returned, period);
        }
    }
}

/// A lease's size for a limit: a 1/[`LEASE_SHARE`] share of it divided among `instances`, at
/// least what the request needs.
pub fn lease_size(limit: Option<u64>, instances: u32, need: u64) -> u64 {
    limit.map_or(0, |l| {
        (l / (LEASE_SHARE * u64::from(instances.max(1)))).max(need)
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn lease(now: Instant) -> Lease {
        Lease {
            sec: 1000,
            period: 7,
            until: now + LEASE_TTL,
            requests: 2,
            tokens: 100,
            budget: 100,
        }
    }

    const NEED: Need = Need {
        requests: 1,
        tokens: 40,
        budget: 40,
    };

    #[test]
    fn requests_are_taken_from_a_live_lease_until_it_runs_short() {
        let now = Instant::now();
        let mut l = Ledger::default();
        assert_eq!(l.take(&NEED, now, 7), None, "no lease yet");
        l.grant(lease(now));
        assert_eq!(l.take(&NEED, now, 7), Some(1000));
        assert_eq!(l.take(&NEED, now, 7), Some(1000));
        assert_eq!(l.take(&NEED, now, 7), None, "no request left");
        let out = l.outgoing(now, 7, true);
        assert_eq!(
            (
                out.return_sec,
                out.return_requests,
                out.return_tokens,
                out.budget_delta
            ),
            (1000, 0, 20, -20),
            "the unused tokens and budget go back"
        );
        assert!(l.outgoing(now, 7, true).is_empty(), "returned once");
    }

    #[test]
    fn an_expired_lease_or_a_new_period_is_not_spent_and_is_given_back() {
        let now = Instant::now();
        let mut l = Ledger::default();
        l.grant(lease(now));
        let later = now + LEASE_TTL;
        assert_eq!(l.take(&NEED, later, 7), None, "expired");
        let out = l.outgoing(later, 7, false);
        assert_eq!(
            (out.return_requests, out.return_tokens, out.budget_delta),
            (2, 100, -100)
        );
        l.grant(lease(now));
        assert_eq!(l.take(&NEED, now, 8), None, "another budget period");
        let out = l.outgoing(now, 8, false);
        assert_eq!(
            out.budget_delta, 0,
            "nothing to give back to an ended period"
        );
        assert_eq!(out.return_requests, 2);
    }

    #[test]
    fn a_live_lease_stays_when_only_corrections_are_flushed() {
        let now = Instant::now();
        let mut l = Ledger::default();
        l.grant(lease(now));
        l.correct(15, 15, 7);
        l.correct(-5, -5, 7);
        let out = l.outgoing(now, 7, false);
        assert_eq!(
            (out.tpm_delta, out.budget_delta, out.return_requests),
            (10, 10, 0)
        );
        assert_eq!(
            l.take(&NEED, now, 7),
            Some(1000),
            "the lease is still there"
        );
    }

    #[test]
    fn a_failed_call_keeps_the_corrections_for_later() {
        let now = Instant::now();
        let mut l = Ledger::default();
        l.correct(30, 30, 7);
        let out = l.outgoing(now, 7, true);
        assert!(l.outgoing(now, 7, true).is_empty());
        l.restore(&out, 7);
        let again = l.outgoing(now, 7, true);
        assert_eq!((again.tpm_delta, again.budget_delta), (30, 30));
        // A correction from an earlier period is dropped.
        l.correct(0, 50, 6);
        assert_eq!(l.outgoing(now, 7, true).budget_delta, 0);
    }

    #[test]
    fn leases_granted_to_concurrent_requests_are_merged_not_lost() {
        let now = Instant::now();
        let mut l = Ledger::default();
        l.grant(lease(now));
        let mut newer = lease(now);
        newer.sec = 1001;
        l.grant(newer);
        let out = l.outgoing(now, 7, true);
        assert_eq!(
            (
                out.return_sec,
                out.return_requests,
                out.return_tokens,
                out.budget_delta
            ),
            (1001, 4, 200, -200)
        );
    }

    #[test]
    fn a_refunded_request_returns_to_its_own_lease_only() {
        let now = Instant::now();
        let mut l = Ledger::default();
        l.grant(lease(now));
        assert_eq!(l.take(&NEED, now, 7), Some(1000));
        assert!(!l.give_back_request(999));
        assert!(l.give_back_request(1000));
        let out = l.outgoing(now, 7, true);
        assert_eq!(out.return_requests, 2);
    }

    #[test]
    fn leases_are_a_small_share_of_the_limit_but_cover_the_request() {
        assert_eq!(lease_size(Some(600), 3, 1), 5);
        assert_eq!(lease_size(Some(600), 100, 1), 1);
        assert_eq!(lease_size(Some(10_000), 1, 2_000), 2_000);
        assert_eq!(lease_size(None, 3, 1), 0);
        assert_eq!(lease_size(Some(100_000_000), 2, 1), 1_250_000);
    }
}
