//! How long an upstream wants a key to wait after a 429, and what kind of 429 it was.
//!
//! Every value here comes from the network, so nothing trusts it: junk, negative, NaN, infinite,
//! empty and unrepresentable values all read as "absent" (the key pool then falls back to its
//! exponential backoff); a well-formed wait longer than [`MAX_REQUESTED`] is capped to it.
//! Numbers are parsed as exact decimals with checked integer arithmetic, never through floats, so
//! nothing can panic or overflow and `retry-after-ms: 1001` is exactly 1.001 s.

mod anthropic;

pub use anthropic::parse_rfc3339;

use crate::error_body::ErrorCodes;
use http::HeaderMap;
use jiff::civil::{Date, Time};
use jiff::tz::Offset;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The longest wait read from a header; a longer one is capped to it (the key pool's own
/// `cooldown.max` then caps it further). A key that was told to wait days still waits, rather
/// than being retried at once as if the upstream had said nothing.
pub const MAX_REQUESTED: Duration = Duration::from_secs(24 * 60 * 60);

/// How much of an error body is looked at.
pub const MAX_BODY_SCAN: usize = 64 * 1024;

const NANOS_PER_SEC: u128 = 1_000_000_000;
const NANOS_PER_MILLI: u128 = 1_000_000;

/// What the upstream said about when to retry after a 429; `None` when it said nothing usable.
///
/// Precedence, first usable wins:
/// 1. `retry-after-ms`: milliseconds, fractions allowed (`1500.5`).
/// 2. `Retry-After`: delta-seconds (fractions tolerated) or an HTTP-date, relative to `now`; a
///    date that is not in the future reads as absent.
/// 3. OpenAI's `x-ratelimit-reset-requests` / `x-ratelimit-reset-tokens`, for the limit whose
///    `x-ratelimit-remaining-*` is 0; the longer one if both are. When no limit reports 0
///    remaining, the resets read as absent: they then describe buckets that are *not* what
///    refused the request (e.g. a request too large for the tokens left, or another limit), so
///    any of them would be a guess; the backoff handles the unknown instead, and grows if the
///    guess would have been too short.
/// 4. Anthropic's `anthropic-ratelimit-*-reset` (RFC 3339 times), by the same rule: for the
///    limits whose `anthropic-ratelimit-*-remaining` is 0, the latest.
///
/// `Some(Duration::ZERO)` means "retry now".
pub fn requested_cooldown(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    header_str(headers, "retry-after-ms")
        .and_then(|v| bounded(decimal_nanos(v, NANOS_PER_MILLI)?))
        .or_else(|| header_str(headers, "retry-after").and_then(|v| parse_retry_after(v, now)))
        .or_else(|| exhausted_limit_reset(headers))
        .or_else(|| anthropic::exhausted_reset(headers, now))
}

/// Whether a 429 is about the whole organisation's bucket for the model (so every key of the
/// account is refused alike) rather than about this one key.
///
/// True when `x-ratelimit-remaining-requests` or `x-ratelimit-remaining-tokens` is 0 (OpenAI
/// reports the organisation's per-model bucket there), or an `anthropic-ratelimit-*-remaining`
/// is (Anthropic's limits are the organisation's), when the error body mentions the
/// organization (`Rate limit reached for gpt-4o in organization org-… on requests per min`), or
/// when it contains `extra_pattern`. Body matches ignore ASCII case and look at the first
/// [`MAX_BODY_SCAN`] bytes; an empty pattern matches nothing.
pub fn is_org_wide_limit(
    headers: &HeaderMap,
    body_snippet: &[u8],
    extra_pattern: Option<&str>,
) -> bool {
    let body = &body_snippet[..body_snippet.len().min(MAX_BODY_SCAN)];
    remaining_is_zero(headers, "x-ratelimit-remaining-requests")
        || remaining_is_zero(headers, "x-ratelimit-remaining-tokens")
        || anthropic::any_exhausted(headers)
        || contains_ignore_case(body, b"organization")
        || contains_ignore_case(body, b"organisation")
        || extra_pattern.is_some_and(|p| contains_ignore_case(body, p.as_bytes()))
}

/// The quota error code of an OpenAI-style error body (`{"error": {"code": …, "type": …}}`):
/// `Some("insufficient_quota")` or `Some("billing_not_active")`, found in `code` or `type`.
/// `None` for anything else, including non-JSON and bodies over [`MAX_BODY_SCAN`] bytes.
pub fn quota_error_code(body: &[u8]) -> Option<&'static str> {
    if body.len() > MAX_BODY_SCAN {
        return None;
    }
    ErrorCodes::of(body).any_of(&["insufficient_quota", "billing_not_active"])
}

/// Parses OpenAI's reset durations (Go's `time.Duration` format): `6m0s`, `1.5s`, `20ms`,
/// `1h2m3s`, `59.123s`, `0s`; units `h`, `m`, `s`, `ms`, `us`/`µs`, `ns`. A bare number is taken
/// as seconds. `None` for anything else or negative; capped at [`MAX_REQUESTED`].
pub fn parse_openai_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    if let Some(nanos) = decimal_nanos(s, NANOS_PER_SEC) {
        return bounded(nanos);
    }
    let mut rest = s;
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, after) = rest.split_at(num_len);
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let unit_nanos: u128 = match unit {
            "h" => 3600 * NANOS_PER_SEC,
            "m" => 60 * NANOS_PER_SEC,
            "s" => NANOS_PER_SEC,
            "ms" => NANOS_PER_MILLI,
            // U+00B5 micro sign and U+03BC Greek mu: Go prints the former.
            "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
            "ns" => 1,
            _ => return None,
        };
        total = total.checked_add(decimal_nanos(number, unit_nanos)?)?;
        rest = after;
    }
    bounded(total)
}

/// Parses an HTTP-date (RFC 9110 §5.6.7): IMF-fixdate `Sun, 06 Nov 1994 08:49:37 GMT`, and the
/// obsolete RFC 850 `Sunday, 06-Nov-94 08:49:37 GMT` (two-digit years: 70–99 are 19xx, 00–69
/// are 20xx) and asctime `Sun Nov  6 08:49:37 1994` forms. The weekday is not checked against
/// the date; month names ignore case; `UTC` is accepted for `GMT`. `None` for anything else and
/// for dates before 1970.
///
/// This reads more than `httpdate::parse_http_date` (exact spelling and widths, `GMT` only, the
/// weekday checked against the date) on purpose: a loosely written retry hint is still worth
/// honouring. The calendar arithmetic is jiff's.
pub fn parse_http_date(s: &str) -> Option<SystemTime> {
    let s = s.trim();
    let (day, month, year, time) = match s.split_once(',') {
        Some((_weekday, rest)) => {
            let mut parts = rest.split_ascii_whitespace();
            let first = parts.next()?;
            let (day, month, year) = if first.contains('-') {
                let mut dmy = first.split('-');
                let (day, month, yy) = (dmy.next()?, dmy.next()?, dmy.next()?);
                if dmy.next().is_some() {
                    return None;
                }
                let yy = digits(yy, 2, 2)?;
                (day, month, if yy < 70 { 2000 + yy } else { 1900 + yy })
            } else {
                (first, parts.next()?, digits(parts.next()?, 4, 4)?)
            };
            let time = parts.next()?;
            let zone = parts.next()?;
            if !(zone == "GMT" || zone == "UTC") || parts.next().is_some() {
                return None;
            }
            (day, month, year, time)
        }
        None => {
            let mut parts = s.split_ascii_whitespace();
            let _weekday = parts.next()?;
            let month = parts.next()?;
            let day = parts.next()?;
            let time = parts.next()?;
            let year = digits(parts.next()?, 4, 4)?;
            if parts.next().is_some() {
                return None;
            }
            (day, month, year, time)
        }
    };
    let day = digits(day, 1, 2)?;
    let month = month_number(month)?;
    let mut hms = time.split(':');
    let hour = digits(hms.next()?, 2, 2)?;
    let minute = digits(hms.next()?, 2, 2)?;
    let second = digits(hms.next()?, 2, 2)?;
    if hms.next().is_some() || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    if year < 1970 {
        return None;
    }
    // jiff checks the day against the month (leap years included).
    let date = Date::new(
        i16::try_from(year).ok()?,
        i8::try_from(month).ok()?,
        i8::try_from(day).ok()?,
    )
    .ok()?;
    let midnight = Offset::UTC
        .to_timestamp(date.to_datetime(Time::midnight()))
        .ok()?;
    // Added as seconds so that a leap second (`:60`) is the next minute's first.
    let secs =
        u64::try_from(midnight.as_second()).ok()? + u64::from(hour * 3600 + minute * 60 + second);
    UNIX_EPOCH.checked_add(Duration::from_secs(secs))
}

/// `Retry-After`: delta-seconds or an HTTP-date.
fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    if value.starts_with(|c: char| c.is_ascii_digit() || c == '.') {
        return bounded(decimal_nanos(value, NANOS_PER_SEC)?);
    }
    let wait = parse_http_date(value)?.duration_since(now).ok()?;
    if wait.is_zero() {
        return None;
    }
    Some(wait.min(MAX_REQUESTED))
}

/// The reset of the exhausted limit(s); see [`requested_cooldown`] for why nothing otherwise.
fn exhausted_limit_reset(headers: &HeaderMap) -> Option<Duration> {
    let reset = |limit: &str| {
        if !remaining_is_zero(headers, &format!("x-ratelimit-remaining-{limit}")) {
            return None;
        }
        header_str(headers, &format!("x-ratelimit-reset-{limit}")).and_then(parse_openai_duration)
    };
    // None < Some, so this is the longer of the exhausted limits' resets.
    reset("requests").max(reset("tokens"))
}

fn remaining_is_zero(headers: &HeaderMap, name: &str) -> bool {
    header_str(headers, name).is_some_and(|v| !v.is_empty() && v.bytes().all(|b| b == b'0'))
}

/// A header's first value as trimmed text; absent when missing or not visible ASCII.
fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name)?.to_str().ok().map(str::trim)
}

/// An exact decimal (`123`, `1.5`, `.5`, `2.`; at least one digit, no sign, no exponent) times
/// `unit_nanos`, in nanoseconds. Digits past nanosecond precision are checked, then dropped.
fn decimal_nanos(s: &str, unit_nanos: u128) -> Option<u128> {
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if int.is_empty() && frac.is_empty() {
        return None;
    }
    if !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut nanos: u128 = 0;
    for b in int.bytes() {
        nanos = nanos.checked_mul(10)?.checked_add(u128::from(b - b'0'))?;
    }
    nanos = nanos.checked_mul(unit_nanos)?;
    // unit_nanos <= 3600e9 < 10^13, so 22 fraction digits already reach below a nanosecond.
    let mut scale = unit_nanos;
    for b in frac.bytes().take(22) {
        scale /= 10;
        nanos = nanos.checked_add(u128::from(b - b'0') * scale)?;
    }
    Some(nanos)
}

/// Nanoseconds as a Duration, capped at [`MAX_REQUESTED`].
fn bounded(nanos: u128) -> Option<Duration> {
    let capped = nanos.min(MAX_REQUESTED.as_nanos());
    Some(Duration::from_nanos(u64::try_from(capped).ok()?))
}

/// A run of `min..=max` ASCII digits.
fn digits(s: &str, min: usize, max: usize) -> Option<u32> {
    if s.len() < min || s.len() > max || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn month_number(name: &str) -> Option<u32> {
    const MONTHS: [&str; 12] = [
        "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
    ];
    let pos = MONTHS.iter().position(|m| m.eq_ignore_ascii_case(name))?;
    u32::try_from(pos + 1).ok()
}

fn contains_ignore_case(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty()
        && haystack
            .windows(needle.len())
            .any(|w| w.eq_ignore_ascii_case(needle))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use http::{HeaderName, HeaderValue};
    use proptest::prelude::*;

    /// A header map of `pairs` (also for the Anthropic headers' tests).
    pub(super) fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    /// 1994-11-06T08:49:37Z, the RFCs' example date.
    fn rfc_example() -> SystemTime {
        UNIX_EPOCH + secs(784_111_777)
    }

    fn cooldown(pairs: &[(&str, &str)]) -> Option<Duration> {
        requested_cooldown(&headers(pairs), rfc_example())
    }

    #[test]
    fn retry_after_ms_is_read_exactly_including_fractions() {
        assert_eq!(cooldown(&[("retry-after-ms", "1500")]), Some(ms(1500)));
        assert_eq!(
            cooldown(&[("retry-after-ms", "1500.5")]),
            Some(Duration::from_micros(1_500_500))
        );
        assert_eq!(cooldown(&[("retry-after-ms", " 20 ")]), Some(ms(20)));
        assert_eq!(cooldown(&[("retry-after-ms", "0")]), Some(Duration::ZERO));
    }

    #[test]
    fn retry_after_ms_wins_over_retry_after_and_resets() {
        let h = [
            ("retry-after", "7"),
            ("retry-after-ms", "250"),
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", "30s"),
        ];
        assert_eq!(cooldown(&h), Some(ms(250)));
    }

    #[test]
    fn retry_after_wins_over_resets() {
        let h = [
            ("retry-after", "7"),
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", "30s"),
        ];
        assert_eq!(cooldown(&h), Some(secs(7)));
    }

    #[test]
    fn junk_in_a_higher_source_falls_through_to_the_next() {
        let h = [
            ("retry-after-ms", "soon"),
            ("retry-after", "-3"),
            ("x-ratelimit-remaining-tokens", "0"),
            ("x-ratelimit-reset-tokens", "1.5s"),
        ];
        assert_eq!(cooldown(&h), Some(ms(1500)));
    }

    #[test]
    fn retry_after_delta_seconds_including_tolerated_fractions() {
        assert_eq!(cooldown(&[("retry-after", "120")]), Some(secs(120)));
        assert_eq!(cooldown(&[("retry-after", "0")]), Some(Duration::ZERO));
        assert_eq!(cooldown(&[("retry-after", "1.25")]), Some(ms(1250)));
    }

    #[test]
    fn retry_after_http_date_in_all_three_forms() {
        let now = rfc_example() - secs(30);
        for date in [
            "Sun, 06 Nov 1994 08:49:37 GMT",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
        ] {
            let h = headers(&[("retry-after", date)]);
            assert_eq!(requested_cooldown(&h, now), Some(secs(30)), "{date}");
        }
    }

    #[test]
    fn retry_after_date_in_the_past_or_now_reads_as_absent() {
        let h = headers(&[("retry-after", "Sun, 06 Nov 1994 08:49:37 GMT")]);
        assert_eq!(requested_cooldown(&h, rfc_example()), None);
        assert_eq!(requested_cooldown(&h, rfc_example() + secs(1)), None);
        let h = headers(&[
            ("retry-after", "Sun, 06 Nov 1994 08:49:37 GMT"),
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", "2s"),
        ]);
        assert_eq!(requested_cooldown(&h, rfc_example()), Some(secs(2)));
    }

    #[test]
    fn reset_of_the_exhausted_limit_is_used() {
        let h = [
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", "20ms"),
            ("x-ratelimit-remaining-tokens", "1200"),
            ("x-ratelimit-reset-tokens", "6m0s"),
        ];
        assert_eq!(cooldown(&h), Some(ms(20)));
        let h = [
            ("x-ratelimit-remaining-requests", "12"),
            ("x-ratelimit-reset-requests", "20ms"),
            ("x-ratelimit-remaining-tokens", "0"),
            ("x-ratelimit-reset-tokens", "6m0s"),
        ];
        assert_eq!(cooldown(&h), Some(secs(360)));
    }

    #[test]
    fn both_limits_exhausted_takes_the_longer_reset() {
        let h = [
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", "59.123s"),
            ("x-ratelimit-remaining-tokens", "0"),
            ("x-ratelimit-reset-tokens", "1.5s"),
        ];
        assert_eq!(cooldown(&h), Some(ms(59_123)));
    }

    #[test]
    fn resets_without_an_exhausted_limit_read_as_absent() {
        let h = [
            ("x-ratelimit-remaining-requests", "5"),
            ("x-ratelimit-reset-requests", "1s"),
            ("x-ratelimit-reset-tokens", "3s"),
        ];
        assert_eq!(cooldown(&h), None);
        // Exhausted, but its own reset is unusable: the other limit's reset is no answer.
        let h = [
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", "later"),
            ("x-ratelimit-reset-tokens", "3s"),
        ];
        assert_eq!(cooldown(&h), None);
    }

    #[test]
    fn anthropic_resets_come_after_retry_after() {
        // 1994-11-06T08:49:37Z is `now`.
        let reset = [
            ("anthropic-ratelimit-requests-remaining", "0"),
            ("anthropic-ratelimit-requests-reset", "1994-11-06T08:50:07Z"),
        ];
        assert_eq!(cooldown(&reset), Some(secs(30)));
        let mut both = reset.to_vec();
        both.push(("retry-after", "12"));
        assert_eq!(cooldown(&both), Some(secs(12)));
        let mut junk = reset.to_vec();
        junk.push(("retry-after", "soon"));
        assert_eq!(cooldown(&junk), Some(secs(30)));
    }

    #[test]
    fn no_headers_means_no_request() {
        assert_eq!(cooldown(&[]), None);
        assert_eq!(cooldown(&[("content-type", "application/json")]), None);
    }

    #[test]
    fn junk_negative_nonfinite_empty_and_unrepresentable_values_read_as_absent() {
        for v in [
            "",
            " ",
            "-1",
            "-0.5",
            "NaN",
            "nan",
            "inf",
            "infinity",
            "+5",
            "1e3",
            "0x10",
            "1,5",
            "1.2.3",
            ".",
            "5 s",
            "99999999999999999999999999999999999999999999",
        ] {
            assert_eq!(cooldown(&[("retry-after-ms", v)]), None, "ms {v:?}");
        }
        for v in ["", "-1", "NaN", "inf", "1e3", "Tomorrow", "Sun, 06 Nov"] {
            assert_eq!(cooldown(&[("retry-after", v)]), None, "ra {v:?}");
        }
        assert_eq!(cooldown(&[("retry-after", "86400")]), Some(MAX_REQUESTED));
        // A wait longer than the cap is capped, not ignored: the key still rests.
        assert_eq!(cooldown(&[("retry-after", "86401")]), Some(MAX_REQUESTED));
        assert_eq!(
            cooldown(&[("retry-after", "999999999999")]),
            Some(MAX_REQUESTED)
        );
        assert_eq!(
            cooldown(&[("retry-after-ms", "999999999999")]),
            Some(MAX_REQUESTED)
        );
    }

    #[test]
    fn openai_durations() {
        let cases: &[(&str, Option<Duration>)] = &[
            ("6m0s", Some(secs(360))),
            ("1.5s", Some(ms(1500))),
            ("20ms", Some(ms(20))),
            ("1h2m3s", Some(secs(3723))),
            ("59.123s", Some(ms(59_123))),
            ("0s", Some(Duration::ZERO)),
            ("0", Some(Duration::ZERO)),
            ("2", Some(secs(2))),
            ("1m30.5s", Some(ms(90_500))),
            ("1.5µs", Some(Duration::from_nanos(1500))),
            ("3us", Some(Duration::from_micros(3))),
            ("7ns", Some(Duration::from_nanos(7))),
            (" 2s ", Some(secs(2))),
            ("24h", Some(MAX_REQUESTED)),
            ("24h0m0.001s", Some(MAX_REQUESTED)),
            ("25h", Some(MAX_REQUESTED)),
            ("", None),
            ("s", None),
            ("-1s", None),
            ("1x", None),
            ("1S", None),
            ("1 s", None),
            ("1.2.3s", None),
            ("NaNs", None),
            ("infs", None),
            ("999999999999999999999999999999999999999h", None),
        ];
        for (input, expected) in cases {
            assert_eq!(parse_openai_duration(input), *expected, "{input:?}");
        }
    }

    #[test]
    fn http_dates_in_every_form_and_rejects() {
        let t = Some(rfc_example());
        assert_eq!(parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"), t);
        assert_eq!(parse_http_date("Sunday, 06-Nov-94 08:49:37 GMT"), t);
        assert_eq!(parse_http_date("Sun Nov  6 08:49:37 1994"), t);
        assert_eq!(parse_http_date("sun, 06 NOV 1994 08:49:37 UTC"), t);
        assert_eq!(
            parse_http_date("Thu, 01 Jan 1970 00:00:00 GMT"),
            Some(UNIX_EPOCH)
        );
        assert_eq!(
            parse_http_date("Tue, 29 Feb 2000 23:59:59 GMT"),
            Some(UNIX_EPOCH + secs(951_868_799))
        );
        assert_eq!(
            parse_http_date("Wednesday, 21-Oct-15 07:28:00 GMT"),
            Some(UNIX_EPOCH + secs(1_445_412_480))
        );
        for bad in [
            "",
            "Sun, 06 Nov 1994 08:49:37",
            "Sun, 06 Nov 1994 08:49:37 PST",
            "Sun, 06 Foo 1994 08:49:37 GMT",
            "Sun, 32 Jan 1994 08:49:37 GMT",
            "Mon, 29 Feb 1900 00:00:00 GMT",
            "Sun, 06 Nov 1994 24:00:00 GMT",
            "Sun, 06 Nov 1994 08:60:00 GMT",
            "Sun, 06 Nov 94 08:49:37 GMT",
            "Sun, 06 Nov 1969 08:49:37 GMT",
            "Sun, 06 Nov 1994 08:49:37 GMT extra",
            "Sun, 06-Nov-1994 08:49:37 GMT",
            "Sun Nov  6 08:49:37",
            "Sun Nov  6 8:49:37 1994",
            "Sun, 00 Nov 1994 08:49:37 GMT",
        ] {
            assert_eq!(parse_http_date(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn http_dates_of_known_instants_read_as_httpdate_writes_them() {
        // The epoch, leap days, the last second of a leap year, and 2100 (not a leap year).
        for (since_epoch, text) in [
            (0, "Thu, 01 Jan 1970 00:00:00 GMT"),
            (1_445_412_480, "Wed, 21 Oct 2015 07:28:00 GMT"),
            (784_111_777, "Sun, 06 Nov 1994 08:49:37 GMT"),
            (951_782_400, "Tue, 29 Feb 2000 00:00:00 GMT"),
            (1_735_689_599, "Tue, 31 Dec 2024 23:59:59 GMT"),
            (4_107_542_400, "Mon, 01 Mar 2100 00:00:00 GMT"),
        ] {
            let time = UNIX_EPOCH + secs(since_epoch);
            assert_eq!(httpdate::fmt_http_date(time), text);
            assert_eq!(parse_http_date(text), Some(time), "{text}");
        }
        assert_eq!(parse_http_date("Mon, 29 Feb 2100 00:00:00 GMT"), None);
        // A leap second is the first second of the next minute (here, of the next day).
        assert_eq!(
            parse_http_date("Sun, 06 Nov 1994 23:59:60 GMT"),
            Some(UNIX_EPOCH + secs(784_166_400))
        );
    }

    #[test]
    fn org_wide_when_a_bucket_is_empty_or_the_body_names_the_organization() {
        let none = HeaderMap::new();
        assert!(!is_org_wide_limit(&none, b"", None));
        assert!(is_org_wide_limit(
            &headers(&[("x-ratelimit-remaining-requests", "0")]),
            b"",
            None
        ));
        assert!(is_org_wide_limit(
            &headers(&[("x-ratelimit-remaining-tokens", "0")]),
            b"",
            None
        ));
        assert!(!is_org_wide_limit(
            &headers(&[("x-ratelimit-remaining-tokens", "10")]),
            b"",
            None
        ));
        let body = br#"{"error":{"message":"Rate limit reached for gpt-4o in organization org-abc on requests per min (RPM): Limit 500","type":"requests","code":"rate_limit_exceeded"}}"#;
        assert!(is_org_wide_limit(&none, body, None));
        assert!(!is_org_wide_limit(&none, b"slow down", None));
        assert!(is_org_wide_limit(
            &none,
            b"Tenant Quota EXCEEDED",
            Some("tenant quota")
        ));
        assert!(!is_org_wide_limit(&none, b"slow down", Some("")));
    }

    #[test]
    fn quota_codes_are_found_in_code_or_type() {
        let quota = br#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#;
        assert_eq!(quota_error_code(quota), Some("insufficient_quota"));
        let billing = br#"{"error":{"code":"billing_not_active","type":"invalid_request_error"}}"#;
        assert_eq!(quota_error_code(billing), Some("billing_not_active"));
        let by_type = br#"{"error":{"type":"insufficient_quota","code":null}}"#;
        assert_eq!(quota_error_code(by_type), Some("insufficient_quota"));
        let by_numeric_code = br#"{"error":{"code":429,"type":"insufficient_quota"}}"#;
        assert_eq!(
            quota_error_code(by_numeric_code),
            Some("insufficient_quota")
        );
    }

    #[test]
    fn other_bodies_have_no_quota_code() {
        for body in [
            &br#"{"error":{"code":"rate_limit_exceeded","type":"requests"}}"#[..],
            br#"{"error":"insufficient_quota"}"#,
            br#"{"message":"insufficient_quota"}"#,
            br#"{"error":null}"#,
            b"insufficient_quota",
            b"<html>429</html>",
            b"",
            br#"{"error":{"code":"insufficient_quota""#,
        ] {
            assert_eq!(
                quota_error_code(body),
                None,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        let mut big = br#"{"error":{"code":"insufficient_quota"},"pad":""#.to_vec();
        big.extend(std::iter::repeat_n(b'x', MAX_BODY_SCAN));
        big.extend(b"\"}");
        assert_eq!(quota_error_code(&big), None);
    }

    const HEADER_NAMES: [&str; 6] = [
        "retry-after-ms",
        "retry-after",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests",
        "x-ratelimit-remaining-tokens",
        "x-ratelimit-reset-tokens",
    ];

    /// Strings that look almost like the real thing, where bugs hide.
    fn near_miss() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            "[0-9.hmsuµn:, -]{0,24}",
            "[-+]?[0-9]{0,30}(\\.[0-9]{0,30})?",
            "[A-Za-z]{3}, [0-9]{1,2}[ -][A-Za-z]{3}[ -][0-9]{2,4} [0-9]{1,2}:[0-9]{2}:[0-9]{2} [A-Z]{3}",
        ]
    }

    proptest! {
        #[test]
        fn any_header_values_never_panic_and_stay_within_a_day(
            values in proptest::collection::vec(near_miss(), 6),
            now_secs in 0u64..4_000_000_000,
        ) {
            let mut map = HeaderMap::new();
            for (name, value) in HEADER_NAMES.iter().zip(&values) {
                if let Ok(v) = HeaderValue::from_str(value) {
                    map.insert(*name, v);
                }
            }
            let now = UNIX_EPOCH + Duration::from_secs(now_secs);
            if let Some(d) = requested_cooldown(&map, now) {
                prop_assert!(d <= MAX_REQUESTED);
            }
            let _ = is_org_wide_limit(&map, values[0].as_bytes(), Some(&values[1]));
            let _ = quota_error_code(values[2].as_bytes());
            for v in &values {
                if let Some(d) = parse_openai_duration(v) {
                    prop_assert!(d <= MAX_REQUESTED);
                }
                let _ = parse_http_date(v);
            }
        }

        #[test]
        fn retry_after_ms_round_trips_every_u32(n in any::<u32>()) {
            let map = headers(&[("retry-after-ms", &n.to_string())]);
            let expected = Some(ms(u64::from(n)).min(MAX_REQUESTED));
            prop_assert_eq!(requested_cooldown(&map, UNIX_EPOCH), expected);
        }

        #[test]
        fn openai_duration_round_trips_h_m_s_ms(h in 0u64..24, m in 0u64..60, s in 0u64..60, milli in 0u64..1000) {
            let text = format!("{h}h{m}m{s}.{milli:03}s");
            let expected = secs(h * 3600 + m * 60 + s) + ms(milli);
            prop_assert_eq!(parse_openai_duration(&text), Some(expected));
        }

        #[test]
        fn http_date_round_trips_imf_fixdate(t in 0u64..253_402_300_800) {
            let time = UNIX_EPOCH + secs(t);
            prop_assert_eq!(parse_http_date(&httpdate::fmt_http_date(time)), Some(time));
        }
    }
}
