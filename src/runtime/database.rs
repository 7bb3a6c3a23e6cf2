//! A database clients can connect to: its servers (the configured primary first, then
//! the replicas), the pools of each user there, what the cluster monitor knows of each
//! server, and the choice of where writes and reads go.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use dashmap::DashMap;

use super::consistency::Fences;
use super::schema::SchemaWatch;
use super::{Observers, UserEntry};
use crate::cluster::{ClusterMonitor, ClusterView, HostHealth, Lsn, MonitorSettings, MonitorTls, Role as HostRole};
use crate::config::{
    DatabaseConfig, FunctionVolatility, LoadBalance, PoolConfig, PoolMode, RoutingConfig, ServerTlsMode, TcpOptions,
};
use crate::metrics::Metrics;
use crate::net::ServerTls;
use crate::pool::{Budgets, PoolLimits, PoolObservers, ServerPool};
use crate::registry::Registry;
use crate::route::{Classifier, ClassifierSettings};
use crate::router::Reason;
use crate::upstream::ConnectSpec;

/// Replicas kept inline in [`Candidates`]; more spill to the heap.
const CANDIDATES_INLINE: usize = 8;

/// The replicas that may serve a read, in the order to try them.
pub type Candidates = smallvec::SmallVec<[usize; CANDIDATES_INLINE]>;

/// Statements whose classification each database remembers.
const CLASSIFICATION_CACHE: usize = 10_000;

/// Most distinct startup-parameter values remembered as accepted by the servers.
const KNOWN_PARAMS_LIMIT: usize = 4096;

/// The server connections of one user in one database: one pool per host, in the order
/// of [`DatabaseEntry::hosts`].
#[derive(Debug)]
pub struct UserPools {
    pub hosts: Vec<Arc<ServerPool>>,
}

/// Why no replica can take a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoReplica {
    /// None is up and healthy.
    Unhealthy,
    /// Healthy ones lag more than max_replica_lag.
    Lagging,
    /// Healthy ones have not replayed the client's writes yet.
    Behind,
}

impl NoReplica {
    pub fn reason(self) -> Reason {
        match self {
            NoReplica::Unhealthy => Reason::NoReplica,
            NoReplica::Lagging => Reason::Lag,
            NoReplica::Behind => Reason::Consistency,
        }
    }
}

#[derive(Debug)]
pub struct DatabaseEntry {
    /// The name clients use.
    pub name: String,
    /// The name on the servers.
    pub server_dbname: String,
    pub pool: PoolConfig,
    pub routing: RoutingConfig,
    /// `host:port` of each server: the configured primary first, then the replicas.
    pub hosts: Vec<Arc<str>>,
    /// The standing of each host (a replica that refused a connection is set aside).
    pub host_health: Vec<Arc<HostHealth>>,
    /// Health, roles, positions and lag of the hosts, if monitored.
    pub monitor: Option<Arc<ClusterMonitor>>,
    /// WAL positions reads must wait for (consistency = "causal").
    pub fences: Arc<Fences>,
    /// Schema changes seen and stale statements refused, shared by its clients.
    pub schema: Arc<SchemaWatch>,
    /// How a client's LISTEN is served in transaction and statement mode.
    pub listen_notify: crate::config::ListenNotify,
    pools: DashMap<String, Arc<UserPools>>,
    metrics: Arc<Metrics>,
    registry: Arc<Registry>,
    /// max_user_connections and max_db_connections over every pool.
    budgets: Arc<Budgets>,
    /// Reads the statements clients send, for routing and session tracking.
    pub classifier: Classifier,
    /// PAUSE: while true, new transactions wait. Shared with the entry that replaces
    /// this one at a reload, so a reload does not resume a paused database.
    paused: Arc<tokio::sync::watch::Sender<bool>>,
    /// TLS towards this database's servers, shared by all its pools.
    server_tls: Arc<ServerTls>,
    /// Keepalive and user timeout of its server sockets.
    tcp: TcpOptions,
    /// Where round-robin load balancing starts next.
    next_replica: AtomicUsize,
    /// Startup parameters the servers accepted, with the value they reported back for
    /// them (None when the parameter is not reported).
    known_params: Mutex<HashMap<(String, String), Option<String>>>,
}

impl DatabaseEntry {
    pub(super) fn new(
        name: &str,
        config: &DatabaseConfig,
        defaults: &PoolConfig,
        observers: &Observers,
        server_tls: Arc<ServerTls>,
        tcp: TcpOptions,
    ) -> Self {
        let hosts: Vec<Arc<str>> = std::iter::once(&config.primary)
            .chain(&config.replicas)
            .map(|addr| Arc::from(addr.as_str()))
            .collect();
        DatabaseEntry {
            server_tls,
            tcp,
            metrics: observers.metrics.clone(),
            registry: observers.registry.clone(),
            budgets: observers.budgets.clone(),
            name: name.to_owned(),
            server_dbname: config.server_dbname(name).to_owned(),
            listen_notify: config.listen_notify,
            pool: config.pool(defaults),
            routing: config.routing.clone(),
            host_health: hosts
                .iter()
                .map(|addr| Arc::new(HostHealth::new(addr.clone())))
                .collect(),
            hosts,
            monitor: None,
            fences: Arc::new(Fences::default()),
            schema: Arc::new(SchemaWatch::default()),
            pools: DashMap::new(),
            classifier: Classifier::new(ClassifierSettings {
                write_functions: config.routing.write_functions.clone(),
                read_only_functions: config.routing.read_only_functions.clone(),
                cache_capacity: CLASSIFICATION_CACHE,
                catalog_volatility: config.routing.function_volatility == FunctionVolatility::Catalog,
            }),
            next_replica: AtomicUsize::new(0),
            paused: Arc::new(tokio::sync::watch::Sender::new(false)),
            known_params: Mutex::new(HashMap::new()),
        }
    }

    /// How side connections (the monitor's, the catalog reader's) log in, as `user`.
    pub(super) fn side_settings(&self, user: &UserEntry) -> MonitorSettings {
        MonitorSettings {
            database: self.name.clone(),
            dbname: self.server_dbname.clone(),
            hosts: self.hosts.clone(),
            user: user.server_credentials.user.clone(),
            password: user.server_credentials.password.clone(),
            health_check_interval: self.routing.health_check_interval,
            max_replica_lag: self.routing.max_replica_lag,
            connect_timeout: self.pool.server_connect_timeout.unwrap_or_default(),
            lsn_poll_interval: crate::cluster::DEFAULT_LSN_POLL_INTERVAL,
            tls: monitor_tls(&self.server_tls),
        }
    }

    /// Starts watching the hosts' health with `user`'s credentials (needs a plaintext
    /// password: the side connections log in like any client of PostgreSQL).
    pub(super) fn start_monitor(&mut self, user: &UserEntry) {
        let settings = self.side_settings(user);
        match ClusterMonitor::start(settings) {
            Ok(monitor) => {
                self.host_health = (0..self.hosts.len())
                    .map(|index| {
                        monitor
                            .health(index)
                            .cloned()
                            .unwrap_or_else(|| self.host_health[index].clone())
                    })
                    .collect();
                self.monitor = Some(monitor);
            }
            Err(error) => tracing::error!(database = %self.name, %error, "cannot monitor the servers"),
        }
    }

    /// Closes the connections to a host whose part changed (a demoted primary, a
    /// restarted server) as soon as they are idle. Runs until the entry is dropped.
    pub(super) fn watch_generations(self: &Arc<Self>) {
        let Some(monitor) = &self.monitor else { return };
        let mut changes = monitor.subscribe();
        let weak: Weak<DatabaseEntry> = Arc::downgrade(self);
        let mut seen: Vec<u64> = monitor.view().hosts.iter().map(|host| host.generation).collect();
        tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                let Some(database) = weak.upgrade() else { return };
                let view = changes.borrow_and_update().clone();
                for (index, host) in view.hosts.iter().enumerate() {
                    if seen.get(index).is_some_and(|generation| *generation != host.generation) {
                        tracing::warn!(database = %database.name, host = %host.addr, role = host.role.as_str(),
                            "server changed its part: its connections are closed once idle");
                        for (_, pools) in database.all_pools() {
                            if let Some(pool) = pools.hosts.get(index) {
                                pool.retire_connections();
                            }
                        }
                    }
                }
                seen = view.hosts.iter().map(|host| host.generation).collect();
            }
        });
    }

    pub fn view(&self) -> Option<Arc<ClusterView>> {
        self.monitor.as_ref().map(|monitor| monitor.view())
    }

    /// The host writes go to: the one the monitor found to be primary, else the
    /// configured primary.
    pub fn primary_index(&self) -> usize {
        self.view().and_then(|view| view.primary).unwrap_or(0)
    }

    /// Whether the host writes go to answers (true when not monitored).
    pub fn primary_reachable(&self) -> bool {
        match self.view() {
            Some(view) => view.primary_host().is_some_and(|host| host.up),
            None => true,
        }
    }

    /// Whether this database has replicas configured at all.
    pub fn has_replicas(&self) -> bool {
        self.hosts.len() > 1
    }

    /// The hosts that may serve a read that must see `fence` (if any), in the order
    /// load balancing prefers them; or why there is none.
    pub fn read_candidates(&self, pools: &UserPools, fence: Option<Lsn>) -> Result<Candidates, NoReplica> {
        let view = self.view();
        let primary = view.as_ref().and_then(|view| view.primary).unwrap_or(0);
        // One list, narrowed in place: inline up to CANDIDATES_INLINE hosts, so choosing
        // a replica allocates nothing.
        let mut candidates: Candidates = (0..self.hosts.len().min(pools.hosts.len()))
            .filter(|&index| index != primary && self.host_health[index].usable())
            .filter(|&index| match &view {
                Some(view) => view
                    .hosts
                    .get(index)
                    .is_some_and(|host| host.up && host.role == HostRole::Replica),
                None => true,
            })
            .collect();
        if candidates.is_empty() {
            return Err(NoReplica::Unhealthy);
        }
        if let Some(view) = &view {
            candidates.retain(|index| view.hosts[*index].usable_for_reads);
        }
        if candidates.is_empty() {
            return Err(NoReplica::Lagging);
        }
        if let (Some(fence), Some(view)) = (fence, &view) {
            candidates.retain(|index| view.hosts[*index].replay_lsn.is_some_and(|replayed| replayed >= fence));
        }
        if candidates.is_empty() {
            return Err(NoReplica::Behind);
        }
        self.balance(&mut candidates, pools);
        Ok(candidates)
    }

    fn balance(&self, candidates: &mut [usize], pools: &UserPools) {
        if candidates.len() < 2 {
            return;
        }
        match self.routing.load_balance {
            LoadBalance::RoundRobin => {
                let start = self.next_replica.fetch_add(1, Ordering::Relaxed) % candidates.len();
                candidates.rotate_left(start);
            }
            LoadBalance::Random => {
                let start = rand::random_range(0..candidates.len());
                candidates.rotate_left(start);
            }
            LoadBalance::LeastConnections => {
                // Ties are broken round robin so equal replicas share the load.
                let start = self.next_replica.fetch_add(1, Ordering::Relaxed) % candidates.len();
                candidates.rotate_left(start);
                // Each pool's load read once (a lock of its slots), not at every
                // comparison; the sort is stable, so ties keep the rotated order.
                let mut loads: smallvec::SmallVec<[(usize, usize); CANDIDATES_INLINE]> = candidates
                    .iter()
                    .map(|&index| {
                        let status = pools.hosts[index].status();
                        (status.active + status.waiting, index)
                    })
                    .collect();
                loads.sort_by_key(|&(load, _)| load);
                for (slot, (_, index)) in candidates.iter_mut().zip(loads) {
                    *slot = index;
                }
            }
        }
    }

    /// The role a host plays now, for labels.
    pub fn is_primary(&self, index: usize) -> bool {
        index == self.primary_index()
    }

    pub fn mode(&self) -> PoolMode {
        self.pool.mode
    }

    pub fn set_paused(&self, paused: bool) {
        self.paused.send_replace(paused);
    }

    pub fn is_paused(&self) -> bool {
        *self.paused.borrow()
    }

    /// Returns once the database is not paused.
    pub async fn wait_resumed(&self) {
        // Not paused (nearly always): no subscription to make and drop again.
        if !self.is_paused() {
            return;
        }
        let mut paused = self.paused.subscribe();
        let _ = paused.wait_for(|paused| !*paused).await;
    }

    /// Closes every idle server connection of this database (KILL).
    pub fn close_idle(&self) {
        for (_, pools) in self.all_pools() {
            for pool in &pools.hosts {
                pool.close_idle();
            }
        }
    }

    /// Server connections in use, over every pool of this database.
    pub fn active_servers(&self) -> usize {
        self.all_pools()
            .iter()
            .flat_map(|(_, pools)| pools.hosts.iter().map(|pool| pool.status().active))
            .sum()
    }

    /// Takes over what `old` (the same database before a reload) has that is still
    /// valid: the paused state always; the monitor, fences, pools and host standing when
    /// the servers are the same, pools only for users whose server credentials did not
    /// change. Pools get the new limits in place: a smaller size closes surplus
    /// connections when they are released, never while in use.
    pub(super) fn carry_over(&mut self, old: &DatabaseEntry, users: &HashMap<String, Arc<UserEntry>>) {
        self.paused = old.paused.clone();
        self.schema = old.schema.clone();
        if self.hosts != old.hosts || self.server_dbname != old.server_dbname {
            return;
        }
        self.host_health = old.host_health.clone();
        self.fences = old.fences.clone();
        if old.routing.health_check_interval == self.routing.health_check_interval
            && old.routing.max_replica_lag == self.routing.max_replica_lag
            && old.server_tls.config() == self.server_tls.config()
        {
            if let Some(monitor) = &self.monitor {
                monitor.stop();
            }
            self.monitor = old.monitor.clone();
        }
        // Pools keep the server connections they opened with the old TLS settings.
        if self.server_tls.config() != old.server_tls.config() {
            return;
        }
        for (user_name, pools) in old.all_pools() {
            let Some(user) = users.get(&user_name) else { continue };
            if pools
                .hosts
                .iter()
                .any(|pool| *pool.credentials() != *user.server_credentials)
            {
                continue;
            }
            let limits = self.limits(user);
            for pool in &pools.hosts {
                pool.set_limits(limits.clone());
            }
            self.pools.insert(user_name, pools);
        }
    }

    /// The pools of `user` in this database, created on first use.
    pub fn pools(&self, user: &UserEntry) -> Arc<UserPools> {
        // Pools are keyed by name, but a user entry made by another lookup (one a reload
        // replaced) has other credentials: pools made for it would keep logging in with
        // those, so they are replaced rather than shared.
        let current = |pools: &Arc<UserPools>| {
            pools
                .hosts
                .iter()
                .all(|pool| pool.uses_credentials(&user.server_credentials))
        };
        if let Some(pools) = self.pools.get(&user.name)
            && current(&pools)
        {
            return pools.clone();
        }
        if let Some(stale) = self.pools.get(&user.name).map(|pools| pools.clone())
            && !current(&stale)
        {
            self.pools.remove_if(&user.name, |_, pools| Arc::ptr_eq(pools, &stale));
        }
        self.pools
            .entry(user.name.clone())
            .or_insert_with(|| {
                let pool = |addr: &Arc<str>| {
                    ServerPool::new(
                        ConnectSpec {
                            addr: addr.clone(),
                            database: self.server_dbname.clone(),
                            credentials: user.server_credentials.clone(),
                            tls: self.server_tls.clone(),
                            tcp: self.tcp,
                            application_name: None,
                        },
                        self.limits(user),
                        PoolObservers {
                            connect_errors: Some(self.metrics.server_connect_errors(&self.name, addr)),
                            registry: Some((self.registry.clone(), self.name.clone())),
                        },
                        self.budgets.for_pool(&user.name, &self.name),
                    )
                };
                Arc::new(UserPools {
                    hosts: self.hosts.iter().map(pool).collect(),
                })
            })
            .clone()
    }

    /// Every pool created so far, with its user.
    pub fn all_pools(&self) -> Vec<(String, Arc<UserPools>)> {
        self.pools
            .iter()
            .map(|entry| (entry.key().clone(), entry.value().clone()))
            .collect()
    }

    /// The limits of `user`'s pools: this database's pool settings, and the user's own
    /// max_user_connections if its `[[users]]` entry sets one.
    fn limits(&self, user: &UserEntry) -> PoolLimits {
        let max_user_connections = user.max_user_connections.unwrap_or(self.pool.max_user_connections);
        PoolLimits {
            size: self.pool.size,
            min_size: self.pool.min_size,
            reserve_size: self.pool.reserve_size,
            reserve_timeout: self.pool.reserve_timeout,
            query_wait_timeout: self.pool.query_wait_timeout,
            connect_timeout: self.pool.server_connect_timeout,
            idle_timeout: self.pool.server_idle_timeout,
            lifetime: self.pool.server_lifetime,
            max_user_connections: (max_user_connections > 0).then_some(max_user_connections),
            max_db_connections: (self.pool.max_db_connections > 0).then_some(self.pool.max_db_connections),
        }
    }

    /// TLS towards this database's servers.
    pub(super) fn server_tls(&self) -> Arc<ServerTls> {
        self.server_tls.clone()
    }

    /// The reported value of a startup parameter the servers already accepted, or
    /// `None` if it was never checked.
    pub fn known_param(&self, name: &str, value: &str) -> Option<Option<String>> {
        let known = self.known_params.lock().ok()?;
        known.get(&(name.to_ascii_lowercase(), value.to_owned())).cloned()
    }

    pub fn remember_param(&self, name: &str, value: &str, reported: Option<String>) {
        if let Ok(mut known) = self.known_params.lock() {
            if known.len() >= KNOWN_PARAMS_LIMIT {
                known.clear();
            }
            known.insert((name.to_ascii_lowercase(), value.to_owned()), reported);
        }
    }

    /// Stops every pool and the monitor: idle connections close now, busy ones when
    /// released.
    pub fn close(&self) {
        for entry in self.pools.iter() {
            for pool in &entry.hosts {
                pool.close();
            }
        }
        if let Some(monitor) = &self.monitor {
            monitor.stop();
        }
    }
}

/// The monitor's TLS for a database's `server_tls`: the pooled connections' rustls settings
/// (certificate checks included for verify-full) with libpq's fallback rules.
fn monitor_tls(server_tls: &ServerTls) -> Option<MonitorTls> {
    use tokio_postgres::config::SslMode;
    let mode = match server_tls.mode() {
        ServerTlsMode::Disable => return None,
        ServerTlsMode::Prefer => SslMode::Prefer,
        ServerTlsMode::Require | ServerTlsMode::VerifyFull => SslMode::Require,
    };
    let config = server_tls.connector()?.config().as_ref().clone();
    Some(MonitorTls {
        mode,
        connector: tokio_postgres_rustls::MakeRustlsConnect::new(config),
    })
}
