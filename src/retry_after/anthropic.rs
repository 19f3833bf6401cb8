//! Anthropic's rate-limit headers: `anthropic-ratelimit-{requests,tokens,input-tokens,
//! output-tokens}-{limit,remaining,reset}`, where `reset` is an RFC 3339 time such as
//! `2026-11-30T01:02:03Z`.
//!
//! As with OpenAI's headers, a reset is believed only for a limit whose `remaining` is 0: the
//! others describe buckets that did not refuse the request.

use super::{header_str, remaining_is_zero, MAX_REQUESTED};
use http::HeaderMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The limits Anthropic reports, as they appear in the header names.
const LIMITS: [&str; 4] = ["requests", "tokens", "input-tokens", "output-tokens"];

/// How long until the longest-waiting exhausted limit resets, seen from `now`; `None` when no
/// limit reports 0 remaining, or its reset is junk or not in the future. Capped at
/// [`MAX_REQUESTED`].
pub(super) fn exhausted_reset(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    LIMITS
        .iter()
        .filter(|limit| is_exhausted(headers, limit))
        .filter_map(|limit| {
            let at = parse_rfc3339(header_str(
                headers,
                &format!("anthropic-ratelimit-{limit}-reset"),
            )?)?;
            at.duration_since(now).ok().filter(|d| !d.is_zero())
        })
        .max()
        .map(|d| d.min(MAX_REQUESTED))
}

/// Whether some Anthropic limit reports 0 remaining. Anthropic's limits belong to the
/// organisation, so every key of the account is refused alike.
pub(super) fn any_exhausted(headers: &HeaderMap) -> bool {
    LIMITS.iter().any(|limit| is_exhausted(headers, limit))
}

fn is_exhausted(headers: &HeaderMap, limit: &str) -> bool {
    remaining_is_zero(headers, &format!("anthropic-ratelimit-{limit}-remaining"))
}

/// An RFC 3339 time with an offset (`Z` or `+01:00`, fractions allowed); `None` for anything
/// else and for times before 1970.
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let ts: jiff::Timestamp = s.trim().parse().ok()?;
    let nanos = u64::try_from(ts.as_nanosecond()).ok()?;
    UNIX_EPOCH.checked_add(Duration::from_nanos(nanos))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::retry_after::tests::headers;

    /// 2026-01-01T00:00:00Z.
    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_767_225_600)
    }

    #[test]
    fn rfc3339_times_with_any_offset_and_fractions_are_read() {
        assert_eq!(parse_rfc3339("2026-01-01T00:00:00Z"), Some(now()));
        assert_eq!(parse_rfc3339(" 2026-01-01T01:00:00+01:00 "), Some(now()));
        assert_eq!(
            parse_rfc3339("2026-01-01T00:00:01.5Z"),
            Some(now() + Duration::from_millis(1500))
        );
        for junk in [
            "",
            "soon",
            "2026-01-01",
            "2026-01-01T00:00:00",
            "2026-13-01T00:00:00Z",
            "1969-12-31T23:59:59Z",
            "30",
            "Thu, 01 Jan 2026 00:00:00 GMT",
        ] {
            assert_eq!(parse_rfc3339(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn the_reset_of_the_exhausted_limit_is_the_wait() {
        let h = headers(&[
            ("anthropic-ratelimit-requests-remaining", "0"),
            ("anthropic-ratelimit-requests-reset", "2026-01-01T00:00:20Z"),
            ("anthropic-ratelimit-tokens-remaining", "5000"),
            ("anthropic-ratelimit-tokens-reset", "2026-01-01T00:01:00Z"),
        ]);
        assert_eq!(exhausted_reset(&h, now()), Some(Duration::from_secs(20)));
        assert!(any_exhausted(&h));
    }

    #[test]
    fn several_exhausted_limits_take_the_longest_reset() {
        let h = headers(&[
            ("anthropic-ratelimit-input-tokens-remaining", "0"),
            (
                "anthropic-ratelimit-input-tokens-reset",
                "2026-01-01T00:00:05Z",
            ),
            ("anthropic-ratelimit-output-tokens-remaining", "0"),
            (
                "anthropic-ratelimit-output-tokens-reset",
                "2026-01-01T00:00:40Z",
            ),
        ]);
        assert_eq!(exhausted_reset(&h, now()), Some(Duration::from_secs(40)));
    }

    #[test]
    fn resets_without_an_exhausted_limit_junk_or_past_read_as_absent() {
        let not_exhausted = headers(&[
            ("anthropic-ratelimit-requests-remaining", "3"),
            ("anthropic-ratelimit-requests-reset", "2026-01-01T00:00:20Z"),
        ]);
        assert_eq!(exhausted_reset(&not_exhausted, now()), None);
        assert!(!any_exhausted(&not_exhausted));
        for reset in ["junk", "", "2025-12-31T23:59:00Z", "2026-01-01T00:00:00Z"] {
            let h = headers(&[
                ("anthropic-ratelimit-requests-remaining", "0"),
                ("anthropic-ratelimit-requests-reset", reset),
            ]);
            assert_eq!(exhausted_reset(&h, now()), None, "{reset:?}");
        }
        for remaining in ["", "-0", "0.0", "zero"] {
            let h = headers(&[
                ("anthropic-ratelimit-tokens-remaining", remaining),
                ("anthropic-ratelimit-tokens-reset", "2026-01-01T00:00:20Z"),
            ]);
            assert_eq!(exhausted_reset(&h, now()), None, "{remaining:?}");
        }
    }

    #[test]
    fn a_reset_days_away_is_capped() {
        let h = headers(&[
            ("anthropic-ratelimit-requests-remaining", "0"),
            ("anthropic-ratelimit-requests-reset", "2027-01-01T00:00:00Z"),
        ]);
        assert_eq!(exhausted_reset(&h, now()), Some(MAX_REQUESTED));
    }
}
