//! keygate's own answers, shaped like OpenAI's errors: `{"error":{"message","type","param","code"}}`,
//! or like Anthropic's (`{"type":"error","error":{"type","message"}}`) for clients of Anthropic's
//! Messages API, whose SDK reads that shape.
//!
//! Plain data with no Pingora types: the proxy glue turns one into a response header.

use bytes::Bytes;
use std::time::Duration;

/// A response keygate writes itself instead of proxying. As an error (it implements
/// `std::error::Error`) it rides inside a Pingora error from the hook that decided it to the
/// hook that writes it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("keygate answers {status} ({code}): {message}")]
pub struct LocalResponse {
    /// HTTP status.
    pub status: u16,
    /// Human-readable message.
    pub message: String,
    /// OpenAI error `type`.
    pub kind: &'static str,
    /// OpenAI error `code`.
    pub code: &'static str,
    /// `Retry-After` in whole seconds, for 429s and 503s.
    pub retry_after: Option<u64>,
    /// Extra headers (`x-ratelimit-*` on client limit rejections).
    pub extra_headers: Vec<(&'static str, String)>,
}

impl LocalResponse {
    /// An error with `status`, `message`, `type` and `code`.
    pub fn new(
        status: u16,
        kind: &'static str,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            code,
            retry_after: None,
            extra_headers: Vec::new(),
        }
    }

    /// 401 for a missing, wrong or oversized gateway token: always the same body.
    pub fn bad_token() -> Self {
        Self::new(
            401,
            "invalid_request_error",
            "invalid_api_key",
            "Invalid or missing gateway token. Send it as `Authorization: Bearer <token>`.",
        )
    }

    /// 403 for a model this client may not use.
    pub fn model_not_allowed(model: &str) -> Self {
        Self::new(
            403,
            "invalid_request_error",
            "model_not_allowed",
            format!("This client may not use the model `{model}`."),
        )
    }

    /// 403 for a denied address or user agent.
    pub fn denied() -> Self {
        Self::new(
            403,
            "invalid_request_error",
            "access_denied",
            "Access denied.",
        )
    }

    /// 429 for a client's own limit.
    pub fn client_limited(rejection: &crate::clients::limits::Rejection) -> Self {
        use crate::clients::limits::LimitKind;
        let (kind, message) = match rejection.kind {
            LimitKind::Budget => (
                "insufficient_quota",
                "This client's token budget for the period is spent.",
            ),
            LimitKind::Requests => (
                "rate_limit_exceeded",
                "Rate limit reached for requests per minute.",
            ),
            LimitKind::Tokens => (
                "rate_limit_exceeded",
                "Rate limit reached for tokens per minute.",
            ),
            LimitKind::Concurrency => (
                "rate_limit_exceeded",
                "Too many requests in flight for this client.",
            ),
        };
        let mut r = Self::new(429, kind, rejection.kind.as_str(), message);
        r.retry_after = Some(whole_seconds_up(rejection.retry_after));
        r.extra_headers = rejection.headers.clone();
        r
    }

    /// 400 for a request keygate cannot read.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "invalid_request_error", "invalid_request", message)
    }

    /// 404 for a model no route serves.
    pub fn model_not_found(model: &str) -> Self {
        Self::new(
            404,
            "invalid_request_error",
            "model_not_found",
            format!("The model `{model}` does not exist or is not served by this gateway."),
        )
    }

    /// 413 for a body over the configured cap.
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            413,
            "invalid_request_error",
            "request_too_large",
            format!("Request body is larger than this gateway accepts ({limit} bytes)."),
        )
    }

    /// 408 for a request body that did not arrive in time.
    pub fn body_timeout(limit: Duration) -> Self {
        Self::new(
            408,
            "invalid_request_error",
            "request_timeout",
            format!(
                "The request body did not arrive within {} s.",
                limit.as_secs()
            ),
        )
    }

    /// 503 when keygate holds as many request bodies as it may; the client may retry shortly.
    pub fn busy() -> Self {
        let mut r = Self::new(
            503,
            "service_unavailable",
            "server_busy",
            "The gateway is receiving too many request bodies at once; retry shortly.",
        );
        r.retry_after = Some(1);
        r
    }

    /// 429 when every key that could serve the request is cooling down.
    pub fn all_cooling(retry_in: Duration) -> Self {
        let secs = whole_seconds_up(retry_in);
        let mut r = Self::new(
            429,
            "rate_limit_exceeded",
            "rate_limit_exceeded",
            format!("All upstream keys for this model are rate limited; retry in {secs} s."),
        );
        r.retry_after = Some(secs);
        r
    }

    /// 503 when every key that could serve the request is disabled.
    pub fn all_disabled() -> Self {
        Self::new(
            503,
            "service_unavailable",
            "no_available_keys",
            "No upstream key is currently usable for this request (all are disabled).",
        )
    }

    /// 502 when no upstream could be reached.
    pub fn bad_gateway(message: impl Into<String>) -> Self {
        Self::new(502, "upstream_error", "bad_gateway", message)
    }

    /// 504 when the upstream did not answer in time.
    pub fn gateway_timeout() -> Self {
        Self::new(
            504,
            "upstream_error",
            "timeout",
            "The upstream did not answer in time.",
        )
    }

    /// The replacement for an upstream 401/403 body, which may echo part of the key.
    pub fn upstream_auth_failed(status: u16) -> Self {
        Self::new(
            status,
            "upstream_auth_error",
            "upstream_auth_failed",
            "The gateway's upstream credential was refused; the operator has been notified in the logs.",
        )
    }

    /// The reason label for `keygate_local_responses_total`.
    pub fn reason(&self) -> &'static str {
        match self.code {
            "rate_limit_exceeded" => "all_cooling",
            "no_available_keys" => "all_disabled",
            "bad_gateway" => "no_endpoint",
            "model_not_found" | "unknown_url" => "not_found",
            "request_too_large" => "too_large",
            "timeout" => "timeout",
            "upstream_auth_failed" => "upstream_auth",
            "length_required" => "length_required",
            "request_timeout" => "body_timeout",
            "server_busy" => "busy",
            "internal_error" | "upstream_error" => "error",
            "invalid_api_key" => "bad_token",
            "model_not_allowed" => "model_not_allowed",
            "access_denied" => "denied",
            "rate_limit_requests"
            | "rate_limit_tokens"
            | "concurrency_limit"
            | "budget_exhausted" => "client_limit",
            _ => "bad_request",
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Bytes {
        let v = serde_json::json!({
            "error": {"message": self.message, "type": self.kind, "param": null, "code": self.code}
        });
        Bytes::from(v.to_string())
    }
}

impl LocalResponse {
    /// The same answer in Anthropic's error shape, for clients of its Messages API:
    /// `{"type":"error","error":{"type":…,"message":…}}`, the type chosen by status as Anthropic
    /// documents its errors. keygate's own `code` has no place there, so it leads the message in
    /// brackets (`[all_cooling] …`) for operators reading client logs.
    pub fn anthropic_body(&self) -> Bytes {
        let v = serde_json::json!({
            "type": "error",
            "error": {
                "type": anthropic_error_type(self.status),
                "message": format!("[{}] {}", self.reason(), self.message),
            }
        });
        Bytes::from(v.to_string())
    }
}

/// Anthropic's error `type` for a status, as its API documents them.
pub fn anthropic_error_type(status: u16) -> &'static str {
    match status {
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        504 => "timeout_error",
        529 => "overloaded_error",
        500..=599 => "api_error",
        _ => "invalid_request_error",
    }
}

/// Rounds a duration up to whole seconds, at least 1.
pub fn whole_seconds_up(d: Duration) -> u64 {
    let s = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    s.max(1)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn error_body_is_openai_shaped() {
        let v: serde_json::Value =
            serde_json::from_slice(&LocalResponse::model_not_found("x").body()).unwrap();
        assert_eq!(v["error"]["code"], "model_not_found");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"]["message"].as_str().unwrap().contains("`x`"));
    }

    #[test]
    fn anthropic_shaped_errors_carry_anthropics_type_for_the_status() {
        let cases = [
            (LocalResponse::bad_request("bad"), "invalid_request_error"),
            (LocalResponse::bad_token(), "authentication_error"),
            (LocalResponse::denied(), "permission_error"),
            (LocalResponse::model_not_found("x"), "not_found_error"),
            (LocalResponse::too_large(1), "request_too_large"),
            (
                LocalResponse::all_cooling(Duration::from_secs(1)),
                "rate_limit_error",
            ),
            (LocalResponse::all_disabled(), "api_error"),
            (LocalResponse::gateway_timeout(), "timeout_error"),
        ];
        for (resp, kind) in cases {
            let v: serde_json::Value = serde_json::from_slice(&resp.anthropic_body()).unwrap();
            assert_eq!(v["type"], "error");
            assert_eq!(v["error"]["type"], kind, "{resp:?}");
            let message = v["error"]["message"].as_str().unwrap();
            assert!(message.contains(&resp.message), "{message}");
            assert!(message.starts_with(&format!("[{}]", resp.reason())));
        }
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(whole_seconds_up(Duration::from_millis(1)), 1);
        assert_eq!(whole_seconds_up(Duration::from_millis(2000)), 2);
        assert_eq!(whole_seconds_up(Duration::from_millis(2001)), 3);
        let r = LocalResponse::all_cooling(Duration::from_millis(1500));
        assert_eq!(r.retry_after, Some(2));
    }
}
