//! Named prepared statements in transaction and statement mode.
//!
//! A client's statement names mean nothing on the server it happens to get next, so
//! pgrelay owns the server-side names: each (query text, parameter types) pair gets a
//! name derived from a hash of both, the same on every server connection. A client's
//! Parse maps its name to that statement; Bind and Describe are rewritten to the
//! server-side name, with a Parse injected first on a server that lacks it; a client's
//! Close only forgets its name, the server keeps the statement cached for others.
//!
//! A client's Parse always reaches a server, so it fails where it would fail on a
//! direct connection (a table its search_path does not see, an aborted transaction):
//! as the statement itself when the server lacks it, under a scratch name otherwise.
//!
//! Names and texts are bytes in the client's encoding. The server reads a Parse in the
//! encoding its session has then, so text with non-ASCII bytes is only shared between
//! clients in the same encoding.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use sha2::{Digest, Sha256};

use crate::protocol::views::{BindView, ParseView};
use crate::route::{Classification, Classifier, ClientEncoding};

/// A statement as pgrelay prepares it on servers.
#[derive(Debug)]
pub(crate) struct PreparedStatement {
    pub server_name: Arc<str>,
    /// What the statement does, for routing the batches that execute it.
    pub class: Arc<Classification>,
    /// The Parse message with the server-side name, ready to send to any server.
    pub parse: Bytes,
}

/// The name under which a client's Parse of a statement the server already holds is
/// checked, and closed again at once.
const CHECK_NAME: &str = "pgrelay_check";

/// Length of the names [`server_name`] makes.
const SERVER_NAME_LEN: usize = 40;

/// Bytes of statement names and text one client may keep defined at once. With the
/// count (max_client_prepared_statements) it bounds what a client can make pgrelay hold:
/// without it, a thousand statements of max_message_size each would be allowed.
pub(crate) const CLIENT_STATEMENT_BYTES: usize = 16 * 1024 * 1024;

/// One client's protocol-level statement names.
#[derive(Debug, Default)]
pub(crate) struct ClientStatements {
    by_name: HashMap<Vec<u8>, Defined>,
    /// Numbers the definitions, so a failed Parse undoes its own and no later one.
    next_definition: u64,
    /// What the definitions hold: each name plus its statement's Parse message.
    bytes: usize,
}

#[derive(Debug)]
struct Defined {
    statement: Arc<PreparedStatement>,
    definition: u64,
}

impl Defined {
    fn cost(name: &[u8], statement: &PreparedStatement) -> usize {
        name.len() + statement.parse.len()
    }
}

/// A Parse pgrelay refuses because the client would hold more than it may.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TooManyStatements {
    pub message: String,
}

impl ClientStatements {
    /// Refuses a Parse that would define one statement more than `max_count` (0: no
    /// limit on the count) or take the client's statements past CLIENT_STATEMENT_BYTES.
    /// Redefining a name the client has replaces it and only its size counts.
    pub fn admits(&self, parse: &ParseView<'_>, max_count: usize) -> Result<(), TooManyStatements> {
        let replaced = self.by_name.get(parse.name);
        let count_after = self.by_name.len() + usize::from(replaced.is_none());
        if max_count > 0 && count_after > max_count {
            return Err(TooManyStatements {
                message: format!(
                    "prepared statement \"{}\" was not created: this client already holds {} prepared \
                     statements (max_client_prepared_statements = {max_count}); close some first",
                    String::from_utf8_lossy(parse.name),
                    self.by_name.len()
                ),
            });
        }
        let freed = replaced.map_or(0, |old| Defined::cost(parse.name, &old.statement));
        // The client's name and the Parse message pgrelay would keep (see
        // `parse_message`): its header, the server-side name and the text, each ended
        // by a zero byte, and the parameter types.
        let added = parse.name.len() + 5 + SERVER_NAME_LEN + 1 + parse.query.len() + 1 + parse.param_types.len();
        if self.bytes - freed + added > CLIENT_STATEMENT_BYTES {
            return Err(TooManyStatements {
                message: format!(
                    "prepared statement \"{}\" was not created: this client's prepared statements would hold \
                     more than {} MiB of query text; close some first",
                    String::from_utf8_lossy(parse.name),
                    CLIENT_STATEMENT_BYTES / (1024 * 1024)
                ),
            });
        }
        Ok(())
    }

    /// Records the client's Parse; a name parsed again is redefined. Returns the
    /// statement and the number of this definition, for [`Self::undefine`].
    ///
    /// `search_path` is the client's: the same text may name other tables under another
    /// path, and a prepared statement keeps the result type it was first parsed with.
    /// `encoding` is the client's too: the same bytes are other characters in another.
    /// `schema_epoch` is the database's count of schema changes: a statement prepared
    /// after one gets a new server-side name, so that it is prepared afresh rather than
    /// mapped to a server-side statement whose plan the change made stale.
    pub fn define(
        &mut self,
        parse: &ParseView<'_>,
        classifier: &Classifier,
        search_path: Option<&str>,
        encoding: ClientEncoding,
        schema_epoch: u64,
    ) -> (Arc<PreparedStatement>, u64) {
        let server_name = server_name(
            parse.query,
            parse.param_types,
            search_path.unwrap_or(""),
            encoding.name,
            schema_epoch,
        );
        let statement = match self.by_name.get(parse.name) {
            Some(known) if known.statement.server_name == server_name => known.statement.clone(),
            _ => Arc::new(PreparedStatement {
                parse: parse_message(&server_name, parse.query, parse.param_types),
                class: classifier.classify_text(parse.query, encoding.charset),
                server_name,
            }),
        };
        self.next_definition += 1;
        let definition = self.next_definition;
        self.bytes += Defined::cost(parse.name, &statement);
        let replaced = self.by_name.insert(
            parse.name.to_owned(),
            Defined {
                statement: statement.clone(),
                definition,
            },
        );
        if let Some(old) = replaced {
            self.bytes -= Defined::cost(parse.name, &old.statement);
        }
        (statement, definition)
    }

    /// The server refused the Parse of `definition`: its name is not defined, as on a
    /// direct connection (unless the client has defined it again since).
    pub fn undefine(&mut self, definition: u64) {
        let bytes = &mut self.bytes;
        self.by_name.retain(|name, defined| {
            let keep = defined.definition != definition;
            if !keep {
                *bytes -= Defined::cost(name, &defined.statement);
            }
            keep
        });
    }

    pub fn get(&self, name: &[u8]) -> Option<Arc<PreparedStatement>> {
        self.by_name.get(name).map(|defined| defined.statement.clone())
    }

    /// Forgets a name; false if the client never defined it.
    pub fn remove(&mut self, name: &[u8]) -> bool {
        match self.by_name.remove(name) {
            Some(old) => {
                self.bytes -= Defined::cost(name, &old.statement);
                true
            }
            None => false,
        }
    }

    /// Each name with the query text and parameter types of its Parse (for a takeover).
    pub fn definitions(&self) -> impl Iterator<Item = (&[u8], ParseView<'_>)> {
        self.by_name.iter().filter_map(|(name, defined)| {
            // The stored Parse is pgrelay's own: a 5-byte header, then a well-formed body.
            let body = defined.statement.parse.get(5..)?;
            let parse = ParseView::read(body).ok()?;
            Some((name.as_slice(), parse))
        })
    }

    pub fn clear(&mut self) {
        self.by_name.clear();
        self.bytes = 0;
    }
}

/// `pgrelay_` and 128 bits of SHA-256 over the text, the parameter types, the
/// search_path and the schema epoch: equal statements prepared under the same schema
/// share a name on every server, different ones never collide in practice. A text with non-ASCII bytes means what its client encoding says:
/// the encoding's name is hashed too, and while it is in doubt (`None`) a random value,
/// so that the statement is shared with no one.
fn server_name(
    query: &[u8],
    param_types: &[u8],
    search_path: &str,
    encoding: Option<&str>,
    schema_epoch: u64,
) -> Arc<str> {
    const _: () = assert!(SERVER_NAME_LEN == "pgrelay_".len() + 32);
    let mut hasher = Sha256::new();
    hasher.update((query.len() as u64).to_be_bytes());
    hasher.update(query);
    hasher.update((param_types.len() as u64).to_be_bytes());
    hasher.update(param_types);
    hasher.update((search_path.len() as u64).to_be_bytes());
    hasher.update(search_path.as_bytes());
    hasher.update(schema_epoch.to_be_bytes());
    if !query.is_ascii() {
        match encoding {
            Some(name) => hasher.update(name.as_bytes()),
            None => hasher.update(rand::random::<u128>().to_be_bytes()),
        }
    }
    let digest = hasher.finalize();
    let mut name = String::with_capacity(40);
    name.push_str("pgrelay_");
    for byte in &digest[..16] {
        let _ = write!(name, "{byte:02x}");
    }
    Arc::from(name)
}

fn parse_message(name: &str, query: &[u8], param_types: &[u8]) -> Bytes {
    let mut body = BytesMut::with_capacity(name.len() + query.len() + param_types.len() + 2);
    put_cstr(&mut body, name.as_bytes());
    put_cstr(&mut body, query);
    body.put_slice(param_types);
    message(b'P', &body)
}

/// The client's Parse under pgrelay's scratch name, then a Close of that name: what
/// the server says about the Parse is what it would say on a direct connection.
pub(crate) fn checked_parse(parse: &ParseView<'_>) -> (Bytes, Bytes) {
    (
        parse_message(CHECK_NAME, parse.query, parse.param_types),
        close_statement(CHECK_NAME),
    )
}

/// A Parse the server is sure to refuse (a syntax error), under a name nothing else
/// uses: sent in place of a client's Parse that pgrelay refuses, it makes the server skip
/// the rest of the batch up to its Sync, as a refusal by the server itself would.
pub(crate) fn refused_parse() -> Bytes {
    parse_message("pgrelay_refused", b"pgrelay refused this statement", &[0, 0])
}

/// The client's Bind with the statement name replaced.
pub(crate) fn rewrite_bind(bind: &BindView<'_>, server_name: &str) -> Bytes {
    let mut body = BytesMut::with_capacity(bind.portal.len() + server_name.len() + bind.rest.len() + 2);
    put_cstr(&mut body, bind.portal);
    put_cstr(&mut body, server_name.as_bytes());
    body.put_slice(bind.rest);
    message(b'B', &body)
}

/// A Describe of a statement, by its server-side name.
pub(crate) fn describe_statement(server_name: &str) -> Bytes {
    let mut body = BytesMut::with_capacity(server_name.len() + 2);
    body.put_u8(b'S');
    put_cstr(&mut body, server_name.as_bytes());
    message(b'D', &body)
}

/// A Close of a statement, by its server-side name.
pub(crate) fn close_statement(server_name: &str) -> Bytes {
    let mut body = BytesMut::with_capacity(server_name.len() + 2);
    body.put_u8(b'S');
    put_cstr(&mut body, server_name.as_bytes());
    message(b'C', &body)
}

fn put_cstr(buf: &mut BytesMut, text: &[u8]) {
    buf.put_slice(text);
    buf.put_u8(0);
}

fn message(tag: u8, body: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(body.len() + 5);
    out.put_u8(tag);
    out.put_u32((body.len() + 4) as u32);
    out.put_slice(body);
    out.freeze()
}

/// A DEALLOCATE the client sends as SQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Deallocate {
    One(Vec<u8>),
    All,
}

/// Recognises `DEALLOCATE [PREPARE] name | ALL` (one statement, identifier folded to
/// lower case unless quoted, as PostgreSQL does). Works on bytes in an ASCII-compatible
/// client encoding: only ASCII letters fold, as they do on a server whose encoding is
/// multibyte; other bytes are part of the name, in the client's spelling, as the names
/// of its Parse messages are.
pub(crate) fn parse_deallocate(sql: &[u8]) -> Option<Deallocate> {
    let mut sql = sql.trim_ascii();
    while let Some(rest) = sql.strip_suffix(b";") {
        sql = rest;
    }
    let sql = sql.trim_ascii();
    let rest = strip_keyword(sql, b"deallocate")?;
    let rest = strip_keyword(rest, b"prepare").unwrap_or(rest);
    if rest.contains(&b';') || rest.is_empty() {
        return None;
    }
    if rest.eq_ignore_ascii_case(b"all") {
        return Some(Deallocate::All);
    }
    if let Some(quoted) = rest.strip_prefix(b"\"").and_then(|r| r.strip_suffix(b"\"")) {
        let mut name = Vec::with_capacity(quoted.len());
        let mut bytes = quoted.iter().peekable();
        while let Some(&byte) = bytes.next() {
            name.push(byte);
            if byte == b'"' && bytes.peek() == Some(&&b'"') {
                bytes.next();
            }
        }
        return Some(Deallocate::One(name));
    }
    if rest
        .iter()
        .all(|&b| b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || !b.is_ascii())
    {
        return Some(Deallocate::One(rest.to_ascii_lowercase()));
    }
    None
}

/// An SQL `EXECUTE name [(arguments)]` the client sends: the statement's name (folded
/// to lower case unless quoted, as PostgreSQL does) and the text after it, as bytes in
/// the client's encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SqlExecute<'a> {
    pub name: Vec<u8>,
    pub arguments: &'a [u8],
}

/// Recognises one `EXECUTE name [(arguments)]` statement. A text holding more than one
/// statement is not recognised, and goes to the server as it is.
pub(crate) fn parse_execute(sql: &[u8]) -> Option<SqlExecute<'_>> {
    let mut sql = sql.trim_ascii();
    while let Some(rest) = sql.strip_suffix(b";") {
        sql = rest.trim_ascii_end();
    }
    let rest = strip_keyword(sql, b"execute")?;
    let (name, arguments) = if let Some(quoted) = rest.strip_prefix(b"\"") {
        let mut name = Vec::with_capacity(quoted.len());
        let mut at = 0;
        loop {
            match quoted.get(at) {
                None => return None,
                Some(b'"') if quoted.get(at + 1) == Some(&b'"') => {
                    name.push(b'"');
                    at += 2;
                }
                Some(b'"') => break,
                Some(&byte) => {
                    name.push(byte);
                    at += 1;
                }
            }
        }
        (name, &quoted[at + 1..])
    } else {
        let end = rest
            .iter()
            .position(|&b| !(b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || !b.is_ascii()))
            .unwrap_or(rest.len());
        if end == 0 || rest[0].is_ascii_digit() || rest[0] == b'$' {
            return None;
        }
        (rest[..end].to_ascii_lowercase(), &rest[end..])
    };
    let arguments = arguments.trim_ascii_start();
    let enclosed = arguments.is_empty() || arguments.starts_with(b"(") && arguments.ends_with(b")");
    if !enclosed || arguments.contains(&b';') {
        return None;
    }
    Some(SqlExecute { name, arguments })
}

/// A simple Query running the statement `server_name` with the client's arguments.
pub(crate) fn execute_query(server_name: &str, arguments: &[u8]) -> Bytes {
    let mut body = BytesMut::with_capacity(server_name.len() + arguments.len() + 10);
    body.put_slice(b"EXECUTE ");
    body.put_slice(server_name.as_bytes());
    body.put_slice(arguments);
    body.put_u8(0);
    message(b'Q', &body)
}

fn strip_keyword<'a>(text: &'a [u8], keyword: &[u8]) -> Option<&'a [u8]> {
    let head = text.get(..keyword.len())?;
    let rest = &text[keyword.len()..];
    (head.eq_ignore_ascii_case(keyword) && rest.first().is_some_and(u8::is_ascii_whitespace))
        .then(|| rest.trim_ascii_start())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_statements_share_a_server_name_and_different_ones_do_not() {
        let utf8 = Some("UTF8");
        let a = server_name(b"SELECT $1", b"\0\x01\0\0\0\x17", "", utf8, 0);
        assert_eq!(a, server_name(b"SELECT $1", b"\0\x01\0\0\0\x17", "", utf8, 0));
        assert_ne!(a, server_name(b"SELECT $1", b"\0\0", "", utf8, 0));
        assert_ne!(a, server_name(b"SELECT $2", b"\0\x01\0\0\0\x17", "", utf8, 0));
        assert_ne!(
            a,
            server_name(b"SELECT $1", b"\0\x01\0\0\0\x17", "app, public", utf8, 0)
        );
        assert_ne!(a, server_name(b"SELECT $1", b"\0\x01\0\0\0\x17", "", utf8, 1));
        assert_eq!(a.len(), 40);
    }

    #[test]
    fn non_ascii_text_is_shared_only_within_its_encoding() {
        let ascii = server_name(b"SELECT 1", b"\0\0", "", Some("UTF8"), 0);
        assert_eq!(ascii, server_name(b"SELECT 1", b"\0\0", "", Some("SJIS"), 0));
        assert_eq!(ascii, server_name(b"SELECT 1", b"\0\0", "", None, 0));
        // 'Ã©' in LATIN9 is the bytes of 'é' in UTF-8.
        let text = "SELECT 'é'".as_bytes();
        let utf8 = server_name(text, b"\0\0", "", Some("UTF8"), 0);
        assert_eq!(utf8, server_name(text, b"\0\0", "", Some("UTF8"), 0));
        assert_ne!(utf8, server_name(text, b"\0\0", "", Some("LATIN9"), 0));
        assert_ne!(
            server_name(text, b"\0\0", "", None, 0),
            server_name(text, b"\0\0", "", None, 0),
            "in doubt: shared with no one"
        );
    }

    #[test]
    fn rewritten_messages_read_back() {
        let bind = BindView::read(b"portal\0s1\0\0\0\0\0\0\0").unwrap();
        let rewritten = rewrite_bind(&bind, "pgrelay_x");
        let view = BindView::read(&rewritten[5..]).unwrap();
        assert_eq!(
            (view.portal, view.statement, view.rest),
            (&b"portal"[..], &b"pgrelay_x"[..], bind.rest)
        );
        let parse = ParseView::read(b"s1\0SELECT 1\0\0\0").unwrap();
        let mut statements = ClientStatements::default();
        let (statement, _) = statements.define(
            &parse,
            &Classifier::new(Default::default()),
            None,
            ClientEncoding::UTF8,
            0,
        );
        let view = ParseView::read(&statement.parse[5..]).unwrap();
        assert_eq!(
            (view.name, view.query),
            (statement.server_name.as_bytes(), &b"SELECT 1"[..])
        );
    }

    #[test]
    fn a_failed_parse_undoes_only_its_own_definition() {
        let classifier = Classifier::new(Default::default());
        let mut statements = ClientStatements::default();
        let parse = ParseView::read(b"s1\0SELECT 1\0\0\0").unwrap();
        let (_, first) = statements.define(&parse, &classifier, None, ClientEncoding::UTF8, 0);
        statements.undefine(first);
        assert!(statements.get(b"s1").is_none());
        let (_, second) = statements.define(&parse, &classifier, None, ClientEncoding::UTF8, 0);
        let (_, _third) = statements.define(&parse, &classifier, None, ClientEncoding::UTF8, 0);
        statements.undefine(second);
        assert!(statements.get(b"s1").is_some());
    }

    #[test]
    fn the_bytes_of_a_clients_statements_are_counted_as_they_come_and_go() {
        let classifier = Classifier::new(Default::default());
        let mut statements = ClientStatements::default();
        let short = ParseView::read(b"s1\0SELECT 1\0\0\0").unwrap();
        let long = ParseView::read(b"s1\0SELECT 1, 2, 3\0\0\0").unwrap();
        let other = ParseView::read(b"s2\0SELECT 2\0\0\0").unwrap();
        let (statement, _) = statements.define(&short, &classifier, None, ClientEncoding::UTF8, 0);
        assert_eq!(statements.bytes, 2 + statement.parse.len());
        statements.define(&long, &classifier, None, ClientEncoding::UTF8, 0);
        let (_, second) = statements.define(&other, &classifier, None, ClientEncoding::UTF8, 0);
        statements.undefine(second);
        statements.remove(b"s1");
        assert_eq!((statements.by_name.len(), statements.bytes), (0, 0));
        statements.define(&short, &classifier, None, ClientEncoding::UTF8, 0);
        statements.clear();
        assert_eq!(statements.bytes, 0);
    }

    #[test]
    fn a_client_may_not_define_more_statements_than_its_limits() {
        let classifier = Classifier::new(Default::default());
        let mut statements = ClientStatements::default();
        let s1 = ParseView::read(b"s1\0SELECT 1\0\0\0").unwrap();
        let s2 = ParseView::read(b"s2\0SELECT 2\0\0\0").unwrap();
        statements.admits(&s1, 1).unwrap();
        statements.define(&s1, &classifier, None, ClientEncoding::UTF8, 0);
        let refused = statements.admits(&s2, 1).unwrap_err();
        assert!(
            refused.message.contains("max_client_prepared_statements = 1"),
            "{}",
            refused.message
        );
        statements.admits(&s1, 1).expect("a name defined again replaces itself");
        statements.admits(&s2, 0).expect("0: no limit on the count");

        let text = format!("SELECT '{}'", "x".repeat(CLIENT_STATEMENT_BYTES / 2));
        let body = [b"big\0".as_slice(), text.as_bytes(), b"\0\0\0"].concat();
        let big = ParseView::read(&body).unwrap();
        let (statement, _) = statements.define(&big, &classifier, None, ClientEncoding::UTF8, 0);
        let predicted = 3 + 5 + SERVER_NAME_LEN + 1 + text.len() + 1 + 2;
        assert_eq!(
            3 + statement.parse.len(),
            predicted,
            "admits predicts what define keeps"
        );
        let body = [b"big2\0".as_slice(), text.as_bytes(), b"\0\0\0"].concat();
        let refused = statements.admits(&ParseView::read(&body).unwrap(), 0).unwrap_err();
        assert!(refused.message.contains("16 MiB"), "{}", refused.message);
    }

    #[test]
    fn recognises_sql_execute_of_one_statement() {
        let execute = |sql: &[u8]| parse_execute(sql).map(|e| (e.name, e.arguments.to_vec()));
        let found = |name: &[u8], arguments: &[u8]| Some((name.to_vec(), arguments.to_vec()));
        assert_eq!(execute(b"EXECUTE foobar"), found(b"foobar", b""));
        assert_eq!(
            execute(b"execute FooBar (1, 'a;b')"),
            None,
            "a ; anywhere is not judged"
        );
        assert_eq!(execute(b"execute FooBar (1, 'x') ;"), found(b"foobar", b"(1, 'x')"));
        assert_eq!(execute(b"EXECUTE \"Foo\"\"x\"(2)"), found(b"Foo\"x", b"(2)"));
        assert_eq!(execute(b"EXECUTE caf\xe9"), found(b"caf\xe9", b""));
        assert_eq!(execute(b"EXECUTE foo; SELECT 1"), None);
        assert_eq!(execute(b"EXECUTE foo bar"), None);
        assert_eq!(execute(b"EXECUTEfoo"), None);
        assert_eq!(execute(b"EXECUTE 1x"), None);
        assert_eq!(execute(b"EXECUTE \"unterminated"), None);
        let query = execute_query("pgrelay_x", b"(1)");
        assert_eq!(&query[5..], b"EXECUTE pgrelay_x(1)\0");
    }

    #[test]
    fn recognises_deallocate() {
        let one = |name: &[u8]| Some(Deallocate::One(name.to_vec()));
        assert_eq!(parse_deallocate(b"DEALLOCATE ALL"), Some(Deallocate::All));
        assert_eq!(parse_deallocate(b"deallocate prepare S_1;"), one(b"s_1"));
        assert_eq!(parse_deallocate(b"DEALLOCATE \"S_1\""), one(b"S_1"));
        assert_eq!(parse_deallocate(b"DEALLOCATE \"a\"\"b\""), one(b"a\"b"));
        assert_eq!(parse_deallocate(b"DEALLOCATE a; SELECT 1"), None);
        assert_eq!(parse_deallocate(b"SELECT 1"), None);
        // LATIN9 'Café': only ASCII letters fold, the other bytes are the client's spelling.
        assert_eq!(parse_deallocate(b"DEALLOCATE Caf\xc9"), one(b"caf\xc9"));
        assert_eq!(parse_deallocate(b"DEALLOCATE \"Caf\xc9\""), one(b"Caf\xc9"));
    }
}
