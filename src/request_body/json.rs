//! [`scan_json`]: `model`, `stream` and the other routing fields of a JSON body in one pass, and
//! the rewrites ([`BodyInfo::rewrite_model`], [`BodyInfo::inject_include_usage`]) that change only
//! their bytes.

use std::ops::Range;

use super::affinity::{AffinitySource, AffinitySpans};
use super::{splice, BodyError};

/// What routing needs from a JSON request body, plus where those values sit so the body can be
/// rewritten without re-parsing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyInfo {
    /// The top-level `model`, decoded; `None` when absent.
    pub model: Option<String>,
    /// The top-level `stream`; absent or `null` means `false`.
    pub stream: bool,
    /// The requested output-token limit: `max_completion_tokens`, else `max_output_tokens`
    /// (Responses API), else `max_tokens`; `null` counts as absent.
    pub max_tokens: Option<u64>,
    /// Whether `stream_options.include_usage` is `true`.
    pub include_usage: bool,
    /// Span of the `model` value (including its quotes).
    model_span: Option<Range<usize>>,
    /// Span of the `stream_options` value.
    stream_options_span: Option<Range<usize>>,
    /// Span of the `include_usage` value inside `stream_options`, when that is an object holding it.
    include_usage_span: Option<Range<usize>>,
    /// Offset of the top-level `{`.
    obj_start: usize,
    /// End of the last top-level member's value; `None` for `{}`.
    last_value_end: Option<usize>,
    /// Length of the scanned body, to catch a rewrite being handed a different body.
    body_len: usize,
    /// Where the values the affinity hash reads sit (see [`BodyInfo::affinity`]).
    affinity: AffinitySpans,
}

/// Bodies nested deeper than this are refused: the structure check keeps one bit per level in a
/// fixed-size stack, so no allocation and no recursion, whatever the input.
const MAX_DEPTH: usize = 512;

/// One bit per open container (set = object, clear = array).
struct ContainerStack {
    bits: [u64; MAX_DEPTH / 64],
    depth: usize,
}

impl ContainerStack {
    fn new() -> Self {
        ContainerStack {
            bits: [0; MAX_DEPTH / 64],
            depth: 0,
        }
    }

    /// Pushes a container; `false` when the depth limit is reached.
    fn push(&mut self, is_object: bool) -> bool {
        if self.depth == MAX_DEPTH {
            return false;
        }
        let (word, bit) = (self.depth / 64, self.depth % 64);
        if is_object {
            self.bits[word] |= 1 << bit;
        } else {
            self.bits[word] &= !(1 << bit);
        }
        self.depth += 1;
        true
    }

    fn pop(&mut self) {
        self.depth -= 1;
    }

    /// Whether the innermost open container is an object; `None` when none is open.
    fn top_is_object(&self) -> Option<bool> {
        let d = self.depth.checked_sub(1)?;
        Some(self.bits[d / 64] & (1 << (d % 64)) != 0)
    }
}

/// A position in a body being scanned.
struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn err(&self, reason: &'static str) -> BodyError {
        BodyError::NotJson {
            reason,
            offset: self.pos,
        }
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.pos += 1;
        }
    }

    fn expect(&mut self, byte: u8, reason: &'static str) -> Result<(), BodyError> {
        if self.peek() == Some(byte) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.err(reason))
        }
    }

    /// Skips a string starting at the opening quote; returns whether it holds any escape.
    /// Escapes are checked for form (`\uXXXX` needs four hex digits); the rest of the content is not
    /// (control characters, UTF-8), which the upstream will judge.
    fn string(&mut self) -> Result<bool, BodyError> {
        self.expect(b'"', "expected '\"'")?;
        let mut escaped = false;
        loop {
            let Some(i) = memchr::memchr2(b'"', b'\\', &self.b[self.pos..]) else {
                self.pos = self.b.len();
                return Err(self.err("unterminated string"));
            };
            self.pos += i;
            if self.b[self.pos] == b'"' {
                self.pos += 1;
                return Ok(escaped);
            }
            escaped = true;
            self.pos += 1;
            match self.peek() {
                Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => self.pos += 1,
                Some(b'u') => {
                    self.pos += 1;
                    let hex = self.b.get(self.pos..self.pos + 4);
                    if !hex.is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) {
                        return Err(self.err("invalid \\u escape"));
                    }
                    self.pos += 4;
                }
                None => return Err(self.err("unterminated string")),
                Some(_) => return Err(self.err("invalid escape")),
            }
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.pos;
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.pos += 1;
        }
        self.pos - start
    }

    /// Skips a number, checking the JSON grammar: `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`.
    fn number(&mut self) -> Result<(), BodyError> {
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        match self.peek() {
            Some(b'0') => self.pos += 1,
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return Err(self.err("invalid number")),
        }
        if self.peek() == Some(b'.') {
            self.pos += 1;
            if self.digits() == 0 {
                return Err(self.err("invalid number"));
            }
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.pos += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.pos += 1;
            }
            if self.digits() == 0 {
                return Err(self.err("invalid number"));
            }
        }
        Ok(())
    }

    fn literal(&mut self, word: &'static [u8]) -> Result<(), BodyError> {
        if self.b[self.pos..].starts_with(word) {
            self.pos += word.len();
            Ok(())
        } else {
            Err(self.err("invalid literal"))
        }
    }

    /// `"key"` `:` with the whitespace around; returns the key's span (with quotes) and whether it
    /// holds escapes.
    fn key(&mut self) -> Result<(Range<usize>, bool), BodyError> {
        self.skip_ws();
        if self.peek() != Some(b'"') {
            return Err(self.err("expected a string key"));
        }
        let start = self.pos;
        let escaped = self.string()?;
        let span = start..self.pos;
        self.skip_ws();
        self.expect(b':', "expected ':'")?;
        Ok((span, escaped))
    }

    /// Skips one value of any kind, checking its structure, without recursion: containers are
    /// tracked in a bit stack.
    fn value(&mut self) -> Result<(), BodyError> {
        let mut stack = ContainerStack::new();
        loop {
            // Expecting a value.
            self.skip_ws();
            match self.peek() {
                Some(b'"') => {
                    self.string()?;
                }
                Some(open @ (b'{' | b'[')) => {
                    self.pos += 1;
                    self.skip_ws();
                    let close = if open == b'{' { b'}' } else { b']' };
                    if self.peek() == Some(close) {
                        self.pos += 1;
                    } else {
                        if !stack.push(open == b'{') {
                            return Err(self.err("nesting too deep"));
                        }
                        if open == b'{' {
                            self.key()?;
                        }
                        continue;
                    }
                }
                Some(b't') => self.literal(b"true")?,
                Some(b'f') => self.literal(b"false")?,
                Some(b'n') => self.literal(b"null")?,
                Some(b'-' | b'0'..=b'9') => self.number()?,
                None => return Err(self.err("unexpected end of body")),
                Some(_) => return Err(self.err("expected a value")),
            }
            // A value just ended: close containers until one continues with a comma.
            loop {
                let Some(in_object) = stack.top_is_object() else {
                    return Ok(());
                };
                self.skip_ws();
                match self.peek() {
                    Some(b',') => {
                        self.pos += 1;
                        if in_object {
                            self.key()?;
                        }
                        break;
                    }
                    Some(b'}') if in_object => {
                        self.pos += 1;
                        stack.pop();
                    }
                    Some(b']') if !in_object => {
                        self.pos += 1;
                        stack.pop();
                    }
                    None => return Err(self.err("unexpected end of body")),
                    Some(_) if in_object => return Err(self.err("expected ',' or '}'")),
                    Some(_) => return Err(self.err("expected ',' or ']'")),
                }
            }
        }
    }

    /// Walks the members of the object starting at the current `{`, calling `f(cursor, key span,
    /// key has escapes, value span)` for each, and leaves the cursor after the closing `}`.
    fn members(
        &mut self,
        mut f: impl FnMut(&Self, Range<usize>, bool, Range<usize>) -> Result<(), BodyError>,
    ) -> Result<(), BodyError> {
        self.expect(b'{', "expected '{'")?;
        self.skip_ws();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Ok(());
        }
        loop {
            let (key, escaped) = self.key()?;
            self.skip_ws();
            let start = self.pos;
            self.value()?;
            f(self, key, escaped, start..self.pos)?;
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(());
                }
                None => return Err(self.err("unexpected end of body")),
                Some(_) => return Err(self.err("expected ',' or '}'")),
            }
        }
    }
}

/// Whether the key at `span` (with quotes) is `name`. Keys with escapes are decoded first, since
/// `"mod\u0065l"` is `model` to every JSON parser; that costs an allocation, but only for escaped
/// keys short enough to decode to `name`.
pub(super) fn key_is(b: &[u8], span: &Range<usize>, escaped: bool, name: &str) -> bool {
    let inner = &b[span.start + 1..span.end - 1];
    if !escaped {
        return inner == name.as_bytes();
    }
    // The shortest escape is 2 bytes for 1 byte of output, `\uXXXX` up to 6 for 1.
    if inner.len() > 6 * name.len() {
        return false;
    }
    serde_json::from_slice::<String>(&b[span.clone()]).is_ok_and(|k| k == name)
}

/// Top-level keys the gateway reads.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Tracked {
    Model,
    Stream,
    StreamOptions,
    MaxTokens,
    MaxCompletionTokens,
    MaxOutputTokens,
}

impl Tracked {
    const ALL: [Tracked; 6] = [
        Tracked::Model,
        Tracked::Stream,
        Tracked::StreamOptions,
        Tracked::MaxTokens,
        Tracked::MaxCompletionTokens,
        Tracked::MaxOutputTokens,
    ];

    fn name(self) -> &'static str {
        match self {
            Tracked::Model => "model",
            Tracked::Stream => "stream",
            Tracked::StreamOptions => "stream_options",
            Tracked::MaxTokens => "max_tokens",
            Tracked::MaxCompletionTokens => "max_completion_tokens",
            Tracked::MaxOutputTokens => "max_output_tokens",
        }
    }
}

/// Scans a JSON request body in one pass and returns what routing needs.
///
/// The whole body is checked for JSON structure (balanced containers, commas and colons, string
/// escapes, number and literal grammar, nothing after the top-level object) but string contents are
/// only skipped, not checked for UTF-8 or raw control characters: the upstream judges those. The
/// values of `model`, `stream`, `stream_options` and the token limits are decoded; anything else
/// is never materialised. Only top-level keys count: a `"model"` inside `messages` is ignored.
///
/// A key listed above that appears twice at the top level is an error ([`BodyError::DuplicateKey`]),
/// not "last one wins": `serde_json::Value` keeps the last copy, but other parsers keep the first, and a
/// gateway that routes (and checks permissions) on one copy while the upstream serves the other would
/// be a way around client model restrictions. Other duplicate keys are left alone.
pub fn scan_json(body: &[u8]) -> Result<BodyInfo, BodyError> {
    let mut c = Cursor { b: body, pos: 0 };
    c.skip_ws();
    match c.peek() {
        Some(b'{') => {}
        None => return Err(c.err("empty body")),
        Some(_) => return Err(BodyError::NotObject),
    }
    let obj_start = c.pos;
    let mut spans: [Option<Range<usize>>; Tracked::ALL.len()] = Default::default();
    let mut last_value_end = None;
    let mut affinity = AffinitySpans::default();
    c.members(|c, key, escaped, value| {
        last_value_end = Some(value.end);
        affinity.note(c.b, &key, escaped, &value);
        let inner_len = key.len() - 2;
        // Cheap reject first: most top-level keys (`messages`, `temperature`, ...) differ in length.
        let plausible = escaped || matches!(inner_len, 5 | 6 | 10 | 14 | 17 | 21);
        if !plausible {
            return Ok(());
        }
        for (i, t) in Tracked::ALL.iter().enumerate() {
            if key_is(c.b, &key, escaped, t.name()) {
                if spans[i].is_some() {
                    return Err(BodyError::DuplicateKey(t.name()));
                }
                spans[i] = Some(value);
                break;
            }
        }
        Ok(())
    })?;
    c.skip_ws();
    if c.pos != body.len() {
        return Err(c.err("trailing characters after the JSON object"));
    }

    let [model_span, stream_span, stream_options_span, max_tokens_span, max_completion_span, max_output_span] =
        spans;
    let model = match &model_span {
        None => None,
        Some(span) if body[span.start] == b'"' => Some(
            serde_json::from_slice::<String>(&body[span.clone()]).map_err(|_| {
                BodyError::NotJson {
                    reason: "invalid string for 'model'",
                    offset: span.start,
                }
            })?,
        ),
        Some(_) => return Err(BodyError::ModelNotString),
    };
    let stream = match stream_span.as_ref().map(|s| &body[s.clone()]) {
        None | Some(b"false" | b"null") => false,
        Some(b"true") => true,
        Some(_) => return Err(BodyError::StreamNotBool),
    };
    let mut max_tokens = None;
    // Later entries take precedence: the newer parameter names replace `max_tokens`.
    for (span, key) in [
        (max_tokens_span, Tracked::MaxTokens),
        (max_output_span, Tracked::MaxOutputTokens),
        (max_completion_span, Tracked::MaxCompletionTokens),
    ] {
        if let Some(span) = span {
            let raw = &body[span];
            if raw != b"null" {
                let n = std::str::from_utf8(raw)
                    .ok()
                    .and_then(|s| s.parse::<u64>().ok())
                    .ok_or(BodyError::TokenLimitNotInteger(key.name()))?;
                max_tokens = Some(n);
            }
        }
    }
    let include_usage_span = match &stream_options_span {
        Some(span) if body[span.start] == b'{' => include_usage_in(body, span.start)?,
        _ => None,
    };
    let include_usage = include_usage_span
        .as_ref()
        .is_some_and(|s| &body[s.clone()] == b"true");
    Ok(BodyInfo {
        model,
        stream,
        max_tokens,
        include_usage,
        model_span,
        stream_options_span,
        include_usage_span,
        obj_start,
        last_value_end,
        body_len: body.len(),
        affinity,
    })
}

/// The span of `include_usage` in the (already validated, small) object at `start`.
fn include_usage_in(body: &[u8], start: usize) -> Result<Option<Range<usize>>, BodyError> {
    let mut c = Cursor {
        b: body,
        pos: start,
    };
    let mut found = None;
    c.members(|c, key, escaped, value| {
        if key_is(c.b, &key, escaped, "include_usage") {
            if found.is_some() {
                return Err(BodyError::DuplicateKey("include_usage"));
            }
            found = Some(value);
        }
        Ok(())
    })?;
    Ok(found)
}

/// Appends `s` as a JSON string literal (with quotes). Done by hand because it cannot fail, unlike
/// `serde_json::to_vec`, and keeps non-ASCII characters as they are.
fn push_json_string(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    for &byte in s.as_bytes() {
        match byte {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x00..=0x1f => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(byte >> 4)]);
                out.push(HEX[usize::from(byte & 0xf)]);
            }
            _ => out.push(byte),
        }
    }
    out.push(b'"');
}

impl BodyInfo {
    /// The request's affinity hash for `affinity: prompt`, and where it came from; `None` when
    /// the body has nothing to hash. The `affinity` module says exactly what is hashed.
    /// `body` must be the body this was scanned from (not a rewritten one).
    pub fn affinity(&self, body: &[u8]) -> Option<(AffinitySource, u64)> {
        if body.len() != self.body_len {
            return None;
        }
        self.affinity.hash(body)
    }

    /// Inserts `member` (`"key":value`) into the top-level object, after the last member so that a
    /// last-wins parser would also see it; used only for keys that are absent.
    fn add_member(&self, body: &[u8], member: &[u8]) -> Vec<u8> {
        match self.last_value_end {
            Some(end) => {
                let mut insert = Vec::with_capacity(member.len() + 1);
                insert.push(b',');
                insert.extend_from_slice(member);
                splice(body, end..end, &insert)
            }
            None => splice(body, self.obj_start + 1..self.obj_start + 1, member),
        }
    }

    /// A new body with the top-level `model` value replaced by `new_model` (JSON-escaped) and every
    /// other byte unchanged; when the body has no `model`, one is added.
    ///
    /// # Panics
    /// If `body` is not the body this was scanned from (checked by length).
    pub fn rewrite_model(&self, body: &[u8], new_model: &str) -> Vec<u8> {
        assert_eq!(body.len(), self.body_len, "rewrite_model on another body");
        let mut value = Vec::with_capacity(new_model.len() + 2);
        push_json_string(&mut value, new_model);
        match &self.model_span {
            Some(span) => splice(body, span.clone(), &value),
            None => {
                let mut member = b"\"model\":".to_vec();
                member.extend_from_slice(&value);
                self.add_member(body, &member)
            }
        }
    }

    /// A new body in which `stream_options.include_usage` is `true`, so a streamed response ends with a
    /// usage chunk: set inside an existing `stream_options` object (keeping its other options),
    /// replacing a non-object `stream_options` (such as `null`), or added as
    /// `"stream_options":{"include_usage":true}`. Unchanged when already `true`.
    ///
    /// # Panics
    /// If `body` is not the body this was scanned from (checked by length).
    pub fn inject_include_usage(&self, body: &[u8]) -> Vec<u8> {
        assert_eq!(
            body.len(),
            self.body_len,
            "inject_include_usage on another body"
        );
        const OPTIONS: &[u8] = b"{\"include_usage\":true}";
        if self.include_usage {
            return body.to_vec();
        }
        if let Some(span) = &self.include_usage_span {
            return splice(body, span.clone(), b"true");
        }
        match &self.stream_options_span {
            Some(span) if body[span.start] == b'{' => {
                // An object without `include_usage`: add it as its first member.
                let after_brace = span.start + 1;
                let empty = body[after_brace..span.end - 1]
                    .iter()
                    .all(|b| b.is_ascii_whitespace());
                let insert: &[u8] = if empty {
                    b"\"include_usage\":true"
                } else {
                    b"\"include_usage\":true,"
                };
                splice(body, after_brace..after_brace, insert)
            }
            Some(span) => splice(body, span.clone(), OPTIONS),
            None => {
                let mut member = b"\"stream_options\":".to_vec();
                member.extend_from_slice(OPTIONS);
                self.add_member(body, &member)
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{json, Value};

    fn scan(s: &str) -> Result<BodyInfo, BodyError> {
        scan_json(s.as_bytes())
    }

    fn model(s: &str) -> Option<String> {
        scan(s).unwrap().model
    }

    #[test]
    fn reads_model_and_stream_in_any_key_order() {
        let a = scan(r#"{"model":"gpt-4o","stream":true,"messages":[]}"#).unwrap();
        let b = scan(r#"{"messages":[],"stream":true,"model":"gpt-4o"}"#).unwrap();
        for info in [a, b] {
            assert_eq!(info.model.as_deref(), Some("gpt-4o"));
            assert!(info.stream);
        }
    }

    #[test]
    fn tolerates_json_whitespace_everywhere() {
        let info =
            scan(" \r\n\t{ \"stream\" :\n false , \"model\"\t:\r\n \"o1\" \n}\n\n ").unwrap();
        assert_eq!(info.model.as_deref(), Some("o1"));
        assert!(!info.stream);
    }

    #[test]
    fn absent_fields_take_their_defaults() {
        let info = scan("{}").unwrap();
        assert_eq!(info.model, None);
        assert!(!info.stream);
        assert_eq!(info.max_tokens, None);
        assert!(!info.include_usage);
        let info = scan(r#"{"input":"hello"}"#).unwrap();
        assert_eq!(info.model, None);
    }

    #[test]
    fn nested_model_keys_are_ignored() {
        let body = r#"{
            "messages": [{"role":"user","content":"hi","model":"nested-1"}],
            "metadata": {"model": "nested-2", "stream": true, "x": {"model": 3}},
            "tools": [[{"model":"nested-3"}]],
            "model": "top"
        }"#;
        let info = scan(body).unwrap();
        assert_eq!(info.model.as_deref(), Some("top"));
        assert!(!info.stream);
        assert_eq!(model(r#"{"metadata":{"model":"nested"}}"#), None);
    }

    #[test]
    fn strings_with_braces_quotes_and_escapes_are_skipped_whole() {
        let body = r#"{"messages":[{"content":"} ] { [ \" \\\" \\ \/ \b\f\n\r\t \u00e9 \"model\":\"x\"}"}],"model":"real"}"#;
        assert_eq!(model(body).as_deref(), Some("real"));
        // A string ending in an escaped backslash must end there, not at a later quote.
        assert_eq!(
            model(r#"{"a":"\\","model":"m","b":"\\\\"}"#).as_deref(),
            Some("m")
        );
    }

    #[test]
    fn model_name_escapes_are_decoded() {
        assert_eq!(
            model(r#"{"model":"gpt-4o\u002dmini"}"#).as_deref(),
            Some("gpt-4o-mini")
        );
        assert_eq!(
            model(r#"{"model":"\u6a21\u578b"}"#).as_deref(),
            Some("模型")
        );
        assert_eq!(model(r#"{"model":"\ud83d\ude00"}"#).as_deref(), Some("😀"));
        assert_eq!(model(r#"{"model":"a\"b"}"#).as_deref(), Some("a\"b"));
        assert_eq!(model(r#"{"model":"模型"}"#).as_deref(), Some("模型"));
    }

    #[test]
    fn escaped_key_spelling_model_counts_as_model() {
        assert_eq!(model(r#"{"mod\u0065l":"x"}"#).as_deref(), Some("x"));
        assert_eq!(
            scan(r#"{"model":"a","mod\u0065l":"b"}"#),
            Err(BodyError::DuplicateKey("model"))
        );
    }

    #[test]
    fn invalid_json_is_rejected() {
        let cases = [
            "",
            "   ",
            "{",
            "{\"model\":\"x\"",
            "{\"model\":\"x\"}}",
            "{\"model\":\"x\"} x",
            "{\"model\":\"x}",
            "{\"model\" \"x\"}",
            "{\"model\":}",
            "{\"model\":\"x\",}",
            "{,}",
            "{\"a\":1 \"b\":2}",
            "{model:\"x\"}",
            "{'model':'x'}",
            "{\"a\":[1,2}",
            "{\"a\":{\"b\":1]}",
            "{\"a\":[1,,2]}",
            "{\"a\":[1,]}",
            "{\"a\":[}",
            "{\"a\":{\"b\"}}",
            "{\"a\":{\"b\":1,}}",
            "{\"a\":tru}",
            "{\"a\":nul}",
            "{\"a\":True}",
            "{\"a\":01}",
            "{\"a\":1.}",
            "{\"a\":.5}",
            "{\"a\":+1}",
            "{\"a\":1e}",
            "{\"a\":-}",
            "{\"a\":NaN}",
            "{\"a\":\"\\x\"}",
            "{\"a\":\"\\u12g4\"}",
            "{\"a\":\"\\u12\"}",
            "{\"a\":\"abc\\",
            "{\"model\":\"x\"}{}",
        ];
        for case in cases {
            match scan(case) {
                Err(BodyError::NotJson { .. }) => {}
                other => panic!("{case:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn non_object_top_level_is_rejected() {
        for case in [
            "[]",
            "[{\"model\":\"x\"}]",
            "\"model\"",
            "42",
            "null",
            "true",
            "hello",
        ] {
            assert_eq!(scan(case), Err(BodyError::NotObject), "{case:?}");
        }
    }

    #[test]
    fn non_string_model_is_rejected() {
        for v in ["1", "null", "true", "[\"gpt-4o\"]", "{\"name\":\"gpt-4o\"}"] {
            let body = format!(r#"{{"model":{v}}}"#);
            assert_eq!(scan(&body), Err(BodyError::ModelNotString), "{body}");
        }
        assert_eq!(
            BodyError::ModelNotString.to_string(),
            "Invalid type for 'model': expected a string."
        );
        assert_eq!(BodyError::ModelNotString.param(), Some("model"));
    }

    #[test]
    fn model_with_lone_surrogate_escape_is_rejected() {
        assert!(matches!(
            scan(r#"{"model":"\ud800"}"#),
            Err(BodyError::NotJson { .. })
        ));
    }

    #[test]
    fn stream_must_be_a_boolean_and_null_means_false() {
        assert!(scan(r#"{"stream":true}"#).unwrap().stream);
        assert!(!scan(r#"{"stream":false}"#).unwrap().stream);
        assert!(!scan(r#"{"stream":null}"#).unwrap().stream);
        for v in ["1", "0", "\"true\"", "[]", "{}"] {
            let body = format!(r#"{{"stream":{v}}}"#);
            assert_eq!(scan(&body), Err(BodyError::StreamNotBool), "{body}");
        }
    }

    #[test]
    fn token_limits_are_read_newest_name_first() {
        assert_eq!(scan(r#"{"max_tokens":100}"#).unwrap().max_tokens, Some(100));
        assert_eq!(scan(r#"{"max_tokens":null}"#).unwrap().max_tokens, None);
        assert_eq!(
            scan(r#"{"max_completion_tokens":7,"max_tokens":100}"#)
                .unwrap()
                .max_tokens,
            Some(7)
        );
        assert_eq!(
            scan(r#"{"max_output_tokens":9}"#).unwrap().max_tokens,
            Some(9)
        );
        assert_eq!(
            scan(r#"{"max_completion_tokens":null,"max_tokens":5}"#)
                .unwrap()
                .max_tokens,
            Some(5)
        );
        for v in ["-1", "1.5", "1e3", "\"10\"", "true", "18446744073709551616"] {
            let body = format!(r#"{{"max_tokens":{v}}}"#);
            assert_eq!(
                scan(&body),
                Err(BodyError::TokenLimitNotInteger("max_tokens")),
                "{body}"
            );
        }
    }

    #[test]
    fn include_usage_is_read_from_stream_options_only() {
        let on = r#"{"stream":true,"stream_options":{"include_usage":true}}"#;
        assert!(scan(on).unwrap().include_usage);
        for off in [
            r#"{"stream_options":{"include_usage":false}}"#,
            r#"{"stream_options":{}}"#,
            r#"{"stream_options":null}"#,
            r#"{"include_usage":true}"#,
            r#"{"stream_options":{"x":{"include_usage":true}}}"#,
        ] {
            assert!(!scan(off).unwrap().include_usage, "{off}");
        }
    }

    #[test]
    fn duplicate_tracked_keys_are_refused_and_others_allowed() {
        assert_eq!(
            scan(r#"{"model":"a","model":"b"}"#),
            Err(BodyError::DuplicateKey("model"))
        );
        assert_eq!(
            scan(r#"{"stream":true,"x":1,"stream":false}"#),
            Err(BodyError::DuplicateKey("stream"))
        );
        assert_eq!(
            scan(r#"{"stream_options":{"include_usage":true,"include_usage":false}}"#),
            Err(BodyError::DuplicateKey("include_usage"))
        );
        assert_eq!(
            model(r#"{"temperature":1,"temperature":2,"model":"m"}"#).as_deref(),
            Some("m")
        );
        assert_eq!(
            BodyError::DuplicateKey("model").to_string(),
            "Duplicate key 'model' in the request body."
        );
    }

    #[test]
    fn deep_nesting_is_refused_without_recursion() {
        let deep = format!(r#"{{"a":{}{}}}"#, "[".repeat(100_000), "]".repeat(100_000));
        assert!(matches!(
            scan(&deep),
            Err(BodyError::NotJson {
                reason: "nesting too deep",
                ..
            })
        ));
        let ok = format!(r#"{{"a":{}{}}}"#, "[".repeat(500), "]".repeat(500));
        assert!(scan(&ok).is_ok());
    }

    #[test]
    fn error_offsets_point_at_the_problem() {
        assert_eq!(
            scan(r#"{"a":1 "b":2}"#),
            Err(BodyError::NotJson {
                reason: "expected ',' or '}'",
                offset: 7
            })
        );
        assert_eq!(
            BodyError::NotJson {
                reason: "expected ',' or '}'",
                offset: 7
            }
            .to_string(),
            "We could not parse the JSON body of your request: expected ',' or '}' at byte 7."
        );
    }

    fn without_model(v: &Value) -> Value {
        let mut v = v.clone();
        v.as_object_mut().unwrap().remove("model");
        v
    }

    #[test]
    fn rewrite_model_changes_only_the_model_bytes() {
        let body = br#"{ "messages": [{"role":"user","content":"{\"model\":1}"}],
  "model" :  "alias",  "stream": true }"#;
        let info = scan_json(body).unwrap();
        let out = info.rewrite_model(body, "gpt-4o-2024-08-06");
        let at = memchr::memmem::find(body, b"\"alias\"").unwrap();
        assert_eq!(out[..at], body[..at]);
        assert_eq!(out[out.len() - (body.len() - at - 7)..], body[at + 7..]);
        let (old, new): (Value, Value) = (
            serde_json::from_slice(body).unwrap(),
            serde_json::from_slice(&out).unwrap(),
        );
        assert_eq!(new["model"], "gpt-4o-2024-08-06");
        assert_eq!(without_model(&old), without_model(&new));
        assert_eq!(
            scan_json(&out).unwrap().model.as_deref(),
            Some("gpt-4o-2024-08-06")
        );
    }

    #[test]
    fn rewrite_model_escapes_the_new_name() {
        let body = br#"{"model":"a"}"#;
        let info = scan_json(body).unwrap();
        let name = "we\"ird\\name\n\u{1}模型";
        let out = info.rewrite_model(body, name);
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["model"], name);
    }

    #[test]
    fn rewrite_model_adds_a_missing_model() {
        for body in ["{}", "{ }", r#"{"input":"x"}"#, "{\"input\":\"x\"\n}"] {
            let info = scan(body).unwrap();
            let out = info.rewrite_model(body.as_bytes(), "m");
            let v: Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(v["model"], "m", "{body}");
        }
    }

    #[test]
    fn inject_include_usage_in_every_shape() {
        let cases = [
            (
                r#"{"stream":true}"#,
                json!({"stream":true,"stream_options":{"include_usage":true}}),
            ),
            ("{}", json!({"stream_options":{"include_usage":true}})),
            (
                r#"{"stream_options":null}"#,
                json!({"stream_options":{"include_usage":true}}),
            ),
            (
                r#"{"stream_options":{ }}"#,
                json!({"stream_options":{"include_usage":true}}),
            ),
            (
                r#"{"stream_options":{"include_obfuscation":false}}"#,
                json!({"stream_options":{"include_usage":true,"include_obfuscation":false}}),
            ),
            (
                r#"{"stream_options":{"include_usage":false,"x":1},"a":[]}"#,
                json!({"stream_options":{"include_usage":true,"x":1},"a":[]}),
            ),
        ];
        for (body, expected) in cases {
            let info = scan(body).unwrap();
            let out = info.inject_include_usage(body.as_bytes());
            let v: Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(v, expected, "{body}");
            assert!(scan_json(&out).unwrap().include_usage);
        }
        let already = r#"{"stream_options":{"include_usage":true}}"#;
        let info = scan(already).unwrap();
        assert_eq!(
            info.inject_include_usage(already.as_bytes()),
            already.as_bytes()
        );
    }

    fn big_body(model_first: bool) -> String {
        let mut messages = Vec::new();
        let mut i = 0;
        let mut size = 0;
        while size < 1 << 20 {
            let content = format!(
                "message {i}: {{\"model\":\"fake\"}} [brackets] \\ \"quotes\" é 模型 \u{1f600} \n{}",
                "lorem ipsum ".repeat(20)
            );
            size += content.len();
            messages.push(json!({"role": if i % 2 == 0 {"user"} else {"assistant"}, "content": content, "n": i, "f": 1.5e-3}));
            i += 1;
        }
        let mut obj = serde_json::Map::new();
        if model_first {
            obj.insert("model".into(), json!("gpt-4o"));
        }
        obj.insert("messages".into(), Value::Array(messages));
        obj.insert("stream".into(), json!(true));
        if !model_first {
            obj.insert("model".into(), json!("gpt-4o"));
        }
        serde_json::to_string(&Value::Object(obj)).unwrap()
    }

    #[test]
    fn one_mebibyte_body_with_long_history_scans_correctly() {
        for model_first in [true, false] {
            let body = big_body(model_first);
            assert!(body.len() > 1 << 20);
            let info = scan(&body).unwrap();
            assert_eq!(info.model.as_deref(), Some("gpt-4o"));
            assert!(info.stream);
            let out = info.rewrite_model(body.as_bytes(), "gpt-4o-2024-11-20");
            assert_eq!(out.len(), body.len() + 11);
            assert_eq!(
                scan_json(&out).unwrap().model.as_deref(),
                Some("gpt-4o-2024-11-20")
            );
        }
    }

    #[test]
    fn truncating_a_valid_body_anywhere_is_an_error() {
        let body = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"a \"b\" \u00e9"}],"stream":true,"n":-1.5e+3}"#;
        assert!(scan(body).is_ok());
        for cut in 0..body.len() {
            assert!(scan_json(&body.as_bytes()[..cut]).is_err(), "cut at {cut}");
        }
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            (-1e300f64..1e300).prop_map(Value::from),
            "\\PC*".prop_map(Value::String),
            "[\"\\\\{}\\[\\]:,\\x00-\\x1fé模]*".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(arb_key(), inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn arb_key() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("model".to_owned()),
            Just("stream".to_owned()),
            Just("messages".to_owned()),
            "\\PC{0,12}",
        ]
    }

    /// A request-like object: any top-level keys except the tracked ones whose checks this test does
    /// not model, plus optional `model` and `stream` of any type.
    fn arb_body() -> impl Strategy<Value = Value> {
        (
            prop::collection::btree_map("\\PC{0,12}", arb_json(), 0..6),
            prop::option::of(prop_oneof![
                3 => "\\PC*".prop_map(Value::String),
                1 => arb_json(),
            ]),
            prop::option::of(prop_oneof![
                3 => any::<bool>().prop_map(Value::Bool),
                1 => arb_json(),
            ]),
        )
            .prop_map(|(rest, model, stream)| {
                let mut obj: serde_json::Map<String, Value> = rest
                    .into_iter()
                    .filter(|(k, _)| !Tracked::ALL.iter().any(|t| t.name() == k))
                    .collect();
                if let Some(m) = model {
                    obj.insert("model".into(), m);
                }
                if let Some(s) = stream {
                    obj.insert("stream".into(), s);
                }
                Value::Object(obj)
            })
    }

    fn expected(v: &Value) -> Result<(Option<String>, bool), BodyError> {
        let model = match v.get("model") {
            None => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => return Err(BodyError::ModelNotString),
        };
        let stream = match v.get("stream") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(BodyError::StreamNotBool),
        };
        Ok((model, stream))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn agrees_with_serde_json_on_model_and_stream(v in arb_body(), pretty in any::<bool>()) {
            let body = if pretty {
                serde_json::to_vec_pretty(&v).unwrap()
            } else {
                serde_json::to_vec(&v).unwrap()
            };
            let got = scan_json(&body).map(|i| (i.model, i.stream));
            prop_assert_eq!(got, expected(&v));
        }

        #[test]
        fn rewritten_body_parses_with_the_new_model(
            v in arb_body(),
            pretty in any::<bool>(),
            new_model in "\\PC*",
        ) {
            let body = if pretty {
                serde_json::to_vec_pretty(&v).unwrap()
            } else {
                serde_json::to_vec(&v).unwrap()
            };
            // Compare with the body as serde_json reads it back, not with `v`: its float printing
            // does not always round-trip, and that is not what this test is about.
            let original: Value = serde_json::from_slice(&body).unwrap();
            if let Ok(info) = scan_json(&body) {
                let out = info.rewrite_model(&body, &new_model);
                let parsed: Value = serde_json::from_slice(&out).unwrap();
                prop_assert_eq!(&parsed["model"], &Value::String(new_model.clone()));
                prop_assert_eq!(without_model(&parsed), without_model(&original));
                prop_assert_eq!(scan_json(&out).unwrap().model, Some(new_model));

                let injected = info.inject_include_usage(&body);
                let parsed: Value = serde_json::from_slice(&injected).unwrap();
                prop_assert_eq!(&parsed["stream_options"]["include_usage"], &Value::Bool(true));
                let mut rest = parsed.clone();
                rest.as_object_mut().unwrap().remove("stream_options");
                prop_assert_eq!(rest, original);
            }
        }

        /// On JSON-ish noise (no control characters, no surrogate escapes, shallow), the scanner accepts
        /// exactly the objects serde_json accepts, apart from the type and duplicate checks.
        #[test]
        fn accepts_exactly_what_serde_json_accepts(s in "[{}\\[\\]\":, tfalsenu0-9.eE+\\-\\\\/bmo]{0,40}") {
            let serde_ok = matches!(serde_json::from_str::<Value>(&s), Ok(Value::Object(_)));
            // Numbers too large for an f64 are the one thing serde_json refuses and the scanner
            // (like Python's json) lets through.
            let out_of_range = serde_json::from_str::<Value>(&s)
                .is_err_and(|e| e.to_string().contains("number out of range"));
            match scan(&s) {
                Ok(_) => prop_assert!(serde_ok || out_of_range, "scanner accepted {:?}", s),
                Err(BodyError::NotJson { .. } | BodyError::NotObject) => {
                    prop_assert!(!serde_ok, "scanner rejected {:?}", s)
                }
                Err(_) => prop_assert!(serde_ok),
            }
        }
    }
}
