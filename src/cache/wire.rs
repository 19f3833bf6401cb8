//! A stored answer as bytes, for a store shared with other instances: its kept headers, body,
//! usage, and wall-clock store time and ttl (instances do not share a monotonic clock).
//!
//! Layout: `KGC1`, the metadata's length (4 bytes, big-endian), the metadata as JSON, the body.

use super::entry::CachedAnswer;
use crate::clock::{epoch_ms, millis};
use crate::usage::Usage;
use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant, SystemTime};

const MAGIC: &[u8; 4] = b"KGC1";

#[derive(Serialize, Deserialize)]
struct Meta {
    /// Kept headers, name and value.
    headers: Vec<(String, String)>,
    /// A stream of server-sent events.
    events: bool,
    /// Prompt and completion tokens.
    usage: Option<(u64, u64)>,
    /// Wall-clock store time, ms since the epoch.
    stored_ms: u64,
    /// Time to live, ms.
    ttl_ms: u64,
}

/// `answer` as bytes; `age` is how old it is at wall time `wall`.
pub fn encode(answer: &CachedAnswer, age: Duration, wall: SystemTime) -> Vec<u8> {
    let meta = Meta {
        headers: answer
            .headers
            .iter()
            .filter_map(|(n, v)| Some((n.as_str().to_string(), v.to_str().ok()?.to_string())))
            .collect(),
        events: answer.events,
        usage: answer.usage.map(|u| (u.prompt, u.completion)),
        stored_ms: epoch_ms(wall).saturating_sub(millis(age)),
        ttl_ms: millis(answer.ttl),
    };
    let meta = serde_json::to_vec(&meta).unwrap_or_default();
    let mut out = Vec::with_capacity(8 + meta.len() + answer.body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&u32::try_from(meta.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(&meta);
    out.extend_from_slice(&answer.body);
    out
}

/// The answer in `bytes` as of wall time `wall` and monotonic time `now`, or `None` when the
/// bytes are not an answer (another program's value, a newer format) or it has expired.
pub fn decode(bytes: &[u8], wall: SystemTime, now: Instant) -> Option<CachedAnswer> {
    let rest = bytes.strip_prefix(MAGIC)?;
    let len = usize::try_from(u32::from_be_bytes(rest.get(..4)?.try_into().ok()?)).ok()?;
    let meta: Meta = serde_json::from_slice(rest.get(4..4 + len)?).ok()?;
    let body = rest.get(4 + len..)?;
    let age = Duration::from_millis(epoch_ms(wall).saturating_sub(meta.stored_ms));
    let ttl = Duration::from_millis(meta.ttl_ms);
    if age >= ttl {
        return None;
    }
    let headers = meta
        .headers
        .into_iter()
        .filter_map(|(n, v)| {
            Some((
                HeaderName::from_bytes(n.as_bytes()).ok()?,
                HeaderValue::from_str(&v).ok()?,
            ))
        })
        .collect();
    Some(CachedAnswer {
        headers,
        body: Bytes::copy_from_slice(body),
        events: meta.events,
        usage: meta
            .usage
            .map(|(prompt, completion)| Usage { prompt, completion }),
        stored_at: now.checked_sub(age).unwrap_or(now),
        ttl,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn answer(now: Instant) -> CachedAnswer {
        CachedAnswer {
            headers: vec![(
                HeaderName::from_static("content-type"),
                HeaderValue::from_static("text/event-stream"),
            )],
            body: Bytes::from_static(b"data: {\"x\":1}\n\ndata: [DONE]\n\n"),
            events: true,
            usage: Some(Usage {
                prompt: 7,
                completion: 12,
            }),
            stored_at: now,
            ttl: Duration::from_secs(60),
        }
    }

    #[test]
    fn an_answer_round_trips_with_its_age_carried_over() {
        let (now, wall) = (Instant::now(), SystemTime::now());
        let a = answer(now);
        let bytes = encode(&a, Duration::from_secs(5), wall);
        // Read 2 s later on another instance.
        let later = now + Duration::from_secs(100);
        let b = decode(&bytes, wall + Duration::from_secs(2), later).unwrap();
        assert_eq!(b.body, a.body);
        assert_eq!(b.headers, a.headers);
        assert!(b.events);
        assert_eq!(b.usage, a.usage);
        assert_eq!(b.ttl, a.ttl);
        assert_eq!(b.age(later), Duration::from_secs(7));
    }

    #[test]
    fn expired_foreign_and_truncated_values_are_not_answers() {
        let (now, wall) = (Instant::now(), SystemTime::now());
        let bytes = encode(&answer(now), Duration::ZERO, wall);
        assert!(
            decode(&bytes, wall + Duration::from_secs(60), now).is_none(),
            "expired"
        );
        assert!(decode(b"hello", wall, now).is_none());
        assert!(decode(&bytes[..6], wall, now).is_none());
        assert!(decode(&bytes[..20], wall, now).is_none());
        let mut other = bytes.clone();
        other[3] = b'9';
        assert!(decode(&other, wall, now).is_none(), "another format");
    }
}
