//! Statement classification: what a client's SQL text does, so the router can send it to the
//! primary or a replica, track transactions and session state, and fence per-table reads.
//!
//! Pipeline, cheapest first: a bounded cache keyed by the exact text (`cache`); a byte-level
//! lexer that splits statements and hides literals, quoted identifiers, dollar quotes and
//! comments (`lex`); a first-keyword path for every statement whose meaning is fixed by its
//! keywords (`fast`, `tx`, `set`, `wrap`); for SELECT-family statements and DML
//! (`parsed`), write evidence on tokens (`evidence`, `functions`) and the tables from a
//! token reader (`relations`) or, when it is unsure, from sqlparser and an AST walk (`walk`).
//! Anything not shown to be a read is a write.
//!
//! # Decisions the routing rules leave open
//!
//! - **Functions**: built-in write functions, `write_functions` and, once the database's catalog
//!   is loaded, every function it marks `VOLATILE` but a few read-safe built-ins make a SELECT
//!   a write (see `functions` and `volatility`). `read_only_functions` wins over both,
//!   for routing only: `set_config` and advisory-lock effects are reported whatever the lists say.
//!   `currval`/`lastval` count as writes (their value exists only in the session that called
//!   `nextval`); `pg_sequence_last_value` and other catalog readers are reads. `lo_*` are all
//!   writes, as SPEC says, even `lo_get`. A `schema.f` write entry also matches a bare `f(`.
//! - **Tokens decide access.** A SELECT/WITH/VALUES/TABLE statement can only write through a
//!   data-modifying CTE (an INSERT/UPDATE/DELETE/MERGE word), INTO, a locking clause or a function
//!   call; all four are visible on tokens, outside literals and comments, whether or not any
//!   parser reads the statement. A bare column named `update` makes a false write, never a false
//!   read. (Operators and casts backed by writing user functions, and views over them, are
//!   invisible to any text-level classifier.)
//! - **Tables come from a token reader first, sqlparser second.** sqlparser costs 30 µs on a
//!   three-table ORM join (12 µs of it tokenizing) against the 20 µs budget; the reader of
//!   `relations` does it in ~4 µs and gives up (`None`) on anything unexpected, and the tests
//!   check it against the AST on every statement of the corpus. So `parsed = false` only when the
//!   reader and sqlparser both failed on a statement with no write evidence, and a statement
//!   sqlparser rejects (`FOR NO KEY UPDATE`, `TABLE t`, `BETWEEN SYMMETRIC`…) is still understood.
//! - **DML is decided by keyword** and still read for its tables (sqlparser up to 64 KiB), because
//!   causal consistency fences by written table; failing both, the target comes from the tokens
//!   (`INSERT INTO t`, `UPDATE [ONLY] t`, `DELETE FROM t`, `MERGE INTO t`) and `tables` is
//!   `Unknown`. Triggers, rules and `ON DELETE CASCADE` writing other tables are invisible.
//! - **Table names**: unquoted parts lower-cased, quoted parts kept as written (`"User"` and
//!   `user` are different tables in PostgreSQL), schema kept only if written. CTE names are not
//!   tables. A view is reported as itself, not as its base tables. Sequences written by
//!   `nextval('s')`/`setval` are reported as written tables.
//! - **Written tables** of statements that change no table data are empty: locking clauses,
//!   `LOCK`, `VACUUM`/`ANALYZE`/`CLUSTER`/`REINDEX`/`CHECKPOINT`, `NOTIFY`, advisory locks,
//!   `CREATE TEMP …` (invisible to other sessions). Other DDL, `DO`, `CALL`, `EXECUTE`,
//!   `COMMIT PREPARED`, `lo_*`, dblink and configured write functions: `Unknown`.
//! - **Transaction control is not a write** (`BEGIN`, `COMMIT`, `SAVEPOINT`, `SET TRANSACTION
//!   READ ONLY`…), except `SET TRANSACTION READ WRITE` (SPEC) and `COMMIT PREPARED` /
//!   `ROLLBACK PREPARED`, which commit data on whichever server receives them. `COMMIT AND CHAIN`
//!   does not end the block. `ends_transaction` means "contains an ending COMMIT/ROLLBACK/
//!   PREPARE TRANSACTION"; the session must still trust ReadyForQuery's status byte.
//!   `SET transaction_read_only`/`transaction_isolation` are read as `SET TRANSACTION`.
//!   `BEGIN`/`SET TRANSACTION` also carry the isolation level: a hot standby refuses SERIALIZABLE
//!   even READ ONLY, so [`TxControl::replica_eligible`] is false for it.
//! - **EXPLAIN** without ANALYZE is a read whatever it explains (nothing executes; its tables
//!   are reported as read). `EXPLAIN ANALYZE` is its statement, with reason
//!   `ExplainAnalyzeWrite` when that is a write.
//! - **COPY**: `COPY t FROM` is a write of `t`; `COPY t|(query) TO STDOUT` is a read when the
//!   query is; `COPY … TO 'file'|PROGRAM` is a write (it has effects on the server's host).
//! - **LISTEN/NOTIFY** are writes (a hot standby refuses them); UNLISTEN too, since it must reach
//!   the server that holds the LISTEN.
//! - **Pins** are reported as `Pin(reason)`; named state also gets a named effect so the session
//!   can unpin when the last one goes (`Prepare`, `Deallocate`, `Listen`, `Unlisten`,
//!   `DeclareHoldCursor`, `CloseCursor`). `Unpin` is emitted only when *all* state of that kind
//!   is certainly gone: `UNLISTEN *`, `DEALLOCATE ALL`, `CLOSE ALL`, `DISCARD TEMP`,
//!   `pg_advisory_unlock_all()`, `RESET ROLE`, and `DISCARD ALL` (every reason but `Load`).
//!   `CREATE TEMP TABLE … ON COMMIT DROP` does not pin: the table dies with its transaction.
//!   A `PREPARE`d statement keeps the access of its body, so `PREPARE p AS INSERT …` goes to the
//!   primary; its effects are not reported (nothing runs until `EXECUTE`, which is a write of
//!   unknown tables). Pinning statements keep their own access (a WITH HOLD cursor over a SELECT
//!   is a read): whether a pinned session may sit on a replica is the router's policy.
//! - **DO bodies are read** (they run in the session): a session-level SET, `set_config`,
//!   dynamic `EXECUTE`, a temp table, an advisory lock or LISTEN in a PL/pgSQL body pins with
//!   that reason; a body in another language always pins (`UntrackableSet`). `CALL` and function
//!   bodies cannot be seen: a function doing `set_config(…, false)` changes session state no
//!   text-level classifier can track (the session can still watch ParameterStatus).
//! - **SET values** are the tokens after `TO`/`=` as written (comments dropped), so
//!   `SET name TO value` re-applies them ([`SessionEffect::to_sql`]). `set_config` values are
//!   re-quoted as a literal, or as a quoted identifier list for `search_path`-like parameters;
//!   anything else is `Pin(UntrackableSet)`. `SET x TO DEFAULT` and `SET TIME ZONE LOCAL` are
//!   `Reset`. `SET SESSION CHARACTERISTICS AS TRANSACTION …` becomes `Set` of the
//!   `default_transaction_*` parameters. `SET ROLE`/`SET SESSION AUTHORIZATION` are both a `Set`
//!   and a pin; their `LOCAL` forms only a `Set { local: true }`.
//! - **Hints** count only in the first comment of the text (after whitespace).
//! - **Client encodings**: a text is bytes in the client's encoding ([`encoding`], [`reading`]).
//!   ASCII reads the same in all of them, UTF-8 in a UTF8 session is read as it is. In the other
//!   encodings a server may use (LATIN9, WIN1252, EUC_JP…) an ASCII byte is always ASCII, so
//!   the text is read through a Latin-1 view of its bytes; names with other characters are in
//!   the client's spelling, not the server's: such tables are `Unknown`, such settings pin. In
//!   the client-only encodings (SJIS, BIG5, GBK, UHC, GB18030, JOHAB, SHIFT_JIS_2004) a
//!   character may end in a quote-like ASCII byte (`表` is 0x95 0x5C in SJIS): a text with a
//!   non-ASCII byte is not read at all, a write (`Unparsed`) of unknown tables without hint,
//!   pinning when its ASCII beginning shows a session effect or a later semicolon may start
//!   another statement. UTF-8 that is not valid in a UTF8 session is refused by the server
//!   and is `Unparsed` too.
//! - **Limits**: texts over [`MAX_PARSE_LEN`] (1 MiB) are never read for tables (their
//!   SELECTs are writes, `parsed = false`; DML keeps its keyword verdict and token target);
//!   statements with more than [`MAX_OPERATORS`] operators are never given to sqlparser (its AST
//!   of a long `a + b + …` chain overflows the stack when dropped); nesting (`EXPLAIN EXPLAIN …`)
//!   and tokens kept per statement are bounded; a text keeps at most [`MAX_EFFECTS`] session
//!   effects (then `Pin(UntrackableSet)`) and [`MAX_TABLES`] table names (then `Unknown`). Texts
//!   over [`MAX_CACHED_LEN`] are classified but not cached.
//! - A standard string that would end elsewhere with `standard_conforming_strings = off`
//!   (`'…\'`), or any unterminated literal or comment, makes its statement "not known to be a
//!   read".

mod cache;
pub mod encoding;
mod evidence;
mod fast;
mod functions;
mod hint;
mod lex;
mod parsed;
mod reading;
mod refused;
mod relations;
mod set;
mod tx;
mod volatility;
mod walk;
mod walk_expr;
mod wrap;

#[cfg(test)]
mod encoding_tests;
#[cfg(test)]
mod prop_tests;
#[cfg(test)]
mod table_tests;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

pub use crate::route::encoding::{Charset, ClientEncoding};
use crate::route::fast::{Ctx, StmtClass};
use crate::route::functions::FunctionLists;
pub use crate::route::parsed::MAX_OPERATORS;
use crate::route::reading::Reading;
pub use crate::route::volatility::VolatileSet;

/// Texts longer than this are classified but not cached.
pub const MAX_CACHED_LEN: usize = 8 * 1024;
/// Texts longer than this are never parsed: their SELECTs are writes (unparsed).
pub const MAX_PARSE_LEN: usize = 1024 * 1024;
/// Session effects kept per text; past this the session is pinned (`UntrackableSet`).
pub const MAX_EFFECTS: usize = 4096;
/// Table names kept per text; past this the tables are `Unknown`.
pub const MAX_TABLES: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    Read,
    Write,
}

/// Why a statement must go to the primary.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum WriteReason {
    /// INSERT, UPDATE, DELETE, MERGE (also under a leading WITH).
    Dml,
    /// CREATE, ALTER, DROP, TRUNCATE, GRANT, REVOKE, COMMENT, SECURITY LABEL, …
    Ddl,
    /// FOR UPDATE | NO KEY UPDATE | SHARE | KEY SHARE anywhere in the statement.
    LockingClause,
    /// SELECT … INTO.
    SelectInto,
    /// A call of a function on the write list (its name as written, lower-cased).
    WritingFunction(String),
    /// A call of a function the catalog marks `VOLATILE` (its name as written).
    VolatileFunction(String),
    /// INSERT/UPDATE/DELETE/MERGE inside a WITH clause of a SELECT.
    DataModifyingCte,
    /// COPY … FROM, or COPY … TO a server file or program.
    Copy,
    Call,
    Do,
    Lock,
    /// VACUUM, ANALYZE, CLUSTER, REINDEX, CHECKPOINT, REFRESH MATERIALIZED VIEW.
    Maintenance,
    /// EXPLAIN ANALYZE of a write (it executes).
    ExplainAnalyzeWrite,
    SetTransactionReadWrite,
    Notify,
    /// LISTEN / UNLISTEN (refused by a hot standby).
    Listen,
    /// A replica refused it as a write (`retry_refused_on_primary`): remembered by text.
    ReplicaRefused,
    /// EXECUTE of an SQL-level prepared statement: its body is not known here.
    Execute,
    /// COMMIT PREPARED / ROLLBACK PREPARED.
    TwoPhaseCommit,
    /// Not understood: neither the keyword path nor sqlparser could read it.
    Unparsed,
}

impl WriteReason {
    /// A short fixed label (for metrics and logs).
    pub fn label(&self) -> &'static str {
        match self {
            WriteReason::Dml => "dml",
            WriteReason::Ddl => "ddl",
            WriteReason::LockingClause => "locking_clause",
            WriteReason::SelectInto => "select_into",
            WriteReason::WritingFunction(_) => "writing_function",
            WriteReason::VolatileFunction(_) => "volatile_function",
            WriteReason::ReplicaRefused => "replica_refused",
            WriteReason::DataModifyingCte => "data_modifying_cte",
            WriteReason::Copy => "copy",
            WriteReason::Call => "call",
            WriteReason::Do => "do",
            WriteReason::Lock => "lock",
            WriteReason::Maintenance => "maintenance",
            WriteReason::ExplainAnalyzeWrite => "explain_analyze",
            WriteReason::SetTransactionReadWrite => "set_transaction_read_write",
            WriteReason::Notify => "notify",
            WriteReason::Listen => "listen",
            WriteReason::Execute => "execute",
            WriteReason::TwoPhaseCommit => "two_phase_commit",
            WriteReason::Unparsed => "unparsed",
        }
    }
}

/// A transaction isolation level.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isolation {
    ReadUncommitted,
    ReadCommitted,
    RepeatableRead,
    /// A hot standby refuses it, READ ONLY or not ("cannot use serializable mode in a hot
    /// standby"): a serializable transaction must go to the primary.
    Serializable,
}

impl Isolation {
    /// As `default_transaction_isolation` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Isolation::ReadUncommitted => "read uncommitted",
            Isolation::ReadCommitted => "read committed",
            Isolation::RepeatableRead => "repeatable read",
            Isolation::Serializable => "serializable",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Self> {
        let s = s.trim().trim_matches('\'').trim().to_ascii_lowercase();
        [
            Isolation::ReadUncommitted,
            Isolation::ReadCommitted,
            Isolation::RepeatableRead,
            Isolation::Serializable,
        ]
        .into_iter()
        .find(|i| i.as_str() == s)
    }
}

/// A transaction-control statement.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum TxControl {
    /// BEGIN / START TRANSACTION; `read_only` from READ ONLY / READ WRITE and `isolation` from
    /// ISOLATION LEVEL, when given.
    Begin {
        read_only: Option<bool>,
        isolation: Option<Isolation>,
    },
    /// SET TRANSACTION … (also `SET transaction_read_only` / `transaction_isolation`).
    SetTransaction {
        read_only: Option<bool>,
        isolation: Option<Isolation>,
    },
    /// COMMIT / END; `chain` for AND CHAIN (a new transaction starts at once).
    Commit {
        chain: bool,
    },
    /// ROLLBACK / ABORT.
    Rollback {
        chain: bool,
    },
    Savepoint {
        name: String,
    },
    Release {
        name: String,
    },
    RollbackToSavepoint {
        name: String,
    },
    PrepareTransaction {
        gid: String,
    },
    CommitPrepared {
        gid: String,
    },
    RollbackPrepared {
        gid: String,
    },
}

impl TxControl {
    /// A BEGIN / SET TRANSACTION that asks for READ ONLY at an isolation a hot standby accepts:
    /// the only transaction starts a replica may take (SPEC "Routing rules"). The session must
    /// still check its tracked `default_transaction_isolation` when `isolation` is not given.
    pub fn replica_eligible(&self) -> bool {
        match self {
            TxControl::Begin { read_only, isolation } | TxControl::SetTransaction { read_only, isolation } => {
                *read_only == Some(true) && *isolation != Some(Isolation::Serializable)
            }
            _ => false,
        }
    }
}

/// Server-side state a client can hold that pgrelay cannot move to another server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PinReason {
    TempTable,
    AdvisoryLock,
    Listen,
    HoldCursor,
    SqlPrepare,
    Load,
    SetRole,
    SessionAuthorization,
    /// `set_config(…, false)` (or a SET) whose arguments are not literals.
    UntrackableSet,
}

impl PinReason {
    /// The `reason` label of `pgrelay_pinned_sessions`.
    pub fn label(self) -> &'static str {
        match self {
            PinReason::TempTable => "temp_table",
            PinReason::AdvisoryLock => "advisory_lock",
            PinReason::Listen => "listen",
            PinReason::HoldCursor => "hold_cursor",
            PinReason::SqlPrepare => "sql_prepare",
            PinReason::Load => "load",
            PinReason::SetRole => "set_role",
            PinReason::SessionAuthorization => "session_authorization",
            PinReason::UntrackableSet => "untrackable_set",
        }
    }

    /// Every reason `DISCARD ALL` clears (all but `Load`).
    pub const DISCARDED_BY_DISCARD_ALL: [PinReason; 8] = [
        PinReason::TempTable,
        PinReason::AdvisoryLock,
        PinReason::Listen,
        PinReason::HoldCursor,
        PinReason::SqlPrepare,
        PinReason::SetRole,
        PinReason::SessionAuthorization,
        PinReason::UntrackableSet,
    ];
}

/// A change of session state.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum SessionEffect {
    /// `SET [LOCAL] name TO value`; `value` is SQL text valid after `TO`, `name` lower-cased
    /// (see [`SessionEffect::to_sql`]).
    Set {
        name: String,
        value: String,
        local: bool,
    },
    Reset {
        name: String,
    },
    ResetAll,
    /// DISCARD ALL: also implies ResetAll, Deallocate ALL, closing cursors, UNLISTEN *, unlocking
    /// advisory locks and dropping temp tables (the Unpins are emitted alongside).
    DiscardAll,
    DiscardPlans,
    DiscardTemp,
    DiscardSequences,
    /// DEALLOCATE name | ALL (`None`). Drivers free protocol-level statements this way too.
    Deallocate {
        name: Option<String>,
    },
    /// SQL-level PREPARE name (alongside `Pin(SqlPrepare)`).
    Prepare {
        name: String,
    },
    /// LISTEN channel (alongside `Pin(Listen)`).
    Listen {
        channel: String,
    },
    /// UNLISTEN channel | * (`None`, alongside `Unpin(Listen)`).
    Unlisten {
        channel: Option<String>,
    },
    /// DECLARE name … WITH HOLD (alongside `Pin(HoldCursor)`).
    DeclareHoldCursor {
        name: String,
    },
    /// CLOSE name | ALL (`None`, alongside `Unpin(HoldCursor)`).
    CloseCursor {
        name: Option<String>,
    },
    Pin(PinReason),
    Unpin(PinReason),
}

impl SessionEffect {
    /// The statement that re-applies a `Set` or `Reset` on another server (`None` for the rest).
    /// Names are quoted part by part, so any name is safe to splice.
    pub fn to_sql(&self) -> Option<String> {
        let quoted = |name: &str| {
            name.split('.')
                .map(|p| format!("\"{}\"", p.replace('"', "\"\"")))
                .collect::<Vec<_>>()
        };
        match self {
            SessionEffect::Set { name, value, local } => Some(format!(
                "SET {}{} TO {value}",
                if *local { "LOCAL " } else { "" },
                quoted(name).join(".")
            )),
            SessionEffect::Reset { name } => Some(format!("RESET {}", quoted(name).join("."))),
            SessionEffect::ResetAll => Some("RESET ALL".to_owned()),
            _ => None,
        }
    }
}

/// Tables a statement touches.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Tables {
    /// Sorted, deduplicated names (see the module doc for the normalisation).
    Known(Vec<String>),
    /// Could be any table: fences everything.
    Unknown,
}

impl Default for Tables {
    fn default() -> Self {
        Tables::empty()
    }
}

impl Tables {
    pub fn empty() -> Self {
        Tables::Known(Vec::new())
    }

    pub fn is_unknown(&self) -> bool {
        matches!(self, Tables::Unknown)
    }

    /// The names, if known.
    pub fn names(&self) -> Option<&[String]> {
        match self {
            Tables::Known(names) => Some(names),
            Tables::Unknown => None,
        }
    }

    /// Union, sorted and deduplicated (for the few names of one statement).
    pub(crate) fn union(&mut self, other: Tables) {
        self.absorb(other);
        self.normalize();
    }

    /// Union without sorting (for many statements; [`Tables::normalize`] once at the end).
    fn absorb(&mut self, other: Tables) {
        match (&mut *self, other) {
            (Tables::Known(mine), Tables::Known(theirs)) => {
                mine.extend(theirs);
                if mine.len() > MAX_TABLES {
                    mine.sort_unstable();
                    mine.dedup();
                    if mine.len() > MAX_TABLES {
                        *self = Tables::Unknown;
                    }
                }
            }
            (Tables::Unknown, _) => {}
            (_, Tables::Unknown) => *self = Tables::Unknown,
        }
    }

    fn normalize(&mut self) {
        if let Tables::Known(names) = self {
            names.sort_unstable();
            names.dedup();
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Hint {
    Primary,
    Replica,
}

/// What a text (one statement or several) does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Classification {
    pub access: Access,
    /// Why it is a write: the reason of its first writing statement.
    pub write_reason: Option<WriteReason>,
    /// The first transaction-control effect.
    pub transaction: Option<TxControl>,
    /// Contains a COMMIT/ROLLBACK/END/ABORT (not AND CHAIN) or PREPARE TRANSACTION.
    pub ends_transaction: bool,
    /// Session effects in text order.
    pub session: Vec<SessionEffect>,
    /// Every table read or written.
    pub tables: Tables,
    /// The tables written (`Known(empty)` for a read).
    pub written_tables: Tables,
    pub hint: Option<Hint>,
    /// False when some statement was a write only because nothing could read it.
    pub parsed: bool,
    /// Number of non-empty statements.
    pub statements: usize,
}

impl Classification {
    pub fn is_read(&self) -> bool {
        self.access == Access::Read
    }

    /// Whether any effect pins the client to its server.
    pub fn pins(&self) -> bool {
        self.session.iter().any(|e| matches!(e, SessionEffect::Pin(_)))
    }

    fn empty(hint: Option<Hint>) -> Self {
        Classification {
            access: Access::Read,
            write_reason: None,
            transaction: None,
            ends_transaction: false,
            session: Vec::new(),
            tables: Tables::empty(),
            written_tables: Tables::empty(),
            hint,
            parsed: true,
            statements: 0,
        }
    }

    /// Folds one more statement in. Effects and table lists are capped so that a text of
    /// millions of statements costs bounded memory: past the cap the session is pinned
    /// (`UntrackableSet`: its state is no longer known) and the tables become `Unknown`.
    fn push(&mut self, s: StmtClass) {
        self.statements += 1;
        if let Some(reason) = s.write {
            self.access = Access::Write;
            self.write_reason.get_or_insert(reason);
        }
        if self.transaction.is_none() {
            self.transaction = s.tx;
        }
        self.ends_transaction |= s.ends_tx;
        self.parsed &= s.parsed;
        let lost = SessionEffect::Pin(PinReason::UntrackableSet);
        for effect in s.session {
            if self.session.len() < MAX_EFFECTS {
                self.session.push(effect);
            } else if self.session.last() != Some(&lost) {
                self.session.push(lost.clone());
            }
        }
        self.tables.absorb(s.tables);
        self.written_tables.absorb(s.written);
    }

    fn finish(mut self) -> Self {
        self.tables.normalize();
        self.written_tables.normalize();
        self
    }
}

/// Per-database classifier settings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClassifierSettings {
    /// Extra function names (`name` or `schema.name`) that make a statement a write.
    pub write_functions: Vec<String>,
    /// Function names that never make a statement a write (wins over every write list).
    pub read_only_functions: Vec<String>,
    /// Cached classifications (by exact text); 0 disables the cache.
    pub cache_capacity: usize,
    /// Calls of functions the catalog marks volatile are writes, once
    /// [`Classifier::set_volatile`] has given the catalog (`function_volatility = "catalog"`).
    pub catalog_volatility: bool,
}

/// Classifies SQL texts for one database. Cheap to share (`Arc`) across sessions.
///
/// Classifications depend on the text, the lists and the catalog's volatile functions.
/// Cache keys carry the generation of the volatile set they were made with, so a new set
/// makes every older entry unreachable at once; a cache hit costs one atomic load more than
/// without the catalog, and only a miss loads the set itself.
pub struct Classifier {
    lists: FunctionLists,
    catalog_volatility: bool,
    cache: cache::ClassCache,
    volatile: arc_swap::ArcSwapOption<VolatileSet>,
    /// Bumped after each new `volatile` (Release; read with Acquire), so that a key of the
    /// new generation is never paired with the old set.
    generation: AtomicU64,
    /// Texts a replica refused as writes, carried into each new generation (see `refused`).
    refused: refused::Refused,
}

impl std::fmt::Debug for Classifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Classifier")
            .field("lists", &self.lists)
            .field("volatile", &self.volatile.load().as_ref().map(|set| set.len()))
            .field("cached", &self.cache.len())
            .finish()
    }
}

impl Classifier {
    pub fn new(settings: ClassifierSettings) -> Self {
        Classifier {
            lists: FunctionLists::new(&settings.write_functions, &settings.read_only_functions),
            catalog_volatility: settings.catalog_volatility,
            cache: cache::ClassCache::new(settings.cache_capacity),
            volatile: arc_swap::ArcSwapOption::empty(),
            generation: AtomicU64::new(0),
            refused: refused::Refused::default(),
        }
    }

    /// The cache key's tag for a reading tag in the current generation.
    fn key_tag(&self, reading: u8) -> u64 {
        (self.generation.load(Ordering::Acquire) << 2) | u64::from(reading)
    }

    /// A replica refused `sql` as a write: from now on it is one, for every client of the
    /// database (until the classification cache lets it go, or `refused` overflows).
    pub fn remember_refused(&self, sql: &[u8], charset: Charset) {
        let Some(reading) = reading_tag(&Reading::of(sql, charset)) else {
            return;
        };
        let class = Arc::new(refused::as_write(&self.classify_text(sql, charset)));
        self.cache.insert(self.key_tag(reading), sql, &class);
        self.refused.add(reading, sql, class);
    }

    /// Whether this classifier wants the catalog's volatile functions.
    pub fn wants_catalog(&self) -> bool {
        self.catalog_volatility
    }

    /// The catalog's volatile functions, freshly read. Returns whether classification
    /// changed: a set equal to the current one keeps the cache; a different one starts a
    /// new generation of it. Ignored (false) unless the settings ask for the catalog.
    pub fn set_volatile(&self, set: VolatileSet) -> bool {
        if !self.catalog_volatility || self.volatile.load().as_deref() == Some(&set) {
            return false;
        }
        self.volatile.store(Some(Arc::new(set)));
        self.generation.fetch_add(1, Ordering::Release);
        // Older entries are unreachable now: make room at once.
        self.cache.clear();
        self.refused
            .replay(|reading, text, class| self.cache.insert(self.key_tag(reading), text, class));
        true
    }

    /// Whether the catalog's volatile functions are in use.
    pub fn catalog_loaded(&self) -> bool {
        self.volatile.load().is_some()
    }

    /// Classifies UTF-8 text (see [`Classifier::classify_text`]).
    pub fn classify(&self, sql: &str) -> Arc<Classification> {
        self.classify_text(sql.as_bytes(), Charset::Utf8)
    }

    /// Classifies `sql` (a Query message or a Parse text), bytes in a client encoding read
    /// as `charset` allows (see [`reading`]), from the cache when it can.
    pub fn classify_text(&self, sql: &[u8], charset: Charset) -> Arc<Classification> {
        // The generation before the set: a set newer than the key is harmless (the entry
        // is unreachable), a key newer than the set cannot happen.
        let expected = expected_reading_tag(sql, charset);
        let tag = self.key_tag(expected);
        // A hit needs no validation: only text read as `expected_reading_tag` says was
        // stored under that tag, and these very bytes read the same way again.
        if let Some(hit) = self.cache.get(tag, sql) {
            return hit;
        }
        let reading = Reading::of(sql, charset);
        let Some(found) = reading_tag(&reading) else {
            return Arc::new(self.read(reading, sql, self.volatile.load().as_deref()));
        };
        debug_assert_eq!(found, expected, "a text is stored under the tag it is looked up by");
        let class = Arc::new(self.read(reading, sql, self.volatile.load().as_deref()));
        self.cache.insert(tag, sql, &class);
        class
    }

    fn read(&self, reading: Reading<'_>, sql: &[u8], volatile: Option<&VolatileSet>) -> Classification {
        match reading {
            Reading::Text(text) => self.classify_with(text, volatile),
            Reading::Latin1View => {
                let mut class = self.classify_with(&reading::latin1_view(sql), volatile);
                reading::keep_portable(&mut class);
                class
            }
            Reading::Unread { readable } => {
                // ASCII up to `readable`: valid UTF-8.
                let ascii = std::str::from_utf8(sql.get(..readable).unwrap_or_default()).unwrap_or_default();
                reading::unread(
                    &self.classify_with(ascii, volatile),
                    sql.get(readable..).unwrap_or_default(),
                )
            }
            // The server runs none of it.
            Reading::Invalid => reading::unread(&Classification::empty(None), b""),
        }
    }

    /// Classifies `sql` without touching the cache.
    pub fn classify_uncached(&self, sql: &str) -> Classification {
        self.classify_with(sql, self.volatile.load().as_deref())
    }

    fn classify_with(&self, sql: &str, volatile: Option<&VolatileSet>) -> Classification {
        let ctx = Ctx {
            lists: &self.lists,
            volatile,
            parse_allowed: sql.len() <= MAX_PARSE_LEN,
        };
        let mut class = Classification::empty(hint::leading_hint(sql));
        lex::for_each_statement(sql, |stmt| class.push(fast::classify_stmt(&ctx, stmt, 0)));
        class.finish()
    }
}

/// The tag `reading_tag` gives `sql` if it is valid, found without validating it (a UTF-8
/// check costs as much as the cache lookup itself): UTF-8 and ASCII text read as text.
fn expected_reading_tag(sql: &[u8], charset: Charset) -> u8 {
    match charset {
        Charset::Utf8 => 0,
        _ if sql.is_ascii() => 0,
        Charset::AsciiCompatible => 1,
        Charset::Opaque => 2,
    }
}

/// The cache's key part for how a text was read; `None` for invalid text, which is cheap to
/// classify and refused by the server whole: not worth a cache entry.
fn reading_tag(reading: &Reading<'_>) -> Option<u8> {
    match reading {
        Reading::Text(_) => Some(0),
        Reading::Latin1View => Some(1),
        Reading::Unread { .. } => Some(2),
        Reading::Invalid => None,
    }
}
