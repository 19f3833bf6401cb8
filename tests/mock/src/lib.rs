//! `keygate-mock`: a fast mock of the OpenAI API for demos, integration tests and benchmarks.
//!
//! Layout: `cli` (flags) → `spec` (behaviour parsing) → `behavior` (pure decisions) →
//! `registry` (per-key state, with `limits`: requests and tokens per minute) → `service` (one request) using `request`, `openai`, `reply`,
//! `sse`, `body`, `stats`, and `anthropic` (Anthropic's Messages API, streamed through
//! `event_list`); `debug` serves `/_mock/*`; `server` and `tls` accept connections;
//! `launch` turns options into a running mock, in the foreground ([`cli_main`], the binary) or
//! in the background behind a handle ([`spawn`], keygate's integration tests).

mod anthropic;
mod behavior;
mod body;
mod cli;
mod debug;
mod event_list;
mod launch;
mod limits;
mod objects;
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

pub use launch::{cli_main, spawn, RunningMock};
