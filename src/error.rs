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

/// An error as a client will see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientError {
    pub side: Side,
    pub sqlstate: Cow<'static, str>,
    pub message: String,
    /// Sending the same request again later may succeed.
    pub retryable: bool,
}

impl ClientError {
    pub fn new(side: Side, sqlstate: impl Into<Cow<'static, str>>, message: impl Into<String>) -> Self {
        ClientError {
            side,
            sqlstate: sqlstate.into(),
            message: message.into(),
            retryable: matches!(side, Side::Server | Side::Pgrelay),
        }
    }

    pub fn protocol_violation(message: impl Into<String>) -> Self {
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
            PoolError::Connect(upstream) => Self::from_upstream(upstream, database),
            PoolError::Closed => Self::new(
                Side::Pgrelay,
                sqlstate::CONNECTION_FAILURE,
                format!("the pool of database \"{database}\" was closed (removed by a reload or shutting down)"),
            ),
        }
    }

    pub fn from_upstream(error: &UpstreamError, database: &str) -> Self {
        let message = match error {
            UpstreamError::Connect { source, .. } => {
                format!("server for database \"{database}\" is unreachable: {source}")
            }
            UpstreamError::LoginRefused { message, .. } => {
                format!("server for database \"{database}\" refused pgrelay's login: {message}")
            }
            UpstreamError::Credentials { reason, .. } => {
                format!("pgrelay cannot log in to the server for database \"{database}\": {reason}")
            }
            UpstreamError::Terminated { message, .. } => {
                format!("server connection for database \"{database}\" was terminated: {message}")
            }
            UpstreamError::Closed { .. } | UpstreamError::Io { .. } => {
                format!("server connection for database \"{database}\" was lost")
            }
            UpstreamError::Protocol { .. } | UpstreamError::Unusable { .. } => {
                format!("server connection for database \"{database}\" failed")
            }
            UpstreamError::QueryTimeout { .. } => format!(
                "canceling statement due to query_timeout: the server of database \"{database}\" did not act on the cancel, so its connection was closed"
            ),
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
