//! When the session effects of forwarded statements (SET, RESET, set_config, …) take
//! hold: applied when their transaction commits, dropped when it rolls back, and
//! uncertain where the server's replies cannot tell which of them survived.
//!
//! Effects are noted when a statement is sent and settled at the ReadyForQuery that
//! ends the transaction. One settlement covers every statement since the last one, so
//! it is exact only when they all shared one fate: all committed (no error, no
//! ROLLBACK), or all rolled back (one transaction, ended by an error or a ROLLBACK,
//! with no COMMIT). Anything else (a ROLLBACK TO SAVEPOINT, a COMMIT followed by a
//! failing statement in the same query, pipelined transactions of which one failed)
//! is uncertain: the server holds the truth, so the caller keeps the client on it.

use crate::route::SessionEffect;

/// The effects noted since the last settlement and what the replies said about them.
#[derive(Debug, Default)]
pub(super) struct PendingEffects {
    effects: Vec<SessionEffect>,
    /// A statement of the client's failed.
    failed: bool,
    /// A transaction was rolled back, wholly or to a savepoint (both reply ROLLBACK,
    /// as does a COMMIT of a failed transaction).
    rolled_back: bool,
    /// A transaction was committed (COMMIT or PREPARE TRANSACTION).
    committed: bool,
    /// The last reply was the end of a transaction.
    after_end: bool,
    /// More statements ran after a transaction ended, so the statements since the last
    /// settlement did not all belong to one transaction.
    several_transactions: bool,
}

/// What became of the effects at the end of a transaction.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Settled {
    /// They all took hold.
    Applied(Vec<SessionEffect>),
    /// None did.
    Dropped,
    /// Some may have: the server's state is the only record.
    Uncertain(Vec<SessionEffect>),
}

impl PendingEffects {
    pub fn note(&mut self, effects: &[SessionEffect]) {
        self.effects.extend_from_slice(effects);
    }

    /// Whether an effect not settled yet satisfies `test`.
    pub fn any(&self, test: impl Fn(&SessionEffect) -> bool) -> bool {
        self.effects.iter().any(test)
    }

    /// A statement of the client's completed with `tag`.
    pub fn completed(&mut self, tag: &str) {
        self.statement_ended();
        match tag {
            "COMMIT" | "PREPARE TRANSACTION" => {
                self.committed = true;
                self.after_end = true;
            }
            "ROLLBACK" => {
                self.rolled_back = true;
                self.after_end = true;
            }
            _ => {}
        }
    }

    /// A statement of the client's failed.
    pub fn failed(&mut self) {
        self.statement_ended();
        self.failed = true;
    }

    fn statement_ended(&mut self) {
        if self.after_end {
            self.several_transactions = true;
            self.after_end = false;
        }
    }

    /// The server is idle (outside a transaction). `more_owed` tells whether the client
    /// has more batches in flight, whose effects may already be noted: then nothing is
    /// settled yet, unless nothing is pending at all.
    pub fn idle(&mut self, more_owed: impl FnOnce() -> bool) -> Option<Settled> {
        if self.effects.is_empty() {
            *self = PendingEffects {
                effects: std::mem::take(&mut self.effects),
                ..PendingEffects::default()
            };
            return None;
        }
        if more_owed() {
            // An implicit transaction ended here and another follows.
            self.after_end = true;
            return None;
        }
        let effects = std::mem::take(&mut self.effects);
        let settled = if !self.failed && !self.rolled_back {
            Settled::Applied(effects)
        } else if !self.committed && !self.several_transactions {
            Settled::Dropped
        } else {
            Settled::Uncertain(effects)
        };
        *self = PendingEffects {
            effects: Vec::new(),
            ..PendingEffects::default()
        };
        Some(settled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(name: &str) -> SessionEffect {
        SessionEffect::Set {
            name: name.into(),
            value: "'1'".into(),
            local: false,
        }
    }

    /// Feeds replies: a command tag, or "ERROR".
    fn run(replies: &[&str]) -> Option<Settled> {
        let mut pending = PendingEffects::default();
        pending.note(&[set("a")]);
        for reply in replies {
            match *reply {
                "ERROR" => pending.failed(),
                tag => pending.completed(tag),
            }
        }
        pending.idle(|| false)
    }

    #[test]
    fn one_fate_for_all_is_certain() {
        let applied = Some(Settled::Applied(vec![set("a")]));
        assert_eq!(run(&["SET"]), applied);
        assert_eq!(run(&["BEGIN", "SET", "COMMIT"]), applied);
        assert_eq!(run(&["BEGIN", "SET", "COMMIT", "SET"]), applied);
        assert_eq!(run(&["BEGIN", "SET", "SAVEPOINT", "SET", "RELEASE", "COMMIT"]), applied);
        assert_eq!(run(&["SET", "ERROR"]), Some(Settled::Dropped));
        assert_eq!(run(&["BEGIN", "SET", "ROLLBACK"]), Some(Settled::Dropped));
        assert_eq!(run(&["BEGIN", "SET", "ERROR", "ROLLBACK"]), Some(Settled::Dropped));
    }

    #[test]
    fn mixed_fates_are_uncertain() {
        let uncertain = Some(Settled::Uncertain(vec![set("a")]));
        // BEGIN; SET …; COMMIT; SELECT 1/0 as one query: the SET was committed.
        assert_eq!(run(&["BEGIN", "SET", "COMMIT", "ERROR"]), uncertain);
        // A savepoint rolled back after an error, then COMMIT: the SET before it stays.
        assert_eq!(
            run(&["BEGIN", "SET", "SAVEPOINT", "ERROR", "ROLLBACK", "COMMIT"]),
            uncertain
        );
        // Two transactions in one query, the second rolled back.
        assert_eq!(run(&["BEGIN", "SET", "COMMIT", "BEGIN", "ROLLBACK"]), uncertain);
    }

    #[test]
    fn pipelined_batches_settle_together() {
        let mut pending = PendingEffects::default();
        pending.note(&[set("a")]);
        pending.failed();
        // The first batch failed while the second (with the SET) is still in flight.
        assert_eq!(pending.idle(|| true), None);
        pending.completed("SET");
        assert_eq!(pending.idle(|| false), Some(Settled::Uncertain(vec![set("a")])));
        // Settled: the next transaction starts clean.
        pending.note(&[set("b")]);
        pending.completed("SET");
        assert_eq!(pending.idle(|| false), Some(Settled::Applied(vec![set("b")])));
    }

    #[test]
    fn nothing_pending_forgets_what_happened() {
        let mut pending = PendingEffects::default();
        pending.failed();
        assert_eq!(pending.idle(|| unreachable!("not asked when nothing is pending")), None);
        pending.note(&[set("a")]);
        pending.completed("SET");
        assert_eq!(pending.idle(|| false), Some(Settled::Applied(vec![set("a")])));
    }
}
