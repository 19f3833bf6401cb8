//! The response body type: a whole buffer, an SSE stream, or a buffer cut off mid-way.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::Sleep;

use crate::event_list::EventList;
use crate::sse::SseBody;

/// The error a body yields to make hyper drop the connection (`break_stream`).
#[derive(Debug)]
pub struct Broken;

impl fmt::Display for Broken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("keygate-mock: connection broken on purpose (break_stream)")
    }
}

impl std::error::Error for Broken {}

/// How long a breaking body waits before failing. Hyper flushes what it has written whenever the
/// body is pending, but drops its unflushed buffer (HTTP/1) or the stream's queued frames (h2)
/// when the body fails, so without this pause the client would see nothing at all.
const BREAK_DELAY: Duration = Duration::from_millis(20);

/// The pause-then-fail step of a deliberately broken body.
#[derive(Default)]
pub struct Break {
    pause: Option<Pin<Box<Sleep>>>,
}

impl Break {
    /// Pending for `BREAK_DELAY` from the first poll, then `Broken`.
    pub fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Broken> {
        let pause = self
            .pause
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(BREAK_DELAY)));
        pause.as_mut().poll(cx).map(|()| Broken)
    }
}

/// Every response body the mock sends. An enum instead of a boxed trait object keeps the common
/// case (one buffer) free of extra allocations.
pub enum MockBody {
    /// One buffer, sent as one frame with a content-length.
    Full(Option<Bytes>),
    /// Server-sent events, one frame per event.
    Sse(SseBody),
    /// Ready-made server-sent events (Anthropic's stream), one frame per event.
    Events(EventList),
    /// Announces `len` bytes, sends `head`, then breaks the connection.
    Truncated {
        /// What is sent before the break.
        head: Option<Bytes>,
        /// The content-length announced.
        len: u64,
        /// The pause before the break.
        brk: Break,
    },
}

impl MockBody {
    /// A whole body.
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        MockBody::Full(Some(bytes.into()))
    }

    /// Turns a whole body into one that stops half-way and drops the connection; other bodies
    /// are returned unchanged.
    pub fn truncate(self) -> Self {
        match self {
            MockBody::Full(Some(b)) => MockBody::Truncated {
                len: b.len() as u64,
                head: Some(b.slice(..b.len() / 2)),
                brk: Break::default(),
            },
            other => other,
        }
    }
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = Broken;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Broken>>> {
        match self.get_mut() {
            MockBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            MockBody::Sse(s) => s.poll_event(cx),
            MockBody::Events(e) => e.poll_event(cx),
            MockBody::Truncated { head, brk, .. } => match head.take() {
                Some(h) if !h.is_empty() => Poll::Ready(Some(Ok(Frame::data(h)))),
                _ => brk.poll(cx).map(|b| Some(Err(b))),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, MockBody::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            MockBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            MockBody::Full(None) => SizeHint::with_exact(0),
            MockBody::Truncated { len, .. } => SizeHint::with_exact(*len),
            MockBody::Sse(_) | MockBody::Events(_) => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn next(body: &mut MockBody) -> Option<Result<Frame<Bytes>, Broken>> {
        std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await
    }

    #[tokio::test]
    async fn full_body_is_one_frame_with_length() {
        let mut b = MockBody::full(Bytes::from_static(b"hello"));
        assert_eq!(b.size_hint().exact(), Some(5));
        let frame = next(&mut b)
            .await
            .and_then(Result::ok)
            .and_then(|f| f.into_data().ok());
        assert_eq!(frame.as_deref(), Some(&b"hello"[..]));
        assert!(next(&mut b).await.is_none());
        assert!(b.is_end_stream());
    }

    #[tokio::test]
    async fn truncated_announces_full_length_sends_half_then_breaks() {
        let mut b = MockBody::full(Bytes::from_static(b"0123456789")).truncate();
        assert_eq!(b.size_hint().exact(), Some(10));
        let frame = next(&mut b)
            .await
            .and_then(Result::ok)
            .and_then(|f| f.into_data().ok());
        assert_eq!(frame.as_deref(), Some(&b"01234"[..]));
        let started = tokio::time::Instant::now();
        assert!(matches!(next(&mut b).await, Some(Err(Broken))));
        assert!(
            started.elapsed() >= BREAK_DELAY,
            "pauses so hyper flushes first"
        );
    }
}
