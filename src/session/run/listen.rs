//! LISTEN / UNLISTEN with `listen_notify = "fanout"` (transaction and statement mode):
//! pgrelay answers them itself, outside a transaction block, and the client's channels go
//! to its database's hub instead of to a server, so the client is never pinned for them.
//! Notifications from the hub's inbox go to the client while it is outside a transaction
//! block, as PostgreSQL delivers them. See docs/notifications.md.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use super::{End, Session};
use crate::config::{ListenNotify, PoolMode};
use crate::error::{ClientError, Side, sqlstate};
use crate::net::ClientConn;
use crate::notify::{Target, channel_name};
use crate::protocol::compose::{self, Severity};
use crate::protocol::views::query_text;
use crate::protocol::{FrontendTag, Header, TxStatus};
use crate::route::{Classification, PinReason, SessionEffect};
use crate::session::local::LocalTx;

/// How long a LISTEN waits for the listener connection to LISTEN too, when
/// server_connect_timeout sets no limit.
const CONFIRM_FALLBACK: Duration = Duration::from_secs(10);

/// SQLSTATE of the end of a client whose notification inbox overflowed:
/// program_limit_exceeded, as PostgreSQL's own "too many notifications in the NOTIFY queue".
pub(super) const INBOX_OVERFLOW: &str = "54000";

/// One change a LISTEN or UNLISTEN makes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Change {
    Listen(String),
    Unlisten(String),
    UnlistenAll,
}

impl Change {
    fn tag(&self) -> &'static str {
        match self {
            Change::Listen(_) => "LISTEN",
            Change::Unlisten(_) | Change::UnlistenAll => "UNLISTEN",
        }
    }

    fn apply(&self, channels: &mut BTreeSet<String>) {
        match self {
            Change::Listen(channel) => {
                channels.insert(channel.clone());
            }
            Change::Unlisten(channel) => {
                channels.remove(channel);
            }
            Change::UnlistenAll => channels.clear(),
        }
    }
}

/// The changes of a query made of nothing but LISTEN and UNLISTEN statements, in order;
/// `None` for anything else (which goes to a server as before).
fn listen_only(class: &Classification) -> Option<Vec<Change>> {
    if class.transaction.is_some() || class.statements == 0 {
        return None;
    }
    let mut changes = Vec::new();
    for effect in &class.session {
        match effect {
            SessionEffect::Listen { channel } => changes.push(Change::Listen(channel_name(channel))),
            SessionEffect::Unlisten { channel: Some(channel) } => {
                changes.push(Change::Unlisten(channel_name(channel)));
            }
            SessionEffect::Unlisten { channel: None } => changes.push(Change::UnlistenAll),
            SessionEffect::Pin(PinReason::Listen) | SessionEffect::Unpin(PinReason::Listen) => {}
            _ => return None,
        }
    }
    (changes.len() == class.statements).then_some(changes)
}

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
        let Some(changes) = listen_only(&class) else {
            return false;
        };
        let _ = client.inbuf.split_to(header.len);
        let before = self.carried.fanout_channels.clone();
        for change in &changes {
            change.apply(&mut self.carried.fanout_channels);
        }
        self.carried.fanout_dirty = true;
        if self.sync_channels().await {
            for change in &changes {
                compose::command_complete(&mut client.outbuf, change.tag());
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
        let limit = self.database.pool.server_connect_timeout.unwrap_or(CONFIRM_FALLBACK) + Duration::from_secs(1);
        subscription
            .set_channels(&self.carried.fanout_channels, target, limit)
            .await
    }

    /// Where the listener connection goes: the database's current primary, as this
    /// client's user, looked up afresh at every connect.
    fn listener_target(&self) -> Target {
        let shared = Arc::downgrade(&self.shared);
        let database = self.database.name.clone();
        let user = self.user.clone();
        Arc::new(move || {
            let shared = shared.upgrade()?;
            let snapshot = shared.snapshot();
            let entry = snapshot.database(&database)?;
            let user = super::user_in(&snapshot, &database, &user);
            let pools = entry.pools(&user);
            pools.hosts.get(entry.primary_index()).map(|pool| pool.spec())
        })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::{Charset, Classifier, ClassifierSettings};

    fn changes(sql: &str) -> Option<Vec<Change>> {
        let classifier = Classifier::new(ClassifierSettings::default());
        listen_only(&classifier.classify_text(sql.as_bytes(), Charset::Utf8))
    }

    #[test]
    fn only_queries_of_listen_and_unlisten_are_answered() {
        assert_eq!(changes("LISTEN Orders"), Some(vec![Change::Listen("orders".into())]));
        assert_eq!(
            changes("listen \"Orders\"; UNLISTEN x; unlisten *"),
            Some(vec![
                Change::Listen("Orders".into()),
                Change::Unlisten("x".into()),
                Change::UnlistenAll
            ])
        );
        assert_eq!(
            changes(&format!("LISTEN {}", "a".repeat(80))),
            Some(vec![Change::Listen("a".repeat(63))])
        );
        assert_eq!(changes("LISTEN a; SELECT 1"), None);
        assert_eq!(changes("BEGIN; LISTEN a; COMMIT"), None);
        assert_eq!(changes("NOTIFY a"), None);
        assert_eq!(changes("SELECT 1"), None);
    }
}
