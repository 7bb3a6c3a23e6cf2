//! The session loop: wait for the client's next message, answer it locally or borrow a
//! server for it (per transaction, per statement, or once for the whole session),
//! forward until the server is idle again, and give the server back.

pub(crate) mod handover;
mod handover_secrets;
mod listen;
mod wait;

use std::sync::Arc;
use std::time::Duration;

use super::ClientSlot;
use super::carried::Carried;
use super::local::{Answer, LocalState, LocalTx};
use super::login::LoggedIn;
use super::pump::refusal::Refusal;
use super::pump::{Pump, PumpExit, PumpMode};
use super::routing::{self, Placement};
use crate::cancel::{CancelHandle, CancelTarget};
use crate::cluster::Lsn;
use crate::config::Consistency;
use crate::config::{PoolMode, RoutingTarget, TransactionRouting};
use crate::error::{ClientError, Side, sqlstate};
use crate::metrics::{
    ClientState, ClientStateGauge, PinReason as MetricsPin, PinnedGauge, Role, RouteReason, SessionMetrics,
};
use crate::net::ClientConn;
use crate::pool::Checkout;
use crate::protocol::compose::{self, Severity};
use crate::protocol::{FrontendTag, TxStatus};
use crate::registry::{ClientRegistration, LinkState};
use crate::route::PinReason;
use crate::router::{self, Decision, Reason, Target};
use crate::runtime::{ClientAuth, DatabaseEntry, Shared, Snapshot, UserEntry, UserPools};
use crate::upstream::{Expect, ParamDiff, Recipient, SessionParams, UpstreamError};

/// How long pgrelay waits for ROLLBACK or the reset query before closing the server.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs of one read batch, the first included, when its servers keep failing.
const MAX_READ_RUNS: u8 = 3;

/// Client input pgrelay buffers while the client waits for a server.
const WAITING_INPUT_LIMIT: usize = 1 << 20;

/// Where a batch goes: the routing decision, the WAL position a replica must have
/// replayed (if any), and whether the batch may run again elsewhere should its server fail.
type Routed = (Decision, Option<Lsn>, bool);

/// Why a session ended.
#[derive(Debug)]
pub(super) enum End {
    /// The client closed the connection or sent Terminate.
    ClientLeft,
    /// The client broke the protocol.
    ClientBroke(ClientError),
    IdleTimeout(Duration),
    /// idle_transaction_timeout: the client sat inside a transaction too long.
    IdleInTransaction(Duration),
    /// pgrelay is shutting down and the client is outside a transaction.
    Shutdown,
    /// The admin console killed the client's database.
    Killed,
    /// Session mode, or a pinned client: the client's server failed, and its session
    /// state with it.
    ServerLost(ClientError),
    /// The server failed in the middle of a message that was being streamed to the
    /// client: nothing more can be framed, so the connection is closed without a word.
    ServerLostMidMessage,
    /// The client's notification inbox overflowed: it does not read.
    NotificationsOverflowed,
}

pub(crate) struct Session {
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
    metrics: SessionMetrics,
    /// Counts this client in pgrelay_clients{state}.
    client_state: ClientStateGauge,
    /// Counts this client's pins in pgrelay_pinned_sessions.
    pinned: PinnedGauge,
    /// This client in SHOW CLIENTS; KILL reaches the session through it.
    registration: ClientRegistration,
    idle_timeout: Option<Duration>,
    /// client_idle_timeout's timer, made at the first idle wait when the limit is set and
    /// reset for every later one.
    idle_timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    /// `Shared::reloads` when this session last looked for a new snapshot.
    reloads_seen: u64,
    /// Its place in the database's notification hub while it listens to a channel
    /// there (listen_notify = "fanout").
    subscription: Option<Box<crate::notify::Subscription>>,
    /// The batch being served only reads, outside a transaction (set by `route`).
    rerunnable: bool,
    /// Runs of the current read batch after its server failed, and when the first began.
    read_retries: (u8, Option<std::time::Instant>),
    /// The last exchange put its batch back to run it again (a bounded number of times):
    /// it made progress even though the input looks the same.
    rerun_pending: bool,
    /// The batch put back at the front of the input was refused by a replica as a write:
    /// it goes to the primary (`retry_refused_on_primary`).
    refused_rerun: bool,
    /// A held-back BEGIN (transactions = "first_statement") went out with this batch:
    /// the client is in a transaction even before the server has said so.
    deferred_begin_sent: bool,
    /// Counts this client in pgrelay_takeover_clients_total{result="kept"} should it end
    /// here after a takeover.
    kept: handover::KeptCount,
}

impl Session {
    pub(super) fn new(
        shared: Arc<Shared>,
        snapshot: &Snapshot,
        logged_in: LoggedIn,
        peer: std::net::SocketAddr,
        cancel: CancelHandle,
        slot: ClientSlot,
    ) -> Session {
        let pools = logged_in.database.pools(&logged_in.user);
        let metrics = shared.metrics.session(&logged_in.database.name, &logged_in.user.name);
        let registration = shared.registry.add_client(
            peer,
            &logged_in.database.name,
            &logged_in.user.name,
            logged_in.wanted.get("application_name").unwrap_or_default(),
        );
        Session {
            kept: handover::KeptCount::new(shared.clone()),
            idle_timer: None,
            reloads_seen: shared.reloads(),
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
                default_encoding: logged_in.client_encoding,
                ..Carried::default()
            },
            on_replica: false,
            rerunnable: false,
            read_retries: (0, None),
            rerun_pending: false,
            refused_rerun: false,
            deferred_begin_sent: false,
            local: LocalState::new(),
            server: None,
            subscription: None,
            client_state: metrics.client_state(ClientState::Idle),
            registration,
            pinned: metrics.pins(),
            metrics,
        }
    }

    /// Runs the session; boxed so that the task of an idle client stays small.
    pub(super) async fn run(mut self: Box<Self>, client: &mut ClientConn) {
        let end = self.serve(client).await;
        // Taken over: an idle client goes on in the new process, with its session (and
        // its server connection, which then is no longer this process's). Boxed: the
        // handover's futures would otherwise enlarge every idle client's task.
        if matches!(end, End::Shutdown)
            && self.shared.client_handover.is_active()
            && Box::pin(self.hand_over(client)).await
        {
            return;
        }
        let farewell = match &end {
            End::ClientLeft | End::ServerLostMidMessage => None,
            End::ClientBroke(error) | End::ServerLost(error) => Some(error.clone()),
            End::NotificationsOverflowed => Some(listen::overflow_error()),
            End::Killed => Some(ClientError::new(
                Side::Pgrelay,
                sqlstate::ADMIN_SHUTDOWN,
                "terminating connection due to administrator command (KILL)",
            )),
            End::Shutdown => Some(ClientError::new(
                Side::Pgrelay,
                sqlstate::ADMIN_SHUTDOWN,
                "terminating connection because pgrelay is shutting down",
            )),
            End::IdleInTransaction(limit) => Some(ClientError::new(
                Side::Pgrelay,
                "25P03",
                format!(
                    "terminating connection due to idle-in-transaction timeout (idle_transaction_timeout = {})",
                    crate::config::format_limit(Some(*limit))
                ),
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
            self.metrics.client_error(&error.sqlstate);
        }
        let _ = tokio::time::timeout(super::FAREWELL_TIMEOUT, client.flush()).await;
        if let Some(server) = self.server.take() {
            Box::pin(self.clean_up(server)).await;
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
        let registration = self.registration.entry().clone();
        tokio::select! {
            end = self.serve_until_end(client) => end,
            () = registration.killed() => End::Killed,
        }
    }

    async fn serve_until_end(&mut self, client: &mut ClientConn) -> End {
        loop {
            // Every pass of this loop should wait for the client or a server; should one
            // ever not, the task still yields once its budget is spent instead of
            // keeping its worker from every other client.
            tokio::task::coop::consume_budget().await;
            if let Err(end) = self.flush_notifications(client).await {
                return end;
            }
            if self.server.is_none() {
                client.release_buffers();
            }
            let tag = match self.next_message(client).await {
                Ok(tag) => tag,
                Err(end) => return end,
            };
            let input_before = (client.bytes_read, client.inbuf.len());
            // Boxed: serving one batch needs a large future (waiting for a server,
            // forwarding), while an idle session should cost little memory.
            if let Some(end) = Box::pin(self.exchange(client, tag)).await {
                return end;
            }
            // An UNLISTEN or DISCARD ALL that went to a server ended fan-out listening.
            self.sync_channels().await;
            let rerun = std::mem::take(&mut self.rerun_pending);
            if (client.bytes_read, client.inbuf.len()) == input_before && !rerun {
                // Every exchange takes at least the message it was given, or reads more.
                // One that did neither would be served again and again without end.
                tracing::error!(client = %client.peer, database = %self.database.name, user = %self.user.name,
                    message = ?tag, "a client message was neither handled nor kept waiting for input; \
                    ending the session instead of serving it in a loop (a bug in pgrelay)");
                return End::ClientBroke(ClientError::new(
                    Side::Pgrelay,
                    sqlstate::INTERNAL_ERROR,
                    "pgrelay could not handle this message",
                ));
            }
        }
    }

    /// Whether a lone plain BEGIN is held back until the next batch says where the
    /// transaction goes: with `transactions = "first_statement"`, or whenever a replica could
    /// take it, so that `SET TRANSACTION READ ONLY` as its first statement sends it to one
    /// (with `transactions = "primary"` anything else still goes to the primary). Only in
    /// transaction mode: a session-mode client keeps its server anyway.
    fn defers_begin(&self) -> bool {
        let routing = &self.database.routing;
        self.database.mode() == PoolMode::Transaction
            && (routing.transactions == TransactionRouting::FirstStatement
                || (routing.read_write_split && routing.target == RoutingTarget::Auto && self.database.has_replicas()))
    }

    /// Serves the message at the front of the input: answers it, or gets a server and
    /// forwards until the server is idle again. `Some` ends the session.
    async fn exchange(&mut self, client: &mut ClientConn, tag: FrontendTag) -> Option<End> {
        // A copy of a read-only batch, to run it again should its server fail first.
        let mut rerun = None;
        if self.answer_listen(client, tag).await {
            return None;
        }
        if self.server.is_none() {
            let defer_begin = self
                .defers_begin()
                .then_some((&self.database.classifier, self.carried.client_encoding().charset));
            match self
                .local
                .answer(tag, &mut client.inbuf, &mut client.outbuf, defer_begin)
            {
                Answer::Answered => return None,
                Answer::Terminate => return Some(End::ClientLeft),
                Answer::Broke(error) => return Some(End::ClientBroke(error)),
                Answer::NeedsServer => {}
            }
            self.follow_reload();
            match self.acquire_idle(client) {
                Ok(server) => self.server = Some(server),
                // Boxed: waiting for a server is a large future, needed only when no
                // connection is idle; the exchange, boxed for every batch, stays small.
                Err(routed) => match Box::pin(self.acquire(client, tag, routed)).await {
                    Ok(server) => self.server = Some(server),
                    Err(Some(end)) => return Some(end),
                    Err(None) => return None,
                },
            }
            let catch_refusal = self.on_replica && self.database.routing.retry_refused_on_primary;
            if self.rerunnable && (self.database.pool.retry_reads || catch_refusal) && !self.carried.pins.is_pinned() {
                rerun = routing::batch_copy(&client.inbuf);
            }
        }
        let mut server = self.server.take()?;
        self.prepare(&mut server);
        let mode = self.pump_mode();
        // Fences only matter where reads may go to a replica.
        let routing = &self.database.routing;
        let capture_fences = routing.consistency != Consistency::Eventual
            && routing.read_write_split
            && routing.target == RoutingTarget::Auto
            && self.database.mode() != PoolMode::Session
            && self.database.has_replicas()
            && !self.on_replica;
        let classifier = &self.database.classifier;
        let pump = Pump::new(
            client,
            &mut server,
            &mut self.carried,
            &self.metrics,
            mode,
            classifier,
            &self.database.schema,
        );
        let pump = if capture_fences {
            pump.capturing_fences(&self.database.fences, routing.consistency == Consistency::Causal)
        } else {
            pump
        };
        let pump = if rerun.is_some() { pump.rerunnable() } else { pump };
        let pump = if rerun.is_some() && self.on_replica && self.database.routing.retry_refused_on_primary {
            pump.catching_refusals()
        } else {
            pump
        };
        let exit = pump.run().await;
        if matches!(exit, PumpExit::ServerFailed { .. } | PumpExit::ReplicaRefused { .. }) {
            // Whatever LISTEN its transaction made is gone with it.
            self.carried.listen_tx.lost();
        }
        // A commit changed the client's channels: the hub hears of them before the client
        // hears of the commit, so that what is notified after that reaches it.
        if self.carried.fanout_dirty && !self.sync_channels().await {
            listen::warn_unconfirmed(client, &self.database.name);
        }
        let end = self.after_pump(client, server, exit, rerun.as_deref()).await;
        if let Some(mut batch) = rerun {
            batch.clear();
            crate::net::buffers::give_back(&mut batch);
        }
        end
    }

    /// How the pump treats the attached server.
    fn pump_mode(&self) -> PumpMode {
        PumpMode {
            statement_mode: self.database.mode() == PoolMode::Statement,
            manage_statements: self.database.mode() != PoolMode::Session,
            max_prepared_statements: self.database.pool.max_prepared_statements,
            max_client_prepared_statements: self.database.pool.max_client_prepared_statements,
            single_unit: self.on_replica && self.database.mode() != PoolMode::Session,
            role: if self.on_replica { Role::Replica } else { Role::Primary },
            idle_transaction_timeout: self.database.pool.idle_transaction_timeout,
            query_timeout: self.database.pool.query_timeout,
            fanout: self.fans_out(),
        }
    }

    /// The common case of [`Session::acquire`], synchronous: nothing paused, and the
    /// chosen server has an idle connection. `Err`: `acquire` waits, with the routing
    /// made here if it was made (a client queued for a server must not pay for
    /// classifying its batch twice).
    fn acquire_idle(&mut self, client: &ClientConn) -> Result<Checkout, Option<Routed>> {
        if self.refused_rerun || self.database.is_paused() {
            return Err(None);
        }
        let routed @ (decision, fence, rerunnable) = self.route(client);
        let Some((checkout, placement)) = routing::checkout_idle_for(decision, fence, &self.database, &self.pools)
        else {
            return Err(Some(routed));
        };
        self.rerunnable = rerunnable;
        self.on_replica = placement.target == Target::Replica;
        self.set_state(ClientState::Active);
        self.count_route(placement);
        Ok(checkout)
    }

    /// Waits for a server for the message at the front of the input, routed as `routed`
    /// says or, without it, routed here. On failure the client has been told
    /// (`Err(None)`) or is gone (`Err(Some(_))`).
    async fn acquire(
        &mut self,
        client: &mut ClientConn,
        tag: FrontendTag,
        routed: Option<Routed>,
    ) -> Result<Checkout, Option<End>> {
        let (mut decision, fence, mut rerunnable) = routed.unwrap_or_else(|| self.route(client));
        if std::mem::take(&mut self.refused_rerun) {
            decision = Decision {
                target: Target::Primary,
                reason: Reason::ReplicaRefused,
            };
            rerunnable = false;
        }
        self.rerunnable = rerunnable;
        self.set_state(ClientState::Waiting);
        let database = self.database.clone();
        let pools = self.pools.clone();
        let metrics = self.shared.metrics.clone();
        let peer = client.peer;
        let checkout = async move {
            // PAUSE holds new transactions here until RESUME.
            database.wait_resumed().await;
            let patience = database.pool.query_wait_timeout;
            let mut tries = 0u32;
            routing::checkout_patiently(decision, fence, &database, &pools, patience, |error| {
                if tries == 0 {
                    tracing::info!(client = %peer, database = %database.name, %error,
                        "server not reachable right now: trying again within query_wait_timeout");
                }
                tries += 1;
                metrics.retry(&database.name, "connect");
            })
            .await
        };
        tokio::pin!(checkout);
        // Taken once: the wait below is made anew at each turn of the loop, and a cancel
        // arriving between two turns must still end it.
        let cancels_seen = self.cancel.unattached_cancels();
        loop {
            tokio::select! {
                result = &mut checkout => {
                    return result.map(|(checkout, placement)| {
                        self.on_replica = placement.target == Target::Replica;
                        self.set_state(ClientState::Active);
                        self.count_route(placement);
                        checkout
                    }).map_err(|error| {
                        self.set_state(ClientState::Idle);
                        let error = ClientError::from_pool(&error, &self.database.name);
                        tracing::warn!(client = %client.peer, database = %self.database.name, user = %self.user.name,
                            sqlstate = %error.sqlstate, error = %error.message, side = ?error.side,
                            retryable = error.retryable, "no server for client");
                        self.metrics.client_error(&error.sqlstate);
                        self.local.fail_first(tag, &mut client.inbuf, &mut client.outbuf, &error);
                        None
                    });
                }
                () = self.cancel.cancelled_while_waiting(cancels_seen) => {
                    let error = ClientError::new(Side::Client, sqlstate::QUERY_CANCELED, "canceling statement due to user request");
                    self.set_state(ClientState::Idle);
                    self.report(&error);
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

    /// After a reload, takes the database's new entry (new settings, new pools where
    /// the servers changed). A database or user the reload removed keeps serving this
    /// client as before; only new clients are refused.
    fn follow_reload(&mut self) {
        let reloads = self.shared.reloads();
        if reloads == self.reloads_seen {
            return;
        }
        self.reloads_seen = reloads;
        let snapshot = self.shared.snapshot();
        let Some(database) = snapshot.database(&self.database.name) else {
            return;
        };
        if Arc::ptr_eq(&database, &self.database) {
            return;
        }
        let user = user_in(&snapshot, &database.name, &self.user);
        self.pools = database.pools(&user);
        self.database = database;
        self.user = user;
    }

    /// Moves the client to `state` in the metrics and in SHOW CLIENTS.
    fn set_state(&mut self, state: ClientState) {
        self.client_state.set(state);
        self.registration.entry().set_state(match state {
            ClientState::Idle => LinkState::Idle,
            ClientState::Waiting => LinkState::Waiting,
            ClientState::Active => LinkState::Active,
        });
    }

    fn report(&self, error: &ClientError) {
        self.metrics.client_error(&error.sqlstate);
    }

    /// Counts a routing decision by where the batch really went: a read meant for a
    /// replica that ended on the primary counts as no_replica.
    fn count_route(&self, placement: Placement) {
        let reason = match placement.reason {
            Reason::Write => RouteReason::Write,
            Reason::Read => RouteReason::Read,
            Reason::Transaction => RouteReason::Transaction,
            Reason::Hint => RouteReason::Hint,
            Reason::Unparsed => RouteReason::Unparsed,
            Reason::VolatileFunction => RouteReason::VolatileFunction,
            Reason::ReplicaRefused => RouteReason::ReplicaRefused,
            Reason::Lag => RouteReason::Lag,
            Reason::Consistency => RouteReason::Consistency,
            Reason::NoReplica => RouteReason::NoReplica,
        };
        let role = if placement.target == Target::Replica {
            Role::Replica
        } else {
            Role::Primary
        };
        self.metrics.route(role, reason);
    }

    /// Makes pgrelay_pinned_sessions show this client's pins.
    fn sync_pins(&mut self) {
        let mut held = [false; MetricsPin::ALL.len()];
        for reason in self.carried.pins.reasons() {
            let label = match reason {
                PinReason::TempTable => MetricsPin::TempTable,
                PinReason::AdvisoryLock => MetricsPin::AdvisoryLock,
                PinReason::Listen => MetricsPin::Listen,
                PinReason::HoldCursor => MetricsPin::HoldCursor,
                PinReason::SqlPrepare => MetricsPin::SqlPrepare,
                PinReason::Load | PinReason::SetRole | PinReason::SessionAuthorization | PinReason::UntrackableSet => {
                    MetricsPin::Other
                }
            };
            if let Some(index) = MetricsPin::ALL.iter().position(|known| *known == label) {
                held[index] = true;
            }
        }
        for (label, held) in MetricsPin::ALL.into_iter().zip(held) {
            if held {
                self.pinned.insert(label);
            } else {
                self.pinned.remove(label);
            }
        }
    }

    /// Where the batch at the front of the input goes.
    /// Where the batch at the front of the input goes, and for a read the WAL position a
    /// replica must have replayed to serve it.
    fn route(&self, client: &ClientConn) -> Routed {
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
            return (Decision { target, reason }, None, false);
        }
        let batch = routing::plan_batch(
            &client.inbuf,
            &self.carried.statements,
            &self.database.classifier,
            self.carried.client_encoding().charset,
            &self.local.tx,
            // Only causal consistency fences by table.
            routing.consistency == Consistency::Causal,
        );
        // Only reads, whole, outside any transaction: safe to run again elsewhere.
        let rerunnable = batch.all_read
            && batch.complete
            && !batch.unparsed
            && batch.transaction.is_none()
            && !batch.pins
            && matches!(self.local.tx, LocalTx::Idle);
        let mut decision = router::decide(&batch, routing, self.database.has_replicas());
        // A hot standby refuses serializable transactions, READ ONLY or not.
        if decision.target == Target::Replica
            && self
                .carried
                .wanted
                .get("default_transaction_isolation")
                .is_some_and(|level| level.to_ascii_lowercase().contains("serializable"))
        {
            decision = Decision {
                target: Target::Primary,
                reason: Reason::Transaction,
            };
        }
        let fence = match routing.consistency {
            Consistency::Eventual => None,
            // No replica can be shown to have the lost position: all of them stay behind.
            Consistency::Session | Consistency::Causal if self.carried.fence_lost => Some(Lsn(u64::MAX)),
            Consistency::Session => self.carried.write_fence,
            Consistency::Causal => self
                .carried
                .write_fence
                .max(self.database.fences.fence_for(&batch.tables)),
        };
        (decision, fence, rerunnable)
    }

    /// Brings the server's settings in line with the client's, sends a held-back BEGIN,
    /// and points the client's cancel key at the server.
    fn prepare(&mut self, server: &mut Checkout) {
        if self.database.mode() == PoolMode::Session {
            server.state.client_state_added();
        }
        if let Some(diff) = ParamDiff::between(&self.carried.wanted, &server.params) {
            let mut sent = true;
            for sql in diff.queries() {
                if postgres_protocol::message::frontend::query(sql, &mut server.outbuf).is_ok() {
                    server.expect.push(Expect::ResultsUntilReady, Recipient::Pgrelay);
                } else {
                    sent = false;
                }
            }
            if sent {
                server.params = self.carried.wanted.clone();
            }
        }
        if let LocalTx::DeferredBegin { sql } = &self.local.tx
            && postgres_protocol::message::frontend::query(sql, &mut server.outbuf).is_ok()
        {
            server.expect.push(Expect::ResultsUntilReady, Recipient::Pgrelay);
            self.local.tx = LocalTx::Idle;
            self.deferred_begin_sent = true;
        }
        self.cancel.attach(CancelTarget {
            addr: server.addr.clone(),
            key: server.key().clone(),
        });
    }

    async fn after_pump(
        &mut self,
        client: &mut ClientConn,
        mut server: Checkout,
        exit: PumpExit,
        rerun: Option<&[u8]>,
    ) -> Option<End> {
        self.sync_pins();
        let begun_here = std::mem::take(&mut self.deferred_begin_sent);
        match exit {
            PumpExit::ReplicaRefused { error, sqlstate, kind } => {
                self.after_refusal(client, server, (error, sqlstate, kind), rerun, begun_here)
                    .await
            }
            PumpExit::ServerIdle => {
                self.read_retries = (0, None);
                if self.database.mode() == PoolMode::Session || self.carried.pins.is_pinned() {
                    server.state.client_state_added();
                    self.server = Some(server);
                } else {
                    // Unpinned again: what the client left on the server was released.
                    server.state.client_state_cleared();
                    self.cancel.detach().await;
                    drop(server);
                    self.set_state(ClientState::Idle);
                }
                None
            }
            PumpExit::TransactionInStatementMode => {
                let owed = server.expect.readies_owed_to_client();
                self.cancel.detach().await;
                server.discard();
                self.set_state(ClientState::Idle);
                let error = ClientError::new(
                    Side::Client,
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    "transaction blocks are not allowed in statement pooling mode",
                );
                self.report(&error);
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
            PumpExit::IdleInTransaction(limit) => {
                // Cleaned up as for a client that left: its transaction is rolled back.
                self.server = Some(server);
                Some(End::IdleInTransaction(limit))
            }
            PumpExit::ClientBroke(error) => {
                self.server = Some(server);
                Some(End::ClientBroke(ClientError::protocol_violation(error.to_string())))
            }
            PumpExit::ServerFailed { failure, seen } => {
                // The client was told its BEGIN succeeded even if the server never ran it.
                let in_transaction = server.status() != TxStatus::Idle || begun_here;
                let mid_message = server.state.mid_message_to_client();
                let owed = server.expect.readies_owed_to_client();
                // Syncs the client sent behind a COPY FROM STDIN (libpq sends one right
                // after the Execute). While the COPY runs the server reads them in COPY
                // mode and ignores them: no ReadyForQuery is owed for them. Once the COPY
                // has failed, the server may answer them or not, which pgrelay had not yet
                // settled (see `ResponseQueue::copy_started`): the client may be waiting
                // for one more ReadyForQuery, or for none. One it is not waiting for would
                // be read as the answer to its next statement; none, where it waits, would
                // leave it waiting for ever. Only ending the session is right either way.
                let answers_unknown = server.expect.has_uncertain_readies() && !server.state.in_copy();
                // Extended-protocol messages went out after the last Sync: the client
                // waits for their replies, or sends its Sync later.
                let mid_batch = server.state.is_unsynced();
                self.cancel.detach().await;
                server.state.server_lost();
                if failure.means_server_down()
                    && let Some(pool) = self.pools.hosts.iter().find(|pool| pool.addr() == server.addr())
                {
                    // The server restarted or went away: its idle connections are as dead
                    // as this one, and the next client must not be handed one of them.
                    pool.close_idle();
                }
                let failed_host = server.addr().to_owned();
                server.discard();
                self.set_state(ClientState::Idle);
                // Only this read batch was in flight and nothing of it reached the client:
                // it runs again, elsewhere, as if the failure never happened.
                if let Some(batch) = rerun
                    && self.database.pool.retry_reads
                    && !seen.replied
                    && !in_transaction
                    && owed == 1
                    && !mid_batch
                    && self.may_rerun_read()
                {
                    self.rerun_read(client, batch, &failed_host, &failure);
                    return None;
                }
                self.read_retries = (0, None);
                let error = ClientError::from_upstream(&failure, &self.database.name);
                self.report(&error);
                tracing::warn!(client = %client.peer, database = %self.database.name, user = %self.user.name,
                    error = %failure, "server failed during a session");
                if mid_message {
                    return Some(End::ServerLostMidMessage);
                }
                if seen.client_mid_message {
                    // The rest of a large CopyData is still coming and cannot be told
                    // from messages: the session cannot go on.
                    return Some(End::ServerLost(error));
                }
                if self.database.mode() == PoolMode::Session || self.carried.pins.is_pinned() {
                    // The client's session state (temporary tables, LISTEN...) was on that
                    // server: as on a direct connection, the session ends.
                    return Some(End::ServerLost(error));
                }
                if answers_unknown {
                    return Some(End::ServerLost(error));
                }
                let status = if in_transaction {
                    TxStatus::Failed
                } else {
                    TxStatus::Idle
                };
                for owed_ready in 0..owed {
                    // The batch at the head already had its error from the server: it
                    // is owed only its ReadyForQuery.
                    if owed_ready > 0 || !seen.error_since_ready {
                        compose::error(&mut client.outbuf, Severity::Error, &error.sqlstate, &error.message);
                    }
                    compose::ready_for_query(&mut client.outbuf, status);
                }
                if mid_batch {
                    // As a server does after an error: the rest of the batch is dropped,
                    // and its Sync answered, by `LocalState`.
                    if owed > 0 || !seen.error_since_ready {
                        compose::error(&mut client.outbuf, Severity::Error, &error.sqlstate, &error.message);
                    }
                    self.local.skipping_to_sync = true;
                }
                if in_transaction {
                    self.local.tx = LocalTx::Aborted {
                        failure: error,
                        reported: owed > 0 || mid_batch,
                    };
                }
                None
            }
        }
    }

    /// A replica refused the read batch `rerun` as a write before anything of its reply
    /// reached the client: it runs again on the primary, and its texts are writes from now
    /// on. When it cannot run again (never expected: the pump catches refusals only of
    /// whole autocommit batches), the client gets the refusal as the replica sent it.
    async fn after_refusal(
        &mut self,
        client: &mut ClientConn,
        mut server: Checkout,
        refusal: (bytes::Bytes, String, Refusal),
        rerun: Option<&[u8]>,
        begun_here: bool,
    ) -> Option<End> {
        let (error, sqlstate, kind) = refusal;
        let owed = server.expect.readies_owed_to_client();
        let mid_batch = server.state.is_unsynced();
        let in_transaction = server.status() != TxStatus::Idle || begun_here;
        self.cancel.detach().await;
        let replica = server.addr().to_owned();
        // Mid-reply (its ReadyForQuery is still to come): closed rather than drained.
        server.state.server_lost();
        server.discard();
        self.set_state(ClientState::Idle);
        if let Some(batch) = rerun
            && owed == 1
            && !mid_batch
            && !in_transaction
        {
            let texts = routing::batch_texts(batch);
            let statement: String = texts
                .first()
                .map(|text| String::from_utf8_lossy(text).chars().take(200).collect())
                .unwrap_or_default();
            match kind {
                Refusal::Write => {
                    let charset = self.carried.client_encoding().charset;
                    for text in &texts {
                        self.database.classifier.remember_refused(text, charset);
                    }
                    tracing::info!(client = %client.peer, database = %self.database.name, server = replica,
                        %sqlstate, %statement, "a replica refused a read as a write: running it on the primary, \
                        and sending it there from now on (declare the functions it calls VOLATILE, or list them \
                        in write_functions)");
                }
                Refusal::RecoveryConflict => {
                    self.shared.metrics.retry(&self.database.name, "recovery_conflict");
                    tracing::info!(client = %client.peer, database = %self.database.name, server = replica,
                        %sqlstate, %statement, "a replica cancelled a read for a conflict with its WAL replay: \
                        running it on the primary");
                }
            }
            let rest = std::mem::take(&mut client.inbuf);
            client.inbuf.reserve(batch.len() + rest.len());
            client.inbuf.extend_from_slice(batch);
            client.inbuf.extend_from_slice(&rest);
            self.rerun_pending = true;
            self.refused_rerun = true;
            return None;
        }
        self.metrics.client_error(&sqlstate);
        client.outbuf.extend_from_slice(&error);
        let status = if in_transaction {
            TxStatus::Failed
        } else {
            TxStatus::Idle
        };
        for _ in 0..owed {
            compose::ready_for_query(&mut client.outbuf, status);
        }
        if mid_batch {
            self.local.skipping_to_sync = true;
        }
        None
    }

    /// Whether the read batch whose server just failed may run again: at most
    /// `MAX_READ_RUNS` runs, within query_wait_timeout of the first.
    fn may_rerun_read(&mut self) -> bool {
        let (runs, first) = &mut self.read_retries;
        let first = *first.get_or_insert_with(std::time::Instant::now);
        let in_time = self
            .database
            .pool
            .query_wait_timeout
            .is_none_or(|limit| first.elapsed() < limit);
        *runs += 1;
        *runs < MAX_READ_RUNS && in_time
    }

    /// Puts the read batch back at the front of the input, to be routed again, with the
    /// replica that failed set aside.
    fn rerun_read(&mut self, client: &mut ClientConn, batch: &[u8], failed_host: &str, failure: &UpstreamError) {
        let rest = std::mem::take(&mut client.inbuf);
        client.inbuf.reserve(batch.len() + rest.len());
        client.inbuf.extend_from_slice(batch);
        client.inbuf.extend_from_slice(&rest);
        self.rerun_pending = true;
        if self.on_replica
            && failure.means_server_down()
            && let Some(index) = self.database.hosts.iter().position(|host| &**host == failed_host)
        {
            self.database.host_health[index].ban(crate::cluster::BAN_DURATION);
        }
        self.shared.metrics.retry(&self.database.name, "read");
        tracing::info!(client = %client.peer, database = %self.database.name, server = failed_host, error = %failure,
            "a read lost its server before answering: running it again");
    }

    /// Makes a server safe for the next client after this one left, or closes it.
    async fn clean_up(&mut self, mut server: Checkout) {
        self.cancel.detach().await;
        if server.is_broken() || server.mid_statement() {
            // Closing is the only sure way to stop what a departed client started.
            server.discard();
            return;
        }
        if server.status() != TxStatus::Idle && !self.run_cleanup_query(&mut server, "ROLLBACK").await {
            server.discard();
            return;
        }
        if server.state.holds_client_state() {
            // Session mode runs the configured reset query; a client pinned in
            // transaction mode left state that only DISCARD ALL is sure to remove.
            let reset = match self.database.mode() {
                PoolMode::Session => self.database.pool.server_reset_query.clone(),
                PoolMode::Transaction | PoolMode::Statement => Some("DISCARD ALL".to_owned()),
            };
            if let Some(reset) = reset {
                if !self.run_cleanup_query(&mut server, &reset).await {
                    server.discard();
                    return;
                }
                server.params = SessionParams::default();
                server.statements.clear();
            }
            server.state.client_state_cleared();
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

/// `user`'s entry in `snapshot` (a reload's): a user found by auth_query belongs to the
/// new snapshot's lookup, since keeping the old entry would tie the session to pools with
/// the old lookup's credentials.
pub(super) fn user_in(snapshot: &Snapshot, database: &str, user: &Arc<UserEntry>) -> Arc<UserEntry> {
    match (snapshot.user(&user.name), &user.auth) {
        (Some(user), _) => user,
        (None, ClientAuth::Query) => match snapshot.auth_lookup(database) {
            Some((lookup, _)) => lookup.adopt(user),
            None => user.clone(),
        },
        (None, _) => user.clone(),
    }
}
