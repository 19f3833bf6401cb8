//! The admin API's decisions, without a socket: which path and method mean what, who may ask,
//! what a body says, and the answer. The Pingora glue ([`super::app`]) only moves bytes.
//!
//! Order of checks: the token (401) before anything about the path, so that unauthenticated
//! callers learn nothing; then the path (404) and method (405); then what the token may do
//! (403); then the body (413, 400); then the named upstream and key (404).

use super::auth::{read_only, Access, AdminAuth};
use crate::keys::Secret;
use crate::local_response::LocalResponse;
use serde::Deserialize;

/// Largest request body the admin API reads.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Longest operator note on a manual disable.
pub const MAX_NOTE_CHARS: usize = 500;

/// The parts of a request the admin API looks at.
#[derive(Debug, Clone, Copy)]
pub struct AdminRequest<'a> {
    /// `GET`, `POST`, …
    pub method: &'a str,
    /// The path, without the query.
    pub path: &'a str,
    /// The `Authorization` header's value.
    pub authorization: Option<&'a [u8]>,
    /// The body (at most [`MAX_BODY_BYTES`] + 1 bytes are read; more means 413).
    pub body: &'a [u8],
}

/// What a key action does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyVerb {
    /// Take the key out until enabled.
    Disable,
    /// Put a disabled key back.
    Enable,
    /// Probe the key once now.
    Test,
}

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `GET /admin/v1/status`.
    Status,
    /// `GET /admin/v1/keys`.
    Keys,
    /// `POST /admin/v1/keys/{upstream}`: add a key at run time.
    AddKey {
        /// Upstream name.
        upstream: String,
        /// The key.
        key: AddKeyBody,
    },
    /// `DELETE /admin/v1/keys/{upstream}/{key}`: remove a key added at run time.
    RemoveKey {
        /// Upstream name.
        upstream: String,
        /// Key name.
        key: String,
    },
    /// `GET /admin/v1/rates`: requests and errors per upstream and minute.
    Rates,
    /// `POST /admin/v1/keys/{upstream}/{key}/{verb}`.
    Key {
        /// Upstream name.
        upstream: String,
        /// Key name.
        key: String,
        /// What to do.
        verb: KeyVerb,
        /// The operator's note (`{"reason": "…"}`), for a disable.
        note: Option<String>,
    },
}

/// The body of `POST /admin/v1/keys/{upstream}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddKeyBody {
    /// The key's name.
    pub name: String,
    /// Its secret (only ever in a body, never in a URL).
    pub secret: Secret,
    /// Its account, if any.
    #[serde(default)]
    pub account: Option<String>,
    /// Its weight (default 1).
    #[serde(default)]
    pub weight: Option<u32>,
}

impl PartialEq for AddKeyBody {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
            && self.secret.expose() == other.secret.expose()
            && self.account == other.account
            && self.weight == other.weight
    }
}

impl Eq for AddKeyBody {}

/// The optional body of a key action.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionBody {
    reason: Option<String>,
}

/// The action `req` asks for, or the error to answer.
pub fn parse(auth: &AdminAuth, req: &AdminRequest<'_>) -> Result<Action, LocalResponse> {
    let access = auth.check(req.authorization)?;
    let rest = req
        .path
        .strip_prefix("/admin/v1/")
        .ok_or_else(|| not_found(req.path))?;
    let segments: Vec<&str> = rest.split('/').collect();
    let (action_method, action) = match segments.as_slice() {
        ["status"] => ("GET", Action::Status),
        ["keys"] => ("GET", Action::Keys),
        ["keys", upstream] => {
            let upstream = percent_decode(upstream).ok_or_else(|| not_found(req.path))?;
            let key = AddKeyBody {
                name: String::new(),
                secret: Secret::new(""),
                account: None,
                weight: None,
            };
            ("POST", Action::AddKey { upstream, key })
        }
        ["keys", upstream, key] => {
            let (Some(upstream), Some(key)) = (percent_decode(upstream), percent_decode(key))
            else {
                return Err(not_found(req.path));
            };
            ("DELETE", Action::RemoveKey { upstream, key })
        }
        ["rates"] => ("GET", Action::Rates),
        ["keys", upstream, key, verb] => {
            let verb = match *verb {
                "disable" => KeyVerb::Disable,
                "enable" => KeyVerb::Enable,
                "test" => KeyVerb::Test,
                _ => return Err(not_found(req.path)),
            };
            let (Some(upstream), Some(key)) = (percent_decode(upstream), percent_decode(key))
            else {
                return Err(not_found(req.path));
            };
            (
                "POST",
                Action::Key {
                    upstream,
                    key,
                    verb,
                    note: None,
                },
            )
        }
        _ => return Err(not_found(req.path)),
    };
    if req.method != action_method {
        return Err(LocalResponse::new(
            405,
            "invalid_request_error",
            "method_not_allowed",
            format!("{} takes {action_method} only", req.path),
        ));
    }
    if action_method != "GET" && access != Access::Admin {
        return Err(read_only());
    }
    if req.body.len() > MAX_BODY_BYTES {
        return Err(too_large());
    }
    match action {
        Action::Key {
            upstream,
            key,
            verb,
            ..
        } => {
            let note = note(req.body)?;
            Ok(Action::Key {
                upstream,
                key,
                verb,
                note,
            })
        }
        Action::AddKey { upstream, .. } => Ok(Action::AddKey {
            upstream,
            key: add_key_body(req.body)?,
        }),
        other => Ok(other),
    }
}

/// The `reason` of an action's JSON body; an empty body has none.
fn note(body: &[u8]) -> Result<Option<String>, LocalResponse> {
    if body.trim_ascii().is_empty() {
        return Ok(None);
    }
    let parsed: ActionBody = serde_json::from_slice(body).map_err(|e| {
        LocalResponse::bad_request(format!(
            "the body must be a JSON object like {{\"reason\": \"text\"}}: {e}"
        ))
    })?;
    match parsed.reason {
        Some(r) if r.chars().count() > MAX_NOTE_CHARS => Err(LocalResponse::bad_request(format!(
            "reason is longer than {MAX_NOTE_CHARS} characters"
        ))),
        Some(r) if r.chars().any(char::is_control) => Err(LocalResponse::bad_request(
            "reason must not contain control characters",
        )),
        other => Ok(other),
    }
}

/// The key in an add request's body. serde's own message is not passed on: it can quote a
/// value, and a secret put in the wrong field must not come back in an answer.
fn add_key_body(body: &[u8]) -> Result<AddKeyBody, LocalResponse> {
    serde_json::from_slice(body).map_err(|e| {
        let what = match e.classify() {
            serde_json::error::Category::Data => "a field is missing, unknown or of the wrong type",
            _ => "not valid JSON",
        };
        LocalResponse::bad_request(format!(
            "the body must be a JSON object {{\"name\", \"secret\", \"account\"?, \"weight\"?}}: {what} (line {}, column {})",
            e.line(),
            e.column()
        ))
    })
}

/// `%XX` sequences decoded; `None` if malformed or not UTF-8.
fn percent_decode(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok().filter(|s| !s.is_empty())
}

/// 404 for a path the admin API does not serve.
pub fn not_found(path: &str) -> LocalResponse {
    let shown: String = path.chars().take(200).collect();
    LocalResponse::new(
        404,
        "invalid_request_error",
        "not_found",
        format!(
            "no admin endpoint at {shown:?}: see /admin/v1/status, /admin/v1/keys, /admin/v1/rates"
        ),
    )
}

/// 404 for an unknown upstream or key.
pub fn unknown_key(upstream: &str, key: Option<&str>) -> LocalResponse {
    let message = match key {
        None => format!("no upstream named {upstream:?}"),
        Some(k) => format!("upstream {upstream:?} has no key named {k:?}"),
    };
    LocalResponse::new(404, "invalid_request_error", "key_not_found", message)
}

/// 413 for a body over [`MAX_BODY_BYTES`].
pub fn too_large() -> LocalResponse {
    LocalResponse::new(
        413,
        "invalid_request_error",
        "request_too_large",
        format!("admin request bodies are limited to {MAX_BODY_BYTES} bytes"),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::clients::digest;

    fn auth() -> AdminAuth {
        AdminAuth::new(Some(digest(b"adm")), Some(digest(b"rd")))
    }

    fn req<'a>(method: &'a str, path: &'a str, token: &'a str, body: &'a [u8]) -> AdminRequest<'a> {
        AdminRequest {
            method,
            path,
            authorization: Some(token.as_bytes()),
            body,
        }
    }

    fn status_of(r: Result<Action, LocalResponse>) -> u16 {
        r.map_or_else(|e| e.status, |_| 200)
    }

    #[test]
    fn paths_map_to_actions() {
        let a = auth();
        assert_eq!(
            parse(&a, &req("GET", "/admin/v1/status", "Bearer rd", b"")).unwrap(),
            Action::Status
        );
        assert_eq!(
            parse(&a, &req("GET", "/admin/v1/keys", "Bearer rd", b"")).unwrap(),
            Action::Keys
        );
        assert_eq!(
            parse(&a, &req("GET", "/admin/v1/rates", "Bearer rd", b"")).unwrap(),
            Action::Rates
        );
        assert_eq!(
            parse(
                &a,
                &req(
                    "POST",
                    "/admin/v1/keys/open%20ai/k%2F1/disable",
                    "Bearer adm",
                    br#"{"reason":"rotating"}"#
                )
            )
            .unwrap(),
            Action::Key {
                upstream: "open ai".into(),
                key: "k/1".into(),
                verb: KeyVerb::Disable,
                note: Some("rotating".into())
            }
        );
        for (verb, want) in [("enable", KeyVerb::Enable), ("test", KeyVerb::Test)] {
            let path = format!("/admin/v1/keys/u/k/{verb}");
            match parse(&a, &req("POST", &path, "Bearer adm", b"")).unwrap() {
                Action::Key { verb, note, .. } => assert_eq!((verb, note), (want, None)),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn adding_and_removing_keys_map_to_their_actions() {
        let a = auth();
        let body = br#"{"name":"k4","secret":"sk-4","weight":2}"#;
        match parse(
            &a,
            &req("POST", "/admin/v1/keys/open%20ai", "Bearer adm", body),
        )
        .unwrap()
        {
            Action::AddKey { upstream, key } => {
                assert_eq!(upstream, "open ai");
                assert_eq!((key.name.as_str(), key.secret.expose()), ("k4", "sk-4"));
                assert_eq!((key.account, key.weight), (None, Some(2)));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            parse(
                &a,
                &req("DELETE", "/admin/v1/keys/u/k%2F1", "Bearer adm", b"")
            )
            .unwrap(),
            Action::RemoveKey {
                upstream: "u".into(),
                key: "k/1".into()
            }
        );
        let statuses = [
            ("GET", "/admin/v1/keys/u", 405),
            ("DELETE", "/admin/v1/keys/u", 405),
            ("POST", "/admin/v1/keys/u/k", 405),
            ("DELETE", "/admin/v1/keys/u/k", 200),
        ];
        for (method, path, want) in statuses {
            let body: &[u8] = if method == "POST" { body } else { b"" };
            assert_eq!(
                status_of(parse(&a, &req(method, path, "Bearer adm", body))),
                want,
                "{method} {path}"
            );
        }
        let big = vec![b' '; MAX_BODY_BYTES + 1];
        assert_eq!(
            status_of(parse(
                &a,
                &req("POST", "/admin/v1/keys/u", "Bearer adm", &big)
            )),
            413
        );
    }

    #[test]
    fn the_token_is_checked_before_the_path() {
        let a = auth();
        assert_eq!(
            status_of(parse(&a, &req("GET", "/nope", "Bearer x", b""))),
            401
        );
        let none = AdminRequest {
            authorization: None,
            ..req("GET", "/admin/v1/status", "", b"")
        };
        assert_eq!(status_of(parse(&a, &none)), 401);
    }

    #[test]
    fn bad_paths_methods_and_bodies_get_their_4xx() {
        let a = auth();
        let cases: [(&str, &str, &str, &[u8], u16); 13] = [
            ("POST", "/admin/v1/rates", "Bearer adm", b"", 405),
            ("GET", "/admin/v1/rates/openai", "Bearer adm", b"", 404),
            ("GET", "/admin/v1/nope", "Bearer adm", b"", 404),
            ("GET", "/admin/v2/status", "Bearer adm", b"", 404),
            ("GET", "/admin/v1/status/", "Bearer adm", b"", 404),
            ("POST", "/admin/v1/keys/u/k/explode", "Bearer adm", b"", 404),
            (
                "POST",
                "/admin/v1/keys/u/%zz/enable",
                "Bearer adm",
                b"",
                404,
            ),
            ("POST", "/admin/v1/status", "Bearer adm", b"", 405),
            ("GET", "/admin/v1/keys/u/k/disable", "Bearer adm", b"", 405),
            ("POST", "/admin/v1/keys/u/k/disable", "Bearer rd", b"", 403),
            (
                "POST",
                "/admin/v1/keys/u/k/disable",
                "Bearer adm",
                b"{nope",
                400,
            ),
            (
                "POST",
                "/admin/v1/keys/u/k/disable",
                "Bearer adm",
                br#"{"why":"x"}"#,
                400,
            ),
            (
                "POST",
                "/admin/v1/keys/u/k/disable",
                "Bearer adm",
                br#"{"reason":"a\nb"}"#,
                400,
            ),
        ];
        for (method, path, token, body, want) in cases {
            assert_eq!(
                status_of(parse(&a, &req(method, path, token, body))),
                want,
                "{method} {path} {token}"
            );
        }
        let big = vec![b' '; MAX_BODY_BYTES + 1];
        assert_eq!(
            status_of(parse(
                &a,
                &req("POST", "/admin/v1/keys/u/k/disable", "Bearer adm", &big)
            )),
            413
        );
        let long = format!("{{\"reason\":\"{}\"}}", "x".repeat(MAX_NOTE_CHARS + 1));
        assert_eq!(
            status_of(parse(
                &a,
                &req(
                    "POST",
                    "/admin/v1/keys/u/k/disable",
                    "Bearer adm",
                    long.as_bytes()
                )
            )),
            400
        );
    }

    #[test]
    fn errors_are_openai_shaped() {
        let e = not_found("/x");
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(v["error"]["code"], "not_found");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"]["message"].as_str().unwrap().contains("/x"));
        assert_eq!(unknown_key("u", Some("k")).status, 404);
        assert_eq!(too_large().status, 413);
    }
}
