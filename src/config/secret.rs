//! The three forms a `[[users]]` password may take: plaintext, an md5 hash, a SCRAM verifier.

use crate::auth::ScramVerifier;

const SCRAM_PREFIX: &str = "SCRAM-SHA-256$";
const MD5_PREFIX: &str = "md5";
const MD5_LEN: usize = 35;

/// Why a stored password hash was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("{0}; expected SCRAM-SHA-256$<iterations>:<base64 salt>$<base64 StoredKey>:<base64 ServerKey>")]
    Scram(String),
    #[error("malformed md5 hash: expected \"md5\" followed by 32 lowercase hexadecimal digits")]
    Md5,
}

/// The form of a password string, decided by its shape the way PostgreSQL does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PasswordForm {
    Plaintext,
    /// `"md5"` + md5(password + user name) in hex; only usable for md5 authentication.
    Md5,
    /// A SCRAM-SHA-256 verifier as stored in `pg_authid`; only usable for SCRAM authentication.
    Scram,
}

impl PasswordForm {
    /// Classifies by prefix and length only; a malformed hash still counts as a hash so that
    /// a typo in it is reported rather than silently used as a plaintext password.
    pub fn of(password: &str) -> Self {
        if password.starts_with(SCRAM_PREFIX) {
            Self::Scram
        } else if password.starts_with(MD5_PREFIX) && password.len() == MD5_LEN {
            Self::Md5
        } else {
            Self::Plaintext
        }
    }
}

/// Checks an md5-form password: `"md5"` + 32 lowercase hex digits.
pub fn check_md5(text: &str) -> Result<(), SecretError> {
    let hex = text.strip_prefix(MD5_PREFIX).ok_or(SecretError::Md5)?;
    if hex.len() == 32 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(())
    } else {
        Err(SecretError::Md5)
    }
}

/// Checks that a hash-form password is well formed; plaintext always is.
pub fn check_password(text: &str) -> Result<PasswordForm, SecretError> {
    let form = PasswordForm::of(text);
    match form {
        PasswordForm::Plaintext => {}
        PasswordForm::Md5 => check_md5(text)?,
        PasswordForm::Scram => {
            ScramVerifier::parse(text).map_err(|error| SecretError::Scram(error.to_string()))?;
        }
    }
    Ok(form)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// RFC 5802 verifier of the password "app" with salt "saltsaltsaltsalt", 4096 iterations.
    pub(crate) const VERIFIER: &str = "SCRAM-SHA-256$4096:c2FsdHNhbHRzYWx0c2FsdA==$67JFtZNI0yaS8i+7fP8/m/zCGx7Aa697n5KX1HseycM=:5/1Y0k/ettsWQ3XOOoMkGMphA7V8yuRhvhBAbo3XowA=";
    /// md5("app" + "app").
    pub(crate) const MD5_APP: &str = "md5fe63fea7be31b0200b496d08bc6b517d";

    #[test]
    fn forms() {
        assert_eq!(PasswordForm::of("app"), PasswordForm::Plaintext);
        assert_eq!(PasswordForm::of("md5secret"), PasswordForm::Plaintext);
        assert_eq!(PasswordForm::of(MD5_APP), PasswordForm::Md5);
        assert_eq!(PasswordForm::of(VERIFIER), PasswordForm::Scram);
    }

    #[test]
    fn scram_verifier() {
        assert_eq!(check_password(VERIFIER), Ok(PasswordForm::Scram));
        for bad in [
            "SCRAM-SHA-256$4096:abc",
            "SCRAM-SHA-256$x:c2FsdA==$a:b",
            "SCRAM-SHA-256$0:c2FsdA==$a:b",
            "SCRAM-SHA-256$4096:!!$a:b",
            "SCRAM-SHA-256$4096:$a:b",
            "SCRAM-SHA-256$4096:c2FsdA==$c2FsdA==:c2FsdA==",
        ] {
            assert!(matches!(check_password(bad), Err(SecretError::Scram(_))), "{bad}");
        }
    }

    #[test]
    fn md5() {
        assert_eq!(check_md5(MD5_APP), Ok(()));
        assert_eq!(
            check_md5(&MD5_APP.to_uppercase().replace("MD5", "md5")),
            Err(SecretError::Md5)
        );
        assert_eq!(
            check_password("md5fe63fea7be31b0200b496d08bc6b517z"),
            Err(SecretError::Md5)
        );
        assert_eq!(check_password("app"), Ok(PasswordForm::Plaintext));
    }
}
