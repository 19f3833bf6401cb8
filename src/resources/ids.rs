//! What an account-scoped object's id looks like, and where requests name one: path segments,
//! string values in a JSON body, and `ft:` model names.
//!
//! Recognised by prefix, as OpenAI mints them: `file-`, `upload_`, `batch_`, `vs_`, `asst_`,
//! `thread_`, `resp_`, `ftjob-` and fine-tuned models `ft:…`. Objects without account scope
//! (messages, runs inside a thread, chat completions) need none: their thread or file carries it.

use memchr::memchr;

/// Id prefixes of objects that belong to the account that created them.
pub const PREFIXES: [&str; 9] = [
    "file-", "upload_", "batch_", "vs_", "asst_", "thread_", "resp_", "ftjob-", "ft:",
];

/// Longest id considered (OpenAI's are under 64 characters; `ft:` names under 128).
pub const MAX_ID_LEN: usize = 160;

/// Most ids read from one request: a body naming more than this is scanned no further.
pub const MAX_IDS: usize = 32;

/// API paths whose answers create account-scoped objects (on `POST`), or name fine-tuned
/// models (any method under `/v1/fine_tuning`).
const OBJECT_PATHS: [&str; 8] = [
    "/v1/files",
    "/v1/uploads",
    "/v1/batches",
    "/v1/vector_stores",
    "/v1/assistants",
    "/v1/threads",
    "/v1/responses",
    "/v1/fine_tuning",
];

/// Listing endpoints: answered from the account the client last used.
const LISTINGS: [&str; 5] = [
    "/v1/files",
    "/v1/batches",
    "/v1/vector_stores",
    "/v1/assistants",
    "/v1/fine_tuning/jobs",
];

/// Whether `s` has the shape of an account-scoped id.
pub fn looks_like_id(s: &str) -> bool {
    s.len() <= MAX_ID_LEN
        && PREFIXES
            .iter()
            .any(|p| s.len() > p.len() && s.starts_with(p))
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b':' | b'.'))
}

/// The path segments of `path` that look like ids.
pub fn in_path(path: &str) -> impl Iterator<Item = &str> {
    path.split('/').filter(|s| looks_like_id(s)).take(MAX_IDS)
}

/// The string values in `body` that look like ids, in order, at most [`MAX_IDS`]. A scan of
/// the JSON strings (no parse): each string runs to its first unescaped quote, and only a whole
/// string counts (an id inside a sentence does not).
pub fn in_body(body: &[u8]) -> Vec<&str> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(open) = memchr(b'"', &body[at..]).map(|i| at + i) {
        let Some(close) = string_end(body, open + 1) else {
            break;
        };
        let raw = &body[open + 1..close];
        // Most strings are not ids: a prefix check before anything else.
        let candidate =
            raw.len() <= MAX_ID_LEN && PREFIXES.iter().any(|p| raw.starts_with(p.as_bytes()));
        if let Some(s) = candidate.then(|| std::str::from_utf8(raw).ok()).flatten() {
            if looks_like_id(s) && !out.contains(&s) {
                out.push(s);
                if out.len() == MAX_IDS {
                    break;
                }
            }
        }
        at = close + 1;
    }
    out
}

/// The index of the quote that ends the string starting at `from`: the first one not escaped
/// by an odd run of backslashes.
fn string_end(body: &[u8], from: usize) -> Option<usize> {
    let mut at = from;
    loop {
        let q = at + memchr(b'"', &body[at..])?;
        let backslashes = body[from..q]
            .iter()
            .rev()
            .take_while(|&&b| b == b'\\')
            .count();
        if backslashes % 2 == 0 {
            return Some(q);
        }
        at = q + 1;
    }
}

/// Whether the answer to `method path` may name objects it created (or fine-tuned models).
pub fn may_create(method: &str, path: &str) -> bool {
    OBJECT_PATHS.iter().any(|p| under(path, p))
        && (method == "POST" || under(path, "/v1/fine_tuning"))
}

/// Whether `method path` lists one account's objects.
pub fn is_listing(method: &str, path: &str) -> bool {
    method == "GET" && LISTINGS.iter().any(|p| path.trim_end_matches('/') == *p)
}

/// Whether `path` is `prefix` or below it.
fn under(path: &str, prefix: &str) -> bool {
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_known_prefixes_of_id_characters() {
        for id in [
            "file-abc123",
            "batch_6789",
            "vs_abc",
            "resp_68a",
            "ft:gpt-4o-mini-2024-07-18:acme::9xYz",
            "ftjob-abc",
        ] {
            assert!(looks_like_id(id), "{id}");
        }
        for not in [
            "file-",
            "filex",
            "msg_abc",
            "file-a b",
            "file-a\\",
            "",
            "chatcmpl-1",
        ] {
            assert!(!looks_like_id(not), "{not:?}");
        }
        assert!(!looks_like_id(&format!("file-{}", "a".repeat(MAX_ID_LEN))));
    }

    #[test]
    fn ids_in_paths_and_bodies() {
        let path = "/v1/vector_stores/vs_1/files/file-2";
        assert_eq!(in_path(path).collect::<Vec<_>>(), ["vs_1", "file-2"]);
        let body = format!(
            r#"{{"model":"ft:gpt-4o:acme::x1","input":[{{"type":"input_file","file_id":"file-9"}}],
            "tools":[{{"type":"file_search","vector_store_ids":["vs_1","vs_2"]}}],
            "previous_response_id":"resp_7","note":"file-9","text":"see \"file-hidden\" here",
            "long":"{}","after":"batch_3","esc":"a\\","last":"asst_4"}}"#,
            "x".repeat(1000)
        );
        assert_eq!(
            in_body(body.as_bytes()),
            [
                "ft:gpt-4o:acme::x1",
                "file-9",
                "vs_1",
                "vs_2",
                "resp_7",
                "batch_3",
                "asst_4"
            ]
        );
    }

    #[test]
    fn junk_bodies_yield_nothing_or_a_bounded_list() {
        assert!(in_body(b"").is_empty());
        assert!(in_body(b"\"").is_empty());
        assert!(in_body(b"\"file-abc").is_empty(), "unterminated");
        assert!(in_body(&[b'"', 0xff, 0xfe, b'"']).is_empty());
        let many: String = (0..100).map(|i| format!("\"file-{i}\",")).collect();
        assert_eq!(in_body(many.as_bytes()).len(), MAX_IDS);
    }

    #[test]
    fn creating_and_listing_endpoints() {
        assert!(may_create("POST", "/v1/files"));
        assert!(may_create("POST", "/v1/uploads/upload_1/complete"));
        assert!(may_create("POST", "/v1/responses"));
        assert!(may_create("GET", "/v1/fine_tuning/jobs/ftjob-1"));
        assert!(!may_create("GET", "/v1/files/file-1"));
        assert!(!may_create("POST", "/v1/chat/completions"));
        assert!(!may_create("POST", "/v1/filesystem"));
        assert!(is_listing("GET", "/v1/files"));
        assert!(is_listing("GET", "/v1/fine_tuning/jobs/"));
        assert!(!is_listing("POST", "/v1/files"));
        assert!(!is_listing("GET", "/v1/files/file-1"));
    }
}
