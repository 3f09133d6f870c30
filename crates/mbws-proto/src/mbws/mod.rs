//! MBWS, the MessageBroker WebSocket Subprotocol, as this project defines it (docs/PROTOCOL.md).
//!
//! Sans-IO: this module turns WebSocket message payloads into [`Frame`]s and frames back into
//! bytes. It never touches a socket or a clock. Decoding borrows from the payload `Bytes`
//! (string fields and body are slices of it); encoding writes the header part of a frame into a
//! caller's buffer and leaves the body to be sent as its own `Bytes` (zero copy).
//!
//! - [`frame`]: the frame model shared by both bindings.
//! - [`binary`]: the binary binding (fixed-position fields, network byte order).
//! - [`text`]: the text binding (`name:value` lines, blank line, body).
//! - [`validate`]: the field rules both bindings share (lengths, characters, limits).
//! - [`error`]: the error-code table and [`DecodeError`].

pub mod binary;
pub mod error;
pub mod frame;
pub(crate) mod text;
pub(crate) mod validate;

/// The text binding's MESSAGE header in two parts, for a sender that encodes the part every
/// delivery of a message shares once and writes only the numbers per delivery.
pub mod text_message {
    pub use super::text::{encode_message_numbers, encode_message_shared, message_shared_len, put_message_shared};
}

#[cfg(test)]
mod codec_tests;

pub use error::{DecodeError, ErrorCode};
pub use frame::*;

use bytes::{BufMut, Bytes, BytesMut};

/// Limits a decoder enforces on untrusted input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CodecLimits {
    pub max_address_bytes: usize,
    pub max_headers: usize,
    /// Total bytes of properties and application headers (names + values) on one message.
    pub max_header_bytes: usize,
}

/// The defaults of the broker's `max-address-bytes`, `max-headers` and `max-header-bytes` (the
/// broker's `Config::default` takes them from here), and what clients and tests decode with.
impl Default for CodecLimits {
    fn default() -> Self {
        CodecLimits { max_address_bytes: 255, max_headers: 64, max_header_bytes: 16 * 1024 }
    }
}

/// The credit this project's broker gives a SUBSCRIBE whose credit is 0 (capped at its
/// `max-credit`; docs/PROTOCOL.md 7.1), and the credit the `mbws` CLI subscribes with when not
/// told otherwise: one constant, so the two never drift apart.
pub const DEFAULT_CREDIT: u32 = 1000;

/// Decodes one MBWS frame from one complete WebSocket message payload.
pub fn decode(binding: Binding, payload: Bytes, limits: &CodecLimits) -> Result<Frame, DecodeError> {
    match binding {
        Binding::Binary => binary::decode(payload, limits),
        Binding::Text => text::decode(payload, limits),
    }
}

/// A text-binding SEND of the common shape (no properties, no application headers, no CR),
/// decoded from a slice straight into the message it becomes. `None` for any other payload,
/// faults included, which [`decode`] then reads and reports as before. A `Some` equals
/// [`binary::SendTail::encode`] of the SEND `decode` finds in the same payload; its tail is
/// split off `chunk` ([`binary::MessageTail::encode_into`]: empty, with room for
/// `payload.len()` bytes if the tail is to share its allocation), which `None` leaves as it was.
pub fn decode_plain_text_send(payload: &[u8], limits: &CodecLimits, chunk: &mut BytesMut) -> Option<binary::SendTail> {
    text::decode_plain_send(payload, limits, chunk)
}

/// Writes everything of `frame` except its body into `out`; the body (if any) follows it
/// directly on the wire. Panics if a field cannot be represented in the binding (a string
/// longer than its binary length prefix, a value containing a line feed in text): writing it
/// would corrupt the stream. Frames that pass [`validate::validate_frame`] (every decoded frame
/// does) always encode in both bindings.
pub fn encode_header<B: BufMut>(binding: Binding, frame: &Frame, out: &mut B) {
    match binding {
        Binding::Binary => binary::encode_header(frame, out),
        Binding::Text => text::encode_header(frame, out),
    }
}

/// Writes a MESSAGE up to its body, from borrowed fields (the broker's per-delivery path).
pub fn encode_message_header<B: BufMut>(binding: Binding, message: &MessageHeader<'_>, out: &mut B) {
    match binding {
        Binding::Binary => binary::encode_message_header(message, out),
        Binding::Text => text::encode_message_header(message, out),
    }
}

/// The largest MESSAGE (whole frame, body included) that a message with this address,
/// properties and body length can become on any session: in the larger of the two bindings,
/// with the widest subscription id, delivery seq and message id, and every flag set. The broker
/// refuses a SEND when this is over `max-frame-bytes` (docs/PROTOCOL.md 9), so that no frame it
/// sends exceeds the bound it announced.
pub fn largest_message_bytes(address: &[u8], properties: &Properties, body_len: usize) -> usize {
    let widest = MessageHeader {
        subscription_id: u32::MAX,
        delivery_seq: u64::MAX,
        message_id: u64::MAX,
        address,
        redelivered: true,
        durable: true,
        properties,
    };
    binary::message_header_len(&widest).max(text::widest_message_header_len(address, properties)) + body_len
}

/// [`largest_message_bytes`] of a message kept as a [`binary::MessageTail`]. It runs for every
/// SEND: a message without properties (the common one) costs a constant and two lengths; only
/// one with properties reads them.
pub fn largest_message_bytes_of_tail(tail: &binary::MessageTail) -> usize {
    let binary = binary::MESSAGE_FIXED_BYTES + tail.as_bytes().len();
    let text_header = if tail.has_properties() {
        text::widest_message_header_len(tail.address(), &tail.properties())
    } else {
        text::widest_message_header_len_without_properties(tail.address().len())
    };
    binary.max(text_header + tail.body().len())
}

/// Encodes a whole frame (header and a copy of the body) into one buffer. For clients and
/// tests; the broker sends header and body as separate buffers instead.
pub fn encode(binding: Binding, frame: &Frame) -> BytesMut {
    let body = frame.body().map(|body| body.len()).unwrap_or(0);
    let mut out = BytesMut::with_capacity(64 + body);
    encode_header(binding, frame, &mut out);
    if let Some(body) = frame.body() {
        out.extend_from_slice(body);
    }
    out
}
