//! Which account owns each object id keygate saw created: bounded (least recently used ids go
//! first) and expiring (an entry lives `ttl` from when it was recorded).

use super::Owner;
use crate::clock::{epoch_ms, SharedClock};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// An id's owner and when the entry expires (ms since the epoch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owned {
    /// The owner.
    pub owner: Arc<Owner>,
    /// When the entry expires, ms since the epoch.
    pub expires_ms: u64,
}

/// Ids and their owners.
pub struct ResourceTable {
    entries: moka::sync::Cache<Box<str>, Owned>,
    ttl: Duration,
    clock: SharedClock,
    /// Whether anything was ever recorded: until then requests are not scanned for ids.
    used: AtomicBool,
}

impl std::fmt::Debug for ResourceTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResourceTable")
            .field("entries", &self.entries.entry_count())
            .field("ttl", &self.ttl)
            .finish()
    }
}

impl ResourceTable {
    /// A table of at most `max_entries` ids, each kept `ttl`.
    pub fn new(max_entries: u64, ttl: Duration, clock: SharedClock) -> Self {
        Self {
            entries: moka::sync::Cache::new(max_entries),
            ttl,
            clock,
            used: AtomicBool::new(false),
        }
    }

    /// How long an entry lives.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Now, in ms since the epoch.
    pub fn now_ms(&self) -> u64 {
        epoch_ms(self.clock.wall())
    }

    /// Records that `owner` created `id`, from now for `ttl`; the entry's expiry.
    pub fn record(&self, id: &str, owner: Arc<Owner>) -> u64 {
        let expires_ms = self.now_ms().saturating_add(crate::clock::millis(self.ttl));
        self.insert(id, owner, expires_ms);
        expires_ms
    }

    /// Keeps `id`'s owner until `expires_ms` (from the state file or another instance); an
    /// entry already expired is not kept.
    pub fn insert(&self, id: &str, owner: Arc<Owner>, expires_ms: u64) {
        if expires_ms <= self.now_ms() {
            return;
        }
        self.used.store(true, Ordering::Relaxed);
        self.entries.insert(id.into(), Owned { owner, expires_ms });
    }

    /// `id`'s owner, unless unknown or expired.
    pub fn owner(&self, id: &str) -> Option<Arc<Owner>> {
        let owned = self.entries.get(id)?;
        if owned.expires_ms <= self.now_ms() {
            self.entries.invalidate(id);
            return None;
        }
        Some(owned.owner)
    }

    /// Whether anything was ever recorded.
    pub fn in_use(&self) -> bool {
        self.used.load(Ordering::Relaxed)
    }

    /// Every unexpired entry (for the state file).
    pub fn entries(&self) -> Vec<(String, Owned)> {
        let now = self.now_ms();
        self.entries
            .iter()
            .filter(|(_, o)| o.expires_ms > now)
            .map(|(id, o)| (id.to_string(), o))
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    fn owner(account: &str) -> Arc<Owner> {
        Arc::new(Owner {
            upstream: "openai".into(),
            account: account.into(),
        })
    }

    #[test]
    fn an_id_is_owned_until_its_entry_expires() {
        let clock = ManualClock::new();
        let t = ResourceTable::new(100, Duration::from_secs(60), clock.clone());
        assert!(!t.in_use());
        t.record("file-1", owner("org1"));
        assert!(t.in_use());
        assert_eq!(t.owner("file-1").unwrap().account, "org1");
        assert_eq!(t.owner("file-2"), None);
        clock.advance(Duration::from_secs(59));
        assert!(t.owner("file-1").is_some());
        clock.advance(Duration::from_secs(1));
        assert_eq!(t.owner("file-1"), None);
        assert!(t.entries().is_empty());
    }

    #[test]
    fn entries_restored_keep_their_expiry_and_expired_ones_are_dropped() {
        let clock = ManualClock::new();
        let t = ResourceTable::new(100, Duration::from_secs(60), clock.clone());
        let now = t.now_ms();
        t.insert("file-old", owner("a"), now);
        t.insert("file-new", owner("b"), now + 5_000);
        assert_eq!(t.owner("file-old"), None);
        let entries = t.entries();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].0, "file-new");
        assert_eq!(entries[0].1.expires_ms, now + 5_000);
    }

    #[test]
    fn the_table_stays_within_its_bound() {
        let t = ResourceTable::new(50, Duration::from_secs(60), ManualClock::new());
        for i in 0..500 {
            t.record(&format!("file-{i}"), owner("a"));
        }
        t.entries.run_pending_tasks();
        assert!(t.entries.entry_count() <= 50, "{}", t.entries.entry_count());
    }
}
