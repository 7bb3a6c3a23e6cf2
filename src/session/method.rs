//! What a matching client address rule asks of a client: the authentication its method
//! means, given what pgrelay knows of the user's password (from `[[users]]` or from
//! auth_query) and, for `cert`, the client's TLS certificate, as PostgreSQL reads
//! pg_hba.conf methods.

use crate::auth::{ScramVerifier, Secret};
use crate::config::hba::HbaMethod;
use crate::error::{ClientError, Side, sqlstate};
use crate::net::CommonNameError;
use crate::runtime::ClientAuth;

/// What the client's connection says about its certificate, for `cert` rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum PeerCertificate {
    /// `[server.tls] ca` is not set (or the client is not on TLS, which a `cert` rule,
    /// being `hostssl`, never matches): nobody was asked for a certificate.
    NotRequested,
    /// The client was asked for one and sent none.
    Absent,
    /// Verified against `ca` by the TLS handshake: its subject's CN, or why it has none.
    Verified(Result<String, CommonNameError>),
}

/// The authentication to run for `method`, given `known`, how the user's own entry (or
/// auth_query) would authenticate it; `Ok(None)`: a SCRAM exchange that cannot succeed (an
/// unknown user, or a secret the method cannot use), so the answer does not reveal which
/// users exist.
pub(super) fn client_auth(
    method: HbaMethod,
    line: usize,
    user_name: &str,
    known: Option<&ClientAuth>,
    (mock_secret, mock_iterations): (&[u8], u32),
    peer: &PeerCertificate,
) -> Result<Option<ClientAuth>, ClientError> {
    // As PostgreSQL: the certificate is checked before anything is known of the role, so
    // a user that does not exist is told so only to a client holding a certificate with
    // its name.
    if method == HbaMethod::Cert {
        check_certificate(peer, user_name)?;
    }
    let Some(known) = known else {
        return match method {
            // As PostgreSQL says for a trust rule (or a certificate that names the user)
            // and a role it does not know.
            HbaMethod::Trust | HbaMethod::Cert => Err(ClientError::new(
                Side::Client,
                sqlstate::INVALID_AUTHORIZATION,
                format!("role \"{user_name}\" does not exist"),
            )),
            HbaMethod::Password => Ok(Some(ClientAuth::Cleartext(Secret::Scram(ScramVerifier::mock(
                user_name,
                mock_secret,
                mock_iterations,
            ))))),
            HbaMethod::Reject => Err(refused(line)),
            HbaMethod::Md5 | HbaMethod::ScramSha256 => Ok(None),
        };
    };
    Ok(match (method, known) {
        // The certificate proved who the client is: no password is asked for.
        (HbaMethod::Trust | HbaMethod::Cert, _) => Some(ClientAuth::Trust),
        (HbaMethod::Reject, _) => return Err(refused(line)),
        // A user without a password (auth = "trust" in [[users]]) has nothing to check a
        // password against; nor has an auth_query user whose answer is not at hand.
        (_, ClientAuth::Trust | ClientAuth::Query) => None,
        // md5 with a SCRAM secret is SCRAM, as in PostgreSQL.
        (HbaMethod::Md5, auth @ (ClientAuth::Md5(_) | ClientAuth::Scram(_))) => Some(auth.clone()),
        (HbaMethod::Md5, ClientAuth::Cleartext(secret)) if secret.can_verify_md5() => {
            Some(ClientAuth::Md5(secret.clone()))
        }
        (HbaMethod::ScramSha256, ClientAuth::Scram(verifier)) => Some(ClientAuth::Scram(verifier.clone())),
        (HbaMethod::ScramSha256 | HbaMethod::Md5, _) => None,
        (HbaMethod::Password, ClientAuth::Md5(secret) | ClientAuth::Cleartext(secret)) => {
            Some(ClientAuth::Cleartext(secret.clone()))
        }
        (HbaMethod::Password, ClientAuth::Scram(verifier)) => {
            Some(ClientAuth::Cleartext(Secret::Scram(verifier.clone())))
        }
    })
}

fn refused(line: usize) -> ClientError {
    ClientError::new(
        Side::Client,
        sqlstate::INVALID_AUTHORIZATION,
        format!("client address rule {line} rejects the connection"),
    )
}

/// PostgreSQL's `cert` method without a user name map: a verified client certificate whose
/// CN is the user name, compared exactly. The client is told what PostgreSQL tells it; why
/// a certificate did not fit goes to the log only, as in PostgreSQL.
fn check_certificate(peer: &PeerCertificate, user_name: &str) -> Result<(), ClientError> {
    let failed = || {
        ClientError::new(
            Side::Client,
            sqlstate::INVALID_AUTHORIZATION,
            format!("certificate authentication failed for user \"{user_name}\""),
        )
    };
    match peer {
        PeerCertificate::NotRequested => Err(ClientError::new(
            Side::Client,
            sqlstate::CONFIG_FILE_ERROR,
            "client certificates can only be checked if a root certificate store is available \
             (set [server.tls] ca)",
        )),
        PeerCertificate::Absent => Err(ClientError::new(
            Side::Client,
            sqlstate::INVALID_AUTHORIZATION,
            "connection requires a valid client certificate",
        )),
        PeerCertificate::Verified(Ok(common_name)) if common_name == user_name => Ok(()),
        PeerCertificate::Verified(Ok(common_name)) => {
            // Debug formatting quotes and escapes both names: neither can forge a log line.
            tracing::info!(user = ?user_name, certificate_cn = ?common_name,
                "certificate authentication failed: the certificate's CN is not the user name");
            Err(failed())
        }
        PeerCertificate::Verified(Err(error)) => {
            tracing::info!(user = ?user_name, %error, "certificate authentication failed");
            Err(failed())
        }
    }
}
