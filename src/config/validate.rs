//! Semantic checks on a typed [`Config`]: every problem is collected, each with its key path
//! (`databases.app.min_size: 30 is larger than size (20)`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv6Addr, SocketAddr};

use super::duration::format_size;
use super::enums::{AuthMethod, RoutingTarget, ServerTlsMode};
use super::secret::{PasswordForm, check_password};
use super::section::{index_path, key_path};
use super::{
    ADMIN_DATABASE, Config, DatabaseConfig, FALLBACK_DATABASE, PoolConfig, PoolOverrides, Problem, RoutingConfig,
    ServerConfig, UserConfig,
};

const MIN_MESSAGE_SIZE: usize = 1 << 10;
const MAX_MESSAGE_SIZE: usize = 1 << 30;
/// More worker threads than this is a typo, not a machine.
const MAX_WORKERS: usize = 1024;

/// Every semantic problem in `config`, in file order (server, pool, users, databases).
pub fn validate(config: &Config) -> Vec<Problem> {
    let mut out = Vec::new();
    server(&config.server, &config.users, &mut out);
    pool("pool", &config.pool, None, &mut out);
    users(&config.users, &mut out);
    for (name, database) in &config.databases {
        self::database(name, database, &config.pool, &mut out);
    }
    super::auth_query::validate(config, &mut out);
    out
}

/// Splits `host:port` (`[v6]:port` for IPv6) where the host may be a DNS name.
pub fn split_host_port(addr: &str) -> Result<(&str, u16), String> {
    let (host, port) = if let Some(rest) = addr.strip_prefix('[') {
        let (host, port) = rest
            .split_once("]:")
            .ok_or_else(|| format!("{addr:?} is not [IPv6]:port"))?;
        if host.parse::<Ipv6Addr>().is_err() {
            return Err(format!("{addr:?} has an invalid IPv6 address"));
        }
        (host, port)
    } else {
        let (host, port) = addr
            .rsplit_once(':')
            .ok_or_else(|| format!("{addr:?} is not host:port (the port is missing)"))?;
        if host.contains(':') {
            return Err(format!(
                "{addr:?} is ambiguous: write IPv6 addresses in brackets, e.g. \"[::1]:5432\""
            ));
        }
        let valid_label = |label: &str| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if !host.split('.').all(valid_label) {
            return Err(format!("{addr:?} has an invalid host name"));
        }
        (host, port)
    };
    match port.parse::<u16>() {
        Ok(port) if port != 0 => Ok((host, port)),
        _ => Err(format!("{addr:?} has an invalid port (expected 1-65535)")),
    }
}

fn push(out: &mut Vec<Problem>, path: String, message: impl Into<String>) {
    out.push(Problem::new(path, message));
}

fn socket_addr(path: &str, value: &str, example: &str, out: &mut Vec<Problem>) -> Option<SocketAddr> {
    let parsed = value.parse::<SocketAddr>().ok();
    if parsed.is_none() {
        push(
            out,
            path.to_owned(),
            format!("{value:?} is not an IP:port address, e.g. {example:?}"),
        );
    }
    parsed
}

/// `peers`, `peers_dns` and `peer_listen`. Names may be DNS names: they are resolved when a
/// cancel is forwarded, not here.
fn peers(server: &ServerConfig, listen: Option<SocketAddr>, out: &mut Vec<Problem>) {
    match &server.peers {
        super::Peers::None => {}
        super::Peers::List(list) => {
            for (index, peer) in list.iter().enumerate() {
                if let Err(reason) = split_host_port(peer) {
                    push(out, index_path("server.peers", index), reason);
                }
            }
        }
        super::Peers::Dns(name) => {
            if let Err(reason) = split_host_port(name) {
                push(out, "server.peers_dns".to_owned(), reason);
            }
        }
    }
    if let Some(peer_listen) = &server.peer_listen
        && let Some(addr) = socket_addr("server.peer_listen", peer_listen, "10.0.0.5:6433", out)
        && addr.port() != 0
    {
        let metrics = server
            .metrics_listen
            .as_deref()
            .and_then(|m| m.parse::<SocketAddr>().ok());
        if Some(addr) == listen || Some(addr) == metrics {
            push(
                out,
                "server.peer_listen".to_owned(),
                "must be an address of its own, not that of listen or metrics_listen",
            );
        }
    }
}

fn server(server: &ServerConfig, users: &[UserConfig], out: &mut Vec<Problem>) {
    let listen = socket_addr("server.listen", &server.listen, "127.0.0.1:6432", out);
    if let Some(metrics) = &server.metrics_listen {
        let metrics = socket_addr("server.metrics_listen", metrics, "127.0.0.1:9930", out);
        // Port 0 means "any free port": two of those never collide.
        if metrics.is_some() && metrics == listen && metrics.is_some_and(|addr| addr.port() != 0) {
            push(
                out,
                "server.metrics_listen".to_owned(),
                "is the same address as server.listen",
            );
        }
    }
    if let Some(path) = &server.takeover_socket {
        // sun_path holds 108 bytes with the terminating NUL.
        let length = path.as_os_str().len();
        if length == 0 {
            push(out, "server.takeover_socket".to_owned(), "must be a file path");
        } else if length > 107 {
            push(
                out,
                "server.takeover_socket".to_owned(),
                "is longer than the 107 bytes a Unix socket path may have",
            );
        }
    }
    if server.workers > MAX_WORKERS {
        push(
            out,
            "server.workers".to_owned(),
            "must be at most 1024 (0: one per core)",
        );
    }
    if server.max_client_conn < 1 {
        push(out, "server.max_client_conn".to_owned(), "must be at least 1");
    }
    if !(MIN_MESSAGE_SIZE..=MAX_MESSAGE_SIZE).contains(&server.max_message_size) {
        push(
            out,
            "server.max_message_size".to_owned(),
            format!(
                "{} is out of range: must be between 1kB and 1GB",
                format_size(u64::try_from(server.max_message_size).unwrap_or(u64::MAX))
            ),
        );
    }
    peers(server, listen, out);
    let rate = &server.login_rate;
    if rate.attempts_per_second > 0 && rate.burst < 1 {
        push(
            out,
            "server.login_rate.burst".to_owned(),
            "must be at least 1 while attempts_per_second is set",
        );
    }
    if rate.ban_after > 0 && rate.ban_duration.is_zero() {
        push(
            out,
            "server.login_rate.ban_duration".to_owned(),
            "must be greater than 0 (set ban_after = 0 for no bans)",
        );
    }
    if let Some(super::hba::HbaSource::File(file)) = &server.hba
        && file.as_os_str().is_empty()
    {
        push(out, "server.hba_file".to_owned(), "must not be empty");
    }
    if let Some(tls) = &server.tls {
        for (key, file) in [
            ("cert", Some(&tls.cert)),
            ("key", Some(&tls.key)),
            ("ca", tls.ca.as_ref()),
        ] {
            if file.is_some_and(|file| file.as_os_str().is_empty()) {
                push(out, format!("server.tls.{key}"), "must not be empty");
            }
        }
    }
    let known: BTreeSet<&str> = users.iter().map(|u| u.name.as_str()).collect();
    for (key, names) in [
        ("admin_users", &server.admin_users),
        ("stats_users", &server.stats_users),
    ] {
        for (index, name) in names.iter().enumerate() {
            if !known.contains(name.as_str()) {
                push(
                    out,
                    index_path(&format!("server.{key}"), index),
                    format!("user {name:?} is not defined in [[users]]"),
                );
            }
        }
    }
}

/// Checks pool settings at `prefix`. For a database, `overrides` says which keys it set, and
/// only rules involving one of those are checked there (the rest are `[pool]`'s problems).
fn pool(prefix: &str, pool: &PoolConfig, overrides: Option<&PoolOverrides>, out: &mut Vec<Problem>) {
    let own_size = overrides.is_none_or(|o| o.size.is_some());
    let own_min = overrides.is_none_or(|o| o.min_size.is_some());
    let own_prepared = overrides.is_none_or(|o| o.max_prepared_statements.is_some());
    if own_size && pool.size < 1 {
        push(out, key_path(prefix, "size"), "must be at least 1");
    }
    if (own_size || own_min) && pool.min_size > pool.size {
        if own_min {
            push(
                out,
                key_path(prefix, "min_size"),
                format!("{} is larger than size ({})", pool.min_size, pool.size),
            );
        } else {
            push(
                out,
                key_path(prefix, "size"),
                format!("{} is smaller than min_size ({})", pool.size, pool.min_size),
            );
        }
    }
    if own_prepared && pool.max_prepared_statements < 1 {
        push(out, key_path(prefix, "max_prepared_statements"), "must be at least 1");
    }
    // A user's server connections span databases: one database cannot set their limit.
    if overrides.is_some_and(|o| o.max_user_connections.is_some()) {
        push(
            out,
            key_path(prefix, "max_user_connections"),
            "a user's limit covers every database: set it in [pool] or in the user's [[users]] entry",
        );
    }
}

fn users(users: &[UserConfig], out: &mut Vec<Problem>) {
    let mut first_seen: BTreeMap<&str, usize> = BTreeMap::new();
    for (index, user) in users.iter().enumerate() {
        let path = index_path("users", index);
        if user.name.is_empty() {
            push(out, key_path(&path, "name"), "must not be empty");
        } else if let Some(first) = first_seen.get(user.name.as_str()) {
            push(
                out,
                key_path(&path, "name"),
                format!("duplicate user {:?} (also users[{first}])", user.name),
            );
        } else {
            first_seen.insert(&user.name, index);
        }
        password(&path, user, out);
    }
}

fn password(path: &str, user: &UserConfig, out: &mut Vec<Problem>) {
    match user.password.as_deref() {
        None if user.auth != AuthMethod::Trust => {
            push(out, key_path(path, "password"), "required unless auth = \"trust\"")
        }
        None => {}
        Some("") => push(out, key_path(path, "password"), "must not be empty"),
        Some(password) => match check_password(password) {
            Err(err) => push(out, key_path(path, "password"), err.to_string()),
            Ok(PasswordForm::Md5) if user.auth == AuthMethod::ScramSha256 => push(
                out,
                key_path(path, "auth"),
                "\"scram-sha-256\" cannot be used with an md5 password hash; \
                 give the plaintext password or a SCRAM verifier",
            ),
            Ok(PasswordForm::Scram) if user.auth == AuthMethod::Md5 => push(
                out,
                key_path(path, "auth"),
                "\"md5\" cannot be used with a SCRAM verifier; \
                 give the plaintext password or an md5 hash",
            ),
            Ok(_) => {}
        },
    }
    match user.server_password.as_deref() {
        None => {}
        Some("") => push(out, key_path(path, "server_password"), "must not be empty"),
        Some(password) => match check_password(password) {
            Err(err) => push(out, key_path(path, "server_password"), err.to_string()),
            Ok(PasswordForm::Scram) => push(
                out,
                key_path(path, "server_password"),
                "a SCRAM verifier cannot be used to log in to PostgreSQL; give the plaintext password",
            ),
            Ok(_) => {}
        },
    }
}

fn database(name: &str, db: &DatabaseConfig, defaults: &PoolConfig, out: &mut Vec<Problem>) {
    let path = key_path("databases", name);
    if name.is_empty() {
        push(out, path.clone(), "the database name must not be empty");
    } else if name == ADMIN_DATABASE {
        push(
            out,
            path.clone(),
            format!("the name {ADMIN_DATABASE:?} is reserved for the admin console"),
        );
    }
    match db.dbname.as_deref() {
        Some(_) if name == FALLBACK_DATABASE => push(
            out,
            key_path(&path, "dbname"),
            "cannot be set on the \"*\" entry, which forwards the client's dbname unchanged",
        ),
        Some("") => push(out, key_path(&path, "dbname"), "must not be empty"),
        _ => {}
    }
    if let Err(message) = split_host_port(&db.primary) {
        push(out, key_path(&path, "primary"), message);
    }
    let replicas_path = key_path(&path, "replicas");
    let mut seen = BTreeSet::new();
    for (index, replica) in db.replicas.iter().enumerate() {
        let replica_path = index_path(&replicas_path, index);
        if let Err(message) = split_host_port(replica) {
            push(out, replica_path, message);
        } else if *replica == db.primary {
            push(out, replica_path, format!("{replica:?} is also the primary"));
        } else if !seen.insert(replica.as_str()) {
            push(out, replica_path, format!("{replica:?} is listed twice"));
        }
    }
    let tls_path = key_path(&path, "server_tls");
    match &db.server_tls.ca {
        None if db.server_tls.mode == ServerTlsMode::VerifyFull => {
            push(out, key_path(&tls_path, "ca"), "required when mode = \"verify-full\"")
        }
        Some(ca) if ca.as_os_str().is_empty() => {
            push(out, key_path(&tls_path, "ca"), "must not be empty");
        }
        _ => {}
    }
    routing(&key_path(&path, "routing"), &db.routing, db.replicas.is_empty(), out);
    pool(&path, &db.pool(defaults), Some(&db.pool_overrides), out);
}

fn routing(path: &str, routing: &RoutingConfig, no_replicas: bool, out: &mut Vec<Problem>) {
    if routing.target == RoutingTarget::Replica {
        if no_replicas {
            push(
                out,
                key_path(path, "target"),
                "\"replica\" needs at least one entry in replicas",
            );
        }
        if !routing.read_write_split {
            push(
                out,
                key_path(path, "read_write_split"),
                "false (everything to the primary) contradicts target = \"replica\"",
            );
        }
    }
    if routing.health_check_interval.is_zero() {
        push(out, key_path(path, "health_check_interval"), "must be greater than 0");
    }
    let writes: BTreeSet<String> = routing.write_functions.iter().map(|f| f.to_lowercase()).collect();
    for (key, functions) in [
        ("write_functions", &routing.write_functions),
        ("read_only_functions", &routing.read_only_functions),
    ] {
        for (index, function) in functions.iter().enumerate() {
            let function_path = index_path(&key_path(path, key), index);
            if function.trim().is_empty() {
                push(out, function_path, "must not be empty");
            } else if key == "read_only_functions" && writes.contains(&function.to_lowercase()) {
                push(
                    out,
                    function_path,
                    format!("{function:?} is also listed in write_functions"),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::parse;
    use super::super::secret::SecretError;
    use super::super::secret::tests::{MD5_APP, VERIFIER};
    use super::*;

    /// A valid base to which each test appends the mistake it is about.
    const BASE: &str = r#"
[[users]]
name = "app"
password = "app"

[databases.app]
primary = "127.0.0.1:5432"
replicas = ["127.0.0.1:5433"]
"#;

    /// The problems of `BASE` + `extra`, as `path: message` lines.
    fn problems(extra: &str) -> Vec<String> {
        match parse(&format!("{BASE}{extra}")) {
            Ok(_) => Vec::new(),
            Err(errors) => errors.problems.iter().map(ToString::to_string).collect(),
        }
    }

    fn assert_problem(extra: &str, expected: &str) {
        let found = problems(extra);
        assert!(
            found.iter().any(|p| p == expected),
            "expected {expected:?} in {found:#?}"
        );
    }

    #[test]
    fn base_is_valid() {
        assert_eq!(problems(""), Vec::<String>::new());
    }

    #[test]
    fn host_port() {
        assert_eq!(split_host_port("pg-primary:5432"), Ok(("pg-primary", 5432)));
        assert_eq!(split_host_port("10.0.0.1:5433"), Ok(("10.0.0.1", 5433)));
        assert_eq!(split_host_port("[::1]:5432"), Ok(("::1", 5432)));
        assert_eq!(split_host_port("db.example.com:1"), Ok(("db.example.com", 1)));
        for bad in [
            "pg-primary",
            "pg:0",
            "pg:65536",
            "pg:x",
            ":5432",
            "pg prim:5432",
            "a..b:5432",
            "::1:5432",
            "[::1]5432",
            "[zz]:5432",
        ] {
            assert!(split_host_port(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn pool_rules() {
        assert_problem("[pool]\nsize = 0\n", "pool.size: must be at least 1");
        assert_problem("[pool]\nmin_size = 30\n", "pool.min_size: 30 is larger than size (20)");
        assert_problem(
            "[pool]\nmax_prepared_statements = 0\n",
            "pool.max_prepared_statements: must be at least 1",
        );
        assert_eq!(problems("[pool]\nreserve_size = 0\n"), Vec::<String>::new());
    }

    #[test]
    fn per_database_pool_rules() {
        assert_problem("min_size = 30\n", "databases.app.min_size: 30 is larger than size (20)");
        assert_problem("size = 0\n", "databases.app.size: must be at least 1");
        assert_problem(
            "max_prepared_statements = 0\n",
            "databases.app.max_prepared_statements: must be at least 1",
        );
        // The database lowers size below the global min_size: reported where it was set.
        let found = problems("size = 2\n[pool]\nmin_size = 5\nsize = 10\n");
        assert_eq!(found, ["databases.app.size: 2 is smaller than min_size (5)"]);
        // A global mistake is reported once, under [pool], not again for every database.
        let found = problems("[pool]\nmin_size = 30\n");
        assert_eq!(found, ["pool.min_size: 30 is larger than size (20)"]);
    }

    #[test]
    fn server_rules() {
        assert_problem(
            "[server]\nlisten = \"localhost:6432\"\n",
            "server.listen: \"localhost:6432\" is not an IP:port address, e.g. \"127.0.0.1:6432\"",
        );
        assert_problem(
            "[server]\nmetrics_listen = \"9930\"\n",
            "server.metrics_listen: \"9930\" is not an IP:port address, e.g. \"127.0.0.1:9930\"",
        );
        assert_problem(
            "[server]\nmetrics_listen = \"127.0.0.1:6432\"\n",
            "server.metrics_listen: is the same address as server.listen",
        );
        assert_eq!(problems("[server]\nmetrics_listen = \"\"\n"), Vec::<String>::new());
        assert_problem(
            "[server]\nmax_client_conn = 0\n",
            "server.max_client_conn: must be at least 1",
        );
        assert_problem(
            "[server]\nworkers = 5000\n",
            "server.workers: must be at most 1024 (0: one per core)",
        );
        assert_eq!(problems("[server]\nworkers = 2\n"), Vec::<String>::new());
        assert_problem(
            "[server]\nmax_message_size = \"512B\"\n",
            "server.max_message_size: 512B is out of range: must be between 1kB and 1GB",
        );
        assert_problem(
            "[server]\nmax_message_size = \"2GB\"\n",
            "server.max_message_size: 2GB is out of range: must be between 1kB and 1GB",
        );
        assert_eq!(problems("[server]\nmax_message_size = \"1kB\"\n"), Vec::<String>::new());
        assert_eq!(problems("[server]\nmax_message_size = \"1GB\"\n"), Vec::<String>::new());
    }

    #[test]
    fn client_tls_rules() {
        let found = problems("[server.tls]\nmode = \"require\"\n");
        assert_eq!(
            found,
            [
                "server.tls.cert: required key is missing",
                "server.tls.key: required key is missing",
            ]
        );
        assert_problem(
            "[server.tls]\ncert = \"\"\nkey = \"k.pem\"\n",
            "server.tls.cert: must not be empty",
        );
    }

    #[test]
    fn admin_and_stats_users_must_exist() {
        let found = problems("[server]\nadmin_users = [\"app\", \"root\"]\nstats_users = [\"mon\"]\n");
        assert_eq!(
            found,
            [
                "server.admin_users[1]: user \"root\" is not defined in [[users]]",
                "server.stats_users[0]: user \"mon\" is not defined in [[users]]",
            ]
        );
    }

    #[test]
    fn user_rules() {
        assert_problem(
            "[[users]]\nname = \"\"\npassword = \"x\"\n",
            "users[1].name: must not be empty",
        );
        assert_problem(
            "[[users]]\npassword = \"x\"\n",
            "users[1].name: required key is missing",
        );
        assert_problem(
            "[[users]]\nname = \"app\"\npassword = \"x\"\n",
            "users[1].name: duplicate user \"app\" (also users[0])",
        );
        assert_problem(
            "[[users]]\nname = \"b\"\n",
            "users[1].password: required unless auth = \"trust\"",
        );
        assert_eq!(
            problems("[[users]]\nname = \"b\"\nauth = \"trust\"\n"),
            Vec::<String>::new()
        );
        assert_problem(
            "[[users]]\nname = \"b\"\npassword = \"\"\n",
            "users[1].password: must not be empty",
        );
        assert_problem(
            "[[users]]\nname = \"b\"\npassword = \"SCRAM-SHA-256$4096:abc\"\n",
            "users[1].password: malformed SCRAM-SHA-256 verifier: missing '$' before the keys; expected SCRAM-SHA-256$<iterations>:<base64 salt>$<base64 StoredKey>:<base64 ServerKey>",
        );
        assert_problem(
            "[[users]]\nname = \"b\"\npassword = \"md5FE63FEA7BE31B0200B496D08BC6B517D\"\n",
            &format!("users[1].password: {}", SecretError::Md5),
        );
        assert_problem(
            &format!("[[users]]\nname = \"b\"\npassword = \"{MD5_APP}\"\nauth = \"scram-sha-256\"\n"),
            "users[1].auth: \"scram-sha-256\" cannot be used with an md5 password hash; \
             give the plaintext password or a SCRAM verifier",
        );
        assert_problem(
            &format!("[[users]]\nname = \"b\"\npassword = \"{VERIFIER}\"\nauth = \"md5\"\n"),
            "users[1].auth: \"md5\" cannot be used with a SCRAM verifier; \
             give the plaintext password or an md5 hash",
        );
        assert_problem(
            &format!("[[users]]\nname = \"b\"\npassword = \"x\"\nserver_password = \"{VERIFIER}\"\n"),
            "users[1].server_password: a SCRAM verifier cannot be used to log in to PostgreSQL; \
             give the plaintext password",
        );
        assert_problem(
            "[[users]]\nname = \"b\"\npassword = \"x\"\nserver_password = \"\"\n",
            "users[1].server_password: must not be empty",
        );
    }

    #[test]
    fn database_names() {
        assert_problem(
            "[databases.pgrelay]\nprimary = \"127.0.0.1:5432\"\n",
            "databases.pgrelay: the name \"pgrelay\" is reserved for the admin console",
        );
        assert_problem(
            "[databases.\"\"]\nprimary = \"127.0.0.1:5432\"\n",
            "databases.\"\": the database name must not be empty",
        );
        assert_problem(
            "[databases.\"*\"]\nprimary = \"127.0.0.1:5432\"\ndbname = \"x\"\n",
            "databases.\"*\".dbname: cannot be set on the \"*\" entry, which forwards the client's dbname unchanged",
        );
        assert_problem(
            "[databases.x]\nprimary = \"127.0.0.1:5432\"\ndbname = \"\"\n",
            "databases.x.dbname: must not be empty",
        );
    }

    #[test]
    fn addresses() {
        assert_problem(
            "[databases.x]\nreplicas = [\"pg-replica:5433\"]\n",
            "databases.x.primary: required key is missing",
        );
        assert_problem(
            "[databases.x]\nprimary = \"pg-primary\"\n",
            "databases.x.primary: \"pg-primary\" is not host:port (the port is missing)",
        );
        assert_problem(
            "[databases.x]\nprimary = \"pg-primary:99999\"\n",
            "databases.x.primary: \"pg-primary:99999\" has an invalid port (expected 1-65535)",
        );
        let found = problems(
            "[databases.x]\nprimary = \"pg-primary:5432\"\n\
             replicas = [\"pg-r1:5433\", \"pg r2:5433\", \"pg-r1:5433\", \"pg-primary:5432\"]\n",
        );
        assert_eq!(
            found,
            [
                "databases.x.replicas[1]: \"pg r2:5433\" has an invalid host name",
                "databases.x.replicas[2]: \"pg-r1:5433\" is listed twice",
                "databases.x.replicas[3]: \"pg-primary:5432\" is also the primary",
            ]
        );
    }

    #[test]
    fn server_tls_rules() {
        assert_problem(
            "server_tls = { mode = \"verify-full\" }\n",
            "databases.app.server_tls.ca: required when mode = \"verify-full\"",
        );
        assert_eq!(
            problems("server_tls = { mode = \"verify-full\", ca = \"root.crt\" }\n"),
            Vec::<String>::new()
        );
    }

    #[test]
    fn routing_rules() {
        assert_problem(
            "[databases.ro]\nprimary = \"127.0.0.1:5432\"\nrouting = { target = \"replica\" }\n",
            "databases.ro.routing.target: \"replica\" needs at least one entry in replicas",
        );
        assert_problem(
            "[databases.app.routing]\ntarget = \"replica\"\nread_write_split = false\n",
            "databases.app.routing.read_write_split: false (everything to the primary) contradicts target = \"replica\"",
        );
        assert_problem(
            "[databases.app.routing]\nhealth_check_interval = \"0\"\n",
            "databases.app.routing.health_check_interval: must be greater than 0",
        );
        let found = problems(
            "[databases.app.routing]\nwrite_functions = [\"Bump\", \"\"]\nread_only_functions = [\"bump\", \"ok\"]\n",
        );
        assert_eq!(
            found,
            [
                "databases.app.routing.read_only_functions[0]: \"bump\" is also listed in write_functions",
                "databases.app.routing.write_functions[1]: must not be empty",
            ]
        );
    }

    #[test]
    fn access_keys() {
        let config = parse(&format!(
            "{BASE}[server]\nmax_client_conn_per_user = 3\nhba = [\"host all all 10.0.0.0/8 md5\"]\n\
             [server.login_rate]\nburst = 5\nban_duration = \"1m\"\n[pool]\nmax_user_connections = 4\n"
        ))
        .unwrap();
        assert_eq!(config.server.max_client_conn_per_user, 3);
        assert_eq!(config.server.login_rate.burst, 5);
        assert_eq!(config.server.login_rate.attempts_per_second, 20, "default kept");
        assert_eq!(
            config.server.login_rate.ban_duration,
            std::time::Duration::from_secs(60)
        );
        assert_eq!(config.pool.max_user_connections, 4);
        match &config.server.hba {
            Some(super::super::hba::HbaSource::Inline(rules)) => assert_eq!(rules.len(), 1),
            other => panic!("{other:?}"),
        }
        assert_problem(
            "[server]\nhba = [\"host all all 10.0.0.0/8 md5\", \"host all all 10.0.0.1 md5\"]\n",
            "server.hba[1]: specify an address range in CIDR notation, or provide a separate netmask",
        );
        assert_problem(
            "[server]\nhba = []\nhba_file = \"x\"\n",
            "server.hba: set either hba_file or hba, not both",
        );
        assert_problem(
            "[server.login_rate]\nburst = 0\n",
            "server.login_rate.burst: must be at least 1 while attempts_per_second is set",
        );
        assert_problem(
            "[server.login_rate]\nban_duration = \"0\"\n",
            "server.login_rate.ban_duration: must be greater than 0 (set ban_after = 0 for no bans)",
        );
        assert_problem(
            "[server.login_rate]\nbaan_after = 3\n",
            "server.login_rate.baan_after: unknown key (did you mean \"ban_after\"?)",
        );
        assert_problem(
            "max_user_connections = 3\n",
            "databases.app.max_user_connections: a user's limit covers every database: set it in [pool] or in the user's [[users]] entry",
        );
        assert_eq!(problems("max_db_connections = 3\n"), Vec::<String>::new());
    }

    #[test]
    fn a_user_may_set_its_own_max_user_connections() {
        let config = parse(&format!(
            "{BASE}[pool]\nmax_user_connections = 8\n\
             [[users]]\nname = \"low\"\npassword = \"x\"\nmax_user_connections = 2\n\
             [[users]]\nname = \"free\"\npassword = \"x\"\nmax_user_connections = 0\n"
        ))
        .unwrap();
        assert_eq!(config.user("low").unwrap().max_user_connections, Some(2));
        assert_eq!(config.user("app").unwrap().max_user_connections, None);
        assert_eq!(config.max_user_connections("low"), 2);
        assert_eq!(config.max_user_connections("free"), 0, "0: no limit for this user");
        assert_eq!(config.max_user_connections("app"), 8, "[pool]'s");
        assert_eq!(
            config.max_user_connections("from_auth_query"),
            8,
            "not in [[users]]: [pool]'s"
        );
        assert_problem(
            "[[users]]\nname = \"b\"\npassword = \"x\"\nmax_user_connections = -1\n",
            "users[1].max_user_connections: invalid value: integer `-1`, expected usize",
        );
        assert_problem(
            "[[users]]\nname = \"b\"\npassword = \"x\"\nmax_user_connection = 1\n",
            "users[1].max_user_connection: unknown key (did you mean \"max_user_connections\"?)",
        );
    }

    #[test]
    fn instance_and_peer_keys() {
        use super::super::{InstanceIdSetting, Peers};
        let config = parse(&format!(
            "{BASE}[server]\ninstance_id = 7\npeers = [\"pgrelay-b:6432\", \"10.0.0.9:6432\"]\n\
             peer_listen = \"127.0.0.1:6441\"\n"
        ))
        .unwrap();
        assert_eq!(config.server.instance_id, InstanceIdSetting::Fixed(7));
        assert_eq!(
            config.server.peers,
            Peers::List(vec!["pgrelay-b:6432".to_owned(), "10.0.0.9:6432".to_owned()])
        );
        assert_eq!(config.server.peer_listen.as_deref(), Some("127.0.0.1:6441"));
        let config = parse(&format!(
            "{BASE}[server]\ninstance_id = \"hostname\"\npeers_dns = \"pgrelay-headless:6432\"\npeers = []\n"
        ))
        .unwrap();
        assert_eq!(config.server.instance_id, InstanceIdSetting::Hostname);
        assert_eq!(config.server.peers, Peers::Dns("pgrelay-headless:6432".to_owned()));
        let defaults = parse(BASE).unwrap();
        assert_eq!(defaults.server.instance_id, InstanceIdSetting::Fixed(0));
        assert_eq!(defaults.server.peers, Peers::None);

        assert_problem(
            "[server]\ninstance_id = 256\n",
            "server.instance_id: 256 is out of range: must be from 0 to 255, or \"hostname\"",
        );
        assert_problem(
            "[server]\ninstance_id = -1\n",
            "server.instance_id: -1 is out of range: must be from 0 to 255, or \"hostname\"",
        );
        assert_problem(
            "[server]\ninstance_id = \"pod\"\n",
            "server.instance_id: \"pod\" is not an instance id: write a number from 0 to 255, or \"hostname\"",
        );
        assert_problem(
            "[server]\npeers = [\"a:1\"]\npeers_dns = \"b:2\"\n",
            "server.peers: set either peers or peers_dns, not both",
        );
        assert_problem(
            "[server]\npeers = [\"a:1\", \"b\"]\n",
            "server.peers[1]: \"b\" is not host:port (the port is missing)",
        );
        assert_problem(
            "[server]\npeers_dns = \"pgrelay-headless\"\n",
            "server.peers_dns: \"pgrelay-headless\" is not host:port (the port is missing)",
        );
        assert_problem(
            "[server]\npeer_listen = \"localhost:6441\"\n",
            "server.peer_listen: \"localhost:6441\" is not an IP:port address, e.g. \"10.0.0.5:6433\"",
        );
        assert_problem(
            "[server]\nlisten = \"127.0.0.1:6432\"\npeer_listen = \"127.0.0.1:6432\"\n",
            "server.peer_listen: must be an address of its own, not that of listen or metrics_listen",
        );
    }

    #[test]
    fn takeover_socket_must_be_a_usable_unix_socket_path() {
        assert_problem(
            "[server]\ntakeover_socket = \"\"\n",
            "server.takeover_socket: must be a file path",
        );
        assert_problem(
            &format!("[server]\ntakeover_socket = \"/{}\"\n", "x".repeat(107)),
            "server.takeover_socket: is longer than the 107 bytes a Unix socket path may have",
        );
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let found = problems("[server]\nmax_client_conn = 0\n[pool]\nsize = 0\n[databases.pgrelay]\nprimary = \"x\"\n");
        assert_eq!(
            found,
            [
                "server.max_client_conn: must be at least 1",
                "pool.size: must be at least 1",
                "databases.pgrelay: the name \"pgrelay\" is reserved for the admin console",
                "databases.pgrelay.primary: \"x\" is not host:port (the port is missing)",
            ]
        );
    }
}
