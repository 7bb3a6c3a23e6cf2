//! What pgrelay knows of the health of each server of a database: a replica that
//! refused a connection is set aside for a while so reads go elsewhere.

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
mod tests {
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
