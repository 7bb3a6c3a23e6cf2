//! The queue of responses a server connection still owes, in order.
//!
//! Every message sent to a server that produces a reply pushes an entry; every reply
//! from the server is matched against the head. This is what tells pgrelay when a
//! server is really idle (nothing owed, ReadyForQuery seen), which replies belong to
//! messages pgrelay injected itself and must not reach the client, which replies
//! pgrelay makes up itself (a Parse of a statement the server already has), and where
//! an error makes the server skip ahead to the next Sync.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::protocol::BackendTag;

/// What one message sent to the server will be answered with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// Parse → ParseComplete; names the server-side statement when pgrelay manages it,
    /// so a failed Parse can be forgotten.
    ParseComplete { statement: Option<Arc<str>> },
    /// Bind → BindComplete; names the server-side statement when pgrelay manages it,
    /// so an error about that statement's cached plan can be traced back to it.
    BindComplete { statement: Option<Arc<str>> },
    /// Close → CloseComplete.
    CloseComplete,
    /// Describe → [ParameterDescription] then RowDescription or NoData.
    Description,
    /// Execute → rows or COPY, ended by CommandComplete, EmptyQueryResponse or
    /// PortalSuspended.
    ExecuteResult,
    /// Sync → ReadyForQuery.
    Ready,
    /// Query or FunctionCall → any number of results, ended by ReadyForQuery.
    ResultsUntilReady,
    /// A reply pgrelay gives itself in this place of the stream; never sent by the
    /// server.
    Synthetic(Synthetic),
}

/// Replies pgrelay makes up so the client sees exactly what a server would send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Synthetic {
    /// For a Parse of a statement the server already holds.
    ParseComplete,
    /// For a Close of a client's statement: the server-side statement stays cached.
    CloseComplete,
    /// For a simple query answered by pgrelay: CommandComplete with this tag, then
    /// ReadyForQuery.
    QueryDone(&'static str),
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
}

impl ResponseQueue {
    pub fn push(&mut self, expect: Expect, recipient: Recipient) {
        self.entries.push_back((expect, recipient));
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// How many ReadyForQuery messages the client is still waiting for.
    pub fn readies_owed_to_client(&self) -> usize {
        self.entries
            .iter()
            .filter(|(expect, recipient)| {
                *recipient == Recipient::Client
                    && matches!(
                        expect,
                        Expect::Ready | Expect::ResultsUntilReady | Expect::Synthetic(Synthetic::QueryDone(_))
                    )
            })
            .count()
    }

    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// The head entry is a reply pgrelay gives itself.
    pub fn has_synthetic_head(&self) -> bool {
        matches!(self.entries.front(), Some((Expect::Synthetic(_), _)))
    }

    /// Takes the head entry if it is a reply pgrelay gives itself.
    pub fn pop_synthetic(&mut self) -> Option<Synthetic> {
        match self.entries.front() {
            Some((Expect::Synthetic(synthetic), _)) => {
                let synthetic = *synthetic;
                self.entries.pop_front();
                Some(synthetic)
            }
            _ => None,
        }
    }

    /// Matches one server message against the head of the queue and advances it.
    ///
    /// Asynchronous messages (notices, notifications, parameter changes) may come at
    /// any time and go to whoever the head entry belongs to, or to the client when
    /// nothing is owed.
    pub fn on_message(&mut self, tag: BackendTag) -> Result<Routing, OutOfOrder> {
        let recipient = self
            .entries
            .front()
            .map_or(Recipient::Client, |(_, recipient)| *recipient);
        let routing = |ready| {
            Ok(Routing {
                recipient,
                ready,
                failed_statement: None,
            })
        };
        if matches!(
            tag,
            BackendTag::NoticeResponse | BackendTag::NotificationResponse | BackendTag::ParameterStatus
        ) {
            return routing(false);
        }
        let Some((expect, _)) = self.entries.front() else {
            return Err(OutOfOrder { tag, expected: None });
        };
        match (expect, tag) {
            (Expect::ParseComplete { .. }, BackendTag::ParseComplete)
            | (Expect::BindComplete { .. }, BackendTag::BindComplete)
            | (Expect::CloseComplete, BackendTag::CloseComplete)
            | (Expect::Description, BackendTag::RowDescription | BackendTag::NoData)
            | (
                Expect::ExecuteResult,
                BackendTag::CommandComplete | BackendTag::EmptyQueryResponse | BackendTag::PortalSuspended,
            ) => {
                self.entries.pop_front();
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
            (Expect::ResultsUntilReady | Expect::Ready, BackendTag::ReadyForQuery) => {
                self.entries.pop_front();
                routing(true)
            }
            (Expect::ResultsUntilReady, tag) if !is_startup_only(tag) => routing(false),
            (Expect::Synthetic(_), _) => Err(OutOfOrder {
                tag,
                expected: Some(expect.clone()),
            }),
            (_, BackendTag::ErrorResponse) => {
                let failed_statement = match expect {
                    Expect::ParseComplete { statement: Some(name) } => Some((FailedAt::Parse, name.clone())),
                    Expect::BindComplete { statement: Some(name) } => Some((FailedAt::Bind, name.clone())),
                    _ => None,
                };
                // In the extended protocol an error makes the server skip every message
                // up to the next Sync: drop what those would have answered.
                while let Some((expect, _)) = self.entries.front() {
                    if *expect == Expect::Ready {
                        break;
                    }
                    self.entries.pop_front();
                }
                Ok(Routing {
                    recipient,
                    ready: false,
                    failed_statement,
                })
            }
            _ => Err(OutOfOrder {
                tag,
                expected: Some(expect.clone()),
            }),
        }
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
            (Expect::ParseComplete { statement: None }, client),
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
    fn error_skips_to_sync_and_names_the_failed_statement() {
        let statement: Arc<str> = Arc::from("pgrelay_1");
        let mut q = queue(&[
            (Expect::ParseComplete { statement: None }, Recipient::Pgrelay),
            (Expect::Synthetic(Synthetic::ParseComplete), Recipient::Client),
            (Expect::ExecuteResult, Recipient::Client),
            (Expect::Ready, Recipient::Client),
        ]);
        assert_eq!(q.on_message(B::ErrorResponse).unwrap().recipient, Recipient::Pgrelay);
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
            (Expect::ParseComplete { statement: None }, Recipient::Client),
            (Expect::Synthetic(Synthetic::ParseComplete), Recipient::Client),
            (Expect::Synthetic(Synthetic::QueryDone("DEALLOCATE")), Recipient::Client),
        ]);
        assert_eq!(q.pop_synthetic(), None);
        assert_eq!(q.readies_owed_to_client(), 1);
        q.on_message(B::ParseComplete).unwrap();
        assert_eq!(q.pop_synthetic(), Some(Synthetic::ParseComplete));
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
    fn unexpected_messages_are_reported() {
        let mut q = ResponseQueue::default();
        assert!(q.on_message(B::DataRow).is_err());
        assert_eq!(q.on_message(B::NoticeResponse).unwrap().recipient, Recipient::Client);
        let mut q = queue(&[(Expect::BindComplete { statement: None }, Recipient::Client)]);
        assert!(q.on_message(B::ParseComplete).is_err());
    }
}
