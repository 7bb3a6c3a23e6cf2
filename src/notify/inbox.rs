//! One listening client's queue of notifications: filled by the listener task, emptied by
//! the client's session when the client is between transactions. Bounded in count and in
//! bytes, so a client that stops reading costs a bounded amount of memory: past either
//! bound the inbox overflows, takes nothing more, and the session ends the client.
//!
//! In a takeover the marker notification cuts the stream between two processes: the old
//! process's inbox is sealed at it (what follows is the new process's), the new process's
//! is cut at it (what came before was the old process's).

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};

use bytes::{Bytes, BytesMut};

/// Notifications one client may have waiting.
pub const MAX_QUEUED: usize = 1000;
/// Bytes of notifications one client may have waiting.
pub const MAX_QUEUED_BYTES: usize = 1 << 20;

/// What a push did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// The inbox is full (now or already): the notification is dropped.
    Overflowed,
    /// The inbox was sealed at a takeover marker: the notification is the new process's.
    Sealed,
}

#[derive(Debug, Default)]
struct Queue {
    items: VecDeque<Bytes>,
    bytes: usize,
    overflowed: bool,
    /// The listener connection was lost since the client last read: notifications may have
    /// been missed.
    gap: bool,
    /// Sealed at a takeover marker: takes nothing more.
    sealed: bool,
    /// Cut at a takeover marker: holds only what came after it.
    cut: bool,
}

/// The queue and the wake-up of its session.
#[derive(Debug, Default)]
pub struct Inbox {
    queue: Mutex<Queue>,
    /// Woken on every push and gap; holds a permit if nobody waits.
    ready: tokio::sync::Notify,
    /// Woken when the inbox overflows; holds a permit if nobody waits.
    overflow: tokio::sync::Notify,
    /// Woken when the inbox is sealed or cut; holds a permit if nobody waits.
    marked: tokio::sync::Notify,
}

impl Inbox {
    /// Queues one NotificationResponse (the whole message, as the server sent it).
    pub fn push(&self, message: &Bytes) -> Pushed {
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        if queue.sealed {
            return Pushed::Sealed;
        }
        if queue.overflowed {
            return Pushed::Overflowed;
        }
        if queue.items.len() >= MAX_QUEUED || queue.bytes + message.len() > MAX_QUEUED_BYTES {
            queue.overflowed = true;
            drop(queue);
            self.overflow.notify_one();
            return Pushed::Overflowed;
        }
        queue.bytes += message.len();
        queue.items.push_back(message.clone());
        drop(queue);
        self.ready.notify_one();
        Pushed::Queued
    }

    /// Notes that notifications may have been lost (the listener connection went away).
    pub fn mark_gap(&self) {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner).gap = true;
        self.ready.notify_one();
    }

    /// Takes nothing more: what follows the takeover marker is for the new process.
    pub fn seal(&self) {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner).sealed = true;
        self.marked.notify_one();
    }

    /// Drops what is queued: it came before the takeover marker, and the old process
    /// delivers it. So did what an overflow dropped: the inbox takes notifications again.
    /// A gap stays: a lost listener connection may have lost later ones too.
    pub fn cut(&self) {
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        queue.items.clear();
        queue.bytes = 0;
        queue.overflowed = false;
        queue.cut = true;
        drop(queue);
        self.marked.notify_one();
    }

    /// Waits until the inbox is sealed. Cancel-safe.
    pub async fn wait_sealed(&self) {
        while !self.queue.lock().unwrap_or_else(PoisonError::into_inner).sealed {
            self.marked.notified().await;
        }
    }

    /// Waits until the inbox is cut. Cancel-safe.
    pub async fn wait_cut(&self) {
        while !self.queue.lock().unwrap_or_else(PoisonError::into_inner).cut {
            self.marked.notified().await;
        }
    }

    /// Waits until something may be there to take (a permit left by an earlier push
    /// counts). Cancel-safe.
    pub async fn ready(&self) {
        self.ready.notified().await;
    }

    /// Whether the inbox overflowed: its client is to be disconnected.
    pub fn overflowed(&self) -> bool {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner).overflowed
    }

    /// Waits until the inbox overflows. Cancel-safe.
    pub async fn wait_overflow(&self) {
        while !self.overflowed() {
            self.overflow.notified().await;
        }
    }

    /// Moves the queued notifications to `out` (after whole messages only), the gap first
    /// as `gap(out)`. Returns how many notifications were moved.
    pub fn drain_into(&self, out: &mut BytesMut, gap: impl FnOnce(&mut BytesMut)) -> usize {
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        if std::mem::take(&mut queue.gap) {
            gap(out);
        }
        let moved = queue.items.len();
        out.reserve(queue.bytes);
        for item in queue.items.drain(..) {
            out.extend_from_slice(&item);
        }
        queue.bytes = 0;
        moved
    }

    /// Whether anything (a notification or a gap) waits to go to the client.
    pub fn has_pending(&self) -> bool {
        let queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        !queue.items.is_empty() || queue.gap
    }

    /// Notifications still queued (dropped when the client leaves).
    pub fn queued(&self) -> usize {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner).items.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflows_at_the_count_bound_and_takes_nothing_more() {
        let inbox = Inbox::default();
        let message = Bytes::from_static(b"A\0\0\0\x0e\0\0\0\x01ch\0p\0");
        for _ in 0..MAX_QUEUED {
            assert_eq!(inbox.push(&message), Pushed::Queued);
        }
        assert!(!inbox.overflowed());
        assert_eq!(inbox.push(&message), Pushed::Overflowed);
        assert!(inbox.overflowed());
        let mut out = BytesMut::new();
        assert_eq!(inbox.drain_into(&mut out, |_| {}), MAX_QUEUED);
        assert_eq!(inbox.push(&message), Pushed::Overflowed, "an overflowed inbox stays so");
    }

    #[test]
    fn overflows_at_the_byte_bound() {
        let inbox = Inbox::default();
        let big = Bytes::from(vec![b'x'; MAX_QUEUED_BYTES / 2]);
        assert_eq!(inbox.push(&big), Pushed::Queued);
        assert_eq!(inbox.push(&big), Pushed::Queued);
        assert_eq!(inbox.push(&Bytes::from_static(b"y")), Pushed::Overflowed);
    }

    #[test]
    fn a_sealed_inbox_takes_nothing_more_and_a_cut_one_keeps_what_follows() {
        let sealed = Inbox::default();
        sealed.push(&Bytes::from_static(b"1"));
        sealed.seal();
        assert_eq!(sealed.push(&Bytes::from_static(b"2")), Pushed::Sealed);
        let mut out = BytesMut::new();
        sealed.drain_into(&mut out, |_| {});
        assert_eq!(&out[..], b"1");

        let cut = Inbox::default();
        for _ in 0..=MAX_QUEUED {
            cut.push(&Bytes::from_static(b"1"));
        }
        assert!(cut.overflowed());
        cut.cut();
        assert!(!cut.overflowed(), "what overflowed came before the marker");
        cut.push(&Bytes::from_static(b"2"));
        let mut out = BytesMut::new();
        cut.drain_into(&mut out, |_| {});
        assert_eq!(&out[..], b"2");
    }

    #[test]
    fn the_gap_comes_before_the_notifications() {
        let inbox = Inbox::default();
        inbox.mark_gap();
        inbox.push(&Bytes::from_static(b"n"));
        let mut out = BytesMut::new();
        inbox.drain_into(&mut out, |out| out.extend_from_slice(b"gap,"));
        assert_eq!(&out[..], b"gap,n");
        assert!(!inbox.has_pending());
    }
}
