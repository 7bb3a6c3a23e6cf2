//! Scrape-time collection: gauges that describe pools, server connections and backends are
//! not kept up to date by the data path at all. At each scrape the registry calls
//! [`StateCollector`], which asks the application's state source to report what exists now
//! and exports exactly that — so a pool removed by a reload disappears with no bookkeeping,
//! and checkouts and health checks pay nothing for these gauges.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use prometheus::core::{Collector, Desc, MetricVec, MetricVecBuilder};
use prometheus::proto::MetricFamily;
use prometheus::{GaugeVec, IntGaugeVec, Opts};

use super::labels::{Role, ServerState};

/// A pool's state at scrape time, for one (database, user, role, host) pool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolState {
    /// The configured maximum (`size`), exported as `pgrelay_pool_size`; the reserve is not
    /// included, so a pool using its reserve shows saturation 1.
    pub max_size: usize,
    /// Server connections linked to a client.
    pub active: usize,
    /// Open server connections waiting in the pool.
    pub idle: usize,
    /// Server connections being opened and authenticated.
    pub login: usize,
    /// How long the longest-waiting client of this pool has waited so far; zero when none
    /// waits.
    pub max_wait: Duration,
}

/// What the state source reports into, once per scrape. Report each pool and backend once;
/// a second report of the same labels overwrites the first (except the per-user maximum wait,
/// which takes the larger value).
pub struct StateSink<'a> {
    families: &'a ScrapeFamilies,
}

impl StateSink<'_> {
    /// One pool of server connections for (database, user) on `host` (`addr:port`).
    pub fn pool(&mut self, database: &str, user: &str, role: Role, host: &str, state: PoolState) {
        let families = self.families;
        let role = role.label();
        for (server_state, count) in [
            (ServerState::Active, state.active),
            (ServerState::Idle, state.idle),
            (ServerState::Login, state.login),
        ] {
            families
                .servers
                .with_label_values(&[database, user, role, host, server_state.label()])
                .set(gauge_int(count));
        }
        families
            .pool_size
            .with_label_values(&[database, user, role, host])
            .set(gauge_int(state.max_size));
        families
            .saturation
            .with_label_values(&[database, user, role, host])
            .set(saturation(state.active, state.max_size));
        // A user has a pool per host; the gauge is per user: the longest wait over them.
        let max_wait = families.max_wait.with_label_values(&[database, user]);
        max_wait.set(max_wait.get().max(state.max_wait.as_secs_f64()));
    }

    /// One backend's health as the last health check saw it.
    pub fn backend(&mut self, database: &str, role: Role, host: &str, up: bool) {
        self.families
            .backend_up
            .with_label_values(&[database, role.label(), host])
            .set(i64::from(up));
    }

    /// A replica's replay lag, as last measured. Leave it out when unknown (replica down):
    /// a missing series says "unknown" where a 0 would say "caught up".
    pub fn replica_lag(&mut self, database: &str, host: &str, lag: Duration) {
        self.families
            .replica_lag
            .with_label_values(&[database, host])
            .set(lag.as_secs_f64());
    }

    /// A database's configured `max_replica_lag`, so alerts and dashboards can compare
    /// `pgrelay_replica_lag_seconds` with the limit in force. Leave it out when there is no
    /// limit (`"0"`).
    /// Whether two hosts of `database` claim to be primary right now.
    pub fn split_brain(&mut self, database: &str, split: bool) {
        self.families
            .split_brain
            .with_label_values(&[database])
            .set(i64::from(split));
    }

    /// Server connections open under one user name over every pool, and its
    /// max_user_connections (left out when there is none).
    pub fn user_servers(&mut self, user: &str, open: usize, limit: Option<usize>) {
        self.families
            .user_servers
            .with_label_values(&[user])
            .set(gauge_int(open));
        if let Some(limit) = limit {
            self.families
                .max_user_connections
                .with_label_values(&[user])
                .set(gauge_int(limit));
        }
    }

    /// Server connections open for one database over every pool, and its
    /// max_db_connections (left out when there is none).
    pub fn database_servers(&mut self, database: &str, open: usize, limit: Option<usize>) {
        self.families
            .database_servers
            .with_label_values(&[database])
            .set(gauge_int(open));
        if let Some(limit) = limit {
            self.families
                .max_db_connections
                .with_label_values(&[database])
                .set(gauge_int(limit));
        }
    }

    /// Client addresses banned now for failed passwords, and addresses the login-rate
    /// table remembers.
    pub fn login_addresses(&mut self, banned: usize, tracked: usize) {
        const NO_LABELS: &[&str] = &[];
        self.families
            .banned_addresses
            .with_label_values(NO_LABELS)
            .set(gauge_int(banned));
        self.families
            .tracked_addresses
            .with_label_values(NO_LABELS)
            .set(gauge_int(tracked));
    }

    pub fn max_replica_lag(&mut self, database: &str, limit: Duration) {
        self.families
            .max_replica_lag
            .with_label_values(&[database])
            .set(limit.as_secs_f64());
    }
}

/// `active / max_size`, in 0..=1. A pool of size 0 (paused or misconfigured) with anything
/// active counts as saturated rather than dividing by zero.
fn saturation(active: usize, max_size: usize) -> f64 {
    if max_size == 0 {
        return if active == 0 { 0.0 } else { 1.0 };
    }
    (active as f64 / max_size as f64).min(1.0)
}

fn gauge_int(count: usize) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}

/// The state source: called at each scrape with a sink to report into.
pub(crate) type StateSource = Box<dyn Fn(&mut StateSink<'_>) + Send + Sync>;

pub(crate) struct ScrapeFamilies {
    servers: IntGaugeVec,
    pool_size: IntGaugeVec,
    saturation: GaugeVec,
    max_wait: GaugeVec,
    backend_up: IntGaugeVec,
    replica_lag: GaugeVec,
    max_replica_lag: GaugeVec,
    split_brain: IntGaugeVec,
    user_servers: IntGaugeVec,
    max_user_connections: IntGaugeVec,
    database_servers: IntGaugeVec,
    max_db_connections: IntGaugeVec,
    banned_addresses: IntGaugeVec,
    tracked_addresses: IntGaugeVec,
}

impl ScrapeFamilies {
    fn new() -> Result<ScrapeFamilies, prometheus::Error> {
        const POOL: &[&str] = &["database", "user", "role", "host"];
        Ok(ScrapeFamilies {
            servers: IntGaugeVec::new(
                Opts::new(
                    "pgrelay_servers",
                    "Server connections by state: active (linked to a client), idle (in the pool), login (being opened).",
                ),
                &["database", "user", "role", "host", "state"],
            )?,
            pool_size: IntGaugeVec::new(
                Opts::new(
                    "pgrelay_pool_size",
                    "Configured maximum of server connections in the pool (reserve excluded).",
                ),
                POOL,
            )?,
            saturation: GaugeVec::new(
                Opts::new(
                    "pgrelay_pool_saturation",
                    "Active server connections divided by pool size, 0..1; at 1 new transactions wait.",
                ),
                POOL,
            )?,
            max_wait: GaugeVec::new(
                Opts::new(
                    "pgrelay_pool_max_wait_seconds",
                    "How long the longest-waiting client has been waiting for a server connection right now.",
                ),
                &["database", "user"],
            )?,
            backend_up: IntGaugeVec::new(
                Opts::new(
                    "pgrelay_backend_up",
                    "1 when the backend passed its last health check, 0 when not.",
                ),
                &["database", "role", "host"],
            )?,
            replica_lag: GaugeVec::new(
                Opts::new(
                    "pgrelay_replica_lag_seconds",
                    "Replication replay lag of a replica behind its primary, as last measured.",
                ),
                &["database", "host"],
            )?,
            max_replica_lag: GaugeVec::new(
                Opts::new(
                    "pgrelay_max_replica_lag_seconds",
                    "The configured max_replica_lag: replicas lagging more get no reads.",
                ),
                &["database"],
            )?,
            split_brain: IntGaugeVec::new(
                Opts::new(
                    "pgrelay_split_brain",
                    "1 while two hosts of a database both claim to be primary (writes stay on the one pgrelay had).",
                ),
                &["database"],
            )?,
            user_servers: IntGaugeVec::new(
                Opts::new(
                    "pgrelay_user_servers",
                    "Server connections of one user over every database and host (what max_user_connections limits).",
                ),
                &["user"],
            )?,
            max_user_connections: IntGaugeVec::new(
                Opts::new(
                    "pgrelay_max_user_connections",
                    "The configured max_user_connections in force for the user; absent when there is no limit.",
                ),
                &["user"],
            )?,
            database_servers: IntGaugeVec::new(
                Opts::new(
                    "pgrelay_database_servers",
                    "Server connections of one database over every user and host (what max_db_connections limits).",
                ),
                &["database"],
            )?,
            max_db_connections: IntGaugeVec::new(
                Opts::new(
                    "pgrelay_max_db_connections",
                    "The configured max_db_connections of the database; absent when there is no limit.",
                ),
                &["database"],
            )?,
            banned_addresses: IntGaugeVec::new(
                Opts::new(
                    "pgrelay_login_banned_addresses",
                    "Client addresses refused right now after too many failed passwords (server.login_rate.ban_after).",
                ),
                &[],
            )?,
            tracked_addresses: IntGaugeVec::new(
                Opts::new(
                    "pgrelay_login_tracked_addresses",
                    "Client addresses the login-rate table remembers (bounded; the rest share one entry).",
                ),
                &[],
            )?,
        })
    }

    /// Every family, for describing, resetting and collecting them alike.
    fn all(&self) -> [&dyn ScrapeFamily; 14] {
        [
            &self.servers,
            &self.pool_size,
            &self.saturation,
            &self.max_wait,
            &self.backend_up,
            &self.replica_lag,
            &self.max_replica_lag,
            &self.split_brain,
            &self.user_servers,
            &self.max_user_connections,
            &self.database_servers,
            &self.max_db_connections,
            &self.banned_addresses,
            &self.tracked_addresses,
        ]
    }
}

/// A family that is rebuilt at each scrape.
trait ScrapeFamily: Collector {
    /// Drops every series.
    fn reset(&self);
}

impl<T: MetricVecBuilder> ScrapeFamily for MetricVec<T> {
    fn reset(&self) {
        MetricVec::reset(self);
    }
}

/// The registry's collector for the scrape-time families. Cloning shares it: one clone is
/// registered, another stays in `Metrics` to install the source.
#[derive(Clone)]
pub(crate) struct StateCollector {
    inner: Arc<StateInner>,
}

struct StateInner {
    families: ScrapeFamilies,
    source: ArcSwapOption<StateSource>,
    /// Held for a whole collection (reset, refill, read back): two concurrent scrapes must not
    /// see each other's half-filled families.
    collecting: Mutex<()>,
}

impl StateCollector {
    pub(crate) fn new() -> Result<StateCollector, prometheus::Error> {
        Ok(StateCollector {
            inner: Arc::new(StateInner {
                families: ScrapeFamilies::new()?,
                source: ArcSwapOption::empty(),
                collecting: Mutex::new(()),
            }),
        })
    }

    pub(crate) fn set_source(&self, source: StateSource) {
        self.inner.source.store(Some(Arc::new(source)));
    }
}

impl Collector for StateCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.inner
            .families
            .all()
            .into_iter()
            .flat_map(|family| family.desc())
            .collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        // A panic while holding it can only come from the source, and the families are reset
        // before every use: the poison carries no broken state.
        let _collecting = self.inner.collecting.lock().unwrap_or_else(PoisonError::into_inner);
        let families = &self.inner.families;
        for family in families.all() {
            family.reset();
        }
        if let Some(source) = self.inner.source.load_full() {
            let mut sink = StateSink { families };
            // The source is application code: a bug in it must cost its own series, not the
            // whole endpoint.
            if catch_unwind(AssertUnwindSafe(|| source(&mut sink))).is_err() {
                tracing::error!("the metrics state source panicked; pool and backend gauges are incomplete");
            }
        }
        families.all().into_iter().flat_map(|family| family.collect()).collect()
    }
}
