//! A connection to a PostgreSQL server: opening and authenticating it, the state it is
//! in (health, transaction status and protocol phase in `state`, parameters pgrelay
//! applied, replies still owed) and the few queries pgrelay runs on it by itself.

mod connect;
mod credentials;
pub mod expect;
mod handed;
mod login;
mod lookup;
mod own_query;
mod params;
mod state;
mod statements;
mod stream;

use std::io;
use std::time::Instant;

use bytes::BytesMut;

pub use connect::{ConnectSpec, connect};
pub use credentials::{PassThrough, ServerCredentials};
pub use expect::{CopyStart, Expect, FailedAt, Recipient, ResponseQueue, Routing, Synthetic};
pub use handed::HandedServer;
pub use lookup::LookupRows;
pub use own_query::OwnQueryOutcome;
pub use params::{ParamDiff, SessionParams};
pub(crate) use state::{ConnState, ServerFatal};
pub use statements::ServerStatements;
pub use stream::ServerStream;

use crate::error::MessageText;
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
        message: MessageText,
    },
    #[error("cannot log in to server {addr}: {reason}")]
    Credentials { addr: String, reason: String },
    #[error("server {addr} closed the connection")]
    Closed { addr: String },
    #[error("server {addr} ended the session: {message}")]
    Terminated {
        addr: String,
        sqlstate: String,
        message: MessageText,
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
    /// Whether it still works and may be reused, its transaction status, and the protocol
    /// phase the client's traffic left it in.
    pub(crate) state: ConnState,
    /// Settings pgrelay has applied on behalf of clients.
    pub(crate) params: SessionParams,
    /// Prepared statements held for clients (transaction and statement mode).
    pub(crate) statements: ServerStatements,
    /// The pool's generation when this connection was opened; an older one is retired.
    pub(crate) pool_generation: u64,
    /// Its entry in SHOW SERVERS, when pgrelay keeps a registry.
    pub(crate) registration: Option<crate::registry::ServerRegistration>,
    /// Values the server reported in ParameterStatus (server_version, …).
    pub(crate) reported: Vec<(String, String)>,
    pub(crate) key: BackendKey,
    pub(crate) addr: std::sync::Arc<str>,
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
        self.state.status()
    }

    /// Sends an empty query whose EmptyQueryResponse marks the point after which no
    /// answer to a Sync sent behind a failed COPY can come (see
    /// [`ResponseQueue::copy_started`]).
    pub(crate) fn send_barrier(&mut self) {
        if postgres_protocol::message::frontend::query("", &mut self.outbuf).is_ok() {
            self.expect.push(Expect::Barrier { reached: false }, Recipient::Pgrelay);
        }
    }

    /// Something a client started is still under way: replies owed (or perhaps owed),
    /// output not yet written, a COPY, a message half forwarded, a batch without its Sync.
    pub(crate) fn mid_statement(&self) -> bool {
        self.state.mid_statement()
            || !self.expect.is_empty()
            || self.expect.has_uncertain_readies()
            || !self.outbuf.is_empty()
    }

    /// Not broken, nothing under way, no open transaction: the connection can serve
    /// another client.
    pub fn is_idle(&self) -> bool {
        self.state.is_idle() && !self.mid_statement()
    }

    /// Idle, not retired, and holding no client's session state: it may go back to the
    /// pool.
    pub fn is_reusable(&self) -> bool {
        // A continued TLS connection half way to its record limit is closed rather than
        // lent again: reaching the limit would end it in the middle of a client's work.
        self.is_idle() && self.state.is_reusable() && !self.stream.half_spent()
    }

    pub fn is_broken(&self) -> bool {
        self.state.is_broken()
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
        if self.state.is_broken() || !self.inbuf.is_empty() {
            return false;
        }
        self.stream.probe_alive()
    }

    /// Sends Terminate (and under TLS a close_notify) if the socket can take it right
    /// away; used when a connection is closed on purpose so the server does not log an
    /// unexpected EOF.
    pub(crate) fn terminate_nowait(&mut self) {
        if !self.state.is_broken() {
            self.stream.try_write_now(&[b'X', 0, 0, 0, 4]);
            self.stream.close_nowait();
        }
    }
}

impl Drop for ServerConn {
    fn drop(&mut self) {
        self.terminate_nowait();
    }
}
