//! PostgreSQL's client encodings, by every name the server accepts for them, and what each
//! means for reading a client's SQL text byte by byte.
//!
//! SQL text reaches pgrelay as bytes in the client's encoding; the server converts it to its
//! own encoding only after pgrelay has routed it. Whether pgrelay can read those bytes depends
//! on the encoding: in UTF-8 and in every encoding a server may use itself, a byte below 0x80
//! is always that ASCII character, so quotes, semicolons and keywords are where they seem.
//! The client-only encodings (SJIS, SHIFT_JIS_2004, BIG5, GBK, UHC, GB18030, JOHAB) are
//! client-only for exactly the reason that their two-byte characters may end in an ASCII
//! byte: `表` is 0x95 0x5C in SJIS, the second byte a backslash. Text in them is not read.

/// How the bytes of SQL text in a client's encoding may be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Charset {
    /// UTF8: the text is UTF-8 (the server refuses it otherwise).
    Utf8,
    /// An encoding other than UTF8 that a server may use (LATIN1…10, WIN125x, KOI8, EUC_*,
    /// MULE_INTERNAL, SQL_ASCII…): bytes below 0x80 are ASCII, bytes from 0x80 on only ever
    /// belong to other characters.
    AsciiCompatible,
    /// A client-only encoding, or one pgrelay does not know: an ASCII byte after the first
    /// non-ASCII one may be half of another character.
    Opaque,
}

impl Charset {
    /// Whether every ASCII byte of `text` is the ASCII character it looks like, and the
    /// text is one the server takes (UTF-8 in a UTF8 session).
    pub fn reads(self, text: &[u8]) -> bool {
        match self {
            Charset::Utf8 => std::str::from_utf8(text).is_ok(),
            Charset::AsciiCompatible => true,
            Charset::Opaque => text.is_ascii(),
        }
    }
}

/// What pgrelay knows of the encoding a client's text is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientEncoding {
    /// The server's name for it (`UTF8`, `EUC_JP`); `None` when unknown, or while a
    /// statement that may change it has not finished.
    pub name: Option<&'static str>,
    pub charset: Charset,
}

impl Default for ClientEncoding {
    fn default() -> Self {
        ClientEncoding::UNKNOWN
    }
}

impl ClientEncoding {
    /// Nothing known: only ASCII text is read.
    pub const UNKNOWN: ClientEncoding = ClientEncoding {
        name: None,
        charset: Charset::Opaque,
    };

    pub const UTF8: ClientEncoding = ClientEncoding {
        name: Some("UTF8"),
        charset: Charset::Utf8,
    };

    /// The encoding a `client_encoding` setting names, spelt any way PostgreSQL accepts
    /// (`utf-8`, `'Latin9'`, `ShiftJIS`); unknown for a name it does not know.
    pub fn named(setting: &str) -> ClientEncoding {
        match canonical(setting) {
            Some(name) => ClientEncoding {
                name: Some(name),
                charset: charset(name),
            },
            None => ClientEncoding::UNKNOWN,
        }
    }
}

/// Every name PostgreSQL takes for an encoding, as its lookup compares them (ASCII letters
/// and digits only, lower-cased), with the name the server reports for it: PostgreSQL's
/// own list (src/common/encnames.c).
const NAMES: &[(&str, &str)] = &[
    ("abc", "WIN1258"),
    ("alt", "WIN866"),
    ("big5", "BIG5"),
    ("euccn", "EUC_CN"),
    ("eucjis2004", "EUC_JIS_2004"),
    ("eucjp", "EUC_JP"),
    ("euckr", "EUC_KR"),
    ("euctw", "EUC_TW"),
    ("gb18030", "GB18030"),
    ("gbk", "GBK"),
    ("iso88591", "LATIN1"),
    ("iso885910", "LATIN6"),
    ("iso885913", "LATIN7"),
    ("iso885914", "LATIN8"),
    ("iso885915", "LATIN9"),
    ("iso885916", "LATIN10"),
    ("iso88592", "LATIN2"),
    ("iso88593", "LATIN3"),
    ("iso88594", "LATIN4"),
    ("iso88595", "ISO_8859_5"),
    ("iso88596", "ISO_8859_6"),
    ("iso88597", "ISO_8859_7"),
    ("iso88598", "ISO_8859_8"),
    ("iso88599", "LATIN5"),
    ("johab", "JOHAB"),
    ("koi8", "KOI8R"),
    ("koi8r", "KOI8R"),
    ("koi8u", "KOI8U"),
    ("latin1", "LATIN1"),
    ("latin10", "LATIN10"),
    ("latin2", "LATIN2"),
    ("latin3", "LATIN3"),
    ("latin4", "LATIN4"),
    ("latin5", "LATIN5"),
    ("latin6", "LATIN6"),
    ("latin7", "LATIN7"),
    ("latin8", "LATIN8"),
    ("latin9", "LATIN9"),
    ("mskanji", "SJIS"),
    ("muleinternal", "MULE_INTERNAL"),
    ("shiftjis", "SJIS"),
    ("shiftjis2004", "SHIFT_JIS_2004"),
    ("sjis", "SJIS"),
    ("sqlascii", "SQL_ASCII"),
    ("tcvn", "WIN1258"),
    ("tcvn5712", "WIN1258"),
    ("uhc", "UHC"),
    ("unicode", "UTF8"),
    ("utf8", "UTF8"),
    ("vscii", "WIN1258"),
    ("win", "WIN1251"),
    ("win1250", "WIN1250"),
    ("win1251", "WIN1251"),
    ("win1252", "WIN1252"),
    ("win1253", "WIN1253"),
    ("win1254", "WIN1254"),
    ("win1255", "WIN1255"),
    ("win1256", "WIN1256"),
    ("win1257", "WIN1257"),
    ("win1258", "WIN1258"),
    ("win866", "WIN866"),
    ("win874", "WIN874"),
    ("win932", "SJIS"),
    ("win936", "GBK"),
    ("win949", "UHC"),
    ("win950", "BIG5"),
    ("windows1250", "WIN1250"),
    ("windows1251", "WIN1251"),
    ("windows1252", "WIN1252"),
    ("windows1253", "WIN1253"),
    ("windows1254", "WIN1254"),
    ("windows1255", "WIN1255"),
    ("windows1256", "WIN1256"),
    ("windows1257", "WIN1257"),
    ("windows1258", "WIN1258"),
    ("windows866", "WIN866"),
    ("windows874", "WIN874"),
    ("windows932", "SJIS"),
    ("windows936", "GBK"),
    ("windows949", "UHC"),
    ("windows950", "BIG5"),
];

/// The encodings a server never uses, because their characters may hide ASCII bytes.
const CLIENT_ONLY: &[&str] = &["SJIS", "SHIFT_JIS_2004", "BIG5", "GBK", "UHC", "GB18030", "JOHAB"];

/// Longer names are refused by PostgreSQL before any lookup (NAMEDATALEN).
const MAX_NAME_LEN: usize = 63;

/// The server's name for the encoding called `name`, looked up as PostgreSQL does: only
/// ASCII letters and digits count, in any case. Quotes around a value as written in a SET
/// (`'latin9'`) are dropped by the same rule.
pub fn canonical(name: &str) -> Option<&'static str> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return None;
    }
    // Looked up for every statement a client sends: no allocation.
    let mut key = [0u8; MAX_NAME_LEN];
    let mut len = 0;
    for byte in name.bytes().filter(u8::is_ascii_alphanumeric) {
        key[len] = byte.to_ascii_lowercase();
        len += 1;
    }
    let key = &key[..len];
    NAMES
        .binary_search_by(|(alias, _)| alias.as_bytes().cmp(key))
        .ok()
        .map(|at| NAMES[at].1)
}

/// How text in the encoding the server calls `name` is read.
fn charset(name: &str) -> Charset {
    if name == "UTF8" {
        Charset::Utf8
    } else if CLIENT_ONLY.contains(&name) {
        Charset::Opaque
    } else {
        Charset::AsciiCompatible
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_sorted_for_the_lookup() {
        assert!(NAMES.windows(2).all(|pair| pair[0].0 < pair[1].0));
        for (alias, name) in NAMES {
            assert_eq!(canonical(name), Some(*name), "{alias}: its canonical name names it too");
        }
    }

    #[test]
    fn any_spelling_postgresql_accepts_finds_the_encoding() {
        for (spelling, name) in [
            ("utf-8", "UTF8"),
            ("utf_8", "UTF8"),
            ("Unicode", "UTF8"),
            ("'UTF8'", "UTF8"),
            ("euc-jp", "EUC_JP"),
            ("ISO-8859-15", "LATIN9"),
            ("iso_8859_5", "ISO_8859_5"),
            ("Shift_JIS", "SJIS"),
            ("MS Kanji", "SJIS"),
            ("windows-1252", "WIN1252"),
            ("cp936", ""),
            ("", ""),
            ("utf8utf8", ""),
        ] {
            assert_eq!(canonical(spelling).unwrap_or_default(), name, "{spelling}");
        }
        assert_eq!(
            canonical(&format!("{}utf8", "-".repeat(64))),
            None,
            "too long to be a name"
        );
    }

    #[test]
    fn only_server_encodings_are_read_past_their_first_non_ascii_byte() {
        assert_eq!(ClientEncoding::named("UTF8"), ClientEncoding::UTF8);
        for name in [
            "LATIN9",
            "WIN1252",
            "EUC_JP",
            "EUC_TW",
            "MULE_INTERNAL",
            "SQL_ASCII",
            "KOI8U",
        ] {
            assert_eq!(ClientEncoding::named(name).charset, Charset::AsciiCompatible, "{name}");
        }
        for name in [
            "SJIS",
            "mskanji",
            "SHIFT_JIS_2004",
            "BIG5",
            "GBK",
            "UHC",
            "GB18030",
            "JOHAB",
            "klingon",
        ] {
            assert_eq!(ClientEncoding::named(name).charset, Charset::Opaque, "{name}");
        }
        assert_eq!(ClientEncoding::named("klingon").name, None);
    }
}
