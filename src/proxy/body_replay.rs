//! Reading the request body before routing, so that Pingora replays it on every attempt.
//!
//! Routing needs `model` before `upstream_peer`, so the body is read in `request_filter`. Pingora
//! then has no body left to send, except what its 64 KiB retry buffer holds: it hands that buffer
//! to `request_body_filter` once per attempt. So the body is read with the buffer off until at
//! most 64 KiB remain, the buffer is switched on for the tail, and the filter swaps the tail for
//! keygate's full copy (see [`crate::proxy`]). With buffering on from the start, a body over
//! 64 KiB would truncate the buffer and Pingora would then send no body at all.
//! This leans on Pingora 0.9 internals (pinned in Cargo.toml); the integration tests cover
//! every size so an upgrade that changes it fails loudly.

use bytes::{Bytes, BytesMut};
use pingora_error::{Error, ErrorType};
use pingora_proxy::Session;

use crate::body_budget::BodyPermit;

/// Pingora's retry buffer size (`BODY_BUF_LIMIT` in pingora-core 0.9).
pub const RETRY_BUFFER_LIMIT: usize = 64 * 1024;

/// Why a body could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum BodyReadError {
    /// Larger than the configured cap.
    #[error("request body larger than {limit} bytes")]
    TooLarge {
        /// The cap.
        limit: usize,
    },
    /// A chunked body over 64 KiB cannot be replayed by Pingora.
    #[error("chunked request body over 64 KiB; send a Content-Length")]
    ChunkedTooLarge,
    /// The whole body did not arrive in time.
    #[error("request body not received within {0:?}")]
    TimedOut(std::time::Duration),
    /// The body breaks its own framing (a chunk size that is not hex or overflows, chunk data
    /// longer than its size, a chunk line not ended by CRLF, an oversized chunk extension or
    /// trailer section): the client's fault, answered 400, and the connection closes since where
    /// the next request would start is unknown.
    #[error("malformed request body: {0}")]
    Malformed(Box<Error>),
    /// No room in the budget of buffered body bytes for what arrived, in time.
    #[error("no room to buffer the request body")]
    Busy,
    /// The client went away (or its connection failed) while sending the body: nobody to answer.
    #[error("reading the request body: {0}")]
    Downstream(Box<Error>),
}

impl BodyReadError {
    /// Sorts an error from reading the client's body: a framing error is [`Self::Malformed`];
    /// anything else happened on the client's connection, so it is marked as the downstream's.
    pub fn from_read(mut e: Box<Error>) -> Self {
        // pingora-core 0.9 (`protocols/http/v1/body.rs`) reports broken chunked framing with
        // these custom error types (`INVALID_CHUNK`, `INVALID_TRAILER_END`; not exported).
        if matches!(
            e.etype(),
            ErrorType::Custom("InvalidChunk" | "InvalidTrailerEnd")
        ) {
            return Self::Malformed(e);
        }
        e.as_down();
        Self::Downstream(e)
    }
}

/// The request's `Content-Length`, when it has a valid one.
pub fn content_length(session: &Session) -> Option<usize> {
    session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<usize>().ok())
}

/// How a body is bounded while it is read.
#[derive(Debug)]
pub struct BodyLimits<'a> {
    /// Largest body accepted.
    pub max: usize,
    /// Time for all of it to arrive.
    pub deadline: std::time::Duration,
    /// The room the body holds in the shared budget, grown as its bytes arrive.
    pub room: Option<&'a mut BodyPermit>,
    /// How long growing the room may wait.
    pub room_wait: std::time::Duration,
}

/// Reads the whole body within `limits`, leaving Pingora able to replay it per attempt.
pub async fn read_body(
    session: &mut Session,
    limits: BodyLimits<'_>,
) -> Result<Bytes, BodyReadError> {
    let deadline = limits.deadline;
    match tokio::time::timeout(deadline, read_body_untimed(session, limits)).await {
        Ok(result) => result,
        Err(_) => Err(BodyReadError::TimedOut(deadline)),
    }
}

async fn read_body_untimed(
    session: &mut Session,
    limits: BodyLimits<'_>,
) -> Result<Bytes, BodyReadError> {
    let BodyLimits {
        max,
        mut room,
        room_wait,
        ..
    } = limits;
    let content_length = content_length(session);
    if content_length.is_some_and(|cl| cl > max) {
        return Err(BodyReadError::TooLarge { limit: max });
    }
    if session.as_mut().is_body_empty() {
        return Ok(Bytes::new());
    }
    if content_length.is_none() {
        // Unknown length: only bodies that fit the retry buffer can be replayed.
        session.as_mut().enable_retry_buffering();
    }
    // Chunks as they come, nothing reserved up front: a client that announces 32 MiB and sends
    // slowly holds only what it sent.
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut len = 0usize;
    loop {
        if let Some(cl) = content_length {
            if cl.saturating_sub(len) <= RETRY_BUFFER_LIMIT {
                session.as_mut().enable_retry_buffering();
            }
        }
        let chunk = session
            .as_mut()
            .read_request_body()
            .await
            .map_err(BodyReadError::from_read)?;
        let Some(chunk) = chunk else { break };
        len += chunk.len();
        if len > max {
            return Err(BodyReadError::TooLarge { limit: max });
        }
        if let Some(room) = room.as_deref_mut() {
            if !room.cover(len, room_wait).await {
                return Err(BodyReadError::Busy);
            }
        }
        chunks.push(chunk);
    }
    if content_length.is_none() && len > RETRY_BUFFER_LIMIT {
        return Err(BodyReadError::ChunkedTooLarge);
    }
    Ok(join(chunks, len))
}

/// One contiguous body from its chunks (the scanners need one slice); no copy for one chunk.
fn join(mut chunks: Vec<Bytes>, len: usize) -> Bytes {
    if chunks.len() == 1 {
        return chunks.pop().unwrap_or_default();
    }
    let mut buf = BytesMut::with_capacity(len);
    for c in chunks {
        buf.extend_from_slice(&c);
    }
    buf.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora_error::ErrorSource;

    #[test]
    fn chunked_framing_errors_are_malformed_and_other_read_errors_are_the_clients() {
        for (etype, malformed) in [
            (ErrorType::new("InvalidChunk"), true),
            (ErrorType::new("InvalidTrailerEnd"), true),
            (ErrorType::ConnectionClosed, false),
            (ErrorType::ReadError, false),
            (ErrorType::ReadTimedout, false),
        ] {
            match BodyReadError::from_read(Error::explain(etype.clone(), "test")) {
                BodyReadError::Malformed(e) => assert!(malformed, "{etype:?}: {e}"),
                BodyReadError::Downstream(e) => {
                    assert!(!malformed, "{etype:?}");
                    assert_eq!(e.esource(), &ErrorSource::Downstream, "{etype:?}");
                }
                other => panic!("{etype:?}: {other}"),
            }
        }
    }
}
