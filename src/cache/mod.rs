//! The response cache: identical requests on a route that opted in are answered from memory,
//! without an upstream key, a rate-limit slot or tokens.
//!
//! - [`key`]: the canonical request and its hash, with the list of ignored body fields.
//! - [`control`]: the client's `Cache-Control` (`no-cache`, `no-store`, `max-age`).
//! - [`entry`]: what is stored of an answer, and the capture that collects it.
//! - [`store`]: the bounded in-memory store (`moka`), TTL per entry.
//! - [`flight`]: concurrent identical misses send one request upstream.
//! - [`wire`]: a stored answer as bytes, for a [`SharedStore`] (Redis) behind the memory one.
//!
//! [`plan`] decides what a request does with the cache; [`ResponseCache::lookup`] finds its
//! entry or makes it the miss that fetches one. The proxy glue writes hits and feeds captures.

pub mod control;
pub mod entry;
pub mod flight;
pub mod key;
pub mod store;
pub mod wire;

use crate::clock::SharedClock;
use crate::usage::Usage;
use control::Control;
use entry::Capture;
use flight::{Flights, Join, Leader};
use key::{CacheKey, KeyParts, Variant};
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;
use store::{Found, Store};

/// Default time an entry is served (`cache: { ttl }`).
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);
/// Default largest answer stored (`cache: { max_entry }`).
pub const DEFAULT_MAX_ENTRY: usize = 1 << 20;
/// Largest `max_entry` accepted: a miss holds up to this many bytes while its answer passes.
pub const MAX_MAX_ENTRY: usize = 64 << 20;
/// Default size of the in-memory store (`cache_store: { memory }`).
pub const DEFAULT_MEMORY: u64 = 256 << 20;
/// How long identical misses wait for the first one's answer before going upstream themselves.
/// Long enough for most complete answers, short enough that a slow generation does not hold
/// its followers much longer than asking themselves would.
pub const FOLLOWER_WAIT: Duration = Duration::from_secs(30);

/// A route's cache settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CachePolicy {
    /// How long an entry is served.
    pub ttl: Duration,
    /// Largest answer stored, in bytes.
    pub max_entry: usize,
    /// Whether clients share entries (otherwise each client has its own).
    pub shared: bool,
    /// Cache only `temperature: 0` or seeded requests (and embeddings).
    pub only_deterministic: bool,
    /// Charge a hit to the client's token limits and budget as the stored usage.
    pub charge_hits: bool,
}

impl Default for CachePolicy {
    fn default() -> Self {
        Self {
            ttl: DEFAULT_TTL,
            max_entry: DEFAULT_MAX_ENTRY,
            shared: false,
            only_deterministic: false,
            charge_hits: false,
        }
    }
}

/// What the cache did for a request, for the `x-keygate-cache` header, metrics and the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheResult {
    /// Answered from the cache.
    Hit,
    /// Looked up (or skipped by `no-cache`) and sent upstream.
    Miss,
    /// Not cacheable, or `no-store`: the cache was not used.
    Bypass,
}

impl CacheResult {
    /// Its header value and label.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheResult::Hit => "hit",
            CacheResult::Miss => "miss",
            CacheResult::Bypass => "bypass",
        }
    }
}

/// What the cache needs to know of a request.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// HTTP method.
    pub method: &'a str,
    /// Path with its query string.
    pub path: &'a str,
    /// `Content-Type` of the request body (`""` without one).
    pub content_type: &'a str,
    /// The body as it goes upstream (after an alias rewrite); `None` without a body.
    pub body: Option<&'a [u8]>,
    /// The route's name.
    pub route: &'a str,
    /// The model sent upstream.
    pub model: Option<&'a str>,
    /// The client's name (`None` on an open gateway).
    pub client: Option<&'a str>,
    /// Whether the client asked for a stream.
    pub stream: bool,
    /// Whether keygate added `include_usage` to the body on the client's behalf (and hides the
    /// usage chunk from it).
    pub usage_injected: bool,
    /// The client's `Cache-Control`.
    pub control: Control,
}

/// What a request does with the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Nothing: not cacheable, or the client said `no-store`.
    Bypass,
    /// Look up (unless `no-cache`) and store the answer of a miss.
    Use {
        /// The entry's key.
        key: CacheKey,
        /// Whether to look up (`no-cache` skips it).
        lookup: bool,
        /// Only entries younger than this (`max-age`).
        max_age: Option<Duration>,
    },
}

/// Decides what `req` does with the cache of a route with `policy`.
pub fn plan(policy: &CachePolicy, req: &Request<'_>) -> Plan {
    if req.control.no_store || !matches!(req.method, "POST" | "GET") {
        return Plan::Bypass;
    }
    let ct = req.content_type.trim_start();
    let multipart = ct
        .as_bytes()
        .get(..10)
        .is_some_and(|p| p.eq_ignore_ascii_case(b"multipart/"));
    if multipart || is_file_path(req.path) {
        // Files and uploads are never cached.
        return Plan::Bypass;
    }
    let body: Option<Value> = match req.body.filter(|b| !b.is_empty()) {
        None => None,
        Some(bytes) => match serde_json::from_slice(bytes) {
            Ok(v) => Some(v),
            Err(_) => return Plan::Bypass,
        },
    };
    if policy.only_deterministic && !key::is_deterministic(req.path, body.as_ref()) {
        return Plan::Bypass;
    }
    let variant = if !req.stream {
        Variant::Plain
    } else if asks_usage(body.as_ref()) && !req.usage_injected {
        Variant::EventsWithUsage
    } else {
        Variant::Events
    };
    let parts = KeyParts {
        method: req.method,
        path: req.path,
        route: req.route,
        model: req.model,
        client: if policy.shared { None } else { req.client },
        variant,
    };
    Plan::Use {
        key: key::key(&parts, body.as_ref()),
        lookup: !req.control.no_cache,
        max_age: req.control.max_age,
    }
}

/// Whether `path` (with its query) is about files: `/v1/files…` or `/v1/uploads…`.
fn is_file_path(path: &str) -> bool {
    let path = path.split('?').next().unwrap_or(path);
    path.split('/')
        .any(|seg| seg == "files" || seg == "uploads")
}

/// Whether a stream request asks for its usage chunk.
fn asks_usage(body: Option<&Value>) -> bool {
    body.and_then(|b| b.pointer("/stream_options/include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

/// The outcome of a lookup.
pub enum Lookup {
    /// A fresh entry.
    Hit(Found),
    /// None: go upstream. The first of identical misses leads (its guard wakes the others when
    /// dropped); the others waited for it in vain and go on their own.
    Miss(Option<Leader>),
}

/// A store of answers shared with other instances (Redis), looked up after the in-memory one
/// misses. Its failures are misses, never errors.
#[async_trait::async_trait]
pub trait SharedStore: Send + Sync {
    /// The bytes stored under `key` ([`wire`] format), if any.
    async fn get(&self, key: &CacheKey) -> Option<Vec<u8>>;
    /// Stores `bytes` under `key` for `ttl`, without making the caller wait.
    fn put(&self, key: &CacheKey, bytes: Vec<u8>, ttl: Duration);
}

/// The gateway's response cache: the store, the misses in flight, and each route's policy.
pub struct ResponseCache {
    store: Store,
    flights: Arc<Flights>,
    policies: Vec<Option<CachePolicy>>,
    follower_wait: Duration,
    shared: std::sync::OnceLock<Arc<dyn SharedStore>>,
}

impl ResponseCache {
    /// A cache of `capacity` bytes; `policies[i]` belongs to route `i` (`None`: not cached).
    pub fn new(capacity: u64, policies: Vec<Option<CachePolicy>>, clock: SharedClock) -> Self {
        Self {
            store: Store::new(capacity, clock),
            flights: Flights::new(),
            policies,
            follower_wait: FOLLOWER_WAIT,
            shared: std::sync::OnceLock::new(),
        }
    }

    /// Looks answers up in `shared` too, and stores them there (set once, at start).
    pub fn share(&self, shared: Arc<dyn SharedStore>) {
        let _ = self.shared.set(shared);
    }

    /// The entry for `key` in memory, or else in the shared store (then kept in memory too).
    async fn find(&self, key: &CacheKey, max_age: Option<Duration>) -> Option<Found> {
        if let Some(found) = self.store.get(key, max_age) {
            return Some(found);
        }
        let bytes = self.shared.get()?.get(key).await?;
        let answer = wire::decode(&bytes, self.store.wall(), self.store.now())?;
        self.store.insert(*key, answer);
        self.store.get(key, max_age)
    }

    /// The policy of route `route`, if it caches.
    pub fn policy(&self, route: usize) -> Option<&CachePolicy> {
        self.policies.get(route).and_then(Option::as_ref)
    }

    /// Finds the entry for `key` (unless `lookup` is false) or makes this request a miss. A
    /// miss whose twin is already upstream waits for it (at most [`FOLLOWER_WAIT`]), then looks
    /// again.
    pub async fn lookup(&self, key: CacheKey, lookup: bool, max_age: Option<Duration>) -> Lookup {
        if !lookup {
            // `no-cache`: a fresh answer is wanted, not the one a twin is fetching.
            return Lookup::Miss(None);
        }
        if let Some(found) = self.find(&key, max_age).await {
            return Lookup::Hit(found);
        }
        match self.flights.join(key) {
            Join::Leader(leader) => Lookup::Miss(Some(leader)),
            Join::Follower(follower) => {
                follower.wait(self.follower_wait).await;
                match self.store.get(&key, max_age) {
                    Some(found) => Lookup::Hit(found),
                    None => Lookup::Miss(None),
                }
            }
        }
    }

    /// Stores a finished capture under `key` if it is complete; whether it was stored.
    pub fn store(
        &self,
        key: CacheKey,
        capture: Capture,
        usage: Option<Usage>,
        ttl: Duration,
    ) -> bool {
        match capture.finish(usage, self.store.now(), ttl) {
            Some(answer) => {
                if let Some(shared) = self.shared.get() {
                    let bytes = wire::encode(&answer, Duration::ZERO, self.store.wall());
                    shared.put(&key, bytes, answer.ttl);
                }
                self.store.insert(key, answer);
                // Evictions and the byte count settle now (on a miss, which waited for an
                // upstream anyway), so the gauge and the bound hold at once.
                self.store.settle();
                true
            }
            None => false,
        }
    }

    /// Bytes held by the store.
    pub fn bytes(&self) -> u64 {
        self.store.bytes()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    fn request(body: &'static str) -> Request<'static> {
        Request {
            method: "POST",
            path: "/v1/chat/completions",
            content_type: "application/json",
            body: Some(body.as_bytes()),
            route: "chat",
            model: Some("gpt-4o"),
            client: Some("team"),
            stream: false,
            usage_injected: false,
            control: Control::default(),
        }
    }

    fn key_of(policy: &CachePolicy, req: &Request<'_>) -> CacheKey {
        match plan(policy, req) {
            Plan::Use { key, .. } => key,
            Plan::Bypass => panic!("bypassed: {req:?}"),
        }
    }

    const BODY: &str = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;

    #[test]
    fn uncacheable_requests_bypass() {
        let p = CachePolicy::default();
        let no_store = Request {
            control: Control {
                no_store: true,
                ..Control::default()
            },
            ..request(BODY)
        };
        assert_eq!(plan(&p, &no_store), Plan::Bypass);
        let upload = Request {
            content_type: "Multipart/form-data; boundary=x",
            ..request(BODY)
        };
        assert_eq!(plan(&p, &upload), Plan::Bypass);
        for path in [
            "/v1/files",
            "/v1/files/file-1/content",
            "/v1/uploads/u-1/parts",
        ] {
            let files = Request {
                method: "GET",
                path,
                body: None,
                ..request(BODY)
            };
            assert_eq!(plan(&p, &files), Plan::Bypass, "{path}");
        }
        assert_eq!(plan(&p, &request("not json")), Plan::Bypass);
        let delete = Request {
            method: "DELETE",
            ..request(BODY)
        };
        assert_eq!(plan(&p, &delete), Plan::Bypass);
    }

    #[test]
    fn only_deterministic_caches_temperature_zero_and_seeded_requests() {
        let p = CachePolicy {
            only_deterministic: true,
            ..CachePolicy::default()
        };
        assert_eq!(plan(&p, &request(BODY)), Plan::Bypass);
        key_of(&p, &request(r#"{"model":"m","temperature":0}"#));
        key_of(&p, &request(r#"{"model":"m","seed":1}"#));
        key_of(&CachePolicy::default(), &request(BODY));
    }

    #[test]
    fn clients_have_their_own_entries_unless_shared() {
        let own = CachePolicy::default();
        let other = Request {
            client: Some("other"),
            ..request(BODY)
        };
        assert_ne!(key_of(&own, &request(BODY)), key_of(&own, &other));
        let shared = CachePolicy {
            shared: true,
            ..own
        };
        assert_eq!(key_of(&shared, &request(BODY)), key_of(&shared, &other));
    }

    #[test]
    fn streams_plain_answers_and_usage_chunks_are_separate_entries() {
        let p = CachePolicy::default();
        let with_usage = r#"{"model":"gpt-4o","messages":[],"stream":true,"stream_options":{"include_usage":true}}"#;
        let without = r#"{"model":"gpt-4o","messages":[],"stream":true}"#;
        let plain = key_of(&p, &request(r#"{"model":"gpt-4o","messages":[]}"#));
        let events = key_of(
            &p,
            &Request {
                stream: true,
                ..request(without)
            },
        );
        let events_usage = key_of(
            &p,
            &Request {
                stream: true,
                ..request(with_usage)
            },
        );
        // keygate's own `include_usage` (hidden from the client) is the client's plain stream.
        let injected = key_of(
            &p,
            &Request {
                stream: true,
                usage_injected: true,
                ..request(with_usage)
            },
        );
        assert_ne!(plain, events);
        assert_ne!(events, events_usage);
        assert_eq!(events, injected);
    }

    #[test]
    fn cache_control_sets_lookup_and_age() {
        let p = CachePolicy::default();
        let req = Request {
            control: Control {
                no_cache: true,
                max_age: Some(Duration::from_secs(5)),
                ..Control::default()
            },
            ..request(BODY)
        };
        let Plan::Use {
            lookup, max_age, ..
        } = plan(&p, &req)
        else {
            panic!("bypassed");
        };
        assert!(!lookup);
        assert_eq!(max_age, Some(Duration::from_secs(5)));
    }

    fn capture(body: &[u8]) -> Capture {
        let mut h = http::HeaderMap::new();
        h.insert("content-type", "application/json".parse().unwrap());
        let mut c = Capture::new(&h, 1024);
        c.feed(body);
        c
    }

    #[tokio::test]
    async fn a_stored_answer_is_found_and_a_miss_leads_until_it_is_stored() {
        let clock = ManualClock::new();
        let cache = ResponseCache::new(1 << 20, vec![Some(CachePolicy::default())], clock.clone());
        let key = key_of(&CachePolicy::default(), &request(BODY));
        let Lookup::Miss(Some(leader)) = cache.lookup(key, true, None).await else {
            panic!("the first lookup leads");
        };
        assert!(
            !cache.store(key, capture(b"{\"a\""), None, DEFAULT_TTL),
            "incomplete"
        );
        assert!(cache.store(key, capture(b"{}"), None, DEFAULT_TTL));
        drop(leader);
        clock.advance(Duration::from_secs(7));
        let Lookup::Hit(found) = cache.lookup(key, true, None).await else {
            panic!("stored");
        };
        assert_eq!(found.age, Duration::from_secs(7));
        assert!(matches!(
            cache.lookup(key, true, Some(Duration::from_secs(3))).await,
            Lookup::Miss(Some(_))
        ));
        assert!(matches!(
            cache.lookup(key, false, None).await,
            Lookup::Miss(None)
        ));
        assert!(cache.policy(0).is_some() && cache.policy(1).is_none());
    }

    #[tokio::test]
    async fn a_follower_is_served_the_leaders_answer() {
        let cache = Arc::new(ResponseCache::new(
            1 << 20,
            vec![Some(CachePolicy::default())],
            crate::clock::system(),
        ));
        let key = key_of(&CachePolicy::default(), &request(BODY));
        let Lookup::Miss(Some(leader)) = cache.lookup(key, true, None).await else {
            panic!("the first lookup leads");
        };
        let c = cache.clone();
        let follower = tokio::spawn(async move { c.lookup(key, true, None).await });
        tokio::task::yield_now().await;
        assert!(cache.store(key, capture(b"{\"n\":1}"), None, DEFAULT_TTL));
        drop(leader);
        let Ok(Lookup::Hit(found)) = follower.await else {
            panic!("the follower gets the stored answer");
        };
        assert_eq!(&found.answer.body[..], b"{\"n\":1}");
    }
}
