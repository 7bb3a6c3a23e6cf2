//! One database's notification hub: which client listens to which channel, the union of
//! those channels that the listener connection must LISTEN to, and the fan-out of each
//! notification to the inboxes of the clients listening to its channel.
//!
//! It also keeps the takeover markers (see docs/notifications.md): a marker is a
//! notification on a private channel, with a random token as its payload, that both the old
//! and the new process's listener connections read at the same place of PostgreSQL's one
//! notification queue; it cuts a handed-over client's stream between the two processes.
//!
//! Locking: one std mutex per hub, held only for map updates and for pushing one
//! notification to its inboxes (never across an await).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;

use super::inbox::{Inbox, Pushed};
use crate::metrics::NotifyMetrics;
use crate::upstream::ConnectSpec;

/// Where the listener connection goes and as whom, asked afresh at every (re)connect so a
/// new primary and a reload are followed. `None`: the database is gone.
pub type Target = Arc<dyn Fn() -> Option<Arc<ConnectSpec>> + Send + Sync>;

/// The private channel of takeover markers: LISTENed to while a marker is expected, and
/// never delivered to a client nor counted as a channel.
pub const MARKER_CHANNEL: &str = "pgrelay_takeover_marker";

/// What a marker does to the subscriber waiting for it.
#[derive(Debug, Clone, Copy)]
enum Marked {
    /// Its client goes to the new process: its inbox is sealed at the marker.
    Leaving(u64),
    /// Its client comes from the old process: its inbox is cut at the marker.
    Arriving(u64),
}

struct Subscriber {
    inbox: Arc<Inbox>,
    channels: BTreeSet<String>,
    /// Channels it added, with the generation from whose confirmation on it hears them:
    /// a notification the listener connection reads before that was committed before the
    /// client's LISTEN took effect, and PostgreSQL would not deliver it either.
    since: HashMap<String, u64>,
    /// Made for a client still on the old process, not cut at its marker yet: what it
    /// takes now is dropped at the cut, and not counted as delivered or dropped.
    held: bool,
}

#[derive(Default)]
struct State {
    subscribers: HashMap<u64, Subscriber>,
    /// Channel → the subscribers listening to it; a channel is here while one does.
    channels: HashMap<String, HashSet<u64>>,
    next_id: u64,
    /// Bumped whenever the set of channels gains one: what the listener must confirm.
    generation: u64,
    /// The listener task runs.
    listening: bool,
    /// The most recent subscriber's target (see `Hub::subscribe`).
    target: Option<Target>,
    /// Takeover markers expected, by token.
    markers: HashMap<String, Marked>,
    /// Markers the listener connection is to NOTIFY (the new process sends them).
    unsent_markers: Vec<String>,
}

/// See the module documentation.
pub struct Hub {
    database: String,
    state: Mutex<State>,
    /// Wakes the listener task when the channels change.
    pub(super) changed: tokio::sync::Notify,
    /// The generation the listener connection has confirmed (its LISTENs answered).
    applied: tokio::sync::watch::Sender<u64>,
    metrics: NotifyMetrics,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("database", &self.database)
            .finish_non_exhaustive()
    }
}

impl Hub {
    pub(super) fn new(database: &str, metrics: NotifyMetrics) -> Hub {
        Hub {
            database: database.to_owned(),
            state: Mutex::new(State::default()),
            changed: tokio::sync::Notify::new(),
            applied: tokio::sync::watch::channel(0).0,
            metrics,
        }
    }

    pub fn database(&self) -> &str {
        &self.database
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A new subscriber with no channel yet.
    pub fn subscribe(self: &Arc<Self>) -> Subscription {
        self.add_subscriber(false)
    }

    /// A new subscriber for a client the old process is handing over: nothing it takes is
    /// counted until it is cut at its marker.
    pub fn subscribe_held(self: &Arc<Self>) -> Subscription {
        self.add_subscriber(true)
    }

    fn add_subscriber(self: &Arc<Self>, held: bool) -> Subscription {
        let inbox = Arc::new(Inbox::default());
        let mut state = self.state();
        state.next_id += 1;
        let id = state.next_id;
        state.subscribers.insert(
            id,
            Subscriber {
                inbox: inbox.clone(),
                channels: BTreeSet::new(),
                since: HashMap::new(),
                held,
            },
        );
        Subscription {
            hub: self.clone(),
            id,
            inbox,
        }
    }

    /// Makes `channels` the channels of subscriber `id`. Returns the generation the
    /// listener must confirm before a notification on an added channel is sure to come
    /// (`None`: nothing was added). `target` becomes the listener's target: the listener
    /// logs in as the user of the client that last changed its channels.
    fn set_channels(self: &Arc<Self>, id: u64, channels: &BTreeSet<String>, target: Target) -> Option<u64> {
        let applied = *self.applied.borrow();
        let mut state = self.state();
        let state = &mut *state;
        let subscriber = state.subscribers.get_mut(&id)?;
        let old = std::mem::replace(&mut subscriber.channels, channels.clone());
        subscriber
            .since
            .retain(|channel, since| *since > applied && channels.contains(channel));
        // Heard from the round trip the listener connection makes after this change.
        let since = state.generation + 1;
        for new in channels.difference(&old) {
            subscriber.since.insert(new.clone(), since);
        }
        let was_listening = !old.is_empty();
        let mut union_changed = false;
        let mut added = false;
        for gone in old.difference(channels) {
            if let Some(ids) = state.channels.get_mut(gone) {
                ids.remove(&id);
                if ids.is_empty() {
                    state.channels.remove(gone);
                    union_changed = true;
                }
            }
        }
        for new in channels.difference(&old) {
            added = true;
            let ids = state.channels.entry(new.clone()).or_default();
            union_changed |= ids.is_empty();
            ids.insert(id);
        }
        match (was_listening, channels.is_empty()) {
            (false, false) => self.metrics.clients.inc(),
            (true, true) => self.metrics.clients.dec(),
            _ => {}
        }
        self.metrics
            .channels
            .set(i64::try_from(state.channels.len()).unwrap_or(i64::MAX));
        state.target = Some(target);
        // An added channel needs a round trip of the listener connection even when others
        // listen to it already: what it reads before that is not for this client.
        if union_changed || added {
            state.generation += 1;
            if !state.listening && !state.channels.is_empty() {
                state.listening = true;
                tokio::spawn(super::listener::run(self.clone()));
            }
            self.changed.notify_one();
        }
        added.then_some(state.generation)
    }

    /// Waits until the listener has confirmed `generation`, at most `limit`.
    async fn wait_applied(&self, generation: u64, limit: Duration) -> bool {
        let mut applied = self.applied.subscribe();
        tokio::time::timeout(limit, applied.wait_for(|done| *done >= generation))
            .await
            .is_ok_and(|waited| waited.is_ok())
    }

    fn remove(&self, id: u64) {
        let mut state = self.state();
        let Some(subscriber) = state.subscribers.remove(&id) else {
            return;
        };
        state
            .markers
            .retain(|_, marked| !matches!(marked, Marked::Leaving(of) | Marked::Arriving(of) if *of == id));
        let mut union_changed = false;
        for channel in &subscriber.channels {
            if let Some(ids) = state.channels.get_mut(channel) {
                ids.remove(&id);
                if ids.is_empty() {
                    state.channels.remove(channel);
                    union_changed = true;
                }
            }
        }
        if !subscriber.channels.is_empty() {
            self.metrics.clients.dec();
        }
        self.metrics
            .channels
            .set(i64::try_from(state.channels.len()).unwrap_or(i64::MAX));
        if !subscriber.held {
            self.metrics
                .dropped
                .inc_by(u64::try_from(subscriber.inbox.queued()).unwrap_or(u64::MAX));
        }
        if union_changed {
            self.changed.notify_one();
        }
    }

    /// The channels the listener connection must LISTEN to, and their generation.
    pub(super) fn wanted(&self) -> (BTreeSet<String>, u64) {
        let state = self.state();
        let mut wanted: BTreeSet<String> = state.channels.keys().cloned().collect();
        if !state.markers.is_empty() {
            wanted.insert(MARKER_CHANNEL.to_owned());
        }
        (wanted, state.generation)
    }

    /// Expects the marker `token`; returns the generation after which the listener
    /// connection LISTENs to the marker channel.
    fn expect_marker(&self, token: &str, marked: Marked) -> u64 {
        let mut state = self.state();
        state.markers.insert(token.to_owned(), marked);
        state.generation += 1;
        self.changed.notify_one();
        state.generation
    }

    /// Stops expecting the marker `token`; `false` if it had come already.
    fn forget_marker(&self, token: &str) -> bool {
        let mut state = self.state();
        let expected = state.markers.remove(token).is_some();
        if state.markers.is_empty() {
            self.changed.notify_one();
        }
        expected
    }

    /// Stops waiting for the marker `token` that was to cut subscriber `id`: from now on its
    /// notifications count as any subscriber's (the cut is given up, see
    /// `Subscription::abandon_cut`).
    fn abandon_cut(&self, id: u64, token: &str) {
        let mut state = self.state();
        state.markers.remove(token);
        if let Some(subscriber) = state.subscribers.get_mut(&id) {
            subscriber.held = false;
        }
        if state.markers.is_empty() {
            self.changed.notify_one();
        }
    }

    /// Has the listener connection NOTIFY the marker `token` (after
    /// `Subscription::expect_marker` confirmed, so that it reads its own marker).
    pub fn send_marker(&self, token: &str) {
        self.state().unsent_markers.push(token.to_owned());
        self.changed.notify_one();
    }

    /// The markers the listener connection is to send now, taken.
    pub(super) fn take_unsent_markers(&self) -> Vec<String> {
        std::mem::take(&mut self.state().unsent_markers)
    }

    /// The listener connection read the marker `token` (its place in the notification
    /// order): the subscriber expecting it is sealed or cut there. Unknown tokens are
    /// another process's, or came too late.
    pub(super) fn marker(&self, token: &str) {
        let mut state = self.state();
        let Some(marked) = state.markers.remove(token) else {
            return;
        };
        match marked {
            Marked::Leaving(id) => {
                if let Some(subscriber) = state.subscribers.get(&id) {
                    subscriber.inbox.seal();
                }
            }
            Marked::Arriving(id) => {
                if let Some(subscriber) = state.subscribers.get_mut(&id) {
                    subscriber.inbox.cut();
                    subscriber.held = false;
                }
            }
        }
        if state.markers.is_empty() {
            // The marker channel is not wanted any more.
            self.changed.notify_one();
        }
    }

    /// The listener's target, or `None` after marking the listener stopped when no
    /// channel is wanted any more (checked under the lock, so a subscriber adding one
    /// meanwhile starts a new listener).
    pub(super) fn target_or_stop(&self) -> Option<Option<Target>> {
        let mut state = self.state();
        if state.channels.is_empty() {
            state.listening = false;
            return None;
        }
        Some(state.target.clone())
    }

    /// The listener connection confirmed `generation`.
    pub(super) fn confirm(&self, generation: u64) {
        self.applied.send_if_modified(|applied| {
            let newer = generation > *applied;
            if newer {
                *applied = generation;
            }
            newer
        });
    }

    /// Queues one NotificationResponse (`message`, whole) for every client listening to
    /// `channel` (since before the listener's last round trip); a client whose inbox
    /// overflows is left to its session to disconnect.
    pub(super) fn deliver(&self, channel: &str, message: &Bytes) {
        let applied = *self.applied.borrow();
        let state = self.state();
        let Some(ids) = state.channels.get(channel) else {
            return;
        };
        for id in ids {
            let Some(subscriber) = state.subscribers.get(id) else {
                continue;
            };
            if subscriber.since.get(channel).is_some_and(|since| *since > applied) {
                // Committed before this client's LISTEN took effect.
                continue;
            }
            match subscriber.inbox.push(message) {
                // Before the cut: the old process delivers it.
                Pushed::Queued | Pushed::Overflowed if subscriber.held => {}
                Pushed::Queued => self.metrics.delivered.inc(),
                Pushed::Overflowed => self.metrics.dropped.inc(),
                // The new process delivers it.
                Pushed::Sealed => {}
            }
        }
    }

    /// The listener connection was lost: every listening client may miss notifications.
    pub(super) fn mark_gap(&self) {
        let state = self.state();
        for subscriber in state.subscribers.values() {
            if !subscriber.channels.is_empty() {
                subscriber.inbox.mark_gap();
            }
        }
    }
}

/// One client's place in a hub; leaving it (drop) removes the client's channels.
#[derive(Debug)]
pub struct Subscription {
    hub: Arc<Hub>,
    id: u64,
    inbox: Arc<Inbox>,
}

impl Subscription {
    pub fn inbox(&self) -> &Inbox {
        &self.inbox
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// Makes `channels` this client's channels; when one was added, waits (at most
    /// `limit`) until the listener connection LISTENs to it, so that a notification
    /// committed after the client's LISTEN returns reaches it, as on a direct connection.
    /// `false`: the listener could not confirm in time (the channels stay set, and take
    /// effect once it reconnects).
    pub async fn set_channels(&self, channels: &BTreeSet<String>, target: Target, limit: Duration) -> bool {
        match self.hub.set_channels(self.id, channels, target) {
            Some(generation) => self.hub.wait_applied(generation, limit).await,
            None => true,
        }
    }
}

impl Subscription {
    /// Expects the takeover marker `token`: its client leaves for a new process (`leaving`,
    /// the inbox is sealed at the marker) or arrives from the old one (the inbox is cut
    /// there). Waits (at most `limit`) until the listener connection LISTENs to the
    /// marker channel; `false` if it did not in time (the marker is no longer expected).
    pub async fn expect_marker(&self, token: &str, leaving: bool, limit: Duration) -> bool {
        let marked = if leaving {
            Marked::Leaving(self.id)
        } else {
            Marked::Arriving(self.id)
        };
        let generation = self.hub.expect_marker(token, marked);
        if self.hub.wait_applied(generation, limit).await {
            return true;
        }
        self.hub.forget_marker(token);
        false
    }

    /// Stops expecting the marker `token`; `false` if it had come already (the inbox is
    /// sealed or cut).
    pub fn forget_marker(&self, token: &str) -> bool {
        self.hub.forget_marker(token)
    }

    /// A held subscription whose cut at the marker `token` did not come: it stops being
    /// held and stops expecting the marker, so that the hub no longer listens for it.
    pub fn abandon_cut(&self, token: &str) {
        self.hub.abandon_cut(self.id, token);
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.remove(self.id);
    }
}

/// The hubs of every database, created on first use and kept for the life of the
/// process (a hub with no subscriber holds no connection).
pub struct Hubs {
    hubs: Mutex<HashMap<String, Arc<Hub>>>,
    /// Subscriptions made for clients the old process is handing over, by marker token,
    /// until their socket comes.
    held: Mutex<HashMap<String, Subscription>>,
    metrics: Arc<crate::metrics::Metrics>,
}

impl std::fmt::Debug for Hubs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hubs").finish_non_exhaustive()
    }
}

impl Hubs {
    pub fn new(metrics: Arc<crate::metrics::Metrics>) -> Hubs {
        Hubs {
            hubs: Mutex::new(HashMap::new()),
            held: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    pub fn hub(&self, database: &str) -> Arc<Hub> {
        let mut hubs = self.hubs.lock().unwrap_or_else(PoisonError::into_inner);
        hubs.entry(database.to_owned())
            .or_insert_with(|| Arc::new(Hub::new(database, self.metrics.notify(database))))
            .clone()
    }

    /// Keeps `subscription` for the client whose socket comes with the marker `token`.
    pub fn hold(&self, token: &str, subscription: Subscription) {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        held.insert(token.to_owned(), subscription);
    }

    /// The subscription kept for the marker `token`, taken.
    pub fn take_held(&self, token: &str) -> Option<Subscription> {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        held.remove(token)
    }
}
