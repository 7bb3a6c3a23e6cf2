//! `[databases.NAME]` and `[databases.NAME.routing]`: where each client-visible database lives.

use std::path::PathBuf;
use std::time::Duration;

use super::auth_query::AuthQueryKeys;
use super::enums::{
    Consistency, FunctionVolatility, ListenNotify, LoadBalance, RoutingTarget, ServerTlsMode, TransactionRouting,
};
use super::pool::{PoolConfig, PoolOverrides};

/// One `[databases.NAME]` entry (NAME is the key of [`super::Config::databases`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseConfig {
    /// Name on the PostgreSQL servers; `None`: the key. Never set for the `"*"` entry.
    pub dbname: Option<String>,
    /// `host:port`; the host may be a DNS name.
    pub primary: String,
    /// `host:port` each.
    pub replicas: Vec<String>,
    pub server_tls: ServerTlsConfig,
    /// The `[pool]` keys this database sets itself; see [`DatabaseConfig::pool`].
    pub pool_overrides: PoolOverrides,
    pub routing: RoutingConfig,
    /// `auth_user` / `auth_query` / `auth_cache_ttl` as this entry wrote them; see
    /// [`super::Config::auth_query`] for the effective settings.
    pub auth_query: AuthQueryKeys,
    /// How LISTEN is served in transaction and statement mode.
    pub listen_notify: ListenNotify,
}

impl DatabaseConfig {
    /// A database on `primary` with no replicas and every other setting at its default.
    pub fn new(primary: impl Into<String>) -> Self {
        Self {
            dbname: None,
            primary: primary.into(),
            replicas: Vec::new(),
            server_tls: ServerTlsConfig::default(),
            pool_overrides: PoolOverrides::default(),
            routing: RoutingConfig::default(),
            auth_query: AuthQueryKeys::default(),
            listen_notify: ListenNotify::default(),
        }
    }

    /// The effective pool settings: `defaults` (the `[pool]` section) with this database's
    /// overrides applied.
    pub fn pool(&self, defaults: &PoolConfig) -> PoolConfig {
        self.pool_overrides.apply(defaults)
    }

    /// The database name to use on the servers. `key` is this entry's key in `[databases]`;
    /// for the `"*"` entry pass the dbname the client asked for, which is forwarded unchanged.
    pub fn server_dbname<'a>(&'a self, key: &'a str) -> &'a str {
        self.dbname.as_deref().unwrap_or(key)
    }
}

/// `server_tls = { mode = "...", ca = "..." }`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerTlsConfig {
    pub mode: ServerTlsMode,
    /// CA certificates (PEM); required for `verify-full`.
    pub ca: Option<PathBuf>,
}

/// `[databases.NAME.routing]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingConfig {
    /// `false`: everything goes to the primary.
    pub read_write_split: bool,
    pub load_balance: LoadBalance,
    pub transactions: TransactionRouting,
    pub consistency: Consistency,
    /// Replicas further behind get no reads; `None`: no lag limit.
    pub max_replica_lag: Option<Duration>,
    /// Always more than zero (validated).
    pub health_check_interval: Duration,
    /// Extra function names that make a `SELECT` a write.
    pub write_functions: Vec<String>,
    /// Function names known to be safe on a replica.
    pub read_only_functions: Vec<String>,
    /// Whether calls of functions the catalog marks volatile are writes.
    pub function_volatility: FunctionVolatility,
    /// A replica's read-only refusal of an autocommit batch, before any reply reached the
    /// client, runs the batch again on the primary.
    pub retry_refused_on_primary: bool,
    pub target: RoutingTarget,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            read_write_split: true,
            load_balance: LoadBalance::LeastConnections,
            transactions: TransactionRouting::Primary,
            consistency: Consistency::Session,
            max_replica_lag: Some(Duration::from_secs(1)),
            health_check_interval: Duration::from_secs(1),
            write_functions: Vec::new(),
            read_only_functions: Vec::new(),
            function_volatility: FunctionVolatility::Catalog,
            retry_refused_on_primary: true,
            target: RoutingTarget::Auto,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::enums::PoolMode;
    use super::*;

    #[test]
    fn server_dbname_defaults_to_the_key() {
        let mut db = DatabaseConfig::new("127.0.0.1:5432");
        assert_eq!(db.server_dbname("app"), "app");
        db.dbname = Some("real".to_owned());
        assert_eq!(db.server_dbname("app"), "real");
    }

    #[test]
    fn pool_applies_overrides() {
        let mut db = DatabaseConfig::new("127.0.0.1:5432");
        let defaults = PoolConfig {
            size: 50,
            ..PoolConfig::default()
        };
        assert_eq!(db.pool(&defaults), defaults);
        db.pool_overrides.mode = Some(PoolMode::Session);
        let pool = db.pool(&defaults);
        assert_eq!(pool.mode, PoolMode::Session);
        assert_eq!(pool.size, 50);
    }
}
