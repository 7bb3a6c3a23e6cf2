//! End-to-end: messages of every awkward size, in both directions and in all three
//! pooling modes, are answered correctly and within a bound. Sizes sit on both sides of
//! the read chunk (8 KiB), of 64 KiB, and up to just under max_message_size; the same
//! statement runs a first and a second time, since a second large Bind in session mode
//! once left pgrelay spinning on a worker. pgrelay runs on a runtime of its own, so a
//! stall fails a test by its timeout rather than hanging it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is a failed test

mod common;

use std::time::Duration;

use common::raw::{Raw, Reply, bind, copy_data, copy_done, execute, message, parse, query, show, sync};
use common::{Proxy, config_for, direct, shared_cluster};
use futures_util::{SinkExt, TryStreamExt};
use tokio_postgres::Client;
use tokio_postgres::types::Type;

/// max_message_size of the proxies under test.
const MAX_MESSAGE: usize = 4 << 20;
/// What a Query or Bind adds around its payload, with room to spare.
const ENVELOPE: usize = 256;
/// Longest any single case may take; each passes in well under a second.
const CASE_TIMEOUT: Duration = Duration::from_secs(30);

const MODES: [&str; 3] = ["session", "transaction", "statement"];

fn sizes() -> Vec<usize> {
    vec![
        0,
        1,
        8191,
        8192,
        8193,
        65535,
        65536,
        65537,
        1 << 20,
        MAX_MESSAGE - ENVELOPE,
    ]
}

fn payload(size: usize) -> String {
    // Not one repeated byte: a misplaced slice would show as wrong content.
    (0..size).map(|i| (b'a' + (i % 23) as u8) as char).collect()
}

async fn proxy_in(mode: &str) -> Proxy {
    let pool = format!("mode = \"{mode}\"\nsize = 2");
    let config = config_for(shared_cluster(), &pool).replace(
        "client_login_timeout = \"5s\"",
        &format!("client_login_timeout = \"5s\"\nmax_message_size = \"{}\"", MAX_MESSAGE),
    );
    Proxy::start_isolated(&config, 2).await
}

async fn copy_table() {
    static CREATED: tokio::sync::Mutex<bool> = tokio::sync::Mutex::const_new(false);
    let mut created = CREATED.lock().await;
    if !*created {
        let admin = direct(&shared_cluster().primary().addr(), "app").await;
        admin
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS large_copy (k text PRIMARY KEY, v text);
                 GRANT ALL ON large_copy TO PUBLIC;",
            )
            .await
            .unwrap();
        *created = true;
    }
}

async fn bounded<T>(what: &str, case: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(CASE_TIMEOUT, case)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {CASE_TIMEOUT:?}"))
}

/// Every path a driver takes, each size, in one mode, through tokio-postgres.
async fn driver_matrix(mode: &str) {
    copy_table().await;
    let proxy = proxy_in(mode).await;
    let client = proxy.app().await;
    let named = client.prepare_typed("SELECT $1::text", &[Type::TEXT]).await.unwrap();
    for size in sizes() {
        let started = std::time::Instant::now();
        let text = payload(size);
        let case = |path: &str| format!("{mode} mode, {path}, {size} bytes");

        // Simple Query: the payload in, its length out; then a DataRow of the size.
        let sql = format!("SELECT length('{text}')");
        let rows = bounded(&case("Query in"), client.simple_query(&sql)).await.unwrap();
        assert_eq!(common::first_value(&rows), size.to_string(), "{}", case("Query in"));
        let sql = format!("SELECT repeat('x', {size})");
        let rows = bounded(&case("DataRow out"), client.simple_query(&sql)).await.unwrap();
        assert_eq!(common::first_value(&rows).len(), size, "{}", case("DataRow out"));

        // The unnamed statement: Bind in, DataRow out.
        let row = bounded(
            &case("unnamed Bind"),
            client.query_typed("SELECT $1::text", &[(&text, Type::TEXT)]),
        )
        .await
        .unwrap();
        assert!(row[0].get::<_, &str>(0) == text, "{}", case("unnamed Bind"));

        // A named statement, executed twice with the same large value.
        for run in ["first", "second"] {
            let what = case(&format!("named statement, {run} execution"));
            let row = bounded(&what, client.query_one(&named, &[&text])).await.unwrap();
            assert!(row.get::<_, &str>(0) == text, "{what}");
        }

        // COPY in: one CopyData of the size (its key and tab within the envelope).
        {
            let key = format!("{mode}-{size}");
            client
                .execute("DELETE FROM large_copy WHERE k = $1", &[&key])
                .await
                .unwrap();
            let line = bytes::Bytes::from(format!("{key}\t{text}\n"));
            bounded(&case("COPY in"), async {
                let sink = client.copy_in("COPY large_copy (k, v) FROM STDIN").await.unwrap();
                futures_util::pin_mut!(sink);
                sink.send(line).await.unwrap();
                sink.finish().await.unwrap()
            })
            .await;
            let row = client
                .query_one("SELECT length(v) FROM large_copy WHERE k = $1", &[&key])
                .await
                .unwrap();
            assert_eq!(row.get::<_, i32>(0) as usize, size, "{}", case("COPY in"));
        }

        // COPY out: one CopyData of the size and its newline.
        let sql = format!("COPY (SELECT repeat('x', {size})) TO STDOUT");
        let chunks: Vec<bytes::Bytes> = bounded(&case("COPY out"), async {
            client.copy_out(&sql).await.unwrap().try_collect().await.unwrap()
        })
        .await;
        assert_eq!(
            chunks.iter().map(|c| c.len()).sum::<usize>(),
            size + 1,
            "{}",
            case("COPY out")
        );
        println!(
            "tokio-postgres, {mode} mode, {size:>8} bytes: Query in/out, unnamed Bind, named Bind x2, COPY in, COPY out answered in {:.0?}",
            started.elapsed()
        );
    }
    // The proxy is still healthy: a plain statement on a new connection.
    let other = proxy.app().await;
    bounded("a new client afterwards", other.simple_query("SELECT 1"))
        .await
        .unwrap();
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn driver_sizes_in_session_mode() {
    driver_matrix(MODES[0]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn driver_sizes_in_transaction_mode() {
    driver_matrix(MODES[1]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn driver_sizes_in_statement_mode() {
    driver_matrix(MODES[2]).await;
}

/// Offsets at which a message is cut into TCP segments: inside the header, right after
/// it, inside the body, one byte before the end.
fn awkward_cuts(start: usize, len: usize) -> Vec<usize> {
    let mut cuts = vec![start + 1, start + 3, start + 5, start + 6];
    for point in [len / 2, 8191, 8192, 65535, 65536, len.saturating_sub(1)] {
        if point > 6 && point < len {
            cuts.push(start + point);
        }
    }
    cuts.sort_unstable();
    cuts.dedup();
    cuts
}

/// Cuts for a batch of messages: awkward places inside each of them.
fn cuts_for(messages: &[Vec<u8>]) -> Vec<usize> {
    let mut cuts = Vec::new();
    let mut start = 0;
    for message in messages {
        cuts.extend(awkward_cuts(start, message.len()));
        start += message.len();
    }
    cuts
}

/// The length of the one value in a DataRow body.
fn value_len(body: &[u8]) -> usize {
    i32::from_be_bytes([body[2], body[3], body[4], body[5]]) as usize
}

/// Reads until ReadyForQuery; returns the replies and the value lengths of the rows.
async fn answer(raw: &mut Raw) -> (Vec<Reply>, Vec<usize>) {
    let mut replies = Vec::new();
    let mut values = Vec::new();
    loop {
        let (tag, body) = raw.next_message().await;
        match tag {
            b'D' => values.push(value_len(&body)),
            b'd' => values.push(body.len()),
            _ => {}
        }
        let mut whole = vec![tag, 0, 0, 0, 0];
        whole.extend_from_slice(&body);
        let reply = common::raw::parse_reply(&whole);
        let done = matches!(reply, Reply::Ready(_));
        replies.push(reply);
        if done {
            return (replies, values);
        }
    }
}

/// Raw protocol, every message cut into segments at awkward places: a simple Query, the
/// unnamed statement, a named statement run twice, COPY in and out.
async fn split_matrix(mode: &str) {
    copy_table().await;
    let proxy = proxy_in(mode).await;
    let mut raw = Raw::connect(&proxy).await;
    let statement = format!("split_{mode}");
    let batch = [parse(&statement, "SELECT $1::text"), sync()];
    raw.send_split(&batch.concat(), &cuts_for(&batch)).await;
    let (replies, _) = bounded("Parse", answer(&mut raw)).await;
    assert_eq!(show(&replies), "1 Z:I");
    for size in sizes() {
        let started = std::time::Instant::now();
        let text = payload(size);
        let case = |path: &str| format!("{mode} mode, raw {path}, {size} bytes");

        let batch = [query(&format!("SELECT '{text}'::text"))];
        raw.send_split(&batch.concat(), &cuts_for(&batch)).await;
        let (replies, values) = bounded(&case("Query"), answer(&mut raw)).await;
        assert_eq!(show(&replies), "T D C:SELECT 1 Z:I", "{}", case("Query"));
        assert_eq!(values, [size], "{}", case("Query"));

        let batch = [parse("", "SELECT $1::text"), bind("", &[&text]), execute(), sync()];
        raw.send_split(&batch.concat(), &cuts_for(&batch)).await;
        let (replies, values) = bounded(&case("unnamed"), answer(&mut raw)).await;
        assert_eq!(show(&replies), "1 2 D C:SELECT 1 Z:I", "{}", case("unnamed"));
        assert_eq!(values, [size], "{}", case("unnamed"));

        for run in ["first", "second"] {
            let what = case(&format!("named, {run} execution"));
            let batch = [bind(&statement, &[&text]), execute(), sync()];
            raw.send_split(&batch.concat(), &cuts_for(&batch)).await;
            let (replies, values) = bounded(&what, answer(&mut raw)).await;
            assert_eq!(show(&replies), "2 D C:SELECT 1 Z:I", "{what}");
            assert_eq!(values, [size], "{what}");
        }

        {
            let key = format!("raw-{mode}-{size}");
            raw.send(&[query(&format!("DELETE FROM large_copy WHERE k = '{key}'"))])
                .await;
            bounded(&case("DELETE"), answer(&mut raw)).await;
            raw.send(&[query("COPY large_copy (k, v) FROM STDIN")]).await;
            assert_eq!(raw.next_reply().await, Reply::Other('G'), "{}", case("COPY in"));
            let batch = [copy_data(&format!("{key}\t{text}\n")), copy_done()];
            raw.send_split(&batch.concat(), &cuts_for(&batch)).await;
            let (replies, _) = bounded(&case("COPY in"), answer(&mut raw)).await;
            assert_eq!(show(&replies), "C:COPY 1 Z:I", "{}", case("COPY in"));
        }

        raw.send(&[query(&format!("COPY (SELECT repeat('x', {size})) TO STDOUT"))])
            .await;
        let (replies, values) = bounded(&case("COPY out"), answer(&mut raw)).await;
        assert_eq!(show(&replies), "H d c C:COPY 1 Z:I", "{}", case("COPY out"));
        assert_eq!(values, [size + 1], "{}", case("COPY out"));
        println!(
            "raw, cut into segments, {mode} mode, {size:>8} bytes: Query, unnamed, named x2, COPY in, COPY out answered in {:.0?}",
            started.elapsed()
        );
    }
    // One byte over max_message_size is refused with 08P01, not buffered.
    let mut too_large = message(b'Q', &vec![b' '; MAX_MESSAGE]);
    too_large.truncate(64);
    raw.send(&[too_large]).await;
    let refusal = bounded("oversized message", raw.next_reply()).await;
    assert_eq!(refusal, Reply::Error("08P01".to_owned()));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_sizes_in_session_mode() {
    split_matrix(MODES[0]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_sizes_in_transaction_mode() {
    split_matrix(MODES[1]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_sizes_in_statement_mode() {
    split_matrix(MODES[2]).await;
}

/// The case that froze the proxy: session mode, a prepared statement, a small then a
/// large value twice (asyncpg's `fetchval` pattern), while another client keeps being
/// served on the same two workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_large_bind_in_session_mode_is_answered_and_others_are_served() {
    let proxy = proxy_in("session").await;
    let client = proxy.app().await;
    let other: Client = proxy.app().await;
    let statement = client.prepare_typed("SELECT $1::bytea", &[Type::BYTEA]).await.unwrap();
    let small: &[u8] = b"foo";
    let row = bounded("small value", client.query_one(&statement, &[&small]))
        .await
        .unwrap();
    assert_eq!(row.get::<_, &[u8]>(0), small);
    for size in [70_000, 200_000, 1 << 20] {
        let large = vec![b'f'; size];
        for run in ["first", "second"] {
            let row = bounded(
                &format!("{size} bytes, {run} time"),
                client.query_one(&statement, &[&large.as_slice()]),
            )
            .await
            .unwrap();
            assert_eq!(row.get::<_, &[u8]>(0).len(), size);
            bounded("another client meanwhile", other.simple_query("SELECT 1"))
                .await
                .unwrap();
        }
    }
    proxy.shutdown().await;
}

/// A client pinned to its server in transaction mode (a temporary table) keeps its
/// server between batches, as in session mode: a message of a few KB that arrives in
/// pieces (asyncpg's type introspection query is one) must be waited for, not served in a
/// loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_client_sends_messages_in_pieces() {
    let proxy = proxy_in("transaction").await;
    let mut raw = Raw::connect(&proxy).await;
    raw.send(&[query("CREATE TEMP TABLE pinned_here (v text)")]).await;
    let (replies, _) = bounded("CREATE TEMP TABLE", answer(&mut raw)).await;
    assert_eq!(show(&replies), "C:CREATE TABLE Z:I");
    for size in [3000, 20_000] {
        let text = payload(size);
        let batch = [
            parse("", "INSERT INTO pinned_here VALUES ($1) RETURNING length(v)::text"),
            bind("", &[&text]),
            execute(),
            sync(),
        ];
        raw.send_split(&batch.concat(), &cuts_for(&batch)).await;
        let (replies, values) = bounded(&format!("{size} bytes in pieces"), answer(&mut raw)).await;
        assert_eq!(show(&replies), "1 2 D C:INSERT 0 1 Z:I");
        assert_eq!(values, [size.to_string().len()]);
    }
    proxy.shutdown().await;
}
