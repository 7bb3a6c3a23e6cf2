//! SELECT-family statements and DML. Access comes from the tokens: the write evidence of
//! [`evidence`](crate::route::evidence) (locking clause, INTO, DML words) and the call scan
//! of [`functions`](crate::route::functions); a statement with none of them, that PostgreSQL
//! accepts, cannot write. Tables come from the token reader of
//! [`relations`], or — when it is unsure — from sqlparser
//! (PostgreSQL dialect) and the AST walk of [`walk`](crate::route::walk), whose verdict on DML,
//! INTO and locking is added to the evidence. A SELECT neither can read is a write (unparsed).

use sqlparser::ast::Statement;
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use crate::route::evidence::evidence;
use crate::route::fast::{Ctx, StmtClass};
use crate::route::functions::scan_calls;
use crate::route::lex::{Kind, Stmt};
use crate::route::relations;
use crate::route::walk::walk;
use crate::route::{PinReason, SessionEffect, Tables, WriteReason};

/// Statements with more operator tokens than this are not parsed: a chain of N binary operators
/// is an N-deep left-leaning tree, and dropping one of ~50 000 levels overflows a 2 MiB stack.
pub const MAX_OPERATORS: usize = 4096;
/// DML is a write whatever the parser says; it is parsed only to name its tables, up to this size.
const DML_PARSE_LEN: usize = 64 * 1024;

fn operators(stmt: &Stmt<'_>) -> usize {
    const WORDS: &[&str] = &[
        "and", "or", "not", "is", "like", "ilike", "similar", "between", "in", "collate", "at",
    ];
    (0..stmt.toks.len())
        .filter(|&i| match stmt.toks[i].kind {
            Kind::Punct(b) => !matches!(b, b',' | b'(' | b')' | b';' | b'.'),
            Kind::Word => WORDS.iter().any(|w| stmt.kw(i, w)),
            _ => false,
        })
        .count()
}

/// `ONLY` before a table name (`FROM ONLY t`, `UPDATE ONLY t`): sqlparser takes it for a table
/// named "only" aliased `t`. Blanked, the statement reads the same table without inheritance
/// children, which is all routing needs.
fn only_blanks(stmt: &Stmt<'_>) -> Vec<(usize, usize)> {
    const BEFORE: &[&str] = &["from", "join", "update", "into", "using"];
    (1..stmt.toks.len())
        .filter(|&i| stmt.kw(i, "only") && (stmt.punct(i - 1, b',') || BEFORE.iter().any(|w| stmt.kw(i - 1, w))))
        .map(|i| (stmt.toks[i].start, stmt.toks[i].end))
        .collect()
}

/// Parses `stmt` as exactly one statement, with the byte ranges `blank` replaced by spaces.
fn parse(ctx: &Ctx<'_>, stmt: &Stmt<'_>, blank: &[(usize, usize)], limit: usize) -> Option<Statement> {
    let text = stmt.text();
    if !ctx.parse_allowed || stmt.suspect() || text.len() > limit || operators(stmt) > MAX_OPERATORS {
        return None;
    }
    let owned;
    let sql = if blank.is_empty() {
        text
    } else {
        let mut bytes = text.as_bytes().to_vec();
        for &(from, to) in blank {
            // Ranges are ASCII keyword tokens, so blanking keeps the text UTF-8.
            for b in bytes.get_mut(from.checked_sub(stmt.start())?..to.checked_sub(stmt.start())?)? {
                *b = b' ';
            }
        }
        owned = String::from_utf8(bytes).ok()?;
        owned.as_str()
    };
    let mut statements = Parser::parse_sql(&PostgreSqlDialect {}, sql).ok()?;
    (statements.len() == 1).then(|| statements.pop())?
}

/// Tables of a statement, and what the AST (when it was needed) says about writing.
struct Found {
    tables: Tables,
    written: Tables,
    ast_reason: Option<WriteReason>,
}

/// The token reader first; sqlparser only when it is unsure.
fn find_tables(ctx: &Ctx<'_>, stmt: &Stmt<'_>, blank: &[(usize, usize)], limit: usize) -> Option<Found> {
    if !ctx.parse_allowed {
        return None;
    }
    if let Some((mut read, mut written)) = relations::extract(stmt) {
        written.sort_unstable();
        written.dedup();
        read.extend(written.iter().cloned());
        read.sort_unstable();
        read.dedup();
        return Some(Found {
            tables: Tables::Known(read),
            written: Tables::Known(written),
            ast_reason: None,
        });
    }
    let facts = walk(&parse(ctx, stmt, blank, limit)?);
    Some(Found {
        tables: facts.tables(),
        written: facts.written(),
        ast_reason: facts.reason(),
    })
}

/// A DML statement always writes something: an empty target list means it was not understood.
fn dml_written(written: Tables) -> Tables {
    match written {
        Tables::Known(w) if w.is_empty() => Tables::Unknown,
        other => other,
    }
}

/// SELECT / WITH / VALUES / TABLE / `(`: a read only if nothing in it writes.
pub(crate) fn query(ctx: &Ctx<'_>, stmt: &Stmt<'_>) -> StmtClass {
    let ev = evidence(stmt);
    let calls = scan_calls(ctx.lists, ctx.volatile, stmt);
    let mut blank = only_blanks(stmt);
    blank.extend_from_slice(&ev.blank);
    let found = find_tables(ctx, stmt, &blank, usize::MAX);
    let mut reason = ev
        .reason()
        .or_else(|| found.as_ref().and_then(|f| f.ast_reason.clone()))
        .or_else(|| calls.write.clone());
    if reason.is_none()
        && found
            .as_ref()
            .is_some_and(|f| matches!(&f.written, Tables::Known(w) if !w.is_empty()))
    {
        // The reader saw a DML target the evidence missed: trust the more careful answer.
        reason = Some(WriteReason::Dml);
    }
    let parsed = found.is_some();
    let (mut tables, found_written) = found.map_or((Tables::Unknown, Tables::Unknown), |f| (f.tables, f.written));
    let mut written = Tables::empty();
    if matches!(reason, Some(WriteReason::Dml | WriteReason::DataModifyingCte)) {
        written = dml_written(found_written);
    }
    let mut session = calls.effects;
    if let Some((temp, name)) = &ev.into {
        if *temp {
            session.push(SessionEffect::Pin(PinReason::TempTable));
        } else {
            written.union(name.clone().map_or(Tables::Unknown, |n| Tables::Known(vec![n])));
        }
    }
    if let Some(calls_written) = calls.written {
        tables.union(calls_written.clone());
        written.union(calls_written);
    }
    tables.union(written.clone());
    if stmt.suspect() {
        // Literals may end elsewhere for the server: nothing found here is certain.
        let session = if session.is_empty() {
            session
        } else {
            vec![SessionEffect::Pin(PinReason::UntrackableSet)]
        };
        let reason = reason.unwrap_or(WriteReason::Unparsed);
        return StmtClass {
            session,
            parsed: false,
            ..StmtClass::write(reason, Tables::Unknown, Tables::Unknown)
        };
    }
    match reason {
        Some(reason) => StmtClass {
            session,
            ..StmtClass::write(reason, tables, written)
        },
        None if parsed => StmtClass {
            session,
            tables,
            ..StmtClass::read()
        },
        None => StmtClass {
            session,
            ..StmtClass::unparsed()
        },
    }
}

/// INSERT / UPDATE / DELETE / MERGE: a write, whose tables are still wanted.
pub(crate) fn dml(ctx: &Ctx<'_>, stmt: &Stmt<'_>) -> StmtClass {
    let calls = scan_calls(ctx.lists, ctx.volatile, stmt);
    let (mut tables, mut written) = match find_tables(ctx, stmt, &only_blanks(stmt), DML_PARSE_LEN) {
        Some(found) => (found.tables, dml_written(found.written)),
        None => (
            Tables::Unknown,
            target_from_tokens(stmt).map_or(Tables::Unknown, |t| Tables::Known(vec![t])),
        ),
    };
    if let Some(calls_written) = calls.written {
        tables.union(calls_written.clone());
        written.union(calls_written);
    }
    StmtClass {
        session: calls.effects,
        ..StmtClass::write(WriteReason::Dml, tables, written)
    }
}

/// The target of `INSERT INTO t`, `UPDATE [ONLY] t`, `DELETE FROM [ONLY] t`, `MERGE INTO [ONLY] t`.
fn target_from_tokens(stmt: &Stmt<'_>) -> Option<String> {
    let mut i = if stmt.kw(1, "into") || stmt.kw(1, "from") { 2 } else { 1 };
    if stmt.kw(0, "update") && stmt.kw(1, "from") {
        i = 1;
    }
    if stmt.kw(i, "only") {
        i += 1;
    }
    stmt.name_at(i).map(|(name, _)| name)
}

/// Tables by the AST path alone (for tests comparing it with the token reader).
#[cfg(test)]
pub(crate) fn ast_tables(ctx: &Ctx<'_>, stmt: &Stmt<'_>) -> Option<(Tables, Tables)> {
    let mut blank = only_blanks(stmt);
    blank.extend_from_slice(&evidence(stmt).blank);
    let facts = walk(&parse(ctx, stmt, &blank, usize::MAX)?);
    Some((facts.tables(), facts.written()))
}
