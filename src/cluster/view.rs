//! The immutable snapshot of a database's servers that routing reads per transaction: who is up,
//! who is the primary, how far each replica has replayed. Built by the monitor, never changed
//! after it is published.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::lsn::Lsn;

/// What a server said it is, by `pg_is_in_recovery()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Not in recovery: accepts writes.
    Primary,
    /// In recovery: a hot standby.
    Replica,
    /// Never answered a health check yet.
    Unknown,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Replica => "replica",
            Role::Unknown => "unknown",
        }
    }
}

/// One server as last seen.
#[derive(Debug, Clone, PartialEq)]
pub struct HostView {
    /// `host:port` as configured.
    pub addr: Arc<str>,
    /// Its side connection answered the last check. A host that never answered is down.
    pub up: bool,
    /// Whether at least one check finished (answered or failed) since the monitor started.
    pub checked: bool,
    /// The role it reported last; kept while it is down, so a primary that went away still
    /// reads as `Primary` with `up == false`.
    pub role: Role,
    /// Bumped when the server's role changes (primary ↔ replica), when it restarted (a new
    /// `pg_postmaster_start_time()`), and when it becomes or stops being the host writes go
    /// to (`ClusterView::primary`). Connections opened to it under an older generation were
    /// opened for a part it no longer plays (a demoted primary answers writes with "read-only
    /// transaction" errors), or are dead: close them instead of reusing them.
    pub generation: u64,
    /// How far its data goes: for a replica `pg_last_wal_replay_lsn()`, for a primary
    /// `pg_current_wal_insert_lsn()` (every commit visible there is before it, even one made
    /// with `synchronous_commit = off`). The last value seen, kept while down.
    pub lsn: Option<Lsn>,
    /// Replicas only: `pg_last_wal_replay_lsn()`, i.e. `lsn` when `role` is `Replica`.
    pub replay_lsn: Option<Lsn>,
    /// Replicas only: `pg_last_wal_receive_lsn()`.
    pub receive_lsn: Option<Lsn>,
    /// Replicas only: how stale its data may be (see `state::replica_lag`); `None` when it
    /// cannot be told, which counts as beyond any `max_replica_lag`.
    pub lag: Option<Duration>,
    /// `up`, a replica, and `lag` within `max_replica_lag` (any lag when there is no limit).
    pub usable_for_reads: bool,
    /// When the query whose answer `lsn` is was sent (a lower bound of when the server was
    /// there), or `None` before the first answer.
    pub sampled_at: Option<Instant>,
}

impl HostView {
    #[cfg(test)]
    pub(crate) fn unchecked(addr: Arc<str>) -> Self {
        HostView {
            addr,
            up: false,
            checked: false,
            role: Role::Unknown,
            generation: 0,
            lsn: None,
            replay_lsn: None,
            receive_lsn: None,
            lag: None,
            usable_for_reads: false,
            sampled_at: None,
        }
    }

    /// The same host as far as routing cares: differences only in positions, lag values or
    /// sample times are not "changes" worth waking anyone for.
    fn same_standing(&self, other: &HostView) -> bool {
        self.up == other.up
            && self.checked == other.checked
            && self.role == other.role
            && self.generation == other.generation
            && self.usable_for_reads == other.usable_for_reads
    }
}

/// Every server of one database. `hosts[0]` is the configured primary, `hosts[1..]` the
/// replicas in configuration order (so replica `r` of the config is `hosts[r + 1]`).
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterView {
    pub hosts: Vec<HostView>,
    /// The host writes go to. It is sticky: the configured primary until a check shows another
    /// host is the primary (a promoted replica), and it stays put while its host is down and
    /// no other host claims the role (so `hosts[primary].up` may be false: writes will fail
    /// until it returns or a replica is promoted). `None` only when the host that was the
    /// primary answers as a replica and no host answers as a primary: no server takes writes.
    pub primary: Option<usize>,
    /// More than one reachable host says it is not in recovery. `primary` stays the host that
    /// had the role before the other appeared.
    pub split_brain: bool,
}

impl ClusterView {
    #[cfg(test)]
    pub(crate) fn initial(addrs: &[Arc<str>]) -> Self {
        ClusterView {
            hosts: addrs.iter().map(|addr| HostView::unchecked(addr.clone())).collect(),
            primary: if addrs.is_empty() { None } else { Some(0) },
            split_brain: false,
        }
    }

    /// The host writes go to.
    pub fn primary_host(&self) -> Option<&HostView> {
        self.primary.and_then(|index| self.hosts.get(index))
    }

    /// The primary's insert position as last polled, while it is up and answering as a
    /// primary: a replica that replayed up to it has every commit that was visible on the
    /// primary when the poll was sent (see [`HostView::sampled_at`]).
    pub fn primary_lsn(&self) -> Option<Lsn> {
        self.primary_host()
            .filter(|host| host.up && host.role == Role::Primary)
            .and_then(|host| host.lsn)
    }

    /// Hosts that may take reads now, in host order.
    pub fn usable_replicas(&self) -> impl Iterator<Item = usize> + '_ {
        self.hosts
            .iter()
            .enumerate()
            .filter(|(_, host)| host.usable_for_reads)
            .map(|(index, _)| index)
    }

    /// Hosts that may take reads and have replayed at least up to `lsn` (a commit a client
    /// must see), in host order.
    pub fn replicas_caught_up_to(&self, lsn: Lsn) -> impl Iterator<Item = usize> + '_ {
        self.hosts
            .iter()
            .enumerate()
            .filter(move |(_, host)| host.usable_for_reads && host.replay_lsn.is_some_and(|replay| replay >= lsn))
            .map(|(index, _)| index)
    }

    /// Every host has been checked at least once.
    pub fn all_checked(&self) -> bool {
        self.hosts.iter().all(|host| host.checked)
    }

    /// Whether anything routing acts on differs: the primary, split brain, or a host's
    /// up/role/generation/usability. Positions and lag values moving alone do not count.
    pub fn standing_differs(&self, other: &ClusterView) -> bool {
        self.primary != other.primary
            || self.split_brain != other.split_brain
            || self.hosts.len() != other.hosts.len()
            || self.hosts.iter().zip(&other.hosts).any(|(a, b)| !a.same_standing(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(addr: &str, replay: u64, usable: bool) -> HostView {
        HostView {
            up: true,
            checked: true,
            role: Role::Replica,
            lsn: Some(Lsn(replay)),
            replay_lsn: Some(Lsn(replay)),
            usable_for_reads: usable,
            lag: Some(Duration::ZERO),
            ..HostView::unchecked(Arc::from(addr))
        }
    }

    #[test]
    fn caught_up_replicas_are_usable_ones_at_or_past_the_position() {
        let mut view = ClusterView::initial(&[Arc::from("p:1")]);
        view.hosts[0].up = true;
        view.hosts[0].checked = true;
        view.hosts[0].role = Role::Primary;
        view.hosts[0].lsn = Some(Lsn(100));
        view.hosts.push(replica("r:1", 100, true));
        view.hosts.push(replica("r:2", 90, true));
        view.hosts.push(replica("r:3", 200, false));
        assert_eq!(view.primary_lsn(), Some(Lsn(100)));
        assert_eq!(view.usable_replicas().collect::<Vec<_>>(), [1, 2]);
        assert_eq!(view.replicas_caught_up_to(Lsn(95)).collect::<Vec<_>>(), [1]);
        assert_eq!(view.replicas_caught_up_to(Lsn(90)).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(view.replicas_caught_up_to(Lsn(101)).count(), 0);
        view.hosts[0].up = false;
        assert_eq!(view.primary_lsn(), None, "a down primary has no current position");
    }

    #[test]
    fn standing_ignores_positions() {
        let a = ClusterView {
            hosts: vec![replica("r:1", 1, true)],
            primary: Some(0),
            split_brain: false,
        };
        let mut b = a.clone();
        b.hosts[0].replay_lsn = Some(Lsn(5));
        b.hosts[0].lag = Some(Duration::from_millis(3));
        assert!(!a.standing_differs(&b));
        b.hosts[0].usable_for_reads = false;
        assert!(a.standing_differs(&b));
    }
}
