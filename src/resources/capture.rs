//! The ids an answer reports as created: the values of its `"id"` fields (and of
//! `"fine_tuned_model"`) that look like account-scoped ids, read from the answer's first
//! [`CAPTURE_BYTES`] (an object's id comes first; a stream's first event names the response).

use super::ids::{looks_like_id, MAX_IDS};
use memchr::memmem;

/// How much of an answer is read for ids.
pub const CAPTURE_BYTES: usize = 16 * 1024;

/// The fields whose values are ids of created objects.
const FIELDS: [&[u8]; 2] = [b"\"id\"", b"\"fine_tuned_model\""];

/// Collects an answer's first bytes.
#[derive(Debug, Default)]
pub struct IdCapture {
    buf: Vec<u8>,
}

impl IdCapture {
    /// Keeps what fits of `chunk`.
    pub fn feed(&mut self, chunk: &[u8]) {
        let room = CAPTURE_BYTES.saturating_sub(self.buf.len());
        self.buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
    }

    /// Whether no more bytes are kept.
    pub fn is_full(&self) -> bool {
        self.buf.len() >= CAPTURE_BYTES
    }

    /// The ids found, in order, without repeats.
    pub fn ids(&self) -> Vec<String> {
        ids_in(&self.buf)
    }
}

/// The id values of `"id"` and `"fine_tuned_model"` fields in `text`.
fn ids_in(text: &[u8]) -> Vec<String> {
    let mut found: Vec<(usize, String)> = Vec::new();
    for field in FIELDS {
        for at in memmem::find_iter(text, field) {
            if let Some(value) = string_value(&text[at + field.len()..]) {
                if looks_like_id(value) && !found.iter().any(|(_, v)| v == value) {
                    found.push((at, value.to_string()));
                }
            }
        }
    }
    found.sort_by_key(|(at, _)| *at);
    found.into_iter().take(MAX_IDS).map(|(_, v)| v).collect()
}

/// The string after `: ` at the start of `rest`, if it is one without escapes.
fn string_value(rest: &[u8]) -> Option<&str> {
    let rest = rest
        .trim_ascii_start()
        .strip_prefix(b":")?
        .trim_ascii_start();
    let rest = rest.strip_prefix(b"\"")?;
    let end = rest.iter().position(|&b| b == b'"' || b == b'\\')?;
    if rest[end] != b'"' {
        return None;
    }
    std::str::from_utf8(&rest[..end]).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn captured(chunks: &[&[u8]]) -> Vec<String> {
        let mut c = IdCapture::default();
        for chunk in chunks {
            c.feed(chunk);
        }
        c.ids()
    }

    #[test]
    fn a_created_objects_id_is_found_across_chunks() {
        let ids = captured(&[
            br#"{"object":"file","i"#,
            br#"d" : "file-abc123","bytes":12}"#,
        ]);
        assert_eq!(ids, ["file-abc123"]);
    }

    #[test]
    fn nested_and_streamed_ids_are_found_in_order_other_ids_are_not() {
        let upload =
            br#"{"id":"upload_1","status":"completed","file":{"id":"file-2","object":"file"}}"#;
        assert_eq!(captured(&[upload]), ["upload_1", "file-2"]);
        let stream = b"event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"resp_9\",\"output\":[{\"id\":\"msg_1\"}]}}\n\n";
        assert_eq!(captured(&[stream]), ["resp_9"]);
        let job = br#"{"id":"ftjob-1","fine_tuned_model":"ft:gpt-4o-mini:acme::z9","training_file":"file-3"}"#;
        assert_eq!(captured(&[job]), ["ftjob-1", "ft:gpt-4o-mini:acme::z9"]);
        assert!(captured(&[br#"{"id":"chatcmpl-1"}"#]).is_empty());
        assert!(captured(&[br#"{"id":"file-\"x"}"#]).is_empty(), "escaped");
    }

    #[test]
    fn only_the_first_bytes_are_kept() {
        let mut c = IdCapture::default();
        c.feed(&vec![b' '; CAPTURE_BYTES]);
        c.feed(br#"{"id":"file-late"}"#);
        assert!(c.ids().is_empty());
        assert_eq!(c.buf.len(), CAPTURE_BYTES);
    }
}
