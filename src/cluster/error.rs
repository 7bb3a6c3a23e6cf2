//! What can go wrong in the cluster monitor that a caller has to handle. Failing health checks
//! are not errors here: they make a host down in the view.

/// Errors of [`crate::cluster`].
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("invalid WAL position {0:?}: expected two hexadecimal numbers separated by '/', such as 16/B374D848")]
    BadLsn(String),
    #[error("server address {0:?} is not host:port (IPv6 as [addr]:port)")]
    BadAddress(String),
    #[error("database {0:?} has no server to monitor")]
    NoHosts(String),
    #[error("the cluster monitor must be started from inside a tokio runtime")]
    NoRuntime,
}
