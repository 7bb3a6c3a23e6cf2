//! The PostgreSQL wire codec: message tags, framing with size limits, the startup packet,
//! typed views over the original bytes, and the messages pgrelay composes itself.
//!
//! Nothing here does I/O. Every length read from the wire is checked against a limit
//! before anything is allocated for it, and no input makes these functions panic.

pub mod compose;
pub mod frame;
pub mod startup;
pub mod tag;
pub mod views;

pub use frame::{Frame, HEADER_LEN, Header};
pub use tag::{BackendTag, FrontendTag};

/// A violation of the wire protocol by the peer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("message of type '{}' is {len} bytes, more than the limit of {limit}", char::from(*.tag))]
    TooLarge { tag: u8, len: usize, limit: usize },
    #[error("message of type '{}' has an invalid length {len}", char::from(*.tag))]
    BadLength { tag: u8, len: u32 },
    #[error("unexpected message type '{}'", char::from(*.0))]
    UnexpectedTag(u8),
    #[error("malformed {0} message")]
    Malformed(&'static str),
}

/// Transaction status of a server session, as reported by ReadyForQuery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxStatus {
    /// Not in a transaction block.
    Idle,
    /// In a transaction block.
    InTransaction,
    /// In a failed transaction block: statements are refused until it ends.
    Failed,
}

impl TxStatus {
    pub fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            b'I' => Some(Self::Idle),
            b'T' => Some(Self::InTransaction),
            b'E' => Some(Self::Failed),
            _ => None,
        }
    }

    pub fn byte(self) -> u8 {
        match self {
            Self::Idle => b'I',
            Self::InTransaction => b'T',
            Self::Failed => b'E',
        }
    }
}
