//! The JSON request-body scanner and its rewrites. On any bytes `scan_json` answers without
//! panicking; on a body that `serde_json` reads as an object it agrees with `serde_json` about
//! every field it reports, and refuses only for a reason of its own (a type or a duplicate key,
//! never "not JSON"); a rewritten body scans again with the new value and, when the original was
//! valid JSON, is valid JSON that differs from it only where the rewrite said.
//!
//! Input: the body.

use keygate::request_body::{scan_json, BodyError, BodyInfo};
use serde_json::{Map, Value};

use crate::alloc_count::assert_peak_below;

use super::memory_bound;

/// The model the rewrite puts in: quotes, a backslash, a control character, non-ASCII and a
/// JavaScript line separator, all of which must come out escaped or as they are.
const NEW_MODEL: &str = "gpt-4o \"mini\" \\ \u{1} é \u{2028}";

/// Checks one input; see the module doc.
pub fn run(body: &[u8]) {
    let limit = memory_bound(1 << 20, 16, body.len());
    let scanned = assert_peak_below("scan_json", limit, || scan_json(body));
    let reference = serde_json::from_slice::<Value>(body).ok();
    let object = match &reference {
        Some(Value::Object(object)) => Some(object),
        _ => None,
    };
    let info = match scanned {
        Ok(info) => info,
        Err(err) => {
            if object.is_some() {
                assert!(
                    !matches!(err, BodyError::NotJson { .. } | BodyError::NotObject),
                    "serde_json reads an object, scan_json says {err:?}"
                );
            }
            return;
        }
    };
    if let Some(object) = object {
        agrees_with_serde(&info, object);
    }
    check_affinity(&info, body, object);
    check_model_rewrite(&info, body, object);
    check_usage_injection(&info, body, object);
}

/// The fields `scan_json` reports, as `serde_json` reads them.
fn agrees_with_serde(info: &BodyInfo, object: &Map<String, Value>) {
    let model = object.get("model").and_then(Value::as_str);
    assert_eq!(info.model.as_deref(), model, "model");
    assert_eq!(
        info.stream,
        object.get("stream") == Some(&Value::Bool(true))
    );
    let include_usage = object
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        == Some(&Value::Bool(true));
    assert_eq!(info.include_usage, include_usage, "include_usage");
    let max_tokens = ["max_completion_tokens", "max_output_tokens", "max_tokens"]
        .iter()
        .filter_map(|key| object.get(*key))
        .find(|v| !v.is_null())
        .map(|v| {
            v.as_u64()
                .expect("scan_json accepted a limit that is no u64")
        });
    assert_eq!(info.max_tokens, max_tokens, "max_tokens");
}

fn check_affinity(info: &BodyInfo, body: &[u8], object: Option<&Map<String, Value>>) {
    let hash = info.affinity(body);
    assert_eq!(info.affinity(body), hash, "affinity hash is deterministic");
    let prompt_field = ["system", "instructions", "messages", "input"]
        .iter()
        .any(|k| object.is_some_and(|o| o.contains_key(*k)));
    if prompt_field {
        assert!(
            hash.is_some(),
            "a body with a prompt field has an affinity hash"
        );
    }
    // Neither rewrite touches what the hash reads.
    let rewritten = info.rewrite_model(body, NEW_MODEL);
    let again = scan_json(&rewritten).expect("a rewritten body scans");
    assert_eq!(
        again.affinity(&rewritten),
        hash,
        "affinity after a model rewrite"
    );
    let injected = info.inject_include_usage(body);
    let again = scan_json(&injected).expect("a body with include_usage added scans");
    assert_eq!(
        again.affinity(&injected),
        hash,
        "affinity after usage injection"
    );
}

fn check_model_rewrite(info: &BodyInfo, body: &[u8], object: Option<&Map<String, Value>>) {
    let rewritten = info.rewrite_model(body, NEW_MODEL);
    let again = scan_json(&rewritten).expect("a rewritten body scans");
    assert_eq!(again.model.as_deref(), Some(NEW_MODEL));
    assert_eq!(
        (again.stream, again.max_tokens, again.include_usage),
        (info.stream, info.max_tokens, info.include_usage)
    );
    if let Some(object) = object {
        let mut expected = object.clone();
        expected.insert("model".into(), Value::String(NEW_MODEL.into()));
        assert_eq!(parse_object(&rewritten), expected, "model rewrite");
    }
}

fn check_usage_injection(info: &BodyInfo, body: &[u8], object: Option<&Map<String, Value>>) {
    let injected = info.inject_include_usage(body);
    let again = scan_json(&injected).expect("a body with include_usage added scans");
    assert!(again.include_usage);
    assert_eq!(
        (again.model.as_deref(), again.stream, again.max_tokens),
        (info.model.as_deref(), info.stream, info.max_tokens)
    );
    if let Some(object) = object {
        let mut expected = object.clone();
        let options = match expected.remove("stream_options") {
            Some(Value::Object(mut options)) => {
                options.insert("include_usage".into(), Value::Bool(true));
                options
            }
            _ => Map::from_iter([("include_usage".to_string(), Value::Bool(true))]),
        };
        expected.insert("stream_options".into(), Value::Object(options));
        assert_eq!(parse_object(&injected), expected, "include_usage injection");
    }
}

/// `bytes` as a JSON object; panics when it is not valid JSON or not an object.
fn parse_object(bytes: &[u8]) -> Map<String, Value> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(object)) => object,
        other => panic!(
            "a rewrite of valid JSON is not a JSON object ({other:?}): {}",
            String::from_utf8_lossy(bytes)
        ),
    }
}
