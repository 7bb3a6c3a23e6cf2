//! What pgrelay can prove to a server about a user: a password or md5 hash from the config,
//! or a secret learned from a client's login (SCRAM pass-through keys, or the md5 hash
//! auth_query returned), so that no plaintext password need exist anywhere.

use std::fmt;

use arc_swap::ArcSwapOption;

use crate::auth::{SCRAM_KEY_LEN, ScramVerifier};

/// A secret a client's successful login gave pgrelay for logging in to PostgreSQL as that user.
#[derive(Clone, PartialEq, Eq)]
pub enum PassThrough {
    /// SCRAM pass-through (as PgBouncer does it): the ClientKey recovered from the client's
    /// proof (ClientKey = ClientProof XOR ClientSignature) and the verifier it matched, whose
    /// ServerKey checks the server's answer. Works while PostgreSQL holds the same verifier.
    Scram {
        verifier: ScramVerifier,
        client_key: [u8; SCRAM_KEY_LEN],
    },
    /// md5(password || user), the stored hash: md5 authentication needs nothing more.
    Md5([u8; 16]),
}

/// Keys and hashes are as good as passwords: never in logs.
impl fmt::Debug for PassThrough {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PassThrough::Scram { .. } => f.write_str("PassThrough::Scram(<redacted>)"),
            PassThrough::Md5(_) => f.write_str("PassThrough::Md5(<redacted>)"),
        }
    }
}

/// Where and as whom pools of one user log in.
pub struct ServerCredentials {
    pub user: String,
    /// Plaintext password: works with every method.
    pub password: Option<String>,
    /// `md5` + hex(md5(password + user)): works for md5 only.
    pub md5_hash: Option<String>,
    /// The newest secret a client's login gave; used when no password is configured. Empty
    /// until a client of this user logs in, so a pool that must open a connection before
    /// that (min_size) cannot.
    learned: ArcSwapOption<PassThrough>,
}

impl ServerCredentials {
    pub fn new(user: impl Into<String>, password: Option<String>, md5_hash: Option<String>) -> Self {
        ServerCredentials {
            user: user.into(),
            password,
            md5_hash,
            learned: ArcSwapOption::empty(),
        }
    }

    /// Whether a configured secret (not one learned from clients) can log in.
    pub fn has_configured_secret(&self) -> bool {
        self.password.is_some() || self.md5_hash.is_some()
    }

    /// Remembers what a client's login proved, for the connections opened from now on.
    /// A newer login replaces an older one: after `ALTER ROLE ... PASSWORD`, the keys of the
    /// new password are the ones that work.
    pub fn learn(&self, secret: PassThrough) {
        let unchanged = self.learned.load().as_deref().is_some_and(|known| *known == secret);
        if !unchanged {
            self.learned.store(Some(std::sync::Arc::new(secret)));
        }
    }

    pub fn learned(&self) -> Option<std::sync::Arc<PassThrough>> {
        self.learned.load_full()
    }
}

/// Two credentials are the same configuration when user and configured secrets agree; the
/// learned secret is state, not configuration.
impl PartialEq for ServerCredentials {
    fn eq(&self, other: &Self) -> bool {
        self.user == other.user && self.password == other.password && self.md5_hash == other.md5_hash
    }
}

impl Eq for ServerCredentials {}

impl fmt::Debug for ServerCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerCredentials")
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("md5_hash", &self.md5_hash.as_ref().map(|_| "<redacted>"))
            .field("learned", &self.learned.load().as_deref())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learned_secret_is_state_not_configuration() {
        let a = ServerCredentials::new("u", None, None);
        let b = ServerCredentials::new("u", None, None);
        assert!(a.learned().is_none());
        a.learn(PassThrough::Md5([1; 16]));
        assert_eq!(a, b);
        assert_eq!(a.learned().as_deref(), Some(&PassThrough::Md5([1; 16])));
        a.learn(PassThrough::Md5([2; 16]));
        assert_eq!(a.learned().as_deref(), Some(&PassThrough::Md5([2; 16])));
        assert_ne!(a, ServerCredentials::new("u", Some("pw".into()), None));
        let shown = format!("{a:?}");
        assert!(shown.contains("<redacted>") && !shown.contains("[2"), "{shown}");
    }
}
