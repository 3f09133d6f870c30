//! The binary binding: one MBWS frame per WebSocket binary message (docs/PROTOCOL.md,
//! "Binary binding", which has a byte table per kind).
//!
//! Layout: a 3-byte prefix, then the kind's fixed-size integers in a fixed order, then its
//! strings, then (SEND and MESSAGE only) the body, which is every remaining byte.
//!
//! ```text
//! byte 0   version   u8  PROTOCOL_VERSION (1)
//! byte 1   kind      u8  FrameKind::code (0x01 OPEN .. 0x0F CLOSE)
//! byte 2   flags     u8  booleans and enums of the kind (see `flags`); other bits must be 0
//! byte 3.. fields    integers big-endian (network order), unaligned
//!          strings   str8 = u8 length + UTF-8 bytes, str16 = u16 BE length + UTF-8 bytes
//!          headers   (SEND, MESSAGE) u8 count, then per header: str8 name, str16 value
//!          body      (SEND, MESSAGE) the rest of the message
//! ```
//!
//! Per kind (flags; integers in order; strings in order):
//!
//! ```text
//! OPEN        -                      last-received-seq u64, heartbeat-ms u32;
//!                                    session-id str8, login str8, passcode str16
//! OPENED      bit0 resumed           last-received-seq u64, heartbeat-ms u32,
//!                                    session-expiry-ms u32, max-frame-bytes u32,
//!                                    max-address-bytes u16, max-headers u16,
//!                                    max-header-bytes u32, max-credit u32,
//!                                    max-subscriptions u32, max-inflight-sends u32,
//!                                    max-queued-messages u32; session-id str8, server str8
//! SEND        bit0 durable           seq u64, ttl-ms u32; address str8, PROPERTIES; body
//! RECEIPT     -                      seq u64
//! SUBSCRIBE   bit0 multicast,        subscription-id u32, credit u32; address str8
//!             bit1 auto-ack
//! SUBSCRIBED  -                      subscription-id u32
//! UNSUBSCRIBE -                      subscription-id u32
//! MESSAGE     bit0 redelivered,      subscription-id u32, delivery-seq u64, message-id u64;
//!             bit1 durable           address str8, PROPERTIES; body
//! ACK         bit0 cumulative        delivery-seq u64
//! NACK        bit0 requeue           delivery-seq u64
//! FLOW        -                      subscription-id u32, credit u32
//! PING, PONG  -                      token u64
//! ERROR       bit0 fatal             code u16, seq u64, subscription-id u32; reason str16
//! CLOSE       -                      (nothing)
//!
//! PROPERTIES = content-type str8, correlation-id str8, reply-to str8,
//!              header-count u8, header-count x (name str8, value str16)
//! ```
//!
//! OPEN and OPENED carry no separate version field: their `version` is byte 0. Decoding never
//! copies: strings and body are `Bytes` slices of the payload. After the layout is taken apart,
//! the shared field rules of [`super::validate`] run, so both bindings accept the same frames.

use bytes::{BufMut, Bytes};

use super::frame::*;
use super::validate::{
    check_address, check_delivery_seq, check_properties, check_property_fields, check_subscription_id, excerpt,
    trailing_bytes, validate_frame,
};
use super::{CodecLimits, DecodeError};

/// Bytes before the kind's fields: version, kind, flags.
pub const PREFIX_BYTES: usize = 3;
/// Longest str8 string (address, session id, content type, header name...).
pub const MAX_STR8_BYTES: usize = u8::MAX as usize;
/// Longest str16 string (passcode, reason, header value).
pub const MAX_STR16_BYTES: usize = u16::MAX as usize;
/// Most application headers one message can carry (the count is a u8).
pub const MAX_HEADER_COUNT: usize = u8::MAX as usize;

/// Flag bits (byte 2). A bit not listed for a kind is reserved and must be 0.
pub mod flags {
    pub const OPENED_RESUMED: u8 = 0x01;
    pub const SEND_DURABLE: u8 = 0x01;
    pub const SUBSCRIBE_MULTICAST: u8 = 0x01;
    pub const SUBSCRIBE_AUTO_ACK: u8 = 0x02;
    pub const MESSAGE_REDELIVERED: u8 = 0x01;
    pub const MESSAGE_DURABLE: u8 = 0x02;
    pub const ACK_CUMULATIVE: u8 = 0x01;
    pub const NACK_REQUEUE: u8 = 0x01;
    pub const ERROR_FATAL: u8 = 0x01;
}

/// The flag bits a kind defines; every other bit of byte 2 must be zero.
fn defined_flags(kind: FrameKind) -> u8 {
    match kind {
        FrameKind::Opened => flags::OPENED_RESUMED,
        FrameKind::Send => flags::SEND_DURABLE,
        FrameKind::Subscribe => flags::SUBSCRIBE_MULTICAST | flags::SUBSCRIBE_AUTO_ACK,
        FrameKind::Message => flags::MESSAGE_REDELIVERED | flags::MESSAGE_DURABLE,
        FrameKind::Ack => flags::ACK_CUMULATIVE,
        FrameKind::Nack => flags::NACK_REQUEUE,
        FrameKind::Error => flags::ERROR_FATAL,
        _ => 0,
    }
}

/// The 3-byte prefix every binary frame starts with: the version, a known kind, and no
/// reserved flag bit set. Returns the kind and the flag bits.
fn check_prefix(payload: &[u8]) -> Result<(FrameKind, u8), DecodeError> {
    if payload.len() < PREFIX_BYTES {
        return Err(DecodeError::malformed(format!(
            "binary frame is {} bytes, shorter than the {PREFIX_BYTES}-byte prefix \
             (version, kind, flags)",
            payload.len()
        )));
    }
    let version = payload[0];
    if version != PROTOCOL_VERSION {
        return Err(DecodeError::malformed(format!(
            "binary frame has version {version} in byte 0; this implementation speaks only MBWS \
             version {PROTOCOL_VERSION}"
        )));
    }
    let Some(kind) = FrameKind::from_code(payload[1]) else {
        return Err(DecodeError::malformed(format!(
            "binary frame has unknown kind code 0x{:02x} in byte 1; kinds are 0x01 (OPEN) to \
             0x0f (CLOSE)",
            payload[1]
        )));
    };
    let flag_bits = payload[2];
    let reserved = flag_bits & !defined_flags(kind);
    if reserved != 0 {
        return Err(DecodeError::malformed(format!(
            "{}: reserved flag bits 0x{reserved:02x} are set in byte 2 (flags 0x{flag_bits:02x}); \
             reserved bits must be 0",
            kind.name()
        )));
    }
    Ok((kind, flag_bits))
}

/// Decodes one binary-binding frame. String fields and the body are slices of `payload`.
pub fn decode(payload: Bytes, limits: &CodecLimits) -> Result<Frame, DecodeError> {
    let (kind, flag_bits) = check_prefix(&payload)?;
    let version = payload[0];
    let has = |bit: u8| flag_bits & bit != 0;
    let mut reader = Reader { payload, position: PREFIX_BYTES, kind };

    let frame = match kind {
        FrameKind::Open => Frame::Open(Open {
            version,
            last_received_seq: reader.u64("last-received-seq")?,
            heartbeat_ms: reader.u32("heartbeat-ms")?,
            session_id: reader.str8("session-id")?,
            login: reader.str8("login")?,
            passcode: reader.str16("passcode")?,
        }),
        FrameKind::Opened => Frame::Opened(Opened {
            version,
            resumed: has(flags::OPENED_RESUMED),
            last_received_seq: reader.u64("last-received-seq")?,
            heartbeat_ms: reader.u32("heartbeat-ms")?,
            session_expiry_ms: reader.u32("session-expiry-ms")?,
            limits: Limits {
                max_frame_bytes: reader.u32("max-frame-bytes")?,
                max_address_bytes: reader.u16("max-address-bytes")?,
                max_headers: reader.u16("max-headers")?,
                max_header_bytes: reader.u32("max-header-bytes")?,
                max_credit: reader.u32("max-credit")?,
                max_subscriptions: reader.u32("max-subscriptions")?,
                max_inflight_sends: reader.u32("max-inflight-sends")?,
                max_queued_messages: reader.u32("max-queued-messages")?,
            },
            session_id: reader.str8("session-id")?,
            server: reader.str8("server")?,
        }),
        FrameKind::Send => Frame::Send(Send {
            durable: has(flags::SEND_DURABLE),
            seq: reader.u64("seq")?,
            ttl_ms: reader.u32("ttl-ms")?,
            address: reader.str8("address")?,
            properties: reader.properties()?,
            body: reader.rest(),
        }),
        FrameKind::Receipt => Frame::Receipt(Receipt { seq: reader.u64("seq")? }),
        FrameKind::Subscribe => Frame::Subscribe(Subscribe {
            mode: if has(flags::SUBSCRIBE_MULTICAST) { DeliveryMode::Multicast } else { DeliveryMode::Anycast },
            ack_mode: if has(flags::SUBSCRIBE_AUTO_ACK) { AckMode::Auto } else { AckMode::Client },
            subscription_id: reader.u32("subscription-id")?,
            credit: reader.u32("credit")?,
            address: reader.str8("address")?,
        }),
        FrameKind::Subscribed => Frame::Subscribed(Subscribed { subscription_id: reader.u32("subscription-id")? }),
        FrameKind::Unsubscribe => Frame::Unsubscribe(Unsubscribe { subscription_id: reader.u32("subscription-id")? }),
        FrameKind::Message => Frame::Message(Message {
            redelivered: has(flags::MESSAGE_REDELIVERED),
            durable: has(flags::MESSAGE_DURABLE),
            subscription_id: reader.u32("subscription-id")?,
            delivery_seq: reader.u64("delivery-seq")?,
            message_id: reader.u64("message-id")?,
            address: reader.str8("address")?,
            properties: reader.properties()?,
            body: reader.rest(),
        }),
        FrameKind::Ack => {
            Frame::Ack(Ack { cumulative: has(flags::ACK_CUMULATIVE), delivery_seq: reader.u64("delivery-seq")? })
        }
        FrameKind::Nack => {
            Frame::Nack(Nack { requeue: has(flags::NACK_REQUEUE), delivery_seq: reader.u64("delivery-seq")? })
        }
        FrameKind::Flow => {
            Frame::Flow(Flow { subscription_id: reader.u32("subscription-id")?, credit: reader.u32("credit")? })
        }
        FrameKind::Ping => Frame::Ping(Ping { token: reader.u64("token")? }),
        FrameKind::Pong => Frame::Pong(Pong { token: reader.u64("token")? }),
        FrameKind::Error => Frame::Error(ErrorFrame {
            fatal: has(flags::ERROR_FATAL),
            code: reader.u16("code")?,
            seq: reader.u64("seq")?,
            subscription_id: reader.u32("subscription-id")?,
            reason: reader.str16("reason")?,
        }),
        FrameKind::Close => Frame::Close(Close),
    };
    reader.finish()?;
    validate_frame(&frame, limits)?;
    Ok(frame)
}

/// Offset of a binary SEND's address (its str8 length byte): the prefix, seq u64, ttl-ms u32.
const SEND_TAIL_OFFSET: usize = PREFIX_BYTES + 8 + 4;
/// Bytes of a binary MESSAGE before its address: the prefix, subscription-id u32,
/// delivery-seq u64, message-id u64. The rest of a MESSAGE is a [`MessageTail`].
pub const MESSAGE_FIXED_BYTES: usize = PREFIX_BYTES + 4 + 8 + 8;

/// A message's address, properties and body in the binary binding's layout (str8 address,
/// PROPERTIES, body), in one buffer. SEND and MESSAGE both end with exactly these fields, so
/// the tail of a binary SEND is, byte for byte, the tail of every binary MESSAGE that delivers
/// it: a broker keeps a message as its tail (one buffer, one reference count, one copy to
/// compact it) and writes a MESSAGE as [`encode_message_fixed`]'s bytes followed by the tail,
/// without encoding the shared part again per delivery.
///
/// Invariant: the bytes are a valid layout whose fields passed the SEND rules of
/// [`super::validate`] (every constructor checks or encodes them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageTail {
    bytes: Bytes,
    /// Where the body starts in `bytes`.
    body_start: usize,
}

impl MessageTail {
    /// Encodes the tail of validated fields (a text-binding SEND, a recovered or dead-lettered
    /// message): one allocation and one copy of each field.
    ///
    /// Panics if a field is longer than its binary length prefix allows (validated fields
    /// never are).
    pub fn encode(address: &[u8], properties: &Properties, body: &[u8]) -> MessageTail {
        let head_len = 1 + address.len() + properties_len(properties);
        let mut bytes = bytes::BytesMut::with_capacity(MessageTail::encoded_len(address, properties, body.len()));
        put_tail(&mut bytes, head_len, address, properties, body);
        MessageTail { bytes: bytes.freeze(), body_start: head_len }
    }

    /// The length of the tail [`MessageTail::encode`] makes of these fields.
    pub fn encoded_len(address: &[u8], properties: &Properties, body_len: usize) -> usize {
        1 + address.len() + properties_len(properties) + body_len
    }

    /// Encodes the tail of validated fields as [`MessageTail::encode`] does, but at the front
    /// of `chunk`'s spare capacity, and splits it off: tails encoded one after another into
    /// one chunk share its allocation and lie next to each other, as a binary read's SENDs do
    /// in its read buffer. `chunk` must be empty; it grows (reallocates) if its spare capacity
    /// is short of the tail, so a caller that wants the tails to share it leaves room first.
    pub fn encode_into(
        address: &[u8],
        properties: &Properties,
        body: &[u8],
        chunk: &mut bytes::BytesMut,
    ) -> MessageTail {
        debug_assert!(chunk.is_empty(), "the tail is split off whole");
        let head_len = 1 + address.len() + properties_len(properties);
        put_tail(chunk, head_len, address, properties, body);
        MessageTail { bytes: chunk.split().freeze(), body_start: head_len }
    }

    pub fn address(&self) -> &[u8] {
        &self.bytes[1..1 + usize::from(self.bytes[0])]
    }

    /// False for the common message with no content type, correlation id, reply-to or header.
    pub fn has_properties(&self) -> bool {
        let start = 1 + usize::from(self.bytes[0]);
        self.bytes[start..self.body_start] != NO_PROPERTIES
    }

    /// The properties, as slices of the tail (no copy; nothing allocated without headers).
    pub fn properties(&self) -> Properties {
        if !self.has_properties() {
            return Properties::default();
        }
        let position = 1 + usize::from(self.bytes[0]);
        let mut reader = Reader { payload: self.bytes.clone(), position, kind: FrameKind::Message };
        let properties = reader.properties().expect("a message tail holds a valid layout (its invariant)");
        debug_assert_eq!(reader.position, self.body_start);
        properties
    }

    pub fn body(&self) -> &[u8] {
        &self.bytes[self.body_start..]
    }

    /// The body as a slice of the tail (one reference count).
    pub fn body_bytes(&self) -> Bytes {
        self.bytes.slice(self.body_start..)
    }

    /// Every byte: what follows [`encode_message_fixed`] in a binary MESSAGE.
    pub fn as_bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// Copies the tail to the end of `chunk` and keeps the copy (split off `chunk`) instead:
    /// how a message that has to wait stops holding the buffer it arrived in.
    pub fn move_into(&mut self, chunk: &mut bytes::BytesMut) {
        debug_assert!(chunk.is_empty(), "the copy is split off whole");
        chunk.extend_from_slice(&self.bytes);
        self.bytes = chunk.split().freeze();
    }
}

/// Writes a tail's fields (see [`MessageTail`]) at the end of `out`; `head_len` is the length
/// of its address and properties.
fn put_tail(out: &mut bytes::BytesMut, head_len: usize, address: &[u8], properties: &Properties, body: &[u8]) {
    let start = out.len();
    put_str8(out, "address", address);
    put_properties(out, properties);
    debug_assert_eq!(out.len() - start, head_len, "properties_len disagrees with put_properties");
    out.extend_from_slice(body);
}

/// A binary MESSAGE whose address, properties and body are kept as a [`MessageTail`]: how a
/// node that relays deliveries keeps what it read as it came (see [`decode_message`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageWithTail {
    pub subscription_id: u32,
    pub delivery_seq: u64,
    pub message_id: u64,
    pub redelivered: bool,
    pub durable: bool,
    pub tail: MessageTail,
}

impl MessageWithTail {
    /// The same MESSAGE with its fields as slices of the tail (no copy of the body).
    pub fn to_message(&self) -> Message {
        Message {
            subscription_id: self.subscription_id,
            delivery_seq: self.delivery_seq,
            message_id: self.message_id,
            address: self.tail.bytes.slice(1..1 + usize::from(self.tail.bytes[0])),
            redelivered: self.redelivered,
            durable: self.durable,
            properties: self.tail.properties(),
            body: self.tail.body_bytes(),
        }
    }

    /// A MESSAGE decoded field by field (the text binding) with its fields encoded into a tail.
    pub fn from_message(message: &Message) -> MessageWithTail {
        MessageWithTail {
            subscription_id: message.subscription_id,
            delivery_seq: message.delivery_seq,
            message_id: message.message_id,
            redelivered: message.redelivered,
            durable: message.durable,
            tail: MessageTail::encode(&message.address, &message.properties, &message.body),
        }
    }
}

/// Decodes a binary MESSAGE (byte 1 is MESSAGE's kind code) into its fixed fields and the
/// payload's tail, with the same checks and errors as [`decode`]: the tail is `payload` itself
/// from the address on, so nothing is copied.
pub fn decode_message(payload: Bytes, limits: &CodecLimits) -> Result<MessageWithTail, DecodeError> {
    let (kind, flag_bits) = check_prefix(&payload)?;
    debug_assert_eq!(kind, FrameKind::Message, "decode_message is for MESSAGE frames only");
    let mut reader = Reader { payload, position: PREFIX_BYTES, kind };
    let subscription_id = reader.u32("subscription-id")?;
    let delivery_seq = reader.u64("delivery-seq")?;
    let message_id = reader.u64("message-id")?;
    let address_len = reader.u8("address")?;
    let (address_start, address_end) = reader.take_range("address", usize::from(address_len))?;
    // The properties are checked where they lie: a MESSAGE kept whole needs none of them made.
    let properties = reader.properties_range()?;
    check_subscription_id(kind, subscription_id)?;
    check_delivery_seq(kind, delivery_seq)?;
    check_address(kind, "address", &reader.payload[address_start..address_end], limits)?;
    check_properties_in_place(kind, &reader.payload[properties], limits)?;
    let body_start = reader.position - MESSAGE_FIXED_BYTES;
    let mut tail = reader.payload;
    bytes::Buf::advance(&mut tail, MESSAGE_FIXED_BYTES);
    Ok(MessageWithTail {
        subscription_id,
        delivery_seq,
        message_id,
        redelivered: flag_bits & flags::MESSAGE_REDELIVERED != 0,
        durable: flag_bits & flags::MESSAGE_DURABLE != 0,
        tail: MessageTail { bytes: tail, body_start },
    })
}

/// A SEND whose address, properties and body are kept as a [`MessageTail`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendTail {
    pub durable: bool,
    pub seq: u64,
    pub ttl_ms: u32,
    pub tail: MessageTail,
    /// [`super::largest_message_bytes`] of the message: the largest MESSAGE it can become on
    /// any session, found while decoding (from the address and body lengths it has at hand) so
    /// that the broker's check against `max-frame-bytes` reads a number.
    pub largest_message_bytes: usize,
}

impl SendTail {
    /// The same SEND with its fields encoded into a tail (see [`MessageTail::encode`]).
    pub fn encode(send: &Send) -> SendTail {
        SendTail::with_tail(send, MessageTail::encode(&send.address, &send.properties, &send.body))
    }

    /// The same SEND with its fields encoded into a tail split off `chunk` (see
    /// [`MessageTail::encode_into`]).
    pub fn encode_into(send: &Send, chunk: &mut bytes::BytesMut) -> SendTail {
        SendTail::with_tail(send, MessageTail::encode_into(&send.address, &send.properties, &send.body, chunk))
    }

    fn with_tail(send: &Send, tail: MessageTail) -> SendTail {
        SendTail {
            durable: send.durable,
            seq: send.seq,
            ttl_ms: send.ttl_ms,
            tail,
            largest_message_bytes: super::largest_message_bytes(&send.address, &send.properties, send.body.len()),
        }
    }
}

/// Decodes a binary SEND (byte 1 is SEND's kind code) into its fixed fields and the payload's
/// tail, with the same checks and errors as [`decode`]: the tail is `payload` itself from the
/// address on, so nothing is copied and no field gets a reference count of its own.
///
/// The common SEND (no properties) is read by [`decode_plain_send`], and the `Bytes` moves
/// once, into the tail; any other (properties, or a fault to report) takes
/// `decode_send_field_by_field`, which reads and reports in [`decode`]'s order.
pub fn decode_send(payload: Bytes, limits: &CodecLimits) -> Result<SendTail, DecodeError> {
    match decode_plain_send(&payload, limits)? {
        Some(plain) => {
            let mut tail = payload;
            bytes::Buf::advance(&mut tail, PlainSend::TAIL_OFFSET);
            Ok(plain.with_tail(tail))
        }
        None => decode_send_with_unusual_shape(payload, limits),
    }
}

/// The fixed fields of a binary SEND of the common shape (no properties), read where its
/// payload lies by [`decode_plain_send`]: the caller then takes the payload from
/// [`PlainSend::TAIL_OFFSET`] on as the message's tail ([`PlainSend::with_tail`]), with no
/// `Bytes` made for a SEND that turns out to be faulty, and one split of the read buffer for
/// one that is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlainSend {
    pub durable: bool,
    pub seq: u64,
    pub ttl_ms: u32,
    /// Where the body starts in the tail (not in the payload).
    body_start: usize,
    /// As [`SendTail::largest_message_bytes`].
    pub largest_message_bytes: usize,
}

impl PlainSend {
    /// Where a binary SEND's tail (its address's length byte) starts in its payload: after the
    /// prefix, seq and ttl-ms.
    pub const TAIL_OFFSET: usize = SEND_TAIL_OFFSET;

    /// The SEND with its tail: `tail` is the payload this was decoded from, from
    /// [`Self::TAIL_OFFSET`] on.
    #[inline]
    pub fn with_tail(self, tail: Bytes) -> SendTail {
        debug_assert!(self.body_start <= tail.len(), "the tail is the payload this SEND was decoded from");
        SendTail {
            durable: self.durable,
            seq: self.seq,
            ttl_ms: self.ttl_ms,
            tail: MessageTail { bytes: tail, body_start: self.body_start },
            largest_message_bytes: self.largest_message_bytes,
        }
    }
}

/// Reads a binary SEND of the common shape (a well-formed prefix, the fixed fields whole, no
/// properties) from its payload's bytes, with [`decode`]'s checks and errors. `Ok(None)` for
/// any other SEND (or a payload that is no SEND): [`decode_send`] decodes and reports it, and
/// nothing was read that it would read differently.
///
/// Inline: on the broker's receive path the result stays in registers.
#[inline]
pub fn decode_plain_send(bytes: &[u8], limits: &CodecLimits) -> Result<Option<PlainSend>, DecodeError> {
    // The prefix of a well-formed SEND is three comparisons, with no call; any other prefix
    // is left to `decode_send_with_unusual_shape` (through `check_prefix`, for its error).
    let flag_bits = match *bytes {
        [PROTOCOL_VERSION, kind, flag_bits, ..]
            if kind == FrameKind::Send.code() && flag_bits & !flags::SEND_DURABLE == 0 =>
        {
            flag_bits
        }
        _ => return Ok(None),
    };
    let Some(&[s0, s1, s2, s3, s4, s5, s6, s7, t0, t1, t2, t3, address_len]) =
        bytes.get(PREFIX_BYTES..=SEND_TAIL_OFFSET)
    else {
        return Ok(None);
    };
    let address_len = usize::from(address_len);
    let address_end = SEND_TAIL_OFFSET + 1 + address_len;
    let body_start = address_end + NO_PROPERTIES.len();
    if bytes.get(address_end..body_start) != Some(&NO_PROPERTIES[..]) {
        return Ok(None);
    }
    // The layout is whole (the properties are there and empty): the field rules remain.
    check_address(FrameKind::Send, "address", &bytes[SEND_TAIL_OFFSET + 1..address_end], limits)?;
    let body_len = bytes.len() - body_start;
    let tail_len = bytes.len() - SEND_TAIL_OFFSET;
    let largest_message_bytes = (MESSAGE_FIXED_BYTES + tail_len)
        .max(super::text::widest_message_header_len_without_properties(address_len) + body_len);
    Ok(Some(PlainSend {
        durable: flag_bits & flags::SEND_DURABLE != 0,
        seq: u64::from_be_bytes([s0, s1, s2, s3, s4, s5, s6, s7]),
        ttl_ms: u32::from_be_bytes([t0, t1, t2, t3]),
        body_start: body_start - SEND_TAIL_OFFSET,
        largest_message_bytes,
    }))
}

/// [`decode_send`] of a payload [`decode_plain_send`] leaves: `check_prefix`'s error, or the
/// fields read one at a time (a SEND with properties, one cut short, or, a caller's mistake,
/// a valid prefix of another kind, read as that kind).
#[inline(never)]
fn decode_send_with_unusual_shape(payload: Bytes, limits: &CodecLimits) -> Result<SendTail, DecodeError> {
    let (kind, flag_bits) = check_prefix(&payload)?;
    debug_assert_eq!(kind, FrameKind::Send, "decode_send is for SEND frames only");
    decode_send_field_by_field(payload, kind, flag_bits, limits)
}

/// [`decode_send`] one field at a time: a SEND with properties, or one with a fault to report
/// (the same fault, in the same order, as [`decode`] reports).
#[inline(never)]
fn decode_send_field_by_field(
    payload: Bytes,
    kind: FrameKind,
    flag_bits: u8,
    limits: &CodecLimits,
) -> Result<SendTail, DecodeError> {
    let mut reader = Reader { payload, position: PREFIX_BYTES, kind };
    let seq = reader.u64("seq")?;
    let ttl_ms = reader.u32("ttl-ms")?;
    let address_len = reader.u8("address")?;
    let (address_start, address_end) = reader.take_range("address", usize::from(address_len))?;
    // The layout first, then the field rules, in `decode`'s order (so the same error comes
    // first).
    let properties =
        if reader.payload.get(reader.position..reader.position + NO_PROPERTIES.len()) == Some(&NO_PROPERTIES[..]) {
            reader.position += NO_PROPERTIES.len();
            None
        } else {
            Some(reader.properties()?)
        };
    check_address(kind, "address", &reader.payload[address_start..address_end], limits)?;
    if let Some(properties) = properties {
        check_properties(kind, &properties, limits)?;
    }
    let body_start = reader.position - SEND_TAIL_OFFSET;
    let mut tail = reader.payload;
    bytes::Buf::advance(&mut tail, SEND_TAIL_OFFSET);
    let tail = MessageTail { bytes: tail, body_start };
    Ok(SendTail {
        durable: flag_bits & flags::SEND_DURABLE != 0,
        seq,
        ttl_ms,
        largest_message_bytes: super::largest_message_bytes_of_tail(&tail),
        tail,
    })
}

/// Reads fields front to back, naming the field in every truncation error.
struct Reader {
    payload: Bytes,
    position: usize,
    kind: FrameKind,
}

impl Reader {
    /// The next `length` bytes as offsets `(start, end)` into the payload.
    #[inline]
    fn take_range(&mut self, field: &str, length: usize) -> Result<(usize, usize), DecodeError> {
        let start = self.position;
        let remaining = self.payload.len() - start;
        if length > remaining {
            return Err(self.truncated(field, length));
        }
        self.position = start + length;
        Ok((start, self.position))
    }

    /// The error for a field that needs `length` bytes where fewer remain.
    #[cold]
    #[inline(never)]
    fn truncated(&self, field: &str, length: usize) -> DecodeError {
        DecodeError::malformed(format!(
            "{}: frame is truncated in field `{field}`: it needs {length} bytes at offset {} \
             but only {} remain",
            self.kind.name(),
            self.position,
            self.payload.len() - self.position
        ))
    }

    #[inline]
    fn array<const N: usize>(&mut self, field: &str) -> Result<[u8; N], DecodeError> {
        let (start, end) = self.take_range(field, N)?;
        let mut array = [0; N];
        array.copy_from_slice(&self.payload[start..end]);
        Ok(array)
    }

    fn u8(&mut self, field: &str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(field)?[0])
    }

    fn u16(&mut self, field: &str) -> Result<u16, DecodeError> {
        self.array(field).map(u16::from_be_bytes)
    }

    fn u32(&mut self, field: &str) -> Result<u32, DecodeError> {
        self.array(field).map(u32::from_be_bytes)
    }

    fn u64(&mut self, field: &str) -> Result<u64, DecodeError> {
        self.array(field).map(u64::from_be_bytes)
    }

    /// The next `length` bytes as a slice of the payload. An empty field is `Bytes::new()`
    /// (`Bytes::slice` returns it without touching the reference count).
    #[inline]
    fn slice(&mut self, field: &str, length: usize) -> Result<Bytes, DecodeError> {
        let (start, end) = self.take_range(field, length)?;
        Ok(self.payload.slice(start..end))
    }

    fn str8(&mut self, field: &str) -> Result<Bytes, DecodeError> {
        let length = self.u8(field)?;
        self.slice(field, usize::from(length))
    }

    fn str16(&mut self, field: &str) -> Result<Bytes, DecodeError> {
        let length = self.u16(field)?;
        self.slice(field, usize::from(length))
    }

    fn properties(&mut self) -> Result<Properties, DecodeError> {
        // Most messages carry no properties: four zero bytes (three empty strings, no headers).
        if self.payload.get(self.position..self.position + NO_PROPERTIES.len()) == Some(&NO_PROPERTIES[..]) {
            self.position += NO_PROPERTIES.len();
            return Ok(Properties::default());
        }
        let content_type = self.str8("content-type")?;
        let correlation_id = self.str8("correlation-id")?;
        let reply_to = self.str8("reply-to")?;
        let count = self.u8("header-count")?;
        let mut headers = Headers::with_capacity(usize::from(count));
        for _ in 0..count {
            let name = self.str8("header name")?;
            let value = self.str16("header value")?;
            headers.push((name, value));
        }
        Ok(Properties { content_type, correlation_id, reply_to, headers })
    }

    /// Reads past the properties with [`Reader::properties`]'s checks and errors, without
    /// making them; returns where they lie in the payload.
    fn properties_range(&mut self) -> Result<std::ops::Range<usize>, DecodeError> {
        let start = self.position;
        if self.payload.get(start..start + NO_PROPERTIES.len()) == Some(&NO_PROPERTIES[..]) {
            self.position += NO_PROPERTIES.len();
            return Ok(start..self.position);
        }
        for field in ["content-type", "correlation-id", "reply-to"] {
            let length = self.u8(field)?;
            self.take_range(field, usize::from(length))?;
        }
        for _ in 0..self.u8("header-count")? {
            let length = self.u8("header name")?;
            self.take_range("header name", usize::from(length))?;
            let length = self.u16("header value")?;
            self.take_range("header value", usize::from(length))?;
        }
        Ok(start..self.position)
    }

    /// The body: every byte after the last field.
    fn rest(&mut self) -> Bytes {
        let body = self.payload.slice(self.position..);
        self.position = self.payload.len();
        body
    }

    /// Kinds without a body must end right after their last field.
    #[inline]
    fn finish(&self) -> Result<(), DecodeError> {
        if self.position == self.payload.len() {
            return Ok(());
        }
        Err(self.trailing())
    }

    #[cold]
    #[inline(never)]
    fn trailing(&self) -> DecodeError {
        let trailing = self.payload.len() - self.position;
        DecodeError::malformed(format!(
            "{}: {} after the last field (frame is {} bytes, fields end at {}; starting \"{}\"); \
             only SEND and MESSAGE have a body",
            self.kind.name(),
            trailing_bytes(trailing),
            self.payload.len(),
            self.position,
            excerpt(&self.payload[self.position..])
        ))
    }
}

/// The properties block of a message without properties: empty content type, correlation id
/// and reply-to, and a header count of zero.
const NO_PROPERTIES: [u8; 4] = [0; 4];

/// [`check_properties`] of a properties block as the binary binding lays it out, already
/// read whole by [`Reader::properties_range`] (so every length in it is within it).
fn check_properties_in_place(kind: FrameKind, block: &[u8], limits: &CodecLimits) -> Result<(), DecodeError> {
    if block == NO_PROPERTIES {
        return Ok(());
    }
    let mut fields = PropertyFields { rest: block };
    let strings = [fields.str8(), fields.str8(), fields.str8()];
    let header_count = usize::from(fields.take(1)[0]);
    let headers = (0..header_count).map(|_| {
        let name = fields.str8();
        let length = u16::from_be_bytes(fields.take(2).try_into().expect("2 bytes"));
        (name, fields.take(usize::from(length)))
    });
    check_property_fields(kind, strings, header_count, headers, limits)
}

/// The fields of a properties block read whole (see [`check_properties_in_place`]).
struct PropertyFields<'a> {
    rest: &'a [u8],
}

impl<'a> PropertyFields<'a> {
    fn take(&mut self, length: usize) -> &'a [u8] {
        let (field, rest) = self.rest.split_at(length);
        self.rest = rest;
        field
    }

    fn str8(&mut self) -> &'a [u8] {
        let length = usize::from(self.take(1)[0]);
        self.take(length)
    }
}

/// Writes everything of `frame` but its body (SEND, MESSAGE), which follows directly.
///
/// Panics if a string is longer than its length prefix can carry or a message has more than
/// [`MAX_HEADER_COUNT`] headers: the frame would be corrupt. Decoded and validated frames
/// always fit ([`super::validate::validate_frame`]).
pub fn encode_header<B: BufMut>(frame: &Frame, out: &mut B) {
    if let Frame::Message(message) = frame {
        return encode_message_header(&message.header(), out);
    }
    let kind = frame.kind();
    let version = match frame {
        Frame::Open(open) => open.version,
        Frame::Opened(opened) => opened.version,
        _ => PROTOCOL_VERSION,
    };
    let flag_bits = match frame {
        Frame::Opened(opened) => bit(opened.resumed, flags::OPENED_RESUMED),
        Frame::Send(send) => bit(send.durable, flags::SEND_DURABLE),
        Frame::Subscribe(subscribe) => {
            bit(subscribe.mode == DeliveryMode::Multicast, flags::SUBSCRIBE_MULTICAST)
                | bit(subscribe.ack_mode == AckMode::Auto, flags::SUBSCRIBE_AUTO_ACK)
        }
        Frame::Ack(ack) => bit(ack.cumulative, flags::ACK_CUMULATIVE),
        Frame::Nack(nack) => bit(nack.requeue, flags::NACK_REQUEUE),
        Frame::Error(error) => bit(error.fatal, flags::ERROR_FATAL),
        _ => 0,
    };
    out.put_slice(&[version, kind.code(), flag_bits]);

    match frame {
        Frame::Open(open) => {
            out.put_u64(open.last_received_seq);
            out.put_u32(open.heartbeat_ms);
            put_str8(out, "session-id", &open.session_id);
            put_str8(out, "login", &open.login);
            put_str16(out, "passcode", &open.passcode);
        }
        Frame::Opened(opened) => {
            out.put_u64(opened.last_received_seq);
            out.put_u32(opened.heartbeat_ms);
            out.put_u32(opened.session_expiry_ms);
            let limits = &opened.limits;
            out.put_u32(limits.max_frame_bytes);
            out.put_u16(limits.max_address_bytes);
            out.put_u16(limits.max_headers);
            out.put_u32(limits.max_header_bytes);
            out.put_u32(limits.max_credit);
            out.put_u32(limits.max_subscriptions);
            out.put_u32(limits.max_inflight_sends);
            out.put_u32(limits.max_queued_messages);
            put_str8(out, "session-id", &opened.session_id);
            put_str8(out, "server", &opened.server);
        }
        Frame::Send(send) => {
            out.put_u64(send.seq);
            out.put_u32(send.ttl_ms);
            put_str8(out, "address", &send.address);
            put_properties(out, &send.properties);
        }
        Frame::Receipt(receipt) => out.put_u64(receipt.seq),
        Frame::Subscribe(subscribe) => {
            out.put_u32(subscribe.subscription_id);
            out.put_u32(subscribe.credit);
            put_str8(out, "address", &subscribe.address);
        }
        Frame::Subscribed(subscribed) => out.put_u32(subscribed.subscription_id),
        Frame::Unsubscribe(unsubscribe) => out.put_u32(unsubscribe.subscription_id),
        Frame::Message(_) => unreachable!("encoded by encode_message_header"),
        Frame::Ack(ack) => out.put_u64(ack.delivery_seq),
        Frame::Nack(nack) => out.put_u64(nack.delivery_seq),
        Frame::Flow(flow) => {
            out.put_u32(flow.subscription_id);
            out.put_u32(flow.credit);
        }
        Frame::Ping(ping) => out.put_u64(ping.token),
        Frame::Pong(pong) => out.put_u64(pong.token),
        Frame::Error(error) => {
            out.put_u16(error.code);
            out.put_u64(error.seq);
            out.put_u32(error.subscription_id);
            put_str16(out, "reason", &error.reason);
        }
        Frame::Close(_) => {}
    }
}

fn bit(set: bool, mask: u8) -> u8 {
    if set {
        mask
    } else {
        0
    }
}

/// Bytes [`encode_message_header`] writes for `message`: known before encoding, so the
/// WebSocket header (which carries the payload length) can be written first, and the MESSAGE
/// straight behind it.
pub fn message_header_len(message: &MessageHeader<'_>) -> usize {
    MESSAGE_FIXED_BYTES + 1 + message.address.len() + properties_len(message.properties)
}

/// Bytes `put_properties` writes for `properties`.
fn properties_len(properties: &Properties) -> usize {
    if properties.is_empty() {
        return NO_PROPERTIES.len();
    }
    3 + properties.content_type.len()
        + properties.correlation_id.len()
        + properties.reply_to.len()
        + 1
        + properties.headers.iter().map(|(name, value)| 1 + name.len() + 2 + value.len()).sum::<usize>()
}

/// Writes a MESSAGE up to its body; [`encode_header`] of a `Frame::Message` comes here too.
pub fn encode_message_header<B: BufMut>(message: &MessageHeader<'_>, out: &mut B) {
    out.put_slice(&encode_message_fixed(
        message.subscription_id,
        message.delivery_seq,
        message.message_id,
        message.redelivered,
        message.durable,
    ));
    put_str8(out, "address", message.address);
    put_properties(out, message.properties);
}

/// Bytes of a binary SEND before its [`MessageTail`]: the prefix, seq u64, ttl-ms u32.
pub const SEND_FIXED_BYTES: usize = SEND_TAIL_OFFSET;

/// The bytes of a binary SEND before its [`MessageTail`].
#[inline]
pub fn encode_send_fixed(seq: u64, ttl_ms: u32, durable: bool) -> [u8; SEND_FIXED_BYTES] {
    let mut fixed = [0u8; SEND_FIXED_BYTES];
    fixed[..3].copy_from_slice(&[PROTOCOL_VERSION, FrameKind::Send.code(), bit(durable, flags::SEND_DURABLE)]);
    fixed[3..11].copy_from_slice(&seq.to_be_bytes());
    fixed[11..15].copy_from_slice(&ttl_ms.to_be_bytes());
    fixed
}

/// The bytes of a binary MESSAGE before its [`MessageTail`]: what differs per delivery.
#[inline]
pub fn encode_message_fixed(
    subscription_id: u32,
    delivery_seq: u64,
    message_id: u64,
    redelivered: bool,
    durable: bool,
) -> [u8; MESSAGE_FIXED_BYTES] {
    let flag_bits = bit(redelivered, flags::MESSAGE_REDELIVERED) | bit(durable, flags::MESSAGE_DURABLE);
    let mut fixed = [0u8; MESSAGE_FIXED_BYTES];
    fixed[..3].copy_from_slice(&[PROTOCOL_VERSION, FrameKind::Message.code(), flag_bits]);
    fixed[3..7].copy_from_slice(&subscription_id.to_be_bytes());
    fixed[7..15].copy_from_slice(&delivery_seq.to_be_bytes());
    fixed[15..23].copy_from_slice(&message_id.to_be_bytes());
    fixed
}

fn put_str8<B: BufMut>(out: &mut B, field: &str, value: &[u8]) {
    let Ok(length) = u8::try_from(value.len()) else {
        panic!("MBWS binary encode: field `{field}` is {} bytes, over 255 (str8)", value.len());
    };
    out.put_u8(length);
    out.put_slice(value);
}

fn put_str16<B: BufMut>(out: &mut B, field: &str, value: &[u8]) {
    let Ok(length) = u16::try_from(value.len()) else {
        panic!("MBWS binary encode: field `{field}` is {} bytes, over 65535 (str16)", value.len());
    };
    out.put_u16(length);
    out.put_slice(value);
}

fn put_properties<B: BufMut>(out: &mut B, properties: &Properties) {
    if properties.is_empty() {
        out.put_slice(&NO_PROPERTIES);
        return;
    }
    put_str8(out, "content-type", &properties.content_type);
    put_str8(out, "correlation-id", &properties.correlation_id);
    put_str8(out, "reply-to", &properties.reply_to);
    let Ok(count) = u8::try_from(properties.headers.len()) else {
        panic!("MBWS binary encode: {} application headers, over {MAX_HEADER_COUNT}", properties.headers.len());
    };
    out.put_u8(count);
    for (name, value) in &properties.headers {
        put_str8(out, "header name", name);
        put_str16(out, "header value", value);
    }
}

#[cfg(test)]
mod tests {
    //! Layout errors of the binary binding; the field rules are tested in `validate`.

    use bytes::Bytes;

    use super::super::codec_tests::{assert_error, sample};
    use super::super::{Binding, ErrorCode};
    use super::*;

    const MALFORMED: ErrorCode = ErrorCode::MalformedFrame;

    fn encoded(frame: &Frame) -> Vec<u8> {
        super::super::encode(Binding::Binary, frame).to_vec()
    }

    fn decoded(bytes: &[u8]) -> Result<Frame, DecodeError> {
        decode(Bytes::copy_from_slice(bytes), &CodecLimits::default())
    }

    #[test]
    fn prefix_must_be_complete() {
        for short in [&[][..], &[1], &[1, 0x0c]] {
            assert_error(decoded(short), MALFORMED, &["shorter than the 3-byte prefix (version, kind, flags)"]);
        }
    }

    #[test]
    fn version_byte_must_be_1() {
        for version in [0u8, 2, 0xff] {
            let mut bytes = encoded(&sample(FrameKind::Ping));
            bytes[0] = version;
            assert_error(decoded(&bytes), MALFORMED, &[&format!("version {version} in byte 0"), "only MBWS version 1"]);
        }
    }

    #[test]
    fn kind_byte_must_name_a_kind() {
        for code in [0x00u8, 0x10, 0xff] {
            assert_error(decoded(&[1, code, 0]), MALFORMED, &[&format!("unknown kind code 0x{code:02x} in byte 1")]);
        }
        for kind in FrameKind::ALL {
            assert_eq!(encoded(&sample(kind))[1], kind.code());
        }
    }

    #[test]
    fn reserved_flag_bits_must_be_zero() {
        for kind in FrameKind::ALL {
            let defined = defined_flags(kind);
            for bit in (0..8).map(|shift| 1u8 << shift) {
                let mut bytes = encoded(&sample(kind));
                bytes[2] |= bit;
                let result = decoded(&bytes);
                if defined & bit == 0 {
                    assert_error(
                        result,
                        MALFORMED,
                        &[kind.name(), &format!("reserved flag bits 0x{bit:02x} are set in byte 2")],
                    );
                } else {
                    assert!(result.is_ok(), "{}: flag 0x{bit:02x} is defined: {result:?}", kind.name());
                }
            }
        }
    }

    #[test]
    fn flags_carry_the_booleans_and_enums() {
        let subscribe = Frame::Subscribe(Subscribe {
            subscription_id: 1,
            address: Bytes::from_static(b"a"),
            mode: DeliveryMode::Multicast,
            ack_mode: AckMode::Auto,
            credit: 0,
        });
        assert_eq!(encoded(&subscribe)[2], flags::SUBSCRIBE_MULTICAST | flags::SUBSCRIBE_AUTO_ACK);
        let message = Frame::Message(Message {
            subscription_id: 1,
            delivery_seq: 1,
            address: Bytes::from_static(b"a"),
            redelivered: true,
            durable: true,
            ..Message::default()
        });
        assert_eq!(encoded(&message)[2], flags::MESSAGE_REDELIVERED | flags::MESSAGE_DURABLE);
        let error = Frame::Error(ErrorFrame { code: 4400, fatal: true, ..ErrorFrame::default() });
        assert_eq!(encoded(&error)[2], flags::ERROR_FATAL);
    }

    /// Every cut before the end of the last field is reported, naming the kind and a field.
    #[test]
    fn truncated_frames_name_the_field() {
        for kind in FrameKind::ALL {
            let frame = sample(kind);
            let bytes = encoded(&frame);
            let header_length = bytes.len() - frame.body().map_or(0, Bytes::len);
            for cut in PREFIX_BYTES..header_length {
                assert_error(decoded(&bytes[..cut]), MALFORMED, &[kind.name(), "frame is truncated in field `"]);
            }
        }
        let send = encoded(&sample(FrameKind::Send));
        assert_error(
            decoded(&send[..5]),
            MALFORMED,
            &["SEND: frame is truncated in field `seq`: it needs 8 bytes at offset 3 but only 2 remain"],
        );
    }

    #[test]
    fn header_count_larger_than_the_headers_present_is_truncation() {
        let frame = Frame::Send(Send { seq: 1, address: Bytes::from_static(b"a"), ..Send::default() });
        let mut bytes = encoded(&frame);
        *bytes.last_mut().unwrap() = 2; // header-count, the last header byte
        assert_error(decoded(&bytes), MALFORMED, &["SEND: frame is truncated in field `header name`"]);
    }

    #[test]
    fn kinds_without_body_refuse_trailing_bytes() {
        for kind in FrameKind::ALL {
            let frame = sample(kind);
            let mut bytes = encoded(&frame);
            bytes.push(b'!');
            if frame.body().is_some() {
                assert!(decoded(&bytes).is_ok());
            } else {
                assert_error(
                    decoded(&bytes),
                    MALFORMED,
                    &[kind.name(), "1 trailing byte after the last field", "only SEND and MESSAGE have a body"],
                );
            }
        }
    }

    #[test]
    fn body_is_every_byte_after_the_header() {
        let frame = Frame::Send(Send { seq: 1, address: Bytes::from_static(b"a"), ..Send::default() });
        let mut bytes = encoded(&frame);
        bytes.extend_from_slice(b"\x00\xff binary body");
        let Ok(Frame::Send(send)) = decoded(&bytes) else { panic!("SEND with a binary body must decode") };
        assert_eq!(&send.body[..], b"\x00\xff binary body");
    }

    #[test]
    fn layout_matches_the_documented_sizes() {
        // Prefix + integers + one length byte per empty str8 / two per empty str16.
        let sizes = [
            (Frame::Open(Open::default()), 3 + 8 + 4 + 1 + 1 + 2),
            (Frame::Receipt(Receipt { seq: 1 }), 3 + 8),
            (Frame::Subscribed(Subscribed { subscription_id: 1 }), 3 + 4),
            (Frame::Flow(Flow { subscription_id: 1, credit: 1 }), 3 + 4 + 4),
            (Frame::Ping(Ping { token: 1 }), 3 + 8),
            (Frame::Error(ErrorFrame { code: 4400, ..ErrorFrame::default() }), 3 + 2 + 8 + 4 + 2),
            (Frame::Close(Close), 3),
        ];
        for (frame, size) in sizes {
            assert_eq!(encoded(&frame).len(), size, "{}", frame.kind().name());
        }
        let Frame::Opened(opened) = sample(FrameKind::Opened) else { unreachable!() };
        let fixed = 3 + 8 + 4 + 4 + (4 + 2 + 2 + 4 * 5);
        let strings = 1 + opened.session_id.len() + 1 + opened.server.len();
        assert_eq!(encoded(&Frame::Opened(opened)).len(), fixed + strings);
    }

    #[test]
    #[should_panic(expected = "field `address` is 256 bytes, over 255 (str8)")]
    fn encoding_an_overlong_str8_panics_instead_of_corrupting_the_frame() {
        let frame = Frame::Send(Send { address: Bytes::from(vec![b'a'; 256]), ..Send::default() });
        let mut out = Vec::new();
        encode_header(&frame, &mut out);
    }

    #[test]
    fn message_header_len_is_what_the_encoder_writes() {
        let bytes = |text: &str| Bytes::copy_from_slice(text.as_bytes());
        let with_everything = Properties {
            content_type: bytes("text/plain"),
            correlation_id: bytes("c-1"),
            reply_to: bytes("replies"),
            headers: vec![(bytes("x-a"), bytes("1")), (bytes("x-empty"), Bytes::new())],
        };
        let only_a_header = Properties { headers: vec![(bytes("x-b"), bytes("two"))], ..Properties::default() };
        for properties in [Properties::default(), with_everything, only_a_header] {
            for address in ["", "a", "orders.eu"] {
                let header = MessageHeader {
                    subscription_id: 7,
                    delivery_seq: u64::MAX,
                    message_id: 3,
                    address: address.as_bytes(),
                    redelivered: true,
                    durable: false,
                    properties: &properties,
                };
                let mut out = Vec::new();
                encode_message_header(&header, &mut out);
                assert_eq!(message_header_len(&header), out.len(), "{properties:?} at {address:?}");
            }
        }
    }
}
