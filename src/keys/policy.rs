//! Selection policies, and the precomputed ring behind the weighted one.

use serde::{Deserialize, Serialize};
use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// How a [`super::KeyPool`] chooses among the keys usable for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyPolicy {
    /// Each usable key in turn: spreads a rate limit evenly over the keys.
    #[default]
    RoundRobin,
    /// In turn, in proportion to each key's weight, interleaved (not `a a b b` but `a b a b`).
    Weighted,
    /// Uniformly at random among usable keys.
    Random,
    /// The key with the fewest requests in flight; ties go to the next in rotation.
    LeastInFlight,
    /// The key with the most of its rate limits left, relative to the limit (the least of
    /// requests and tokens, as the upstream's `x-ratelimit-*` headers report them, less what
    /// was sent since); ties go to the next in rotation. Keys that report nothing count as
    /// having all of their limits left, so a pool whose upstream sends no such headers rotates
    /// exactly as with round-robin.
    Headroom,
}

/// The most ring slots the weighted policy will allocate per key (beyond a floor of 64k slots),
/// so that a config with weights in the millions cannot make keygate allocate gigabytes.
/// Weights whose sum exceeds it are scaled down proportionally.
const RING_SLOTS_PER_KEY: usize = 8;
const RING_MIN_CAP: usize = 1 << 16;

/// The order of the weighted policy: key indices, each appearing in proportion to its weight,
/// spread evenly.
///
/// Key `i` with weight `w` owns the virtual times `(2k+1) / 2w` for `k < w` (stride scheduling);
/// the ring lists all of them in time order, ties by index. Weights are divided by their gcd, a
/// weight 0 counts as 1 (a key in the config is meant to be used), and every key keeps at least
/// one slot when the sum has to be scaled down.
pub(super) fn weighted_ring(weights: &[u32]) -> Vec<usize> {
    let mut ws: Vec<u64> = weights.iter().map(|&w| u64::from(w.max(1))).collect();
    let g = ws.iter().copied().fold(0, gcd);
    if g > 1 {
        ws.iter_mut().for_each(|w| *w /= g);
    }
    let cap = (weights.len().saturating_mul(RING_SLOTS_PER_KEY)).max(RING_MIN_CAP) as u128;
    let total: u128 = ws.iter().map(|&w| u128::from(w)).sum();
    if total > cap {
        for w in &mut ws {
            // w * cap / total <= cap fits in u64 since cap does.
            let scaled = u128::from(*w) * cap / total;
            *w = u64::try_from(scaled).unwrap_or(u64::MAX).max(1);
        }
    }
    let len: u64 = ws.iter().sum();
    let mut ring = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    let mut heap: BinaryHeap<Slot> = ws
        .iter()
        .enumerate()
        .map(|(idx, &w)| Slot {
            num: 1,
            den: 2 * w,
            idx,
        })
        .collect();
    while let Some(slot) = heap.pop() {
        ring.push(slot.idx);
        let next = slot.num + 2;
        // The k-th slot has num 2k+1; the key has w = den/2 slots in all.
        if next < slot.den {
            heap.push(Slot { num: next, ..slot });
        }
    }
    ring
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// A virtual time `num/den` owned by key `idx`; ordered so that the max-heap pops the earliest.
#[derive(Clone, Copy)]
struct Slot {
    num: u64,
    den: u64,
    idx: usize,
}

impl Ord for Slot {
    fn cmp(&self, other: &Self) -> Ordering {
        let lhs = u128::from(self.num) * u128::from(other.den);
        let rhs = u128::from(other.num) * u128::from(self.den);
        rhs.cmp(&lhs).then_with(|| other.idx.cmp(&self.idx))
    }
}

impl PartialOrd for Slot {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Slot {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Slot {}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(ring: &[usize], idx: usize) -> usize {
        ring.iter().filter(|&&i| i == idx).count()
    }

    #[test]
    fn equal_weights_make_a_plain_rotation() {
        assert_eq!(weighted_ring(&[1, 1, 1]), vec![0, 1, 2]);
        assert_eq!(weighted_ring(&[5, 5, 5]), vec![0, 1, 2]);
    }

    #[test]
    fn weights_are_interleaved_not_bunched() {
        assert_eq!(weighted_ring(&[1, 2]), vec![1, 0, 1]);
        assert_eq!(weighted_ring(&[1, 3]), vec![1, 0, 1, 1]);
        let ring = weighted_ring(&[2, 2, 4]);
        assert_eq!(ring.len(), 4);
        assert_eq!(count(&ring, 2), 2);
        assert_ne!(ring[0], ring[1]);
    }

    #[test]
    fn zero_weight_counts_as_one() {
        assert_eq!(weighted_ring(&[0, 1]), vec![0, 1]);
    }

    #[test]
    fn huge_weights_are_scaled_down_keeping_every_key() {
        let ring = weighted_ring(&[u32::MAX, 1, u32::MAX / 2]);
        assert!(ring.len() <= RING_MIN_CAP + 3);
        assert_eq!(count(&ring, 1), 1);
        let (a, c) = (count(&ring, 0), count(&ring, 2));
        assert!((a as f64 / c as f64 - 2.0).abs() < 0.01, "{a} {c}");
    }

    #[test]
    fn policy_deserializes_from_snake_case() {
        let p: KeyPolicy = serde_json::from_str("\"least_in_flight\"").unwrap_or_default();
        assert_eq!(p, KeyPolicy::LeastInFlight);
        let p: KeyPolicy = serde_json::from_str("\"round_robin\"").unwrap_or(KeyPolicy::Random);
        assert_eq!(p, KeyPolicy::RoundRobin);
        assert!(serde_json::from_str::<KeyPolicy>("\"fastest\"").is_err());
        assert_eq!(KeyPolicy::default(), KeyPolicy::RoundRobin);
    }
}
