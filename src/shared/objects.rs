//! The owners of account-scoped objects ([`crate::resources`]), shared: each id under its own
//! key, `<prefix>obj:<id>`, expiring with the entry. An instance that meets an id it did not
//! see created asks Redis once (within the request timeout) and keeps the answer. Redis
//! trouble is an unknown id: the request goes to any key, as without sharing.

use super::link::Link;
use crate::resources::{Owner, SharedResources};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Owners in Redis.
pub struct RedisObjects {
    link: Arc<Link>,
    prefix: String,
}

#[derive(Serialize, Deserialize)]
struct Stored {
    #[serde(flatten)]
    owner: Owner,
    expires_ms: u64,
}

impl RedisObjects {
    /// The store on `link` under `prefix`.
    pub fn new(link: Arc<Link>, prefix: &str) -> Arc<Self> {
        Arc::new(Self {
            link,
            prefix: prefix.to_string(),
        })
    }

    fn name(&self, id: &str) -> String {
        format!("{}obj:{id}", self.prefix)
    }
}

#[async_trait::async_trait]
impl SharedResources for RedisObjects {
    async fn get(&self, id: &str) -> Option<(Owner, u64)> {
        let name = self.name(id);
        let value = self
            .link
            .call("object_get", |mut c| async move {
                redis::cmd("GET")
                    .arg(name)
                    .query_async::<Option<String>>(&mut c)
                    .await
            })
            .await
            .ok()
            .flatten()?;
        let stored: Stored = serde_json::from_str(&value).ok()?;
        Some((stored.owner, stored.expires_ms))
    }

    fn put(&self, id: &str, owner: &Owner, expires_ms: u64) {
        let now = crate::clock::epoch_ms(std::time::SystemTime::now());
        let stored = Stored {
            owner: owner.clone(),
            expires_ms,
        };
        let Ok(value) = serde_json::to_vec(&stored) else {
            return;
        };
        let ttl_ms = expires_ms.saturating_sub(now);
        self.link
            .spawn_set("object_put", self.name(id), value, ttl_ms, "object owner");
    }
}
