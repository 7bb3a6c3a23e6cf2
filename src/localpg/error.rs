//! The single error type of `localpg`: every message says what went wrong and what to do about it.

use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong while running a throwaway local PostgreSQL cluster.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "no PostgreSQL server binaries found (looked in: {searched}); install the server \
         package (Debian/Ubuntu: `apt-get install postgresql`) or set PGRELAY_PG_BIN to the \
         directory holding `postgres` and `initdb`"
    )]
    BinariesNotFound { searched: String },

    #[error(
        "PGRELAY_PG_BIN={dir} has no `{missing}`; point it at a PostgreSQL bin directory such \
         as /usr/lib/postgresql/15/bin, or unset it to search the usual places"
    )]
    BadBinDir { dir: PathBuf, missing: String },

    #[error(
        "PostgreSQL {version} in {dir} is too old: streaming replicas are set up the PostgreSQL \
         12+ way; install a newer server or point PGRELAY_PG_BIN at one"
    )]
    UnsupportedVersion { dir: PathBuf, version: String },

    #[error(
        "`{name}` not found in {dir} nor in /usr/bin; install the PostgreSQL client tools \
         (Debian/Ubuntu: `apt-get install postgresql-client postgresql-contrib`)"
    )]
    BinaryNotFound { name: String, dir: PathBuf },

    #[error(
        "running as root, so PostgreSQL must run as an unprivileged user, but user `{user}` \
         does not exist; create it or set PGRELAY_PG_USER to an existing unprivileged user"
    )]
    NoSuchUser { user: String },

    #[error(
        "PGRELAY_PG_USER=`{user}` is root (uid 0), and PostgreSQL refuses to run as root; \
         name an unprivileged user instead"
    )]
    RootPgUser { user: String },

    #[error(
        "{dir} is not reachable by user `{user}` that PostgreSQL runs as (a parent directory \
         lacks search permission); set TMPDIR to a world-accessible directory such as /tmp"
    )]
    DirNotAccessible { dir: PathBuf, user: String },

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    #[error("`{command}` failed ({status}): {stderr}{log_tail}")]
    CommandFailed {
        command: String,
        status: String,
        stderr: String,
        /// Empty, or a newline followed by the tail of the relevant server log.
        log_tail: String,
    },

    #[error(
        "`{command}` did not finish within {timeout:?} and was killed; the server may be hung \
         or overloaded{log_tail}"
    )]
    CommandTimedOut {
        command: String,
        timeout: Duration,
        log_tail: String,
    },

    #[error("{node} exited while starting ({status}); see {log}, last lines:\n{tail}")]
    StartupFailed {
        node: String,
        status: String,
        log: PathBuf,
        tail: String,
    },

    #[error("{node} did not {what} within {timeout:?}; see {log}, last lines:\n{tail}")]
    Timeout {
        node: String,
        what: String,
        timeout: Duration,
        log: PathBuf,
        tail: String,
    },

    #[error("{node} is not running; call `start` on it first")]
    NotRunning { node: String },

    #[error("{node} is not a replica (it is not in recovery), so it cannot be {what}")]
    NotAReplica { node: String, what: String },

    #[error("the localpg spawner thread is gone; the process is shutting down")]
    SpawnerGone,

    #[error("errors while shutting the cluster down:\n{0}")]
    Shutdown(String),
}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}
