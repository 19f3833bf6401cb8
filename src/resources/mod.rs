//! Objects that belong to one account: a file uploaded, a batch, a vector store, an assistant, a
//! thread, a stored response, a fine-tuning job or a fine-tuned `ft:` model exist only in the
//! account whose key created them; sent with another account's key a request naming one gets a
//! 404. keygate records the ids its answers create, with the account (or, for a key without
//! one, the key) that created them, and sends a later request naming such an id only to keys
//! of that account.
//!
//! [`ids`] recognises ids in paths and bodies; [`capture`] finds the ids an answer created;
//! [`table`] keeps them (bounded, expiring). [`Resources`] ties them together for the proxy:
//! what a request requires, what an answer created. With `redis:` the ids are shared through
//! [`SharedResources`] (read through on a local miss).

pub mod capture;
pub mod ids;
pub mod table;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use table::ResourceTable;

/// Who may use an object: an account of one upstream (`key:<id>` for a key without account).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Owner {
    /// The upstream's name.
    pub upstream: String,
    /// The account, or `key:` and the key's hash id.
    pub account: String,
}

impl Owner {
    /// The owner of what a key of `upstream` creates: its account, else the key itself.
    pub fn of_key(upstream: &str, account: Option<&str>, key_id: &str) -> Owner {
        Owner {
            upstream: upstream.to_string(),
            account: match account {
                Some(a) => a.to_string(),
                None => format!("key:{key_id}"),
            },
        }
    }

    /// Whether a key of `upstream` with `account` and `key_id` may use the object.
    pub fn admits(&self, upstream: &str, account: Option<&str>, key_id: &str) -> bool {
        self.upstream == upstream
            && match account {
                Some(a) => self.account == a,
                None => self.account.strip_prefix("key:") == Some(key_id),
            }
    }

    /// The account as people read it (`account org1`, `key key-3fa2b1c0`).
    pub fn describe(&self) -> String {
        match self.account.strip_prefix("key:") {
            Some(id) => format!("key {id} of upstream {}", self.upstream),
            None => format!("account {} of upstream {}", self.account, self.upstream),
        }
    }
}

/// Ids shared with other instances.
#[async_trait]
pub trait SharedResources: Send + Sync {
    /// `id`'s owner and expiry, if another instance recorded it.
    async fn get(&self, id: &str) -> Option<(Owner, u64)>;
    /// Records `id` for the others (in the background; never waits).
    fn put(&self, id: &str, owner: &Owner, expires_ms: u64);
}

/// What a request requires of its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement {
    /// The id (or `listing`) that requires it, for messages.
    pub id: String,
    /// The owner whose keys alone may serve the request.
    pub owner: Arc<Owner>,
}

/// Two ids of one request belong to different accounts: no key can serve it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{first} belongs to {first_owner} but {second} to {second_owner}: no key can use both")]
pub struct Conflict {
    /// The first id.
    pub first: String,
    /// Its owner.
    pub first_owner: String,
    /// The other id.
    pub second: String,
    /// Its owner.
    pub second_owner: String,
}

/// A request as [`Resources::requirement`] reads it.
#[derive(Debug, Clone, Copy)]
pub struct Asked<'a> {
    /// `GET`, `POST`, …
    pub method: &'a str,
    /// The path.
    pub path: &'a str,
    /// The body, if any.
    pub body: Option<&'a [u8]>,
    /// Who asks: a client's name or address, for listings.
    pub client: &'a str,
}

/// The ids keygate knows the owners of, and each client's last account.
pub struct Resources {
    table: ResourceTable,
    last_owner: moka::sync::Cache<String, Arc<Owner>>,
    shared: OnceLock<Arc<dyn SharedResources>>,
}

impl std::fmt::Debug for Resources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resources")
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

/// Most clients whose last account is remembered (for listings).
const MAX_CLIENTS: u64 = 10_000;

impl Resources {
    /// At most `max_ids` ids, each kept `ttl`.
    pub fn new(max_ids: u64, ttl: Duration, clock: crate::clock::SharedClock) -> Self {
        Self {
            table: ResourceTable::new(max_ids, ttl, clock),
            last_owner: moka::sync::Cache::new(MAX_CLIENTS),
            shared: OnceLock::new(),
        }
    }

    /// Shares ids through `shared` from now on.
    pub fn share(&self, shared: Arc<dyn SharedResources>) {
        let _ = self.shared.set(shared);
    }

    /// The table of ids.
    pub fn table(&self) -> &ResourceTable {
        &self.table
    }

    /// Whether requests must be looked at: ids were recorded, or other instances may have some.
    pub fn active(&self) -> bool {
        self.table.in_use() || self.shared.get().is_some()
    }

    async fn owner(&self, id: &str) -> Option<Arc<Owner>> {
        if let Some(o) = self.table.owner(id) {
            return Some(o);
        }
        let (owner, expires_ms) = self.shared.get()?.get(id).await?;
        let owner = Arc::new(owner);
        self.table.insert(id, owner.clone(), expires_ms);
        Some(owner)
    }

    /// The owner whose keys alone may serve the request: the owner of the ids it names (path,
    /// then body; a `model` of `ft:…` is one of them), or for a listing the client's last
    /// account. `None` when it names no known id. Two owners are a [`Conflict`].
    pub async fn requirement(&self, asked: Asked<'_>) -> Result<Option<Requirement>, Conflict> {
        if !self.active() {
            return Ok(None);
        }
        let mut candidates: Vec<&str> = ids::in_path(asked.path).collect();
        if let Some(body) = asked.body {
            for id in ids::in_body(body) {
                if !candidates.contains(&id) && candidates.len() < ids::MAX_IDS {
                    candidates.push(id);
                }
            }
        }
        let mut found: Option<Requirement> = None;
        for id in candidates {
            let Some(owner) = self.owner(id).await else {
                continue;
            };
            match &found {
                None => {
                    found = Some(Requirement {
                        id: id.to_string(),
                        owner,
                    })
                }
                Some(first) if first.owner != owner => {
                    return Err(Conflict {
                        first: first.id.clone(),
                        first_owner: first.owner.describe(),
                        second: id.to_string(),
                        second_owner: owner.describe(),
                    })
                }
                Some(_) => {}
            }
        }
        if found.is_none() && ids::is_listing(asked.method, asked.path) {
            found = self.last_owner.get(asked.client).map(|owner| Requirement {
                id: "the listing".to_string(),
                owner,
            });
        }
        Ok(found)
    }

    /// An answer of `owner`'s key to `client` created `ids` (or named them as its own).
    pub fn created(&self, ids: &[String], owner: &Owner, client: &str) {
        let owner = Arc::new(owner.clone());
        for id in ids {
            let expires_ms = self.table.record(id, owner.clone());
            if let Some(shared) = self.shared.get() {
                shared.put(id, &owner, expires_ms);
            }
        }
        if !ids.is_empty() {
            self.last_owner.insert(client.to_string(), owner);
        }
    }

    /// A request of `client` that required `owner` was served: listings follow that account.
    pub fn used(&self, owner: &Arc<Owner>, client: &str) {
        self.last_owner.insert(client.to_string(), owner.clone());
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use parking_lot::Mutex;

    fn org(account: &str) -> Owner {
        Owner {
            upstream: "openai".into(),
            account: account.into(),
        }
    }

    fn asked<'a>(method: &'a str, path: &'a str, body: Option<&'a [u8]>) -> Asked<'a> {
        Asked {
            method,
            path,
            body,
            client: "team",
        }
    }

    fn block<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    fn resources() -> Resources {
        Resources::new(1000, Duration::from_secs(3600), ManualClock::new())
    }

    #[test]
    fn owners_admit_their_accounts_keys_or_the_one_key() {
        let o = Owner::of_key("openai", Some("org1"), "key-1");
        assert!(o.admits("openai", Some("org1"), "key-2"));
        assert!(!o.admits("openai", Some("org2"), "key-1"));
        assert!(!o.admits("azure", Some("org1"), "key-1"));
        let k = Owner::of_key("openai", None, "key-1");
        assert_eq!(k.account, "key:key-1");
        assert!(k.admits("openai", None, "key-1"));
        assert!(!k.admits("openai", None, "key-2"));
        assert_eq!(k.describe(), "key key-1 of upstream openai");
        assert_eq!(o.describe(), "account org1 of upstream openai");
    }

    #[test]
    fn a_request_naming_a_created_id_requires_its_owner() {
        let r = resources();
        assert_eq!(
            block(r.requirement(asked("GET", "/v1/files/file-1", None))),
            Ok(None)
        );
        r.created(&["file-1".into()], &org("org1"), "team");
        let need = block(r.requirement(asked("GET", "/v1/files/file-1/content", None)))
            .unwrap()
            .unwrap();
        assert_eq!(
            (need.id.as_str(), need.owner.account.as_str()),
            ("file-1", "org1")
        );
        let body = br#"{"input_file_id":"file-1","endpoint":"/v1/chat/completions"}"#;
        let need = block(r.requirement(asked("POST", "/v1/batches", Some(body)))).unwrap();
        assert_eq!(need.unwrap().id, "file-1");
        let unknown = br#"{"input_file_id":"file-404"}"#;
        assert_eq!(
            block(r.requirement(asked("POST", "/v1/batches", Some(unknown)))),
            Ok(None)
        );
    }

    #[test]
    fn ids_of_two_accounts_in_one_request_are_a_conflict() {
        let r = resources();
        r.created(&["file-1".into()], &org("org1"), "team");
        r.created(&["vs_2".into()], &org("org2"), "team");
        let body = br#"{"file_id":"file-1"}"#;
        let err = block(r.requirement(asked("POST", "/v1/vector_stores/vs_2/files", Some(body))))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "vs_2 belongs to account org2 of upstream openai but file-1 to account org1 of upstream openai: no key can use both"
        );
    }

    #[test]
    fn listings_follow_the_clients_last_account() {
        let r = resources();
        r.created(&["file-1".into()], &org("org1"), "team");
        let need = block(r.requirement(asked("GET", "/v1/files", None)))
            .unwrap()
            .unwrap();
        assert_eq!(need.owner.account, "org1");
        r.used(&Arc::new(org("org2")), "team");
        let need = block(r.requirement(asked("GET", "/v1/batches", None)))
            .unwrap()
            .unwrap();
        assert_eq!(need.owner.account, "org2");
        let other = Asked {
            client: "other",
            ..asked("GET", "/v1/files", None)
        };
        assert_eq!(block(r.requirement(other)), Ok(None));
    }

    struct FakeShared(Mutex<Vec<(String, Owner, u64)>>);

    #[async_trait]
    impl SharedResources for FakeShared {
        async fn get(&self, id: &str) -> Option<(Owner, u64)> {
            let all = self.0.lock();
            all.iter().find(|e| e.0 == id).map(|e| (e.1.clone(), e.2))
        }
        fn put(&self, id: &str, owner: &Owner, expires_ms: u64) {
            self.0
                .lock()
                .push((id.to_string(), owner.clone(), expires_ms));
        }
    }

    #[test]
    fn ids_are_shared_and_read_through_on_a_local_miss() {
        let shared = Arc::new(FakeShared(Mutex::new(Vec::new())));
        let a = resources();
        a.share(shared.clone());
        a.created(&["file-1".into()], &org("org1"), "team");
        assert_eq!(shared.0.lock().len(), 1);
        let b = resources();
        b.share(shared);
        assert!(!b.table().in_use());
        let need = block(b.requirement(asked("GET", "/v1/files/file-1", None))).unwrap();
        assert_eq!(need.unwrap().owner.account, "org1");
        assert!(
            b.table().owner("file-1").is_some(),
            "kept locally once read"
        );
    }
}
