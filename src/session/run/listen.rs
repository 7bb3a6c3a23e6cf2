//! LISTEN / UNLISTEN with `listen_notify = "fanout"` (transaction and statement mode):
//! the client's channels go to its database's hub instead of to a server, so the client is
//! never pinned for them. A simple query of only LISTEN/UNLISTEN with no server attached
//! and outside a transaction block is answered here; with a server attached (the
//! extended protocol, a transaction block) the pump answers it (`pump::listen`) and the
//! changes take effect when the transaction commits. Notifications from the hub's inbox
//! go to the client while it is outside a transaction block, as PostgreSQL delivers them.
//! See docs/notifications.md.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use super::{End, Session};
use crate::config::{ListenNotify, PoolMode};
use crate::error::{ClientError, Side, sqlstate};
use crate::net::ClientConn;
use crate::notify::Target;
use crate::protocol::compose::{self, Severity};
use crate::protocol::views::query_text;
use crate::protocol::{FrontendTag, Header, TxStatus};
use crate::route::PinReason;
use crate::runtime::{DatabaseEntry, Shared, UserEntry};
use crate::session::listen_tx;
use crate::session::local::LocalTx;

/// How long a LISTEN waits for the listener connection to LISTEN too, when
/// server_connect_timeout sets no limit.
const CONFIRM_FALLBACK: Duration = Duration::from_secs(10);

/// SQLSTATE of the end of a client whose notification inbox overflowed:
/// program_limit_exceeded, as PostgreSQL's own "too many notifications in the NOTIFY queue".
pub(super) const INBOX_OVERFLOW: &str = "54000";

impl Session {
    /// Whether this client's LISTENs are served by the database's hub.
    pub(super) fn fans_out(&self) -> bool {
        self.database.listen_notify == ListenNotify::Fanout && self.database.mode() != PoolMode::Session
    }

    /// Answers a simple-protocol query of only LISTEN/UNLISTEN statements without a
    /// server: outside a transaction block, with no server kept, and not already listening
    /// on a server (a client pinned by a LISTEN that went to its server keeps it).
    /// `false`: not such a query, nothing was taken.
    pub(super) async fn answer_listen(&mut self, client: &mut ClientConn, tag: FrontendTag) -> bool {
        if tag != FrontendTag::Query
            || !self.fans_out()
            || self.server.is_some()
            || self.local.tx != LocalTx::Idle
            || self.local.skipping_to_sync
            || self.carried.pins.reasons().any(|reason| reason == PinReason::Listen)
        {
            return false;
        }
        let Ok(Some(header)) = Header::peek(&client.inbuf) else {
            return false;
        };
        let Some(Ok(sql)) = client
            .inbuf
            .get(crate::protocol::HEADER_LEN..header.len)
            .map(query_text)
        else {
            return false;
        };
        let class = self
            .database
            .classifier
            .classify_text(sql, self.carried.client_encoding().charset);
        let Some(changes) = listen_tx::listen_only(&class) else {
            return false;
        };
        let _ = client.inbuf.split_to(header.len);
        // A simple query ends the unnamed statement.
        self.carried.listen_tx.unnamed = None;
        let before = self.carried.fanout_channels.clone();
        for change in changes.iter() {
            listen_tx::apply(change, &mut self.carried.fanout_channels);
        }
        self.carried.fanout_dirty = true;
        if self.sync_channels().await {
            for change in changes.iter() {
                compose::command_complete(&mut client.outbuf, listen_tx::tag(change));
            }
        } else {
            // As if the statement had failed: the channels stay as they were.
            self.carried.fanout_channels = before;
            self.carried.fanout_dirty = true;
            self.sync_channels().await;
            let error = ClientError::new(
                Side::Server,
                sqlstate::CONNECTION_FAILURE,
                format!(
                    "could not LISTEN: pgrelay's listener connection to the primary of database \"{}\" is not available",
                    self.database.name
                ),
            );
            self.report(&error);
            compose::error(&mut client.outbuf, Severity::Error, &error.sqlstate, &error.message);
        }
        compose::ready_for_query(&mut client.outbuf, TxStatus::Idle);
        true
    }

    /// Hands the client's channels to the hub if they changed, joining it on the first
    /// channel and leaving it after the last. `false`: an added channel was not confirmed
    /// by the listener connection in time.
    pub(super) async fn sync_channels(&mut self) -> bool {
        if !std::mem::take(&mut self.carried.fanout_dirty) {
            return true;
        }
        if self.carried.fanout_channels.is_empty() {
            // Leaving the hub: the inbox and its notifications go with it.
            if let Some(subscription) = self.subscription.take() {
                subscription
                    .set_channels(&BTreeSet::new(), self.listener_target(), Duration::ZERO)
                    .await;
            }
            return true;
        }
        let target = self.listener_target();
        let subscription = match &self.subscription {
            Some(subscription) => subscription,
            None => self
                .subscription
                .insert(Box::new(self.shared.notify.hub(&self.database.name).subscribe())),
        };
        let limit = confirm_limit(&self.database);
        subscription
            .set_channels(&self.carried.fanout_channels, target, limit)
            .await
    }

    /// Where the listener connection goes (see [`listener_target`]).
    fn listener_target(&self) -> Target {
        listener_target(&self.shared, &self.database.name, &self.user)
    }

    /// Moves the queued notifications to the client's output (the warning of a gap
    /// first). `Err` when the client's inbox overflowed.
    pub(super) fn take_notifications(&mut self, client: &mut ClientConn) -> Result<(), End> {
        let Some(subscription) = &self.subscription else {
            return Ok(());
        };
        if subscription.inbox().overflowed() {
            return Err(End::NotificationsOverflowed);
        }
        subscription.inbox().drain_into(&mut client.outbuf, |out| {
            compose::warning(
                out,
                sqlstate::CONNECTION_FAILURE,
                "pgrelay's listener connection to the primary was lost and opened again: notifications sent meanwhile may have been lost",
            );
        });
        Ok(())
    }

    /// Writes the client's output, ending the session should its inbox overflow first (a
    /// client that does not read).
    pub(super) async fn flush_notifications(&mut self, client: &mut ClientConn) -> Result<(), End> {
        let Some(subscription) = &self.subscription else {
            return client.flush().await.map_err(|_| End::ClientLeft);
        };
        tokio::select! {
            flushed = client.flush() => flushed.map_err(|_| End::ClientLeft),
            () = subscription.inbox().wait_overflow() => Err(End::NotificationsOverflowed),
        }
    }
}

/// Where the listener connection goes: the database's current primary, as `user`, looked
/// up afresh at every connect.
pub(super) fn listener_target(shared: &Arc<Shared>, database: &str, user: &Arc<UserEntry>) -> Target {
    let shared = Arc::downgrade(shared);
    let database = database.to_owned();
    let user = user.clone();
    Arc::new(move || {
        let shared = shared.upgrade()?;
        let snapshot = shared.snapshot();
        let entry = snapshot.database(&database)?;
        let user = super::user_in(&snapshot, &database, &user);
        let pools = entry.pools(&user);
        pools.hosts.get(entry.primary_index()).map(|pool| pool.spec())
    })
}

/// How long a LISTEN waits for the listener connection to LISTEN too.
pub(super) fn confirm_limit(database: &DatabaseEntry) -> Duration {
    database.pool.server_connect_timeout.unwrap_or(CONFIRM_FALLBACK) + Duration::from_secs(1)
}

/// The farewell of a client whose inbox overflowed.
pub(super) fn overflow_error() -> ClientError {
    ClientError::new(
        Side::Client,
        INBOX_OVERFLOW,
        format!(
            "terminating connection: the client did not read its notifications (more than {} or {} bytes queued in pgrelay)",
            crate::notify::MAX_QUEUED,
            crate::notify::MAX_QUEUED_BYTES
        ),
    )
}

/// Tells the client that the channels its commit gave it are not listened to yet: the
/// listener connection could not LISTEN in time (it goes on trying, and notifications
/// come once it has).
pub(super) fn warn_unconfirmed(client: &mut ClientConn, database: &str) {
    compose::warning(
        &mut client.outbuf,
        sqlstate::CONNECTION_FAILURE,
        &format!(
            "pgrelay's listener connection to the primary of database \"{database}\" is not available: notifications may be missed until it is back"
        ),
    );
}
