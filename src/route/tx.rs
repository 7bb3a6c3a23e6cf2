//! Transaction-control statements, read from their keywords: BEGIN / START TRANSACTION with
//! their modes, COMMIT / END / ROLLBACK / ABORT (AND CHAIN, TO SAVEPOINT, PREPARED), SAVEPOINT,
//! RELEASE, PREPARE TRANSACTION, and the mode list shared with SET TRANSACTION and
//! SET SESSION CHARACTERISTICS. A statement with tokens these rules do not expect is left to the
//! caller's "unparsed" verdict: a syntax error starts or ends nothing.

use crate::route::fast::StmtClass;
use crate::route::lex::{Kind, Stmt, ident_value, string_value};
use crate::route::{Isolation, Tables, TxControl, WriteReason};

/// Transaction modes (`ISOLATION LEVEL …`, `READ ONLY|WRITE`, `[NOT] DEFERRABLE`).
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Modes {
    pub read_only: Option<bool>,
    pub isolation: Option<Isolation>,
    pub deferrable: Option<bool>,
}

/// Parses a mode list from token `i` to the end of the statement; `None` if anything else is there.
pub(crate) fn modes(stmt: &Stmt<'_>, mut i: usize) -> Option<Modes> {
    let mut m = Modes::default();
    let n = stmt.toks.len();
    while i < n {
        if stmt.kw(i, "isolation") && stmt.kw(i + 1, "level") {
            let (level, len) = if stmt.kw(i + 2, "serializable") {
                (Isolation::Serializable, 1)
            } else if stmt.kw(i + 2, "repeatable") && stmt.kw(i + 3, "read") {
                (Isolation::RepeatableRead, 2)
            } else if stmt.kw(i + 2, "read") && stmt.kw(i + 3, "committed") {
                (Isolation::ReadCommitted, 2)
            } else if stmt.kw(i + 2, "read") && stmt.kw(i + 3, "uncommitted") {
                (Isolation::ReadUncommitted, 2)
            } else {
                return None;
            };
            m.isolation = Some(level);
            i += 2 + len;
        } else if stmt.kw(i, "read") && stmt.kw(i + 1, "only") {
            m.read_only = Some(true);
            i += 2;
        } else if stmt.kw(i, "read") && stmt.kw(i + 1, "write") {
            m.read_only = Some(false);
            i += 2;
        } else if stmt.kw(i, "deferrable") {
            m.deferrable = Some(true);
            i += 1;
        } else if stmt.kw(i, "not") && stmt.kw(i + 1, "deferrable") {
            m.deferrable = Some(false);
            i += 2;
        } else {
            return None;
        }
        if stmt.punct(i, b',') && i + 1 < n {
            i += 1;
        }
    }
    Some(m)
}

fn control(tx: TxControl) -> StmtClass {
    let ends_tx = matches!(
        tx,
        TxControl::Commit { chain: false }
            | TxControl::Rollback { chain: false }
            | TxControl::PrepareTransaction { .. }
    );
    let mut class = StmtClass::read();
    if matches!(
        tx,
        TxControl::CommitPrepared { .. } | TxControl::RollbackPrepared { .. }
    ) {
        class = StmtClass::write(WriteReason::TwoPhaseCommit, Tables::Unknown, Tables::Unknown);
    }
    class.tx = Some(tx);
    class.ends_tx = ends_tx;
    class
}

/// Skips an optional `WORK` or `TRANSACTION` at `i`.
fn noise(stmt: &Stmt<'_>, i: usize) -> usize {
    if stmt.kw(i, "work") || stmt.kw(i, "transaction") {
        i + 1
    } else {
        i
    }
}

/// `BEGIN …` or `START TRANSACTION …`.
pub(crate) fn begin(stmt: &Stmt<'_>) -> Option<StmtClass> {
    let i = if stmt.kw(0, "start") {
        stmt.kw(1, "transaction").then_some(2)?
    } else {
        noise(stmt, 1)
    };
    let m = modes(stmt, i)?;
    Some(control(TxControl::Begin {
        read_only: m.read_only,
        isolation: m.isolation,
    }))
}

/// `[AND [NO] CHAIN]` at `i` up to the end: `Some(chain)`.
fn chain(stmt: &Stmt<'_>, i: usize) -> Option<bool> {
    let n = stmt.toks.len();
    if i == n {
        Some(false)
    } else if stmt.kw(i, "and") && stmt.kw(i + 1, "chain") && n == i + 2 {
        Some(true)
    } else if stmt.kw(i, "and") && stmt.kw(i + 1, "no") && stmt.kw(i + 2, "chain") && n == i + 3 {
        Some(false)
    } else {
        None
    }
}

/// A single string literal at `i` ending the statement (a 2PC transaction id).
fn gid(stmt: &Stmt<'_>, i: usize) -> Option<String> {
    let t = stmt.toks.get(i)?;
    (stmt.toks.len() == i + 1).then(|| string_value(stmt.src, t))?
}

/// A single name at `i` ending the statement (savepoint, cursor, channel…).
pub(crate) fn last_name(stmt: &Stmt<'_>, i: usize) -> Option<String> {
    let t = stmt
        .toks
        .get(i)
        .filter(|t| matches!(t.kind, Kind::Word | Kind::Quoted))?;
    (stmt.toks.len() == i + 1).then(|| ident_value(stmt.src, t))
}

/// `COMMIT …` or `END …`.
pub(crate) fn commit(stmt: &Stmt<'_>) -> Option<StmtClass> {
    if stmt.kw(0, "commit") && stmt.kw(1, "prepared") {
        return Some(control(TxControl::CommitPrepared { gid: gid(stmt, 2)? }));
    }
    let chain = chain(stmt, noise(stmt, 1))?;
    Some(control(TxControl::Commit { chain }))
}

/// `ROLLBACK …` or `ABORT …`.
pub(crate) fn rollback(stmt: &Stmt<'_>) -> Option<StmtClass> {
    if stmt.kw(0, "rollback") && stmt.kw(1, "prepared") {
        return Some(control(TxControl::RollbackPrepared { gid: gid(stmt, 2)? }));
    }
    let i = noise(stmt, 1);
    if stmt.kw(0, "rollback") && stmt.kw(i, "to") {
        let j = if stmt.kw(i + 1, "savepoint") { i + 2 } else { i + 1 };
        return Some(control(TxControl::RollbackToSavepoint {
            name: last_name(stmt, j)?,
        }));
    }
    let chain = chain(stmt, i)?;
    Some(control(TxControl::Rollback { chain }))
}

/// `SAVEPOINT name`, `RELEASE [SAVEPOINT] name`, `PREPARE TRANSACTION 'gid'`.
pub(crate) fn savepoint(stmt: &Stmt<'_>) -> Option<StmtClass> {
    if stmt.kw(0, "savepoint") {
        Some(control(TxControl::Savepoint {
            name: last_name(stmt, 1)?,
        }))
    } else if stmt.kw(0, "release") {
        let i = if stmt.kw(1, "savepoint") { 2 } else { 1 };
        Some(control(TxControl::Release {
            name: last_name(stmt, i)?,
        }))
    } else {
        Some(control(TxControl::PrepareTransaction { gid: gid(stmt, 2)? }))
    }
}
