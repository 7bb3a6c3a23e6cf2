//! The byte stream to a client: plain TCP, TLS, or TLS continued from the process this
//! one took over from, behind one type.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use super::apart::{self, record_version};
use super::record::{RecordState, RecordStream, Version};
use super::transport::TlsTransport;

#[derive(Debug)]
pub enum ClientStream {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TlsTransport>>),
    /// A TLS connection whose handshake ran in the process this one took over from, or
    /// one taken apart here to be handed over: its record layer with the extracted keys.
    Resumed(Box<RecordStream>),
    /// Only while the TCP stream is in a TLS handshake, and for good if that handshake
    /// failed or was abandoned: every operation fails.
    Detached,
}

fn detached() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "the connection was lost in a TLS handshake",
    )
}

impl ClientStream {
    /// Waits until the socket has something to read, without holding a buffer: an idle
    /// client costs no buffer memory while it waits.
    pub async fn readable(&self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_read_ready(cx)).await
    }

    /// [`ClientStream::readable`] as a poll, for waits that hold no future of their own.
    pub fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            ClientStream::Tcp(tcp) => tcp.poll_read_ready(cx),
            ClientStream::Tls(tls) => {
                let (tcp, connection) = tls.get_ref();
                // rustls may hold decrypted bytes the last read did not take (it reads whole
                // records), or a close_notify: those are readable now, and the socket may
                // never become readable again for them.
                if !connection.wants_read() {
                    return Poll::Ready(Ok(()));
                }
                tcp.tcp().poll_read_ready(cx)
            }
            ClientStream::Resumed(records) => records.poll_read_ready(cx),
            ClientStream::Detached => Poll::Ready(Err(detached())),
        }
    }

    /// The local address the client connected to.
    pub fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        match self {
            ClientStream::Tcp(tcp) => tcp.local_addr(),
            ClientStream::Tls(tls) => tls.get_ref().0.tcp().local_addr(),
            ClientStream::Resumed(records) => records.tcp().local_addr(),
            ClientStream::Detached => Err(detached()),
        }
    }

    /// The TLS version of the connection, if it is one this process can continue
    /// (`None` for plain TCP, and for a connection lost in its handshake).
    pub fn tls_version(&self) -> Option<Version> {
        match self {
            ClientStream::Tls(tls) => record_version(tls.get_ref().1.protocol_version()),
            ClientStream::Resumed(records) => Some(records.version()),
            ClientStream::Tcp(_) | ClientStream::Detached => None,
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, ClientStream::Tls(_) | ClientStream::Resumed(_))
    }

    /// The certificate the client presented (the first of its chain), already verified
    /// against `[server.tls] ca` by the handshake; `None` on plain TCP, without `ca`, or
    /// when the client sent none. Only logins ask, so a connection continued from another
    /// process (logged in there) carries none.
    pub fn peer_certificate(&self) -> Option<&rustls_pki_types::CertificateDer<'static>> {
        match self {
            ClientStream::Tls(tls) => tls.get_ref().1.peer_certificates().and_then(<[_]>::first),
            ClientStream::Tcp(_) | ClientStream::Resumed(_) | ClientStream::Detached => None,
        }
    }

    /// Whether the client has sent bytes that were not read yet. Asks the socket itself
    /// (tokio's readiness may not have caught up), never waits and consumes nothing.
    pub fn has_unread_input(&self) -> io::Result<bool> {
        match self {
            ClientStream::Tcp(tcp) => {
                let mut byte = [MaybeUninit::<u8>::uninit(); 1];
                match socket2::SockRef::from(tcp).peek(&mut byte) {
                    Ok(read) => Ok(read > 0),
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => Ok(false),
                    Err(error) => Err(error),
                }
            }
            ClientStream::Tls(tls) => Ok(!tls.get_ref().1.wants_read()),
            ClientStream::Resumed(records) => records.has_unread_input(),
            ClientStream::Detached => Err(detached()),
        }
    }

    /// Whether the connection can be handed to another process as it stands: plain TCP;
    /// TLS 1.3 or 1.2 with nothing buffered in rustls either way (no plaintext or record
    /// read ahead, nothing unsent, no close_notify); a continued TLS connection with
    /// nothing buffered.
    pub fn can_move(&self) -> bool {
        match self {
            ClientStream::Tcp(_) => true,
            ClientStream::Tls(tls) => {
                let (transport, connection) = tls.get_ref();
                apart::can_move(transport, connection)
            }
            ClientStream::Resumed(records) => records.quiet_state().is_some(),
            ClientStream::Detached => false,
        }
    }

    /// Whether a continued TLS connection has used half the records its key may seal
    /// (see `RecordStream::half_spent`); rustls changes keys on its own, and plain TCP
    /// has no such bound.
    pub fn half_spent(&self) -> bool {
        matches!(self, ClientStream::Resumed(records) if records.half_spent())
    }

    /// Takes a rustls connection apart into its record layer (for a handover: see
    /// [`ClientStream::can_move`] first). rustls writes nothing on the way, and from here
    /// only the record stream writes, with the sequence numbers rustls had reached. A
    /// connection of another TLS version is refused and left as it is; any later error
    /// leaves the connection unusable. Other streams are left as they are.
    pub fn leave_rustls(&mut self) -> io::Result<()> {
        let ClientStream::Tls(tls) = self else {
            return Ok(());
        };
        if record_version(tls.get_ref().1.protocol_version()).is_none() {
            return Err(io::Error::other("only a TLS 1.3 or 1.2 connection can be taken apart"));
        }
        let ClientStream::Tls(tls) = std::mem::replace(self, ClientStream::Detached) else {
            return Ok(());
        };
        let (transport, connection) = tls.into_inner();
        let records = apart::into_records(transport, connection.into())?;
        *self = ClientStream::Resumed(Box::new(records));
        Ok(())
    }

    /// The socket to hand over and, for TLS, the record state that goes with it; `None`
    /// for a stream that cannot move as it is (see [`ClientStream::can_move`]; a rustls
    /// connection is taken apart first, with [`ClientStream::leave_rustls`]).
    pub fn handover(&self) -> Option<(std::os::fd::BorrowedFd<'_>, Option<RecordState>)> {
        use std::os::fd::AsFd;
        match self {
            ClientStream::Tcp(tcp) => Some((tcp.as_fd(), None)),
            ClientStream::Resumed(records) => Some((records.tcp().as_fd(), Some(records.quiet_state()?))),
            ClientStream::Tls(_) | ClientStream::Detached => None,
        }
    }

    /// Runs the server side of a TLS handshake on a plain stream and continues over TLS.
    /// On failure the stream is left unusable: whatever the client sent is not plaintext
    /// pgrelay could answer.
    pub async fn start_tls(&mut self, acceptor: &TlsAcceptor) -> io::Result<()> {
        let tcp = match std::mem::replace(self, ClientStream::Detached) {
            ClientStream::Tcp(tcp) => tcp,
            other => {
                *self = other;
                return Err(io::Error::other("TLS is already in use"));
            }
        };
        let tls = acceptor.accept(TlsTransport::new(tcp)).await?;
        *self = ClientStream::Tls(Box::new(tls));
        Ok(())
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Tcp(tcp) => Pin::new(tcp).poll_read(cx, buf),
            ClientStream::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
            ClientStream::Resumed(records) => Pin::new(records.as_mut()).poll_read(cx, buf),
            ClientStream::Detached => Poll::Ready(Err(detached())),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Tcp(tcp) => Pin::new(tcp).poll_write(cx, buf),
            ClientStream::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
            ClientStream::Resumed(records) => Pin::new(records.as_mut()).poll_write(cx, buf),
            ClientStream::Detached => Poll::Ready(Err(detached())),
        }
    }

    /// For TLS this also writes out records rustls still holds: a write may take
    /// plaintext while the socket cannot take all of its ciphertext yet.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Tcp(tcp) => Pin::new(tcp).poll_flush(cx),
            ClientStream::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
            ClientStream::Resumed(records) => Pin::new(records.as_mut()).poll_flush(cx),
            ClientStream::Detached => Poll::Ready(Err(detached())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Tcp(tcp) => Pin::new(tcp).poll_shutdown(cx),
            ClientStream::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
            ClientStream::Resumed(records) => Pin::new(records.as_mut()).poll_shutdown(cx),
            ClientStream::Detached => Poll::Ready(Err(detached())),
        }
    }
}
