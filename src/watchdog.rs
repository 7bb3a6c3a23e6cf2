//! The watchdog: a plain thread outside the runtime that notices when a worker thread is
//! kept by one task (a poll that does not return) or when the worker runtime stops
//! turning, logs it with the client it can name, and counts it in
//! `pgrelay_runtime_stalls_total`.
//!
//! Tokio cannot preempt a task: a poll that never returns keeps its worker, and the
//! tasks queued behind it on that worker wait too. Such a poll is a bug; this makes it
//! visible instead of a silent outage. The cost on the data path is one atomic load and
//! two atomic stores per poll of a session, against a clock that this thread advances.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use dashmap::DashMap;

use crate::metrics::Metrics;
use crate::registry::Registry;

/// A poll longer than this, or a heartbeat older, is a stall.
pub const STALL_THRESHOLD: Duration = Duration::from_secs(1);
/// How often the watchdog advances its clock and looks.
const PERIOD: Duration = Duration::from_millis(100);
/// How often the heartbeat task on the worker runtime beats.
const HEARTBEAT: Duration = Duration::from_millis(100);

/// The running watchdog; its thread ends soon after this is dropped.
#[derive(Debug)]
pub struct Watchdog {
    shared: Arc<WatchdogShared>,
}

#[derive(Debug)]
struct WatchdogShared {
    started: Instant,
    /// Milliseconds since `started`, advanced by the watchdog thread: a clock that tasks
    /// read with one atomic load.
    now_ms: AtomicU64,
    /// `now_ms` when the heartbeat task last ran.
    heartbeat_ms: AtomicU64,
    clocks: DashMap<u64, Arc<PollClock>>,
    next_id: AtomicU64,
    stop: AtomicBool,
    metrics: Arc<Metrics>,
    registry: Arc<Registry>,
}

/// When the task of one connection started its current poll.
#[derive(Debug)]
struct PollClock {
    peer: SocketAddr,
    /// `now_ms + 1` at the start of the poll in progress; 0 outside a poll.
    polling_since: AtomicU64,
}

impl Watchdog {
    /// Starts the watchdog thread, and the heartbeat task on the current (worker) runtime.
    pub fn start(metrics: Arc<Metrics>, registry: Arc<Registry>) -> std::io::Result<Watchdog> {
        let shared = Arc::new(WatchdogShared {
            started: Instant::now(),
            now_ms: AtomicU64::new(0),
            heartbeat_ms: AtomicU64::new(0),
            clocks: DashMap::new(),
            next_id: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            metrics,
            registry,
        });
        let watcher = shared.clone();
        std::thread::Builder::new()
            .name("pgrelay-watchdog".to_owned())
            .spawn(move || watch(&watcher))?;
        let beating = Arc::downgrade(&shared);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(HEARTBEAT);
            loop {
                ticker.tick().await;
                let Some(shared) = beating.upgrade() else { return };
                if shared.stop.load(Ordering::Relaxed) {
                    return;
                }
                shared
                    .heartbeat_ms
                    .store(shared.now_ms.load(Ordering::Relaxed), Ordering::Relaxed);
            }
        });
        Ok(Watchdog { shared })
    }

    /// Frees the room the map kept for tasks that are gone.
    pub fn shrink(&self) {
        self.shared.clocks.shrink_to_fit();
    }

    /// Wraps the task of the client at `peer` so that a poll of it that runs too long is
    /// noticed and the client named.
    pub fn watch<F: Future>(&self, peer: SocketAddr, future: F) -> Watched<F> {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let clock = Arc::new(PollClock {
            peer,
            polling_since: AtomicU64::new(0),
        });
        self.shared.clocks.insert(id, clock.clone());
        Watched {
            future: Box::pin(future),
            clock,
            id,
            shared: self.shared.clone(),
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
    }
}

/// A task whose polls the watchdog times.
pub struct Watched<F> {
    future: Pin<Box<F>>,
    clock: Arc<PollClock>,
    id: u64,
    shared: Arc<WatchdogShared>,
}

impl<F: Future> Future for Watched<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let now = self.shared.now_ms.load(Ordering::Relaxed);
        self.clock.polling_since.store(now + 1, Ordering::Relaxed);
        let result = self.future.as_mut().poll(cx);
        self.clock.polling_since.store(0, Ordering::Relaxed);
        result
    }
}

impl<F> Drop for Watched<F> {
    fn drop(&mut self) {
        self.shared.clocks.remove(&self.id);
    }
}

/// The watchdog thread: advances the clock, and reports each stall once.
fn watch(shared: &WatchdogShared) {
    let threshold = u64::try_from(STALL_THRESHOLD.as_millis()).unwrap_or(u64::MAX);
    // The poll start (or heartbeat) of each stall already reported: a stall is reported
    // when it passes the threshold, not again at every look.
    let mut reported: HashMap<u64, u64> = HashMap::new();
    let mut heartbeat_reported = None;
    while !shared.stop.load(Ordering::Relaxed) {
        std::thread::sleep(PERIOD);
        let now = u64::try_from(shared.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        shared.now_ms.store(now, Ordering::Relaxed);

        let heartbeat = shared.heartbeat_ms.load(Ordering::Relaxed);
        if now.saturating_sub(heartbeat) > threshold && heartbeat_reported != Some(heartbeat) && now > threshold {
            heartbeat_reported = Some(heartbeat);
            shared.metrics.runtime_stall();
            tracing::error!(
                missed_for_ms = now - heartbeat,
                "runtime stall: the worker runtime missed its heartbeat; every worker thread is kept by a task \
                 (the admin console and /metrics still answer from their own thread)"
            );
        }

        reported.retain(|id, _| shared.clocks.contains_key(id));
        for entry in &shared.clocks {
            let since = entry.value().polling_since.load(Ordering::Relaxed);
            if since == 0 || (now + 1).saturating_sub(since) <= threshold || reported.get(entry.key()) == Some(&since) {
                continue;
            }
            reported.insert(*entry.key(), since);
            shared.metrics.runtime_stall();
            report_stuck_client(shared, entry.value().peer, now + 1 - since);
        }
    }
}

fn report_stuck_client(shared: &WatchdogShared, peer: SocketAddr, for_ms: u64) {
    let client = shared.registry.clients().into_iter().find(|client| client.addr == peer);
    match client {
        Some(client) => tracing::error!(
            client = %peer,
            database = %client.database,
            user = %client.user,
            client_id = client.id,
            polling_for_ms = for_ms,
            "runtime stall: one poll of this client's session keeps a worker thread; other clients on that \
             worker wait. This is a bug in pgrelay: please report it with this log line"
        ),
        None => tracing::error!(
            client = %peer,
            polling_for_ms = for_ms,
            "runtime stall: one poll of this connection (before login) keeps a worker thread; other clients on \
             that worker wait. This is a bug in pgrelay: please report it with this log line"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Three workers: the one kept by the test's task and two for the heartbeat.
    #[tokio::test(flavor = "multi_thread", worker_threads = 3)]
    async fn a_poll_that_does_not_return_is_counted_once_and_named() {
        let metrics = Arc::new(Metrics::new().unwrap());
        let registry = Arc::new(Registry::default());
        let watchdog = Watchdog::start(metrics.clone(), registry).unwrap();
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let stuck = watchdog.watch(peer, async {
            // A poll that keeps its thread for 1.5 s, as a bug would.
            std::thread::sleep(STALL_THRESHOLD + Duration::from_millis(500));
        });
        tokio::spawn(stuck).await.unwrap();
        let stalls = || {
            metrics
                .gather()
                .iter()
                .find(|family| family.name() == "pgrelay_runtime_stalls_total")
                .map(|family| family.get_metric()[0].get_counter().get_value())
        };
        assert_eq!(stalls(), Some(1.0), "one stall, counted once");
        // Quick polls are no stall.
        let quick = watchdog.watch(peer, tokio::time::sleep(Duration::from_millis(300)));
        quick.await;
        assert_eq!(stalls(), Some(1.0));
    }
}
