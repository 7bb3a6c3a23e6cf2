//! Statements that wrap another: EXPLAIN, DECLARE … CURSOR FOR, PREPARE … AS, COPY (query).
//! The wrapped statement is classified like any other (from its first token, with the nesting
//! depth bounded), then the wrapper adjusts the verdict: EXPLAIN without ANALYZE runs nothing,
//! PREPARE runs nothing yet, a WITH HOLD cursor pins, COPY to a server file is a write.

use crate::route::fast::{Ctx, StmtClass, classify_stmt};
use crate::route::lex::{Stmt, ident_value, string_value};
use crate::route::{PinReason, SessionEffect, Tables, WriteReason, set};

/// `EXPLAIN [(options)] | [ANALYZE] [VERBOSE] statement`.
pub(crate) fn explain(ctx: &Ctx<'_>, stmt: &Stmt<'_>, depth: u8) -> Option<StmtClass> {
    let mut analyze = false;
    let mut i = 1;
    if stmt.punct(1, b'(') {
        let close = stmt.closing_paren(1)?;
        let mut k = 2;
        while k < close {
            let option_start = k;
            while k < close && !stmt.punct(k, b',') {
                k += 1;
            }
            if stmt.kw(option_start, "analyze") || stmt.kw(option_start, "analyse") {
                // Anything but an explicit false value runs the statement.
                let value = stmt.toks.get(option_start + 1).filter(|_| option_start + 1 < k);
                let off = value.is_some_and(|t| {
                    let text = string_value(stmt.src, t).unwrap_or_else(|| stmt.tok_text(option_start + 1).to_owned());
                    set::parse_bool(&text.to_ascii_lowercase()) == Some(false)
                });
                analyze = !off;
            }
            k += 1;
        }
        i = close + 1;
    } else {
        if stmt.kw(i, "analyze") || stmt.kw(i, "analyse") {
            analyze = true;
            i += 1;
        }
        if stmt.kw(i, "verbose") {
            i += 1;
        }
    }
    if i >= stmt.toks.len() {
        return None;
    }
    let mut inner = classify_stmt(ctx, stmt.from(i), depth + 1);
    if analyze {
        if inner.write.is_some() {
            inner.write = Some(WriteReason::ExplainAnalyzeWrite);
        }
        return Some(inner);
    }
    // Nothing executes: a read (of the tables the statement would touch), whatever it explains.
    Some(StmtClass {
        tables: inner.tables,
        ..StmtClass::read()
    })
}

/// `DECLARE name [BINARY] [ASENSITIVE|INSENSITIVE] [[NO] SCROLL] CURSOR [WITH[OUT] HOLD] FOR query`.
pub(crate) fn declare(ctx: &Ctx<'_>, stmt: &Stmt<'_>, depth: u8) -> Option<StmtClass> {
    let t = stmt.toks.get(1).filter(|t| t.is_name())?;
    let name = ident_value(stmt.src, t);
    let mut i = 2;
    while ["binary", "asensitive", "insensitive", "no", "scroll"]
        .iter()
        .any(|w| stmt.kw(i, w))
    {
        i += 1;
    }
    if !stmt.kw(i, "cursor") {
        return None;
    }
    i += 1;
    let hold = stmt.kw(i, "with") && stmt.kw(i + 1, "hold");
    if hold || (stmt.kw(i, "without") && stmt.kw(i + 1, "hold")) {
        i += 2;
    }
    if !stmt.kw(i, "for") {
        return None;
    }
    let mut inner = classify_stmt(ctx, stmt.from(i + 1), depth + 1);
    inner.tx = None;
    if hold {
        inner.session.extend([
            SessionEffect::Pin(PinReason::HoldCursor),
            SessionEffect::DeclareHoldCursor { name },
        ]);
    }
    Some(inner)
}

/// `PREPARE name [(types)] AS statement`: the access of its statement, nothing executed yet.
pub(crate) fn prepare(ctx: &Ctx<'_>, stmt: &Stmt<'_>, depth: u8) -> Option<StmtClass> {
    let t = stmt.toks.get(1).filter(|t| t.is_name())?;
    let name = ident_value(stmt.src, t);
    let mut i = 2;
    if stmt.punct(i, b'(') {
        i = stmt.closing_paren(i)? + 1;
    }
    if !stmt.kw(i, "as") {
        return None;
    }
    let inner = classify_stmt(ctx, stmt.from(i + 1), depth + 1);
    let effects = vec![
        SessionEffect::Pin(PinReason::SqlPrepare),
        SessionEffect::Prepare { name },
    ];
    Some(
        StmtClass {
            write: inner.write,
            tables: inner.tables,
            parsed: inner.parsed,
            ..StmtClass::read()
        }
        .with_effects(effects),
    )
}

/// `COPY [BINARY] table [(cols)] | (query)  FROM | TO  target …`.
pub(crate) fn copy(ctx: &Ctx<'_>, stmt: &Stmt<'_>, depth: u8) -> Option<StmtClass> {
    let mut i = if stmt.kw(1, "binary") { 2 } else { 1 };
    let source = if stmt.punct(i, b'(') {
        let close = stmt.closing_paren(i)?;
        let inner = classify_stmt(ctx, stmt.range(i + 1, close), depth + 1);
        i = close + 1;
        Err(inner)
    } else {
        let (name, mut j) = stmt.name_at(i)?;
        if stmt.punct(j, b'(') {
            j = stmt.closing_paren(j)? + 1;
        }
        i = j;
        Ok(name)
    };
    let to_stdout = stmt.kw(i, "to") && stmt.kw(i + 1, "stdout");
    match (source, stmt.kw(i, "from")) {
        (Ok(table), true) => {
            let tables = Tables::Known(vec![table]);
            Some(StmtClass::write(WriteReason::Copy, tables.clone(), tables))
        }
        (Ok(table), false) if stmt.kw(i, "to") => {
            let tables = Tables::Known(vec![table]);
            Some(if to_stdout {
                StmtClass {
                    tables,
                    ..StmtClass::read()
                }
            } else {
                copy_to_file(tables, Tables::empty())
            })
        }
        (Err(inner), false) if to_stdout => Some(inner),
        (Err(inner), false) if stmt.kw(i, "to") => Some(StmtClass {
            session: inner.session,
            ..copy_to_file(inner.tables, inner.written)
        }),
        _ => None,
    }
}

fn copy_to_file(tables: Tables, written: Tables) -> StmtClass {
    StmtClass::write(WriteReason::Copy, tables, written)
}
