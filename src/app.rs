//! The composition root: builds the running state from a config, binds the listener,
//! accepts clients, and owns shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

use crate::config::Config;
use crate::net::{self, Listener};
use crate::runtime::{BuildError, Shared, Snapshot};
use crate::session;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("invalid listen address {addr}: {reason}")]
    Address { addr: String, reason: String },
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: String, source: std::io::Error },
}

/// A running pgrelay: its address and the handle to stop it.
#[derive(Debug)]
pub struct Running {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Running {
    /// The address clients connect to (useful when the config said port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Stops accepting, lets sessions finish their transactions up to shutdown_timeout,
    /// then closes everything.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }

    /// Waits until pgrelay stops by itself (it never does unless shut down).
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

/// Builds everything from `config` and starts accepting clients.
pub async fn start(config: Config) -> Result<Running, AppError> {
    let listen = config.server.listen.clone();
    let addr: SocketAddr = listen
        .parse()
        .map_err(|error: std::net::AddrParseError| AppError::Address {
            addr: listen.clone(),
            reason: error.to_string(),
        })?;
    let shutdown_timeout = config.server.shutdown_timeout;
    let snapshot = Snapshot::build(config)?;
    let shared = Shared::new(snapshot);
    let listener = net::bind(addr).map_err(|source| AppError::Listen {
        addr: listen.clone(),
        source,
    })?;
    let local_addr = listener
        .local_addr()
        .map_err(|source| AppError::Listen { addr: listen, source })?;
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(serve(listener, shared.clone(), stopped, shutdown_timeout));
    tracing::info!(%local_addr, "pgrelay is accepting clients");
    Ok(Running {
        local_addr,
        shared,
        stop,
        task,
    })
}

async fn serve(
    listener: Listener,
    shared: Arc<Shared>,
    mut stopped: watch::Receiver<bool>,
    shutdown_timeout: Option<Duration>,
) {
    let mut sessions = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    while sessions.try_join_next().is_some() {}
                    sessions.spawn(session::serve(stream, peer, shared.clone()));
                }
                Err(error) => {
                    // Out of file descriptors or a connection reset before accept: keep
                    // serving everyone else, but do not spin.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stopped.changed() => break,
        }
    }
    drop(listener);
    tracing::info!(
        clients = sessions.len(),
        "shutting down: no new clients, waiting for running transactions"
    );
    shared.begin_shutdown();
    let all_done = async { while sessions.join_next().await.is_some() {} };
    let drained = match shutdown_timeout {
        Some(limit) => tokio::time::timeout(limit, all_done).await.is_ok(),
        None => {
            all_done.await;
            true
        }
    };
    if !drained {
        tracing::warn!(
            clients = sessions.len(),
            "shutdown_timeout reached: closing the remaining clients"
        );
        // Dropping a session closes its server if it is mid-transaction.
        sessions.abort_all();
        while sessions.join_next().await.is_some() {}
    }
    for database in shared.snapshot().all_databases() {
        database.close();
    }
}

/// Runs pgrelay until SIGTERM or SIGINT, then shuts down gracefully.
pub async fn run(config: Config) -> Result<(), AppError> {
    let running = start(config).await?;
    wait_for_stop_signal().await;
    running.shutdown().await;
    Ok(())
}

async fn wait_for_stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut terminate), Ok(mut interrupt)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        tracing::error!("cannot install signal handlers; stop pgrelay with SIGKILL");
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM received"),
        _ = interrupt.recv() => tracing::info!("SIGINT received"),
    }
}
