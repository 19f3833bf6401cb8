//! Looks for keys in JSON text without parsing it: the cheap checks that decide whether an event
//! or a body tail is worth a real parse.

use std::sync::LazyLock;

use memchr::memmem;

pub(super) static USAGE_KEY: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\"usage\""));
static CHOICES_KEY: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\"choices\""));

fn skip_ws(text: &[u8]) -> &[u8] {
    let n = text
        .iter()
        .take_while(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
        .count();
    &text[n..]
}

/// When `text[at..]` is the key `"usage"` followed by `:` and an object, where that object starts.
/// (The key is fixed rather than a parameter so that its comparison compiles to two loads.)
pub(super) fn usage_object_at(text: &[u8], at: usize) -> Option<usize> {
    let after_key = text.get(at..)?.strip_prefix(b"\"usage\"")?;
    let value = skip_ws(skip_ws(after_key).strip_prefix(b":")?);
    (value.first() == Some(&b'{')).then(|| text.len() - value.len())
}

/// Whether `text` has a `"usage"` key whose value is an object (not `null`), anywhere.
pub(super) fn has_usage_object(text: &[u8]) -> bool {
    USAGE_KEY
        .find_iter(text)
        .any(|at| usage_object_at(text, at).is_some())
}

/// Whether `text` has a `"choices"` key whose value is an empty array, anywhere.
pub(super) fn has_empty_choices(text: &[u8]) -> bool {
    CHOICES_KEY.find_iter(text).any(|at| {
        let after_key = &text[at + b"\"choices\"".len()..];
        skip_ws(after_key)
            .strip_prefix(b":")
            .and_then(|value| skip_ws(value).strip_prefix(b"["))
            .is_some_and(|inside| skip_ws(inside).first() == Some(&b']'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_counts_only_with_an_object_value() {
        assert!(has_usage_object(br#"{"usage" : {"prompt_tokens":1}}"#));
        assert!(has_usage_object(b"{\"a\":1,\"usage\":\n\t{}}"));
        assert!(!has_usage_object(br#"{"usage":null}"#));
        assert!(!has_usage_object(br#"{"usage_x":{}}"#));
        assert!(!has_usage_object(br#"{"usage"}"#));
        assert!(!has_usage_object(br#"{"usage":"#));
        assert_eq!(usage_object_at(br#"{"usage": {}}"#, 1), Some(10));
        assert_eq!(usage_object_at(br#"{"usage": {}}"#, 0), None);
    }

    #[test]
    fn empty_choices_are_told_from_full_null_and_missing_ones() {
        assert!(has_empty_choices(br#"{"choices": [ ]}"#));
        assert!(has_empty_choices(b"{\"choices\":[\r\n]}"));
        assert!(!has_empty_choices(br#"{"choices":[{}]}"#));
        assert!(!has_empty_choices(br#"{"choices":null}"#));
        assert!(!has_empty_choices(br#"{"x":[]}"#));
    }
}
