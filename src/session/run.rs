//! The session loop: wait for the client's next message, answer it locally or borrow a
//! server for it (per transaction, per statement, or once for the whole session),
//! forward until the server is idle again, and give the server back.

use std::sync::Arc;
use std::time::Duration;

use super::carried::Carried;
use super::client::ClientConn;
use super::local::{Answer, LocalState, LocalTx};
use super::login::LoggedIn;
use super::pump::{Pump, PumpExit, PumpMode};
use super::routing;
use super::{ClientSlot, Traffic};
use crate::cancel::{CancelHandle, CancelTarget};
use crate::config::{PoolMode, RoutingTarget, TransactionRouting};
use crate::error::{ClientError, Side, sqlstate};
use crate::pool::Checkout;
use crate::protocol::compose::{self, Severity};
use crate::protocol::{FrontendTag, Header, ProtocolError, TxStatus};
use crate::router::{self, Decision, Reason, Target};
use crate::runtime::{DatabaseEntry, Shared, Snapshot, UserEntry, UserPools};
use crate::upstream::{Expect, ParamDiff, Recipient, SessionParams};

/// How long pgrelay waits for ROLLBACK or the reset query before closing the server.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(5);

/// Client input pgrelay buffers while the client waits for a server.
const WAITING_INPUT_LIMIT: usize = 1 << 20;

/// Why a session ended.
#[derive(Debug)]
enum End {
    /// The client closed the connection or sent Terminate.
    ClientLeft,
    /// The client broke the protocol.
    ClientBroke(ClientError),
    IdleTimeout(Duration),
    /// pgrelay is shutting down and the client is outside a transaction.
    Shutdown,
    /// Session mode: the client's server failed, and its session state with it.
    ServerLost(ClientError),
}

pub(crate) struct Session {
    #[allow(dead_code)]
    shared: Arc<Shared>,
    database: Arc<DatabaseEntry>,
    user: Arc<UserEntry>,
    pools: Arc<UserPools>,
    cancel: CancelHandle,
    _slot: ClientSlot,
    /// Settings and prepared statements carried from server to server.
    carried: Carried,
    local: LocalState,
    /// The server kept between messages: for the whole session in session mode, or
    /// while the client is pinned.
    server: Option<Checkout>,
    /// The attached server is a replica.
    on_replica: bool,
    traffic: Traffic,
    idle_timeout: Option<Duration>,
    shutting_down: tokio::sync::watch::Receiver<bool>,
}

impl Session {
    pub(super) fn new(
        shared: Arc<Shared>,
        snapshot: &Snapshot,
        logged_in: LoggedIn,
        cancel: CancelHandle,
        slot: ClientSlot,
    ) -> Session {
        let pools = logged_in.database.pools(&logged_in.user);
        Session {
            shutting_down: shared.shutting_down(),
            shared,
            idle_timeout: snapshot.client_limits.idle_timeout,
            database: logged_in.database,
            user: logged_in.user,
            pools,
            cancel,
            _slot: slot,
            carried: Carried {
                startup: logged_in.wanted.clone(),
                wanted: logged_in.wanted,
                ..Carried::default()
            },
            on_replica: false,
            local: LocalState::new(),
            server: None,
            traffic: Traffic::default(),
        }
    }

    pub(super) async fn run(mut self, mut client: ClientConn) {
        let end = self.serve(&mut client).await;
        let farewell = match &end {
            End::ClientLeft => None,
            End::ClientBroke(error) | End::ServerLost(error) => Some(error.clone()),
            End::Shutdown => Some(ClientError::new(
                Side::Pgrelay,
                sqlstate::ADMIN_SHUTDOWN,
                "terminating connection because pgrelay is shutting down",
            )),
            End::IdleTimeout(limit) => Some(ClientError::new(
                Side::Pgrelay,
                "57P05",
                format!(
                    "terminating connection due to client_idle_timeout ({})",
                    crate::config::format_limit(Some(*limit))
                ),
            )),
        };
        if let Some(error) = &farewell {
            compose::error(&mut client.outbuf, Severity::Fatal, &error.sqlstate, &error.message);
        }
        let _ = tokio::time::timeout(super::FAREWELL_TIMEOUT, client.flush()).await;
        if let Some(server) = self.server.take() {
            self.clean_up(server).await;
        }
        tracing::info!(
            client = %client.peer,
            database = %self.database.name,
            user = %self.user.name,
            reason = ?farewell.map(|error| error.message),
            "client disconnected"
        );
    }

    async fn serve(&mut self, client: &mut ClientConn) -> End {
        loop {
            if client.flush().await.is_err() {
                return End::ClientLeft;
            }
            if self.server.is_none() {
                client.release_buffers();
            }
            let tag = match self.next_message(client).await {
                Ok(tag) => tag,
                Err(end) => return end,
            };
            if self.server.is_none() {
                let defer_begin = (self.database.routing.transactions == TransactionRouting::FirstStatement
                    && self.database.mode() == PoolMode::Transaction)
                    .then_some(&self.database.classifier);
                match self
                    .local
                    .answer(tag, &mut client.inbuf, &mut client.outbuf, defer_begin)
                {
                    Answer::Answered => continue,
                    Answer::Terminate => return End::ClientLeft,
                    Answer::Broke(error) => return End::ClientBroke(error),
                    Answer::NeedsServer => {}
                }
                match self.acquire(client, tag).await {
                    Ok(server) => self.server = Some(server),
                    Err(Some(end)) => return end,
                    Err(None) => continue,
                }
            }
            let Some(mut server) = self.server.take() else { continue };
            self.prepare(&mut server);
            let mode = PumpMode {
                statement_mode: self.database.mode() == PoolMode::Statement,
                manage_statements: self.database.mode() != PoolMode::Session,
                max_prepared_statements: self.database.pool.max_prepared_statements,
                single_unit: self.on_replica && self.database.mode() != PoolMode::Session,
            };
            let classifier = &self.database.classifier;
            let exit = Pump::new(
                client,
                &mut server,
                &mut self.carried,
                &mut self.traffic,
                mode,
                classifier,
            )
            .run()
            .await;
            if let Some(end) = self.after_pump(client, server, exit).await {
                return end;
            }
        }
    }

    /// Waits until the input holds a whole message (or, with a server attached, the
    /// start of one: the forwarding loop streams the rest) and returns its type.
    async fn next_message(&mut self, client: &mut ClientConn) -> Result<FrontendTag, End> {
        loop {
            match Header::peek(&client.inbuf) {
                Err(error) => return Err(End::ClientBroke(ClientError::protocol_violation(error.to_string()))),
                Ok(Some(header)) => {
                    if header.len > client.max_message {
                        let error = ProtocolError::TooLarge {
                            tag: header.tag,
                            len: header.len,
                            limit: client.max_message,
                        };
                        return Err(End::ClientBroke(ClientError::protocol_violation(format!(
                            "{error} (max_message_size)"
                        ))));
                    }
                    let Some(tag) = FrontendTag::from_byte(header.tag) else {
                        let error = ProtocolError::UnexpectedTag(header.tag);
                        return Err(End::ClientBroke(ClientError::protocol_violation(error.to_string())));
                    };
                    if client.inbuf.len() >= header.len || self.server.is_some() {
                        return Ok(tag);
                    }
                }
                Ok(None) => {}
            }
            if client.inbuf.is_empty() {
                self.wait_readable(client).await?;
            }
            match client.read_more().await {
                Ok(0) | Err(_) => return Err(End::ClientLeft),
                Ok(_) => {}
            }
        }
    }

    /// Waits, holding no buffer, until the client sends something; ends the session on
    /// client_idle_timeout or when pgrelay shuts down.
    async fn wait_readable(&mut self, client: &ClientConn) -> Result<(), End> {
        let idle_limit = async {
            match self.idle_timeout {
                Some(limit) => {
                    tokio::time::sleep(limit).await;
                    limit
                }
                None => std::future::pending().await,
            }
        };
        let shutting_down = self.shutting_down.wait_for(|stopping| *stopping);
        tokio::select! {
            readable = client.stream.readable() => readable.map_err(|_| End::ClientLeft),
            limit = idle_limit => Err(End::IdleTimeout(limit)),
            _ = shutting_down => Err(End::Shutdown),
        }
    }

    /// Waits for a server for the message at the front of the input. On failure the
    /// client has been told (`Err(None)`) or is gone (`Err(Some(_))`).
    async fn acquire(&mut self, client: &mut ClientConn, tag: FrontendTag) -> Result<Checkout, Option<End>> {
        let decision = self.route(client);
        let database = self.database.clone();
        let pools = self.pools.clone();
        let checkout = async move {
            let (checkout, target) = routing::checkout_for(decision, &database, &pools).await?;
            Ok::<_, crate::pool::PoolError>((checkout, target))
        };
        tokio::pin!(checkout);
        loop {
            tokio::select! {
                result = &mut checkout => {
                    return result.map(|(checkout, target)| {
                        self.on_replica = target == Target::Replica;
                        checkout
                    }).map_err(|error| {
                        let error = ClientError::from_pool(&error, &self.database.name);
                        tracing::warn!(client = %client.peer, database = %self.database.name, user = %self.user.name,
                            sqlstate = %error.sqlstate, error = %error.message, "no server for client");
                        self.local.fail_first(tag, &mut client.inbuf, &mut client.outbuf, &error);
                        None
                    });
                }
                () = self.cancel.cancelled_while_waiting() => {
                    let error = ClientError::new(Side::Client, sqlstate::QUERY_CANCELED, "canceling statement due to user request");
                    self.local.fail_first(tag, &mut client.inbuf, &mut client.outbuf, &error);
                    return Err(None);
                }
                read = client.read_more(), if client.inbuf.len() < WAITING_INPUT_LIMIT => {
                    // The client may pipeline more; end of stream means it gave up.
                    if !matches!(read, Ok(n) if n > 0) {
                        return Err(Some(End::ClientLeft));
                    }
                }
            }
        }
    }

    /// Where the batch at the front of the input goes.
    fn route(&self, client: &ClientConn) -> Decision {
        let routing = &self.database.routing;
        if self.database.mode() == PoolMode::Session {
            // The whole session runs on one server.
            let target = if routing.target == RoutingTarget::Replica {
                Target::Replica
            } else {
                Target::Primary
            };
            let reason = if target == Target::Replica {
                Reason::Read
            } else {
                Reason::Write
            };
            return Decision { target, reason };
        }
        let batch = routing::plan_batch(
            &client.inbuf,
            &self.carried.statements,
            &self.database.classifier,
            &self.local.tx,
        );
        router::decide(&batch, routing, self.database.replica_usable())
    }

    /// Brings the server's settings in line with the client's, sends a held-back BEGIN,
    /// and points the client's cancel key at the server.
    fn prepare(&mut self, server: &mut Checkout) {
        if let Some(diff) = ParamDiff::between(&self.carried.wanted, &server.params)
            && postgres_protocol::message::frontend::query(&diff.sql, &mut server.outbuf).is_ok()
        {
            server.expect.push(Expect::ResultsUntilReady, Recipient::Pgrelay);
            server.params = self.carried.wanted.clone();
        }
        if let LocalTx::DeferredBegin { sql } = &self.local.tx
            && postgres_protocol::message::frontend::query(sql, &mut server.outbuf).is_ok()
        {
            server.expect.push(Expect::ResultsUntilReady, Recipient::Pgrelay);
            self.local.tx = LocalTx::Idle;
        }
        self.cancel.attach(CancelTarget {
            addr: server.addr.clone(),
            key: server.key().clone(),
        });
    }

    async fn after_pump(&mut self, client: &mut ClientConn, mut server: Checkout, exit: PumpExit) -> Option<End> {
        match exit {
            PumpExit::ServerIdle => {
                if self.database.mode() == PoolMode::Session || self.carried.pins.is_pinned() {
                    self.server = Some(server);
                } else {
                    self.cancel.detach().await;
                    drop(server);
                }
                None
            }
            PumpExit::TransactionInStatementMode => {
                let owed = server.expect.readies_owed_to_client();
                self.cancel.detach().await;
                server.discard();
                let error = ClientError::new(
                    Side::Client,
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    "transaction blocks are not allowed in statement pooling mode",
                );
                for _ in 0..=owed {
                    compose::error(&mut client.outbuf, Severity::Error, &error.sqlstate, &error.message);
                    compose::ready_for_query(&mut client.outbuf, TxStatus::Idle);
                }
                None
            }
            PumpExit::ClientGone => {
                self.server = Some(server);
                Some(End::ClientLeft)
            }
            PumpExit::ClientBroke(error) => {
                self.server = Some(server);
                Some(End::ClientBroke(ClientError::protocol_violation(error.to_string())))
            }
            PumpExit::ServerFailed(failure) => {
                let in_transaction = server.status() != TxStatus::Idle;
                let owed = server.expect.readies_owed_to_client();
                self.cancel.detach().await;
                server.mark_broken();
                server.discard();
                let error = ClientError::from_upstream(&failure, &self.database.name);
                tracing::warn!(client = %client.peer, database = %self.database.name, user = %self.user.name,
                    error = %failure, "server failed during a session");
                if self.database.mode() == PoolMode::Session {
                    return Some(End::ServerLost(error));
                }
                let status = if in_transaction {
                    TxStatus::Failed
                } else {
                    TxStatus::Idle
                };
                for _ in 0..owed {
                    compose::error(&mut client.outbuf, Severity::Error, &error.sqlstate, &error.message);
                    compose::ready_for_query(&mut client.outbuf, status);
                }
                if in_transaction {
                    self.local.tx = LocalTx::Aborted {
                        failure: error,
                        reported: owed > 0,
                    };
                }
                None
            }
        }
    }

    /// Makes a server safe for the next client after this one left, or closes it.
    async fn clean_up(&mut self, mut server: Checkout) {
        self.cancel.detach().await;
        let mid_statement = !server.expect.is_empty()
            || !server.outbuf.is_empty()
            || server.copy_in
            || server.passthrough > 0
            || server.unsynced;
        if server.is_broken() || mid_statement {
            // Closing is the only sure way to stop what a departed client started.
            server.discard();
            return;
        }
        if server.status() != TxStatus::Idle && !self.run_cleanup_query(&mut server, "ROLLBACK").await {
            server.discard();
            return;
        }
        if self.database.mode() == PoolMode::Session
            && let Some(reset) = self.database.pool.server_reset_query.clone()
        {
            if !self.run_cleanup_query(&mut server, &reset).await {
                server.discard();
                return;
            }
            server.params = SessionParams::default();
        }
        drop(server);
    }

    async fn run_cleanup_query(&self, server: &mut Checkout, sql: &str) -> bool {
        match tokio::time::timeout(CLEANUP_TIMEOUT, server.run_own_query(sql)).await {
            Ok(Ok(outcome)) if outcome.errors.is_empty() && server.status() == TxStatus::Idle => true,
            Ok(Ok(outcome)) => {
                tracing::warn!(database = %self.database.name, query = sql, errors = ?outcome.errors, "cleanup query failed");
                false
            }
            Ok(Err(error)) => {
                tracing::warn!(database = %self.database.name, query = sql, %error, "cleanup query failed");
                false
            }
            Err(_) => false,
        }
    }
}
