//! Bounded pools of server connections, one per (database, user, host).
//!
//! Built on deadpool: its semaphore serves waiting clients first come, first served.
//! On top of it this module adds the reserve pool, query_wait_timeout, the checkout
//! guard that can only hand an idle connection back, the janitor, and the limits that span
//! pools (`budget.rs`).

mod adopt;
mod budget;
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
pub use budget::{Budget, BudgetKind, Budgets, PoolBudgets};
use manager::{CreateError, Pooled, ServerManager, scopeguard};

/// The pool settings of docs/configuration.md that the pool itself enforces.
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
    /// Server connections of this pool's user over every pool; `None`: no limit.
    pub max_user_connections: Option<usize>,
    /// Server connections of this pool's database over every pool; `None`: no limit.
    pub max_db_connections: Option<usize>,
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
    /// The client waited query_wait_timeout while a limit spanning pools was reached.
    #[error("no server connection within query_wait_timeout: {key} ({limit}) reached")]
    LimitWaitTimeout { key: &'static str, limit: usize },
    /// A new connection would exceed max_user_connections or max_db_connections (only for
    /// callers that do not wait).
    #[error("{} reached", .0.key())]
    Spent(BudgetKind),
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
    /// Connections handed over with their clients by the process this one took over
    /// from, in use outside deadpool (`adopt.rs`).
    pub adopted: AtomicUsize,
    /// Such connections back from their clients, idle: the next connection the pool would
    /// open is one of them (`adopt.rs`).
    parked: Mutex<Vec<Pooled>>,
    /// The pool was closed: a connection back from its client is closed, not parked.
    closed: std::sync::atomic::AtomicBool,
    pub connect_errors: AtomicU64,
    /// Bumped to retire every connection opened before (the server changed its part).
    pub generation: AtomicU64,
    /// Clients waiting because max_user_connections or max_db_connections is reached.
    limit_waiting: AtomicUsize,
    /// Wakes one of them when a connection comes back to this pool.
    returned: tokio::sync::Notify,
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
    limits: Arc<ArcSwap<PoolLimits>>,
    counters: Arc<PoolCounters>,
    spec: Arc<ConnectSpec>,
    budgets: Arc<PoolBudgets>,
}

impl ServerPool {
    /// Creates the pool and starts its janitor; needs a running tokio runtime.
    /// `connect_errors` counts failed connection attempts (a metric handle); `budgets` are
    /// the user's and the database's limits over every pool.
    pub fn new(
        spec: ConnectSpec,
        limits: PoolLimits,
        observers: PoolObservers,
        budgets: Arc<PoolBudgets>,
    ) -> Arc<ServerPool> {
        let spec = Arc::new(spec);
        let counters = Arc::new(PoolCounters::default());
        let shared_limits = Arc::new(ArcSwap::from_pointee(limits.clone()));
        let build = |max_size: usize| {
            let manager = ServerManager {
                spec: spec.clone(),
                counters: counters.clone(),
                lifetime: limits.lifetime,
                observers: observers.clone(),
                budgets: budgets.clone(),
                limits: shared_limits.clone(),
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
            limits: shared_limits,
            counters,
            spec,
            budgets,
        });
        pool.budgets.join(&pool);
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

    /// Whether this pool logs in with exactly `credentials` (the same object, so the same
    /// learned pass-through secret), not merely equal configuration.
    pub fn uses_credentials(&self, credentials: &Arc<crate::upstream::ServerCredentials>) -> bool {
        Arc::ptr_eq(&self.spec.credentials, credentials)
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
        Ok(self.lend(object))
    }

    /// An idle connection now, without waiting, queueing or connecting; `None` when
    /// there is none or clients are queued (then [`ServerPool::checkout`] does the rest).
    /// Synchronous, so that the common case needs no future: `checkout`'s is some 6 KB,
    /// most of it the state of a new connection's login, and a session that awaits it
    /// carries that space in every transaction.
    pub fn checkout_idle(&self) -> Option<Checkout> {
        if self.counters.waiting.load(Ordering::Acquire) > 0 || self.main.status().available == 0 {
            return None;
        }
        let timeouts = Timeouts {
            wait: Some(Duration::ZERO),
            create: None,
            recycle: None,
        };
        let mut get = std::pin::pin!(self.main.timeout_get(&timeouts));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        // With an idle connection the first poll finishes: taking a slot, popping the
        // connection and its recycle check never wait. Anything else (another client took
        // it first, or it failed its check and a new one would have to be opened) is
        // dropped unfinished here, which gives the slot back, and left to `checkout`.
        match get.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(Ok(object)) => Some(self.lend(object)),
            std::task::Poll::Ready(Err(_)) | std::task::Poll::Pending => None,
        }
    }

    /// Wraps a connection taken from deadpool for a client.
    fn lend(&self, object: Object<ServerManager>) -> Checkout {
        if let Some(registration) = &object.registration {
            registration.entry().set_state(LinkState::Active);
        }
        Checkout {
            object: Some(Lent::Pooled(object)),
            counters: self.counters.clone(),
            budgets: self.budgets.clone(),
        }
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
            // No free slot, or a limit spanning pools is reached: queue.
            Err(managed::PoolError::Timeout(TimeoutType::Wait))
            | Err(managed::PoolError::Backend(CreateError::Spent(_))) => Ok(None),
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
        let mut spent = None;
        let wait = self.wait_within_limits(limits.reserve_timeout, &mut spent);
        let result = match limits.query_wait_timeout {
            Some(limit) => tokio::time::timeout(limit, wait).await.ok(),
            None => Some(wait.await),
        };
        match (result, spent) {
            (Some(result), _) => result,
            (None, None) => Err(PoolError::WaitTimeout),
            (None, Some(kind)) => Err(PoolError::LimitWaitTimeout {
                key: kind.key(),
                limit: match kind {
                    BudgetKind::User => limits.max_user_connections,
                    BudgetKind::Database => limits.max_db_connections,
                }
                .unwrap_or_default(),
            }),
        }
    }

    /// Waits for a connection like [`Self::wait_for_connection`]; while a limit spanning
    /// pools keeps this pool from opening one, waits until a connection comes back to this
    /// pool or one under the limit closes, then tries again. `spent` says which limit held
    /// the client up last.
    async fn wait_within_limits(
        &self,
        reserve_after: Option<Duration>,
        spent: &mut Option<BudgetKind>,
    ) -> Result<Object<ServerManager>, PoolError> {
        let started = Instant::now();
        let reserve_left = || reserve_after.map(|after| after.saturating_sub(started.elapsed()));
        // The common case: no limit spanning pools holds this client up, and it needs
        // none of the wake-ups below (each would lock a `Notify` shared by every
        // queued client of the pool, to register and again to deregister).
        match self.wait_for_connection(reserve_left()).await {
            Err(PoolError::Spent(kind)) => *spent = Some(kind),
            other => return other,
        }
        // From now on releases here and closes under the budgets wake this client; the
        // first try of the loop covers what happened before.
        self.counters.limit_waiting.fetch_add(1, Ordering::AcqRel);
        self.budgets.start_waiting();
        let _counted = scopeguard(|| {
            self.budgets.stop_waiting();
            self.counters.limit_waiting.fetch_sub(1, Ordering::AcqRel);
        });
        loop {
            // Registered before trying, so that what happens between a failed try and
            // the wait below still wakes it.
            let returned = self.counters.returned.notified();
            let user_changed = self.budgets.user.changed().notified();
            let database_changed = self.budgets.database.changed().notified();
            tokio::pin!(returned, user_changed, database_changed);
            returned.as_mut().enable();
            user_changed.as_mut().enable();
            database_changed.as_mut().enable();
            match self.wait_for_connection(reserve_left()).await {
                Err(PoolError::Spent(kind)) => *spent = Some(kind),
                other => return other,
            }
            tokio::select! {
                () = &mut returned => {}
                () = &mut user_changed => {}
                () = &mut database_changed => {}
            }
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
        Ok(self.lend(object))
    }

    /// Closes one idle connection, for a pool under the same limit that needs a new one.
    /// Connections kept for min_size are not spared: a waiting client comes first.
    fn close_one_idle(&self) -> bool {
        if self.counters.close_parked(1) {
            return true;
        }
        for (deadpool, _) in self.deadpools() {
            let mut left = 1usize;
            deadpool.retain(|_, _| {
                let keep = left == 0;
                left = left.saturating_sub(1);
                keep
            });
            if left == 0 {
                return true;
            }
        }
        false
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
        // In use by their clients, over `size` if need be, or idle (see `adopt.rs`).
        let parked = self.counters.parked_count();
        status.size += self.counters.adopted.load(Ordering::Acquire) + parked;
        status.idle += parked;
        status.active = status.size - status.idle.min(status.size);
        status
    }

    /// Changes the limits in place: connections above a smaller size close when they are
    /// handed back, never while in use.
    pub fn set_limits(&self, limits: PoolLimits) {
        if let Some(reserve) = &self.reserve {
            reserve.resize(limits.reserve_size);
        }
        self.limits.store(Arc::new(limits));
        self.fit_to_adopted();
    }

    /// Sizes deadpool to what `size` leaves beside the connections handed over with their
    /// clients and still in use (`adopt.rs`), so that the pool opens no more than `size`
    /// in all; at least one, so that a client can always be served in the end. Called
    /// when one is adopted and by the janitor, which gives the room back once they are.
    pub(super) fn fit_to_adopted(&self) {
        let adopted = self.counters.adopted.load(Ordering::Acquire);
        let size = self.limits.load().size.saturating_sub(adopted).max(1);
        if self.main.status().max_size != size {
            self.main.resize(size);
        }
    }

    /// Retires every connection opened so far: idle ones close now, busy ones when they
    /// are released. New connections replace them.
    pub fn retire_connections(&self) {
        self.counters.generation.fetch_add(1, Ordering::AcqRel);
        self.close_idle();
    }

    /// Closes the idle connections now; the pool goes on serving (new connections).
    pub fn close_idle(&self) {
        self.counters.close_parked(usize::MAX);
        for (deadpool, _) in self.deadpools() {
            deadpool.retain(|_, _| false);
        }
    }

    /// Stops handing out connections: idle ones close now, busy ones when released.
    pub fn close(&self) {
        self.counters.closed.store(true, Ordering::Release);
        self.counters.close_parked(usize::MAX);
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

fn map_error(error: managed::PoolError<CreateError>) -> PoolError {
    match error {
        managed::PoolError::Timeout(TimeoutType::Create) => PoolError::ConnectTimeout,
        managed::PoolError::Timeout(_) => PoolError::WaitTimeout,
        managed::PoolError::Backend(CreateError::Upstream(error)) => PoolError::Connect(error),
        managed::PoolError::Backend(CreateError::Spent(kind)) => PoolError::Spent(kind),
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
    object: Option<Lent>,
    counters: Arc<PoolCounters>,
    budgets: Arc<PoolBudgets>,
}

/// Where a lent connection came from.
#[derive(Debug)]
enum Lent {
    Pooled(Object<ServerManager>),
    /// Handed over by the process this one took over from, with its client (`adopt.rs`):
    /// outside deadpool, parked for the pool when its client is done with it.
    Adopted(Pooled),
}

impl Checkout {
    /// Closes the connection instead of returning it.
    pub fn discard(mut self) {
        match self.object.take() {
            Some(Lent::Pooled(object)) => drop(Object::take(object)),
            Some(Lent::Adopted(pooled)) => self.close_adopted(pooled),
            None => {}
        }
    }

    /// The connection went to another process with its client: it leaves this pool and is
    /// closed here without a word, its server session untouched.
    pub fn hand_off(mut self) {
        if let Some(conn) = self.object.as_deref_mut() {
            conn.give_up_handed_over();
        }
        self.discard();
    }

    fn close_adopted(&self, pooled: Pooled) {
        self.counters.adopted.fetch_sub(1, Ordering::AcqRel);
        drop(pooled);
        if self.counters.limit_waiting.load(Ordering::Acquire) > 0 {
            self.counters.returned.notify_one();
        }
        self.budgets.wake_waiters();
    }

    /// An adopted connection back from its client: parked for the pool if it could serve
    /// another client, as a pooled one would go back, else closed.
    fn release_adopted(&self, mut pooled: Pooled) {
        let current = pooled.pool_generation == self.counters.generation.load(Ordering::Acquire);
        if !(pooled.is_reusable() && current) || self.counters.closed.load(Ordering::Acquire) {
            return self.close_adopted(pooled);
        }
        pooled.released_at = Instant::now();
        if let Some(registration) = &pooled.registration {
            registration.entry().set_state(LinkState::Idle);
        }
        self.counters.park(pooled);
        self.counters.adopted.fetch_sub(1, Ordering::AcqRel);
        if self.counters.closed.load(Ordering::Acquire) {
            // Closed while it was being parked: nothing will take it any more.
            self.counters.close_parked(usize::MAX);
        }
        if self.counters.limit_waiting.load(Ordering::Acquire) > 0 {
            self.counters.returned.notify_one();
        }
        self.budgets.wake_waiters();
    }
}

impl Deref for Lent {
    type Target = ServerConn;

    fn deref(&self) -> &ServerConn {
        match self {
            Lent::Pooled(object) => object,
            Lent::Adopted(pooled) => pooled,
        }
    }
}

impl DerefMut for Lent {
    fn deref_mut(&mut self) -> &mut ServerConn {
        match self {
            Lent::Pooled(object) => object,
            Lent::Adopted(pooled) => pooled,
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
        let mut object = match self.object.take() {
            Some(Lent::Pooled(object)) => object,
            Some(Lent::Adopted(pooled)) => return self.release_adopted(pooled),
            None => return,
        };
        let current = object.pool_generation == self.counters.generation.load(Ordering::Acquire);
        if object.is_reusable() && current {
            object.released_at = Instant::now();
            if let Some(registration) = &object.registration {
                registration.entry().set_state(LinkState::Idle);
            }
            drop(object);
            // A client held up by max_user_connections or max_db_connections may take
            // it: one of this pool's, or one of another pool that closes it.
            if self.counters.limit_waiting.load(Ordering::Acquire) > 0 {
                self.counters.returned.notify_one();
            }
            self.budgets.wake_waiters();
        } else {
            drop(Object::take(object));
        }
    }
}
