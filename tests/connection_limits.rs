//! Limits that span pools and clients, end to end against PostgreSQL:
//! `max_user_connections` holds under 200 pgbench clients (sampled in pg_stat_activity)
//! with no failed transaction, `max_db_connections` makes clients wait and then names itself
//! in the timeout error, and an idle connection of another user is closed for a waiting one;
//! a `[[users]]` entry's own `max_user_connections` holds for that user alone and follows a
//! reload; `max_client_conn_per_user` and `max_client_conn_per_address` refuse with 53300 and a
//! message naming the limit; SHOW USERS and the metrics show the counts.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is a failed test

mod common;

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use common::{
    Proxy, backends, config_for, connect_from, direct, first_value, login_refusals, message, shared_cluster, sqlstate,
    wait_until,
};
use tokio_postgres::SimpleQueryMessage;

fn gauge(proxy: &Proxy, name: &str, label: &str) -> Option<f64> {
    proxy
        .running()
        .shared()
        .metrics
        .gather()
        .iter()
        .filter(|family| family.name() == name)
        .flat_map(|family| family.get_metric())
        .find(|metric| metric.get_label().iter().any(|l| l.value() == label))
        .map(|metric| metric.get_gauge().get_value())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_user_connections_holds_under_200_pgbench_clients() {
    let cluster = shared_cluster();
    let proxy = Proxy::start(&config_for(
        cluster,
        "size = 20\nmax_user_connections = 5\nquery_wait_timeout = \"60s\"",
    ))
    .await;
    let observer = direct(&cluster.primary().addr(), "postgres").await;
    let done = Arc::new(AtomicBool::new(false));
    let most = Arc::new(AtomicI64::new(0));
    let samples = Arc::new(AtomicI64::new(0));
    let sampler = tokio::spawn({
        let (done, most, samples) = (done.clone(), most.clone(), samples.clone());
        async move {
            while !done.load(Ordering::Acquire) {
                let now = backends(&observer, "app_count").await;
                most.fetch_max(now, Ordering::AcqRel);
                samples.fetch_add(1, Ordering::AcqRel);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("select.sql");
    std::fs::write(&script, "SELECT 1;\n").unwrap();
    let program = cluster.bin_path("pgbench").unwrap();
    let port = proxy.port().to_string();
    // -T bounds the run; the timeout only guards against a hang.
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(program)
            .args(["-h", "127.0.0.1", "-p", &port, "-U", "app_count"])
            .args(["-n", "-c", "200", "-j", "2", "-T", "10", "-f"])
            .arg(&script)
            .arg("app")
            .env("PGPASSWORD", "app_count")
            .env("PGCONNECT_TIMEOUT", "30")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
    });
    let output = tokio::time::timeout(Duration::from_secs(120), output)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    done.store(true, Ordering::Release);
    sampler.await.unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}\n{stderr}");
    let most = most.load(Ordering::Acquire);
    println!(
        "pg_stat_activity samples: {}, most app_count connections seen: {most}",
        samples.load(Ordering::Acquire)
    );
    assert!(output.status.success(), "pgbench failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("number of failed transactions: 0"), "{stdout}");
    assert!(stdout.contains("number of clients: 200"), "{stdout}");
    assert!(samples.load(Ordering::Acquire) > 50, "the sampler ran");
    assert!(
        (1..=5).contains(&most),
        "at most 5 server connections of app_count, saw {most}"
    );
    assert_eq!(gauge(&proxy, "pgrelay_max_user_connections", "app_count"), Some(5.0));
    assert!(gauge(&proxy, "pgrelay_user_servers", "app_count").is_some_and(|open| open <= 5.0));
    proxy.shutdown().await;
}

/// Runs pgbench against the proxy as `user` (password = name) in `database`, `clients`
/// clients for `seconds`, with `script`; returns its output.
async fn pgbench(
    port: u16,
    user: &'static str,
    database: &'static str,
    clients: u32,
    seconds: u32,
    script: std::path::PathBuf,
) -> std::process::Output {
    let program = shared_cluster().bin_path("pgbench").unwrap();
    let run = tokio::task::spawn_blocking(move || {
        std::process::Command::new(program)
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", user, "-n"])
            .args(["-c", &clients.to_string(), "-j", "1", "-T", &seconds.to_string(), "-f"])
            .arg(&script)
            .arg(database)
            .env("PGPASSWORD", user)
            .env("PGCONNECT_TIMEOUT", "30")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
    });
    // -T bounds the run; the timeout only guards against a hang.
    tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .unwrap()
        .unwrap()
        .unwrap()
}

/// A pool setting per user: `app_t8` sets its own max_user_connections (2) below `[pool]`'s
/// (6), `app_t9` has `[pool]`'s. Under many clients of each, pg_stat_activity never shows
/// more than each user's own limit and no transaction fails; SHOW USERS and the metric show
/// each user's limit. A reload that changes the per-user keys applies them to the pools it
/// keeps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_own_max_user_connections_overrides_the_pool_value() {
    let cluster = shared_cluster();
    let dir = tempfile::tempdir().unwrap();
    let write_config = |t8: &str, t9: &str| {
        let text = config_for(
            cluster,
            "size = 20\nmax_user_connections = 6\nquery_wait_timeout = \"60s\"",
        )
        .replace("LISTEN", "127.0.0.1:0")
        .replace(
            "client_login_timeout = \"5s\"",
            "client_login_timeout = \"5s\"\nadmin_users = [\"app\"]",
        )
        .replace("name = \"app_t8\"\n", &format!("name = \"app_t8\"\n{t8}\n"))
        .replace("name = \"app_t9\"\n", &format!("name = \"app_t9\"\n{t9}\n"));
        let path = dir.path().join("pgrelay.toml");
        std::fs::write(&path, text).unwrap();
        path
    };
    let path = write_config("max_user_connections = 2", "");
    let config = pgrelay::config::load(&path).unwrap_or_else(|errors| panic!("{errors}"));
    let running = pgrelay::app::start_with_file(config, Some(path)).await.unwrap();
    let proxy = Proxy::from_running(running);

    let observer = direct(&cluster.primary().addr(), "postgres").await;
    let done = Arc::new(AtomicBool::new(false));
    let most_t8 = Arc::new(AtomicI64::new(0));
    let most_t9 = Arc::new(AtomicI64::new(0));
    let samples = Arc::new(AtomicI64::new(0));
    let sampler = tokio::spawn({
        let (done, most_t8, most_t9, samples) = (done.clone(), most_t8.clone(), most_t9.clone(), samples.clone());
        async move {
            while !done.load(Ordering::Acquire) {
                most_t8.fetch_max(backends(&observer, "app_t8").await, Ordering::AcqRel);
                most_t9.fetch_max(backends(&observer, "app_t9").await, Ordering::AcqRel);
                samples.fetch_add(1, Ordering::AcqRel);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    });
    let script = dir.path().join("transaction.sql");
    std::fs::write(&script, "BEGIN;\nSELECT 1;\nCOMMIT;\n").unwrap();
    // One database each: a user spanning databases can have an idle connection closed for
    // a new one, and PostgreSQL lists the closed one until its backend has exited, which
    // pg_stat_activity would show as one over the limit for a moment.
    let port = proxy.port();
    let (t8, t9) = tokio::join!(
        pgbench(port, "app_t8", "app", 60, 8, script.clone()),
        pgbench(port, "app_t9", "app", 60, 8, script.clone()),
    );
    done.store(true, Ordering::Release);
    sampler.await.unwrap();
    for (name, output) in [("app_t8", &t8), ("app_t9", &t9)] {
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        println!("{name}:\n{stdout}\n{stderr}");
        assert!(output.status.success(), "pgbench {name} failed:\n{stdout}\n{stderr}");
        assert!(stdout.contains("number of failed transactions: 0"), "{name}: {stdout}");
        let processed: u64 = stdout
            .lines()
            .find_map(|line| line.strip_prefix("number of transactions actually processed: "))
            .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|count| count.parse().ok())
            .unwrap_or(0);
        assert!(processed > 0, "{name} ran transactions: {stdout}");
    }
    let (most_t8, most_t9) = (most_t8.load(Ordering::Acquire), most_t9.load(Ordering::Acquire));
    println!(
        "pg_stat_activity samples: {}, most connections seen: app_t8 {most_t8}, app_t9 {most_t9}",
        samples.load(Ordering::Acquire)
    );
    assert!(samples.load(Ordering::Acquire) > 50, "the sampler ran");
    assert!(
        (1..=2).contains(&most_t8),
        "at most 2 server connections of app_t8, saw {most_t8}"
    );
    // More than app_t8's limit: the override is app_t8's alone.
    assert!(
        (3..=6).contains(&most_t9),
        "3 to 6 server connections of app_t9, saw {most_t9}"
    );

    let users = admin_show(&proxy, "SHOW USERS").await;
    let limit_of = |users: &[Vec<String>], name: &str| {
        let row = users.iter().find(|row| row[0] == name).unwrap();
        (row[1].clone(), row[2].parse::<usize>().unwrap())
    };
    let (t8_limit, t8_open) = limit_of(&users, "app_t8");
    let (t9_limit, t9_open) = limit_of(&users, "app_t9");
    assert_eq!((t8_limit.as_str(), t9_limit.as_str()), ("2", "6"), "{users:?}");
    assert!(t8_open <= 2 && t9_open <= 6, "{users:?}");
    assert_eq!(limit_of(&users, "app_t10").0, "6", "a user without pools: [pool]'s");
    assert_eq!(gauge(&proxy, "pgrelay_max_user_connections", "app_t8"), Some(2.0));
    assert_eq!(gauge(&proxy, "pgrelay_max_user_connections", "app_t9"), Some(6.0));

    // A reload raises app_t8's limit to 3 and lifts app_t9's: the pools it keeps take them.
    write_config("max_user_connections = 3", "max_user_connections = 0");
    let reloaded = pgrelay::reload::reload(proxy.running().shared()).expect("reload");
    assert_eq!(reloaded.needs_restart, Vec::<&str>::new());
    let users = admin_show(&proxy, "SHOW USERS").await;
    assert_eq!(limit_of(&users, "app_t8").0, "3", "{users:?}");
    assert_eq!(limit_of(&users, "app_t9").0, "0", "0: no limit, {users:?}");
    assert_eq!(gauge(&proxy, "pgrelay_max_user_connections", "app_t8"), Some(3.0));
    assert_eq!(
        gauge(&proxy, "pgrelay_max_user_connections", "app_t9"),
        None,
        "no limit"
    );
    let app = proxy.running().shared().snapshot().database("app").unwrap();
    let limit_in_pool = |user: &str| {
        let pools = app.all_pools().into_iter().find(|(name, _)| name == user).unwrap().1;
        pools.hosts[0].limits().max_user_connections
    };
    assert_eq!(limit_in_pool("app_t8"), Some(3), "the kept pool has the new limit");
    assert_eq!(limit_in_pool("app_t9"), None);
    // Three transactions of app_t8 at once get a server each; a fourth waits for one.
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(proxy.connect("app_t8", "app_t8", "app").await.unwrap());
    }
    for client in &clients[..3] {
        tokio::time::timeout(Duration::from_secs(20), client.batch_execute("BEGIN; SELECT 1"))
            .await
            .expect("a third server connection under the raised limit")
            .unwrap();
    }
    let fourth = clients.pop().unwrap();
    let waiting = tokio::spawn(async move {
        let answer = fourth
            .simple_query("SELECT 'served'")
            .await
            .map(|rows| first_value(&rows));
        (fourth, answer)
    });
    wait_until("the fourth app_t8 client waits", Duration::from_secs(10), || async {
        admin_show(&proxy, "SHOW POOLS")
            .await
            .iter()
            .any(|row| row[0] == "app" && row[1] == "app_t8" && row[3] == "1")
    })
    .await;
    let observer = direct(&cluster.primary().addr(), "postgres").await;
    assert!(backends(&observer, "app_t8").await <= 3);
    clients[0].batch_execute("COMMIT").await.unwrap();
    let (_fourth, answer) = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer.unwrap(), "served");
    for client in &clients[1..] {
        client.batch_execute("COMMIT").await.unwrap();
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_db_connections_queues_then_names_itself_and_takes_idle_connections_of_others() {
    let cluster = shared_cluster();
    let proxy = Proxy::start(
        &config_for(cluster, "size = 10\nquery_wait_timeout = \"1s\"")
            .replace("[databases.other]\n", "[databases.other]\nmax_db_connections = 2\n")
            .replace(
                "client_login_timeout = \"5s\"",
                "client_login_timeout = \"5s\"\nadmin_users = [\"app\"]",
            ),
    )
    .await;
    let observer = direct(&cluster.primary().addr(), "postgres").await;
    let t1 = proxy.connect("app_t1", "app_t1", "other").await.unwrap();
    let t2 = proxy.connect("app_t2", "app_t2", "other").await.unwrap();
    let t3 = proxy.connect("app_t3", "app_t3", "other").await.unwrap();
    t1.batch_execute("BEGIN; SELECT 1").await.unwrap();
    t2.batch_execute("BEGIN; SELECT 1").await.unwrap();
    // Both places are held by open transactions: the third user waits, then is told why.
    let error = t3.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&error), "53300");
    assert_eq!(
        message(&error),
        "no server connection for database \"other\" within query_wait_timeout: max_db_connections (2) reached"
    );
    // A waiting client is served as soon as a place is free.
    let waiting = tokio::spawn(async move {
        let answer = t3.simple_query("SELECT 'served'").await.map(|rows| first_value(&rows));
        (t3, answer)
    });
    wait_until("app_t3 waits for a server", Duration::from_secs(10), || async {
        admin_show(&proxy, "SHOW POOLS")
            .await
            .iter()
            .any(|row| row[0] == "other" && row[1] == "app_t3" && row[3] == "1")
    })
    .await;
    t1.batch_execute("COMMIT").await.unwrap();
    let (t3, answer) = waiting.await.unwrap();
    assert_eq!(answer.unwrap(), "served");
    t2.batch_execute("COMMIT").await.unwrap();
    // t1's connection is idle in its pool: another user needing one closes it rather than
    // waiting for it.
    let t4 = proxy.connect("app_t4", "app_t4", "other").await.unwrap();
    t3.batch_execute("BEGIN; SELECT 1").await.unwrap();
    assert_eq!(first_value(&t4.simple_query("SELECT 'taken'").await.unwrap()), "taken");
    t3.batch_execute("COMMIT").await.unwrap();
    // pgrelay's own count never passes the limit; the server's view follows once the backend
    // of the connection pgrelay closed for app_t4 has exited (that is not instant).
    let servers = gauge(&proxy, "pgrelay_database_servers", "other");
    assert!(
        servers.is_some_and(|servers| servers <= 2.0),
        "{servers:?} server connections counted"
    );
    wait_until(
        "at most 2 server connections to database other",
        Duration::from_secs(10),
        || async {
            let per_db: i64 = observer
                .query_one(
                    // The monitors' side connections (user app) are not pooled and not counted.
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = 'other' \
                 AND usename IN ('app_t1', 'app_t2', 'app_t3', 'app_t4')",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            per_db <= 2
        },
    )
    .await;
    assert_eq!(gauge(&proxy, "pgrelay_max_db_connections", "other"), Some(2.0));
    let admin_rows = admin_show(&proxy, "SHOW DATABASES").await;
    let other = admin_rows.iter().find(|row| row[0] == "other").unwrap();
    assert_eq!(other[8], "2", "max_connections of {other:?}");
    proxy.shutdown().await;
}

/// The rows of a SHOW command run by the admin user on the console.
async fn admin_show(proxy: &Proxy, command: &str) -> Vec<Vec<String>> {
    let admin = proxy.connect("app", "app", "pgrelay").await.unwrap();
    admin
        .simple_query(command)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|message| match message {
            SimpleQueryMessage::Row(row) => Some(
                (0..row.len())
                    .map(|index| row.get(index).unwrap_or_default().to_owned())
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_caps_per_user_and_per_address_refuse_with_53300() {
    let cluster = shared_cluster();
    let text = config_for(cluster, "size = 4").replace(
        "client_login_timeout = \"5s\"",
        "client_login_timeout = \"5s\"\nmax_client_conn_per_user = 2\nmax_client_conn_per_address = 3\nadmin_users = [\"app\"]",
    );
    let proxy = Proxy::start(&text).await;
    let first = connect_from(proxy.addr, "127.0.0.5", "app_t5", "app_t5", "app")
        .await
        .unwrap();
    let second = connect_from(proxy.addr, "127.0.0.5", "app_t5", "app_t5", "app")
        .await
        .unwrap();
    let error = connect_from(proxy.addr, "127.0.0.6", "app_t5", "app_t5", "app")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&error), "53300");
    assert_eq!(
        message(&error),
        "too many connections for user \"app_t5\" (max_client_conn_per_user = 2)"
    );
    // The refused login counted towards neither the user nor its address.
    let third = connect_from(proxy.addr, "127.0.0.5", "app_t6", "app_t6", "app")
        .await
        .unwrap();
    let error = connect_from(proxy.addr, "127.0.0.5", "app_t7", "app_t7", "app")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&error), "53300");
    assert_eq!(
        message(&error),
        "too many connections from address \"127.0.0.5\" (max_client_conn_per_address = 3)"
    );
    assert!(
        connect_from(proxy.addr, "127.0.0.6", "app_t7", "app_t7", "app")
            .await
            .is_ok()
    );
    let users = admin_show(&proxy, "SHOW USERS").await;
    let t5 = users.iter().find(|row| row[0] == "app_t5").unwrap();
    assert_eq!(t5[3..], ["2".to_owned(), "2".to_owned()], "{t5:?}");
    // Leaving gives the places back.
    drop((first, second, third));
    let counts = proxy.running().shared().access.counts.clone();
    wait_until("the places are given back", Duration::from_secs(10), || {
        let counts = counts.clone();
        async move { counts.user("app_t5") == 0 }
    })
    .await;
    assert!(
        connect_from(proxy.addr, "127.0.0.5", "app_t5", "app_t5", "app")
            .await
            .is_ok()
    );
    assert_eq!(login_refusals(&proxy, "limit"), 2.0);
    proxy.shutdown().await;
}
