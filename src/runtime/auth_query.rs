//! Passwords of users not in `[[users]]`, asked from PostgreSQL (`auth_query`): one side
//! connection per lookup (a configured database, or every database made from `"*"` together),
//! logged in as `auth_user` to `auth_dbname`, runs the query with the login name as `$1`;
//! answers are cached for `auth_cache_ttl` (a missing user more briefly), in one map shared
//! by every lookup and bounded overall ([`AuthCache`]).
//! Users found this way get pools like configured ones, keyed by name, whose credentials learn
//! the pass-through secret from each successful client login.
//!
//! Cancellation: a login may be dropped at any await (client_login_timeout, the client
//! leaving). The side connection is therefore taken out of its slot for the whole exchange and
//! put back only after a complete answer, so a reply nobody read can never be taken for the
//! next user's answer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::time::Instant;

use super::{ClientAuth, UserEntry};
use crate::auth::{SCRAM_DEFAULT_ITERATIONS, Secret};
use crate::config::{AuthQueryConfig, TcpOptions};
use crate::net::ServerTls;
use crate::upstream::{ConnectSpec, LookupRows, ServerConn, ServerCredentials, UpstreamError, connect};

/// Answers kept at most, found and missing together, over every lookup: bounded whatever
/// names clients try and however many databases have an auth_query.
pub const MAX_CACHED: usize = 10_000;
/// A name with no password is asked again after this at the latest, so a role created
/// in PostgreSQL can log in soon; long enough that a client retrying one wrong name does not
/// make a query per attempt.
const MISSING_TTL: Duration = Duration::from_secs(5);
/// Used for the whole lookup (waiting for the side connection, connecting, the query) when
/// `server_connect_timeout` is "0": a stuck side connection must not hold every later login.
const FALLBACK_TIMEOUT: Duration = Duration::from_secs(30);
/// After a failed connect, lookups fail at once for this long instead of each trying again:
/// with the primary down, a queue of logins would otherwise wait for one connect timeout
/// each, and every attempt costs auth_user's SCRAM exchange.
const CONNECT_BACKOFF: Duration = Duration::from_secs(1);
/// What the side connection calls itself in `pg_stat_activity`.
pub const LOOKUP_APPLICATION_NAME: &str = "pgrelay auth_query";

/// Why the password of a user could not be looked up.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("cannot connect as auth_user: {0}")]
    Connect(UpstreamError),
    #[error("connecting as auth_user failed less than {0:?} ago: {1}")]
    BackingOff(Duration, String),
    #[error("auth_query failed: {0}")]
    Query(UpstreamError),
    #[error("auth_query failed with {sqlstate}: {message}")]
    Refused { sqlstate: String, message: String },
    #[error("auth_query did not answer within {0:?}")]
    Timeout(Duration),
}

struct Cached {
    expires: Instant,
    /// `None`: no such user, or no password it can log in with.
    auth: Option<ClientAuth>,
}

/// The answers of every lookup, at most [`MAX_CACHED`] in all. Outlives reloads (it is one
/// of the `Observers`); a lookup's answers go with the lookup. When it is full, expired
/// answers are dropped first, then one of the lookup holding the most: a flood of made-up
/// names through one database's lookup evicts its own answers, not every other one's.
#[derive(Default)]
pub struct AuthCache {
    inner: Mutex<CacheInner>,
    next_id: std::sync::atomic::AtomicU64,
}

#[derive(Default)]
struct CacheInner {
    by_lookup: HashMap<u64, HashMap<String, Cached>>,
    total: usize,
}

impl std::fmt::Debug for AuthCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthCache").field("cached", &self.len()).finish()
    }
}

impl AuthCache {
    /// A key for a new lookup's answers.
    fn register(&self) -> u64 {
        self.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// Answers held, expired ones included until they are dropped.
    pub fn len(&self) -> usize {
        self.inner.lock().map_or(0, |inner| inner.total)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn get(&self, lookup: u64, user_name: &str, now: Instant) -> Option<Option<ClientAuth>> {
        let inner = self.inner.lock().ok()?;
        let entry = inner.by_lookup.get(&lookup)?.get(user_name)?;
        (entry.expires > now).then(|| entry.auth.clone())
    }

    fn insert(&self, lookup: u64, user_name: &str, cached: Cached, now: Instant) {
        self.insert_bounded(lookup, user_name, cached, now, MAX_CACHED);
    }

    fn insert_bounded(&self, lookup: u64, user_name: &str, cached: Cached, now: Instant, limit: usize) {
        let Ok(mut inner) = self.inner.lock() else { return };
        let inner = &mut *inner;
        let replacing = inner
            .by_lookup
            .get(&lookup)
            .is_some_and(|answers| answers.contains_key(user_name));
        if !replacing && inner.total >= limit {
            for answers in inner.by_lookup.values_mut() {
                answers.retain(|_, entry| entry.expires > now);
            }
            inner.by_lookup.retain(|_, answers| !answers.is_empty());
            inner.total = inner.by_lookup.values().map(HashMap::len).sum();
        }
        if !replacing && inner.total >= limit {
            // Still full of live answers: forget one of the largest lookup's; it is asked again.
            let largest = inner
                .by_lookup
                .iter_mut()
                .max_by_key(|(_, answers)| answers.len())
                .map(|(_, answers)| answers);
            if let Some(answers) = largest
                && let Some(victim) = answers.keys().next().cloned()
            {
                answers.remove(&victim);
                inner.total -= 1;
            }
        }
        inner
            .by_lookup
            .entry(lookup)
            .or_default()
            .insert(user_name.to_owned(), cached);
        if !replacing {
            inner.total += 1;
        }
    }

    /// Drops a lookup's answers (the lookup itself is gone).
    fn forget(&self, lookup: u64) {
        if let Ok(mut inner) = self.inner.lock()
            && let Some(answers) = inner.by_lookup.remove(&lookup)
        {
            inner.total -= answers.len();
        }
    }
}

/// The side connection while no lookup uses it.
struct Parked {
    conn: ServerConn,
    since: Instant,
}

/// Where an auth_query runs and what it answered.
pub struct AuthLookup {
    /// As built, to tell whether a reload changed anything.
    settings: LookupSettings,
    config: AuthQueryConfig,
    /// The database the query runs in (`auth_dbname`, else the database's own name).
    dbname: String,
    auth_user: Arc<ServerCredentials>,
    tls: Arc<ServerTls>,
    tcp: TcpOptions,
    /// Bounds a whole lookup: the wait for the side connection, connecting, the query.
    timeout: Duration,
    /// An unused side connection is closed after this (`server_idle_timeout`).
    idle_timeout: Option<Duration>,
    /// The side connection; the lock also makes lookups run one at a time, which bounds the
    /// queries unknown names can cause.
    conn: tokio::sync::Mutex<Option<Parked>>,
    /// Until when, and why, connecting is not tried again.
    connect_failed: Mutex<Option<(Instant, String)>>,
    /// Where this lookup's answers are kept, under `cache_id`.
    cache: Arc<AuthCache>,
    cache_id: u64,
    /// Iteration count of the last SCRAM verifier the query answered: unknown users' mock
    /// verifiers use it, so the count does not tell them apart.
    iterations: std::sync::atomic::AtomicU32,
    /// One entry per user found, for the life of this lookup: its pools are keyed by name and
    /// its credentials keep what clients' logins taught them. Grows only with users that
    /// exist in PostgreSQL.
    users: Mutex<HashMap<String, Arc<UserEntry>>>,
}

impl Drop for AuthLookup {
    fn drop(&mut self) {
        self.cache.forget(self.cache_id);
    }
}

impl std::fmt::Debug for AuthLookup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthLookup")
            .field("dbname", &self.dbname)
            .field("auth_user", &self.config.auth_user)
            .finish_non_exhaustive()
    }
}

/// What decides where and how a lookup runs; a reload that leaves these alone keeps the
/// lookup (its side connection, cache and users).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LookupSettings {
    pub config: AuthQueryConfig,
    pub dbname: String,
    pub tcp: TcpOptions,
    pub timeout: Option<Duration>,
    pub idle_timeout: Option<Duration>,
}

impl AuthLookup {
    pub(super) fn new(
        settings: LookupSettings,
        auth_user: Arc<ServerCredentials>,
        tls: Arc<ServerTls>,
        cache: Arc<AuthCache>,
    ) -> AuthLookup {
        AuthLookup {
            settings: settings.clone(),
            config: settings.config,
            dbname: settings.dbname,
            auth_user,
            tls,
            tcp: settings.tcp,
            timeout: settings.timeout.unwrap_or(FALLBACK_TIMEOUT),
            idle_timeout: settings.idle_timeout,
            conn: tokio::sync::Mutex::new(None),
            connect_failed: Mutex::new(None),
            cache_id: cache.register(),
            cache,
            iterations: std::sync::atomic::AtomicU32::new(SCRAM_DEFAULT_ITERATIONS),
            users: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `newer` (a reload's) runs this lookup as it runs now: same settings, and
    /// `auth_user` logging in the same way.
    pub(super) fn same_as(&self, newer: &AuthLookup) -> bool {
        self.settings == newer.settings && *self.auth_user == *newer.auth_user
    }

    /// The iteration count unknown users' mock SCRAM verifiers should show.
    pub fn mock_iterations(&self) -> u32 {
        self.iterations.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How `user_name` logs in, and the entry its pools use; `None` when PostgreSQL has no
    /// such user or no password for it. `primary` is where the query runs. Takes at most the
    /// lookup's timeout, waiting for other lookups included.
    pub async fn lookup(
        self: &Arc<Self>,
        user_name: &str,
        primary: &Arc<str>,
    ) -> Result<Option<(Arc<UserEntry>, ClientAuth)>, LookupError> {
        let auth = match self.cached(user_name) {
            Some(auth) => auth,
            None => {
                let deadline = Instant::now() + self.timeout;
                self.check_backoff()?;
                let mut slot = tokio::time::timeout_at(deadline, self.conn.lock())
                    .await
                    .map_err(|_| LookupError::Timeout(self.timeout))?;
                // Another login may have asked, or failed to connect, while this one waited.
                match self.cached(user_name) {
                    Some(auth) => auth,
                    None => {
                        self.check_backoff()?;
                        let auth = self.query(&mut slot, user_name, primary, deadline).await?;
                        self.remember(user_name, auth.clone());
                        auth
                    }
                }
            }
        };
        Ok(auth.map(|auth| (self.user_entry(user_name), auth)))
    }

    fn check_backoff(&self) -> Result<(), LookupError> {
        let Ok(failed) = self.connect_failed.lock() else {
            return Ok(());
        };
        match &*failed {
            Some((until, reason)) if *until > Instant::now() => {
                Err(LookupError::BackingOff(CONNECT_BACKOFF, reason.clone()))
            }
            _ => Ok(()),
        }
    }

    fn note_connect(&self, failure: Option<String>) {
        if let Ok(mut failed) = self.connect_failed.lock() {
            *failed = failure.map(|reason| (Instant::now() + CONNECT_BACKOFF, reason));
        }
    }

    fn cached(&self, user_name: &str) -> Option<Option<ClientAuth>> {
        self.cache.get(self.cache_id, user_name, Instant::now())
    }

    fn remember(&self, user_name: &str, auth: Option<ClientAuth>) {
        let now = Instant::now();
        let ttl = match auth {
            Some(_) => self.config.cache_ttl,
            None => self.config.cache_ttl.min(MISSING_TTL),
        };
        self.cache.insert(
            self.cache_id,
            user_name,
            Cached {
                expires: now + ttl,
                auth,
            },
            now,
        );
    }

    /// This lookup's entry for a user an older lookup (before a reload) found: the same
    /// entry if this is that lookup, else one of its own that starts with what the old
    /// entry's logins taught it, so the user's pools can log in before its next login.
    pub fn adopt(&self, old: &UserEntry) -> Arc<UserEntry> {
        let entry = self.user_entry(&old.name);
        entry.server_credentials.adopt(&old.server_credentials);
        entry
    }

    /// The entry of a user the process this one took over from found through its own
    /// lookup: its client logged in there, so no query is asked here (see
    /// `session::resume`, which teaches the entry the secrets that came with the client).
    pub fn handed_over(&self, user_name: &str) -> Arc<UserEntry> {
        self.user_entry(user_name)
    }

    fn user_entry(&self, user_name: &str) -> Arc<UserEntry> {
        let make = || {
            Arc::new(UserEntry {
                name: user_name.to_owned(),
                auth: ClientAuth::Query,
                server_credentials: Arc::new(ServerCredentials::new(user_name, None, None)),
                // Not in [[users]]: [pool]'s max_user_connections applies.
                max_user_connections: None,
            })
        };
        match self.users.lock() {
            Ok(mut users) => users.entry(user_name.to_owned()).or_insert_with(make).clone(),
            Err(_) => make(),
        }
    }

    /// Runs the query on the parked side connection, or a new one. The connection stays out
    /// of `slot` until the answer is complete (see the module docs).
    async fn query(
        self: &Arc<Self>,
        slot: &mut Option<Parked>,
        user_name: &str,
        primary: &Arc<str>,
        deadline: Instant,
    ) -> Result<Option<ClientAuth>, LookupError> {
        // A primary that changed (failover), a connection in an unknown state or one unused
        // for longer than server_idle_timeout: start afresh.
        let reusable = slot.take().filter(|parked| {
            parked.conn.addr() == &**primary
                && parked.conn.is_idle()
                && self.idle_timeout.is_none_or(|idle| parked.since.elapsed() < idle)
        });
        let (conn, answer) = match reusable {
            Some(Parked { mut conn, .. }) => match self.run(&mut conn, user_name, deadline).await {
                Ok(answer) => (conn, answer),
                // The server closed it while parked (restart, idle cut, pg_terminate_backend):
                // nothing was answered, so one try on a fresh connection is safe.
                Err(LookupError::Query(error @ (UpstreamError::Io { .. } | UpstreamError::Closed { .. }))) => {
                    tracing::debug!(database = ?self.dbname, %error, "auth_query side connection was lost; reconnecting");
                    self.fresh(primary, user_name, deadline).await?
                }
                Err(error) => return Err(error),
            },
            None => self.fresh(primary, user_name, deadline).await?,
        };
        // An error here leaves the connection out of the slot: whatever went wrong, it is
        // not trusted with the next user's lookup.
        let auth = self.read_answer(user_name, answer)?;
        *slot = Some(Parked {
            conn,
            since: Instant::now(),
        });
        self.close_when_idle();
        Ok(auth)
    }

    async fn fresh(
        &self,
        primary: &Arc<str>,
        user_name: &str,
        deadline: Instant,
    ) -> Result<(ServerConn, LookupRows), LookupError> {
        let spec = ConnectSpec {
            addr: primary.clone(),
            database: self.dbname.clone(),
            credentials: self.auth_user.clone(),
            tls: self.tls.clone(),
            tcp: self.tcp,
            application_name: Some(LOOKUP_APPLICATION_NAME),
        };
        let opened = match tokio::time::timeout_at(deadline, connect(&spec)).await {
            Ok(Ok(conn)) => {
                self.note_connect(None);
                conn
            }
            Ok(Err(error)) => {
                self.note_connect(Some(error.to_string()));
                return Err(LookupError::Connect(error));
            }
            Err(_) => {
                self.note_connect(Some(format!("no connection within {:?}", self.timeout)));
                return Err(LookupError::Timeout(self.timeout));
            }
        };
        let mut conn = opened;
        let answer = self.run(&mut conn, user_name, deadline).await?;
        Ok((conn, answer))
    }

    async fn run(&self, conn: &mut ServerConn, user_name: &str, deadline: Instant) -> Result<LookupRows, LookupError> {
        match tokio::time::timeout_at(deadline, conn.run_lookup(&self.config.query, user_name)).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(error)) => Err(LookupError::Query(error)),
            Err(_) => Err(LookupError::Timeout(self.timeout)),
        }
    }

    /// Closes the parked connection once it has been unused for `idle_timeout`, so a lookup
    /// that is rarely asked does not hold a server connection for ever.
    fn close_when_idle(self: &Arc<Self>) {
        let Some(idle) = self.idle_timeout else { return };
        let lookup: Weak<AuthLookup> = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep(idle).await;
            let Some(lookup) = lookup.upgrade() else { return };
            // In use: whoever holds it parks it again and schedules another check.
            let Ok(mut slot) = lookup.conn.try_lock() else { return };
            if slot.as_ref().is_some_and(|parked| parked.since.elapsed() >= idle) {
                *slot = None;
            }
        });
    }

    /// The password of `user_name` in the query's answer. A row for another name is refused:
    /// whatever made the query answer it, it is not this user's password.
    fn read_answer(&self, user_name: &str, answer: LookupRows) -> Result<Option<ClientAuth>, LookupError> {
        if let Some((sqlstate, message)) = answer.error {
            return Err(LookupError::Refused {
                sqlstate,
                message: message.to_string(),
            });
        }
        let password = match answer.rows.first() {
            None => return Ok(None),
            Some(row) if row.len() != 2 => {
                return Err(LookupError::Refused {
                    sqlstate: "42601".to_owned(),
                    message: format!("auth_query must answer two columns (name, password), not {}", row.len()),
                });
            }
            Some(row) if row.first().and_then(Option::as_deref) != Some(user_name) => {
                return Err(LookupError::Refused {
                    sqlstate: "XX000".to_owned(),
                    message: "auth_query answered a row whose name is not the login name".to_owned(),
                });
            }
            Some(row) => row.get(1).cloned().flatten(),
        };
        let auth = password.and_then(|password| self.client_auth(user_name, &password));
        if let Some(ClientAuth::Scram(verifier)) = &auth {
            self.iterations
                .store(verifier.iterations, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(auth)
    }

    /// How a client proves it knows the password PostgreSQL stores.
    fn client_auth(&self, user_name: &str, stored: &str) -> Option<ClientAuth> {
        match Secret::parse(stored) {
            Ok(Secret::Scram(verifier)) => Some(ClientAuth::Scram(verifier)),
            Ok(secret @ Secret::Md5(_)) => Some(ClientAuth::Md5(secret)),
            // PostgreSQL stores no plaintext since version 10; a query that returns one
            // would put a password on the wire for nothing.
            Ok(Secret::Plain(password)) if password.is_empty() => None,
            Ok(Secret::Plain(_)) => {
                tracing::warn!(database = ?self.dbname, user = ?user_name,
                    "auth_query returned a plaintext password; only SCRAM verifiers and md5 hashes are used");
                None
            }
            Err(error) => {
                tracing::warn!(database = ?self.dbname, user = ?user_name, %error,
                    "auth_query returned a password pgrelay cannot use");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(expires: Instant) -> Cached {
        Cached { expires, auth: None }
    }

    #[test]
    fn the_cache_is_bounded_over_every_lookup_and_the_largest_gives_way() {
        let cache = AuthCache::default();
        let (quiet, flooded) = (cache.register(), cache.register());
        let now = Instant::now();
        let later = now + Duration::from_secs(60);
        for name in ["a", "b", "c"] {
            cache.insert_bounded(quiet, name, answer(later), now, 10);
        }
        for index in 0..50 {
            cache.insert_bounded(flooded, &format!("made-up-{index}"), answer(later), now, 10);
        }
        assert_eq!(cache.len(), 10, "bounded over both lookups");
        for name in ["a", "b", "c"] {
            assert!(cache.get(quiet, name, now).is_some(), "{name} was kept");
        }
        assert!(cache.get(flooded, "made-up-49", now).is_some());
        // The same name again replaces its answer and takes no new place.
        cache.insert_bounded(quiet, "a", answer(later), now, 10);
        assert_eq!(cache.len(), 10);
        // Expired answers make room first, whichever lookup holds them.
        let much_later = later + Duration::from_secs(1);
        cache.insert_bounded(quiet, "d", answer(much_later + Duration::from_secs(60)), much_later, 10);
        assert_eq!(cache.len(), 1);
        assert!(cache.get(quiet, "d", much_later).is_some());
        assert!(cache.get(quiet, "a", much_later).is_none(), "expired");
        // A lookup that goes takes its answers with it.
        cache.insert_bounded(flooded, "x", answer(later), now, 10);
        cache.forget(quiet);
        assert_eq!(cache.len(), 1);
        assert!(cache.get(quiet, "d", now).is_none());
    }
}
