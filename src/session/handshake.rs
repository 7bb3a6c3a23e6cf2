//! The opening of a client connection, before any authentication: encryption requests,
//! cancel requests, and the startup message with its protocol version.

use std::io;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::net::{ClientStream, ClientTls};
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
    /// Bytes after an SSLRequest, before pgrelay answered it: they were sent unencrypted
    /// and may have been injected by someone in the middle (CVE-2021-23214).
    #[error("received unencrypted data after SSL request")]
    PlaintextAfterSslRequest,
    #[error("TLS handshake failed: {0}")]
    Tls(io::Error),
    /// `[server.tls] mode = "require"` and the client asked for a session without TLS.
    #[error("pgrelay requires SSL")]
    TlsRequired,
}

/// Reads startup packets until the client asks for a session or sends a cancel.
///
/// Packets are read with exact lengths, never ahead: no byte the client sends before an
/// encryption handshake can be taken as part of the session that follows it.
///
/// `tls`: `None` answers every SSLRequest with 'N'. A CancelRequest is taken without TLS
/// even when TLS is required, as PostgreSQL does (libpq before 17 always sends it so).
pub(super) async fn open(stream: &mut ClientStream, tls: Option<&ClientTls>) -> Result<Opening, HandshakeError> {
    // A client may ask for GSS encryption, then SSL, before giving up on both.
    for _ in 0..3 {
        let packet = read_startup_packet(stream).await?;
        match parse_startup(&packet)? {
            StartupPacket::SslRequest => match tls {
                Some(tls) if !stream.is_tls() => {
                    // A client waits for the answer before its TLS handshake, so anything
                    // already here was sent in plaintext ahead of it. Checked before
                    // answering: after the 'S' a quick client's ClientHello could be here
                    // too. Bytes that arrive later reach rustls, which refuses them.
                    if stream.has_unread_input()? {
                        return Err(HandshakeError::PlaintextAfterSslRequest);
                    }
                    answer(stream, b'S').await?;
                    stream.start_tls(tls.acceptor()).await.map_err(HandshakeError::Tls)?;
                }
                _ => answer(stream, b'N').await?,
            },
            StartupPacket::GssEncRequest => answer(stream, b'N').await?,
            StartupPacket::Cancel(key) => return Ok(Opening::Cancel(key)),
            StartupPacket::Startup { minor_version, params } => {
                if tls.is_some_and(ClientTls::required) && !stream.is_tls() {
                    return Err(HandshakeError::TlsRequired);
                }
                return Ok(Opening::Session { minor_version, params });
            }
        }
    }
    Err(HandshakeError::TooManyRequests)
}

async fn answer(stream: &mut ClientStream, byte: u8) -> Result<(), HandshakeError> {
    stream.write_all(&[byte]).await?;
    stream.flush().await?;
    Ok(())
}

async fn read_startup_packet(stream: &mut ClientStream) -> Result<Vec<u8>, HandshakeError> {
    let mut length = [0u8; 4];
    read_exact(stream, &mut length).await?;
    let len = peek_startup_len(&length)?.ok_or(StartupError::BadLength(0))?;
    // Room grows with the bytes that arrive, not with the length the client announced.
    let mut packet = length.to_vec();
    let rest = (len - length.len()) as u64;
    (&mut *stream).take(rest).read_to_end(&mut packet).await?;
    if packet.len() != len {
        return Err(HandshakeError::Closed);
    }
    Ok(packet)
}

async fn read_exact(stream: &mut ClientStream, buf: &mut [u8]) -> Result<(), HandshakeError> {
    match stream.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => Err(HandshakeError::Closed),
        Err(error) => Err(HandshakeError::Io(error)),
    }
}
