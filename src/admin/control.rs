//! Admin console commands that change something: RELOAD, PAUSE, RESUME, KILL.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;

use super::Outcome;
use crate::error::sqlstate;
use crate::protocol::compose;
use crate::runtime::{DatabaseEntry, Shared};

/// SQLSTATE config_file_error.
const CONFIG_FILE_ERROR: &str = "F0000";

pub(super) fn reload(shared: &Shared, out: &mut BytesMut) -> Outcome {
    match crate::reload::reload(shared) {
        Ok(reloaded) => {
            for key in reloaded.needs_restart {
                compose::notice(
                    out,
                    "01000",
                    &format!("{key} changed: it takes effect only after a restart"),
                );
            }
            compose::command_complete(out, "RELOAD");
            Ok(())
        }
        Err(error) => Err((CONFIG_FILE_ERROR, error.to_string())),
    }
}

/// The databases a command names: one, or all of them.
fn targets(shared: &Shared, name: Option<&str>) -> Result<Vec<Arc<DatabaseEntry>>, (&'static str, String)> {
    let snapshot = shared.snapshot();
    match name {
        None => Ok(snapshot.all_databases()),
        Some(name) => snapshot.database(name).map(|database| vec![database]).ok_or_else(|| {
            (
                sqlstate::INVALID_CATALOG_NAME,
                format!("database \"{name}\" does not exist"),
            )
        }),
    }
}

/// Holds new transactions, then waits until the running ones have released their
/// servers, as PgBouncer's PAUSE does.
pub(super) async fn pause(shared: &Shared, name: Option<&str>, out: &mut BytesMut) -> Outcome {
    let databases = targets(shared, name)?;
    for database in &databases {
        database.set_paused(true);
    }
    while databases.iter().any(|database| database.active_servers() > 0) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    compose::command_complete(out, "PAUSE");
    Ok(())
}

pub(super) fn resume(shared: &Shared, name: Option<&str>, out: &mut BytesMut) -> Outcome {
    for database in targets(shared, name)? {
        database.set_paused(false);
    }
    compose::command_complete(out, "RESUME");
    Ok(())
}

/// Drops every client and server connection of a database at once; new clients wait
/// until RESUME.
pub(super) fn kill(shared: &Shared, name: &str, out: &mut BytesMut) -> Outcome {
    let databases = targets(shared, Some(name))?;
    for database in &databases {
        database.set_paused(true);
        for client in shared.registry.clients() {
            if client.database == database.name {
                client.kill();
            }
        }
        database.close_idle();
    }
    compose::command_complete(out, "KILL");
    Ok(())
}
