//! A TCP relay between pgrelay and a real PostgreSQL server, configured as the database's
//! host. It decides what each new connection meets (the server, a close, a reset, or
//! silence), and it can hold back what pgrelay sends from the first message that contains
//! a given text: the test then ends that server session at exactly that moment, with
//! pgrelay's message outstanding, and lets the relay go on.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

/// What a new connection to the relay meets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accept {
    /// The server: bytes pass both ways.
    Forward,
    /// A close right after the connection is accepted, as from a server that goes away
    /// during the login.
    Close,
    /// A reset (RST) right after the connection is accepted.
    Reset,
    /// Nothing: the connection stays open and is never answered.
    Silent,
}

struct State {
    upstream: String,
    accept: Accept,
    /// Hold back pgrelay's bytes from the first message containing this (once).
    hold_on: Option<Vec<u8>>,
    /// Connections accepted in `Silent` mode, kept open until the relay is dropped.
    silent: Vec<TcpStream>,
    /// The relay's ports towards the server of the connections whose server side is
    /// still open.
    open: Vec<u16>,
    /// What each read from pgrelay's side brought, while recording.
    recorded: Option<Vec<Vec<u8>>>,
}

/// A relay listening on 127.0.0.1; stops accepting when dropped.
pub struct Relay {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    held: mpsc::UnboundedReceiver<Held>,
    accepting: tokio::task::JoinHandle<()>,
}

/// pgrelay's bytes held back from the message that contained the text.
pub struct Held {
    /// The relay's own port towards the server: the `client_port` of the server session
    /// in pg_stat_activity.
    pub server_side_port: u16,
    release: oneshot::Sender<()>,
}

impl Held {
    /// Sends the held bytes on, and whatever follows them.
    pub fn release(self) {
        let _ = self.release.send(());
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

impl Relay {
    /// A relay to `upstream` (`host:port`), forwarding.
    pub async fn start(upstream: &str) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            upstream: upstream.to_owned(),
            accept: Accept::Forward,
            hold_on: None,
            silent: Vec::new(),
            open: Vec::new(),
            recorded: None,
        }));
        let (held_tx, held) = mpsc::unbounded_channel();
        let accepting = tokio::spawn({
            let state = state.clone();
            async move {
                while let Ok((down, _)) = listener.accept().await {
                    tokio::spawn(serve(down, state.clone(), held_tx.clone()));
                }
            }
        });
        Relay {
            addr,
            state,
            held,
            accepting,
        }
    }

    /// What connections accepted from now on meet.
    pub fn set_accept(&self, accept: Accept) {
        self.state.lock().unwrap().accept = accept;
    }

    /// Holds back pgrelay's bytes from the first message (of any connection) that
    /// contains `text`; [`Relay::held`] tells when that happened.
    pub fn hold_on(&self, text: &[u8]) {
        self.state.lock().unwrap().hold_on = Some(text.to_vec());
    }

    /// Waits until a message was held back.
    pub async fn held(&mut self, within: Duration) -> Held {
        tokio::time::timeout(within, self.held.recv())
            .await
            .expect("pgrelay sent the awaited message")
            .expect("the relay runs")
    }

    /// The relay's ports towards the server (`client_port` in pg_stat_activity) of the
    /// connections whose server side is open, or whose closing pgrelay has not been told.
    /// A port leaves the list only once the relay has passed on the server's close, some
    /// time after the backend has left pg_stat_activity: a port listed may have no
    /// session any more.
    pub fn server_side_ports(&self) -> Vec<u16> {
        self.state.lock().unwrap().open.clone()
    }

    /// Keeps what each read from pgrelay's side (of any connection) brings, from now on:
    /// one entry per write pgrelay made, as far as loopback TCP keeps them apart.
    pub fn record(&self) {
        self.state.lock().unwrap().recorded = Some(Vec::new());
    }

    /// What was recorded since [`Relay::record`], which goes on.
    pub fn recorded(&self) -> Vec<Vec<u8>> {
        self.state
            .lock()
            .unwrap()
            .recorded
            .replace(Vec::new())
            .unwrap_or_default()
    }

    /// Drops the connections accepted in `Silent` mode.
    pub fn close_silent(&self) {
        self.state.lock().unwrap().silent.clear();
    }
}

async fn serve(down: TcpStream, state: Arc<Mutex<State>>, held: mpsc::UnboundedSender<Held>) {
    let (accept, upstream) = {
        let state = state.lock().unwrap();
        (state.accept, state.upstream.clone())
    };
    match accept {
        Accept::Close => drop(down),
        Accept::Reset => {
            let _ = down.set_zero_linger();
            drop(down);
        }
        Accept::Silent => state.lock().unwrap().silent.push(down),
        Accept::Forward => {
            let Ok(up) = TcpStream::connect(&upstream).await else {
                return;
            };
            let port = up.local_addr().unwrap().port();
            let _ = up.set_nodelay(true);
            let _ = down.set_nodelay(true);
            state.lock().unwrap().open.push(port);
            let (down_read, down_write) = down.into_split();
            let (up_read, up_write) = up.into_split();
            let to_pgrelay = async {
                pass(up_read, down_write).await;
                state.lock().unwrap().open.retain(|open| *open != port);
            };
            let to_server = to_server(down_read, up_write, port, &state, &held);
            tokio::join!(to_pgrelay, to_server);
        }
    }
}

/// Copies until end of stream or an error, then closes the other side for writing.
async fn pass(mut from: OwnedReadHalf, mut to: OwnedWriteHalf) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buffer[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown().await;
}

/// Forwards pgrelay's messages to the server, whole, holding back from the first one
/// that contains the awaited text until the test releases it.
async fn to_server(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    port: u16,
    state: &Mutex<State>,
    held: &mpsc::UnboundedSender<Held>,
) {
    let mut pending: Vec<u8> = Vec::new();
    // The SSLRequest and the startup message have no type byte.
    let mut untagged = true;
    let mut buffer = vec![0u8; 64 * 1024];
    let mut read_first = true;
    loop {
        if read_first {
            match from.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    pending.extend_from_slice(&buffer[..n]);
                    if let Some(recorded) = &mut state.lock().unwrap().recorded {
                        recorded.push(buffer[..n].to_vec());
                    }
                }
            }
        }
        read_first = true;
        let mut offset = 0;
        let mut hold = false;
        while let Some(len) = message_len(&pending[offset..], untagged) {
            let message = &pending[offset..offset + len];
            {
                let mut state = state.lock().unwrap();
                if let Some(text) = &state.hold_on
                    && message.windows(text.len()).any(|window| window == text.as_slice())
                {
                    state.hold_on = None;
                    hold = true;
                }
            }
            if hold {
                break;
            }
            if untagged {
                let code = u32::from_be_bytes([message[4], message[5], message[6], message[7]]);
                // SSLRequest and GSSENCRequest are followed by the startup message.
                untagged = matches!(code, 80_877_103 | 80_877_104);
            }
            offset += len;
        }
        if to.write_all(&pending[..offset]).await.is_err() {
            break;
        }
        pending.drain(..offset);
        if hold {
            let (release, released) = oneshot::channel();
            let _ = held.send(Held {
                server_side_port: port,
                release,
            });
            // Released, or the test let go of it: the bytes go on either way, framed
            // again from the held message on.
            let _ = released.await;
            read_first = false;
        }
    }
    let _ = to.shutdown().await;
}

/// The length of the whole message at the start of `bytes`, if it is all there.
fn message_len(bytes: &[u8], untagged: bool) -> Option<usize> {
    let (header, at) = if untagged { (4, 0) } else { (5, 1) };
    let len_bytes = bytes.get(at..at + 4)?;
    let len = u32::from_be_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]) as usize + at;
    (len >= header && bytes.len() >= len).then_some(len)
}
