//! Driver compatibility: real client drivers through a transaction-mode pool of 3 server
//! connections, each with more concurrent clients than that. Each driver's suite
//! (tests/drivers/) uses named server-side prepared statements, transactions that commit
//! and roll back, session settings, COPY in and out, and errors, and checks its results;
//! in transaction mode each also LISTENs with more clients than servers and gets
//! notifications through its own API (pgrelay's listener connection is outside the pool).
//! tests/drivers/install.sh installs the drivers first; a driver that cannot be installed
//! fails its test.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is a failed test

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use common::{Proxy, config_for, shared_cluster, sqlstate};
use futures_util::TryStreamExt;
use tokio_postgres::Client;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::Type;

/// Server connections per (database, user) in transaction mode: fewer than every suite's
/// concurrent clients.
const POOL_SIZE: i64 = 3;
/// The same in session mode, where each client holds a server for its whole session:
/// room for every connection a suite opens at once (asyncpg's pool of WORKERS and its
/// workers' own connections included).
const SESSION_POOL_SIZE: i64 = 3 * WORKERS as i64;
/// Concurrent client connections each suite opens at once.
const WORKERS: usize = 8;
/// A suite that runs longer than this has hung (each passes in seconds).
const SUITE_TIMEOUT: Duration = Duration::from_secs(100);
/// The same for one tokio-postgres client.
const WORKER_TIMEOUT: Duration = Duration::from_secs(60);

fn drivers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("drivers")
}

/// Cargo's target directory (CARGO_TARGET_TMPDIR is its `tmp`).
fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .to_path_buf()
}

/// Runs tests/drivers/install.sh once per test binary; every driver test fails with its
/// output if it failed.
fn ensure_installed() {
    static INSTALLED: OnceLock<Result<String, String>> = OnceLock::new();
    let result = INSTALLED.get_or_init(|| {
        let started = Instant::now();
        let output = Command::new("bash")
            .arg(drivers_dir().join("install.sh"))
            .env("CARGO_TARGET_DIR", target_dir())
            .stdin(Stdio::null())
            .output()
            .map_err(|error| format!("cannot run tests/drivers/install.sh: {error}"))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        if output.status.success() {
            Ok(format!("{text}(install.sh took {:.1?})", started.elapsed()))
        } else {
            Err(format!("tests/drivers/install.sh failed ({}):\n{text}", output.status))
        }
    });
    match result {
        Ok(text) => println!("{text}"),
        Err(text) => panic!("{text}"),
    }
}

/// The schema a suite's role owns (made by the harness), for `SET search_path`.
fn schema_of(user: &str) -> String {
    format!("drv_{user}")
}

/// The server connections `user` holds on the primary, without pgrelay's listener
/// connection (listen_notify = "fanout"), which is outside the pool.
async fn pool_backends(direct: &Client, user: &str) -> i64 {
    direct
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND backend_type = 'client backend' \
             AND application_name <> $2",
            &[&user, &pgrelay::notify::LISTENER_APPLICATION_NAME],
        )
        .await
        .expect("count backends")
        .get(0)
}

/// A proxy with a pool for the shared cluster, and the peak
/// number of server connections `user` held on the primary while it ran, sampled every
/// 5 ms by a direct superuser connection.
struct Harness {
    proxy: Proxy,
    user: &'static str,
    mode: &'static str,
    pool_size: i64,
    peak: Arc<AtomicI64>,
    stop: Arc<AtomicBool>,
    sampler: tokio::task::JoinHandle<()>,
}

impl Harness {
    /// A pool in `mode`: POOL_SIZE in transaction mode, SESSION_POOL_SIZE in session mode.
    /// pgrelay runs on a runtime of its own, so a stalled worker fails the suite by its
    /// timeout instead of hanging the test.
    async fn start_in(user: &'static str, mode: &'static str) -> Harness {
        let cluster = shared_cluster();
        let pool_size = if mode == "session" {
            SESSION_POOL_SIZE
        } else {
            POOL_SIZE
        };
        let proxy = Proxy::start_isolated(
            &config_for(cluster, &format!("mode = \"{mode}\"\nsize = {pool_size}")),
            2,
        )
        .await;
        let direct = common::direct(&cluster.primary().addr(), "app").await;
        // Roles may not create schemas in `app`; each suite gets one it owns.
        direct
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema} AUTHORIZATION {user}",
                schema = schema_of(user)
            ))
            .await
            .unwrap();
        assert_eq!(
            common::backends(&direct, user).await,
            0,
            "{user} already has server connections"
        );
        let peak = Arc::new(AtomicI64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = tokio::spawn({
            let (peak, stop) = (peak.clone(), stop.clone());
            async move {
                while !stop.load(Ordering::Relaxed) {
                    peak.fetch_max(pool_backends(&direct, user).await, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        });
        Harness {
            proxy,
            user,
            mode,
            pool_size,
            peak,
            stop,
            sampler,
        }
    }

    /// The connection details every suite reads.
    fn env(&self) -> Vec<(String, String)> {
        [
            ("PGRELAY_HOST", "127.0.0.1".to_owned()),
            ("PGRELAY_PORT", self.proxy.port().to_string()),
            ("PGRELAY_USER", self.user.to_owned()),
            ("PGRELAY_PASSWORD", self.user.to_owned()),
            ("PGRELAY_DATABASE", "app".to_owned()),
            ("PGRELAY_POOL_SIZE", self.pool_size.to_string()),
            ("PGRELAY_POOL_MODE", self.mode.to_owned()),
            ("PGRELAY_WORKERS", WORKERS.to_string()),
            ("PGRELAY_SCHEMA", schema_of(self.user)),
        ]
        .into_iter()
        .map(|(key, value)| (key.to_owned(), value))
        .collect()
    }

    /// Stops sampling; asserts the pool held at most its size in server connections and
    /// that no worker of pgrelay stalled meanwhile.
    async fn finish(self) {
        self.stop.store(true, Ordering::Relaxed);
        self.sampler.await.unwrap();
        let peak = self.peak.load(Ordering::Relaxed);
        println!("peak server connections for {} ({} mode): {peak}", self.user, self.mode);
        assert!(
            (1..=self.pool_size).contains(&peak),
            "{} server connections for {}, pool size {}",
            peak,
            self.user,
            self.pool_size
        );
        assert_eq!(common::runtime_stalls(&self.proxy), 0.0, "a worker of pgrelay stalled");
        self.proxy.shutdown().await;
    }
}

/// Runs `program` with `args` and the harness's connection details; panics with its output
/// unless it exits 0 within `SUITE_TIMEOUT`.
async fn run_suite(harness: &Harness, what: &str, program: &Path, args: &[String], env: &[(&str, String)]) {
    let mut command = Command::new(program);
    command
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .envs(harness.env())
        .envs(env.iter().map(|(key, value)| (*key, value.as_str())))
        .env_remove("PGHOST")
        .env_remove("PGPORT")
        .env_remove("PGUSER")
        .env_remove("PGDATABASE")
        .env_remove("PGPASSWORD")
        .env_remove("PGOPTIONS")
        .stdin(Stdio::null());
    let (ok, status, output) = run_command(command, SUITE_TIMEOUT).await;
    assert!(ok, "{what} suite failed ({status}):\n{output}");
    println!("{what} suite:\n{output}");
}

/// Reads a child's pipe to its end on a thread of its own.
fn read_all<R: std::io::Read + Send + 'static>(pipe: Option<R>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut text);
        }
        String::from_utf8_lossy(&text).into_owned()
    })
}

/// Runs `command`, killing it after `timeout`; returns (success, status, stdout + stderr),
/// with whatever it printed before a timeout.
async fn run_command(mut command: Command, timeout: Duration) -> (bool, String, String) {
    let description = format!("{command:?}");
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| panic!("spawn {description}: {error}"));
    let stdout = read_all(child.stdout.take());
    let stderr = read_all(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let output = format!(
        "--- stdout\n{}--- stderr\n{}",
        stdout.join().unwrap_or_default(),
        stderr.join().unwrap_or_default()
    );
    match status {
        Some(status) => (status.success(), status.to_string(), output),
        None => (false, format!("killed after {timeout:?}: {description}"), output),
    }
}

async fn psycopg3_suite(user: &'static str, mode: &'static str) {
    // Its tables have fixed names: the two pooling modes take turns.
    static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _turn = TURN.lock().await;
    tokio::task::spawn_blocking(ensure_installed).await.unwrap();
    let harness = Harness::start_in(user, mode).await;
    let python = target_dir().join("driver-venv/bin/python");
    let script = drivers_dir().join("psycopg_suite.py");
    run_suite(&harness, "psycopg", &python, &[script.display().to_string()], &[]).await;
    harness.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg3_prepared_statements_pipeline_copy_and_errors() {
    psycopg3_suite("app_t1", "transaction").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg3_prepared_statements_pipeline_copy_and_errors_in_session_mode() {
    psycopg3_suite("app_t9", "session").await;
}

async fn asyncpg_suite(user: &'static str, mode: &'static str) {
    // Its tables have fixed names: the two pooling modes take turns.
    static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _turn = TURN.lock().await;
    tokio::task::spawn_blocking(ensure_installed).await.unwrap();
    let harness = Harness::start_in(user, mode).await;
    let python = target_dir().join("driver-venv/bin/python");
    let script = drivers_dir().join("asyncpg_suite.py");
    run_suite(&harness, "asyncpg", &python, &[script.display().to_string()], &[]).await;
    harness.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncpg_prepared_statements_pool_copy_and_errors() {
    asyncpg_suite("app_t2", "transaction").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncpg_prepared_statements_pool_copy_and_errors_in_session_mode() {
    asyncpg_suite("app_t10", "session").await;
}

async fn node_postgres_suite(user: &'static str, mode: &'static str) {
    // Its tables have fixed names: the two pooling modes take turns.
    static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _turn = TURN.lock().await;
    tokio::task::spawn_blocking(ensure_installed).await.unwrap();
    let harness = Harness::start_in(user, mode).await;
    let script = drivers_dir().join("node").join("suite.js");
    let modules = target_dir().join("driver-node").join("node_modules");
    run_suite(
        &harness,
        "node-postgres",
        Path::new("node"),
        &[script.display().to_string()],
        &[("NODE_PATH", modules.display().to_string())],
    )
    .await;
    harness.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_postgres_named_statements_transactions_copy_and_errors() {
    node_postgres_suite("app_t3", "transaction").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_postgres_named_statements_transactions_copy_and_errors_in_session_mode() {
    node_postgres_suite("app_t11", "session").await;
}

async fn pgjdbc_suite(user: &'static str, mode: &'static str) {
    // Its tables have fixed names: the two pooling modes take turns.
    static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _turn = TURN.lock().await;
    tokio::task::spawn_blocking(ensure_installed).await.unwrap();
    let classes = target_dir().join(format!("driver-java-{mode}"));
    std::fs::create_dir_all(&classes).unwrap();
    let jar = "/usr/share/java/postgresql.jar";
    let mut javac = Command::new("javac");
    javac
        .args(["-nowarn", "-encoding", "UTF-8", "-cp", jar, "-d"])
        .arg(&classes)
        .arg(drivers_dir().join("JdbcSuite.java"));
    let (ok, status, output) = run_command(javac, Duration::from_secs(120)).await;
    assert!(ok, "javac JdbcSuite.java failed ({status}):\n{output}");
    let harness = Harness::start_in(user, mode).await;
    let classpath = format!("{}:{jar}", classes.display());
    run_suite(
        &harness,
        "pgjdbc",
        Path::new("java"),
        &["-cp".to_owned(), classpath, "JdbcSuite".to_owned()],
        &[],
    )
    .await;
    harness.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgjdbc_server_prepared_statements_batches_copy_and_errors() {
    pgjdbc_suite("app_t4", "transaction").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgjdbc_server_prepared_statements_batches_copy_and_errors_in_session_mode() {
    pgjdbc_suite("app_t12", "session").await;
}

/// pgbench -i, then -S runs in extended and prepared mode, as `user`. Its tables go to
/// the schema named after the user (first on the default search_path), apart from the
/// other mode's.
async fn pgbench_suite(user: &'static str, mode: &'static str) {
    let harness = Harness::start_in(user, mode).await;
    let direct = common::direct(&shared_cluster().primary().addr(), "app").await;
    direct
        .batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {user} CASCADE; CREATE SCHEMA {user} AUTHORIZATION {user}"
        ))
        .await
        .unwrap();
    let port = harness.proxy.port().to_string();
    let connection = ["-h", "127.0.0.1", "-p", &port, "-U", user, "app"];
    let mut init = vec!["-i", "-s", "1", "-q"];
    init.extend_from_slice(&connection);
    let (ok, stdout, stderr) = common::run_tool("pgbench", user, &init, "").await;
    assert!(ok, "pgbench -i: {stdout}\n{stderr}");
    for protocol in ["extended", "prepared"] {
        let clients = "12";
        let mut args = vec!["-M", protocol, "-S", "-c", clients, "-j", "2", "-t", "300", "-n"];
        args.extend_from_slice(&connection);
        let (ok, stdout, stderr) = common::run_tool("pgbench", user, &args, "").await;
        assert!(ok, "pgbench -M {protocol}: {stdout}\n{stderr}");
        assert!(
            stdout.contains("number of failed transactions: 0"),
            "{stdout}\n{stderr}"
        );
        assert!(
            stdout.contains("number of transactions actually processed: 3600/3600"),
            "{stdout}\n{stderr}"
        );
        assert!(!stderr.contains("ERROR") && !stderr.contains("error"), "{stderr}");
    }
    harness.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_extended_and_prepared_with_more_clients_than_servers() {
    pgbench_suite("app_t6", "transaction").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_extended_and_prepared_in_session_mode() {
    pgbench_suite("app_t13", "session").await;
}

// tokio-postgres, in process: every `prepare` is a named statement ("s0", "s1", ...).

async fn show(client: &Client, setting: &str) -> String {
    common::first_value(&client.simple_query(&format!("SHOW {setting}")).await.unwrap())
}

async fn value_of(client: &Client, table: &str, id: i32) -> Option<i32> {
    client
        .query_opt(&format!("SELECT val FROM {table} WHERE id = $1"), &[&id])
        .await
        .unwrap()
        .map(|row| row.get(0))
}

/// One client of the tokio-postgres suite, as `user`, on its own rows of `table`.
async fn tokio_postgres_worker(
    url: String,
    index: i32,
    barrier: Arc<tokio::sync::Barrier>,
    user: &'static str,
    table: &'static str,
) -> (Vec<i32>, i64) {
    let schema = schema_of(user);
    let mut client = common::connect(&url).await.unwrap();
    // All clients are connected at once: more clients than server connections.
    barrier.wait().await;
    let default_app = show(&client, "application_name").await;
    let default_path = show(&client, "search_path").await;
    let sets_its_own = index % 2 == 0;
    let (expect_app, expect_path) = if sets_its_own {
        client
            .batch_execute(&format!(
                "SET application_name = 'tokio_pg_w{index}'; SET search_path TO {schema}, public"
            ))
            .await
            .unwrap();
        (format!("tokio_pg_w{index}"), format!("{schema}, public"))
    } else {
        (default_app, default_path)
    };
    let insert = client
        .prepare(&format!("INSERT INTO {table} (id, worker, val) VALUES ($1, $2, $3)"))
        .await
        .unwrap();
    let select = client
        .prepare(&format!("SELECT val FROM {table} WHERE id = $1"))
        .await
        .unwrap();
    let divide = client.prepare("SELECT 10 / $1::int").await.unwrap();
    let backend_pid = client.prepare("SELECT pg_backend_pid()").await.unwrap();
    let mut pids = Vec::new();
    let mut written = 0i64;
    for round in 0..6i32 {
        let base = index * 1000 + round * 10;
        // Commit; the transaction holds its server connection a while so they overlap.
        let transaction = client.transaction().await.unwrap();
        transaction.execute(&insert, &[&base, &index, &round]).await.unwrap();
        pids.push(transaction.query_one(&backend_pid, &[]).await.unwrap().get(0));
        transaction
            .batch_execute("SET LOCAL statement_timeout = '5s'; SELECT pg_sleep(0.02)")
            .await
            .unwrap();
        transaction.commit().await.unwrap();
        written += 1;
        let row = client.query_one(&select, &[&base]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), round);

        // Rollback.
        let transaction = client.transaction().await.unwrap();
        transaction
            .execute(&insert, &[&(base + 1), &index, &round])
            .await
            .unwrap();
        assert_eq!(transaction.query(&select, &[&(base + 1)]).await.unwrap().len(), 1);
        transaction.rollback().await.unwrap();
        assert!(client.query(&select, &[&(base + 1)]).await.unwrap().is_empty());

        // Settings hold across transactions and never leak.
        assert_eq!(show(&client, "application_name").await, expect_app);
        assert_eq!(show(&client, "search_path").await, expect_path);
        assert_eq!(show(&client, "statement_timeout").await, "0");
        let place = client.query_one("SELECT place FROM whereami", &[]).await;
        if sets_its_own {
            assert_eq!(place.unwrap().get::<_, String>(0), schema);
        } else {
            assert_eq!(sqlstate(&place.unwrap_err()), "42P01");
        }

        // A failing statement, then the same prepared statement works.
        let error = client.query_one(&divide, &[&0i32]).await.unwrap_err();
        assert_eq!(sqlstate(&error), "22012", "{error:?}");
        assert_eq!(client.query_one(&divide, &[&2i32]).await.unwrap().get::<_, i32>(0), 5);

        // A unique violation.
        let error = client.execute(&insert, &[&base, &index, &0i32]).await.unwrap_err();
        assert_eq!(sqlstate(&error), "23505", "{error:?}");

        // An error inside a transaction, then ROLLBACK.
        client.batch_execute("BEGIN").await.unwrap();
        client.execute(&insert, &[&(base + 2), &index, &round]).await.unwrap();
        let error = client.query_one(&divide, &[&0i32]).await.unwrap_err();
        assert_eq!(sqlstate(&error), "22012", "{error:?}");
        let error = client.query_one(&select, &[&base]).await.unwrap_err();
        assert_eq!(sqlstate(&error), "25P02", "{error:?}");
        client.batch_execute("ROLLBACK").await.unwrap();
        assert_eq!(value_of(&client, table, base + 2).await, None);
        assert_eq!(client.query_one(&divide, &[&5i32]).await.unwrap().get::<_, i32>(0), 2);
    }

    // COPY in (binary), COPY out (text), then a failing COPY in.
    let rows: Vec<(i32, i32)> = (0..200).map(|k| (100_000 + index * 1000 + k, k * k)).collect();
    let sink = client
        .copy_in(&format!("COPY {table} (id, worker, val) FROM STDIN (FORMAT BINARY)"))
        .await
        .unwrap();
    let mut writer = std::pin::pin!(BinaryCopyInWriter::new(sink, &[Type::INT4, Type::INT4, Type::INT4]));
    for (id, val) in &rows {
        writer.as_mut().write(&[id, &index, val]).await.unwrap();
    }
    assert_eq!(writer.finish().await.unwrap(), 200);
    written += 200;
    let copied: Vec<(i32, i32)> = client
        .query(
            &format!("SELECT id, val FROM {table} WHERE id >= 100000 AND worker = $1 ORDER BY id"),
            &[&index],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(copied, rows);
    let out = client
        .copy_out(&format!(
            "COPY (SELECT id, val FROM {table} WHERE worker = {index} AND id >= 100000 ORDER BY id) TO STDOUT"
        ))
        .await
        .unwrap();
    let chunks: Vec<bytes::Bytes> = out.try_collect().await.unwrap();
    let expected: String = rows.iter().map(|(id, val)| format!("{id}\t{val}\n")).collect();
    assert_eq!(String::from_utf8(chunks.concat()).unwrap(), expected);
    let sink = client
        .copy_in(&format!("COPY {table} (id, worker, val) FROM STDIN (FORMAT BINARY)"))
        .await
        .unwrap();
    let mut writer = std::pin::pin!(BinaryCopyInWriter::new(sink, &[Type::INT4, Type::INT4, Type::INT4]));
    writer
        .as_mut()
        .write(&[&(200_000 + index), &index, &0i32])
        .await
        .unwrap();
    writer.as_mut().write(&[&rows[0].0, &index, &0i32]).await.unwrap();
    let error = writer.finish().await.unwrap_err();
    assert_eq!(sqlstate(&error), "23505", "{error:?}");
    assert_eq!(value_of(&client, table, 200_000 + index).await, None);
    assert_eq!(show(&client, "application_name").await, expect_app);
    (pids, written)
}

async fn tokio_postgres_suite(user: &'static str, mode: &'static str, table: &'static str) {
    let harness = Harness::start_in(user, mode).await;
    let url = harness.proxy.url(user, user, "app");
    let schema = schema_of(user);
    let setup = common::connect(&url).await.unwrap();
    setup
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {table}; DROP TABLE IF EXISTS {schema}.whereami;
             CREATE TABLE {table} (id int PRIMARY KEY, worker int NOT NULL, val int NOT NULL);
             CREATE TABLE {schema}.whereami (place text);
             INSERT INTO {schema}.whereami VALUES ('{schema}')"
        ))
        .await
        .unwrap();
    let barrier = Arc::new(tokio::sync::Barrier::new(WORKERS));
    let workers: Vec<_> = (0..WORKERS)
        .map(|index| {
            tokio::spawn(tokio_postgres_worker(
                url.clone(),
                i32::try_from(index).unwrap(),
                barrier.clone(),
                user,
                table,
            ))
        })
        .collect();
    let mut pids = std::collections::BTreeSet::new();
    let mut written = 0;
    for worker in workers {
        let (worker_pids, worker_written) = tokio::time::timeout(WORKER_TIMEOUT, worker).await.unwrap().unwrap();
        pids.extend(worker_pids);
        written += worker_written;
    }
    println!("{WORKERS} tokio-postgres clients used server connections {pids:?}");
    assert!(i64::try_from(pids.len()).unwrap() <= harness.pool_size, "{pids:?}");
    let total: i64 = setup
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(total, written);
    setup
        .batch_execute(&format!("DROP TABLE {table}; DROP TABLE {schema}.whereami"))
        .await
        .unwrap();
    drop(setup);
    harness.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_named_statements_transactions_copy_and_errors() {
    tokio_postgres_suite("app_t5", "transaction", "drv_tokio_pg").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_named_statements_transactions_copy_and_errors_in_session_mode() {
    tokio_postgres_suite("app_t14", "session", "drv_tokio_pg_session").await;
}

/// asyncpg and psycopg see the same through pgrelay as on a direct connection when a
/// column is added between two calls of a prepared statement: eight clients of each on a
/// transaction pool of two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_changes_between_prepared_calls_look_as_on_a_direct_connection() {
    tokio::task::spawn_blocking(ensure_installed).await.unwrap();
    let cluster = shared_cluster();
    let user = "app_t15";
    let proxy = Proxy::start_isolated(&config_for(cluster, "mode = \"transaction\"\nsize = 2"), 2).await;
    let direct = common::direct(&cluster.primary().addr(), "app").await;
    direct
        .batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema} AUTHORIZATION {user}",
            schema = schema_of(user)
        ))
        .await
        .unwrap();
    let direct_port = cluster.primary().addr().rsplit(':').next().unwrap().to_owned();
    let mut command = Command::new(target_dir().join("driver-venv/bin/python"));
    command
        .arg(drivers_dir().join("schema_changes.py"))
        .env("PGRELAY_HOST", "127.0.0.1")
        .env("PGRELAY_PORT", proxy.port().to_string())
        .env("PGRELAY_DIRECT_PORT", direct_port)
        .env("PGRELAY_USER", user)
        .env("PGRELAY_PASSWORD", user)
        .env("PGRELAY_DATABASE", "app")
        .env("PGRELAY_SCHEMA", schema_of(user))
        .stdin(Stdio::null());
    let (ok, status, output) = run_command(command, SUITE_TIMEOUT).await;
    assert!(ok, "schema changes suite failed ({status}):\n{output}");
    println!("{output}");
    proxy.shutdown().await;
}
