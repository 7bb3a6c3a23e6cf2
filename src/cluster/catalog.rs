//! The catalog query for function volatility, on a side connection of its own to the primary,
//! opened as the monitor opens its connections and closed after the one query: it runs once
//! per database at start, at a reload, after DDL and every few minutes, so a standing
//! connection would cost more than it saves.

use std::time::Duration;

use super::MonitorSettings;
use super::probe::{Failure, open, side_config};
use crate::route::VolatileSet;

/// Every function the catalog marks `VOLATILE`, in every schema, one row per schema and name
/// (overloads merged). Procedures are left out: they are only reachable by `CALL`, which is a
/// write anyway.
const VOLATILE_QUERY: &str = "SELECT DISTINCT n.nspname::text, p.proname::text \
     FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace \
     WHERE p.provolatile = 'v' AND p.prokind <> 'p'";

/// Connect timeout used when the configured one is 0 ("no limit").
const FALLBACK_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads the volatile functions of `settings.dbname` on the host `addr`, connecting within
/// the configured connect timeout and querying within `query_timeout`.
pub async fn volatile_functions(
    settings: &MonitorSettings,
    addr: &str,
    query_timeout: Duration,
) -> Result<VolatileSet, String> {
    let config = side_config(settings, addr).map_err(|error| error.to_string())?;
    let tls = settings.tls.as_ref().map(|tls| tls.connector.clone());
    let connect_timeout = if settings.connect_timeout.is_zero() {
        FALLBACK_CONNECT_TIMEOUT
    } else {
        settings.connect_timeout
    };
    let client = match tokio::time::timeout(connect_timeout, open(&config, tls.as_ref())).await {
        Ok(Ok(client)) => client,
        Ok(Err(error)) => return Err(error.to_string()),
        Err(_) => return Err(Failure::Timeout(connect_timeout).to_string()),
    };
    let rows = match tokio::time::timeout(query_timeout, client.query(VOLATILE_QUERY, &[])).await {
        Ok(Ok(rows)) => rows,
        Ok(Err(error)) => return Err(error.to_string()),
        Err(_) => return Err(Failure::Timeout(query_timeout).to_string()),
    };
    let mut names = Vec::with_capacity(rows.len());
    for row in &rows {
        let schema: String = row.try_get(0).map_err(|error| error.to_string())?;
        let name: String = row.try_get(1).map_err(|error| error.to_string())?;
        names.push((schema, name));
    }
    Ok(VolatileSet::from_rows(names))
}
