//! The affinity hash of a request (`affinity: prompt`): the value that sends requests sharing a
//! prompt prefix to the same key, so that the provider's prompt cache (kept per account) is hit.
//!
//! In order, the first of these that the body has gives the hash:
//! 1. `prompt_cache_key` (OpenAI's own name for it): a non-empty string;
//! 2. `user`: a non-empty string;
//! 3. the prompt's first [`PROMPT_PREFIX_BYTES`] bytes: the values of `system` (Anthropic),
//!    `instructions` (Responses API), `messages` (chat completions, Anthropic) and `input`
//!    (Responses API), in that order, each present one preceded by a tag byte, as JSON text
//!    with the whitespace outside strings left out (so a pretty-printed body and a compact one
//!    agree). Everything else (the model, `temperature`, tools…) is left out.
//!
//! Strings are hashed as their JSON text between the quotes (escapes as written, not decoded).
//! Non-string `prompt_cache_key`/`user` values, and empty ones, are skipped. Only top-level keys
//! count, and the first copy of a duplicated key is the one used (these keys change only which
//! key serves a request, never whether it is allowed, so a duplicate is not refused).
//!
//! The hash is stable: the same bytes give the same value in every process built from this
//! code, so several keygate instances sharing a pool send a prompt to the same key.
//!
//! A prompt shorter than 1 KiB is hashed whole, its last user message included: distinct short
//! prompts then spread like random picks, while repeats of one still land together (providers
//! cache only prompts of 1 024 tokens and more, so nothing is lost).

use std::ops::Range;

/// How many bytes of prompt (JSON text, outside-string whitespace left out) the prefix hash
/// reads at most.
pub const PROMPT_PREFIX_BYTES: usize = 1024;

/// Which part of the body gave a request's affinity hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AffinitySource {
    /// The `prompt_cache_key` string.
    PromptCacheKey,
    /// The `user` string.
    User,
    /// The first [`PROMPT_PREFIX_BYTES`] of `system`, `instructions`, `messages`, `input`.
    Prompt,
}

impl AffinitySource {
    /// The tag hashed first, so that equal text from different sources hashes apart.
    fn tag(self) -> u8 {
        match self {
            Self::PromptCacheKey => 1,
            Self::User => 2,
            Self::Prompt => 3,
        }
    }
}

/// A stable 64-bit hash of bytes: FNV-1a, finished by a full-avalanche mixer (MurmurHash3's
/// `fmix64`) so that every output bit depends on every input bit. Not keyed: it must agree
/// across processes, and a client choosing colliding prompts gains nothing but sharing a key.
#[derive(Debug, Clone, Copy)]
pub struct StableHasher(u64);

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

impl StableHasher {
    /// A hasher that has read `tag`.
    pub fn new(tag: u8) -> Self {
        let mut h = Self(FNV_OFFSET);
        h.write_u8(tag);
        h
    }

    /// Reads one byte.
    #[inline]
    pub fn write_u8(&mut self, byte: u8) {
        self.0 = (self.0 ^ u64::from(byte)).wrapping_mul(FNV_PRIME);
    }

    /// Reads `bytes`.
    pub fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u8(b);
        }
    }

    /// The hash of what was read.
    pub fn finish(&self) -> u64 {
        mix64(self.0)
    }
}

/// MurmurHash3's 64-bit finalizer: a bijection in which each input bit flips each output bit
/// with probability close to 1/2.
pub fn mix64(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// Where the top-level values the affinity hash reads sit in a scanned body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct AffinitySpans {
    prompt_cache_key: Option<Range<usize>>,
    user: Option<Range<usize>>,
    /// `system`, `instructions`, `messages`, `input`, in hashing order.
    prompt: [Option<Range<usize>>; 4],
}

/// The prompt fields, in hashing order.
const PROMPT_FIELDS: [&str; 4] = ["system", "instructions", "messages", "input"];

impl AffinitySpans {
    /// Notes the top-level member `key` (span with quotes) whose value is at `value`, if it is
    /// one the hash reads and the first of its name.
    pub(super) fn note(
        &mut self,
        b: &[u8],
        key: &Range<usize>,
        escaped: bool,
        value: &Range<usize>,
    ) {
        // Cheap reject first: the names read here are 4, 5, 6, 8, 12 or 16 bytes long.
        if !escaped && !matches!(key.len() - 2, 4 | 5 | 6 | 8 | 12 | 16) {
            return;
        }
        let is = |name: &str| super::json::key_is(b, key, escaped, name);
        let slot = if is("prompt_cache_key") {
            &mut self.prompt_cache_key
        } else if is("user") {
            &mut self.user
        } else if let Some(i) = PROMPT_FIELDS.iter().position(|name| is(name)) {
            &mut self.prompt[i]
        } else {
            return;
        };
        if slot.is_none() {
            *slot = Some(value.clone());
        }
    }

    /// The affinity hash of `body` (the body these spans were noted in) and where it came from;
    /// `None` when the body has none of the fields.
    pub(super) fn hash(&self, body: &[u8]) -> Option<(AffinitySource, u64)> {
        for (span, source) in [
            (&self.prompt_cache_key, AffinitySource::PromptCacheKey),
            (&self.user, AffinitySource::User),
        ] {
            let Some(text) = span.as_ref().and_then(|s| string_content(body, s)) else {
                continue;
            };
            let mut h = StableHasher::new(source.tag());
            h.write(text);
            return Some((source, h.finish()));
        }
        if self.prompt.iter().all(Option::is_none) {
            return None;
        }
        let mut h = StableHasher::new(AffinitySource::Prompt.tag());
        let mut budget = PROMPT_PREFIX_BYTES;
        for (i, span) in self.prompt.iter().enumerate() {
            let Some(span) = span else { continue };
            if budget == 0 {
                break;
            }
            h.write_u8(b'0' + u8::try_from(i).unwrap_or(0));
            budget -= compact_prefix(body.get(span.clone()).unwrap_or_default(), budget, &mut h);
        }
        Some((AffinitySource::Prompt, h.finish()))
    }
}

/// The bytes between the quotes of the string at `span`, if it is a non-empty string.
fn string_content<'b>(body: &'b [u8], span: &Range<usize>) -> Option<&'b [u8]> {
    let raw = body.get(span.clone())?;
    match raw {
        [b'"', inner @ .., b'"'] if !inner.is_empty() => Some(inner),
        _ => None,
    }
}

/// Feeds `value` (well-formed JSON) to `h` with the whitespace outside strings left out, at most
/// `budget` bytes; how many it fed.
fn compact_prefix(value: &[u8], budget: usize, h: &mut StableHasher) -> usize {
    let mut fed = 0;
    let mut in_string = false;
    let mut escape = false;
    for &byte in value {
        if fed == budget {
            break;
        }
        if in_string {
            if escape {
                escape = false;
            } else if byte == b'\\' {
                escape = true;
            } else if byte == b'"' {
                in_string = false;
            }
        } else if matches!(byte, b' ' | b'\t' | b'\n' | b'\r') {
            continue;
        } else if byte == b'"' {
            in_string = true;
        }
        h.write_u8(byte);
        fed += 1;
    }
    fed
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::scan_json;
    use super::*;
    use serde_json::json;

    fn affinity(body: &[u8]) -> Option<(AffinitySource, u64)> {
        scan_json(body).unwrap().affinity(body)
    }

    fn of(v: &serde_json::Value) -> Option<(AffinitySource, u64)> {
        affinity(v.to_string().as_bytes())
    }

    #[test]
    fn prompt_cache_key_wins_over_user_which_wins_over_the_prompt() {
        let msgs = json!([{"role": "system", "content": "be brief"}]);
        let all = json!({"model": "m", "messages": msgs, "user": "u1", "prompt_cache_key": "k1"});
        let (src, h) = of(&all).unwrap();
        assert_eq!(src, AffinitySource::PromptCacheKey);
        // The same key with another user and prompt hashes the same.
        let other = json!({"messages": [], "user": "u2", "prompt_cache_key": "k1"});
        assert_eq!(of(&other), Some((src, h)));
        let user = json!({"model": "m", "messages": msgs, "user": "u1"});
        let (src, hu) = of(&user).unwrap();
        assert_eq!(src, AffinitySource::User);
        assert_ne!(hu, h);
        let prompt = json!({"model": "m", "messages": msgs});
        assert_eq!(of(&prompt).unwrap().0, AffinitySource::Prompt);
    }

    #[test]
    fn empty_or_non_string_keys_fall_through_to_the_next_source() {
        let msgs = json!([{"role": "user", "content": "hi"}]);
        for pck in [json!(""), json!(null), json!(7), json!({"a": 1})] {
            let body = json!({"prompt_cache_key": pck, "user": "u", "messages": msgs});
            assert_eq!(of(&body).unwrap().0, AffinitySource::User, "{pck}");
            let body = json!({"prompt_cache_key": pck, "user": pck, "messages": msgs});
            assert_eq!(of(&body).unwrap().0, AffinitySource::Prompt, "{pck}");
        }
    }

    #[test]
    fn a_body_without_any_source_has_no_hash() {
        assert_eq!(of(&json!({"model": "m"})), None);
        assert_eq!(of(&json!({"model": "m", "user": ""})), None);
        assert_eq!(of(&json!({})), None);
        // Nested copies do not count: only top-level keys do.
        assert_eq!(of(&json!({"extra": {"user": "u", "messages": []}})), None);
    }

    #[test]
    fn the_same_key_from_different_sources_hashes_apart() {
        let a = of(&json!({"prompt_cache_key": "x"})).unwrap().1;
        let b = of(&json!({"user": "x"})).unwrap().1;
        assert_ne!(a, b);
    }

    #[test]
    fn formatting_and_other_fields_do_not_change_the_prompt_hash() {
        let compact =
            br#"{"model":"a","messages":[{"role":"user","content":"hi there"}],"temperature":0}"#;
        let pretty = b"{\n  \"messages\": [ { \"role\" : \"user\",\n \"content\": \"hi there\" } ],\n  \"model\": \"b\", \"stream\": true\n}";
        assert_eq!(affinity(compact), affinity(pretty));
        // Whitespace inside strings counts.
        let inner = br#"{"messages":[{"role":"user","content":"hi  there"}]}"#;
        assert_ne!(affinity(compact), affinity(inner));
    }

    #[test]
    fn each_api_hashes_its_own_prompt_fields() {
        // Chat completions: messages (the system prompt is the first message).
        let a = of(&json!({"messages": [{"role": "system", "content": "S"}]}));
        let b = of(&json!({"messages": [{"role": "system", "content": "T"}]}));
        assert_ne!(a, b);
        // Responses API: instructions then input, which may be a string.
        let r1 = of(&json!({"instructions": "S", "input": "q"}));
        let r2 = of(&json!({"instructions": "S", "input": "q2"}));
        let r3 = of(&json!({"instructions": "T", "input": "q"}));
        assert!(r1.is_some() && r1 != r2 && r1 != r3);
        // Anthropic: system then messages.
        let m1 = of(&json!({"system": "S", "messages": [{"role": "user", "content": "q"}]}));
        let m2 = of(&json!({"system": "T", "messages": [{"role": "user", "content": "q"}]}));
        assert!(m1.is_some() && m1 != m2);
        // The same text under another field is another prompt.
        assert_ne!(
            of(&json!({"system": "S"})),
            of(&json!({"instructions": "S"}))
        );
    }

    #[test]
    fn only_the_first_kib_of_a_long_prompt_counts() {
        let system = "s".repeat(2 * PROMPT_PREFIX_BYTES);
        let body = |question: &str| {
            json!({"messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": question}
            ]})
        };
        // Same 2 KiB system prompt, different questions: one hash.
        assert_eq!(of(&body("what is 1+1?")), of(&body("and 2+2?")));
        // A change within the first KiB moves it.
        let mut other = system.clone();
        other.replace_range(500..501, "t");
        let changed = json!({"messages": [{"role": "system", "content": other}]});
        assert_ne!(of(&body("what is 1+1?")), of(&changed));
    }

    #[test]
    fn a_prompt_shorter_than_a_kib_is_hashed_whole() {
        let body = |question: &str| {
            json!({"messages": [
                {"role": "system", "content": "short"},
                {"role": "user", "content": question}
            ]})
        };
        assert_ne!(of(&body("one")), of(&body("two")));
        assert_eq!(of(&body("one")), of(&body("one")));
    }

    #[test]
    fn the_first_copy_of_a_duplicated_key_is_used() {
        let a = affinity(br#"{"user":"a","user":"b"}"#);
        let b = affinity(br#"{"user":"a"}"#);
        assert_eq!(a, b);
        assert!(scan_json(br#"{"messages":[],"messages":[1]}"#).is_ok());
    }

    #[test]
    fn escaped_key_names_count_like_plain_ones() {
        let a = affinity(br#"{"us\u0065r":"a"}"#);
        assert_eq!(a, affinity(br#"{"user":"a"}"#));
    }

    #[test]
    fn junk_bodies_never_yield_a_hash_nor_panic() {
        for junk in [
            &b""[..],
            b"not json",
            b"[1,2]",
            b"{\"user\":",
            b"{\"messages\":[{\"content\":\"x\"}]",
            b"\xff\xfe{}",
        ] {
            assert!(scan_json(junk).is_err(), "{junk:?}");
        }
        // Odd but valid values still give a stable hash.
        let odd = br#"{"messages":"\\\"\u00e9","input":null}"#;
        assert_eq!(affinity(odd), affinity(odd));
        assert!(affinity(odd).is_some());
    }

    #[test]
    fn the_hash_is_stable_across_processes() {
        // A fixed value: instances sharing a pool must agree, so the function may not change
        // silently (FNV-1a then fmix64 over the tag byte and the text).
        let mut h = StableHasher::new(1);
        h.write(b"k1");
        assert_eq!(
            h.finish(),
            of(&json!({"prompt_cache_key": "k1"})).unwrap().1
        );
        assert_eq!(StableHasher::new(0).finish(), mix64(0xaf63_bd4c_8601_b7df));
    }

    #[test]
    fn compact_prefix_stops_at_its_budget_and_keeps_escaped_quotes_inside_strings() {
        let mut h = StableHasher::new(0);
        assert_eq!(compact_prefix(br#"[ "a\" b" , 1 ]"#, 100, &mut h), 11);
        assert_eq!(compact_prefix(br#"[ "a\" b" , 1 ]"#, 3, &mut h), 3);
    }
}
