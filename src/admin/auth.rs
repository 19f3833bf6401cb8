//! Who may use the admin API: the admin token reads and acts, the read-only token only reads.
//! Tokens are compared as SHA-256 digests in constant time, both always looked at.

use crate::clients::digest;
use crate::local_response::LocalResponse;
use subtle::ConstantTimeEq;

/// Longest token looked at; longer ones are refused unread.
const MAX_TOKEN_BYTES: usize = 4096;

/// What a request's token allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Reading only (`GET`).
    Read,
    /// Reading and key actions.
    Admin,
}

/// The admin API's token digests.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct AdminAuth {
    token: Option<[u8; 32]>,
    read_token: Option<[u8; 32]>,
}

impl std::fmt::Debug for AdminAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminAuth").finish_non_exhaustive()
    }
}

impl AdminAuth {
    /// Auth from the config's digests; without an admin token every request is an admin
    /// (the config allows that only on a loopback address).
    pub fn new(token: Option<[u8; 32]>, read_token: Option<[u8; 32]>) -> Self {
        Self { token, read_token }
    }

    /// What the `Authorization` header's value allows, or the 401 to answer.
    pub fn check(&self, authorization: Option<&[u8]>) -> Result<Access, LocalResponse> {
        let Some(admin) = self.token else {
            return Ok(Access::Admin);
        };
        let presented = authorization.and_then(bearer).ok_or_else(unauthorized)?;
        let d = digest(presented);
        let is_admin = bool::from(admin.ct_eq(&d));
        let is_read = self.read_token.is_some_and(|r| bool::from(r.ct_eq(&d)));
        match (is_admin, is_read) {
            (true, _) => Ok(Access::Admin),
            (false, true) => Ok(Access::Read),
            (false, false) => Err(unauthorized()),
        }
    }
}

/// The token of `Bearer <token>`, when it is one.
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let prefix = value.get(..7)?;
    if !prefix.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = value[7..].trim_ascii();
    (!token.is_empty() && token.len() <= MAX_TOKEN_BYTES).then_some(token)
}

/// 401: a missing or wrong admin token; always the same body.
pub fn unauthorized() -> LocalResponse {
    LocalResponse::new(
        401,
        "invalid_request_error",
        "invalid_admin_token",
        "Invalid or missing admin token. Send it as `Authorization: Bearer <token>`.",
    )
}

/// 403: the read-only token asked for a change.
pub fn read_only() -> LocalResponse {
    LocalResponse::new(
        403,
        "permission_error",
        "read_only_token",
        "This token may only read; key actions need the admin token.",
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn auth() -> AdminAuth {
        AdminAuth::new(Some(digest(b"adm-tok")), Some(digest(b"read-tok")))
    }

    #[test]
    fn the_admin_token_acts_and_the_read_token_reads() {
        let a = auth();
        assert_eq!(a.check(Some(b"Bearer adm-tok")), Ok(Access::Admin));
        assert_eq!(a.check(Some(b"bearer  read-tok ")), Ok(Access::Read));
    }

    #[test]
    fn missing_wrong_or_malformed_tokens_get_401() {
        let a = auth();
        for h in [
            None,
            Some(&b"Bearer nope"[..]),
            Some(b"adm-tok"),
            Some(b"Basic adm-tok"),
            Some(b"Bearer "),
        ] {
            assert_eq!(a.check(h).unwrap_err().status, 401, "{h:?}");
        }
        let long = format!("Bearer {}", "a".repeat(MAX_TOKEN_BYTES + 1));
        assert_eq!(a.check(Some(long.as_bytes())).unwrap_err().status, 401);
    }

    #[test]
    fn without_an_admin_token_everyone_is_admin() {
        assert_eq!(AdminAuth::default().check(None), Ok(Access::Admin));
    }

    #[test]
    fn debug_shows_no_digest() {
        assert_eq!(format!("{:?}", auth()), "AdminAuth { .. }");
    }
}
