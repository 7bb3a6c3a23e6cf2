//! The HTTP endpoint over a real socket, with raw requests: what a scraper, a probe and a
//! confused or hostile peer get.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::super::{Metrics, serve};

struct Endpoint {
    addr: SocketAddr,
    ready: Arc<AtomicBool>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

async fn start() -> Endpoint {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let metrics = Arc::new(Metrics::new().unwrap());
    let _ = metrics.session("app", "alice");
    let ready = Arc::new(AtomicBool::new(false));
    let flag = ready.clone();
    let (stop, stopped) = oneshot::channel::<()>();
    let health = Arc::new(move || flag.load(Ordering::Relaxed));
    let task = tokio::spawn(serve(listener, metrics, health, stopped));
    Endpoint {
        addr,
        ready,
        stop: Some(stop),
        task,
    }
}

struct Reply {
    status: u16,
    head: String,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.eq_ignore_ascii_case(name).then(|| value.trim())
        })
    }
}

/// Sends `raw` and reads until the server closes; `None` when it closed without answering.
async fn exchange(addr: SocketAddr, raw: &[u8]) -> Option<String> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    // A server that refuses the connection may have closed it before the request is written.
    if stream.write_all(raw).await.is_err() {
        return None;
    }
    let mut bytes = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut bytes)).await;
    // A reset after a refused request is an answer too: "closed".
    if read.is_err() {
        panic!("the server neither answered nor closed");
    }
    (!bytes.is_empty()).then(|| String::from_utf8_lossy(&bytes).into_owned())
}

fn parse(text: &str) -> Reply {
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    Reply {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    }
}

async fn get(addr: SocketAddr, method: &str, path: &str) -> Reply {
    let raw = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    parse(&exchange(addr, raw.as_bytes()).await.unwrap())
}

#[tokio::test]
async fn answers_metrics_healthz_and_readyz() {
    let endpoint = start().await;
    let metrics = get(endpoint.addr, "GET", "/metrics").await;
    assert_eq!(metrics.status, 200);
    assert_eq!(metrics.header("content-type"), Some("text/plain; version=0.0.4"));
    let families = super::text_format::parse(&metrics.body).unwrap();
    assert!(families.contains_key("pgrelay_clients"));
    assert!(families.contains_key("pgrelay_build_info"));

    let healthz = get(endpoint.addr, "GET", "/healthz").await;
    assert_eq!((healthz.status, healthz.body.as_str()), (200, "ok\n"));

    assert_eq!(get(endpoint.addr, "GET", "/readyz").await.status, 503);
    endpoint.ready.store(true, Ordering::Relaxed);
    assert_eq!(get(endpoint.addr, "GET", "/readyz").await.status, 200);
    assert_eq!(
        get(endpoint.addr, "GET", "/metrics?name=x").await.status,
        200,
        "a query string is ignored"
    );
}

#[tokio::test]
async fn anything_else_is_refused_with_a_status() {
    let endpoint = start().await;
    assert_eq!(get(endpoint.addr, "GET", "/").await.status, 404);
    assert_eq!(get(endpoint.addr, "GET", "/metrics/").await.status, 404);
    assert_eq!(get(endpoint.addr, "GET", "/../etc/passwd").await.status, 404);
    let post = get(endpoint.addr, "POST", "/metrics").await;
    assert_eq!(post.status, 405);
    assert_eq!(post.header("allow"), Some("GET, HEAD"));

    let head = get(endpoint.addr, "HEAD", "/healthz").await;
    assert_eq!((head.status, head.body.as_str()), (200, ""));
}

#[tokio::test]
async fn bodies_are_ignored_and_keep_alive_works() {
    let endpoint = start().await;
    // Two requests on one connection, the first with a body nobody reads.
    let raw = "POST /healthz HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello\
               GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";
    let answer = exchange(endpoint.addr, raw.as_bytes()).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
    assert!(
        answer.contains("\r\n\r\nmethod not allowed\nHTTP/1.1 200 OK\r\n"),
        "{answer}"
    );
    let pipelined =
        "GET /healthz HTTP/1.1\r\nHost: t\r\n\r\nGET /readyz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";
    let answer = exchange(endpoint.addr, pipelined.as_bytes()).await.unwrap();
    assert_eq!(answer.matches("HTTP/1.1 ").count(), 2, "{answer}");
    assert!(answer.contains("HTTP/1.1 503"), "{answer}");
}

#[tokio::test]
async fn malformed_and_oversized_requests_do_not_hurt_it() {
    let endpoint = start().await;
    let garbage: &[&[u8]] = &[
        b"NOT HTTP AT ALL\r\n\r\n",
        b"\x00\xff\xfe\r\n\r\n",
        b"GET /metrics HTTP/9.9\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nHost: t\r\nContent-Length: -1\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nBad Header Without Colon\r\n\r\n",
    ];
    for raw in garbage {
        if let Some(answer) = exchange(endpoint.addr, raw).await {
            assert!(
                answer.starts_with("HTTP/1.1 4") || answer.starts_with("HTTP/1.0 4"),
                "{raw:?}: {answer}"
            );
        }
    }
    let huge = format!(
        "GET /metrics HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    if let Some(answer) = exchange(endpoint.addr, huge.as_bytes()).await {
        assert!(answer.starts_with("HTTP/1.1 4"), "{answer}");
    }
    // A client that sends half a request and hangs up.
    let mut stream = TcpStream::connect(endpoint.addr).await.unwrap();
    stream.write_all(b"GET /metr").await.unwrap();
    drop(stream);

    assert_eq!(get(endpoint.addr, "GET", "/healthz").await.status, 200, "still serving");
    assert!(!endpoint.task.is_finished());
}

#[tokio::test]
async fn shutdown_stops_it_even_with_idle_connections_open() {
    let mut endpoint = start().await;
    let idle = TcpStream::connect(endpoint.addr).await.unwrap();
    let mut keep_alive = TcpStream::connect(endpoint.addr).await.unwrap();
    keep_alive
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let mut buffer = [0u8; 256];
    let read = keep_alive.read(&mut buffer).await.unwrap();
    assert!(buffer[..read].starts_with(b"HTTP/1.1 200"));

    endpoint.stop.take().unwrap().send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(3), endpoint.task)
        .await
        .unwrap()
        .unwrap();
    // The task owned the listener, so its end closed it. (Connecting to the port again
    // proves nothing: a test running alongside may have been given the same port.)
    // The kept-alive connection was closed, not left hanging.
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(1), keep_alive.read_to_end(&mut rest)).await;
    assert!(closed.is_ok());
    drop(idle);
}

#[tokio::test]
async fn connections_beyond_the_limit_are_closed_until_some_end() {
    let endpoint = start().await;
    let mut held = Vec::new();
    for _ in 0..64 {
        held.push(TcpStream::connect(endpoint.addr).await.unwrap());
    }
    // Accepted in order: whatever the timing, the next one is the 65th.
    let refused = exchange(
        endpoint.addr,
        b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(refused, None, "the 65th connection is closed unanswered");
    drop(held);
    // The freed slots come back once their connections have seen the close.
    let request = b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";
    for _ in 0..50 {
        if let Some(answer) = exchange(endpoint.addr, request).await {
            assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no slot came back after the held connections closed");
}
