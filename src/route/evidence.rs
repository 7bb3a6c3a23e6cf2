//! Write evidence in the tokens of a SELECT-family statement: a locking clause (FOR UPDATE |
//! NO KEY UPDATE | SHARE | KEY SHARE), `INTO`, and INSERT/UPDATE/DELETE/MERGE words (outside
//! parentheses: the main statement after WITH; inside: a data-modifying CTE). Found on tokens, it
//! holds whether sqlparser can read the statement or not, and never inside literals or comments.

use crate::route::WriteReason;
use crate::route::lex::{Kind, Stmt};

/// Write evidence found in the tokens of a SELECT-family statement.
#[derive(Debug, Default)]
pub(crate) struct Evidence {
    pub locking: bool,
    /// INSERT/UPDATE/DELETE/MERGE outside parentheses (the main statement after WITH).
    pub dml_top: bool,
    /// … inside parentheses (a data-modifying CTE).
    pub dml_nested: bool,
    /// `INTO [TEMP|TEMPORARY|UNLOGGED] [TABLE] name`: (temporary, name).
    pub into: Option<(bool, Option<String>)>,
    /// Byte ranges to blank before sqlparser sees the text (`NO KEY` of `FOR NO KEY UPDATE`,
    /// `KEY` of `FOR KEY SHARE`): same lock strength for routing, a form sqlparser reads.
    pub blank: Vec<(usize, usize)>,
}

impl Evidence {
    pub(crate) fn reason(&self) -> Option<WriteReason> {
        if self.dml_top {
            Some(WriteReason::Dml)
        } else if self.dml_nested {
            Some(WriteReason::DataModifyingCte)
        } else if self.into.is_some() {
            Some(WriteReason::SelectInto)
        } else if self.locking {
            Some(WriteReason::LockingClause)
        } else {
            None
        }
    }
}

pub(crate) fn evidence(stmt: &Stmt<'_>) -> Evidence {
    let mut ev = Evidence::default();
    let mut depth = 0i64;
    let mut skip_until = 0usize;
    for i in 0..stmt.toks.len() {
        if stmt.punct(i, b'(') {
            depth += 1;
        } else if stmt.punct(i, b')') {
            depth -= 1;
        }
        if i < skip_until || stmt.toks[i].kind != Kind::Word {
            continue;
        }
        if stmt.kw(i, "for") {
            let (lock_len, blank_len) = if stmt.kw(i + 1, "update") || stmt.kw(i + 1, "share") {
                (1, 0)
            } else if stmt.kw(i + 1, "no") && stmt.kw(i + 2, "key") && stmt.kw(i + 3, "update") {
                (3, 2)
            } else if stmt.kw(i + 1, "key") && stmt.kw(i + 2, "share") {
                (2, 1)
            } else {
                (0, 0)
            };
            if lock_len > 0 {
                ev.locking = true;
                for t in stmt.toks.get(i + 1..i + 1 + blank_len).unwrap_or(&[]) {
                    ev.blank.push((t.start, t.end));
                }
                skip_until = i + 1 + lock_len;
            }
            continue;
        }
        let qualified =
            (i > 0 && stmt.punct(i - 1, b'.')) || stmt.punct(i + 1, b'.') || (i > 0 && stmt.kw(i - 1, "as"));
        if ["insert", "update", "delete", "merge"].iter().any(|w| stmt.kw(i, w)) && !qualified {
            if depth <= 0 {
                ev.dml_top = true;
            } else {
                ev.dml_nested = true;
            }
            if stmt.kw(i + 1, "into") {
                skip_until = i + 2;
            }
        } else if stmt.kw(i, "into") && !qualified {
            let mut j = i + 1;
            if stmt.kw(j, "local") || stmt.kw(j, "global") {
                j += 1;
            }
            let temp = stmt.kw(j, "temp") || stmt.kw(j, "temporary");
            if temp || stmt.kw(j, "unlogged") {
                j += 1;
            }
            if stmt.kw(j, "table") {
                j += 1;
            }
            ev.into.get_or_insert((temp, stmt.name_at(j).map(|(name, _)| name)));
        }
    }
    ev
}
