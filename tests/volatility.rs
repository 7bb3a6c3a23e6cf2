//! End-to-end: function volatility read from the catalog. A PL/pgSQL function that inserts,
//! marked neither way (so `VOLATILE`), runs on the primary wherever it is called, with no
//! `write_functions`; a `STABLE` function stays on the replica. Where each call ran is read on
//! the servers themselves, from `pg_stat_statements` on both (this binary's cluster loads it),
//! and from the rows only the primary can have written.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is a failed test

mod common;

use std::sync::OnceLock;
use std::time::Duration;

use common::{Proxy, config_with_replica, counter, direct, first_value, own_cluster, sqlstate, wait_until};
use pgrelay::localpg::{ClusterOptions, LocalCluster};

const SETUP: &str = "CREATE SCHEMA IF NOT EXISTS vol;
GRANT ALL ON SCHEMA vol TO PUBLIC;
CREATE TABLE IF NOT EXISTS vol.events (note text);
GRANT ALL ON vol.events TO PUBLIC;
CREATE OR REPLACE FUNCTION vol.log_event(note text) RETURNS int LANGUAGE plpgsql AS
  $$BEGIN INSERT INTO vol.events VALUES (note); RETURN 1; END$$;
CREATE OR REPLACE FUNCTION vol.where_am_i() RETURNS bool LANGUAGE sql STABLE AS
  'SELECT pg_is_in_recovery()';
CREATE OR REPLACE FUNCTION vol.counted_event(note text) RETURNS int LANGUAGE plpgsql AS
  $$BEGIN INSERT INTO vol.events VALUES (note); RETURN 1; END$$;
CREATE OR REPLACE FUNCTION vol.counted_where() RETURNS bool LANGUAGE sql STABLE AS
  'SELECT pg_is_in_recovery()';
CREATE OR REPLACE FUNCTION vol.refused_event(note text) RETURNS int LANGUAGE plpgsql AS
  $$BEGIN INSERT INTO vol.events VALUES (note); RETURN 1; END$$;";

/// This binary's cluster: the standard one, with `pg_stat_statements` loaded on both servers
/// so that each can say which statements it ran, and a replica quick to cancel conflicting reads.
fn cluster() -> &'static LocalCluster {
    static CLUSTER: OnceLock<&'static LocalCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let preload = "shared_preload_libraries = 'pg_stat_statements'".to_owned();
        own_cluster(ClusterOptions {
            primary_conf: vec![preload.clone()],
            // A read that holds up WAL replay is cancelled at once (the recovery conflict test).
            replica_conf: vec![preload, "max_standby_streaming_delay = '100ms'".to_owned()],
            setup_sql: vec!["\\c app".to_owned(), "CREATE EXTENSION pg_stat_statements".to_owned()],
            ..ClusterOptions::default()
        })
    })
}

/// Creates the schema once for every test of this binary (concurrent `CREATE OR REPLACE`
/// of one function can fail with "tuple concurrently updated").
async fn setup(primary: &tokio_postgres::Client, replica: &tokio_postgres::Client) {
    static DONE: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    DONE.get_or_init(|| async { primary.batch_execute(SETUP).await.unwrap() })
        .await;
    replayed(replica).await;
}

/// This binary's cluster, direct connections to its primary and its replica, with the
/// schema in place on both.
async fn servers() -> (&'static LocalCluster, tokio_postgres::Client, tokio_postgres::Client) {
    let cluster = cluster();
    let primary = direct(&cluster.primary().addr(), "app").await;
    let replica = direct(&cluster.replicas()[0].addr(), "app").await;
    setup(&primary, &replica).await;
    (cluster, primary, replica)
}

/// pgrelay without the retry of refusals (so a call succeeds only if pgrelay sent it to the
/// primary by itself), and a client of it, once the catalog is read: until then a call of the
/// inserting function goes to the replica and is refused there.
async fn proxy_with_catalog(cluster: &LocalCluster) -> (Proxy, tokio_postgres::Client) {
    let proxy = Proxy::start(&config_with_replica(cluster, "size = 3", NO_RETRY)).await;
    let client = proxy.app().await;
    wait_until("the catalog is read", Duration::from_secs(30), || async {
        client.simple_query("SELECT vol.log_event('probe')").await.is_ok()
    })
    .await;
    (proxy, client)
}

/// Routing of the catalog tests: refusals are not run again, so that only the catalog can
/// send a call to the primary.
const NO_RETRY: &str = "consistency = \"eventual\"\nretry_refused_on_primary = false";

/// Notes the primary holds in `vol.events`.
async fn notes(primary: &tokio_postgres::Client) -> Vec<String> {
    primary
        .query("SELECT note FROM vol.events ORDER BY note", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// Waits until the replica has replayed the setup, so that a call sent there fails for being
/// a write and not for a missing function.
async fn replayed(replica: &tokio_postgres::Client) {
    wait_until("the replica knows the functions", Duration::from_secs(30), || async {
        replica
            .query_opt("SELECT 1 FROM pg_proc WHERE proname = 'refused_event'", &[])
            .await
            .is_ok_and(|row| row.is_some())
    })
    .await;
}

/// The statements a server completed that call `function`, as `pg_stat_statements` normalises
/// them (literals become `$1`), with how often each ran.
async fn ran_on(server: &tokio_postgres::Client, function: &str) -> Vec<(String, i64)> {
    server
        .query(
            "SELECT query, calls FROM pg_stat_statements \
             WHERE query LIKE 'SELECT %' || $1 || '%' AND query NOT LIKE '%pg_stat_statements%' ORDER BY query",
            &[&function],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

/// The runs of `statements` in all.
fn calls(statements: &[(String, i64)]) -> i64 {
    statements.iter().map(|(_, calls)| calls).sum()
}

/// How many statements that mention `text` the server's log shows as failed.
fn failed_in_log(node: &pgrelay::localpg::Node, text: &str) -> usize {
    std::fs::read_to_string(node.log_path())
        .unwrap_or_default()
        .lines()
        .filter(|line| line.contains("STATEMENT:") && line.contains(text))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volatile_calls_run_on_the_primary_and_stable_ones_on_the_replica() {
    let (cluster, primary, _) = servers().await;
    let (proxy, client) = proxy_with_catalog(cluster).await;

    let positions = ["select-list", "where", "from", "quoted"];
    for (sql, note) in [
        ("SELECT vol.log_event('select-list')", "select-list"),
        ("SELECT 1 WHERE vol.log_event('where') = 1", "where"),
        ("SELECT * FROM vol.log_event('from')", "from"),
        ("SELECT \"vol\".\"log_event\"('quoted')", "quoted"),
    ] {
        client
            .simple_query(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
        let rows = client
            .query_typed(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
        assert_eq!(rows.len(), 1, "{sql}");
        assert!(
            notes(&primary).await.contains(&note.to_owned()),
            "{sql} did not run on the primary"
        );
    }
    // Each ran twice (simple and extended protocol), on the primary.
    let ran = notes(&primary).await;
    assert_eq!(ran.iter().filter(|note| positions.contains(&note.as_str())).count(), 8);

    // A built-in that only a primary answers, with no configuration.
    client.simple_query("SELECT pg_current_wal_lsn()").await.unwrap();

    // The stable function answers from the server it ran on: the replica.
    for sql in [
        "SELECT vol.where_am_i()",
        "SELECT \"vol\".\"where_am_i\"() WHERE vol.where_am_i()",
        "SELECT * FROM vol.where_am_i()",
    ] {
        assert_eq!(first_value(&client.simple_query(sql).await.unwrap()), "t", "{sql}");
    }
    // And read-safe volatile built-ins stay reads.
    assert_eq!(
        first_value(
            &client
                .simple_query("SELECT pg_is_in_recovery() AND random() < 2 AND clock_timestamp() IS NOT NULL")
                .await
                .unwrap()
        ),
        "t"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_stat_statements_on_both_servers_shows_volatile_calls_on_the_primary_only() {
    let (cluster, primary, replica) = servers().await;
    let (proxy, client) = proxy_with_catalog(cluster).await;

    let volatile = [
        "SELECT vol.counted_event('counted-select-list')",
        "SELECT 1 WHERE vol.counted_event('counted-where') = 1",
        "SELECT * FROM vol.counted_event('counted-from')",
        "SELECT \"vol\".\"counted_event\"('counted-quoted')",
    ];
    let stable = [
        "SELECT vol.counted_where()",
        "SELECT 1 WHERE vol.counted_where()",
        "SELECT * FROM vol.counted_where()",
        "SELECT \"vol\".\"counted_where\"()",
    ];
    for sql in volatile.iter().chain(&stable) {
        client
            .simple_query(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
        client
            .query_typed(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    }

    // Each of the four volatile calls ran twice (simple and extended), all on the primary.
    // pg_stat_statements folds literals and quoting, so some of the eight runs share a line.
    let on_primary = ran_on(&primary, "counted_event").await;
    assert_eq!(calls(&on_primary), 8, "{on_primary:?}");
    assert_eq!(ran_on(&replica, "counted_event").await, vec![], "none on the replica");
    // The stable ones all on the replica.
    let on_replica = ran_on(&replica, "counted_where").await;
    assert_eq!(calls(&on_replica), 8, "{on_replica:?}");
    assert_eq!(ran_on(&primary, "counted_where").await, vec![], "none on the primary");
    println!("primary: {on_primary:?}\nreplica: {on_replica:?}");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_created_through_pgrelay_is_known_after_the_ddl() {
    let (cluster, primary, _) = servers().await;
    // Without the retry of refusals, a call succeeds only if pgrelay sent it to the primary
    // by itself.
    let proxy = Proxy::start(&config_with_replica(cluster, "size = 3", NO_RETRY)).await;
    let client = proxy.app().await;
    wait_until("the catalog is read", Duration::from_secs(30), || async {
        client.simple_query("SELECT vol.log_event('probe-ddl')").await.is_ok()
    })
    .await;
    client
        .batch_execute(
            "CREATE OR REPLACE FUNCTION vol.log_later(note text) RETURNS int LANGUAGE plpgsql AS \
             $$BEGIN INSERT INTO vol.events VALUES (note); RETURN 1; END$$",
        )
        .await
        .unwrap();
    // The DDL asks for a new read of the catalog: well before the periodic one.
    wait_until("the new function is known", Duration::from_secs(20), || async {
        client.simple_query("SELECT vol.log_later('after-ddl')").await.is_ok()
    })
    .await;
    assert!(notes(&primary).await.contains(&"after-ddl".to_owned()));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_lists_and_no_retry_an_unlisted_function_is_refused_by_the_replica() {
    let (cluster, primary, _) = servers().await;
    let proxy = Proxy::start(&config_with_replica(
        cluster,
        "size = 3",
        "consistency = \"eventual\"\nfunction_volatility = \"lists\"\nretry_refused_on_primary = false",
    ))
    .await;
    let client = proxy.app().await;
    let error = client
        .simple_query("SELECT vol.log_event('lists')")
        .await
        .expect_err("sent to the replica, which refuses the insert");
    assert_eq!(sqlstate(&error), "25006");
    assert!(!notes(&primary).await.contains(&"lists".to_owned()));
    proxy.shutdown().await;
}

/// `pgrelay_routing_decisions_total{reason="replica_refused"}` of database `app`.
fn refusals(proxy: &Proxy) -> f64 {
    counter(
        proxy,
        "pgrelay_routing_decisions_total",
        &[("reason", "replica_refused"), ("database", "app")],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_catalog_a_refusal_is_run_again_on_the_primary_once() {
    let (cluster, primary, replica) = servers().await;
    let proxy = Proxy::start(&config_with_replica(
        cluster,
        "size = 3",
        "consistency = \"eventual\"\nfunction_volatility = \"lists\"",
    ))
    .await;
    let client = proxy.app().await;
    let calls = [
        "SELECT vol.refused_event('refused-select-list')",
        "SELECT 1 WHERE vol.refused_event('refused-where') = 1",
        "SELECT * FROM vol.refused_event('refused-from')",
        "SELECT \"vol\".\"refused_event\"('refused-quoted')",
    ];
    for (i, sql) in calls.iter().enumerate() {
        // The first run is refused by the replica and run again on the primary; the second
        // goes to the primary at once.
        client
            .simple_query(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
        assert_eq!(refusals(&proxy), (i + 1) as f64, "{sql}: refused once");
        client
            .simple_query(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
        assert_eq!(
            refusals(&proxy),
            (i + 1) as f64,
            "{sql}: the second run went to the primary"
        );
    }
    // The extended protocol too, with a text not seen before.
    let rows = client
        .query_typed("SELECT vol.refused_event('refused-extended')", &[])
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(refusals(&proxy), 5.0);
    let ran = notes(&primary).await;
    for note in ["refused-select-list", "refused-where", "refused-from", "refused-quoted"] {
        assert_eq!(
            ran.iter().filter(|n| *n == note).count(),
            2,
            "{note} ran twice on the primary"
        );
    }
    assert_eq!(ran.iter().filter(|n| *n == "refused-extended").count(), 1);
    // The servers agree: the replica refused each statement once (its log names it), and
    // completed none; the primary completed every run, nine in all.
    let replica_node = &cluster.replicas()[0];
    for note in [
        "refused-select-list",
        "refused-where",
        "refused-from",
        "refused-quoted",
        "refused-extended",
    ] {
        wait_until(
            &format!("the replica logged its refusal of {note}"),
            Duration::from_secs(10),
            || async { failed_in_log(replica_node, note) >= 1 },
        )
        .await;
        assert_eq!(
            failed_in_log(replica_node, note),
            1,
            "{note} was refused once by the replica"
        );
    }
    assert_eq!(ran_on(&replica, "refused_event").await, vec![]);
    let on_primary = ran_on(&primary, "refused_event").await;
    assert_eq!(self::calls(&on_primary), 9, "{on_primary:?}");
    println!("primary: {on_primary:?}");
    // A read that the replica answers is not affected.
    assert_eq!(
        first_value(&client.simple_query("SELECT vol.where_am_i()").await.unwrap()),
        "t"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_the_replica_cancels_for_a_recovery_conflict_is_answered_by_the_primary() {
    let (cluster, primary, replica) = servers().await;
    primary
        .batch_execute(
            "CREATE TABLE vol.conflict (id int); GRANT ALL ON vol.conflict TO PUBLIC; \
             INSERT INTO vol.conflict VALUES (1), (2)",
        )
        .await
        .unwrap();
    wait_until("the replica has the table", Duration::from_secs(30), || async {
        replica
            .query_opt("SELECT 1 FROM vol.conflict LIMIT 1", &[])
            .await
            .is_ok()
    })
    .await;
    let proxy = Proxy::start(&config_with_replica(cluster, "size = 3", "consistency = \"eventual\"")).await;
    let client = proxy.app().await;
    // The read holds a lock on the table on the replica while it sleeps; nothing of its
    // answer exists before the sleep ends.
    let read = tokio::spawn(async move {
        let rows = client
            .simple_query("SELECT count(*) FROM vol.conflict, pg_sleep(3) AS conflicted")
            .await;
        rows.map(|rows| first_value(&rows))
    });
    wait_until("the read runs on the replica", Duration::from_secs(30), || async {
        replica
            .query_opt(
                "SELECT 1 FROM pg_stat_activity WHERE state = 'active' AND query LIKE '%AS conflicted'",
                &[],
            )
            .await
            .is_ok_and(|row| row.is_some())
    })
    .await;
    // The primary's TRUNCATE needs the replica to replay an exclusive lock on the table: the
    // replica cancels the read (40001, "conflict with recovery") after 100 ms.
    primary.batch_execute("TRUNCATE vol.conflict").await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .expect("the read is answered")
        .unwrap()
        .unwrap_or_else(|e| panic!("the client saw the replica's cancel: {e:?}"));
    // Run again on the primary, after the TRUNCATE: no rows.
    assert_eq!(answer, "0");
    assert_eq!(
        counter(
            &proxy,
            "pgrelay_retries_total",
            &[("reason", "recovery_conflict"), ("database", "app")]
        ),
        1.0
    );
    assert_eq!(refusals(&proxy), 1.0, "counted as the replica's refusal");
    let conflicts: i64 = replica
        .query_one(
            "SELECT confl_lock FROM pg_stat_database_conflicts WHERE datname = 'app'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(conflicts >= 1, "the replica counts the conflict");
    // Not remembered as a write: the same text runs on the replica next time, where nothing
    // holds up replay now.
    let again = proxy.app().await;
    let sql = "SELECT count(*) FROM vol.conflict, pg_sleep(3) AS conflicted";
    assert_eq!(first_value(&again.simple_query(sql).await.unwrap()), "0");
    assert_eq!(refusals(&proxy), 1.0);
    assert_eq!(
        calls(&ran_on(&replica, "conflicted").await),
        1,
        "the second run on the replica"
    );
    assert_eq!(
        calls(&ran_on(&primary, "conflicted").await),
        1,
        "the first run on the primary"
    );
    proxy.shutdown().await;
}
