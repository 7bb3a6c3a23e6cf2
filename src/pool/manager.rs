//! How the pool makes and checks server connections: the deadpool `Manager`.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use arc_swap::ArcSwap;
use deadpool::managed::{Manager, Metrics, RecycleError, RecycleResult};

use super::budget::{BudgetKind, BudgetPermit, PoolBudgets, Spent};
use super::{PoolCounters, PoolLimits};
use crate::upstream::{self, ConnectSpec, ServerConn, UpstreamError};

#[derive(Debug)]
pub struct ServerManager {
    pub(super) spec: Arc<ConnectSpec>,
    pub(super) counters: Arc<PoolCounters>,
    /// Connections older than this are closed instead of reused.
    pub(super) lifetime: Option<Duration>,
    pub(super) observers: super::PoolObservers,
    /// max_user_connections and max_db_connections, checked before each new connection.
    pub(super) budgets: Arc<PoolBudgets>,
    pub(super) limits: Arc<ArcSwap<PoolLimits>>,
}

/// A pooled server connection with its place in the user's and the database's budgets,
/// given back when the connection is dropped.
#[derive(Debug)]
pub struct Pooled {
    /// Boxed so a checkout (and a session holding one) is a pointer, not the whole
    /// connection state.
    conn: Box<ServerConn>,
    _permit: BudgetPermit,
}

impl Pooled {
    pub(super) fn new(conn: Box<ServerConn>, permit: BudgetPermit) -> Pooled {
        Pooled { conn, _permit: permit }
    }
}

impl Deref for Pooled {
    type Target = ServerConn;

    fn deref(&self) -> &ServerConn {
        &self.conn
    }
}

impl DerefMut for Pooled {
    fn deref_mut(&mut self) -> &mut ServerConn {
        &mut self.conn
    }
}

/// Why no new connection was made.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// max_user_connections or max_db_connections is reached: the client waits.
    #[error("{} reached", .0.key())]
    Spent(BudgetKind),
}

impl Manager for ServerManager {
    type Type = Pooled;
    type Error = CreateError;

    async fn create(&self) -> Result<Pooled, CreateError> {
        // A connection handed over by the process this one took over from, back from its
        // client: open already, and counted in the budgets (`adopt.rs`).
        if let Some(parked) = self.counters.take_parked() {
            return Ok(parked);
        }
        let limits = self.limits.load();
        let permit = self
            .budgets
            .take(&self.counters, limits.max_user_connections, limits.max_db_connections)
            .map_err(|Spent(kind)| CreateError::Spent(kind))?;
        self.counters.logins.fetch_add(1, Ordering::Relaxed);
        // Decremented even if the connect future is dropped by a timeout.
        let _login = scopeguard(|| {
            self.counters.logins.fetch_sub(1, Ordering::Relaxed);
        });
        // Boxed: a login's state is some 6 KB, and deadpool's `get` holds this future in
        // place. Inline, every client queued for a server carried (and copied into its
        // boxed wait) the space of a login it almost never makes; boxed, only a login
        // that happens allocates it.
        let result = Box::pin(upstream::connect(&self.spec)).await.map(Box::new);
        match result {
            Ok(mut conn) => {
                conn.pool_generation = self.counters.generation.load(Ordering::Acquire);
                self.counters.remember_server_params(conn.reported_params());
                if let Some((registry, database)) = &self.observers.registry {
                    conn.registration = Some(registry.add_server(
                        self.spec.addr.clone(),
                        database,
                        &self.spec.credentials.user,
                        conn.key().process_id,
                    ));
                }
                Ok(Pooled { conn, _permit: permit })
            }
            Err(error) => {
                self.counters.connect_errors.fetch_add(1, Ordering::Relaxed);
                if let Some(counter) = &self.observers.connect_errors {
                    counter.inc();
                }
                Err(error.into())
            }
        }
    }

    async fn recycle(&self, conn: &mut Pooled, metrics: &Metrics) -> RecycleResult<CreateError> {
        if self.lifetime.is_some_and(|lifetime| metrics.age() >= lifetime) {
            return Err(RecycleError::message("server_lifetime reached"));
        }
        if conn.pool_generation != self.counters.generation.load(Ordering::Acquire) {
            return Err(RecycleError::message("retired: the server changed its part"));
        }
        if !conn.is_reusable() || !conn.probe_alive() {
            return Err(RecycleError::message("connection closed or not idle"));
        }
        Ok(())
    }
}

/// Runs a closure when dropped.
pub(super) fn scopeguard<F: FnOnce()>(on_drop: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(on_drop) = self.0.take() {
                on_drop();
            }
        }
    }
    Guard(Some(on_drop))
}
