//! Tests of `localpg` against the real PostgreSQL binaries on this machine.

#![allow(clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::binaries::{locate_in, parse_version};
use super::privileges::{RunAs, resolve};
use super::*;
use std::sync::Arc;

/// Runs psql as a client over TCP, the way an application would log in.
fn login(cluster: &LocalCluster, node: &Node, user: &str, password: Option<&str>) -> (bool, String) {
    let mut cmd = Command::new(cluster.bin_path("psql").expect("psql"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PG") {
            cmd.env_remove(key);
        }
    }
    if let Some(pw) = password {
        cmd.env("PGPASSWORD", pw);
    }
    let port = node.port().to_string();
    cmd.args([
        "-X",
        "-A",
        "-t",
        "-w",
        "-h",
        "127.0.0.1",
        "-p",
        &port,
        "-U",
        user,
        "-d",
        "app",
    ]);
    cmd.args(["-c", "SELECT current_user"]);
    let out = cmd.output().expect("run psql");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    (out.status.success(), text)
}

/// Alive and not a zombie (whoever inherits an orphan may reap it late).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

fn wait_dead(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while alive(pid) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

fn q(cluster: &LocalCluster, node: &Node, sql: &str) -> String {
    cluster.psql(node, "app", sql).unwrap_or_else(|e| panic!("{sql}: {e}"))
}

#[test]
fn primary_and_replica_lifecycle() {
    let cluster = LocalCluster::new(ClusterOptions::default()).expect("start cluster");
    let primary = cluster.primary();
    let replica = &cluster.replicas()[0];
    assert_eq!(cluster.replicas().len(), 1);
    assert_eq!(primary.addr(), format!("127.0.0.1:{}", primary.port()));
    assert_ne!(primary.port(), replica.port());
    assert!(cluster.bin_path("pgbench").expect("pgbench").exists());

    // Private directory, servers under the unprivileged user when we are root.
    let meta = std::fs::metadata(cluster.dir()).expect("cluster dir");
    assert_eq!(meta.permissions().mode() & 0o777, 0o700);
    if nix::unistd::geteuid().is_root() {
        let nobody = nix::unistd::User::from_name("nobody").expect("lookup").expect("nobody");
        assert_eq!(cluster.os_user(), "nobody");
        assert_eq!(meta.uid(), nobody.uid.as_raw());
        let pid = primary.pid().expect("primary runs");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        let uid_line = status.lines().find(|l| l.starts_with("Uid:")).expect("Uid");
        assert!(uid_line.contains(&nobody.uid.as_raw().to_string()), "{uid_line}");
    }

    // Replication.
    assert_eq!(q(&cluster, replica, "SELECT pg_is_in_recovery()"), "t");
    q(&cluster, primary, "CREATE TABLE t (id int PRIMARY KEY, v text)");
    q(&cluster, primary, "INSERT INTO t VALUES (1, 'one')");
    cluster.wait_replay(replica, Duration::from_secs(10)).expect("replay");
    assert_eq!(q(&cluster, replica, "SELECT v FROM t WHERE id = 1"), "one");
    let err = cluster
        .psql(replica, "app", "INSERT INTO t VALUES (2, 'x')")
        .expect_err("replica is read-only");
    assert!(err.to_string().contains("read-only"), "{err}");

    // The four roles and their authentication methods.
    let stored = q(
        &cluster,
        primary,
        "SELECT string_agg(rolname || ':' || coalesce(left(rolpassword, 3), '-'), ',' ORDER BY rolname) \
         FROM pg_authid WHERE rolname LIKE 'app%'",
    );
    assert_eq!(stored, "app:SCR,app_md5:md5,app_plain:SCR,app_trust:-");
    let methods = q(
        &cluster,
        replica,
        "SELECT string_agg(array_to_string(user_name, ',') || '=' || auth_method, ' ' ORDER BY line_number) \
         FROM pg_hba_file_rules WHERE type = 'host' AND database <> '{replication}'",
    );
    assert_eq!(
        methods,
        "app_md5=md5 app_plain=password app_trust=trust all=scram-sha-256"
    );
    for node in [primary, replica] {
        for user in ["app", "app_md5", "app_plain"] {
            let (ok, out) = login(&cluster, node, user, Some(user));
            assert!(ok && out == user, "{user} on {}: {out}", node.name());
            let (ok, out) = login(&cluster, node, user, Some("wrong"));
            assert!(!ok && out.contains("password authentication failed"), "{user}: {out}");
        }
        let (ok, out) = login(&cluster, node, "app_trust", None);
        assert!(ok && out == "app_trust", "{out}");
        let (ok, out) = login(&cluster, node, "postgres", Some("postgres"));
        assert!(ok && out == "postgres", "{out}");
    }
    assert_eq!(
        q(
            &cluster,
            primary,
            "SELECT count(*) FROM pg_database WHERE datname IN ('app', 'other')"
        ),
        "2"
    );

    // Apply delay makes lag visible; clearing it removes the lag.
    let delay = Duration::from_millis(1500);
    cluster.set_apply_delay(replica, Some(delay)).expect("set delay");
    let started = Instant::now();
    q(&cluster, primary, "INSERT INTO t VALUES (2, 'two')");
    assert_eq!(q(&cluster, replica, "SELECT count(*) FROM t WHERE id = 2"), "0");
    cluster
        .wait_replay(replica, Duration::from_secs(15))
        .expect("replay with delay");
    assert!(
        started.elapsed() >= Duration::from_millis(1000),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(q(&cluster, replica, "SELECT count(*) FROM t WHERE id = 2"), "1");
    cluster.set_apply_delay(replica, None).expect("clear delay");
    q(&cluster, primary, "INSERT INTO t VALUES (3, 'three')");
    cluster
        .wait_replay(replica, Duration::from_secs(1))
        .expect("replay without delay");

    // Stop and restart a replica on the same port; it catches up.
    let port = replica.port();
    let pid = replica.pid().expect("replica runs");
    cluster.stop(replica).expect("stop replica");
    assert!(!replica.is_running() && !alive(pid));
    cluster.stop(replica).expect("stopping twice is a no-op");
    assert!(cluster.psql(replica, "app", "SELECT 1").is_err());
    q(&cluster, primary, "INSERT INTO t VALUES (4, 'four')");
    cluster.start(replica).expect("restart replica");
    assert_eq!(replica.port(), port);
    cluster.wait_replay(replica, Duration::from_secs(10)).expect("catch up");
    assert_eq!(q(&cluster, replica, "SELECT v FROM t WHERE id = 4"), "four");

    // Crash the primary; it recovers and the replica reconnects.
    q(
        &cluster,
        primary,
        "SET synchronous_commit = on; INSERT INTO t VALUES (5, 'five')",
    );
    let pid = primary.pid().expect("primary runs");
    cluster.kill(primary).expect("kill primary");
    assert!(!alive(pid));
    assert!(node::processes_in(primary.data_dir()).is_empty());
    cluster.start(primary).expect("restart primary");
    assert_eq!(q(&cluster, primary, "SELECT v FROM t WHERE id = 5"), "five");
    cluster
        .wait_replay(replica, Duration::from_secs(30))
        .expect("replica follows the restarted primary");

    // Promotion.
    let err = cluster.promote(primary).expect_err("primary cannot be promoted");
    assert!(matches!(err, Error::NotAReplica { .. }), "{err}");
    cluster.promote(replica).expect("promote");
    assert!(!replica.is_replica());
    assert_eq!(q(&cluster, replica, "SELECT pg_is_in_recovery()"), "f");
    q(&cluster, replica, "INSERT INTO t VALUES (6, 'six')");

    // Drop stops everything and removes the directory.
    let dir = cluster.dir().to_path_buf();
    let pids: Vec<u32> = cluster.nodes().iter().filter_map(Node::pid).collect();
    assert_eq!(pids.len(), 2);
    drop(cluster);
    assert!(!dir.exists(), "{} left behind", dir.display());
    for pid in pids {
        assert!(!alive(pid), "postgres {pid} survived drop");
    }
}

#[test]
fn options_two_replicas_and_shutdown() {
    let options = ClusterOptions {
        replicas: 2,
        replica_apply_delay: Some(Duration::from_millis(300)),
        setup_sql: vec![
            "CREATE ROLE extra LOGIN PASSWORD 'extra'".into(),
            "\\c app".into(),
            "CREATE TABLE seeded (x int)".into(),
            "INSERT INTO seeded VALUES (42)".into(),
        ],
        primary_conf: vec!["work_mem = '7MB'".into()],
        replica_conf: vec!["work_mem = '9MB'".into()],
        extra_hba: vec!["host all extra 127.0.0.1/32 trust".into()],
        ..ClusterOptions::default()
    };
    let cluster = LocalCluster::new(options).expect("start cluster");
    let primary = cluster.primary();
    assert_eq!(
        q(
            &cluster,
            primary,
            "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'"
        ),
        "2"
    );
    assert_eq!(q(&cluster, primary, "SHOW work_mem"), "7MB");
    for replica in cluster.replicas() {
        assert!(replica.is_replica());
        assert_eq!(q(&cluster, replica, "SHOW work_mem"), "9MB");
        assert_eq!(q(&cluster, replica, "SHOW recovery_min_apply_delay"), "300ms");
        cluster.wait_replay(replica, Duration::from_secs(10)).expect("replay");
        assert_eq!(q(&cluster, replica, "SELECT x FROM seeded"), "42");
        let (ok, out) = login(&cluster, replica, "extra", None);
        assert!(ok && out == "extra", "{out}");
    }
    let bad = cluster.psql(primary, "app", "SELECT nope").expect_err("bad SQL");
    assert!(bad.to_string().contains("nope"), "{bad}");
    let dir = cluster.dir().to_path_buf();
    cluster.shutdown().expect("clean shutdown");
    assert!(!dir.exists());
}

const CHILD_ENV: &str = "PGRELAY_LOCALPG_TEST_CHILD";
const CHILD_MARK: &str = "PGRELAY_LOCALPG_CHILD_CLUSTER";

/// Not a test on its own: `servers_die_with_their_process` runs it in a child process.
#[test]
fn child_holds_a_cluster() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let options = ClusterOptions {
        replicas: 0,
        ..ClusterOptions::default()
    };
    let cluster = LocalCluster::new(options).expect("start cluster");
    let pid = cluster.primary().pid().expect("primary runs");
    // Servers are spawned by the spawner thread, so this test thread ending must not matter:
    // hand the cluster to a thread that ends at once and keep the process alive.
    let dir = cluster.dir().display().to_string();
    std::thread::spawn(move || std::mem::forget(cluster))
        .join()
        .expect("join");
    println!("{CHILD_MARK} {pid} {dir}");
    std::thread::sleep(Duration::from_secs(120));
}

#[test]
fn servers_die_with_their_process() {
    let test_name = module_path!()
        .split_once("::")
        .map_or(module_path!(), |(_, rest)| rest)
        .to_string()
        + "::child_holds_a_cluster";
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([test_name.as_str(), "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn child test");
    let stdout = child.stdout.take().expect("stdout");
    let line = BufReader::new(stdout)
        .lines()
        .map_while(|l| l.ok())
        // The harness may print "test ... " on the same line before our output.
        .find_map(|l| l.split_once(CHILD_MARK).map(|(_, rest)| rest.to_string()));
    let _ = child.kill();
    let _ = child.wait();
    let line = line.expect("the child reported its cluster");
    let mut fields = line.split_whitespace();
    let pid: u32 = fields.next().and_then(|p| p.parse().ok()).expect("pid");
    let dir = Path::new(fields.next().expect("dir")).to_path_buf();
    assert!(
        wait_dead(pid, Duration::from_secs(15)),
        "postgres {pid} outlived the process that started it"
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while !node::processes_in(&dir).is_empty() {
        assert!(
            Instant::now() < deadline,
            "server processes remain in {}",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The next cluster directory sweeps up the one the dead process left.
    let run_as = RunAs::detect().expect("run as");
    let fresh = workdir::create(&run_as).expect("fresh dir");
    assert!(!dir.exists(), "stale {} not swept", dir.display());
    std::fs::remove_dir_all(fresh).expect("remove fresh dir");
}

fn fake_bin(dir: &Path, version: &str) {
    std::fs::create_dir_all(dir).expect("mkdir");
    for name in ["postgres", "initdb", "pg_ctl", "pg_basebackup"] {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\necho 'postgres (PostgreSQL) {version}'\n")).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
}

#[test]
fn binaries_are_located_in_order() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("lib");
    fake_bin(&root.join("9.6/bin"), "9.6.24");
    fake_bin(&root.join("16/bin"), "16.2 (Debian 16.2-1)");
    fake_bin(&root.join("13/bin"), "13.1");
    std::fs::create_dir_all(root.join("not-a-version/bin")).expect("mkdir");
    let explicit = tmp.path().join("explicit");
    fake_bin(&explicit, "14.5");

    let found = locate_in(Some(explicit.clone().into()), None, &root).expect("explicit");
    assert_eq!(
        (found.dir(), found.version(), found.major()),
        (explicit.as_path(), "14.5", 14)
    );

    let err = locate_in(Some(tmp.path().join("nowhere").into()), None, &root).expect_err("bad env");
    assert!(matches!(err, Error::BadBinDir { .. }), "{err}");

    let found = locate_in(None, Some(root.join("13/bin")), &root).expect("pg_config");
    assert_eq!(found.major(), 13);

    let found = locate_in(None, Some(tmp.path().join("empty")), &root).expect("newest");
    assert_eq!(found.dir(), root.join("16/bin"));
    assert_eq!(found.version(), "16.2");

    let err = locate_in(None, None, &tmp.path().join("none")).expect_err("nothing");
    assert!(err.to_string().contains("apt-get install postgresql"), "{err}");

    let err = locate_in(Some(root.join("9.6/bin").into()), None, &root).expect_err("too old");
    assert!(matches!(err, Error::UnsupportedVersion { .. }), "{err}");

    // Falls back to /usr/bin for tools Debian keeps there.
    let sh = found.path("sh").expect("sh from /usr/bin");
    assert_eq!(sh, Path::new("/usr/bin/sh"));
    assert!(matches!(found.path("no-such-tool"), Err(Error::BinaryNotFound { .. })));

    // The real installation of this machine.
    let real = PgBinaries::locate().expect("PostgreSQL installed");
    assert!(real.dir().join("postgres").exists());
    assert!(real.major() >= 12);
}

#[test]
fn versions_parse() {
    assert_eq!(
        parse_version("postgres (PostgreSQL) 15.13 (Debian 15.13-0+deb12u1)\n"),
        Some(("15.13".to_string(), 15))
    );
    assert_eq!(
        parse_version("postgres (PostgreSQL) 17beta1"),
        Some(("17beta1".to_string(), 17))
    );
    assert_eq!(parse_version("something else"), None);
}

#[test]
fn run_as_is_unprivileged_only_for_root() {
    use nix::unistd::{Gid, Uid};
    let root = (Uid::from_raw(0), Gid::from_raw(0));
    let r = resolve(root.0, root.1, None).expect("nobody");
    assert_eq!(r.name(), "nobody");
    assert!(r.is_switching());
    assert!(matches!(
        resolve(root.0, root.1, Some("root".into())),
        Err(Error::RootPgUser { .. })
    ));
    let err = resolve(root.0, root.1, Some("no-such-user-pgrelay".into())).expect_err("missing");
    assert!(matches!(err, Error::NoSuchUser { .. }), "{err}");
    assert!(err.to_string().contains("PGRELAY_PG_USER"));
    let r = resolve(Uid::from_raw(12345), Gid::from_raw(12345), Some("nobody".into())).expect("non-root");
    assert!(!r.is_switching());
}

#[test]
fn a_port_taken_before_start_is_replaced() {
    let options = ClusterOptions {
        replicas: 0,
        ..ClusterOptions::default()
    };
    let cluster = LocalCluster::new(options).expect("start cluster");
    let ctx = Arc::clone(&cluster.ctx);
    let data_dir = ctx.dir.join("clash");
    setup::initdb(&ctx, &data_dir).expect("initdb");
    setup::write_hba(&ctx, &data_dir, &[]).expect("hba");
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken = squatter.local_addr().expect("addr").port();
    let mut first = true;
    let mut next_port = || {
        if std::mem::take(&mut first) {
            Ok(taken)
        } else {
            ports::free_port()
        }
    };
    let node = start_new_node_with(&ctx, "clash", None, &[], &mut next_port).expect("retried");
    assert_ne!(node.port(), taken);
    assert!(node.log_tail(50).contains("Address already in use"));
    assert_eq!(cluster.psql(&node, "postgres", "SELECT 1").expect("query"), "1");
    cluster.stop(&node).expect("stop the extra node");
    drop(squatter);

    // teardown(&self) is for clusters that are never dropped; a later drop does nothing more.
    let pid = cluster.primary().pid().expect("primary runs");
    cluster.teardown();
    assert!(!alive(pid) && !ctx.dir.exists());
    cluster.teardown();
    drop(cluster);
}

#[test]
fn a_cluster_can_be_shared_between_threads() {
    fn shareable<T: Send + Sync + 'static>() {}
    shareable::<LocalCluster>();
    shareable::<Error>();
}
