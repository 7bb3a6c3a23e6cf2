//! Client address rules end to end (`[server] hba` inline and `hba_file`): a client outside
//! the rules is refused with 28000 in PostgreSQL's words, a `reject` rule refuses, the
//! rule's method decides the authentication (`password` asks for the password in clear), a
//! `hostssl` rule refuses plaintext and admits TLS, and a reloaded hba file takes effect for
//! new logins without dropping connected clients; an invalid one keeps the rules in force.
//!
//! Clients bind their sockets to 127.0.0.x to come from distinct addresses.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is a failed test

mod common;

use std::path::Path;
use std::sync::Arc;

use common::{Proxy, config_for, connect_from, first_value, login_refusals, message, shared_cluster, sqlstate};
use rcgen::{CertificateParams, DnType, KeyPair};
use tokio_postgres::Client;

/// `config_for` with `extra` lines in `[server]`.
fn config(extra: &str) -> String {
    config_for(shared_cluster(), "size = 4").replace(
        "client_login_timeout = \"5s\"",
        &format!("client_login_timeout = \"5s\"\n{extra}"),
    )
}

async fn select_one(client: &Client) -> String {
    first_value(&client.simple_query("SELECT 1").await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addresses_outside_the_rules_are_refused_and_the_rule_picks_the_method() {
    let proxy = Proxy::start(&config(
        r#"hba = [
    "host all app 127.0.0.1/32 scram-sha-256",
    "host all app_md5,app 127.0.0.3 255.255.255.255 password",
    "host all all 127.0.0.4/32 reject",
    "host \"app\" app_trust 127.0.0.0/8 trust",
]"#,
    ))
    .await;
    let app = connect_from(proxy.addr, "127.0.0.1", "app", "app", "app")
        .await
        .unwrap();
    assert_eq!(select_one(&app).await, "1");

    let error = connect_from(proxy.addr, "127.0.0.2", "app", "app", "app")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&error), "28000", "{error:?}");
    assert_eq!(
        message(&error),
        "no pg_hba.conf entry for host \"127.0.0.2\", user \"app\", database \"app\", no encryption"
    );
    let error = connect_from(proxy.addr, "127.0.0.4", "app", "app", "app")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&error), "28000");
    assert_eq!(
        message(&error),
        "pg_hba.conf rejects connection for host \"127.0.0.4\", user \"app\", database \"app\", no encryption"
    );

    // `password`: the client is asked for its password in clear, checked against the
    // user's secret whatever its form (a SCRAM verifier made from "app", an md5 user).
    let clear = connect_from(proxy.addr, "127.0.0.3", "app", "app", "app")
        .await
        .unwrap();
    assert_eq!(select_one(&clear).await, "1");
    let md5 = connect_from(proxy.addr, "127.0.0.3", "app_md5", "app_md5", "app")
        .await
        .unwrap();
    assert_eq!(select_one(&md5).await, "1");
    let wrong = connect_from(proxy.addr, "127.0.0.3", "app", "nope", "app")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&wrong), "28P01");

    // `trust` lets a user in without a password, to the listed database only.
    let trusted = connect_from(proxy.addr, "127.0.0.9", "app_trust", "", "app")
        .await
        .unwrap();
    assert_eq!(select_one(&trusted).await, "1");
    let other = connect_from(proxy.addr, "127.0.0.9", "app_trust", "", "other")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&other), "28000");

    assert_eq!(login_refusals(&proxy, "hba"), 3.0);
    assert_eq!(login_refusals(&proxy, "password"), 1.0);
    proxy.shutdown().await;
}

/// A certificate for 127.0.0.1, self-signed, and a client config that trusts it.
fn tls_files(dir: &Path) -> (String, tokio_rustls::rustls::ClientConfig) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, "127.0.0.1");
    let cert = params.self_signed(&key).unwrap();
    std::fs::write(dir.join("server.crt"), cert.pem()).unwrap();
    std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    roots.add(cert.der().clone()).unwrap();
    let client = tokio_rustls::rustls::ClientConfig::builder_with_provider(Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let server = format!(
        "[server.tls]\ncert = \"{}\"\nkey = \"{}\"\nmode = \"allow\"\n",
        dir.join("server.crt").display(),
        dir.join("server.key").display()
    );
    (server, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostssl_rule_refuses_plaintext_and_admits_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (tls_section, client_tls) = tls_files(dir.path());
    let text = config("hba = [\"hostssl all all 127.0.0.1/32 scram-sha-256\"]")
        .replace("\n[pool]", &format!("\n{tls_section}\n[pool]"));
    let proxy = Proxy::start(&text).await;
    let plain = common::connect(&format!("{} sslmode=disable", proxy.url("app", "app", "app")))
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&plain), "28000");
    assert_eq!(
        message(&plain),
        "no pg_hba.conf entry for host \"127.0.0.1\", user \"app\", database \"app\", no encryption"
    );
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new(client_tls);
    let (client, connection) =
        tokio_postgres::connect(&format!("{} sslmode=require", proxy.url("app", "app", "app")), tls)
            .await
            .unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    assert_eq!(select_one(&client).await, "1");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_hba_file_applies_to_new_logins_and_keeps_connected_clients() {
    let dir = tempfile::tempdir().unwrap();
    let hba = dir.path().join("pgrelay_hba.conf");
    std::fs::write(
        &hba,
        "# only the first address\nhost all all 127.0.0.1/32 scram-sha-256\n",
    )
    .unwrap();
    let text = config(&format!("hba_file = \"{}\"", hba.display()));
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let path = dir.path().join("pgrelay.toml");
    std::fs::write(&path, text.replace("LISTEN", &format!("127.0.0.1:{port}"))).unwrap();
    let running = pgrelay::app::start_with_file(pgrelay::config::load(&path).unwrap(), Some(path.clone()))
        .await
        .unwrap();
    let addr = running.local_addr();

    let connected = connect_from(addr, "127.0.0.1", "app", "app", "app").await.unwrap();
    assert_eq!(select_one(&connected).await, "1");
    let refused = connect_from(addr, "127.0.0.2", "app", "app", "app").await.unwrap_err();
    assert_eq!(sqlstate(&refused), "28000");

    std::fs::write(&hba, "host all all 127.0.0.2/32 scram-sha-256\n").unwrap();
    pgrelay::reload::reload(running.shared()).unwrap();
    let now_allowed = connect_from(addr, "127.0.0.2", "app", "app", "app").await.unwrap();
    assert_eq!(select_one(&now_allowed).await, "1");
    let now_refused = connect_from(addr, "127.0.0.1", "app", "app", "app").await.unwrap_err();
    assert_eq!(
        message(&now_refused),
        "no pg_hba.conf entry for host \"127.0.0.1\", user \"app\", database \"app\", no encryption"
    );
    // The client that logged in under the old rules stays connected and served.
    assert_eq!(select_one(&connected).await, "1");

    // An invalid file fails the reload with its line, and the rules in force stay.
    std::fs::write(
        &hba,
        "host all all 127.0.0.1/32 scram-sha-256\nhost all all 127.0.0.1 md5\n",
    )
    .unwrap();
    let error = pgrelay::reload::reload(running.shared()).unwrap_err().to_string();
    assert!(
        error.contains("line 2: specify an address range in CIDR notation"),
        "{error}"
    );
    assert!(connect_from(addr, "127.0.0.1", "app", "app", "app").await.is_err());
    assert!(connect_from(addr, "127.0.0.2", "app", "app", "app").await.is_ok());
    // So does an unreadable one.
    std::fs::remove_file(&hba).unwrap();
    assert!(pgrelay::reload::reload(running.shared()).is_err());
    assert!(connect_from(addr, "127.0.0.2", "app", "app", "app").await.is_ok());
    assert_eq!(select_one(&connected).await, "1");
    running.shutdown().await;
}
