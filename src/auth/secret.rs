//! Password secrets as written in pgrelay's config: plaintext, PostgreSQL MD5 hashes and
//! SCRAM-SHA-256 verifiers, in the same textual formats PostgreSQL stores in `pg_authid`.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use sha2::Sha256;
use thiserror::Error;

use super::md5::{md5_password_hash, parse_md5_secret};
use super::{ct_eq, hmac_sha256, sha256};

/// PostgreSQL's default (`scram_iterations` before PG 16 could not be changed).
pub const SCRAM_DEFAULT_ITERATIONS: u32 = 4096;
/// PostgreSQL's default salt length (`SCRAM_DEFAULT_SALT_LEN`).
pub const SCRAM_DEFAULT_SALT_LEN: usize = 16;
/// Length of SHA-256 based SCRAM keys and signatures.
pub const SCRAM_KEY_LEN: usize = 32;

const VERIFIER_PREFIX: &str = "SCRAM-SHA-256$";

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum SecretError {
    /// The string starts like a SCRAM verifier but is not one. Reported instead of silently
    /// treating it as a plaintext password (which PostgreSQL would do), because in a config
    /// file that is almost always a copy/paste mistake that would lock the user out.
    #[error("malformed SCRAM-SHA-256 verifier: {0}")]
    MalformedVerifier(&'static str),
}

/// What PostgreSQL stores for a SCRAM-SHA-256 password: enough to check a client's proof and
/// to sign the server's answer, but not enough to log in (that needs ClientKey).
#[derive(Clone, PartialEq, Eq)]
pub struct ScramVerifier {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; SCRAM_KEY_LEN],
    pub server_key: [u8; SCRAM_KEY_LEN],
}

impl ScramVerifier {
    /// Parses `SCRAM-SHA-256$<iterations>:<b64 salt>$<b64 StoredKey>:<b64 ServerKey>`.
    pub fn parse(s: &str) -> Result<Self, SecretError> {
        let rest = s
            .strip_prefix(VERIFIER_PREFIX)
            .ok_or(SecretError::MalformedVerifier("missing SCRAM-SHA-256$ prefix"))?;
        let (params, keys) = rest
            .split_once('$')
            .ok_or(SecretError::MalformedVerifier("missing '$' before the keys"))?;
        let (iterations, salt) = params
            .split_once(':')
            .ok_or(SecretError::MalformedVerifier("missing ':' after the iteration count"))?;
        let (stored_key, server_key) = keys
            .split_once(':')
            .ok_or(SecretError::MalformedVerifier("missing ':' between the keys"))?;

        // u32::from_str would accept a leading '+', which PostgreSQL's own output never has.
        if iterations.is_empty() || !iterations.bytes().all(|b| b.is_ascii_digit()) {
            return Err(SecretError::MalformedVerifier("invalid iteration count"));
        }
        let iterations: u32 = iterations
            .parse()
            .map_err(|_| SecretError::MalformedVerifier("invalid iteration count"))?;
        if iterations == 0 {
            return Err(SecretError::MalformedVerifier("iteration count must be positive"));
        }
        let salt = STANDARD
            .decode(salt)
            .map_err(|_| SecretError::MalformedVerifier("salt is not valid base64"))?;
        if salt.is_empty() {
            return Err(SecretError::MalformedVerifier("salt is empty"));
        }
        Ok(Self {
            iterations,
            salt,
            stored_key: decode_key(stored_key, "StoredKey is not 32 base64-encoded bytes")?,
            server_key: decode_key(server_key, "ServerKey is not 32 base64-encoded bytes")?,
        })
    }

    /// Derives the verifier PostgreSQL would store for `password` with this salt and
    /// iteration count. Costs `iterations` PBKDF2 rounds: do it at config load, not per login.
    pub fn from_password(password: &str, salt: &[u8], iterations: u32) -> Self {
        let salted = salted_password(password, salt, iterations);
        let client_key = hmac_sha256(&salted, &[b"Client Key"]);
        Self {
            iterations,
            salt: salt.to_vec(),
            stored_key: sha256(&client_key),
            server_key: hmac_sha256(&salted, &[b"Server Key"]),
        }
    }

    /// A verifier with a fresh random salt and PostgreSQL's default cost, so pgrelay can offer
    /// SCRAM to clients even for users whose config password is plaintext.
    pub fn generate(password: &str) -> Self {
        let mut salt = [0u8; SCRAM_DEFAULT_SALT_LEN];
        rand::fill(&mut salt);
        Self::from_password(password, &salt, SCRAM_DEFAULT_ITERATIONS)
    }

    /// A verifier for a user that does not exist (or has no usable secret), so that pgrelay can
    /// run a complete SCRAM exchange that always fails instead of revealing which users exist.
    /// The salt is derived from the user name and a process-wide secret so repeated attempts
    /// see a stable salt, like a real user's; the keys are random, so no proof can match.
    /// `iterations` should be what real verifiers show (see `ClientAuth` lookups), else the
    /// count alone tells an unknown user from a known one.
    pub fn mock(username: &str, mock_secret: &[u8], iterations: u32) -> Self {
        let mut input = Vec::with_capacity(username.len() + mock_secret.len());
        input.extend_from_slice(username.as_bytes());
        input.extend_from_slice(mock_secret);
        let digest = sha256(&input);
        let mut stored_key = [0u8; SCRAM_KEY_LEN];
        let mut server_key = [0u8; SCRAM_KEY_LEN];
        rand::fill(&mut stored_key);
        rand::fill(&mut server_key);
        Self {
            iterations,
            salt: digest[..SCRAM_DEFAULT_SALT_LEN].to_vec(),
            stored_key,
            server_key,
        }
    }

    /// Checks a cleartext password (e.g. from AuthenticationCleartextPassword) against this
    /// verifier. Runs the full PBKDF2, so it is as slow as creating a verifier.
    pub fn verify_password(&self, password: &str) -> bool {
        let salted = salted_password(password, &self.salt, self.iterations);
        let client_key = hmac_sha256(&salted, &[b"Client Key"]);
        ct_eq(&sha256(&client_key), &self.stored_key)
    }
}

/// PostgreSQL's format, so a verifier can be copied between pgrelay's config and `pg_authid`.
impl fmt::Display for ScramVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{VERIFIER_PREFIX}{}:{}${}:{}",
            self.iterations,
            STANDARD.encode(&self.salt),
            STANDARD.encode(self.stored_key),
            STANDARD.encode(self.server_key)
        )
    }
}

/// The keys are redacted: StoredKey and ServerKey let an attacker impersonate the server and
/// brute-force the password offline, so they must not end up in logs.
impl fmt::Debug for ScramVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramVerifier")
            .field("iterations", &self.iterations)
            .field("salt", &STANDARD.encode(&self.salt))
            .field("stored_key", &"<redacted>")
            .field("server_key", &"<redacted>")
            .finish()
    }
}

/// A user's password as configured in pgrelay.
#[derive(Clone, PartialEq, Eq)]
pub enum Secret {
    Plain(String),
    /// The 16-byte digest behind PostgreSQL's `md5<32 hex>` format: md5(password || username).
    /// It is bound to the user name it was made for.
    Md5([u8; 16]),
    Scram(ScramVerifier),
}

impl Secret {
    /// Classifies a config password the way PostgreSQL's `get_password_type` does:
    /// a SCRAM verifier, `md5` + 32 lowercase hex digits, or else a plaintext password.
    /// Unlike PostgreSQL, a string that starts with `SCRAM-SHA-256$` but does not parse is an
    /// error rather than a plaintext password (see [`SecretError::MalformedVerifier`]).
    pub fn parse(s: &str) -> Result<Self, SecretError> {
        if s.starts_with(VERIFIER_PREFIX) {
            return ScramVerifier::parse(s).map(Secret::Scram);
        }
        if let Some(hash) = parse_md5_secret(s) {
            return Ok(Secret::Md5(hash));
        }
        Ok(Secret::Plain(s.to_owned()))
    }

    /// The md5(password || user) digest used by MD5 authentication, if this secret can
    /// provide one (a SCRAM verifier cannot).
    pub fn md5_hash(&self, user: &str) -> Option<[u8; 16]> {
        match self {
            Secret::Plain(password) => Some(md5_password_hash(user, password)),
            Secret::Md5(hash) => Some(*hash),
            Secret::Scram(_) => None,
        }
    }

    /// Whether MD5 authentication can be used with this secret; lets the caller pick another
    /// method or give a clear error instead of a confusing "password authentication failed".
    pub fn can_verify_md5(&self) -> bool {
        !matches!(self, Secret::Scram(_))
    }

    /// The verifier to use when offering SCRAM to a client: the configured one, or a freshly
    /// salted one for a plaintext password (slow: call once at config load and keep it).
    /// An MD5 hash cannot be turned into a SCRAM verifier.
    pub fn to_scram_verifier(&self) -> Option<ScramVerifier> {
        match self {
            Secret::Plain(password) => Some(ScramVerifier::generate(password)),
            Secret::Md5(_) => None,
            Secret::Scram(verifier) => Some(verifier.clone()),
        }
    }

    /// Checks a cleartext password sent by a client (AuthenticationCleartextPassword).
    pub fn verify_cleartext(&self, user: &str, password: &str) -> bool {
        match self {
            // Hashing first keeps the comparison constant-time even across lengths.
            Secret::Plain(expected) => ct_eq(&sha256(expected.as_bytes()), &sha256(password.as_bytes())),
            Secret::Md5(hash) => ct_eq(&md5_password_hash(user, password), hash),
            Secret::Scram(verifier) => verifier.verify_password(password),
        }
    }
}

impl FromStr for Secret {
    type Err = SecretError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Secret::Plain(_) => f.write_str("Secret::Plain(<redacted>)"),
            Secret::Md5(_) => f.write_str("Secret::Md5(<redacted>)"),
            Secret::Scram(verifier) => f.debug_tuple("Secret::Scram").field(verifier).finish(),
        }
    }
}

fn decode_key(b64: &str, error: &'static str) -> Result<[u8; SCRAM_KEY_LEN], SecretError> {
    STANDARD
        .decode(b64)
        .ok()
        .and_then(|bytes| <[u8; SCRAM_KEY_LEN]>::try_from(bytes).ok())
        .ok_or(SecretError::MalformedVerifier(error))
}

/// PostgreSQL SASLpreps the password but, when that fails (prohibited characters, bidi
/// violations, ...), hashes the raw bytes instead of rejecting it; doing the same keeps our
/// verifiers interchangeable with PostgreSQL's for every password.
pub(crate) fn prepare_password(password: &str) -> Vec<u8> {
    match stringprep::saslprep(password) {
        Ok(prepared) => prepared.into_owned().into_bytes(),
        Err(_) => password.as_bytes().to_vec(),
    }
}

fn salted_password(password: &str, salt: &[u8], iterations: u32) -> [u8; SCRAM_KEY_LEN] {
    pbkdf2::pbkdf2_hmac_array::<Sha256, SCRAM_KEY_LEN>(&prepare_password(password), salt, iterations)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Made with PostgreSQL 15 (`SET password_encryption = 'scram-sha-256'; CREATE ROLE ...`).
    const PG15_PENCIL: &str = "SCRAM-SHA-256$4096:s7y0Go61+pl2GCGU09+CIg==$XPbNadlJavlZQDs1de6byrscFB4Og2DoJTjchOqRd+c=:T+XuC7QZEAc7PBUGtodF60J9Uja+RQ1Iv+/M4Hym01A=";
    // Password 'pässwörd ✓'.
    const PG15_UNICODE: &str = "SCRAM-SHA-256$4096:EM3KXDDDNuDwEomt9/54Mg==$G7ZQftBGC0QwWN05C0UUy4VhpfOjqQ1e+aio00n1gd4=:PP4mifrlPDilCNjHkj1u8E5qd3NnnWx0wnqesGVfcwU=";
    // Password E'pen\u00ADcil\u2168': SASLprep drops the soft hyphen and NFKC maps U+2168 to "IX".
    const PG15_SASLPREP: &str = "SCRAM-SHA-256$4096:4ie2RfJgrUTHKwm7ROAJOg==$uUzubV/4maagNEosDTbN9r5J8KTTXUXrd8DeYuz55xo=:9pnpPALt5XbJ+wLtKWMUVx9M9ExNRaiC0hCqcfxfxYs=";
    // Password E'bell\u0007pw': SASLprep rejects the control character, so the raw bytes count.
    const PG15_RAW: &str = "SCRAM-SHA-256$4096:0DsNhBYtPyCGkPMGLr5miw==$nFVyvK4ZiU5jOtNnxvSAPXJvGvTGavUCeubbqjN96wc=:zeFyj6huVtRIEUJT3kgItQg8J3gkbA2ke86MSZCl9xI=";
    // Role 'r3', password 'pencil', password_encryption = 'md5'.
    const PG15_MD5_R3: &str = "md521bb28bf057db7f953fcf519056cd81f";

    fn reproduce(verifier: &ScramVerifier, password: &str) -> ScramVerifier {
        ScramVerifier::from_password(password, &verifier.salt, verifier.iterations)
    }

    #[test]
    fn postgres_15_verifiers_parse_and_verify() {
        for (text, password) in [
            (PG15_PENCIL, "pencil"),
            (PG15_UNICODE, "pässwörd ✓"),
            (PG15_SASLPREP, "pen\u{AD}cil\u{2168}"),
            (PG15_RAW, "bell\u{7}pw"),
        ] {
            let verifier = ScramVerifier::parse(text).unwrap();
            assert_eq!(verifier.iterations, 4096);
            assert_eq!(verifier.salt.len(), 16);
            assert_eq!(verifier.to_string(), text);
            assert_eq!(&reproduce(&verifier, password), &verifier, "{password:?}");
            assert!(verifier.verify_password(password));
            assert!(!verifier.verify_password("pencil2"));
        }
        let saslprep = ScramVerifier::parse(PG15_SASLPREP).unwrap();
        assert!(saslprep.verify_password("pencilIX"));
    }

    #[test]
    fn rfc7677_salted_verifier() {
        let salt = STANDARD.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let v = ScramVerifier::from_password("pencil", &salt, 4096);
        // StoredKey/ServerKey follow from the RFC 7677 exchange; the same values appear in
        // PostgreSQL's and other SCRAM implementations' tests for this vector.
        let text = v.to_string();
        assert!(text.starts_with("SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$"));
        assert_eq!(ScramVerifier::parse(&text).unwrap(), v);
    }

    #[test]
    fn round_trip_generated() {
        let v = ScramVerifier::generate("s3cret");
        assert_eq!(v.iterations, SCRAM_DEFAULT_ITERATIONS);
        assert_eq!(v.salt.len(), SCRAM_DEFAULT_SALT_LEN);
        let parsed = ScramVerifier::parse(&v.to_string()).unwrap();
        assert_eq!(parsed, v);
        assert!(parsed.verify_password("s3cret"));
        assert_ne!(ScramVerifier::generate("s3cret").salt, v.salt);
    }

    #[test]
    fn matches_postgres_protocol_hasher() {
        // postgres-protocol's client-side hasher follows libpq's PQencryptPasswordConn.
        let text = postgres_protocol::password::scram_sha_256("hunter2 ✓".as_bytes());
        let v = ScramVerifier::parse(&text).unwrap();
        assert_eq!(reproduce(&v, "hunter2 ✓"), v);
    }

    #[test]
    fn malformed_verifiers() {
        let good = PG15_PENCIL;
        let cases = [
            "SCRAM-SHA-256$".to_string(),
            "SCRAM-SHA-256$4096".to_string(),
            "SCRAM-SHA-256$4096:c2FsdA==".to_string(),
            "SCRAM-SHA-256$4096:c2FsdA==$abc".to_string(),
            good.replace("$4096:", "$0:"),
            good.replace("$4096:", "$+4096:"),
            good.replace("$4096:", "$-1:"),
            good.replace("$4096:", "$99999999999:"),
            good.replace("$4096:", "$:"),
            good.replace("s7y0Go61+pl2GCGU09+CIg==", ""),
            good.replace("s7y0Go61+pl2GCGU09+CIg==", "!!!"),
            good.replace("XPbNadlJ", "XPbN"),
            good.replace("=:T+Xu", ":T+Xu"),
            format!("{good}extra"),
        ];
        for case in &cases {
            assert!(ScramVerifier::parse(case).is_err(), "{case}");
            assert!(Secret::parse(case).is_err(), "{case}");
        }
    }

    #[test]
    fn secret_classification() {
        assert!(matches!(Secret::parse(PG15_PENCIL), Ok(Secret::Scram(_))));
        let md5 = Secret::parse(PG15_MD5_R3).unwrap();
        assert_eq!(md5, Secret::Md5(md5_password_hash("r3", "pencil")));
        assert_eq!(Secret::parse("pencil").unwrap(), Secret::Plain("pencil".into()));
        assert_eq!(Secret::parse("").unwrap(), Secret::Plain(String::new()));
        // Like PostgreSQL: only lowercase hex of the exact length is an MD5 hash.
        for plain in [
            "md521BB28BF057DB7F953FCF519056CD81F",
            "md521bb28bf057db7f953fcf519056cd81",
            "md521bb28bf057db7f953fcf519056cd81f0",
            "md521bb28bf057db7f953fcf519056cd8zz",
            "scram-sha-256$4096:x$y:z",
        ] {
            assert_eq!(Secret::parse(plain).unwrap(), Secret::Plain(plain.into()));
        }
        assert_eq!("pencil".parse::<Secret>().unwrap(), Secret::Plain("pencil".into()));
    }

    #[test]
    fn secret_helpers() {
        let plain = Secret::Plain("pencil".into());
        let md5 = Secret::parse(PG15_MD5_R3).unwrap();
        let scram = Secret::parse(PG15_PENCIL).unwrap();

        assert!(plain.verify_cleartext("r3", "pencil"));
        assert!(!plain.verify_cleartext("r3", "pencil "));
        assert!(md5.verify_cleartext("r3", "pencil"));
        assert!(!md5.verify_cleartext("r4", "pencil"));
        assert!(scram.verify_cleartext("anyone", "pencil"));
        assert!(!scram.verify_cleartext("anyone", "Pencil"));

        assert_eq!(plain.md5_hash("r3"), md5.md5_hash("r3"));
        assert_eq!(scram.md5_hash("r3"), None);
        assert!(plain.can_verify_md5() && md5.can_verify_md5() && !scram.can_verify_md5());

        assert!(md5.to_scram_verifier().is_none());
        assert_eq!(
            scram.to_scram_verifier(),
            Some(ScramVerifier::parse(PG15_PENCIL).unwrap())
        );
        assert!(plain.to_scram_verifier().unwrap().verify_password("pencil"));
    }

    #[test]
    fn debug_redacts() {
        let text = format!(
            "{:?} {:?} {:?}",
            Secret::Plain("hunter2".into()),
            Secret::parse(PG15_MD5_R3).unwrap(),
            Secret::parse(PG15_PENCIL).unwrap()
        );
        assert!(!text.contains("hunter2"));
        assert!(!text.contains("21bb28bf"));
        assert!(!text.contains("XPbNadlJ"));
        assert!(!text.contains("T+XuC7QZ"));
    }

    #[test]
    fn mock_verifier_is_stable_per_user_and_never_verifies() {
        let a = ScramVerifier::mock("alice", b"secret", 4096);
        assert_eq!(a.salt, ScramVerifier::mock("alice", b"secret", 4096).salt);
        assert_ne!(a.salt, ScramVerifier::mock("bob", b"secret", 4096).salt);
        assert_eq!(ScramVerifier::mock("alice", b"secret", 10_000).iterations, 10_000);
        assert_eq!(a.salt.len(), SCRAM_DEFAULT_SALT_LEN);
        assert!(!a.verify_password(""));
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(s in ".{0,200}") {
            let _ = Secret::parse(&s);
            let _ = Secret::parse(&format!("SCRAM-SHA-256${s}"));
        }

        #[test]
        fn parse_never_panics_near_valid(s in "[0-9a-zA-Z+/=:$]{0,120}") {
            let _ = ScramVerifier::parse(&format!("SCRAM-SHA-256${s}"));
        }
    }
}
