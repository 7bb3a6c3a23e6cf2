//! Server connections handed over with their clients by the process this one took over
//! from (`crate::takeover`): lent to their client at once, counted in their pool and in
//! max_user_connections / max_db_connections, and back to the pool when their client is
//! done with them.
//!
//! They are counted even when that takes the pool over `size` or a budget over its limit for
//! a while: the server session exists already, and refusing it would end its client's
//! session. Deadpool is sized meanwhile to what `size` leaves beside them (at least one), so
//! clients that need a connection wait as for a full pool. Deadpool
//! takes no connection it did not open, so one whose client is done is *parked* here
//! instead (idle, counted as idle): the next time the pool would open a connection it takes
//! a parked one (`ServerManager::create`); server_idle_timeout, KILL, a server that fails or
//! changes its part, a closed pool and a spent budget close parked ones as idle ones.

use std::sync::atomic::Ordering;

use super::manager::Pooled;
use super::{Checkout, Lent, PoolCounters, ServerPool};
use crate::registry::LinkState;
use crate::upstream::ServerConn;

impl ServerPool {
    /// Lends `conn`, a connection this pool did not open, to the client it came with, and
    /// lists it in SHOW SERVERS.
    pub fn adopt(&self, mut conn: ServerConn) -> Checkout {
        let manager = self.main.manager();
        conn.pool_generation = self.counters.generation.load(Ordering::Acquire);
        if let Some((registry, database)) = &manager.observers.registry {
            let registration = registry.add_server(
                self.spec.addr.clone(),
                database,
                &self.spec.credentials.user,
                conn.key().process_id,
            );
            registration.entry().set_state(LinkState::Active);
            conn.registration = Some(registration);
        }
        let permit = self.budgets.take_regardless();
        self.counters.adopted.fetch_add(1, Ordering::AcqRel);
        self.fit_to_adopted();
        let limits = self.limits.load();
        let over = |open: usize, limit: Option<usize>| limit.is_some_and(|limit| open > limit);
        if self.status().size > limits.size
            || over(self.budgets.user.open(), limits.max_user_connections)
            || over(self.budgets.database.open(), limits.max_db_connections)
        {
            // Said, not refused: see the module's comment.
            tracing::warn!(server = %self.spec.addr, database = %self.spec.database, user = %self.spec.credentials.user,
                "a server connection handed over with its client takes the pool over its size or a connection \
                 limit until that client is done with it");
        }
        Checkout {
            object: Some(Lent::Adopted(Pooled::new(Box::new(conn), permit))),
            counters: self.counters.clone(),
            budgets: self.budgets.clone(),
        }
    }
}

impl PoolCounters {
    pub(super) fn park(&self, pooled: Pooled) {
        match self.parked.lock() {
            Ok(mut parked) => parked.push(pooled),
            // Poisoned: closed instead, which loses nothing but the connection.
            Err(_) => drop(pooled),
        }
    }

    /// A parked connection still open and of the current generation, if any; the others
    /// found on the way are closed.
    pub(super) fn take_parked(&self) -> Option<Pooled> {
        let generation = self.generation.load(Ordering::Acquire);
        let mut parked = self.parked.lock().ok()?;
        while let Some(mut pooled) = parked.pop() {
            if pooled.pool_generation == generation && pooled.probe_alive() {
                return Some(pooled);
            }
        }
        None
    }

    pub(super) fn parked_count(&self) -> usize {
        self.parked.lock().map_or(0, |parked| parked.len())
    }

    /// Closes up to `count` parked connections (the longest idle first); whether any was.
    pub(super) fn close_parked(&self, count: usize) -> bool {
        let closed: Vec<Pooled> = match self.parked.lock() {
            Ok(mut parked) => {
                let count = count.min(parked.len());
                parked.drain(..count).collect()
            }
            Err(_) => return false,
        };
        // Dropped outside the lock: each sends its Terminate and gives its budget back.
        !closed.is_empty()
    }

    /// Closes the parked connections idle for `timeout` or more.
    pub(super) fn expire_parked(&self, timeout: std::time::Duration) {
        let expired: Vec<Pooled> = match self.parked.lock() {
            Ok(mut parked) => {
                let (expired, kept) = parked
                    .drain(..)
                    .partition(|pooled| pooled.released_at.elapsed() >= timeout || pooled.is_broken());
                *parked = kept;
                expired
            }
            Err(_) => return,
        };
        drop(expired);
    }
}
