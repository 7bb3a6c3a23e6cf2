//! The TCP stream under a client's rustls connection, which also follows the TLS record
//! framing of what it reads: whether the bytes handed to rustls so far end on a record
//! boundary. rustls keeps a partial record in a buffer no API shows; a connection whose
//! secrets are extracted (`crate::net::record`) must not have one, or those bytes would
//! be lost with it. TLS 1.3 and TLS 1.2 frame records alike (a 5-byte header ending in the
//! body's length), so this holds for both.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

#[derive(Debug)]
pub struct TlsTransport {
    tcp: TcpStream,
    framing: Framing,
}

/// Where the input stands in the record framing: inside a header (how much of it was
/// seen) or inside a record's body (how much of it is still to come).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Framing {
    header: [u8; 5],
    header_seen: usize,
    body_left: usize,
}

impl Framing {
    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.body_left > 0 {
                let skipped = self.body_left.min(bytes.len());
                self.body_left -= skipped;
                bytes = &bytes[skipped..];
                continue;
            }
            let taken = (self.header.len() - self.header_seen).min(bytes.len());
            self.header[self.header_seen..self.header_seen + taken].copy_from_slice(&bytes[..taken]);
            self.header_seen += taken;
            bytes = &bytes[taken..];
            if self.header_seen == self.header.len() {
                self.header_seen = 0;
                self.body_left = usize::from(u16::from_be_bytes([self.header[3], self.header[4]]));
            }
        }
    }

    fn at_boundary(&self) -> bool {
        self.header_seen == 0 && self.body_left == 0
    }
}

impl TlsTransport {
    /// A stream at the start of a TLS connection (nothing of it read yet).
    pub fn new(tcp: TcpStream) -> TlsTransport {
        TlsTransport {
            tcp,
            framing: Framing::default(),
        }
    }

    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// Whether every record read so far was read whole.
    pub fn at_record_boundary(&self) -> bool {
        self.framing.at_boundary()
    }

    pub fn into_tcp(self) -> TcpStream {
        self.tcp
    }
}

impl AsyncRead for TlsTransport {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.tcp).poll_read(cx, buf))?;
        this.framing.feed(&buf.filled()[before..]);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for TlsTransport {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_boundaries_are_followed_across_any_split() {
        // Two records: 3 bytes of body, then an empty one, then 300 bytes.
        let mut stream = vec![0x17, 3, 3, 0, 3, 1, 2, 3, 0x17, 3, 3, 0, 0, 0x17, 3, 3, 1, 44];
        stream.extend(std::iter::repeat_n(7u8, 300));
        let ends = [8, 13, stream.len()];
        for split in 0..=stream.len() {
            let mut framing = Framing::default();
            framing.feed(&stream[..split]);
            assert_eq!(
                framing.at_boundary(),
                split == 0 || ends.contains(&split),
                "after {split} bytes"
            );
            framing.feed(&stream[split..]);
            assert!(framing.at_boundary());
        }
    }
}
