//! Request counters and the recent-request log behind `GET /_mock/stats`.
//!
//! One mutex, taken once per request and never across an await. Key and model names are shared
//! `Arc<str>`s, so a steady stream of requests for known keys and models allocates only the
//! summary's path.

use std::borrow::Borrow;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use http::{HeaderMap, Method, Uri};
use parking_lot::Mutex;
use serde::ser::{SerializeMap, SerializeStruct, Serializer};
use serde::Serialize;

/// How many request summaries `/_mock/stats` keeps.
const RECENT: usize = 1000;

/// A shared name (key or model) usable as a map key looked up by `&str`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
struct Name(Arc<str>);

impl Borrow<str> for Name {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl Serialize for Name {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// Everything recorded about one request.
pub struct Record {
    /// The credential as received; `""` when none.
    pub key: String,
    /// The model named by the request, if any.
    pub model: Option<String>,
    /// The status the response starts with.
    pub status: u16,
    /// Request method.
    pub method: Method,
    /// Request URI (path and query).
    pub uri: Uri,
    /// All request headers (moved in: the handler no longer needs them).
    pub headers: HeaderMap,
    /// Request body length in bytes.
    pub body_len: usize,
    /// SHA-256 of the request body.
    pub body_sha256: [u8; 32],
    /// When the request arrived.
    pub at: Instant,
}

#[derive(Serialize)]
struct KeyStats {
    requests: u64,
    by_model: BTreeMap<Name, u64>,
    by_status: BTreeMap<u16, u64>,
}

#[derive(Serialize)]
struct Summary {
    key: Name,
    model: Option<Name>,
    path: String,
    status: u16,
    body_len: usize,
    #[serde(serialize_with = "ser_hex")]
    body_sha256: [u8; 32],
    time_ms_since_start: u64,
}

struct LastRequest {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body_len: usize,
    body_sha256: [u8; 32],
    model: Option<Name>,
    key: Name,
}

#[derive(Default)]
struct Inner {
    total: u64,
    keys: HashMap<Name, KeyStats>,
    last: Option<LastRequest>,
    recent: VecDeque<Summary>,
}

/// The counters of one mock process.
pub struct Stats {
    start: Instant,
    inner: Mutex<Inner>,
    /// Connections accepted (TCP, before TLS or any request): a test proving nothing reached
    /// the mock needs more than a request count, since a request hyper refuses is not counted.
    connections: AtomicU64,
}

impl Stats {
    /// Empty counters; `start` is the origin of `time_ms_since_start`.
    pub fn new(start: Instant) -> Self {
        Stats {
            start,
            inner: Mutex::new(Inner::default()),
            connections: AtomicU64::new(0),
        }
    }

    /// Counts one accepted connection.
    pub fn connection(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one request.
    pub fn record(&self, r: Record) {
        let time_ms_since_start = r.at.saturating_duration_since(self.start).as_millis() as u64;
        let path = r.uri.path().to_string();
        let mut g = self.inner.lock();
        let inner = &mut *g;
        inner.total += 1;
        let key = intern_key(&mut inner.keys, &r.key);
        let ks = inner
            .keys
            .get_mut(r.key.as_str())
            .expect("interned just above");
        ks.requests += 1;
        *ks.by_status.entry(r.status).or_insert(0) += 1;
        let model = r.model.as_deref().map(|m| {
            match ks.by_model.get_mut(m) {
                Some(n) => *n += 1,
                None => {
                    ks.by_model.insert(Name(m.into()), 1);
                }
            }
            ks.by_model
                .get_key_value(m)
                .map_or_else(|| Name(m.into()), |(k, _)| k.clone())
        });
        if inner.recent.len() == RECENT {
            inner.recent.pop_front();
        }
        inner.recent.push_back(Summary {
            key: key.clone(),
            model: model.clone(),
            path,
            status: r.status,
            body_len: r.body_len,
            body_sha256: r.body_sha256,
            time_ms_since_start,
        });
        let previous = inner.last.replace(LastRequest {
            method: r.method,
            uri: r.uri,
            headers: r.headers,
            body_len: r.body_len,
            body_sha256: r.body_sha256,
            model,
            key,
        });
        drop(g);
        // Freed outside the lock: a header map is a handful of deallocations.
        drop(previous);
    }

    /// Forgets everything counted so far.
    pub fn reset(&self) {
        let old = std::mem::take(&mut *self.inner.lock());
        self.connections.store(0, Ordering::Relaxed);
        drop(old);
    }

    /// The `/_mock/stats` JSON.
    pub fn to_json(&self, name: Option<&str>) -> Vec<u8> {
        let g = self.inner.lock();
        let view = View {
            name,
            uptime_ms: self.start.elapsed().as_millis() as u64,
            total: g.total,
            connections: self.connections.load(Ordering::Relaxed),
            keys: &g.keys,
            last_request: g.last.as_ref(),
            requests: &g.recent,
        };
        serde_json::to_vec(&view).expect("stats serialize: string keys and plain values only")
    }
}

/// Returns the shared name for `key`, adding an empty entry the first time it is seen.
fn intern_key(keys: &mut HashMap<Name, KeyStats>, key: &str) -> Name {
    if let Some((k, _)) = keys.get_key_value(key) {
        return k.clone();
    }
    let name = Name(key.into());
    keys.insert(
        name.clone(),
        KeyStats {
            requests: 0,
            by_model: BTreeMap::new(),
            by_status: BTreeMap::new(),
        },
    );
    name
}

#[derive(Serialize)]
struct View<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    uptime_ms: u64,
    total: u64,
    connections: u64,
    keys: &'a HashMap<Name, KeyStats>,
    last_request: Option<&'a LastRequest>,
    requests: &'a VecDeque<Summary>,
}

impl Serialize for LastRequest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("LastRequest", 8)?;
        st.serialize_field("method", self.method.as_str())?;
        st.serialize_field("path", self.uri.path())?;
        st.serialize_field("query", &self.uri.query())?;
        st.serialize_field("headers", &Headers(&self.headers))?;
        st.serialize_field("body_len", &self.body_len)?;
        st.serialize_field("body_sha256", &hex(&self.body_sha256))?;
        st.serialize_field("model", &self.model)?;
        st.serialize_field("key", &self.key)?;
        st.end()
    }
}

/// Headers as `{name: value}`, lower-case names (as `http` stores them), repeats joined by ", ".
struct Headers<'a>(&'a HeaderMap);

impl Serialize for Headers<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.keys_len()))?;
        for name in self.0.keys() {
            let mut joined = String::new();
            for (i, v) in self.0.get_all(name).iter().enumerate() {
                if i > 0 {
                    joined.push_str(", ");
                }
                joined.push_str(&String::from_utf8_lossy(v.as_bytes()));
            }
            map.serialize_entry(name.as_str(), &joined)?;
        }
        map.end()
    }
}

fn ser_hex<S: Serializer>(bytes: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hex(bytes))
}

/// Lower-case hex of a digest.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 15) as usize] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use serde_json::Value;
    use std::time::Duration;

    fn record(key: &str, model: Option<&str>, status: u16, at: Instant) -> Record {
        let mut headers = HeaderMap::new();
        headers.append("x-a", HeaderValue::from_static("1"));
        headers.append("x-a", HeaderValue::from_static("2"));
        Record {
            key: key.into(),
            model: model.map(Into::into),
            status,
            method: Method::POST,
            uri: Uri::from_static("/v1/chat/completions?x=1"),
            headers,
            body_len: 3,
            body_sha256: [0xab; 32],
            at,
        }
    }

    #[test]
    fn counts_and_serializes() {
        let t0 = Instant::now();
        let stats = Stats::new(t0);
        stats.record(record("sk-a", Some("gpt-4o"), 200, t0));
        stats.record(record(
            "sk-a",
            Some("gpt-4o"),
            429,
            t0 + Duration::from_millis(7),
        ));
        stats.record(record("", None, 401, t0));
        stats.connection();
        stats.connection();
        let v: Value = serde_json::from_slice(&stats.to_json(Some("m1"))).expect("json");
        assert_eq!(v["name"], "m1");
        assert_eq!(v["total"], 3);
        assert_eq!(v["connections"], 2);
        assert_eq!(v["keys"]["sk-a"]["requests"], 2);
        assert_eq!(v["keys"]["sk-a"]["by_model"]["gpt-4o"], 2);
        assert_eq!(v["keys"]["sk-a"]["by_status"]["429"], 1);
        assert_eq!(v["keys"][""]["by_status"]["401"], 1);
        assert_eq!(v["requests"][1]["time_ms_since_start"], 7);
        assert_eq!(v["requests"][1]["model"], "gpt-4o");
        assert_eq!(v["requests"][2]["model"], Value::Null);
        let last = &v["last_request"];
        assert_eq!(last["method"], "POST");
        assert_eq!(last["path"], "/v1/chat/completions");
        assert_eq!(last["query"], "x=1");
        assert_eq!(last["headers"]["x-a"], "1, 2");
        assert_eq!(last["key"], "");
        assert_eq!(last["body_sha256"], "ab".repeat(32));

        stats.reset();
        let v: Value = serde_json::from_slice(&stats.to_json(None)).expect("json");
        assert_eq!(v["total"], 0);
        assert_eq!(v["connections"], 0);
        assert_eq!(v["last_request"], Value::Null);
        assert!(v.get("name").is_none());
    }

    #[test]
    fn keeps_only_recent_summaries() {
        let t0 = Instant::now();
        let stats = Stats::new(t0);
        for _ in 0..RECENT + 5 {
            stats.record(record("k", None, 200, t0));
        }
        let v: Value = serde_json::from_slice(&stats.to_json(None)).expect("json");
        assert_eq!(v["requests"].as_array().map(Vec::len), Some(RECENT));
        assert_eq!(v["total"], (RECENT + 5) as u64);
    }
}
