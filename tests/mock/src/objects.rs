//! Account-scoped objects, as OpenAI keeps them: a file uploaded or a batch created belongs to
//! the account of the key that made it; another account's key gets 404 for it. Accounts come
//! from `--account SECRET=ACCOUNT` (a key without one is its own account).

use crate::body::MockBody;
use crate::openai;
use crate::reply;
use http::{Method, Response, StatusCode};
use parking_lot::Mutex;
use serde_json::json;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

/// The objects made so far and the keys' accounts.
#[derive(Debug, Default)]
pub struct Objects {
    accounts: HashMap<String, String>,
    /// Object id → (account, JSON).
    made: Mutex<HashMap<String, (String, serde_json::Value)>>,
    next: AtomicU64,
}

impl Objects {
    /// Objects of keys in these accounts.
    pub fn new(accounts: Vec<(String, String)>) -> Self {
        Self {
            accounts: accounts.into_iter().collect(),
            ..Self::default()
        }
    }

    fn account_of<'a>(&'a self, key: &'a str) -> &'a str {
        self.accounts.get(key).map_or(key, String::as_str)
    }

    fn make(&self, prefix: &str, account: &str, object: serde_json::Value) -> serde_json::Value {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let id = format!("{prefix}{n:06}mock");
        let mut object = object;
        object["id"] = json!(id);
        self.made
            .lock()
            .insert(id, (account.to_string(), object.clone()));
        object
    }

    fn not_found(kind: &str, id: &str) -> Response<MockBody> {
        let message = format!("No such {kind} object: {id}");
        reply::json(
            StatusCode::NOT_FOUND,
            openai::error(&message, "invalid_request_error", None, None),
        )
    }

    /// Whether `account` may see `id`; `None` if no such object was made.
    fn owns(&self, account: &str, id: &str) -> Option<bool> {
        self.made.lock().get(id).map(|(a, _)| a == account)
    }

    /// The answer to an object request (`/v1/files`, `/v1/batches`), or `None` for other paths.
    pub fn answer(
        &self,
        method: &Method,
        path: &str,
        body: &[u8],
        key: &str,
    ) -> Option<Response<MockBody>> {
        let account = self.account_of(key);
        let path = path.trim_end_matches('/');
        let (kind, prefix, rest) = if let Some(rest) = path.strip_prefix("/v1/files") {
            ("File", "file-", rest)
        } else if let Some(rest) = path.strip_prefix("/v1/batches") {
            ("Batch", "batch_", rest)
        } else {
            return None;
        };
        let id = rest
            .strip_prefix('/')
            .map(|r| r.split('/').next().unwrap_or(""));
        Some(match (method.as_str(), id) {
            ("POST", None) if prefix == "file-" => {
                let file = json!({"object": "file", "bytes": body.len(), "purpose": "batch",
                    "filename": "input.jsonl", "status": "processed"});
                reply::json(StatusCode::OK, self.make(prefix, account, file).to_string())
            }
            ("POST", None) => {
                let input: Option<String> = serde_json::from_slice::<serde_json::Value>(body)
                    .ok()
                    .and_then(|v| v["input_file_id"].as_str().map(str::to_string));
                let Some(input) = input else {
                    let e = openai::error(
                        "input_file_id is required",
                        "invalid_request_error",
                        None,
                        None,
                    );
                    return Some(reply::json(StatusCode::BAD_REQUEST, e));
                };
                if self.owns(account, &input) != Some(true) {
                    return Some(Self::not_found("File", &input));
                }
                let batch =
                    json!({"object": "batch", "input_file_id": input, "status": "validating"});
                reply::json(
                    StatusCode::OK,
                    self.make(prefix, account, batch).to_string(),
                )
            }
            ("GET", None) => {
                let made = self.made.lock();
                let data: Vec<&serde_json::Value> = made
                    .iter()
                    .filter(|(id, (a, _))| id.starts_with(prefix) && a == account)
                    .map(|(_, (_, o))| o)
                    .collect();
                reply::json(
                    StatusCode::OK,
                    json!({"object": "list", "data": data}).to_string(),
                )
            }
            ("GET", Some(id)) => match self.made.lock().get(id) {
                Some((a, o)) if a == account => reply::json(StatusCode::OK, o.to_string()),
                _ => Self::not_found(kind, id),
            },
            _ => Self::not_found(kind, path),
        })
    }

    /// The first object a generation request names (`"file-…"` anywhere in its body) that the
    /// key's account does not own: such a request gets 404, as from OpenAI.
    pub fn foreign(&self, key: &str, body: &[u8]) -> Option<Response<MockBody>> {
        let account = self.account_of(key);
        let text = std::str::from_utf8(body).ok()?;
        let mut rest = text;
        while let Some(at) = rest.find("\"file-") {
            let tail = &rest[at + 1..];
            let end = tail.find('"')?;
            let id = &tail[..end];
            if self.owns(account, id) == Some(false) {
                return Some(Self::not_found("File", id));
            }
            rest = &tail[end..];
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(r: Option<Response<MockBody>>) -> u16 {
        r.map_or(0, |r| r.status().as_u16())
    }

    #[test]
    fn objects_belong_to_the_account_of_the_key_that_made_them() {
        let o = Objects::new(vec![
            ("sk-a".into(), "org1".into()),
            ("sk-b".into(), "org1".into()),
        ]);
        assert!(o
            .answer(&Method::POST, "/v1/chat/completions", b"", "sk-a")
            .is_none());
        let made = o.answer(&Method::POST, "/v1/files", b"x", "sk-a");
        assert_eq!(status(made), 200);
        let id = o.made.lock().keys().next().cloned().unwrap_or_default();
        assert!(id.starts_with("file-"), "{id}");
        let path = format!("/v1/files/{id}");
        assert_eq!(
            status(o.answer(&Method::GET, &path, b"", "sk-b")),
            200,
            "same account"
        );
        assert_eq!(
            status(o.answer(&Method::GET, &path, b"", "sk-c")),
            404,
            "another account"
        );
        let batch = format!(r#"{{"input_file_id":"{id}"}}"#);
        assert_eq!(
            status(o.answer(&Method::POST, "/v1/batches", batch.as_bytes(), "sk-c")),
            404
        );
        assert_eq!(
            status(o.answer(&Method::POST, "/v1/batches", batch.as_bytes(), "sk-b")),
            200
        );
        let chat = format!(
            r#"{{"messages":[{{"content":[{{"type":"file","file":{{"file_id":"{id}"}}}}]}}]}}"#
        );
        assert_eq!(status(o.foreign("sk-c", chat.as_bytes())), 404);
        assert_eq!(status(o.foreign("sk-a", chat.as_bytes())), 0);
    }
}
