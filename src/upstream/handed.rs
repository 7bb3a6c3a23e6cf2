//! A server connection that another pgrelay process opened and handed over with its client
//! (`crate::takeover`): what travels with its socket, and the `ServerConn` rebuilt from it.

use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;

use super::{BackendKey, ConnState, ResponseQueue, ServerConn, ServerStatements, ServerStream, SessionParams};

/// What a process needs, besides the socket, to serve a server connection it did not open.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct HandedServer {
    /// Its pool's address, as the configuration writes it.
    pub addr: String,
    /// The pool is a replica's.
    pub replica: bool,
    pub process_id: u32,
    pub secret: Vec<u8>,
    /// The ParameterStatus values it reported.
    pub reported: Vec<(String, String)>,
    /// The settings pgrelay applied on it: (name, value, given as SQL text).
    pub params: Vec<(String, String, bool)>,
    /// Server-side names of the prepared statements pgrelay made on it.
    pub statements: Vec<String>,
    /// A client's session state is on it: it must be reset before anyone else uses it.
    pub holds_client_state: bool,
}

impl ServerConn {
    /// What goes with this connection's socket to another process; `None` unless it is
    /// quiet: outside a transaction, nothing owed or under way either way, nothing
    /// buffered, and under TLS nothing buffered in the TLS layer either and every record
    /// read whole (its traffic keys go along: see `ServerStream::leave_rustls`). Bytes the
    /// server sent since (a notification) wait in the socket for the other process, whole
    /// records that the keys it receives open.
    pub(crate) fn handed_over(&self, replica: bool) -> Option<HandedServer> {
        let quiet = self.is_idle() && self.inbuf.is_empty() && self.stream.can_move();
        quiet.then(|| HandedServer {
            addr: self.addr.to_string(),
            replica,
            process_id: self.key.process_id,
            secret: self.key.secret.to_vec(),
            reported: self.reported.clone(),
            params: self
                .params
                .iter_with_form()
                .map(|(name, value, sql)| (name.to_owned(), value.to_owned(), sql))
                .collect(),
            statements: self.statements.names().map(str::to_owned).collect(),
            holds_client_state: self.state.holds_client_state(),
        })
    }

    /// The connection rebuilt around `stream` (already registered with this process's
    /// runtime; for TLS, the record layer continued with the keys that came along). Its prepared statements are known by name only, so each is closed before
    /// a statement of that name is prepared again: the names this process gives may
    /// differ from the old one's.
    pub(crate) fn adopt(stream: ServerStream, addr: Arc<str>, handed: &HandedServer) -> ServerConn {
        let mut params = SessionParams::default();
        for (name, value, sql) in &handed.params {
            if *sql {
                params.set_sql(name, value);
            } else {
                params.set(name, value);
            }
        }
        let mut statements = ServerStatements::default();
        for name in &handed.statements {
            statements.mark_unknown(Arc::from(name.as_str()));
        }
        let mut state = ConnState::default();
        if handed.holds_client_state {
            state.client_state_added();
        }
        ServerConn {
            stream,
            inbuf: BytesMut::with_capacity(8192),
            outbuf: BytesMut::with_capacity(8192),
            expect: ResponseQueue::default(),
            state,
            params,
            statements,
            pool_generation: 0,
            registration: None,
            reported: handed.reported.clone(),
            key: BackendKey {
                process_id: handed.process_id,
                secret: bytes::Bytes::copy_from_slice(&handed.secret),
            },
            addr,
            released_at: Instant::now(),
        }
    }

    /// This connection went to another process with its client: closed here without a
    /// word (a Terminate would end the server session the other process now serves).
    pub(crate) fn give_up_handed_over(&mut self) {
        self.state.abandon();
    }
}
