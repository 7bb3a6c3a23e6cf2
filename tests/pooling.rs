//! End-to-end: clients through pgrelay to a real PostgreSQL in the three pool modes.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is a failed test

mod common;

use std::time::Duration;

use common::{Proxy, backends, config_for, direct, first_value, psql, run_tool, shared_cluster, sqlstate, wait_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_and_extended_queries_work_through_the_proxy() {
    let cluster = shared_cluster();
    let proxy = Proxy::start(&config_for(cluster, "size = 2")).await;
    let client = proxy.app().await;
    let rows = client.simple_query("SELECT 1 + 1; SELECT 'x'").await.unwrap();
    assert_eq!(first_value(&rows), "2");
    let row = client
        .query_typed("SELECT $1::int * 3", &[(&7i32, tokio_postgres::types::Type::INT4)])
        .await
        .unwrap();
    assert_eq!(row[0].get::<_, i32>(0), 21);
    let error = client.simple_query("SELEC 1").await.unwrap_err();
    assert_eq!(sqlstate(&error), "42601");
    // The session goes on after an error.
    assert_eq!(
        first_value(&client.simple_query("SELECT current_user").await.unwrap()),
        "app"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_mode_shares_few_servers_and_releases_only_after_commit() {
    let cluster = shared_cluster();
    let proxy = Proxy::start(&config_for(cluster, "size = 1\nmode = \"transaction\"")).await;
    let observer = direct(&cluster.primary().addr(), "app").await;
    let a = proxy.connect("app_count", "app_count", "app").await.unwrap();
    let b = proxy.connect("app_count", "app_count", "app").await.unwrap();
    a.simple_query("BEGIN; SELECT 1").await.unwrap();
    let b_query = tokio::spawn(async move {
        let rows = b.simple_query("SELECT 'b ran'").await.unwrap();
        (b, first_value(&rows))
    });
    let pool = proxy.running().shared().snapshot().database("app").unwrap();
    wait_until("b waits for the only server", Duration::from_secs(10), || {
        let waiting: usize = pool
            .all_pools()
            .iter()
            .map(|(_, pools)| pools.hosts[0].status().waiting)
            .sum();
        async move { waiting == 1 }
    })
    .await;
    assert!(!b_query.is_finished());
    a.simple_query("COMMIT").await.unwrap();
    let (_b, value) = tokio::time::timeout(Duration::from_secs(10), b_query)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(value, "b ran");
    assert_eq!(backends(&observer, "app_count").await, 1);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_server_authentication_method_works() {
    let cluster = shared_cluster();
    // app_md5 is configured here by its md5 hash: pgrelay checks the client's md5 answer
    // against it and logs in to PostgreSQL (md5 in pg_hba) with the hash alone.
    let md5_hash = pgrelay::auth::md5_stored_string("app_md5", "app_md5");
    let config = config_for(cluster, "size = 2").replace(
        "name = \"app_md5\"\npassword = \"app_md5\"",
        &format!("name = \"app_md5\"\npassword = \"{md5_hash}\""),
    );
    let proxy = Proxy::start(&config).await;
    for (user, password) in [
        ("app", "app"),
        ("app_md5", "app_md5"),
        ("app_plain", "app_plain"),
        ("app_trust", ""),
    ] {
        let client = proxy
            .connect(user, password, "app")
            .await
            .unwrap_or_else(|e| panic!("{user}: {e:?}"));
        let rows = client.simple_query("SELECT current_user").await.unwrap();
        assert_eq!(first_value(&rows), user);
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_resets_the_server_before_the_next_client() {
    let cluster = shared_cluster();
    let proxy = Proxy::start(&config_for(cluster, "size = 1\nmode = \"session\"")).await;
    let a = proxy.connect("app_plain", "app_plain", "app").await.unwrap();
    a.simple_query("SET work_mem = '7MB'; SET application_name = 'client-a'")
        .await
        .unwrap();
    let a_pid = first_value(&a.simple_query("SELECT pg_backend_pid()").await.unwrap());
    assert_eq!(first_value(&a.simple_query("SHOW work_mem").await.unwrap()), "7MB");
    drop(a);
    let b = proxy.connect("app_plain", "app_plain", "app").await.unwrap();
    let b_pid = first_value(&b.simple_query("SELECT pg_backend_pid()").await.unwrap());
    assert_eq!(a_pid, b_pid, "the same server connection serves the next client");
    assert_eq!(first_value(&b.simple_query("SHOW work_mem").await.unwrap()), "4MB");
    assert_ne!(
        first_value(&b.simple_query("SHOW application_name").await.unwrap()),
        "client-a"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_mode_refuses_transaction_blocks() {
    let cluster = shared_cluster();
    let proxy = Proxy::start(&config_for(cluster, "size = 1\nmode = \"statement\"")).await;
    let client = proxy.app().await;
    let error = client.simple_query("BEGIN").await.unwrap_err();
    assert_eq!(sqlstate(&error), "0A000", "{error:?}");
    assert!(common::message(&error).contains("statement pooling mode"));
    // A whole transaction in one simple query is one statement for the pool.
    client.simple_query("BEGIN; SELECT 1; COMMIT").await.unwrap();
    assert_eq!(first_value(&client.simple_query("SELECT 40 + 2").await.unwrap()), "42");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_extended_queries_and_large_results_are_forwarded_in_order() {
    let cluster = shared_cluster();
    let proxy = Proxy::start(&config_for(cluster, "size = 1")).await;
    let client = proxy.app().await;
    let int4 = tokio_postgres::types::Type::INT4;
    let queries = (0..50i32).map(|i| {
        let client = &client;
        let int4 = int4.clone();
        async move {
            let rows = client
                .query_typed("SELECT $1::int + 1000", &[(&i, int4)])
                .await
                .unwrap();
            rows[0].get::<_, i32>(0)
        }
    });
    let results = futures_join_all(queries).await;
    assert_eq!(results, (1000..1050).collect::<Vec<_>>());
    // 200 000 rows and one 8 MB value: forwarded as they arrive.
    let rows = client
        .query_typed("SELECT count(*) FROM generate_series(1, 200000)", &[])
        .await
        .unwrap();
    assert_eq!(rows[0].get::<_, i64>(0), 200_000);
    let rows = client
        .query_typed("SELECT g FROM generate_series(1, 200000) g", &[])
        .await
        .unwrap();
    assert_eq!(rows.len(), 200_000);
    let rows = client.query_typed("SELECT repeat('x', 8000000)", &[]).await.unwrap();
    assert_eq!(rows[0].get::<_, String>(0).len(), 8_000_000);
    proxy.shutdown().await;
}

async fn futures_join_all<F: std::future::Future>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let futures: Vec<_> = futures.into_iter().map(Box::pin).collect();
    let mut outputs = Vec::with_capacity(futures.len());
    // Polling them all together lets tokio-postgres pipeline the queries.
    let mut pending: Vec<_> = futures.into_iter().enumerate().collect();
    let mut done: Vec<Option<F::Output>> = (0..pending.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        pending.retain_mut(|(index, future)| match future.as_mut().poll(cx) {
            std::task::Poll::Ready(output) => {
                done[*index] = Some(output);
                false
            }
            std::task::Poll::Pending => true,
        });
        if pending.is_empty() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    outputs.extend(done.into_iter().flatten());
    outputs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_and_out_and_notices_go_through_psql() {
    let cluster = shared_cluster();
    let proxy = Proxy::start(&config_for(cluster, "size = 2")).await;
    let rows: String = (0..20_000).map(|i| format!("copy-{i}\t{i}\n")).collect();
    let (ok, _, stderr) = psql(
        &proxy,
        "app",
        "app",
        "app",
        &["-c", "\\copy items(owner, value) from stdin"],
        &rows,
    )
    .await;
    assert!(ok, "{stderr}");
    let (ok, stdout, stderr) = psql(
        &proxy,
        "app",
        "app",
        "app",
        &[
            "-c",
            "\\copy (SELECT value FROM items WHERE owner LIKE 'copy-%' ORDER BY value) to stdout",
        ],
        "",
    )
    .await;
    assert!(ok, "{stderr}");
    assert_eq!(stdout.lines().count(), 20_000);
    assert_eq!(stdout.lines().last(), Some("19999"));
    // A COPY that fails half way reports the error and the session goes on.
    let (ok, _, stderr) = psql(
        &proxy,
        "app",
        "app",
        "app",
        &["-c", "\\copy items(owner, value) from stdin"],
        "a\t1\nb\tnot-a-number\n",
    )
    .await;
    assert!(!ok);
    assert!(stderr.contains("invalid input syntax"), "{stderr}");
    let (ok, _, stderr) = psql(
        &proxy,
        "app",
        "app",
        "app",
        &["-c", "DO $$BEGIN RAISE NOTICE 'hello from the server'; END$$"],
        "",
    )
    .await;
    assert!(ok, "{stderr}");
    assert!(stderr.contains("NOTICE:  hello from the server"), "{stderr}");
    let client = proxy.app().await;
    client
        .simple_query("DELETE FROM items WHERE owner LIKE 'copy-%'")
        .await
        .unwrap();
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_through_a_small_pool_never_opens_more_servers_and_loses_nothing() {
    let cluster = shared_cluster();
    let proxy = Proxy::start(&config_for(cluster, "size = 4\nmode = \"transaction\"")).await;
    let observer = direct(&cluster.primary().addr(), "other").await;
    let port = proxy.port().to_string();
    let (ok, _, stderr) = run_tool(
        "pgbench",
        "app_bench",
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
            "app_bench",
            "other",
        ],
        "",
    )
    .await;
    assert!(ok, "pgbench -i: {stderr}");
    let sampling = tokio::spawn(async move {
        let mut most = 0;
        for _ in 0..200 {
            most = most.max(backends(&observer, "app_bench").await);
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        (observer, most)
    });
    let (ok, stdout, stderr) = run_tool(
        "pgbench",
        "app_bench",
        &[
            "-c",
            "40",
            "-j",
            "2",
            "-T",
            "3",
            "-M",
            "extended",
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "app_bench",
            "other",
        ],
        "",
    )
    .await;
    assert!(ok, "pgbench: {stdout}\n{stderr}");
    assert!(stdout.contains("number of failed transactions: 0"), "{stdout}");
    let (observer, most) = sampling.await.unwrap();
    assert!(most <= 4, "{most} server connections for a pool of 4");
    // TPC-B-like consistency: every change to an account is in the history, once.
    let row = observer
        .query_one(
            "SELECT (SELECT sum(delta) FROM pgbench_history)::bigint,
                    (SELECT sum(abalance) FROM pgbench_accounts)::bigint,
                    (SELECT sum(bbalance) FROM pgbench_branches)::bigint,
                    (SELECT count(*) FROM pgbench_history)",
            &[],
        )
        .await
        .unwrap();
    let (delta, accounts, branches, history): (i64, i64, i64, i64) = (row.get(0), row.get(1), row.get(2), row.get(3));
    assert!(history > 0);
    assert_eq!(delta, accounts);
    assert_eq!(delta, branches);
    proxy.shutdown().await;
}
