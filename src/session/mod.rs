//! One client connection from accept to close: the opening handshake, login, then the
//! session loop that borrows server connections from the pools.

mod carried;
mod farewell;
mod handshake;
mod listen_tx;
mod local;
mod login;
mod method;
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

use crate::access::{Counted, Gate, LoginRequest, Refusal};
use crate::error::{ClientError, Side, sqlstate};
use crate::net::ClientConn;
use crate::net::ClientStream;
use crate::protocol::compose::{self, Severity};
use crate::runtime::{Shared, Snapshot};
use farewell::Refused;
use handshake::{HandshakeError, Opening};
use login::{Destination, LoggedIn, LoginError};
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
    let max_message_size = shared.snapshot().client_limits.max_message_size;
    let mut client = ClientConn::new(ClientStream::Tcp(stream), peer, max_message_size);
    // Boxed, and allocated only while logging in: the login's locals (the snapshot, the
    // slot of the client limit, the prepared over-limit error, the timeout) and the
    // refusal's would otherwise stay reserved in every idle session's task. Only what
    // the session needs lives across its run.
    let session = match Box::pin(log_in(&mut client, &shared)).await {
        Outcome::Session(session) => session,
        // Boxed: the admin console's future is the largest a connection can run, and every
        // client session's task would otherwise reserve room for it.
        Outcome::Admin(admin) => return Box::pin(admin.run_on(shared.control(), client)).await,
        Outcome::Refused(refused) => return Box::pin(refused.tell(&shared, &mut client)).await,
        Outcome::Done => return,
    };
    session.run(&mut client).await;
}

/// How a connection's login ended. Small, and boxed where large: it is what `serve`
/// holds between the login and the session.
enum Outcome {
    Session(Box<Session>),
    Admin(Box<crate::admin::AdminSession>),
    Refused(Box<Refused>),
    /// A cancel request, a connection closed or a TLS handshake failed: nothing to say.
    Done,
}

/// The handshake and login of an accepted connection, within client_login_timeout.
async fn log_in(client: &mut ClientConn, shared: &Arc<Shared>) -> Outcome {
    let snapshot = shared.snapshot();
    let limits = &snapshot.client_limits;
    // Taken before the startup packet: connections still in their handshake or login
    // count against max_client_conn (and max_client_conn_per_address) too, so a flood of
    // connections that never finish logging in cannot grow without bound. One over a limit
    // is only read far enough to tell a cancel request from a login, which it is refused,
    // and not for long.
    let slot = ClientSlot::take(shared, &snapshot, client.peer);
    let over_limit = slot.is_err();
    let login_timeout = if over_limit {
        Some(
            limits
                .login_timeout
                .map_or(FAREWELL_TIMEOUT, |limit| limit.min(FAREWELL_TIMEOUT)),
        )
    } else {
        limits.login_timeout
    };
    let over_limit_error = slot.as_ref().err().cloned();
    let mut refused = None;
    let logging_in = LoggingIn::enter(shared);
    let started = match login_timeout {
        Some(limit) => match tokio::time::timeout(limit, start(client, shared, &snapshot, slot, &mut refused)).await {
            Ok(started) => started,
            Err(_) if over_limit => {
                refused = Some(Refusal::Limit);
                Err(over_limit_error)
            }
            Err(_) => Err(Some(ClientError::new(
                Side::Client,
                sqlstate::PROTOCOL_VIOLATION,
                format!(
                    "startup and authentication did not finish within client_login_timeout ({})",
                    crate::config::format_limit(Some(limit))
                ),
            ))),
        },
        None => start(client, shared, &snapshot, slot, &mut refused).await,
    };
    drop(logging_in);
    match started {
        Ok(Some(Started::Session(session))) => Outcome::Session(session),
        Ok(Some(Started::Admin(admin))) => Outcome::Admin(Box::new(admin)),
        Ok(None) | Err(None) => Outcome::Done,
        Err(Some(error)) => Outcome::Refused(Box::new(Refused {
            snapshot,
            error,
            reason: refused,
        })),
    }
}

/// A connection counted in `Shared::logging_in` until dropped, however its login ends.
struct LoggingIn<'a>(&'a Shared);

impl<'a> LoggingIn<'a> {
    fn enter(shared: &'a Shared) -> Self {
        shared.logging_in.fetch_add(1, Ordering::Relaxed);
        LoggingIn(shared)
    }
}

impl Drop for LoggingIn<'_> {
    fn drop(&mut self) {
        self.0.logging_in.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Handshake and login. `Ok(None)` for a cancel request, which ends the connection.
async fn start(
    client: &mut ClientConn,
    shared: &Arc<Shared>,
    snapshot: &Snapshot,
    slot: Result<ClientSlot, ClientError>,
    refused: &mut Option<Refusal>,
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
            // Boxed: forwarding to peers is a large future, and every session's task
            // would otherwise reserve room for it while idle.
            Box::pin(cancel(shared, snapshot, &client.stream, &key)).await;
            return Ok(None);
        }
        Opening::Session { minor_version, params } => (minor_version, params),
    };
    let mut slot = slot.map_err(|error| {
        *refused = Some(Refusal::Limit);
        Some(error)
    })?;
    // Before any authentication work: address rules, bans, login rate.
    let param = |name: &str| {
        params
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
            .filter(|value| !value.is_empty())
    };
    let Some(user_name) = param("user") else {
        return Err(Some(ClientError::new(
            Side::Client,
            sqlstate::INVALID_AUTHORIZATION,
            "no PostgreSQL user name specified in startup packet",
        )));
    };
    let request = LoginRequest {
        ip: client.peer.ip(),
        tls: client.stream.is_tls(),
        user: user_name,
        database: param("database").unwrap_or(user_name),
    };
    let mut gate = Gate::open(&shared.access, &snapshot.access, &request)
        .await
        .map_err(|(reason, error)| {
            *refused = Some(reason);
            Some(error)
        })?;
    let cancel = shared.cancel.register();
    let destination = login::login(client, shared, snapshot, minor_version, params, &cancel, &mut gate).await;
    *refused = refused.or(gate.refused);
    slot.user = gate.take_user_slot();
    let logged_in = match destination? {
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

/// A client handed over by the process this one took over from (`crate::takeover`): its
/// socket and the description of its session; without a socket, the announcement of a
/// fan-out listener whose socket follows.
#[derive(Debug)]
pub struct Resumed {
    pub stream: Option<std::net::TcpStream>,
    /// The client's server connection, in session mode or when it is pinned to it.
    pub server: Option<std::net::TcpStream>,
    pub description: Vec<u8>,
}

/// Serves a handed-over client: its session is rebuilt from its description, with no
/// login (the old process logged it in), and its cancel key stays the same.
pub async fn resume(resumed: Resumed, shared: Arc<Shared>) {
    // Boxed, and allocated only while rebuilding, as a login is (`serve`): the
    // description and the rebuild's locals must not stay reserved in the session's task.
    let Some((session, mut client)) = Box::pin(rebuild(resumed, &shared)).await else {
        return;
    };
    session.run(&mut client).await;
}

/// Rebuilds a handed-over client's session, or serves the arrival of a fan-out listener;
/// `None` when there is no session to run.
async fn rebuild(resumed: Resumed, shared: &Arc<Shared>) -> Option<(Box<Session>, ClientConn)> {
    let Some(stream) = resumed.stream else {
        run::handover::arrive(shared.clone(), &resumed.description).await;
        return None;
    };
    let failed = || {
        shared
            .metrics
            .takeover_clients(crate::metrics::TakeoverResult::Failed, 1)
    };
    let Ok(peer) = stream.peer_addr() else {
        failed();
        return None;
    };
    let stream = match TcpStream::from_std(stream) {
        Ok(stream) => stream,
        Err(error) => {
            failed();
            tracing::warn!(client = %peer, %error, "cannot take over a handed-over client");
            return None;
        }
    };
    let snapshot = shared.snapshot();
    let description = run::handover::Description::decode(&resumed.description);
    // A TLS client goes on with the old process's traffic keys, from where it stopped.
    let stream = match description.as_ref().and_then(|description| description.tls.clone()) {
        None => ClientStream::Tcp(stream),
        Some(state) => match crate::net::record::RecordStream::new(stream, state) {
            Ok(records) => ClientStream::Resumed(Box::new(records)),
            // Nothing can be said to it: anything but its own records breaks its TLS.
            Err(error) => {
                failed();
                tracing::warn!(client = %peer, %error, "cannot continue a handed-over TLS client");
                return None;
            }
        },
    };
    let mut client = ClientConn::new(stream, peer, snapshot.client_limits.max_message_size);
    let entries = description.as_ref().and_then(|description| {
        Some((
            snapshot.database(&description.database)?,
            description.user_entry(&snapshot)?,
        ))
    });
    // The server connection that came with it, lent to it from the pool it belongs to.
    let server = match (&description, &entries, resumed.server) {
        (Some(description), Some((database, user)), server) => match (&description.server, server) {
            (None, None) => Some(None),
            (Some(kept), Some(stream)) => {
                adopt_server(database, user, kept, description.server_tls.clone(), stream, peer).map(Some)
            }
            // A socket without its description, or a description without its socket.
            _ => None,
        },
        _ => None,
    };
    let (Some(description), Some((database, user)), Some(server)) = (description, entries, server) else {
        // Its session cannot be rebuilt here (another layout, its database or user is not
        // in this configuration, or its server connection has no pool here): it ends as at
        // a shutdown, and reconnects. A server connection that came with it closes.
        failed();
        tracing::warn!(client = %peer, "a handed-over client's session cannot be rebuilt here: disconnecting it");
        compose::error(
            &mut client.outbuf,
            Severity::Fatal,
            sqlstate::ADMIN_SHUTDOWN,
            "terminating connection because pgrelay was replaced and this session cannot be carried over",
        );
        let _ = tokio::time::timeout(FAREWELL_TIMEOUT, client.flush()).await;
        return None;
    };
    let mut slot = match ClientSlot::take(shared, &snapshot, peer) {
        Ok(slot) => slot,
        Err(error) => {
            failed();
            compose::error(&mut client.outbuf, Severity::Fatal, &error.sqlstate, &error.message);
            let _ = tokio::time::timeout(FAREWELL_TIMEOUT, client.flush()).await;
            return None;
        }
    };
    // Pass-through: the pools log in with what the old process learned from this user's
    // logins (a fresh entry here has learned nothing yet).
    description.secrets.teach(&user.server_credentials);
    // Counted, never refused: the client was let in already.
    slot.user = shared.access.counts.take_user(&user.name, None).ok();
    let cancel = match shared.cancel.register_key(description.process_id, description.secret) {
        Some(cancel) => cancel,
        None => {
            tracing::warn!(client = %peer, "a handed-over client's cancel key is taken here: its cancels will not work");
            shared.cancel.register()
        }
    };
    let mut wanted = crate::upstream::SessionParams::default();
    for (name, value, _) in &description.wanted {
        wanted.set(name, value);
    }
    let logged_in = LoggedIn {
        user,
        database,
        wanted,
        client_encoding: description.encoding.as_deref().map_or_else(
            crate::route::ClientEncoding::default,
            crate::route::ClientEncoding::named,
        ),
    };
    let mut session = Box::new(Session::new(shared.clone(), &snapshot, logged_in, peer, cancel, slot));
    session.restore(&description);
    shared
        .metrics
        .takeover_clients(crate::metrics::TakeoverResult::Received, 1);
    if let (Some(server), Some(kept)) = (server, &description.server) {
        session.restore_server(server, kept);
    }
    if !description.channels.is_empty() {
        session.adopt_listener(&description).await;
    }
    tracing::info!(client = %peer, database = %description.database, user = %description.user,
        with_server = description.server.is_some(), "client taken over from the old process");
    Some((session, client))
}

/// Takes a handed-over client's server connection into the pool of `database` and `user`
/// with the same address and role, a TLS one going on with the record state `tls`; `None`
/// (and the connection closed) if there is none. A TLS connection that cannot go on is
/// closed without a word: nothing but its own records may be written to it.
fn adopt_server(
    database: &Arc<crate::runtime::DatabaseEntry>,
    user: &Arc<crate::runtime::UserEntry>,
    kept: &run::handover::KeptServer,
    tls: Option<crate::net::record::RecordState>,
    stream: std::net::TcpStream,
    peer: SocketAddr,
) -> Option<crate::pool::Checkout> {
    let pools = database.pools(user);
    let index = pools.hosts.iter().position(|pool| pool.addr() == kept.conn.addr);
    let Some(index) = index.filter(|index| (*index != database.primary_index()) == kept.conn.replica) else {
        tracing::warn!(client = %peer, database = %database.name, server = kept.conn.addr,
            "a handed-over client's server is not in this configuration (or changed its role)");
        return None;
    };
    let stream = stream.set_nonblocking(true).and_then(|()| TcpStream::from_std(stream));
    let stream = match stream {
        Ok(stream) => stream,
        Err(error) => {
            tracing::warn!(client = %peer, %error, "cannot take over a handed-over client's server connection");
            return None;
        }
    };
    let stream = match tls {
        None => crate::upstream::ServerStream::Tcp(stream),
        Some(state) => match crate::net::record::RecordStream::new(stream, state) {
            Ok(records) => crate::upstream::ServerStream::Resumed(Box::new(records)),
            Err(error) => {
                tracing::warn!(client = %peer, %error, "cannot continue a handed-over client's TLS server connection");
                return None;
            }
        },
    };
    let pool = &pools.hosts[index];
    let mut conn = crate::upstream::ServerConn::adopt(stream, pool.spec().addr.clone(), &kept.conn);
    // Opened under the old process's `server_tls`: plain TCP where this configuration
    // asks for TLS serves the client it came with, and is closed after it rather than
    // lent to others.
    let wants_tls = matches!(
        pool.spec().tls.mode(),
        crate::config::ServerTlsMode::Require | crate::config::ServerTlsMode::VerifyFull
    );
    if wants_tls && !conn.stream.is_tls() {
        conn.state.retire();
    }
    Some(pool.adopt(conn))
}

/// Serves a connection accepted on `peer_listen`, which takes a CancelRequest and nothing
/// else: it is an address of this instance alone, for peers to forward cancels to.
pub async fn serve_cancel_only(stream: std::net::TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let stream = match TcpStream::from_std(stream) {
        Ok(stream) => stream,
        Err(error) => {
            tracing::warn!(client = %peer, %error, "cannot take over an accepted connection");
            return;
        }
    };
    let mut stream = ClientStream::Tcp(stream);
    let snapshot = shared.snapshot();
    // No TLS here: an SSLRequest is answered 'N', and a CancelRequest needs none.
    match tokio::time::timeout(FAREWELL_TIMEOUT, handshake::open(&mut stream, None)).await {
        Ok(Ok(Opening::Cancel(key))) => cancel(&shared, &snapshot, &stream, &key).await,
        Ok(Ok(Opening::Session { .. })) => {
            let mut out = bytes::BytesMut::new();
            compose::error(
                &mut out,
                Severity::Fatal,
                sqlstate::PROTOCOL_VIOLATION,
                "this address (peer_listen) takes cancel requests only: connect to pgrelay's listen address",
            );
            let _ = tokio::time::timeout(FAREWELL_TIMEOUT, async {
                use tokio::io::AsyncWriteExt;
                stream.write_all(&out).await?;
                stream.flush().await
            })
            .await;
        }
        Ok(Err(_)) | Err(_) => {}
    }
}

/// Applies a CancelRequest here or forwards it to the peers (`crate::cancel::forward`).
async fn cancel(
    shared: &Shared,
    snapshot: &Snapshot,
    stream: &ClientStream,
    key: &crate::protocol::startup::CancelKey,
) {
    // The address the request arrived on, and the listening addresses with an unspecified
    // IP (0.0.0.0) taken as that address's IP: with peers_dns, this is how an instance
    // recognizes itself among the addresses the name resolves to.
    let arrived_on = stream.local_addr().ok();
    let mut own: Vec<SocketAddr> = arrived_on.into_iter().collect();
    let server = &snapshot.config.server;
    own.extend(
        [Some(server.listen.as_str()), server.peer_listen.as_deref()]
            .into_iter()
            .flatten()
            .filter_map(|addr| addr.parse::<SocketAddr>().ok())
            .filter(|addr| addr.port() != 0)
            .filter_map(|addr| match (addr.ip().is_unspecified(), arrived_on) {
                (false, _) => Some(addr),
                (true, Some(arrived_on)) => Some(SocketAddr::new(arrived_on.ip(), addr.port())),
                (true, None) => None,
            }),
    );
    let context = crate::cancel::forward::Context {
        peers: &server.peers,
        own: &own,
        predecessor: Some(&shared.predecessor),
    };
    let result =
        crate::cancel::forward::handle(&shared.cancel, &shared.cancel_forwarder, &shared.metrics, context, key).await;
    tracing::debug!(process_id = key.process_id, result = result.label(), "cancel request");
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

/// One of max_client_conn places, with the client's places in the counts of its address
/// and (once logged in) its user, held for the life of a session.
#[derive(Debug)]
pub struct ClientSlot {
    shared: Arc<Shared>,
    _address: Option<Counted>,
    user: Option<Counted>,
}

impl ClientSlot {
    /// The places of a new connection from `peer`, or the refusal it is to be told.
    fn take(shared: &Arc<Shared>, snapshot: &Snapshot, peer: SocketAddr) -> Result<ClientSlot, ClientError> {
        let previous = shared.clients.fetch_add(1, Ordering::AcqRel);
        let mut slot = ClientSlot {
            shared: shared.clone(),
            _address: None,
            user: None,
        };
        if previous >= snapshot.client_limits.max_client_conn {
            return Err(too_many_clients());
        }
        let per_address = snapshot.access.max_client_conn_per_address;
        match shared.access.counts.take_address(peer.ip(), per_address) {
            Ok(counted) => slot._address = Some(counted),
            Err(_) => {
                return Err(crate::access::too_many_from_address(
                    peer.ip(),
                    per_address.unwrap_or_default(),
                ));
            }
        }
        Ok(slot)
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.shared.clients.fetch_sub(1, Ordering::AcqRel);
    }
}
