//! Secrets at rest: AES-256-GCM under the operator's master key, a fresh random 96-bit nonce
//! per secret, and the key's upstream and name as associated data, so a sealed secret copied
//! onto another key's record fails to open rather than serving under the wrong name.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use std::fmt;

/// Why a secret could not be sealed or opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// The system's random source failed.
    #[error("no random nonce could be drawn")]
    Random,
    /// The nonce or the ciphertext is not valid base64, or has the wrong length.
    #[error("the sealed secret is malformed")]
    Malformed,
    /// Authentication failed: another master key, or a record that was altered.
    #[error("the sealed secret does not open with this master key (another master key, or an altered record)")]
    WrongKey,
}

/// The AES-256-GCM key that seals runtime keys' secrets.
pub struct MasterKey(LessSafeKey);

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

/// A sealed secret: base64 nonce and base64 ciphertext with its tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    /// The nonce, base64.
    pub nonce: String,
    /// Ciphertext and tag, base64.
    pub ciphertext: String,
}

impl MasterKey {
    /// The master key made of these 32 bytes.
    pub fn new(bytes: &[u8; 32]) -> Self {
        // `UnboundKey::new` only fails on a length other than the algorithm's, and 32 is it.
        match UnboundKey::new(&AES_256_GCM, bytes) {
            Ok(key) => Self(LessSafeKey::new(key)),
            Err(_) => unreachable!("AES-256 takes 32-byte keys"),
        }
    }

    /// Seals `secret`, bound to `context` (the key's identity).
    pub fn seal(&self, context: &[u8], secret: &[u8]) -> Result<Sealed, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| SealError::Random)?;
        let mut data = secret.to_vec();
        self.0
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(context),
                &mut data,
            )
            .map_err(|_| SealError::Random)?;
        Ok(Sealed {
            nonce: B64.encode(nonce),
            ciphertext: B64.encode(&data),
        })
    }

    /// Opens `sealed`, which must have been sealed with this key and `context`.
    pub fn open(&self, context: &[u8], sealed: &Sealed) -> Result<Vec<u8>, SealError> {
        let nonce = B64
            .decode(&sealed.nonce)
            .map_err(|_| SealError::Malformed)?;
        let nonce =
            <[u8; NONCE_LEN]>::try_from(nonce.as_slice()).map_err(|_| SealError::Malformed)?;
        let mut data = B64
            .decode(&sealed.ciphertext)
            .map_err(|_| SealError::Malformed)?;
        let plain = self
            .0
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(context),
                &mut data,
            )
            .map_err(|_| SealError::WrongKey)?;
        Ok(plain.to_vec())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn key(byte: u8) -> MasterKey {
        MasterKey::new(&[byte; 32])
    }

    #[test]
    fn a_sealed_secret_opens_with_its_key_and_context_only() {
        let sealed = key(1).seal(b"openai/k4", b"sk-live-123").unwrap();
        assert_eq!(key(1).open(b"openai/k4", &sealed).unwrap(), b"sk-live-123");
        assert_eq!(key(2).open(b"openai/k4", &sealed), Err(SealError::WrongKey));
        assert_eq!(key(1).open(b"openai/k5", &sealed), Err(SealError::WrongKey));
    }

    #[test]
    fn the_ciphertext_never_holds_the_secret_and_nonces_differ() {
        let a = key(1).seal(b"c", b"sk-live-123").unwrap();
        let b = key(1).seal(b"c", b"sk-live-123").unwrap();
        assert_ne!(a.nonce, b.nonce);
        assert_ne!(a.ciphertext, b.ciphertext);
        for s in [&a, &b] {
            let raw = B64.decode(&s.ciphertext).unwrap();
            assert!(!raw.windows(7).any(|w| w == b"sk-live"));
            assert_eq!(raw.len(), b"sk-live-123".len() + 16, "ciphertext and tag");
        }
    }

    #[test]
    fn an_altered_or_malformed_record_is_refused() {
        let mut s = key(1).seal(b"c", b"secret").unwrap();
        let mut raw = B64.decode(&s.ciphertext).unwrap();
        raw[0] ^= 1;
        s.ciphertext = B64.encode(&raw);
        assert_eq!(key(1).open(b"c", &s), Err(SealError::WrongKey));
        s.nonce = "not base64!".into();
        assert_eq!(key(1).open(b"c", &s), Err(SealError::Malformed));
        s.nonce = B64.encode([0u8; 5]);
        assert_eq!(key(1).open(b"c", &s), Err(SealError::Malformed));
    }

    #[test]
    fn the_master_key_never_prints() {
        assert_eq!(format!("{:?}", key(7)), "MasterKey(<redacted>)");
    }
}
