//! A replica's refusal of a batch as a write (`retry_refused_on_primary`): which errors only
//! a standby raises for a statement that would run on a primary.
//!
//! - `25006` read_only_sql_transaction: "cannot execute INSERT in a read-only transaction",
//!   raised by every write a hot standby is asked to do (DML, DDL, `nextval`, a function
//!   that writes);
//! - `55000` object_not_in_prerequisite_state: "recovery is in progress", raised by
//!   functions that need WAL control (`pg_current_wal_lsn`, `pg_switch_wal`, …). A primary
//!   raises `55000` for other reasons too (`currval` before `nextval`); running such a
//!   statement there again costs one round trip and gives the client the primary's own
//!   answer, which is the one it would have had without a replica.
//!
//! Nothing of the batch reached the client and a standby commits nothing, so running the
//! same batch on the primary is as if it had been sent there first.

use bytes::Bytes;

use super::PumpExit;
use crate::protocol::HEADER_LEN;
use crate::protocol::views::ErrorFields;

const REFUSAL_CODES: &[&str] = &["25006", "55000"];

/// `message` (a whole ErrorResponse) as a refusal, if it is one.
pub(super) fn refused(message: &[u8]) -> Option<PumpExit> {
    let fields = ErrorFields::read(message.get(HEADER_LEN..)?).ok()?;
    if fields.is_fatal() || !REFUSAL_CODES.contains(&fields.code) {
        return None;
    }
    Some(PumpExit::ReplicaRefused {
        sqlstate: fields.code.to_owned(),
        error: Bytes::copy_from_slice(message),
    })
}
