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
    config_with_primary(cluster, &cluster.primary().addr(), routing)
}

/// The config with the primary reached at `primary` (a relay to it).
fn config_with_primary(cluster: &LocalCluster, primary: &str, routing: &str) -> String {
    format!(
        "[server]\nlisten = \"LISTEN\"\nmetrics_listen = \"\"\n\n[pool]\nsize = 4\n\n[[users]]\nname = \"app\"\npassword = \"app\"\n\n[databases.app]\nprimary = \"{primary}\"\nreplicas = [\"{}\"]\n\n[databases.app.routing]\n{routing}\n",
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

/// The query pgrelay asks the primary's WAL position with.
const FENCE: &[u8] = b"pg_current_wal_insert_lsn()";

/// Among the writes pgrelay made to the primary: how many carried a fence query on its own
/// (a round trip of its own), and how many carried one behind a statement of the client's.
fn fence_writes(recorded: &[Vec<u8>]) -> (usize, usize) {
    let mut alone = 0;
    let mut behind = 0;
    for write in recorded {
        let Some(at) = write.windows(FENCE.len()).position(|window| window == FENCE) else {
            continue;
        };
        // The fence query is `Q`, a length, then `SELECT pg_catalog.` before the function.
        if at == 5 + "SELECT pg_catalog.".len() {
            alone += 1;
        } else {
            behind += 1;
        }
    }
    (alone, behind)
}

/// Whether the row `id` of `rw` is visible to `client` right now.
async fn sees(client: &tokio_postgres::Client, id: &str) -> bool {
    let rows = client
        .simple_query(&format!("SELECT count(*) FROM rw WHERE id = {id}"))
        .await
        .unwrap();
    first_value(&rows) == "1"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_commit_position_travels_with_the_commit_and_every_shape_of_write_is_read_back() {
    let cluster = cluster_with_delay(Some(Duration::from_millis(500))).await;
    let relay = common::relay::Relay::start(&cluster.primary().addr()).await;
    let proxy = Proxy::start(&config_with_primary(
        &cluster,
        &relay.addr.to_string(),
        "consistency = \"session\"",
    ))
    .await;
    let writer = proxy.app().await;
    let insert = writer
        .prepare("INSERT INTO rw (v) VALUES ($1) RETURNING id")
        .await
        .unwrap();
    relay.record();
    for round in 0..10 {
        // An autocommit statement, simple protocol.
        let id = first_value(
            &writer
                .simple_query("INSERT INTO rw (v) VALUES (10) RETURNING id")
                .await
                .unwrap(),
        );
        assert!(
            sees(&writer, &id).await,
            "round {round}: simple autocommit write missed"
        );
        // The same through a prepared statement (extended protocol).
        let id: i32 = writer.query_one(&insert, &[&11]).await.unwrap().get(0);
        assert!(
            sees(&writer, &id.to_string()).await,
            "round {round}: extended write missed"
        );
        // A transaction whose COMMIT comes on its own.
        writer.simple_query("BEGIN").await.unwrap();
        let id = first_value(
            &writer
                .simple_query("INSERT INTO rw (v) VALUES (12) RETURNING id")
                .await
                .unwrap(),
        );
        writer.simple_query("COMMIT").await.unwrap();
        assert!(sees(&writer, &id).await, "round {round}: write of a transaction missed");
    }
    let (alone, behind) = fence_writes(&relay.recorded());
    assert_eq!(
        (alone, behind),
        (0, 30),
        "every commit position is asked for in the same write as the commit"
    );

    // Where the end of the transaction cannot be told in advance, the position is asked
    // for after the fact, and reads still see the writes.
    relay.record();
    // Two writes pipelined on one connection: the second is sent before the first is
    // answered.
    let (first, second) = tokio::join!(writer.query_one(&insert, &[&13]), writer.query_one(&insert, &[&14]));
    let (first, second): (i32, i32) = (first.unwrap().get(0), second.unwrap().get(0));
    assert!(sees(&writer, &first.to_string()).await && sees(&writer, &second.to_string()).await);
    // A write and a BEGIN in one query: the transaction stays open.
    writer
        .simple_query("INSERT INTO rw (v) VALUES (15); BEGIN")
        .await
        .unwrap();
    let id = first_value(
        &writer
            .simple_query("INSERT INTO rw (v) VALUES (16) RETURNING id")
            .await
            .unwrap(),
    );
    writer.simple_query("COMMIT").await.unwrap();
    assert!(sees(&writer, &id).await, "the write after an unforeseen BEGIN missed");
    // A COMMIT of a failed transaction rolls back: nothing to see, nothing stuck.
    writer.simple_query("BEGIN").await.unwrap();
    writer.simple_query("INSERT INTO rw (v) VALUES (17)").await.unwrap();
    writer.simple_query("SELECT 1/0").await.unwrap_err();
    let rows = writer.simple_query("COMMIT").await.unwrap();
    assert!(
        matches!(
            rows.last(),
            Some(tokio_postgres::SimpleQueryMessage::CommandComplete(_))
        ),
        "COMMIT of a failed transaction answered"
    );
    assert_eq!(
        write_then_read(&writer, 20).await,
        0,
        "writes missed after a failed COMMIT"
    );
    let (alone, _) = fence_writes(&relay.recorded());
    assert!(alone >= 1, "a position asked for after the fact goes on its own");

    proxy.shutdown().await;
    tokio::task::spawn_blocking(move || cluster.shutdown())
        .await
        .unwrap()
        .unwrap();
}

/// Batches whose end the statements cannot show: an extended-protocol write that fails,
/// followed by a simple query and only then a Sync; a write followed by a simple query
/// before the Sync (which ends the write's implicit transaction). Each is answered in full
/// (no ReadyForQuery withheld for ever), and a write that did commit is read back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsynced_and_failed_extended_batches_are_answered_and_read_back() {
    use common::raw::{Raw, bind, execute, parse, query, show, sync};
    let cluster = cluster_with_delay(Some(Duration::from_millis(500))).await;
    let config = config(&cluster, "consistency = \"session\"").replace(
        "[[users]]",
        "[[users]]\nname = \"app_trust\"\nauth = \"trust\"\n\n[[users]]",
    );
    let proxy = Proxy::start(&config).await;
    let mut raw = Raw::connect(&proxy).await;
    let within = Duration::from_secs(10);
    // A write that fails (no such column), then a Query, then the Sync.
    raw.send(&[
        parse("", "INSERT INTO rw (nope) VALUES (1)"),
        bind("", &[]),
        execute(),
        query("SELECT 1"),
        sync(),
    ])
    .await;
    let replies = tokio::time::timeout(within, raw.replies_until_ready(1))
        .await
        .expect("the failed batch is answered");
    assert_eq!(show(&replies), "E:42703 Z:I");
    // A write, then a Query before the Sync: the Query ends the implicit transaction.
    raw.send(&[
        parse("", "INSERT INTO rw (v) VALUES (20) RETURNING id"),
        bind("", &[]),
        execute(),
        query("SELECT 2"),
        sync(),
    ])
    .await;
    let replies = tokio::time::timeout(within, raw.replies_until_ready(2))
        .await
        .expect("the unsynced batch is answered");
    assert_eq!(show(&replies), "1 2 D C:INSERT 0 1 T D C:SELECT 1 Z:I Z:I");
    // Whatever was committed is seen by this client's next read.
    raw.send(&[query("SELECT count(*) FROM rw WHERE v = 20")]).await;
    let messages = tokio::time::timeout(within, raw.messages_until_ready())
        .await
        .expect("the read is answered");
    let row = messages
        .iter()
        .find(|(tag, _)| *tag == b'D')
        .map(|(_, body)| String::from_utf8_lossy(&body[6..]).into_owned());
    assert_eq!(row.as_deref(), Some("1"), "the write read back");
    proxy.shutdown().await;
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
