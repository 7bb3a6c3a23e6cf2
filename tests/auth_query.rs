//! Passwords that exist only in PostgreSQL: `auth_query` through the `SECURITY DEFINER`
//! function docs/configuration.md shows, SCRAM pass-through (pgrelay logs in to PostgreSQL
//! with the keys the client's proof gave, as that role), md5 hashes, unknown users, a changed
//! password once `auth_cache_ttl` passes, and SCRAM-SHA-256-PLUS channel binding over TLS
//! (psql with `channel_binding=require`; a client bound to another certificate is refused),
//! and `[pool]`'s max_user_connections for users found this way.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is a failed test

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::BytesMut;
use common::{Proxy, direct, login_refusals, sqlstate, wait_until};
use pgrelay::localpg::{ClusterOptions, LocalCluster};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::{ClientConfig, RootCertStore, crypto::ring};

/// Bound on each wait: a login that hangs shows up as a timeout.
const TIMEOUT: Duration = Duration::from_secs(30);

/// Roles that exist only in PostgreSQL, with their passwords.
const SCRAM_ROLE: (&str, &str) = ("aq_scram", "scram secret");
const MD5_ROLE: (&str, &str) = ("aq_md5", "md5 secret");
const ROTATED_ROLE: &str = "aq_rotate";
/// A role whose pg_authid verifier is copied into pgrelay's config (no plaintext there).
const CONFIGURED_ROLE: (&str, &str) = ("aq_conf", "conf secret");
/// Roles PostgreSQL refuses with their right password: one whose VALID UNTIL has passed,
/// one without LOGIN.
const EXPIRED_ROLE: (&str, &str) = ("aq_expired", "expired secret");
const NOLOGIN_ROLE: (&str, &str) = ("aq_nologin", "nologin secret");

/// The lookup a DBA creates, as docs/configuration.md shows it.
const LOOKUP_FUNCTION: &str = "CREATE FUNCTION pgrelay.user_lookup(i_username text) \
     RETURNS TABLE (usename name, passwd text) LANGUAGE sql STABLE SECURITY DEFINER \
     SET search_path = pg_catalog, pg_temp AS $$ \
     SELECT rolname::name, CASE WHEN rolvaliduntil < now() THEN NULL ELSE rolpassword END \
     FROM pg_authid WHERE rolname = i_username AND rolcanlogin $$";

fn cluster() -> &'static LocalCluster {
    static CLUSTER: OnceLock<&'static LocalCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        common::own_cluster(ClusterOptions {
            replicas: 0,
            setup_sql: vec![
                "CREATE ROLE pgrelay_auth LOGIN PASSWORD 'pgrelay_auth'".to_owned(),
                // The auth_user of the "*" test only, so its side connections can be counted.
                "CREATE ROLE pgrelay_star LOGIN PASSWORD 'pgrelay_star'".to_owned(),
                format!("CREATE ROLE {} LOGIN PASSWORD '{}'", SCRAM_ROLE.0, SCRAM_ROLE.1),
                format!("CREATE ROLE {ROTATED_ROLE} LOGIN PASSWORD 'old password'"),
                format!(
                    "CREATE ROLE {} LOGIN PASSWORD '{}'",
                    CONFIGURED_ROLE.0, CONFIGURED_ROLE.1
                ),
                format!(
                    "CREATE ROLE {} LOGIN PASSWORD '{}' VALID UNTIL '2000-01-01'",
                    EXPIRED_ROLE.0, EXPIRED_ROLE.1
                ),
                format!("CREATE ROLE {} NOLOGIN PASSWORD '{}'", NOLOGIN_ROLE.0, NOLOGIN_ROLE.1),
                "SET password_encryption = 'md5'".to_owned(),
                format!("CREATE ROLE {} LOGIN PASSWORD '{}'", MD5_ROLE.0, MD5_ROLE.1),
                "\\c app".to_owned(),
                "CREATE SCHEMA pgrelay".to_owned(),
                LOOKUP_FUNCTION.to_owned(),
                "REVOKE ALL ON FUNCTION pgrelay.user_lookup(text) FROM PUBLIC".to_owned(),
                "GRANT USAGE ON SCHEMA pgrelay TO pgrelay_auth".to_owned(),
                "GRANT EXECUTE ON FUNCTION pgrelay.user_lookup(text) TO pgrelay_auth".to_owned(),
                "GRANT USAGE ON SCHEMA pgrelay TO pgrelay_star".to_owned(),
                "GRANT EXECUTE ON FUNCTION pgrelay.user_lookup(text) TO pgrelay_star".to_owned(),
            ],
            // The md5-stored role must be asked for md5: scram-sha-256 lines refuse it.
            extra_hba: vec![format!("host all {} 127.0.0.1/32 md5", MD5_ROLE.0)],
            ..ClusterOptions::default()
        })
    })
}

struct Pki {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

/// A CA and a certificate for "localhost" signed by it (ECDSA P-256 with SHA-256).
fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "auth_query test CA");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            path
        };
        Pki {
            ca: write("root.crt", &ca_cert.pem()),
            cert: write("server.crt", &cert.pem()),
            key: write("server.key", &key.serialize_pem()),
            _dir: dir,
        }
    })
}

/// pgrelay with TLS for clients, `app` looking passwords up through the function with a 1 s
/// cache, `app_su` through the default query (as the superuser), and the configured role's
/// pg_authid verifier as its password.
async fn start_proxy() -> Proxy {
    start_proxy_with("", "").await
}

/// [`start_proxy`] with more `[server]` and `[server.tls]` lines, and more databases after.
async fn start_proxy_with(server: &str, tls: &str) -> Proxy {
    start_proxy_full(server, tls, "").await
}

async fn start_proxy_full(server: &str, tls: &str, databases: &str) -> Proxy {
    let server = if server.contains("client_login_timeout") {
        server.to_owned()
    } else {
        format!("client_login_timeout = \"10s\"\n{server}")
    };
    let primary = cluster().primary().addr();
    let verifier: String = direct(&primary, "postgres")
        .await
        .query_one(
            "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
            &[&CONFIGURED_ROLE.0],
        )
        .await
        .unwrap()
        .get(0);
    assert!(verifier.starts_with("SCRAM-SHA-256$"));
    let pki = pki();
    Proxy::start(&format!(
        r#"
[server]
listen = "LISTEN"
metrics_listen = ""
{server}

[server.tls]
cert = "{cert}"
key = "{key}"
mode = "allow"
{tls}

[[users]]
name = "pgrelay_auth"
password = "pgrelay_auth"

[[users]]
name = "postgres"
password = "postgres"

[[users]]
name = "{conf}"
password = "{verifier}"

[databases.app]
primary = "{primary}"
auth_user = "pgrelay_auth"
auth_query = "SELECT usename, passwd FROM pgrelay.user_lookup($1)"
auth_cache_ttl = "1s"

[databases.app_su]
dbname = "app"
primary = "{primary}"
auth_user = "postgres"
{databases}
"#,
        cert = pki.cert.display(),
        key = pki.key.display(),
        conf = CONFIGURED_ROLE.0,
    ))
    .await
}

fn url(proxy: &Proxy, user: &str, password: &str, db: &str) -> String {
    format!(
        "host=127.0.0.1 port={} user={user} password='{password}' dbname={db} connect_timeout=10",
        proxy.port()
    )
}

/// The role the server connection serving this client logged in as, per pg_stat_activity.
async fn server_role(client: &tokio_postgres::Client) -> String {
    client
        .query_one(
            "SELECT usename::text FROM pg_stat_activity WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

async fn login_error(proxy: &Proxy, user: &str, password: &str, db: &str) -> (String, String) {
    match common::connect(&url(proxy, user, password, db)).await {
        Ok(_) => panic!("{user} logged in with {password:?}"),
        Err(error) => (sqlstate(&error), common::message(&error)),
    }
}

#[tokio::test]
async fn scram_role_from_postgres_logs_in_with_pass_through() {
    let proxy = start_proxy().await;
    let (user, password) = SCRAM_ROLE;
    let client = common::connect(&url(&proxy, user, password, "app")).await.unwrap();
    assert_eq!(server_role(&client).await, user);
    // Transaction mode: a second client in a transaction makes the pool open another
    // connection, with the same keys.
    let other = common::connect(&url(&proxy, user, password, "app")).await.unwrap();
    client.batch_execute("BEGIN; SELECT 1").await.unwrap();
    assert_eq!(server_role(&other).await, user);
    // Two server connections of this proxy, not any two in the cluster: the backends differ.
    let ours: i32 = client.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    let theirs: i32 = other.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    assert_ne!(ours, theirs);
    client.batch_execute("COMMIT").await.unwrap();

    let (code, message) = login_error(&proxy, user, "wrong", "app").await;
    assert_eq!(
        (code.as_str(), message.as_str()),
        ("28P01", "password authentication failed for user \"aq_scram\"")
    );
}

/// A user found by auth_query has no `[[users]]` entry of its own: `[pool]`'s
/// max_user_connections applies to its pools and SHOW USERS shows it.
#[tokio::test]
async fn a_user_found_by_auth_query_has_the_pool_max_user_connections() {
    let proxy = start_proxy_full(
        "admin_users = [\"postgres\"]",
        "",
        "\n[pool]\nmax_user_connections = 4\n",
    )
    .await;
    let (user, password) = SCRAM_ROLE;
    let client = common::connect(&url(&proxy, user, password, "app")).await.unwrap();
    assert_eq!(server_role(&client).await, user);
    let app = proxy.running().shared().snapshot().database("app").unwrap();
    let (_, pools) = app.all_pools().into_iter().find(|(name, _)| name == user).unwrap();
    assert_eq!(pools.hosts[0].limits().max_user_connections, Some(4));
    let console = common::connect(&url(&proxy, "postgres", "postgres", "pgrelay"))
        .await
        .unwrap();
    let row = console
        .simple_query("SHOW USERS")
        .await
        .unwrap()
        .into_iter()
        .find_map(|message| match message {
            tokio_postgres::SimpleQueryMessage::Row(row) if row.get(0) == Some(user) => {
                Some((row.get(1).map(str::to_owned), row.get(2).map(str::to_owned)))
            }
            _ => None,
        });
    assert_eq!(row, Some((Some("4".to_owned()), Some("1".to_owned()))));
}

#[tokio::test]
async fn md5_role_and_unknown_users() {
    let proxy = start_proxy().await;
    let (user, password) = MD5_ROLE;
    for db in ["app", "app_su"] {
        let client = common::connect(&url(&proxy, user, password, db)).await.unwrap();
        assert_eq!(server_role(&client).await, user, "{db}");
        assert_eq!(login_error(&proxy, user, "wrong", db).await.0, "28P01", "{db}");
    }
    // The default query (pg_authid, as a superuser) finds SCRAM roles too.
    let client = common::connect(&url(&proxy, SCRAM_ROLE.0, SCRAM_ROLE.1, "app_su"))
        .await
        .unwrap();
    assert_eq!(server_role(&client).await, SCRAM_ROLE.0);
    // An unknown user is told what a wrong password is told, nothing more.
    for db in ["app", "app_su", "no_such_db"] {
        let (code, message) = login_error(&proxy, "nobody_here", "x", db).await;
        assert_eq!(code, "28P01", "{db}");
        assert_eq!(message, "password authentication failed for user \"nobody_here\"");
    }
    // Two wrong passwords and three unknown users, all counted as reason="password".
    assert_eq!(login_refusals(&proxy, "password"), 5.0);
}

/// md5 between client and pgrelay, inside TLS: the exchange byte by byte, then psql.
#[tokio::test]
async fn md5_client_authentication_over_tls() {
    let proxy = start_proxy().await;
    let (user, password) = MD5_ROLE;
    for (attempt, expected) in [(password, None), ("wrong", Some("28P01"))] {
        let mut tls = tls_connect(&proxy).await;
        send(&mut tls, &startup(user)).await;
        // The stored secret is an md5 hash: pgrelay asks for md5 (code 5) with a salt.
        let (tag, body) = read_message(&mut tls).await;
        assert_eq!((tag, &body[..4]), (b'R', &5i32.to_be_bytes()[..]));
        let salt: [u8; 4] = body[4..8].try_into().unwrap();
        let response = postgres_protocol::authentication::md5_hash(user.as_bytes(), attempt.as_bytes(), salt);
        let mut out = BytesMut::new();
        frontend::password_message(response.as_bytes(), &mut out).unwrap();
        send(&mut tls, &out).await;
        match (read_message(&mut tls).await, expected) {
            ((b'R', body), None) => assert_eq!(body, 0i32.to_be_bytes()),
            ((b'E', body), Some(code)) => {
                assert_eq!(field(&body, b'C'), code);
                assert_eq!(
                    field(&body, b'M'),
                    format!("password authentication failed for user \"{user}\"")
                );
            }
            ((tag, body), _) => panic!(
                "{attempt:?}: unexpected {} {}",
                char::from(tag),
                String::from_utf8_lossy(&body)
            ),
        }
    }
    let conninfo = format!(
        "host=127.0.0.1 port={} user={user} dbname=app sslmode=require",
        proxy.port()
    );
    let (ok, stdout, stderr) = psql(&conninfo, password, "\\conninfo").await;
    assert!(ok, "{stderr}");
    assert!(stdout.contains("SSL connection"), "{stdout}");
    let (ok, stdout, stderr) = psql(&conninfo, password, "SELECT current_user").await;
    assert!(ok, "{stderr}");
    assert_eq!(stdout.trim(), user);
}

/// An expired role and a NOLOGIN role, found through auth_query (the documented function and
/// the default query alike), compared with what PostgreSQL itself answers.
#[tokio::test]
async fn expired_and_nologin_roles_are_refused() {
    let proxy = start_proxy().await;
    let primary = cluster().primary().addr();
    let direct_error = |user: &str, password: &str| {
        let url = format!(
            "host=127.0.0.1 port={} user={user} password='{password}' dbname=app",
            primary.rsplit_once(':').unwrap().1
        );
        async move {
            match common::connect(&url).await {
                Ok(_) => panic!("PostgreSQL let {url} in"),
                Err(error) => (sqlstate(&error), common::message(&error)),
            }
        }
    };
    let failed = |user: &str| {
        (
            "28P01".to_owned(),
            format!("password authentication failed for user \"{user}\""),
        )
    };

    // VALID UNTIL in the past: PostgreSQL refuses the right password as a wrong one...
    let (user, password) = EXPIRED_ROLE;
    assert_eq!(direct_error(user, password).await, failed(user));
    // ...and so does pgrelay, for the right password and a wrong one.
    for db in ["app", "app_su"] {
        assert_eq!(login_error(&proxy, user, password, db).await, failed(user), "{db}");
        assert_eq!(login_error(&proxy, user, "wrong", db).await, failed(user), "{db}");
    }

    // NOLOGIN: PostgreSQL checks the password first; a wrong one is 28P01, the right one
    // 28000.
    let (user, password) = NOLOGIN_ROLE;
    assert_eq!(direct_error(user, "wrong").await, failed(user));
    assert_eq!(
        direct_error(user, password).await,
        (
            "28000".to_owned(),
            format!("role \"{user}\" is not permitted to log in")
        )
    );
    // The lookup (like PgBouncer's default auth_query) does not return roles without LOGIN:
    // pgrelay cannot check their password and answers as for an unknown user, whatever the
    // password. Nobody gets in, and the answer tells nothing the wrong-password one does not.
    for db in ["app", "app_su"] {
        assert_eq!(login_error(&proxy, user, password, db).await, failed(user), "{db}");
        assert_eq!(login_error(&proxy, user, "wrong", db).await, failed(user), "{db}");
    }
}

#[tokio::test]
async fn configured_verifier_logs_in_with_pass_through() {
    let proxy = start_proxy().await;
    let (user, password) = CONFIGURED_ROLE;
    let client = common::connect(&url(&proxy, user, password, "app")).await.unwrap();
    assert_eq!(server_role(&client).await, user);
    assert_eq!(login_error(&proxy, user, "wrong", "app").await.0, "28P01");
}

#[tokio::test]
async fn changed_password_works_once_the_cache_expires() {
    let proxy = start_proxy().await;
    let client = common::connect(&url(&proxy, ROTATED_ROLE, "old password", "app"))
        .await
        .unwrap();
    assert_eq!(server_role(&client).await, ROTATED_ROLE);
    drop(client);
    let admin = direct(&cluster().primary().addr(), "postgres").await;
    admin
        .batch_execute(&format!("ALTER ROLE {ROTATED_ROLE} PASSWORD 'new password'"))
        .await
        .unwrap();
    wait_until("the new password works", TIMEOUT, || async {
        common::connect(&url(&proxy, ROTATED_ROLE, "new password", "app"))
            .await
            .is_ok()
    })
    .await;
    assert_eq!(
        login_error(&proxy, ROTATED_ROLE, "old password", "app").await.0,
        "28P01"
    );
    // Server connections opened from now on log in with the new password's keys.
    admin
        .batch_execute(&format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{ROTATED_ROLE}'"
        ))
        .await
        .unwrap();
    wait_until("a fresh server login as the role", TIMEOUT, || async {
        match common::connect(&url(&proxy, ROTATED_ROLE, "new password", "app")).await {
            Ok(client) => client
                .query_one(
                    "SELECT usename::text FROM pg_stat_activity WHERE pid = pg_backend_pid()",
                    &[],
                )
                .await
                .is_ok_and(|row| row.get::<_, String>(0) == ROTATED_ROLE),
            Err(_) => false,
        }
    })
    .await;
}

/// psql (libpq) over TLS, requiring channel binding.
#[tokio::test]
async fn psql_with_channel_binding_require() {
    let proxy = start_proxy().await;
    let (user, password) = SCRAM_ROLE;
    let conninfo = format!(
        "host=127.0.0.1 port={} user={user} dbname=app sslmode=require channel_binding=require",
        proxy.port()
    );
    let sql = "SELECT current_user, (SELECT usename FROM pg_stat_activity WHERE pid = pg_backend_pid())";
    let (ok, stdout, stderr) = psql(&conninfo, password, sql).await;
    assert!(ok, "psql failed: {stderr}");
    assert_eq!(stdout.trim(), "aq_scram|aq_scram");
    let (ok, _, stderr) = psql(&conninfo, "wrong", sql).await;
    assert!(!ok);
    assert!(
        stderr.contains("password authentication failed for user \"aq_scram\""),
        "{stderr}"
    );
    // Without TLS there is nothing to bind to: libpq refuses to go on.
    let plain = conninfo.replace("sslmode=require", "sslmode=disable");
    let (ok, _, stderr) = psql(&plain, password, sql).await;
    assert!(!ok);
    assert!(stderr.contains("channel binding"), "{stderr}");
}

async fn psql(conninfo: &str, password: &str, sql: &str) -> (bool, String, String) {
    let program = cluster().bin_path("psql").unwrap();
    let args = vec![
        "-X".to_owned(),
        "-A".to_owned(),
        "-t".to_owned(),
        "-c".to_owned(),
        sql.to_owned(),
        conninfo.to_owned(),
    ];
    let password = password.to_owned();
    tokio::task::spawn_blocking(move || {
        let output = std::process::Command::new(program)
            .args(&args)
            .env("PGPASSWORD", password)
            .env("PGCONNECT_TIMEOUT", "10")
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

/// What the AuthenticationSASL message lists, and the binding checks, byte by byte.
#[tokio::test]
async fn plus_is_offered_on_tls_only_and_checks_the_binding() {
    let proxy = start_proxy().await;
    let (user, password) = SCRAM_ROLE;

    let mut plain = TcpStream::connect(proxy.addr).await.unwrap();
    send(&mut plain, &startup(user)).await;
    assert_eq!(mechanisms(&read_message(&mut plain).await), ["SCRAM-SHA-256"]);

    let mut tls = tls_connect(&proxy).await;
    send(&mut tls, &startup(user)).await;
    assert_eq!(
        mechanisms(&read_message(&mut tls).await),
        ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]
    );

    // Bound to our certificate (signed with ECDSA-SHA256: its SHA-256), the login succeeds.
    let cert = CertificateDer::from_pem_file(&pki().cert).unwrap();
    let ours = Sha256::digest(cert.as_ref()).to_vec();
    assert_eq!(plus_login(&proxy, user, password, ours).await, Ok(()));
    // Bound to another certificate, as through a man in the middle: PostgreSQL's answer.
    let theirs = Sha256::digest(b"someone else's certificate").to_vec();
    assert_eq!(
        plus_login(&proxy, user, password, theirs.clone()).await,
        Err(("28000".to_owned(), "SCRAM channel binding check failed".to_owned()))
    );
    // Unknown users get the same answer.
    assert_eq!(
        plus_login(&proxy, "nobody_here", password, theirs).await,
        Err(("28000".to_owned(), "SCRAM channel binding check failed".to_owned()))
    );
    assert_eq!(login_refusals(&proxy, "channel_binding"), 2.0);
    assert_eq!(login_refusals(&proxy, "password"), 0.0);
}

/// A SCRAM-SHA-256-PLUS login over TLS bound to `binding`: Ok, or (SQLSTATE, message).
async fn plus_login(proxy: &Proxy, user: &str, password: &str, binding: Vec<u8>) -> Result<(), (String, String)> {
    let mut tls = tls_connect(proxy).await;
    send(&mut tls, &startup(user)).await;
    assert!(mechanisms(&read_message(&mut tls).await).contains(&"SCRAM-SHA-256-PLUS".to_owned()));
    let mut scram = ScramSha256::new(password.as_bytes(), ChannelBinding::tls_server_end_point(binding));
    let mut out = BytesMut::new();
    frontend::sasl_initial_response("SCRAM-SHA-256-PLUS", scram.message(), &mut out).unwrap();
    send(&mut tls, &out).await;
    let (tag, body) = read_message(&mut tls).await;
    assert_eq!((tag, &body[..4]), (b'R', &11i32.to_be_bytes()[..]));
    scram.update(&body[4..]).unwrap();
    out.clear();
    frontend::sasl_response(scram.message(), &mut out).unwrap();
    send(&mut tls, &out).await;
    match read_message(&mut tls).await {
        (b'R', body) if body[..4] == 12i32.to_be_bytes() => {
            scram.finish(&body[4..]).unwrap();
            assert_eq!(read_message(&mut tls).await, (b'R', 0i32.to_be_bytes().to_vec()));
            Ok(())
        }
        (b'E', body) => Err((field(&body, b'C'), field(&body, b'M'))),
        (tag, _) => panic!("unexpected message {}", char::from(tag)),
    }
}

async fn tls_connect(proxy: &Proxy) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut tcp = TcpStream::connect(proxy.addr).await.unwrap();
    tcp.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).await.unwrap();
    let mut answer = [0u8];
    tcp.read_exact(&mut answer).await.unwrap();
    assert_eq!(answer[0], b'S');
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from_pem_file(&pki().ca).unwrap()).unwrap();
    let config = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap()
}

fn startup(user: &str) -> Vec<u8> {
    let mut body = 196_608u32.to_be_bytes().to_vec();
    body.extend_from_slice(format!("user\0{user}\0database\0app\0\0").as_bytes());
    let mut message = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    message.extend_from_slice(&body);
    message
}

async fn send(stream: &mut (impl AsyncWrite + Unpin), bytes: &[u8]) {
    tokio::time::timeout(TIMEOUT, async {
        stream.write_all(bytes).await.unwrap();
        stream.flush().await.unwrap();
    })
    .await
    .unwrap();
}

async fn read_message(stream: &mut (impl AsyncRead + Unpin)) -> (u8, Vec<u8>) {
    tokio::time::timeout(TIMEOUT, async {
        let mut header = [0u8; 5];
        stream.read_exact(&mut header).await.unwrap();
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        let mut body = vec![0u8; len - 4];
        stream.read_exact(&mut body).await.unwrap();
        (header[0], body)
    })
    .await
    .unwrap()
}

/// The mechanism names of an AuthenticationSASL message.
fn mechanisms((tag, body): &(u8, Vec<u8>)) -> Vec<String> {
    assert_eq!((*tag, &body[..4]), (b'R', &10i32.to_be_bytes()[..]));
    body[4..]
        .split(|&b| b == 0)
        .filter(|name| !name.is_empty())
        .map(|name| String::from_utf8(name.to_vec()).unwrap())
        .collect()
}

fn field(body: &[u8], code: u8) -> String {
    common::raw::error_field(body, code)
        .map(|value| String::from_utf8(value).unwrap())
        .unwrap_or_default()
}

/// A login dropped by client_login_timeout while its lookup waits for PostgreSQL must not
/// leave the reply behind for the next lookup: the next user gets its own answer.
#[tokio::test]
async fn an_interrupted_lookup_does_not_shift_later_ones() {
    let slow = format!(
        r#"
[databases.slow]
dbname = "app"
primary = "{primary}"
auth_user = "pgrelay_auth"
auth_cache_ttl = "1s"
auth_query = "SELECT l.usename, l.passwd FROM pgrelay.user_lookup($1) l, pg_catalog.pg_sleep(CASE WHEN $1 = '{md5}' THEN 1.5 ELSE 0 END)"
"#,
        primary = cluster().primary().addr(),
        md5 = MD5_ROLE.0,
    );
    let proxy = start_proxy_full("client_login_timeout = \"1s\"", "", &slow).await;
    // The md5 role's lookup sleeps past the login timeout: its login is dropped mid-query.
    let started = std::time::Instant::now();
    assert!(
        common::connect(&url(&proxy, MD5_ROLE.0, MD5_ROLE.1, "slow"))
            .await
            .is_err()
    );
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    // Before the sleeping reply arrives, another user asks on the same lookup.
    let (user, password) = SCRAM_ROLE;
    let client = common::connect(&url(&proxy, user, password, "slow")).await.unwrap();
    assert_eq!(server_role(&client).await, user);
    // And the next one after it too.
    let configured = common::connect(&url(&proxy, ROTATED_ROLE, "x", "slow")).await;
    assert_eq!(sqlstate(&configured.err().unwrap()), "28P01");
    let client = common::connect(&url(&proxy, user, password, "slow")).await.unwrap();
    assert_eq!(server_role(&client).await, user);
}

/// Side connections of the lookup in `app` logged in as `role`.
async fn side_connections(role: &str) -> i64 {
    direct(&cluster().primary().addr(), "postgres")
        .await
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND application_name = $2",
            &[&role, &pgrelay::runtime::LOOKUP_APPLICATION_NAME],
        )
        .await
        .unwrap()
        .get(0)
}

/// Every database made from "*" shares one lookup in `auth_dbname`: database names a client
/// makes up open no side connection each, answer like real ones, and a side connection the
/// server closed is replaced without failing the login that finds it closed.
#[tokio::test]
async fn star_databases_share_one_lookup_in_auth_dbname() {
    let primary = cluster().primary().addr();
    let proxy = Proxy::start(&format!(
        r#"
[server]
listen = "LISTEN"
metrics_listen = ""

[[users]]
name = "pgrelay_star"
password = "pgrelay_star"

[databases."*"]
primary = "{primary}"
auth_user = "pgrelay_star"
auth_dbname = "app"
auth_query = "SELECT usename, passwd FROM pgrelay.user_lookup($1)"
"#
    ))
    .await;
    for n in 0..4 {
        let (code, message) = login_error(&proxy, &format!("nobody_{n}"), "x", &format!("made_up_{n}")).await;
        assert_eq!(code, "28P01", "{message}");
    }
    let (user, password) = SCRAM_ROLE;
    let client = common::connect(&url(&proxy, user, password, "app")).await.unwrap();
    assert_eq!(server_role(&client).await, user);
    assert_eq!(side_connections("pgrelay_star").await, 1);
    // Only past the password is a database that does not exist told apart, in the
    // server's words.
    let (code, message) = login_error(&proxy, user, password, "made_up_0").await;
    assert_eq!(code, "08006", "{message}");
    assert!(message.ends_with("database \"made_up_0\" does not exist"), "{message}");

    // The server ends the parked side connection; the next lookup reconnects.
    direct(&primary, "postgres")
        .await
        .batch_execute(&format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'pgrelay_star' \
             AND application_name = '{}'",
            pgrelay::runtime::LOOKUP_APPLICATION_NAME
        ))
        .await
        .unwrap();
    wait_until("the side connection is gone", TIMEOUT, || async {
        side_connections("pgrelay_star").await == 0
    })
    .await;
    let (user, password) = MD5_ROLE;
    let client = common::connect(&url(&proxy, user, password, "app")).await.unwrap();
    assert_eq!(server_role(&client).await, user);
    assert_eq!(side_connections("pgrelay_star").await, 1);

    // A reload that changes nothing of the lookup keeps its side connection (and cache): the
    // next lookup runs on the same backend.
    let before = side_pids("pgrelay_star").await;
    {
        let shared = proxy.running().shared();
        let old = shared.snapshot();
        let mut next = pgrelay::runtime::Snapshot::build((*old.config).clone(), &shared.observers()).unwrap();
        next.carry_over(&old);
        next.start_monitors();
        shared.swap(next);
    }
    let (user, password) = (ROTATED_ROLE, "wrong");
    assert_eq!(login_error(&proxy, user, password, "app").await.0, "28P01");
    assert_eq!(side_pids("pgrelay_star").await, before);
}

/// Backend pids of the lookup side connections logged in as `role`.
async fn side_pids(role: &str) -> Vec<i32> {
    direct(&cluster().primary().addr(), "postgres")
        .await
        .query(
            "SELECT pid FROM pg_stat_activity WHERE usename = $1 AND application_name = $2 ORDER BY pid",
            &[&role, &pgrelay::runtime::LOOKUP_APPLICATION_NAME],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// `[server.tls] channel_binding`: "offer" answers a client that could bind but was told it
/// cannot (`y`) as PostgreSQL does; "disable" offers SCRAM-SHA-256 only, takes `y`, and
/// refuses -PLUS as a mechanism it never offered.
#[tokio::test]
async fn channel_binding_offer_and_disable() {
    let (user, password) = SCRAM_ROLE;
    let offering = start_proxy().await;
    let (code, message) = scram_login(
        &offering,
        user,
        password,
        "SCRAM-SHA-256",
        ChannelBinding::unrequested(),
    )
    .await
    .unwrap_err();
    assert_eq!(code, "08P01");
    assert!(
        message.starts_with("SCRAM channel binding negotiation error"),
        "{message}"
    );
    let (code, message) = scram_login(
        &offering,
        user,
        password,
        "SCRAM-SHA-256-PLUS",
        ChannelBinding::unsupported(),
    )
    .await
    .unwrap_err();
    assert_eq!(code, "08P01");
    assert!(message.contains("does not include channel binding data"), "{message}");

    let disabled = start_proxy_with("", "channel_binding = \"disable\"").await;
    let mut tls = tls_connect(&disabled).await;
    send(&mut tls, &startup(user)).await;
    assert_eq!(mechanisms(&read_message(&mut tls).await), ["SCRAM-SHA-256"]);
    assert_eq!(
        scram_login(
            &disabled,
            user,
            password,
            "SCRAM-SHA-256",
            ChannelBinding::unrequested()
        )
        .await,
        Ok(())
    );
    let cert = CertificateDer::from_pem_file(&pki().cert).unwrap();
    let ours = Sha256::digest(cert.as_ref()).to_vec();
    assert_eq!(
        scram_login(
            &disabled,
            user,
            password,
            "SCRAM-SHA-256-PLUS",
            ChannelBinding::tls_server_end_point(ours)
        )
        .await,
        Err((
            "08P01".to_owned(),
            "client selected an invalid SASL authentication mechanism \"SCRAM-SHA-256-PLUS\"".to_owned()
        ))
    );
    // libpq: `prefer` logs in without binding, `require` refuses to go on.
    let conninfo = format!(
        "host=127.0.0.1 port={} user={user} dbname=app sslmode=require channel_binding=prefer",
        disabled.port()
    );
    let (ok, stdout, stderr) = psql(&conninfo, password, "SELECT current_user").await;
    assert!(ok, "{stderr}");
    assert_eq!(stdout.trim(), user);
    let (ok, _, stderr) = psql(&conninfo.replace("=prefer", "=require"), password, "SELECT 1").await;
    assert!(!ok);
    assert!(stderr.contains("channel binding"), "{stderr}");
}

/// A SCRAM login over TLS with `mechanism` and `binding`: Ok, or (SQLSTATE, message) of the
/// ErrorResponse at whichever step it came.
async fn scram_login(
    proxy: &Proxy,
    user: &str,
    password: &str,
    mechanism: &str,
    binding: ChannelBinding,
) -> Result<(), (String, String)> {
    let mut tls = tls_connect(proxy).await;
    send(&mut tls, &startup(user)).await;
    read_message(&mut tls).await;
    let mut scram = ScramSha256::new(password.as_bytes(), binding);
    let mut out = BytesMut::new();
    frontend::sasl_initial_response(mechanism, scram.message(), &mut out).unwrap();
    send(&mut tls, &out).await;
    let body = match read_message(&mut tls).await {
        (b'R', body) if body[..4] == 11i32.to_be_bytes() => body,
        (b'E', body) => return Err((field(&body, b'C'), field(&body, b'M'))),
        (tag, _) => panic!("unexpected message {}", char::from(tag)),
    };
    scram.update(&body[4..]).unwrap();
    out.clear();
    frontend::sasl_response(scram.message(), &mut out).unwrap();
    send(&mut tls, &out).await;
    match read_message(&mut tls).await {
        (b'R', body) if body[..4] == 12i32.to_be_bytes() => {
            scram.finish(&body[4..]).unwrap();
            Ok(())
        }
        (b'E', body) => Err((field(&body, b'C'), field(&body, b'M'))),
        (tag, _) => panic!("unexpected message {}", char::from(tag)),
    }
}
