//! RFC 6455 frame codec (section 5.2): header decode/encode and payload masking.
//!
//! Decoding is two steps that never copy a payload: [`decode_header`] reads and checks the header
//! from the front of the read buffer (every protocol rule and the `max_frame_bytes` limit are
//! enforced here, before the payload has arrived), then, once the whole frame is buffered,
//! [`unmask_payload`] unmasks the payload where it lies and gives its range in the buffer. The
//! receive path stops there ([`decode_frame_in_place`], [`super::message::Decoder::next_in_place`]):
//! the payload is read as a slice and the frame consumed with a pointer move, and a `Bytes` (a
//! reference count taken and later returned) is made only for a payload that is kept.
//! [`decode_frame`] is the owning form: [`take_frame`] splits the frame off as a `Bytes`.
//! Nothing is consumed from the buffer until a whole frame is there.
//!
//! No extension is ever negotiated, so any RSV bit is a protocol error. Non-minimal length
//! encodings are accepted (RFC 6455 does not require rejecting them); a 64-bit length with the
//! most significant bit set is not.
//!
//! Encoding always uses the minimal length encoding. [`apply_mask`] XORs 16 bytes at a time and is
//! the only masking routine in the crate.

use std::ops::Range;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::{close_code, OpCode, Role, WsError};

/// The longest possible frame header: 2 fixed bytes, an 8-byte extended length, a 4-byte mask.
pub const MAX_HEADER_BYTES: usize = 14;

/// Control frames (Close, Ping, Pong) carry at most this many payload bytes (RFC 6455 5.5).
pub const MAX_CONTROL_PAYLOAD_BYTES: usize = 125;

const FIN_BIT: u8 = 0x80;
const RSV_BITS: u8 = 0x70;
const OPCODE_BITS: u8 = 0x0F;
const MASK_BIT: u8 = 0x80;
const LENGTH_BITS: u8 = 0x7F;
/// Set in the opcode of every control frame (Close, Ping, Pong and the reserved 0xB-0xF).
const CONTROL_OPCODE_BIT: u8 = 0x08;
/// 7-bit length codes that announce a 16-bit or 64-bit extended length.
const LENGTH_CODE_16: u8 = 126;
const LENGTH_CODE_64: u8 = 127;

/// One decoded frame. `payload` is already unmasked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    pub fin: bool,
    pub opcode: OpCode,
    pub payload: Bytes,
}

/// A checked frame header as found at the front of a read buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub fin: bool,
    pub opcode: OpCode,
    pub mask: Option<[u8; 4]>,
    /// Bytes the header occupies on the wire (2 to [`MAX_HEADER_BYTES`]).
    pub header_bytes: usize,
    /// Payload length announced by the header; never more than the `max_frame_bytes` it was
    /// checked against.
    pub payload_bytes: usize,
}

impl FrameHeader {
    /// Header plus payload: how many buffered bytes the whole frame needs.
    pub fn frame_bytes(&self) -> usize {
        self.header_bytes.saturating_add(self.payload_bytes)
    }
}

const fn opcode_from_bits(bits: u8) -> Option<OpCode> {
    match bits {
        0x0 => Some(OpCode::Continuation),
        0x1 => Some(OpCode::Text),
        0x2 => Some(OpCode::Binary),
        0x8 => Some(OpCode::Close),
        0x9 => Some(OpCode::Ping),
        0xA => Some(OpCode::Pong),
        _ => None,
    }
}

/// For each value of a header's first byte: the opcode if that byte passes every check that
/// depends on it alone (no RSV bit, a defined opcode, FIN set on a control frame), else `None`.
/// One lookup replaces three tests on the hot path; [`first_bytes_error`] explains a `None`.
const FIRST_BYTE_OPCODES: [Option<OpCode>; 256] = first_byte_opcodes();

const fn first_byte_opcodes() -> [Option<OpCode>; 256] {
    let mut table = [None; 256];
    let mut index = 0;
    while index < table.len() {
        let byte = index as u8;
        let is_control = byte & CONTROL_OPCODE_BIT != 0;
        let fin = byte & FIN_BIT != 0;
        if byte & RSV_BITS == 0 && (fin || !is_control) {
            table[index] = opcode_from_bits(byte & OPCODE_BITS);
        }
        index += 1;
    }
    table
}

/// The error for the first two header bytes when [`FIRST_BYTE_OPCODES`] rejects the first one or
/// the mask bit does not suit `role`, checked in a fixed order (RSV bits, opcode, masking, FIN
/// of a control frame) so a frame with several faults always gets the same reason.
#[cold]
fn first_bytes_error(first: u8, second: u8, role: Role) -> WsError {
    if first & RSV_BITS != 0 {
        return WsError::protocol(format!(
            "frame has RSV bits 0b{:03b} set, but no extension was negotiated",
            (first & RSV_BITS) >> 4
        ));
    }
    let opcode_bits = first & OPCODE_BITS;
    let Some(opcode) = opcode_from_bits(opcode_bits) else {
        return WsError::protocol(format!("frame uses reserved opcode 0x{opcode_bits:X}"));
    };
    match (role, second & MASK_BIT != 0) {
        (Role::Server, false) => {
            return WsError::protocol(
                "client frame is not masked; RFC 6455 section 5.1 requires clients to mask every frame",
            )
        }
        (Role::Client, true) => {
            return WsError::protocol("server frame is masked; RFC 6455 section 5.1 forbids servers to mask frames")
        }
        _ => {}
    }
    debug_assert!(
        opcode.is_control() && first & FIN_BIT == 0,
        "first_bytes_error called for a valid header start 0x{first:02X} 0x{second:02X} ({role:?})"
    );
    WsError::protocol(format!("{opcode:?} control frame has FIN clear; control frames must not be fragmented"))
}

/// Reads and checks the frame header at the front of `buf` without consuming anything.
///
/// Returns `Ok(None)` while the header is incomplete. Protocol violations are close 1002; a
/// payload longer than `max_frame_bytes` is close 1009, reported as soon as the length field is
/// readable so a peer cannot make us buffer an oversized frame.
///
/// Inlined into its callers (the decoder's loop, [`decode_frame_in_place`], [`decode_frame`]):
/// the header then lives in registers instead of being written out as a `Result` and read back,
/// and every error is built out of line ([`first_bytes_error`], [`control_payload_too_long`],
/// [`frame_too_big`], [`length_64_error`]), so what is inlined is the checks alone.
#[inline]
pub(crate) fn decode_header(buf: &[u8], role: Role, max_frame_bytes: usize) -> Result<Option<FrameHeader>, WsError> {
    let [first, second, ..] = *buf else {
        return Ok(None);
    };
    let masked = second & MASK_BIT != 0;
    let opcode = match FIRST_BYTE_OPCODES[usize::from(first)] {
        Some(opcode) if masked == (role == Role::Server) => opcode,
        _ => return Err(first_bytes_error(first, second, role)),
    };
    let fin = first & FIN_BIT != 0;

    let (payload_len, length_field_bytes): (u64, usize) = match second & LENGTH_BITS {
        LENGTH_CODE_16 => {
            let Some(&[high, low]) = buf.get(2..4) else {
                return Ok(None);
            };
            (u64::from(u16::from_be_bytes([high, low])), 2)
        }
        LENGTH_CODE_64 => {
            let Some(field) = buf.get(2..10) else {
                return Ok(None);
            };
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(field);
            let len = u64::from_be_bytes(bytes);
            if len >> 63 != 0 {
                return Err(length_64_error());
            }
            (len, 8)
        }
        short => (u64::from(short), 0),
    };

    if opcode.is_control() && payload_len > MAX_CONTROL_PAYLOAD_BYTES as u64 {
        return Err(control_payload_too_long(opcode, payload_len));
    }
    let payload_bytes = match usize::try_from(payload_len) {
        Ok(len) if len <= max_frame_bytes => len,
        _ => return Err(frame_too_big(payload_len, max_frame_bytes)),
    };

    let mask_offset = 2 + length_field_bytes;
    let mask = if masked {
        let Some(&[a, b, c, d]) = buf.get(mask_offset..mask_offset + 4) else {
            return Ok(None);
        };
        Some([a, b, c, d])
    } else {
        None
    };
    let header_bytes = mask_offset + if masked { 4 } else { 0 };
    debug_assert!(header_bytes <= MAX_HEADER_BYTES);

    Ok(Some(FrameHeader { fin, opcode, mask, header_bytes, payload_bytes }))
}

#[cold]
fn length_64_error() -> WsError {
    WsError::protocol("64-bit frame length has its most significant bit set (RFC 6455 section 5.2)")
}

#[cold]
fn control_payload_too_long(opcode: OpCode, payload_len: u64) -> WsError {
    WsError::protocol(format!(
        "{opcode:?} control frame carries {payload_len} payload bytes; the limit is \
         {MAX_CONTROL_PAYLOAD_BYTES}"
    ))
}

#[cold]
fn frame_too_big(payload_len: u64, max_frame_bytes: usize) -> WsError {
    WsError::new(
        close_code::MESSAGE_TOO_BIG,
        format!(
            "frame payload of {payload_len} bytes exceeds max_frame_bytes \
             ({max_frame_bytes} bytes); send smaller frames"
        ),
    )
}

/// A whole frame at the front of a read buffer, its payload already unmasked where it lies
/// ([`decode_frame_in_place`]). The buffer still holds it: read `buf[payload]`, then consume
/// [`FrameInPlace::frame_bytes`] bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameInPlace {
    pub fin: bool,
    pub opcode: OpCode,
    /// Where the payload lies in the buffer: after the header, up to the end of the frame.
    pub payload: Range<usize>,
}

impl FrameInPlace {
    /// Header plus payload: what to consume from the buffer once the payload has been read.
    pub fn frame_bytes(&self) -> usize {
        self.payload.end
    }
}

/// Unmasks, in place, the payload of the frame `header` describes, once all of it is in `buf`,
/// and returns where it lies. `None` (and `buf` untouched) while the payload is incomplete.
///
/// `header` must be what [`decode_header`] just returned for this same buffer, and the frame
/// must be consumed next: unmasking twice would garble it.
#[inline]
pub(crate) fn unmask_payload(buf: &mut [u8], header: &FrameHeader) -> Option<Range<usize>> {
    let payload = buf.get_mut(header.header_bytes..header.frame_bytes())?;
    if let Some(mask) = header.mask {
        apply_mask(payload, mask);
    }
    Some(header.header_bytes..header.frame_bytes())
}

/// Splits a frame whose payload [`unmask_payload`] has already unmasked off the front of `buf`
/// and keeps its payload: a pointer move and one reference count on the buffer, no copy.
/// `header_bytes` may reach into the payload: what is kept starts there.
#[inline]
pub(crate) fn split_payload(buf: &mut BytesMut, header_bytes: usize, frame_bytes: usize) -> Bytes {
    debug_assert!(header_bytes <= frame_bytes && frame_bytes <= buf.len());
    // Dropping the header from the frozen `Bytes` is a pointer move, with none of the storage
    // checks `BytesMut::advance` makes.
    let mut payload = buf.split_to(frame_bytes).freeze();
    payload.advance(header_bytes);
    payload
}

/// Splits the frame described by `header` off the front of `buf`, once all of it is buffered.
///
/// `header` must be what [`decode_header`] just returned for this same buffer. Returns `None`
/// (and leaves `buf` untouched) while the payload is incomplete. The payload is unmasked in
/// place and frozen: no copy.
pub(crate) fn take_frame(buf: &mut BytesMut, header: &FrameHeader) -> Option<RawFrame> {
    unmask_payload(buf, header)?;
    let payload = split_payload(buf, header.header_bytes, header.frame_bytes());
    Some(RawFrame { fin: header.fin, opcode: header.opcode, payload })
}

/// Decodes the frame at the front of `buf` without taking it out: every check of
/// [`decode_frame`], and the payload unmasked in place. Nothing is allocated or reference
/// counted; the caller reads `buf[frame.payload]` and then consumes `frame.frame_bytes()`.
///
/// `Ok(None)` means `buf` does not hold a whole frame yet; it is left untouched. A frame this
/// returns must be consumed before the next call (its payload is unmasked now).
#[inline]
pub fn decode_frame_in_place(
    buf: &mut [u8],
    role: Role,
    max_frame_bytes: usize,
) -> Result<Option<FrameInPlace>, WsError> {
    let Some(header) = decode_header(buf, role, max_frame_bytes)? else {
        return Ok(None);
    };
    Ok(unmask_payload(buf, &header).map(|payload| FrameInPlace { fin: header.fin, opcode: header.opcode, payload }))
}

/// Decodes one frame from the front of `buf`: [`decode_header`] then [`take_frame`].
///
/// `Ok(None)` means `buf` does not hold a whole frame yet; it is left untouched.
pub fn decode_frame(buf: &mut BytesMut, role: Role, max_frame_bytes: usize) -> Result<Option<RawFrame>, WsError> {
    match decode_header(buf, role, max_frame_bytes)? {
        Some(header) => Ok(take_frame(buf, &header)),
        None => Ok(None),
    }
}

/// Bytes in one step of [`apply_mask`]'s main loop: four mask periods, one SSE2 or NEON register.
const MASK_BLOCK_BYTES: usize = 16;

/// XORs `data` with the repeating 4-byte `mask`, starting at mask byte 0 (RFC 6455 5.3).
///
/// Works on 16-byte blocks, then the last 0 to 15 bytes as at most one 8-byte word, one 4-byte
/// word and 3 single bytes. A block and a word are whole mask periods, so every step starts at
/// mask byte 0: no rotation, no alignment prologue (unaligned loads and stores cost x86-64 and
/// AArch64 nothing extra), no per-byte index arithmetic. The block loop is written as a plain
/// XOR of a 16-byte array with the mask repeated four times; the compiler makes it one vector
/// load, XOR and store per block (SSE2 on x86-64, unrolled four times), with no `unsafe` here.
/// Before, the main loop was on 8-byte words, which the compiler also vectorised but with a
/// scalar word loop for the remainder: at 128 bytes the blocks take 16 fewer instructions per
/// frame (docs/PERFORMANCE.md, "Session 13"). The result is identical to the bytewise
/// definition for every length.
#[inline]
pub fn apply_mask(data: &mut [u8], mask: [u8; 4]) {
    let mut block_mask = [0u8; MASK_BLOCK_BYTES];
    for (index, byte) in block_mask.iter_mut().enumerate() {
        *byte = mask[index % 4];
    }
    let mut blocks = data.chunks_exact_mut(MASK_BLOCK_BYTES);
    for block in &mut blocks {
        for (byte, mask_byte) in block.iter_mut().zip(block_mask) {
            *byte ^= mask_byte;
        }
    }
    let rest = blocks.into_remainder();
    let rest = match rest.split_first_chunk_mut::<8>() {
        Some((word, after)) => {
            // Two mask periods; the same on either byte order, as both halves are equal.
            let word_mask = u64::from(u32::from_ne_bytes(mask)) * 0x1_0000_0001;
            *word = (u64::from_ne_bytes(*word) ^ word_mask).to_ne_bytes();
            after
        }
        None => rest,
    };
    let rest = match rest.split_first_chunk_mut::<4>() {
        Some((half, after)) => {
            *half = (u32::from_ne_bytes(*half) ^ u32::from_ne_bytes(mask)).to_ne_bytes();
            after
        }
        None => rest,
    };
    // At most 3 bytes, each at its own place in the mask (the tail starts at mask byte 0).
    for (byte, mask_byte) in rest.iter_mut().zip(mask) {
        *byte ^= mask_byte;
    }
}

/// Writes a frame header with the minimal length encoding: 7-bit up to 125, 16-bit up to
/// 65535, 64-bit above. The caller writes (and, if `mask` is set, masks) the payload.
pub fn encode_header(out: &mut impl BufMut, fin: bool, opcode: OpCode, payload_len: usize, mask: Option<[u8; 4]>) {
    debug_assert!(
        !opcode.is_control() || (fin && payload_len <= MAX_CONTROL_PAYLOAD_BYTES),
        "control frames must have FIN set and at most {MAX_CONTROL_PAYLOAD_BYTES} payload bytes"
    );
    let fin_bit = if fin { FIN_BIT } else { 0 };
    out.put_u8(fin_bit | opcode as u8);
    let mask_bit = if mask.is_some() { MASK_BIT } else { 0 };
    if let Ok(short) = u8::try_from(payload_len) {
        if short < LENGTH_CODE_16 {
            out.put_u8(mask_bit | short);
        } else {
            out.put_u8(mask_bit | LENGTH_CODE_16);
            out.put_u16(u16::from(short));
        }
    } else if let Ok(medium) = u16::try_from(payload_len) {
        out.put_u8(mask_bit | LENGTH_CODE_16);
        out.put_u16(medium);
    } else {
        out.put_u8(mask_bit | LENGTH_CODE_64);
        out.put_u64(payload_len as u64);
    }
    if let Some(mask) = mask {
        out.put_slice(&mask);
    }
}

/// Encodes a whole frame into a new buffer; with `mask` set, a copy of `payload` is masked.
pub fn encode_frame(fin: bool, opcode: OpCode, payload: &[u8], mask: Option<[u8; 4]>) -> BytesMut {
    let mut out = BytesMut::with_capacity(MAX_HEADER_BYTES + payload.len());
    encode_header(&mut out, fin, opcode, payload.len(), mask);
    let payload_start = out.len();
    out.extend_from_slice(payload);
    if let Some(mask) = mask {
        apply_mask(&mut out[payload_start..], mask);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LIMIT: usize = 1 << 20;
    const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    fn server_decode(bytes: &[u8]) -> Result<Option<RawFrame>, WsError> {
        decode_frame(&mut BytesMut::from(bytes), Role::Server, LIMIT)
    }

    fn expect_close(result: Result<Option<RawFrame>, WsError>, code: u16) -> String {
        match result {
            Err(error) => {
                assert_eq!(error.close_code, code, "unexpected error: {error}");
                error.reason
            }
            Ok(frame) => panic!("expected close {code}, got {frame:?}"),
        }
    }

    #[test]
    fn decodes_rfc_masked_hello_example() {
        // RFC 6455 section 5.7: a single-frame masked text message "Hello".
        let bytes = [0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58];
        let mut buf = BytesMut::from(&bytes[..]);
        buf.extend_from_slice(b"rest");
        let frame = decode_frame(&mut buf, Role::Server, LIMIT).expect("valid frame").expect("complete frame");
        assert!(frame.fin);
        assert_eq!(frame.opcode, OpCode::Text);
        assert_eq!(&frame.payload[..], b"Hello");
        assert_eq!(&buf[..], b"rest", "bytes after the frame stay in the buffer");
    }

    #[test]
    fn decodes_rfc_unmasked_hello_example_as_client() {
        let bytes = [0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f];
        let frame = decode_frame(&mut BytesMut::from(&bytes[..]), Role::Client, LIMIT)
            .expect("valid frame")
            .expect("complete frame");
        assert_eq!(&frame.payload[..], b"Hello");
    }

    #[test]
    fn incomplete_frame_leaves_buffer_untouched() {
        let full = encode_frame(true, OpCode::Binary, &[7u8; 300], Some(MASK));
        for cut in 0..full.len() {
            let mut buf = BytesMut::from(&full[..cut]);
            assert_eq!(decode_frame(&mut buf, Role::Server, LIMIT), Ok(None), "cut at {cut}");
            assert_eq!(&buf[..], &full[..cut]);
        }
        let mut buf = full.clone();
        let frame = decode_frame(&mut buf, Role::Server, LIMIT).unwrap().unwrap();
        assert_eq!(&frame.payload[..], &[7u8; 300][..]);
        assert!(buf.is_empty());
    }

    #[test]
    fn in_place_decode_unmasks_where_the_payload_lies_and_consumes_nothing() {
        let wire = encode_frame(true, OpCode::Binary, &[7u8; 300], Some(MASK));
        for cut in 0..wire.len() {
            let mut buf = BytesMut::from(&wire[..cut]);
            assert_eq!(decode_frame_in_place(&mut buf, Role::Server, LIMIT), Ok(None), "cut at {cut}");
            assert_eq!(&buf[..], &wire[..cut], "an incomplete frame stays as it arrived");
        }
        let mut buf = wire.clone();
        buf.extend_from_slice(b"rest");
        let frame = decode_frame_in_place(&mut buf, Role::Server, LIMIT).unwrap().unwrap();
        assert_eq!((frame.fin, frame.opcode, frame.payload.clone()), (true, OpCode::Binary, 4 + 4..4 + 4 + 300));
        assert_eq!(&buf[frame.payload.clone()], &[7u8; 300][..]);
        assert_eq!(&buf[frame.frame_bytes()..], b"rest");
        let reason = expect_close(
            decode_frame_in_place(&mut BytesMut::from(&wire[..]), Role::Server, 299).map(|_| None),
            close_code::MESSAGE_TOO_BIG,
        );
        assert!(reason.contains("max_frame_bytes (299 bytes)"), "{reason}");
    }

    #[test]
    fn payload_is_split_off_without_copy() {
        let mut buf = encode_frame(true, OpCode::Binary, &[1u8; 1000], None);
        let frame_start = buf.as_ptr() as usize;
        let frame = decode_frame(&mut buf, Role::Client, LIMIT).unwrap().unwrap();
        assert_eq!(frame.payload.as_ptr() as usize, frame_start + 4);
    }

    #[test]
    fn rejects_each_rsv_bit() {
        for rsv in [0x40u8, 0x20, 0x10] {
            let mut bytes = encode_frame(true, OpCode::Text, b"x", Some(MASK)).to_vec();
            bytes[0] |= rsv;
            let reason = expect_close(server_decode(&bytes), close_code::PROTOCOL_ERROR);
            assert!(reason.contains("RSV"), "{reason}");
        }
    }

    #[test]
    fn rejects_reserved_opcodes() {
        for opcode in (0x3u8..=0x7).chain(0xB..=0xF) {
            let bytes = [0x80 | opcode, 0x80, 1, 2, 3, 4];
            let reason = expect_close(server_decode(&bytes), close_code::PROTOCOL_ERROR);
            assert!(reason.contains("reserved opcode"), "{reason}");
        }
    }

    #[test]
    fn server_rejects_unmasked_client_frame() {
        let bytes = encode_frame(true, OpCode::Text, b"hi", None);
        let reason = expect_close(server_decode(&bytes), close_code::PROTOCOL_ERROR);
        assert!(reason.contains("not masked"), "{reason}");
    }

    #[test]
    fn client_rejects_masked_server_frame() {
        let bytes = encode_frame(true, OpCode::Text, b"hi", Some(MASK));
        let result = decode_frame(&mut BytesMut::from(&bytes[..]), Role::Client, LIMIT);
        let reason = expect_close(result, close_code::PROTOCOL_ERROR);
        assert!(reason.contains("masked"), "{reason}");
    }

    #[test]
    fn every_first_byte_and_mask_bit_is_judged_by_the_rules() {
        // The lookup table and its error path against the rules written out plainly: RSV bits
        // clear, a defined opcode, FIN on control frames, masking as the role requires.
        for first in 0..=u8::MAX {
            for masked in [false, true] {
                for role in [Role::Server, Role::Client] {
                    let second = if masked { 0x80 } else { 0x00 };
                    let bytes = [first, second, 1, 2, 3, 4];
                    let opcode = opcode_from_bits(first & 0x0F);
                    let control = first & 0x08 != 0;
                    let valid = first & 0x70 == 0
                        && opcode.is_some()
                        && (first & 0x80 != 0 || !control)
                        && masked == (role == Role::Server);
                    match decode_header(&bytes, role, LIMIT) {
                        Ok(Some(header)) => {
                            assert!(valid, "accepted 0x{first:02X}, masked {masked}, {role:?}");
                            assert_eq!(Some(header.opcode), opcode);
                            assert_eq!(header.fin, first & 0x80 != 0);
                        }
                        Ok(None) => panic!("two header bytes are enough to judge 0x{first:02X}"),
                        Err(error) => {
                            assert!(!valid, "rejected valid 0x{first:02X}, masked {masked}, {role:?}: {error}");
                            assert_eq!(error.close_code, close_code::PROTOCOL_ERROR);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn several_faults_are_reported_in_a_fixed_order() {
        // RSV before opcode before masking before the FIN of a control frame.
        let unmasked_rsv_reserved = [0x40 | 0x03, 0x00];
        let reason = expect_close(server_decode(&unmasked_rsv_reserved), close_code::PROTOCOL_ERROR);
        assert!(reason.contains("RSV"), "{reason}");
        let unmasked_reserved = [0x83, 0x00];
        let reason = expect_close(server_decode(&unmasked_reserved), close_code::PROTOCOL_ERROR);
        assert!(reason.contains("reserved opcode"), "{reason}");
        let unmasked_unfinished_ping = [0x09, 0x00];
        let reason = expect_close(server_decode(&unmasked_unfinished_ping), close_code::PROTOCOL_ERROR);
        assert!(reason.contains("not masked"), "{reason}");
    }

    #[test]
    fn rejects_fragmented_control_frames() {
        for opcode in [OpCode::Close, OpCode::Ping, OpCode::Pong] {
            let bytes = [opcode as u8, 0x80, 1, 2, 3, 4];
            let reason = expect_close(server_decode(&bytes), close_code::PROTOCOL_ERROR);
            assert!(reason.contains("FIN clear"), "{reason}");
        }
    }

    #[test]
    fn rejects_control_frames_over_125_bytes() {
        // 126 bytes with the 16-bit encoding, and a non-minimal 16-bit encoding of 126.
        let mut bytes = vec![0x89, 0x80 | 126, 0, 126];
        bytes.extend_from_slice(&MASK);
        let reason = expect_close(server_decode(&bytes), close_code::PROTOCOL_ERROR);
        assert!(reason.contains("126 payload bytes"), "{reason}");
        // Detected from the header alone: no payload was provided.
    }

    #[test]
    fn accepts_control_frame_of_exactly_125_bytes() {
        let bytes = encode_frame(true, OpCode::Ping, &[9u8; 125], Some(MASK));
        let frame = server_decode(&bytes).unwrap().unwrap();
        assert_eq!(frame.payload.len(), 125);
    }

    #[test]
    fn accepts_non_minimal_length_encodings() {
        // 5 bytes announced with the 16-bit and with the 64-bit encoding.
        let mut sixteen = vec![0x82, 0x80 | 126, 0, 5];
        sixteen.extend_from_slice(&MASK);
        sixteen.extend_from_slice(&[0u8; 5]);
        let mut sixty_four = vec![0x82, 0x80 | 127, 0, 0, 0, 0, 0, 0, 0, 5];
        sixty_four.extend_from_slice(&MASK);
        sixty_four.extend_from_slice(&[0u8; 5]);
        for bytes in [sixteen, sixty_four] {
            let frame = server_decode(&bytes).unwrap().unwrap();
            // Zero bytes on the wire unmask to the mask itself.
            assert_eq!(&frame.payload[..], &[0x37, 0xfa, 0x21, 0x3d, 0x37]);
        }
        // A non-minimal control frame length within 125 is also fine.
        let mut ping = vec![0x89, 0x80 | 126, 0, 3];
        ping.extend_from_slice(&MASK);
        ping.extend_from_slice(&[0u8; 3]);
        assert_eq!(server_decode(&ping).unwrap().unwrap().payload.len(), 3);
    }

    #[test]
    fn rejects_64_bit_length_with_top_bit_set() {
        let bytes = [0x82, 0x80 | 127, 0x80, 0, 0, 0, 0, 0, 0, 1];
        let reason = expect_close(
            decode_frame(&mut BytesMut::from(&bytes[..]), Role::Server, usize::MAX),
            close_code::PROTOCOL_ERROR,
        );
        assert!(reason.contains("most significant bit"), "{reason}");
    }

    #[test]
    fn rejects_oversized_frame_from_header_alone() {
        // Only the 4 header bytes are present; the 4464-byte payload never arrives.
        let bytes = [0x82, 0x80 | 126, 0x11, 0x70];
        let result = decode_frame(&mut BytesMut::from(&bytes[..]), Role::Server, 4000);
        let reason = expect_close(result, close_code::MESSAGE_TOO_BIG);
        assert!(reason.contains("4464"), "{reason}");
        assert!(reason.contains("max_frame_bytes (4000 bytes)"), "{reason}");
        let huge = [0x82, 0x80 | 127, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
        let result = decode_frame(&mut BytesMut::from(&huge[..]), Role::Server, LIMIT);
        expect_close(result, close_code::MESSAGE_TOO_BIG);
    }

    #[test]
    fn frame_exactly_at_limit_is_accepted() {
        let bytes = encode_frame(true, OpCode::Binary, &[3u8; 200], Some(MASK));
        let frame = decode_frame(&mut BytesMut::from(&bytes[..]), Role::Server, 200).unwrap().unwrap();
        assert_eq!(frame.payload.len(), 200);
        let result = decode_frame(&mut BytesMut::from(&bytes[..]), Role::Server, 199);
        expect_close(result, close_code::MESSAGE_TOO_BIG);
    }

    #[test]
    fn encode_header_uses_minimal_lengths() {
        let cases: [(usize, usize); 6] = [(0, 2), (125, 2), (126, 4), (65_535, 4), (65_536, 10), (1 << 40, 10)];
        for (len, header_len) in cases {
            let mut out = Vec::new();
            encode_header(&mut out, true, OpCode::Binary, len, None);
            assert_eq!(out.len(), header_len, "payload length {len}");
            let mut masked = Vec::new();
            encode_header(&mut masked, true, OpCode::Binary, len, Some(MASK));
            assert_eq!(masked.len(), header_len + 4);
            let header = decode_header(&masked, Role::Server, usize::MAX).unwrap().unwrap();
            assert_eq!(header.payload_bytes, len);
            assert_eq!(header.header_bytes, header_len + 4);
            assert_eq!(header.mask, Some(MASK));
        }
        let mut out = Vec::new();
        encode_header(&mut out, false, OpCode::Text, 126, None);
        assert_eq!(out, [0x01, 126, 0, 126]);
    }

    #[test]
    fn mask_of_rfc_example() {
        let mut data = *b"Hello";
        apply_mask(&mut data, MASK);
        assert_eq!(data, [0x7f, 0x9f, 0x4d, 0x51, 0x58]);
    }

    fn opcode_strategy() -> impl Strategy<Value = OpCode> {
        prop_oneof![
            Just(OpCode::Continuation),
            Just(OpCode::Text),
            Just(OpCode::Binary),
            Just(OpCode::Close),
            Just(OpCode::Ping),
            Just(OpCode::Pong),
        ]
    }

    proptest! {
        #[test]
        fn apply_mask_equals_bytewise_xor_for_every_short_length_and_offset(
            data in any::<[u8; 88]>(),
            mask in any::<[u8; 4]>(),
        ) {
            // Every length 0..=80 at every start offset 0..8: 0 to 5 blocks (the compiler
            // unrolls the block loop four times, so 1-3 blocks before it and 4-5 through it),
            // each tail (none, 1-3 bytes, the 4-byte word, the 8-byte word, and their sums up to
            // 15 bytes), at every alignment of the buffer.
            for offset in 0..8 {
                for len in 0..=80 {
                    let mut fast = data;
                    let mut slow = data;
                    apply_mask(&mut fast[offset..offset + len], mask);
                    for (index, byte) in slow[offset..offset + len].iter_mut().enumerate() {
                        *byte ^= mask[index % 4];
                    }
                    prop_assert_eq!(fast, slow, "length {}, offset {}", len, offset);
                }
            }
        }

        #[test]
        fn apply_mask_equals_bytewise_xor(
            data in proptest::collection::vec(any::<u8>(), 0..300),
            mask in any::<[u8; 4]>(),
            offset in 0usize..16,
        ) {
            let offset = offset.min(data.len());
            let mut fast = data.clone();
            let mut slow = data.clone();
            apply_mask(&mut fast[offset..], mask);
            for (index, byte) in slow[offset..].iter_mut().enumerate() {
                *byte ^= mask[index % 4];
            }
            prop_assert_eq!(fast, slow);
        }

        #[test]
        fn encode_then_decode_is_identity(
            payload in proptest::collection::vec(any::<u8>(), 0..70_000),
            opcode in opcode_strategy(),
            fin in any::<bool>(),
            mask in any::<[u8; 4]>(),
            masked in any::<bool>(),
        ) {
            let (fin, payload) = if opcode.is_control() {
                (true, &payload[..payload.len().min(MAX_CONTROL_PAYLOAD_BYTES)])
            } else {
                (fin, &payload[..])
            };
            let (role, mask) = if masked { (Role::Server, Some(mask)) } else { (Role::Client, None) };
            let mut buf = encode_frame(fin, opcode, payload, mask);
            buf.extend_from_slice(b"next");
            let mut in_place = buf.clone();
            let frame = decode_frame(&mut buf, role, payload.len()).unwrap().unwrap();
            prop_assert_eq!(frame.fin, fin);
            prop_assert_eq!(frame.opcode, opcode);
            prop_assert_eq!(&frame.payload[..], payload);
            prop_assert_eq!(&buf[..], b"next");
            // The same frame decoded where it lies: same fields, the payload in the buffer.
            let frame = decode_frame_in_place(&mut in_place, role, payload.len()).unwrap().unwrap();
            prop_assert_eq!(frame.fin, fin);
            prop_assert_eq!(frame.opcode, opcode);
            prop_assert_eq!(&in_place[frame.payload.clone()], payload);
            prop_assert_eq!(&in_place[frame.frame_bytes()..], b"next");
        }

        #[test]
        fn decode_never_panics_on_arbitrary_bytes(
            bytes in proptest::collection::vec(any::<u8>(), 0..200),
            limit in 0usize..300,
        ) {
            for role in [Role::Server, Role::Client] {
                let mut buf = BytesMut::from(&bytes[..]);
                let mut in_place = buf.clone();
                while let Ok(Some(frame)) = decode_frame(&mut buf, role, limit) {
                    prop_assert!(frame.payload.len() <= limit);
                    // In place, frame for frame the same answer.
                    let same = decode_frame_in_place(&mut in_place, role, limit).unwrap().unwrap();
                    prop_assert_eq!(&in_place[same.payload.clone()], &frame.payload[..]);
                    in_place.advance(same.frame_bytes());
                }
                prop_assert_eq!(
                    decode_frame(&mut buf, role, limit).map(|frame| frame.map(|frame| frame.payload.len())),
                    decode_frame_in_place(&mut in_place, role, limit).map(|frame| frame.map(|frame| frame.payload.len()))
                );
                prop_assert_eq!(&buf[..], &in_place[..], "neither consumes an incomplete or refused frame");
            }
        }
    }

    #[test]
    fn decodes_tungstenite_client_frames() {
        use tungstenite::protocol::frame::coding::{Control, Data, OpCode as TOpCode};
        use tungstenite::protocol::frame::Frame;

        let payload: Vec<u8> = (0..70_000u32).map(|n| (n * 7) as u8).collect();
        let cases = [
            (TOpCode::Data(Data::Text), OpCode::Text, b"hello".to_vec(), true),
            (TOpCode::Data(Data::Binary), OpCode::Binary, payload[..300].to_vec(), false),
            (TOpCode::Data(Data::Continue), OpCode::Continuation, payload.clone(), true),
            (TOpCode::Control(Control::Ping), OpCode::Ping, b"ping".to_vec(), true),
            (TOpCode::Control(Control::Pong), OpCode::Pong, Vec::new(), true),
        ];
        for (index, (their_opcode, our_opcode, data, fin)) in cases.into_iter().enumerate() {
            let mut frame = Frame::message(data.clone(), TOpCode::Data(Data::Binary), fin);
            frame.header_mut().opcode = their_opcode;
            frame.header_mut().mask = Some([index as u8, 0x5a, 0xa5, 0xff]);
            let mut wire = Vec::new();
            frame.format(&mut wire).expect("tungstenite formats into a Vec");
            let mut buf = BytesMut::from(&wire[..]);
            let decoded = decode_frame(&mut buf, Role::Server, LIMIT).unwrap().unwrap();
            assert_eq!(decoded.opcode, our_opcode);
            assert_eq!(decoded.fin, fin);
            assert_eq!(&decoded.payload[..], &data[..]);
            assert!(buf.is_empty());
        }
    }
}
