//! Options turned into a running mock: the shared state, a runtime and a bound listener, then
//! serving in the foreground (the command) or in the background behind a handle (tests).

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::HeaderValue;
use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tokio_rustls::TlsAcceptor;

use crate::cli::{self, Command, Options};
use crate::registry::Registry;
use crate::reply::{Common, Ids};
use crate::server;
use crate::service::{App, Generation};
use crate::stats::Stats;
use crate::{openai, spec, tls};

/// Models `GET /v1/models` always lists.
const BUILTIN_MODELS: [&str; 4] = [
    "gpt-4o",
    "gpt-4o-mini",
    "gpt-3.5-turbo",
    "text-embedding-3-small",
];

/// The `keygate-mock` command on `args` (those after the program name): prints the help, or
/// runs the mock until the process is killed. Exit code 2 is a usage error, 1 a failed start.
pub fn cli_main(args: impl IntoIterator<Item = String>) -> ExitCode {
    let options = match cli::parse(args) {
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

/// Serves in the foreground, after printing where.
fn run(o: Options) -> Result<(), String> {
    let bound = bind(o)?;
    let mut out = std::io::stdout().lock();
    // Scripts started with port 0 read this line to learn the port, so flush it at once.
    writeln!(out, "keygate-mock listening on {}", bound.url())
        .and_then(|()| out.flush())
        .map_err(|e| format!("stdout: {e}"))?;
    drop(out);
    let Bound {
        runtime,
        listener,
        tls,
        app,
        ..
    } = bound;
    runtime.block_on(server::serve(listener, tls, app));
    Ok(())
}

/// Starts a mock from the options the command line takes (e.g. `["--listen", "127.0.0.1:0",
/// "--key", "sk-a=429"]`), serving on a runtime of its own until the handle is dropped.
pub fn spawn(args: &[&str]) -> Result<RunningMock, String> {
    let options = match cli::parse(args.iter().map(|a| a.to_string()))? {
        Command::Run(options) => *options,
        Command::Help => return Err("--help asks for the usage text, not a mock".into()),
    };
    let Bound {
        runtime,
        listener,
        tls,
        app,
        addr,
    } = bind(options)?;
    let scheme = scheme(&tls);
    runtime.spawn(server::serve(listener, tls, Arc::clone(&app)));
    Ok(RunningMock {
        addr,
        scheme,
        app,
        runtime: Some(runtime),
    })
}

/// A mock serving in the background; dropping it stops the mock (listener closed, connections
/// dropped) before the drop returns.
pub struct RunningMock {
    addr: SocketAddr,
    scheme: &'static str,
    app: Arc<App>,
    runtime: Option<Runtime>,
}

impl RunningMock {
    /// The bound address (with the real port when `--listen` asked for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http`, or `https` with `--tls-cert`.
    pub fn scheme(&self) -> &'static str {
        self.scheme
    }

    /// `scheme://ip:port`.
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    /// The `/_mock/stats` JSON, read in process: asking costs no connection of its own, so
    /// its `connections` count is only what others opened.
    pub fn stats_json(&self) -> Vec<u8> {
        self.app.stats.to_json(self.app.name.as_deref())
    }
}

impl Drop for RunningMock {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            // Dropping a runtime waits for its workers, which tokio forbids inside async code
            // (where tests hold the handle); a plain thread may wait, and joining it makes the
            // stop complete when this returns.
            let _ = std::thread::spawn(move || drop(runtime)).join();
        }
    }
}

/// Everything serving needs, bound but not yet accepting.
struct Bound {
    runtime: Runtime,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    app: Arc<App>,
    addr: SocketAddr,
}

impl Bound {
    fn url(&self) -> String {
        format!("{}://{}", scheme(&self.tls), self.addr)
    }
}

fn scheme(tls: &Option<TlsAcceptor>) -> &'static str {
    if tls.is_some() {
        "https"
    } else {
        "http"
    }
}

/// Reads the behaviours file and the TLS files, builds the state and the runtime, and binds.
fn bind(o: Options) -> Result<Bound, String> {
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
        registry: Registry::new(keys, o.strict, o.latency, start)
            .with_minute(Duration::from_secs(60) / o.time_scale),
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
        objects: crate::objects::Objects::new(o.accounts.clone()),
    });

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(o.threads)
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))?;
    let listen_error = |e: std::io::Error| format!("listen on {}: {e}", o.listen);
    // The listener registers with the runtime's reactor, so it is made inside the runtime.
    let listener = {
        let _inside = runtime.enter();
        server::bind(o.listen).map_err(listen_error)?
    };
    let addr = listener.local_addr().map_err(listen_error)?;
    Ok(Bound {
        runtime,
        listener,
        tls,
        app,
        addr,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpStream;

    /// One plain HTTP/1.1 request over a fresh connection; the whole response as text.
    fn get(addr: SocketAddr, path: &str) -> String {
        let mut conn = TcpStream::connect(addr).unwrap();
        write!(
            conn,
            "GET {path} HTTP/1.1\r\nHost: mock\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut text = String::new();
        conn.read_to_string(&mut text).unwrap();
        text
    }

    #[test]
    fn spawned_mock_serves_on_the_port_it_bound_and_stops_on_drop() {
        let mock = spawn(&["--listen", "127.0.0.1:0", "--name", "m1"]).unwrap();
        let addr = mock.addr();
        assert_ne!(addr.port(), 0);
        assert_eq!(mock.scheme(), "http");
        assert_eq!(mock.url(), format!("http://{addr}"));
        let local: serde_json::Value = serde_json::from_slice(&mock.stats_json()).unwrap();
        assert_eq!(local["connections"], 0, "asking in process opens nothing");
        assert_eq!(local["name"], "m1");
        let reply = get(addr, "/_mock/stats");
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        assert!(reply.contains("x-mock-name: m1"), "{reply}");
        assert!(
            reply.contains("\"connections\":1"),
            "its own connection: {reply}"
        );
        let local: serde_json::Value = serde_json::from_slice(&mock.stats_json()).unwrap();
        assert_eq!(local["connections"], 1);
        drop(mock);
        assert!(TcpStream::connect(addr).is_err(), "the listener is closed");
    }

    #[tokio::test]
    async fn dropping_a_spawned_mock_inside_async_code_does_not_panic() {
        let mock = spawn(&["--listen", "127.0.0.1:0"]).unwrap();
        let addr = mock.addr();
        drop(mock);
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }

    #[test]
    fn spawn_refuses_bad_options_and_help() {
        let err = |args: &[&str]| spawn(args).err().unwrap();
        assert!(err(&["--bogus"]).contains("unknown argument"));
        assert!(err(&["--help"]).contains("--help"));
        assert!(err(&[
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            "/nonexistent/c.pem",
            "--tls-key",
            "/nonexistent/k.pem"
        ])
        .contains("/nonexistent/c.pem"));
    }
}
