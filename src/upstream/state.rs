//! The state of a server connection that decides whether it may serve another batch or go
//! back to the pool: whether it still works, the transaction status it last reported, and
//! the protocol phase a client's traffic has left it in (COPY, an unsynced batch, a large
//! message half forwarded). It changes only through transitions named for the events that
//! cause them, and flags that only mean something together are held together, so that no
//! combination the protocol cannot produce can be written.

use std::num::NonZeroUsize;

use super::{CopyStart, Recipient};
use crate::protocol::TxStatus;

/// The FATAL error a server sent before closing the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ServerFatal {
    pub sqlstate: String,
    /// In the session's client encoding, as the server sent it.
    pub message: crate::error::MessageText,
}

/// Whether the connection still works, and whether it may be used again.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Health {
    /// It works, and may go back to the pool once idle.
    Usable,
    /// It works, and serves its client on, but must not go back to the pool: a cancel sent
    /// to it may still arrive, and must not hit another client's statement.
    Retiring,
    /// It failed (closed, an I/O error, a protocol violation, a server that stopped
    /// answering), the server ended the session, or pgrelay gave it up: nothing more is
    /// sent to it, not even Terminate. `fatal` is the FATAL the server said why with.
    Broken { fatal: Option<ServerFatal> },
}

/// The server is in COPY FROM STDIN (or COPY BOTH) and takes CopyData from the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CopyIn {
    /// The client has not sent its CopyDone or CopyFail yet: a Sync it sends now is
    /// ignored by the server.
    client_sending: bool,
}

/// A large server message that is forwarded as it arrives, without being looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Passthrough {
    /// Bytes of it still to come.
    remaining: NonZeroUsize,
    /// Who gets them: the client, or pgrelay, which drops them.
    to: Recipient,
}

/// What a server connection is doing and whether it may be used again.
///
/// The protocol phases are independent of each other because the protocol lets them
/// overlap: a COPY run in the extended protocol leaves the server unsynced, a large DataRow
/// of an unsynced batch is passed through, COPY BOTH sends CopyData while taking it. They
/// also outlast a failure: when a server is lost, the session reads them to tell the client
/// what it missed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ConnState {
    health: Health,
    /// As the server's last ReadyForQuery said.
    status: TxStatus,
    /// Extended-protocol messages were sent after the last Sync: the server is in an
    /// implicit transaction until the next Sync.
    unsynced: bool,
    copy: Option<CopyIn>,
    passthrough: Option<Passthrough>,
    /// A client's session state is on it (session mode, or a pinned client): it may only
    /// go back to the pool after a reset.
    holds_client_state: bool,
}

impl Default for ConnState {
    fn default() -> Self {
        ConnState {
            health: Health::Usable,
            status: TxStatus::Idle,
            unsynced: false,
            copy: None,
            passthrough: None,
            holds_client_state: false,
        }
    }
}

impl ConnState {
    // Health.

    /// The connection failed: the server closed it, an I/O error, a protocol violation,
    /// or a server that did not act on a cancel. A FATAL it sent before stays recorded.
    pub(crate) fn server_lost(&mut self) {
        if !self.is_broken() {
            self.health = Health::Broken { fatal: None };
        }
    }

    /// The server sent a FATAL error: it ends the session and closes next.
    pub(crate) fn server_ended(&mut self, fatal: ServerFatal) {
        self.health = Health::Broken { fatal: Some(fatal) };
    }

    /// pgrelay gives up a connection that still works, whose session it cannot account
    /// for any more: it is closed as a broken one is.
    pub(crate) fn abandon(&mut self) {
        self.server_lost();
    }

    /// The connection may serve its client on but must not be reused. A broken one stays
    /// broken.
    pub(crate) fn retire(&mut self) {
        if self.health == Health::Usable {
            self.health = Health::Retiring;
        }
    }

    pub(crate) fn is_broken(&self) -> bool {
        matches!(self.health, Health::Broken { .. })
    }

    /// The FATAL error the server ended the session with, if it did.
    pub(crate) fn fatal(&self) -> Option<&ServerFatal> {
        match &self.health {
            Health::Broken { fatal } => fatal.as_ref(),
            Health::Usable | Health::Retiring => None,
        }
    }

    // Transaction status.

    /// The server sent ReadyForQuery with `status`.
    pub(crate) fn ready(&mut self, status: TxStatus) {
        self.status = status;
    }

    pub(crate) fn status(&self) -> TxStatus {
        self.status
    }

    // Extended protocol.

    /// An extended-protocol message (Parse, Bind, Describe, Close, Execute) went to the
    /// server: it is in an implicit transaction until the next Sync.
    pub(crate) fn extended_sent(&mut self) {
        self.unsynced = true;
    }

    /// A Sync the server acts on went to it.
    pub(crate) fn synced(&mut self) {
        self.unsynced = false;
    }

    pub(crate) fn is_unsynced(&self) -> bool {
        self.unsynced
    }

    // COPY FROM STDIN.

    /// The server said it is in COPY FROM STDIN (CopyInResponse, CopyBothResponse); `start`
    /// is what the expected-response queue made of it.
    pub(crate) fn copy_started(&mut self, start: CopyStart) {
        self.copy = Some(CopyIn {
            client_sending: !start.client_ended,
        });
        if start.needs_sync {
            self.unsynced = true;
        }
    }

    /// The client's CopyDone or CopyFail went to the server.
    pub(crate) fn client_ended_copy(&mut self) {
        if let Some(copy) = &mut self.copy {
            copy.client_sending = false;
        }
    }

    /// The server ended the COPY (CommandComplete) or any statement failed
    /// (ErrorResponse): it takes no more CopyData.
    pub(crate) fn copy_ended(&mut self) {
        self.copy = None;
    }

    pub(crate) fn in_copy(&self) -> bool {
        self.copy.is_some()
    }

    /// In COPY FROM STDIN, before the client's CopyDone or CopyFail.
    pub(crate) fn client_sending_copy(&self) -> bool {
        self.copy.is_some_and(|copy| copy.client_sending)
    }

    // Large messages.

    /// The start of a server message of `len` bytes, more than have arrived, is forwarded
    /// to `to`; the rest follows as it arrives.
    pub(crate) fn passthrough_started(&mut self, len: usize, to: Recipient) {
        self.passthrough = NonZeroUsize::new(len).map(|remaining| Passthrough { remaining, to });
    }

    /// `available` more bytes arrived while a message is passed through: returns how many
    /// of them belong to it, and who gets them. `None`: no message is being passed through.
    pub(crate) fn passed_through(&mut self, available: usize) -> Option<(usize, Recipient)> {
        let Passthrough { remaining, to } = self.passthrough?;
        let n = remaining.get().min(available);
        self.passthrough = NonZeroUsize::new(remaining.get() - n).map(|remaining| Passthrough { remaining, to });
        Some((n, to))
    }

    /// Part of a large message has been forwarded and the rest has not arrived.
    pub(crate) fn mid_message(&self) -> bool {
        self.passthrough.is_some()
    }

    /// Part of a large message went to the client, the rest has not: the client cannot
    /// be told anything else until it has all of it.
    pub(crate) fn mid_message_to_client(&self) -> bool {
        self.passthrough
            .is_some_and(|passthrough| passthrough.to == Recipient::Client)
    }

    // Client session state.

    /// A client's session state is (or may be) left on the server.
    pub(crate) fn client_state_added(&mut self) {
        self.holds_client_state = true;
    }

    /// What the client left on the server was reset, or no longer matters to it.
    pub(crate) fn client_state_cleared(&mut self) {
        self.holds_client_state = false;
    }

    pub(crate) fn holds_client_state(&self) -> bool {
        self.holds_client_state
    }

    // Decisions.

    /// A statement a client started is still under way: a COPY, a message half passed
    /// through, or an extended-protocol batch without its Sync.
    pub(crate) fn mid_statement(&self) -> bool {
        self.copy.is_some() || self.passthrough.is_some() || self.unsynced
    }

    /// Not broken, nothing under way, and outside a transaction: as far as this state
    /// tells, the connection can serve another batch.
    pub(crate) fn is_idle(&self) -> bool {
        !self.is_broken() && !self.mid_statement() && self.status == TxStatus::Idle
    }

    /// Idle, not retiring, and holding no client's session state: as far as this state
    /// tells, the connection may go back to the pool.
    pub(crate) fn is_reusable(&self) -> bool {
        self.is_idle() && self.health == Health::Usable && !self.holds_client_state
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fatal() -> ServerFatal {
        ServerFatal {
            sqlstate: "57P01".to_owned(),
            message: "terminating connection due to administrator command".into(),
        }
    }

    fn copy_start(client_ended: bool, needs_sync: bool) -> CopyStart {
        CopyStart {
            client_ended,
            needs_sync,
        }
    }

    #[test]
    fn a_new_connection_is_idle_and_reusable() {
        let state = ConnState::default();
        assert!(state.is_idle());
        assert!(state.is_reusable());
        assert!(!state.is_broken());
        assert_eq!(state.fatal(), None);
    }

    #[test]
    fn an_open_transaction_is_not_idle() {
        let mut state = ConnState::default();
        for status in [TxStatus::InTransaction, TxStatus::Failed] {
            state.ready(status);
            assert!(!state.is_idle() && !state.is_reusable());
        }
        state.ready(TxStatus::Idle);
        assert!(state.is_reusable());
    }

    #[test]
    fn a_retiring_connection_serves_on_but_is_not_reused() {
        let mut state = ConnState::default();
        state.retire();
        assert!(state.is_idle());
        assert!(!state.is_reusable());
        assert!(!state.is_broken());
    }

    #[test]
    fn a_fatal_is_kept_by_the_broken_connection() {
        let mut state = ConnState::default();
        state.server_ended(fatal());
        assert!(state.is_broken());
        assert!(!state.is_idle() && !state.is_reusable());
        // The connection closing after its FATAL does not lose the reason.
        state.server_lost();
        assert_eq!(state.fatal(), Some(&fatal()));
        // Nor does retiring make a broken connection less broken.
        state.retire();
        assert!(state.is_broken());
        assert_eq!(state.fatal(), Some(&fatal()));
    }

    #[test]
    fn a_lost_connection_has_no_fatal() {
        let mut state = ConnState::default();
        state.retire();
        state.server_lost();
        assert!(state.is_broken());
        assert_eq!(state.fatal(), None);

        let mut state = ConnState::default();
        state.abandon();
        assert!(state.is_broken() && !state.is_reusable());
    }

    #[test]
    fn an_extended_batch_is_under_way_until_its_sync() {
        let mut state = ConnState::default();
        state.extended_sent();
        assert!(state.is_unsynced() && state.mid_statement() && !state.is_idle());
        state.synced();
        assert!(state.is_reusable());
    }

    #[test]
    fn copy_in_the_simple_protocol() {
        let mut state = ConnState::default();
        state.copy_started(copy_start(false, false));
        assert!(state.in_copy() && state.client_sending_copy());
        assert!(!state.is_unsynced() && !state.is_idle());
        state.client_ended_copy();
        assert!(state.in_copy() && !state.client_sending_copy());
        state.copy_ended();
        assert!(!state.in_copy());
        assert!(state.is_reusable());
    }

    #[test]
    fn copy_whose_end_the_client_already_sent() {
        let mut state = ConnState::default();
        state.copy_started(copy_start(true, false));
        assert!(state.in_copy() && !state.client_sending_copy());
    }

    #[test]
    fn copy_in_the_extended_protocol_leaves_the_server_unsynced() {
        let mut state = ConnState::default();
        state.copy_started(copy_start(false, true));
        assert!(state.in_copy() && state.is_unsynced());
        state.copy_ended();
        assert!(state.is_unsynced() && !state.is_idle());
        state.synced();
        assert!(state.is_idle());
    }

    #[test]
    fn the_end_of_a_copy_that_failed_already_changes_nothing() {
        let mut state = ConnState::default();
        state.client_ended_copy();
        assert!(!state.in_copy() && !state.client_sending_copy());
        assert!(state.is_reusable());
    }

    #[test]
    fn a_large_message_is_passed_through_in_pieces() {
        let mut state = ConnState::default();
        assert_eq!(state.passed_through(10), None);
        state.passthrough_started(10, Recipient::Client);
        assert!(state.mid_message() && state.mid_message_to_client() && !state.is_idle());
        assert_eq!(state.passed_through(4), Some((4, Recipient::Client)));
        assert_eq!(state.passed_through(0), Some((0, Recipient::Client)));
        assert!(state.mid_message_to_client());
        // More arrived than the message has left: the rest is the next message.
        assert_eq!(state.passed_through(100), Some((6, Recipient::Client)));
        assert!(!state.mid_message() && !state.mid_message_to_client());
        assert_eq!(state.passed_through(100), None);
        assert!(state.is_reusable());
    }

    #[test]
    fn a_large_reply_of_pgrelays_own_is_mid_message_but_not_to_the_client() {
        let mut state = ConnState::default();
        state.passthrough_started(10, Recipient::Pgrelay);
        assert!(state.mid_message() && !state.mid_message_to_client());
        assert_eq!(state.passed_through(10), Some((10, Recipient::Pgrelay)));
        assert!(!state.mid_message());
    }

    #[test]
    fn an_empty_passthrough_is_none() {
        let mut state = ConnState::default();
        state.passthrough_started(0, Recipient::Client);
        assert!(!state.mid_message());
    }

    #[test]
    fn phases_overlap_and_outlast_a_failure() {
        let mut state = ConnState::default();
        state.extended_sent();
        state.passthrough_started(100, Recipient::Client);
        state.passed_through(40);
        state.server_lost();
        // What the session reads to tell the client what it missed.
        assert!(state.mid_message_to_client() && state.is_unsynced());
        assert!(!state.is_idle());
    }

    #[test]
    fn client_state_keeps_an_idle_connection_out_of_the_pool() {
        let mut state = ConnState::default();
        state.client_state_added();
        assert!(state.is_idle() && !state.is_reusable());
        state.client_state_cleared();
        assert!(state.is_reusable());
    }
}
