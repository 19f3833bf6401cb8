//! The JSON the admin API answers with: keys, upstreams, routes and clients as an operator
//! reads them. Built from the pools and limiters; never holds a secret (a key shows its id).

use crate::clients::limits::{period_id, Limiter, Limits, Period};
use crate::key_activity::{ActivityView, KeyActivity};
use crate::keys::{KeyPool, KeyState};
use serde::Serialize;
use std::collections::HashMap;
use std::time::SystemTime;

/// One key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyView {
    /// Its upstream's name.
    pub upstream: String,
    /// Its name.
    pub name: String,
    /// The hash id of its secret.
    pub id: String,
    /// Its account, if configured.
    pub account: Option<String>,
    /// Its weight.
    pub weight: u32,
    /// `config` (read-only: disable, enable and test only) or `runtime` (added through the API).
    pub source: &'static str,
    /// `ready`, `cooling` or `disabled`.
    pub state: &'static str,
    /// Why it is disabled (`manual`, `unauthorized`, …); `null` otherwise.
    pub reason: Option<&'static str>,
    /// The operator's words when it was disabled by hand.
    pub note: Option<String>,
    /// Running cooldowns (also kept while disabled, so they show when it comes back).
    pub cooldowns: Vec<CooldownView>,
    /// Requests using it now.
    pub in_flight: usize,
    /// Requests and errors lately, last use, last error, next probe.
    #[serde(flatten)]
    pub activity: ActivityView,
}

/// One running cooldown of a key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CooldownView {
    /// The model; `null` for every model.
    pub model: Option<String>,
    /// Milliseconds left.
    pub remaining_ms: u64,
}

/// Operators' notes on manually disabled keys, by (upstream, key name).
pub type Notes = HashMap<(String, String), String>;

/// Every key of `pool`, in config order.
pub fn keys(pool: &KeyPool, activity: &KeyActivity, notes: &Notes) -> Vec<KeyView> {
    let upstream = pool.upstream();
    pool.status()
        .into_iter()
        .map(|s| {
            let (state, reason, cooldowns) = match &s.state {
                KeyState::Ready => ("ready", None, Vec::new()),
                KeyState::Cooling { cooldowns } => ("cooling", None, cooldowns.clone()),
                KeyState::Disabled { reason } => ("disabled", Some(reason.as_str()), Vec::new()),
            };
            let note = (reason == Some("manual"))
                .then(|| notes.get(&(upstream.to_string(), s.name.clone())).cloned())
                .flatten();
            KeyView {
                upstream: upstream.to_string(),
                id: pool.key_id(s.index).to_string(),
                name: s.name,
                account: s.account,
                weight: s.weight,
                source: if pool.is_added(s.index) {
                    "runtime"
                } else {
                    "config"
                },
                state,
                reason,
                note,
                cooldowns: cooldowns
                    .into_iter()
                    .map(|c| CooldownView {
                        model: c.model,
                        remaining_ms: u64::try_from(c.remaining.as_millis()).unwrap_or(u64::MAX),
                    })
                    .collect(),
                in_flight: s.in_flight,
                activity: activity.snapshot(s.index),
            }
        })
        .collect()
}

/// One endpoint (resolved address) of an upstream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EndpointView {
    /// `IP:PORT`.
    pub addr: String,
    /// Whether its health check passes (true without checks) and it is in rotation.
    pub healthy: bool,
    /// Whether outlier detection has taken it out for now.
    pub ejected: bool,
}

/// One upstream with its endpoints and keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UpstreamView {
    /// Its name.
    pub name: String,
    /// `openai` or `anthropic`.
    pub api: &'static str,
    /// Its endpoints.
    pub endpoints: Vec<EndpointView>,
    /// Its keys.
    pub keys: Vec<KeyView>,
}

/// `GET /admin/v1/rates`: requests and errors per upstream and minute.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RatesView {
    /// How many minutes each series covers.
    pub minutes: usize,
    /// One entry per upstream, in config order.
    pub upstreams: Vec<UpstreamRates>,
}

/// One upstream's requests and errors per minute, oldest first; the last is the current minute.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UpstreamRates {
    /// The upstream's name.
    pub name: String,
    /// Attempts per minute over all its keys.
    pub requests: Vec<u64>,
    /// Failed attempts per minute over all its keys.
    pub errors: Vec<u64>,
}

/// One route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RouteView {
    /// Its name.
    pub name: String,
    /// Model patterns (empty: any).
    pub models: Vec<String>,
    /// Path prefix, if any.
    pub path_prefix: Option<String>,
    /// Upstream names in fallback order.
    pub upstreams: Vec<String>,
}

/// A client's limits as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LimitsView {
    /// Requests per minute.
    pub rpm: Option<u32>,
    /// Tokens per minute.
    pub tpm: Option<u64>,
    /// Requests at once.
    pub concurrency: Option<u32>,
    /// Budget tokens per period.
    pub budget: Option<u64>,
    /// `day` or `month`.
    pub budget_per: Option<&'static str>,
}

/// One client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClientView {
    /// Its name.
    pub name: String,
    /// Its limits.
    pub limits: LimitsView,
    /// Its requests in flight.
    pub in_flight: u32,
    /// Budget tokens used this period (0 without a budget).
    pub budget_used: u64,
    /// Budget tokens left this period; `null` without a budget.
    pub budget_left: Option<u64>,
}

fn limits_view(l: &Limits) -> LimitsView {
    LimitsView {
        rpm: l.rpm,
        tpm: l.tpm,
        concurrency: l.concurrency,
        budget: l.budget.map(|b| b.tokens),
        budget_per: l.budget.map(|b| match b.per {
            Period::Day => "day",
            Period::Month => "month",
        }),
    }
}

/// A client's view at wall time `now` (a budget saved for an earlier period counts as unused).
pub fn client(name: &str, limiter: &Limiter, now: SystemTime) -> ClientView {
    let limits = *limiter.limits();
    let (period, used) = limiter.budget_used();
    let used = match limits.budget {
        Some(b) if period_id(b.per, now).0 == period => used,
        _ => 0,
    };
    ClientView {
        name: name.to_string(),
        limits: limits_view(&limits),
        in_flight: limiter.in_flight(),
        budget_used: used,
        budget_left: limits.budget.map(|b| b.tokens.saturating_sub(used)),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::clients::limits::Budget;
    use crate::clock::{Clock, ManualClock};
    use crate::key_activity::AttemptEnd;
    use crate::keys::{CooldownPolicy, DisableReason, KeyPolicy, KeySpec};
    use std::time::Duration;

    fn pool() -> KeyPool {
        KeyPool::new(
            "openai",
            vec![
                KeySpec::named("a", "sk-secret-aaaaaaaaaaaa"),
                KeySpec::named("b", "sk-secret-bbbbbbbbbbbb"),
                KeySpec::named("c", "sk-secret-cccccccccccc"),
            ],
            KeyPolicy::RoundRobin,
            CooldownPolicy::default(),
            ManualClock::new(),
        )
    }

    #[test]
    fn key_views_show_state_reason_cooldowns_and_note_but_no_secret() {
        let p = pool();
        p.cool_down(1, "gpt-4o", Some(Duration::from_secs(30)));
        p.disable_manually(2);
        let mut notes = Notes::new();
        notes.insert(("openai".into(), "c".into()), "rotating".into());
        let activity = KeyActivity::new(3, ManualClock::new());
        activity.record(0, AttemptEnd::Answered(200));
        activity.record(1, AttemptEnd::Answered(429));
        let v = keys(&p, &activity, &notes);
        assert_eq!((v[0].activity.requests_1m, v[0].activity.errors_1m), (1, 0));
        assert_eq!((v[1].activity.requests_1m, v[1].activity.errors_1m), (1, 1));
        assert_eq!((v[0].state, v[0].reason), ("ready", None));
        assert_eq!(v[1].state, "cooling");
        assert_eq!(v[1].cooldowns[0].model.as_deref(), Some("gpt-4o"));
        assert!(v[1].cooldowns[0].remaining_ms <= 30_000);
        assert_eq!((v[2].state, v[2].reason), ("disabled", Some("manual")));
        assert_eq!(v[2].note.as_deref(), Some("rotating"));
        assert_eq!(v[0].id, p.key_id(0));
        let json = serde_json::to_string(&v).unwrap();
        assert!(
            json.contains("\"requests_1h\":1"),
            "activity is flattened in: {json}"
        );
        assert!(!json.contains("sk-secret"), "{json}");
        assert!(!json.contains("secret-"), "{json}");
    }

    #[test]
    fn a_note_shows_only_while_the_key_is_manually_disabled() {
        let p = pool();
        p.disable(0, DisableReason::Unauthorized);
        let mut notes = Notes::new();
        notes.insert(("openai".into(), "a".into()), "old".into());
        let v = keys(&p, &KeyActivity::new(3, ManualClock::new()), &notes);
        assert_eq!(v[0].reason, Some("unauthorized"));
        assert_eq!(v[0].note, None);
    }

    #[test]
    fn a_client_view_counts_its_budget_in_the_current_period_only() {
        let clock = ManualClock::new();
        let limits = Limits {
            rpm: Some(60),
            budget: Some(Budget {
                tokens: 1000,
                per: Period::Day,
            }),
            ..Limits::default()
        };
        let now = clock.wall();
        let limiter = Limiter::new(limits, clock);
        limiter.restore_budget(period_id(Period::Day, now).0, 300);
        let v = client("team", &limiter, now);
        assert_eq!((v.budget_used, v.budget_left), (300, Some(700)));
        assert_eq!(v.limits.rpm, Some(60));
        assert_eq!(v.limits.budget_per, Some("day"));
        let later = client("team", &limiter, now + Duration::from_secs(3 * 86_400));
        assert_eq!((later.budget_used, later.budget_left), (0, Some(1000)));
        let free = Limiter::new(Limits::default(), ManualClock::new());
        assert_eq!(client("x", &free, now).budget_left, None);
    }
}
