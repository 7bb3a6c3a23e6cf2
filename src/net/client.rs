//! The client's side of a session: its stream, the bytes read from it and not yet
//! handled, and the bytes waiting to be written to it.
//!
//! Buffers exist only while there is traffic: an idle client holds none. They come from,
//! and go back to, the worker's stock (`buffers`), so traffic does not allocate them.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio_util::io::poll_read_buf;

use crate::net::ClientStream;
use crate::protocol::frame::split_frame;
use crate::protocol::{Frame, ProtocolError};

/// Room made in a read buffer before each read.
const READ_CHUNK: usize = 8 * 1024;

#[derive(Debug)]
pub struct ClientConn {
    pub stream: ClientStream,
    pub inbuf: BytesMut,
    pub outbuf: BytesMut,
    pub peer: SocketAddr,
    /// Largest message the client may send (max_message_size).
    pub max_message: usize,
    /// Bytes read from the client so far: with `inbuf`'s length, tells whether a step
    /// took or read any input.
    pub bytes_read: u64,
}

impl ClientConn {
    pub fn new(stream: ClientStream, peer: SocketAddr, max_message: usize) -> Self {
        ClientConn {
            stream,
            inbuf: BytesMut::new(),
            outbuf: BytesMut::new(),
            peer,
            max_message,
            bytes_read: 0,
        }
    }

    /// Reads what the socket has into `inbuf`; `Ok(0)` at end of stream.
    pub fn poll_read_more(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        // Traffic begins with a read: both buffers come from the stock now, so that
        // neither the read nor the reply that follows allocates.
        super::buffers::ensure(&mut self.inbuf);
        super::buffers::ensure(&mut self.outbuf);
        reserve_for_read(&mut self.inbuf);
        let read = poll_read_buf(Pin::new(&mut self.stream), cx, &mut self.inbuf);
        if let Poll::Ready(Ok(n)) = read {
            self.bytes_read += n as u64;
        }
        read
    }

    pub async fn read_more(&mut self) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_read_more(cx)).await
    }

    /// Writes as much of `outbuf` as the socket takes. `Ready(Ok(true))` when it wrote
    /// something, `Ready(Ok(false))` when there was nothing to write.
    pub fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        poll_write_buffer(&mut self.stream, &mut self.outbuf, cx)
    }

    /// Writes all of `outbuf`.
    pub async fn flush(&mut self) -> io::Result<()> {
        while !self.outbuf.is_empty() {
            std::future::poll_fn(|cx| self.poll_write_out(cx)).await?;
        }
        self.stream.flush().await
    }

    /// Takes one whole message from the input, reading more as needed; `None` at end of
    /// stream. Used outside the forwarding loop (login, idle).
    pub async fn next_frame(&mut self) -> Result<Option<Frame>, ClientReadError> {
        loop {
            if let Some(frame) = split_frame(&mut self.inbuf, self.max_message)? {
                return Ok(Some(frame));
            }
            if self.read_more().await? == 0 {
                return Ok(None);
            }
        }
    }

    /// Like [`Self::next_frame`] for messages before login (password, SASL), capped at
    /// `limit` bytes; room is made as the bytes arrive, never for what a header merely
    /// announces, so a client that has not logged in cannot make pgrelay set memory aside.
    pub async fn next_login_frame(&mut self, limit: usize) -> Result<Option<Frame>, ClientReadError> {
        loop {
            if let Some(header) = crate::protocol::Header::peek(&self.inbuf)? {
                if header.len > limit {
                    return Err(ProtocolError::TooLarge {
                        tag: header.tag,
                        len: header.len,
                        limit,
                    }
                    .into());
                }
                if self.inbuf.len() >= header.len {
                    return Ok(split_frame(&mut self.inbuf, limit)?);
                }
            }
            if self.read_more().await? == 0 {
                return Ok(None);
            }
        }
    }

    /// Gives the buffers back to the stock if they are empty, so an idle client costs no
    /// buffer memory.
    pub fn release_buffers(&mut self) {
        super::buffers::give_back(&mut self.inbuf);
        super::buffers::give_back(&mut self.outbuf);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientReadError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
}

pub fn reserve_for_read(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < READ_CHUNK / 4 {
        buf.reserve(READ_CHUNK);
    }
}

/// Writes as much of `buf` as `stream` takes without waiting for more room.
pub fn poll_write_buffer<S: tokio::io::AsyncWrite + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<io::Result<bool>> {
    let mut wrote = false;
    while !buf.is_empty() {
        match Pin::new(&mut *stream).poll_write(cx, buf) {
            Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            Poll::Ready(Ok(written)) => {
                buf.advance(written);
                wrote = true;
            }
            Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
            Poll::Pending if wrote => return Poll::Ready(Ok(true)),
            Poll::Pending => return Poll::Pending,
        }
    }
    // A TLS stream may have taken the plaintext while part of its ciphertext still waits
    // for room in the socket; only a flush sends it (a no-op for plain TCP).
    match Pin::new(&mut *stream).poll_flush(cx) {
        Poll::Ready(Ok(())) => Poll::Ready(Ok(wrote)),
        Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
        Poll::Pending if wrote => Poll::Ready(Ok(true)),
        Poll::Pending => Poll::Pending,
    }
}
