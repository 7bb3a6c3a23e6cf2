//! The running state built from a config: users, databases and their pools, behind one
//! `ArcSwap` so a reload replaces it in one step. Sessions load it once per connection
//! and keep what they resolved (their database, user and pools) for their lifetime.

mod auth_query;
mod consistency;
mod database;
mod schema;
mod volatility;

pub use auth_query::{AuthCache, AuthLookup, LOOKUP_APPLICATION_NAME, LookupError, LookupSettings};
pub use consistency::Fences;
pub use database::{DatabaseEntry, NoReplica, UserPools};
pub use schema::{SchemaWatch, StaleStatement};

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use dashmap::DashMap;

use crate::access::{Access, AccessSettings, HbaRules};
use crate::auth::{ScramVerifier, Secret};
use crate::cancel::CancelRegistry;
use crate::config::hba::{HbaMethod, HbaSource};
use crate::config::{AuthMethod, Config, DatabaseConfig};
use crate::metrics::Metrics;
use crate::net::{ClientTls, ServerTls, TlsError};
use crate::pool::Budgets;
use crate::registry::Registry;
use crate::upstream::ServerCredentials;

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
    /// Not in `[[users]]`: the password comes from the database's auth_query at each login
    /// (see [`AuthLookup`]); this entry only carries the user's pools and credentials.
    Query,
    /// The password in clear (hba method `password`), checked against the secret.
    Cleartext(Secret),
}

/// A `[[users]]` entry, ready for use.
#[derive(Debug)]
pub struct UserEntry {
    pub name: String,
    pub auth: ClientAuth,
    pub server_credentials: Arc<ServerCredentials>,
    /// Its own `max_user_connections` (0: no limit); `None` (and users found by
    /// auth_query): `[pool]`'s applies.
    pub max_user_connections: Option<usize>,
}

/// What outlives a config: metrics and the registry of connections.
#[derive(Debug, Clone)]
pub struct Observers {
    pub metrics: Arc<Metrics>,
    pub registry: Arc<Registry>,
    /// Server connections per user and per database over every pool
    /// (max_user_connections, max_db_connections).
    pub budgets: Arc<Budgets>,
    /// auth_query answers of every lookup, bounded together.
    pub auth_cache: Arc<AuthCache>,
}

/// Why a config could not be turned into a running state.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("users.{user}: {reason}")]
    User { user: String, reason: String },
    #[error("{key}: {source}")]
    Tls { key: String, source: TlsError },
    #[error("server.hba_file: {0}")]
    Hba(String),
    #[error("server.instance_id: {0}")]
    InstanceId(String),
}

/// One consistent view of users, databases and pools.
#[derive(Debug)]
pub struct Snapshot {
    pub config: Arc<Config>,
    pub client_limits: ClientLimits,
    /// Keepalive and user timeout of client and server sockets.
    pub tcp: crate::config::TcpOptions,
    /// `[server.tls]`, its files read when the snapshot is built (so a reload reads them
    /// again); `None`: SSLRequest is answered 'N'.
    pub client_tls: Option<ClientTls>,
    /// Address rules (the hba file read when the snapshot is built), login rate and client
    /// limits.
    pub access: AccessSettings,
    /// `[server] instance_id`, `"hostname"` resolved when the snapshot is built. The cancel
    /// registry takes it once, at startup; a reload only compares it.
    pub instance_id: u8,
    users: HashMap<String, Arc<UserEntry>>,
    databases: HashMap<String, Arc<DatabaseEntry>>,
    /// The `"*"` entry: databases not listed are created from it on first use.
    fallback: Option<DatabaseConfig>,
    /// The `"*"` entry's server TLS, built once for every database made from it.
    fallback_tls: Arc<ServerTls>,
    dynamic: DashMap<String, Arc<DatabaseEntry>>,
    /// auth_query of each configured database that has one.
    auth_lookups: HashMap<String, Arc<AuthLookup>>,
    /// auth_query of every database made from `"*"`, run in its `auth_dbname`.
    fallback_lookup: Option<Arc<AuthLookup>>,
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
                let tls = build_server_tls(name, database)?;
                Ok((
                    name.clone(),
                    Arc::new(DatabaseEntry::new(
                        name,
                        database,
                        &config.pool,
                        observers,
                        tls,
                        config.server.tcp,
                    )),
                ))
            })
            .collect::<Result<HashMap<_, _>, BuildError>>()?;
        let fallback = config.databases.get("*").cloned();
        let fallback_tls = match &fallback {
            Some(database) => build_server_tls("*", database)?,
            None => Arc::new(ServerTls::disabled()),
        };
        let client_tls = config
            .server
            .tls
            .as_ref()
            .map(ClientTls::load)
            .transpose()
            .map_err(|source| BuildError::Tls {
                key: "server.tls".to_owned(),
                source,
            })?
            .flatten();
        let auth_lookups = config
            .databases
            .keys()
            .filter(|name| name.as_str() != "*")
            .filter_map(|name| {
                let lookup = build_auth_lookup(
                    &config,
                    &users,
                    name,
                    name,
                    databases.get(name)?.server_tls(),
                    &observers.auth_cache,
                )?;
                Some((name.clone(), Arc::new(lookup)))
            })
            .collect();
        let access = access_settings(&config.server)?;
        if let Some(hba) = &access.hba
            && hba.rules.iter().any(|rule| rule.method == HbaMethod::Cert)
            && !client_tls.as_ref().is_some_and(ClientTls::checks_client_certificates)
        {
            tracing::warn!(rules = %hba.source,
                "\"cert\" rules refuse every client they match: [server.tls] ca is not set, so no client is asked for a certificate");
        }
        // Every database made from "*" shares one lookup, in its fixed auth_dbname: names
        // clients make up cost nothing before they have logged in.
        let fallback_lookup =
            build_auth_lookup(&config, &users, "*", "", fallback_tls.clone(), &observers.auth_cache).map(Arc::new);
        let client_limits = ClientLimits {
            max_client_conn: config.server.max_client_conn,
            login_timeout: config.server.client_login_timeout,
            idle_timeout: config.server.client_idle_timeout,
            max_message_size: config.server.max_message_size,
        };
        let instance_id = config.server.instance_id.resolve().map_err(BuildError::InstanceId)?;
        Ok(Snapshot {
            instance_id,
            tcp: config.server.tcp,
            config: Arc::new(config),
            client_limits,
            client_tls,
            access,
            users,
            databases,
            fallback,
            fallback_tls,
            dynamic: DashMap::new(),
            auth_lookups,
            fallback_lookup,
            observers: observers.clone(),
        })
    }

    /// The auth_query of the database a client asked for, and the address to run it on (the
    /// primary the monitor found, else the configured one). `None` when it has none. Makes
    /// nothing: the database entry of a `"*"` name is made only once a client has logged in,
    /// and all of them share one lookup, so a name that does not exist answers like one that
    /// does.
    pub fn auth_lookup(&self, dbname: &str) -> Option<(Arc<AuthLookup>, Arc<str>)> {
        if let Some(database) = self.databases.get(dbname) {
            let lookup = self.auth_lookups.get(dbname)?.clone();
            return Some((lookup, database.hosts[database.primary_index()].clone()));
        }
        let fallback = self.fallback.as_ref()?;
        if dbname.is_empty() || dbname == ADMIN_DATABASE {
            return None;
        }
        let lookup = self.fallback_lookup.clone()?;
        let primary = match self.dynamic.get(dbname) {
            Some(database) => database.hosts[database.primary_index()].clone(),
            None => Arc::from(fallback.primary.as_str()),
        };
        Some((lookup, primary))
    }

    /// Takes over from the snapshot this one replaces whatever is still valid (see
    /// [`DatabaseEntry::carry_over`]). Call before the snapshot is shared.
    pub fn carry_over(&mut self, old: &Snapshot) {
        // A lookup whose settings did not change keeps its side connection, cache and users
        // (and with them their pools' learned keys); a changed one is dropped with the old
        // snapshot, closing its connection.
        for (name, lookup) in self.auth_lookups.iter_mut() {
            if let Some(old_lookup) = old.auth_lookups.get(name)
                && old_lookup.same_as(lookup)
            {
                *lookup = old_lookup.clone();
            }
        }
        if let (Some(lookup), Some(old_lookup)) = (&mut self.fallback_lookup, &old.fallback_lookup)
            && old_lookup.same_as(lookup)
        {
            *lookup = old_lookup.clone();
        }
        // Credentials that did not change keep what clients' logins taught them (SCRAM
        // pass-through keys), and with them their pools.
        for (name, user) in self.users.iter_mut() {
            if let (Some(old_user), Some(user)) = (old.users.get(name), Arc::get_mut(user))
                && old_user.server_credentials == user.server_credentials
            {
                user.server_credentials = old_user.server_credentials.clone();
            }
        }
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
                    let mut entry = DatabaseEntry::new(
                        old_entry.key(),
                        fallback,
                        &self.config.pool,
                        &self.observers,
                        self.fallback_tls.clone(),
                        self.tcp,
                    );
                    entry.carry_over(old_entry.value(), &self.users);
                    self.dynamic.insert(old_entry.key().clone(), Arc::new(entry));
                }
            }
        }
    }

    /// Starts the health monitor of every configured database that has none yet (one
    /// carried over from before a reload is kept). Its side connections log in as the
    /// first user with a plaintext password; without one, hosts are only set aside when
    /// they refuse connections. Call before the snapshot is shared.
    pub fn start_monitors(&mut self) {
        let monitor_user = self.monitor_user();
        for entry in self.databases.values_mut() {
            if let Some(database) = Arc::get_mut(entry)
                && database.monitor.is_none()
            {
                match &monitor_user {
                    Some(user) => database.start_monitor(user),
                    None => tracing::warn!(database = %database.name,
                        "no user with a plaintext password: servers are not health-checked"),
                }
            }
            entry.watch_generations();
            if let Some(user) = &monitor_user {
                volatility::watch_catalog(entry, entry.side_settings(user));
            }
        }
        // Entries made from "*" and carried over from before a reload are new too.
        if let Some(user) = &monitor_user {
            for entry in self.dynamic.iter() {
                volatility::watch_catalog(entry.value(), entry.value().side_settings(user));
            }
        }
    }

    /// The user the monitors' side connections log in as: the first with a plaintext
    /// password.
    fn monitor_user(&self) -> Option<Arc<UserEntry>> {
        self.config
            .users
            .iter()
            .filter_map(|user| self.users.get(&user.name))
            .find(|user| user.server_credentials.password.is_some())
            .cloned()
    }

    /// Every configured primary answers its health check (true for unmonitored ones).
    pub fn primaries_reachable(&self) -> bool {
        self.databases.values().all(|database| database.primary_reachable())
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
                .or_insert_with(|| {
                    let mut entry = DatabaseEntry::new(
                        name,
                        fallback,
                        &self.config.pool,
                        &self.observers,
                        self.fallback_tls.clone(),
                        self.tcp,
                    );
                    // Databases made from "*" are watched like configured ones.
                    if let Some(user) = self.monitor_user() {
                        entry.start_monitor(&user);
                    }
                    let entry = Arc::new(entry);
                    entry.watch_generations();
                    if let Some(user) = self.monitor_user() {
                        volatility::watch_catalog(&entry, entry.side_settings(&user));
                    }
                    entry
                })
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

/// The access settings of `[server]`; an hba file is read now, so a reload reads it again
/// and an unreadable or invalid one fails the reload, keeping the rules in force.
fn access_settings(server: &crate::config::ServerConfig) -> Result<AccessSettings, BuildError> {
    let hba = match &server.hba {
        None => None,
        Some(HbaSource::Inline(rules)) => Some(HbaRules {
            source: "server.hba".to_owned(),
            rules: Arc::new(rules.clone()),
        }),
        Some(HbaSource::File(path)) => {
            let rules = crate::config::hba::read_file(path).map_err(BuildError::Hba)?;
            Some(HbaRules {
                source: path.display().to_string(),
                rules: Arc::new(rules),
            })
        }
    };
    let limit = |value: usize| (value > 0).then_some(value);
    Ok(AccessSettings {
        hba,
        login_rate: server.login_rate.clone(),
        max_client_conn_per_user: limit(server.max_client_conn_per_user),
        max_client_conn_per_address: limit(server.max_client_conn_per_address),
    })
}

fn build_server_tls(name: &str, database: &DatabaseConfig) -> Result<Arc<ServerTls>, BuildError> {
    ServerTls::build(&database.server_tls)
        .map(Arc::new)
        .map_err(|source| BuildError::Tls {
            key: format!("databases.{name}.server_tls"),
            source,
        })
}

/// The auth_query of the `[databases]` entry `key`, serving clients' `dbname` (ignored when
/// `auth_dbname` is set, as it must be for `"*"`).
fn build_auth_lookup(
    config: &Config,
    users: &HashMap<String, Arc<UserEntry>>,
    key: &str,
    dbname: &str,
    tls: Arc<ServerTls>,
    cache: &Arc<AuthCache>,
) -> Option<AuthLookup> {
    let settings = config.auth_query(key)?;
    let database = config.databases.get(key)?;
    // Validation makes sure the auth_user exists.
    let auth_user = users.get(&settings.auth_user)?.server_credentials.clone();
    let pool = database.pool(&config.pool);
    let dbname = match &settings.dbname {
        Some(dbname) => dbname.clone(),
        None if key == "*" => return None,
        None => database.server_dbname(dbname).to_owned(),
    };
    Some(AuthLookup::new(
        LookupSettings {
            config: settings,
            dbname,
            tcp: config.server.tcp,
            timeout: pool.server_connect_timeout,
            idle_timeout: pool.server_idle_timeout,
        },
        auth_user,
        tls,
        cache.clone(),
    ))
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
        server_credentials: Arc::new(ServerCredentials::new(user.name.clone(), password, md5_hash)),
        max_user_connections: user.max_user_connections,
    })
}

/// State shared by every task of a running pgrelay.
#[derive(Debug)]
pub struct Shared {
    snapshot: ArcSwap<Snapshot>,
    pub cancel: Arc<CancelRegistry>,
    /// Limits on the cancel requests sent on to peers.
    pub cancel_forwarder: crate::cancel::forward::Forwarder,
    /// Client connections counted against max_client_conn: from their first poll, before
    /// the startup packet, until they close.
    pub clients: std::sync::atomic::AtomicUsize,
    /// Client connections still in their TLS handshake, startup or authentication
    /// (SHOW LISTS' `login_clients`).
    pub logging_in: std::sync::atomic::AtomicUsize,
    /// Salts the fake SCRAM exchange run for unknown users.
    pub mock_secret: [u8; 32],
    /// Turns true when pgrelay starts shutting down.
    shutting_down: tokio::sync::watch::Sender<bool>,
    accepting: std::sync::atomic::AtomicBool,
    pub metrics: Arc<Metrics>,
    /// Connected clients and server connections, for the admin console.
    pub registry: Arc<Registry>,
    /// Server connections per user and per database over every pool.
    pub budgets: Arc<Budgets>,
    /// auth_query answers of every lookup, bounded together; every snapshot's lookups use it.
    pub auth_cache: Arc<AuthCache>,
    /// Client counts per user and per address, login buckets and bans.
    pub access: Arc<Access>,
    /// The file a reload reads, if pgrelay was started from one.
    config_path: Option<std::path::PathBuf>,
    /// The admin console's SHUTDOWN.
    shutdown_requested: tokio::sync::Notify,
    /// Wakes every idle session once `shutting_down` turns true (see
    /// [`Shared::shutdown_notified`]).
    shutdown_notify: tokio::sync::Notify,
    /// Bumped after each swap of the snapshot: a session compares it with the count it
    /// last saw (one load of a rarely written atomic) instead of taking the snapshot at
    /// every transaction.
    reloads: std::sync::atomic::AtomicU64,
    /// The control thread's runtime, where the admin console runs (see `control`).
    control: std::sync::OnceLock<tokio::runtime::Handle>,
    /// The worker runtime, where sessions, pools and monitors run.
    workers: std::sync::OnceLock<tokio::runtime::Handle>,
    /// Each database's LISTEN/NOTIFY fan-out (listen_notify = "fanout").
    pub notify: crate::notify::Hubs,
    /// The process this one took over from (`--takeover`), while it drains: cancels for
    /// its clients are carried there.
    pub predecessor: crate::takeover::Predecessor,
    /// Once a new process has taken this one over: where idle clients are handed to it.
    pub client_handover: crate::takeover::ClientHandover,
}

impl Shared {
    pub fn new(snapshot: Snapshot, observers: Observers, config_path: Option<std::path::PathBuf>) -> Arc<Shared> {
        Arc::new(Shared {
            config_path,
            shutdown_requested: tokio::sync::Notify::new(),
            shutdown_notify: tokio::sync::Notify::new(),
            reloads: std::sync::atomic::AtomicU64::new(0),
            control: std::sync::OnceLock::new(),
            workers: std::sync::OnceLock::new(),
            notify: crate::notify::Hubs::new(observers.metrics.clone()),
            predecessor: crate::takeover::Predecessor::default(),
            client_handover: crate::takeover::ClientHandover::default(),
            metrics: observers.metrics,
            registry: observers.registry,
            budgets: observers.budgets,
            auth_cache: observers.auth_cache,
            access: Arc::new(Access::default()),
            cancel: Arc::new(CancelRegistry::new(snapshot.instance_id)),
            cancel_forwarder: crate::cancel::forward::Forwarder::default(),
            snapshot: ArcSwap::from_pointee(snapshot),
            clients: std::sync::atomic::AtomicUsize::new(0),
            logging_in: std::sync::atomic::AtomicUsize::new(0),
            mock_secret: rand::random(),
            shutting_down: tokio::sync::watch::Sender::new(false),
            accepting: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Remembers the control thread's runtime and the workers' (once, at startup).
    pub fn set_runtimes(&self, control: tokio::runtime::Handle, workers: tokio::runtime::Handle) {
        let _ = self.control.set(control);
        let _ = self.workers.set(workers);
    }

    /// The worker runtime, once pgrelay runs.
    pub fn workers(&self) -> Option<&tokio::runtime::Handle> {
        self.workers.get()
    }

    /// The control thread's runtime, if pgrelay runs one.
    pub fn control(&self) -> Option<&tokio::runtime::Handle> {
        self.control.get()
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Tells every session to end once its client is outside a transaction.
    pub fn begin_shutdown(&self) {
        self.accepting.store(false, std::sync::atomic::Ordering::Release);
        self.shutting_down.send_replace(true);
        self.shutdown_notify.notify_waiters();
    }

    /// Whether pgrelay is shutting down.
    pub fn is_shutting_down(&self) -> bool {
        *self.shutting_down.borrow()
    }

    /// Completes once a shutdown begins after it was made; check [`Shared::is_shutting_down`]
    /// after making it (and enabling it) so that none is missed. A small future to hold
    /// while idle, where a watch receiver's wait is three times its size.
    pub fn shutdown_notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.shutdown_notify.notified()
    }

    /// How many times the snapshot was swapped so far.
    pub fn reloads(&self) -> u64 {
        self.reloads.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn config_path(&self) -> Option<std::path::PathBuf> {
        self.config_path.clone()
    }

    pub fn observers(&self) -> Observers {
        Observers {
            metrics: self.metrics.clone(),
            registry: self.registry.clone(),
            budgets: self.budgets.clone(),
            auth_cache: self.auth_cache.clone(),
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

    /// What /readyz reports: accepting clients (not shutting down) and every primary
    /// reachable.
    pub fn is_ready(&self) -> bool {
        self.accepting.load(std::sync::atomic::Ordering::Acquire) && self.snapshot().primaries_reachable()
    }

    /// Resolves when shutdown begins.
    pub fn shutting_down(&self) -> tokio::sync::watch::Receiver<bool> {
        self.shutting_down.subscribe()
    }

    /// Makes `next` the state new clients see; returns the previous one.
    pub fn swap(&self, next: Snapshot) -> Arc<Snapshot> {
        let previous = self.snapshot.swap(Arc::new(next));
        // After the store: whoever sees the new count sees the new snapshot.
        self.reloads.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        previous
    }
}
