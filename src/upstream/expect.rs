//! The queue of responses a server connection still owes, in order.
//!
//! Every message sent to a server that produces a reply pushes an entry; every reply
//! from the server is matched against the head. This is what tells pgrelay when a
//! server is really idle (nothing owed, ReadyForQuery seen), which replies belong to
//! messages pgrelay injected itself and must not reach the client, which replies
//! pgrelay makes up itself (a client's Close of a statement the server keeps), where
//! an error makes the server skip ahead to the next Sync, and which Syncs a server in
//! COPY FROM STDIN ignores.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::protocol::BackendTag;

/// What one message sent to the server will be answered with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// Parse → ParseComplete; names the server-side statement when pgrelay manages it,
    /// so a failed Parse can be forgotten, and the client's definition of its name (see
    /// `ClientStatements`), which a failed Parse undoes as it would on a server.
    ParseComplete {
        statement: Option<Arc<str>>,
        definition: Option<u64>,
    },
    /// Bind → BindComplete; names the server-side statement when pgrelay manages it,
    /// so an error about that statement's cached plan can be traced back to it.
    BindComplete { statement: Option<Arc<str>> },
    /// Close → CloseComplete; names the server-side statement when pgrelay closes one
    /// of its own, so a Close the server skips can be accounted for.
    CloseComplete { statement: Option<Arc<str>> },
    /// Describe → [ParameterDescription] then RowDescription or NoData.
    Description,
    /// Execute → rows or COPY, ended by CommandComplete, EmptyQueryResponse or
    /// PortalSuspended.
    ExecuteResult,
    /// Sync → ReadyForQuery.
    Ready,
    /// Query or FunctionCall → any number of results, ended by ReadyForQuery.
    ResultsUntilReady,
    /// Parse of a client's statement that pgrelay sends ahead of the client's SQL
    /// EXECUTE of it, ended by a Sync of pgrelay's own. Should it fail, the client gets
    /// its error, and the EXECUTE behind it becomes [`Expect::ExecuteAfterFailedParse`].
    ParseForExecute { statement: Arc<str> },
    /// A client's SQL EXECUTE whose statement pgrelay failed to prepare just before it:
    /// the client has had the reason, so the EXECUTE's own error (26000 naming pgrelay's
    /// statement, or 25P02 in a transaction block) is swallowed, and its ReadyForQuery
    /// goes to the client.
    ExecuteAfterFailedParse,
    /// A reply pgrelay gives itself in this place of the stream; never sent by the
    /// server.
    Synthetic(Synthetic),
    /// pgrelay's own empty query, sent to learn how many ReadyForQuery messages the
    /// server still sends after a failed COPY (see [`ResponseQueue::copy_started`]):
    /// ReadyForQuery before its EmptyQueryResponse (`reached`) answer the client's
    /// Syncs.
    Barrier { reached: bool },
    /// A message pgrelay refused, replaced by a Parse the server refuses too (see
    /// `prepared::refused_parse`): the server's ErrorResponse is replaced by `error`, a
    /// whole ErrorResponse message.
    Refused { error: bytes::Bytes },
    /// No reply: the client's CopyDone or CopyFail went to the server here. A COPY FROM
    /// STDIN that starts before this point ends here, so the Syncs in between are read
    /// in COPY mode, where the server ignores them. Dropped once it reaches the head.
    CopyEndSent,
}

/// Replies pgrelay makes up so the client sees exactly what a server would send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Synthetic {
    /// For a Close of a client's statement: the server-side statement stays cached.
    CloseComplete,
    /// For a simple query answered by pgrelay: CommandComplete with this tag, then
    /// ReadyForQuery.
    QueryDone(&'static str),
    /// For a Parse of a LISTEN or UNLISTEN pgrelay answers (`listen_notify = "fanout"`).
    ParseComplete,
    /// For a Bind of such a statement.
    BindComplete,
    /// For a Describe of such a statement (`statement`: ParameterDescription first) or
    /// of its portal: NoData.
    NoData { statement: bool },
    /// The LISTEN and UNLISTEN effects of a statement pgrelay answers, in order: their
    /// CommandComplete messages, then with `query` (a simple query) ReadyForQuery.
    Listen {
        changes: std::sync::Arc<[crate::route::SessionEffect]>,
        query: bool,
    },
}

/// Who receives the replies to an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recipient {
    /// The attached client asked for it.
    Client,
    /// pgrelay asked for it (parameter sync, an injected Parse…): swallow the reply.
    Pgrelay,
}

/// What to do with one server message, as decided by [`ResponseQueue::on_message`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routing {
    pub recipient: Recipient,
    /// The message was ReadyForQuery ending an entry.
    pub ready: bool,
    /// For an ErrorResponse answering a Parse or Bind of a statement pgrelay manages:
    /// where it failed and that statement's server-side name.
    pub failed_statement: Option<(FailedAt, Arc<str>)>,
    /// For an ErrorResponse answering a client's Parse of a named statement: the
    /// definition that did not happen.
    pub failed_definition: Option<u64>,
    /// For an ErrorResponse in the extended protocol: statements pgrelay prepared or
    /// closed in the messages the server now skips, whose state on the server is not
    /// what pgrelay recorded.
    pub skipped_statements: Vec<Arc<str>>,
    /// The same for client definitions (Parse of a named statement) the server skips.
    pub skipped_definitions: Vec<u64>,
    /// The message was the ReadyForQuery ending a simple query (`ResultsUntilReady`), not
    /// a Sync's: tells the answer to pgrelay's own query from that to a Sync of its own.
    pub answered_query: bool,
    /// For an ErrorResponse answering an [`Expect::Refused`]: the ErrorResponse the
    /// client gets in its place.
    pub replaced_by: Option<bytes::Bytes>,
    /// An ErrorResponse pgrelay swallows because the client already has its reason
    /// ([`Expect::ExecuteAfterFailedParse`]): not worth a warning.
    pub expected_failure: bool,
}

impl Default for Routing {
    fn default() -> Self {
        Routing {
            recipient: Recipient::Client,
            ready: false,
            failed_statement: None,
            failed_definition: None,
            skipped_statements: Vec::new(),
            skipped_definitions: Vec::new(),
            answered_query: false,
            replaced_by: None,
            expected_failure: false,
        }
    }
}

/// What the start of a COPY FROM STDIN changed in the queue, from
/// [`ResponseQueue::copy_started`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyStart {
    /// The client's CopyDone or CopyFail is already on its way to the server.
    pub client_ended: bool,
    /// The COPY runs in the extended protocol and no Sync the server will act on has
    /// been sent after it: the server waits for one once the COPY is done.
    pub needs_sync: bool,
}

/// The message an error answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailedAt {
    Parse,
    Bind,
}

/// A server message that fits no entry of the queue.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("server sent {tag:?} while {expected:?} was expected")]
pub struct OutOfOrder {
    pub tag: BackendTag,
    pub expected: Option<Expect>,
}

#[derive(Debug, Default)]
pub struct ResponseQueue {
    entries: VecDeque<(Expect, Recipient)>,
    /// An extended-protocol error was reported before the Sync that ends its batch
    /// was sent: the server skips every message up to that Sync, so none of them is
    /// owed a reply.
    skipping: bool,
    /// ReadyForQuery messages that may or may not come: Syncs the client sent behind a
    /// COPY FROM STDIN that then failed (see [`ResponseQueue::copy_started`]).
    uncertain_readies: usize,
}

impl ResponseQueue {
    pub fn push(&mut self, expect: Expect, recipient: Recipient) {
        if self.skipping {
            if expect != Expect::Ready {
                return;
            }
            self.skipping = false;
        }
        if expect == Expect::CopyEndSent && self.entries.is_empty() {
            return;
        }
        self.entries.push_back((expect, recipient));
    }

    /// The server is skipping messages up to the next Sync after an error.
    pub fn skipping_to_sync(&self) -> bool {
        self.skipping
    }

    /// A failed COPY left Syncs whose ReadyForQuery may still come; the connection is
    /// not idle until that is settled (see [`ResponseQueue::needs_barrier`]).
    pub fn has_uncertain_readies(&self) -> bool {
        self.uncertain_readies > 0
    }

    /// Everything known is answered but ReadyForQuery messages may still come: the
    /// caller sends an empty query and pushes a [`Expect::Barrier`].
    pub fn needs_barrier(&self) -> bool {
        self.uncertain_readies > 0 && self.entries.is_empty() && !self.skipping
    }

    /// The COPY ended with CommandComplete: the Syncs sent during it were read in COPY
    /// mode and ignored for certain.
    pub fn copy_succeeded(&mut self) {
        self.uncertain_readies = 0;
    }

    fn pop_front(&mut self) {
        self.entries.pop_front();
        while matches!(self.entries.front(), Some((Expect::CopyEndSent, _))) {
            self.entries.pop_front();
        }
    }

    /// The server answered the head entry with CopyInResponse (or CopyBothResponse):
    /// it reads the client's messages in COPY mode until a CopyDone or CopyFail and
    /// ignores the Syncs among them, so their ReadyForQuery is not owed.
    ///
    /// Unless the COPY fails before the server reads them (COPY into a view, a failing
    /// statement trigger): then it reads them in normal mode and answers each. Which of
    /// the two happened cannot be seen in the stream, so until the COPY succeeds they
    /// are counted as uncertain: a ReadyForQuery that fits nothing is taken as the
    /// answer to one of them, and the connection is only idle once pgrelay's own empty
    /// query (the barrier) has shown that no more will come.
    pub fn copy_started(&mut self) -> CopyStart {
        let extended = matches!(self.entries.front(), Some((Expect::ExecuteResult, _)));
        let marker = self
            .entries
            .iter()
            .skip(1)
            .position(|(expect, _)| *expect == Expect::CopyEndSent)
            .map(|at| at + 1);
        let in_copy = 1..marker.unwrap_or(self.entries.len());
        let mut index = 0;
        let mut ignored = 0;
        self.entries.retain(|(expect, _)| {
            let ignored_sync = in_copy.contains(&index) && *expect == Expect::Ready;
            ignored += usize::from(ignored_sync);
            let keep = !ignored_sync && Some(index) != marker;
            index += 1;
            keep
        });
        self.uncertain_readies += ignored;
        let ready_left = self.entries.iter().any(|(expect, _)| *expect == Expect::Ready);
        CopyStart {
            client_ended: marker.is_some(),
            needs_sync: extended && !ready_left,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// How many ReadyForQuery messages the client is still waiting for, for certain
    /// (without those of [`ResponseQueue::has_uncertain_readies`]).
    pub fn readies_owed_to_client(&self) -> usize {
        self.entries
            .iter()
            .filter(|(expect, recipient)| {
                *recipient == Recipient::Client
                    && matches!(
                        expect,
                        Expect::Ready
                            | Expect::ResultsUntilReady
                            | Expect::ExecuteAfterFailedParse
                            | Expect::Synthetic(Synthetic::QueryDone(_) | Synthetic::Listen { query: true, .. })
                    )
            })
            .count()
    }

    pub fn clear(&mut self) {
        self.entries.clear();
        self.skipping = false;
    }

    /// The head entry is a reply pgrelay gives itself.
    pub fn has_synthetic_head(&self) -> bool {
        matches!(self.entries.front(), Some((Expect::Synthetic(_), _)))
    }

    /// Takes the head entry if it is a reply pgrelay gives itself.
    pub fn pop_synthetic(&mut self) -> Option<Synthetic> {
        match self.entries.front() {
            Some((Expect::Synthetic(synthetic), _)) => {
                let synthetic = synthetic.clone();
                self.pop_front();
                Some(synthetic)
            }
            _ => None,
        }
    }

    /// pgrelay answered an extended-protocol message of its own with an error: the
    /// replies it was to make itself for the rest of the batch are dropped, as a server
    /// skips the rest of a batch after an error. Replies the server owes stay: those
    /// messages are in the server's hands.
    pub fn drop_synthetic_batch(&mut self) {
        while matches!(
            self.entries.front(),
            Some((
                Expect::Synthetic(
                    Synthetic::ParseComplete
                        | Synthetic::BindComplete
                        | Synthetic::NoData { .. }
                        | Synthetic::Listen { query: false, .. }
                ),
                _
            ))
        ) {
            self.pop_front();
        }
    }

    /// Matches one server message against the head of the queue and advances it.
    ///
    /// Asynchronous messages may come at any time. Notices and parameter changes go to
    /// whoever the head entry belongs to, or to the client when nothing is owed: a notice
    /// about one of pgrelay's own statements is pgrelay's. Notifications always go to the
    /// client: only its LISTEN can have asked for them, and the server sends those that
    /// arrived during a transaction right before its ReadyForQuery, which may be the
    /// answer to pgrelay's own query (the settings, the fence).
    pub fn on_message(&mut self, tag: BackendTag) -> Result<Routing, OutOfOrder> {
        let recipient = self
            .entries
            .front()
            .map_or(Recipient::Client, |(_, recipient)| *recipient);
        let routing = |ready| {
            Ok(Routing {
                recipient,
                ready,
                ..Routing::default()
            })
        };
        if tag == BackendTag::NotificationResponse {
            return Ok(Routing::default());
        }
        if matches!(tag, BackendTag::NoticeResponse | BackendTag::ParameterStatus) {
            return routing(false);
        }
        if tag == BackendTag::ReadyForQuery && self.uncertain_readies > 0 && !self.head_takes_ready() {
            // The answer to a Sync sent behind a COPY that failed before reading it.
            self.uncertain_readies -= 1;
            self.skipping = false;
            return Ok(Routing {
                recipient: Recipient::Client,
                ready: true,
                ..Routing::default()
            });
        }
        let Some((expect, _)) = self.entries.front_mut() else {
            return Err(OutOfOrder { tag, expected: None });
        };
        if let Expect::Barrier { reached } = expect {
            return match (tag, *reached) {
                (BackendTag::EmptyQueryResponse, false) => {
                    *reached = true;
                    self.uncertain_readies = 0;
                    routing(false)
                }
                // An error in place of the EmptyQueryResponse: a cancel that hit the empty
                // query, or a FATAL as the server ends the session. Only the ReadyForQuery
                // after it shows that every answer before the barrier has come; a server
                // that closes instead leaves the question open.
                (BackendTag::ErrorResponse, false) => {
                    *reached = true;
                    routing(false)
                }
                (BackendTag::ReadyForQuery, true) => {
                    self.uncertain_readies = 0;
                    self.pop_front();
                    routing(true)
                }
                _ => Err(OutOfOrder {
                    tag,
                    expected: Some(expect.clone()),
                }),
            };
        }
        let expect = &*expect;
        match (expect, tag) {
            (Expect::ParseComplete { .. } | Expect::ParseForExecute { .. }, BackendTag::ParseComplete)
            | (Expect::BindComplete { .. }, BackendTag::BindComplete)
            | (Expect::CloseComplete { .. }, BackendTag::CloseComplete)
            | (Expect::Description, BackendTag::RowDescription | BackendTag::NoData)
            | (
                Expect::ExecuteResult,
                BackendTag::CommandComplete | BackendTag::EmptyQueryResponse | BackendTag::PortalSuspended,
            ) => {
                self.pop_front();
                routing(false)
            }
            (Expect::Description, BackendTag::ParameterDescription)
            | (
                Expect::ExecuteResult,
                BackendTag::DataRow
                | BackendTag::CopyInResponse
                | BackendTag::CopyOutResponse
                | BackendTag::CopyBothResponse
                | BackendTag::CopyData
                | BackendTag::CopyDone,
            ) => routing(false),
            (
                Expect::ResultsUntilReady | Expect::ExecuteAfterFailedParse | Expect::Ready,
                BackendTag::ReadyForQuery,
            ) => {
                let answered_query = *expect != Expect::Ready;
                self.pop_front();
                Ok(Routing {
                    recipient,
                    ready: true,
                    answered_query,
                    ..Routing::default()
                })
            }
            (Expect::ExecuteAfterFailedParse, BackendTag::ErrorResponse) => Ok(Routing {
                recipient: Recipient::Pgrelay,
                expected_failure: true,
                ..Routing::default()
            }),
            (Expect::ResultsUntilReady | Expect::ExecuteAfterFailedParse, tag) if !is_startup_only(tag) => {
                routing(false)
            }
            (Expect::Synthetic(_), _) => Err(OutOfOrder {
                tag,
                expected: Some(expect.clone()),
            }),
            (_, BackendTag::ErrorResponse) => {
                let (failed_statement, failed_definition) = match expect {
                    Expect::ParseComplete { statement, definition } => {
                        (statement.clone().map(|name| (FailedAt::Parse, name)), *definition)
                    }
                    Expect::ParseForExecute { statement } => (Some((FailedAt::Parse, statement.clone())), None),
                    Expect::BindComplete { statement: Some(name) } => (Some((FailedAt::Bind, name.clone())), None),
                    _ => (None, None),
                };
                let before_execute = matches!(expect, Expect::ParseForExecute { .. });
                let replaced_by = match expect {
                    Expect::Refused { error } => Some(error.clone()),
                    _ => None,
                };
                // In the extended protocol an error makes the server skip every message
                // up to the next Sync: drop what those would have answered, and what
                // the client sends until it has sent that Sync.
                let mut skipped_statements = Vec::new();
                let mut skipped_definitions = Vec::new();
                if !matches!(expect, Expect::Ready) {
                    self.entries.pop_front();
                }
                while let Some((expect, _)) = self.entries.front() {
                    match expect {
                        Expect::Ready => break,
                        Expect::ParseComplete { statement, definition } => {
                            skipped_statements.extend(statement.clone());
                            skipped_definitions.extend(*definition);
                        }
                        Expect::CloseComplete { statement } => skipped_statements.extend(statement.clone()),
                        Expect::ParseForExecute { statement } => skipped_statements.push(statement.clone()),
                        _ => {}
                    }
                    self.entries.pop_front();
                }
                self.skipping = self.entries.is_empty();
                if before_execute
                    && let Some((next, Recipient::Client)) = self.entries.get_mut(1)
                    && *next == Expect::ResultsUntilReady
                {
                    *next = Expect::ExecuteAfterFailedParse;
                }
                // Every extended-protocol message pgrelay sends on its own (a Parse of
                // a statement the server lacks, a Close of one it evicts) is part of a
                // client's batch, whose messages the server now skips: the client
                // must hear why.
                Ok(Routing {
                    recipient: Recipient::Client,
                    ready: false,
                    failed_statement,
                    failed_definition,
                    skipped_statements,
                    skipped_definitions,
                    answered_query: false,
                    replaced_by,
                    expected_failure: false,
                })
            }
            _ => Err(OutOfOrder {
                tag,
                expected: Some(expect.clone()),
            }),
        }
    }
}

impl ResponseQueue {
    /// The head entry is answered by a ReadyForQuery.
    fn head_takes_ready(&self) -> bool {
        matches!(
            self.entries.front(),
            Some((
                Expect::Ready
                    | Expect::ResultsUntilReady
                    | Expect::ExecuteAfterFailedParse
                    | Expect::Barrier { reached: true },
                _
            ))
        )
    }
}

/// Messages that only belong to the startup phase.
fn is_startup_only(tag: BackendTag) -> bool {
    matches!(
        tag,
        BackendTag::Authentication | BackendTag::BackendKeyData | BackendTag::NegotiateProtocolVersion
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use BackendTag as B;

    fn queue(entries: &[(Expect, Recipient)]) -> ResponseQueue {
        let mut queue = ResponseQueue::default();
        for (expect, recipient) in entries {
            queue.push(expect.clone(), *recipient);
        }
        queue
    }

    #[test]
    fn extended_pipeline_is_matched_in_order() {
        let client = Recipient::Client;
        let mut q = queue(&[
            (
                Expect::ParseComplete {
                    statement: None,
                    definition: None,
                },
                client,
            ),
            (Expect::BindComplete { statement: None }, client),
            (Expect::Description, client),
            (Expect::ExecuteResult, client),
            (Expect::Ready, client),
        ]);
        for tag in [
            B::ParseComplete,
            B::BindComplete,
            B::RowDescription,
            B::DataRow,
            B::DataRow,
            B::CommandComplete,
        ] {
            let routing = q.on_message(tag).unwrap();
            assert_eq!((routing.recipient, routing.ready), (client, false));
        }
        assert!(q.on_message(B::ReadyForQuery).unwrap().ready);
        assert!(q.is_empty());
    }

    #[test]
    fn a_refused_parse_is_answered_by_its_own_error_and_skips_to_sync() {
        let error = bytes::Bytes::from_static(b"E\0\0\0\x04");
        let mut q = queue(&[
            (Expect::Refused { error: error.clone() }, Recipient::Client),
            (Expect::BindComplete { statement: None }, Recipient::Client),
            (Expect::ExecuteResult, Recipient::Client),
            (Expect::Ready, Recipient::Client),
        ]);
        let routing = q.on_message(B::ErrorResponse).unwrap();
        assert_eq!(routing.replaced_by, Some(error.clone()));
        assert!(q.on_message(B::ReadyForQuery).unwrap().ready);
        assert!(q.is_empty());

        let mut q = queue(&[(Expect::Refused { error }, Recipient::Client)]);
        assert!(q.on_message(B::ParseComplete).is_err(), "only an error answers it");
    }

    #[test]
    fn an_execute_whose_statement_failed_to_prepare_gives_only_the_parse_error() {
        let statement: Arc<str> = Arc::from("pgrelay_7");
        let (client, pgrelay) = (Recipient::Client, Recipient::Pgrelay);
        let entries = [
            (
                Expect::ParseForExecute {
                    statement: statement.clone(),
                },
                pgrelay,
            ),
            (Expect::Ready, pgrelay),
            (Expect::ResultsUntilReady, client),
            (Expect::ResultsUntilReady, client),
        ];
        let mut q = queue(&entries);
        let parse_error = q.on_message(B::ErrorResponse).unwrap();
        assert_eq!(parse_error.recipient, client);
        assert_eq!(parse_error.failed_statement, Some((FailedAt::Parse, statement)));
        assert_eq!(q.on_message(B::ReadyForQuery).unwrap().recipient, pgrelay);
        assert_eq!(q.readies_owed_to_client(), 2);
        let execute_error = q.on_message(B::ErrorResponse).unwrap();
        assert_eq!(
            (execute_error.recipient, execute_error.expected_failure),
            (pgrelay, true)
        );
        let ready = q.on_message(B::ReadyForQuery).unwrap();
        assert_eq!(
            (ready.recipient, ready.ready, ready.answered_query),
            (client, true, true)
        );
        // The query behind it is the client's as ever, its error included.
        let later_error = q.on_message(B::ErrorResponse).unwrap();
        assert_eq!((later_error.recipient, later_error.expected_failure), (client, false));
        assert!(q.on_message(B::ReadyForQuery).unwrap().ready);
        assert!(q.is_empty());

        // Prepared: the EXECUTE's replies are the client's.
        let mut q = queue(&entries[..3]);
        assert_eq!(q.on_message(B::ParseComplete).unwrap().recipient, pgrelay);
        assert_eq!(q.on_message(B::ReadyForQuery).unwrap().recipient, pgrelay);
        for tag in [B::RowDescription, B::DataRow, B::CommandComplete, B::ReadyForQuery] {
            assert_eq!(q.on_message(tag).unwrap().recipient, client);
        }
        assert!(q.is_empty());
    }

    #[test]
    fn error_skips_to_sync_and_names_the_failed_statement() {
        let statement: Arc<str> = Arc::from("pgrelay_1");
        let mut q = queue(&[
            (
                Expect::ParseComplete {
                    statement: None,
                    definition: None,
                },
                Recipient::Pgrelay,
            ),
            (Expect::BindComplete { statement: None }, Recipient::Client),
            (Expect::ExecuteResult, Recipient::Client),
            (Expect::Ready, Recipient::Client),
        ]);
        // The client's Bind and Execute are skipped: the error is the client's.
        assert_eq!(q.on_message(B::ErrorResponse).unwrap().recipient, Recipient::Client);
        assert_eq!(q.readies_owed_to_client(), 1);
        assert!(q.on_message(B::ReadyForQuery).unwrap().ready);
        assert!(q.is_empty());

        let mut q = queue(&[
            (
                Expect::BindComplete {
                    statement: Some(statement.clone()),
                },
                Recipient::Client,
            ),
            (Expect::Ready, Recipient::Client),
        ]);
        assert_eq!(
            q.on_message(B::ErrorResponse).unwrap().failed_statement,
            Some((FailedAt::Bind, statement))
        );
    }

    #[test]
    fn synthetic_replies_wait_for_their_turn() {
        let mut q = queue(&[
            (
                Expect::ParseComplete {
                    statement: None,
                    definition: None,
                },
                Recipient::Client,
            ),
            (Expect::Synthetic(Synthetic::CloseComplete), Recipient::Client),
            (Expect::Synthetic(Synthetic::QueryDone("DEALLOCATE")), Recipient::Client),
        ]);
        assert_eq!(q.pop_synthetic(), None);
        assert_eq!(q.readies_owed_to_client(), 1);
        q.on_message(B::ParseComplete).unwrap();
        assert_eq!(q.pop_synthetic(), Some(Synthetic::CloseComplete));
        assert_eq!(q.pop_synthetic(), Some(Synthetic::QueryDone("DEALLOCATE")));
        assert!(q.is_empty());
    }

    #[test]
    fn simple_query_owns_everything_until_ready() {
        let mut q = queue(&[
            (Expect::ResultsUntilReady, Recipient::Pgrelay),
            (Expect::ResultsUntilReady, Recipient::Client),
        ]);
        for tag in [B::CommandComplete, B::ParameterStatus, B::ErrorResponse] {
            assert_eq!(q.on_message(tag).unwrap().recipient, Recipient::Pgrelay);
        }
        assert!(q.on_message(B::ReadyForQuery).unwrap().ready);
        for tag in [
            B::RowDescription,
            B::DataRow,
            B::CommandComplete,
            B::CopyOutResponse,
            B::CopyData,
            B::CopyDone,
        ] {
            assert_eq!(q.on_message(tag).unwrap().recipient, Recipient::Client);
        }
        assert!(q.on_message(B::ReadyForQuery).unwrap().ready);
    }

    #[test]
    fn an_error_before_the_sync_was_sent_skips_the_rest_of_the_batch() {
        let mut q = queue(&[(Expect::BindComplete { statement: None }, Recipient::Client)]);
        assert_eq!(q.on_message(B::ErrorResponse).unwrap().recipient, Recipient::Client);
        assert!(q.skipping_to_sync());
        q.push(Expect::ExecuteResult, Recipient::Client);
        assert!(q.is_empty());
        q.push(Expect::Ready, Recipient::Client);
        assert!(!q.skipping_to_sync());
        assert!(q.on_message(B::ReadyForQuery).unwrap().ready);
        assert!(q.is_empty());
    }

    #[test]
    fn syncs_read_in_copy_mode_are_owed_nothing() {
        let client = Recipient::Client;
        // Bind, Execute, Sync, then the data, CopyDone and Sync all before the
        // server's CopyInResponse: only the last Sync is answered.
        let mut q = queue(&[
            (Expect::ExecuteResult, client),
            (Expect::Ready, client),
            (Expect::CopyEndSent, client),
            (Expect::Ready, client),
            (Expect::Synthetic(Synthetic::CloseComplete), client),
            (Expect::Ready, client),
        ]);
        q.on_message(B::CopyInResponse).unwrap();
        let start = q.copy_started();
        assert_eq!(
            start,
            CopyStart {
                client_ended: true,
                needs_sync: false
            }
        );
        assert_eq!(q.readies_owed_to_client(), 2);
        q.on_message(B::CommandComplete).unwrap();
        assert!(q.on_message(B::ReadyForQuery).unwrap().ready);
        assert_eq!(q.pop_synthetic(), Some(Synthetic::CloseComplete));
        assert!(q.on_message(B::ReadyForQuery).unwrap().ready);
        assert!(q.is_empty());

        // The client waits for CopyInResponse before sending its data: the Sync it
        // sent after Execute is ignored and the server will need another one.
        let mut q = queue(&[(Expect::ExecuteResult, client), (Expect::Ready, client)]);
        q.on_message(B::CopyInResponse).unwrap();
        assert_eq!(
            q.copy_started(),
            CopyStart {
                client_ended: false,
                needs_sync: true
            }
        );
        assert_eq!(q.readies_owed_to_client(), 0);

        // A simple-query COPY whose data came right behind it.
        let mut q = queue(&[(Expect::ResultsUntilReady, client), (Expect::CopyEndSent, client)]);
        q.on_message(B::CopyInResponse).unwrap();
        assert!(q.copy_started().client_ended);
        assert!(q.on_message(B::ReadyForQuery).unwrap().ready);
        assert!(q.is_empty());

        // A COPY that failed before it started leaves its marker behind: dropped.
        let mut q = queue(&[(Expect::ResultsUntilReady, client), (Expect::CopyEndSent, client)]);
        q.on_message(B::ErrorResponse).unwrap();
        assert!(q.on_message(B::ReadyForQuery).unwrap().ready);
        assert!(q.is_empty());
    }

    #[test]
    fn syncs_behind_a_copy_that_failed_early_are_settled_by_a_barrier() {
        let client = Recipient::Client;
        // Bind, Execute, Sync; the COPY fails before the server reads that Sync.
        let mut q = queue(&[(Expect::ExecuteResult, client), (Expect::Ready, client)]);
        q.on_message(B::CopyInResponse).unwrap();
        q.copy_started();
        q.on_message(B::ErrorResponse).unwrap();
        assert!(q.skipping_to_sync() && q.has_uncertain_readies());
        // The server answers that Sync after all: the client's, and skipping ends.
        let routing = q.on_message(B::ReadyForQuery).unwrap();
        assert_eq!((routing.recipient, routing.ready), (client, true));
        assert!(!q.skipping_to_sync() && !q.has_uncertain_readies());

        // The COPY fails on its data: the Sync was ignored, no answer comes. Once the
        // client's next Sync is answered, the barrier settles it.
        let mut q = queue(&[(Expect::ExecuteResult, client), (Expect::Ready, client)]);
        q.on_message(B::CopyInResponse).unwrap();
        q.copy_started();
        q.on_message(B::ErrorResponse).unwrap();
        q.push(Expect::Ready, client);
        assert!(q.on_message(B::ReadyForQuery).unwrap().ready);
        assert!(q.needs_barrier());
        q.push(Expect::Barrier { reached: false }, Recipient::Pgrelay);
        assert_eq!(
            q.on_message(B::EmptyQueryResponse).unwrap().recipient,
            Recipient::Pgrelay
        );
        assert!(!q.has_uncertain_readies());
        assert_eq!(q.on_message(B::ReadyForQuery).unwrap().recipient, Recipient::Pgrelay);
        assert!(q.is_empty() && !q.needs_barrier());

        // An error in place of the barrier's EmptyQueryResponse settles nothing by
        // itself (a FATAL is followed by the close); the ReadyForQuery after it does.
        let mut q = queue(&[(Expect::ExecuteResult, client), (Expect::Ready, client)]);
        q.on_message(B::CopyInResponse).unwrap();
        q.copy_started();
        q.on_message(B::ErrorResponse).unwrap();
        q.push(Expect::Ready, client);
        assert!(q.on_message(B::ReadyForQuery).unwrap().ready);
        q.push(Expect::Barrier { reached: false }, Recipient::Pgrelay);
        assert_eq!(q.on_message(B::ErrorResponse).unwrap().recipient, Recipient::Pgrelay);
        assert!(q.has_uncertain_readies());
        assert_eq!(q.on_message(B::ReadyForQuery).unwrap().recipient, Recipient::Pgrelay);
        assert!(q.is_empty() && !q.has_uncertain_readies());

        // A COPY that succeeds: its ignored Syncs are certain.
        let mut q = queue(&[(Expect::ExecuteResult, client), (Expect::Ready, client)]);
        q.on_message(B::CopyInResponse).unwrap();
        q.copy_started();
        q.copy_succeeded();
        assert!(!q.has_uncertain_readies());
    }

    #[test]
    fn statements_in_a_skipped_batch_are_reported() {
        let name: Arc<str> = Arc::from("pgrelay_2");
        let evicted: Arc<str> = Arc::from("pgrelay_1");
        let mut q = queue(&[
            (Expect::BindComplete { statement: None }, Recipient::Client),
            (
                Expect::CloseComplete {
                    statement: Some(evicted.clone()),
                },
                Recipient::Pgrelay,
            ),
            (
                Expect::ParseComplete {
                    statement: Some(name.clone()),
                    definition: Some(7),
                },
                Recipient::Client,
            ),
            (Expect::Ready, Recipient::Client),
        ]);
        let routing = q.on_message(B::ErrorResponse).unwrap();
        assert_eq!(routing.skipped_statements, vec![evicted, name]);
        assert_eq!(routing.skipped_definitions, vec![7]);
        assert!(!q.skipping_to_sync());
    }

    #[test]
    fn notifications_go_to_the_client_whoever_owns_the_head() {
        let mut q = queue(&[(Expect::ResultsUntilReady, Recipient::Pgrelay)]);
        assert_eq!(q.on_message(B::NoticeResponse).unwrap().recipient, Recipient::Pgrelay);
        assert_eq!(q.on_message(B::ParameterStatus).unwrap().recipient, Recipient::Pgrelay);
        assert_eq!(
            q.on_message(B::NotificationResponse).unwrap().recipient,
            Recipient::Client
        );
        // Nothing of pgrelay's reply was consumed.
        assert!(q.on_message(B::ReadyForQuery).unwrap().ready);
        assert!(q.is_empty());
    }

    #[test]
    fn unexpected_messages_are_reported() {
        let mut q = ResponseQueue::default();
        assert!(q.on_message(B::DataRow).is_err());
        assert_eq!(q.on_message(B::NoticeResponse).unwrap().recipient, Recipient::Client);
        let mut q = queue(&[(Expect::BindComplete { statement: None }, Recipient::Client)]);
        assert!(q.on_message(B::ParseComplete).is_err());
    }
}
