//! The startup packet: the untagged first message of a connection (StartupMessage,
//! SSLRequest, GSSENCRequest or CancelRequest), parsed with a hard size bound.

use bytes::Bytes;

/// PostgreSQL's own bound on a startup packet (MAX_STARTUP_PACKET_LENGTH).
pub const MAX_STARTUP_PACKET_LEN: usize = 10_000;

const SSL_REQUEST_CODE: u32 = 80_877_103;
const GSSENC_REQUEST_CODE: u32 = 80_877_104;
const CANCEL_REQUEST_CODE: u32 = 80_877_102;

/// What a client asked for in its first packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    /// A protocol 3.x session start with its parameters (user, database, options…).
    Startup {
        minor_version: u16,
        params: Vec<(String, String)>,
    },
    SslRequest,
    GssEncRequest,
    Cancel(CancelKey),
}

/// The key a CancelRequest names: process id and secret (4 bytes in protocol 3.0, up
/// to 256 in 3.2).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CancelKey {
    pub process_id: u32,
    pub secret: Bytes,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StartupError {
    #[error("invalid length of startup packet: {0}")]
    BadLength(usize),
    #[error("unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.x")]
    UnsupportedVersion { major: u16, minor: u16 },
    #[error("invalid startup packet layout: {0}")]
    Malformed(&'static str),
}

/// Reads the length prefix of a startup packet, if its four bytes are there, and checks
/// it against [`MAX_STARTUP_PACKET_LEN`] before the caller reads the rest.
pub fn peek_startup_len(buf: &[u8]) -> Result<Option<usize>, StartupError> {
    let Some(&[a, b, c, d]) = buf.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([a, b, c, d]) as usize;
    if !(8..=MAX_STARTUP_PACKET_LEN).contains(&len) {
        return Err(StartupError::BadLength(len));
    }
    Ok(Some(len))
}

/// Parses a whole startup packet, length prefix included.
pub fn parse_startup(packet: &[u8]) -> Result<StartupPacket, StartupError> {
    let len = peek_startup_len(packet)?.ok_or(StartupError::BadLength(packet.len()))?;
    if len != packet.len() {
        return Err(StartupError::BadLength(packet.len()));
    }
    let code = u32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]);
    let rest = &packet[8..];
    match code {
        SSL_REQUEST_CODE if rest.is_empty() => Ok(StartupPacket::SslRequest),
        GSSENC_REQUEST_CODE if rest.is_empty() => Ok(StartupPacket::GssEncRequest),
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE => Err(StartupError::Malformed("encryption request with a body")),
        CANCEL_REQUEST_CODE => parse_cancel(rest),
        _ => {
            let (major, minor) = ((code >> 16) as u16, (code & 0xffff) as u16);
            if major != 3 {
                return Err(StartupError::UnsupportedVersion { major, minor });
            }
            Ok(StartupPacket::Startup {
                minor_version: minor,
                params: parse_params(rest)?,
            })
        }
    }
}

fn parse_cancel(rest: &[u8]) -> Result<StartupPacket, StartupError> {
    let (Some(pid), Some(secret)) = (rest.get(..4), rest.get(4..)) else {
        return Err(StartupError::Malformed("cancel request too short"));
    };
    if !(4..=256).contains(&secret.len()) {
        return Err(StartupError::Malformed("cancel key length"));
    }
    Ok(StartupPacket::Cancel(CancelKey {
        process_id: u32::from_be_bytes([pid[0], pid[1], pid[2], pid[3]]),
        secret: Bytes::copy_from_slice(secret),
    }))
}

/// `name\0value\0 … \0`: pairs of NUL-terminated strings ending with an empty name.
fn parse_params(mut rest: &[u8]) -> Result<Vec<(String, String)>, StartupError> {
    let mut params: Vec<(String, String)> = Vec::new();
    loop {
        let (name, after_name) = cstr(rest)?;
        if name.is_empty() {
            if !after_name.is_empty() {
                return Err(StartupError::Malformed("bytes after the parameter list"));
            }
            return Ok(params);
        }
        let (value, after_value) = cstr(after_name)?;
        if params.iter().any(|(seen, _)| seen == name) {
            return Err(StartupError::Malformed("duplicate parameter"));
        }
        params.push((name.to_owned(), value.to_owned()));
        rest = after_value;
    }
}

fn cstr(buf: &[u8]) -> Result<(&str, &[u8]), StartupError> {
    let end = buf
        .iter()
        .position(|&b| b == 0)
        .ok_or(StartupError::Malformed("missing terminator"))?;
    let text = std::str::from_utf8(&buf[..end]).map_err(|_| StartupError::Malformed("parameter is not UTF-8"))?;
    Ok((text, &buf[end + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn packet(code: u32, body: &[u8]) -> Vec<u8> {
        let mut out = ((body.len() + 8) as u32).to_be_bytes().to_vec();
        out.extend_from_slice(&code.to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn parses_a_startup_message() {
        let packet = packet(196_608, b"user\0app\0database\0db\0\0");
        assert_eq!(
            parse_startup(&packet).unwrap(),
            StartupPacket::Startup {
                minor_version: 0,
                params: vec![("user".into(), "app".into()), ("database".into(), "db".into())],
            }
        );
    }

    #[test]
    fn parses_requests_and_cancels() {
        assert_eq!(
            parse_startup(&packet(SSL_REQUEST_CODE, b"")).unwrap(),
            StartupPacket::SslRequest
        );
        assert_eq!(
            parse_startup(&packet(GSSENC_REQUEST_CODE, b"")).unwrap(),
            StartupPacket::GssEncRequest
        );
        let cancel = parse_startup(&packet(CANCEL_REQUEST_CODE, &[0, 0, 0, 7, 1, 2, 3, 4])).unwrap();
        assert_eq!(
            cancel,
            StartupPacket::Cancel(CancelKey {
                process_id: 7,
                secret: Bytes::from_static(&[1, 2, 3, 4])
            })
        );
    }

    #[test]
    fn refuses_bad_packets() {
        assert_eq!(
            parse_startup(&packet(2 << 16, b"\0")),
            Err(StartupError::UnsupportedVersion { major: 2, minor: 0 })
        );
        assert!(parse_startup(&packet(196_608, b"user\0app")).is_err());
        assert!(parse_startup(&packet(196_608, b"user\0a\0user\0b\0\0")).is_err());
        assert!(parse_startup(&packet(196_608, b"user\0\xff\0\0")).is_err());
        assert!(parse_startup(&packet(CANCEL_REQUEST_CODE, &[0, 0, 0, 7])).is_err());
        assert_eq!(peek_startup_len(&[0, 1, 0, 0]), Err(StartupError::BadLength(65_536)));
        assert_eq!(peek_startup_len(&[0, 0, 0, 3]), Err(StartupError::BadLength(3)));
        assert_eq!(peek_startup_len(&[0, 0]), Ok(None));
    }

    proptest! {
        #[test]
        fn arbitrary_packets_never_panic(body in proptest::collection::vec(any::<u8>(), 0..600), code in any::<u32>()) {
            let _ = parse_startup(&packet(code, &body));
            let _ = parse_startup(&body);
            let _ = peek_startup_len(&body);
        }

        #[test]
        fn well_formed_parameters_round_trip(params in proptest::collection::btree_map("[a-z_]{1,12}", "[ -~]{0,20}", 0..8)) {
            let mut body = Vec::new();
            for (name, value) in &params {
                body.extend_from_slice(name.as_bytes());
                body.push(0);
                body.extend_from_slice(value.as_bytes());
                body.push(0);
            }
            body.push(0);
            let parsed = parse_startup(&packet(196_608, &body)).unwrap();
            let expected: Vec<_> = params.into_iter().collect();
            prop_assert_eq!(parsed, StartupPacket::Startup { minor_version: 0, params: expected });
        }
    }
}
