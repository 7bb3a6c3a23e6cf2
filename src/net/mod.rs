//! The network side: the listener, the client byte stream, and TLS towards clients and
//! servers.

pub mod buffers;
mod client;
mod listener;
mod stream;
mod tls;

pub use client::{ClientConn, ClientReadError, poll_write_buffer, reserve_for_read};
pub use listener::{Listener, apply_tcp_options, bind};
pub use stream::ClientStream;
pub use tls::{ClientTls, ServerTls, TlsError};
