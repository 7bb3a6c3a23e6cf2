//! What the pump does with each message from the server: forward what belongs to the
//! client, swallow the replies to pgrelay's own messages, and track the server's state
//! (transaction status, settings, COPY, prepared statements that went stale).

use bytes::Buf;

use super::{Pump, PumpExit, move_bytes};
use crate::error::MessageText;
use crate::protocol::views::{ErrorFields, command_tag, parameter_status, ready_status};
use crate::protocol::{BackendTag, HEADER_LEN, Header, TxStatus};
use crate::runtime::StaleStatement;
use crate::upstream::{FailedAt, Recipient, Routing, ServerFatal, SessionParams};

/// Largest server message pgrelay buffers whole (DataRow and CopyData are streamed).
const SERVER_MESSAGE_LIMIT: usize = 256 * 1024 * 1024;

/// SQLSTATEs of a Bind that show the server-side statement itself is unusable: a
/// cached plan whose result type changed after DDL (0A000), or a statement the server
/// no longer has (26000).
const STALE_STATEMENT_CODES: &[&str] = &["0A000", "26000"];

/// Whether an error answering a Bind shows its statement's plan is stale: one of
/// STALE_STATEMENT_CODES, or the internal error a plan referring to a type that was
/// dropped (and maybe created again under a new OID) gets.
fn shows_stale_statement(code: &str, message: &[u8]) -> bool {
    STALE_STATEMENT_CODES.contains(&code) || (code == "XX000" && message.starts_with(b"cache lookup failed for type"))
}

/// Largest refusal kept to be replayed to other clients: the server's own is a few
/// hundred bytes; anything much larger is not that error.
const MAX_REPLAYED_ERROR: usize = 4096;

/// Whether an error is PostgreSQL's plan cache refusing a statement whose result type a
/// schema change altered (`cached plan must not change result type`, raised in
/// RevalidateCachedQuery), which every connection holding the statement would give too.
/// Other 0A000 errors at Bind can come from the parameter values (a function folded at
/// plan time) and are the client's alone.
fn is_stale_plan_refusal(fields: &ErrorFields<'_>) -> bool {
    fields.code == "0A000" && fields.routine == "RevalidateCachedQuery"
}

/// Whether a command tag is that of a schema change, after which prepared statements'
/// plans may be stale (`ALTER TABLE`, `DROP TYPE`, `CREATE OR REPLACE VIEW`…).
fn changes_schema(tag: &str) -> bool {
    ["ALTER ", "DROP ", "CREATE ", "COMMENT", "IMPORT FOREIGN SCHEMA"]
        .iter()
        .any(|prefix| tag.starts_with(prefix))
}

impl Pump<'_> {
    /// Handles the server's input: forwards what belongs to the client, swallows the
    /// replies to pgrelay's own messages, and tracks the server's state.
    pub(super) fn on_server_input(&mut self) -> Result<(), PumpExit> {
        // Bytes at the front of the server input that go to the client unchanged.
        let mut run = 0;
        let result = loop {
            let server = &mut *self.server;
            if let Some((n, to)) = server.state.passed_through(server.inbuf.len() - run) {
                if n == 0 {
                    break Ok(());
                }
                if to == Recipient::Client {
                    self.replied = true;
                    run += n;
                } else {
                    move_bytes(&mut server.inbuf, run, &mut self.client.outbuf);
                    server.inbuf.advance(n);
                    run = 0;
                }
                continue;
            }
            let rest = &server.inbuf[run..];
            let header = match Header::peek(rest) {
                Ok(Some(header)) => header,
                Ok(None) => break Ok(()),
                Err(error) => break Err(self.server_broke(error.to_string())),
            };
            let Some(tag) = BackendTag::from_byte(header.tag) else {
                break Err(self.server_broke(format!("unknown message type {}", header.tag)));
            };
            if tag.is_streamable() && header.len > rest.len() {
                match server.expect.on_message(tag) {
                    Ok(routing) => {
                        server.state.passthrough_started(header.len, routing.recipient);
                        if self.hold_metadata && routing.recipient == Recipient::Client {
                            move_bytes(&mut self.server.inbuf, run, &mut self.client.outbuf);
                            run = 0;
                            self.release_held();
                        }
                        continue;
                    }
                    Err(error) => break Err(self.server_broke(error.to_string())),
                }
            }
            if header.len > rest.len() {
                if header.len > SERVER_MESSAGE_LIMIT {
                    break Err(self.server_broke(format!("message of {} bytes", header.len)));
                }
                server.inbuf.reserve(header.len - rest.len());
                break Ok(());
            }
            let routing = match server.expect.on_message(tag) {
                Ok(routing) => routing,
                // A server that is being shut down or terminated says so with a FATAL
                // error while idle, then closes: remember why.
                Err(_) if tag == BackendTag::ErrorResponse && server.expect.is_empty() => Routing {
                    recipient: Recipient::Pgrelay,
                    ..Routing::default()
                },
                Err(error) => break Err(self.server_broke(error.to_string())),
            };
            let to_client = match self.inspect(tag, run, header.len, &routing) {
                Ok(to_client) => to_client,
                Err(exit) => {
                    move_bytes(&mut self.server.inbuf, run, &mut self.client.outbuf);
                    self.server.inbuf.advance(header.len);
                    run = 0;
                    break Err(exit);
                }
            };
            if to_client && self.catch_refusal && self.hold_metadata && tag == BackendTag::ErrorResponse {
                let message = &self.server.inbuf[run..run + header.len];
                if let Some(exit) = super::refusal::refused(message) {
                    self.server.inbuf.advance(header.len);
                    self.held.clear();
                    crate::net::buffers::give_back(&mut self.held);
                    break Err(exit);
                }
            }
            if to_client && self.hold_metadata {
                // Nothing has gone to the client yet (`run` is empty): hold what carries no
                // data, release it all before the first reply that does, or once holding
                // more would take more memory than a client's output may (the batch can then
                // no longer run again unseen).
                if carries_no_data(tag) && self.held.len() + header.len <= super::HIGH_WATER {
                    crate::net::buffers::ensure(&mut self.held);
                    self.held.extend_from_slice(&self.server.inbuf[run..run + header.len]);
                    self.server.inbuf.advance(header.len);
                    continue;
                }
                self.release_held();
            }
            if let Some(error) = &routing.replaced_by {
                // The server's error stands for one pgrelay raised: the client gets that.
                move_bytes(&mut self.server.inbuf, run, &mut self.client.outbuf);
                self.server.inbuf.advance(header.len);
                run = 0;
                self.replied = true;
                self.client.outbuf.extend_from_slice(error);
            } else if to_client {
                self.replied = true;
                run += header.len;
            } else {
                move_bytes(&mut self.server.inbuf, run, &mut self.client.outbuf);
                self.server.inbuf.advance(header.len);
                run = 0;
            }
            if self.server.expect.has_synthetic_head() {
                move_bytes(&mut self.server.inbuf, run, &mut self.client.outbuf);
                run = 0;
                self.emit_synthetic();
            }
        };
        move_bytes(&mut self.server.inbuf, run, &mut self.client.outbuf);
        result
    }

    /// Looks at one whole server message (at `start..start + len` of the input) and
    /// updates state; true if it goes to the client.
    fn inspect(&mut self, tag: BackendTag, start: usize, len: usize, routing: &Routing) -> Result<bool, PumpExit> {
        let server = &mut *self.server;
        let body = &server.inbuf[start + HEADER_LEN..start + len];
        let to_client = routing.recipient == Recipient::Client;
        match tag {
            BackendTag::ReadyForQuery => {
                let Ok(status) = ready_status(body) else {
                    return Err(self.server_broke("bad ReadyForQuery".to_owned()));
                };
                server.state.ready(status);
                if !to_client {
                    if self.fence.is_pending() && routing.ready && routing.answered_query {
                        self.fence_captured();
                    }
                    return Ok(false);
                }
                self.finish_unit();
                self.error_since_ready = false;
                let took = self.carried.listen_tx.ready(status == TxStatus::Idle);
                super::listen::took_effect(self.carried, took);
                if self.mode.statement_mode && status != TxStatus::Idle {
                    return Err(PumpExit::TransactionInStatementMode);
                }
                if status == TxStatus::Idle {
                    if std::mem::take(&mut self.schema_changed) {
                        self.schema.changed();
                    }
                    self.metrics.transaction(self.mode.role);
                    self.settle_effects();
                    if self.transaction_ended() {
                        return Ok(false);
                    }
                } else {
                    self.transaction_continues();
                }
                Ok(true)
            }
            BackendTag::ErrorResponse => {
                let fields = ErrorFields::read(body).unwrap_or_default();
                if fields.is_fatal() {
                    // The server closes right after; the client hears of it once, as
                    // the failure of its server connection. A COPY it ends is lost, not
                    // failed: the messages the server read in COPY mode stay ignored.
                    server.state.server_ended(ServerFatal {
                        sqlstate: fields.code.to_owned(),
                        message: MessageText::from_server(fields.message),
                    });
                    return Ok(false);
                }
                server.state.copy_ended();
                if to_client {
                    self.pending.failed();
                    self.carried.listen_tx.failed();
                    self.error_since_ready = true;
                }
                if let Some(definition) = routing.failed_definition {
                    self.carried.statements.undefine(definition);
                }
                for name in &routing.skipped_statements {
                    server.statements.mark_unknown(name.clone());
                }
                for definition in &routing.skipped_definitions {
                    self.carried.statements.undefine(*definition);
                }
                match &routing.failed_statement {
                    Some((FailedAt::Parse, name)) => server.statements.mark_stale(name.clone()),
                    Some((FailedAt::Bind, name)) if shows_stale_statement(fields.code, fields.message) => {
                        server.statements.mark_stale(name.clone());
                        let error = &server.inbuf[start..start + len];
                        if is_stale_plan_refusal(&fields) && error.len() <= MAX_REPLAYED_ERROR {
                            // The server's plan cache refused it after a schema change:
                            // other connections hold it stale too. Clients that use it get
                            // this error wherever they run it, as each would from its own
                            // server; one that prepares it again (as drivers do on this
                            // error) gets a new statement.
                            let error = bytes::Bytes::copy_from_slice(error);
                            self.schema.refused(name.clone(), StaleStatement { error });
                        } else if fields.code == "XX000" {
                            // A type it used was dropped: a statement prepared again gets
                            // a new name. (26000 only says this connection lost it, and
                            // another 0A000 may come from the parameter values: neither
                            // says anything about the schema or other connections.)
                            self.schema.changed();
                        }
                    }
                    _ => {}
                }
                if !to_client && !routing.expected_failure {
                    if server.expect.is_empty() {
                        return Err(self.server_broke("error outside any request".to_owned()));
                    }
                    tracing::warn!(server = %server.addr(), sqlstate = fields.code, message = %String::from_utf8_lossy(fields.message),
                        "a statement pgrelay sent on its own failed");
                }
                Ok(to_client)
            }
            BackendTag::CommandComplete => {
                if server.state.in_copy() {
                    server.expect.copy_succeeded();
                }
                server.state.copy_ended();
                if to_client && let Ok(tag) = command_tag(body) {
                    self.pending.completed(tag);
                    let took = self.carried.listen_tx.completed(tag);
                    super::listen::took_effect(self.carried, took);
                    if changes_schema(tag) {
                        // At once, for the statements this client prepares next in its
                        // transaction, and again when it ends (see `schema_changed`).
                        self.schema.changed();
                        self.schema_changed = true;
                    }
                    match tag {
                        // Every prepared statement and setting of the server is gone.
                        "DISCARD ALL" => {
                            server.statements.clear();
                            server.params = SessionParams::default();
                            self.carried.statements.clear();
                            self.carried.wanted = self.carried.startup.clone();
                        }
                        "DEALLOCATE ALL" => {
                            server.statements.clear();
                            self.carried.statements.clear();
                        }
                        _ => {}
                    }
                }
                Ok(to_client)
            }
            BackendTag::ParameterStatus => {
                if let Ok((name, value)) = parameter_status(body) {
                    let (name, value) = (name.to_owned(), value.to_owned());
                    server.note_parameter(&name, &value);
                    server.params.set(&name, &value);
                    if to_client {
                        self.carried.wanted.set(&name, &value);
                    }
                }
                Ok(to_client)
            }
            BackendTag::DataRow if !to_client => {
                self.fence
                    .answered(first_text_value(body).and_then(|text| text.parse().ok()));
                Ok(false)
            }
            BackendTag::CopyInResponse | BackendTag::CopyBothResponse => {
                let start = server.expect.copy_started();
                server.state.copy_started(start);
                Ok(to_client)
            }
            BackendTag::Authentication | BackendTag::BackendKeyData | BackendTag::NegotiateProtocolVersion => Ok(false),
            BackendTag::NotificationResponse
            | BackendTag::NoticeResponse
            | BackendTag::BindComplete
            | BackendTag::CloseComplete
            | BackendTag::CopyData
            | BackendTag::CopyDone
            | BackendTag::CopyOutResponse
            | BackendTag::DataRow
            | BackendTag::EmptyQueryResponse
            | BackendTag::FunctionCallResponse
            | BackendTag::NoData
            | BackendTag::ParameterDescription
            | BackendTag::ParseComplete
            | BackendTag::PortalSuspended
            | BackendTag::RowDescription => Ok(to_client),
        }
    }
}

/// Replies that only acknowledge or describe, and notices: a client that got them and
/// then lost its server has seen nothing of the statement's outcome. (An immediate
/// shutdown tells its clients with a WARNING, not a FATAL, before it cuts them off.)
fn carries_no_data(tag: BackendTag) -> bool {
    matches!(
        tag,
        BackendTag::ParseComplete
            | BackendTag::BindComplete
            | BackendTag::ParameterDescription
            | BackendTag::RowDescription
            | BackendTag::NoData
            | BackendTag::NoticeResponse
    )
}

/// The first column of a DataRow as text.
fn first_text_value(body: &[u8]) -> Option<&str> {
    let len = body.get(2..6).map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))?;
    let len = usize::try_from(len).ok()?;
    std::str::from_utf8(body.get(6..6 + len)?).ok()
}
