//! Forwarding between a client and the server it is attached to, in both directions at
//! once, until the server owes nothing and is outside a transaction.
//!
//! Messages are read in place and forwarded as the original bytes; only the ones that
//! change state are looked at (ReadyForQuery, ErrorResponse, ParameterStatus, COPY
//! responses). Large DataRow and CopyData messages are forwarded as they arrive, never
//! buffered whole. Each direction stops reading while the other side's output is
//! backed up, so a slow reader cannot make pgrelay buffer without bound.

use std::future::poll_fn;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio_util::io::poll_read_buf;

use super::Traffic;
use super::client::{ClientConn, poll_write_buffer, reserve_for_read};
use crate::protocol::views::{ErrorFields, parameter_status, ready_status};
use crate::protocol::{BackendTag, FrontendTag, HEADER_LEN, Header, ProtocolError, TxStatus};
use crate::upstream::expect::Routing;
use crate::upstream::{Expect, Recipient, ServerConn, SessionParams, UpstreamError};

/// Output waiting for a peer beyond which pgrelay stops reading from the other peer.
const HIGH_WATER: usize = 256 * 1024;

/// Largest server message pgrelay buffers whole (DataRow and CopyData are streamed).
const SERVER_MESSAGE_LIMIT: usize = 256 * 1024 * 1024;

/// Why forwarding stopped.
#[derive(Debug)]
pub(super) enum PumpExit {
    /// The server owes nothing and is outside a transaction block.
    ServerIdle,
    /// Statement mode: the client opened a transaction block. The ReadyForQuery that
    /// says so was not forwarded.
    TransactionInStatementMode,
    /// The client closed its connection or sent Terminate.
    ClientGone,
    /// The client broke the protocol.
    ClientBroke(ProtocolError),
    /// The server connection failed; it must not be reused.
    ServerFailed(UpstreamError),
}

pub(super) struct Pump<'a> {
    pub client: &'a mut ClientConn,
    pub server: &'a mut ServerConn,
    /// The client's settings, updated from the ParameterStatus its statements cause.
    pub wanted: &'a mut SessionParams,
    pub statement_mode: bool,
    pub traffic: &'a mut Traffic,
    /// Bytes of a large client CopyData still to be forwarded as they arrive.
    client_passthrough: usize,
}

impl<'a> Pump<'a> {
    pub fn new(
        client: &'a mut ClientConn,
        server: &'a mut ServerConn,
        wanted: &'a mut SessionParams,
        statement_mode: bool,
        traffic: &'a mut Traffic,
    ) -> Self {
        Pump {
            client,
            server,
            wanted,
            statement_mode,
            traffic,
            client_passthrough: 0,
        }
    }

    pub async fn run(mut self) -> PumpExit {
        if let Err(exit) = self.on_client_input() {
            return exit;
        }
        if self.server.is_idle() {
            return PumpExit::ServerIdle;
        }
        poll_fn(|cx| self.poll(cx)).await
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<PumpExit> {
        loop {
            let mut progress = false;

            match poll_write_buffer(&mut self.server.stream, &mut self.server.outbuf, cx) {
                Poll::Ready(Ok(wrote)) => progress |= wrote,
                Poll::Ready(Err(source)) => return Poll::Ready(self.server_io_failed(source)),
                Poll::Pending => {}
            }
            match self.client.poll_write_out(cx) {
                Poll::Ready(Ok(wrote)) => progress |= wrote,
                Poll::Ready(Err(_)) => return Poll::Ready(PumpExit::ClientGone),
                Poll::Pending => {}
            }

            if self.client.outbuf.len() < HIGH_WATER {
                reserve_for_read(&mut self.server.inbuf);
                match poll_read_buf(std::pin::Pin::new(&mut self.server.stream), cx, &mut self.server.inbuf) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(self.server_closed()),
                    Poll::Ready(Ok(_)) => {
                        progress = true;
                        if let Err(exit) = self.on_server_input() {
                            return Poll::Ready(exit);
                        }
                        if self.server.is_idle() {
                            return Poll::Ready(PumpExit::ServerIdle);
                        }
                    }
                    Poll::Ready(Err(source)) => return Poll::Ready(self.server_io_failed(source)),
                    Poll::Pending => {}
                }
            }

            if self.server.outbuf.len() < HIGH_WATER {
                if !self.client.inbuf.is_empty() {
                    let before = self.server.outbuf.len();
                    if let Err(exit) = self.on_client_input() {
                        return Poll::Ready(exit);
                    }
                    progress |= self.server.outbuf.len() != before;
                }
                match self.client.poll_read_more(cx) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(PumpExit::ClientGone),
                    Poll::Ready(Ok(_)) => {
                        progress = true;
                        if let Err(exit) = self.on_client_input() {
                            return Poll::Ready(exit);
                        }
                    }
                    Poll::Pending => {}
                }
            }

            if !progress {
                return Poll::Pending;
            }
        }
    }

    fn server_closed(&mut self) -> PumpExit {
        self.server.mark_broken();
        let addr = self.server.addr().to_owned();
        PumpExit::ServerFailed(match self.server.fatal.take() {
            Some((sqlstate, message)) => UpstreamError::Terminated {
                addr,
                sqlstate,
                message,
            },
            None => UpstreamError::Closed { addr },
        })
    }

    fn server_io_failed(&mut self, source: std::io::Error) -> PumpExit {
        self.server.mark_broken();
        PumpExit::ServerFailed(UpstreamError::Io {
            addr: self.server.addr().to_owned(),
            source,
        })
    }

    fn server_broke(&mut self, reason: String) -> PumpExit {
        self.server.mark_broken();
        PumpExit::ServerFailed(UpstreamError::Protocol {
            addr: self.server.addr().to_owned(),
            reason,
        })
    }

    /// Handles every whole client message in the input buffer (and the start of a large
    /// CopyData), forwarding them to the server.
    fn on_client_input(&mut self) -> Result<(), PumpExit> {
        let client = &mut *self.client;
        let server = &mut *self.server;
        // Bytes at the front of the client input that go to the server unchanged.
        let mut run = 0;
        let result = loop {
            if self.client_passthrough > 0 {
                let n = self.client_passthrough.min(client.inbuf.len() - run);
                if n == 0 {
                    break Ok(());
                }
                self.client_passthrough -= n;
                run += n;
                continue;
            }
            if server.outbuf.len() + run >= HIGH_WATER {
                break Ok(());
            }
            let rest = &client.inbuf[run..];
            let header = match Header::peek(rest) {
                Ok(Some(header)) => header,
                Ok(None) => break Ok(()),
                Err(error) => break Err(PumpExit::ClientBroke(error)),
            };
            if header.len > client.max_message {
                break Err(PumpExit::ClientBroke(ProtocolError::TooLarge {
                    tag: header.tag,
                    len: header.len,
                    limit: client.max_message,
                }));
            }
            let Some(tag) = FrontendTag::from_byte(header.tag) else {
                break Err(PumpExit::ClientBroke(ProtocolError::UnexpectedTag(header.tag)));
            };
            if tag == FrontendTag::CopyData && server.copy_in && header.len > rest.len() {
                self.client_passthrough = header.len;
                continue;
            }
            if header.len > rest.len() {
                client.inbuf.reserve(header.len - rest.len());
                break Ok(());
            }
            let forward = match tag {
                FrontendTag::Query => {
                    server.expect.push(Expect::ResultsUntilReady, Recipient::Client);
                    self.traffic.queries += 1;
                    true
                }
                FrontendTag::FunctionCall => {
                    server.expect.push(Expect::ResultsUntilReady, Recipient::Client);
                    true
                }
                FrontendTag::Parse => extended(server, Expect::ParseComplete),
                FrontendTag::Bind => extended(server, Expect::BindComplete),
                FrontendTag::Describe => extended(server, Expect::Description),
                FrontendTag::Close => extended(server, Expect::CloseComplete),
                FrontendTag::Execute => {
                    self.traffic.queries += 1;
                    extended(server, Expect::ExecuteResult)
                }
                FrontendTag::Sync => {
                    server.expect.push(Expect::Ready, Recipient::Client);
                    server.unsynced = false;
                    true
                }
                FrontendTag::Flush => true,
                // After a failed COPY the client may still send the rest of its data,
                // which PostgreSQL itself ignores too.
                FrontendTag::CopyData | FrontendTag::CopyDone | FrontendTag::CopyFail => server.copy_in,
                FrontendTag::Terminate => break Err(PumpExit::ClientGone),
                FrontendTag::Password => break Err(PumpExit::ClientBroke(ProtocolError::UnexpectedTag(header.tag))),
            };
            if forward {
                run += header.len;
            } else {
                move_bytes(&mut client.inbuf, run, &mut server.outbuf);
                client.inbuf.advance(header.len);
                run = 0;
            }
        };
        move_bytes(&mut client.inbuf, run, &mut server.outbuf);
        result
    }

    /// Handles the server's input: forwards what belongs to the client, swallows the
    /// replies to pgrelay's own messages, and tracks the server's state.
    fn on_server_input(&mut self) -> Result<(), PumpExit> {
        // Bytes at the front of the server input that go to the client unchanged.
        let mut run = 0;
        let result = loop {
            let server = &mut *self.server;
            if server.passthrough > 0 {
                let n = server.passthrough.min(server.inbuf.len() - run);
                if n == 0 {
                    break Ok(());
                }
                server.passthrough -= n;
                if server.passthrough_to_client {
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
                        server.passthrough = header.len;
                        server.passthrough_to_client = routing.recipient == Recipient::Client;
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
                    ready: false,
                },
                Err(error) => break Err(self.server_broke(error.to_string())),
            };
            let mut to_client = routing.recipient == Recipient::Client;
            let body = &server.inbuf[run + HEADER_LEN..run + header.len];
            match tag {
                BackendTag::ReadyForQuery => {
                    let Ok(status) = ready_status(body) else {
                        break Err(self.server_broke("bad ReadyForQuery".to_owned()));
                    };
                    server.status = status;
                    if to_client && status == TxStatus::Idle {
                        self.traffic.transactions += 1;
                    }
                    if to_client && self.statement_mode && status != TxStatus::Idle {
                        move_bytes(&mut server.inbuf, run, &mut self.client.outbuf);
                        server.inbuf.advance(header.len);
                        return Err(PumpExit::TransactionInStatementMode);
                    }
                }
                BackendTag::ErrorResponse => {
                    let fields = ErrorFields::read(body).unwrap_or_default();
                    if fields.is_fatal() {
                        // The server closes right after; the client hears of it once,
                        // as the failure of its server connection.
                        server.broken = true;
                        server.fatal = Some((fields.code.to_owned(), fields.message.to_owned()));
                        to_client = false;
                    } else if !to_client && server.expect.is_empty() {
                        break Err(self.server_broke("error outside any request".to_owned()));
                    }
                    server.copy_in = false;
                    if !to_client {
                        tracing::warn!(server = %server.addr(), sqlstate = fields.code, message = fields.message,
                            "a statement pgrelay sent on its own failed");
                    }
                }
                BackendTag::CommandComplete => server.copy_in = false,
                BackendTag::ParameterStatus => {
                    if let Ok((name, value)) = parameter_status(body) {
                        let (name, value) = (name.to_owned(), value.to_owned());
                        server.note_parameter(&name, &value);
                        server.params.set(&name, &value);
                        if to_client {
                            self.wanted.set(&name, &value);
                        }
                    }
                }
                BackendTag::CopyInResponse | BackendTag::CopyBothResponse => server.copy_in = true,
                BackendTag::NotificationResponse | BackendTag::NoticeResponse => {}
                BackendTag::Authentication | BackendTag::BackendKeyData | BackendTag::NegotiateProtocolVersion => {
                    to_client = false;
                }
                BackendTag::BindComplete
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
                | BackendTag::RowDescription => {}
            }
            if to_client {
                run += header.len;
            } else {
                move_bytes(&mut server.inbuf, run, &mut self.client.outbuf);
                server.inbuf.advance(header.len);
                run = 0;
            }
        };
        move_bytes(&mut self.server.inbuf, run, &mut self.client.outbuf);
        result
    }
}

/// Records an extended-protocol message: its reply is owed, and the server stays in an
/// implicit transaction until the next Sync.
fn extended(server: &mut ServerConn, expect: Expect) -> bool {
    server.expect.push(expect, Recipient::Client);
    server.unsynced = true;
    true
}

/// Moves the first `n` bytes of `from` to the end of `to`, without copying when `to`
/// is empty.
fn move_bytes(from: &mut BytesMut, n: usize, to: &mut BytesMut) {
    if n == 0 {
        return;
    }
    if to.is_empty() {
        *to = from.split_to(n);
    } else {
        to.extend_from_slice(&from[..n]);
        from.advance(n);
    }
}
