//! The client-facing listening socket (SO_REUSEPORT, so several pgrelay processes can
//! share one port) and accepting connections from it.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::net::{TcpListener, TcpStream};

/// Sets keepalives and the user timeout (`[server] tcp_*`) on a client or server socket.
pub fn apply_tcp_options(stream: &impl std::os::fd::AsFd, options: &crate::config::TcpOptions) -> io::Result<()> {
    let socket = SockRef::from(stream);
    match options.keepalive_idle {
        Some(idle) => {
            // Probes every third of the idle time, five of them: a vanished peer is
            // found about idle × 1.6 after it went quiet.
            let interval = (idle / 3).max(std::time::Duration::from_secs(1));
            socket.set_tcp_keepalive(
                &TcpKeepalive::new()
                    .with_time(idle)
                    .with_interval(interval)
                    .with_retries(5),
            )?;
        }
        None => socket.set_keepalive(false)?,
    }
    socket.set_tcp_user_timeout(options.user_timeout)?;
    Ok(())
}

#[derive(Debug)]
pub struct Listener {
    inner: TcpListener,
}

/// Binds `addr` with SO_REUSEADDR and SO_REUSEPORT set; SO_REUSEPORT only for a port
/// named in the configuration.
pub fn bind(addr: SocketAddr) -> io::Result<Listener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    // Port 0 asks the kernel for a free port; with SO_REUSEPORT, Linux may hand out one
    // that another SO_REUSEPORT listener of the same user already has, and the two would
    // then share its connections. Sharing is only meant for a port named on purpose.
    if addr.port() != 0 {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(Listener {
        inner: TcpListener::from_std(socket.into())?,
    })
}

impl Listener {
    /// A listener on a socket bound elsewhere (handed over by the process pgrelay took
    /// over from).
    pub fn from_std(listener: std::net::TcpListener) -> io::Result<Listener> {
        listener.set_nonblocking(true)?;
        Ok(Listener {
            inner: TcpListener::from_std(listener)?,
        })
    }

    /// A second descriptor of the listening socket, to hand to a new process.
    pub fn try_clone_fd(&self) -> io::Result<std::os::fd::OwnedFd> {
        std::os::fd::AsFd::as_fd(&self.inner).try_clone_to_owned()
    }

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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::TcpOptions;

    #[tokio::test]
    async fn keepalive_and_user_timeout_are_set_or_turned_off() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let options = TcpOptions {
            keepalive_idle: Some(Duration::from_secs(42)),
            user_timeout: Some(Duration::from_secs(7)),
        };
        apply_tcp_options(&client, &options).unwrap();
        let socket = SockRef::from(&client);
        assert!(socket.keepalive().unwrap());
        assert_eq!(socket.tcp_keepalive_time().unwrap(), Duration::from_secs(42));
        assert_eq!(socket.tcp_keepalive_interval().unwrap(), Duration::from_secs(14));
        assert_eq!(socket.tcp_user_timeout().unwrap(), Some(Duration::from_secs(7)));
        let off = TcpOptions {
            keepalive_idle: None,
            user_timeout: None,
        };
        apply_tcp_options(&client, &off).unwrap();
        assert!(!socket.keepalive().unwrap());
        assert_eq!(socket.tcp_user_timeout().unwrap(), None);
    }
}
