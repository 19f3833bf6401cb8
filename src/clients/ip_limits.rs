//! Per-IP limiters for an open gateway, bounded in memory and time.
//!
//! Addresses are grouped by prefix (IPv6 by /64 by default: one host usually owns a whole /64,
//! so a /128 key would let it walk around its limit) and each group gets one [`Limiter`]. The
//! table is split in shards, each behind its own lock and with its own share of the entry cap,
//! so no request waits on a table-wide lock or a table-wide sweep.
//!
//! - **Time**: a group idle for [`IDLE`] (its minute windows are empty by then) with nothing in
//!   flight and no budget spent is dropped; each shard sweeps itself at most every
//!   [`SWEEP_EVERY`], when a request touches it.
//! - **Memory**: at a shard's cap, the least recently used group (approximated by the CLOCK
//!   algorithm: one "used" bit per entry, a hand that clears it and evicts the first entry found
//!   clear; a group counts as used from its second request) makes room. Groups with requests in flight are never evicted, or a client could
//!   shed its concurrency count. If every entry of the shard is busy, the newcomer shares one
//!   overflow limiter with every other such newcomer: stricter, never looser.
//!
//! The trade-off: evicting a group resets its counts. To push a group out, a client must make
//! about `max_entries` other groups more recently used than its own, that is, own that many
//! prefixes, and each of those already has a fresh limit of its own. Shard choice is a keyed
//! hash with a per-process random key, so a client cannot aim its addresses at one shard. A
//! spent budget (`budget:`) outlives the idle time but not an eviction or a restart.

use super::addr::canonical;
use super::limits::{Limiter, Limits};
use crate::clock::SharedClock;
use parking_lot::Mutex;
use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A group idle this long, with nothing in flight and no budget spent, is forgotten. Longer than
/// the 60 s windows, so its counts are empty by then.
pub const IDLE: Duration = Duration::from_secs(120);

/// How often a shard drops its idle groups (when a request touches it).
pub const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// Most shards; fewer when the cap is small, so that each holds at least [`MIN_PER_SHARD`].
const MAX_SHARDS: usize = 32;

/// Smallest share of the cap per shard: a tiny share would make eviction cheap.
const MIN_PER_SHARD: usize = 64;

/// Per-IP limits and how addresses are grouped (`ip_limits:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpPolicy {
    /// The limits of each group.
    pub limits: Limits,
    /// IPv4 addresses sharing this many leading bits share a limit (default 32).
    pub ipv4_prefix: u8,
    /// IPv6 addresses sharing this many leading bits share a limit (default 64).
    pub ipv6_prefix: u8,
    /// Most groups tracked at once (default 100 000).
    pub max_entries: usize,
}

impl Default for IpPolicy {
    /// No limits; IPv4 by /32, IPv6 by /64, at most 100 000 groups.
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            ipv4_prefix: 32,
            ipv6_prefix: 64,
            max_entries: 100_000,
        }
    }
}

impl IpPolicy {
    /// Whether no limit is set (then no per-IP state is kept at all).
    pub fn is_empty(&self) -> bool {
        self.limits.is_empty()
    }

    /// The group of `ip`: its address with the bits past the prefix cleared.
    pub fn group_of(&self, ip: IpAddr) -> IpAddr {
        match canonical(ip) {
            IpAddr::V4(v4) => {
                let bits = u32::from(v4) & mask32(self.ipv4_prefix);
                IpAddr::V4(Ipv4Addr::from(bits))
            }
            IpAddr::V6(v6) => {
                let bits = u128::from(v6) & mask128(self.ipv6_prefix);
                IpAddr::V6(Ipv6Addr::from(bits))
            }
        }
    }
}

/// The leading `prefix` bits of a u32 set.
fn mask32(prefix: u8) -> u32 {
    u32::MAX
        .checked_shl(32 - u32::from(prefix.min(32)))
        .unwrap_or(0)
}

/// The leading `prefix` bits of a u128 set.
fn mask128(prefix: u8) -> u128 {
    u128::MAX
        .checked_shl(128 - u32::from(prefix.min(128)))
        .unwrap_or(0)
}

/// One tracked group.
#[derive(Debug)]
struct Slot {
    group: IpAddr,
    limiter: Arc<Limiter>,
    last_seen: Instant,
    /// CLOCK's "used since the hand last passed" bit.
    referenced: bool,
}

impl Slot {
    /// Whether a request holds its limiter (an admission, or one being made).
    fn busy(&self) -> bool {
        Arc::strong_count(&self.limiter) > 1
    }

    /// Whether forgetting it now loses nothing: idle long enough, nothing in flight, no budget.
    fn expired(&self, now: Instant) -> bool {
        !self.busy()
            && now.saturating_duration_since(self.last_seen) >= IDLE
            && (self.limiter.limits().budget.is_none() || self.limiter.budget_used().1 == 0)
    }
}

/// One shard: slots in a vector (the CLOCK ring) and an index by group.
#[derive(Debug)]
struct Shard {
    index: HashMap<IpAddr, usize>,
    slots: Vec<Slot>,
    hand: usize,
    last_sweep: Instant,
}

impl Shard {
    /// Drops expired slots; O(len), at most once per [`SWEEP_EVERY`].
    fn sweep(&mut self, now: Instant) {
        self.last_sweep = now;
        let before = self.slots.len();
        self.slots.retain(|s| !s.expired(now));
        if self.slots.len() != before {
            self.index = self
                .slots
                .iter()
                .enumerate()
                .map(|(i, s)| (s.group, i))
                .collect();
            self.hand = 0;
        }
    }

    /// The slot CLOCK evicts: the first one past the hand not used since the hand last passed
    /// and not busy. `None` when every slot is busy.
    fn victim(&mut self) -> Option<usize> {
        let len = self.slots.len();
        // Two turns: the first may only clear "used" bits.
        for _ in 0..2 * len {
            let i = self.hand % len;
            self.hand = (i + 1) % len;
            let slot = &mut self.slots[i];
            if slot.busy() {
                continue;
            }
            if slot.referenced {
                slot.referenced = false;
                continue;
            }
            return Some(i);
        }
        None
    }
}

/// Limiters per client address group for an open gateway, bounded in memory and time.
#[derive(Debug)]
pub struct IpLimiters {
    policy: IpPolicy,
    clock: SharedClock,
    shards: Box<[Mutex<Shard>]>,
    per_shard: usize,
    /// Keyed hash for the shard choice.
    hasher: RandomState,
    /// Shared by newcomers that find their shard full of busy groups.
    overflow: Arc<Limiter>,
}

impl IpLimiters {
    /// Per-group limiters following `policy`.
    pub fn new(policy: IpPolicy, clock: SharedClock) -> Self {
        let max = policy.max_entries.max(1);
        let count = (max / MIN_PER_SHARD).clamp(1, MAX_SHARDS);
        let now = clock.now();
        let shards = (0..count)
            .map(|_| {
                Mutex::new(Shard {
                    index: HashMap::new(),
                    slots: Vec::new(),
                    hand: 0,
                    last_sweep: now,
                })
            })
            .collect();
        Self {
            policy,
            overflow: Limiter::new(policy.limits, clock.clone()),
            clock,
            shards,
            per_shard: max / count,
            hasher: RandomState::new(),
        }
    }

    /// The limiter of `ip`'s group.
    pub fn get(&self, ip: IpAddr) -> Arc<Limiter> {
        let group = self.policy.group_of(ip);
        let now = self.clock.now();
        let shard = self.hasher.hash_one(group) as usize % self.shards.len();
        let mut shard = self.shards[shard].lock();
        if now.saturating_duration_since(shard.last_sweep) >= SWEEP_EVERY {
            shard.sweep(now);
        }
        if let Some(&i) = shard.index.get(&group) {
            let slot = &mut shard.slots[i];
            slot.last_seen = now;
            slot.referenced = true;
            return slot.limiter.clone();
        }
        let slot = Slot {
            group,
            limiter: Limiter::new(self.policy.limits, self.clock.clone()),
            last_seen: now,
            // Marked used from its second request on: addresses seen once go first.
            referenced: false,
        };
        let limiter = slot.limiter.clone();
        if shard.slots.len() < self.per_shard {
            let i = shard.slots.len();
            shard.slots.push(slot);
            shard.index.insert(group, i);
            return limiter;
        }
        match shard.victim() {
            Some(i) => {
                let old = std::mem::replace(&mut shard.slots[i], slot);
                shard.index.remove(&old.group);
                shard.index.insert(group, i);
                limiter
            }
            None => self.overflow.clone(),
        }
    }

    /// Groups tracked now.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().slots.len()).sum()
    }

    /// Whether no group is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops every expired group now (each shard also does so by itself as it is used).
    pub fn sweep(&self) {
        let now = self.clock.now();
        for shard in self.shards.iter() {
            shard.lock().sweep(now);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::clients::limits::{Budget, LimitKind, Period};
    use crate::clock::ManualClock;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn one_rpm() -> Limits {
        Limits {
            rpm: Some(1),
            ..Limits::default()
        }
    }

    fn limiters(policy: IpPolicy) -> (IpLimiters, Arc<ManualClock>) {
        let clock = ManualClock::new();
        (IpLimiters::new(policy, clock.clone()), clock)
    }

    /// Whether `ip` may send one more request now (settled at once).
    fn passes(l: &IpLimiters, addr: &str) -> bool {
        l.get(ip(addr)).admit(0).map(|a| a.settle(None)).is_ok()
    }

    /// The `n`th address of 2001:db8::/32 in a /64 of its own.
    fn v6_host(n: u64) -> IpAddr {
        IpAddr::V6(Ipv6Addr::from(
            (0x2001_0db8_u128 << 96) | (u128::from(n) << 64) | 1,
        ))
    }

    #[test]
    fn each_ip_gets_its_own_limiter() {
        let (l, _) = limiters(IpPolicy {
            limits: one_rpm(),
            ..IpPolicy::default()
        });
        assert!(passes(&l, "10.0.0.1"));
        assert!(!passes(&l, "10.0.0.1"));
        assert!(passes(&l, "10.0.0.2"));
        assert!(
            !passes(&l, "::ffff:10.0.0.2"),
            "a mapped address is the same IPv4 client"
        );
    }

    #[test]
    fn ipv6_clients_are_grouped_by_their_64_by_default() {
        let (l, _) = limiters(IpPolicy {
            limits: one_rpm(),
            ..IpPolicy::default()
        });
        assert!(passes(&l, "2001:db8:1:2::1"));
        assert!(
            !passes(&l, "2001:db8:1:2:ffff:ffff:ffff:fffe"),
            "another address of the same /64"
        );
        assert!(
            passes(&l, "2001:db8:1:3::1"),
            "the next /64 is someone else"
        );
        assert_eq!(l.len(), 2);
    }

    #[test]
    fn prefix_lengths_are_configurable() {
        let (l, _) = limiters(IpPolicy {
            limits: one_rpm(),
            ipv4_prefix: 24,
            ipv6_prefix: 48,
            ..IpPolicy::default()
        });
        assert!(passes(&l, "192.0.2.1"));
        assert!(!passes(&l, "192.0.2.254"));
        assert!(passes(&l, "192.0.3.1"));
        assert!(passes(&l, "2001:db8:1:2::1"));
        assert!(!passes(&l, "2001:db8:1:ffff::1"));
        let p = IpPolicy {
            ipv4_prefix: 1,
            ipv6_prefix: 128,
            ..IpPolicy::default()
        };
        assert_eq!(p.group_of(ip("200.1.2.3")), ip("128.0.0.0"));
        assert_eq!(p.group_of(ip("2001:db8::7")), ip("2001:db8::7"));
    }

    #[test]
    fn idle_groups_are_forgotten_after_the_idle_time() {
        let (l, clock) = limiters(IpPolicy {
            limits: one_rpm(),
            ..IpPolicy::default()
        });
        assert!(passes(&l, "10.0.0.1"));
        clock.advance(IDLE - Duration::from_secs(1));
        l.sweep();
        assert_eq!(l.len(), 1, "not idle long enough");
        clock.advance(Duration::from_secs(1));
        l.sweep();
        assert!(l.is_empty());
    }

    #[test]
    fn a_shard_sweeps_itself_as_it_is_used() {
        // A cap under MIN_PER_SHARD: one shard, so both addresses share it.
        let (l, clock) = limiters(IpPolicy {
            limits: one_rpm(),
            max_entries: 10,
            ..IpPolicy::default()
        });
        assert!(passes(&l, "10.0.0.1"));
        clock.advance(IDLE);
        assert!(passes(&l, "10.0.0.2"));
        assert_eq!(
            l.len(),
            1,
            "the idle group went when the shard was next used"
        );
    }

    #[test]
    fn groups_in_flight_or_with_spent_budget_are_kept() {
        let (l, clock) = limiters(IpPolicy {
            limits: Limits {
                concurrency: Some(1),
                budget: Some(Budget {
                    tokens: 100,
                    per: Period::Month,
                }),
                ..Limits::default()
            },
            ..IpPolicy::default()
        });
        let held = l.get(ip("10.0.0.1")).admit(0).unwrap();
        l.get(ip("10.0.0.2")).admit(0).unwrap().settle(Some(100));
        l.get(ip("10.0.0.3")).admit(0).unwrap().settle(Some(0));
        clock.advance(IDLE * 10);
        l.sweep();
        assert_eq!(l.len(), 2, "only the group with nothing to remember went");
        let r = l.get(ip("10.0.0.1")).admit(0).unwrap_err();
        assert_eq!(r.kind, LimitKind::Concurrency);
        let r = l.get(ip("10.0.0.2")).admit(0).unwrap_err();
        assert_eq!(r.kind, LimitKind::Budget);
        drop(held);
    }

    #[test]
    fn the_cap_holds_under_a_flood_of_distinct_addresses() {
        let (l, clock) = limiters(IpPolicy {
            limits: one_rpm(),
            max_entries: 1000,
            ..IpPolicy::default()
        });
        for n in 0..20_000 {
            assert!(
                passes(&l, &v6_host(n).to_string()),
                "a new /64 is a new client"
            );
            if n % 997 == 0 {
                assert!(l.len() <= 1000, "{} groups after {n}", l.len());
                clock.advance(Duration::from_millis(1));
            }
        }
        assert!(l.len() <= 1000);
        assert!(
            l.len() >= 900,
            "the cap is used, not the floor: {}",
            l.len()
        );
    }

    #[test]
    fn a_flood_does_not_evict_an_active_client_at_its_limit() {
        // One shard (a cap under MIN_PER_SHARD), so the flood hits the client's shard in full.
        let (l, _) = limiters(IpPolicy {
            limits: one_rpm(),
            max_entries: 50,
            ..IpPolicy::default()
        });
        assert!(passes(&l, "198.51.100.7"));
        for n in 0..5_000 {
            passes(&l, &v6_host(n).to_string());
            if n % 10 == 0 {
                assert!(!passes(&l, "198.51.100.7"), "escaped after {n} newcomers");
            }
        }
        assert!(l.len() <= 50);
    }

    #[test]
    fn groups_in_flight_are_never_evicted_and_newcomers_then_share_one_limit() {
        let (l, _) = limiters(IpPolicy {
            limits: Limits {
                concurrency: Some(1),
                ..Limits::default()
            },
            max_entries: 2,
            ..IpPolicy::default()
        });
        let a = l.get(ip("10.0.0.1")).admit(0).unwrap();
        let b = l.get(ip("10.0.0.2")).admit(0).unwrap();
        // Both slots busy: newcomers share the overflow limiter.
        let c = l.get(ip("10.0.0.3")).admit(0).unwrap();
        let d = l.get(ip("10.0.0.4")).admit(0).unwrap_err();
        assert_eq!(d.kind, LimitKind::Concurrency, "stricter, never looser");
        assert_eq!(l.len(), 2);
        assert!(
            l.get(ip("10.0.0.1")).admit(0).is_err(),
            "a busy group keeps its count"
        );
        drop((a, b, c));
        assert!(
            l.get(ip("10.0.0.5")).admit(0).is_ok(),
            "free slots are reused"
        );
        assert_eq!(l.len(), 2);
    }
}
