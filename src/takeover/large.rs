//! Client descriptions too large for one message of the client channel: the description is
//! written to a memfd, whose descriptor travels after the client's (and its server's) in a
//! short message that says so, and the new process reads it back from there.
//!
//! A `SOCK_SEQPACKET` message must fit the sender's socket buffer (about 208 KiB by
//! default, shared by every message not read yet), while a client's prepared statements
//! may take megabytes (an ORM's statement cache). A memfd holds any size in memory, is
//! passed like a socket, and needs no file system path.

use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;

use nix::sys::memfd::{MFdFlags, memfd_create};

/// Marks a message whose description is in the memfd that comes last with it.
const LARGE: &[u8] = b"pgrelay-memfd/1";
/// A description larger than this goes in a memfd; smaller ones travel in the message, as
/// they always did. A third of the default socket buffer: a few of them fit at once.
pub const INLINE_DESCRIPTION: usize = 64 * 1024;
/// The largest description handed over at all; a client whose description is larger
/// finishes on the old process. Far above what a client can prepare (16 MiB of statement
/// text, `max_client_prepared_statements` names), yet a bound on what the new process
/// reads into memory.
pub const MAX_DESCRIPTION: usize = 64 * 1024 * 1024;

/// A description put in a memfd, and the message that goes with it.
pub struct Stored {
    pub memfd: OwnedFd,
    pub message: Vec<u8>,
}

/// Writes `description` to a new memfd; `sockets` is the number of sockets sent before the
/// memfd in the same message (0 for a listener's announcement, 1 or 2 for a client).
pub fn store(description: &[u8], sockets: u8) -> io::Result<Stored> {
    if description.len() > MAX_DESCRIPTION {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "description too large"));
    }
    let memfd = memfd_create(c"pgrelay-client", MFdFlags::MFD_CLOEXEC).map_err(io::Error::from)?;
    let mut file = std::fs::File::from(memfd);
    // A copy into memory, on the session's task like the encoding that made the
    // description: no disk is involved.
    file.write_all(description)?;
    let mut message = LARGE.to_vec();
    message.extend_from_slice(&(description.len() as u64).to_be_bytes());
    message.push(sockets);
    Ok(Stored {
        memfd: file.into(),
        message,
    })
}

/// The number of sockets a message says come before its memfd, and the length of the
/// description in it; `None` if the message is not one of these.
pub fn parse(message: &[u8]) -> Option<(usize, usize)> {
    let rest = message.strip_prefix(LARGE)?;
    let (length, sockets) = rest.split_first_chunk::<8>()?;
    let [sockets] = sockets else { return None };
    let length = usize::try_from(u64::from_be_bytes(*length)).ok()?;
    Some((usize::from(*sockets), length))
}

/// Whether `message` is meant to be one of these (then anything wrong with it is an error,
/// not a description).
pub fn is_large(message: &[u8]) -> bool {
    message.starts_with(LARGE)
}

/// Reads the description of `length` bytes from `memfd`, which is closed afterwards: a
/// regular file of exactly that length, no larger than [`MAX_DESCRIPTION`].
pub fn load(memfd: OwnedFd, length: usize) -> io::Result<Vec<u8>> {
    if length > MAX_DESCRIPTION {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "description too large"));
    }
    let file = std::fs::File::from(memfd);
    let metadata = file.metadata()?;
    if !metadata.is_file() || metadata.len() != length as u64 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the memfd is not a file of the length announced",
        ));
    }
    let mut description = vec![0u8; length];
    // From the start: the sender's writes left the shared file offset at the end.
    file.read_exact_at(&mut description, 0)?;
    Ok(description)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_description_loads_back_and_a_wrong_length_is_refused() {
        let description: Vec<u8> = (0..300_000u32).map(|at| at as u8).collect();
        let stored = store(&description, 2).unwrap();
        assert_eq!(parse(&stored.message), Some((2, description.len())));
        let again = stored.memfd.try_clone().unwrap();
        assert_eq!(load(stored.memfd, description.len()).unwrap(), description);
        assert!(load(again, description.len() - 1).is_err());
        assert!(store(&vec![0; MAX_DESCRIPTION + 1], 1).is_err());
        assert_eq!(parse(b"pgrelay-memfd/1"), None);
        assert_eq!(parse(&[LARGE, &[0; 10]].concat()), None);
        assert!(!is_large(b"pgrelay-client/2"));
    }
}
