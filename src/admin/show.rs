//! The admin console's SHOW commands: result sets read from the running snapshot, the
//! registry of connections and the metrics, never from the hot path's locks.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::BytesMut;

use crate::config::format_limit;
use crate::protocol::compose;
use crate::runtime::Shared;

/// Writes the result set of `SHOW <what>`; `None` for an unknown subject.
pub(super) fn show(shared: &Shared, what: &str, out: &mut BytesMut) -> Option<()> {
    let (columns, rows): (&[&str], Vec<Vec<String>>) = match what.to_ascii_uppercase().as_str() {
        "POOLS" => (POOL_COLUMNS, pools(shared)),
        "STATS" => (STATS_COLUMNS, stats(shared)),
        "CLIENTS" => (CLIENT_COLUMNS, clients(shared)),
        "SERVERS" => (SERVER_COLUMNS, servers(shared)),
        "DATABASES" => (DATABASE_COLUMNS, databases(shared)),
        "USERS" => (USER_COLUMNS, users(shared)),
        "LISTS" => (&["list", "items"], lists(shared)),
        "CONFIG" => (&["key", "value"], config(shared)),
        "VERSION" => (
            &["version"],
            vec![vec![format!("pgrelay {}", env!("CARGO_PKG_VERSION"))]],
        ),
        "HELP" => (&["command", "description"], help()),
        _ => return None,
    };
    compose::row_description(out, columns);
    for row in &rows {
        compose::data_row(out, row.iter().map(|value| Some(value.as_str())));
    }
    compose::command_complete(out, "SHOW");
    Some(())
}

const POOL_COLUMNS: &[&str] = &[
    "database",
    "user",
    "cl_active",
    "cl_waiting",
    "sv_active",
    "sv_idle",
    "sv_used",
    "sv_login",
    "maxwait",
    "maxwait_us",
    "pool_mode",
    "role",
    "host",
];

fn pools(shared: &Shared) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    for database in shared.snapshot().all_databases() {
        let mut users = database.all_pools();
        users.sort_by(|a, b| a.0.cmp(&b.0));
        for (user, pools) in users {
            for (index, pool) in pools.hosts.iter().enumerate() {
                let role = if database.is_primary(index) {
                    "primary"
                } else {
                    "replica"
                };
                let status = pool.status();
                let wait = pool.counters().max_wait();
                rows.push(vec![
                    database.name.clone(),
                    user.clone(),
                    status.active.to_string(),
                    status.waiting.to_string(),
                    status.active.to_string(),
                    status.idle.to_string(),
                    "0".to_owned(),
                    status.logins.to_string(),
                    wait.as_secs().to_string(),
                    wait.subsec_micros().to_string(),
                    database.mode().to_string(),
                    role.to_owned(),
                    pool.addr().to_owned(),
                ]);
            }
        }
    }
    rows
}

const STATS_COLUMNS: &[&str] = &[
    "database",
    "total_xact_count",
    "total_query_count",
    "total_query_time",
    "total_wait_time",
    "avg_query_time",
    "avg_wait_time",
];

/// Totals per database from the Prometheus counters and histograms (times in µs, as in
/// PgBouncer).
fn stats(shared: &Shared) -> Vec<Vec<String>> {
    #[derive(Default)]
    struct Totals {
        transactions: f64,
        queries: f64,
        query_time: f64,
        wait_time: f64,
        waits: f64,
    }
    let mut totals: BTreeMap<String, Totals> = BTreeMap::new();
    for database in shared.snapshot().all_databases() {
        totals.entry(database.name.clone()).or_default();
    }
    for family in shared.metrics.gather() {
        for metric in family.get_metric() {
            let Some(database) = metric
                .get_label()
                .iter()
                .find(|label| label.name() == "database")
                .map(|label| label.value().to_owned())
            else {
                continue;
            };
            let entry = totals.entry(database).or_default();
            match family.name() {
                "pgrelay_transactions_total" => entry.transactions += metric.get_counter().get_value(),
                "pgrelay_queries_total" => entry.queries += metric.get_counter().get_value(),
                "pgrelay_query_duration_seconds" => entry.query_time += metric.get_histogram().get_sample_sum(),
                "pgrelay_pool_wait_seconds" => {
                    entry.wait_time += metric.get_histogram().get_sample_sum();
                    entry.waits += metric.get_histogram().get_sample_count() as f64;
                }
                _ => {}
            }
        }
    }
    let micros = |seconds: f64| format!("{:.0}", seconds * 1e6);
    totals
        .into_iter()
        .filter(|(database, _)| !database.is_empty())
        .map(|(database, t)| {
            vec![
                database,
                format!("{:.0}", t.transactions),
                format!("{:.0}", t.queries),
                micros(t.query_time),
                micros(t.wait_time),
                micros(if t.queries > 0.0 { t.query_time / t.queries } else { 0.0 }),
                micros(if t.waits > 0.0 { t.wait_time / t.waits } else { 0.0 }),
            ]
        })
        .collect()
}

const CLIENT_COLUMNS: &[&str] = &[
    "type",
    "user",
    "database",
    "state",
    "addr",
    "port",
    "connect_time",
    "application_name",
    "id",
];

fn clients(shared: &Shared) -> Vec<Vec<String>> {
    shared
        .registry
        .clients()
        .into_iter()
        .map(|client| {
            vec![
                "C".to_owned(),
                client.user.clone(),
                client.database.clone(),
                client.state().as_str().to_owned(),
                client.addr.ip().to_string(),
                client.addr.port().to_string(),
                timestamp(client.connected_at),
                client.application_name.clone(),
                client.id.to_string(),
            ]
        })
        .collect()
}

const SERVER_COLUMNS: &[&str] = &[
    "type",
    "user",
    "database",
    "state",
    "addr",
    "port",
    "connect_time",
    "remote_pid",
    "id",
];

fn servers(shared: &Shared) -> Vec<Vec<String>> {
    shared
        .registry
        .servers()
        .into_iter()
        .map(|server| {
            let (host, port) = server.addr.rsplit_once(':').unwrap_or((&server.addr, ""));
            vec![
                "S".to_owned(),
                server.user.clone(),
                server.database.clone(),
                server.state().as_str().to_owned(),
                host.to_owned(),
                port.to_owned(),
                timestamp(server.connected_at),
                server.backend_pid.to_string(),
                server.id.to_string(),
            ]
        })
        .collect()
}

const DATABASE_COLUMNS: &[&str] = &[
    "name",
    "host",
    "database",
    "replicas",
    "pool_size",
    "min_pool_size",
    "reserve_pool",
    "pool_mode",
    "max_connections",
    "current_connections",
    "paused",
];

fn databases(shared: &Shared) -> Vec<Vec<String>> {
    shared
        .snapshot()
        .all_databases()
        .into_iter()
        .map(|database| {
            let connections: usize = database
                .all_pools()
                .iter()
                .flat_map(|(_, pools)| pools.hosts.iter().map(|pool| pool.status().size))
                .sum();
            let primary = database.primary_index();
            let replicas: Vec<String> = database
                .hosts
                .iter()
                .enumerate()
                .filter(|(index, _)| *index != primary)
                .map(|(_, host)| host.to_string())
                .collect();
            vec![
                database.name.clone(),
                database.hosts[primary].to_string(),
                database.server_dbname.clone(),
                replicas.join(","),
                database.pool.size.to_string(),
                database.pool.min_size.to_string(),
                database.pool.reserve_size.to_string(),
                database.mode().to_string(),
                database.pool.max_db_connections.to_string(),
                connections.to_string(),
                if database.is_paused() { "1" } else { "0" }.to_owned(),
            ]
        })
        .collect()
}

/// PgBouncer's SHOW USERS columns for the limits: server connections of each user over
/// every pool (max_user_connections) and its logged-in clients (max_client_conn_per_user).
const USER_COLUMNS: &[&str] = &[
    "name",
    "max_user_connections",
    "current_connections",
    "max_user_client_connections",
    "current_client_connections",
];

/// The users SHOW USERS lists: those of `[[users]]` and those with server connections that
/// are not in it (auth_query).
fn user_names(shared: &Shared) -> std::collections::BTreeSet<String> {
    let snapshot = shared.snapshot();
    let mut names: std::collections::BTreeSet<String> =
        snapshot.config.users.iter().map(|user| user.name.clone()).collect();
    names.extend(shared.budgets.users().iter().map(|budget| budget.name().to_owned()));
    names
}

fn users(shared: &Shared) -> Vec<Vec<String>> {
    let snapshot = shared.snapshot();
    let server = &snapshot.config.server;
    let names = user_names(shared);
    let open: BTreeMap<String, usize> = shared
        .budgets
        .users()
        .iter()
        .map(|budget| (budget.name().to_owned(), budget.open()))
        .collect();
    names
        .into_iter()
        .map(|name| {
            vec![
                name.clone(),
                // Its own limit if its [[users]] entry sets one, else [pool]'s.
                snapshot.config.max_user_connections(&name).to_string(),
                open.get(&name).copied().unwrap_or(0).to_string(),
                server.max_client_conn_per_user.to_string(),
                shared.access.counts.user(&name).to_string(),
            ]
        })
        .collect()
}

/// `[server] workers` as set, and what 0 meant on this machine. The runtime is built once,
/// so a reloaded value shows what the next start will use.
fn workers(configured: usize) -> String {
    if configured == 0 {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        format!("0 (one per core: {cores})")
    } else {
        configured.to_string()
    }
}

/// The other instances cancel requests are forwarded to, as configured: a `peers_dns`
/// name counts as one, whatever it resolves to at the next forward.
fn configured_peers(peers: &crate::config::Peers) -> usize {
    match peers {
        crate::config::Peers::None => 0,
        crate::config::Peers::List(list) => list.len(),
        crate::config::Peers::Dns(_) => 1,
    }
}

/// PgBouncer's SHOW LISTS: how many of each kind of object there are, one row each, in
/// PgBouncer's order. Rows for what pgrelay has no such object for (free lists of a slab
/// allocator, peer pools, its DNS cache) are 0, kept so tools that read them find them.
fn lists(shared: &Shared) -> Vec<Vec<String>> {
    let snapshot = shared.snapshot();
    let databases = snapshot.all_databases();
    let pools: usize = databases
        .iter()
        .flat_map(|database| database.all_pools())
        .map(|(_, pools)| pools.hosts.len())
        .sum();
    let (_, servers) = shared.registry.counts();
    [
        ("databases", databases.len()),
        ("users", user_names(shared).len()),
        ("peers", configured_peers(&snapshot.config.server.peers)),
        ("pools", pools),
        ("peer_pools", 0),
        ("free_clients", 0),
        (
            "used_clients",
            shared.clients.load(std::sync::atomic::Ordering::Relaxed),
        ),
        (
            "login_clients",
            shared.logging_in.load(std::sync::atomic::Ordering::Relaxed),
        ),
        ("free_servers", 0),
        ("used_servers", servers),
        ("dns_names", 0),
        ("dns_zones", 0),
        ("dns_queries", 0),
        ("dns_pending", 0),
    ]
    .into_iter()
    .map(|(list, items)| vec![list.to_owned(), items.to_string()])
    .collect()
}

/// The effective settings of `[server]` and `[pool]` (no secrets).
fn config(shared: &Shared) -> Vec<Vec<String>> {
    let snapshot = shared.snapshot();
    let config = &snapshot.config;
    let server = &config.server;
    let pool = &config.pool;
    let row = |key: &str, value: String| vec![key.to_owned(), value];
    vec![
        row("server.listen", server.listen.clone()),
        row("server.workers", workers(server.workers)),
        row("server.max_client_conn", server.max_client_conn.to_string()),
        row("server.admin_users", server.admin_users.join(",")),
        row("server.stats_users", server.stats_users.join(",")),
        row(
            "server.metrics_listen",
            server.metrics_listen.clone().unwrap_or_default(),
        ),
        row("server.shutdown_timeout", format_limit(server.shutdown_timeout)),
        row("server.client_login_timeout", format_limit(server.client_login_timeout)),
        row("server.client_idle_timeout", format_limit(server.client_idle_timeout)),
        row(
            "server.max_message_size",
            crate::config::format_size(server.max_message_size as u64),
        ),
        row("server.tls", if server.tls.is_some() { "on" } else { "off" }.to_owned()),
        row(
            "server.tls.ca",
            server
                .tls
                .as_ref()
                .and_then(|tls| tls.ca.as_ref())
                .map(|ca| ca.display().to_string())
                .unwrap_or_default(),
        ),
        row(
            "server.max_client_conn_per_user",
            server.max_client_conn_per_user.to_string(),
        ),
        row(
            "server.max_client_conn_per_address",
            server.max_client_conn_per_address.to_string(),
        ),
        row(
            "server.hba",
            snapshot.access.hba.as_ref().map_or_else(
                || "off".to_owned(),
                |hba| format!("{} ({} rules)", hba.source, hba.rules.len()),
            ),
        ),
        row(
            "server.login_rate.attempts_per_second",
            server.login_rate.attempts_per_second.to_string(),
        ),
        row("server.login_rate.burst", server.login_rate.burst.to_string()),
        row(
            "server.login_rate.failed_delay",
            format_limit(server.login_rate.failed_delay),
        ),
        row("server.login_rate.ban_after", server.login_rate.ban_after.to_string()),
        row(
            "server.login_rate.ban_duration",
            crate::config::format_duration(server.login_rate.ban_duration),
        ),
        // The id in force: a changed file takes effect only at a restart.
        row("server.instance_id", shared.cancel.instance_id().to_string()),
        row(
            "server.peers",
            match &server.peers {
                crate::config::Peers::List(list) => list.join(","),
                _ => String::new(),
            },
        ),
        row(
            "server.peers_dns",
            match &server.peers {
                crate::config::Peers::Dns(name) => name.clone(),
                _ => String::new(),
            },
        ),
        row("server.peer_listen", server.peer_listen.clone().unwrap_or_default()),
        row(
            "server.takeover_socket",
            server
                .takeover_socket
                .as_ref()
                .map(|path| path.display().to_string())
                .unwrap_or_default(),
        ),
        row("pool.mode", pool.mode.to_string()),
        row("pool.size", pool.size.to_string()),
        row("pool.min_size", pool.min_size.to_string()),
        row("pool.reserve_size", pool.reserve_size.to_string()),
        row("pool.reserve_timeout", format_limit(pool.reserve_timeout)),
        row("pool.query_wait_timeout", format_limit(pool.query_wait_timeout)),
        row("pool.server_connect_timeout", format_limit(pool.server_connect_timeout)),
        row("pool.server_idle_timeout", format_limit(pool.server_idle_timeout)),
        row("pool.server_lifetime", format_limit(pool.server_lifetime)),
        row(
            "pool.server_reset_query",
            pool.server_reset_query.clone().unwrap_or_default(),
        ),
        row("pool.max_prepared_statements", pool.max_prepared_statements.to_string()),
        row("pool.max_user_connections", pool.max_user_connections.to_string()),
        row("pool.max_db_connections", pool.max_db_connections.to_string()),
        row(
            "pool.max_client_prepared_statements",
            pool.max_client_prepared_statements.to_string(),
        ),
        row(
            "databases",
            config.databases.keys().cloned().collect::<Vec<_>>().join(","),
        ),
        row(
            "users",
            config
                .users
                .iter()
                .map(|user| user.name.clone())
                .collect::<Vec<_>>()
                .join(","),
        ),
    ]
}

fn help() -> Vec<Vec<String>> {
    [
        (
            "SHOW POOLS",
            "pools per database, user and host: clients and servers by state, longest wait",
        ),
        (
            "SHOW STATS",
            "totals per database: transactions, statements, time spent",
        ),
        ("SHOW CLIENTS", "every client connection"),
        ("SHOW SERVERS", "every server connection"),
        ("SHOW DATABASES", "configured databases and their pool settings"),
        (
            "SHOW USERS",
            "server and client connections of each user against its limits",
        ),
        (
            "SHOW LISTS",
            "how many databases, users, pools, clients and server connections there are",
        ),
        ("SHOW CONFIG", "effective settings"),
        ("SHOW VERSION", "pgrelay's version"),
        ("SHOW HELP", "this list"),
        ("RELOAD", "re-read the configuration file (admin)"),
        (
            "PAUSE [db]",
            "hold new transactions, wait for running ones to end (admin)",
        ),
        ("RESUME [db]", "end a PAUSE or KILL (admin)"),
        (
            "KILL db",
            "drop every client and server connection of a database (admin)",
        ),
        ("SHUTDOWN", "stop gracefully, as on SIGTERM (admin)"),
    ]
    .into_iter()
    .map(|(command, description)| vec![command.to_owned(), description.to_owned()])
    .collect()
}

/// Seconds since the epoch as an ISO-8601 UTC time, without a date library.
fn timestamp(time: SystemTime) -> String {
    let seconds = time.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default();
    let (days, rest) = (seconds / 86_400, seconds % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rest / 3600,
        (rest % 3600) / 60,
        rest % 60
    )
}

/// Howard Hinnant's days-to-civil algorithm.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc_dates() {
        assert_eq!(timestamp(UNIX_EPOCH), "1970-01-01 00:00:00");
        let later = UNIX_EPOCH + std::time::Duration::from_secs(1_795_000_000);
        assert_eq!(timestamp(later), "2026-11-18 11:06:40");
    }
}
