//! How a client's SQL text, bytes in its client encoding, is read: as it is when it is ASCII
//! or UTF-8 in a UTF8 session; through a view that spells each non-ASCII byte as the
//! Latin-1 character of the same number in the other encodings where ASCII bytes are always
//! ASCII; and not past its first non-ASCII byte in the encodings whose characters may hide
//! ASCII bytes (see [`encoding`](crate::route::encoding)).

use crate::route::encoding::Charset;
use crate::route::{Access, Classification, PinReason, SessionEffect, Tables, WriteReason};

/// How one text is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reading<'a> {
    /// ASCII (the same in every client encoding), or UTF-8 in a UTF8 session: the text itself.
    Text(&'a str),
    /// Non-ASCII bytes in an ASCII-compatible encoding other than UTF8: read through
    /// [`latin1_view`], whose ASCII is the text's ASCII and whose other characters only
    /// ever extend words, strings and comments, as the text's characters do.
    Latin1View,
    /// Non-ASCII bytes in an encoding whose characters may hide ASCII bytes: only the first
    /// `readable` bytes (all ASCII, before any other character began) are known to mean what
    /// they look like.
    Unread { readable: usize },
    /// Not UTF-8 in a UTF8 session: the server refuses the text without running any of it.
    Invalid,
}

impl<'a> Reading<'a> {
    pub(crate) fn of(sql: &'a [u8], charset: Charset) -> Self {
        let first_non_ascii = sql.iter().position(|b| !b.is_ascii());
        match (first_non_ascii, charset) {
            (None, _) | (Some(_), Charset::Utf8) => match std::str::from_utf8(sql) {
                Ok(text) => Reading::Text(text),
                Err(_) => Reading::Invalid,
            },
            (Some(_), Charset::AsciiCompatible) => Reading::Latin1View,
            (Some(readable), Charset::Opaque) => Reading::Unread { readable },
        }
    }
}

/// The text with every byte as the character of the same number (ISO 8859-1). Lossless, and
/// an ASCII byte stays that ASCII character.
pub(crate) fn latin1_view(sql: &[u8]) -> String {
    sql.iter().map(|&byte| char::from(byte)).collect()
}

/// Keeps of a classification read through [`latin1_view`] what still holds outside it.
///
/// A name with a non-ASCII character is spelt in the client's encoding, which the server
/// converts to its own: it would not match the same table named by a client in another
/// encoding, so causal consistency could miss a write to it; such tables become `Unknown`.
/// A setting whose value has one cannot be re-applied on another server by pgrelay (its SQL
/// goes out in one message, decoded in whatever encoding that server is in): it pins the
/// client instead. Other names (cursors, channels, SQL-level statements) only ever meet
/// the same client's own names again and are kept.
pub(crate) fn keep_portable(class: &mut Classification) {
    for tables in [&mut class.tables, &mut class.written_tables] {
        if tables
            .names()
            .is_some_and(|names| names.iter().any(|name| !name.is_ascii()))
        {
            *tables = Tables::Unknown;
        }
    }
    for effect in &mut class.session {
        let untrackable = match effect {
            SessionEffect::Set {
                name,
                value,
                local: false,
            } => !name.is_ascii() || !value.is_ascii(),
            SessionEffect::Reset { name } => !name.is_ascii(),
            _ => false,
        };
        if untrackable {
            *effect = SessionEffect::Pin(PinReason::UntrackableSet);
        }
    }
}

/// A text that is not read: a write of any table (`Unparsed`), with no hint.
///
/// What it does to the session cannot be known either. `readable` is what its ASCII
/// beginning shows: if that holds a session effect (`SET search_path TO 日本`), or the rest
/// holds a semicolon that may start another statement, the client is pinned to its server,
/// which alone knows the outcome. A session effect of a function called after the first
/// non-ASCII character goes unseen, as does one inside any function's body.
pub(crate) fn unread(readable: &Classification, rest: &[u8]) -> Classification {
    let session = if !readable.session.is_empty() || rest.contains(&b';') {
        vec![SessionEffect::Pin(PinReason::UntrackableSet)]
    } else {
        Vec::new()
    };
    Classification {
        access: Access::Write,
        write_reason: Some(WriteReason::Unparsed),
        transaction: None,
        ends_transaction: false,
        session,
        tables: Tables::Unknown,
        written_tables: Tables::Unknown,
        hint: None,
        parsed: false,
        statements: readable.statements.max(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ascii_reads_the_same_in_every_encoding() {
        for charset in [Charset::Utf8, Charset::AsciiCompatible, Charset::Opaque] {
            assert_eq!(Reading::of(b"SELECT 1", charset), Reading::Text("SELECT 1"));
        }
    }

    #[test]
    fn other_bytes_are_read_as_the_encoding_allows() {
        let latin9 = b"SELECT 'foo\xa4bar'";
        assert_eq!(Reading::of(latin9, Charset::Utf8), Reading::Invalid);
        assert_eq!(Reading::of(latin9, Charset::AsciiCompatible), Reading::Latin1View);
        assert_eq!(Reading::of(latin9, Charset::Opaque), Reading::Unread { readable: 11 });
        let utf8 = "SELECT 'foo€bar'";
        assert_eq!(Reading::of(utf8.as_bytes(), Charset::Utf8), Reading::Text(utf8));
        assert_eq!(latin1_view(latin9), "SELECT 'foo\u{a4}bar'");
        assert_eq!(
            latin1_view(latin9).chars().map(|c| c as u32 as u8).collect::<Vec<_>>(),
            latin9
        );
    }
}
