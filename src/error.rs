//! What a client is told when pgrelay refuses or fails something: the SQLSTATE, a message
//! that is safe to show (no passwords, no internals), which side failed, and whether the
//! client may simply retry.

use std::borrow::Cow;

use crate::pool::PoolError;
use crate::upstream::UpstreamError;

/// The SQLSTATE codes pgrelay itself sends.
pub mod sqlstate {
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    pub const CONNECTION_FAILURE: &str = "08006";
    pub const INVALID_AUTHORIZATION: &str = "28000";
    pub const INVALID_PASSWORD: &str = "28P01";
    pub const INVALID_CATALOG_NAME: &str = "3D000";
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    pub const CONFIGURATION_LIMIT_EXCEEDED: &str = "53400";
    pub const INSUFFICIENT_PRIVILEGE: &str = "42501";
    pub const QUERY_CANCELED: &str = "57014";
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    pub const IN_FAILED_TRANSACTION: &str = "25P02";
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
    pub const SYNTAX_ERROR: &str = "42601";
    pub const INTERNAL_ERROR: &str = "XX000";
}

/// Which party a failure comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client sent something wrong (bad password, protocol violation…).
    Client,
    /// A PostgreSQL server failed or refused pgrelay.
    Server,
    /// pgrelay itself ran out of something (connections, time) or is shutting down.
    Pgrelay,
}

/// The text of an error as bytes. pgrelay's own words are UTF-8 (ASCII in practice), but a
/// text a server sent is in the encoding of the session it came from, which need not be
/// UTF-8 (LATIN9, SJIS…): quoted in one of pgrelay's messages it keeps its bytes, so the
/// client reads it as the server wrote it. Shown (logs, `Display`) it is decoded lossily.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct MessageText(Vec<u8>);

impl MessageText {
    /// A server's text, as it sent it.
    pub fn from_server(bytes: &[u8]) -> Self {
        MessageText(bytes.to_vec())
    }

    /// `before`, then `quoted` unchanged, then `after`.
    pub fn quoting(before: &str, quoted: &MessageText, after: &str) -> Self {
        MessageText([before.as_bytes(), &quoted.0, after.as_bytes()].concat())
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl From<String> for MessageText {
    fn from(text: String) -> Self {
        MessageText(text.into_bytes())
    }
}

impl From<&str> for MessageText {
    fn from(text: &str) -> Self {
        MessageText(text.as_bytes().to_vec())
    }
}

impl AsRef<[u8]> for MessageText {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Display for MessageText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&String::from_utf8_lossy(&self.0))
    }
}

impl std::fmt::Debug for MessageText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&String::from_utf8_lossy(&self.0), f)
    }
}

/// An error as a client will see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientError {
    pub side: Side,
    pub sqlstate: Cow<'static, str>,
    pub message: MessageText,
    /// Sending the same request again later may succeed.
    pub retryable: bool,
}

impl ClientError {
    pub fn new(side: Side, sqlstate: impl Into<Cow<'static, str>>, message: impl Into<MessageText>) -> Self {
        ClientError {
            side,
            sqlstate: sqlstate.into(),
            message: message.into(),
            retryable: matches!(side, Side::Server | Side::Pgrelay),
        }
    }

    pub fn protocol_violation(message: impl Into<MessageText>) -> Self {
        Self::new(Side::Client, sqlstate::PROTOCOL_VIOLATION, message)
    }

    /// A failure to reach or keep a server; the message names the database, not the host.
    pub fn from_pool(error: &PoolError, database: &str) -> Self {
        match error {
            PoolError::WaitTimeout => Self::new(
                Side::Pgrelay,
                sqlstate::TOO_MANY_CONNECTIONS,
                format!("no server connection for database \"{database}\" became free within query_wait_timeout"),
            ),
            PoolError::ConnectTimeout => Self::new(
                Side::Server,
                sqlstate::CONNECTION_FAILURE,
                format!("server for database \"{database}\" did not answer within server_connect_timeout"),
            ),
            PoolError::LoginWaitTimeout => Self::new(
                Side::Server,
                sqlstate::CONNECTION_FAILURE,
                format!("server for database \"{database}\" did not finish pgrelay's login within query_wait_timeout"),
            ),
            PoolError::LimitWaitTimeout { key, limit } => Self::new(
                Side::Pgrelay,
                sqlstate::TOO_MANY_CONNECTIONS,
                format!(
                    "no server connection for database \"{database}\" within query_wait_timeout: \
                     {key} ({limit}) reached"
                ),
            ),
            PoolError::Spent(kind) => Self::new(
                Side::Pgrelay,
                sqlstate::TOO_MANY_CONNECTIONS,
                format!(
                    "no server connection for database \"{database}\": {} reached",
                    kind.key()
                ),
            ),
            PoolError::Connect(upstream) => Self::from_upstream(upstream, database),
            PoolError::Closed => Self::new(
                Side::Pgrelay,
                sqlstate::CONNECTION_FAILURE,
                format!("the pool of database \"{database}\" was closed (removed by a reload or shutting down)"),
            ),
        }
    }

    pub fn from_upstream(error: &UpstreamError, database: &str) -> Self {
        let message: MessageText = match error {
            UpstreamError::Connect { source, .. } => {
                format!("server for database \"{database}\" is unreachable: {source}").into()
            }
            UpstreamError::LoginRefused { message, .. } => MessageText::quoting(
                &format!("server for database \"{database}\" refused pgrelay's login: "),
                message,
                "",
            ),
            UpstreamError::Credentials { reason, .. } => {
                format!("pgrelay cannot log in to the server for database \"{database}\": {reason}").into()
            }
            UpstreamError::Terminated { message, .. } => MessageText::quoting(
                &format!("server connection for database \"{database}\" was terminated: "),
                message,
                "",
            ),
            UpstreamError::Closed { .. } | UpstreamError::Io { .. } => {
                format!("server connection for database \"{database}\" was lost").into()
            }
            UpstreamError::Protocol { .. } | UpstreamError::Unusable { .. } => {
                format!("server connection for database \"{database}\" failed").into()
            }
            UpstreamError::QueryTimeout { .. } => format!(
                "canceling statement due to query_timeout: the server of database \"{database}\" did not act on the cancel, so its connection was closed"
            )
            .into(),
        };
        // The server's own reason when it gave one as it ended the session (57P01
        // administrator command, 57P02 crash of another process...): what a direct
        // connection would have shown.
        let code: Cow<'static, str> = match error {
            UpstreamError::Terminated { sqlstate, .. } if sqlstate.len() == 5 => sqlstate.clone().into(),
            UpstreamError::QueryTimeout { .. } => sqlstate::QUERY_CANCELED.into(),
            _ => sqlstate::CONNECTION_FAILURE.into(),
        };
        Self::new(Side::Server, code, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_servers_text_keeps_its_bytes_in_pgrelays_messages() {
        // A LATIN9 session's FATAL: 'ä' is one byte, not UTF-8.
        let terminated = UpstreamError::Terminated {
            addr: "db:5432".into(),
            sqlstate: "57P01".into(),
            message: MessageText::from_server(b"Verbindung abgebrochen \xe4"),
        };
        let error = ClientError::from_upstream(&terminated, "app");
        assert_eq!(error.sqlstate, "57P01");
        assert_eq!(
            error.message.as_bytes(),
            b"server connection for database \"app\" was terminated: Verbindung abgebrochen \xe4"
        );
        assert!(
            error.message.to_string().ends_with("abgebrochen \u{fffd}"),
            "shown lossily"
        );
        let wrapped = MessageText::quoting("lost (", &error.message, ")");
        assert!(wrapped.as_bytes().ends_with(b"\xe4)"));
    }
}
