//! Pure (no I/O) authentication logic: config password secrets, SCRAM-SHA-256 (server side towards
//! clients, with channel binding on TLS; key-only client side towards PostgreSQL) and MD5
//! password checks.
//!
//! Nothing here touches a socket; callers own message framing and decide which PostgreSQL
//! error to send. Every parser takes untrusted bytes and reports problems as errors, never panics.

pub mod channel_binding;
pub mod md5;
pub mod scram;
pub mod secret;

pub use self::channel_binding::{ChannelBindingError, TLS_SERVER_END_POINT, tls_server_end_point};
pub use self::md5::{md5_password_hash, md5_salted_response, md5_stored_string, verify_md5_response};
pub use self::scram::{
    ChannelBinding, SCRAM_SHA_256, SCRAM_SHA_256_PLUS, SaslInitialResponse, ScramError, ScramKeyClient,
    ScramKeyClientAwaitingFinal, ScramServer, ScramServerAwaitingFinal, ScramSuccess, authentication_sasl_body,
    authentication_sasl_continue_body, authentication_sasl_final_body, generate_nonce, parse_sasl_initial_response,
};
pub use self::secret::{
    SCRAM_DEFAULT_ITERATIONS, SCRAM_DEFAULT_SALT_LEN, SCRAM_KEY_LEN, ScramVerifier, Secret, SecretError,
};

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

/// Compares two byte strings without an early exit, so response time does not reveal how many
/// leading bytes of a guessed proof or hash were right. Lengths are not secret here (they are
/// fixed by the protocol), so a length mismatch may return early.
pub(crate) fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

pub(crate) fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// HMAC-SHA-256 keyed with a 32-byte SCRAM key. HMAC zero-pads keys shorter than the block
/// size, so passing the padded 64-byte block is the same MAC and lets us use the infallible
/// fixed-size constructor instead of `new_from_slice`'s `Result`.
pub(crate) fn hmac_sha256(key: &[u8; 32], parts: &[&[u8]]) -> [u8; 32] {
    let mut block = [0u8; 64];
    block[..32].copy_from_slice(key);
    let mut mac = <Hmac<Sha256> as KeyInit>::new(&block.into());
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ct_eq_basics() {
        assert!(ct_eq(b"", b""));
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
    }

    #[test]
    fn hmac_matches_slice_keyed_hmac() {
        let key = [7u8; 32];
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&key).unwrap();
        mac.update(b"hello, world");
        let expected: [u8; 32] = mac.finalize().into_bytes().into();
        assert_eq!(hmac_sha256(&key, &[b"hello, ", b"world"]), expected);
    }
}
