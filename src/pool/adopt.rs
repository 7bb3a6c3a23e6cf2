//! Server connections handed over with their clients by the process this one took over
//! from (`crate::takeover`): lent to their client at once, counted in their pool and in
//! max_user_connections / max_db_connections, and closed when their client is done.
//!
//! They are counted even when that takes the pool over `size` or a budget over its limit for
//! a while: the server session exists already, and refusing it would end its client's
//! session. Clients waiting for a connection meanwhile wait as for a full pool. They are
//! kept outside deadpool (which takes no connection it did not open), so they never go
//! back to the idle connections: the pool opens new ones as its clients need them.

use std::sync::atomic::Ordering;

use super::manager::Pooled;
use super::{Checkout, Lent, ServerPool};
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
