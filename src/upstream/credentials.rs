//! What pgrelay can prove to a server about a user: a password or md5 hash from the config,
//! or a secret learned from a client's login (SCRAM pass-through keys, or the md5 hash
//! auth_query returned), so that no plaintext password need exist anywhere.

use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::auth::{SCRAM_KEY_LEN, ScramVerifier};

/// A secret a client's successful login gave pgrelay for logging in to PostgreSQL as that user.
///
/// No `PartialEq`: keys are compared only in constant time, by [`PassThrough::same_as`].
#[derive(Clone)]
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

impl PassThrough {
    /// Whether both are the same secret, compared in constant time.
    pub fn same_as(&self, other: &PassThrough) -> bool {
        match (self, other) {
            (
                PassThrough::Scram { verifier, client_key },
                PassThrough::Scram {
                    verifier: other_verifier,
                    client_key: other_key,
                },
            ) => {
                // Evaluated in full, not short-circuited: timing says nothing of which differs.
                let keys = crate::auth::ct_eq(client_key, other_key)
                    & crate::auth::ct_eq(&verifier.stored_key, &other_verifier.stored_key)
                    & crate::auth::ct_eq(&verifier.server_key, &other_verifier.server_key);
                keys & same_verifier_parameters(verifier, other_verifier)
            }
            (PassThrough::Md5(hash), PassThrough::Md5(other)) => crate::auth::ct_eq(hash, other),
            _ => false,
        }
    }
}

/// Salt and iteration count: public (PostgreSQL sends them to anyone who starts a login),
/// and what tells one password's verifier from another's.
fn same_verifier_parameters(a: &ScramVerifier, b: &ScramVerifier) -> bool {
    a.iterations == b.iterations && a.salt == b.salt
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

/// How many SCRAM verifiers (salt, iterations) of one user pgrelay keeps keys for. More
/// than one, because logins authenticated against a cached verifier can finish after the
/// password changed and a newer login taught the new keys: each lands in its own place, and
/// a server login picks the keys of the verifier the server names. A handful covers a
/// password changed a few times within the cache time; older keys are dropped first.
pub const MAX_SCRAM_VERIFIERS: usize = 4;

/// What clients' logins taught pgrelay about one user.
#[derive(Clone, Default)]
pub struct Learned {
    /// SCRAM keys, at most one per (salt, iterations), the most recently learned last.
    scram: Vec<(ScramVerifier, [u8; SCRAM_KEY_LEN])>,
    /// The md5 hash of the newest md5 login. An md5 challenge does not say which hash the
    /// server holds, so there is only one place: the newest login wins.
    md5: Option<[u8; 16]>,
}

impl Learned {
    pub fn is_empty(&self) -> bool {
        self.scram.is_empty() && self.md5.is_none()
    }

    /// The SCRAM keys held, newest last.
    pub fn scram(&self) -> &[(ScramVerifier, [u8; SCRAM_KEY_LEN])] {
        &self.scram
    }

    pub fn md5(&self) -> Option<&[u8; 16]> {
        self.md5.as_ref()
    }

    /// Whether `secret` is already held (and, for SCRAM, is the newest).
    fn holds(&self, secret: &PassThrough) -> bool {
        match secret {
            PassThrough::Scram { .. } => self.scram.last().is_some_and(|(verifier, client_key)| {
                secret.same_as(&PassThrough::Scram {
                    verifier: verifier.clone(),
                    client_key: *client_key,
                })
            }),
            PassThrough::Md5(_) => self.md5.is_some_and(|hash| secret.same_as(&PassThrough::Md5(hash))),
        }
    }

    /// With `secret` added: SCRAM keys replace only those of the same verifier parameters.
    fn with(&self, secret: &PassThrough) -> Learned {
        let mut next = self.clone();
        match secret {
            PassThrough::Scram { verifier, client_key } => {
                next.scram.retain(|(held, _)| !same_verifier_parameters(held, verifier));
                next.scram.push((verifier.clone(), *client_key));
                if next.scram.len() > MAX_SCRAM_VERIFIERS {
                    next.scram.remove(0);
                }
            }
            PassThrough::Md5(hash) => next.md5 = Some(*hash),
        }
        next
    }
}

impl fmt::Debug for Learned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Learned")
            .field("scram_verifiers", &self.scram.len())
            .field("md5", &self.md5.map(|_| "<redacted>"))
            .finish()
    }
}

/// Where and as whom pools of one user log in.
pub struct ServerCredentials {
    pub user: String,
    /// Plaintext password: works with every method.
    pub password: Option<String>,
    /// `md5` + hex(md5(password + user)): works for md5 only.
    pub md5_hash: Option<String>,
    /// What clients' logins gave; used when no password is configured. Empty until a client
    /// of this user logs in, so a pool that must open a connection before that (min_size)
    /// cannot.
    learned: ArcSwap<Learned>,
}

impl ServerCredentials {
    pub fn new(user: impl Into<String>, password: Option<String>, md5_hash: Option<String>) -> Self {
        ServerCredentials {
            user: user.into(),
            password,
            md5_hash,
            learned: ArcSwap::from_pointee(Learned::default()),
        }
    }

    /// Whether a configured secret (not one learned from clients) can log in.
    pub fn has_configured_secret(&self) -> bool {
        self.password.is_some() || self.md5_hash.is_some()
    }

    /// Remembers what a client's login proved, for the connections opened from now on. SCRAM
    /// keys are kept per verifier (salt, iterations): after `ALTER ROLE ... PASSWORD` the new
    /// password's keys are the ones a server login picks, even should a login checked
    /// against the old verifier finish later. Concurrent logins do not lose each other's
    /// keys (read-copy-update).
    pub fn learn(&self, secret: PassThrough) {
        if self.learned.load().holds(&secret) {
            return;
        }
        self.learned.rcu(|current| current.with(&secret));
    }

    /// Takes over what another entry's logins taught, if this one has learned nothing yet
    /// (the same user's entry rebuilt by a reload).
    pub fn adopt(&self, other: &ServerCredentials) {
        let theirs = other.learned.load_full();
        if !theirs.is_empty() {
            self.learned.rcu(|current| {
                if current.is_empty() {
                    Arc::clone(&theirs)
                } else {
                    Arc::clone(current)
                }
            });
        }
    }

    pub fn learned(&self) -> Arc<Learned> {
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
            .field("learned", &**self.learned.load())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(password: &str, salt: &[u8]) -> PassThrough {
        let verifier = ScramVerifier::from_password(password, salt, 4096);
        let client_key = crate::auth::secret::client_key_for_tests(password, salt, 4096);
        PassThrough::Scram { verifier, client_key }
    }

    fn scram_salts(credentials: &ServerCredentials) -> Vec<Vec<u8>> {
        credentials
            .learned()
            .scram()
            .iter()
            .map(|(verifier, _)| verifier.salt.clone())
            .collect()
    }

    #[test]
    fn learned_secret_is_state_not_configuration() {
        let a = ServerCredentials::new("u", None, None);
        let b = ServerCredentials::new("u", None, None);
        assert!(a.learned().is_empty());
        a.learn(PassThrough::Md5([1; 16]));
        assert_eq!(a, b);
        assert_eq!(a.learned().md5(), Some(&[1; 16]));
        a.learn(PassThrough::Md5([2; 16]));
        assert_eq!(a.learned().md5(), Some(&[2; 16]));
        assert_ne!(a, ServerCredentials::new("u", Some("pw".into()), None));
        let shown = format!("{a:?}");
        assert!(shown.contains("<redacted>") && !shown.contains("[2"), "{shown}");
    }

    #[test]
    fn keys_are_kept_per_verifier_so_a_late_stale_login_cannot_replace_newer_ones() {
        let credentials = ServerCredentials::new("u", None, None);
        let old = keys("old password", b"salt-one");
        let new = keys("new password", b"salt-two");
        credentials.learn(new.clone());
        // A login checked against the cached old verifier finishes after the new one.
        credentials.learn(old.clone());
        let learned = credentials.learned();
        assert_eq!(learned.scram().len(), 2);
        let for_salt = |salt: &[u8]| {
            learned
                .scram()
                .iter()
                .find(|(verifier, _)| verifier.salt == salt)
                .map(|(verifier, client_key)| PassThrough::Scram {
                    verifier: verifier.clone(),
                    client_key: *client_key,
                })
                .unwrap()
        };
        assert!(for_salt(b"salt-two").same_as(&new), "the new keys are still there");
        assert!(for_salt(b"salt-one").same_as(&old));

        // The same verifier again replaces its own place only, and becomes the newest.
        credentials.learn(new.clone());
        assert_eq!(scram_salts(&credentials), [b"salt-one".to_vec(), b"salt-two".to_vec()]);
        credentials.learn(old.clone());
        assert_eq!(scram_salts(&credentials), [b"salt-two".to_vec(), b"salt-one".to_vec()]);

        // Bounded: the oldest verifier's keys go first.
        for index in 0..MAX_SCRAM_VERIFIERS {
            credentials.learn(keys("later", format!("salt-{index}-later").as_bytes()));
        }
        let salts = scram_salts(&credentials);
        assert_eq!(salts.len(), MAX_SCRAM_VERIFIERS);
        assert!(!salts.contains(&b"salt-one".to_vec()) && !salts.contains(&b"salt-two".to_vec()));
    }

    #[test]
    fn secrets_compare_by_value() {
        let a = keys("pw", b"salt");
        assert!(a.same_as(&keys("pw", b"salt")));
        assert!(!a.same_as(&keys("other", b"salt")));
        assert!(!a.same_as(&keys("pw", b"other salt")));
        assert!(!a.same_as(&PassThrough::Md5([0; 16])));
        assert!(PassThrough::Md5([3; 16]).same_as(&PassThrough::Md5([3; 16])));
        assert!(!PassThrough::Md5([3; 16]).same_as(&PassThrough::Md5([4; 16])));
    }

    #[test]
    fn a_rebuilt_entry_adopts_what_the_old_one_learned_only_when_it_has_nothing() {
        let old = ServerCredentials::new("u", None, None);
        old.learn(keys("pw", b"salt"));
        let rebuilt = ServerCredentials::new("u", None, None);
        rebuilt.adopt(&old);
        assert_eq!(scram_salts(&rebuilt), [b"salt".to_vec()]);
        let fresher = ServerCredentials::new("u", None, None);
        fresher.learn(keys("new", b"new salt"));
        fresher.adopt(&old);
        assert_eq!(scram_salts(&fresher), [b"new salt".to_vec()]);
    }
}
