//! A cap on the request-body bytes held across all requests at once.
//!
//! keygate reads a request's body before routing it and keeps it for retries, so each request
//! may hold up to `max_body_bytes`. Without a cap over all of them, many clients announcing large
//! bodies at once (by accident or on purpose) would grow memory without bound. A request reserves
//! its body's size before reading it and gives it back when the body is no longer needed; when
//! the budget is spent, a new body waits briefly for room, then is refused with 503.

use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Reservations are counted in KiB, so that a `u32` permit count covers any body size.
const UNIT: usize = 1024;

/// How long a new body waits for room by default before it is refused.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(2);

/// The shared budget of buffered body bytes.
#[derive(Debug, Clone)]
pub struct BodyBudget {
    units: Arc<Semaphore>,
    capacity: usize,
}

/// Room for one body; given back when dropped.
#[derive(Debug)]
pub struct BodyPermit {
    _permit: Option<OwnedSemaphorePermit>,
}

impl BodyBudget {
    /// A budget of `capacity` bytes (rounded up to whole KiB).
    pub fn new(capacity: usize) -> Self {
        let units = capacity.div_ceil(UNIT).clamp(1, Semaphore::MAX_PERMITS);
        Self {
            units: Arc::new(Semaphore::new(units)),
            capacity: units * UNIT,
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
        if bytes == 0 {
            return Some(BodyPermit { _permit: None });
        }
        let units = bytes.div_ceil(UNIT);
        if units * UNIT > self.capacity {
            return None;
        }
        let units = u32::try_from(units).ok()?;
        let acquire = self.units.clone().acquire_many_owned(units);
        match tokio::time::timeout(wait, acquire).await {
            Ok(Ok(permit)) => Some(BodyPermit {
                _permit: Some(permit),
            }),
            _ => None,
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
