//! Prompt-cache affinity (`affinity: prompt`): the key for a request chosen by rendezvous
//! (highest-random-weight) hashing of the request's affinity hash, so that repeats of a prompt
//! reach the key whose provider-side prompt cache already holds it.
//!
//! **The choice.** Every live key gets a score from the affinity hash and the key's own seed (a
//! stable hash of its *name*, so a rotated secret keeps its share, and so do several instances
//! sharing a pool); the usable key with the highest score is chosen. Keys that cannot take the
//! request (disabled, cooling for the model, or already tried by this request) are skipped, so
//! the request goes to the next key in the hash's rendezvous order: a key that leaves moves
//! only its own share, spread over the others, and gets it back when it returns. A retry after
//! a failed attempt (the tried key excluded) goes to the next key in that same order.
//!
//! **Weights** are weighted rendezvous: the score is `-weight / ln(u)` with `u` the hash mapped
//! into (0, 1), which gives each key a share of hashes exactly proportional to its weight (0
//! counts as 1, as for `key_policy: weighted`). When every weight is equal the scores are the
//! raw 64-bit draws instead (the same order, since `-w / ln(u)` grows with `u`), which costs no
//! floating point.
//!
//! **Accounts.** Providers keep the prompt cache per organisation, so keys of one account share
//! it. The order is therefore rendezvous over accounts first (each account weighted by the sum
//! of its live keys' weights), then over the account's keys: a key that cools hands its share to
//! another key of the *same* account while one is usable, which keeps the cache; only when every
//! key of the account is out does the share move to the next account. A key without an account
//! is an account of its own. Overall shares stay proportional to the keys' weights.
//!
//! **Cost.** A pick scores every live key: O(keys), two 64-bit mixes per key (plus two
//! logarithms when weights differ), no allocation and no lock (the table is swapped whole when
//! keys are added or removed). Measured (`benches/hot_paths.rs`, a third of the keys cooling):
//! 0.13 µs with 10 keys, 0.6 µs with 100, 2.6 µs with 500 (0.2, 1.1 and 4.9 µs with unequal
//! weights); pools of thousands of keys should not use affinity. A key resting before its
//! limit (headroom) is cooling, so it is skipped like any cooling key.

use super::state::Probe;
use super::{Class, Inner, KeyIndex, KeyPool, Miss, Pick};
use crate::request_body::{mix64, StableHasher};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// Whether requests are pinned to keys by what they ask (`affinity:` on an upstream or route).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Affinity {
    /// The key policy alone chooses.
    #[default]
    None,
    /// Requests with a `prompt_cache_key`, a `user` or a prompt go to a key by rendezvous
    /// hashing of it (overriding the key policy for them).
    Prompt,
}

/// Tags that keep key seeds and account seeds apart.
const KEY_TAG: u8 = b'k';
const ACCOUNT_TAG: u8 = b'a';

/// One live key as the rendezvous choice sees it.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Candidate {
    pub(super) idx: KeyIndex,
    /// Stable hash of the key's name.
    key_seed: u64,
    /// Stable hash of the account's name; the key's own seed without an account.
    group_seed: u64,
    key_weight: f64,
    /// The sum of the account's live keys' weights.
    group_weight: f64,
    /// Whether the account has other live keys (else the key score is not needed).
    shared_group: bool,
}

/// The live keys with their seeds and weights, rebuilt when keys are added or removed.
#[derive(Debug, Default)]
pub(super) struct Rendezvous {
    pub(super) candidates: Vec<Candidate>,
    /// Every score's weight is the same: compare raw draws.
    uniform: bool,
}

/// One key's live data for [`Rendezvous::build`]: index, name, account, weight.
pub(super) type LiveKey<'a> = (KeyIndex, &'a str, Option<&'a str>, u32);

fn seed(tag: u8, name: &str) -> u64 {
    let mut h = StableHasher::new(tag);
    h.write(name.as_bytes());
    h.finish()
}

impl Rendezvous {
    /// The table for these live keys.
    pub(super) fn build<'a>(keys: impl Iterator<Item = LiveKey<'a>>) -> Self {
        let keys: Vec<LiveKey<'a>> = keys.collect();
        let mut groups: HashMap<&str, (u64, usize)> = HashMap::new();
        for &(_, _, account, weight) in &keys {
            if let Some(a) = account {
                let g = groups.entry(a).or_default();
                g.0 += u64::from(weight.max(1));
                g.1 += 1;
            }
        }
        let candidates: Vec<Candidate> = keys
            .iter()
            .map(|&(idx, name, account, weight)| {
                let key_seed = seed(KEY_TAG, name);
                let key_weight = f64::from(weight.max(1));
                match account.and_then(|a| groups.get(a).map(|g| (a, g))) {
                    Some((a, &(sum, count))) => Candidate {
                        idx,
                        key_seed,
                        group_seed: seed(ACCOUNT_TAG, a),
                        key_weight,
                        group_weight: sum as f64,
                        shared_group: count > 1,
                    },
                    None => Candidate {
                        idx,
                        key_seed,
                        group_seed: key_seed,
                        key_weight,
                        group_weight: key_weight,
                        shared_group: false,
                    },
                }
            })
            .collect();
        let uniform = candidates
            .windows(2)
            .all(|w| w[0].key_weight == w[1].key_weight && w[0].group_weight == w[1].group_weight);
        Self {
            candidates,
            uniform,
        }
    }

    /// The score of `seed` with `weight` for `hash`: bigger wins. Positive `f64`s order like
    /// their bit patterns, so weighted scores compare as integers too.
    #[inline]
    fn score(&self, hash: u64, seed: u64, weight: f64) -> u64 {
        let draw = mix64(hash ^ seed);
        if self.uniform {
            return draw;
        }
        // u in (0, 1): the top 53 bits, centred in their interval.
        let u = ((draw >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64);
        (-weight / u.ln()).to_bits()
    }

    /// The rank of `c` for `hash`: account first, then key, then index (never tied).
    #[inline]
    fn rank(&self, hash: u64, c: &Candidate) -> (u64, u64, KeyIndex) {
        let group = self.score(hash, c.group_seed, c.group_weight);
        let key = if c.shared_group {
            self.score(hash, c.key_seed, c.key_weight)
        } else {
            0
        };
        (group, key, c.idx)
    }

    /// The usable key (as `classify` says) that ranks highest for `hash`, or what the pick
    /// saw when none is.
    fn choose(
        &self,
        hash: u64,
        mut classify: impl FnMut(KeyIndex) -> Class,
    ) -> Result<KeyIndex, Pick> {
        let mut miss = Miss::default();
        let mut best: Option<(u64, u64, KeyIndex)> = None;
        for c in &self.candidates {
            match classify(c.idx) {
                Class::Usable => {
                    let rank = self.rank(hash, c);
                    if best.is_none_or(|b| rank > b) {
                        best = Some(rank);
                    }
                }
                class => miss.note(&class),
            }
        }
        match best {
            Some((_, _, idx)) => Ok(idx),
            None => Err(miss.outcome()),
        }
    }

    /// Every live key in the rendezvous order of `hash`, best first (for tests and tools;
    /// allocates).
    pub(super) fn order(&self, hash: u64) -> Vec<KeyIndex> {
        let mut ranked: Vec<_> = self.candidates.iter().map(|c| self.rank(hash, c)).collect();
        ranked.sort_unstable_by(|a, b| b.cmp(a));
        ranked.into_iter().map(|(_, _, idx)| idx).collect()
    }
}

impl Inner {
    fn pick_affine(
        &self,
        hash: u64,
        exclude: &[KeyIndex],
        probe: &mut Probe<'_>,
    ) -> Result<KeyIndex, Pick> {
        let table = self.rendezvous.load();
        table.choose(hash, |idx| self.classify(idx, exclude, probe))
    }
}

impl KeyPool {
    /// Chooses a key for one attempt at `model` by prompt affinity: the usable key not in
    /// `exclude` that ranks highest for `hash` (see the `affinity` module), whatever the key
    /// policy. Skips what [`KeyPool::pick`] skips, and answers the same way when nothing is
    /// usable. O(keys) per pick, without allocating.
    pub fn pick_affine(&self, hash: u64, model: &str, exclude: &[KeyIndex]) -> Pick {
        let inner = &*self.inner;
        let mut probe = Probe::new(&inner.time, model);
        self.lease(inner.pick_affine(hash, exclude, &mut probe))
    }

    /// The live keys in the rendezvous order of `hash`, best first, whatever their state:
    /// where [`KeyPool::pick_affine`] would go as keys leave. Allocates; for tools and tests.
    pub fn affinity_order(&self, hash: u64) -> Vec<KeyIndex> {
        self.inner.rendezvous.load().order(hash)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::clock::{ManualClock, SharedClock};
    use crate::keys::{CooldownPolicy, DisableReason, KeyPolicy, KeySpec, Secret};
    use std::sync::Arc;

    fn names(names: &[&str]) -> Vec<KeySpec> {
        names
            .iter()
            .map(|n| KeySpec::named(*n, format!("sk-secret-{n}")))
            .collect()
    }

    fn pool_of(specs: Vec<KeySpec>, policy: KeyPolicy) -> (KeyPool, Arc<ManualClock>) {
        let clock = ManualClock::new();
        let shared: SharedClock = clock.clone();
        let pool = KeyPool::new("openai", specs, policy, CooldownPolicy::default(), shared);
        (pool, clock)
    }

    /// Hashes spread like real affinity hashes (mixed), reproducible.
    fn hashes(n: usize) -> impl Iterator<Item = u64> {
        (0..n as u64).map(|i| mix64(i.wrapping_add(0x9e37_79b9_7f4a_7c15)))
    }

    fn pick(pool: &KeyPool, h: u64, exclude: &[usize]) -> usize {
        match pool.pick_affine(h, "m", exclude) {
            Pick::Key(lease) => lease.index(),
            other => panic!("expected a key, got {other:?}"),
        }
    }

    fn keyed(name: &str, weight: u32, account: Option<&str>) -> KeySpec {
        KeySpec {
            weight,
            account: account.map(str::to_owned),
            ..KeySpec::named(name, format!("sk-{name}"))
        }
    }

    fn tally(pool: &KeyPool, n: usize) -> Vec<usize> {
        let mut counts = vec![0; pool.len()];
        for h in hashes(n) {
            counts[pick(pool, h, &[])] += 1;
        }
        counts
    }

    #[test]
    fn the_same_hash_always_gets_the_same_key_whatever_the_policy() {
        for policy in [
            KeyPolicy::RoundRobin,
            KeyPolicy::Random,
            KeyPolicy::Weighted,
        ] {
            let (pool, _) = pool_of(names(&["a", "b", "c", "d"]), policy);
            for h in hashes(50) {
                let first = pick(&pool, h, &[]);
                // Plain picks in between move the rotation, not the affinity choice.
                let _ = pool.pick("m", &[]);
                assert_eq!(pick(&pool, h, &[]), first);
                assert_eq!(pool.affinity_order(h)[0], first);
            }
        }
    }

    #[test]
    fn the_choice_depends_on_key_names_not_on_their_order_or_secrets() {
        let (a, _) = pool_of(names(&["a", "b", "c"]), KeyPolicy::RoundRobin);
        let renamed: Vec<KeySpec> = ["c", "a", "b"]
            .iter()
            .map(|n| KeySpec::named(*n, format!("other-{n}")))
            .collect();
        let (b, _) = pool_of(renamed, KeyPolicy::RoundRobin);
        for h in hashes(100) {
            assert_eq!(a.name(pick(&a, h, &[])), b.name(pick(&b, h, &[])));
        }
    }

    #[test]
    fn hashes_spread_evenly_over_equal_keys() {
        let (pool, _) = pool_of(names(&["a", "b", "c", "d", "e"]), KeyPolicy::RoundRobin);
        let counts = tally(&pool, 10_000);
        // 2 000 each expected; 5 standard deviations is about 200.
        for c in &counts {
            assert!((1_750..=2_250).contains(c), "{counts:?}");
        }
    }

    #[test]
    fn weights_are_respected() {
        let specs = vec![
            keyed("a", 1, None),
            keyed("b", 2, None),
            keyed("c", 5, None),
        ];
        let (pool, _) = pool_of(specs, KeyPolicy::RoundRobin);
        let counts = tally(&pool, 16_000);
        // 2 000, 4 000, 10 000 expected.
        for (c, want) in counts.iter().zip([2_000.0, 4_000.0, 10_000.0]) {
            let ratio = *c as f64 / want;
            assert!((0.9..=1.1).contains(&ratio), "{counts:?}");
        }
    }

    #[test]
    fn a_key_that_leaves_moves_only_its_own_share_and_gets_it_back() {
        let (pool, clock) = pool_of(names(&["a", "b", "c", "d"]), KeyPolicy::RoundRobin);
        let before: Vec<usize> = hashes(4_000).map(|h| pick(&pool, h, &[])).collect();
        // Disabled: only b's hashes move, spread over the three others.
        assert!(pool.disable(1, DisableReason::Unauthorized));
        let mut moved_to = [0usize; 4];
        for (h, &was) in hashes(4_000).zip(&before) {
            let now = pick(&pool, h, &[]);
            if was == 1 {
                assert_ne!(now, 1);
                moved_to[now] += 1;
                assert_eq!(
                    now,
                    pool.affinity_order(h)[1],
                    "the next in rendezvous order"
                );
            } else {
                assert_eq!(now, was, "a hash of another key moved");
            }
        }
        assert!(
            moved_to.iter().enumerate().all(|(i, &n)| i == 1 || n > 200),
            "{moved_to:?}"
        );
        // Back: every hash is where it was.
        assert!(pool.enable(1));
        assert!(hashes(4_000)
            .zip(&before)
            .all(|(h, &was)| pick(&pool, h, &[]) == was));
        // Cooling for the model does the same, and only for that model.
        pool.on_rate_limit(1, "m", Some(std::time::Duration::from_secs(10)));
        for (h, &was) in hashes(4_000).zip(&before) {
            assert_ne!(pick(&pool, h, &[]), 1);
            if was != 1 {
                assert_eq!(pick(&pool, h, &[]), was);
            }
        }
        clock.advance(std::time::Duration::from_secs(11));
        assert!(hashes(4_000)
            .zip(&before)
            .all(|(h, &was)| pick(&pool, h, &[]) == was));
    }

    #[test]
    fn retries_walk_the_rendezvous_order() {
        let (pool, _) = pool_of(names(&["a", "b", "c"]), KeyPolicy::RoundRobin);
        for h in hashes(100) {
            let order = pool.affinity_order(h);
            assert_eq!(pick(&pool, h, &[]), order[0]);
            assert_eq!(pick(&pool, h, &order[..1]), order[1]);
            assert_eq!(pick(&pool, h, &order[..2]), order[2]);
            assert!(matches!(pool.pick_affine(h, "m", &order), Pick::Exhausted));
        }
    }

    #[test]
    fn nothing_usable_answers_like_a_plain_pick() {
        let (pool, _) = pool_of(names(&["a", "b"]), KeyPolicy::RoundRobin);
        pool.on_rate_limit(0, "m", Some(std::time::Duration::from_secs(5)));
        pool.on_rate_limit(1, "m", Some(std::time::Duration::from_secs(3)));
        match pool.pick_affine(7, "m", &[]) {
            Pick::AllCooling { retry_in } => assert_eq!(retry_in.as_secs(), 3),
            other => panic!("{other:?}"),
        }
        assert!(matches!(pool.pick_affine(7, "other", &[]), Pick::Key(_)));
        pool.disable(0, DisableReason::Manual);
        pool.disable(1, DisableReason::Manual);
        assert!(matches!(pool.pick_affine(7, "m", &[]), Pick::AllDisabled));
        let (empty, _) = pool_of(Vec::new(), KeyPolicy::RoundRobin);
        assert!(matches!(empty.pick_affine(7, "m", &[]), Pick::AllDisabled));
    }

    #[test]
    fn a_key_of_an_account_hands_its_share_to_its_account_first() {
        let specs = vec![
            keyed("a1", 1, Some("acme")),
            keyed("a2", 1, Some("acme")),
            keyed("b1", 1, Some("beta")),
            keyed("c", 1, None),
        ];
        let (pool, _) = pool_of(specs, KeyPolicy::RoundRobin);
        let counts = tally(&pool, 8_000);
        // Shares by weight: 2 000 each.
        for c in &counts {
            assert!((1_750..=2_250).contains(c), "{counts:?}");
        }
        let before: Vec<usize> = hashes(8_000).map(|h| pick(&pool, h, &[])).collect();
        pool.disable(0, DisableReason::Manual);
        for (h, &was) in hashes(8_000).zip(&before) {
            let now = pick(&pool, h, &[]);
            match was {
                0 => assert_eq!(now, 1, "a1's share stays with acme"),
                _ => assert_eq!(now, was),
            }
        }
        // With all of acme out, its share spreads over the other accounts.
        pool.disable(1, DisableReason::Manual);
        let moved: Vec<usize> = hashes(8_000)
            .zip(&before)
            .filter(|(_, &was)| was <= 1)
            .map(|(h, _)| pick(&pool, h, &[]))
            .collect();
        assert!(moved.iter().all(|&k| k >= 2));
        assert!(moved.contains(&2) && moved.contains(&3));
    }

    #[test]
    fn added_and_removed_keys_move_only_their_share() {
        let (pool, _) = pool_of(names(&["a", "b", "c"]), KeyPolicy::RoundRobin);
        let before: Vec<usize> = hashes(3_000).map(|h| pick(&pool, h, &[])).collect();
        let d = pool
            .add(KeySpec::from_secret(Secret::new("sk-new")))
            .unwrap();
        let mut gained = 0;
        for (h, &was) in hashes(3_000).zip(&before) {
            let now = pick(&pool, h, &[]);
            if now == d {
                gained += 1;
            } else {
                assert_eq!(now, was, "moved between old keys");
            }
        }
        // About a quarter of the hashes move to the new key.
        assert!((600..=900).contains(&gained), "{gained}");
        assert!(pool.remove(d));
        assert!(hashes(3_000)
            .zip(&before)
            .all(|(h, &was)| pick(&pool, h, &[]) == was));
        assert!(pool.affinity_order(1).iter().all(|&k| k != d));
    }

    #[test]
    fn the_uniform_fast_path_orders_like_the_weighted_formula() {
        let (pool, _) = pool_of(names(&["a", "b", "c", "d", "e"]), KeyPolicy::RoundRobin);
        let table = pool.inner.rendezvous.load();
        assert!(table.uniform);
        let slow = Rendezvous {
            candidates: table.candidates.clone(),
            uniform: false,
        };
        for h in hashes(2_000) {
            assert_eq!(table.order(h), slow.order(h));
        }
        let specs = vec![keyed("a", 1, None), keyed("b", 2, None)];
        let (weighted, _) = pool_of(specs, KeyPolicy::RoundRobin);
        assert!(!weighted.inner.rendezvous.load().uniform);
    }

    #[test]
    fn an_affine_pick_holds_a_lease_like_a_plain_one() {
        let (pool, _) = pool_of(names(&["a"]), KeyPolicy::LeastInFlight);
        let lease = match pool.pick_affine(1, "m", &[]) {
            Pick::Key(l) => l,
            other => panic!("{other:?}"),
        };
        assert_eq!(pool.status()[0].in_flight, 1);
        drop(lease);
        assert_eq!(pool.status()[0].in_flight, 0);
    }

    #[test]
    fn affinity_deserializes_from_snake_case() {
        let a: Affinity = serde_json::from_str("\"prompt\"").unwrap();
        assert_eq!(a, Affinity::Prompt);
        assert!(serde_json::from_str::<Affinity>("\"Prompt\"").is_err());
        assert_eq!(Affinity::default(), Affinity::None);
    }
}
