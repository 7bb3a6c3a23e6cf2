//! Test fixture shared by the end-to-end tests: a real PostgreSQL primary and streaming
//! replica started from the machine's binaries (one per test binary, or a private one
//! for tests that break it), pgrelay started in-process on a free port, and clients.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is a failed test
#![allow(dead_code)]

pub mod process;
pub mod raw;
pub mod relay;
pub mod takeover;

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
                // pgbench's tables for the operations tests, apart from the others'.
                "CREATE DATABASE ops OWNER app".to_owned(),
                "\\c app".to_owned(),
                "CREATE TABLE IF NOT EXISTS items (id serial PRIMARY KEY, owner text, value int)".to_owned(),
                "GRANT ALL ON items TO PUBLIC".to_owned(),
                "GRANT ALL ON SEQUENCE items_id_seq TO PUBLIC".to_owned(),
                // Roles of their own for tests that count server connections.
                "CREATE ROLE app_bench LOGIN PASSWORD 'app_bench'".to_owned(),
                "CREATE ROLE app_count LOGIN PASSWORD 'app_count'".to_owned(),
                "DO $$BEGIN FOR i IN 1..16 LOOP EXECUTE format('CREATE ROLE app_t%s LOGIN PASSWORD %L', i, 'app_t' || i); END LOOP; END$$".to_owned(),
                "GRANT ALL ON DATABASE other TO app_bench".to_owned(),
                "\\c other".to_owned(),
                "GRANT ALL ON SCHEMA public TO app_bench".to_owned(),
            ],
            ..ClusterOptions::default()
        })
        .expect("start the shared PostgreSQL cluster");
        let cluster: &'static LocalCluster = Box::leak(Box::new(cluster));
        register_cleanup(cluster);
        cluster
    })
}

/// A cluster of a test binary's own (for tests that stop, restart or kill its servers),
/// kept for the life of the process and, like the shared one, stopped at exit.
pub fn own_cluster(options: ClusterOptions) -> &'static LocalCluster {
    let cluster = LocalCluster::new(options).expect("start a PostgreSQL cluster of the test's own");
    let cluster: &'static LocalCluster = Box::leak(Box::new(cluster));
    register_cleanup(cluster);
    cluster
}

/// Statics are never dropped: stop the clusters and remove their files at exit.
fn register_cleanup(cluster: &'static LocalCluster) {
    static TO_CLEAN: Mutex<Vec<&'static LocalCluster>> = Mutex::new(Vec::new());
    extern "C" fn clean() {
        let clusters = TO_CLEAN
            .lock()
            .map(|mut list| std::mem::take(&mut *list))
            .unwrap_or_default();
        for cluster in clusters {
            cluster.teardown();
        }
    }
    let first = match TO_CLEAN.lock() {
        Ok(mut list) => {
            list.push(cluster);
            list.len() == 1
        }
        Err(_) => false,
    };
    if first {
        #[allow(unsafe_code)]
        // SAFETY: `clean` is a plain function with no arguments, as atexit requires; it
        // only touches a static behind a mutex.
        unsafe {
            libc::atexit(clean);
        }
    }
}

/// A running pgrelay for one test; shut down when dropped... or explicitly.
pub struct Proxy {
    running: Option<Running>,
    pub addr: SocketAddr,
    /// pgrelay's own runtime, for a proxy started with [`Proxy::start_isolated`].
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        drop(self.running.take());
        if let Some(runtime) = self.runtime.take() {
            // Dropped inside the test's own runtime: blocking there is not allowed.
            runtime.shutdown_background();
        }
    }
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
            runtime: None,
        }
    }

    /// Wraps a pgrelay started by the test itself (from a file, say, to reload it later).
    pub fn from_running(running: Running) -> Proxy {
        let addr = running.local_addr();
        Proxy {
            running: Some(running),
            addr,
            runtime: None,
        }
    }

    /// Like [`Proxy::start`], on a runtime of pgrelay's own with `workers` threads, as in
    /// `pgrelay run`: should pgrelay stall a worker, the test's own runtime goes on, so
    /// the test fails by its timeouts instead of hanging with it.
    pub async fn start_isolated(config: &str, workers: usize) -> Proxy {
        let mut runtime = tokio::runtime::Builder::new_multi_thread();
        runtime.worker_threads(workers);
        Proxy::start_on(config, runtime).await
    }

    /// Like [`Proxy::start_isolated`] with one worker thread that looks at its sockets
    /// only when it has no task to run. A worker with tasks always waiting does that
    /// only every few dozen tasks, at a time that depends on them: this makes it certain.
    pub async fn start_busy(config: &str) -> Proxy {
        let mut runtime = tokio::runtime::Builder::new_multi_thread();
        runtime.worker_threads(1).event_interval(u32::MAX);
        Proxy::start_on(config, runtime).await
    }

    async fn start_on(config: &str, mut runtime: tokio::runtime::Builder) -> Proxy {
        init_test_log();
        let text = format!("{}\n", config.replace("LISTEN", "127.0.0.1:0"));
        let config =
            pgrelay::config::parse(&text).unwrap_or_else(|errors| panic!("test config invalid:\n{errors}\n{text}"));
        let runtime = runtime
            .thread_name("pgrelay-test-worker")
            .enable_all()
            .build()
            .expect("pgrelay's runtime");
        let running = runtime
            .spawn(app::start(config))
            .await
            .expect("start task")
            .expect("start pgrelay");
        let addr = running.local_addr();
        Proxy {
            running: Some(running),
            addr,
            runtime: Some(runtime),
        }
    }

    /// The runtime pgrelay runs on, for a proxy started with [`Proxy::start_isolated`].
    pub fn runtime(&self) -> &tokio::runtime::Handle {
        self.runtime.as_ref().expect("an isolated proxy").handle()
    }

    pub fn running(&self) -> &Running {
        self.running.as_ref().expect("proxy running")
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn url(&self, user: &str, password: &str, db: &str) -> String {
        let password = if password.is_empty() {
            String::new()
        } else {
            format!("password={password} ")
        };
        format!(
            "host=127.0.0.1 port={} user={user} {password}dbname={db} connect_timeout=10",
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

/// A TCP stream to `addr` from `source` (an address of 127.0.0.0/8).
pub async fn stream_from(source: &str, addr: SocketAddr) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    socket.connect(addr).await.unwrap()
}

/// Logs in to pgrelay at `addr` from `source` without TLS.
pub async fn connect_from(
    addr: SocketAddr,
    source: &str,
    user: &str,
    password: &str,
    db: &str,
) -> Result<Client, tokio_postgres::Error> {
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(addr.port())
        .user(user)
        .dbname(db)
        .connect_timeout(Duration::from_secs(10));
    if !password.is_empty() {
        config.password(password);
    }
    let stream = stream_from(source, addr).await;
    let (client, connection) = config.connect_raw(stream, NoTls).await?;
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

[[users]]
name = "app_bench"
password = "app_bench"

[[users]]
name = "app_count"
password = "app_count"
{numbered}
[databases.app]
primary = "{primary}"

[databases.other]
primary = "{primary}"
"#,
        primary = cluster.primary().addr(),
        numbered = (1..=16)
            .map(|i| format!("\n[[users]]\nname = \"app_t{i}\"\npassword = \"app_t{i}\"\n"))
            .collect::<String>(),
    )
}

/// `config_for` with the shared cluster's replica added to database `app`, and extra
/// lines for `[databases.app.routing]`.
pub fn config_with_replica(cluster: &LocalCluster, pool: &str, routing: &str) -> String {
    // Other tests write to the shared cluster at the same time; unless a test is about
    // lag, a replica a moment behind must still take its reads.
    let routing = if routing.contains("max_replica_lag") {
        routing.to_owned()
    } else {
        format!("{routing}\nmax_replica_lag = \"0\"")
    };
    let routing = routing.as_str();
    let replicas: Vec<String> = cluster.replicas().iter().map(|r| format!("\"{}\"", r.addr())).collect();
    let primary = format!("[databases.app]\nprimary = \"{}\"\n", cluster.primary().addr());
    config_for(cluster, pool).replace(
        &primary,
        &format!(
            "{primary}replicas = [{}]\n\n[databases.app.routing]\n{routing}\n",
            replicas.join(", ")
        ),
    )
}

/// With `PGRELAY_TEST_LOG=FILE`, pgrelay's debug log of this test binary goes to FILE.
pub fn init_test_log() {
    if let Ok(path) = std::env::var("PGRELAY_TEST_LOG")
        && let Ok(file) = std::fs::File::create(path)
    {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("pgrelay=debug")
            .with_ansi(false)
            .with_writer(Mutex::new(file))
            .try_init();
    }
}

/// The sum of the counter `family`'s series of a running proxy whose labels include every
/// `(name, value)` of `labels`.
pub fn counter(proxy: &Proxy, family: &str, labels: &[(&str, &str)]) -> f64 {
    proxy
        .running()
        .shared()
        .metrics
        .gather()
        .iter()
        .filter(|found| found.name() == family)
        .flat_map(|found| found.get_metric())
        .filter(|metric| {
            labels.iter().all(|(name, value)| {
                metric
                    .get_label()
                    .iter()
                    .any(|label| label.name() == *name && label.value() == *value)
            })
        })
        .map(|metric| metric.get_counter().get_value())
        .sum()
}

/// `pgrelay_login_refusals_total{reason}` of a running proxy.
pub fn login_refusals(proxy: &Proxy, reason: &str) -> f64 {
    counter(proxy, "pgrelay_login_refusals_total", &[("reason", reason)])
}

/// pgrelay_runtime_stalls_total of a running proxy.
pub fn runtime_stalls(proxy: &Proxy) -> f64 {
    proxy
        .running()
        .shared()
        .metrics
        .gather()
        .iter()
        .find(|family| family.name() == "pgrelay_runtime_stalls_total")
        .map_or(0.0, |family| family.get_metric()[0].get_counter().get_value())
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

/// Runs a PostgreSQL client program (psql, pgbench) from the cluster's binaries against
/// the proxy, with `stdin` fed to it; returns (success, stdout, stderr).
pub async fn run_tool(tool: &str, password: &str, args: &[&str], stdin: &str) -> (bool, String, String) {
    use std::io::Write as _;
    use std::process::{Command, Stdio};
    let program = shared_cluster().bin_path(tool).expect("PostgreSQL client tool");
    let args: Vec<String> = args.iter().map(|arg| (*arg).to_owned()).collect();
    let password = password.to_owned();
    let stdin = stdin.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut child = Command::new(program)
            .args(&args)
            .env("PGPASSWORD", password)
            .env("PGCONNECT_TIMEOUT", "10")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn client tool");
        if let Some(mut input) = child.stdin.take() {
            let _ = input.write_all(stdin.as_bytes());
        }
        let output = child.wait_with_output().expect("client tool output");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    })
    .await
    .expect("client tool task")
}

/// psql against the proxy as `user`, with `-X -A -t -v ON_ERROR_STOP=1` and `args`.
pub async fn psql(
    proxy: &Proxy,
    user: &str,
    password: &str,
    db: &str,
    args: &[&str],
    stdin: &str,
) -> (bool, String, String) {
    let port = proxy.port().to_string();
    let mut all = vec![
        "-X",
        "-A",
        "-t",
        "-v",
        "ON_ERROR_STOP=1",
        "-h",
        "127.0.0.1",
        "-p",
        &port,
        "-U",
        user,
        "-d",
        db,
    ];
    all.extend_from_slice(args);
    run_tool("psql", password, &all, stdin).await
}

/// The first column of the first row of a simple query's answer.
pub fn first_value(messages: &[tokio_postgres::SimpleQueryMessage]) -> String {
    messages
        .iter()
        .find_map(|message| match message {
            tokio_postgres::SimpleQueryMessage::Row(row) => Some(row.get(0).unwrap_or("NULL").to_owned()),
            _ => None,
        })
        .expect("a row")
}
