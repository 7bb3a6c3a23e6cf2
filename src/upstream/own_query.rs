//! Statements pgrelay runs on a server by itself, outside any client's traffic:
//! parameter checks, ROLLBACK after a client left mid-transaction, the reset query.

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Expect, Recipient, ServerConn, ServerFatal, UpstreamError};
use crate::error::MessageText;
use crate::protocol::BackendTag;
use crate::protocol::frame::split_frame;
use crate::protocol::views::{ErrorFields, parameter_status, ready_status};

/// Largest reply pgrelay accepts to its own statements.
const OWN_QUERY_REPLY_LIMIT: usize = 1 << 20;

/// What a statement pgrelay ran by itself produced.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct OwnQueryOutcome {
    /// (SQLSTATE, message) of each error.
    pub errors: Vec<(String, MessageText)>,
    /// ParameterStatus messages the statement caused.
    pub parameters: Vec<(String, String)>,
}

impl ServerConn {
    /// Runs `sql` as a simple query and reads everything up to its ReadyForQuery.
    /// Only call this when the server owes nothing to anyone else.
    pub async fn run_own_query(&mut self, sql: &str) -> Result<OwnQueryOutcome, UpstreamError> {
        let addr = self.addr.to_string();
        let io = |source| UpstreamError::Io {
            addr: addr.clone(),
            source,
        };
        let protocol = |reason: String| UpstreamError::Protocol {
            addr: addr.clone(),
            reason,
        };
        if !self.expect.is_empty() || self.state.mid_message() || !self.outbuf.is_empty() {
            return Err(UpstreamError::Unusable {
                addr: addr.clone(),
                reason: "server still owes replies",
            });
        }
        let mut message = BytesMut::new();
        postgres_protocol::message::frontend::query(sql, &mut message).map_err(io)?;
        self.expect.push(Expect::ResultsUntilReady, Recipient::Pgrelay);
        self.stream.write_all(&message).await.map_err(io)?;
        // Under TLS, write_all can leave the last record in rustls.
        self.stream.flush().await.map_err(io)?;
        let mut outcome = OwnQueryOutcome::default();
        while !self.expect.is_empty() {
            let Some(frame) =
                split_frame(&mut self.inbuf, OWN_QUERY_REPLY_LIMIT).map_err(|e| protocol(e.to_string()))?
            else {
                self.inbuf.reserve(4096);
                if self.stream.read_buf(&mut self.inbuf).await.map_err(io)? == 0 {
                    self.state.server_lost();
                    return Err(UpstreamError::Closed { addr });
                }
                continue;
            };
            let tag = BackendTag::from_byte(frame.tag())
                .ok_or_else(|| protocol(format!("unknown message type {}", frame.tag())))?;
            self.expect.on_message(tag).map_err(|e| protocol(e.to_string()))?;
            match tag {
                BackendTag::ReadyForQuery => {
                    let status = ready_status(frame.body()).map_err(|e| protocol(e.to_string()))?;
                    self.state.ready(status);
                }
                BackendTag::ErrorResponse => {
                    let fields = ErrorFields::read(frame.body()).unwrap_or_default();
                    if fields.is_fatal() {
                        self.state.server_ended(ServerFatal {
                            sqlstate: fields.code.to_owned(),
                            message: MessageText::from_server(fields.message),
                        });
                    }
                    outcome
                        .errors
                        .push((fields.code.to_owned(), MessageText::from_server(fields.message)));
                }
                BackendTag::ParameterStatus => {
                    let (name, value) = parameter_status(frame.body()).map_err(|e| protocol(e.to_string()))?;
                    self.note_parameter(name, value);
                    outcome.parameters.push((name.to_owned(), value.to_owned()));
                }
                _ => {}
            }
        }
        Ok(outcome)
    }
}
