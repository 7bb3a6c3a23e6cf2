//! A client that speaks the protocol message by message, for tests that need to send
//! exactly the bytes a driver would, or bytes no driver sends.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::Proxy;

/// One message from the server: its type, and the SQLSTATE or command tag it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Error(String),
    Complete(String),
    Ready(char),
    Other(char),
}

/// The replies as short text: `1 2 D C:SELECT 1 Z:I E:42P01`.
pub fn show(replies: &[Reply]) -> String {
    replies
        .iter()
        .map(|reply| match reply {
            Reply::Error(code) => format!("E:{code}"),
            Reply::Complete(tag) => format!("C:{tag}"),
            Reply::Ready(status) => format!("Z:{status}"),
            Reply::Other(tag) => tag.to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A client speaking the protocol message by message.
pub struct Raw {
    pub stream: TcpStream,
    pub input: Vec<u8>,
}

impl Raw {
    /// Logs in as `app_trust` (trust on both sides) to database `app`.
    pub async fn connect(proxy: &Proxy) -> Raw {
        Raw::connect_to(&proxy.addr.to_string()).await
    }

    pub async fn connect_to(addr: &str) -> Raw {
        Raw::connect_named(addr, "").await
    }

    /// Logs in as `app_trust` to database `app` with `application_name` (unless empty), by
    /// which the test can find the server connection it gets in pg_stat_activity.
    pub async fn connect_named(addr: &str, application_name: &str) -> Raw {
        Raw::connect_keyed(addr, application_name).await.0
    }

    /// [`Raw::connect_named`], with the cancel key the login gave (BackendKeyData).
    pub async fn connect_keyed(addr: &str, application_name: &str) -> (Raw, CancelKey) {
        let mut body = 196_608u32.to_be_bytes().to_vec();
        body.extend_from_slice(b"user\0app_trust\0database\0app\0");
        if !application_name.is_empty() {
            body.extend_from_slice(format!("application_name\0{application_name}\0").as_bytes());
        }
        body.push(0);
        let mut packet = ((body.len() + 4) as u32).to_be_bytes().to_vec();
        packet.extend_from_slice(&body);
        let mut raw = Raw {
            stream: TcpStream::connect(addr).await.unwrap(),
            input: Vec::new(),
        };
        raw.stream.write_all(&packet).await.unwrap();
        let mut key = None;
        let mut login = Vec::new();
        loop {
            let (tag, body) = raw.next_message().await;
            if tag == b'K' && body.len() == 8 {
                key = Some(CancelKey {
                    process_id: u32::from_be_bytes([body[0], body[1], body[2], body[3]]),
                    secret: u32::from_be_bytes([body[4], body[5], body[6], body[7]]),
                });
            }
            login.push(parse_reply(&[&[tag, 0, 0, 0, 0][..], &body].concat()));
            if tag == b'Z' {
                break;
            }
        }
        assert_eq!(login.last(), Some(&Reply::Ready('I')), "{}", show(&login));
        (raw, key.expect("BackendKeyData"))
    }

    /// Replies until the `count`-th ReadyForQuery, as [`show`] gives them but with each
    /// error's message: `G E:57014:COPY from stdin failed: why Z:I`.
    pub async fn transcript_until_ready(&mut self, count: usize) -> String {
        let mut parts = Vec::new();
        let mut seen = 0;
        while seen < count {
            let (tag, body) = self.next_message().await;
            let whole = [&[tag, 0, 0, 0, 0][..], &body].concat();
            match parse_reply(&whole) {
                Reply::Error(code) => parts.push(format!("E:{code}:{}", error_message(&body))),
                reply => {
                    seen += usize::from(matches!(reply, Reply::Ready(_)));
                    parts.push(show(&[reply]));
                }
            }
        }
        parts.join(" ")
    }

    /// Logs in as `app_trust` to database `app` at `addr` with more startup parameters;
    /// returns the client and the ParameterStatus values it was greeted with.
    pub async fn connect_with(addr: &str, params: &[(&str, &str)]) -> (Raw, Vec<(String, String)>) {
        let mut body = 196_608u32.to_be_bytes().to_vec();
        body.extend_from_slice(b"user\0app_trust\0database\0app\0");
        for (name, value) in params {
            cstr(&mut body, name);
            cstr(&mut body, value);
        }
        body.push(0);
        let mut packet = ((body.len() + 4) as u32).to_be_bytes().to_vec();
        packet.extend_from_slice(&body);
        let mut raw = Raw {
            stream: TcpStream::connect(addr).await.unwrap(),
            input: Vec::new(),
        };
        raw.stream.write_all(&packet).await.unwrap();
        let mut reported = Vec::new();
        for (tag, body) in raw.messages_until_ready().await {
            match tag {
                b'S' => {
                    let mut parts = body
                        .split(|&b| b == 0)
                        .map(|part| String::from_utf8_lossy(part).into_owned());
                    reported.push((parts.next().unwrap(), parts.next().unwrap()));
                }
                b'E' => panic!("login refused: {:?}", String::from_utf8_lossy(&body)),
                _ => {}
            }
        }
        (raw, reported)
    }

    /// The messages up to and including the next ReadyForQuery, as (type, body).
    pub async fn messages_until_ready(&mut self) -> Vec<(u8, Vec<u8>)> {
        let mut messages = Vec::new();
        loop {
            let message = self.next_message().await;
            let ready = message.0 == b'Z';
            messages.push(message);
            if ready {
                return messages;
            }
        }
    }

    pub async fn send(&mut self, messages: &[Vec<u8>]) {
        self.stream.write_all(&messages.concat()).await.unwrap();
    }

    /// Sends `bytes` in pieces cut at `cuts` (offsets into `bytes`), each written on its
    /// own after a short pause, so that pgrelay reads them as separate segments.
    pub async fn send_split(&mut self, bytes: &[u8], cuts: &[usize]) {
        self.stream.set_nodelay(true).unwrap();
        let mut start = 0;
        for &cut in cuts.iter().chain(std::iter::once(&bytes.len())) {
            let cut = cut.clamp(start, bytes.len());
            if cut > start {
                self.stream.write_all(&bytes[start..cut]).await.unwrap();
                self.stream.flush().await.unwrap();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            start = cut;
        }
    }

    /// Reads replies until the `count`-th ReadyForQuery; fails after 10 s.
    pub async fn replies_until_ready(&mut self, count: usize) -> Vec<Reply> {
        let mut replies = Vec::new();
        let mut seen = 0;
        while seen < count {
            let reply = self.next_reply().await;
            seen += usize::from(matches!(reply, Reply::Ready(_)));
            replies.push(reply);
        }
        replies
    }

    /// Reads replies up to and including one of type `tag`.
    pub async fn replies_until(&mut self, tag: char) -> Vec<Reply> {
        let mut replies = Vec::new();
        loop {
            let reply = self.next_reply().await;
            let done = match &reply {
                Reply::Error(_) => tag == 'E',
                Reply::Complete(_) => tag == 'C',
                Reply::Ready(_) => tag == 'Z',
                Reply::Other(other) => *other == tag,
            };
            replies.push(reply);
            if done {
                return replies;
            }
        }
    }

    /// Nothing arrives within `wait`: the server owes nothing more.
    pub async fn assert_quiet(&mut self, wait: Duration) {
        let mut byte = [0u8; 1];
        match tokio::time::timeout(wait, self.stream.peek(&mut byte)).await {
            Err(_) => {}
            Ok(result) => assert!(
                self.input.is_empty() && result.is_err(),
                "unexpected reply: {:?}",
                self.next_reply().await
            ),
        }
    }

    pub async fn next_reply(&mut self) -> Reply {
        let (tag, body) = self.next_message().await;
        let mut whole = vec![tag, 0, 0, 0, 0];
        whole.extend_from_slice(&body);
        parse_reply(&whole)
    }

    /// The next whole message: its type and body. Fails after 10 s without a byte.
    pub async fn next_message(&mut self) -> (u8, Vec<u8>) {
        loop {
            if self.input.len() >= 5 {
                let len = u32::from_be_bytes([self.input[1], self.input[2], self.input[3], self.input[4]]) as usize;
                if self.input.len() > len {
                    let tag = self.input[0];
                    let body = self.input[5..=len].to_vec();
                    self.input.drain(..=len);
                    return (tag, body);
                }
            }
            let mut chunk = vec![0u8; 64 * 1024];
            let read = tokio::time::timeout(Duration::from_secs(10), self.stream.read(&mut chunk))
                .await
                .expect("a reply within 10 s")
                .unwrap();
            assert!(read > 0, "pgrelay closed the connection");
            self.input.extend_from_slice(&chunk[..read]);
        }
    }
}

/// A backend's cancel key, as BackendKeyData gave it.
#[derive(Debug, Clone, Copy)]
pub struct CancelKey {
    pub process_id: u32,
    pub secret: u32,
}

/// Sends a CancelRequest for `key` to `addr` and returns once the other side has closed
/// the connection: PostgreSQL closes it after it has signalled the backend.
pub async fn cancel(addr: &str, key: CancelKey) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut packet = 16u32.to_be_bytes().to_vec();
    packet.extend_from_slice(&80_877_102u32.to_be_bytes());
    packet.extend_from_slice(&key.process_id.to_be_bytes());
    packet.extend_from_slice(&key.secret.to_be_bytes());
    stream.write_all(&packet).await.unwrap();
    let mut sink = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        while stream.read(&mut sink).await.unwrap_or(0) > 0 {}
    })
    .await;
    assert!(closed.is_ok(), "the cancel connection was not closed within 10 s");
}

/// The message (field M) of an ErrorResponse or NoticeResponse body.
pub fn error_message(body: &[u8]) -> String {
    body.split(|&b| b == 0)
        .find_map(|field| field.strip_prefix(b"M"))
        .map(|text| String::from_utf8_lossy(text).into_owned())
        .unwrap_or_default()
}

pub fn parse_reply(message: &[u8]) -> Reply {
    let body = &message[5..];
    match message[0] {
        b'E' => {
            let code = body
                .split(|&b| b == 0)
                .find_map(|field| field.strip_prefix(b"C"))
                .map(|code| String::from_utf8_lossy(code).into_owned())
                .unwrap_or_default();
            Reply::Error(code)
        }
        b'C' => Reply::Complete(String::from_utf8_lossy(&body[..body.len() - 1]).into_owned()),
        b'Z' => Reply::Ready(body[0] as char),
        tag => Reply::Other(tag as char),
    }
}

pub fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

pub fn cstr(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(text.as_bytes());
    out.push(0);
}

pub fn query(sql: &str) -> Vec<u8> {
    let mut body = Vec::new();
    cstr(&mut body, sql);
    message(b'Q', &body)
}

pub fn parse(name: &str, sql: &str) -> Vec<u8> {
    let mut body = Vec::new();
    cstr(&mut body, name);
    cstr(&mut body, sql);
    body.extend_from_slice(&0u16.to_be_bytes());
    message(b'P', &body)
}

/// Binds the unnamed portal with text parameters.
pub fn bind(statement: &str, params: &[&str]) -> Vec<u8> {
    let mut body = Vec::new();
    cstr(&mut body, "");
    cstr(&mut body, statement);
    body.extend_from_slice(&0u16.to_be_bytes());
    body.extend_from_slice(&(params.len() as u16).to_be_bytes());
    for param in params {
        body.extend_from_slice(&(param.len() as i32).to_be_bytes());
        body.extend_from_slice(param.as_bytes());
    }
    body.extend_from_slice(&0u16.to_be_bytes());
    message(b'B', &body)
}

pub fn execute() -> Vec<u8> {
    message(b'E', b"\0\0\0\0\0")
}

pub fn sync() -> Vec<u8> {
    message(b'S', b"")
}

pub fn close_statement(name: &str) -> Vec<u8> {
    let mut body = vec![b'S'];
    cstr(&mut body, name);
    message(b'C', &body)
}

pub fn copy_data(data: &str) -> Vec<u8> {
    message(b'd', data.as_bytes())
}

/// Flush: the server sends what it has, without a Sync.
pub fn flush() -> Vec<u8> {
    message(b'H', b"")
}

pub fn copy_done() -> Vec<u8> {
    message(b'c', b"")
}

/// A Query of `sql` as bytes: text in any client encoding.
pub fn query_bytes(sql: &[u8]) -> Vec<u8> {
    let mut body = sql.to_vec();
    body.push(0);
    message(b'Q', &body)
}

/// A Parse of `sql` under `name`, both bytes in any client encoding, with no types given.
pub fn parse_bytes(name: &[u8], sql: &[u8]) -> Vec<u8> {
    let mut body = name.to_vec();
    body.push(0);
    body.extend_from_slice(sql);
    body.push(0);
    body.extend_from_slice(&0u16.to_be_bytes());
    message(b'P', &body)
}

/// Binds the unnamed portal to statement `name` (bytes) with text parameters.
pub fn bind_bytes(name: &[u8], params: &[&[u8]]) -> Vec<u8> {
    let mut body = vec![0];
    body.extend_from_slice(name);
    body.push(0);
    body.extend_from_slice(&0u16.to_be_bytes());
    body.extend_from_slice(&(params.len() as u16).to_be_bytes());
    for param in params {
        body.extend_from_slice(&(param.len() as i32).to_be_bytes());
        body.extend_from_slice(param);
    }
    body.extend_from_slice(&0u16.to_be_bytes());
    message(b'B', &body)
}

/// The values of a DataRow body; `None` is NULL.
pub fn row_values(body: &[u8]) -> Vec<Option<Vec<u8>>> {
    let count = u16::from_be_bytes([body[0], body[1]]) as usize;
    let mut rest = &body[2..];
    let mut values = Vec::with_capacity(count);
    for _ in 0..count {
        let len = i32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
        rest = &rest[4..];
        if len < 0 {
            values.push(None);
        } else {
            values.push(Some(rest[..len as usize].to_vec()));
            rest = &rest[len as usize..];
        }
    }
    values
}

/// A field of an ErrorResponse or NoticeResponse body, as bytes.
pub fn error_field(body: &[u8], field: u8) -> Option<Vec<u8>> {
    body.split(|&b| b == 0)
        .find(|part| part.first() == Some(&field))
        .map(|part| part[1..].to_vec())
}

/// CopyFail: the client abandons COPY FROM STDIN, giving `reason`.
pub fn copy_fail(reason: &str) -> Vec<u8> {
    let mut body = Vec::new();
    cstr(&mut body, reason);
    message(b'f', &body)
}
