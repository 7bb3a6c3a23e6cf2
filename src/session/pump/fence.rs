//! Commit positions of write transactions (consistency `session` and `causal`): what the
//! transaction in progress wrote, whether the batch being sent will leave its server
//! outside a transaction, and the query that reads the primary's WAL position.
//!
//! The position must be read after the commit, and the client must not hear of the
//! commit before it is known (its next read could otherwise go to a replica that lacks
//! the write). When the statements of a batch show that it ends outside a transaction,
//! the query goes to the server right behind it, in the same write, so both answers come
//! back together: no round trip of its own. Otherwise it is sent once the batch's
//! ReadyForQuery says the transaction ended, and that ReadyForQuery waits for it.

use super::Pump;
use crate::cluster::Lsn;
use crate::protocol::TxStatus;
use crate::protocol::compose;
use crate::route::{Classification, Tables, TxControl, WriteReason};
use crate::upstream::{Expect, Recipient};

/// Asks the primary where its WAL is: every commit visible there is before it, even
/// one made with synchronous_commit = off.
const FENCE_QUERY: &str = "SELECT pg_catalog.pg_current_wal_insert_lsn()";

/// What the transaction in progress wrote, for its fence.
#[derive(Debug, Default)]
pub(super) struct Writes {
    /// It wrote (or may have written).
    pub wrote: bool,
    /// The tables it wrote, when `keep_tables`.
    tables: Tables,
    /// Fences are captured by table: the tables are kept (elsewhere copying their names
    /// would be wasted work per write).
    pub keep_tables: bool,
}

impl Writes {
    /// Notes what a forwarded statement may write.
    pub fn note(&mut self, class: &Classification) {
        if !class.is_read() {
            self.note_tables(&class.written_tables);
        }
    }

    /// Notes a write to `tables`.
    pub fn note_tables(&mut self, tables: &Tables) {
        self.wrote = true;
        if self.keep_tables {
            self.tables.union(tables.clone());
        }
    }

    /// The writes so far, now covered by a fence being asked for.
    fn take(&mut self) -> Tables {
        self.wrote = false;
        std::mem::take(&mut self.tables)
    }

    pub fn clear(&mut self) {
        self.wrote = false;
        self.tables = Tables::empty();
    }
}

/// Asking the primary for the WAL position after a write committed.
#[derive(Debug, Default)]
pub(super) enum FenceCapture {
    #[default]
    None,
    /// The query is on its way.
    Awaiting {
        /// The client's ReadyForQuery, withheld until the fence is in place so that the
        /// client's next statement already sees it.
        held: Option<TxStatus>,
        /// Sent behind the client's batch, before its ReadyForQuery came.
        ahead: bool,
        /// The batch left a transaction open after all: the position read is not a
        /// commit's, and is dropped.
        void: bool,
        lsn: Option<Lsn>,
        /// What the fence covers.
        written: Tables,
    },
}

impl FenceCapture {
    pub fn is_pending(&self) -> bool {
        matches!(self, FenceCapture::Awaiting { .. })
    }

    /// The first column of the fence query's row.
    pub fn answered(&mut self, position: Option<Lsn>) {
        if let FenceCapture::Awaiting { lsn, .. } = self {
            *lsn = position;
        }
    }
}

/// Whether the client's batch being sent will leave its server outside a transaction, as
/// far as its statements show.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub(super) enum BatchEnd {
    /// No message of a batch has been sent since the last one ended.
    #[default]
    NotStarted,
    /// It ends outside a transaction: it started there and runs autocommit statements, or
    /// it ended its transaction and ran only such statements after.
    Idle,
    /// It started inside a transaction that none of its statements has ended yet.
    InTransaction,
    /// Unknown: something was in flight before it, or a statement of it was not
    /// understood, opens a transaction or savepoint, or starts COPY FROM STDIN (after which
    /// nothing but COPY data may go to the server).
    Unknown,
}

impl BatchEnd {
    /// The first message of a batch goes to a server whose transaction `status` is
    /// known, since it owes no one anything (`settled`).
    pub fn started(settled: bool, status: TxStatus) -> Self {
        match (settled, status) {
            (false, _) => BatchEnd::Unknown,
            (true, TxStatus::Idle) => BatchEnd::Idle,
            (true, TxStatus::InTransaction | TxStatus::Failed) => BatchEnd::InTransaction,
        }
    }

    /// A statement of the batch, as classified.
    pub fn statement(self, class: &Classification) -> Self {
        if self == BatchEnd::Unknown
            || !class.parsed
            || class.statements > 1
            || class.write_reason == Some(WriteReason::Copy)
        {
            return BatchEnd::Unknown;
        }
        match &class.transaction {
            None => self,
            Some(TxControl::Commit { chain: false } | TxControl::Rollback { chain: false }) => BatchEnd::Idle,
            Some(_) => BatchEnd::Unknown,
        }
    }
}

impl Pump<'_> {
    /// The first message of a client batch is about to be planned.
    pub(super) fn batch_message(&mut self) {
        if self.batch_end == BatchEnd::NotStarted {
            let settled = self.server.expect.is_empty() && !self.server.state.is_unsynced();
            self.batch_end = BatchEnd::started(settled, self.server.status());
        }
    }

    /// The batch's last message (a Query or a Sync) was planned: whether the batch ends
    /// a transaction that wrote, so that the fence query can go right behind it. The next
    /// message begins a new batch.
    pub(super) fn batch_ends_writing(&mut self) -> bool {
        self.batch_parsed_unnamed = false;
        let ends_idle = std::mem::take(&mut self.batch_end) == BatchEnd::Idle;
        // After an error the server skips to the next Sync, the fence query with it; a
        // Query that leaves extended-protocol messages unsynced before it does not end
        // their implicit transaction if pgrelay answered it itself.
        let server = &*self.server;
        ends_idle
            && self.writes.wrote
            && self.fences.is_some()
            && !self.fence.is_pending()
            && !server.state.is_unsynced()
            && !server.expect.skipping_to_sync()
    }

    /// Sends the fence query behind the batch just planned (see `batch_ends_writing`).
    pub(super) fn send_fence_ahead(&mut self) {
        let written = self.writes.take();
        self.send_fence_query(written, None, true);
    }

    /// A transaction ended with ReadyForQuery `status` for the client. Returns whether
    /// that ReadyForQuery must be withheld while the commit position is fetched.
    pub(super) fn transaction_ended(&mut self) -> bool {
        if let FenceCapture::Awaiting {
            held: held @ None,
            ahead: true,
            void: false,
            ..
        } = &mut self.fence
        {
            // The fence went behind this batch and answers next.
            *held = Some(TxStatus::Idle);
            return true;
        }
        if self.fence.is_pending() {
            // The fence on its way was sent after this batch, so it covers its writes;
            // what is noted now was sent after the fence and needs one of its own.
            return false;
        }
        if !self.writes.wrote || self.fences.is_none() {
            self.writes.clear();
            return false;
        }
        if self.server.state.is_unsynced() {
            // The client's next batch has begun on this server: a query now would
            // commit its first part early. The position is asked for at the end of that
            // batch instead (a later one covers this commit too); the server stays
            // with this client until then, so its own reads cannot miss the write.
            return false;
        }
        // Withhold the client's ReadyForQuery only if nothing else of the client's is in
        // flight: pipelined statements run on this same server anyway.
        let hold = self.server.expect.is_empty();
        let written = self.writes.take();
        self.send_fence_query(written, hold.then_some(TxStatus::Idle), false);
        hold
    }

    /// A ReadyForQuery for the client says its transaction goes on: a fence sent ahead
    /// of it reads no commit's position.
    pub(super) fn transaction_continues(&mut self) {
        if let FenceCapture::Awaiting {
            ahead: true,
            void,
            written,
            held: None,
            ..
        } = &mut self.fence
            && !*void
        {
            *void = true;
            let written = std::mem::take(written);
            self.writes.wrote = true;
            if self.writes.keep_tables {
                self.writes.tables.union(written);
            }
        }
    }

    fn send_fence_query(&mut self, written: Tables, held: Option<TxStatus>, ahead: bool) {
        // A Query message, written in place (no buffer of its own to allocate).
        let out = &mut self.server.outbuf;
        out.extend_from_slice(b"Q");
        out.extend_from_slice(&((4 + FENCE_QUERY.len() + 1) as u32).to_be_bytes());
        out.extend_from_slice(FENCE_QUERY.as_bytes());
        out.extend_from_slice(b"\0");
        self.server.expect.push(Expect::ResultsUntilReady, Recipient::Pgrelay);
        self.fence = FenceCapture::Awaiting {
            held,
            ahead,
            void: false,
            lsn: None,
            written,
        };
    }

    /// The commit position arrived (or not): record it, release the withheld
    /// ReadyForQuery.
    pub(super) fn fence_captured(&mut self) {
        let FenceCapture::Awaiting {
            held,
            lsn,
            written,
            void,
            ..
        } = std::mem::take(&mut self.fence)
        else {
            return;
        };
        if lsn.is_none() && !void && self.fences.is_some() {
            // The query failed (a late cancel, statement_timeout, a demoted primary): the
            // commit happened, its position is unknown.
            self.carried.fence_lost = true;
        }
        if let (Some(lsn), Some(fences), false) = (lsn, self.fences, void) {
            // A position lost before is older than this one: this one covers it.
            self.carried.write_fence = if self.carried.fence_lost {
                Some(lsn)
            } else {
                self.carried.write_fence.max(Some(lsn))
            };
            self.carried.fence_lost = false;
            if self.writes.keep_tables {
                fences.record(&written, lsn);
            }
        }
        if let Some(status) = held {
            compose::ready_for_query(&mut self.client.outbuf, status);
        }
    }

    /// The server failed while a commit position was owed: the client's ReadyForQuery
    /// withheld for it goes out now (the commit itself is done; its CommandComplete is
    /// already on its way), and with the position unknown, the client's reads stay on the
    /// primary until the position of a later write is known.
    pub(super) fn abandon_fence(&mut self) {
        if let FenceCapture::Awaiting { held, .. } = std::mem::take(&mut self.fence) {
            self.carried.fence_lost = true;
            if let Some(status) = held {
                self.replied = true;
                compose::ready_for_query(&mut self.client.outbuf, status);
            }
        }
        if self.fences.is_some() && self.writes.wrote {
            // A write whose commit may have happened, position never asked for.
            self.carried.fence_lost = true;
        }
        self.writes.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::{Classifier, ClassifierSettings, ClientEncoding};

    fn end_of(start: BatchEnd, statements: &[&str]) -> BatchEnd {
        let classifier = Classifier::new(ClassifierSettings {
            cache_capacity: 100,
            ..Default::default()
        });
        statements.iter().fold(start, |end, sql| {
            end.statement(&classifier.classify_text(sql.as_bytes(), ClientEncoding::UTF8.charset))
        })
    }

    #[test]
    fn a_batch_ends_outside_a_transaction_only_when_its_statements_show_it() {
        use BatchEnd::*;
        assert_eq!(end_of(Idle, &["INSERT INTO t VALUES (1)"]), Idle);
        assert_eq!(end_of(Idle, &["UPDATE t SET a = 1", "SELECT 1"]), Idle);
        assert_eq!(end_of(InTransaction, &["UPDATE t SET a = 1"]), InTransaction);
        assert_eq!(end_of(InTransaction, &["END"]), Idle);
        assert_eq!(end_of(InTransaction, &["COMMIT", "INSERT INTO t VALUES (1)"]), Idle);
        assert_eq!(end_of(BatchEnd::started(true, TxStatus::Failed), &["ROLLBACK"]), Idle);
        assert_eq!(end_of(Idle, &["BEGIN", "INSERT INTO t VALUES (1)", "COMMIT"]), Unknown);
        assert_eq!(end_of(InTransaction, &["COMMIT AND CHAIN"]), Unknown);
        assert_eq!(end_of(InTransaction, &["SAVEPOINT a"]), Unknown);
        assert_eq!(end_of(Idle, &["COPY t FROM STDIN"]), Unknown);
        assert_eq!(end_of(Idle, &["INSERT INTO t VALUES (1); COMMIT"]), Unknown);
        assert_eq!(end_of(Unknown, &["COMMIT"]), Unknown);
        assert_eq!(BatchEnd::started(false, TxStatus::Idle), Unknown);
        assert_eq!(BatchEnd::started(true, TxStatus::Failed), InTransaction);
    }
}
