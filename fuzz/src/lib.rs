//! What each fuzz target checks, one function per target (`fuzz_targets/<name>.rs` only calls
//! it). Every function takes arbitrary bytes and panics only when a property is broken:
//! - never a panic inside the code under test, whatever the input;
//! - where one exists, a property beyond that: encode then decode is the identity for the
//!   codecs, feeding bytes in pieces decides exactly what feeding them at once decides, a
//!   repaired log recovers the same again.
//!
//! This file depends only on `mbws`, `mbws-proto` and `bytes`, so that the broker's test
//! `tests/fuzz_regressions.rs` includes it (`#[path]`) and replays every kept crash input and
//! every seed under plain `cargo test`, with exactly these checks.

use std::path::{Path, PathBuf};

use bytes::{Bytes, BytesMut};
use mbws::auth::credentials::{self, Credentials, UpgradeCredentials};
use mbws::ids::ShardId;
use mbws::mbws::{self as proto, Binding, CodecLimits, Frame};
use mbws::store::record::{self, Record, SegmentHeader, FORMAT_VERSION, RECORD_HEADER_BYTES, SEGMENT_HEADER_BYTES};
use mbws::store::{self, LogConfig, RecoveryMode};
use mbws::tls::records as tls_records;
use mbws::ws::frame::{apply_mask, encode_frame};
use mbws::ws::handshake::{self, HttpRequest};
use mbws::ws::message::{close_payload, Decoder, WsEvent};
use mbws::ws::{OpCode, Role, WsError};

/// A target's check: panics when a property is broken.
pub type Check = fn(&[u8]);

/// The targets, by the name of their directory under fuzz/corpus/ and tests/fuzz-regressions/.
pub const TARGETS: &[(&str, Check)] = &[
    ("http_upgrade", http_upgrade),
    ("websocket", websocket),
    ("mbws_binary", mbws_binary),
    ("mbws_text", mbws_text),
    ("log_record", log_record),
    ("log_recovery", log_recovery),
    ("auth", auth),
    ("jwt", jwt),
    ("tls_records", tls_records),
];

/// The broker's bound on an upgrade request head (admin and WebSocket listeners use 8 KiB).
const MAX_REQUEST_BYTES: usize = 8 * 1024;

/// Reads structure out of fuzz input; past the end it yields zeros and empty slices, so every
/// input means something.
struct Input<'a> {
    bytes: &'a [u8],
}

impl<'a> Input<'a> {
    fn new(bytes: &'a [u8]) -> Input<'a> {
        Input { bytes }
    }

    fn byte(&mut self) -> u8 {
        self.take(1).first().copied().unwrap_or(0)
    }

    fn u64(&mut self) -> u64 {
        let mut word = [0u8; 8];
        let taken = self.take(8);
        word[..taken.len()].copy_from_slice(taken);
        u64::from_be_bytes(word)
    }

    fn take(&mut self, count: usize) -> &'a [u8] {
        let (taken, rest) = self.bytes.split_at(count.min(self.bytes.len()));
        self.bytes = rest;
        taken
    }

    /// A piece whose length is the next byte.
    fn piece(&mut self) -> &'a [u8] {
        let length = self.byte() as usize;
        self.take(length)
    }

    fn text(&mut self) -> String {
        String::from_utf8_lossy(self.piece()).into_owned()
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.bytes)
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP upgrade

/// The upgrade request parser and validation, as the broker runs them on the first bytes of a
/// connection. Properties: a complete head is decided on its own bytes and is still incomplete
/// one byte short (nothing is decided before the blank line); an accepted upgrade's 101 response
/// parses and verifies as a client would; every refusal is a well-formed HTTP response.
pub fn http_upgrade(data: &[u8]) {
    let _ = handshake::parse_response(data, MAX_REQUEST_BYTES);
    match handshake::parse_request(data, MAX_REQUEST_BYTES) {
        Ok(None) => assert!(data.len() < MAX_REQUEST_BYTES, "no decision on {} bytes", data.len()),
        Err(error) => check_refusal(&error),
        Ok(Some((request, consumed))) => {
            assert!(consumed <= data.len() && consumed <= MAX_REQUEST_BYTES);
            let again = handshake::parse_request(&data[..consumed], MAX_REQUEST_BYTES);
            assert_eq!(again, Ok(Some((request.clone(), consumed))), "the head alone must parse the same");
            let short = handshake::parse_request(&data[..consumed - 1], MAX_REQUEST_BYTES);
            assert_eq!(short, Ok(None), "one byte short of its blank line, a head is incomplete");
            let upgrade_credentials = UpgradeCredentials::from_request(&request);
            let _ = credentials::credentials(&proto::Open::default(), &upgrade_credentials);
            match handshake::validate_upgrade::<proto::Subprotocol>(&request) {
                Err(error) => check_refusal(&error),
                Ok(upgrade) => {
                    let response = handshake::accept_response(&upgrade);
                    let parsed = handshake::parse_response(&response, response.len() + 1);
                    let Ok(Some((parsed, length))) = parsed else {
                        panic!("101 response does not parse: {parsed:?}");
                    };
                    assert_eq!((parsed.status, length), (101, response.len()));
                    let verified = handshake::verify_accept::<proto::Subprotocol>(&parsed, &upgrade.key);
                    assert_eq!(verified, Ok(Some(upgrade.protocol)), "the client must accept our 101");
                }
            }
        }
    }
}

/// A refusal is sent as an HTTP response: it must parse, with its own status.
fn check_refusal(error: &handshake::HandshakeError) {
    let response = error.response();
    match handshake::parse_response(&response, response.len() + 1) {
        Ok(Some((parsed, _))) => assert_eq!(parsed.status, error.status),
        other => panic!("refusal {error} is not a well-formed response: {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// WebSocket frames and messages

const WS_MAX_FRAME_BYTES: usize = 4096;
const WS_MAX_MESSAGE_BYTES: usize = 16 * 1024;

/// The frame decoder and message assembly. The first byte chooses:
/// - even: the rest is raw wire bytes, decoded once whole and once fed in pieces (sizes from
///   the input); both must give the same events and the same error;
/// - odd: the rest describes messages (text or binary, fragmented at chosen points, masked
///   with chosen keys, pings and pongs between fragments, a close at the end), which are
///   encoded and decoded: every message and control frame must come back intact, in order.
pub fn websocket(data: &[u8]) {
    let mut input = Input::new(data);
    let mode = input.byte();
    let role = if mode & 2 == 0 { Role::Server } else { Role::Client };
    if mode & 1 == 0 {
        websocket_raw(role, &mut input);
    } else {
        websocket_messages(role, &mut input);
    }
    let mut masked = data.to_vec();
    let mask = [0x37, 0xfa, 0x21, mode];
    apply_mask(&mut masked, mask);
    apply_mask(&mut masked, mask);
    assert_eq!(masked, data, "masking twice is the identity");
}

type Events = (Vec<WsEvent>, Option<WsError>);

fn websocket_raw(role: Role, input: &mut Input<'_>) {
    let piece_sizes = input.piece().to_vec();
    let wire = input.rest();
    let whole = decode_events(role, &[wire]);
    let mut pieces = Vec::new();
    let mut rest = wire;
    for size in piece_sizes.iter().cycle().take(if piece_sizes.is_empty() { 0 } else { wire.len() }) {
        if rest.is_empty() {
            break;
        }
        let (piece, after) = rest.split_at((*size as usize).min(rest.len()));
        pieces.push(piece);
        rest = after;
    }
    pieces.push(rest);
    assert_eq!(decode_events(role, &pieces), whole, "pieces and whole input must decode alike");
}

/// Decodes the concatenation of `pieces`, appending one piece at a time to the read buffer and
/// taking every event it completes, as the connection's read loop does.
fn decode_events(role: Role, pieces: &[&[u8]]) -> Events {
    let mut decoder = Decoder::new(role, WS_MAX_FRAME_BYTES, WS_MAX_MESSAGE_BYTES);
    let mut buf = BytesMut::new();
    let mut events = Vec::new();
    for piece in pieces {
        buf.extend_from_slice(piece);
        loop {
            match decoder.next_event(&mut buf) {
                Ok(Some(event)) => events.push(event),
                Ok(None) => break,
                Err(error) => {
                    assert!(decoder.is_finished());
                    return (events, Some(error));
                }
            }
        }
    }
    (events, None)
}

fn websocket_messages(role: Role, input: &mut Input<'_>) {
    // What the peer of `role` sends: masked frames to a server, unmasked ones to a client.
    let mut wire = BytesMut::new();
    let mut expected = Vec::new();
    let mask = |input: &mut Input<'_>| match role {
        Role::Server => Some([input.byte(), input.byte(), input.byte(), input.byte()]),
        Role::Client => None,
    };
    let message_count = input.byte() % 8;
    for _ in 0..message_count {
        let flags = input.byte();
        let text = flags & 1 == 1;
        let payload = input.piece();
        let payload: Vec<u8> =
            if text { String::from_utf8_lossy(payload).into_owned().into_bytes() } else { payload.to_vec() };
        let payload = &payload[..payload.len().min(WS_MAX_FRAME_BYTES)];
        // Cut anywhere, also inside a UTF-8 sequence: assembly validates across fragments.
        let mut cuts: Vec<usize> =
            input.piece().iter().map(|&cut| cut as usize % (payload.len() + 1)).take(6).collect();
        cuts.sort_unstable();
        cuts.push(payload.len());
        let mut start = 0;
        for (index, &end) in cuts.iter().enumerate() {
            let first = index == 0;
            let last = index + 1 == cuts.len();
            let opcode = match (first, text) {
                (false, _) => OpCode::Continuation,
                (true, true) => OpCode::Text,
                (true, false) => OpCode::Binary,
            };
            wire.extend_from_slice(&encode_frame(last, opcode, &payload[start..end], mask(input)));
            start = end;
            if !last && input.byte() & 3 == 0 {
                let control = input.piece();
                let control = &control[..control.len().min(125)];
                let ping = flags & 2 == 0;
                let opcode = if ping { OpCode::Ping } else { OpCode::Pong };
                wire.extend_from_slice(&encode_frame(true, opcode, control, mask(input)));
                let control = Bytes::copy_from_slice(control);
                expected.push(if ping { WsEvent::Ping(control) } else { WsEvent::Pong(control) });
            }
        }
        let payload = Bytes::copy_from_slice(payload);
        expected.push(if text { WsEvent::Text(payload) } else { WsEvent::Binary(payload) });
    }
    let code = 1000 + u16::from(input.byte() % 4);
    let reason = input.text();
    let close = close_payload(code, &reason);
    wire.extend_from_slice(&encode_frame(true, OpCode::Close, &close, mask(input)));
    expected.push(WsEvent::Close(Some(mbws::ws::message::CloseFrame { code, reason: close.freeze().slice(2..) })));
    assert_eq!(decode_events(role, &[&wire]), (expected, None));
}

// ---------------------------------------------------------------------------------------------
// MBWS bindings

/// The binary binding's decoder, as the broker runs it on every binary WebSocket message.
pub fn mbws_binary(data: &[u8]) {
    mbws_codec(Binding::Binary, data);
}

/// The text binding's decoder, as the broker runs it on every text WebSocket message.
pub fn mbws_text(data: &[u8]) {
    // The broker's first read of a text message: a SEND of the common shape straight from
    // the slice. What it takes must be exactly what the full decode makes of it.
    // The broker leaves room for the payload's length: a tail never needs more.
    let mut chunk = BytesMut::with_capacity(data.len());
    let room = chunk.capacity();
    if let Some(direct) = proto::decode_plain_text_send(data, &CodecLimits::default(), &mut chunk) {
        assert_eq!(chunk.capacity(), room - direct.tail.as_bytes().len(), "the tail was split off the room left");
        match proto::decode(Binding::Text, Bytes::copy_from_slice(data), &CodecLimits::default()) {
            Ok(Frame::Send(send)) => assert_eq!(proto::binary::SendTail::encode(&send), direct),
            other => panic!("the slice decode took a text SEND that decode makes {other:?}"),
        }
    }
    mbws_codec(Binding::Text, data);
}

/// Properties: a decoded frame encodes (in either binding) to bytes that decode to the same
/// frame; a MESSAGE's borrowed-header encoding (the broker's delivery path) writes exactly the
/// whole-frame encoding; and no MESSAGE is larger than `largest_message_bytes` promises (the
/// bound the broker checks SENDs against).
fn mbws_codec(binding: Binding, data: &[u8]) {
    let limits = CodecLimits::default();
    let Ok(frame) = proto::decode(binding, Bytes::copy_from_slice(data), &limits) else {
        return;
    };
    for encode_in in [binding, other_binding(binding)] {
        let encoded = proto::encode(encode_in, &frame);
        let decoded = proto::decode(encode_in, encoded.clone().freeze(), &limits);
        assert_eq!(decoded.as_ref(), Ok(&frame), "{encode_in:?} round trip of {:?}", String::from_utf8_lossy(&encoded));
        if let Frame::Message(message) = &frame {
            let mut borrowed = BytesMut::new();
            proto::encode_message_header(encode_in, &message.header(), &mut borrowed);
            borrowed.extend_from_slice(&message.body);
            assert_eq!(borrowed, encoded, "MESSAGE header written from borrowed fields differs");
            let largest = proto::largest_message_bytes(&message.address, &message.properties, message.body.len());
            assert!(encoded.len() <= largest, "{encode_in:?} MESSAGE of {} bytes > bound {largest}", encoded.len());
        }
    }
}

fn other_binding(binding: Binding) -> Binding {
    match binding {
        Binding::Binary => Binding::Text,
        Binding::Text => Binding::Binary,
    }
}

// ---------------------------------------------------------------------------------------------
// Durable log

/// One record: salt (8 bytes), file offset (8), a flag byte, then the record's bytes. With
/// the flag's low bit set the record's checksum is computed and filled in first, so the
/// payload parser is reached (random bytes almost never pass a CRC32C). Property: a record
/// that decodes encodes back to exactly its bytes (the format has one encoding per record), and
/// fits the limits the writer checks.
pub fn log_record(data: &[u8]) {
    let mut input = Input::new(data);
    let salt = input.u64();
    let offset = input.u64();
    let seal = input.byte() & 1 == 1;
    let mut bytes = input.rest().to_vec();
    if seal {
        seal_record(&mut bytes, salt, offset);
    }
    if let Ok((decoded, length)) = record::decode(&bytes, salt, offset) {
        assert!(record::check_fits(&decoded).is_ok(), "a decoded record must fit the writer's limits");
        assert_eq!(record::encoded_len(&decoded), length);
        let mut encoded = Vec::new();
        record::encode(&mut encoded, &decoded, salt, offset);
        assert_eq!(encoded, bytes[..length], "re-encoding {decoded:?}");
    }
    if let Ok(header) = SegmentHeader::decode(&bytes) {
        assert_eq!(header.encode(), bytes[..SEGMENT_HEADER_BYTES]);
    }
}

/// Fills in the checksum of the record at the start of `bytes` (if its length field fits).
/// Returns the record's total length.
fn seal_record(bytes: &mut [u8], salt: u64, file_offset: u64) -> Option<usize> {
    let length = u32::from_be_bytes(bytes.get(0..4)?.try_into().ok()?) as usize;
    let total = RECORD_HEADER_BYTES.checked_add(length)?;
    if length == 0 || bytes.len() < total {
        return None;
    }
    let checksum = record::record_checksum(salt, file_offset, &bytes[0..4], &bytes[RECORD_HEADER_BYTES..total]);
    bytes[4..8].copy_from_slice(&checksum.to_be_bytes());
    Some(total)
}

/// Recovery over a directory of arbitrary segment bytes, as a broker starting on a damaged
/// disk meets it. Input: a flag byte, a salt (8 bytes), a split point (1 byte), then segment
/// bytes. Flags: 1 = write a valid segment header before the bytes; 2 = seal every record (walk
/// the length fields and fill in checksums); 4 = skip-corrupt recovery (else strict); 8 = split
/// the bytes into two segments. `open` must return, never panic; when it succeeds, opening
/// the same directory again must succeed in strict mode and recover the same messages (the
/// first open repaired or truncated everything it reported).
pub fn log_recovery(data: &[u8]) {
    let mut input = Input::new(data);
    let flags = input.byte();
    let salt = input.u64();
    let split = input.byte() as usize;
    let bytes = input.rest();
    let segments: Vec<&[u8]> = if flags & 8 != 0 {
        vec![&bytes[..split.min(bytes.len())], &bytes[split.min(bytes.len())..]]
    } else {
        vec![bytes]
    };
    let dir = scratch_dir();
    let shard_dir = store::shard_dir(&dir, ShardId(0));
    std::fs::create_dir_all(&shard_dir).expect("creating the scratch directory");
    for (index, segment_bytes) in segments.iter().enumerate() {
        let number = index as u64 + 1;
        let mut file = Vec::new();
        if flags & 1 != 0 {
            let header = SegmentHeader { version: FORMAT_VERSION, shard: 0, segment: number, salt: salt ^ number };
            file.extend_from_slice(&header.encode());
        }
        file.extend_from_slice(segment_bytes);
        if flags & 2 != 0 {
            let mut offset = SEGMENT_HEADER_BYTES;
            while let Some(length) =
                file.get_mut(offset..).and_then(|rest| seal_record(rest, salt ^ number, offset as u64))
            {
                offset += length;
            }
        }
        let path = store::segment_path(&shard_dir, store::SegmentId(number));
        std::fs::write(&path, &file).expect("writing a segment");
    }
    let mut config = LogConfig::new(&dir);
    config.segment_bytes = store::MIN_SEGMENT_BYTES;
    config.recovery = if flags & 4 != 0 { RecoveryMode::SkipCorrupt } else { RecoveryMode::Strict };
    if let Ok((log, recovery)) = store::open(config.clone(), ShardId(0)) {
        drop(log);
        config.recovery = RecoveryMode::Strict;
        match store::open(config, ShardId(0)) {
            Ok((_, again)) => {
                assert_eq!(again.messages, recovery.messages, "a second recovery recovers the same messages");
                assert_eq!(again.last_message_id, recovery.last_message_id);
                assert_eq!(again.message_id_high_water, recovery.message_id_high_water);
            }
            Err(error) => panic!("a log that opened once must open again in strict mode: {error}"),
        }
    }
    std::fs::remove_dir_all(&dir).expect("removing the scratch directory");
}

/// A fresh directory for one run: in /dev/shm when there is one (recovery syncs files, which
/// costs nothing there), named after the process and a per-process count, so that parallel
/// fuzzers, and the tests of one `cargo test` process running on several threads, do not meet.
fn scratch_dir() -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static RUNS: AtomicU64 = AtomicU64::new(0);
    let base = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
    let run = RUNS.fetch_add(1, Ordering::Relaxed);
    let dir = base.join(format!("mbws-fuzz-recovery-{}-{run}", std::process::id()));
    if dir.exists() {
        std::fs::remove_dir_all(&dir).expect("removing a stale scratch directory");
    }
    dir
}

// ---------------------------------------------------------------------------------------------
// Authentication inputs

/// Where the broker reads credentials: the `Authorization` header (Basic, Bearer), the `token`
/// query parameter, the OPEN frame's login and passcode. Input: flags, then pieces: header
/// value, request target, login, passcode, then a user, password and token for the round trips.
/// Properties: arbitrary inputs give credentials or an error, never a panic; Basic, Bearer and
/// a percent-encoded query token round-trip exactly; base64 round-trips; `Debug` of credentials
/// never shows the secret.
pub fn auth(data: &[u8]) {
    let mut input = Input::new(data);
    let flags = input.byte();
    let authorization = input.text();
    let target = input.text();
    let login = Bytes::copy_from_slice(input.piece());
    let passcode = Bytes::copy_from_slice(input.piece());
    let mut headers = vec![("Host".to_owned(), "x".to_owned())];
    for _ in 0..(flags & 3) {
        headers.push(("Authorization".to_owned(), authorization.clone()));
    }
    let request = HttpRequest { method: "GET".into(), path: target, headers };
    let open = proto::Open { login, passcode, ..Default::default() };
    let upgrade = UpgradeCredentials::from_request(&request);
    let _ = format!("{upgrade:?}");
    if let Ok(given) = credentials::credentials(&open, &upgrade) {
        check_redacted(&given);
    }
    if let Ok(given) = credentials::parse_authorization(&authorization) {
        check_redacted(&given);
    }

    let user = input.text().replace(':', "");
    let password = input.text();
    let basic = format!("Basic {}", handshake::base64_encode(format!("{user}:{password}").as_bytes()));
    let expected = Credentials::Password { user: user.clone(), password: password.clone() };
    if basic.len() <= credentials::MAX_CREDENTIAL_BYTES {
        assert_eq!(credentials::parse_authorization(&basic), Ok(expected));
    }
    let token = input.text().trim().to_owned();
    if !token.is_empty() {
        let bearer = format!("{} {token}", if flags & 4 == 0 { "Bearer" } else { "bEaReR" });
        assert_eq!(credentials::parse_authorization(&bearer), Ok(Credentials::Token(token.clone())));
        let encoded: String = token.bytes().map(|byte| format!("%{byte:02X}")).collect();
        if encoded.len() <= credentials::MAX_CREDENTIAL_BYTES {
            let request = HttpRequest { method: "GET".into(), path: format!("/?a=b&token={encoded}"), headers: vec![] };
            let given = credentials::credentials(&proto::Open::default(), &UpgradeCredentials::from_request(&request));
            assert_eq!(given, Ok(Credentials::Token(token)));
        }
    }
    let raw = input.rest();
    assert_eq!(handshake::base64_decode(&handshake::base64_encode(raw)).as_deref(), Some(raw));
}

/// `Debug` of credentials (what a log line or a panic message could show) never shows the
/// secret. A secret of 3 bytes or fewer, or one that is part of the redacted text itself,
/// cannot be told apart from that text and is not checked.
fn check_redacted(given: &Credentials) {
    let shown = format!("{given:?}");
    let secret = match given {
        Credentials::Anonymous => return,
        Credentials::Password { password, .. } => password,
        Credentials::Token(token) => token,
    };
    if secret.len() > 3 && !"Password(<redacted>)Token(<redacted>)".contains(secret.as_str()) {
        assert!(!shown.contains(secret.as_str()), "Debug shows the secret: {shown}");
    }
}

// ---------------------------------------------------------------------------------------------
// TLS records

/// The records `next_record` finds walking `data` from its start, and the refusal that stopped
/// the walk, if any.
fn walk_records(data: &[u8]) -> (Vec<(tls_records::Header, usize)>, Option<tls_records::Fatal>) {
    let (mut found, mut offset) = (Vec::new(), 0);
    loop {
        match tls_records::next_record(&data[offset..]) {
            Ok(Some((header, payload))) => {
                assert_eq!(payload.start, tls_records::HEADER_BYTES, "the payload follows the header");
                assert_eq!(payload.len(), header.len, "the payload is as long as the header says");
                assert!(header.len <= tls_records::MAX_CIPHERTEXT_BYTES, "a record within the limit");
                assert!(offset + payload.end <= data.len(), "a record inside the input");
                offset += payload.end;
                found.push((header, offset));
            }
            Ok(None) => return (found, None),
            Err(fatal) => return (found, Some(fatal)),
        }
    }
}

/// Target `tls_records`: the record parser of the in-place TLS record layer
/// (`mbws::tls::records`) on arbitrary ciphertext. Never a panic; every record lies inside the
/// input, within 2^14 + 256 bytes; and a stream cut anywhere yields a prefix of what the whole
/// stream yields (the parser waits for the rest of a record rather than misread it), with a
/// refusal only where the whole stream has the same one. Then the layer's sealer on the same
/// bytes as plaintext: the input's first byte picks TLS 1.3 or 1.2 and AES-256-GCM or
/// ChaCha20-Poly1305, its next eight the sequence number and one more the content type; the
/// record sealed in place opens with rustls's own decrypter to exactly that plaintext
/// (`seal_and_open_with_rustls`); and the other way round, the record rustls's own encrypter
/// seals opens with the layer's opener, its plaintext moved toward the front by 3 times the
/// next byte, and fails to open when damaged, cut or at another sequence number
/// (`seal_with_rustls_and_open`).
pub fn tls_records(data: &[u8]) {
    tls_records_parsed(data);
    let mut input = Input::new(data);
    let flags = input.byte();
    // Below the layer's own sequence limit, which it never seals at.
    let seq = input.u64() % 0xffff_ffff_ffff_0000;
    let typ = [21, 22, 23][usize::from(input.byte() % 3)];
    let shift = usize::from(input.byte()) * 3;
    let plaintext = input.take(tls_records::MAX_PLAINTEXT_BYTES);
    tls_records::seal_and_open_with_rustls(flags & 1 == 1, flags & 2 == 2, seq, typ, plaintext);
    tls_records::seal_with_rustls_and_open(flags & 1 == 1, flags & 2 == 2, seq, typ, plaintext, shift);
}

fn tls_records_parsed(data: &[u8]) {
    let (whole, whole_refusal) = walk_records(data);
    for cut in [data.len() / 3, data.len() / 2, data.len().saturating_sub(1)] {
        let (part, refusal) = walk_records(&data[..cut]);
        assert!(whole.starts_with(&part), "cut at {cut}: the records differ from the whole stream's");
        if refusal.is_some() {
            assert_eq!(part.len(), whole.len(), "cut at {cut}: a refusal the whole stream does not have");
            assert_eq!(refusal, whole_refusal, "cut at {cut}: another refusal than the whole stream's");
        }
    }
}

fn tls_record_seeds() -> Vec<Vec<u8>> {
    let record = |typ: u8, len: usize| {
        let mut bytes = vec![typ, 3, 3, (len >> 8) as u8, len as u8];
        bytes.extend(std::iter::repeat_n(0xa5, len));
        bytes
    };
    vec![
        record(23, 40),
        [record(23, 0), record(21, 2), record(22, 5), record(23, 300)].concat(),
        record(23, tls_records::MAX_CIPHERTEXT_BYTES),
        record(23, 100)[..50].to_vec(),
    ]
}

// ---------------------------------------------------------------------------------------------
// Seeds

/// Valid inputs per target, from which the fuzzers start (`fuzz/corpus/<target>/seed-*` are
/// these, written by `cargo test --test fuzz_regressions write_seeds -- --ignored`).
pub fn seeds(target: &str) -> Vec<Vec<u8>> {
    match target {
        "http_upgrade" => http_seeds(),
        "websocket" => websocket_seeds(),
        "mbws_binary" => frames().iter().map(|frame| proto::encode(Binding::Binary, frame).to_vec()).collect(),
        "mbws_text" => frames().iter().map(|frame| proto::encode(Binding::Text, frame).to_vec()).collect(),
        "log_record" => log_record_seeds(),
        "log_recovery" => log_recovery_seeds(),
        "auth" => auth_seeds(),
        "jwt" => jwt_seeds(),
        "tls_records" => tls_record_seeds(),
        other => panic!("no fuzz target {other}"),
    }
}

fn http_seeds() -> Vec<Vec<u8>> {
    let key = "dGhlIHNhbXBsZSBub25jZQ==";
    let mut seeds = vec![
        handshake::client_request("localhost:7878", "/", key, &["mbws.v1"]).into_bytes(),
        handshake::client_request("h", "/?token=abc%2Bd", key, &["x", "mbwsl.v1"]).into_bytes(),
        format!(
            "GET / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Protocol: mbws.v1\r\n\
             Origin: https://example.com\r\nAuthorization: Basic YWxpY2U6czNjcmV0\r\n\r\n"
        )
        .into_bytes(),
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n".to_vec(),
    ];
    seeds.push(b"POST /x HTTP/1.0\nHost: h\n\n".to_vec());
    seeds
}

fn websocket_seeds() -> Vec<Vec<u8>> {
    let mask = Some([1, 2, 3, 4]);
    let mut raw = vec![0u8, 0];
    raw.extend_from_slice(&encode_frame(false, OpCode::Text, "héllo ".as_bytes(), mask));
    raw.extend_from_slice(&encode_frame(true, OpCode::Ping, b"p", mask));
    raw.extend_from_slice(&encode_frame(true, OpCode::Continuation, "wörld".as_bytes(), mask));
    raw.extend_from_slice(&encode_frame(true, OpCode::Binary, &[0; 300], mask));
    raw.extend_from_slice(&encode_frame(true, OpCode::Close, &close_payload(1000, "bye"), mask));
    let mut client = vec![2u8, 3, 1, 7, 200];
    client.extend_from_slice(&encode_frame(true, OpCode::Binary, &[9; 70_000], None));
    // Structured: two messages, fragments with a ping between them, a close.
    let structured = vec![1, 2, 1, 5, b'h', 0xc3, 0xa9, b'l', b'o', 2, 1, 3, 9, 9, 9, 9, 0, 2, b'p', b'!', 0, 0, 0];
    vec![raw, client, structured]
}

fn frames() -> Vec<Frame> {
    let properties = proto::Properties {
        content_type: Bytes::from_static(b"application/json"),
        correlation_id: Bytes::from_static(b"c-1"),
        reply_to: Bytes::from_static(b"replies"),
        headers: vec![(Bytes::from_static(b"x-trace"), Bytes::from_static(b"abc123"))],
    };
    let body = Bytes::from_static(b"{\"order\":42}\n");
    vec![
        Frame::Open(proto::Open {
            heartbeat_ms: 30_000,
            login: Bytes::from_static(b"alice"),
            passcode: Bytes::from_static(b"s3cret"),
            session_id: Bytes::from_static(b"s-1"),
            last_received_seq: 7,
            ..Default::default()
        }),
        Frame::Send(proto::Send {
            seq: 1,
            address: Bytes::from_static(b"orders"),
            durable: true,
            ttl_ms: 5000,
            properties: properties.clone(),
            body: body.clone(),
        }),
        Frame::Subscribe(proto::Subscribe {
            subscription_id: 1,
            address: Bytes::from_static(b"orders"),
            mode: proto::DeliveryMode::Anycast,
            ack_mode: proto::AckMode::Client,
            credit: 10,
        }),
        Frame::Message(proto::Message {
            subscription_id: 1,
            delivery_seq: 1,
            message_id: 1001,
            address: Bytes::from_static(b"orders"),
            redelivered: true,
            durable: true,
            properties,
            body,
        }),
        Frame::Ack(proto::Ack { delivery_seq: 1, cumulative: true }),
        Frame::Nack(proto::Nack { delivery_seq: 2, requeue: true }),
        Frame::Flow(proto::Flow { subscription_id: 1, credit: 100 }),
        Frame::Ping(proto::Ping { token: 42 }),
        Frame::Error(proto::ErrorFrame {
            code: proto::ErrorCode::Overloaded.as_u16(),
            fatal: false,
            seq: 7,
            subscription_id: 0,
            reason: Bytes::from_static(b"address `orders` is full"),
        }),
        Frame::Close(proto::Close),
    ]
}

fn log_records() -> Vec<Record<'static>> {
    vec![
        Record::LastIds(vec![(b"orders", 41), (b"audit", 7)]),
        Record::IdReservation { reserved_up_to: 1 << 20 },
        Record::Message(record::MessageFields {
            address: b"orders",
            message_id: 42,
            expires_at_unix_ms: 0,
            content_type: b"text/plain",
            correlation_id: b"",
            reply_to: b"replies",
            headers: [(&b"x-trace"[..], &b"abc"[..])].into_iter().collect(),
            body: b"hello",
        }),
        Record::Message(record::MessageFields {
            address: b"audit",
            message_id: 8,
            expires_at_unix_ms: 1_900_000_000_000,
            content_type: b"",
            correlation_id: b"",
            reply_to: b"",
            headers: Default::default(),
            body: b"",
        }),
        Record::Settled { address: b"orders", message_id: 42 },
    ]
}

fn log_record_seeds() -> Vec<Vec<u8>> {
    let (salt, offset) = (0x5eed_u64, 32_u64);
    log_records()
        .iter()
        .map(|one| {
            let mut seed = salt.to_be_bytes().to_vec();
            seed.extend_from_slice(&offset.to_be_bytes());
            seed.push(0);
            record::encode(&mut seed, one, salt, offset);
            seed
        })
        .collect()
}

/// A segment of every record kind (flags: header, sealed), strict and skip-corrupt, whole and
/// split in two segments.
fn log_recovery_seeds() -> Vec<Vec<u8>> {
    let salt = 0x5eed_u64;
    let mut records = Vec::new();
    for one in log_records() {
        // Offsets and checksums are filled in by the target (flag 2).
        record::encode(&mut records, &one, 0, 0);
    }
    let first_two = record::encoded_len(&log_records()[0]) + record::encoded_len(&log_records()[1]);
    [1u8 | 2, 1 | 2 | 4, 1 | 2 | 8]
        .iter()
        .map(|&flags| {
            let mut seed = vec![flags];
            seed.extend_from_slice(&salt.to_be_bytes());
            seed.push(if flags & 8 != 0 { first_two as u8 } else { 0 });
            seed.extend_from_slice(&records);
            seed
        })
        .collect()
}

fn auth_seeds() -> Vec<Vec<u8>> {
    let pieces: [&[&[u8]]; 3] = [
        &[b"Basic YWxpY2U6czNjcmV0", b"/", b"", b"", b"alice", b"s3cret", b"tok-1"],
        &[b"Bearer eyJhbGciOiJIUzI1NiJ9.e30.sig", b"/?token=a%2Bb%3D&x=1", b"", b"tok", b"u", b"p:w", b" t "],
        &[b"Digest x", b"/?token=%zz", b"bob", b"pw", b"", b"", b""],
    ];
    pieces
        .iter()
        .enumerate()
        .map(|(index, pieces)| {
            let mut seed = vec![index as u8];
            for piece in pieces.iter() {
                seed.push(piece.len() as u8);
                seed.extend_from_slice(piece);
            }
            seed.extend_from_slice(b"base64 me");
            seed
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// JWT

/// The HS256 secret of the `jwt` target's verifier (the broker asks for 32 bytes or more).
const JWT_SECRET: &str = "fuzzing-secret-of-at-least-32-bytes!";
/// The time the `jwt` target verifies at (Unix ms): 2026-11-30.
const JWT_NOW_UNIX_MS: u64 = 1_796_000_000_000;

fn jwt_verifier() -> mbws::auth::jwt::JwtVerifier {
    let section = mbws::config::file::JwtSection {
        hs256_secret: Some(mbws::config::file::Secret::new(JWT_SECRET)),
        public_key_file: None,
        algorithms: Vec::new(),
        issuer: None,
        audience: None,
        leeway_secs: None,
    };
    mbws::auth::jwt::JwtVerifier::from_section(&section).expect("the fuzz verifier's section is valid")
}

/// A JWT signed with the target's secret over `claims` (any bytes: they are the payload as is).
fn signed_jwt(claims: &[u8]) -> String {
    use jsonwebtoken::crypto::sign;
    // base64url without padding, from the standard alphabet of the handshake's encoder.
    let base64 = |bytes: &[u8]| {
        mbws::ws::handshake::base64_encode(bytes).trim_end_matches('=').replace('+', "-").replace('/', "_")
    };
    let signing_input = format!("{}.{}", base64(br#"{"alg":"HS256","typ":"JWT"}"#), base64(claims));
    let key = jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes());
    let signature = sign(signing_input.as_bytes(), &key, jsonwebtoken::Algorithm::HS256).expect("HS256 signs");
    format!("{signing_input}.{signature}")
}

/// Signed bearer tokens, as the broker verifies them (`[auth.jwt]` with an HS256 secret).
/// Input: a flag byte, then either an arbitrary token (flag bit 0 clear) or claims that are
/// signed with the verifier's secret, and a position and byte that alter the signed token.
/// Properties: any token gives a grant or a refusal, never a panic; a refusal never quotes the
/// token (judged on tokens with a control character, which the refusals' own words lack); a token verifies only if its signature is the secret's (an arbitrary or altered
/// token never does); a grant never outlives `exp` plus the leeway.
pub fn jwt(data: &[u8]) {
    let mut input = Input::new(data);
    let flags = input.byte();
    let verifier = jwt_verifier();
    if flags & 1 == 0 {
        let token = input.text();
        let _ = mbws::auth::jwt::JwtVerifier::looks_like_jwt(&token);
        match verifier.verify(&token, JWT_NOW_UNIX_MS) {
            Ok(_) => panic!("an arbitrary token verified: {token:?}"),
            // Judged only for tokens with a control character, which no refusal's own wording
            // has: a token that is a piece of that wording is not quoted when the reason holds it.
            Err(reason) => assert!(
                token.len() < 8 || !token.bytes().any(|byte| byte < 0x20) || !reason.contains(&token),
                "a refusal quotes the token"
            ),
        }
        return;
    }
    let position = input.u64();
    let replacement = input.byte();
    let claims = input.rest();
    let token = signed_jwt(claims);
    if let Ok(grant) = verifier.verify(&token, JWT_NOW_UNIX_MS) {
        let claims: serde_json::Value = serde_json::from_slice(claims).expect("a granted token's claims are JSON");
        let exp = claims["exp"].as_u64().expect("a granted token has a numeric exp");
        // Saturating, as the broker computes it: an `exp` near u64::MAX is a valid claim.
        let until_ms = exp.saturating_add(mbws::auth::jwt::DEFAULT_LEEWAY_SECS).saturating_mul(1000);
        assert!(grant.valid_until_unix_ms <= until_ms, "a grant outlives exp");
        assert!(until_ms > JWT_NOW_UNIX_MS, "an expired token was granted");
    }
    // One character changed anywhere: the signature no longer matches what it signs.
    let mut altered = token.clone().into_bytes();
    let at = (position % altered.len() as u64) as usize;
    let replacement =
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_."[usize::from(replacement) % 65];
    if altered[at] == replacement {
        return;
    }
    altered[at] = replacement;
    let altered = String::from_utf8(altered).expect("ASCII");
    assert!(verifier.verify(&altered, JWT_NOW_UNIX_MS).is_err(), "an altered token verified: {altered:?}");
}

fn jwt_seeds() -> Vec<Vec<u8>> {
    let signed = |claims: &str| {
        let mut seed = vec![1u8];
        seed.extend_from_slice(&7u64.to_le_bytes());
        seed.push(3);
        seed.extend_from_slice(claims.as_bytes());
        seed
    };
    let mut arbitrary = vec![0u8];
    arbitrary.extend_from_slice(b"eyJhbGciOiJub25lIn0.eyJleHAiOjF9.");
    vec![
        signed(r#"{"exp":1796000600,"mbws":{"send":["orders.*"],"consume":["orders"]}}"#),
        signed(r#"{"exp":1,"mbws":{}}"#),
        signed(r#"{"exp":1796000600,"nbf":1796000500,"mbws":{"deny-send":["*"]}}"#),
        signed(r#"{"mbws":{"send":["a"]}}"#),
        arbitrary,
    ]
}
