//! A replica's refusal of a batch (`retry_refused_on_primary`): which errors only a standby
//! raises for a statement that a primary would run.
//!
//! Refused as a write (the batch's texts are remembered as writes, so their next run goes to
//! the primary at once):
//! - `25006` read_only_sql_transaction: "cannot execute INSERT in a read-only transaction",
//!   raised by every write a hot standby is asked to do (DML, DDL, `nextval`, `NOTIFY`,
//!   `txid_current()`, a function that writes);
//! - `55000` object_not_in_prerequisite_state: "recovery is in progress", raised by
//!   functions that need WAL control (`pg_current_wal_lsn`, `pg_switch_wal`, …) and by
//!   table locks stronger than a standby grants. A primary raises `55000` for other reasons
//!   too (`currval` before `nextval`); running such a statement there again costs one round
//!   trip and gives the client the primary's own answer, the one it would have had without a
//!   replica;
//! - `0A000` raised in GetSerializableTransactionSnapshot: "cannot use serializable mode in a
//!   hot standby", when the role's or database's `default_transaction_isolation` (which
//!   pgrelay cannot see) is serializable.
//!
//! Not a write, run again on the primary but not remembered:
//! - `40001` and `40P01` raised in ProcessInterrupts: "canceling statement due to conflict
//!   with recovery", a standby cancelling a read whose rows its WAL replay must remove or
//!   lock. The same read on the primary has nothing to conflict with.
//!
//! The routine (field `R`) tells these apart from errors a primary raises with the same
//! code, whatever language the server writes its messages in. Nothing of the batch reached
//! the client and a standby commits nothing, so running the same batch on the primary is
//! as if it had been sent there first.

use bytes::Bytes;

use super::PumpExit;
use crate::protocol::HEADER_LEN;
use crate::protocol::views::ErrorFields;

/// Why a replica refused a batch that may run on the primary instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The batch writes, or needs the primary: remember it as a write.
    Write,
    /// A read cancelled by the standby's WAL replay: run it on the primary this once.
    RecoveryConflict,
}

/// `message` (a whole ErrorResponse) as a refusal, if it is one.
pub(super) fn refused(message: &[u8]) -> Option<PumpExit> {
    let fields = ErrorFields::read(message.get(HEADER_LEN..)?).ok()?;
    if fields.is_fatal() {
        return None;
    }
    let kind = classify(&fields)?;
    Some(PumpExit::ReplicaRefused {
        sqlstate: fields.code.to_owned(),
        error: Bytes::copy_from_slice(message),
        kind,
    })
}

fn classify(fields: &ErrorFields<'_>) -> Option<Refusal> {
    match (fields.code, fields.routine) {
        ("25006" | "55000", _) | ("0A000", "GetSerializableTransactionSnapshot") => Some(Refusal::Write),
        ("40001" | "40P01", "ProcessInterrupts") => Some(Refusal::RecoveryConflict),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(fields: &[(u8, &str)]) -> Vec<u8> {
        let mut body = Vec::new();
        for (field, value) in fields {
            body.push(*field);
            body.extend_from_slice(value.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut message = vec![b'E'];
        message.extend_from_slice(&u32::try_from(body.len() + 4).unwrap_or(u32::MAX).to_be_bytes());
        message.extend_from_slice(&body);
        message
    }

    fn kind(code: &str, routine: &str, severity: &str) -> Option<Refusal> {
        match refused(&error(&[(b'V', severity), (b'C', code), (b'M', "m"), (b'R', routine)])) {
            Some(PumpExit::ReplicaRefused { kind, .. }) => Some(kind),
            _ => None,
        }
    }

    #[test]
    fn standby_refusals_are_told_apart_from_the_same_codes_on_a_primary() {
        assert_eq!(kind("25006", "PreventCommandIfReadOnly", "ERROR"), Some(Refusal::Write));
        assert_eq!(kind("55000", "pg_current_wal_lsn", "ERROR"), Some(Refusal::Write));
        assert_eq!(
            kind("0A000", "GetSerializableTransactionSnapshot", "ERROR"),
            Some(Refusal::Write)
        );
        assert_eq!(
            kind("40001", "ProcessInterrupts", "ERROR"),
            Some(Refusal::RecoveryConflict)
        );
        assert_eq!(
            kind("40P01", "ProcessInterrupts", "ERROR"),
            Some(Refusal::RecoveryConflict)
        );
        // The same codes from elsewhere are the client's own.
        assert_eq!(kind("0A000", "RevalidateCachedQuery", "ERROR"), None);
        assert_eq!(kind("40001", "OnConflict_CheckForSerializationFailure", "ERROR"), None);
        assert_eq!(kind("40P01", "DeadLockReport", "ERROR"), None);
        assert_eq!(kind("42P01", "parserOpenTable", "ERROR"), None);
        // A FATAL ends the connection: that is a lost server, not a refusal.
        assert_eq!(kind("25006", "x", "FATAL"), None);
    }
}
