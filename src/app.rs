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
use crate::successor::Spawned;
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
    #[error(transparent)]
    Takeover(#[from] crate::takeover::TakeoverError),
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
    /// Turns true once a new process has taken the listening sockets over: every accept
    /// loop here stops (see `takeover`).
    handed_over: Arc<watch::Sender<bool>>,
    /// `takeover_socket`, removed at shutdown unless a new process took it over.
    takeover_socket: Option<std::path::PathBuf>,
    /// Clients handed over by the process this one took over from, to the accept loop.
    resume: tokio::sync::mpsc::UnboundedSender<session::Resumed>,
    /// The listening sockets to hand to a new process, until the takeover socket serves.
    offered: Option<Vec<crate::takeover::Offered>>,
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
        if let Some(path) = &self.takeover_socket
            && !*self.handed_over.borrow()
        {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Waits on the takeover socket for a new process (see `takeover::serve`).
    fn serve_takeover(&mut self, unix: tokio::net::UnixListener, path: std::path::PathBuf) {
        let offered = self.offered.take().unwrap_or_default();
        if let Some(control) = self.shared.control() {
            control.spawn(crate::takeover::serve(
                unix,
                path,
                offered,
                self.shared.clone(),
                self.handed_over.clone(),
            ));
        }
    }

    /// Resolves once a new process has taken the listening sockets over.
    pub async fn handed_over(&self) {
        let mut handed_over = self.handed_over.subscribe();
        let _ = handed_over.wait_for(|handed_over| *handed_over).await;
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
    start_inheriting(config, path, None).await
}

/// Like [`start_with_file`]; with `inherited`, the listening sockets a running pgrelay
/// handed over are used instead of binding new ones (`run --takeover`). The caller then
/// tells the old process, with [`crate::takeover::Inherited::finish`].
pub async fn start_inheriting(
    config: Config,
    path: Option<std::path::PathBuf>,
    mut inherited: Option<&mut crate::takeover::Inherited>,
) -> Result<Running, AppError> {
    use crate::takeover::Role;
    // Bound first when starting afresh: a running pgrelay there means this one must not
    // share its port. After a takeover, bound only once the old process has let it go.
    let takeover_listener = match (&config.server.takeover_socket, &inherited) {
        (Some(socket), None) => Some(crate::takeover::bind(socket)?),
        _ => None,
    };
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
        match inherited
            .as_deref_mut()
            .and_then(|inherited| inherited.take(Role::Listen, &listen))
        {
            Some(socket) => Listener::from_std(socket),
            None => net::bind(addr),
        }
    }
    .map_err(|source| AppError::Listen {
        addr: listen.clone(),
        source,
    })?;
    // Kept when takeover_socket is set: a process that took over binds it only later.
    let offering = config_takeover_socket(&shared).is_some();
    let (handed_over, _) = watch::channel(false);
    let handed_over = Arc::new(handed_over);
    let mut offered = Vec::new();
    let offer_error = |addr: &str, source| AppError::Listen {
        addr: addr.to_owned(),
        source,
    };
    if offering {
        offered.push(crate::takeover::Offered {
            role: Role::Listen,
            addr: listen.clone(),
            fd: listener.try_clone_fd().map_err(|source| offer_error(&listen, source))?,
        });
    }
    let local_addr = listener
        .local_addr()
        .map_err(|source| AppError::Listen { addr: listen, source })?;
    let metrics_addr = match metrics_listen {
        Some(metrics_listen) => {
            let socket = inherited
                .as_deref_mut()
                .and_then(|inherited| inherited.take(Role::MetricsListen, &metrics_listen));
            let endpoint = control.handle().spawn(start_metrics_endpoint(
                metrics_listen.clone(),
                socket,
                shared.clone(),
                handed_over.subscribe(),
            ));
            let (local, fd) = endpoint.await.map_err(|error| AppError::Listen {
                addr: metrics_listen.clone(),
                source: std::io::Error::other(error),
            })??;
            if offering {
                offered.push(crate::takeover::Offered {
                    role: Role::MetricsListen,
                    addr: metrics_listen,
                    fd,
                });
            }
            Some(local)
        }
        None => None,
    };
    let workers = tokio::runtime::Handle::current();
    let peer_addr = match peer_listen {
        Some(peer_listen) => {
            let socket = inherited.and_then(|inherited| inherited.take(Role::PeerListen, &peer_listen));
            let (local, fd) = start_peer_listener(
                &peer_listen,
                socket,
                &control,
                &shared,
                &workers,
                handed_over.subscribe(),
            )?;
            if offering {
                offered.push(crate::takeover::Offered {
                    role: Role::PeerListen,
                    addr: peer_listen,
                    fd,
                });
            }
            Some(local)
        }
        None => None,
    };
    let (stop, stopped) = watch::channel(false);
    let (resume, resumed) = tokio::sync::mpsc::unbounded_channel();
    shared.set_accepting(true);
    let task = control.handle().spawn(serve(
        listener,
        shared.clone(),
        AcceptInputs {
            stopped,
            handed_over: handed_over.subscribe(),
            resumed,
        },
        shutdown_timeout,
        watchdog,
        workers,
    ));
    let takeover_socket = config_takeover_socket(&shared);
    let mut running = Running {
        local_addr,
        metrics_addr,
        peer_addr,
        shared,
        stop,
        task,
        handed_over,
        takeover_socket,
        offered: Some(offered),
        resume,
        _control: control,
    };
    if let (Some(unix), Some(path)) = (takeover_listener, running.takeover_socket.clone()) {
        running.serve_takeover(unix, path);
    }
    tracing::info!(%local_addr, metrics = ?metrics_addr, peer_listen = ?peer_addr, "pgrelay is accepting clients");
    Ok(running)
}

fn config_takeover_socket(shared: &Shared) -> Option<std::path::PathBuf> {
    shared.snapshot().config.server.takeover_socket.clone()
}

/// Binds `peer_listen` on the control thread and accepts cancel requests there for as long
/// as the process runs: also while it drains at shutdown, when `listen` is closed but its
/// clients' statements may still need cancelling.
fn start_peer_listener(
    addr: &str,
    inherited: Option<std::net::TcpListener>,
    control: &ControlThread,
    shared: &Arc<Shared>,
    workers: &tokio::runtime::Handle,
    mut handed_over: watch::Receiver<bool>,
) -> Result<(SocketAddr, std::os::fd::OwnedFd), AppError> {
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
        match inherited {
            Some(socket) => Listener::from_std(socket),
            None => net::bind(parsed),
        }
    }
    .map_err(listen_error)?;
    let local = listener.local_addr().map_err(listen_error)?;
    let fd = listener.try_clone_fd().map_err(listen_error)?;
    let shared = shared.clone();
    let workers = workers.clone();
    control.handle().spawn(async move {
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_PEER_CONNECTIONS));
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                // The new process takes the cancels from here on (and carries those of
                // this one's clients back here).
                () = until_handed_over(&mut handed_over) => return,
            };
            match accepted.and_then(|(stream, peer)| Ok((stream.into_std()?, peer))) {
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
    Ok((local, fd))
}

/// Binds the HTTP endpoint for /metrics, /healthz and /readyz on the control thread; it
/// runs as long as that thread, so /healthz answers for as long as pgrelay runs.
async fn start_metrics_endpoint(
    addr: String,
    inherited: Option<std::net::TcpListener>,
    shared: Arc<Shared>,
    mut handed_over: watch::Receiver<bool>,
) -> Result<(SocketAddr, std::os::fd::OwnedFd), AppError> {
    let listen_error = |source| AppError::Listen {
        addr: addr.clone(),
        source,
    };
    let listener = match inherited {
        Some(socket) => socket
            .set_nonblocking(true)
            .and_then(|()| tokio::net::TcpListener::from_std(socket)),
        None => tokio::net::TcpListener::bind(&addr).await,
    }
    .map_err(listen_error)?;
    let local = listener.local_addr().map_err(listen_error)?;
    let fd = std::os::fd::AsFd::as_fd(&listener)
        .try_clone_to_owned()
        .map_err(listen_error)?;
    let weak = Arc::downgrade(&shared);
    let ready = move || weak.upgrade().is_some_and(|shared| shared.is_ready());
    let metrics = shared.metrics.clone();
    tokio::spawn(crate::metrics::serve(
        listener,
        metrics,
        Arc::new(ready),
        // Until a new process takes the endpoint over; a scrape then reaches that one.
        async move { until_handed_over(&mut handed_over).await },
    ));
    Ok((local, fd))
}

/// Resolves once a new process has taken the listening sockets over (never, if nobody can
/// any more).
async fn until_handed_over(handed_over: &mut watch::Receiver<bool>) {
    if handed_over.wait_for(|handed_over| *handed_over).await.is_err() {
        std::future::pending::<()>().await;
    }
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

/// What the accept loop waits for besides connections.
struct AcceptInputs {
    /// Shutdown (SIGTERM and the like).
    stopped: watch::Receiver<bool>,
    /// A new process took the sockets over.
    handed_over: watch::Receiver<bool>,
    /// Clients handed over by the process this one took over from.
    resumed: tokio::sync::mpsc::UnboundedReceiver<session::Resumed>,
}

/// The accept loop, on the control thread: each client's session runs on the workers,
/// timed by the watchdog.
async fn serve(
    listener: Listener,
    shared: Arc<Shared>,
    inputs: AcceptInputs,
    shutdown_timeout: Option<Duration>,
    watchdog: Arc<Watchdog>,
    workers: tokio::runtime::Handle,
) {
    let AcceptInputs {
        mut stopped,
        mut handed_over,
        mut resumed,
    } = inputs;
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
            Some(resumed) = resumed.recv() => {
                let peer = resumed
                    .stream
                    .as_ref()
                    .and_then(|stream| stream.peer_addr().ok())
                    .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
                let session = session::resume(resumed, shared.clone());
                sessions.spawn_on(watchdog.watch(peer, session), &workers);
            }
            // A finished session's task keeps its memory (as large as the session future)
            // until it is joined: joined at once, so a crowd that left gives it all back.
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            _ = stopped.changed() => break,
            // Stops accepting without closing the socket's queue: the new process holds the
            // same socket and accepts what waits there.
            () = until_handed_over(&mut handed_over) => break,
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
    if shared.client_handover.started() {
        // Every session has ended: the counts are final. Passed on, so that the new
        // process's endpoint (which the old one's scrapes now reach) goes on with them.
        let tally = crate::metrics::TakeoverResult::ALL.map(|result| shared.metrics.takeover_clients_so_far(result));
        let passed_on = shared.client_handover.send_tally(tally);
        tracing::info!(
            handed_over = tally[0],
            kept = tally[2],
            passed_on,
            "takeover: clients handed over and kept here"
        );
    }
}

/// Adds what the process this one took over from counted (see [`crate::takeover::Tally`]).
fn add_tally(metrics: &Metrics, tally: crate::takeover::Tally) {
    for (result, count) in crate::metrics::TakeoverResult::ALL.into_iter().zip(tally) {
        metrics.takeover_clients(result, count);
    }
}

/// Runs pgrelay until SIGTERM, SIGINT or the admin console's SHUTDOWN, then shuts
/// down gracefully. SIGHUP reloads the file; SIGUSR2 starts a successor that takes this
/// process over (with `takeover_socket` set).
pub async fn run(config: Config, path: std::path::PathBuf) -> Result<(), AppError> {
    run_taking_over(config, path, None).await
}

/// Like [`run`]; with `takeover`, first takes the listening sockets over from the pgrelay
/// running at that Unix socket (`run --takeover PATH`), which then drains and exits.
/// A new process that takes over and a process that is taken over both end like
/// [`run`]: gracefully, with running transactions finished.
pub async fn run_taking_over(
    config: Config,
    path: std::path::PathBuf,
    takeover: Option<std::path::PathBuf>,
) -> Result<(), AppError> {
    // Before anything else: once the binary is replaced on disk, the path is all that
    // still leads to the new one.
    let successor = crate::successor::Successor::of_this_process();
    let mut inherited = match takeover {
        Some(socket) => Some(
            tokio::task::spawn_blocking(move || crate::takeover::receive(&socket))
                .await
                .map_err(|error| AppError::Thread(std::io::Error::other(error)))??,
        ),
        None => None,
    };
    let mut running = start_inheriting(config, Some(path), inherited.as_mut()).await?;
    let shared = running.shared.clone();
    if let Some(inherited) = inherited {
        // This process accepts already: whatever happens to the old one now, it goes on.
        match tokio::task::spawn_blocking(move || inherited.finish()).await {
            Ok(Ok((stream, clients))) => {
                if let Err(error) = shared.predecessor.attach(stream).await {
                    tracing::warn!(%error, "cannot carry cancels to the old process");
                }
                if let Some(channel) = clients {
                    let resume = running.resume.clone();
                    let metrics = shared.metrics.clone();
                    let receiving = crate::takeover::receive_clients(
                        channel,
                        move |stream, server, description| {
                            // Refused only once this process shuts down: the client is closed.
                            let _ = resume.send(session::Resumed {
                                stream,
                                server,
                                description,
                            });
                        },
                        move |tally| add_tally(&metrics, tally),
                    );
                    if let Err(error) = receiving {
                        tracing::warn!(%error, "cannot take the old process's idle clients over");
                    }
                }
                tracing::info!("took the listening sockets over: the old process finishes its transactions");
            }
            Ok(Err(error)) => {
                tracing::warn!(%error, "took the listening sockets over; the old process did not confirm")
            }
            Err(error) => tracing::warn!(%error, "took the listening sockets over; the old process did not confirm"),
        }
        if let Some(socket) = config_takeover_socket(&shared) {
            match crate::takeover::bind(&socket) {
                Ok(unix) => running.serve_takeover(unix, socket),
                // Serving matters more than being replaceable: say so, and go on.
                Err(error) => {
                    tracing::error!(%error, "cannot open the takeover socket: this process cannot be taken over")
                }
            }
        }
    }
    let upgrade = Upgrade {
        successor,
        socket: running.takeover_socket.clone(),
    };
    tokio::select! {
        () = wait_for_stop(&shared, &upgrade) => {}
        () = running.handed_over() => {}
    }
    running.shutdown().await;
    Ok(())
}

/// What SIGUSR2 needs to start a successor that takes this process over.
struct Upgrade {
    successor: Option<crate::successor::Successor>,
    /// `takeover_socket` as read at startup.
    socket: Option<std::path::PathBuf>,
}

impl Upgrade {
    /// Starts the successor; this process goes on serving until it connects (and for good
    /// if it never does).
    fn start(&self) {
        let Some(socket) = &self.socket else {
            return tracing::warn!("SIGUSR2 received, but takeover_socket is not set: nothing to do");
        };
        let Some(successor) = &self.successor else {
            return tracing::error!(
                "SIGUSR2 received, but this process's executable is unknown: cannot start a successor"
            );
        };
        match successor.spawn(socket) {
            Ok(Spawned::Started(pid)) => {
                tracing::info!(pid, "SIGUSR2 received: started a successor to take this process over")
            }
            Ok(Spawned::AlreadyRunning(pid)) => tracing::warn!(
                pid,
                "SIGUSR2 received, but the successor started before still runs: no other is started"
            ),
            Err(error) => tracing::error!(%error, "SIGUSR2 received, but the successor did not start: still serving"),
        }
    }
}

async fn wait_for_stop(shared: &Shared, upgrade: &Upgrade) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut terminate), Ok(mut interrupt), Ok(mut hangup), Ok(mut user2)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
        signal(SignalKind::user_defined2()),
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
            _ = user2.recv() => upgrade.start(),
        }
    }
}
