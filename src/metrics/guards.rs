//! RAII gauges: a session holds one guard per gauge family it appears in, moves it as its
//! state changes, and the guard takes the client out of the gauge when dropped — whatever
//! path the session ends by (error, disconnect, task cancelled), the counts stay right.

use std::sync::Arc;
use std::time::Instant;

use super::handles::{DatabaseHandles, UserHandles};
use super::labels::{ClientState, PinReason};

/// Counts one client in exactly one `pgrelay_clients` state.
///
/// Waiting is timed here: leaving [`ClientState::Waiting`] (to a server, or back to idle after
/// a timeout or a cancel) or dropping the guard while waiting observes the wait in
/// `pgrelay_pool_wait_seconds`. Go through `Waiting` for every checkout, also one that gets a
/// server at once: the near-zero waits are what make the percentiles honest.
pub struct ClientStateGauge {
    user: Arc<UserHandles>,
    held: Held,
}

/// The state counted, with the start of a wait where there is one.
#[derive(Debug, Clone, Copy)]
enum Held {
    Active,
    Waiting { since: Instant },
    Idle,
}

impl Held {
    fn state(self) -> ClientState {
        match self {
            Held::Active => ClientState::Active,
            Held::Waiting { .. } => ClientState::Waiting,
            Held::Idle => ClientState::Idle,
        }
    }

    fn enter(state: ClientState) -> Held {
        match state {
            ClientState::Active => Held::Active,
            ClientState::Waiting => Held::Waiting { since: Instant::now() },
            ClientState::Idle => Held::Idle,
        }
    }
}

impl ClientStateGauge {
    pub(crate) fn new(user: Arc<UserHandles>, initial: ClientState) -> ClientStateGauge {
        user.clients[initial.index()].inc();
        ClientStateGauge {
            user,
            held: Held::enter(initial),
        }
    }

    pub fn state(&self) -> ClientState {
        self.held.state()
    }

    /// Moves the client to `next`; setting the current state again changes nothing (a wait
    /// keeps its start).
    pub fn set(&mut self, next: ClientState) {
        if self.held.state() == next {
            return;
        }
        self.leave();
        self.user.clients[next.index()].inc();
        self.held = Held::enter(next);
    }

    /// Takes the client out of its current state's gauge, recording a wait that ends here.
    fn leave(&self) {
        self.user.clients[self.held.state().index()].dec();
        if let Held::Waiting { since } = self.held {
            self.user.pool_wait.observe(since.elapsed().as_secs_f64());
        }
    }
}

impl Drop for ClientStateGauge {
    fn drop(&mut self) {
        self.leave();
    }
}

impl std::fmt::Debug for ClientStateGauge {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("ClientStateGauge")
            .field("held", &self.held)
            .finish_non_exhaustive()
    }
}

/// Counts one client in `pgrelay_pinned_sessions` under each reason it is currently pinned
/// for.
///
/// A set rather than a single state: a client can hold a temporary table and LISTEN at once,
/// and dropping one of them must not unpin it for the other. So the sum over reasons can
/// exceed the number of pinned clients; `max by (database)` is a lower bound for it.
pub struct PinnedGauge {
    database: Arc<DatabaseHandles>,
    /// Bit `PinReason::index()` set for each reason held.
    held: u8,
}

impl PinnedGauge {
    pub(crate) fn new(database: Arc<DatabaseHandles>) -> PinnedGauge {
        PinnedGauge { database, held: 0 }
    }

    /// Starts counting `reason`; returns false (and changes nothing) when already held.
    pub fn insert(&mut self, reason: PinReason) -> bool {
        let bit = 1u8 << reason.index();
        if self.held & bit != 0 {
            return false;
        }
        self.held |= bit;
        self.database.pinned[reason.index()].inc();
        true
    }

    /// Stops counting `reason`; returns false (and changes nothing) when it was not held.
    pub fn remove(&mut self, reason: PinReason) -> bool {
        let bit = 1u8 << reason.index();
        if self.held & bit == 0 {
            return false;
        }
        self.held &= !bit;
        self.database.pinned[reason.index()].dec();
        true
    }

    pub fn contains(&self, reason: PinReason) -> bool {
        self.held & (1u8 << reason.index()) != 0
    }

    /// Whether the client is pinned for any reason.
    pub fn is_pinned(&self) -> bool {
        self.held != 0
    }

    /// The reasons held, in [`PinReason::ALL`] order.
    pub fn reasons(&self) -> impl Iterator<Item = PinReason> + '_ {
        PinReason::ALL.into_iter().filter(|reason| self.contains(*reason))
    }

    /// Drops every reason (e.g. after `DISCARD ALL` or a server reset).
    pub fn clear(&mut self) {
        for reason in PinReason::ALL {
            self.remove(reason);
        }
    }
}

impl Drop for PinnedGauge {
    fn drop(&mut self) {
        self.clear();
    }
}

impl std::fmt::Debug for PinnedGauge {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_list()
            .entries(self.reasons().map(PinReason::label))
            .finish()
    }
}
