//! An OpenAI chat completion request as an Anthropic Messages request.

use super::tools;
use super::{invalid, unsupported, TranslateError};
use serde_json::{json, Map, Value};

/// Top-level parameters taken as they are or mapped; any other is refused by name.
const KNOWN: [&str; 18] = [
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "stop",
    "user",
    "stream",
    "stream_options",
    "n",
    "logprobs",
    "top_logprobs",
    "parallel_tool_calls",
    "tools",
    "tool_choice",
    "reasoning_effort",
    "mock",
];

/// The Messages request for an OpenAI chat completion request `body`. `model` replaces the
/// body's model when given (a route's `rewrite_model`); `default_max_tokens` is used when the
/// client set no limit (Anthropic requires one).
pub fn messages_request(
    body: &[u8],
    model: Option<&str>,
    default_max_tokens: u64,
) -> Result<Vec<u8>, TranslateError> {
    let req: Map<String, Value> = match serde_json::from_slice(body) {
        Ok(Value::Object(map)) => map,
        Ok(_) => return Err(TranslateError::NotJson("not an object".into())),
        Err(e) => return Err(TranslateError::NotJson(e.to_string())),
    };
    if let Some(key) = req.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(unsupported(
            key.as_str(),
            "keygate does not translate it (yet)",
        ));
    }
    let stream = match req.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(invalid("stream", "expected a boolean")),
    };
    match req.get("stream_options") {
        None | Some(Value::Null) => {}
        Some(Value::Object(o)) if o.keys().all(|k| k == "include_usage") => {}
        Some(_) => {
            return Err(unsupported(
                "stream_options",
                "only `include_usage` is translated",
            ))
        }
    }
    refuse_unless(
        &req,
        "n",
        |v| v.is_null() || *v == json!(1),
        "Anthropic returns one choice",
    )?;
    refuse_unless(
        &req,
        "logprobs",
        |v| v.is_null() || *v == json!(false),
        "Anthropic reports no log probabilities",
    )?;
    refuse_unless(
        &req,
        "top_logprobs",
        Value::is_null,
        "Anthropic reports no log probabilities",
    )?;
    // `mock` is keygate-mock's own knob, passed on so tests can shape the answer.
    let mut out = Map::new();
    let model = match model {
        Some(m) => Value::String(m.to_string()),
        None => match req.get("model") {
            Some(Value::String(m)) => Value::String(m.clone()),
            _ => return Err(invalid("model", "expected a string")),
        },
    };
    out.insert("model".into(), model);
    let (system, messages) = messages(req.get("messages"))?;
    if let Some(system) = system {
        out.insert("system".into(), Value::String(system));
    }
    out.insert("messages".into(), Value::Array(messages));
    let max_tokens = match (req.get("max_completion_tokens"), req.get("max_tokens")) {
        (Some(v), _) if !v.is_null() => token_limit("max_completion_tokens", v)?,
        (_, Some(v)) if !v.is_null() => token_limit("max_tokens", v)?,
        _ => default_max_tokens,
    };
    // Thinking spends tokens before the answer: its budget comes on top of the answer's limit,
    // so a client's `max_tokens` still bounds what it reads (Anthropic wants the budget below
    // `max_tokens`).
    let budget = thinking_budget(req.get("reasoning_effort"))?;
    if let Some(budget) = budget {
        out.insert(
            "thinking".into(),
            json!({"type": "enabled", "budget_tokens": budget}),
        );
    }
    let max_tokens = max_tokens.saturating_add(budget.unwrap_or(0));
    out.insert("max_tokens".into(), max_tokens.into());
    for key in ["temperature", "top_p"] {
        match req.get(key) {
            None | Some(Value::Null) => {}
            Some(v @ Value::Number(_)) => {
                out.insert(key.into(), v.clone());
            }
            Some(_) => return Err(invalid(key, "expected a number")),
        }
    }
    match req.get("stop") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => {
            out.insert("stop_sequences".into(), json!([s]));
        }
        Some(Value::Array(items)) if items.iter().all(Value::is_string) => {
            out.insert("stop_sequences".into(), Value::Array(items.clone()));
        }
        Some(_) => return Err(invalid("stop", "expected a string or a list of strings")),
    }
    match req.get("user") {
        None | Some(Value::Null) => {}
        Some(Value::String(u)) => {
            out.insert("metadata".into(), json!({"user_id": u}));
        }
        Some(_) => return Err(invalid("user", "expected a string")),
    }
    if let Some(t) = req.get("tools").filter(|t| !t.is_null()) {
        out.insert("tools".into(), tools::tools(t)?);
    }
    if let Some(choice) =
        tools::tool_choice(req.get("tool_choice"), req.get("parallel_tool_calls"))?
    {
        out.insert("tool_choice".into(), choice);
    }
    if stream {
        // Usage always comes with Anthropic's stream; the client's `stream_options` only says
        // whether it sees the usage chunk, which the answer's translation decides.
        out.insert("stream".into(), Value::Bool(true));
    }
    if let Some(mock) = req.get("mock") {
        out.insert("mock".into(), mock.clone());
    }
    Ok(Value::Object(out).to_string().into_bytes())
}

/// Anthropic's thinking budget for OpenAI's `reasoning_effort`: none for `minimal` (or none
/// asked), 1024 tokens (Anthropic's least) for `low`, 4096 for `medium`, 16384 for `high`.
fn thinking_budget(effort: Option<&Value>) -> Result<Option<u64>, TranslateError> {
    match effort {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(e)) => match e.as_str() {
            "minimal" | "none" => Ok(None),
            "low" => Ok(Some(1024)),
            "medium" => Ok(Some(4096)),
            "high" => Ok(Some(16384)),
            other => Err(invalid(
                "reasoning_effort",
                format!("unknown effort `{other}` (minimal, low, medium, high)"),
            )),
        },
        Some(_) => Err(invalid("reasoning_effort", "expected a string")),
    }
}

/// Refuses `key` when present with a value `ok` rejects.
fn refuse_unless(
    req: &Map<String, Value>,
    key: &str,
    ok: impl Fn(&Value) -> bool,
    why: &str,
) -> Result<(), TranslateError> {
    match req.get(key) {
        Some(v) if !ok(v) => Err(unsupported(key, why)),
        _ => Ok(()),
    }
}

fn token_limit(key: &str, v: &Value) -> Result<u64, TranslateError> {
    v.as_u64()
        .filter(|n| *n > 0)
        .ok_or_else(|| invalid(key, "expected a positive integer"))
}

/// The system prompt (every system and developer message, in order, joined by a blank line) and
/// the conversation.
fn messages(value: Option<&Value>) -> Result<(Option<String>, Vec<Value>), TranslateError> {
    let Some(Value::Array(list)) = value else {
        return Err(invalid("messages", "expected a list of messages"));
    };
    let mut system: Vec<String> = Vec::new();
    let mut out = Vec::new();
    for (i, m) in list.iter().enumerate() {
        let at = format!("messages[{i}]");
        let Value::Object(m) = m else {
            return Err(invalid(at, "expected an object"));
        };
        let role = m.get("role").and_then(Value::as_str).unwrap_or("");
        let allowed = |k: &str| {
            matches!(k, "role" | "content" | "name")
                || (role == "assistant" && matches!(k, "tool_calls" | "refusal"))
                || (role == "tool" && k == "tool_call_id")
        };
        if let Some(key) = m.keys().find(|k| !allowed(k)) {
            return Err(unsupported(
                format!("{at}.{key}"),
                "keygate does not translate it (yet)",
            ));
        }
        let content = m.get("content").unwrap_or(&Value::Null);
        match role {
            "system" | "developer" => system.push(text_only(&format!("{at}.content"), content)?),
            "user" => out.push(json!({
                "role": role,
                "content": blocks(&format!("{at}.content"), content)?,
            })),
            "assistant" => {
                let calls = m.get("tool_calls").filter(|c| !c.is_null());
                let content = match (content, calls) {
                    (Value::Null, Some(_)) => None,
                    (Value::String(s), Some(_)) if s.is_empty() => None,
                    (c, _) => Some(blocks(&format!("{at}.content"), c)?),
                };
                let content = match calls {
                    None => content.unwrap_or(Value::Null),
                    Some(calls) => {
                        let mut list = match content {
                            Some(Value::String(s)) => vec![json!({"type": "text", "text": s})],
                            Some(Value::Array(b)) => b,
                            _ => Vec::new(),
                        };
                        list.extend(tools::tool_uses(&format!("{at}.tool_calls"), calls)?);
                        Value::Array(list)
                    }
                };
                out.push(json!({"role": "assistant", "content": content}));
            }
            "tool" => {
                let result_content = blocks(&format!("{at}.content"), content)?;
                let block = tools::tool_result(&at, m, result_content)?;
                // The results of parallel calls answer one assistant turn: one user turn.
                let merged = out.last_mut().and_then(|last| {
                    let all_results = last["role"] == "user"
                        && last["content"]
                            .as_array()
                            .is_some_and(|b| b.iter().all(|x| x["type"] == "tool_result"));
                    all_results.then(|| last["content"].as_array_mut())?
                });
                match merged {
                    Some(list) => list.push(block),
                    None => out.push(json!({"role": "user", "content": [block]})),
                }
            }
            "function" => {
                return Err(unsupported(
                    format!("{at}.role"),
                    "the deprecated `function` role is not translated; use tools",
                ))
            }
            other => {
                return Err(invalid(
                    format!("{at}.role"),
                    format!("unknown role `{other}`"),
                ))
            }
        }
    }
    if out.is_empty() {
        return Err(invalid(
            "messages",
            "at least one user or assistant message is needed",
        ));
    }
    Ok(((!system.is_empty()).then(|| system.join("\n\n")), out))
}

/// A message's content as Anthropic content: a string stays a string, text parts become text
/// blocks; other parts are refused.
fn blocks(at: &str, content: &Value) -> Result<Value, TranslateError> {
    match content {
        Value::String(s) => Ok(Value::String(s.clone())),
        Value::Array(parts) => parts
            .iter()
            .enumerate()
            .map(|(j, p)| part_block(&format!("{at}[{j}]"), p))
            .collect::<Result<Vec<_>, _>>()
            .map(Value::Array),
        _ => Err(invalid(at, "expected a string or a list of content parts")),
    }
}

/// One content part as an Anthropic block: text, or an image (`image_url` with a base64 `data:`
/// URL or an `http(s)` URL; `detail` has no Anthropic counterpart and is dropped).
fn part_block(at: &str, part: &Value) -> Result<Value, TranslateError> {
    if part.get("type").and_then(Value::as_str) != Some("image_url") {
        return Ok(json!({"type": "text", "text": text_part(at, part)?}));
    }
    let url = match part.get("image_url") {
        Some(Value::String(u)) => u.as_str(),
        Some(obj) => obj.get("url").and_then(Value::as_str).unwrap_or(""),
        None => "",
    };
    let at = format!("{at}.image_url.url");
    if let Some(rest) = url.strip_prefix("data:") {
        let Some((meta, data)) = rest.split_once(',') else {
            return Err(invalid(at, "a data URL needs a comma before its data"));
        };
        let Some(media_type) = meta.strip_suffix(";base64") else {
            return Err(unsupported(at, "only base64 data URLs are translated"));
        };
        if !IMAGE_TYPES.contains(&media_type) {
            return Err(unsupported(
                at,
                format!(
                    "Anthropic takes {} images, not `{media_type}`",
                    IMAGE_TYPES.join(", ")
                ),
            ));
        }
        return Ok(
            json!({"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}),
        );
    }
    if url.starts_with("https://") || url.starts_with("http://") {
        return Ok(json!({"type": "image", "source": {"type": "url", "url": url}}));
    }
    Err(invalid(at, "expected a data: URL or an http(s) URL"))
}

/// The image media types Anthropic accepts.
const IMAGE_TYPES: [&str; 4] = ["image/jpeg", "image/png", "image/gif", "image/webp"];

/// System content as one string: a string, or text parts joined.
fn text_only(at: &str, content: &Value) -> Result<String, TranslateError> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => Ok(parts
            .iter()
            .enumerate()
            .map(|(j, p)| text_part(&format!("{at}[{j}]"), p))
            .collect::<Result<Vec<_>, _>>()?
            .join("\n")),
        _ => Err(invalid(at, "expected a string or a list of text parts")),
    }
}

/// The text of a `{"type":"text","text":…}` part.
fn text_part(at: &str, part: &Value) -> Result<String, TranslateError> {
    match (part.get("type").and_then(Value::as_str), part.get("text")) {
        (Some("text"), Some(Value::String(t))) => Ok(t.clone()),
        (Some("text"), _) => Err(invalid(at, "a text part needs a string `text`")),
        (Some(kind), _) => Err(unsupported(
            at,
            format!("`{kind}` parts are not translated yet"),
        )),
        (None, _) => Err(invalid(at, "a content part needs a `type`")),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn translate(v: Value) -> Result<Value, TranslateError> {
        messages_request(v.to_string().as_bytes(), None, 1024)
            .map(|b| serde_json::from_slice(&b).unwrap())
    }

    #[test]
    fn every_corpus_request_translates_as_recorded() {
        for (name, case) in super::super::corpus("requests") {
            let got = translate(case["openai"].clone());
            match (&case["anthropic"], &case["error_param"]) {
                (want, Value::Null) => assert_eq!(&got.unwrap(), want, "{name}"),
                (_, param) => {
                    let err = got.expect_err(&name);
                    assert_eq!(err.param(), param.as_str(), "{name}: {err}");
                }
            }
        }
    }

    #[test]
    fn a_route_rewrite_names_the_upstream_model() {
        let body = json!({"model": "cheap", "messages": [{"role": "user", "content": "hi"}]});
        let out =
            messages_request(body.to_string().as_bytes(), Some("claude-haiku-4-5"), 9).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["model"], "claude-haiku-4-5");
        assert_eq!(v["max_tokens"], 9);
    }

    #[test]
    fn junk_bodies_are_refused_not_guessed() {
        for body in [
            &b"not json"[..],
            b"[1]",
            b"{\"model\":1,\"messages\":[]}",
            b"",
        ] {
            assert!(
                messages_request(body, None, 1).is_err(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bodies_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let _ = messages_request(&bytes, None, 16);
        }
    }
}
