//! Socket takeover of clients whose server connection is TLS (`server_tls = { mode =
//! "require" }`), with real processes and a PostgreSQL started with `ssl = on`: a session
//! mode client moves with its server connection, whose TLS goes on in the new process
//! with the traffic keys rustls extracted in the old one, for TLS 1.3 and (against a
//! PostgreSQL capped with `ssl_max_protocol_version`) TLS 1.2; it moves again at a second
//! takeover, and its connection then serves the pool. A pinned LISTEN client hears a
//! NOTIFY sent while it sits idle on its continued connection.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is a failed test

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use common::process::{Process, free_port};
use common::takeover::{
    backend_pid, handed_over_with_server, listening_client, next_notification, pin_listeners, start_old, url,
    wait_idle_in_pool,
};
use common::{first_value, wait_until};
use pgrelay::localpg::{ClusterOptions, LocalCluster, RunAs};
use tokio_postgres::Client;

/// A self-signed certificate and its key for PostgreSQL (`server_tls` mode "require"
/// checks no certificate), in a directory kept for the life of the test binary.
fn certificate() -> &'static (PathBuf, PathBuf) {
    static FILES: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    FILES.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        // PostgreSQL may run as another user (nobody, when we are root).
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let cert_path = dir.join("server.crt");
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::set_permissions(&cert_path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let key_path = dir.join("server.key");
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        // PostgreSQL insists on a key only its own user can read.
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let run_as = RunAs::detect().unwrap();
        if run_as.is_switching() {
            let user = nix::unistd::User::from_name(run_as.name()).unwrap().unwrap();
            nix::unistd::chown(&key_path, Some(user.uid), Some(user.gid)).unwrap();
        }
        (cert_path, key_path)
    })
}

/// A primary with `ssl = on`, its TLS capped at `max_version` when given.
fn tls_cluster(max_version: Option<&str>) -> &'static LocalCluster {
    let (cert, key) = certificate();
    let mut conf = vec![
        "ssl = on".to_owned(),
        format!("ssl_cert_file = '{}'", cert.display()),
        format!("ssl_key_file = '{}'", key.display()),
    ];
    conf.extend(max_version.map(|version| format!("ssl_max_protocol_version = '{version}'")));
    common::own_cluster(ClusterOptions {
        replicas: 0,
        primary_conf: conf,
        ..ClusterOptions::default()
    })
}

fn tls13_cluster() -> &'static LocalCluster {
    static CLUSTER: OnceLock<&'static LocalCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| tls_cluster(None))
}

fn tls12_cluster() -> &'static LocalCluster {
    static CLUSTER: OnceLock<&'static LocalCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| tls_cluster(Some("TLSv1.2")))
}

/// The takeover config of `common::takeover` with database `app`'s server connections
/// over TLS.
fn write_config(cluster: &LocalCluster, dir: &Path, port: u16, pool: &str) -> (PathBuf, PathBuf) {
    let (path, socket) = common::takeover::write_config(cluster, dir, port, pool);
    let text = std::fs::read_to_string(&path).unwrap();
    let text = text.replacen(
        "[databases.app]\n",
        "[databases.app]\nserver_tls = { mode = \"require\" }\n",
        1,
    );
    std::fs::write(&path, text).unwrap();
    (path, socket)
}

/// The TLS version of the client's server connection, as PostgreSQL sees it; fails unless
/// it is TLS.
async fn server_tls_version(client: &Client) -> String {
    let rows = client
        .simple_query("SELECT ssl::text || ' ' || version FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .await
        .unwrap();
    let text = first_value(&rows);
    text.strip_prefix("true ")
        .unwrap_or_else(|| panic!("the server connection is not TLS: {text}"))
        .to_owned()
}

/// Takes `old` over with a new process on the same config; waits for the old one to exit
/// 0 having handed `moved` clients over with a TLS server connection.
async fn take_over(old: Process, config: &Path, socket: &Path, log: PathBuf, moved: usize) -> Process {
    let new = Process::start(config, Some(socket), log);
    let (status, log) = old.wait(Duration::from_secs(15)).await;
    assert!(status.success(), "the old process exited with {status}:\n{log}");
    assert_eq!(handed_over_with_server(&log), moved, "{log}");
    let with_tls = log
        .lines()
        .filter(|line| line.contains("client handed over to the new process") && line.contains("server_tls=true"))
        .count();
    assert_eq!(with_tls, moved, "{log}");
    new
}

/// The session the client had before the move, on the same server session.
async fn session_goes_on(client: &Client, pid: &str, version: &str) {
    assert_eq!(backend_pid(client).await, pid, "the same server session");
    assert_eq!(server_tls_version(client).await, version);
    let rows = client.simple_query("SHOW application_name").await.unwrap();
    assert_eq!(first_value(&rows), "moved_over_tls");
    let rows = client.simple_query("SELECT x FROM t_moved").await.unwrap();
    assert_eq!(first_value(&rows), "5");
    let rows = client.simple_query("EXECUTE doubled(21)").await.unwrap();
    assert_eq!(first_value(&rows), "42");
}

/// Many records each way through the continued connection.
async fn moves_data(client: &Client) {
    let row = client.query_one("SELECT repeat('x', 1048576)", &[]).await.unwrap();
    assert_eq!(row.get::<_, &str>(0).len(), 1_048_576);
    let big = "y".repeat(1_048_576);
    let row = client.query_one("SELECT length($1::text)", &[&big]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 1_048_576);
    let rows = client
        .query("SELECT g FROM generate_series(1, 100000) g", &[])
        .await
        .unwrap();
    assert_eq!(rows.len(), 100_000);
    assert_eq!(rows[99_999].get::<_, i32>(0), 100_000);
}

async fn session_client_moves_twice(cluster: &LocalCluster, version: &str) {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let (config, socket) = write_config(cluster, dir.path(), port, "mode = \"session\"\nsize = 2");
    let first = start_old(&config, dir.path(), port).await;

    let client = common::connect(&url(port)).await.unwrap();
    client
        .batch_execute(
            "SET application_name = 'moved_over_tls'; CREATE TEMP TABLE t_moved (x int); \
             INSERT INTO t_moved VALUES (5); PREPARE doubled(int) AS SELECT $1 * 2",
        )
        .await
        .unwrap();
    let pid = backend_pid(&client).await;
    assert_eq!(server_tls_version(&client).await, version);

    let second = take_over(first, &config, &socket, dir.path().join("second.log"), 1).await;
    session_goes_on(&client, &pid, version).await;
    moves_data(&client).await;

    // Once more, from the process that continued the connection.
    let third = take_over(second, &config, &socket, dir.path().join("third.log"), 1).await;
    session_goes_on(&client, &pid, version).await;
    moves_data(&client).await;

    // Its client gone, the continued connection is reset and serves the next client.
    drop(client);
    wait_idle_in_pool(port, &pid, "the continued connection is idle in the pool").await;
    let next = common::connect(&url(port)).await.unwrap();
    assert_eq!(backend_pid(&next).await, pid, "the pool's continued connection, reused");
    assert_eq!(server_tls_version(&next).await, version);
    let rows = next.simple_query("SHOW application_name").await.unwrap();
    assert_eq!(first_value(&rows), "", "reset before the next client");
    moves_data(&next).await;
    drop(next);

    // Closed with the process: its server session ends (a Terminate and a close_notify
    // through the records).
    third.signal(nix::sys::signal::Signal::SIGTERM);
    let (status, log) = third.wait(Duration::from_secs(25)).await;
    assert!(status.success(), "{log}");
    let direct = common::direct(&cluster.primary().addr(), "app").await;
    wait_until("the server session ended", Duration::from_secs(10), || async {
        let rows = direct
            .simple_query(&format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}"))
            .await
            .unwrap();
        first_value(&rows) == "0"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_session_client_moves_twice_with_its_tls_1_3_server_connection() {
    session_client_moves_twice(tls13_cluster(), "TLSv1.3").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_session_client_moves_twice_with_its_tls_1_2_server_connection() {
    session_client_moves_twice(tls12_cluster(), "TLSv1.2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pinned_listener_hears_a_notify_on_its_continued_tls_server_connection() {
    let cluster = tls13_cluster();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let (config, socket) = write_config(cluster, dir.path(), port, "mode = \"transaction\"\nsize = 4");
    pin_listeners(&config);
    let old = start_old(&config, dir.path(), port).await;
    let (listener, mut notifications) = listening_client(&url(port)).await;
    listener.batch_execute("LISTEN takeover_tls").await.unwrap();
    let pid = backend_pid(&listener).await;
    assert_eq!(server_tls_version(&listener).await, "TLSv1.3");

    let new = take_over(old, &config, &socket, dir.path().join("new.log"), 1).await;
    wait_until("the listener moved", Duration::from_secs(10), || async {
        new.log().contains("client taken over from the old process")
    })
    .await;

    // Sent while the client sits idle: the notification arrives on the continued
    // connection unasked, and reaches the client.
    let other = common::direct(&cluster.primary().addr(), "app").await;
    other.batch_execute("NOTIFY takeover_tls, 'after'").await.unwrap();
    let payload = next_notification(&mut notifications).await;
    assert_eq!(payload, ("takeover_tls".to_owned(), "after".to_owned()));
    assert_eq!(backend_pid(&listener).await, pid, "the same server session");

    new.signal(nix::sys::signal::Signal::SIGTERM);
    let (status, log) = new.wait(Duration::from_secs(25)).await;
    assert!(status.success(), "{log}");
}
