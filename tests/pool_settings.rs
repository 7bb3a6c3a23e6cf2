//! End-to-end: the `[pool]` and client limits of the config do what they say, and the
//! startup parameters a client sends behave as on a direct connection.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is a failed test

mod common;

use std::time::Duration;

use common::{Proxy, backends, config_for, direct, first_value, shared_cluster, sqlstate, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn count_backends_until(user: &str, expected: i64) {
    let observer = direct(&shared_cluster().primary().addr(), "app").await;
    let what = format!("{expected} server connections for {user}");
    wait_until(&what, Duration::from_secs(15), || {
        let observer = &observer;
        async move { backends(observer, user).await == expected }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_size_is_opened_and_idle_servers_close_after_server_idle_timeout() {
    let cluster = shared_cluster();
    let proxy = Proxy::start(&config_for(cluster, "size = 4\nmin_size = 2")).await;
    let client = proxy.connect("app_t1", "app_t1", "app").await.unwrap();
    client.simple_query("SELECT 1").await.unwrap();
    // The pool is made at the first login, and its janitor opens min_size at once. The
    // client's own checkout may come first or meanwhile, and then rightly opens one of
    // its own (min_size is a floor, and nobody waits for the janitor): 2 or 3.
    let observer = direct(&cluster.primary().addr(), "app").await;
    wait_until(
        "min_size server connections for app_t1",
        Duration::from_secs(15),
        || {
            let observer = &observer;
            async move { (2..=3).contains(&backends(observer, "app_t1").await) }
        },
    )
    .await;
    proxy.shutdown().await;
    count_backends_until("app_t1", 0).await;

    let proxy = Proxy::start(&config_for(cluster, "size = 4\nserver_idle_timeout = \"300ms\"")).await;
    let client = proxy.connect("app_t2", "app_t2", "app").await.unwrap();
    client.simple_query("SELECT 1").await.unwrap();
    count_backends_until("app_t2", 0).await;
    // The client is still served: a new connection is opened for it.
    client.simple_query("SELECT 1").await.unwrap();
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_lifetime_replaces_old_connections() {
    let cluster = shared_cluster();
    let proxy = Proxy::start(&config_for(cluster, "size = 1\nserver_lifetime = \"200ms\"")).await;
    let client = proxy.connect("app_t3", "app_t3", "app").await.unwrap();
    let first = first_value(&client.simple_query("SELECT pg_backend_pid()").await.unwrap());
    let mut replaced = false;
    for _ in 0..100 {
        let pid = first_value(&client.simple_query("SELECT pg_backend_pid()").await.unwrap());
        if pid != first {
            replaced = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(replaced, "the connection was never replaced");
    count_backends_until("app_t3", 1).await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reserve_serves_a_client_that_waited_reserve_timeout() {
    let cluster = shared_cluster();
    let proxy = Proxy::start(&config_for(
        cluster,
        "size = 1\nreserve_size = 1\nreserve_timeout = \"200ms\"\nquery_wait_timeout = \"10s\"",
    ))
    .await;
    let holder = proxy.connect("app_t4", "app_t4", "app").await.unwrap();
    let waiter = proxy.connect("app_t4", "app_t4", "app").await.unwrap();
    holder.simple_query("BEGIN").await.unwrap();
    let started = std::time::Instant::now();
    assert_eq!(
        first_value(&waiter.simple_query("SELECT 'from the reserve'").await.unwrap()),
        "from the reserve"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(150),
        "served before reserve_timeout"
    );
    assert!(started.elapsed() < Duration::from_secs(5), "the reserve was not used");
    assert_eq!(
        backends(&direct(&cluster.primary().addr(), "app").await, "app_t4").await,
        2
    );
    holder.simple_query("COMMIT").await.unwrap();
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_clients_are_served_first_come_first_served() {
    let cluster = shared_cluster();
    let proxy = Proxy::start(&config_for(cluster, "size = 1\nquery_wait_timeout = \"0\"")).await;
    let holder = proxy.connect("app_t5", "app_t5", "app").await.unwrap();
    holder.simple_query("BEGIN").await.unwrap();
    let tag = format!("fifo-{}", std::process::id());
    let database = proxy.running().shared().snapshot().database("app").unwrap();
    let mut waiters = Vec::new();
    for position in 1..=4 {
        let client = proxy.connect("app_t5", "app_t5", "app").await.unwrap();
        let sql = format!("INSERT INTO items (owner, value) VALUES ('{tag}', {position})");
        waiters.push(tokio::spawn(
            async move { client.simple_query(&sql).await.map(|_| client) },
        ));
        wait_until("the client queues", Duration::from_secs(10), || {
            let waiting: usize = database
                .all_pools()
                .iter()
                .map(|(_, pools)| pools.hosts[0].status().waiting)
                .sum();
            async move { waiting == position }
        })
        .await;
    }
    holder.simple_query("COMMIT").await.unwrap();
    for waiter in waiters {
        tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
    let order = holder
        .simple_query(&format!(
            "SELECT string_agg(value::text, ',' ORDER BY id) FROM items WHERE owner = '{tag}'"
        ))
        .await
        .unwrap();
    assert_eq!(first_value(&order), "1,2,3,4");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_clients_are_closed_after_client_idle_timeout() {
    let cluster = shared_cluster();
    let config = config_for(cluster, "size = 1").replace("[server]\n", "[server]\nclient_idle_timeout = \"300ms\"\n");
    let proxy = Proxy::start(&config).await;
    let client = proxy.app().await;
    client.simple_query("SELECT 1").await.unwrap();
    wait_until("the idle client is disconnected", Duration::from_secs(10), || {
        let closed = client.is_closed();
        async move { closed }
    })
    .await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_parameters_apply_per_client_even_on_a_shared_server() {
    let cluster = shared_cluster();
    let proxy = Proxy::start(&config_for(cluster, "size = 1")).await;
    let url = |extra: &str| format!("{} {extra}", proxy.url("app_t6", "app_t6", "app"));
    let a = common::connect(&url(
        "application_name=client-a options='-c search_path=pg_catalog -c statement_timeout=1234 -c TimeZone=Asia/Tokyo'",
    ))
    .await
    .unwrap();
    let b = common::connect(&url("application_name=client-b")).await.unwrap();
    for _ in 0..3 {
        let rows = a
            .simple_query("SELECT current_setting('application_name'), current_setting('search_path'), current_setting('statement_timeout'), current_setting('TimeZone')")
            .await
            .unwrap();
        let row = rows.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => Some(row),
            _ => None,
        });
        let row = row.unwrap();
        assert_eq!(
            (row.get(0), row.get(1), row.get(2), row.get(3)),
            (Some("client-a"), Some("pg_catalog"), Some("1234ms"), Some("Asia/Tokyo"))
        );
        let rows = b
            .simple_query("SELECT current_setting('application_name'), current_setting('statement_timeout'), current_setting('TimeZone')")
            .await
            .unwrap();
        let row = rows.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => Some(row),
            _ => None,
        });
        let row = row.unwrap();
        assert_eq!(row.get(0), Some("client-b"));
        assert_eq!(row.get(1), Some("0"));
        assert_ne!(row.get(2), Some("Asia/Tokyo"));
    }
    // A parameter the server rejects fails the login, as it would on a direct connection.
    let error = common::connect(&url("options='-c nosuch_setting=1'"))
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&error), "42704", "{error:?}");
    let error = common::connect(&url("options='-c statement_timeout=soon'"))
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&error), "22023", "{error:?}");
    proxy.shutdown().await;
}

/// Speaks the protocol by hand (trust login) to use Flush, which common drivers do not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_protocol_with_flush_before_sync() {
    let cluster = shared_cluster();
    let proxy = Proxy::start(&config_for(cluster, "size = 1")).await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    let mut startup = 196_608u32.to_be_bytes().to_vec();
    startup.extend_from_slice(b"user\0app_trust\0database\0app\0\0");
    let mut packet = ((startup.len() + 4) as u32).to_be_bytes().to_vec();
    packet.extend_from_slice(&startup);
    stream.write_all(&packet).await.unwrap();
    let mut reader = MessageReader::default();
    reader.until(&mut stream, b'Z').await;

    let mut batch = Vec::new();
    message(&mut batch, b'P', b"\0SELECT $1::int * 2\0\0\0");
    message(&mut batch, b'B', b"\0\0\0\0\0\x01\0\0\0\x0221\0\0");
    message(&mut batch, b'D', b"P\0");
    message(&mut batch, b'E', b"\0\0\0\0\0");
    message(&mut batch, b'H', b"");
    stream.write_all(&batch).await.unwrap();
    let tags = reader.until(&mut stream, b'C').await;
    assert_eq!(tags, b"12TDC");
    let row = reader.last_data_row.clone().unwrap();
    assert_eq!(&row[row.len() - 2..], b"42");
    let mut sync = Vec::new();
    message(&mut sync, b'S', b"");
    stream.write_all(&sync).await.unwrap();
    assert_eq!(reader.until(&mut stream, b'Z').await, b"Z");
    proxy.shutdown().await;
}

fn message(out: &mut Vec<u8>, tag: u8, body: &[u8]) {
    out.push(tag);
    out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(body);
}

#[derive(Default)]
struct MessageReader {
    buffer: Vec<u8>,
    last_data_row: Option<Vec<u8>>,
}

impl MessageReader {
    /// Reads messages until one with tag `last`; returns the tags seen.
    async fn until(&mut self, stream: &mut TcpStream, last: u8) -> Vec<u8> {
        let mut tags = Vec::new();
        loop {
            while self.buffer.len() >= 5 {
                let len = u32::from_be_bytes([self.buffer[1], self.buffer[2], self.buffer[3], self.buffer[4]]) as usize;
                if self.buffer.len() < len + 1 {
                    break;
                }
                let message: Vec<u8> = self.buffer.drain(..len + 1).collect();
                if message[0] == b'D' {
                    self.last_data_row = Some(message.clone());
                }
                if !matches!(message[0], b'S' | b'K' | b'R') {
                    tags.push(message[0]);
                }
                if message[0] == last {
                    return tags;
                }
            }
            let mut chunk = [0u8; 4096];
            let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
                .await
                .expect("the server answered")
                .unwrap();
            assert!(read > 0, "connection closed; tags so far {tags:?}");
            self.buffer.extend_from_slice(&chunk[..read]);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_idle_in_a_transaction_past_idle_transaction_timeout_is_disconnected_and_rolled_back() {
    let cluster = shared_cluster();
    let proxy = Proxy::start(&config_for(cluster, "size = 1\nidle_transaction_timeout = \"300ms\"")).await;
    let idle = proxy.connect("app_t7", "app_t7", "app").await.unwrap();
    idle.batch_execute("BEGIN; INSERT INTO items (owner) VALUES ('idle_tx_timeout')")
        .await
        .unwrap();
    wait_until("the idle client is disconnected", Duration::from_secs(10), || {
        let idle = &idle;
        async move { idle.is_closed() }
    })
    .await;
    // Its one server was rolled back and serves the next client.
    let next = proxy.connect("app_t7", "app_t7", "app").await.unwrap();
    let left = first_value(
        &next
            .simple_query("SELECT count(*) FROM items WHERE owner = 'idle_tx_timeout'")
            .await
            .unwrap(),
    );
    assert_eq!(left, "0");
    // A transaction that keeps working is not cut, however long it lasts in all.
    next.batch_execute("BEGIN").await.unwrap();
    for _ in 0..5 {
        next.simple_query("SELECT pg_sleep(0.1)").await.unwrap();
    }
    next.batch_execute("COMMIT").await.unwrap();
    proxy.shutdown().await;
}
