//! Error types. Each carries the context a person needs: the key, the path, or the server's word.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// The machine-readable code in an error response (`"error":"<code>"`); stable wire contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    BadRequest,
    InvalidKey,
    NotFound,
    TooLarge,
    WrongMode,
    TooManyConnections,
    Timeout,
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::InvalidKey => "invalid_key",
            ErrorCode::NotFound => "not_found",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::WrongMode => "wrong_mode",
            ErrorCode::TooManyConnections => "too_many_connections",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Internal => "internal",
        }
    }

    /// The code for a wire string; `None` for codes this version does not know.
    pub fn from_wire(code: &str) -> Option<ErrorCode> {
        Some(match code {
            "bad_request" => ErrorCode::BadRequest,
            "invalid_key" => ErrorCode::InvalidKey,
            "not_found" => ErrorCode::NotFound,
            "too_large" => ErrorCode::TooLarge,
            "wrong_mode" => ErrorCode::WrongMode,
            "too_many_connections" => ErrorCode::TooManyConnections,
            "timeout" => ErrorCode::Timeout,
            "internal" => ErrorCode::Internal,
            _ => return None,
        })
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed disk operation, with the file it concerned.
#[derive(Debug)]
pub struct DiskError {
    pub action: &'static str,
    pub path: PathBuf,
    pub source: io::Error,
}

impl DiskError {
    pub fn new(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> DiskError {
        DiskError {
            action,
            path: path.into(),
            source,
        }
    }
}

impl fmt::Display for DiskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot {} {}: {}",
            self.action,
            self.path.display(),
            self.source
        )
    }
}

impl std::error::Error for DiskError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// An error seen by a user of the [`Client`](crate::Client).
#[derive(Debug)]
pub enum Error {
    /// The socket could not be reached, or the connection broke.
    Io(io::Error),
    /// The server answered with an error response.
    Server {
        /// `None` when the server sent a code this client does not know (`raw_code` has it).
        code: Option<ErrorCode>,
        raw_code: String,
        message: String,
    },
    /// The server sent something that is not a valid response.
    Protocol(String),
}

impl Error {
    /// The server's error code, if this is a server error.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Server { code, .. } => *code,
            _ => None,
        }
    }

    pub fn is_not_found(&self) -> bool {
        self.code() == Some(ErrorCode::NotFound)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io(err) => write!(f, "connection to nkv failed: {err}"),
            Error::Server {
                raw_code, message, ..
            } => write!(f, "{raw_code}: {message}"),
            Error::Protocol(what) => write!(f, "unexpected response from nkv: {what}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io(err) => Some(err),
            _ => None,
        }
    }
}

impl From<io::Error> for Error {
    fn from(err: io::Error) -> Error {
        Error::Io(err)
    }
}
