//! The response cache's shared store: answers kept in Redis, each under its own key with its
//! own TTL, so every instance serves what any of them fetched. Redis trouble is a miss.

use super::link::{Link, BACKGROUND_TIMEOUT};
use crate::cache::key::CacheKey;
use crate::cache::SharedStore;
use log::debug;
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
        if !self.link.is_up() {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (link, name) = (self.link.clone(), self.name(key));
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        rt.spawn(async move {
            let out = link
                .timed("cache_put", BACKGROUND_TIMEOUT, |mut c| async move {
                    redis::cmd("SET")
                        .arg(name)
                        .arg(bytes)
                        .arg("PX")
                        .arg(ttl_ms)
                        .query_async::<()>(&mut c)
                        .await
                })
                .await;
            if let Err(e) = out {
                debug!("response cache: answer not shared ({e})");
            }
        });
    }
}
