//! The background monitor of one database's servers: a task per host keeps a side connection
//! open and runs the health query on it; every answer or failure goes through the [`Tracker`]
//! and a new [`ClusterView`] is published for routing to load per transaction.
//!
//! Cadence. The health query is cheap (see `probe`), so it runs at the LSN cadence, every
//! `lsn_poll_interval` (50 ms by default, never slower than `health_check_interval`), rather
//! than once per health check with a second, lighter query in between: session consistency
//! routes a client's reads to a replica only once the view shows it replayed the client's
//! commit, so every millisecond of staleness in `replay_lsn` is a read sent to the primary;
//! with a 1 s health check a replica that is milliseconds behind would look a second behind.
//! One query for both also means a promotion is seen within one poll. The cost is bounded:
//! one round trip per host per poll on one connection (20 a second per host by default, each
//! well under a millisecond of server CPU), and nothing while a host is down, where
//! reconnection is tried once per `health_check_interval`.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tokio::time::{Instant, MissedTickBehavior};

use super::HostHealth;
use super::error::ClusterError;
use super::lsn::Lsn;
use super::probe::{Failure, Probe, side_config};
use super::state::{Event, Tracker};
use super::view::ClusterView;

/// Default for [`MonitorSettings::lsn_poll_interval`].
pub const DEFAULT_LSN_POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Floor for both intervals: a zero period would spin.
const MIN_INTERVAL: Duration = Duration::from_millis(10);
/// A health query gets at least this long (a busy server may take a while to schedule even a
/// trivial query; marking it down for that would flap) ...
const MIN_QUERY_TIMEOUT: Duration = Duration::from_secs(1);
/// ... and at most this long, whatever the health-check interval: a stuck server must be
/// marked down in seconds.
const MAX_QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// Connect timeout used when the configured one is 0 ("no limit"): a black-holed host would
/// otherwise hold the probe for the kernel's TCP timeout (minutes).
const FALLBACK_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What to monitor and how.
#[derive(Debug, Clone)]
pub struct MonitorSettings {
    /// The database's name in pgrelay (for logs).
    pub database: String,
    /// The database's name on the servers.
    pub dbname: String,
    /// `host:port` of each server: the configured primary first, then the replicas in
    /// configuration order. Indexes into [`ClusterView::hosts`] follow this order.
    pub hosts: Vec<Arc<str>>,
    pub user: String,
    /// Plaintext; tokio-postgres answers SCRAM, md5 or cleartext requests with it.
    pub password: Option<String>,
    pub health_check_interval: Duration,
    /// Replicas further behind get no reads; `None`: no limit.
    pub max_replica_lag: Option<Duration>,
    /// 0 means 10 s (see `FALLBACK_CONNECT_TIMEOUT`).
    pub connect_timeout: Duration,
    /// How often positions are polled ([`DEFAULT_LSN_POLL_INTERVAL`] unless there is a reason).
    pub lsn_poll_interval: Duration,
    /// TLS as the database's `server_tls` asks; `None`: plain TCP.
    pub tls: Option<MonitorTls>,
}

/// TLS for the side connections: the same rustls settings as the pooled connections of the
/// database, with libpq's `prefer` (try TLS, fall back to plain) or `require`.
#[derive(Clone)]
pub struct MonitorTls {
    pub mode: tokio_postgres::config::SslMode,
    pub connector: tokio_postgres_rustls::MakeRustlsConnect,
}

impl std::fmt::Debug for MonitorTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MonitorTls")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy)]
struct Timing {
    health_check_interval: Duration,
    poll_interval: Duration,
    connect_timeout: Duration,
    query_timeout: Duration,
}

impl Timing {
    fn new(settings: &MonitorSettings) -> Self {
        let health_check_interval = settings.health_check_interval.max(MIN_INTERVAL);
        Timing {
            health_check_interval,
            poll_interval: settings.lsn_poll_interval.clamp(MIN_INTERVAL, health_check_interval),
            connect_timeout: if settings.connect_timeout.is_zero() {
                FALLBACK_CONNECT_TIMEOUT
            } else {
                settings.connect_timeout
            },
            query_timeout: health_check_interval.clamp(MIN_QUERY_TIMEOUT, MAX_QUERY_TIMEOUT),
        }
    }
}

/// State shared by the host tasks and the monitor handle. The tasks hold this, not the
/// monitor, so dropping the last handle stops them.
struct Shared {
    /// A std mutex: held for a few microseconds per event (no `.await` inside), by one host
    /// task at a time, never on the routing path (which reads `view`).
    tracker: Mutex<Tracker>,
    view: ArcSwap<ClusterView>,
    changes: watch::Sender<Arc<ClusterView>>,
}

impl Shared {
    fn apply(&self, index: usize, event: Event) {
        let mut tracker = self.tracker.lock().unwrap_or_else(PoisonError::into_inner);
        tracker.apply(index, event);
        let view = Arc::new(tracker.view(std::time::Instant::now()));
        // Stored under the lock so a later view never gets overwritten by an earlier one.
        let previous = self.view.swap(view.clone());
        if previous.standing_differs(&view) {
            self.changes.send_replace(view);
        }
    }

    fn tracker(&self) -> std::sync::MutexGuard<'_, Tracker> {
        self.tracker.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Watches one database's servers until stopped or dropped.
pub struct ClusterMonitor {
    database: String,
    max_replica_lag: Option<Duration>,
    shared: Arc<Shared>,
    health: Vec<Arc<HostHealth>>,
    tasks: Vec<AbortHandle>,
}

impl std::fmt::Debug for ClusterMonitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterMonitor")
            .field("database", &self.database)
            .field("view", &self.shared.view.load())
            .finish_non_exhaustive()
    }
}

impl ClusterMonitor {
    /// Spawns a task per host on the current tokio runtime and returns at once; until a host's
    /// first check finishes it is down with an unknown role (so it takes no reads) and the
    /// configured primary is the primary.
    pub fn start(settings: MonitorSettings) -> Result<Arc<ClusterMonitor>, ClusterError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| ClusterError::NoRuntime)?;
        if settings.hosts.is_empty() {
            return Err(ClusterError::NoHosts(settings.database));
        }
        let mut configs = Vec::with_capacity(settings.hosts.len());
        for addr in &settings.hosts {
            configs.push(side_config(&settings, addr)?);
        }
        let timing = Timing::new(&settings);
        let tracker = Tracker::new(settings.database.clone(), &settings.hosts, settings.max_replica_lag);
        let health = (0..settings.hosts.len())
            .filter_map(|index| tracker.health(index).cloned())
            .collect();
        let view = Arc::new(tracker.view(std::time::Instant::now()));
        let shared = Arc::new(Shared {
            tracker: Mutex::new(tracker),
            view: ArcSwap::new(view.clone()),
            changes: watch::Sender::new(view),
        });
        let tasks = configs
            .into_iter()
            .enumerate()
            .map(|(index, config)| {
                runtime
                    .spawn(run_host(
                        Arc::clone(&shared),
                        index,
                        config,
                        settings.tls.as_ref().map(|tls| tls.connector.clone()),
                        timing,
                    ))
                    .abort_handle()
            })
            .collect();
        tracing::debug!(
            database = settings.database,
            hosts = settings.hosts.len(),
            ?timing,
            "cluster monitor started"
        );
        Ok(Arc::new(ClusterMonitor {
            database: settings.database,
            max_replica_lag: settings.max_replica_lag,
            shared,
            health,
            tasks,
        }))
    }

    /// The latest view: one atomic load, fine per transaction.
    pub fn view(&self) -> Arc<ClusterView> {
        self.shared.view.load_full()
    }

    /// Receives a view whenever the primary, split brain, or a host's up/role/generation/read
    /// usability changes. Positions and lags move far more often and do not notify: read them
    /// from [`Self::view`].
    pub fn subscribe(&self) -> watch::Receiver<Arc<ClusterView>> {
        self.shared.changes.subscribe()
    }

    /// Waits until every host has been checked once (answered or failed), at most `timeout`.
    /// Returns whether they all were.
    pub async fn first_check(&self, timeout: Duration) -> bool {
        let mut changes = self.subscribe();
        let checked = changes.wait_for(|view| view.all_checked());
        matches!(tokio::time::timeout(timeout, checked).await, Ok(Ok(_)))
    }

    /// The primary's WAL position as last polled, while it is up and out of recovery.
    pub fn primary_lsn(&self) -> Option<Lsn> {
        self.shared.view.load().primary_lsn()
    }

    /// The ban state of host `index` (same order as the view). The monitor lifts a ban when a
    /// host that was down answers again; routing sets them on refused connections.
    pub fn health(&self, index: usize) -> Option<&Arc<HostHealth>> {
        self.health.get(index)
    }

    /// Split-brain episodes since start (several servers out of recovery at once; one count
    /// per episode, however long it lasts).
    pub fn split_brain_events(&self) -> u64 {
        self.shared.tracker().split_brain_events()
    }

    /// Times the host writes go to changed since start (failovers).
    pub fn primary_changes(&self) -> u64 {
        self.shared.tracker().primary_changes()
    }

    pub fn database(&self) -> &str {
        &self.database
    }

    pub fn max_replica_lag(&self) -> Option<Duration> {
        self.max_replica_lag
    }

    /// Stops the host tasks (closing their connections). The last view stays readable.
    pub fn stop(&self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Drop for ClusterMonitor {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One host, forever: connect, poll until a failure, reconnect. Connection attempts start at
/// most once per health-check interval, so a server that refuses, or kills every session
/// quickly, is not hammered. A connection that had been answering and breaks is not yet a
/// failed check: a backend killed by an administrator is not a server down, so the host is
/// marked down only if reconnecting fails too. Everything else is a failed check at once.
async fn run_host(
    shared: Arc<Shared>,
    index: usize,
    config: tokio_postgres::Config,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    timing: Timing,
) {
    let mut next_attempt = Instant::now();
    let mut lost: Option<String> = None;
    loop {
        tokio::time::sleep_until(next_attempt).await;
        next_attempt = Instant::now() + timing.health_check_interval;
        let probe = Probe::connect(&config, tls.as_ref(), timing.connect_timeout, timing.query_timeout).await;
        let (probe, started) = match probe {
            Ok(connected) => connected,
            Err(failure) => {
                let error = failure.to_string();
                let error = match lost.take() {
                    Some(lost) => format!("{lost}; reconnecting: {error}"),
                    None => error,
                };
                shared.apply(index, Event::Failed { error });
                continue;
            }
        };
        lost = None;
        shared.apply(index, Event::Connected { started });
        let (failure, answered) = poll(&shared, index, &probe, timing).await;
        drop(probe);
        match failure {
            Failure::Error(error) if answered => {
                tracing::debug!(host = index, %error, "monitor connection lost; reconnecting");
                lost = Some(format!("connection lost: {error}"));
            }
            failure => shared.apply(
                index,
                Event::Failed {
                    error: failure.to_string(),
                },
            ),
        }
    }
}

/// Runs the health query every poll interval until it fails; returns the failure and whether
/// any query answered on this connection.
async fn poll(shared: &Shared, index: usize, probe: &Probe, timing: Timing) -> (Failure, bool) {
    let mut ticker = tokio::time::interval(timing.poll_interval);
    // After a slow answer, wait a full interval again rather than firing a burst.
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut answered = false;
    loop {
        ticker.tick().await;
        match probe.sample(timing.query_timeout).await {
            Ok(sample) => {
                answered = true;
                shared.apply(index, Event::Answered(sample));
            }
            Err(failure) => return (failure, answered),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(hosts: &[&str]) -> MonitorSettings {
        MonitorSettings {
            database: "db".into(),
            dbname: "db".into(),
            hosts: hosts.iter().map(|&h| Arc::from(h)).collect(),
            user: "u".into(),
            password: None,
            health_check_interval: Duration::from_secs(1),
            max_replica_lag: None,
            connect_timeout: Duration::ZERO,
            lsn_poll_interval: DEFAULT_LSN_POLL_INTERVAL,
            tls: None,
        }
    }

    #[test]
    fn timing_is_bounded() {
        let mut s = settings(&["h:1"]);
        let t = Timing::new(&s);
        assert_eq!(t.poll_interval, DEFAULT_LSN_POLL_INTERVAL);
        assert_eq!(t.query_timeout, Duration::from_secs(1));
        assert_eq!(t.connect_timeout, FALLBACK_CONNECT_TIMEOUT);
        s.health_check_interval = Duration::ZERO;
        s.lsn_poll_interval = Duration::ZERO;
        let t = Timing::new(&s);
        assert_eq!((t.health_check_interval, t.poll_interval), (MIN_INTERVAL, MIN_INTERVAL));
        s.health_check_interval = Duration::from_secs(60);
        s.lsn_poll_interval = Duration::from_secs(120);
        let t = Timing::new(&s);
        assert_eq!(
            t.poll_interval,
            Duration::from_secs(60),
            "never slower than the health check"
        );
        assert_eq!(t.query_timeout, MAX_QUERY_TIMEOUT);
    }

    #[test]
    fn start_refuses_bad_settings_without_panicking() {
        assert!(matches!(
            ClusterMonitor::start(settings(&["h:1"])),
            Err(ClusterError::NoRuntime)
        ));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let _guard = runtime.enter();
        assert!(matches!(
            ClusterMonitor::start(settings(&[])),
            Err(ClusterError::NoHosts(_))
        ));
        assert!(matches!(
            ClusterMonitor::start(settings(&["h:1", "nope"])),
            Err(ClusterError::BadAddress(addr)) if addr == "nope"
        ));
    }
}
