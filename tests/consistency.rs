//! End-to-end, on a real primary and a replica made to lag: read-your-writes by WAL
//! position (session and causal), lag-aware routing, and failover to a promoted replica.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is a failed test

mod common;

use std::time::{Duration, Instant};

use common::{Proxy, first_value, wait_until};
use pgrelay::localpg::{ClusterOptions, LocalCluster};

async fn cluster_with_delay(delay: Option<Duration>) -> LocalCluster {
    tokio::task::spawn_blocking(move || {
        LocalCluster::new(ClusterOptions {
            replica_apply_delay: delay,
            setup_sql: vec![
                "\\c app".to_owned(),
                "CREATE TABLE rw (id serial PRIMARY KEY, v int)".to_owned(),
                "CREATE TABLE untouched (id int)".to_owned(),
                "GRANT ALL ON rw, untouched TO PUBLIC".to_owned(),
                "GRANT ALL ON SEQUENCE rw_id_seq TO PUBLIC".to_owned(),
            ],
            ..ClusterOptions::default()
        })
    })
    .await
    .unwrap()
    .unwrap()
}

fn config(cluster: &LocalCluster, routing: &str) -> String {
    format!(
        "[server]\nlisten = \"LISTEN\"\nmetrics_listen = \"\"\n\n[pool]\nsize = 4\n\n[[users]]\nname = \"app\"\npassword = \"app\"\n\n[databases.app]\nprimary = \"{}\"\nreplicas = [\"{}\"]\n\n[databases.app.routing]\n{routing}\n",
        cluster.primary().addr(),
        cluster.replicas()[0].addr()
    )
}

async fn on_replica(client: &tokio_postgres::Client) -> bool {
    first_value(&client.simple_query("SELECT pg_is_in_recovery()").await.unwrap()) == "t"
}

/// Inserts a row and reads it back at once, `rounds` times; returns how many reads
/// missed the write.
async fn write_then_read(client: &tokio_postgres::Client, rounds: usize) -> usize {
    let mut stale = 0;
    for _ in 0..rounds {
        let id = first_value(
            &client
                .simple_query("INSERT INTO rw (v) VALUES (1) RETURNING id")
                .await
                .unwrap(),
        );
        let found = first_value(
            &client
                .simple_query(&format!("SELECT count(*) FROM rw WHERE id = {id}"))
                .await
                .unwrap(),
        );
        if found != "1" {
            stale += 1;
        }
    }
    stale
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reads_its_own_writes_under_session_consistency_and_not_under_eventual() {
    let cluster = cluster_with_delay(Some(Duration::from_millis(500))).await;
    let session = Proxy::start(&config(&cluster, "consistency = \"session\"")).await;
    let writer = session.app().await;
    let bystander = session.app().await;
    assert!(
        on_replica(&bystander).await,
        "a client that has not written reads from the replica"
    );
    assert_eq!(
        write_then_read(&writer, 200).await,
        0,
        "session consistency missed a write"
    );
    assert!(
        on_replica(&bystander).await,
        "another client's writes do not fence this client"
    );
    // Once the replica has replayed the writer's last commit, its reads go back there.
    wait_until(
        "the writer reads from the replica again",
        Duration::from_secs(15),
        || {
            let writer = &writer;
            async move { on_replica(writer).await }
        },
    )
    .await;
    session.shutdown().await;

    // Proof that the test can fail: the same pairs under eventual consistency.
    let eventual = Proxy::start(&config(&cluster, "consistency = \"eventual\"")).await;
    let writer = eventual.app().await;
    assert!(
        write_then_read(&writer, 200).await > 0,
        "eventual consistency never read stale data"
    );
    eventual.shutdown().await;
    tokio::task::spawn_blocking(move || cluster.shutdown())
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn causal_consistency_fences_the_tables_written_through_pgrelay() {
    let cluster = cluster_with_delay(Some(Duration::from_millis(500))).await;
    let proxy = Proxy::start(&config(&cluster, "consistency = \"causal\"")).await;
    let writer = proxy.app().await;
    let reader = proxy.app().await;
    for _ in 0..200 {
        let id = first_value(
            &writer
                .simple_query("INSERT INTO rw (v) VALUES (2) RETURNING id")
                .await
                .unwrap(),
        );
        let found = first_value(
            &reader
                .simple_query(&format!("SELECT count(*) FROM rw WHERE id = {id}"))
                .await
                .unwrap(),
        );
        assert_eq!(found, "1", "another client's committed write was not visible");
        // The same table, named with its schema.
        let found = first_value(
            &reader
                .simple_query(&format!("SELECT count(*) FROM public.rw WHERE id = {id}"))
                .await
                .unwrap(),
        );
        assert_eq!(found, "1", "a schema-qualified read missed the write");
    }
    // A table nobody wrote is still read from the replica.
    let rows = reader
        .simple_query("SELECT pg_is_in_recovery(), count(*) FROM untouched")
        .await
        .unwrap();
    assert_eq!(first_value(&rows), "t");
    proxy.shutdown().await;
    tokio::task::spawn_blocking(move || cluster.shutdown())
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_replica_gets_no_reads_until_it_catches_up() {
    let cluster = std::sync::Arc::new(cluster_with_delay(None).await);
    let proxy = Proxy::start(&config(
        &cluster,
        "consistency = \"eventual\"\nmax_replica_lag = \"1s\"\nhealth_check_interval = \"200ms\"",
    ))
    .await;
    let reader = proxy.app().await;
    assert!(on_replica(&reader).await);
    let delayed = cluster.clone();
    tokio::task::spawn_blocking(move || delayed.set_apply_delay(&delayed.replicas()[0], Some(Duration::from_secs(5))))
        .await
        .unwrap()
        .unwrap();
    // Lag only shows while there is WAL to replay: keep writing on the primary.
    let primary = common::direct(&cluster.primary().addr(), "app").await;
    let writing = tokio::spawn(async move {
        for _ in 0..600 {
            let _ = primary.simple_query("INSERT INTO rw (v) VALUES (3)").await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    wait_until("reads leave the lagging replica", Duration::from_secs(15), || {
        let reader = &reader;
        async move { !on_replica(reader).await }
    })
    .await;
    let relieved = cluster.clone();
    tokio::task::spawn_blocking(move || relieved.set_apply_delay(&relieved.replicas()[0], None))
        .await
        .unwrap()
        .unwrap();
    wait_until("reads return to the replica", Duration::from_secs(15), || {
        let reader = &reader;
        async move { on_replica(reader).await }
    })
    .await;
    writing.abort();
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_follow_a_promoted_replica_without_a_config_change() {
    let cluster = std::sync::Arc::new(cluster_with_delay(None).await);
    let interval = Duration::from_secs(1);
    let proxy = Proxy::start(&config(&cluster, "health_check_interval = \"1s\"")).await;
    let client = proxy.app().await;
    client.simple_query("INSERT INTO rw (v) VALUES (4)").await.unwrap();
    let failing = cluster.clone();
    tokio::task::spawn_blocking(move || {
        failing.stop(failing.primary()).unwrap();
        failing.promote(&failing.replicas()[0]).unwrap();
    })
    .await
    .unwrap();
    let promoted = Instant::now();
    loop {
        let result = client
            .simple_query("INSERT INTO rw (v) VALUES (5) RETURNING pg_is_in_recovery()")
            .await;
        let error = match result {
            Ok(rows) => {
                assert_eq!(first_value(&rows), "f");
                break;
            }
            Err(error) => error,
        };
        assert!(
            promoted.elapsed() < interval * 3,
            "writes did not reach the promoted replica within 3 health-check intervals: {error:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A new client is served by the new primary too.
    let fresh = proxy.app().await;
    fresh.simple_query("INSERT INTO rw (v) VALUES (6)").await.unwrap();
    proxy.shutdown().await;
}
