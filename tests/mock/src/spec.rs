//! Parsing behaviours: the `--behaviors` YAML file, the `--key SECRET=SPEC` inline grammar and the
//! `/_mock/behavior` body. All three go through one path: a YAML mapping checked into a `Behavior`.
//!
//! Inline grammar: `MODE[:param=value]*`. MODE is a mode name or a status shorthand (200 ok,
//! 400 bad_request, 401 unauthorized, 403 forbidden, 429 rate_limit, 5xx server_error with that
//! status). Each value is read as a YAML scalar (`2` is a number, `true` a bool, `2s` a string),
//! except `models`, which is a comma-separated list.

use std::collections::HashMap;
use std::time::Duration;

use http::{HeaderValue, StatusCode};
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use serde_yaml::{Mapping, Value};

use crate::behavior::{Behavior, Mode, RateLimit};
use crate::limits::Limits;

/// The `--behaviors` file: `keys: { SECRET: SPEC, ... }`, SPEC a mapping or an inline string.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    keys: HashMap<String, Value>,
}

/// The spec fields as written; checked against the mode by `check`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    mode: ModeRepr,
    first: Option<u64>,
    window: Option<Dur>,
    latency: Option<Dur>,
    models: Option<Vec<String>>,
    retry_after: Option<u64>,
    retry_after_ms: Option<u64>,
    retry_after_date: Option<bool>,
    reset_requests: Option<String>,
    reset_in: Option<u64>,
    org_wide: Option<bool>,
    status: Option<u16>,
    after: Option<u32>,
    echo_key: Option<bool>,
    rpm: Option<u64>,
    tpm: Option<u64>,
}

/// A mode written as a name (`rate_limit`) or a status shorthand (`429`).
#[derive(Deserialize)]
#[serde(untagged)]
enum ModeRepr {
    Name(String),
    Code(u16),
}

/// A humantime duration (`500ms`, `2s`); a bare number is refused because its unit would be a guess.
struct Dur(Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Dur;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a duration such as 500ms or 2s")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Dur, E> {
                humantime::parse_duration(s)
                    .map(Dur)
                    .map_err(|e| E::custom(format!("bad duration `{s}`: {e}")))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Dur, E> {
                Err(E::custom(format!(
                    "duration `{n}` needs a unit, e.g. {n}s or {n}ms"
                )))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Dur, E> {
                Err(E::custom(format!(
                    "duration `{n}` needs a unit, e.g. {n}s or {n}ms"
                )))
            }
            fn visit_f64<E: de::Error>(self, n: f64) -> Result<Dur, E> {
                Err(E::custom(format!("duration `{n}` needs a unit, e.g. 1.5s")))
            }
        }
        d.deserialize_any(V)
    }
}

/// Parses a whole `--behaviors` file.
pub fn parse_file(text: &str) -> Result<Vec<(String, Behavior)>, String> {
    let file: File = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
    let mut out = Vec::with_capacity(file.keys.len());
    for (key, value) in file.keys {
        let behavior = from_value(value).map_err(|e| format!("key `{key}`: {e}"))?;
        out.push((key, behavior));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Parses one `--key SECRET=SPEC` argument (split at the first `=`).
pub fn parse_key_arg(arg: &str) -> Result<(String, Behavior), String> {
    let (key, spec) = arg
        .split_once('=')
        .ok_or_else(|| format!("`{arg}`: expected SECRET=SPEC, e.g. sk-a=429:first=3"))?;
    if key.is_empty() {
        return Err(format!("`{arg}`: empty SECRET"));
    }
    let behavior = parse_inline(spec).map_err(|e| format!("key `{key}`: {e}"))?;
    Ok((key.to_string(), behavior))
}

/// Parses one spec value: an inline string (or bare status number), or a mapping.
pub fn from_value(value: Value) -> Result<Behavior, String> {
    match value {
        Value::String(s) => parse_inline(&s),
        Value::Number(n) => parse_inline(&n.to_string()),
        Value::Mapping(_) => {
            let raw: RawSpec = serde_yaml::from_value(value).map_err(|e| e.to_string())?;
            check(raw)
        }
        other => Err(format!(
            "expected a mapping like {{mode: ok}} or an inline spec like \"429:first=3\", got {other:?}"
        )),
    }
}

/// Parses the inline grammar `MODE[:param=value]*`.
pub fn parse_inline(spec: &str) -> Result<Behavior, String> {
    let mut parts = spec.split(':');
    let mode = parts.next().unwrap_or_default().trim();
    if mode.is_empty() {
        return Err(format!(
            "`{spec}`: missing MODE (grammar: MODE[:param=value]*)"
        ));
    }
    let mut map = Mapping::new();
    map.insert("mode".into(), scalar(mode));
    for part in parts {
        let (name, value) = part
            .split_once('=')
            .ok_or_else(|| format!("`{spec}`: expected param=value, got `{part}`"))?;
        let (name, value) = (name.trim(), value.trim());
        if name.is_empty() || value.is_empty() {
            return Err(format!("`{spec}`: expected param=value, got `{part}`"));
        }
        let value = if name == "models" {
            Value::Sequence(
                value
                    .split(',')
                    .map(|m| Value::String(m.trim().into()))
                    .collect(),
            )
        } else {
            scalar(value)
        };
        if map.insert(name.into(), value).is_some() || name == "mode" {
            return Err(format!("`{spec}`: `{name}` given twice"));
        }
    }
    let raw: RawSpec = serde_yaml::from_value(Value::Mapping(map)).map_err(|e| e.to_string())?;
    check(raw)
}

/// Reads an inline value the way YAML would read it, falling back to the plain string.
fn scalar(text: &str) -> Value {
    match serde_yaml::from_str::<Value>(text) {
        Ok(v @ (Value::Bool(_) | Value::Number(_) | Value::String(_))) => v,
        _ => Value::String(text.into()),
    }
}

/// Turns the written fields into a `Behavior`, refusing parameters the mode does not use, so a
/// typo or a misplaced parameter is an error instead of a silently ignored setting.
fn check(raw: RawSpec) -> Result<Behavior, String> {
    let (name, code_status) = match raw.mode {
        ModeRepr::Name(n) => (n.replace('-', "_").to_ascii_lowercase(), None),
        ModeRepr::Code(c) => match c {
            200 => ("ok".to_string(), None),
            400 => ("bad_request".to_string(), None),
            401 => ("unauthorized".to_string(), None),
            403 => ("forbidden".to_string(), None),
            429 => ("rate_limit".to_string(), None),
            500..=599 => ("server_error".to_string(), Some(c)),
            _ => {
                return Err(format!(
                    "mode `{c}`: no such status shorthand (200, 400, 401, 403, 429, 5xx)"
                ))
            }
        },
    };
    let mut used: Vec<&str> = Vec::new();
    let mut limits = None;
    let mode = match name.as_str() {
        "ok" => Mode::Ok,
        "limit" => {
            used = vec!["rpm", "tpm"];
            if raw.rpm.is_none() && raw.tpm.is_none() {
                return Err("limit needs rpm=N or tpm=N (or both)".into());
            }
            if raw.rpm == Some(0) || raw.tpm == Some(0) {
                return Err("limit: rpm and tpm must be at least 1".into());
            }
            limits = Some(Limits {
                rpm: raw.rpm,
                tpm: raw.tpm,
            });
            Mode::Ok
        }
        "unauthorized" => Mode::Unauthorized,
        "forbidden" => Mode::Forbidden,
        "insufficient_quota" => Mode::InsufficientQuota,
        "bad_request" => Mode::BadRequest,
        "rate_limit" => {
            used = vec![
                "retry_after",
                "retry_after_ms",
                "retry_after_date",
                "reset_requests",
                "reset_in",
                "org_wide",
            ];
            let retry_after_date = raw.retry_after_date.unwrap_or(false);
            if retry_after_date && raw.retry_after.is_none() {
                return Err("retry_after_date needs retry_after (seconds ahead)".into());
            }
            let reset_requests = match &raw.reset_requests {
                Some(r) => Some(
                    HeaderValue::from_str(r)
                        .map_err(|_| format!("reset_requests `{r}` is not a valid header value"))?,
                ),
                None => None,
            };
            Mode::RateLimit(RateLimit {
                retry_after: raw.retry_after,
                retry_after_ms: raw.retry_after_ms,
                retry_after_date,
                reset_requests,
                org_wide: raw.org_wide.unwrap_or(false),
                reset_in: raw.reset_in,
            })
        }
        "server_error" => {
            used = vec!["status"];
            let code = match (code_status, raw.status) {
                (Some(a), Some(b)) if a != b => {
                    return Err(format!("status given twice ({a} and {b})"))
                }
                (a, b) => a.or(b).unwrap_or(500),
            };
            if !(500..=599).contains(&code) {
                return Err(format!("server_error status {code} is not 5xx"));
            }
            let status = StatusCode::from_u16(code).map_err(|e| e.to_string())?;
            Mode::ServerError { status }
        }
        "break_stream" => {
            used = vec!["after"];
            Mode::BreakStream {
                after: raw.after.unwrap_or(1),
            }
        }
        other => {
            return Err(format!(
                "unknown mode `{other}` (ok, limit, rate_limit, unauthorized, forbidden, \
                 insufficient_quota, server_error, bad_request, break_stream)"
            ))
        }
    };
    let given = [
        ("retry_after", raw.retry_after.is_some()),
        ("retry_after_ms", raw.retry_after_ms.is_some()),
        ("retry_after_date", raw.retry_after_date.is_some()),
        ("reset_requests", raw.reset_requests.is_some()),
        ("reset_in", raw.reset_in.is_some()),
        ("org_wide", raw.org_wide.is_some()),
        ("status", raw.status.is_some()),
        ("after", raw.after.is_some()),
        ("rpm", raw.rpm.is_some()),
        ("tpm", raw.tpm.is_some()),
    ];
    if let Some((param, _)) = given.iter().find(|(p, set)| *set && !used.contains(p)) {
        return Err(format!("`{param}` does not apply to mode {name}"));
    }
    if let Some(models) = &raw.models {
        if models.is_empty() || models.iter().any(|m| m.is_empty()) {
            return Err("models must be a non-empty list of model names".into());
        }
    }
    let echo_key = raw.echo_key.unwrap_or(false);
    if echo_key && matches!(mode, Mode::Ok | Mode::BreakStream { .. }) {
        return Err(format!(
            "echo_key needs a mode that answers an error, not {}",
            mode.name()
        ));
    }
    Ok(Behavior {
        mode,
        first: raw.first,
        window: raw.window.map(|d| d.0),
        latency: raw.latency.map(|d| d.0),
        models: raw.models,
        echo_key,
        limits,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inline(s: &str) -> Behavior {
        parse_inline(s).expect("valid spec")
    }

    #[test]
    fn limit_mode_reads_rpm_and_tpm_and_round_trips() {
        let b = inline("limit:rpm=60:tpm=100000");
        assert_eq!(b.mode, Mode::Ok);
        assert_eq!(
            b.limits,
            Some(Limits {
                rpm: Some(60),
                tpm: Some(100_000)
            })
        );
        assert_eq!(b.to_string(), "limit:rpm=60:tpm=100000");
        assert_eq!(inline("limit:rpm=5").to_string(), "limit:rpm=5");
        assert!(parse_inline("limit").is_err_and(|e| e.contains("needs rpm")));
        assert!(parse_inline("limit:rpm=0").is_err());
        assert!(parse_inline("ok:rpm=5").is_err_and(|e| e.contains("does not apply")));
    }

    #[test]
    fn inline_modes_and_shorthands() {
        assert_eq!(inline("ok"), Behavior::ok());
        assert_eq!(inline("200"), Behavior::ok());
        assert_eq!(inline("401").mode, Mode::Unauthorized);
        assert_eq!(inline("unauthorized").mode, Mode::Unauthorized);
        assert_eq!(inline("403").mode, Mode::Forbidden);
        assert_eq!(inline("400").mode, Mode::BadRequest);
        assert_eq!(inline("insufficient-quota").mode, Mode::InsufficientQuota);
        assert_eq!(
            inline("503").mode,
            Mode::ServerError {
                status: StatusCode::SERVICE_UNAVAILABLE
            }
        );
        assert_eq!(
            inline("server_error").mode,
            Mode::ServerError {
                status: StatusCode::INTERNAL_SERVER_ERROR
            }
        );
        assert_eq!(inline("break_stream").mode, Mode::BreakStream { after: 1 });
    }

    #[test]
    fn inline_params() {
        let b = inline("429:retry_after=2:first=3");
        assert_eq!(b.first, Some(3));
        let Mode::RateLimit(rl) = &b.mode else {
            panic!("not rate_limit: {b:?}")
        };
        assert_eq!(rl.retry_after, Some(2));
        let b = inline(
            "rate_limit:retry_after_ms=500:window=2s:latency=50ms:models=gpt-4o, gpt-4o-mini",
        );
        assert_eq!(b.window, Some(Duration::from_secs(2)));
        assert_eq!(b.latency, Some(Duration::from_millis(50)));
        assert_eq!(
            b.models,
            Some(vec!["gpt-4o".to_string(), "gpt-4o-mini".to_string()])
        );
        let b = inline("429:retry_after=3:retry_after_date=true:reset_requests=6m0s:org_wide=true");
        let Mode::RateLimit(rl) = &b.mode else {
            panic!("not rate_limit: {b:?}")
        };
        assert!(rl.retry_after_date && rl.org_wide);
        assert_eq!(rl.reset_requests, Some(HeaderValue::from_static("6m0s")));
        assert_eq!(
            inline("server_error:status=502").mode.status(),
            StatusCode::BAD_GATEWAY
        );
        assert_eq!(
            inline("break_stream:after=4").mode,
            Mode::BreakStream { after: 4 }
        );
    }

    #[test]
    fn inline_errors_are_clear() {
        let err = |s: &str| parse_inline(s).expect_err(s);
        assert!(err("").contains("missing MODE"));
        assert!(err("nope").contains("unknown mode `nope`"));
        assert!(err("418").contains("no such status shorthand"));
        assert!(err("ok:first").contains("expected param=value"));
        assert!(err("ok:first=1:first=2").contains("given twice"));
        assert!(err("ok:frist=1").contains("frist"));
        assert!(err("ok:window=2").contains("needs a unit"));
        assert!(err("ok:window=soon").contains("bad duration"));
        assert!(err("401:status=503").contains("does not apply to mode unauthorized"));
        assert!(err("429:after=1").contains("does not apply"));
        assert!(err("503:status=502").contains("given twice"));
        assert!(err("server_error:status=404").contains("not 5xx"));
        assert!(err("429:retry_after_date=true").contains("needs retry_after"));
        assert!(err("ok:echo_key=true").contains("echo_key needs a mode that answers an error"));
        assert!(err("break_stream:echo_key=true").contains("not break_stream"));
    }

    #[test]
    fn echo_key_is_a_flag_of_error_modes() {
        assert!(inline("401:echo_key=true").echo_key);
        assert!(inline("rate_limit:retry_after=1:echo_key=true").echo_key);
        assert!(!inline("401:echo_key=false").echo_key);
        assert!(!inline("403").echo_key);
    }

    #[test]
    fn key_arg_splits_at_first_equals() {
        let (k, b) = parse_key_arg("sk-b=429:retry_after=2:first=3").expect("valid");
        assert_eq!(k, "sk-b");
        assert_eq!(b.first, Some(3));
        assert!(parse_key_arg("sk-b").is_err());
        assert!(parse_key_arg("=ok").is_err());
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "ok",
            "429:retry_after=2:first=3",
            "rate_limit:retry_after=3:retry_after_ms=500:retry_after_date=true:reset_requests=6m0s:org_wide=true:window=1m 30s:latency=5ms:models=a,b",
            "server_error:status=503:first=5",
            "break_stream:after=3",
            "unauthorized",
            "forbidden:echo_key=true",
        ] {
            let b = inline(s);
            assert_eq!(inline(&b.to_string()), b, "{s} -> {b}");
        }
    }

    #[test]
    fn yaml_file() {
        let text = r#"
keys:
  sk-a: { mode: ok }
  sk-b: { mode: rate_limit, retry_after: 2, first: 3 }
  sk-c: { mode: unauthorized }
  sk-d: { mode: insufficient_quota }
  sk-e: { mode: server_error, status: 503, first: 5 }
  sk-f: { mode: rate_limit, retry_after_ms: 500, window: 2s }
  sk-g: { mode: ok, latency: 50ms }
  sk-h: "429:first=1"
  sk-i: 401
  sk-j: { mode: rate_limit, models: [gpt-4o] }
"#;
        let keys = parse_file(text).expect("valid file");
        let get = |k: &str| {
            keys.iter()
                .find(|(n, _)| n == k)
                .map(|(_, b)| b.clone())
                .expect("key present")
        };
        assert_eq!(keys.len(), 10);
        assert_eq!(get("sk-b").to_string(), "rate_limit:retry_after=2:first=3");
        assert_eq!(get("sk-e").to_string(), "server_error:status=503:first=5");
        assert_eq!(
            get("sk-f").to_string(),
            "rate_limit:retry_after_ms=500:window=2s"
        );
        assert_eq!(get("sk-g").latency, Some(Duration::from_millis(50)));
        assert_eq!(get("sk-h").first, Some(1));
        assert_eq!(get("sk-i").mode, Mode::Unauthorized);
        assert_eq!(get("sk-j").models, Some(vec!["gpt-4o".to_string()]));
    }

    #[test]
    fn yaml_errors_name_the_key() {
        let e = parse_file("keys:\n  sk-x: { mode: ok, colour: red }\n").expect_err("bad");
        assert!(e.contains("sk-x") && e.contains("colour"), "{e}");
        let e = parse_file("kees: {}\n").expect_err("bad");
        assert!(e.contains("kees"), "{e}");
        let e = parse_file("keys:\n  sk-x: [1]\n").expect_err("bad");
        assert!(e.contains("sk-x"), "{e}");
    }

    #[test]
    fn json_body_value() {
        let v: Value = serde_yaml::from_str(r#"{"mode": "ok", "latency": "1s"}"#).expect("json");
        assert_eq!(
            from_value(v).expect("ok").latency,
            Some(Duration::from_secs(1))
        );
    }
}
