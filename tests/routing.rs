//! End-to-end: reads go to the replica, writes and transactions to the primary, with
//! the real primary and streaming replica.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is a failed test

mod common;

use std::time::Duration;

use common::{Proxy, config_with_replica, direct, first_value, run_tool, shared_cluster};
use pgrelay::localpg::{ClusterOptions, LocalCluster};

async fn in_recovery(client: &tokio_postgres::Client, sql: &str) -> String {
    first_value(&client.simple_query(sql).await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_go_to_the_replica_and_writes_to_the_primary() {
    let cluster = shared_cluster();
    let proxy = Proxy::start(&config_with_replica(cluster, "size = 3", "consistency = \"eventual\"")).await;
    let client = proxy.app().await;
    assert_eq!(
        in_recovery(&client, "SELECT pg_is_in_recovery()").await,
        "t",
        "an autocommit read runs on the replica"
    );
    client.simple_query("BEGIN").await.unwrap();
    assert_eq!(
        in_recovery(&client, "SELECT pg_is_in_recovery()").await,
        "f",
        "a transaction runs on the primary"
    );
    client.simple_query("COMMIT").await.unwrap();
    assert_eq!(
        in_recovery(&client, "BEGIN READ ONLY; SELECT pg_is_in_recovery(); COMMIT").await,
        "t"
    );
    client.simple_query("BEGIN READ ONLY").await.unwrap();
    assert_eq!(
        in_recovery(&client, "SELECT pg_is_in_recovery()").await,
        "t",
        "READ ONLY transactions go to a replica"
    );
    client.simple_query("COMMIT").await.unwrap();
    assert_eq!(
        in_recovery(&client, "/* pgrelay: primary */ SELECT pg_is_in_recovery()").await,
        "f",
        "a hint overrides"
    );
    // Statements that would fail on a replica all succeed.
    for sql in [
        "INSERT INTO items (owner, value) VALUES ('routing', 1) RETURNING id",
        "WITH moved AS (UPDATE items SET value = value + 1 WHERE owner = 'routing' RETURNING id) SELECT count(*) FROM moved",
        "SELECT nextval('items_id_seq')",
        "SELECT * FROM items WHERE owner = 'routing' FOR UPDATE",
        "SELECT * FROM items WHERE owner = 'routing' FOR NO KEY UPDATE",
        "SELECT pg_advisory_xact_lock(42)",
        "DELETE FROM items WHERE owner = 'routing'",
    ] {
        client
            .simple_query(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    }
    // The extended protocol and prepared statements are routed the same way.
    let rows = client.query_typed("SELECT pg_is_in_recovery()", &[]).await.unwrap();
    assert!(rows[0].get::<_, bool>(0));
    let statement = client.prepare("SELECT pg_is_in_recovery()").await.unwrap();
    assert!(client.query_one(&statement, &[]).await.unwrap().get::<_, bool>(0));
    let insert = client
        .prepare("INSERT INTO items (owner, value) VALUES ('routing-prepared', $1) RETURNING value")
        .await
        .unwrap();
    assert_eq!(client.query_one(&insert, &[&5i32]).await.unwrap().get::<_, i32>(0), 5);
    client
        .simple_query("DELETE FROM items WHERE owner = 'routing-prepared'")
        .await
        .unwrap();
    // Pipelined: a read then a write sent before either is answered. The read runs on
    // the replica; the write must not follow it there.
    for _ in 0..10 {
        let (read, write) = tokio::join!(
            client.query_typed("SELECT pg_is_in_recovery()", &[]),
            client.query_typed(
                "INSERT INTO items (owner, value) VALUES ('pipelined', 1) RETURNING value",
                &[]
            ),
        );
        assert!(read.unwrap()[0].get::<_, bool>(0));
        assert_eq!(write.unwrap()[0].get::<_, i32>(0), 1);
    }
    client
        .simple_query("DELETE FROM items WHERE owner = 'pipelined'")
        .await
        .unwrap();
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_statement_transactions_follow_their_first_statement() {
    let cluster = shared_cluster();
    let proxy = Proxy::start(&config_with_replica(
        cluster,
        "size = 2",
        "consistency = \"eventual\"\ntransactions = \"first_statement\"",
    ))
    .await;
    let client = proxy.app().await;
    client.simple_query("BEGIN").await.unwrap();
    assert_eq!(in_recovery(&client, "SELECT pg_is_in_recovery()").await, "t");
    client.simple_query("COMMIT").await.unwrap();
    client.simple_query("BEGIN").await.unwrap();
    client
        .simple_query("INSERT INTO items (owner, value) VALUES ('first-statement', 1)")
        .await
        .unwrap();
    assert_eq!(in_recovery(&client, "SELECT pg_is_in_recovery()").await, "f");
    client.simple_query("ROLLBACK").await.unwrap();
    // An empty transaction never needs a server.
    client.simple_query("BEGIN").await.unwrap();
    client.simple_query("COMMIT").await.unwrap();
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_transaction_read_only_as_the_first_statement_sends_the_transaction_to_a_replica() {
    let cluster = shared_cluster();
    // The default `transactions = "primary"`: only a read-only transaction leaves the primary.
    let proxy = Proxy::start(&config_with_replica(cluster, "size = 2", "consistency = \"eventual\"")).await;
    let client = proxy.app().await;
    for begin in ["BEGIN", "START TRANSACTION", "BEGIN ISOLATION LEVEL REPEATABLE READ"] {
        client.simple_query(begin).await.unwrap();
        client.simple_query("SET TRANSACTION READ ONLY").await.unwrap();
        assert_eq!(in_recovery(&client, "SELECT pg_is_in_recovery()").await, "t", "{begin}");
        assert_eq!(
            in_recovery(&client, "SHOW transaction_read_only").await,
            "on",
            "{begin}: the server ran the SET TRANSACTION"
        );
        client.simple_query("COMMIT").await.unwrap();
    }
    // A write in it fails as it would on the primary, and the client ends the block as usual.
    client.simple_query("BEGIN").await.unwrap();
    client.simple_query("SET TRANSACTION READ ONLY").await.unwrap();
    let error = client
        .simple_query("INSERT INTO items (owner, value) VALUES ('set-tx-ro', 1)")
        .await
        .unwrap_err();
    assert_eq!(error.code().map(|code| code.code()), Some("25006"));
    client.simple_query("ROLLBACK").await.unwrap();
    // Any other first statement keeps the transaction on the primary, a read included.
    client.simple_query("BEGIN").await.unwrap();
    assert_eq!(in_recovery(&client, "SELECT pg_is_in_recovery()").await, "f");
    client.simple_query("COMMIT").await.unwrap();
    client.simple_query("BEGIN").await.unwrap();
    client.simple_query("SET TRANSACTION READ WRITE").await.unwrap();
    assert_eq!(in_recovery(&client, "SELECT pg_is_in_recovery()").await, "f");
    client.simple_query("COMMIT").await.unwrap();
    // SERIALIZABLE is refused by a hot standby: it stays on the primary even when READ ONLY.
    client.simple_query("BEGIN").await.unwrap();
    client
        .simple_query("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE READ ONLY")
        .await
        .unwrap();
    assert_eq!(in_recovery(&client, "SELECT pg_is_in_recovery()").await, "f");
    client.simple_query("COMMIT").await.unwrap();
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_only_alias_and_a_switched_off_split() {
    let cluster = shared_cluster();
    let replica = cluster.replicas()[0].addr();
    let config = format!(
        "{}\n[databases.app_ro]\ndbname = \"app\"\nprimary = \"{}\"\nreplicas = [\"{replica}\"]\nrouting = {{ target = \"replica\", max_replica_lag = \"0\" }}\n\n[databases.app_rw]\ndbname = \"app\"\nprimary = \"{}\"\nreplicas = [\"{replica}\"]\nrouting = {{ read_write_split = false }}\n",
        common::config_for(cluster, "size = 2"),
        cluster.primary().addr(),
        cluster.primary().addr(),
    );
    let proxy = Proxy::start(&config).await;
    let ro = proxy.connect("app", "app", "app_ro").await.unwrap();
    assert_eq!(in_recovery(&ro, "BEGIN; SELECT pg_is_in_recovery(); COMMIT").await, "t");
    let rw = proxy.connect("app", "app", "app_rw").await.unwrap();
    assert_eq!(in_recovery(&rw, "SELECT pg_is_in_recovery()").await, "f");
    proxy.shutdown().await;
}

async fn commits(client: &tokio_postgres::Client) -> i64 {
    client
        .query_one("SELECT xact_commit FROM pg_stat_database WHERE datname = 'other'", &[])
        .await
        .unwrap()
        .get::<_, i64>(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_select_only_runs_on_the_replica_and_tpcb_on_the_primary() {
    let cluster = shared_cluster();
    let proxy = Proxy::start(&config_with_replica(cluster, "size = 5", "consistency = \"eventual\"")).await;
    let primary = direct(&cluster.primary().addr(), "postgres").await;
    let replica = direct(&cluster.replicas()[0].addr(), "postgres").await;
    // pgbench's tables live in database "other" (see the pooling tests); the select-only
    // script goes through a database entry of its own.
    let config = format!(
        "{}\n[databases.bench]\ndbname = \"other\"\nprimary = \"{}\"\nreplicas = [\"{}\"]\nrouting = {{ consistency = \"eventual\", max_replica_lag = \"0\" }}\n",
        config_with_replica(cluster, "size = 5", "consistency = \"eventual\""),
        cluster.primary().addr(),
        cluster.replicas()[0].addr()
    );
    proxy.shutdown().await;
    let proxy = Proxy::start(&config).await;
    let port_bench = proxy.port().to_string();
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
            &port_bench,
            "-U",
            "app_bench",
            "bench",
        ],
        "",
    )
    .await;
    assert!(ok, "{stderr}");
    cluster
        .wait_replay(&cluster.replicas()[0], Duration::from_secs(30))
        .unwrap();
    // The stats collector publishes counters with a delay: compare before/after snapshots.
    let (primary_before, replica_before) = (commits(&primary).await, commits(&replica).await);
    let (ok, stdout, stderr) = run_tool(
        "pgbench",
        "app_bench",
        &[
            "-S",
            "-c",
            "20",
            "-j",
            "2",
            "-T",
            "3",
            "-h",
            "127.0.0.1",
            "-p",
            &port_bench,
            "-U",
            "app_bench",
            "bench",
        ],
        "",
    )
    .await;
    assert!(
        ok && stdout.contains("number of failed transactions: 0"),
        "{stdout}\n{stderr}"
    );
    let processed: i64 = stdout
        .lines()
        .find_map(|line| line.strip_prefix("number of transactions actually processed: "))
        .and_then(|n| n.split('/').next()?.trim().parse().ok())
        .unwrap();
    common::wait_until("the replica's counters catch up", Duration::from_secs(15), || {
        let replica = &replica;
        async move { commits(replica).await - replica_before >= processed * 9 / 10 }
    })
    .await;
    let primary_delta = commits(&primary).await - primary_before;
    assert!(
        primary_delta < processed / 10,
        "the primary ran {primary_delta} of {processed} read transactions"
    );
    let (ok, stdout, stderr) = run_tool(
        "pgbench",
        "app_bench",
        &[
            "-c",
            "20",
            "-j",
            "2",
            "-T",
            "3",
            "-h",
            "127.0.0.1",
            "-p",
            &port_bench,
            "-U",
            "app_bench",
            "bench",
        ],
        "",
    )
    .await;
    assert!(
        ok && stdout.contains("number of failed transactions: 0"),
        "{stdout}\n{stderr}"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_move_to_the_primary_when_the_replica_stops() {
    let cluster = tokio::task::spawn_blocking(|| LocalCluster::new(ClusterOptions::default()))
        .await
        .unwrap()
        .unwrap();
    let config = format!(
        "[server]\nlisten = \"LISTEN\"\nmetrics_listen = \"\"\n\n[pool]\nsize = 2\nserver_connect_timeout = \"1s\"\n\n[[users]]\nname = \"app\"\npassword = \"app\"\n\n[databases.app]\nprimary = \"{}\"\nreplicas = [\"{}\"]\nrouting = {{ consistency = \"eventual\", max_replica_lag = \"0\" }}\n\n[databases.app_ro]\ndbname = \"app\"\nprimary = \"{}\"\nreplicas = [\"{}\"]\nrouting = {{ target = \"replica\", max_replica_lag = \"0\" }}\n",
        cluster.primary().addr(),
        cluster.replicas()[0].addr(),
        cluster.primary().addr(),
        cluster.replicas()[0].addr()
    );
    let proxy = Proxy::start(&config).await;
    let client = proxy.app().await;
    assert_eq!(in_recovery(&client, "SELECT pg_is_in_recovery()").await, "t");
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.stop(&cluster.replicas()[0]).unwrap();
        cluster
    })
    .await
    .unwrap();
    // The idle replica connection is found dead, a new one is refused: the read goes to
    // the primary and the client sees no error, every time.
    for _ in 0..20 {
        assert_eq!(in_recovery(&client, "SELECT pg_is_in_recovery()").await, "f");
    }
    let other = proxy.app().await;
    assert_eq!(in_recovery(&other, "SELECT pg_is_in_recovery()").await, "f");
    // The read-only alias falls back to the primary for reads, and stays read-only.
    let read_only = proxy.connect("app", "app", "app_ro").await.unwrap();
    assert_eq!(in_recovery(&read_only, "SELECT pg_is_in_recovery()").await, "f");
    let error = read_only
        .simple_query("CREATE TABLE not_through_the_alias (a int)")
        .await
        .unwrap_err();
    assert_eq!(common::sqlstate(&error), "25006", "{error:?}");
    proxy.shutdown().await;
    tokio::task::spawn_blocking(move || cluster.shutdown())
        .await
        .unwrap()
        .unwrap();
}
