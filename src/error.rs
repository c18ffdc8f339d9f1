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
    /// The file system is full: the change did not fit and nothing changed.
    NoSpace,
    /// The change is in place, applied and announced, but its fsync failed: it may not
    /// survive a power loss (only with `--fsync`).
    NotDurable,
    /// A compare-and-set (`PUTIF`, `DELIF`, `"if_rev"`) found another revision; nothing changed.
    Conflict,
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
            ErrorCode::NoSpace => "no_space",
            ErrorCode::NotDurable => "not_durable",
            ErrorCode::Conflict => "conflict",
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
            "no_space" => ErrorCode::NoSpace,
            "not_durable" => ErrorCode::NotDurable,
            "conflict" => ErrorCode::Conflict,
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

/// Whether `err` says the file system is full (bytes, inodes or quota).
pub fn is_no_space(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(code) if code == nix::libc::ENOSPC || code == nix::libc::EDQUOT)
}

/// Why a change (put or delete) was not, or not fully, made.
#[derive(Debug)]
pub enum WriteError {
    /// The disk operation failed; nothing changed.
    Failed(DiskError),
    /// The file system is full (bytes or inodes); nothing changed.
    NoSpace(DiskError),
    /// The file would be larger than this process may write (`EFBIG`: the file-size limit,
    /// `ulimit -f`, or the file system's largest file); nothing changed. Answered `no_space`.
    FileTooLarge(DiskError),
    /// The change (revision `rev`) is in place, applied and announced, but its fsync failed.
    NotDurable { rev: u64, source: DiskError },
    /// The data directory was removed or replaced while the server ran; nothing changed.
    DirReplaced(PathBuf),
    /// Every revision up to the limit has been handed out; nothing changed.
    RevisionsExhausted(u64),
    /// A compare-and-set expected another revision; `current` is the key's (0 if absent).
    /// Nothing changed.
    Conflict { expected: u64, current: u64 },
}

impl WriteError {
    /// A failed disk operation, classified: a full file system is [`WriteError::NoSpace`].
    pub fn from_disk(err: DiskError) -> WriteError {
        if is_no_space(&err.source) {
            WriteError::NoSpace(err)
        } else if err.source.raw_os_error() == Some(nix::libc::EFBIG) {
            WriteError::FileTooLarge(err)
        } else {
            WriteError::Failed(err)
        }
    }

    /// The wire code of this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            WriteError::NoSpace(_) | WriteError::FileTooLarge(_) => ErrorCode::NoSpace,
            WriteError::NotDurable { .. } => ErrorCode::NotDurable,
            WriteError::Conflict { .. } => ErrorCode::Conflict,
            WriteError::Failed(_)
            | WriteError::DirReplaced(_)
            | WriteError::RevisionsExhausted(_) => ErrorCode::Internal,
        }
    }
}

impl fmt::Display for WriteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WriteError::Failed(err) => write!(f, "{err}; nothing changed"),
            WriteError::NoSpace(err) => write!(f, "the file system is full ({err}); nothing changed"),
            WriteError::FileTooLarge(err) => write!(
                f,
                "the file would be larger than this server may write (its file-size limit, ulimit -f, or the file system's largest file) ({err}); nothing changed"
            ),
            WriteError::NotDurable { rev, source } => write!(
                f,
                "the change is in place as rev {rev} and subscribers were told, but it may not survive a power loss: {source}"
            ),
            WriteError::DirReplaced(dir) => write!(
                f,
                "the data directory {} was removed or replaced while the server ran; refusing writes (restart the server); nothing changed",
                dir.display()
            ),
            WriteError::RevisionsExhausted(max) => {
                write!(f, "every revision up to {max} has been used; nothing changed")
            }
            WriteError::Conflict { expected, current: 0 } => write!(
                f,
                "the key does not exist, not at rev {expected}; nothing changed"
            ),
            WriteError::Conflict { expected, current } => write!(
                f,
                "the key is at rev {current}, not {expected}; nothing changed"
            ),
        }
    }
}

impl std::error::Error for WriteError {}

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
