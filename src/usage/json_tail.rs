//! The end of a JSON body: kept in a bounded ring as it streams past, then searched backwards for
//! the `usage` object.

use super::json_scan::usage_object_at;
use super::{usage_from_object_prefix, Usage, JSON_TAIL_BYTES};

/// The last [`JSON_TAIL_BYTES`] of a body, as a ring: each byte is copied once on the way in,
/// and the ring is straightened once, at the end.
#[derive(Debug, Default)]
pub(super) struct JsonTail {
    ring: Vec<u8>,
    /// Where the oldest byte is once the ring is full (0 until then).
    head: usize,
}

impl JsonTail {
    /// Appends `data`, forgetting what falls out of the last [`JSON_TAIL_BYTES`].
    pub(super) fn push(&mut self, mut data: &[u8]) {
        if data.len() >= JSON_TAIL_BYTES {
            self.ring.clear();
            self.ring
                .extend_from_slice(&data[data.len() - JSON_TAIL_BYTES..]);
            self.head = 0;
            return;
        }
        if self.ring.len() < JSON_TAIL_BYTES {
            let n = data.len().min(JSON_TAIL_BYTES - self.ring.len());
            self.ring.extend_from_slice(&data[..n]);
            data = &data[n..];
        }
        // Anything left over means the ring is full: overwrite the oldest bytes.
        while !data.is_empty() {
            let n = data.len().min(JSON_TAIL_BYTES - self.head);
            self.ring[self.head..self.head + n].copy_from_slice(&data[..n]);
            self.head = (self.head + n) % JSON_TAIL_BYTES;
            data = &data[n..];
        }
    }

    /// The kept bytes, oldest first.
    pub(super) fn contiguous(&mut self) -> &[u8] {
        self.ring.rotate_left(self.head);
        self.head = 0;
        &self.ring
    }

    /// Bytes allocated for the ring, for memory-bound checks.
    pub(super) fn buffered_bytes(&self) -> usize {
        self.ring.capacity()
    }

    /// How many bytes are kept.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.ring.len()
    }
}

/// The last `usage` object in the tail of a JSON body: a top-level one if there is any, else the
/// last at any depth.
///
/// Top level is preferred because that is where every OpenAI response reports the request's own
/// usage, while a nested `usage` (in metadata, or an echoed sub-response) may describe something
/// else. The tail may start anywhere, even inside a string, but a well-formed body ends outside
/// any string at depth 0, so walking backwards from the end knows the depth and string state of
/// every byte. A `"usage"` inside a string cannot be mistaken for a key: its quotes are escaped.
pub(super) fn last_usage_in_json(text: &[u8]) -> Option<Usage> {
    let mut depth: i64 = 0;
    let mut in_string = false;
    let mut nested = None;
    for i in (0..text.len()).rev() {
        let byte = text[i];
        if in_string {
            if byte == b'"' && !is_escaped(text, i) {
                // The opening quote of a string: maybe the key `"usage"`.
                in_string = false;
                if let Some(open) = usage_object_at(text, i) {
                    if depth == 1 {
                        if let Some(usage) = usage_from_object_prefix(&text[open..]) {
                            return Some(usage);
                        }
                    } else if nested.is_none() {
                        nested = usage_from_object_prefix(&text[open..]);
                    }
                }
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'}' | b']' => depth += 1,
            b'{' | b'[' => depth -= 1,
            _ => {}
        }
    }
    nested
}

/// Whether the quote at `text[at]` is escaped (preceded by an odd number of backslashes).
fn is_escaped(text: &[u8], at: usize) -> bool {
    text[..at].iter().rev().take_while(|&&b| b == b'\\').count() % 2 == 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_ring_keeps_exactly_the_last_bytes_for_any_chunk_size() {
        let body: Vec<u8> = (0..3 * JSON_TAIL_BYTES + 5)
            .map(|i| (i % 251) as u8)
            .collect();
        for size in [
            1,
            7,
            1000,
            JSON_TAIL_BYTES - 1,
            JSON_TAIL_BYTES,
            JSON_TAIL_BYTES + 3,
        ] {
            let mut tail = JsonTail::default();
            body.chunks(size).for_each(|chunk| tail.push(chunk));
            assert_eq!(
                tail.contiguous(),
                &body[body.len() - JSON_TAIL_BYTES..],
                "{size}"
            );
        }
    }
}
