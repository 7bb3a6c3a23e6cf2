//! The opening of a client connection, before any authentication: encryption requests,
//! cancel requests, and the startup message with its protocol version.

use std::io;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::net::ClientStream;
use crate::protocol::startup::{CancelKey, StartupError, StartupPacket, parse_startup, peek_startup_len};

/// What a new connection turned out to be.
#[derive(Debug)]
pub(super) enum Opening {
    Session {
        minor_version: u16,
        params: Vec<(String, String)>,
    },
    Cancel(CancelKey),
}

#[derive(Debug, thiserror::Error)]
pub(super) enum HandshakeError {
    #[error("client closed the connection during startup")]
    Closed,
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error(transparent)]
    Startup(#[from] StartupError),
    #[error("too many encryption requests")]
    TooManyRequests,
}

/// Reads startup packets until the client asks for a session or sends a cancel.
///
/// Packets are read with exact lengths, never ahead: no byte the client sends before an
/// encryption handshake can be taken as part of the session that follows it.
pub(super) async fn open(stream: &mut ClientStream) -> Result<Opening, HandshakeError> {
    // A client may ask for GSS encryption, then SSL, before giving up on both.
    for _ in 0..3 {
        let packet = read_startup_packet(stream).await?;
        match parse_startup(&packet)? {
            StartupPacket::SslRequest | StartupPacket::GssEncRequest => {
                stream.write_all(b"N").await?;
            }
            StartupPacket::Cancel(key) => return Ok(Opening::Cancel(key)),
            StartupPacket::Startup { minor_version, params } => {
                return Ok(Opening::Session { minor_version, params });
            }
        }
    }
    Err(HandshakeError::TooManyRequests)
}

async fn read_startup_packet(stream: &mut ClientStream) -> Result<Vec<u8>, HandshakeError> {
    let mut length = [0u8; 4];
    read_exact(stream, &mut length).await?;
    let len = peek_startup_len(&length)?.ok_or(StartupError::BadLength(0))?;
    let mut packet = vec![0u8; len];
    packet[..4].copy_from_slice(&length);
    read_exact(stream, &mut packet[4..]).await?;
    Ok(packet)
}

async fn read_exact(stream: &mut ClientStream, buf: &mut [u8]) -> Result<(), HandshakeError> {
    match stream.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => Err(HandshakeError::Closed),
        Err(error) => Err(HandshakeError::Io(error)),
    }
}
