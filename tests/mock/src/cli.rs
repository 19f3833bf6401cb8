//! The command line, parsed by hand (`--flag VALUE` or `--flag=VALUE`).

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use http::HeaderValue;

use crate::behavior::Behavior;
use crate::spec;

/// `--help` text.
pub const HELP: &str = "\
keygate-mock: a fast mock of the OpenAI API for demos, integration tests and benchmarks

USAGE:
    keygate-mock [OPTIONS]

OPTIONS:
    --listen ADDR            address to listen on [default: 127.0.0.1:8000]; port 0 picks one.
                             Prints `keygate-mock listening on http(s)://IP:PORT` once bound.
    --tls-cert FILE          serve HTTPS with this PEM certificate chain (needs --tls-key)
    --tls-key FILE           PEM private key for --tls-cert
    --behaviors FILE         YAML file of per-key behaviours (keys: {SECRET: SPEC, ...})
    --key SECRET=SPEC        one key's behaviour inline; repeatable; overrides --behaviors
    --account SECRET=NAME    the key's account: files and batches it makes are its account's
                             (another account's key gets 404); a key without one is its own
    --strict                 unlisted keys get 401 invalid_api_key (default: served as `ok`)
    --latency DURATION       delay before every response header [default: 0ms]
    --threads N              runtime worker threads [default: 2]
    --name NAME              echoed in the `x-mock-name` response header
    --models A,B,...         extra models for GET /v1/models
    --chunks N               content chunks per stream [default: 5]
    --chunk-interval DUR     pause between stream chunks [default: 0ms]
    --completion-tokens N    completion tokens per reply [default: 12]
    --time-scale N           `limit` minutes last 60/N real seconds (60: one second); reset
                             headers tell real time [default: 1]
    -h, --help               this text

SPEC (inline grammar):  MODE[:param=value]*
    MODE: ok | rate_limit | unauthorized | forbidden | insufficient_quota | server_error |
          bad_request | break_stream | limit, or a status: 200 400 401 403 429 5xx
    any mode:      first=N  window=DUR  latency=DUR  models=a,b
    error modes:   echo_key=true (the error message carries the whole key)
    rate_limit:    retry_after=SECS  retry_after_ms=MS  retry_after_date=true
                   reset_requests=6m0s  org_wide=true
    server_error:  status=5xx        break_stream: after=N
    limit:         rpm=N  tpm=N (requests and tokens per minute; x-ratelimit-* or
                   anthropic-ratelimit-* headers on every answer, 429 past them)
    e.g. --key sk-a=ok --key sk-b=429:retry_after=2:first=3 --key sk-c=401

DEBUG ENDPOINTS (no credential):
    GET /_mock/stats   POST /_mock/reset[?restore=true]   GET|POST /_mock/behavior
    POST /_mock/consume {key, requests, tokens}: spend a `limit` key's minute elsewhere
";

/// Validated options.
#[derive(Debug)]
pub struct Options {
    /// Where to listen.
    pub listen: SocketAddr,
    /// Certificate and key files, for HTTPS.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// `--behaviors` file.
    pub behaviors: Option<PathBuf>,
    /// `--key` behaviours, in order.
    pub keys: Vec<(String, Behavior)>,
    /// Refuse unlisted keys.
    pub strict: bool,
    /// Default latency.
    pub latency: Duration,
    /// Worker threads.
    pub threads: usize,
    /// `x-mock-name`.
    pub name: Option<String>,
    /// Extra models.
    pub models: Vec<String>,
    /// Chunks per stream.
    pub chunks: u32,
    /// Pause between chunks.
    pub chunk_interval: Duration,
    /// Completion tokens per reply.
    pub completion_tokens: u64,
    /// `--account` pairs: key, account.
    pub accounts: Vec<(String, String)>,
    /// How many times faster than real time a `limit` minute runs.
    pub time_scale: u32,
}

/// What the command line asks for.
#[derive(Debug)]
pub enum Command {
    /// Print `HELP`.
    Help,
    /// Run the mock.
    Run(Box<Options>),
}

/// Parses the arguments after the program name.
pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Command, String> {
    let mut o = Options {
        listen: SocketAddr::from(([127, 0, 0, 1], 8000)),
        tls: None,
        behaviors: None,
        keys: Vec::new(),
        strict: false,
        latency: Duration::ZERO,
        threads: 2,
        name: None,
        models: Vec::new(),
        chunks: 5,
        chunk_interval: Duration::ZERO,
        completion_tokens: 12,
        accounts: Vec::new(),
        time_scale: 1,
    };
    let (mut cert, mut key) = (None, None);
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = || -> Result<String, String> {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "--strict" => o.strict = true,
            "--listen" => o.listen = address(&value()?)?,
            "--tls-cert" => cert = Some(PathBuf::from(value()?)),
            "--tls-key" => key = Some(PathBuf::from(value()?)),
            "--behaviors" => o.behaviors = Some(PathBuf::from(value()?)),
            "--key" => o.keys.push(spec::parse_key_arg(&value()?)?),
            "--account" => {
                let v = value()?;
                let (key, account) = v
                    .split_once('=')
                    .filter(|(k, a)| !k.is_empty() && !a.is_empty())
                    .ok_or_else(|| format!("--account needs SECRET=NAME, not `{v}`"))?;
                o.accounts.push((key.to_string(), account.to_string()));
            }
            "--latency" => o.latency = duration(&flag, &value()?)?,
            "--chunk-interval" => o.chunk_interval = duration(&flag, &value()?)?,
            "--threads" => o.threads = number(&flag, &value()?, 1)?,
            "--chunks" => o.chunks = number(&flag, &value()?, 1)?,
            "--completion-tokens" => o.completion_tokens = number(&flag, &value()?, 0)?,
            "--time-scale" => o.time_scale = number(&flag, &value()?, 1)?,
            "--name" => {
                let name = value()?;
                HeaderValue::from_str(&name)
                    .map_err(|_| format!("--name `{name}` cannot be sent as a header value"))?;
                o.name = Some(name);
            }
            "--models" => {
                let list = value()?;
                o.models.extend(
                    list.split(',')
                        .map(str::trim)
                        .filter(|m| !m.is_empty())
                        .map(str::to_string),
                );
            }
            _ => return Err(format!("unknown argument `{arg}`")),
        }
    }
    o.tls = match (cert, key) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        (Some(_), None) => return Err("--tls-cert needs --tls-key".into()),
        (None, Some(_)) => return Err("--tls-key needs --tls-cert".into()),
    };
    Ok(Command::Run(Box::new(o)))
}

fn address(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    text.to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| format!("--listen `{text}`: expected IP:PORT, e.g. 127.0.0.1:8000"))
}

fn duration(flag: &str, text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|e| format!("{flag} `{text}`: {e} (expected e.g. 5ms, 1s)"))
}

fn number<T: std::str::FromStr + PartialOrd + From<u8>>(
    flag: &str,
    text: &str,
    min: u8,
) -> Result<T, String> {
    match text.parse::<T>() {
        Ok(n) if n >= T::from(min) => Ok(n),
        _ => Err(format!("{flag} `{text}`: expected a whole number >= {min}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<Options, String> {
        match parse(args.iter().map(|s| s.to_string()))? {
            Command::Run(o) => Ok(*o),
            Command::Help => Err("help".into()),
        }
    }

    #[test]
    fn defaults() {
        let o = run(&[]).expect("ok");
        assert_eq!(o.listen.to_string(), "127.0.0.1:8000");
        assert_eq!((o.threads, o.chunks, o.completion_tokens), (2, 5, 12));
        assert!(!o.strict && o.tls.is_none() && o.keys.is_empty());
    }

    #[test]
    fn all_flags() {
        let o = run(&[
            "--listen=127.0.0.1:0",
            "--key",
            "sk-a=ok",
            "--key",
            "sk-b=429:retry_after=2:first=3",
            "--strict",
            "--latency",
            "5ms",
            "--threads",
            "4",
            "--name",
            "m1",
            "--models",
            "a, b",
            "--chunks",
            "3",
            "--chunk-interval",
            "10ms",
            "--completion-tokens",
            "7",
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
            "--behaviors",
            "b.yaml",
        ])
        .expect("ok");
        assert_eq!(o.listen.port(), 0);
        assert_eq!(o.keys.len(), 2);
        assert_eq!(o.keys[1].1.first, Some(3));
        assert!(o.strict);
        assert_eq!(o.latency, Duration::from_millis(5));
        assert_eq!(o.threads, 4);
        assert_eq!(o.name.as_deref(), Some("m1"));
        assert_eq!(o.models, vec!["a".to_string(), "b".to_string()]);
        assert_eq!((o.chunks, o.completion_tokens), (3, 7));
        assert_eq!(o.chunk_interval, Duration::from_millis(10));
        assert!(o.tls.is_some() && o.behaviors.is_some());
    }

    #[test]
    fn help() {
        assert!(matches!(parse(["--help".to_string()]), Ok(Command::Help)));
    }

    #[test]
    fn bad_flags_are_explained() {
        let err = |a: &[&str]| run(a).expect_err("should fail");
        assert!(err(&["--bogus"]).contains("unknown argument"));
        assert!(err(&["--listen"]).contains("needs a value"));
        assert!(err(&["--listen", "nowhere"]).contains("expected IP:PORT"));
        assert!(err(&["--threads", "0"]).contains(">= 1"));
        assert!(err(&["--latency", "5"]).contains("--latency"));
        assert!(err(&["--key", "sk-a"]).contains("SECRET=SPEC"));
        assert!(err(&["--key", "sk-a=teapot"]).contains("unknown mode"));
        assert!(err(&["--tls-cert", "c.pem"]).contains("--tls-key"));
        assert!(err(&["--name", "a\nb"]).contains("header"));
    }
}
