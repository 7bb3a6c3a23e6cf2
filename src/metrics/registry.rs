//! The registry: every `pgrelay_*` family built once with its name, type, labels and HELP,
//! and [`Metrics`], the one object the rest of pgrelay holds.

use std::sync::Arc;

use dashmap::DashMap;
use prometheus::core::Collector;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

use super::handles::{DatabaseHandles, SessionMetrics};
use super::labels::{CancelResult, LoginRefusal, NO_DATABASE, ReloadOutcome, TakeoverResult, sqlstate_label};
use super::scrape::{StateCollector, StateSink};

/// Upper bounds (seconds) shared by both histograms: 50 µs (a checkout from a warm pool, a
/// cached point read) to 30 s (the default `query_wait_timeout`), in 1-2.5-5 steps. Round
/// values make `le` labels readable and let alerts and SLOs use a bound exactly (`le="1"`).
pub const LATENCY_BUCKETS: [f64; 18] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 30.0,
];

/// A failure to build the registry (a bug: names and labels are constants) or to encode it.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics registry: {0}")]
    Prometheus(#[from] prometheus::Error),
}

/// The families counted through handles. Those filled at scrape time live in the
/// [`StateCollector`].
#[derive(Clone)]
pub(crate) struct Families {
    pub(crate) clients: IntGaugeVec,
    pub(crate) pool_wait: HistogramVec,
    pub(crate) queries: IntCounterVec,
    pub(crate) transactions: IntCounterVec,
    pub(crate) query_duration: HistogramVec,
    pub(crate) routing: IntCounterVec,
    pub(crate) connect_errors: IntCounterVec,
    pub(crate) client_errors: IntCounterVec,
    pub(crate) pinned: IntGaugeVec,
    pub(crate) evictions: IntCounterVec,
    pub(crate) build_info: IntGaugeVec,
    pub(crate) reloads: IntCounterVec,
    pub(crate) runtime_stalls: IntCounter,
    pub(crate) retries: IntCounterVec,
    pub(crate) login_refusals: IntCounterVec,
    pub(crate) cancels: IntCounterVec,
    pub(crate) cancel_forward_failures: IntCounter,
    pub(crate) listen_clients: IntGaugeVec,
    pub(crate) listen_channels: IntGaugeVec,
    pub(crate) notifications: IntCounterVec,
    pub(crate) takeover_clients: IntCounterVec,
}

impl Families {
    fn new(registry: &Registry) -> Result<Families, prometheus::Error> {
        let families = Families {
            clients: IntGaugeVec::new(
                Opts::new(
                    "pgrelay_clients",
                    "Logged-in client connections by state: active (linked to a server), waiting (queued for a server), idle.",
                ),
                &["database", "user", "state"],
            )?,
            pool_wait: HistogramVec::new(
                HistogramOpts::new(
                    "pgrelay_pool_wait_seconds",
                    "Time clients waited for a server connection, one observation per checkout, including waits that timed out.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["database", "user"],
            )?,
            queries: IntCounterVec::new(
                Opts::new("pgrelay_queries_total", "Statements forwarded to a server."),
                &["database", "user", "role"],
            )?,
            transactions: IntCounterVec::new(
                Opts::new(
                    "pgrelay_transactions_total",
                    "Transactions completed (server back to idle), autocommit statements included.",
                ),
                &["database", "user", "role"],
            )?,
            query_duration: HistogramVec::new(
                HistogramOpts::new(
                    "pgrelay_query_duration_seconds",
                    "Statement latency seen by pgrelay: from forwarding a statement to its completion by the server.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["database", "role"],
            )?,
            routing: IntCounterVec::new(
                Opts::new(
                    "pgrelay_routing_decisions_total",
                    "Routing decisions by the role chosen and the reason for it.",
                ),
                &["database", "role", "reason"],
            )?,
            connect_errors: IntCounterVec::new(
                Opts::new(
                    "pgrelay_server_connect_errors_total",
                    "Failed attempts to open or authenticate a server connection.",
                ),
                &["database", "host"],
            )?,
            client_errors: IntCounterVec::new(
                Opts::new(
                    "pgrelay_client_errors_total",
                    "ErrorResponses pgrelay itself sent to clients (not those forwarded from servers), by SQLSTATE.",
                ),
                &["database", "sqlstate"],
            )?,
            pinned: IntGaugeVec::new(
                Opts::new(
                    "pgrelay_pinned_sessions",
                    "Clients pinned to their server connection by session state, by reason; a client pinned for two reasons counts under both.",
                ),
                &["database", "reason"],
            )?,
            evictions: IntCounterVec::new(
                Opts::new(
                    "pgrelay_prepared_statements_evictions_total",
                    "Server-side prepared statements closed by the per-connection LRU (max_prepared_statements).",
                ),
                &["database"],
            )?,
            build_info: IntGaugeVec::new(
                Opts::new("pgrelay_build_info", "Always 1; the version label says which pgrelay is running."),
                &["version"],
            )?,
            reloads: IntCounterVec::new(
                Opts::new(
                    "pgrelay_config_reloads_total",
                    "Configuration reloads (SIGHUP or admin RELOAD) by result; on error the running configuration is unchanged.",
                ),
                &["result"],
            )?,
            runtime_stalls: IntCounter::new(
                "pgrelay_runtime_stalls_total",
                "Times a worker thread was kept by one task longer than the watchdog's threshold (1 s), or the runtime missed its heartbeat; each stall counts once.",
            )?,
            retries: IntCounterVec::new(
                Opts::new(
                    "pgrelay_retries_total",
                    "Work pgrelay did again because a server failed before it ran: reason = connect (a checkout whose server refused or reset the login, tried again within query_wait_timeout), read (a read-only statement re-run on another server).",
                ),
                &["database", "reason"],
            )?,
            login_refusals: IntCounterVec::new(
                Opts::new(
                    "pgrelay_login_refusals_total",
                    "Logins refused by reason: rate (a login-rate bucket of the address or user was empty), ban (the address failed too often), hba (no client address rule let it in), limit (max_client_conn, max_client_conn_per_user, max_client_conn_per_address), password (a wrong password, an unknown user, or a failed SCRAM channel binding).",
                ),
                &["reason"],
            )?,
            cancels: IntCounterVec::new(
                Opts::new(
                    "pgrelay_cancel_requests_total",
                    "CancelRequests by what became of them: local (applied here), received (from a peer, applied here), forwarded (another instance's key, sent to the peers), unknown (this instance's id, no client holds the key), peer_unknown (from a peer, not a client of this instance), limited (not forwarded: rate or in-flight limit), no_peers (not forwarded: no peer to send it to).",
                ),
                &["result"],
            )?,
            cancel_forward_failures: IntCounter::new(
                "pgrelay_cancel_forward_failures_total",
                "Peers a forwarded cancel request could not be sent to (connection refused or timed out, name not resolved).",
            )?,
            listen_clients: IntGaugeVec::new(
                Opts::new(
                    "pgrelay_listen_clients",
                    "Clients listening through the database's listener connection (listen_notify = \"fanout\"): each LISTENs to at least one channel.",
                ),
                &["database"],
            )?,
            listen_channels: IntGaugeVec::new(
                Opts::new(
                    "pgrelay_listen_channels",
                    "Channels the database's listener connection LISTENs to: the union of its clients' channels.",
                ),
                &["database"],
            )?,
            notifications: IntCounterVec::new(
                Opts::new(
                    "pgrelay_notifications_total",
                    "Notifications from the listener connection, counted per listening client: result = delivered (queued for the client), dropped (its queue was full, or it left before reading them).",
                ),
                &["database", "result"],
            )?,
            takeover_clients: IntCounterVec::new(
                Opts::new(
                    "pgrelay_takeover_clients_total",
                    "Clients at a socket takeover by what became of them: handed_over (sent to the new process), received (adopted from the old process), kept (could not move, finished on the old process), failed (sent but not adopted by the new process). The old process's counts are passed on to the new one when it exits.",
                ),
                &["result"],
            )?,
        };
        let collectors: [Box<dyn Collector>; 21] = [
            Box::new(families.clients.clone()),
            Box::new(families.pool_wait.clone()),
            Box::new(families.queries.clone()),
            Box::new(families.transactions.clone()),
            Box::new(families.query_duration.clone()),
            Box::new(families.routing.clone()),
            Box::new(families.connect_errors.clone()),
            Box::new(families.client_errors.clone()),
            Box::new(families.pinned.clone()),
            Box::new(families.evictions.clone()),
            Box::new(families.build_info.clone()),
            Box::new(families.reloads.clone()),
            Box::new(families.runtime_stalls.clone()),
            Box::new(families.retries.clone()),
            Box::new(families.login_refusals.clone()),
            Box::new(families.cancels.clone()),
            Box::new(families.cancel_forward_failures.clone()),
            Box::new(families.listen_clients.clone()),
            Box::new(families.listen_channels.clone()),
            Box::new(families.notifications.clone()),
            Box::new(families.takeover_clients.clone()),
        ];
        for collector in collectors {
            registry.register(collector)?;
        }
        Ok(families)
    }
}

/// Every metric of one running pgrelay. Build one with [`Metrics::new`] at startup and share it
/// as `Arc<Metrics>`; it lives as long as the process.
///
/// Hot-path counting goes through handles resolved once per login ([`Metrics::session`]) or
/// per pool ([`Metrics::server_connect_errors`]); pool, server and backend gauges are read at
/// scrape time from the source given to [`Metrics::set_state_source`].
pub struct Metrics {
    registry: Registry,
    families: Families,
    /// Per-database handles (and their per-user handles), built on first use and kept: the
    /// series they point at are never removed, so a cached handle never counts into a series
    /// that the registry no longer exports.
    databases: DashMap<Box<str>, Arc<DatabaseHandles>>,
    reloads: [IntCounter; 2],
    login_refusals: [IntCounter; 5],
    cancels: [IntCounter; 7],
    takeover_clients: [IntCounter; 4],
    state: StateCollector,
}

impl Metrics {
    /// Builds the registry with every family. Fails only on a programming error (an invalid
    /// name or a duplicate family): treat it as a startup error.
    pub fn new() -> Result<Metrics, MetricsError> {
        let registry = Registry::new();
        let families = Families::new(&registry)?;
        let state = StateCollector::new()?;
        registry.register(Box::new(state.clone()))?;

        families
            .build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        // Both results exist from the start, so an alert on increase(…{result="error"}) fires on
        // the first failure rather than waiting for a second one.
        let reloads = ReloadOutcome::ALL.map(|outcome| families.reloads.with_label_values(&[outcome.label()]));
        // Every reason from the start, for the same reason.
        let login_refusals =
            LoginRefusal::ALL.map(|reason| families.login_refusals.with_label_values(&[reason.label()]));
        let cancels = CancelResult::ALL.map(|result| families.cancels.with_label_values(&[result.label()]));
        let takeover_clients =
            TakeoverResult::ALL.map(|result| families.takeover_clients.with_label_values(&[result.label()]));

        Ok(Metrics {
            registry,
            families,
            databases: DashMap::new(),
            reloads,
            login_refusals,
            cancels,
            takeover_clients,
            state,
        })
    }

    /// The registry, for a part that wants to register a family of its own.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Handles for one logged-in client of `database` as `user`. Call once, after the client
    /// authenticated (never with names a client chose but pgrelay does not serve: each pair
    /// creates series). Costs two map look-ups; every use afterwards is an atomic add.
    ///
    /// Calling it for every configured pair when building pools makes their series exist at 0
    /// before the first client, which keeps `rate()` and `increase()` exact from the start.
    pub fn session(&self, database: &str, user: &str) -> SessionMetrics {
        let database = self.database(database);
        let user = database.user(&self.families, user);
        SessionMetrics::new(database, user)
    }

    /// The counter a pool (or whatever opens server connections) increments on each failed
    /// connect or login to `host` (`addr:port`) for `database`. Resolve once per pool.
    pub fn server_connect_errors(&self, database: &str, host: &str) -> IntCounter {
        self.families.connect_errors.with_label_values(&[database, host])
    }

    /// The counter for server-side prepared statements of `database` closed by the LRU, for
    /// the part that owns a server connection's statement cache. Resolve once.
    pub fn prepared_statement_evictions(&self, database: &str) -> IntCounter {
        self.database(database).evictions.clone()
    }

    /// Counts an ErrorResponse pgrelay sent to a client that has no [`SessionMetrics`] yet
    /// (refused during startup or login). `database`: the configured database the client asked
    /// for, or `None` when there is none (unknown database, malformed startup, too many
    /// clients): the series then gets `database=""`. Errors are rare, so the label look-up
    /// here is fine.
    pub fn client_error(&self, database: Option<&str>, sqlstate: &str) {
        match database {
            Some(database) => self.database(database).client_error(sqlstate),
            None => self
                .families
                .client_errors
                .with_label_values(&[NO_DATABASE, sqlstate_label(sqlstate)])
                .inc(),
        }
    }

    /// Counts one refused login.
    pub fn login_refusal(&self, reason: LoginRefusal) {
        self.login_refusals[reason.index()].inc();
    }

    /// Counts one CancelRequest by what became of it.
    pub fn cancel_request(&self, result: CancelResult) {
        self.cancels[result.index()].inc();
    }

    /// Counts `count` clients of a socket takeover by what became of them.
    pub fn takeover_clients(&self, result: TakeoverResult, count: u64) {
        self.takeover_clients[result.index()].inc_by(count);
    }

    /// The count of one result so far (passed on to the new process at exit).
    pub fn takeover_clients_so_far(&self, result: TakeoverResult) -> u64 {
        self.takeover_clients[result.index()].get()
    }

    /// Counts one peer a forwarded cancel could not be sent to.
    pub fn cancel_forward_failure(&self) {
        self.families.cancel_forward_failures.inc();
    }

    /// Counts one configuration reload.
    pub fn config_reload(&self, outcome: ReloadOutcome) {
        self.reloads[outcome.index()].inc();
    }

    /// Counts one retry for `database` (`reason`: connect, read). Rare: the label look-up
    /// here is fine.
    pub fn retry(&self, database: &str, reason: &str) {
        self.families.retries.with_label_values(&[database, reason]).inc();
    }

    /// Counts one refused login (`reason`: password, channel_binding). Rare: the label look-up here is fine.
    pub fn login_refused(&self, reason: &str) {
        self.families.login_refusals.with_label_values(&[reason]).inc();
    }

    /// The handles of one database's listener hub (listen_notify = "fanout"). Resolve once per
    /// hub; both results of pgrelay_notifications_total exist from then on.
    pub fn notify(&self, database: &str) -> NotifyMetrics {
        NotifyMetrics {
            clients: self.families.listen_clients.with_label_values(&[database]),
            channels: self.families.listen_channels.with_label_values(&[database]),
            delivered: self.families.notifications.with_label_values(&[database, "delivered"]),
            dropped: self.families.notifications.with_label_values(&[database, "dropped"]),
        }
    }

    /// Counts one stall seen by the watchdog.
    pub fn runtime_stall(&self) {
        self.families.runtime_stalls.inc();
    }

    /// Installs the callback that reports pools, backends and replica lag at each scrape,
    /// replacing any earlier one. It runs on the thread serving `/metrics`, once per scrape,
    /// and must not block: read counters and snapshots, take no lock that a session holds
    /// long. A series it stops reporting (a pool removed by a reload) disappears at the next
    /// scrape. A panic in it is caught and logged; the scrape then shows what was reported.
    pub fn set_state_source(&self, source: impl Fn(&mut StateSink<'_>) + Send + Sync + 'static) {
        self.state.set_source(Box::new(source));
    }

    /// Every family, current values (runs the state source).
    pub fn gather(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.registry.gather()
    }

    /// The body of `/metrics`: Prometheus text format 0.0.4 ([`prometheus::TEXT_FORMAT`]).
    pub fn render(&self) -> Result<Vec<u8>, MetricsError> {
        let families = self.gather();
        let mut body = Vec::with_capacity(16 * 1024);
        TextEncoder::new().encode(&families, &mut body)?;
        Ok(body)
    }

    fn database(&self, database: &str) -> Arc<DatabaseHandles> {
        if let Some(found) = self.databases.get(database) {
            return found.clone();
        }
        // Built outside the map's lock; if two logins race, one build is dropped, and both get
        // the same entry: with_label_values hands out the same series either way.
        let built = Arc::new(DatabaseHandles::new(&self.families, database));
        self.databases.entry(database.into()).or_insert(built).clone()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Metrics")
            .field("databases", &self.databases.len())
            .finish_non_exhaustive()
    }
}

/// Handles of one database's notification fan-out (see [`Metrics::notify`]).
#[derive(Debug, Clone)]
pub struct NotifyMetrics {
    /// pgrelay_listen_clients{database}
    pub clients: prometheus::IntGauge,
    /// pgrelay_listen_channels{database}
    pub channels: prometheus::IntGauge,
    /// pgrelay_notifications_total{database,result="delivered"}
    pub delivered: IntCounter,
    /// pgrelay_notifications_total{database,result="dropped"}
    pub dropped: IntCounter,
}
