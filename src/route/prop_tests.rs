//! Property tests: classification never panics on any text, its facets stay consistent, reads
//! stay reads only while every statement of the text is one, and a leading hint changes nothing
//! but the hint.

use proptest::prelude::*;

use crate::route::table_tests::CASES;
use crate::route::{Access, Charset, Classification, Classifier, ClassifierSettings, Hint, Tables};

const CHARSETS: [Charset; 3] = [Charset::Utf8, Charset::AsciiCompatible, Charset::Opaque];

fn classifier() -> Classifier {
    Classifier::new(ClassifierSettings {
        cache_capacity: 64,
        ..ClassifierSettings::default()
    })
}

fn check_invariants(c: &Classifier, sql: &str) -> Classification {
    let class = c.classify_uncached(sql);
    assert_eq!(
        class.access == Access::Read,
        class.write_reason.is_none(),
        "{sql:?}: {class:?}"
    );
    assert!(class.parsed || class.access == Access::Write, "{sql:?}: {class:?}");
    if class.access == Access::Read {
        assert_eq!(class.written_tables, Tables::empty(), "{sql:?}");
    }
    assert_eq!(*c.classify(sql), class, "{sql:?}");
    class
}

/// Fragments that exercise every lexer state and keyword path.
#[rustfmt::skip]
const FRAGMENTS: &[&str] = &[
    "SELECT", "INSERT", "UPDATE", "DELETE", "MERGE", "FROM", "WHERE", "FOR", "NO", "KEY", "SHARE", "INTO", "TEMP",
    "WITH", "RECURSIVE", "AS", "(", ")", ";", ",", "'", "''", "'x'", "\"", "\"q\"", "$$", "$a$", "$1", "--", "\n",
    "/*", "*/", "E'\\'", "'\\'", "U&'", "BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "SET", "LOCAL", "SESSION", "TO",
    "=", "nextval", "('s')", "set_config", "('a','b',false)", "pg_advisory_lock", "t", "u", "1", "EXPLAIN", "ANALYZE",
    "COPY", "STDOUT", "STDIN", "DECLARE", "CURSOR", "HOLD", "PREPARE", "EXECUTE", "LISTEN", "DISCARD", "ALL", "TABLE",
    "VALUES", "ONLY", "CREATE", "FUNCTION", "ATOMIC", "END", "CASE", "*", "::", ".", "+", "-", "[", "]", "é", "\u{0}",
    "pgrelay: replica", "TRANSACTION", "READ", "WRITE", "TIME", "ZONE", "ROLE", "DEFAULT", "RESET", "DO", "CALL",
];

fn soup() -> impl Strategy<Value = String> {
    prop::collection::vec((prop::sample::select(FRAGMENTS), prop::bool::ANY), 0..40).prop_map(|parts| {
        parts.into_iter().fold(String::new(), |mut s, (frag, glue)| {
            if !glue {
                s.push(' ');
            }
            s.push_str(frag);
            s
        })
    })
}

fn reads() -> Vec<&'static str> {
    CASES
        .iter()
        .filter(|(_, e)| {
            *e == "R"
                || (e.starts_with("R ")
                    && !e.contains(" s=")
                    && !e.contains("tx=")
                    && !e.contains(" n=")
                    && !e.contains("hint"))
        })
        .map(|(s, _)| *s)
        .collect()
}

const WRITES: &[&str] = &[
    "UPDATE t SET x = 1",
    "SELECT * FROM t FOR NO KEY UPDATE",
    "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
    "SELECT nextval('s')",
    "SELECT 1 INTO TEMP x",
    "COPY t FROM STDIN",
    "DO $$ BEGIN NULL; END $$",
    "EXPLAIN ANALYZE DELETE FROM t",
    "LOCK t",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn never_panics_on_any_text(sql in "\\PC{0,300}") {
        check_invariants(&classifier(), &sql);
    }

    #[test]
    fn never_panics_on_sql_like_soup(sql in soup()) {
        check_invariants(&classifier(), &sql);
    }

    #[test]
    fn never_panics_on_bytes_as_text(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        check_invariants(&classifier(), &String::from_utf8_lossy(&bytes));
    }

    /// Known reads joined with one known write, with comments and blanks in between, is a write.
    #[test]
    fn one_write_makes_the_text_a_write(
        picks in prop::collection::vec(any::<prop::sample::Index>(), 0..4),
        write in prop::sample::select(WRITES),
        at in any::<prop::sample::Index>(),
        sep in prop::sample::select(&[";", ";\n", " ; -- x\n", ";/* ; */", "; "][..]),
    ) {
        let reads = reads();
        let mut parts: Vec<&str> = picks.iter().map(|i| reads[i.index(reads.len())].trim_end_matches(';')).collect();
        parts.insert(at.index(parts.len() + 1), write);
        let sql = parts.join(sep);
        let class = check_invariants(&classifier(), &sql);
        prop_assert_eq!(class.access, Access::Write, "{}", sql);
        prop_assert_eq!(class.statements, parts.len());
    }

    /// Known reads joined together stay a read.
    #[test]
    fn reads_joined_stay_a_read(picks in prop::collection::vec(any::<prop::sample::Index>(), 1..5)) {
        let reads = reads();
        let sql = picks.iter().map(|i| reads[i.index(reads.len())].trim_end_matches(';')).collect::<Vec<_>>().join(";\n");
        let class = check_invariants(&classifier(), &sql);
        prop_assert_eq!(class.access, Access::Read, "{}", sql);
    }

    /// Bytes in any client encoding: classified without panicking, consistently, the same
    /// from the cache.
    #[test]
    fn never_panics_on_bytes_in_any_encoding(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let c = classifier();
        for charset in CHARSETS {
            let class = c.classify_text(&bytes, charset);
            prop_assert_eq!(class.access == Access::Read, class.write_reason.is_none());
            prop_assert!(class.parsed || class.access == Access::Write);
            prop_assert_eq!(&*c.classify_text(&bytes, charset), &*class);
        }
    }

    /// ASCII text means the same in every client encoding.
    #[test]
    fn ascii_reads_alike_in_every_encoding(sql in soup()) {
        prop_assume!(sql.is_ascii());
        let c = classifier();
        let utf8 = c.classify_uncached(&sql);
        for charset in CHARSETS {
            prop_assert_eq!(&*c.classify_text(sql.as_bytes(), charset), &utf8);
        }
    }

    /// A leading hint comment changes the hint and nothing else.
    #[test]
    fn hint_changes_only_the_hint(sql in soup()) {
        let c = classifier();
        let plain = c.classify_uncached(&sql);
        let mut hinted = c.classify_uncached(&format!("/* pgrelay: replica */ {sql}"));
        prop_assert_eq!(hinted.hint, Some(Hint::Replica));
        hinted.hint = plain.hint;
        prop_assert_eq!(hinted, plain);
    }
}
