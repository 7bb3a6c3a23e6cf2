//! Test fixture shared by the end-to-end tests: a real PostgreSQL primary and streaming
//! replica started from the machine's binaries (one per test binary, or a private one
//! for tests that break it), pgrelay started in-process on a free port, and clients.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is a failed test
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use pgrelay::app::{self, Running};
use pgrelay::localpg::{ClusterOptions, LocalCluster};
use tokio_postgres::{Client, NoTls};

/// The cluster most tests share. Tests that stop or promote servers make their own.
pub fn shared_cluster() -> &'static LocalCluster {
    static CLUSTER: OnceLock<&'static LocalCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let cluster = LocalCluster::new(ClusterOptions {
            setup_sql: vec![
                "\\c app".to_owned(),
                "CREATE TABLE IF NOT EXISTS items (id serial PRIMARY KEY, owner text, value int)".to_owned(),
                "GRANT ALL ON items TO PUBLIC".to_owned(),
                "GRANT ALL ON SEQUENCE items_id_seq TO PUBLIC".to_owned(),
            ],
            ..ClusterOptions::default()
        })
        .expect("start the shared PostgreSQL cluster");
        let cluster: &'static LocalCluster = Box::leak(Box::new(cluster));
        register_cleanup(cluster);
        cluster
    })
}

/// Statics are never dropped: stop the shared cluster and remove its files at exit.
fn register_cleanup(cluster: &'static LocalCluster) {
    static TO_CLEAN: Mutex<Option<&'static LocalCluster>> = Mutex::new(None);
    extern "C" fn clean() {
        if let Ok(mut slot) = TO_CLEAN.lock()
            && let Some(cluster) = slot.take()
        {
            cluster.teardown();
        }
    }
    if let Ok(mut slot) = TO_CLEAN.lock() {
        *slot = Some(cluster);
    }
    #[allow(unsafe_code)]
    // SAFETY: `clean` is a plain function with no arguments, as atexit requires; it only
    // touches a static behind a mutex.
    unsafe {
        libc::atexit(clean);
    }
}

/// A running pgrelay for one test; shut down when dropped... or explicitly.
pub struct Proxy {
    running: Option<Running>,
    pub addr: SocketAddr,
}

impl Proxy {
    /// Starts pgrelay with `config` (TOML); `listen` is forced to a free port.
    pub async fn start(config: &str) -> Proxy {
        let text = format!("{}\n", config.replace("LISTEN", "127.0.0.1:0"));
        let config =
            pgrelay::config::parse(&text).unwrap_or_else(|errors| panic!("test config invalid:\n{errors}\n{text}"));
        let running = app::start(config).await.expect("start pgrelay");
        let addr = running.local_addr();
        Proxy {
            running: Some(running),
            addr,
        }
    }

    pub fn running(&self) -> &Running {
        self.running.as_ref().expect("proxy running")
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn url(&self, user: &str, password: &str, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={user} password={password} dbname={db} connect_timeout=10",
            self.addr.port()
        )
    }

    /// Connects with tokio-postgres and drives the connection in the background.
    pub async fn connect(&self, user: &str, password: &str, db: &str) -> Result<Client, tokio_postgres::Error> {
        connect(&self.url(user, password, db)).await
    }

    pub async fn app(&self) -> Client {
        self.connect("app", "app", "app").await.expect("connect as app")
    }

    pub async fn shutdown(mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown().await;
        }
    }
}

pub async fn connect(url: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// A direct connection to a node of the cluster as the superuser.
pub async fn direct(addr: &str, db: &str) -> Client {
    let (host, port) = addr.split_once(':').expect("host:port");
    connect(&format!(
        "host={host} port={port} user=postgres password=postgres dbname={db}"
    ))
    .await
    .expect("direct connection")
}

/// The `[server]`, `[[users]]` and `[databases.app]` sections for a cluster, with
/// `pool` as the `[pool]` section's body.
pub fn config_for(cluster: &LocalCluster, pool: &str) -> String {
    format!(
        r#"
[server]
listen = "LISTEN"
metrics_listen = ""
client_login_timeout = "5s"

[pool]
{pool}

[[users]]
name = "app"
password = "app"

[[users]]
name = "app_md5"
password = "app_md5"
auth = "md5"

[[users]]
name = "app_plain"
password = "app_plain"

[[users]]
name = "app_trust"
auth = "trust"

[databases.app]
primary = "{primary}"

[databases.other]
primary = "{primary}"
"#,
        primary = cluster.primary().addr(),
    )
}

/// Polls `condition` until it holds or `timeout` passes; panics with `what` on timeout.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if condition().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The SQLSTATE of a tokio-postgres error, or "" if it has none.
pub fn sqlstate(error: &tokio_postgres::Error) -> String {
    error.code().map(|code| code.code().to_owned()).unwrap_or_default()
}

/// The message of a tokio-postgres error: the server's text for database errors.
pub fn message(error: &tokio_postgres::Error) -> String {
    error
        .as_db_error()
        .map(|db| db.message().to_owned())
        .unwrap_or_else(|| error.to_string())
}

/// Server connections an application name has open on a node.
pub async fn backends(direct: &Client, user: &str) -> i64 {
    direct
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND backend_type = 'client backend'",
            &[&user],
        )
        .await
        .expect("count backends")
        .get(0)
}
