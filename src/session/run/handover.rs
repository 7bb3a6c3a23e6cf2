//! Handing an idle client to the process that took this one over (`crate::takeover`): which
//! clients can go (plain TCP or TLS 1.3, or TLS 1.2 to a process that continues it; between
//! transactions, no pending input; in
//! transaction or statement mode with no server, or, in session mode or pinned, with its
//! server connection when that is quiet too, plain TCP or TLS to a process that continues
//! it, its traffic keys going along), the description of its session
//! that goes with its socket, and the session rebuilt from it on the other side. A fan-out
//! listener's channels go with it, cut between the processes at a marker (`listener`).

mod kept;

use super::Session;
use super::handover_secrets::ServerSecrets;
use crate::metrics::TakeoverResult;
use crate::net::ClientConn;
use crate::net::record::{RecordState, Version};
use crate::protocol::views::ParseView;
use crate::route::ClientEncoding;
use crate::session::carried::Pins;
pub(crate) use kept::KeptServer;

mod listener;

pub(in crate::session) use listener::arrive;

/// Marks a description, and its layout: a process that writes another one is refused.
const MAGIC: &[u8] = b"pgrelay-client/2";
/// Tag the optional sections after the fixed fields, each present at most once: the server
/// connection that travels with the client, a TLS client's record layer, and the record
/// layer of that server connection when it is TLS (only with a server section, and only to
/// a process that said `server_tls`: an earlier one refuses a section it does not know).
const SECTION_SERVER: u8 = 1;
const SECTION_TLS: u8 = b'T';
const SECTION_SERVER_TLS: u8 = b'S';

/// A client's session as it travels from one process to the other.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Description {
    pub database: String,
    pub user: String,
    pub process_id: u32,
    pub secret: u32,
    /// The client_encoding it was greeted with (when its settings name none).
    pub encoding: Option<String>,
    /// Its startup settings and its current ones: (name, value, given as SQL text).
    pub startup: Vec<(String, String, bool)>,
    pub wanted: Vec<(String, String, bool)>,
    /// Its prepared statements: (name, query, parameter types as sent).
    pub statements: Vec<(Vec<u8>, Vec<u8>, Vec<u8>)>,
    pub write_fence: Option<u64>,
    pub fence_lost: bool,
    /// Its user was found through auth_query (not in `[[users]]`): the new process places it
    /// with its own lookup's entry for that name, without asking the query again.
    pub found_by_query: bool,
    /// What the new process needs to open server connections for the user when no password
    /// is configured for it (pass-through).
    pub secrets: ServerSecrets,
    /// listen_notify = "fanout": the channels it listens to, and the token of the marker
    /// that cuts its notifications between the processes.
    pub channels: Vec<String>,
    pub marker: String,
    /// The server connection whose socket travels with the client's, and what pins the
    /// client to it (an optional section at the end).
    pub server: Option<KeptServer>,
    /// A TLS client's record layer (its traffic keys and sequence numbers); `None` for
    /// plain TCP. An optional section at the end: a process that does not know it refuses
    /// the description, and the client is disconnected there.
    pub tls: Option<RecordState>,
    /// The record layer of the server connection that travels with the client, when that
    /// is TLS; `None` for plain TCP or no server.
    pub server_tls: Option<RecordState>,
}

impl Description {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        let bytes = |out: &mut Vec<u8>, value: &[u8]| {
            out.extend_from_slice(&u32::try_from(value.len()).unwrap_or(u32::MAX).to_be_bytes());
            out.extend_from_slice(value);
        };
        bytes(&mut out, self.database.as_bytes());
        bytes(&mut out, self.user.as_bytes());
        out.extend_from_slice(&self.process_id.to_be_bytes());
        out.extend_from_slice(&self.secret.to_be_bytes());
        bytes(&mut out, self.encoding.as_deref().unwrap_or("").as_bytes());
        for params in [&self.startup, &self.wanted] {
            out.extend_from_slice(&u32::try_from(params.len()).unwrap_or(u32::MAX).to_be_bytes());
            for (name, value, sql) in params {
                bytes(&mut out, name.as_bytes());
                bytes(&mut out, value.as_bytes());
                out.push(u8::from(*sql));
            }
        }
        out.extend_from_slice(&u32::try_from(self.statements.len()).unwrap_or(u32::MAX).to_be_bytes());
        for (name, query, types) in &self.statements {
            bytes(&mut out, name);
            bytes(&mut out, query);
            bytes(&mut out, types);
        }
        out.push(u8::from(self.write_fence.is_some()));
        out.extend_from_slice(&self.write_fence.unwrap_or(0).to_be_bytes());
        out.push(u8::from(self.fence_lost));
        out.push(u8::from(self.found_by_query));
        self.secrets.encode(&mut out);
        out.extend_from_slice(&u32::try_from(self.channels.len()).unwrap_or(u32::MAX).to_be_bytes());
        for channel in &self.channels {
            bytes(&mut out, channel.as_bytes());
        }
        bytes(&mut out, self.marker.as_bytes());
        if let Some(server) = &self.server {
            out.push(SECTION_SERVER);
            server.encode(&mut out);
        }
        if let Some(tls) = &self.tls {
            out.push(SECTION_TLS);
            tls.encode(&mut out);
        }
        if let Some(tls) = &self.server_tls {
            out.push(SECTION_SERVER_TLS);
            tls.encode(&mut out);
        }
        out
    }

    /// `None` for anything but a whole description of this layout.
    pub fn decode(input: &[u8]) -> Option<Description> {
        let mut reader = Reader(input.strip_prefix(MAGIC)?);
        let database = reader.string()?;
        let user = reader.string()?;
        let process_id = reader.u32()?;
        let secret = reader.u32()?;
        let encoding = Some(reader.string()?).filter(|name| !name.is_empty());
        let mut params = || -> Option<Vec<(String, String, bool)>> {
            let count = reader.u32()?;
            let mut list = Vec::new();
            for _ in 0..count {
                list.push((reader.string()?, reader.string()?, reader.byte()? != 0));
            }
            Some(list)
        };
        let startup = params()?;
        let wanted = params()?;
        let count = reader.u32()?;
        let mut statements = Vec::new();
        for _ in 0..count {
            statements.push((
                reader.bytes()?.to_vec(),
                reader.bytes()?.to_vec(),
                reader.bytes()?.to_vec(),
            ));
        }
        let has_fence = reader.byte()? != 0;
        let fence = reader.u64()?;
        let fence_lost = reader.byte()? != 0;
        let found_by_query = reader.byte()? != 0;
        let secrets = ServerSecrets::decode(&mut reader)?;
        let mut channels = Vec::new();
        for _ in 0..reader.u32()? {
            channels.push(reader.string()?);
        }
        let marker = reader.string()?;
        // A marker cuts a listener's notifications: none without channels.
        if channels.is_empty() && !marker.is_empty() {
            return None;
        }
        let (mut server, mut tls, mut server_tls) = (None, None, None);
        while let Some(tag) = reader.byte() {
            match tag {
                SECTION_SERVER if server.is_none() => server = Some(KeptServer::decode(&mut reader)?),
                SECTION_TLS if tls.is_none() => tls = Some(reader.record_state()?),
                SECTION_SERVER_TLS if server_tls.is_none() => server_tls = Some(reader.record_state()?),
                _ => return None,
            }
        }
        // A server connection's TLS state without the connection.
        if server_tls.is_some() && server.is_none() {
            return None;
        }
        Some(Description {
            database,
            user,
            process_id,
            secret,
            encoding,
            startup,
            wanted,
            statements,
            write_fence: has_fence.then_some(fence),
            fence_lost,
            found_by_query,
            secrets,
            channels,
            marker,
            server,
            tls,
            server_tls,
        })
    }
}

/// Counts the client of a process that was taken over as kept once its session ends here,
/// however it ends (served to the end, the client leaving during the drain, cut at
/// shutdown_timeout), unless it was handed over: each client once.
pub(super) struct KeptCount {
    shared: std::sync::Arc<crate::runtime::Shared>,
    pub moved: bool,
}

impl KeptCount {
    pub fn new(shared: std::sync::Arc<crate::runtime::Shared>) -> KeptCount {
        KeptCount { shared, moved: false }
    }
}

impl Drop for KeptCount {
    fn drop(&mut self) {
        if !self.moved && self.shared.client_handover.started() {
            self.shared.metrics.takeover_clients(TakeoverResult::Kept, 1);
        }
    }
}

pub(super) struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    pub(super) fn take(&mut self, length: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(length)?;
        self.0 = rest;
        Some(head)
    }

    pub(super) fn byte(&mut self) -> Option<u8> {
        self.take(1).map(|bytes| bytes[0])
    }

    pub(super) fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let length = usize::try_from(self.u32()?).ok()?;
        self.take(length)
    }

    pub(super) fn string(&mut self) -> Option<String> {
        String::from_utf8(self.bytes()?.to_vec()).ok()
    }

    fn record_state(&mut self) -> Option<RecordState> {
        let (state, rest) = RecordState::decode(self.0)?;
        self.0 = rest;
        Some(state)
    }
}

impl Description {
    /// Its user in this process's configuration: from `[[users]]`, or, for a user the old
    /// process found through auth_query, this process's lookup for the database (no login).
    pub fn user_entry(&self, snapshot: &crate::runtime::Snapshot) -> Option<std::sync::Arc<crate::runtime::UserEntry>> {
        snapshot.user(&self.user).or_else(|| {
            self.found_by_query
                .then(|| snapshot.auth_lookup(&self.database))
                .flatten()
                .map(|(lookup, _)| lookup.handed_over(&self.user))
        })
    }
}

impl Session {
    /// Hands the client (and its server connection, TLS keys, listener channels) to the
    /// new process if it can go now; `true` once it went, and this session must end without
    /// a word to it.
    pub(super) async fn hand_over(&mut self, client: &mut ClientConn) -> bool {
        let Some(mut description) = self.handover_description(client) else {
            return false;
        };
        // Settling a listener writes to the client: its TLS layer must still be quiet after.
        if !self.settle_listener(client, &mut description).await
            || !client.stream.can_move()
            || self.server.as_deref().is_some_and(|server| !server.stream.can_move())
        {
            return false;
        }
        // A TLS client goes with its traffic keys: rustls is taken apart here, and should the
        // handover fail the connection goes on (to its farewell) through the same record
        // layer the new process would have used.
        if let Err(error) = client.stream.leave_rustls() {
            tracing::warn!(client = %client.peer, %error, "cannot take a TLS connection apart for the new process");
            return false;
        }
        // Its TLS server connection likewise; should that fail, the connection is lost and
        // the client stays, to be told at the end of the drain as any client that stays.
        if let Some(server) = self.server.as_deref_mut()
            && let Err(error) = server.stream.leave_rustls()
        {
            server.state.server_lost();
            tracing::warn!(client = %client.peer, %error, "cannot take a TLS server connection apart for the new process");
            return false;
        }
        // rustls changes keys on its own before their record limit; the record layer that
        // goes on cannot. Keys past half their limit stay here (on the record layer, as the
        // keys of a connection the new process would have run) rather than move and fail
        // in the middle of the client's work soon after.
        if client.stream.half_spent() || self.server.as_deref().is_some_and(|server| server.stream.half_spent()) {
            tracing::info!(client = %client.peer, "a TLS connection's keys are past half their record limit: the client stays");
            return false;
        }
        let Some((socket, tls)) = client.stream.handover() else {
            return false;
        };
        description.tls = tls;
        let server = match self.server.as_deref().map(|server| server.stream.handover()) {
            None => None,
            Some(None) => return false,
            Some(Some((socket, tls))) => {
                description.server_tls = tls;
                Some(socket)
            }
        };
        if !self
            .shared
            .client_handover
            .send(socket, server, &description.encode())
            .await
        {
            return false;
        }
        // From here only the new process writes to this connection: a record stream is
        // dropped without a close_notify, whose sequence number the new process will use.
        self.kept.moved = true;
        self.shared.metrics.takeover_clients(TakeoverResult::HandedOver, 1);
        // Given up before anything is awaited: should this task be dropped in an await, the
        // connection must not send its Terminate on a socket the new process now serves.
        if let Some(server) = self.server.take() {
            server.hand_off();
            self.cancel.detach().await;
        }
        tracing::info!(client = %client.peer, database = %self.database.name, user = %self.user.name,
            with_server = description.server.is_some(), tls = description.tls.is_some(),
            server_tls = description.server_tls.is_some(), "client handed over to the new process");
        true
    }

    /// The description of this session if its client can be handed over now, `None` if it
    /// must finish here.
    pub(super) fn handover_description(&self, client: &ClientConn) -> Option<Description> {
        // A client with no server carries no server state (a pinned one always has its
        // server); one with a server (session mode, pinned) takes it along, quiet (a TLS
        // one with nothing buffered in its TLS layer), or stays.
        let server = match self.server.as_deref() {
            None => None,
            // A TLS one goes only to a process that continues it.
            Some(server) if server.stream.is_tls() && !self.shared.client_handover.continues_server_tls() => {
                return None;
            }
            Some(server) => Some(server.handed_over(self.on_replica)?),
        };
        // Plain TCP, or TLS with nothing buffered inside the TLS layer; TLS 1.2 only to a
        // process that continues it.
        let movable = client.stream.can_move()
            && (client.stream.tls_version() != Some(Version::Tls12)
                || self.shared.client_handover.continues_tls12())
            && (server.is_some() || !self.carried.pins.is_pinned())
            && client.inbuf.is_empty()
            && client.outbuf.is_empty()
            && self.local.tx == super::LocalTx::Idle
            && !self.local.skipping_to_sync
            // A fan-out listener moves with its channels to a process that can take
            // them, once its LISTEN changes are all settled (and without a server
            // connection: the two moves are not combined).
            && (self.carried.fanout_channels.is_empty()
                || (server.is_none() && self.shared.client_handover.moves_listeners()))
            // Listening exactly while it has channels: its hub knows them all.
            && self.subscription.is_some() != self.carried.fanout_channels.is_empty()
            && !self.carried.fanout_dirty
            && self.subscription.as_ref().is_none_or(|subscription| !subscription.inbox().overflowed())
            && !self.carried.listen_tx.holds_anything()
            && !self.deferred_begin_sent;
        if !movable {
            return None;
        }
        let params = |params: &crate::upstream::SessionParams| {
            params
                .iter_with_form()
                .map(|(name, value, sql)| (name.to_owned(), value.to_owned(), sql))
                .collect()
        };
        Some(Description {
            database: self.database.name.to_string(),
            user: self.user.name.to_string(),
            process_id: self.cancel.process_id(),
            secret: self.cancel.secret(),
            encoding: self.carried.default_encoding.name.map(str::to_owned),
            startup: params(&self.carried.startup),
            wanted: params(&self.carried.wanted),
            statements: self
                .carried
                .statements
                .definitions()
                .map(|(name, parse)| (name.to_vec(), parse.query.to_vec(), parse.param_types.to_vec()))
                .collect(),
            write_fence: self.carried.write_fence.map(|lsn| lsn.0),
            fence_lost: self.carried.fence_lost,
            found_by_query: matches!(self.user.auth, crate::runtime::ClientAuth::Query),
            secrets: ServerSecrets::of(&self.user.server_credentials),
            channels: self.carried.fanout_channels.iter().cloned().collect(),
            marker: String::new(),
            server: server.map(|conn| KeptServer {
                conn,
                pins: self.carried.pins.export(),
            }),
            // Filled in once the streams are taken apart for the handover.
            tls: None,
            server_tls: None,
        })
    }

    /// Gives a handed-over client the server connection that came with it, as it had it:
    /// pinned for the same reasons, its cancels going to that server.
    pub(crate) fn restore_server(&mut self, server: crate::pool::Checkout, kept: &KeptServer) {
        self.carried.pins = Pins::import(&kept.pins);
        self.sync_pins();
        self.on_replica = kept.conn.replica;
        self.cancel.attach(crate::cancel::CancelTarget {
            addr: server.addr.clone(),
            key: server.key().clone(),
        });
        self.set_state(crate::metrics::ClientState::Active);
        self.server = Some(server);
    }

    /// Puts a handed-over client's settings and prepared statements into this session.
    pub(crate) fn restore(&mut self, description: &Description) {
        let params = |list: &[(String, String, bool)]| {
            let mut params = crate::upstream::SessionParams::default();
            for (name, value, sql) in list {
                if *sql {
                    params.set_sql(name, value);
                } else {
                    params.set(name, value);
                }
            }
            params
        };
        self.carried.startup = params(&description.startup);
        self.carried.wanted = params(&description.wanted);
        if let Some(name) = &description.encoding {
            self.carried.default_encoding = ClientEncoding::named(name);
        }
        self.carried.write_fence = description.write_fence.map(crate::cluster::Lsn);
        self.carried.fence_lost = description.fence_lost;
        let encoding = self.carried.client_encoding();
        let epoch = self.database.schema.epoch();
        for (name, query, types) in &description.statements {
            let parse = ParseView {
                name,
                query,
                param_types: types,
            };
            let search_path = self.carried.wanted.get("search_path").map(str::to_owned);
            self.carried.statements.define(
                &parse,
                &self.database.classifier,
                search_path.as_deref(),
                encoding,
                epoch,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::PinReason;
    use crate::session::carried::PinList;
    use crate::upstream::HandedServer;

    #[test]
    fn a_description_round_trips_and_a_damaged_one_is_refused() {
        let description = Description {
            database: "app".to_owned(),
            user: "app".to_owned(),
            process_id: 7 << 23 | 12345,
            secret: 0xdead_beef,
            encoding: Some("UTF8".to_owned()),
            startup: vec![("application_name".to_owned(), "x".to_owned(), false)],
            wanted: vec![("statement_timeout".to_owned(), "'5s'".to_owned(), true)],
            statements: vec![(b"s1".to_vec(), b"SELECT $1".to_vec(), vec![0, 1, 0, 0, 0, 23])],
            write_fence: Some(42),
            fence_lost: false,
            found_by_query: true,
            secrets: ServerSecrets(vec![
                crate::upstream::PassThrough::Scram {
                    verifier: crate::auth::ScramVerifier::from_password("pw", b"salt", 4096),
                    client_key: [7; crate::auth::SCRAM_KEY_LEN],
                },
                crate::upstream::PassThrough::Md5([9; 16]),
            ]),
            channels: Vec::new(),
            marker: String::new(),
            server: None,
            tls: None,
            server_tls: None,
        };
        let encoded = description.encode();
        assert!(!format!("{description:?}").contains("[7"), "keys are not shown");
        let listening = Description {
            channels: vec!["orders".to_owned(), "Mixed Case".to_owned()],
            marker: "0123abcd".to_owned(),
            ..Description::default()
        };
        assert_eq!(Description::decode(&listening.encode()), Some(listening));
        assert_eq!(Description::decode(&encoded), Some(description));
        assert_eq!(Description::decode(&encoded[..encoded.len() - 1]), None);
        let mut longer = encoded.clone();
        longer.push(0);
        assert_eq!(Description::decode(&longer), None);
        assert_eq!(Description::decode(b"pgrelay-client/2"), None);
        // The layout before the user's secrets travelled is refused whole.
    }

    #[test]
    fn a_server_section_round_trips() {
        let description = Description {
            database: "app".to_owned(),
            user: "app".to_owned(),
            server: Some(KeptServer {
                conn: HandedServer {
                    addr: "127.0.0.1:5432".to_owned(),
                    replica: true,
                    process_id: 4242,
                    secret: vec![1, 2, 3, 4],
                    reported: vec![("server_version".to_owned(), "15.4".to_owned())],
                    params: vec![("application_name".to_owned(), "'x'".to_owned(), true)],
                    statements: vec!["pgrelay_1".to_owned()],
                    holds_client_state: true,
                },
                pins: PinList {
                    reasons: vec![PinReason::AdvisoryLock, PinReason::UntrackableSet],
                    listening: vec!["jobs".to_owned()],
                    hold_cursors: vec!["c".to_owned()],
                    sql_prepared: vec!["p".to_owned()],
                },
            }),
            ..Description::default()
        };
        let encoded = description.encode();
        assert_eq!(Description::decode(&encoded), Some(description));
        assert_eq!(Description::decode(&encoded[..encoded.len() - 1]), None);
    }

    #[test]
    fn a_tls_server_connection_carries_its_record_state_and_needs_its_server() {
        use crate::net::record::{Secrets, Suite};
        let state = RecordState {
            version: Version::Tls13,
            suite: Suite::Chacha20Poly1305,
            tx: Secrets {
                key: vec![5; 32],
                iv: [6; 12],
                seq: 3,
            },
            rx: Secrets {
                key: vec![7; 32],
                iv: [8; 12],
                seq: 9,
            },
        };
        let description = Description {
            database: "app".to_owned(),
            user: "app".to_owned(),
            server: Some(KeptServer::default()),
            server_tls: Some(state.clone()),
            ..Description::default()
        };
        let encoded = description.encode();
        assert_eq!(Description::decode(&encoded), Some(description));
        // Without its server section, the state alone is refused.
        let alone = Description {
            server_tls: Some(state),
            ..Description::default()
        };
        assert_eq!(Description::decode(&alone.encode()), None);
    }

    #[test]
    fn a_tls_client_description_carries_its_record_state() {
        use crate::net::record::{Secrets, Suite};
        let description = Description {
            database: "app".to_owned(),
            user: "app".to_owned(),
            tls: Some(RecordState {
                version: Version::Tls12,
                suite: Suite::Aes256Gcm,
                tx: Secrets {
                    key: vec![1; 32],
                    iv: [2; 12],
                    seq: 7,
                },
                rx: Secrets {
                    key: vec![3; 32],
                    iv: [4; 12],
                    seq: 1 << 40,
                },
            }),
            ..Description::default()
        };
        let encoded = description.encode();
        assert_eq!(Description::decode(&encoded), Some(description));
        for cut in 1..60 {
            assert_eq!(Description::decode(&encoded[..encoded.len() - cut]), None, "{cut}");
        }
        // Twice the same section, or one of another kind, is refused.
        let plain = Description {
            tls: None,
            ..Description::decode(&encoded).unwrap()
        }
        .encode();
        let section = &encoded[plain.len()..];
        assert_eq!(Description::decode(&[encoded.as_slice(), section].concat()), None);
        assert_eq!(Description::decode(&[plain.as_slice(), b"X"].concat()), None);
        // A key of the wrong length for the suite is refused.
        let mut damaged = encoded.clone();
        damaged[plain.len() + 1] = 1;
        assert_eq!(Description::decode(&damaged), None);
    }
}
