//! Socket takeover end to end, with real processes: a new pgrelay takes the listening
//! sockets over from a running one (`run --takeover`), the old one finishes its
//! transactions and exits 0, and no connection attempt is refused on the way; idle clients
//! move with their session (TLS 1.3 ones with their traffic keys), TLS 1.2, pinned and
//! fan-out listening clients finish on the old one.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is a failed test

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::{first_value, shared_cluster, sqlstate, wait_until};
use tokio_postgres::NoTls;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A pgrelay process whose stderr goes to a file (a pipe nobody reads would fill up).
struct Process {
    child: Option<Child>,
    log: PathBuf,
}

impl Process {
    fn start(config: &Path, takeover: Option<&Path>, log: PathBuf) -> Process {
        let mut command = Command::new(env!("CARGO_BIN_EXE_pgrelay"));
        command.args(["run", "-c"]).arg(config);
        if let Some(path) = takeover {
            command.arg("--takeover").arg(path);
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Process {
            child: Some(child),
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = self.child.as_ref().unwrap().id();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal).unwrap();
    }

    /// Waits for the process to exit; returns its status and its log.
    async fn wait(mut self, limit: Duration) -> (std::process::ExitStatus, String) {
        let mut child = self.child.take().unwrap();
        let status = tokio::time::timeout(limit, tokio::task::spawn_blocking(move || child.wait().unwrap()))
            .await
            .unwrap_or_else(|_| panic!("pgrelay did not exit in time; its log:\n{}", self.log()))
            .unwrap();
        (status, self.log())
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

fn url(port: u16) -> String {
    format!("host=127.0.0.1 port={port} user=app password=app dbname=app connect_timeout=5")
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
    // Pinned to its server by a temporary table: it cannot move, and finishes on the old
    // process (its table would silently be gone on the new one).
    let pinned = common::connect(&url(port)).await.unwrap();
    pinned
        .batch_execute("CREATE TEMP TABLE t_pinned (x int)")
        .await
        .unwrap();
    // A fan-out listener: its subscription stays with the old process's listener
    // connection, so it finishes there too (docs/operations.md).
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
    // Closed with the old process, not moved without its table (which would fail with
    // 42P01 on an open connection).
    let error = pinned.simple_query("SELECT * FROM t_pinned").await.unwrap_err();
    assert!(pinned.is_closed(), "{error}");
    let error = listener.simple_query("SELECT 1").await.unwrap_err();
    assert!(listener.is_closed(), "{error}");

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
async fn check_moved_tls_client(client: &tokio_postgres::Client) {
    let rows = client.simple_query("SHOW application_name").await.unwrap();
    assert_eq!(first_value(&rows), "moved over TLS");
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
async fn check_moved_psql(psql: &mut Psql) {
    assert_eq!(psql.ask("SHOW application_name;").await, ["psql moved over TLS"]);
    let literal = "q".repeat(1_000_000);
    assert_eq!(psql.ask(&format!("SELECT length('{literal}');")).await, ["1000000"]);
    let answer = psql.ask("SELECT repeat('r', 1000000);").await;
    assert!(
        answer.len() == 1 && answer[0] == "r".repeat(1_000_000),
        "the large value came back changed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_tls_1_3_client_moves_twice_and_a_tls_1_2_one_finishes_on_the_old_process() {
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
    let rows = tls12.simple_query("SELECT 1").await.unwrap();
    assert_eq!(first_value(&rows), "1");
    let plain = common::connect(&url(port)).await.unwrap();
    plain.batch_execute("SET statement_timeout = '77s'").await.unwrap();
    let mut psql = Psql::start(
        &format!("host=localhost hostaddr=127.0.0.1 port={port} user=app dbname=app sslmode=require"),
        dir.path(),
    );
    let conninfo = psql.ask("\\conninfo").await.join(" ");
    assert!(conninfo.contains("TLSv1.3"), "{conninfo}");
    psql.ask("SET application_name = 'psql moved over TLS';").await;

    let second = Process::start(&config_path, Some(&socket), dir.path().join("second.log"));
    let (status, log) = first.wait(Duration::from_secs(15)).await;
    assert!(status.success(), "the first process exited with {status}:\n{log}");
    assert_eq!(log.matches("client handed over to the new process").count(), 3, "{log}");

    // TLS 1.2 could not move: its connection ended with the first process.
    let error = tls12.simple_query("SELECT 1").await.unwrap_err();
    assert!(tls12.is_closed(), "{error}");
    let rows = plain.simple_query("SHOW statement_timeout").await.unwrap();
    assert_eq!(first_value(&rows), "77s");
    // The TLS 1.3 one goes on, on the same connection, with its setting.
    check_moved_tls_client(&tls13).await;
    check_moved_psql(&mut psql).await;
    assert_eq!(
        second.log().matches("client taken over from the old process").count(),
        3,
        "{}",
        second.log()
    );

    // And once more, from the process that continued it.
    let third = Process::start(&config_path, Some(&socket), dir.path().join("third.log"));
    let (status, log) = second.wait(Duration::from_secs(15)).await;
    assert!(status.success(), "the second process exited with {status}:\n{log}");
    assert_eq!(log.matches("client handed over to the new process").count(), 3, "{log}");
    check_moved_tls_client(&tls13).await;
    check_moved_psql(&mut psql).await;
    let rows = plain.simple_query("SHOW statement_timeout").await.unwrap();
    assert_eq!(first_value(&rows), "77s");
    assert!(!tls13.is_closed());

    third.signal(nix::sys::signal::Signal::SIGTERM);
    let (status, log) = third.wait(Duration::from_secs(25)).await;
    assert!(status.success(), "{log}");
    assert!(tls13.simple_query("SELECT 1").await.is_err(), "closed at the shutdown");
}
