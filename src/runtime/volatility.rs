//! The catalog reader of one database: reads which functions are `VOLATILE` on the primary
//! and gives them to the database's classifier (`function_volatility = "catalog"`).
//!
//! When. At once when the entry starts (so at every start and every reload, whose entries are
//! new), after each schema change seen passing through pgrelay (`SchemaWatch::changed`), and
//! every [`REFRESH_INTERVAL`] for functions created behind pgrelay's back. Schema changes are
//! coalesced: after one, the reader waits [`MIN_SPACING`] before reading, so a migration of a
//! thousand statements costs a handful of reads, not a thousand. A failed read is retried
//! after [`RETRY_INTERVAL`]; meanwhile the last set read (or, before any, the built-in lists)
//! stays in force. The task ends when the database entry and its sessions are gone.

use std::sync::{Arc, Weak};
use std::time::Duration;

use super::database::DatabaseEntry;
use crate::cluster::MonitorSettings;
use crate::config::RoutingTarget;

/// Functions created without passing through pgrelay are seen at most this late.
const REFRESH_INTERVAL: Duration = Duration::from_secs(300);
/// Least time between a schema change and the read it causes (coalesces bursts of DDL).
const MIN_SPACING: Duration = Duration::from_secs(1);
/// A failed read (primary down, no permission) is tried again this often.
const RETRY_INTERVAL: Duration = Duration::from_secs(10);
/// The catalog query gets this long.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// Starts the reader of `database` if its classifier wants the catalog and its reads may go
/// to a replica at all (otherwise every statement goes to the primary and the catalog would
/// change nothing).
pub(super) fn watch_catalog(database: &Arc<DatabaseEntry>, settings: MonitorSettings) {
    let routing = &database.routing;
    let splits = routing.read_write_split && routing.target == RoutingTarget::Auto && database.has_replicas();
    if !database.classifier.wants_catalog() || !splits {
        return;
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        tracing::warn!(database = %database.name, "no runtime: function volatility is not read from the catalog");
        return;
    };
    let weak = Arc::downgrade(database);
    let changes = database.schema.subscribe();
    runtime.spawn(run(weak, changes, settings));
}

async fn run(weak: Weak<DatabaseEntry>, mut changes: tokio::sync::watch::Receiver<u64>, settings: MonitorSettings) {
    loop {
        let wait = match read_once(&weak, &settings).await {
            Some(true) => REFRESH_INTERVAL,
            Some(false) => RETRY_INTERVAL,
            None => return,
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
                tokio::time::sleep(MIN_SPACING).await;
                // Changes during the pause are covered by the read about to start.
                changes.borrow_and_update();
            }
        }
    }
}

/// One read. `None`: the entry is gone; otherwise whether the read succeeded.
async fn read_once(weak: &Weak<DatabaseEntry>, settings: &MonitorSettings) -> Option<bool> {
    let addr = {
        let database = weak.upgrade()?;
        database.hosts.get(database.primary_index())?.clone()
    };
    let result = crate::cluster::volatile_functions(settings, &addr, QUERY_TIMEOUT).await;
    let database = weak.upgrade()?;
    match result {
        Ok(set) => {
            let functions = set.len();
            if database.classifier.set_volatile(set) {
                tracing::info!(database = %database.name, host = %addr, functions,
                    "volatile functions read from the catalog: their calls go to the primary");
            }
            Some(true)
        }
        Err(error) => {
            tracing::warn!(database = %database.name, host = %addr, %error,
                "cannot read function volatility from the catalog; keeping the functions known so far");
            Some(false)
        }
    }
}
