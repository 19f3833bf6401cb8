//! keygate — an LLM API gateway and key load balancer on Pingora.
//!
//! # Layout
//! Data flows top to bottom:
//!
//! ```text
//! config ──► keys / routes / upstreams / clients ──► proxy hooks ──► usage, metrics, access log
//!                       ▲                                  │
//!                       └──── prober, state file ◄─────────┘   (background)
//! ```
//!
//! - [`config`]: the YAML file: types, secret loading, validation with precise messages.
//! - [`clock`]: injected time sources (dates and calendar arithmetic come from `jiff` and
//!   `httpdate`).
//! - [`keys`]: [`keys::KeyPool`], per-key state (ready, cooling per model, disabled) and selection.
//! - [`retry_after`] and [`outcome`]: what an upstream's 429 asks for; what a status means for a key.
//! - [`glob`], [`routes`], [`strategy`]: which upstreams serve a model or path, and in what order.
//! - [`request_body`]: reading `model`/`stream` from a body without a full parse; alias rewrite.
//! - [`upstream`] and [`outlier`]: one upstream at run time (base URL, auth style, keys, endpoints,
//!   discovery, probes) and endpoint ejection after consecutive failures.
//! - [`clients`]: gateway tokens, per-client and per-IP limits, client addresses behind proxies.
//! - [`proxy`]: the Pingora `ProxyHttp` glue: thin, calling the modules above.
//! - [`usage`], [`metrics`], [`access_log`]: token accounting, Prometheus metrics with the health
//!   endpoints, one JSON line per request.
//! - [`prober`] and [`state_file`]: background upkeep (key probes, quota checks, keep-warm,
//!   endpoint returns) and key states kept across restarts and upgrades.
//! - [`conn_guard`]: per-connection guards below Pingora's HTTP/1 parser (408/431, idle timeout).
//! - [`server`] and [`cli`]: a validated config turned into a running Pingora server; the command line.
//!
//! The mock OpenAI upstream used by the demo, the tests and the benchmarks is the `keygate-mock`
//! binary (`src/bin/keygate-mock/`).

pub mod access_log;
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
