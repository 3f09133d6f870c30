//! The MBWS frame model: one Rust type per frame kind, shared by both bindings.
//!
//! Every string field is a `Bytes` slice of the WebSocket payload it was decoded from (no copy)
//! and is valid UTF-8 (the decoders check it). Empty means "absent" for optional strings. The
//! body is always the tail of the frame, so an encoder can write the header into a small buffer
//! and hand the body `Bytes` to a vectored write untouched.

use bytes::Bytes;

/// Protocol version carried in every binary frame (byte 0) and in OPEN/OPENED.
pub const PROTOCOL_VERSION: u8 = 1;

/// Which of the two bindings a frame travels in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Binding {
    /// WebSocket binary message: fixed-position fields, network byte order.
    Binary,
    /// WebSocket text message: `name:value` lines, a blank line, the body.
    Text,
}

/// The two registered subprotocols.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Subprotocol {
    /// `MBWS.huawei.com`: reliable (sequence numbers, receipts, resume).
    Reliable,
    /// `MBLWS.huawei.com`: light (same frames, at most once, no resume).
    Light,
}

impl Subprotocol {
    pub const RELIABLE_NAME: &'static str = "MBWS.huawei.com";
    pub const LIGHT_NAME: &'static str = "MBLWS.huawei.com";

    /// The token exchanged in `Sec-WebSocket-Protocol`.
    pub fn name(self) -> &'static str {
        match self {
            Subprotocol::Reliable => Self::RELIABLE_NAME,
            Subprotocol::Light => Self::LIGHT_NAME,
        }
    }

    /// Parses a token exactly as registered (subprotocol tokens are case-sensitive).
    pub fn from_name(token: &str) -> Option<Subprotocol> {
        match token {
            Self::RELIABLE_NAME => Some(Subprotocol::Reliable),
            Self::LIGHT_NAME => Some(Subprotocol::Light),
            _ => None,
        }
    }
}

/// The WebSocket handshake negotiates these two.
impl crate::ws::handshake::Subprotocol for Subprotocol {
    const ALL: &'static [Self] = &[Subprotocol::Reliable, Subprotocol::Light];

    fn token(self) -> &'static str {
        self.name()
    }

    fn from_token(token: &str) -> Option<Self> {
        Subprotocol::from_name(token)
    }
}

/// Competing consumers (each message to one subscriber) or publish/subscribe (to every one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DeliveryMode {
    #[default]
    Anycast,
    Multicast,
}

/// Whether the consumer acknowledges deliveries (`Client`) or the broker considers a delivery
/// acknowledged as soon as it is handed to the connection (`Auto`, at most once).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum AckMode {
    #[default]
    Client,
    Auto,
}

/// Application headers: names start with `x-`, values are UTF-8 without CR, LF or NUL. A `Vec`
/// (24 bytes, allocated only when there are headers) rather than inline storage: most messages
/// have none, and every `Frame` and stored message moves this field around.
pub type Headers = Vec<(Bytes, Bytes)>;

/// Message properties carried identically by SEND and MESSAGE.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Properties {
    pub content_type: Bytes,
    pub correlation_id: Bytes,
    pub reply_to: Bytes,
    pub headers: Headers,
}

impl Properties {
    /// No content type, correlation id, reply-to or application header.
    pub fn is_empty(&self) -> bool {
        self.content_type.is_empty()
            && self.correlation_id.is_empty()
            && self.reply_to.is_empty()
            && self.headers.is_empty()
    }
}

/// Limits the broker announces in OPENED and enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest WebSocket message (one MBWS frame) the broker accepts.
    pub max_frame_bytes: u32,
    /// Longest address, in UTF-8 bytes.
    pub max_address_bytes: u16,
    /// Most application headers on one message.
    pub max_headers: u16,
    /// Largest total size of one message's properties and headers (names + values).
    pub max_header_bytes: u32,
    /// Largest credit (unacknowledged deliveries) one subscription may hold.
    pub max_credit: u32,
    /// Most subscriptions on one session.
    pub max_subscriptions: u32,
    /// Most SENDs the broker holds unreceipted for one session before it stops reading.
    pub max_inflight_sends: u32,
    /// Most messages waiting in one address queue; a SEND past it gets ERROR 4429.
    pub max_queued_messages: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Open {
    /// Protocol version the client speaks (currently 1).
    pub version: u8,
    /// Session to resume (MBWS only); empty starts a new session.
    pub session_id: Bytes,
    /// Highest MESSAGE delivery sequence the client has received (resume), 0 if none.
    pub last_received_seq: u64,
    /// Client's heartbeat interval; 0 asks for none.
    pub heartbeat_ms: u32,
    pub login: Bytes,
    pub passcode: Bytes,
}

/// A new session, no credentials, no heartbeat, speaking [`PROTOCOL_VERSION`] (a version of 0
/// would be refused by every decoder).
impl Default for Open {
    fn default() -> Self {
        Open {
            version: PROTOCOL_VERSION,
            session_id: Bytes::new(),
            last_received_seq: 0,
            heartbeat_ms: 0,
            login: Bytes::new(),
            passcode: Bytes::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    pub version: u8,
    pub session_id: Bytes,
    /// True when an existing session was resumed.
    pub resumed: bool,
    /// Highest SEND sequence the broker has received on this session, 0 if none.
    pub last_received_seq: u64,
    /// Heartbeat interval the broker will use (0: none).
    pub heartbeat_ms: u32,
    /// How long a disconnected session is kept for resume.
    pub session_expiry_ms: u32,
    pub limits: Limits,
    /// Broker name and version, e.g. `mbws-broker/0.1.0`.
    pub server: Bytes,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Send {
    /// Client sequence: 1, 2, 3... per session. 0 means "no receipt wanted" (MBLWS only).
    pub seq: u64,
    pub address: Bytes,
    pub durable: bool,
    /// Time to live in milliseconds; 0 means the message never expires.
    pub ttl_ms: u32,
    pub properties: Properties,
    pub body: Bytes,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Receipt {
    /// Every SEND with sequence <= this one is safe (except those answered by a non-fatal ERROR).
    pub seq: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Subscribe {
    pub subscription_id: u32,
    pub address: Bytes,
    pub mode: DeliveryMode,
    pub ack_mode: AckMode,
    /// Most unacknowledged deliveries the subscription may hold (client ack mode).
    pub credit: u32,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Subscribed {
    pub subscription_id: u32,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Unsubscribe {
    pub subscription_id: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    pub subscription_id: u32,
    /// Broker sequence: 1, 2, 3... per session, over all subscriptions.
    pub delivery_seq: u64,
    /// Identifier of the message, unique within its address.
    pub message_id: u64,
    pub address: Bytes,
    pub redelivered: bool,
    pub durable: bool,
    pub properties: Properties,
    pub body: Bytes,
}

impl Message {
    /// Everything of this MESSAGE but its body, borrowed.
    pub fn header(&self) -> MessageHeader<'_> {
        MessageHeader {
            subscription_id: self.subscription_id,
            delivery_seq: self.delivery_seq,
            message_id: self.message_id,
            address: &self.address,
            redelivered: self.redelivered,
            durable: self.durable,
            properties: &self.properties,
        }
    }
}

/// The fields of a MESSAGE before its body, borrowed from wherever they live: the broker
/// encodes each delivery from the stored message through this, without building a
/// [`Message`] (which would clone every field for one encode).
#[derive(Debug, Clone, Copy)]
pub struct MessageHeader<'a> {
    pub subscription_id: u32,
    pub delivery_seq: u64,
    pub message_id: u64,
    pub address: &'a [u8],
    pub redelivered: bool,
    pub durable: bool,
    pub properties: &'a Properties,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ack {
    pub delivery_seq: u64,
    /// Acknowledge every delivery of the session up to and including `delivery_seq`.
    pub cumulative: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Nack {
    pub delivery_seq: u64,
    /// Put the message back in its queue (true) or drop it / dead-letter it (false).
    pub requeue: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flow {
    pub subscription_id: u32,
    /// New credit (absolute): most unacknowledged deliveries; 0 pauses the subscription.
    pub credit: u32,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ping {
    pub token: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pong {
    pub token: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorFrame {
    /// A code from the table in docs/PROTOCOL.md (see [`super::ErrorCode`]).
    pub code: u16,
    /// Fatal errors are followed by a WebSocket close with the same code.
    pub fatal: bool,
    /// The SEND sequence the error refers to, 0 if none.
    pub seq: u64,
    /// The subscription the error refers to, 0 if none.
    pub subscription_id: u32,
    /// What went wrong, for a person: which input, which limit, what to do.
    pub reason: Bytes,
}

impl ErrorFrame {
    /// A fatal ERROR: the session ends, and the WebSocket closes with the same code.
    pub fn fatal(code: super::ErrorCode, seq: u64, subscription_id: u32, reason: &str) -> ErrorFrame {
        ErrorFrame {
            code: code.as_u16(),
            fatal: true,
            seq,
            subscription_id,
            reason: Bytes::copy_from_slice(reason.as_bytes()),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Close;

/// One MBWS frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Open(Open),
    Opened(Opened),
    Send(Send),
    Receipt(Receipt),
    Subscribe(Subscribe),
    Subscribed(Subscribed),
    Unsubscribe(Unsubscribe),
    Message(Message),
    Ack(Ack),
    Nack(Nack),
    Flow(Flow),
    Ping(Ping),
    Pong(Pong),
    Error(ErrorFrame),
    Close(Close),
}

/// Frame kinds, with their binary code (byte 1 of a binary frame) and text name (first line).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    Open = 0x01,
    Opened = 0x02,
    Send = 0x03,
    Receipt = 0x04,
    Subscribe = 0x05,
    Subscribed = 0x06,
    Unsubscribe = 0x07,
    Message = 0x08,
    Ack = 0x09,
    Nack = 0x0A,
    Flow = 0x0B,
    Ping = 0x0C,
    Pong = 0x0D,
    Error = 0x0E,
    Close = 0x0F,
}

impl FrameKind {
    pub const ALL: [FrameKind; 15] = [
        FrameKind::Open,
        FrameKind::Opened,
        FrameKind::Send,
        FrameKind::Receipt,
        FrameKind::Subscribe,
        FrameKind::Subscribed,
        FrameKind::Unsubscribe,
        FrameKind::Message,
        FrameKind::Ack,
        FrameKind::Nack,
        FrameKind::Flow,
        FrameKind::Ping,
        FrameKind::Pong,
        FrameKind::Error,
        FrameKind::Close,
    ];

    pub fn code(self) -> u8 {
        self as u8
    }

    pub fn from_code(code: u8) -> Option<FrameKind> {
        FrameKind::ALL.get(code.wrapping_sub(1) as usize).copied()
    }

    /// The text binding's first line.
    pub const fn name(self) -> &'static str {
        match self {
            FrameKind::Open => "OPEN",
            FrameKind::Opened => "OPENED",
            FrameKind::Send => "SEND",
            FrameKind::Receipt => "RECEIPT",
            FrameKind::Subscribe => "SUBSCRIBE",
            FrameKind::Subscribed => "SUBSCRIBED",
            FrameKind::Unsubscribe => "UNSUBSCRIBE",
            FrameKind::Message => "MESSAGE",
            FrameKind::Ack => "ACK",
            FrameKind::Nack => "NACK",
            FrameKind::Flow => "FLOW",
            FrameKind::Ping => "PING",
            FrameKind::Pong => "PONG",
            FrameKind::Error => "ERROR",
            FrameKind::Close => "CLOSE",
        }
    }

    pub fn from_name(name: &[u8]) -> Option<FrameKind> {
        FrameKind::ALL.iter().copied().find(|kind| kind.name().as_bytes() == name)
    }
}

impl Frame {
    pub fn kind(&self) -> FrameKind {
        match self {
            Frame::Open(_) => FrameKind::Open,
            Frame::Opened(_) => FrameKind::Opened,
            Frame::Send(_) => FrameKind::Send,
            Frame::Receipt(_) => FrameKind::Receipt,
            Frame::Subscribe(_) => FrameKind::Subscribe,
            Frame::Subscribed(_) => FrameKind::Subscribed,
            Frame::Unsubscribe(_) => FrameKind::Unsubscribe,
            Frame::Message(_) => FrameKind::Message,
            Frame::Ack(_) => FrameKind::Ack,
            Frame::Nack(_) => FrameKind::Nack,
            Frame::Flow(_) => FrameKind::Flow,
            Frame::Ping(_) => FrameKind::Ping,
            Frame::Pong(_) => FrameKind::Pong,
            Frame::Error(_) => FrameKind::Error,
            Frame::Close(_) => FrameKind::Close,
        }
    }

    /// The body, for the two kinds that carry one (SEND and MESSAGE).
    pub fn body(&self) -> Option<&Bytes> {
        match self {
            Frame::Send(send) => Some(&send.body),
            Frame::Message(message) => Some(&message.body),
            _ => None,
        }
    }
}
