//! The monitor's bookkeeping, free of I/O: what each host answered, which host is the primary,
//! split-brain episodes, and replica lag. The probes feed it [`Event`]s; after each one it
//! builds the next [`ClusterView`]. Time is passed in, so the tests drive it with made-up
//! instants.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::HostHealth;
use super::lsn::Lsn;
use super::view::{ClusterView, HostView, Role};

/// How far back the primary's WAL positions are remembered for measuring lag (see
/// [`PrimaryHistory`]). Lag beyond this is measured by replay timestamps only.
const HISTORY_WINDOW: Duration = Duration::from_secs(60);
/// Bound on the history's length whatever the poll rate (20 polls a second for a minute is
/// 1,200 entries when every poll sees a new position).
const HISTORY_MAX_ENTRIES: usize = 4096;

/// One answer of the health query.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Sample {
    /// `pg_is_in_recovery()`.
    pub in_recovery: bool,
    /// In recovery `pg_last_wal_replay_lsn()`, otherwise `pg_current_wal_insert_lsn()`: what
    /// is visible there.
    pub lsn: Option<Lsn>,
    /// In recovery `pg_last_wal_receive_lsn()`, otherwise `pg_current_wal_flush_lsn()`: the
    /// end of the WAL it has on disk (for a primary, what replicas can have been sent).
    pub flushed_lsn: Option<Lsn>,
    /// `now() - pg_last_xact_replay_timestamp()` on the server, clamped at 0; `None` when it
    /// never replayed a transaction.
    pub replay_age: Option<Duration>,
    /// When the query was sent: the server was at `lsn` no earlier than this.
    pub sent_at: Instant,
}

/// What a probe reports about its host.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Event {
    /// A new side connection is open; `started` is `pg_postmaster_start_time()` as text.
    Connected {
        started: String,
    },
    Answered(Sample),
    Failed {
        error: String,
    },
}

#[derive(Debug)]
struct HostState {
    addr: Arc<str>,
    health: Arc<HostHealth>,
    checked: bool,
    up: bool,
    role: Role,
    generation: u64,
    started: Option<String>,
    last: Option<Sample>,
}

/// The flush positions the current primary was seen at, each with the last time it was seen
/// there, positions strictly increasing. (Flush rather than insert: a replica can only have
/// flushed WAL; the difference in time is at most `wal_writer_delay`.) If a replica has replayed up to R and the primary was
/// at P ≤ R at time t, every commit before t is visible on the replica: it is at most `now - t`
/// stale. This works on an idle primary, needs no clock agreement between servers, and is not
/// fooled by WAL that is not a transaction (checkpoints, standby snapshots), unlike
/// `pg_last_xact_replay_timestamp()` alone.
#[derive(Debug, Default)]
struct PrimaryHistory {
    entries: VecDeque<(Lsn, Instant)>,
}

impl PrimaryHistory {
    fn record(&mut self, lsn: Lsn, at: Instant) {
        match self.entries.back_mut() {
            Some((last, seen)) if *last == lsn => *seen = (*seen).max(at),
            Some((last, _)) if *last > lsn => {
                // Went backwards: not the same WAL stream any more (a rebuilt server). What was
                // recorded says nothing about the new one.
                self.entries.clear();
                self.entries.push_back((lsn, at));
            }
            _ => self.entries.push_back((lsn, at)),
        }
        while self.entries.len() > HISTORY_MAX_ENTRIES
            || self
                .entries
                .front()
                .is_some_and(|(_, seen)| at.saturating_duration_since(*seen) > HISTORY_WINDOW)
        {
            self.entries.pop_front();
        }
    }

    /// Upper bound of the staleness of a replica that has replayed up to `replay`, or `None`
    /// when the history does not reach back that far.
    fn staleness(&self, replay: Lsn, now: Instant) -> Option<Duration> {
        let newer = self.entries.partition_point(|(lsn, _)| *lsn <= replay);
        if newer == self.entries.len() && newer > 0 {
            return Some(Duration::ZERO);
        }
        let (_, seen) = self.entries.get(newer.checked_sub(1)?)?;
        Some(now.saturating_duration_since(*seen))
    }

    fn clear(&mut self) {
        self.entries.clear();
    }
}

/// Everything the monitor knows about one database's servers.
#[derive(Debug)]
pub(crate) struct Tracker {
    database: String,
    max_replica_lag: Option<Duration>,
    hosts: Vec<HostState>,
    /// The host writes go to (see [`ClusterView::primary`]).
    current: Option<usize>,
    split_brain: bool,
    history: PrimaryHistory,
    split_brain_events: u64,
    primary_changes: u64,
}

impl Tracker {
    pub(crate) fn new(database: String, addrs: &[Arc<str>], max_replica_lag: Option<Duration>) -> Self {
        Tracker {
            database,
            max_replica_lag,
            hosts: addrs
                .iter()
                .map(|addr| HostState {
                    addr: addr.clone(),
                    health: Arc::new(HostHealth::new(addr.clone())),
                    checked: false,
                    up: false,
                    role: Role::Unknown,
                    generation: 0,
                    started: None,
                    last: None,
                })
                .collect(),
            current: if addrs.is_empty() { None } else { Some(0) },
            split_brain: false,
            history: PrimaryHistory::default(),
            split_brain_events: 0,
            primary_changes: 0,
        }
    }

    pub(crate) fn health(&self, index: usize) -> Option<&Arc<HostHealth>> {
        self.hosts.get(index).map(|host| &host.health)
    }

    pub(crate) fn split_brain_events(&self) -> u64 {
        self.split_brain_events
    }

    pub(crate) fn primary_changes(&self) -> u64 {
        self.primary_changes
    }

    /// Takes in what host `index` reported.
    pub(crate) fn apply(&mut self, index: usize, event: Event) {
        let database = self.database.as_str();
        let Some(host) = self.hosts.get_mut(index) else {
            return;
        };
        let generation_before = host.generation;
        match event {
            Event::Connected { started } => {
                if host.started.as_ref().is_some_and(|before| *before != started) {
                    host.generation += 1;
                    tracing::info!(database, host = %host.addr, started, "server restarted");
                }
                host.started = Some(started);
            }
            Event::Failed { error } => {
                if host.up || !host.checked {
                    tracing::warn!(database, host = %host.addr, error, "server check failed; marked down");
                } else {
                    tracing::debug!(database, host = %host.addr, error, "server still down");
                }
                host.checked = true;
                host.up = false;
            }
            Event::Answered(sample) => {
                let role = if sample.in_recovery {
                    Role::Replica
                } else {
                    Role::Primary
                };
                if host.role != Role::Unknown && host.role != role {
                    host.generation += 1;
                    tracing::warn!(database, host = %host.addr, from = host.role.as_str(), to = role.as_str(), "server changed role");
                }
                if !host.up {
                    // It answers again: lift a ban set while it refused connections, so reads
                    // return now rather than when the ban runs out.
                    host.health.clear();
                    tracing::info!(database, host = %host.addr, role = role.as_str(), "server up");
                }
                host.checked = true;
                host.up = true;
                host.role = role;
                host.last = Some(sample);
            }
        }
        if let Some((from, to)) = self.decide_primary() {
            // Connections opened to either host for its old part (writes, or reads) should not
            // serve the new one. Once per event: a role change above already counted.
            for changed in [from, to].into_iter().flatten() {
                if let Some(host) = self.hosts.get_mut(changed)
                    && !(changed == index && host.generation != generation_before)
                {
                    host.generation += 1;
                }
            }
        }
        if self.current == Some(index)
            && let Some(host) = self.hosts.get(index)
            && host.up
            && host.role == Role::Primary
            && let Some(Sample {
                flushed_lsn: Some(flushed),
                sent_at,
                ..
            }) = &host.last
        {
            self.history.record(*flushed, *sent_at);
        }
    }

    /// Picks the host writes go to. The current one stays while it claims the role; otherwise
    /// a host that claims it (the first in configuration order) takes over; with no claimant,
    /// a primary that is down keeps the role (it may come back; nothing else can take writes),
    /// and one that answers as a replica loses it. Returns the change of primary, if any.
    fn decide_primary(&mut self) -> Option<(Option<usize>, Option<usize>)> {
        let claimants: Vec<usize> = (self.hosts.iter().enumerate())
            .filter(|(_, host)| host.up && host.role == Role::Primary)
            .map(|(index, _)| index)
            .collect();
        let current = self
            .current
            .and_then(|index| self.hosts.get(index).map(|host| (index, host)));
        let next = match current {
            Some((index, _)) if claimants.contains(&index) => Some(index),
            // Before its first check the configured primary is not overruled: at startup the
            // replicas may answer first, and a second primary there would be a split brain
            // where the configured one must win.
            Some((index, host)) if !host.checked => Some(index),
            _ if !claimants.is_empty() => claimants.first().copied(),
            Some((_, host)) if host.up && host.role == Role::Replica => None,
            Some((index, _)) => Some(index),
            None => None,
        };
        let change = (next != self.current).then_some((self.current, next));
        if next != self.current {
            let name = |index: Option<usize>| {
                index
                    .and_then(|index| self.hosts.get(index))
                    .map_or_else(|| "none".to_owned(), |host| host.addr.to_string())
            };
            tracing::warn!(
                database = self.database,
                from = name(self.current),
                to = name(next),
                "primary changed"
            );
            self.primary_changes += 1;
            self.history.clear();
            self.current = next;
        }
        let split_brain = claimants.len() > 1;
        if split_brain && !self.split_brain {
            self.split_brain_events += 1;
            let hosts: Vec<&str> = (claimants.iter())
                .filter_map(|&index| self.hosts.get(index))
                .map(|host| &*host.addr)
                .collect();
            let keep = self
                .current
                .and_then(|index| self.hosts.get(index))
                .map(|host| &*host.addr);
            tracing::error!(
                database = self.database,
                primaries = ?hosts,
                writes_to = keep,
                "split brain: several servers are out of recovery; writes stay on one, the others get nothing"
            );
        } else if !split_brain && self.split_brain {
            tracing::warn!(database = self.database, "split brain over: one server out of recovery");
        }
        self.split_brain = split_brain;
        change
    }

    /// How stale replica `host` may be at `now`; `None` when that cannot be told.
    ///
    /// With the primary answering: 0 once the replica has replayed the primary's last seen
    /// flush position (an idle primary writes nothing, so `pg_last_xact_replay_timestamp()` ages
    /// while the replica is fully caught up). Otherwise the smaller of two upper bounds: the
    /// primary-position history, and the age of the last transaction the replica replayed.
    /// With no primary answering (down, or being replaced), a replica that replayed all it
    /// received is as current as it can be: 0; otherwise the replay age.
    fn replica_lag(&self, host: &HostState, now: Instant) -> Option<Duration> {
        let sample = host.last.as_ref()?;
        let replay_age = sample
            .replay_age
            .map(|age| age + now.saturating_duration_since(sample.sent_at));
        let primary = self
            .current
            .and_then(|index| self.hosts.get(index))
            .filter(|primary| primary.up && primary.role == Role::Primary)
            .and_then(|primary| primary.last.as_ref())
            .and_then(|primary| primary.flushed_lsn);
        match (sample.lsn, primary) {
            (Some(replay), Some(primary)) if replay >= primary => Some(Duration::ZERO),
            (Some(replay), Some(_)) => match (self.history.staleness(replay, now), replay_age) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
            (Some(replay), None) if sample.flushed_lsn.is_some_and(|received| replay >= received) => {
                Some(Duration::ZERO)
            }
            _ => replay_age,
        }
    }

    /// The view as of `now`.
    pub(crate) fn view(&self, now: Instant) -> ClusterView {
        let hosts = self
            .hosts
            .iter()
            .map(|host| {
                let replica = host.role == Role::Replica;
                let lag = if host.up && replica {
                    self.replica_lag(host, now)
                } else {
                    None
                };
                let within_limit = match self.max_replica_lag {
                    None => true,
                    Some(max) => lag.is_some_and(|lag| lag <= max),
                };
                let last = host.last.as_ref();
                HostView {
                    addr: host.addr.clone(),
                    up: host.up,
                    checked: host.checked,
                    role: host.role,
                    generation: host.generation,
                    lsn: last.and_then(|sample| sample.lsn),
                    replay_lsn: last.filter(|_| replica).and_then(|sample| sample.lsn),
                    receive_lsn: last.filter(|_| replica).and_then(|sample| sample.flushed_lsn),
                    lag,
                    usable_for_reads: host.up && replica && within_limit,
                    sampled_at: last.map(|sample| sample.sent_at),
                }
            })
            .collect();
        ClusterView {
            hosts,
            primary: self.current,
            split_brain: self.split_brain,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn tracker(hosts: usize, max_lag: Option<Duration>) -> Tracker {
        let addrs: Vec<Arc<str>> = (0..hosts).map(|i| Arc::from(format!("h{i}:5432"))).collect();
        Tracker::new("db".into(), &addrs, max_lag)
    }

    fn primary(lsn: u64, at: Instant) -> Event {
        Event::Answered(Sample {
            in_recovery: false,
            lsn: Some(Lsn(lsn)),
            flushed_lsn: Some(Lsn(lsn)),
            replay_age: None,
            sent_at: at,
        })
    }

    fn replica(replay: u64, received: u64, replay_age: Option<Duration>, at: Instant) -> Event {
        Event::Answered(Sample {
            in_recovery: true,
            lsn: Some(Lsn(replay)),
            flushed_lsn: Some(Lsn(received)),
            replay_age,
            sent_at: at,
        })
    }

    fn down() -> Event {
        Event::Failed {
            error: "refused".into(),
        }
    }

    #[test]
    fn idle_primary_means_no_lag_whatever_the_replay_timestamp() {
        let t0 = Instant::now();
        let mut tracker = tracker(2, Some(SECOND));
        tracker.apply(0, primary(100, t0));
        tracker.apply(1, replica(100, 100, Some(Duration::from_secs(3600)), t0));
        let view = tracker.view(t0 + SECOND);
        assert_eq!(view.hosts[1].lag, Some(Duration::ZERO));
        assert!(view.hosts[1].usable_for_reads);
        assert_eq!(view.hosts[1].replay_lsn, Some(Lsn(100)));
        assert_eq!(view.primary_lsn(), Some(Lsn(100)));
        assert!(!view.hosts[0].usable_for_reads, "the primary is no replica");
    }

    #[test]
    fn a_single_write_after_idling_is_measured_from_the_history_not_the_old_commit() {
        let t0 = Instant::now();
        let mut tracker = tracker(2, Some(SECOND));
        tracker.apply(0, primary(100, t0));
        tracker.apply(0, primary(100, t0 + 10 * SECOND));
        // A write: the primary moves on; the replica has not replayed it yet, and its last
        // replayed commit is an hour old.
        tracker.apply(0, primary(200, t0 + 10 * SECOND + Duration::from_millis(50)));
        let age = Some(Duration::from_secs(3600));
        tracker.apply(1, replica(100, 200, age, t0 + 10 * SECOND + Duration::from_millis(60)));
        let view = tracker.view(t0 + 10 * SECOND + Duration::from_millis(100));
        assert_eq!(view.hosts[1].lag, Some(Duration::from_millis(100)));
        assert!(view.hosts[1].usable_for_reads);
        // It stays behind: the bound grows with time.
        let view = tracker.view(t0 + 12 * SECOND);
        assert_eq!(view.hosts[1].lag, Some(2 * SECOND));
        assert!(!view.hosts[1].usable_for_reads);
    }

    #[test]
    fn replay_timestamp_bounds_lag_beyond_the_history() {
        let t0 = Instant::now();
        let mut tracker = tracker(2, Some(SECOND));
        tracker.apply(0, primary(500, t0));
        tracker.apply(1, replica(100, 500, Some(Duration::from_millis(300)), t0));
        assert_eq!(tracker.view(t0).hosts[1].lag, Some(Duration::from_millis(300)));
        // Behind and never replayed a transaction: unknown, so beyond any limit.
        tracker.apply(1, replica(100, 500, None, t0));
        let view = tracker.view(t0);
        assert_eq!(view.hosts[1].lag, None);
        assert!(!view.hosts[1].usable_for_reads);
        // Without a limit any replica that answers takes reads.
        let mut unlimited = super::tests::tracker(2, None);
        unlimited.apply(0, primary(500, t0));
        unlimited.apply(1, replica(100, 500, None, t0));
        assert!(unlimited.view(t0).hosts[1].usable_for_reads);
    }

    #[test]
    fn without_a_primary_a_replica_that_replayed_what_it_received_is_current() {
        let t0 = Instant::now();
        let mut tracker = tracker(2, Some(SECOND));
        tracker.apply(0, down());
        tracker.apply(1, replica(100, 100, Some(Duration::from_secs(60)), t0));
        assert_eq!(tracker.view(t0).hosts[1].lag, Some(Duration::ZERO));
        tracker.apply(1, replica(90, 100, Some(Duration::from_secs(60)), t0));
        assert_eq!(tracker.view(t0).hosts[1].lag, Some(Duration::from_secs(60)));
    }

    #[test]
    fn down_hosts_take_no_reads_and_answering_again_lifts_a_ban() {
        let t0 = Instant::now();
        let mut tracker = tracker(2, None);
        let view = tracker.view(t0);
        assert!(!view.hosts[1].up && !view.hosts[1].checked && view.hosts[1].role == Role::Unknown);
        tracker.apply(1, replica(1, 1, None, t0));
        assert!(tracker.view(t0).hosts[1].usable_for_reads);
        tracker.apply(1, down());
        let view = tracker.view(t0);
        assert!(!view.hosts[1].up && view.hosts[1].checked);
        assert!(!view.hosts[1].usable_for_reads && view.hosts[1].lag.is_none());
        assert_eq!(view.hosts[1].role, Role::Replica, "the last role is kept while down");
        let health = tracker.health(1).expect("host 1").clone();
        health.ban(Duration::from_secs(60));
        tracker.apply(1, replica(1, 1, None, t0));
        assert!(health.usable(), "back up: ban lifted");
        health.ban(Duration::from_secs(60));
        tracker.apply(1, replica(1, 1, None, t0));
        assert!(!health.usable(), "a ban set while it was up stays");
    }

    #[test]
    fn failover_to_a_promoted_replica_then_split_brain_when_the_old_primary_returns() {
        let t0 = Instant::now();
        let mut tracker = tracker(3, None);
        tracker.apply(0, primary(10, t0));
        tracker.apply(1, replica(10, 10, None, t0));
        tracker.apply(2, replica(10, 10, None, t0));
        assert_eq!(tracker.view(t0).primary, Some(0));
        // The primary stops: it keeps the role while nothing else claims it.
        tracker.apply(0, down());
        let view = tracker.view(t0);
        assert_eq!(view.primary, Some(0));
        assert_eq!(view.primary_lsn(), None);
        // Replica 1 is promoted.
        tracker.apply(1, primary(20, t0));
        let view = tracker.view(t0);
        assert_eq!(view.primary, Some(1));
        assert_eq!(
            view.hosts[1].generation, 1,
            "role change retires its connections (once)"
        );
        assert_eq!(view.hosts[0].generation, 1, "no longer the write target");
        assert_eq!(view.hosts[2].generation, 0);
        assert!(!view.split_brain);
        assert_eq!(tracker.primary_changes(), 1);
        // The old primary comes back out of recovery: split brain, writes stay on host 1.
        tracker.apply(0, primary(15, t0));
        let view = tracker.view(t0);
        assert_eq!(view.primary, Some(1));
        assert!(view.split_brain);
        assert_eq!(tracker.split_brain_events(), 1);
        tracker.apply(0, primary(16, t0));
        assert_eq!(tracker.split_brain_events(), 1, "one count per episode");
        assert_eq!(tracker.view(t0).primary_lsn(), Some(Lsn(20)));
        // It goes away and comes back as a replica (rebuilt): no split brain, a replica again.
        tracker.apply(0, down());
        assert!(!tracker.view(t0).split_brain);
        tracker.apply(0, replica(20, 20, None, t0));
        let view = tracker.view(t0);
        assert!(!view.split_brain);
        assert_eq!(view.primary, Some(1));
        assert_eq!(view.hosts[0].role, Role::Replica);
        assert_eq!(view.hosts[0].generation, 2);
        assert!(view.hosts[0].usable_for_reads);
        // A second episode is counted again.
        tracker.apply(2, primary(30, t0));
        assert!(tracker.view(t0).split_brain);
        assert_eq!(tracker.split_brain_events(), 2);
        assert_eq!(tracker.view(t0).primary, Some(1));
    }

    #[test]
    fn the_configured_primary_is_not_overruled_before_its_first_check() {
        let t0 = Instant::now();
        let mut tracker = tracker(2, None);
        tracker.apply(1, primary(5, t0));
        assert_eq!(tracker.view(t0).primary, Some(0));
        tracker.apply(0, primary(5, t0));
        let view = tracker.view(t0);
        assert_eq!(view.primary, Some(0));
        assert!(view.split_brain);
    }

    #[test]
    fn a_configured_primary_found_in_recovery_hands_over_or_leaves_no_primary() {
        let t0 = Instant::now();
        // Failed over before pgrelay started: host 1 is the primary.
        let mut tracker = tracker(2, None);
        tracker.apply(0, replica(5, 5, None, t0));
        let view = tracker.view(t0);
        assert_eq!(view.primary, None, "no server takes writes yet");
        assert_eq!(
            view.hosts[0].generation, 1,
            "connections opened to it for writes must go"
        );
        tracker.apply(1, primary(5, t0));
        assert_eq!(tracker.view(t0).primary, Some(1));
        assert_eq!(tracker.view(t0).hosts[1].generation, 1);
        // Demoted with nothing promoted: nobody takes writes.
        tracker.apply(1, replica(5, 5, None, t0));
        assert_eq!(tracker.view(t0).primary, None);
        assert_eq!(tracker.view(t0).hosts[1].generation, 2);
    }

    #[test]
    fn restarts_bump_the_generation() {
        let mut tracker = tracker(1, None);
        tracker.apply(0, Event::Connected { started: "a".into() });
        tracker.apply(0, Event::Connected { started: "a".into() });
        assert_eq!(
            tracker.view(Instant::now()).hosts[0].generation,
            0,
            "a reconnect alone is no restart"
        );
        tracker.apply(0, Event::Connected { started: "b".into() });
        assert_eq!(tracker.view(Instant::now()).hosts[0].generation, 1);
    }

    #[test]
    fn history_is_bounded_and_restarts_on_a_new_stream() {
        let t0 = Instant::now();
        let mut history = PrimaryHistory::default();
        for i in 0..(HISTORY_MAX_ENTRIES as u64 + 10) {
            history.record(Lsn(i), t0);
        }
        assert_eq!(history.entries.len(), HISTORY_MAX_ENTRIES);
        assert_eq!(history.staleness(Lsn(0), t0), None, "older than the history");
        history.record(Lsn(1), t0 + HISTORY_WINDOW + SECOND);
        assert_eq!(history.entries.len(), 1, "went backwards: started over");
        assert_eq!(history.staleness(Lsn(5), t0), Some(Duration::ZERO));
    }
}
