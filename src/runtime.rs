//! The running state built from a config: users, databases and their pools, behind one
//! `ArcSwap` so a reload replaces it in one step. Sessions load it once per connection
//! and keep what they resolved (their database, user and pools) for their lifetime.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use dashmap::DashMap;

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::auth::{ScramVerifier, Secret};
use crate::cancel::CancelRegistry;
use crate::cluster::HostHealth;
use crate::config::{AuthMethod, Config, DatabaseConfig, LoadBalance, PoolConfig, PoolMode, RoutingConfig};
use crate::metrics::Metrics;
use crate::pool::{PoolLimits, PoolObservers, ServerPool};
use crate::registry::Registry;
use crate::route::{Classifier, ClassifierSettings};
use crate::upstream::{ConnectSpec, ServerCredentials};

/// Limits that apply to every client connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientLimits {
    pub max_client_conn: usize,
    pub login_timeout: Option<Duration>,
    pub idle_timeout: Option<Duration>,
    pub max_message_size: usize,
}

/// How a client proves it is a user.
#[derive(Debug, Clone)]
pub enum ClientAuth {
    Trust,
    Md5(Secret),
    Scram(ScramVerifier),
}

/// A `[[users]]` entry, ready for use.
#[derive(Debug)]
pub struct UserEntry {
    pub name: String,
    pub auth: ClientAuth,
    pub server_credentials: Arc<ServerCredentials>,
}

/// The server connections of one user in one database.
#[derive(Debug)]
pub struct UserPools {
    pub primary: Arc<ServerPool>,
    pub replicas: Vec<Arc<ServerPool>>,
}

/// Statements whose classification each database remembers.
const CLASSIFICATION_CACHE: usize = 10_000;

/// Most distinct startup-parameter values remembered as accepted by the servers.
const KNOWN_PARAMS_LIMIT: usize = 4096;

/// A database clients can connect to.
#[derive(Debug)]
pub struct DatabaseEntry {
    /// The name clients use.
    pub name: String,
    /// The name on the servers.
    pub server_dbname: String,
    pub pool: PoolConfig,
    pub routing: RoutingConfig,
    pub primary: Arc<str>,
    pub replicas: Vec<Arc<str>>,
    pools: DashMap<String, Arc<UserPools>>,
    metrics: Arc<Metrics>,
    registry: Arc<Registry>,
    /// Reads the statements clients send, for routing and session tracking.
    pub classifier: Classifier,
    /// The standing of each replica, in the order of `replicas`.
    pub replica_health: Vec<Arc<HostHealth>>,
    /// PAUSE: while true, new transactions wait. Shared with the entry that replaces
    /// this one at a reload, so a reload does not resume a paused database.
    paused: Arc<tokio::sync::watch::Sender<bool>>,
    /// Where round-robin load balancing starts next.
    next_replica: AtomicUsize,
    /// Startup parameters the servers accepted, with the value they reported back for
    /// them (None when the parameter is not reported).
    known_params: Mutex<HashMap<(String, String), Option<String>>>,
}

impl DatabaseEntry {
    fn new(name: &str, config: &DatabaseConfig, defaults: &PoolConfig, observers: &Observers) -> Self {
        DatabaseEntry {
            metrics: observers.metrics.clone(),
            registry: observers.registry.clone(),
            name: name.to_owned(),
            server_dbname: config.server_dbname(name).to_owned(),
            pool: config.pool(defaults),
            routing: config.routing.clone(),
            primary: Arc::from(config.primary.as_str()),
            replicas: config.replicas.iter().map(|addr| Arc::from(addr.as_str())).collect(),
            pools: DashMap::new(),
            classifier: Classifier::new(ClassifierSettings {
                write_functions: config.routing.write_functions.clone(),
                read_only_functions: config.routing.read_only_functions.clone(),
                cache_capacity: CLASSIFICATION_CACHE,
            }),
            replica_health: config
                .replicas
                .iter()
                .map(|addr| Arc::new(HostHealth::new(Arc::from(addr.as_str()))))
                .collect(),
            next_replica: AtomicUsize::new(0),
            paused: Arc::new(tokio::sync::watch::Sender::new(false)),
            known_params: Mutex::new(HashMap::new()),
        }
    }

    pub fn set_paused(&self, paused: bool) {
        self.paused.send_replace(paused);
    }

    pub fn is_paused(&self) -> bool {
        *self.paused.borrow()
    }

    /// Returns once the database is not paused.
    pub async fn wait_resumed(&self) {
        let mut paused = self.paused.subscribe();
        let _ = paused.wait_for(|paused| !*paused).await;
    }

    /// Closes every idle server connection of this database (KILL).
    pub fn close_idle(&self) {
        for (_, pools) in self.all_pools() {
            pools.primary.close_idle();
            for replica in &pools.replicas {
                replica.close_idle();
            }
        }
    }

    /// Server connections in use, over every pool of this database.
    pub fn active_servers(&self) -> usize {
        self.all_pools()
            .iter()
            .map(|(_, pools)| {
                pools.primary.status().active + pools.replicas.iter().map(|pool| pool.status().active).sum::<usize>()
            })
            .sum()
    }

    /// Takes over what `old` (the same database before a reload) has that is still
    /// valid: the paused state always; the pools and replica standing when the servers
    /// are the same, for every user whose server credentials did not change. Pools get
    /// the new limits in place: a smaller size closes surplus connections when they are
    /// released, never while in use.
    fn carry_over(&mut self, old: &DatabaseEntry, users: &HashMap<String, Arc<UserEntry>>) {
        self.paused = old.paused.clone();
        let same_servers =
            self.primary == old.primary && self.replicas == old.replicas && self.server_dbname == old.server_dbname;
        if !same_servers {
            return;
        }
        self.replica_health = old.replica_health.clone();
        let limits = self.limits();
        for (user_name, pools) in old.all_pools() {
            let Some(user) = users.get(&user_name) else { continue };
            if *pools.primary.credentials() != *user.server_credentials {
                continue;
            }
            pools.primary.set_limits(limits.clone());
            for replica in &pools.replicas {
                replica.set_limits(limits.clone());
            }
            self.pools.insert(user_name, pools);
        }
    }

    /// Whether some replica may take reads now.
    pub fn replica_usable(&self) -> bool {
        self.replica_health.iter().any(|health| health.usable())
    }

    /// The usable replicas of `pools` in the order load balancing prefers them.
    pub fn replicas_to_try(&self, pools: &UserPools) -> Vec<usize> {
        let mut usable: Vec<usize> = (0..self.replica_health.len().min(pools.replicas.len()))
            .filter(|&index| self.replica_health[index].usable())
            .collect();
        if usable.len() < 2 {
            return usable;
        }
        match self.routing.load_balance {
            LoadBalance::RoundRobin => {
                let start = self.next_replica.fetch_add(1, Ordering::Relaxed) % usable.len();
                usable.rotate_left(start);
            }
            LoadBalance::Random => {
                let start = rand::random_range(0..usable.len());
                usable.rotate_left(start);
            }
            LoadBalance::LeastConnections => {
                // Ties are broken round robin so equal replicas share the load.
                let start = self.next_replica.fetch_add(1, Ordering::Relaxed) % usable.len();
                usable.rotate_left(start);
                usable.sort_by_key(|&index| {
                    let status = pools.replicas[index].status();
                    status.active + status.waiting
                });
            }
        }
        usable
    }

    pub fn mode(&self) -> PoolMode {
        self.pool.mode
    }

    /// The pools of `user` in this database, created on first use.
    pub fn pools(&self, user: &UserEntry) -> Arc<UserPools> {
        if let Some(pools) = self.pools.get(&user.name) {
            return pools.clone();
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
                        },
                        self.limits(),
                        PoolObservers {
                            connect_errors: Some(self.metrics.server_connect_errors(&self.name, addr)),
                            registry: Some((self.registry.clone(), self.name.clone())),
                        },
                    )
                };
                Arc::new(UserPools {
                    primary: pool(&self.primary),
                    replicas: self.replicas.iter().map(pool).collect(),
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

    fn limits(&self) -> PoolLimits {
        PoolLimits {
            size: self.pool.size,
            min_size: self.pool.min_size,
            reserve_size: self.pool.reserve_size,
            reserve_timeout: self.pool.reserve_timeout,
            query_wait_timeout: self.pool.query_wait_timeout,
            connect_timeout: self.pool.server_connect_timeout,
            idle_timeout: self.pool.server_idle_timeout,
            lifetime: self.pool.server_lifetime,
        }
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

    /// Stops every pool: idle connections close now, busy ones when released.
    pub fn close(&self) {
        for entry in self.pools.iter() {
            entry.primary.close();
            for replica in &entry.replicas {
                replica.close();
            }
        }
    }
}

/// What outlives a config: metrics and the registry of connections.
#[derive(Debug, Clone)]
pub struct Observers {
    pub metrics: Arc<Metrics>,
    pub registry: Arc<Registry>,
}

/// Why a config could not be turned into a running state.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("users.{user}: {reason}")]
    User { user: String, reason: String },
}

/// One consistent view of users, databases and pools.
#[derive(Debug)]
pub struct Snapshot {
    pub config: Arc<Config>,
    pub client_limits: ClientLimits,
    users: HashMap<String, Arc<UserEntry>>,
    databases: HashMap<String, Arc<DatabaseEntry>>,
    /// The `"*"` entry: databases not listed are created from it on first use.
    fallback: Option<DatabaseConfig>,
    dynamic: DashMap<String, Arc<DatabaseEntry>>,
    observers: Observers,
}

/// The name of the admin console's database.
pub const ADMIN_DATABASE: &str = "pgrelay";

impl Snapshot {
    /// Builds users and databases; pools are created when first used.
    pub fn build(config: Config, observers: &Observers) -> Result<Snapshot, BuildError> {
        let users = config
            .users
            .iter()
            .map(|user| Ok((user.name.clone(), Arc::new(build_user(user)?))))
            .collect::<Result<HashMap<_, _>, BuildError>>()?;
        let databases = config
            .databases
            .iter()
            .filter(|(name, _)| name.as_str() != "*")
            .map(|(name, database)| {
                (
                    name.clone(),
                    Arc::new(DatabaseEntry::new(name, database, &config.pool, observers)),
                )
            })
            .collect();
        let fallback = config.databases.get("*").cloned();
        let client_limits = ClientLimits {
            max_client_conn: config.server.max_client_conn,
            login_timeout: config.server.client_login_timeout,
            idle_timeout: config.server.client_idle_timeout,
            max_message_size: config.server.max_message_size,
        };
        Ok(Snapshot {
            config: Arc::new(config),
            client_limits,
            users,
            databases,
            fallback,
            dynamic: DashMap::new(),
            observers: observers.clone(),
        })
    }

    /// Takes over from the snapshot this one replaces whatever is still valid (see
    /// [`DatabaseEntry::carry_over`]). Call before the snapshot is shared.
    pub fn carry_over(&mut self, old: &Snapshot) {
        for (name, entry) in self.databases.iter_mut() {
            if let (Some(old_entry), Some(entry)) = (old.databases.get(name), Arc::get_mut(entry)) {
                entry.carry_over(old_entry, &self.users);
            }
        }
        if self.fallback == old.fallback {
            for old_entry in old.dynamic.iter() {
                if self.databases.contains_key(old_entry.key()) {
                    continue;
                }
                if let Some(fallback) = &self.fallback {
                    let mut entry = DatabaseEntry::new(old_entry.key(), fallback, &self.config.pool, &self.observers);
                    entry.carry_over(old_entry.value(), &self.users);
                    self.dynamic.insert(old_entry.key().clone(), Arc::new(entry));
                }
            }
        }
    }

    pub fn user(&self, name: &str) -> Option<Arc<UserEntry>> {
        self.users.get(name).cloned()
    }

    /// The database a client asked for: a configured one, or one made from `"*"`.
    pub fn database(&self, name: &str) -> Option<Arc<DatabaseEntry>> {
        if let Some(database) = self.databases.get(name) {
            return Some(database.clone());
        }
        let fallback = self.fallback.as_ref()?;
        if name.is_empty() || name == ADMIN_DATABASE {
            return None;
        }
        Some(
            self.dynamic
                .entry(name.to_owned())
                .or_insert_with(|| Arc::new(DatabaseEntry::new(name, fallback, &self.config.pool, &self.observers)))
                .clone(),
        )
    }

    /// Every database in use: configured ones and those made from `"*"`.
    pub fn all_databases(&self) -> Vec<Arc<DatabaseEntry>> {
        let mut all: Vec<_> = self.databases.values().cloned().collect();
        all.extend(self.dynamic.iter().map(|entry| entry.value().clone()));
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    pub fn is_admin(&self, user: &str) -> bool {
        self.config.server.admin_users.iter().any(|admin| admin == user)
    }

    pub fn is_stats_user(&self, user: &str) -> bool {
        self.config.server.stats_users.iter().any(|stats| stats == user)
    }
}

fn build_user(user: &crate::config::UserConfig) -> Result<UserEntry, BuildError> {
    let invalid = |reason: String| BuildError::User {
        user: user.name.clone(),
        reason,
    };
    let secret = user
        .password
        .as_deref()
        .map(Secret::parse)
        .transpose()
        .map_err(|error| invalid(error.to_string()))?;
    let auth = match (user.auth, &secret) {
        (AuthMethod::Trust, _) => ClientAuth::Trust,
        (AuthMethod::Md5, Some(secret)) if secret.can_verify_md5() => ClientAuth::Md5(secret.clone()),
        (AuthMethod::ScramSha256, Some(secret)) => ClientAuth::Scram(
            secret
                .to_scram_verifier()
                .ok_or_else(|| invalid("an md5 hash cannot be used for scram-sha-256".to_owned()))?,
        ),
        (AuthMethod::Md5, Some(_)) => {
            return Err(invalid("a SCRAM verifier cannot be used for md5".to_owned()));
        }
        (_, None) => return Err(invalid("a password is required unless auth = \"trust\"".to_owned())),
    };
    let server_password = user.password_for_server();
    let (password, md5_hash) = match server_password.map(Secret::parse) {
        Some(Ok(Secret::Md5(_))) => (None, server_password.map(str::to_owned)),
        Some(Ok(Secret::Plain(password))) => (Some(password), None),
        _ => (None, None),
    };
    Ok(UserEntry {
        name: user.name.clone(),
        auth,
        server_credentials: Arc::new(ServerCredentials {
            user: user.name.clone(),
            password,
            md5_hash,
        }),
    })
}

/// State shared by every task of a running pgrelay.
#[derive(Debug)]
pub struct Shared {
    snapshot: ArcSwap<Snapshot>,
    pub cancel: Arc<CancelRegistry>,
    /// Client connections past the startup packet.
    pub clients: std::sync::atomic::AtomicUsize,
    /// Salts the fake SCRAM exchange run for unknown users.
    pub mock_secret: [u8; 32],
    /// Turns true when pgrelay starts shutting down.
    shutting_down: tokio::sync::watch::Sender<bool>,
    accepting: std::sync::atomic::AtomicBool,
    pub metrics: Arc<Metrics>,
    /// Connected clients and server connections, for the admin console.
    pub registry: Arc<Registry>,
    /// The file a reload reads, if pgrelay was started from one.
    config_path: Option<std::path::PathBuf>,
    /// The admin console's SHUTDOWN.
    shutdown_requested: tokio::sync::Notify,
}

impl Shared {
    pub fn new(snapshot: Snapshot, observers: Observers, config_path: Option<std::path::PathBuf>) -> Arc<Shared> {
        Arc::new(Shared {
            config_path,
            shutdown_requested: tokio::sync::Notify::new(),
            metrics: observers.metrics,
            registry: observers.registry,
            snapshot: ArcSwap::from_pointee(snapshot),
            cancel: Arc::new(CancelRegistry::default()),
            clients: std::sync::atomic::AtomicUsize::new(0),
            mock_secret: rand::random(),
            shutting_down: tokio::sync::watch::Sender::new(false),
            accepting: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Tells every session to end once its client is outside a transaction.
    pub fn begin_shutdown(&self) {
        self.accepting.store(false, std::sync::atomic::Ordering::Release);
        self.shutting_down.send_replace(true);
    }

    pub fn config_path(&self) -> Option<std::path::PathBuf> {
        self.config_path.clone()
    }

    pub fn observers(&self) -> Observers {
        Observers {
            metrics: self.metrics.clone(),
            registry: self.registry.clone(),
        }
    }

    /// Asks the app to shut down gracefully (admin SHUTDOWN).
    pub fn request_shutdown(&self) {
        self.shutdown_requested.notify_one();
    }

    /// Resolves when a shutdown was requested through [`Shared::request_shutdown`].
    pub async fn shutdown_requested(&self) {
        self.shutdown_requested.notified().await;
    }

    pub fn set_accepting(&self, accepting: bool) {
        self.accepting.store(accepting, std::sync::atomic::Ordering::Release);
    }

    /// What /readyz reports: accepting clients (and not shutting down).
    pub fn is_ready(&self) -> bool {
        self.accepting.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Resolves when shutdown begins.
    pub fn shutting_down(&self) -> tokio::sync::watch::Receiver<bool> {
        self.shutting_down.subscribe()
    }

    /// Makes `next` the state new clients see; returns the previous one.
    pub fn swap(&self, next: Snapshot) -> Arc<Snapshot> {
        self.snapshot.swap(Arc::new(next))
    }
}
