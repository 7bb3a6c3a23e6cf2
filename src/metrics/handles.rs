//! Pre-resolved handles: a session looks its labels up once, at login, and afterwards every
//! count is an atomic add on a handle picked from an array by enum index.
//!
//! The handles of a database and of a (database, user) pair are built once and shared by all
//! their sessions, so a login costs two map look-ups and two `Arc` clones, not one label
//! look-up per family.

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use prometheus::{Histogram, IntCounter, IntCounterVec, IntGauge};

use super::guards::{ClientStateGauge, PinnedGauge};
use super::labels::{ClientState, KNOWN_SQLSTATES, PinReason, Role, RouteReason, sqlstate_label};
use super::registry::Families;

/// Series of one database (labels without `user`).
pub(crate) struct DatabaseHandles {
    name: Box<str>,
    pub(crate) query_duration: [Histogram; 2],
    pub(crate) routing: [[IntCounter; RouteReason::ALL.len()]; 2],
    pub(crate) pinned: [IntGauge; PinReason::ALL.len()],
    pub(crate) evictions: IntCounter,
    known_errors: [IntCounter; KNOWN_SQLSTATES.len()],
    /// For SQLSTATEs outside [`KNOWN_SQLSTATES`].
    client_errors: IntCounterVec,
    users: DashMap<Box<str>, Arc<UserHandles>>,
}

impl DatabaseHandles {
    pub(crate) fn new(families: &Families, database: &str) -> DatabaseHandles {
        DatabaseHandles {
            name: database.into(),
            query_duration: Role::ALL.map(|role| families.query_duration.with_label_values(&[database, role.label()])),
            routing: Role::ALL.map(|role| {
                RouteReason::ALL.map(|reason| {
                    families
                        .routing
                        .with_label_values(&[database, role.label(), reason.label()])
                })
            }),
            pinned: PinReason::ALL.map(|reason| families.pinned.with_label_values(&[database, reason.label()])),
            evictions: families.evictions.with_label_values(&[database]),
            known_errors: KNOWN_SQLSTATES
                .map(|sqlstate| families.client_errors.with_label_values(&[database, sqlstate])),
            client_errors: families.client_errors.clone(),
            users: DashMap::new(),
        }
    }

    pub(crate) fn user(&self, families: &Families, user: &str) -> Arc<UserHandles> {
        if let Some(found) = self.users.get(user) {
            return found.clone();
        }
        let built = Arc::new(UserHandles::new(families, &self.name, user));
        self.users.entry(user.into()).or_insert(built).clone()
    }

    /// Errors are rare: an unlisted SQLSTATE may take a label look-up.
    pub(crate) fn client_error(&self, sqlstate: &str) {
        match KNOWN_SQLSTATES.iter().position(|known| *known == sqlstate) {
            Some(index) => self.known_errors[index].inc(),
            None => self
                .client_errors
                .with_label_values(&[&*self.name, sqlstate_label(sqlstate)])
                .inc(),
        }
    }
}

/// Series of one (database, user) pair.
pub(crate) struct UserHandles {
    pub(crate) clients: [IntGauge; 3],
    pub(crate) pool_wait: Histogram,
    queries: [IntCounter; 2],
    transactions: [IntCounter; 2],
}

impl UserHandles {
    fn new(families: &Families, database: &str, user: &str) -> UserHandles {
        UserHandles {
            clients: ClientState::ALL.map(|state| families.clients.with_label_values(&[database, user, state.label()])),
            pool_wait: families.pool_wait.with_label_values(&[database, user]),
            queries: Role::ALL.map(|role| families.queries.with_label_values(&[database, user, role.label()])),
            transactions: Role::ALL
                .map(|role| families.transactions.with_label_values(&[database, user, role.label()])),
        }
    }
}

/// What one logged-in client counts through: get it from
/// [`Metrics::session`](super::Metrics::session) once, after authentication, keep it in the
/// session, and call these methods on the hot path. Each is one atomic add (a counter) or a
/// few (a histogram), with no look-up, lock or allocation. Cloning is two `Arc` clones.
#[derive(Clone)]
pub struct SessionMetrics {
    database: Arc<DatabaseHandles>,
    user: Arc<UserHandles>,
}

impl SessionMetrics {
    pub(crate) fn new(database: Arc<DatabaseHandles>, user: Arc<UserHandles>) -> SessionMetrics {
        SessionMetrics { database, user }
    }

    /// The guard that counts this client in `pgrelay_clients`, starting in `initial` (usually
    /// [`ClientState::Idle`] right after login). Keep it for the client's lifetime.
    pub fn client_state(&self, initial: ClientState) -> ClientStateGauge {
        ClientStateGauge::new(self.user.clone(), initial)
    }

    /// The guard that counts this client's pins in `pgrelay_pinned_sessions`, holding none yet.
    pub fn pins(&self) -> PinnedGauge {
        PinnedGauge::new(self.database.clone())
    }

    /// One statement forwarded to a server of `role` that completed after `elapsed`.
    pub fn query(&self, role: Role, elapsed: Duration) {
        self.user.queries[role.index()].inc();
        self.database.query_duration[role.index()].observe(elapsed.as_secs_f64());
    }

    /// One transaction completed on a server of `role` (the server reported idle again).
    pub fn transaction(&self, role: Role) {
        self.user.transactions[role.index()].inc();
    }

    /// One routing decision: sent to `role` because of `reason`.
    pub fn route(&self, role: Role, reason: RouteReason) {
        self.database.routing[role.index()][reason.index()].inc();
    }

    /// One ErrorResponse pgrelay itself sent this client (`53300`, `08006`, `08P01`, …).
    pub fn client_error(&self, sqlstate: &str) {
        self.database.client_error(sqlstate);
    }

    /// `count` server-side prepared statements closed by the LRU on this client's behalf.
    pub fn prepared_statements_evicted(&self, count: u64) {
        self.database.evictions.inc_by(count);
    }
}

impl std::fmt::Debug for SessionMetrics {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("SessionMetrics")
            .field("database", &self.database.name)
            .finish_non_exhaustive()
    }
}
