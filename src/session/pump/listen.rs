//! LISTEN and UNLISTEN answered by pgrelay while a server is attached
//! (`listen_notify = "fanout"`): a simple query of only LISTEN/UNLISTEN statements, and
//! the Parse, Bind, Describe, Execute and Close of such a statement, are answered in
//! their place of the reply stream instead of going to the server, so the client is not
//! pinned. What they change takes effect when their transaction commits (see
//! `session::listen_tx`), and the session then hands the client's channels to the hub.

use super::from_client::Disposition;
use super::{Pump, PumpExit};
use crate::error::sqlstate;
use crate::protocol::compose::{self, Severity};
use crate::protocol::views::{BindView, ObjectKind, ObjectRef, ParseView, query_text};
use crate::protocol::{FrontendTag, HEADER_LEN, ProtocolError, TxStatus};
use crate::route::{PinReason, SessionEffect};
use crate::session::carried::Carried;
use crate::session::listen_tx::{self, Changes};
use crate::upstream::{Expect, Recipient, Synthetic};

/// Whether `sql` may be nothing but LISTEN and UNLISTEN statements (what pgrelay answers):
/// it begins with one of those words, looked at without scanning the text, which spares the
/// classifier for nearly every statement. Text that begins with a comment, a parenthesis or
/// an empty statement is scanned whole.
fn mentions_listen(sql: &[u8]) -> bool {
    let start = sql
        .iter()
        .position(|byte| !byte.is_ascii_whitespace())
        .unwrap_or(sql.len());
    let rest = &sql[start..];
    let begins_with = |word: &[u8]| {
        rest.get(..word.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(word))
    };
    match rest.first() {
        Some(b'/' | b'-' | b'(' | b';') => sql.windows(6).any(|word| word.eq_ignore_ascii_case(b"listen")),
        _ => begins_with(b"listen") || begins_with(b"unlisten"),
    }
}

/// The portal an Execute names.
fn execute_portal(body: &[u8]) -> Result<&[u8], ProtocolError> {
    let end = body
        .iter()
        .position(|&byte| byte == 0)
        .ok_or(ProtocolError::Malformed("Execute"))?;
    Ok(&body[..end])
}

impl Pump<'_> {
    /// Answers the client message at `start..start + len` if it is a LISTEN or UNLISTEN
    /// pgrelay answers, or belongs to one (its Bind, Describe, Execute, Close); `None`:
    /// the message goes on as usual.
    pub(super) fn plan_listen(
        &mut self,
        tag: FrontendTag,
        start: usize,
        len: usize,
    ) -> Result<Option<Disposition>, PumpExit> {
        let registered = self.carried.listen_tx.has_statements();
        if !self.mode.fanout && !registered {
            return Ok(None);
        }
        let body = &self.client.inbuf[start + HEADER_LEN..start + len];
        let malformed = PumpExit::ClientBroke;
        let listen_tx = &mut self.carried.listen_tx;
        let answer = match tag {
            FrontendTag::Query => {
                // A simple query ends the unnamed statement and portal.
                listen_tx.unnamed = None;
                if !listen_tx.portals.is_empty() {
                    listen_tx.portals.remove(&b""[..]);
                }
                let sql = query_text(body).map_err(malformed)?;
                let Some(changes) = self.answerable(sql) else {
                    return Ok(None);
                };
                Synthetic::Listen { changes, query: true }
            }
            FrontendTag::Parse => {
                let parse = ParseView::read(body).map_err(malformed)?;
                if parse.name.is_empty() {
                    listen_tx.unnamed = None;
                } else {
                    listen_tx.statements.remove(parse.name);
                }
                // A name the client already uses for another statement: the server's error.
                if !parse.name.is_empty() && self.carried.statements.get(parse.name).is_some() {
                    return Ok(None);
                }
                let Some(changes) = self.answerable(parse.query) else {
                    return Ok(None);
                };
                if self.server.status() == TxStatus::Failed {
                    // Refused by the server as every statement of a failed transaction
                    // (25P02), with nothing to note.
                    self.server.expect.push(
                        Expect::ParseComplete {
                            statement: None,
                            definition: None,
                        },
                        Recipient::Client,
                    );
                    return Ok(Some(Disposition::Forward));
                }
                let listen_tx = &mut self.carried.listen_tx;
                if parse.name.is_empty() {
                    listen_tx.unnamed = Some(changes);
                } else {
                    listen_tx.statements.insert(parse.name.into(), changes);
                }
                Synthetic::ParseComplete
            }
            FrontendTag::Bind if registered => {
                let bind = BindView::read(body).map_err(malformed)?;
                listen_tx.portals.remove(bind.portal);
                let changes = if bind.statement.is_empty() {
                    listen_tx.unnamed.clone()
                } else {
                    listen_tx.statements.get(bind.statement).cloned()
                };
                let Some(changes) = changes else {
                    return Ok(None);
                };
                listen_tx.portals.insert(bind.portal.into(), changes);
                Synthetic::BindComplete
            }
            FrontendTag::Describe if registered => {
                let object = ObjectRef::read(body).map_err(malformed)?;
                let known = match object.kind {
                    ObjectKind::Statement if object.name.is_empty() => listen_tx.unnamed.is_some(),
                    ObjectKind::Statement => listen_tx.statements.contains_key(object.name),
                    ObjectKind::Portal => listen_tx.portals.contains_key(object.name),
                };
                if !known {
                    return Ok(None);
                }
                Synthetic::NoData {
                    statement: object.kind == ObjectKind::Statement,
                }
            }
            FrontendTag::Execute if registered => {
                let portal = execute_portal(body).map_err(malformed)?;
                let Some(changes) = listen_tx.portals.get(portal).cloned() else {
                    return Ok(None);
                };
                self.unit_started.get_or_insert_with(std::time::Instant::now);
                Synthetic::Listen { changes, query: false }
            }
            FrontendTag::Close if registered => {
                let object = ObjectRef::read(body).map_err(malformed)?;
                let known = match object.kind {
                    ObjectKind::Statement if object.name.is_empty() => listen_tx.unnamed.take().is_some(),
                    ObjectKind::Statement => listen_tx.statements.remove(object.name).is_some(),
                    ObjectKind::Portal => listen_tx.portals.remove(object.name).is_some(),
                };
                if !known {
                    return Ok(None);
                }
                Synthetic::CloseComplete
            }
            _ => return Ok(None),
        };
        self.server.expect.push(Expect::Synthetic(answer), Recipient::Client);
        Ok(Some(Disposition::Consumed))
    }

    /// The changes of `sql` if pgrelay answers it: only LISTEN/UNLISTEN statements, in
    /// fan-out, from a client that does not already listen on its server, and not after a
    /// savepoint of its transaction (a ROLLBACK TO is not told from a ROLLBACK by its
    /// reply, so those go to the server, as with `listen_notify = "pin"`).
    fn answerable(&self, sql: &[u8]) -> Option<Changes> {
        if !self.mode.fanout
            || !mentions_listen(sql)
            || self.carried.listen_tx.savepoint
            || listens_on_server(self.carried)
        {
            return None;
        }
        let encoding = super::from_client::text_encoding(&self.pending, self.carried);
        if !encoding.charset.reads(sql) {
            return None;
        }
        listen_tx::listen_only(&self.classifier.classify_text(sql, encoding.charset))
    }

    /// Gives one of the replies of [`Pump::plan_listen`], now due.
    pub(super) fn emit_listen(&mut self, synthetic: Synthetic) {
        // What pgrelay answers is never run again elsewhere.
        self.release_held();
        let status = self.server.status();
        let out = &mut self.client.outbuf;
        if status == TxStatus::Failed && synthetic != Synthetic::CloseComplete {
            // A batch pipelined behind one that failed the transaction: refused, as the
            // server refuses every statement there.
            compose::error(
                out,
                Severity::Error,
                sqlstate::IN_FAILED_TRANSACTION,
                "current transaction is aborted, commands ignored until end of transaction block",
            );
            match synthetic {
                Synthetic::Listen { query: true, .. } => compose::ready_for_query(out, status),
                _ => self.server.expect.drop_synthetic_batch(),
            }
            return;
        }
        match synthetic {
            Synthetic::ParseComplete => compose::parse_complete(out),
            Synthetic::BindComplete => compose::bind_complete(out),
            Synthetic::CloseComplete => compose::close_complete(out),
            Synthetic::NoData { statement } => {
                if statement {
                    compose::parameter_description_none(out);
                }
                compose::no_data(out);
            }
            Synthetic::Listen { changes, query } => {
                for change in changes.iter() {
                    compose::command_complete(out, listen_tx::tag(change));
                }
                self.carried.listen_tx.answered(&changes);
                if query {
                    compose::ready_for_query(out, status);
                    let took = self.carried.listen_tx.ready(status == TxStatus::Idle);
                    took_effect(self.carried, took);
                }
            }
            Synthetic::QueryDone(_) => {}
        }
    }
}

/// The client listens on its server (a LISTEN that went there): it keeps doing so.
pub(super) fn listens_on_server(carried: &Carried) -> bool {
    carried.pins.reasons().any(|reason| reason == PinReason::Listen)
}

/// Applies the changes whose transaction committed to the client's channels; the session
/// hands them to the hub before the client hears of the commit.
pub(super) fn took_effect(carried: &mut Carried, took: Option<Vec<SessionEffect>>) {
    let Some(changes) = took else {
        return;
    };
    for change in &changes {
        listen_tx::apply(change, &mut carried.fanout_channels);
    }
    carried.fanout_dirty = true;
}

#[cfg(test)]
mod tests {
    use super::mentions_listen;

    #[test]
    fn only_text_that_may_be_listen_statements_is_classified() {
        for sql in [
            "LISTEN a",
            "  unlisten *",
            "\nListen \"x\"; LISTEN y",
            "/* c */ LISTEN a",
            "-- c\nUNLISTEN a",
            ";LISTEN a",
        ] {
            assert!(mentions_listen(sql.as_bytes()), "{sql}");
        }
        for sql in ["SELECT 1", "SELECT 'listen'", "NOTIFY listen", "", "   ", "LISTE"] {
            assert!(!mentions_listen(sql.as_bytes()), "{sql}");
        }
    }
}
