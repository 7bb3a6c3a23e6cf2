//! What pgrelay knows of each server of a database: whether it answers, whether it is the
//! primary or a replica, how far it has replayed the primary's WAL and how stale that makes
//! it. A [`ClusterMonitor`] per database keeps this current from side connections and
//! publishes it as a [`ClusterView`] that routing loads once per transaction. [`HostHealth`]
//! is the routing side's own note: a replica that refused a connection is set aside for a
//! while so reads go elsewhere (the monitor lifts it when a down host answers again).
//!
//! Files: `lsn` (WAL positions), `view` (the published snapshot), `state` (the bookkeeping:
//! primary discovery, split brain, lag; no I/O), `probe` (one side connection and its query),
//! `monitor` (the tasks and the handle), `catalog` (the volatile functions, read for routing).

mod catalog;
mod error;
mod lsn;
mod monitor;
mod probe;
mod state;
mod view;

#[cfg(test)]
mod tests;

pub use catalog::volatile_functions;
pub use error::ClusterError;
pub use lsn::Lsn;
pub use monitor::{ClusterMonitor, DEFAULT_LSN_POLL_INTERVAL, MonitorSettings, MonitorTls};
pub use probe::APPLICATION_NAME;
pub use view::{ClusterView, HostView, Role};

use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a replica that refused a connection gets no reads.
pub const BAN_DURATION: Duration = Duration::from_secs(5);

/// One server's standing.
#[derive(Debug)]
pub struct HostHealth {
    pub addr: Arc<str>,
    banned_until: Mutex<Option<Instant>>,
}

impl HostHealth {
    pub fn new(addr: Arc<str>) -> Self {
        HostHealth {
            addr,
            banned_until: Mutex::new(None),
        }
    }

    /// Not set aside right now.
    pub fn usable(&self) -> bool {
        match self.banned_until.lock() {
            Ok(until) => until.is_none_or(|until| Instant::now() >= until),
            Err(_) => true,
        }
    }

    /// Sets the server aside for `duration`.
    pub fn ban(&self, duration: Duration) {
        if let Ok(mut until) = self.banned_until.lock() {
            *until = Some(Instant::now() + duration);
        }
    }

    /// The server answered again.
    pub fn clear(&self) {
        if let Ok(mut until) = self.banned_until.lock() {
            *until = None;
        }
    }
}

#[cfg(test)]
mod health_tests {
    use super::*;

    #[test]
    fn a_ban_expires() {
        let host = HostHealth::new(Arc::from("h:1"));
        assert!(host.usable());
        host.ban(Duration::from_secs(60));
        assert!(!host.usable());
        host.clear();
        assert!(host.usable());
        host.ban(Duration::ZERO);
        assert!(host.usable());
    }
}
