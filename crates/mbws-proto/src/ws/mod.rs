//! RFC 6455 WebSocket, hand-written and sans-IO.
//!
//! - [`handshake`]: HTTP/1.1 upgrade request parsing (tolerates a request split across reads and
//!   a first frame in the same read), `Sec-WebSocket-Accept`, subprotocol negotiation, and the
//!   HTTP error responses for refused upgrades. Also the client side (request, response check).
//! - [`frame`]: frame header decode/encode, masking (in place, a word at a time). Payloads are
//!   split off the read buffer as `Bytes` without copying.
//! - [`message`]: message assembly: fragmentation, interleaved control frames, UTF-8 validation
//!   (also across fragment boundaries), close-frame validation, size limits.
//!
//! Nothing here reads a socket or a clock: bytes in, events and bytes out.

pub mod frame;
pub mod handshake;
pub mod message;

use std::fmt;

/// Which side of the connection this endpoint is: a server requires masked client frames and
/// sends unmasked ones; a client the reverse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Server,
    Client,
}

/// WebSocket opcodes (RFC 6455 section 5.2). Reserved opcodes are rejected by the decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum OpCode {
    Continuation = 0x0,
    Text = 0x1,
    Binary = 0x2,
    Close = 0x8,
    Ping = 0x9,
    Pong = 0xA,
}

impl OpCode {
    pub fn is_control(self) -> bool {
        (self as u8) & 0x8 != 0
    }
}

/// Close codes this implementation sends (RFC 6455 section 7.4.1).
pub mod close_code {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const UNSUPPORTED_DATA: u16 = 1003;
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const POLICY_VIOLATION: u16 = 1008;
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    pub const INTERNAL_ERROR: u16 = 1011;
}

/// A WebSocket protocol violation: the connection must be closed with `close_code`, and
/// `reason` (at most 123 bytes of UTF-8 once truncated) goes into the close frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsError {
    pub close_code: u16,
    pub reason: String,
}

impl WsError {
    pub fn new(close_code: u16, reason: impl Into<String>) -> WsError {
        WsError { close_code, reason: reason.into() }
    }

    pub fn protocol(reason: impl Into<String>) -> WsError {
        WsError::new(close_code::PROTOCOL_ERROR, reason)
    }
}

impl fmt::Display for WsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "websocket close {}: {}", self.close_code, self.reason)
    }
}

impl std::error::Error for WsError {}
