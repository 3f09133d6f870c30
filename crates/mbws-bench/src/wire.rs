//! How application payloads travel: framing, deframing, message templates and timestamps.
//!
//! Sans-IO. A target's payloads go either in WebSocket binary frames (mbws, nats, mqtt; masked
//! as RFC 6455 requires of a client) or behind a 4-byte big-endian length (the relay).
//! [`Deframer`] turns the read buffer back into payloads ([`Unit`]s), splitting them off as
//! `Bytes` without copying: for set-up. The readers of a run split nothing off: they hand each
//! payload to its codec where it lies (`engine::deframe_units` and `deframe_in_place`).
//!
//! The publish hot path never encodes a frame: a [`Template`] holds one complete wire frame
//! (header, masked payload) and [`Template::append`] copies it and patches only the send
//! timestamp and an optional sequence field, XORed with the mask bytes of their positions.
//!
//! Masking: every WebSocket frame a connection sends uses that connection's one mask key,
//! derived from a per-connection seed. RFC 6455 asks for a fresh unpredictable key per frame to
//! protect intermediaries from crafted payloads; a benchmark talking to a broker on loopback has
//! no such intermediary, and the broker still unmasks every byte, so the work it measures is
//! the same as with a browser.

use std::ops::Range;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use mbws_proto::ws::frame::{apply_mask, encode_header};
use mbws_proto::ws::message::{Decoder, WsEvent};
use mbws_proto::ws::{OpCode, Role};

/// Bytes at the start of every message body that carry its (intended) send time.
pub const STAMP_BYTES: usize = 8;
/// Bytes of the relay's length prefix.
pub const LENGTH_PREFIX_BYTES: usize = 4;

/// Writes `time_ns` into the first [`STAMP_BYTES`] of `body` (big-endian).
pub fn write_stamp(body: &mut [u8], time_ns: u64) {
    body[..STAMP_BYTES].copy_from_slice(&time_ns.to_be_bytes());
}

/// The send time stamped into `body`, if the body is long enough to hold one.
pub fn read_stamp(body: &[u8]) -> Option<u64> {
    let bytes: [u8; STAMP_BYTES] = body.get(..STAMP_BYTES)?.try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
}

/// How this connection wraps each payload it sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// One masked WebSocket binary frame per payload.
    WebSocket { mask: [u8; 4] },
    /// A u32 big-endian length, then the payload.
    LengthPrefixed,
}

impl Framing {
    /// WebSocket framing with a mask key derived from `seed` (never all zero, so the broker's
    /// unmasking does real work).
    pub fn websocket(seed: u64) -> Framing {
        let mut state = seed ^ 0x9E37_79B9_7F4A_7C15;
        state ^= state >> 33;
        state = state.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
        state ^= state >> 33;
        let mut mask = (state as u32).to_be_bytes();
        if mask == [0; 4] {
            mask = [0x5A, 0xA5, 0x3C, 0xC3];
        }
        Framing::WebSocket { mask }
    }

    /// Appends `payload` as one data frame.
    pub fn frame(self, out: &mut BytesMut, payload: &[u8]) {
        match self {
            Framing::WebSocket { mask } => {
                encode_header(out, true, OpCode::Binary, payload.len(), Some(mask));
                let start = out.len();
                out.extend_from_slice(payload);
                apply_mask(&mut out[start..], mask);
            }
            Framing::LengthPrefixed => {
                let length = u32::try_from(payload.len()).expect("payload fits a u32 length prefix");
                out.put_u32(length);
                out.extend_from_slice(payload);
            }
        }
    }

    /// Appends a WebSocket control frame (pong, close); nothing for length-prefixed framing.
    pub fn control(self, out: &mut BytesMut, opcode: OpCode, payload: &[u8]) {
        if let Framing::WebSocket { mask } = self {
            debug_assert!(opcode.is_control());
            encode_header(out, true, opcode, payload.len(), Some(mask));
            let start = out.len();
            out.extend_from_slice(payload);
            apply_mask(&mut out[start..], mask);
        }
    }
}

/// One thing the deframer found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unit {
    /// A whole payload; `text` for a WebSocket text message.
    Data { payload: Bytes, text: bool },
    /// A WebSocket ping; answer with a pong carrying the same payload.
    Ping(Bytes),
    /// A WebSocket pong (ignored).
    Pong,
    /// The peer closed the WebSocket.
    Close { code: u16, reason: String },
}

/// Splits the read buffer into [`Unit`]s.
#[derive(Debug)]
pub enum Deframer {
    WebSocket(Decoder),
    LengthPrefixed { max_payload_bytes: usize },
}

impl Deframer {
    /// A client-side WebSocket deframer accepting messages up to `max_message_bytes`.
    pub fn websocket(max_message_bytes: usize) -> Deframer {
        Deframer::WebSocket(Decoder::new(Role::Client, max_message_bytes, max_message_bytes))
    }

    pub fn for_framing(framing: Framing, max_message_bytes: usize) -> Deframer {
        match framing {
            Framing::WebSocket { .. } => Deframer::websocket(max_message_bytes),
            Framing::LengthPrefixed => Deframer::LengthPrefixed { max_payload_bytes: max_message_bytes },
        }
    }

    /// The next complete unit at the front of `buf`, or `None` until more bytes arrive.
    pub fn next(&mut self, buf: &mut BytesMut) -> Result<Option<Unit>, String> {
        match self {
            Deframer::WebSocket(decoder) => {
                let event = decoder
                    .next_event(buf)
                    .map_err(|error| format!("invalid WebSocket data from the target: {error}"))?;
                Ok(event.map(|event| match event {
                    WsEvent::Binary(payload) => Unit::Data { payload, text: false },
                    WsEvent::Text(payload) => Unit::Data { payload, text: true },
                    WsEvent::Ping(payload) => Unit::Ping(payload),
                    WsEvent::Pong(_) => Unit::Pong,
                    WsEvent::Close(frame) => match frame {
                        Some(frame) => Unit::Close {
                            code: frame.code,
                            reason: String::from_utf8_lossy(&frame.reason).into_owned(),
                        },
                        None => Unit::Close { code: 1005, reason: String::new() },
                    },
                }))
            }
            Deframer::LengthPrefixed { max_payload_bytes } => {
                let Some(payload) = length_prefixed_frame(buf, *max_payload_bytes)? else { return Ok(None) };
                buf.advance(payload.start);
                Ok(Some(Unit::Data { payload: buf.split_to(payload.len()).freeze(), text: false }))
            }
        }
    }
}

/// Where the payload of the first length-prefixed frame of `buf` lies, once the frame is
/// complete. Lets a reader handle payloads in place instead of splitting each one off.
pub fn length_prefixed_frame(buf: &[u8], max_payload_bytes: usize) -> Result<Option<Range<usize>>, String> {
    let Some(prefix) = buf.get(..LENGTH_PREFIX_BYTES) else { return Ok(None) };
    let length = u32::from_be_bytes(prefix.try_into().expect("4 bytes")) as usize;
    if length > max_payload_bytes {
        return Err(format!(
            "received a frame announcing {length} bytes, over the {max_payload_bytes}-byte limit \
             (is --url an mbws-relay?)"
        ));
    }
    let end = LENGTH_PREFIX_BYTES + length;
    Ok((buf.len() >= end).then_some(LENGTH_PREFIX_BYTES..end))
}

/// A big-endian integer field of a payload that changes per message (MBWS seq, MQTT packet id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counter {
    /// Offset in the payload.
    pub offset: usize,
    /// 2 or 8 bytes.
    pub width: usize,
}

/// One message frame, encoded and masked once, appended many times.
#[derive(Debug, Clone)]
pub struct Template {
    wire: Box<[u8]>,
    /// Where the payload starts in `wire` (after the WebSocket header or length prefix).
    payload_start: usize,
    mask: Option<[u8; 4]>,
    /// Offset of the timestamp in the payload.
    stamp_offset: usize,
    counter: Option<Counter>,
}

impl Template {
    /// `payload` is the complete application payload; the stamp and counter fields are
    /// overwritten on every [`append`](Self::append).
    pub fn new(framing: Framing, payload: &[u8], stamp_offset: usize, counter: Option<Counter>) -> Template {
        assert!(stamp_offset + STAMP_BYTES <= payload.len(), "the stamp lies inside the payload");
        if let Some(counter) = counter {
            assert!(counter.width == 2 || counter.width == 8, "counters are u16 or u64");
            assert!(counter.offset + counter.width <= payload.len(), "the counter lies inside the payload");
        }
        let mut wire = BytesMut::with_capacity(payload.len() + 16);
        framing.frame(&mut wire, payload);
        let payload_start = wire.len() - payload.len();
        let mask = match framing {
            Framing::WebSocket { mask } => Some(mask),
            Framing::LengthPrefixed => None,
        };
        Template { wire: wire.to_vec().into_boxed_slice(), payload_start, mask, stamp_offset, counter }
    }

    /// Bytes one frame takes on the wire.
    pub fn wire_bytes(&self) -> usize {
        self.wire.len()
    }

    /// Appends one frame stamped `stamp_ns` with the counter field set to `counter`
    /// (truncated to the field's width).
    #[inline]
    pub fn append(&self, out: &mut BytesMut, stamp_ns: u64, counter: u64) {
        let start = out.len() + self.payload_start;
        out.extend_from_slice(&self.wire);
        let payload = &mut out[start..];
        self.patch(payload, self.stamp_offset, &stamp_ns.to_be_bytes());
        if let Some(field) = self.counter {
            let bytes = counter.to_be_bytes();
            self.patch(payload, field.offset, &bytes[8 - field.width..]);
        }
    }

    #[inline]
    fn patch(&self, payload: &mut [u8], offset: usize, value: &[u8]) {
        let target = &mut payload[offset..offset + value.len()];
        match self.mask {
            Some(mask) => {
                for (index, (byte, plain)) in target.iter_mut().zip(value).enumerate() {
                    *byte = plain ^ mask[(offset + index) % 4];
                }
            }
            None => target.copy_from_slice(value),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mbws_proto::ws::message::Decoder;

    fn unmasked_payload(wire: &mut BytesMut) -> Bytes {
        let mut decoder = Decoder::new(Role::Server, 1 << 20, 1 << 20);
        match decoder.next_event(wire).unwrap() {
            Some(WsEvent::Binary(payload)) => payload,
            other => panic!("expected a binary message, got {other:?}"),
        }
    }

    #[test]
    fn template_patches_stamp_and_counter_under_the_mask() {
        let framing = Framing::websocket(7);
        let mut payload = vec![0xAB; 40];
        payload[0] = 1;
        let template = Template::new(framing, &payload, 21, Some(Counter { offset: 3, width: 8 }));
        let mut out = BytesMut::new();
        template.append(&mut out, 0x0102_0304_0506_0708, 42);
        template.append(&mut out, 99, 43);
        let first = unmasked_payload(&mut out);
        assert_eq!(read_stamp(&first[21..]), Some(0x0102_0304_0506_0708));
        assert_eq!(&first[3..11], &42u64.to_be_bytes());
        assert_eq!(first[0], 1);
        assert_eq!(first[2], 0xAB);
        assert_eq!(&first[29..], &payload[29..]);
        let second = unmasked_payload(&mut out);
        assert_eq!(read_stamp(&second[21..]), Some(99));
        assert_eq!(&second[3..11], &43u64.to_be_bytes());
        assert!(out.is_empty());
    }

    #[test]
    fn u16_counters_take_the_low_bytes() {
        let template = Template::new(Framing::LengthPrefixed, &[0u8; 16], 8, Some(Counter { offset: 0, width: 2 }));
        let mut out = BytesMut::new();
        template.append(&mut out, 5, 0x1_0203);
        let mut deframer = Deframer::LengthPrefixed { max_payload_bytes: 64 };
        let Some(Unit::Data { payload, .. }) = deframer.next(&mut out).unwrap() else { panic!("one frame") };
        assert_eq!(&payload[..2], &[0x02, 0x03]);
        assert_eq!(read_stamp(&payload[8..]), Some(5));
    }

    #[test]
    fn length_prefixed_frames_wait_for_their_bytes_and_respect_the_limit() {
        let mut deframer = Deframer::LengthPrefixed { max_payload_bytes: 8 };
        let mut buf = BytesMut::from(&[0u8, 0, 0, 3, b'a', b'b'][..]);
        assert_eq!(deframer.next(&mut buf).unwrap(), None);
        buf.extend_from_slice(b"c");
        assert_eq!(
            deframer.next(&mut buf).unwrap(),
            Some(Unit::Data { payload: Bytes::from_static(b"abc"), text: false })
        );
        let mut too_big = BytesMut::from(&[0u8, 0, 0, 9][..]);
        assert!(deframer.next(&mut too_big).is_err());
    }

    #[test]
    fn masks_are_never_zero() {
        for seed in 0..1000 {
            assert!(matches!(Framing::websocket(seed), Framing::WebSocket { mask } if mask != [0; 4]));
        }
    }
}
