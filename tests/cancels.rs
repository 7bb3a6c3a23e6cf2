//! Cancel requests across pgrelay instances (docs/operations.md, "Cancel requests"): two
//! instances with different `instance_id`s, each the other's peer, behind a round-robin TCP
//! forwarder as a load balancer would be. A client's own cancel reaches either instance and
//! lands on its query; bogus keys cancel nothing and travel at most one hop; `peers_dns`
//! skips the instance itself; `peer_listen` takes cancels also while an instance drains.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is a failed test

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::raw::{self, CancelKey, Raw, Reply};
use common::{Proxy, config_for, counter, direct, shared_cluster, sqlstate, wait_until};
use tokio::net::{TcpListener, TcpStream};
use tokio_postgres::NoTls;

const CANCELS: &str = "pgrelay_cancel_requests_total";

/// `config_for` the shared cluster with `server` lines added to `[server]`.
fn config(server: &str) -> String {
    config_for(shared_cluster(), "")
        .replace("LISTEN", "127.0.0.1:0")
        .replace(
            "[server]\n",
            &format!("[server]\nshutdown_timeout = \"10s\"\n{server}\n"),
        )
}

/// Starts pgrelay from a file in `dir`, so that a test can change the file and reload it.
async fn start(dir: &Path, name: &str, server: &str) -> Proxy {
    common::init_test_log();
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, config(server)).unwrap();
    let config = pgrelay::config::load(&path).unwrap_or_else(|errors| panic!("{errors}"));
    let running = pgrelay::app::start_with_file(config, Some(path))
        .await
        .expect("start pgrelay");
    Proxy::from_running(running)
}

/// Rewrites `name`'s file with `server` lines and reloads it (SIGHUP's path).
fn reload(dir: &Path, name: &str, proxy: &Proxy, server: &str) {
    std::fs::write(dir.join(format!("{name}.toml")), config(server)).unwrap();
    let reloaded = pgrelay::reload::reload(proxy.running().shared()).expect("reload");
    assert_eq!(reloaded.needs_restart, Vec::<&str>::new());
}

fn cancels(proxy: &Proxy, result: &str) -> f64 {
    counter(proxy, CANCELS, &[("result", result)])
}

/// Two instances, ids 1 and 2, each listing the other in `peers`. Each is started alone
/// (its port is chosen by the system), then told of the other by a reload.
async fn pair(dir: &Path) -> (Proxy, Proxy) {
    let a = start(dir, "a", "instance_id = 1").await;
    let b = start(dir, "b", &format!("instance_id = 2\npeers = [\"{}\"]", a.addr)).await;
    reload(dir, "a", &a, &format!("instance_id = 1\npeers = [\"{}\"]", b.addr));
    (a, b)
}

/// A TCP load balancer: each new connection goes to the next target in turn.
struct RoundRobin {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
}

impl RoundRobin {
    async fn start(targets: Vec<SocketAddr>) -> RoundRobin {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let target = targets[count.fetch_add(1, Ordering::SeqCst) % targets.len()];
                tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        RoundRobin { addr, accepted }
    }

    /// Moves the turn on by one: a connection that the target sees close at once.
    async fn skip_one(&self) {
        let before = self.accepted.load(Ordering::SeqCst);
        drop(TcpStream::connect(self.addr).await.unwrap());
        let accepted = self.accepted.clone();
        wait_until("the forwarder accepted the skip", Duration::from_secs(5), || {
            let accepted = accepted.clone();
            async move { accepted.load(Ordering::SeqCst) > before }
        })
        .await;
    }

    fn url(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=app password=app dbname=app connect_timeout=10",
            self.addr.port()
        )
    }
}

/// Runs `SELECT pg_sleep(0.2)` back to back on `proxy` until `stop`; returns how many
/// completed, failing on any error: a cancel meant for someone else would show as 57014.
fn bystander(proxy: &Proxy, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<usize> {
    let url = proxy.url("app", "app", "app");
    tokio::spawn(async move {
        let client = common::connect(&url).await.unwrap();
        let mut completed = 0;
        while !stop.load(Ordering::SeqCst) {
            if let Err(error) = client.simple_query("SELECT pg_sleep(0.2) -- bystander").await {
                panic!("a bystander's query failed: {} {error}", sqlstate(&error));
            }
            completed += 1;
        }
        completed
    })
}

/// Waits until `text` runs on the primary (as many times as `count`).
async fn running(direct: &tokio_postgres::Client, text: &str, count: i64) {
    wait_until(&format!("{text:?} running"), Duration::from_secs(10), || async {
        let row = direct
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE query = $1 AND state = 'active'",
                &[&text],
            )
            .await
            .unwrap();
        row.get::<_, i64>(0) == count
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_own_cancel_lands_through_a_round_robin_balancer_fifty_times() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = pair(dir.path()).await;
    let balancer = RoundRobin::start(vec![a.addr, b.addr]).await;
    let direct = direct(&shared_cluster().primary().addr(), "app").await;
    let stop = Arc::new(AtomicBool::new(false));
    let bystanders = [bystander(&a, stop.clone()), bystander(&b, stop.clone())];

    const SLEEP: &str = "SELECT pg_sleep(30)";
    let mut slowest = Duration::ZERO;
    for round in 0..50 {
        // Alternate the instance the client lands on; every fifth cancel lands on the
        // client's own instance, the others on the other one and are forwarded.
        if round % 2 == 1 {
            balancer.skip_one().await;
        }
        let client = common::connect(&balancer.url()).await.unwrap();
        let token = client.cancel_token();
        let query = tokio::spawn(async move { client.simple_query(SLEEP).await.map(|_| ()) });
        running(&direct, SLEEP, 1).await;
        if round % 5 == 4 {
            balancer.skip_one().await;
        }
        let sent = Instant::now();
        token.cancel_query(NoTls).await.unwrap();
        let result = tokio::time::timeout(Duration::from_secs(5), query)
            .await
            .unwrap_or_else(|_| panic!("round {round}: the statement was not cancelled within 5 s"))
            .unwrap();
        let took = sent.elapsed();
        let error = result.expect_err("the statement was cancelled");
        assert_eq!(sqlstate(&error), "57014", "round {round}: {error}");
        assert!(took < Duration::from_secs(1), "round {round}: the cancel took {took:?}");
        slowest = slowest.max(took);
    }
    eprintln!("slowest cancel: {slowest:?}");

    stop.store(true, Ordering::SeqCst);
    for bystander in bystanders {
        assert!(bystander.await.unwrap() > 0, "a bystander never completed a query");
    }
    let total = |result: &str| cancels(&a, result) + cancels(&b, result);
    assert_eq!(total("forwarded"), 40.0);
    assert_eq!(total("received"), 40.0);
    assert_eq!(total("local"), 10.0);
    assert_eq!(cancels(&a, "forwarded"), 20.0, "both directions");
    for result in ["unknown", "peer_unknown", "limited", "no_peers"] {
        assert_eq!(total(result), 0.0, "{result}");
    }
    assert_eq!(
        counter(&a, "pgrelay_cancel_forward_failures_total", &[])
            + counter(&b, "pgrelay_cancel_forward_failures_total", &[]),
        0.0
    );
}

/// Starts `sql` on a raw connection and waits until it runs.
async fn start_query(addr: SocketAddr, direct: &tokio_postgres::Client, sql: &str) -> (Raw, CancelKey) {
    let (mut victim, key) = Raw::connect_keyed(&addr.to_string(), "").await;
    victim.send(&[raw::query(sql)]).await;
    running(direct, sql, 1).await;
    (victim, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bogus_keys_cancel_nothing_and_are_forwarded_at_most_once() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = pair(dir.path()).await;
    let direct = direct(&shared_cluster().primary().addr(), "app").await;
    let a_addr = a.addr.to_string();

    // The real process id of a client of B, with a wrong secret, sent to A: A forwards it
    // (the id is B's), B finds the process id but not the secret, and the query runs on.
    const SLEEP: &str = "SELECT pg_sleep(1.5) -- victim";
    let (mut victim, key) = start_query(b.addr, &direct, SLEEP).await;
    assert_eq!(key.process_id >> 23, 2, "B's id is in its keys: {:#x}", key.process_id);
    let wrong = CancelKey {
        process_id: key.process_id,
        secret: key.secret ^ 1,
    };
    raw::cancel(&a_addr, wrong).await;
    assert_eq!(cancels(&a, "forwarded"), 1.0);
    assert_eq!(cancels(&b, "peer_unknown"), 1.0, "B got it and found no such client");
    // The same key, marked as forwarded by a client: A takes it as a peer's and drops it.
    raw::cancel(
        &a_addr,
        CancelKey {
            process_id: key.process_id | 1 << 31,
            secret: key.secret,
        },
    )
    .await;
    assert_eq!(cancels(&a, "peer_unknown"), 1.0);
    assert_eq!(cancels(&a, "forwarded"), 1.0, "a marked request is never forwarded");
    let replies = victim.replies_until_ready(1).await;
    assert!(
        replies.contains(&Reply::Complete("SELECT 1".to_owned())),
        "the victim's statement was cancelled: {}",
        raw::show(&replies)
    );

    // An id no instance has: forwarded once to B, which drops it and does not send it back.
    raw::cancel(
        &a_addr,
        CancelKey {
            process_id: (9 << 23) | 12345,
            secret: 7,
        },
    )
    .await;
    assert_eq!(cancels(&a, "forwarded"), 2.0);
    assert_eq!(cancels(&b, "peer_unknown"), 2.0);
    assert_eq!(cancels(&b, "forwarded"), 0.0, "B never forwards a request from a peer");
    // A's own id, no such client: dropped at A.
    raw::cancel(
        &a_addr,
        CancelKey {
            process_id: (1 << 23) | 12345,
            secret: 7,
        },
    )
    .await;
    assert_eq!(cancels(&a, "unknown"), 1.0);
    assert_eq!(cancels(&a, "forwarded"), 2.0);

    // The right key, through A, still lands on B's client.
    const SLEEP_AGAIN: &str = "SELECT pg_sleep(30) -- victim";
    victim.send(&[raw::query(SLEEP_AGAIN)]).await;
    running(&direct, SLEEP_AGAIN, 1).await;
    raw::cancel(&a_addr, key).await;
    let replies = victim.replies_until_ready(1).await;
    assert!(
        replies.contains(&Reply::Error("57014".to_owned())),
        "{}",
        raw::show(&replies)
    );
    assert_eq!(cancels(&b, "received"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_dns_resolves_at_forward_time_and_skips_the_instance_itself() {
    let dir = tempfile::tempdir().unwrap();
    let direct = direct(&shared_cluster().primary().addr(), "app").await;

    // A name that resolves to the instance itself only: nothing to forward to, and no
    // request sent to itself.
    let alone = start(dir.path(), "alone", "instance_id = 5").await;
    reload(
        dir.path(),
        "alone",
        &alone,
        &format!("instance_id = 5\npeers_dns = \"localhost:{}\"", alone.port()),
    );
    raw::cancel(
        &alone.addr.to_string(),
        CancelKey {
            process_id: (6 << 23) | 1,
            secret: 1,
        },
    )
    .await;
    assert_eq!(cancels(&alone, "no_peers"), 1.0);
    assert_eq!(cancels(&alone, "forwarded"), 0.0);
    assert_eq!(cancels(&alone, "peer_unknown"), 0.0, "it sent the request to itself");

    // Two instances, each naming the other by "localhost:PORT" (loopback has no name
    // resolving to both): the name is resolved when a cancel is forwarded.
    let d = start(dir.path(), "d", "instance_id = 3").await;
    let e = start(
        dir.path(),
        "e",
        &format!("instance_id = 4\npeers_dns = \"localhost:{}\"", d.port()),
    )
    .await;
    reload(
        dir.path(),
        "d",
        &d,
        &format!("instance_id = 3\npeers_dns = \"localhost:{}\"", e.port()),
    );
    const SLEEP: &str = "SELECT pg_sleep(30) -- dns";
    let (mut victim, key) = start_query(e.addr, &direct, SLEEP).await;
    let sent = Instant::now();
    raw::cancel(&d.addr.to_string(), key).await;
    let replies = victim.replies_until_ready(1).await;
    assert!(sent.elapsed() < Duration::from_secs(1), "{:?}", sent.elapsed());
    assert!(
        replies.contains(&Reply::Error("57014".to_owned())),
        "{}",
        raw::show(&replies)
    );
    assert_eq!(cancels(&d, "forwarded"), 1.0);
    assert_eq!(cancels(&e, "received"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_listen_takes_cancels_only_and_also_while_the_instance_drains() {
    let dir = tempfile::tempdir().unwrap();
    let direct = direct(&shared_cluster().primary().addr(), "app").await;
    let f = start(dir.path(), "f", "instance_id = 10\npeer_listen = \"127.0.0.1:0\"").await;
    let g = start(dir.path(), "g", "instance_id = 11\npeer_listen = \"127.0.0.1:0\"").await;
    let f_peer = f.running().peer_addr().unwrap();
    let g_peer = g.running().peer_addr().unwrap();
    // peer_listen is read at startup only, so the reload keeps the bound address.
    reload(
        dir.path(),
        "f",
        &f,
        &format!("instance_id = 10\npeer_listen = \"127.0.0.1:0\"\npeers = [\"{g_peer}\"]"),
    );
    reload(
        dir.path(),
        "g",
        &g,
        &format!("instance_id = 11\npeer_listen = \"127.0.0.1:0\"\npeers = [\"{f_peer}\"]"),
    );

    let login = match common::connect(&format!(
        "host=127.0.0.1 port={} user=app password=app dbname=app connect_timeout=10",
        g_peer.port()
    ))
    .await
    {
        Ok(_) => panic!("a login on peer_listen was accepted"),
        Err(error) => error,
    };
    assert_eq!(sqlstate(&login), "08P01", "{login}");

    // G's client is inside a transaction when G is told to stop: G closes `listen` and
    // waits for the transaction, and the client's cancel, sent to F, still reaches it.
    const SLEEP: &str = "SELECT pg_sleep(30) -- draining";
    let (mut victim, key) = Raw::connect_keyed(&g.addr.to_string(), "").await;
    victim.send(&[raw::query("BEGIN")]).await;
    assert_eq!(victim.replies_until_ready(1).await.last(), Some(&Reply::Ready('T')));
    victim.send(&[raw::query(SLEEP)]).await;
    running(&direct, SLEEP, 1).await;
    let g_addr = g.addr;
    let stopping = tokio::spawn(g.shutdown());
    wait_until("G closed its listen socket", Duration::from_secs(5), || async {
        TcpStream::connect(g_addr).await.is_err()
    })
    .await;
    let sent = Instant::now();
    raw::cancel(&f.addr.to_string(), key).await;
    let replies = victim.replies_until_ready(1).await;
    assert!(sent.elapsed() < Duration::from_secs(1), "{:?}", sent.elapsed());
    assert_eq!(
        replies
            .iter()
            .filter(|reply| **reply == Reply::Error("57014".to_owned()))
            .count(),
        1,
        "{}",
        raw::show(&replies)
    );
    assert_eq!(cancels(&f, "forwarded"), 1.0);
    victim.send(&[raw::query("ROLLBACK")]).await;
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("G stopped once its client's transaction ended")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_does_not_change_the_instance_id_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = start(dir.path(), "h", "instance_id = 20").await;
    std::fs::write(dir.path().join("h.toml"), config("instance_id = 21")).unwrap();
    let reloaded = pgrelay::reload::reload(proxy.running().shared()).expect("reload");
    assert_eq!(reloaded.needs_restart, ["server.instance_id"]);
    assert_eq!(proxy.running().shared().cancel.instance_id(), 20);
    let (_client, key) = Raw::connect_keyed(&proxy.addr.to_string(), "").await;
    assert_eq!(key.process_id >> 23, 20, "new clients still get the running id");
}
