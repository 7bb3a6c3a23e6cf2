//! The first-keyword path: every statement whose meaning is fixed by its keywords is decided here
//! (transaction control, the SET family, DDL, maintenance, LOCK, LISTEN/NOTIFY, cursors…);
//! wrappers go to [`wrap`], SELECT-family statements and DML to
//! [`parsed`].

use crate::route::functions::FunctionLists;
use crate::route::lex::{self, Kind, Stmt, string_value};
use crate::route::tx::last_name;
use crate::route::volatility::VolatileSet;
use crate::route::{PinReason, SessionEffect, Tables, TxControl, WriteReason, parsed, set, tx, wrap};

/// How deep EXPLAIN / DECLARE / PREPARE / COPY may wrap each other.
const MAX_NESTING: u8 = 4;

pub(crate) struct Ctx<'a> {
    pub lists: &'a FunctionLists,
    /// The database's volatile functions, once its catalog is loaded.
    pub volatile: Option<&'a VolatileSet>,
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

    pub(crate) fn with_effects(mut self, effects: Vec<SessionEffect>) -> Self {
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
        "select" | "with" | "values" | "table" => return parsed::query(ctx, &stmt),
        "insert" | "update" | "delete" | "merge" => return parsed::dml(ctx, &stmt),
        "begin" | "start" => tx::begin(&stmt),
        "commit" | "end" => tx::commit(&stmt),
        "rollback" | "abort" => tx::rollback(&stmt),
        "savepoint" | "release" => tx::savepoint(&stmt),
        "prepare" if stmt.kw(1, "transaction") && stmt.toks.get(2).is_some_and(|t| t.kind == Kind::Str) => {
            tx::savepoint(&stmt)
        }
        "prepare" => wrap::prepare(ctx, &stmt, depth),
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
        "explain" => wrap::explain(ctx, &stmt, depth),
        "declare" => wrap::declare(ctx, &stmt, depth),
        "copy" => wrap::copy(ctx, &stmt, depth),
        "create" => Some(create(&stmt)),
        "truncate" => Some(truncate(&stmt).unwrap_or_else(ddl)),
        "alter" | "drop" | "grant" | "revoke" | "comment" | "security" | "reassign" | "import" => Some(ddl()),
        "vacuum" | "analyze" | "analyse" | "cluster" | "reindex" | "checkpoint" => Some(maintenance()),
        "refresh" => Some(refresh(&stmt)),
        "lock" => Some(lock(&stmt)),
        "do" => Some(do_block(&stmt)),
        "call" => Some(StmtClass::write(WriteReason::Call, Tables::Unknown, Tables::Unknown)),
        _ => None,
    };
    decided.unwrap_or_else(StmtClass::unparsed)
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

/// `DO [LANGUAGE l] 'body'`: a write of unknown tables. Its body runs in the session, so state it
/// can leave behind is looked for in the body's own tokens: session-level SET (or set_config, or
/// dynamic EXECUTE, which may be anything) cannot be re-applied elsewhere and pins, as do temp
/// tables, advisory locks and LISTEN. A body in another language pins unconditionally.
fn do_block(stmt: &Stmt<'_>) -> StmtClass {
    let class = StmtClass::write(WriteReason::Do, Tables::Unknown, Tables::Unknown);
    let body = stmt
        .toks
        .iter()
        .find(|t| matches!(t.kind, Kind::Str | Kind::Dollar | Kind::EStr));
    let language = (0..stmt.toks.len())
        .find(|&i| stmt.kw(i, "language"))
        .map(|i| stmt.tok_text(i + 1).to_ascii_lowercase());
    let body = match (body.and_then(|t| string_value(stmt.src, t)), language.as_deref()) {
        (Some(body), None | Some("plpgsql")) => body,
        _ => return class.with_effects(vec![SessionEffect::Pin(PinReason::UntrackableSet)]),
    };
    let inner = Stmt {
        src: &body,
        toks: &lex::Lexer::new(&body).collect::<Vec<_>>(),
        truncated: false,
    };
    let mut effects = Vec::new();
    let mut pin = |reason| {
        if !effects.contains(&SessionEffect::Pin(reason)) {
            effects.push(SessionEffect::Pin(reason));
        }
    };
    for i in 0..inner.toks.len() {
        let statement_start =
            i == 0 || inner.punct(i - 1, b';') || ["begin", "then", "else", "loop"].iter().any(|w| inner.kw(i - 1, w));
        let word = |w: &str| inner.toks[i].is_name() && inner.tok_text(i).eq_ignore_ascii_case(w);
        if (statement_start && inner.kw(i, "set") && !inner.kw(i + 1, "local")) || word("set_config") || word("execute")
        {
            pin(PinReason::UntrackableSet);
        } else if word("temp") || word("temporary") {
            pin(PinReason::TempTable);
        } else if inner.tok_text(i).to_ascii_lowercase().starts_with("pg_advisory_lock")
            || inner
                .tok_text(i)
                .to_ascii_lowercase()
                .starts_with("pg_try_advisory_lock")
        {
            pin(PinReason::AdvisoryLock);
        } else if statement_start && inner.kw(i, "listen") {
            pin(PinReason::Listen);
        }
    }
    class.with_effects(effects)
}
