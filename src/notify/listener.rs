//! The listener connection of one database: a server connection of its own to the current
//! primary (outside the pools) that LISTENs to the union of the hub's channels, hands each
//! NotificationResponse to the hub, and follows changes of the union. Lost, it is opened
//! again with backoff and every listening client is told that notifications may have been
//! missed; it closes when no client listens any more.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::hub::{Hub, MARKER_CHANNEL};
use crate::protocol::frame::split_frame;
use crate::protocol::views::{ErrorFields, read_cstr};
use crate::upstream::{ConnectSpec, ServerConn, UpstreamError};

/// The listener connection's `application_name`, by which it is told apart in
/// `pg_stat_activity`.
pub const LISTENER_APPLICATION_NAME: &str = "pgrelay listener";

/// First wait after a failed connect; doubled up to `MAX_BACKOFF`.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A connect (TCP, TLS, login) that takes longer is given up and tried again.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest message accepted from the server: a notification payload is under 8000 bytes.
const MESSAGE_LIMIT: usize = 1 << 20;

/// Why serving one connection ended.
enum Ended {
    /// No client listens any more.
    Idle,
    Failed(String),
}

/// Runs until no client of `hub` listens.
pub(super) async fn run(hub: Arc<Hub>) {
    let mut backoff = MIN_BACKOFF;
    loop {
        let Some(target) = hub.target_or_stop() else {
            tracing::debug!(database = %hub.database(), "no client listens: listener connection closed");
            return;
        };
        let spec = target.and_then(|target| target()).map(|pool| ConnectSpec {
            addr: pool.addr.clone(),
            database: pool.database.clone(),
            credentials: pool.credentials.clone(),
            tls: pool.tls.clone(),
            tcp: pool.tcp,
            application_name: Some(LISTENER_APPLICATION_NAME),
        });
        let connected = match &spec {
            Some(spec) => match tokio::time::timeout(CONNECT_TIMEOUT, crate::upstream::connect(spec)).await {
                Ok(result) => result.map_err(|error| error.to_string()),
                Err(_) => Err(format!(
                    "connecting to {} took longer than {CONNECT_TIMEOUT:?}",
                    spec.addr
                )),
            },
            None => Err("the database is no longer configured".to_owned()),
        };
        match connected {
            Ok(conn) => {
                backoff = MIN_BACKOFF;
                tracing::info!(database = %hub.database(), server = %conn.addr(), "listener connection open");
                match serve(&hub, conn).await {
                    Ended::Idle => {}
                    Ended::Failed(reason) => {
                        tracing::warn!(database = %hub.database(), %reason,
                            "listener connection lost: reconnecting; listening clients are warned that notifications may have been missed");
                        hub.mark_gap();
                    }
                }
            }
            Err(reason) => {
                tracing::warn!(database = %hub.database(), %reason, retry_in = ?backoff, "cannot open the listener connection");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// LISTENs to the hub's channels on `conn` and forwards notifications until the
/// connection fails or no channel is wanted.
async fn serve(hub: &Hub, mut conn: ServerConn) -> Ended {
    let mut subscribed = BTreeSet::new();
    let mut confirmed = 0;
    loop {
        let (wanted, generation) = hub.wanted();
        if wanted.is_empty() {
            return Ended::Idle;
        }
        // A round trip (the LISTENs, or an empty query when only a client joined a channel
        // already listened to): the server sends every notification committed before it
        // ahead of its ReadyForQuery, so what is read after it was committed after the
        // clients' LISTENs of this generation.
        if wanted != subscribed || generation > confirmed {
            let sql = statements(&subscribed, &wanted);
            if let Err(reason) = run_query(hub, &mut conn, &sql).await {
                return Ended::Failed(reason);
            }
            subscribed = wanted;
        }
        hub.confirm(generation);
        confirmed = generation;
        // Takeover markers, sent once the marker channel is LISTENed to (confirmed above,
        // or again on a new connection), so that this connection reads them too. Not sent
        // again should this fail: a marker committed twice would cut twice.
        let markers = hub.take_unsent_markers();
        if !markers.is_empty() {
            let sql: String = markers
                .iter()
                .map(|token| format!("NOTIFY {MARKER_CHANNEL}, '{}';", token.replace('\'', "''")))
                .collect();
            if let Err(reason) = run_query(hub, &mut conn, &sql).await {
                return Ended::Failed(reason);
            }
        }
        // Waits for a change of the channels or for the server. Cancel-safe: a change
        // noted while reading is kept as the Notify's permit.
        tokio::select! {
            () = hub.changed.notified() => {}
            read = read_some(&mut conn) => {
                if let Err(reason) = read.and_then(|()| take_messages(hub, &mut conn.inbuf).map(drop)) {
                    return Ended::Failed(reason);
                }
            }
        }
    }
}

/// The LISTEN and UNLISTEN statements that turn `from` into `to`, as one query.
fn statements(from: &BTreeSet<String>, to: &BTreeSet<String>) -> String {
    let quote = |name: &str| format!("\"{}\"", name.replace('"', "\"\""));
    let mut sql = String::new();
    for channel in to.difference(from) {
        sql.push_str("LISTEN ");
        sql.push_str(&quote(channel));
        sql.push(';');
    }
    for channel in from.difference(to) {
        sql.push_str("UNLISTEN ");
        sql.push_str(&quote(channel));
        sql.push(';');
    }
    sql
}

/// Sends `sql` and reads up to its ReadyForQuery, forwarding notifications meanwhile.
async fn run_query(hub: &Hub, conn: &mut ServerConn, sql: &str) -> Result<(), String> {
    let mut out = BytesMut::new();
    postgres_protocol::message::frontend::query(sql, &mut out).map_err(|error| error.to_string())?;
    conn.stream.write_all(&out).await.map_err(|error| error.to_string())?;
    conn.stream.flush().await.map_err(|error| error.to_string())?;
    loop {
        if take_messages(hub, &mut conn.inbuf)? {
            return Ok(());
        }
        read_some(conn).await?;
    }
}

async fn read_some(conn: &mut ServerConn) -> Result<(), String> {
    conn.inbuf.reserve(8192);
    match conn.stream.read_buf(&mut conn.inbuf).await {
        Ok(0) => Err(UpstreamError::Closed {
            addr: conn.addr().to_owned(),
        }
        .to_string()),
        Ok(_) => Ok(()),
        Err(error) => Err(error.to_string()),
    }
}

/// Handles the whole messages in `inbuf`: notifications go to the hub; an error fails the
/// connection (pgrelay's own statements cannot fail on a healthy server). Returns whether
/// a ReadyForQuery was among them.
fn take_messages(hub: &Hub, inbuf: &mut BytesMut) -> Result<bool, String> {
    let mut ready = false;
    while let Some(frame) = split_frame(inbuf, MESSAGE_LIMIT).map_err(|error| error.to_string())? {
        match frame.tag() {
            b'A' => {
                let (channel, payload) = notification(frame.body()).ok_or("malformed NotificationResponse")?;
                if channel == MARKER_CHANNEL {
                    // Never a client's: where the stream of a handed-over client is cut.
                    hub.marker(&String::from_utf8_lossy(payload));
                    continue;
                }
                let channel = channel.to_owned();
                let message: Bytes = frame.into_bytes();
                hub.deliver(&channel, &message);
            }
            b'Z' => ready = true,
            b'E' => {
                let reason = ErrorFields::read(frame.body()).map_or_else(
                    |_| "an ErrorResponse".to_owned(),
                    |fields| format!("{} {}", fields.code, String::from_utf8_lossy(fields.message)),
                );
                return Err(format!("the server said: {reason}"));
            }
            // CommandComplete, NoticeResponse, ParameterStatus: nothing to do.
            _ => {}
        }
    }
    Ok(ready)
}

/// The channel and payload of a NotificationResponse body: Int32 sender PID, channel,
/// payload.
fn notification(body: &[u8]) -> Option<(&str, &[u8])> {
    let rest = body.get(4..)?;
    let (channel, rest) = read_cstr(rest, "channel").ok()?;
    let (payload, _) = read_cstr(rest, "payload").ok()?;
    Some((std::str::from_utf8(channel).ok()?, payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_turn_one_set_into_the_other_with_quoted_names() {
        let from: BTreeSet<String> = ["a".to_owned(), "gone".to_owned()].into();
        let to: BTreeSet<String> = ["a".to_owned(), "Mixed \"q\"".to_owned()].into();
        assert_eq!(statements(&from, &to), "LISTEN \"Mixed \"\"q\"\"\";UNLISTEN \"gone\";");
    }

    #[test]
    fn reads_the_channel_of_a_notification() {
        assert_eq!(
            notification(b"\0\0\0\x07orders\0{\"id\":1}\0"),
            Some(("orders", &b"{\"id\":1}"[..]))
        );
        assert_eq!(notification(b"\0\0\0\x07orders"), None);
        assert_eq!(notification(b"\0\0"), None);
    }
}
