//! Field rules shared by both bindings (docs/PROTOCOL.md, "Field rules").
//!
//! Each decoder first takes a payload apart into a [`Frame`] (layout errors: truncation, unknown
//! kind, bad flags, unknown or duplicate text fields) and then calls [`validate_frame`], so a
//! frame is held to exactly the same rules whichever binding it came in. The rules also keep
//! every valid frame representable in *both* bindings: a text frame may not carry a field the
//! binary length prefixes cannot hold, and no string may contain a character that would break a
//! text header line. That is what lets the broker forward a message to a consumer in the other
//! binding without re-checking it.
//!
//! Error reasons name the frame kind, the field (by its text name, which the binary tables of
//! docs/PROTOCOL.md use too), the limit, and what to do. They never echo raw input: excerpts go
//! through [`excerpt`], so a reason is always safe to send back in an ERROR frame.

use super::binary::{MAX_HEADER_COUNT, MAX_STR16_BYTES, MAX_STR8_BYTES};
use super::frame::{Frame, FrameKind, Properties, PROTOCOL_VERSION};
use super::{CodecLimits, DecodeError};

/// Lowest and highest ERROR code: the WebSocket private-use close-code range (RFC 6455 7.4.2).
pub const ERROR_CODE_RANGE: std::ops::RangeInclusive<u16> = 4000..=4999;

/// Checks every field rule of `frame` against `limits`. Both decoders call this last.
pub fn validate_frame(frame: &Frame, limits: &CodecLimits) -> Result<(), DecodeError> {
    let kind = frame.kind();
    match frame {
        Frame::Open(open) => {
            check_version(kind, open.version)?;
            check_value(kind, "session-id", &open.session_id, MAX_STR8_BYTES)?;
            check_value(kind, "login", &open.login, MAX_STR8_BYTES)?;
            check_value(kind, "passcode", &open.passcode, MAX_STR16_BYTES)
        }
        Frame::Opened(opened) => {
            check_version(kind, opened.version)?;
            if opened.session_id.is_empty() {
                return Err(DecodeError::malformed(
                    "OPENED: field `session-id` is empty; the broker must name the session it opened",
                ));
            }
            check_value(kind, "session-id", &opened.session_id, MAX_STR8_BYTES)?;
            check_value(kind, "server", &opened.server, MAX_STR8_BYTES)
        }
        Frame::Send(send) => {
            check_address(kind, "address", &send.address, limits)?;
            check_properties(kind, &send.properties, limits)
        }
        Frame::Receipt(receipt) => check_not_zero(kind, "seq", receipt.seq, "SEND sequences start at 1"),
        Frame::Subscribe(subscribe) => {
            check_subscription_id(kind, subscribe.subscription_id)?;
            check_address(kind, "address", &subscribe.address, limits)
        }
        Frame::Subscribed(subscribed) => check_subscription_id(kind, subscribed.subscription_id),
        Frame::Unsubscribe(unsubscribe) => check_subscription_id(kind, unsubscribe.subscription_id),
        Frame::Message(message) => {
            check_subscription_id(kind, message.subscription_id)?;
            check_delivery_seq(kind, message.delivery_seq)?;
            check_address(kind, "address", &message.address, limits)?;
            check_properties(kind, &message.properties, limits)
        }
        Frame::Ack(ack) => check_delivery_seq(kind, ack.delivery_seq),
        Frame::Nack(nack) => check_delivery_seq(kind, nack.delivery_seq),
        Frame::Flow(flow) => check_subscription_id(kind, flow.subscription_id),
        Frame::Error(error) => {
            if !ERROR_CODE_RANGE.contains(&error.code) {
                return Err(DecodeError::malformed(format!(
                    "ERROR: field `code` is {}, outside {}..={}; MBWS error codes are WebSocket \
                     private-use close codes (see the error table of docs/PROTOCOL.md)",
                    error.code,
                    ERROR_CODE_RANGE.start(),
                    ERROR_CODE_RANGE.end()
                )));
            }
            check_value(kind, "reason", &error.reason, MAX_STR16_BYTES)
        }
        Frame::Ping(_) | Frame::Pong(_) | Frame::Close(_) => Ok(()),
    }
}

fn check_version(kind: FrameKind, version: u8) -> Result<(), DecodeError> {
    if version == PROTOCOL_VERSION {
        return Ok(());
    }
    Err(DecodeError::malformed(format!(
        "{}: field `version` is {version}; this implementation speaks only MBWS version \
         {PROTOCOL_VERSION}",
        kind.name()
    )))
}

fn check_not_zero(kind: FrameKind, field: &str, value: u64, why: &str) -> Result<(), DecodeError> {
    if value != 0 {
        return Ok(());
    }
    Err(DecodeError::malformed(format!("{}: field `{field}` is 0; {why}", kind.name())))
}

pub(super) fn check_subscription_id(kind: FrameKind, subscription_id: u32) -> Result<(), DecodeError> {
    check_not_zero(
        kind,
        "subscription-id",
        u64::from(subscription_id),
        "subscription ids start at 1 (0 means \"no subscription\" in ERROR)",
    )
}

pub(super) fn check_delivery_seq(kind: FrameKind, delivery_seq: u64) -> Result<(), DecodeError> {
    check_not_zero(kind, "delivery-seq", delivery_seq, "delivery sequences start at 1")
}

/// A string field: at most `max_bytes` (the binary length prefix), UTF-8, no CR, LF or NUL.
#[inline]
pub fn check_value(kind: FrameKind, field: &str, value: &[u8], max_bytes: usize) -> Result<(), DecodeError> {
    check_value_named(kind, || field, value, max_bytes)
}

/// [`check_value`] with the field's name made only when a reason needs it (an application
/// header's value is named after its header).
#[inline]
fn check_value_named<'a>(
    kind: FrameKind,
    field: impl FnOnce() -> &'a str,
    value: &[u8],
    max_bytes: usize,
) -> Result<(), DecodeError> {
    if value.len() <= max_bytes && is_plain_value(value) {
        return Ok(());
    }
    check_value_fully(kind, field(), value, max_bytes)
}

/// Every rule of [`check_value`], one at a time, for a value the one-pass check did not accept:
/// it either holds non-ASCII UTF-8 (accepted here) or breaks a rule (named here, the first in
/// the order length, UTF-8, characters).
#[cold]
#[inline(never)]
fn check_value_fully(kind: FrameKind, field: &str, value: &[u8], max_bytes: usize) -> Result<(), DecodeError> {
    check_length(kind, field, value.len(), max_bytes, None)?;
    check_utf8(kind, field, value)?;
    if let Some(position) = value.iter().position(|&byte| matches!(byte, b'\r' | b'\n' | 0)) {
        return Err(DecodeError::malformed(format!(
            "{}: field `{field}` contains {} at byte {position}; string fields may not contain \
             CR, LF or NUL",
            kind.name(),
            byte_name(value[position])
        )));
    }
    Ok(())
}

/// An address (`address`, `reply-to`): at most `max_address_bytes` (and 255, the str8 prefix),
/// UTF-8, no control characters. Empty is refused where the field is required (`address`) and
/// means "absent" for `reply-to` (the caller skips the check then).
#[inline]
pub(super) fn check_address(
    kind: FrameKind,
    field: &str,
    address: &[u8],
    limits: &CodecLimits,
) -> Result<(), DecodeError> {
    let max_bytes = limits.max_address_bytes.min(MAX_STR8_BYTES);
    if !address.is_empty() && address.len() <= max_bytes && is_plain_address(address) {
        return Ok(());
    }
    check_address_fully(kind, field, address, limits)
}

/// Every rule of [`check_address`], one at a time (see [`check_value_fully`]).
#[cold]
#[inline(never)]
fn check_address_fully(kind: FrameKind, field: &str, address: &[u8], limits: &CodecLimits) -> Result<(), DecodeError> {
    if address.is_empty() {
        return Err(DecodeError::malformed(format!(
            "{}: field `{field}` is empty; name the address, e.g. `orders`",
            kind.name()
        )));
    }
    check_length(kind, field, address.len(), MAX_STR8_BYTES, Some(("max_address_bytes", limits.max_address_bytes)))?;
    check_utf8(kind, field, address)?;
    if let Some(position) = address.iter().position(|&byte| byte < 0x20 || byte == 0x7f) {
        return Err(DecodeError::malformed(format!(
            "{}: field `{field}` contains {} at byte {position}; addresses may not contain \
             control characters (bytes below 0x20, or 0x7f)",
            kind.name(),
            byte_name(address[position])
        )));
    }
    Ok(())
}

/// Refuses a field longer than the protocol maximum for it (`max_bytes`, set by its binary
/// length prefix) or than a configured limit (`limit`: its name and value), naming the lower
/// (the configured limit when they are equal: that is the one an operator can change).
fn check_length(
    kind: FrameKind,
    field: &str,
    length: usize,
    max_bytes: usize,
    limit: Option<(&str, usize)>,
) -> Result<(), DecodeError> {
    let configured = limit.filter(|&(_, value)| value <= max_bytes);
    if length <= configured.map_or(max_bytes, |(_, value)| value) {
        return Ok(());
    }
    let over = match configured {
        Some((name, value)) => format!("{name} {value}"),
        None => format!("{max_bytes}, the protocol maximum for this field"),
    };
    Err(DecodeError::too_large(format!(
        "{}: field `{field}` is {length} bytes, over {over}; use a shorter `{field}`",
        kind.name()
    )))
}

fn check_utf8(kind: FrameKind, field: &str, value: &[u8]) -> Result<(), DecodeError> {
    match std::str::from_utf8(value) {
        Ok(_) => Ok(()),
        Err(error) => Err(DecodeError::malformed(format!(
            "{}: field `{field}` is not valid UTF-8 (invalid byte at offset {})",
            kind.name(),
            error.valid_up_to()
        ))),
    }
}

/// The fast checks read string fields a machine word at a time.
const WORD_BYTES: usize = 8;
/// 0x01 in every byte of a word.
const EVERY_BYTE_ONE: u64 = u64::from_ne_bytes([0x01; WORD_BYTES]);
/// The high bit of every byte of a word: a byte with it set is not ASCII.
const EVERY_BYTE_HIGH_BIT: u64 = EVERY_BYTE_ONE * 0x80;

/// Whether any byte of `word` is less than `bound` (at most 0x80). Exact as a yes/no answer
/// when no byte of `word` has its high bit set, which the callers check first: a byte below
/// `bound` borrows into its high bit, and a borrow only propagates past a byte that already
/// answered yes.
const fn any_byte_below(word: u64, bound: u8) -> bool {
    word.wrapping_sub(EVERY_BYTE_ONE * bound as u64) & !word & EVERY_BYTE_HIGH_BIT != 0
}

/// Whether any byte of `word` equals `byte` (same precondition as [`any_byte_below`]).
const fn any_byte_is(word: u64, byte: u8) -> bool {
    any_byte_below(word ^ (EVERY_BYTE_ONE * byte as u64), 1)
}

/// Whether every byte of `bytes` passes `word_passes`, which judges 8 bytes at once. Bytes may
/// be judged twice (short inputs and the last word are read as overlapping loads, so there is
/// never a byte-by-byte tail), which suits a per-byte rule.
#[inline(always)]
fn every_word_passes(bytes: &[u8], word_passes: impl Fn(u64) -> bool) -> bool {
    let length = bytes.len();
    let load = |start: usize| {
        let word: [u8; WORD_BYTES] = bytes[start..start + WORD_BYTES].try_into().expect("8 bytes");
        u64::from_le_bytes(word)
    };
    match length {
        0 => true,
        1..=3 => {
            let (first, middle, last) = (bytes[0], bytes[length / 2], bytes[length - 1]);
            word_passes(u64::from_le_bytes([first, middle, last, first, first, first, first, first]))
        }
        4..=7 => {
            let low = u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes"));
            let high = u32::from_le_bytes(bytes[length - 4..].try_into().expect("4 bytes"));
            word_passes(u64::from(low) | u64::from(high) << 32)
        }
        _ => {
            let mut start = 0;
            while start + WORD_BYTES <= length {
                if !word_passes(load(start)) {
                    return false;
                }
                start += WORD_BYTES;
            }
            start == length || word_passes(load(length - WORD_BYTES))
        }
    }
}

/// The common case of a string field, decided in one pass: ASCII without CR, LF or NUL. A
/// `false` is not an error: the field may hold other UTF-8, and the full checks decide.
fn is_plain_value(value: &[u8]) -> bool {
    every_word_passes(value, |word| {
        word & EVERY_BYTE_HIGH_BIT == 0
            && !any_byte_is(word, b'\r')
            && !any_byte_is(word, b'\n')
            && !any_byte_is(word, 0)
    })
}

/// The common case of an address, in one pass: printable ASCII (0x20 to 0x7e).
fn is_plain_address(address: &[u8]) -> bool {
    every_word_passes(address, |word| {
        word & EVERY_BYTE_HIGH_BIT == 0 && !any_byte_below(word, 0x20) && !any_byte_is(word, 0x7f)
    })
}

/// Message properties and application headers (SEND and MESSAGE).
pub(super) fn check_properties(
    kind: FrameKind,
    properties: &Properties,
    limits: &CodecLimits,
) -> Result<(), DecodeError> {
    let headers = properties.headers.iter().map(|(name, value)| (&name[..], &value[..]));
    check_property_fields(
        kind,
        [&properties.content_type, &properties.correlation_id, &properties.reply_to],
        properties.headers.len(),
        headers,
        limits,
    )
}

/// [`check_properties`] of fields given as slices (content type, correlation id, reply-to;
/// `header_count` headers), for a decoder that checks them where they lie without making a
/// [`Properties`].
pub(super) fn check_property_fields<'a>(
    kind: FrameKind,
    [content_type, correlation_id, reply_to]: [&[u8]; 3],
    header_count: usize,
    headers: impl Iterator<Item = (&'a [u8], &'a [u8])>,
    limits: &CodecLimits,
) -> Result<(), DecodeError> {
    check_value(kind, "content-type", content_type, MAX_STR8_BYTES)?;
    check_value(kind, "correlation-id", correlation_id, MAX_STR8_BYTES)?;
    if !reply_to.is_empty() {
        check_address(kind, "reply-to", reply_to, limits)?;
    }
    if header_count > max_header_count(limits) {
        return Err(too_many_headers(kind, limits));
    }
    let mut total_bytes = content_type.len() + correlation_id.len() + reply_to.len();
    for (name, value) in headers {
        check_header_name(kind, name)?;
        // A valid header name is ascii, so it names its own value in error reasons.
        let field = || std::str::from_utf8(name).unwrap_or("application header");
        check_value_named(kind, field, value, MAX_STR16_BYTES)?;
        total_bytes += name.len() + value.len();
    }
    if total_bytes > limits.max_header_bytes {
        return Err(DecodeError::too_large(format!(
            "{}: properties and application headers are {total_bytes} bytes, over \
             max_header_bytes {}; send shorter headers or move the data into the body",
            kind.name(),
            limits.max_header_bytes
        )));
    }
    Ok(())
}

/// Most application headers one message may carry: `max_headers`, and never more than the
/// binary header count can hold.
pub fn max_header_count(limits: &CodecLimits) -> usize {
    limits.max_headers.min(MAX_HEADER_COUNT)
}

/// The error for a message with more than [`max_header_count`] application headers.
pub fn too_many_headers(kind: FrameKind, limits: &CodecLimits) -> DecodeError {
    let limit = if limits.max_headers <= MAX_HEADER_COUNT {
        format!("max_headers {}", limits.max_headers)
    } else {
        format!("{MAX_HEADER_COUNT}, the most the binary header count can carry")
    };
    DecodeError::too_large(format!(
        "{}: too many application headers, over {limit}; send fewer headers or move the data \
         into the body",
        kind.name()
    ))
}

/// `x-` followed by at least one of: lowercase ascii letter, digit, `-`, `_`, `.`.
#[inline]
pub fn check_header_name(kind: FrameKind, name: &[u8]) -> Result<(), DecodeError> {
    let plain = name.len() > HEADER_NAME_PREFIX.len()
        && name.len() <= MAX_STR8_BYTES
        && name.starts_with(HEADER_NAME_PREFIX)
        && name.iter().all(|&byte| HEADER_NAME_BYTES[usize::from(byte)]);
    if plain {
        return Ok(());
    }
    check_header_name_fully(kind, name)
}

/// Every application header name starts with this.
const HEADER_NAME_PREFIX: &[u8] = b"x-";

/// For each byte value: whether it may appear in an application header name (the prefix `x-`
/// included). One lookup per byte on the hot path.
const HEADER_NAME_BYTES: [bool; 256] = header_name_bytes();

const fn header_name_bytes() -> [bool; 256] {
    let mut table = [false; 256];
    let mut byte = 0;
    while byte < table.len() {
        table[byte] = is_header_name_byte(byte as u8);
        byte += 1;
    }
    table
}

const fn is_header_name_byte(byte: u8) -> bool {
    matches!(byte, b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.')
}

/// Every rule of [`check_header_name`], one at a time (see [`check_value_fully`]).
#[cold]
#[inline(never)]
fn check_header_name_fully(kind: FrameKind, name: &[u8]) -> Result<(), DecodeError> {
    const RULE: &str = "names are `x-` followed by lowercase ascii letters, digits, '-', '_' or '.'";
    check_length(kind, "application header name", name.len(), MAX_STR8_BYTES, None)?;
    if !name.starts_with(HEADER_NAME_PREFIX) || name.len() == HEADER_NAME_PREFIX.len() {
        return Err(DecodeError::malformed(format!(
            "{}: application header name \"{}\" is not allowed; {RULE}",
            kind.name(),
            excerpt(name)
        )));
    }
    if let Some(position) = name.iter().position(|&byte| !is_header_name_byte(byte)) {
        return Err(DecodeError::malformed(format!(
            "{}: application header name \"{}\" has {} at byte {position}; {RULE}",
            kind.name(),
            excerpt(name),
            byte_name(name[position])
        )));
    }
    Ok(())
}

/// A short, escaped rendering of untrusted bytes for an error reason: at most 40 characters,
/// invalid UTF-8 replaced, control characters escaped. Safe to put in an ERROR frame.
pub fn excerpt(bytes: &[u8]) -> String {
    const MAX_CHARS: usize = 40;
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(4 * MAX_CHARS)]);
    let mut shown: String = text.chars().take(MAX_CHARS).flat_map(char::escape_debug).collect();
    if text.chars().count() > MAX_CHARS || bytes.len() > 4 * MAX_CHARS {
        shown.push_str("...");
    }
    shown
}

/// "1 trailing byte", "5 trailing bytes": unexpected bytes at the end of a frame, for a reason.
pub fn trailing_bytes(count: usize) -> String {
    if count == 1 {
        "1 trailing byte".to_string()
    } else {
        format!("{count} trailing bytes")
    }
}

/// How a single byte is named in an error reason.
fn byte_name(byte: u8) -> String {
    match byte {
        b'\r' => "a carriage return (CR)".to_string(),
        b'\n' => "a line feed (LF)".to_string(),
        0 => "a NUL byte".to_string(),
        0x20..=0x7e => format!("'{}'", byte as char),
        _ => format!("byte 0x{byte:02x}"),
    }
}

#[cfg(test)]
mod tests {
    //! Every field rule, through both decoders where the bad frame can be encoded in them.

    use bytes::Bytes;

    use proptest::prelude::*;

    use super::super::codec_tests::{assert_error, sample};
    use super::super::*;
    use super::{
        check_address, check_address_fully, check_header_name, check_header_name_fully, check_value, check_value_fully,
        excerpt, validate_frame,
    };

    const BOTH: &[Binding] = &[Binding::Binary, Binding::Text];
    /// A string the binary length prefix cannot carry, or a CR/LF the text lines cannot.
    const BINARY_ONLY: &[Binding] = &[Binding::Binary];
    const TEXT_ONLY: &[Binding] = &[Binding::Text];

    #[track_caller]
    fn rejected(frame: Frame, limits: CodecLimits, bindings: &[Binding], code: ErrorCode, needles: &[&str]) {
        assert_error(validate_frame(&frame, &limits).map(|()| frame.clone()), code, needles);
        for &binding in bindings {
            let payload = encode(binding, &frame).freeze();
            assert_error(decode(binding, payload, &limits), code, needles);
        }
    }

    fn send_to(address: &[u8]) -> Frame {
        Frame::Send(Send { seq: 1, address: Bytes::copy_from_slice(address), ..Send::default() })
    }

    fn send_with(change: impl FnOnce(&mut Properties)) -> Frame {
        let Frame::Send(mut send) = sample(FrameKind::Send) else { unreachable!() };
        change(&mut send.properties);
        Frame::Send(send)
    }

    fn header(name: &[u8], value: &[u8]) -> (Bytes, Bytes) {
        (Bytes::copy_from_slice(name), Bytes::copy_from_slice(value))
    }

    const LIMITS: CodecLimits = CodecLimits { max_address_bytes: 255, max_headers: 64, max_header_bytes: 16 * 1024 };
    const MALFORMED: ErrorCode = ErrorCode::MalformedFrame;
    const TOO_LARGE: ErrorCode = ErrorCode::TooLarge;

    #[test]
    fn address_must_not_be_empty() {
        rejected(send_to(b""), LIMITS, BOTH, MALFORMED, &["SEND", "field `address` is empty"]);
        let subscribe = Frame::Subscribe(Subscribe { subscription_id: 1, ..Subscribe::default() });
        rejected(subscribe, LIMITS, BOTH, MALFORMED, &["SUBSCRIBE", "field `address` is empty"]);
        let Frame::Message(mut message) = sample(FrameKind::Message) else { unreachable!() };
        message.address = Bytes::new();
        rejected(Frame::Message(message), LIMITS, BOTH, MALFORMED, &["MESSAGE", "`address` is empty"]);
    }

    #[test]
    fn address_length_is_bounded_by_max_address_bytes_and_by_255() {
        let at_limit = send_to(&[b'a'; 255]);
        assert_eq!(validate_frame(&at_limit, &LIMITS), Ok(()));
        rejected(
            send_to(&[b'a'; 256]),
            LIMITS,
            TEXT_ONLY,
            TOO_LARGE,
            &["SEND: field `address` is 256 bytes, over max_address_bytes 255; use a shorter"],
        );
        let small = CodecLimits { max_address_bytes: 100, ..LIMITS };
        rejected(send_to(&[b'a'; 101]), small, BOTH, TOO_LARGE, &["`address` is 101 bytes", "max_address_bytes 100"]);
        let large = CodecLimits { max_address_bytes: 1000, ..LIMITS };
        rejected(send_to(&[b'a'; 256]), large, TEXT_ONLY, TOO_LARGE, &["`address` is 256 bytes", "over 255"]);
    }

    #[test]
    fn address_must_be_utf8_without_control_characters() {
        for control in [0x00, 0x01, b'\t', 0x1f, 0x7f] {
            let bindings = if control == 0x7f || control == b'\t' { BOTH } else { BINARY_ONLY };
            rejected(
                send_to(&[b'a', control]),
                LIMITS,
                bindings,
                MALFORMED,
                &["SEND", "`address`", "control character", "at byte 1"],
            );
        }
        rejected(send_to(b"a\xff"), LIMITS, BOTH, MALFORMED, &["SEND: field `address` is not valid UTF-8"]);
        assert_eq!(validate_frame(&send_to("caf\u{e9}/\u{1f600}".as_bytes()), &LIMITS), Ok(()));
    }

    #[test]
    fn reply_to_follows_the_address_rules_when_present() {
        rejected(
            send_with(|p| p.reply_to = Bytes::from_static(b"re\x7fply")),
            LIMITS,
            BOTH,
            MALFORMED,
            &["`reply-to`", "control character"],
        );
        let small = CodecLimits { max_address_bytes: 6, ..LIMITS };
        rejected(
            send_with(|p| p.reply_to = Bytes::from_static(b"replies")),
            small,
            BOTH,
            TOO_LARGE,
            &["`reply-to` is 7 bytes", "max_address_bytes 6"],
        );
    }

    #[test]
    fn string_fields_are_utf8_without_cr_lf_nul() {
        rejected(
            send_with(|p| p.content_type = Bytes::from_static(b"text/\0")),
            LIMITS,
            BOTH,
            MALFORMED,
            &["`content-type` contains a NUL byte"],
        );
        rejected(
            send_with(|p| p.correlation_id = Bytes::from_static(b"\xc3")),
            LIMITS,
            BOTH,
            MALFORMED,
            &["`correlation-id` is not valid UTF-8"],
        );
        rejected(
            send_with(|p| p.content_type = Bytes::from(vec![b'a'; 256])),
            LIMITS,
            TEXT_ONLY,
            TOO_LARGE,
            &["`content-type` is 256 bytes, over 255"],
        );
        let open = Frame::Open(Open { login: Bytes::from_static(b"al\rice"), ..Open::default() });
        rejected(
            open,
            LIMITS,
            BINARY_ONLY,
            MALFORMED,
            &["OPEN: field `login` contains a carriage return (CR) at byte 2"],
        );
        let open = Frame::Open(Open { passcode: Bytes::from(vec![b'p'; 65_536]), ..Open::default() });
        rejected(open, LIMITS, TEXT_ONLY, TOO_LARGE, &["OPEN: field `passcode` is 65536 bytes"]);
        let error =
            Frame::Error(ErrorFrame { code: 4400, reason: Bytes::from_static(b"a\nb"), ..ErrorFrame::default() });
        rejected(error, LIMITS, BINARY_ONLY, MALFORMED, &["ERROR: field `reason` contains a line feed (LF)"]);
    }

    #[test]
    fn application_header_names_are_x_dash_lowercase() {
        for (name, bindings) in [(&b"trace"[..], BINARY_ONLY), (b"x-", BOTH), (b"X-trace", BINARY_ONLY)] {
            let frame = send_with(|p| p.headers.push(header(name, b"v")));
            rejected(
                frame,
                LIMITS,
                bindings,
                MALFORMED,
                &["SEND: application header name", "names are `x-` followed by"],
            );
        }
        for (name, bad) in
            [(&b"x-Trace"[..], "'T' at byte 2"), (b"x-tr ace", "' ' at byte 4"), (b"x-a/b", "'/' at byte 3")]
        {
            let frame = send_with(|p| p.headers.push(header(name, b"v")));
            rejected(frame, LIMITS, BOTH, MALFORMED, &["application header name", bad]);
        }
        let ok = send_with(|p| p.headers.push(header(b"x-a.b_c-9", b"")));
        assert_eq!(validate_frame(&ok, &LIMITS), Ok(()));
    }

    #[test]
    fn application_header_values_are_utf8_without_cr_lf_nul() {
        rejected(
            send_with(|p| p.headers.push(header(b"x-v", b"a\nb"))),
            LIMITS,
            BINARY_ONLY,
            MALFORMED,
            &["field `x-v` contains a line feed (LF)"],
        );
        rejected(
            send_with(|p| p.headers.push(header(b"x-v", b"a\rb"))),
            LIMITS,
            BINARY_ONLY,
            MALFORMED,
            &["field `x-v` contains a carriage return"],
        );
        rejected(
            send_with(|p| p.headers.push(header(b"x-v", b"a\0b"))),
            LIMITS,
            BOTH,
            MALFORMED,
            &["field `x-v` contains a NUL byte"],
        );
        rejected(
            send_with(|p| p.headers.push(header(b"x-v", b"\xff"))),
            LIMITS,
            BOTH,
            MALFORMED,
            &["field `x-v` is not valid UTF-8"],
        );
    }

    #[test]
    fn header_count_is_bounded_by_max_headers() {
        let many = |count: usize| {
            send_with(|p| p.headers = (0..count).map(|i| header(format!("x-h{i}").as_bytes(), b"v")).collect())
        };
        assert_eq!(validate_frame(&many(64), &LIMITS), Ok(()));
        rejected(many(65), LIMITS, BOTH, TOO_LARGE, &["SEND: too many application headers, over max_headers 64"]);
        let huge = CodecLimits { max_headers: 1000, max_header_bytes: usize::MAX, ..LIMITS };
        assert_eq!(validate_frame(&many(255), &huge), Ok(()));
        rejected(many(256), huge, TEXT_ONLY, TOO_LARGE, &["SEND: too many application headers, over 255"]);
    }

    #[test]
    fn header_bytes_are_bounded_by_max_header_bytes() {
        // The sample carries content-type (16) + x-trace (7) + abc123 (6) = 29 bytes.
        let limits = CodecLimits { max_header_bytes: 29, ..LIMITS };
        assert_eq!(validate_frame(&sample(FrameKind::Send), &limits), Ok(()));
        let limits = CodecLimits { max_header_bytes: 28, ..LIMITS };
        rejected(
            sample(FrameKind::Send),
            limits,
            BOTH,
            TOO_LARGE,
            &["SEND: properties and application headers are 29 bytes, over max_header_bytes 28"],
        );
        rejected(sample(FrameKind::Message), limits, BOTH, TOO_LARGE, &["MESSAGE", "max_header_bytes 28"]);
    }

    #[test]
    fn subscription_ids_start_at_one() {
        let frames = [
            Frame::Subscribe(Subscribe {
                subscription_id: 0,
                address: Bytes::from_static(b"a"),
                ..Subscribe::default()
            }),
            Frame::Subscribed(Subscribed { subscription_id: 0 }),
            Frame::Unsubscribe(Unsubscribe { subscription_id: 0 }),
            Frame::Flow(Flow { subscription_id: 0, credit: 1 }),
            Frame::Message(Message {
                subscription_id: 0,
                delivery_seq: 1,
                address: Bytes::from_static(b"a"),
                ..Message::default()
            }),
        ];
        for frame in frames {
            let kind = frame.kind().name();
            rejected(frame, LIMITS, BOTH, MALFORMED, &[kind, "field `subscription-id` is 0"]);
        }
        let error = Frame::Error(ErrorFrame { code: 4400, subscription_id: 0, ..ErrorFrame::default() });
        assert_eq!(validate_frame(&error, &LIMITS), Ok(()), "0 means none in ERROR");
    }

    #[test]
    fn sequences_start_at_one() {
        let frames = [
            Frame::Message(Message {
                subscription_id: 1,
                delivery_seq: 0,
                address: Bytes::from_static(b"a"),
                ..Message::default()
            }),
            Frame::Ack(Ack { delivery_seq: 0, cumulative: true }),
            Frame::Nack(Nack { delivery_seq: 0, requeue: true }),
        ];
        for frame in frames {
            let kind = frame.kind().name();
            rejected(frame, LIMITS, BOTH, MALFORMED, &[kind, "field `delivery-seq` is 0"]);
        }
        rejected(Frame::Receipt(Receipt { seq: 0 }), LIMITS, BOTH, MALFORMED, &["RECEIPT: field `seq` is 0"]);
        assert_eq!(validate_frame(&send_to(b"a"), &LIMITS), Ok(()));
        assert_eq!(
            validate_frame(
                &Frame::Send(Send { seq: 0, address: Bytes::from_static(b"a"), ..Send::default() }),
                &LIMITS
            ),
            Ok(()),
            "SEND seq 0: no receipt wanted"
        );
    }

    #[test]
    fn opened_names_its_session() {
        let Frame::Opened(mut opened) = sample(FrameKind::Opened) else { unreachable!() };
        opened.session_id = Bytes::new();
        rejected(Frame::Opened(opened), LIMITS, BINARY_ONLY, MALFORMED, &["OPENED: field `session-id` is empty"]);
    }

    #[test]
    fn version_must_be_the_protocol_version() {
        for version in [0, 2] {
            let open = Frame::Open(Open { version, ..Open::default() });
            assert_error(validate_frame(&open, &LIMITS).map(|()| open.clone()), MALFORMED, &["OPEN: field `version`"]);
            let payload = encode(Binding::Text, &open).freeze();
            assert_error(
                decode(Binding::Text, payload, &LIMITS),
                MALFORMED,
                &[&format!("OPEN: field `version` is {version}; this implementation speaks only MBWS version 1")],
            );
            let payload = encode(Binding::Binary, &open).freeze();
            assert_error(
                decode(Binding::Binary, payload, &LIMITS),
                MALFORMED,
                &[&format!("version {version} in byte 0")],
            );
        }
    }

    #[test]
    fn error_codes_are_private_use_close_codes() {
        for code in [0, 1000, 3999, 5000] {
            let error = Frame::Error(ErrorFrame { code, ..ErrorFrame::default() });
            rejected(error, LIMITS, BOTH, MALFORMED, &[&format!("ERROR: field `code` is {code}, outside 4000..=4999")]);
        }
        for code in ErrorCode::ALL {
            let error = Frame::Error(ErrorFrame { code: code.as_u16(), ..ErrorFrame::default() });
            assert_eq!(validate_frame(&error, &LIMITS), Ok(()), "{code}");
        }
    }

    #[test]
    fn excerpts_are_short_and_escaped() {
        assert_eq!(excerpt(b"a\nb\r\0"), "a\\nb\\r\\0");
        assert_eq!(excerpt(&[b'x'; 100]), format!("{}...", "x".repeat(40)));
        assert_eq!(excerpt(b"\xff"), "\u{fffd}");
    }

    /// Lengths around every word boundary of the one-pass checks (3 and 4, 7 to 9, 15 to 17...).
    const FAST_PATH_LENGTHS: std::ops::RangeInclusive<usize> = 1..=33;

    /// `length` bytes of `filler` with `insert` written over them from `position` on.
    fn with_bytes_at(length: usize, filler: u8, position: usize, insert: &[u8]) -> Vec<u8> {
        let mut bytes = vec![filler; length.max(position + insert.len())];
        bytes[position..position + insert.len()].copy_from_slice(insert);
        bytes
    }

    #[test]
    fn a_forbidden_byte_is_found_at_every_position_of_a_value() {
        for length in FAST_PATH_LENGTHS {
            for position in 0..length {
                for (byte, name) in [(b'\r', "a carriage return (CR)"), (b'\n', "a line feed (LF)"), (0, "a NUL byte")]
                {
                    let value = with_bytes_at(length, b'v', position, &[byte]);
                    assert_error(
                        check_value(FrameKind::Send, "content-type", &value, 255).map(|()| sample(FrameKind::Send)),
                        MALFORMED,
                        &[&format!("SEND: field `content-type` contains {name} at byte {position}")],
                    );
                }
            }
        }
    }

    #[test]
    fn a_control_byte_is_found_at_every_position_of_an_address() {
        for length in FAST_PATH_LENGTHS {
            for position in 0..length {
                for byte in [0x00, 0x09, 0x1f, 0x7f] {
                    let address = with_bytes_at(length, b'a', position, &[byte]);
                    assert_error(
                        check_address(FrameKind::Send, "address", &address, &LIMITS).map(|()| sample(FrameKind::Send)),
                        MALFORMED,
                        &["SEND: field `address` contains", &format!("at byte {position}; addresses may not")],
                    );
                }
                // The bytes next to the forbidden ranges are allowed.
                for byte in [0x20, 0x7e] {
                    let address = with_bytes_at(length, b'a', position, &[byte]);
                    assert_eq!(check_address(FrameKind::Send, "address", &address, &LIMITS), Ok(()));
                }
            }
        }
    }

    #[test]
    fn non_ascii_at_every_position_falls_back_to_full_utf8_validation() {
        let text_field = |bytes: &[u8]| check_value(FrameKind::Send, "correlation-id", bytes, 255);
        let address_field = |bytes: &[u8]| check_address(FrameKind::Send, "address", bytes, &LIMITS);
        for length in FAST_PATH_LENGTHS {
            for position in 0..length {
                // Valid UTF-8 of 2, 3 and 4 bytes is accepted wherever it starts.
                for character in ["\u{e9}", "\u{20ac}", "\u{1f600}"] {
                    let bytes = with_bytes_at(length, b'a', position, character.as_bytes());
                    assert_eq!(text_field(&bytes), Ok(()), "{character} at {position} of {length}");
                    assert_eq!(address_field(&bytes), Ok(()), "{character} at {position} of {length}");
                }
                // Invalid: a stray continuation byte, a byte never in UTF-8, a cut sequence.
                for invalid in [&b"\x80"[..], b"\xff", b"\xe2\x82"] {
                    let bytes = with_bytes_at(length, b'a', position, invalid);
                    let reason = format!("is not valid UTF-8 (invalid byte at offset {position})");
                    assert_error(text_field(&bytes).map(|()| sample(FrameKind::Send)), MALFORMED, &[&reason]);
                    assert_error(address_field(&bytes).map(|()| sample(FrameKind::Send)), MALFORMED, &[&reason]);
                }
            }
        }
    }

    #[test]
    fn invalid_utf8_after_an_ascii_run_is_refused_at_word_boundaries() {
        for ascii_run in [6, 7, 8, 9, 15, 16, 17] {
            for tail in [&b"\xc3"[..], b"\xc3\x28", b"\xf0\x9f\x98"] {
                let mut value = vec![b'a'; ascii_run];
                value.extend_from_slice(tail);
                assert_error(
                    check_value(FrameKind::Send, "x-v", &value, MAX_STR16).map(|()| sample(FrameKind::Send)),
                    MALFORMED,
                    &[&format!("field `x-v` is not valid UTF-8 (invalid byte at offset {ascii_run})")],
                );
            }
        }
    }

    #[test]
    fn header_names_are_checked_at_every_position() {
        for length in 3..=33 {
            let name = with_bytes_at(length, b'a', 0, b"x-");
            assert_eq!(check_header_name(FrameKind::Send, &name), Ok(()));
            for position in 2..length {
                for byte in [b'A', b'/', b':', 0x80, 0xff] {
                    let name = with_bytes_at(length, b'a', position, &[byte]);
                    let name = [&b"x-"[..], &name[2..]].concat();
                    assert_error(
                        check_header_name(FrameKind::Send, &name).map(|()| sample(FrameKind::Send)),
                        MALFORMED,
                        &[&format!("at byte {position}; names are `x-`")],
                    );
                }
            }
        }
    }

    const MAX_STR16: usize = 65_535;

    /// Inputs rich in the bytes the rules care about, at lengths around the word boundaries.
    fn field_bytes() -> impl Strategy<Value = Vec<u8>> {
        let byte = prop_oneof![
            4 => b'a'..=b'z',
            1 => Just(b'\r'),
            1 => Just(b'\n'),
            1 => Just(0u8),
            1 => Just(0x1f_u8),
            1 => Just(0x7f_u8),
            1 => Just(b'-'),
            2 => 0x80_u8..=0xff,
            2 => any::<u8>(),
        ];
        prop_oneof![proptest::collection::vec(byte, 0..40), "\\PC{0,12}".prop_map(String::into_bytes),]
    }

    proptest! {
        /// The one-pass checks only ever decide what the full rules would: same answer, same
        /// error, for every input.
        #[test]
        fn one_pass_checks_agree_with_the_full_rules(bytes in field_bytes(), max_bytes in 0usize..40) {
            let kind = FrameKind::Message;
            prop_assert_eq!(
                check_value(kind, "reason", &bytes, max_bytes),
                check_value_fully(kind, "reason", &bytes, max_bytes)
            );
            let limits = CodecLimits { max_address_bytes: max_bytes, ..LIMITS };
            prop_assert_eq!(
                check_address(kind, "reply-to", &bytes, &limits),
                check_address_fully(kind, "reply-to", &bytes, &limits)
            );
            let name = [&b"x-"[..], &bytes].concat();
            prop_assert_eq!(check_header_name(kind, &name), check_header_name_fully(kind, &name));
            prop_assert_eq!(check_header_name(kind, &bytes), check_header_name_fully(kind, &bytes));
        }
    }
}
