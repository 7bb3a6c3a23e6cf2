//! The network side: the listener, the client byte stream, and TLS towards clients and
//! servers (with the TLS 1.3 and 1.2 record layers for connections continued after a takeover,
//! client and server connections alike).

pub mod apart;
pub mod buffers;
mod client;
mod listener;
pub mod record;
mod stream;
mod tls;
mod transport;

pub use client::{ClientConn, ClientReadError, poll_write_buffer, reserve_for_read};
pub use listener::{Listener, apply_tcp_options, bind};
pub use stream::ClientStream;
pub use tls::{ClientTls, CommonNameError, ServerTls, TlsError, certificate_common_name};
pub use transport::TlsTransport;
