//! A graceful stop that ends when the work does.
//!
//! On SIGTERM (and in the old process of a graceful upgrade, once it has handed its sockets
//! over) Pingora broadcasts the shutdown, stops accepting, and then sleeps for the whole
//! `grace_period_seconds` before it stops its runtimes, whether or not anything is left to
//! finish. [`Drain`] is a background service that watches the same broadcast: as soon as no
//! request is in flight and no client connection is open (or the grace period is almost over),
//! it runs the final writes (state file, access log) and exits the process, as nginx and HAProxy
//! do. SIGINT (Pingora's fast stop) does not broadcast and is left to Pingora.

use async_trait::async_trait;
use log::{info, warn};
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use std::time::Duration;
use tokio::time::Instant;

/// How often the drain looks at what is still running.
pub const POLL: Duration = Duration::from_millis(100);

/// How long before Pingora's own grace period ends the drain gives up waiting, so that its final
/// writes run before Pingora stops the runtimes under it.
pub const MARGIN: Duration = Duration::from_secs(1);

/// What is still running.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Busy {
    /// Requests in flight (`keygate_in_flight_requests`).
    pub requests: i64,
    /// Client connections open (a request may be on its way in).
    pub connections: usize,
}

impl Busy {
    /// Whether nothing is left.
    pub fn is_idle(&self) -> bool {
        self.requests <= 0 && self.connections == 0
    }
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Nothing was left.
    Idle,
    /// The grace period ran out with this still running.
    GraceOver(Busy),
}

/// A step run once the drain ends, before the process exits.
type Final = (&'static str, Box<dyn Fn() + Send + Sync>);

/// The graceful stop's watcher (see the module docs).
pub struct Drain {
    /// How long to wait at most, from the broadcast.
    limit: Duration,
    busy: Box<dyn Fn() -> Busy + Send + Sync>,
    finals: Vec<Final>,
    exit: Box<dyn Fn() + Send + Sync>,
}

impl Drain {
    /// A drain for a server whose grace period is `grace`, reading what is running from `busy`.
    /// It exits the process with status 0 when done.
    pub fn new(grace: Duration, busy: impl Fn() -> Busy + Send + Sync + 'static) -> Self {
        Self {
            limit: grace.saturating_sub(MARGIN),
            busy: Box::new(busy),
            finals: Vec::new(),
            exit: Box::new(|| std::process::exit(0)),
        }
    }

    /// Adds a final step (named for the log), run in the order added.
    pub fn finally(mut self, what: &'static str, step: impl Fn() + Send + Sync + 'static) -> Self {
        self.finals.push((what, Box::new(step)));
        self
    }

    /// Replaces the process exit (for tests).
    pub fn with_exit(mut self, exit: impl Fn() + Send + Sync + 'static) -> Self {
        self.exit = Box::new(exit);
        self
    }

    /// Waits until nothing runs or the grace period is over.
    pub async fn wait(&self) -> Drained {
        let deadline = Instant::now() + self.limit;
        loop {
            let busy = (self.busy)();
            if busy.is_idle() {
                return Drained::Idle;
            }
            let now = Instant::now();
            if now >= deadline {
                return Drained::GraceOver(busy);
            }
            tokio::time::sleep(POLL.min(deadline - now)).await;
        }
    }
}

#[async_trait]
impl BackgroundService for Drain {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        while !*shutdown.borrow() {
            if shutdown.changed().await.is_err() {
                return;
            }
        }
        match self.wait().await {
            Drained::Idle => info!("graceful stop: nothing left in flight"),
            Drained::GraceOver(b) => warn!(
                "graceful stop: grace period over with {} request(s) in flight on {} connection(s)",
                b.requests, b.connections
            ),
        }
        for (what, step) in &self.finals {
            info!("graceful stop: {what}");
            step();
        }
        info!("graceful stop: exiting");
        (self.exit)();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use parking_lot::Mutex;
    use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
    use std::sync::Arc;

    /// A drain over two counters, recording its final steps and its exit in `log`.
    struct Rig {
        requests: Arc<AtomicI64>,
        connections: Arc<AtomicUsize>,
        log: Arc<Mutex<Vec<&'static str>>>,
    }

    fn rig(grace: Duration) -> (Rig, Drain) {
        let requests = Arc::new(AtomicI64::new(0));
        let connections = Arc::new(AtomicUsize::new(0));
        let log = Arc::new(Mutex::new(Vec::new()));
        let (r, c) = (requests.clone(), connections.clone());
        let (l1, l2, l3) = (log.clone(), log.clone(), log.clone());
        let drain = Drain::new(grace, move || Busy {
            requests: r.load(Ordering::SeqCst),
            connections: c.load(Ordering::SeqCst),
        })
        .finally("state file", move || l1.lock().push("state file"))
        .finally("access log", move || l2.lock().push("access log"))
        .with_exit(move || l3.lock().push("exit"));
        let rig = Rig {
            requests,
            connections,
            log,
        };
        (rig, drain)
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_server_exits_as_soon_as_the_shutdown_is_broadcast() {
        let (rig, drain) = rig(Duration::from_secs(600));
        let (tx, rx) = tokio::sync::watch::channel(false);
        let drain = Arc::new(drain);
        let task = tokio::spawn({
            let drain = drain.clone();
            async move { drain.start(rx).await }
        });
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert!(rig.log.lock().is_empty(), "nothing before the broadcast");
        let start = Instant::now();
        tx.send(true).unwrap();
        task.await.unwrap();
        assert!(start.elapsed() < Duration::from_secs(1));
        assert_eq!(*rig.log.lock(), ["state file", "access log", "exit"]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_drain_waits_for_requests_and_connections_then_writes_and_exits() {
        let (rig, drain) = rig(Duration::from_secs(600));
        rig.requests.store(2, Ordering::SeqCst);
        rig.connections.store(2, Ordering::SeqCst);
        let (tx, rx) = tokio::sync::watch::channel(false);
        let start = Instant::now();
        let task = tokio::spawn(async move { drain.start(rx).await });
        tx.send(true).unwrap();
        tokio::time::sleep(Duration::from_secs(30)).await;
        rig.requests.store(0, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(rig.log.lock().is_empty(), "a connection is still open");
        rig.connections.store(0, Ordering::SeqCst);
        task.await.unwrap();
        let took = start.elapsed();
        assert!(
            took >= Duration::from_secs(35) && took < Duration::from_secs(36),
            "{took:?}"
        );
        assert_eq!(*rig.log.lock(), ["state file", "access log", "exit"]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_grace_period_bounds_the_wait() {
        let (rig, drain) = rig(Duration::from_secs(60));
        rig.requests.store(1, Ordering::SeqCst);
        let start = Instant::now();
        assert_eq!(
            drain.wait().await,
            Drained::GraceOver(Busy {
                requests: 1,
                connections: 0
            })
        );
        let took = start.elapsed();
        let limit = Duration::from_secs(60) - MARGIN;
        assert!(took >= limit && took < limit + POLL, "{took:?}");
        let (tx, rx) = tokio::sync::watch::channel(false);
        drop(tx);
        drain.start(rx).await;
        assert!(rig.log.lock().is_empty(), "no broadcast, no exit");
    }
}
