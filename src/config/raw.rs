//! The file as written (every key optional) and its conversion into the typed [`Config`] with
//! defaults filled in. Missing required keys are reported here; everything semantic is left to
//! `validate`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::duration::{ByteSize, DurationValue};
use super::enums::{
    AuthMethod, ChannelBindingMode, ClientTlsMode, Consistency, FunctionVolatility, ListenNotify, LoadBalance,
    PoolMode, RoutingTarget, ServerTlsMode, TransactionRouting,
};
use super::hba::{HbaRule, HbaSource};
use super::secret::PasswordForm;
use super::section::{Section, Seg, TableOf, deserialize_section, fields_of, index_path, key_path, suggest};
use super::{
    AuthQueryKeys, ClientTlsConfig, Config, DatabaseConfig, InstanceIdSetting, LoginRateConfig, Peers, PoolConfig,
    PoolOverrides, Problem, RoutingConfig, ServerConfig, ServerTlsConfig, TcpOptions, UserConfig,
};

const TOP_LEVEL_KEYS: &[&str] = &["server", "pool", "users", "databases"];
const MISSING: &str = "required key is missing";

#[derive(Deserialize)]
struct RawServer {
    listen: Option<String>,
    workers: Option<usize>,
    max_client_conn: Option<usize>,
    admin_users: Option<Vec<String>>,
    stats_users: Option<Vec<String>>,
    metrics_listen: Option<String>,
    shutdown_timeout: Option<DurationValue>,
    client_login_timeout: Option<DurationValue>,
    client_idle_timeout: Option<DurationValue>,
    max_message_size: Option<ByteSize>,
    tls: Option<TableOf<RawClientTls>>,
    tcp_keepalive: Option<bool>,
    tcp_keepalive_idle: Option<DurationValue>,
    tcp_user_timeout: Option<DurationValue>,
    auth_user: Option<String>,
    auth_query: Option<String>,
    auth_cache_ttl: Option<DurationValue>,
    auth_dbname: Option<String>,
    max_client_conn_per_user: Option<usize>,
    max_client_conn_per_address: Option<usize>,
    hba_file: Option<PathBuf>,
    hba: Option<Vec<String>>,
    login_rate: Option<TableOf<RawLoginRate>>,
    instance_id: Option<InstanceIdSetting>,
    peers: Option<Vec<String>>,
    peers_dns: Option<String>,
    peer_listen: Option<String>,
    takeover_socket: Option<PathBuf>,
}

#[derive(Deserialize)]
struct RawLoginRate {
    attempts_per_second: Option<u32>,
    burst: Option<u32>,
    failed_delay: Option<DurationValue>,
    ban_after: Option<u32>,
    ban_duration: Option<DurationValue>,
}

#[derive(Deserialize)]
struct RawClientTls {
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    mode: Option<ClientTlsMode>,
    channel_binding: Option<ChannelBindingMode>,
    ca: Option<PathBuf>,
}

#[derive(Deserialize)]
struct RawPool {
    mode: Option<PoolMode>,
    size: Option<usize>,
    min_size: Option<usize>,
    reserve_size: Option<usize>,
    reserve_timeout: Option<DurationValue>,
    query_wait_timeout: Option<DurationValue>,
    server_connect_timeout: Option<DurationValue>,
    server_idle_timeout: Option<DurationValue>,
    server_lifetime: Option<DurationValue>,
    server_reset_query: Option<String>,
    max_prepared_statements: Option<usize>,
    max_client_prepared_statements: Option<usize>,
    retry_reads: Option<bool>,
    idle_transaction_timeout: Option<DurationValue>,
    query_timeout: Option<DurationValue>,
    max_user_connections: Option<usize>,
    max_db_connections: Option<usize>,
}

#[derive(Deserialize)]
struct RawUser {
    name: Option<String>,
    password: Option<String>,
    server_password: Option<String>,
    auth: Option<AuthMethod>,
    max_user_connections: Option<usize>,
}

/// The database's own keys; its `[pool]` keys are split off and read as a [`RawPool`].
#[derive(Deserialize)]
struct RawDatabase {
    dbname: Option<String>,
    primary: Option<String>,
    replicas: Option<Vec<String>>,
    server_tls: Option<TableOf<RawServerTls>>,
    routing: Option<TableOf<RawRouting>>,
    auth_user: Option<String>,
    auth_query: Option<String>,
    auth_cache_ttl: Option<DurationValue>,
    auth_dbname: Option<String>,
    listen_notify: Option<ListenNotify>,
}

#[derive(Deserialize)]
struct RawServerTls {
    mode: Option<ServerTlsMode>,
    ca: Option<PathBuf>,
}

#[derive(Deserialize)]
struct RawRouting {
    read_write_split: Option<bool>,
    load_balance: Option<LoadBalance>,
    transactions: Option<TransactionRouting>,
    consistency: Option<Consistency>,
    max_replica_lag: Option<DurationValue>,
    health_check_interval: Option<DurationValue>,
    write_functions: Option<Vec<String>>,
    read_only_functions: Option<Vec<String>>,
    function_volatility: Option<FunctionVolatility>,
    retry_refused_on_primary: Option<bool>,
    target: Option<RoutingTarget>,
}

impl Section for RawServer {
    fn keys_at(parent: &[Seg]) -> Vec<&'static str> {
        match parent.first() {
            None => fields_of::<RawServer>().to_vec(),
            Some(Seg::Key(key)) if key == "login_rate" => fields_of::<RawLoginRate>().to_vec(),
            Some(_) => fields_of::<RawClientTls>().to_vec(),
        }
    }
}

impl Section for RawPool {
    fn keys_at(_: &[Seg]) -> Vec<&'static str> {
        fields_of::<RawPool>().to_vec()
    }
}

impl Section for RawUser {
    fn keys_at(_: &[Seg]) -> Vec<&'static str> {
        fields_of::<RawUser>().to_vec()
    }
}

impl Section for RawDatabase {
    fn keys_at(parent: &[Seg]) -> Vec<&'static str> {
        match parent.first() {
            None => [fields_of::<RawDatabase>(), fields_of::<RawPool>()].concat(),
            Some(Seg::Key(key)) if key == "routing" => fields_of::<RawRouting>().to_vec(),
            Some(_) => fields_of::<RawServerTls>().to_vec(),
        }
    }
}

/// "0" means "no limit" for these settings.
fn limit(value: Option<DurationValue>) -> Option<Option<Duration>> {
    value.map(|DurationValue(d)| (!d.is_zero()).then_some(d))
}

fn required<T>(value: Option<T>, path: String, problems: &mut Vec<Problem>) -> T
where
    T: Default,
{
    value.unwrap_or_else(|| {
        // A key dropped for having the wrong type is already reported.
        if !problems.iter().any(|p| p.path == path) {
            problems.push(Problem::new(path, MISSING));
        }
        T::default()
    })
}

/// Builds the typed config from the parsed file, pushing structural problems (unknown keys,
/// wrong types, missing required keys). Parts that could not be read keep their defaults.
pub(super) fn build(mut table: toml::Table, problems: &mut Vec<Problem>) -> Config {
    let mut config = Config::default();
    // Known sections are taken out; whatever is left is an unknown top-level key.
    if let Some(value) = table.remove("server")
        && let Some(raw) = deserialize_section::<RawServer>(value, "server", problems)
    {
        config.server = server(raw, problems);
    }
    if let Some(value) = table.remove("pool")
        && let Some(raw) = deserialize_section::<RawPool>(value, "pool", problems)
    {
        config.pool = pool(raw).apply(&PoolConfig::default());
    }
    if let Some(value) = table.remove("users") {
        config.users = users(value, problems);
    }
    if let Some(value) = table.remove("databases") {
        config.databases = databases(value, problems);
    }
    for key in table.keys() {
        let message = match suggest(key, TOP_LEVEL_KEYS) {
            Some(known) => format!("unknown key (did you mean {known:?}?)"),
            None => "unknown key".to_owned(),
        };
        problems.push(Problem::new(key_path("", key), message));
    }
    config
}

fn server(raw: RawServer, problems: &mut Vec<Problem>) -> ServerConfig {
    let defaults = ServerConfig::default();
    let tls = raw.tls.map(|TableOf(tls)| ClientTlsConfig {
        cert: required(tls.cert, "server.tls.cert".to_owned(), problems),
        key: required(tls.key, "server.tls.key".to_owned(), problems),
        mode: tls.mode.unwrap_or_default(),
        channel_binding: tls.channel_binding.unwrap_or_default(),
        ca: tls.ca,
    });
    ServerConfig {
        listen: raw.listen.unwrap_or(defaults.listen),
        workers: raw.workers.unwrap_or(defaults.workers),
        max_client_conn: raw.max_client_conn.unwrap_or(defaults.max_client_conn),
        admin_users: raw.admin_users.unwrap_or_default(),
        stats_users: raw.stats_users.unwrap_or_default(),
        metrics_listen: match raw.metrics_listen {
            Some(addr) if addr.is_empty() => None,
            Some(addr) => Some(addr),
            None => defaults.metrics_listen,
        },
        shutdown_timeout: limit(raw.shutdown_timeout).unwrap_or(defaults.shutdown_timeout),
        client_login_timeout: limit(raw.client_login_timeout).unwrap_or(defaults.client_login_timeout),
        client_idle_timeout: limit(raw.client_idle_timeout).unwrap_or(defaults.client_idle_timeout),
        // Saturating: anything beyond usize is far beyond the 1 GB maximum anyway.
        max_message_size: raw.max_message_size.map_or(defaults.max_message_size, |size| {
            usize::try_from(size.0).unwrap_or(usize::MAX)
        }),
        tls,
        tcp: TcpOptions {
            // "0" for the idle time turns keepalives off like `tcp_keepalive = false`.
            keepalive_idle: if raw.tcp_keepalive.unwrap_or(true) {
                limit(raw.tcp_keepalive_idle).unwrap_or(defaults.tcp.keepalive_idle)
            } else {
                None
            },
            user_timeout: limit(raw.tcp_user_timeout).unwrap_or(defaults.tcp.user_timeout),
        },
        max_client_conn_per_user: raw.max_client_conn_per_user.unwrap_or(0),
        max_client_conn_per_address: raw.max_client_conn_per_address.unwrap_or(0),
        hba: hba(raw.hba_file, raw.hba, problems),
        login_rate: raw
            .login_rate
            .map_or_else(LoginRateConfig::default, |TableOf(raw)| login_rate(raw)),
        auth_query: auth_query_keys(raw.auth_user, raw.auth_query, raw.auth_cache_ttl, raw.auth_dbname),
        instance_id: raw.instance_id.unwrap_or_default(),
        peers: peers(raw.peers, raw.peers_dns, problems),
        peer_listen: raw.peer_listen,
        takeover_socket: raw.takeover_socket,
    }
}

/// `peers = []` is the same as no peers; an empty `peers_dns` is left for validation.
fn peers(list: Option<Vec<String>>, dns: Option<String>, problems: &mut Vec<Problem>) -> Peers {
    let list = list.filter(|list| !list.is_empty());
    match (list, dns) {
        (None, None) => Peers::None,
        (Some(_), Some(_)) => {
            problems.push(Problem::new("server.peers", "set either peers or peers_dns, not both"));
            Peers::None
        }
        (Some(list), None) => Peers::List(list),
        (None, Some(name)) => Peers::Dns(name),
    }
}

/// Zero is kept as zero so that validation can refuse it with its key path.
fn auth_query_keys(
    auth_user: Option<String>,
    auth_query: Option<String>,
    auth_cache_ttl: Option<DurationValue>,
    auth_dbname: Option<String>,
) -> AuthQueryKeys {
    AuthQueryKeys {
        auth_user,
        auth_query,
        auth_dbname,
        auth_cache_ttl: auth_cache_ttl.map(|DurationValue(ttl)| ttl),
    }
}

/// `hba_file` is read when the running state is built (and again at each reload); inline
/// rules are parsed now, each mistake reported at its entry.
fn hba(file: Option<PathBuf>, inline: Option<Vec<String>>, problems: &mut Vec<Problem>) -> Option<HbaSource> {
    match (file, inline) {
        (None, None) => None,
        (Some(_), Some(_)) => {
            problems.push(Problem::new("server.hba", "set either hba_file or hba, not both"));
            None
        }
        (Some(file), None) => Some(HbaSource::File(file)),
        (None, Some(lines)) => {
            let mut rules = Vec::new();
            for (index, line) in lines.iter().enumerate() {
                match super::hba::parse(line, None) {
                    Ok(parsed) => rules.extend(parsed.into_iter().map(|rule| HbaRule {
                        line: index + 1,
                        ..rule
                    })),
                    Err(errors) => problems.extend(
                        errors
                            .into_iter()
                            .map(|error| Problem::new(index_path("server.hba", index), error.message)),
                    ),
                }
            }
            Some(HbaSource::Inline(rules))
        }
    }
}

fn login_rate(raw: RawLoginRate) -> LoginRateConfig {
    let defaults = LoginRateConfig::default();
    LoginRateConfig {
        attempts_per_second: raw.attempts_per_second.unwrap_or(defaults.attempts_per_second),
        burst: raw.burst.unwrap_or(defaults.burst),
        failed_delay: limit(raw.failed_delay).unwrap_or(defaults.failed_delay),
        ban_after: raw.ban_after.unwrap_or(defaults.ban_after),
        // Zero is kept so that validation can refuse it with its key path.
        ban_duration: raw.ban_duration.map_or(defaults.ban_duration, |d| d.0),
    }
}

fn pool(raw: RawPool) -> PoolOverrides {
    PoolOverrides {
        mode: raw.mode,
        size: raw.size,
        min_size: raw.min_size,
        reserve_size: raw.reserve_size,
        reserve_timeout: limit(raw.reserve_timeout),
        query_wait_timeout: limit(raw.query_wait_timeout),
        server_connect_timeout: limit(raw.server_connect_timeout),
        server_idle_timeout: limit(raw.server_idle_timeout),
        server_lifetime: limit(raw.server_lifetime),
        server_reset_query: raw
            .server_reset_query
            .map(|query| (!query.trim().is_empty()).then_some(query)),
        max_prepared_statements: raw.max_prepared_statements,
        max_client_prepared_statements: raw.max_client_prepared_statements,
        retry_reads: raw.retry_reads,
        idle_transaction_timeout: limit(raw.idle_transaction_timeout),
        query_timeout: limit(raw.query_timeout),
        max_user_connections: raw.max_user_connections,
        max_db_connections: raw.max_db_connections,
    }
}

fn users(value: toml::Value, problems: &mut Vec<Problem>) -> Vec<UserConfig> {
    let toml::Value::Array(items) = value else {
        problems.push(Problem::new(
            "users",
            format!("expected an array of tables ([[users]]), found {}", value.type_str()),
        ));
        return Vec::new();
    };
    let mut users = Vec::new();
    for (index, item) in items.into_iter().enumerate() {
        let path = index_path("users", index);
        let Some(raw) = deserialize_section::<RawUser>(item, &path, problems) else {
            continue;
        };
        let auth = raw
            .auth
            .unwrap_or_else(|| match raw.password.as_deref().map(PasswordForm::of) {
                Some(PasswordForm::Md5) => AuthMethod::Md5,
                _ => AuthMethod::ScramSha256,
            });
        users.push(UserConfig {
            name: required(raw.name, key_path(&path, "name"), problems),
            password: raw.password,
            server_password: raw.server_password,
            auth,
            max_user_connections: raw.max_user_connections,
        });
    }
    users
}

fn databases(value: toml::Value, problems: &mut Vec<Problem>) -> BTreeMap<String, DatabaseConfig> {
    let toml::Value::Table(entries) = value else {
        problems.push(Problem::new(
            "databases",
            format!(
                "expected a table of databases ([databases.NAME]), found {}",
                value.type_str()
            ),
        ));
        return BTreeMap::new();
    };
    let pool_keys = fields_of::<RawPool>();
    let mut databases = BTreeMap::new();
    for (name, entry) in entries {
        let path = key_path("databases", &name);
        // Pool keys are read by the same struct as [pool] so the two cannot drift apart.
        let (own, pool_part) = match entry {
            toml::Value::Table(table) => {
                let (pool_part, own): (toml::Table, toml::Table) = table
                    .into_iter()
                    .partition(|(key, _)| pool_keys.contains(&key.as_str()));
                (toml::Value::Table(own), pool_part)
            }
            other => (other, toml::Table::new()),
        };
        let Some(raw) = deserialize_section::<RawDatabase>(own, &path, problems) else {
            continue;
        };
        let overrides = deserialize_section::<RawPool>(toml::Value::Table(pool_part), &path, problems)
            .map(pool)
            .unwrap_or_default();
        let config = database(raw, overrides, &path, problems);
        databases.insert(name, config);
    }
    databases
}

fn database(
    raw: RawDatabase,
    pool_overrides: PoolOverrides,
    path: &str,
    problems: &mut Vec<Problem>,
) -> DatabaseConfig {
    let routing = raw
        .routing
        .map_or_else(RoutingConfig::default, |TableOf(raw)| routing(raw));
    DatabaseConfig {
        dbname: raw.dbname,
        primary: required(raw.primary, key_path(path, "primary"), problems),
        replicas: raw.replicas.unwrap_or_default(),
        server_tls: raw
            .server_tls
            .map_or_else(ServerTlsConfig::default, |TableOf(tls)| ServerTlsConfig {
                mode: tls.mode.unwrap_or_default(),
                ca: tls.ca,
            }),
        pool_overrides,
        routing,
        auth_query: auth_query_keys(raw.auth_user, raw.auth_query, raw.auth_cache_ttl, raw.auth_dbname),
        listen_notify: raw.listen_notify.unwrap_or_default(),
    }
}

fn routing(raw: RawRouting) -> RoutingConfig {
    let defaults = RoutingConfig::default();
    RoutingConfig {
        read_write_split: raw.read_write_split.unwrap_or(defaults.read_write_split),
        load_balance: raw.load_balance.unwrap_or(defaults.load_balance),
        transactions: raw.transactions.unwrap_or(defaults.transactions),
        consistency: raw.consistency.unwrap_or(defaults.consistency),
        max_replica_lag: limit(raw.max_replica_lag).unwrap_or(defaults.max_replica_lag),
        // Zero is kept as zero so that validation can refuse it with its key path.
        health_check_interval: raw
            .health_check_interval
            .map_or(defaults.health_check_interval, |d| d.0),
        write_functions: raw.write_functions.unwrap_or_default(),
        read_only_functions: raw.read_only_functions.unwrap_or_default(),
        function_volatility: raw.function_volatility.unwrap_or(defaults.function_volatility),
        retry_refused_on_primary: raw
            .retry_refused_on_primary
            .unwrap_or(defaults.retry_refused_on_primary),
        target: raw.target.unwrap_or(defaults.target),
    }
}
