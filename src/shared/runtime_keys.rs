//! The runtime key store in Redis: one hash, `<prefix>{keys}:runtime`, field `upstream/name`,
//! value the [`StoredKey`] as JSON (its secret sealed), and a marker field that every write
//! sets: a hash without it was lost (a Redis restarted without its data), not emptied by
//! removals, and the instances put their keys back. Every instance reads the whole hash
//! twice a second and brings its pools in line ([`crate::key_store::RuntimeKeys::sync`]), so a
//! key added or removed on one instance serves (or stops) on all within a second, and a
//! starting instance finds every key. Polling rather than pub/sub: the hash is small, and a
//! missed message can never leave an instance behind.

use super::link::{Link, BACKGROUND_TIMEOUT};
use crate::key_store::{KeyBackend, RuntimeKeys, StoreError, StoredKey};
use async_trait::async_trait;
use log::{debug, warn};
use pingora_core::server::ShutdownWatch;
use std::sync::Arc;
use std::time::Duration;

/// The field every write sets (no key's field: those hold a `/`).
const MARKER: &str = "_store";

/// How often every instance reads the store.
pub const SYNC_EVERY: Duration = Duration::from_millis(500);

/// Runtime keys in Redis.
pub struct RedisKeyStore {
    link: Arc<Link>,
    hash: String,
}

impl RedisKeyStore {
    /// The store on `link` under `prefix`.
    pub fn new(link: Arc<Link>, prefix: &str) -> Self {
        Self {
            link,
            hash: format!("{prefix}{{keys}}:runtime"),
        }
    }

    fn field(upstream: &str, name: &str) -> String {
        format!("{upstream}/{name}")
    }

    fn refuse_if_down(&self) -> Result<(), StoreError> {
        if self.link.is_up() {
            Ok(())
        } else {
            Err(StoreError::Redis(
                "Redis is unreachable: runtime keys cannot be changed now".into(),
            ))
        }
    }
}

#[async_trait]
impl KeyBackend for RedisKeyStore {
    async fn load(&self) -> Result<Vec<StoredKey>, StoreError> {
        let hash = self.hash.clone();
        let all = self
            .link
            .timed(
                "runtime_keys_load",
                BACKGROUND_TIMEOUT,
                |mut c| async move {
                    redis::cmd("HGETALL")
                        .arg(&hash)
                        .query_async::<Vec<(String, String)>>(&mut c)
                        .await
                },
            )
            .await
            .map_err(|e| StoreError::Redis(e.to_string()))?;
        if all.is_empty() {
            return Err(StoreError::Lost);
        }
        let mut keys = Vec::with_capacity(all.len());
        for (field, value) in all.into_iter().filter(|(f, _)| f != MARKER) {
            match serde_json::from_str::<StoredKey>(&value) {
                Ok(k) => keys.push(k),
                Err(e) => debug!("runtime key store: field {field:?} skipped: {e}"),
            }
        }
        Ok(keys)
    }

    async fn put(&self, key: &StoredKey) -> Result<(), StoreError> {
        self.refuse_if_down()?;
        let value = serde_json::to_string(key).map_err(|e| StoreError::Redis(e.to_string()))?;
        let (hash, field) = (self.hash.clone(), Self::field(&key.upstream, &key.name));
        self.link
            .timed("runtime_keys_put", BACKGROUND_TIMEOUT, |mut c| async move {
                redis::Cmd::hset_multiple(&hash, &[(field.as_str(), value.as_str()), (MARKER, "1")])
                    .query_async::<()>(&mut c)
                    .await
            })
            .await
            .map_err(|e| StoreError::Redis(e.to_string()))
    }

    async fn delete(&self, upstream: &str, name: &str) -> Result<bool, StoreError> {
        self.refuse_if_down()?;
        let (hash, field) = (self.hash.clone(), Self::field(upstream, name));
        let n = self
            .link
            .timed(
                "runtime_keys_delete",
                BACKGROUND_TIMEOUT,
                |mut c| async move {
                    redis::Cmd::hdel(&hash, field)
                        .query_async::<u64>(&mut c)
                        .await
                },
            )
            .await
            .map_err(|e| StoreError::Redis(e.to_string()))?;
        Ok(n > 0)
    }
}

/// Reads the store every [`SYNC_EVERY`] while Redis is up, until keygate stops.
pub async fn keep_in_line(runtime: Arc<RuntimeKeys>, link: Arc<Link>, mut shutdown: ShutdownWatch) {
    let mut tick = tokio::time::interval(SYNC_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        if !link.is_up() {
            continue;
        }
        match runtime.sync().await {
            Ok(_) => failing = false,
            Err(e) if !failing => {
                warn!("runtime keys: cannot read the store ({e}); retrying");
                failing = true;
            }
            Err(_) => {}
        }
    }
}
