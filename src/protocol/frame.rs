//! Framing: splitting a byte stream into whole messages (tag, length, body) after the
//! startup phase, with the length checked against a limit before any allocation.

use bytes::{Bytes, BytesMut};

use super::ProtocolError;

/// Tag byte plus the four-byte length.
pub const HEADER_LEN: usize = 5;

/// The header of one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub tag: u8,
    /// Length on the wire, tag byte included.
    pub len: usize,
}

impl Header {
    /// Reads the header at the front of `buf`, if all five bytes are there.
    pub fn peek(buf: &[u8]) -> Result<Option<Header>, ProtocolError> {
        let Some(&[tag, a, b, c, d]) = buf.get(..HEADER_LEN) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([a, b, c, d]);
        // The length counts itself; above i32::MAX it cannot come from a sane peer.
        if len < 4 || len > i32::MAX as u32 {
            return Err(ProtocolError::BadLength { tag, len });
        }
        Ok(Some(Header {
            tag,
            len: 1 + len as usize,
        }))
    }

    pub fn body_len(&self) -> usize {
        self.len - HEADER_LEN
    }
}

/// One whole message as it came off the wire: tag, length and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    bytes: Bytes,
}

impl Frame {
    pub fn tag(&self) -> u8 {
        self.bytes[0]
    }

    pub fn body(&self) -> &[u8] {
        &self.bytes[HEADER_LEN..]
    }

    /// The whole message, header included, ready to be forwarded unchanged.
    pub fn as_bytes(&self) -> &Bytes {
        &self.bytes
    }

    pub fn into_bytes(self) -> Bytes {
        self.bytes
    }

    /// Wraps bytes that are known to hold exactly one message.
    pub fn from_bytes(bytes: Bytes) -> Result<Frame, ProtocolError> {
        match Header::peek(&bytes)? {
            Some(header) if header.len == bytes.len() => Ok(Frame { bytes }),
            _ => Err(ProtocolError::Malformed("message framing")),
        }
    }
}

/// Takes one complete message off the front of `buf`.
///
/// `Ok(None)` means more bytes are needed; `buf` then has room reserved for the whole
/// message, so the caller's next read can complete it. A message longer than `limit`
/// is refused before anything is reserved for it.
pub fn split_frame(buf: &mut BytesMut, limit: usize) -> Result<Option<Frame>, ProtocolError> {
    let Some(header) = Header::peek(buf)? else {
        return Ok(None);
    };
    if header.len > limit {
        return Err(ProtocolError::TooLarge {
            tag: header.tag,
            len: header.len,
            limit,
        });
    }
    if buf.len() < header.len {
        buf.reserve(header.len - buf.len());
        return Ok(None);
    }
    Ok(Some(Frame {
        bytes: buf.split_to(header.len).freeze(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn splits_whole_messages_and_waits_for_partial_ones() {
        let mut bytes = message(b'Q', b"SELECT 1\0");
        bytes.extend_from_slice(&message(b'S', b""));
        let mut buf = BytesMut::from(&bytes[..bytes.len() - 2]);
        let first = split_frame(&mut buf, 1024).unwrap().unwrap();
        assert_eq!(first.tag(), b'Q');
        assert_eq!(first.body(), b"SELECT 1\0");
        assert_eq!(split_frame(&mut buf, 1024).unwrap(), None);
        buf.extend_from_slice(&bytes[bytes.len() - 2..]);
        let second = split_frame(&mut buf, 1024).unwrap().unwrap();
        assert_eq!(second.tag(), b'S');
        assert!(second.body().is_empty());
        assert!(buf.is_empty());
    }

    #[test]
    fn refuses_oversized_and_impossible_lengths() {
        let mut buf = BytesMut::from(&message(b'Q', &[b'x'; 100])[..]);
        assert!(matches!(
            split_frame(&mut buf, 50),
            Err(ProtocolError::TooLarge {
                tag: b'Q',
                len: 105,
                limit: 50
            })
        ));
        let mut buf = BytesMut::from(&[b'Q', 0, 0, 0, 3][..]);
        assert!(matches!(
            split_frame(&mut buf, 50),
            Err(ProtocolError::BadLength { .. })
        ));
        let mut buf = BytesMut::from(&[b'Q', 0xff, 0xff, 0xff, 0xff][..]);
        assert!(matches!(
            split_frame(&mut buf, usize::MAX),
            Err(ProtocolError::BadLength { .. })
        ));
    }

    proptest! {
        /// Any bytes: no panic, no reservation beyond the limit, and frames that come
        /// out are exactly what their headers say.
        #[test]
        fn arbitrary_bytes_never_panic_or_overallocate(input in proptest::collection::vec(any::<u8>(), 0..2048), limit in 5usize..4096) {
            let mut buf = BytesMut::from(&input[..]);
            let start_capacity = buf.capacity();
            while let Ok(Some(frame)) = split_frame(&mut buf, limit) {
                prop_assert!(frame.as_bytes().len() <= limit);
                prop_assert_eq!(frame.as_bytes().len(), frame.body().len() + HEADER_LEN);
            }
            prop_assert!(buf.capacity() <= start_capacity.max(limit));
        }
    }
}
