//! The client-facing network side: the listener and the client byte stream.

mod client;
mod listener;
mod stream;

pub use client::{ClientConn, ClientReadError, poll_write_buffer, reserve_for_read};
pub use listener::{Listener, bind};
pub use stream::ClientStream;
