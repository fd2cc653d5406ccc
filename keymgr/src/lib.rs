//! Veil key management: WireGuard (X25519) keys and their rotation, Ed25519
//! node identity and cluster authority keys, node certificates and signed
//! node announcements (the trust model is documented in `trust.rs`).
//!
//! Secrets live in types that zeroize on drop and never print themselves.
//! Storage is one small versioned text file per key kind in a private
//! directory, written atomically so a crash never leaves a half-written key.
//! Each stored key carries a generation number; rotation keeps the previous
//! WireGuard key in its own file for the grace period.
//!
//! A pure library: no async runtime, no networking, no `unsafe`.
#![forbid(unsafe_code)]

mod identity;
mod store;
mod trust;

use std::fmt;

use base64::Engine as _;
use zeroize::Zeroizing;

pub use identity::{AuthorityKey, IdentityKey, SIGNATURE_LEN};
pub use store::{read_public_key_file, write_public_key_file, KeyKind, KeyStore, StoredKey};
pub use trust::{
    decode_signature, encode_signature, normalize_cidrs, unix_now, validate_node_name,
    AnnouncementBody, NodeCertificate, SignedAnnouncement, Signer, SignerKind, TrustError,
    VerifyContext, ANNOUNCEMENT_DOMAIN, CERTIFICATE_DOMAIN, DEFAULT_CLOCK_SKEW_SECS, MAX_CIDRS,
    MAX_NODE_NAME_LEN,
};

/// Length of an X25519 key (public or private) and of an Ed25519 seed.
pub const KEY_LEN: usize = 32;

/// Everything that can go wrong in key handling. Messages never contain key material.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("key is not valid base64: {0}")]
    Base64(#[source] base64::DecodeError),
    #[error("key decodes to {len} bytes, expected {KEY_LEN}")]
    KeyLength { len: usize },
    #[error("{path}: {op}: {source}")]
    Io {
        path: std::path::PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path}: permissions {mode:04o} allow access by group or others; \
         the key may have leaked: rotate it, or fix with `chmod 600 {path}`"
    )]
    Permissions { path: std::path::PathBuf, mode: u32 },
    #[error("{path}: corrupt key file: {problem}")]
    Corrupt {
        path: std::path::PathBuf,
        problem: String,
    },
    #[error("generation counter exhausted for {kind} key")]
    GenerationOverflow { kind: KeyKind },
    #[error(
        "{path}: a cluster authority key already exists; refusing to overwrite it \
         (every node certificate depends on it)"
    )]
    AuthorityExists { path: std::path::PathBuf },
    #[error("{path}: no {kind} key to rotate; start the agent once to create it")]
    NothingToRotate {
        path: std::path::PathBuf,
        kind: KeyKind,
    },
    #[error(
        "{path}: permissions {mode:04o} let group or others modify the trust root; \
         fix with `chmod 644 {path}` and check the key with the operator"
    )]
    TrustRootWritable { path: std::path::PathBuf, mode: u32 },
}

/// Encodes a 32-byte key the way WireGuard tools print it (standard base64).
pub fn encode_key(key: &[u8; 32]) -> String {
    base64::engine::general_purpose::STANDARD.encode(key)
}

/// Decodes a key printed by [`encode_key`] or `wg genkey`/`wg pubkey`.
///
/// The input may be a private key, so errors never echo it.
pub fn decode_key(text: &str) -> Result<[u8; KEY_LEN], Error> {
    let bytes = Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(Error::Base64)?,
    );
    let key: [u8; KEY_LEN] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| Error::KeyLength { len: bytes.len() })?;
    Ok(key)
}

/// Whether a peer's X25519 public key can take part in a handshake.
///
/// Small-order points (the all-zero key among them) make every
/// Diffie-Hellman result all-zero, which the WireGuard paper (section 5.4.2,
/// via RFC 7748 section 6.1) says must be rejected. A clamped scalar is a
/// multiple of the cofactor 8, so a DH with any fixed secret yields zero
/// exactly for those points: `was_contributory` detects them.
pub fn is_usable_public_key(key: &[u8; KEY_LEN]) -> bool {
    let probe = x25519_dalek::StaticSecret::from([0x42; KEY_LEN]);
    probe
        .diffie_hellman(&x25519_dalek::PublicKey::from(*key))
        .was_contributory()
}

/// A node's WireGuard private key. Zeroized on drop (x25519-dalek's
/// `zeroize` feature); `Debug` shows only the public half.
#[derive(Clone)]
pub struct WireGuardPrivateKey(x25519_dalek::StaticSecret);

impl WireGuardPrivateKey {
    /// A fresh key from the operating system's CSPRNG.
    pub fn generate() -> Self {
        Self(x25519_dalek::StaticSecret::random_from_rng(
            rand_core::OsRng,
        ))
    }

    /// Wraps raw key bytes (clamping happens inside X25519, as in `wg`).
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(x25519_dalek::StaticSecret::from(bytes))
    }

    /// Parses the base64 form printed by `wg genkey`.
    pub fn from_base64(text: &str) -> Result<Self, Error> {
        let bytes = Zeroizing::new(decode_key(text)?);
        Ok(Self::from_bytes(*bytes))
    }

    /// The raw secret, in a buffer that zeroizes itself.
    pub fn to_bytes(&self) -> Zeroizing<[u8; KEY_LEN]> {
        Zeroizing::new(self.0.to_bytes())
    }

    /// The base64 secret (for the UAPI `private_key` is hex; this is for files
    /// and `wg`-compatible output), in a buffer that zeroizes itself.
    pub fn to_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(encode_key(&self.to_bytes()))
    }

    pub fn public_key(&self) -> [u8; KEY_LEN] {
        x25519_dalek::PublicKey::from(&self.0).to_bytes()
    }

    /// The key in the form boringtun's `Tunn::new` takes (boringtun 0.7.1
    /// re-exports this same x25519-dalek 2.x as `boringtun::x25519`).
    pub fn as_static_secret(&self) -> &x25519_dalek::StaticSecret {
        &self.0
    }
}

impl fmt::Debug for WireGuardPrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WireGuardPrivateKey")
            .field("public", &encode_key(&self.public_key()))
            .field("secret", &"<redacted>")
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_round_trip() {
        let key = [7u8; 32];
        assert_eq!(decode_key(&encode_key(&key)).unwrap(), key);
        // Surrounding whitespace (a trailing newline from a file) is tolerated.
        assert_eq!(
            decode_key(&format!(" {}\n", encode_key(&key))).unwrap(),
            key
        );
    }

    #[test]
    fn decode_errors_are_clear_and_do_not_echo_input() {
        let err = decode_key("not base64 at all!").unwrap_err();
        assert!(matches!(err, Error::Base64(_)), "{err:?}");
        assert!(!err.to_string().contains("not base64 at all"));
        // A truncated key: 41 characters is not a whole number of base64 quanta,
        // 40 characters is, but decodes to too few bytes.
        let err = decode_key(&encode_key(&[1; 32])[..41]).unwrap_err();
        assert!(matches!(err, Error::Base64(_)), "{err:?}");
        let err = decode_key(&encode_key(&[1; 32])[..40]).unwrap_err();
        assert!(matches!(err, Error::KeyLength { len: 30 }), "{err:?}");
        let short = base64::engine::general_purpose::STANDARD.encode([1u8; 16]);
        let err = decode_key(&short).unwrap_err();
        assert!(matches!(err, Error::KeyLength { len: 16 }), "{err:?}");
        assert_eq!(err.to_string(), "key decodes to 16 bytes, expected 32");
        let long = base64::engine::general_purpose::STANDARD.encode([1u8; 33]);
        assert!(matches!(
            decode_key(&long),
            Err(Error::KeyLength { len: 33 })
        ));
        assert!(matches!(decode_key(""), Err(Error::KeyLength { len: 0 })));
    }

    #[test]
    fn private_key_matches_wg_pubkey() {
        // RFC 7748 section 6.1 test vector: Alice's private and public key.
        let sk = WireGuardPrivateKey::from_bytes(hex32(
            "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
        ));
        assert_eq!(
            sk.public_key(),
            hex32("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
        );
        let again = WireGuardPrivateKey::from_base64(&sk.to_base64()).unwrap();
        assert_eq!(again.public_key(), sk.public_key());
        assert_eq!(*again.to_bytes(), *sk.to_bytes());
    }

    #[test]
    fn generated_keys_differ() {
        let a = WireGuardPrivateKey::generate();
        let b = WireGuardPrivateKey::generate();
        assert_ne!(*a.to_bytes(), *b.to_bytes());
        assert_ne!(a.public_key(), b.public_key());
    }

    #[test]
    fn debug_does_not_leak_secret() {
        let sk = WireGuardPrivateKey::generate();
        let shown = format!("{sk:?} {sk:#?}");
        let secret_b64 = sk.to_base64();
        assert!(!shown.contains(secret_b64.as_str()), "{shown}");
        assert!(!shown.contains(&format!("{:?}", *sk.to_bytes())), "{shown}");
        assert!(shown.contains("<redacted>"));
        assert!(shown.contains(&encode_key(&sk.public_key())));
    }

    #[test]
    fn small_order_public_keys_are_unusable() {
        assert!(!is_usable_public_key(&[0; 32]));
        let mut one = [0u8; 32];
        one[0] = 1;
        assert!(!is_usable_public_key(&one));
        // p - 1 (order 2), little endian: ec ff .. ff 7f.
        let mut p_minus_1 = [0xff; 32];
        p_minus_1[0] = 0xec;
        p_minus_1[31] = 0x7f;
        assert!(!is_usable_public_key(&p_minus_1));
        assert!(is_usable_public_key(
            &WireGuardPrivateKey::generate().public_key()
        ));
    }

    fn hex32(s: &str) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
        }
        out
    }
}
