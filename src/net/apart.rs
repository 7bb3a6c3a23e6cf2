//! Taking a rustls connection apart into its record layer (`crate::net::record`), for
//! either role: a client connection pgrelay accepted, or a server connection it opened.
//! Both run over a [`TlsTransport`], which knows whether rustls holds a partial record.

use std::io;

use tokio_rustls::rustls::{CommonState, Connection, ProtocolVersion};

use super::record::{RecordState, RecordStream, Version};
use super::transport::TlsTransport;

/// The record layer for a negotiated protocol version, if `crate::net::record` has one.
pub fn record_version(version: Option<ProtocolVersion>) -> Option<Version> {
    match version? {
        ProtocolVersion::TLSv1_3 => Some(Version::Tls13),
        ProtocolVersion::TLSv1_2 => Some(Version::Tls12),
        _ => None,
    }
}

/// Whether the connection can be taken apart as it stands: TLS 1.3 or 1.2, past its
/// handshake, with nothing buffered in rustls either way (no plaintext or record read
/// ahead, nothing unsent, no close_notify) and every record read so far read whole.
pub fn can_move(transport: &TlsTransport, connection: &CommonState) -> bool {
    record_version(connection.protocol_version()).is_some()
        && !connection.is_handshaking()
        && !connection.wants_write()
        && connection.wants_read()
        && transport.at_record_boundary()
}

/// The record stream that goes on from where rustls stopped, with its sequence numbers.
/// rustls writes nothing on the way. Fails for a connection of another TLS version, a
/// cipher suite the record layer lacks, or a configuration without
/// `enable_secret_extraction`; the connection is lost then.
pub fn into_records(transport: TlsTransport, connection: Connection) -> io::Result<RecordStream> {
    let version = record_version(connection.protocol_version())
        .ok_or_else(|| io::Error::other("only a TLS 1.3 or 1.2 connection can be taken apart"))?;
    let secrets = connection.dangerous_extract_secrets().map_err(io::Error::other)?;
    let state = RecordState::from_rustls(secrets, version)
        .ok_or_else(|| io::Error::other("the TLS cipher suite has no record layer here"))?;
    RecordStream::new(transport.into_tcp(), state)
}
