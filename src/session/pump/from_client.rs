//! What the pump does with each message from the client: record the reply it expects,
//! and in transaction and statement mode map prepared-statement names to the ones
//! pgrelay owns on the server, preparing them first where the server lacks them.

use std::sync::Arc;

use bytes::Buf;

use super::fence::BatchEnd;
use super::{HIGH_WATER, Pump, PumpExit, move_bytes};
use crate::protocol::compose::{self, Severity};
use crate::protocol::views::{BindView, ObjectKind, ObjectRef, ParseView, query_text};
use crate::protocol::{FrontendTag, Header, ProtocolError, TxStatus};
use crate::session::prepared::{
    Deallocate, PreparedStatement, checked_parse, close_statement, describe_statement, execute_query, parse_deallocate,
    parse_execute, refused_parse, rewrite_bind,
};
use std::time::Instant;

use super::effects::PendingEffects;
use crate::metrics::SessionMetrics;
use crate::route::ClientEncoding;
use crate::session::carried::{Carried, may_change_encoding};
use crate::upstream::{Expect, Recipient, ServerConn, Synthetic};

/// What becomes of one client message.
pub(super) enum Disposition {
    /// Sent to the server unchanged.
    Forward,
    /// Handled: whatever replaces it is already in the server's output.
    Consumed,
}

impl Pump<'_> {
    /// Handles every whole client message in the input buffer (and the start of a large
    /// CopyData), forwarding them to the server.
    pub(super) fn on_client_input(&mut self) -> Result<(), PumpExit> {
        // Bytes at the front of the client input that go to the server unchanged.
        let mut run = 0;
        let result = loop {
            if self.hold {
                break Ok(());
            }
            if self.client_passthrough > 0 {
                let n = self.client_passthrough.min(self.client.inbuf.len() - run);
                if n == 0 {
                    break Ok(());
                }
                self.client_passthrough -= n;
                run += n;
                continue;
            }
            // Replies pgrelay makes itself (CloseComplete, DEALLOCATE) go straight to the
            // client's output: a client that pipelines without reading is held back by
            // the same bound as one whose replies come from the server.
            if self.server.outbuf.len() + run >= HIGH_WATER || self.client.outbuf.len() >= HIGH_WATER {
                break Ok(());
            }
            let rest = &self.client.inbuf[run..];
            let header = match Header::peek(rest) {
                Ok(Some(header)) => header,
                Ok(None) => break Ok(()),
                Err(error) => break Err(PumpExit::ClientBroke(error)),
            };
            if header.len > self.client.max_message {
                break Err(PumpExit::ClientBroke(ProtocolError::TooLarge {
                    tag: header.tag,
                    len: header.len,
                    limit: self.client.max_message,
                }));
            }
            let Some(tag) = FrontendTag::from_byte(header.tag) else {
                break Err(PumpExit::ClientBroke(ProtocolError::UnexpectedTag(header.tag)));
            };
            if tag == FrontendTag::CopyData
                && (takes_copy_data(self.server) || self.server.expect.skipping_to_sync())
                && header.len > rest.len()
            {
                self.client_passthrough = header.len;
                continue;
            }
            if header.len > rest.len() {
                self.client.inbuf.reserve(header.len - rest.len());
                break Ok(());
            }
            if self.mode.manage_statements && rewrites(tag) {
                // Anything pgrelay injects must follow what the client sent before.
                move_bytes(&mut self.client.inbuf, run, &mut self.server.outbuf);
                run = 0;
            }
            if opens_or_continues_batch(tag) {
                self.batch_message();
            }
            let disposition = match self.plan(tag, run, header.len) {
                Ok(disposition) => disposition,
                Err(exit) => break Err(exit),
            };
            // Only a message the server gets can end a transaction there.
            let forwarded = matches!(disposition, Disposition::Forward);
            match disposition {
                Disposition::Forward => run += header.len,
                Disposition::Consumed => {
                    move_bytes(&mut self.client.inbuf, run, &mut self.server.outbuf);
                    self.client.inbuf.advance(header.len);
                    run = 0;
                }
            }
            if matches!(tag, FrontendTag::Query | FrontendTag::Sync) && self.batch_ends_writing() && forwarded {
                // The fence query follows the batch that commits, in the same write.
                move_bytes(&mut self.client.inbuf, run, &mut self.server.outbuf);
                run = 0;
                self.send_fence_ahead();
            }
            if self.server.expect.has_synthetic_head() {
                move_bytes(&mut self.client.inbuf, run, &mut self.server.outbuf);
                run = 0;
                self.emit_synthetic();
            }
        };
        move_bytes(&mut self.client.inbuf, run, &mut self.server.outbuf);
        result
    }

    /// Decides about the message at `start..start + len` of the client input.
    fn plan(&mut self, tag: FrontendTag, start: usize, len: usize) -> Result<Disposition, PumpExit> {
        if self.server.expect.skipping_to_sync() && !matches!(tag, FrontendTag::Sync | FrontendTag::Terminate) {
            // The server skips it after the error in this batch and owes no reply.
            return Ok(Disposition::Forward);
        }
        if let Some(disposition) = self.plan_listen(tag, start, len)? {
            return Ok(disposition);
        }
        let body = &self.client.inbuf[start + crate::protocol::HEADER_LEN..start + len];
        let server = &mut *self.server;
        let manage = self.mode.manage_statements;
        let malformed = |error: ProtocolError| PumpExit::ClientBroke(error);
        Ok(match tag {
            FrontendTag::Query => {
                self.unit_started.get_or_insert_with(Instant::now);
                self.hold = self.mode.single_unit;
                let sql = query_text(body).map_err(malformed)?;
                let encoding = text_encoding(&self.pending, self.carried);
                // In a failed transaction block the server refuses every statement (25P02)
                // and drops nothing: so does the client's DEALLOCATE, by going there.
                let manage = manage && server.status() != TxStatus::Failed;
                if manage
                    && !self.carried.pins.is_pinned()
                    && encoding.charset.reads(sql)
                    && parse_deallocate(sql) == Some(Deallocate::All)
                {
                    // The client's names are all pgrelay's to drop; the server's statements
                    // serve other clients too, and a client without SQL-level PREPAREs
                    // (those pin it) has nothing else there to deallocate.
                    self.carried.statements.clear();
                    self.carried.listen_tx.forget_statements();
                    server.expect.push(
                        Expect::Synthetic(Synthetic::QueryDone("DEALLOCATE ALL")),
                        Recipient::Client,
                    );
                    return Ok(Disposition::Consumed);
                }
                if manage
                    && let Some(Deallocate::One(name)) = parse_deallocate(sql)
                    && encoding.charset.reads(sql)
                    && (self.carried.statements.remove(&name)
                        || self.carried.listen_tx.statements.remove(&name[..]).is_some())
                {
                    server
                        .expect
                        .push(Expect::Synthetic(Synthetic::QueryDone("DEALLOCATE")), Recipient::Client);
                    return Ok(Disposition::Consumed);
                }
                if manage
                    && encoding.charset.reads(sql)
                    && let Some(execute) = parse_execute(sql)
                    && let Some(statement) = self.carried.statements.get(&execute.name)
                {
                    // A statement the client prepared with Parse, run with SQL EXECUTE:
                    // under the name it has on the server.
                    self.writes.note(&statement.class);
                    self.batch_end = BatchEnd::Unknown;
                    let server = &mut *self.server;
                    if !server.statements.contains(&statement.server_name) {
                        // A Sync of pgrelay's own ends the injected Parse: the server skips
                        // up to a Sync after an error, and would skip the Query too.
                        prepare(
                            server,
                            &statement,
                            ParseFor::Execute,
                            self.mode.max_prepared_statements,
                            self.metrics,
                        );
                        server.outbuf.extend_from_slice(&SYNC);
                        server.expect.push(Expect::Ready, Recipient::Pgrelay);
                    }
                    server.statements.touch(&statement.server_name);
                    server
                        .outbuf
                        .extend_from_slice(&execute_query(&statement.server_name, execute.arguments));
                    server.expect.push(Expect::ResultsUntilReady, Recipient::Client);
                    return Ok(Disposition::Consumed);
                }
                server.expect.push(Expect::ResultsUntilReady, Recipient::Client);
                let class = self.classifier.classify_text(sql, encoding.charset);
                note_savepoint(self.carried, &class);
                if !class.session.is_empty() {
                    self.note_effects(&class.session);
                }
                self.writes.note(&class);
                self.batch_end = self.batch_end.statement(&class);
                Disposition::Forward
            }
            FrontendTag::FunctionCall => {
                self.hold = self.mode.single_unit;
                self.batch_end = BatchEnd::Unknown;
                self.writes.note_tables(&crate::route::Tables::Unknown);
                server.expect.push(Expect::ResultsUntilReady, Recipient::Client);
                Disposition::Forward
            }
            FrontendTag::Parse => {
                server.state.extended_sent();
                let parse = ParseView::read(body).map_err(malformed)?;
                let encoding = text_encoding(&self.pending, self.carried);
                if !manage || parse.name.is_empty() {
                    server.expect.push(
                        Expect::ParseComplete {
                            statement: None,
                            definition: None,
                        },
                        Recipient::Client,
                    );
                    let class = self.classifier.classify_text(parse.query, encoding.charset);
                    self.batch_parsed_unnamed |= parse.name.is_empty();
                    note_savepoint(self.carried, &class);
                    if !class.session.is_empty() {
                        self.note_effects(&class.session);
                    }
                    self.writes.note(&class);
                    self.batch_end = self.batch_end.statement(&class);
                    return Ok(Disposition::Forward);
                }
                if let Err(refusal) = self
                    .carried
                    .statements
                    .admits(&parse, self.mode.max_client_prepared_statements)
                {
                    let mut error = bytes::BytesMut::new();
                    compose::error(
                        &mut error,
                        Severity::Error,
                        crate::error::sqlstate::CONFIGURATION_LIMIT_EXCEEDED,
                        &refusal.message,
                    );
                    refuse(server, error.freeze());
                    return Ok(Disposition::Consumed);
                }
                let carried = &mut *self.carried;
                let search_path = carried.wanted.get("search_path");
                let epoch = self.schema.epoch();
                let (statement, definition) =
                    carried
                        .statements
                        .define(&parse, self.classifier, search_path, encoding, epoch);
                let checked = server
                    .statements
                    .contains(&statement.server_name)
                    .then(|| checked_parse(&parse));
                note_savepoint(self.carried, &statement.class);
                if !statement.class.session.is_empty() {
                    let effects = statement.class.session.clone();
                    self.note_effects(&effects);
                }
                let server = &mut *self.server;
                if let Some((check, close)) = checked {
                    server.statements.touch(&statement.server_name);
                    server.outbuf.extend_from_slice(&check);
                    server.expect.push(
                        Expect::ParseComplete {
                            statement: None,
                            definition: Some(definition),
                        },
                        Recipient::Client,
                    );
                    server.outbuf.extend_from_slice(&close);
                    server
                        .expect
                        .push(Expect::CloseComplete { statement: None }, Recipient::Pgrelay);
                } else {
                    prepare(
                        server,
                        &statement,
                        ParseFor::Client(definition),
                        self.mode.max_prepared_statements,
                        self.metrics,
                    );
                }
                Disposition::Consumed
            }
            FrontendTag::Bind => {
                server.state.extended_sent();
                let bind = BindView::read(body).map_err(malformed)?;
                let statement = (manage && !bind.statement.is_empty())
                    .then(|| self.carried.statements.get(bind.statement))
                    .flatten();
                let Some(statement) = statement else {
                    let known = bind.statement.is_empty() && self.batch_parsed_unnamed;
                    server
                        .expect
                        .push(Expect::BindComplete { statement: None }, Recipient::Client);
                    if !known {
                        // Prepared in an earlier batch without pgrelay keeping its text.
                        self.batch_end = BatchEnd::Unknown;
                    }
                    return Ok(Disposition::Forward);
                };
                if let Some(stale) = self.schema.refusal(&statement.server_name) {
                    // A server found its plan stale after a schema change: it fails here
                    // too, as on the client's own server, until the client prepares it
                    // again (which gives it a new name).
                    refuse(server, stale.error);
                    return Ok(Disposition::Consumed);
                }
                self.writes.note(&statement.class);
                self.batch_end = self.batch_end.statement(&statement.class);
                let server = &mut *self.server;
                ensure_prepared(server, &statement, self.mode.max_prepared_statements, self.metrics);
                server
                    .outbuf
                    .extend_from_slice(&rewrite_bind(&bind, &statement.server_name));
                server.expect.push(
                    Expect::BindComplete {
                        statement: Some(statement.server_name.clone()),
                    },
                    Recipient::Client,
                );
                Disposition::Consumed
            }
            FrontendTag::Describe => {
                server.state.extended_sent();
                server.expect.push(Expect::Description, Recipient::Client);
                let object = ObjectRef::read(body).map_err(malformed)?;
                match self.managed_statement(object) {
                    Some(statement) => {
                        let server = &mut *self.server;
                        ensure_prepared(server, &statement, self.mode.max_prepared_statements, self.metrics);
                        server
                            .outbuf
                            .extend_from_slice(&describe_statement(&statement.server_name));
                        Disposition::Consumed
                    }
                    None => Disposition::Forward,
                }
            }
            FrontendTag::Close => {
                server.state.extended_sent();
                let object = ObjectRef::read(body).map_err(malformed)?;
                if manage && object.kind == ObjectKind::Statement && !object.name.is_empty() {
                    // The server keeps the statement for other clients; the client only
                    // loses its name for it. Closing an unknown name is no error.
                    self.carried.statements.remove(object.name);
                    self.server
                        .expect
                        .push(Expect::Synthetic(Synthetic::CloseComplete), Recipient::Client);
                    return Ok(Disposition::Consumed);
                }
                server
                    .expect
                    .push(Expect::CloseComplete { statement: None }, Recipient::Client);
                Disposition::Forward
            }
            FrontendTag::Execute => {
                self.unit_started.get_or_insert_with(Instant::now);
                server.state.extended_sent();
                server.expect.push(Expect::ExecuteResult, Recipient::Client);
                Disposition::Forward
            }
            FrontendTag::Sync => {
                self.hold = self.mode.single_unit;
                if server.state.client_sending_copy() {
                    // The server ignores a Sync in the middle of COPY FROM STDIN.
                    return Ok(Disposition::Forward);
                }
                server.state.synced();
                server.expect.push(Expect::Ready, Recipient::Client);
                Disposition::Forward
            }
            FrontendTag::Flush => Disposition::Forward,
            // Data may come right behind the COPY statement, before the server has said
            // it is in COPY mode; after a failed COPY the client may still send the rest
            // of it. PostgreSQL ignores COPY messages outside COPY mode.
            FrontendTag::CopyData => {
                if takes_copy_data(server) {
                    Disposition::Forward
                } else {
                    Disposition::Consumed
                }
            }
            FrontendTag::CopyDone | FrontendTag::CopyFail => {
                if server.state.client_sending_copy() {
                    server.state.client_ended_copy();
                    Disposition::Forward
                } else if takes_copy_data(server) {
                    server.expect.push(Expect::CopyEndSent, Recipient::Client);
                    Disposition::Forward
                } else {
                    Disposition::Consumed
                }
            }
            FrontendTag::Terminate => return Err(PumpExit::ClientGone),
            FrontendTag::Password => return Err(PumpExit::ClientBroke(ProtocolError::UnexpectedTag(tag.byte()))),
        })
    }

    /// The statement a Describe names, if pgrelay manages it.
    fn managed_statement(&self, object: ObjectRef<'_>) -> Option<Arc<PreparedStatement>> {
        if !self.mode.manage_statements || object.kind != ObjectKind::Statement || object.name.is_empty() {
            return None;
        }
        self.carried.statements.get(object.name)
    }
}

/// Answers the client's message with an error of pgrelay's, in the place of the
/// stream it would have had: a Parse the server is sure to refuse goes in its stead, so
/// the server skips the rest of the batch as the client expects, and its error is
/// replaced by this one.
fn refuse(server: &mut ServerConn, error: bytes::Bytes) {
    server.outbuf.extend_from_slice(&refused_parse());
    server.expect.push(Expect::Refused { error }, Recipient::Client);
}

/// A Sync message.
const SYNC: [u8; 5] = [b'S', 0, 0, 0, 4];

/// The encoding the client's next text is in: the one its settings name, unless a
/// statement that may change it has not settled yet (then it is in doubt, and only ASCII
/// text is read).
pub(super) fn text_encoding(pending: &PendingEffects, carried: &Carried) -> ClientEncoding {
    if pending.any(may_change_encoding) {
        ClientEncoding::UNKNOWN
    } else {
        carried.client_encoding()
    }
}

/// COPY messages from the client go to the server while it is in COPY mode or may
/// still enter it (it owes replies); otherwise they are leftovers of a failed COPY.
fn takes_copy_data(server: &ServerConn) -> bool {
    server.state.in_copy() || !server.expect.is_empty()
}

/// Messages that begin a client batch, or belong to the one begun (COPY data, Flush and
/// Terminate do neither).
fn opens_or_continues_batch(tag: FrontendTag) -> bool {
    matches!(
        tag,
        FrontendTag::Query
            | FrontendTag::FunctionCall
            | FrontendTag::Parse
            | FrontendTag::Bind
            | FrontendTag::Describe
            | FrontendTag::Close
            | FrontendTag::Execute
            | FrontendTag::Sync
    )
}

/// Messages that may be rewritten or replaced when pgrelay manages prepared statements.
fn rewrites(tag: FrontendTag) -> bool {
    matches!(
        tag,
        FrontendTag::Query | FrontendTag::Parse | FrontendTag::Bind | FrontendTag::Describe | FrontendTag::Close
    )
}

/// Prepares `statement` on the server first if it does not hold it yet; the reply is
/// pgrelay's own.
fn ensure_prepared(server: &mut ServerConn, statement: &PreparedStatement, limit: usize, metrics: &SessionMetrics) {
    if server.statements.contains(&statement.server_name) {
        server.statements.touch(&statement.server_name);
    } else {
        prepare(server, statement, ParseFor::Batch, limit, metrics);
    }
}

/// Whose Parse of a managed statement pgrelay sends, which decides who gets its reply.
#[derive(Debug, Clone, Copy)]
enum ParseFor {
    /// The client's own Parse of this definition: the reply is the client's.
    Client(u64),
    /// pgrelay's, ahead of a client's Bind or Describe in the same batch; an error is
    /// the client's too (the server skips the rest of its batch).
    Batch,
    /// pgrelay's, ahead of a client's SQL EXECUTE, with a Sync of its own; an error is
    /// the client's, and the EXECUTE's own error behind it is not passed on.
    Execute,
}

/// Sends the Parse of `statement`, closing first a stale copy of it and the least
/// recently used statement if the server holds `limit` already.
fn prepare(
    server: &mut ServerConn,
    statement: &PreparedStatement,
    parse_for: ParseFor,
    limit: usize,
    metrics: &SessionMetrics,
) {
    if let Some(stale) = server.statements.take_stale(&statement.server_name) {
        server.outbuf.extend_from_slice(&close_statement(&stale));
        server
            .expect
            .push(Expect::CloseComplete { statement: Some(stale) }, Recipient::Pgrelay);
    }
    if let Some(evicted) = server.statements.insert(statement.server_name.clone(), limit) {
        server.outbuf.extend_from_slice(&close_statement(&evicted));
        server.expect.push(
            Expect::CloseComplete {
                statement: Some(evicted),
            },
            Recipient::Pgrelay,
        );
        metrics.prepared_statements_evicted(1);
    }
    server.outbuf.extend_from_slice(&statement.parse);
    let statement = statement.server_name.clone();
    let (expect, recipient) = match parse_for {
        ParseFor::Client(definition) => (
            Expect::ParseComplete {
                statement: Some(statement),
                definition: Some(definition),
            },
            Recipient::Client,
        ),
        ParseFor::Batch => (
            Expect::ParseComplete {
                statement: Some(statement),
                definition: None,
            },
            Recipient::Pgrelay,
        ),
        ParseFor::Execute => (Expect::ParseForExecute { statement }, Recipient::Pgrelay),
    };
    server.expect.push(expect, recipient);
}

/// A SAVEPOINT on its way: from now on in this transaction a LISTEN goes to the server
/// (see `listen`).
fn note_savepoint(carried: &mut Carried, class: &crate::route::Classification) {
    if matches!(class.transaction, Some(crate::route::TxControl::Savepoint { .. })) {
        carried.listen_tx.savepoint = true;
    }
}
