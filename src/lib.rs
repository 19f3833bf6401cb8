//! keygate — an LLM API gateway and key load balancer on Pingora.
//!
//! # Layout
//!
//! Data flows from the config through the pools and routes to the proxy hooks, then out to
//! metrics and logs; background upkeep feeds key and endpoint states back:
//!
//! ```text
//! config ──► keys / routes / upstreams / clients ──► proxy hooks ──► usage, metrics, access log
//!                       ▲                                  │
//!                       └──── prober, state file ◄─────────┘   (background)
//! ```
//!
//! The modules stand in layers, bottom first. A module uses only its own layer and the layers
//! below it, no modules import each other in a cycle, only [`server`] uses [`proxy`], and nothing
//! below the glue touches Pingora's proxy crate: `tests/layout.rs` checks all of it against the
//! imports, so this tour stays true.
//!
//! 1. **Parsers and primitives**: [`clock`] (injected time; dates come from `jiff` and
//!    `httpdate`), [`append_only`] (a list that grows without moving its items), [`private_file`]
//!    (owner-only files replaced atomically),
//!    [`glob`] (model patterns), [`request_body`] (`model`/`stream` from a body without a full
//!    parse; alias rewrite), [`usage`] (token usage from JSON and SSE answers, OpenAI's and
//!    Anthropic's), [`retry_after`] (what an upstream's 429 asks for, Anthropic's reset times
//!    included), [`error_body`] (the code of an upstream's error body and
//!    whom a refusal blames), [`redact`] (keys and account ids masked out of error bodies),
//!    [`strategy`] (the order of a route's upstreams),
//!    [`access_log`] (one JSON line per request).
//!
//! 2. **Decisions**, plain Rust without sockets: [`body_budget`] (the cap on request-body bytes
//!    held at once), [`keys`] (the [`keys::KeyPool`]: per-key
//!    state, cooling per model, disabled, the headroom its upstream's rate-limit headers report, and
//!    selection), [`outcome`] (what a status means for a
//!    key), [`outlier`] (endpoint ejection after consecutive failures), [`clients`] (gateway
//!    tokens, per-client and per-IP limits, addresses behind proxies), [`local_response`]
//!    (keygate's own OpenAI-shaped errors), [`retry_policy`] (after each attempt: try elsewhere
//!    or answer), [`routes`] (which upstreams serve a model or path, with their plan),
//!    [`translate`] (OpenAI chat completions to Anthropic messages and back),
//!    [`cache`] (the response cache: canonical request keys, the bounded in-memory store,
//!    `Cache-Control`, one upstream request for identical misses), [`key_activity`] (each key's
//!    requests and errors over the last minute and hour, last use, last error, next probe),
//!    [`resources`] (files, batches, vector stores, stored responses… and the account that
//!    owns each).
//!
//! 3. **Configuration**: [`config`] (the YAML file: types, secrets through an injected source,
//!    validation with precise messages).
//!
//! 4. **Run-time parts**: [`header_rules`] (what leaves for the upstream, what comes back),
//!    [`upstream`] (one upstream: base URL, auth style, keys, endpoints, discovery, probes),
//!    [`metrics`] (Prometheus metrics and the health endpoints), [`state_file`] (key states
//!    kept across restarts and upgrades), [`key_store`] (keys added at run time: sealed with
//!    AES-256-GCM, stored, put into the pools).
//!
//! 5. **Background and connections**: [`prober`] (key probes, quota checks, keep-warm,
//!    endpoint returns), [`conn_guard`] (per-connection guards below Pingora's HTTP/1 parser),
//!    [`drain`] (a graceful stop that exits once nothing is left in flight), [`memory_upkeep`]
//!    (freed memory handed back to the system after a burst), [`shared`] (key states and
//!    client limits shared by several instances through Redis), [`admin`] (the admin API on
//!    its own listener: status, rates, key disable/enable/test, and the status page on it).
//!
//! 6. **Proxy glue**: [`proxy`] (the Pingora `ProxyHttp` hooks: thin, calling the layers above).
//!
//! 7. **Wiring**: [`server`] (a validated config turned into a running Pingora server) and
//!    [`cli`] (the command line).
//!
//! Anthropic upstreams (`api: anthropic`) run through the same layers: their header rules in
//! [`header_rules`], their statuses in [`outcome`] and [`error_body`], their error shape in
//! [`local_response`].
//!
//! The mock OpenAI (and Anthropic) upstream used by the demo, the tests and the benchmarks is the `keygate-mock`
//! crate (`tests/mock/`), a workspace member that only the gateway's tests depend on.

pub mod access_log;
pub mod admin;
pub mod append_only;
pub mod body_budget;
pub mod cache;
pub mod cli;
pub mod clients;
pub mod clock;
pub mod config;
pub mod conn_guard;
pub mod drain;
pub mod error_body;
pub mod glob;
pub mod header_rules;
pub mod key_activity;
pub mod key_store;
pub mod keys;
pub mod local_response;
pub mod memory_upkeep;
pub mod metrics;
pub mod outcome;
pub mod outlier;
pub mod private_file;
pub mod prober;
pub mod proxy;
pub mod redact;
pub mod request_body;
pub mod resources;
pub mod retry_after;
pub mod retry_policy;
pub mod routes;
pub mod server;
pub mod shared;
pub mod state_file;
pub mod strategy;
pub mod translate;
pub mod upstream;
pub mod usage;
