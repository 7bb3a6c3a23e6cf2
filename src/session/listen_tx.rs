//! LISTEN and UNLISTEN that pgrelay answers itself while a server is attached
//! (`listen_notify = "fanout"`): the extended-protocol statements and portals that are
//! LISTENs, and the changes made inside a transaction, which take effect when it commits
//! and are dropped when it rolls back, as PostgreSQL applies its own at commit.
//!
//! The pump feeds this the replies the client gets, in order (see
//! `pump::listen`); the session hands the resulting channels to the hub.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use crate::notify::channel_name;
use crate::route::{Classification, PinReason, SessionEffect};

/// The LISTEN / UNLISTEN effects of one statement text, in order.
pub(crate) type Changes = Arc<[SessionEffect]>;

/// The changes of a text made of nothing but LISTEN and UNLISTEN statements, channel
/// names cut as PostgreSQL cuts them; `None` for anything else (which goes to a server).
pub(crate) fn listen_only(class: &Classification) -> Option<Changes> {
    if class.transaction.is_some() || class.statements == 0 {
        return None;
    }
    let mut changes = Vec::new();
    for effect in &class.session {
        match effect {
            SessionEffect::Listen { channel } => changes.push(SessionEffect::Listen {
                channel: channel_name(channel),
            }),
            SessionEffect::Unlisten { channel } => changes.push(SessionEffect::Unlisten {
                channel: channel.as_deref().map(channel_name),
            }),
            SessionEffect::Pin(PinReason::Listen) | SessionEffect::Unpin(PinReason::Listen) => {}
            _ => return None,
        }
    }
    (changes.len() == class.statements).then(|| changes.into())
}

/// The command tag PostgreSQL gives a change.
pub(crate) fn tag(change: &SessionEffect) -> &'static str {
    match change {
        SessionEffect::Listen { .. } => "LISTEN",
        _ => "UNLISTEN",
    }
}

/// Applies one change to a client's channels.
pub(crate) fn apply(change: &SessionEffect, channels: &mut BTreeSet<String>) {
    match change {
        SessionEffect::Listen { channel } => {
            channels.insert(channel.clone());
        }
        SessionEffect::Unlisten { channel: Some(channel) } => {
            channels.remove(channel);
        }
        SessionEffect::Unlisten { channel: None } => channels.clear(),
        _ => {}
    }
}

impl ListenTx {
    /// Whether any statement, portal or open change is known: a client with one is not
    /// handed over to another process.
    pub fn holds_anything(&self) -> bool {
        self.unnamed.is_some()
            || !self.statements.is_empty()
            || !self.portals.is_empty()
            || !self.open.is_empty()
            || self.savepoint
    }
}

/// See the module documentation.
#[derive(Debug, Default)]
pub(crate) struct ListenTx {
    /// The client's unnamed statement is a LISTEN/UNLISTEN pgrelay answered.
    pub unnamed: Option<Changes>,
    /// Its named statements that are.
    pub statements: HashMap<Box<[u8]>, Changes>,
    /// Portals bound to such statements; they end with their transaction.
    pub portals: HashMap<Box<[u8]>, Changes>,
    /// Changes answered since the transaction in progress began (or the last COMMIT),
    /// waiting for it to end.
    open: Vec<SessionEffect>,
    /// An error or a ROLLBACK (of the transaction or to a savepoint) came after the first
    /// of `open`.
    open_failed: bool,
    /// The transaction in progress set a savepoint: a LISTEN from now on goes to the
    /// server (pinning the client), since a ROLLBACK TO cannot be told from a ROLLBACK by
    /// its reply.
    pub savepoint: bool,
}

impl ListenTx {
    /// Whether the client has statements or portals that are LISTENs pgrelay answers.
    pub fn has_statements(&self) -> bool {
        self.unnamed.is_some() || !self.statements.is_empty() || !self.portals.is_empty()
    }

    /// A change was answered with its CommandComplete, in a transaction or not.
    pub fn answered(&mut self, changes: &[SessionEffect]) {
        self.open.extend_from_slice(changes);
    }

    /// The client got CommandComplete `tag`. Returns the changes that took effect.
    pub fn completed(&mut self, tag: &str) -> Option<Vec<SessionEffect>> {
        match tag {
            "SAVEPOINT" => self.savepoint = true,
            "COMMIT" => {
                self.open_failed = false;
                return Some(std::mem::take(&mut self.open)).filter(|open| !open.is_empty());
            }
            // PostgreSQL refuses to prepare a transaction that LISTENed; pgrelay cannot
            // refuse after the fact, and the changes do not outlive the transaction.
            "PREPARE TRANSACTION" => self.drop_open(),
            // Without a savepoint this is the end of the transaction (also a COMMIT of
            // a failed one, or ROLLBACK AND CHAIN); with one it may be a ROLLBACK TO,
            // which keeps what came before the savepoint: decided at the end.
            "ROLLBACK" if !self.savepoint => self.drop_open(),
            "ROLLBACK" => self.open_failed = !self.open.is_empty(),
            _ => {}
        }
        None
    }

    /// The client got an ErrorResponse.
    pub fn failed(&mut self) {
        self.open_failed |= !self.open.is_empty();
    }

    /// The client got ReadyForQuery with `idle`: outside a transaction the one that held
    /// the open changes ended, committed unless an error or a ROLLBACK came after them
    /// (an implicit transaction, such as an extended-protocol batch, commits at its Sync).
    /// Returns the changes that took effect.
    pub fn ready(&mut self, idle: bool) -> Option<Vec<SessionEffect>> {
        if !idle {
            return None;
        }
        self.portals.clear();
        self.savepoint = false;
        let open = std::mem::take(&mut self.open);
        let failed = std::mem::take(&mut self.open_failed);
        (!failed && !open.is_empty()).then_some(open)
    }

    /// The transaction was lost with its server: nothing of it took effect.
    pub fn lost(&mut self) {
        self.drop_open();
        self.portals.clear();
        self.savepoint = false;
    }

    /// Every prepared statement of the client is gone (DEALLOCATE ALL, DISCARD ALL).
    pub fn forget_statements(&mut self) {
        self.unnamed = None;
        self.statements.clear();
    }

    fn drop_open(&mut self) {
        self.open.clear();
        self.open_failed = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::{Charset, Classifier, ClassifierSettings};

    fn changes(sql: &str) -> Option<Vec<SessionEffect>> {
        let classifier = Classifier::new(ClassifierSettings::default());
        listen_only(&classifier.classify_text(sql.as_bytes(), Charset::Utf8)).map(|changes| changes.to_vec())
    }

    fn listen(channel: &str) -> SessionEffect {
        SessionEffect::Listen {
            channel: channel.into(),
        }
    }

    #[test]
    fn only_texts_of_listen_and_unlisten_are_answered() {
        assert_eq!(changes("LISTEN Orders"), Some(vec![listen("orders")]));
        assert_eq!(
            changes("listen \"Orders\"; UNLISTEN x; unlisten *"),
            Some(vec![
                listen("Orders"),
                SessionEffect::Unlisten {
                    channel: Some("x".into())
                },
                SessionEffect::Unlisten { channel: None },
            ])
        );
        assert_eq!(
            changes(&format!("LISTEN {}", "a".repeat(80))),
            Some(vec![listen(&"a".repeat(63))])
        );
        assert_eq!(changes("LISTEN a; SELECT 1"), None);
        assert_eq!(changes("BEGIN; LISTEN a; COMMIT"), None);
        assert_eq!(changes("NOTIFY a"), None);
        assert_eq!(changes("SELECT 1"), None);
    }

    /// Feeds replies: a command tag, "ERROR", or "Z:I" / "Z:T" / "Z:E"; returns the
    /// changes that took effect.
    fn run(replies: &[&str]) -> Vec<SessionEffect> {
        let mut tx = ListenTx::default();
        let mut applied = Vec::new();
        for reply in replies {
            let took = match *reply {
                "LISTEN" => {
                    tx.answered(&[listen("a")]);
                    None
                }
                "ERROR" => {
                    tx.failed();
                    None
                }
                "Z:I" => tx.ready(true),
                "Z:T" | "Z:E" => tx.ready(false),
                tag => tx.completed(tag),
            };
            applied.extend(took.into_iter().flatten());
        }
        applied
    }

    #[test]
    fn changes_take_effect_at_commit_and_not_at_rollback() {
        let taken = vec![listen("a")];
        assert_eq!(run(&["BEGIN", "Z:T", "LISTEN", "Z:T", "COMMIT", "Z:I"]), taken);
        assert_eq!(run(&["BEGIN", "Z:T", "LISTEN", "Z:T", "ROLLBACK", "Z:I"]), vec![]);
        // A COMMIT of a failed transaction replies ROLLBACK.
        assert_eq!(run(&["BEGIN", "LISTEN", "ERROR", "Z:E", "ROLLBACK", "Z:I"]), vec![]);
        // A COMMIT that fails (a deferred constraint).
        assert_eq!(run(&["BEGIN", "LISTEN", "Z:T", "ERROR", "Z:I"]), vec![]);
        // An implicit transaction: an extended batch, committed or failed at its Sync.
        assert_eq!(run(&["LISTEN", "Z:I"]), taken);
        assert_eq!(run(&["LISTEN", "ERROR", "Z:I"]), vec![]);
        // Pipelined transactions of different fates.
        assert_eq!(
            run(&["BEGIN", "LISTEN", "COMMIT", "BEGIN", "ERROR", "ROLLBACK", "Z:I"]),
            taken
        );
        assert_eq!(run(&["BEGIN", "COMMIT", "BEGIN", "LISTEN", "ROLLBACK", "Z:I"]), vec![]);
    }

    #[test]
    fn a_rollback_to_a_later_savepoint_keeps_the_change() {
        let taken = vec![listen("a")];
        assert_eq!(
            run(&[
                "BEGIN",
                "LISTEN",
                "SAVEPOINT",
                "ERROR",
                "Z:E",
                "ROLLBACK",
                "Z:T",
                "COMMIT",
                "Z:I"
            ]),
            taken
        );
        assert_eq!(
            run(&["BEGIN", "LISTEN", "SAVEPOINT", "ROLLBACK", "Z:T", "ROLLBACK", "Z:I"]),
            vec![]
        );
    }
}
