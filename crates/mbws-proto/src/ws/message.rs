//! Message assembly on top of the frame codec (RFC 6455 sections 5.4 to 5.6 and 7.4).
//!
//! [`Decoder`] turns the read buffer into [`Received`] things. An unfragmented data frame, the
//! common case, stays where it arrived: a [`DataMessage`] is its payload unmasked in place in the
//! read buffer, read as a slice, and consumed (a pointer move) when it is dropped; only a consumer
//! that keeps the payload turns it into a `Bytes` ([`DataMessage::into_bytes`], split off the
//! buffer without a copy). A fragmented message is assembled into one buffer whose size is
//! bounded by `max_message_bytes`, checked from each frame header before its payload has arrived.
//! Control frames may arrive between fragments and are returned at once; the partial message
//! waits for them. [`Decoder::next_event`] is the owning form: every message as a [`WsEvent`].
//!
//! Text is validated as UTF-8 incrementally: each fragment is checked as it arrives, only a
//! sequence cut by the fragment boundary (at most 3 bytes) is re-examined with the next one, so an
//! invalid message fails at the fragment where the error becomes certain.
//!
//! Errors carry the close code to send. After an error or a Close event the decoder is finished
//! and ignores any further input.

use std::ops::Range;
use std::str;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::frame::{decode_header, split_payload, unmask_payload, FrameHeader};
use super::{close_code, OpCode, Role, WsError};

/// A close reason is at most this long so that it fits a control frame after the 2-byte code.
pub const MAX_CLOSE_REASON_BYTES: usize = 123;

/// One complete thing received from the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WsEvent {
    /// A whole text message; the bytes are valid UTF-8.
    Text(Bytes),
    Binary(Bytes),
    Ping(Bytes),
    Pong(Bytes),
    /// The peer started the closing handshake; `None` when the close frame had no payload.
    Close(Option<CloseFrame>),
}

/// One complete thing received, as [`Decoder::next_in_place`] finds it.
#[derive(Debug)]
pub enum Received<'a> {
    /// A whole text message; its payload is valid UTF-8.
    Text(DataMessage<'a>),
    Binary(DataMessage<'a>),
    /// Control frames are rare and small: their payloads are split off as `Bytes`.
    Ping(Bytes),
    Pong(Bytes),
    /// The peer started the closing handshake; `None` when the close frame had no payload.
    Close(Option<CloseFrame>),
}

/// A whole data message's payload, where the decoder found it: an unfragmented frame's payload
/// unmasked in the read buffer it arrived in (the frame is consumed when this is dropped or
/// turned into `Bytes`), or a fragmented message's assembled buffer.
#[derive(Debug)]
pub struct DataMessage<'a> {
    place: Place<'a>,
}

#[derive(Debug)]
enum Place<'a> {
    /// The frame at the front of `buf`; its payload is `buf[header_bytes..frame_bytes]`.
    InBuffer {
        buf: &'a mut BytesMut,
        header_bytes: usize,
        frame_bytes: usize,
    },
    Owned(Bytes),
}

impl DataMessage<'_> {
    pub fn payload(&self) -> &[u8] {
        match &self.place {
            Place::InBuffer { buf, header_bytes, frame_bytes } => &buf[*header_bytes..*frame_bytes],
            Place::Owned(payload) => payload,
        }
    }

    /// The payload as a `Bytes` that outlives the read buffer's turn: split off the buffer (one
    /// reference count on it, no copy), for a payload that is kept.
    #[inline]
    pub fn into_bytes(self) -> Bytes {
        self.into_bytes_from(0)
    }

    /// The payload from byte `offset` on, as [`Self::into_bytes`] makes it, for a consumer that
    /// keeps only the end of a payload it has read (the broker's SEND, whose fixed fields it
    /// has decoded): the bytes before `offset` go with the frame's header, in the same split.
    ///
    /// Panics if `offset` is past the payload's end.
    ///
    /// Always inline: it is the receive path's one split per kept message, and as a call (the
    /// broker's read loop, with the SEND's decode inlined, is past the inliner's budget) it
    /// cost about 40 instructions more than the split itself.
    #[inline(always)]
    pub fn into_bytes_from(self, offset: usize) -> Bytes {
        // Consumed here, by the split, or moved out: nothing is left for `drop` to do (and an
        // `Owned` payload taken leaves an empty `Bytes`, which holds nothing).
        let mut this = std::mem::ManuallyDrop::new(self);
        match &mut this.place {
            Place::InBuffer { buf, header_bytes, frame_bytes } => {
                // Before the split: a panic leaves the buffer as it was.
                assert!(*header_bytes + offset <= *frame_bytes, "offset {offset} is past the payload's end");
                split_payload(buf, *header_bytes + offset, *frame_bytes)
            }
            Place::Owned(payload) => {
                let mut payload = std::mem::take(payload);
                payload.advance(offset);
                payload
            }
        }
    }
}

impl Drop for DataMessage<'_> {
    /// Consumes the frame from the read buffer (its payload is unmasked: decoding it again
    /// would garble it).
    fn drop(&mut self) {
        if let Place::InBuffer { buf, frame_bytes, .. } = &mut self.place {
            buf.advance(*frame_bytes);
        }
    }
}

/// A payload that is already a `Bytes` (a first message read before its session existed).
impl From<Bytes> for DataMessage<'static> {
    fn from(payload: Bytes) -> DataMessage<'static> {
        DataMessage { place: Place::Owned(payload) }
    }
}

/// The payload of a received close frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseFrame {
    /// A code allowed on the wire (see [`is_valid_close_code`]).
    pub code: u16,
    /// Valid UTF-8.
    pub reason: Bytes,
}

/// Whether `code` may appear in a close frame: 1000-1003, 1007-1014 (IANA registered) and
/// 3000-4999 (libraries, applications). 1004-1006 and 1015 are reserved or for local use only;
/// everything else is unassigned.
pub fn is_valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// The payload of a close frame to send: `code` big-endian, then `reason` cut at a character
/// boundary to at most [`MAX_CLOSE_REASON_BYTES`].
pub fn close_payload(code: u16, reason: &str) -> BytesMut {
    debug_assert!(is_valid_close_code(code), "close code {code} must not be sent");
    let reason = truncate_at_char_boundary(reason, MAX_CLOSE_REASON_BYTES);
    let mut payload = BytesMut::with_capacity(2 + reason.len());
    payload.put_u16(code);
    payload.put_slice(reason.as_bytes());
    payload
}

fn truncate_at_char_boundary(text: &str, max_bytes: usize) -> &str {
    if text.len() <= max_bytes {
        return text;
    }
    let mut end = max_bytes;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Which kind of data message a fragmented message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DataKind {
    Text,
    Binary,
}

/// A fragmented data message still waiting for its final frame.
#[derive(Debug)]
struct PartialMessage {
    kind: DataKind,
    payload: BytesMut,
    /// Prefix of `payload` known to be valid UTF-8 (text only). What follows it is at most an
    /// incomplete sequence cut by a fragment boundary.
    utf8_valid_bytes: usize,
}

/// Decodes frames from the read buffer into events; one per connection.
#[derive(Debug)]
pub struct Decoder {
    role: Role,
    max_frame_bytes: usize,
    max_message_bytes: usize,
    partial: Option<PartialMessage>,
    finished: bool,
}

impl Decoder {
    /// `role` is this endpoint's side (a server requires masked frames). `max_frame_bytes`
    /// bounds one frame's payload, `max_message_bytes` a whole (possibly fragmented) message.
    pub fn new(role: Role, max_frame_bytes: usize, max_message_bytes: usize) -> Decoder {
        Decoder { role, max_frame_bytes, max_message_bytes, partial: None, finished: false }
    }

    /// Decodes frames from the front of `buf` until one event is complete: [`Self::next_in_place`]
    /// with every data message split off as a `Bytes`.
    ///
    /// `Ok(None)` means more bytes are needed (an incomplete frame stays in `buf`), or that the
    /// decoder is finished. An error names the close code to send; after it, or after a
    /// [`WsEvent::Close`], the decoder is finished.
    pub fn next_event(&mut self, buf: &mut BytesMut) -> Result<Option<WsEvent>, WsError> {
        Ok(self.next_in_place(buf)?.map(|received| match received {
            Received::Text(message) => WsEvent::Text(message.into_bytes()),
            Received::Binary(message) => WsEvent::Binary(message.into_bytes()),
            Received::Ping(payload) => WsEvent::Ping(payload),
            Received::Pong(payload) => WsEvent::Pong(payload),
            Received::Close(frame) => WsEvent::Close(frame),
        }))
    }

    /// Decodes frames from the front of `buf` until one thing is complete, and leaves an
    /// unfragmented data message where it lies (see [`DataMessage`]): the receive path makes no
    /// `Bytes` for a frame it does not keep.
    ///
    /// `Ok(None)` means more bytes are needed (an incomplete frame stays in `buf`), or that the
    /// decoder is finished. An error names the close code to send; after it, or after a
    /// [`Received::Close`], the decoder is finished.
    ///
    /// The common frame, a whole data message in one frame while no fragmented one is pending
    /// and within `max_message_bytes`, is decoded here, inlined into the caller, so that what
    /// it returns stays in registers; any other input (a fragment, a control frame, an
    /// incomplete header, a fault) goes to [`Self::next_in_place_general`], which decodes every
    /// frame, this one included, and gives the same result.
    #[inline]
    pub fn next_in_place<'a>(&mut self, buf: &'a mut BytesMut) -> Result<Option<Received<'a>>, WsError> {
        if !self.finished && self.partial.is_none() {
            if let Ok(Some(header)) = decode_header(buf, self.role, self.max_frame_bytes) {
                if header.fin
                    && matches!(header.opcode, OpCode::Text | OpCode::Binary)
                    && header.payload_bytes <= self.max_message_bytes
                {
                    let Some(payload) = unmask_payload(buf, &header) else {
                        return Ok(None);
                    };
                    return self.whole_message(buf, &header, payload);
                }
            }
        }
        self.next_in_place_general(buf)
    }

    /// [`Self::next_in_place`] for any input: each frame's header is checked against the
    /// message sequence, fragments are assembled, control frames returned as they come.
    #[inline(never)]
    fn next_in_place_general<'a>(&mut self, buf: &'a mut BytesMut) -> Result<Option<Received<'a>>, WsError> {
        if self.finished {
            return Ok(None);
        }
        // Every site that ends the decoder (an error, a Close) returns through `finish`, and the
        // others return their result directly: no second look at a result on its way out.
        loop {
            let header = match decode_header(buf, self.role, self.max_frame_bytes) {
                Ok(Some(header)) => header,
                Ok(None) => return Ok(None),
                Err(error) => return Err(self.finish(error)),
            };
            if let Err(error) = self.check_sequence_and_size(header.opcode, header.payload_bytes) {
                return Err(self.finish(error));
            }
            let Some(payload) = unmask_payload(buf, &header) else {
                return Ok(None);
            };
            let (header_bytes, frame_bytes) = (header.header_bytes, header.frame_bytes());
            match header.opcode {
                // Unfragmented: left where it lies.
                OpCode::Text | OpCode::Binary if header.fin => return self.whole_message(buf, &header, payload),
                OpCode::Text | OpCode::Binary => {
                    let kind = if header.opcode == OpCode::Text { DataKind::Text } else { DataKind::Binary };
                    let mut partial =
                        PartialMessage { kind, payload: BytesMut::with_capacity(payload.len()), utf8_valid_bytes: 0 };
                    if let Err(error) = partial.append(&buf[payload], false) {
                        return Err(self.finish(error));
                    }
                    buf.advance(frame_bytes);
                    self.partial = Some(partial);
                }
                OpCode::Continuation => {
                    // check_sequence_and_size has already refused a continuation without a start.
                    let Some(mut partial) = self.partial.take() else {
                        return Err(self.finish(continuation_without_start()));
                    };
                    if let Err(error) = partial.append(&buf[payload], header.fin) {
                        return Err(self.finish(error));
                    }
                    buf.advance(frame_bytes);
                    if !header.fin {
                        self.partial = Some(partial);
                        continue;
                    }
                    let message = DataMessage { place: Place::Owned(partial.payload.freeze()) };
                    return Ok(Some(match partial.kind {
                        DataKind::Text => Received::Text(message),
                        DataKind::Binary => Received::Binary(message),
                    }));
                }
                OpCode::Ping => return Ok(Some(Received::Ping(split_payload(buf, header_bytes, frame_bytes)))),
                OpCode::Pong => return Ok(Some(Received::Pong(split_payload(buf, header_bytes, frame_bytes)))),
                OpCode::Close => {
                    let payload = split_payload(buf, header_bytes, frame_bytes);
                    let close = parse_close(payload);
                    self.finished = true;
                    self.partial = None;
                    return close.map(|frame| Some(Received::Close(frame)));
                }
            }
        }
    }

    /// The unfragmented data message whose frame `header` describes, its `payload` unmasked:
    /// left where it lies, a text one once its UTF-8 is checked.
    #[inline]
    fn whole_message<'a>(
        &mut self,
        buf: &'a mut BytesMut,
        header: &FrameHeader,
        payload: Range<usize>,
    ) -> Result<Option<Received<'a>>, WsError> {
        let text = header.opcode == OpCode::Text;
        if text {
            if let Err(error) = validate_utf8(&buf[payload], 0, true) {
                return Err(self.finish(error));
            }
        }
        let message = DataMessage {
            place: Place::InBuffer { buf, header_bytes: header.header_bytes, frame_bytes: header.frame_bytes() },
        };
        Ok(Some(if text { Received::Text(message) } else { Received::Binary(message) }))
    }

    /// Whether a Close event or an error has been returned; further input is ignored.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Ends the decoder on `error` (further input is ignored) and passes the error on.
    #[cold]
    #[inline(never)]
    fn finish(&mut self, error: WsError) -> WsError {
        self.finished = true;
        self.partial = None;
        error
    }

    /// Checks, from the header alone, that the frame fits the message sequence and that the
    /// message stays within `max_message_bytes`.
    fn check_sequence_and_size(&self, opcode: OpCode, payload_bytes: usize) -> Result<(), WsError> {
        let message_bytes = match (opcode, &self.partial) {
            (OpCode::Continuation, None) => return Err(continuation_without_start()),
            (OpCode::Continuation, Some(partial)) => partial.payload.len().saturating_add(payload_bytes),
            (OpCode::Text | OpCode::Binary, Some(partial)) => {
                return Err(WsError::protocol(format!(
                    "new {opcode:?} message started while a fragmented {:?} message is \
                     unfinished; finish it with continuation frames first",
                    partial.kind
                )))
            }
            (OpCode::Text | OpCode::Binary, None) => payload_bytes,
            (OpCode::Close | OpCode::Ping | OpCode::Pong, _) => return Ok(()),
        };
        if message_bytes > self.max_message_bytes {
            return Err(WsError::new(
                close_code::MESSAGE_TOO_BIG,
                format!(
                    "message of at least {message_bytes} bytes exceeds max_message_bytes \
                     ({} bytes); send smaller messages",
                    self.max_message_bytes
                ),
            ));
        }
        Ok(())
    }
}

fn continuation_without_start() -> WsError {
    WsError::protocol("continuation frame received but no fragmented message was started")
}

impl PartialMessage {
    /// Appends one fragment; text is validated up to the last complete character, and
    /// completely when `fin` ends the message.
    fn append(&mut self, fragment: &[u8], fin: bool) -> Result<(), WsError> {
        self.payload.extend_from_slice(fragment);
        if self.kind == DataKind::Text {
            self.utf8_valid_bytes = validate_utf8(&self.payload, self.utf8_valid_bytes, fin)?;
        }
        Ok(())
    }
}

/// Validates `bytes[valid_bytes..]` (the prefix is already known valid) and returns the length of
/// the valid prefix afterwards. With `complete` false, an unfinished sequence at the very end is
/// left for the next fragment; anything certainly invalid is close 1007.
///
/// Text messages are mostly ASCII: [`ascii_prefix_len`] passes over the ASCII start 16 bytes a
/// step, and `str::from_utf8` reads only from the first block with a byte of 0x80 or more. An
/// ASCII prefix ends on a character boundary, so the result (offsets in reasons included) is
/// exactly what `str::from_utf8` of the whole would give.
fn validate_utf8(bytes: &[u8], valid_bytes: usize, complete: bool) -> Result<usize, WsError> {
    let unchecked = &bytes[valid_bytes..];
    let ascii = ascii_prefix_len(unchecked);
    if ascii == unchecked.len() {
        return Ok(bytes.len());
    }
    let valid_bytes = valid_bytes + ascii;
    match str::from_utf8(&unchecked[ascii..]) {
        Ok(_) => Ok(bytes.len()),
        // `error_len() == None`: the input ended inside a sequence that may still complete.
        Err(error) if error.error_len().is_none() && !complete => Ok(valid_bytes + error.valid_up_to()),
        Err(error) if error.error_len().is_none() => Err(WsError::new(
            close_code::INVALID_PAYLOAD,
            format!("text message ends inside a UTF-8 sequence at byte {}", valid_bytes + error.valid_up_to()),
        )),
        Err(error) => Err(WsError::new(
            close_code::INVALID_PAYLOAD,
            format!("text message is not valid UTF-8 at byte {}", valid_bytes + error.valid_up_to()),
        )),
    }
}

/// Bytes [`ascii_prefix_len`] judges in one step: two words.
const ASCII_BLOCK_BYTES: usize = 16;

/// The length of a prefix of `bytes` that is all ASCII: `bytes.len()` when every byte is below
/// 0x80; otherwise a multiple of [`ASCII_BLOCK_BYTES`] at or before the first byte that is not
/// (the start of its block, or of the last 16 bytes).
fn ascii_prefix_len(bytes: &[u8]) -> usize {
    const HIGH_BITS: u64 = u64::from_ne_bytes([0x80; 8]);
    let word = |eight: &[u8]| u64::from_ne_bytes(eight.try_into().expect("an 8-byte slice"));
    let mut blocks = bytes.chunks_exact(ASCII_BLOCK_BYTES);
    let mut start = 0;
    for block in &mut blocks {
        if (word(&block[..8]) | word(&block[8..])) & HIGH_BITS != 0 {
            return start;
        }
        start += ASCII_BLOCK_BYTES;
    }
    // The last 0 to 15 bytes, as two overlapping words, two overlapping halves, or bytes.
    let rest = blocks.remainder();
    let high_bits = match rest.len() {
        8.. => word(&rest[..8]) | word(&rest[rest.len() - 8..]),
        4.. => {
            let half = |four: &[u8]| u64::from(u32::from_ne_bytes(four.try_into().expect("a 4-byte slice")));
            half(&rest[..4]) | half(&rest[rest.len() - 4..])
        }
        _ => rest.iter().fold(0, |high_bits, &byte| high_bits | u64::from(byte)),
    } & HIGH_BITS;
    if high_bits == 0 {
        bytes.len()
    } else {
        start
    }
}

/// Reads a close frame payload: empty, or a valid code followed by a UTF-8 reason.
fn parse_close(payload: Bytes) -> Result<Option<CloseFrame>, WsError> {
    let [high, low, ..] = payload[..] else {
        if payload.is_empty() {
            return Ok(None);
        }
        return Err(WsError::protocol(
            "close frame payload is 1 byte; it must be empty or start with a 2-byte close code",
        ));
    };
    let code = u16::from_be_bytes([high, low]);
    if !is_valid_close_code(code) {
        return Err(WsError::protocol(format!(
            "close code {code} is not allowed in a close frame \
             (valid: 1000-1003, 1007-1014, 3000-4999)"
        )));
    }
    let reason = payload.slice(2..);
    if let Err(error) = str::from_utf8(&reason) {
        return Err(WsError::new(
            close_code::INVALID_PAYLOAD,
            format!("close reason is not valid UTF-8 at byte {}", error.valid_up_to()),
        ));
    }
    Ok(Some(CloseFrame { code, reason }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::frame::encode_frame;
    use proptest::prelude::*;

    const FRAME_LIMIT: usize = 1 << 16;
    const MESSAGE_LIMIT: usize = 1 << 18;
    const MASK: [u8; 4] = [1, 2, 3, 4];

    fn server() -> Decoder {
        Decoder::new(Role::Server, FRAME_LIMIT, MESSAGE_LIMIT)
    }

    /// Client-to-server wire bytes for the given frames.
    fn wire(frames: &[(bool, OpCode, &[u8])]) -> BytesMut {
        let mut out = BytesMut::new();
        for &(fin, opcode, payload) in frames {
            out.extend_from_slice(&encode_frame(fin, opcode, payload, Some(MASK)));
        }
        out
    }

    fn events(decoder: &mut Decoder, buf: &mut BytesMut) -> Result<Vec<WsEvent>, WsError> {
        let mut out = Vec::new();
        while let Some(event) = decoder.next_event(buf)? {
            out.push(event);
        }
        Ok(out)
    }

    fn expect_error(frames: &[(bool, OpCode, &[u8])], code: u16) -> String {
        let mut decoder = server();
        match events(&mut decoder, &mut wire(frames)) {
            Err(error) => {
                assert_eq!(error.close_code, code, "unexpected error: {error}");
                assert!(decoder.is_finished());
                error.reason
            }
            Ok(events) => panic!("expected close {code}, got {events:?}"),
        }
    }

    fn close_with(code: u16, reason: &[u8]) -> Vec<u8> {
        let mut payload = code.to_be_bytes().to_vec();
        payload.extend_from_slice(reason);
        payload
    }

    #[test]
    fn unfragmented_payload_is_zero_copy() {
        let mut buf = wire(&[(true, OpCode::Binary, &[5u8; 100])]);
        let payload_address = buf.as_ptr() as usize + 6;
        let mut decoder = server();
        let Some(WsEvent::Binary(payload)) = decoder.next_event(&mut buf).unwrap() else {
            panic!("expected a binary event");
        };
        assert_eq!(payload.as_ptr() as usize, payload_address);
        assert_eq!(&payload[..], &[5u8; 100][..]);
    }

    #[test]
    fn in_place_message_is_read_where_it_arrived_and_consumed_when_dropped() {
        let mut buf = wire(&[(true, OpCode::Binary, &[5u8; 100]), (true, OpCode::Text, b"next")]);
        let payload_address = buf.as_ptr() as usize + 6;
        let mut decoder = server();
        let Some(Received::Binary(message)) = decoder.next_in_place(&mut buf).unwrap() else {
            panic!("expected a binary message");
        };
        assert_eq!(message.payload().as_ptr() as usize, payload_address, "unmasked in the read buffer");
        assert_eq!(message.payload(), &[5u8; 100][..]);
        drop(message);
        assert_eq!(buf.len(), 6 + 4, "dropping the message consumed its frame, and only it");
        let Some(Received::Text(message)) = decoder.next_in_place(&mut buf).unwrap() else {
            panic!("expected a text message");
        };
        let kept = message.into_bytes();
        assert_eq!((&kept[..], buf.len()), (&b"next"[..], 0), "kept as a slice of the buffer, frame consumed");
        assert!(decoder.next_in_place(&mut buf).unwrap().is_none());
    }

    #[test]
    fn text_and_binary_messages() {
        let mut buf = wire(&[(true, OpCode::Text, "héllo".as_bytes()), (true, OpCode::Binary, &[0xff, 0x00])]);
        let got = events(&mut server(), &mut buf).unwrap();
        assert_eq!(got, [WsEvent::Text(Bytes::from("héllo")), WsEvent::Binary(Bytes::from_static(&[0xff, 0x00]))]);
    }

    #[test]
    fn incomplete_input_waits_for_more() {
        let full = wire(&[(false, OpCode::Text, b"ab"), (true, OpCode::Continuation, b"cd")]);
        let mut decoder = server();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for &byte in full.iter() {
            buf.put_u8(byte);
            got.extend(events(&mut decoder, &mut buf).unwrap());
        }
        assert_eq!(got, [WsEvent::Text(Bytes::from("abcd"))]);
        assert!(buf.is_empty());
    }

    #[test]
    fn fragments_are_assembled_with_interleaved_control_frames() {
        let mut buf = wire(&[
            (false, OpCode::Binary, b"one "),
            (true, OpCode::Ping, b"p1"),
            (false, OpCode::Continuation, b"two "),
            (true, OpCode::Pong, b"p2"),
            (false, OpCode::Continuation, b""),
            (true, OpCode::Continuation, b"three"),
        ]);
        let got = events(&mut server(), &mut buf).unwrap();
        assert_eq!(
            got,
            [
                WsEvent::Ping(Bytes::from("p1")),
                WsEvent::Pong(Bytes::from("p2")),
                WsEvent::Binary(Bytes::from("one two three")),
            ]
        );
    }

    #[test]
    fn continuation_without_start_is_protocol_error() {
        let reason = expect_error(&[(true, OpCode::Continuation, b"x")], 1002);
        assert!(reason.contains("no fragmented message"), "{reason}");
        // Also after a completed fragmented message.
        expect_error(
            &[(false, OpCode::Text, b"a"), (true, OpCode::Continuation, b"b"), (true, OpCode::Continuation, b"c")],
            1002,
        );
    }

    #[test]
    fn new_message_during_fragmented_message_is_protocol_error() {
        let reason = expect_error(&[(false, OpCode::Text, b"a"), (true, OpCode::Binary, b"b")], 1002);
        assert!(reason.contains("unfinished"), "{reason}");
        expect_error(&[(false, OpCode::Binary, b"a"), (false, OpCode::Text, b"b")], 1002);
    }

    #[test]
    fn frame_layer_errors_pass_through() {
        // Unmasked client frame.
        let mut buf = BytesMut::from(&encode_frame(true, OpCode::Text, b"x", None)[..]);
        let error = server().next_event(&mut buf).unwrap_err();
        assert_eq!(error.close_code, 1002);
        // Frame over max_frame_bytes.
        let mut decoder = Decoder::new(Role::Server, 10, 100);
        let mut buf = wire(&[(true, OpCode::Binary, &[0u8; 11])]);
        assert_eq!(decoder.next_event(&mut buf).unwrap_err().close_code, 1009);
    }

    #[test]
    fn single_frame_over_message_limit_is_too_big() {
        let mut decoder = Decoder::new(Role::Server, 100, 10);
        let mut buf = wire(&[(true, OpCode::Binary, &[0u8; 11])]);
        let error = decoder.next_event(&mut buf).unwrap_err();
        assert_eq!(error.close_code, 1009);
        assert!(error.reason.contains("max_message_bytes (10 bytes)"), "{error}");
    }

    #[test]
    fn fragmented_message_over_limit_fails_before_payload_arrives() {
        let mut decoder = Decoder::new(Role::Server, 100, 10);
        let mut buf = wire(&[(false, OpCode::Text, b"12345"), (false, OpCode::Continuation, b"12345")]);
        assert_eq!(decoder.next_event(&mut buf), Ok(None));
        // Only the header of a frame that would bring the total to 11 bytes.
        let third = encode_frame(true, OpCode::Continuation, b"x", Some(MASK));
        buf.extend_from_slice(&third[..6]);
        let error = decoder.next_event(&mut buf).unwrap_err();
        assert_eq!(error.close_code, 1009);
        assert!(error.reason.contains("at least 11 bytes"), "{error}");
    }

    #[test]
    fn fragmented_message_exactly_at_limit_is_accepted() {
        let mut decoder = Decoder::new(Role::Server, 100, 10);
        let mut buf = wire(&[(false, OpCode::Binary, b"12345"), (true, OpCode::Continuation, b"67890")]);
        assert_eq!(decoder.next_event(&mut buf), Ok(Some(WsEvent::Binary(Bytes::from("1234567890")))));
    }

    #[test]
    fn invalid_utf8_single_frame_is_1007() {
        let reason = expect_error(&[(true, OpCode::Text, &[b'a', 0xff])], 1007);
        assert!(reason.contains("byte 1"), "{reason}");
        // Surrogates and overlong encodings are invalid too.
        expect_error(&[(true, OpCode::Text, &[0xed, 0xa0, 0x80])], 1007);
        expect_error(&[(true, OpCode::Text, &[0xc0, 0xaf])], 1007);
        // Truncated at the end of an unfragmented message.
        expect_error(&[(true, OpCode::Text, &[b'a', 0xe2, 0x82])], 1007);
    }

    #[test]
    fn utf8_sequence_split_across_fragments_is_accepted() {
        let euro = "€".as_bytes(); // e2 82 ac
        let mut buf = wire(&[
            (false, OpCode::Text, &euro[..1]),
            (false, OpCode::Continuation, &euro[1..2]),
            (true, OpCode::Continuation, &euro[2..]),
        ]);
        let got = events(&mut server(), &mut buf).unwrap();
        assert_eq!(got, [WsEvent::Text(Bytes::from("€"))]);
    }

    #[test]
    fn invalid_utf8_fails_at_the_fragment_where_it_is_certain() {
        // The first fragment ends with a valid lead byte; the second makes it invalid. The third
        // fragment is never sent: the error must come from the second.
        let mut decoder = server();
        let mut buf = wire(&[(false, OpCode::Text, &[b'o', b'k', 0xe2])]);
        assert_eq!(decoder.next_event(&mut buf), Ok(None));
        buf.extend_from_slice(&encode_frame(false, OpCode::Continuation, &[0x28], Some(MASK)));
        let error = decoder.next_event(&mut buf).unwrap_err();
        assert_eq!(error.close_code, 1007);
        assert!(error.reason.contains("byte 2"), "{error}");

        // An invalid byte in the middle of a non-final fragment fails at once.
        let mut decoder = server();
        let mut buf = wire(&[(false, OpCode::Text, &[b'a', 0xff, b'b'])]);
        assert_eq!(decoder.next_event(&mut buf).unwrap_err().close_code, 1007);
    }

    #[test]
    fn message_ending_inside_a_sequence_is_1007() {
        let reason = expect_error(&[(false, OpCode::Text, b"abc"), (true, OpCode::Continuation, &[0xf0, 0x9f])], 1007);
        assert!(reason.contains("ends inside"), "{reason}");
    }

    #[test]
    fn binary_messages_are_not_utf8_checked() {
        let mut buf = wire(&[(false, OpCode::Binary, &[0xff]), (true, OpCode::Continuation, &[0xfe])]);
        let got = events(&mut server(), &mut buf).unwrap();
        assert_eq!(got, [WsEvent::Binary(Bytes::from_static(&[0xff, 0xfe]))]);
    }

    #[test]
    fn empty_close_frame() {
        let mut buf = wire(&[(true, OpCode::Close, b"")]);
        assert_eq!(server().next_event(&mut buf), Ok(Some(WsEvent::Close(None))));
    }

    #[test]
    fn close_frame_with_code_and_reason() {
        let mut buf = wire(&[(true, OpCode::Close, &close_with(1000, "bye ✓".as_bytes()))]);
        assert_eq!(
            server().next_event(&mut buf),
            Ok(Some(WsEvent::Close(Some(CloseFrame { code: 1000, reason: Bytes::from("bye ✓") }))))
        );
    }

    #[test]
    fn one_byte_close_payload_is_protocol_error() {
        let reason = expect_error(&[(true, OpCode::Close, &[0x03])], 1002);
        assert!(reason.contains("1 byte"), "{reason}");
    }

    #[test]
    fn valid_close_codes_are_accepted() {
        for code in [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014]
            .into_iter()
            .chain([3000, 3999, 4000, 4999])
        {
            let mut buf = wire(&[(true, OpCode::Close, &close_with(code, b""))]);
            let event = server().next_event(&mut buf);
            assert_eq!(event, Ok(Some(WsEvent::Close(Some(CloseFrame { code, reason: Bytes::new() })))), "code {code}");
        }
    }

    #[test]
    fn invalid_close_codes_are_protocol_errors() {
        for code in [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535] {
            let reason = expect_error(&[(true, OpCode::Close, &close_with(code, b""))], 1002);
            assert!(reason.contains(&code.to_string()), "{reason}");
        }
    }

    #[test]
    fn close_reason_must_be_utf8() {
        let reason = expect_error(&[(true, OpCode::Close, &close_with(1000, &[b'o', 0xff]))], 1007);
        assert!(reason.contains("close reason"), "{reason}");
    }

    #[test]
    fn input_after_close_is_ignored() {
        let mut buf = wire(&[
            (true, OpCode::Close, &close_with(1001, b"")),
            (true, OpCode::Text, b"late"),
            (true, OpCode::Continuation, b"garbage"),
        ]);
        let mut decoder = server();
        assert!(matches!(decoder.next_event(&mut buf), Ok(Some(WsEvent::Close(Some(_))))));
        assert_eq!(decoder.next_event(&mut buf), Ok(None));
        assert_eq!(decoder.next_event(&mut buf), Ok(None));
        assert!(decoder.is_finished());
    }

    #[test]
    fn the_end_of_a_payload_is_kept_from_an_offset_in_place_or_assembled() {
        let mut buf = wire(&[
            (true, OpCode::Binary, b"head:tail"),
            (false, OpCode::Binary, b"head:"),
            (true, OpCode::Continuation, b"more"),
            (true, OpCode::Binary, b"next"),
        ]);
        let mut decoder = server();
        let Ok(Some(Received::Binary(message))) = decoder.next_in_place(&mut buf) else { panic!("a binary message") };
        assert_eq!(message.into_bytes_from(5), Bytes::from("tail"));
        let Ok(Some(Received::Binary(message))) = decoder.next_in_place(&mut buf) else { panic!("an assembled one") };
        assert_eq!(message.into_bytes_from(5), Bytes::from("more"));
        // Each frame consumed once: the next message is whole.
        assert_eq!(decoder.next_event(&mut buf), Ok(Some(WsEvent::Binary(Bytes::from("next")))));
        assert!(buf.is_empty());
    }

    #[test]
    #[should_panic(expected = "past the payload's end")]
    fn an_offset_past_the_payload_is_refused() {
        let mut buf = wire(&[(true, OpCode::Binary, b"four")]);
        let mut decoder = server();
        if let Ok(Some(Received::Binary(message))) = decoder.next_in_place(&mut buf) {
            message.into_bytes_from(5);
        };
    }

    #[test]
    fn client_decoder_reads_unmasked_frames() {
        let mut buf = BytesMut::from(&encode_frame(true, OpCode::Text, b"hi", None)[..]);
        let mut decoder = Decoder::new(Role::Client, FRAME_LIMIT, MESSAGE_LIMIT);
        assert_eq!(decoder.next_event(&mut buf), Ok(Some(WsEvent::Text(Bytes::from("hi")))));
    }

    #[test]
    fn close_payload_encodes_code_and_reason() {
        assert_eq!(&close_payload(1000, "")[..], &[0x03, 0xe8]);
        assert_eq!(&close_payload(4001, "ok")[..], &[0x0f, 0xa1, b'o', b'k']);
    }

    #[test]
    fn close_payload_truncates_at_char_boundary() {
        let long = "é".repeat(100); // 200 bytes of 2-byte characters.
        let payload = close_payload(1008, &long);
        assert_eq!(payload.len(), 2 + 122);
        assert!(str::from_utf8(&payload[2..]).is_ok());
        let ascii = "x".repeat(200);
        assert_eq!(close_payload(1008, &ascii).len(), 2 + MAX_CLOSE_REASON_BYTES);
        // The result always fits a control frame and decodes.
        let mut buf = wire(&[(true, OpCode::Close, &close_payload(1008, &long))]);
        assert!(matches!(server().next_event(&mut buf), Ok(Some(WsEvent::Close(Some(CloseFrame { code: 1008, .. }))))));
    }

    #[test]
    fn decodes_tungstenite_client_messages() {
        use tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode as TOpCode};
        use tungstenite::protocol::frame::{CloseFrame as TCloseFrame, Frame};

        let text = "fragmented ✓ text ".repeat(50);
        let (first, rest) = text.as_bytes().split_at(101); // inside a multi-byte character
        let frames = [
            Frame::message(first.to_vec(), TOpCode::Data(Data::Text), false),
            Frame::ping(b"mid".to_vec()),
            Frame::message(rest.to_vec(), TOpCode::Data(Data::Continue), true),
            Frame::close(Some(TCloseFrame { code: CloseCode::Away, reason: "leaving".into() })),
        ];
        let mut wire = Vec::new();
        for (index, mut frame) in frames.into_iter().enumerate() {
            frame.header_mut().mask = Some([index as u8, 0x11, 0x22, 0x33]);
            frame.format(&mut wire).expect("tungstenite formats into a Vec");
        }
        let got = events(&mut server(), &mut BytesMut::from(&wire[..])).unwrap();
        assert_eq!(
            got,
            [
                WsEvent::Ping(Bytes::from("mid")),
                WsEvent::Text(Bytes::from(text)),
                WsEvent::Close(Some(CloseFrame { code: 1001, reason: Bytes::from("leaving") })),
            ]
        );
    }

    /// Up to 8 frames of any opcode, FIN or not, with payloads up to 40 bytes: (fin, index
    /// into [`OPCODES`], payload).
    fn frame_sequences() -> impl Strategy<Value = Vec<(bool, usize, Vec<u8>)>> {
        proptest::collection::vec(
            (any::<bool>(), 0usize..OPCODES.len(), proptest::collection::vec(any::<u8>(), 0..40)),
            0..8,
        )
    }

    const OPCODES: [OpCode; 6] =
        [OpCode::Continuation, OpCode::Text, OpCode::Binary, OpCode::Close, OpCode::Ping, OpCode::Pong];

    /// `frames` as a client sends them (masked; a control frame always FIN).
    fn masked_wire(frames: &[(bool, usize, Vec<u8>)]) -> BytesMut {
        let mut buf = BytesMut::new();
        for (fin, opcode, payload) in frames {
            let opcode = OPCODES[*opcode];
            let fin = *fin || opcode.is_control();
            buf.extend_from_slice(&encode_frame(fin, opcode, payload, Some(MASK)));
        }
        buf
    }

    /// A received thing as its owning event (a data message copied out of the buffer).
    fn owned(received: Received<'_>) -> WsEvent {
        match received {
            Received::Text(message) => WsEvent::Text(Bytes::copy_from_slice(message.payload())),
            Received::Binary(message) => WsEvent::Binary(Bytes::copy_from_slice(message.payload())),
            Received::Ping(payload) => WsEvent::Ping(payload),
            Received::Pong(payload) => WsEvent::Pong(payload),
            Received::Close(frame) => WsEvent::Close(frame),
        }
    }

    /// What `validate_utf8` did before its ASCII step: `str::from_utf8` of everything unchecked.
    fn validate_utf8_whole(bytes: &[u8], valid_bytes: usize, complete: bool) -> Result<usize, WsError> {
        match str::from_utf8(&bytes[valid_bytes..]) {
            Ok(_) => Ok(bytes.len()),
            Err(error) if error.error_len().is_none() && !complete => Ok(valid_bytes + error.valid_up_to()),
            Err(error) if error.error_len().is_none() => Err(WsError::new(
                close_code::INVALID_PAYLOAD,
                format!("text message ends inside a UTF-8 sequence at byte {}", valid_bytes + error.valid_up_to()),
            )),
            Err(error) => Err(WsError::new(
                close_code::INVALID_PAYLOAD,
                format!("text message is not valid UTF-8 at byte {}", valid_bytes + error.valid_up_to()),
            )),
        }
    }

    /// Mostly ASCII text with a few bytes of any value (valid characters, stray continuation
    /// and lead bytes, 0x80 and 0xff) anywhere: the inputs where the ASCII step decides.
    fn mostly_ascii() -> impl Strategy<Value = Vec<u8>> {
        let byte = prop_oneof![
            8 => 0u8..0x80,
            1 => any::<u8>(),
            1 => prop_oneof![Just(0x80u8), Just(0xc3), Just(0xe2), Just(0xf0), Just(0xff)],
        ];
        let character = prop_oneof![
            6 => byte.prop_map(|byte| vec![byte]),
            1 => any::<char>().prop_map(|character| character.to_string().into_bytes()),
        ];
        proptest::collection::vec(character, 0..60).prop_map(|pieces| pieces.concat())
    }

    #[test]
    fn the_ascii_step_agrees_with_from_utf8_at_every_length_and_alignment() {
        // A non-ASCII byte (and a valid two-byte character) at every position of every length
        // up to 70, in buffers starting at every offset of a word.
        let mut storage = [b'a'; 80];
        for offset in 0..8 {
            for len in 0..=70 {
                for position in 0..=len {
                    for insert in [&[0x80][..], &[0xc3, 0xa9][..], &[0xff][..], &[0xe2, 0x82][..]] {
                        storage.fill(b'a');
                        let end = (position + insert.len()).min(len);
                        storage[offset + position..offset + end].copy_from_slice(&insert[..end - position]);
                        let bytes = &storage[offset..offset + len];
                        for complete in [false, true] {
                            assert_eq!(
                                validate_utf8(bytes, 0, complete),
                                validate_utf8_whole(bytes, 0, complete),
                                "{bytes:?} complete {complete}"
                            );
                        }
                        let first_high = bytes.iter().position(|&byte| byte >= 0x80).unwrap_or(len);
                        let ascii = ascii_prefix_len(bytes);
                        assert!(ascii == len && first_high == len || ascii <= first_high && ascii < len, "{bytes:?}");
                    }
                }
            }
        }
    }

    proptest! {
        #[test]
        fn the_ascii_step_accepts_and_refuses_exactly_what_from_utf8_does(
            bytes in mostly_ascii(),
            offset in 0usize..8,
            valid_bytes in 0usize..24,
            complete in any::<bool>(),
        ) {
            // At an offset into a larger buffer, so the words fall at every alignment.
            let mut storage = vec![0u8; offset];
            storage.extend_from_slice(&bytes);
            let bytes = &storage[offset..];
            // The prefix validated before is a valid one: cut at a character boundary.
            let valid_bytes = match str::from_utf8(bytes) {
                Ok(_) => valid_bytes.min(bytes.len()),
                Err(error) => valid_bytes.min(error.valid_up_to()),
            };
            let valid_bytes = (0..=valid_bytes).rev().find(|&end| str::from_utf8(&bytes[..end]).is_ok()).unwrap_or(0);
            prop_assert_eq!(validate_utf8(bytes, valid_bytes, complete), validate_utf8_whole(bytes, valid_bytes, complete));
        }

        #[test]
        fn fragmented_text_is_judged_as_the_whole_message_is(
            bytes in mostly_ascii(),
            cuts in proptest::collection::vec(0usize..64, 0..4),
        ) {
            // The message cut into fragments anywhere, code points split across them included:
            // accepted exactly when it is valid UTF-8, and refused with close 1007 otherwise.
            let mut cuts: Vec<usize> = cuts.into_iter().map(|cut| cut.min(bytes.len())).collect();
            cuts.sort_unstable();
            let mut frames = Vec::new();
            let mut start = 0;
            for end in cuts.into_iter().chain([bytes.len()]) {
                let opcode = if frames.is_empty() { OpCode::Text } else { OpCode::Continuation };
                frames.push((opcode, bytes[start..end].to_vec()));
                start = end;
            }
            let last = frames.len() - 1;
            let mut buf = BytesMut::new();
            for (index, (opcode, payload)) in frames.iter().enumerate() {
                buf.extend_from_slice(&encode_frame(index == last, *opcode, payload, Some(MASK)));
            }
            let got = Decoder::new(Role::Server, 1 << 16, 1 << 16).next_event(&mut buf);
            match str::from_utf8(&bytes) {
                Ok(_) => prop_assert_eq!(got, Ok(Some(WsEvent::Text(Bytes::from(bytes))))),
                Err(_) => prop_assert_eq!(got.map_err(|error| error.close_code), Err(1007)),
            }
        }

        #[test]
        fn decoder_never_panics_on_arbitrary_bytes(
            bytes in proptest::collection::vec(any::<u8>(), 0..300),
            frame_limit in 0usize..200,
            message_limit in 0usize..400,
        ) {
            for role in [Role::Server, Role::Client] {
                let mut decoder = Decoder::new(role, frame_limit, message_limit);
                let mut buf = BytesMut::from(&bytes[..]);
                while let Ok(Some(_)) = decoder.next_event(&mut buf) {}
            }
        }

        #[test]
        fn decoder_never_panics_on_arbitrary_frame_sequences(
            frames in frame_sequences(),
        ) {
            let mut buf = masked_wire(&frames);
            let mut decoder = Decoder::new(Role::Server, 64, 100);
            while let Ok(Some(_)) = decoder.next_event(&mut buf) {}
        }

        #[test]
        fn in_place_and_owning_decodes_agree(
            frames in frame_sequences(),
            keep in any::<bool>(),
        ) {
            let mut buf = masked_wire(&frames);
            let mut owning = Decoder::new(Role::Server, 64, 100);
            let mut in_place = Decoder::new(Role::Server, 64, 100);
            let mut owning_buf = buf.clone();
            loop {
                let expected = owning.next_event(&mut owning_buf);
                // Read as a slice and dropped, or kept as `Bytes`: the same message either way.
                let got = in_place.next_in_place(&mut buf).map(|received| received.map(|received| match received {
                    Received::Text(message) if keep => WsEvent::Text(message.into_bytes()),
                    Received::Text(message) => WsEvent::Text(Bytes::copy_from_slice(message.payload())),
                    Received::Binary(message) if keep => WsEvent::Binary(message.into_bytes()),
                    Received::Binary(message) => WsEvent::Binary(Bytes::copy_from_slice(message.payload())),
                    Received::Ping(payload) => WsEvent::Ping(payload),
                    Received::Pong(payload) => WsEvent::Pong(payload),
                    Received::Close(frame) => WsEvent::Close(frame),
                }));
                prop_assert_eq!(&got, &expected);
                if !matches!(expected, Ok(Some(_))) {
                    break;
                }
                prop_assert_eq!(buf.len(), owning_buf.len(), "both consumed the same frames");
            }
        }

        #[test]
        fn the_common_frames_inline_decode_agrees_with_the_general_one(
            frames in frame_sequences(),
            frame_limit in 0usize..48,
            message_limit in 0usize..64,
        ) {
            // Every input, whichever path takes it: the same events, errors and close codes,
            // the same bytes consumed, the same state after (limits low enough to be hit).
            let mut inline_buf = masked_wire(&frames);
            let mut general_buf = inline_buf.clone();
            let mut inline = Decoder::new(Role::Server, frame_limit, message_limit);
            let mut general = Decoder::new(Role::Server, frame_limit, message_limit);
            loop {
                let got = inline.next_in_place(&mut inline_buf).map(|received| received.map(owned));
                let expected = general.next_in_place_general(&mut general_buf).map(|received| received.map(owned));
                prop_assert_eq!(&got, &expected);
                prop_assert_eq!(&inline_buf[..], &general_buf[..]);
                prop_assert_eq!(inline.is_finished(), general.is_finished());
                if !matches!(expected, Ok(Some(_))) {
                    break;
                }
            }
        }

        #[test]
        fn fragmented_text_reassembles(
            text in "\\PC{0,60}",
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..6),
        ) {
            let bytes = text.as_bytes();
            let mut points: Vec<usize> = cuts.iter().map(|cut| cut.index(bytes.len() + 1)).collect();
            points.push(0);
            points.push(bytes.len());
            points.sort_unstable();
            points.dedup();
            if points.len() == 1 {
                points.push(0); // an empty text is one empty frame
            }
            let mut buf = BytesMut::new();
            let pieces = points.len() - 1;
            for index in 0..pieces {
                let opcode = if index == 0 { OpCode::Text } else { OpCode::Continuation };
                let piece = &bytes[points[index]..points[index + 1]];
                buf.extend_from_slice(&encode_frame(index + 1 == pieces, opcode, piece, Some(MASK)));
            }
            let got = events(&mut server(), &mut buf).unwrap();
            prop_assert_eq!(got, vec![WsEvent::Text(Bytes::from(text))]);
        }
    }
}
