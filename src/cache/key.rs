//! The cache key: a SHA-256 of the canonical request.
//!
//! The canonical request is the JSON body with its object keys sorted and no insignificant
//! whitespace, without the top-level fields of [`IGNORED_FIELDS`], plus the method, the path
//! (with its query), the route, the model sent upstream (after an alias rewrite), the client
//! (unless the route shares its entries) and the answer's [`Variant`]. Each part goes into the
//! hash with its length first, so no two different requests can run together into the same
//! bytes.

use serde_json::Value;
use sha2::{Digest, Sha256};
use std::io::Write;

/// Top-level body fields that cannot change the answer and so are left out of the key:
/// `stream` (the [`Variant`] says what shape the answer takes instead), `stream_options` (the
/// same), `user` (an end-user id for abuse tracking), `prompt_cache_key` (a hint to the
/// provider's own prompt cache) and `metadata` (stored completions' tags).
pub const IGNORED_FIELDS: &[&str] = &[
    "stream",
    "stream_options",
    "user",
    "prompt_cache_key",
    "metadata",
];

/// The shape of an answer as the client receives it: a stream and a plain answer are separate
/// entries (converting one into the other is not exact), and so are a stream with and without
/// its usage chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Variant {
    /// One JSON body.
    Plain,
    /// Server-sent events without a usage chunk.
    Events,
    /// Server-sent events ending with a usage chunk (`stream_options.include_usage`).
    EventsWithUsage,
}

impl Variant {
    /// Its tag in the key.
    fn tag(self) -> &'static [u8] {
        match self {
            Variant::Plain => b"plain",
            Variant::Events => b"events",
            Variant::EventsWithUsage => b"events+usage",
        }
    }
}

/// A cache key: the SHA-256 of a canonical request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey(pub [u8; 32]);

/// Everything besides the body that decides which entry answers a request.
#[derive(Debug, Clone, Copy)]
pub struct KeyParts<'a> {
    /// HTTP method.
    pub method: &'a str,
    /// Path with its query string.
    pub path: &'a str,
    /// The route's name.
    pub route: &'a str,
    /// The model sent upstream (after an alias rewrite), if any.
    pub model: Option<&'a str>,
    /// The client's name; `None` when the route shares entries between clients.
    pub client: Option<&'a str>,
    /// The answer's shape.
    pub variant: Variant,
}

/// The key of a request with these parts and this JSON body (`None` without a body).
pub fn key(parts: &KeyParts<'_>, body: Option<&Value>) -> CacheKey {
    let mut h = Sha256::new();
    // A version tag: a change of the canonical form must never meet entries of the old one.
    field(&mut h, b"keygate-cache-v1");
    field(&mut h, parts.method.as_bytes());
    field(&mut h, parts.path.as_bytes());
    field(&mut h, parts.route.as_bytes());
    optional(&mut h, parts.model.map(str::as_bytes));
    optional(&mut h, parts.client.map(str::as_bytes));
    field(&mut h, parts.variant.tag());
    optional(&mut h, body.map(canonical_body).as_deref());
    CacheKey(h.finalize().into())
}

fn field(h: &mut Sha256, bytes: &[u8]) {
    h.update((bytes.len() as u64).to_le_bytes());
    h.update(bytes);
}

fn optional(h: &mut Sha256, bytes: Option<&[u8]>) {
    match bytes {
        None => h.update([0u8]),
        Some(b) => {
            h.update([1u8]);
            field(h, b);
        }
    }
}

/// The body in canonical form, without the [`IGNORED_FIELDS`] at its top level.
pub fn canonical_body(body: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    match body {
        Value::Object(map) => {
            let mut fields: Vec<(&String, &Value)> = map
                .iter()
                .filter(|(k, _)| !IGNORED_FIELDS.contains(&k.as_str()))
                .collect();
            fields.sort_by(|a, b| a.0.cmp(b.0));
            write_object(&mut out, fields);
        }
        other => write_value(&mut out, other),
    }
    out
}

/// Writes `v` with object keys sorted and no whitespace.
fn write_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Object(map) => {
            let mut fields: Vec<(&String, &Value)> = map.iter().collect();
            // Sorted here whatever order the map keeps (serde_json's `preserve_order` feature
            // may be switched on by another crate of the build).
            fields.sort_by(|a, b| a.0.cmp(b.0));
            write_object(out, fields);
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(out, item);
            }
            out.push(b']');
        }
        // Scalars print compactly; writing into a Vec cannot fail.
        scalar => {
            let _ = serde_json::to_writer(&mut *out, scalar);
        }
    }
}

fn write_object(out: &mut Vec<u8>, fields: Vec<(&String, &Value)>) {
    out.push(b'{');
    for (i, (k, v)) in fields.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let _ = serde_json::to_writer(&mut *out, k);
        let _ = out.write_all(b":");
        write_value(out, v);
    }
    out.push(b'}');
}

/// Whether a request's answer is reproducible: `temperature: 0` or a `seed`, or an embedding
/// (which has no sampling at all).
pub fn is_deterministic(path: &str, body: Option<&Value>) -> bool {
    if path.trim_end_matches('/').ends_with("/embeddings") {
        return true;
    }
    let Some(body) = body else {
        return false;
    };
    let zero_temperature = body
        .get("temperature")
        .and_then(Value::as_f64)
        .is_some_and(|t| t == 0.0);
    let seeded = body.get("seed").is_some_and(|s| !s.is_null());
    zero_temperature || seeded
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn parts() -> KeyParts<'static> {
        KeyParts {
            method: "POST",
            path: "/v1/chat/completions",
            route: "chat",
            model: Some("gpt-4o"),
            client: Some("team"),
            variant: Variant::Plain,
        }
    }

    fn key_of(text: &str) -> CacheKey {
        key(&parts(), Some(&serde_json::from_str(text).unwrap()))
    }

    #[test]
    fn the_canonical_body_sorts_keys_drops_whitespace_and_ignored_fields() {
        let body = json!({"stream": true, "model": "m", "user": "u", "b": {"z": 1, "a": [2, {"y": null, "x": "s"}]}});
        assert_eq!(
            String::from_utf8(canonical_body(&body)).unwrap(),
            r#"{"b":{"a":[2,{"x":"s","y":null}],"z":1},"model":"m"}"#
        );
    }

    #[test]
    fn field_order_and_whitespace_do_not_change_the_key() {
        let a = key_of(
            r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"temperature":0}"#,
        );
        let b = key_of(
            "{ \"temperature\" : 0,\n \"messages\": [ {\"content\": \"hi\", \"role\": \"user\"} ],\t\"model\": \"gpt-4o\" }",
        );
        assert_eq!(a, b);
    }

    #[test]
    fn ignored_fields_do_not_change_the_key_but_others_do() {
        let base = key_of(r#"{"model":"m","messages":[]}"#);
        let ignored = key_of(
            r#"{"model":"m","messages":[],"stream":true,"stream_options":{"include_usage":true},"user":"u1","prompt_cache_key":"k","metadata":{"a":"b"}}"#,
        );
        assert_eq!(base, ignored);
        assert_ne!(base, key_of(r#"{"model":"m","messages":[],"n":2}"#));
        // Ignored only at the top level: inside a message a `user` field is content.
        assert_ne!(
            key_of(r#"{"model":"m","messages":[{"user":"x"}]}"#),
            key_of(r#"{"model":"m","messages":[{}]}"#)
        );
    }

    #[test]
    fn every_part_besides_the_body_changes_the_key() {
        let body = json!({"model": "m"});
        let base = key(&parts(), Some(&body));
        let variants = [
            KeyParts {
                method: "GET",
                ..parts()
            },
            KeyParts {
                path: "/v1/embeddings",
                ..parts()
            },
            KeyParts {
                route: "other",
                ..parts()
            },
            KeyParts {
                model: Some("gpt-4o-mini"),
                ..parts()
            },
            KeyParts {
                model: None,
                ..parts()
            },
            KeyParts {
                client: Some("other-team"),
                ..parts()
            },
            KeyParts {
                client: None,
                ..parts()
            },
            KeyParts {
                variant: Variant::Events,
                ..parts()
            },
            KeyParts {
                variant: Variant::EventsWithUsage,
                ..parts()
            },
        ];
        for p in variants {
            assert_ne!(key(&p, Some(&body)), base, "{p:?}");
        }
        assert_ne!(key(&parts(), None), base);
    }

    #[test]
    fn determinism_needs_temperature_zero_or_a_seed_except_for_embeddings() {
        let det = |path: &str, v: Value| is_deterministic(path, Some(&v));
        let chat = "/v1/chat/completions";
        assert!(det(chat, json!({"temperature": 0})));
        assert!(det(chat, json!({"temperature": 0.0})));
        assert!(det(chat, json!({"seed": 7, "temperature": 1})));
        assert!(!det(chat, json!({"temperature": 0.2})));
        assert!(!det(chat, json!({})));
        assert!(!det(chat, json!({"seed": null})));
        assert!(det("/v1/embeddings", json!({"input": "x"})));
        assert!(!is_deterministic(chat, None));
    }

    /// A JSON value of bounded depth and size.
    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i32>().prop_map(|n| json!(n)),
            "[a-z ]{0,6}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map("[a-e]{1,2}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// A request body: an object of non-ignored fields.
    fn body() -> impl Strategy<Value = Vec<(String, Value)>> {
        prop::collection::btree_map("[a-h]{1,3}", json_value(), 1..6)
            .prop_map(|m| m.into_iter().collect())
    }

    /// `fields` as JSON text in the given key order, with whitespace after `:` and `,` when
    /// `spaced`.
    fn render(fields: &[(String, Value)], order: &[usize], spaced: bool) -> String {
        let sep = if spaced { ",\n  " } else { "," };
        let colon = if spaced { " : " } else { ":" };
        let inner: Vec<String> = order
            .iter()
            .map(|&i| {
                let (k, v) = &fields[i];
                format!(
                    "{}{colon}{}",
                    serde_json::to_string(k).unwrap(),
                    if spaced {
                        serde_json::to_string_pretty(v).unwrap()
                    } else {
                        v.to_string()
                    }
                )
            })
            .collect();
        format!("{{ {} }}", inner.join(sep))
    }

    proptest! {
        #[test]
        fn the_key_ignores_field_order_and_whitespace(
            fields in body(),
            seed in any::<u64>(),
        ) {
            let mut order: Vec<usize> = (0..fields.len()).collect();
            // A deterministic shuffle from the seed.
            let mut s = seed;
            for i in (1..order.len()).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                order.swap(i, (s >> 33) as usize % (i + 1));
            }
            let straight: Vec<usize> = (0..fields.len()).collect();
            let a = key_of(&render(&fields, &straight, false));
            let b = key_of(&render(&fields, &order, true));
            prop_assert_eq!(a, b);
        }

        #[test]
        fn changing_any_field_value_changes_the_key(
            fields in body(),
            pick in any::<prop::sample::Index>(),
            replacement in json_value(),
        ) {
            let i = pick.index(fields.len());
            prop_assume!(fields[i].1 != replacement);
            let order: Vec<usize> = (0..fields.len()).collect();
            let mut changed = fields.clone();
            changed[i].1 = replacement;
            prop_assert_ne!(
                key_of(&render(&fields, &order, false)),
                key_of(&render(&changed, &order, false))
            );
        }
    }
}
