//! The queue of responses a server connection still owes, in order.
//!
//! Every message sent to a server that produces a reply pushes an entry; every reply
//! from the server is matched against the head. This is what tells pgrelay when a
//! server is really idle (nothing owed, ReadyForQuery seen), which replies belong to
//! messages pgrelay injected itself and must not reach the client, and where an error
//! makes the server skip ahead to the next Sync.

use std::collections::VecDeque;

use crate::protocol::BackendTag;

/// What one message sent to the server will be answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Parse → ParseComplete.
    ParseComplete,
    /// Bind → BindComplete.
    BindComplete,
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Routing {
    pub recipient: Recipient,
    /// The message was ReadyForQuery ending an entry.
    pub ready: bool,
}

/// A server message that fits no entry of the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
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

    /// How many ReadyForQuery messages the server still owes the client.
    pub fn readies_owed_to_client(&self) -> usize {
        self.entries
            .iter()
            .filter(|(expect, recipient)| {
                *recipient == Recipient::Client && matches!(expect, Expect::Ready | Expect::ResultsUntilReady)
            })
            .count()
    }

    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// Matches one server message against the head of the queue and advances it.
    ///
    /// Asynchronous messages (notices, notifications, parameter changes) may come at
    /// any time and go to whoever the head entry belongs to, or to the client when
    /// nothing is owed.
    pub fn on_message(&mut self, tag: BackendTag) -> Result<Routing, OutOfOrder> {
        let head = self.entries.front().copied();
        let recipient = head.map_or(Recipient::Client, |(_, recipient)| recipient);
        let routing = |ready| Ok(Routing { recipient, ready });
        let out_of_order = || {
            Err(OutOfOrder {
                tag,
                expected: head.map(|(expect, _)| expect),
            })
        };
        match tag {
            BackendTag::NoticeResponse | BackendTag::NotificationResponse | BackendTag::ParameterStatus => {
                return routing(false);
            }
            _ => {}
        }
        let Some((expect, _)) = head else {
            return out_of_order();
        };
        match (expect, tag) {
            (Expect::ParseComplete, BackendTag::ParseComplete)
            | (Expect::BindComplete, BackendTag::BindComplete)
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
            (Expect::ResultsUntilReady, BackendTag::ReadyForQuery) | (Expect::Ready, BackendTag::ReadyForQuery) => {
                self.entries.pop_front();
                routing(true)
            }
            (Expect::ResultsUntilReady, BackendTag::ErrorResponse) => routing(false),
            (Expect::ResultsUntilReady, tag) if !is_startup_only(tag) => routing(false),
            (_, BackendTag::ErrorResponse) => {
                // In the extended protocol an error makes the server skip every message
                // up to the next Sync: drop what those would have answered.
                while let Some((expect, _)) = self.entries.front() {
                    if *expect == Expect::Ready {
                        break;
                    }
                    self.entries.pop_front();
                }
                routing(false)
            }
            _ => out_of_order(),
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
            queue.push(*expect, *recipient);
        }
        queue
    }

    #[test]
    fn extended_pipeline_is_matched_in_order() {
        let client = Recipient::Client;
        let mut q = queue(&[
            (Expect::ParseComplete, client),
            (Expect::BindComplete, client),
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
            assert_eq!(
                q.on_message(tag).unwrap(),
                Routing {
                    recipient: client,
                    ready: false
                }
            );
        }
        assert_eq!(
            q.on_message(B::ReadyForQuery).unwrap(),
            Routing {
                recipient: client,
                ready: true
            }
        );
        assert!(q.is_empty());
    }

    #[test]
    fn error_skips_to_sync_and_swallowed_entries_stay_swallowed() {
        let mut q = queue(&[
            (Expect::ParseComplete, Recipient::Pgrelay),
            (Expect::BindComplete, Recipient::Client),
            (Expect::ExecuteResult, Recipient::Client),
            (Expect::Ready, Recipient::Client),
        ]);
        assert_eq!(q.on_message(B::ErrorResponse).unwrap().recipient, Recipient::Pgrelay);
        assert_eq!(q.readies_owed_to_client(), 1);
        assert!(q.on_message(B::ReadyForQuery).unwrap().ready);
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
        let mut q = queue(&[(Expect::BindComplete, Recipient::Client)]);
        assert!(q.on_message(B::ParseComplete).is_err());
    }
}
