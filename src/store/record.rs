//! The byte format of a segment file: its header and its records (sans-IO, no allocation on
//! the encode path beyond the caller's buffer).
//!
//! The layout is documented once, in the [module docs of `store`](super); this file is its
//! only implementation. Decoding validates everything before it trusts anything: the length
//! is checked against [`MAX_RECORD_BYTES`] before a single payload byte is looked at, the
//! checksum before the payload is parsed, and the parse itself rejects any field that runs
//! past the record or any byte left over. Decoding never panics, whatever the input
//! (property-tested below).

use smallvec::SmallVec;

/// Bytes of a record's header: length (u32) and checksum (u32).
pub const RECORD_HEADER_BYTES: usize = 8;

/// Largest value of a record's length field (kind byte + payload): 64 MiB of body plus 1 MiB
/// for the address and properties. A length above it is corruption, never an allocation.
pub const MAX_RECORD_BYTES: usize = 65 * 1024 * 1024;

/// Bytes of the header at the start of every segment file.
pub const SEGMENT_HEADER_BYTES: usize = 32;

/// First 8 bytes of every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"MBWS-LOG";

/// The format version this code writes. Version 2 added ID_RESERVATION records (and ends
/// every segment's LAST_IDS records with one).
pub const FORMAT_VERSION: u16 = 2;

/// The oldest format version this code reads. A version 1 segment is read as it is (it holds
/// no ID_RESERVATION record), and nothing more is written to it: the log starts a version 2
/// segment for its next record.
pub const OLDEST_READABLE_VERSION: u16 = 1;

/// Longest address, property, header name or header value a record can hold (u16 lengths).
pub const MAX_FIELD_BYTES: usize = u16::MAX as usize;

/// Most headers one MESSAGE record can hold (u16 count).
pub const MAX_HEADERS: usize = u16::MAX as usize;

/// Record kinds (the byte after the header).
pub mod kind {
    pub const MESSAGE: u8 = 1;
    pub const SETTLED: u8 = 2;
    pub const LAST_IDS: u8 = 3;
    /// Since format version 2.
    pub const ID_RESERVATION: u8 = 4;
}

/// The fields of a MESSAGE record, borrowed from the caller (encode) or from the segment
/// bytes (decode).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageFields<'a> {
    pub address: &'a [u8],
    pub message_id: u64,
    pub expires_at_unix_ms: u64,
    pub content_type: &'a [u8],
    pub correlation_id: &'a [u8],
    pub reply_to: &'a [u8],
    pub headers: SmallVec<[(&'a [u8], &'a [u8]); 2]>,
    pub body: &'a [u8],
}

/// One record, borrowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record<'a> {
    /// A durable message was accepted.
    Message(MessageFields<'a>),
    /// A message is done with: acknowledged, rejected, expired or dead-lettered.
    Settled { address: &'a [u8], message_id: u64 },
    /// The highest message id used so far on each listed address (written at the start of
    /// every new segment, so that ids survive the deletion of the segments that used them).
    LastIds(Vec<(&'a [u8], u64)>),
    /// Message ids of the shard up to `reserved_up_to` may be handed out (and seen by
    /// consumers) before any record names them; after a restart the shard continues above it.
    /// Also written after the LAST_IDS records at the start of every segment, with the highest
    /// reservation so far, which marks the end of those records.
    IdReservation { reserved_up_to: u64 },
}

/// Why the bytes at some offset are not a valid record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordError {
    /// Fewer bytes remain than the header, or than the length field announces.
    Incomplete { available: usize, needed: usize },
    /// The length field is 0 or above [`MAX_RECORD_BYTES`].
    BadLength(u32),
    /// The checksum does not match the bytes.
    BadChecksum { stored: u32, computed: u32 },
    /// The checksum matches but the kind byte is not one this version knows.
    UnknownKind(u8),
    /// The checksum matches but the payload does not parse (a bug, or another writer).
    Malformed(&'static str),
}

impl std::fmt::Display for RecordError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecordError::Incomplete { available, needed } => {
                write!(f, "incomplete record: {available} bytes left in the file, the record needs {needed}")
            }
            RecordError::BadLength(length) => {
                write!(f, "impossible record length {length} (must be 1..={MAX_RECORD_BYTES})")
            }
            RecordError::BadChecksum { stored, computed } => {
                write!(f, "checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")
            }
            RecordError::UnknownKind(kind) => {
                write!(f, "unknown record kind {kind} (written by a newer version of mbws?)")
            }
            RecordError::Malformed(what) => write!(f, "checksum matches but the record is malformed: {what}"),
        }
    }
}

/// Total bytes `record` takes in a segment, header included.
pub fn encoded_len(record: &Record<'_>) -> usize {
    RECORD_HEADER_BYTES + 1 + payload_len(record)
}

fn payload_len(record: &Record<'_>) -> usize {
    match record {
        Record::Message(message) => {
            8 + 8
                + 2
                + message.address.len()
                + 2
                + message.content_type.len()
                + 2
                + message.correlation_id.len()
                + 2
                + message.reply_to.len()
                + 2
                + message.headers.iter().map(|(name, value)| 4 + name.len() + value.len()).sum::<usize>()
                + message.body.len()
        }
        Record::Settled { address, .. } => 8 + 2 + address.len(),
        Record::LastIds(entries) => 4 + entries.iter().map(|(address, _)| 8 + 2 + address.len()).sum::<usize>(),
        Record::IdReservation { .. } => 8,
    }
}

/// Why a record cannot be encoded: which field is too long, with its size and the limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TooLarge {
    pub field: &'static str,
    pub bytes: usize,
    pub max_bytes: usize,
}

/// Checks every length against what the format can hold; [`encode`] assumes this passed.
pub fn check_fits(record: &Record<'_>) -> Result<(), TooLarge> {
    let field = |field: &'static str, bytes: usize| {
        if bytes > MAX_FIELD_BYTES {
            Err(TooLarge { field, bytes, max_bytes: MAX_FIELD_BYTES })
        } else {
            Ok(())
        }
    };
    match record {
        Record::Message(message) => {
            field("address", message.address.len())?;
            field("content type", message.content_type.len())?;
            field("correlation id", message.correlation_id.len())?;
            field("reply-to", message.reply_to.len())?;
            if message.headers.len() > MAX_HEADERS {
                return Err(TooLarge { field: "header count", bytes: message.headers.len(), max_bytes: MAX_HEADERS });
            }
            for (name, value) in &message.headers {
                field("header name", name.len())?;
                field("header value", value.len())?;
            }
        }
        Record::Settled { address, .. } => field("address", address.len())?,
        Record::LastIds(entries) => {
            for (address, _) in entries {
                field("address", address.len())?;
            }
        }
        Record::IdReservation { .. } => {}
    }
    let length = 1 + payload_len(record);
    if length > MAX_RECORD_BYTES {
        return Err(TooLarge { field: "record", bytes: length, max_bytes: MAX_RECORD_BYTES });
    }
    Ok(())
}

/// The checksum of a record at `file_offset` of a segment whose header carries `salt`:
/// CRC32C over salt (u64 BE), offset (u64 BE), then the record from its length field to its
/// last payload byte (the checksum field itself excluded).
///
/// Public only for the fuzz targets (fuzz/), which seal arbitrary record bytes with it so that
/// the decoder and recovery are exercised past the checksum; not part of the API.
#[doc(hidden)]
pub fn record_checksum(salt: u64, file_offset: u64, length_field: &[u8], kind_and_payload: &[u8]) -> u32 {
    let mut position = [0u8; 16];
    position[..8].copy_from_slice(&salt.to_be_bytes());
    position[8..].copy_from_slice(&file_offset.to_be_bytes());
    let crc = crc32c::crc32c(&position);
    let crc = crc32c::crc32c_append(crc, length_field);
    crc32c::crc32c_append(crc, kind_and_payload)
}

/// Appends `record` to `out`, to be written at `file_offset` of a segment whose header carries
/// `salt`. The caller has checked [`check_fits`].
pub fn encode(out: &mut Vec<u8>, record: &Record<'_>, salt: u64, file_offset: u64) {
    debug_assert!(check_fits(record).is_ok(), "encode() called on a record that does not fit");
    let start = out.len();
    let length = 1 + payload_len(record);
    out.reserve(RECORD_HEADER_BYTES + length);
    out.extend_from_slice(&(length as u32).to_be_bytes());
    out.extend_from_slice(&[0; 4]); // checksum, filled in below
    match record {
        Record::Message(message) => {
            out.push(kind::MESSAGE);
            out.extend_from_slice(&message.message_id.to_be_bytes());
            out.extend_from_slice(&message.expires_at_unix_ms.to_be_bytes());
            put_str16(out, message.address);
            put_str16(out, message.content_type);
            put_str16(out, message.correlation_id);
            put_str16(out, message.reply_to);
            out.extend_from_slice(&(message.headers.len() as u16).to_be_bytes());
            for (name, value) in &message.headers {
                put_str16(out, name);
                put_str16(out, value);
            }
            out.extend_from_slice(message.body);
        }
        Record::Settled { address, message_id } => {
            out.push(kind::SETTLED);
            out.extend_from_slice(&message_id.to_be_bytes());
            put_str16(out, address);
        }
        Record::LastIds(entries) => {
            out.push(kind::LAST_IDS);
            out.extend_from_slice(&(entries.len() as u32).to_be_bytes());
            for (address, last_id) in entries {
                out.extend_from_slice(&last_id.to_be_bytes());
                put_str16(out, address);
            }
        }
        Record::IdReservation { reserved_up_to } => {
            out.push(kind::ID_RESERVATION);
            out.extend_from_slice(&reserved_up_to.to_be_bytes());
        }
    }
    debug_assert_eq!(out.len() - start, RECORD_HEADER_BYTES + length);
    let checksum = record_checksum(salt, file_offset, &out[start..start + 4], &out[start + RECORD_HEADER_BYTES..]);
    out[start + 4..start + 8].copy_from_slice(&checksum.to_be_bytes());
}

fn put_str16(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// Decodes the record at the start of `bytes`, which sit at `file_offset` of a segment whose
/// header carries `salt`. Returns the record and its total length (header included).
pub fn decode(bytes: &[u8], salt: u64, file_offset: u64) -> Result<(Record<'_>, usize), RecordError> {
    if bytes.len() < RECORD_HEADER_BYTES {
        return Err(RecordError::Incomplete { available: bytes.len(), needed: RECORD_HEADER_BYTES });
    }
    let length = u32::from_be_bytes(bytes[0..4].try_into().expect("4 bytes"));
    if length == 0 || length as usize > MAX_RECORD_BYTES {
        return Err(RecordError::BadLength(length));
    }
    let total = RECORD_HEADER_BYTES + length as usize;
    if bytes.len() < total {
        return Err(RecordError::Incomplete { available: bytes.len(), needed: total });
    }
    let stored = u32::from_be_bytes(bytes[4..8].try_into().expect("4 bytes"));
    let computed = record_checksum(salt, file_offset, &bytes[0..4], &bytes[RECORD_HEADER_BYTES..total]);
    if stored != computed {
        return Err(RecordError::BadChecksum { stored, computed });
    }
    let kind = bytes[RECORD_HEADER_BYTES];
    let mut reader = Reader { bytes: &bytes[RECORD_HEADER_BYTES + 1..total] };
    let record = match kind {
        kind::MESSAGE => {
            let message_id = reader.u64()?;
            let expires_at_unix_ms = reader.u64()?;
            let address = reader.str16()?;
            let content_type = reader.str16()?;
            let correlation_id = reader.str16()?;
            let reply_to = reader.str16()?;
            let count = reader.u16()? as usize;
            // Each header takes at least 4 bytes: a count the payload cannot hold is refused
            // before anything is allocated for it.
            if count * 4 > reader.bytes.len() {
                return Err(RecordError::Malformed("header count larger than the record"));
            }
            let mut headers = SmallVec::with_capacity(count);
            for _ in 0..count {
                headers.push((reader.str16()?, reader.str16()?));
            }
            let body = reader.rest();
            Record::Message(MessageFields {
                address,
                message_id,
                expires_at_unix_ms,
                content_type,
                correlation_id,
                reply_to,
                headers,
                body,
            })
        }
        kind::SETTLED => {
            let message_id = reader.u64()?;
            let address = reader.str16()?;
            reader.finish()?;
            Record::Settled { address, message_id }
        }
        kind::LAST_IDS => {
            let count = reader.u32()? as usize;
            if count.saturating_mul(10) > reader.bytes.len() {
                return Err(RecordError::Malformed("address count larger than the record"));
            }
            let mut entries = Vec::with_capacity(count);
            for _ in 0..count {
                let last_id = reader.u64()?;
                entries.push((reader.str16()?, last_id));
            }
            reader.finish()?;
            Record::LastIds(entries)
        }
        kind::ID_RESERVATION => {
            let reserved_up_to = reader.u64()?;
            reader.finish()?;
            Record::IdReservation { reserved_up_to }
        }
        other => return Err(RecordError::UnknownKind(other)),
    };
    Ok((record, total))
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, count: usize) -> Result<&'a [u8], RecordError> {
        if self.bytes.len() < count {
            return Err(RecordError::Malformed("a field runs past the end of the record"));
        }
        let (taken, rest) = self.bytes.split_at(count);
        self.bytes = rest;
        Ok(taken)
    }

    fn u16(&mut self) -> Result<u16, RecordError> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }

    fn u32(&mut self) -> Result<u32, RecordError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }

    fn u64(&mut self) -> Result<u64, RecordError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }

    fn str16(&mut self) -> Result<&'a [u8], RecordError> {
        let length = self.u16()? as usize;
        self.take(length)
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.bytes)
    }

    fn finish(&self) -> Result<(), RecordError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(RecordError::Malformed("bytes left over after the last field"))
        }
    }
}

/// What the header of a segment file says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    /// The format version the segment is written in (see [`FORMAT_VERSION`]).
    pub version: u16,
    pub shard: u16,
    pub segment: u64,
    /// Mixed into every record checksum of the segment (see the module docs of `store`).
    pub salt: u64,
}

/// Why the first bytes of a file are not a segment header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderError {
    Incomplete { available: usize },
    BadMagic,
    BadChecksum,
    UnsupportedVersion(u16),
}

impl std::fmt::Display for HeaderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeaderError::Incomplete { available } => {
                write!(f, "the file holds {available} bytes, less than a {SEGMENT_HEADER_BYTES}-byte segment header")
            }
            HeaderError::BadMagic => write!(f, "the file does not start with the segment magic \"MBWS-LOG\""),
            HeaderError::BadChecksum => write!(f, "the segment header fails its checksum"),
            HeaderError::UnsupportedVersion(version) => write!(
                f,
                "segment format version {version} is not supported (this build reads versions \
                 {OLDEST_READABLE_VERSION} to {FORMAT_VERSION}); it was written by a newer mbws: run that version, \
                 or move the data directory (--data-dir) aside to start with an empty log"
            ),
        }
    }
}

impl SegmentHeader {
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_BYTES] {
        let mut out = [0u8; SEGMENT_HEADER_BYTES];
        out[0..8].copy_from_slice(&SEGMENT_MAGIC);
        out[8..10].copy_from_slice(&self.version.to_be_bytes());
        out[10..12].copy_from_slice(&self.shard.to_be_bytes());
        out[12..20].copy_from_slice(&self.segment.to_be_bytes());
        out[20..28].copy_from_slice(&self.salt.to_be_bytes());
        let checksum = crc32c::crc32c(&out[0..28]);
        out[28..32].copy_from_slice(&checksum.to_be_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<SegmentHeader, HeaderError> {
        if bytes.len() < SEGMENT_HEADER_BYTES {
            return Err(HeaderError::Incomplete { available: bytes.len() });
        }
        if bytes[0..8] != SEGMENT_MAGIC {
            return Err(HeaderError::BadMagic);
        }
        let stored = u32::from_be_bytes(bytes[28..32].try_into().expect("4 bytes"));
        if stored != crc32c::crc32c(&bytes[0..28]) {
            return Err(HeaderError::BadChecksum);
        }
        let version = u16::from_be_bytes(bytes[8..10].try_into().expect("2 bytes"));
        if !(OLDEST_READABLE_VERSION..=FORMAT_VERSION).contains(&version) {
            return Err(HeaderError::UnsupportedVersion(version));
        }
        Ok(SegmentHeader {
            version,
            shard: u16::from_be_bytes(bytes[10..12].try_into().expect("2 bytes")),
            segment: u64::from_be_bytes(bytes[12..20].try_into().expect("8 bytes")),
            salt: u64::from_be_bytes(bytes[20..28].try_into().expect("8 bytes")),
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn field() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(any::<u8>(), 0..40)
    }

    #[derive(Debug, Clone)]
    enum Owned {
        Message { fields: [Vec<u8>; 4], headers: Vec<(Vec<u8>, Vec<u8>)>, id: u64, expires: u64, body: Vec<u8> },
        Settled { address: Vec<u8>, id: u64 },
        LastIds(Vec<(Vec<u8>, u64)>),
        IdReservation(u64),
    }

    impl Owned {
        fn record(&self) -> Record<'_> {
            match self {
                Owned::Message { fields, headers, id, expires, body } => Record::Message(MessageFields {
                    address: &fields[0],
                    message_id: *id,
                    expires_at_unix_ms: *expires,
                    content_type: &fields[1],
                    correlation_id: &fields[2],
                    reply_to: &fields[3],
                    headers: headers.iter().map(|(name, value)| (&name[..], &value[..])).collect(),
                    body,
                }),
                Owned::Settled { address, id } => Record::Settled { address, message_id: *id },
                Owned::LastIds(entries) => Record::LastIds(entries.iter().map(|(a, id)| (&a[..], *id)).collect()),
                Owned::IdReservation(reserved_up_to) => Record::IdReservation { reserved_up_to: *reserved_up_to },
            }
        }
    }

    fn owned_record() -> impl Strategy<Value = Owned> {
        prop_oneof![
            (
                [field(), field(), field(), field()],
                proptest::collection::vec((field(), field()), 0..4),
                any::<u64>(),
                any::<u64>(),
                proptest::collection::vec(any::<u8>(), 0..300),
            )
                .prop_map(|(fields, headers, id, expires, body)| Owned::Message {
                    fields,
                    headers,
                    id,
                    expires,
                    body
                }),
            (field(), any::<u64>()).prop_map(|(address, id)| Owned::Settled { address, id }),
            proptest::collection::vec((field(), any::<u64>()), 0..5).prop_map(Owned::LastIds),
            any::<u64>().prop_map(Owned::IdReservation),
        ]
    }

    proptest! {
        #[test]
        fn encode_then_decode_is_identity(
            records in proptest::collection::vec(owned_record(), 1..6),
            salt in any::<u64>(),
            start in 32u64..10_000,
        ) {
            let mut out = Vec::new();
            let mut offsets = Vec::new();
            for owned in &records {
                let record = owned.record();
                prop_assert!(check_fits(&record).is_ok());
                offsets.push(start + out.len() as u64);
                let before = out.len();
                encode(&mut out, &record, salt, start + before as u64);
                prop_assert_eq!(out.len() - before, encoded_len(&record));
            }
            let mut position = 0usize;
            for (owned, offset) in records.iter().zip(offsets) {
                let (decoded, length) = decode(&out[position..], salt, offset).expect("decodes");
                prop_assert_eq!(decoded, owned.record());
                position += length;
            }
            prop_assert_eq!(position, out.len());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600), salt in any::<u64>()) {
            let _ = decode(&bytes, salt, 32);
            let _ = SegmentHeader::decode(&bytes);
        }

        /// Garbage behind a valid length and checksum (what a resynchronising scan may meet)
        /// must be refused by the parser, not panic it.
        #[test]
        fn checksummed_garbage_never_panics(kind in 0u8..5, payload in proptest::collection::vec(any::<u8>(), 0..200)) {
            let length = (1 + payload.len()) as u32;
            let mut bytes = length.to_be_bytes().to_vec();
            bytes.extend_from_slice(&[0; 4]);
            bytes.push(kind);
            bytes.extend_from_slice(&payload);
            let checksum = record_checksum(7, 100, &bytes[0..4], &bytes[8..]);
            bytes[4..8].copy_from_slice(&checksum.to_be_bytes());
            let _ = decode(&bytes, 7, 100);
        }

        #[test]
        fn any_single_flipped_bit_is_detected(owned in owned_record(), bit in any::<usize>()) {
            let mut out = Vec::new();
            encode(&mut out, &owned.record(), 42, 64);
            let bit = bit % (out.len() * 8);
            out[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(decode(&out, 42, 64).is_err());
        }
    }

    #[test]
    fn a_record_is_bound_to_its_offset_and_segment() {
        let mut out = Vec::new();
        encode(&mut out, &Record::Settled { address: b"a", message_id: 1 }, 42, 64);
        assert!(decode(&out, 42, 64).is_ok());
        assert!(matches!(decode(&out, 42, 65), Err(RecordError::BadChecksum { .. })));
        assert!(matches!(decode(&out, 43, 64), Err(RecordError::BadChecksum { .. })));
    }

    #[test]
    fn huge_lengths_are_refused_before_reading_further() {
        let mut bytes = vec![0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0];
        bytes.extend_from_slice(&[0; 16]);
        assert_eq!(decode(&bytes, 0, 32), Err(RecordError::BadLength(u32::MAX)));
        assert_eq!(decode(&[0; 16], 0, 32), Err(RecordError::BadLength(0)));
    }

    #[test]
    fn oversized_fields_are_refused_with_their_name() {
        let long = vec![b'x'; MAX_FIELD_BYTES + 1];
        let error = check_fits(&Record::Settled { address: &long, message_id: 1 }).unwrap_err();
        assert_eq!(error.field, "address");
        assert_eq!(error.bytes, MAX_FIELD_BYTES + 1);
    }

    #[test]
    fn header_round_trips_and_rejects_damage() {
        let header = SegmentHeader { version: FORMAT_VERSION, shard: 3, segment: 17, salt: 0x0123_4567_89ab_cdef };
        let bytes = header.encode();
        assert_eq!(SegmentHeader::decode(&bytes), Ok(header));
        assert_eq!(SegmentHeader::decode(&bytes[..20]), Err(HeaderError::Incomplete { available: 20 }));
        let mut damaged = bytes;
        damaged[15] ^= 1;
        assert_eq!(SegmentHeader::decode(&damaged), Err(HeaderError::BadChecksum));
        damaged = bytes;
        damaged[0] = b'X';
        assert_eq!(SegmentHeader::decode(&damaged), Err(HeaderError::BadMagic));
    }

    #[test]
    fn version_1_segments_are_read_and_newer_ones_refused_with_what_to_do() {
        let old = SegmentHeader { version: 1, shard: 0, segment: 1, salt: 5 };
        assert_eq!(SegmentHeader::decode(&old.encode()), Ok(old));
        let newer = SegmentHeader { version: FORMAT_VERSION + 1, ..old };
        let error = SegmentHeader::decode(&newer.encode()).unwrap_err();
        assert_eq!(error, HeaderError::UnsupportedVersion(FORMAT_VERSION + 1));
        let text = error.to_string();
        assert!(text.contains("newer mbws") && text.contains("--data-dir"), "{text}");
    }

    #[test]
    fn an_id_reservation_is_eight_bytes_of_payload_and_nothing_else() {
        let mut out = Vec::new();
        let record = Record::IdReservation { reserved_up_to: 1 << 40 };
        encode(&mut out, &record, 7, 32);
        assert_eq!(out.len(), RECORD_HEADER_BYTES + 1 + 8);
        assert_eq!(out[RECORD_HEADER_BYTES], kind::ID_RESERVATION);
        assert_eq!(decode(&out, 7, 32), Ok((record, out.len())));
    }
}
