//! End-to-end: the Prometheus endpoint, the health endpoints and the admin console
//! report what the pools really do.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is a failed test

mod common;

use std::time::Duration;

use common::{Proxy, config_for, config_with_replica, first_value, shared_cluster, sqlstate, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// GET `path` from the metrics endpoint: (status, body).
async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut response))
        .await
        .unwrap()
        .unwrap();
    let status = response.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The scrape, parsed by a Prometheus text-format parser.
async fn scrape(proxy: &Proxy) -> prometheus_parse::Scrape {
    let (status, body) = http_get(proxy.running().metrics_addr().unwrap(), "/metrics").await;
    assert_eq!(status, 200);
    prometheus_parse::Scrape::parse(body.lines().map(|line| Ok(line.to_owned()))).expect("a valid scrape")
}

/// The value of the sample of `name` whose labels include all of `labels`.
fn value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|sample| sample.metric == name)
        .filter(|sample| labels.iter().all(|(key, value)| sample.labels.get(key) == Some(*value)))
        .map(|sample| match sample.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

fn with_metrics(config: String) -> String {
    config.replace(
        "metrics_listen = \"\"",
        "metrics_listen = \"127.0.0.1:0\"\nadmin_users = [\"app\"]\nstats_users = [\"app_t2\"]",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_pool_shows_in_the_metrics_and_in_show_pools() {
    let cluster = shared_cluster();
    let proxy = Proxy::start(&with_metrics(config_for(
        cluster,
        "size = 2\nquery_wait_timeout = \"0\"",
    )))
    .await;
    let (status, _) = http_get(proxy.running().metrics_addr().unwrap(), "/healthz").await;
    assert_eq!(status, 200);
    let (status, _) = http_get(proxy.running().metrics_addr().unwrap(), "/readyz").await;
    assert_eq!(status, 200);

    let mut clients = Vec::new();
    for _ in 0..20 {
        clients.push(proxy.connect("app_t1", "app_t1", "app").await.unwrap());
    }
    let mut holders = Vec::new();
    for client in clients {
        holders.push(tokio::spawn(async move {
            client.simple_query("BEGIN").await.unwrap();
            client
        }));
    }
    let labels = [("database", "app"), ("user", "app_t1")];
    // Both counts at once: while a second server is still being opened, its client
    // is counted waiting and one of the others may not have sent its BEGIN yet.
    wait_until("2 clients active and 18 waiting", Duration::from_secs(20), || async {
        let scrape = scrape(&proxy).await;
        let count = |state| value(&scrape, "pgrelay_clients", &[labels[0], labels[1], ("state", state)]);
        count("active") == 2.0 && count("waiting") == 18.0
    })
    .await;
    let first = scrape(&proxy).await;
    assert_eq!(
        value(&first, "pgrelay_clients", &[labels[0], labels[1], ("state", "active")]),
        2.0
    );
    assert_eq!(
        value(
            &first,
            "pgrelay_pool_saturation",
            &[labels[0], labels[1], ("role", "primary")]
        ),
        1.0
    );
    let first_wait = value(&first, "pgrelay_pool_max_wait_seconds", &labels);
    wait_until("the longest wait grows", Duration::from_secs(10), || async {
        value(&scrape(&proxy).await, "pgrelay_pool_max_wait_seconds", &labels) > first_wait
    })
    .await;
    // SHOW POOLS says the same.
    let admin = proxy.connect("app", "app", "pgrelay").await.unwrap();
    let rows = admin.simple_query("SHOW POOLS").await.unwrap();
    let pool = rows
        .iter()
        .find_map(|message| match message {
            tokio_postgres::SimpleQueryMessage::Row(row) if row.get("user") == Some("app_t1") => Some(row),
            _ => None,
        })
        .expect("a SHOW POOLS row for app_t1");
    assert_eq!(pool.get("cl_waiting"), Some("18"));
    assert_eq!(pool.get("sv_active"), Some("2"));
    assert_eq!(pool.get("pool_mode"), Some("transaction"));
    assert_eq!(pool.get("role"), Some("primary"));

    // Each transaction ends with a COMMIT; the waiting ones then get a server in turn.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut pending = holders;
    let mut done = Vec::new();
    while !pending.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "transactions did not get their turn"
        );
        match pending.iter().position(|holder| holder.is_finished()) {
            Some(index) => {
                let client = pending.swap_remove(index).await.unwrap();
                client.simple_query("COMMIT").await.unwrap();
                done.push(client);
            }
            None => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    wait_until("nobody waits any more", Duration::from_secs(20), || async {
        let scrape = scrape(&proxy).await;
        value(
            &scrape,
            "pgrelay_clients",
            &[labels[0], labels[1], ("state", "waiting")],
        ) == 0.0
            && value(&scrape, "pgrelay_pool_max_wait_seconds", &labels) == 0.0
            && value(
                &scrape,
                "pgrelay_pool_saturation",
                &[labels[0], labels[1], ("role", "primary")],
            ) == 0.0
    })
    .await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_are_counted_exactly_and_by_role() {
    let cluster = shared_cluster();
    let proxy = Proxy::start(&with_metrics(config_with_replica(
        cluster,
        "size = 2",
        "consistency = \"eventual\"",
    )))
    .await;
    let client = proxy.connect("app_t3", "app_t3", "app").await.unwrap();
    let labels = |role| [("database", "app"), ("user", "app_t3"), ("role", role)];
    let before = scrape(&proxy).await;
    let (primary_before, replica_before) = (
        value(&before, "pgrelay_queries_total", &labels("primary")),
        value(&before, "pgrelay_queries_total", &labels("replica")),
    );
    for _ in 0..7 {
        client.simple_query("SELECT 1").await.unwrap();
    }
    for _ in 0..3 {
        client.simple_query("SELECT nextval('items_id_seq')").await.unwrap();
    }
    let after = scrape(&proxy).await;
    assert_eq!(
        value(&after, "pgrelay_queries_total", &labels("replica")) - replica_before,
        7.0
    );
    assert_eq!(
        value(&after, "pgrelay_queries_total", &labels("primary")) - primary_before,
        3.0
    );
    assert!(
        value(
            &after,
            "pgrelay_routing_decisions_total",
            &[("database", "app"), ("role", "replica"), ("reason", "read")]
        ) >= 7.0
    );
    // Every family of the contract is there, with its type.
    for (family, kind) in [
        ("pgrelay_clients", "gauge"),
        ("pgrelay_servers", "gauge"),
        ("pgrelay_pool_size", "gauge"),
        ("pgrelay_pool_saturation", "gauge"),
        ("pgrelay_pool_wait_seconds", "histogram"),
        ("pgrelay_pool_max_wait_seconds", "gauge"),
        ("pgrelay_queries_total", "counter"),
        ("pgrelay_transactions_total", "counter"),
        ("pgrelay_query_duration_seconds", "histogram"),
        ("pgrelay_routing_decisions_total", "counter"),
        ("pgrelay_backend_up", "gauge"),
        ("pgrelay_server_connect_errors_total", "counter"),
        ("pgrelay_client_errors_total", "counter"),
        ("pgrelay_pinned_sessions", "gauge"),
        ("pgrelay_prepared_statements_evictions_total", "counter"),
        ("pgrelay_build_info", "gauge"),
    ] {
        let (_, body) = http_get(proxy.running().metrics_addr().unwrap(), "/metrics").await;
        let name = family.trim_end_matches("_total");
        assert!(
            body.contains(&format!("# TYPE {name} {kind}")) || body.contains(&format!("# TYPE {family} {kind}")),
            "{family} {kind}"
        );
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_console_checks_who_may_do_what() {
    let cluster = shared_cluster();
    let proxy = Proxy::start(&with_metrics(config_for(cluster, "size = 2"))).await;
    let admin = proxy.connect("app", "app", "pgrelay").await.unwrap();
    for command in [
        "SHOW STATS",
        "SHOW CLIENTS",
        "SHOW SERVERS",
        "SHOW DATABASES",
        "SHOW USERS",
        "SHOW LISTS",
        "SHOW CONFIG",
        "SHOW VERSION",
        "SHOW HELP",
    ] {
        admin
            .simple_query(command)
            .await
            .unwrap_or_else(|e| panic!("{command}: {e:?}"));
    }
    assert!(first_value(&admin.simple_query("SHOW VERSION").await.unwrap()).starts_with("pgrelay "));
    let settings = admin.simple_query("SHOW CONFIG").await.unwrap();
    let workers = settings.iter().find_map(|message| match message {
        tokio_postgres::SimpleQueryMessage::Row(row) if row.get(0) == Some("server.workers") => {
            row.get(1).map(str::to_owned)
        }
        _ => None,
    });
    assert!(
        workers
            .as_deref()
            .is_some_and(|value| value.starts_with("0 (one per core: ")),
        "SHOW CONFIG names the worker threads: {workers:?}"
    );
    let stats = proxy.connect("app_t2", "app_t2", "pgrelay").await.unwrap();
    stats.simple_query("SHOW POOLS").await.unwrap();
    let error = stats.simple_query("PAUSE").await.unwrap_err();
    assert_eq!(sqlstate(&error), "42501");
    let nobody = proxy.connect("app_t4", "app_t4", "pgrelay").await.unwrap();
    for command in ["SHOW POOLS", "RELOAD", "KILL app", "SHUTDOWN"] {
        let error = nobody.simple_query(command).await.unwrap_err();
        assert_eq!(sqlstate(&error), "42501", "{command}");
    }
    let error = admin.simple_query("SHOW NONSENSE").await.unwrap_err();
    assert_eq!(sqlstate(&error), "42601");

    // PAUSE waits for the running transaction, then holds new ones until RESUME.
    let busy = proxy.connect("app_t4", "app_t4", "app").await.unwrap();
    busy.simple_query("BEGIN").await.unwrap();
    let pausing = tokio::spawn(async move {
        admin.simple_query("PAUSE app").await.unwrap();
        admin
    });
    let paused_database = proxy.running().shared().snapshot().database("app").unwrap();
    wait_until("PAUSE has begun", Duration::from_secs(10), || {
        let paused = paused_database.is_paused();
        async move { paused }
    })
    .await;
    assert!(!pausing.is_finished(), "PAUSE returned while a transaction was running");
    busy.simple_query("COMMIT").await.unwrap();
    let admin = tokio::time::timeout(Duration::from_secs(10), pausing)
        .await
        .unwrap()
        .unwrap();
    let held = tokio::spawn(async move {
        busy.simple_query("SELECT 'after resume'")
            .await
            .map(|rows| first_value(&rows))
    });
    wait_until("the new transaction waits", Duration::from_secs(10), || async {
        proxy
            .running()
            .shared()
            .registry
            .clients()
            .iter()
            .any(|c| c.state() == pgrelay::registry::LinkState::Waiting)
    })
    .await;
    admin.simple_query("RESUME app").await.unwrap();
    let value = tokio::time::timeout(Duration::from_secs(10), held)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(value, "after resume");

    // KILL drops the database's clients; RESUME lets new ones in.
    let victim = proxy.connect("app_t4", "app_t4", "app").await.unwrap();
    admin.simple_query("KILL app").await.unwrap();
    wait_until("the client is dropped", Duration::from_secs(10), || {
        let closed = victim.is_closed();
        async move { closed }
    })
    .await;
    admin.simple_query("RESUME app").await.unwrap();
    let fresh = proxy.connect("app_t4", "app_t4", "app").await.unwrap();
    fresh.simple_query("SELECT 1").await.unwrap();
    proxy.shutdown().await;
}

/// Every worker thread kept by a task that does not yield: the watchdog counts the stall
/// in pgrelay_runtime_stalls_total, and /metrics and an admin console that is already
/// connected still answer, from the control thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_worker_stuck_the_console_and_metrics_answer_and_the_stall_is_counted() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let cluster = shared_cluster();
    let proxy = Proxy::start_isolated(&with_metrics(config_for(cluster, "size = 2")), 2).await;
    let metrics = proxy.running().metrics_addr().unwrap();
    let console = proxy.connect("app", "app", "pgrelay").await.unwrap();
    let before = value(&scrape(&proxy).await, "pgrelay_runtime_stalls_total", &[]);

    // Two tasks that keep both of pgrelay's workers for 2.5 s, as a bug would.
    let stuck = Arc::new(AtomicUsize::new(0));
    let stuck_tasks: Vec<_> = (0..2)
        .map(|_| {
            let stuck = stuck.clone();
            proxy.runtime().spawn(async move {
                stuck.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(2500));
                stuck.fetch_sub(1, Ordering::SeqCst);
            })
        })
        .collect();
    wait_until("both workers are kept", Duration::from_secs(2), || {
        let stuck = stuck.clone();
        async move { stuck.load(Ordering::SeqCst) == 2 }
    })
    .await;

    let pools = tokio::time::timeout(Duration::from_millis(1000), console.simple_query("SHOW POOLS"))
        .await
        .expect("SHOW POOLS answered while every worker is kept")
        .unwrap();
    assert!(pools.len() > 1, "{pools:?}");
    let (status, _) = tokio::time::timeout(Duration::from_millis(1000), http_get(metrics, "/healthz"))
        .await
        .expect("/healthz answered while every worker is kept");
    assert_eq!(status, 200);
    assert_eq!(stuck.load(Ordering::SeqCst), 2, "the workers were free meanwhile");

    for task in stuck_tasks {
        task.await.unwrap();
    }
    wait_until("the stall is counted", Duration::from_secs(5), || {
        let proxy = &proxy;
        async move { value(&scrape(proxy).await, "pgrelay_runtime_stalls_total", &[]) > before }
    })
    .await;
    // And the workers serve clients again.
    let client = proxy.app().await;
    client.simple_query("SELECT 1").await.unwrap();
    drop((client, console));
    proxy.shutdown().await;
}

/// The column names and rows of a SHOW command.
async fn show(console: &tokio_postgres::Client, command: &str) -> (Vec<String>, Vec<Vec<String>>) {
    let mut columns = Vec::new();
    let mut rows = Vec::new();
    for message in console.simple_query(command).await.unwrap() {
        if let tokio_postgres::SimpleQueryMessage::Row(row) = message {
            columns = row.columns().iter().map(|column| column.name().to_owned()).collect();
            rows.push(
                (0..row.len())
                    .map(|i| row.get(i).unwrap_or_default().to_owned())
                    .collect(),
            );
        }
    }
    (columns, rows)
}

/// The `items` of one `SHOW LISTS` row.
async fn list_items(console: &tokio_postgres::Client, list: &str) -> usize {
    let (_, rows) = show(console, "SHOW LISTS").await;
    rows.iter()
        .find(|row| row[0] == list)
        .unwrap_or_else(|| panic!("no SHOW LISTS row {list}"))[1]
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_lists_counts_what_is_there_and_the_limits_show_with_their_counts() {
    let cluster = shared_cluster();
    let config = with_metrics(config_for(cluster, "size = 2\nmax_user_connections = 3"))
        .replace("[databases.other]\n", "[databases.other]\nmax_db_connections = 4\n");
    let proxy = Proxy::start(&config).await;
    let admin = proxy.connect("app", "app", "pgrelay").await.unwrap();
    let t1 = proxy.connect("app_t1", "app_t1", "app").await.unwrap();
    let t2 = proxy.connect("app_t2", "app_t2", "other").await.unwrap();
    t1.batch_execute("BEGIN; SELECT 1").await.unwrap();
    t2.batch_execute("BEGIN; SELECT 1").await.unwrap();
    // A connection that never sends its startup packet: logging in until it leaves.
    let silent = tokio::net::TcpStream::connect(proxy.running().local_addr())
        .await
        .unwrap();
    wait_until(
        "the silent connection counts as logging in",
        Duration::from_secs(10),
        || async { list_items(&admin, "login_clients").await == 1 },
    )
    .await;

    let (columns, lists) = show(&admin, "SHOW LISTS").await;
    assert_eq!(columns, ["list", "items"]);
    let names: Vec<&str> = lists.iter().map(|row| row[0].as_str()).collect();
    assert_eq!(
        names,
        [
            "databases",
            "users",
            "peers",
            "pools",
            "peer_pools",
            "free_clients",
            "used_clients",
            "login_clients",
            "free_servers",
            "used_servers",
            "dns_names",
            "dns_zones",
            "dns_queries",
            "dns_pending"
        ]
    );
    let item = |name: &str| -> usize { lists.iter().find(|row| row[0] == name).unwrap()[1].parse().unwrap() };
    assert_eq!(item("databases"), 2);
    assert_eq!(item("users"), 22, "the users of [[users]]");
    let (_, pools) = show(&admin, "SHOW POOLS").await;
    assert!(pools.len() >= 2, "{pools:?}");
    assert_eq!(item("pools"), pools.len());
    let (_, servers) = show(&admin, "SHOW SERVERS").await;
    assert!(servers.len() >= 2, "{servers:?}");
    assert_eq!(item("used_servers"), servers.len());
    let (_, clients) = show(&admin, "SHOW CLIENTS").await;
    assert_eq!(clients.len(), 2, "{clients:?}");
    // The two pooled clients, the console's own and the silent one.
    assert_eq!(item("used_clients"), 4);
    assert_eq!(item("login_clients"), 1);
    for empty in [
        "peers",
        "peer_pools",
        "free_clients",
        "free_servers",
        "dns_names",
        "dns_pending",
    ] {
        assert_eq!(item(empty), 0, "{empty}");
    }
    drop(silent);
    wait_until("the silent connection is gone", Duration::from_secs(10), || async {
        list_items(&admin, "login_clients").await == 0 && list_items(&admin, "used_clients").await == 3
    })
    .await;

    // The limits that span pools, each with the count it limits, where PgBouncer shows them
    // (SHOW USERS, SHOW DATABASES), agreeing with the metrics.
    let scrape = scrape(&proxy).await;
    let (columns, users) = show(&admin, "SHOW USERS").await;
    assert_eq!(columns[..3], ["name", "max_user_connections", "current_connections"]);
    let t1_row = users.iter().find(|row| row[0] == "app_t1").unwrap();
    assert_eq!(t1_row[1], "3");
    let t1_servers = value(&scrape, "pgrelay_user_servers", &[("user", "app_t1")]);
    assert!(t1_servers >= 1.0);
    assert_eq!(t1_row[2], t1_servers.to_string());
    assert_eq!(
        value(&scrape, "pgrelay_max_user_connections", &[("user", "app_t1")]),
        3.0
    );
    let (columns, databases) = show(&admin, "SHOW DATABASES").await;
    assert_eq!(columns[8..10], ["max_connections", "current_connections"]);
    let other = databases.iter().find(|row| row[0] == "other").unwrap();
    assert_eq!(other[8], "4");
    let other_servers = value(&scrape, "pgrelay_database_servers", &[("database", "other")]);
    assert!(other_servers >= 1.0);
    assert_eq!(other[9], other_servers.to_string());
    assert_eq!(
        value(&scrape, "pgrelay_max_db_connections", &[("database", "other")]),
        4.0
    );

    t1.batch_execute("COMMIT").await.unwrap();
    t2.batch_execute("COMMIT").await.unwrap();
    proxy.shutdown().await;
}
