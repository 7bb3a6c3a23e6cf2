//! One client connection from accept to close: the opening handshake, login, then the
//! session loop that borrows server connections from the pools.

mod carried;
mod handshake;
mod local;
mod login;
mod options;
mod prepared;
mod pump;
mod routing;
mod run;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::error::{ClientError, Side, sqlstate};
use crate::net::ClientConn;
use crate::net::ClientStream;
use crate::protocol::compose::{self, Severity};
use crate::runtime::{Shared, Snapshot};
use handshake::{HandshakeError, Opening};
use login::{Destination, LoginError};
use run::Session;

/// How long pgrelay tries to deliver a last error to a client that is being refused.
const FAREWELL_TIMEOUT: Duration = Duration::from_secs(2);

/// Serves a client connection accepted on another runtime (the control thread's), moving
/// its socket to this one.
pub async fn serve_moved(stream: std::net::TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    match TcpStream::from_std(stream) {
        Ok(stream) => serve(stream, peer, shared).await,
        Err(error) => tracing::warn!(client = %peer, %error, "cannot take over an accepted connection"),
    }
}

/// Serves one accepted client connection until it ends.
pub async fn serve(stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let snapshot = shared.snapshot();
    let limits = snapshot.client_limits.clone();
    let mut client = ClientConn::new(ClientStream::Tcp(stream), peer, limits.max_message_size);
    // Taken before the startup packet: connections still in their handshake or login
    // count against max_client_conn too, so a flood of connections that never finish
    // logging in cannot grow without bound. One over the limit is only read far enough
    // to tell a cancel request from a login, which it is refused, and not for long.
    let slot = ClientSlot::take(&shared, limits.max_client_conn);
    let over_limit = slot.is_none();
    let login_timeout = if over_limit {
        Some(
            limits
                .login_timeout
                .map_or(FAREWELL_TIMEOUT, |limit| limit.min(FAREWELL_TIMEOUT)),
        )
    } else {
        limits.login_timeout
    };
    let started = match login_timeout {
        // Boxed: the login future is large and must not make every idle session's task
        // that large too.
        Some(limit) => {
            match tokio::time::timeout(limit, Box::pin(start(&mut client, &shared, &snapshot, slot))).await {
                Ok(started) => started,
                Err(_) if over_limit => Err(Some(too_many_clients())),
                Err(_) => Err(Some(ClientError::new(
                    Side::Client,
                    sqlstate::PROTOCOL_VIOLATION,
                    format!(
                        "startup and authentication did not finish within client_login_timeout ({})",
                        crate::config::format_limit(Some(limit))
                    ),
                ))),
            }
        }
        None => Box::pin(start(&mut client, &shared, &snapshot, slot)).await,
    };
    match started {
        Ok(Some(Started::Session(session))) => session.run(&mut client).await,
        Ok(Some(Started::Admin(admin))) => admin.run_on(shared.control(), client).await,
        Ok(None) => {}
        Err(Some(error)) => {
            tracing::info!(client = %peer, sqlstate = %error.sqlstate, error = %error.message, "login refused");
            shared.metrics.client_error(None, &error.sqlstate);
            compose::error(&mut client.outbuf, Severity::Fatal, &error.sqlstate, &error.message);
            let _ = tokio::time::timeout(FAREWELL_TIMEOUT, client.flush()).await;
        }
        Err(None) => {}
    }
}

/// Handshake and login. `Ok(None)` for a cancel request, which ends the connection.
async fn start(
    client: &mut ClientConn,
    shared: &Arc<Shared>,
    snapshot: &Snapshot,
    slot: Option<ClientSlot>,
) -> Result<Option<Started>, LoginError> {
    let opening = handshake::open(&mut client.stream, snapshot.client_tls.as_ref())
        .await
        .map_err(|error| match error {
            HandshakeError::Closed | HandshakeError::Io(_) => None,
            HandshakeError::Tls(ref source) => {
                tracing::info!(client = %client.peer, error = %source, "TLS handshake failed");
                None
            }
            HandshakeError::Startup(error) => Some(ClientError::protocol_violation(error.to_string())),
            HandshakeError::TooManyRequests | HandshakeError::PlaintextAfterSslRequest => {
                Some(ClientError::protocol_violation(error.to_string()))
            }
            HandshakeError::TlsRequired => Some(ClientError::new(
                Side::Client,
                sqlstate::INVALID_AUTHORIZATION,
                error.to_string(),
            )),
        })?;
    let (minor_version, params) = match opening {
        Opening::Cancel(key) => {
            shared.cancel.cancel(&key).await;
            return Ok(None);
        }
        Opening::Session { minor_version, params } => (minor_version, params),
    };
    let slot = slot.ok_or_else(|| Some(too_many_clients()))?;
    let cancel = shared.cancel.register();
    let logged_in = match login::login(client, shared, snapshot, minor_version, params, &cancel).await? {
        Destination::Database(logged_in) => logged_in,
        Destination::Admin(user) => {
            tracing::info!(client = %client.peer, user = %user.name, "admin console client connected");
            return Ok(Some(Started::Admin(crate::admin::AdminSession::new(
                shared.clone(),
                &user.name,
                slot,
                cancel,
            ))));
        }
    };
    tracing::info!(client = %client.peer, database = %logged_in.database.name, user = %logged_in.user.name, "client connected");
    Ok(Some(Started::Session(Box::new(Session::new(
        shared.clone(),
        snapshot,
        logged_in,
        client.peer,
        cancel,
        slot,
    )))))
}

fn too_many_clients() -> ClientError {
    ClientError::new(
        Side::Pgrelay,
        sqlstate::TOO_MANY_CONNECTIONS,
        "no more connections allowed (max_client_conn)",
    )
}

/// A logged-in connection: a pooled session or the admin console.
enum Started {
    Session(Box<Session>),
    Admin(crate::admin::AdminSession),
}

/// One of max_client_conn places, held for the life of a session.
#[derive(Debug)]
pub struct ClientSlot {
    shared: Arc<Shared>,
}

impl ClientSlot {
    fn take(shared: &Arc<Shared>, max: usize) -> Option<ClientSlot> {
        let previous = shared.clients.fetch_add(1, Ordering::AcqRel);
        let slot = ClientSlot { shared: shared.clone() };
        (previous < max).then_some(slot)
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.shared.clients.fetch_sub(1, Ordering::AcqRel);
    }
}
