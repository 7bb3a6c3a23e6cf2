//! What pgrelay answers itself when no server is attached: a lone Sync or Flush, stray
//! COPY messages after a failed COPY, the rest of a batch that already failed, and the
//! statements of a transaction whose server was lost.

use bytes::BytesMut;

use crate::error::{ClientError, MessageText, Side, sqlstate};
use crate::protocol::compose::{self, Severity};
use crate::protocol::views::{ObjectKind, ObjectRef, ParseView, query_text};
use crate::protocol::{Frame, FrontendTag, TxStatus};
use crate::route::{Charset, Classifier, Isolation, TxControl};

/// The client's transaction state while no server is attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum LocalTx {
    /// Outside a transaction block: the next statement may go to any server.
    Idle,
    /// The server that held the client's transaction failed. As PostgreSQL does after an
    /// error in a transaction block, statements are refused until the client ends the
    /// block. The first refusal is the failure itself if the client has not heard of it.
    Aborted { failure: ClientError, reported: bool },
    /// `transactions = "first_statement"`: the client's BEGIN was answered by pgrelay
    /// and is held back, to be sent with the first statement to wherever that goes.
    DeferredBegin { sql: String },
}

/// What the session should do with the client's next message.
#[derive(Debug)]
pub(super) enum Answer {
    /// Handled here; any reply is in the client's output buffer.
    Answered,
    /// The message needs a server.
    NeedsServer,
    /// The client said goodbye.
    Terminate,
    /// The client broke the protocol.
    Broke(ClientError),
}

#[derive(Debug)]
pub(super) struct LocalState {
    pub tx: LocalTx,
    /// An error was reported in the middle of an extended-protocol batch: the rest of it
    /// is dropped up to its Sync, as a server would.
    pub skipping_to_sync: bool,
    /// In an aborted transaction the client sent an extended-protocol ROLLBACK: its
    /// Bind/Execute are acknowledged and its Sync ends the block.
    rollback_pending: bool,
}

impl LocalState {
    pub fn new() -> Self {
        LocalState {
            tx: LocalTx::Idle,
            skipping_to_sync: false,
            rollback_pending: false,
        }
    }

    pub fn status(&self) -> TxStatus {
        match self.tx {
            LocalTx::Idle => TxStatus::Idle,
            LocalTx::Aborted { .. } => TxStatus::Failed,
            LocalTx::DeferredBegin { .. } => TxStatus::InTransaction,
        }
    }

    /// Looks at the first whole message of `inbuf` (the caller made sure it is there)
    /// and answers it if no server is needed, consuming it.
    /// With `defer_begin` (the classifier, and how the client's text reads), a lone BEGIN
    /// is answered here and held back (`transactions = "first_statement"`).
    pub fn answer(
        &mut self,
        tag: FrontendTag,
        inbuf: &mut BytesMut,
        out: &mut BytesMut,
        defer_begin: Option<(&Classifier, Charset)>,
    ) -> Answer {
        match tag {
            FrontendTag::Terminate => return Answer::Terminate,
            FrontendTag::Password => {
                return Answer::Broke(ClientError::protocol_violation("unexpected password message"));
            }
            FrontendTag::Query if !self.skipping_to_sync => {
                if let Some(answer) = self.answer_deferred(inbuf, out, defer_begin) {
                    return answer;
                }
            }
            _ => {}
        }
        let skipping = self.skipping_to_sync;
        let aborted = matches!(self.tx, LocalTx::Aborted { .. });
        let needs_server = !matches!(
            tag,
            FrontendTag::Sync
                | FrontendTag::Flush
                | FrontendTag::CopyData
                | FrontendTag::CopyDone
                | FrontendTag::CopyFail
        );
        if needs_server && !skipping && !aborted {
            return Answer::NeedsServer;
        }
        let Some(frame) = take_frame(inbuf) else {
            return Answer::Broke(ClientError::protocol_violation("incomplete message"));
        };
        match tag {
            FrontendTag::Sync => {
                if self.rollback_pending {
                    self.rollback_pending = false;
                    self.tx = LocalTx::Idle;
                }
                self.skipping_to_sync = false;
                compose::ready_for_query(out, self.status());
            }
            FrontendTag::Flush | FrontendTag::CopyData | FrontendTag::CopyDone | FrontendTag::CopyFail => {}
            _ if skipping => {}
            FrontendTag::Query => match query_text(frame.body()) {
                Ok(sql) if self.may_end_lost_transaction(sql, out) => {
                    self.tx = LocalTx::Idle;
                    compose::command_complete(out, "ROLLBACK");
                    compose::ready_for_query(out, TxStatus::Idle);
                }
                Ok(sql) => {
                    self.refuse_in_aborted(sql, out);
                    compose::ready_for_query(out, self.status());
                }
                Err(error) => return Answer::Broke(ClientError::protocol_violation(error.to_string())),
            },
            FrontendTag::FunctionCall => {
                self.refuse_in_aborted(b"", out);
                compose::ready_for_query(out, self.status());
            }
            FrontendTag::Parse => match ParseView::read(frame.body()) {
                Ok(parse) if self.may_end_lost_transaction(parse.query, out) => {
                    self.rollback_pending = true;
                    compose::parse_complete(out);
                }
                Ok(parse) => self.refuse_extended(parse.query, out),
                Err(error) => return Answer::Broke(ClientError::protocol_violation(error.to_string())),
            },
            FrontendTag::Bind if self.rollback_pending => compose::bind_complete(out),
            FrontendTag::Execute if self.rollback_pending => compose::command_complete(out, "ROLLBACK"),
            FrontendTag::Close if self.rollback_pending => compose::close_complete(out),
            FrontendTag::Describe if self.rollback_pending => {
                if let Ok(ObjectRef {
                    kind: ObjectKind::Statement,
                    ..
                }) = ObjectRef::read(frame.body())
                {
                    compose::parameter_description_none(out);
                }
                compose::no_data(out);
            }
            FrontendTag::Bind | FrontendTag::Execute | FrontendTag::Close | FrontendTag::Describe => {
                self.refuse_extended(b"", out)
            }
            FrontendTag::Terminate | FrontendTag::Password => {}
        }
        Answer::Answered
    }

    /// Holds back a lone BEGIN, or ends a held-back transaction that never ran anything.
    fn answer_deferred(
        &mut self,
        inbuf: &mut BytesMut,
        out: &mut BytesMut,
        defer_begin: Option<(&Classifier, Charset)>,
    ) -> Option<Answer> {
        let header = crate::protocol::Header::peek(inbuf).ok()??;
        let sql = query_text(inbuf.get(crate::protocol::HEADER_LEN..header.len)?).ok()?;
        match (&self.tx, defer_begin) {
            (LocalTx::Idle, Some((classifier, charset))) => {
                let class = classifier.classify_text(sql, charset);
                let lone_begin = class.statements == 1
                    && class.session.is_empty()
                    && matches!(
                        class.transaction,
                        // Only a plain BEGIN is held back: READ WRITE or SERIALIZABLE would
                        // be refused by the replica its first statement may go to.
                        Some(TxControl::Begin {
                            read_only: None,
                            isolation: None
                                | Some(
                                    Isolation::ReadCommitted | Isolation::ReadUncommitted | Isolation::RepeatableRead
                                ),
                        })
                    );
                if !lone_begin {
                    return None;
                }
                // Held as text to be sent as it came; a BEGIN whose comments are not UTF-8
                // simply goes to the server at once.
                let sql = std::str::from_utf8(sql).ok()?;
                self.tx = LocalTx::DeferredBegin { sql: sql.to_owned() };
                take_frame(inbuf);
                compose::command_complete(out, "BEGIN");
                compose::ready_for_query(out, TxStatus::InTransaction);
                Some(Answer::Answered)
            }
            (LocalTx::DeferredBegin { .. }, _) if ends_transaction(sql) => {
                let tag = if is_rollback(sql) { "ROLLBACK" } else { "COMMIT" };
                self.tx = LocalTx::Idle;
                take_frame(inbuf);
                compose::command_complete(out, tag);
                compose::ready_for_query(out, TxStatus::Idle);
                Some(Answer::Answered)
            }
            _ => None,
        }
    }

    /// Reports `error` for the first message of the input, which could not be served,
    /// and drops it (or, for the extended protocol, its whole batch up to Sync).
    pub fn fail_first(&mut self, tag: FrontendTag, inbuf: &mut BytesMut, out: &mut BytesMut, error: &ClientError) {
        compose::error(out, Severity::Error, &error.sqlstate, &error.message);
        // Taken in every case: what follows of an extended batch is skipped up to its
        // Sync, as a server skips it after an error.
        take_frame(inbuf);
        match tag {
            FrontendTag::Query | FrontendTag::FunctionCall => compose::ready_for_query(out, self.status()),
            FrontendTag::Sync => {
                self.skipping_to_sync = false;
                compose::ready_for_query(out, self.status());
            }
            _ => self.skipping_to_sync = true,
        }
    }

    /// Whether `sql` ends the lost transaction now: only a ROLLBACK (or ABORT) does, as
    /// the client asked; if the client has not heard of the loss yet, it gets it as a
    /// warning. A COMMIT never does: it fails with the loss, however often it is sent,
    /// never answered with the ROLLBACK tag PostgreSQL gives the end of a failed block,
    /// which drivers take for success (some never see the first error: tokio-postgres,
    /// for one, drops the reply to the Close it sends in the background).
    fn may_end_lost_transaction(&mut self, sql: &[u8], out: &mut BytesMut) -> bool {
        if !is_rollback(sql) {
            return false;
        }
        match &mut self.tx {
            LocalTx::Aborted { reported: true, .. } => true,
            LocalTx::Aborted { failure, reported } => {
                *reported = true;
                compose::notice(
                    out,
                    &failure.sqlstate,
                    &MessageText::quoting(
                        "the transaction was already lost with its server: ",
                        &failure.message,
                        "",
                    ),
                );
                true
            }
            LocalTx::Idle | LocalTx::DeferredBegin { .. } => false,
        }
    }

    /// Refuses `sql` (empty when not a simple query) in the lost transaction. The server's
    /// reason is quoted as its bytes: it is in the client's encoding.
    fn refuse_in_aborted(&mut self, sql: &[u8], out: &mut BytesMut) {
        let error = match &mut self.tx {
            LocalTx::Aborted { failure, reported } if !*reported => {
                *reported = true;
                failure.clone()
            }
            LocalTx::Aborted { failure, .. } if ends_transaction(sql) => ClientError::new(
                Side::Server,
                failure.sqlstate.clone(),
                MessageText::quoting(
                    "the transaction was lost with its server and cannot commit (",
                    &failure.message,
                    "); end it with ROLLBACK",
                ),
            ),
            LocalTx::Aborted { failure, .. } => ClientError::new(
                Side::Server,
                sqlstate::IN_FAILED_TRANSACTION,
                MessageText::quoting(
                    "current transaction is aborted, commands ignored until end of transaction block (",
                    &failure.message,
                    ")",
                ),
            ),
            LocalTx::Idle | LocalTx::DeferredBegin { .. } => return,
        };
        compose::error(out, Severity::Error, &error.sqlstate, &error.message);
    }

    fn refuse_extended(&mut self, sql: &[u8], out: &mut BytesMut) {
        self.refuse_in_aborted(sql, out);
        self.skipping_to_sync = true;
    }
}

/// Splits the first whole message off `inbuf`.
fn take_frame(inbuf: &mut BytesMut) -> Option<Frame> {
    let header = crate::protocol::Header::peek(inbuf).ok()??;
    if inbuf.len() < header.len {
        return None;
    }
    Frame::from_bytes(inbuf.split_to(header.len).freeze()).ok()
}

/// The words of `sql`, split at ASCII whitespace: only keywords are compared, and no
/// client encoding has whitespace bytes inside its characters.
fn words(sql: &[u8]) -> impl Iterator<Item = &[u8]> {
    sql.split(u8::is_ascii_whitespace).filter(|word| !word.is_empty())
}

/// True for ROLLBACK and ABORT (not ROLLBACK TO SAVEPOINT or ROLLBACK PREPARED).
fn is_rollback(sql: &[u8]) -> bool {
    let first = words(sql).next().unwrap_or_default();
    let first = first.strip_suffix(b";").unwrap_or(first);
    (first.eq_ignore_ascii_case(b"rollback") || first.eq_ignore_ascii_case(b"abort")) && ends_transaction(sql)
}

/// True for statements that end a transaction block: in an aborted transaction they
/// are answered with ROLLBACK, as PostgreSQL does.
pub(super) fn ends_transaction(sql: &[u8]) -> bool {
    let sql = sql.trim_ascii();
    let mut sql = sql;
    while let Some(rest) = sql.strip_suffix(b";") {
        sql = rest;
    }
    let mut words = words(sql).map(<[u8]>::to_ascii_lowercase);
    let first = words.next();
    let second = words.next();
    match first.as_deref() {
        // "ROLLBACK TO SAVEPOINT" and "ROLLBACK/COMMIT PREPARED" do not end the block.
        Some(b"rollback") => !matches!(second.as_deref(), Some(b"to" | b"prepared")),
        Some(b"commit") => second.as_deref() != Some(b"prepared"),
        Some(b"abort" | b"end") => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_transaction_ends() {
        for sql in [
            "ROLLBACK",
            "rollback;",
            "  COMMIT  ",
            "END WORK",
            "ABORT",
            "commit and no chain",
            "rollback ;;",
            "ABORT -- caf\u{e9}",
        ] {
            assert!(ends_transaction(sql.as_bytes()), "{sql}");
        }
        for sql in [
            "SELECT 1",
            "ROLLBACK TO SAVEPOINT a",
            "COMMIT PREPARED 'x'",
            "ROLLBACK PREPARED 'x'",
            "",
        ] {
            assert!(!ends_transaction(sql.as_bytes()), "{sql}");
        }
    }

    /// The types of the messages in `out`, with the SQLSTATE of errors and notices and the
    /// tag of CommandComplete: `N:57P01 C:ROLLBACK Z:I`.
    fn replies(out: &[u8]) -> String {
        let mut shown = Vec::new();
        let mut rest = out;
        while rest.len() >= 5 {
            let len = 1 + u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
            let (message, after) = rest.split_at(len);
            let body = &message[5..];
            let text = match message[0] {
                b'E' | b'N' => {
                    let code = body
                        .split(|&b| b == 0)
                        .find_map(|field| field.strip_prefix(b"C"))
                        .unwrap_or_default();
                    format!("{}:{}", message[0] as char, String::from_utf8_lossy(code))
                }
                b'C' => format!("C:{}", String::from_utf8_lossy(&body[..body.len() - 1])),
                b'Z' => format!("Z:{}", body[0] as char),
                tag => (tag as char).to_string(),
            };
            shown.push(text);
            rest = after;
        }
        shown.join(" ")
    }

    fn query(sql: &str) -> BytesMut {
        let mut buf = BytesMut::new();
        postgres_protocol::message::frontend::query(sql, &mut buf).unwrap();
        buf
    }

    fn lost() -> LocalState {
        let mut state = LocalState::new();
        state.tx = LocalTx::Aborted {
            failure: ClientError::new(
                Side::Server,
                "57P01",
                "terminating connection due to administrator command",
            ),
            reported: false,
        };
        state
    }

    fn send(state: &mut LocalState, sql: &str) -> String {
        let mut out = BytesMut::new();
        let answer = state.answer(FrontendTag::Query, &mut query(sql), &mut out, None);
        assert!(matches!(answer, Answer::Answered), "{answer:?}");
        replies(&out)
    }

    #[test]
    fn a_commit_of_a_lost_transaction_fails_and_never_looks_like_success() {
        let mut state = lost();
        assert_eq!(send(&mut state, "COMMIT"), "E:57P01 Z:E");
        assert_eq!(send(&mut state, "SELECT 1"), "E:25P02 Z:E");
        // However often: a driver may have dropped the first error unseen.
        assert_eq!(send(&mut state, "COMMIT"), "E:57P01 Z:E");
        assert_eq!(send(&mut state, "END"), "E:57P01 Z:E");
        assert_eq!(send(&mut state, "ROLLBACK"), "C:ROLLBACK Z:I");
        assert_eq!(state.tx, LocalTx::Idle);
    }

    #[test]
    fn a_rollback_of_a_lost_transaction_succeeds_with_a_warning() {
        let mut state = lost();
        assert_eq!(send(&mut state, "rollback"), "N:57P01 C:ROLLBACK Z:I");
        let mut state = lost();
        assert_eq!(send(&mut state, "ABORT"), "N:57P01 C:ROLLBACK Z:I");
        let mut state = lost();
        assert_eq!(send(&mut state, "ROLLBACK TO SAVEPOINT a"), "E:57P01 Z:E");
    }

    #[test]
    fn the_servers_reason_for_a_lost_transaction_keeps_its_bytes() {
        let mut state = LocalState::new();
        state.tx = LocalTx::Aborted {
            failure: ClientError::new(Side::Server, "57P01", MessageText::from_server(b"abgebrochen \xe4")),
            reported: true,
        };
        let mut out = BytesMut::new();
        state.answer(FrontendTag::Query, &mut query("SELECT 1"), &mut out, None);
        let message = out[..]
            .split(|&b| b == 0)
            .find_map(|field| field.strip_prefix(b"M"))
            .unwrap()
            .to_vec();
        assert_eq!(
            message,
            b"current transaction is aborted, commands ignored until end of transaction block (abgebrochen \xe4)"
        );
    }

    #[test]
    fn an_extended_commit_of_a_lost_transaction_fails_up_to_its_sync() {
        let mut state = lost();
        let mut input = BytesMut::new();
        postgres_protocol::message::frontend::parse("", "COMMIT", std::iter::empty(), &mut input).unwrap();
        postgres_protocol::message::frontend::sync(&mut input);
        let mut out = BytesMut::new();
        state.answer(FrontendTag::Parse, &mut input, &mut out, None);
        state.answer(FrontendTag::Sync, &mut input, &mut out, None);
        assert_eq!(replies(&out), "E:57P01 Z:E");
    }
}
