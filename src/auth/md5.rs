//! PostgreSQL's MD5 password authentication (AuthenticationMD5Password), from either a
//! plaintext secret or a stored `md5…` hash, in both directions.

use ::md5::{Digest, Md5};

use super::ct_eq;
use super::secret::Secret;

/// md5(password || user): the digest PostgreSQL stores (after an `md5` prefix, in hex) and the
/// inner hash of an MD5 login.
pub fn md5_password_hash(user: &str, password: &str) -> [u8; 16] {
    let mut hasher = Md5::new();
    hasher.update(password.as_bytes());
    hasher.update(user.as_bytes());
    hasher.finalize().into()
}

/// `md5` + hex(md5(password || user)): the form PostgreSQL stores in `pg_authid`.
pub fn md5_stored_string(user: &str, password: &str) -> String {
    let mut out = String::with_capacity(35);
    out.push_str("md5");
    push_hex(&mut out, &md5_password_hash(user, password));
    out
}

/// `md5` + hex(md5(hex(password_hash) || salt)): what a client puts in its PasswordMessage
/// (without the trailing NUL). Only the hash is needed, which is what lets pgrelay log in to
/// PostgreSQL with an MD5-hashed config password.
pub fn md5_salted_response(password_hash: &[u8; 16], salt: [u8; 4]) -> String {
    let mut inner = String::with_capacity(32);
    push_hex(&mut inner, password_hash);
    let mut hasher = Md5::new();
    hasher.update(inner.as_bytes());
    hasher.update(salt);
    let digest: [u8; 16] = hasher.finalize().into();
    let mut out = String::with_capacity(35);
    out.push_str("md5");
    push_hex(&mut out, &digest);
    out
}

/// Checks the PasswordMessage a client sent in answer to AuthenticationMD5Password(`salt`).
/// `response` may include the message's NUL terminator. Always false for a SCRAM secret,
/// which cannot do MD5; check [`Secret::can_verify_md5`] first to report that clearly.
pub fn verify_md5_response(secret: &Secret, user: &str, salt: [u8; 4], response: &[u8]) -> bool {
    let Some(hash) = secret.md5_hash(user) else {
        return false;
    };
    let response = response.strip_suffix(b"\0").unwrap_or(response);
    ct_eq(md5_salted_response(&hash, salt).as_bytes(), response)
}

/// Recognises PostgreSQL's stored MD5 format exactly as `get_password_type` does: `md5` and
/// 32 lowercase hex digits. Anything else (even uppercase hex) is a plaintext password there.
pub(crate) fn parse_md5_secret(s: &str) -> Option<[u8; 16]> {
    let hex = s.strip_prefix("md5")?.as_bytes();
    if hex.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        let [hi, lo] = pair else { return None };
        *byte = (lower_hex_value(*hi)? << 4) | lower_hex_value(*lo)?;
    }
    Some(out)
}

fn lower_hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

fn push_hex(out: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for &b in bytes {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_hash_matches_postgres() {
        // pg_authid.rolpassword of role r3 created by PostgreSQL 15 with password 'pencil'.
        assert_eq!(md5_stored_string("r3", "pencil"), "md521bb28bf057db7f953fcf519056cd81f");
        assert_eq!(
            md5_stored_string("r3", "pencil"),
            postgres_protocol::password::md5(b"pencil", "r3")
        );
        assert_eq!(
            parse_md5_secret("md521bb28bf057db7f953fcf519056cd81f"),
            Some(md5_password_hash("r3", "pencil"))
        );
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn known_vector_by_hand() {
        // PostgreSQL's formula spelled out: "md5" + hex(md5(hex(md5(password || user)) || salt)).
        let user = "md5_user";
        let password = "password";
        let salt = [0x2a, 0x3d, 0x8f, 0xe0];
        let inner = hex(&Md5::digest(format!("{password}{user}").as_bytes()));
        let mut outer_input = inner.into_bytes();
        outer_input.extend_from_slice(&salt);
        let expected = format!("md5{}", hex(&Md5::digest(&outer_input)));
        assert_eq!(md5_salted_response(&md5_password_hash(user, password), salt), expected);
        // Cross-check with the client implementation tokio-postgres uses.
        assert_eq!(
            expected,
            postgres_protocol::authentication::md5_hash(user.as_bytes(), password.as_bytes(), salt)
        );
        // The value postgres-protocol's own test suite expects for these inputs.
        assert_eq!(expected, "md562af4dd09bbb41884907a838a3233294");
    }

    #[test]
    fn verify_with_plaintext_and_stored_hash() {
        let salt = [1, 2, 3, 4];
        let response = postgres_protocol::authentication::md5_hash(b"alice", b"correct horse", salt);
        let plain = Secret::Plain("correct horse".into());
        let stored = Secret::parse(&md5_stored_string("alice", "correct horse")).unwrap();
        assert!(matches!(stored, Secret::Md5(_)));

        for secret in [&plain, &stored] {
            assert!(verify_md5_response(secret, "alice", salt, response.as_bytes()));
            let mut with_nul = response.clone().into_bytes();
            with_nul.push(0);
            assert!(verify_md5_response(secret, "alice", salt, &with_nul));
            assert!(!verify_md5_response(secret, "alice", [1, 2, 3, 5], response.as_bytes()));
            assert!(!verify_md5_response(secret, "alice", salt, b""));
            assert!(!verify_md5_response(secret, "alice", salt, b"md5"));
            assert!(!verify_md5_response(secret, "alice", salt, &response.as_bytes()[..34]));
            let wrong = postgres_protocol::authentication::md5_hash(b"alice", b"wrong", salt);
            assert!(!verify_md5_response(secret, "alice", salt, wrong.as_bytes()));
        }
        assert!(!verify_md5_response(&plain, "bob", salt, response.as_bytes()));
        // The stored hash is bound to the user name it was made for.
        let for_bob = postgres_protocol::authentication::md5_hash(b"bob", b"correct horse", salt);
        assert!(!verify_md5_response(&stored, "bob", salt, for_bob.as_bytes()));
        assert!(verify_md5_response(&plain, "bob", salt, for_bob.as_bytes()));
    }

    #[test]
    fn scram_secret_cannot_do_md5() {
        let secret = Secret::Scram(crate::auth::ScramVerifier::from_password("pw", b"salt", 1));
        let response = postgres_protocol::authentication::md5_hash(b"u", b"pw", [0; 4]);
        assert!(!secret.can_verify_md5());
        assert!(!verify_md5_response(&secret, "u", [0; 4], response.as_bytes()));
    }

    #[test]
    fn parse_md5_secret_rejects_near_misses() {
        assert_eq!(parse_md5_secret("md5"), None);
        assert_eq!(parse_md5_secret("md5é1bb28bf057db7f953fcf519056cd81"), None);
        assert_eq!(parse_md5_secret("MD521bb28bf057db7f953fcf519056cd81f"), None);
        assert_eq!(parse_md5_secret("md521bb28bf057db7f953fcf519056cd81F"), None);
    }

    proptest::proptest! {
        #[test]
        fn verify_never_panics(resp in proptest::collection::vec(proptest::num::u8::ANY, 0..80),
                               user in ".{0,20}", salt in proptest::array::uniform4(0u8..)) {
            let _ = verify_md5_response(&Secret::Plain("x".into()), &user, salt, &resp);
        }
    }
}
