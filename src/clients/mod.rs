//! Who may use the gateway: clients with gateway tokens, the models each may ask for, and their
//! limits; per-IP limits for an open gateway; the client address behind trusted proxies.

pub mod addr;
pub mod ip_limits;
pub mod limits;

pub use ip_limits::{IpLimiters, IpPolicy};

use crate::clock::SharedClock;
use crate::glob::Glob;
use limits::{Limiter, Limits};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use subtle::ConstantTimeEq;

/// Longest token accepted; anything longer is refused like a wrong one.
pub const MAX_TOKEN_BYTES: usize = 4096;

/// One configured client.
#[derive(Debug)]
pub struct Client {
    /// Its name, for logs and metrics.
    pub name: String,
    /// SHA-256 of its token: the token itself is not kept.
    digest: [u8; 32],
    /// Model globs it may use; empty means any.
    pub models: Vec<Glob>,
    /// Its limits and their counts.
    pub limiter: Arc<Limiter>,
}

impl Client {
    /// A client from its name, token, model globs and limits.
    pub fn new(
        name: String,
        token: &str,
        models: Vec<Glob>,
        limits: Limits,
        clock: SharedClock,
    ) -> Self {
        Self {
            name,
            digest: digest(token.as_bytes()),
            models,
            limiter: Limiter::new(limits, clock),
        }
    }

    /// Whether the client may ask for `model`.
    pub fn allows(&self, model: &str) -> bool {
        self.models.is_empty() || self.models.iter().any(|g| g.matches(model))
    }
}

/// SHA-256 of `bytes`.
pub fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// The configured clients.
#[derive(Debug, Default)]
pub struct ClientTable {
    clients: Vec<Client>,
}

impl ClientTable {
    /// A table of these clients.
    pub fn new(clients: Vec<Client>) -> Self {
        Self { clients }
    }

    /// Whether the gateway is open (no clients configured).
    pub fn is_open(&self) -> bool {
        self.clients.is_empty()
    }

    /// The clients.
    pub fn clients(&self) -> &[Client] {
        &self.clients
    }

    /// The client whose token this is. Compares fixed-length digests in constant time and always
    /// looks at every client, so timing tells nothing about how close a guess was.
    pub fn authenticate(&self, token: &[u8]) -> Option<&Client> {
        if token.is_empty() || token.len() > MAX_TOKEN_BYTES {
            return None;
        }
        let d = digest(token);
        let mut found = None;
        for c in &self.clients {
            if bool::from(c.digest.ct_eq(&d)) {
                found = Some(c);
            }
        }
        found
    }
}

/// The token a request carries: `Authorization: Bearer T`, `api-key: T` or `x-api-key: T`.
pub fn presented_token(headers: &http::HeaderMap) -> Option<&[u8]> {
    if let Some(v) = headers.get(http::header::AUTHORIZATION) {
        let b = v.as_bytes();
        let rest = b
            .get(..7)
            .filter(|p| p.eq_ignore_ascii_case(b"bearer "))
            .map(|_| &b[7..]);
        return Some(rest.unwrap_or(b).trim_ascii());
    }
    headers
        .get("api-key")
        .or_else(|| headers.get("x-api-key"))
        .map(|v| v.as_bytes().trim_ascii())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    fn table() -> ClientTable {
        let clock = ManualClock::new();
        ClientTable::new(vec![
            Client::new(
                "a".into(),
                "tok-a",
                vec![Glob::new("gpt-4*").unwrap()],
                Limits::default(),
                clock.clone(),
            ),
            Client::new("b".into(), "tok-b", vec![], Limits::default(), clock),
        ])
    }

    #[test]
    fn tokens_are_matched_by_digest() {
        let t = table();
        assert_eq!(t.authenticate(b"tok-a").unwrap().name, "a");
        assert_eq!(t.authenticate(b"tok-b").unwrap().name, "b");
        assert!(t.authenticate(b"tok-c").is_none());
        assert!(t.authenticate(b"").is_none());
        assert!(t.authenticate(&[b'x'; MAX_TOKEN_BYTES + 1]).is_none());
        // Only digests are stored, and they all have the same length.
        assert!(t.clients().iter().all(|c| c.digest.len() == 32));
        assert!(!format!("{:?}", t.clients()[0]).contains("tok-a"));
    }

    #[test]
    fn model_globs_limit_what_a_client_may_ask() {
        let t = table();
        assert!(t.clients()[0].allows("gpt-4o"));
        assert!(!t.clients()[0].allows("o1"));
        assert!(t.clients()[1].allows("anything"));
    }

    #[test]
    fn tokens_come_from_any_header_sdks_use() {
        let mut h = http::HeaderMap::new();
        h.insert("authorization", "Bearer  tok ".parse().unwrap());
        assert_eq!(presented_token(&h), Some(&b"tok"[..]));
        let mut h = http::HeaderMap::new();
        h.insert("api-key", "tok".parse().unwrap());
        assert_eq!(presented_token(&h), Some(&b"tok"[..]));
        let mut h = http::HeaderMap::new();
        h.insert("x-api-key", "tok".parse().unwrap());
        assert_eq!(presented_token(&h), Some(&b"tok"[..]));
        assert_eq!(presented_token(&http::HeaderMap::new()), None);
    }
}
