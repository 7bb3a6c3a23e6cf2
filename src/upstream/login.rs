//! The client side of a server's authentication exchange: answers each Authentication request
//! (SCRAM-SHA-256, md5, cleartext, trust) from a configured password or md5 hash, or from what a
//! client's login taught pgrelay (SCRAM pass-through keys, an md5 hash from auth_query).

use bytes::BytesMut;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;

use super::credentials::Learned;
use super::{ServerCredentials, UpstreamError};
use crate::auth::{SCRAM_SHA_256, ScramKeyClient, ScramKeyClientAwaitingFinal, md5_salted_response};

/// Where a SASL exchange stands.
enum Sasl {
    /// With the plaintext password (postgres-protocol's client).
    Password(ScramSha256),
    /// With pass-through keys, before and after the server-first-message.
    Keys(ScramKeyClient),
    KeysSent(ScramKeyClientAwaitingFinal),
}

pub(super) struct Login<'a> {
    credentials: &'a ServerCredentials,
    /// Taken once: a client logging in meanwhile must not change secrets mid-exchange.
    learned: std::sync::Arc<Learned>,
    addr: &'a str,
    sasl: Option<Sasl>,
}

impl<'a> Login<'a> {
    pub(super) fn new(credentials: &'a ServerCredentials, addr: &'a str) -> Self {
        Login {
            credentials,
            learned: credentials.learned(),
            addr,
            sasl: None,
        }
    }

    /// Writes the answer to one Authentication request into `out` (nothing for Ok).
    pub(super) fn answer(&mut self, code: i32, data: &[u8], out: &mut BytesMut) -> Result<(), UpstreamError> {
        let io = |source| UpstreamError::Io {
            addr: self.addr.to_owned(),
            source,
        };
        match code {
            0 => Ok(()),
            3 => {
                let password = self.password("cleartext password")?;
                frontend::password_message(password.as_bytes(), out).map_err(io)
            }
            5 => {
                let salt = data
                    .get(..4)
                    .and_then(|salt| <[u8; 4]>::try_from(salt).ok())
                    .ok_or_else(|| self.refused("md5 request without salt"))?;
                let response = self.md5_response(salt)?;
                frontend::password_message(response.as_bytes(), out).map_err(io)
            }
            10 => {
                let offers_scram = data.split(|&b| b == 0).any(|mechanism| mechanism == b"SCRAM-SHA-256");
                if !offers_scram {
                    return Err(self.refused("server offers no SASL mechanism pgrelay supports"));
                }
                let sasl = self.start_scram()?;
                let message = match &sasl {
                    Sasl::Password(scram) => scram.message(),
                    Sasl::Keys(scram) => scram.message(),
                    Sasl::KeysSent(_) => return Err(self.refused("SASL exchange started twice")),
                };
                frontend::sasl_initial_response(SCRAM_SHA_256, message, out).map_err(io)?;
                self.sasl = Some(sasl);
                Ok(())
            }
            11 => match self.sasl.take() {
                Some(Sasl::Password(mut scram)) => {
                    scram.update(data).map_err(io)?;
                    frontend::sasl_response(scram.message(), out).map_err(io)?;
                    self.sasl = Some(Sasl::Password(scram));
                    Ok(())
                }
                Some(Sasl::Keys(scram)) => {
                    let (awaiting, client_final) =
                        scram.update(data).map_err(|error| self.refused(&error.to_string()))?;
                    frontend::sasl_response(client_final.as_bytes(), out).map_err(io)?;
                    self.sasl = Some(Sasl::KeysSent(awaiting));
                    Ok(())
                }
                Some(Sasl::KeysSent(_)) | None => Err(self.refused("unexpected SASL continue")),
            },
            12 => match self.sasl.take() {
                Some(Sasl::Password(mut scram)) => scram.finish(data).map_err(io),
                Some(Sasl::KeysSent(awaiting)) => {
                    awaiting.finish(data).map_err(|error| self.refused(&error.to_string()))
                }
                Some(Sasl::Keys(_)) | None => Err(self.refused("unexpected SASL final")),
            },
            other => Err(UpstreamError::Credentials {
                addr: self.addr.to_owned(),
                reason: format!("server asks for an unsupported authentication method ({other})"),
            }),
        }
    }

    /// SCRAM with the plaintext password if there is one, else with the keys a client's SCRAM
    /// login gave.
    fn start_scram(&self) -> Result<Sasl, UpstreamError> {
        if let Some(password) = &self.credentials.password {
            return Ok(Sasl::Password(ScramSha256::new(
                password.as_bytes(),
                ChannelBinding::unsupported(),
            )));
        }
        if self.learned.scram().is_empty() {
            return Err(self.no_secret("SCRAM-SHA-256"));
        }
        // The keys of every verifier learned: the server's salt picks one.
        ScramKeyClient::for_keys_with_random_nonce(
            self.learned
                .scram()
                .iter()
                .map(|(verifier, client_key)| (verifier, *client_key)),
        )
        .map(Sasl::Keys)
        .map_err(|error| self.refused(&error.to_string()))
    }

    fn password(&self, method: &str) -> Result<&str, UpstreamError> {
        self.credentials
            .password
            .as_deref()
            .ok_or_else(|| self.no_secret(method))
    }

    /// md5(hex(md5(password + user)) + salt), from the plaintext, the configured hash or the
    /// hash auth_query returned.
    fn md5_response(&self, salt: [u8; 4]) -> Result<String, UpstreamError> {
        if let Some(password) = &self.credentials.password {
            return Ok(postgres_protocol::authentication::md5_hash(
                self.credentials.user.as_bytes(),
                password.as_bytes(),
                salt,
            ));
        }
        if let Some(hash) = self.credentials.md5_hash.as_deref().and_then(parse_md5_hash) {
            return Ok(md5_salted_response(&hash, salt));
        }
        match self.learned.md5() {
            Some(hash) => Ok(md5_salted_response(hash, salt)),
            None => Err(self.no_secret("md5")),
        }
    }

    /// Why a server's request cannot be answered: no password configured, and nothing learned
    /// that fits (no client logged in yet, or one whose secret suits another method).
    fn no_secret(&self, method: &str) -> UpstreamError {
        let learned = match (self.learned.scram().is_empty(), self.learned.md5().is_some()) {
            (true, false) => "no client of this user has logged in through pgrelay yet to pass its keys on",
            (false, _) => "pgrelay holds SCRAM pass-through keys, which cannot answer it",
            (true, true) => "pgrelay holds an md5 hash, which cannot answer it",
        };
        UpstreamError::Credentials {
            addr: self.addr.to_owned(),
            reason: format!(
                "server asks for {method} but no plaintext password is configured for user \"{}\" \
                 (set server_password) and {learned}",
                self.credentials.user
            ),
        }
    }

    fn refused(&self, reason: &str) -> UpstreamError {
        UpstreamError::Credentials {
            addr: self.addr.to_owned(),
            reason: reason.to_owned(),
        }
    }
}

/// The 16 bytes behind `md5` + 32 hex digits.
fn parse_md5_hash(text: &str) -> Option<[u8; 16]> {
    match crate::auth::Secret::parse(text) {
        Ok(crate::auth::Secret::Md5(hash)) => Some(hash),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{ScramServer, ScramVerifier, md5_stored_string};
    use crate::upstream::PassThrough;

    /// Logs in to a "server" holding `verifier` with what `credentials` learned.
    fn log_in_against(credentials: &ServerCredentials, verifier: &ScramVerifier) -> Result<(), String> {
        let mut login = Login::new(credentials, "db:5432");
        let initial = answer(&mut login, 10, b"SCRAM-SHA-256\0\0").map_err(|e| e.to_string())?;
        let parsed = crate::auth::parse_sasl_initial_response(body(&initial)).unwrap();
        let (server, first) = ScramServer::with_random_nonce(verifier)
            .handle_client_first(parsed.data.unwrap())
            .unwrap();
        let response = answer(&mut login, 11, first.as_bytes()).map_err(|e| e.to_string())?;
        let done = server.handle_client_final(body(&response)).map_err(|e| e.to_string())?;
        answer(&mut login, 12, done.server_final.as_bytes()).map_err(|e| e.to_string())?;
        Ok(())
    }

    #[test]
    fn the_server_s_salt_picks_the_keys() {
        let keys = |password: &str, salt: &[u8]| {
            let verifier = ScramVerifier::from_password(password, salt, 4096);
            let client_key = crate::auth::secret::client_key_for_tests(password, salt, 4096);
            (verifier, client_key)
        };
        let (old, old_key) = keys("old", b"old salt");
        let (new, new_key) = keys("new", b"new salt");
        let credentials = ServerCredentials::new("alice", None, None);
        credentials.learn(PassThrough::Scram {
            verifier: new.clone(),
            client_key: new_key,
        });
        // A login checked against the stale cached verifier finishes last.
        credentials.learn(PassThrough::Scram {
            verifier: old.clone(),
            client_key: old_key,
        });
        assert_eq!(log_in_against(&credentials, &new), Ok(()));
        assert_eq!(log_in_against(&credentials, &old), Ok(()));
        let (other, _) = keys("other", b"other salt");
        let error = log_in_against(&credentials, &other).unwrap_err();
        assert!(error.contains("differs from pgrelay's"), "{error}");
    }

    fn answer(login: &mut Login<'_>, code: i32, data: &[u8]) -> Result<BytesMut, UpstreamError> {
        let mut out = BytesMut::new();
        login.answer(code, data, &mut out).map(|()| out)
    }

    /// The body of a 'p' message the login wrote.
    fn body(message: &[u8]) -> &[u8] {
        assert_eq!(message[0], b'p');
        &message[5..]
    }

    #[test]
    fn scram_with_pass_through_keys() {
        let verifier = ScramVerifier::from_password("pencil", b"0123456789abcdef", 4096);
        // What a client's SCRAM login left: the ClientKey its proof gave away.
        let mut client = ScramSha256::new(b"pencil", ChannelBinding::unsupported());
        let (server, first) = ScramServer::with_random_nonce(&verifier)
            .handle_client_first(client.message())
            .unwrap();
        client.update(first.as_bytes()).unwrap();
        let success = server.handle_client_final(client.message()).unwrap();

        let credentials = ServerCredentials::new("alice", None, None);
        let mut login = Login::new(&credentials, "db:5432");
        assert!(matches!(
            answer(&mut login, 10, b"SCRAM-SHA-256\0\0"),
            Err(UpstreamError::Credentials { .. })
        ));
        credentials.learn(PassThrough::Scram {
            verifier: verifier.clone(),
            client_key: success.client_key,
        });
        // The server's side of the exchange: PostgreSQL holding the same verifier.
        let mut login = Login::new(&credentials, "db:5432");
        let initial = answer(&mut login, 10, b"SCRAM-SHA-256\0\0").unwrap();
        let parsed = crate::auth::parse_sasl_initial_response(body(&initial)).unwrap();
        let (server, first) = ScramServer::with_random_nonce(&verifier)
            .handle_client_first(parsed.data.unwrap())
            .unwrap();
        let response = answer(&mut login, 11, first.as_bytes()).unwrap();
        let done = server.handle_client_final(body(&response)).unwrap();
        answer(&mut login, 12, done.server_final.as_bytes()).unwrap();
        assert!(answer(&mut login, 12, done.server_final.as_bytes()).is_err());
        // Keys cannot answer md5.
        assert!(answer(&mut Login::new(&credentials, "db:5432"), 5, &[1, 2, 3, 4]).is_err());
    }

    #[test]
    fn md5_with_a_learned_hash() {
        let stored = md5_stored_string("alice", "pencil");
        let Ok(crate::auth::Secret::Md5(hash)) = crate::auth::Secret::parse(&stored) else {
            panic!("an md5 hash")
        };
        let credentials = ServerCredentials::new("alice", None, None);
        credentials.learn(PassThrough::Md5(hash));
        let message = answer(&mut Login::new(&credentials, "db:5432"), 5, &[9, 8, 7, 6]).unwrap();
        let expected = postgres_protocol::authentication::md5_hash(b"alice", b"pencil", [9, 8, 7, 6]);
        assert_eq!(&body(&message)[..expected.len()], expected.as_bytes());
        assert!(answer(&mut Login::new(&credentials, "db:5432"), 10, b"SCRAM-SHA-256\0\0").is_err());
    }
}
