//! The client's `Cache-Control` request header: which of the cache's steps it allows.

use std::time::Duration;

/// What the client's `Cache-Control` asks of the cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Control {
    /// `no-cache`: skip the lookup, but store the fresh answer.
    pub no_cache: bool,
    /// `no-store`: neither look up nor store.
    pub no_store: bool,
    /// `max-age=N`: accept only entries younger than this.
    pub max_age: Option<Duration>,
}

impl Control {
    /// Reads the directives of every `Cache-Control` value given (comma-separated, any case);
    /// unknown directives and malformed ages are ignored, as RFC 9111 asks.
    pub fn parse<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> Self {
        let mut c = Control::default();
        for value in values {
            for directive in value.split(|&b| b == b',') {
                let d = directive.trim_ascii();
                let (name, arg) = match d.iter().position(|&b| b == b'=') {
                    Some(i) => (d[..i].trim_ascii(), Some(d[i + 1..].trim_ascii())),
                    None => (d, None),
                };
                if name.eq_ignore_ascii_case(b"no-cache") {
                    c.no_cache = true;
                } else if name.eq_ignore_ascii_case(b"no-store") {
                    c.no_store = true;
                } else if name.eq_ignore_ascii_case(b"max-age") {
                    if let Some(secs) = arg.and_then(parse_seconds) {
                        // The strictest of several ages wins.
                        let age = Duration::from_secs(secs);
                        c.max_age = Some(c.max_age.map_or(age, |m| m.min(age)));
                    }
                }
            }
        }
        c
    }
}

/// Delta-seconds: digits, optionally quoted; saturates instead of overflowing.
fn parse_seconds(arg: &[u8]) -> Option<u64> {
    let digits = arg
        .strip_prefix(b"\"")
        .and_then(|a| a.strip_suffix(b"\""))
        .unwrap_or(arg);
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(digits.iter().fold(0u64, |n, d| {
        n.saturating_mul(10).saturating_add(u64::from(d - b'0'))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(values: &[&str]) -> Control {
        Control::parse(values.iter().map(|v| v.as_bytes()))
    }

    #[test]
    fn no_header_allows_everything() {
        assert_eq!(parse(&[]), Control::default());
    }

    #[test]
    fn directives_are_read_in_any_case_and_spacing() {
        let c = parse(&["No-Cache , MAX-AGE = 30", "no-store"]);
        assert!(c.no_cache && c.no_store);
        assert_eq!(c.max_age, Some(Duration::from_secs(30)));
    }

    #[test]
    fn the_smallest_age_wins_and_bad_ages_are_ignored() {
        assert_eq!(
            parse(&["max-age=60, max-age=\"5\""]).max_age,
            Some(Duration::from_secs(5))
        );
        for bad in [
            "max-age=",
            "max-age=-1",
            "max-age=1.5",
            "max-age=ten",
            "max-age",
        ] {
            assert_eq!(parse(&[bad]).max_age, None, "{bad}");
        }
        assert_eq!(
            parse(&["max-age=99999999999999999999999"]).max_age,
            Some(Duration::from_secs(u64::MAX))
        );
    }

    #[test]
    fn unknown_directives_change_nothing() {
        assert_eq!(
            parse(&["private, must-revalidate, no-transform"]),
            Control::default()
        );
    }
}
