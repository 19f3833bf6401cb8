//! Masking what an upstream's error body must not tell a client: any part of the key that was
//! used (some relays echo it whole) and the account's ids (`org-…`, `proj_…`, which OpenAI puts
//! in rate-limit messages). Masking keeps the length, so a `Content-Length` already sent stays
//! true.

use std::collections::HashSet;

/// Runs shorter than this are not treated as a piece of the key (they occur in ordinary text).
pub const MIN_SECRET_RUN: usize = 8;

/// What a mask byte is.
const MASK: u8 = b'*';

/// Masks every run of [`MIN_SECRET_RUN`] or more bytes of `body` that also occurs in `secret`.
pub fn mask_secret_runs(body: &mut [u8], secret: &[u8]) {
    if secret.len() < MIN_SECRET_RUN || body.len() < MIN_SECRET_RUN {
        return;
    }
    let grams: HashSet<&[u8]> = secret.windows(MIN_SECRET_RUN).collect();
    // Mark first, then mask: overlapping runs must all be found in the original bytes.
    let mut masked_until = 0;
    let mut spans = Vec::new();
    for (i, w) in body.windows(MIN_SECRET_RUN).enumerate() {
        if grams.contains(w) {
            let start = i.max(masked_until);
            masked_until = i + MIN_SECRET_RUN;
            spans.push(start..masked_until);
        }
    }
    for span in spans {
        body[span].fill(MASK);
    }
}

/// Masks the id part of OpenAI organisation and project ids (`org-` or `proj_` followed by at
/// least 8 letters and digits), keeping the prefix so the message still reads.
pub fn mask_account_ids(body: &mut [u8]) {
    for prefix in [&b"org-"[..], b"proj_"] {
        let mut at = 0;
        while let Some(found) = find(&body[at..], prefix) {
            let start = at + found + prefix.len();
            let len = body[start..]
                .iter()
                .take_while(|b| b.is_ascii_alphanumeric())
                .count();
            // `org-` inside a longer word (`borg-…`) is not an id.
            let word_start = at + found == 0 || !body[at + found - 1].is_ascii_alphanumeric();
            if len >= 8 && word_start {
                body[start..start + len].fill(MASK);
            }
            at = start + len;
        }
    }
}

/// Masks both the key's runs and account ids.
pub fn scrub(body: &mut [u8], secret: &[u8]) {
    mask_secret_runs(body, secret);
    mask_account_ids(body);
}

/// Scrubs an error body as it passes: held whole (up to `limit` bytes) so that a key split
/// across chunks is still found, then released at its end. A body over the limit is released
/// from then on chunk by chunk, each scrubbed on its own.
#[derive(Debug)]
pub struct ErrorBodyScrubber {
    held: Vec<u8>,
    limit: usize,
    streaming: bool,
}

impl ErrorBodyScrubber {
    /// A scrubber that holds up to `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self {
            held: Vec::new(),
            limit,
            streaming: false,
        }
    }

    /// Takes the next chunk; returns what may go to the client now.
    pub fn feed(&mut self, chunk: &[u8], secret: &[u8]) -> Option<Vec<u8>> {
        if !self.streaming && self.held.len() + chunk.len() <= self.limit {
            self.held.extend_from_slice(chunk);
            return None;
        }
        self.streaming = true;
        let mut out = std::mem::take(&mut self.held);
        out.extend_from_slice(chunk);
        scrub(&mut out, secret);
        Some(out)
    }

    /// The end of the body: whatever is still held, scrubbed.
    pub fn finish(&mut self, secret: &[u8]) -> Option<Vec<u8>> {
        let mut out = std::mem::take(&mut self.held);
        scrub(&mut out, secret);
        (!out.is_empty()).then_some(out)
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(hay, needle)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn masked(body: &str, secret: &str) -> String {
        let mut b = body.as_bytes().to_vec();
        mask_secret_runs(&mut b, secret.as_bytes());
        String::from_utf8(b).unwrap_or_default()
    }

    #[test]
    fn a_whole_or_partial_key_is_masked_without_changing_the_length() {
        let key = "sk-proj-Zq8vT3mL0pW9xY2bN4cD";
        let body = format!(r#"{{"error":{{"message":"Incorrect API key provided: {key}."}}}}"#);
        let out = masked(&body, key);
        assert_eq!(out.len(), body.len());
        assert!(!out.contains("Zq8vT3mL"), "{out}");
        assert!(out.contains("Incorrect API key provided: "), "{out}");
        // OpenAI's own masking leaves the last characters: a run of 8 is still caught.
        let tail = "sk-proj-****************pW9xY2bN4cD";
        assert!(!masked(tail, key).contains("pW9xY2bN"));
    }

    #[test]
    fn short_runs_and_unrelated_text_stay() {
        let key = "sk-proj-Zq8vT3mL0pW9xY2bN4cD";
        let body = "Rate limit reached: sk-proj is 7 long, Zq8vT3m is 7";
        assert_eq!(masked(body, key), body);
        assert_eq!(masked("tiny", key), "tiny");
        assert_eq!(masked(body, "short"), body);
    }

    #[test]
    fn a_key_split_across_chunks_is_still_masked() {
        let key = b"sk-live-Q1w2E3r4T5y6U7i8";
        let body =
            br#"{"error":{"message":"bad key sk-live-Q1w2E3r4T5y6U7i8 in org-AAAAAAAAAAAA"}}"#;
        let mut s = ErrorBodyScrubber::new(1024);
        let mut out = Vec::new();
        for chunk in body.chunks(5) {
            assert!(s.feed(chunk, key).is_none(), "held while small");
        }
        out.extend(s.finish(key).unwrap());
        assert_eq!(out.len(), body.len());
        let text = String::from_utf8(out).unwrap();
        assert!(!text.contains("Q1w2E3r4"), "{text}");
        assert!(text.contains("org-************"), "{text}");
    }

    #[test]
    fn a_body_over_the_limit_is_released_chunk_by_chunk_and_still_scrubbed() {
        let key = b"sk-live-Q1w2E3r4T5y6U7i8";
        let mut s = ErrorBodyScrubber::new(16);
        assert!(s.feed(b"0123456789", key).is_none());
        let first = s.feed(b" key sk-live-Q1w2E3r4T5y6U7i8 ", key).unwrap();
        assert!(first.starts_with(b"0123456789 key "));
        assert!(!String::from_utf8_lossy(&first).contains("Q1w2E3r4"));
        let next = s.feed(b"tail", key).unwrap();
        assert_eq!(next, b"tail");
        assert!(s.finish(key).is_none());
    }

    #[test]
    fn organisation_and_project_ids_lose_their_id_but_keep_their_prefix() {
        let mut b = b"Rate limit reached for gpt-4o in organization org-AbCdEf123456XyZ on requests per min; project proj_0123456789abcdef. borg-aaaaaaaaaaaa, org-short".to_vec();
        let len = b.len();
        mask_account_ids(&mut b);
        let out = String::from_utf8(b).unwrap_or_default();
        assert_eq!(out.len(), len);
        assert!(out.contains("organization org-*************** on"), "{out}");
        assert!(out.contains("project proj_****************."), "{out}");
        assert!(out.contains("borg-aaaaaaaaaaaa"), "{out}");
        assert!(out.contains("org-short"), "{out}");
    }
}
