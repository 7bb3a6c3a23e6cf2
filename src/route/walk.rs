//! The sqlparser AST walk: which tables a statement reads and writes, and whether it holds a
//! data-modifying CTE, an INTO or a locking clause at any depth. Used when the token reader of
//! [`relations`](crate::route::relations) is unsure. It covers the constructs PostgreSQL has; any
//! other node marks the tables `Unknown` (never the access), as does a tree deeper than
//! [`MAX_WALK_DEPTH`].

use sqlparser::ast::{
    Assignment, Cte, Delete, Distinct, FromTable, GroupByExpr, Insert, Join, JoinConstraint, JoinOperator, LimitClause,
    Merge, MergeAction, MergeInsertKind, MergeUpdateKind, NamedWindowExpr, ObjectName, ObjectNamePart,
    OnConflictAction, OnInsert, OrderBy, OrderByKind, Query, Select, SelectItem, SelectItemQualifiedWildcardKind,
    SetExpr, Statement, TableFactor, TableObject, TableWithJoins, Update, UpdateTableFromKind,
};

use crate::route::{Tables, WriteReason};

const MAX_WALK_DEPTH: usize = 200;

/// What the AST says.
#[derive(Debug, Default)]
pub(crate) struct Facts {
    tables: Vec<String>,
    written: Vec<String>,
    complete: bool,
    dml_top: bool,
    dml_cte: bool,
    locking: bool,
    into: bool,
}

impl Facts {
    pub(crate) fn tables(&self) -> Tables {
        self.known(self.tables.iter().chain(&self.written))
    }

    pub(crate) fn written(&self) -> Tables {
        self.known(self.written.iter())
    }

    /// Why the AST makes the statement a write, if it does.
    pub(crate) fn reason(&self) -> Option<WriteReason> {
        if self.dml_top {
            Some(WriteReason::Dml)
        } else if self.dml_cte {
            Some(WriteReason::DataModifyingCte)
        } else if self.into {
            Some(WriteReason::SelectInto)
        } else if self.locking {
            Some(WriteReason::LockingClause)
        } else {
            None
        }
    }

    fn known<'a>(&self, names: impl Iterator<Item = &'a String>) -> Tables {
        if !self.complete {
            return Tables::Unknown;
        }
        let mut v: Vec<String> = names.cloned().collect();
        v.sort_unstable();
        v.dedup();
        Tables::Known(v)
    }
}

pub(crate) fn walk(stmt: &Statement) -> Facts {
    let mut w = Walker {
        facts: Facts {
            complete: true,
            ..Facts::default()
        },
        ctes: Vec::new(),
        depth: 0,
    };
    match stmt {
        Statement::Query(q) => w.query(q, true),
        other => w.statement(other, true),
    }
    w.facts
}

pub(crate) struct Walker {
    facts: Facts,
    /// CTE names in scope: a one-part relation with such a name is not a table.
    ctes: Vec<String>,
    depth: usize,
}

/// Table name as routing sees it: unquoted parts lower-cased, quoted parts as written.
fn object_name(name: &ObjectName) -> Option<String> {
    let mut parts = Vec::with_capacity(name.0.len());
    for part in &name.0 {
        let ObjectNamePart::Identifier(ident) = part else {
            return None;
        };
        parts.push(if ident.quote_style.is_some() {
            ident.value.clone()
        } else {
            ident.value.to_lowercase()
        });
    }
    Some(parts.join("."))
}

impl Walker {
    /// Guards recursion: past the limit the tables are unknown and the walk stops descending.
    pub(crate) fn enter(&mut self) -> bool {
        self.depth += 1;
        if self.depth > MAX_WALK_DEPTH {
            self.facts.complete = false;
        }
        self.depth <= MAX_WALK_DEPTH
    }

    pub(crate) fn leave(&mut self) {
        self.depth -= 1;
    }

    pub(crate) fn incomplete(&mut self) {
        self.facts.complete = false;
    }

    /// A DML statement: `top` when it is the statement itself (or the body after WITH).
    fn statement(&mut self, stmt: &Statement, top: bool) {
        if !matches!(
            stmt,
            Statement::Insert(_) | Statement::Update(_) | Statement::Delete(_) | Statement::Merge(_)
        ) {
            return self.incomplete();
        }
        if top {
            self.facts.dml_top = true;
        } else {
            self.facts.dml_cte = true;
        }
        match stmt {
            Statement::Insert(i) => self.insert(i),
            Statement::Update(u) => self.update(u),
            Statement::Delete(d) => self.delete(d),
            Statement::Merge(m) => self.merge(m),
            _ => {}
        }
    }

    fn target(&mut self, name: &ObjectName) {
        match object_name(name) {
            Some(n) => self.facts.written.push(n),
            None => self.incomplete(),
        }
    }

    fn insert(&mut self, i: &Insert) {
        match &i.table {
            TableObject::TableName(name) => self.target(name),
            _ => self.incomplete(),
        }
        if let Some(q) = &i.source {
            self.query(q, false);
        }
        self.assignments(&i.assignments);
        if let Some(on) = &i.on {
            match on {
                OnInsert::OnConflict(c) => {
                    if let OnConflictAction::DoUpdate(u) = &c.action {
                        self.assignments(&u.assignments);
                        self.opt_expr(u.selection.as_ref());
                    }
                }
                _ => self.incomplete(),
            }
        }
        self.items(i.returning.iter().flatten());
    }

    fn update(&mut self, u: &Update) {
        match &u.table.relation {
            TableFactor::Table { name, args: None, .. } => self.target(name),
            _ => self.incomplete(),
        }
        self.joins(&u.table.joins);
        self.assignments(&u.assignments);
        if let Some(UpdateTableFromKind::BeforeSet(from) | UpdateTableFromKind::AfterSet(from)) = &u.from {
            self.from(from);
        }
        self.opt_expr(u.selection.as_ref());
        self.items(u.returning.iter().flatten());
    }

    fn delete(&mut self, d: &Delete) {
        if !d.tables.is_empty() {
            self.incomplete();
        }
        let (FromTable::WithFromKeyword(from) | FromTable::WithoutKeyword(from)) = &d.from;
        for twj in from {
            match &twj.relation {
                TableFactor::Table { name, args: None, .. } => self.target(name),
                _ => self.incomplete(),
            }
            self.joins(&twj.joins);
        }
        if let Some(using) = &d.using {
            self.from(using);
        }
        self.opt_expr(d.selection.as_ref());
        self.items(d.returning.iter().flatten());
    }

    fn merge(&mut self, m: &Merge) {
        match &m.table {
            TableFactor::Table { name, args: None, .. } => self.target(name),
            _ => self.incomplete(),
        }
        self.table_factor(&m.source);
        self.expr(&m.on);
        for clause in &m.clauses {
            self.opt_expr(clause.predicate.as_ref());
            match &clause.action {
                MergeAction::Insert(ins) => {
                    if let MergeInsertKind::Values(v) = &ins.kind {
                        v.rows.iter().for_each(|row| self.exprs(&row.content));
                    }
                }
                MergeAction::Update(upd) => {
                    if let MergeUpdateKind::Set(a) = &upd.kind {
                        self.assignments(a);
                    }
                }
                MergeAction::Delete { .. } | MergeAction::DoNothing { .. } => {}
            }
        }
    }

    fn assignments(&mut self, assignments: &[Assignment]) {
        assignments.iter().for_each(|a| self.expr(&a.value));
    }

    pub(crate) fn query(&mut self, q: &Query, top: bool) {
        if !self.enter() {
            return self.leave();
        }
        let scope = self.ctes.len();
        if let Some(with) = &q.with {
            // Every CTE name is in scope for every body: a slight over-approximation of
            // PostgreSQL's rules that can only hide a same-named table, never invent one.
            self.ctes
                .extend(with.cte_tables.iter().map(|c: &Cte| c.alias.name.value.to_lowercase()));
            for cte in &with.cte_tables {
                self.cte_body(&cte.query);
            }
        }
        self.set_expr(&q.body, top);
        if let Some(order_by) = &q.order_by {
            self.order_by(order_by);
        }
        match &q.limit_clause {
            Some(LimitClause::LimitOffset {
                limit,
                offset,
                limit_by,
            }) => {
                self.opt_expr(limit.as_ref());
                self.opt_expr(offset.as_ref().map(|o| &o.value));
                self.exprs(limit_by);
            }
            Some(LimitClause::OffsetCommaLimit { offset, limit }) => {
                self.expr(offset);
                self.expr(limit);
            }
            None => {}
        }
        if let Some(fetch) = &q.fetch {
            self.opt_expr(fetch.quantity.as_ref());
        }
        if !q.locks.is_empty() {
            self.facts.locking = true;
        }
        if q.for_clause.is_some() || q.settings.is_some() || q.format_clause.is_some() || !q.pipe_operators.is_empty() {
            self.incomplete();
        }
        self.ctes.truncate(scope);
        self.leave();
    }

    /// A CTE body: DML here is a data-modifying CTE.
    fn cte_body(&mut self, q: &Query) {
        self.query(q, false);
    }

    fn set_expr(&mut self, s: &SetExpr, top: bool) {
        if !self.enter() {
            return self.leave();
        }
        match s {
            SetExpr::Select(select) => self.select(select),
            SetExpr::Query(q) => self.query(q, false),
            SetExpr::SetOperation { left, right, .. } => {
                self.set_expr(left, false);
                self.set_expr(right, false);
            }
            SetExpr::Values(v) => v.rows.iter().for_each(|row| self.exprs(&row.content)),
            SetExpr::Insert(st) | SetExpr::Update(st) | SetExpr::Delete(st) | SetExpr::Merge(st) => {
                self.statement(st, top)
            }
            SetExpr::Table(_) => self.incomplete(),
        }
        self.leave();
    }

    fn select(&mut self, s: &Select) {
        if s.into.is_some() {
            self.facts.into = true;
        }
        if let Some(Distinct::On(exprs)) = &s.distinct {
            self.exprs(exprs);
        }
        self.items(s.projection.iter());
        self.from(&s.from);
        self.opt_expr(s.selection.as_ref());
        match &s.group_by {
            GroupByExpr::Expressions(exprs, _) => self.exprs(exprs),
            GroupByExpr::All(_) => {}
        }
        self.opt_expr(s.having.as_ref());
        for def in &s.named_window {
            if let NamedWindowExpr::WindowSpec(spec) = &def.1 {
                self.window(spec);
            }
        }
        let foreign = s.top.is_some()
            || !s.lateral_views.is_empty()
            || s.prewhere.is_some()
            || !s.connect_by.is_empty()
            || !s.cluster_by.is_empty()
            || !s.distribute_by.is_empty()
            || !s.sort_by.is_empty()
            || s.qualify.is_some();
        if foreign {
            self.incomplete();
        }
    }

    fn items<'a>(&mut self, items: impl Iterator<Item = &'a SelectItem>) {
        for item in items {
            match item {
                SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => self.expr(e),
                SelectItem::ExprWithAliases { expr, .. } => self.expr(expr),
                SelectItem::QualifiedWildcard(SelectItemQualifiedWildcardKind::Expr(e), _) => self.expr(e),
                SelectItem::QualifiedWildcard(SelectItemQualifiedWildcardKind::ObjectName(_), _)
                | SelectItem::Wildcard(_) => {}
            }
        }
    }

    fn from(&mut self, from: &[TableWithJoins]) {
        for twj in from {
            self.table_factor(&twj.relation);
            self.joins(&twj.joins);
        }
    }

    fn joins(&mut self, joins: &[Join]) {
        for join in joins {
            self.table_factor(&join.relation);
            let constraint = match &join.join_operator {
                JoinOperator::Join(c)
                | JoinOperator::Inner(c)
                | JoinOperator::Left(c)
                | JoinOperator::LeftOuter(c)
                | JoinOperator::Right(c)
                | JoinOperator::RightOuter(c)
                | JoinOperator::FullOuter(c)
                | JoinOperator::CrossJoin(c) => c,
                _ => {
                    self.incomplete();
                    continue;
                }
            };
            if let JoinConstraint::On(e) = constraint {
                self.expr(e);
            }
        }
    }

    fn table_factor(&mut self, tf: &TableFactor) {
        if !self.enter() {
            return self.leave();
        }
        match tf {
            TableFactor::Table { name, args: None, .. } => match object_name(name) {
                Some(n) if name.0.len() == 1 && self.ctes.contains(&n.to_lowercase()) => {}
                Some(n) => self.facts.tables.push(n),
                None => self.incomplete(),
            },
            TableFactor::Table { args: Some(args), .. } => self.function_args(&args.args),
            TableFactor::Derived { subquery, .. } => self.query(subquery, false),
            TableFactor::TableFunction { expr, .. } => self.expr(expr),
            TableFactor::Function { args, .. } => self.function_args(args),
            TableFactor::UNNEST { array_exprs, .. } => self.exprs(array_exprs),
            TableFactor::NestedJoin { table_with_joins, .. } => {
                self.table_factor(&table_with_joins.relation);
                self.joins(&table_with_joins.joins);
            }
            _ => self.incomplete(),
        }
        self.leave();
    }

    fn order_by(&mut self, order_by: &OrderBy) {
        if let OrderByKind::Expressions(exprs) = &order_by.kind {
            exprs.iter().for_each(|o| self.expr(&o.expr));
        }
    }
}
