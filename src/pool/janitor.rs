//! Background upkeep of one pool: closes connections idle longer than
//! server_idle_timeout or older than server_lifetime (never below min_size), and opens
//! connections up to min_size while nobody is waiting; gives back the room that connections
//! handed over at a takeover held once their clients are done with them.

use std::sync::{Arc, Weak};
use std::time::Duration;

use super::ServerPool;

/// How often the janitor looks at a pool.
const PERIOD: Duration = Duration::from_millis(500);

pub(super) fn spawn(pool: &Arc<ServerPool>) {
    let weak = Arc::downgrade(pool);
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(PERIOD);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let Some(pool) = Weak::upgrade(&weak) else { return };
            if pool.is_closed() {
                return;
            }
            expire_idle(&pool);
            pool.fit_to_adopted();
            fill_to_min_size(&pool).await;
        }
    });
}

fn expire_idle(pool: &ServerPool) {
    let limits = pool.limits();
    if let Some(timeout) = limits.idle_timeout {
        pool.counters.expire_parked(timeout);
    }
    for (deadpool, is_reserve) in pool.deadpools() {
        let mut size = deadpool.status().size;
        // Reserve connections are for bursts: they go as soon as they are idle at all.
        let min_size = if is_reserve { 0 } else { limits.min_size };
        deadpool.retain(|conn, metrics| {
            let too_old = limits.lifetime.is_some_and(|lifetime| metrics.age() >= lifetime);
            let idle_for = conn.released_at.elapsed();
            let idle_too_long = if is_reserve {
                idle_for >= PERIOD
            } else {
                limits.idle_timeout.is_some_and(|timeout| idle_for >= timeout)
            };
            let expired = too_old || (idle_too_long && size > min_size);
            let keep = !conn.is_broken() && !expired;
            if !keep {
                size -= 1;
            }
            keep
        });
    }
}

async fn fill_to_min_size(pool: &ServerPool) {
    let min_size = pool.limits().min_size;
    if pool.main_size() >= min_size || pool.waiting() > 0 || pool.is_closed() {
        return;
    }
    // deadpool hands out idle connections before it creates new ones, so the idle ones
    // are held too until enough new ones exist. This never delays a client: below
    // min_size the pool has room to open a connection for anyone who asks meanwhile.
    let mut held = Vec::new();
    while pool.main_size() < min_size && held.len() < min_size {
        match pool.take_without_waiting().await {
            Ok(checkout) => held.push(checkout),
            Err(_) => break,
        }
    }
}
