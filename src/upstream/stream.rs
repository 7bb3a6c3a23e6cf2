//! The byte stream to a server: plain TCP (TLS towards servers is negotiated here too).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

#[derive(Debug)]
pub enum ServerStream {
    Tcp(TcpStream),
}

impl ServerStream {
    /// True unless the peer has closed or reset the socket. Never waits.
    pub fn probe_alive(&mut self) -> bool {
        let ServerStream::Tcp(tcp) = self;
        let mut byte = [0u8; 1];
        match tcp.try_read(&mut byte) {
            Err(error) => error.kind() == io::ErrorKind::WouldBlock,
            // Either EOF or bytes nobody asked for (a FATAL before closing): not reusable.
            Ok(_) => false,
        }
    }

    /// Writes what the socket takes without waiting; used for courtesy messages only.
    pub fn try_write_now(&mut self, bytes: &[u8]) {
        let ServerStream::Tcp(tcp) = self;
        let _ = tcp.try_write(bytes);
    }
}

impl AsyncRead for ServerStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerStream::Tcp(tcp) => Pin::new(tcp).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ServerStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ServerStream::Tcp(tcp) => Pin::new(tcp).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerStream::Tcp(tcp) => Pin::new(tcp).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerStream::Tcp(tcp) => Pin::new(tcp).poll_shutdown(cx),
        }
    }
}
