//! The routing decision, as a pure function: from what a batch of statements does, the
//! database's routing settings and whether a replica can serve, to a target and the
//! reason (which is also the metric label).

use crate::config::{RoutingConfig, RoutingTarget, TransactionRouting};
use crate::route::{Classification, Hint, Isolation, Tables, TxControl, WriteReason};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Primary,
    Replica,
}

/// Why a batch went where it went; `as_str` is the label of
/// `pgrelay_routing_decisions_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Write,
    Read,
    Transaction,
    Hint,
    Unparsed,
    /// A write only because it calls a function the catalog marks volatile.
    VolatileFunction,
    /// A replica refused the batch as a write: it runs again on the primary.
    ReplicaRefused,
    Lag,
    Consistency,
    NoReplica,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Write => "write",
            Reason::Read => "read",
            Reason::Transaction => "transaction",
            Reason::Hint => "hint",
            Reason::Unparsed => "unparsed",
            Reason::VolatileFunction => "volatile_function",
            Reason::ReplicaRefused => "replica_refused",
            Reason::Lag => "lag",
            Reason::Consistency => "consistency",
            Reason::NoReplica => "no_replica",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub target: Target,
    pub reason: Reason,
}

impl Decision {
    const fn primary(reason: Reason) -> Self {
        Decision {
            target: Target::Primary,
            reason,
        }
    }
}

/// What the statements a client sent up to its next Sync (or one simple query) do,
/// taken together: they run as one implicit transaction, so on one server.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    /// Every statement is a known read.
    pub all_read: bool,
    /// Some statement could not be read at all.
    pub unparsed: bool,
    /// The first transaction-control effect, if any.
    pub transaction: Option<TxControl>,
    /// The hint of the first statement.
    pub hint: Option<Hint>,
    /// Some statement creates state that ties the client to its server.
    pub pins: bool,
    /// The whole batch was seen (its Sync is there); otherwise it must be treated as
    /// possibly writing.
    pub complete: bool,
    /// Statements that are not transaction control (for `transactions = "first_statement"`).
    pub statements_after_begin: bool,
    /// Statements added so far.
    pub seen: usize,
    /// The tables the statements touch (left empty without `track_tables`).
    pub tables: Tables,
    /// `tables` is filled in: only causal consistency needs it, and copying the names of
    /// every statement's tables costs allocations per batch.
    pub track_tables: bool,
    /// The first write in the batch is one only because it calls a volatile function.
    pub volatile_write: bool,
}

impl Batch {
    /// Starts an empty, complete batch; add statements with [`Batch::add`].
    pub fn new() -> Self {
        Batch {
            all_read: true,
            complete: true,
            track_tables: true,
            ..Batch::default()
        }
    }

    /// [`Batch::new`] without the table names.
    pub fn without_tables() -> Self {
        Batch {
            track_tables: false,
            ..Batch::new()
        }
    }

    pub fn add(&mut self, class: &Classification) {
        if self.seen == 0 {
            self.hint = class.hint;
        }
        self.seen += 1;
        // A statement that is not a bare BEGIN, after (or together with) a BEGIN.
        if class.transaction.is_none() || class.statements > 1 {
            self.statements_after_begin |= self.transaction.is_some() || class.transaction.is_some();
        }
        match (&self.transaction, &class.transaction) {
            (None, _) => self.transaction = class.transaction.clone(),
            // `BEGIN; SET TRANSACTION READ ONLY …` is a read-only transaction too, at the
            // isolation the SET gives, else the BEGIN's.
            (
                Some(TxControl::Begin {
                    read_only: None,
                    isolation: begun,
                }),
                Some(TxControl::SetTransaction { read_only, isolation }),
            ) => {
                self.transaction = Some(TxControl::SetTransaction {
                    read_only: *read_only,
                    isolation: isolation.or(*begun),
                })
            }
            _ => {}
        }
        if self.track_tables {
            self.tables.union(class.tables.clone());
        }
        if self.all_read && !class.is_read() {
            self.volatile_write = matches!(class.write_reason, Some(WriteReason::VolatileFunction(_)));
        }
        self.all_read &= class.is_read();
        self.unparsed |= !class.parsed;
        self.pins |= class.pins();
    }

    /// Something that is not a statement pgrelay can read (a FunctionCall, a Bind of
    /// an unknown statement): the batch may write.
    pub fn add_unknown(&mut self) {
        self.all_read = false;
        self.tables = Tables::Unknown;
    }
}

/// Where a batch goes. `replica_usable` says whether some replica can take reads now.
pub fn decide(batch: &Batch, routing: &RoutingConfig, replica_usable: bool) -> Decision {
    let replica_or = |reason: Reason| {
        if replica_usable {
            Decision {
                target: Target::Replica,
                reason,
            }
        } else {
            Decision::primary(Reason::NoReplica)
        }
    };
    match routing.target {
        RoutingTarget::Primary => return Decision::primary(Reason::Write),
        RoutingTarget::Replica => return replica_or(Reason::Read),
        RoutingTarget::Auto => {}
    }
    if !routing.read_write_split {
        return Decision::primary(if batch.all_read { Reason::Read } else { Reason::Write });
    }
    // State that pins the client must be created on the primary, whatever a hint says:
    // the client may write later and cannot move.
    if batch.pins {
        return Decision::primary(Reason::Write);
    }
    match batch.hint {
        Some(Hint::Primary) => return Decision::primary(Reason::Hint),
        Some(Hint::Replica) => return replica_or(Reason::Hint),
        None => {}
    }
    if let Some(transaction) = &batch.transaction {
        if transaction.replica_eligible() && batch.all_read && batch.complete {
            return replica_or(Reason::Transaction);
        }
        // Only a plain BEGIN follows its first statement: READ WRITE or SERIALIZABLE
        // would be refused by a replica.
        let by_first_statement = routing.transactions == TransactionRouting::FirstStatement
            && matches!(
                transaction,
                TxControl::Begin {
                    read_only: None,
                    isolation: None
                        | Some(Isolation::ReadCommitted | Isolation::ReadUncommitted | Isolation::RepeatableRead),
                }
            )
            && batch.statements_after_begin;
        if !by_first_statement {
            return Decision::primary(Reason::Transaction);
        }
    }
    if batch.unparsed {
        return Decision::primary(Reason::Unparsed);
    }
    if batch.all_read && batch.complete {
        return replica_or(Reason::Read);
    }
    Decision::primary(if batch.volatile_write {
        Reason::VolatileFunction
    } else {
        Reason::Write
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::{Classifier, ClassifierSettings};

    fn batch(statements: &[&str]) -> Batch {
        let classifier = Classifier::new(ClassifierSettings::default());
        let mut batch = Batch::new();
        for sql in statements {
            batch.add(&classifier.classify(sql));
        }
        batch
    }

    fn decide_for(statements: &[&str], routing: &RoutingConfig) -> Decision {
        decide(&batch(statements), routing, true)
    }

    #[test]
    fn reads_go_to_replicas_and_everything_else_to_the_primary() {
        let routing = RoutingConfig::default();
        let replica = |reason| Decision {
            target: Target::Replica,
            reason,
        };
        assert_eq!(decide_for(&["SELECT 1"], &routing), replica(Reason::Read));
        assert_eq!(decide_for(&["SELECT 1", "SELECT 2"], &routing), replica(Reason::Read));
        assert_eq!(
            decide_for(&["SELECT 1", "INSERT INTO t VALUES (1)"], &routing),
            Decision::primary(Reason::Write)
        );
        assert_eq!(
            decide_for(&["SELECT * FROM t FOR UPDATE"], &routing),
            Decision::primary(Reason::Write)
        );
        assert_eq!(decide_for(&["BEGIN READ ONLY"], &routing), replica(Reason::Transaction));
        assert_eq!(decide_for(&["BEGIN"], &routing), Decision::primary(Reason::Transaction));
        assert_eq!(
            decide_for(&["BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY"], &routing),
            Decision::primary(Reason::Transaction)
        );
        assert_eq!(
            decide_for(&["/* pgrelay: primary */ SELECT 1"], &routing),
            Decision::primary(Reason::Hint)
        );
        assert_eq!(
            decide_for(&["/* pgrelay: replica */ SELECT 1"], &routing),
            replica(Reason::Hint)
        );
        assert_eq!(
            decide_for(&["CREATE TEMP TABLE x (a int)"], &routing).target,
            Target::Primary
        );
    }

    #[test]
    fn without_a_usable_replica_reads_go_to_the_primary() {
        let decision = decide(&batch(&["SELECT 1"]), &RoutingConfig::default(), false);
        assert_eq!(decision, Decision::primary(Reason::NoReplica));
    }

    #[test]
    fn an_incomplete_batch_is_not_trusted_with_a_replica() {
        let mut partial = batch(&["SELECT 1"]);
        partial.complete = false;
        assert_eq!(
            decide(&partial, &RoutingConfig::default(), true).target,
            Target::Primary
        );
    }

    #[test]
    fn first_statement_transactions_follow_their_first_statement() {
        let routing = RoutingConfig {
            transactions: TransactionRouting::FirstStatement,
            ..RoutingConfig::default()
        };
        assert_eq!(decide_for(&["BEGIN", "SELECT 1"], &routing).target, Target::Replica);
        assert_eq!(
            decide_for(&["BEGIN", "UPDATE t SET a = 1"], &routing).target,
            Target::Primary
        );
        assert_eq!(decide_for(&["BEGIN"], &routing).target, Target::Primary);
    }

    #[test]
    fn aliases_and_switches() {
        let replica_alias = RoutingConfig {
            target: RoutingTarget::Replica,
            ..RoutingConfig::default()
        };
        assert_eq!(
            decide_for(&["UPDATE t SET a = 1"], &replica_alias).target,
            Target::Replica
        );
        let no_split = RoutingConfig {
            read_write_split: false,
            ..RoutingConfig::default()
        };
        assert_eq!(decide_for(&["SELECT 1"], &no_split).target, Target::Primary);
    }

    #[test]
    fn set_transaction_read_only_after_begin_and_pins_before_hints() {
        let routing = RoutingConfig::default();
        assert_eq!(
            decide_for(&["BEGIN", "SET TRANSACTION READ ONLY", "SELECT 1"], &routing).target,
            Target::Replica
        );
        // The isolation of the BEGIN still counts: a standby refuses SERIALIZABLE.
        for (begin, target) in [
            ("BEGIN ISOLATION LEVEL REPEATABLE READ", Target::Replica),
            ("START TRANSACTION", Target::Replica),
            ("BEGIN ISOLATION LEVEL SERIALIZABLE", Target::Primary),
            ("BEGIN READ WRITE", Target::Primary),
        ] {
            assert_eq!(
                decide_for(&[begin, "SET TRANSACTION READ ONLY"], &routing).target,
                target,
                "{begin}"
            );
        }
        assert_eq!(
            decide_for(
                &["BEGIN", "SET TRANSACTION READ ONLY", "INSERT INTO t VALUES (1)"],
                &routing
            )
            .target,
            Target::Primary
        );
        assert_eq!(
            decide_for(&["/* pgrelay: replica */ CREATE TEMP TABLE x (a int)"], &routing).target,
            Target::Primary
        );
        let first = RoutingConfig {
            transactions: TransactionRouting::FirstStatement,
            ..RoutingConfig::default()
        };
        assert_eq!(
            decide_for(&["BEGIN READ WRITE", "SELECT 1"], &first).target,
            Target::Primary
        );
        assert_eq!(
            decide_for(&["BEGIN ISOLATION LEVEL SERIALIZABLE", "SELECT 1"], &first).target,
            Target::Primary
        );
    }
}
