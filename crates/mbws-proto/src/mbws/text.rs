//! The text binding: one MBWS frame per WebSocket text message (docs/PROTOCOL.md,
//! "Text binding").
//!
//! ```text
//! SEND                    first line: the frame kind name (FrameKind::name), exactly
//! seq:1                   header lines: `name:value`
//! address:orders
//! x-trace:abc             application headers (SEND, MESSAGE): names start with `x-`
//!                         a blank line ends the header (required, even without a body)
//! {"order":42}            the body (SEND, MESSAGE only): every byte after the blank line
//! ```
//!
//! Rules, decided here and normative in docs/PROTOCOL.md:
//! - Lines end with LF; one CR before the LF is accepted and dropped on decode. The encoder
//!   always writes a bare LF.
//! - A field's value is every byte after the first `:` of its line, exactly: a space after the
//!   colon is part of the value (`address: orders` names the address " orders").
//! - Field names are lowercase and case-sensitive. A name the kind does not define and that does
//!   not start with `x-` is refused (typos are caught, never ignored), so is a field given twice.
//!   `x-` lines are application headers, in SEND and MESSAGE only; their order is kept and a
//!   name may repeat.
//! - Integers are decimal digits only (no sign, no `+`, no spaces); booleans are `true` or
//!   `false`; `mode` is `anycast` or `multicast`; `ack` is `client` or `auto`.
//! - An absent optional field takes its default (0, false, empty, anycast, client). Required
//!   fields (see [`field_table`]) must be present. The encoder writes required fields always and
//!   optional fields only when they differ from their default, in the order of the kind's field
//!   table, so decode(encode(frame)) == frame.
//!
//! Decoding never copies: values and body are `Bytes` slices of the payload. After the lines are
//! taken apart, the shared field rules of [`super::validate`] run, so both bindings accept the
//! same frames (including the binary binding's length maxima, so any frame can be re-sent in
//! either binding).
//!
//! The broker's common text frame, a SEND without properties, has a second reader,
//! [`decode_plain_send`]: from a slice straight into the stored message's tail (one copy, which
//! a text SEND needs anyway, into a chunk the caller shares between tails), taking only frames it can judge completely and leaving every
//! other payload, faults included, to [`decode`] (property tests in `codec_tests` check that
//! what it takes is exactly what `decode` finds).

use bytes::{BufMut, Bytes, BytesMut};

use super::binary::{MessageTail, SendTail};
use super::frame::*;
use super::validate::{check_address, excerpt, max_header_count, too_many_headers, trailing_bytes, validate_frame};
use super::{CodecLimits, DecodeError};

/// Whether a text field must be present.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    Required,
    Optional,
}

use Presence::{Optional, Required};

/// The fields a kind defines, in the order the encoder writes them, and whether each is
/// required. Application headers (`x-*`) come after them, in SEND and MESSAGE only.
pub fn field_table(kind: FrameKind) -> &'static [(&'static str, Presence)] {
    match kind {
        FrameKind::Open => &[
            ("version", Required),
            ("session-id", Optional),
            ("last-received-seq", Optional),
            ("heartbeat-ms", Optional),
            ("login", Optional),
            ("passcode", Optional),
        ],
        FrameKind::Opened => &[
            ("version", Required),
            ("session-id", Required),
            ("resumed", Optional),
            ("last-received-seq", Optional),
            ("heartbeat-ms", Optional),
            ("session-expiry-ms", Optional),
            ("max-frame-bytes", Required),
            ("max-address-bytes", Required),
            ("max-headers", Required),
            ("max-header-bytes", Required),
            ("max-credit", Required),
            ("max-subscriptions", Required),
            ("max-inflight-sends", Required),
            ("max-queued-messages", Required),
            ("server", Optional),
        ],
        FrameKind::Send => &[
            ("seq", Optional),
            ("address", Required),
            ("durable", Optional),
            ("ttl-ms", Optional),
            ("content-type", Optional),
            ("correlation-id", Optional),
            ("reply-to", Optional),
        ],
        FrameKind::Receipt => &[("seq", Required)],
        FrameKind::Subscribe => &[
            ("subscription-id", Required),
            ("address", Required),
            ("mode", Optional),
            ("ack", Optional),
            ("credit", Optional),
        ],
        FrameKind::Subscribed | FrameKind::Unsubscribe => &[("subscription-id", Required)],
        FrameKind::Message => &[
            ("subscription-id", Required),
            ("delivery-seq", Required),
            ("message-id", Required),
            ("address", Required),
            ("redelivered", Optional),
            ("durable", Optional),
            ("content-type", Optional),
            ("correlation-id", Optional),
            ("reply-to", Optional),
        ],
        FrameKind::Ack => &[("delivery-seq", Required), ("cumulative", Optional)],
        // `requeue` is required: a NACK that forgot it must not silently drop the message.
        FrameKind::Nack => &[("delivery-seq", Required), ("requeue", Required)],
        FrameKind::Flow => &[("subscription-id", Required), ("credit", Required)],
        FrameKind::Ping | FrameKind::Pong => &[("token", Optional)],
        FrameKind::Error => &[
            ("code", Required),
            ("fatal", Optional),
            ("seq", Optional),
            ("subscription-id", Optional),
            ("reason", Optional),
        ],
        FrameKind::Close => &[],
    }
}

/// Most fields any kind defines (OPENED).
const MAX_FIELDS: usize = 15;

fn has_body(kind: FrameKind) -> bool {
    matches!(kind, FrameKind::Send | FrameKind::Message)
}

/// Decodes one text-binding frame. Values and the body are slices of `payload`.
pub fn decode(payload: Bytes, limits: &CodecLimits) -> Result<Frame, DecodeError> {
    let mut lines = Lines { payload: &payload, position: 0, number: 0 };
    let Some((start, end)) = lines.next() else {
        return Err(DecodeError::malformed(format!(
            "text frame has no line feed after its first line (\"{}\"); a text frame is the \
             frame kind (e.g. `SEND`), `name:value` lines, a blank line, then the body",
            excerpt(&payload)
        )));
    };
    let Some(kind) = FrameKind::from_name(&payload[start..end]) else {
        return Err(DecodeError::malformed(format!(
            "text frame starts with unknown frame kind \"{}\"; the first line is one of {}",
            excerpt(&payload[start..end]),
            FrameKind::ALL.map(FrameKind::name).join(", ")
        )));
    };

    let table = field_table(kind);
    debug_assert!(table.len() <= MAX_FIELDS);
    let mut fields = Fields { kind, payload: &payload, table, values: [None; MAX_FIELDS] };
    let mut headers = Headers::new();
    let max_headers = max_header_count(limits);
    loop {
        let Some((start, end)) = lines.next() else {
            return Err(DecodeError::malformed(format!(
                "{}: the header does not end with a blank line; end the `name:value` lines \
                 with an empty line, even when there is no body",
                kind.name()
            )));
        };
        if start == end {
            break;
        }
        let line = &payload[start..end];
        let Some(colon) = line.iter().position(|&byte| byte == b':') else {
            return Err(DecodeError::malformed(format!(
                "{}: line {} (\"{}\") has no `:`; header lines are `name:value`",
                kind.name(),
                lines.number,
                excerpt(line)
            )));
        };
        let name = &line[..colon];
        let value = (start + colon + 1, end);
        if name.starts_with(b"x-") {
            if !has_body(kind) {
                return Err(DecodeError::malformed(format!(
                    "{}: application header \"{}\" is not allowed; only SEND and MESSAGE carry \
                     `x-` headers",
                    kind.name(),
                    excerpt(name)
                )));
            }
            if headers.len() == max_headers {
                return Err(too_many_headers(kind, limits));
            }
            headers.push((payload.slice(start..start + colon), payload.slice(value.0..value.1)));
        } else {
            fields.set(name, value)?;
        }
    }
    let body_start = lines.position;
    if !has_body(kind) && body_start != payload.len() {
        return Err(DecodeError::malformed(format!(
            "{}: {} after the blank line (\"{}\"); only SEND and MESSAGE have a body",
            kind.name(),
            trailing_bytes(payload.len() - body_start),
            excerpt(&payload[body_start..])
        )));
    }

    let frame = fields.frame(headers, payload.slice(body_start..))?;
    validate_frame(&frame, limits)?;
    Ok(frame)
}

/// A text SEND of the common shape, read from a slice into the message it becomes: the
/// `SEND` line, then only `seq`, `address`, `durable` and `ttl-ms` lines (each at most once,
/// without CR), the blank line and the body. The fields are judged by the rules [`decode`]
/// applies (the same integer, boolean and address checks), and the tail is encoded as
/// [`SendTail::encode`] encodes a decoded SEND's, so a `Some` is exactly what `decode` and
/// `SendTail::encode` make of `payload`.
///
/// `None` for anything else, including every fault: [`decode`] then reads the payload and
/// reports the fault, so errors and their order stay `decode`'s. No `Frame` is built and no
/// field is sliced (no reference count per field, no `Bytes` of the payload at all). The tail
/// is split off `chunk` ([`MessageTail::encode_into`]), which is left as it was on `None`.
pub(crate) fn decode_plain_send(payload: &[u8], limits: &CodecLimits, chunk: &mut BytesMut) -> Option<SendTail> {
    const FIRST_LINE: &[u8] = b"SEND\n";
    let mut position = FIRST_LINE.len();
    if payload.get(..position)? != FIRST_LINE {
        return None;
    }
    let (mut seq, mut address, mut durable, mut ttl_ms) = (None, None, None, None);
    loop {
        let rest = &payload[position..];
        let line_end = find_line_feed(rest)?;
        let line = &rest[..line_end];
        position += line_end + 1;
        let Some((&last, _)) = line.split_last() else {
            break; // the blank line
        };
        if last == b'\r' {
            return None;
        }
        let colon = line.iter().position(|&byte| byte == b':')?;
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        let slot = match name {
            b"seq" => &mut seq,
            b"address" => &mut address,
            b"durable" => &mut durable,
            b"ttl-ms" => &mut ttl_ms,
            _ => return None,
        };
        if slot.replace(value).is_some() {
            return None;
        }
    }
    let address = address?;
    let seq = seq.map_or(Some(0), |text| parse_decimal(text, u64::MAX))?;
    let ttl_ms = ttl_ms.map_or(Some(0), |text| parse_decimal(text, u64::from(u32::MAX)))?;
    let durable = match durable {
        None | Some(b"false") => false,
        Some(b"true") => true,
        Some(_) => return None,
    };
    check_address(FrameKind::Send, "address", address, limits).ok()?;
    let body = &payload[position..];
    let no_properties = Properties::default();
    Some(SendTail {
        durable,
        seq,
        // In range: `parse_decimal` refuses values over its maximum.
        ttl_ms: ttl_ms as u32,
        tail: MessageTail::encode_into(address, &no_properties, body, chunk),
        largest_message_bytes: super::largest_message_bytes(address, &no_properties, body.len()),
    })
}

/// A decimal integer written with digits only, at most `max`; `None` if `text` is empty, has
/// any other byte, or is larger (`Fields::integer` names which).
fn parse_decimal(text: &[u8], max: u64) -> Option<u64> {
    if text.is_empty() {
        return None;
    }
    let mut value: u64 = 0;
    for &byte in text {
        let digit = byte.wrapping_sub(b'0');
        if digit > 9 {
            return None;
        }
        value = value.checked_mul(10)?.checked_add(u64::from(digit)).filter(|&value| value <= max)?;
    }
    Some(value)
}

/// Splits lines ending in LF (an optional CR before it is dropped) off the front of a payload.
struct Lines<'a> {
    payload: &'a [u8],
    /// Where the next line starts.
    position: usize,
    /// 1-based number of the line last returned, for error reasons.
    number: usize,
}

impl Lines<'_> {
    /// The next line as `(start, end)` offsets without its terminator; `None` when no LF is left.
    fn next(&mut self) -> Option<(usize, usize)> {
        let start = self.position;
        let length = find_line_feed(&self.payload[start..])?;
        let mut end = start + length;
        self.position = end + 1;
        self.number += 1;
        if end > start && self.payload[end - 1] == b'\r' {
            end -= 1;
        }
        Some((start, end))
    }
}

/// Bytes [`find_line_feed`] looks at in one step.
const WORD_BYTES: usize = 8;

/// The index of the first LF in `bytes`, judging a word of 8 bytes per step (header lines are
/// tens of bytes long; a byte loop was most of the cost of splitting them).
fn find_line_feed(bytes: &[u8]) -> Option<usize> {
    const EVERY_BYTE_ONE: u64 = u64::from_ne_bytes([0x01; WORD_BYTES]);
    const EVERY_BYTE_HIGH_BIT: u64 = EVERY_BYTE_ONE * 0x80;
    const LINE_FEEDS: u64 = EVERY_BYTE_ONE * b'\n' as u64;
    let mut words = bytes.chunks_exact(WORD_BYTES);
    let mut start = 0;
    for word in &mut words {
        let word = u64::from_le_bytes(word.try_into().expect("chunks_exact(8) yields 8 bytes"));
        // A byte of `word` is LF exactly where a byte of `zeros` is zero. The classic test below
        // sets the high bit of the first such byte (and maybe of later ones, never of an earlier
        // one): in little-endian order the lowest set bit marks the first LF.
        let zeros = word ^ LINE_FEEDS;
        let found = zeros.wrapping_sub(EVERY_BYTE_ONE) & !zeros & EVERY_BYTE_HIGH_BIT;
        if found != 0 {
            return Some(start + found.trailing_zeros() as usize / 8);
        }
        start += WORD_BYTES;
    }
    words.remainder().iter().position(|&byte| byte == b'\n').map(|index| start + index)
}

/// The values of a kind's defined fields, as offsets into the payload.
struct Fields<'a> {
    kind: FrameKind,
    payload: &'a Bytes,
    table: &'static [(&'static str, Presence)],
    values: [Option<(usize, usize)>; MAX_FIELDS],
}

impl Fields<'_> {
    fn set(&mut self, name: &[u8], value: (usize, usize)) -> Result<(), DecodeError> {
        let Some(index) = self.table.iter().position(|(known, _)| known.as_bytes() == name) else {
            let known: Vec<&str> = self.table.iter().map(|(known, _)| *known).collect();
            return Err(DecodeError::malformed(format!(
                "{}: unknown field \"{}\"; {} fields are: {} (application headers start with \
                 `x-`{})",
                self.kind.name(),
                excerpt(name),
                self.kind.name(),
                if known.is_empty() { "none".to_string() } else { known.join(", ") },
                if has_body(self.kind) { "" } else { " and are only allowed in SEND and MESSAGE" }
            )));
        };
        if self.values[index].is_some() {
            return Err(DecodeError::malformed(format!(
                "{}: field `{}` is given twice; give each field once",
                self.kind.name(),
                self.table[index].0
            )));
        }
        self.values[index] = Some(value);
        Ok(())
    }

    /// Where a field's value is, `None` if absent; an error if absent and required.
    fn range(&self, name: &str) -> Result<Option<(usize, usize)>, DecodeError> {
        let index = self
            .table
            .iter()
            .position(|(known, _)| *known == name)
            .unwrap_or_else(|| panic!("field `{name}` is not in the {} table", self.kind.name()));
        match (self.values[index], self.table[index].1) {
            (Some(range), _) => Ok(Some(range)),
            (None, Optional) => Ok(None),
            (None, Required) => {
                Err(DecodeError::malformed(format!("{}: required field `{name}` is missing", self.kind.name())))
            }
        }
    }

    fn raw(&self, name: &str) -> Result<Option<&[u8]>, DecodeError> {
        Ok(self.range(name)?.map(|(start, end)| &self.payload[start..end]))
    }

    /// A string value as a slice of the payload; empty if absent.
    fn string(&self, name: &str) -> Result<Bytes, DecodeError> {
        Ok(match self.range(name)? {
            Some((start, end)) => self.payload.slice(start..end),
            None => Bytes::new(),
        })
    }

    /// A decimal integer no larger than `max` (the field's binary width); 0 if absent.
    fn integer(&self, name: &str, max: u64) -> Result<u64, DecodeError> {
        let Some(text) = self.raw(name)? else {
            return Ok(0);
        };
        if let Some(value) = parse_decimal(text, max) {
            return Ok(value);
        }
        Err(self.integer_error(name, text, max))
    }

    /// Why `text` is not a decimal integer of at most `max` (the first fault from the left).
    #[cold]
    fn integer_error(&self, name: &str, text: &[u8], max: u64) -> DecodeError {
        let kind = self.kind.name();
        let mut value: u64 = 0;
        for &byte in text {
            if !byte.is_ascii_digit() {
                return DecodeError::malformed(format!(
                    "{kind}: field `{name}` is \"{}\", not a decimal integer; write digits only, \
                     without sign or spaces",
                    excerpt(text)
                ));
            }
            value = match value.checked_mul(10).and_then(|value| value.checked_add(u64::from(byte - b'0'))) {
                Some(value) if value <= max => value,
                _ => {
                    return DecodeError::malformed(format!(
                        "{kind}: field `{name}` is \"{}\", over {max}, its largest value",
                        excerpt(text)
                    ))
                }
            };
        }
        debug_assert!(text.is_empty(), "integer_error called for the valid integer {value}");
        DecodeError::malformed(format!("{kind}: field `{name}` is empty; write a decimal integer"))
    }

    fn u64(&self, name: &str) -> Result<u64, DecodeError> {
        self.integer(name, u64::MAX)
    }

    fn u32(&self, name: &str) -> Result<u32, DecodeError> {
        // In range by construction: `integer` refuses values over the maximum.
        self.integer(name, u64::from(u32::MAX)).map(|value| value as u32)
    }

    fn u16(&self, name: &str) -> Result<u16, DecodeError> {
        self.integer(name, u64::from(u16::MAX)).map(|value| value as u16)
    }

    fn u8(&self, name: &str) -> Result<u8, DecodeError> {
        self.integer(name, u64::from(u8::MAX)).map(|value| value as u8)
    }

    /// One of `choices` by its exact spelling; `choices[0]` (the default) if absent.
    fn choice<T: Copy>(&self, name: &str, choices: &[(&str, T)]) -> Result<T, DecodeError> {
        let Some(text) = self.raw(name)? else {
            return Ok(choices[0].1);
        };
        match choices.iter().find(|(spelling, _)| spelling.as_bytes() == text) {
            Some((_, value)) => Ok(*value),
            None => {
                let spellings: Vec<&str> = choices.iter().map(|(spelling, _)| *spelling).collect();
                Err(DecodeError::malformed(format!(
                    "{}: field `{name}` is \"{}\"; write one of: {}",
                    self.kind.name(),
                    excerpt(text),
                    spellings.join(", ")
                )))
            }
        }
    }

    fn boolean(&self, name: &str) -> Result<bool, DecodeError> {
        self.choice(name, &[("false", false), ("true", true)])
    }

    /// Builds the frame from the collected fields, application headers and body.
    fn frame(&self, headers: Headers, body: Bytes) -> Result<Frame, DecodeError> {
        let properties = |headers: Headers| -> Result<Properties, DecodeError> {
            Ok(Properties {
                content_type: self.string("content-type")?,
                correlation_id: self.string("correlation-id")?,
                reply_to: self.string("reply-to")?,
                headers,
            })
        };
        Ok(match self.kind {
            FrameKind::Open => Frame::Open(Open {
                version: self.u8("version")?,
                session_id: self.string("session-id")?,
                last_received_seq: self.u64("last-received-seq")?,
                heartbeat_ms: self.u32("heartbeat-ms")?,
                login: self.string("login")?,
                passcode: self.string("passcode")?,
            }),
            FrameKind::Opened => Frame::Opened(Opened {
                version: self.u8("version")?,
                session_id: self.string("session-id")?,
                resumed: self.boolean("resumed")?,
                last_received_seq: self.u64("last-received-seq")?,
                heartbeat_ms: self.u32("heartbeat-ms")?,
                session_expiry_ms: self.u32("session-expiry-ms")?,
                limits: Limits {
                    max_frame_bytes: self.u32("max-frame-bytes")?,
                    max_address_bytes: self.u16("max-address-bytes")?,
                    max_headers: self.u16("max-headers")?,
                    max_header_bytes: self.u32("max-header-bytes")?,
                    max_credit: self.u32("max-credit")?,
                    max_subscriptions: self.u32("max-subscriptions")?,
                    max_inflight_sends: self.u32("max-inflight-sends")?,
                    max_queued_messages: self.u32("max-queued-messages")?,
                },
                server: self.string("server")?,
            }),
            FrameKind::Send => Frame::Send(Send {
                seq: self.u64("seq")?,
                address: self.string("address")?,
                durable: self.boolean("durable")?,
                ttl_ms: self.u32("ttl-ms")?,
                properties: properties(headers)?,
                body,
            }),
            FrameKind::Receipt => Frame::Receipt(Receipt { seq: self.u64("seq")? }),
            FrameKind::Subscribe => Frame::Subscribe(Subscribe {
                subscription_id: self.u32("subscription-id")?,
                address: self.string("address")?,
                mode: self
                    .choice("mode", &[("anycast", DeliveryMode::Anycast), ("multicast", DeliveryMode::Multicast)])?,
                ack_mode: self.choice("ack", &[("client", AckMode::Client), ("auto", AckMode::Auto)])?,
                credit: self.u32("credit")?,
            }),
            FrameKind::Subscribed => Frame::Subscribed(Subscribed { subscription_id: self.u32("subscription-id")? }),
            FrameKind::Unsubscribe => Frame::Unsubscribe(Unsubscribe { subscription_id: self.u32("subscription-id")? }),
            FrameKind::Message => Frame::Message(Message {
                subscription_id: self.u32("subscription-id")?,
                delivery_seq: self.u64("delivery-seq")?,
                message_id: self.u64("message-id")?,
                address: self.string("address")?,
                redelivered: self.boolean("redelivered")?,
                durable: self.boolean("durable")?,
                properties: properties(headers)?,
                body,
            }),
            FrameKind::Ack => {
                Frame::Ack(Ack { delivery_seq: self.u64("delivery-seq")?, cumulative: self.boolean("cumulative")? })
            }
            FrameKind::Nack => {
                Frame::Nack(Nack { delivery_seq: self.u64("delivery-seq")?, requeue: self.boolean("requeue")? })
            }
            FrameKind::Flow => {
                Frame::Flow(Flow { subscription_id: self.u32("subscription-id")?, credit: self.u32("credit")? })
            }
            FrameKind::Ping => Frame::Ping(Ping { token: self.u64("token")? }),
            FrameKind::Pong => Frame::Pong(Pong { token: self.u64("token")? }),
            FrameKind::Error => Frame::Error(ErrorFrame {
                code: self.u16("code")?,
                fatal: self.boolean("fatal")?,
                seq: self.u64("seq")?,
                subscription_id: self.u32("subscription-id")?,
                reason: self.string("reason")?,
            }),
            FrameKind::Close => Frame::Close(Close),
        })
    }
}

/// Writes everything of `frame` but its body (SEND, MESSAGE), which follows the blank line
/// directly.
///
/// Panics if a value contains CR or LF, or a header name contains `:`: the line structure
/// would break and a peer could be fed fields it was never sent (header injection). Decoded
/// and validated frames never do ([`super::validate::validate_frame`]).
pub fn encode_header<B: BufMut>(frame: &Frame, out: &mut B) {
    if let Frame::Message(message) = frame {
        return encode_message_header(&message.header(), out);
    }
    out.put_slice(frame.kind().name().as_bytes());
    out.put_u8(b'\n');
    let mut writer = Writer { out };
    match frame {
        Frame::Open(open) => {
            writer.number("version", u64::from(open.version));
            writer.optional_string("session-id", &open.session_id);
            writer.optional_number("last-received-seq", open.last_received_seq);
            writer.optional_number("heartbeat-ms", u64::from(open.heartbeat_ms));
            writer.optional_string("login", &open.login);
            writer.optional_string("passcode", &open.passcode);
        }
        Frame::Opened(opened) => {
            writer.number("version", u64::from(opened.version));
            writer.field("session-id", &opened.session_id);
            writer.optional_boolean("resumed", opened.resumed);
            writer.optional_number("last-received-seq", opened.last_received_seq);
            writer.optional_number("heartbeat-ms", u64::from(opened.heartbeat_ms));
            writer.optional_number("session-expiry-ms", u64::from(opened.session_expiry_ms));
            let limits = &opened.limits;
            writer.number("max-frame-bytes", u64::from(limits.max_frame_bytes));
            writer.number("max-address-bytes", u64::from(limits.max_address_bytes));
            writer.number("max-headers", u64::from(limits.max_headers));
            writer.number("max-header-bytes", u64::from(limits.max_header_bytes));
            writer.number("max-credit", u64::from(limits.max_credit));
            writer.number("max-subscriptions", u64::from(limits.max_subscriptions));
            writer.number("max-inflight-sends", u64::from(limits.max_inflight_sends));
            writer.number("max-queued-messages", u64::from(limits.max_queued_messages));
            writer.optional_string("server", &opened.server);
        }
        Frame::Send(send) => {
            writer.optional_number("seq", send.seq);
            writer.field("address", &send.address);
            writer.optional_boolean("durable", send.durable);
            writer.optional_number("ttl-ms", u64::from(send.ttl_ms));
            writer.properties(&send.properties);
        }
        Frame::Receipt(receipt) => writer.number("seq", receipt.seq),
        Frame::Subscribe(subscribe) => {
            writer.number("subscription-id", u64::from(subscribe.subscription_id));
            writer.field("address", &subscribe.address);
            if subscribe.mode == DeliveryMode::Multicast {
                writer.field("mode", b"multicast");
            }
            if subscribe.ack_mode == AckMode::Auto {
                writer.field("ack", b"auto");
            }
            writer.optional_number("credit", u64::from(subscribe.credit));
        }
        Frame::Subscribed(subscribed) => {
            writer.number("subscription-id", u64::from(subscribed.subscription_id));
        }
        Frame::Unsubscribe(unsubscribe) => {
            writer.number("subscription-id", u64::from(unsubscribe.subscription_id));
        }
        Frame::Message(_) => unreachable!("encoded by encode_message_header"),
        Frame::Ack(ack) => {
            writer.number("delivery-seq", ack.delivery_seq);
            writer.optional_boolean("cumulative", ack.cumulative);
        }
        Frame::Nack(nack) => {
            writer.number("delivery-seq", nack.delivery_seq);
            writer.field("requeue", if nack.requeue { b"true" } else { b"false" });
        }
        Frame::Flow(flow) => {
            writer.number("subscription-id", u64::from(flow.subscription_id));
            writer.number("credit", u64::from(flow.credit));
        }
        Frame::Ping(ping) => writer.optional_number("token", ping.token),
        Frame::Pong(pong) => writer.optional_number("token", pong.token),
        Frame::Error(error) => {
            writer.number("code", u64::from(error.code));
            writer.optional_boolean("fatal", error.fatal);
            writer.optional_number("seq", error.seq);
            writer.optional_number("subscription-id", u64::from(error.subscription_id));
            writer.optional_string("reason", &error.reason);
        }
        Frame::Close(_) => {}
    }
    writer.out.put_u8(b'\n');
}

/// Writes a MESSAGE up to the blank line before its body; [`encode_header`] of a
/// `Frame::Message` comes here too. Panics as [`encode_header`] does.
pub fn encode_message_header<B: BufMut>(message: &MessageHeader<'_>, out: &mut B) {
    encode_message_numbers(message.subscription_id, message.delivery_seq, message.message_id, out);
    let mut shared = Vec::new();
    encode_message_shared(message.address, message.durable, message.properties, &mut shared);
    put_message_shared(&shared, message.address.len(), message.redelivered, out);
}

/// The first lines of a text MESSAGE, the ones that differ per delivery: the kind and the
/// three numbers (`subscription-id`, `delivery-seq`, `message-id`).
pub fn encode_message_numbers<B: BufMut>(subscription_id: u32, delivery_seq: u64, message_id: u64, out: &mut B) {
    out.put_slice(FrameKind::Message.name().as_bytes());
    out.put_u8(b'\n');
    let mut writer = Writer { out };
    writer.number("subscription-id", u64::from(subscription_id));
    writer.number("delivery-seq", delivery_seq);
    writer.number("message-id", message_id);
}

/// The rest of a text MESSAGE header, which every delivery of one message shares: the
/// `address` line, then the `durable` flag, the properties and the empty line. A delivery's
/// `redelivered` line goes between the two (encoder order, docs/PROTOCOL.md 6.3):
/// [`put_message_shared`] writes it so. Encoded once per message, copied per delivery.
pub fn encode_message_shared<B: BufMut>(address: &[u8], durable: bool, properties: &Properties, out: &mut B) {
    let mut writer = Writer { out };
    writer.field("address", address);
    writer.optional_boolean("durable", durable);
    writer.properties(properties);
    writer.out.put_u8(b'\n');
}

/// Bytes [`put_message_shared`] writes for a part of `shared_len` bytes.
pub fn message_shared_len(shared_len: usize, redelivered: bool) -> usize {
    shared_len + if redelivered { REDELIVERED_LINE.len() } else { 0 }
}

const REDELIVERED_LINE: &[u8] = b"redelivered:true\n";

/// Writes what [`encode_message_shared`] made for a message with an address of
/// `address_len` bytes, with this delivery's `redelivered` line in its place.
pub fn put_message_shared<B: BufMut>(shared: &[u8], address_len: usize, redelivered: bool, out: &mut B) {
    let address_line_len = "address:".len() + address_len + 1;
    out.put_slice(&shared[..address_line_len]);
    if redelivered {
        out.put_slice(REDELIVERED_LINE);
    }
    out.put_slice(&shared[address_line_len..]);
}

/// The longest MESSAGE header [`encode_message_header`] can write for a message with
/// `address` and `properties`: every number at its widest, both flags set. It runs for every
/// SEND (the max-frame-bytes bound of `largest_message_bytes`), so all but the address and
/// properties is a constant.
pub fn widest_message_header_len(address: &[u8], properties: &Properties) -> usize {
    widest_message_header_len_without_properties(address.len()) + properties_len(properties)
}

/// [`widest_message_header_len`] of a message without properties (no content type,
/// correlation id, reply-to or header): a constant plus the address's length, so the common
/// SEND pays for no properties it does not carry.
pub const fn widest_message_header_len_without_properties(address_len: usize) -> usize {
    const U32_MAX_DIGITS: usize = 10;
    const U64_MAX_DIGITS: usize = 20;
    const fn line(name: &str, value_len: usize) -> usize {
        name.len() + 1 + value_len + 1
    }
    const FIXED: usize = FrameKind::Message.name().len()
        + 1
        + line("subscription-id", U32_MAX_DIGITS)
        + line("delivery-seq", U64_MAX_DIGITS)
        + line("message-id", U64_MAX_DIGITS)
        + line("address", 0)
        + line("redelivered", "true".len())
        + line("durable", "true".len())
        + 1;
    FIXED + address_len
}

/// The bytes of the `name:value` lines that `properties` add to a text header.
fn properties_len(properties: &Properties) -> usize {
    fn optional(name: &str, value: &[u8]) -> usize {
        if value.is_empty() {
            0
        } else {
            name.len() + 1 + value.len() + 1
        }
    }
    optional("content-type", &properties.content_type)
        + optional("correlation-id", &properties.correlation_id)
        + optional("reply-to", &properties.reply_to)
        + properties.headers.iter().map(|(name, value)| name.len() + 1 + value.len() + 1).sum::<usize>()
}

/// Writes `name:value` lines.
struct Writer<'a, B> {
    out: &'a mut B,
}

impl<B: BufMut> Writer<'_, B> {
    fn field(&mut self, name: impl AsRef<[u8]>, value: &[u8]) {
        let name = name.as_ref();
        assert!(
            !name.iter().any(|&byte| matches!(byte, b':' | b'\r' | b'\n')),
            "MBWS text encode: field name \"{}\" contains `:`, CR or LF",
            excerpt(name)
        );
        assert!(
            !value.iter().any(|&byte| matches!(byte, b'\r' | b'\n')),
            "MBWS text encode: field `{}` value contains CR or LF",
            excerpt(name)
        );
        self.out.put_slice(name);
        self.out.put_u8(b':');
        self.out.put_slice(value);
        self.out.put_u8(b'\n');
    }

    fn optional_string(&mut self, name: &str, value: &[u8]) {
        if !value.is_empty() {
            self.field(name, value);
        }
    }

    fn number(&mut self, name: &str, value: u64) {
        let mut digits = [0u8; 20];
        let mut start = digits.len();
        let mut rest = value;
        loop {
            start -= 1;
            digits[start] = b'0' + (rest % 10) as u8;
            rest /= 10;
            if rest == 0 {
                break;
            }
        }
        self.field(name, &digits[start..]);
    }

    fn optional_number(&mut self, name: &str, value: u64) {
        if value != 0 {
            self.number(name, value);
        }
    }

    fn optional_boolean(&mut self, name: &str, value: bool) {
        if value {
            self.field(name, b"true");
        }
    }

    fn properties(&mut self, properties: &Properties) {
        self.optional_string("content-type", &properties.content_type);
        self.optional_string("correlation-id", &properties.correlation_id);
        self.optional_string("reply-to", &properties.reply_to);
        for (name, value) in &properties.headers {
            self.field(name, value);
        }
    }
}

#[cfg(test)]
mod tests {
    //! Syntax errors of the text binding; the field rules are tested in `validate`.

    use bytes::Bytes;

    use super::super::codec_tests::{assert_error, sample};
    use super::super::{Binding, ErrorCode};
    use super::*;

    const MALFORMED: ErrorCode = ErrorCode::MalformedFrame;

    #[test]
    fn line_feeds_are_found_at_every_position() {
        for length in 0..=40 {
            let mut bytes = vec![b'a'; length];
            assert_eq!(find_line_feed(&bytes), None, "{length} bytes without LF");
            for position in 0..length {
                for filler in [b'a', 0x0b, 0x09, 0x8a, 0xff, 0x00] {
                    bytes.fill(filler);
                    bytes[position] = b'\n';
                    assert_eq!(find_line_feed(&bytes), Some(position), "LF at {position} of {length}");
                    // A second LF later never hides the first.
                    if position + 1 < length {
                        bytes[length - 1] = b'\n';
                        assert_eq!(find_line_feed(&bytes), Some(position));
                    }
                }
            }
        }
    }

    fn decoded(text: &str) -> Result<Frame, DecodeError> {
        decode(Bytes::copy_from_slice(text.as_bytes()), &CodecLimits::default())
    }

    fn encoded(frame: &Frame) -> String {
        String::from_utf8(super::super::encode(Binding::Text, frame).to_vec()).unwrap()
    }

    #[test]
    fn first_line_is_a_frame_kind_name() {
        assert_error(decoded(""), MALFORMED, &["no line feed after its first line"]);
        assert_error(decoded("PING"), MALFORMED, &["no line feed after its first line (\"PING\")"]);
        for unknown in ["ping", "PING ", "FOO", ""] {
            assert_error(decoded(&format!("{unknown}\n\n")), MALFORMED, &["unknown frame kind", "OPEN, OPENED, SEND"]);
        }
        assert_eq!(decoded("PING\r\n\r\n"), Ok(Frame::Ping(Ping { token: 0 })));
    }

    #[test]
    fn header_ends_with_a_blank_line() {
        for text in ["PING\n", "PING\ntoken:1\n", "PING\ntoken:1", "SEND\naddress:a\nbody"] {
            assert_error(decoded(text), MALFORMED, &["does not end with a blank line"]);
        }
    }

    #[test]
    fn header_lines_are_name_colon_value() {
        assert_error(decoded("PING\ntoken 1\n\n"), MALFORMED, &["PING: line 2 (\"token 1\") has no `:`"]);
        assert_error(decoded("PING\n:1\n\n"), MALFORMED, &["PING: unknown field \"\""]);
    }

    #[test]
    fn value_is_everything_after_the_first_colon() {
        let Ok(Frame::Send(send)) = decoded("SEND\naddress: a:b \ncontent-type:text/plain; x=1\nx-h::\n\n") else {
            panic!("SEND must decode")
        };
        assert_eq!(&send.address[..], b" a:b ");
        assert_eq!(&send.properties.content_type[..], b"text/plain; x=1");
        assert_eq!(&send.properties.headers[0].1[..], b":");
    }

    #[test]
    fn carriage_return_only_ends_a_line_right_before_line_feed() {
        assert_eq!(decoded("PING\r\ntoken:5\r\n\r\n"), Ok(Frame::Ping(Ping { token: 5 })));
        assert_error(
            decoded("SEND\naddress:a\rb\n\n"),
            MALFORMED,
            &["`address` contains a carriage return (CR) at byte 1; addresses may not contain control characters"],
        );
        assert_error(
            decoded("SEND\naddress:a\ncontent-type:t\r\r\n\n"),
            MALFORMED,
            &["`content-type` contains a carriage return (CR)"],
        );
    }

    #[test]
    fn unknown_fields_are_refused_and_named() {
        assert_error(
            decoded("SEND\nadress:orders\n\n"),
            MALFORMED,
            &["SEND: unknown field \"adress\"; SEND fields are: seq, address, durable"],
        );
        assert_error(decoded("SEND\naddress:a\nX-Trace:1\n\n"), MALFORMED, &["unknown field \"X-Trace\""]);
        assert_error(
            decoded("RECEIPT\nseq:1\ncredit:5\n\n"),
            MALFORMED,
            &["RECEIPT: unknown field \"credit\"; RECEIPT fields are: seq"],
        );
        assert_error(decoded("CLOSE\nseq:1\n\n"), MALFORMED, &["CLOSE fields are: none"]);
    }

    #[test]
    fn application_headers_only_in_send_and_message() {
        for kind in FrameKind::ALL.into_iter().filter(|kind| !has_body(*kind)) {
            let text = encoded(&sample(kind)).replacen('\n', "\nx-trace:1\n", 1);
            assert_error(decoded(&text), MALFORMED, &[kind.name(), "application header \"x-trace\" is not allowed"]);
        }
    }

    #[test]
    fn application_headers_keep_their_order_and_may_repeat() {
        let Ok(Frame::Message(message)) =
            decoded("MESSAGE\nx-b:2\nsubscription-id:1\nx-a:1\ndelivery-seq:1\nmessage-id:0\naddress:q\nx-b:3\n\n")
        else {
            panic!("MESSAGE must decode")
        };
        let names: Vec<&[u8]> = message.properties.headers.iter().map(|(name, _)| &name[..]).collect();
        assert_eq!(names, [&b"x-b"[..], b"x-a", b"x-b"]);
    }

    #[test]
    fn header_count_stops_at_max_headers() {
        let lines: String = (0..65).map(|i| format!("x-h{i}:v\n")).collect();
        assert_error(
            decoded(&format!("SEND\naddress:a\n{lines}\n")),
            ErrorCode::TooLarge,
            &["SEND: too many application headers, over max_headers 64"],
        );
    }

    #[test]
    fn duplicate_fields_are_refused() {
        assert_error(
            decoded("ACK\ndelivery-seq:1\ndelivery-seq:2\n\n"),
            MALFORMED,
            &["ACK: field `delivery-seq` is given twice"],
        );
        assert_error(decoded("SEND\naddress:a\naddress:a\n\n"), MALFORMED, &["SEND: field `address` is given twice"]);
    }

    #[test]
    fn required_fields_must_be_present() {
        let cases = [
            ("OPEN\n\n", "OPEN: required field `version` is missing"),
            ("SEND\nseq:1\n\n", "SEND: required field `address` is missing"),
            ("RECEIPT\n\n", "RECEIPT: required field `seq` is missing"),
            ("SUBSCRIBE\naddress:a\n\n", "SUBSCRIBE: required field `subscription-id` is missing"),
            ("SUBSCRIBE\nsubscription-id:1\n\n", "SUBSCRIBE: required field `address` is missing"),
            ("SUBSCRIBED\n\n", "SUBSCRIBED: required field `subscription-id` is missing"),
            ("UNSUBSCRIBE\n\n", "UNSUBSCRIBE: required field `subscription-id` is missing"),
            (
                "MESSAGE\nsubscription-id:1\ndelivery-seq:1\naddress:a\n\n",
                "MESSAGE: required field `message-id` is missing",
            ),
            ("ACK\ncumulative:true\n\n", "ACK: required field `delivery-seq` is missing"),
            ("NACK\ndelivery-seq:1\n\n", "NACK: required field `requeue` is missing"),
            ("FLOW\nsubscription-id:1\n\n", "FLOW: required field `credit` is missing"),
            ("ERROR\nreason:x\n\n", "ERROR: required field `code` is missing"),
        ];
        for (text, reason) in cases {
            assert_error(decoded(text), MALFORMED, &[reason]);
        }
        let opened = encoded(&sample(FrameKind::Opened));
        for (name, presence) in field_table(FrameKind::Opened) {
            let without: String = opened
                .lines()
                .filter(|line| !line.starts_with(&format!("{name}:")))
                .map(|line| format!("{line}\n"))
                .collect();
            if *presence == Required {
                assert_error(decoded(&without), MALFORMED, &[&format!("OPENED: required field `{name}` is missing")]);
            }
        }
    }

    #[test]
    fn absent_optional_fields_take_their_defaults() {
        assert_eq!(
            decoded("SUBSCRIBE\nsubscription-id:3\naddress:a\n\n"),
            Ok(Frame::Subscribe(Subscribe {
                subscription_id: 3,
                address: Bytes::from_static(b"a"),
                mode: DeliveryMode::Anycast,
                ack_mode: AckMode::Client,
                credit: 0,
            }))
        );
        assert_eq!(
            decoded("SEND\naddress:a\n\n"),
            Ok(Frame::Send(Send { address: Bytes::from_static(b"a"), ..Send::default() }))
        );
        assert_eq!(decoded("OPEN\nversion:1\n\n"), Ok(Frame::Open(Open::default())));
    }

    #[test]
    fn integers_are_plain_decimal() {
        for bad in ["-1", "+1", " 1", "1 ", "0x10", "1e3", "１"] {
            assert_error(
                decoded(&format!("PING\ntoken:{bad}\n\n")),
                MALFORMED,
                &["PING: field `token` is", "not a decimal integer"],
            );
        }
        assert_error(decoded("PING\ntoken:\n\n"), MALFORMED, &["PING: field `token` is empty"]);
        assert_error(decoded("PING\ntoken:18446744073709551616\n\n"), MALFORMED, &["over 18446744073709551615"]);
        assert_eq!(decoded("PING\ntoken:18446744073709551615\n\n"), Ok(Frame::Ping(Ping { token: u64::MAX })));
        assert_error(
            decoded("FLOW\nsubscription-id:1\ncredit:4294967296\n\n"),
            MALFORMED,
            &["FLOW: field `credit` is \"4294967296\", over 4294967295"],
        );
        assert_error(decoded("ERROR\ncode:65536\n\n"), MALFORMED, &["ERROR: field `code`", "over 65535"]);
        assert_eq!(decoded("PING\ntoken:007\n\n"), Ok(Frame::Ping(Ping { token: 7 })));
    }

    #[test]
    fn booleans_and_enums_are_exact_words() {
        assert_error(
            decoded("ACK\ndelivery-seq:1\ncumulative:yes\n\n"),
            MALFORMED,
            &["ACK: field `cumulative` is \"yes\"; write one of: false, true"],
        );
        assert_error(decoded("ACK\ndelivery-seq:1\ncumulative:TRUE\n\n"), MALFORMED, &["`cumulative`"]);
        assert_error(
            decoded("SUBSCRIBE\nsubscription-id:1\naddress:a\nmode:broadcast\n\n"),
            MALFORMED,
            &["SUBSCRIBE: field `mode` is \"broadcast\"; write one of: anycast, multicast"],
        );
        assert_error(
            decoded("SUBSCRIBE\nsubscription-id:1\naddress:a\nack:none\n\n"),
            MALFORMED,
            &["SUBSCRIBE: field `ack` is \"none\"; write one of: client, auto"],
        );
    }

    #[test]
    fn kinds_without_body_refuse_bytes_after_the_blank_line() {
        assert_error(
            decoded("PING\ntoken:1\n\nhello"),
            MALFORMED,
            &["PING: 5 trailing bytes after the blank line", "only SEND and MESSAGE have a body"],
        );
        assert_error(decoded("CLOSE\n\n\n"), MALFORMED, &["CLOSE: 1 trailing byte after the blank line"]);
    }

    #[test]
    fn body_is_opaque() {
        let Ok(Frame::Send(send)) = decoded("SEND\naddress:a\n\nline\r\nx-not-a-header:1\n\n\u{0}") else {
            panic!("SEND must decode")
        };
        assert_eq!(&send.body[..], b"line\r\nx-not-a-header:1\n\n\0");
        assert!(send.properties.headers.is_empty());
    }

    #[test]
    fn encoder_omits_defaults_and_keeps_required_fields() {
        assert_eq!(encoded(&Frame::Ping(Ping { token: 0 })), "PING\n\n");
        assert_eq!(encoded(&Frame::Close(Close)), "CLOSE\n\n");
        assert_eq!(
            encoded(&Frame::Nack(Nack { delivery_seq: 3, requeue: false })),
            "NACK\ndelivery-seq:3\nrequeue:false\n\n"
        );
        assert_eq!(
            encoded(&Frame::Send(Send { address: Bytes::from_static(b"a"), ..Send::default() })),
            "SEND\naddress:a\n\n"
        );
        assert_eq!(encoded(&Frame::Open(Open::default())), "OPEN\nversion:1\n\n");
    }

    #[test]
    fn required_fields_are_always_written() {
        for kind in FrameKind::ALL {
            let text = encoded(&sample(kind));
            for (name, presence) in field_table(kind) {
                if *presence == Required {
                    assert!(text.contains(&format!("\n{name}:")), "{}: `{name}` missing in {text:?}", kind.name());
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "field `x-h` value contains CR or LF")]
    fn encoding_a_line_feed_panics_instead_of_injecting_a_field() {
        let mut send = Send { address: Bytes::from_static(b"a"), ..Send::default() };
        send.properties.headers.push((Bytes::from_static(b"x-h"), Bytes::from_static(b"1\nrequeue:true")));
        let mut out = Vec::new();
        encode_header(&Frame::Send(send), &mut out);
    }
}
