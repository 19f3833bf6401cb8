//! Per-key state: disabled (with a reason), cooling per model with an exponential backoff, and
//! the number of requests in flight.
//!
//! Everything the pick path reads on a key that is ready is an atomic, so scanning past ready
//! keys takes no lock; only keys with cooldown entries lock their own small mutex.

use crate::clock::Clock;
use parking_lot::Mutex;
use serde::Serialize;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::secret::Secret;

/// Why a key was taken out of rotation for every model until it is re-enabled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DisableReason {
    /// The upstream answered 401: the key is wrong or revoked.
    Unauthorized,
    /// The upstream answered 403: the key may not use this upstream (or region, or model).
    Forbidden,
    /// A 429 whose error code is `insufficient_quota` or `billing_not_active`.
    InsufficientQuota,
}

impl DisableReason {
    /// Whether the prober must try a (1-token) completion to know the key works again.
    ///
    /// Listing models is free, so it succeeds while the quota is still empty; only auth failures
    /// can be probed with `GET /v1/models`.
    pub fn needs_completion_probe(&self) -> bool {
        matches!(self, Self::InsufficientQuota)
    }

    /// A short stable label, for metrics and JSON.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::InsufficientQuota => "insufficient_quota",
        }
    }

    // 0 in the atomic means "enabled".
    fn code(self) -> u8 {
        match self {
            Self::Unauthorized => 1,
            Self::Forbidden => 2,
            Self::InsufficientQuota => 3,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(Self::Unauthorized),
            2 => Some(Self::Forbidden),
            3 => Some(Self::InsufficientQuota),
            _ => None,
        }
    }
}

impl fmt::Display for DisableReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Unauthorized => "unauthorized (401)",
            Self::Forbidden => "forbidden (403)",
            Self::InsufficientQuota => "insufficient quota (429)",
        })
    }
}

/// How long a key cools down after a 429.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CooldownPolicy {
    /// The first cooldown when the upstream did not say how long to wait.
    pub base: Duration,
    /// The cap of the doubling cooldown when the upstream did not say how long to wait.
    pub max_backoff: Duration,
    /// The cap of any cooldown, including one the upstream asked for.
    pub max: Duration,
}

impl Default for CooldownPolicy {
    fn default() -> Self {
        Self {
            base: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            max: Duration::from_secs(300),
        }
    }
}

impl CooldownPolicy {
    /// The cooldown after `strikes` earlier 429s without a success: `base * 2^strikes`, capped.
    pub fn backoff(&self, strikes: u32) -> Duration {
        // Past 2^31 the product has long exceeded any sane cap; saturate instead of overflowing.
        let factor = 1u32.checked_shl(strikes.min(31)).unwrap_or(u32::MAX);
        self.base
            .checked_mul(factor)
            .unwrap_or(Duration::MAX)
            .min(self.max_backoff)
            .min(self.max)
    }

    /// How long an expired cooldown entry is remembered for its backoff.
    ///
    /// Without this, a key that got a 429 for a model nobody asks for again would keep an entry
    /// forever; a key that stayed quiet for a whole `max_backoff` after its cooldown starts over
    /// from `base`, which is what a fresh key would get.
    fn forget_after(&self) -> Duration {
        self.max_backoff
    }
}

/// `now()` read at most once per operation, and only when a cooldown has to be compared: the
/// common pick over ready keys never reads the clock.
pub(super) struct LazyNow<'a> {
    clock: &'a dyn Clock,
    now: Option<Instant>,
}

impl<'a> LazyNow<'a> {
    pub(super) fn new(clock: &'a dyn Clock) -> Self {
        Self { clock, now: None }
    }

    pub(super) fn get(&mut self) -> Instant {
        *self.now.get_or_insert_with(|| self.clock.now())
    }
}

/// One model's cooldown on one key. `model` is empty for "every model".
struct Entry {
    model: Box<str>,
    until: Instant,
    /// 429s since the last success for this model: the exponent of the next backoff.
    strikes: u32,
}

/// What a pick may do with a key, for one model.
pub(super) enum Availability {
    Ready,
    Cooling(Duration),
    Disabled,
}

/// The result of a 429 on a key.
pub(super) struct Cooled {
    /// How long the key now stays out for that model (zero: not cooling).
    pub(super) remaining: Duration,
    /// Whether the cooldown moved later, i.e. whether this is worth a log line.
    pub(super) extended: bool,
    /// The consecutive 429s, this one included.
    pub(super) strikes: u32,
}

/// A point-in-time view of one key's cooldowns, for status.
pub(super) struct CoolingSnapshot {
    pub(super) model: Option<String>,
    pub(super) remaining: Duration,
}

/// One key and its state.
pub(super) struct Slot {
    pub(super) name: Box<str>,
    pub(super) secret: Secret,
    pub(super) account: Option<Box<str>>,
    pub(super) weight: u32,
    /// 0: enabled; otherwise a [`DisableReason`] code.
    disabled: AtomicU8,
    /// Whether `cooldowns` may be non-empty: lets picks skip the lock for the ~all keys that
    /// have never seen a 429. Written only under the lock; a stale read at worst picks a key
    /// that started cooling a moment ago, as an in-flight request would have used it anyway.
    has_cooldowns: AtomicBool,
    pub(super) in_flight: AtomicUsize,
    /// Usually empty, so no allocation; a handful of models at most when not.
    cooldowns: Mutex<Vec<Entry>>,
}

impl Slot {
    pub(super) fn new(name: String, secret: Secret, account: Option<String>, weight: u32) -> Self {
        Self {
            name: name.into_boxed_str(),
            secret,
            account: account.map(String::into_boxed_str),
            weight,
            disabled: AtomicU8::new(0),
            has_cooldowns: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            cooldowns: Mutex::new(Vec::new()),
        }
    }

    pub(super) fn disabled_reason(&self) -> Option<DisableReason> {
        DisableReason::from_code(self.disabled.load(Ordering::Acquire))
    }

    /// Whether the key may serve `model` now, and if cooling, for how much longer.
    pub(super) fn availability(
        &self,
        model: &str,
        policy: &CooldownPolicy,
        now: &mut LazyNow<'_>,
    ) -> Availability {
        if self.disabled.load(Ordering::Acquire) != 0 {
            return Availability::Disabled;
        }
        if !self.has_cooldowns.load(Ordering::Acquire) {
            return Availability::Ready;
        }
        let now = now.get();
        let mut entries = self.cooldowns.lock();
        self.prune(&mut entries, policy, now);
        let remaining = entries
            .iter()
            .filter(|e| e.model.is_empty() || &*e.model == model)
            .filter_map(|e| e.until.checked_duration_since(now))
            .filter(|d| !d.is_zero())
            .max();
        match remaining {
            Some(d) => Availability::Cooling(d),
            None => Availability::Ready,
        }
    }

    /// Records a 429 for `model` (empty: every model) and starts or extends its cooldown.
    ///
    /// `requested` is what the upstream asked for (capped at `max`; zero means "retry now":
    /// no cooldown, but the strike still counts); `None` applies the exponential backoff.
    pub(super) fn cool(
        &self,
        model: &str,
        requested: Option<Duration>,
        policy: &CooldownPolicy,
        now: Instant,
    ) -> Cooled {
        let mut entries = self.cooldowns.lock();
        self.prune(&mut entries, policy, now);
        let pos = match entries.iter().position(|e| &*e.model == model) {
            Some(pos) => pos,
            None => {
                entries.push(Entry {
                    model: model.into(),
                    until: now,
                    strikes: 0,
                });
                self.has_cooldowns.store(true, Ordering::Release);
                entries.len() - 1
            }
        };
        let entry = &mut entries[pos];
        let applied = match requested {
            Some(d) => d.min(policy.max),
            None => policy.backoff(entry.strikes),
        };
        entry.strikes = entry.strikes.saturating_add(1);
        // Never shorten a cooldown: a concurrent request on the same key may come back with a
        // smaller Retry-After than the one that started it.
        let until = now.checked_add(applied).unwrap_or(entry.until);
        let extended = until > entry.until && !applied.is_zero();
        if extended {
            entry.until = until;
        }
        Cooled {
            remaining: entry.until.saturating_duration_since(now),
            extended,
            strikes: entry.strikes,
        }
    }

    /// A success for `model`: its backoff (and that of an every-model cooldown) starts over.
    pub(super) fn succeed(&self, model: &str, policy: &CooldownPolicy, now: &mut LazyNow<'_>) {
        if !self.has_cooldowns.load(Ordering::Acquire) {
            return;
        }
        let now = now.get();
        let mut entries = self.cooldowns.lock();
        for entry in entries.iter_mut() {
            if entry.model.is_empty() || &*entry.model == model {
                entry.strikes = 0;
            }
        }
        // An expired entry without strikes carries nothing; a still-running cooldown (started
        // by a request that overlapped this one) is kept until it ends.
        entries.retain(|e| e.strikes > 0 || e.until > now);
        self.prune(&mut entries, policy, now);
    }

    /// Drops entries whose cooldown ended long enough ago to forget their backoff.
    fn prune(&self, entries: &mut Vec<Entry>, policy: &CooldownPolicy, now: Instant) {
        let forget = policy.forget_after();
        entries.retain(|e| match e.until.checked_add(forget) {
            Some(stale_at) => now < stale_at,
            None => true,
        });
        if entries.is_empty() {
            // Give the memory back: after a burst of 429s across 100k keys, this is most of it.
            *entries = Vec::new();
            self.has_cooldowns.store(false, Ordering::Release);
        }
    }

    /// Takes the key out for every model; false if it already was (the first reason stays).
    pub(super) fn disable(&self, reason: DisableReason) -> bool {
        self.disabled
            .compare_exchange(0, reason.code(), Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Puts the key back; the reason it was out, or `None` if it was not.
    pub(super) fn enable(&self) -> Option<DisableReason> {
        DisableReason::from_code(self.disabled.swap(0, Ordering::AcqRel))
    }

    /// The cooldowns running now.
    pub(super) fn cooling(&self, now: Instant) -> Vec<CoolingSnapshot> {
        if !self.has_cooldowns.load(Ordering::Acquire) {
            return Vec::new();
        }
        self.cooldowns
            .lock()
            .iter()
            .filter(|e| e.until > now)
            .map(|e| CoolingSnapshot {
                model: (!e.model.is_empty()).then(|| e.model.to_string()),
                remaining: e.until - now,
            })
            .collect()
    }

    /// Whether any cooldown is running now, for any model.
    pub(super) fn is_cooling(&self, now: Instant) -> bool {
        self.has_cooldowns.load(Ordering::Acquire)
            && self.cooldowns.lock().iter().any(|e| e.until > now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_base_and_saturates_at_the_caps() {
        let p = CooldownPolicy::default();
        assert_eq!(p.backoff(0), Duration::from_secs(1));
        assert_eq!(p.backoff(1), Duration::from_secs(2));
        assert_eq!(p.backoff(5), Duration::from_secs(32));
        assert_eq!(p.backoff(6), Duration::from_secs(60));
        assert_eq!(p.backoff(u32::MAX), Duration::from_secs(60));
        let tight = CooldownPolicy {
            max: Duration::from_secs(10),
            ..p
        };
        assert_eq!(tight.backoff(6), Duration::from_secs(10));
        let huge = CooldownPolicy {
            base: Duration::MAX,
            max_backoff: Duration::MAX,
            max: Duration::MAX,
        };
        assert_eq!(huge.backoff(40), Duration::MAX);
    }

    #[test]
    fn disable_reason_labels_and_probe_kind() {
        assert_eq!(
            DisableReason::Unauthorized.to_string(),
            "unauthorized (401)"
        );
        assert_eq!(DisableReason::Forbidden.to_string(), "forbidden (403)");
        assert_eq!(
            DisableReason::InsufficientQuota.to_string(),
            "insufficient quota (429)"
        );
        assert!(DisableReason::InsufficientQuota.needs_completion_probe());
        assert!(!DisableReason::Unauthorized.needs_completion_probe());
        assert!(!DisableReason::Forbidden.needs_completion_probe());
        for r in [
            DisableReason::Unauthorized,
            DisableReason::Forbidden,
            DisableReason::InsufficientQuota,
        ] {
            assert_eq!(DisableReason::from_code(r.code()), Some(r));
        }
    }
}
