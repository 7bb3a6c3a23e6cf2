//! Waiting for the client's next whole message: client_idle_timeout, shutdown, and the
//! server kept between messages (session mode, a pinned client), whose notifications,
//! notices and parameter changes go to the client as they come, and whose end ends the
//! session at once, as on a direct connection.

use tokio::io::AsyncReadExt;

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
    async fn wait_for_input(
        &mut self,
        client: &mut ClientConn,
        idle_deadline: Option<(tokio::time::Instant, std::time::Duration)>,
    ) -> Result<(), End> {
        loop {
            let idle = client.inbuf.is_empty();
            // Between transactions only, as PostgreSQL delivers them; in a block they wait.
            let inbox = self
                .subscription
                .as_deref()
                .filter(|_| self.local.tx == super::LocalTx::Idle)
                .map(crate::notify::Subscription::inbox);
            let woke = {
                let notifications = async {
                    match inbox {
                        Some(inbox) => inbox.ready().await,
                        None => std::future::pending().await,
                    }
                };
                let from_client = async {
                    if client.inbuf.is_empty() {
                        // Readable first, so that an idle client holds no buffer.
                        client.stream.readable().await?;
                    }
                    client.read_more().await
                };
                let from_server = async {
                    match self.server.as_deref_mut() {
                        Some(server) => {
                            server.stream.readable().await?;
                            reserve_for_read(&mut server.inbuf);
                            server.stream.read_buf(&mut server.inbuf).await
                        }
                        None => std::future::pending().await,
                    }
                };
                let idle_limit = async {
                    match idle_deadline {
                        Some((deadline, limit)) if idle => {
                            tokio::time::sleep_until(deadline).await;
                            limit
                        }
                        _ => std::future::pending().await,
                    }
                };
                let shutting_down = async {
                    if idle {
                        let _ = self.shutting_down.wait_for(|stopping| *stopping).await;
                    } else {
                        std::future::pending::<()>().await;
                    }
                };
                tokio::select! {
                    read = from_client => Woke::Client(read),
                    read = from_server => Woke::Server(read),
                    () = notifications => Woke::Notifications,
                    limit = idle_limit => Woke::Ended(End::IdleTimeout(limit)),
                    () = shutting_down => Woke::Ended(End::Shutdown),
                }
            };
            match woke {
                Woke::Client(Ok(0) | Err(_)) => return Err(End::ClientLeft),
                Woke::Client(Ok(_)) => return Ok(()),
                Woke::Server(read) => self.kept_server_spoke(client, read).await?,
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
