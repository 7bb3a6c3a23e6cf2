//! End-to-end, at the level of protocol messages: the corners of the extended protocol
//! and COPY where a pooler that shares server connections easily answers differently
//! from PostgreSQL. Each test spells out, message by message, what a direct
//! connection answers, and checks that pgrelay answers the same.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is a failed test

mod common;

use std::time::Duration;

use common::raw::{
    Raw, bind, cancel, close_statement, copy_data, copy_done, copy_fail, execute, flush, parse, query, show, sync,
};
use common::{Proxy, config_for, direct, shared_cluster};

const SCHEMA: &str = "proto_edges";

/// A schema only some clients have on their search_path, with a table to read and
/// one to copy into.
async fn create_schema() {
    static CREATED: tokio::sync::Mutex<bool> = tokio::sync::Mutex::const_new(false);
    let mut created = CREATED.lock().await;
    if *created {
        return;
    }
    let cluster = shared_cluster();
    let admin = direct(&cluster.primary().addr(), "app").await;
    admin
        .batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {SCHEMA};
             GRANT USAGE ON SCHEMA {SCHEMA} TO PUBLIC;
             CREATE TABLE IF NOT EXISTS {SCHEMA}.only_here (x int);
             CREATE TABLE IF NOT EXISTS {SCHEMA}.copy_target (a int);
             CREATE OR REPLACE VIEW {SCHEMA}.copy_view AS SELECT 1 AS a;
             GRANT ALL ON ALL TABLES IN SCHEMA {SCHEMA} TO PUBLIC;"
        ))
        .await
        .unwrap();
    *created = true;
}

/// One server, room for one prepared statement on it: every client's statements meet
/// on the same connection and push each other out.
async fn one_server_proxy() -> Proxy {
    create_schema().await;
    Proxy::start(&config_for(
        shared_cluster(),
        "mode = \"transaction\"\nsize = 1\nmax_prepared_statements = 1",
    ))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parse_fails_where_it_would_fail_on_a_direct_connection() {
    let proxy = one_server_proxy().await;
    let mut a = Raw::connect(&proxy).await;
    let mut b = Raw::connect(&proxy).await;
    let statement = "SELECT x FROM only_here";

    a.send(&[query(&format!("SET search_path = {SCHEMA}, public"))]).await;
    a.replies_until_ready(1).await;
    a.send(&[parse("a1", statement), sync(), bind("a1", &[]), execute(), sync()])
        .await;
    assert_eq!(show(&a.replies_until_ready(2).await), "1 Z:I 2 C:SELECT 0 Z:I");

    // The server holds the statement, but B's search_path does not see the table.
    b.send(&[parse("b1", statement), sync()]).await;
    assert_eq!(show(&b.replies_until_ready(1).await), "E:42P01 Z:I");
    // So B has no statement b1, as on a direct connection.
    b.send(&[parse("b2", "SELECT 2"), sync()]).await;
    assert_eq!(show(&b.replies_until_ready(1).await), "1 Z:I");
    b.send(&[bind("b1", &[]), execute(), sync()]).await;
    assert_eq!(show(&b.replies_until_ready(1).await), "E:26000 Z:I");

    // b4 pushes b2's statement out of the server.
    b.send(&[parse("b4", "SELECT 3"), sync()]).await;
    assert_eq!(show(&b.replies_until_ready(1).await), "1 Z:I");

    // In an aborted transaction, a Parse fails even if the server holds the statement...
    b.send(&[query("BEGIN"), query("SELECT 1/0")]).await;
    assert_eq!(show(&b.replies_until_ready(2).await), "C:BEGIN Z:T E:22012 Z:E");
    b.send(&[parse("b3", "SELECT 3"), sync()]).await;
    assert_eq!(show(&b.replies_until_ready(1).await), "E:25P02 Z:E");
    // ...and the Parse pgrelay sends on its own before a Bind of b2 fails too: the
    // client hears the server's error, not just a ReadyForQuery.
    b.send(&[bind("b2", &[]), execute(), sync()]).await;
    assert_eq!(show(&b.replies_until_ready(1).await), "E:25P02 Z:E");
    b.send(&[query("ROLLBACK")]).await;
    assert_eq!(show(&b.replies_until_ready(1).await), "C:ROLLBACK Z:I");
    b.send(&[bind("b3", &[]), execute(), sync()]).await;
    assert_eq!(show(&b.replies_until_ready(1).await), "E:26000 Z:I");

    // A's statement is prepared again for it on the same server and works.
    a.send(&[bind("a1", &[]), execute(), sync()]).await;
    assert_eq!(show(&a.replies_until_ready(1).await), "2 C:SELECT 0 Z:I");
    b.send(&[bind("b2", &[]), execute(), sync()]).await;
    assert_eq!(show(&b.replies_until_ready(1).await), "2 D C:SELECT 1 Z:I");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_before_the_sync_arrives_skips_the_rest_of_the_batch() {
    let proxy = one_server_proxy().await;
    let mut client = Raw::connect(&proxy).await;
    client.send(&[parse("s1", "SELECT $1::int"), sync()]).await;
    assert_eq!(show(&client.replies_until_ready(1).await), "1 Z:I");

    for in_transaction in [false, true] {
        if in_transaction {
            client.send(&[query("BEGIN")]).await;
            client.replies_until_ready(1).await;
        }
        // The Bind fails on its own; Execute and Sync follow in a later write.
        client.send(&[bind("s1", &["oops"])]).await;
        assert_eq!(show(&client.replies_until('E').await), "E:22P02");
        client.send(&[execute(), sync()]).await;
        let status = if in_transaction { "E" } else { "I" };
        assert_eq!(show(&client.replies_until_ready(1).await), format!("Z:{status}"));
        client.assert_quiet(Duration::from_millis(300)).await;
        if in_transaction {
            client.send(&[query("ROLLBACK")]).await;
            assert_eq!(show(&client.replies_until_ready(1).await), "C:ROLLBACK Z:I");
        }
    }
    client.send(&[bind("s1", &["7"]), execute(), sync()]).await;
    assert_eq!(show(&client.replies_until_ready(1).await), "2 D C:SELECT 1 Z:I");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_data_sent_right_behind_the_copy_statement_arrives() {
    let proxy = one_server_proxy().await;
    let mut client = Raw::connect(&proxy).await;
    let copy = format!("COPY {SCHEMA}.copy_target (a) FROM STDIN");

    // Simple query, the data in the same write (as asyncpg sends it).
    client.send(&[query(&copy), copy_data("1\n2\n"), copy_done()]).await;
    assert_eq!(show(&client.replies_until_ready(1).await), "G C:COPY 2 Z:I");

    // A COPY that fails before it starts: the data behind it is ignored.
    client
        .send(&[query("COPY no_such_table FROM STDIN"), copy_data("1\n"), copy_done()])
        .await;
    assert_eq!(show(&client.replies_until_ready(1).await), "E:42P01 Z:I");
    client.assert_quiet(Duration::from_millis(300)).await;

    // Extended protocol with a Sync before the data and one after, all in one write:
    // the server ignores the Sync it reads in COPY mode.
    client
        .send(&[
            parse("", &copy),
            bind("", &[]),
            execute(),
            sync(),
            copy_data("3\n"),
            copy_done(),
            sync(),
        ])
        .await;
    assert_eq!(show(&client.replies_until_ready(1).await), "1 2 G C:COPY 1 Z:I");
    client.assert_quiet(Duration::from_millis(300)).await;

    // The same with a named statement, waiting for CopyInResponse before the data, then
    // a Close and Sync (as tokio-postgres does).
    client.send(&[parse("c1", &copy), sync()]).await;
    assert_eq!(show(&client.replies_until_ready(1).await), "1 Z:I");
    client.send(&[bind("c1", &[]), execute(), sync()]).await;
    assert_eq!(show(&client.replies_until('G').await), "2 G");
    client.send(&[copy_data("4\n5\n"), copy_done(), sync()]).await;
    assert_eq!(show(&client.replies_until_ready(1).await), "C:COPY 2 Z:I");
    client.send(&[close_statement("c1"), sync()]).await;
    assert_eq!(show(&client.replies_until_ready(1).await), "3 Z:I");

    client.send(&[query("SELECT 1")]).await;
    assert_eq!(show(&client.replies_until_ready(1).await), "T D C:SELECT 1 Z:I");
    proxy.shutdown().await;
}

/// COPY into a view fails after CopyInResponse, before the server reads anything more:
/// the Sync sent right after Execute is then read in normal mode and answered, and so is
/// the Sync after CopyDone. Both ReadyForQuery go to the client that sent the Syncs, and
/// the server is not handed to anyone else while one may still come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_that_fails_before_reading_its_data_answers_every_sync_to_its_own_client() {
    let proxy = one_server_proxy().await;
    let copy = format!("COPY {SCHEMA}.copy_view (a) FROM STDIN");
    // Some data for the server to read (and ignore) between its two ReadyForQuery.
    let mut batch = vec![parse("", &copy), bind("", &[]), execute(), sync()];
    batch.extend((0..24).map(|_| copy_data(&"3\n".repeat(4096))));
    batch.extend([copy_done(), sync()]);

    let mut direct = Raw::connect_to(&shared_cluster().primary().addr()).await;
    direct.send(&batch).await;
    assert_eq!(show(&direct.replies_until_ready(2).await), "1 2 G E:42809 Z:I Z:I");
    direct.assert_quiet(Duration::from_millis(300)).await;

    let mut a = Raw::connect(&proxy).await;
    let mut b = Raw::connect(&proxy).await;
    for round in 0..10 {
        a.send(&batch).await;
        assert_eq!(
            show(&a.replies_until_ready(2).await),
            "1 2 G E:42809 Z:I Z:I",
            "round {round}"
        );
        b.send(&[query("SELECT 1")]).await;
        let got = show(&b.replies_until_ready(1).await);
        assert_eq!(got, "T D C:SELECT 1 Z:I", "round {round}: another client got this");
    }
    a.assert_quiet(Duration::from_millis(300)).await;

    // A COPY that fails on its data instead: the Sync sent before the data was read in
    // COPY mode and ignored, so only one ReadyForQuery comes.
    let copy = format!("COPY {SCHEMA}.copy_target (a) FROM STDIN");
    a.send(&[
        parse("", &copy),
        bind("", &[]),
        execute(),
        sync(),
        copy_data("not a number\n"),
        copy_done(),
        sync(),
    ])
    .await;
    assert_eq!(show(&a.replies_until_ready(1).await), "1 2 G E:22P02 Z:I");
    a.assert_quiet(Duration::from_millis(300)).await;
    b.send(&[query("SELECT 1")]).await;
    assert_eq!(show(&b.replies_until_ready(1).await), "T D C:SELECT 1 Z:I");
    proxy.shutdown().await;
}

/// The same, as libpq and tokio-postgres do it: Bind, Execute, Sync, wait for
/// CopyInResponse, then the data, CopyDone and Sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_that_fails_before_reading_its_data_libpq_style() {
    let proxy = one_server_proxy().await;
    let copy = format!("COPY {SCHEMA}.copy_view (a) FROM STDIN");
    let mut replies = Vec::new();
    for addr in [shared_cluster().primary().addr(), proxy.addr.to_string()] {
        let mut client = Raw::connect_to(&addr).await;
        client.send(&[parse("", &copy), bind("", &[]), execute(), sync()]).await;
        let first = show(&client.replies_until_ready(1).await);
        client.send(&[copy_data("3\n"), copy_done(), sync()]).await;
        let second = show(&client.replies_until_ready(1).await);
        client.assert_quiet(Duration::from_millis(300)).await;
        client.send(&[query("SELECT 1")]).await;
        let after = show(&client.replies_until_ready(1).await);
        replies.push(format!("{first} | {second} | {after}"));
    }
    assert_eq!(replies[0], "1 2 G E:42809 Z:I | Z:I | T D C:SELECT 1 Z:I");
    assert_eq!(replies[1], replies[0], "pgrelay answers as PostgreSQL does");
    proxy.shutdown().await;
}

/// pgrelay's own Parse and Close sent inside a batch the server skips after an error:
/// pgrelay's record of the server's statements no longer matches the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_pgrelay_sends_in_a_skipped_batch_are_accounted_for() {
    let proxy = one_server_proxy().await;
    let mut a = Raw::connect(&proxy).await;
    a.send(&[parse("s1", "SELECT $1::int"), sync()]).await;
    assert_eq!(show(&a.replies_until_ready(1).await), "1 Z:I");
    // The Bind fails; pgrelay evicts s1's statement for s2's and prepares s2's: the
    // server skips both.
    a.send(&[
        bind("s1", &["oops"]),
        execute(),
        parse("s2", "SELECT 42"),
        bind("s2", &[]),
        execute(),
        sync(),
    ])
    .await;
    assert_eq!(show(&a.replies_until_ready(1).await), "E:22P02 Z:I");
    // On a direct connection s1 still exists and works; s2 does not exist.
    a.send(&[bind("s1", &["1"]), execute(), sync()]).await;
    let s1 = show(&a.replies_until_ready(1).await);
    assert_eq!(s1, "2 D C:SELECT 1 Z:I");
    a.send(&[bind("s2", &[]), execute(), sync()]).await;
    assert_eq!(show(&a.replies_until_ready(1).await), "E:26000 Z:I");
    let mut b = Raw::connect(&proxy).await;
    b.send(&[parse("b1", "SELECT 42"), bind("b1", &[]), execute(), sync()])
        .await;
    let b1 = show(&b.replies_until_ready(1).await);
    assert_eq!(b1, "1 2 D C:SELECT 1 Z:I");
    proxy.shutdown().await;
}

/// Two clients whose search_paths resolve the same text to tables of different shapes
/// share one server-side statement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_text_under_different_search_paths_is_two_statements() {
    let proxy = one_server_proxy().await;
    let admin = direct(&shared_cluster().primary().addr(), "app").await;
    admin
        .batch_execute(
            "CREATE SCHEMA IF NOT EXISTS path_a; CREATE SCHEMA IF NOT EXISTS path_b;
             GRANT USAGE ON SCHEMA path_a, path_b TO PUBLIC;
             CREATE TABLE IF NOT EXISTS path_a.t (x int);
             CREATE TABLE IF NOT EXISTS path_b.t (x text, y int);
             GRANT ALL ON ALL TABLES IN SCHEMA path_a, path_b TO PUBLIC;",
        )
        .await
        .unwrap();
    let mut a = Raw::connect(&proxy).await;
    let mut b = Raw::connect(&proxy).await;
    a.send(&[query("SET search_path = path_a")]).await;
    a.replies_until_ready(1).await;
    b.send(&[query("SET search_path = path_b")]).await;
    b.replies_until_ready(1).await;
    a.send(&[parse("s", "SELECT * FROM t"), bind("s", &[]), execute(), sync()])
        .await;
    let a1 = show(&a.replies_until_ready(1).await);
    b.send(&[parse("s", "SELECT * FROM t"), bind("s", &[]), execute(), sync()])
        .await;
    let b1 = show(&b.replies_until_ready(1).await);
    a.send(&[bind("s", &[]), execute(), sync()]).await;
    let a2 = show(&a.replies_until_ready(1).await);
    assert_eq!(a1, "1 2 C:SELECT 0 Z:I");
    assert_eq!(b1, "1 2 C:SELECT 0 Z:I");
    assert_eq!(a2, "2 C:SELECT 0 Z:I");
    proxy.shutdown().await;
}

/// A client abandons COPY FROM STDIN with CopyFail (its data source failed): the server
/// answers 57014 "COPY from stdin failed: " with the client's own text, in the simple and
/// the extended protocol, inside a transaction or not, in both pooling modes, exactly as
/// on a direct connection; the connection goes on working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_the_client_abandons_fails_with_the_client_s_text() {
    create_schema().await;
    let copy = format!("COPY {SCHEMA}.copy_target (a) FROM STDIN");
    let mut transcripts = Vec::new();
    for mode in ["direct", "transaction", "session"] {
        let proxy = match mode {
            "direct" => None,
            mode => Some(Proxy::start(&config_for(shared_cluster(), &format!("mode = \"{mode}\"\nsize = 2"))).await),
        };
        let addr = proxy
            .as_ref()
            .map_or_else(|| shared_cluster().primary().addr(), |proxy| proxy.addr.to_string());
        let mut client = Raw::connect_to(&addr).await;
        let mut transcript = Vec::new();
        // Simple query; the data and CopyFail after CopyInResponse.
        client.send(&[query(&copy)]).await;
        assert_eq!(show(&client.replies_until('G').await), "G", "{mode}");
        client
            .send(&[copy_data("1\n"), copy_fail("the generator raised")])
            .await;
        transcript.push(client.transcript_until_ready(1).await);
        // Simple query, all in one write (asyncpg does not wait for CopyInResponse).
        client
            .send(&[query(&copy), copy_data("2\n"), copy_fail("abandoned early")])
            .await;
        transcript.push(client.transcript_until_ready(1).await);
        // Extended protocol as libpq does it: Sync before the data (ignored in COPY
        // mode), Sync after CopyFail.
        client.send(&[parse("", &copy), bind("", &[]), execute(), sync()]).await;
        assert_eq!(show(&client.replies_until('G').await), "1 2 G", "{mode}");
        client.send(&[copy_data("3\n"), copy_fail("libpq style"), sync()]).await;
        transcript.push(client.transcript_until_ready(1).await);
        // Extended protocol, all in one write.
        client
            .send(&[
                parse("", &copy),
                bind("", &[]),
                execute(),
                copy_data("4\n"),
                copy_fail("in one go"),
                sync(),
            ])
            .await;
        transcript.push(client.transcript_until_ready(1).await);
        // Inside a transaction: the transaction is failed until ROLLBACK.
        client
            .send(&[
                query("BEGIN"),
                query(&copy),
                copy_data("5\n"),
                copy_fail("in a transaction"),
            ])
            .await;
        transcript.push(client.transcript_until_ready(2).await);
        client.send(&[query("SELECT 1"), query("ROLLBACK")]).await;
        transcript.push(client.transcript_until_ready(2).await);
        client
            .send(&[query(&format!(
                "SELECT count(*) FROM {SCHEMA}.copy_target WHERE a BETWEEN 1 AND 5"
            ))])
            .await;
        transcript.push(show(&client.replies_until_ready(1).await));
        client.assert_quiet(Duration::from_millis(200)).await;
        transcripts.push(transcript.join(" | "));
        if let Some(proxy) = proxy {
            proxy.shutdown().await;
        }
    }
    let failed = |text: &str, status: char| format!("E:57014:COPY from stdin failed: {text} Z:{status}");
    let expected = [
        failed("the generator raised", 'I'),
        format!("G {}", failed("abandoned early", 'I')),
        failed("libpq style", 'I'),
        format!("1 2 G {}", failed("in one go", 'I')),
        format!("C:BEGIN Z:T G {}", failed("in a transaction", 'E')),
        "E:25P02:current transaction is aborted, commands ignored until end of transaction block Z:E C:ROLLBACK Z:I"
            .to_owned(),
        "T D C:SELECT 1 Z:I".to_owned(),
    ]
    .join(" | ");
    assert_eq!(transcripts[0], expected, "a direct connection");
    assert_eq!(transcripts[1], expected, "transaction mode");
    assert_eq!(transcripts[2], expected, "session mode");
}

/// asyncpg sends a CancelRequest right behind its CopyFail, and runs its next statement
/// once the cancel connection is closed. PostgreSQL closes it only after it has signalled
/// the backend, so the signal finds the failed COPY or an idle backend, never the next
/// statement; pgrelay must not close it before the cancel is delivered either. Here with
/// the server kept between statements: session mode, and a transaction in transaction
/// mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_sent_behind_a_copy_fail_never_cancels_the_next_statement() {
    create_schema().await;
    let copy = format!("COPY {SCHEMA}.copy_target (a) FROM STDIN");
    for mode in ["session", "transaction"] {
        let proxy = Proxy::start(&config_for(shared_cluster(), &format!("mode = \"{mode}\"\nsize = 2"))).await;
        let addr = proxy.addr.to_string();
        let (mut client, key) = Raw::connect_keyed(&addr, "").await;
        let in_transaction = mode == "transaction";
        for round in 0..5 {
            if in_transaction {
                client.send(&[query("BEGIN"), query("SAVEPOINT before_copy")]).await;
                assert_eq!(
                    show(&client.replies_until_ready(2).await),
                    "C:BEGIN Z:T C:SAVEPOINT Z:T"
                );
            }
            client
                .send(&[query(&copy), copy_data("1\n"), copy_fail("the generator raised")])
                .await;
            cancel(&addr, key).await;
            // The COPY fails with 57014 either way: from the CopyFail, or from the cancel
            // if that reached the server first (before CopyInResponse, even), as on a
            // direct connection.
            let status = if in_transaction { 'E' } else { 'I' };
            let failed = show(&client.replies_until_ready(1).await);
            let failed = failed.strip_prefix("G ").unwrap_or(&failed);
            assert_eq!(failed, format!("E:57014 Z:{status}"), "{mode}, round {round}");
            let status = if in_transaction { 'T' } else { 'I' };
            if in_transaction {
                client.send(&[query("ROLLBACK TO SAVEPOINT before_copy")]).await;
                let rolled_back = show(&client.replies_until_ready(1).await);
                assert_eq!(
                    rolled_back, "C:ROLLBACK Z:T",
                    "{mode}, round {round}: the next statement"
                );
            }
            client.send(&[query("SELECT pg_sleep(0.1)")]).await;
            let next = show(&client.replies_until_ready(1).await);
            assert_eq!(
                next,
                format!("T D C:SELECT 1 Z:{status}"),
                "{mode}, round {round}: the next statement"
            );
            if in_transaction {
                client.send(&[query("ROLLBACK")]).await;
                assert_eq!(show(&client.replies_until_ready(1).await), "C:ROLLBACK Z:I");
            }
        }
        proxy.shutdown().await;
    }
}

/// The server's error reaches the client while the client is still sending the rest of
/// its batch, as on a direct connection, so that a client that watches for it can stop
/// early (asyncpg's executemany does). The client sends a statement that fails after a
/// moment, then keeps sending (Flush messages, faster than pgrelay can take them) and
/// stops when a reply arrives. pgrelay's worker looks at its sockets only when it runs
/// out of work (what a busy worker does), and a relay in front of the server takes
/// everything at once, so the server never makes pgrelay wait: pgrelay must still read
/// the server's socket while the client's input keeps coming. The client and the relay
/// are plain threads, so that nothing on their side pauses the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_reaches_the_client_while_it_is_still_sending_its_batch() {
    /// Bytes the client gives up after: far more than the kernel and pgrelay buffer.
    const CAP: usize = 256 << 20;
    let relay = relay(&shared_cluster().primary().addr());
    let config = config_for(shared_cluster(), "mode = \"transaction\"\nsize = 1")
        .replace(&shared_cluster().primary().addr(), &relay);
    let proxy = Proxy::start_busy(&config).await;
    let mut sent = Vec::new();
    for _ in 0..3 {
        let client = Raw::connect_to(&proxy.addr.to_string()).await;
        let stream = client.stream.into_std().unwrap();
        sent.push(
            tokio::task::spawn_blocking(move || sent_before_the_error(stream, CAP))
                .await
                .unwrap(),
        );
    }
    println!("bytes sent before the error arrived: {sent:?}");
    assert!(
        sent.iter().all(|&sent| sent < CAP),
        "the error arrived only after the whole batch: {sent:?} bytes"
    );
    proxy.shutdown().await;
}

/// Sends a statement that fails after a moment, then Flush messages, 64 KB at a time,
/// until a reply arrives or `cap` bytes went out, then the batch's Sync; returns the bytes
/// sent before the reply.
fn sent_before_the_error(stream: std::net::TcpStream, cap: usize) -> usize {
    use std::io::{Read, Write};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    stream.set_nonblocking(false).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = stream;
    let statement = [
        parse("", "SELECT pg_sleep(0.2), 1 / (random() * 0)::int"),
        bind("", &[]),
        execute(),
    ]
    .concat();
    writer.write_all(&statement).unwrap();
    let replied = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let writing = std::thread::spawn({
        let (replied, sent) = (replied.clone(), sent.clone());
        move || {
            let flushes = flush().repeat(64 * 1024 / flush().len());
            while !replied.load(Ordering::Acquire) && sent.load(Ordering::Acquire) < cap {
                writer.write_all(&flushes).unwrap();
                sent.fetch_add(flushes.len(), Ordering::AcqRel);
            }
            writer.write_all(&sync()).unwrap();
        }
    });
    reader.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut input = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let read = reader.read(&mut buf).expect("a reply within 60 s");
    let sent_before = sent.load(Ordering::Acquire);
    replied.store(true, Ordering::Release);
    input.extend_from_slice(&buf[..read]);
    writing.join().unwrap();
    let mut replies = Vec::new();
    loop {
        while input.len() >= 5 {
            let len = u32::from_be_bytes([input[1], input[2], input[3], input[4]]) as usize;
            if input.len() <= len {
                break;
            }
            let message: Vec<u8> = input.drain(..=len).collect();
            replies.push(common::raw::parse_reply(&message));
        }
        if replies.last() == Some(&common::raw::Reply::Ready('I')) {
            break;
        }
        let read = reader.read(&mut buf).expect("a reply within 60 s");
        assert!(read > 0, "the connection closed");
        input.extend_from_slice(&buf[..read]);
    }
    assert_eq!(show(&replies), "1 2 E:22012 Z:I");
    sent_before
}

/// A TCP relay in front of `server` that reads whatever comes at once, so that the
/// server's own pace never holds its client back; returns its address. Plain threads:
/// it lives as long as the test binary.
fn relay(server: &str) -> String {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let server = server.to_owned();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let (Ok(mut client), Ok(mut upstream)) = (client, std::net::TcpStream::connect(&server)) else {
                continue;
            };
            let (Ok(mut client_out), Ok(mut upstream_in)) = (client.try_clone(), upstream.try_clone()) else {
                continue;
            };
            let (queue, queued) = std::sync::mpsc::channel::<Vec<u8>>();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n @ 1..) = client.read(&mut buf) {
                    if queue.send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
            });
            std::thread::spawn(move || {
                for bytes in queued {
                    if upstream.write_all(&bytes).is_err() {
                        break;
                    }
                }
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut upstream_in, &mut client_out);
            });
        }
    });
    addr
}
