//! End-to-end operations: reloading the configuration under load (admin RELOAD and
//! SIGHUP), and stopping on SIGTERM without cutting a transaction.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is a failed test

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{direct, first_value, run_tool, shared_cluster, wait_until};
use pgrelay::localpg::LocalCluster;

/// Both tests load pgbench's tables in database ops: one at a time.
static OPS_DATABASE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A configuration with database `ops` (pool `size`), and `extra` lines appended.
fn ops_config(cluster: &LocalCluster, port: u16, size: usize, extra: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nmetrics_listen = \"\"\nadmin_users = [\"app\"]\nshutdown_timeout = \"20s\"\n\n[pool]\nsize = {size}\n\n[[users]]\nname = \"app\"\npassword = \"app\"\n\n[databases.ops]\nprimary = \"{}\"\n{extra}",
        cluster.primary().addr()
    )
}

async fn admin(port: u16) -> tokio_postgres::Client {
    common::connect(&format!(
        "host=127.0.0.1 port={port} user=app password=app dbname=pgrelay"
    ))
    .await
    .unwrap()
}

async fn pool_size_shown(admin: &tokio_postgres::Client, database: &str) -> Option<String> {
    let rows = admin.simple_query("SHOW DATABASES").await.unwrap();
    rows.iter().find_map(|message| match message {
        tokio_postgres::SimpleQueryMessage::Row(row) if row.get("name") == Some(database) => {
            row.get("pool_size").map(str::to_owned)
        }
        _ => None,
    })
}

async fn open_servers(cluster: &LocalCluster) -> i64 {
    let observer = direct(&cluster.primary().addr(), "postgres").await;
    observer
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = 'ops' AND usename = 'app' AND backend_type = 'client backend' AND application_name <> 'pgrelay-monitor'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

fn pgbench(port: u16, args: &[&str]) -> Child {
    let program = shared_cluster().bin_path("pgbench").unwrap();
    Command::new(program)
        .args(args)
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "app", "ops"])
        .env("PGPASSWORD", "app")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

async fn finish(child: Child) -> (bool, String) {
    tokio::task::spawn_blocking(move || {
        let output = child.wait_with_output().unwrap();
        let text = format!(
            "{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        (output.status.success(), text)
    })
    .await
    .unwrap()
}

async fn init_pgbench(port: u16) {
    let port = port.to_string();
    let (ok, _, stderr) = run_tool(
        "pgbench",
        "app",
        &[
            "-i",
            "-s",
            "1",
            "-q",
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "app",
            "ops",
        ],
        "",
    )
    .await;
    assert!(ok, "pgbench -i: {stderr}");
}

/// Every change to an account is in the history, once.
async fn assert_consistent(cluster: &LocalCluster) {
    let observer = direct(&cluster.primary().addr(), "ops").await;
    let row = observer
        .query_one(
            "SELECT (SELECT coalesce(sum(delta), 0) FROM pgbench_history)::bigint,
                    (SELECT sum(abalance) FROM pgbench_accounts)::bigint,
                    (SELECT sum(tbalance) FROM pgbench_tellers)::bigint",
            &[],
        )
        .await
        .unwrap();
    let (delta, accounts, tellers): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(delta, accounts, "history and account balances disagree");
    assert_eq!(delta, tellers, "history and teller balances disagree");
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_resizes_adds_and_refuses_an_invalid_file() {
    let _ops = OPS_DATABASE.lock().await;
    let cluster = shared_cluster();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pgrelay.toml");
    let port = free_port();
    write(&path, &ops_config(cluster, port, 10, ""));
    let config = pgrelay::config::load(&path).unwrap();
    let running = pgrelay::app::start_with_file(config, Some(path.clone())).await.unwrap();
    init_pgbench(port).await;
    let admin = admin(port).await;
    let bench = pgbench(port, &["-c", "50", "-j", "2", "-T", "12", "-M", "extended"]);

    wait_until("the pool grows to 10", Duration::from_secs(20), || async {
        open_servers(cluster).await == 10
    })
    .await;
    write(&path, &ops_config(cluster, port, 4, ""));
    admin.simple_query("RELOAD").await.unwrap();
    assert_eq!(pool_size_shown(&admin, "ops").await.as_deref(), Some("4"));
    wait_until(
        "surplus servers close as they are released",
        Duration::from_secs(20),
        || async { open_servers(cluster).await <= 4 },
    )
    .await;
    let extra = format!(
        "\n[databases.ops_extra]\ndbname = \"ops\"\nprimary = \"{}\"\n",
        cluster.primary().addr()
    );
    write(&path, &ops_config(cluster, port, 10, &extra));
    admin.simple_query("RELOAD").await.unwrap();
    assert_eq!(pool_size_shown(&admin, "ops").await.as_deref(), Some("10"));
    let added = common::connect(&format!(
        "host=127.0.0.1 port={port} user=app password=app dbname=ops_extra"
    ))
    .await
    .unwrap();
    assert_eq!(
        first_value(&added.simple_query("SELECT 'added'").await.unwrap()),
        "added"
    );
    // An invalid file changes nothing and says why.
    write(&path, "[pool]\nsize = \"ten\"\n");
    let error = admin.simple_query("RELOAD").await.unwrap_err();
    assert_eq!(common::sqlstate(&error), "F0000");
    assert!(common::message(&error).contains("pool.size"), "{error:?}");
    assert_eq!(pool_size_shown(&admin, "ops").await.as_deref(), Some("10"));
    assert!(pool_size_shown(&admin, "ops_extra").await.is_some());

    let (ok, output) = finish(bench).await;
    assert!(ok && output.contains("number of failed transactions: 0"), "{output}");
    running.shutdown().await;
}

/// The pgrelay binary, run as operators run it.
struct Process {
    child: Option<Child>,
}

impl Process {
    fn start(config: &Path) -> Process {
        let child = Command::new(env!("CARGO_BIN_EXE_pgrelay"))
            .args(["--log-format", "json", "run", "-c"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Process { child: Some(child) }
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = self.child.as_ref().unwrap().id();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal).unwrap();
    }

    /// Waits for the process to exit; returns its status and stderr.
    async fn wait(mut self, limit: Duration) -> (std::process::ExitStatus, String) {
        let child = self.child.take().unwrap();
        let result = tokio::time::timeout(
            limit,
            tokio::task::spawn_blocking(move || child.wait_with_output().unwrap()),
        )
        .await
        .expect("pgrelay exited in time")
        .unwrap();
        (result.status, String::from_utf8_lossy(&result.stderr).into_owned())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

async fn wait_for_port(port: u16) {
    wait_until("pgrelay listens", Duration::from_secs(20), || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_and_sigterm_lets_transactions_finish() {
    let _ops = OPS_DATABASE.lock().await;
    let cluster = shared_cluster();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pgrelay.toml");
    let port = free_port();
    write(&path, &ops_config(cluster, port, 6, ""));
    let process = Process::start(&path);
    wait_for_port(port).await;
    let admin = admin(port).await;
    assert_eq!(pool_size_shown(&admin, "ops").await.as_deref(), Some("6"));
    write(&path, &ops_config(cluster, port, 7, ""));
    process.signal(nix::sys::signal::Signal::SIGHUP);
    wait_until("SIGHUP reloads", Duration::from_secs(10), || {
        let admin = &admin;
        async move { pool_size_shown(admin, "ops").await.as_deref() == Some("7") }
    })
    .await;
    drop(admin);

    init_pgbench(port).await;
    let bench = pgbench(port, &["-c", "20", "-j", "2", "-T", "30"]);
    wait_until("transactions run", Duration::from_secs(20), || async {
        open_servers(cluster).await > 0
    })
    .await;
    let stopping = Instant::now();
    process.signal(nix::sys::signal::Signal::SIGTERM);
    let (status, stderr) = process.wait(Duration::from_secs(25)).await;
    assert!(status.success(), "pgrelay exited with {status}: {stderr}");
    // Machine-readable logs: one JSON object per line, connects with who and where.
    let events: Vec<serde_json::Value> = stderr
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect();
    let connected = events
        .iter()
        .find(|event| event["fields"]["message"] == "client connected")
        .expect("a client connected line");
    assert_eq!(connected["fields"]["database"], "ops");
    assert_eq!(connected["fields"]["user"], "app");
    assert!(
        connected["fields"]["client"]
            .as_str()
            .is_some_and(|addr| addr.starts_with("127.0.0.1:"))
    );
    assert!(
        stopping.elapsed() < Duration::from_secs(21),
        "not within shutdown_timeout"
    );
    // pgbench's clients lose their connections between transactions; none is cut half way.
    let _ = finish(bench).await;
    assert_consistent(cluster).await;
}
