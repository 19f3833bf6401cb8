//! The in-memory store: a bounded, concurrent `moka` cache weighed in bytes, each entry living
//! for its own route's `ttl`.
//!
//! moka expires entries by the real clock to give their memory back; freshness as the requests
//! see it is checked against the injected [`Clock`](crate::clock::Clock) (each entry keeps its
//! insert time), so unit tests move time by hand instead of sleeping.

use super::entry::CachedAnswer;
use super::key::CacheKey;
use crate::clock::SharedClock;
use moka::sync::Cache;
use moka::Expiry;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A stored answer with its age when it was found.
#[derive(Debug, Clone)]
pub struct Found {
    /// The answer.
    pub answer: Arc<CachedAnswer>,
    /// How long ago it was stored.
    pub age: Duration,
}

/// Bounded in-memory storage of answers.
pub struct Store {
    cache: Cache<CacheKey, Arc<CachedAnswer>>,
    clock: SharedClock,
}

/// Each entry expires after its own `ttl`.
struct EntryTtl;

impl Expiry<CacheKey, Arc<CachedAnswer>> for EntryTtl {
    fn expire_after_create(
        &self,
        _key: &CacheKey,
        value: &Arc<CachedAnswer>,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

impl Store {
    /// A store holding at most `capacity` bytes of entries.
    pub fn new(capacity: u64, clock: SharedClock) -> Self {
        let cache = Cache::builder()
            .max_capacity(capacity)
            .weigher(|_k: &CacheKey, v: &Arc<CachedAnswer>| {
                u32::try_from(v.weight()).unwrap_or(u32::MAX)
            })
            .expire_after(EntryTtl)
            .build();
        Self { cache, clock }
    }

    /// The fresh entry for `key`, no older than `max_age` when given.
    pub fn get(&self, key: &CacheKey, max_age: Option<Duration>) -> Option<Found> {
        let answer = self.cache.get(key)?;
        let age = answer.age(self.clock.now());
        if age >= answer.ttl {
            self.cache.invalidate(key);
            return None;
        }
        if max_age.is_some_and(|m| age > m) {
            return None;
        }
        Some(Found { answer, age })
    }

    /// Stores `answer` under `key`, replacing any older entry.
    pub fn insert(&self, key: CacheKey, answer: CachedAnswer) {
        self.cache.insert(key, Arc::new(answer));
    }

    /// Bytes held (moka's running total; it settles as its upkeep runs).
    pub fn bytes(&self) -> u64 {
        self.cache.weighted_size()
    }

    /// Runs moka's pending upkeep (evictions past the bound) now.
    pub fn settle(&self) {
        self.cache.run_pending_tasks();
    }

    /// The clock entries are dated by.
    pub fn now(&self) -> Instant {
        self.clock.now()
    }

    /// Wall-clock now, for entries shared with other instances.
    pub fn wall(&self) -> std::time::SystemTime {
        self.clock.wall()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use bytes::Bytes;

    fn answer(store: &Store, body_len: usize, ttl: Duration) -> CachedAnswer {
        CachedAnswer {
            headers: Vec::new(),
            body: Bytes::from(vec![b'x'; body_len]),
            events: false,
            usage: None,
            stored_at: store.now(),
            ttl,
        }
    }

    fn key(n: u32) -> CacheKey {
        let mut k = [0u8; 32];
        k[..4].copy_from_slice(&n.to_le_bytes());
        CacheKey(k)
    }

    #[test]
    fn an_entry_is_served_until_its_ttl_by_the_injected_clock() {
        let clock = ManualClock::new();
        let store = Store::new(1 << 20, clock.clone());
        store.insert(key(1), answer(&store, 10, Duration::from_secs(60)));
        clock.advance(Duration::from_secs(59));
        let found = store.get(&key(1), None).unwrap();
        assert_eq!(found.age, Duration::from_secs(59));
        clock.advance(Duration::from_secs(1));
        assert!(store.get(&key(1), None).is_none(), "expired at its ttl");
        assert!(store.get(&key(1), None).is_none(), "and gone");
    }

    #[test]
    fn max_age_refuses_older_entries_without_removing_them() {
        let clock = ManualClock::new();
        let store = Store::new(1 << 20, clock.clone());
        store.insert(key(1), answer(&store, 10, Duration::from_secs(600)));
        clock.advance(Duration::from_secs(30));
        assert!(store.get(&key(1), Some(Duration::from_secs(29))).is_none());
        assert!(store.get(&key(1), Some(Duration::from_secs(30))).is_some());
        assert!(store.get(&key(1), None).is_some());
    }

    #[test]
    fn entries_have_their_own_ttl() {
        let clock = ManualClock::new();
        let store = Store::new(1 << 20, clock.clone());
        store.insert(key(1), answer(&store, 10, Duration::from_secs(5)));
        store.insert(key(2), answer(&store, 10, Duration::from_secs(50)));
        clock.advance(Duration::from_secs(10));
        assert!(store.get(&key(1), None).is_none());
        assert!(store.get(&key(2), None).is_some());
    }

    #[test]
    fn the_store_never_holds_more_bytes_than_its_capacity() {
        let store = Store::new(64 * 1024, crate::clock::system());
        for n in 0..200 {
            store.insert(key(n), answer(&store, 1000, Duration::from_secs(600)));
        }
        store.settle();
        assert!(store.bytes() <= 64 * 1024, "{} bytes", store.bytes());
        assert!(store.bytes() > 32 * 1024, "it still holds entries");
        let kept = (0..200)
            .filter(|&n| store.get(&key(n), None).is_some())
            .count();
        assert!((30..=64).contains(&kept), "{kept} entries kept");
    }
}
