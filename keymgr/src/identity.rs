//! Ed25519 signing keys: a node's identity key and the cluster authority key.
//!
//! Both wrap `ed25519_dalek::SigningKey`, which zeroizes its secret on drop
//! (ed25519-dalek's `zeroize` feature). They are distinct types so that a
//! node identity key can never be passed where the authority is expected
//! (certifying nodes) or the other way round; the key files carry distinct
//! `kind=` tags for the same reason (see `store.rs`).
//!
//! Signing is crate-internal: the only things these keys sign are the
//! domain-separated canonical encodings built in `trust.rs`, so no caller
//! can make a key sign arbitrary bytes that might later parse as something
//! else.

use std::fmt;

use ed25519_dalek::Signer as _;
use zeroize::Zeroizing;

use crate::{decode_key, encode_key, Error, KEY_LEN};

/// Length of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;

/// A node's Ed25519 identity key: generated on the node, stored 0600 by
/// [`KeyStore`](crate::KeyStore), certified by the cluster authority, and used
/// to sign the node's announcements. `Debug` shows only the public half.
#[derive(Clone)]
pub struct IdentityKey(ed25519_dalek::SigningKey);

impl IdentityKey {
    /// A fresh key from the operating system's CSPRNG.
    pub fn generate() -> Self {
        Self(ed25519_dalek::SigningKey::generate(&mut rand_core::OsRng))
    }

    /// Rebuilds a key from its 32-byte seed (RFC 8032 section 5.1.5 "private
    /// key"), as stored in the key file.
    pub fn from_seed(seed: [u8; KEY_LEN]) -> Self {
        let seed = Zeroizing::new(seed);
        Self(ed25519_dalek::SigningKey::from_bytes(&seed))
    }

    /// Parses the base64 seed.
    pub fn from_base64(text: &str) -> Result<Self, Error> {
        let seed = Zeroizing::new(decode_key(text)?);
        Ok(Self::from_seed(*seed))
    }

    /// The 32-byte seed, in a buffer that zeroizes itself.
    pub fn to_seed(&self) -> Zeroizing<[u8; KEY_LEN]> {
        Zeroizing::new(self.0.to_bytes())
    }

    /// The public key (RFC 8032 encoding), what a certificate names.
    pub fn public_key(&self) -> [u8; KEY_LEN] {
        self.0.verifying_key().to_bytes()
    }

    pub(crate) fn sign(&self, message: &[u8]) -> [u8; SIGNATURE_LEN] {
        self.0.sign(message).to_bytes()
    }
}

impl fmt::Debug for IdentityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdentityKey")
            .field("public", &encode_key(&self.public_key()))
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// The cluster authority's Ed25519 key (`veilctl ca init`). It lives with the
/// operator, never in the cluster store; agents know only its public key,
/// given to them out of band. `Debug` shows only the public half.
#[derive(Clone)]
pub struct AuthorityKey(IdentityKey);

impl AuthorityKey {
    /// A fresh key from the operating system's CSPRNG.
    pub fn generate() -> Self {
        Self(IdentityKey::generate())
    }

    /// Rebuilds the key from its 32-byte seed, as stored in the key file.
    pub fn from_seed(seed: [u8; KEY_LEN]) -> Self {
        Self(IdentityKey::from_seed(seed))
    }

    /// Parses the base64 seed.
    pub fn from_base64(text: &str) -> Result<Self, Error> {
        IdentityKey::from_base64(text).map(Self)
    }

    /// The 32-byte seed, in a buffer that zeroizes itself.
    pub fn to_seed(&self) -> Zeroizing<[u8; KEY_LEN]> {
        self.0.to_seed()
    }

    /// The public key every agent is installed with (the trust root).
    pub fn public_key(&self) -> [u8; KEY_LEN] {
        self.0.public_key()
    }

    pub(crate) fn sign(&self, message: &[u8]) -> [u8; SIGNATURE_LEN] {
        self.0.sign(message)
    }
}

impl fmt::Debug for AuthorityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthorityKey")
            .field("public", &encode_key(&self.public_key()))
            .field("secret", &"<redacted>")
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc8032_test_vector_1() {
        // RFC 8032 section 7.1, TEST 1: the public key for this seed and the
        // signature of the empty message.
        let key = IdentityKey::from_seed(hex::<32>(
            "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
        ));
        assert_eq!(
            key.public_key(),
            hex::<32>("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
        );
        assert_eq!(
            key.sign(b""),
            hex::<64>(
                "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155\
                 5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
            )
        );
    }

    #[test]
    fn seed_round_trip_and_distinct_keys() {
        let a = IdentityKey::generate();
        let b = IdentityKey::from_base64(&encode_key(&a.to_seed())).unwrap();
        assert_eq!(a.public_key(), b.public_key());
        assert_ne!(a.public_key(), IdentityKey::generate().public_key());
        let ca = AuthorityKey::generate();
        let again = AuthorityKey::from_seed(*ca.to_seed());
        assert_eq!(ca.public_key(), again.public_key());
        assert!(AuthorityKey::from_base64("short").is_err());
    }

    #[test]
    fn debug_does_not_leak_secret() {
        let id = IdentityKey::generate();
        let ca = AuthorityKey::generate();
        for (shown, seed, public) in [
            (format!("{id:?} {id:#?}"), id.to_seed(), id.public_key()),
            (format!("{ca:?} {ca:#?}"), ca.to_seed(), ca.public_key()),
        ] {
            assert!(!shown.contains(&encode_key(&seed)), "{shown}");
            assert!(!shown.contains(&format!("{:?}", *seed)), "{shown}");
            assert!(shown.contains("<redacted>"), "{shown}");
            assert!(shown.contains(&encode_key(&public)), "{shown}");
        }
    }

    fn hex<const N: usize>(s: &str) -> [u8; N] {
        let s: String = s.split_whitespace().collect();
        let mut out = [0u8; N];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
        }
        out
    }
}
