//! A connection to a PostgreSQL server: opening and authenticating it, the state it is
//! in (transaction status, parameters pgrelay applied, replies still owed) and the few
//! queries pgrelay runs on it by itself.

mod connect;
pub mod expect;
mod own_query;
mod params;
mod statements;
mod stream;

use std::io;
use std::time::Instant;

use bytes::BytesMut;

pub use connect::{ConnectSpec, ServerCredentials, connect};
pub use expect::{CopyStart, Expect, FailedAt, Recipient, ResponseQueue, Routing, Synthetic};
pub use own_query::OwnQueryOutcome;
pub use params::{ParamDiff, SessionParams};
pub use statements::ServerStatements;
pub use stream::ServerStream;

use crate::protocol::TxStatus;

/// Why talking to a server failed. Says which side failed and what a client may be told.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("could not connect to server {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("server {addr} refused the login: {message}")]
    LoginRefused {
        addr: String,
        sqlstate: String,
        message: String,
    },
    #[error("cannot log in to server {addr}: {reason}")]
    Credentials { addr: String, reason: String },
    #[error("server {addr} closed the connection")]
    Closed { addr: String },
    #[error("server {addr} ended the session: {message}")]
    Terminated {
        addr: String,
        sqlstate: String,
        message: String,
    },
    #[error("i/o error with server {addr}: {source}")]
    Io { addr: String, source: io::Error },
    #[error("server {addr} broke the protocol: {reason}")]
    Protocol { addr: String, reason: String },
    #[error("server {addr} is not usable: {reason}")]
    Unusable { addr: String, reason: &'static str },
    #[error("server {addr} did not answer a cancel within query_timeout")]
    QueryTimeout { addr: String },
}

impl UpstreamError {
    /// Whether the server may well accept the same attempt in a moment: it refused or
    /// reset the connection, is starting up or shutting down (57P03, 57P01, 57P02), or
    /// has no connection slot free (53300). Wrong credentials and unknown databases are
    /// not: waiting would only delay the same error.
    pub fn is_transient(&self) -> bool {
        match self {
            UpstreamError::Connect { .. } | UpstreamError::Closed { .. } | UpstreamError::Io { .. } => true,
            UpstreamError::LoginRefused { sqlstate, .. } | UpstreamError::Terminated { sqlstate, .. } => {
                matches!(sqlstate.as_str(), "57P01" | "57P02" | "57P03" | "53300")
            }
            UpstreamError::Credentials { .. }
            | UpstreamError::Protocol { .. }
            | UpstreamError::Unusable { .. }
            | UpstreamError::QueryTimeout { .. } => false,
        }
    }

    /// Whether the server said it is going away (or is already gone): other idle
    /// connections to it are most likely dead too.
    pub fn means_server_down(&self) -> bool {
        match self {
            UpstreamError::Connect { .. } | UpstreamError::Closed { .. } | UpstreamError::Io { .. } => true,
            UpstreamError::LoginRefused { sqlstate, .. } | UpstreamError::Terminated { sqlstate, .. } => {
                matches!(sqlstate.as_str(), "57P01" | "57P02" | "57P03")
            }
            UpstreamError::Credentials { .. }
            | UpstreamError::Protocol { .. }
            | UpstreamError::Unusable { .. }
            | UpstreamError::QueryTimeout { .. } => false,
        }
    }
}

/// Identity of a server-side session, used to forward CancelRequests to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendKey {
    pub process_id: u32,
    pub secret: bytes::Bytes,
}

/// One authenticated server connection.
#[derive(Debug)]
pub struct ServerConn {
    pub(crate) stream: ServerStream,
    /// Bytes read from the server and not yet handled.
    pub(crate) inbuf: BytesMut,
    /// Bytes waiting to be written to the server.
    pub(crate) outbuf: BytesMut,
    /// Replies the server still owes, in order.
    pub(crate) expect: ResponseQueue,
    /// Bytes of a large message that are still to be forwarded without being looked at.
    pub(crate) passthrough: usize,
    /// Whether those bytes go to the client (or are dropped).
    pub(crate) passthrough_to_client: bool,
    /// Extended-protocol messages were sent after the last Sync: the server is in an
    /// implicit transaction until the next Sync.
    pub(crate) unsynced: bool,
    /// The server is in COPY FROM STDIN and takes CopyData from the client.
    pub(crate) copy_in: bool,
    /// In COPY FROM STDIN, the client has not sent its CopyDone or CopyFail yet: a Sync
    /// it sends now is ignored by the server.
    pub(crate) copy_from_client: bool,
    pub(crate) status: TxStatus,
    /// Settings pgrelay has applied on behalf of clients.
    pub(crate) params: SessionParams,
    /// Prepared statements held for clients (transaction and statement mode).
    pub(crate) statements: ServerStatements,
    /// The connection works but must not be reused (a stale plan cache, a reload).
    pub(crate) retire: bool,
    /// The pool's generation when this connection was opened; an older one is retired.
    pub(crate) pool_generation: u64,
    /// A client's session state is on it (session mode, or a pinned client): it may
    /// only go back to the pool after a reset.
    pub(crate) holds_client_state: bool,
    /// Its entry in SHOW SERVERS, when pgrelay keeps a registry.
    pub(crate) registration: Option<crate::registry::ServerRegistration>,
    /// Values the server reported in ParameterStatus (server_version, …).
    pub(crate) reported: Vec<(String, String)>,
    pub(crate) key: BackendKey,
    pub(crate) addr: std::sync::Arc<str>,
    pub(crate) broken: bool,
    /// The FATAL error the server sent before closing, if it did.
    pub(crate) fatal: Option<(String, String)>,
    pub(crate) released_at: Instant,
}

impl ServerConn {
    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn key(&self) -> &BackendKey {
        &self.key
    }

    pub fn status(&self) -> TxStatus {
        self.status
    }

    /// Sends an empty query whose EmptyQueryResponse marks the point after which no
    /// answer to a Sync sent behind a failed COPY can come (see
    /// [`ResponseQueue::copy_started`]).
    pub(crate) fn send_barrier(&mut self) {
        if postgres_protocol::message::frontend::query("", &mut self.outbuf).is_ok() {
            self.expect.push(Expect::Barrier { reached: false }, Recipient::Pgrelay);
        }
    }

    /// Nothing owed, no COPY, no open transaction, nothing half-read: the connection
    /// can serve another client.
    pub fn is_idle(&self) -> bool {
        !self.broken
            && self.expect.is_empty()
            && !self.expect.has_uncertain_readies()
            && !self.copy_in
            && self.passthrough == 0
            && !self.unsynced
            && self.status == TxStatus::Idle
            && self.outbuf.is_empty()
    }

    /// Idle, and not retired: it may go back to the pool.
    pub fn is_reusable(&self) -> bool {
        self.is_idle() && !self.retire && !self.holds_client_state
    }

    /// Marks the connection as not to be reused.
    pub fn mark_broken(&mut self) {
        self.broken = true;
    }

    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// The ParameterStatus values this server reported.
    pub fn reported_params(&self) -> &[(String, String)] {
        &self.reported
    }

    pub(crate) fn note_parameter(&mut self, name: &str, value: &str) {
        match self.reported.iter_mut().find(|(known, _)| known == name) {
            Some((_, known_value)) => value.clone_into(known_value),
            None => self.reported.push((name.to_owned(), value.to_owned())),
        }
    }

    /// Checks without waiting that the server has not closed the connection while it
    /// sat idle in the pool (restart, idle_session_timeout, pg_terminate_backend).
    pub fn probe_alive(&mut self) -> bool {
        if self.broken || !self.inbuf.is_empty() {
            return false;
        }
        self.stream.probe_alive()
    }

    /// Sends Terminate if the socket can take it right away; used when a connection is
    /// closed on purpose so the server does not log an unexpected EOF.
    pub(crate) fn terminate_nowait(&mut self) {
        if !self.broken {
            self.stream.try_write_now(&[b'X', 0, 0, 0, 4]);
        }
    }
}

impl Drop for ServerConn {
    fn drop(&mut self) {
        self.terminate_nowait();
    }
}
