//! End-to-end, message by message: a client whose server connection is terminated in each
//! phase of the protocol gets an answer within a bound (ErrorResponse and ReadyForQuery,
//! or a FATAL where its session state is gone), a lost transaction is never reported as
//! committed, and the client goes on with a new server.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is a failed test

mod common;

use std::time::Duration;

use common::raw::{Raw, Reply, bind, copy_data, execute, flush, parse, query, show, sync};
use common::{Proxy, config_for, direct, shared_cluster};

/// Longest any answer may take after the server is gone.
const BOUND: Duration = Duration::from_secs(5);

async fn proxy() -> Proxy {
    Proxy::start_isolated(
        &config_for(
            shared_cluster(),
            "mode = \"transaction\"\nsize = 4\nquery_wait_timeout = \"5s\"",
        ),
        2,
    )
    .await
}

/// Ends the server sessions of the client named `name` (its application_name), as
/// `pg_terminate_backend` from outside does; waits until those sessions are gone (a new
/// one pgrelay opens for the client meanwhile may take the same name).
async fn terminate(name: &str) {
    let admin = direct(&shared_cluster().primary().addr(), "app").await;
    let ended: Vec<i32> = admin
        .query(
            // In the select list, evaluated for the matching rows only.
            "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            &[&name],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(!ended.is_empty(), "no server session of {name} to terminate");
    common::wait_until("the sessions are gone", BOUND, || {
        let admin = &admin;
        let ended = &ended;
        async move {
            let left: i64 = admin
                .query_one("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)", &[ended])
                .await
                .unwrap()
                .get(0);
            left == 0
        }
    })
    .await;
}

/// Replies up to and including the `count`-th ReadyForQuery, within BOUND.
async fn answer(raw: &mut Raw, count: usize) -> String {
    let replies = tokio::time::timeout(BOUND, raw.replies_until_ready(count))
        .await
        .expect("an answer within the bound");
    show(&replies)
}

/// Replies up to the first ErrorResponse, within BOUND.
async fn until_error(raw: &mut Raw) -> String {
    let replies = tokio::time::timeout(BOUND, raw.replies_until('E'))
        .await
        .expect("an error within the bound");
    show(&replies)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_in_a_transaction_the_commit_fails_and_nothing_was_written() {
    let proxy = proxy().await;
    let mut raw = Raw::connect_named(&proxy.addr.to_string(), "loss_idle_tx").await;
    raw.send(&[query("BEGIN")]).await;
    assert_eq!(answer(&mut raw, 1).await, "C:BEGIN Z:T");
    raw.send(&[query("INSERT INTO items (owner) VALUES ('loss_idle_tx')")])
        .await;
    assert_eq!(answer(&mut raw, 1).await, "C:INSERT 0 1 Z:T");
    terminate("loss_idle_tx").await;
    // COMMIT gets the server's reason, never a CommandComplete.
    raw.send(&[query("COMMIT")]).await;
    assert_eq!(answer(&mut raw, 1).await, "E:57P01 Z:E");
    raw.send(&[query("SELECT 1")]).await;
    assert_eq!(answer(&mut raw, 1).await, "E:25P02 Z:E");
    raw.send(&[query("ROLLBACK")]).await;
    assert_eq!(answer(&mut raw, 1).await, "C:ROLLBACK Z:I");
    raw.send(&[query("SELECT count(*) FROM items WHERE owner = 'loss_idle_tx'")])
        .await;
    assert_eq!(answer(&mut raw, 1).await, "T D C:SELECT 1 Z:I");
    let admin = direct(&shared_cluster().primary().addr(), "app").await;
    let written: i64 = admin
        .query_one("SELECT count(*) FROM items WHERE owner = 'loss_idle_tx'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(written, 0);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_of_a_lost_transaction_succeeds_with_a_warning() {
    let proxy = proxy().await;
    let mut raw = Raw::connect_named(&proxy.addr.to_string(), "loss_rollback").await;
    raw.send(&[query("BEGIN; SELECT 1")]).await;
    assert_eq!(answer(&mut raw, 1).await, "C:BEGIN T D C:SELECT 1 Z:T");
    terminate("loss_rollback").await;
    raw.send(&[query("ROLLBACK")]).await;
    assert_eq!(answer(&mut raw, 1).await, "N C:ROLLBACK Z:I");
    raw.send(&[query("SELECT 2")]).await;
    assert_eq!(answer(&mut raw, 1).await, "T D C:SELECT 1 Z:I");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn between_execute_and_sync_the_error_comes_at_once_and_the_sync_is_answered() {
    let proxy = proxy().await;
    let mut raw = Raw::connect_named(&proxy.addr.to_string(), "loss_unsynced").await;
    // Flush-only: the client waits for its rows without having sent Sync.
    raw.send(&[parse("", "SELECT pg_sleep(30)"), bind("", &[]), flush()])
        .await;
    assert_eq!(raw.next_reply().await, Reply::Other('1'));
    assert_eq!(raw.next_reply().await, Reply::Other('2'));
    raw.send(&[execute(), flush()]).await;
    terminate("loss_unsynced").await;
    assert_eq!(until_error(&mut raw).await, "E:57P01");
    raw.send(&[sync()]).await;
    assert_eq!(answer(&mut raw, 1).await, "Z:I");
    raw.send(&[query("SELECT 1")]).await;
    assert_eq!(answer(&mut raw, 1).await, "T D C:SELECT 1 Z:I");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mid_result_the_rows_so_far_then_an_error() {
    let proxy = proxy().await;
    let mut raw = Raw::connect_named(&proxy.addr.to_string(), "loss_mid_result").await;
    // A row larger than the server's send buffer (its first part is sent at once), then
    // a long pause: the server is lost in the pause. It sends the rest of what it had
    // before its FATAL, so the client gets the whole first row, then the error.
    raw.send(&[query(
        "SELECT CASE WHEN i = 2 THEN pg_sleep(30)::text ELSE repeat('x', 100000) END FROM generate_series(1, 3) i",
    )])
    .await;
    assert_eq!(raw.next_reply().await, Reply::Other('T'));
    common::wait_until("part of the first row arrived", BOUND, || {
        let stream = &raw.stream;
        async move {
            let mut peek = [0u8; 64];
            matches!(tokio::time::timeout(Duration::from_millis(50), stream.peek(&mut peek)).await, Ok(Ok(n)) if n > 0)
        }
    })
    .await;
    terminate("loss_mid_result").await;
    assert_eq!(answer(&mut raw, 1).await, "D E:57P01 Z:I");
    raw.send(&[query("SELECT 1")]).await;
    assert_eq!(answer(&mut raw, 1).await, "T D C:SELECT 1 Z:I");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_copy_from_stdin_the_next_data_gets_the_error() {
    let proxy = proxy().await;
    let mut raw = Raw::connect_named(&proxy.addr.to_string(), "loss_copy_in").await;
    raw.send(&[query("COPY items (owner) FROM STDIN")]).await;
    assert_eq!(raw.next_reply().await, Reply::Other('G'));
    raw.send(&[copy_data("loss_copy_in\n")]).await;
    terminate("loss_copy_in").await;
    raw.send(&[copy_data("loss_copy_in\n")]).await;
    assert_eq!(answer(&mut raw, 1).await, "E:57P01 Z:I");
    raw.send(&[query("SELECT 1")]).await;
    assert_eq!(answer(&mut raw, 1).await, "T D C:SELECT 1 Z:I");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_client_loses_its_session_with_a_fatal() {
    let proxy = proxy().await;
    let mut raw = Raw::connect_named(&proxy.addr.to_string(), "loss_pinned").await;
    raw.send(&[query("CREATE TEMP TABLE mine (x int)")]).await;
    assert_eq!(answer(&mut raw, 1).await, "C:CREATE TABLE Z:I");
    terminate("loss_pinned").await;
    // Its temporary table is gone with the server: as on a direct connection, the
    // session ends, with the reason.
    raw.send(&[query("SELECT * FROM mine")]).await;
    let fatal = tokio::time::timeout(BOUND, raw.next_reply())
        .await
        .expect("a FATAL within the bound");
    assert_eq!(fatal, Reply::Error("57P01".to_owned()));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_whose_server_was_lost_before_answering_runs_again() {
    let proxy = proxy().await;
    let mut raw = Raw::connect_named(&proxy.addr.to_string(), "loss_retry").await;
    // The read is in flight when its server goes; nothing of it has reached the client.
    raw.send(&[query("SELECT pg_sleep(1)::text || 'again'")]).await;
    terminate("loss_retry").await;
    assert_eq!(answer(&mut raw, 1).await, "T D C:SELECT 1 Z:I");
    let retries = proxy
        .running()
        .shared()
        .metrics
        .gather()
        .iter()
        .find(|family| family.name() == "pgrelay_retries_total")
        .map(|family| {
            family
                .get_metric()
                .iter()
                .filter(|metric| metric.get_label().iter().any(|label| label.value() == "read"))
                .map(|metric| metric.get_counter().get_value())
                .sum::<f64>()
        })
        .unwrap_or_default();
    assert_eq!(retries, 1.0);
    proxy.shutdown().await;
}

/// A read-only batch may run again should its server fail before answering, so its replies
/// that carry no data are held back; not without bound: a batch whose metadata alone is
/// larger than a client's output buffer gets it before its (slow) data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replies_held_back_for_a_rerun_are_bounded() {
    let proxy = proxy().await;
    let mut raw = Raw::connect_named(&proxy.addr.to_string(), "loss_held").await;
    // A small batch with large metadata: a statement of 330 columns described 100 times
    // (about 1 MB of RowDescriptions from under 2 KB sent, so the whole batch is read at
    // once and may run again), then a slow read.
    let wide = (0..10)
        .map(|i| format!("pg_catalog.pg_class c{i}"))
        .collect::<Vec<_>>()
        .join(", ");
    let mut messages = vec![parse("", &format!("SELECT * FROM {wide}"))];
    for _ in 0..100 {
        messages.push(common::raw::message(b'D', b"S\0"));
    }
    messages.push(parse("", "SELECT pg_sleep(20)"));
    messages.push(bind("", &[]));
    messages.push(execute());
    messages.push(sync());
    raw.send(&messages).await;
    // The first reply comes long before the sleep ends.
    let first = tokio::time::timeout(Duration::from_secs(15), raw.next_reply())
        .await
        .expect("held replies are released once they exceed the bound");
    assert_eq!(first, Reply::Other('1'));
    // Gone before its sleep ends: the shutdown need not wait for it.
    drop(raw);
    proxy.shutdown().await;
}

/// The pid of the server session of the client named `name`, once it runs a statement.
async fn backend_pid(name: &str) -> i32 {
    let admin = direct(&shared_cluster().primary().addr(), "app").await;
    let deadline = std::time::Instant::now() + BOUND;
    loop {
        let pid = admin
            .query_opt(
                "SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND state = 'active'",
                &[&name],
            )
            .await
            .unwrap();
        if let Some(row) = pid {
            return row.get(0);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no active server session of {name}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_timeout_cancels_a_long_statement_and_gives_up_on_a_stopped_server() {
    let proxy = Proxy::start_isolated(
        &config_for(
            shared_cluster(),
            "mode = \"transaction\"\nsize = 2\nquery_timeout = \"1s\"",
        ),
        2,
    )
    .await;
    let mut raw = Raw::connect_named(&proxy.addr.to_string(), "query_timeout").await;
    // A server that answers: the cancel ends the statement, with the server's 57014.
    let started = std::time::Instant::now();
    raw.send(&[query("SELECT pg_sleep(20)")]).await;
    assert_eq!(answer(&mut raw, 1).await, "T E:57014 Z:I");
    assert!(started.elapsed() < Duration::from_secs(4), "{:?}", started.elapsed());
    raw.send(&[query("SELECT 1")]).await;
    assert_eq!(answer(&mut raw, 1).await, "T D C:SELECT 1 Z:I");

    // A server whose backend is stopped cannot act on the cancel: after another
    // query_timeout pgrelay gives its connection up and answers 57014 itself.
    raw.send(&[query("SELECT pg_sleep(3)")]).await;
    let pid = nix::unistd::Pid::from_raw(backend_pid("query_timeout").await);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let started = std::time::Instant::now();
    let replies = tokio::time::timeout(Duration::from_secs(8), raw.replies_until_ready(1))
        .await
        .expect("an answer while the backend is stopped");
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    assert!(show(&replies).ends_with("E:57014 Z:I"), "{}", show(&replies));
    assert!(started.elapsed() < Duration::from_secs(4), "{:?}", started.elapsed());
    raw.send(&[query("SELECT 2")]).await;
    assert_eq!(answer(&mut raw, 1).await, "T D C:SELECT 1 Z:I");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extended_batch_that_gets_no_server_is_answered_up_to_its_sync_and_the_client_stays() {
    let proxy = Proxy::start_isolated(
        &config_for(
            shared_cluster(),
            "mode = \"transaction\"\nsize = 1\nquery_wait_timeout = \"300ms\"",
        ),
        2,
    )
    .await;
    let mut holder = Raw::connect_named(&proxy.addr.to_string(), "no_server_holder").await;
    let mut raw = Raw::connect_named(&proxy.addr.to_string(), "no_server_waiter").await;
    holder.send(&[query("BEGIN")]).await;
    assert_eq!(answer(&mut holder, 1).await, "C:BEGIN Z:T");
    raw.send(&[parse("", "SELECT 1"), bind("", &[]), execute(), sync()])
        .await;
    assert_eq!(answer(&mut raw, 1).await, "E:53300 Z:I");
    holder.send(&[query("COMMIT")]).await;
    assert_eq!(answer(&mut holder, 1).await, "C:COMMIT Z:I");
    raw.send(&[parse("", "SELECT 1"), bind("", &[]), execute(), sync()])
        .await;
    assert_eq!(answer(&mut raw, 1).await, "1 2 D C:SELECT 1 Z:I");
    proxy.shutdown().await;
}
