//! `[server]`, `[server.tls]` and `[[users]]`: the client-facing side of pgrelay.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use super::auth_query::AuthQueryKeys;
use super::enums::{AuthMethod, ChannelBindingMode, ClientTlsMode};
use super::hba::HbaSource;
use super::secret::PasswordForm;
use crate::auth::ScramVerifier;

/// `[server]`. Addresses are kept as written (validated to be `IP:port`) so they can be shown
/// back to the operator unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// Client-facing `IP:port`.
    pub listen: String,
    /// Tokio worker threads; 0: one per core. Read once, when the runtime is built.
    pub workers: usize,
    pub max_client_conn: usize,
    /// May use the admin console (database "pgrelay").
    pub admin_users: Vec<String>,
    /// May run `SHOW` commands on the admin console.
    pub stats_users: Vec<String>,
    /// HTTP `IP:port` for /metrics, /healthz, /readyz; `None` when configured as `""`.
    pub metrics_listen: Option<String>,
    /// `None`: wait for running transactions for ever.
    pub shutdown_timeout: Option<Duration>,
    /// Startup and authentication must finish within this; `None`: no limit.
    pub client_login_timeout: Option<Duration>,
    /// `None`: idle clients are never disconnected.
    pub client_idle_timeout: Option<Duration>,
    /// Larger client messages are refused, in bytes.
    pub max_message_size: usize,
    /// `None`: `SSLRequest` is answered 'N'.
    pub tls: Option<ClientTlsConfig>,
    /// Keepalive and user timeout of client and server sockets.
    pub tcp: TcpOptions,
    /// Defaults of `auth_user` / `auth_query` / `auth_cache_ttl` for every database.
    pub auth_query: AuthQueryKeys,
    /// Logged-in clients of one user name; 0: no limit.
    pub max_client_conn_per_user: usize,
    /// Client connections from one IP address; 0: no limit.
    pub max_client_conn_per_address: usize,
    /// Client address rules (`hba_file` or `hba`); `None`: everyone may try to log in.
    pub hba: Option<HbaSource>,
    /// `[server.login_rate]`.
    pub login_rate: LoginRateConfig,
}

/// `[server.login_rate]`: how often one address or one user name may try to log in, and
/// what failed passwords cost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginRateConfig {
    /// Tokens added per second to each address's and each user's bucket; 0: no limit.
    pub attempts_per_second: u32,
    /// Bucket size: attempts allowed at once after a quiet time.
    pub burst: u32,
    /// Delay before a failed password is answered, times the failures of that address;
    /// `None`: no delay.
    pub failed_delay: Option<Duration>,
    /// Failed passwords from one address before it is banned; 0: never.
    pub ban_after: u32,
    pub ban_duration: Duration,
}

impl Default for LoginRateConfig {
    fn default() -> Self {
        LoginRateConfig {
            attempts_per_second: 20,
            burst: 50,
            failed_delay: Some(Duration::from_millis(100)),
            ban_after: 20,
            ban_duration: Duration::from_secs(300),
        }
    }
}

/// TCP settings of every client and server socket: they find a peer that vanished (a
/// pulled cable, a crashed host, a stopped process that still holds its socket) without
/// waiting for the kernel's defaults of hours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpOptions {
    /// Idle time before the first keepalive probe; `None`: keepalives off.
    pub keepalive_idle: Option<Duration>,
    /// Longest time written data may stay unacknowledged before the connection is
    /// dropped (`TCP_USER_TIMEOUT`); `None`: the kernel's default.
    pub user_timeout: Option<Duration>,
}

impl Default for TcpOptions {
    fn default() -> Self {
        TcpOptions {
            keepalive_idle: Some(Duration::from_secs(60)),
            user_timeout: Some(Duration::from_secs(30)),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:6432".to_owned(),
            workers: 0,
            max_client_conn: 10_000,
            admin_users: Vec::new(),
            stats_users: Vec::new(),
            metrics_listen: Some("127.0.0.1:9930".to_owned()),
            shutdown_timeout: Some(Duration::from_secs(30)),
            client_login_timeout: Some(Duration::from_secs(10)),
            client_idle_timeout: None,
            max_message_size: 64 << 20,
            tls: None,
            tcp: TcpOptions::default(),
            auth_query: AuthQueryKeys::default(),
            max_client_conn_per_user: 0,
            max_client_conn_per_address: 0,
            hba: None,
            login_rate: LoginRateConfig::default(),
        }
    }
}

/// `[server.tls]`. Relative paths are relative to the working directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub mode: ClientTlsMode,
    pub channel_binding: ChannelBindingMode,
}

/// One `[[users]]` entry. `Debug` hides the passwords because configs end up in logs.
#[derive(Clone, PartialEq, Eq)]
pub struct UserConfig {
    pub name: String,
    /// Plaintext, md5 hash or SCRAM verifier; `None` only with `auth = "trust"`.
    pub password: Option<String>,
    /// Password towards PostgreSQL when it differs from `password`.
    pub server_password: Option<String>,
    /// As configured, or derived from the form of `password`.
    pub auth: AuthMethod,
}

impl UserConfig {
    /// A user with a plaintext password and the default authentication method.
    pub fn new(name: impl Into<String>, password: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            password: Some(password.into()),
            server_password: None,
            auth: AuthMethod::ScramSha256,
        }
    }

    pub fn password_form(&self) -> Option<PasswordForm> {
        self.password.as_deref().map(PasswordForm::of)
    }

    /// The parsed verifier when `password` is a SCRAM verifier.
    pub fn scram_verifier(&self) -> Option<ScramVerifier> {
        let password = self.password.as_deref()?;
        match PasswordForm::of(password) {
            PasswordForm::Scram => ScramVerifier::parse(password).ok(),
            _ => None,
        }
    }

    /// What to log in to PostgreSQL with: `server_password`, else `password` unless it is a
    /// SCRAM verifier (which cannot produce a client proof). An md5 hash is returned as is; it
    /// only works against md5 authentication.
    pub fn password_for_server(&self) -> Option<&str> {
        if let Some(password) = self.server_password.as_deref() {
            return Some(password);
        }
        let password = self.password.as_deref()?;
        match PasswordForm::of(password) {
            PasswordForm::Scram => None,
            PasswordForm::Plaintext | PasswordForm::Md5 => Some(password),
        }
    }
}

impl fmt::Debug for UserConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redact = |p: &Option<String>| p.as_ref().map(|_| "<redacted>");
        f.debug_struct("UserConfig")
            .field("name", &self.name)
            .field("password", &redact(&self.password))
            .field("server_password", &redact(&self.server_password))
            .field("auth", &self.auth)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::super::secret::tests::{MD5_APP, VERIFIER};
    use super::*;

    #[test]
    fn debug_hides_passwords() {
        let user = UserConfig::new("app", "hunter2");
        let shown = format!("{user:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }

    #[test]
    fn password_for_server() {
        let mut user = UserConfig::new("app", "app");
        assert_eq!(user.password_for_server(), Some("app"));
        user.password = Some(VERIFIER.to_owned());
        assert_eq!(user.password_for_server(), None);
        assert!(user.scram_verifier().is_some());
        user.server_password = Some("other".to_owned());
        assert_eq!(user.password_for_server(), Some("other"));
        user.password = Some(MD5_APP.to_owned());
        user.server_password = None;
        assert_eq!(user.password_for_server(), Some(MD5_APP));
        assert_eq!(user.password_form(), Some(PasswordForm::Md5));
        assert_eq!(user.scram_verifier(), None);
    }
}
