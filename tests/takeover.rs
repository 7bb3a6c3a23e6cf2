//! Socket takeover end to end, with real processes: a new pgrelay takes the listening
//! sockets over from a running one (`run --takeover`), the old one finishes its
//! transactions and exits 0, and no connection attempt is refused on the way; idle clients
//! move with their session (TLS 1.3 and TLS 1.2 ones with their traffic keys; a pinned one
//! with its server connection: tests/takeover_session.rs), and fan-out listeners with every
//! notification exactly once and in order.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is a failed test

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::process::{Process, free_port};
use common::{first_value, shared_cluster, sqlstate, wait_until};
use tokio_postgres::NoTls;

fn url(port: u16) -> String {
    format!("host=127.0.0.1 port={port} user=app password=app dbname=app connect_timeout=5")
}

/// The transaction-mode config of these tests: pool size 4, listening on `port`, taken
/// over through `socket`, 20 s to drain.
fn takeover_config(cluster: &pgrelay::localpg::LocalCluster, port: u16, socket: &Path) -> String {
    common::config_for(cluster, "mode = \"transaction\"\nsize = 4").replacen(
        "listen = \"LISTEN\"",
        &format!(
            "listen = \"127.0.0.1:{port}\"\nshutdown_timeout = \"20s\"\ntakeover_socket = \"{}\"",
            socket.display()
        ),
        1,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_process_takes_the_sockets_over_and_the_old_one_drains_and_exits_0() {
    let cluster = shared_cluster();
    let dir = tempfile::tempdir().unwrap();
    let (port, metrics_port, peer_port) = (free_port(), free_port(), free_port());
    let socket = dir.path().join("takeover.sock");
    let config = common::config_for(cluster, "mode = \"transaction\"\nsize = 8")
        .replacen(
            "listen = \"LISTEN\"",
            &format!(
                "listen = \"127.0.0.1:{port}\"\nshutdown_timeout = \"20s\"\ntakeover_socket = \"{}\"\n\
             peer_listen = \"127.0.0.1:{peer_port}\"",
                socket.display()
            ),
            1,
        )
        .replacen(
            "metrics_listen = \"\"",
            &format!("metrics_listen = \"127.0.0.1:{metrics_port}\""),
            1,
        );
    let config_path = dir.path().join("pgrelay.toml");
    std::fs::write(&config_path, &config).unwrap();

    let old = Process::start(&config_path, None, dir.path().join("old.log"));
    wait_until("the old process accepts", Duration::from_secs(20), || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
    })
    .await;
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the takeover socket is for its owner only");

    // A second process on the same takeover socket, not taking over, is refused: it would
    // share the port with the first.
    let second = Process::start(&config_path, None, dir.path().join("second.log"));
    let (status, log) = second.wait(Duration::from_secs(20)).await;
    assert!(!status.success(), "{log}");
    assert!(log.contains("is in use"), "{log}");

    // On the old process: an idle client with a setting and a prepared statement, a client
    // in a transaction, and one running a long statement.
    let idle = common::connect(&url(port)).await.unwrap();
    idle.batch_execute("SET statement_timeout = '123s'").await.unwrap();
    let statement = idle.prepare("SELECT $1::int + 1").await.unwrap();
    let busy = common::connect(&url(port)).await.unwrap();
    busy.batch_execute("BEGIN").await.unwrap();
    // Pinned to its server by a temporary table: it moves with that server connection.
    let pinned = common::connect(&url(port)).await.unwrap();
    pinned
        .batch_execute("CREATE TEMP TABLE t_pinned (x int); INSERT INTO t_pinned VALUES (7)")
        .await
        .unwrap();
    // A fan-out listener: it moves with its channels (see the test below for its
    // notifications).
    let listener = common::connect(&url(port)).await.unwrap();
    listener.batch_execute("LISTEN takeover_channel").await.unwrap();
    let txid = first_value(&busy.simple_query("SELECT txid_current()").await.unwrap());
    let sleeper = Arc::new(common::connect(&url(port)).await.unwrap());
    let sleeping = {
        let sleeper = sleeper.clone();
        tokio::spawn(async move { sleeper.simple_query("SELECT pg_sleep(30)").await })
    };

    // New logins all along, one after the other: none may fail across the takeover, also
    // not one that logged in to the old process just before and is handed over.
    let stop = Arc::new(AtomicBool::new(false));
    let logins = Arc::new(AtomicUsize::new(0));
    let storm = {
        let (stop, logins) = (stop.clone(), logins.clone());
        tokio::spawn(async move {
            let (mut refused, mut closed) = (Vec::new(), 0);
            while !stop.load(Ordering::Acquire) {
                match common::connect(&url(port)).await {
                    Ok(client) => match client.simple_query("SELECT 1").await {
                        Ok(_) => {
                            logins.fetch_add(1, Ordering::AcqRel);
                        }
                        Err(_) => closed += 1,
                    },
                    Err(error) => refused.push(error.to_string()),
                }
            }
            (refused, closed)
        })
    };
    wait_until("logins before the takeover", Duration::from_secs(10), || async {
        logins.load(Ordering::Acquire) >= 20
    })
    .await;

    let new = Process::start(&config_path, Some(&socket), dir.path().join("new.log"));
    wait_until(
        "the new process took the sockets over",
        Duration::from_secs(20),
        || async { new.log().contains("took the listening sockets over") },
    )
    .await;
    let at_takeover = logins.load(Ordering::Acquire);
    wait_until("logins after the takeover", Duration::from_secs(10), || async {
        logins.load(Ordering::Acquire) >= at_takeover + 20
    })
    .await;
    assert!(old.log().contains("handed the listening sockets over"), "{}", old.log());

    // The cancel reaches the new process (the port is its now) and is carried to the old
    // one, whose client it is.
    sleeper.cancel_token().cancel_query(NoTls).await.unwrap();
    let cancelled = tokio::time::timeout(Duration::from_secs(5), sleeping)
        .await
        .expect("the cancel landed within 5 s")
        .unwrap();
    assert_eq!(sqlstate(&cancelled.unwrap_err()), "57014");

    // The transaction that was open during the takeover goes on and commits.
    let rows = busy.simple_query("SELECT txid_current()").await.unwrap();
    assert_eq!(first_value(&rows), txid, "still the same transaction");
    busy.batch_execute("COMMIT").await.unwrap();

    // Its clients handed over, the old process exits 0, well before shutdown_timeout.
    let (status, log) = old.wait(Duration::from_secs(15)).await;
    assert!(status.success(), "the old process exited with {status}:\n{log}");
    assert!(log.contains("client handed over to the new process"), "{log}");

    // Every client goes on, on the new process (the old one is gone): the idle one with
    // its setting, its prepared statement and its cancel key.
    let rows = idle.simple_query("SHOW statement_timeout").await.unwrap();
    assert_eq!(first_value(&rows), "123s");
    let row = idle.query_one(&statement, &[&41i32]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
    let idle = Arc::new(idle);
    let sleeping = {
        let idle = idle.clone();
        tokio::spawn(async move { idle.simple_query("SELECT pg_sleep(30)").await })
    };
    wait_until("the statement runs", Duration::from_secs(10), || async {
        let direct = common::direct(&cluster.primary().addr(), "app").await;
        let rows = direct
            .simple_query("SELECT 1 FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' AND state = 'active'")
            .await
            .unwrap();
        rows.iter()
            .any(|row| matches!(row, tokio_postgres::SimpleQueryMessage::Row(_)))
    })
    .await;
    idle.cancel_token().cancel_query(NoTls).await.unwrap();
    let cancelled = tokio::time::timeout(Duration::from_secs(5), sleeping)
        .await
        .expect("the cancel landed within 5 s")
        .unwrap();
    assert_eq!(sqlstate(&cancelled.unwrap_err()), "57014");
    for client in [&busy, &*sleeper] {
        let rows = client.simple_query("SELECT 1").await.unwrap();
        assert_eq!(first_value(&rows), "1");
    }
    assert!(
        new.log().contains("client taken over from the old process"),
        "{}",
        new.log()
    );
    // Moved with its server connection, table and all.
    let rows = pinned.simple_query("SELECT x FROM t_pinned").await.unwrap();
    assert_eq!(first_value(&rows), "7");
    let rows = listener.simple_query("SELECT 1").await.unwrap();
    assert_eq!(first_value(&rows), "1");

    stop.store(true, Ordering::Release);
    let (refused, closed) = storm.await.unwrap();
    assert!(refused.is_empty(), "failed logins across the takeover: {refused:?}");
    assert_eq!(closed, 0, "logins closed across the takeover");

    // The old process is gone: the metrics endpoint and peer_listen answer, so the new
    // process has them (it could not have bound them while the old one held them).
    let health = http_get(metrics_port, "/healthz").await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    tokio::net::TcpStream::connect(("127.0.0.1", peer_port)).await.unwrap();
    assert!(new.log().contains("pgrelay is accepting clients"), "{}", new.log());

    // The new process serves, and now owns the takeover socket.
    let client = common::connect(&url(port)).await.unwrap();
    let rows = client.simple_query("SELECT 41 + 1").await.unwrap();
    assert_eq!(first_value(&rows), "42");
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // A process speaking another version of the exchange is refused with a reason, and
    // nothing changes for the running one.
    let answer = tokio::task::spawn_blocking({
        let socket = socket.clone();
        move || {
            let mut stream = std::os::unix::net::UnixStream::connect(&socket).unwrap();
            stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            stream.write_all(b"HELLO pgrelay-takeover/0 9.9.9\n").unwrap();
            let mut line = String::new();
            BufReader::new(stream).read_line(&mut line).unwrap();
            line
        }
    })
    .await
    .unwrap();
    assert!(answer.starts_with("REFUSED "), "{answer:?}");
    let rows = client.simple_query("SELECT 1").await.unwrap();
    assert_eq!(first_value(&rows), "1");
    drop(client);

    // And once more: a client handed over already moves again, with all it had.
    let third = Process::start(&config_path, Some(&socket), dir.path().join("third.log"));
    let (status, log) = new.wait(Duration::from_secs(15)).await;
    assert!(status.success(), "the second process exited with {status}:\n{log}");
    let rows = idle.simple_query("SHOW statement_timeout").await.unwrap();
    assert_eq!(first_value(&rows), "123s");
    let row = idle.query_one(&statement, &[&1i32]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 2);
    assert!(
        third.log().contains("client taken over from the old process"),
        "{}",
        third.log()
    );

    third.signal(nix::sys::signal::Signal::SIGTERM);
    let (status, log) = third.wait(Duration::from_secs(25)).await;
    assert!(status.success(), "{log}");
    assert!(!socket.exists(), "the takeover socket is removed at exit");
}

async fn http_get(port: u16, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response))
        .await
        .unwrap()
        .unwrap();
    response
}

/// A CA and a certificate for localhost signed by it, in `dir`: (ca, cert, key).
fn certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "takeover test CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, "localhost");
    let cert = params.signed_by(&key, &issuer).unwrap();
    let paths = (dir.join("root.crt"), dir.join("server.crt"), dir.join("server.key"));
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

/// A tokio-postgres client over rustls with only `versions` offered, and its connection
/// task.
async fn tls_client(
    port: u16,
    ca: &Path,
    versions: &[&'static tokio_rustls::rustls::SupportedProtocolVersion],
) -> tokio_postgres::Client {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    use tokio_rustls::rustls::{ClientConfig, RootCertStore, crypto::ring};

    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let tls_config = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let (client, connection) = tokio_postgres::connect(
        &format!(
            "host=localhost hostaddr=127.0.0.1 port={port} user=app password=app dbname=app sslmode=require connect_timeout=5"
        ),
        tokio_postgres_rustls::MakeRustlsConnect::new(tls_config),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    client
}

/// What a TLS client handed over must still do: its setting, a large result (many records
/// towards it), a large parameter echoed (many records each way).
async fn check_moved_tls_client(client: &tokio_postgres::Client, name: &str) {
    let rows = client.simple_query("SHOW application_name").await.unwrap();
    assert_eq!(first_value(&rows), name);
    let rows = client
        .query("SELECT g, repeat('x', 20) FROM generate_series(1, 100000) g", &[])
        .await
        .unwrap();
    assert_eq!(rows.len(), 100_000);
    assert_eq!(rows[99_999].get::<_, i32>(0), 100_000);
    let large: String = (0..1_000_000).map(|at| char::from(b'a' + (at % 26) as u8)).collect();
    let row = client
        .query_one("SELECT $1::text, length($1::text)", &[&large])
        .await
        .unwrap();
    assert!(row.get::<_, String>(0) == large, "the large value came back changed");
    assert_eq!(row.get::<_, i32>(1), 1_000_000);
}

/// An interactive psql (libpq over OpenSSL) kept open across takeovers: commands go to
/// its standard input, and each answer is read up to a marker echoed after it.
struct Psql {
    child: Child,
    input: std::process::ChildStdin,
    lines: std::sync::mpsc::Receiver<String>,
    asked: usize,
}

impl Psql {
    fn start(conninfo: &str, home: &Path) -> Psql {
        let program = shared_cluster().bin_path("psql").unwrap();
        let mut command = Command::new(program);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PG") {
                command.env_remove(key);
            }
        }
        // libpq looks for ~/.postgresql/root.crt: none there.
        let mut child = command
            .args([conninfo, "-X", "-w", "-A", "-t", "-q"])
            .env("HOME", home)
            .env("PGPASSWORD", "app")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let input = child.stdin.take().unwrap();
        let output = child.stdout.take().unwrap();
        let (send, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(output).lines() {
                let Ok(line) = line else { return };
                if send.send(line).is_err() {
                    return;
                }
            }
        });
        Psql {
            child,
            input,
            lines,
            asked: 0,
        }
    }

    /// Runs `command` and returns the lines it printed.
    async fn ask(&mut self, command: &str) -> Vec<String> {
        self.asked += 1;
        let marker = format!("done {}", self.asked);
        write!(self.input, "{command}\n\\echo {marker}\n").unwrap();
        self.input.flush().unwrap();
        let mut answer = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = tokio::task::block_in_place(|| self.lines.recv_timeout(left))
                .unwrap_or_else(|_| panic!("psql did not answer {command:.60}: {answer:?}"));
            if line == marker {
                return answer;
            }
            answer.push(line);
        }
    }
}

impl Drop for Psql {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a psql handed over must still do: its setting, a 1 MB statement and a 1 MB result.
async fn check_moved_psql(psql: &mut Psql, name: &str) {
    assert_eq!(psql.ask("SHOW application_name;").await, [name]);
    let literal = "q".repeat(1_000_000);
    assert_eq!(psql.ask(&format!("SELECT length('{literal}');")).await, ["1000000"]);
    let answer = psql.ask("SELECT repeat('r', 1000000);").await;
    assert!(
        answer.len() == 1 && answer[0] == "r".repeat(1_000_000),
        "the large value came back changed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_tls_1_3_and_tls_1_2_clients_move_twice() {
    use tokio_rustls::rustls::version::{TLS12, TLS13};

    let cluster = shared_cluster();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let socket = dir.path().join("takeover.sock");
    let (ca, cert, key) = certificates(dir.path());
    let config = common::config_for(cluster, "mode = \"transaction\"\nsize = 4").replacen(
        "listen = \"LISTEN\"",
        &format!(
            "listen = \"127.0.0.1:{port}\"\nshutdown_timeout = \"20s\"\ntakeover_socket = \"{}\"",
            socket.display()
        ),
        1,
    ) + &format!(
        "\n[server.tls]\ncert = \"{}\"\nkey = \"{}\"\nmode = \"allow\"\n",
        cert.display(),
        key.display()
    );
    let config_path = dir.path().join("pgrelay.toml");
    std::fs::write(&config_path, &config).unwrap();
    let first = Process::start(&config_path, None, dir.path().join("first.log"));
    wait_until("the first process accepts", Duration::from_secs(20), || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
    })
    .await;

    let tls13 = tls_client(port, &ca, &[&TLS13]).await;
    tls13
        .batch_execute("SET application_name = 'moved over TLS'")
        .await
        .unwrap();
    let tls12 = tls_client(port, &ca, &[&TLS12]).await;
    tls12
        .batch_execute("SET application_name = 'moved over TLS 1.2'")
        .await
        .unwrap();
    let plain = common::connect(&url(port)).await.unwrap();
    plain.batch_execute("SET statement_timeout = '77s'").await.unwrap();
    let mut psql = Psql::start(
        &format!("host=localhost hostaddr=127.0.0.1 port={port} user=app dbname=app sslmode=require"),
        dir.path(),
    );
    let conninfo = psql.ask("\\conninfo").await.join(" ");
    assert!(conninfo.contains("TLSv1.3"), "{conninfo}");
    psql.ask("SET application_name = 'psql moved over TLS';").await;
    // libpq (OpenSSL) held to TLS 1.2.
    let mut psql12 = Psql::start(
        &format!(
            "host=localhost hostaddr=127.0.0.1 port={port} user=app dbname=app sslmode=require ssl_max_protocol_version=TLSv1.2"
        ),
        dir.path(),
    );
    let conninfo = psql12.ask("\\conninfo").await.join(" ");
    assert!(conninfo.contains("TLSv1.2"), "{conninfo}");
    psql12.ask("SET application_name = 'psql moved over TLS 1.2';").await;

    let second = Process::start(&config_path, Some(&socket), dir.path().join("second.log"));
    let (status, log) = first.wait(Duration::from_secs(15)).await;
    assert!(status.success(), "the first process exited with {status}:\n{log}");
    assert_eq!(log.matches("client handed over to the new process").count(), 5, "{log}");

    let rows = plain.simple_query("SHOW statement_timeout").await.unwrap();
    assert_eq!(first_value(&rows), "77s");
    // The TLS ones go on, on the same connections, with their settings.
    check_moved_tls_client(&tls13, "moved over TLS").await;
    check_moved_tls_client(&tls12, "moved over TLS 1.2").await;
    check_moved_psql(&mut psql, "psql moved over TLS").await;
    check_moved_psql(&mut psql12, "psql moved over TLS 1.2").await;
    assert_eq!(
        second.log().matches("client taken over from the old process").count(),
        5,
        "{}",
        second.log()
    );

    // And once more, from the process that continued it.
    let third = Process::start(&config_path, Some(&socket), dir.path().join("third.log"));
    let (status, log) = second.wait(Duration::from_secs(15)).await;
    assert!(status.success(), "the second process exited with {status}:\n{log}");
    assert_eq!(log.matches("client handed over to the new process").count(), 5, "{log}");
    check_moved_tls_client(&tls13, "moved over TLS").await;
    check_moved_tls_client(&tls12, "moved over TLS 1.2").await;
    check_moved_psql(&mut psql, "psql moved over TLS").await;
    check_moved_psql(&mut psql12, "psql moved over TLS 1.2").await;
    let rows = plain.simple_query("SHOW statement_timeout").await.unwrap();
    assert_eq!(first_value(&rows), "77s");
    assert!(!tls13.is_closed() && !tls12.is_closed());
    assert_eq!(
        third.log().matches("client taken over from the old process").count(),
        5,
        "{}",
        third.log()
    );

    third.signal(nix::sys::signal::Signal::SIGTERM);
    let (status, log) = third.wait(Duration::from_secs(25)).await;
    assert!(status.success(), "{log}");
    assert!(tls13.simple_query("SELECT 1").await.is_err(), "closed at the shutdown");
    assert!(tls12.simple_query("SELECT 1").await.is_err(), "closed at the shutdown");
}

/// The value of `family{labels}` in a /metrics body.
fn metric(body: &str, family: &str, labels: &str) -> Option<f64> {
    let prefix = format!("{family}{{{labels}}} ");
    body.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|value| value.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_user_found_through_auth_query_moves_and_its_new_server_logins_pass_through() {
    const ROLE: (&str, &str) = ("tk_aq_user", "tk aq secret");
    let cluster = shared_cluster();
    let direct = common::direct(&cluster.primary().addr(), "postgres").await;
    direct
        .batch_execute(&format!(
            "CREATE ROLE {} LOGIN PASSWORD '{}'; GRANT CONNECT ON DATABASE app TO {0}",
            ROLE.0, ROLE.1
        ))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let socket = dir.path().join("takeover.sock");
    // Not in [[users]]: its password is looked up as the superuser (the default query).
    let config = common::config_for(cluster, "mode = \"transaction\"\nsize = 4")
        .replacen(
            "listen = \"LISTEN\"",
            &format!(
                "listen = \"127.0.0.1:{port}\"\nshutdown_timeout = \"20s\"\ntakeover_socket = \"{}\"",
                socket.display()
            ),
            1,
        )
        .replacen("[databases.app]\n", "[databases.app]\nauth_user = \"postgres\"\n", 1)
        + "\n[[users]]\nname = \"postgres\"\npassword = \"postgres\"\n";
    let config_path = dir.path().join("pgrelay.toml");
    std::fs::write(&config_path, &config).unwrap();
    let old = Process::start(&config_path, None, dir.path().join("old.log"));
    wait_until("the old process accepts", Duration::from_secs(20), || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
    })
    .await;

    let client = common::connect(&format!(
        "host=127.0.0.1 port={port} user={} password='{}' dbname=app connect_timeout=5",
        ROLE.0, ROLE.1
    ))
    .await
    .unwrap();
    client.batch_execute("SET application_name = 'tk_aq'").await.unwrap();
    let rows = client.simple_query("SELECT current_user").await.unwrap();
    assert_eq!(first_value(&rows), ROLE.0);

    let new = Process::start(&config_path, Some(&socket), dir.path().join("new.log"));
    let (status, log) = old.wait(Duration::from_secs(15)).await;
    assert!(status.success(), "the old process exited with {status}:\n{log}");
    assert!(log.contains("client handed over to the new process"), "{log}");

    // The new process has no server connection for the user yet: this query needs one,
    // logged in with the SCRAM keys the old process learned from the client's login.
    let rows = client
        .simple_query("SELECT current_user || ' ' || current_setting('application_name')")
        .await
        .unwrap_or_else(|error| panic!("{error}; the new process's log:\n{}", new.log()));
    assert_eq!(first_value(&rows), format!("{} tk_aq", ROLE.0));
    let (count,): (i64,) = {
        let row = direct
            .query_one("SELECT count(*) FROM pg_stat_activity WHERE usename = $1", &[&ROLE.0])
            .await
            .unwrap();
        (row.get(0),)
    };
    assert!(count >= 1, "a server connection of the user is open");
    assert!(
        new.log().contains("client taken over from the old process"),
        "{}",
        new.log()
    );

    new.signal(nix::sys::signal::Signal::SIGTERM);
    let (status, log) = new.wait(Duration::from_secs(25)).await;
    assert!(status.success(), "{log}");
}

/// A process this test did not start (the successor the old pgrelay started): killed by
/// its process id when the test ends, whatever happened.
struct Successor(i32);

impl Successor {
    /// The process whose command line names `socket` after `--takeover`, other than `not`
    /// (the guard, which kills on drop, is made for that one process only).
    fn find(socket: &Path, not: u32) -> Option<Successor> {
        let socket = socket.as_os_str().as_encoded_bytes();
        let pid = std::fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            if pid <= 1 || pid == not as i32 || pid == std::process::id() as i32 {
                return None;
            }
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let args: Vec<&[u8]> = cmdline.split(|byte| *byte == 0).collect();
            let named = args.first() == Some(&env!("CARGO_BIN_EXE_pgrelay").as_bytes())
                && args
                    .windows(2)
                    .any(|pair| pair[0] == b"--takeover" && pair[1] == socket);
            named.then_some(pid)
        })?;
        Some(Successor(pid))
    }

    /// Whether it has exited (gone, or a zombie waiting for whoever adopted it).
    fn exited(&self) -> bool {
        match std::fs::read_to_string(format!("/proc/{}/stat", self.0)) {
            // "pid (comm) S ...": the state follows the last ')'.
            Ok(stat) => stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
            Err(_) => true,
        }
    }
}

impl Drop for Successor {
    fn drop(&mut self) {
        if self.0 > 1 && !self.exited() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.0), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigusr2_starts_a_successor_that_takes_over_and_the_takeover_is_counted() {
    let cluster = shared_cluster();
    let dir = tempfile::tempdir().unwrap();
    let (port, metrics_port) = (free_port(), free_port());
    let socket = dir.path().join("takeover.sock");
    let config = common::config_for(cluster, "mode = \"transaction\"\nsize = 4")
        .replacen(
            "listen = \"LISTEN\"",
            &format!(
                // Short: the client kept in its transaction is cut when it runs out.
                "listen = \"127.0.0.1:{port}\"\nshutdown_timeout = \"2s\"\ntakeover_socket = \"{}\"",
                socket.display()
            ),
            1,
        )
        .replacen(
            "metrics_listen = \"\"",
            &format!("metrics_listen = \"127.0.0.1:{metrics_port}\""),
            1,
        );
    let config_path = dir.path().join("pgrelay.toml");
    std::fs::write(&config_path, &config).unwrap();
    let old = Process::start(&config_path, None, dir.path().join("old.log"));
    let old_pid = old.pid();
    wait_until("the old process accepts", Duration::from_secs(20), || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
    })
    .await;

    // Two idle clients that move, one pinned by a temporary table that moves with its
    // server connection, one whose prepared statement is too large for one message of the
    // client channel (it travels in a memfd), and one that stays in its transaction, so
    // that it finishes here, cut at shutdown_timeout.
    let idle = common::connect(&url(port)).await.unwrap();
    idle.batch_execute("SET statement_timeout = '321s'").await.unwrap();
    let other = common::connect(&url(port)).await.unwrap();
    let pinned = common::connect(&url(port)).await.unwrap();
    pinned.batch_execute("CREATE TEMP TABLE t_usr2 (x int)").await.unwrap();
    let large = common::connect(&url(port)).await.unwrap();
    let statement = format!("SELECT 1 /* {} */", "x".repeat(140 * 1024));
    // Kept: a dropped Statement is closed.
    let prepared = large.prepare(&statement).await.unwrap();
    let in_transaction = common::connect(&url(port)).await.unwrap();
    in_transaction.batch_execute("BEGIN; SELECT 1").await.unwrap();

    old.signal(nix::sys::signal::Signal::SIGUSR2);
    // The successor's guard is taken before anything can fail: it runs in a process group
    // of its own, and nothing else would end it.
    let mut successor = None;
    let looked_since = std::time::Instant::now();
    while successor.is_none() && looked_since.elapsed() < Duration::from_secs(20) {
        successor = Successor::find(&socket, old_pid);
        if successor.is_none() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let (status, log) = old.wait(Duration::from_secs(30)).await;
    let successor = successor.unwrap_or_else(|| panic!("no process runs with --takeover {}:\n{log}", socket.display()));
    assert!(status.success(), "the old process exited with {status}:\n{log}");
    assert!(log.contains("started a successor"), "{log}");
    assert_eq!(log.matches("client handed over to the new process").count(), 4, "{log}");
    assert!(!successor.exited());

    // The successor serves on the same port, and the idle client goes on there with its
    // setting.
    let rows = idle.simple_query("SELECT 1").await.unwrap();
    assert_eq!(first_value(&rows), "1");
    let rows = idle.simple_query("SHOW statement_timeout").await.unwrap();
    assert_eq!(first_value(&rows), "321s");
    let rows = other.simple_query("SELECT 2").await.unwrap();
    assert_eq!(first_value(&rows), "2");
    let fresh = common::connect(&url(port)).await.unwrap();
    let rows = fresh.simple_query("SELECT 3").await.unwrap();
    assert_eq!(first_value(&rows), "3");
    let rows = pinned.simple_query("SELECT count(*) FROM t_usr2").await.unwrap();
    assert_eq!(first_value(&rows), "0");
    // The client with the large statement goes on with it, prepared anew on the
    // successor's server from its description.
    let rows = large.query(&prepared, &[]).await.unwrap();
    assert_eq!(rows[0].get::<_, i32>(0), 1);
    let cut = in_transaction.simple_query("SELECT 1").await.unwrap_err();
    assert!(in_transaction.is_closed(), "{cut}");

    // The successor's endpoint counts what it received, and what the old process passed
    // on when it exited.
    let counted = |body: &str| {
        ["handed_over", "received", "kept", "failed"].map(|result| {
            metric(body, "pgrelay_takeover_clients_total", &format!("result=\"{result}\"")).unwrap_or(-1.0)
        })
    };
    wait_until(
        "the old process's counts are passed on",
        Duration::from_secs(10),
        || async { counted(&http_get(metrics_port, "/metrics").await)[0] >= 4.0 },
    )
    .await;
    let body = http_get(metrics_port, "/metrics").await;
    assert_eq!(counted(&body), [4.0, 4.0, 1.0, 0.0], "{body}");
    let log = std::fs::read_to_string(dir.path().join("old.log")).unwrap();
    assert!(log.contains("handed_over=4 kept=1"), "{log}");

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(successor.0),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    wait_until("the successor exits", Duration::from_secs(25), || async {
        successor.exited()
    })
    .await;
    assert!(!socket.exists(), "the takeover socket is removed at exit");
}

/// A client whose notifications and notices come out of `messages`.
struct Listening {
    client: tokio_postgres::Client,
    messages: tokio::sync::mpsc::UnboundedReceiver<tokio_postgres::AsyncMessage>,
}

impl Listening {
    async fn connect(url: &str) -> Listening {
        use futures_util::{StreamExt, stream};
        let (client, mut connection) = tokio_postgres::connect(url, NoTls).await.unwrap();
        let (sender, messages) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut incoming = stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(Ok(message)) = incoming.next().await {
                if sender.send(message).is_err() {
                    break;
                }
            }
        });
        Listening { client, messages }
    }

    /// Every notification up to the one on `channel` with payload `last`, as (channel,
    /// payload); panics on a notice (a warning of missed notifications) or after 30 s.
    async fn notifications_until(&mut self, channel: &str, last: &str) -> Vec<(String, String)> {
        let mut received = Vec::new();
        loop {
            let message = tokio::time::timeout(Duration::from_secs(30), self.messages.recv())
                .await
                .unwrap_or_else(|_| panic!("({channel}, {last}) did not come; came: {received:?}"))
                .expect("the connection ended");
            match message {
                tokio_postgres::AsyncMessage::Notification(n) => {
                    received.push((n.channel().to_owned(), n.payload().to_owned()));
                    if n.channel() == channel && n.payload() == last {
                        return received;
                    }
                }
                tokio_postgres::AsyncMessage::Notice(notice) => panic!("a notice: {notice:?}"),
                _ => {}
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fan_out_listeners_move_and_hear_every_notification_once_and_in_order() {
    let cluster = shared_cluster();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let socket = dir.path().join("takeover.sock");
    let config = takeover_config(cluster, port, &socket);
    let config_path = dir.path().join("pgrelay.toml");
    std::fs::write(&config_path, &config).unwrap();
    let old = Process::start(&config_path, None, dir.path().join("old.log"));
    wait_until("the old process accepts", Duration::from_secs(20), || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
    })
    .await;

    // Four fan-out listeners on one channel; the first also on a second one, LISTENed to
    // inside a transaction block (it takes effect at COMMIT).
    let mut listeners = Vec::new();
    for _ in 0..4 {
        let listener = Listening::connect(&url(port)).await;
        listener.client.batch_execute("LISTEN tk_seq").await.unwrap();
        listeners.push(listener);
    }
    for statement in ["BEGIN", "LISTEN tk_other", "COMMIT"] {
        listeners[0].client.batch_execute(statement).await.unwrap();
    }

    // A numbered sequence from a direct connection, one transaction each, all along; every
    // tenth also goes to the second channel in the same transaction.
    let admin = common::direct(&cluster.primary().addr(), "app").await;
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let writer = {
        let (stop, sent) = (stop.clone(), sent.clone());
        let writer = common::direct(&cluster.primary().addr(), "app").await;
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Acquire) {
                n += 1;
                // tk_other first: the listeners read up to tk_seq's last payload, so that
                // must be the last notification of its transaction.
                let mut sql = String::new();
                if n % 10 == 0 {
                    sql.push_str(&format!("NOTIFY tk_other, '{n}'; "));
                }
                sql.push_str(&format!("NOTIFY tk_seq, '{n}'"));
                writer.batch_execute(&sql).await.unwrap();
                sent.store(n, Ordering::Release);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            n
        })
    };
    wait_until("notifications before the takeover", Duration::from_secs(10), || async {
        sent.load(Ordering::Acquire) >= 100
    })
    .await;

    // The old process's listener connection: the one whose last statement UNLISTENed
    // from a channel named for this test only.
    let probe = format!("tk_probe_{port}");
    let prober = common::connect(&url(port)).await.unwrap();
    prober.batch_execute(&format!("LISTEN {probe}")).await.unwrap();
    prober.batch_execute(&format!("UNLISTEN {probe}")).await.unwrap();
    let probed = format!("UNLISTEN \"{probe}\";");
    let old_listener = || async {
        admin
            .query(
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'pgrelay listener' AND query = $1",
                &[&probed],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| row.get::<_, i32>(0))
            .collect::<Vec<i32>>()
    };
    wait_until(
        "the old listener connection is seen",
        Duration::from_secs(10),
        || async { old_listener().await.len() == 1 },
    )
    .await;
    let old_listener = old_listener().await;

    let new = Process::start(&config_path, Some(&socket), dir.path().join("new.log"));
    let (status, log) = old.wait(Duration::from_secs(20)).await;
    assert!(status.success(), "the old process exited with {status}:\n{log}");
    assert_eq!(
        log.matches("client handed over to the new process").count(),
        5,
        "every listener moved, and the prober:\n{log}"
    );
    assert!(!log.contains("stays on this process"), "{log}");
    let at_exit = sent.load(Ordering::Acquire);
    wait_until("notifications after the takeover", Duration::from_secs(10), || async {
        sent.load(Ordering::Acquire) >= at_exit + 200
    })
    .await;
    stop.store(true, Ordering::Release);
    let last = writer.await.unwrap();
    let log = new.log();
    assert_eq!(
        log.matches("client taken over from the old process").count(),
        5,
        "{log}"
    );

    // Each hears 1..=last exactly once and in order, with no warning, and goes on.
    let expected: Vec<String> = (1..=last).map(|n| n.to_string()).collect();
    for (index, listener) in listeners.iter_mut().enumerate() {
        let received = listener.notifications_until("tk_seq", &last.to_string()).await;
        let seq: Vec<String> = received
            .iter()
            .filter(|(channel, _)| channel == "tk_seq")
            .map(|(_, payload)| payload.clone())
            .collect();
        assert!(
            seq == expected,
            "listener {index} heard {} of {last}: {seq:?}",
            seq.len()
        );
        let other: Vec<String> = received
            .iter()
            .filter(|(channel, _)| channel != "tk_seq")
            .map(|(channel, payload)| format!("{channel}:{payload}"))
            .collect();
        let expected_other: Vec<String> = if index == 0 {
            (10..=last).step_by(10).map(|n| format!("tk_other:{n}")).collect()
        } else {
            Vec::new()
        };
        assert_eq!(
            other, expected_other,
            "listener {index}: the other channel, and nothing else"
        );
        let rows = listener.client.simple_query("SELECT 1").await.unwrap();
        assert_eq!(first_value(&rows), "1");
    }

    // The new process's listener connection serves them; the old one's is gone with it.
    let listener_pids = |query: &'static str| {
        let admin = &admin;
        async move {
            let rows = admin.query(query, &[]).await.unwrap();
            rows.iter().map(|row| row.get::<_, i32>(0)).collect::<Vec<i32>>()
        }
    };
    wait_until(
        "the old listener connection is gone",
        Duration::from_secs(10),
        || async {
            let now =
                listener_pids("SELECT pid FROM pg_stat_activity WHERE application_name = 'pgrelay listener'").await;
            !now.iter().any(|pid| old_listener.contains(pid))
        },
    )
    .await;
    // And they still listen there: one more notification reaches every one.
    admin.batch_execute("NOTIFY tk_seq, 'after'").await.unwrap();
    for listener in &mut listeners {
        let received = listener.notifications_until("tk_seq", "after").await;
        assert_eq!(received, vec![("tk_seq".to_owned(), "after".to_owned())]);
    }

    new.signal(nix::sys::signal::Signal::SIGTERM);
    let (status, log) = new.wait(Duration::from_secs(25)).await;
    assert!(status.success(), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_listener_the_new_process_cannot_take_stays_and_is_ended_on_the_old_one() {
    let cluster = shared_cluster();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let socket = dir.path().join("takeover.sock");
    let config = takeover_config(cluster, port, &socket);
    let old_config = dir.path().join("old.toml");
    std::fs::write(&old_config, &config).unwrap();
    // The new configuration does not fan out: it cannot subscribe the listener, so the
    // marker never comes.
    let new_config = dir.path().join("new.toml");
    let pinning = config.replacen("[databases.app]\n", "[databases.app]\nlisten_notify = \"pin\"\n", 1);
    assert_ne!(pinning, config);
    std::fs::write(&new_config, pinning).unwrap();
    let old = Process::start(&old_config, None, dir.path().join("old.log"));
    wait_until("the old process accepts", Duration::from_secs(20), || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
    })
    .await;
    let mut listener = Listening::connect(&url(port)).await;
    listener.client.batch_execute("LISTEN tk_stays").await.unwrap();
    let idle = common::connect(&url(port)).await.unwrap();
    idle.batch_execute("SET statement_timeout = '66s'").await.unwrap();
    let admin = common::direct(&cluster.primary().addr(), "app").await;
    admin.batch_execute("NOTIFY tk_stays, 'before'").await.unwrap();
    assert_eq!(
        listener.notifications_until("tk_stays", "before").await,
        vec![("tk_stays".to_owned(), "before".to_owned())]
    );

    let new = Process::start(&new_config, Some(&socket), dir.path().join("new.log"));
    let (status, log) = old.wait(Duration::from_secs(20)).await;
    assert!(status.success(), "the old process exited with {status}:\n{log}");
    assert!(log.contains("the listening client stays on this process"), "{log}");
    assert_eq!(log.matches("client handed over to the new process").count(), 1, "{log}");
    assert!(new.log().contains("cannot be taken over here"), "{}", new.log());

    // Ended as before the takeover moved listeners; the other client moved.
    let error = listener.client.simple_query("SELECT 1").await.unwrap_err();
    assert!(listener.client.is_closed(), "{error}");
    let rows = idle.simple_query("SHOW statement_timeout").await.unwrap();
    assert_eq!(first_value(&rows), "66s");

    new.signal(nix::sys::signal::Signal::SIGTERM);
    let (status, log) = new.wait(Duration::from_secs(25)).await;
    assert!(status.success(), "{log}");
}
