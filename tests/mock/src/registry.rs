//! The process-wide table of listed keys: looks a key up, counts the request and decides.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::behavior::{Behavior, KeyState};
use crate::limits::Verdict;

/// What to do with one request, as decided by its key.
#[derive(Debug, Clone)]
pub enum Action {
    /// Serve the endpoint normally.
    Serve,
    /// The key is not listed and `--strict` is on: 401 `invalid_api_key`.
    UnknownKey,
    /// Answer as the behaviour's mode says.
    Misbehave(Arc<Behavior>),
}

/// An action plus the delay before the response header.
#[derive(Debug, Clone)]
pub struct Decision {
    /// What to answer.
    pub action: Action,
    /// How long to wait before answering.
    pub latency: Duration,
}

/// Listed keys, their counters, and what unlisted keys get.
pub struct Registry {
    strict: bool,
    default_latency: Duration,
    startup: Vec<(String, Arc<Behavior>)>,
    live: Mutex<HashMap<String, KeyState>>,
    /// How long a limit's minute lasts in real time (`--time-scale`).
    minute: Duration,
}

impl Registry {
    /// A registry holding `keys` (a later duplicate wins), started at `now`.
    pub fn new(
        keys: Vec<(String, Behavior)>,
        strict: bool,
        default_latency: Duration,
        now: Instant,
    ) -> Self {
        let startup: Vec<(String, Arc<Behavior>)> =
            keys.into_iter().map(|(k, b)| (k, Arc::new(b))).collect();
        let registry = Registry {
            strict,
            default_latency,
            startup,
            live: Mutex::new(HashMap::new()),
            minute: Duration::from_secs(60),
        };
        registry.reset(now, true);
        registry
    }

    /// Counts one request of `key` for `model` and decides what it gets.
    pub fn decide(&self, key: &str, model: Option<&str>, now: Instant) -> Decision {
        let mut live = self.live.lock();
        let Some(state) = live.get_mut(key) else {
            drop(live);
            let action = if self.strict {
                Action::UnknownKey
            } else {
                Action::Serve
            };
            return Decision {
                action,
                latency: self.default_latency,
            };
        };
        let misbehaves = state.on_request(model, now);
        let behavior = &state.behavior;
        let latency = behavior.latency.unwrap_or(self.default_latency);
        let action = if misbehaves {
            Action::Misbehave(Arc::clone(behavior))
        } else {
            Action::Serve
        };
        Decision { action, latency }
    }

    /// The same registry with limits counted over `minute` of real time instead of 60 s.
    pub fn with_minute(mut self, minute: Duration) -> Self {
        self.minute = minute.max(Duration::from_millis(1));
        self
    }

    /// Counts a request of `key` costing `tokens` against the key's limits; `None` when the key
    /// has none (or is not listed).
    pub fn admit(&self, key: &str, tokens: u64, now: Instant) -> Option<Verdict> {
        let mut live = self.live.lock();
        let state = live.get_mut(key)?;
        let limits = state.behavior.limits?;
        Some(state.window.admit(limits, tokens, now, self.minute))
    }

    /// Spends `requests` and `tokens` of `key`'s current minute, as traffic that does not come
    /// through the gateway under test would. False when the key has no limits.
    pub fn consume(&self, key: &str, requests: u64, tokens: u64, now: Instant) -> bool {
        let mut live = self.live.lock();
        let Some(state) = live.get_mut(key).filter(|s| s.behavior.limits.is_some()) else {
            return false;
        };
        state.window.consume(requests, tokens, now, self.minute);
        true
    }

    /// Restarts every key's `first`/`window`; with `restore`, also puts back the start-up
    /// behaviours (dropping keys added and undoing changes made at run time).
    pub fn reset(&self, now: Instant, restore: bool) {
        let mut live = self.live.lock();
        if restore {
            live.clear();
            for (key, behavior) in &self.startup {
                live.insert(key.clone(), KeyState::new(Arc::clone(behavior), now));
            }
        } else {
            for state in live.values_mut() {
                state.restart(now);
            }
        }
    }

    /// Sets (or with `None` removes, making it unlisted) one key's behaviour; its `first`/`window`
    /// start over from `now`.
    pub fn set(&self, key: &str, behavior: Option<Behavior>, now: Instant) {
        let mut live = self.live.lock();
        match behavior {
            Some(b) => {
                live.insert(key.to_string(), KeyState::new(Arc::new(b), now));
            }
            None => {
                live.remove(key);
            }
        }
    }

    /// Every listed key with its behaviour in the inline grammar, sorted by key.
    pub fn snapshot(&self) -> Vec<(String, String)> {
        let live = self.live.lock();
        let mut out: Vec<(String, String)> = live
            .iter()
            .map(|(k, s)| (k.clone(), s.behavior.to_string()))
            .collect();
        drop(live);
        out.sort();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::parse_inline;

    fn registry(strict: bool) -> (Registry, Instant) {
        let now = Instant::now();
        let keys = vec![
            (
                "sk-b".to_string(),
                parse_inline("429:first=2").expect("spec"),
            ),
            (
                "sk-g".to_string(),
                parse_inline("ok:latency=50ms").expect("spec"),
            ),
        ];
        (
            Registry::new(keys, strict, Duration::from_millis(5), now),
            now,
        )
    }

    fn misbehaves(d: &Decision) -> bool {
        matches!(d.action, Action::Misbehave(_))
    }

    #[test]
    fn limits_count_per_key_over_the_scaled_minute_and_reset_starts_over() {
        let now = Instant::now();
        let keys = vec![(
            "sk-l".to_string(),
            parse_inline("limit:rpm=2").expect("spec"),
        )];
        let r = Registry::new(keys, false, Duration::ZERO, now).with_minute(Duration::from_secs(1));
        assert!(r.admit("sk-g", 1, now).is_none(), "unlisted: no limits");
        assert!(r.admit("sk-l", 1, now).is_some_and(|v| v.admitted));
        assert!(r.consume("sk-l", 1, 0, now));
        assert!(r.admit("sk-l", 1, now).is_some_and(|v| !v.admitted));
        let later = now + Duration::from_secs(1);
        assert!(r.admit("sk-l", 1, later).is_some_and(|v| v.admitted));
        assert!(r.admit("sk-l", 1, later).is_some_and(|v| v.admitted));
        r.reset(later, false);
        assert!(r.admit("sk-l", 1, later).is_some_and(|v| v.admitted));
        assert!(!r.consume("sk-zz", 1, 0, now));
    }

    #[test]
    fn unknown_keys_follow_strict() {
        let (r, now) = registry(false);
        assert!(matches!(r.decide("sk-zz", None, now).action, Action::Serve));
        let (r, now) = registry(true);
        assert!(matches!(
            r.decide("sk-zz", None, now).action,
            Action::UnknownKey
        ));
    }

    #[test]
    fn latency_per_key_overrides_default() {
        let (r, now) = registry(false);
        assert_eq!(
            r.decide("sk-g", None, now).latency,
            Duration::from_millis(50)
        );
        assert_eq!(
            r.decide("sk-b", None, now).latency,
            Duration::from_millis(5)
        );
        assert_eq!(
            r.decide("other", None, now).latency,
            Duration::from_millis(5)
        );
    }

    #[test]
    fn reset_restarts_first_and_set_changes_behaviour() {
        let (r, now) = registry(false);
        assert!(misbehaves(&r.decide("sk-b", None, now)));
        assert!(misbehaves(&r.decide("sk-b", None, now)));
        assert!(!misbehaves(&r.decide("sk-b", None, now)));
        r.reset(now, false);
        assert!(misbehaves(&r.decide("sk-b", None, now)));

        r.set("sk-b", Some(Behavior::ok()), now);
        assert!(!misbehaves(&r.decide("sk-b", None, now)));
        r.reset(now, false);
        assert!(
            !misbehaves(&r.decide("sk-b", None, now)),
            "run-time change kept"
        );
        r.reset(now, true);
        assert!(
            misbehaves(&r.decide("sk-b", None, now)),
            "start-up restored"
        );

        r.set("sk-b", None, now);
        assert_eq!(r.snapshot().len(), 1);
    }
}
