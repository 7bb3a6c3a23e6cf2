//! Message type bytes of protocol 3, as enums: one for what clients send, one for what
//! servers send. The same byte means different messages in the two directions.

/// A message a client (frontend) sends after the startup phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrontendTag {
    Bind,
    Close,
    CopyData,
    CopyDone,
    CopyFail,
    Describe,
    Execute,
    Flush,
    FunctionCall,
    Parse,
    /// PasswordMessage, SASLInitialResponse and SASLResponse share this byte.
    Password,
    Query,
    Sync,
    Terminate,
}

impl FrontendTag {
    pub fn from_byte(byte: u8) -> Option<Self> {
        Some(match byte {
            b'B' => Self::Bind,
            b'C' => Self::Close,
            b'd' => Self::CopyData,
            b'c' => Self::CopyDone,
            b'f' => Self::CopyFail,
            b'D' => Self::Describe,
            b'E' => Self::Execute,
            b'H' => Self::Flush,
            b'F' => Self::FunctionCall,
            b'P' => Self::Parse,
            b'p' => Self::Password,
            b'Q' => Self::Query,
            b'S' => Self::Sync,
            b'X' => Self::Terminate,
            _ => return None,
        })
    }

    pub fn byte(self) -> u8 {
        match self {
            Self::Bind => b'B',
            Self::Close => b'C',
            Self::CopyData => b'd',
            Self::CopyDone => b'c',
            Self::CopyFail => b'f',
            Self::Describe => b'D',
            Self::Execute => b'E',
            Self::Flush => b'H',
            Self::FunctionCall => b'F',
            Self::Parse => b'P',
            Self::Password => b'p',
            Self::Query => b'Q',
            Self::Sync => b'S',
            Self::Terminate => b'X',
        }
    }
}

/// A message a PostgreSQL server (backend) sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendTag {
    Authentication,
    BackendKeyData,
    BindComplete,
    CloseComplete,
    CommandComplete,
    CopyData,
    CopyDone,
    CopyInResponse,
    CopyOutResponse,
    CopyBothResponse,
    DataRow,
    EmptyQueryResponse,
    ErrorResponse,
    FunctionCallResponse,
    NegotiateProtocolVersion,
    NoData,
    NoticeResponse,
    NotificationResponse,
    ParameterDescription,
    ParameterStatus,
    ParseComplete,
    PortalSuspended,
    ReadyForQuery,
    RowDescription,
}

impl BackendTag {
    pub fn from_byte(byte: u8) -> Option<Self> {
        Some(match byte {
            b'R' => Self::Authentication,
            b'K' => Self::BackendKeyData,
            b'2' => Self::BindComplete,
            b'3' => Self::CloseComplete,
            b'C' => Self::CommandComplete,
            b'd' => Self::CopyData,
            b'c' => Self::CopyDone,
            b'G' => Self::CopyInResponse,
            b'H' => Self::CopyOutResponse,
            b'W' => Self::CopyBothResponse,
            b'D' => Self::DataRow,
            b'I' => Self::EmptyQueryResponse,
            b'E' => Self::ErrorResponse,
            b'V' => Self::FunctionCallResponse,
            b'v' => Self::NegotiateProtocolVersion,
            b'n' => Self::NoData,
            b'N' => Self::NoticeResponse,
            b'A' => Self::NotificationResponse,
            b't' => Self::ParameterDescription,
            b'S' => Self::ParameterStatus,
            b'1' => Self::ParseComplete,
            b's' => Self::PortalSuspended,
            b'Z' => Self::ReadyForQuery,
            b'T' => Self::RowDescription,
            _ => return None,
        })
    }

    pub fn byte(self) -> u8 {
        match self {
            Self::Authentication => b'R',
            Self::BackendKeyData => b'K',
            Self::BindComplete => b'2',
            Self::CloseComplete => b'3',
            Self::CommandComplete => b'C',
            Self::CopyData => b'd',
            Self::CopyDone => b'c',
            Self::CopyInResponse => b'G',
            Self::CopyOutResponse => b'H',
            Self::CopyBothResponse => b'W',
            Self::DataRow => b'D',
            Self::EmptyQueryResponse => b'I',
            Self::ErrorResponse => b'E',
            Self::FunctionCallResponse => b'V',
            Self::NegotiateProtocolVersion => b'v',
            Self::NoData => b'n',
            Self::NoticeResponse => b'N',
            Self::NotificationResponse => b'A',
            Self::ParameterDescription => b't',
            Self::ParameterStatus => b'S',
            Self::ParseComplete => b'1',
            Self::PortalSuspended => b's',
            Self::ReadyForQuery => b'Z',
            Self::RowDescription => b'T',
        }
    }

    /// Messages whose bodies may be huge and that pgrelay never needs to look inside:
    /// they are forwarded as they arrive instead of being buffered whole.
    pub fn is_streamable(self) -> bool {
        matches!(self, Self::DataRow | Self::CopyData)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_byte_round_trips() {
        for byte in 0..=u8::MAX {
            if let Some(tag) = FrontendTag::from_byte(byte) {
                assert_eq!(tag.byte(), byte);
            }
            if let Some(tag) = BackendTag::from_byte(byte) {
                assert_eq!(tag.byte(), byte);
            }
        }
    }
}
