//! Passwords of users not in `[[users]]`, asked from PostgreSQL (`auth_query`): one side
//! connection per database, logged in as `auth_user`, runs the query with the login name as
//! `$1`; answers are cached for `auth_cache_ttl` (a missing user more briefly), in a bounded
//! map. Users found this way get pools like configured ones, keyed by name, whose
//! credentials learn the pass-through secret from each successful client login.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{ClientAuth, UserEntry};
use crate::auth::Secret;
use crate::config::{AuthQueryConfig, TcpOptions};
use crate::net::ServerTls;
use crate::upstream::{ConnectSpec, ServerConn, ServerCredentials, UpstreamError, connect};

/// Answers kept at most, found and missing together: bounded whatever names clients try.
const MAX_CACHED: usize = 10_000;
/// A name with no password is asked again after this at the latest, so a role created
/// in PostgreSQL can log in soon; long enough that a client retrying one wrong name does not
/// make a query per attempt.
const MISSING_TTL: Duration = Duration::from_secs(5);
/// Used for connecting and for the query when `server_connect_timeout` is "0": a stuck side
/// connection must not hold every later login.
const FALLBACK_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the password of a user could not be looked up.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("cannot connect as auth_user: {0}")]
    Connect(UpstreamError),
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

/// Where a database's auth_query runs and what it answered.
pub struct AuthLookup {
    config: AuthQueryConfig,
    /// The name of the database on the servers.
    dbname: String,
    auth_user: Arc<ServerCredentials>,
    tls: Arc<ServerTls>,
    tcp: TcpOptions,
    timeout: Duration,
    /// The side connection; the lock also makes lookups of one database run one at a time,
    /// which bounds the queries unknown names can cause.
    conn: tokio::sync::Mutex<Option<ServerConn>>,
    cache: Mutex<HashMap<String, Cached>>,
    /// One entry per user found, for the life of this config: its pools are keyed by name and
    /// its credentials keep what clients' logins taught them. Grows only with users that
    /// exist in PostgreSQL.
    users: Mutex<HashMap<String, Arc<UserEntry>>>,
}

impl std::fmt::Debug for AuthLookup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthLookup")
            .field("dbname", &self.dbname)
            .field("auth_user", &self.config.auth_user)
            .finish_non_exhaustive()
    }
}

impl AuthLookup {
    pub(super) fn new(
        config: AuthQueryConfig,
        dbname: String,
        auth_user: Arc<ServerCredentials>,
        tls: Arc<ServerTls>,
        tcp: TcpOptions,
        timeout: Option<Duration>,
    ) -> AuthLookup {
        AuthLookup {
            config,
            dbname,
            auth_user,
            tls,
            tcp,
            timeout: timeout.unwrap_or(FALLBACK_TIMEOUT),
            conn: tokio::sync::Mutex::new(None),
            cache: Mutex::new(HashMap::new()),
            users: Mutex::new(HashMap::new()),
        }
    }

    /// How `user_name` logs in, and the entry its pools use; `None` when PostgreSQL has no
    /// such user or no password for it. `primary` is where the query runs.
    pub async fn lookup(
        &self,
        user_name: &str,
        primary: &Arc<str>,
    ) -> Result<Option<(Arc<UserEntry>, ClientAuth)>, LookupError> {
        let auth = match self.cached(user_name) {
            Some(auth) => auth,
            None => {
                let mut conn = self.conn.lock().await;
                // Another login may have asked while this one waited for the connection.
                match self.cached(user_name) {
                    Some(auth) => auth,
                    None => {
                        let auth = self.query(&mut conn, user_name, primary).await?;
                        self.remember(user_name, auth.clone());
                        auth
                    }
                }
            }
        };
        Ok(auth.map(|auth| (self.user_entry(user_name), auth)))
    }

    fn cached(&self, user_name: &str) -> Option<Option<ClientAuth>> {
        let cache = self.cache.lock().ok()?;
        let entry = cache.get(user_name)?;
        (entry.expires > Instant::now()).then(|| entry.auth.clone())
    }

    fn remember(&self, user_name: &str, auth: Option<ClientAuth>) {
        let Ok(mut cache) = self.cache.lock() else { return };
        let now = Instant::now();
        if cache.len() >= MAX_CACHED {
            cache.retain(|_, entry| entry.expires > now);
        }
        if cache.len() >= MAX_CACHED {
            // Still full of live answers: make room by forgetting one; it is asked again.
            if let Some(victim) = cache.keys().next().cloned() {
                cache.remove(&victim);
            }
        }
        let ttl = match auth {
            Some(_) => self.config.cache_ttl,
            None => self.config.cache_ttl.min(MISSING_TTL),
        };
        cache.insert(
            user_name.to_owned(),
            Cached {
                expires: now + ttl,
                auth,
            },
        );
    }

    fn user_entry(&self, user_name: &str) -> Arc<UserEntry> {
        let make = || {
            Arc::new(UserEntry {
                name: user_name.to_owned(),
                auth: ClientAuth::Query,
                server_credentials: Arc::new(ServerCredentials::new(user_name, None, None)),
            })
        };
        match self.users.lock() {
            Ok(mut users) => users.entry(user_name.to_owned()).or_insert_with(make).clone(),
            Err(_) => make(),
        }
    }

    async fn query(
        &self,
        conn: &mut Option<ServerConn>,
        user_name: &str,
        primary: &Arc<str>,
    ) -> Result<Option<ClientAuth>, LookupError> {
        // A primary that changed (failover) or a connection that broke: start afresh.
        if conn
            .as_ref()
            .is_some_and(|open| open.addr() != &**primary || !open.is_idle())
        {
            *conn = None;
        }
        if conn.is_none() {
            let spec = ConnectSpec {
                addr: primary.clone(),
                database: self.dbname.clone(),
                credentials: self.auth_user.clone(),
                tls: self.tls.clone(),
                tcp: self.tcp,
            };
            let opened = tokio::time::timeout(self.timeout, connect(&spec))
                .await
                .map_err(|_| LookupError::Timeout(self.timeout))?
                .map_err(LookupError::Connect)?;
            *conn = Some(opened);
        }
        let Some(open) = conn.as_mut() else {
            return Err(LookupError::Timeout(self.timeout));
        };
        let answer = match tokio::time::timeout(self.timeout, open.run_lookup(&self.config.query, user_name)).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(error)) => {
                *conn = None;
                return Err(LookupError::Query(error));
            }
            Err(_) => {
                // Dropped mid-exchange: the connection's state is unknown.
                *conn = None;
                return Err(LookupError::Timeout(self.timeout));
            }
        };
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
            Some(row) => row.get(1).cloned().flatten(),
        };
        Ok(password.and_then(|password| self.client_auth(user_name, &password)))
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
                tracing::warn!(database = %self.dbname, user = %user_name,
                    "auth_query returned a plaintext password; only SCRAM verifiers and md5 hashes are used");
                None
            }
            Err(error) => {
                tracing::warn!(database = %self.dbname, user = %user_name, %error,
                    "auth_query returned a password pgrelay cannot use");
                None
            }
        }
    }
}
