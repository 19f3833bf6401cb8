//! The `multipart/form-data` field reader and rewrite. On any content type and body the reader
//! answers without panicking; the rewrite succeeds exactly when the reader found the field (and
//! the new value is safe), and a rewritten body reads back with the new value and nothing else
//! changed.
//!
//! Input: `content type NUL new value NUL body`; an empty new value means `whisper-1`.

use keygate::request_body::BodyError;
use keygate::request_body::{multipart_boundary, multipart_field, rewrite_multipart_field};

use crate::alloc_count::assert_peak_below;
use crate::input::{fields, text};

use super::memory_bound;

/// The field keygate reads and rewrites.
const FIELD: &str = "model";

/// Checks one input; see the module doc.
pub fn run(data: &[u8]) {
    let parts = fields(data, 3);
    let content_type = text(parts[0]);
    let new_value = match text(parts[1]) {
        v if v.is_empty() => "whisper-1".to_string(),
        v => v,
    };
    let body = parts[2];
    let limit = memory_bound(1 << 20, 8, data.len());
    assert_peak_below("multipart", limit, || {
        check(&content_type, &new_value, body)
    });
}

fn check(content_type: &str, new_value: &str, body: &[u8]) {
    let boundary = multipart_boundary(content_type);
    let read = multipart_field(body, content_type, FIELD);
    let rewritten = rewrite_multipart_field(body, content_type, FIELD, new_value);
    // A value that could end the part early is refused.
    let unsafe_value = new_value.contains(['\r', '\n'])
        || boundary.is_some_and(|b| new_value.starts_with(&format!("--{b}")));
    match (&read, &rewritten) {
        (_, Some(out)) => {
            assert!(!unsafe_value, "rewrote with {new_value:?}");
            let old_len = match &read {
                Ok(Some(old)) => old.len(),
                Err(BodyError::Multipart("form field value is not UTF-8")) => {
                    // The rewrite does not need the old value as text; its length is what was cut.
                    body.len() + new_value.len() - out.len()
                }
                other => panic!("rewrote a field the reader answers {other:?} for"),
            };
            assert_eq!(out.len(), body.len() - old_len + new_value.len());
            assert_eq!(
                multipart_field(out, content_type, FIELD),
                Ok(Some(new_value.to_string())),
                "the rewritten body reads differently: {}",
                String::from_utf8_lossy(out)
            );
        }
        (Ok(Some(_)), None) => assert!(
            unsafe_value,
            "the field was read but not rewritten with {new_value:?}"
        ),
        (_, None) => {}
    }
}
