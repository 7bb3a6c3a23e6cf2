//! The composition root: builds the running state from a config, binds the listener,
//! accepts clients, and owns shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

use crate::config::Config;
use crate::control::ControlThread;
use crate::metrics::{Metrics, MetricsError, PoolState, Role, StateSink};
use crate::net::{self, Listener};
use crate::registry::Registry;
use crate::runtime::{BuildError, Observers, Shared, Snapshot};
use crate::session;
use crate::watchdog::Watchdog;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("invalid listen address {addr}: {reason}")]
    Address { addr: String, reason: String },
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: String, source: std::io::Error },
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
}

/// Connections open at once on `peer_listen`; more are closed at once. Each lives for at
/// most the few seconds a cancel takes.
const MAX_PEER_CONNECTIONS: usize = 1024;

/// How long startup waits for the first health check of each database's servers.
const FIRST_CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// A running pgrelay: its address and the handle to stop it.
#[derive(Debug)]
pub struct Running {
    local_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    peer_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    /// Runs the accept loop, the metrics endpoint and the admin console; stops with this.
    _control: Arc<ControlThread>,
}

impl Running {
    /// The address clients connect to (useful when the config said port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The address of the HTTP endpoint, if metrics_listen is set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The address of `peer_listen`, if set.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.peer_addr
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
    start_with_file(config, None).await
}

/// Like [`start`], remembering the file the config came from so it can be reloaded.
pub async fn start_with_file(config: Config, path: Option<std::path::PathBuf>) -> Result<Running, AppError> {
    let listen = config.server.listen.clone();
    let addr: SocketAddr = listen
        .parse()
        .map_err(|error: std::net::AddrParseError| AppError::Address {
            addr: listen.clone(),
            reason: error.to_string(),
        })?;
    let shutdown_timeout = config.server.shutdown_timeout;
    let peer_listen = config.server.peer_listen.clone();
    let metrics_listen = config.server.metrics_listen.clone().filter(|addr| !addr.is_empty());
    let metrics = Arc::new(Metrics::new()?);
    let observers = Observers {
        metrics: metrics.clone(),
        registry: Arc::new(Registry::default()),
        budgets: Arc::new(crate::pool::Budgets::default()),
        auth_cache: Arc::default(),
    };
    let mut snapshot = Snapshot::build(config, &observers)?;
    snapshot.start_monitors();
    // Routing starts from a checked picture of the servers, not from "nothing known".
    for database in snapshot.all_databases() {
        if let Some(monitor) = &database.monitor
            && !monitor.first_check(FIRST_CHECK_TIMEOUT).await
        {
            tracing::warn!(database = %database.name, "servers not checked yet: starting without them");
        }
    }
    let shared = Shared::new(snapshot, observers, path);
    let weak = Arc::downgrade(&shared);
    metrics.set_state_source(move |sink| {
        if let Some(shared) = weak.upgrade() {
            report_state(&shared, sink);
        }
    });
    let control = ControlThread::start().map_err(AppError::Thread)?;
    shared.set_runtimes(control.handle().clone(), tokio::runtime::Handle::current());
    let watchdog =
        Arc::new(Watchdog::start(shared.metrics.clone(), shared.registry.clone()).map_err(AppError::Thread)?);
    crate::memory::spawn(Arc::downgrade(&shared), Arc::downgrade(&watchdog));
    // The listener belongs to the control thread's runtime: accepting goes on while a
    // worker is kept by a task.
    let listener = {
        let _control = control.handle().enter();
        net::bind(addr)
    }
    .map_err(|source| AppError::Listen {
        addr: listen.clone(),
        source,
    })?;
    let local_addr = listener
        .local_addr()
        .map_err(|source| AppError::Listen { addr: listen, source })?;
    let metrics_addr = match metrics_listen {
        Some(metrics_listen) => {
            let endpoint = control
                .handle()
                .spawn(start_metrics_endpoint(metrics_listen.clone(), shared.clone()));
            Some(endpoint.await.map_err(|error| AppError::Listen {
                addr: metrics_listen,
                source: std::io::Error::other(error),
            })??)
        }
        None => None,
    };
    let workers = tokio::runtime::Handle::current();
    let peer_addr = match peer_listen {
        Some(peer_listen) => Some(start_peer_listener(&peer_listen, &control, &shared, &workers)?),
        None => None,
    };
    let (stop, stopped) = watch::channel(false);
    shared.set_accepting(true);
    let task = control.handle().spawn(serve(
        listener,
        shared.clone(),
        stopped,
        shutdown_timeout,
        watchdog,
        workers,
    ));
    tracing::info!(%local_addr, metrics = ?metrics_addr, peer_listen = ?peer_addr, "pgrelay is accepting clients");
    Ok(Running {
        local_addr,
        metrics_addr,
        peer_addr,
        shared,
        stop,
        task,
        _control: control,
    })
}

/// Binds `peer_listen` on the control thread and accepts cancel requests there for as long
/// as the process runs: also while it drains at shutdown, when `listen` is closed but its
/// clients' statements may still need cancelling.
fn start_peer_listener(
    addr: &str,
    control: &ControlThread,
    shared: &Arc<Shared>,
    workers: &tokio::runtime::Handle,
) -> Result<SocketAddr, AppError> {
    let listen_error = |source| AppError::Listen {
        addr: addr.to_owned(),
        source,
    };
    let parsed: SocketAddr = addr
        .parse()
        .map_err(|error: std::net::AddrParseError| AppError::Address {
            addr: addr.to_owned(),
            reason: error.to_string(),
        })?;
    let listener = {
        let _control = control.handle().enter();
        net::bind(parsed)
    }
    .map_err(listen_error)?;
    let local = listener.local_addr().map_err(listen_error)?;
    let shared = shared.clone();
    let workers = workers.clone();
    control.handle().spawn(async move {
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_PEER_CONNECTIONS));
        loop {
            match listener
                .accept()
                .await
                .and_then(|(stream, peer)| Ok((stream.into_std()?, peer)))
            {
                Ok((stream, peer)) => {
                    // Past the limit the connection is closed unread: a peer's cancel is
                    // lost, a flood does not grow.
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        continue;
                    };
                    let shared = shared.clone();
                    workers.spawn(async move {
                        session::serve_cancel_only(stream, peer, shared).await;
                        drop(slot);
                    });
                }
                Err(error) => {
                    tracing::warn!(%error, "accept failed on peer_listen");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    });
    Ok(local)
}

/// Binds the HTTP endpoint for /metrics, /healthz and /readyz on the control thread; it
/// runs as long as that thread, so /healthz answers for as long as pgrelay runs.
async fn start_metrics_endpoint(addr: String, shared: Arc<Shared>) -> Result<SocketAddr, AppError> {
    let listen_error = |source| AppError::Listen {
        addr: addr.clone(),
        source,
    };
    let listener = tokio::net::TcpListener::bind(&addr).await.map_err(listen_error)?;
    let local = listener.local_addr().map_err(listen_error)?;
    let weak = Arc::downgrade(&shared);
    let ready = move || weak.upgrade().is_some_and(|shared| shared.is_ready());
    let metrics = shared.metrics.clone();
    tokio::spawn(crate::metrics::serve(
        listener,
        metrics,
        Arc::new(ready),
        std::future::pending::<()>(),
    ));
    Ok(local)
}

/// Pool and server state for a scrape, read from the running snapshot.
fn report_state(shared: &Shared, sink: &mut StateSink<'_>) {
    let snapshot = shared.snapshot();
    let limit = |value: usize| (value > 0).then_some(value);
    for budget in shared.budgets.users() {
        sink.user_servers(
            budget.name(),
            budget.open(),
            limit(snapshot.config.max_user_connections(budget.name())),
        );
    }
    for budget in shared.budgets.databases() {
        // The config, not snapshot.database(): that would make an entry from "*".
        let max = snapshot
            .config
            .database(budget.name())
            .and_then(|(_, database)| limit(database.pool(&snapshot.config.pool).max_db_connections));
        sink.database_servers(budget.name(), budget.open(), max);
    }
    let (banned, tracked) = shared.access.rate.addresses(std::time::Instant::now());
    sink.login_addresses(banned, tracked);
    for database in snapshot.all_databases() {
        let role = |index: usize| {
            if database.is_primary(index) {
                Role::Primary
            } else {
                Role::Replica
            }
        };
        for (user, pools) in database.all_pools() {
            for (index, pool) in pools.hosts.iter().enumerate() {
                let status = pool.status();
                sink.pool(
                    &database.name,
                    &user,
                    role(index),
                    pool.addr(),
                    PoolState {
                        max_size: status.max_size,
                        active: status.active,
                        idle: status.idle,
                        login: status.logins,
                        max_wait: pool.counters().max_wait(),
                    },
                );
            }
        }
        let view = database.view();
        for (index, addr) in database.hosts.iter().enumerate() {
            let host = view.as_ref().and_then(|view| view.hosts.get(index));
            let up = host.is_none_or(|host| host.up) && database.host_health[index].usable();
            sink.backend(&database.name, role(index), addr, up);
            if let Some(lag) = host.filter(|_| !database.is_primary(index)).and_then(|host| host.lag) {
                sink.replica_lag(&database.name, addr, lag);
            }
        }
        if let Some(view) = &view {
            sink.split_brain(&database.name, view.split_brain);
        }
        if let Some(limit) = database.routing.max_replica_lag {
            sink.max_replica_lag(&database.name, limit);
        }
    }
}

/// The accept loop, on the control thread: each client's session runs on the workers,
/// timed by the watchdog.
async fn serve(
    listener: Listener,
    shared: Arc<Shared>,
    mut stopped: watch::Receiver<bool>,
    shutdown_timeout: Option<Duration>,
    watchdog: Arc<Watchdog>,
    workers: tokio::runtime::Handle,
) {
    let mut sessions = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted.and_then(|(stream, peer)| Ok((stream.into_std()?, peer))) {
                Ok((stream, peer)) => {
                    if let Err(error) = net::apply_tcp_options(&stream, &shared.snapshot().tcp) {
                        tracing::debug!(client = %peer, %error, "cannot set keepalive or user timeout");
                    }
                    let session = session::serve_moved(stream, peer, shared.clone());
                    sessions.spawn_on(watchdog.watch(peer, session), &workers);
                }
                Err(error) => {
                    // Out of file descriptors or a connection reset before accept: keep
                    // serving everyone else, but do not spin.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            // A finished session's task keeps its memory (as large as the session future)
            // until it is joined: joined at once, so a crowd that left gives it all back.
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
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

/// Runs pgrelay until SIGTERM, SIGINT or the admin console's SHUTDOWN, then shuts
/// down gracefully. SIGHUP reloads the file.
pub async fn run(config: Config, path: std::path::PathBuf) -> Result<(), AppError> {
    let running = start_with_file(config, Some(path)).await?;
    let shared = running.shared.clone();
    wait_for_stop(&shared).await;
    running.shutdown().await;
    Ok(())
}

async fn wait_for_stop(shared: &Shared) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut terminate), Ok(mut interrupt), Ok(mut hangup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers; stop pgrelay with SIGKILL");
        std::future::pending::<()>().await;
        return;
    };
    loop {
        tokio::select! {
            _ = terminate.recv() => return tracing::info!("SIGTERM received"),
            _ = interrupt.recv() => return tracing::info!("SIGINT received"),
            () = shared.shutdown_requested() => return tracing::info!("SHUTDOWN requested on the admin console"),
            _ = hangup.recv() => {
                tracing::info!("SIGHUP received: reloading the configuration");
                // Failures are logged and counted by reload itself; nothing changes then.
                let _ = crate::reload::reload(shared);
            }
        }
    }
}
