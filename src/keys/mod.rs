//! The keys of one upstream, their state, and the choice of a key for each request attempt.
//!
//! [`KeyPool`] is the one type behind which key state lives, so that a store shared across
//! instances can replace it later. It is shared by every worker thread and called once per
//! attempt, so:
//! - a pick allocates nothing and takes no lock: each key's state is summarised in a 32-byte
//!   slot of atomics (100 000 keys fit in the CPU cache), and the clock is read and the model
//!   hashed only when a key with a cooldown is met;
//! - under [`KeyPolicy::Headroom`], a pick also reads each usable key's headroom (see
//!   `headroom.rs`): one atomic load for a key that never reported its limits, that key's own
//!   small mutex for one that did; still no allocation;
//! - each key's cooldown entries sit behind that key's own small mutex, never a pool-wide one,
//!   and are capped at [`MAX_MODEL_COOLDOWNS`] whatever model names clients send;
//! - the rotation cursor moves just past the key it picked, so a run of cooling keys is scanned
//!   once per lap rather than once per pick: a pick costs O(1) on average whatever the number of
//!   keys (measured: 10 and 100 000 keys with a third cooling pick in the same ~20–60 ns), and
//!   scans every position at most once when nothing is usable.
//! - prompt affinity ([`KeyPool::pick_affine`], in `affinity.rs`) is the exception: it scores
//!   every live key (rendezvous hashing), O(keys) per pick, still without allocating or locking
//!   (measured: 0.13 µs with 10 keys, 0.6 µs with 100, 2.6 µs with 500); fine up to a few
//!   hundred keys.
//!
//! Cooldowns are per (key, model) because OpenAI's rate limits are per organisation *and per
//! model*: a 429 for `gpt-4o` leaves the key usable for `gpt-4o-mini`. They expire by comparison
//! with the clock on read; there is no cleanup task. The backoff grows once per cooldown
//! *episode*, not per 429: the 429s of requests already in flight when a key started cooling
//! add nothing (see [`KeyPool::on_rate_limit`]).

mod affinity;
mod headroom;
mod policy;
mod secret;
mod state;

#[cfg(test)]
mod tests;

pub use affinity::Affinity;
pub use headroom::{RateReport, Reported, MAX_MODEL_HEADROOMS};
pub use policy::KeyPolicy;
pub use secret::{key_id, Secret};
pub use state::{CooldownPolicy, Cooled, DisableReason, MAX_MODEL_COOLDOWNS};

use crate::append_only::AppendOnly;
use crate::clock::SharedClock;
use arc_swap::ArcSwap;
use headroom::Headroom;
use log::{debug, info};
use parking_lot::{Mutex, RwLock};
use rand::Rng;
use serde::{Serialize, Serializer};
use state::{Availability, Probe, Slot, TimeBase};
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// The position of a key in its pool: its place in the list given to [`KeyPool::new`], then
/// in the order [`KeyPool::add`] added keys. A removed key keeps its index (never reused).
pub type KeyIndex = usize;

/// The model scope of a cooldown that applies to every model: a 429 on a request that names no
/// model. Picking for it only avoids keys cooling for every model.
pub const ALL_MODELS: &str = "";

/// How many random draws [`KeyPolicy::Random`] makes before scanning, when draws keep landing
/// on unusable keys: with a third of the keys cooling, 16 misses in a row happen once in 40
/// million picks.
const RANDOM_DRAWS: usize = 16;

/// A change of a key's state made by this instance, told to a store shared with other
/// instances (changes applied from such a store are not told again).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyChange {
    /// A cooldown for `model` ([`ALL_MODELS`]: every model) started or grew to `remaining`.
    Cooled {
        /// The model scope.
        model: String,
        /// How long it runs from now.
        remaining: Duration,
    },
    /// Taken out until a probe passes.
    Disabled(DisableReason),
    /// Back in rotation.
    Enabled,
}

/// Told of every [`KeyChange`] this instance makes, with the key's index. Called on the thread
/// that made the change, so it must only hand the change on (to a channel), never wait.
pub type KeyObserver = Arc<dyn Fn(KeyIndex, &KeyChange) + Send + Sync>;

/// One key as configured.
#[derive(Debug, Clone)]
pub struct KeySpec {
    /// The name in logs, metrics and status; [`key_id`] of the secret when the config has none.
    pub name: String,
    /// The credential.
    pub secret: Secret,
    /// The share of picks under [`KeyPolicy::Weighted`] (0 counts as 1); ignored otherwise.
    pub weight: u32,
    /// The organisation/account the key belongs to: keys of one account share its rate limits.
    pub account: Option<String>,
    /// The `OpenAI-Organization` header value to send with this key, if any.
    pub organization: Option<String>,
    /// The `OpenAI-Project` header value to send with this key, if any.
    pub project: Option<String>,
}

impl KeySpec {
    /// A key with this name and secret, weight 1, no account.
    pub fn named(name: impl Into<String>, secret: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            secret: Secret::new(secret.into()),
            weight: 1,
            account: None,
            organization: None,
            project: None,
        }
    }

    /// A key named after its secret's hash, weight 1, no account.
    pub fn from_secret(secret: Secret) -> Self {
        Self {
            name: secret.id(),
            secret,
            weight: 1,
            account: None,
            organization: None,
            project: None,
        }
    }
}

/// Why [`KeyPool::add`] refused a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddKeyError {
    /// A key of that name is in the pool.
    #[error("upstream {upstream} already has a key named {name}")]
    NameTaken {
        /// The upstream.
        upstream: String,
        /// The name.
        name: String,
    },
    /// The same secret is in the pool under another name.
    #[error("upstream {upstream} already has this secret, as key {name}")]
    SecretTaken {
        /// The upstream.
        upstream: String,
        /// The name of the key holding it.
        name: String,
    },
}

/// The outcome of [`KeyPool::pick`].
#[derive(Debug)]
pub enum Pick {
    /// Use this key; keep the lease for as long as the request is in flight.
    Key(KeyLease),
    /// Every key not disabled is cooling for this model: answer 429 with `Retry-After`.
    AllCooling {
        /// The shortest remaining cooldown among the cooling keys.
        retry_in: Duration,
    },
    /// Every key is disabled (or the pool is empty): answer 503.
    AllDisabled,
    /// Usable keys remain, but the caller has already tried all of them in this request: pass
    /// the last upstream answer through.
    Exhausted,
}

/// A key chosen for one attempt. Counts as in flight (for [`KeyPolicy::LeastInFlight`] and
/// status) until dropped.
pub struct KeyLease {
    pool: Arc<Inner>,
    idx: KeyIndex,
}

impl KeyLease {
    /// The key's index in its pool, for [`KeyPool::cool_down`] and the caller's exclude list.
    pub fn index(&self) -> KeyIndex {
        self.idx
    }

    /// The key's name.
    pub fn name(&self) -> &str {
        &self.slot().info.name
    }

    /// The credential to send.
    pub fn secret(&self) -> &Secret {
        &self.slot().info.secret
    }

    /// The key's account, if configured.
    pub fn account(&self) -> Option<&str> {
        self.slot().info.account.as_deref()
    }

    fn slot(&self) -> &Slot {
        // A lease is only made for an index of its pool, and pools never shrink.
        &self.pool.slots[self.idx]
    }
}

impl Drop for KeyLease {
    fn drop(&mut self) {
        self.slot().in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl fmt::Debug for KeyLease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyLease")
            .field("upstream", &&*self.pool.upstream)
            .field("index", &self.idx)
            .field("name", &self.name())
            .finish()
    }
}

/// A key's state, for metrics, the admin status and the state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyStatus {
    /// The key's index in its pool.
    pub index: KeyIndex,
    /// The key's name.
    pub name: String,
    /// The key's account, if configured.
    pub account: Option<String>,
    /// The configured weight.
    pub weight: u32,
    /// Ready, cooling, or disabled.
    #[serde(flatten)]
    pub state: KeyState,
    /// Leases outstanding.
    pub in_flight: usize,
}

/// Where a key stands now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum KeyState {
    /// Usable for every model.
    Ready,
    /// Out for some models (or all of them) for a while; usable for the others.
    Cooling {
        /// One entry per model scope that is cooling.
        cooldowns: Vec<ModelCooldown>,
    },
    /// Out for every model until re-enabled; disabling wins over cooling.
    Disabled {
        /// Why.
        reason: DisableReason,
    },
}

/// One running cooldown of a key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelCooldown {
    /// The model it applies to; `None` for every model.
    pub model: Option<String>,
    /// Time left.
    #[serde(rename = "remaining_ms", serialize_with = "as_millis")]
    pub remaining: Duration,
}

fn as_millis<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// How many keys are in each state, for a gauge. A key cooling for any model counts as cooling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct StateCounts {
    /// Neither disabled nor cooling for any model.
    pub ready: usize,
    /// Cooling for at least one model, not disabled.
    pub cooling: usize,
    /// Disabled.
    pub disabled: usize,
}

/// Keeps the cursor on its own cache line: every pick on every thread writes it, and it must not
/// drag the pool's read-only fields along.
#[repr(align(64))]
struct CachePadded<T>(T);

struct Inner {
    upstream: Box<str>,
    /// The configured keys, then those added at run time; removed ones stay, marked removed.
    slots: AppendOnly<Slot>,
    policy: KeyPolicy,
    cooldown: CooldownPolicy,
    time: TimeBase,
    /// The next position to try: in `ring` for the weighted policy, in `slots` otherwise.
    cursor: CachePadded<AtomicUsize>,
    /// The weighted order, rebuilt when keys are added or removed; empty for the other
    /// policies (which never load it).
    ring: ArcSwap<Vec<usize>>,
    /// Each account's live keys.
    accounts: RwLock<HashMap<Box<str>, Vec<KeyIndex>>>,
    /// The live keys' seeds and weights for prompt affinity ([`KeyPool::pick_affine`]).
    rendezvous: ArcSwap<affinity::Rendezvous>,
    /// Makes additions and removals take turns.
    changes: Mutex<()>,
    /// Set once at start when a shared store is configured.
    observer: OnceLock<KeyObserver>,
    /// What each key has left of its upstream's rate limits.
    headroom: Headroom,
    /// Whether a key about to run out rests before the upstream refuses it.
    rest_before_limit: bool,
}

/// The keys of one upstream and their state; picks one per request attempt.
///
/// Cheap to clone (a handle); `Send + Sync`.
#[derive(Clone)]
pub struct KeyPool {
    inner: Arc<Inner>,
}

impl fmt::Debug for KeyPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Names only: a derived Debug would reach the secrets (redacted, but still).
        f.debug_struct("KeyPool")
            .field("upstream", &&*self.inner.upstream)
            .field("keys", &self.inner.slots.len())
            .field("policy", &self.inner.policy)
            .finish_non_exhaustive()
    }
}

/// How one key looks to one pick.
enum Class {
    Usable,
    /// Usable, but the caller already tried it.
    Excluded,
    Cooling(Duration),
    Disabled,
}

/// What a pick saw when it found nothing usable.
#[derive(Default)]
struct Miss {
    excluded_usable: bool,
    shortest_cooling: Option<Duration>,
}

impl Miss {
    fn note(&mut self, class: &Class) {
        match *class {
            Class::Excluded => self.excluded_usable = true,
            Class::Cooling(d) => {
                self.shortest_cooling = Some(self.shortest_cooling.map_or(d, |s| s.min(d)));
            }
            Class::Usable | Class::Disabled => {}
        }
    }

    fn outcome(self) -> Pick {
        // A usable key the caller excluded means the keys are not the problem: let the caller
        // pass the last answer through rather than claim all keys are out.
        if self.excluded_usable {
            Pick::Exhausted
        } else if let Some(retry_in) = self.shortest_cooling {
            Pick::AllCooling { retry_in }
        } else {
            Pick::AllDisabled
        }
    }
}

impl Inner {
    /// The keys not removed, with their indices.
    fn live(&self) -> impl Iterator<Item = (KeyIndex, &Slot)> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, slot)| !slot.is_removed())
    }

    /// Key `idx`, unless it was removed.
    fn live_slot(&self, idx: KeyIndex) -> Option<&Slot> {
        self.slots.get(idx).filter(|s| !s.is_removed())
    }

    /// Rebuilds what depends on which keys are in the pool: the accounts' key lists and the
    /// weighted order. Called at start and under `changes` after each addition or removal.
    fn membership_changed(&self) {
        let mut accounts: HashMap<Box<str>, Vec<KeyIndex>> = HashMap::new();
        for (idx, slot) in self.live() {
            if let Some(account) = &slot.info.account {
                accounts.entry(account.clone()).or_default().push(idx);
            }
        }
        *self.accounts.write() = accounts;
        let live = self.live().map(|(idx, s)| {
            let info = &s.info;
            (idx, &*info.name, info.account.as_deref(), info.weight)
        });
        self.rendezvous
            .store(Arc::new(affinity::Rendezvous::build(live)));
        if self.policy == KeyPolicy::Weighted {
            let live: Vec<(KeyIndex, u32)> =
                self.live().map(|(idx, s)| (idx, s.info.weight)).collect();
            let weights: Vec<u32> = live.iter().map(|&(_, w)| w).collect();
            let ring = policy::weighted_ring(&weights)
                .into_iter()
                .map(|pos| live[pos].0)
                .collect();
            self.ring.store(Arc::new(ring));
        }
    }

    fn classify(&self, idx: usize, exclude: &[usize], probe: &mut Probe<'_>) -> Class {
        let Some(slot) = self.slots.get(idx) else {
            return Class::Disabled;
        };
        match slot.availability(probe, &self.cooldown) {
            Availability::Disabled => Class::Disabled,
            Availability::Cooling(d) => Class::Cooling(d),
            Availability::Ready if exclude.contains(&idx) => Class::Excluded,
            Availability::Ready => Class::Usable,
        }
    }

    /// The weighted order, or `None` for the policies that rotate over the slots themselves.
    fn ring(&self) -> Option<arc_swap::Guard<Arc<Vec<usize>>>> {
        (self.policy == KeyPolicy::Weighted).then(|| self.ring.load())
    }

    /// Round-robin, weighted and least-in-flight: scan from the cursor, then move the cursor
    /// just past the chosen position. The compare-and-swap makes concurrent picks take turns,
    /// so the rotation stays exact under contention; a loser rescans from the new cursor.
    fn pick_rotating(
        &self,
        exclude: &[usize],
        least_in_flight: bool,
        probe: &mut Probe<'_>,
    ) -> Result<usize, Pick> {
        let ring = self.ring();
        let ring = ring.as_deref().map(|r| r.as_slice());
        let positions = ring.map_or(self.slots.len(), <[usize]>::len);
        let key_at = |pos: usize| ring.map_or(pos, |r| r[pos]);
        loop {
            let start = self.cursor.0.load(Ordering::Acquire);
            let mut pos = if start < positions { start } else { 0 };
            let mut miss = Miss::default();
            let mut best: Option<(usize, usize, u32)> = None; // (pos, idx, in flight)
            for _ in 0..positions {
                let idx = key_at(pos);
                match self.classify(idx, exclude, probe) {
                    Class::Usable if !least_in_flight => {
                        best = Some((pos, idx, 0));
                        break;
                    }
                    Class::Usable => {
                        let in_flight = self.slots[idx].in_flight.load(Ordering::Relaxed);
                        if best.is_none_or(|(_, _, b)| in_flight < b) {
                            best = Some((pos, idx, in_flight));
                            if in_flight == 0 {
                                // Nothing beats an idle key, and the first one from the
                                // cursor is the rotation's choice among idle keys.
                                break;
                            }
                        }
                    }
                    class => miss.note(&class),
                }
                pos += 1;
                if pos == positions {
                    pos = 0;
                }
            }
            let Some((pos, idx, _)) = best else {
                return Err(miss.outcome());
            };
            let next = if pos + 1 == positions { 0 } else { pos + 1 };
            if self
                .cursor
                .0
                .compare_exchange(start, next, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return Ok(idx);
            }
        }
    }

    /// Rejection sampling is exactly uniform among usable keys and O(1) while most keys are
    /// usable; when draws keep missing, one scan from a random start settles it.
    fn pick_random(&self, exclude: &[usize], probe: &mut Probe<'_>) -> Result<usize, Pick> {
        let n = self.slots.len();
        let mut rng = rand::rng();
        for _ in 0..RANDOM_DRAWS {
            let idx = rng.random_range(0..n);
            if let Class::Usable = self.classify(idx, exclude, probe) {
                return Ok(idx);
            }
        }
        let start = rng.random_range(0..n);
        let mut miss = Miss::default();
        for step in 0..n {
            let idx = (start + step) % n;
            match self.classify(idx, exclude, probe) {
                Class::Usable => return Ok(idx),
                class => miss.note(&class),
            }
        }
        Err(miss.outcome())
    }

    fn cool(&self, idx: usize, model: &str, requested: Option<Duration>, why: &str) -> Cooled {
        let Some(slot) = self.slots.get(idx) else {
            return Cooled::default();
        };
        let cooled = slot.cool(&self.time, model, requested, &self.cooldown);
        let scope = if model.is_empty() {
            "all models"
        } else {
            model
        };
        let source = match requested {
            Some(_) => "as asked",
            None => "backoff",
        };
        if cooled.started {
            info!(
                "key {}/{} cooling for {} {:.1?} ({why}, {source}, strike {})",
                self.upstream, slot.info.name, scope, cooled.remaining, cooled.strikes
            );
        } else if cooled.extended {
            debug!(
                "key {}/{} {why} for {} during its cooldown: extended to {:.1?} as asked",
                self.upstream, slot.info.name, scope, cooled.remaining
            );
        } else {
            debug!(
                "key {}/{} {why} for {} during its cooldown (no strike): {:.1?} left",
                self.upstream, slot.info.name, scope, cooled.remaining
            );
        }
        if cooled.started || cooled.extended {
            if let Some(observe) = self.observer.get().filter(|_| why != SHARED) {
                let change = KeyChange::Cooled {
                    model: model.to_string(),
                    remaining: cooled.remaining,
                };
                observe(idx, &change);
            }
        }
        cooled
    }

    fn tell(&self, idx: KeyIndex, change: &KeyChange) {
        if let Some(observe) = self.observer.get() {
            observe(idx, change);
        }
    }

    fn disable(&self, idx: KeyIndex, reason: DisableReason, why: &str) -> bool {
        let Some(slot) = self.slots.get(idx) else {
            return false;
        };
        let changed = slot.disable(reason);
        if changed {
            info!(
                "key {}/{} disabled: {reason}{why}",
                self.upstream, slot.info.name
            );
        }
        changed
    }

    fn enable(&self, idx: KeyIndex, why: &str) -> bool {
        let Some(slot) = self.slots.get(idx) else {
            return false;
        };
        match slot.enable() {
            Some(reason) => {
                info!(
                    "key {}/{} re-enabled (was {reason}){why}",
                    self.upstream, slot.info.name
                );
                true
            }
            None => false,
        }
    }
}

impl Inner {
    /// Headroom: the usable key with the most of its limits left for `model` (see
    /// [`headroom::Headroom::score`]), ties to the first from the cursor, so keys that report
    /// nothing (full headroom) rotate exactly like round-robin, and a full key ends the scan at
    /// once. The cursor then moves just past the chosen key, as in [`Inner::pick_rotating`].
    /// One scan of the keys at most; the clock is read only when a key has reported.
    fn pick_headroom(
        &self,
        exclude: &[usize],
        model: &str,
        probe: &mut Probe<'_>,
    ) -> Result<usize, Pick> {
        let n = self.slots.len();
        let mut now = None;
        loop {
            let start = self.cursor.0.load(Ordering::Acquire);
            let mut idx = if start < n { start } else { 0 };
            let mut miss = Miss::default();
            let mut best: Option<(usize, u32)> = None;
            for _ in 0..n {
                match self.classify(idx, exclude, probe) {
                    Class::Usable => {
                        let score = if self.headroom.reports(idx) {
                            let now = *now.get_or_insert_with(|| self.time.now());
                            self.headroom.score(idx, model, now)
                        } else {
                            headroom::FULL
                        };
                        if best.is_none_or(|(_, b)| score > b) {
                            best = Some((idx, score));
                            if score >= headroom::FULL {
                                break;
                            }
                        }
                    }
                    class => miss.note(&class),
                }
                idx = if idx + 1 == n { 0 } else { idx + 1 };
            }
            let Some((idx, _)) = best else {
                return Err(miss.outcome());
            };
            let next = if idx + 1 == n { 0 } else { idx + 1 };
            if self
                .cursor
                .0
                .compare_exchange(start, next, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return Ok(idx);
            }
        }
    }
}

/// The `why` of a rest headroom predicted.
const HEADROOM: &str = "headroom about to run out";

impl KeyPool {
    /// The same pool, resting keys about to run out ([`KeyPool::note_sent`]) only if `rest`
    /// (the default); otherwise headroom is still tracked for [`KeyPolicy::Headroom`], and keys
    /// rest only after a 429. For a pool just made (before any clone).
    pub fn resting_before_limit(mut self, rest: bool) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.rest_before_limit = rest;
        }
        self
    }

    /// A request for `model` sent on key `idx` (for every policy): charged to the key's
    /// headroom. When that leaves nothing for the next request, the key rests for `model` until
    /// the exhausted limit resets: a cooldown like a 429's, seen by status, metrics and the
    /// shared store, taken before the upstream refuses anything.
    pub fn note_sent(&self, idx: KeyIndex, model: &str) -> Cooled {
        let inner = &*self.inner;
        if !inner.headroom.reports(idx) {
            return Cooled::default();
        }
        match inner.headroom.sent(idx, model, inner.time.now()) {
            Some(rest) if inner.rest_before_limit => inner.cool(idx, model, Some(rest), HEADROOM),
            _ => Cooled::default(),
        }
    }

    /// What an answer on key `idx` for `model` reported of its limits (see
    /// [`RateReport::from_headers`]). The key's other requests in flight count against the
    /// report (it may not include them yet); when nothing is left for the next request, the key
    /// rests as in [`KeyPool::note_sent`].
    pub fn note_limits(&self, idx: KeyIndex, model: &str, report: &RateReport) -> Cooled {
        let inner = &*self.inner;
        let Some(slot) = inner.live_slot(idx).filter(|_| !report.is_empty()) else {
            return Cooled::default();
        };
        let unseen = u64::from(slot.in_flight.load(Ordering::Relaxed).saturating_sub(1));
        match inner
            .headroom
            .report(idx, model, report, unseen, inner.time.now())
        {
            Some(rest) if inner.rest_before_limit => inner.cool(idx, model, Some(rest), HEADROOM),
            _ => Cooled::default(),
        }
    }

    /// Parts per million of key `idx`'s limits for `model` left now (1 000 000 when it
    /// reported none), for status and tests.
    pub fn headroom(&self, idx: KeyIndex, model: &str) -> u32 {
        let inner = &*self.inner;
        inner.headroom.score(idx, model, inner.time.now())
    }
}

/// The `why` of changes applied from the shared store: logged, and never told back to it.
const SHARED: &str = "shared by another instance";

impl KeyPool {
    /// A pool over `keys`, in that order (indices are positions in `keys`), all ready.
    pub fn new(
        upstream: &str,
        keys: Vec<KeySpec>,
        policy: KeyPolicy,
        cooldown: CooldownPolicy,
        clock: SharedClock,
    ) -> KeyPool {
        let headroom = Headroom::new(keys.len());
        let slots = keys
            .into_iter()
            .map(|k| Slot::new(k.name, k.secret, k.account, k.weight))
            .collect();
        let inner = Inner {
            upstream: upstream.into(),
            slots: AppendOnly::new(slots),
            policy,
            cooldown,
            time: TimeBase::new(clock),
            cursor: CachePadded(AtomicUsize::new(0)),
            ring: ArcSwap::from_pointee(Vec::new()),
            accounts: RwLock::new(HashMap::new()),
            rendezvous: ArcSwap::from_pointee(affinity::Rendezvous::default()),
            changes: Mutex::new(()),
            observer: OnceLock::new(),
            headroom,
            rest_before_limit: true,
        };
        inner.membership_changed();
        KeyPool {
            inner: Arc::new(inner),
        }
    }

    /// Adds a key at the end of the pool, ready; its index. Refused when a key of that name, or
    /// with that secret, is in the pool (removed keys do not count).
    pub fn add(&self, key: KeySpec) -> Result<KeyIndex, AddKeyError> {
        self.add_with(key, |_| {})
    }

    /// [`KeyPool::add`], calling `prepare` with the new key's index once the key is accepted
    /// and before any pick can see it: lists kept beside the pool by index (credentials,
    /// activity) grow there, in turn with every other addition.
    pub fn add_with(
        &self,
        key: KeySpec,
        prepare: impl FnOnce(KeyIndex),
    ) -> Result<KeyIndex, AddKeyError> {
        let inner = &*self.inner;
        let _turn = inner.changes.lock();
        self.check_add(&key)?;
        prepare(inner.slots.len());
        let idx = inner
            .slots
            .push(Slot::new(key.name, key.secret, key.account, key.weight));
        inner.membership_changed();
        info!(
            "key {}/{} added",
            inner.upstream, inner.slots[idx].info.name
        );
        Ok(idx)
    }

    /// Whether [`KeyPool::add`] would take `key` now: its name and secret are not in the pool.
    pub fn check_add(&self, key: &KeySpec) -> Result<(), AddKeyError> {
        let inner = &*self.inner;
        if self.index_of(&key.name).is_some() {
            return Err(AddKeyError::NameTaken {
                upstream: inner.upstream.to_string(),
                name: key.name.clone(),
            });
        }
        let id = key.secret.id();
        match inner.live().find(|(_, s)| *s.info.id == id) {
            Some((_, other)) => Err(AddKeyError::SecretTaken {
                upstream: inner.upstream.to_string(),
                name: other.info.name.to_string(),
            }),
            None => Ok(()),
        }
    }

    /// Removes key `idx` for good: it is never picked, probed or listed again, and its index is
    /// not reused (requests holding it finish). False if there is no such key or it was removed.
    pub fn remove(&self, idx: KeyIndex) -> bool {
        let inner = &*self.inner;
        let _turn = inner.changes.lock();
        let Some(slot) = inner.slots.get(idx) else {
            return false;
        };
        if !slot.remove() {
            return false;
        }
        inner.membership_changed();
        info!("key {}/{} removed", inner.upstream, slot.info.name);
        true
    }

    /// Whether key `idx` was added after start ([`KeyPool::add`]) rather than configured.
    pub fn is_added(&self, idx: KeyIndex) -> bool {
        idx >= self.inner.slots.initial_len()
    }

    /// Whether key `idx` was removed (or never existed).
    pub fn is_removed(&self, idx: KeyIndex) -> bool {
        self.inner.slots.get(idx).is_none_or(Slot::is_removed)
    }

    /// The upstream's name, as used in logs.
    pub fn upstream(&self) -> &str {
        &self.inner.upstream
    }

    /// The selection policy.
    pub fn policy(&self) -> KeyPolicy {
        self.inner.policy
    }

    /// The number of key indices: every key the pool has held, removed ones included.
    pub fn len(&self) -> usize {
        self.inner.slots.len()
    }

    /// Whether the pool has no keys.
    pub fn is_empty(&self) -> bool {
        self.inner.slots.is_empty()
    }

    /// Chooses a key for one attempt at `model` ([`ALL_MODELS`] when the request names none),
    /// skipping disabled keys, keys cooling for `model` or for every model, and `exclude` (the
    /// keys already tried in this request).
    pub fn pick(&self, model: &str, exclude: &[KeyIndex]) -> Pick {
        let inner = &*self.inner;
        if inner.slots.is_empty() {
            return Pick::AllDisabled;
        }
        let mut probe = Probe::new(&inner.time, model);
        let picked = match inner.policy {
            KeyPolicy::RoundRobin | KeyPolicy::Weighted => {
                inner.pick_rotating(exclude, false, &mut probe)
            }
            KeyPolicy::LeastInFlight => inner.pick_rotating(exclude, true, &mut probe),
            KeyPolicy::Random => inner.pick_random(exclude, &mut probe),
            KeyPolicy::Headroom => inner.pick_headroom(exclude, model, &mut probe),
        };
        self.lease(picked)
    }

    /// The lease of a picked key (counted in flight until dropped), or what the pick saw.
    fn lease(&self, picked: Result<KeyIndex, Pick>) -> Pick {
        match picked {
            Ok(idx) => {
                self.inner.slots[idx]
                    .in_flight
                    .fetch_add(1, Ordering::Relaxed);
                Pick::Key(KeyLease {
                    pool: Arc::clone(&self.inner),
                    idx,
                })
            }
            Err(outcome) => outcome,
        }
    }

    /// A key usable for `model` and not in `exclude`, without taking it: the first from the
    /// rotation cursor on (for round-robin, the key the next pick would take). Unlike
    /// [`KeyPool::pick`] it moves no cursor and holds no lease, so asking whether a retry could
    /// find a key, or which key a keep-warm ping should use, never makes the rotation skip one.
    /// O(1) while most keys are usable; one scan of the keys at most.
    pub fn peek(&self, model: &str, exclude: &[KeyIndex]) -> Option<KeyIndex> {
        let inner = &*self.inner;
        let n = inner.slots.len();
        if n == 0 {
            return None;
        }
        let ring = inner.ring();
        let ring = ring.as_deref().map(|r| r.as_slice());
        let positions = ring.map_or(n, <[usize]>::len);
        let cursor = inner.cursor.0.load(Ordering::Acquire);
        let pos = if cursor < positions { cursor } else { 0 };
        let start = ring.map_or(pos, |r| r.get(pos).copied().unwrap_or(0));
        let mut probe = Probe::new(&inner.time, model);
        (0..n)
            .map(|step| (start + step) % n)
            .find(|&idx| matches!(inner.classify(idx, exclude, &mut probe), Class::Usable))
    }

    /// Whether some key not in `exclude` could take a request for `model` now; moves nothing
    /// (see [`KeyPool::peek`]).
    pub fn has_usable(&self, model: &str, exclude: &[KeyIndex]) -> bool {
        self.peek(model, exclude).is_some()
    }

    /// A success on key `idx` for `model`: the exponential backoff for that key and model (and
    /// for every-model cooldowns of the key) starts over from `base`.
    pub fn on_success(&self, idx: KeyIndex, model: &str) {
        let inner = &*self.inner;
        if let Some(slot) = inner.slots.get(idx) {
            slot.succeed(&mut Probe::new(&inner.time, model), &inner.cooldown);
        }
    }

    /// A 429 on key `idx` for `model` ([`ALL_MODELS`]: every model). `requested` is what the
    /// upstream asked for (see [`crate::retry_after::requested_cooldown`]): applied exactly,
    /// capped at `max`, and zero means "retry now" (no cooldown, but the 429 still counts
    /// towards the backoff). `None` applies the backoff: `base`, `2*base`, `4*base`…, capped at
    /// `max_backoff`. A running cooldown is never shortened.
    ///
    /// The backoff counts cooldown episodes, not 429s: a 429 that arrives while the key is
    /// already out for `model` adds no strike (it answers a request sent before the episode
    /// began) and only lengthens the cooldown if it asks for longer. An unknown index is
    /// ignored (nothing happened).
    pub fn on_rate_limit(&self, idx: KeyIndex, model: &str, requested: Option<Duration>) -> Cooled {
        self.inner.cool(idx, model, requested, "429")
    }

    /// [`KeyPool::on_rate_limit`], returning only how long the key now stays out for `model`
    /// (zero: not at all).
    pub fn cool_down(&self, idx: KeyIndex, model: &str, requested: Option<Duration>) -> Duration {
        self.on_rate_limit(idx, model, requested).remaining
    }

    /// An organisation-wide 429 (see [`crate::retry_after::is_org_wide_limit`]): every key of
    /// `account` but `except` (the key whose own 429 was already recorded with
    /// [`KeyPool::on_rate_limit`], so that one answer is one strike) rests for `model` as
    /// [`KeyPool::on_rate_limit`] would, each by its own episode: as long as `requested` asks,
    /// or its own backoff when the upstream said nothing. Returns the keys whose cooldown
    /// episode this started; empty for an unknown account.
    pub fn cool_down_account(
        &self,
        account: &str,
        model: &str,
        requested: Option<Duration>,
        except: Option<KeyIndex>,
    ) -> Vec<KeyIndex> {
        let Some(keys) = self.inner.accounts.read().get(account).cloned() else {
            return Vec::new();
        };
        keys.into_iter()
            .filter(|&idx| Some(idx) != except)
            .filter(|&idx| {
                self.inner
                    .cool(idx, model, requested, "org-wide 429")
                    .started
            })
            .collect()
    }

    /// Takes key `idx` out for every model until [`KeyPool::enable`]. True if it was enabled;
    /// a key already disabled keeps its first reason.
    pub fn disable(&self, idx: KeyIndex, reason: DisableReason) -> bool {
        let changed = self.inner.disable(idx, reason, "");
        if changed {
            self.inner.tell(idx, &KeyChange::Disabled(reason));
        }
        changed
    }

    /// Puts key `idx` back into rotation (its cooldowns, if any, still run). True if it was
    /// disabled.
    pub fn enable(&self, idx: KeyIndex) -> bool {
        let changed = self.inner.enable(idx, "");
        if changed {
            self.inner.tell(idx, &KeyChange::Enabled);
        }
        changed
    }

    /// Takes key `idx` out by an operator's hand: the reason becomes [`DisableReason::Manual`]
    /// even if the key was already out for another reason, so probes leave it alone. True if
    /// the key was not already manually disabled.
    pub fn disable_manually(&self, idx: KeyIndex) -> bool {
        let Some(slot) = self.inner.live_slot(idx) else {
            return false;
        };
        let before = slot.force_disable(DisableReason::Manual);
        if before == Some(DisableReason::Manual) {
            return false;
        }
        info!(
            "key {}/{} disabled: {}",
            self.inner.upstream,
            slot.info.name,
            DisableReason::Manual
        );
        self.inner
            .tell(idx, &KeyChange::Disabled(DisableReason::Manual));
        true
    }

    /// Puts key `idx` back after a passing probe, only if it is still out for `reason` (an
    /// operator's disable in the meantime wins). True if it was.
    pub fn enable_if_still(&self, idx: KeyIndex, reason: DisableReason) -> bool {
        let Some(slot) = self.inner.slots.get(idx) else {
            return false;
        };
        if !reason.probes_may_enable() || !slot.enable_if(reason) {
            return false;
        }
        info!(
            "key {}/{} re-enabled (was {reason})",
            self.inner.upstream, slot.info.name
        );
        self.inner.tell(idx, &KeyChange::Enabled);
        true
    }

    /// Has `observer` told of every change this pool makes from now on. A pool has at most one
    /// observer: false (and nothing changes) if it already has one.
    pub fn observe(&self, observer: KeyObserver) -> bool {
        self.inner.observer.set(observer).is_ok()
    }

    /// Applies a change another instance made, without telling the observer (which would send
    /// it back). A cooldown only ever grows here; true if the key's state changed.
    pub fn apply_shared(&self, idx: KeyIndex, change: &KeyChange) -> bool {
        let inner = &*self.inner;
        match change {
            KeyChange::Cooled { model, remaining } => {
                let cooled = inner.cool(idx, model, Some(*remaining), SHARED);
                cooled.started || cooled.extended
            }
            KeyChange::Disabled(DisableReason::Manual) => inner.live_slot(idx).is_some_and(|s| {
                // An operator's disable wins over any other reason, on every instance.
                let before = s.force_disable(DisableReason::Manual);
                if before != Some(DisableReason::Manual) {
                    info!(
                        "key {}/{} disabled: {} ({SHARED})",
                        inner.upstream,
                        s.info.name,
                        DisableReason::Manual
                    );
                }
                before != Some(DisableReason::Manual)
            }),
            KeyChange::Disabled(reason) => inner.disable(idx, *reason, &format!(" ({SHARED})")),
            KeyChange::Enabled => inner.enable(idx, &format!(" ({SHARED})")),
        }
    }

    /// The disabled keys and why, for the background prober.
    pub fn disabled(&self) -> Vec<(KeyIndex, DisableReason)> {
        self.inner
            .live()
            .filter_map(|(idx, slot)| slot.disabled_reason().map(|r| (idx, r)))
            .collect()
    }

    /// Every key's state, in index order (removed keys left out).
    pub fn status(&self) -> Vec<KeyStatus> {
        let now = self.inner.time.now();
        self.inner
            .live()
            .map(|(index, slot)| {
                let state = match slot.disabled_reason() {
                    Some(reason) => KeyState::Disabled { reason },
                    None => {
                        let cooldowns: Vec<ModelCooldown> = slot
                            .cooling(now)
                            .into_iter()
                            .map(|c| ModelCooldown {
                                model: c.model,
                                remaining: c.remaining,
                            })
                            .collect();
                        if cooldowns.is_empty() {
                            KeyState::Ready
                        } else {
                            KeyState::Cooling { cooldowns }
                        }
                    }
                };
                KeyStatus {
                    index,
                    name: slot.info.name.to_string(),
                    account: slot.info.account.as_deref().map(str::to_owned),
                    weight: slot.info.weight,
                    state,
                    in_flight: slot.in_flight.load(Ordering::Relaxed) as usize,
                }
            })
            .collect()
    }

    /// How many keys are ready, cooling and disabled. One pass without allocating; locks only
    /// the keys that have cooldown entries, one at a time.
    pub fn counts(&self) -> StateCounts {
        let now = self.inner.time.now();
        let mut counts = StateCounts::default();
        for (_, slot) in self.inner.live() {
            if slot.disabled_reason().is_some() {
                counts.disabled += 1;
            } else if slot.is_cooling(now) {
                counts.cooling += 1;
            } else {
                counts.ready += 1;
            }
        }
        counts
    }

    /// The index of the key named `name` (removed keys left out).
    pub fn index_of(&self, name: &str) -> Option<KeyIndex> {
        self.inner
            .live()
            .find(|(_, s)| &*s.info.name == name)
            .map(|(idx, _)| idx)
    }

    /// The name of key `idx`.
    ///
    /// # Panics
    /// If `idx` is not below [`KeyPool::len`], like slice indexing.
    pub fn name(&self, idx: KeyIndex) -> &str {
        &self.inner.slots[idx].info.name
    }

    /// [`key_id`] of key `idx`'s secret: tells a replaced secret from the old one under the
    /// same name, without revealing either.
    ///
    /// # Panics
    /// If `idx` is not below [`KeyPool::len`], like slice indexing.
    pub fn key_id(&self, idx: KeyIndex) -> &str {
        &self.inner.slots[idx].info.id
    }

    /// The credential of key `idx`.
    ///
    /// # Panics
    /// If `idx` is not below [`KeyPool::len`], like slice indexing.
    pub fn secret(&self, idx: KeyIndex) -> &Secret {
        &self.inner.slots[idx].info.secret
    }

    /// The account of key `idx`, if configured.
    ///
    /// # Panics
    /// If `idx` is not below [`KeyPool::len`], like slice indexing.
    pub fn account(&self, idx: KeyIndex) -> Option<&str> {
        self.inner.slots[idx].info.account.as_deref()
    }
}
