//! Between Pingora's errors and keygate's answers: writing a [`LocalResponse`], carrying one
//! inside a Pingora error, and reading what a Pingora error says about an attempt.

use crate::local_response::LocalResponse;
use crate::retry_policy::AttemptResult;
use pingora_error::{Error, ErrorSource, ErrorType, Result};
use pingora_http::ResponseHeader;
use pingora_proxy::Session;

/// The response header of a local answer whose body is `len` bytes.
pub fn header(resp: &LocalResponse, len: usize) -> Result<ResponseHeader> {
    let mut h = ResponseHeader::build(resp.status, Some(4))?;
    h.insert_header("content-type", "application/json")?;
    h.insert_header("content-length", len.to_string())?;
    if let Some(s) = resp.retry_after {
        h.insert_header("retry-after", s.to_string())?;
    }
    for (name, value) in &resp.extra_headers {
        h.insert_header(*name, value.as_str())?;
    }
    Ok(h)
}

/// A local answer's body in the shape the client's API uses: Anthropic's on its Messages
/// endpoints (the `anthropic` SDK reads that shape), OpenAI's everywhere else.
pub fn body_for(session: &Session, resp: &LocalResponse) -> bytes::Bytes {
    if crate::routes::is_anthropic_endpoint(session.req_header().uri.path()) {
        resp.anthropic_body()
    } else {
        resp.body()
    }
}

/// Writes a local answer, header and body, to the client.
pub async fn write(session: &mut Session, resp: &LocalResponse) -> Result<()> {
    let body = body_for(session, resp);
    let header = header(resp, body.len())?;
    session
        .write_response_header(Box::new(header), false)
        .await?;
    session.write_response_body(Some(body), true).await?;
    Ok(())
}

/// Writes a local answer in place of a failed proxy attempt (Pingora's error path).
pub async fn write_error(session: &mut Session, resp: &LocalResponse) -> Result<()> {
    let body = body_for(session, resp);
    let header = header(resp, body.len())?;
    session.write_error_response(header, body).await
}

/// A Pingora error that carries keygate's answer to `fail_to_proxy`; never retried.
pub fn local_error(resp: LocalResponse) -> Box<Error> {
    let status = resp.status;
    let mut e = Error::because(ErrorType::HTTPStatus(status), "answered by keygate", resp);
    e.set_retry(false);
    e
}

/// The answer a [`local_error`] carries.
pub fn carried_answer(e: &Error) -> Option<&LocalResponse> {
    // The root: Pingora may have wrapped the error with more context on its way.
    e.root_cause().downcast_ref::<LocalResponse>()
}

/// Marks the error by which `upstream_response_filter` asks Pingora for another attempt.
#[derive(Debug, thiserror::Error)]
#[error("upstream answered {0}; trying elsewhere")]
pub struct TryElsewhere(pub u16);

/// The error that makes Pingora start another attempt after an upstream answer.
pub fn try_elsewhere(status: u16) -> Box<Error> {
    let mut e = Error::because(
        ErrorType::HTTPStatus(status),
        "upstream answer worth retrying",
        TryElsewhere(status),
    );
    e.set_retry(true);
    e
}

/// Whether `e` is keygate's own request for another attempt.
pub fn is_try_elsewhere(e: &Error) -> bool {
    e.root_cause().downcast_ref::<TryElsewhere>().is_some()
}

/// What a Pingora error says about the attempt it ended.
pub fn attempt_result(e: &Error) -> AttemptResult {
    if e.esource() == &ErrorSource::Downstream {
        return AttemptResult::ClientGone;
    }
    match e.etype() {
        ErrorType::ConnectTimedout
        | ErrorType::ConnectRefused
        | ErrorType::ConnectNoRoute
        | ErrorType::ConnectError
        | ErrorType::ConnectProxyFailure
        | ErrorType::TLSHandshakeFailure
        | ErrorType::TLSHandshakeTimedout
        | ErrorType::InvalidCert
        | ErrorType::HandshakeError => AttemptResult::ConnectFailed,
        ErrorType::ReadTimedout | ErrorType::WriteTimedout => AttemptResult::TimedOut,
        ErrorType::HTTPStatus(status) => AttemptResult::Answered {
            status: *status,
            outcome: crate::outcome::Outcome::of(*status),
        },
        ErrorType::InvalidHTTPHeader if e.esource() == &ErrorSource::Upstream => {
            AttemptResult::Unforwardable
        }
        _ if e.esource() == &ErrorSource::Upstream => AttemptResult::Broke,
        _ => AttemptResult::Internal,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_carried_answer_comes_back_out_of_the_error() {
        let resp = LocalResponse::all_cooling(Duration::from_millis(1500));
        let e = local_error(resp.clone());
        assert_eq!(carried_answer(&e), Some(&resp));
        assert!(!e.retry());
        assert!(!is_try_elsewhere(&e));
        let wrapped = e.more_context("peer 127.0.0.1:1");
        assert_eq!(carried_answer(&wrapped), Some(&resp));
    }

    #[test]
    fn try_elsewhere_is_recognised_and_retried() {
        let e = try_elsewhere(429);
        assert!(is_try_elsewhere(&e));
        assert!(e.retry());
        assert!(carried_answer(&e).is_none());
    }

    #[test]
    fn local_answer_header_has_length_type_and_retry_after() {
        let r = LocalResponse::all_cooling(Duration::from_millis(1500));
        let h = header(&r, 10).unwrap();
        assert_eq!(h.status.as_u16(), 429);
        assert_eq!(h.headers.get("retry-after").unwrap(), "2");
        assert_eq!(h.headers.get("content-length").unwrap(), "10");
        assert_eq!(h.headers.get("content-type").unwrap(), "application/json");
    }

    #[test]
    fn pingora_errors_map_to_attempt_results() {
        let up = |t: ErrorType| {
            let mut e = Error::new(t);
            e.as_up();
            attempt_result(&e)
        };
        assert_eq!(up(ErrorType::ConnectRefused), AttemptResult::ConnectFailed);
        assert_eq!(
            up(ErrorType::TLSHandshakeFailure),
            AttemptResult::ConnectFailed
        );
        assert_eq!(up(ErrorType::ReadTimedout), AttemptResult::TimedOut);
        assert_eq!(up(ErrorType::ConnectionClosed), AttemptResult::Broke);
        assert_eq!(
            up(ErrorType::InvalidHTTPHeader),
            AttemptResult::Unforwardable
        );
        let mut down = Error::new(ErrorType::ConnectionClosed);
        down.as_down();
        assert_eq!(attempt_result(&down), AttemptResult::ClientGone);
        assert_eq!(
            attempt_result(&Error::new(ErrorType::InternalError)),
            AttemptResult::Internal
        );
    }
}
