//! Session-state statements read from their keywords: SET (every form), RESET, DISCARD,
//! DEALLOCATE; and the rendering of a value so that `SET name TO value` re-applies it on
//! another server. Values are rebuilt from the statement's own tokens, so they can never carry
//! a second statement.

use crate::route::fast::StmtClass;
use crate::route::lex::{Kind, Lexer, Stmt, ident_value};
use crate::route::tx::{last_name, modes};
use crate::route::{Isolation, PinReason, SessionEffect, TxControl, WriteReason};

/// Parameters whose list elements `SET` quotes as identifiers (GUC_LIST_QUOTE): a `set_config`
/// value for them must be re-applied as an identifier list, not as one string.
const LIST_QUOTE_PARAMS: &[&str] = &[
    "search_path",
    "temp_tablespaces",
    "session_preload_libraries",
    "local_preload_libraries",
];

/// PostgreSQL's boolean spellings (`parse_bool`), for values given as words or strings.
pub(crate) fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "t" | "tr" | "tru" | "true" | "y" | "ye" | "yes" | "on" | "1" => Some(true),
        "f" | "fa" | "fal" | "fals" | "false" | "n" | "no" | "of" | "off" | "0" => Some(false),
        _ => None,
    }
}

/// A string as an SQL literal that reads back the same whatever `standard_conforming_strings`.
pub(crate) fn quote_literal(s: &str) -> Option<String> {
    if s.contains('\0') {
        return None;
    }
    let doubled = s.replace('\'', "''");
    Some(if s.contains('\\') {
        format!("E'{}'", doubled.replace('\\', "\\\\"))
    } else {
        format!("'{doubled}'")
    })
}

/// The SQL after `SET name TO` that gives `name` the value a `set_config(name, value, …)` gave.
pub(crate) fn value_sql(name: &str, value: &str) -> Option<String> {
    if !LIST_QUOTE_PARAMS.contains(&name) {
        return quote_literal(value);
    }
    if value.trim().is_empty() {
        return Some("''".to_owned());
    }
    // The string is itself an identifier list (`"$user", public`): re-quote every element.
    let mut parts = Vec::new();
    let mut expect_name = true;
    for t in Lexer::new(value) {
        if expect_name && matches!(t.kind, Kind::Word | Kind::Quoted) && !t.suspect {
            let v = ident_value(value, &t);
            parts.push(format!("\"{}\"", v.replace('"', "\"\"")));
        } else if expect_name || !t.is_punct(b',') {
            return None;
        }
        expect_name = !expect_name;
    }
    (!expect_name).then(|| parts.join(", "))
}

/// The value tokens `i..` rebuilt as text: one space wherever the source had a gap.
fn value_text(stmt: &Stmt<'_>, i: usize) -> Option<String> {
    let toks = stmt.toks.get(i..).filter(|t| !t.is_empty())?;
    if toks.iter().any(|t| t.suspect || t.is_punct(b';')) || stmt.truncated {
        return None;
    }
    let mut out = String::new();
    let mut prev_end = None;
    for t in toks {
        if prev_end.is_some_and(|e| e < t.start) {
            out.push(' ');
        }
        out.push_str(stmt.src.get(t.start..t.end)?);
        prev_end = Some(t.end);
    }
    Some(out)
}

fn with(effects: Vec<SessionEffect>) -> StmtClass {
    let mut class = StmtClass::read();
    class.session = effects;
    class
}

fn set_or_reset(name: String, stmt: &Stmt<'_>, i: usize, local: bool) -> SessionEffect {
    let is_default = stmt.toks.len() == i + 1 && (stmt.kw(i, "default") || (name == "timezone" && stmt.kw(i, "local")));
    if is_default {
        return SessionEffect::Reset { name };
    }
    match value_text(stmt, i) {
        Some(value) => SessionEffect::Set { name, value, local },
        None => SessionEffect::Pin(PinReason::UntrackableSet),
    }
}

/// `SET …` in all its forms; `None` when the form is not recognised.
pub(crate) fn set(stmt: &Stmt<'_>) -> Option<StmtClass> {
    let local = stmt.kw(1, "local");
    let mut i = if local || stmt.kw(1, "session") { 2 } else { 1 };
    // `SET SESSION AUTHORIZATION` / `SET SESSION CHARACTERISTICS`: SESSION there is not a scope.
    if stmt.kw(1, "session") && (stmt.kw(2, "authorization") || stmt.kw(2, "characteristics")) {
        i = 1;
    }
    if stmt.kw(i, "transaction") {
        if stmt.kw(i + 1, "snapshot") {
            return Some(transaction(None, None));
        }
        let m = modes(stmt, i + 1)?;
        return Some(transaction(m.read_only, m.isolation));
    }
    if stmt.kw(i, "session")
        && stmt.kw(i + 1, "characteristics")
        && stmt.kw(i + 2, "as")
        && stmt.kw(i + 3, "transaction")
    {
        let m = modes(stmt, i + 4)?;
        let mut effects = Vec::new();
        let mut push = |name: &str, value: &str| {
            effects.push(SessionEffect::Set {
                name: name.to_owned(),
                value: value.to_owned(),
                local: false,
            })
        };
        if let Some(level) = m.isolation {
            push("default_transaction_isolation", &format!("'{}'", level.as_str()));
        }
        if let Some(ro) = m.read_only {
            push("default_transaction_read_only", if ro { "on" } else { "off" });
        }
        if let Some(d) = m.deferrable {
            push("default_transaction_deferrable", if d { "on" } else { "off" });
        }
        return Some(with(effects));
    }
    if stmt.kw(i, "session") && stmt.kw(i + 1, "authorization") {
        let name = "session_authorization".to_owned();
        return Some(with(pinning(
            set_or_reset(name, stmt, i + 2, local),
            PinReason::SessionAuthorization,
            local,
        )));
    }
    if stmt.kw(i, "role") {
        let effect = if stmt.toks.len() == i + 2 && stmt.kw(i + 1, "none") {
            SessionEffect::Reset {
                name: "role".to_owned(),
            }
        } else {
            set_or_reset("role".to_owned(), stmt, i + 1, local)
        };
        return Some(with(pinning(effect, PinReason::SetRole, local)));
    }
    if stmt.kw(i, "constraints") {
        // Scoped to the current transaction: nothing to carry.
        return Some(StmtClass::read());
    }
    let (name, value_at) = if stmt.kw(i, "time") && stmt.kw(i + 1, "zone") {
        if stmt.kw(i + 2, "interval") {
            return Some(with(vec![SessionEffect::Pin(PinReason::UntrackableSet)]));
        }
        ("timezone".to_owned(), i + 2)
    } else if stmt.kw(i, "schema") {
        ("search_path".to_owned(), i + 1)
    } else if stmt.kw(i, "names") {
        ("client_encoding".to_owned(), i + 1)
    } else if stmt.kw(i, "xml") && stmt.kw(i + 1, "option") {
        ("xmloption".to_owned(), i + 2)
    } else {
        let (name, j) = stmt.name_at(i)?;
        if stmt.kw(j, "from") && stmt.kw(j + 1, "current") && stmt.toks.len() == j + 2 {
            return Some(StmtClass::read());
        }
        if !(stmt.kw(j, "to") || stmt.punct(j, b'=')) {
            return None;
        }
        (name, j + 1)
    };
    if matches!(
        name.as_str(),
        "transaction_read_only" | "transaction_isolation" | "transaction_deferrable"
    ) {
        let value = value_text(stmt, value_at);
        let read_only = value
            .as_deref()
            .filter(|_| name == "transaction_read_only")
            .and_then(|v| parse_bool(v.trim_matches('\'').to_ascii_lowercase().as_str()));
        let isolation = value
            .as_deref()
            .filter(|_| name == "transaction_isolation")
            .and_then(Isolation::parse);
        return Some(transaction(read_only, isolation));
    }
    Some(with(vec![set_or_reset(name, stmt, value_at, local)]))
}

/// SET ROLE / SESSION AUTHORIZATION: a tracked value plus a pin (a reset unpins); the LOCAL
/// form lasts only for the transaction, which is pinned anyway.
fn pinning(effect: SessionEffect, reason: PinReason, local: bool) -> Vec<SessionEffect> {
    match effect {
        _ if local => vec![effect],
        SessionEffect::Reset { .. } => vec![effect, SessionEffect::Unpin(reason)],
        _ => vec![effect, SessionEffect::Pin(reason)],
    }
}

fn transaction(read_only: Option<bool>, isolation: Option<Isolation>) -> StmtClass {
    let mut class = if read_only == Some(false) {
        StmtClass::write(
            WriteReason::SetTransactionReadWrite,
            crate::route::Tables::empty(),
            crate::route::Tables::empty(),
        )
    } else {
        StmtClass::read()
    };
    class.tx = Some(TxControl::SetTransaction { read_only, isolation });
    class
}

/// `RESET name | ALL | TIME ZONE | ROLE | SESSION AUTHORIZATION | TRANSACTION ISOLATION LEVEL`.
pub(crate) fn reset(stmt: &Stmt<'_>) -> Option<StmtClass> {
    let n = stmt.toks.len();
    let effects = if stmt.kw(1, "all") && n == 2 {
        vec![SessionEffect::ResetAll, SessionEffect::Unpin(PinReason::UntrackableSet)]
    } else if stmt.kw(1, "time") && stmt.kw(2, "zone") && n == 3 {
        vec![SessionEffect::Reset {
            name: "timezone".to_owned(),
        }]
    } else if stmt.kw(1, "session") && stmt.kw(2, "authorization") && n == 3 {
        let name = "session_authorization".to_owned();
        vec![
            SessionEffect::Reset { name },
            SessionEffect::Unpin(PinReason::SessionAuthorization),
        ]
    } else if stmt.kw(1, "transaction") && stmt.kw(2, "isolation") && stmt.kw(3, "level") && n == 4 {
        Vec::new()
    } else {
        let (name, j) = stmt.name_at(1)?;
        if j != n {
            return None;
        }
        if name == "role" {
            vec![SessionEffect::Reset { name }, SessionEffect::Unpin(PinReason::SetRole)]
        } else {
            vec![SessionEffect::Reset { name }]
        }
    };
    Some(with(effects))
}

/// `DISCARD ALL | PLANS | SEQUENCES | TEMP | TEMPORARY`.
pub(crate) fn discard(stmt: &Stmt<'_>) -> Option<StmtClass> {
    if stmt.toks.len() != 2 {
        return None;
    }
    let effects = if stmt.kw(1, "all") {
        let mut v = vec![SessionEffect::DiscardAll];
        v.extend(
            PinReason::DISCARDED_BY_DISCARD_ALL
                .into_iter()
                .map(SessionEffect::Unpin),
        );
        v
    } else if stmt.kw(1, "plans") {
        vec![SessionEffect::DiscardPlans]
    } else if stmt.kw(1, "sequences") {
        vec![SessionEffect::DiscardSequences]
    } else if stmt.kw(1, "temp") || stmt.kw(1, "temporary") {
        vec![SessionEffect::DiscardTemp, SessionEffect::Unpin(PinReason::TempTable)]
    } else {
        return None;
    };
    Some(with(effects))
}

/// `DEALLOCATE [PREPARE] name | ALL`.
pub(crate) fn deallocate(stmt: &Stmt<'_>) -> Option<StmtClass> {
    let i = if stmt.kw(1, "prepare") && stmt.toks.len() == 3 {
        2
    } else {
        1
    };
    if stmt.kw(i, "all") && stmt.toks.len() == i + 1 {
        return Some(with(vec![
            SessionEffect::Deallocate { name: None },
            SessionEffect::Unpin(PinReason::SqlPrepare),
        ]));
    }
    Some(with(vec![SessionEffect::Deallocate {
        name: Some(last_name(stmt, i)?),
    }]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_for_set_config() {
        assert_eq!(value_sql("timezone", "UTC").as_deref(), Some("'UTC'"));
        assert_eq!(value_sql("app.x", "it's").as_deref(), Some("'it''s'"));
        assert_eq!(value_sql("app.x", "a\\b").as_deref(), Some("E'a\\\\b'"));
        assert_eq!(
            value_sql("search_path", "\"$user\", Public").as_deref(),
            Some("\"$user\", \"public\"")
        );
        assert_eq!(value_sql("search_path", "").as_deref(), Some("''"));
        assert_eq!(value_sql("search_path", "a; drop table t").as_deref(), None);
        assert_eq!(value_sql("search_path", "a,").as_deref(), None);
        assert_eq!(value_sql("x", "\0"), None);
    }

    #[test]
    fn bools() {
        assert_eq!(parse_bool("on"), Some(true));
        assert_eq!(parse_bool("off"), Some(false));
        assert_eq!(parse_bool("maybe"), None);
    }
}
