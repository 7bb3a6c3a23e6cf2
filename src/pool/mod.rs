//! Bounded pools of server connections, one per (database, user, host).
//!
//! Built on deadpool: its semaphore serves waiting clients first come, first served.
//! On top of it this module adds the reserve pool, query_wait_timeout, the checkout
//! guard that can only hand an idle connection back, and the janitor.

mod janitor;
mod manager;

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use deadpool::managed::{self, Object, TimeoutType, Timeouts};

use crate::registry::{LinkState, Registry};
use crate::upstream::{ConnectSpec, ServerConn, UpstreamError};
use manager::{ServerManager, scopeguard};

/// The pool settings of SPEC.md that the pool itself enforces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolLimits {
    pub size: usize,
    pub min_size: usize,
    pub reserve_size: usize,
    /// Wait this long before using the reserve; `None`: never.
    pub reserve_timeout: Option<Duration>,
    /// Longest a client waits for a connection; `None`: forever.
    pub query_wait_timeout: Option<Duration>,
    pub connect_timeout: Option<Duration>,
    pub idle_timeout: Option<Duration>,
    pub lifetime: Option<Duration>,
}

/// Why no connection could be handed out.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("no server connection became free within query_wait_timeout")]
    WaitTimeout,
    #[error("connecting to the server took longer than server_connect_timeout")]
    ConnectTimeout,
    /// A new connection's login outlasted query_wait_timeout, before server_connect_timeout
    /// (or with none set).
    #[error("the login to the server did not finish within query_wait_timeout")]
    LoginWaitTimeout,
    #[error(transparent)]
    Connect(#[from] UpstreamError),
    #[error("the pool was closed")]
    Closed,
}

/// Counters shared by the pool and its manager; read by SHOW POOLS and the metrics.
#[derive(Debug, Default)]
pub struct PoolCounters {
    /// Connections being opened and authenticated right now.
    pub logins: AtomicUsize,
    /// Clients waiting for a connection right now.
    pub waiting: AtomicUsize,
    pub connect_errors: AtomicU64,
    /// Bumped to retire every connection opened before (the server changed its part).
    pub generation: AtomicU64,
    /// When each waiting client started waiting, by ticket: the oldest gives maxwait.
    waiters: Mutex<WaitList>,
    /// ParameterStatus values of the newest connection: what clients are told at login.
    server_params: Mutex<Option<ServerParams>>,
}

#[derive(Debug, Default)]
struct WaitList {
    next_ticket: u64,
    since: std::collections::BTreeMap<u64, Instant>,
}

impl PoolCounters {
    fn start_waiting(&self) -> u64 {
        match self.waiters.lock() {
            Ok(mut list) => {
                list.next_ticket += 1;
                let ticket = list.next_ticket;
                list.since.insert(ticket, Instant::now());
                ticket
            }
            Err(_) => 0,
        }
    }

    fn stop_waiting(&self, ticket: u64) {
        if let Ok(mut list) = self.waiters.lock() {
            list.since.remove(&ticket);
        }
    }

    /// How long the longest-waiting client has waited so far.
    pub fn max_wait(&self) -> Duration {
        self.waiters
            .lock()
            .ok()
            .and_then(|list| list.since.values().next().map(Instant::elapsed))
            .unwrap_or_default()
    }

    fn remember_server_params(&self, params: &[(String, String)]) {
        if let Ok(mut known) = self.server_params.lock() {
            *known = Some(Arc::new(params.to_vec()));
        }
    }
}

/// Who is told about a pool's connections.
#[derive(Debug, Clone, Default)]
pub struct PoolObservers {
    /// Counts failed connection attempts (a metric handle).
    pub connect_errors: Option<prometheus::IntCounter>,
    /// Lists the connections for SHOW SERVERS, under this database name.
    pub registry: Option<(Arc<Registry>, String)>,
}

/// A snapshot of a pool's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolStatus {
    pub max_size: usize,
    /// Open connections, idle or in use (reserve included).
    pub size: usize,
    pub idle: usize,
    pub active: usize,
    pub logins: usize,
    pub waiting: usize,
}

type Deadpool = managed::Pool<ServerManager>;

/// ParameterStatus values (name, value) a server reported.
pub type ServerParams = Arc<Vec<(String, String)>>;

#[derive(Debug)]
pub struct ServerPool {
    main: Deadpool,
    reserve: Option<Deadpool>,
    limits: ArcSwap<PoolLimits>,
    counters: Arc<PoolCounters>,
    spec: Arc<ConnectSpec>,
}

impl ServerPool {
    /// Creates the pool and starts its janitor; needs a running tokio runtime.
    /// `connect_errors` counts failed connection attempts (a metric handle).
    pub fn new(spec: ConnectSpec, limits: PoolLimits, observers: PoolObservers) -> Arc<ServerPool> {
        let spec = Arc::new(spec);
        let counters = Arc::new(PoolCounters::default());
        let build = |max_size: usize| {
            let manager = ServerManager {
                spec: spec.clone(),
                counters: counters.clone(),
                lifetime: limits.lifetime,
                observers: observers.clone(),
            };
            managed::Pool::builder(manager)
                .max_size(max_size)
                .queue_mode(managed::QueueMode::Lifo)
                .create_timeout(limits.connect_timeout)
                .runtime(deadpool::Runtime::Tokio1)
                .build()
        };
        // Building fails only without a runtime or with create_timeout and no runtime;
        // both are set above, so a failure here is a bug worth a loud message.
        let main = build(limits.size.max(1));
        let reserve = (limits.reserve_size > 0).then(|| build(limits.reserve_size));
        let (main, reserve) = match (main, reserve.transpose()) {
            (Ok(main), Ok(reserve)) => (main, reserve),
            (Err(error), _) | (_, Err(error)) => panic!("deadpool rejected a valid configuration: {error}"),
        };
        let pool = Arc::new(ServerPool {
            main,
            reserve,
            limits: ArcSwap::from_pointee(limits),
            counters,
            spec,
        });
        janitor::spawn(&pool);
        pool
    }

    pub fn addr(&self) -> &str {
        &self.spec.addr
    }

    /// Where and as whom this pool connects (the listener connection of LISTEN/NOTIFY
    /// fan-out connects the same way, outside the pool).
    pub fn spec(&self) -> Arc<crate::upstream::ConnectSpec> {
        self.spec.clone()
    }

    /// Whom this pool logs in as.
    pub fn credentials(&self) -> &crate::upstream::ServerCredentials {
        &self.spec.credentials
    }

    pub fn limits(&self) -> Arc<PoolLimits> {
        self.limits.load_full()
    }

    pub fn counters(&self) -> &PoolCounters {
        &self.counters
    }

    /// The server's ParameterStatus values, if any connection was made yet.
    pub fn server_params(&self) -> Option<ServerParams> {
        self.counters.server_params.lock().ok().and_then(|known| known.clone())
    }

    /// Waits for a connection: from the idle ones, a new one, or after reserve_timeout
    /// one from the reserve. Gives up after query_wait_timeout.
    pub async fn checkout(&self) -> Result<Checkout, PoolError> {
        let object = match self.try_checkout().await? {
            Some(object) => object,
            // Boxed: the waiting path is a large future, needed only when the pool is busy.
            None => Box::pin(self.checkout_waiting()).await?,
        };
        if let Some(registration) = &object.registration {
            registration.entry().set_state(LinkState::Active);
        }
        Ok(Checkout {
            object: Some(object),
            counters: self.counters.clone(),
        })
    }

    /// The common case, without queueing or timers: a free slot while nobody waits (so
    /// nobody is overtaken), served by an idle connection or a new one. `Ok(None)`: no
    /// free slot, the caller queues. A new connection that fails is the caller's error
    /// at once, not tried again after a wait.
    async fn try_checkout(&self) -> Result<Option<Object<ServerManager>>, PoolError> {
        if self.counters.waiting.load(Ordering::Acquire) > 0 {
            return Ok(None);
        }
        // The new connection's login is a wait for a server like any other: bounded by
        // query_wait_timeout as well as server_connect_timeout. (A queued client's wait,
        // login included, is bounded in `checkout_waiting`.) Without this, a server that
        // accepts and never answers held the client for ever when server_connect_timeout
        // was "0", and for server_connect_timeout when that was the longer of the two.
        let limits = self.limits.load();
        let (create, by_wait) = match (limits.connect_timeout, limits.query_wait_timeout) {
            (Some(connect), Some(wait)) if wait < connect => (Some(wait), true),
            (None, Some(wait)) => (Some(wait), true),
            (connect, _) => (connect, false),
        };
        let timeouts = Timeouts {
            create,
            ..self.without_waiting()
        };
        match self.main.timeout_get(&timeouts).await {
            Ok(object) => Ok(Some(object)),
            Err(managed::PoolError::Timeout(TimeoutType::Wait)) => Ok(None),
            Err(managed::PoolError::Timeout(TimeoutType::Create)) if by_wait => Err(PoolError::LoginWaitTimeout),
            Err(error) => Err(map_error(error)),
        }
    }

    /// Deadpool timeouts that take a free slot or none.
    fn without_waiting(&self) -> Timeouts {
        Timeouts {
            wait: Some(Duration::ZERO),
            create: self.limits.load().connect_timeout,
            recycle: None,
        }
    }

    /// Queues for a connection (first come, first served), up to query_wait_timeout.
    async fn checkout_waiting(&self) -> Result<Object<ServerManager>, PoolError> {
        let limits = self.limits.load();
        self.counters.waiting.fetch_add(1, Ordering::Relaxed);
        let ticket = self.counters.start_waiting();
        let _waiting = scopeguard(|| {
            self.counters.stop_waiting(ticket);
            self.counters.waiting.fetch_sub(1, Ordering::Relaxed);
        });
        let wait = self.wait_for_connection(limits.reserve_timeout);
        match limits.query_wait_timeout {
            Some(limit) => tokio::time::timeout(limit, wait)
                .await
                .map_err(|_| PoolError::WaitTimeout)?,
            None => wait.await,
        }
    }

    async fn wait_for_connection(&self, reserve_after: Option<Duration>) -> Result<Object<ServerManager>, PoolError> {
        let (Some(reserve), Some(reserve_after)) = (&self.reserve, reserve_after) else {
            return self.main.get().await.map_err(map_error);
        };
        let main = self.main.get();
        tokio::pin!(main);
        tokio::select! {
            biased;
            result = &mut main => return result.map_err(map_error),
            () = tokio::time::sleep(reserve_after) => {}
        }
        tokio::select! {
            biased;
            result = &mut main => result.map_err(map_error),
            result = reserve.get() => result.map_err(map_error),
        }
    }

    /// An idle connection, or a new one if there is room, without queueing.
    async fn take_without_waiting(&self) -> Result<Checkout, PoolError> {
        let object = self
            .main
            .timeout_get(&self.without_waiting())
            .await
            .map_err(map_error)?;
        Ok(Checkout {
            object: Some(object),
            counters: self.counters.clone(),
        })
    }

    pub fn status(&self) -> PoolStatus {
        let mut status = PoolStatus {
            max_size: self.limits.load().size,
            logins: self.counters.logins.load(Ordering::Relaxed),
            waiting: self.counters.waiting.load(Ordering::Relaxed),
            ..PoolStatus::default()
        };
        for (deadpool, _) in self.deadpools() {
            let inner = deadpool.status();
            status.size += inner.size;
            status.idle += inner.available;
        }
        status.active = status.size - status.idle.min(status.size);
        status
    }

    /// Changes the limits in place: connections above a smaller size close when they are
    /// handed back, never while in use.
    pub fn set_limits(&self, limits: PoolLimits) {
        self.main.resize(limits.size.max(1));
        if let Some(reserve) = &self.reserve {
            reserve.resize(limits.reserve_size);
        }
        self.limits.store(Arc::new(limits));
    }

    /// Retires every connection opened so far: idle ones close now, busy ones when they
    /// are released. New connections replace them.
    pub fn retire_connections(&self) {
        self.counters.generation.fetch_add(1, Ordering::AcqRel);
        self.close_idle();
    }

    /// Closes the idle connections now; the pool goes on serving (new connections).
    pub fn close_idle(&self) {
        for (deadpool, _) in self.deadpools() {
            deadpool.retain(|_, _| false);
        }
    }

    /// Stops handing out connections: idle ones close now, busy ones when released.
    pub fn close(&self) {
        for (deadpool, _) in self.deadpools() {
            deadpool.close();
        }
    }

    pub fn is_closed(&self) -> bool {
        self.main.is_closed()
    }

    fn main_size(&self) -> usize {
        self.main.status().size
    }

    fn waiting(&self) -> usize {
        self.counters.waiting.load(Ordering::Relaxed)
    }

    fn deadpools(&self) -> impl Iterator<Item = (&Deadpool, bool)> {
        std::iter::once((&self.main, false)).chain(self.reserve.iter().map(|reserve| (reserve, true)))
    }
}

fn map_error(error: managed::PoolError<UpstreamError>) -> PoolError {
    match error {
        managed::PoolError::Timeout(TimeoutType::Create) => PoolError::ConnectTimeout,
        managed::PoolError::Timeout(_) => PoolError::WaitTimeout,
        managed::PoolError::Backend(error) => PoolError::Connect(error),
        managed::PoolError::Closed | managed::PoolError::NoRuntimeSpecified | managed::PoolError::PostCreateHook(_) => {
            PoolError::Closed
        }
    }
}

/// A connection lent to one client. Dropping it hands the connection back to its pool
/// only if it is idle (nothing owed, no transaction open); anything else is closed, so a
/// connection in an unknown state can never reach another client.
#[derive(Debug)]
pub struct Checkout {
    object: Option<Object<ServerManager>>,
    counters: Arc<PoolCounters>,
}

impl Checkout {
    /// Closes the connection instead of returning it.
    pub fn discard(mut self) {
        if let Some(object) = self.object.take() {
            drop(Object::take(object));
        }
    }
}

impl Deref for Checkout {
    type Target = ServerConn;

    fn deref(&self) -> &ServerConn {
        // `object` is only ever None inside `discard` and `drop`, which consume self.
        match &self.object {
            Some(object) => object,
            None => unreachable!("checkout used after release"),
        }
    }
}

impl DerefMut for Checkout {
    fn deref_mut(&mut self) -> &mut ServerConn {
        match &mut self.object {
            Some(object) => object,
            None => unreachable!("checkout used after release"),
        }
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        let Some(mut object) = self.object.take() else { return };
        let current = object.pool_generation == self.counters.generation.load(Ordering::Acquire);
        if object.is_reusable() && current {
            object.released_at = Instant::now();
            if let Some(registration) = &object.registration {
                registration.entry().set_state(LinkState::Idle);
            }
            drop(object);
        } else {
            drop(Object::take(object));
        }
    }
}
