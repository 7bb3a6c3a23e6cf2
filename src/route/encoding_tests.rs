//! Classification of text in every kind of client encoding: the same statements as bytes in
//! UTF-8, in ASCII-compatible encodings (LATIN9, WIN1252, EUC_JP) and in client-only ones
//! (SJIS), with the expected rendering of `table_tests::render`.

use crate::route::table_tests::render;
use crate::route::{Charset, Classifier, ClassifierSettings};

const UTF8: Charset = Charset::Utf8;
const ASCII_COMPATIBLE: Charset = Charset::AsciiCompatible;
const OPAQUE: Charset = Charset::Opaque;

/// (text, how its encoding reads, expected rendering).
#[rustfmt::skip]
const CASES: &[(&[u8], Charset, &str)] = &[
    // ASCII means the same in every encoding.
    (b"SELECT 1", OPAQUE, "R"),
    (b"SELECT * FROM t", ASCII_COMPATIBLE, "R t=t"),
    // LATIN9 / WIN1252 '\xa4' and '\x80' are the euro sign; EUC_JP 0xC9 0xBD is 表.
    (b"SELECT 'foo\xa4bar'", ASCII_COMPATIBLE, "R"),
    (b"SELECT 'foo\x80bar', 2", ASCII_COMPATIBLE, "R"),
    (b"SELECT * FROM t WHERE name = '\xc9\xbd'", ASCII_COMPATIBLE, "R t=t"),
    (b"/* pgrelay: primary */ SELECT '\xa4'", ASCII_COMPATIBLE, "R hint=primary"),
    (b"SELECT '\xa4'; DELETE FROM t", ASCII_COMPATIBLE, "W(dml) t=t w=t n=2"),
    // A name with other characters is the client's spelling, not the server's.
    (b"SELECT * FROM caf\xe9", ASCII_COMPATIBLE, "R t=?"),
    (b"INSERT INTO \"caf\xe9\" VALUES (1)", ASCII_COMPATIBLE, "W(dml) t=? w=?"),
    (b"SET application_name = 'caf\xe9'", ASCII_COMPATIBLE, "R s=pin(untrackable_set)"),
    (b"SET search_path = app -- caf\xe9", ASCII_COMPATIBLE, "R s=set(search_path=app)"),
    (b"PREPARE caf\xe9 AS SELECT 1", ASCII_COMPATIBLE, "R s=pin(sql_prepare);prepare(caf\u{e9})"),
    // SJIS 表 is 0x95 0x5C: its second byte is a backslash. Not read at all.
    (b"SELECT '\x95\x5c'", OPAQUE, "W(unparsed) t=? w=? unparsed"),
    (b"/* pgrelay: replica */ SELECT '\x95\x5c'", OPAQUE, "W(unparsed) t=? w=? unparsed"),
    (b"SELECT 1; SELECT '\x95\x5c'", OPAQUE, "W(unparsed) t=? w=? unparsed n=2"),
    // What its readable beginning shows of a session effect, or a semicolon after it, pins.
    (b"SET search_path TO \x93\xfa", OPAQUE, "W(unparsed) t=? w=? s=pin(untrackable_set) unparsed"),
    (b"SELECT '\x95\x5c'; SET search_path TO x", OPAQUE, "W(unparsed) t=? w=? s=pin(untrackable_set) unparsed"),
    // Not UTF-8 in a UTF8 session: the server refuses it.
    (b"SELECT 'foo\xa4bar'", UTF8, "W(unparsed) t=? w=? unparsed"),
    ("SELECT * FROM café WHERE x = '€'".as_bytes(), UTF8, "R t=café"),
];

fn classifier() -> Classifier {
    Classifier::new(ClassifierSettings {
        cache_capacity: 64,
        ..ClassifierSettings::default()
    })
}

#[test]
fn encodings_table() {
    let c = classifier();
    let mut failures = Vec::new();
    for (sql, charset, expected) in CASES {
        // Twice: the second answer comes from the cache.
        for _ in 0..2 {
            let got = render(&c.classify_text(sql, *charset));
            if got != *expected {
                failures.push(format!(
                    "{:?} as {charset:?}\n  expected {expected}\n  got      {got}",
                    String::from_utf8_lossy(sql)
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Why client-only encodings are not read: in SJIS the server sees `E'表'` (a string),
/// `'x'`, then a DELETE; a byte reader sees a backslash that escapes the quote after it,
/// and one long string hiding the DELETE.
#[test]
fn a_trail_byte_that_looks_like_a_backslash_would_hide_a_write() {
    let c = classifier();
    let sql = b"SELECT E'\x95\x5c', 'x'; DELETE FROM t --'";
    assert_eq!(render(&c.classify_text(sql, ASCII_COMPATIBLE)), "R", "the misreading");
    assert!(!c.classify_text(sql, OPAQUE).is_read());
}

#[test]
fn the_same_bytes_are_cached_apart_for_each_reading() {
    let c = classifier();
    // 'é' in UTF-8 is 'Ã©' in LATIN9: the same bytes, other tables.
    let sql = "SELECT * FROM é".as_bytes();
    assert_eq!(render(&c.classify_text(sql, UTF8)), "R t=é");
    assert_eq!(render(&c.classify_text(sql, ASCII_COMPATIBLE)), "R t=?");
    assert_eq!(render(&c.classify_text(sql, UTF8)), "R t=é");
    assert_eq!(render(&c.classify_text(sql, OPAQUE)), "W(unparsed) t=? w=? unparsed");
    let first = c.classify_text(sql, ASCII_COMPATIBLE);
    assert!(std::sync::Arc::ptr_eq(&first, &c.classify_text(sql, ASCII_COMPATIBLE)));
}
