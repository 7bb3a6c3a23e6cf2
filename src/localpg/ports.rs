//! Picks free loopback TCP ports for nodes.

use std::collections::HashSet;
use std::net::TcpListener;
use std::sync::{Mutex, PoisonError};

use super::error::{Error, Result};

/// Ports already given to a node in this process. The kernel may hand the same free port to two
/// clusters being built in parallel, since nothing holds it between our probe and the server's
/// bind; remembering them rules that out within one process (other processes are covered by
/// retrying a start that fails to bind).
static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A TCP port on 127.0.0.1 that was free a moment ago and was not given out before.
pub(super) fn free_port() -> Result<u16> {
    let mut handed = HANDED_OUT.lock().unwrap_or_else(PoisonError::into_inner);
    let handed = handed.get_or_insert_with(HashSet::new);
    for _ in 0..100 {
        let listener =
            TcpListener::bind("127.0.0.1:0").map_err(|e| Error::io("binding 127.0.0.1:0 to find a free port", e))?;
        let port = listener
            .local_addr()
            .map_err(|e| Error::io("reading the address of a probe socket", e))?
            .port();
        if handed.insert(port) {
            return Ok(port);
        }
    }
    Err(Error::io(
        "finding a free TCP port on 127.0.0.1",
        std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            "every port the kernel offered was already used by this process",
        ),
    ))
}
