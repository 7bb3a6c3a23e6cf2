//! The admin console: clients connected to database "pgrelay" run SHOW commands and
//! control commands (RELOAD, PAUSE, RESUME, KILL, SHUTDOWN) as simple queries. Admin
//! users may run everything, stats users only SHOW, anyone else nothing (42501).

mod control;
mod show;

use std::sync::Arc;

use bytes::BytesMut;

use crate::cancel::CancelHandle;
use crate::error::sqlstate;
use crate::net::{ClientConn, ClientReadError, ClientStream};
use crate::protocol::compose::{self, Severity};
use crate::protocol::views::query_text;
use crate::protocol::{FrontendTag, TxStatus};
use crate::runtime::Shared;
use crate::session::ClientSlot;

/// What a console user may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Admin,
    Stats,
    Nobody,
}

/// One connection to the admin console, after login.
pub struct AdminSession {
    shared: Arc<Shared>,
    user: String,
    role: Role,
    _slot: ClientSlot,
    _cancel: CancelHandle,
}

/// A command's answer, or the reason it was refused.
type Outcome = Result<(), (&'static str, String)>;

impl AdminSession {
    pub fn new(shared: Arc<Shared>, user: &str, slot: ClientSlot, cancel: CancelHandle) -> Self {
        let snapshot = shared.snapshot();
        let role = if snapshot.is_admin(user) {
            Role::Admin
        } else if snapshot.is_stats_user(user) {
            Role::Stats
        } else {
            Role::Nobody
        };
        AdminSession {
            shared,
            user: user.to_owned(),
            role,
            _slot: slot,
            _cancel: cancel,
        }
    }

    /// Runs the console on `control` (the control thread's runtime) where the connection
    /// can move there, so that it answers while a worker thread is kept by a task. Plain
    /// TCP moves; a TLS connection's state cannot leave its runtime and stays here.
    pub async fn run_on(self, control: Option<&tokio::runtime::Handle>, client: ClientConn) {
        let Some(control) = control else {
            return self.run(client).await;
        };
        let ClientConn {
            stream,
            inbuf,
            outbuf,
            peer,
            max_message,
            bytes_read,
        } = client;
        let tcp = match stream {
            ClientStream::Tcp(tcp) => tcp,
            stream @ (ClientStream::Tls(_) | ClientStream::Resumed(_) | ClientStream::Detached) => {
                let client = ClientConn {
                    stream,
                    inbuf,
                    outbuf,
                    peer,
                    max_message,
                    bytes_read,
                };
                return self.run(client).await;
            }
        };
        let Ok(tcp) = tcp.into_std() else { return };
        let console = control.spawn(async move {
            let Ok(tcp) = tokio::net::TcpStream::from_std(tcp) else {
                return;
            };
            let client = ClientConn {
                stream: ClientStream::Tcp(tcp),
                inbuf,
                outbuf,
                peer,
                max_message,
                bytes_read,
            };
            self.run(client).await;
        });
        // Waited for here, so that shutdown waits for the console like for any session.
        let _ = console.await;
    }

    pub async fn run(self, mut client: ClientConn) {
        let mut skipping_to_sync = false;
        let mut shutting_down = self.shared.shutting_down();
        loop {
            if client.flush().await.is_err() {
                return;
            }
            // A console between commands does not hold up pgrelay's shutdown.
            let next = tokio::select! {
                next = client.next_frame() => next,
                () = async { drop(shutting_down.wait_for(|stopping| *stopping).await) } => {
                    compose::error(
                        &mut client.outbuf,
                        Severity::Fatal,
                        sqlstate::ADMIN_SHUTDOWN,
                        "terminating connection because pgrelay is shutting down",
                    );
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), client.flush()).await;
                    return;
                }
            };
            let frame = match next {
                Ok(Some(frame)) => frame,
                Ok(None) | Err(ClientReadError::Io(_)) => return,
                Err(ClientReadError::Protocol(error)) => {
                    compose::error(
                        &mut client.outbuf,
                        Severity::Fatal,
                        sqlstate::PROTOCOL_VIOLATION,
                        &error.to_string(),
                    );
                    let _ = client.flush().await;
                    return;
                }
            };
            match FrontendTag::from_byte(frame.tag()) {
                Some(FrontendTag::Terminate) | None => return,
                Some(FrontendTag::Query) => {
                    let text = String::from_utf8_lossy(query_text(frame.body()).unwrap_or_default()).into_owned();
                    let outcome = self.execute(&text, &mut client.outbuf).await;
                    if let Err((code, message)) = outcome {
                        compose::error(&mut client.outbuf, Severity::Error, code, &message);
                    }
                    compose::ready_for_query(&mut client.outbuf, TxStatus::Idle);
                }
                Some(FrontendTag::Sync) => {
                    skipping_to_sync = false;
                    compose::ready_for_query(&mut client.outbuf, TxStatus::Idle);
                }
                Some(_) if skipping_to_sync => {}
                Some(_) => {
                    compose::error(
                        &mut client.outbuf,
                        Severity::Error,
                        sqlstate::FEATURE_NOT_SUPPORTED,
                        "the admin console accepts simple queries only",
                    );
                    skipping_to_sync = true;
                }
            }
        }
    }

    /// Runs one command text, writing its result set (or nothing) to `out`.
    async fn execute(&self, text: &str, out: &mut BytesMut) -> Outcome {
        let command = text.trim().trim_end_matches(';').trim();
        let words: Vec<&str> = command.split_whitespace().collect();
        let Some(verb) = words.first().map(|word| word.to_ascii_uppercase()) else {
            compose::empty_query_response(out);
            return Ok(());
        };
        let refuse = || {
            Err((
                sqlstate::INSUFFICIENT_PRIVILEGE,
                format!(
                    "user \"{}\" may not run \"{}\" on the admin console",
                    self.user, command
                ),
            ))
        };
        let is_show = verb == "SHOW";
        match self.role {
            Role::Nobody => return refuse(),
            Role::Stats if !is_show => return refuse(),
            Role::Admin | Role::Stats => {}
        }
        let argument = words.get(1).copied();
        if words.len() > 2 {
            return Err(unknown(command));
        }
        match verb.as_str() {
            "SHOW" => show::show(&self.shared, argument.unwrap_or_default(), out).ok_or_else(|| unknown(command)),
            "RELOAD" if argument.is_none() => control::reload(&self.shared, out),
            "PAUSE" => control::pause(&self.shared, argument, out).await,
            "RESUME" => control::resume(&self.shared, argument, out),
            "KILL" => match argument {
                Some(database) => control::kill(&self.shared, database, out),
                None => Err((sqlstate::SYNTAX_ERROR, "KILL needs a database name".to_owned())),
            },
            "SHUTDOWN" if argument.is_none() => {
                self.shared.request_shutdown();
                compose::command_complete(out, "SHUTDOWN");
                Ok(())
            }
            _ => Err(unknown(command)),
        }
    }
}

fn unknown(command: &str) -> (&'static str, String) {
    (
        sqlstate::SYNTAX_ERROR,
        format!("unknown admin console command \"{command}\"; SHOW HELP lists them"),
    )
}
