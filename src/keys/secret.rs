//! The credential itself, and the name a key gets when the config gives it none.

use sha2::{Digest, Sha256};
use std::fmt;

/// An upstream credential.
///
/// Debug and Display print `<redacted>` so that a secret cannot reach a log line, an error
/// message or a panic by accident; [`Secret::expose`] is the only way to read it, which keeps
/// every place that does so greppable. There is deliberately no `Serialize` impl.
#[derive(Clone)]
pub struct Secret(Box<str>);

impl Secret {
    /// Wraps a credential.
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into().into_boxed_str())
    }

    /// The credential itself, for the one place that puts it on the wire.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The default name of a key holding this secret (see [`key_id`]).
    pub fn id(&self) -> String {
        key_id(self.expose())
    }
}

impl From<String> for Secret {
    fn from(secret: String) -> Self {
        Self::new(secret)
    }
}

impl From<&str> for Secret {
    fn from(secret: &str) -> Self {
        Self::new(secret)
    }
}

/// Read from a string (an admin request's body); there is still no way back to text but
/// [`Secret::expose`].
impl<'de> serde::Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret::new)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The default name of an unnamed key: `key-` and the first 8 hex digits of the SHA-256 of the
/// secret.
///
/// A hash rather than a prefix or suffix of the key, because OpenAI keys share their first
/// characters (`sk-proj-`) and their last ones are what OpenAI itself shows to identify a key:
/// no character of the secret may appear in anything keygate writes. 32 bits are enough to tell
/// the keys of one upstream apart and far too few to help guess a key.
pub fn key_id(secret: &str) -> String {
    let digest = Sha256::digest(secret.as_bytes());
    let mut id = String::with_capacity(12);
    id.push_str("key-");
    for byte in &digest[..4] {
        id.push_str(&format!("{byte:02x}"));
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_never_show_the_secret() {
        let secret = Secret::new("sk-proj-abcdef123456");
        let shown = format!("{secret:?} {secret} {:?}", Some(&secret));
        assert!(!shown.contains("sk-"), "{shown}");
        assert!(!shown.contains("abcdef"), "{shown}");
        assert!(shown.contains("<redacted>"));
        assert_eq!(secret.expose(), "sk-proj-abcdef123456");
    }

    #[test]
    fn key_id_is_key_dash_first_8_hex_of_sha256() {
        // sha256("abc") = ba7816bf 8f01cfea ...
        assert_eq!(key_id("abc"), "key-ba7816bf");
        let id = key_id("sk-test");
        assert_eq!(id.len(), 12);
        assert!(id.starts_with("key-"));
        assert!(id[4..]
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_eq!(Secret::new("abc").id(), "key-ba7816bf");
    }
}
