//! `keygate-mock`: a fast mock of the OpenAI API for demos, integration tests and benchmarks.
//!
//! Layout: `cli` (flags) → `spec` (behaviour parsing) → `behavior` (pure decisions) →
//! `registry` (per-key state) → `service` (one request) using `request`, `openai`, `reply`,
//! `sse`, `body`, `stats`; `debug` serves `/_mock/*`; `server` and `tls` accept connections.

mod behavior;
mod body;
mod cli;
mod debug;
mod openai;
mod registry;
mod reply;
mod request;
mod server;
mod service;
mod spec;
mod sse;
mod stats;
mod tls;

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use http::HeaderValue;

use crate::cli::{Command, Options};
use crate::registry::Registry;
use crate::reply::{Common, Ids};
use crate::service::{App, Generation};
use crate::stats::Stats;

/// Models `GET /v1/models` always lists.
const BUILTIN_MODELS: [&str; 4] = [
    "gpt-4o",
    "gpt-4o-mini",
    "gpt-3.5-turbo",
    "text-embedding-3-small",
];

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let options = match cli::parse(std::env::args().skip(1)) {
        Ok(Command::Help) => {
            print!("{}", cli::HELP);
            return ExitCode::SUCCESS;
        }
        Ok(Command::Run(options)) => options,
        Err(e) => {
            eprintln!("keygate-mock: {e}\nTry `keygate-mock --help`.");
            return ExitCode::from(2);
        }
    };
    match run(*options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keygate-mock: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(o: Options) -> Result<(), String> {
    let start = Instant::now();
    let mut keys = Vec::new();
    if let Some(path) = &o.behaviors {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        keys = spec::parse_file(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    // --key comes last so it overrides the file (the registry keeps the last duplicate).
    keys.extend(o.keys);
    let tls = match &o.tls {
        Some((cert, key)) => Some(tls::acceptor(cert, key)?),
        None => None,
    };

    let mut models: Vec<String> = BUILTIN_MODELS.iter().map(|m| m.to_string()).collect();
    for m in o.models {
        if !models.contains(&m) {
            models.push(m);
        }
    }
    let app = Arc::new(App {
        registry: Registry::new(keys, o.strict, o.latency, start),
        stats: Stats::new(start),
        models_json: openai::model_list(&models),
        models,
        generation: Generation {
            chunks: o.chunks,
            interval: o.chunk_interval,
            completion_tokens: o.completion_tokens,
        },
        common: Common {
            name: o
                .name
                .as_deref()
                .and_then(|n| HeaderValue::from_str(n).ok()),
        },
        name: o.name,
        ids: Ids::new(),
        default_latency: o.latency,
    });

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(o.threads)
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))?;
    runtime.block_on(async move {
        let listener =
            server::bind(o.listen).map_err(|e| format!("listen on {}: {e}", o.listen))?;
        let local = listener
            .local_addr()
            .map_err(|e| format!("listen on {}: {e}", o.listen))?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut out = std::io::stdout().lock();
        // Tests started with port 0 read this line to learn the port, so flush it at once.
        writeln!(out, "keygate-mock listening on {scheme}://{local}")
            .and_then(|()| out.flush())
            .map_err(|e| format!("stdout: {e}"))?;
        drop(out);
        server::serve(listener, tls, app).await;
        Ok(())
    })
}
