//! Typed, read-only views over message bodies: only the fields pgrelay needs to route,
//! track state or rewrite, read in place from the original bytes.
//!
//! SQL text, statement and portal names, and the texts of errors are bytes in the
//! session's client encoding, which need not be UTF-8: they are views of bytes, never
//! decoded. Only what the protocol keeps ASCII (command tags, SQLSTATEs, severities,
//! parameter names) is read as text.

use super::{ProtocolError, TxStatus};

/// Splits a NUL-terminated string off the front of `buf`.
pub fn read_cstr<'a>(buf: &'a [u8], what: &'static str) -> Result<(&'a [u8], &'a [u8]), ProtocolError> {
    let end = buf.iter().position(|&b| b == 0).ok_or(ProtocolError::Malformed(what))?;
    Ok((&buf[..end], &buf[end + 1..]))
}

/// Splits a NUL-terminated UTF-8 string off the front of `buf`.
fn read_str<'a>(buf: &'a [u8], what: &'static str) -> Result<(&'a str, &'a [u8]), ProtocolError> {
    let (bytes, rest) = read_cstr(buf, what)?;
    let text = std::str::from_utf8(bytes).map_err(|_| ProtocolError::Malformed(what))?;
    Ok((text, rest))
}

/// The SQL text of a simple Query message.
pub fn query_text(body: &[u8]) -> Result<&[u8], ProtocolError> {
    Ok(read_cstr(body, "Query")?.0)
}

/// A Parse message: statement name, SQL text and the raw parameter type list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParseView<'a> {
    pub name: &'a [u8],
    pub query: &'a [u8],
    /// Int16 count followed by that many Int32 type OIDs, as sent.
    pub param_types: &'a [u8],
}

impl<'a> ParseView<'a> {
    pub fn read(body: &'a [u8]) -> Result<Self, ProtocolError> {
        let (name, rest) = read_cstr(body, "Parse")?;
        let (query, param_types) = read_cstr(rest, "Parse")?;
        let count = param_types
            .get(..2)
            .map(|b| i16::from_be_bytes([b[0], b[1]]))
            .ok_or(ProtocolError::Malformed("Parse"))?;
        if count < 0 || param_types.len() != 2 + 4 * count as usize {
            return Err(ProtocolError::Malformed("Parse"));
        }
        Ok(Self {
            name,
            query,
            param_types,
        })
    }
}

/// A Bind message's names; the parameter values after them are left untouched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BindView<'a> {
    pub portal: &'a [u8],
    pub statement: &'a [u8],
    /// Everything after the statement name.
    pub rest: &'a [u8],
}

impl<'a> BindView<'a> {
    pub fn read(body: &'a [u8]) -> Result<Self, ProtocolError> {
        let (portal, rest) = read_cstr(body, "Bind")?;
        let (statement, rest) = read_cstr(rest, "Bind")?;
        Ok(Self {
            portal,
            statement,
            rest,
        })
    }
}

/// Whether a Describe or Close names a prepared statement or a portal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    Statement,
    Portal,
}

/// A Describe or Close message: what kind of object and its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectRef<'a> {
    pub kind: ObjectKind,
    pub name: &'a [u8],
}

impl<'a> ObjectRef<'a> {
    pub fn read(body: &'a [u8]) -> Result<Self, ProtocolError> {
        let (&kind, rest) = body.split_first().ok_or(ProtocolError::Malformed("Describe/Close"))?;
        let kind = match kind {
            b'S' => ObjectKind::Statement,
            b'P' => ObjectKind::Portal,
            _ => return Err(ProtocolError::Malformed("Describe/Close")),
        };
        let (name, rest) = read_cstr(rest, "Describe/Close")?;
        if !rest.is_empty() {
            return Err(ProtocolError::Malformed("Describe/Close"));
        }
        Ok(Self { kind, name })
    }
}

/// The transaction status byte of ReadyForQuery.
pub fn ready_status(body: &[u8]) -> Result<TxStatus, ProtocolError> {
    match body {
        [byte] => TxStatus::from_byte(*byte).ok_or(ProtocolError::Malformed("ReadyForQuery")),
        _ => Err(ProtocolError::Malformed("ReadyForQuery")),
    }
}

/// Name and value of a ParameterStatus message.
pub fn parameter_status(body: &[u8]) -> Result<(&str, &str), ProtocolError> {
    let (name, rest) = read_str(body, "ParameterStatus")?;
    let (value, _) = read_str(rest, "ParameterStatus")?;
    Ok((name, value))
}

/// The command tag of CommandComplete, e.g. "INSERT 0 1".
pub fn command_tag(body: &[u8]) -> Result<&str, ProtocolError> {
    Ok(read_str(body, "CommandComplete")?.0)
}

/// The fields of an ErrorResponse or NoticeResponse that pgrelay looks at. A server
/// may omit any field; missing ones read as empty, as do a severity or SQLSTATE that are
/// not ASCII (they always are).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ErrorFields<'a> {
    /// Non-localized severity (field 'V'), or the localized one ('S') from old servers.
    pub severity: &'a str,
    pub code: &'a str,
    /// In the session's client encoding, and passed on as it is.
    pub message: &'a [u8],
    /// The server function that raised it (field 'R'): names the cause whatever the
    /// server's `lc_messages`.
    pub routine: &'a str,
}

impl<'a> ErrorFields<'a> {
    pub fn read(body: &'a [u8]) -> Result<Self, ProtocolError> {
        let mut fields = ErrorFields::default();
        let mut rest = body;
        while let Some((&field, after)) = rest.split_first() {
            if field == 0 {
                return Ok(fields);
            }
            let (value, after) = read_cstr(after, "ErrorResponse")?;
            let ascii = || std::str::from_utf8(value).ok().filter(|text| text.is_ascii());
            match field {
                b'V' => fields.severity = ascii().unwrap_or_default(),
                b'S' if fields.severity.is_empty() => fields.severity = ascii().unwrap_or_default(),
                b'C' => fields.code = ascii().unwrap_or_default(),
                b'M' => fields.message = value,
                b'R' => fields.routine = ascii().unwrap_or_default(),
                _ => {}
            }
            rest = after;
        }
        Err(ProtocolError::Malformed("ErrorResponse"))
    }

    /// FATAL and PANIC mean the server is closing the connection.
    pub fn is_fatal(&self) -> bool {
        matches!(self.severity, "FATAL" | "PANIC")
    }
}

/// The code of an Authentication request and what follows it.
pub fn auth_request(body: &[u8]) -> Result<(i32, &[u8]), ProtocolError> {
    let code = body
        .get(..4)
        .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or(ProtocolError::Malformed("Authentication"))?;
    Ok((code, &body[4..]))
}

/// Process id and secret of BackendKeyData.
pub fn backend_key(body: &[u8]) -> Result<(u32, &[u8]), ProtocolError> {
    match body.get(..4) {
        Some(pid) if (8..=260).contains(&body.len()) => {
            Ok((u32::from_be_bytes([pid[0], pid[1], pid[2], pid[3]]), &body[4..]))
        }
        _ => Err(ProtocolError::Malformed("BackendKeyData")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn reads_parse_bind_and_describe() {
        let parse = ParseView::read(b"s1\0SELECT $1\0\0\x01\0\0\0\x17").unwrap();
        assert_eq!((parse.name, parse.query), (&b"s1"[..], &b"SELECT $1"[..]));
        assert!(ParseView::read(b"s1\0SELECT $1\0\0\x02\0\0\0\x17").is_err());
        let bind = BindView::read(b"p\0s1\0\0\0").unwrap();
        assert_eq!(
            (bind.portal, bind.statement, bind.rest),
            (&b"p"[..], &b"s1"[..], &b"\0\0"[..])
        );
        let describe = ObjectRef::read(b"Ss1\0").unwrap();
        assert_eq!(
            describe,
            ObjectRef {
                kind: ObjectKind::Statement,
                name: b"s1"
            }
        );
        assert!(ObjectRef::read(b"Xs1\0").is_err());
    }

    #[test]
    fn reads_error_fields_even_without_sqlstate() {
        let fields = ErrorFields::read(b"SERROR\0VERROR\0C42P01\0Mno such table\0\0").unwrap();
        assert_eq!(fields.code, "42P01");
        assert_eq!(fields.message, b"no such table");
        assert!(!fields.is_fatal());
        let bare = ErrorFields::read(b"SFATAL\0Mgone\0\0").unwrap();
        assert_eq!(bare.code, "");
        assert!(bare.is_fatal());
        assert!(ErrorFields::read(b"SFATAL\0Mgone").is_err());
    }

    #[test]
    fn text_in_any_client_encoding_is_read_as_bytes() {
        // SJIS 表 (0x95 0x5C) and LATIN9 € (0xA4): not UTF-8, still whole messages.
        assert_eq!(query_text(b"SELECT '\x95\x5c'\0").unwrap(), b"SELECT '\x95\x5c'");
        let parse = ParseView::read(b"caf\xe9\0SELECT '\xa4'\0\0\0").unwrap();
        assert_eq!((parse.name, parse.query), (&b"caf\xe9"[..], &b"SELECT '\xa4'"[..]));
        let bind = BindView::read(b"\0caf\xe9\0\0\0").unwrap();
        assert_eq!(bind.statement, b"caf\xe9");
        assert_eq!(ObjectRef::read(b"Scaf\xe9\0").unwrap().name, b"caf\xe9");
        let fatal = ErrorFields::read(b"SFATAL\0VFATAL\0C57P01\0Mabgebrochen: \xe4\0\0").unwrap();
        assert!(fatal.is_fatal());
        assert_eq!((fatal.code, fatal.message), ("57P01", &b"abgebrochen: \xe4"[..]));
        let odd = ErrorFields::read(b"S\xe4\0C\xe4\0\0").unwrap();
        assert_eq!((odd.severity, odd.code), ("", ""));
    }

    proptest! {
        #[test]
        fn views_never_panic(body in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = query_text(&body);
            let _ = ParseView::read(&body);
            let _ = BindView::read(&body);
            let _ = ObjectRef::read(&body);
            let _ = ready_status(&body);
            let _ = parameter_status(&body);
            let _ = ErrorFields::read(&body);
            let _ = auth_request(&body);
            let _ = backend_key(&body);
            let _ = command_tag(&body);
        }
    }
}
