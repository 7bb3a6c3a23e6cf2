//! The HTTP endpoint on `metrics_listen`: `/metrics`, `/healthz`, `/readyz`.
//!
//! HTTP/1.1 only, GET and HEAD only, request bodies never read. It is bounded so that a
//! misbehaving or hostile peer costs little: few connections at once, a deadline for request
//! headers (which also closes idle keep-alive connections), a small header buffer, and a cap
//! on a connection's lifetime.

use std::convert::Infallible;
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{ALLOW, CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::registry::Metrics;

/// Readiness as `/readyz` reports it. docs/metrics.md: ready once pgrelay accepts clients and every
/// primary is reachable. Called once per `/readyz` request; keep it to reading a flag.
pub trait Health: Send + Sync {
    fn ready(&self) -> bool;
}

impl<F: Fn() -> bool + Send + Sync> Health for F {
    fn ready(&self) -> bool {
        self()
    }
}

/// More concurrent connections than a few Prometheus servers and probes need; beyond this,
/// new connections are closed at once.
const MAX_CONNECTIONS: usize = 64;
/// Time for a request's headers to arrive, counted from when the connection becomes ready
/// for the next request: it also closes keep-alive connections left idle.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// No connection lives longer, whatever it does (e.g. trickling a body nobody reads).
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// At shutdown, time for requests in flight to finish before their connections are dropped.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);
/// Read buffer per connection; hyper's minimum. Longer request heads are refused.
const MAX_BUF_SIZE: usize = 8 * 1024;
/// After a failed accept (e.g. out of file descriptors), pause instead of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves the endpoint on `listener` until `shutdown` completes, then lets requests in flight
/// finish (briefly) and returns. Bind the listener in the caller, so a taken port is a
/// startup error there.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, health: Arc<dyn Health>, shutdown: impl Future) {
    let mut shutdown = pin!(shutdown);
    let (stop, stopped) = watch::channel(());
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    // Finished connections leave the set only when reaped.
                    while connections.try_join_next().is_some() {}
                    if connections.len() >= MAX_CONNECTIONS {
                        tracing::debug!(%peer, "metrics endpoint: too many connections, closing");
                        continue;
                    }
                    connections.spawn(connection(stream, metrics.clone(), health.clone(), stopped.clone()));
                }
                Err(error) => {
                    tracing::warn!(%error, "metrics endpoint: accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
    }
    drop(listener);
    // Tells every connection to finish its current request and close.
    drop(stop);
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while connections.join_next().await.is_some() {}
    });
    if drained.await.is_err() {
        connections.shutdown().await;
    }
}

async fn connection(stream: TcpStream, metrics: Arc<Metrics>, health: Arc<dyn Health>, mut stop: watch::Receiver<()>) {
    let service = service_fn(move |request: Request<Incoming>| {
        let response = respond(&request, &metrics, &*health);
        async move { Ok::<_, Infallible>(response) }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_BUF_SIZE)
        .keep_alive(true);
    let mut conn = pin!(builder.serve_connection(TokioIo::new(stream), service));
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(error) = result {
                tracing::debug!(%error, "metrics endpoint: connection ended with an error");
            }
            return;
        }
        // Err: the sender is gone, i.e. shutdown.
        _ = stop.changed() => {}
        _ = tokio::time::sleep(CONNECTION_LIFETIME) => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, conn).await;
}

/// The whole routing table. Never fails: every request gets a status.
fn respond<B>(request: &Request<B>, metrics: &Metrics, health: &dyn Health) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match request.uri().path() {
        "/metrics" => match metrics.render() {
            Ok(body) => {
                let mut response = Response::new(Full::new(Bytes::from(body)));
                response
                    .headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static(prometheus::TEXT_FORMAT));
                response
                    .headers_mut()
                    .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
                response
            }
            Err(error) => {
                tracing::error!(%error, "metrics endpoint: encoding the registry failed");
                text(StatusCode::INTERNAL_SERVER_ERROR, "encoding metrics failed\n")
            }
        },
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if health.ready() => text(StatusCode::OK, "ready\n"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
        .headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
