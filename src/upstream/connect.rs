//! Opening a server connection: TCP, TLS as the database's `server_tls` says, the startup
//! message, authentication with whatever method the server asks for (SCRAM-SHA-256, md5,
//! cleartext, trust), and reading the server's parameters and cancel key up to the first
//! ReadyForQuery.

use std::io;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use md5::{Digest, Md5};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{BackendKey, ResponseQueue, ServerConn, ServerStream, SessionParams, UpstreamError};
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
}

/// What pgrelay can prove to a server about a user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerCredentials {
    pub user: String,
    /// Plaintext password: works with every method.
    pub password: Option<String>,
    /// `md5` + hex(md5(password + user)): works for md5 only.
    pub md5_hash: Option<String>,
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
    let params = [
        ("user", spec.credentials.user.as_str()),
        ("database", spec.database.as_str()),
    ];
    frontend::startup_message(params, &mut out).map_err(io_error)?;
    write_out(&mut conn.stream, &out).await.map_err(io_error)?;

    let mut login = Login {
        credentials: &spec.credentials,
        addr: &addr,
        scram: None,
    };
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
    let tls = connector
        .connect(name, tcp)
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

/// The client side of the authentication exchange.
struct Login<'a> {
    credentials: &'a ServerCredentials,
    addr: &'a str,
    scram: Option<ScramSha256>,
}

impl Login<'_> {
    /// Writes the answer to one Authentication request into `out` (nothing for Ok).
    fn answer(&mut self, code: i32, data: &[u8], out: &mut BytesMut) -> Result<(), UpstreamError> {
        let io = |source| UpstreamError::Io {
            addr: self.addr.to_owned(),
            source,
        };
        match code {
            0 => Ok(()),
            3 => {
                let password = self.password("cleartext password")?;
                frontend::password_message(password.as_bytes(), out).map_err(io)
            }
            5 => {
                let salt = data
                    .get(..4)
                    .and_then(|salt| <[u8; 4]>::try_from(salt).ok())
                    .ok_or_else(|| self.refused("md5 request without salt"))?;
                let response = self.md5_response(salt)?;
                frontend::password_message(response.as_bytes(), out).map_err(io)
            }
            10 => {
                let offers_scram = data.split(|&b| b == 0).any(|mechanism| mechanism == b"SCRAM-SHA-256");
                if !offers_scram {
                    return Err(self.refused("server offers no SASL mechanism pgrelay supports"));
                }
                let password = self.password("SCRAM-SHA-256")?;
                let scram = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
                frontend::sasl_initial_response("SCRAM-SHA-256", scram.message(), out).map_err(io)?;
                self.scram = Some(scram);
                Ok(())
            }
            11 => {
                let addr = self.addr;
                let scram = self
                    .scram
                    .as_mut()
                    .ok_or_else(|| refused(addr, "SASL continue before start"))?;
                scram.update(data).map_err(io)?;
                frontend::sasl_response(scram.message(), out).map_err(io)
            }
            12 => {
                let addr = self.addr;
                let scram = self
                    .scram
                    .as_mut()
                    .ok_or_else(|| refused(addr, "SASL final before start"))?;
                scram.finish(data).map_err(io)
            }
            other => Err(UpstreamError::Credentials {
                addr: self.addr.to_owned(),
                reason: format!("server asks for an unsupported authentication method ({other})"),
            }),
        }
    }

    fn password(&self, method: &str) -> Result<&str, UpstreamError> {
        self.credentials.password.as_deref().ok_or_else(|| UpstreamError::Credentials {
            addr: self.addr.to_owned(),
            reason: format!(
                "server asks for {method} but no plaintext password is configured for user \"{}\" (set server_password)",
                self.credentials.user
            ),
        })
    }

    /// md5(hex(md5(password + user)) + salt), from the plaintext or the stored hash.
    fn md5_response(&self, salt: [u8; 4]) -> Result<String, UpstreamError> {
        if let Some(password) = &self.credentials.password {
            return Ok(postgres_protocol::authentication::md5_hash(
                self.credentials.user.as_bytes(),
                password.as_bytes(),
                salt,
            ));
        }
        let inner = self
            .credentials
            .md5_hash
            .as_deref()
            .and_then(|hash| hash.strip_prefix("md5"))
            .ok_or_else(|| self.refused("server asks for md5 but no password or md5 hash is configured"))?;
        let mut hasher = Md5::new();
        hasher.update(inner.as_bytes());
        hasher.update(salt);
        let digest = hasher.finalize();
        let mut response = String::with_capacity(35);
        response.push_str("md5");
        for byte in digest {
            response.push_str(&format!("{byte:02x}"));
        }
        Ok(response)
    }

    fn refused(&self, reason: &str) -> UpstreamError {
        refused(self.addr, reason)
    }
}

fn refused(addr: &str, reason: &str) -> UpstreamError {
    UpstreamError::Credentials {
        addr: addr.to_owned(),
        reason: reason.to_owned(),
    }
}
