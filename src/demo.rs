//! `pgrelay demo`: a throwaway local primary and streaming replica started from the
//! PostgreSQL binaries on this machine, pgrelay in front of them, and instructions for
//! connecting. Ctrl-C stops and removes everything.

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener};

use crate::app::{self, AppError};
use crate::config::{self, ConfigErrors};
use crate::localpg::{self, ClusterOptions, LocalCluster};

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("could not start the local PostgreSQL cluster: {0}")]
    Cluster(#[from] localpg::Error),
    #[error("the demo configuration is invalid (a bug): {0}")]
    Config(#[from] ConfigErrors),
    #[error(transparent)]
    App(#[from] AppError),
    #[error("a background task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("cannot write the demo configuration: {0}")]
    Io(#[from] std::io::Error),
}

/// Runs the demo until Ctrl-C (or SIGTERM).
pub async fn run(port: Option<u16>) -> Result<(), DemoError> {
    println!("Starting a throwaway PostgreSQL primary and streaming replica (this takes a few seconds)...");
    let cluster = tokio::task::spawn_blocking(|| LocalCluster::new(ClusterOptions::default())).await??;
    let port = port.unwrap_or_else(|| free_port_or_any(6432));
    let metrics_port = free_port_or_any(9930);
    let text = demo_config(&cluster, port, metrics_port);
    let config_path = cluster.dir().join("pgrelay.toml");
    std::fs::write(&config_path, &text)?;
    let config = config::parse(&text)?;
    let running = app::start(config).await?;
    let addr = running.local_addr();
    println!();
    println!("pgrelay is running on {addr} in front of:");
    println!("  primary  {}", cluster.primary().addr());
    for replica in cluster.replicas() {
        println!("  replica  {}", replica.addr());
    }
    println!();
    println!("Connect with:");
    println!("  psql \"postgres://app:app@{}:{}/app\"", addr.ip(), addr.port());
    println!("Admin console:");
    println!(
        "  psql \"postgres://admin:admin@{}:{}/pgrelay\"   (SHOW POOLS, SHOW HELP)",
        addr.ip(),
        addr.port()
    );
    if let Some(metrics) = running.metrics_addr() {
        println!("Metrics:");
        println!("  http://{metrics}/metrics");
    }
    println!("The configuration in use is {}", config_path.display());
    println!("Press Ctrl-C to stop pgrelay and remove the cluster.");
    wait_for_ctrl_c().await;
    println!("Stopping...");
    running.shutdown().await;
    tokio::task::spawn_blocking(move || cluster.shutdown()).await??;
    println!("Stopped; the cluster's files are removed.");
    Ok(())
}

/// The demo's configuration: database `app` on the cluster's primary and replicas, user
/// `app`/`app`, admin `admin`/`admin`.
fn demo_config(cluster: &LocalCluster, port: u16, metrics_port: u16) -> String {
    let replicas: Vec<String> = cluster
        .replicas()
        .iter()
        .map(|replica| format!("\"{}\"", replica.addr()))
        .collect();
    let mut text = String::new();
    let _ = writeln!(
        text,
        "[server]\nlisten = \"127.0.0.1:{port}\"\nmetrics_listen = \"127.0.0.1:{metrics_port}\"\nadmin_users = [\"admin\"]\n"
    );
    let _ = writeln!(text, "[pool]\nmode = \"transaction\"\nsize = 10\n");
    let _ = writeln!(text, "[[users]]\nname = \"app\"\npassword = \"app\"\n");
    let _ = writeln!(text, "[[users]]\nname = \"admin\"\npassword = \"admin\"\n");
    let _ = writeln!(
        text,
        "[databases.app]\nprimary = \"{}\"\nreplicas = [{}]",
        cluster.primary().addr(),
        replicas.join(", ")
    );
    text
}

/// `preferred` if nothing listens there, else any free port.
fn free_port_or_any(preferred: u16) -> u16 {
    let bound = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], preferred)))
        .or_else(|_| TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))));
    match bound.and_then(|listener| listener.local_addr()) {
        Ok(addr) => addr.port(),
        Err(_) => 0,
    }
}

async fn wait_for_ctrl_c() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut terminate) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
