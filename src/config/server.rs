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
    /// This instance's id, encoded in every cancel key it gives out (docs/operations.md).
    /// Read once, at startup.
    pub instance_id: InstanceIdSetting,
    /// The other instances, where cancel requests for their keys are forwarded.
    pub peers: Peers,
    /// An `IP:port` of this instance alone, where peers may send it cancel requests; `None`:
    /// only `listen`. Read once, at startup.
    pub peer_listen: Option<String>,
    /// A Unix socket where a new pgrelay process (`run --takeover PATH`) takes the listening
    /// sockets and idle clients over from this one; `None`: no takeover. Read once, at startup.
    pub takeover_socket: Option<PathBuf>,
}

/// `[server] instance_id` as written: a number, or derived from the host name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceIdSetting {
    Fixed(u8),
    /// `"hostname"`: the number after the last `-` of the host name, as a Kubernetes
    /// StatefulSet names its pods (`pgrelay-2` is instance 2).
    Hostname,
}

impl Default for InstanceIdSetting {
    fn default() -> Self {
        InstanceIdSetting::Fixed(0)
    }
}

impl fmt::Display for InstanceIdSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InstanceIdSetting::Fixed(id) => write!(f, "{id}"),
            InstanceIdSetting::Hostname => f.write_str("hostname"),
        }
    }
}

impl InstanceIdSetting {
    /// The id in force. `"hostname"` is read from the system here, when pgrelay starts,
    /// not when the file is checked: the file is usually checked on another machine.
    pub fn resolve(self) -> Result<u8, String> {
        match self {
            InstanceIdSetting::Fixed(id) => Ok(id),
            InstanceIdSetting::Hostname => {
                let name = nix::unistd::gethostname().map_err(|error| format!("cannot read the host name: {error}"))?;
                let name = name.to_string_lossy();
                id_from_hostname(&name).ok_or_else(|| {
                    format!(
                        "instance_id = \"hostname\": the host name {name:?} does not end in -N with N from 0 to 255 \
                         (as a StatefulSet's pods, pgrelay-0, pgrelay-1, ...)"
                    )
                })
            }
        }
    }
}

/// `pgrelay-2` (or `pgrelay-2.pgrelay-headless...`) → 2.
fn id_from_hostname(name: &str) -> Option<u8> {
    let short = name.split('.').next()?;
    let (_, number) = short.rsplit_once('-')?;
    if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    number.parse().ok()
}

impl<'de> serde::Deserialize<'de> for InstanceIdSetting {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct IdVisitor;

        impl serde::de::Visitor<'_> for IdVisitor {
            type Value = InstanceIdSetting;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a number from 0 to 255, or \"hostname\"")
            }

            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
                u8::try_from(v)
                    .map(InstanceIdSetting::Fixed)
                    .map_err(|_| E::custom(format!("{v} is out of range: must be from 0 to 255, or \"hostname\"")))
            }

            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
                self.visit_i64(i64::try_from(v).unwrap_or(i64::MAX))
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                match v {
                    "hostname" => Ok(InstanceIdSetting::Hostname),
                    _ => Err(E::custom(format!(
                        "{v:?} is not an instance id: write a number from 0 to 255, or \"hostname\""
                    ))),
                }
            }
        }

        deserializer.deserialize_any(IdVisitor)
    }
}

/// `[server] peers` / `peers_dns`: the other pgrelay instances.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Peers {
    /// Cancel requests for other instances' keys are dropped.
    #[default]
    None,
    /// `host:port` of each other instance; names are resolved at each forward.
    List(Vec<String>),
    /// `host:port` whose name resolves to every instance (a Kubernetes headless Service),
    /// resolved at each forward; this instance's own address among them is skipped.
    Dns(String),
}

impl Peers {
    pub fn is_none(&self) -> bool {
        matches!(self, Peers::None)
    }
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
            instance_id: InstanceIdSetting::default(),
            peers: Peers::None,
            peer_listen: None,
            takeover_socket: None,
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
    /// CA certificates (PEM) that client certificates are checked against; without it
    /// clients are not asked for one, and `cert` address rules refuse everyone.
    pub ca: Option<PathBuf>,
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
    /// This user's own `max_user_connections` (0: no limit); `None`: `[pool]`'s applies.
    pub max_user_connections: Option<usize>,
}

impl UserConfig {
    /// A user with a plaintext password and the default authentication method.
    pub fn new(name: impl Into<String>, password: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            password: Some(password.into()),
            server_password: None,
            auth: AuthMethod::ScramSha256,
            max_user_connections: None,
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
            .field("max_user_connections", &self.max_user_connections)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::super::secret::tests::{MD5_APP, VERIFIER};
    use super::*;

    #[test]
    fn instance_id_from_a_statefulset_host_name() {
        assert_eq!(id_from_hostname("pgrelay-0"), Some(0));
        assert_eq!(id_from_hostname("pgrelay-12"), Some(12));
        assert_eq!(id_from_hostname("pgrelay-3.pgrelay-headless.db.svc"), Some(3));
        assert_eq!(id_from_hostname("my-pool-255"), Some(255));
        assert_eq!(id_from_hostname("pgrelay-256"), None);
        assert_eq!(id_from_hostname("pgrelay-7d9f8c6b5-x2x4z"), None, "a Deployment's pod");
        assert_eq!(id_from_hostname("pgrelay"), None);
        assert_eq!(id_from_hostname("pgrelay-"), None);
        assert_eq!(id_from_hostname("pgrelay-+1"), None);
        assert_eq!(InstanceIdSetting::Fixed(7).resolve(), Ok(7));
    }

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
