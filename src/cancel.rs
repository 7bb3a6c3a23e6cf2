//! Cancel keys: the (process id, secret) pairs pgrelay gives its clients, and the
//! forwarding of a client's CancelRequest to the server running that client's query.
//!
//! A cancel is forwarded only while the client is attached to a server, and the server
//! is not handed to anyone else until every cancel sent to it has been delivered: a
//! late cancel can therefore never hit another client's query. A cancel that arrives
//! while the client waits for a server ends the wait instead. The client's cancel
//! connection is closed only once the cancel has been delivered, as PostgreSQL closes it
//! only once it has signalled the backend: a client that waits for that before its next
//! statement (asyncpg does, after the CopyFail of an aborted COPY) never has that
//! statement cancelled instead.
//!
//! A key names the instance that gave it out (see [`key_layout`]), so that an instance
//! behind the same load balancer can send a cancel it cannot place to its peers
//! ([`forward`]).

pub mod forward;

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use dashmap::DashMap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::protocol::startup::CancelKey;
use crate::upstream::BackendKey;

/// How long pgrelay tries to deliver one cancel to a server.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(5);

/// The process id of the BackendKeyData pgrelay gives a client (protocol 3.0: a 4-byte
/// process id and a 4-byte secret):
///
/// ```text
/// process id  bit 31      0 in every key given out; set only on a cancel forwarded by a peer
///             bits 30-23  instance_id of the instance that gave the key out
///             bits 22-0   random, never 0
/// secret      32 bits     random
/// ```
///
/// 55 random bits in all; what makes a key unguessable is the 32-bit secret, checked in
/// constant time, as PostgreSQL's own (whose process id is no secret at all). Bit 31 stays
/// 0 in keys so that the process id is positive, as a PostgreSQL backend's is.
pub mod key_layout {
    /// Set by an instance on the cancels it forwards: the receiving instance applies such
    /// a cancel or drops it, and never forwards it again.
    pub const FORWARDED: u32 = 1 << 31;
    const INSTANCE_SHIFT: u32 = 23;
    const RANDOM_MASK: u32 = (1 << INSTANCE_SHIFT) - 1;

    /// A process id for `instance` from `random` (its low 23 bits); `None` when those are 0.
    pub fn process_id(instance: u8, random: u32) -> Option<u32> {
        let random = random & RANDOM_MASK;
        (random != 0).then_some((u32::from(instance) << INSTANCE_SHIFT) | random)
    }

    /// The instance that gave out a key with this process id.
    pub fn instance_of(process_id: u32) -> u8 {
        // Eight bits by the mask: the cast cannot truncate.
        ((process_id & !FORWARDED) >> INSTANCE_SHIFT) as u8
    }
}

/// Where a client's running query can be cancelled.
#[derive(Debug, Clone)]
pub struct CancelTarget {
    pub addr: Arc<str>,
    pub key: BackendKey,
}

#[derive(Debug)]
struct Slot {
    secret: u32,
    /// Cancels that arrived while the client was not attached to a server: a change tells
    /// a client waiting for a server that it was cancelled.
    unattached_cancels: AtomicU32,
    target: Mutex<Option<CancelTarget>>,
    /// Cancels being delivered to the current target.
    in_flight: AtomicUsize,
    /// Woken when a delivery ends and when a cancel arrives unattached. One for both, as
    /// every client holds one: each waiter checks the count it waits on and waits again
    /// when the change was not its own.
    changed: Notify,
}

impl Slot {
    fn new(secret: u32) -> Slot {
        Slot {
            secret,
            unattached_cancels: AtomicU32::new(0),
            target: Mutex::new(None),
            in_flight: AtomicUsize::new(0),
            changed: Notify::new(),
        }
    }
}

/// Every connected client's cancel key.
#[derive(Debug, Default)]
pub struct CancelRegistry {
    slots: DashMap<u32, Arc<Slot>>,
    /// Put in every key given out; fixed for the life of the process.
    instance_id: u8,
}

impl CancelRegistry {
    /// Frees the room the map kept for clients that are gone.
    pub fn shrink(&self) {
        self.slots.shrink_to_fit();
    }

    pub fn new(instance_id: u8) -> CancelRegistry {
        CancelRegistry {
            slots: DashMap::new(),
            instance_id,
        }
    }

    /// The id this instance puts in its keys.
    pub fn instance_id(&self) -> u8 {
        self.instance_id
    }

    /// Gives a new client a unique key; the key is freed when the handle is dropped.
    ///
    /// 2^23 process ids per instance: at 100,000 connected clients a new one is free at the
    /// first draw 99 times in 100.
    pub fn register(self: &Arc<Self>) -> CancelHandle {
        loop {
            let Some(process_id) = key_layout::process_id(self.instance_id, rand::random()) else {
                continue;
            };
            let slot = Arc::new(Slot::new(rand::random()));
            if let dashmap::Entry::Vacant(entry) = self.slots.entry(process_id) {
                entry.insert(slot.clone());
                return CancelHandle {
                    registry: self.clone(),
                    process_id,
                    slot,
                };
            }
        }
    }

    /// Registers a key given out by the process this one took over from, for a client
    /// handed over from it; `None` if a client here already has that process id.
    pub fn register_key(self: &Arc<Self>, process_id: u32, secret: u32) -> Option<CancelHandle> {
        let slot = Arc::new(Slot::new(secret));
        match self.slots.entry(process_id) {
            dashmap::Entry::Vacant(entry) => {
                entry.insert(slot.clone());
                Some(CancelHandle {
                    registry: self.clone(),
                    process_id,
                    slot,
                })
            }
            dashmap::Entry::Occupied(_) => None,
        }
    }

    /// Applies a CancelRequest for a client of this instance, returning once it has been
    /// delivered (or given up on); false when no client here holds the key. The caller
    /// says nothing to the sender either way, as PostgreSQL does, so keys cannot be probed.
    pub async fn cancel(&self, key: &CancelKey) -> bool {
        let Some(slot) = self.slots.get(&key.process_id).map(|slot| slot.clone()) else {
            return false;
        };
        if !constant_time_eq(&slot.secret.to_be_bytes(), &key.secret) {
            return false;
        }
        let target = match slot.target.lock() {
            Ok(target) => {
                // Counted while the lock is held, so that a detach (which clears the
                // target under the same lock, then waits for the count) cannot give the
                // server back in between: the server stays with this client until
                // delivery is over, and a cancel never reaches the next client's query.
                // Likewise a cancel that finds no target counts itself before the lock
                // is released: counted later, it could end a wait the client began only
                // afterwards, for its next query.
                if target.is_some() {
                    slot.in_flight.fetch_add(1, Ordering::AcqRel);
                } else {
                    slot.unattached_cancels.fetch_add(1, Ordering::AcqRel);
                }
                target.clone()
            }
            Err(_) => return true,
        };
        let Some(target) = target else {
            slot.changed.notify_waiters();
            return true;
        };
        // A task of its own: the count goes down even if the client hangs up first.
        let delivery = tokio::spawn(async move {
            if let Err(error) = tokio::time::timeout(DELIVERY_TIMEOUT, deliver(&target)).await {
                tracing::warn!(server = %target.addr, %error, "cancel request was not delivered in time");
            }
            slot.in_flight.fetch_sub(1, Ordering::AcqRel);
            slot.changed.notify_waiters();
        });
        let _ = delivery.await;
        true
    }
}

/// Sends a CancelRequest to `target` in the background (query_timeout): the statement
/// running there ends with 57014, if the server still answers.
pub fn cancel_in_background(target: CancelTarget) {
    tokio::spawn(async move {
        if tokio::time::timeout(DELIVERY_TIMEOUT, deliver(&target)).await.is_err() {
            tracing::warn!(server = %target.addr, "cancel request was not delivered in time");
        }
    });
}

/// Sends a CancelRequest to the server and waits until the server closes the socket,
/// which it does after it has signalled the backend.
///
/// Always in plaintext, even to servers reached over TLS: PostgreSQL takes a
/// CancelRequest before any encryption or pg_hba check (hostssl-only servers included),
/// and libpq before 17 never sends it any other way. It carries only the key.
async fn deliver(target: &CancelTarget) {
    let result = async {
        let stream = TcpStream::connect(&*target.addr).await?;
        send_cancel(stream, target.key.process_id, &target.key.secret).await
    }
    .await;
    if let Err(error) = result {
        tracing::warn!(server = %target.addr, %error, "could not deliver a cancel request");
    }
}

/// Writes a CancelRequest on `stream` and waits until the other side closes it.
pub(crate) async fn send_cancel(mut stream: TcpStream, process_id: u32, secret: &[u8]) -> std::io::Result<()> {
    let mut packet = BytesMut::with_capacity(12 + secret.len());
    // At most 12 + 256 bytes: the parser refuses longer secrets.
    packet.extend_from_slice(&u32::try_from(12 + secret.len()).unwrap_or(u32::MAX).to_be_bytes());
    packet.extend_from_slice(&80_877_102u32.to_be_bytes());
    packet.extend_from_slice(&process_id.to_be_bytes());
    packet.extend_from_slice(secret);
    stream.write_all(&packet).await?;
    let mut sink = [0u8; 64];
    while stream.read(&mut sink).await? > 0 {}
    Ok(())
}

fn constant_time_eq(expected: &[u8], given: &[u8]) -> bool {
    expected.len() == given.len() && expected.iter().zip(given).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

/// One client's cancel key, held for as long as the client is connected.
#[derive(Debug)]
pub struct CancelHandle {
    registry: Arc<CancelRegistry>,
    process_id: u32,
    slot: Arc<Slot>,
}

impl CancelHandle {
    pub fn process_id(&self) -> u32 {
        self.process_id
    }

    pub fn secret(&self) -> u32 {
        self.slot.secret
    }

    /// The client is now attached to this server: cancels go there.
    pub fn attach(&self, target: CancelTarget) {
        if let Ok(mut slot) = self.slot.target.lock() {
            *slot = Some(target);
        }
    }

    /// The client is about to give its server back: no new cancel will be sent, and
    /// this returns once the ones already on their way have been delivered.
    pub async fn detach(&self) {
        if let Ok(mut slot) = self.slot.target.lock() {
            *slot = None;
        }
        loop {
            let delivered = self.slot.changed.notified();
            tokio::pin!(delivered);
            delivered.as_mut().enable();
            if self.slot.in_flight.load(Ordering::Acquire) == 0 {
                return;
            }
            delivered.await;
        }
    }

    /// How many cancels have arrived while the client was not attached to a server: what
    /// [`CancelHandle::cancelled_while_waiting`] compares against.
    pub fn unattached_cancels(&self) -> u32 {
        self.slot.unattached_cancels.load(Ordering::Acquire)
    }

    /// Resolves when a cancel arrives while the client is not attached to a server, once
    /// the count has moved past `seen` (taken when the wait began, so a wait polled anew
    /// in a loop misses none). A cancel sent while the client is idle is not remembered
    /// for its next query.
    pub async fn cancelled_while_waiting(&self, seen: u32) {
        loop {
            let changed = self.slot.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.slot.unattached_cancels.load(Ordering::Acquire) != seen {
                return;
            }
            changed.await;
        }
    }
}

impl Drop for CancelHandle {
    fn drop(&mut self) {
        self.registry.slots.remove(&self.process_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keys_are_unique_and_freed() {
        let registry = Arc::new(CancelRegistry::default());
        let a = registry.register();
        let b = registry.register();
        assert_ne!(a.process_id(), b.process_id());
        assert_eq!(registry.slots.len(), 2);
        drop(a);
        assert_eq!(registry.slots.len(), 1);
    }

    #[tokio::test]
    async fn keys_carry_the_instance_id_and_stay_positive() {
        for instance in [0u8, 1, 77, 255] {
            let registry = Arc::new(CancelRegistry::new(instance));
            for _ in 0..200 {
                let handle = registry.register();
                let pid = handle.process_id();
                assert_eq!(key_layout::instance_of(pid), instance);
                assert_eq!(pid & key_layout::FORWARDED, 0, "{pid:#x}");
                assert_ne!(pid & ((1 << 23) - 1), 0, "{pid:#x}");
                assert_eq!(key_layout::instance_of(pid | key_layout::FORWARDED), instance);
            }
        }
        assert_eq!(key_layout::process_id(3, 0), None);
        assert_eq!(key_layout::process_id(3, 1 << 23), None, "only the low 23 bits count");
        assert_eq!(key_layout::process_id(3, 5), Some((3 << 23) | 5));
    }

    /// The CancelRequest key of `handle`'s process id with `secret`.
    fn key_of(handle: &CancelHandle, secret: u32) -> CancelKey {
        CancelKey {
            process_id: handle.process_id(),
            secret: bytes::Bytes::copy_from_slice(&secret.to_be_bytes()),
        }
    }

    #[tokio::test]
    async fn a_cancel_with_the_wrong_secret_does_nothing_and_a_right_one_ends_a_wait() {
        let registry = Arc::new(CancelRegistry::default());
        let handle = registry.register();
        let wrong = key_of(&handle, handle.secret().wrapping_add(1));
        let right = key_of(&handle, handle.secret());
        let waiting = handle.cancelled_while_waiting(handle.unattached_cancels());
        tokio::pin!(waiting);
        assert!(!registry.cancel(&wrong).await);
        assert!(futures_poll_once(waiting.as_mut()).await.is_none());
        assert!(registry.cancel(&right).await);
        tokio::time::timeout(Duration::from_secs(5), waiting).await.unwrap();
    }

    #[tokio::test]
    async fn a_cancel_that_lands_between_two_polls_of_the_wait_still_ends_it() {
        let registry = Arc::new(CancelRegistry::default());
        let handle = registry.register();
        let key = key_of(&handle, handle.secret());
        // As in a `select!` loop: the wait is dropped, the cancel comes, the wait is made
        // anew with the count taken when waiting began.
        let seen = handle.unattached_cancels();
        {
            let first = handle.cancelled_while_waiting(seen);
            tokio::pin!(first);
            assert!(futures_poll_once(first.as_mut()).await.is_none());
        }
        assert!(registry.cancel(&key).await);
        tokio::time::timeout(Duration::from_secs(5), handle.cancelled_while_waiting(seen))
            .await
            .unwrap();
    }

    async fn futures_poll_once<F: std::future::Future + Unpin>(future: F) -> Option<F::Output> {
        tokio::select! {
            biased;
            output = future => Some(output),
            () = tokio::task::yield_now() => None,
        }
    }
}
