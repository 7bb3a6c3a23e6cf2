//! End-to-end: what one client can make pgrelay hold is bounded. Replies pgrelay makes
//! itself are back-pressured like forwarded ones, a client's prepared statements are
//! capped, messages before login are capped at PostgreSQL's limits, and connections that
//! have not logged in yet count against max_client_conn.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is a failed test

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::raw::{Raw, bind, close_statement, execute, parse, query, show, sync};
use common::{Proxy, config_for, shared_cluster, sqlstate};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest any single answer may take.
const BOUND: Duration = Duration::from_secs(10);

async fn answer(raw: &mut Raw, count: usize) -> String {
    let replies = tokio::time::timeout(BOUND, raw.replies_until_ready(count))
        .await
        .expect("an answer within the bound");
    show(&replies)
}

/// The message text of the ErrorResponse `body`.
fn error_message(body: &[u8]) -> String {
    body.split(|&b| b == 0)
        .find_map(|field| field.strip_prefix(b"M"))
        .map(|text| String::from_utf8_lossy(text).into_owned())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_pipelines_without_reading_is_held_back_even_by_replies_pgrelay_makes() {
    let proxy = Proxy::start(&config_for(shared_cluster(), "size = 2")).await;
    let mut raw = Raw::connect(&proxy).await;
    // Inside a transaction the client keeps its server, and a Close of one of its
    // statement names is answered by pgrelay itself (the server keeps the statement).
    raw.send(&[query("BEGIN")]).await;
    assert_eq!(answer(&mut raw, 1).await, "C:BEGIN Z:T");

    // Far more than the socket buffers of both directions hold (a few MB each; the
    // replies are 5/8 of the input).
    const TOTAL: usize = 32 << 20;
    let close = close_statement("x");
    let chunk: Vec<u8> = close.iter().copied().cycle().take(close.len() * 8192).collect();
    let chunk_len = chunk.len();
    let chunks = TOTAL / chunk_len;
    let (mut reader, mut writer) = raw.stream.into_split();
    let written = Arc::new(AtomicUsize::new(0));
    let writing = {
        let written = written.clone();
        tokio::spawn(async move {
            for _ in 0..chunks {
                writer.write_all(&chunk).await.unwrap();
                written.fetch_add(chunk.len(), Ordering::Relaxed);
            }
            writer.write_all(&query("COMMIT")).await.unwrap();
            writer
        })
    };

    // While the client reads nothing, pgrelay stops reading from it: the writes stall.
    let mut last = (0, Instant::now());
    let stalled_at = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = written.load(Ordering::Relaxed);
        if now == chunks * chunk_len {
            panic!("pgrelay took all {now} bytes from a client that read none of its replies");
        }
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(2) {
            break now;
        }
    };
    assert!(stalled_at < TOTAL * 3 / 4, "stalled only after {stalled_at} bytes");

    // Once the client reads, everything is answered, in order.
    let mut closes = 0usize;
    let mut input = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    let commit_tail = loop {
        let n = tokio::time::timeout(BOUND, reader.read(&mut buf))
            .await
            .expect("replies keep coming")
            .unwrap();
        assert!(n > 0, "pgrelay closed the connection after {closes} replies");
        input.extend_from_slice(&buf[..n]);
        let mut at = 0;
        let mut tail = None;
        while input.len() - at >= 5 {
            let len = u32::from_be_bytes(input[at + 1..at + 5].try_into().unwrap()) as usize;
            if input.len() - at < 1 + len {
                break;
            }
            match input[at] {
                b'3' => closes += 1,
                b'C' => tail = Some(String::from_utf8_lossy(&input[at + 5..at + len]).into_owned()),
                b'Z' => {
                    tail = tail.map(|tag| format!("{tag} Z:{}", char::from(input[at + 5])));
                }
                other => panic!(
                    "unexpected message '{}' after {closes} CloseComplete",
                    char::from(other)
                ),
            }
            at += 1 + len;
        }
        input.drain(..at);
        if let Some(tail) = tail.filter(|tail| tail.contains("Z:")) {
            break tail;
        }
    };
    assert_eq!(closes, chunks * 8192);
    assert_eq!(commit_tail, "COMMIT Z:I");
    let writer = writing.await.unwrap();
    let mut raw = Raw {
        stream: reader.reunite(writer).unwrap(),
        input,
    };
    raw.send(&[query("SELECT 1")]).await;
    assert_eq!(answer(&mut raw, 1).await, "T D C:SELECT 1 Z:I");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_holds_at_most_max_client_prepared_statements() {
    let proxy = Proxy::start(&config_for(
        shared_cluster(),
        "size = 2\nmax_client_prepared_statements = 3",
    ))
    .await;
    let mut raw = Raw::connect(&proxy).await;
    raw.send(&[
        parse("s1", "SELECT 1"),
        parse("s2", "SELECT 2"),
        parse("s3", "SELECT 3"),
        sync(),
    ])
    .await;
    assert_eq!(answer(&mut raw, 1).await, "1 1 1 Z:I");

    // A fourth fails like a refusal by the server: the rest of its batch is skipped.
    raw.send(&[parse("s4", "SELECT 4"), bind("s1", &[]), execute(), sync()])
        .await;
    let (tag, body) = raw.next_message().await;
    assert_eq!(tag, b'E');
    let message = error_message(&body);
    assert!(message.contains("max_client_prepared_statements = 3"), "{message}");
    assert_eq!(answer(&mut raw, 1).await, "Z:I");

    // Redefining a name it holds is no new statement; closing one makes room.
    raw.send(&[
        parse("s1", "SELECT 11"),
        close_statement("s2"),
        parse("s4", "SELECT 4"),
        bind("s4", &[]),
        execute(),
        sync(),
    ])
    .await;
    assert_eq!(answer(&mut raw, 1).await, "1 3 1 2 D C:SELECT 1 Z:I");

    // Inside a transaction the refusal aborts it, as a server's error would.
    raw.send(&[query("BEGIN")]).await;
    assert_eq!(answer(&mut raw, 1).await, "C:BEGIN Z:T");
    raw.send(&[parse("s5", "SELECT 5"), sync()]).await;
    assert_eq!(answer(&mut raw, 1).await, "E:53400 Z:E");
    raw.send(&[query("COMMIT")]).await;
    assert_eq!(answer(&mut raw, 1).await, "C:ROLLBACK Z:I");
    raw.send(&[bind("s4", &[]), execute(), sync()]).await;
    assert_eq!(answer(&mut raw, 1).await, "2 D C:SELECT 1 Z:I");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bytes_of_a_clients_prepared_statements_are_bounded() {
    let proxy = Proxy::start(&config_for(shared_cluster(), "size = 2")).await;
    let mut raw = Raw::connect(&proxy).await;
    let big = |n: u32| format!("SELECT {n} /* {} */", "x".repeat(9 << 20));
    raw.send(&[parse("big1", &big(1)), sync()]).await;
    assert_eq!(answer(&mut raw, 1).await, "1 Z:I");
    raw.send(&[parse("big2", &big(2)), sync()]).await;
    let (tag, body) = raw.next_message().await;
    assert_eq!(tag, b'E');
    let message = error_message(&body);
    assert!(message.contains("16 MiB"), "{message}");
    assert_eq!(answer(&mut raw, 1).await, "Z:I");
    raw.send(&[
        close_statement("big1"),
        parse("big2", &big(2)),
        bind("big2", &[]),
        execute(),
        sync(),
    ])
    .await;
    assert_eq!(answer(&mut raw, 1).await, "3 1 2 D C:SELECT 1 Z:I");
    proxy.shutdown().await;
}

fn startup_packet(user: &str) -> Vec<u8> {
    let mut body = 196_608u32.to_be_bytes().to_vec();
    body.extend_from_slice(format!("user\0{user}\0database\0app\0\0").as_bytes());
    let mut packet = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    packet
}

/// Reads messages until an ErrorResponse and returns its SQLSTATE and text; panics if
/// the connection ends first or it takes longer than `within`.
async fn error_within(stream: &mut TcpStream, within: Duration) -> (String, String) {
    let started = Instant::now();
    let mut input = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        while input.len() >= 5 {
            let len = u32::from_be_bytes(input[1..5].try_into().unwrap()) as usize;
            if input.len() < 1 + len {
                break;
            }
            let message: Vec<u8> = input.drain(..1 + len).collect();
            if message[0] == b'E' {
                let code = message[5..]
                    .split(|&b| b == 0)
                    .find_map(|field| field.strip_prefix(b"C"))
                    .map(|code| String::from_utf8_lossy(code).into_owned())
                    .unwrap_or_default();
                return (code, error_message(&message[5..]));
            }
        }
        let left = within.saturating_sub(started.elapsed());
        let n = tokio::time::timeout(left, stream.read(&mut buf))
            .await
            .expect("an error within the bound")
            .unwrap();
        assert!(n > 0, "the connection ended without an error");
        input.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_message_longer_than_postgres_takes_is_refused_at_once() {
    let proxy = Proxy::start(&config_for(shared_cluster(), "size = 2")).await;
    for user in ["app_md5", "app"] {
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        stream.write_all(&startup_packet(user)).await.unwrap();
        // The authentication request (MD5 or SASL), then a password message announced
        // at 1 MB of which a few bytes come: refused without waiting for the rest.
        let mut request = [0u8; 5];
        tokio::time::timeout(BOUND, stream.read_exact(&mut request))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(request[0], b'R', "{user}");
        let mut rest = vec![0u8; u32::from_be_bytes(request[1..5].try_into().unwrap()) as usize - 4];
        stream.read_exact(&mut rest).await.unwrap();
        let mut message = vec![b'p'];
        message.extend_from_slice(&(1u32 << 20).to_be_bytes());
        message.extend_from_slice(b"SCRAM-SHA-256\0");
        stream.write_all(&message).await.unwrap();
        let (code, text) = error_within(&mut stream, Duration::from_secs(3)).await;
        assert_eq!(code, "08P01", "{user}: {text}");
    }
    // Just under the limit is still read (and then judged as a password).
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream.write_all(&startup_packet("app_md5")).await.unwrap();
    let mut message = vec![b'p'];
    let password = "y".repeat(65_000);
    message.extend_from_slice(&((4 + password.len() + 1) as u32).to_be_bytes());
    message.extend_from_slice(password.as_bytes());
    message.push(0);
    stream.write_all(&message).await.unwrap();
    let (code, text) = error_within(&mut stream, BOUND).await;
    assert_eq!(code, "28P01", "{text}");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_have_not_logged_in_count_against_max_client_conn() {
    // A login timeout far past the test: the silent connections keep their places until
    // they are dropped, however slowly the machine runs.
    let config = config_for(shared_cluster(), "size = 2")
        .replace("[server]\n", "[server]\nmax_client_conn = 3\n")
        .replace("client_login_timeout = \"5s\"", "client_login_timeout = \"120s\"");
    let proxy = Proxy::start(&config).await;
    // Three connections that send nothing hold every place.
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(TcpStream::connect(proxy.addr).await.unwrap());
    }
    // No login is tried before pgrelay has counted all three: the sessions of accepted
    // connections start on whichever worker is free, so a login tried earlier can be
    // counted before the last silent one, which is then the one refused, and every later
    // login finds a place.
    let shared = proxy.running().shared().clone();
    common::wait_until("pgrelay counts the silent connections", BOUND, || {
        let shared = shared.clone();
        async move { shared.clients.load(Ordering::Acquire) == 3 && shared.logging_in.load(Ordering::Relaxed) == 3 }
    })
    .await;
    let error = proxy.connect("app", "app", "app").await.unwrap_err();
    assert_eq!(sqlstate(&error), "53300", "{error}");

    // A cancel request is still served over the limit (it ends at once anyway).
    let mut cancel = TcpStream::connect(proxy.addr).await.unwrap();
    let mut packet = 16u32.to_be_bytes().to_vec();
    packet.extend_from_slice(&80_877_102u32.to_be_bytes());
    packet.extend_from_slice(&[0; 8]);
    cancel.write_all(&packet).await.unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(BOUND, cancel.read_to_end(&mut rest))
        .await
        .unwrap();
    assert!(
        read.is_ok() && rest.is_empty(),
        "a cancel request gets no reply: {rest:?}"
    );

    drop(silent);
    common::wait_until("the places are free again", BOUND, || async {
        proxy.connect("app", "app", "app").await.is_ok()
    })
    .await;
    proxy.shutdown().await;
}
