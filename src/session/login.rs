//! Logging a client in: startup parameters, protocol version negotiation, who the user is
//! (`[[users]]`, else the database's auth_query), password authentication (SCRAM-SHA-256,
//! with channel binding on TLS, md5 or trust), the database it asked for, and the greeting
//! (ParameterStatus, BackendKeyData, ReadyForQuery).
//!
//! The greeting reports each parameter as the server spells it for the client's value
//! (`client_encoding=utf-8` is reported `UTF8`, `DateStyle=iso` `ISO, MDY`). pgrelay takes
//! that spelling from the server itself rather than from a table of aliases: only the
//! server knows every spelling it accepts, and its answer is the one a direct connection
//! would have got.

use std::sync::Arc;

use super::options::parse_startup_options;
use crate::access::Gate;
use crate::auth::{self, ChannelBinding, ScramError, ScramServer, ScramVerifier};
use crate::cancel::CancelHandle;
use crate::config::RoutingTarget;
use crate::error::{ClientError, Side, sqlstate};
use crate::net::ClientConn;
use crate::protocol::{FrontendTag, TxStatus, compose, views};
use crate::route::ClientEncoding;
use crate::runtime::{ADMIN_DATABASE, ClientAuth, DatabaseEntry, Shared, Snapshot, UserEntry};
use crate::upstream::{ParamDiff, PassThrough, SessionParams};

/// Who logged in, where, and with which settings.
pub(super) struct LoggedIn {
    pub user: Arc<UserEntry>,
    pub database: Arc<DatabaseEntry>,
    pub wanted: SessionParams,
    /// The client_encoding the client was greeted with.
    pub client_encoding: ClientEncoding,
}

/// Where a client logged in to.
pub(super) enum Destination {
    Database(LoggedIn),
    /// The admin console (database "pgrelay").
    Admin(Arc<UserEntry>),
}

/// The part of a refused login the client is told; `None` when the client is gone.
pub(super) type LoginError = Option<ClientError>;

/// Startup parameters that say who and where rather than how the session behaves.
const NOT_SESSION_SETTINGS: &[&str] = &["user", "database", "options", "replication"];

pub(super) async fn login(
    client: &mut ClientConn,
    shared: &Shared,
    snapshot: &Snapshot,
    minor_version: u16,
    params: Vec<(String, String)>,
    cancel: &CancelHandle,
    gate: &mut Gate,
) -> Result<Destination, LoginError> {
    let param = |name: &str| {
        params
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    };
    let Some(user_name) = param("user").filter(|user| !user.is_empty()) else {
        return Err(Some(ClientError::new(
            Side::Client,
            sqlstate::INVALID_AUTHORIZATION,
            "no PostgreSQL user name specified in startup packet",
        )));
    };
    let database_name = param("database").filter(|db| !db.is_empty()).unwrap_or(user_name);
    if param("replication").is_some_and(|value| !matches!(value, "false" | "off" | "no" | "0")) {
        return Err(Some(ClientError::new(
            Side::Client,
            sqlstate::FEATURE_NOT_SUPPORTED,
            "replication connections are not supported by pgrelay",
        )));
    }

    // Protocol options (`_pq_.*`) and minor versions above 3.0 are declined, as a
    // PostgreSQL server that knows neither would.
    let unsupported_options: Vec<String> = params
        .iter()
        .filter(|(name, _)| name.starts_with("_pq_."))
        .map(|(name, _)| name.clone())
        .collect();
    if minor_version > 0 || !unsupported_options.is_empty() {
        compose::negotiate_protocol_version(&mut client.outbuf, 0, unsupported_options);
    }

    let mut wanted = SessionParams::default();
    for (name, value) in &params {
        if !NOT_SESSION_SETTINGS.contains(&name.as_str()) && !name.starts_with("_pq_.") {
            wanted.set(name, value);
        }
    }
    if let Some(options) = param("options") {
        for (name, value) in
            parse_startup_options(options).map_err(|error| Some(ClientError::protocol_violation(error)))?
        {
            wanted.set(&name, &value);
        }
    }

    let Resolved {
        user,
        auth: known,
        mock_iterations,
    } = resolve_user(snapshot, user_name, database_name).await?;
    // A matching client address rule decides the method; without rules, the user's own.
    let auth = match gate.method {
        Some((method, line)) => super::method::client_auth(
            method,
            line,
            user_name,
            known.as_ref(),
            (&shared.mock_secret, mock_iterations),
        )
        .map_err(Some)?,
        None => known,
    };
    // Wrong passwords are counted where the login's answer is given (with their delay).
    let learned = authenticate(client, shared, snapshot, user_name, auth.as_ref(), mock_iterations)
        .await
        .inspect_err(|error| {
            // 28000 during SCRAM: the channel binding failed or was stripped.
            if error
                .as_ref()
                .is_some_and(|error| error.sqlstate == sqlstate::INVALID_AUTHORIZATION)
            {
                shared.metrics.login_refused("channel_binding");
            }
        })?;
    let Some(user) = user else {
        // authenticate() never lets an unknown user through.
        return Err(Some(password_failed(user_name)));
    };
    gate.authenticated(&user.name).map_err(Some)?;
    // Pass-through: without a configured password, the pools log in to PostgreSQL with what
    // this login proved (the newest login's secret wins, so a changed password takes over).
    if let Some(secret) = learned
        && !user.server_credentials.has_configured_secret()
    {
        user.server_credentials.learn(secret);
    }
    compose::auth_ok(&mut client.outbuf);

    if database_name == ADMIN_DATABASE {
        greet_admin(client, cancel);
        return Ok(Destination::Admin(user));
    }
    let Some(database) = snapshot.database(database_name) else {
        return Err(Some(ClientError::new(
            Side::Client,
            sqlstate::INVALID_CATALOG_NAME,
            format!("database \"{database_name}\" does not exist"),
        )));
    };
    if database.routing.target == RoutingTarget::Replica {
        // A read-only alias stays read-only even when its reads fall back to the primary.
        wanted.set("default_transaction_read_only", "on");
    }
    let reported = check_settings(&database, &user, &wanted).await.map_err(Some)?;
    let client_encoding = greet(client, &reported, &wanted, &database, cancel);
    Ok(Destination::Database(LoggedIn {
        user,
        database,
        wanted,
        client_encoding,
    }))
}

/// What a client of the admin console is told after AuthenticationOk.
fn greet_admin(client: &mut ClientConn, cancel: &CancelHandle) {
    for (name, value) in [
        (
            "server_version",
            concat!("15.0 (pgrelay ", env!("CARGO_PKG_VERSION"), ")"),
        ),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("TimeZone", "UTC"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
        ("application_name", "pgrelay"),
    ] {
        compose::parameter_status(&mut client.outbuf, name, value);
    }
    compose::backend_key_data(&mut client.outbuf, cancel.process_id(), cancel.secret());
    compose::ready_for_query(&mut client.outbuf, TxStatus::Idle);
}

/// Makes sure the servers accept the client's settings (the first time each value is
/// seen), remembers how the server reports each value, and returns the ParameterStatus
/// values to report.
async fn check_settings(
    database: &DatabaseEntry,
    user: &UserEntry,
    wanted: &SessionParams,
) -> Result<Vec<(String, String)>, ClientError> {
    let pools = database.pools(user);
    let unknown = wanted
        .iter()
        .any(|(name, value)| database.known_param(name, value).is_none());
    if let (Some(reported), false) = (pools.hosts[database.primary_index()].server_params(), unknown) {
        return Ok(reported.as_ref().clone());
    }
    let mut server = pools.hosts[database.primary_index()]
        .checkout()
        .await
        .map_err(|error| ClientError::from_pool(&error, &database.name))?;
    if let Some(diff) = ParamDiff::between(wanted, &server.params) {
        for sql in diff.queries() {
            let outcome = server
                .run_own_query(sql)
                .await
                .map_err(|error| ClientError::from_upstream(&error, &database.name))?;
            if let Some((code, message)) = outcome.errors.first() {
                // The server has part of the settings now: it must not be reused.
                server.state.abandon();
                return Err(ClientError::new(Side::Client, code.clone(), message.clone()));
            }
        }
        server.params = wanted.clone();
    }
    // The server has the settings now, whether just set or left by an earlier client.
    // It reports a change only: what it last reported is the value in its spelling
    // (a SET to the value it already had, `utf-8` over `UTF8`, reports nothing).
    for (name, value) in wanted.iter() {
        let reported = server
            .reported_params()
            .iter()
            .find(|(reported, _)| reported.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.clone());
        database.remember_param(name, value, reported);
    }
    let reported = server.reported_params().to_vec();
    Ok(reported)
}

/// Sends what a client expects after AuthenticationOk; returns the client_encoding it
/// reported.
fn greet(
    client: &mut ClientConn,
    reported: &[(String, String)],
    wanted: &SessionParams,
    database: &DatabaseEntry,
    cancel: &CancelHandle,
) -> ClientEncoding {
    let mut client_encoding = ClientEncoding::UNKNOWN;
    for (name, server_value) in reported {
        let value = match wanted.get(name) {
            Some(value) => database
                .known_param(name, value)
                .flatten()
                .unwrap_or_else(|| value.to_owned()),
            None => server_value.clone(),
        };
        if name.eq_ignore_ascii_case("client_encoding") {
            client_encoding = ClientEncoding::named(&value);
        }
        compose::parameter_status(&mut client.outbuf, name, &value);
    }
    compose::backend_key_data(&mut client.outbuf, cancel.process_id(), cancel.secret());
    compose::ready_for_query(&mut client.outbuf, TxStatus::Idle);
    client_encoding
}

/// Who a login says it is, as far as pgrelay knows.
struct Resolved {
    user: Option<Arc<UserEntry>>,
    auth: Option<ClientAuth>,
    /// The iteration count an unknown user's mock SCRAM verifier shows: the one real
    /// verifiers of the same lookup have, so the count does not tell the two apart.
    mock_iterations: u32,
}

/// Who `user_name` is and how it must prove it: its `[[users]]` entry, else what the
/// database's auth_query answers, else nobody (`None`, `None`: it goes through a login that
/// cannot succeed). The admin console knows configured users only.
async fn resolve_user(snapshot: &Snapshot, user_name: &str, database_name: &str) -> Result<Resolved, LoginError> {
    let nobody = |mock_iterations| Resolved {
        user: None,
        auth: None,
        mock_iterations,
    };
    if let Some(user) = snapshot.user(user_name) {
        let auth = user.auth.clone();
        return Ok(Resolved {
            user: Some(user),
            auth: Some(auth),
            mock_iterations: auth::SCRAM_DEFAULT_ITERATIONS,
        });
    }
    if database_name == ADMIN_DATABASE {
        return Ok(nobody(auth::SCRAM_DEFAULT_ITERATIONS));
    }
    let Some((lookup, primary)) = snapshot.auth_lookup(database_name) else {
        return Ok(nobody(auth::SCRAM_DEFAULT_ITERATIONS));
    };
    match lookup.lookup(user_name, &primary).await {
        Ok(Some((user, auth))) => Ok(Resolved {
            user: Some(user),
            auth: Some(auth),
            mock_iterations: lookup.mock_iterations(),
        }),
        Ok(None) => Ok(nobody(lookup.mock_iterations())),
        Err(error) => {
            // Debug formatting: a name with a newline cannot forge a log line.
            tracing::warn!(database = ?database_name, user = ?user_name, %error, "auth_query failed");
            Err(Some(ClientError::new(
                Side::Server,
                sqlstate::CONNECTION_FAILURE,
                format!(
                    "could not look up the password of user \"{user_name}\": auth_query failed (see pgrelay's log)"
                ),
            )))
        }
    }
}

/// Runs the exchange `auth` calls for; returns what the login proved that can log in to
/// PostgreSQL in the client's place (SCRAM keys, an md5 hash), if anything.
async fn authenticate(
    client: &mut ClientConn,
    shared: &Shared,
    snapshot: &Snapshot,
    user_name: &str,
    auth: Option<&ClientAuth>,
    mock_iterations: u32,
) -> Result<Option<PassThrough>, LoginError> {
    match auth {
        Some(ClientAuth::Trust) => Ok(None),
        Some(ClientAuth::Cleartext(secret)) => {
            compose::auth_cleartext(&mut client.outbuf);
            let response = read_password_message(client).await?;
            let password = views::read_cstr(&response, "PasswordMessage")
                .map_err(|error| Some(ClientError::protocol_violation(error.to_string())))?
                .0;
            match std::str::from_utf8(password) {
                Ok(password) if secret.verify_cleartext(user_name, password) => Ok(None),
                _ => Err(Some(password_failed(user_name))),
            }
        }
        Some(ClientAuth::Md5(secret)) => {
            let salt: [u8; 4] = rand::random();
            compose::auth_md5(&mut client.outbuf, salt);
            let response = read_password_message(client).await?;
            let response = views::read_cstr(&response, "PasswordMessage")
                .map_err(|error| Some(ClientError::protocol_violation(error.to_string())))?
                .0;
            if auth::verify_md5_response(secret, user_name, salt, response) {
                Ok(secret.md5_hash(user_name).map(PassThrough::Md5))
            } else {
                Err(Some(password_failed(user_name)))
            }
        }
        Some(ClientAuth::Scram(verifier)) => {
            let client_key = scram(client, snapshot, user_name, verifier).await?;
            Ok(Some(PassThrough::Scram {
                verifier: verifier.clone(),
                client_key,
            }))
        }
        // Unknown users go through a SCRAM exchange that cannot succeed, so the answer
        // does not reveal which users exist. (`Query` is never handed here: `resolve_user`
        // replaces it with the looked-up secret.)
        Some(ClientAuth::Query) | None => {
            let mock = ScramVerifier::mock(user_name, &shared.mock_secret, mock_iterations);
            scram(client, snapshot, user_name, &mock).await?;
            Err(Some(password_failed(user_name)))
        }
    }
}

/// A SCRAM exchange with the client; returns the ClientKey its proof gave away. Clients on
/// TLS are offered SCRAM-SHA-256-PLUS first, as PostgreSQL lists them, bound to pgrelay's
/// certificate (`tls-server-end-point`).
async fn scram(
    client: &mut ClientConn,
    snapshot: &Snapshot,
    user_name: &str,
    verifier: &ScramVerifier,
) -> Result<[u8; auth::SCRAM_KEY_LEN], LoginError> {
    let binding_data = if client.stream.is_tls() {
        snapshot.client_tls.as_ref().and_then(|tls| tls.channel_binding())
    } else {
        None
    };
    let mechanisms: &[&str] = match binding_data {
        Some(_) => &[auth::SCRAM_SHA_256_PLUS, auth::SCRAM_SHA_256],
        None => &[auth::SCRAM_SHA_256],
    };
    compose::auth_sasl(&mut client.outbuf, mechanisms);
    let initial = read_password_message(client).await?;
    let initial = auth::parse_sasl_initial_response(&initial).map_err(|error| scram_error(&error, user_name))?;
    let binding = match (initial.mechanism, binding_data) {
        (auth::SCRAM_SHA_256, None) => ChannelBinding::NotOffered,
        (auth::SCRAM_SHA_256, Some(_)) => ChannelBinding::Declined,
        (auth::SCRAM_SHA_256_PLUS, Some(data)) => ChannelBinding::Selected(data.to_vec()),
        (mechanism, _) => {
            return Err(Some(ClientError::protocol_violation(format!(
                "client selected an invalid SASL authentication mechanism \"{mechanism}\""
            ))));
        }
    };
    let Some(client_first) = initial.data else {
        return Err(Some(ClientError::protocol_violation(
            "SASLInitialResponse without data",
        )));
    };
    let (awaiting, server_first) = ScramServer::with_random_nonce(verifier)
        .channel_binding(binding)
        .handle_client_first(client_first)
        .map_err(|error| scram_error(&error, user_name))?;
    compose::auth_sasl_continue(&mut client.outbuf, server_first.as_bytes());
    let client_final = read_password_message(client).await?;
    let success = awaiting
        .handle_client_final(&client_final)
        .map_err(|error| scram_error(&error, user_name))?;
    compose::auth_sasl_final(&mut client.outbuf, success.server_final.as_bytes());
    Ok(success.client_key)
}

/// Largest password or SASL message PostgreSQL takes before login
/// (PG_MAX_AUTH_TOKEN_LENGTH, 65535 bytes of body).
const MAX_AUTH_MESSAGE: usize = 65535 + crate::protocol::HEADER_LEN;

/// Flushes what is pending and reads the client's next message, which must be a
/// password-family message ('p'); returns its body.
async fn read_password_message(client: &mut ClientConn) -> Result<Vec<u8>, LoginError> {
    client.flush().await.map_err(|_| None)?;
    let frame = match client.next_login_frame(MAX_AUTH_MESSAGE).await {
        Ok(Some(frame)) => frame,
        Ok(None) | Err(crate::net::ClientReadError::Io(_)) => return Err(None),
        Err(crate::net::ClientReadError::Protocol(error)) => {
            return Err(Some(ClientError::protocol_violation(error.to_string())));
        }
    };
    if FrontendTag::from_byte(frame.tag()) != Some(FrontendTag::Password) {
        return Err(Some(ClientError::protocol_violation(format!(
            "expected a password message, got message type '{}'",
            char::from(frame.tag())
        ))));
    }
    Ok(frame.body().to_vec())
}

fn scram_error(error: &ScramError, user_name: &str) -> LoginError {
    if error.is_auth_failure() {
        Some(password_failed(user_name))
    } else if error.is_authorization_failure() {
        // PostgreSQL's words and code for a binding that fails or was stripped.
        Some(ClientError::new(
            Side::Client,
            sqlstate::INVALID_AUTHORIZATION,
            error.to_string(),
        ))
    } else {
        Some(ClientError::protocol_violation(error.to_string()))
    }
}

fn password_failed(user_name: &str) -> ClientError {
    ClientError::new(
        Side::Client,
        sqlstate::INVALID_PASSWORD,
        format!("password authentication failed for user \"{user_name}\""),
    )
}
