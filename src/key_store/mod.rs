//! Keys added at run time through the admin API: kept (secrets sealed with AES-256-GCM under
//! the operator's master key) in a local file or in Redis, and put into the upstreams' pools.
//!
//! [`sealed`] seals and opens secrets; [`file`] is the local store; [`runtime`] adds and
//! removes keys in the pools and keeps them in line with the store. The Redis store lives with
//! the rest of the shared state (`crate::shared::runtime_keys`) and implements [`KeyBackend`].

pub mod file;
pub mod runtime;
pub mod sealed;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use runtime::{NewKey, RuntimeKeyError, RuntimeKeys};
pub use sealed::{MasterKey, SealError, Sealed};

/// One key added at run time, as stored: everything but the secret in the clear.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredKey {
    /// Its upstream.
    pub upstream: String,
    /// Its name.
    pub name: String,
    /// The hash id of its secret.
    pub id: String,
    /// Its account, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    /// Its weight (for `key_policy: weighted`).
    pub weight: u32,
    /// When it was added, in milliseconds since the epoch.
    pub added_at_ms: u64,
    /// Who added it (the admin token's name).
    pub added_by: String,
    /// The sealing nonce, base64.
    pub nonce: String,
    /// The sealed secret, base64.
    pub secret: String,
}

impl StoredKey {
    /// What the secret is sealed to: the key's identity, so a sealed secret moved onto another
    /// record does not open.
    pub fn context(upstream: &str, name: &str) -> Vec<u8> {
        format!("keygate runtime key\0{upstream}\0{name}").into_bytes()
    }

    /// The sealed secret.
    pub fn sealed(&self) -> Sealed {
        Sealed {
            nonce: self.nonce.clone(),
            ciphertext: self.secret.clone(),
        }
    }
}

/// Why the store could not be read or written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// Reading or writing the file failed.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// Redis refused or could not be reached.
    #[error("redis: {0}")]
    Redis(String),
    /// The shared store is gone: not even its marker is there (a Redis restarted without its
    /// data); instances put back the keys they hold.
    #[error("the runtime key store is gone (a Redis restarted without its data?)")]
    Lost,
}

/// Where runtime keys are kept.
#[async_trait]
pub trait KeyBackend: Send + Sync {
    /// Every stored key; [`StoreError::Lost`] when a shared store lost everything.
    async fn load(&self) -> Result<Vec<StoredKey>, StoreError>;
    /// Stores `key`, replacing the one of the same upstream and name.
    async fn put(&self, key: &StoredKey) -> Result<(), StoreError>;
    /// Deletes the key of that upstream and name; whether there was one.
    async fn delete(&self, upstream: &str, name: &str) -> Result<bool, StoreError>;
}
