//! Waiting for the client's next whole message: client_idle_timeout, shutdown, and the
//! server kept between messages (session mode, a pinned client), whose notifications,
//! notices and parameter changes go to the client as they come, and whose end ends the
//! session at once, as on a direct connection; and, for a fan-out listener, the notifications
//! in its inbox, delivered while it is between transactions.

use std::task::Poll;

use tokio_util::io::poll_read_buf;

use super::{End, Session};
use crate::error::ClientError;
use crate::net::{ClientConn, reserve_for_read};
use crate::protocol::{FrontendTag, Header, ProtocolError};
use crate::session::pump::Pump;

/// What ended one wait.
enum Woke {
    /// The client sent more: what reading it gave.
    Client(std::io::Result<usize>),
    /// The kept server sent something: what reading it gave.
    Server(std::io::Result<usize>),
    /// Notifications (or word of a gap) wait in the client's inbox.
    Notifications,
    Ended(End),
}

impl Session {
    /// Waits until the input holds a whole message and returns its type.
    pub(super) async fn next_message(&mut self, client: &mut ClientConn) -> Result<FrontendTag, End> {
        // client_idle_timeout counts from here: what a kept server sends meanwhile does
        // not make the client any less idle.
        let idle_deadline = self
            .idle_timeout
            .map(|limit| (tokio::time::Instant::now() + limit, limit));
        loop {
            match Header::peek(&client.inbuf) {
                Err(error) => return Err(End::ClientBroke(ClientError::protocol_violation(error.to_string()))),
                Ok(Some(header)) => {
                    if header.len > client.max_message {
                        let error = ProtocolError::TooLarge {
                            tag: header.tag,
                            len: header.len,
                            limit: client.max_message,
                        };
                        return Err(End::ClientBroke(ClientError::protocol_violation(format!(
                            "{error} (max_message_size)"
                        ))));
                    }
                    let Some(tag) = FrontendTag::from_byte(header.tag) else {
                        let error = ProtocolError::UnexpectedTag(header.tag);
                        return Err(End::ClientBroke(ClientError::protocol_violation(error.to_string())));
                    };
                    if client.inbuf.len() >= header.len {
                        return Ok(tag);
                    }
                    // Wait for the whole message, even with a server attached: between
                    // batches the server is in no COPY, so the pump would not stream it
                    // either, and handing it a partial message made it return at once
                    // (its server idle) into this loop, which then never read again.
                    // Room for all of it is made once, so no byte is copied twice.
                    client.inbuf.reserve(header.len - client.inbuf.len());
                }
                Ok(None) => {}
            }
            self.wait_for_input(client, idle_deadline).await?;
        }
    }

    /// Waits until the client sends more and reads it. While its input is empty it
    /// holds no buffer and the wait ends on client_idle_timeout or at shutdown. Whatever
    /// a kept server says meanwhile is handled at once; each pass of the loop takes what
    /// one read of the server gave, so it waits for a socket every time.
    ///
    /// An idle client's task waits here, so the wait is one small hand-written poll
    /// (socket readiness, the session's own timer, a shutdown `Notified`, the
    /// notification inbox of a fan-out listener) rather than a `select!` of five futures.
    async fn wait_for_input(
        &mut self,
        client: &mut ClientConn,
        idle_deadline: Option<(tokio::time::Instant, std::time::Duration)>,
    ) -> Result<(), End> {
        loop {
            let idle = client.inbuf.is_empty();
            // A block of its own: the shutdown `Notified` borrows the session until it ends.
            let woke = {
                let shared = &self.shared;
                let mut shutdown = std::pin::pin!(shared.shutdown_notified());
                // Enabled before the flag is read: a shutdown that begins after the read
                // completes it (see `Shared::shutdown_notified`).
                shutdown.as_mut().enable();
                if idle && shared.is_shutting_down() {
                    return Err(End::Shutdown);
                }
                let idle_limit = match idle_deadline {
                    Some((deadline, limit)) if idle => {
                        let timer = self
                            .idle_timer
                            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                        timer.as_mut().reset(deadline);
                        Some(limit)
                    }
                    _ => None,
                };
                // Between transactions only, as PostgreSQL delivers them; in a block they wait.
                let inbox = self
                    .subscription
                    .as_deref()
                    .filter(|_| {
                        self.local.tx == super::LocalTx::Idle
                            && self
                                .server
                                .as_deref()
                                .is_none_or(|server| server.status() == crate::protocol::TxStatus::Idle)
                    })
                    .map(crate::notify::Subscription::inbox);
                let mut notifications = std::pin::pin!(async {
                    match inbox {
                        Some(inbox) => inbox.ready().await,
                        None => std::future::pending().await,
                    }
                });
                let server = &mut self.server;
                let timer = &mut self.idle_timer;
                std::future::poll_fn(|cx| {
                    if !client.inbuf.is_empty() || client.stream.poll_read_ready(cx).is_ready() {
                        // Readable first, so that an idle client holds no buffer; an error
                        // of the readiness shows again in the read.
                        if let Poll::Ready(read) = client.poll_read_more(cx) {
                            return Poll::Ready(Woke::Client(read));
                        }
                    }
                    if let Some(server) = server.as_deref_mut() {
                        match server.stream.poll_read_ready(cx) {
                            Poll::Ready(Err(error)) => return Poll::Ready(Woke::Server(Err(error))),
                            Poll::Ready(Ok(())) => {
                                reserve_for_read(&mut server.inbuf);
                                let read = poll_read_buf(std::pin::Pin::new(&mut server.stream), cx, &mut server.inbuf);
                                if let Poll::Ready(read) = read {
                                    return Poll::Ready(Woke::Server(read));
                                }
                            }
                            Poll::Pending => {}
                        }
                    }
                    if notifications.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Woke::Notifications);
                    }
                    if let (Some(limit), Some(timer)) = (idle_limit, timer.as_mut())
                        && timer.as_mut().poll(cx).is_ready()
                    {
                        return Poll::Ready(Woke::Ended(End::IdleTimeout(limit)));
                    }
                    if idle && shutdown.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Woke::Ended(End::Shutdown));
                    }
                    Poll::Pending
                })
                .await
            };
            match woke {
                Woke::Client(Ok(0) | Err(_)) => return Err(End::ClientLeft),
                Woke::Client(Ok(_)) => return Ok(()),
                // Boxed: forwarding what a kept server said (and ending the session if it
                // is gone) is a large future, needed only in session mode or when pinned.
                Woke::Server(read) => Box::pin(self.kept_server_spoke(client, read)).await?,
                Woke::Notifications => {
                    // Whole messages only are in the output here: the client's replies
                    // were all written before it was asked for more.
                    self.take_notifications(client)?;
                    self.flush_notifications(client).await?;
                }
                Woke::Ended(end) => return Err(end),
            }
        }
    }

    /// Forwards what the kept server sent while the client was between messages, or
    /// ends the session if the server is gone.
    async fn kept_server_spoke(&mut self, client: &mut ClientConn, read: std::io::Result<usize>) -> Result<(), End> {
        let Some(mut server) = self.server.take() else {
            return Ok(());
        };
        let mode = self.pump_mode();
        let pump = Pump::new(
            client,
            &mut server,
            &mut self.carried,
            &self.metrics,
            mode,
            &self.database.classifier,
            &self.database.schema,
        );
        match pump.kept_server_spoke(read) {
            None => {
                self.server = Some(server);
                client.flush().await.map_err(|_| End::ClientLeft)
            }
            // The client's session state was on that server: the session ends, with
            // the server's reason.
            Some(exit) => match self.after_pump(client, server, exit, None).await {
                Some(end) => Err(end),
                None => Ok(()),
            },
        }
    }
}
