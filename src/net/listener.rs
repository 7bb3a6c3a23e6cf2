//! The client-facing listening socket (SO_REUSEPORT, so several pgrelay processes can
//! share one port) and accepting connections from it.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug)]
pub struct Listener {
    inner: TcpListener,
}

/// Binds `addr` with SO_REUSEADDR and SO_REUSEPORT set.
pub fn bind(addr: SocketAddr) -> io::Result<Listener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(Listener {
        inner: TcpListener::from_std(socket.into())?,
    })
}

impl Listener {
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    /// Accepts one connection, with Nagle's algorithm off: pgrelay batches its writes.
    pub async fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        let (stream, peer) = self.inner.accept().await?;
        stream.set_nodelay(true)?;
        Ok((stream, peer))
    }
}
