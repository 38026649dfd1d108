//! The engine's one error type: a kind, the operation, the peer, a message and the cause.
//!
//! Invariants:
//! - ERR-1: every message says what happened, with whom (when there is a peer), in which operation,
//!   and, where a knob exists, which one to turn.
//! - ERR-2: kinds are stable and exhaustive; the Python bindings map each one to one exception class.

use std::fmt;
use std::sync::Arc;

/// What went wrong, coarsely, for callers that branch on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// A deadline passed.
    Timeout,
    /// The peer went away (reset, EOF without a close, process killed).
    PeerLost,
    /// The object was closed (locally, or the peer closed it in an orderly way).
    Closed,
    /// The peer sent bytes that are not a valid frame, or a frame beyond our limits.
    Protocol,
    /// Authentication failed (wrong or missing secret).
    Auth,
    /// The data does not match what the caller expected (dtype, shape, size, count).
    Mismatch,
    /// A value cannot be sent (unsupported type, int out of range, too deep).
    Unsupported,
    /// A malformed environment variable or argument.
    Config,
    /// The operating system refused a resource (socket, memory, file descriptors).
    Resource,
    /// The operation was interrupted (Ctrl-C) or cancelled.
    Cancelled,
    /// A worker (a map thread or process, a pool job) failed: panicked, raised, or died.
    Worker,
}

impl ErrorKind {
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Timeout => "timeout",
            ErrorKind::PeerLost => "peer lost",
            ErrorKind::Closed => "closed",
            ErrorKind::Protocol => "protocol error",
            ErrorKind::Auth => "authentication failed",
            ErrorKind::Mismatch => "mismatch",
            ErrorKind::Unsupported => "unsupported value",
            ErrorKind::Config => "configuration error",
            ErrorKind::Resource => "resource error",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::Worker => "worker failed",
        }
    }
}

/// The error type of the engine.
#[derive(Clone)]
pub struct Error {
    kind: ErrorKind,
    op: &'static str,
    peer: Option<String>,
    message: String,
    source: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: ErrorKind, op: &'static str, message: impl Into<String>) -> Error {
        Error {
            kind,
            op,
            peer: None,
            message: message.into(),
            source: None,
        }
    }

    /// An error from an OS error code, classified (resets and broken pipes are `PeerLost`).
    pub fn os(op: &'static str, what: &str, err: std::io::Error) -> Error {
        let kind = match err.raw_os_error() {
            Some(
                libc::ECONNRESET
                | libc::EPIPE
                | libc::ECONNABORTED
                | libc::ENOTCONN
                | libc::ESHUTDOWN,
            ) => ErrorKind::PeerLost,
            Some(libc::ETIMEDOUT) => ErrorKind::Timeout,
            Some(libc::EINTR) => ErrorKind::Cancelled,
            _ => ErrorKind::Resource,
        };
        Error {
            kind,
            op,
            peer: None,
            message: format!("{what}: {err}"),
            source: Some(Arc::new(err)),
        }
    }

    pub fn with_peer(mut self, peer: impl Into<String>) -> Error {
        if self.peer.is_none() {
            self.peer = Some(peer.into());
        }
        self
    }

    pub fn with_op(mut self, op: &'static str) -> Error {
        self.op = op;
        self
    }

    /// The error that caused this one (its `source()`).
    pub fn with_cause(mut self, cause: Error) -> Error {
        self.source = Some(Arc::new(cause));
        self
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
    pub fn op(&self) -> &'static str {
        self.op
    }
    pub fn peer(&self) -> Option<&str> {
        self.peer.as_deref()
    }
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.op, self.kind.name())?;
        if let Some(p) = &self.peer {
            write!(f, " (peer {p})")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Error({:?}, {self})", self.kind)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|s| s.as_ref() as &(dyn std::error::Error + 'static))
    }
}

/// Shorthands used across the crate.
pub(crate) fn timeout(op: &'static str, what: impl fmt::Display) -> Error {
    Error::new(
        ErrorKind::Timeout,
        op,
        format!(
            "{what} did not complete before the deadline (pass a longer timeout, or raise PARALLEL_TIMEOUT)"
        ),
    )
}

/// A `Protocol` error: bytes from a peer or from shared memory broke the format (public for
/// parallel-workers, which decodes shared memory too).
pub fn protocol(op: &'static str, what: impl Into<String>) -> Error {
    Error::new(ErrorKind::Protocol, op, what)
}
