//! The server-login secrets a handed-over client's user needs on the new process: what
//! clients' logins taught the old process (SCRAM pass-through keys with their verifiers, the
//! md5 hash) for a user with no configured password, such as one found through auth_query.
//! They cross only the takeover's 0600 Unix socket, between two pgrelay processes.

use crate::auth::{SCRAM_KEY_LEN, ScramVerifier};
use crate::upstream::{PassThrough, ServerCredentials};

/// The secrets, oldest first (the order they are learned again on the other side).
#[derive(Clone, Default)]
pub(crate) struct ServerSecrets(pub Vec<PassThrough>);

impl ServerSecrets {
    /// What `credentials` learned, unless a configured password logs in (then nothing is
    /// needed, and nothing secret travels).
    pub fn of(credentials: &ServerCredentials) -> ServerSecrets {
        if credentials.has_configured_secret() {
            return ServerSecrets::default();
        }
        let learned = credentials.learned();
        let mut secrets: Vec<PassThrough> = learned
            .scram()
            .iter()
            .map(|(verifier, client_key)| PassThrough::Scram {
                verifier: verifier.clone(),
                client_key: *client_key,
            })
            .collect();
        secrets.extend(learned.md5().map(|hash| PassThrough::Md5(*hash)));
        ServerSecrets(secrets)
    }

    /// Teaches them to `credentials`, unless it has a configured password of its own.
    pub fn teach(&self, credentials: &ServerCredentials) {
        if credentials.has_configured_secret() {
            return;
        }
        for secret in &self.0 {
            credentials.learn(secret.clone());
        }
    }

    /// Appends: a count, then per secret a kind byte ('S': the verifier in PostgreSQL's text
    /// form and the ClientKey; 'M': the md5 hash).
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&u32::try_from(self.0.len()).unwrap_or(u32::MAX).to_be_bytes());
        for secret in &self.0 {
            match secret {
                PassThrough::Scram { verifier, client_key } => {
                    out.push(b'S');
                    let text = verifier.to_string();
                    out.extend_from_slice(&u32::try_from(text.len()).unwrap_or(u32::MAX).to_be_bytes());
                    out.extend_from_slice(text.as_bytes());
                    out.extend_from_slice(client_key);
                }
                PassThrough::Md5(hash) => {
                    out.push(b'M');
                    out.extend_from_slice(hash);
                }
            }
        }
    }

    /// Reads what [`ServerSecrets::encode`] wrote; `None` for anything else.
    pub(super) fn decode(reader: &mut super::handover::Reader<'_>) -> Option<ServerSecrets> {
        let count = reader.u32()?;
        let mut secrets = Vec::new();
        for _ in 0..count {
            match reader.byte()? {
                b'S' => {
                    let verifier = ScramVerifier::parse(&reader.string()?).ok()?;
                    let client_key: [u8; SCRAM_KEY_LEN] = reader.take(SCRAM_KEY_LEN)?.try_into().ok()?;
                    secrets.push(PassThrough::Scram { verifier, client_key });
                }
                b'M' => secrets.push(PassThrough::Md5(reader.take(16)?.try_into().ok()?)),
                _ => return None,
            }
        }
        Some(ServerSecrets(secrets))
    }
}

/// Compared in constant time ([`PassThrough::same_as`]), for the round-trip test.
impl PartialEq for ServerSecrets {
    fn eq(&self, other: &Self) -> bool {
        self.0.len() == other.0.len() && self.0.iter().zip(&other.0).all(|(a, b)| a.same_as(b))
    }
}

impl Eq for ServerSecrets {}

/// Keys and hashes are as good as passwords: only their number is shown.
impl std::fmt::Debug for ServerSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ServerSecrets({} redacted)", self.0.len())
    }
}
