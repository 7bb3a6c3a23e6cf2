//! The client-facing network side: the listener and the client byte stream.

mod listener;
mod stream;

pub use listener::{Listener, bind};
pub use stream::ClientStream;
