//! What a matching client address rule asks of a client: the authentication its method
//! means, given what pgrelay knows of the user's password (from `[[users]]` or from
//! auth_query), as PostgreSQL reads pg_hba.conf methods.

use crate::auth::{ScramVerifier, Secret};
use crate::config::hba::HbaMethod;
use crate::error::{ClientError, Side, sqlstate};
use crate::runtime::ClientAuth;

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
) -> Result<Option<ClientAuth>, ClientError> {
    let Some(known) = known else {
        return match method {
            // As PostgreSQL says for a trust rule and a role it does not know.
            HbaMethod::Trust => Err(ClientError::new(
                Side::Client,
                sqlstate::INVALID_AUTHORIZATION,
                format!("role \"{user_name}\" does not exist"),
            )),
            HbaMethod::Password => Ok(Some(ClientAuth::Cleartext(Secret::Scram(ScramVerifier::mock(
                user_name,
                mock_secret,
                mock_iterations,
            ))))),
            HbaMethod::Cert | HbaMethod::Reject => Err(refused(method, line)),
            HbaMethod::Md5 | HbaMethod::ScramSha256 => Ok(None),
        };
    };
    Ok(match (method, known) {
        (HbaMethod::Trust, _) => Some(ClientAuth::Trust),
        (HbaMethod::Cert | HbaMethod::Reject, _) => return Err(refused(method, line)),
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

fn refused(method: HbaMethod, line: usize) -> ClientError {
    let message = match method {
        HbaMethod::Cert => format!(
            "certificate authentication failed: pgrelay does not request client certificates \
             (client address rule {line} says \"cert\")"
        ),
        _ => format!("client address rule {line} rejects the connection"),
    };
    ClientError::new(Side::Client, sqlstate::INVALID_AUTHORIZATION, message)
}
