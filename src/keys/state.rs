//! Per-key state: disabled (with a reason), cooling per model with an exponential backoff, and
//! the number of requests in flight.
//!
//! Everything the pick path reads on a key is an atomic in a compact slot, so scanning takes no
//! lock and touches little memory; only a key cooling for several models at once is looked at
//! under its own small mutex.

use crate::clock::SharedClock;
use parking_lot::Mutex;
use serde::Serialize;
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
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
    /// An operator took the key out through the admin API: only an operator puts it back
    /// (probes leave it alone).
    Manual,
}

impl DisableReason {
    /// Whether probes may bring the key back: every reason but [`DisableReason::Manual`].
    pub fn probes_may_enable(&self) -> bool {
        !matches!(self, Self::Manual)
    }

    /// Whether the prober must try a (1-token) completion to know the key works again.
    ///
    /// Listing models is free, so it succeeds while the quota is still empty; only auth failures
    /// can be probed with `GET /v1/models`.
    pub fn needs_completion_probe(&self) -> bool {
        matches!(self, Self::InsufficientQuota)
    }

    /// The reason named `s` (as [`DisableReason::as_str`] writes it).
    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Unauthorized,
            Self::Forbidden,
            Self::InsufficientQuota,
            Self::Manual,
        ]
        .into_iter()
        .find(|r| r.as_str() == s)
    }

    /// A short stable label, for metrics and JSON.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::InsufficientQuota => "insufficient_quota",
            Self::Manual => "manual",
        }
    }

    // 0 in the atomic means "enabled".
    fn code(self) -> u8 {
        match self {
            Self::Unauthorized => 1,
            Self::Forbidden => 2,
            Self::InsufficientQuota => 3,
            Self::Manual => 4,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(Self::Unauthorized),
            2 => Some(Self::Forbidden),
            3 => Some(Self::InsufficientQuota),
            4 => Some(Self::Manual),
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
            Self::Manual => "manual (admin)",
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
    /// The cooldown after `strikes` earlier cooldown episodes without a success:
    /// `base * 2^strikes`, capped.
    pub fn backoff(&self, strikes: u32) -> Duration {
        // Past 2^31 the product has long exceeded any sane cap; saturate instead of overflowing.
        let factor = 1u32.checked_shl(strikes.min(31)).unwrap_or(u32::MAX);
        self.base
            .checked_mul(factor)
            .unwrap_or(Duration::MAX)
            .min(self.max_backoff)
            .min(self.max)
    }
}

/// The most cooldown entries (one per model, plus one for every model) a key keeps.
///
/// Model names come from clients, so without a cap a client sending made-up names that an
/// upstream answers 429 could grow a key's entries (memory, state-file entries, and the
/// linear scan a pick makes over a key cooling for several models) without bound. 64 is far
/// more models than one key is ever limited on at once. When a new model's 429 finds the key
/// full, the entry that ends soonest goes (an expired one, kept only for its backoff, first):
/// at worst that model gets one more 429, which brings its cooldown back. Falling back to a
/// cooldown for every model instead would let such a client take the key out for everyone.
/// The every-model entry is never evicted: clients do not choose it.
pub const MAX_MODEL_COOLDOWNS: usize = 64;

/// Scope tags of the per-key cooldown summary; a model's tag is its hash, moved off these.
const SCOPE_NONE: u64 = 0;
const SCOPE_ALL: u64 = 1;
const SCOPE_SEVERAL: u64 = 2;

/// Pool-wide facts that per-key operations need: the clock, the epoch times are counted from,
/// and the keyed hasher that turns model names into tags.
pub(super) struct TimeBase {
    pub(super) clock: SharedClock,
    epoch: Instant,
    hasher: RandomState,
}

impl TimeBase {
    pub(super) fn new(clock: SharedClock) -> Self {
        Self {
            epoch: clock.now(),
            clock,
            hasher: RandomState::new(),
        }
    }

    /// Nanoseconds since the pool was made: fits an atomic, and 584 years of headroom.
    fn nanos(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    pub(super) fn now(&self) -> u64 {
        self.nanos(self.clock.now())
    }

    /// The tag of a model scope. Models are compared by a 64-bit SipHash with a random key per
    /// pool, so that the pick path never chases a pointer to a model name; a collision (2^-64
    /// per pair of names, and not steerable by clients, who do not know the key) would at worst
    /// make a key look cooling for the other model.
    fn tag(&self, model: &str) -> u64 {
        if model.is_empty() {
            return SCOPE_ALL;
        }
        let h = self.hasher.hash_one(model);
        if h <= SCOPE_SEVERAL {
            h + 3
        } else {
            h
        }
    }
}

/// What one pick needs to know about time and the model, each computed at most once and only
/// when a key with cooldowns is met: a pick over ready keys neither reads the clock nor hashes.
pub(super) struct Probe<'a> {
    base: &'a TimeBase,
    model: &'a str,
    now: Option<u64>,
    tag: Option<u64>,
}

impl<'a> Probe<'a> {
    pub(super) fn new(base: &'a TimeBase, model: &'a str) -> Self {
        Self {
            base,
            model,
            now: None,
            tag: None,
        }
    }

    fn now(&mut self) -> u64 {
        *self.now.get_or_insert_with(|| self.base.now())
    }

    fn tag(&mut self) -> u64 {
        *self.tag.get_or_insert_with(|| self.base.tag(self.model))
    }
}

/// One model's cooldown on one key.
struct Entry {
    /// [`TimeBase::tag`] of `model`.
    tag: u64,
    /// Empty for "every model"; kept for status.
    model: Box<str>,
    /// Nanoseconds since the pool's epoch.
    until: u64,
    /// Cooldown episodes since the last success for this model: the exponent of the next
    /// backoff (see [`Slot::cool`]).
    strikes: u32,
}

/// What a pick may do with a key, for one model.
pub(super) enum Availability {
    Ready,
    Cooling(Duration),
    Disabled,
}

/// What one 429 did to a key (see [`Slot::cool`] for episodes and strikes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cooled {
    /// How long the key now stays out for that model (zero: not cooling).
    pub remaining: Duration,
    /// Whether this 429 started a cooldown episode, i.e. counted as a strike.
    pub started: bool,
    /// Whether the cooldown moved later.
    pub extended: bool,
    /// The episodes since the last success for that model, this one included if it started one.
    pub strikes: u32,
}

/// A point-in-time view of one of a key's cooldowns, for status.
pub(super) struct CoolingSnapshot {
    pub(super) model: Option<String>,
    pub(super) remaining: Duration,
}

/// What a key is, as opposed to what state it is in; behind a pointer so that the slot array
/// the pick path scans stays small enough for the CPU cache with 100 000 keys.
pub(super) struct KeyInfo {
    pub(super) name: Box<str>,
    pub(super) secret: Secret,
    /// [`super::key_id`] of the secret, computed once.
    pub(super) id: Box<str>,
    pub(super) account: Option<Box<str>>,
    pub(super) weight: u32,
    /// Usually empty, so no allocation; a handful of models when not, and never more than
    /// [`MAX_MODEL_COOLDOWNS`].
    entries: Mutex<Vec<Entry>>,
}

/// One key and its state: 32 bytes of atomics the pick path reads, then the rest by pointer.
///
/// The cooldown entries live behind the key's own mutex; `cool_until` and `cool_scope` summarise
/// them (latest end of a running cooldown, and which model it is for, or "all", or "several") so
/// that a pick decides most keys from the atomics alone, taking the lock only for a key cooling
/// for several models at once. The summary is rewritten under the lock whenever the entries
/// change; a reader racing with that may see one field new and one old, which at worst picks a
/// key that started cooling a moment ago (as an in-flight request would have used it anyway) or
/// skips a key once.
/// The disabled code of a key removed from its pool (no [`DisableReason`] has it).
const REMOVED: u8 = u8::MAX;

pub(super) struct Slot {
    /// 0: enabled; otherwise a [`DisableReason`] code.
    disabled: AtomicU8,
    /// Whether `entries` is non-empty (including expired entries kept for their backoff).
    has_entries: AtomicBool,
    pub(super) in_flight: AtomicU32,
    /// The latest end of a running cooldown, in nanoseconds since the epoch; 0: none.
    cool_until: AtomicU64,
    /// `SCOPE_NONE`, `SCOPE_ALL`, `SCOPE_SEVERAL` or the tag of the one cooling model.
    cool_scope: AtomicU64,
    pub(super) info: Box<KeyInfo>,
}

impl Slot {
    pub(super) fn new(name: String, secret: Secret, account: Option<String>, weight: u32) -> Self {
        Self {
            disabled: AtomicU8::new(0),
            has_entries: AtomicBool::new(false),
            in_flight: AtomicU32::new(0),
            cool_until: AtomicU64::new(0),
            cool_scope: AtomicU64::new(SCOPE_NONE),
            info: Box::new(KeyInfo {
                name: name.into_boxed_str(),
                id: secret.id().into_boxed_str(),
                secret,
                account: account.map(String::into_boxed_str),
                weight,
                entries: Mutex::new(Vec::new()),
            }),
        }
    }

    pub(super) fn disabled_reason(&self) -> Option<DisableReason> {
        DisableReason::from_code(self.disabled.load(Ordering::Acquire))
    }

    /// Whether the key was removed from its pool: out for good, whatever enables it.
    pub(super) fn is_removed(&self) -> bool {
        self.disabled.load(Ordering::Acquire) == REMOVED
    }

    /// Takes the key out for good; false if it already was.
    pub(super) fn remove(&self) -> bool {
        self.disabled.swap(REMOVED, Ordering::AcqRel) != REMOVED
    }

    /// Whether the key may serve the probe's model now, and if cooling, for how much longer.
    pub(super) fn availability(
        &self,
        probe: &mut Probe<'_>,
        policy: &CooldownPolicy,
    ) -> Availability {
        if self.disabled.load(Ordering::Acquire) != 0 {
            return Availability::Disabled;
        }
        let until = self.cool_until.load(Ordering::Acquire);
        if until == 0 {
            return Availability::Ready;
        }
        let now = probe.now();
        if now >= until {
            return Availability::Ready;
        }
        let scope = self.cool_scope.load(Ordering::Acquire);
        if scope == SCOPE_ALL || scope == probe.tag() {
            return Availability::Cooling(Duration::from_nanos(until - now));
        }
        if scope != SCOPE_SEVERAL {
            return Availability::Ready;
        }
        let tag = probe.tag();
        let mut entries = self.info.entries.lock();
        self.prune(&mut entries, policy, now);
        let until = entries
            .iter()
            .filter(|e| e.tag == SCOPE_ALL || e.tag == tag)
            .map(|e| e.until)
            .max()
            .unwrap_or(0);
        if until > now {
            Availability::Cooling(Duration::from_nanos(until - now))
        } else {
            Availability::Ready
        }
    }

    /// Records a 429 for `model` (empty: every model) and starts or extends its cooldown.
    ///
    /// `requested` is what the upstream asked for (capped at `max`; zero means "retry now":
    /// no cooldown, but the strike still counts); `None` applies the exponential backoff.
    ///
    /// Strikes count cooldown *episodes*, not 429s. An episode of a (key, model) starts with a
    /// 429 that arrives while the key is usable for that model, and lasts until the cooldown it
    /// starts ends; only that 429 is a strike (the exponent of the next backoff). A 429 that
    /// arrives while the key is already out for the model (its own cooldown, or one for every
    /// model, still running) answers a request sent before the episode began, since picks skip
    /// cooling keys: it says nothing new about the key, so it adds no strike. It may still
    /// lengthen the episode when it carries a longer `Retry-After` (the upstream's word wins),
    /// but without one it changes nothing. Twenty requests in flight that all come back 429
    /// therefore cost one backoff step, not twenty. A zero cooldown is an episode that ends at
    /// once: the next 429 starts another.
    pub(super) fn cool(
        &self,
        base: &TimeBase,
        model: &str,
        requested: Option<Duration>,
        policy: &CooldownPolicy,
    ) -> Cooled {
        let now = base.now();
        let tag = base.tag(model);
        let mut entries = self.info.entries.lock();
        // Forget a stale backoff before building on it.
        self.prune(&mut entries, policy, now);
        let pos = entries.iter().position(|e| e.tag == tag);
        // How long the key is out for this model already: its own cooldown or an every-model one.
        let out_until = entries
            .iter()
            .filter(|e| e.tag == tag || e.tag == SCOPE_ALL)
            .map(|e| e.until)
            .max()
            .unwrap_or(0);
        let in_episode = out_until > now;
        let strikes = pos.map_or(0, |p| entries[p].strikes);
        let applied = match requested {
            Some(d) => d.min(policy.max),
            None if in_episode => Duration::ZERO,
            None => policy.backoff(strikes),
        };
        let until = now.saturating_add(u64::try_from(applied.as_nanos()).unwrap_or(u64::MAX));
        if in_episode && until <= out_until {
            // A late answer of the running episode that asks for nothing longer: no change.
            return Cooled {
                remaining: Duration::from_nanos(out_until - now),
                started: false,
                extended: false,
                strikes,
            };
        }
        let pos = match pos {
            Some(pos) => pos,
            None => {
                if entries.len() >= MAX_MODEL_COOLDOWNS {
                    evict_soonest(&mut entries);
                }
                entries.push(Entry {
                    tag,
                    model: model.into(),
                    until: 0,
                    strikes: 0,
                });
                entries.len() - 1
            }
        };
        let entry = &mut entries[pos];
        if !in_episode {
            entry.strikes = entry.strikes.saturating_add(1);
        }
        // Never shorten a cooldown: a concurrent request on the same key may come back with a
        // smaller Retry-After than the one that started it.
        let extended = until > entry.until.max(now);
        // Even a zero cooldown moves `until` to now: the backoff is remembered from the last 429.
        entry.until = entry.until.max(until);
        let cooled = Cooled {
            remaining: Duration::from_nanos(entry.until.max(out_until).saturating_sub(now)),
            started: !in_episode,
            extended,
            strikes: entry.strikes,
        };
        self.prune(&mut entries, policy, now);
        cooled
    }

    /// A success for `model`: its backoff (and that of an every-model cooldown) starts over.
    pub(super) fn succeed(&self, probe: &mut Probe<'_>, policy: &CooldownPolicy) {
        if !self.has_entries.load(Ordering::Acquire) {
            return;
        }
        let (now, tag) = (probe.now(), probe.tag());
        let mut entries = self.info.entries.lock();
        for entry in entries.iter_mut() {
            if entry.tag == SCOPE_ALL || entry.tag == tag {
                entry.strikes = 0;
            }
        }
        self.prune(&mut entries, policy, now);
    }

    /// Drops entries that carry nothing any more, and rewrites the summary atomics.
    ///
    /// An entry goes when its cooldown is over and either its backoff was reset by a success, or
    /// it ended a whole `max_backoff` ago: without the latter, a key that got a 429 for a model
    /// nobody asks for again would keep the entry forever; a key quiet that long starts over
    /// from `base`, as a fresh key would.
    fn prune(&self, entries: &mut Vec<Entry>, policy: &CooldownPolicy, now: u64) {
        let forget = u64::try_from(policy.max_backoff.as_nanos()).unwrap_or(u64::MAX);
        entries
            .retain(|e| e.until > now || (e.strikes > 0 && now < e.until.saturating_add(forget)));
        if entries.is_empty() {
            // Give the memory back: after a burst of 429s across 100k keys, this is most of it.
            *entries = Vec::new();
        }
        let mut running = entries.iter().filter(|e| e.until > now);
        let (until, scope) = match (running.next(), running.next()) {
            (None, _) => (0, SCOPE_NONE),
            (Some(e), None) => (e.until, e.tag),
            (Some(_), Some(_)) => {
                let latest = entries.iter().map(|e| e.until).max().unwrap_or(0);
                (latest, SCOPE_SEVERAL)
            }
        };
        // Scope first: a reader that sees the new end also sees what it is for.
        self.cool_scope.store(scope, Ordering::Release);
        self.cool_until.store(until, Ordering::Release);
        self.has_entries
            .store(!entries.is_empty(), Ordering::Release);
    }

    /// Takes the key out for every model; false if it already was (the first reason stays).
    pub(super) fn disable(&self, reason: DisableReason) -> bool {
        self.disabled
            .compare_exchange(0, reason.code(), Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Takes the key out for `reason` whatever it was out for before; the previous reason.
    pub(super) fn force_disable(&self, reason: DisableReason) -> Option<DisableReason> {
        let before = self.swap_unless_removed(reason.code());
        DisableReason::from_code(before)
    }

    /// Puts the key back only if it is out for `reason`; true if it was.
    pub(super) fn enable_if(&self, reason: DisableReason) -> bool {
        self.disabled
            .compare_exchange(reason.code(), 0, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Puts the key back; the reason it was out, or `None` if it was not.
    pub(super) fn enable(&self) -> Option<DisableReason> {
        DisableReason::from_code(self.swap_unless_removed(0))
    }

    /// Sets the disabled code to `code` unless the key was removed; the code before.
    fn swap_unless_removed(&self, code: u8) -> u8 {
        match self
            .disabled
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| {
                (c != REMOVED).then_some(code)
            }) {
            Ok(before) | Err(before) => before,
        }
    }

    /// The cooldowns running at `now`.
    pub(super) fn cooling(&self, now: u64) -> Vec<CoolingSnapshot> {
        if !self.is_cooling(now) {
            return Vec::new();
        }
        self.info
            .entries
            .lock()
            .iter()
            .filter(|e| e.until > now)
            .map(|e| CoolingSnapshot {
                model: (!e.model.is_empty()).then(|| e.model.to_string()),
                remaining: Duration::from_nanos(e.until - now),
            })
            .collect()
    }

    /// Whether any cooldown is running at `now`, for any model.
    pub(super) fn is_cooling(&self, now: u64) -> bool {
        self.cool_until.load(Ordering::Acquire) > now
    }
}

/// Makes room for one entry: drops the model entry that ends soonest (see
/// [`MAX_MODEL_COOLDOWNS`]).
fn evict_soonest(entries: &mut Vec<Entry>) {
    let soonest = entries
        .iter()
        .enumerate()
        .filter(|(_, e)| e.tag != SCOPE_ALL)
        .min_by_key(|(_, e)| e.until)
        .map(|(i, _)| i);
    if let Some(i) = soonest {
        entries.swap_remove(i);
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
            DisableReason::Manual,
        ] {
            assert_eq!(DisableReason::from_code(r.code()), Some(r));
            assert_eq!(DisableReason::parse(r.as_str()), Some(r));
        }
    }

    #[test]
    fn only_an_operator_brings_back_a_manually_disabled_key() {
        assert_eq!(DisableReason::Manual.as_str(), "manual");
        assert_eq!(DisableReason::Manual.to_string(), "manual (admin)");
        assert!(!DisableReason::Manual.probes_may_enable());
        assert!(DisableReason::Unauthorized.probes_may_enable());
        assert!(!DisableReason::Manual.needs_completion_probe());
    }
}
