//! End-to-end, one test per phase in which a server is lost or cannot be had while a
//! client owes or is owed a reply: the login to the server (refused with 57P03, cut,
//! reset, never answered), the checkout while the primary restarts or is killed, the
//! queries pgrelay runs on its own (settings replayed on a new server, the reset on
//! release, the commit-position fence, the barrier after a failed COPY), a Flush-only
//! batch, COPY FROM STDIN in the extended protocol and COPY TO STDOUT. Each asserts the exact answer (ErrorResponse and
//! ReadyForQuery, or a FATAL and a close where nothing else fits) within a bound, and
//! that pgrelay serves a fresh client afterwards.
//!
//! The servers are real and of this file's own cluster, since tests here stop, restart
//! and kill them; those take `SERVERS` for writing, the others for reading. Where "the
//! moment" is a message pgrelay sends by itself, a relay between pgrelay and the server
//! (`common::relay`) holds that message back while the test ends the server session.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is a failed test

mod common;

use std::cell::RefCell;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::raw::{Raw, bind, copy_data, copy_done, execute, flush, message, parse, parse_reply, query, show, sync};
use common::relay::{Accept, Relay};
use common::{Proxy, config_for, config_with_replica};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use pgrelay::localpg::{ClusterOptions, LocalCluster};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::RwLock;

/// Longest any answer may take after the server is lost, beyond the configured waits.
const BOUND: Duration = Duration::from_secs(5);

/// Tests that stop, restart or kill a server hold it for writing; the others for reading.
static SERVERS: RwLock<()> = RwLock::const_new(());

fn cluster() -> &'static LocalCluster {
    static CLUSTER: OnceLock<&'static LocalCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        common::own_cluster(ClusterOptions {
            setup_sql: vec![
                "\\c app".to_owned(),
                "CREATE TABLE items (id serial PRIMARY KEY, owner text, value int)".to_owned(),
                "GRANT ALL ON items TO PUBLIC".to_owned(),
                "GRANT ALL ON SEQUENCE items_id_seq TO PUBLIC".to_owned(),
            ],
            // A commit the client saw must survive the kill of the server.
            primary_conf: vec!["synchronous_commit = on".to_owned()],
            ..ClusterOptions::default()
        })
    })
}

async fn start_proxy(config: &str) -> Proxy {
    Proxy::start_isolated(config, 2).await
}

/// `config` with the primary reached through `relay`.
fn through(relay: &Relay, config: &str) -> String {
    config.replace(&cluster().primary().addr(), &relay.addr.to_string())
}

async fn admin() -> tokio_postgres::Client {
    common::direct(&cluster().primary().addr(), "app").await
}

async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(work).await.unwrap()
}

/// One whole message from pgrelay as text (`E:57P01`, `Z:I`, `D`…), and for an
/// ErrorResponse its severity and message.
async fn next(raw: &mut Raw, within: Duration) -> (String, Option<(String, String)>) {
    let (tag, body) = tokio::time::timeout(within, raw.next_message())
        .await
        .expect("a message within the bound");
    let mut whole = vec![tag, 0, 0, 0, 0];
    whole.extend_from_slice(&body);
    let shape = show(&[parse_reply(&whole)]);
    let fields = (tag == b'E').then(|| {
        let field = |code: u8| {
            body.split(|&b| b == 0)
                .find_map(|field| field.strip_prefix(&[code]))
                .map(|value| String::from_utf8_lossy(value).into_owned())
                .unwrap_or_default()
        };
        (field(b'V'), field(b'M'))
    });
    (shape, fields)
}

/// Replies up to and including the `count`-th ReadyForQuery, each within `within` of
/// the one before; with the messages of the errors among them.
async fn answer_within(raw: &mut Raw, count: usize, within: Duration) -> (String, Vec<String>) {
    let mut shapes = Vec::new();
    let mut errors = Vec::new();
    let mut seen = 0;
    while seen < count {
        let (shape, error) = next(raw, within).await;
        seen += usize::from(shape.starts_with("Z:"));
        shapes.push(shape);
        errors.extend(error.map(|(_, message)| message));
    }
    (shapes.join(" "), errors)
}

async fn answer(raw: &mut Raw) -> String {
    answer_within(raw, 1, BOUND).await.0
}

/// Sends `sql` and returns the answer.
async fn ask(raw: &mut Raw, sql: &str) -> String {
    raw.send(&[query(sql)]).await;
    answer(raw).await
}

/// Sends `sql` and returns the first column of its one row.
async fn value(raw: &mut Raw, sql: &str) -> String {
    raw.send(&[query(sql)]).await;
    let mut value = None;
    loop {
        let (tag, body) = tokio::time::timeout(BOUND, raw.next_message())
            .await
            .expect("an answer within the bound");
        match tag {
            b'D' => {
                let len = i32::from_be_bytes([body[2], body[3], body[4], body[5]]);
                value = Some(String::from_utf8_lossy(&body[6..6 + usize::try_from(len).unwrap()]).into_owned());
            }
            b'E' => panic!("{sql}: {}", String::from_utf8_lossy(&body)),
            b'Z' => return value.expect("a row"),
            _ => {}
        }
    }
}

/// Replies up to the first ErrorResponse, within BOUND.
async fn until_error(raw: &mut Raw) -> String {
    let replies = tokio::time::timeout(BOUND, raw.replies_until('E'))
        .await
        .expect("an error within the bound");
    show(&replies)
}

/// A fresh client logs in and is served.
async fn fresh_client_is_served(proxy: &Proxy) {
    let mut raw = Raw::connect_named(&proxy.addr.to_string(), "phase_fresh").await;
    assert_eq!(ask(&mut raw, "SELECT 1").await, "T D C:SELECT 1 Z:I");
}

/// Starts a login as `app_trust` to database `app` and reads the replies up to
/// ReadyForQuery or an error, without expecting either.
async fn try_login(proxy: &Proxy, application_name: &str) -> (Raw, String, Option<(String, String)>) {
    let mut body = 196_608u32.to_be_bytes().to_vec();
    body.extend_from_slice(b"user\0app_trust\0database\0app\0");
    body.extend_from_slice(format!("application_name\0{application_name}\0\0").as_bytes());
    let mut packet = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    let mut raw = Raw {
        stream: tokio::net::TcpStream::connect(proxy.addr).await.unwrap(),
        input: Vec::new(),
    };
    raw.stream.write_all(&packet).await.unwrap();
    let mut shapes = Vec::new();
    loop {
        let (shape, error) = next(&mut raw, BOUND).await;
        let done = shape.starts_with("Z:") || error.is_some();
        shapes.push(shape);
        if done {
            return (raw, shapes.join(" "), error);
        }
    }
}

/// pgrelay closes the connection, with nothing more to say, within BOUND.
async fn assert_closed(raw: &mut Raw) {
    assert!(raw.input.is_empty(), "more after the FATAL");
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(BOUND, raw.stream.read(&mut byte))
        .await
        .expect("the connection closed within the bound");
    assert!(matches!(read, Ok(0) | Err(_)), "more after the FATAL: {read:?}");
}

/// Ends the server sessions on `ports` (pg_stat_activity.client_port) and waits until
/// they are gone. Each port is one pgrelay's message was held back on, so each has a
/// session; should one not be listed yet, it is looked for again until BOUND.
async fn terminate_ports(ports: &[u16]) {
    let admin = admin().await;
    let left = RefCell::new(ports.iter().map(|&port| i32::from(port)).collect::<Vec<_>>());
    let ended = RefCell::new(Vec::new());
    common::wait_until("a server session for each port", BOUND, || {
        let (admin, left, ended) = (&admin, &left, &ended);
        async move {
            let ports = left.borrow().clone();
            for (pid, port) in end_sessions(admin, &ports).await {
                ended.borrow_mut().push(pid);
                left.borrow_mut().retain(|left| *left != port);
            }
            left.borrow().is_empty()
        }
    })
    .await;
    wait_until_gone(&admin, &ended.into_inner()).await;
}

/// Ends every server session made through `relay`, and waits until pgrelay has been
/// told (the relay closed its side), so that its next checkout finds them dead.
///
/// The relay lists a connection until it has seen the server close it, which is after
/// the backend left pg_stat_activity (and, under load, may be well after): a listed port
/// without a session is one already ending, not one to fail on. A backend not yet in
/// pg_stat_activity (a monitor reconnecting) is ended on a later round.
async fn terminate_relayed(relay: &Relay) {
    let admin = admin().await;
    let ended = RefCell::new(Vec::new());
    common::wait_until("the relay closed its connections", BOUND, || {
        let (admin, ended) = (&admin, &ended);
        let ports: Vec<i32> = relay.server_side_ports().into_iter().map(i32::from).collect();
        async move {
            if ports.is_empty() {
                return true;
            }
            let pids = end_sessions(admin, &ports).await.into_iter().map(|(pid, _)| pid);
            ended.borrow_mut().extend(pids);
            false
        }
    })
    .await;
    wait_until_gone(&admin, &ended.into_inner()).await;
}

/// Ends the server sessions listed on `ports` now; their pids and ports.
async fn end_sessions(admin: &tokio_postgres::Client, ports: &[i32]) -> Vec<(i32, i32)> {
    admin
        .query(
            "SELECT pid, client_port, pg_terminate_backend(pid) FROM pg_stat_activity WHERE client_port = ANY($1)",
            &[&ports],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

/// Waits until the server sessions `pids` are no longer in pg_stat_activity.
async fn wait_until_gone(admin: &tokio_postgres::Client, pids: &[i32]) {
    common::wait_until("the sessions are gone", BOUND, || async move {
        let left: i64 = admin
            .query_one("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)", &[&pids])
            .await
            .unwrap()
            .get(0);
        left == 0
    })
    .await;
}

/// The pid of the server session of the client named `name` once `condition` holds for
/// it in pg_stat_activity.
async fn backend_pid(name: &str, condition: &str) -> i32 {
    let admin = admin().await;
    let sql = format!("SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND {condition}");
    let deadline = Instant::now() + BOUND;
    loop {
        if let Some(row) = admin.query_opt(&sql, &[&name]).await.unwrap() {
            return row.get(0);
        }
        assert!(
            Instant::now() < deadline,
            "no server session of {name} where {condition}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// SIGCONT to a stopped backend when dropped, so that a failed test leaves none stopped.
struct Stopped(Pid);

impl Stopped {
    fn stop(pid: i32) -> Stopped {
        let pid = Pid::from_raw(pid);
        kill(pid, Signal::SIGSTOP).unwrap();
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = kill(self.0, Signal::SIGCONT);
    }
}

/// Waits until pgrelay holds no server connection of database `app`: it has dealt with
/// the loss of the last one.
async fn wait_for_no_server(proxy: &Proxy) {
    let database = proxy.running().shared().snapshot().database("app").unwrap();
    common::wait_until("pgrelay let go of the lost server", BOUND, || {
        let size: usize = database
            .all_pools()
            .iter()
            .flat_map(|(_, pools)| pools.hosts.iter().map(|host| host.status().size))
            .sum();
        async move { size == 0 }
    })
    .await;
}

fn transaction_pool(extra: &str) -> String {
    format!("mode = \"transaction\"\nsize = 2\n{extra}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_refused_because_the_server_is_shutting_down() {
    let _servers = SERVERS.write().await;
    let cluster = cluster();
    let config = config_for(cluster, &transaction_pool("query_wait_timeout = \"1s\""));
    let warm = start_proxy(&config).await;
    let mut client = Raw::connect_named(&warm.addr.to_string(), "phase_57p03").await;
    assert_eq!(ask(&mut client, "SELECT 1").await, "T D C:SELECT 1 Z:I");

    // A smart shutdown waits for this session and refuses new logins meanwhile
    // ("the database system is shutting down", 57P03).
    let holder = admin().await;
    let postmaster = Pid::from_raw(i32::try_from(cluster.primary().pid().unwrap()).unwrap());
    kill(postmaster, Signal::SIGTERM).unwrap();
    let url = format!(
        "host=127.0.0.1 port={} user=postgres password=postgres dbname=app",
        cluster.primary().port()
    );
    common::wait_until("new logins are refused", BOUND, || {
        let url = url.clone();
        async move { matches!(common::connect(&url).await, Err(error) if common::sqlstate(&error) == "57P03") }
    })
    .await;
    holder
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'phase_57p03'",
            &[],
        )
        .await
        .unwrap();
    common::wait_until("the pooled session is gone", BOUND, || {
        let holder = &holder;
        async move {
            let left: i64 = holder
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'phase_57p03'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            left == 0
        }
    })
    .await;

    // A logged-in client's query: its server is gone and no new one can be had. The
    // login is tried again until query_wait_timeout, then the statement fails.
    let started = Instant::now();
    client.send(&[query("SELECT 1")]).await;
    let (shape, errors) = answer_within(&mut client, 1, Duration::from_secs(1) + BOUND).await;
    assert_eq!(shape, "E:08006 Z:I");
    assert!(errors[0].contains("shutting down"), "{errors:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );

    // A client logging in to a pool that never had a server: pgrelay needs one to learn
    // the server's settings, and none can be had. The login fails with a FATAL.
    let cold = start_proxy(&config).await;
    let (mut refused, shape, error) = try_login(&cold, "phase_57p03_login").await;
    assert!(shape.ends_with("E:08006"), "{shape}");
    let (severity, message) = error.unwrap();
    assert_eq!(severity, "FATAL");
    assert!(message.contains("shutting down"), "{message}");
    assert_closed(&mut refused).await;

    // The server comes back. (A smart shutdown would also wait for pgrelay's monitor
    // sessions: a fast one ends it.)
    drop(holder);
    blocking(move || {
        cluster.stop(cluster.primary()).unwrap();
        cluster.start(cluster.primary()).unwrap();
    })
    .await;
    assert_eq!(ask(&mut client, "SELECT 1").await, "T D C:SELECT 1 Z:I");
    fresh_client_is_served(&warm).await;
    fresh_client_is_served(&cold).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_cut_or_reset_by_the_server_is_tried_again_then_fails() {
    let _servers = SERVERS.read().await;
    let relay = Relay::start(&cluster().primary().addr()).await;
    let config = through(
        &relay,
        &config_for(cluster(), &transaction_pool("query_wait_timeout = \"1s\"")),
    );
    let proxy = start_proxy(&config).await;

    // The first login of a pool, which needs the server's settings: a FATAL.
    for accept in [Accept::Close, Accept::Reset] {
        relay.set_accept(accept);
        let (mut refused, shape, error) = try_login(&proxy, "phase_cut_login").await;
        assert!(shape.ends_with("E:08006"), "{accept:?}: {shape}");
        assert_eq!(error.unwrap().0, "FATAL");
        assert_closed(&mut refused).await;
    }

    relay.set_accept(Accept::Forward);
    let mut client = Raw::connect_named(&proxy.addr.to_string(), "phase_cut").await;
    assert_eq!(ask(&mut client, "SELECT 1").await, "T D C:SELECT 1 Z:I");
    for accept in [Accept::Close, Accept::Reset] {
        relay.set_accept(accept);
        terminate_relayed(&relay).await;
        // Tried again until query_wait_timeout, then an error; the client stays.
        let started = Instant::now();
        client.send(&[query("SELECT 1")]).await;
        let (shape, _) = answer_within(&mut client, 1, Duration::from_secs(1) + BOUND).await;
        assert_eq!(shape, "E:08006 Z:I", "{accept:?}");
        assert!(
            started.elapsed() >= Duration::from_millis(500),
            "{:?}",
            started.elapsed()
        );
    }
    relay.set_accept(Accept::Forward);
    assert_eq!(ask(&mut client, "SELECT 1").await, "T D C:SELECT 1 Z:I");
    fresh_client_is_served(&proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_the_server_never_answers_ends_within_the_configured_waits() {
    let _servers = SERVERS.read().await;
    // With server_connect_timeout, each login attempt ends at it and is tried again
    // until query_wait_timeout; without it, query_wait_timeout alone bounds the wait.
    for (connect_timeout, wait, bound, named) in [
        ("500ms", "2s", Duration::from_millis(2500), "server_connect_timeout"),
        ("0", "1s", Duration::from_secs(1), "query_wait_timeout"),
    ] {
        let relay = Relay::start(&cluster().primary().addr()).await;
        let config = through(
            &relay,
            &config_for(
                cluster(),
                &transaction_pool(&format!(
                    "server_connect_timeout = \"{connect_timeout}\"\nquery_wait_timeout = \"{wait}\""
                )),
            ),
        );
        let proxy = start_proxy(&config).await;
        let mut client = Raw::connect_named(&proxy.addr.to_string(), "phase_silent").await;
        assert_eq!(ask(&mut client, "SELECT 1").await, "T D C:SELECT 1 Z:I");
        relay.set_accept(Accept::Silent);
        terminate_relayed(&relay).await;
        let started = Instant::now();
        client.send(&[query("SELECT 1")]).await;
        let (shape, errors) = answer_within(&mut client, 1, bound + BOUND).await;
        assert_eq!(
            shape, "E:08006 Z:I",
            "server_connect_timeout = {connect_timeout}: {errors:?}"
        );
        assert!(errors[0].contains(named), "{errors:?}");
        assert!(
            started.elapsed() < bound + Duration::from_secs(1),
            "server_connect_timeout = {connect_timeout}: {:?}",
            started.elapsed()
        );
        relay.set_accept(Accept::Forward);
        relay.close_silent();
        assert_eq!(ask(&mut client, "SELECT 1").await, "T D C:SELECT 1 Z:I");
        fresh_client_is_served(&proxy).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkout_while_the_primary_restarts_or_is_killed() {
    let _servers = SERVERS.write().await;
    let cluster = cluster();
    let patient = start_proxy(&config_for(cluster, &transaction_pool("query_wait_timeout = \"20s\""))).await;
    let hasty = start_proxy(&config_for(cluster, &transaction_pool("query_wait_timeout = \"1s\""))).await;
    let mut waits = Raw::connect_named(&patient.addr.to_string(), "phase_restart").await;
    let mut gives_up = Raw::connect_named(&hasty.addr.to_string(), "phase_restart_hasty").await;
    for raw in [&mut waits, &mut gives_up] {
        assert_eq!(ask(raw, "SELECT 1").await, "T D C:SELECT 1 Z:I");
    }

    for (round, crash) in [(1, false), (2, true)] {
        if crash {
            // SIGKILL: the backends go without a word once they notice.
            blocking(move || cluster.kill(cluster.primary()).unwrap()).await;
        } else {
            blocking(move || cluster.stop(cluster.primary()).unwrap()).await;
        }
        // Writes, sent while the server is down: nothing reached a server, so waiting
        // for one is safe.
        waits
            .send(&[query(&format!(
                "INSERT INTO items (owner, value) VALUES ('phase_restart', {round})"
            ))])
            .await;
        gives_up
            .send(&[query("INSERT INTO items (owner) VALUES ('phase_restart_hasty')")])
            .await;
        let started = Instant::now();
        let (shape, _) = answer_within(&mut gives_up, 1, Duration::from_secs(1) + BOUND).await;
        assert_eq!(shape, "E:08006 Z:I", "round {round}");
        assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());

        blocking(move || cluster.start(cluster.primary()).unwrap()).await;
        let back = Instant::now();
        let (shape, _) = answer_within(&mut waits, 1, BOUND).await;
        assert_eq!(shape, "C:INSERT 0 1 Z:I", "round {round}");
        let after = back.elapsed();
        println!("round {round}: the waiting INSERT was answered {after:?} after the server accepted again");
        assert!(after < Duration::from_secs(2), "round {round}: {after:?}");
        assert_eq!(ask(&mut gives_up, "SELECT 1").await, "T D C:SELECT 1 Z:I");
    }
    assert_eq!(
        value(&mut waits, "SELECT count(*) FROM items WHERE owner = 'phase_restart'").await,
        "2"
    );
    assert_eq!(
        value(
            &mut waits,
            "SELECT count(*) FROM items WHERE owner = 'phase_restart_hasty'"
        )
        .await,
        "0"
    );
    fresh_client_is_served(&patient).await;
    fresh_client_is_served(&hasty).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_lost_while_pgrelay_replays_the_clients_settings() {
    let _servers = SERVERS.read().await;
    let mut relay = Relay::start(&cluster().primary().addr()).await;
    let config = through(
        &relay,
        &config_for(cluster(), &transaction_pool("query_wait_timeout = \"5s\"")),
    );
    let proxy = start_proxy(&config).await;
    let mut client = Raw::connect_named(&proxy.addr.to_string(), "phase_settings").await;
    assert_eq!(ask(&mut client, "SET statement_timeout = '42s'").await, "C:SET Z:I");

    // The client's next server is a new one, on which pgrelay first applies the setting;
    // the server is lost with that outstanding. A write fails with the server's reason.
    relay.hold_on(b"\"statement_timeout\" TO");
    terminate_relayed(&relay).await;
    client
        .send(&[query("INSERT INTO items (owner) VALUES ('phase_settings')")])
        .await;
    let held = relay.held(BOUND).await;
    terminate_ports(&[held.server_side_port]).await;
    held.release();
    assert_eq!(answer(&mut client).await, "E:57P01 Z:I");
    assert_eq!(
        value(&mut client, "SELECT count(*) FROM items WHERE owner = 'phase_settings'").await,
        "0"
    );

    // A read in the same place runs again on another new server, settings and all.
    relay.hold_on(b"\"statement_timeout\" TO");
    terminate_relayed(&relay).await;
    client.send(&[query("SHOW statement_timeout")]).await;
    let held = relay.held(BOUND).await;
    terminate_ports(&[held.server_side_port]).await;
    held.release();
    let (tag, body) = tokio::time::timeout(BOUND, client.next_message()).await.unwrap();
    assert_eq!(tag, b'T');
    let (tag, body2) = tokio::time::timeout(BOUND, client.next_message()).await.unwrap();
    assert_eq!((tag, &body2[6..]), (b'D', &b"42s"[..]), "{body:?}");
    assert_eq!(answer(&mut client).await, "C:SHOW Z:I");
    fresh_client_is_served(&proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_lost_or_stopped_during_the_reset_on_release() {
    let _servers = SERVERS.read().await;
    let mut relay = Relay::start(&cluster().primary().addr()).await;
    let config = through(
        &relay,
        &config_for(cluster(), "mode = \"session\"\nsize = 1\nquery_wait_timeout = \"15s\""),
    );
    let proxy = start_proxy(&config).await;
    let addr = proxy.addr.to_string();
    // All clients with one application_name: once its value is known, a login needs no
    // server (and does not queue for the pool's only place).
    let name = "phase_reset";

    // The server is lost while pgrelay resets it for the next client.
    let mut leaver = Raw::connect_named(&addr, name).await;
    assert_eq!(ask(&mut leaver, "SET work_mem = '1MB'").await, "C:SET Z:I");
    relay.hold_on(b"DISCARD ALL");
    leaver.send(&[message(b'X', b"")]).await;
    drop(leaver);
    let held = relay.held(BOUND).await;
    terminate_ports(&[held.server_side_port]).await;
    held.release();
    // The next client gets a new server, without the setting of the one before.
    let mut next = Raw::connect_named(&addr, name).await;
    assert_eq!(value(&mut next, "SHOW work_mem").await, "4MB");
    drop(next);

    // The server's backend is stopped when its client leaves: the reset gets no answer,
    // the connection is given up after its cleanup time (5 s), and the next client gets
    // the pool's only place.
    let mut leaver = Raw::connect_named(&addr, name).await;
    let pid: i32 = value(&mut leaver, "SELECT pg_backend_pid()").await.parse().unwrap();
    let stopped = Stopped::stop(pid);
    leaver.send(&[message(b'X', b"")]).await;
    drop(leaver);
    let mut next = Raw::connect_named(&addr, name).await;
    let started = Instant::now();
    next.send(&[query("SELECT 1")]).await;
    let (shape, _) = answer_within(&mut next, 1, Duration::from_secs(5) + BOUND).await;
    assert_eq!(shape, "T D C:SELECT 1 Z:I");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(4) && waited < Duration::from_secs(8),
        "{waited:?}"
    );
    drop(stopped);
    drop(next);
    fresh_client_is_served(&proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_lost_while_pgrelay_asks_for_the_commit_position() {
    let _servers = SERVERS.read().await;
    let mut relay = Relay::start(&cluster().primary().addr()).await;
    let config = through(
        &relay,
        &config_with_replica(
            cluster(),
            &transaction_pool("query_wait_timeout = \"5s\""),
            "consistency = \"session\"",
        ),
    );
    let proxy = start_proxy(&config).await;
    let mut client = Raw::connect_named(&proxy.addr.to_string(), "phase_fence").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while value(&mut client, "SELECT pg_is_in_recovery()").await != "t" {
        assert!(Instant::now() < deadline, "reads never went to the replica");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // After a write commits, pgrelay asks the primary for its WAL position before it
    // lets the client go on; the server is lost with that question outstanding.
    relay.hold_on(b"pg_catalog.pg_current_wal_insert_lsn");
    client
        .send(&[query("INSERT INTO items (owner) VALUES ('phase_fence')")])
        .await;
    let held = relay.held(BOUND).await;
    assert_eq!(show(&[client.next_reply().await]), "C:INSERT 0 1");
    terminate_ports(&[held.server_side_port]).await;
    held.release();
    // The commit stands: its ReadyForQuery, no error.
    assert_eq!(answer(&mut client).await, "Z:I");
    // The position is unknown, so the client's reads stay on the primary, where its
    // write is.
    assert_eq!(value(&mut client, "SELECT pg_is_in_recovery()").await, "f");
    assert_eq!(
        value(&mut client, "SELECT count(*) FROM items WHERE owner = 'phase_fence'").await,
        "1"
    );
    fresh_client_is_served(&proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_lost_while_pgrelay_settles_the_syncs_of_a_failed_copy() {
    let _servers = SERVERS.read().await;
    let mut relay = Relay::start(&cluster().primary().addr()).await;
    let config = through(
        &relay,
        &config_for(cluster(), &transaction_pool("query_wait_timeout = \"5s\"")),
    );
    let proxy = start_proxy(&config).await;
    let mut client = Raw::connect_named(&proxy.addr.to_string(), "phase_barrier").await;
    // COPY FROM STDIN in the extended protocol as libpq sends it: a Sync right after the
    // Execute (read in COPY mode, so ignored, unless the COPY fails before), then the
    // data, CopyDone and another Sync. The data is bad: after the error pgrelay cannot
    // tell whether the first Sync will be answered, and sends an empty query to find
    // out. The server is lost with that query outstanding.
    client
        .send(&[
            parse("", "COPY items (value) FROM STDIN"),
            bind("", &[]),
            execute(),
            sync(),
        ])
        .await;
    assert_eq!(
        show(&tokio::time::timeout(BOUND, client.replies_until('G')).await.unwrap()),
        "1 2 G"
    );
    relay.hold_on(b"Q\0\0\0\x05\0");
    client.send(&[copy_data("not a number\n"), copy_done(), sync()]).await;
    assert_eq!(answer(&mut client).await, "E:22P02 Z:I");
    let held = relay.held(BOUND).await;
    terminate_ports(&[held.server_side_port]).await;
    held.release();
    // Had the COPY failed before the server read the first Sync, the server answered it,
    // and the client, which sent two, waits for one more ReadyForQuery; had it failed on
    // the data (as here), the client waits for nothing. One answer too many would be
    // taken for the answer to the client's next statement, one too few leaves it waiting
    // for ever: the session ends, with the server's reason.
    let (shape, error) = next(&mut client, BOUND).await;
    assert_eq!(shape, "E:57P01");
    assert_eq!(error.unwrap().0, "FATAL");
    assert_closed(&mut client).await;
    fresh_client_is_served(&proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_from_stdin_in_the_extended_protocol_lost_mid_stream() {
    let _servers = SERVERS.read().await;
    let proxy = start_proxy(&config_for(cluster(), &transaction_pool(""))).await;
    let mut client = Raw::connect_named(&proxy.addr.to_string(), "phase_copy_in").await;
    // As libpq sends it: the Sync after the Execute is read in COPY mode and ignored;
    // the client's CopyDone is followed by another Sync, the one that is answered.
    client
        .send(&[
            parse("", "COPY items (owner) FROM STDIN"),
            bind("", &[]),
            execute(),
            sync(),
        ])
        .await;
    assert_eq!(
        show(&tokio::time::timeout(BOUND, client.replies_until('G')).await.unwrap()),
        "1 2 G"
    );
    client.send(&[copy_data("phase_copy_in\n")]).await;
    let pid = backend_pid("phase_copy_in", "wait_event = 'ClientRead'").await;
    admin()
        .await
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    wait_for_no_server(&proxy).await;
    client.send(&[copy_data("phase_copy_in\n"), copy_done(), sync()]).await;
    // As from a server whose COPY failed: the error, and the answer to that Sync.
    assert_eq!(answer(&mut client).await, "E:57P01 Z:I");
    client.send(&[query("SELECT 1")]).await;
    assert_eq!(answer(&mut client).await, "T D C:SELECT 1 Z:I");
    client.assert_quiet(Duration::from_millis(300)).await;
    assert_eq!(
        value(&mut client, "SELECT count(*) FROM items WHERE owner = 'phase_copy_in'").await,
        "0"
    );
    fresh_client_is_served(&proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_only_batch_gets_its_error_when_the_server_is_killed() {
    let _servers = SERVERS.write().await;
    let cluster = cluster();
    let proxy = start_proxy(&config_for(cluster, &transaction_pool("query_wait_timeout = \"20s\""))).await;
    let mut client = Raw::connect_named(&proxy.addr.to_string(), "phase_flush").await;
    // No Sync: the client waits for the replies its Flush asks for.
    client
        .send(&[
            parse("", "SELECT pg_sleep(30)"),
            bind("", &[]),
            message(b'D', b"P\0"),
            execute(),
            flush(),
        ])
        .await;
    backend_pid("phase_flush", "wait_event = 'PgSleep'").await;
    blocking(move || cluster.kill(cluster.primary()).unwrap()).await;
    assert_eq!(until_error(&mut client).await, "E:08006");
    client.send(&[sync()]).await;
    assert_eq!(answer(&mut client).await, "Z:I");
    blocking(move || cluster.start(cluster.primary()).unwrap()).await;
    assert_eq!(ask(&mut client, "SELECT 1").await, "T D C:SELECT 1 Z:I");
    fresh_client_is_served(&proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_to_stdout_lost_mid_stream_ends_with_the_rows_sent_an_error_and_ready() {
    let _servers = SERVERS.read().await;
    let proxy = start_proxy(&config_for(cluster(), &transaction_pool(""))).await;
    let mut client = Raw::connect_named(&proxy.addr.to_string(), "phase_copy_out").await;
    // 300 rows, then a pause in which the server is lost.
    client
        .send(&[query(
            "COPY (SELECT CASE WHEN i = 301 THEN pg_sleep(30)::text ELSE repeat('x', 100) END \
             FROM generate_series(1, 600) i) TO STDOUT",
        )])
        .await;
    assert_eq!(show(&[client.next_reply().await]), "H");
    let pid = backend_pid("phase_copy_out", "wait_event = 'PgSleep'").await;
    admin()
        .await
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    let expected = format!("{}E:57P01 Z:I", "d ".repeat(300));
    assert_eq!(answer(&mut client).await, expected);
    assert_eq!(ask(&mut client, "SELECT 1").await, "T D C:SELECT 1 Z:I");
    fresh_client_is_served(&proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_to_stdout_lost_inside_a_large_row_closes_the_client() {
    let _servers = SERVERS.read().await;
    let proxy = start_proxy(&config_for(cluster(), &transaction_pool(""))).await;
    let mut client = Raw::connect_named(&proxy.addr.to_string(), "phase_copy_out_large").await;
    // One row of 64 MiB that the client does not read: the server blocks writing it, in
    // the middle of the message, and is terminated there. It cannot say why (its FATAL
    // would land inside the row), and neither can pgrelay: the client's connection is
    // closed once it has what was sent.
    client
        .send(&[query("COPY (SELECT repeat('x', 64 * 1024 * 1024)) TO STDOUT")])
        .await;
    let pid = backend_pid("phase_copy_out_large", "wait_event = 'ClientWrite'").await;
    admin()
        .await
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    let mut received = Vec::new();
    let mut chunk = vec![0u8; 1 << 20];
    loop {
        let read = tokio::time::timeout(BOUND, client.stream.read(&mut chunk))
            .await
            .expect("bytes or the close within the bound");
        match read {
            Ok(0) | Err(_) => break,
            Ok(n) => received.extend_from_slice(&chunk[..n]),
        }
    }
    let copy_out = u32::from_be_bytes([received[1], received[2], received[3], received[4]]) as usize + 1;
    assert_eq!(received[0], b'H');
    assert_eq!(received[copy_out], b'd');
    let row = &received[copy_out..];
    let row_len = u32::from_be_bytes([row[1], row[2], row[3], row[4]]) as usize + 1;
    assert_eq!(row_len, 1 + 4 + 64 * 1024 * 1024 + 1);
    assert!(row.len() < row_len, "the whole row arrived: {} bytes", row.len());
    fresh_client_is_served(&proxy).await;
}
