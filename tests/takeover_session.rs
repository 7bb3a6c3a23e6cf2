//! Socket takeover of clients that keep a server connection (session mode, a client pinned
//! in transaction mode), with real processes: such a client moves to the new process with
//! its server connection, so its server session (temporary tables, settings, prepared
//! statements, advisory locks, backend pid) goes on; it is counted in the new process's
//! pool and SHOW SERVERS, its cancels reach that server, and it goes back to the pool when
//! the client is done with it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is a failed test

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::process::{Process, free_port};
use common::takeover::{
    admin_rows, backend_pid, handed_over_with_server, listening_client, next_notification, pin_listeners, start_old,
    url, wait_idle_in_pool,
};
use common::{first_value, shared_cluster, sqlstate, wait_until};
use tokio_postgres::{NoTls, SimpleQueryMessage};

fn write_config(dir: &std::path::Path, port: u16, pool: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    common::takeover::write_config(shared_cluster(), dir, port, pool)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_session_mode_client_moves_with_its_server_connection() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let (config, socket) = write_config(dir.path(), port, "mode = \"session\"\nsize = 2");
    let old = start_old(&config, dir.path(), port).await;

    // Idle at the takeover, with a setting, a temporary table and an SQL prepared statement.
    let idle = common::connect(&url(port)).await.unwrap();
    idle.batch_execute(
        "SET application_name = 'moved_with_server'; CREATE TEMP TABLE t_moved (x int); \
         INSERT INTO t_moved VALUES (5); PREPARE doubled(int) AS SELECT $1 * 2",
    )
    .await
    .unwrap();
    let idle_pid = backend_pid(&idle).await;
    // In a transaction at the takeover: it moves once the transaction ends.
    let busy = common::connect(&url(port)).await.unwrap();
    let busy_pid = backend_pid(&busy).await;
    busy.batch_execute("BEGIN; CREATE TEMP TABLE t_busy (x int)")
        .await
        .unwrap();

    let new = Process::start(&config, Some(&socket), dir.path().join("new.log"));
    wait_until("the new process took over", Duration::from_secs(20), || async {
        new.log().contains("took the listening sockets over")
    })
    .await;
    wait_until("the idle client moved", Duration::from_secs(10), || async {
        new.log().contains("client taken over from the old process")
    })
    .await;
    // A new client of the new process takes a connection of its own (the pool's second).
    let fresh = common::connect(&url(port)).await.unwrap();
    let fresh_pid = backend_pid(&fresh).await;
    // The transaction goes on where it began, and ends there; its connection then comes
    // over too, and takes the pool over its size (2) for as long as the client keeps it.
    busy.batch_execute("INSERT INTO t_busy VALUES (1); COMMIT")
        .await
        .unwrap();

    // Both clients handed over with their servers, the old process exits 0, well before
    // shutdown_timeout (20 s).
    let (status, log) = old.wait(Duration::from_secs(15)).await;
    assert!(status.success(), "the old process exited with {status}:\n{log}");
    assert_eq!(handed_over_with_server(&log), 2, "{log}");

    // The same server session, on the new process.
    assert_eq!(backend_pid(&idle).await, idle_pid, "the same server session");
    let rows = idle.simple_query("SHOW application_name").await.unwrap();
    assert_eq!(first_value(&rows), "moved_with_server");
    let rows = idle.simple_query("SELECT x FROM t_moved").await.unwrap();
    assert_eq!(first_value(&rows), "5");
    let rows = idle.simple_query("EXECUTE doubled(21)").await.unwrap();
    assert_eq!(first_value(&rows), "42");
    assert_eq!(backend_pid(&busy).await, busy_pid);
    let rows = busy.simple_query("SELECT count(*) FROM t_busy").await.unwrap();
    assert_eq!(first_value(&rows), "1", "the committed transaction's row");

    // The new process counts both connections in its pool and lists them.
    let servers = admin_rows(port, "SHOW SERVERS").await;
    for pid in [&idle_pid, &busy_pid, &fresh_pid] {
        assert!(
            servers
                .iter()
                .any(|row| row["remote_pid"] == *pid && row["database"] == "app"),
            "{pid} in SHOW SERVERS: {servers:?}"
        );
    }
    let pools = admin_rows(port, "SHOW POOLS").await;
    let pool = pools
        .iter()
        .find(|row| row["database"] == "app" && row["user"] == "app")
        .unwrap_or_else(|| panic!("no pool of app/app: {pools:?}"));
    assert_eq!(pool["sv_active"], "3", "counted over the size: {pool:?}");
    assert!(new.log().contains("takes the pool over its size"), "{}", new.log());

    // A cancel reaches the server the client came with.
    let idle = Arc::new(idle);
    let sleeping = {
        let idle = idle.clone();
        tokio::spawn(async move { idle.simple_query("SELECT pg_sleep(30)").await })
    };
    wait_until("the statement runs", Duration::from_secs(10), || async {
        let direct = common::direct(&shared_cluster().primary().addr(), "app").await;
        let rows = direct
            .simple_query(&format!(
                "SELECT 1 FROM pg_stat_activity WHERE pid = {idle_pid} AND query = 'SELECT pg_sleep(30)' \
                 AND state = 'active'"
            ))
            .await
            .unwrap();
        rows.iter().any(|row| matches!(row, SimpleQueryMessage::Row(_)))
    })
    .await;
    idle.cancel_token().cancel_query(NoTls).await.unwrap();
    let cancelled = tokio::time::timeout(Duration::from_secs(5), sleeping)
        .await
        .expect("the cancel landed within 5 s")
        .unwrap();
    assert_eq!(sqlstate(&cancelled.unwrap_err()), "57014");
    let rows = idle.simple_query("SELECT x FROM t_moved").await.unwrap();
    assert_eq!(first_value(&rows), "5", "the session goes on after the cancel");

    // When the client leaves, its server connection is reset (server_reset_query) and
    // goes back to the pool, idle; the next connection the pool needs is that one.
    drop(idle);
    wait_idle_in_pool(port, &idle_pid, "the server connection is idle in the pool").await;
    let next = common::connect(&url(port)).await.unwrap();
    assert_eq!(backend_pid(&next).await, idle_pid, "the pool's connection, reused");
    let error = next.simple_query("SELECT x FROM t_moved").await.unwrap_err();
    assert_eq!(sqlstate(&error), "42P01", "reset before the next client");
    let rows = next.simple_query("SHOW application_name").await.unwrap();
    assert_eq!(first_value(&rows), "");

    new.signal(nix::sys::signal::Signal::SIGTERM);
    let (status, log) = new.wait(Duration::from_secs(25)).await;
    assert!(status.success(), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pinned_clients_keep_their_advisory_lock_and_their_listen_across_a_takeover() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let (config, socket) = write_config(dir.path(), port, "mode = \"transaction\"\nsize = 4");
    pin_listeners(&config);
    let old = start_old(&config, dir.path(), port).await;
    let (listener, mut notifications) = listening_client(&url(port)).await;
    listener.batch_execute("LISTEN takeover_pin").await.unwrap();
    let listener_pid = backend_pid(&listener).await;

    let holder = common::connect(&url(port)).await.unwrap();
    holder.batch_execute("SELECT pg_advisory_lock(880011)").await.unwrap();
    let pid = backend_pid(&holder).await;
    let other = common::direct(&shared_cluster().primary().addr(), "app").await;
    let try_lock = "SELECT pg_try_advisory_lock(880011)";

    let new = Process::start(&config, Some(&socket), dir.path().join("new.log"));
    let (status, log) = old.wait(Duration::from_secs(15)).await;
    assert!(status.success(), "the old process exited with {status}:\n{log}");
    assert_eq!(handed_over_with_server(&log), 2, "{log}");

    // The listening client still listens, on the same server session.
    other.batch_execute("NOTIFY takeover_pin, 'after'").await.unwrap();
    let payload = next_notification(&mut notifications).await;
    assert_eq!(payload, ("takeover_pin".to_owned(), "after".to_owned()));
    assert_eq!(backend_pid(&listener).await, listener_pid);

    // Still pinned to the same server session, which still holds the lock.
    assert_eq!(backend_pid(&holder).await, pid, "the same server session");
    assert_eq!(first_value(&other.simple_query(try_lock).await.unwrap()), "f");
    assert_eq!(backend_pid(&holder).await, pid, "pinned: every transaction on it");

    // Unlocked (pg_advisory_unlock_all unpins), the client is no longer pinned: the
    // handed-over connection goes back to the pool, idle, and the lock is free.
    holder.batch_execute("SELECT pg_advisory_unlock_all()").await.unwrap();
    wait_idle_in_pool(port, &pid, "the handed-over connection is idle in the pool").await;
    assert_eq!(first_value(&other.simple_query(try_lock).await.unwrap()), "t");
    assert_eq!(
        backend_pid(&holder).await,
        pid,
        "the next connection the pool needs is the parked one"
    );

    new.signal(nix::sys::signal::Signal::SIGTERM);
    let (status, log) = new.wait(Duration::from_secs(25)).await;
    assert!(status.success(), "{log}");
}
