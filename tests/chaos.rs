//! End-to-end, on a bad day: TPC-B-like transactions and autocommit reads from 20 clients
//! through a transaction pool in front of a primary and a streaming replica, while the
//! servers are restarted, crashed, stopped and their backends terminated. After every
//! round: every client finished each transaction or got an error within a bound (none
//! hung), the money adds up (Δ sum(history.delta) = Δ sum(abalance)), and the history
//! holds at least every transaction whose COMMIT succeeded and at most those plus the
//! COMMITs that failed (in doubt).
//!
//! Rounds per fault: `PGRELAY_CHAOS_ROUNDS` (default 10).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is a failed test

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Proxy, config_with_replica, direct};
use pgrelay::localpg::{ClusterOptions, LocalCluster};
use tokio_postgres::Client;

const CLIENTS: usize = 20;
const ACCOUNTS: i32 = 1000;
const TELLERS: i32 = 10;
/// Longest a client may wait for any answer, a restart included.
const BOUND: Duration = Duration::from_secs(20);
/// Load before the fault, and after the servers are back.
const LOAD_BEFORE: Duration = Duration::from_millis(700);
const LOAD_AFTER: Duration = Duration::from_millis(1000);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    PrimaryRestartFast,
    PrimaryRestartImmediate,
    ReplicaStopImmediate,
    TerminateEveryBackend,
    StopOneBackend,
}

impl Fault {
    const ALL: [Fault; 5] = [
        Fault::PrimaryRestartFast,
        Fault::PrimaryRestartImmediate,
        Fault::ReplicaStopImmediate,
        Fault::TerminateEveryBackend,
        Fault::StopOneBackend,
    ];

    fn name(self) -> &'static str {
        match self {
            Fault::PrimaryRestartFast => "primary restart -m fast",
            Fault::PrimaryRestartImmediate => "primary restart -m immediate",
            Fault::ReplicaStopImmediate => "replica stop -m immediate, start",
            Fault::TerminateEveryBackend => "pg_terminate_backend of every pooled backend",
            Fault::StopOneBackend => "one backend stopped (SIGSTOP 3 s)",
        }
    }
}

/// What the clients saw in one round.
#[derive(Debug, Default)]
struct Tally {
    committed: AtomicU64,
    /// COMMIT was sent and answered with an error, or no answer: it may have committed.
    in_doubt: AtomicU64,
    /// Failed before COMMIT was sent: certainly not committed.
    failed: AtomicU64,
    reads_ok: AtomicU64,
    reads_failed: AtomicU64,
    /// An answer took longer than BOUND.
    hung: AtomicU64,
    /// The tags of the transactions whose COMMIT succeeded, to name any that is missing.
    committed_tags: std::sync::Mutex<Vec<String>>,
    /// When the servers were back (the fault injected and the server accepting again),
    /// and the first commit after that.
    back_at: std::sync::Mutex<Option<Instant>>,
    first_commit_after: std::sync::Mutex<Option<Instant>>,
}

impl Tally {
    fn committed_now(&self, tag: &str) {
        self.committed.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut tags) = self.committed_tags.lock() {
            tags.push(tag.to_owned());
        }
        let back = self.back_at.lock().ok().and_then(|back| *back);
        if back.is_some()
            && let Ok(mut first) = self.first_commit_after.lock()
        {
            first.get_or_insert_with(Instant::now);
        }
    }

    /// From the servers being back to the first commit, in milliseconds.
    fn recovery_ms(&self) -> Option<u128> {
        let back = (*self.back_at.lock().ok()?)?;
        let first = (*self.first_commit_after.lock().ok()?)?;
        Some(first.saturating_duration_since(back).as_millis())
    }
}

fn setup_sql() -> Vec<String> {
    vec![
        "\\c app".to_owned(),
        format!(
            "CREATE TABLE chaos_branches (bid int PRIMARY KEY, bbalance bigint NOT NULL DEFAULT 0);
             CREATE TABLE chaos_tellers (tid int PRIMARY KEY, bid int NOT NULL, tbalance bigint NOT NULL DEFAULT 0);
             CREATE TABLE chaos_accounts (aid int PRIMARY KEY, bid int NOT NULL, abalance bigint NOT NULL DEFAULT 0);
             CREATE TABLE chaos_history (tid int, bid int, aid int, delta int, tag text, mtime timestamptz DEFAULT now());
             INSERT INTO chaos_branches VALUES (1, 0);
             INSERT INTO chaos_tellers SELECT t, 1, 0 FROM generate_series(1, {TELLERS}) t;
             INSERT INTO chaos_accounts SELECT a, 1, 0 FROM generate_series(1, {ACCOUNTS}) a;
             GRANT ALL ON chaos_branches, chaos_tellers, chaos_accounts, chaos_history TO app;"
        ),
    ]
}

/// One TPC-B-like transaction, statement by statement as pgbench sends it.
async fn transfer(client: &Client, seed: u64, tally: &Tally, tag: &str) {
    let aid = (seed % ACCOUNTS as u64) as i32 + 1;
    let tid = (seed / 7 % TELLERS as u64) as i32 + 1;
    let delta = (seed % 10_001) as i32 - 5000;
    let body = async {
        client.batch_execute("BEGIN").await?;
        client
            .execute(
                "UPDATE chaos_accounts SET abalance = abalance + $1 WHERE aid = $2",
                &[&i64::from(delta), &aid],
            )
            .await?;
        client
            .query_one("SELECT abalance FROM chaos_accounts WHERE aid = $1", &[&aid])
            .await?;
        client
            .execute(
                "UPDATE chaos_tellers SET tbalance = tbalance + $1 WHERE tid = $2",
                &[&i64::from(delta), &tid],
            )
            .await?;
        client
            .execute(
                "UPDATE chaos_branches SET bbalance = bbalance + $1 WHERE bid = 1",
                &[&i64::from(delta)],
            )
            .await?;
        client
            .execute(
                "INSERT INTO chaos_history (tid, bid, aid, delta, tag) VALUES ($1, 1, $2, $3, $4)",
                &[&tid, &aid, &delta, &tag],
            )
            .await?;
        if seed.is_multiple_of(4) {
            // Idle in the transaction a moment, as applications are: a server lost now
            // is only noticed at COMMIT.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok::<(), tokio_postgres::Error>(())
    };
    match tokio::time::timeout(BOUND, body).await {
        Err(_) => {
            tally.hung.fetch_add(1, Ordering::Relaxed);
            return;
        }
        Ok(Err(_)) => {
            tally.failed.fetch_add(1, Ordering::Relaxed);
            // Leave the failed (or lost) transaction, as an application does.
            let _ = tokio::time::timeout(BOUND, client.batch_execute("ROLLBACK")).await;
            return;
        }
        Ok(Ok(())) => {}
    }
    match tokio::time::timeout(BOUND, client.batch_execute("COMMIT")).await {
        Ok(Ok(())) => tally.committed_now(tag),
        Ok(Err(_)) => {
            tally.in_doubt.fetch_add(1, Ordering::Relaxed);
        }
        Err(_) => {
            tally.hung.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// An autocommit read, routed to the replica while it is healthy.
async fn read(client: &Client, seed: u64, tally: &Tally) {
    let aid = (seed % ACCOUNTS as u64) as i32 + 1;
    match tokio::time::timeout(
        BOUND,
        client.query_one("SELECT abalance FROM chaos_accounts WHERE aid = $1", &[&aid]),
    )
    .await
    {
        Ok(Ok(_)) => tally.reads_ok.fetch_add(1, Ordering::Relaxed),
        Ok(Err(_)) => tally.reads_failed.fetch_add(1, Ordering::Relaxed),
        Err(_) => tally.hung.fetch_add(1, Ordering::Relaxed),
    };
}

/// One client: transactions and reads until `stop`, reconnecting when its connection
/// is gone.
async fn client_loop(proxy_url: String, index: u64, stop: Arc<AtomicBool>, tally: Arc<Tally>) {
    let mut client: Option<Client> = None;
    let mut seed = index * 7919;
    while !stop.load(Ordering::Relaxed) {
        let usable = client.as_ref().is_some_and(|client| !client.is_closed());
        if !usable {
            match tokio::time::timeout(BOUND, common::connect(&proxy_url)).await {
                Ok(Ok(connected)) => client = Some(connected),
                Ok(Err(_)) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                Err(_) => {
                    tally.hung.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            }
        }
        let Some(connected) = client.as_ref() else { continue };
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407) >> 1;
        // A quarter of the clients only read: their reads go to the replica (the others'
        // follow their own writes to the primary).
        if index.is_multiple_of(4) || seed.is_multiple_of(3) {
            read(connected, seed, &tally).await;
        } else {
            transfer(connected, seed, &tally, &format!("c{index}-{seed}")).await;
        }
    }
}

/// Sums and row count that the invariants compare, read on the primary.
async fn books(cluster: &LocalCluster) -> (i64, i64, i64) {
    let primary = direct(&cluster.primary().addr(), "app").await;
    let row = primary
        .query_one(
            "SELECT (SELECT count(*) FROM chaos_history),
                    (SELECT coalesce(sum(delta), 0)::bigint FROM chaos_history),
                    (SELECT sum(abalance)::bigint FROM chaos_accounts)",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(work).await.unwrap()
}

/// Backends of user `app` on the node at `addr`.
async fn app_backends(addr: &str) -> Vec<i32> {
    direct(addr, "app")
        .await
        .query(
            "SELECT pid FROM pg_stat_activity WHERE usename = 'app' AND backend_type = 'client backend'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

async fn inject(cluster: &'static LocalCluster, fault: Fault) {
    match fault {
        Fault::PrimaryRestartFast => {
            blocking(move || {
                cluster.stop(cluster.primary()).unwrap();
                cluster.start(cluster.primary()).unwrap();
            })
            .await
        }
        Fault::PrimaryRestartImmediate => {
            blocking(move || {
                cluster.stop_immediate(cluster.primary()).unwrap();
                cluster.start(cluster.primary()).unwrap();
            })
            .await
        }
        Fault::ReplicaStopImmediate => {
            blocking(move || {
                let replica = &cluster.replicas()[0];
                cluster.stop_immediate(replica).unwrap();
                cluster.start(replica).unwrap();
            })
            .await
        }
        Fault::TerminateEveryBackend => {
            for node in cluster.nodes() {
                let admin = direct(&node.addr(), "app").await;
                admin
                    .execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                         WHERE usename = 'app' AND backend_type = 'client backend'",
                        &[],
                    )
                    .await
                    .unwrap();
            }
        }
        Fault::StopOneBackend => {
            let pids = app_backends(&cluster.primary().addr()).await;
            if let Some(&pid) = pids.first() {
                let pid = nix::unistd::Pid::from_raw(pid);
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP);
                tokio::time::sleep(Duration::from_secs(3)).await;
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_survive_restarts_crashes_and_terminated_backends() {
    let rounds: usize = std::env::var("PGRELAY_CHAOS_ROUNDS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(10);
    let cluster: &'static LocalCluster = Box::leak(Box::new(
        LocalCluster::new(ClusterOptions {
            setup_sql: setup_sql(),
            // A commit the client saw must survive a crash of the server process (the
            // fixture's default trades that for speed).
            primary_conf: vec!["synchronous_commit = on".to_owned()],
            ..ClusterOptions::default()
        })
        .expect("a cluster of our own"),
    ));
    let config = config_with_replica(
        cluster,
        "mode = \"transaction\"\nsize = 20\nquery_wait_timeout = \"15s\"\nserver_connect_timeout = \"2s\"",
        "consistency = \"session\"\nhealth_check_interval = \"250ms\"",
    );
    let proxy = Proxy::start_isolated(&config, 2).await;
    let url = proxy.url("app", "app", "app");
    let check = direct(&cluster.primary().addr(), "app").await;
    assert_eq!(
        common::first_value(&check.simple_query("SHOW synchronous_commit").await.unwrap()),
        "on",
        "commits must be durable for this test"
    );
    drop(check);
    let mut table = vec![format!(
        "| fault | round | committed | in doubt | failed | reads ok/failed | history Δ | hung | first commit after the server is back |\n|---|---|---|---|---|---|---|---|---|"
    )];
    let started = Instant::now();
    let mut problems = Vec::new();
    for (fault_index, fault) in Fault::ALL.into_iter().enumerate() {
        for round in 1..=rounds {
            let (rows_before, delta_before, balance_before) = books(cluster).await;
            let stop = Arc::new(AtomicBool::new(false));
            let tally = Arc::new(Tally::default());
            let clients: Vec<_> = (0..CLIENTS as u64)
                .map(|index| {
                    tokio::spawn(client_loop(
                        url.clone(),
                        // Unique per client, round and fault: it names the transactions.
                        index + round as u64 * 1000 + fault_index as u64 * 100_000,
                        stop.clone(),
                        tally.clone(),
                    ))
                })
                .collect();
            tokio::time::sleep(LOAD_BEFORE).await;
            inject(cluster, fault).await;
            if let Ok(mut back) = tally.back_at.lock() {
                *back = Some(Instant::now());
            }
            tokio::time::sleep(LOAD_AFTER).await;
            stop.store(true, Ordering::Relaxed);
            for client in clients {
                // Each client ends within one bounded step once told to stop.
                tokio::time::timeout(BOUND * 3, client)
                    .await
                    .expect("a client loop ended")
                    .unwrap();
            }
            let (rows_after, delta_after, balance_after) = books(cluster).await;
            let committed = tally.committed.load(Ordering::Relaxed);
            let in_doubt = tally.in_doubt.load(Ordering::Relaxed);
            let history = u64::try_from(rows_after - rows_before).unwrap();
            table.push(format!(
                "| {} | {round} | {committed} | {in_doubt} | {} | {}/{} | {history} | {} | {} |",
                fault.name(),
                tally.failed.load(Ordering::Relaxed),
                tally.reads_ok.load(Ordering::Relaxed),
                tally.reads_failed.load(Ordering::Relaxed),
                tally.hung.load(Ordering::Relaxed),
                tally.recovery_ms().map_or("–".to_owned(), |ms| format!("{ms} ms")),
            ));
            if tally.hung.load(Ordering::Relaxed) > 0 {
                problems.push(format!(
                    "{} round {round}: a client waited longer than {BOUND:?}",
                    fault.name()
                ));
            }
            if delta_after - delta_before != balance_after - balance_before {
                problems.push(format!("{} round {round}: the books do not balance", fault.name()));
            }
            if committed > history {
                let primary = direct(&cluster.primary().addr(), "app").await;
                let tags = tally.committed_tags.lock().map(|tags| tags.clone()).unwrap_or_default();
                let missing: Vec<String> = primary
                    .query(
                        "SELECT t FROM unnest($1::text[]) t WHERE NOT EXISTS (SELECT 1 FROM chaos_history WHERE tag = t)",
                        &[&tags],
                    )
                    .await
                    .unwrap()
                    .iter()
                    .map(|row| row.get(0))
                    .collect();
                problems.push(format!(
                    "{} round {round}: committed but missing: {missing:?}",
                    fault.name()
                ));
            }
            if !(committed <= history && history <= committed + in_doubt) {
                problems.push(format!(
                    "{} round {round}: {history} transactions in the history, {committed} reported committed, {in_doubt} in doubt",
                    fault.name()
                ));
            }
        }
    }
    println!(
        "{}\n({} rounds in {:.0?})",
        table.join("\n"),
        table.len() - 1,
        started.elapsed()
    );
    assert!(problems.is_empty(), "{}\n{}", problems.join("\n"), table.join("\n"));
    assert_eq!(common::runtime_stalls(&proxy), 0.0);
    drop(proxy);
    cluster.teardown();
}
