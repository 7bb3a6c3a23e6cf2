//! Limits that span pools: `max_user_connections` (server connections of one user over
//! every database and host) and `max_db_connections` (of one database over every user and
//! host).
//!
//! Each open server connection holds a [`BudgetPermit`] on the budget of its user and the
//! budget of its database; the permit goes when the connection closes. A pool that needs a
//! new connection while a budget is spent first closes an idle connection of another pool
//! under the same budget (as PgBouncer does), and otherwise its client waits, like one
//! waiting for a full pool, until a connection of its own pool comes back or one under the
//! budget closes, bounded by query_wait_timeout.
//!
//! Budgets are keyed by name, not by config entry: users that are not in `[[users]]` (found
//! by `auth_query`) count like any other. The limit is not kept here: each pool checks its
//! own (`PoolLimits`), which for `max_user_connections` is its user's (a `[[users]]` entry's
//! own, else `[pool]`'s), the same in every pool of that user. They outlive reloads: a pool carried over keeps
//! its permits, and a new pool of the same user finds the same budget.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::Notify;

use super::{PoolCounters, ServerPool};

/// Which limit a budget enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetKind {
    User,
    Database,
}

impl BudgetKind {
    /// The config key, for messages.
    pub fn key(self) -> &'static str {
        match self {
            BudgetKind::User => "max_user_connections",
            BudgetKind::Database => "max_db_connections",
        }
    }
}

/// The server connections open under one user name or one database name.
#[derive(Debug)]
pub struct Budget {
    kind: BudgetKind,
    name: String,
    open: AtomicUsize,
    /// Clients waiting because this budget (or the other one of their pool) is spent.
    waiting: AtomicUsize,
    /// Wakes waiting clients when a connection under this budget closes, or comes back idle
    /// while someone waits (it may then be closed for a pool that needs a new one).
    changed: Notify,
    /// The pools under this budget, for closing an idle connection of another pool.
    members: Mutex<Vec<Weak<ServerPool>>>,
}

impl Budget {
    fn new(kind: BudgetKind, name: &str) -> Budget {
        Budget {
            kind,
            name: name.to_owned(),
            open: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            changed: Notify::new(),
            members: Mutex::new(Vec::new()),
        }
    }

    pub fn kind(&self) -> BudgetKind {
        self.kind
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Server connections open under this budget now (being opened included).
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Takes one place if fewer than `limit` are taken (`None`: no limit).
    fn try_take(&self, limit: Option<usize>) -> bool {
        let mut open = self.open.load(Ordering::Acquire);
        loop {
            if limit.is_some_and(|limit| open >= limit) {
                return false;
            }
            match self
                .open
                .compare_exchange_weak(open, open + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return true,
                Err(now) => open = now,
            }
        }
    }

    fn give_back(&self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
        self.wake_waiters();
    }

    /// Wakes every client waiting on this budget, if any: they try again in the order they
    /// were woken. Rare (a connection closed, or came back while a budget was spent).
    pub(super) fn wake_waiters(&self) {
        if self.waiting.load(Ordering::Acquire) > 0 {
            self.changed.notify_waiters();
        }
    }

    pub(super) fn changed(&self) -> &Notify {
        &self.changed
    }

    fn join(&self, pool: &Arc<ServerPool>) {
        if let Ok(mut members) = self.members.lock() {
            members.retain(|member| member.strong_count() > 0);
            members.push(Arc::downgrade(pool));
        }
    }

    /// Closes one idle connection of a pool under this budget other than the one counting
    /// with `except`. Returns whether one was closed (its permit is back when this returns).
    fn close_idle_elsewhere(&self, except: &PoolCounters) -> bool {
        let members: Vec<Arc<ServerPool>> = match self.members.lock() {
            Ok(members) => members.iter().filter_map(Weak::upgrade).collect(),
            Err(_) => return false,
        };
        members
            .iter()
            .filter(|pool| !std::ptr::eq(pool.counters(), except))
            .any(|pool| pool.close_one_idle())
    }
}

/// The two budgets of one pool, and the limits it checks them against.
#[derive(Debug)]
pub struct PoolBudgets {
    pub user: Arc<Budget>,
    pub database: Arc<Budget>,
}

/// Why a pool may not open a connection now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spent(pub BudgetKind);

impl PoolBudgets {
    /// Takes a place in both budgets for a new connection of the pool counting with
    /// `pool`, closing an idle connection of another pool under a spent budget if there is
    /// one.
    pub(super) fn take(
        self: &Arc<Self>,
        pool: &PoolCounters,
        user_limit: Option<usize>,
        database_limit: Option<usize>,
    ) -> Result<BudgetPermit, Spent> {
        // Two tries: the second after closing someone else's idle connection.
        for attempt in 0..2 {
            if self.user.try_take(user_limit) {
                if self.database.try_take(database_limit) {
                    return Ok(BudgetPermit { budgets: self.clone() });
                }
                self.user.give_back();
                if attempt == 1 || !self.database.close_idle_elsewhere(pool) {
                    return Err(Spent(BudgetKind::Database));
                }
            } else if attempt == 1 || !self.user.close_idle_elsewhere(pool) {
                return Err(Spent(BudgetKind::User));
            }
        }
        Err(Spent(BudgetKind::User))
    }

    /// Takes a place in both budgets even if that goes over their limits: for a connection
    /// that is open already (handed over by the process this one took over from).
    pub(super) fn take_regardless(self: &Arc<Self>) -> BudgetPermit {
        self.user.open.fetch_add(1, Ordering::AcqRel);
        self.database.open.fetch_add(1, Ordering::AcqRel);
        BudgetPermit { budgets: self.clone() }
    }

    pub(super) fn join(&self, pool: &Arc<ServerPool>) {
        self.user.join(pool);
        self.database.join(pool);
    }

    pub(super) fn start_waiting(&self) {
        self.user.waiting.fetch_add(1, Ordering::AcqRel);
        self.database.waiting.fetch_add(1, Ordering::AcqRel);
    }

    pub(super) fn stop_waiting(&self) {
        self.user.waiting.fetch_sub(1, Ordering::AcqRel);
        self.database.waiting.fetch_sub(1, Ordering::AcqRel);
    }

    /// Whether a client of another pool may be waiting for a place in these budgets.
    pub(super) fn wake_waiters(&self) {
        self.user.wake_waiters();
        self.database.wake_waiters();
    }
}

/// One open server connection's place in its budgets; given back when dropped.
#[derive(Debug)]
pub struct BudgetPermit {
    budgets: Arc<PoolBudgets>,
}

impl Drop for BudgetPermit {
    fn drop(&mut self) {
        self.budgets.user.give_back();
        self.budgets.database.give_back();
    }
}

/// Every budget in use, by name. Entries go when no pool uses them any more.
#[derive(Debug, Default)]
pub struct Budgets {
    users: Mutex<HashMap<String, Weak<Budget>>>,
    databases: Mutex<HashMap<String, Weak<Budget>>>,
}

impl Budgets {
    /// The budgets a new pool of `user` in `database` counts against.
    pub fn for_pool(&self, user: &str, database: &str) -> Arc<PoolBudgets> {
        Arc::new(PoolBudgets {
            user: find_or_add(&self.users, BudgetKind::User, user),
            database: find_or_add(&self.databases, BudgetKind::Database, database),
        })
    }

    /// Open server connections per user name, for SHOW USERS and the metrics.
    pub fn users(&self) -> Vec<Arc<Budget>> {
        live(&self.users)
    }

    /// Open server connections per database name.
    pub fn databases(&self) -> Vec<Arc<Budget>> {
        live(&self.databases)
    }

    /// Open server connections of `database`, 0 if it has no pool.
    pub fn database_open(&self, database: &str) -> usize {
        self.databases
            .lock()
            .ok()
            .and_then(|map| map.get(database).and_then(Weak::upgrade))
            .map_or(0, |budget| budget.open())
    }
}

fn find_or_add(map: &Mutex<HashMap<String, Weak<Budget>>>, kind: BudgetKind, name: &str) -> Arc<Budget> {
    let Ok(mut map) = map.lock() else {
        // A poisoned map only loses sharing: this pool then counts on its own.
        return Arc::new(Budget::new(kind, name));
    };
    if let Some(budget) = map.get(name).and_then(Weak::upgrade) {
        return budget;
    }
    // Pools are created rarely: sweeping here keeps the map as small as the pools.
    map.retain(|_, budget| budget.strong_count() > 0);
    let budget = Arc::new(Budget::new(kind, name));
    map.insert(name.to_owned(), Arc::downgrade(&budget));
    budget
}

fn live(map: &Mutex<HashMap<String, Weak<Budget>>>) -> Vec<Arc<Budget>> {
    let mut all: Vec<Arc<Budget>> = map
        .lock()
        .map(|map| map.values().filter_map(Weak::upgrade).collect())
        .unwrap_or_default();
    all.sort_by(|a, b| a.name.cmp(&b.name));
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_taken_up_to_the_limit_and_given_back() {
        let budget = Budget::new(BudgetKind::User, "app");
        assert!(budget.try_take(Some(2)));
        assert!(budget.try_take(Some(2)));
        assert!(!budget.try_take(Some(2)));
        assert!(budget.try_take(None), "no limit");
        assert_eq!(budget.open(), 3);
        budget.give_back();
        budget.give_back();
        assert!(budget.try_take(Some(2)));
    }

    #[test]
    fn a_connection_taken_regardless_counts_over_the_limit() {
        let budgets = Budgets::default().for_pool("app", "db1");
        let counters = PoolCounters::default();
        let first = budgets.take(&counters, Some(1), Some(1)).unwrap();
        let over = budgets.take_regardless();
        assert_eq!((budgets.user.open(), budgets.database.open()), (2, 2));
        drop(first);
        assert!(
            budgets.take(&counters, Some(1), Some(1)).is_err(),
            "still over the limit"
        );
        drop(over);
        assert!(budgets.take(&counters, Some(1), Some(1)).is_ok());
    }

    #[test]
    fn budgets_are_shared_by_name_and_forgotten_when_unused() {
        let budgets = Budgets::default();
        let a = budgets.for_pool("app", "db1");
        let b = budgets.for_pool("app", "db2");
        assert!(Arc::ptr_eq(&a.user, &b.user));
        assert!(!Arc::ptr_eq(&a.database, &b.database));
        assert_eq!(budgets.users().len(), 1);
        assert_eq!(budgets.databases().len(), 2);
        drop(b);
        assert_eq!(budgets.databases().len(), 1);
        assert_eq!(budgets.database_open("db1"), 0);
    }
}
