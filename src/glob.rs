//! Model-name patterns such as `gpt-4*` or `*-mini`.
//!
//! `*` matches any run of characters (possibly empty) and `?` exactly one character; every other
//! character is literal and matching is case-sensitive (OpenAI model ids are). There is no escape
//! syntax and no character classes: model names never contain `*` or `?`, and a smaller language
//! leaves fewer ways to write a surprising route.

use std::fmt;
use std::str::FromStr;

/// Why a pattern was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GlobError {
    /// An empty pattern would match only an empty model name, which is never what a config means.
    #[error("model pattern is empty")]
    Empty,
}

/// A compiled model pattern; cheap to match, never allocates while matching.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Glob {
    pattern: String,
    kind: Kind,
}

/// The shape of a pattern, so the common shapes skip the general matcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    /// No wildcard at all: string equality.
    Exact,
    /// `literal*` (including a lone `*`): a prefix test, the most common shape in configs.
    Prefix,
    /// `*literal`: a suffix test (`*-mini`).
    Suffix,
    /// Anything else: the iterative two-pointer matcher.
    General,
}

fn is_wild(b: u8) -> bool {
    b == b'*' || b == b'?'
}

impl Glob {
    /// Compiles `pattern`; fails only on an empty pattern.
    pub fn new(pattern: &str) -> Result<Glob, GlobError> {
        let bytes = pattern.as_bytes();
        let Some((&last, init)) = bytes.split_last() else {
            return Err(GlobError::Empty);
        };
        let kind = if !bytes.iter().copied().any(is_wild) {
            Kind::Exact
        } else if last == b'*' && !init.iter().copied().any(is_wild) {
            Kind::Prefix
        } else if bytes[0] == b'*' && !bytes[1..].iter().copied().any(is_wild) {
            Kind::Suffix
        } else {
            Kind::General
        };
        Ok(Glob {
            pattern: pattern.to_owned(),
            kind,
        })
    }

    /// Whether `s` matches the whole pattern.
    pub fn matches(&self, s: &str) -> bool {
        let p = self.pattern.as_str();
        match self.kind {
            Kind::Exact => s == p,
            Kind::Prefix => s.starts_with(&p[..p.len() - 1]),
            Kind::Suffix => s.ends_with(&p[1..]),
            Kind::General => wildcard_match(p.as_bytes(), s.as_bytes()),
        }
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.pattern
    }

    /// Whether the pattern has no wildcard, so it matches exactly one string (itself); lets the route
    /// table index such patterns by name.
    pub fn is_literal(&self) -> bool {
        self.kind == Kind::Exact
    }
}

impl fmt::Display for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.pattern)
    }
}

impl FromStr for Glob {
    type Err = GlobError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Glob::new(s)
    }
}

/// Length in bytes of the UTF-8 character starting with `lead`, so `?` consumes one character and not
/// one byte. Only ever called on a character boundary of a valid `str`.
fn utf8_len(lead: u8) -> usize {
    match lead {
        0x00..=0x7f => 1,
        0x80..=0xdf => 2,
        0xe0..=0xef => 3,
        _ => 4,
    }
}

/// Classic iterative wildcard matching: on a mismatch, only the most recent `*` is retried one
/// character further on. Earlier stars never need revisiting (anything they could absorb, the later
/// star can too), so the worst case is O(len(p) × len(s)) instead of exponential.
///
/// Works on bytes: literal bytes of a valid UTF-8 pattern can only match whole characters of a valid
/// UTF-8 string when both sides start on character boundaries, which the star restarts and `?`
/// preserve by stepping a whole character.
fn wildcard_match(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    // (pattern index just after the last `*`, string index where that star's run currently ends)
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if let Some(&pc) = p.get(pi) {
            if pc == b'*' {
                pi += 1;
                star = Some((pi, si));
                continue;
            }
            if pc == b'?' {
                pi += 1;
                si += utf8_len(s[si]);
                continue;
            }
            if pc == s[si] {
                pi += 1;
                si += 1;
                continue;
            }
        }
        match star {
            Some((after_star, run_end)) => {
                let next = run_end + utf8_len(s[run_end]);
                star = Some((after_star, next));
                pi = after_star;
                si = next;
            }
            None => return false,
        }
    }
    // The string is used up: only trailing stars may remain in the pattern.
    p[pi..].iter().all(|&b| b == b'*')
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::{Duration, Instant};

    fn g(p: &str) -> Glob {
        Glob::new(p).unwrap()
    }

    #[test]
    fn empty_pattern_is_rejected() {
        assert_eq!(Glob::new(""), Err(GlobError::Empty));
        assert_eq!("".parse::<Glob>(), Err(GlobError::Empty));
    }

    #[test]
    fn literal_pattern_matches_only_itself() {
        assert!(g("gpt-4").matches("gpt-4"));
        assert!(!g("gpt-4").matches("gpt-4o"));
        assert!(!g("gpt-4").matches("gpt-"));
        assert!(!g("gpt-4").matches("GPT-4"));
        assert!(g("gpt-4").is_literal());
    }

    #[test]
    fn trailing_star_matches_any_continuation_including_none() {
        assert!(g("gpt-4*").matches("gpt-4o"));
        assert!(g("gpt-4*").matches("gpt-4"));
        assert!(g("gpt-4*").matches("gpt-4.1-mini"));
        assert!(!g("gpt-4*").matches("gpt-3.5-turbo"));
        assert!(!g("gpt-4*").matches("xgpt-4"));
        assert!(!g("gpt-4*").is_literal());
    }

    #[test]
    fn leading_star_matches_suffix() {
        assert!(g("*-mini").matches("gpt-4o-mini"));
        assert!(g("*-mini").matches("-mini"));
        assert!(!g("*-mini").matches("gpt-4o-mini-2024"));
    }

    #[test]
    fn question_mark_matches_exactly_one_character() {
        assert!(g("gpt-?o").matches("gpt-4o"));
        assert!(!g("gpt-?o").matches("gpt-o"));
        assert!(!g("gpt-?o").matches("gpt-45o"));
        assert!(g("o?").matches("o1"));
        assert!(!g("o?").matches("o"));
    }

    #[test]
    fn question_mark_consumes_a_whole_multibyte_character() {
        assert!(g("m?del").matches("mödel"));
        assert!(g("?").matches("模"));
        assert!(!g("??").matches("模"));
        assert!(g("*型").matches("模型"));
        assert!(g("模*?").matches("模型x"));
    }

    #[test]
    fn lone_star_matches_everything() {
        for s in ["", "gpt-4o", "*", "模型", "a?b"] {
            assert!(g("*").matches(s), "{s:?}");
        }
        assert!(g("**").matches(""));
    }

    #[test]
    fn stars_in_the_middle_backtrack_correctly() {
        assert!(g("gpt-*-mini").matches("gpt-4o-mini"));
        assert!(g("gpt-*-mini").matches("gpt--mini"));
        assert!(!g("gpt-*-mini").matches("gpt-4o-mini-tts"));
        assert!(g("*o*").matches("gpt-4o-mini"));
        assert!(g("a*b*c").matches("aXbYbZc"));
        assert!(!g("a*b*c").matches("aXbYbZ"));
        assert!(g("*a?").matches("bab"));
        assert!(g("*?*").matches("x"));
        assert!(!g("*?*").matches(""));
    }

    #[test]
    fn pathological_pattern_finishes_quickly() {
        let s = "a".repeat(100_000);
        let start = Instant::now();
        assert!(!g("a*a*a*a*b").matches(&s));
        assert!(g("a*a*a*a*a").matches(&s));
        assert!(!g("*a*a*a*a*a?b").matches(&s));
        // Generous bound: exponential backtracking would take far longer than this.
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn display_gives_back_the_pattern() {
        for p in ["gpt-4*", "*-mini", "o?-*x", "gpt-4"] {
            assert_eq!(g(p).to_string(), p);
            assert_eq!(g(p).as_str(), p);
        }
    }

    /// Reference matcher: plain recursion, obviously correct, exponential; fine for tiny inputs.
    fn reference(p: &[char], s: &[char]) -> bool {
        match p.split_first() {
            None => s.is_empty(),
            Some(('*', rest)) => (0..=s.len()).any(|i| reference(rest, &s[i..])),
            Some(('?', rest)) => !s.is_empty() && reference(rest, &s[1..]),
            Some((c, rest)) => s.first() == Some(c) && reference(rest, &s[1..]),
        }
    }

    proptest! {
        #[test]
        fn agrees_with_a_reference_matcher(p in "[ab*?é]{1,8}", s in "[abé]{0,10}") {
            let pc: Vec<char> = p.chars().collect();
            let sc: Vec<char> = s.chars().collect();
            prop_assert_eq!(g(&p).matches(&s), reference(&pc, &sc));
        }
    }
}
