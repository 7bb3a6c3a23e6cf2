//! End-to-end, in transaction mode: after a schema change, a statement prepared again
//! sees the new schema, as on a direct connection, although the server-side statements
//! pgrelay shares between clients were prepared before it. Message by message, with both
//! server connections of the pool holding the old statement.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is a failed test

mod common;

use std::time::Duration;

use common::raw::{Raw, bind, execute, parse, query, row_values, sync};
use common::{Proxy, config_for, direct, shared_cluster};

const BOUND: Duration = Duration::from_secs(10);

async fn proxy() -> Proxy {
    Proxy::start(&config_for(shared_cluster(), "mode = \"transaction\"\nsize = 2")).await
}

/// The replies up to the next ReadyForQuery, with the column count of each DataRow:
/// `1 2 D3 C:SELECT 1 Z:I`.
async fn replies(raw: &mut Raw) -> String {
    let mut shown = Vec::new();
    loop {
        let (tag, body) = tokio::time::timeout(BOUND, raw.next_message())
            .await
            .expect("a reply within the bound");
        let text = match tag {
            b'D' => format!("D{}", u16::from_be_bytes([body[0], body[1]])),
            b'E' => {
                let code = body
                    .split(|&b| b == 0)
                    .find_map(|field| field.strip_prefix(b"C"))
                    .map(|code| String::from_utf8_lossy(code).into_owned())
                    .unwrap_or_default();
                format!("E:{code}")
            }
            b'C' => format!("C:{}", String::from_utf8_lossy(&body[..body.len() - 1])),
            b'Z' => format!("Z:{}", char::from(body[0])),
            other => char::from(other).to_string(),
        };
        shown.push(text);
        if tag == b'Z' {
            return shown.join(" ");
        }
    }
}

/// Prepares `sql` as `name`, runs it and returns the replies.
async fn prepare_and_run(raw: &mut Raw, name: &str, sql: &str) -> String {
    raw.send(&[parse(name, sql), bind(name, &[]), execute(), sync()]).await;
    replies(raw).await
}

/// Two clients each prepare `sql` while the other holds a server in a transaction: both
/// server connections of the pool hold the statement.
async fn prepare_on_both_servers(proxy: &Proxy, sql: &str) -> (Raw, Raw) {
    let addr = proxy.addr.to_string();
    let mut first = Raw::connect_to(&addr).await;
    let mut second = Raw::connect_to(&addr).await;
    // A statement, not BEGIN alone: pgrelay may answer a lone BEGIN itself.
    first.send(&[query("BEGIN; SELECT 1")]).await;
    assert_eq!(replies(&mut first).await, "C:BEGIN T D1 C:SELECT 1 Z:T");
    assert_eq!(prepare_and_run(&mut second, "s", sql).await, "1 2 D2 C:SELECT 1 Z:I");
    assert_eq!(prepare_and_run(&mut first, "s", sql).await, "1 2 D2 C:SELECT 1 Z:T");
    first.send(&[query("COMMIT")]).await;
    assert_eq!(replies(&mut first).await, "C:COMMIT Z:I");
    (first, second)
}

/// Prepares `sql` as `name` and runs it with each client inside a transaction of its
/// own, both open at once: one runs it on each server connection of the pool.
async fn prepare_and_run_on_both_servers(first: &mut Raw, second: &mut Raw, name: &str, sql: &str) -> [String; 2] {
    for raw in [&mut *first, &mut *second] {
        raw.send(&[query("BEGIN; SELECT 1")]).await;
        assert_eq!(replies(raw).await, "C:BEGIN T D1 C:SELECT 1 Z:T");
    }
    let answers = [
        prepare_and_run(first, name, sql).await,
        prepare_and_run(second, name, sql).await,
    ];
    for raw in [first, second] {
        raw.send(&[query("COMMIT")]).await;
        assert_eq!(replies(raw).await, "C:COMMIT Z:I");
    }
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_prepared_again_after_alter_table_sees_the_new_column() {
    let proxy = proxy().await;
    let mut admin = Raw::connect_to(&proxy.addr.to_string()).await;
    admin
        .send(&[query(
            "DROP TABLE IF EXISTS sc_alter; CREATE TABLE sc_alter (id int, v int); INSERT INTO sc_alter VALUES (1, 2)",
        )])
        .await;
    replies(&mut admin).await;
    let sql = "SELECT * FROM sc_alter";
    let (mut first, mut second) = prepare_on_both_servers(&proxy, sql).await;

    // Through pgrelay: it sees the change pass.
    admin
        .send(&[query("ALTER TABLE sc_alter ADD COLUMN w int DEFAULT 3")])
        .await;
    assert_eq!(replies(&mut admin).await, "C:ALTER TABLE Z:I");
    for raw in [&mut first, &mut second] {
        // The old statement fails as on a direct connection (its plan is stale)…
        raw.send(&[bind("s", &[]), execute(), sync()]).await;
        assert_eq!(replies(raw).await, "E:0A000 Z:I");
        // …and preparing it again, as drivers do then, works: outside a transaction
        // and inside one.
        assert_eq!(prepare_and_run(raw, "s_again", sql).await, "1 2 D3 C:SELECT 1 Z:I");
        raw.send(&[query("BEGIN")]).await;
        assert_eq!(replies(raw).await, "C:BEGIN Z:T");
        assert_eq!(prepare_and_run(raw, "s_in_tx", sql).await, "1 2 D3 C:SELECT 1 Z:T");
        raw.send(&[query("COMMIT")]).await;
        assert_eq!(replies(raw).await, "C:COMMIT Z:I");
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_change_made_elsewhere_is_learnt_from_the_servers_error() {
    let proxy = proxy().await;
    let outside = direct(&shared_cluster().primary().addr(), "app").await;
    outside
        .batch_execute(
            "DROP TABLE IF EXISTS sc_outside; CREATE TABLE sc_outside (id int, v int); \
             INSERT INTO sc_outside VALUES (1, 2); GRANT ALL ON sc_outside TO PUBLIC",
        )
        .await
        .unwrap();
    let sql = "SELECT * FROM sc_outside";
    let (mut first, mut second) = prepare_on_both_servers(&proxy, sql).await;

    // Not through pgrelay: only the servers know.
    outside
        .batch_execute("ALTER TABLE sc_outside ADD COLUMN w int DEFAULT 3")
        .await
        .unwrap();
    first.send(&[bind("s", &[]), execute(), sync()]).await;
    assert_eq!(replies(&mut first).await, "E:0A000 Z:I");
    // After one server said so, a statement prepared again is fresh on either server,
    // and the old one fails on either, as on the client's own server.
    let fresh = "1 2 D3 C:SELECT 1 Z:T".to_owned();
    assert_eq!(
        prepare_and_run_on_both_servers(&mut first, &mut second, "s_again", sql).await,
        [fresh.clone(), fresh]
    );
    second.send(&[bind("s", &[]), execute(), sync()]).await;
    assert_eq!(replies(&mut second).await, "E:0A000 Z:I");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_type_dropped_and_created_again_does_not_poison_statements_that_use_it() {
    let proxy = proxy().await;
    let outside = direct(&shared_cluster().primary().addr(), "app").await;
    let setup = "DROP TABLE IF EXISTS sc_typed; DROP TYPE IF EXISTS sc_pair; \
                 CREATE TYPE sc_pair AS (a int, b text); \
                 CREATE TABLE sc_typed (id int, p sc_pair); INSERT INTO sc_typed VALUES (1, ROW(1, 'x')); \
                 GRANT ALL ON sc_typed TO PUBLIC";
    outside.batch_execute(setup).await.unwrap();
    let sql = "SELECT id, p FROM sc_typed";
    let (mut first, mut second) = prepare_on_both_servers(&proxy, sql).await;

    outside.batch_execute(setup).await.unwrap();
    first.send(&[bind("s", &[]), execute(), sync()]).await;
    let failed = replies(&mut first).await;
    assert!(failed.starts_with("E:"), "{failed}");
    let fresh = "1 2 D2 C:SELECT 1 Z:T".to_owned();
    assert_eq!(
        prepare_and_run_on_both_servers(&mut first, &mut second, "s_again", sql).await,
        [fresh.clone(), fresh]
    );
    proxy.shutdown().await;
}

/// A client that prepared `name` with Parse, and a second client inside a transaction on
/// the server it was prepared on, so that the first one's next statements run on the
/// pool's other server: (the first, the second).
async fn prepare_then_hold_its_server(proxy: &Proxy, name: &str, sql: &str) -> (Raw, Raw) {
    let mut raw = Raw::connect_to(&proxy.addr.to_string()).await;
    raw.send(&[parse(name, sql), sync()]).await;
    assert_eq!(replies(&mut raw).await, "1 Z:I");
    let mut other = Raw::connect_to(&proxy.addr.to_string()).await;
    other.send(&[query("BEGIN; SELECT 1")]).await;
    assert_eq!(replies(&mut other).await, "C:BEGIN T D1 C:SELECT 1 Z:T");
    (raw, other)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_execute_and_deallocate_reach_a_statement_prepared_with_parse() {
    let proxy = proxy().await;
    let (mut raw, mut other) = prepare_then_hold_its_server(&proxy, "FooBar", "SELECT $1::int + 1").await;
    raw.send(&[query("EXECUTE \"FooBar\"(41)")]).await;
    assert_eq!(replies(&mut raw).await, "T D1 C:SELECT 1 Z:I");
    raw.send(&[parse("foobar", "SELECT 'lower'"), sync()]).await;
    assert_eq!(replies(&mut raw).await, "1 Z:I");
    raw.send(&[query("execute FOOBAR;")]).await;
    assert_eq!(replies(&mut raw).await, "T D1 C:SELECT 1 Z:I");
    raw.send(&[query("BEGIN; SELECT 1")]).await;
    assert_eq!(replies(&mut raw).await, "C:BEGIN T D1 C:SELECT 1 Z:T");
    raw.send(&[query("EXECUTE \"FooBar\"(1)")]).await;
    assert_eq!(replies(&mut raw).await, "T D1 C:SELECT 1 Z:T");
    raw.send(&[query("COMMIT")]).await;
    assert_eq!(replies(&mut raw).await, "C:COMMIT Z:I");
    // In a failed transaction block the server refuses DEALLOCATE, and drops nothing.
    raw.send(&[query("BEGIN; SELECT 1/0")]).await;
    assert_eq!(replies(&mut raw).await, "C:BEGIN E:22012 Z:E");
    raw.send(&[query("DEALLOCATE ALL")]).await;
    assert_eq!(replies(&mut raw).await, "E:25P02 Z:E");
    raw.send(&[query("DEALLOCATE \"FooBar\"")]).await;
    assert_eq!(replies(&mut raw).await, "E:25P02 Z:E");
    raw.send(&[query("ROLLBACK")]).await;
    assert_eq!(replies(&mut raw).await, "C:ROLLBACK Z:I");
    raw.send(&[query("EXECUTE \"FooBar\"(2)")]).await;
    assert_eq!(replies(&mut raw).await, "T D1 C:SELECT 1 Z:I");
    raw.send(&[query("DEALLOCATE foobar")]).await;
    assert_eq!(replies(&mut raw).await, "C:DEALLOCATE Z:I");
    raw.send(&[query("EXECUTE foobar")]).await;
    assert_eq!(replies(&mut raw).await, "E:26000 Z:I");
    other.send(&[query("COMMIT")]).await;
    assert_eq!(replies(&mut other).await, "C:COMMIT Z:I");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_execute_of_a_statement_that_no_longer_prepares_gets_the_real_error_once() {
    let proxy = proxy().await;
    let primary = direct(&shared_cluster().primary().addr(), "app").await;
    primary
        .batch_execute("DROP TABLE IF EXISTS t_exec_gone; CREATE TABLE t_exec_gone (x int)")
        .await
        .unwrap();
    // The EXECUTEs run on the other server, where pgrelay prepares the statement first,
    // and that now fails.
    let (mut raw, mut other) = prepare_then_hold_its_server(&proxy, "s_gone", "SELECT x FROM t_exec_gone").await;
    primary.batch_execute("DROP TABLE t_exec_gone").await.unwrap();

    // One error, the server's reason, as a direct connection gives for a PREPAREd
    // statement whose table is gone; never pgrelay's name of the statement.
    raw.send(&[query("EXECUTE s_gone")]).await;
    let messages = tokio::time::timeout(BOUND, raw.messages_until_ready()).await.unwrap();
    let errors: Vec<String> = messages
        .iter()
        .filter(|(tag, _)| *tag == b'E')
        .map(|(_, body)| common::raw::error_message(body))
        .collect();
    assert_eq!(errors, ["relation \"t_exec_gone\" does not exist"], "{messages:?}");
    assert_eq!(messages.last().map(|(tag, body)| (*tag, body[0])), Some((b'Z', b'I')));
    // In a transaction block the failed preparation aborts it, as the EXECUTE itself
    // would: the client hears the reason, not the 25P02 of the EXECUTE behind it.
    raw.send(&[query("BEGIN")]).await;
    assert_eq!(replies(&mut raw).await, "C:BEGIN Z:T");
    raw.send(&[query("EXECUTE s_gone")]).await;
    assert_eq!(replies(&mut raw).await, "E:42P01 Z:E");
    raw.send(&[query("ROLLBACK")]).await;
    assert_eq!(replies(&mut raw).await, "C:ROLLBACK Z:I");

    // Once the table is back, the statement prepares and runs again.
    primary
        .batch_execute("CREATE TABLE t_exec_gone (x int); GRANT SELECT ON t_exec_gone TO PUBLIC")
        .await
        .unwrap();
    raw.send(&[query("EXECUTE s_gone")]).await;
    assert_eq!(replies(&mut raw).await, "T C:SELECT 0 Z:I");
    other.send(&[query("COMMIT")]).await;
    assert_eq!(replies(&mut other).await, "C:COMMIT Z:I");
    primary.batch_execute("DROP TABLE t_exec_gone").await.unwrap();
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_dropped_behind_pgrelays_back_fails_once_and_for_that_client_only() {
    let proxy = Proxy::start(&config_for(shared_cluster(), "mode = \"transaction\"\nsize = 1")).await;
    let addr = proxy.addr.to_string();
    let mut owner = Raw::connect_to(&addr).await;
    assert_eq!(
        prepare_and_run(&mut owner, "s", "SELECT 7").await,
        "1 2 D1 C:SELECT 1 Z:I"
    );
    // Another client of the same (only) server connection drops pgrelay's statement.
    let mut other = Raw::connect_to(&addr).await;
    other
        .send(&[query(
            "SELECT name FROM pg_prepared_statements WHERE statement = 'SELECT 7'",
        )])
        .await;
    let name = loop {
        let (tag, body) = tokio::time::timeout(BOUND, other.next_message()).await.unwrap();
        if tag == b'D' {
            break String::from_utf8(row_values(&body)[0].clone().unwrap()).unwrap();
        }
    };
    assert_eq!(replies(&mut other).await, "C:SELECT 1 Z:I");
    other.send(&[query(&format!("DEALLOCATE \"{name}\""))]).await;
    assert_eq!(replies(&mut other).await, "C:DEALLOCATE Z:I");
    // Its owner hears of it once, as the server says it, then runs it again.
    owner.send(&[bind("s", &[]), execute(), sync()]).await;
    assert_eq!(replies(&mut owner).await, "E:26000 Z:I");
    owner.send(&[bind("s", &[]), execute(), sync()]).await;
    assert_eq!(replies(&mut owner).await, "2 D1 C:SELECT 1 Z:I");
    // And no one else is refused the statement for it.
    assert_eq!(
        prepare_and_run(&mut other, "t", "SELECT 7").await,
        "1 2 D1 C:SELECT 1 Z:I"
    );
    proxy.shutdown().await;
}
