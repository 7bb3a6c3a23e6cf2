//! The TLS 1.3 and TLS 1.2 AEAD record layers alone (RFC 8446 §5; RFC 5246 §6.2.3.3 with
//! RFC 5288 for AES-GCM and RFC 7905 for ChaCha20-Poly1305), for a connection whose
//! handshake ran in the process this one took over from: a client's, or a server
//! connection that travelled with its client. The keys, IVs and sequence numbers rustls
//! extracted there come over with the socket, and the connection goes on here, record by
//! record, with the same keys. Both roles frame records alike: the other end is the peer.
//!
//! rustls cannot rebuild a connection from extracted secrets, and the kernel's TLS
//! offload (kTLS) is not available everywhere, so the framing is written here; the
//! cryptography is `ring::aead`'s. What a peer may send after the handshake besides
//! application data is handled as a receiver may: `close_notify` ends the stream, any other
//! alert is an error, a TLS 1.3 NewSessionTicket (a server may send one at any time) is
//! passed over, and a TLS 1.3 KeyUpdate or a TLS 1.2 renegotiation cannot be followed
//! (rustls extracts the traffic keys, not the secrets new keys derive from): the connection
//! ends with an error. libpq and PostgreSQL (OpenSSL) and rustls start neither on their own
//! below their record limits.

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

/// Content types. TLS 1.3: the outer type of every protected record, and the inner type of
/// application data; TLS 1.2: the record's type, in its header.
const APPLICATION_DATA: u8 = 23;
const CHANGE_CIPHER_SPEC: u8 = 20;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const CLOSE_NOTIFY: u8 = 0;
const KEY_UPDATE: u8 = 24;
const NEW_SESSION_TICKET: u8 = 4;
/// A handshake message's header: its type and a 24-bit length.
const HANDSHAKE_HEADER_LEN: usize = 4;
const HEADER_LEN: usize = 5;
const TAG_LEN: usize = 16;
/// The explicit part of a TLS 1.2 AES-GCM nonce, sent before each record's ciphertext.
const GCM_EXPLICIT_LEN: usize = 8;
/// Largest plaintext of one record (2^14), and largest protected record: 2^14 + 256 in
/// TLS 1.3, 2^14 + 2048 in TLS 1.2.
const MAX_PLAINTEXT: usize = 16 * 1024;
const MAX_CIPHERTEXT_13: usize = MAX_PLAINTEXT + 256;
const MAX_CIPHERTEXT_12: usize = MAX_PLAINTEXT + 2048;
/// Record version field of every record after the handshake (both versions).
const RECORD_VERSION: [u8; 2] = [3, 3];
/// Records sealed by one `poll_write`: enough to keep a large reply moving, little enough
/// to bound what waits for the socket.
const RECORDS_PER_WRITE: usize = 4;

/// The protocol version of the connection: it decides the record layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Tls12,
    Tls13,
}

impl Version {
    /// The high nibble of the first byte of an encoded state (the low one is the suite):
    /// 0 for TLS 1.3, the layout from before TLS 1.2 states were carried, so that TLS 1.3
    /// clients still move between a process of that version and this one; a process of
    /// that version refuses a TLS 1.2 state (an unknown suite).
    fn code(self) -> u8 {
        match self {
            Version::Tls13 => 0,
            Version::Tls12 => 1,
        }
    }

    fn from_code(code: u8) -> Option<Version> {
        [Version::Tls13, Version::Tls12]
            .into_iter()
            .find(|version| version.code() == code)
    }

    fn max_ciphertext(self) -> usize {
        match self {
            Version::Tls13 => MAX_CIPHERTEXT_13,
            Version::Tls12 => MAX_CIPHERTEXT_12,
        }
    }
}

/// The AEAD of the connection's cipher suite.
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

    /// Records one key may seal (RFC 8446 §5.5): 2^24 for AES-GCM, as rustls counts (for
    /// TLS 1.2 too, where rustls closes the connection there); the sequence number is the
    /// only bound for ChaCha20-Poly1305. Reached, the connection ends: a new key would take
    /// a KeyUpdate or a renegotiation, which need the secrets this side lacks.
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

/// All a record stream needs to go on in another process: the version, the suite and both
/// directions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordState {
    pub version: Version,
    pub suite: Suite,
    /// Towards the peer.
    pub tx: Secrets,
    /// From the peer.
    pub rx: Secrets,
}

impl RecordState {
    /// The state rustls extracted after a handshake of `version`; `None` for a suite this
    /// record layer does not implement. For TLS 1.2 AES-GCM rustls gives as IV the 4-byte
    /// salt followed by the 8-byte start of its explicit nonces: it seals with that IV XOR
    /// the sequence number and sends the last 8 bytes, as [`Direction`] goes on doing.
    pub fn from_rustls(secrets: ExtractedSecrets, version: Version) -> Option<RecordState> {
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
        (suite == rx_suite).then_some(RecordState { version, suite, tx, rx })
    }

    /// Appends this state: version and suite in one byte (see [`Version::code`]), then for
    /// tx and rx the sequence number, key and IV.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(self.version.code() << 4 | self.suite.code());
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
        let version = Version::from_code(code >> 4)?;
        let suite = Suite::from_code(code & 0x0f)?;
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
        Some((RecordState { version, suite, tx, rx }, rest))
    }
}

/// One direction, ready to seal or open.
struct Direction {
    key: LessSafeKey,
    version: Version,
    suite: Suite,
    secrets: Secrets,
    limit: u64,
}

impl Direction {
    /// `sends`: the direction towards the peer. Only what this side seals is bounded by
    /// the suite's record limit (RFC 8446 §5.5 limits what is encrypted under one key);
    /// what it opens, by the sequence number alone, as rustls does: a peer that changes
    /// no keys (OpenSSL's default, and every TLS 1.2 peer) would otherwise be ended once
    /// busy enough.
    fn new(version: Version, suite: Suite, secrets: Secrets, sends: bool) -> io::Result<Direction> {
        let key = UnboundKey::new(suite.algorithm(), &secrets.key)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a TLS traffic key of the wrong length"))?;
        let limit = if sends { suite.record_limit() } else { u64::MAX };
        Ok(Direction {
            key: LessSafeKey::new(key),
            version,
            suite,
            secrets,
            limit,
        })
    }

    /// Bytes between the header and the ciphertext: TLS 1.2 AES-GCM's explicit nonce.
    fn explicit_len(&self) -> usize {
        match (self.version, self.suite) {
            (Version::Tls12, Suite::Aes128Gcm | Suite::Aes256Gcm) => GCM_EXPLICIT_LEN,
            _ => 0,
        }
    }

    /// The sequence number of the next record, moved on; an error once the limit is
    /// reached, so that no nonce is ever used twice.
    fn next_seq(&mut self) -> io::Result<u64> {
        let seq = self.secrets.seq;
        if seq >= self.limit || seq == u64::MAX {
            return Err(io::Error::other(
                "the TLS connection reached its record limit and cannot change keys here",
            ));
        }
        self.secrets.seq += 1;
        Ok(seq)
    }

    /// The nonce of record `seq`: the IV XOR the sequence number, left-padded (RFC 8446
    /// §5.3, RFC 7905 §2; for TLS 1.2 AES-GCM, rustls' choice of explicit nonces, which
    /// this side goes on with so that none repeats).
    fn nonce(&self, seq: u64) -> [u8; NONCE_LEN] {
        let mut nonce = self.secrets.iv;
        for (byte, seq_byte) in nonce[NONCE_LEN - 8..].iter_mut().zip(seq.to_be_bytes()) {
            *byte ^= seq_byte;
        }
        nonce
    }

    /// TLS 1.2's additional data (RFC 5246 §6.2.3.3).
    fn aad_12(seq: u64, content_type: u8, length: usize) -> io::Result<[u8; 13]> {
        let length = u16::try_from(length).map_err(|_| protocol_error("TLS record too long"))?;
        let mut aad = [0; 13];
        aad[..8].copy_from_slice(&seq.to_be_bytes());
        aad[8] = content_type;
        aad[9..11].copy_from_slice(&RECORD_VERSION);
        aad[11..].copy_from_slice(&length.to_be_bytes());
        Ok(aad)
    }

    /// Opens one record (`header`, and `body` in place); returns its content type and
    /// content.
    fn open<'a>(&mut self, header: [u8; HEADER_LEN], body: &'a mut [u8]) -> io::Result<(u8, &'a [u8])> {
        let seq = self.next_seq()?;
        let failed = |_| protocol_error("a TLS record failed authentication");
        match self.version {
            Version::Tls13 => {
                let nonce = Nonce::assume_unique_for_key(self.nonce(seq));
                let inner = self.key.open_in_place(nonce, Aad::from(header), body).map_err(failed)?;
                // TLSInnerPlaintext: content, content type, zero padding.
                let Some(end) = inner.iter().rposition(|&byte| byte != 0) else {
                    return Err(protocol_error("a TLS record without a content type"));
                };
                Ok((inner[end], &inner[..end]))
            }
            Version::Tls12 => {
                let explicit = self.explicit_len();
                let nonce = if explicit == 0 {
                    self.nonce(seq)
                } else {
                    // The salt, then the explicit part the sender chose (RFC 5288 §3).
                    let mut nonce = self.secrets.iv;
                    nonce[NONCE_LEN - GCM_EXPLICIT_LEN..].copy_from_slice(&body[..GCM_EXPLICIT_LEN]);
                    nonce
                };
                let length = body.len() - explicit - TAG_LEN;
                let aad = Self::aad_12(seq, header[0], length)?;
                let content = self
                    .key
                    .open_within(Nonce::assume_unique_for_key(nonce), Aad::from(aad), body, explicit..)
                    .map_err(failed)?;
                if content.len() > MAX_PLAINTEXT {
                    return Err(protocol_error("an oversized TLS record"));
                }
                Ok((header[0], content))
            }
        }
    }

    /// Seals `content` as one record of type `content_type` at the end of `out`.
    fn seal(&mut self, content_type: u8, content: &[u8], out: &mut BytesMut) -> io::Result<()> {
        let seq = self.next_seq()?;
        let nonce = self.nonce(seq);
        let (outer_type, inner_type, explicit) = match self.version {
            Version::Tls13 => (APPLICATION_DATA, Some(content_type), &nonce[..0]),
            Version::Tls12 => (content_type, None, &nonce[NONCE_LEN - self.explicit_len()..]),
        };
        let length = explicit.len() + content.len() + usize::from(inner_type.is_some()) + TAG_LEN;
        let [high, low] = u16::try_from(length)
            .map_err(|_| io::Error::other("TLS record too long"))?
            .to_be_bytes();
        let header = [outer_type, RECORD_VERSION[0], RECORD_VERSION[1], high, low];
        out.reserve(HEADER_LEN + length);
        out.extend_from_slice(&header);
        out.extend_from_slice(explicit);
        let start = out.len();
        out.extend_from_slice(content);
        out.extend_from_slice(inner_type.as_slice());
        let sealed = match self.version {
            Version::Tls13 => self.key.seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(header),
                &mut out[start..],
            ),
            Version::Tls12 => self.key.seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(Self::aad_12(seq, content_type, content.len())?),
                &mut out[start..],
            ),
        };
        let tag = sealed.map_err(|_| io::Error::other("sealing a TLS record failed"))?;
        out.extend_from_slice(tag.as_ref());
        Ok(())
    }
}

/// Whether a TLS 1.3 handshake record holds whole NewSessionTicket messages and nothing
/// else. A message split across records is not followed: it ends the connection as any
/// other handshake message does.
fn only_session_tickets(mut content: &[u8]) -> bool {
    if content.is_empty() {
        return false;
    }
    while let Some(header) = content.get(..HANDSHAKE_HEADER_LEN) {
        let length = usize::from(header[1]) << 16 | usize::from(header[2]) << 8 | usize::from(header[3]);
        if header[0] != NEW_SESSION_TICKET || content.len() < HANDSHAKE_HEADER_LEN + length {
            return false;
        }
        content = &content[HANDSHAKE_HEADER_LEN + length..];
    }
    content.is_empty()
}

/// How the input side stands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Input {
    Open,
    /// The peer sent close_notify: end of stream.
    Closed,
    /// Failed for good: each read repeats the error.
    Failed(io::ErrorKind, String),
}

/// A connection continued with its TLS traffic keys (see the module comment).
pub struct RecordStream {
    tcp: TcpStream,
    version: Version,
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
            .field("version", &self.version)
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
        let RecordState { version, suite, tx, rx } = state;
        Ok(RecordStream {
            tcp,
            version,
            suite,
            tx: Direction::new(version, suite, tx, true)?,
            rx: Direction::new(version, suite, rx, false)?,
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

    pub fn version(&self) -> Version {
        self.version
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
            version: self.version,
            suite: self.suite,
            tx: self.tx.secrets.clone(),
            rx: self.rx.secrets.clone(),
        })
    }

    /// Whether half of the records this side may seal under its key are spent (AES-GCM:
    /// 2^23 of 2^24). A pooled server connection so far along is not reused: it would
    /// end with an error at the limit, in the middle of some client's work.
    pub fn half_spent(&self) -> bool {
        self.tx.secrets.seq >= self.tx.limit / 2
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

    /// Whether the peer sent anything not read yet (buffered here or in the socket).
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

    /// Whether the connection is open and the peer silent: nothing buffered here, no
    /// close_notify or error seen, and nothing (not even an end of stream) waiting in the
    /// socket. Never waits and consumes nothing.
    pub fn is_open_and_silent(&self) -> bool {
        if self.input != Input::Open || !self.plain.is_empty() || !self.incoming.is_empty() {
            return false;
        }
        let mut byte = [MaybeUninit::<u8>::uninit(); 1];
        matches!(socket2::SockRef::from(&self.tcp).peek(&mut byte),
            Err(error) if error.kind() == io::ErrorKind::WouldBlock)
    }

    /// Seals `bytes` and writes what the socket takes without waiting: for a last
    /// courtesy message on a connection about to close, whose leftovers are dropped.
    pub fn try_write_now(&mut self, bytes: &[u8]) {
        if self.output_closed {
            return;
        }
        for chunk in bytes.chunks(MAX_PLAINTEXT) {
            if self.seal(APPLICATION_DATA, chunk).is_err() {
                return;
            }
        }
        self.write_now();
    }

    /// Seals a close_notify and writes what the socket takes without waiting; nothing more
    /// is sealed after it.
    pub fn close_nowait(&mut self) {
        self.seal_close_notify();
        self.write_now();
    }

    /// Seals the close_notify, once; nothing is sealed after it.
    fn seal_close_notify(&mut self) {
        if !self.output_closed {
            // A warning-level alert; at the record limit none can be sealed, and the
            // connection just closes.
            let _ = self.seal(ALERT, &[1, CLOSE_NOTIFY]);
            self.output_closed = true;
        }
    }

    /// Writes what the socket takes of the sealed records, without waiting.
    fn write_now(&mut self) {
        while !self.outgoing.is_empty() {
            match self.tcp.try_write(&self.outgoing) {
                Ok(0) | Err(_) => return,
                Ok(written) => self.outgoing.advance(written),
            }
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
        // TLS 1.3 hides the content type inside; TLS 1.2 shows it, and what may follow the
        // handshake there is checked once the record is opened.
        let known_type = match self.version {
            Version::Tls13 => header[0] == APPLICATION_DATA,
            Version::Tls12 => matches!(header[0], APPLICATION_DATA | ALERT | HANDSHAKE | CHANGE_CIPHER_SPEC),
        };
        if !known_type || header[1..3] != RECORD_VERSION {
            return Err(protocol_error(format!(
                "unexpected TLS record header {:02x}{:02x}{:02x}",
                header[0], header[1], header[2]
            )));
        }
        let length = usize::from(u16::from_be_bytes([header[3], header[4]]));
        // TLS 1.3 protects at least the content type; TLS 1.2 may carry an empty fragment.
        let shortest = self.rx.explicit_len() + TAG_LEN + usize::from(self.version == Version::Tls13);
        if !(shortest..=self.version.max_ciphertext()).contains(&length) {
            return Err(protocol_error(format!("a TLS record of {length} bytes")));
        }
        if self.incoming.len() < HEADER_LEN + length {
            return Ok(false);
        }
        let mut record = self.incoming.split_to(HEADER_LEN + length);
        let (content_type, content) = self.rx.open(header, &mut record[HEADER_LEN..])?;
        match content_type {
            APPLICATION_DATA => self.plain.extend_from_slice(content),
            ALERT if content == [1, CLOSE_NOTIFY] || content == [2, CLOSE_NOTIFY] => self.input = Input::Closed,
            ALERT => {
                let description = content.get(1).copied().unwrap_or(0);
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    format!("the TLS peer sent alert {description}"),
                ));
            }
            // Tickets for a later resumption, which pgrelay never attempts: nothing to do.
            HANDSHAKE if self.version == Version::Tls13 && only_session_tickets(content) => {}
            HANDSHAKE if self.version == Version::Tls13 && content.first() == Some(&KEY_UPDATE) => {
                tracing::warn!(
                    "a connection continued from the previous process received a TLS KeyUpdate, which cannot be followed here: closing it"
                );
                return Err(protocol_error(
                    "TLS KeyUpdate is not supported on a connection taken over",
                ));
            }
            // A ClientHello or a HelloRequest on an established TLS 1.2 connection: a
            // renegotiation.
            HANDSHAKE if self.version == Version::Tls12 => {
                tracing::warn!(
                    "a connection continued from the previous process received a TLS renegotiation, which cannot be followed here: closing it"
                );
                return Err(protocol_error(
                    "TLS renegotiation is not supported on a connection taken over",
                ));
            }
            other => return Err(protocol_error(format!("unexpected TLS message of type {other}"))),
        }
        Ok(true)
    }

    /// Seals `content` as one record of type `content_type` into `outgoing`; on any error
    /// nothing more is sealed.
    fn seal(&mut self, content_type: u8, content: &[u8]) -> io::Result<()> {
        let before = self.outgoing.len();
        if let Err(error) = self.tx.seal(content_type, content, &mut self.outgoing) {
            self.outgoing.truncate(before);
            self.output_closed = true;
            return Err(error);
        }
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
            this.incoming.reserve(HEADER_LEN + this.version.max_ciphertext());
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
                        "the TLS peer closed the connection without a close_notify",
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
        this.seal_close_notify();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests;
