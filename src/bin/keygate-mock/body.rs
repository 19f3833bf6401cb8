//! The response body type: a whole buffer, an SSE stream, or a buffer cut off mid-way.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

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

/// Every response body the mock sends. An enum instead of a boxed trait object keeps the common
/// case (one buffer) free of extra allocations.
pub enum MockBody {
    /// One buffer, sent as one frame with a content-length.
    Full(Option<Bytes>),
    /// Server-sent events, one frame per event.
    Sse(SseBody),
    /// Announces `len` bytes, sends `head`, then breaks the connection.
    Truncated {
        /// What is sent before the break.
        head: Option<Bytes>,
        /// The content-length announced.
        len: u64,
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
            MockBody::Truncated { head, .. } => match head.take() {
                Some(h) if !h.is_empty() => Poll::Ready(Some(Ok(Frame::data(h)))),
                _ => Poll::Ready(Some(Err(Broken))),
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
            MockBody::Sse(_) => SizeHint::default(),
        }
    }
}
