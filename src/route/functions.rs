//! The write-function list: built-in functions whose call makes a statement a write (or changes
//! session state pgrelay must carry or pin), the configured `write_functions` and
//! `read_only_functions`, and the token scan that finds calls to them anywhere in a statement.
//!
//! Calls are found on tokens (a name followed by `(`), not on the AST, so they are found in every
//! position the parser knows or not (subqueries, CTEs, table functions, unparsable statements),
//! and never inside literals, comments or dollar-quoted bodies.
//!
//! Once the database's catalog is loaded (`volatility`), a call of any function it marks
//! `VOLATILE` is a write too, unless it is a read-safe built-in or listed in
//! `read_only_functions`. Before that (or with `function_volatility = "lists"`) unknown user
//! functions are *not* writes: only listed ones are. A function that changes session state
//! without writing (a user function calling `set_config`) cannot be seen at all.

use std::collections::HashSet;

use crate::route::lex::{Kind, Stmt, string_value};
use crate::route::volatility::VolatileSet;
use crate::route::{PinReason, SessionEffect, Tables, WriteReason};

/// What a call to a listed function does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FnKind {
    /// Advances or sets a sequence: writes that sequence (named by a literal argument).
    Sequence,
    /// Must run on the primary but changes no table data (locks, signals, WAL switches,
    /// session-dependent values such as `currval`).
    NoData,
    /// May write anything (large objects, dblink, configured write functions).
    Unknown,
    /// Session-level advisory lock: pins the client to its server.
    AdvisoryLock,
    /// `pg_advisory_unlock_all()`: releases every session lock.
    AdvisoryUnlockAll,
    /// `set_config(name, value, is_local)`.
    SetConfig,
}

/// Built-in functions, by unqualified lower-case name; `true` marks a prefix.
const BUILTINS: &[(&str, bool, FnKind)] = &[
    ("nextval", false, FnKind::Sequence),
    ("setval", false, FnKind::Sequence),
    // Session-dependent: another server (or a replica) answers "not yet defined in this session".
    ("currval", false, FnKind::NoData),
    ("lastval", false, FnKind::NoData),
    ("set_config", false, FnKind::SetConfig),
    ("pg_advisory_unlock_all", false, FnKind::AdvisoryUnlockAll),
    // Transaction-level locks and unlocks: primary, no pin (released at commit / already pinned).
    ("pg_advisory_xact_lock", true, FnKind::NoData),
    ("pg_try_advisory_xact_lock", true, FnKind::NoData),
    ("pg_advisory_unlock", true, FnKind::NoData),
    ("pg_advisory_lock", true, FnKind::AdvisoryLock),
    ("pg_try_advisory_lock", true, FnKind::AdvisoryLock),
    ("txid_current", false, FnKind::NoData),
    ("txid_current_if_assigned", false, FnKind::NoData),
    ("pg_current_xact_id", true, FnKind::NoData),
    ("pg_export_snapshot", false, FnKind::NoData),
    ("pg_notify", false, FnKind::NoData),
    ("lo_", true, FnKind::Unknown),
    ("lowrite", false, FnKind::Unknown),
    ("loread", false, FnKind::Unknown),
    ("pg_cancel_backend", false, FnKind::NoData),
    ("pg_terminate_backend", false, FnKind::NoData),
    ("pg_reload_conf", false, FnKind::NoData),
    ("pg_rotate_logfile", false, FnKind::NoData),
    ("pg_switch_wal", false, FnKind::NoData),
    ("pg_switch_xlog", false, FnKind::NoData),
    ("pg_create_restore_point", false, FnKind::NoData),
    ("pg_backup_start", false, FnKind::NoData),
    ("pg_backup_stop", false, FnKind::NoData),
    ("pg_start_backup", false, FnKind::NoData),
    ("pg_stop_backup", false, FnKind::NoData),
    ("pg_create_physical_replication_slot", false, FnKind::NoData),
    ("pg_create_logical_replication_slot", false, FnKind::NoData),
    ("pg_drop_replication_slot", false, FnKind::NoData),
    ("pg_copy_physical_replication_slot", false, FnKind::NoData),
    ("pg_copy_logical_replication_slot", false, FnKind::NoData),
    ("pg_replication_slot_advance", false, FnKind::NoData),
    ("pg_logical_slot_get_", true, FnKind::NoData),
    ("pg_logical_emit_message", false, FnKind::NoData),
    ("pg_replication_origin_", true, FnKind::NoData),
    ("pg_stat_reset", true, FnKind::NoData),
    ("pg_stat_statements_reset", false, FnKind::NoData),
    ("pg_log_backend_memory_contexts", false, FnKind::NoData),
    ("pg_import_system_collations", false, FnKind::Unknown),
    ("pg_file_write", false, FnKind::NoData),
    ("pg_file_rename", false, FnKind::NoData),
    ("pg_file_unlink", false, FnKind::NoData),
    ("pg_truncate_visibility_map", false, FnKind::NoData),
    ("brin_summarize_new_values", false, FnKind::NoData),
    ("brin_summarize_range", false, FnKind::NoData),
    ("brin_desummarize_range", false, FnKind::NoData),
    ("gin_clean_pending_list", false, FnKind::NoData),
    ("dblink", false, FnKind::Unknown),
    ("dblink_", true, FnKind::Unknown),
];

fn builtin(bare: &str) -> Option<FnKind> {
    BUILTINS
        .iter()
        .find(|(name, prefix, _)| if *prefix { bare.starts_with(name) } else { bare == *name })
        .map(|&(_, _, kind)| kind)
}

/// Configured function lists of one database (names lower-cased; `schema.name` or `name`).
#[derive(Debug, Default)]
pub(crate) struct FunctionLists {
    write: HashSet<String>,
    read_only: HashSet<String>,
}

impl FunctionLists {
    /// A write-list entry `schema.f` also matches an unqualified call of `f` (it may resolve to
    /// it through search_path); a read-only entry matches only as written.
    pub(crate) fn new(write: &[String], read_only: &[String]) -> Self {
        let norm = |s: &String| s.trim().to_ascii_lowercase();
        let mut write_set: HashSet<String> = write.iter().map(norm).collect();
        let bare: Vec<String> = write_set
            .iter()
            .filter_map(|n| n.rsplit_once('.').map(|(_, f)| f.to_owned()))
            .collect();
        write_set.extend(bare);
        FunctionLists {
            write: write_set,
            read_only: read_only.iter().map(norm).collect(),
        }
    }

    /// What the lists say of a call to `qualified` (`schema.name` or `name`), given its
    /// built-in rule. Names in the lists are lower-case: `"App"."F"` matches an entry only if
    /// it was written so (the catalog, which keeps case, is matched in `volatility`).
    fn decide(&self, qualified: &str, bare: &str, kind: Option<FnKind>) -> Listed {
        let listed = |set: &HashSet<String>| set.contains(qualified) || set.contains(bare);
        if listed(&self.read_only) {
            Listed::ReadOnly
        } else if listed(&self.write) || kind.is_some() {
            Listed::Write
        } else {
            Listed::No
        }
    }
}

/// A call as the configured lists and built-in rules see it.
enum Listed {
    /// In `read_only_functions`: a read whatever else says so.
    ReadOnly,
    /// In `write_functions` or a built-in write rule.
    Write,
    /// Neither: the catalog decides, when known.
    No,
}

/// What the calls of one statement do.
#[derive(Debug, Default)]
pub(crate) struct Calls {
    /// Why the first call that makes the statement a write does.
    pub write: Option<WriteReason>,
    /// Tables (sequences) written by those calls; `Unknown` once any call may write anything.
    pub written: Option<Tables>,
    pub effects: Vec<SessionEffect>,
}

/// Scans the tokens of `stmt` for calls of listed functions, and of volatile ones when the
/// catalog is known (`volatile`).
pub(crate) fn scan_calls(lists: &FunctionLists, volatile: Option<&VolatileSet>, stmt: &Stmt<'_>) -> Calls {
    let mut calls = Calls::default();
    let toks = stmt.toks;
    for i in 0..toks.len().saturating_sub(1) {
        if !toks[i].is_name() || !toks[i + 1].is_punct(b'(') {
            continue;
        }
        let bare = crate::route::lex::ident_value(stmt.src, &toks[i]);
        let schema = (i >= 2 && toks[i - 1].is_punct(b'.') && toks[i - 2].is_name())
            .then(|| crate::route::lex::ident_value(stmt.src, &toks[i - 2]));
        let qualified = match &schema {
            Some(schema) => format!("{schema}.{bare}"),
            None => bare.clone(),
        };
        let kind = builtin(&bare);
        let reason = match lists.decide(&qualified, &bare, kind) {
            Listed::ReadOnly => None,
            Listed::Write => Some(WriteReason::WritingFunction(qualified)),
            Listed::No => volatile
                .filter(|set| set.writes(schema.as_deref(), &bare))
                .map(|_| WriteReason::VolatileFunction(qualified)),
        };
        if let Some(reason) = reason {
            calls.write.get_or_insert(reason);
            let written = match kind {
                Some(FnKind::Sequence) => sequence_arg(stmt, i + 2).map_or(Tables::Unknown, |s| Tables::Known(vec![s])),
                Some(FnKind::Unknown) | None => Tables::Unknown,
                Some(_) => Tables::Known(Vec::new()),
            };
            calls
                .written
                .get_or_insert_with(|| Tables::Known(Vec::new()))
                .union(written);
        }
        match kind {
            Some(FnKind::AdvisoryLock) => calls.effects.push(SessionEffect::Pin(PinReason::AdvisoryLock)),
            Some(FnKind::AdvisoryUnlockAll) => calls.effects.push(SessionEffect::Unpin(PinReason::AdvisoryLock)),
            Some(FnKind::SetConfig) => calls.effects.extend(set_config(stmt, i + 2)),
            _ => {}
        }
    }
    calls
}

/// `nextval('public.users_id_seq')` / `nextval('"Seq"'::regclass)`: the sequence, normalised
/// like a table name.
fn sequence_arg(stmt: &Stmt<'_>, i: usize) -> Option<String> {
    let lit = string_value(stmt.src, stmt.toks.get(i)?)?;
    let after = i + 1;
    let cast_ok =
        stmt.punct(after, b')') || stmt.punct(after, b',') || (stmt.punct(after, b':') && stmt.punct(after + 1, b':'));
    cast_ok.then(|| normalize_regclass(&lit))?
}

/// Text of a `regclass` literal to a table-style name: unquoted parts lower-cased.
fn normalize_regclass(lit: &str) -> Option<String> {
    let sub = crate::route::lex::Lexer::new(lit);
    let src = lit;
    let mut out = String::new();
    let mut expect_name = true;
    for t in sub {
        if expect_name && matches!(t.kind, Kind::Word | Kind::Quoted) {
            out.push_str(&crate::route::lex::ident_value(src, &t));
        } else if !expect_name && t.is_punct(b'.') {
            out.push('.');
        } else {
            return None;
        }
        expect_name = !expect_name;
    }
    (!out.is_empty() && !expect_name).then_some(out)
}

/// Effects of `set_config(name, value, is_local)` whose arguments start at token `i`.
fn set_config(stmt: &Stmt<'_>, i: usize) -> Vec<SessionEffect> {
    let lit = |j: usize| stmt.toks.get(j).and_then(|t| string_value(stmt.src, t));
    let is_local = bool_literal(stmt, i + 4).filter(|_| stmt.punct(i + 1, b',') && stmt.punct(i + 3, b','));
    let closed = stmt.punct(i + 5, b')');
    let literal = match (lit(i), lit(i + 2), closed) {
        (Some(name), Some(value), true) => {
            let name = name.trim().to_ascii_lowercase();
            crate::route::set::value_sql(&name, &value).map(|value| (name, value))
        }
        _ => None,
    };
    match (is_local, literal) {
        (Some(local), Some((name, value))) => vec![SessionEffect::Set { name, value, local }],
        // A transaction-local change needs no tracking: the transaction is pinned anyway.
        (Some(true), None) => Vec::new(),
        _ => vec![SessionEffect::Pin(PinReason::UntrackableSet)],
    }
}

fn bool_literal(stmt: &Stmt<'_>, i: usize) -> Option<bool> {
    let t = stmt.toks.get(i)?;
    let text = match t.kind {
        Kind::Word | Kind::Number => stmt.tok_text(i).to_ascii_lowercase(),
        Kind::Str => string_value(stmt.src, t)?.trim().to_ascii_lowercase(),
        _ => return None,
    };
    crate::route::set::parse_bool(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_names() {
        assert_eq!(builtin("nextval"), Some(FnKind::Sequence));
        assert_eq!(builtin("pg_advisory_lock_shared"), Some(FnKind::AdvisoryLock));
        assert_eq!(builtin("pg_advisory_xact_lock_shared"), Some(FnKind::NoData));
        assert_eq!(builtin("pg_advisory_unlock_all"), Some(FnKind::AdvisoryUnlockAll));
        assert_eq!(builtin("lo_import"), Some(FnKind::Unknown));
        assert_eq!(builtin("lower"), None);
        assert_eq!(builtin("pg_sequence_last_value"), None);
    }

    #[test]
    fn regclass_names() {
        assert_eq!(
            normalize_regclass("public.Users_id_seq"),
            Some("public.users_id_seq".into())
        );
        assert_eq!(normalize_regclass("\"Seq\""), Some("Seq".into()));
        assert_eq!(normalize_regclass("a."), None);
        assert_eq!(normalize_regclass(""), None);
    }
}
