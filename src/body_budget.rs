//! A cap on the request-body bytes held across all requests at once.
//!
//! keygate reads a request's body before routing it and keeps it for retries, so each request
//! may hold up to `max_body_bytes`. Without a cap over all of them, many clients announcing large
//! bodies at once (by accident or on purpose) would grow memory without bound. A request reserves
//! room for its first bytes before reading any, grows its reservation as its bytes arrive, and
//! gives it all back when the body is no longer needed; when the budget is spent, a body waits
//! briefly for room, then is refused with 503. Room follows the bytes that came, not the bytes
//! announced: clients that announce large bodies and send slowly hold only what they sent, so they
//! cannot lock everyone else out.

use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Reservations are counted in KiB, so that a `u32` permit count covers any body size.
const UNIT: usize = 1024;

/// How long a body waits for room by default before it is refused.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(2);

/// Room reserved for a body before any of it is read (the whole body when it is smaller).
pub const FIRST_ROOM: usize = 64 * 1024;

/// Told the bytes of room held in all after every change (for a gauge).
pub type Observer = Arc<dyn Fn(usize) + Send + Sync>;

/// The shared budget of buffered body bytes.
#[derive(Clone)]
pub struct BodyBudget {
    units: Arc<Semaphore>,
    capacity: usize,
    observer: Option<Observer>,
}

impl std::fmt::Debug for BodyBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BodyBudget")
            .field("capacity", &self.capacity)
            .field("held", &self.held())
            .finish()
    }
}

/// Room for one body, grown as its bytes arrive; given back when dropped.
#[derive(Debug)]
pub struct BodyPermit {
    budget: BodyBudget,
    held: Option<OwnedSemaphorePermit>,
}

impl BodyBudget {
    /// A budget of `capacity` bytes (rounded up to whole KiB).
    pub fn new(capacity: usize) -> Self {
        let units = capacity.div_ceil(UNIT).clamp(1, Semaphore::MAX_PERMITS);
        Self {
            units: Arc::new(Semaphore::new(units)),
            capacity: units * UNIT,
            observer: None,
        }
    }

    /// The same budget, telling `observer` the room held in all after every change.
    pub fn observed(mut self, observer: Observer) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Bytes of room held by all bodies right now.
    pub fn held(&self) -> usize {
        self.capacity - self.available()
    }

    fn notify(&self) {
        if let Some(observe) = &self.observer {
            observe(self.held());
        }
    }

    /// The capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes not reserved right now.
    pub fn available(&self) -> usize {
        self.units.available_permits() * UNIT
    }

    /// Reserves room for a body of `bytes`, waiting up to `wait` for others to give room back.
    /// `None` when there is no room in time, or when the body is larger than the whole budget.
    pub async fn reserve(&self, bytes: usize, wait: Duration) -> Option<BodyPermit> {
        let mut permit = BodyPermit {
            budget: self.clone(),
            held: None,
        };
        permit.cover(bytes, wait).await.then_some(permit)
    }
}

impl BodyPermit {
    /// Bytes of room held.
    pub fn held(&self) -> usize {
        self.held.as_ref().map_or(0, |p| p.num_permits() * UNIT)
    }

    /// Grows the room held to at least `bytes` in all, waiting up to `wait` for others to give
    /// room back. `false` when there is no room in time, or when `bytes` exceeds the whole budget
    /// (the room already held is kept either way, until the permit is dropped).
    pub async fn cover(&mut self, bytes: usize, wait: Duration) -> bool {
        let need = bytes.div_ceil(UNIT);
        let held = self.held.as_ref().map_or(0, |p| p.num_permits());
        if need <= held {
            return true;
        }
        if need * UNIT > self.budget.capacity {
            return false;
        }
        let Ok(more) = u32::try_from(need - held) else {
            return false;
        };
        let units = &self.budget.units;
        // The common case, room at hand, without a timer.
        let more = match units.clone().try_acquire_many_owned(more) {
            Ok(p) => p,
            Err(_) => {
                match tokio::time::timeout(wait, units.clone().acquire_many_owned(more)).await {
                    Ok(Ok(p)) => p,
                    _ => return false,
                }
            }
        };
        match &mut self.held {
            Some(p) => p.merge(more),
            None => self.held = Some(more),
        }
        self.budget.notify();
        true
    }
}

impl Drop for BodyPermit {
    fn drop(&mut self) {
        if self.held.take().is_some() {
            self.budget.notify();
        }
    }
}

/// The default budget: a quarter of the memory this process may use (the cgroup limit when
/// there is one, else the machine's), between 256 MiB and 4 GiB, and never below one body of
/// `max_body_bytes`.
pub fn default_capacity(max_body_bytes: usize) -> usize {
    let memory = memory_limit().unwrap_or(4 << 30);
    fraction_of(memory, max_body_bytes)
}

/// A quarter of `memory`, clamped to [256 MiB, 4 GiB], at least `max_body_bytes`.
fn fraction_of(memory: u64, max_body_bytes: usize) -> usize {
    let quarter = usize::try_from(memory / 4).unwrap_or(usize::MAX);
    quarter.clamp(256 << 20, 4 << 30).max(max_body_bytes)
}

/// The memory limit of this process: cgroup v2 `memory.max`, else `MemTotal`.
fn memory_limit() -> Option<u64> {
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    cgroup.or_else(|| {
        let info = std::fs::read_to_string("/proc/meminfo").ok()?;
        let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bodies_share_the_budget_and_give_their_room_back() {
        let budget = BodyBudget::new(100 * UNIT);
        let a = budget.reserve(60 * UNIT, Duration::ZERO).await.unwrap();
        assert!(budget.reserve(50 * UNIT, Duration::ZERO).await.is_none());
        let b = budget.reserve(40 * UNIT, Duration::ZERO).await.unwrap();
        assert_eq!(budget.available(), 0);
        drop(a);
        assert_eq!(budget.available(), 60 * UNIT);
        drop(b);
        assert_eq!(budget.available(), budget.capacity());
    }

    #[tokio::test]
    async fn a_waiting_body_gets_room_as_soon_as_another_gives_it_back() {
        let budget = BodyBudget::new(10 * UNIT);
        let held = budget.reserve(10 * UNIT, Duration::ZERO).await.unwrap();
        let waiter = {
            let budget = budget.clone();
            tokio::spawn(async move { budget.reserve(UNIT, Duration::from_secs(60)).await })
        };
        tokio::task::yield_now().await;
        drop(held);
        assert!(waiter.await.unwrap().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_finds_no_room_in_time_is_refused() {
        let budget = BodyBudget::new(10 * UNIT);
        let _held = budget.reserve(10 * UNIT, Duration::ZERO).await.unwrap();
        assert!(budget.reserve(UNIT, DEFAULT_WAIT).await.is_none());
    }

    #[tokio::test]
    async fn a_permit_grows_as_bytes_arrive_and_gives_all_of_it_back() {
        let budget = BodyBudget::new(100 * UNIT);
        let mut p = budget.reserve(10 * UNIT, Duration::ZERO).await.unwrap();
        assert_eq!(p.held(), 10 * UNIT);
        // Already covered: nothing more is taken.
        assert!(p.cover(10 * UNIT - 1, Duration::ZERO).await);
        assert_eq!(budget.available(), 90 * UNIT);
        assert!(p.cover(70 * UNIT + 1, Duration::ZERO).await);
        assert_eq!(p.held(), 71 * UNIT);
        assert_eq!(budget.available(), 29 * UNIT);
        drop(p);
        assert_eq!(budget.available(), budget.capacity());
    }

    #[tokio::test(start_paused = true)]
    async fn a_permit_that_cannot_grow_in_time_keeps_what_it_holds_until_dropped() {
        let budget = BodyBudget::new(100 * UNIT);
        let _other = budget.reserve(50 * UNIT, Duration::ZERO).await.unwrap();
        let mut p = budget.reserve(40 * UNIT, Duration::ZERO).await.unwrap();
        assert!(!p.cover(60 * UNIT, DEFAULT_WAIT).await);
        assert!(
            !p.cover(101 * UNIT, Duration::ZERO).await,
            "more than the whole budget"
        );
        assert_eq!(p.held(), 40 * UNIT);
        drop(p);
        assert_eq!(budget.available(), 50 * UNIT);
    }

    #[tokio::test]
    async fn a_growing_permit_gets_room_as_soon_as_another_gives_it_back() {
        let budget = BodyBudget::new(10 * UNIT);
        let held = budget.reserve(8 * UNIT, Duration::ZERO).await.unwrap();
        let mut p = budget.reserve(2 * UNIT, Duration::ZERO).await.unwrap();
        let grower = tokio::spawn(async move {
            let grown = p.cover(10 * UNIT, Duration::from_secs(60)).await;
            (grown, p.held())
        });
        tokio::task::yield_now().await;
        drop(held);
        assert_eq!(grower.await.unwrap(), (true, 10 * UNIT));
    }

    #[tokio::test]
    async fn the_observer_hears_the_room_held_after_every_change() {
        let heard = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = heard.clone();
        let budget = BodyBudget::new(100 * UNIT)
            .observed(Arc::new(move |held| log.lock().unwrap().push(held / UNIT)));
        let mut a = budget.reserve(10 * UNIT, Duration::ZERO).await.unwrap();
        let b = budget.reserve(5 * UNIT, Duration::ZERO).await.unwrap();
        assert!(a.cover(30 * UNIT, Duration::ZERO).await);
        drop(a);
        drop(b);
        assert_eq!(*heard.lock().unwrap(), [10, 15, 35, 5, 0]);
    }

    #[tokio::test]
    async fn a_body_larger_than_the_whole_budget_is_refused_at_once_and_empty_ones_pass() {
        let budget = BodyBudget::new(10 * UNIT);
        assert!(budget
            .reserve(11 * UNIT, Duration::from_secs(60))
            .await
            .is_none());
        assert!(budget.reserve(0, Duration::ZERO).await.is_some());
    }

    #[test]
    fn the_default_is_a_quarter_of_memory_within_bounds() {
        assert_eq!(fraction_of(8 << 30, 32 << 20), 2 << 30);
        assert_eq!(fraction_of(512 << 20, 32 << 20), 256 << 20);
        assert_eq!(fraction_of(64 << 30, 32 << 20), 4 << 30);
        assert_eq!(
            fraction_of(512 << 20, 1 << 30),
            1 << 30,
            "at least one body"
        );
        assert!(default_capacity(32 << 20) >= 256 << 20);
    }
}
