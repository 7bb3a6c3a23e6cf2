//! Tables of a SELECT-family or DML statement read straight from its tokens. A relation can only
//! stand where the grammar expects a table — after FROM, JOIN, a comma of a FROM list,
//! `DELETE … USING`, `MERGE … USING`, a DML target, TABLE — so one pass with a stack of
//! parenthesis levels finds them at a fraction of sqlparser's cost (which is 30 µs for a
//! three-table ORM join). Whenever a table position holds something unexpected, or the
//! parentheses do not balance, the reader answers `None` and the caller asks sqlparser.
//!
//! Access never depends on this reader (token evidence decides it); a table it missed could only
//! make a causal read stale, so `table_tests` checks it against the AST walk on the whole corpus.

use crate::route::lex::{Kind, Stmt, ident_value};

const MAX_DEPTH: usize = 256;

/// Words that close a FROM list at their level (ON does not: `a JOIN b ON …, c` goes on).
#[rustfmt::skip]
const FROM_END: &[&str] = &[
    "where", "group", "having", "window", "order", "limit", "offset", "fetch", "for", "union", "intersect", "except",
    "returning", "set", "when", "select", "values",
];

/// Words that cannot name a table: one in table position means the text is not understood.
#[rustfmt::skip]
const RESERVED: &[&str] = &[
    "select", "from", "where", "group", "having", "order", "limit", "offset", "union", "intersect", "except", "join",
    "on", "using", "set", "values", "with", "as", "and", "or", "not", "case", "when", "then", "else", "end", "into",
    "returning", "for", "inner", "left", "right", "full", "cross", "natural", "default", "null", "true", "false",
    "table", "only", "lateral",
];

/// Words a statement cannot end with: such a text is cut short, left to sqlparser to refuse.
#[rustfmt::skip]
const DANGLING: &[&str] = &[
    "select", "from", "where", "and", "or", "not", "join", "on", "using", "by", "group", "order", "having", "limit",
    "offset", "union", "intersect", "except", "all", "distinct", "as", "set", "values", "with", "into", "in", "is",
    "like", "ilike", "between", "case", "when", "then", "else", "returning", "for", "window", "over", "filter",
    "lateral", "only", "recursive", "materialized", "update", "insert", "delete", "merge", "table",
];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Level {
    /// A query: the statement, a subquery, a CTE body. FROM and DML keywords count here.
    Query,
    /// A parenthesis in table position: a nested join, or a subquery once SELECT shows up.
    FromParen,
    /// Call arguments, expressions, column lists: FROM means nothing (EXTRACT, TRIM, SUBSTRING).
    Other,
}

struct Frame {
    level: Level,
    /// In a FROM / USING list: a comma starts a new table reference.
    from_list: bool,
    /// No token of this level seen yet: a DML keyword here starts a statement.
    at_start: bool,
    /// In this level's WITH list: the next DML keyword starts the main statement.
    in_with: bool,
    /// A MERGE whose USING has not come yet.
    merge: bool,
    /// CTE names defined at this level (visible in it and below).
    ctes: Vec<String>,
}

impl Frame {
    fn new(level: Level) -> Self {
        Frame {
            level,
            from_list: level == Level::FromParen,
            at_start: true,
            in_with: false,
            merge: false,
            ctes: Vec::new(),
        }
    }
}

struct Reader<'s, 'a> {
    stmt: &'s Stmt<'a>,
    stack: Vec<Frame>,
    read: Vec<String>,
    written: Vec<String>,
    /// A table position is next: `Some(is_dml_target)`.
    pending: Option<bool>,
}

/// Tables read and written, as `(read, written)`; `None` when not understood.
pub(crate) fn extract(stmt: &Stmt<'_>) -> Option<(Vec<String>, Vec<String>)> {
    if stmt.suspect() {
        return None;
    }
    let mut r = Reader {
        stmt,
        stack: vec![Frame::new(Level::Query)],
        read: Vec::new(),
        written: Vec::new(),
        pending: None,
    };
    let mut i = 0;
    while i < stmt.toks.len() {
        i = match r.pending.take() {
            Some(target) => r.relation(i, target)?,
            None => r.token(i)?,
        };
    }
    let dangling = stmt
        .toks
        .len()
        .checked_sub(1)
        .is_some_and(|last| DANGLING.iter().any(|w| stmt.kw(last, w)));
    (r.stack.len() == 1 && r.pending.is_none() && !dangling).then_some((r.read, r.written))
}

impl Reader<'_, '_> {
    fn push(&mut self, level: Level) -> Option<()> {
        (self.stack.len() < MAX_DEPTH).then(|| self.stack.push(Frame::new(level)))
    }

    /// A table position at token `i`; returns the next token to read.
    fn relation(&mut self, i: usize, target: bool) -> Option<usize> {
        let stmt = self.stmt;
        if stmt.kw(i, "only") || stmt.kw(i, "lateral") {
            self.pending = Some(target);
            return Some(i + 1);
        }
        if stmt.kw(i, "rows") && stmt.kw(i + 1, "from") {
            // ROWS FROM (f(), g()): functions.
            return Some(i + 2);
        }
        if stmt.punct(i, b'(') {
            self.push(Level::FromParen)?;
            self.pending = Some(target);
            return Some(i + 1);
        }
        let frame = self.stack.last_mut()?;
        if frame.level == Level::FromParen && ["select", "with", "values", "table"].iter().any(|w| stmt.kw(i, w)) {
            // `(SELECT …)` in table position: a subquery after all.
            frame.level = Level::Query;
            frame.from_list = false;
            return self.token(i);
        }
        frame.at_start = false;
        if RESERVED.iter().any(|w| stmt.kw(i, w)) {
            return None;
        }
        let (name, next) = stmt.name_at(i)?;
        if !target && stmt.punct(next, b'(') {
            // A function in table position (a DML target's `(` is its column list).
            return Some(next);
        }
        let is_cte = next == i + 1 && self.stack.iter().any(|f| f.ctes.contains(&name));
        if !is_cte {
            if target { &mut self.written } else { &mut self.read }.push(name);
        }
        Some(next)
    }

    /// Any other token at `i`; returns the next token to read.
    fn token(&mut self, i: usize) -> Option<usize> {
        let stmt = self.stmt;
        let frame = self.stack.last_mut()?;
        let was_start = std::mem::replace(&mut frame.at_start, false);
        match stmt.toks[i].kind {
            Kind::Punct(b'(') => {
                let after = |w: &str| i > 0 && stmt.kw(i - 1, w);
                let cte_body = frame.in_with && (after("as") || after("materialized"));
                let column_list = i > 0 && stmt.toks[i - 1].is_name();
                if frame.in_with && !cte_body && !column_list {
                    // `WITH … (SELECT …)`: the main statement, in parentheses.
                    frame.in_with = false;
                }
                let query = ["select", "with", "values"].iter().any(|w| stmt.kw(i + 1, w));
                self.push(if query || cte_body { Level::Query } else { Level::Other })?;
            }
            Kind::Punct(b')') => {
                self.stack.pop();
                if self.stack.is_empty() {
                    return None;
                }
            }
            Kind::Punct(b',') if frame.from_list => self.pending = Some(false),
            Kind::Word => return self.word(i, was_start),
            _ => {}
        }
        Some(i + 1)
    }

    fn word(&mut self, i: usize, was_start: bool) -> Option<usize> {
        let stmt = self.stmt;
        let frame = self.stack.last_mut()?;
        let prev = |w: &str| i > 0 && stmt.kw(i - 1, w);
        let starts = frame.level != Level::Other && (was_start || frame.in_with);
        if starts && was_start && stmt.kw(i, "with") {
            frame.in_with = true;
            return Some(i + 1);
        }
        if starts {
            let (skip, target) = if (stmt.kw(i, "insert") && stmt.kw(i + 1, "into"))
                || (stmt.kw(i, "delete") && stmt.kw(i + 1, "from"))
            {
                (2, Some(true))
            } else if stmt.kw(i, "merge") && stmt.kw(i + 1, "into") {
                frame.merge = true;
                (2, Some(true))
            } else if stmt.kw(i, "update") {
                (1, Some(true))
            } else if stmt.kw(i, "table") {
                (1, Some(false))
            } else if stmt.kw(i, "select") || stmt.kw(i, "values") {
                (1, None)
            } else {
                (0, None)
            };
            if skip > 0 {
                frame.in_with = false;
                frame.level = Level::Query;
                self.pending = target;
                return Some(i + skip);
            }
        }
        let followed_by_def = stmt.kw(i + 1, "as") || stmt.punct(i + 1, b'(');
        if frame.in_with && followed_by_def && !["recursive", "not", "materialized"].iter().any(|w| stmt.kw(i, w)) {
            // `name AS (…)` or `name (cols) AS (…)`: a CTE name.
            frame.ctes.push(ident_value(stmt.src, &stmt.toks[i]));
        } else if stmt.kw(i, "from") && frame.level != Level::Other && !prev("distinct") {
            frame.from_list = true;
            self.pending = Some(false);
        } else if stmt.kw(i, "join") {
            self.pending = Some(false);
        } else if stmt.kw(i, "using") && frame.merge {
            frame.merge = false;
            self.pending = Some(false);
        } else if stmt.kw(i, "using") && !stmt.punct(i + 1, b'(') && frame.level == Level::Query {
            // DELETE … USING a, b (a join's USING is followed by its column list).
            frame.from_list = true;
            self.pending = Some(false);
        } else if stmt.kw(i, "table") && !(prev("into") || prev("temp") || prev("temporary") || prev("unlogged")) {
            // `… UNION TABLE t`, `IN (TABLE t)`.
            self.pending = Some(false);
        } else if FROM_END.iter().any(|w| stmt.kw(i, w)) {
            frame.from_list = false;
        }
        Some(i + 1)
    }
}
