//! What a 429 asks for: `Retry-After`, `retry-after-ms`, OpenAI's `x-ratelimit-*` headers, the
//! account-wide check and the quota code of the body. Any header values give an answer within
//! [`MAX_REQUESTED`] and never panic; an HTTP-date keygate reads is the instant it names.
//!
//! Input: `header lines NUL error body NUL org-limit pattern`. A header line is `name: value`;
//! a name of one digit stands for one of the headers keygate reads, so that mutations reach
//! them. Lines that are not a valid header are skipped.

use std::time::{Duration, UNIX_EPOCH};

use http::{HeaderMap, HeaderName, HeaderValue};
use keygate::retry_after::{
    is_org_wide_limit, parse_http_date, parse_openai_duration, quota_error_code,
    requested_cooldown, MAX_REQUESTED,
};

use crate::alloc_count::assert_peak_below;
use crate::input::{fields, text};

use super::memory_bound;

/// The headers keygate reads, by the digit that stands for each.
const KNOWN: [&str; 7] = [
    "retry-after",
    "retry-after-ms",
    "x-ratelimit-reset-requests",
    "x-ratelimit-reset-tokens",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-limit-requests",
];

/// The instant the 429 arrived: 2025-01-01T00:00:00Z, so that seed dates can lie either side.
const NOW_SECS: u64 = 1_735_689_600;

/// The first instant of year 10000, which an IMF-fixdate cannot write.
const YEAR_10000_SECS: u64 = 253_402_300_800;

/// Checks one input; see the module doc.
pub fn run(data: &[u8]) {
    let parts = fields(data, 3);
    let headers = header_map(parts[0]);
    let body = parts[1];
    let pattern = text(parts[2]);
    let pattern = (!parts[2].is_empty()).then_some(pattern.as_str());
    let now = UNIX_EPOCH + Duration::from_secs(NOW_SECS);
    let limit = memory_bound(1 << 20, 64, data.len());

    assert_peak_below("headers", limit, || {
        if let Some(wait) = requested_cooldown(&headers, now) {
            assert!(wait <= MAX_REQUESTED, "cooldown {wait:?} over the cap");
        }
        is_org_wide_limit(&headers, body, pattern);
        quota_error_code(body);
        for value in headers.values() {
            let Ok(value) = value.to_str() else { continue };
            if let Some(d) = parse_openai_duration(value) {
                assert!(d <= MAX_REQUESTED, "{value:?} read as {d:?}, over the cap");
            }
            check_http_date(value);
        }
        for line in text(parts[0]).lines() {
            parse_openai_duration(line);
            check_http_date(line);
        }
    });
}

/// The header lines of `data` that make a valid header.
fn header_map(data: &[u8]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for line in data.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        let name = match name {
            [d @ b'0'..=b'6'] => HeaderName::from_static(KNOWN[usize::from(d - b'0')]),
            _ => match HeaderName::from_bytes(name) {
                Ok(name) => name,
                Err(_) => continue,
            },
        };
        let value = value.strip_prefix(b" ").unwrap_or(value);
        if let Ok(value) = HeaderValue::from_bytes(value) {
            map.append(name, value);
        }
    }
    map
}

/// Every IMF-fixdate as `httpdate` writes it reads as the instant `httpdate` reads (the other
/// way round does not hold: `httpdate` accepts some malformed RFC 850 dates that keygate
/// refuses), and an HTTP-date keygate reads, written as IMF-fixdate, reads back the same.
fn check_http_date(s: &str) {
    let ours = parse_http_date(s);
    if let Ok(theirs) = httpdate::parse_http_date(s) {
        if httpdate::fmt_http_date(theirs) == s.trim() {
            assert_eq!(ours, Some(theirs), "{s:?}: keygate and httpdate disagree");
        }
    }
    let Some(at) = ours else { return };
    let secs = at
        .duration_since(UNIX_EPOCH)
        .expect("HTTP-dates before 1970 read as absent")
        .as_secs();
    if secs < YEAR_10000_SECS {
        let written = httpdate::fmt_http_date(at);
        assert_eq!(
            parse_http_date(&written),
            Some(at),
            "{s:?} read as {written:?}, which reads back differently"
        );
    }
}
