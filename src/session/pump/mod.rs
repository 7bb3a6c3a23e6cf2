//! Forwarding between a client and the server it is attached to, in both directions at
//! once, until the server owes nothing and is outside a transaction.
//!
//! Messages are read in place and forwarded as the original bytes; only the ones that
//! change state are looked at. Large DataRow and CopyData messages are forwarded as
//! they arrive, never buffered whole. Each direction stops reading while the other
//! side's output is backed up, so a slow reader cannot make pgrelay buffer without
//! bound. `from_client` and `from_server` hold what is done with each message.

mod effects;
mod fence;
mod from_client;
mod from_server;
mod listen;
pub(super) mod refusal;

use std::future::poll_fn;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio_util::io::poll_read_buf;

use super::carried::Carried;
use crate::metrics::{Role, SessionMetrics};
use crate::net::{ClientConn, poll_write_buffer, reserve_for_read};
use crate::protocol::ProtocolError;
use crate::protocol::TxStatus;
use crate::protocol::compose;
use crate::route::{Classifier, PinReason, SessionEffect};
use crate::runtime::{Fences, SchemaWatch};
use crate::upstream::{ServerConn, Synthetic, UpstreamError};
use effects::{PendingEffects, Settled};
use fence::{BatchEnd, FenceCapture, Writes};
use std::time::Instant;

/// Output waiting for a peer beyond which pgrelay stops reading from the other peer.
const HIGH_WATER: usize = 256 * 1024;

/// Rounds of reading and writing one poll may do before it yields to the runtime. Each
/// round handles what one read from each side brought (and stops taking input past
/// HIGH_WATER), so this bounds one poll even when both peers always have more.
const ROUNDS_PER_POLL: usize = 32;

/// Bytes read from both sides after which a poll yields to the runtime even before
/// ROUNDS_PER_POLL rounds: the input of the other side is looked at again after at most
/// this much of one side's (see `yield_to_io`).
const BYTES_PER_POLL: usize = 256 * 1024;

/// Why forwarding stopped.
#[derive(Debug)]
pub(super) enum PumpExit {
    /// The server owes nothing and is outside a transaction block.
    ServerIdle,
    /// Statement mode: the client opened a transaction block. The ReadyForQuery that
    /// says so was not forwarded.
    TransactionInStatementMode,
    /// The client closed its connection or sent Terminate.
    ClientGone,
    /// The client broke the protocol.
    ClientBroke(ProtocolError),
    /// The client sat inside a transaction, sending nothing and owed nothing, for
    /// idle_transaction_timeout.
    IdleInTransaction(std::time::Duration),
    /// The server connection failed; it must not be reused.
    ServerFailed { failure: UpstreamError, seen: Seen },
    /// The replica refused the batch as a write before any reply reached the client (see
    /// `refusal`); `error` is its ErrorResponse, not forwarded. The server is mid-reply
    /// and must not be reused.
    ReplicaRefused {
        error: bytes::Bytes,
        sqlstate: String,
        kind: refusal::Refusal,
    },
}

/// What the client had seen, and sent, of the exchange when its server failed.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Seen {
    /// Some of a reply (or a reply pgrelay makes itself) had gone to the client.
    pub replied: bool,
    /// An ErrorResponse went to the client after its last ReadyForQuery: the batch it
    /// belongs to has had its error, and needs only its ReadyForQuery.
    pub error_since_ready: bool,
    /// The client was in the middle of sending a large CopyData, part of it forwarded:
    /// the rest of it is still to come and cannot be told from messages.
    pub client_mid_message: bool,
}

/// How the attached server is shared, which decides what the pump must take care of.
#[derive(Debug, Clone, Copy)]
pub(super) struct PumpMode {
    /// Statement mode: a transaction block is refused.
    pub statement_mode: bool,
    /// Transaction and statement mode: prepared statements are renamed and re-prepared.
    pub manage_statements: bool,
    pub max_prepared_statements: usize,
    /// max_client_prepared_statements.
    pub max_client_prepared_statements: usize,
    /// Attached to a replica: forward one batch, then let the session route the next
    /// one (unless the batch opened a transaction, which stays on this server).
    pub single_unit: bool,
    /// Which side the attached server is on, for the metrics.
    pub role: Role,
    /// idle_transaction_timeout.
    pub idle_transaction_timeout: Option<std::time::Duration>,
    /// query_timeout.
    pub query_timeout: Option<std::time::Duration>,
    /// `listen_notify = "fanout"` in transaction or statement mode: pgrelay answers the
    /// client's LISTEN and UNLISTEN (see `listen`).
    pub fanout: bool,
}

pub(super) struct Pump<'a> {
    client: &'a mut ClientConn,
    server: &'a mut ServerConn,
    carried: &'a mut Carried,
    metrics: &'a SessionMetrics,
    mode: PumpMode,
    classifier: &'a Classifier,
    /// Bytes of a large client CopyData still to be forwarded as they arrive.
    client_passthrough: usize,
    /// No more client messages are taken until the server has answered (single_unit).
    hold: bool,
    /// Session effects of forwarded statements, settled when their transaction ends.
    pending: PendingEffects,
    /// When the batch now in flight was sent, for the latency histogram.
    unit_started: Option<Instant>,
    /// Where commit positions of writes are recorded (consistency session or causal,
    /// on the primary); `None`: not captured.
    fences: Option<&'a Fences>,
    /// What the transaction in progress wrote.
    writes: Writes,
    /// The database's record of schema changes (see `runtime::SchemaWatch`), added to
    /// here when a schema change passes through or a server refuses a stale statement.
    schema: &'a SchemaWatch,
    /// The transaction in progress changed the schema: the epoch advances again when it
    /// ends, for the statements prepared meanwhile by other clients that still saw the
    /// old schema.
    schema_changed: bool,
    /// A commit position is being asked for.
    fence: FenceCapture,
    /// Whether the client batch being sent ends outside a transaction.
    batch_end: BatchEnd,
    /// The batch being sent parsed the unnamed statement (whose class is then known).
    batch_parsed_unnamed: bool,
    /// Something went to the client in this run: a reply from the server, or one pgrelay
    /// made. A batch whose server fails after that cannot be run again unseen.
    replied: bool,
    /// An ErrorResponse went to the client since its last ReadyForQuery.
    error_since_ready: bool,
    /// The batch may run again if its server fails before answering: replies that carry
    /// no data are held in `held` until the first one that does.
    hold_metadata: bool,
    held: BytesMut,
    /// On a replica with `retry_refused_on_primary`: a read-only refusal that arrives while
    /// `hold_metadata` still holds ends the pump with [`PumpExit::ReplicaRefused`].
    catch_refusal: bool,
    /// Runs while the client is idle inside a transaction (idle_transaction_timeout).
    idle_in_transaction: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    /// Runs while a batch is in flight (query_timeout); `cancelled`: the CancelRequest
    /// went out and the timer now bounds the wait for the server to act on it.
    query_deadline: Option<QueryDeadline>,
}

/// query_timeout of the batch in flight.
struct QueryDeadline {
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
    /// The CancelRequest went out: the timer now bounds the wait for the server to act.
    cancelled: bool,
}

impl<'a> Pump<'a> {
    pub fn new(
        client: &'a mut ClientConn,
        server: &'a mut ServerConn,
        carried: &'a mut Carried,
        metrics: &'a SessionMetrics,
        mode: PumpMode,
        classifier: &'a Classifier,
        schema: &'a SchemaWatch,
    ) -> Self {
        Pump {
            schema,
            schema_changed: false,
            client,
            server,
            carried,
            metrics,
            unit_started: None,
            mode,
            classifier,
            client_passthrough: 0,
            hold: false,
            pending: PendingEffects::default(),
            fences: None,
            writes: Writes::default(),
            fence: FenceCapture::None,
            batch_end: BatchEnd::NotStarted,
            batch_parsed_unnamed: false,
            replied: false,
            error_since_ready: false,
            hold_metadata: false,
            held: BytesMut::new(),
            catch_refusal: false,
            idle_in_transaction: None,
            query_deadline: None,
        }
    }

    /// The batch may be run again should its server fail before answering it: until a
    /// reply that carries data (a row, a completion, an error, ReadyForQuery) arrives,
    /// the ones that do not are held back, so that the client has seen nothing.
    pub fn rerunnable(mut self) -> Self {
        self.hold_metadata = true;
        self
    }

    /// On a rerunnable pump attached to a replica: a refusal of the batch as a write, before
    /// anything reached the client, is not forwarded (see `refusal`).
    pub fn catching_refusals(mut self) -> Self {
        self.catch_refusal = self.hold_metadata;
        self
    }

    /// Sends the held replies on: the answer has begun.
    fn release_held(&mut self) {
        self.hold_metadata = false;
        if !self.held.is_empty() {
            self.replied = true;
            self.client.outbuf.extend_from_slice(&self.held);
            self.held.clear();
            crate::net::buffers::give_back(&mut self.held);
        }
    }

    /// Records the commit position of each write transaction in the client's own fence
    /// before the client hears of the commit, and with `by_table` (causal consistency,
    /// where other clients' reads wait for it too) in `fences` under the tables written.
    pub fn capturing_fences(mut self, fences: &'a Fences, by_table: bool) -> Self {
        self.fences = Some(fences);
        self.writes.keep_tables = by_table;
        self
    }

    pub async fn run(mut self) -> PumpExit {
        if let Err(exit) = self.on_client_input() {
            return exit;
        }
        if self.server.is_idle() {
            return self.server_idle();
        }
        poll_fn(|cx| self.poll(cx)).await
    }

    /// One poll: rounds of writing, reading and handling input while any of them makes
    /// progress. It ends when no side can move without waiting (`Pending`, woken by the
    /// sockets), or after ROUNDS_PER_POLL rounds or BYTES_PER_POLL bytes read (`Pending`,
    /// to be polled again once the runtime has looked at the sockets: `yield_to_io`).
    /// Tokio's budget also turns socket operations `Pending` once a task has done enough
    /// in one go.
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<PumpExit> {
        let mut read = 0;
        for _ in 0..ROUNDS_PER_POLL {
            if self.server.expect.needs_barrier() {
                // Settles whether answers to Syncs behind a failed COPY are still coming.
                self.server.send_barrier();
            }
            let mut progress = false;

            // The server is read before it is written to: a server that ended the
            // session has said why (a FATAL) before a write to it fails.
            if self.client.outbuf.len() < HIGH_WATER {
                reserve_for_read(&mut self.server.inbuf);
                match poll_read_buf(std::pin::Pin::new(&mut self.server.stream), cx, &mut self.server.inbuf) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(self.server_closed()),
                    Poll::Ready(Ok(n)) => {
                        progress = true;
                        read += n;
                        if let Err(exit) = self.on_server_input() {
                            return Poll::Ready(exit);
                        }
                        if self.server.state.fatal().is_some() {
                            // The server ended the session and closes next: nothing more
                            // goes to it, and the client hears the server's reason.
                            return Poll::Ready(self.server_closed());
                        }
                        if self.server.is_idle() {
                            return Poll::Ready(self.server_idle());
                        }
                    }
                    Poll::Ready(Err(source)) => return Poll::Ready(self.server_io_failed(source)),
                    Poll::Pending => {}
                }
            }

            match poll_write_buffer(&mut self.server.stream, &mut self.server.outbuf, cx) {
                Poll::Ready(Ok(wrote)) => progress |= wrote,
                Poll::Ready(Err(source)) => return Poll::Ready(self.server_io_failed(source)),
                Poll::Pending => {}
            }
            // A commit changed the client's channels: it hears of the commit once the
            // session has handed them to the hub, when the server is idle (which ends
            // the run). Written meanwhile only if holding it could stall the run.
            let channels_unsettled =
                self.carried.fanout_dirty && !self.server.expect.is_empty() && self.client.outbuf.len() < HIGH_WATER;
            if !channels_unsettled {
                match self.client.poll_write_out(cx) {
                    Poll::Ready(Ok(wrote)) => progress |= wrote,
                    Poll::Ready(Err(_)) => return Poll::Ready(PumpExit::ClientGone),
                    Poll::Pending => {}
                }
            }

            if self.hold && self.server.expect.is_empty() && self.server.status() != TxStatus::Idle {
                // The batch opened a transaction: it continues on this server.
                self.hold = false;
            }
            if self.server.outbuf.len() < HIGH_WATER && self.client.outbuf.len() < HIGH_WATER && !self.hold {
                if !self.client.inbuf.is_empty() {
                    let before = (self.server.outbuf.len(), self.client.outbuf.len());
                    if let Err(exit) = self.on_client_input() {
                        return Poll::Ready(exit);
                    }
                    // A message pgrelay answered itself may have been the last one owed.
                    if self.server.is_idle() {
                        return Poll::Ready(self.server_idle());
                    }
                    progress |= (self.server.outbuf.len(), self.client.outbuf.len()) != before;
                }
                match self.client.poll_read_more(cx) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(PumpExit::ClientGone),
                    Poll::Ready(Ok(n)) => {
                        progress = true;
                        read += n;
                        if let Err(exit) = self.on_client_input() {
                            return Poll::Ready(exit);
                        }
                        if self.server.is_idle() {
                            return Poll::Ready(self.server_idle());
                        }
                    }
                    Poll::Pending => {}
                }
            }

            if !progress {
                if let Poll::Ready(exit) = self.poll_query_timeout(cx) {
                    return Poll::Ready(exit);
                }
                return self.poll_idle_in_transaction(cx);
            }
            // Something moved: the client is not idle in its transaction.
            self.idle_in_transaction = None;
            if read >= BYTES_PER_POLL {
                break;
            }
        }
        // A statement that streams without pause is timed too.
        if let Poll::Ready(exit) = self.poll_query_timeout(cx) {
            return Poll::Ready(exit);
        }
        yield_to_io(cx);
        Poll::Pending
    }

    /// The client is between messages and its kept server sent something of its own
    /// accord; `read` is what reading it gave. Notifications, notices and parameter
    /// changes go to the client's output; `Some` when the server is gone (a FATAL, the
    /// end of the connection) or sent what it owes no one.
    pub fn kept_server_spoke(mut self, read: std::io::Result<usize>) -> Option<PumpExit> {
        match read {
            Ok(0) => return Some(self.server_closed()),
            Err(source) => return Some(self.server_io_failed(source)),
            Ok(_) => {}
        }
        // Nothing is owed: what is not asynchronous breaks the protocol.
        if let Err(exit) = self.on_server_input() {
            return Some(exit);
        }
        self.server.state.fatal().is_some().then(|| self.server_closed())
    }

    /// What the client had seen when the server failed.
    fn seen(&self) -> Seen {
        Seen {
            replied: self.replied,
            error_since_ready: self.error_since_ready,
            client_mid_message: self.client_passthrough > 0,
        }
    }

    /// Nothing can move: a batch in flight longer than query_timeout is cancelled on its
    /// server (which answers the client with 57014); a server that has not answered the
    /// cancel within another query_timeout (its backend stopped, its host gone) is given
    /// up, and its client gets 57014 from pgrelay.
    fn poll_query_timeout(&mut self, cx: &mut Context<'_>) -> Poll<PumpExit> {
        let Some(limit) = self.mode.query_timeout else {
            return Poll::Pending;
        };
        // Timed only while the client waits for an answer.
        if self.server.expect.readies_owed_to_client() == 0 {
            self.query_deadline = None;
            return Poll::Pending;
        }
        if self.query_deadline.is_none() {
            self.query_deadline = Some(QueryDeadline {
                timer: Box::pin(tokio::time::sleep(limit)),
                cancelled: false,
            });
        }
        let Some(QueryDeadline { timer, cancelled, .. }) = self.query_deadline.as_mut() else {
            return Poll::Pending;
        };
        if timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        if !*cancelled {
            *cancelled = true;
            timer.as_mut().reset(tokio::time::Instant::now() + limit);
            let _ = timer.as_mut().poll(cx);
            // The cancel may arrive after the statement ended: this connection must not
            // carry it to another client's statement.
            self.server.state.retire();
            tracing::info!(server = %self.server.addr(), "query_timeout: cancelling the statement on its server");
            crate::cancel::cancel_in_background(crate::cancel::CancelTarget {
                addr: self.server.addr.clone(),
                key: self.server.key().clone(),
            });
            return Poll::Pending;
        }
        self.abandon_fence();
        self.server.state.server_lost();
        Poll::Ready(PumpExit::ServerFailed {
            failure: UpstreamError::QueryTimeout {
                addr: self.server.addr().to_owned(),
            },
            // Not run again: a statement that ran this long is not retried unseen.
            seen: Seen {
                replied: true,
                ..self.seen()
            },
        })
    }

    /// Nothing can move: ends the run if the client has been idle inside a transaction
    /// for idle_transaction_timeout, else waits.
    fn poll_idle_in_transaction(&mut self, cx: &mut Context<'_>) -> Poll<PumpExit> {
        let Some(limit) = self.mode.idle_transaction_timeout else {
            return Poll::Pending;
        };
        let idle = self.server.status() != TxStatus::Idle
            && self.server.expect.is_empty()
            && !self.server.state.in_copy()
            && self.server.outbuf.is_empty()
            && self.client.inbuf.is_empty()
            && !self.fence.is_pending();
        if !idle {
            self.idle_in_transaction = None;
            return Poll::Pending;
        }
        let timer = self
            .idle_in_transaction
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(PumpExit::IdleInTransaction(limit)),
            Poll::Pending => Poll::Pending,
        }
    }

    /// A batch was answered with ReadyForQuery.
    fn finish_unit(&mut self) {
        // The next batch in flight, if any, gets a query_timeout of its own.
        self.query_deadline = None;
        let elapsed = self
            .unit_started
            .take()
            .map(|started| started.elapsed())
            .unwrap_or_default();
        self.metrics.query(self.mode.role, elapsed);
    }

    /// Notes what a forwarded statement does to the session: pins take effect at once
    /// (keeping a server too long is harmless), the rest once the statement succeeds.
    fn note_effects(&mut self, effects: &[SessionEffect]) {
        for effect in effects {
            if matches!(effect, SessionEffect::Pin(_)) {
                self.carried.pins.apply(effect);
            }
        }
        self.pending.note(effects);
    }

    /// Applies or drops the pending effects at the end of a transaction; where the
    /// replies cannot tell which took hold, the client keeps this server, whose state
    /// is then the only true record of its session.
    fn settle_effects(&mut self) {
        let expect = &self.server.expect;
        let (effects, certain) = match self.pending.idle(|| expect.readies_owed_to_client() > 0) {
            None | Some(Settled::Dropped) => return,
            Some(Settled::Applied(effects)) => (effects, true),
            Some(Settled::Uncertain(effects)) => (effects, false),
        };
        for effect in effects {
            self.carried.apply(&effect, &mut self.server.params);
        }
        if !certain {
            tracing::debug!("session effects of uncertain outcome: the client keeps its server");
            self.carried.pins.apply(&SessionEffect::Pin(PinReason::UntrackableSet));
        }
    }

    /// Sends the replies pgrelay gives itself that are now due: every one at the head
    /// of the queue, since everything before them has been forwarded.
    fn emit_synthetic(&mut self) {
        while let Some(synthetic) = self.server.expect.pop_synthetic() {
            self.replied = true;
            let out = &mut self.client.outbuf;
            match synthetic {
                Synthetic::CloseComplete => compose::close_complete(out),
                Synthetic::QueryDone(tag) => {
                    compose::command_complete(out, tag);
                    compose::ready_for_query(out, self.server.status());
                }
                listen => self.emit_listen(listen),
            }
        }
    }

    /// The server owes nothing and is outside a transaction: the run ends. A fence still
    /// pending here got no answer (the server skipped it after an error): the ReadyForQuery
    /// it held goes out, and the client's reads stay on the primary until a later position.
    fn server_idle(&mut self) -> PumpExit {
        if self.fence.is_pending() {
            self.abandon_fence();
        }
        PumpExit::ServerIdle
    }

    fn server_closed(&mut self) -> PumpExit {
        self.abandon_fence();
        self.server.state.server_lost();
        let addr = self.server.addr().to_owned();
        let failure = match self.server.state.fatal() {
            Some(fatal) => UpstreamError::Terminated {
                addr,
                sqlstate: fatal.sqlstate.clone(),
                message: fatal.message.clone(),
            },
            None => UpstreamError::Closed { addr },
        };
        PumpExit::ServerFailed {
            failure,
            seen: self.seen(),
        }
    }

    fn server_io_failed(&mut self, source: std::io::Error) -> PumpExit {
        if self.server.state.fatal().is_some() {
            // It said why before the connection broke: that is the reason to give.
            return self.server_closed();
        }
        self.abandon_fence();
        self.server.state.server_lost();
        PumpExit::ServerFailed {
            failure: UpstreamError::Io {
                addr: self.server.addr().to_owned(),
                source,
            },
            seen: self.seen(),
        }
    }

    fn server_broke(&mut self, reason: String) -> PumpExit {
        self.abandon_fence();
        self.server.state.server_lost();
        PumpExit::ServerFailed {
            failure: UpstreamError::Protocol {
                addr: self.server.addr().to_owned(),
                reason,
            },
            seen: self.seen(),
        }
    }
}

/// Arranges for the task to be polled again once the runtime has looked at its sockets.
///
/// Tokio learns that a socket became readable only when a worker polls its I/O driver;
/// until then a read of that socket returns `Pending` at once, whatever has arrived. A
/// plain self-wake puts the task straight back in the run queue, and a worker that
/// always has a task to run polls the driver only every few dozen of them: a client that
/// streams a long batch would keep its server's socket unread that long, and the error
/// that should stop the client early would reach it after the whole batch. A deferred
/// wake (what `tokio::task::yield_now` does) runs the task again only after the driver
/// has been polled, so a busy direction never hides the other one.
fn yield_to_io(cx: &mut Context<'_>) {
    let mut yielded = std::pin::pin!(tokio::task::yield_now());
    // Its first poll defers the wake and is always Pending; dropping it keeps the wake.
    if yielded.as_mut().poll(cx).is_ready() {
        cx.waker().wake_by_ref();
    }
}

/// Bytes from which [`move_bytes`] hands a run over instead of copying it.
const MOVE_WITHOUT_COPY: usize = 16 * 1024;

/// Moves the first `n` bytes of `from` to the end of `to`. A large run into an empty `to`
/// is handed over without a copy (a split of `from`'s buffer); anything else is copied.
/// Copying the few hundred bytes of an OLTP message costs less than a split, which
/// allocates a shared header and leaves both buffers without room of their own, so that
/// the next message would need a new buffer.
fn move_bytes(from: &mut BytesMut, n: usize, to: &mut BytesMut) {
    if n == 0 {
        return;
    }
    if to.is_empty() && n >= MOVE_WITHOUT_COPY {
        crate::net::buffers::give_back(to);
        *to = from.split_to(n);
    } else {
        to.extend_from_slice(&from[..n]);
        from.advance(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A task that always has more to do and yields with `yield_to_io` still learns that
    /// a socket became readable, on a worker that otherwise looks at its sockets only when
    /// it runs out of tasks (a plain self-wake never lets it).
    #[test]
    fn a_busy_task_that_yields_to_io_sees_a_socket_become_readable() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .event_interval(u32::MAX)
            .enable_all()
            .build()
            .expect("runtime");
        let polls = runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let mut peer = std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
            let (socket, _) = listener.accept().await.expect("accept");
            // Nothing to read yet: tokio forgets that the socket may be readable.
            let nothing = socket.try_read(&mut [0u8; 1]).expect_err("no data yet");
            assert_eq!(nothing.kind(), std::io::ErrorKind::WouldBlock);
            tokio::spawn(async move {
                let mut polls = 0u32;
                poll_fn(|cx| {
                    polls += 1;
                    if socket.poll_read_ready(cx).is_ready() {
                        return Poll::Ready(Some(polls));
                    }
                    if polls == 10 {
                        peer.write_all(b"x").expect("write");
                    }
                    if polls == 100_000 {
                        return Poll::Ready(None);
                    }
                    yield_to_io(cx);
                    Poll::Pending
                })
                .await
            })
            .await
            .expect("task")
        });
        assert!(polls.is_some_and(|polls| polls < 20), "readable after {polls:?} polls");
    }
}
