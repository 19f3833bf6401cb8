//! The order in which a route tries its upstreams, chosen afresh for each request.
//!
//! - [`Strategy::Fallback`]: config order.
//! - [`Strategy::Weighted`]: the first upstream is drawn in proportion to the route's weights; the
//!   others follow in config order as fallbacks.
//! - [`Strategy::Fastest`]: lowest moving-average time to first byte first, from a
//!   [`LatencyTable`] shared by every route; a small share of requests goes to another upstream so
//!   its figure stays current.
//!
//! [`RouteOrder::order_into`] runs once per request: it takes no lock and allocates nothing beyond
//! the caller's output `Vec` (which it reuses).

use rand::Rng;
use serde::Deserialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The share of [`Strategy::Fastest`] requests sent first to an upstream other than the fastest.
pub const DEFAULT_EXPLORE: f64 = 0.05;

/// How much a new sample moves the moving average: 0.3 follows a change within a handful of
/// answers while one slow answer does not reorder a route.
const EWMA_ALPHA: f64 = 0.3;

/// What a failure weighs at least in the moving average: a failed attempt cost the client a
/// round trip and a retry, so it counts as a slow answer.
const PENALTY_FLOOR_US: u64 = 1_000_000;

/// The ceiling of the moving average, so that a long outage does not leave an upstream needing
/// hundreds of good answers to win again once it recovers.
const MAX_EWMA_US: u64 = 60_000_000;

/// Routes with at most this many upstreams are sorted in a stack buffer.
const INLINE_UPSTREAMS: usize = 16;

/// How a route orders its upstreams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Config order: the first upstream takes everything, the others are fallbacks.
    #[default]
    Fallback,
    /// The first upstream is drawn in proportion to the route's weights; config order after it.
    Weighted,
    /// Lowest moving-average time to first byte first, exploring others now and then.
    Fastest,
}

/// Moving-average time to first byte per upstream, shared by every route and worker.
///
/// Indexed by upstream index (the same indices a [`RouteOrder`] lists). Each entry is one atomic
/// holding microseconds, 0 meaning "no sample yet", so reads are lock-free and updates are a
/// compare-and-swap. Indices outside the table read as unmeasured and are not recorded.
#[derive(Debug)]
pub struct LatencyTable {
    ewma_us: Vec<AtomicU64>,
}

impl LatencyTable {
    /// A table for `n_upstreams` upstreams, none measured yet.
    pub fn new(n_upstreams: usize) -> Self {
        Self {
            ewma_us: (0..n_upstreams).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Adds the time to first byte of a successful answer from `upstream`: the first sample
    /// sets the average, later ones blend in with weight 0.3.
    pub fn record(&self, upstream: usize, ttfb: Duration) {
        let sample = u64::try_from(ttfb.as_micros()).unwrap_or(u64::MAX);
        self.blend(upstream, |_| sample);
    }

    /// Counts a failed attempt (5xx, connect error, timeout) of `upstream` as a slow answer: a
    /// sample of twice its average or its average plus 1 s, whichever is larger (1 s when
    /// unmeasured), so an upstream that fails fast cannot stay first.
    pub fn penalize(&self, upstream: usize) {
        self.blend(upstream, |current| {
            current
                .saturating_mul(2)
                .max(current.saturating_add(PENALTY_FLOOR_US))
        });
    }

    /// The moving average of `upstream`, or `None` before its first sample.
    pub fn ewma(&self, upstream: usize) -> Option<Duration> {
        match self.ewma_us_of(upstream) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    /// The raw average in µs, 0 when unmeasured; what ordering compares.
    fn ewma_us_of(&self, upstream: usize) -> u64 {
        self.ewma_us
            .get(upstream)
            .map_or(0, |a| a.load(Ordering::Relaxed))
    }

    /// Blends the sample `sample_for(current)` into the average of `upstream`.
    fn blend(&self, upstream: usize, sample_for: impl Fn(u64) -> u64) {
        let Some(slot) = self.ewma_us.get(upstream) else {
            return;
        };
        // The closure always returns Some, so the update cannot fail; a lost race only retries.
        let _ = slot.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |current| {
            let sample = sample_for(current).min(MAX_EWMA_US);
            let next = if current == 0 {
                sample
            } else {
                // Both operands are at most MAX_EWMA_US, far inside f64's exact integer range.
                (current as f64 + EWMA_ALPHA * (sample as f64 - current as f64)).round() as u64
            };
            // 0 means "no sample": a sub-microsecond answer is still a sample.
            Some(next.clamp(1, MAX_EWMA_US))
        });
    }
}

/// A route's upstreams and how to order them for each request.
#[derive(Debug, Clone)]
pub struct RouteOrder {
    strategy: Strategy,
    upstreams: Vec<usize>,
    /// One per upstream, aligned with `upstreams`.
    weights: Vec<u32>,
    /// Sum of `weights`, so a weighted draw is one random number and one scan.
    total_weight: u64,
    explore: f64,
}

impl RouteOrder {
    /// A route trying `upstreams` (upstream indices, in config order) by `strategy`.
    ///
    /// `weights` are aligned with `upstreams`: missing ones count as 1 and extra ones are
    /// ignored; a weight of 0 makes an upstream a fallback only, never drawn first (if every
    /// weight is 0, config order is used). `explore` is the share of [`Strategy::Fastest`]
    /// requests that try another upstream first ([`DEFAULT_EXPLORE`] is the usual value); it is
    /// clamped to [0, 1] and NaN counts as 0.
    pub fn new(strategy: Strategy, upstreams: Vec<usize>, weights: Vec<u32>, explore: f64) -> Self {
        let weights: Vec<u32> = (0..upstreams.len())
            .map(|i| weights.get(i).copied().unwrap_or(1))
            .collect();
        let total_weight = weights.iter().map(|&w| u64::from(w)).sum();
        let explore = if explore.is_nan() {
            0.0
        } else {
            explore.clamp(0.0, 1.0)
        };
        Self {
            strategy,
            upstreams,
            weights,
            total_weight,
            explore,
        }
    }

    /// The strategy in use.
    pub fn strategy(&self) -> Strategy {
        self.strategy
    }

    /// The route's upstream indices in config order.
    pub fn upstreams(&self) -> &[usize] {
        &self.upstreams
    }

    /// The order to try this request's upstreams in, as a new `Vec`; see [`Self::order_into`].
    pub fn order(&self, latency: &LatencyTable, rng: &mut impl Rng) -> Vec<usize> {
        let mut out = Vec::with_capacity(self.upstreams.len());
        self.order_into(latency, rng, &mut out);
        out
    }

    /// Writes the order to try this request's upstreams in into `out` (cleared first; reuse it
    /// across requests to avoid allocating). Every upstream of the route appears exactly once.
    /// `rng` is only drawn from by the weighted and fastest strategies.
    pub fn order_into(&self, latency: &LatencyTable, rng: &mut impl Rng, out: &mut Vec<usize>) {
        out.clear();
        out.extend_from_slice(&self.upstreams);
        if out.len() < 2 {
            return;
        }
        match self.strategy {
            Strategy::Fallback => {}
            Strategy::Weighted => {
                if let Some(first) = self.draw_weighted(rng) {
                    // Moving it to the front keeps the others in config order.
                    out[..=first].rotate_right(1);
                }
            }
            Strategy::Fastest => self.order_fastest(latency, rng, out),
        }
    }

    /// The position (in `upstreams`) of the upstream drawn by weight, `None` when all are 0.
    fn draw_weighted(&self, rng: &mut impl Rng) -> Option<usize> {
        if self.total_weight == 0 {
            return None;
        }
        let mut roll = rng.random_range(0..self.total_weight);
        for (i, &w) in self.weights.iter().enumerate() {
            let w = u64::from(w);
            if roll < w {
                return Some(i);
            }
            roll -= w;
        }
        None
    }

    /// Unmeasured upstreams first (config order), then by average ascending; now and then one
    /// random other upstream is moved in front of the fastest.
    fn order_fastest(&self, latency: &LatencyTable, rng: &mut impl Rng, out: &mut [usize]) {
        // Snapshot every average once: other threads update them meanwhile, and a sort whose
        // keys change under it may panic. Position breaks ties, so equal averages (and the
        // unmeasured, all 0) keep config order.
        let key = |pos: usize, upstream: usize| (latency.ewma_us_of(upstream), pos);
        let mut inline = [(0u64, 0usize); INLINE_UPSTREAMS];
        let mut spilled = Vec::new();
        let keys: &mut [(u64, usize)] = if out.len() <= INLINE_UPSTREAMS {
            let keys = &mut inline[..out.len()];
            for (slot, (pos, &u)) in keys.iter_mut().zip(out.iter().enumerate()) {
                *slot = key(pos, u);
            }
            keys
        } else {
            spilled.extend(out.iter().enumerate().map(|(pos, &u)| key(pos, u)));
            &mut spilled
        };
        keys.sort_unstable();
        for (slot, &(_, pos)) in out.iter_mut().zip(keys.iter()) {
            *slot = self.upstreams[pos];
        }

        // Exploring only matters once all are measured: until then the unmeasured go first anyway.
        let all_measured = keys.first().is_some_and(|&(us, _)| us != 0);
        if all_measured && self.explore > 0.0 && rng.random::<f64>() < self.explore {
            let other = rng.random_range(1..out.len());
            // The fastest stays the first fallback.
            out[..=other].rotate_right(1);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    const DRAWS: usize = 10_000;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn rng() -> StdRng {
        StdRng::seed_from_u64(7)
    }

    /// How often each upstream index comes first over `DRAWS` orders.
    fn first_counts(route: &RouteOrder, latency: &LatencyTable, n: usize) -> Vec<usize> {
        let mut rng = rng();
        let mut counts = vec![0; n];
        let mut out = Vec::new();
        for _ in 0..DRAWS {
            route.order_into(latency, &mut rng, &mut out);
            counts[out[0]] += 1;
        }
        counts
    }

    #[test]
    fn strategy_names_deserialize_in_snake_case_and_default_to_fallback() {
        let parsed: Vec<Strategy> = serde_yaml::from_str("[fallback, weighted, fastest]").unwrap();
        assert_eq!(
            parsed,
            [Strategy::Fallback, Strategy::Weighted, Strategy::Fastest]
        );
        assert!(serde_yaml::from_str::<Strategy>("Fastest").is_err());
        assert_eq!(Strategy::default(), Strategy::Fallback);
    }

    #[test]
    fn fallback_keeps_config_order() {
        let latency = LatencyTable::new(5);
        latency.record(4, ms(1));
        let route = RouteOrder::new(Strategy::Fallback, vec![2, 0, 4], vec![], DEFAULT_EXPLORE);
        let mut rng = rng();
        for _ in 0..100 {
            assert_eq!(route.order(&latency, &mut rng), vec![2, 0, 4]);
        }
    }

    #[test]
    fn weighted_three_to_one_puts_the_heavy_upstream_first_three_times_in_four() {
        let latency = LatencyTable::new(2);
        let route = RouteOrder::new(Strategy::Weighted, vec![0, 1], vec![3, 1], DEFAULT_EXPLORE);
        let counts = first_counts(&route, &latency, 2);
        let share = counts[0] as f64 / DRAWS as f64;
        assert!((0.72..=0.78).contains(&share), "share {share}");
    }

    #[test]
    fn weighted_keeps_the_others_in_config_order_after_the_drawn_one() {
        let latency = LatencyTable::new(4);
        let route = RouteOrder::new(Strategy::Weighted, vec![3, 1, 2, 0], vec![0, 0, 1, 0], 0.0);
        assert_eq!(route.order(&latency, &mut rng()), vec![2, 3, 1, 0]);
    }

    #[test]
    fn weighted_with_missing_weights_counts_them_as_one() {
        let latency = LatencyTable::new(2);
        let route = RouteOrder::new(Strategy::Weighted, vec![0, 1], vec![], 0.0);
        let counts = first_counts(&route, &latency, 2);
        let share = counts[0] as f64 / DRAWS as f64;
        assert!((0.47..=0.53).contains(&share), "share {share}");
    }

    #[test]
    fn weighted_with_all_zero_weights_falls_back_to_config_order() {
        let latency = LatencyTable::new(3);
        let route = RouteOrder::new(Strategy::Weighted, vec![1, 0, 2], vec![0, 0, 0], 0.0);
        assert_eq!(route.order(&latency, &mut rng()), vec![1, 0, 2]);
    }

    #[test]
    fn fastest_sends_most_first_to_the_fast_upstream_and_some_to_the_slow_one() {
        let latency = LatencyTable::new(2);
        latency.record(0, ms(50));
        latency.record(1, ms(5));
        let route = RouteOrder::new(Strategy::Fastest, vec![0, 1], vec![], DEFAULT_EXPLORE);
        let counts = first_counts(&route, &latency, 2);
        assert!(counts[1] >= DRAWS * 90 / 100, "fast first {}", counts[1]);
        assert!(counts[0] >= DRAWS / 100, "slow first {}", counts[0]);
    }

    #[test]
    fn fastest_orders_measured_upstreams_by_average_and_keeps_the_fastest_second_when_exploring() {
        let latency = LatencyTable::new(3);
        latency.record(0, ms(30));
        latency.record(1, ms(10));
        latency.record(2, ms(20));
        let never = RouteOrder::new(Strategy::Fastest, vec![0, 1, 2], vec![], 0.0);
        assert_eq!(never.order(&latency, &mut rng()), vec![1, 2, 0]);

        let always = RouteOrder::new(Strategy::Fastest, vec![0, 1, 2], vec![], 1.0);
        let mut rng = rng();
        for _ in 0..100 {
            let order = always.order(&latency, &mut rng);
            assert_ne!(order[0], 1);
            assert_eq!(order[1], 1);
        }
    }

    #[test]
    fn unmeasured_upstream_goes_first() {
        let latency = LatencyTable::new(3);
        latency.record(0, ms(5));
        latency.record(2, ms(50));
        let route = RouteOrder::new(Strategy::Fastest, vec![0, 1, 2], vec![], DEFAULT_EXPLORE);
        let mut rng = rng();
        for _ in 0..1000 {
            assert_eq!(route.order(&latency, &mut rng), vec![1, 0, 2]);
        }
    }

    #[test]
    fn penalize_moves_a_fast_but_failing_upstream_behind_a_slower_one() {
        let latency = LatencyTable::new(2);
        latency.record(0, ms(50));
        latency.record(1, ms(5));
        let route = RouteOrder::new(Strategy::Fastest, vec![0, 1], vec![], 0.0);
        assert_eq!(route.order(&latency, &mut rng()), vec![1, 0]);
        for _ in 0..3 {
            latency.penalize(1);
        }
        assert_eq!(route.order(&latency, &mut rng()), vec![0, 1]);
    }

    #[test]
    fn penalized_upstream_wins_again_after_good_answers() {
        let latency = LatencyTable::new(2);
        latency.record(0, ms(50));
        latency.record(1, ms(5));
        latency.penalize(1);
        for _ in 0..10 {
            latency.record(1, ms(5));
        }
        let route = RouteOrder::new(Strategy::Fastest, vec![0, 1], vec![], 0.0);
        assert_eq!(route.order(&latency, &mut rng()), vec![1, 0]);
    }

    #[test]
    fn penalty_is_one_second_or_double_blended_in_and_capped() {
        let latency = LatencyTable::new(3);
        latency.penalize(0);
        assert_eq!(latency.ewma(0), Some(Duration::from_secs(1)));

        latency.record(1, ms(100));
        latency.penalize(1);
        // Sample 1.1 s: 100 ms + 0.3 × 1000 ms.
        assert_eq!(latency.ewma(1), Some(ms(400)));

        latency.record(2, Duration::from_secs(10));
        latency.penalize(2);
        // Sample 20 s: 10 s + 0.3 × 10 s.
        assert_eq!(latency.ewma(2), Some(Duration::from_secs(13)));
        for _ in 0..100 {
            latency.penalize(2);
        }
        // The average closes in on the 60 s ceiling and never passes it.
        let capped = latency.ewma(2).unwrap();
        assert!(capped > Duration::from_secs(59) && capped <= Duration::from_secs(60));
    }

    #[test]
    fn first_sample_sets_the_average_and_later_ones_blend_with_weight_point_three() {
        let latency = LatencyTable::new(1);
        assert_eq!(latency.ewma(0), None);
        latency.record(0, ms(100));
        assert_eq!(latency.ewma(0), Some(ms(100)));
        latency.record(0, ms(200));
        assert_eq!(latency.ewma(0), Some(ms(130)));
        latency.record(0, ms(30));
        assert_eq!(latency.ewma(0), Some(ms(100)));
    }

    #[test]
    fn zero_ttfb_still_counts_as_a_sample() {
        let latency = LatencyTable::new(1);
        latency.record(0, Duration::ZERO);
        assert_eq!(latency.ewma(0), Some(Duration::from_micros(1)));
    }

    #[test]
    fn indices_outside_the_table_read_as_unmeasured_and_are_ignored() {
        let latency = LatencyTable::new(1);
        latency.record(5, ms(1));
        latency.penalize(5);
        assert_eq!(latency.ewma(5), None);
    }

    #[test]
    fn routes_longer_than_the_inline_buffer_are_ordered_too() {
        let n = INLINE_UPSTREAMS + 4;
        let latency = LatencyTable::new(n);
        for u in 0..n {
            latency.record(u, ms((n - u) as u64));
        }
        let route = RouteOrder::new(Strategy::Fastest, (0..n).collect(), vec![], 0.0);
        let expected: Vec<usize> = (0..n).rev().collect();
        assert_eq!(route.order(&latency, &mut rng()), expected);
    }

    #[test]
    fn every_strategy_lists_each_upstream_exactly_once() {
        let latency = LatencyTable::new(4);
        latency.record(1, ms(3));
        latency.record(3, ms(1));
        let mut rng = rng();
        for strategy in [Strategy::Fallback, Strategy::Weighted, Strategy::Fastest] {
            let route = RouteOrder::new(strategy, vec![3, 0, 1, 2], vec![1, 2, 3, 4], 0.5);
            for _ in 0..200 {
                let mut order = route.order(&latency, &mut rng);
                order.sort_unstable();
                assert_eq!(order, vec![0, 1, 2, 3], "{strategy:?}");
            }
        }
    }

    #[test]
    fn single_upstream_route_is_returned_as_is() {
        let latency = LatencyTable::new(1);
        for strategy in [Strategy::Fallback, Strategy::Weighted, Strategy::Fastest] {
            let route = RouteOrder::new(strategy, vec![0], vec![], 1.0);
            assert_eq!(route.order(&latency, &mut rng()), vec![0]);
        }
    }
}
