//! `keygate admin …`: the admin API from the command line, over a plain blocking HTTP/1.1
//! client. The token comes from `KEYGATE_ADMIN_TOKEN` or `--token-file`, never from an
//! argument (arguments show in `ps` and shell history).

use serde_json::Value;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

/// The admin address when neither `--addr` nor `KEYGATE_ADMIN_ADDR` is given.
pub const DEFAULT_ADDR: &str = "127.0.0.1:9092";

/// Longest answer read (a status of many keys stays far below).
const MAX_ANSWER_BYTES: usize = 16 * 1024 * 1024;

/// How to use it.
pub const USAGE: &str =
    "usage: keygate admin [--addr HOST:PORT] [--token-file PATH] [--json] COMMAND
commands:
  status                              upstreams, endpoints, keys, routes, clients
  keys list                           every key with its state
  keys disable UPSTREAM KEY [--reason TEXT]
                                      take a key out until it is enabled
  keys enable UPSTREAM KEY            put a disabled key back
  keys test UPSTREAM KEY              probe the key once now (exit 1 if the upstream refuses it)
  keys add UPSTREAM KEY [--account NAME] [--weight N] [--secret-file PATH]
                                      add a key at run time; its secret from PATH or standard input
  keys remove UPSTREAM KEY            remove a key added at run time
the address: --addr, else KEYGATE_ADMIN_ADDR, else 127.0.0.1:9092
the token: KEYGATE_ADMIN_TOKEN, or --token-file PATH (never on the command line)
secrets are never taken on the command line either";

/// What was asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `status`.
    Status,
    /// `keys list`.
    List,
    /// `keys disable|enable|test UPSTREAM KEY`.
    Key {
        /// `disable`, `enable` or `test`.
        verb: String,
        /// Upstream name.
        upstream: String,
        /// Key name.
        key: String,
        /// `--reason`, for a disable.
        reason: Option<String>,
    },
    /// `keys add UPSTREAM KEY`.
    Add {
        /// Upstream name.
        upstream: String,
        /// Key name.
        key: String,
        /// `--account`.
        account: Option<String>,
        /// `--weight`.
        weight: Option<u32>,
        /// `--secret-file`; standard input when absent.
        secret_file: Option<PathBuf>,
    },
    /// `keys remove UPSTREAM KEY`.
    Remove {
        /// Upstream name.
        upstream: String,
        /// Key name.
        key: String,
    },
}

/// A parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    /// The admin listener.
    pub addr: String,
    /// The token, if any.
    pub token: Option<String>,
    /// `--json`: the API's answer as is.
    pub json: bool,
    /// The command.
    pub command: Command,
}

/// Parses the arguments after `admin`; `env` reads the environment, `read_file` a token file.
pub fn parse_args(
    args: &[String],
    env: &dyn Fn(&str) -> Option<String>,
    read_file: &dyn Fn(&PathBuf) -> std::io::Result<String>,
) -> Result<Invocation, String> {
    let mut addr = None;
    let mut token_file = None;
    let mut json = false;
    let mut reason = None;
    let mut account = None;
    let mut weight = None;
    let mut secret_file = None;
    let mut words = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--addr" => addr = Some(it.next().ok_or("--addr needs HOST:PORT")?.clone()),
            "--token-file" => {
                token_file = Some(PathBuf::from(it.next().ok_or("--token-file needs a PATH")?))
            }
            "--reason" => reason = Some(it.next().ok_or("--reason needs a TEXT")?.clone()),
            "--account" => account = Some(it.next().ok_or("--account needs a NAME")?.clone()),
            "--weight" => {
                let w = it.next().ok_or("--weight needs a number")?;
                weight = Some(w.parse::<u32>().ok().filter(|&w| w > 0).ok_or_else(|| {
                    format!("--weight needs a whole number of at least 1, not {w:?}")
                })?);
            }
            "--secret-file" => {
                secret_file = Some(PathBuf::from(
                    it.next().ok_or("--secret-file needs a PATH")?,
                ))
            }
            t if t == "--secret" || t.starts_with("--secret=") => {
                return Err(
                    "a secret is never taken on the command line: give it on standard input or with --secret-file PATH"
                        .to_string(),
                )
            }
            "--json" => json = true,
            "-h" | "--help" => return Err(USAGE.to_string()),
            t if t == "--token" || t.starts_with("--token=") => {
                return Err(
                    "a token is never taken on the command line: set KEYGATE_ADMIN_TOKEN or use --token-file PATH"
                        .to_string(),
                )
            }
            other if other.starts_with('-') => return Err(format!("unknown option {other}")),
            word => words.push(word.to_string()),
        }
    }
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    let command = match words.as_slice() {
        ["status"] => Command::Status,
        ["keys", "list"] => Command::List,
        ["keys", verb @ ("disable" | "enable" | "test"), upstream, key] => Command::Key {
            verb: (*verb).to_string(),
            upstream: (*upstream).to_string(),
            key: (*key).to_string(),
            reason: if *verb == "disable" {
                reason.take()
            } else {
                None
            },
        },
        ["keys", "add", upstream, key] => Command::Add {
            upstream: (*upstream).to_string(),
            key: (*key).to_string(),
            account: account.take(),
            weight: weight.take(),
            secret_file: secret_file.take(),
        },
        ["keys", "remove", upstream, key] => Command::Remove {
            upstream: (*upstream).to_string(),
            key: (*key).to_string(),
        },
        _ => return Err(USAGE.to_string()),
    };
    if reason.is_some() {
        return Err("--reason goes with `keys disable` only".to_string());
    }
    if account.is_some() || weight.is_some() || secret_file.is_some() {
        return Err("--account, --weight and --secret-file go with `keys add` only".to_string());
    }
    let token = match token_file {
        Some(p) => {
            let t = read_file(&p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
            Some(t.trim().to_string()).filter(|t| !t.is_empty())
        }
        None => env("KEYGATE_ADMIN_TOKEN")
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty()),
    };
    Ok(Invocation {
        addr: addr
            .or_else(|| env("KEYGATE_ADMIN_ADDR"))
            .unwrap_or_else(|| DEFAULT_ADDR.to_string()),
        token,
        json,
        command,
    })
}

/// A path segment with everything but unreserved characters percent-encoded.
fn encode(segment: &str) -> String {
    let mut out = String::new();
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The method, path and body of a command's request.
pub fn request_of(command: &Command) -> (&'static str, String, Option<String>) {
    match command {
        Command::Status => ("GET", "/admin/v1/status".to_string(), None),
        Command::List => ("GET", "/admin/v1/keys".to_string(), None),
        Command::Key {
            verb,
            upstream,
            key,
            reason,
        } => (
            "POST",
            format!("/admin/v1/keys/{}/{}/{verb}", encode(upstream), encode(key)),
            reason
                .as_ref()
                .map(|r| serde_json::json!({ "reason": r }).to_string()),
        ),
        // The body, with the secret, is made by `add_body`.
        Command::Add { upstream, .. } => {
            ("POST", format!("/admin/v1/keys/{}", encode(upstream)), None)
        }
        Command::Remove { upstream, key } => (
            "DELETE",
            format!("/admin/v1/keys/{}/{}", encode(upstream), encode(key)),
            None,
        ),
    }
}

/// The secret of `keys add`: the first line of `--secret-file`, else of standard input.
pub fn read_secret(
    secret_file: Option<&PathBuf>,
    read_file: &dyn Fn(&PathBuf) -> std::io::Result<String>,
    read_stdin: &dyn Fn() -> std::io::Result<String>,
) -> Result<String, String> {
    let text = match secret_file {
        Some(p) => read_file(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?,
        None => {
            read_stdin().map_err(|e| format!("cannot read the secret from standard input: {e}"))?
        }
    };
    let secret = text.lines().next().unwrap_or("").trim().to_string();
    if secret.is_empty() {
        return Err(match secret_file {
            Some(p) => format!("{} holds no secret", p.display()),
            None => "no secret on standard input".to_string(),
        });
    }
    Ok(secret)
}

/// The JSON body of `keys add` with `secret`.
pub fn add_body(command: &Command, secret: &str) -> Option<String> {
    let Command::Add {
        key,
        account,
        weight,
        ..
    } = command
    else {
        return None;
    };
    let mut body = serde_json::json!({ "name": key, "secret": secret });
    if let Some(a) = account {
        body["account"] = serde_json::json!(a);
    }
    if let Some(w) = weight {
        body["weight"] = serde_json::json!(w);
    }
    Some(body.to_string())
}

/// Sends one request and returns (status, body).
pub fn send(
    addr: &str,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<(u16, Vec<u8>), String> {
    let target: SocketAddr = addr
        .to_socket_addrs()
        .map_err(|e| format!("bad admin address {addr:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("bad admin address {addr:?}"))?;
    let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(5))
        .map_err(|e| format!("cannot connect to the admin API at {addr}: {e}"))?;
    // A key test waits for the upstream, up to 30 s.
    let _ = stream.set_read_timeout(Some(Duration::from_secs(40)));
    let body = body.unwrap_or("");
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/json\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        head.push_str("Content-Type: application/json\r\n");
    }
    if let Some(t) = token {
        head.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    head.push_str("\r\n");
    stream
        .write_all(head.as_bytes())
        .and_then(|()| stream.write_all(body.as_bytes()))
        .map_err(|e| format!("cannot send to the admin API at {addr}: {e}"))?;
    read_answer(&mut stream).map_err(|e| format!("bad answer from the admin API at {addr}: {e}"))
}

/// Reads an HTTP/1.1 answer: status, headers, then `Content-Length` bytes (or up to the end).
fn read_answer(stream: &mut impl Read) -> Result<(u16, Vec<u8>), String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = stream.read(&mut chunk).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("the connection closed before the header ended".to_string());
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_ANSWER_BYTES {
            return Err("the header is too large".to_string());
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or("no status line")?;
    let length: Option<usize> = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok());
    let mut body = buf[head_end + 4..].to_vec();
    loop {
        if length.is_some_and(|n| body.len() >= n) {
            break;
        }
        let n = stream.read(&mut chunk).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
        if body.len() > MAX_ANSWER_BYTES {
            return Err("the answer is too large".to_string());
        }
    }
    if let Some(n) = length {
        body.truncate(n);
    }
    Ok((status, body))
}

/// `a 12s, gpt-4o 3s`: a key's cooldowns in short.
fn cooldowns_text(key: &Value) -> String {
    let list: Vec<String> = key["cooldowns"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            let ms = c["remaining_ms"].as_u64().unwrap_or(0);
            format!(
                "{} {}s",
                c["model"].as_str().unwrap_or("all models"),
                ms.div_ceil(1000)
            )
        })
        .collect();
    if list.is_empty() {
        "-".to_string()
    } else {
        list.join(", ")
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Rows as a table with aligned columns.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<String>| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else {
                l.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header.iter().map(|h| (*h).to_string()).collect());
    for row in rows {
        line(row.clone());
    }
    out
}

/// The key table of a list of key views.
pub fn keys_table(keys: &[Value]) -> String {
    let rows: Vec<Vec<String>> = keys
        .iter()
        .map(|k| {
            let reason = match (k["reason"].as_str(), k["note"].as_str()) {
                (Some(r), Some(n)) => format!("{r}: {n}"),
                (r, _) => r.unwrap_or("-").to_string(),
            };
            vec![
                text(&k["upstream"]),
                text(&k["name"]),
                text(&k["id"]),
                text(&k["source"]),
                text(&k["account"]),
                text(&k["state"]),
                reason,
                cooldowns_text(k),
                text(&k["in_flight"]),
            ]
        })
        .collect();
    table(
        &[
            "UPSTREAM",
            "KEY",
            "ID",
            "SOURCE",
            "ACCOUNT",
            "STATE",
            "REASON",
            "COOLDOWN",
            "IN FLIGHT",
        ],
        &rows,
    )
}

/// The people's view of `GET /admin/v1/status`.
pub fn status_text(v: &Value) -> String {
    let empty = Vec::new();
    let upstreams = v["upstreams"].as_array().unwrap_or(&empty);
    let rows: Vec<Vec<String>> = upstreams
        .iter()
        .map(|u| {
            let endpoints: Vec<String> = u["endpoints"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| {
                    let state = if e["ejected"] == true {
                        "ejected"
                    } else if e["healthy"] == true {
                        "up"
                    } else {
                        "down"
                    };
                    format!("{} {state}", text(&e["addr"]))
                })
                .collect();
            let keys = u["keys"].as_array().map_or(&[][..], Vec::as_slice);
            let count = |s: &str| keys.iter().filter(|k| k["state"] == s).count();
            vec![
                text(&u["name"]),
                text(&u["api"]),
                format!(
                    "{} ready, {} cooling, {} disabled",
                    count("ready"),
                    count("cooling"),
                    count("disabled")
                ),
                if endpoints.is_empty() {
                    "-".to_string()
                } else {
                    endpoints.join(", ")
                },
            ]
        })
        .collect();
    let mut out = table(&["UPSTREAM", "API", "KEYS", "ENDPOINTS"], &rows);
    let keys: Vec<Value> = upstreams
        .iter()
        .flat_map(|u| u["keys"].as_array().cloned().unwrap_or_default())
        .collect();
    out.push('\n');
    out.push_str(&keys_table(&keys));
    let routes: Vec<Vec<String>> = v["routes"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .map(|r| {
            let list = |f: &str| {
                let items: Vec<String> = r[f].as_array().into_iter().flatten().map(text).collect();
                if items.is_empty() {
                    "*".to_string()
                } else {
                    items.join(", ")
                }
            };
            vec![
                text(&r["name"]),
                list("models"),
                text(&r["path_prefix"]),
                list("upstreams"),
            ]
        })
        .collect();
    out.push('\n');
    out.push_str(&table(&["ROUTE", "MODELS", "PATH", "UPSTREAMS"], &routes));
    let clients: Vec<Vec<String>> = v["clients"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .map(|c| {
            let l = &c["limits"];
            let limits: Vec<String> = ["rpm", "tpm", "concurrency"]
                .iter()
                .filter(|f| !l[**f].is_null())
                .map(|f| format!("{f} {}", l[*f]))
                .chain(
                    (!l["budget"].is_null())
                        .then(|| format!("budget {}/{}", l["budget"], text(&l["budget_per"]))),
                )
                .collect();
            vec![
                text(&c["name"]),
                if limits.is_empty() {
                    "-".to_string()
                } else {
                    limits.join(", ")
                },
                text(&c["in_flight"]),
                text(&c["budget_used"]),
                text(&c["budget_left"]),
            ]
        })
        .collect();
    if !clients.is_empty() {
        out.push('\n');
        out.push_str(&table(
            &[
                "CLIENT",
                "LIMITS",
                "IN FLIGHT",
                "BUDGET USED",
                "BUDGET LEFT",
            ],
            &clients,
        ));
    }
    out
}

/// The people's line for a key action's answer.
fn action_text(command: &Command, v: &Value) -> String {
    match command {
        Command::Add { upstream, key, .. } => {
            return format!(
                "key {upstream}/{key} added ({}): {}",
                text(&v["key"]["id"]),
                text(&v["key"]["state"])
            )
        }
        Command::Remove { upstream, key } => return format!("key {upstream}/{key} removed"),
        _ => {}
    }
    let Command::Key {
        verb,
        upstream,
        key,
        ..
    } = command
    else {
        return String::new();
    };
    match verb.as_str() {
        "test" => format!(
            "key {upstream}/{key}: {} ({}): {}",
            if v["ok"] == true { "ok" } else { "REFUSED" },
            text(&v["status"]),
            text(&v["message"])
        ),
        _ => format!(
            "key {upstream}/{key}: {}{}",
            text(&v["key"]["state"]),
            if v["changed"] == true {
                ""
            } else {
                " (unchanged)"
            }
        ),
    }
}

/// Runs `keygate admin ARGS`; the exit code: 0 done, 1 refused or unreachable, 2 bad usage.
pub fn main(args: &[String]) -> u8 {
    let inv = match parse_args(args, &|k| std::env::var(k).ok(), &|p| {
        std::fs::read_to_string(p)
    }) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("keygate admin: {e}");
            return 2;
        }
    };
    let (method, path, mut body) = request_of(&inv.command);
    if let Command::Add { secret_file, .. } = &inv.command {
        use std::io::IsTerminal;
        if secret_file.is_none() && std::io::stdin().is_terminal() {
            eprintln!("keygate admin: the key's secret, then Enter:");
        }
        let read_stdin = || {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line).map(|_| line)
        };
        let secret = match read_secret(
            secret_file.as_ref(),
            &|p| std::fs::read_to_string(p),
            &read_stdin,
        ) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("keygate admin: {e}");
                return 2;
            }
        };
        body = add_body(&inv.command, &secret);
    }
    let (status, answer) = match send(
        &inv.addr,
        inv.token.as_deref(),
        method,
        &path,
        body.as_deref(),
    ) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("keygate admin: {e}");
            return 1;
        }
    };
    let parsed: Option<Value> = serde_json::from_slice(&answer).ok();
    if !(200..300).contains(&status) {
        let message = parsed
            .as_ref()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&answer).trim().to_string());
        eprintln!("keygate admin: {method} {path}: HTTP {status}: {message}");
        return 1;
    }
    let Some(v) = parsed else {
        eprintln!("keygate admin: the answer is not JSON");
        return 1;
    };
    if inv.json {
        println!("{v}");
    } else {
        match &inv.command {
            Command::Status => print!("{}", status_text(&v)),
            Command::List => print!(
                "{}",
                keys_table(v["keys"].as_array().map_or(&[][..], Vec::as_slice))
            ),
            other => println!("{}", action_text(other, &v)),
        }
    }
    let refused =
        matches!(&inv.command, Command::Key { verb, .. } if verb == "test") && v["ok"] != true;
    u8::from(refused)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn no_file(_: &PathBuf) -> std::io::Result<String> {
        Err(std::io::Error::from(std::io::ErrorKind::NotFound))
    }

    #[test]
    fn the_address_and_token_come_from_flags_then_environment() {
        let env = |k: &str| match k {
            "KEYGATE_ADMIN_ADDR" => Some("127.0.0.1:7000".to_string()),
            "KEYGATE_ADMIN_TOKEN" => Some(" env-tok\n".to_string()),
            _ => None,
        };
        let i = parse_args(&args("keys list"), &env, &no_file).unwrap();
        assert_eq!(i.addr, "127.0.0.1:7000");
        assert_eq!(i.token.as_deref(), Some("env-tok"));
        assert_eq!(i.command, Command::List);
        let file = |_: &PathBuf| Ok("file-tok\n".to_string());
        let i = parse_args(
            &args("--addr 10.0.0.1:1 --token-file /t --json status"),
            &env,
            &file,
        )
        .unwrap();
        assert_eq!(
            (i.addr.as_str(), i.token.as_deref(), i.json),
            ("10.0.0.1:1", Some("file-tok"), true)
        );
        let i = parse_args(&args("status"), &no_env, &no_file).unwrap();
        assert_eq!((i.addr.as_str(), i.token), (DEFAULT_ADDR, None));
    }

    #[test]
    fn key_commands_and_their_requests() {
        let i = parse_args(
            &args("keys disable open/ai k1 --reason rotating"),
            &no_env,
            &no_file,
        )
        .unwrap();
        let (method, path, body) = request_of(&i.command);
        assert_eq!(method, "POST");
        assert_eq!(path, "/admin/v1/keys/open%2Fai/k1/disable");
        assert_eq!(body.as_deref(), Some(r#"{"reason":"rotating"}"#));
        let i = parse_args(&args("keys test openai k1"), &no_env, &no_file).unwrap();
        assert_eq!(request_of(&i.command).1, "/admin/v1/keys/openai/k1/test");
        assert_eq!(request_of(&Command::Status).1, "/admin/v1/status");
    }

    #[test]
    fn add_and_remove_and_their_requests() {
        let i = parse_args(
            &args("keys add openai k4 --account org1 --weight 2 --secret-file /s"),
            &no_env,
            &no_file,
        )
        .unwrap();
        assert_eq!(
            i.command,
            Command::Add {
                upstream: "openai".into(),
                key: "k4".into(),
                account: Some("org1".into()),
                weight: Some(2),
                secret_file: Some("/s".into()),
            }
        );
        let (method, path, body) = request_of(&i.command);
        assert_eq!(
            (method, path.as_str(), body),
            ("POST", "/admin/v1/keys/openai", None)
        );
        let body: Value = serde_json::from_str(&add_body(&i.command, "sk-1").unwrap()).unwrap();
        assert_eq!(
            body,
            json!({"name": "k4", "secret": "sk-1", "account": "org1", "weight": 2})
        );
        let i = parse_args(&args("keys remove openai k4"), &no_env, &no_file).unwrap();
        let (method, path, _) = request_of(&i.command);
        assert_eq!(
            (method, path.as_str()),
            ("DELETE", "/admin/v1/keys/openai/k4")
        );
        assert_eq!(action_text(&i.command, &json!({})), "key openai/k4 removed");
    }

    #[test]
    fn the_secret_comes_from_a_file_or_standard_input_never_the_command_line() {
        let e =
            parse_args(&args("keys add openai k --secret sk-1"), &no_env, &no_file).unwrap_err();
        assert!(e.contains("never taken on the command line"), "{e}");
        assert!(!e.contains("sk-1"));
        let file = |_: &PathBuf| Ok("sk-from-file\nignored\n".to_string());
        let stdin = || Ok("  sk-from-stdin \n".to_string());
        let empty = || Ok("\n".to_string());
        let path = PathBuf::from("/s");
        assert_eq!(
            read_secret(Some(&path), &file, &stdin).unwrap(),
            "sk-from-file"
        );
        assert_eq!(read_secret(None, &file, &stdin).unwrap(), "sk-from-stdin");
        assert_eq!(
            read_secret(None, &file, &empty).unwrap_err(),
            "no secret on standard input"
        );
        assert!(read_secret(Some(&path), &no_file, &stdin)
            .unwrap_err()
            .starts_with("cannot read /s"));
    }

    #[test]
    fn usage_mistakes_and_tokens_on_the_command_line_are_refused() {
        for bad in [
            "",
            "keys",
            "keys disable openai",
            "keys remove openai",
            "keys add openai",
            "keys list --account a",
            "keys add openai k --weight 0",
            "keys add openai k --weight x",
            "status --bogus",
            "keys enable openai k --reason x",
            "status --addr",
        ] {
            assert!(
                parse_args(&args(bad), &no_env, &no_file).is_err(),
                "{bad:?}"
            );
        }
        let e = parse_args(&args("--token sekrit status"), &no_env, &no_file).unwrap_err();
        assert!(e.contains("never taken on the command line"), "{e}");
        assert!(!e.contains("sekrit"), "{e}");
        let e = parse_args(&args("--token-file /nope status"), &no_env, &no_file).unwrap_err();
        assert!(e.starts_with("cannot read /nope"), "{e}");
    }

    #[test]
    fn an_answer_is_read_by_its_length() {
        let raw = b"HTTP/1.1 404 Not Found\r\ncontent-length: 2\r\n\r\n{}extra";
        let (status, body) = read_answer(&mut &raw[..]).unwrap();
        assert_eq!((status, body.as_slice()), (404, &b"{}"[..]));
        assert!(read_answer(&mut &b"HTTP/1.1 200 OK\r\n"[..]).is_err());
    }

    #[test]
    fn tables_show_keys_routes_and_clients() {
        let key = json!({"upstream":"openai","name":"k1","id":"ab12","source":"config","account":null,"state":"cooling",
            "reason":null,"note":null,"cooldowns":[{"model":"gpt-4o","remaining_ms":2500}],"in_flight":1});
        let t = keys_table(std::slice::from_ref(&key));
        assert!(t.starts_with("UPSTREAM  KEY"), "{t}");
        assert!(
            t.contains("openai    k1   ab12  config  -        cooling  -       gpt-4o 3s  1"),
            "{t}"
        );
        let status = json!({"upstreams":[{"name":"openai","api":"openai",
            "endpoints":[{"addr":"127.0.0.1:9","healthy":true,"ejected":false}],"keys":[key]}],
            "routes":[{"name":"chat","models":[],"path_prefix":null,"upstreams":["openai"]}],
            "clients":[{"name":"team","limits":{"rpm":10,"tpm":null,"concurrency":null,"budget":null,"budget_per":null},
            "in_flight":0,"budget_used":0,"budget_left":null}]});
        let t = status_text(&status);
        assert!(t.contains("0 ready, 1 cooling, 0 disabled"), "{t}");
        assert!(t.contains("127.0.0.1:9 up"), "{t}");
        assert!(t.contains("chat   *"), "{t}");
        assert!(t.contains("team    rpm 10"), "{t}");
        let manual = json!({"reason":"manual","note":"rotating","state":"disabled","cooldowns":[]});
        assert!(keys_table(&[manual]).contains("manual: rotating"));
    }
}
