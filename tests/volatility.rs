//! End-to-end: function volatility read from the catalog. A PL/pgSQL function that inserts,
//! marked neither way (so `VOLATILE`), runs on the primary wherever it is called, with no
//! `write_functions`; a `STABLE` function stays on the replica. Where each call ran is read on
//! the servers themselves: the volatile one leaves a row that only the primary can have
//! written, the stable one returns `pg_is_in_recovery()` of the server it ran on.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is a failed test

mod common;

use std::time::Duration;

use common::{Proxy, config_with_replica, direct, first_value, shared_cluster, sqlstate, wait_until};

const SETUP: &str = "CREATE SCHEMA IF NOT EXISTS vol;
GRANT ALL ON SCHEMA vol TO PUBLIC;
CREATE TABLE IF NOT EXISTS vol.events (note text);
GRANT ALL ON vol.events TO PUBLIC;
CREATE OR REPLACE FUNCTION vol.log_event(note text) RETURNS int LANGUAGE plpgsql AS
  $$BEGIN INSERT INTO vol.events VALUES (note); RETURN 1; END$$;
CREATE OR REPLACE FUNCTION vol.where_am_i() RETURNS bool LANGUAGE sql STABLE AS
  'SELECT pg_is_in_recovery()';";

/// Creates the schema once for every test of this binary (concurrent `CREATE OR REPLACE`
/// of one function can fail with "tuple concurrently updated").
async fn setup(primary: &tokio_postgres::Client, replica: &tokio_postgres::Client) {
    static DONE: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    DONE.get_or_init(|| async { primary.batch_execute(SETUP).await.unwrap() })
        .await;
    replayed(replica).await;
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
            .query_opt("SELECT 1 FROM pg_proc WHERE proname = 'where_am_i'", &[])
            .await
            .is_ok_and(|row| row.is_some())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volatile_calls_run_on_the_primary_and_stable_ones_on_the_replica() {
    let cluster = shared_cluster();
    let primary = direct(&cluster.primary().addr(), "app").await;
    let replica = direct(&cluster.replicas()[0].addr(), "app").await;
    setup(&primary, &replica).await;
    // Without the retry of refusals, a call succeeds only if pgrelay sent it to the primary
    // by itself.
    let proxy = Proxy::start(&config_with_replica(cluster, "size = 3", NO_RETRY)).await;
    let client = proxy.app().await;
    // Until the catalog is read, the call goes to the replica and is refused there.
    wait_until("the catalog is read", Duration::from_secs(30), || async {
        client.simple_query("SELECT vol.log_event('probe')").await.is_ok()
    })
    .await;

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
async fn a_function_created_through_pgrelay_is_known_after_the_ddl() {
    let cluster = shared_cluster();
    let primary = direct(&cluster.primary().addr(), "app").await;
    let replica = direct(&cluster.replicas()[0].addr(), "app").await;
    setup(&primary, &replica).await;
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
    let cluster = shared_cluster();
    let primary = direct(&cluster.primary().addr(), "app").await;
    let replica = direct(&cluster.replicas()[0].addr(), "app").await;
    setup(&primary, &replica).await;
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
    proxy
        .running()
        .shared()
        .metrics
        .gather()
        .iter()
        .filter(|family| family.name() == "pgrelay_routing_decisions_total")
        .flat_map(|family| family.get_metric().iter())
        .filter(|metric| {
            let label = |name: &str| {
                metric
                    .get_label()
                    .iter()
                    .find(|l| l.name() == name)
                    .map(|l| l.value().to_owned())
            };
            label("reason").as_deref() == Some("replica_refused") && label("database").as_deref() == Some("app")
        })
        .map(|metric| metric.get_counter().get_value())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_catalog_a_refusal_is_run_again_on_the_primary_once() {
    let cluster = shared_cluster();
    let primary = direct(&cluster.primary().addr(), "app").await;
    let replica = direct(&cluster.replicas()[0].addr(), "app").await;
    setup(&primary, &replica).await;
    let proxy = Proxy::start(&config_with_replica(
        cluster,
        "size = 3",
        "consistency = \"eventual\"\nfunction_volatility = \"lists\"",
    ))
    .await;
    let client = proxy.app().await;
    let calls = [
        "SELECT vol.log_event('refused-select-list')",
        "SELECT 1 WHERE vol.log_event('refused-where') = 1",
        "SELECT * FROM vol.log_event('refused-from')",
        "SELECT \"vol\".\"log_event\"('refused-quoted')",
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
        .query_typed("SELECT vol.log_event('refused-extended')", &[])
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
    // A read that the replica answers is not affected.
    assert_eq!(
        first_value(&client.simple_query("SELECT vol.where_am_i()").await.unwrap()),
        "t"
    );
    proxy.shutdown().await;
}
