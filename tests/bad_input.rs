//! End-to-end: clients that misbehave get a clear error with the right SQLSTATE, and the
//! proxy goes on serving everyone else.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is a failed test

mod common;

use std::time::Duration;

use common::{Proxy, config_for, shared_cluster, sqlstate};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads what pgrelay sends until it closes the connection (bounded in time) and returns
/// the (severity, SQLSTATE, message) of the first ErrorResponse.
async fn read_error(stream: &mut TcpStream) -> (String, String, String) {
    let mut bytes = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(15), stream.read_to_end(&mut bytes)).await;
    let mut rest = &bytes[..];
    while rest.len() >= 5 {
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        let (message, after) = rest.split_at((1 + len).min(rest.len()));
        if message[0] == b'E' {
            let mut fields = (String::new(), String::new(), String::new());
            for field in message[5..].split(|&b| b == 0) {
                let Some((&code, value)) = field.split_first() else {
                    continue;
                };
                let value = String::from_utf8_lossy(value).into_owned();
                match code {
                    b'V' => fields.0 = value,
                    b'C' => fields.1 = value,
                    b'M' => fields.2 = value,
                    _ => {}
                }
            }
            return fields;
        }
        rest = after;
    }
    panic!("no ErrorResponse in {bytes:?}");
}

fn startup_packet(params: &[(&str, &str)], version: u32) -> Vec<u8> {
    let mut body = version.to_be_bytes().to_vec();
    for (name, value) in params {
        body.extend_from_slice(name.as_bytes());
        body.push(0);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut packet = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    packet
}

async fn assert_still_serving(proxy: &Proxy) {
    let client = proxy.app().await;
    client
        .simple_query("SELECT 1")
        .await
        .expect("a well-behaved client is still served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_startup_packets_are_refused_with_08p01() {
    let cluster = shared_cluster();
    let proxy = Proxy::start(
        &config_for(cluster, "size = 2").replace("client_login_timeout = \"5s\"", "client_login_timeout = \"1s\""),
    )
    .await;

    // Oversized: a length above PostgreSQL's 10 000-byte bound, refused before reading it.
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream.write_all(&20_000u32.to_be_bytes()).await.unwrap();
    let (severity, code, message) = read_error(&mut stream).await;
    assert_eq!((severity.as_str(), code.as_str()), ("FATAL", "08P01"), "{message}");

    // Unknown protocol version 2.0.
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(&startup_packet(&[("user", "app")], 2 << 16))
        .await
        .unwrap();
    let (_, code, message) = read_error(&mut stream).await;
    assert_eq!(code, "08P01");
    assert!(message.contains("unsupported frontend protocol"), "{message}");

    // Truncated: announces 100 bytes, sends 10, then stalls until client_login_timeout.
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream.write_all(&100u32.to_be_bytes()).await.unwrap();
    stream
        .write_all(&[0, 3, 0, 0, b'u', b's', b'e', b'r', 0, b'a'])
        .await
        .unwrap();
    let (_, code, message) = read_error(&mut stream).await;
    assert_eq!(code, "08P01");
    assert!(message.contains("client_login_timeout"), "{message}");

    // Garbage parameter list (no terminator).
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    let mut packet = 16u32.to_be_bytes().to_vec();
    packet.extend_from_slice(&196_608u32.to_be_bytes());
    packet.extend_from_slice(b"userabcd");
    stream.write_all(&packet).await.unwrap();
    let (_, code, _) = read_error(&mut stream).await;
    assert_eq!(code, "08P01");

    assert_still_serving(&proxy).await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_finishes_logging_in_is_cut_off() {
    let cluster = shared_cluster();
    let proxy = Proxy::start(
        &config_for(cluster, "size = 2").replace("client_login_timeout = \"5s\"", "client_login_timeout = \"1s\""),
    )
    .await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(&startup_packet(&[("user", "app"), ("database", "app")], 196_608))
        .await
        .unwrap();
    // pgrelay asks for SCRAM; the client never answers.
    let (severity, code, message) = read_error(&mut stream).await;
    assert_eq!((severity.as_str(), code.as_str()), ("FATAL", "08P01"));
    assert!(message.contains("client_login_timeout"), "{message}");
    assert_still_serving(&proxy).await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_unknown_user_and_unknown_database() {
    let cluster = shared_cluster();
    let proxy = Proxy::start(&config_for(cluster, "size = 2")).await;
    let error = proxy.connect("app", "nope", "app").await.unwrap_err();
    assert_eq!(sqlstate(&error), "28P01", "{error}");
    let error = proxy.connect("app_md5", "nope", "app").await.unwrap_err();
    assert_eq!(sqlstate(&error), "28P01", "{error}");
    let error = proxy.connect("nobody", "x", "app").await.unwrap_err();
    assert_eq!(sqlstate(&error), "28P01", "{error}");
    let error = proxy.connect("app", "app", "nosuchdb").await.unwrap_err();
    assert_eq!(sqlstate(&error), "3D000", "{error}");
    assert_still_serving(&proxy).await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_clients_get_53300() {
    let cluster = shared_cluster();
    let config = config_for(cluster, "size = 2").replace("[server]\n", "[server]\nmax_client_conn = 2\n");
    let proxy = Proxy::start(&config).await;
    let first = proxy.app().await;
    let second = proxy.app().await;
    let error = proxy.connect("app", "app", "app").await.unwrap_err();
    assert_eq!(sqlstate(&error), "53300", "{error}");
    drop(first);
    // The slot frees once the first client's session has ended.
    common::wait_until("a slot frees up", Duration::from_secs(10), || async {
        proxy.connect("app", "app", "app").await.is_ok()
    })
    .await;
    second.simple_query("SELECT 1").await.unwrap();
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_waiting_past_query_wait_timeout_gets_53300_and_stays_connected() {
    let cluster = shared_cluster();
    let proxy = Proxy::start(&config_for(cluster, "size = 1\nquery_wait_timeout = \"300ms\"")).await;
    let holder = proxy.app().await;
    let waiter = proxy.app().await;
    holder.simple_query("BEGIN").await.unwrap();
    let error = waiter.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&error), "53300", "{error}");
    assert!(common::message(&error).contains("query_wait_timeout"), "{error:?}");
    holder.simple_query("COMMIT").await.unwrap();
    waiter.simple_query("SELECT 1").await.expect("the waiter can try again");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_max_message_size_is_refused() {
    let cluster = shared_cluster();
    let config = config_for(cluster, "size = 2").replace("[server]\n", "[server]\nmax_message_size = \"4KB\"\n");
    let proxy = Proxy::start(&config).await;
    let client = proxy.app().await;
    let big = format!("SELECT '{}'", "x".repeat(8 * 1024));
    let error = client.simple_query(&big).await.unwrap_err();
    let text = format!("{error:?}");
    assert!(
        sqlstate(&error) == "08P01" || text.contains("max_message_size"),
        "{text}"
    );
    assert_still_serving(&proxy).await;
    proxy.shutdown().await;
}
