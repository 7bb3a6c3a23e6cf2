//! What a database's clients share about schema changes, for the prepared statements
//! pgrelay shares between them on its server connections.
//!
//! A schema change (DDL) can make a prepared statement's plan stale. On a direct
//! connection the server then refuses the old statement (`cached plan must not change
//! result type`) until the client prepares it again, and the new one sees the new
//! schema. pgrelay keeps that true although a client's statement lives under a shared
//! name on several server connections: a statement prepared after a change gets a new
//! name (the epoch is part of it), and an old one that a server has refused is refused
//! on every server connection, with the same error, instead of being prepared afresh with
//! a shape the client does not expect.
//!
//! A schema change may also have created or altered functions: it asks the database's
//! catalog reader (`runtime::volatility`) to read function volatility again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// Refused statements remembered at most; past it the oldest knowledge is dropped (an
/// old statement is then prepared afresh instead of refused).
const MAX_REFUSED: usize = 10_000;

/// The error a server refused a stale statement with: the whole ErrorResponse, which
/// other clients of the statement get byte for byte (drivers read more than the SQLSTATE:
/// asyncpg knows this error by the server function that raised it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaleStatement {
    pub error: bytes::Bytes,
}

#[derive(Debug)]
pub struct SchemaWatch {
    epoch: AtomicU64,
    /// Some statement was refused: only then is `refused` looked up (every Bind of a
    /// prepared statement asks, and nearly always nothing was).
    any_refused: AtomicBool,
    refused: Mutex<HashMap<Arc<str>, StaleStatement>>,
    /// Bumped at each change; the catalog reader waits on it. Its receivers see the sender
    /// dropped when the database entry and its sessions are gone, and stop.
    catalog_refresh: tokio::sync::watch::Sender<u64>,
}

impl Default for SchemaWatch {
    fn default() -> Self {
        SchemaWatch {
            epoch: AtomicU64::new(0),
            any_refused: AtomicBool::new(false),
            refused: Mutex::new(HashMap::new()),
            catalog_refresh: tokio::sync::watch::Sender::new(0),
        }
    }
}

impl SchemaWatch {
    /// The number of schema changes seen, which statements prepared now are named by.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Relaxed)
    }

    /// The schema may have changed: statements prepared from now on get new names.
    pub fn changed(&self) {
        self.epoch.fetch_add(1, Ordering::Relaxed);
        self.catalog_refresh.send_modify(|count| *count = count.wrapping_add(1));
    }

    /// Changes to come, for the catalog reader.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.catalog_refresh.subscribe()
    }

    /// A server refused the statement `name` because its plan went stale: every client
    /// that still uses it gets the same error, as each would from its own server.
    pub fn refused(&self, name: Arc<str>, stale: StaleStatement) {
        self.changed();
        let mut refused = self.refused.lock().unwrap_or_else(PoisonError::into_inner);
        if refused.len() >= MAX_REFUSED {
            refused.clear();
        }
        refused.insert(name, stale);
        self.any_refused.store(true, Ordering::Release);
    }

    /// The error the statement `name` was refused with, if a server refused it.
    pub fn refusal(&self, name: &str) -> Option<StaleStatement> {
        if !self.any_refused.load(Ordering::Acquire) {
            return None;
        }
        let refused = self.refused.lock().unwrap_or_else(PoisonError::into_inner);
        refused.get(name).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_advances_the_epoch_and_is_remembered() {
        let watch = SchemaWatch::default();
        assert_eq!(watch.epoch(), 0);
        assert_eq!(watch.refusal("a"), None);
        let stale = StaleStatement {
            error: bytes::Bytes::from_static(b"E\0\0\0\x04"),
        };
        watch.refused("a".into(), stale.clone());
        assert_eq!(watch.epoch(), 1);
        assert_eq!(watch.refusal("a"), Some(stale));
        assert_eq!(watch.refusal("b"), None);
    }
}
