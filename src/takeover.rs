//! Socket takeover (`[server] takeover_socket`, `pgrelay run --takeover PATH`): hands a
//! running pgrelay's listening sockets to a new process over a Unix socket (SCM_RIGHTS), so
//! that an upgrade or a restart refuses no connection, and carries the cancels of the clients
//! the old process still serves while it drains.
//!
//! The exchange, one text line each way (the old process is "old", the new one "new"):
//!
//! ```text
//! new → old  HELLO pgrelay-takeover/2 <version> [listeners] [memfd] [tls12] [server_tls]
//! old → new  SOCKETS listen=<addr> [peer_listen=<addr>] [metrics_listen=<addr>]   + the fds
//!            (or REFUSED <reason>, and the connection is closed)
//! new → old  ACCEPTING            the new process accepts on the sockets
//! old → new  RELEASED             the old one has stopped accepting and removed PATH
//! new → old  CANCEL <pid> <hex>   any number, afterwards: a cancel key the new process
//! old → new  DONE 1|0             does not know, for a client the old one still serves
//! ```
//!
//! `listeners` says that the new process takes fan-out listening clients (their
//! announcement, then their socket, on the client channel; see `ClientHandover`), `memfd`
//! that it reads client descriptions too large for one message from a memfd (`large`), and
//! `tls12` that it continues TLS 1.2 connections (an earlier one continues only TLS 1.3: a
//! TLS 1.2 client then finishes on the old process rather than be disconnected on the new
//! one), and `server_tls` that it continues a TLS server connection handed over with its
//! client (an earlier one takes only plain TCP ones: such a client then finishes here).
//!
//! Both processes hold the same listening sockets, so connections waiting in the backlog
//! are never lost: the old one only stops calling accept, and the new one takes them.
//!
//! With RELEASED comes one end of a `SOCK_SEQPACKET` pair: the old process's idle clients
//! travel on it, one message each (a description of the session with the socket attached;
//! see `session::run::handover`), and last, when its drain ends, its [`Tally`] of
//! `pgrelay_takeover_clients_total`.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::watch;

use crate::protocol::startup::CancelKey;
use crate::runtime::Shared;

mod large;

use large::MAX_DESCRIPTION;

/// The version of the exchange above. A process speaking another one is refused, whatever
/// the pgrelay versions: any two binaries with the same exchange can hand over.
pub const PROTOCOL: &str = "pgrelay-takeover/2";
/// Each step of the exchange, and each cancel carried to the old process (whose own
/// delivery gives up after 5 s).
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
const CANCEL_TIMEOUT: Duration = Duration::from_secs(6);
/// Longest line of the exchange; the SOCKETS line is the longest, well under this.
const MAX_LINE: usize = 4096;
/// Sockets handed over at most: listen, peer_listen, metrics_listen.
const MAX_SOCKETS: usize = 3;
/// The words of the HELLO line by which a new process says it takes fan-out listeners,
/// large descriptions in a memfd, TLS 1.2 clients, and TLS server connections.
const LISTENERS: &str = "listeners";
const MEMFD: &str = "memfd";
const TLS12: &str = "tls12";
const SERVER_TLS: &str = "server_tls";

/// What the new process said it takes besides plain and TLS 1.3 clients.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Accepts {
    pub listeners: bool,
    pub memfd: bool,
    pub tls12: bool,
    pub server_tls: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    #[error("takeover socket {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("takeover socket {0} is in use: another pgrelay is running there (take it over with --takeover)")]
    Live(PathBuf),
    #[error("takeover socket {0} exists and is not a socket: not removing it")]
    NotSocket(PathBuf),
    #[error("the running pgrelay refused the takeover: {0}")]
    Refused(String),
    #[error("takeover: {0}")]
    Protocol(String),
}

/// Which of the configured listening sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Listen,
    PeerListen,
    MetricsListen,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Listen => "listen",
            Role::PeerListen => "peer_listen",
            Role::MetricsListen => "metrics_listen",
        }
    }

    fn from_name(name: &str) -> Option<Role> {
        [Role::Listen, Role::PeerListen, Role::MetricsListen]
            .into_iter()
            .find(|role| role.name() == name)
    }
}

/// A listening socket the old process offers: the address as its configuration wrote it,
/// and a duplicate of the socket's descriptor.
#[derive(Debug)]
pub struct Offered {
    pub role: Role,
    pub addr: String,
    pub fd: OwnedFd,
}

/// What the new process received: the sockets and the connection to the old process.
#[derive(Debug)]
pub struct Inherited {
    sockets: Vec<(Role, String, std::net::TcpListener)>,
    stream: UnixStream,
    path: PathBuf,
}

impl Inherited {
    /// The socket the old process listened on for `role`, if its configuration named the
    /// same address as `configured` (an address that changed is bound afresh, and the old
    /// socket closes with the old process).
    pub fn take(&mut self, role: Role, configured: &str) -> Option<std::net::TcpListener> {
        let index = self
            .sockets
            .iter()
            .position(|(r, addr, _)| *r == role && addr == configured)?;
        Some(self.sockets.swap_remove(index).2)
    }

    /// Tells the old process that this one accepts now; returns once it has stopped
    /// accepting and given up the takeover socket. The connection stays open, for
    /// [`Predecessor::attach`]; with it comes the channel idle clients are handed over on
    /// ([`receive_clients`]).
    pub fn finish(mut self) -> Result<(UnixStream, Option<OwnedFd>), TakeoverError> {
        let path = self.path.clone();
        let io_error = |source| TakeoverError::Io {
            path: path.clone(),
            source,
        };
        for (role, addr, _) in &self.sockets {
            tracing::warn!(
                socket = role.name(),
                %addr,
                "the new configuration names another address: the old socket closes with the old process"
            );
        }
        self.stream.write_all(b"ACCEPTING\n").map_err(io_error)?;
        let (line, mut fds) = receive_with_fds(&self.stream).map_err(io_error)?;
        if line != "RELEASED" {
            return Err(TakeoverError::Protocol(format!("expected RELEASED, got {line:?}")));
        }
        self.stream.set_read_timeout(None).map_err(io_error)?;
        Ok((self.stream, fds.pop()))
    }
}

/// Connects to the running pgrelay at `path` and receives its listening sockets. Blocking:
/// run it before accepting anything.
pub fn receive(path: &Path) -> Result<Inherited, TakeoverError> {
    let io_error = |source| TakeoverError::Io {
        path: path.to_owned(),
        source,
    };
    let mut stream = UnixStream::connect(path).map_err(io_error)?;
    stream.set_read_timeout(Some(STEP_TIMEOUT)).map_err(io_error)?;
    stream.set_write_timeout(Some(STEP_TIMEOUT)).map_err(io_error)?;
    let hello = format!(
        "HELLO {PROTOCOL} {} {LISTENERS} {MEMFD} {TLS12} {SERVER_TLS}\n",
        env!("CARGO_PKG_VERSION")
    );
    stream.write_all(hello.as_bytes()).map_err(io_error)?;
    let (line, fds) = receive_with_fds(&stream).map_err(io_error)?;
    if let Some(reason) = line.strip_prefix("REFUSED ") {
        return Err(TakeoverError::Refused(reason.to_owned()));
    }
    let Some(list) = line.strip_prefix("SOCKETS") else {
        return Err(TakeoverError::Protocol(format!("expected SOCKETS, got {line:?}")));
    };
    let entries: Vec<&str> = list.split_whitespace().collect();
    if entries.len() != fds.len() {
        return Err(TakeoverError::Protocol(format!(
            "{} sockets named but {} received",
            entries.len(),
            fds.len()
        )));
    }
    let mut sockets = Vec::new();
    for (entry, fd) in entries.into_iter().zip(fds) {
        let role = entry
            .split_once('=')
            .and_then(|(name, addr)| Some((Role::from_name(name)?, addr)));
        let Some((role, addr)) = role else {
            return Err(TakeoverError::Protocol(format!("unknown socket {entry:?}")));
        };
        let listener = std::net::TcpListener::from(fd);
        // The flag belongs to the socket both processes share; set anyway, tokio needs it.
        listener.set_nonblocking(true).map_err(io_error)?;
        sockets.push((role, addr.to_owned(), listener));
    }
    Ok(Inherited {
        sockets,
        stream,
        path: path.to_owned(),
    })
}

/// Reads one line and the descriptors sent with it.
fn receive_with_fds(stream: &UnixStream) -> io::Result<(String, Vec<OwnedFd>)> {
    let mut buffer = vec![0u8; MAX_LINE];
    let mut space = nix::cmsg_space!([RawFd; MAX_SOCKETS]);
    let (received, raw_fds) = {
        let mut iov = [IoSliceMut::new(&mut buffer)];
        let message = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        let mut raw_fds = Vec::new();
        for cmsg in message.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(fds) = cmsg {
                raw_fds.extend(fds);
            }
        }
        (message.bytes, raw_fds)
    };
    // Owned at once, so that every descriptor is closed on any error below.
    let fds: Vec<OwnedFd> = raw_fds.into_iter().map(owned).collect();
    let mut line = buffer[..received].to_vec();
    // The descriptors come with the first bytes; the rest of the line may come later.
    let mut stream = stream;
    while !line.ends_with(b"\n") {
        if line.len() > MAX_LINE || received == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "no complete line"));
        }
        let mut byte = [0u8; 1];
        if stream.read(&mut byte)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        line.push(byte[0]);
    }
    line.pop();
    let line = String::from_utf8(line).map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not UTF-8"))?;
    Ok((line, fds))
}

/// A descriptor just received over SCM_RIGHTS: this process owns it and nobody else has it.
#[allow(unsafe_code)]
fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: the kernel installed `fd` in this process for this message; it is open and
    // referred to by nothing else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Reads one `\n`-terminated line, byte by byte: nothing past it is consumed, so the
/// stream can change hands afterwards.
fn read_line(stream: &mut UnixStream) -> io::Result<String> {
    let mut line = Vec::new();
    loop {
        let mut byte = [0u8; 1];
        if stream.read(&mut byte)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
        if line.len() > MAX_LINE {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "line too long"));
        }
    }
    String::from_utf8(line).map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not UTF-8"))
}

/// The old process, seen from the new one while it drains: the cancel keys of its clients
/// are known there only.
#[derive(Debug, Default)]
pub struct Predecessor {
    link: tokio::sync::Mutex<
        Option<(
            BufReader<tokio::net::unix::OwnedReadHalf>,
            tokio::net::unix::OwnedWriteHalf,
        )>,
    >,
}

impl Predecessor {
    /// Carries cancels over `stream`, the connection [`Inherited::finish`] left open.
    pub async fn attach(&self, stream: UnixStream) -> io::Result<()> {
        stream.set_nonblocking(true)?;
        let (read, write) = tokio::net::UnixStream::from_std(stream)?.into_split();
        *self.link.lock().await = Some((BufReader::new(read), write));
        Ok(())
    }

    /// Sends `key` to the old process; true if one of its clients held it. False, and
    /// forgotten, once the old process has exited.
    pub async fn cancel(&self, key: &CancelKey) -> bool {
        let mut link = self.link.lock().await;
        let Some((read, write)) = link.as_mut() else {
            return false;
        };
        let request = format!("CANCEL {} {}\n", key.process_id, hex(&key.secret));
        let exchange = async {
            write.write_all(request.as_bytes()).await?;
            let mut line = String::new();
            if read.read_line(&mut line).await? == 0 {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
            }
            Ok(line.trim_end() == "DONE 1")
        };
        match tokio::time::timeout(CANCEL_TIMEOUT, exchange).await {
            Ok(Ok(applied)) => applied,
            Ok(Err(_)) | Err(_) => {
                // The old process is gone (it closes the link when it exits).
                *link = None;
                false
            }
        }
    }

    /// Whether an old process may still hold clients.
    pub async fn is_present(&self) -> bool {
        self.link.lock().await.is_some()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn unhex(text: &str) -> Option<Bytes> {
    if !text.len().is_multiple_of(2) || text.len() > 512 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|at| u8::from_str_radix(text.get(at..at + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()
        .map(Bytes::from)
}

/// Binds the takeover socket at `path`, readable and writable by this user only. A socket
/// left by a process that is gone is removed; one that a running process answers on is an
/// error, and so is a file that is not a socket.
pub fn bind(path: &Path) -> Result<tokio::net::UnixListener, TakeoverError> {
    let io_error = |source| TakeoverError::Io {
        path: path.to_owned(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(metadata) if !metadata.file_type().is_socket() => return Err(TakeoverError::NotSocket(path.to_owned())),
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => return Err(TakeoverError::Live(path.to_owned())),
            Err(error) if error.kind() == io::ErrorKind::ConnectionRefused => {
                tracing::info!(path = %path.display(), "removing a stale takeover socket");
                std::fs::remove_file(path).map_err(io_error)?;
            }
            Err(error) => return Err(io_error(error)),
        },
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => return Err(io_error(error)),
    }
    // A umask for the bind would change it for every thread: the mode is set right after,
    // before anyone is told the path (and connecting needs write permission anyway).
    let listener = tokio::net::UnixListener::bind(path).map_err(io_error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io_error)?;
    Ok(listener)
}

/// The old process's end of the channel idle clients are handed over on: a
/// `SOCK_SEQPACKET` socket pair, one message per client (its description, with its socket
/// attached, and its server connection's after it when one goes along), so that each
/// arrives whole or not at all. A fan-out listener's description comes twice: first alone
/// (its announcement: the new process LISTENs to its channels and sends the marker), then
/// with its socket once the old process has delivered up to the marker. A description
/// larger than `large::INLINE_DESCRIPTION` travels in a memfd sent after the sockets, the
/// message saying so (`large`); one larger than [`MAX_DESCRIPTION`] is not sent, and its
/// client finishes here.
#[derive(Debug, Default)]
pub struct ClientHandover {
    channel: std::sync::Mutex<Option<OwnedFd>>,
    /// A new process took the sockets over: every client still here either moves or is
    /// counted as kept (`pgrelay_takeover_clients_total`).
    started: std::sync::atomic::AtomicBool,
    /// The new process takes fan-out listeners.
    listeners: std::sync::atomic::AtomicBool,
    /// The new process reads descriptions from a memfd (`large`).
    memfd: std::sync::atomic::AtomicBool,
    /// The new process continues TLS 1.2 connections.
    tls12: std::sync::atomic::AtomicBool,
    /// The new process continues TLS server connections.
    server_tls: std::sync::atomic::AtomicBool,
}

/// What the old process counted at the takeover (and had been passed on by its own
/// predecessors), sent to the new process at exit so that `pgrelay_takeover_clients_total`
/// goes on counting across processes: handed_over, received, kept, failed.
pub type Tally = [u64; 4];

/// Marks the one message on the client channel that carries no client but the [`Tally`].
const TALLY: &[u8] = b"pgrelay-tally/1";

/// The longest message of the client channel: a description sent in the message itself.
/// This version sends up to `large::INLINE_DESCRIPTION` so, and earlier ones sent up to
/// this length.
const MAX_MESSAGE: usize = 128 * 1024;
/// Descriptors in a message of the client channel at most: the client's socket, its
/// server connection's, and a memfd holding the description.
const MAX_MESSAGE_FDS: usize = 3;

impl ClientHandover {
    /// Whether a new process takes clients now.
    pub fn is_active(&self) -> bool {
        self.channel.lock().is_ok_and(|channel| channel.is_some())
    }

    /// Whether a new process has taken this one over (clients may have moved or not).
    pub fn started(&self) -> bool {
        self.started.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Whether the new process takes fan-out listening clients.
    pub fn moves_listeners(&self) -> bool {
        self.listeners.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Whether the new process continues TLS 1.2 connections.
    pub fn continues_tls12(&self) -> bool {
        self.tls12.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Whether the new process continues a TLS server connection that comes with its client.
    pub fn continues_server_tls(&self) -> bool {
        self.server_tls.load(std::sync::atomic::Ordering::Acquire)
    }

    fn start(&self, fd: Option<OwnedFd>, accepts: Accepts) {
        self.listeners
            .store(accepts.listeners, std::sync::atomic::Ordering::Release);
        self.memfd.store(accepts.memfd, std::sync::atomic::Ordering::Release);
        self.tls12.store(accepts.tls12, std::sync::atomic::Ordering::Release);
        self.server_tls
            .store(accepts.server_tls, std::sync::atomic::Ordering::Release);
        if let (Some(fd), Ok(mut channel)) = (fd, self.channel.lock()) {
            *channel = Some(fd);
        }
        self.started.store(true, std::sync::atomic::Ordering::Release);
    }

    /// Sends `tally` to the new process, last thing before exit; false if it could not.
    pub fn send_tally(&self, tally: Tally) -> bool {
        let mut message = TALLY.to_vec();
        for count in tally {
            message.extend_from_slice(&count.to_be_bytes());
        }
        let Ok(channel) = self.channel.lock() else {
            return false;
        };
        let Some(fd) = channel.as_ref() else {
            return false;
        };
        // A few dozen bytes into a channel the new process reads on a thread of its own.
        sendmsg::<()>(
            fd.as_raw_fd(),
            &[IoSlice::new(&message)],
            &[],
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .is_ok_and(|sent| sent == message.len())
    }

    /// Sends a client's socket, and the socket of the server connection that goes with it
    /// if any, with its `description`; false if it could not be sent (the new process is
    /// gone, or it does not keep up for a second): the client then stays.
    pub async fn send(
        &self,
        client: std::os::fd::BorrowedFd<'_>,
        server: Option<std::os::fd::BorrowedFd<'_>>,
        description: &[u8],
    ) -> bool {
        let fds: Vec<RawFd> = std::iter::once(client).chain(server).map(|fd| fd.as_raw_fd()).collect();
        self.send_message(&fds, description).await
    }

    /// Announces a fan-out listener (its description without its socket); false if it
    /// could not be sent.
    pub async fn announce(&self, description: &[u8]) -> bool {
        self.send_message(&[], description).await
    }

    async fn send_message(&self, sockets: &[RawFd], description: &[u8]) -> bool {
        let memfd = self.memfd.load(std::sync::atomic::Ordering::Acquire);
        // A new process that reads no memfd takes what this process's predecessors sent.
        let inline = if memfd { large::INLINE_DESCRIPTION } else { MAX_MESSAGE };
        let stored;
        let (message, fds): (&[u8], Vec<RawFd>) = if description.len() <= inline {
            (description, sockets.to_vec())
        } else if !memfd || description.len() > MAX_DESCRIPTION {
            tracing::warn!(
                bytes = description.len(),
                "a client description too large to hand over: the client finishes here"
            );
            return false;
        } else {
            let Ok(count) = u8::try_from(sockets.len()) else {
                return false;
            };
            stored = match large::store(description, count) {
                Ok(stored) => stored,
                Err(error) => {
                    tracing::warn!(%error, "cannot put a client description in a memfd: the client finishes here");
                    return false;
                }
            };
            // The memfd comes last; the message says how many sockets come before it.
            let fds = sockets.iter().copied().chain([stored.memfd.as_raw_fd()]).collect();
            (&stored.message, fds)
        };
        let rights = [ControlMessage::ScmRights(&fds)];
        let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
        for _ in 0..100 {
            let sent = {
                let Ok(mut channel) = self.channel.lock() else {
                    return false;
                };
                let Some(fd) = channel.as_ref() else {
                    return false;
                };
                let sent = sendmsg::<()>(
                    fd.as_raw_fd(),
                    &[IoSlice::new(message)],
                    cmsgs,
                    MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
                    None,
                );
                if let Err(error) = sent
                    && error != nix::errno::Errno::EAGAIN
                {
                    tracing::warn!(%error, "the new process no longer takes clients");
                    *channel = None;
                }
                sent
            };
            match sent {
                Ok(length) => return length == message.len(),
                Err(nix::errno::Errno::EAGAIN) => tokio::time::sleep(Duration::from_millis(10)).await,
                Err(_) => return false,
            }
        }
        false
    }
}

/// The tally in a message of the client channel, if it is one.
fn parse_tally(message: &[u8]) -> Option<Tally> {
    let counts = message.strip_prefix(TALLY)?;
    if counts.len() != 4 * 8 {
        return None;
    }
    let mut tally = [0u64; 4];
    for (count, bytes) in tally.iter_mut().zip(counts.chunks_exact(8)) {
        *count = u64::from_be_bytes(bytes.try_into().ok()?);
    }
    Some(tally)
}

/// The new process's end: receives the old process's idle clients, on a thread of its own,
/// until the old process exits; each is passed to `deliver` with the server connection
/// that came with it (session mode, a pinned client), and so is each announcement of a
/// fan-out listener (without a socket); the old process's [`Tally`] goes to `tally`.
pub fn receive_clients(
    channel: OwnedFd,
    deliver: impl Fn(Option<std::net::TcpStream>, Option<std::net::TcpStream>, Vec<u8>) + Send + 'static,
    tally: impl Fn(Tally) + Send + 'static,
) -> io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("pgrelay-takeover".to_owned())
        .spawn(move || {
            let mut buffer = vec![0u8; MAX_MESSAGE];
            loop {
                let mut space = nix::cmsg_space!([RawFd; MAX_MESSAGE_FDS]);
                let (length, truncated, raw_fds) = {
                    let mut iov = [IoSliceMut::new(&mut buffer)];
                    let message = match recvmsg::<()>(
                        channel.as_raw_fd(),
                        &mut iov,
                        Some(&mut space),
                        MsgFlags::MSG_CMSG_CLOEXEC,
                    ) {
                        Ok(message) => message,
                        Err(nix::errno::Errno::EINTR) => continue,
                        Err(error) => return tracing::warn!(%error, "takeover: client channel failed"),
                    };
                    let mut raw_fds = Vec::new();
                    if let Ok(cmsgs) = message.cmsgs() {
                        for cmsg in cmsgs {
                            if let ControlMessageOwned::ScmRights(fds) = cmsg {
                                raw_fds.extend(fds);
                            }
                        }
                    }
                    let truncated = message.flags.intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
                    (message.bytes, truncated, raw_fds)
                };
                // Owned at once: every descriptor is closed unless it goes on below.
                let fds: Vec<OwnedFd> = raw_fds.into_iter().map(owned).collect();
                if length == 0 && fds.is_empty() {
                    // The old process has exited: every client it could hand over came.
                    return;
                }
                match classify(&buffer[..length], truncated, fds) {
                    Ok(Received::Tally(counts)) => tally(counts),
                    Ok(Received::Client {
                        client,
                        server,
                        description,
                    }) => deliver(
                        client.map(std::net::TcpStream::from),
                        server.map(std::net::TcpStream::from),
                        description,
                    ),
                    Err(error) => {
                        tracing::warn!(%error, "takeover: a malformed client message; its connection is closed")
                    }
                }
            }
        })
}

/// A message of the client channel, as the new process takes it.
#[derive(Debug)]
enum Received {
    Tally(Tally),
    /// A client's socket and its server connection's if one came (neither for a
    /// listener's announcement), and its description.
    Client {
        client: Option<OwnedFd>,
        server: Option<OwnedFd>,
        description: Vec<u8>,
    },
}

/// Tells what `message` and the descriptors that came with it are. On an error every
/// descriptor is closed (dropped here).
fn classify(message: &[u8], truncated: bool, mut fds: Vec<OwnedFd>) -> io::Result<Received> {
    let malformed = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    if truncated {
        return Err(malformed("truncated"));
    }
    if fds.is_empty()
        && let Some(counts) = parse_tally(message)
    {
        return Ok(Received::Tally(counts));
    }
    let description = if large::is_large(message) {
        // The memfd comes last, after as many sockets as the message says: a socket is
        // never taken for the memfd, nor the other way round.
        let (sockets, length) = large::parse(message).ok_or_else(|| malformed("a bad memfd message"))?;
        if sockets > 2 || fds.len() != sockets + 1 {
            return Err(malformed("a memfd message with other descriptors than it names"));
        }
        let memfd = fds.pop().ok_or_else(|| malformed("no memfd"))?;
        large::load(memfd, length)?
    } else {
        if fds.len() > 2 {
            return Err(malformed("more than two sockets"));
        }
        message.to_vec()
    };
    let server = if fds.len() == 2 { fds.pop() } else { None };
    Ok(Received::Client {
        client: fds.pop(),
        server,
        description,
    })
}

/// The old process's side: waits on the takeover socket for a new process, hands it the
/// `offered` sockets, and, once it accepts, sets `handed_over` (which stops every accept
/// loop here and starts the graceful shutdown) and answers its cancels until exit.
pub async fn serve(
    listener: tokio::net::UnixListener,
    path: PathBuf,
    offered: Vec<Offered>,
    shared: Arc<Shared>,
    handed_over: Arc<watch::Sender<bool>>,
) {
    let offered = Arc::new(offered);
    let (stream, accepts) = loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::warn!(%error, "accept failed on the takeover socket");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(stream) = stream.into_std() else { continue };
        let offered = offered.clone();
        let shutting_down = shared.is_shutting_down();
        let exchange = tokio::task::spawn_blocking(move || hand_over(stream, &offered, shutting_down)).await;
        match exchange {
            Ok(Ok(taken)) => break taken,
            Ok(Err(error)) => tracing::warn!(%error, "takeover did not complete; still serving"),
            Err(error) => tracing::warn!(%error, "takeover did not complete; still serving"),
        }
    };
    // Idle clients go to the new process from now on, on a channel of their own.
    let pair = nix::sys::socket::socketpair(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::SeqPacket,
        None,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
    );
    let theirs = match pair {
        Ok((ours, theirs)) => {
            shared.client_handover.start(Some(ours), accepts);
            Some(theirs)
        }
        Err(error) => {
            tracing::warn!(%error, "cannot hand clients over: they finish here");
            shared.client_handover.start(None, Accepts::default());
            None
        }
    };
    // The new process accepts: stop accepting here (the sockets stay open in the new
    // process, with their backlog), free the path for it, and say so.
    handed_over.send_replace(true);
    drop(listener);
    if let Err(error) = std::fs::remove_file(&path) {
        tracing::warn!(path = %path.display(), %error, "cannot remove the takeover socket");
    }
    tracing::info!("handed the listening sockets over to a new process: finishing the running transactions");
    let fds: Vec<RawFd> = theirs.iter().map(|fd| fd.as_raw_fd()).collect();
    let rights = [ControlMessage::ScmRights(&fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
    // Blocking, and nine bytes into an empty socket: sent whole.
    if let Err(error) = sendmsg::<()>(
        stream.as_raw_fd(),
        &[IoSlice::new(b"RELEASED\n")],
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    ) {
        return tracing::warn!(%error, "takeover connection lost: cancels no longer carried");
    }
    drop(theirs);
    let stream = stream
        .set_nonblocking(true)
        .and_then(|()| tokio::net::UnixStream::from_std(stream));
    let stream = match stream {
        Ok(stream) => stream,
        Err(error) => return tracing::warn!(%error, "takeover connection lost: cancels no longer carried"),
    };
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let mut line = String::new();
    loop {
        line.clear();
        match read.read_line(&mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let applied = match parse_cancel(line.trim_end()) {
            Some(key) => shared.cancel.cancel(&key).await,
            None => false,
        };
        let reply: &[u8] = if applied { b"DONE 1\n" } else { b"DONE 0\n" };
        if write.write_all(reply).await.is_err() {
            return;
        }
    }
}

fn parse_cancel(line: &str) -> Option<CancelKey> {
    let mut parts = line.strip_prefix("CANCEL ")?.split(' ');
    let process_id = parts.next()?.parse().ok()?;
    let secret = unhex(parts.next()?)?;
    parts.next().is_none().then_some(CancelKey { process_id, secret })
}

/// The blocking part of the exchange, up to and with ACCEPTING; returns the connection and
/// what the new process takes besides plain and TLS 1.3 clients.
fn hand_over(
    mut stream: UnixStream,
    offered: &[Offered],
    shutting_down: bool,
) -> Result<(UnixStream, Accepts), TakeoverError> {
    let io_error = |source| TakeoverError::Io {
        path: PathBuf::from("(connection)"),
        source,
    };
    stream.set_nonblocking(false).map_err(io_error)?;
    stream.set_read_timeout(Some(STEP_TIMEOUT)).map_err(io_error)?;
    stream.set_write_timeout(Some(STEP_TIMEOUT)).map_err(io_error)?;
    let hello = read_line(&mut stream).map_err(io_error)?;
    let mut words = hello.split(' ');
    let (greeting, protocol, version) = (words.next(), words.next(), words.next().unwrap_or("?"));
    let words: Vec<&str> = words.collect();
    let accepts = Accepts {
        listeners: words.contains(&LISTENERS),
        memfd: words.contains(&MEMFD),
        tls12: words.contains(&TLS12),
        server_tls: words.contains(&SERVER_TLS),
    };
    let refusal = if greeting != Some("HELLO") || protocol != Some(PROTOCOL) {
        Some(format!(
            "this pgrelay ({}) speaks {PROTOCOL}, the new process sent {hello:?}",
            env!("CARGO_PKG_VERSION")
        ))
    } else if shutting_down {
        Some("this pgrelay is shutting down".to_owned())
    } else {
        None
    };
    if let Some(reason) = refusal {
        let _ = stream.write_all(format!("REFUSED {reason}\n").as_bytes());
        return Err(TakeoverError::Refused(reason));
    }
    tracing::info!(new_version = version, "a new process is taking over");
    let mut line = String::from("SOCKETS");
    for socket in offered {
        line.push_str(&format!(" {}={}", socket.role.name(), socket.addr));
    }
    line.push('\n');
    let fds: Vec<RawFd> = offered.iter().map(|socket| socket.fd.as_raw_fd()).collect();
    let rights = [ControlMessage::ScmRights(&fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
    let sent = sendmsg::<()>(
        stream.as_raw_fd(),
        &[IoSlice::new(line.as_bytes())],
        cmsgs,
        MsgFlags::empty(),
        None,
    )
    .map_err(|errno| io_error(io::Error::from(errno)))?;
    stream.write_all(&line.as_bytes()[sent..]).map_err(io_error)?;
    let answer = read_line(&mut stream).map_err(io_error)?;
    if answer != "ACCEPTING" {
        return Err(TakeoverError::Protocol(format!("expected ACCEPTING, got {answer:?}")));
    }
    Ok((stream, accepts))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// The old side of the exchange up to ACCEPTING, with `hello` from the new side.
    fn accepts_after(hello: &str) -> Accepts {
        let (old, mut new) = UnixStream::pair().unwrap();
        let exchange = std::thread::spawn(move || hand_over(old, &[], false));
        new.write_all(hello.as_bytes()).unwrap();
        let mut line = [0u8; 8];
        new.read_exact(&mut line).unwrap();
        assert_eq!(&line, b"SOCKETS\n");
        new.write_all(b"ACCEPTING\n").unwrap();
        exchange.join().unwrap().unwrap().1
    }

    #[test]
    fn the_new_process_says_what_it_takes() {
        let all = Accepts {
            listeners: true,
            memfd: true,
            tls12: true,
            server_tls: true,
        };
        let ours = format!(
            "HELLO {PROTOCOL} {} {LISTENERS} {MEMFD} {TLS12} {SERVER_TLS}\n",
            env!("CARGO_PKG_VERSION")
        );
        assert_eq!(accepts_after(&ours), all);
        // An earlier version of the same exchange: listeners, and no TLS 1.2.
        let earlier = accepts_after(&format!("HELLO {PROTOCOL} 0.1.0 listeners\n"));
        assert_eq!(
            earlier,
            Accepts {
                listeners: true,
                ..Accepts::default()
            }
        );
        assert_eq!(accepts_after(&format!("HELLO {PROTOCOL} 0.1.0\n")), Accepts::default());
        // The version before TLS server connections moved.
        let before = accepts_after(&format!("HELLO {PROTOCOL} 0.1.0 {LISTENERS} {MEMFD} {TLS12}\n"));
        assert!(before.tls12 && !before.server_tls);
    }

    #[test]
    fn cancel_lines_round_trip() {
        let secret = Bytes::from_static(&[0, 1, 0xab, 0xff]);
        let line = format!("CANCEL 42 {}", hex(&secret));
        let key = parse_cancel(&line).unwrap();
        assert_eq!(key.process_id, 42);
        assert_eq!(key.secret, secret);
        assert!(parse_cancel("CANCEL 42 abc").is_none());
        assert!(parse_cancel("CANCEL x 00").is_none());
        assert!(parse_cancel("CANCEL 1 00 extra").is_none());
    }

    #[test]
    fn a_tally_round_trips_and_nothing_else_is_one() {
        let handover = ClientHandover::default();
        let (ours, theirs) = seqpacket_pair();
        assert!(!handover.started());
        handover.start(Some(ours), Accepts::default());
        assert!(handover.started());
        assert!(handover.send_tally([3, 1, 4, 1 << 40]));
        let (sender, received) = std::sync::mpsc::channel();
        let thread = receive_clients(
            theirs,
            |_, _, _| panic!("no client was sent"),
            move |tally| {
                sender.send(tally).unwrap();
            },
        )
        .unwrap();
        assert_eq!(received.recv().unwrap(), [3, 1, 4, 1 << 40]);
        drop(handover);
        thread.join().unwrap();
        assert_eq!(parse_tally(b"pgrelay-tally/1"), None);
        assert_eq!(parse_tally(b"pgrelay-client/2"), None);
    }

    /// Both ends of a client channel, unstarted.
    fn seqpacket_pair() -> (OwnedFd, OwnedFd) {
        nix::sys::socket::socketpair(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::SeqPacket,
            None,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        )
        .unwrap()
    }

    /// A client channel's two ends, the old process's started with what `takes` says.
    fn channel(takes: Accepts) -> (ClientHandover, OwnedFd) {
        let (ours, theirs) = seqpacket_pair();
        let handover = ClientHandover::default();
        handover.start(Some(ours), takes);
        (handover, theirs)
    }

    /// A connected pair of TCP sockets: (this end, its peer).
    fn tcp_pair() -> (std::net::TcpStream, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let near = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (far, _) = listener.accept().unwrap();
        (near, far)
    }

    /// Whether the socket that `peer` is connected to is writable through `stream` (the same
    /// socket, passed along).
    fn same_socket(mut stream: &std::net::TcpStream, mut peer: &std::net::TcpStream) -> bool {
        stream.write_all(b"ping").unwrap();
        let mut read = [0u8; 4];
        peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        peer.read_exact(&mut read).is_ok() && &read == b"ping"
    }

    type Delivered = (Option<std::net::TcpStream>, Option<std::net::TcpStream>, Vec<u8>);

    fn receive_into(theirs: OwnedFd) -> (std::thread::JoinHandle<()>, std::sync::mpsc::Receiver<Delivered>) {
        let (sender, received) = std::sync::mpsc::channel();
        let thread = receive_clients(
            theirs,
            move |client, server, description| sender.send((client, server, description)).unwrap(),
            |_| {},
        )
        .unwrap();
        (thread, received)
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn a_large_description_travels_in_a_memfd_with_its_sockets_intact() {
        let (handover, theirs) = channel(Accepts {
            listeners: true,
            memfd: true,
            ..Accepts::default()
        });
        let (thread, received) = receive_into(theirs);
        let large: Vec<u8> = (0..3 * 1024 * 1024u32).map(|at| (at % 251) as u8).collect();
        let small = b"pgrelay-client/2 small".to_vec();
        let (client, client_peer) = tcp_pair();
        let (server, server_peer) = tcp_pair();
        let (alone, alone_peer) = tcp_pair();
        let runtime = runtime();
        runtime.block_on(async {
            assert!(handover.send(client.as_fd(), Some(server.as_fd()), &large).await);
            assert!(handover.announce(&large[..200_000]).await);
            assert!(handover.send(alone.as_fd(), None, &small).await);
        });
        // Only the new process holds the sockets now.
        drop((client, server, alone));

        let (client, server, description) = received.recv().unwrap();
        assert!(description == large, "the description comes back whole");
        assert!(same_socket(&client.unwrap(), &client_peer));
        assert!(same_socket(&server.unwrap(), &server_peer));
        let (client, server, description) = received.recv().unwrap();
        assert!((client.is_none(), server.is_none()) == (true, true));
        assert!(description == large[..200_000]);
        let (client, server, description) = received.recv().unwrap();
        assert!(server.is_none());
        assert_eq!(description, small);
        assert!(same_socket(&client.unwrap(), &alone_peer));
        drop(handover);
        thread.join().unwrap();
    }

    #[test]
    fn a_description_over_the_bound_or_for_a_process_without_memfd_stays() {
        let runtime = runtime();
        let (client, _peer) = tcp_pair();
        let (handover, theirs) = channel(Accepts {
            listeners: false,
            memfd: true,
            ..Accepts::default()
        });
        let (thread, received) = receive_into(theirs);
        // Mapped lazily: zeroes cost no memory until read.
        let over = vec![0u8; MAX_DESCRIPTION + 1];
        assert!(!runtime.block_on(handover.send(client.as_fd(), None, &over)));
        assert!(runtime.block_on(handover.send(client.as_fd(), None, &over[..MAX_DESCRIPTION])));
        assert_eq!(received.recv().unwrap().2.len(), MAX_DESCRIPTION);
        drop(handover);
        thread.join().unwrap();

        // A new process of a version that reads no memfd gets what it always got.
        let (handover, theirs) = channel(Accepts::default());
        let (thread, received) = receive_into(theirs);
        assert!(!runtime.block_on(handover.send(client.as_fd(), None, &over[..MAX_MESSAGE + 1])));
        assert!(runtime.block_on(handover.send(client.as_fd(), None, &over[..MAX_MESSAGE])));
        assert_eq!(received.recv().unwrap().2.len(), MAX_MESSAGE);
        drop(handover);
        thread.join().unwrap();
    }

    #[test]
    fn a_malformed_memfd_message_closes_every_descriptor() {
        let (handover, theirs) = channel(Accepts::default());
        let (thread, received) = receive_into(theirs);
        let description = vec![7u8; 100_000];
        let send_raw = |message: &[u8], fds: &[RawFd]| {
            let channel = handover.channel.lock().unwrap();
            let rights = [ControlMessage::ScmRights(fds)];
            let sent = sendmsg::<()>(
                channel.as_ref().unwrap().as_raw_fd(),
                &[IoSlice::new(message)],
                &rights,
                MsgFlags::empty(),
                None,
            );
            assert_eq!(sent.unwrap(), message.len());
        };
        let eof = |mut peer: &std::net::TcpStream| {
            peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut byte = [0u8; 1];
            matches!(peer.read(&mut byte), Ok(0))
        };
        // Said: one socket, but two came before the memfd.
        let (client, client_peer) = tcp_pair();
        let (server, server_peer) = tcp_pair();
        let stored = large::store(&description, 1).unwrap();
        send_raw(
            &stored.message,
            &[client.as_raw_fd(), server.as_raw_fd(), stored.memfd.as_raw_fd()],
        );
        drop((client, server));
        assert!(eof(&client_peer) && eof(&server_peer), "both sockets are closed");
        // The length named is not the memfd's.
        let (client, client_peer) = tcp_pair();
        let mut message = large::store(&description, 1).unwrap();
        let at = message.message.len() - 2;
        message.message[at] ^= 1;
        send_raw(&message.message, &[client.as_raw_fd(), message.memfd.as_raw_fd()]);
        drop(client);
        assert!(eof(&client_peer));
        // A memfd message whose memfd is a socket.
        let (client, client_peer) = tcp_pair();
        let (other, other_peer) = tcp_pair();
        send_raw(&message.message, &[client.as_raw_fd(), other.as_raw_fd()]);
        drop((client, other));
        assert!(eof(&client_peer) && eof(&other_peer));
        drop(handover);
        thread.join().unwrap();
        assert!(received.try_recv().is_err(), "nothing was delivered");
    }

    #[test]
    fn a_stale_socket_is_replaced_and_a_file_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("takeover.sock");
        // A socket file nobody listens on any more.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = runtime.enter();
        let listener = bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(bind(&path), Err(TakeoverError::Live(_))));
        drop(listener);
        let file = dir.path().join("plain");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(bind(&file), Err(TakeoverError::NotSocket(_))));
    }
}
