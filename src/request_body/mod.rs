//! What routing needs from a request body, read cheaply.
//!
//! Chat bodies of 16 KiB to 1 MiB are common (long histories), and all routing needs from them is a
//! handful of top-level fields. [`scan_json`] makes one pass over the bytes without building a JSON
//! tree: string contents are skipped with `memchr`, nested values are walked only to check their
//! structure, and just the spans of the interesting top-level values are kept. Those small spans are
//! then decoded on their own (the `model` string with `serde_json`).
//!
//! The same spans let the proxy rewrite the model alias or add `stream_options.include_usage` while
//! leaving every other byte of the client's body as it was.
//!
//! For `multipart/form-data` uploads (audio transcriptions, image edits) the model is a form field:
//! see [`multipart_field`] and [`rewrite_multipart_field`].
//!
//! Layout: `json` scans and rewrites JSON bodies, `multipart` reads and rewrites form fields;
//! both report a [`BodyError`]. `affinity` hashes what `affinity: prompt` pins to a key
//! (`prompt_cache_key`, `user`, or the prompt's first KiB) from the spans the scan noted.

use std::ops::Range;

mod affinity;
mod json;
mod multipart;

pub use affinity::{mix64, AffinitySource, StableHasher, PROMPT_PREFIX_BYTES};
pub use json::{scan_json, BodyInfo};
pub use multipart::{multipart_boundary, multipart_field, rewrite_multipart_field};

/// Why a request body could not be read; the `Display` text is meant for the client, in the `message`
/// of an OpenAI-style 400 error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// The body is not well-formed JSON.
    #[error("We could not parse the JSON body of your request: {reason} at byte {offset}.")]
    NotJson {
        /// What was wrong.
        reason: &'static str,
        /// Where, in bytes from the start of the body.
        offset: usize,
    },
    /// The body is JSON but not an object.
    #[error("The request body must be a JSON object.")]
    NotObject,
    /// `model` is there but is not a string.
    #[error("Invalid type for 'model': expected a string.")]
    ModelNotString,
    /// `stream` is there but is neither a boolean nor null.
    #[error("Invalid type for 'stream': expected a boolean.")]
    StreamNotBool,
    /// A token limit (`max_tokens`, ...) is there but is not a non-negative integer or null.
    #[error("Invalid value for '{0}': expected a non-negative integer.")]
    TokenLimitNotInteger(&'static str),
    /// A key the gateway acts on appears twice at the top level (or `include_usage` twice in
    /// `stream_options`). Parsers disagree on which copy wins, so the gateway could route one model
    /// while the upstream serves another; refusing is the only safe answer.
    #[error("Duplicate key '{0}' in the request body.")]
    DuplicateKey(&'static str),
    /// A `multipart/form-data` body (or its content type) is malformed.
    #[error("We could not parse the multipart body of your request: {0}.")]
    Multipart(&'static str),
}

impl BodyError {
    /// The request parameter the error is about, for the `param` field of an OpenAI-style error.
    pub fn param(&self) -> Option<&'static str> {
        match self {
            BodyError::ModelNotString => Some("model"),
            BodyError::StreamNotBool => Some("stream"),
            BodyError::TokenLimitNotInteger(key) | BodyError::DuplicateKey(key) => Some(key),
            BodyError::NotJson { .. } | BodyError::NotObject | BodyError::Multipart(_) => None,
        }
    }
}

/// `body` with the bytes in `range` replaced by `insert`.
fn splice(body: &[u8], range: Range<usize>, insert: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() - range.len() + insert.len());
    out.extend_from_slice(&body[..range.start]);
    out.extend_from_slice(insert);
    out.extend_from_slice(&body[range.end..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = scan_json(&bytes);
            let _ = multipart_field(&bytes, "multipart/form-data; boundary=b", "model");
        }
    }
}
