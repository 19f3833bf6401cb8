//! [`GuardedStream`]: the poll state machine around an accepted L4 stream. It watches the bytes
//! Pingora reads, runs the connection's timers and answers `408`/`431`, and `400`/`501` for a
//! malformed head, itself.
//!
//! A connection moves through phases: waiting for a request's first byte (the fresh-connection or
//! idle timer runs), inside its header (the header timer runs and the bytes go to a
//! [`HeaderScan`]), passing bytes through (a body, a response, HTTP/2), rejecting (writing the
//! answer, then lingering) and closed.

use super::scan::{HeadProblem, HeaderScan, ScanVerdict};
use super::{GuardSettings, H2_PREFACE};
use crate::local_response::LocalResponse;
use async_trait::async_trait;
use bytes::{Buf, BytesMut};
use log::debug;
use pingora_core::protocols::raw_connect::ProxyDigest;
use pingora_core::protocols::tls::{SslDigest, TlsRef};
use pingora_core::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// After a 408/431/400, how long the connection lingers to deliver the answer and drain what the
/// client is still sending: closing with unread bytes makes the kernel send RST, which can destroy
/// the answer before the client reads it (nginx's `lingering_close` exists for the same reason).
pub(super) const LINGER: Duration = Duration::from_secs(1);
/// At most this much is drained while lingering; a client flooding past it just gets the close.
const MAX_DRAIN: usize = 1 << 20;
/// Drained per poll before yielding, so a fast client cannot hold the worker thread.
const DRAIN_PER_POLL: usize = 64 * 1024;

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
    /// A malformed head (400, or 501 for a transfer coding keygate does not implement).
    Refused(HeadProblem),
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
    /// Answering 408/431/400/501 and lingering; the timer bounds it.
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
    /// Set by [`GuardedApp`](super::GuardedApp) when Pingora starts an HTTP/1 request on this
    /// connection; an atomic because the app only reaches the stream through a shared reference.
    pub(super) request_started: AtomicBool,
    /// Whether the first request's start was seen (that one is already covered from accept).
    pub(super) first_request_seen: bool,
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
        count_close(exit.label());
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
            ScanVerdict::Refused(problem) => Err(Exit::Refused(problem)),
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
                            if let Phase::Waiting { first } = self.phase {
                                debug!("connection guard: idle connection closed");
                                // A new connection that never spoke, or a kept-alive one that went quiet.
                                count_close(if first { "silent" } else { "idle" });
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
                        Exit::TooLarge | Exit::TooManyHeaders | Exit::Refused(_) => {
                            Err(io::Error::new(
                                io::ErrorKind::InvalidData,
                                exit_message(*exit, &self.settings),
                            ))
                        }
                    });
                }
            }
        }
    }
}

impl Exit {
    /// The `reason` label of `keygate_connection_closes_total`.
    fn label(self) -> &'static str {
        match self {
            Exit::Idle => "idle",
            Exit::HeaderTimeout => "header_timeout",
            Exit::TooLarge => "header_too_large",
            Exit::TooManyHeaders => "too_many_headers",
            Exit::Refused(problem) => problem.label(),
        }
    }
}

fn count_close(reason: &str) {
    crate::metrics::global()
        .connection_closes
        .with_label_values(&[reason])
        .inc();
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
        Exit::Refused(problem) => problem.message().into(),
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
        Exit::Refused(problem) => {
            let status = problem.status();
            let reason = if status == 501 {
                "Not Implemented"
            } else {
                "Bad Request"
            };
            (status, reason, problem.code())
        }
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

impl GuardedStream {
    /// Reads what has arrived (up to 2 KiB) into `rewind`. The scratch buffer lives only for one
    /// poll, not in the future of an idle connection waiting for its next request.
    fn poll_fill_rewind(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let mut scratch = [0u8; 2048];
        let mut rb = ReadBuf::new(&mut scratch);
        ready!(self.poll_guarded_read(cx, &mut rb))?;
        self.rewind.extend_from_slice(rb.filled());
        Poll::Ready(Ok(rb.filled().len()))
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
            let n = std::future::poll_fn(|cx| self.poll_fill_rewind(cx)).await?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        let n = buf.len().min(self.rewind.len());
        buf[..n].copy_from_slice(&self.rewind[..n]);
        Ok(true)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::conn_guard::scan::tests::{request_with_fields, MAXB, MAXH};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio::time::sleep;

    fn guarded() -> (GuardedStream, DuplexStream) {
        let (server, client) = tokio::io::duplex(256 * 1024);
        (
            GuardedStream::new(Box::new(server), GuardSettings::default()),
            client,
        )
    }

    /// Reads until the guard ends the stream; returns the total read and how it ended.
    async fn read_until_end(g: &mut GuardedStream) -> (Vec<u8>, io::Result<()>) {
        let mut got = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            match g.read(&mut buf).await {
                Ok(0) => return (got, Ok(())),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => return (got, Err(e)),
            }
        }
    }

    async fn read_response(client: &mut DuplexStream) -> String {
        let mut out = Vec::new();
        client.read_to_end(&mut out).await.unwrap();
        String::from_utf8(out).unwrap()
    }

    fn json_body(response: &str) -> serde_json::Value {
        let body = response.split("\r\n\r\n").nth(1).unwrap();
        serde_json::from_str(body).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn slow_header_gets_408_at_header_timeout_from_its_first_byte() {
        let (mut g, client) = guarded();
        let server = tokio::spawn(async move {
            let (got, end) = read_until_end(&mut g).await;
            (got, end, Instant::now())
        });
        sleep(Duration::from_secs(3)).await; // a silent start shorter than header_timeout is fine
        let first_byte = Instant::now();
        let (mut rd, mut wr) = tokio::io::split(client);
        let writer = tokio::spawn(async move {
            for b in b"GET / HTTP/1.1\r\nhost: slow\r\nx-a: ".iter().cycle() {
                if wr.write_all(&[*b]).await.is_err() {
                    break;
                }
                sleep(Duration::from_secs(1)).await;
            }
        });
        let (got, end, ended_at) = server.await.unwrap();
        let err = end.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(&got[..5], b"GET /");
        let after = ended_at - first_byte;
        assert!(after >= Duration::from_secs(10), "{after:?}");
        assert!(after <= Duration::from_secs(10) + LINGER, "{after:?}");
        let mut out = Vec::new();
        rd.read_to_end(&mut out).await.unwrap();
        let response = String::from_utf8(out).unwrap();
        assert!(
            response.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
            "{response}"
        );
        assert!(response.contains("\r\nconnection: close\r\n"));
        let v = json_body(&response);
        assert_eq!(v["error"]["code"], "request_timeout");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"]["param"].is_null());
        writer.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn header_complete_in_time_passes_and_the_body_is_not_timed() {
        let (mut g, mut client) = guarded();
        let head = b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\n";
        for chunk in head.chunks(10) {
            client.write_all(chunk).await.unwrap();
            sleep(Duration::from_secs(2)).await; // 5 chunks: 8 s, inside header_timeout
        }
        let mut got = vec![0u8; head.len()];
        g.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..], head);
        sleep(Duration::from_secs(3600)).await; // the body may take as long as Pingora allows
        client.write_all(b"abc").await.unwrap();
        let mut body = [0u8; 3];
        g.read_exact(&mut body).await.unwrap();
        assert_eq!(&body, b"abc");
    }

    #[tokio::test(start_paused = true)]
    async fn oversized_header_gets_431_without_passing_the_excess_on() {
        let (mut g, mut client) = guarded();
        let mut req = b"GET / HTTP/1.1\r\nx-pad: ".to_vec();
        req.extend(std::iter::repeat_n(b'a', 40 * 1024));
        req.extend_from_slice(b"\r\n\r\n");
        client.write_all(&req).await.unwrap();
        let (got, end) = read_until_end(&mut g).await;
        assert_eq!(end.unwrap_err().kind(), io::ErrorKind::InvalidData);
        assert!(got.len() <= MAXB, "{} bytes passed", got.len());
        drop(g);
        let response = read_response(&mut client).await;
        assert!(
            response.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
            "{response}"
        );
        assert_eq!(
            json_body(&response)["error"]["code"],
            "request_header_too_large"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn too_many_header_fields_get_431() {
        let (mut g, mut client) = guarded();
        client
            .write_all(&request_with_fields(MAXH + 1))
            .await
            .unwrap();
        let (_, end) = read_until_end(&mut g).await;
        assert_eq!(end.unwrap_err().kind(), io::ErrorKind::InvalidData);
        drop(g);
        let response = read_response(&mut client).await;
        assert!(response.starts_with("HTTP/1.1 431 "), "{response}");
        assert!(json_body(&response)["error"]["message"]
            .as_str()
            .unwrap()
            .contains("(100)"));
    }

    /// The guard's answer to a head it refused: status line, `connection: close`, JSON body.
    async fn refused_answer(
        g: GuardedStream,
        client: &mut DuplexStream,
    ) -> (String, serde_json::Value) {
        drop(g);
        let response = read_response(client).await;
        assert!(response.contains("\r\nconnection: close\r\n"), "{response}");
        let v = json_body(&response);
        assert_eq!(v["error"]["type"], "invalid_request_error");
        let status_line = response.lines().next().unwrap().to_string();
        (status_line, v)
    }

    #[tokio::test(start_paused = true)]
    async fn a_malformed_request_line_gets_400_and_none_of_it_is_passed_on() {
        let (mut g, mut client) = guarded();
        client
            .write_all(b"POST  /v1/chat/completions HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let (got, end) = read_until_end(&mut g).await;
        assert!(got.is_empty(), "{got:?}");
        assert_eq!(end.unwrap_err().kind(), io::ErrorKind::InvalidData);
        let (status, v) = refused_answer(g, &mut client).await;
        assert_eq!(status, "HTTP/1.1 400 Bad Request");
        assert_eq!(v["error"]["code"], "invalid_request");
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_refused_at_its_end_never_hands_pingora_its_blank_line() {
        // The first read passes (nothing wrong yet); the read that completes the head does not,
        // so Pingora never parses a whole request.
        let (mut g, mut client) = guarded();
        let first = b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 6\r\n";
        client.write_all(first).await.unwrap();
        let mut got = vec![0u8; first.len()];
        g.read_exact(&mut got).await.unwrap();
        client
            .write_all(b"transfer-encoding: chunked\r\n\r\n0\r\n\r\n")
            .await
            .unwrap();
        let (rest, end) = read_until_end(&mut g).await;
        assert!(rest.is_empty(), "{rest:?}");
        assert_eq!(end.unwrap_err().kind(), io::ErrorKind::InvalidData);
        let (status, v) = refused_answer(g, &mut client).await;
        assert_eq!(status, "HTTP/1.1 400 Bad Request");
        assert!(v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Content-Length and Transfer-Encoding"));
    }

    #[tokio::test(start_paused = true)]
    async fn an_unimplemented_transfer_coding_gets_501() {
        let (mut g, mut client) = guarded();
        client
            .write_all(b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip, chunked\r\n\r\n")
            .await
            .unwrap();
        let (_, end) = read_until_end(&mut g).await;
        assert_eq!(end.unwrap_err().kind(), io::ErrorKind::InvalidData);
        let (status, v) = refused_answer(g, &mut client).await;
        assert_eq!(status, "HTTP/1.1 501 Not Implemented");
        assert_eq!(v["error"]["code"], "unsupported_transfer_coding");
    }

    #[tokio::test(start_paused = true)]
    async fn silent_new_connection_is_closed_at_header_timeout_without_an_answer() {
        let (mut g, mut client) = guarded();
        let start = Instant::now();
        let (got, end) = read_until_end(&mut g).await;
        assert!(got.is_empty());
        end.unwrap();
        assert_eq!(start.elapsed(), Duration::from_secs(10));
        drop(g);
        assert_eq!(read_response(&mut client).await, "");
    }

    /// What Pingora does on a kept-alive connection: a request start, a header, a response.
    async fn serve_one(g: &mut GuardedStream, client: &mut DuplexStream) {
        g.request_starts();
        client
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        let n = g.read(&mut buf).await.unwrap();
        assert!(buf[..n].ends_with(b"\r\n\r\n"));
        g.write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
            .await
            .unwrap();
        let mut resp = [0u8; 27];
        client.read_exact(&mut resp).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn idle_keepalive_connection_is_closed_at_idle_timeout() {
        let (mut g, mut client) = guarded();
        serve_one(&mut g, &mut client).await;
        sleep(Duration::from_secs(30)).await; // Pingora is busy elsewhere: no timer runs
        g.request_starts();
        let start = Instant::now();
        let (got, end) = read_until_end(&mut g).await;
        assert!(got.is_empty());
        end.unwrap(); // end of stream: Pingora closes quietly, as when a client leaves
        assert_eq!(start.elapsed(), Duration::from_secs(60));
    }

    #[tokio::test(start_paused = true)]
    async fn next_request_on_a_kept_alive_connection_gets_its_own_header_timer() {
        let (mut g, client) = guarded();
        let mut client = client;
        serve_one(&mut g, &mut client).await;
        g.request_starts();
        let server = tokio::spawn(async move {
            let r = read_until_end(&mut g).await;
            (r, Instant::now())
        });
        sleep(Duration::from_secs(50)).await; // idle, under idle_timeout
        let first_byte = Instant::now();
        client.write_all(b"GET / HT").await.unwrap(); // then nothing more
        let ((got, end), ended_at) = server.await.unwrap();
        assert_eq!(got, b"GET / HT");
        assert_eq!(end.unwrap_err().kind(), io::ErrorKind::TimedOut);
        // 10 s from the header's first byte (not 60 s from the idle start), plus the linger.
        assert_eq!(ended_at - first_byte, Duration::from_secs(10) + LINGER);
        let response = read_response(&mut client).await;
        assert!(response.starts_with("HTTP/1.1 408 "), "{response}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_before_the_body_does_not_restart_the_header_guard() {
        // `Expect: 100-continue`: Pingora writes before the body; the body is not a header.
        let (mut g, mut client) = guarded();
        g.request_starts();
        client
            .write_all(
                b"POST / HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\ncontent-length: 40000\r\n\r\n",
            )
            .await
            .unwrap();
        let mut buf = vec![0u8; 1024];
        let _ = g.read(&mut buf).await.unwrap();
        g.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await.unwrap();
        client.write_all(&[b'z'; 40000]).await.unwrap(); // over max_header_bytes, no CRLFCRLF
        sleep(Duration::from_secs(30)).await;
        let mut body = vec![0u8; 40000];
        g.read_exact(&mut body).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn h2_preface_turns_the_header_guard_off() {
        let (mut g, mut client) = guarded();
        client.write_all(H2_PREFACE).await.unwrap();
        let mut got = vec![0u8; H2_PREFACE.len()];
        g.read_exact(&mut got).await.unwrap();
        // HTTP/2 frames need no blank line and may pause for long: nothing times out here.
        for _ in 0..3 {
            sleep(Duration::from_secs(600)).await;
            client.write_all(&[0u8; 9]).await.unwrap();
            let mut frame = [1u8; 9];
            g.read_exact(&mut frame).await.unwrap();
            assert_eq!(frame, [0u8; 9]);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn method_pri_that_is_not_the_h2_preface_is_scanned_as_http1() {
        let (mut g, mut client) = guarded();
        let mut req = b"PRI * HTTP/2.0\r\nx: ".to_vec();
        req.extend(std::iter::repeat_n(b'a', 40 * 1024));
        client.write_all(&req).await.unwrap();
        let (_, end) = read_until_end(&mut g).await;
        assert_eq!(end.unwrap_err().kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test(start_paused = true)]
    async fn peek_sees_the_whole_h2_preface_and_reads_replay_it() {
        let (mut g, mut client) = guarded();
        client.write_all(H2_PREFACE).await.unwrap();
        client.write_all(b"frames").await.unwrap();
        let mut peeked = [0u8; 24];
        assert!(g.try_peek(&mut peeked).await.unwrap());
        assert_eq!(&peeked[..], H2_PREFACE);
        let mut all = vec![0u8; 30];
        g.read_exact(&mut all).await.unwrap();
        assert_eq!(&all[24..], b"frames");
    }

    #[tokio::test(start_paused = true)]
    async fn peek_returns_early_for_an_http1_header_shorter_than_the_preface() {
        let (mut g, mut client) = guarded();
        client.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
        let mut peeked = [0u8; 24];
        assert!(g.try_peek(&mut peeked).await.unwrap());
        assert_ne!(&peeked[..], H2_PREFACE);
        let mut got = [0u8; 18];
        g.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"GET / HTTP/1.0\r\n\r\n");
    }

    #[tokio::test(start_paused = true)]
    async fn peek_at_a_dribbling_client_is_bounded_by_header_timeout() {
        let (mut g, client) = guarded();
        let (mut rd, mut wr) = tokio::io::split(client);
        let writer = tokio::spawn(async move {
            for b in b"GET / HTTP/1.1\r\nhost: x\r\n".iter().cycle() {
                if wr.write_all(&[*b]).await.is_err() {
                    break;
                }
                sleep(Duration::from_secs(1)).await;
            }
        });
        let start = Instant::now();
        let mut peeked = [0u8; 24];
        // Pingora's h2c check peeks 24 bytes: 24 s at this pace, cut at 10 s.
        let err = g.try_peek(&mut peeked).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(start.elapsed() <= Duration::from_secs(10) + LINGER);
        drop(g);
        let mut out = Vec::new();
        rd.read_to_end(&mut out).await.unwrap();
        assert!(out.starts_with(b"HTTP/1.1 408 "));
        writer.await.unwrap();
    }
}
