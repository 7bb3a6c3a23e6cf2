//! The monitor against real PostgreSQL: roles, positions, lag under a replay delay, a replica
//! going away and back, failover by promotion and the split brain when the old primary
//! returns. Each test that breaks its cluster has its own (they start in about 3 s).
//! Conditions are awaited with deadlines; nothing sleeps blindly.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::localpg::{ClusterOptions, LocalCluster, Node};

/// Short, so the tests are quick; the monitor polls positions every 50 ms regardless.
const INTERVAL: Duration = Duration::from_millis(200);
const MAX_LAG: Duration = Duration::from_secs(1);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn settings(cluster: &LocalCluster, password: &str) -> MonitorSettings {
    MonitorSettings {
        database: "app".into(),
        dbname: "app".into(),
        hosts: cluster.nodes().iter().map(|node| Arc::from(node.addr())).collect(),
        user: "app".into(),
        password: Some(password.into()),
        health_check_interval: INTERVAL,
        max_replica_lag: Some(MAX_LAG),
        connect_timeout: Duration::from_secs(2),
        lsn_poll_interval: DEFAULT_LSN_POLL_INTERVAL,
        tls: None,
    }
}

fn start(runtime: &tokio::runtime::Runtime, cluster: &LocalCluster) -> Arc<ClusterMonitor> {
    let _entered = runtime.enter();
    ClusterMonitor::start(settings(cluster, "app")).expect("start monitor")
}

/// Polls the view until `ready` holds, failing after `timeout` with the last view.
fn wait_until(
    monitor: &ClusterMonitor,
    what: &str,
    timeout: Duration,
    ready: impl Fn(&ClusterView) -> bool,
) -> Arc<ClusterView> {
    let deadline = Instant::now() + timeout;
    loop {
        let view = monitor.view();
        if ready(&view) {
            return view;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {timeout:?}; view: {view:#?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Polls psql on `node` until it prints `expected`.
fn wait_psql(cluster: &LocalCluster, node: &Node, sql: &str, expected: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let out = cluster.psql(node, "app", sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
        if out == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{sql}: {out:?}, not {expected:?} within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn healthy(view: &ClusterView) -> bool {
    view.primary == Some(0)
        && view.hosts[0].up
        && view.hosts[0].role == Role::Primary
        && view.hosts[1].up
        && view.hosts[1].role == Role::Replica
        && view.hosts[1].usable_for_reads
}

/// Runs `sql` on the primary and returns the end of its commit record. The local clusters run
/// with `synchronous_commit = off`, so the commit is made synchronous to have it flushed, and
/// the flush position is read afterwards (not in the same psql command: statements sent
/// together are one transaction, and the position would be read before the commit).
fn write(cluster: &LocalCluster, sql: &str) -> Lsn {
    cluster
        .psql(cluster.primary(), "app", &format!("SET synchronous_commit = on; {sql}"))
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    cluster
        .psql(cluster.primary(), "app", "SELECT pg_current_wal_flush_lsn()")
        .expect("WAL position")
        .parse()
        .expect("an LSN")
}

#[test]
fn roles_positions_liveness_and_shutdown() {
    let cluster = LocalCluster::new(ClusterOptions::default()).expect("start cluster");
    let replica = &cluster.replicas()[0];
    let runtime = runtime();
    let monitor = start(&runtime, &cluster);
    assert!(runtime.block_on(monitor.first_check(Duration::from_secs(10))));
    let view = wait_until(&monitor, "primary and replica seen", Duration::from_secs(5), healthy);
    assert!(!view.split_brain);
    assert!(view.hosts[1].replay_lsn.is_some() && view.hosts[1].receive_lsn.is_some());
    assert_eq!(view.hosts[0].replay_lsn, None, "a primary replays nothing");
    assert!(monitor.primary_lsn().is_some());

    // Positions are fresh: well within one second of a commit, the view has the primary past
    // it and, once replayed, the replica caught up to it.
    let lsn = write(&cluster, "CREATE TABLE t (x int); INSERT INTO t VALUES (1)");
    wait_until(
        &monitor,
        "primary position past the commit",
        Duration::from_secs(1),
        |view| view.primary_lsn().is_some_and(|primary| primary >= lsn),
    );
    cluster.wait_replay(replica, Duration::from_secs(10)).expect("replay");
    wait_until(
        &monitor,
        "replica caught up to the commit",
        Duration::from_secs(1),
        |view| view.replicas_caught_up_to(lsn).eq([1]),
    );

    // Idle primary: the replica's last replayed commit ages past max_replica_lag, yet it is
    // caught up, so no lag.
    wait_psql(
        &cluster,
        replica,
        "SELECT now() - pg_last_xact_replay_timestamp() > interval '1.5 s'",
        "t",
        Duration::from_secs(10),
    );
    let view = wait_until(&monitor, "no lag on an idle primary", Duration::from_secs(2), |view| {
        view.hosts[1].lag == Some(Duration::ZERO)
    });
    assert!(view.hosts[1].usable_for_reads);

    // Its monitor session is killed: the monitor reconnects at once, and the replica never
    // shows as down (subscribers hear nothing).
    let mut changes = monitor.subscribe();
    let sessions = format!("SELECT pid FROM pg_stat_activity WHERE application_name = '{APPLICATION_NAME}'");
    let killed = cluster.psql(replica, "app", &sessions).expect("monitor session");
    let kill = format!("SELECT pg_terminate_backend({killed})");
    assert_eq!(cluster.psql(replica, "app", &kill).expect("terminate"), "t");
    let deadline = Instant::now() + Duration::from_secs(5);
    let reconnected = loop {
        let pid = cluster.psql(replica, "app", &sessions).expect("monitor session");
        if !pid.is_empty() && pid != killed {
            break Instant::now();
        }
        assert!(Instant::now() < deadline, "no new monitor session: {pid:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    wait_until(&monitor, "answers on the new session", Duration::from_secs(2), |view| {
        view.hosts[1].sampled_at.is_some_and(|at| at > reconnected)
    });
    assert!(!changes.has_changed().expect("monitor alive"), "{:#?}", monitor.view());

    // The replica stops: down at once, and subscribers hear of it; it starts: up again, with a
    // new generation (it restarted, so connections to it are dead).
    let generation = view.hosts[1].generation;
    cluster.stop(replica).expect("stop replica");
    let down = runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(3), changes.wait_for(|view| !view.hosts[1].up))
            .await
            .expect("notified within 3 s")
            .expect("monitor alive")
            .clone()
    });
    assert!(!down.hosts[1].usable_for_reads && down.hosts[1].lag.is_none());
    assert_eq!(down.replicas_caught_up_to(Lsn::ZERO).count(), 0);
    assert_eq!(down.primary, Some(0));
    cluster.start(replica).expect("start replica");
    let view = wait_until(&monitor, "replica back", Duration::from_secs(5), healthy);
    assert!(view.hosts[1].generation > generation, "restart bumps the generation");
    assert_eq!(monitor.split_brain_events(), 0);
    assert_eq!(monitor.primary_changes(), 0);

    // A monitor that cannot log in sees every host down, without panicking.
    let refused = {
        let _entered = runtime.enter();
        ClusterMonitor::start(settings(&cluster, "wrong")).expect("start monitor")
    };
    assert!(runtime.block_on(refused.first_check(Duration::from_secs(10))));
    let view = refused.view();
    assert!(view.hosts.iter().all(|host| host.checked && !host.up), "{view:#?}");
    assert_eq!(view.primary, Some(0));

    // Dropping the last handle closes the side connections.
    let sessions = format!("SELECT count(*) FROM pg_stat_activity WHERE application_name = '{APPLICATION_NAME}'");
    assert_eq!(cluster.psql(cluster.primary(), "app", &sessions).expect("count"), "1");
    drop(monitor);
    drop(refused);
    wait_psql(&cluster, cluster.primary(), &sessions, "0", Duration::from_secs(5));
    wait_psql(&cluster, replica, &sessions, "0", Duration::from_secs(5));
}

#[test]
fn lag_follows_the_replay_delay() {
    let cluster = LocalCluster::new(ClusterOptions::default()).expect("start cluster");
    let replica = &cluster.replicas()[0];
    let runtime = runtime();
    let monitor = start(&runtime, &cluster);
    wait_until(&monitor, "primary and replica seen", Duration::from_secs(5), healthy);

    cluster
        .set_apply_delay(replica, Some(Duration::from_secs(5)))
        .expect("set apply delay");
    let lsn = write(&cluster, "CREATE TABLE d (x int); INSERT INTO d VALUES (1)");
    let view = wait_until(
        &monitor,
        "replica beyond max_replica_lag",
        Duration::from_secs(4),
        |view| view.hosts[1].lag.is_some_and(|lag| lag > MAX_LAG) && !view.hosts[1].usable_for_reads,
    );
    assert!(view.hosts[1].up, "lagging is not down");
    assert_eq!(view.hosts[1].role, Role::Replica);
    assert!(view.hosts[1].replay_lsn.is_some_and(|replay| replay < lsn));
    assert!(
        view.hosts[1].receive_lsn.is_some_and(|received| received >= lsn),
        "received, not applied"
    );
    assert_eq!(view.usable_replicas().count(), 0);
    assert_eq!(view.replicas_caught_up_to(Lsn::ZERO).count(), 0);

    cluster.set_apply_delay(replica, None).expect("clear apply delay");
    let cleared = Instant::now();
    let view = wait_until(&monitor, "replica usable again", Duration::from_secs(3), |view| {
        view.hosts[1].usable_for_reads
    });
    assert!(cleared.elapsed() <= 5 * INTERVAL, "took {:?}", cleared.elapsed());
    assert!(view.replicas_caught_up_to(lsn).eq([1]));
}

#[test]
fn failover_then_split_brain_when_the_old_primary_returns() {
    let cluster = LocalCluster::new(ClusterOptions::default()).expect("start cluster");
    let (primary, replica) = (cluster.primary(), &cluster.replicas()[0]);
    let runtime = runtime();
    let monitor = start(&runtime, &cluster);
    write(&cluster, "CREATE TABLE f (x int)");
    cluster.wait_replay(replica, Duration::from_secs(10)).expect("replay");
    let before = wait_until(&monitor, "primary and replica seen", Duration::from_secs(5), healthy);

    // The primary stops: down, but still where writes go while nothing else can take them.
    cluster.stop(primary).expect("stop primary");
    let view = wait_until(&monitor, "primary down", Duration::from_secs(3), |view| {
        !view.hosts[0].up
    });
    assert_eq!(view.primary, Some(0));
    assert_eq!(view.primary_lsn(), None);
    assert!(
        view.hosts[1].usable_for_reads,
        "replicas keep serving reads without their primary"
    );

    // The replica is promoted: it becomes the primary within three health-check intervals.
    cluster.promote(replica).expect("promote");
    let promoted = Instant::now();
    let view = wait_until(&monitor, "promoted replica is the primary", 3 * INTERVAL, |view| {
        view.primary == Some(1)
    });
    assert!(promoted.elapsed() <= 3 * INTERVAL);
    assert_eq!(view.hosts[1].role, Role::Primary);
    assert!(
        view.hosts[1].generation > before.hosts[1].generation,
        "its connections were opened to a replica"
    );
    assert!(!view.hosts[1].usable_for_reads);
    assert!(!view.split_brain);
    assert_eq!(monitor.primary_changes(), 1);
    wait_until(&monitor, "the new primary's position", Duration::from_secs(1), |view| {
        view.primary_lsn().is_some()
    });

    // The old primary starts again, out of recovery: split brain; writes stay on the promoted
    // host, and the episode is counted once however long it lasts.
    cluster.start(primary).expect("start old primary");
    let view = wait_until(&monitor, "split brain", Duration::from_secs(5), |view| view.split_brain);
    assert_eq!(view.primary, Some(1));
    assert!(view.hosts[0].up && view.hosts[0].role == Role::Primary && !view.hosts[0].usable_for_reads);
    let detected = view.hosts[0].sampled_at.expect("sampled");
    wait_until(&monitor, "several more polls", Duration::from_secs(3), |view| {
        view.hosts[0]
            .sampled_at
            .is_some_and(|at| at > detected + Duration::from_millis(300))
    });
    let view = monitor.view();
    assert!(view.split_brain);
    assert_eq!(view.primary, Some(1));
    assert_eq!(monitor.split_brain_events(), 1);
    assert_eq!(monitor.primary_changes(), 1);
}
