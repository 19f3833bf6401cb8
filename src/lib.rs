//! keygate — an LLM API gateway and key load balancer on Pingora.
//!
//! # Layout
//! Data flows top to bottom:
//!
//! ```text
//! config ──► upstream (KeyPool + Pingora LoadBalancer) / routes ──► proxy hooks ──► (metrics)
//! ```
//!
//! - [`access_log`]: one JSON line per request, written by a background thread.
//! - [`calendar`]: UTC calendar arithmetic for budgets and HTTP dates.
//! - [`clients`]: gateway tokens, per-client and per-IP limits, client addresses behind proxies.
//! - [`config`]: the YAML file: types, secret loading, validation with precise messages.
//! - [`clock`]: real and manual time sources, injected into everything time-driven.
//! - [`keys`]: [`keys::KeyPool`], per-key state (ready, cooling per model, disabled) and selection.
//! - [`retry_after`]: reading how long an upstream wants a key to wait after a 429.
//! - [`outcome`]: what an upstream status means for the key and endpoint that produced it.
//! - [`glob`] and [`routes`]: which upstreams serve which model or path.
//! - [`strategy`]: the order a route tries its upstreams in (fallback, weighted, fastest by TTFB).
//! - [`request_body`]: reading `model`/`stream` from a request body without a full parse; alias rewrite.
//! - [`outlier`]: endpoint ejection after consecutive 5xx/connect failures, with a percent cap.
//! - [`upstream`]: one upstream at run time: base URL, auth style, keys, endpoints, discovery, health.
//! - [`prober`]: background upkeep: disabled-key probes, quota checks, keep-warm pings.
//! - [`usage`]: token usage read from response bodies as they stream; hiding the injected usage chunk.
//! - [`proxy`]: the Pingora `ProxyHttp` glue: thin, calling the modules above.
//! - [`metrics`]: Prometheus metrics and the `/metrics`, `/healthz`, `/readyz` side port.
//! - [`conn_guard`]: per-connection guards below Pingora's HTTP/1 parser: header timeout and size caps
//!   (408/431), keep-alive idle timeout.
//! - [`server`]: turning a validated config into a running Pingora server.
//! - [`state_file`]: key states kept on disk across restarts and graceful upgrades.
//! - [`cli`]: the command line (`-c`, `-t`, `-u`, `-d`).
//!
//! The mock OpenAI upstream used by the demo, the tests and the benchmarks is the `keygate-mock`
//! binary (`src/bin/keygate-mock/`).

pub mod access_log;
pub mod calendar;
pub mod cli;
pub mod clients;
pub mod clock;
pub mod config;
pub mod conn_guard;
pub mod glob;
pub mod keys;
pub mod metrics;
pub mod outcome;
pub mod outlier;
pub mod prober;
pub mod proxy;
pub mod request_body;
pub mod retry_after;
pub mod routes;
pub mod server;
pub mod state_file;
pub mod strategy;
pub mod upstream;
pub mod usage;
