//! The response cache's shared store: answers kept in Redis, each under its own key with its
//! own TTL, so every instance serves what any of them fetched. Redis trouble is a miss.

use super::link::Link;
use crate::cache::key::CacheKey;
use crate::cache::SharedStore;
use std::fmt::Write;
use std::sync::Arc;
use std::time::Duration;

/// Answers in Redis under `<prefix>cache:<hex of the key>`.
pub struct RedisAnswers {
    link: Arc<Link>,
    prefix: String,
}

impl RedisAnswers {
    /// A store on `link` whose keys start with `prefix`.
    pub fn new(link: Arc<Link>, prefix: &str) -> Arc<Self> {
        Arc::new(RedisAnswers {
            link,
            prefix: prefix.to_string(),
        })
    }

    fn name(&self, key: &CacheKey) -> String {
        let mut out = String::with_capacity(self.prefix.len() + 6 + 64);
        out.push_str(&self.prefix);
        out.push_str("cache:");
        for b in key.0 {
            let _ = write!(out, "{b:02x}");
        }
        out
    }
}

#[async_trait::async_trait]
impl SharedStore for RedisAnswers {
    async fn get(&self, key: &CacheKey) -> Option<Vec<u8>> {
        let name = self.name(key);
        self.link
            .call("cache_get", |mut c| async move {
                redis::cmd("GET")
                    .arg(name)
                    .query_async::<Option<Vec<u8>>>(&mut c)
                    .await
            })
            .await
            .ok()
            .flatten()
    }

    fn put(&self, key: &CacheKey, bytes: Vec<u8>, ttl: Duration) {
        let ttl_ms = crate::clock::millis(ttl);
        self.link.spawn_set(
            "cache_put",
            self.name(key),
            bytes,
            ttl_ms,
            "response cache answer",
        );
    }
}
