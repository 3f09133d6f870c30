//! MBWS frames built and parsed by hand, independently of the crate's codec, for the interop and
//! conformance tests. It follows the documented layouts (docs/PROTOCOL.md; the module docs of
//! crates/mbws-proto/src/mbws/binary.rs and text.rs) byte by byte, so that a mistake shared by the broker
//! and the crate's own codec cannot hide behind a round trip through the same code.
//!
//! Binary binding: byte 0 version (1), byte 1 kind code, byte 2 flags, then big-endian integers,
//! then strings (str8 = u8 length + bytes, str16 = u16 length + bytes), then (SEND, MESSAGE) the
//! properties and the body. Text binding: the kind name, `name:value` lines, a blank line, the
//! body; lines end with LF.
//!
//! Included with `#[path = "support/mbws_by_hand.rs"] mod mbws_by_hand;` by the test files that
//! need it; not every file uses every function.

#![allow(dead_code)]

/// Byte 0 of every binary frame, and `version` of OPEN.
pub const VERSION: u8 = 1;

/// Kind codes (byte 1 of a binary frame).
pub mod kind {
    pub const OPEN: u8 = 0x01;
    pub const OPENED: u8 = 0x02;
    pub const SEND: u8 = 0x03;
    pub const RECEIPT: u8 = 0x04;
    pub const SUBSCRIBE: u8 = 0x05;
    pub const SUBSCRIBED: u8 = 0x06;
    pub const UNSUBSCRIBE: u8 = 0x07;
    pub const MESSAGE: u8 = 0x08;
    pub const ACK: u8 = 0x09;
    pub const NACK: u8 = 0x0A;
    pub const FLOW: u8 = 0x0B;
    pub const PING: u8 = 0x0C;
    pub const PONG: u8 = 0x0D;
    pub const ERROR: u8 = 0x0E;
    pub const CLOSE: u8 = 0x0F;
}

/// Anycast (competing consumers) or multicast (every subscriber gets every message).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Anycast,
    Multicast,
}

/// Client acknowledgements or automatic acknowledgement on delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckMode {
    Client,
    Auto,
}

// ---------------------------------------------------------------------------------------------
// Binary binding, encoding.

fn prefix(kind: u8, flags: u8) -> Vec<u8> {
    vec![VERSION, kind, flags]
}

fn put_str8(out: &mut Vec<u8>, value: &str) {
    let length = u8::try_from(value.len()).expect("str8 value fits 255 bytes");
    out.push(length);
    out.extend_from_slice(value.as_bytes());
}

fn put_str16(out: &mut Vec<u8>, value: &str) {
    let length = u16::try_from(value.len()).expect("str16 value fits 65535 bytes");
    out.extend_from_slice(&length.to_be_bytes());
    out.extend_from_slice(value.as_bytes());
}

/// OPEN for a new session: last-received-seq 0, heartbeat-ms 0, empty session id, login and
/// passcode.
pub fn binary_open() -> Vec<u8> {
    let mut out = prefix(kind::OPEN, 0);
    out.extend_from_slice(&0u64.to_be_bytes());
    out.extend_from_slice(&0u32.to_be_bytes());
    put_str8(&mut out, "");
    put_str8(&mut out, "");
    put_str16(&mut out, "");
    out
}

/// SEND without properties or headers: seq, ttl-ms 0, address, empty content type,
/// correlation id and reply-to, header count 0, body.
pub fn binary_send(seq: u64, address: &str, body: &[u8]) -> Vec<u8> {
    let mut out = prefix(kind::SEND, 0);
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&0u32.to_be_bytes());
    put_str8(&mut out, address);
    put_str8(&mut out, "");
    put_str8(&mut out, "");
    put_str8(&mut out, "");
    out.push(0);
    out.extend_from_slice(body);
    out
}

pub fn binary_subscribe(subscription_id: u32, address: &str, mode: Mode, ack: AckMode, credit: u32) -> Vec<u8> {
    let flags = u8::from(mode == Mode::Multicast) | (u8::from(ack == AckMode::Auto) << 1);
    let mut out = prefix(kind::SUBSCRIBE, flags);
    out.extend_from_slice(&subscription_id.to_be_bytes());
    out.extend_from_slice(&credit.to_be_bytes());
    put_str8(&mut out, address);
    out
}

pub fn binary_ack(delivery_seq: u64, cumulative: bool) -> Vec<u8> {
    let mut out = prefix(kind::ACK, u8::from(cumulative));
    out.extend_from_slice(&delivery_seq.to_be_bytes());
    out
}

pub fn binary_ping(token: u64) -> Vec<u8> {
    let mut out = prefix(kind::PING, 0);
    out.extend_from_slice(&token.to_be_bytes());
    out
}

pub fn binary_close() -> Vec<u8> {
    prefix(kind::CLOSE, 0)
}

// ---------------------------------------------------------------------------------------------
// Text binding, encoding.

/// `KIND\nname:value\n...\n\nbody`.
pub fn text_frame(kind: &str, fields: &[(&str, String)], body: &str) -> String {
    let mut out = format!("{kind}\n");
    for (name, value) in fields {
        out.push_str(&format!("{name}:{value}\n"));
    }
    out.push('\n');
    out.push_str(body);
    out
}

pub fn text_open() -> String {
    text_frame("OPEN", &[("version", VERSION.to_string())], "")
}

pub fn text_send(seq: u64, address: &str, body: &str) -> String {
    text_frame("SEND", &[("seq", seq.to_string()), ("address", address.to_string())], body)
}

pub fn text_subscribe(subscription_id: u32, address: &str, mode: Mode, ack: AckMode, credit: u32) -> String {
    let mode = match mode {
        Mode::Anycast => "anycast",
        Mode::Multicast => "multicast",
    };
    let ack = match ack {
        AckMode::Client => "client",
        AckMode::Auto => "auto",
    };
    let fields = [
        ("subscription-id", subscription_id.to_string()),
        ("address", address.to_string()),
        ("mode", mode.to_string()),
        ("ack", ack.to_string()),
        ("credit", credit.to_string()),
    ];
    text_frame("SUBSCRIBE", &fields, "")
}

pub fn text_ack(delivery_seq: u64, cumulative: bool) -> String {
    text_frame("ACK", &[("delivery-seq", delivery_seq.to_string()), ("cumulative", cumulative.to_string())], "")
}

pub fn text_ping(token: u64) -> String {
    text_frame("PING", &[("token", token.to_string())], "")
}

pub fn text_close() -> String {
    text_frame("CLOSE", &[], "")
}

// ---------------------------------------------------------------------------------------------
// Decoding what the broker sends.

/// A frame received from the broker, parsed by hand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Opened { version: u8, resumed: bool, session_id: String, server: String, max_frame_bytes: u32 },
    Receipt { seq: u64 },
    Subscribed { subscription_id: u32 },
    Message { subscription_id: u32, delivery_seq: u64, message_id: u64, address: String, body: Vec<u8> },
    Pong { token: u64 },
    Error { code: u16, fatal: bool, seq: u64, reason: String },
    Close,
}

/// Reads fields front to back from a binary frame.
struct Cursor<'a> {
    bytes: &'a [u8],
    position: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, field: &str, length: usize) -> Result<&'a [u8], String> {
        let end = self.position + length;
        if end > self.bytes.len() {
            return Err(format!(
                "truncated in `{field}` at offset {} (needs {length} bytes, frame is {} bytes)",
                self.position,
                self.bytes.len()
            ));
        }
        let slice = &self.bytes[self.position..end];
        self.position = end;
        Ok(slice)
    }

    fn u8(&mut self, field: &str) -> Result<u8, String> {
        Ok(self.take(field, 1)?[0])
    }

    fn u16(&mut self, field: &str) -> Result<u16, String> {
        Ok(u16::from_be_bytes(self.take(field, 2)?.try_into().unwrap()))
    }

    fn u32(&mut self, field: &str) -> Result<u32, String> {
        Ok(u32::from_be_bytes(self.take(field, 4)?.try_into().unwrap()))
    }

    fn u64(&mut self, field: &str) -> Result<u64, String> {
        Ok(u64::from_be_bytes(self.take(field, 8)?.try_into().unwrap()))
    }

    fn string(&mut self, field: &str, length: usize) -> Result<String, String> {
        let bytes = self.take(field, length)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| format!("`{field}` is not UTF-8"))
    }

    fn str8(&mut self, field: &str) -> Result<String, String> {
        let length = self.u8(field)?;
        self.string(field, usize::from(length))
    }

    fn str16(&mut self, field: &str) -> Result<String, String> {
        let length = self.u16(field)?;
        self.string(field, usize::from(length))
    }

    fn rest(&mut self) -> Vec<u8> {
        let rest = self.bytes[self.position..].to_vec();
        self.position = self.bytes.len();
        rest
    }

    fn finish(&self) -> Result<(), String> {
        if self.position == self.bytes.len() {
            Ok(())
        } else {
            Err(format!("{} trailing bytes after the last field", self.bytes.len() - self.position))
        }
    }
}

/// Parses one binary-binding frame sent by the broker.
pub fn parse_binary(bytes: &[u8]) -> Result<Reply, String> {
    let mut cursor = Cursor { bytes, position: 0 };
    let version = cursor.u8("version")?;
    if version != VERSION {
        return Err(format!("version byte is {version}, expected {VERSION}"));
    }
    let kind_code = cursor.u8("kind")?;
    let flags = cursor.u8("flags")?;
    let reply = match kind_code {
        kind::OPENED => {
            let _last_received_seq = cursor.u64("last-received-seq")?;
            let _heartbeat_ms = cursor.u32("heartbeat-ms")?;
            let _session_expiry_ms = cursor.u32("session-expiry-ms")?;
            let max_frame_bytes = cursor.u32("max-frame-bytes")?;
            let _max_address_bytes = cursor.u16("max-address-bytes")?;
            let _max_headers = cursor.u16("max-headers")?;
            for field in ["max-header-bytes", "max-credit", "max-subscriptions", "max-inflight-sends"] {
                cursor.u32(field)?;
            }
            let _max_queued_messages = cursor.u32("max-queued-messages")?;
            let session_id = cursor.str8("session-id")?;
            let server = cursor.str8("server")?;
            Reply::Opened { version, resumed: flags & 1 != 0, session_id, server, max_frame_bytes }
        }
        kind::RECEIPT => Reply::Receipt { seq: cursor.u64("seq")? },
        kind::SUBSCRIBED => Reply::Subscribed { subscription_id: cursor.u32("subscription-id")? },
        kind::MESSAGE => {
            let subscription_id = cursor.u32("subscription-id")?;
            let delivery_seq = cursor.u64("delivery-seq")?;
            let message_id = cursor.u64("message-id")?;
            let address = cursor.str8("address")?;
            for field in ["content-type", "correlation-id", "reply-to"] {
                cursor.str8(field)?;
            }
            let header_count = cursor.u8("header-count")?;
            for _ in 0..header_count {
                cursor.str8("header name")?;
                cursor.str16("header value")?;
            }
            let body = cursor.rest();
            Reply::Message { subscription_id, delivery_seq, message_id, address, body }
        }
        kind::PONG => Reply::Pong { token: cursor.u64("token")? },
        kind::ERROR => {
            let code = cursor.u16("code")?;
            let seq = cursor.u64("seq")?;
            let _subscription_id = cursor.u32("subscription-id")?;
            let reason = cursor.str16("reason")?;
            Reply::Error { code, fatal: flags & 1 != 0, seq, reason }
        }
        kind::CLOSE => Reply::Close,
        other => return Err(format!("unexpected kind code 0x{other:02x} from the broker")),
    };
    cursor.finish()?;
    Ok(reply)
}

/// Parses one text-binding frame sent by the broker.
pub fn parse_text(text: &str) -> Result<Reply, String> {
    let (head, body) = match text.split_once("\n\n") {
        Some(parts) => parts,
        None => return Err(format!("no blank line in text frame {text:?}")),
    };
    let mut lines = head.split('\n').map(|line| line.strip_suffix('\r').unwrap_or(line));
    let kind = lines.next().unwrap_or_default();
    let mut fields: Vec<(&str, &str)> = Vec::new();
    for line in lines {
        let (name, value) = line.split_once(':').ok_or_else(|| format!("line {line:?} has no `:`"))?;
        fields.push((name, value));
    }
    let get = |name: &str| fields.iter().find(|(known, _)| *known == name).map(|(_, value)| *value);
    let number = |name: &str| -> Result<u64, String> {
        match get(name) {
            None => Ok(0),
            Some(value) => value.parse().map_err(|_| format!("{kind}: field `{name}` is {value:?}, not a number")),
        }
    };
    let required = |name: &str| -> Result<u64, String> {
        get(name).ok_or_else(|| format!("{kind}: required field `{name}` is missing"))?;
        number(name)
    };
    let no_body = |reply: Reply| if body.is_empty() { Ok(reply) } else { Err(format!("{kind} has a body: {body:?}")) };
    match kind {
        "OPENED" => no_body(Reply::Opened {
            version: required("version")? as u8,
            resumed: get("resumed") == Some("true"),
            session_id: get("session-id").unwrap_or_default().to_string(),
            server: get("server").unwrap_or_default().to_string(),
            max_frame_bytes: required("max-frame-bytes")? as u32,
        }),
        "RECEIPT" => no_body(Reply::Receipt { seq: required("seq")? }),
        "SUBSCRIBED" => no_body(Reply::Subscribed { subscription_id: required("subscription-id")? as u32 }),
        "MESSAGE" => Ok(Reply::Message {
            subscription_id: required("subscription-id")? as u32,
            delivery_seq: required("delivery-seq")?,
            message_id: required("message-id")?,
            address: get("address").ok_or("MESSAGE without address")?.to_string(),
            body: body.as_bytes().to_vec(),
        }),
        "PONG" => no_body(Reply::Pong { token: number("token")? }),
        "ERROR" => no_body(Reply::Error {
            code: required("code")? as u16,
            fatal: get("fatal") == Some("true"),
            seq: number("seq")?,
            reason: get("reason").unwrap_or_default().to_string(),
        }),
        "CLOSE" => no_body(Reply::Close),
        other => Err(format!("unexpected frame kind {other:?} from the broker")),
    }
}

/// Checks that the crate's own decoder reads `payload` the same way as the hand parser did:
/// the same kind and the same key fields. A second opinion, never the only one.
pub fn assert_crate_agrees(text: bool, payload: &[u8], reply: &Reply) {
    use mbws::mbws::{decode, Binding, CodecLimits, Frame};
    let binding = if text { Binding::Text } else { Binding::Binary };
    let frame = decode(binding, bytes::Bytes::copy_from_slice(payload), &CodecLimits::default())
        .unwrap_or_else(|error| panic!("the crate's decoder refuses a frame the broker sent ({error}): {payload:?}"));
    let agrees = match (reply, &frame) {
        (Reply::Opened { session_id, max_frame_bytes, .. }, Frame::Opened(opened)) => {
            opened.session_id == session_id.as_bytes() && opened.limits.max_frame_bytes == *max_frame_bytes
        }
        (Reply::Receipt { seq }, Frame::Receipt(receipt)) => receipt.seq == *seq,
        (Reply::Subscribed { subscription_id }, Frame::Subscribed(subscribed)) => {
            subscribed.subscription_id == *subscription_id
        }
        (Reply::Message { subscription_id, delivery_seq, message_id, address, body }, Frame::Message(message)) => {
            message.subscription_id == *subscription_id
                && message.delivery_seq == *delivery_seq
                && message.message_id == *message_id
                && message.address == address.as_bytes()
                && message.body == body[..]
        }
        (Reply::Pong { token }, Frame::Pong(pong)) => pong.token == *token,
        (Reply::Error { code, fatal, .. }, Frame::Error(error)) => error.code == *code && error.fatal == *fatal,
        (Reply::Close, Frame::Close(_)) => true,
        _ => false,
    };
    assert!(agrees, "hand parser and crate decoder disagree: {reply:?} vs {frame:?}");
}
