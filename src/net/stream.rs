//! The byte stream to a client: plain TCP or TLS, behind one type.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

#[derive(Debug)]
pub enum ClientStream {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
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
                tcp.poll_read_ready(cx)
            }
            ClientStream::Detached => Poll::Ready(Err(detached())),
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, ClientStream::Tls(_))
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
            ClientStream::Detached => Err(detached()),
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
        let tls = acceptor.accept(tcp).await?;
        *self = ClientStream::Tls(Box::new(tls));
        Ok(())
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Tcp(tcp) => Pin::new(tcp).poll_read(cx, buf),
            ClientStream::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
            ClientStream::Detached => Poll::Ready(Err(detached())),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Tcp(tcp) => Pin::new(tcp).poll_write(cx, buf),
            ClientStream::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
            ClientStream::Detached => Poll::Ready(Err(detached())),
        }
    }

    /// For TLS this also writes out records rustls still holds: a write may take
    /// plaintext while the socket cannot take all of its ciphertext yet.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Tcp(tcp) => Pin::new(tcp).poll_flush(cx),
            ClientStream::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
            ClientStream::Detached => Poll::Ready(Err(detached())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Tcp(tcp) => Pin::new(tcp).poll_shutdown(cx),
            ClientStream::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
            ClientStream::Detached => Poll::Ready(Err(detached())),
        }
    }
}
