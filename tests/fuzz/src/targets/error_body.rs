//! The error-body reader: the `code` and `type` of an OpenAI-style error, whom a refusal
//! blames, and the quota code of a 429. Any body answers without panicking; a body over the
//! size cap is not read; what is read is what `serde_json` finds there.
//!
//! Input: the body.

use keygate::error_body::{refusal, ErrorCodes, MAX_ERROR_BODY};
use keygate::retry_after::quota_error_code;
use serde_json::Value;

use crate::alloc_count::assert_peak_below;

use super::memory_bound;

/// Checks one input; see the module doc.
pub fn run(body: &[u8]) {
    let limit = memory_bound(1 << 20, 16, body.len());
    let codes = assert_peak_below("error body", limit, || {
        refusal(body);
        quota_error_code(body);
        ErrorCodes::of(body)
    });
    if body.len() > MAX_ERROR_BODY {
        assert_eq!(codes, ErrorCodes::default(), "a body over the cap was read");
        return;
    }
    if let Ok(Value::Object(top)) = serde_json::from_slice::<Value>(body) {
        let error = top.get("error");
        let field = |name: &str| error.and_then(|e| e.get(name)).and_then(Value::as_str);
        if let Some(code) = &codes.code {
            assert_eq!(Some(code.as_str()), field("code"), "error.code");
        }
        if let Some(kind) = &codes.kind {
            assert_eq!(Some(kind.as_str()), field("type"), "error.type");
        }
    }
}
