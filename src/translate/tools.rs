//! Tools across the two APIs: OpenAI's function tools and `tool_choice` as Anthropic's tools,
//! an assistant's `tool_calls` as `tool_use` blocks and `tool` messages as `tool_result` blocks.
//! OpenAI's arguments are a JSON string, Anthropic's `input` a JSON object: the string is parsed
//! on the way in (invalid JSON is the client's 400) and written back on the way out.

use super::{invalid, unsupported, TranslateError};
use serde_json::{json, Map, Value};

/// `tools`: function tools only.
pub(super) fn tools(value: &Value) -> Result<Value, TranslateError> {
    let Value::Array(list) = value else {
        return Err(invalid("tools", "expected a list of tools"));
    };
    list.iter()
        .enumerate()
        .map(|(i, t)| {
            let at = format!("tools[{i}]");
            match t.get("type").and_then(Value::as_str) {
                Some("function") => {}
                Some(other) => {
                    return Err(unsupported(
                        at,
                        format!("`{other}` tools are not translated"),
                    ))
                }
                None => return Err(invalid(at, "a tool needs a `type`")),
            }
            let f = t.get("function").unwrap_or(&Value::Null);
            let Some(name) = f.get("name").and_then(Value::as_str) else {
                return Err(invalid(format!("{at}.function.name"), "expected a string"));
            };
            let mut tool = Map::new();
            tool.insert("name".into(), name.into());
            if let Some(d) = f.get("description").filter(|d| !d.is_null()) {
                tool.insert("description".into(), d.clone());
            }
            let schema = f
                .get("parameters")
                .filter(|p| !p.is_null())
                .cloned()
                .unwrap_or_else(|| json!({"type": "object", "properties": {}}));
            tool.insert("input_schema".into(), schema);
            Ok(Value::Object(tool))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Value::Array)
}

/// `tool_choice` and `parallel_tool_calls` as Anthropic's `tool_choice`; `None` when neither
/// says anything.
pub(super) fn tool_choice(
    choice: Option<&Value>,
    parallel: Option<&Value>,
) -> Result<Option<Value>, TranslateError> {
    let mut out = match choice {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(match s.as_str() {
            "auto" => json!({"type": "auto"}),
            "none" => json!({"type": "none"}),
            "required" => json!({"type": "any"}),
            other => return Err(invalid("tool_choice", format!("unknown choice `{other}`"))),
        }),
        Some(obj @ Value::Object(_)) => {
            match obj.pointer("/function/name").and_then(Value::as_str) {
                Some(name) if obj.get("type").and_then(Value::as_str) == Some("function") => {
                    Some(json!({"type": "tool", "name": name}))
                }
                _ => {
                    return Err(invalid(
                        "tool_choice",
                        "expected {\"type\":\"function\",\"function\":{\"name\":…}}",
                    ))
                }
            }
        }
        Some(_) => return Err(invalid("tool_choice", "expected a string or an object")),
    };
    match parallel {
        None | Some(Value::Null) | Some(Value::Bool(true)) => {}
        Some(Value::Bool(false)) => {
            let choice = out.get_or_insert_with(|| json!({"type": "auto"}));
            if choice["type"] != "none" {
                choice["disable_parallel_tool_use"] = Value::Bool(true);
            }
        }
        Some(_) => return Err(invalid("parallel_tool_calls", "expected a boolean")),
    }
    Ok(out)
}

/// An assistant's `tool_calls` as `tool_use` blocks.
pub(super) fn tool_uses(at: &str, calls: &Value) -> Result<Vec<Value>, TranslateError> {
    let Value::Array(calls) = calls else {
        return Err(invalid(at, "expected a list of tool calls"));
    };
    calls
        .iter()
        .enumerate()
        .map(|(j, c)| {
            let at = format!("{at}[{j}]");
            let id = c.get("id").and_then(Value::as_str);
            let name = c.pointer("/function/name").and_then(Value::as_str);
            let (Some(id), Some(name)) = (id, name) else {
                return Err(invalid(
                    at,
                    "a tool call needs an `id` and a `function.name`",
                ));
            };
            let input = match c.pointer("/function/arguments") {
                None | Some(Value::Null) => json!({}),
                Some(Value::String(s)) if s.trim().is_empty() => json!({}),
                Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
                    Ok(v @ Value::Object(_)) => v,
                    _ => {
                        return Err(invalid(
                            format!("{at}.function.arguments"),
                            "expected a JSON object in a string",
                        ))
                    }
                },
                Some(_) => {
                    return Err(invalid(
                        format!("{at}.function.arguments"),
                        "expected a string",
                    ))
                }
            };
            Ok(json!({"type": "tool_use", "id": id, "name": name, "input": input}))
        })
        .collect()
}

/// A `tool` message as a `tool_result` block.
pub(super) fn tool_result(
    at: &str,
    m: &Map<String, Value>,
    content: Value,
) -> Result<Value, TranslateError> {
    let Some(id) = m.get("tool_call_id").and_then(Value::as_str) else {
        return Err(invalid(format!("{at}.tool_call_id"), "expected a string"));
    };
    Ok(json!({"type": "tool_result", "tool_use_id": id, "content": content}))
}

/// An answer's `tool_use` blocks as OpenAI's `tool_calls` (arguments as a JSON string).
pub(super) fn tool_calls(blocks: &[Value]) -> Vec<Value> {
    blocks
        .iter()
        .filter(|b| b.get("type").and_then(Value::as_str) == Some("tool_use"))
        .map(|b| {
            let input = b.get("input").cloned().unwrap_or_else(|| json!({}));
            json!({
                "id": b.get("id").cloned().unwrap_or(Value::Null),
                "type": "function",
                "function": {
                    "name": b.get("name").cloned().unwrap_or(Value::Null),
                    "arguments": input.to_string(),
                },
            })
        })
        .collect()
}
