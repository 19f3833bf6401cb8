//! Reading an upstream's error body: the `code` and `type` of an OpenAI-style
//! `{"error": {"message", "type", "code"}}`, and what a refusal's code blames.

use serde::Deserialize;

/// Error bodies longer than this are not parsed (an error body is a few hundred bytes).
pub const MAX_ERROR_BODY: usize = 64 * 1024;

/// The `code` and `type` strings of an error body, when it is OpenAI-shaped JSON.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ErrorCodes {
    /// `error.code`.
    pub code: Option<String>,
    /// `error.type`.
    pub kind: Option<String>,
}

impl ErrorCodes {
    /// Reads `body`; empty when it is not JSON, not OpenAI-shaped or over [`MAX_ERROR_BODY`].
    pub fn of(body: &[u8]) -> Self {
        if body.len() > MAX_ERROR_BODY {
            return Self::default();
        }
        let Ok(ErrorEnvelope {
            error: Some(ErrorField::Object { code, kind }),
        }) = serde_json::from_slice::<ErrorEnvelope>(body)
        else {
            return Self::default();
        };
        let text = |v: Option<serde_json::Value>| v.and_then(|v| v.as_str().map(str::to_string));
        Self {
            code: text(code),
            kind: text(kind),
        }
    }

    /// Whether `code` or `type` is one of `names`; the first that is.
    pub fn any_of(&self, names: &[&'static str]) -> Option<&'static str> {
        [&self.code, &self.kind]
            .into_iter()
            .flatten()
            .find_map(|s| names.iter().find(|&&n| n == s).copied())
    }
}

#[derive(Deserialize)]
struct ErrorEnvelope {
    error: Option<ErrorField>,
}

/// `error` is an object at OpenAI, but some compatible upstreams put a string there; that must
/// not make the whole body unreadable.
#[derive(Deserialize)]
#[serde(untagged)]
enum ErrorField {
    Object {
        #[serde(default)]
        code: Option<serde_json::Value>,
        #[serde(default, rename = "type")]
        kind: Option<serde_json::Value>,
    },
    Other(serde::de::IgnoredAny),
}

/// Whether an error body says the account's credit balance is too low: Anthropic answers an
/// exhausted prepaid balance with 400 `invalid_request_error` and a message saying so ("Your
/// credit balance is too low to access the Anthropic API…"). The key, not the request, is at
/// fault, for every model. Read from `error.message` (any case) of a JSON error body only, so a
/// prompt quoted back in some other field cannot trigger it.
pub fn is_credit_exhausted(body: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Envelope {
        error: Option<MessageField>,
    }
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum MessageField {
        Object {
            #[serde(default)]
            message: Option<serde_json::Value>,
        },
        Other(serde::de::IgnoredAny),
    }
    if body.len() > MAX_ERROR_BODY {
        return false;
    }
    let Ok(Envelope {
        error:
            Some(MessageField::Object {
                message: Some(serde_json::Value::String(message)),
            }),
    }) = serde_json::from_slice::<Envelope>(body)
    else {
        return false;
    };
    let message = message.to_ascii_lowercase();
    message.contains("credit balance") && message.contains("too low")
}

/// Whom a 401/403 blames, as its error code tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The request or where it came from: a wrong organisation or project header, a region the
    /// provider does not serve, a model the key's project may not use. The key itself works.
    Request,
    /// The key: invalid, revoked, its account deactivated.
    Key,
    /// The body does not say.
    Unknown,
}

/// Codes that blame the request, not the key (OpenAI's documented codes: `mismatched_*` when
/// `OpenAI-Organization`/`OpenAI-Project` do not belong to the key; the region refusal; a
/// project without access to the model, which OpenAI answers 403 `model_not_found`).
const REQUEST_FAULT: [&str; 5] = [
    "mismatched_organization",
    "mismatched_project",
    "invalid_organization",
    "unsupported_country_region_territory",
    "model_not_found",
];

/// Codes that blame the key itself (OpenAI's, and Anthropic's error type).
const KEY_FAULT: [&str; 4] = [
    "invalid_api_key",
    "account_deactivated",
    "invalid_authentication",
    "authentication_error",
];

/// What a refusal's body blames.
pub fn refusal(body: &[u8]) -> Refusal {
    let codes = ErrorCodes::of(body);
    if codes.any_of(&REQUEST_FAULT).is_some() {
        Refusal::Request
    } else if codes.any_of(&KEY_FAULT).is_some() {
        Refusal::Key
    } else {
        Refusal::Unknown
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_types_are_read_from_openai_shaped_errors_only() {
        let c = ErrorCodes::of(
            br#"{"error":{"message":"m","type":"invalid_request_error","code":"invalid_api_key"}}"#,
        );
        assert_eq!(c.code.as_deref(), Some("invalid_api_key"));
        assert_eq!(c.kind.as_deref(), Some("invalid_request_error"));
        assert_eq!(ErrorCodes::of(b"not json"), ErrorCodes::default());
        assert_eq!(
            ErrorCodes::of(br#"{"error":"plain text"}"#),
            ErrorCodes::default()
        );
        assert_eq!(
            ErrorCodes::of(br#"{"error":{"code":42}}"#),
            ErrorCodes::default()
        );
        let huge = vec![b' '; MAX_ERROR_BODY + 1];
        assert_eq!(ErrorCodes::of(&huge), ErrorCodes::default());
    }

    #[test]
    fn a_too_low_credit_balance_is_read_from_the_error_message_only() {
        let credit = br#"{"type":"error","error":{"type":"invalid_request_error","message":"Your credit balance is too low to access the Anthropic API. Please go to Plans & Billing to upgrade or purchase credits."}}"#;
        assert!(is_credit_exhausted(credit));
        assert!(is_credit_exhausted(
            br#"{"error":{"message":"CREDIT BALANCE IS TOO LOW"}}"#
        ));
        for other in [
            &br#"{"type":"error","error":{"type":"invalid_request_error","message":"max_tokens: Field required"}}"#[..],
            br#"{"type":"error","error":{"type":"invalid_request_error","message":"prompt is too long"},"echo":"credit balance is too low"}"#,
            br#"{"error":"credit balance is too low"}"#,
            br#"{"error":{"message":42}}"#,
            b"credit balance is too low",
            b"",
        ] {
            assert!(!is_credit_exhausted(other), "{}", String::from_utf8_lossy(other));
        }
        let mut huge = credit.to_vec();
        huge.resize(MAX_ERROR_BODY + 1, b' ');
        assert!(!is_credit_exhausted(&huge));
    }

    #[test]
    fn refusals_that_blame_the_request_are_told_apart_from_dead_keys() {
        let org = br#"{"error":{"message":"OpenAI-Organization header should match organization for API key","type":"invalid_request_error","code":"mismatched_organization"}}"#;
        let region = br#"{"error":{"code":"unsupported_country_region_territory","message":"Country, region, or territory not supported","param":null,"type":"request_forbidden"}}"#;
        let model = br#"{"error":{"message":"Project `proj_x` does not have access to model `gpt-4o`","type":"invalid_request_error","param":null,"code":"model_not_found"}}"#;
        for body in [&org[..], &region[..], &model[..]] {
            assert_eq!(refusal(body), Refusal::Request);
        }
        let bad_key = br#"{"error":{"message":"Incorrect API key provided","type":"invalid_request_error","code":"invalid_api_key"}}"#;
        assert_eq!(refusal(bad_key), Refusal::Key);
        let anthropic = br#"{"type":"error","error":{"type":"authentication_error","message":"invalid x-api-key"}}"#;
        assert_eq!(refusal(anthropic), Refusal::Key);
        assert_eq!(refusal(b""), Refusal::Unknown);
        assert_eq!(
            refusal(br#"{"error":{"code":"something_else"}}"#),
            Refusal::Unknown
        );
    }
}
