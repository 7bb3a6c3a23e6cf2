//! The expression half of the AST walk: every expression form PostgreSQL has is descended for
//! the subqueries it may hold (their tables count); anything else makes the tables `Unknown`.

use sqlparser::ast::{
    AccessExpr, Expr, Function, FunctionArg, FunctionArgExpr, FunctionArgumentClause, FunctionArguments, Subscript,
    WindowFrameBound, WindowSpec, WindowType,
};

use crate::route::walk::Walker;

impl Walker {
    pub(crate) fn window(&mut self, spec: &WindowSpec) {
        self.exprs(&spec.partition_by);
        spec.order_by.iter().for_each(|o| self.expr(&o.expr));
        if let Some(frame) = &spec.window_frame {
            for bound in std::iter::once(&frame.start_bound).chain(frame.end_bound.as_ref()) {
                if let WindowFrameBound::Preceding(Some(e)) | WindowFrameBound::Following(Some(e)) = bound {
                    self.expr(e);
                }
            }
        }
    }

    pub(crate) fn function(&mut self, f: &Function) {
        for args in [&f.parameters, &f.args] {
            match args {
                FunctionArguments::None => {}
                FunctionArguments::Subquery(q) => self.query(q, false),
                FunctionArguments::List(list) => {
                    self.function_args(&list.args);
                    for clause in &list.clauses {
                        match clause {
                            FunctionArgumentClause::OrderBy(o) => o.iter().for_each(|o| self.expr(&o.expr)),
                            FunctionArgumentClause::Where(e) | FunctionArgumentClause::Limit(e) => self.expr(e),
                            _ => {}
                        }
                    }
                }
            }
        }
        f.within_group.iter().for_each(|o| self.expr(&o.expr));
        self.opt_expr(f.filter.as_deref());
        if let Some(WindowType::WindowSpec(spec)) = &f.over {
            self.window(spec);
        }
    }

    pub(crate) fn function_args(&mut self, args: &[FunctionArg]) {
        for arg in args {
            let (FunctionArg::Named { arg, .. } | FunctionArg::ExprNamed { arg, .. } | FunctionArg::Unnamed(arg)) = arg;
            if let FunctionArgExpr::Expr(e) = arg {
                self.expr(e);
            }
        }
    }

    pub(crate) fn exprs(&mut self, exprs: &[Expr]) {
        exprs.iter().for_each(|e| self.expr(e));
    }

    pub(crate) fn opt_expr(&mut self, e: Option<&Expr>) {
        if let Some(e) = e {
            self.expr(e);
        }
    }

    pub(crate) fn expr(&mut self, e: &Expr) {
        if !self.enter() {
            return self.leave();
        }
        match e {
            Expr::Identifier(_)
            | Expr::CompoundIdentifier(_)
            | Expr::Value(_)
            | Expr::TypedString(_)
            | Expr::Wildcard(_)
            | Expr::QualifiedWildcard(..) => {}
            Expr::IsFalse(x)
            | Expr::IsNotFalse(x)
            | Expr::IsTrue(x)
            | Expr::IsNotTrue(x)
            | Expr::IsNull(x)
            | Expr::IsNotNull(x)
            | Expr::IsUnknown(x)
            | Expr::IsNotUnknown(x)
            | Expr::Nested(x)
            | Expr::UnaryOp { expr: x, .. }
            | Expr::Cast { expr: x, .. }
            | Expr::Collate { expr: x, .. }
            | Expr::Extract { expr: x, .. }
            | Expr::Ceil { expr: x, .. }
            | Expr::Floor { expr: x, .. }
            | Expr::IsJson { expr: x, .. }
            | Expr::IsNormalized { expr: x, .. }
            | Expr::Named { expr: x, .. }
            | Expr::JsonAccess { value: x, .. }
            | Expr::Prefixed { value: x, .. } => self.expr(x),
            Expr::BinaryOp { .. } => {
                // `a OR b OR c …` is a left-deep chain as long as the text: walk its spine in a
                // loop so depth does not grow with it.
                let mut spine = e;
                while let Expr::BinaryOp { left, right, .. } = spine {
                    self.expr(right);
                    spine = left;
                }
                self.expr(spine);
            }
            Expr::IsDistinctFrom(a, b)
            | Expr::IsNotDistinctFrom(a, b)
            | Expr::AnyOp { left: a, right: b, .. }
            | Expr::AllOp { left: a, right: b, .. }
            | Expr::AtTimeZone {
                timestamp: a,
                time_zone: b,
            }
            | Expr::Position { expr: a, r#in: b }
            | Expr::InUnnest {
                expr: a, array_expr: b, ..
            }
            | Expr::RLike {
                expr: a, pattern: b, ..
            } => {
                self.expr(a);
                self.expr(b);
            }
            Expr::Like {
                expr,
                pattern,
                escape_char,
                ..
            }
            | Expr::ILike {
                expr,
                pattern,
                escape_char,
                ..
            }
            | Expr::SimilarTo {
                expr,
                pattern,
                escape_char,
                ..
            } => {
                self.expr(expr);
                self.expr(pattern);
                self.opt_expr(escape_char.as_deref());
            }
            Expr::Between { expr, low, high, .. } => {
                self.expr(expr);
                self.expr(low);
                self.expr(high);
            }
            Expr::InList { expr, list, .. } => {
                self.expr(expr);
                self.exprs(list);
            }
            Expr::InSubquery { expr, subquery, .. } => {
                self.expr(expr);
                self.query(subquery, false);
            }
            Expr::Exists { subquery, .. } | Expr::Subquery(subquery) => self.query(subquery, false),
            Expr::Substring {
                expr,
                substring_from,
                substring_for,
                ..
            } => {
                self.expr(expr);
                self.opt_expr(substring_from.as_deref());
                self.opt_expr(substring_for.as_deref());
            }
            Expr::Trim {
                expr,
                trim_what,
                trim_characters,
                ..
            } => {
                self.expr(expr);
                self.opt_expr(trim_what.as_deref());
                self.exprs(trim_characters.as_deref().unwrap_or(&[]));
            }
            Expr::Overlay {
                expr,
                overlay_what,
                overlay_from,
                overlay_for,
            } => {
                self.expr(expr);
                self.expr(overlay_what);
                self.expr(overlay_from);
                self.opt_expr(overlay_for.as_deref());
            }
            Expr::Function(f) => self.function(f),
            Expr::Case {
                operand,
                conditions,
                else_result,
                ..
            } => {
                self.opt_expr(operand.as_deref());
                for when in conditions {
                    self.expr(&when.condition);
                    self.expr(&when.result);
                }
                self.opt_expr(else_result.as_deref());
            }
            Expr::Tuple(list) => self.exprs(list),
            Expr::GroupingSets(sets) | Expr::Cube(sets) | Expr::Rollup(sets) => sets.iter().for_each(|s| self.exprs(s)),
            Expr::Array(array) => self.exprs(&array.elem),
            Expr::Interval(interval) => self.expr(&interval.value),
            Expr::CompoundFieldAccess { root, access_chain } => {
                self.expr(root);
                for access in access_chain {
                    match access {
                        AccessExpr::Dot(e) => self.expr(e),
                        AccessExpr::Subscript(Subscript::Index { index }) => self.expr(index),
                        AccessExpr::Subscript(Subscript::Slice {
                            lower_bound,
                            upper_bound,
                            stride,
                        }) => {
                            self.opt_expr(lower_bound.as_ref());
                            self.opt_expr(upper_bound.as_ref());
                            self.opt_expr(stride.as_ref());
                        }
                    }
                }
            }
            _ => self.incomplete(),
        }
        self.leave();
    }
}
