//! A small stock of I/O buffers per worker thread: a client takes buffers when its traffic
//! begins and gives them back when it goes idle, so an idle client holds none and a busy
//! one does not allocate them again for every transaction.
//!
//! The stock is thread-local (no lock, no atomic); a buffer taken on one worker and given
//! back on another just moves between stocks. Each stock is bounded, so what the busiest
//! moment took is not kept for ever.

use std::cell::RefCell;

use bytes::BytesMut;

/// Capacity of a buffer from the stock.
pub const BUFFER_SIZE: usize = 8 * 1024;

/// Buffers kept per thread: enough for the clients one worker serves at the same instant
/// under load, little enough (256 KiB) to matter nothing once the load is gone.
const KEPT: usize = 32;

/// Larger buffers (grown for a large message) are freed rather than kept.
const LARGEST_KEPT: usize = 4 * BUFFER_SIZE;

thread_local! {
    static STOCK: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

/// An empty buffer with room for at least [`BUFFER_SIZE`] bytes.
pub fn take() -> BytesMut {
    STOCK
        .try_with(|stock| stock.borrow_mut().pop())
        .ok()
        .flatten()
        .unwrap_or_else(|| BytesMut::with_capacity(BUFFER_SIZE))
}

/// Gives `buf` back if it is empty, and leaves an empty buffer without capacity in its
/// place. A buffer that still holds bytes is left as it is.
pub fn give_back(buf: &mut BytesMut) {
    if !buf.is_empty() || buf.capacity() == 0 {
        return;
    }
    let mut buf = std::mem::take(buf);
    // Only a buffer that owns its whole allocation again (no view of it lives on
    // elsewhere) and that is not oversized goes back; `try_reclaim` makes all of its
    // capacity usable from the start again without allocating.
    if buf.capacity() > LARGEST_KEPT || !buf.try_reclaim(BUFFER_SIZE) {
        return;
    }
    let _ = STOCK.try_with(|stock| {
        let mut stock = stock.borrow_mut();
        if stock.len() < KEPT {
            stock.push(buf);
        }
    });
}

/// Makes `buf` a stock buffer if it has no capacity yet.
pub fn ensure(buf: &mut BytesMut) {
    if buf.capacity() == 0 {
        *buf = take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_given_back_buffer_is_taken_again_without_allocating() {
        let mut buf = take();
        buf.extend_from_slice(b"hello");
        let pointer = buf.as_ptr();
        buf.clear();
        give_back(&mut buf);
        assert_eq!(buf.capacity(), 0);
        let again = take();
        assert_eq!(again.as_ptr(), pointer);
        assert!(again.capacity() >= BUFFER_SIZE);
    }

    #[test]
    fn a_buffer_still_shared_or_holding_bytes_is_not_kept() {
        let mut full = take();
        full.extend_from_slice(b"x");
        give_back(&mut full);
        assert_eq!(&full[..], b"x");

        let mut shared = take();
        shared.extend_from_slice(b"abc");
        let view = shared.split_to(3);
        give_back(&mut shared);
        assert_eq!(shared.capacity(), 0);
        // The view keeps the allocation: it was not put in the stock.
        let other = take();
        assert_ne!(other.as_ptr(), view.as_ptr());
    }
}
