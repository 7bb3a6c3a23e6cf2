//! End-to-end: what drivers do through a transaction-mode pool that is smaller than the
//! number of clients: named prepared statements, settings, cancels.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is a failed test

mod common;

use std::time::Duration;

use common::{Proxy, config_for, first_value, run_tool, shared_cluster, sqlstate};
use tokio_postgres::NoTls;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_prepare_statements_through_a_small_pool() {
    let cluster = shared_cluster();
    let config = config_for(cluster, "size = 5\nmax_prepared_statements = 10")
        .replace("client_login_timeout = \"5s\"", "client_login_timeout = \"60s\"");
    let proxy = Proxy::start(&config).await;
    let mut tasks = Vec::new();
    for client_index in 0..100i32 {
        let url = proxy.url("app_t7", "app_t7", "app");
        tasks.push(tokio::spawn(async move {
            let client = common::connect(&url).await.unwrap();
            // The same text for everyone, plus statements of their own: 30 distinct
            // statements over all clients, more than a server may hold.
            let shared = client.prepare("SELECT $1::int * 2").await.unwrap();
            let own = client
                .prepare(&format!("SELECT $1::int + {}", client_index % 30))
                .await
                .unwrap();
            for round in 0..5i32 {
                let doubled: i32 = client.query_one(&shared, &[&round]).await.unwrap().get(0);
                assert_eq!(doubled, round * 2);
                let added: i32 = client.query_one(&own, &[&round]).await.unwrap().get(0);
                assert_eq!(added, round + client_index % 30);
                let held: i64 = client
                    .query_one("SELECT count(*) FROM pg_prepared_statements", &[])
                    .await
                    .unwrap()
                    .get(0);
                assert!(held <= 10, "a server holds {held} statements");
            }
        }));
    }
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(120), task)
            .await
            .unwrap()
            .unwrap();
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_deallocate_and_discard_all_behave_as_on_a_direct_connection() {
    let cluster = shared_cluster();
    let proxy = Proxy::start(&config_for(cluster, "size = 2")).await;
    let client = proxy.app().await;
    let statement = client.prepare("SELECT 'still here'").await.unwrap();
    let value: String = client.query_one(&statement, &[]).await.unwrap().get(0);
    assert_eq!(value, "still here");
    // tokio-postgres closes its statement on drop; the name is then unknown.
    drop(statement);
    let again = client.prepare("SELECT 'again'").await.unwrap();
    assert_eq!(
        client.query_one(&again, &[]).await.unwrap().get::<_, String>(0),
        "again"
    );
    client.batch_execute("DISCARD ALL").await.unwrap();
    // After DISCARD ALL the client's statements are gone, as on PostgreSQL.
    let error = client.query_one(&again, &[]).await.unwrap_err();
    assert_eq!(sqlstate(&error), "26000", "{error:?}");
    let fresh = client.prepare("SELECT 'fresh'").await.unwrap();
    assert_eq!(
        client.query_one(&fresh, &[]).await.unwrap().get::<_, String>(0),
        "fresh"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_cached_plan_after_ddl_fails_once_then_recovers() {
    let cluster = shared_cluster();
    let proxy = Proxy::start(&config_for(cluster, "size = 1")).await;
    let client = proxy.app().await;
    let table = format!("plan_{}", std::process::id());
    client
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (a int); INSERT INTO {table} VALUES (1)"
        ))
        .await
        .unwrap();
    let select = client.prepare(&format!("SELECT * FROM {table}")).await.unwrap();
    assert_eq!(client.query(&select, &[]).await.unwrap().len(), 1);
    client
        .batch_execute(&format!("ALTER TABLE {table} ADD COLUMN b int"))
        .await
        .unwrap();
    let error = client.query(&select, &[]).await.unwrap_err();
    assert!(
        common::message(&error).contains("cached plan must not change result type"),
        "{error:?}"
    );
    // The driver prepares the statement again; the server's stale copy is replaced.
    let select = client.prepare(&format!("SELECT * FROM {table}")).await.unwrap();
    let rows = client.query(&select, &[]).await.unwrap();
    assert_eq!(rows[0].len(), 2);
    client.batch_execute(&format!("DROP TABLE {table}")).await.unwrap();
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_cancel_never_hits_the_next_client_on_the_same_server() {
    let cluster = shared_cluster();
    let proxy = Proxy::start(&config_for(cluster, "size = 1")).await;
    let first = proxy.app().await;
    let second = proxy.app().await;
    let first_pid = first_value(&first.simple_query("SELECT pg_backend_pid()").await.unwrap());
    let late_cancel = first.cancel_token();
    // The second client now runs on the same (only) server connection.
    let running = tokio::spawn(async move {
        let rows = second.simple_query("SELECT pg_backend_pid(), pg_sleep(1)").await;
        (second, rows)
    });
    let observer = common::direct(&cluster.primary().addr(), "app").await;
    common::wait_until("the second client's query runs", Duration::from_secs(10), || {
        let observer = &observer;
        async move {
            let n: i64 = observer
                .query_one("SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(1)%' AND state = 'active' AND pid <> pg_backend_pid()", &[])
                .await
                .unwrap()
                .get(0);
            n == 1
        }
    })
    .await;
    late_cancel.cancel_query(NoTls).await.unwrap();
    let (_second, rows) = tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .unwrap()
        .unwrap();
    let rows = rows.expect("the second client's query was not cancelled");
    assert_eq!(
        first_value(&rows),
        first_pid,
        "both clients used the same server connection"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_prepared_mode_through_a_pool_of_five() {
    let cluster = shared_cluster();
    let proxy = Proxy::start(&config_for(cluster, "size = 5")).await;
    let port = proxy.port().to_string();
    let (ok, _, stderr) = run_tool(
        "pgbench",
        "app_t8",
        &[
            "-i",
            "-s",
            "1",
            "-q",
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "app_t8",
            "app",
        ],
        "",
    )
    .await;
    assert!(ok, "pgbench -i: {stderr}");
    // Select-only: pgbench prepares a statement synchronously the first time each
    // client runs it, blocking its whole thread; with multi-statement transactions and
    // fewer servers than clients, one thread's clients can then hold every server while
    // it waits for another. That deadlock is pgbench's, through any pooler.
    for script in ["-S"] {
        let (ok, stdout, stderr) = run_tool(
            "pgbench",
            "app_t8",
            &[
                "-M",
                "prepared",
                script,
                "-c",
                "30",
                "-j",
                "2",
                "-T",
                "3",
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "app_t8",
                "app",
            ],
            "",
        )
        .await;
        assert!(ok, "pgbench {script}: {stdout}\n{stderr}");
        assert!(stdout.contains("number of failed transactions: 0"), "{stdout}");
    }
    proxy.shutdown().await;
}

async fn show(client: &tokio_postgres::Client, setting: &str) -> String {
    first_value(&client.simple_query(&format!("SHOW {setting}")).await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_follow_their_client_and_never_reach_another() {
    let cluster = shared_cluster();
    let proxy = Proxy::start(&config_for(cluster, "size = 1")).await;
    let a = proxy.connect("app_t6", "app_t6", "app").await.unwrap();
    let b = proxy.connect("app_t6", "app_t6", "app").await.unwrap();
    let b_defaults = (show(&b, "search_path").await, show(&b, "TimeZone").await);
    a.simple_query("SET search_path TO pg_catalog, public").await.unwrap();
    a.simple_query("SET TimeZone = 'Asia/Tokyo'").await.unwrap();
    a.simple_query("SELECT set_config('statement_timeout', '4321', false)")
        .await
        .unwrap();
    for _ in 0..3 {
        // Both clients share the only server connection, one transaction at a time.
        assert_eq!(show(&a, "search_path").await, "pg_catalog, public");
        assert_eq!(show(&a, "TimeZone").await, "Asia/Tokyo");
        assert_eq!(show(&a, "statement_timeout").await, "4321ms");
        assert_eq!((show(&b, "search_path").await, show(&b, "TimeZone").await), b_defaults);
        assert_eq!(show(&b, "statement_timeout").await, "0");
    }
    // A SET in a transaction that rolls back leaves nothing behind; RESET restores.
    a.simple_query("BEGIN; SET work_mem = '9MB'; ROLLBACK").await.unwrap();
    assert_eq!(show(&b, "work_mem").await, "4MB");
    assert_eq!(show(&a, "work_mem").await, "4MB");
    a.simple_query("RESET statement_timeout").await.unwrap();
    assert_eq!(show(&b, "TimeZone").await, b_defaults.1);
    assert_eq!(show(&a, "statement_timeout").await, "0");
    assert_eq!(show(&a, "TimeZone").await, "Asia/Tokyo");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temp_tables_and_advisory_locks_pin_the_client_to_its_server() {
    let cluster = shared_cluster();
    let proxy = Proxy::start(&config_for(cluster, "size = 2")).await;
    let a = proxy.connect("app_t5", "app_t5", "app").await.unwrap();
    let b = proxy.connect("app_t5", "app_t5", "app").await.unwrap();
    a.simple_query("CREATE TEMP TABLE scratch (a int); INSERT INTO scratch VALUES (1)")
        .await
        .unwrap();
    a.simple_query("SELECT pg_advisory_lock(7)").await.unwrap();
    let pid = first_value(&a.simple_query("SELECT pg_backend_pid()").await.unwrap());
    for _ in 0..5 {
        assert_eq!(
            first_value(&a.simple_query("SELECT count(*) FROM scratch").await.unwrap()),
            "1"
        );
        assert_eq!(
            first_value(&a.simple_query("SELECT pg_backend_pid()").await.unwrap()),
            pid
        );
        // The other client never gets the pinned server, nor its lock.
        assert_ne!(
            first_value(&b.simple_query("SELECT pg_backend_pid()").await.unwrap()),
            pid
        );
        assert_eq!(
            first_value(&b.simple_query("SELECT pg_try_advisory_lock(7)").await.unwrap()),
            "f"
        );
    }
    let scrape = proxy.running().shared().metrics.render().unwrap();
    let scrape = String::from_utf8(scrape).unwrap();
    assert!(
        scrape.contains("pgrelay_pinned_sessions{database=\"app\",reason=\"temp_table\"} 1"),
        "{scrape}"
    );
    a.simple_query("SELECT pg_advisory_unlock_all()").await.unwrap();
    a.simple_query("DISCARD TEMP").await.unwrap();
    let scrape = String::from_utf8(proxy.running().shared().metrics.render().unwrap()).unwrap();
    assert!(
        scrape.contains("pgrelay_pinned_sessions{database=\"app\",reason=\"temp_table\"} 0"),
        "{scrape}"
    );
    proxy.shutdown().await;
}

/// Runs `scenario` on a fresh client of a pool of one, then checks that the client sees
/// `setting` as a direct connection would (`own`), and that the next client of the same
/// server connection sees the default (`default`).
async fn setting_after(proxy: &Proxy, scenario: &[&str], setting: &str, own: &str, default: &str) {
    let first = proxy.connect("app_t4", "app_t4", "app").await.unwrap();
    for statement in scenario {
        // Some statements fail on purpose; the outcome that matters is the setting.
        let _ = first.simple_query(statement).await;
    }
    assert_eq!(show(&first, setting).await, own, "after {scenario:?}");
    let pid = first_value(&first.simple_query("SELECT pg_backend_pid()").await.unwrap());
    drop(first);
    let next = proxy.connect("app_t4", "app_t4", "app").await.unwrap();
    assert_eq!(
        first_value(&next.simple_query("SELECT pg_backend_pid()").await.unwrap()),
        pid,
        "the pool has one server connection"
    );
    assert_eq!(
        show(&next, setting).await,
        default,
        "the next client after {scenario:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_of_transactions_that_partly_committed_stay_with_their_client() {
    let cluster = shared_cluster();
    let proxy = Proxy::start(&config_for(cluster, "size = 1")).await;
    // Committed, then a statement failed in the same query: the SET stays.
    setting_after(
        &proxy,
        &["BEGIN; SET work_mem = '3MB'; COMMIT; SELECT 1/0"],
        "work_mem",
        "3MB",
        "4MB",
    )
    .await;
    // An error rolled back to a savepoint: the SET before the savepoint commits.
    setting_after(
        &proxy,
        &[
            "BEGIN",
            "SET statement_timeout = '5s'",
            "SAVEPOINT s",
            "SELECT 1/0",
            "ROLLBACK TO s",
            "COMMIT",
        ],
        "statement_timeout",
        "5s",
        "0",
    )
    .await;
    // And the certain cases: a failed implicit transaction and a savepoint's rollback
    // undo their SET, a RELEASE keeps it.
    setting_after(&proxy, &["SET work_mem = '6MB'; SELECT 1/0"], "work_mem", "4MB", "4MB").await;
    setting_after(
        &proxy,
        &["BEGIN", "SAVEPOINT s", "SET work_mem = '7MB'", "RELEASE s", "COMMIT"],
        "work_mem",
        "7MB",
        "4MB",
    )
    .await;
    setting_after(
        &proxy,
        &["BEGIN", "SET work_mem = '8MB'", "SELECT 1/0", "ROLLBACK"],
        "work_mem",
        "4MB",
        "4MB",
    )
    .await;
    proxy.shutdown().await;
}

/// A NotificationResponse body: the channel and the payload.
fn notification(tag: u8, body: &[u8]) -> (String, String) {
    assert_eq!(tag, b'A', "expected a notification, got {:?}", tag as char);
    let mut fields = body[4..]
        .split(|&b| b == 0)
        .map(|text| String::from_utf8_lossy(text).into_owned());
    (fields.next().unwrap_or_default(), fields.next().unwrap_or_default())
}

/// With listen_notify = "pin", a client that LISTENs keeps its server (it is pinned) and hears every notification as
/// soon as the server sends it, while it sends nothing itself, as on a direct connection:
/// the first one after LISTEN, and each of a batch that arrives at once. When that server
/// ends the session, the client is told at once too, not at its next statement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listening_client_hears_notifications_and_its_server_s_end_while_idle() {
    let cluster = shared_cluster();
    let admin = common::direct(&cluster.primary().addr(), "app").await;
    for mode in ["transaction", "session"] {
        // listen_notify = "pin": the server-side LISTEN of before (fan-out has its own
        // tests in tests/listen_notify.rs).
        let config = config_for(cluster, &format!("mode = \"{mode}\"\nsize = 2"))
            .replace("[databases.app]\n", "[databases.app]\nlisten_notify = \"pin\"\n");
        let proxy = Proxy::start(&config).await;
        let name = format!("raw_listener_{mode}");
        let channel = format!("raw_channel_{mode}");
        let mut listener = common::raw::Raw::connect_named(&proxy.addr.to_string(), &name).await;
        listener.send(&[common::raw::query(&format!("LISTEN {channel}"))]).await;
        assert_eq!(
            common::raw::show(&listener.replies_until_ready(1).await),
            "C:LISTEN Z:I",
            "{mode}"
        );
        let sender = proxy.app().await;

        sender
            .batch_execute(&format!("NOTIFY {channel}, 'first'"))
            .await
            .unwrap();
        let (tag, body) = listener.next_message().await;
        assert_eq!(
            notification(tag, &body),
            (channel.clone(), "first".to_owned()),
            "{mode}"
        );

        // Fifty notifications committed together reach the server's socket in one go.
        sender
            .batch_execute(&format!(
                "SELECT pg_notify('{channel}', 'n' || g) FROM generate_series(1, 50) g"
            ))
            .await
            .unwrap();
        for expected in 1..=50 {
            let (tag, body) = listener.next_message().await;
            assert_eq!(notification(tag, &body).1, format!("n{expected}"), "{mode}");
        }

        // Still usable, and still on the same server.
        listener.send(&[common::raw::query("SELECT 1")]).await;
        assert_eq!(
            common::raw::show(&listener.replies_until_ready(1).await),
            "T D C:SELECT 1 Z:I",
            "{mode}"
        );

        // Its server is terminated while it idles: the FATAL arrives at once, and the
        // connection closes, as on a direct connection.
        let ended = admin
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
                &[&name],
            )
            .await
            .unwrap();
        assert_eq!(ended.len(), 1, "{mode}: the listener's server connection");
        let (tag, body) = listener.next_message().await;
        let reply = common::raw::parse_reply(&[&[tag, 0, 0, 0, 0][..], &body].concat());
        assert_eq!(reply, common::raw::Reply::Error("57P01".to_owned()), "{mode}");
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(10), async {
            use tokio::io::AsyncReadExt;
            listener.stream.read_to_end(&mut rest).await
        })
        .await;
        assert!(matches!(closed, Ok(Ok(0))), "{mode}: {closed:?} {rest:?}");
        proxy.shutdown().await;
    }
}
