//! `[pool]`: server-connection pool settings, and their per-database overrides.

use std::time::Duration;

use super::enums::PoolMode;

/// Effective pool settings. Timeouts are `None` when configured as `"0"` (no limit / disabled).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    pub mode: PoolMode,
    /// Server connections per (database, user, host).
    pub size: usize,
    pub min_size: usize,
    /// Extra connections allowed once a client has waited `reserve_timeout`.
    pub reserve_size: usize,
    /// `None`: the reserve is never used.
    pub reserve_timeout: Option<Duration>,
    /// `None`: clients wait for a server for ever.
    pub query_wait_timeout: Option<Duration>,
    pub server_connect_timeout: Option<Duration>,
    /// `None`: idle server connections are never closed.
    pub server_idle_timeout: Option<Duration>,
    /// `None`: server connections are never recycled for age.
    pub server_lifetime: Option<Duration>,
    /// Run on release in session mode; `None` when configured as `""`.
    pub server_reset_query: Option<String>,
    /// Per server connection, in transaction and statement mode.
    pub max_prepared_statements: usize,
    /// Prepared statements one client may hold at once in transaction and statement
    /// mode; 0: no limit on the count (their bytes are still bounded).
    pub max_client_prepared_statements: usize,
    /// Re-run a read-only autocommit batch whose server failed before it answered.
    pub retry_reads: bool,
    /// A client idle inside a transaction longer than this is disconnected; `None`: never.
    pub idle_transaction_timeout: Option<Duration>,
    /// A statement running longer is cancelled on its server; `None`: never.
    pub query_timeout: Option<Duration>,
    /// Server connections of one user over all its pools; 0: no limit. Only in `[pool]`:
    /// a user's connections span databases.
    pub max_user_connections: usize,
    /// Server connections of one database over all its pools; 0: no limit.
    pub max_db_connections: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            mode: PoolMode::Transaction,
            size: 20,
            min_size: 0,
            reserve_size: 0,
            reserve_timeout: Some(Duration::from_secs(5)),
            query_wait_timeout: Some(Duration::from_secs(30)),
            server_connect_timeout: Some(Duration::from_secs(5)),
            server_idle_timeout: Some(Duration::from_secs(600)),
            server_lifetime: Some(Duration::from_secs(3600)),
            server_reset_query: Some("DISCARD ALL".to_owned()),
            max_prepared_statements: 200,
            max_client_prepared_statements: 1000,
            retry_reads: true,
            idle_transaction_timeout: None,
            query_timeout: None,
            max_user_connections: 0,
            max_db_connections: 0,
        }
    }
}

/// The `[pool]` keys one database sets itself; `None` means "inherit".
///
/// Kept separate from [`PoolConfig`] rather than resolved at load time so that a reload which
/// changes `[pool]` reaches every database that did not override the key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolOverrides {
    pub mode: Option<PoolMode>,
    pub size: Option<usize>,
    pub min_size: Option<usize>,
    pub reserve_size: Option<usize>,
    pub reserve_timeout: Option<Option<Duration>>,
    pub query_wait_timeout: Option<Option<Duration>>,
    pub server_connect_timeout: Option<Option<Duration>>,
    pub server_idle_timeout: Option<Option<Duration>>,
    pub server_lifetime: Option<Option<Duration>>,
    pub server_reset_query: Option<Option<String>>,
    pub max_prepared_statements: Option<usize>,
    pub max_client_prepared_statements: Option<usize>,
    pub retry_reads: Option<bool>,
    pub idle_transaction_timeout: Option<Option<Duration>>,
    pub query_timeout: Option<Option<Duration>>,
    pub max_user_connections: Option<usize>,
    pub max_db_connections: Option<usize>,
}

impl PoolOverrides {
    /// `base` with every overridden key replaced.
    pub fn apply(&self, base: &PoolConfig) -> PoolConfig {
        fn pick<T: Clone>(over: &Option<T>, base: &T) -> T {
            over.as_ref().unwrap_or(base).clone()
        }
        PoolConfig {
            mode: pick(&self.mode, &base.mode),
            size: pick(&self.size, &base.size),
            min_size: pick(&self.min_size, &base.min_size),
            reserve_size: pick(&self.reserve_size, &base.reserve_size),
            reserve_timeout: pick(&self.reserve_timeout, &base.reserve_timeout),
            query_wait_timeout: pick(&self.query_wait_timeout, &base.query_wait_timeout),
            server_connect_timeout: pick(&self.server_connect_timeout, &base.server_connect_timeout),
            server_idle_timeout: pick(&self.server_idle_timeout, &base.server_idle_timeout),
            server_lifetime: pick(&self.server_lifetime, &base.server_lifetime),
            server_reset_query: pick(&self.server_reset_query, &base.server_reset_query),
            max_prepared_statements: pick(&self.max_prepared_statements, &base.max_prepared_statements),
            max_client_prepared_statements: pick(
                &self.max_client_prepared_statements,
                &base.max_client_prepared_statements,
            ),
            retry_reads: pick(&self.retry_reads, &base.retry_reads),
            idle_transaction_timeout: pick(&self.idle_transaction_timeout, &base.idle_transaction_timeout),
            query_timeout: pick(&self.query_timeout, &base.query_timeout),
            max_user_connections: pick(&self.max_user_connections, &base.max_user_connections),
            max_db_connections: pick(&self.max_db_connections, &base.max_db_connections),
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apply_overrides_only_what_is_set() {
        let base = PoolConfig::default();
        assert_eq!(PoolOverrides::default().apply(&base), base);
        assert!(PoolOverrides::default().is_empty());

        let over = PoolOverrides {
            mode: Some(PoolMode::Session),
            size: Some(5),
            query_wait_timeout: Some(None),
            server_reset_query: Some(None),
            ..PoolOverrides::default()
        };
        assert!(!over.is_empty());
        let pool = over.apply(&base);
        assert_eq!(pool.mode, PoolMode::Session);
        assert_eq!(pool.size, 5);
        assert_eq!(pool.query_wait_timeout, None);
        assert_eq!(pool.server_reset_query, None);
        assert_eq!(pool.min_size, base.min_size);
        assert_eq!(pool.server_lifetime, base.server_lifetime);
    }
}
