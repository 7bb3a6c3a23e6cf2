//! The optional last section of a handed-over client's description: the server connection
//! whose socket travels with the client's (session mode, a pinned client), and the pins
//! that keep the client on it.

use super::Reader;
use crate::route::PinReason;
use crate::session::carried::PinList;
use crate::upstream::HandedServer;

/// A client's server connection as it travels with it.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct KeptServer {
    pub conn: HandedServer,
    pub pins: PinList,
}

fn put_bytes(out: &mut Vec<u8>, value: &[u8]) {
    put_count(out, value.len());
    out.extend_from_slice(value);
}

fn put_count(out: &mut Vec<u8>, count: usize) {
    out.extend_from_slice(&u32::try_from(count).unwrap_or(u32::MAX).to_be_bytes());
}

fn put_strings(out: &mut Vec<u8>, list: &[String]) {
    put_count(out, list.len());
    for item in list {
        put_bytes(out, item.as_bytes());
    }
}

/// Pin reasons by number in a description; a number this process does not know refuses it.
const PIN_REASONS: [PinReason; 9] = [
    PinReason::TempTable,
    PinReason::AdvisoryLock,
    PinReason::Listen,
    PinReason::HoldCursor,
    PinReason::SqlPrepare,
    PinReason::Load,
    PinReason::SetRole,
    PinReason::SessionAuthorization,
    PinReason::UntrackableSet,
];

impl KeptServer {
    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        let conn = &self.conn;
        put_bytes(out, conn.addr.as_bytes());
        out.push(u8::from(conn.replica));
        out.extend_from_slice(&conn.process_id.to_be_bytes());
        put_bytes(out, &conn.secret);
        put_count(out, conn.reported.len());
        for (name, value) in &conn.reported {
            put_bytes(out, name.as_bytes());
            put_bytes(out, value.as_bytes());
        }
        put_count(out, conn.params.len());
        for (name, value, sql) in &conn.params {
            put_bytes(out, name.as_bytes());
            put_bytes(out, value.as_bytes());
            out.push(u8::from(*sql));
        }
        put_strings(out, &conn.statements);
        out.push(u8::from(conn.holds_client_state));
        let reasons: Vec<u8> = self
            .pins
            .reasons
            .iter()
            .filter_map(|reason| PIN_REASONS.iter().position(|known| known == reason))
            .filter_map(|index| u8::try_from(index).ok())
            .collect();
        put_bytes(out, &reasons);
        put_strings(out, &self.pins.listening);
        put_strings(out, &self.pins.hold_cursors);
        put_strings(out, &self.pins.sql_prepared);
    }

    pub(super) fn decode(reader: &mut Reader<'_>) -> Option<KeptServer> {
        let addr = reader.string()?;
        let replica = reader.byte()? != 0;
        let process_id = reader.u32()?;
        let secret = reader.bytes()?.to_vec();
        let mut reported = Vec::new();
        for _ in 0..reader.u32()? {
            reported.push((reader.string()?, reader.string()?));
        }
        let mut params = Vec::new();
        for _ in 0..reader.u32()? {
            params.push((reader.string()?, reader.string()?, reader.byte()? != 0));
        }
        let statements = reader.strings()?;
        let holds_client_state = reader.byte()? != 0;
        let reasons = reader
            .bytes()?
            .iter()
            .map(|code| PIN_REASONS.get(usize::from(*code)).copied())
            .collect::<Option<Vec<PinReason>>>()?;
        let pins = PinList {
            reasons,
            listening: reader.strings()?,
            hold_cursors: reader.strings()?,
            sql_prepared: reader.strings()?,
        };
        Some(KeptServer {
            conn: HandedServer {
                addr,
                replica,
                process_id,
                secret,
                reported,
                params,
                statements,
                holds_client_state,
            },
            pins,
        })
    }
}

impl Reader<'_> {
    fn strings(&mut self) -> Option<Vec<String>> {
        let count = self.u32()?;
        let mut list = Vec::new();
        for _ in 0..count {
            list.push(self.string()?);
        }
        Some(list)
    }
}
