//! One parameterised statement on a private side connection (auth_query): Parse, Bind with
//! the login name as text `$1`, Execute, Sync, and the rows it answers. The name travels as a
//! bound parameter, never spliced into SQL, so no login name can change what runs.

use bytes::BytesMut;
use postgres_protocol::IsNull;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{ServerConn, UpstreamError};
use crate::error::MessageText;
use crate::protocol::BackendTag;
use crate::protocol::frame::split_frame;
use crate::protocol::views::{ErrorFields, ready_status};

/// Largest reply accepted: a few rows of names and verifiers.
const LOOKUP_REPLY_LIMIT: usize = 1 << 16;
/// More rows than any lookup answers; the rest are read and dropped.
const MAX_ROWS: usize = 4;

/// What the statement answered: its rows (each column text or NULL), or the server's error.
/// `Debug` shows no values: the rows hold password verifiers.
#[derive(Default, Clone, PartialEq, Eq)]
pub struct LookupRows {
    pub rows: Vec<Vec<Option<String>>>,
    /// (SQLSTATE, message) of the error, if the statement failed.
    pub error: Option<(String, MessageText)>,
}

impl std::fmt::Debug for LookupRows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LookupRows")
            .field("rows", &self.rows.len())
            .field("error", &self.error.as_ref().map(|(code, _)| code))
            .finish_non_exhaustive()
    }
}

impl ServerConn {
    /// Runs `sql` with `param` as its text `$1` and reads everything up to ReadyForQuery.
    /// Only for a connection of pgrelay's own that is idle.
    pub async fn run_lookup(&mut self, sql: &str, param: &str) -> Result<LookupRows, UpstreamError> {
        let addr = self.addr.to_string();
        let io = |source| UpstreamError::Io {
            addr: addr.clone(),
            source,
        };
        let protocol = |reason: String| UpstreamError::Protocol {
            addr: addr.clone(),
            reason,
        };
        let mut message = BytesMut::new();
        frontend::parse("", sql, [], &mut message).map_err(io)?;
        frontend::bind(
            "",
            "",
            [0],
            [param],
            |param: &str, buf: &mut BytesMut| {
                buf.extend_from_slice(param.as_bytes());
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(IsNull::No)
            },
            [0],
            &mut message,
        )
        .map_err(|_| protocol("cannot encode the lookup parameter".to_owned()))?;
        frontend::execute("", 0, &mut message).map_err(io)?;
        frontend::sync(&mut message);
        self.stream.write_all(&message).await.map_err(io)?;
        self.stream.flush().await.map_err(io)?;

        let mut answer = LookupRows::default();
        loop {
            let Some(frame) =
                split_frame(&mut self.inbuf, LOOKUP_REPLY_LIMIT).map_err(|error| protocol(error.to_string()))?
            else {
                self.inbuf.reserve(4096);
                if self.stream.read_buf(&mut self.inbuf).await.map_err(io)? == 0 {
                    self.state.server_lost();
                    return Err(UpstreamError::Closed { addr });
                }
                continue;
            };
            match BackendTag::from_byte(frame.tag()) {
                Some(BackendTag::DataRow) => {
                    let row = data_row(frame.body()).ok_or_else(|| protocol("malformed DataRow".to_owned()))?;
                    if answer.rows.len() < MAX_ROWS {
                        answer.rows.push(row);
                    }
                }
                Some(BackendTag::ErrorResponse) => {
                    let fields = ErrorFields::read(frame.body()).unwrap_or_default();
                    if fields.is_fatal() {
                        self.state.server_lost();
                    }
                    answer.error = Some((fields.code.to_owned(), MessageText::from_server(fields.message)));
                }
                Some(BackendTag::ReadyForQuery) => {
                    let status = ready_status(frame.body()).map_err(|error| protocol(error.to_string()))?;
                    self.state.ready(status);
                    return Ok(answer);
                }
                Some(_) => {}
                None => return Err(protocol(format!("unknown message type {}", frame.tag()))),
            }
        }
    }
}

/// The columns of a DataRow body: Int16 count, then per column Int32 length (-1: NULL) and
/// that many bytes. Text that is not UTF-8 is an error, like a short body.
fn data_row(body: &[u8]) -> Option<Vec<Option<String>>> {
    let (count, mut rest) = body.split_first_chunk::<2>()?;
    let count = usize::try_from(i16::from_be_bytes(*count)).ok()?;
    let mut columns = Vec::with_capacity(count.min(16));
    for _ in 0..count {
        let (len, after) = rest.split_first_chunk::<4>()?;
        let len = i32::from_be_bytes(*len);
        if len < 0 {
            columns.push(None);
            rest = after;
            continue;
        }
        let (value, after) = after.split_at_checked(usize::try_from(len).ok()?)?;
        columns.push(Some(std::str::from_utf8(value).ok()?.to_owned()));
        rest = after;
    }
    rest.is_empty().then_some(columns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_rows() {
        let mut body = 2i16.to_be_bytes().to_vec();
        body.extend_from_slice(&5i32.to_be_bytes());
        body.extend_from_slice(b"alice");
        body.extend_from_slice(&(-1i32).to_be_bytes());
        assert_eq!(data_row(&body), Some(vec![Some("alice".to_owned()), None]));
        for len in 0..body.len() {
            assert_eq!(data_row(&body[..len]), None, "{len}");
        }
        let mut trailing = body.clone();
        trailing.push(0);
        assert_eq!(data_row(&trailing), None);
        assert_eq!(data_row(&(-1i16).to_be_bytes()), None);
        assert_eq!(data_row(&0i16.to_be_bytes()), Some(Vec::new()));
    }
}
