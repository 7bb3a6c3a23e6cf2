//! The TLS 1.3 record layer alone (RFC 8446 §5), for a client connection whose handshake
//! ran in the process this one took over from: the keys, IVs and sequence numbers rustls
//! extracted there come over with the socket, and the connection goes on here, record by
//! record, with the same keys.
//!
//! rustls cannot rebuild a connection from extracted secrets, and the kernel's TLS
//! offload (kTLS) is not available everywhere, so the framing is written here; the
//! cryptography is `ring::aead`'s. What a peer may send after the handshake besides
//! application data is handled as TLS 1.3 allows a receiver to: `close_notify` ends the
//! stream, any other alert is an error, and a KeyUpdate cannot be followed (rustls extracts
//! the traffic keys, not the secrets the next keys derive from): the connection ends with
//! an error. libpq (OpenSSL) and rustls send none on their own below their record limits.

use std::fmt;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use ring::aead::{AES_128_GCM, AES_256_GCM, Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::rustls::{ConnectionTrafficSecrets, ExtractedSecrets};

/// Outer content type of every protected record, and inner type of application data.
const APPLICATION_DATA: u8 = 23;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const CLOSE_NOTIFY: u8 = 0;
const KEY_UPDATE: u8 = 24;
const HEADER_LEN: usize = 5;
const TAG_LEN: usize = 16;
/// Largest plaintext of one record (2^14), and largest protected record (2^14 + 256).
const MAX_PLAINTEXT: usize = 16 * 1024;
const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
/// Records sealed by one `poll_write`: enough to keep a large reply moving, little enough
/// to bound what waits for the socket.
const RECORDS_PER_WRITE: usize = 4;

/// The AEAD of the connection's TLS 1.3 cipher suite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Suite {
    Aes128Gcm,
    Aes256Gcm,
    Chacha20Poly1305,
}

impl Suite {
    fn algorithm(self) -> &'static ring::aead::Algorithm {
        match self {
            Suite::Aes128Gcm => &AES_128_GCM,
            Suite::Aes256Gcm => &AES_256_GCM,
            Suite::Chacha20Poly1305 => &CHACHA20_POLY1305,
        }
    }

    /// Records one key may seal (RFC 8446 §5.5): 2^24 for AES-GCM, as rustls counts; the
    /// sequence number is the only bound for ChaCha20-Poly1305. Reached, the connection
    /// ends: a new key would take a KeyUpdate, which needs the secret this side lacks.
    fn record_limit(self) -> u64 {
        match self {
            Suite::Aes128Gcm | Suite::Aes256Gcm => 1 << 24,
            Suite::Chacha20Poly1305 => u64::MAX,
        }
    }

    fn code(self) -> u8 {
        match self {
            Suite::Aes128Gcm => 1,
            Suite::Aes256Gcm => 2,
            Suite::Chacha20Poly1305 => 3,
        }
    }

    fn from_code(code: u8) -> Option<Suite> {
        [Suite::Aes128Gcm, Suite::Aes256Gcm, Suite::Chacha20Poly1305]
            .into_iter()
            .find(|suite| suite.code() == code)
    }
}

/// One direction's traffic key, IV and next sequence number.
#[derive(Clone, PartialEq, Eq)]
pub struct Secrets {
    pub key: Vec<u8>,
    pub iv: [u8; NONCE_LEN],
    pub seq: u64,
}

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Secrets")
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

impl Drop for Secrets {
    /// Best effort: the key does not stay in freed memory.
    fn drop(&mut self) {
        self.key.fill(0);
    }
}

/// All a record stream needs to go on in another process: the suite and both directions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordState {
    pub suite: Suite,
    /// Towards the client.
    pub tx: Secrets,
    /// From the client.
    pub rx: Secrets,
}

impl RecordState {
    /// The state rustls extracted after a TLS 1.3 handshake; `None` for a suite this
    /// record layer does not implement.
    pub fn from_rustls(secrets: ExtractedSecrets) -> Option<RecordState> {
        let side = |(seq, secrets): (u64, ConnectionTrafficSecrets)| {
            let (suite, key, iv) = match &secrets {
                ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (Suite::Aes128Gcm, key, iv),
                ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (Suite::Aes256Gcm, key, iv),
                ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (Suite::Chacha20Poly1305, key, iv),
                _ => return None,
            };
            Some((
                suite,
                Secrets {
                    key: key.as_ref().to_vec(),
                    iv: iv.as_ref().try_into().ok()?,
                    seq,
                },
            ))
        };
        let (suite, tx) = side(secrets.tx)?;
        let (rx_suite, rx) = side(secrets.rx)?;
        (suite == rx_suite).then_some(RecordState { suite, tx, rx })
    }

    /// Appends this state: suite, then for tx and rx the sequence number, key and IV.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(self.suite.code());
        for side in [&self.tx, &self.rx] {
            out.extend_from_slice(&side.seq.to_be_bytes());
            out.push(u8::try_from(side.key.len()).unwrap_or(0));
            out.extend_from_slice(&side.key);
            out.extend_from_slice(&side.iv);
        }
    }

    /// Reads a state [`RecordState::encode`] wrote from the start of `input`; returns it and
    /// the rest of the input.
    pub fn decode(input: &[u8]) -> Option<(RecordState, &[u8])> {
        let (&code, mut rest) = input.split_first()?;
        let suite = Suite::from_code(code)?;
        let mut side = || -> Option<Secrets> {
            let (seq, after) = rest.split_first_chunk::<8>()?;
            let (&key_len, after) = after.split_first()?;
            let (key, after) = after.split_at_checked(usize::from(key_len))?;
            let (iv, after) = after.split_first_chunk::<NONCE_LEN>()?;
            rest = after;
            (key.len() == suite.algorithm().key_len()).then(|| Secrets {
                key: key.to_vec(),
                iv: *iv,
                seq: u64::from_be_bytes(*seq),
            })
        };
        let tx = side()?;
        let rx = side()?;
        Some((RecordState { suite, tx, rx }, rest))
    }
}

/// One direction, ready to seal or open.
struct Direction {
    key: LessSafeKey,
    secrets: Secrets,
    limit: u64,
}

impl Direction {
    fn new(suite: Suite, secrets: Secrets) -> io::Result<Direction> {
        let key = UnboundKey::new(suite.algorithm(), &secrets.key)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a TLS traffic key of the wrong length"))?;
        Ok(Direction {
            key: LessSafeKey::new(key),
            secrets,
            limit: suite.record_limit(),
        })
    }

    /// The nonce of the next record (RFC 8446 §5.3: the IV XOR the sequence number,
    /// left-padded), and the sequence number moved on; an error once the limit is reached,
    /// so that no nonce is ever used twice.
    fn next_nonce(&mut self) -> io::Result<Nonce> {
        let seq = self.secrets.seq;
        if seq >= self.limit || seq == u64::MAX {
            return Err(io::Error::other(
                "the TLS connection reached its record limit and cannot change keys here",
            ));
        }
        self.secrets.seq += 1;
        let mut nonce = self.secrets.iv;
        for (byte, seq_byte) in nonce[NONCE_LEN - 8..].iter_mut().zip(seq.to_be_bytes()) {
            *byte ^= seq_byte;
        }
        Ok(Nonce::assume_unique_for_key(nonce))
    }
}

/// How the input side stands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Input {
    Open,
    /// The client sent close_notify: end of stream.
    Closed,
    /// Failed for good: each read repeats the error.
    Failed(io::ErrorKind, String),
}

/// A client connection continued with its TLS 1.3 traffic keys (see the module comment).
pub struct RecordStream {
    tcp: TcpStream,
    suite: Suite,
    tx: Direction,
    rx: Direction,
    /// Protected records read and not opened yet (at most one partial one at the end).
    incoming: BytesMut,
    /// Application data opened and not read yet.
    plain: BytesMut,
    /// Records sealed and not written yet.
    outgoing: BytesMut,
    input: Input,
    /// close_notify was sealed, or the record limit reached: nothing more is sealed.
    output_closed: bool,
}

impl fmt::Debug for RecordStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecordStream")
            .field("suite", &self.suite)
            .field("tx_seq", &self.tx.secrets.seq)
            .field("rx_seq", &self.rx.secrets.seq)
            .field("input", &self.input)
            .finish_non_exhaustive()
    }
}

fn protocol_error(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

impl RecordStream {
    pub fn new(tcp: TcpStream, state: RecordState) -> io::Result<RecordStream> {
        let RecordState { suite, tx, rx } = state;
        Ok(RecordStream {
            tcp,
            suite,
            tx: Direction::new(suite, tx)?,
            rx: Direction::new(suite, rx)?,
            incoming: BytesMut::new(),
            plain: BytesMut::new(),
            outgoing: BytesMut::new(),
            input: Input::Open,
            output_closed: false,
        })
    }

    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// The state to continue with elsewhere, if nothing is buffered in either direction
    /// and both are open: a record half read or not yet written would be lost.
    pub fn quiet_state(&self) -> Option<RecordState> {
        let quiet = self.incoming.is_empty()
            && self.plain.is_empty()
            && self.outgoing.is_empty()
            && self.input == Input::Open
            && !self.output_closed;
        quiet.then(|| RecordState {
            suite: self.suite,
            tx: self.tx.secrets.clone(),
            rx: self.rx.secrets.clone(),
        })
    }

    /// Whether a read would return without waiting for the socket: application data is
    /// buffered, the input has ended, or a whole record waits to be opened.
    fn read_would_progress(&self) -> bool {
        if !self.plain.is_empty() || self.input != Input::Open {
            return true;
        }
        match self.incoming.get(..HEADER_LEN) {
            Some(header) => self.incoming.len() >= HEADER_LEN + usize::from(u16::from_be_bytes([header[3], header[4]])),
            None => false,
        }
    }

    pub fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.read_would_progress() {
            return Poll::Ready(Ok(()));
        }
        self.tcp.poll_read_ready(cx)
    }

    /// Whether the client sent anything not read yet (buffered here or in the socket).
    pub fn has_unread_input(&self) -> io::Result<bool> {
        if !self.plain.is_empty() || !self.incoming.is_empty() {
            return Ok(true);
        }
        let mut byte = [MaybeUninit::<u8>::uninit(); 1];
        match socket2::SockRef::from(&self.tcp).peek(&mut byte) {
            Ok(read) => Ok(read > 0),
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(error) => Err(error),
        }
    }

    fn fail(&mut self, error: io::Error) -> io::Error {
        self.input = Input::Failed(error.kind(), error.to_string());
        error
    }

    /// Opens the first record of `incoming` if it is whole; false if more bytes are needed.
    fn open_next(&mut self) -> io::Result<bool> {
        let Some(header) = self.incoming.get(..HEADER_LEN) else {
            return Ok(false);
        };
        let header: [u8; HEADER_LEN] = [header[0], header[1], header[2], header[3], header[4]];
        if header[0] != APPLICATION_DATA || header[1..3] != [3, 3] {
            return Err(protocol_error(format!(
                "unexpected TLS record header {:02x}{:02x}{:02x}",
                header[0], header[1], header[2]
            )));
        }
        let length = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if !(TAG_LEN + 1..=MAX_CIPHERTEXT).contains(&length) {
            return Err(protocol_error(format!("a TLS record of {length} bytes")));
        }
        if self.incoming.len() < HEADER_LEN + length {
            return Ok(false);
        }
        let mut record = self.incoming.split_to(HEADER_LEN + length);
        let nonce = self.rx.next_nonce()?;
        let inner = self
            .rx
            .key
            .open_in_place(nonce, Aad::from(header), &mut record[HEADER_LEN..])
            .map_err(|_| protocol_error("a TLS record failed authentication"))?;
        // TLSInnerPlaintext: content, content type, zero padding.
        let Some(end) = inner.iter().rposition(|&byte| byte != 0) else {
            return Err(protocol_error("a TLS record without a content type"));
        };
        let content = &inner[..end];
        match inner[end] {
            APPLICATION_DATA => self.plain.extend_from_slice(content),
            ALERT if content == [1, CLOSE_NOTIFY] || content == [2, CLOSE_NOTIFY] => self.input = Input::Closed,
            ALERT => {
                let description = content.get(1).copied().unwrap_or(0);
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    format!("the client sent TLS alert {description}"),
                ));
            }
            HANDSHAKE if content.first() == Some(&KEY_UPDATE) => {
                tracing::warn!(
                    "a client continued from the previous process sent a TLS KeyUpdate, which cannot be followed here: closing its connection"
                );
                return Err(protocol_error(
                    "TLS KeyUpdate is not supported on a connection taken over",
                ));
            }
            other => return Err(protocol_error(format!("unexpected TLS message of type {other}"))),
        }
        Ok(true)
    }

    /// Seals `content` as one record of inner type `content_type` into `outgoing`.
    fn seal(&mut self, content_type: u8, content: &[u8]) -> io::Result<()> {
        let nonce = match self.tx.next_nonce() {
            Ok(nonce) => nonce,
            Err(error) => {
                self.output_closed = true;
                return Err(error);
            }
        };
        let length = content.len() + 1 + TAG_LEN;
        let [high, low] = u16::try_from(length)
            .map_err(|_| io::Error::other("TLS record too long"))?
            .to_be_bytes();
        let header = [APPLICATION_DATA, 3, 3, high, low];
        self.outgoing.reserve(HEADER_LEN + length);
        self.outgoing.extend_from_slice(&header);
        let start = self.outgoing.len();
        self.outgoing.extend_from_slice(content);
        self.outgoing.extend_from_slice(&[content_type]);
        let tag = self
            .tx
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(header), &mut self.outgoing[start..])
            .map_err(|_| io::Error::other("sealing a TLS record failed"))?;
        self.outgoing.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Writes out the sealed records.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.outgoing.is_empty() {
            let written = ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.outgoing))?;
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.outgoing.advance(written);
        }
        // An idle connection holds no buffer.
        self.outgoing = BytesMut::new();
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for RecordStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.plain.is_empty() {
                let amount = buf.remaining().min(this.plain.len());
                buf.put_slice(&this.plain[..amount]);
                this.plain.advance(amount);
                if this.plain.is_empty() {
                    this.plain = BytesMut::new();
                }
                return Poll::Ready(Ok(()));
            }
            match &this.input {
                Input::Open => {}
                Input::Closed => return Poll::Ready(Ok(())),
                Input::Failed(kind, message) => return Poll::Ready(Err(io::Error::new(*kind, message.clone()))),
            }
            match this.open_next() {
                Ok(true) => continue,
                Ok(false) => {}
                Err(error) => return Poll::Ready(Err(this.fail(error))),
            }
            this.incoming.reserve(HEADER_LEN + MAX_CIPHERTEXT);
            match tokio_util::io::poll_read_buf(Pin::new(&mut this.tcp), cx, &mut this.incoming) {
                Poll::Pending => {
                    if this.incoming.is_empty() {
                        this.incoming = BytesMut::new();
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Ok(0)) => {
                    let error = io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the client closed its connection without a TLS close_notify",
                    );
                    return Poll::Ready(Err(this.fail(error)));
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
            }
        }
    }
}

impl AsyncWrite for RecordStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // What was sealed goes out first: the socket's back-pressure reaches the writer.
        ready!(this.poll_drain(cx))?;
        if this.output_closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let mut taken = 0;
        for chunk in buf.chunks(MAX_PLAINTEXT).take(RECORDS_PER_WRITE) {
            this.seal(APPLICATION_DATA, chunk)?;
            taken += chunk.len();
        }
        // Started at once; what the socket does not take now goes with the next write or
        // the flush.
        if let Poll::Ready(Err(error)) = this.poll_drain(cx) {
            return Poll::Ready(Err(error));
        }
        Poll::Ready(Ok(taken))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.output_closed {
            // close_notify is a warning-level alert; at the record limit none can be sent.
            let _ = this.seal(ALERT, &[1, CLOSE_NOTIFY]);
            this.output_closed = true;
        }
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests;
