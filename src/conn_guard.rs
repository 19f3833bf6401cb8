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

use crate::proxy::errors::LocalResponse;
use async_trait::async_trait;
use bytes::{Buf, BytesMut};
use log::debug;
use pingora_core::apps::{HttpServerApp, HttpServerOptions, ReusedHttpStream, ServerApp};
use pingora_core::protocols::http::v2::server::H2Options;
use pingora_core::protocols::http::ServerSession;
use pingora_core::protocols::raw_connect::ProxyDigest;
use pingora_core::protocols::tls::{SslDigest, TlsRef};
use pingora_core::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use pingora_core::server::ShutdownWatch;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The limits one connection is held to. The lead wires these from the config file.
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

// https://datatracker.ietf.org/doc/html/rfc9113#section-3.4
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// After a 408/431, how long the connection lingers to deliver the answer and drain what the
/// client is still sending: closing with unread bytes makes the kernel send RST, which can destroy
/// the answer before the client reads it (nginx's `lingering_close` exists for the same reason).
const LINGER: Duration = Duration::from_secs(1);
/// At most this much is drained while lingering; a client flooding past it just gets the close.
const MAX_DRAIN: usize = 1 << 20;
/// Drained per poll before yielding, so a fast client cannot hold the worker thread.
const DRAIN_PER_POLL: usize = 64 * 1024;

/// What [`HeaderScan::feed`] concluded after a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanVerdict {
    /// The header is not complete yet.
    Partial,
    /// The header ended; this many bytes of the chunk belong to it (the rest is body).
    Complete(usize),
    /// The header grew past `max_header_bytes`.
    TooLarge,
    /// The header has more than `max_headers` fields.
    TooManyHeaders,
}

/// Finds the end of an HTTP/1 request header across reads and counts its bytes and fields.
///
/// A line ends at `\n` (a preceding `\r` is part of the ending), as httparse, Pingora's parser,
/// accepts bare LF too: stopping only at CRLFCRLF would scan into the body of such a request.
/// Empty lines before the request line are skipped, as RFC 9112 §2.2 allows and httparse does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderScan {
    bytes: usize,
    /// Non-empty lines so far: the request line, then one per field.
    lines: usize,
    /// Bytes of the current line before its `\n`.
    line_len: usize,
    /// Whether the current line's last byte so far is `\r`.
    last_cr: bool,
}

impl HeaderScan {
    /// Header bytes seen so far.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Feeds the next bytes read; only the newly read bytes are scanned (one memchr per line).
    pub fn feed(&mut self, chunk: &[u8], max_bytes: usize, max_headers: usize) -> ScanVerdict {
        let mut pos = 0;
        while let Some(i) = memchr::memchr(b'\n', &chunk[pos..]) {
            let nl = pos + i;
            let len = self.line_len + i;
            let last_cr = if i > 0 {
                chunk[nl - 1] == b'\r'
            } else {
                self.last_cr
            };
            self.bytes += i + 1;
            if self.bytes > max_bytes {
                return ScanVerdict::TooLarge;
            }
            self.line_len = 0;
            self.last_cr = false;
            pos = nl + 1;
            if len == 0 || (len == 1 && last_cr) {
                if self.lines > 0 {
                    return ScanVerdict::Complete(pos);
                }
                continue;
            }
            self.lines += 1;
            if self.lines - 1 > max_headers {
                return ScanVerdict::TooManyHeaders;
            }
        }
        let rest = &chunk[pos..];
        if let Some(&last) = rest.last() {
            self.bytes += rest.len();
            self.line_len += rest.len();
            self.last_cr = last == b'\r';
        }
        if self.bytes > max_bytes {
            return ScanVerdict::TooLarge;
        }
        ScanVerdict::Partial
    }
}

/// Why a connection is being (or was) closed by the guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exit {
    /// Idle too long: reads report end of stream, which Pingora takes as the client leaving.
    Idle,
    /// 408.
    HeaderTimeout,
    /// 431, header bytes.
    TooLarge,
    /// 431, header fields.
    TooManyHeaders,
}

#[derive(Debug)]
enum Phase {
    /// Waiting for the first byte of a request; the timer closes the connection silently.
    /// `first`: the connection's first request, which may turn out to be HTTP/2.
    Waiting { first: bool },
    /// Inside a request header; the timer is its deadline. `preface` counts the leading bytes
    /// that still match the HTTP/2 preface (first request only), which are scanned only once
    /// they stop matching: the preface itself contains a blank line.
    Header {
        scan: HeaderScan,
        preface: Option<usize>,
    },
    /// Bytes pass straight through: a request body or response time, or HTTP/2.
    Pass,
    /// Answering 408/431 and lingering; the timer bounds it.
    Rejecting {
        exit: Exit,
        response: Vec<u8>,
        written: usize,
        step: RejectStep,
        drained: usize,
    },
    /// Every further read ends the same way.
    Closed(Exit),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RejectStep {
    Write,
    Flush,
    Shutdown,
    Drain,
}

/// A connection watched by the guard; every Pingora `IO` trait is delegated to the inner stream.
#[derive(Debug)]
pub struct GuardedStream {
    inner: Stream,
    settings: GuardSettings,
    phase: Phase,
    /// One timer per connection, re-armed in place: the fresh, idle, header or linger deadline.
    timer: Pin<Box<Sleep>>,
    /// Bytes read by [`Peek::try_peek`] (already scanned), handed out again by reads first.
    rewind: BytesMut,
    /// Set by [`GuardedApp`] when Pingora starts an HTTP/1 request on this connection; an atomic
    /// because the app only reaches the stream through a shared reference.
    request_started: AtomicBool,
    /// Whether the first request's start was seen (that one is already covered from accept).
    first_request_seen: bool,
    /// TLS negotiated `h2`: the first bytes are the preface, nothing to guard.
    h2_by_alpn: bool,
}

impl GuardedStream {
    /// Wraps a freshly accepted connection (after any TLS handshake). Needs a Tokio runtime.
    pub fn new(inner: Stream, settings: GuardSettings) -> Self {
        let h2_by_alpn = matches!(inner.selected_alpn_proto(), Some(ALPN::H2));
        Self {
            inner,
            settings,
            phase: Phase::Waiting { first: true },
            timer: Box::pin(tokio::time::sleep(settings.header_timeout)),
            rewind: BytesMut::new(),
            request_started: AtomicBool::new(false),
            first_request_seen: false,
            h2_by_alpn,
        }
    }

    /// Tells the guard that Pingora is about to read a new HTTP/1 request on this connection.
    pub fn request_starts(&self) {
        self.request_started.store(true, Ordering::Relaxed);
    }

    /// The wrapped stream.
    pub fn inner(&self) -> &Stream {
        &self.inner
    }

    fn arm(&mut self, after: Duration) {
        self.timer.as_mut().reset(Instant::now() + after);
    }

    /// Applies a pending request start (exclusive access here, so no atomic operation).
    fn take_request_start(&mut self) {
        if !std::mem::take(self.request_started.get_mut()) {
            return;
        }
        if !self.first_request_seen {
            self.first_request_seen = true;
            return;
        }
        if matches!(
            self.phase,
            Phase::Pass | Phase::Waiting { .. } | Phase::Header { .. }
        ) {
            self.phase = Phase::Waiting { first: false };
            self.arm(self.settings.idle_timeout);
        }
    }

    fn reject(&mut self, exit: Exit) {
        debug!("connection guard: {}", exit_message(exit, &self.settings));
        self.phase = Phase::Rejecting {
            exit,
            response: error_response(exit, &self.settings),
            written: 0,
            step: RejectStep::Write,
            drained: 0,
        };
        self.arm(LINGER);
    }

    /// Looks at bytes just read while a request is awaited or its header is being read;
    /// `Err` means they must not be handed to Pingora.
    fn observe(&mut self, new: &[u8]) -> Result<(), Exit> {
        if let Phase::Waiting { first } = self.phase {
            if first && self.h2_by_alpn {
                self.phase = Phase::Pass;
                return Ok(());
            }
            self.phase = Phase::Header {
                scan: HeaderScan::default(),
                preface: first.then_some(0),
            };
            self.arm(self.settings.header_timeout);
        } else if Instant::now() >= self.timer.deadline() {
            // The bytes came after the deadline, before the timer had a chance to fire.
            return Err(Exit::HeaderTimeout);
        }
        let (max_bytes, max_headers) = (self.settings.max_header_bytes, self.settings.max_headers);
        let Phase::Header { scan, preface } = &mut self.phase else {
            return Ok(());
        };
        let mut verdict = ScanVerdict::Partial;
        if let Some(matched) = *preface {
            let n = new.len().min(H2_PREFACE.len() - matched);
            if new[..n] == H2_PREFACE[matched..matched + n] {
                if matched + n == H2_PREFACE.len() {
                    self.phase = Phase::Pass;
                } else {
                    *preface = Some(matched + n);
                }
                return Ok(());
            }
            *preface = None;
            verdict = scan.feed(&H2_PREFACE[..matched], max_bytes, max_headers);
        }
        if verdict == ScanVerdict::Partial {
            verdict = scan.feed(new, max_bytes, max_headers);
        }
        match verdict {
            ScanVerdict::Partial => Ok(()),
            ScanVerdict::Complete(_) => {
                self.phase = Phase::Pass;
                Ok(())
            }
            ScanVerdict::TooLarge => Err(Exit::TooLarge),
            ScanVerdict::TooManyHeaders => Err(Exit::TooManyHeaders),
        }
    }

    /// Writes the answer, closes our side, drains the client for a moment; Ready when done.
    fn poll_reject(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Phase::Rejecting {
            response,
            written,
            step,
            drained,
            ..
        } = &mut self.phase
        else {
            return Poll::Ready(());
        };
        let inner = &mut self.inner;
        let mut drained_now = 0;
        loop {
            let progress = match step {
                RejectStep::Write => {
                    match Pin::new(&mut *inner).poll_write(cx, &response[*written..]) {
                        Poll::Ready(Ok(n)) if n > 0 => {
                            *written += n;
                            if *written == response.len() {
                                *step = RejectStep::Flush;
                            }
                            Poll::Ready(true)
                        }
                        Poll::Ready(_) => Poll::Ready(false),
                        Poll::Pending => Poll::Pending,
                    }
                }
                RejectStep::Flush => match Pin::new(&mut *inner).poll_flush(cx) {
                    Poll::Ready(Ok(())) => {
                        *step = RejectStep::Shutdown;
                        Poll::Ready(true)
                    }
                    Poll::Ready(Err(_)) => Poll::Ready(false),
                    Poll::Pending => Poll::Pending,
                },
                RejectStep::Shutdown => match Pin::new(&mut *inner).poll_shutdown(cx) {
                    // A failed half-close still leaves the answer sent; drain either way.
                    Poll::Ready(_) => {
                        *step = RejectStep::Drain;
                        Poll::Ready(true)
                    }
                    Poll::Pending => Poll::Pending,
                },
                RejectStep::Drain => {
                    let mut scratch = [0u8; 4096];
                    let mut buf = ReadBuf::new(&mut scratch);
                    match Pin::new(&mut *inner).poll_read(cx, &mut buf) {
                        Poll::Ready(Ok(())) if !buf.filled().is_empty() => {
                            let n = buf.filled().len();
                            *drained += n;
                            drained_now += n;
                            if *drained > MAX_DRAIN {
                                Poll::Ready(false)
                            } else if drained_now >= DRAIN_PER_POLL {
                                cx.waker().wake_by_ref();
                                return Poll::Pending;
                            } else {
                                Poll::Ready(true)
                            }
                        }
                        // End of stream or an error: nothing left to protect the answer from.
                        Poll::Ready(_) => Poll::Ready(false),
                        Poll::Pending => Poll::Pending,
                    }
                }
            };
            match progress {
                Poll::Ready(true) => continue,
                Poll::Ready(false) => return Poll::Ready(()),
                Poll::Pending => {
                    return if self.timer.as_mut().poll(cx).is_ready() {
                        Poll::Ready(())
                    } else {
                        Poll::Pending
                    };
                }
            }
        }
    }

    /// A read from the inner stream, through the guard.
    fn poll_guarded_read(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.take_request_start();
        loop {
            match &self.phase {
                Phase::Pass => return Pin::new(&mut self.inner).poll_read(cx, buf),
                Phase::Waiting { .. } | Phase::Header { .. } => {
                    let before = buf.filled().len();
                    match Pin::new(&mut self.inner).poll_read(cx, buf) {
                        Poll::Ready(Ok(())) => {
                            if buf.filled().len() == before {
                                return Poll::Ready(Ok(())); // the client left: Pingora sees EOF
                            }
                            match self.observe(&buf.filled()[before..]) {
                                Ok(()) => return Poll::Ready(Ok(())),
                                Err(exit) => {
                                    buf.set_filled(before);
                                    self.reject(exit);
                                }
                            }
                        }
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => {
                            ready!(self.timer.as_mut().poll(cx));
                            if matches!(self.phase, Phase::Waiting { .. }) {
                                debug!("connection guard: idle connection closed");
                                self.phase = Phase::Closed(Exit::Idle);
                            } else {
                                self.reject(Exit::HeaderTimeout);
                            }
                        }
                    }
                }
                Phase::Rejecting { exit, .. } => {
                    let exit = *exit;
                    ready!(self.poll_reject(cx));
                    self.phase = Phase::Closed(exit);
                }
                Phase::Closed(exit) => {
                    return Poll::Ready(match exit {
                        Exit::Idle => Ok(()),
                        Exit::HeaderTimeout => Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            exit_message(*exit, &self.settings),
                        )),
                        Exit::TooLarge | Exit::TooManyHeaders => Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            exit_message(*exit, &self.settings),
                        )),
                    });
                }
            }
        }
    }
}

fn exit_message(exit: Exit, s: &GuardSettings) -> String {
    match exit {
        Exit::Idle => "The connection was idle for too long.".into(),
        Exit::HeaderTimeout => format!(
            "The request header was not received within {}.",
            humantime::format_duration(s.header_timeout)
        ),
        Exit::TooLarge => format!(
            "The request header is larger than this gateway accepts ({} bytes).",
            s.max_header_bytes
        ),
        Exit::TooManyHeaders => format!(
            "The request has more header fields than this gateway accepts ({}).",
            s.max_headers
        ),
    }
}

/// The whole HTTP/1.1 answer for a rejected header, written straight to the socket because
/// Pingora has no request to answer yet.
fn error_response(exit: Exit, s: &GuardSettings) -> Vec<u8> {
    let (status, reason, code) = match exit {
        Exit::HeaderTimeout | Exit::Idle => (408, "Request Timeout", "request_timeout"),
        Exit::TooLarge | Exit::TooManyHeaders => (
            431,
            "Request Header Fields Too Large",
            "request_header_too_large",
        ),
    };
    let body =
        LocalResponse::new(status, "invalid_request_error", code, exit_message(exit, s)).body();
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    out
}

impl AsyncRead for GuardedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.rewind.is_empty() {
            let n = this.rewind.len().min(buf.remaining());
            buf.put_slice(&this.rewind[..n]);
            this.rewind.advance(n);
            return Poll::Ready(Ok(()));
        }
        this.poll_guarded_read(cx, buf)
    }
}

impl AsyncWrite for GuardedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for GuardedStream {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl UniqueID for GuardedStream {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for GuardedStream {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for GuardedStream {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for GuardedStream {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for GuardedStream {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, socket_digest: SocketDigest) {
        self.inner.set_socket_digest(socket_digest)
    }
}

#[async_trait]
impl Peek for GuardedStream {
    /// Reads through the guard (so a client dribbling the bytes Pingora peeks for its h2c check
    /// meets the same timers) and keeps them for the next reads, as Pingora's TCP stream does.
    /// Returns early once an HTTP/1 header is complete: a short request such as
    /// `GET / HTTP/1.0\r\n\r\n` is under the preface's 24 bytes and would otherwise wait forever.
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        while self.rewind.len() < buf.len() {
            if matches!(self.phase, Phase::Pass) && !self.rewind.is_empty() {
                break;
            }
            let mut scratch = [0u8; 2048];
            let n = std::future::poll_fn(|cx| {
                let mut rb = ReadBuf::new(&mut scratch);
                ready!(self.poll_guarded_read(cx, &mut rb))?;
                Poll::Ready(Ok::<_, io::Error>(rb.filled().len()))
            })
            .await?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            self.rewind.extend_from_slice(&scratch[..n]);
        }
        let n = buf.len().min(self.rewind.len());
        buf[..n].copy_from_slice(&self.rewind[..n]);
        Ok(true)
    }
}

/// A Pingora HTTP app (keygate's proxy) behind the connection guard: a `ServerApp` to put in a
/// `pingora_core::services::listening::Service` in place of the bare app.
pub struct GuardedApp<A> {
    hook: Arc<RequestHook<A>>,
    settings: GuardSettings,
}

impl<A: HttpServerApp> GuardedApp<A> {
    /// Wraps `app`, keeping its `server_options` (h2c, keep-alive limits) and setting
    /// `h2_idle_timeout` to `settings.idle_timeout` unless the app already sets one.
    pub fn new(app: A, settings: GuardSettings) -> Self {
        let mut options = app.server_options().cloned().unwrap_or_default();
        if options.h2_idle_timeout.is_none() {
            options.h2_idle_timeout = Some(settings.idle_timeout);
        }
        Self {
            hook: Arc::new(RequestHook {
                app: Arc::new(app),
                options,
            }),
            settings,
        }
    }

    /// The limits each connection is held to.
    pub fn settings(&self) -> &GuardSettings {
        &self.settings
    }

    /// The options Pingora's connection handling sees (the app's, plus the HTTP/2 idle timeout).
    pub fn server_options(&self) -> &HttpServerOptions {
        &self.hook.options
    }

    /// The wrapped app.
    pub fn app(&self) -> &A {
        &self.hook.app
    }
}

#[async_trait]
impl<A> ServerApp for GuardedApp<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        // A stream handed back for reuse is already guarded; wrapping it twice would restart
        // its timers and hide it from the request hook.
        let stream: Stream = if (*stream).as_any().is::<GuardedStream>() {
            stream
        } else {
            Box::new(GuardedStream::new(stream, self.settings))
        };
        // Pingora's generic connection handling (h2c preface peek, ALPN, the HTTP/1 keep-alive
        // loop) runs unchanged, on the hook.
        ServerApp::process_new(&self.hook, stream, shutdown).await
    }

    async fn cleanup(&self) {
        self.hook.cleanup().await
    }
}

/// Delegates to the app, first telling the connection's guard that an HTTP/1 request starts.
struct RequestHook<A> {
    app: Arc<A>,
    options: HttpServerOptions,
}

#[async_trait]
impl<A> HttpServerApp for RequestHook<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    async fn process_new_http(
        self: &Arc<Self>,
        session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        // Only HTTP/1 sessions carry their connection's stream; HTTP/2 streams are left alone.
        if let Some(guard) = session
            .stream()
            .and_then(|s| (**s).as_any().downcast_ref::<GuardedStream>())
        {
            guard.request_starts();
        }
        self.app.process_new_http(session, shutdown).await
    }

    fn h2_options(&self) -> Option<H2Options> {
        self.app.h2_options()
    }

    fn server_options(&self) -> Option<&HttpServerOptions> {
        Some(&self.options)
    }

    async fn http_cleanup(&self) {
        self.app.http_cleanup().await
    }

    async fn process_custom_session(
        self: Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        self.app
            .clone()
            .process_custom_session(stream, shutdown)
            .await
    }
}
