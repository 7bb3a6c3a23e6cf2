//! End-to-end: clients through pgrelay to a real PostgreSQL in the three pool modes.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is a failed test

mod common;

use std::time::Duration;

use common::{Proxy, backends, config_for, direct, shared_cluster, sqlstate, wait_until};
use tokio_postgres::SimpleQueryMessage;

fn first_value(messages: &[SimpleQueryMessage]) -> String {
    messages
        .iter()
        .find_map(|message| match message {
            SimpleQueryMessage::Row(row) => Some(row.get(0).unwrap_or("NULL").to_owned()),
            _ => None,
        })
        .expect("a row")
}

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
    let a = proxy.connect("app_md5", "app_md5", "app").await.unwrap();
    let b = proxy.connect("app_md5", "app_md5", "app").await.unwrap();
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
            .map(|(_, pools)| pools.primary.status().waiting)
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
    assert_eq!(backends(&observer, "app_md5").await, 1);
    proxy.shutdown().await;
}
