//! The functions a database's catalog marks `VOLATILE` (`pg_proc.provolatile = 'v'`), and the
//! short list of volatile built-ins that are reads all the same.
//!
//! PostgreSQL lets only a volatile function write: a `STABLE` or `IMMUTABLE` one runs in a
//! read-only snapshot and cannot. So once the catalog is known, a call of a volatile function
//! is the text-level sign of a write that needs no configuration (a user's PL/pgSQL function
//! that inserts is volatile unless its author said otherwise). Overloads are merged by name:
//! the text does not say which overload a call resolves to, so a name is volatile if any of
//! its overloads is.

use std::collections::HashSet;

/// Volatile built-ins that write nothing and run on a standby, so that reports, health checks
/// and monitoring queries calling them still go to replicas. Matched on unqualified and
/// `pg_catalog.`-qualified calls only: `app.random()` is the user's own function. Each is
/// documented with its reason in docs/routing.md ("How function calls are classified").
const READ_SAFE: &[(&str, bool)] = &[
    // New random values each call: volatile for that reason alone.
    ("random", false),
    ("random_normal", false),
    ("gen_random_uuid", false),
    ("uuid_generate_v1", false),
    ("uuid_generate_v1mc", false),
    ("uuid_generate_v4", false),
    // The wall clock, read during the statement.
    ("clock_timestamp", false),
    ("timeofday", false),
    // Waits, and nothing else.
    ("pg_sleep", false),
    ("pg_sleep_for", false),
    ("pg_sleep_until", false),
    // Replication state: health checks ask a standby these on purpose.
    ("pg_is_in_recovery", false),
    ("pg_last_wal_receive_lsn", false),
    ("pg_last_wal_replay_lsn", false),
    ("pg_last_xact_replay_timestamp", false),
    ("pg_is_wal_replay_paused", false),
    ("pg_get_wal_replay_pause_state", false),
    // Sizes on disk, for monitoring: they read file sizes.
    ("pg_database_size", false),
    ("pg_tablespace_size", false),
    ("pg_relation_size", false),
    ("pg_table_size", false),
    ("pg_indexes_size", false),
    ("pg_total_relation_size", false),
    // Statistics counters in shared memory (pg_stat_reset* is a write rule of its own).
    ("pg_stat_get_", true),
];

/// Whether a volatile call named `bare` (schema `schema`, if written) is a read all the same.
fn read_safe(schema: Option<&str>, bare: &str) -> bool {
    matches!(schema, None | Some("pg_catalog"))
        && READ_SAFE
            .iter()
            .any(|(name, prefix)| if *prefix { bare.starts_with(name) } else { bare == *name })
}

/// The volatile functions of one database, by name as the catalog spells it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct VolatileSet {
    /// `proname` of every volatile function, in any schema.
    bare: HashSet<String>,
    /// `nspname.proname` of the same.
    qualified: HashSet<String>,
}

impl VolatileSet {
    /// From `(schema, name)` rows of the catalog.
    pub fn from_rows<I: IntoIterator<Item = (String, String)>>(rows: I) -> Self {
        let mut set = VolatileSet::default();
        for (schema, name) in rows {
            set.qualified.insert(format!("{schema}.{name}"));
            set.bare.insert(name);
        }
        set
    }

    /// Number of distinct qualified names (for logs).
    pub fn len(&self) -> usize {
        self.qualified.len()
    }

    pub fn is_empty(&self) -> bool {
        self.qualified.is_empty()
    }

    /// Whether a call written as `schema.bare` (or `bare`) makes a statement a write: the
    /// function is volatile and not a read-safe built-in. An unqualified name matches a
    /// volatile function of any schema (search_path is not known here), so it errs on the
    /// side of the primary.
    pub(crate) fn writes(&self, schema: Option<&str>, bare: &str) -> bool {
        let volatile = match schema {
            Some(schema) => self.qualified.contains(&format!("{schema}.{bare}")),
            None => self.bare.contains(bare),
        };
        volatile && !read_safe(schema, bare)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(rows: &[(&str, &str)]) -> VolatileSet {
        VolatileSet::from_rows(rows.iter().map(|(s, n)| (s.to_string(), n.to_string())))
    }

    #[test]
    fn qualified_calls_match_their_schema_and_bare_calls_any() {
        let set = set(&[("app", "log_event"), ("pg_catalog", "random")]);
        assert!(set.writes(Some("app"), "log_event"));
        assert!(set.writes(None, "log_event"));
        assert!(!set.writes(Some("other"), "log_event"));
        assert!(!set.writes(None, "lower"));
    }

    #[test]
    fn read_safe_built_ins_only_when_unqualified_or_in_pg_catalog() {
        let set = set(&[
            ("pg_catalog", "random"),
            ("app", "random"),
            ("pg_catalog", "pg_stat_get_activity"),
        ]);
        assert!(!set.writes(None, "random"));
        assert!(!set.writes(Some("pg_catalog"), "random"));
        assert!(set.writes(Some("app"), "random"));
        assert!(!set.writes(None, "pg_stat_get_activity"));
    }
}
