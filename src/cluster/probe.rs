//! One host's side connection and the health query on it. A plain tokio-postgres client the
//! monitor reconnects itself: it never takes a slot of the client pools (a saturated pool
//! must not blind the lag probe), and a new connection is an event the monitor wants to see
//! (it re-reads the server's start time to notice restarts).

use std::time::{Duration, Instant};

use tokio_postgres::types::PgLsn;
use tokio_postgres::{Client, Config, NoTls, Row, Statement};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::lsn::Lsn;
use super::state::Sample;

/// How the monitor's sessions show up in `pg_stat_activity`.
pub const APPLICATION_NAME: &str = "pgrelay-monitor";

/// Role, WAL positions and replay age in one round trip. Every function reads shared memory
/// (no table, no lock), so running it many times a second costs the server about as much as
/// `SELECT 1`. The functions that fail in recovery sit behind `CASE` (evaluated lazily).
/// `now()` is the statement's start on the server.
///
/// The primary reports two positions: the insert position, which covers every commit already
/// visible there (with `synchronous_commit = off` a commit is visible before its WAL is
/// written), and the flush position, the end of the WAL a replica can have been sent (the
/// insert position can sit past a page header the replica never replays, so it is not what a
/// caught-up replica's replay position equals).
const HEALTH_QUERY: &str = "SELECT pg_is_in_recovery(), \
     CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_insert_lsn() END, \
     CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn() ELSE pg_current_wal_flush_lsn() END, \
     extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8";

/// Why a check failed.
#[derive(Debug)]
pub(crate) enum Failure {
    /// No answer within this long: the server (or the network to it) is stuck.
    Timeout(Duration),
    /// The connection broke, or the server refused the connection or the query.
    Error(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Timeout(timeout) => write!(f, "no answer within {timeout:?}"),
            Failure::Error(error) => f.write_str(error),
        }
    }
}

/// The side connection's settings for the host `addr`, as `settings` log in.
pub(super) fn side_config(settings: &super::MonitorSettings, addr: &str) -> Result<Config, super::ClusterError> {
    let (host, port) =
        crate::config::split_host_port(addr).map_err(|_| super::ClusterError::BadAddress(addr.to_owned()))?;
    let mut config = Config::new();
    config
        .host(host)
        .port(port)
        .user(&settings.user)
        .dbname(&settings.dbname)
        .application_name(APPLICATION_NAME)
        .keepalives(true);
    if let Some(password) = &settings.password {
        config.password(password);
    }
    if let Some(tls) = &settings.tls {
        config.ssl_mode(tls.mode);
    }
    Ok(config)
}

/// Connects with or without TLS and drives the connection in the background: its future
/// does the socket I/O and ends when the client is dropped (the monitor stopping, or giving
/// up on this connection).
pub(super) async fn open(config: &Config, tls: Option<&MakeRustlsConnect>) -> Result<Client, tokio_postgres::Error> {
    fn drive(connection: impl std::future::Future<Output = Result<(), tokio_postgres::Error>> + Send + 'static) {
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "monitor connection closed");
            }
        });
    }
    match tls {
        Some(tls) => {
            let (client, connection) = config.connect(tls.clone()).await?;
            drive(connection);
            Ok(client)
        }
        None => {
            let (client, connection) = config.connect(NoTls).await?;
            drive(connection);
            Ok(client)
        }
    }
}

/// An open side connection with the health query prepared on it.
pub(crate) struct Probe {
    client: Client,
    statement: Statement,
}

impl Probe {
    /// Connects within `connect_timeout`, then prepares the health query and reads
    /// `pg_postmaster_start_time()` within `query_timeout`. Returns the probe and the start
    /// time (as text: it is only compared).
    pub(crate) async fn connect(
        config: &Config,
        tls: Option<&MakeRustlsConnect>,
        connect_timeout: Duration,
        query_timeout: Duration,
    ) -> Result<(Probe, String), Failure> {
        let client = match tokio::time::timeout(connect_timeout, open(config, tls)).await {
            Ok(Ok(client)) => client,
            Ok(Err(error)) => return Err(Failure::Error(error.to_string())),
            Err(_) => return Err(Failure::Timeout(connect_timeout)),
        };
        let setup = async {
            let statement = client.prepare(HEALTH_QUERY).await?;
            let started: String = client
                .query_one("SELECT pg_postmaster_start_time()::text", &[])
                .await?
                .try_get(0)?;
            Ok::<_, tokio_postgres::Error>((statement, started))
        };
        match tokio::time::timeout(query_timeout, setup).await {
            Ok(Ok((statement, started))) => Ok((Probe { client, statement }, started)),
            Ok(Err(error)) => Err(Failure::Error(error.to_string())),
            Err(_) => Err(Failure::Timeout(query_timeout)),
        }
    }

    /// Runs the health query once, within `timeout`. After a failure the probe should be
    /// dropped: a timed-out query may still be running and would delay the next one.
    pub(crate) async fn sample(&self, timeout: Duration) -> Result<Sample, Failure> {
        let sent_at = Instant::now();
        match tokio::time::timeout(timeout, self.client.query_one(&self.statement, &[])).await {
            Ok(Ok(row)) => decode(&row, sent_at).map_err(|error| Failure::Error(error.to_string())),
            Ok(Err(error)) => Err(Failure::Error(error.to_string())),
            Err(_) => Err(Failure::Timeout(timeout)),
        }
    }
}

fn decode(row: &Row, sent_at: Instant) -> Result<Sample, tokio_postgres::Error> {
    let in_recovery: bool = row.try_get(0)?;
    let lsn: Option<PgLsn> = row.try_get(1)?;
    let flushed_lsn: Option<PgLsn> = row.try_get(2)?;
    let replay_age: Option<f64> = row.try_get(3)?;
    Ok(Sample {
        in_recovery,
        lsn: lsn.map(Lsn::from),
        flushed_lsn: flushed_lsn.map(Lsn::from),
        replay_age: replay_age.and_then(seconds),
        sent_at,
    })
}

/// Seconds from the server as a duration, clamped at 0: the replica's clock may run behind the
/// primary's, which stamped the commit. NaN or absurd values give `None` (unknown).
fn seconds(value: f64) -> Option<Duration> {
    // `f64::max` would turn NaN into 0.
    if value.is_nan() {
        return None;
    }
    Duration::try_from_secs_f64(value.max(0.0)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_age_is_clamped_and_checked() {
        assert_eq!(seconds(1.5), Some(Duration::from_millis(1500)));
        assert_eq!(seconds(-3.0), Some(Duration::ZERO), "clock skew");
        assert_eq!(seconds(f64::NAN), None);
        assert_eq!(seconds(f64::INFINITY), None);
    }
}
