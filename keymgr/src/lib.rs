//! Veil key management: WireGuard (X25519) keys, their storage and generations.
#![forbid(unsafe_code)]

use base64::Engine as _;

/// Encodes a 32-byte key the way WireGuard tools print it (standard base64).
pub fn encode_key(key: &[u8; 32]) -> String {
    base64::engine::general_purpose::STANDARD.encode(key)
}
