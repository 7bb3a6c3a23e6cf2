//! End-to-end TLS on both sides of pgrelay, against a PostgreSQL started with `ssl = on`:
//! clients (psql, tokio-postgres over rustls) with `sslmode=require` and `verify-full`,
//! plaintext clients refused when `[server.tls] mode = "require"`, plaintext pipelined
//! behind an SSLRequest refused, and server connections in every `server_tls` mode,
//! including a role PostgreSQL accepts only over TLS (`hostssl`); client certificates
//! checked against `[server.tls] ca` and `cert` address rules.
//!
//! Certificates are made by rcgen for each run: a CA, a certificate for "localhost" and
//! 127.0.0.1 signed by it (used by pgrelay and by PostgreSQL alike), an unrelated CA, and
//! client certificates (CN "app", "intruder" and "ghost" from the first CA, CN "app" from
//! the other).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is a failed test

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use common::{Proxy, first_value, sqlstate};
use pgrelay::localpg::{ClusterOptions, LocalCluster, RunAs};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::{Client, NoTls};
use tokio_rustls::rustls::{ClientConfig, RootCertStore, crypto::ring};

/// Generous bound on each test's work: a TLS stream that stalls shows up as a timeout.
const TEST_TIMEOUT: Duration = Duration::from_secs(60);

/// The role PostgreSQL lets in only over TLS.
const TLS_ONLY: &str = "tls_only";

struct Pki {
    dir: tempfile::TempDir,
    ca: PathBuf,
    other_ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    /// Client certificates by name: `app`, `intruder`, `ghost` (the test CA), `foreign`
    /// (CN "app", the other CA).
    clients: Vec<(&'static str, ClientCert)>,
}

/// A client certificate and its key, as PEM files.
struct ClientCert {
    cert: PathBuf,
    key: PathBuf,
}

fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        // PostgreSQL may run as another user (nobody, when we are root): it must reach its
        // files here.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let (ca_pem, issuer) = certificate_authority("pgrelay test CA");
        let (other_ca_pem, other_issuer) = certificate_authority("some other CA");
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, "localhost");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &issuer).unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            path
        };
        let ca = write("root.crt", &ca_pem);
        let other_ca = write("other-root.crt", &other_ca_pem);
        let cert = write("server.crt", &cert.pem());
        let key_path = dir.path().join("server.key");
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        // PostgreSQL insists on a key only its own user can read.
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let run_as = RunAs::detect().unwrap();
        if run_as.is_switching() {
            let user = nix::unistd::User::from_name(run_as.name()).unwrap().unwrap();
            nix::unistd::chown(&key_path, Some(user.uid), Some(user.gid)).unwrap();
        }
        let clients = [
            ("app", "app", &issuer),
            ("intruder", "intruder", &issuer),
            ("ghost", "ghost", &issuer),
            ("foreign", "app", &other_issuer),
        ]
        .into_iter()
        .map(|(name, common_name, issuer)| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.distinguished_name.push(DnType::CommonName, common_name);
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            let cert = params.signed_by(&key, issuer).unwrap();
            let cert_path = write(&format!("{name}.crt"), &cert.pem());
            // libpq refuses a key others may read.
            let key_path = dir.path().join(format!("{name}.key"));
            std::fs::write(&key_path, key.serialize_pem()).unwrap();
            std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
            (
                name,
                ClientCert {
                    cert: cert_path,
                    key: key_path,
                },
            )
        })
        .collect();
        Pki {
            dir,
            ca,
            other_ca,
            cert,
            key: key_path,
            clients,
        }
    })
}

fn certificate_authority(name: &str) -> (String, Issuer<'static, KeyPair>) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), Issuer::new(params, key))
}

/// A primary with `ssl = on` and the role `tls_only`, which pg_hba admits over TLS only.
fn cluster() -> &'static LocalCluster {
    static CLUSTER: OnceLock<&'static LocalCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let pki = pki();
        let cluster = LocalCluster::new(ClusterOptions {
            replicas: 0,
            setup_sql: vec![format!("CREATE ROLE {TLS_ONLY} LOGIN PASSWORD '{TLS_ONLY}'")],
            primary_conf: vec![
                "ssl = on".to_owned(),
                format!("ssl_cert_file = '{}'", pki.cert.display()),
                format!("ssl_key_file = '{}'", pki.key.display()),
            ],
            extra_hba: vec![
                format!("hostssl   all {TLS_ONLY} 127.0.0.1/32 scram-sha-256"),
                format!("hostnossl all {TLS_ONLY} 127.0.0.1/32 reject"),
            ],
            ..ClusterOptions::default()
        })
        .expect("start a PostgreSQL cluster with ssl = on");
        let cluster: &'static LocalCluster = Box::leak(Box::new(cluster));
        register_cleanup(cluster);
        cluster
    })
}

/// Statics are never dropped: stop the cluster and remove its files at exit.
fn register_cleanup(cluster: &'static LocalCluster) {
    static TO_CLEAN: Mutex<Option<&'static LocalCluster>> = Mutex::new(None);
    extern "C" fn clean() {
        if let Ok(mut slot) = TO_CLEAN.lock()
            && let Some(cluster) = slot.take()
        {
            cluster.teardown();
        }
    }
    if let Ok(mut slot) = TO_CLEAN.lock() {
        *slot = Some(cluster);
    }
    #[allow(unsafe_code)]
    // SAFETY: `clean` is a plain function with no arguments, as atexit requires; it only
    // touches a static behind a mutex.
    unsafe {
        libc::atexit(clean);
    }
}

/// pgrelay's config: `[server.tls]` from `client_tls` (none when empty), the users `app`,
/// `tls_only` and `app_trust`, and one database per `server_tls` value in `databases` (name, inline
/// table body, primary address), each pointing at database `app`.
fn config(client_tls: &str, databases: &[(&str, String, String)]) -> String {
    let pki = pki();
    let tls = if client_tls.is_empty() {
        String::new()
    } else {
        format!(
            "[server.tls]\ncert = \"{}\"\nkey = \"{}\"\nmode = \"{client_tls}\"\n",
            pki.cert.display(),
            pki.key.display()
        )
    };
    let mut text = format!(
        r#"
[server]
listen = "LISTEN"
metrics_listen = ""
client_login_timeout = "5s"

{tls}
[[users]]
name = "app"
password = "app"

[[users]]
name = "{TLS_ONLY}"
password = "{TLS_ONLY}"

[[users]]
name = "app_trust"
auth = "trust"
"#
    );
    for (name, server_tls, primary) in databases {
        text.push_str(&format!(
            "\n[databases.{name}]\ndbname = \"app\"\nprimary = \"{primary}\"\nserver_tls = {{ {server_tls} }}\n"
        ));
    }
    text
}

fn primary() -> String {
    cluster().primary().addr()
}

/// Only database `app`, with plain server connections.
fn client_tls_config(mode: &str) -> String {
    config(mode, &[("app", "mode = \"disable\"".to_owned(), primary())])
}

/// A rustls client config trusting `ca`.
fn rustls_client(ca: &Path) -> ClientConfig {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// tokio-postgres over rustls (trusting the test CA), as `app`, to database `app`.
async fn connect_tls(proxy: &Proxy, host: &str, sslmode: &str) -> Result<Client, tokio_postgres::Error> {
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new(rustls_client(&pki().ca));
    let url = format!(
        "host={host} port={} user=app password=app dbname=app sslmode={sslmode} connect_timeout=10",
        proxy.port()
    );
    let (client, connection) = tokio_postgres::connect(&url, tls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// psql with `conninfo` (password `app`), `-X -A -t -v ON_ERROR_STOP=1` and one `-c` per
/// command; returns (success, stdout, stderr).
async fn psql(conninfo: String, commands: &[&str]) -> (bool, String, String) {
    psql_with(conninfo, commands, &[("PGPASSWORD", "app".to_owned())]).await
}

/// [`psql`] with `env` instead of the password (`-w`: never prompt for one).
async fn psql_with(conninfo: String, commands: &[&str], env: &[(&str, String)]) -> (bool, String, String) {
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(key, value)| ((*key).to_owned(), value.clone()))
        .collect();
    let program = cluster().bin_path("psql").unwrap();
    let mut args = vec![
        conninfo,
        "-X".into(),
        "-w".into(),
        "-A".into(),
        "-t".into(),
        "-v".into(),
        "ON_ERROR_STOP=1".into(),
    ];
    for command in commands {
        args.push("-c".into());
        args.push((*command).to_owned());
    }
    let home = pki().dir.path().to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut command = std::process::Command::new(program);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PG") {
                command.env_remove(key);
            }
        }
        // libpq looks for ~/.postgresql/root.crt and client certificates: none here.
        let output = command
            .args(&args)
            .env("HOME", home)
            .envs(env)
            .env("PGCONNECT_TIMEOUT", "10")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

fn conninfo(proxy: &Proxy, host: &str, extra: &str) -> String {
    format!("host={host} port={} user=app dbname=app {extra}", proxy.port())
}

async fn within<F: std::future::Future>(future: F) -> F::Output {
    tokio::time::timeout(TEST_TIMEOUT, future)
        .await
        .expect("the test finished in time (a stalled TLS stream?)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_connects_with_sslmode_require_and_verify_full() {
    within(async {
        let proxy = Proxy::start(&client_tls_config("require")).await;
        let (ok, out, err) = psql(
            conninfo(&proxy, "127.0.0.1", "sslmode=require"),
            &["\\conninfo", "SELECT 40 + 2"],
        )
        .await;
        assert!(ok, "{err}");
        assert!(out.contains("SSL connection"), "{out}");
        assert!(out.trim_end().ends_with("42"), "{out}");

        let ca = pki().ca.display().to_string();
        let (ok, out, err) = psql(
            conninfo(&proxy, "localhost", &format!("sslmode=verify-full sslrootcert={ca}")),
            &["\\conninfo", "SELECT 'verified'"],
        )
        .await;
        assert!(ok, "{err}");
        assert!(out.contains("SSL connection"), "{out}");
        assert!(out.trim_end().ends_with("verified"), "{out}");

        // The certificate is pgrelay's own: a client trusting another CA refuses it.
        let other = pki().other_ca.display().to_string();
        let (ok, _, err) = psql(
            conninfo(&proxy, "localhost", &format!("sslmode=verify-full sslrootcert={other}")),
            &["SELECT 1"],
        )
        .await;
        assert!(!ok);
        assert!(err.contains("certificate verify failed"), "{err}");
        proxy.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_clients_are_refused_when_tls_is_required() {
    within(async {
        let proxy = Proxy::start(&client_tls_config("require")).await;
        let (ok, _, err) = psql(conninfo(&proxy, "127.0.0.1", "sslmode=disable"), &["SELECT 1"]).await;
        assert!(!ok);
        assert!(err.contains("pgrelay requires SSL"), "{err}");

        let Err(error) = proxy.connect("app", "app", "app").await else {
            panic!("a plaintext client was let in");
        };
        assert_eq!(sqlstate(&error), "28000", "{error:?}");

        // libpq's default, prefer, takes the TLS pgrelay offers.
        let (ok, out, err) = psql(conninfo(&proxy, "127.0.0.1", "sslmode=prefer"), &["\\conninfo"]).await;
        assert!(ok, "{err}");
        assert!(out.contains("SSL connection"), "{out}");
        proxy.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_takes_both_and_disable_answers_no() {
    within(async {
        let proxy = Proxy::start(&client_tls_config("allow")).await;
        let plain = proxy.app().await;
        assert_eq!(first_value(&plain.simple_query("SELECT 1").await.unwrap()), "1");
        let tls = connect_tls(&proxy, "127.0.0.1", "require").await.unwrap();
        assert_eq!(first_value(&tls.simple_query("SELECT 2").await.unwrap()), "2");
        proxy.shutdown().await;

        let proxy = Proxy::start(&client_tls_config("disable")).await;
        let (ok, _, err) = psql(conninfo(&proxy, "127.0.0.1", "sslmode=require"), &["SELECT 1"]).await;
        assert!(!ok);
        assert!(err.contains("does not support SSL"), "{err}");
        let plain = proxy.app().await;
        assert_eq!(first_value(&plain.simple_query("SELECT 3").await.unwrap()), "3");
        proxy.shutdown().await;
    })
    .await;
}

/// The bytes of a StartupMessage for `user` in database `app`.
fn startup_packet(user: &str) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&196_608u32.to_be_bytes());
    for (key, value) in [("user", user), ("database", "app")] {
        body.extend_from_slice(key.as_bytes());
        body.push(0);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut packet = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    packet
}

const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_pipelined_after_an_ssl_request_is_refused() {
    within(async {
        let proxy = Proxy::start(&client_tls_config("allow")).await;
        let mut socket = TcpStream::connect(proxy.addr).await.unwrap();
        // One write: the startup packet is in pgrelay's socket before it answers.
        let mut bytes = SSL_REQUEST.to_vec();
        bytes.extend_from_slice(&startup_packet("app"));
        socket.write_all(&bytes).await.unwrap();
        let mut answer = Vec::new();
        let mut chunk = [0u8; 1024];
        // Until EOF, or a reset (pgrelay closes with our bytes unread).
        while let Ok(read) = socket.read(&mut chunk).await {
            if read == 0 {
                break;
            }
            answer.extend_from_slice(&chunk[..read]);
        }
        assert_ne!(answer.first(), Some(&b'S'), "pgrelay must not start TLS");
        assert_eq!(answer.first(), Some(&b'E'), "{answer:?}");
        let text = String::from_utf8_lossy(&answer);
        assert!(text.contains("08P01"), "{text}");
        assert!(text.contains("unencrypted data after SSL request"), "{text}");

        // The same client, waiting for the answer as it should, is served.
        let mut socket = TcpStream::connect(proxy.addr).await.unwrap();
        socket.write_all(&SSL_REQUEST).await.unwrap();
        let mut answer = [0u8; 1];
        socket.read_exact(&mut answer).await.unwrap();
        assert_eq!(answer[0], b'S');
        proxy.shutdown().await;
    })
    .await;
}

/// Reads backend messages up to ReadyForQuery; returns their tags.
async fn read_until_ready<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> Vec<u8> {
    let mut tags = Vec::new();
    loop {
        let mut header = [0u8; 5];
        stream.read_exact(&mut header).await.unwrap();
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        let mut body = vec![0u8; len - 4];
        stream.read_exact(&mut body).await.unwrap();
        tags.push(header[0]);
        assert_ne!(header[0], b'E', "{}", String::from_utf8_lossy(&body));
        if header[0] == b'Z' {
            return tags;
        }
    }
}

/// A session of `app_trust` over TLS on `tcp`, logged in (past its first ReadyForQuery).
async fn raw_tls_session(mut tcp: TcpStream) -> tokio_rustls::client::TlsStream<TcpStream> {
    tcp.write_all(&SSL_REQUEST).await.unwrap();
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await.unwrap();
    assert_eq!(answer[0], b'S');
    let connector = tokio_rustls::TlsConnector::from(Arc::new(rustls_client(&pki().ca)));
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    tls.write_all(&startup_packet("app_trust")).await.unwrap();
    tls.flush().await.unwrap();
    assert_eq!(read_until_ready(&mut tls).await.first(), Some(&b'R'));
    tls
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_decrypted_ahead_is_served_without_waiting_for_the_socket() {
    within(async {
        let proxy = Proxy::start(&client_tls_config("require")).await;
        let mut tls = raw_tls_session(TcpStream::connect(proxy.addr).await.unwrap()).await;

        // One TLS record holding a CopyData that pgrelay drops (no COPY runs) and that fills
        // its 8 kB read exactly, then a Sync: the Sync is decrypted with the CopyData but
        // left in rustls, and the socket has nothing more to say.
        let mut bytes = vec![b'd'];
        bytes.extend_from_slice(&(8192u32 - 1).to_be_bytes());
        bytes.resize(8192, b'x');
        bytes.extend_from_slice(&[b'S', 0, 0, 0, 4]);
        tls.write_all(&bytes).await.unwrap();
        tls.flush().await.unwrap();
        let tags = tokio::time::timeout(Duration::from_secs(5), read_until_ready(&mut tls))
            .await
            .expect("pgrelay answers the Sync it already decrypted");
        assert_eq!(tags, vec![b'Z']);
        proxy.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_reaches_a_slow_tls_reader_while_the_server_is_silent() {
    within(async {
        let proxy = Proxy::start(&client_tls_config("require")).await;
        // A small receive window, read slower than pgrelay writes, and more data than the
        // kernel buffers for the socket: pgrelay's writes keep finding the socket full, and
        // rustls keeps records it could not write yet (they must still go out once there is
        // room, though the server says nothing more for a while).
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(16 * 1024).unwrap();
        let mut tls = raw_tls_session(socket.connect(proxy.addr).await.unwrap()).await;
        let mut query = vec![b'Q', 0, 0, 0, 0];
        // The notice makes PostgreSQL flush its output (the row's tail included) before
        // it sleeps.
        query.extend_from_slice(
            b"SELECT repeat('x', 8000000); DO $$BEGIN RAISE NOTICE 'flush'; END$$; SELECT pg_sleep(4)\0",
        );
        let len = (query.len() - 1) as u32;
        query[1..5].copy_from_slice(&len.to_be_bytes());
        tls.write_all(&query).await.unwrap();
        tls.flush().await.unwrap();
        let started = std::time::Instant::now();
        // RowDescription, then the 8 MB DataRow, read 16 kB a millisecond.
        let mut header = [0u8; 5];
        tls.read_exact(&mut header).await.unwrap();
        assert_eq!(header[0], b'T');
        let mut skip = vec![0u8; u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize - 4];
        tls.read_exact(&mut skip).await.unwrap();
        tls.read_exact(&mut header).await.unwrap();
        assert_eq!(header[0], b'D');
        let mut left = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize - 4;
        let mut chunk = vec![0u8; 16 * 1024];
        while left > 0 {
            let want = left.min(chunk.len());
            let read = tls.read(&mut chunk[..want]).await.unwrap();
            assert!(read > 0, "pgrelay closed the connection");
            left -= read;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // The server sends nothing more for 4 s: the row must not wait for that.
        let elapsed = started.elapsed();
        assert!(elapsed < Duration::from_secs(3), "the row took {elapsed:?}");
        let tags = read_until_ready(&mut tls).await;
        assert_eq!(tags.last(), Some(&b'Z'));
        proxy.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_over_tls_moves_large_and_pipelined_data() {
    within(async {
        let databases = [(
            "app",
            format!("mode = \"verify-full\", ca = \"{}\"", pki().ca.display()),
            primary(),
        )];
        let proxy = Proxy::start(&config("require", &databases)).await;
        let client = Arc::new(connect_tls(&proxy, "localhost", "require").await.unwrap());
        // TLS on both legs.
        let ssl = client
            .simple_query("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .await
            .unwrap();
        assert_eq!(first_value(&ssl), "t");
        // Many TLS records each way.
        let row = client.query_one("SELECT repeat('x', 4000000)", &[]).await.unwrap();
        assert_eq!(row.get::<_, &str>(0).len(), 4_000_000);
        let big = "y".repeat(3_000_000);
        let row = client.query_one("SELECT length($1::text)", &[&big]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), 3_000_000);
        let rows = client
            .query("SELECT g, repeat('z', 100) FROM generate_series(1, 50000) g", &[])
            .await
            .unwrap();
        assert_eq!(rows.len(), 50_000);
        // Pipelined queries of sizes around pgrelay's 8 kB read chunk, so that messages
        // end inside TLS records and pgrelay must find the rest in rustls, not the socket.
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..64usize {
            let client = client.clone();
            tasks.spawn(async move {
                let filler = "w".repeat(8_180 + (i % 16));
                let sql = format!("SELECT {i}, length('{filler}')");
                let messages = client.simple_query(&sql).await.unwrap();
                assert_eq!(first_value(&messages), i.to_string());
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.unwrap();
        }
        // Idle for a moment, then more: the session waits on an idle TLS client.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            first_value(&client.simple_query("SELECT 'again'").await.unwrap()),
            "again"
        );
        proxy.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_reaches_a_server_behind_tls_from_a_tls_or_plaintext_client() {
    within(async {
        let databases = [("app", "mode = \"require\"".to_owned(), primary())];
        let proxy = Proxy::start(&config("allow", &databases)).await;
        // Over TLS to pgrelay (tokio-postgres negotiates TLS for its cancel connection too).
        let client = connect_tls(&proxy, "127.0.0.1", "require").await.unwrap();
        let token = client.cancel_token();
        let canceller = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let tls = tokio_postgres_rustls::MakeRustlsConnect::new(rustls_client(&pki().ca));
            token.cancel_query(tls).await.unwrap();
        });
        let error = client.simple_query("SELECT pg_sleep(30)").await.unwrap_err();
        assert_eq!(sqlstate(&error), "57014", "{error:?}");
        canceller.await.unwrap();

        // A session over TLS, its CancelRequest in plaintext (as libpq before 17 sends it).
        let client = connect_tls(&proxy, "127.0.0.1", "prefer").await.unwrap();
        let token = client.cancel_token();
        let addr = proxy.addr;
        let canceller = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let socket = TcpStream::connect(addr).await.unwrap();
            token.cancel_query_raw(socket, NoTls).await.unwrap();
        });
        let error = client.simple_query("SELECT pg_sleep(30)").await.unwrap_err();
        assert_eq!(sqlstate(&error), "57014", "{error:?}");
        canceller.await.unwrap();
        assert_eq!(first_value(&client.simple_query("SELECT 1").await.unwrap()), "1");
        proxy.shutdown().await;
    })
    .await;
}

/// The error `tls_only` gets from `database`, at login (pgrelay checks the login against
/// a server then) or at its first query.
async fn refusal(proxy: &Proxy, database: &str) -> tokio_postgres::Error {
    match proxy.connect(TLS_ONLY, TLS_ONLY, database).await {
        Ok(client) => client
            .simple_query("SELECT 1")
            .await
            .expect_err("refused by the server"),
        Err(error) => error,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_tls_modes_against_a_server_that_requires_tls() {
    within(async {
        let pki = pki();
        let port = cluster().primary().port();
        let databases = [
            ("plain", "mode = \"disable\"".to_owned(), primary()),
            ("prefer", "mode = \"prefer\"".to_owned(), primary()),
            ("required", "mode = \"require\"".to_owned(), primary()),
            (
                "verified",
                format!("mode = \"verify-full\", ca = \"{}\"", pki.ca.display()),
                primary(),
            ),
            (
                "verified_name",
                format!("mode = \"verify-full\", ca = \"{}\"", pki.ca.display()),
                format!("localhost:{port}"),
            ),
            (
                "wrong_ca",
                format!("mode = \"verify-full\", ca = \"{}\"", pki.other_ca.display()),
                primary(),
            ),
        ];
        let proxy = Proxy::start(&config("", &databases)).await;
        let ssl_query = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";

        for database in ["prefer", "required", "verified", "verified_name"] {
            let client = proxy
                .connect(TLS_ONLY, TLS_ONLY, database)
                .await
                .unwrap_or_else(|error| panic!("{database}: {error:?}"));
            let ssl = client.simple_query(ssl_query).await.unwrap();
            assert_eq!(first_value(&ssl), "t", "{database}");
            let row = client.query_one("SELECT repeat('x', 1000000)", &[]).await.unwrap();
            assert_eq!(row.get::<_, &str>(0).len(), 1_000_000, "{database}");
        }

        // Plain TCP is what pg_hba refuses for this role...
        let error = refusal(&proxy, "plain").await;
        assert_eq!(sqlstate(&error), "08006", "{error:?}");
        assert!(common::message(&error).contains("no encryption"), "{error:?}");
        // ...and works for a role pg_hba lets in without TLS.
        let client = proxy.connect("app", "app", "plain").await.unwrap();
        assert_eq!(first_value(&client.simple_query(ssl_query).await.unwrap()), "f");

        // A certificate from a CA pgrelay does not trust: no connection.
        let error = refusal(&proxy, "wrong_ca").await;
        assert_eq!(sqlstate(&error), "08006", "{error:?}");
        assert!(common::message(&error).contains("TLS handshake failed"), "{error:?}");
        proxy.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_monitor_uses_tls_where_the_database_does() {
    within(async {
        // The monitor logs in as the first user with a plaintext password: without `app`,
        // that is tls_only, whom PostgreSQL refuses over plain TCP.
        let text = config("", &[("required", "mode = \"require\"".to_owned(), primary())]);
        let text = text.replacen("[[users]]\nname = \"app\"\npassword = \"app\"\n", "", 1);
        assert!(text.find(TLS_ONLY) < text.find("app_trust"), "{text}");
        let proxy = Proxy::start(&text).await;
        let admin = common::direct(&primary(), "app").await;
        let monitor_over_tls = format!(
            "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.application_name = '{}' AND a.usename = '{TLS_ONLY}' AND s.ssl",
            pgrelay::cluster::APPLICATION_NAME
        );
        common::wait_until("the monitor's connection over TLS", Duration::from_secs(15), || async {
            let count: i64 = admin.query_one(&monitor_over_tls, &[]).await.unwrap().get(0);
            count >= 1
        })
        .await;
        proxy.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_tls_files_stop_startup_with_their_path() {
    // Nothing connects to the servers: any address will do.
    let unused = "127.0.0.1:1".to_owned();
    let text = config("require", &[("app", "mode = \"disable\"".to_owned(), unused.clone())])
        .replace(&pki().key.display().to_string(), "/nonexistent/server.key");
    let parsed = pgrelay::config::parse(&text.replace("LISTEN", "127.0.0.1:0")).unwrap();
    let Err(error) = pgrelay::app::start(parsed).await else {
        panic!("pgrelay started without its TLS files");
    };
    let message = error.to_string();
    assert!(message.contains("server.tls"), "{message}");
    assert!(message.contains("/nonexistent/server.key"), "{message}");

    let databases = [(
        "app",
        "mode = \"verify-full\", ca = \"/nonexistent/root.crt\"".to_owned(),
        unused,
    )];
    let parsed = pgrelay::config::parse(&config("", &databases).replace("LISTEN", "127.0.0.1:0")).unwrap();
    let Err(error) = pgrelay::app::start(parsed).await else {
        panic!("pgrelay started without its TLS files");
    };
    let message = error.to_string();
    assert!(message.contains("databases.app.server_tls"), "{message}");
    assert!(message.contains("/nonexistent/root.crt"), "{message}");
}

fn client_cert(name: &str) -> &'static ClientCert {
    &pki()
        .clients
        .iter()
        .find(|(client, _)| *client == name)
        .unwrap_or_else(|| panic!("no client certificate {name}"))
        .1
}

/// `[server.tls] mode = "allow"`, with `ca` when given, and address rules that ask `app`
/// and `ghost` for a certificate over TLS to database `app`, everyone else (and everywhere
/// else: `app_pw` is `app` under another name) for a password.
fn cert_config(ca: Option<&Path>) -> String {
    let rules = "hba = [\n    \"hostssl app app,ghost 127.0.0.1/32 cert\",\n    \
                 \"host all all 127.0.0.1/32 scram-sha-256\",\n]\n";
    let databases = [
        ("app", "mode = \"disable\"".to_owned(), primary()),
        ("app_pw", "mode = \"disable\"".to_owned(), primary()),
    ];
    let mut text = config("allow", &databases).replacen(
        "client_login_timeout = \"5s\"\n",
        &format!("client_login_timeout = \"5s\"\n{rules}"),
        1,
    );
    if let Some(ca) = ca {
        text = text.replacen(
            "mode = \"allow\"\n",
            &format!("mode = \"allow\"\nca = \"{}\"\n", ca.display()),
            1,
        );
    }
    text
}

/// tokio-postgres over rustls as `user` to database `app`, presenting the client
/// certificate `cert` if given, with no password.
async fn connect_with_cert(proxy: &Proxy, user: &str, cert: Option<&str>) -> Result<Client, tokio_postgres::Error> {
    let builder = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates({
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(&pki().ca).unwrap() {
                roots.add(cert.unwrap()).unwrap();
            }
            roots
        });
    let config = match cert {
        None => builder.with_no_client_auth(),
        Some(name) => {
            let files = client_cert(name);
            let chain = CertificateDer::pem_file_iter(&files.cert)
                .unwrap()
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = rustls_pki_types::PrivateKeyDer::from_pem_file(&files.key).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
    };
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new(config);
    let url = format!(
        "host=localhost port={} user={user} dbname=app sslmode=require connect_timeout=10",
        proxy.port()
    );
    let (client, connection) = tokio_postgres::connect(&url, tls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_logs_in_as_its_common_name() {
    within(async {
        let proxy = Proxy::start(&cert_config(Some(&pki().ca))).await;

        // CN = user: in, without any password.
        let client = connect_with_cert(&proxy, "app", Some("app")).await.unwrap();
        assert_eq!(
            first_value(&client.simple_query("SELECT 'by certificate'").await.unwrap()),
            "by certificate"
        );

        // A certificate of another name, or none at all: 28000 as PostgreSQL words it.
        let error = connect_with_cert(&proxy, "app", Some("intruder")).await.unwrap_err();
        assert_eq!(sqlstate(&error), "28000", "{error:?}");
        assert_eq!(
            common::message(&error),
            "certificate authentication failed for user \"app\""
        );
        let error = connect_with_cert(&proxy, "app", None).await.unwrap_err();
        assert_eq!(sqlstate(&error), "28000", "{error:?}");
        assert_eq!(
            common::message(&error),
            "connection requires a valid client certificate"
        );
        assert_eq!(common::login_refusals(&proxy, "cert"), 2.0);

        // A certificate that names a user pgrelay does not know: the role does not exist.
        let error = connect_with_cert(&proxy, "ghost", Some("ghost")).await.unwrap_err();
        assert_eq!(sqlstate(&error), "28000", "{error:?}");
        assert_eq!(common::message(&error), "role \"ghost\" does not exist");

        // A certificate from a CA pgrelay does not trust fails the handshake: no
        // PostgreSQL error ever comes back.
        let error = connect_with_cert(&proxy, "app", Some("foreign")).await.unwrap_err();
        assert!(error.code().is_none(), "{error:?}");
        let chain = format!("{error:?}");
        assert!(chain.contains("AlertReceived(UnknownCA)"), "{chain}");

        // Other rules are unaffected: a TLS client without a certificate logs in with a
        // password, and `app` over plain TCP is past the hostssl rule.
        let (ok, out, err) = psql(
            format!(
                "host=127.0.0.1 port={} user=app dbname=app_pw sslmode=require",
                proxy.port()
            ),
            &["\\conninfo", "SELECT 'password over TLS'"],
        )
        .await;
        assert!(ok, "{err}");
        assert!(out.contains("SSL connection"), "{out}");
        assert!(out.trim_end().ends_with("password over TLS"), "{out}");
        let (ok, out, err) = psql(conninfo(&proxy, "127.0.0.1", "sslmode=disable"), &["SELECT 'plain'"]).await;
        assert!(ok, "{err}");
        assert_eq!(out.trim_end(), "plain");
        proxy.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_logs_in_with_sslcert_and_sslkey() {
    within(async {
        let proxy = Proxy::start(&cert_config(Some(&pki().ca))).await;
        let files = |name: &str| {
            let files = client_cert(name);
            vec![
                ("PGSSLCERT", files.cert.display().to_string()),
                ("PGSSLKEY", files.key.display().to_string()),
            ]
        };
        let base = conninfo(&proxy, "127.0.0.1", "sslmode=require");
        let (ok, out, err) = psql_with(base.clone(), &["\\conninfo", "SELECT current_user"], &files("app")).await;
        assert!(ok, "{err}");
        assert!(out.contains("SSL connection"), "{out}");
        assert!(out.trim_end().ends_with("app"), "{out}");

        let intruder = client_cert("intruder");
        let (ok, _, err) = psql_with(
            format!(
                "{base} sslcert={} sslkey={}",
                intruder.cert.display(),
                intruder.key.display()
            ),
            &["SELECT 1"],
            &[],
        )
        .await;
        assert!(!ok);
        assert!(
            err.contains("certificate authentication failed for user \"app\""),
            "{err}"
        );

        let (ok, _, err) = psql_with(base.clone(), &["SELECT 1"], &files("foreign")).await;
        assert!(!ok);
        assert!(err.contains("SSL error: tlsv1 alert unknown ca"), "{err}");
        proxy.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_ca_is_read_again_at_reload() {
    within(async {
        let dir = tempfile::tempdir().unwrap();
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let path = dir.path().join("pgrelay.toml");
        let write = |ca: Option<&Path>| {
            let text = cert_config(ca).replace("LISTEN", &format!("127.0.0.1:{port}"));
            std::fs::write(&path, text).unwrap();
        };
        write(None);
        let running = pgrelay::app::start_with_file(pgrelay::config::load(&path).unwrap(), Some(path.clone()))
            .await
            .unwrap();
        let proxy_port = running.local_addr().port();
        let login = |cert: &'static str| async move {
            let files = client_cert(cert);
            psql_with(
                format!(
                    "host=127.0.0.1 port={proxy_port} user=app dbname=app sslmode=require sslcert={} sslkey={}",
                    files.cert.display(),
                    files.key.display()
                ),
                &["SELECT 'in'"],
                &[],
            )
            .await
        };

        // Without `ca` nobody is asked for a certificate: a cert rule cannot be met.
        let (ok, _, err) = login("app").await;
        assert!(!ok);
        assert!(
            err.contains("client certificates can only be checked if a root certificate store is available"),
            "{err}"
        );

        write(Some(&pki().ca));
        pgrelay::reload::reload(running.shared()).unwrap();
        let (ok, out, err) = login("app").await;
        assert!(ok, "{err}");
        assert_eq!(out.trim_end(), "in");

        // Another CA: the certificate that was accepted is now refused in the handshake.
        write(Some(&pki().other_ca));
        pgrelay::reload::reload(running.shared()).unwrap();
        let (ok, _, err) = login("app").await;
        assert!(!ok);
        assert!(
            err.contains("SSL error: tlsv1 alert unknown ca"),
            "refused in the handshake: {err}"
        );
        let (ok, out, err) = login("foreign").await;
        assert!(ok, "{err}");
        assert_eq!(out.trim_end(), "in");
        running.shutdown().await;
    })
    .await;
}
