//! State shared by several instances through Redis (or Valkey): key states and client limits.
//!
//! Without a `redis:` section none of this runs and every state is local, as before. With one:
//! - [`key_sync`]: cooldowns, disables and re-enables made on any instance reach every other
//!   within milliseconds (pub/sub), with a hash in Redis as the truth that a starting or
//!   reconnecting instance loads; key selection stays local and lock-free;
//! - [`limits`] and [`ledger`]: client limits and budgets counted in Redis, from leases spent
//!   locally (at most one round trip per request, most none);
//! - [`answers`]: the response cache's answers, shared (`cache_store: { redis: true }`);
//! - [`runtime_keys`]: keys added through the admin API, sealed, in one hash that every
//!   instance reads twice a second;
//! - [`objects`]: which account owns each file, batch, vector store… keygate saw created;
//! - [`link`]: the connection and its health: Redis trouble never stops or slows traffic beyond
//!   the configured timeout, and [`service`] brings states back in step when Redis returns.

pub mod answers;
pub mod key_sync;
pub mod ledger;
pub mod limits;
pub mod link;
pub mod objects;
pub mod runtime_keys;
pub mod service;

pub use limits::{Admitted, SharedLimits, Verdict};
pub use service::Shared;
