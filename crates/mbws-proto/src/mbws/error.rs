//! The MBWS error-code table (docs/PROTOCOL.md, "Errors") and the decoder's error type.
//!
//! Codes mirror HTTP status codes inside the WebSocket private-use range 4000-4999, so that a
//! fatal ERROR and the WebSocket close that follows it carry the same number.

use std::fmt;

/// An MBWS error code. The numeric value is both the ERROR frame's `code` and, for fatal errors,
/// the WebSocket close code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// The frame could not be decoded: bad layout, missing or invalid field, bad UTF-8.
    MalformedFrame = 4400,
    /// OPEN carried no or wrong credentials where the broker requires them.
    Unauthenticated = 4401,
    /// The session may not do this (permissions).
    Forbidden = 4403,
    /// OPEN named a session the broker does not know or that has expired.
    UnknownSession = 4404,
    /// The frame is valid but not allowed now (e.g. SEND before OPEN, a second OPEN).
    InvalidState = 4405,
    /// The peer stayed silent past the heartbeat or handshake deadline.
    Timeout = 4408,
    /// An identifier is already in use (e.g. a subscription id), or a sequence gap.
    Conflict = 4409,
    /// A frame, address, header block or credit is over its announced limit.
    TooLarge = 4413,
    /// In a cluster: this node does not serve the address now (another node owns it, or this
    /// node lost its lease and cannot prove it owns it); the reason names the owner to go to.
    Misdirected = 4421,
    /// A queue or buffer is full: the broker refuses work rather than grow without bound.
    Overloaded = 4429,
    /// A bug or an unexpected failure inside the broker.
    Internal = 4500,
    /// The broker is shutting down.
    Unavailable = 4503,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 12] = [
        ErrorCode::MalformedFrame,
        ErrorCode::Unauthenticated,
        ErrorCode::Forbidden,
        ErrorCode::UnknownSession,
        ErrorCode::InvalidState,
        ErrorCode::Timeout,
        ErrorCode::Conflict,
        ErrorCode::TooLarge,
        ErrorCode::Misdirected,
        ErrorCode::Overloaded,
        ErrorCode::Internal,
        ErrorCode::Unavailable,
    ];

    pub fn as_u16(self) -> u16 {
        self as u16
    }

    pub fn from_u16(code: u16) -> Option<ErrorCode> {
        ErrorCode::ALL.iter().copied().find(|known| known.as_u16() == code)
    }

    /// A short name, as in the table of docs/PROTOCOL.md.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::MalformedFrame => "malformed-frame",
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::UnknownSession => "unknown-session",
            ErrorCode::InvalidState => "invalid-state",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Conflict => "conflict",
            ErrorCode::TooLarge => "too-large",
            ErrorCode::Misdirected => "misdirected",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::Internal => "internal",
            ErrorCode::Unavailable => "unavailable",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.as_u16(), self.name())
    }
}

/// Why a payload is not a valid MBWS frame. `reason` says which field and which limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    pub code: ErrorCode,
    pub reason: String,
}

impl DecodeError {
    pub fn malformed(reason: impl Into<String>) -> DecodeError {
        DecodeError { code: ErrorCode::MalformedFrame, reason: reason.into() }
    }

    pub fn too_large(reason: impl Into<String>) -> DecodeError {
        DecodeError { code: ErrorCode::TooLarge, reason: reason.into() }
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.reason)
    }
}

impl std::error::Error for DecodeError {}
