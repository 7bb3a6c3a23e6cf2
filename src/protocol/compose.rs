//! Messages pgrelay composes itself towards clients (errors, authentication requests,
//! ParameterStatus, admin console rows …), encoded with pgwire's typed messages.
//!
//! pgwire is used here to encode only; nothing that comes off the network is decoded
//! with it.

use bytes::{BufMut, BytesMut};
use pgwire::messages::Message;
use pgwire::messages::data::{DataRow, FieldDescription, RowDescription};
use pgwire::messages::extendedquery::{BindComplete, CloseComplete, ParseComplete};
use pgwire::messages::response::{CommandComplete, EmptyQueryResponse, ReadyForQuery, TransactionStatus};
use pgwire::messages::startup::{Authentication, BackendKeyData, NegotiateProtocolVersion, ParameterStatus, SecretKey};

use super::TxStatus;

/// Severity of an error pgrelay reports. FATAL closes the connection after it is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }
}

/// Encodes one of pgwire's messages. Encoding fails only when a message is longer than
/// its type allows, which pgrelay's own bounded messages never are; if it ever happens
/// the buffer is left as it was rather than holding half a message.
fn put(buf: &mut BytesMut, message: &impl Message) {
    let before = buf.len();
    if let Err(error) = message.encode(buf) {
        buf.truncate(before);
        tracing::error!(%error, "could not encode a message for a client");
    }
}

/// An ErrorResponse. `message` is bytes: it may quote a server's text in the client's
/// encoding, which goes out unchanged (up to a NUL byte, which cannot be sent).
pub fn error(buf: &mut BytesMut, severity: Severity, sqlstate: &str, message: &(impl AsRef<[u8]> + ?Sized)) {
    error_or_notice(buf, b'E', severity.as_str(), sqlstate, message.as_ref());
}

/// A NoticeResponse of severity NOTICE; `message` as for [`error`].
pub fn notice(buf: &mut BytesMut, sqlstate: &str, message: &(impl AsRef<[u8]> + ?Sized)) {
    error_or_notice(buf, b'N', "NOTICE", sqlstate, message.as_ref());
}

/// A NoticeResponse of severity WARNING; `message` as for [`error`].
pub fn warning(buf: &mut BytesMut, sqlstate: &str, message: &(impl AsRef<[u8]> + ?Sized)) {
    error_or_notice(buf, b'N', "WARNING", sqlstate, message.as_ref());
}

/// Written by hand rather than with pgwire, whose messages hold only UTF-8 text.
fn error_or_notice(buf: &mut BytesMut, tag: u8, severity: &str, sqlstate: &str, message: &[u8]) {
    let until_nul = |text: &'_ [u8]| -> usize { text.iter().position(|&b| b == 0).unwrap_or(text.len()) };
    let fields: [(u8, &[u8]); 4] = [
        (b'S', severity.as_bytes()),
        (b'V', severity.as_bytes()),
        (b'C', sqlstate.as_bytes()),
        (b'M', message),
    ];
    let body_len: usize = fields.iter().map(|(_, value)| 2 + until_nul(value)).sum::<usize>() + 1;
    let Ok(len) = u32::try_from(body_len + 4) else {
        tracing::error!("an error message for a client is too long to send");
        return;
    };
    buf.reserve(1 + len as usize);
    buf.put_u8(tag);
    buf.put_u32(len);
    for (field, value) in fields {
        buf.put_u8(field);
        buf.put_slice(&value[..until_nul(value)]);
        buf.put_u8(0);
    }
    buf.put_u8(0);
}

pub fn ready_for_query(buf: &mut BytesMut, status: TxStatus) {
    let status = match status {
        TxStatus::Idle => TransactionStatus::Idle,
        TxStatus::InTransaction => TransactionStatus::Transaction,
        TxStatus::Failed => TransactionStatus::Error,
    };
    put(buf, &ReadyForQuery::new(status));
}

pub fn parameter_status(buf: &mut BytesMut, name: &str, value: &str) {
    put(buf, &ParameterStatus::new(name.to_owned(), value.to_owned()));
}

pub fn backend_key_data(buf: &mut BytesMut, process_id: u32, secret: u32) {
    put(
        buf,
        &BackendKeyData::new(process_id as i32, SecretKey::I32(secret as i32)),
    );
}

pub fn negotiate_protocol_version(buf: &mut BytesMut, newest_minor: u16, unsupported_options: Vec<String>) {
    put(
        buf,
        &NegotiateProtocolVersion::new(i32::from(newest_minor), unsupported_options),
    );
}

pub fn auth_ok(buf: &mut BytesMut) {
    put(buf, &Authentication::Ok);
}

pub fn auth_cleartext(buf: &mut BytesMut) {
    put(buf, &Authentication::CleartextPassword);
}

pub fn auth_md5(buf: &mut BytesMut, salt: [u8; 4]) {
    put(buf, &Authentication::MD5Password(salt.to_vec()));
}

pub fn auth_sasl(buf: &mut BytesMut, mechanisms: &[&str]) {
    put(
        buf,
        &Authentication::SASL(mechanisms.iter().map(|m| (*m).to_owned()).collect()),
    );
}

pub fn auth_sasl_continue(buf: &mut BytesMut, data: &[u8]) {
    put(buf, &Authentication::SASLContinue(bytes::Bytes::copy_from_slice(data)));
}

pub fn auth_sasl_final(buf: &mut BytesMut, data: &[u8]) {
    put(buf, &Authentication::SASLFinal(bytes::Bytes::copy_from_slice(data)));
}

pub fn command_complete(buf: &mut BytesMut, tag: &str) {
    put(buf, &CommandComplete::new(tag.to_owned()));
}

pub fn empty_query_response(buf: &mut BytesMut) {
    put(buf, &EmptyQueryResponse::new());
}

pub fn parse_complete(buf: &mut BytesMut) {
    put(buf, &ParseComplete::new());
}

pub fn bind_complete(buf: &mut BytesMut) {
    put(buf, &BindComplete::new());
}

pub fn close_complete(buf: &mut BytesMut) {
    put(buf, &CloseComplete::new());
}

pub fn no_data(buf: &mut BytesMut) {
    put(buf, &pgwire::messages::data::NoData::new());
}

/// A ParameterDescription with no parameters.
pub fn parameter_description_none(buf: &mut BytesMut) {
    put(buf, &pgwire::messages::data::ParameterDescription::new(Vec::new()));
}

/// OID of the `text` type: every column pgrelay reports itself is text.
const TEXT_OID: u32 = 25;

/// A RowDescription of text columns, for result sets pgrelay produces (admin console).
pub fn row_description(buf: &mut BytesMut, columns: &[&str]) {
    let fields = columns
        .iter()
        .map(|name| FieldDescription::new((*name).to_owned(), 0, 0, TEXT_OID, -1, -1, 0))
        .collect();
    put(buf, &RowDescription::new(fields));
}

/// A DataRow of text values; `None` is SQL NULL.
pub fn data_row<'a>(buf: &mut BytesMut, values: impl ExactSizeIterator<Item = Option<&'a str>>) {
    let field_count = i16::try_from(values.len()).unwrap_or(i16::MAX);
    let mut data = BytesMut::new();
    for value in values.take(field_count as usize) {
        match value {
            Some(text) => {
                data.put_i32(i32::try_from(text.len()).unwrap_or(i32::MAX));
                data.put_slice(text.as_bytes());
            }
            None => data.put_i32(-1),
        }
    }
    put(buf, &DataRow::new(data, field_count));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::frame::split_frame;
    use crate::protocol::views::{ErrorFields, ready_status};

    #[test]
    fn composed_messages_read_back() {
        let mut buf = BytesMut::new();
        error(&mut buf, Severity::Fatal, "28P01", "password authentication failed");
        ready_for_query(&mut buf, TxStatus::InTransaction);
        data_row(&mut buf, [Some("a"), None].into_iter());
        let error_frame = split_frame(&mut buf, 1 << 20).unwrap().unwrap();
        assert_eq!(error_frame.tag(), b'E');
        let fields = ErrorFields::read(error_frame.body()).unwrap();
        assert_eq!((fields.severity, fields.code), ("FATAL", "28P01"));
        let ready = split_frame(&mut buf, 1 << 20).unwrap().unwrap();
        assert_eq!(ready_status(ready.body()).unwrap(), TxStatus::InTransaction);
        let row = split_frame(&mut buf, 1 << 20).unwrap().unwrap();
        assert_eq!(row.body(), b"\0\x02\0\0\0\x01a\xff\xff\xff\xff");
    }

    #[test]
    fn errors_and_notices_carry_a_servers_bytes_unchanged() {
        let mut buf = BytesMut::new();
        error(&mut buf, Severity::Error, "57P01", b"lost: caf\xe9".as_slice());
        notice(&mut buf, "01000", b"cut\0here".as_slice());
        let error_frame = split_frame(&mut buf, 1 << 20).unwrap().unwrap();
        assert_eq!(
            error_frame.body(),
            b"SERROR\0VERROR\0C57P01\0Mlost: caf\xe9\0\0".as_slice()
        );
        let notice_frame = split_frame(&mut buf, 1 << 20).unwrap().unwrap();
        assert_eq!(notice_frame.tag(), b'N');
        assert_eq!(ErrorFields::read(notice_frame.body()).unwrap().message, b"cut");
        assert!(buf.is_empty());
    }
}
