//! End-to-end: LISTEN / NOTIFY in transaction mode with listen_notify = "fanout" (the
//! default): clients are answered by pgrelay and not pinned, one listener connection per
//! database serves them all, notifications reach clients while they are idle and while
//! other clients' transactions run, a client that does not read is disconnected, and a
//! lost listener connection is reopened with a warning to the clients.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is a failed test

mod common;

use std::time::Duration;

use common::raw::{Raw, query};
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

/// Server connections of `user` on the primary that ran a LISTEN last.
async fn listener_connections(admin: &Client, user: &str) -> i64 {
    admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND query ILIKE 'LISTEN%'",
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
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = 'app_t15' AND query ILIKE 'LISTEN%'",
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
