//! Concurrent identical misses: the first becomes the leader and goes upstream; the others wait
//! until the leader is done (its answer stored, or given up), then look again.
//!
//! The leader holds a [`Leader`] guard; dropping it (the answer stored, or the request ended in
//! any other way) wakes every follower. A follower that subscribed before the leader finished
//! never misses the wake-up: the guard's channel closes, and a closed channel answers at once.

use super::key::CacheKey;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// The misses in flight, by key.
#[derive(Default)]
pub struct Flights {
    leaders: Mutex<HashMap<CacheKey, watch::Sender<()>>>,
}

/// The first miss of a key: wakes the followers when dropped.
pub struct Leader {
    flights: Arc<Flights>,
    key: CacheKey,
}

/// A later miss of a key whose leader is still upstream.
pub struct Follower(watch::Receiver<()>);

/// Where a miss stands among the identical misses in flight.
pub enum Join {
    /// The first: go upstream and store the answer.
    Leader(Leader),
    /// Not the first: wait for the leader, then look again.
    Follower(Follower),
}

impl Flights {
    /// A fresh, empty table.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Joins the misses of `key`.
    pub fn join(self: &Arc<Self>, key: CacheKey) -> Join {
        let mut leaders = self.leaders.lock();
        if let Some(tx) = leaders.get(&key) {
            return Join::Follower(Follower(tx.subscribe()));
        }
        let (tx, _) = watch::channel(());
        leaders.insert(key, tx);
        Join::Leader(Leader {
            flights: self.clone(),
            key,
        })
    }

    /// Keys with a leader upstream.
    pub fn len(&self) -> usize {
        self.leaders.lock().len()
    }

    /// Whether no miss is in flight.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        // Dropping the sender closes the channel: every follower wakes.
        self.flights.leaders.lock().remove(&self.key);
    }
}

impl Follower {
    /// Waits until the leader is done, at most `limit`; whether it was done in time.
    pub async fn wait(mut self, limit: Duration) -> bool {
        // The leader never sends: only the channel closing (an error here) ends the wait.
        tokio::time::timeout(limit, self.0.changed()).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> CacheKey {
        CacheKey([n; 32])
    }

    #[tokio::test]
    async fn the_first_miss_leads_and_the_others_follow_until_it_is_done() {
        let flights = Flights::new();
        let Join::Leader(leader) = flights.join(key(1)) else {
            panic!("the first miss leads");
        };
        let Join::Follower(early) = flights.join(key(1)) else {
            panic!("the second follows");
        };
        assert!(
            matches!(flights.join(key(2)), Join::Leader(_)),
            "other keys lead"
        );
        let Join::Follower(late) = flights.join(key(1)) else {
            panic!("the third follows");
        };
        let waiting = tokio::spawn(early.wait(Duration::from_secs(60)));
        drop(leader);
        assert!(waiting.await.unwrap_or(false), "woken by the leader's end");
        assert!(
            late.wait(Duration::from_secs(60)).await,
            "subscribed before the end"
        );
        assert!(
            matches!(flights.join(key(1)), Join::Leader(_)),
            "the next miss leads anew"
        );
        assert!(flights.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_follower_stops_waiting_at_its_limit() {
        let flights = Flights::new();
        let Join::Leader(_leader) = flights.join(key(1)) else {
            panic!("the first miss leads");
        };
        let Join::Follower(follower) = flights.join(key(1)) else {
            panic!("the second follows");
        };
        // Paused time jumps ahead when every task waits: no real sleep.
        assert!(!follower.wait(Duration::from_secs(5)).await);
        assert_eq!(flights.len(), 1, "the leader is still upstream");
    }
}
