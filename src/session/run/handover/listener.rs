//! A fan-out listener's move to the new process, cut exactly at a marker in PostgreSQL's
//! one notification order, so that it misses and repeats no notification:
//!
//! 1. The old process's listener connection LISTENs to the marker channel; the old session
//!    announces its client (the description, with a fresh token, without the socket).
//! 2. The new process subscribes the client in its own hub, waits until its listener
//!    connection LISTENs to the client's channels and to the marker channel, and NOTIFYs
//!    the marker. Both listener connections read it at the same place of the order.
//! 3. The old process seals the client's inbox at the marker, delivers what it holds and
//!    hands the socket over; the new process cuts its copy at the marker (drops what came
//!    before it) and delivers what follows once it has the socket.
//!
//! Should the marker not come in time, the client stays on the old process, as a client
//! that cannot move does (it is ended at the shutdown); the new process drops the
//! subscription it made after a while.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use super::Description;
use crate::net::ClientConn;
use crate::runtime::Shared;
use crate::session::run::{Session, listen};

/// How long the old process waits for the marker after the announcement, and for its
/// listener connection to LISTEN to the marker channel before it.
const MARKER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the new process waits for its listener connection to read the marker once
/// the socket is there (the old process has read it already).
const CUT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the new process keeps a subscription for a client whose socket does not come
/// (the old process gave up waiting for the marker, or failed).
const HOLD_TIMEOUT: Duration = Duration::from_secs(30);

/// A marker token nobody else uses: 128 random bits, in hex.
fn new_token() -> String {
    format!("{:016x}{:016x}", rand::random::<u64>(), rand::random::<u64>())
}

impl Session {
    /// Old process: for a fan-out listener, announces it and delivers everything up to
    /// the marker. `true`: its socket can go now (at once for a client that does not
    /// listen); `false`: it stays here.
    pub(in crate::session::run) async fn settle_listener(
        &mut self,
        client: &mut ClientConn,
        description: &mut Description,
    ) -> bool {
        if description.channels.is_empty() {
            return true;
        }
        let Some(subscription) = self.subscription.as_deref() else {
            return false;
        };
        let token = new_token();
        description.marker = token.clone();
        if !subscription.expect_marker(&token, true, MARKER_TIMEOUT).await {
            tracing::warn!(client = %client.peer, database = %self.database.name,
                "the listener connection did not LISTEN to the takeover marker channel in time: the listening client stays on this process");
            return false;
        }
        if !self.shared.client_handover.announce(&description.encode()).await {
            self.forget_marker(&token);
            return false;
        }
        // Until the marker comes, what comes is delivered here as usual (an inbox that
        // waited for a slow marker could overflow).
        let deadline = tokio::time::Instant::now() + MARKER_TIMEOUT;
        let marked = loop {
            let Some(subscription) = self.subscription.as_deref() else {
                return false;
            };
            let inbox = subscription.inbox();
            let woke = tokio::select! {
                biased;
                () = inbox.wait_sealed() => Some(true),
                () = tokio::time::sleep_until(deadline) => Some(false),
                () = inbox.ready() => None,
            };
            if let Some(marked) = woke {
                break marked;
            }
            if !self.deliver_now(client).await {
                self.forget_marker(&token);
                return false;
            }
        };
        // Decided under the hub's lock: a marker read meanwhile still counts.
        if !marked && self.forget_marker(&token) {
            tracing::warn!(client = %client.peer, database = %self.database.name, limit = ?MARKER_TIMEOUT,
                "the takeover marker did not come in time: the listening client stays on this process");
            return false;
        }
        // Everything before the marker goes out from here; what follows is the new
        // process's.
        self.deliver_now(client).await
    }

    /// Writes the queued notifications to the client; `false` if it does not take them.
    async fn deliver_now(&mut self, client: &mut ClientConn) -> bool {
        if self.take_notifications(client).is_err() {
            return false;
        }
        tokio::time::timeout(crate::session::FAREWELL_TIMEOUT, client.flush())
            .await
            .is_ok_and(|flushed| flushed.is_ok())
    }

    /// Stops expecting the marker `token`; `false` if it came already.
    fn forget_marker(&self, token: &str) -> bool {
        self.subscription
            .as_deref()
            .is_some_and(|subscription| subscription.forget_marker(token))
    }

    /// New process: gives a handed-over listener the subscription made at its
    /// announcement, once cut at the marker. Without one (it came too late, or the marker
    /// did not come) it listens afresh, and is warned that notifications may have been
    /// missed.
    pub(in crate::session) async fn adopt_listener(&mut self, description: &Description) {
        self.carried.fanout_channels = description.channels.iter().cloned().collect();
        let held = self.shared.notify.take_held(&description.marker);
        if let Some(subscription) = held {
            if tokio::time::timeout(CUT_TIMEOUT, subscription.inbox().wait_cut())
                .await
                .is_err()
            {
                tracing::warn!(database = %self.database.name,
                    "the takeover marker did not come: a handed-over listener is warned that notifications may have been missed or repeated");
                subscription.abandon_cut(&description.marker);
                subscription.inbox().mark_gap();
            }
            self.subscription = Some(Box::new(subscription));
            return;
        }
        tracing::warn!(database = %self.database.name,
            "no subscription was made for a handed-over listener: it listens afresh and is warned that notifications may have been missed");
        self.carried.fanout_dirty = true;
        self.sync_channels().await;
        if let Some(subscription) = &self.subscription {
            subscription.inbox().mark_gap();
        }
    }
}

/// New process: a fan-out listener is announced. Subscribes it, waits until the listener
/// connection LISTENs to its channels and to the marker channel, keeps the subscription
/// for its socket, and has the marker sent. Nothing is sent when this fails: the old
/// process then keeps the client.
pub(in crate::session) async fn arrive(shared: Arc<Shared>, announcement: &[u8]) {
    let Some(description) = Description::decode(announcement) else {
        return tracing::warn!("takeover: a malformed announcement of a listening client");
    };
    if description.channels.is_empty() || description.marker.is_empty() {
        return tracing::warn!("takeover: an announcement of a client that does not listen");
    }
    let snapshot = shared.snapshot();
    let entries = snapshot
        .database(&description.database)
        .zip(description.user_entry(&snapshot));
    let Some((database, user)) = entries.filter(|(database, _)| {
        database.listen_notify == crate::config::ListenNotify::Fanout
            && database.mode() != crate::config::PoolMode::Session
    }) else {
        return tracing::warn!(database = %description.database, user = %description.user,
            "a listening client cannot be taken over here (its database or user is not in this configuration, or does not fan out): it stays with the old process");
    };
    let hub = shared.notify.hub(&database.name);
    let subscription = hub.subscribe_held();
    let channels: BTreeSet<String> = description.channels.iter().cloned().collect();
    let target = listen::listener_target(&shared, &database.name, &user);
    let limit = listen::confirm_limit(&database);
    if !subscription.set_channels(&channels, target, limit).await
        || !subscription.expect_marker(&description.marker, false, limit).await
    {
        return tracing::warn!(database = %database.name,
            "the listener connection did not LISTEN in time for a client being handed over: it stays with the old process");
    }
    let token = description.marker;
    // Kept before the marker goes: the socket may follow at once.
    shared.notify.hold(&token, subscription);
    hub.send_marker(&token);
    tokio::spawn(async move {
        tokio::time::sleep(HOLD_TIMEOUT).await;
        if shared.notify.take_held(&token).is_some() {
            tracing::info!("a listening client announced by the old process did not come: its subscription is dropped");
        }
    });
}
