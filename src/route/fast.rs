//! The first-keyword path: every statement whose meaning is fixed by its keywords is decided here
//! without sqlparser (transaction control, SET family, DDL, maintenance, COPY, LOCK, LISTEN…),
//! wrappers (EXPLAIN, DECLARE, PREPARE, COPY (query)) are unwrapped and their statement
//! classified, and SELECT-family statements and DML go on to [`parsed`](crate::route::parsed).
//! Also the token scan that finds write evidence in a SELECT (locking clauses, INTO, DML words)
//! whether sqlparser can read the statement or not.

use crate::route::functions::FunctionLists;
use crate::route::lex::{Kind, Stmt, ident_value, string_value};
use crate::route::tx::last_name;
use crate::route::{PinReason, SessionEffect, Tables, TxControl, WriteReason, parsed, set, tx};

/// How deep EXPLAIN / DECLARE / PREPARE / COPY may wrap each other.
const MAX_NESTING: u8 = 4;

pub(crate) struct Ctx<'a> {
    pub lists: &'a FunctionLists,
    /// False for texts over `MAX_PARSE_LEN`: sqlparser is never called on them.
    pub parse_allowed: bool,
}

/// The classification of one statement.
#[derive(Debug)]
pub(crate) struct StmtClass {
    /// `None` = read.
    pub write: Option<WriteReason>,
    pub tx: Option<TxControl>,
    pub ends_tx: bool,
    pub session: Vec<SessionEffect>,
    pub tables: Tables,
    pub written: Tables,
    pub parsed: bool,
}

impl StmtClass {
    /// A read of no table.
    pub(crate) fn read() -> Self {
        StmtClass {
            write: None,
            tx: None,
            ends_tx: false,
            session: Vec::new(),
            tables: Tables::empty(),
            written: Tables::empty(),
            parsed: true,
        }
    }

    pub(crate) fn write(reason: WriteReason, tables: Tables, written: Tables) -> Self {
        StmtClass {
            write: Some(reason),
            tables,
            written,
            ..StmtClass::read()
        }
    }

    /// Not understood: a write of any table.
    pub(crate) fn unparsed() -> Self {
        StmtClass {
            parsed: false,
            ..StmtClass::write(WriteReason::Unparsed, Tables::Unknown, Tables::Unknown)
        }
    }

    fn with_effects(mut self, effects: Vec<SessionEffect>) -> Self {
        self.session.extend(effects);
        self
    }
}

/// Classifies one statement (`depth` counts the wrappers around it).
pub(crate) fn classify_stmt(ctx: &Ctx<'_>, stmt: Stmt<'_>, depth: u8) -> StmtClass {
    let Some(first) = stmt.toks.first() else {
        return StmtClass::unparsed();
    };
    if depth > MAX_NESTING {
        return StmtClass::unparsed();
    }
    if first.is_punct(b'(') {
        return parsed::query(ctx, &stmt);
    }
    let word = stmt.tok_text(0);
    if first.kind != Kind::Word || word.len() > 16 {
        return StmtClass::unparsed();
    }
    let mut buf = [0u8; 16];
    buf[..word.len()].copy_from_slice(word.as_bytes());
    buf[..word.len()].make_ascii_lowercase();
    let kw = std::str::from_utf8(&buf[..word.len()]).unwrap_or("");
    let ddl = || StmtClass::write(WriteReason::Ddl, Tables::Unknown, Tables::Unknown);
    let maintenance = || StmtClass::write(WriteReason::Maintenance, Tables::empty(), Tables::empty());
    let decided = match kw {
        "select" | "with" | "values" => return parsed::query(ctx, &stmt),
        "insert" | "update" | "delete" | "merge" => return parsed::dml(ctx, &stmt),
        "table" => table_shorthand(&stmt).or_else(|| Some(parsed::query(ctx, &stmt))),
        "begin" | "start" => tx::begin(&stmt),
        "commit" | "end" => tx::commit(&stmt),
        "rollback" | "abort" => tx::rollback(&stmt),
        "savepoint" | "release" => tx::savepoint(&stmt),
        "prepare" if stmt.kw(1, "transaction") && stmt.toks.get(2).is_some_and(|t| t.kind == Kind::Str) => {
            tx::savepoint(&stmt)
        }
        "prepare" => prepare(ctx, &stmt, depth),
        "set" => set::set(&stmt),
        "reset" => set::reset(&stmt),
        "discard" => set::discard(&stmt),
        "deallocate" => set::deallocate(&stmt),
        "show" | "fetch" | "move" => Some(StmtClass::read()),
        "close" => close(&stmt),
        "listen" => last_name(&stmt, 1).map(|channel| {
            StmtClass::write(WriteReason::Listen, Tables::empty(), Tables::empty()).with_effects(vec![
                SessionEffect::Pin(PinReason::Listen),
                SessionEffect::Listen { channel },
            ])
        }),
        "unlisten" => unlisten(&stmt),
        "notify" => Some(StmtClass::write(WriteReason::Notify, Tables::empty(), Tables::empty())),
        "load" => Some(StmtClass::read().with_effects(vec![SessionEffect::Pin(PinReason::Load)])),
        "execute" => Some(StmtClass::write(WriteReason::Execute, Tables::Unknown, Tables::Unknown)),
        "explain" => explain(ctx, &stmt, depth),
        "declare" => declare(ctx, &stmt, depth),
        "copy" => copy(ctx, &stmt, depth),
        "create" => Some(create(&stmt)),
        "truncate" => Some(truncate(&stmt).unwrap_or_else(ddl)),
        "alter" | "drop" | "grant" | "revoke" | "comment" | "security" | "reassign" | "import" => Some(ddl()),
        "vacuum" | "analyze" | "analyse" | "cluster" | "reindex" | "checkpoint" => Some(maintenance()),
        "refresh" => Some(refresh(&stmt)),
        "lock" => Some(lock(&stmt)),
        "do" => Some(StmtClass::write(WriteReason::Do, Tables::Unknown, Tables::Unknown)),
        "call" => Some(StmtClass::write(WriteReason::Call, Tables::Unknown, Tables::Unknown)),
        _ => None,
    };
    decided.unwrap_or_else(StmtClass::unparsed)
}

/// `TABLE [ONLY] name [*]`, which sqlparser does not read.
fn table_shorthand(stmt: &Stmt<'_>) -> Option<StmtClass> {
    let i = if stmt.kw(1, "only") { 2 } else { 1 };
    let (name, mut j) = stmt.name_at(i)?;
    if stmt.punct(j, b'*') {
        j += 1;
    }
    (j == stmt.toks.len() && !stmt.suspect()).then(|| StmtClass {
        tables: Tables::Known(vec![name]),
        ..StmtClass::read()
    })
}

/// A comma-separated list of `[ONLY] name [*]` from `i`; the names and the index after the list.
fn name_list(stmt: &Stmt<'_>, mut i: usize) -> Option<(Vec<String>, usize)> {
    let mut names = Vec::new();
    loop {
        if stmt.kw(i, "only") {
            i += 1;
        }
        let (name, j) = stmt.name_at(i)?;
        names.push(name);
        i = if stmt.punct(j, b'*') { j + 1 } else { j };
        if !stmt.punct(i, b',') {
            return Some((names, i));
        }
        i += 1;
    }
}

fn truncate(stmt: &Stmt<'_>) -> Option<StmtClass> {
    let start = if stmt.kw(1, "table") { 2 } else { 1 };
    let (names, mut i) = name_list(stmt, start)?;
    if (stmt.kw(i, "restart") || stmt.kw(i, "continue")) && stmt.kw(i + 1, "identity") {
        i += 2;
    }
    if stmt.kw(i, "cascade") {
        // Referencing tables are truncated too: which ones is not known here.
        return None;
    }
    if stmt.kw(i, "restrict") {
        i += 1;
    }
    (i == stmt.toks.len())
        .then(|| StmtClass::write(WriteReason::Ddl, Tables::Known(names.clone()), Tables::Known(names)))
}

fn lock(stmt: &Stmt<'_>) -> StmtClass {
    let start = if stmt.kw(1, "table") { 2 } else { 1 };
    let tables = name_list(stmt, start).map_or(Tables::Unknown, |(mut names, _)| {
        names.sort_unstable();
        names.dedup();
        Tables::Known(names)
    });
    StmtClass::write(WriteReason::Lock, tables, Tables::empty())
}

fn refresh(stmt: &Stmt<'_>) -> StmtClass {
    let i = if stmt.kw(3, "concurrently") { 4 } else { 3 };
    let name = (stmt.kw(1, "materialized") && stmt.kw(2, "view"))
        .then(|| stmt.name_at(i))
        .flatten();
    let tables = name.map_or(Tables::Unknown, |(name, _)| Tables::Known(vec![name]));
    StmtClass::write(WriteReason::Maintenance, tables.clone(), tables)
}

/// CREATE: DDL; a temporary table, view or sequence pins the session (not with ON COMMIT DROP,
/// which dies with its transaction) and writes nothing other sessions can see.
fn create(stmt: &Stmt<'_>) -> StmtClass {
    let mut i = 1;
    if stmt.kw(i, "or") && stmt.kw(i + 1, "replace") {
        i += 2;
    }
    if stmt.kw(i, "global") || stmt.kw(i, "local") {
        i += 1;
    }
    let temp_keyword = stmt.kw(i, "temp") || stmt.kw(i, "temporary");
    if temp_keyword {
        i += 1;
    }
    if stmt.kw(i, "unlogged") {
        i += 1;
    }
    if stmt.kw(i, "recursive") {
        i += 1;
    }
    let relation = stmt.kw(i, "table") || stmt.kw(i, "view") || stmt.kw(i, "sequence");
    let mut j = i + 1;
    if stmt.kw(j, "if") && stmt.kw(j + 1, "not") && stmt.kw(j + 2, "exists") {
        j += 3;
    }
    let in_pg_temp = stmt
        .name_at(j)
        .is_some_and(|(name, _)| name.starts_with("pg_temp.") || name.starts_with("pg_temp_"));
    let mut depth = 0i32;
    let mut on_commit = None;
    for k in 0..stmt.toks.len() {
        if stmt.punct(k, b'(') {
            depth += 1;
        } else if stmt.punct(k, b')') {
            depth -= 1;
        } else if depth == 0 && stmt.kw(k, "on") && stmt.kw(k + 1, "commit") {
            on_commit = Some(stmt.kw(k + 2, "drop"));
        }
    }
    let temp = relation && (temp_keyword || in_pg_temp || on_commit.is_some());
    if !temp {
        return StmtClass::write(WriteReason::Ddl, Tables::Unknown, Tables::Unknown);
    }
    let class = StmtClass::write(WriteReason::Ddl, Tables::Unknown, Tables::empty());
    if on_commit == Some(true) {
        class
    } else {
        class.with_effects(vec![SessionEffect::Pin(PinReason::TempTable)])
    }
}

fn close(stmt: &Stmt<'_>) -> Option<StmtClass> {
    let effects = if stmt.kw(1, "all") && stmt.toks.len() == 2 {
        vec![
            SessionEffect::CloseCursor { name: None },
            SessionEffect::Unpin(PinReason::HoldCursor),
        ]
    } else {
        vec![SessionEffect::CloseCursor {
            name: Some(last_name(stmt, 1)?),
        }]
    };
    Some(StmtClass::read().with_effects(effects))
}

fn unlisten(stmt: &Stmt<'_>) -> Option<StmtClass> {
    let effects = if stmt.punct(1, b'*') && stmt.toks.len() == 2 {
        vec![
            SessionEffect::Unlisten { channel: None },
            SessionEffect::Unpin(PinReason::Listen),
        ]
    } else {
        vec![SessionEffect::Unlisten {
            channel: Some(last_name(stmt, 1)?),
        }]
    };
    Some(StmtClass::write(WriteReason::Listen, Tables::empty(), Tables::empty()).with_effects(effects))
}

/// `EXPLAIN [(options)] | [ANALYZE] [VERBOSE] statement`.
fn explain(ctx: &Ctx<'_>, stmt: &Stmt<'_>, depth: u8) -> Option<StmtClass> {
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
fn declare(ctx: &Ctx<'_>, stmt: &Stmt<'_>, depth: u8) -> Option<StmtClass> {
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
fn prepare(ctx: &Ctx<'_>, stmt: &Stmt<'_>, depth: u8) -> Option<StmtClass> {
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
fn copy(ctx: &Ctx<'_>, stmt: &Stmt<'_>, depth: u8) -> Option<StmtClass> {
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
                if blank_len > 0 {
                    ev.blank.push((stmt.toks[i + 1].start, stmt.toks[i + blank_len].end));
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
