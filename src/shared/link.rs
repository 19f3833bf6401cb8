//! The connection to Redis (one server or a cluster) and whether it is usable now.
//!
//! Requests never wait for Redis longer than the configured timeout, and not at all while it is
//! known to be down: one failed or slow call marks the link down, requests then go on with local
//! state at once, and only the background health check (a `PING` answered within the timeout)
//! marks it up again.

use crate::config::validate::RedisConfig;
use crate::metrics::Metrics;
use log::{info, warn};
use parking_lot::RwLock;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, IntoConnectionInfo, Pipeline, ProtocolVersion, PushInfo, RedisFuture, Value};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedSender;

/// Why a Redis operation gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The link is down (or not connected yet): the caller goes on locally at once.
    #[error("Redis is down")]
    Down,
    /// No answer within the timeout.
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
    /// Redis answered with an error, or the connection broke.
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// A connection to one server or to a cluster; cheap to clone (both multiplex one socket per
/// node and reconnect by themselves).
#[derive(Clone)]
pub enum Conn {
    /// One server.
    Single(ConnectionManager),
    /// A Redis Cluster.
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

impl Conn {
    /// Subscribes to `channel`; messages arrive on the push sender given to [`connect`], and the
    /// subscription is renewed by the client after every reconnection.
    pub async fn subscribe(&mut self, channel: &str) -> redis::RedisResult<()> {
        match self {
            Conn::Single(c) => c.subscribe(channel).await,
            Conn::Cluster(c) => c.subscribe(channel).await,
        }
    }
}

/// Opens the connection (RESP3, so that one connection carries commands and pub/sub), sending
/// pushed messages to `pushes`. A single server connects lazily and never fails here; a cluster
/// must reach a node to learn its slots.
pub async fn connect(
    cfg: &RedisConfig,
    pushes: UnboundedSender<PushInfo>,
) -> redis::RedisResult<Conn> {
    // Connection attempts get a little longer than a command: a TLS handshake is several trips.
    let connect_timeout = cfg.timeout.max(Duration::from_millis(500));
    if cfg.cluster {
        let mut b = ClusterClientBuilder::new(cfg.urls.clone())
            .use_protocol(ProtocolVersion::RESP3)
            .push_sender(pushes)
            .connection_timeout(connect_timeout)
            .response_timeout(Duration::from_secs(2))
            .retries(2);
        if let Some(p) = &cfg.password {
            b = b.password(p.expose());
        }
        let client = b.build()?;
        Ok(Conn::Cluster(client.get_async_connection().await?))
    } else {
        let url = cfg.urls.first().map(String::as_str).unwrap_or_default();
        let mut info = url.into_connection_info()?;
        let mut settings = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        if let Some(p) = &cfg.password {
            settings = settings.set_password(p.expose());
        }
        info = info.set_redis_settings(settings);
        let client = redis::Client::open(info)?;
        let config = ConnectionManagerConfig::new()
            .set_push_sender(pushes)
            .set_automatic_resubscription()
            .set_connection_timeout(Some(connect_timeout))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        Ok(Conn::Single(ConnectionManager::new_lazy_with_config(
            client, config,
        )?))
    }
}

/// The shared connection, its state and its metrics.
pub struct Link {
    conn: RwLock<Option<Conn>>,
    up: AtomicBool,
    timeout: Duration,
    metrics: &'static Metrics,
}

/// The operation labels of the Redis metrics, so that every series exists from the start.
pub const OPS: [&str; 17] = [
    "admit",
    "flush",
    "settle",
    "release",
    "push_budget",
    "key_event",
    "load_keys",
    "prune_keys",
    "subscribe",
    "ping",
    "cache_get",
    "cache_put",
    "runtime_keys_load",
    "runtime_keys_put",
    "runtime_keys_delete",
    "object_get",
    "object_put",
];

/// How long background work (loading all key states, pushing local ones) may take: it holds no
/// request up, and a cluster's first answer may need a redirection or two.
pub const BACKGROUND_TIMEOUT: Duration = Duration::from_secs(2);

impl Link {
    /// A link not connected yet, marked down.
    pub fn new(timeout: Duration, metrics: &'static Metrics) -> Arc<Self> {
        metrics.redis_up.set(0);
        for op in OPS {
            metrics.redis_op_duration.with_label_values(&[op]);
            metrics.redis_errors.with_label_values(&[op]);
        }
        Arc::new(Link {
            conn: RwLock::new(None),
            up: AtomicBool::new(false),
            timeout,
            metrics,
        })
    }

    /// Keeps `conn` for every later operation.
    pub fn set_conn(&self, conn: Conn) {
        *self.conn.write() = Some(conn);
    }

    /// Whether a connection was made (a cluster's is made once a node answers).
    pub fn has_conn(&self) -> bool {
        self.conn.read().is_some()
    }

    /// Whether requests should ask Redis now.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Marks the link up or down; true if that changed it.
    pub fn set_up(&self, up: bool) -> bool {
        let was = self.up.swap(up, Ordering::AcqRel);
        self.metrics.redis_up.set(i64::from(up));
        if was != up {
            if up {
                info!("Redis is reachable: shared state in use");
            } else {
                warn!("Redis is unreachable or slow: going on with local state");
            }
        }
        was != up
    }

    /// Sets `key` to `value` for `ttl_ms` in the background (never waits; skipped while Redis
    /// is down). `what` names it in the debug line of a failure.
    pub fn spawn_set(
        self: &Arc<Self>,
        op: &'static str,
        key: String,
        value: Vec<u8>,
        ttl_ms: u64,
        what: &'static str,
    ) {
        if !self.is_up() {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let link = self.clone();
        rt.spawn(async move {
            let out = link
                .timed(op, BACKGROUND_TIMEOUT, |mut c| async move {
                    redis::cmd("SET")
                        .arg(key)
                        .arg(value)
                        .arg("PX")
                        .arg(ttl_ms.max(1))
                        .query_async::<()>(&mut c)
                        .await
                })
                .await;
            if let Err(e) = out {
                log::debug!("{what} not shared ({e})");
            }
        });
    }

    /// The per-request timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Runs `f` on the connection for a request: at once `Down` while the link is down, at most
    /// the configured timeout otherwise. A failure marks the link down.
    pub async fn call<T, F, Fut>(&self, op: &'static str, f: F) -> Result<T, LinkError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        if !self.is_up() {
            return Err(LinkError::Down);
        }
        let out = self.timed(op, self.timeout, f).await;
        if out.is_err() {
            self.set_up(false);
        }
        out
    }

    /// Runs `f` on the connection whether or not the link is marked up, waiting at most `limit`;
    /// for the background tasks, which decide themselves what a failure means.
    pub async fn timed<T, F, Fut>(
        &self,
        op: &'static str,
        limit: Duration,
        f: F,
    ) -> Result<T, LinkError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let Some(conn) = self.conn.read().clone() else {
            return Err(LinkError::Down);
        };
        debug_assert!(OPS.contains(&op), "{op} is not in OPS");
        let started = Instant::now();
        let out = match tokio::time::timeout(limit, f(conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(LinkError::Redis(e)),
            Err(_) => Err(LinkError::Timeout(limit)),
        };
        self.metrics
            .redis_op_duration
            .with_label_values(&[op])
            .observe(started.elapsed().as_secs_f64());
        if out.is_err() {
            self.metrics.redis_errors.with_label_values(&[op]).inc();
        }
        out
    }
}
