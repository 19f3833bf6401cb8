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

/// When `text[at..]` is `key` (quotes included) followed by `:` and an object, where that object
/// starts.
pub(super) fn object_value_of_key(text: &[u8], at: usize, key: &[u8]) -> Option<usize> {
    let after_key = text.get(at..)?.strip_prefix(key)?;
    let value = skip_ws(skip_ws(after_key).strip_prefix(b":")?);
    (value.first() == Some(&b'{')).then(|| text.len() - value.len())
}

/// Whether `text` has a `"usage"` key whose value is an object (not `null`), anywhere.
pub(super) fn has_usage_object(text: &[u8]) -> bool {
    USAGE_KEY
        .find_iter(text)
        .any(|at| object_value_of_key(text, at, b"\"usage\"").is_some())
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
