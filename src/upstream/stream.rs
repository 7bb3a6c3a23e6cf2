//! The byte stream to a server: plain TCP, TLS (negotiated in `connect`), or TLS continued
//! from the process this one took over from (`crate::net::record`).

use std::io::{self, Write};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::net::TlsTransport;
use crate::net::apart;
use crate::net::record::{RecordState, RecordStream};

#[derive(Debug)]
pub enum ServerStream {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TlsTransport>>),
    /// A TLS connection whose handshake ran in the process this one took over from, or
    /// one taken apart here to be handed over: its record layer with the extracted keys.
    Resumed(Box<RecordStream>),
    /// Only while a rustls connection is taken apart, and for good if that failed: every
    /// operation fails.
    Detached,
}

fn detached() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "the server connection was lost taking its TLS apart",
    )
}

impl ServerStream {
    /// Waits until the socket has something to read, without a buffer to read it into.
    pub async fn readable(&self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_read_ready(cx)).await
    }

    /// [`ServerStream::readable`] as a poll, for waits that hold no future of their own.
    pub fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            ServerStream::Tcp(tcp) => tcp.poll_read_ready(cx),
            ServerStream::Tls(tls) => {
                let (tcp, connection) = tls.get_ref();
                // Decrypted bytes the last read did not take, or a close_notify, are
                // readable now; the socket may never become readable again for them.
                if !connection.wants_read() {
                    return Poll::Ready(Ok(()));
                }
                tcp.tcp().poll_read_ready(cx)
            }
            // Opened records wait in the stream the same way.
            ServerStream::Resumed(records) => records.poll_read_ready(cx),
            ServerStream::Detached => Poll::Ready(Err(detached())),
        }
    }

    /// True unless the peer has closed or reset the socket. Never waits.
    pub fn probe_alive(&mut self) -> bool {
        match self {
            ServerStream::Tcp(tcp) => {
                // Asked of the socket itself: tokio's try_read answers WouldBlock without
                // looking while its reactor has not yet seen the socket become readable,
                // so a connection the server closed a moment ago passed for alive, and a
                // write was sent to it instead of to a new connection.
                let mut byte = [MaybeUninit::<u8>::uninit(); 1];
                match socket2::SockRef::from(&*tcp).peek(&mut byte) {
                    Err(error) => error.kind() == io::ErrorKind::WouldBlock,
                    // Either EOF or bytes nobody asked for (a FATAL before closing): not reusable.
                    Ok(_) => false,
                }
            }
            ServerStream::Tls(tls) => {
                let (tcp, connection) = tls.get_ref();
                // Decrypted bytes nobody read, or the server's close_notify.
                if !connection.wants_read() {
                    return false;
                }
                // Peeked, not read: bytes taken from under rustls would break the TLS
                // stream. Any record (a FATAL, an alert) or EOF means the same as above.
                let mut byte = [MaybeUninit::<u8>::uninit(); 1];
                match socket2::SockRef::from(tcp.tcp()).peek(&mut byte) {
                    Err(error) => error.kind() == io::ErrorKind::WouldBlock,
                    Ok(_) => false,
                }
            }
            ServerStream::Resumed(records) => records.is_open_and_silent(),
            ServerStream::Detached => false,
        }
    }

    /// Whether the connection can be handed to another process as it stands: plain TCP;
    /// TLS 1.3 or 1.2 with nothing buffered in rustls either way and every record read
    /// whole (`apart::can_move`); a continued TLS connection with nothing buffered.
    pub fn can_move(&self) -> bool {
        match self {
            ServerStream::Tcp(_) => true,
            ServerStream::Tls(tls) => {
                let (transport, connection) = tls.get_ref();
                apart::can_move(transport, connection)
            }
            ServerStream::Resumed(records) => records.quiet_state().is_some(),
            ServerStream::Detached => false,
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, ServerStream::Tls(_) | ServerStream::Resumed(_))
    }

    /// Whether a continued TLS connection has used half the records its key may seal
    /// (see `RecordStream::half_spent`); rustls changes keys on its own, and plain TCP
    /// has no such bound.
    pub fn half_spent(&self) -> bool {
        matches!(self, ServerStream::Resumed(records) if records.half_spent())
    }

    /// Takes a rustls connection apart into its record layer (for a handover: see
    /// [`ServerStream::can_move`] first). rustls writes nothing on the way, and from here
    /// only the record stream writes. On an error the connection is lost (`Detached`).
    /// Other streams are left as they are.
    pub fn leave_rustls(&mut self) -> io::Result<()> {
        if !matches!(self, ServerStream::Tls(_)) {
            return Ok(());
        }
        let ServerStream::Tls(tls) = std::mem::replace(self, ServerStream::Detached) else {
            return Ok(());
        };
        let (transport, connection) = tls.into_inner();
        *self = ServerStream::Resumed(Box::new(apart::into_records(transport, connection.into())?));
        Ok(())
    }

    /// The socket to hand over and, for TLS, the record state that goes with it; `None`
    /// for a stream that cannot move as it is (a rustls connection is taken apart first,
    /// with [`ServerStream::leave_rustls`]).
    pub fn handover(&self) -> Option<(std::os::fd::BorrowedFd<'_>, Option<RecordState>)> {
        use std::os::fd::AsFd;
        match self {
            ServerStream::Tcp(tcp) => Some((tcp.as_fd(), None)),
            ServerStream::Resumed(records) => Some((records.tcp().as_fd(), Some(records.quiet_state()?))),
            ServerStream::Tls(_) | ServerStream::Detached => None,
        }
    }

    /// Writes what the socket takes without waiting; used for courtesy messages only.
    pub fn try_write_now(&mut self, bytes: &[u8]) {
        match self {
            ServerStream::Tcp(tcp) => {
                let _ = tcp.try_write(bytes);
            }
            ServerStream::Tls(tls) => {
                let (tcp, connection) = tls.get_mut();
                if connection.writer().write_all(bytes).is_ok() {
                    write_tls_now(tcp.tcp(), connection);
                }
            }
            ServerStream::Resumed(records) => records.try_write_now(bytes),
            ServerStream::Detached => {}
        }
    }
}

impl ServerStream {
    /// Ends TLS with a close_notify if the socket takes it right away; nothing for plain
    /// TCP. Last thing before the connection is dropped.
    pub fn close_nowait(&mut self) {
        match self {
            ServerStream::Tls(tls) => {
                let (tcp, connection) = tls.get_mut();
                connection.send_close_notify();
                write_tls_now(tcp.tcp(), connection);
            }
            ServerStream::Resumed(records) => records.close_nowait(),
            ServerStream::Tcp(_) | ServerStream::Detached => {}
        }
    }
}

/// Writes what the socket takes of the records rustls holds, without waiting.
fn write_tls_now(tcp: &TcpStream, connection: &mut tokio_rustls::rustls::ClientConnection) {
    let mut socket = NoWait(tcp);
    while connection.wants_write() {
        match connection.write_tls(&mut socket) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// A socket as a blocking-style writer that never blocks: WouldBlock instead.
struct NoWait<'a>(&'a TcpStream);

impl Write for NoWait<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsyncRead for ServerStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerStream::Tcp(tcp) => Pin::new(tcp).poll_read(cx, buf),
            ServerStream::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
            ServerStream::Resumed(records) => Pin::new(records.as_mut()).poll_read(cx, buf),
            ServerStream::Detached => Poll::Ready(Err(detached())),
        }
    }
}

impl AsyncWrite for ServerStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ServerStream::Tcp(tcp) => Pin::new(tcp).poll_write(cx, buf),
            ServerStream::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
            ServerStream::Resumed(records) => Pin::new(records.as_mut()).poll_write(cx, buf),
            ServerStream::Detached => Poll::Ready(Err(detached())),
        }
    }

    /// For TLS this also writes out records rustls still holds: a write may take
    /// plaintext while the socket cannot take all of its ciphertext yet.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerStream::Tcp(tcp) => Pin::new(tcp).poll_flush(cx),
            ServerStream::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
            ServerStream::Resumed(records) => Pin::new(records.as_mut()).poll_flush(cx),
            ServerStream::Detached => Poll::Ready(Err(detached())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerStream::Tcp(tcp) => Pin::new(tcp).poll_shutdown(cx),
            ServerStream::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
            ServerStream::Resumed(records) => Pin::new(records.as_mut()).poll_shutdown(cx),
            ServerStream::Detached => Poll::Ready(Err(detached())),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::io::Write as _;

    use super::ServerStream;

    /// A connection whose server has written its FATAL and closed, handed over before the
    /// runtime's reactor has seen any event of it.
    fn closed_by_server() -> ServerStream {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let ours = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut theirs, _) = listener.accept().unwrap();
        theirs.write_all(b"E\0\0\0\x04").unwrap();
        drop(theirs);
        ours.set_nonblocking(true).unwrap();
        ServerStream::Tcp(tokio::net::TcpStream::from_std(ours).unwrap())
    }

    #[test]
    fn a_connection_the_server_closed_is_seen_dead_at_once() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _entered = runtime.enter();
        let mut stream = closed_by_server();
        assert!(!stream.probe_alive());
    }

    #[test]
    fn an_open_connection_is_alive() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _entered = runtime.enter();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let ours = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_theirs, _) = listener.accept().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut stream = ServerStream::Tcp(tokio::net::TcpStream::from_std(ours).unwrap());
        assert!(stream.probe_alive());
    }
}
