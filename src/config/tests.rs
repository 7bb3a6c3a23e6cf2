//! Whole-file tests of [`super::parse`] and [`super::load`]: every key, defaults, and problem reporting.

use std::path::PathBuf;
use std::time::Duration;

use super::secret::tests::VERIFIER;
use super::*;

fn problems(text: &str) -> Vec<String> {
    match parse(text) {
        Ok(_) => Vec::new(),
        Err(errors) => errors.problems.iter().map(ToString::to_string).collect(),
    }
}

const FULL: &str = r#"
[server]
listen = "0.0.0.0:7432"
workers = 3
max_client_conn = 500
admin_users = ["admin"]
stats_users = ["monitor"]
metrics_listen = "127.0.0.1:9931"
shutdown_timeout = "1m"
client_login_timeout = "250ms"
client_idle_timeout = "2h"
max_message_size = "16MB"

[server.tls]
cert = "server.crt"
key = "server.key"
mode = "require"
ca = "client-ca.crt"

[pool]
mode = "session"
size = 40
min_size = 2
reserve_size = 5
reserve_timeout = "0"
query_wait_timeout = "45s"
server_connect_timeout = "1500us"
server_idle_timeout = "0"
server_lifetime = "2d"
server_reset_query = ""
max_prepared_statements = 50

[[users]]
name = "app"
password = "SCRAM-SHA-256$4096:c2FsdHNhbHRzYWx0c2FsdA==$67JFtZNI0yaS8i+7fP8/m/zCGx7Aa697n5KX1HseycM=:5/1Y0k/ettsWQ3XOOoMkGMphA7V8yuRhvhBAbo3XowA="
server_password = "app"
max_user_connections = 7

[[users]]
name = "admin"
password = "md5fe63fea7be31b0200b496d08bc6b517d"

[[users]]
name = "monitor"
auth = "trust"

[databases.app]
dbname = "app_prod"
primary = "pg-primary:5432"
replicas = ["pg-replica-1:5432", "[::1]:5433"]
server_tls = { mode = "verify-full", ca = "root.crt" }
mode = "statement"
size = 8
min_size = 1
reserve_size = 2
reserve_timeout = "1s"
query_wait_timeout = "0"
server_connect_timeout = "2s"
server_idle_timeout = "5m"
server_lifetime = "0"
server_reset_query = "RESET ALL"
max_prepared_statements = 10

[databases.app.routing]
read_write_split = false
load_balance = "round_robin"
transactions = "first_statement"
consistency = "causal"
max_replica_lag = "0"
health_check_interval = "500ms"
write_functions = ["bump_counter"]
read_only_functions = ["pure_fn"]
function_volatility = "lists"
retry_refused_on_primary = false
target = "primary"

[databases."*"]
primary = "127.0.0.1:5432"
replicas = ["127.0.0.1:5433"]
"#;

#[test]
fn full_file_with_every_key() {
    let config = parse(FULL).unwrap();

    let server = &config.server;
    assert_eq!(server.listen, "0.0.0.0:7432");
    assert_eq!(server.workers, 3);
    assert_eq!(server.max_client_conn, 500);
    assert_eq!(server.admin_users, ["admin"]);
    assert_eq!(server.stats_users, ["monitor"]);
    assert_eq!(server.metrics_listen.as_deref(), Some("127.0.0.1:9931"));
    assert_eq!(server.shutdown_timeout, Some(Duration::from_secs(60)));
    assert_eq!(server.client_login_timeout, Some(Duration::from_millis(250)));
    assert_eq!(server.client_idle_timeout, Some(Duration::from_secs(7200)));
    assert_eq!(server.max_message_size, 16 << 20);
    assert_eq!(
        server.tls,
        Some(ClientTlsConfig {
            cert: PathBuf::from("server.crt"),
            key: PathBuf::from("server.key"),
            mode: ClientTlsMode::Require,
            channel_binding: crate::config::ChannelBindingMode::Offer,
            ca: Some(PathBuf::from("client-ca.crt")),
        })
    );

    assert_eq!(
        config.pool,
        PoolConfig {
            mode: PoolMode::Session,
            size: 40,
            min_size: 2,
            reserve_size: 5,
            reserve_timeout: None,
            query_wait_timeout: Some(Duration::from_secs(45)),
            server_connect_timeout: Some(Duration::from_micros(1500)),
            server_idle_timeout: None,
            server_lifetime: Some(Duration::from_secs(2 * 86_400)),
            server_reset_query: None,
            max_prepared_statements: 50,
            max_client_prepared_statements: 1000,
            retry_reads: true,
            idle_transaction_timeout: None,
            query_timeout: None,
            max_user_connections: 0,
            max_db_connections: 0,
        }
    );

    assert_eq!(config.users.len(), 3);
    let app = config.user("app").unwrap();
    assert_eq!(app.password.as_deref(), Some(VERIFIER));
    assert_eq!(app.server_password.as_deref(), Some("app"));
    assert_eq!(app.auth, AuthMethod::ScramSha256);
    assert_eq!(app.scram_verifier().unwrap().iterations, 4096);
    assert_eq!(app.max_user_connections, Some(7));
    assert_eq!(config.user("admin").unwrap().max_user_connections, None);
    assert_eq!(config.user("admin").unwrap().auth, AuthMethod::Md5);
    let monitor = config.user("monitor").unwrap();
    assert_eq!((monitor.auth, monitor.password.as_deref()), (AuthMethod::Trust, None));
    assert!(config.is_admin("admin") && !config.is_admin("app"));
    assert!(config.is_stats_user("monitor") && !config.is_stats_user("admin"));

    let db = &config.databases["app"];
    assert_eq!(db.server_dbname("app"), "app_prod");
    assert_eq!(db.primary, "pg-primary:5432");
    assert_eq!(db.replicas, ["pg-replica-1:5432", "[::1]:5433"]);
    assert_eq!(
        db.server_tls,
        ServerTlsConfig {
            mode: ServerTlsMode::VerifyFull,
            ca: Some(PathBuf::from("root.crt")),
        }
    );
    assert_eq!(
        db.pool(&config.pool),
        PoolConfig {
            mode: PoolMode::Statement,
            size: 8,
            min_size: 1,
            reserve_size: 2,
            reserve_timeout: Some(Duration::from_secs(1)),
            query_wait_timeout: None,
            server_connect_timeout: Some(Duration::from_secs(2)),
            server_idle_timeout: Some(Duration::from_secs(300)),
            server_lifetime: None,
            server_reset_query: Some("RESET ALL".to_owned()),
            max_prepared_statements: 10,
            max_client_prepared_statements: 1000,
            retry_reads: true,
            idle_transaction_timeout: None,
            query_timeout: None,
            max_user_connections: 0,
            max_db_connections: 0,
        }
    );
    assert_eq!(
        db.routing,
        RoutingConfig {
            read_write_split: false,
            load_balance: LoadBalance::RoundRobin,
            transactions: TransactionRouting::FirstStatement,
            consistency: Consistency::Causal,
            max_replica_lag: None,
            health_check_interval: Duration::from_millis(500),
            write_functions: vec!["bump_counter".to_owned()],
            read_only_functions: vec!["pure_fn".to_owned()],
            function_volatility: FunctionVolatility::Lists,
            retry_refused_on_primary: false,
            target: RoutingTarget::Primary,
        }
    );

    // The fallback entry inherits [pool] and serves any other dbname under its own name.
    let (key, fallback) = config.database("reports").unwrap();
    assert_eq!(key, FALLBACK_DATABASE);
    assert_eq!(fallback.server_dbname("reports"), "reports");
    assert_eq!(fallback.pool(&config.pool), config.pool);
    assert_eq!(fallback.routing, RoutingConfig::default());
    assert_eq!(config.database("app").unwrap().0, "app");
}

#[test]
fn defaults_when_keys_are_absent() {
    let config = parse("").unwrap();
    assert_eq!(config, Config::default());
    let server = &config.server;
    assert_eq!(server.listen, "127.0.0.1:6432");
    assert_eq!(server.workers, 0);
    assert_eq!(server.max_client_conn, 10_000);
    assert!(server.admin_users.is_empty() && server.stats_users.is_empty());
    assert_eq!(server.metrics_listen.as_deref(), Some("127.0.0.1:9930"));
    assert_eq!(server.shutdown_timeout, Some(Duration::from_secs(30)));
    assert_eq!(server.client_login_timeout, Some(Duration::from_secs(10)));
    assert_eq!(server.client_idle_timeout, None);
    assert_eq!(server.max_message_size, 64 << 20);
    assert_eq!(server.tls, None);
    assert_eq!(server.tcp.keepalive_idle, Some(Duration::from_secs(60)));
    assert_eq!(server.tcp.user_timeout, Some(Duration::from_secs(30)));

    let pool = &config.pool;
    assert_eq!(pool.mode, PoolMode::Transaction);
    assert_eq!((pool.size, pool.min_size, pool.reserve_size), (20, 0, 0));
    assert_eq!(pool.reserve_timeout, Some(Duration::from_secs(5)));
    assert_eq!(pool.query_wait_timeout, Some(Duration::from_secs(30)));
    assert_eq!(pool.server_connect_timeout, Some(Duration::from_secs(5)));
    assert_eq!(pool.server_idle_timeout, Some(Duration::from_secs(600)));
    assert_eq!(pool.server_lifetime, Some(Duration::from_secs(3600)));
    assert_eq!(pool.server_reset_query.as_deref(), Some("DISCARD ALL"));
    assert_eq!(pool.max_prepared_statements, 200);
    assert!(pool.retry_reads);
    assert!(config.users.is_empty() && config.databases.is_empty());
    assert_eq!(config.database("app"), None);

    let config =
        parse("[databases.app]\nprimary = \"127.0.0.1:5432\"\n[server.tls]\ncert = \"c\"\nkey = \"k\"\n").unwrap();
    let db = &config.databases["app"];
    assert_eq!(db, &DatabaseConfig::new("127.0.0.1:5432"));
    assert_eq!(db.server_dbname("app"), "app");
    assert_eq!(db.server_tls.mode, ServerTlsMode::Prefer);
    let routing = &db.routing;
    assert!(routing.read_write_split);
    assert_eq!(routing.load_balance, LoadBalance::LeastConnections);
    assert_eq!(routing.transactions, TransactionRouting::Primary);
    assert_eq!(routing.consistency, Consistency::Session);
    assert_eq!(routing.max_replica_lag, Some(Duration::from_secs(1)));
    assert_eq!(routing.health_check_interval, Duration::from_secs(1));
    assert_eq!(routing.target, RoutingTarget::Auto);
    assert_eq!(config.server.tls.as_ref().map(|t| t.mode), Some(ClientTlsMode::Allow));
}

#[test]
fn auth_is_derived_from_the_password_form() {
    let config = parse(&format!(
        "[[users]]\nname = \"a\"\npassword = \"plain\"\n\
         [[users]]\nname = \"b\"\npassword = \"{VERIFIER}\"\n\
         [[users]]\nname = \"c\"\npassword = \"md5fe63fea7be31b0200b496d08bc6b517d\"\n\
         [[users]]\nname = \"d\"\npassword = \"plain\"\nauth = \"md5\"\n"
    ))
    .unwrap();
    let auth: Vec<AuthMethod> = config.users.iter().map(|u| u.auth).collect();
    assert_eq!(
        auth,
        [
            AuthMethod::ScramSha256,
            AuthMethod::ScramSha256,
            AuthMethod::Md5,
            AuthMethod::Md5
        ]
    );
}

#[test]
fn per_database_pool_overrides() {
    let config = parse(
        "[pool]\nsize = 30\nquery_wait_timeout = \"10s\"\n\
         [databases.a]\nprimary = \"h:1\"\nsize = 5\nquery_wait_timeout = \"0\"\n\
         [databases.b]\nprimary = \"h:1\"\nmode = \"session\"\n",
    )
    .unwrap();
    let a = config.databases["a"].pool(&config.pool);
    assert_eq!((a.size, a.query_wait_timeout), (5, None));
    assert_eq!(a.mode, PoolMode::Transaction);
    let b = config.databases["b"].pool(&config.pool);
    assert_eq!((b.size, b.mode), (30, PoolMode::Session));
    assert_eq!(b.query_wait_timeout, Some(Duration::from_secs(10)));
    assert_eq!(config.databases["b"].pool_overrides.size, None);
}

#[test]
fn the_example_file_parses() {
    let config = parse(include_str!("../../config.toml.example")).unwrap();
    assert_eq!(config.users.len(), 3);
    assert_eq!(config.user("app").unwrap().password.as_deref(), Some("app"));
    assert!(config.is_admin("admin"));
    assert!(config.is_stats_user("monitor"));
    let keys: Vec<&str> = config.databases.keys().map(String::as_str).collect();
    assert_eq!(keys, ["*", "app", "app_ro"]);
    assert_eq!(config.databases["app"].replicas, ["127.0.0.1:5433"]);
    assert_eq!(config.databases["app_ro"].routing.target, RoutingTarget::Replica);
    assert_eq!(config.databases["app_ro"].server_dbname("app_ro"), "app");
    // Apart from what it configures on purpose, the example shows the defaults.
    assert_eq!(config.pool, PoolConfig::default());
    assert_eq!(config.databases["app"].routing, RoutingConfig::default());
    let server = ServerConfig {
        admin_users: vec!["admin".to_owned()],
        stats_users: vec!["monitor".to_owned()],
        ..ServerConfig::default()
    };
    assert_eq!(config.server, server);
}

#[test]
fn unknown_keys_in_every_section_are_all_reported() {
    let found = problems(
        r#"
lsiten = 1
[server]
listn = "127.0.0.1:1"
bogus = true
[server.tls]
cert = "c"
key = "k"
mood = "allow"
[pool]
szie = 3
[[users]]
name = "u"
password = "p"
pasword = "p"
[databases.app]
primary = "h:1"
replica = ["h:2"]
server_tls = { mode = "prefer", cafile = "x" }
[databases.app.routing]
laod_balance = "random"
[databases.app.extra]
x = 1
"#,
    );
    assert_eq!(
        found,
        [
            "server.bogus: unknown key".to_owned(),
            "server.listn: unknown key (did you mean \"listen\"?)".to_owned(),
            "server.tls.mood: unknown key (did you mean \"mode\"?)".to_owned(),
            "pool.szie: unknown key (did you mean \"size\"?)".to_owned(),
            "users[0].pasword: unknown key (did you mean \"password\"?)".to_owned(),
            "databases.app.extra: unknown key".to_owned(),
            "databases.app.replica: unknown key (did you mean \"replicas\"?)".to_owned(),
            "databases.app.routing.laod_balance: unknown key (did you mean \"load_balance\"?)".to_owned(),
            "databases.app.server_tls.cafile: unknown key".to_owned(),
            "lsiten: unknown key".to_owned(),
        ]
    );
}

#[test]
fn type_errors_carry_their_key_path() {
    let found = problems(
        r#"
[server]
max_client_conn = -1
shutdown_timeout = "30"
max_message_size = "lots"
[pool]
size = "x"
mode = "sessions"
[[users]]
name = 7
password = "p"
[[users]]
"not a table"
"#,
    );
    // The last [[users]] line is a syntax error, so the whole file is one problem.
    assert_eq!(found.len(), 1);
    assert!(found[0].starts_with("TOML syntax error at line 13,"), "{found:?}");

    let found = problems(
        r#"
users = [{ name = 7, password = "p" }, "not a table"]
[server]
max_client_conn = -1
shutdown_timeout = "30"
max_message_size = "lots"
[pool]
size = "x"
mode = "sessions"
[databases.app]
primary = 5432
replicas = "h:1"
routing = { read_write_split = "yes", max_replica_lag = 1 }
[databases.other]
primary = "h:1"
size = -3
"#,
    );
    assert_eq!(
        found,
        [
            "server.max_client_conn: invalid value: integer `-1`, expected usize",
            "server.max_message_size: \"lots\" is not a size: expected a whole number of bytes, \
             optionally with a unit (B, kB, MB, GB), e.g. \"64MB\"",
            "server.shutdown_timeout: \"30\" needs a unit (us, ms, s, m, h, d), e.g. \"30s\"; \
             only \"0\" may go without one",
            "pool.mode: unknown value \"sessions\", expected one of: session | transaction | statement",
            "pool.size: invalid type: string \"x\", expected usize",
            "users[0].name: invalid type: integer `7`, expected a string",
            "users[1]: invalid type: string \"not a table\", expected a table",
            "databases.app.primary: invalid type: integer `5432`, expected a string",
            "databases.app.replicas: invalid type: string \"h:1\", expected an array",
            "databases.app.routing.max_replica_lag: \"1\" needs a unit (us, ms, s, m, h, d), \
             e.g. \"1s\"; only \"0\" may go without one",
            "databases.app.routing.read_write_split: invalid type: string \"yes\", expected a boolean",
            "databases.other.size: invalid value: integer `-3`, expected usize",
        ]
    );
}

#[test]
fn sections_of_the_wrong_shape() {
    assert_eq!(
        problems("server = 1\npool = []\nusers = 3\ndatabases = \"x\"\n"),
        [
            "server: invalid type: integer `1`, expected a table",
            "pool: invalid type: array, expected a table",
            "users: expected an array of tables ([[users]]), found integer",
            "databases: expected a table of databases ([databases.NAME]), found string",
        ]
    );
    assert_eq!(
        problems("[databases]\napp = \"127.0.0.1:5432\"\n"),
        ["databases.app: invalid type: string \"127.0.0.1:5432\", expected a table"]
    );
}

#[test]
fn syntax_errors_have_line_and_column() {
    let errors = parse("[server]\nlisten = \"a\"\nlisten = \"b\"\n").unwrap_err();
    assert_eq!(errors.problems.len(), 1);
    let problem = &errors.problems[0];
    assert_eq!(problem.path, "");
    assert!(
        problem.message.starts_with("TOML syntax error at line 3, column 1:"),
        "{problem}"
    );
    let errors = parse("[pool]\nsize = = 3\n").unwrap_err();
    assert!(
        errors.to_string().starts_with("TOML syntax error at line 2, column 8:"),
        "{errors}"
    );
}

#[test]
fn display_one_problem_per_line() {
    let errors = parse("[pool]\nsize = 0\nmin_size = 3\n").unwrap_err();
    assert_eq!(
        errors.to_string(),
        "pool.min_size: 3 is larger than size (0)\npool.size: must be at least 1"
    );
    assert_eq!(errors.problems().len(), 2);
    assert_eq!(errors.into_iter().count(), 2);
}

#[test]
fn load_reports_the_file() {
    let dir = std::env::temp_dir().join(format!("pgrelay-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    let missing = dir.join("missing.toml");
    let errors = load(&missing).unwrap_err();
    assert_eq!(errors.problems[0].path, missing.display().to_string());
    assert!(errors.problems[0].message.starts_with("cannot read the file:"));

    let broken = dir.join("broken.toml");
    std::fs::write(&broken, "[pool\n").unwrap();
    let errors = load(&broken).unwrap_err();
    assert_eq!(errors.problems[0].path, broken.display().to_string());
    assert!(errors.problems[0].message.contains("line 1"), "{errors}");

    let good = dir.join("good.toml");
    std::fs::write(&good, "[pool]\nsize = 3\n").unwrap();
    assert_eq!(load(&good).unwrap().pool.size, 3);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn tcp_keys_set_keepalive_and_user_timeout() {
    let tcp = |text: &str| parse(text).unwrap().server.tcp;
    let set = tcp("[server]\ntcp_keepalive_idle = \"20s\"\ntcp_user_timeout = \"5s\"");
    assert_eq!(set.keepalive_idle, Some(Duration::from_secs(20)));
    assert_eq!(set.user_timeout, Some(Duration::from_secs(5)));
    let off = tcp("[server]\ntcp_keepalive = false\ntcp_user_timeout = \"0\"");
    assert_eq!(off.keepalive_idle, None);
    assert_eq!(off.user_timeout, None);
    assert_eq!(tcp("[server]\ntcp_keepalive_idle = \"0\"").keepalive_idle, None);
    assert!(!parse("[pool]\nretry_reads = false").unwrap().pool.retry_reads);
    let pool = parse("[pool]\nmax_client_prepared_statements = 0").unwrap().pool;
    assert_eq!(pool.max_client_prepared_statements, 0);
}
