//! Request-header guards below Pingora's HTTP/1 parser.
//!
//! Pingora reads a request header with a timeout per read (so a client sending one byte a second
//! is never cut off), accepts up to 1 MiB and 256 header fields, and waits for the next request on
//! a keep-alive connection without limit. None of that is reachable from a `ProxyHttp` hook, which
//! runs only once the header is parsed. So keygate wraps every accepted connection in a
//! [`GuardedStream`] that watches the bytes Pingora reads:
//!
//! - a fresh connection must send its first byte within `header_timeout` (as nginx's
//!   `client_header_timeout` does from accept), else it is closed silently;
//! - each HTTP/1 request header must be complete within `header_timeout` of its first byte, else
//!   the client gets `408` and the connection closes;
//! - a header over `max_header_bytes` or `max_headers` gets `431` and the connection closes;
//! - a malformed head that Pingora would rewrite and forward rather than refuse gets `400` and
//!   the connection closes, before any of its bytes reach Pingora (see [`HeadProblem`]);
//! - a keep-alive connection idle for `idle_timeout` between requests is closed silently.
//!
//! HTTP/2 (h2c prior knowledge or TLS ALPN `h2`) is left alone after its preface: Pingora's own
//! `h2_idle_timeout`, which counts in-flight streams, is set to `idle_timeout` instead.
//!
//! [`GuardedApp`] wraps the proxy app: it puts each new connection in a [`GuardedStream`] and, as
//! Pingora starts each HTTP/1 request on a kept-alive connection, tells the stream a new request
//! begins (so the idle timer, then the header timer, apply again). Knowing where a request starts
//! from Pingora rather than guessing it from traffic matters: a `100 Continue` is a write before
//! the request body, which a "first read after a write" rule would mistake for a new header.
//!
//! It also keeps idle connections small. Pingora's proxy builds its per-request future (about
//! 16 KB) as soon as it is handed a session, and an idle keep-alive connection would hold one
//! while it waits; the generic connection future also has room for HTTP/2. So HTTP/1 connections
//! run their keep-alive loop here, and each request's session goes to the proxy only once its
//! first byte has arrived: 46 KiB → 17 KiB per idle connection (BENCHMARKS.md).
//!
//! # Parts
//!
//! ```text
//!   Pingora listener
//!         │ each accepted connection (after TLS)
//!         ▼
//!   GuardedApp (app.rs) ─────────────────► keygate's proxy app, one HTTP/1 request at a time
//!         │ wraps the stream, runs the         (HTTP/2: Pingora's own connection handling)
//!         │ HTTP/1 keep-alive loop, marks
//!         │ where each request starts
//!         ▼
//!   GuardedStream (stream.rs): the timers and the 408/431/400 answers, around the L4 stream
//!         │ the bytes of each request header
//!         ▼
//!   HeaderScan (scan.rs): pure; where a header ends, how many bytes and fields it has, and
//!                         what of its syntax must be judged on raw bytes
//! ```

mod app;
mod scan;
mod stream;

pub use app::{GuardedApp, OpenConnections};
pub use scan::{HeadProblem, HeaderScan, ScanVerdict};
pub use stream::GuardedStream;

use std::time::Duration;

/// The limits one connection is held to; built from the `guards:` config section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuardSettings {
    /// How long a whole HTTP/1 request header may take from its first byte (and how long a new
    /// connection may stay silent). Default 10 s.
    pub header_timeout: Duration,
    /// Largest request header (request line, fields and the blank line). Default 32 KiB.
    pub max_header_bytes: usize,
    /// Most header fields in one request. Default 100.
    pub max_headers: usize,
    /// How long a keep-alive connection may wait for its next request (HTTP/1), or stay without
    /// an in-flight stream (HTTP/2). Default 60 s.
    pub idle_timeout: Duration,
}

impl Default for GuardSettings {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            max_header_bytes: 32 * 1024,
            max_headers: 100,
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// The `guards:` section's connection limits (its deny rules are applied later, in the proxy).
impl From<&crate::config::GuardsConfig> for GuardSettings {
    fn from(g: &crate::config::GuardsConfig) -> Self {
        Self {
            header_timeout: g.header_timeout,
            max_header_bytes: g.max_header_bytes,
            max_headers: g.max_headers,
            idle_timeout: g.idle_timeout,
        }
    }
}

// https://datatracker.ietf.org/doc/html/rfc9113#section-3.4
// Shared: the stream lets it through unscanned, the app peeks for it (h2c).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
