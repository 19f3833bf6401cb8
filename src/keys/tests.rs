#![allow(clippy::unwrap_used)]

use super::*;
use crate::clock::{ManualClock, SharedClock};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

const GPT4O: &str = "gpt-4o";
const MINI: &str = "gpt-4o-mini";

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn spec(name: &str) -> KeySpec {
    KeySpec {
        organization: None,
        project: None,
        name: name.to_string(),
        secret: Secret::new(format!("sk-secret-{name}")),
        weight: 1,
        account: None,
    }
}

fn pool_of(specs: Vec<KeySpec>, policy: KeyPolicy) -> (KeyPool, Arc<ManualClock>) {
    let clock = ManualClock::new();
    let shared: SharedClock = clock.clone();
    let pool = KeyPool::new("openai", specs, policy, CooldownPolicy::default(), shared);
    (pool, clock)
}

fn pool(names: &[&str], policy: KeyPolicy) -> (KeyPool, Arc<ManualClock>) {
    pool_of(names.iter().map(|n| spec(n)).collect(), policy)
}

/// Picks and drops the lease at once; panics on anything but a key.
fn pick_idx(pool: &KeyPool, model: &str, exclude: &[usize]) -> usize {
    match pool.pick(model, exclude) {
        Pick::Key(lease) => lease.index(),
        other => panic!("expected a key, got {other:?}"),
    }
}

fn tally(pool: &KeyPool, model: &str, picks: usize) -> Vec<usize> {
    let mut counts = vec![0; pool.len()];
    for _ in 0..picks {
        counts[pick_idx(pool, model, &[])] += 1;
    }
    counts
}

#[test]
fn round_robin_300_picks_over_3_keys_gives_exactly_100_each() {
    let (pool, _) = pool(&["a", "b", "c"], KeyPolicy::RoundRobin);
    assert_eq!(tally(&pool, GPT4O, 300), vec![100, 100, 100]);
}

#[test]
fn round_robin_visits_keys_in_order() {
    let (pool, _) = pool(&["a", "b", "c"], KeyPolicy::RoundRobin);
    let order: Vec<usize> = (0..6).map(|_| pick_idx(&pool, GPT4O, &[])).collect();
    assert_eq!(order, vec![0, 1, 2, 0, 1, 2]);
}

#[test]
fn round_robin_stays_fair_over_the_usable_keys_when_some_cool() {
    let (pool, _) = pool(&["a", "b", "c", "d"], KeyPolicy::RoundRobin);
    pool.cool_down(1, GPT4O, Some(secs(60)));
    assert_eq!(tally(&pool, GPT4O, 300), vec![100, 0, 100, 100]);
}

#[test]
fn cooldown_for_one_model_leaves_the_key_usable_for_another() {
    let (pool, _) = pool(&["a"], KeyPolicy::RoundRobin);
    assert_eq!(pool.cool_down(0, GPT4O, Some(secs(2))), secs(2));
    assert!(matches!(pool.pick(GPT4O, &[]), Pick::AllCooling { .. }));
    assert_eq!(pick_idx(&pool, MINI, &[]), 0);
}

#[test]
fn cooldown_for_all_models_blocks_every_model() {
    let (pool, _) = pool(&["a"], KeyPolicy::RoundRobin);
    pool.cool_down(0, ALL_MODELS, Some(secs(2)));
    assert!(matches!(pool.pick(GPT4O, &[]), Pick::AllCooling { .. }));
    assert!(matches!(pool.pick(MINI, &[]), Pick::AllCooling { .. }));
    assert!(matches!(
        pool.pick(ALL_MODELS, &[]),
        Pick::AllCooling { .. }
    ));
}

#[test]
fn a_model_cooldown_does_not_block_requests_without_a_model() {
    let (pool, _) = pool(&["a"], KeyPolicy::RoundRobin);
    pool.cool_down(0, GPT4O, Some(secs(2)));
    assert_eq!(pick_idx(&pool, ALL_MODELS, &[]), 0);
}

#[test]
fn key_cooling_for_several_models_blocks_exactly_those() {
    let (pool, clock) = pool(&["a"], KeyPolicy::RoundRobin);
    pool.cool_down(0, GPT4O, Some(secs(10)));
    pool.cool_down(0, MINI, Some(secs(5)));
    assert!(matches!(pool.pick(GPT4O, &[]), Pick::AllCooling { retry_in } if retry_in == secs(10)));
    assert!(matches!(pool.pick(MINI, &[]), Pick::AllCooling { retry_in } if retry_in == secs(5)));
    assert_eq!(pick_idx(&pool, "o3", &[]), 0);
    clock.advance(secs(5));
    assert_eq!(pick_idx(&pool, MINI, &[]), 0);
    assert!(matches!(pool.pick(GPT4O, &[]), Pick::AllCooling { retry_in } if retry_in == secs(5)));
    pool.cool_down(0, ALL_MODELS, Some(secs(8)));
    assert!(matches!(pool.pick("o3", &[]), Pick::AllCooling { retry_in } if retry_in == secs(8)));
    assert!(matches!(pool.pick(GPT4O, &[]), Pick::AllCooling { retry_in } if retry_in == secs(8)));
}

#[test]
fn success_during_a_running_cooldown_resets_backoff_but_keeps_the_cooldown() {
    let (pool, clock) = pool(&["a"], KeyPolicy::RoundRobin);
    pool.cool_down(0, GPT4O, None);
    clock.advance(secs(1));
    pool.cool_down(0, GPT4O, Some(secs(10)));
    // A request that started before the 429 succeeds.
    pool.on_success(0, GPT4O);
    assert!(matches!(pool.pick(GPT4O, &[]), Pick::AllCooling { .. }));
    clock.advance(secs(10));
    assert_eq!(pool.cool_down(0, GPT4O, None), secs(1));
}

#[test]
fn cooldown_expires_when_the_clock_passes_it() {
    let (pool, clock) = pool(&["a", "b"], KeyPolicy::RoundRobin);
    pool.cool_down(0, GPT4O, Some(secs(5)));
    clock.advance(Duration::from_millis(4999));
    assert_eq!(pick_idx(&pool, GPT4O, &[]), 1);
    assert_eq!(pick_idx(&pool, GPT4O, &[]), 1);
    clock.advance(Duration::from_millis(1));
    let picked: Vec<usize> = (0..2).map(|_| pick_idx(&pool, GPT4O, &[])).collect();
    assert!(picked.contains(&0), "{picked:?}");
    assert_eq!(pool.counts().cooling, 0);
}

#[test]
fn backoff_doubles_caps_and_resets_on_success() {
    let (pool, clock) = pool(&["a"], KeyPolicy::RoundRobin);
    let mut applied = Vec::new();
    for _ in 0..8 {
        let d = pool.cool_down(0, GPT4O, None);
        applied.push(d.as_secs());
        clock.advance(d);
    }
    assert_eq!(applied, vec![1, 2, 4, 8, 16, 32, 60, 60]);
    // A success for another model resets nothing for this one.
    pool.on_success(0, MINI);
    assert_eq!(pool.cool_down(0, GPT4O, None), secs(60));
    clock.advance(secs(60));
    pool.on_success(0, GPT4O);
    assert_eq!(pool.cool_down(0, GPT4O, None), secs(1));
}

#[test]
fn backoff_is_per_key_and_model() {
    let (pool, clock) = pool(&["a", "b"], KeyPolicy::RoundRobin);
    assert_eq!(pool.cool_down(0, GPT4O, None), secs(1));
    clock.advance(secs(1));
    assert_eq!(pool.cool_down(0, GPT4O, None), secs(2));
    assert_eq!(pool.cool_down(0, MINI, None), secs(1));
    assert_eq!(pool.cool_down(1, GPT4O, None), secs(1));
}

#[test]
fn backoff_is_forgotten_after_a_quiet_max_backoff() {
    let (pool, clock) = pool(&["a"], KeyPolicy::RoundRobin);
    pool.cool_down(0, GPT4O, None);
    clock.advance(secs(1));
    assert_eq!(pool.cool_down(0, GPT4O, None), secs(2));
    clock.advance(secs(2) + secs(60));
    assert_eq!(pool.cool_down(0, GPT4O, None), secs(1));
}

#[test]
fn requested_cooldown_is_exact_and_capped_at_max() {
    let (pool, _) = pool(&["a", "b"], KeyPolicy::RoundRobin);
    assert_eq!(
        pool.cool_down(0, GPT4O, Some(Duration::from_millis(1500))),
        Duration::from_millis(1500)
    );
    assert_eq!(pool.cool_down(1, GPT4O, Some(secs(3600))), secs(300));
}

#[test]
fn requested_zero_applies_no_cooldown_but_counts_towards_backoff() {
    let (pool, _) = pool(&["a"], KeyPolicy::RoundRobin);
    assert_eq!(
        pool.cool_down(0, GPT4O, Some(Duration::ZERO)),
        Duration::ZERO
    );
    assert_eq!(pick_idx(&pool, GPT4O, &[]), 0);
    assert_eq!(pool.counts().ready, 1);
    assert_eq!(pool.cool_down(0, GPT4O, None), secs(2));
}

#[test]
fn a_running_cooldown_is_never_shortened() {
    let (pool, _) = pool(&["a"], KeyPolicy::RoundRobin);
    pool.cool_down(0, GPT4O, Some(secs(30)));
    assert_eq!(pool.cool_down(0, GPT4O, Some(secs(1))), secs(30));
    assert_eq!(pool.cool_down(0, GPT4O, Some(secs(45))), secs(45));
}

#[test]
fn all_disabled_when_every_key_is_disabled() {
    let (pool, _) = pool(&["a", "b"], KeyPolicy::RoundRobin);
    assert!(pool.disable(0, DisableReason::Unauthorized));
    assert!(pool.disable(1, DisableReason::InsufficientQuota));
    assert!(matches!(pool.pick(GPT4O, &[]), Pick::AllDisabled));
    assert!(matches!(pool.pick(GPT4O, &[0]), Pick::AllDisabled));
}

#[test]
fn empty_pool_answers_all_disabled() {
    let (pool, _) = pool(&[], KeyPolicy::RoundRobin);
    assert!(pool.is_empty());
    assert!(matches!(pool.pick(GPT4O, &[]), Pick::AllDisabled));
}

#[test]
fn cooling_and_disabled_give_all_cooling_with_the_shortest_remaining() {
    let (pool, clock) = pool(&["a", "b", "c"], KeyPolicy::RoundRobin);
    pool.cool_down(0, GPT4O, Some(secs(30)));
    pool.cool_down(1, GPT4O, Some(secs(10)));
    pool.disable(2, DisableReason::Forbidden);
    clock.advance(secs(4));
    match pool.pick(GPT4O, &[]) {
        Pick::AllCooling { retry_in } => assert_eq!(retry_in, secs(6)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn excluded_cooling_keys_still_count_as_cooling() {
    // The caller tried key a, which answered 429 and cooled: the answer is "all cooling".
    let (pool, _) = pool(&["a", "b"], KeyPolicy::RoundRobin);
    pool.cool_down(0, GPT4O, Some(secs(3)));
    pool.disable(1, DisableReason::Unauthorized);
    assert!(matches!(
        pool.pick(GPT4O, &[0]),
        Pick::AllCooling { retry_in } if retry_in == secs(3)
    ));
}

#[test]
fn exhausted_when_only_excluded_keys_are_usable() {
    let (pool, _) = pool(&["a", "b", "c"], KeyPolicy::RoundRobin);
    pool.disable(2, DisableReason::Unauthorized);
    assert_eq!(pick_idx(&pool, GPT4O, &[0]), 1);
    assert!(matches!(pool.pick(GPT4O, &[0, 1]), Pick::Exhausted));
    // Even with cooling keys around, usable-but-tried keys mean the keys are not the problem.
    pool.cool_down(1, GPT4O, Some(secs(5)));
    assert!(matches!(pool.pick(GPT4O, &[0]), Pick::Exhausted));
}

#[test]
fn exclude_is_honoured_by_every_policy() {
    for policy in [
        KeyPolicy::RoundRobin,
        KeyPolicy::Weighted,
        KeyPolicy::Random,
        KeyPolicy::LeastInFlight,
    ] {
        let (pool, _) = pool(&["a", "b", "c"], policy);
        for _ in 0..50 {
            assert_eq!(pick_idx(&pool, GPT4O, &[0, 2]), 1, "{policy:?}");
        }
        assert!(matches!(pool.pick(GPT4O, &[0, 1, 2]), Pick::Exhausted));
    }
}

#[test]
fn disable_and_enable_report_whether_the_state_changed() {
    let (pool, _) = pool(&["a", "b"], KeyPolicy::RoundRobin);
    assert!(pool.disable(1, DisableReason::Unauthorized));
    assert!(!pool.disable(1, DisableReason::Forbidden));
    assert_eq!(pool.disabled(), vec![(1, DisableReason::Unauthorized)]);
    for _ in 0..5 {
        assert_eq!(pick_idx(&pool, GPT4O, &[]), 0);
    }
    assert!(pool.enable(1));
    assert!(!pool.enable(1));
    assert!(pool.disabled().is_empty());
    assert_eq!(tally(&pool, GPT4O, 10), vec![5, 5]);
}

#[test]
fn unknown_indices_are_ignored_by_state_changes() {
    let (pool, _) = pool(&["a"], KeyPolicy::RoundRobin);
    assert_eq!(pool.cool_down(7, GPT4O, None), Duration::ZERO);
    assert!(!pool.disable(7, DisableReason::Forbidden));
    assert!(!pool.enable(7));
    pool.on_success(7, GPT4O);
    assert_eq!(pool.counts().ready, 1);
}

#[test]
fn account_cooldown_cools_exactly_that_accounts_keys() {
    let mut specs: Vec<KeySpec> = ["a", "b", "c", "d"].iter().map(|n| spec(n)).collect();
    specs[0].account = Some("org-1".into());
    specs[2].account = Some("org-1".into());
    specs[3].account = Some("org-2".into());
    let (pool, _) = pool_of(specs, KeyPolicy::RoundRobin);
    assert_eq!(
        pool.cool_down_account("org-1", GPT4O, Some(secs(20)), None),
        vec![0, 2]
    );
    assert_eq!(tally(&pool, GPT4O, 20), vec![0, 10, 0, 10]);
    assert_eq!(tally(&pool, MINI, 20), vec![5, 5, 5, 5]);
    assert!(pool
        .cool_down_account("org-404", GPT4O, None, None)
        .is_empty());
    assert_eq!(pool.account(0), Some("org-1"));
    assert_eq!(pool.account(1), None);
}

#[test]
fn weighted_gives_weight_2_twice_the_picks_of_weight_1() {
    let mut specs: Vec<KeySpec> = ["a", "b", "c"].iter().map(|n| spec(n)).collect();
    specs[1].weight = 2;
    let (pool, _) = pool_of(specs, KeyPolicy::Weighted);
    assert_eq!(tally(&pool, GPT4O, 400), vec![100, 200, 100]);
}

#[test]
fn weighted_skips_cooling_keys_and_keeps_the_others_ratio() {
    let mut specs: Vec<KeySpec> = ["a", "b", "c"].iter().map(|n| spec(n)).collect();
    specs[0].weight = 3;
    specs[1].weight = 1;
    specs[2].weight = 5;
    let (pool, _) = pool_of(specs, KeyPolicy::Weighted);
    pool.cool_down(2, GPT4O, Some(secs(60)));
    assert_eq!(tally(&pool, GPT4O, 400), vec![300, 100, 0]);
}

#[test]
fn random_picks_only_usable_keys_and_reaches_all_of_them() {
    let (pool, _) = pool(&["a", "b", "c", "d"], KeyPolicy::Random);
    pool.cool_down(1, GPT4O, Some(secs(60)));
    pool.disable(3, DisableReason::Forbidden);
    let counts = tally(&pool, GPT4O, 2000);
    assert_eq!(counts[1] + counts[3], 0, "{counts:?}");
    assert!(counts[0] > 800 && counts[2] > 800, "{counts:?}");
    pool.cool_down(0, GPT4O, Some(secs(60)));
    pool.cool_down(2, GPT4O, Some(secs(30)));
    assert!(matches!(
        pool.pick(GPT4O, &[]),
        Pick::AllCooling { retry_in } if retry_in == secs(30)
    ));
}

#[test]
fn least_in_flight_prefers_keys_with_fewer_leases_held() {
    let (pool, _) = pool(&["a", "b", "c"], KeyPolicy::LeastInFlight);
    let mut held = Vec::new();
    for _ in 0..3 {
        match pool.pick(GPT4O, &[]) {
            Pick::Key(lease) => held.push(lease),
            other => panic!("{other:?}"),
        }
    }
    let mut first: Vec<usize> = held.iter().map(KeyLease::index).collect();
    first.sort_unstable();
    assert_eq!(first, vec![0, 1, 2]);
    // Release b: it is the only key with nothing in flight.
    held.retain(|l| l.index() != 1);
    for _ in 0..3 {
        assert_eq!(pick_idx(&pool, GPT4O, &[]), 1);
    }
    // Hold a second lease on b: a and c (1 each) now beat it (2), in rotation.
    let extra = match pool.pick(GPT4O, &[]) {
        Pick::Key(lease) => lease,
        other => panic!("{other:?}"),
    };
    assert_eq!(extra.index(), 1);
    let extra2 = match pool.pick(GPT4O, &[]) {
        Pick::Key(lease) => lease,
        other => panic!("{other:?}"),
    };
    assert_ne!(extra2.index(), 1);
    let statuses = pool.status();
    let in_flight: Vec<usize> = statuses.iter().map(|s| s.in_flight).collect();
    assert_eq!(in_flight.iter().sum::<usize>(), 4);
    drop((held, extra, extra2));
    assert!(pool.status().iter().all(|s| s.in_flight == 0));
}

#[test]
fn least_in_flight_breaks_ties_by_rotation() {
    let (pool, _) = pool(&["a", "b", "c"], KeyPolicy::LeastInFlight);
    assert_eq!(tally(&pool, GPT4O, 300), vec![100, 100, 100]);
}

#[test]
fn status_and_counts_report_each_state() {
    let mut specs: Vec<KeySpec> = ["a", "b", "c", "d"].iter().map(|n| spec(n)).collect();
    specs[0].account = Some("org-1".into());
    let (pool, clock) = pool_of(specs, KeyPolicy::RoundRobin);
    pool.cool_down(1, GPT4O, Some(secs(10)));
    pool.cool_down(1, ALL_MODELS, Some(secs(5)));
    pool.disable(2, DisableReason::InsufficientQuota);
    pool.cool_down(2, GPT4O, Some(secs(10)));
    clock.advance(secs(1));
    assert_eq!(
        pool.counts(),
        StateCounts {
            ready: 2,
            cooling: 1,
            disabled: 1
        }
    );
    let status = pool.status();
    assert_eq!(status[0].name, "a");
    assert_eq!(status[0].account.as_deref(), Some("org-1"));
    assert_eq!(status[0].state, KeyState::Ready);
    assert_eq!(
        status[1].state,
        KeyState::Cooling {
            cooldowns: vec![
                ModelCooldown {
                    model: Some(GPT4O.into()),
                    remaining: secs(9)
                },
                ModelCooldown {
                    model: None,
                    remaining: secs(4)
                },
            ]
        }
    );
    assert_eq!(
        status[2].state,
        KeyState::Disabled {
            reason: DisableReason::InsufficientQuota
        }
    );
    let json = serde_json::to_string(&status[1]).unwrap();
    assert!(json.contains(r#""state":"cooling""#), "{json}");
    assert!(json.contains(r#""remaining_ms":9000"#), "{json}");
    let json = serde_json::to_string(&status[2]).unwrap();
    assert!(json.contains(r#""reason":"insufficient_quota""#), "{json}");
}

#[test]
fn lease_gives_name_secret_and_account() {
    let mut specs = vec![spec("a")];
    specs[0].account = Some("org-1".into());
    let (pool, _) = pool_of(specs, KeyPolicy::RoundRobin);
    let Pick::Key(lease) = pool.pick(GPT4O, &[]) else {
        panic!("no key")
    };
    assert_eq!(lease.name(), "a");
    assert_eq!(lease.secret().expose(), "sk-secret-a");
    assert_eq!(lease.account(), Some("org-1"));
    assert_eq!(pool.name(0), "a");
    assert_eq!(pool.secret(0).expose(), "sk-secret-a");
    assert_eq!(pool.index_of("a"), Some(0));
    assert_eq!(pool.index_of("zz"), None);
}

#[test]
fn nothing_the_pool_debug_prints_contains_a_secret() {
    let (pool, _) = pool(&["a", "b"], KeyPolicy::RoundRobin);
    pool.cool_down(0, GPT4O, Some(secs(3)));
    let pick = pool.pick(GPT4O, &[]);
    let shown = format!(
        "{pool:?} {pick:?} {:?} {:?} {:?}",
        pool.status(),
        pool.secret(1),
        KeySpec::from_secret(Secret::new("sk-secret-x"))
    );
    assert!(!shown.contains("sk-secret"), "{shown}");
    assert!(shown.contains("openai"));
}

#[test]
fn unnamed_key_is_named_after_its_hash() {
    let spec = KeySpec::from_secret(Secret::new("abc"));
    assert_eq!(spec.name, "key-ba7816bf");
    assert_eq!(key_id("abc"), "key-ba7816bf");
    assert_eq!(spec.weight, 1);
}

#[test]
fn pool_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync + 'static>() {}
    assert_send_sync::<KeyPool>();
    assert_send_sync::<KeyLease>();
}

#[test]
fn concurrent_round_robin_picks_stay_exactly_fair() {
    let (pool, _) = pool(&["a", "b", "c"], KeyPolicy::RoundRobin);
    let threads = 8;
    let per_thread = 3000;
    let counts: Vec<HashMap<usize, usize>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut counts = HashMap::new();
                    for _ in 0..per_thread {
                        *counts.entry(pick_idx(&pool, GPT4O, &[])).or_insert(0) += 1;
                    }
                    counts
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut total = [0usize; 3];
    for c in counts {
        for (k, v) in c {
            total[k] += v;
        }
    }
    let expected = threads * per_thread / 3;
    for t in total {
        assert!(t.abs_diff(expected) <= 1, "{total:?}");
    }
}

#[test]
fn many_keys_with_a_third_cooling_pick_only_usable_ones_fairly() {
    let n = 3000;
    let names: Vec<String> = (0..n).map(|i| format!("k{i}")).collect();
    let (pool, _) = pool_of(
        names.iter().map(|n| spec(n)).collect(),
        KeyPolicy::RoundRobin,
    );
    // A contiguous third, the worst case for a scan that does not move the cursor past it.
    for i in 0..n / 3 {
        pool.cool_down(i, GPT4O, Some(secs(60)));
    }
    let counts = tally(&pool, GPT4O, 2 * (n - n / 3));
    assert!(counts[..n / 3].iter().all(|&c| c == 0));
    assert!(counts[n / 3..].iter().all(|&c| c == 2));
    assert_eq!(
        pool.counts(),
        StateCounts {
            ready: n - n / 3,
            cooling: n / 3,
            disabled: 0
        }
    );
}

#[test]
fn a_burst_of_429s_from_requests_in_flight_is_one_strike() {
    // Twenty requests were in flight on the key when its first 429 came back: the other
    // nineteen 429s belong to the same episode and must not raise the backoff.
    let (pool, clock) = pool(&["a"], KeyPolicy::RoundRobin);
    let burst: Vec<Duration> = (0..20).map(|_| pool.cool_down(0, GPT4O, None)).collect();
    assert!(burst.iter().all(|&d| d == secs(1)), "{burst:?}");
    clock.advance(secs(1));
    assert_eq!(pool.cool_down(0, GPT4O, None), secs(2), "second episode");
}

#[test]
fn a_429_while_cooling_adds_no_strike_but_a_longer_ask_extends_the_episode() {
    let (pool, clock) = pool(&["a"], KeyPolicy::RoundRobin);
    let first = pool.on_rate_limit(0, GPT4O, Some(secs(5)));
    assert!(first.started);
    assert_eq!(first.strikes, 1);
    let late = pool.on_rate_limit(0, GPT4O, None);
    assert!(!late.started, "already cooling: same episode");
    assert_eq!((late.remaining, late.strikes), (secs(5), 1));
    let longer = pool.on_rate_limit(0, GPT4O, Some(secs(10)));
    assert!(!longer.started && longer.extended);
    assert_eq!((longer.remaining, longer.strikes), (secs(10), 1));
    clock.advance(secs(10));
    // One strike so far, so the next episode's backoff is the second step.
    assert_eq!(pool.cool_down(0, GPT4O, None), secs(2));
}

#[test]
fn a_429_for_a_model_while_the_key_cools_for_every_model_adds_no_strike() {
    let (pool, clock) = pool(&["a"], KeyPolicy::RoundRobin);
    pool.cool_down(0, ALL_MODELS, None);
    let during = pool.on_rate_limit(0, GPT4O, None);
    assert!(!during.started);
    assert_eq!(
        during.remaining,
        secs(1),
        "out as long as the every-model cooldown"
    );
    clock.advance(secs(1));
    assert_eq!(
        pool.cool_down(0, GPT4O, None),
        secs(1),
        "first strike for gpt-4o"
    );
}

#[test]
fn account_cooldown_can_spare_the_key_that_was_already_judged() {
    let mut specs: Vec<KeySpec> = ["a", "b", "c"].iter().map(|n| spec(n)).collect();
    for s in &mut specs {
        s.account = Some("org-1".into());
    }
    let (pool, clock) = pool_of(specs, KeyPolicy::RoundRobin);
    pool.cool_down(0, GPT4O, Some(Duration::ZERO));
    assert_eq!(
        pool.cool_down_account("org-1", GPT4O, Some(Duration::ZERO), Some(0)),
        vec![1, 2]
    );
    clock.advance(secs(1));
    // Key a has one strike (from its own 429), not two.
    assert_eq!(pool.cool_down(0, GPT4O, None), secs(2));
}

/// The running cooldowns of key `idx`, by model (`None`: every model).
fn cooling_models(pool: &KeyPool, idx: usize) -> Vec<Option<String>> {
    match &pool.status()[idx].state {
        KeyState::Cooling { cooldowns } => cooldowns.iter().map(|c| c.model.clone()).collect(),
        _ => Vec::new(),
    }
}

#[test]
fn made_up_model_names_cannot_grow_a_keys_cooldowns_past_the_cap() {
    let (pool, _) = pool(&["a"], KeyPolicy::RoundRobin);
    pool.cool_down(0, ALL_MODELS, Some(secs(1)));
    pool.cool_down(0, GPT4O, Some(secs(300)));
    for i in 0..1000 {
        pool.cool_down(0, &format!("made-up-{i}"), Some(secs(10 + i % 50)));
    }
    let models = cooling_models(&pool, 0);
    assert_eq!(models.len(), MAX_MODEL_COOLDOWNS);
    // The every-model cooldown is never evicted, even though it ends soonest; the model that
    // ends last outlives the flood.
    assert!(models.contains(&None), "{models:?}");
    assert!(models.contains(&Some(GPT4O.to_string())), "{models:?}");
    assert!(matches!(pool.pick(MINI, &[]), Pick::AllCooling { .. }));
}

#[test]
fn a_full_key_evicts_the_cooldown_that_ends_soonest() {
    let (pool, clock) = pool(&["a"], KeyPolicy::RoundRobin);
    // A backoff kept after its cooldown ended is the first to go.
    pool.cool_down(0, "expired", None);
    clock.advance(secs(1));
    for i in 0..MAX_MODEL_COOLDOWNS - 1 {
        pool.cool_down(0, &format!("m{i}"), Some(secs(100 + i as u64)));
    }
    pool.cool_down(0, "new-1", Some(secs(50)));
    let models = cooling_models(&pool, 0);
    assert_eq!(models.len(), MAX_MODEL_COOLDOWNS);
    assert!(models.contains(&Some("new-1".into())));
    // Full of running cooldowns: the one ending soonest (new-1, 50 s) makes room.
    pool.cool_down(0, "new-2", Some(secs(200)));
    let models = cooling_models(&pool, 0);
    assert_eq!(models.len(), MAX_MODEL_COOLDOWNS);
    assert!(!models.contains(&Some("new-1".into())), "{models:?}");
    assert_eq!(
        pick_idx(&pool, "new-1", &[]),
        0,
        "an evicted model is usable again"
    );
    assert!(matches!(pool.pick("new-2", &[]), Pick::AllCooling { .. }));
    assert!(matches!(pool.pick("m0", &[]), Pick::AllCooling { .. }));
    // The expired entry went first: its backoff starts over.
    assert_eq!(pool.cool_down(0, "expired", None), secs(1));
}

#[test]
fn peek_and_has_usable_leave_the_rotation_alone() {
    let (pool, _) = pool(&["a", "b", "c"], KeyPolicy::RoundRobin);
    let mut order = Vec::new();
    for _ in 0..6 {
        let next = pool.peek(GPT4O, &[]);
        assert!(pool.has_usable(GPT4O, &[]));
        let picked = pick_idx(&pool, GPT4O, &[]);
        assert_eq!(next, Some(picked), "peek names the key the next pick takes");
        assert!(pool.has_usable(GPT4O, &[picked]));
        order.push(picked);
    }
    assert_eq!(order, vec![0, 1, 2, 0, 1, 2]);
    assert!(pool.status().iter().all(|s| s.in_flight == 0), "no lease");
}

#[test]
fn peek_skips_what_a_pick_would_skip() {
    let (pool, _) = pool(&["a", "b", "c"], KeyPolicy::Weighted);
    pool.cool_down(0, GPT4O, Some(secs(10)));
    pool.disable(1, DisableReason::Unauthorized);
    assert_eq!(pool.peek(GPT4O, &[]), Some(2));
    assert_eq!(pool.peek(MINI, &[2]), Some(0));
    assert!(!pool.has_usable(GPT4O, &[2]));
    assert!(!pool.has_usable(ALL_MODELS, &[0, 2]));
    let (empty, _) = pool_of(Vec::new(), KeyPolicy::RoundRobin);
    assert_eq!(empty.peek(GPT4O, &[]), None);
}

#[test]
fn a_manual_disable_overrides_another_reason_and_probes_cannot_undo_it() {
    let (pool, _) = pool(&["a", "b"], KeyPolicy::RoundRobin);
    pool.disable(0, DisableReason::Unauthorized);
    assert!(pool.disable_manually(0));
    assert!(!pool.disable_manually(0), "already manual");
    assert_eq!(pool.disabled(), vec![(0, DisableReason::Manual)]);
    // A probe that started while the key was out for 401 must not bring it back.
    assert!(!pool.enable_if_still(0, DisableReason::Unauthorized));
    assert!(!pool.enable_if_still(0, DisableReason::Manual));
    assert_eq!(pool.disabled(), vec![(0, DisableReason::Manual)]);
    assert_eq!(pick_idx(&pool, GPT4O, &[]), 1);
    assert!(pool.enable(0));
    assert!(pool.disabled().is_empty());
}

#[test]
fn a_passing_probe_enables_a_key_still_out_for_the_same_reason() {
    let (pool, _) = pool(&["a"], KeyPolicy::RoundRobin);
    pool.disable(0, DisableReason::Forbidden);
    assert!(pool.enable_if_still(0, DisableReason::Forbidden));
    assert!(pool.disabled().is_empty());
}

#[test]
fn a_key_added_at_run_time_joins_the_rotation_at_the_next_index() {
    let (pool, _) = pool(&["a", "b"], KeyPolicy::RoundRobin);
    assert_eq!(pool.add(spec("c")).unwrap(), 2);
    assert!(pool.is_added(2) && !pool.is_added(1));
    assert_eq!(tally(&pool, GPT4O, 300), vec![100, 100, 100]);
    assert_eq!(pool.index_of("c"), Some(2));
    assert_eq!(pool.name(2), "c");
    assert_eq!(pool.counts().ready, 3);
}

#[test]
fn adding_a_taken_name_or_a_secret_already_in_the_pool_is_refused() {
    let (pool, _) = pool(&["a"], KeyPolicy::RoundRobin);
    let err = pool.add(spec("a")).unwrap_err();
    assert_eq!(err.to_string(), "upstream openai already has a key named a");
    let mut same_secret = spec("other");
    same_secret.secret = Secret::new("sk-secret-a");
    let err = pool.add(same_secret).unwrap_err();
    assert_eq!(
        err.to_string(),
        "upstream openai already has this secret, as key a"
    );
    assert_eq!(pool.len(), 1);
}

#[test]
fn a_removed_key_is_never_picked_listed_or_brought_back() {
    let (pool, _) = pool(&["a", "b", "c"], KeyPolicy::RoundRobin);
    let lease = match pool.pick(GPT4O, &[]) {
        Pick::Key(l) => l,
        other => panic!("{other:?}"),
    };
    assert_eq!(lease.index(), 0);
    assert!(pool.remove(0));
    assert!(!pool.remove(0), "a second removal changes nothing");
    // The request holding it finishes with its name and secret intact.
    assert_eq!(lease.name(), "a");
    drop(lease);
    let counts = tally(&pool, GPT4O, 200);
    assert_eq!(counts, vec![0, 100, 100]);
    assert!(!pool.enable(0), "enable does not undo a removal");
    assert!(!pool.disable_manually(0));
    assert!(!pool.enable_if_still(0, DisableReason::Unauthorized));
    assert_eq!(tally(&pool, GPT4O, 2), vec![0, 1, 1]);
    assert!(pool.is_removed(0) && !pool.is_removed(1) && pool.is_removed(9));
    assert_eq!(pool.index_of("a"), None);
    let names: Vec<String> = pool.status().into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["b", "c"]);
    assert_eq!(pool.counts().ready, 2);
    assert!(pool.disabled().is_empty());
    assert_eq!(pool.len(), 3, "indices are never reused");
}

#[test]
fn a_removed_keys_name_and_secret_may_be_added_again_under_a_new_index() {
    let (pool, _) = pool(&["a", "b"], KeyPolicy::RoundRobin);
    pool.disable(1, DisableReason::Unauthorized);
    assert!(pool.remove(1));
    assert_eq!(pool.add(spec("b")).unwrap(), 2);
    assert_eq!(pool.index_of("b"), Some(2));
    assert_eq!(tally(&pool, GPT4O, 4), vec![2, 0, 2]);
}

#[test]
fn removing_every_key_leaves_a_pool_that_answers_all_disabled() {
    for policy in [
        KeyPolicy::RoundRobin,
        KeyPolicy::Weighted,
        KeyPolicy::LeastInFlight,
        KeyPolicy::Random,
    ] {
        let (pool, _) = pool(&["a", "b"], policy);
        assert!(pool.remove(0) && pool.remove(1));
        assert!(
            matches!(pool.pick(GPT4O, &[]), Pick::AllDisabled),
            "{policy:?}"
        );
        assert_eq!(pool.peek(GPT4O, &[]), None, "{policy:?}");
    }
}

#[test]
fn weighted_pools_give_added_keys_their_weight_and_removed_keys_none() {
    let mut specs = vec![spec("a"), spec("b")];
    specs[1].weight = 2;
    let (pool, _) = pool_of(specs, KeyPolicy::Weighted);
    let mut c = spec("c");
    c.weight = 3;
    assert_eq!(pool.add(c).unwrap(), 2);
    assert_eq!(tally(&pool, GPT4O, 600), vec![100, 200, 300]);
    assert!(pool.remove(1));
    assert_eq!(tally(&pool, GPT4O, 400), vec![100, 0, 300]);
}

#[test]
fn an_added_keys_account_shares_org_wide_cooldowns_and_a_removed_one_leaves_it() {
    let mut a = spec("a");
    a.account = Some("org1".into());
    let (pool, _) = pool_of(vec![a, spec("b")], KeyPolicy::RoundRobin);
    let mut c = spec("c");
    c.account = Some("org1".into());
    assert_eq!(pool.add(c).unwrap(), 2);
    assert_eq!(
        pool.cool_down_account("org1", GPT4O, Some(secs(5)), None),
        vec![0, 2]
    );
    assert!(pool.remove(2));
    assert_eq!(
        pool.cool_down_account("org1", MINI, Some(secs(5)), None),
        vec![0]
    );
}

fn limits(limit: u64, remaining: u64, reset: Duration) -> RateReport {
    RateReport {
        requests: Some(Reported {
            limit,
            remaining,
            reset,
        }),
        tokens: None,
    }
}

#[test]
fn headroom_policy_without_reports_rotates_like_round_robin() {
    let (pool, _) = pool(&["a", "b", "c"], KeyPolicy::Headroom);
    let order: Vec<usize> = (0..6).map(|_| pick_idx(&pool, GPT4O, &[])).collect();
    assert_eq!(order, vec![0, 1, 2, 0, 1, 2]);
}

#[test]
fn headroom_policy_prefers_the_key_with_most_left_relative_to_its_limit() {
    let (pool, _) = pool(&["a", "b", "c"], KeyPolicy::Headroom);
    // a: 50 of 100 left; b: 90 of 120; c: 10 of 240. Relative to the limit, b has the most.
    pool.note_limits(0, GPT4O, &limits(100, 50, secs(30)));
    pool.note_limits(1, GPT4O, &limits(120, 90, secs(30)));
    pool.note_limits(2, GPT4O, &limits(240, 10, secs(30)));
    assert_eq!(pick_idx(&pool, GPT4O, &[]), 1);
    assert_eq!(pick_idx(&pool, GPT4O, &[1]), 0);
    // Another model has no reports: every key is full, so the rotation decides.
    let other: Vec<usize> = (0..3).map(|_| pick_idx(&pool, MINI, &[])).collect();
    let mut sorted = other.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, vec![0, 1, 2], "{other:?}");
}

#[test]
fn headroom_policy_spends_keys_in_proportion_to_their_limits() {
    let (pool, _) = pool(&["a", "b"], KeyPolicy::Headroom);
    pool.note_limits(0, GPT4O, &limits(10, 10, secs(60)));
    pool.note_limits(1, GPT4O, &limits(30, 30, secs(60)));
    let mut counts = [0usize; 2];
    for _ in 0..20 {
        let idx = pick_idx(&pool, GPT4O, &[]);
        pool.note_sent(idx, GPT4O);
        counts[idx] += 1;
    }
    // Equal fractions left means 5 of a's 10 and 15 of b's 30, give or take a tie.
    assert!((4..=6).contains(&counts[0]), "{counts:?}");
}

#[test]
fn a_key_about_to_run_out_rests_until_its_reset_under_any_policy() {
    for policy in [
        KeyPolicy::RoundRobin,
        KeyPolicy::Weighted,
        KeyPolicy::Random,
        KeyPolicy::LeastInFlight,
        KeyPolicy::Headroom,
    ] {
        let (pool, clock) = pool(&["a", "b"], policy);
        assert!(!pool.note_limits(0, GPT4O, &limits(10, 2, secs(20))).started);
        assert!(!pool.note_sent(0, GPT4O).started);
        let rest = pool.note_sent(0, GPT4O);
        assert!(rest.started, "{policy:?}: the last request left was sent");
        assert_eq!(rest.remaining, secs(20));
        assert!(
            matches!(pool.status()[0].state, KeyState::Cooling { .. }),
            "{policy:?}: status sees the rest as cooling"
        );
        for _ in 0..10 {
            assert_eq!(pick_idx(&pool, GPT4O, &[]), 1, "{policy:?}");
        }
        assert_eq!(pool.counts().cooling, 1);
        clock.advance(secs(20));
        assert_eq!(
            pool.headroom(0, GPT4O),
            1_000_000,
            "whole again at the reset"
        );
        assert!(
            pool.has_usable(GPT4O, &[1]),
            "{policy:?}: back after the reset"
        );
    }
}

#[test]
fn a_report_of_nothing_left_rests_the_key_with_requests_in_flight_counted() {
    let (pool, _) = pool(&["a", "b"], KeyPolicy::RoundRobin);
    let leases: Vec<Pick> = (0..3).map(|_| pool.pick(GPT4O, &[1])).collect();
    // Two other requests on key a are in flight: 2 left by the report is nothing left.
    let rest = pool.note_limits(0, GPT4O, &limits(10, 2, secs(5)));
    assert!(rest.started);
    assert_eq!(rest.remaining, secs(5));
    drop(leases);
}

#[test]
fn headroom_of_keys_added_at_run_time_is_tracked() {
    let (pool, _) = pool(&["a"], KeyPolicy::Headroom);
    let idx = pool.add(spec("b")).unwrap();
    pool.note_limits(idx, GPT4O, &limits(10, 5, secs(60)));
    assert_eq!(pool.headroom(idx, GPT4O), 500_000);
    assert_eq!(pick_idx(&pool, GPT4O, &[]), 0, "a reports nothing: full");
}

#[test]
fn without_rest_before_limit_a_key_rests_only_after_a_429() {
    let (pool, _) = pool(&["a", "b"], KeyPolicy::Headroom);
    let pool = pool.resting_before_limit(false);
    assert!(!pool.note_limits(0, GPT4O, &limits(10, 0, secs(20))).started);
    assert!(!pool.note_sent(0, GPT4O).started);
    assert_eq!(pool.counts().cooling, 0);
    assert_eq!(pool.headroom(0, GPT4O), 0, "still tracked for the policy");
    assert_eq!(pick_idx(&pool, GPT4O, &[]), 1);
}
