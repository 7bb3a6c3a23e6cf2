//! Opening a server connection: TCP, TLS as the database's `server_tls` says, the startup
//! message, authentication (see `login`), and reading the server's parameters and cancel key
//! up to the first ReadyForQuery.

use std::io;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::login::Login;
use super::{BackendKey, ResponseQueue, ServerConn, ServerCredentials, ServerStream, SessionParams, UpstreamError};
use crate::config::ServerTlsMode;
use crate::error::MessageText;
use crate::net::ServerTls;
use crate::protocol::views::{ErrorFields, auth_request, backend_key, parameter_status, ready_status};
use crate::protocol::{BackendTag, Frame, frame::split_frame};

/// Largest message a server may send during startup: parameters, errors, auth data.
const STARTUP_MESSAGE_LIMIT: usize = 1 << 20;

/// Where and as whom to connect.
#[derive(Debug)]
pub struct ConnectSpec {
    /// `host:port`; names are resolved at every connect so DNS changes are followed.
    pub addr: Arc<str>,
    pub database: String,
    pub credentials: Arc<ServerCredentials>,
    /// Built once per database; shared by its pools.
    pub tls: Arc<ServerTls>,
    /// Keepalive and user timeout of the socket.
    pub tcp: crate::config::TcpOptions,
    /// Sent in the startup message so pgrelay's own side connections can be told apart in
    /// `pg_stat_activity`; pools send none (clients set their own with SET).
    pub application_name: Option<&'static str>,
}

pub async fn connect(spec: &ConnectSpec) -> Result<ServerConn, UpstreamError> {
    let addr = spec.addr.clone();
    let io_error = |source| UpstreamError::Io {
        addr: addr.to_string(),
        source,
    };
    let tcp = TcpStream::connect(&*spec.addr)
        .await
        .map_err(|source| UpstreamError::Connect {
            addr: addr.to_string(),
            source,
        })?;
    tcp.set_nodelay(true).map_err(io_error)?;
    crate::net::apply_tcp_options(&tcp, &spec.tcp).map_err(io_error)?;
    let stream = negotiate_tls(tcp, spec).await?;
    let mut conn = ServerConn {
        stream,
        inbuf: BytesMut::with_capacity(8192),
        outbuf: BytesMut::with_capacity(8192),
        expect: ResponseQueue::default(),
        state: super::ConnState::default(),
        params: SessionParams::default(),
        statements: super::ServerStatements::default(),
        pool_generation: 0,
        registration: None,
        reported: Vec::new(),
        key: BackendKey {
            process_id: 0,
            secret: bytes::Bytes::new(),
        },
        addr: addr.clone(),
        released_at: Instant::now(),
    };
    let mut out = BytesMut::new();
    let mut params = vec![
        ("user", spec.credentials.user.as_str()),
        ("database", spec.database.as_str()),
    ];
    if let Some(name) = spec.application_name {
        params.push(("application_name", name));
    }
    frontend::startup_message(params, &mut out).map_err(io_error)?;
    write_out(&mut conn.stream, &out).await.map_err(io_error)?;

    let mut login = Login::new(&spec.credentials, &addr);
    loop {
        let frame = read_frame(&mut conn).await?;
        let body = frame.body();
        let protocol = |reason: String| UpstreamError::Protocol {
            addr: addr.to_string(),
            reason,
        };
        match BackendTag::from_byte(frame.tag()) {
            Some(BackendTag::Authentication) => {
                let (code, data) = auth_request(body).map_err(|e| protocol(e.to_string()))?;
                out.clear();
                login.answer(code, data, &mut out)?;
                if !out.is_empty() {
                    write_out(&mut conn.stream, &out).await.map_err(io_error)?;
                }
            }
            Some(BackendTag::ParameterStatus) => {
                let (name, value) = parameter_status(body).map_err(|e| protocol(e.to_string()))?;
                conn.note_parameter(name, value);
            }
            Some(BackendTag::BackendKeyData) => {
                let (process_id, secret) = backend_key(body).map_err(|e| protocol(e.to_string()))?;
                conn.key = BackendKey {
                    process_id,
                    secret: bytes::Bytes::copy_from_slice(secret),
                };
            }
            Some(BackendTag::ErrorResponse) => {
                let fields = ErrorFields::read(body).map_err(|e| protocol(e.to_string()))?;
                return Err(UpstreamError::LoginRefused {
                    addr: addr.to_string(),
                    sqlstate: fields.code.to_owned(),
                    message: MessageText::from_server(fields.message),
                });
            }
            Some(BackendTag::NoticeResponse | BackendTag::NegotiateProtocolVersion) => {}
            Some(BackendTag::ReadyForQuery) => {
                let status = ready_status(body).map_err(|e| protocol(e.to_string()))?;
                conn.state.ready(status);
                return Ok(conn);
            }
            _ => {
                return Err(protocol(format!(
                    "unexpected message '{}' during login",
                    char::from(frame.tag())
                )));
            }
        }
    }
}

/// The SSLRequest code (1234, 5679).
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// Asks the server for TLS as `spec.tls` says and starts it, before the startup message.
async fn negotiate_tls(mut tcp: TcpStream, spec: &ConnectSpec) -> Result<ServerStream, UpstreamError> {
    let Some(connector) = spec.tls.connector() else {
        return Ok(ServerStream::Tcp(tcp));
    };
    let mode = spec.tls.mode();
    let failed = |source: io::Error| UpstreamError::Connect {
        addr: spec.addr.to_string(),
        source,
    };
    let refused = |reason: String| failed(io::Error::other(reason));
    tcp.write_all(&SSL_REQUEST).await.map_err(failed)?;
    // Exactly one byte: whatever follows it must go to rustls.
    let mut answer = [0u8; 1];
    match tcp.read_exact(&mut answer).await {
        Ok(_) => {}
        Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => {
            return Err(UpstreamError::Closed {
                addr: spec.addr.to_string(),
            });
        }
        Err(error) => return Err(failed(error)),
    }
    match answer[0] {
        b'S' => {}
        b'N' if mode == ServerTlsMode::Prefer => return Ok(ServerStream::Tcp(tcp)),
        b'N' => {
            return Err(refused(format!(
                "the server does not accept TLS connections (server_tls mode = \"{mode}\")"
            )));
        }
        other => {
            return Err(UpstreamError::Protocol {
                addr: spec.addr.to_string(),
                reason: format!(
                    "unexpected answer '{}' to SSLRequest",
                    char::from(other).escape_default()
                ),
            });
        }
    }
    // The server speaks next only after our ClientHello: bytes already here were not sent
    // by it over TLS, and must not be taken as if they were (CVE-2021-23222).
    let mut byte = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    match socket2::SockRef::from(&tcp).peek(&mut byte) {
        Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
        Err(error) => return Err(failed(error)),
        Ok(_) => {
            return Err(UpstreamError::Protocol {
                addr: spec.addr.to_string(),
                reason: "received unencrypted data after SSL response".to_owned(),
            });
        }
    }
    let name = ServerTls::server_name(&spec.addr).map_err(&refused)?;
    // Over a transport that follows the record framing, so that the connection can be
    // taken apart at a record boundary for a takeover (`ServerStream::can_move`).
    let tls = connector
        .connect(name, crate::net::TlsTransport::new(tcp))
        .await
        .map_err(|error| refused(format!("TLS handshake failed: {error}")))?;
    Ok(ServerStream::Tls(Box::new(tls)))
}

/// Writes a whole message and flushes it: under TLS the last record may otherwise stay
/// in rustls when the socket was briefly full.
async fn write_out(stream: &mut ServerStream, bytes: &[u8]) -> io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await
}

/// Reads one whole message during startup, when nothing else is in flight.
async fn read_frame(conn: &mut ServerConn) -> Result<Frame, UpstreamError> {
    loop {
        match split_frame(&mut conn.inbuf, STARTUP_MESSAGE_LIMIT) {
            Ok(Some(frame)) => return Ok(frame),
            Ok(None) => {}
            Err(error) => {
                return Err(UpstreamError::Protocol {
                    addr: conn.addr.to_string(),
                    reason: error.to_string(),
                });
            }
        }
        conn.inbuf.reserve(4096);
        let read = conn
            .stream
            .read_buf(&mut conn.inbuf)
            .await
            .map_err(|source| UpstreamError::Io {
                addr: conn.addr.to_string(),
                source,
            })?;
        if read == 0 {
            return Err(UpstreamError::Closed {
                addr: conn.addr.to_string(),
            });
        }
    }
}
