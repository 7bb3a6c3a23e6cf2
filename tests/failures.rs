//! End-to-end: servers that die, clients that vanish, servers that cannot be reached,
//! and cancel requests. Each ends with a clear error for the one client concerned while
//! everyone else goes on being served.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is a failed test

mod common;

use std::time::{Duration, Instant};

use common::{Proxy, config_for, direct, first_value, shared_cluster, sqlstate, wait_until};
use tokio_postgres::NoTls;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_dying_mid_transaction_aborts_only_that_transaction() {
    let cluster = shared_cluster();
    let proxy = Proxy::start(&config_for(cluster, "size = 2")).await;
    let observer = direct(&cluster.primary().addr(), "app").await;
    let victim = proxy.app().await;
    let bystander = proxy.app().await;
    victim.simple_query("BEGIN").await.unwrap();
    victim
        .simple_query("INSERT INTO items (owner, value) VALUES ('lost-in-crash', 1)")
        .await
        .unwrap();
    let pid: i32 = first_value(&victim.simple_query("SELECT pg_backend_pid()").await.unwrap())
        .parse()
        .unwrap();
    observer
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();

    // The server's own reason, as a direct connection would have shown it.
    let error = victim.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&error), "57P01", "{error:?}");
    // Like after any error in a transaction block: refused until the block ends.
    let error = victim.simple_query("SELECT 2").await.unwrap_err();
    assert_eq!(sqlstate(&error), "25P02", "{error:?}");
    victim.simple_query("ROLLBACK").await.unwrap();
    assert_eq!(first_value(&victim.simple_query("SELECT 3").await.unwrap()), "3");
    assert_eq!(first_value(&bystander.simple_query("SELECT 4").await.unwrap()), "4");
    let lost: i64 = observer
        .query_one("SELECT count(*) FROM items WHERE owner = 'lost-in-crash'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(lost, 0);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_mid_transaction_leaves_nothing_behind() {
    let cluster = shared_cluster();
    let proxy = Proxy::start(&config_for(cluster, "size = 1")).await;
    let observer = direct(&cluster.primary().addr(), "app").await;
    let leaver = proxy.connect("app_count", "app_count", "app").await.unwrap();
    leaver.simple_query("BEGIN").await.unwrap();
    leaver
        .simple_query("INSERT INTO items (owner, value) VALUES ('left-mid-transaction', 1)")
        .await
        .unwrap();
    let pid = first_value(&leaver.simple_query("SELECT pg_backend_pid()").await.unwrap());
    drop(leaver);
    wait_until("the server is idle again", Duration::from_secs(10), || {
        let observer = &observer;
        async move {
            let idle_in_transaction: i64 = observer
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app_count' AND state <> 'idle'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            idle_in_transaction == 0
        }
    })
    .await;
    let next = proxy.connect("app_count", "app_count", "app").await.unwrap();
    let rows = next
        .simple_query("SELECT count(*) FROM items WHERE owner = 'left-mid-transaction'")
        .await
        .unwrap();
    assert_eq!(first_value(&rows), "0");
    // Not in the departed client's transaction: a new one starts at this statement.
    let rows = next
        .simple_query("SELECT txid_current_if_assigned() IS NULL")
        .await
        .unwrap();
    assert_eq!(first_value(&rows), "t");
    let next_pid = first_value(&next.simple_query("SELECT pg_backend_pid()").await.unwrap());
    assert_eq!(pid, next_pid, "the rolled-back server was reused");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_gives_08006() {
    let cluster = shared_cluster();
    // A port nothing listens on: the connection is refused at once.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_addr = closed.local_addr().unwrap();
    drop(closed);
    // A port that accepts TCP but never answers: only server_connect_timeout ends it.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let config = format!(
        "{}\n[databases.refused]\nprimary = \"{closed_addr}\"\n\n[databases.silent]\nprimary = \"{silent_addr}\"\nserver_connect_timeout = \"500ms\"\n",
        config_for(cluster, "size = 2")
    );
    let proxy = Proxy::start(&config).await;
    let error = proxy.connect("app", "app", "refused").await.unwrap_err();
    assert_eq!(sqlstate(&error), "08006", "{error:?}");
    let started = Instant::now();
    let error = proxy.connect("app", "app", "silent").await.unwrap_err();
    assert_eq!(sqlstate(&error), "08006", "{error:?}");
    assert!(common::message(&error).contains("server_connect_timeout"), "{error:?}");
    assert!(started.elapsed() >= Duration::from_millis(450));
    // Everyone else is still served.
    let client = proxy.app().await;
    client.simple_query("SELECT 1").await.unwrap();
    drop(silent);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_request_cancels_that_clients_query_and_nothing_else() {
    let cluster = shared_cluster();
    let proxy = Proxy::start(&config_for(cluster, "size = 4")).await;
    let sleeper = proxy.app().await;
    let bystander = proxy.app().await;
    let cancel = sleeper.cancel_token();
    let long = tokio::spawn(async move { sleeper.simple_query("SELECT pg_sleep(30)").await });
    let other = tokio::spawn(async move { bystander.simple_query("SELECT pg_sleep(1.5), 'done'").await });
    let observer = direct(&cluster.primary().addr(), "app").await;
    wait_until("the long query runs", Duration::from_secs(10), || {
        let observer = &observer;
        async move {
            let running: i64 = observer
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            running == 1
        }
    })
    .await;
    let started = Instant::now();
    cancel.cancel_query(NoTls).await.unwrap();
    let error = tokio::time::timeout(Duration::from_secs(10), long)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert_eq!(sqlstate(&error), "57014", "{error:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    let rows = tokio::time::timeout(Duration::from_secs(10), other)
        .await
        .unwrap()
        .unwrap();
    let rows = rows.expect("the other client's query was not cancelled");
    assert!(
        rows.iter().any(
            |message| matches!(message, tokio_postgres::SimpleQueryMessage::Row(row) if row.get(1) == Some("done"))
        )
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_while_waiting_for_a_server_ends_the_wait() {
    let cluster = shared_cluster();
    let proxy = Proxy::start(&config_for(cluster, "size = 1\nquery_wait_timeout = \"0\"")).await;
    let holder = proxy.app().await;
    let waiter = proxy.app().await;
    holder.simple_query("BEGIN").await.unwrap();
    let cancel = waiter.cancel_token();
    let waiting = tokio::spawn(async move {
        let result = waiter.simple_query("SELECT 1").await;
        (waiter, result)
    });
    let database = proxy.running().shared().snapshot().database("app").unwrap();
    wait_until("the waiter is queued", Duration::from_secs(10), || {
        let waiting: usize = database
            .all_pools()
            .iter()
            .map(|(_, pools)| pools.hosts[0].status().waiting)
            .sum();
        async move { waiting == 1 }
    })
    .await;
    cancel.cancel_query(NoTls).await.unwrap();
    let (waiter, result) = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(sqlstate(&result.unwrap_err()), "57014");
    holder.simple_query("COMMIT").await.unwrap();
    assert_eq!(first_value(&waiter.simple_query("SELECT 5").await.unwrap()), "5");
    proxy.shutdown().await;
}
