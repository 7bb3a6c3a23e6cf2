//! End-to-end: LISTEN / NOTIFY in transaction mode with listen_notify = "fanout" (the
//! default): clients are answered by pgrelay and not pinned, one listener connection per
//! database serves them all, notifications reach clients while they are idle and while
//! other clients' transactions run, a client that does not read is disconnected, and a
//! lost listener connection is reopened with a warning to the clients. LISTEN through the
//! extended protocol (unnamed and named statements) is answered by pgrelay too, and
//! inside a transaction block it takes effect at COMMIT and never after a ROLLBACK.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is a failed test

mod common;

use std::time::Duration;

use common::raw::{Raw, bind, execute, message, parse, query, show, sync};
use common::{Proxy, config_for, direct, shared_cluster, wait_until};
use futures_util::{StreamExt, stream};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, NoTls};

/// How long anything here may take on a loaded machine.
const PATIENCE: Duration = Duration::from_secs(30);

/// A client whose notifications and notices come out of `messages`.
struct Listener {
    client: Client,
    messages: mpsc::UnboundedReceiver<AsyncMessage>,
}

impl Listener {
    async fn connect(url: &str) -> Listener {
        let (client, mut connection) = tokio_postgres::connect(url, NoTls).await.unwrap();
        let (sender, messages) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut incoming = stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(Ok(message)) = incoming.next().await {
                if sender.send(message).is_err() {
                    break;
                }
            }
        });
        Listener { client, messages }
    }

    /// The next notification (notices are skipped), as (channel, payload, sender pid).
    async fn notification(&mut self) -> (String, String, i32) {
        loop {
            let message = tokio::time::timeout(PATIENCE, self.messages.recv())
                .await
                .expect("no notification in time")
                .expect("connection ended");
            if let AsyncMessage::Notification(n) = message {
                return (n.channel().to_owned(), n.payload().to_owned(), n.process_id());
            }
        }
    }
}

fn fanout_config() -> String {
    config_for(shared_cluster(), "size = 4")
}

/// pgrelay's listener connections of `user` on the primary.
async fn listener_connections(admin: &Client, user: &str) -> i64 {
    admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND application_name = 'pgrelay listener'",
            &[&user],
        )
        .await
        .unwrap()
        .get(0)
}

async fn metric(proxy: &Proxy, name: &str, label: Option<&str>) -> f64 {
    proxy
        .running()
        .shared()
        .metrics
        .gather()
        .iter()
        .filter(|family| family.name() == name)
        .flat_map(|family| family.get_metric().iter())
        .filter(|metric| label.is_none_or(|wanted| metric.get_label().iter().any(|pair| pair.value() == wanted)))
        .map(|metric| metric.get_gauge().get_value() + metric.get_counter().get_value())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_listeners_share_one_server_connection_and_hear_every_notification() {
    let cluster = shared_cluster();
    let proxy = Proxy::start(&fanout_config()).await;
    let admin = direct(&cluster.primary().addr(), "app").await;
    let url = proxy.url("app_t12", "app_t12", "app");
    let mut listeners = Vec::new();
    for _ in 0..100 {
        let listener = Listener::connect(&url).await;
        listener
            .client
            .batch_execute("LISTEN fan_hundred; LISTEN \"Fan Both\"")
            .await
            .unwrap();
        listeners.push(listener);
    }
    assert_eq!(
        listener_connections(&admin, "app_t12").await,
        1,
        "one listener connection"
    );
    let servers: i64 = admin
        .query_one("SELECT count(*) FROM pg_stat_activity WHERE usename = 'app_t12'", &[])
        .await
        .unwrap()
        .get(0);
    assert!(servers <= 5, "pool of 4 plus the listener, got {servers}");
    assert_eq!(metric(&proxy, "pgrelay_listen_clients", Some("app")).await, 100.0);
    assert_eq!(metric(&proxy, "pgrelay_listen_channels", Some("app")).await, 2.0);

    // Another client's transaction is open through pgrelay while the notification comes.
    let busy = proxy.connect("app_t12", "app_t12", "app").await.unwrap();
    busy.batch_execute("BEGIN; SELECT 1").await.unwrap();
    admin
        .batch_execute("NOTIFY fan_hundred, 'while another transaction runs'")
        .await
        .unwrap();
    let admin_pid: i32 = admin.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    for listener in &mut listeners {
        let (channel, payload, pid) = listener.notification().await;
        assert_eq!(
            (channel.as_str(), payload.as_str()),
            ("fan_hundred", "while another transaction runs")
        );
        assert_eq!(pid, admin_pid, "the real sender's PID");
    }
    busy.batch_execute("COMMIT").await.unwrap();

    // Half of them stop listening: the next notification reaches the other half only.
    // Delivery is in order, so a later notification on a channel all listen to shows
    // that the earlier one is not coming.
    for listener in listeners.iter().take(50) {
        listener.client.batch_execute("UNLISTEN fan_hundred").await.unwrap();
    }
    admin
        .batch_execute("NOTIFY fan_hundred, 'half'; NOTIFY \"Fan Both\", 'all'")
        .await
        .unwrap();
    for (index, listener) in listeners.iter_mut().enumerate() {
        if index >= 50 {
            assert_eq!(listener.notification().await.1, "half");
        }
        assert_eq!(listener.notification().await.1, "all", "client {index}");
    }

    // A client's own NOTIFY goes through its server and comes back to it, and one of a
    // transaction that rolls back never comes.
    let own = &mut listeners[99];
    own.client
        .batch_execute("BEGIN; NOTIFY fan_hundred, 'rolled back'; ROLLBACK")
        .await
        .unwrap();
    own.client.batch_execute("NOTIFY fan_hundred, 'own'").await.unwrap();
    assert_eq!(own.notification().await.1, "own");

    // A client inside its own transaction hears of a notification after it ends.
    own.client.batch_execute("BEGIN; SELECT 1").await.unwrap();
    admin.batch_execute("NOTIFY fan_hundred, 'after commit'").await.unwrap();
    own.client.batch_execute("COMMIT").await.unwrap();
    assert_eq!(own.notification().await.1, "after commit");

    // Nobody listens any more: the listener connection closes.
    for listener in &listeners {
        listener.client.batch_execute("UNLISTEN *").await.unwrap();
    }
    wait_until("the listener connection closes", PATIENCE, || async {
        listener_connections(&admin, "app_t12").await == 0
    })
    .await;
    assert_eq!(metric(&proxy, "pgrelay_listen_clients", Some("app")).await, 0.0);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_is_answered_by_pgrelay_with_postgresql_names() {
    let proxy = Proxy::start(&fanout_config()).await;
    let mut raw = Raw::connect(&proxy).await;
    raw.send(&[query("LISTEN Fan_Case; UNLISTEN x; UNLISTEN *; LISTEN \"Fan_Case\"")])
        .await;
    assert_eq!(
        raw.transcript_until_ready(1).await,
        "C:LISTEN C:UNLISTEN C:UNLISTEN C:LISTEN Z:I"
    );
    let mut listener = Listener::connect(&proxy.url("app_t13", "app_t13", "app")).await;
    let long = "l".repeat(70);
    listener
        .client
        .batch_execute(&format!("LISTEN fan_case; LISTEN {long}"))
        .await
        .unwrap();
    let admin = direct(&shared_cluster().primary().addr(), "app").await;
    admin
        .batch_execute(&format!(
            "NOTIFY \"FAN_CASE\", 'no'; NOTIFY {long}, 'cut to 63 bytes'; NOTIFY Fan_Case, 'folded'"
        ))
        .await
        .unwrap();
    assert_eq!(listener.notification().await.1, "cut to 63 bytes");
    assert_eq!(listener.notification().await.1, "folded");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_is_disconnected_and_the_others_are_not() {
    let proxy = Proxy::start(&fanout_config()).await;
    let mut deaf = Raw::connect(&proxy).await;
    deaf.send(&[query("LISTEN fan_flood")]).await;
    assert_eq!(deaf.transcript_until_ready(1).await, "C:LISTEN Z:I");
    let mut reader = Listener::connect(&proxy.url("app_t14", "app_t14", "app")).await;
    reader.client.batch_execute("LISTEN fan_flood").await.unwrap();
    let admin = direct(&shared_cluster().primary().addr(), "app").await;
    // Large payloads, distinct so that the server does not fold them: the socket buffers
    // fill, then the deaf client's queue in pgrelay. Batches of 350 kB stay well within
    // the queue of a client that reads.
    let mut sent = 0;
    let mut received = 0;
    while metric(&proxy, "pgrelay_listen_clients", Some("app")).await > 1.0 {
        assert!(sent < 40_000, "the deaf client was never disconnected");
        admin
            .batch_execute(&format!(
                "SELECT pg_notify('fan_flood', repeat('x', 7000) || i) FROM generate_series({sent}, {}) AS i",
                sent + 49
            ))
            .await
            .unwrap();
        sent += 50;
        // The reader keeps up.
        while received < sent {
            reader.notification().await;
            received += 1;
        }
    }
    assert!(metric(&proxy, "pgrelay_notifications_total", Some("dropped")).await >= 1.0);
    // The reader goes on hearing everything.
    admin.batch_execute("NOTIFY fan_flood, 'still here'").await.unwrap();
    assert_eq!(reader.notification().await.1, "still here");
    // The deaf client finds its connection closed after what was already on its way, and
    // the reason if pgrelay could still write it (the client was not reading then).
    let mut input = std::mem::take(&mut deaf.input);
    let mut chunk = vec![0u8; 256 * 1024];
    loop {
        let read = tokio::time::timeout(PATIENCE, deaf.stream.read(&mut chunk))
            .await
            .expect("the deaf client's connection closes");
        match read {
            Ok(0) | Err(_) => break,
            Ok(n) => input.extend_from_slice(&chunk[..n]),
        }
    }
    let mut rest = &input[..];
    while rest.len() >= 5 {
        let len = 1 + u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        let Some(message) = rest.get(..len) else { break };
        match message[0] {
            b'A' => {}
            b'E' => {
                let text = String::from_utf8_lossy(message);
                assert!(
                    text.contains("54000") && text.contains("did not read its notifications"),
                    "{text}"
                );
            }
            other => panic!("unexpected message {:?}", other as char),
        }
        rest = &rest[len..];
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_listener_connection_is_reopened_with_a_warning() {
    let proxy = Proxy::start(&fanout_config()).await;
    let admin = direct(&shared_cluster().primary().addr(), "app").await;
    let mut listener = Listener::connect(&proxy.url("app_t15", "app_t15", "app")).await;
    listener.client.batch_execute("LISTEN fan_lost").await.unwrap();
    let killed: i64 = admin
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = 'app_t15' AND application_name = 'pgrelay listener'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(killed, 1);
    // The warning comes first.
    let warning = loop {
        let message = tokio::time::timeout(PATIENCE, listener.messages.recv())
            .await
            .expect("a warning in time")
            .expect("connection ended");
        if let AsyncMessage::Notice(notice) = message {
            break notice;
        }
    };
    assert_eq!(warning.severity(), "WARNING");
    assert!(
        warning.message().contains("may have been lost"),
        "{}",
        warning.message()
    );
    // Notifications flow again once it is back: sent until one arrives.
    let mut round = 0;
    loop {
        round += 1;
        assert!(round < 300, "no notification after the reconnect");
        admin
            .batch_execute(&format!("NOTIFY fan_lost, 'after {round}'"))
            .await
            .unwrap();
        if let Ok(Some(AsyncMessage::Notification(n))) =
            tokio::time::timeout(Duration::from_millis(100), listener.messages.recv()).await
        {
            assert!(n.payload().starts_with("after"));
            break;
        }
    }
    assert_eq!(listener_connections(&admin, "app_t15").await, 1);
    proxy.shutdown().await;
}

/// The pinned clients of database `app`, for any reason.
async fn pinned(proxy: &Proxy) -> f64 {
    metric(proxy, "pgrelay_pinned_sessions", Some("app")).await
}

/// A Describe of the unnamed portal.
fn describe_portal() -> Vec<u8> {
    message(b'D', b"P\0")
}

/// A Describe of statement `name`.
fn describe_statement(name: &str) -> Vec<u8> {
    let mut body = vec![b'S'];
    body.extend_from_slice(name.as_bytes());
    body.push(0);
    message(b'D', &body)
}

/// Sends NOTIFY `marker` on `channel` and waits for it: every notification sent before
/// it that was to come has come (delivery is in order), and is returned.
async fn until_marker(listener: &mut Listener, admin: &Client, channel: &str, marker: &str) -> Vec<String> {
    admin
        .batch_execute(&format!("NOTIFY {channel}, '{marker}'"))
        .await
        .unwrap();
    let mut before = Vec::new();
    loop {
        let (_, payload, _) = listener.notification().await;
        if payload == marker {
            return before;
        }
        before.push(payload);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_protocol_listen_is_answered_by_pgrelay_without_pinning() {
    let proxy = Proxy::start(&config_for(shared_cluster(), "size = 2")).await;
    let admin = direct(&shared_cluster().primary().addr(), "app").await;

    // Five clients of a pool of two LISTEN with prepared statements (tokio-postgres'
    // execute: Parse of a named statement, Describe, then Bind and Execute).
    let url = proxy.url("app_t16", "app_t16", "app");
    let mut listeners = Vec::new();
    for _ in 0..5 {
        let listener = Listener::connect(&url).await;
        listener.client.execute("LISTEN fan_ext", &[]).await.unwrap();
        listener.client.execute("LISTEN fan_ext_marker", &[]).await.unwrap();
        listeners.push(listener);
    }
    assert_eq!(pinned(&proxy).await, 0.0, "no listening client is pinned");
    assert_eq!(
        listener_connections(&admin, "app_t16").await,
        1,
        "one listener connection"
    );
    let servers: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app_t16' \
             AND backend_type = 'client backend' AND application_name <> 'pgrelay listener'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        servers <= 2,
        "five listening clients, the pool of two: {servers} server connections"
    );
    // Every one of them can still run queries with a pool of two.
    for listener in &listeners {
        listener.client.query_one("SELECT 1", &[]).await.unwrap();
    }
    admin.batch_execute("NOTIFY fan_ext, 'extended'").await.unwrap();
    for listener in &mut listeners {
        assert_eq!(
            listener.notification().await.0.as_str(),
            "fan_ext",
            "every client hears it"
        );
    }

    // What a driver sees, message by message: the unnamed statement, then a named one
    // described first as tokio-postgres and pgjdbc do.
    let mut raw = Raw::connect(&proxy).await;
    raw.send(&[
        parse("", "LISTEN fan_ext_raw"),
        bind("", &[]),
        describe_portal(),
        execute(),
        sync(),
    ])
    .await;
    assert_eq!(show(&raw.replies_until_ready(1).await), "1 2 n C:LISTEN Z:I");
    raw.send(&[parse("unl", "UNLISTEN fan_ext_raw"), describe_statement("unl"), sync()])
        .await;
    assert_eq!(show(&raw.replies_until_ready(1).await), "1 t n Z:I");
    raw.send(&[bind("unl", &[]), execute(), sync()]).await;
    assert_eq!(show(&raw.replies_until_ready(1).await), "2 C:UNLISTEN Z:I");
    // A LISTEN and a SELECT in one batch: the SELECT goes to a server, in order.
    raw.send(&[
        parse("", "LISTEN fan_ext_raw"),
        bind("", &[]),
        execute(),
        parse("", "SELECT 1"),
        bind("", &[]),
        execute(),
        sync(),
    ])
    .await;
    assert_eq!(
        show(&raw.replies_until_ready(1).await),
        "1 2 C:LISTEN 1 2 D C:SELECT 1 Z:I"
    );
    assert_eq!(pinned(&proxy).await, 0.0, "no client is pinned");

    // UNLISTEN through the extended protocol stops delivery to that client.
    let quiet = &mut listeners[0];
    quiet.client.execute("UNLISTEN fan_ext", &[]).await.unwrap();
    admin
        .batch_execute("NOTIFY fan_ext, 'not for the first'")
        .await
        .unwrap();
    assert_eq!(
        until_marker(quiet, &admin, "fan_ext_marker", "marker").await,
        Vec::<String>::new()
    );
    assert_eq!(listeners[1].notification().await.1, "not for the first");
    assert_eq!(metric(&proxy, "pgrelay_listen_clients", Some("app")).await, 6.0);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_in_a_transaction_block_takes_effect_at_commit_and_never_after_rollback() {
    let proxy = Proxy::start(&fanout_config()).await;
    let admin = direct(&shared_cluster().primary().addr(), "app").await;
    let mut listener = Listener::connect(&proxy.url("app_t11", "app_t11", "app")).await;
    listener.client.batch_execute("LISTEN fan_tx_marker").await.unwrap();

    // Committed: heard from the commit on, not before (as on a direct connection).
    listener.client.batch_execute("BEGIN").await.unwrap();
    listener.client.batch_execute("LISTEN fan_tx").await.unwrap();
    admin.batch_execute("NOTIFY fan_tx, 'before commit'").await.unwrap();
    listener.client.batch_execute("COMMIT").await.unwrap();
    admin.batch_execute("NOTIFY fan_tx, 'after commit'").await.unwrap();
    assert_eq!(
        until_marker(&mut listener, &admin, "fan_tx_marker", "m1").await,
        vec!["after commit".to_owned()]
    );

    // A channel another client listens to already: what was committed before this
    // client's LISTEN returned is not for it, even though the listener connection gets it.
    let mut other = Listener::connect(&proxy.url("app_t11", "app_t11", "app")).await;
    other.client.batch_execute("LISTEN fan_tx_shared").await.unwrap();
    admin.batch_execute("NOTIFY fan_tx_shared, 'before'").await.unwrap();
    listener.client.batch_execute("LISTEN fan_tx_shared").await.unwrap();
    admin.batch_execute("NOTIFY fan_tx_shared, 'after'").await.unwrap();
    assert_eq!(other.notification().await.1, "before");
    assert_eq!(
        until_marker(&mut listener, &admin, "fan_tx_marker", "m1b").await,
        vec!["after".to_owned()]
    );
    listener.client.batch_execute("UNLISTEN fan_tx_shared").await.unwrap();
    drop(other);

    // Rolled back: a LISTEN never takes effect, an UNLISTEN never stops anything.
    listener.client.batch_execute("BEGIN; SELECT 1").await.unwrap();
    listener.client.batch_execute("LISTEN fan_tx_rolled").await.unwrap();
    listener.client.batch_execute("UNLISTEN fan_tx").await.unwrap();
    listener.client.batch_execute("ROLLBACK").await.unwrap();
    admin
        .batch_execute("NOTIFY fan_tx_rolled, 'never'; NOTIFY fan_tx, 'still listening'")
        .await
        .unwrap();
    assert_eq!(
        until_marker(&mut listener, &admin, "fan_tx_marker", "m2").await,
        vec!["still listening".to_owned()]
    );

    // The extended protocol in a transaction (tokio-postgres' transaction(), as
    // psycopg and pgjdbc without autocommit): at COMMIT, and not at ROLLBACK.
    let transaction = listener.client.transaction().await.unwrap();
    transaction.execute("LISTEN fan_tx_extended", &[]).await.unwrap();
    transaction.rollback().await.unwrap();
    let transaction = listener.client.transaction().await.unwrap();
    transaction.execute("UNLISTEN fan_tx", &[]).await.unwrap();
    transaction.execute("LISTEN fan_tx_extended_2", &[]).await.unwrap();
    transaction.commit().await.unwrap();
    admin
        .batch_execute(
            "NOTIFY fan_tx_extended, 'rolled back'; NOTIFY fan_tx, 'unlistened'; NOTIFY fan_tx_extended_2, 'committed'",
        )
        .await
        .unwrap();
    assert_eq!(
        until_marker(&mut listener, &admin, "fan_tx_marker", "m3").await,
        vec!["committed".to_owned()]
    );

    // A NOTIFY inside a transaction that rolls back is never delivered.
    admin
        .batch_execute("BEGIN; NOTIFY fan_tx_extended_2, 'notify rolled back'; ROLLBACK")
        .await
        .unwrap();
    assert_eq!(
        until_marker(&mut listener, &admin, "fan_tx_marker", "m4").await,
        Vec::<String>::new()
    );
    assert_eq!(pinned(&proxy).await, 0.0, "the client was never pinned");

    // In a failed transaction block the LISTEN is refused as the server refuses it.
    let mut raw = Raw::connect(&proxy).await;
    raw.send(&[query("BEGIN")]).await;
    assert_eq!(raw.transcript_until_ready(1).await, "C:BEGIN Z:T");
    raw.send(&[query("SELECT 1/0")]).await;
    assert_eq!(show(&raw.replies_until_ready(1).await), "E:22012 Z:E");
    raw.send(&[query("LISTEN fan_tx_failed")]).await;
    assert_eq!(show(&raw.replies_until_ready(1).await), "E:25P02 Z:E");
    raw.send(&[parse("", "LISTEN fan_tx_failed"), bind("", &[]), execute(), sync()])
        .await;
    assert_eq!(show(&raw.replies_until_ready(1).await), "E:25P02 Z:E");
    raw.send(&[query("ROLLBACK")]).await;
    assert_eq!(show(&raw.replies_until_ready(1).await), "C:ROLLBACK Z:I");
    // The extended protocol's implicit transaction: a LISTEN whose batch fails later
    // is rolled back with it.
    raw.send(&[
        parse("", "LISTEN fan_tx_failed"),
        bind("", &[]),
        execute(),
        parse("", "SELECT 1/0"),
        bind("", &[]),
        execute(),
        sync(),
    ])
    .await;
    assert_eq!(show(&raw.replies_until_ready(1).await), "1 2 C:LISTEN 1 E:22012 Z:I");
    // fan_tx_marker and fan_tx_extended_2: nothing of the failed transactions.
    assert_eq!(metric(&proxy, "pgrelay_listen_channels", Some("app")).await, 2.0);
    assert_eq!(pinned(&proxy).await, 0.0, "nobody was pinned");

    // After a SAVEPOINT a LISTEN goes to the server (pinning the client), which keeps
    // PostgreSQL's word on ROLLBACK TO.
    listener.client.batch_execute("BEGIN; SAVEPOINT s").await.unwrap();
    listener.client.batch_execute("LISTEN fan_tx_savepoint").await.unwrap();
    listener.client.batch_execute("ROLLBACK TO s").await.unwrap();
    listener.client.batch_execute("COMMIT").await.unwrap();
    admin
        .batch_execute("NOTIFY fan_tx_savepoint, 'rolled back to the savepoint'")
        .await
        .unwrap();
    assert_eq!(
        until_marker(&mut listener, &admin, "fan_tx_marker", "m5").await,
        Vec::<String>::new()
    );
    proxy.shutdown().await;
}
