//! The background side of the shared state: connecting, the subscription, writing this
//! instance's key changes, applying the others', and bringing everything back in step after
//! Redis was away.

use super::key_sync::{Applied, Event, HashWrite, KeyBook};
use super::limits::SharedLimits;
use super::link::{connect, Link, BACKGROUND_TIMEOUT};
use super::runtime_keys::{keep_in_line, RedisKeyStore};
use crate::clients::limits::Limits;
use crate::clock::SharedClock;
use crate::config::validate::RedisConfig;
use crate::key_store::RuntimeKeys;
use crate::keys::KeyPool;
use crate::metrics::Metrics;
use async_trait::async_trait;
use log::{debug, info, warn};
use parking_lot::Mutex;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use redis::{PushInfo, PushKind, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

/// How often the link's health is checked (and a lost connection retried).
const HEALTH_EVERY: Duration = Duration::from_millis(250);

/// Most key changes kept while Redis is away; beyond it the oldest are dropped (the push of all
/// local states on return covers them).
const MAX_PENDING: usize = 10_000;

/// Everything shared through Redis, and the task that keeps it in step.
pub struct Shared {
    cfg: RedisConfig,
    link: Arc<Link>,
    book: Arc<KeyBook>,
    limits: Arc<SharedLimits>,
    hash: String,
    channel: String,
    metrics: &'static Metrics,
    changes: Mutex<Option<UnboundedReceiver<Event>>>,
    /// Changes made while Redis was away, written on its return.
    pending: Mutex<Vec<Event>>,
    /// Keys added at run time, kept in line with the Redis store once the service runs.
    runtime: Mutex<Option<Arc<RuntimeKeys>>>,
}

impl Shared {
    /// Sets up sharing for these pools and clients (name, limits); every pool's changes are
    /// handed to the writer from now on. Nothing connects until the service runs.
    pub fn new(
        cfg: &RedisConfig,
        pools: Vec<Arc<KeyPool>>,
        clients: &[(String, Limits)],
        clock: SharedClock,
        metrics: &'static Metrics,
    ) -> Arc<Self> {
        for direction in ["sent", "applied"] {
            metrics.shared_key_events.with_label_values(&[direction]);
        }
        metrics
            .shared_key_event_delay
            .with_label_values::<&str>(&[]);
        let instance = format!("{:016x}", rand::random::<u64>());
        let link = Link::new(cfg.timeout, metrics);
        let book = Arc::new(KeyBook::new(instance.clone(), pools, clock.clone()));
        let (tx, rx) = unbounded_channel();
        for (pi, pool) in book.pools().iter().enumerate() {
            let tx: UnboundedSender<Event> = tx.clone();
            // The observer holds the book weakly: the pools it serves hold the observer.
            let weak = Arc::downgrade(&book);
            pool.observe(Arc::new(move |idx, change| {
                if let Some(ev) = weak.upgrade().and_then(|b| b.event(pi, idx, change)) {
                    let _ = tx.send(ev);
                }
            }));
        }
        let limits = SharedLimits::new(
            link.clone(),
            &cfg.prefix,
            &instance,
            cfg.instances,
            clients,
            clock,
        );
        Arc::new(Shared {
            hash: format!("{}{{keys}}:state", cfg.prefix),
            channel: format!("{}keys:events", cfg.prefix),
            cfg: cfg.clone(),
            link,
            book,
            limits,
            metrics,
            changes: Mutex::new(Some(rx)),
            pending: Mutex::new(Vec::new()),
            runtime: Mutex::new(None),
        })
    }

    /// The owners of account-scoped objects, in this Redis.
    pub fn objects(&self) -> Arc<super::objects::RedisObjects> {
        super::objects::RedisObjects::new(self.link.clone(), &self.cfg.prefix)
    }

    /// The runtime key store in this Redis.
    pub fn runtime_key_store(&self) -> Arc<RedisKeyStore> {
        Arc::new(RedisKeyStore::new(self.link.clone(), &self.cfg.prefix))
    }

    /// Keeps `runtime`'s keys in line with the Redis store while the service runs.
    pub fn keep_runtime_keys(&self, runtime: Arc<RuntimeKeys>) {
        *self.runtime.lock() = Some(runtime);
    }

    /// The shared client limits.
    pub fn limits(&self) -> &Arc<SharedLimits> {
        &self.limits
    }

    /// The response cache's store in this Redis.
    pub fn answers(&self) -> Arc<super::answers::RedisAnswers> {
        super::answers::RedisAnswers::new(self.link.clone(), &self.cfg.prefix)
    }

    /// Writes one change to the hash and publishes it.
    async fn write(&self, ev: &Event) -> bool {
        let payload = match serde_json::to_string(ev) {
            Ok(p) => p,
            Err(_) => return true,
        };
        let (hash, channel) = (self.hash.clone(), self.channel.clone());
        let write = ev.hash_write();
        let out = self
            .link
            .timed("key_event", BACKGROUND_TIMEOUT, |mut c| async move {
                // Two commands at once rather than a pipeline: on a cluster the hash and the
                // channel live in different slots.
                let store = match write {
                    HashWrite::Set { field, value } => redis::Cmd::hset(&hash, field, value),
                    HashWrite::Delete { field } => redis::Cmd::hdel(&hash, field),
                };
                let publish = redis::Cmd::publish(&channel, payload);
                let mut c2 = c.clone();
                let (stored, published) = tokio::join!(
                    store.query_async::<()>(&mut c),
                    publish.query_async::<()>(&mut c2)
                );
                stored.and(published)
            })
            .await;
        match out {
            Ok(()) => {
                self.metrics
                    .shared_key_events
                    .with_label_values(&["sent"])
                    .inc();
                true
            }
            Err(e) => {
                debug!("shared key state: change not written ({e})");
                false
            }
        }
    }

    fn keep_pending(&self, ev: Event) {
        let mut p = self.pending.lock();
        if p.len() >= MAX_PENDING {
            p.remove(0);
        }
        p.push(ev);
    }

    /// Hands this instance's changes to Redis as they come; while Redis is away they wait.
    async fn writer(self: Arc<Self>, mut rx: UnboundedReceiver<Event>) {
        while let Some(ev) = rx.recv().await {
            if !self.link.is_up() || !self.write(&ev).await {
                self.link.set_up(false);
                self.keep_pending(ev);
            }
        }
    }

    /// Applies what other instances publish; a lost connection marks the link down.
    async fn reader(self: Arc<Self>, mut rx: UnboundedReceiver<PushInfo>) {
        while let Some(push) = rx.recv().await {
            match push.kind {
                PushKind::Message => {
                    let Some(ev) = push.data.last().and_then(payload) else {
                        continue;
                    };
                    if ev.from == self.book.instance() {
                        continue;
                    }
                    self.applied(&ev, true);
                }
                PushKind::Disconnection => {
                    self.link.set_up(false);
                }
                _ => {}
            }
        }
    }

    fn applied(&self, ev: &Event, live: bool) {
        if self.book.apply(ev) == Applied::Changed {
            self.metrics
                .shared_key_events
                .with_label_values(&["applied"])
                .inc();
            if live {
                let now = crate::clock::epoch_ms(std::time::SystemTime::now());
                let delay = Duration::from_millis(now.saturating_sub(ev.at_ms));
                self.metrics
                    .shared_key_event_delay
                    .with_label_values::<&str>(&[])
                    .observe(delay.as_secs_f64());
            }
        }
    }

    /// After Redis was away (or at start): this instance's changes made meanwhile are written,
    /// the shared states loaded, and local states Redis lacks (a restarted Redis has none)
    /// pushed. False if Redis failed on the way.
    async fn resync(&self) -> bool {
        let pending: Vec<Event> = std::mem::take(&mut *self.pending.lock());
        for (i, ev) in pending.iter().enumerate() {
            if !self.write(ev).await {
                let mut p = self.pending.lock();
                let rest: Vec<Event> = pending[i..].to_vec();
                p.splice(0..0, rest);
                return false;
            }
        }
        let hash = self.hash.clone();
        let all = self
            .link
            .timed("load_keys", BACKGROUND_TIMEOUT, |mut c| async move {
                redis::cmd("HGETALL")
                    .arg(&hash)
                    .query_async::<Vec<(String, String)>>(&mut c)
                    .await
            })
            .await;
        let Ok(all) = all else {
            return false;
        };
        let mut expired = Vec::new();
        let mut present = std::collections::HashSet::new();
        for (field, value) in &all {
            let Some(ev) = Event::from_hash(field, value) else {
                continue;
            };
            if self.book.expired(&ev) {
                expired.push(field.clone());
                continue;
            }
            present.insert(field.clone());
            self.applied(&ev, false);
        }
        if !expired.is_empty() {
            let hash = self.hash.clone();
            let _ = self
                .link
                .timed("prune_keys", BACKGROUND_TIMEOUT, |mut c| async move {
                    redis::cmd("HDEL")
                        .arg(&hash)
                        .arg(expired)
                        .query_async::<()>(&mut c)
                        .await
                })
                .await;
        }
        for ev in self.book.local_states() {
            let missing = match ev.hash_write() {
                HashWrite::Set { field, .. } => !present.contains(&field),
                HashWrite::Delete { .. } => false,
            };
            if missing && !self.write(&ev).await {
                return false;
            }
        }
        self.limits.push_unpushed().await;
        true
    }

    /// Connects (retrying until Redis answers), subscribes, then checks the link's health and
    /// resynchronises whenever it comes back.
    async fn keeper(
        self: Arc<Self>,
        pushes: UnboundedSender<PushInfo>,
        mut shutdown: ShutdownWatch,
    ) {
        let mut warned = false;
        let mut subscribed = false;
        let mut tick = tokio::time::interval(HEALTH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            if !self.link.has_conn() {
                match connect(&self.cfg, pushes.clone()).await {
                    Ok(conn) => self.link.set_conn(conn),
                    Err(e) => {
                        if !warned {
                            warn!("Redis: cannot connect ({e}); going on with local state and retrying");
                            warned = true;
                        }
                        continue;
                    }
                }
            }
            if !subscribed {
                let channel = self.channel.clone();
                subscribed = self
                    .link
                    .timed("subscribe", BACKGROUND_TIMEOUT, |mut c| async move {
                        c.subscribe(&channel).await
                    })
                    .await
                    .is_ok();
                if !subscribed {
                    continue;
                }
            }
            let alive = self
                .link
                .timed("ping", self.link.timeout(), |mut c| async move {
                    redis::cmd("PING").query_async::<Value>(&mut c).await
                })
                .await
                .is_ok();
            if !alive {
                self.link.set_up(false);
                continue;
            }
            if !self.link.is_up() {
                if self.resync().await {
                    self.link.set_up(true);
                    warned = false;
                } else {
                    debug!("Redis: resynchronisation failed; retrying");
                }
            } else {
                // Expired leases go back and token corrections reach Redis even when no
                // request comes to carry them.
                self.limits.flush(false).await;
            }
        }
    }
}

/// The event in a published message's payload.
fn payload(v: &Value) -> Option<Event> {
    let bytes: &[u8] = match v {
        Value::BulkString(b) => b,
        Value::SimpleString(s) => s.as_bytes(),
        _ => return None,
    };
    serde_json::from_slice(bytes).ok()
}

/// Runs the shared state's tasks until keygate stops.
pub struct SharedService(pub Arc<Shared>);

#[async_trait]
impl BackgroundService for SharedService {
    async fn start(&self, shutdown: ShutdownWatch) {
        let shared = self.0.clone();
        info!(
            "sharing key states and client limits through Redis ({} node(s), prefix {:?})",
            shared.cfg.urls.len(),
            shared.cfg.prefix
        );
        let (push_tx, push_rx) = unbounded_channel();
        let Some(changes) = shared.changes.lock().take() else {
            return;
        };
        let writer = tokio::spawn(shared.clone().writer(changes));
        let reader = tokio::spawn(shared.clone().reader(push_rx));
        let runtime = shared
            .runtime
            .lock()
            .clone()
            .map(|rk| tokio::spawn(keep_in_line(rk, shared.link.clone(), shutdown.clone())));
        shared.keeper(push_tx, shutdown).await;
        writer.abort();
        reader.abort();
        if let Some(task) = runtime {
            task.abort();
        }
    }
}
