//! What an upstream answer means for the key and the endpoint that produced it.

use crate::keys::DisableReason;

/// The verdict on one upstream response status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// 1xx–3xx: the key works.
    Success,
    /// 429: the key is rate limited for this model (unless its body says the quota is gone).
    RateLimited,
    /// 401/403: the key is refused; it leaves rotation for every model.
    KeyRefused(DisableReason),
    /// 5xx: the endpoint is in trouble; the key is not at fault. Anthropic's 529
    /// `overloaded_error` is one: the service is overloaded, not the key.
    ServerError,
    /// Any other 4xx: the request is at fault; nothing moves.
    ClientError,
}

impl Outcome {
    /// Classifies a status code.
    pub fn of(status: u16) -> Self {
        match status {
            429 => Outcome::RateLimited,
            401 => Outcome::KeyRefused(DisableReason::Unauthorized),
            403 => Outcome::KeyRefused(DisableReason::Forbidden),
            // 501/505 say the request itself is unsupported: another key will not help.
            501 | 505 => Outcome::ClientError,
            500..=599 => Outcome::ServerError,
            400..=499 => Outcome::ClientError,
            _ => Outcome::Success,
        }
    }

    /// The `outcome` label of `keygate_upstream_attempts_total`.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::RateLimited => "rate_limited",
            Outcome::KeyRefused(_) => "key_refused",
            Outcome::ServerError => "server_error",
            Outcome::ClientError => "client_error",
        }
    }

    /// Whether another key or upstream could answer better.
    pub fn worth_retrying(self) -> bool {
        matches!(
            self,
            Outcome::RateLimited | Outcome::KeyRefused(_) | Outcome::ServerError
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_key_bound_and_server_errors_are_retried() {
        for s in [429, 401, 403, 500, 502, 503, 504] {
            assert!(Outcome::of(s).worth_retrying(), "{s}");
        }
        for s in [200, 201, 400, 404, 413, 422, 501] {
            assert!(!Outcome::of(s).worth_retrying(), "{s}");
        }
    }

    #[test]
    fn anthropics_overload_is_a_server_error_that_leaves_the_key_alone() {
        assert_eq!(Outcome::of(529), Outcome::ServerError);
        assert!(Outcome::of(529).worth_retrying());
    }

    #[test]
    fn auth_failures_name_their_reason() {
        assert_eq!(
            Outcome::of(401),
            Outcome::KeyRefused(DisableReason::Unauthorized)
        );
        assert_eq!(
            Outcome::of(403),
            Outcome::KeyRefused(DisableReason::Forbidden)
        );
    }
}
