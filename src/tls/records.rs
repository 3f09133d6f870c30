//! The in-place TLS record layer (`--tls-records in-place`, the default): rustls does the
//! handshake and the key schedule, this module the records, decrypted in place in the reader's
//! own buffer and sealed in place in the writer's.
//!
//! What is ours and what is rustls's: rustls negotiates the session
//! (`UnbufferedServerConnection`), then hands over the traffic secrets and sequence numbers
//! (`dangerous_into_kernel_connection`, the API it offers for kTLS) and keeps a
//! [`KernelConnection`] that derives the next secrets on a KeyUpdate.
//!
//! Opening and sealing are ring's AEAD (the primitive rustls's own decrypters and encrypters
//! call), in place: rustls 0.23's `MessageEncrypter` allocates every record and copies the
//! plaintext into it, and its decrypters leave the plaintext where the ciphertext was, so the
//! reader would copy it out. Here the writer puts the header (and TLS 1.2 AES-GCM's explicit
//! nonce) in the write buffer, copies the plaintext once after it, encrypts it where it lies
//! and appends the tag ([`RecordKey::seal`]); the reader opens each record in the buffer it was read
//! into, its plaintext moved up against the previous record's in the same pass (ring's
//! `open_within`), so the WebSocket decoder's buffer holds plaintext only ([`RecordKey::open`]). The
//! nonce and additional-data rules are the RFCs' (RFC 8446 5.2-5.4; RFC 5246 6.2.3.3 with RFC
//! 5288 3 for AES-GCM, RFC 7905 2 for ChaCha20-Poly1305), checked against rustls's decrypters
//! and encrypters for every suite and at large sequence numbers by this module's tests. The
//! rest is framing: the 5-byte record headers, sequence numbers, TLS 1.3's inner content type
//! and padding, what a TLS 1.2 or 1.3 server must refuse after its handshake, KeyUpdates, the
//! suite's confidentiality limit.
//!
//! Refused, each with the alert the protocol names (then the connection closes): a record
//! longer than 2^14 + 256 bytes (record_overflow), a record that fails authentication
//! (bad_record_mac), a content type the state does not allow, a post-handshake handshake
//! message other than a whole KeyUpdate at the end of its record, too many empty records in a
//! row (unexpected_message), a malformed alert or KeyUpdate (decode_error), TLS 1.2
//! renegotiation (no_renegotiation). Any alert from the peer other than close_notify ends the
//! connection. Keys and secrets are never logged, and this module never formats them.

use std::io::IoSlice;
use std::ops::Range;

use ring::aead;
use rustls::crypto::cipher::{InboundOpaqueMessage, MessageDecrypter};
use rustls::kernel::KernelConnection;
use rustls::server::ServerConnectionData;
use rustls::{ConnectionTrafficSecrets, ContentType, ExtractedSecrets, ProtocolVersion, SupportedCipherSuite};

/// A record header: content type, version, length.
pub const HEADER_BYTES: usize = 5;
/// Most plaintext bytes in one record (2^14, RFC 8446 5.1 and RFC 5246 6.2.1).
pub const MAX_PLAINTEXT_BYTES: usize = 1 << 14;
/// Most ciphertext bytes after a header (2^14 + 256, RFC 8446 5.2; a TLS 1.2 AEAD record adds
/// 24 bytes at most, well within it).
pub const MAX_CIPHERTEXT_BYTES: usize = (1 << 14) + 256;
/// The largest whole record: what a reader's buffer must be able to hold.
pub const MAX_RECORD_BYTES: usize = HEADER_BYTES + MAX_CIPHERTEXT_BYTES;
/// Empty application-data records accepted in a row (rustls's own bound), so a peer cannot
/// keep the reader busy without sending anything.
const MAX_EMPTY_RECORDS: u32 = 32;
/// The sequence number at which a direction stops (rustls's own soft limit): reading closes
/// the connection, writing refreshes the keys (TLS 1.3) or closes (TLS 1.2) before it.
const SEQ_LIMIT: u64 = 0xffff_ffff_ffff_0000;

const CHANGE_CIPHER_SPEC: u8 = 20;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const APPLICATION_DATA: u8 = 23;
const KEY_UPDATE: u8 = 24;
const HELLO_REQUEST_OR_CLIENT_HELLO: [u8; 2] = [0, 1];

/// The alerts this layer sends (RFC 8446 6.2, RFC 5246 7.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alert {
    UnexpectedMessage = 10,
    BadRecordMac = 20,
    RecordOverflow = 22,
    DecodeError = 50,
    InternalError = 80,
    /// Always a warning (RFC 5246 7.2.2); the connection closes after it all the same.
    NoRenegotiation = 100,
}

impl Alert {
    fn level(self) -> u8 {
        if self == Alert::NoRenegotiation {
            1
        } else {
            2
        }
    }
}

/// Why the session ends: what to tell the peer (if anything) and what to log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fatal {
    pub alert: Option<Alert>,
    pub reason: &'static str,
}

impl Fatal {
    fn new(alert: Alert, reason: &'static str) -> Fatal {
        Fatal { alert: Some(alert), reason }
    }
}

/// A parsed record header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub typ: u8,
    pub version: u16,
    /// The bytes after the header, at most [`MAX_CIPHERTEXT_BYTES`].
    pub len: usize,
}

/// Parses the header at the start of `bytes`: `Ok(None)` until 5 bytes are there.
pub fn parse_header(bytes: &[u8]) -> Result<Option<Header>, Fatal> {
    let Some(&[typ, major, minor, high, low]) = bytes.get(..HEADER_BYTES) else {
        return Ok(None);
    };
    if !(CHANGE_CIPHER_SPEC..=APPLICATION_DATA).contains(&typ) {
        return Err(Fatal::new(Alert::UnexpectedMessage, "a record of an unknown content type"));
    }
    if major != 3 {
        return Err(Fatal::new(Alert::DecodeError, "a record header with a version that is not TLS"));
    }
    let len = usize::from(u16::from_be_bytes([high, low]));
    if len > MAX_CIPHERTEXT_BYTES {
        return Err(Fatal::new(Alert::RecordOverflow, "a record longer than 2^14 + 256 bytes"));
    }
    Ok(Some(Header { typ, version: u16::from_be_bytes([major, minor]), len }))
}

/// The first whole record in `bytes`: its header and the range of its payload (the record
/// ends where the payload does). `Ok(None)` while the record is incomplete.
pub fn next_record(bytes: &[u8]) -> Result<Option<(Header, Range<usize>)>, Fatal> {
    let Some(header) = parse_header(bytes)? else {
        return Ok(None);
    };
    let end = HEADER_BYTES + header.len;
    Ok((bytes.len() >= end).then_some((header, HEADER_BYTES..end)))
}

/// What an opened record held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opened {
    /// Application data, decrypted in place: its range in the buffer (may be empty).
    Data(Range<usize>),
    /// A record for the layer itself (a KeyUpdate): nothing for the application.
    Nothing,
    /// The peer's close_notify: its stream ends here.
    Closed,
}

/// The negotiated protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    Tls12,
    Tls13,
}

/// The bytes TLS 1.2 AES-GCM puts before the ciphertext.
const EXPLICIT_NONCE_BYTES: usize = 8;

/// One direction's key: the suite's AEAD in ring, with the direction's IV and next sequence
/// number. The writer's seals records in place ([`RecordKey::seal`]); the reader's opens them
/// in place, or shifted toward the front of the same buffer, which ring's AEADs do in the same
/// pass ([`RecordKey::open`]).
pub struct RecordKey {
    key: aead::LessSafeKey,
    /// The IV as rustls extracts it. A record's nonce is this XOR its sequence number (TLS 1.3,
    /// RFC 8446 5.3; TLS 1.2 ChaCha20-Poly1305, RFC 7905 2). TLS 1.2 AES-GCM's is the salt (the
    /// first 4 bytes) and 8 bytes the record carries before its ciphertext (RFC 5288 3): the
    /// writer sends this IV's last 8 bytes XOR the sequence number there (as rustls does), so
    /// sealing follows the XOR rule in every suite; the reader takes what the record carries.
    iv: [u8; aead::NONCE_LEN],
    tls13: bool,
    /// TLS 1.2 AES-GCM: the nonce's last 8 bytes travel before the ciphertext.
    explicit_nonce: bool,
    /// The sequence number of the next record.
    seq: u64,
}

impl RecordKey {
    /// One direction of `secrets` (a TLS 1.3 session when `tls13`), next record `seq`.
    pub fn new(tls13: bool, secrets: &ConnectionTrafficSecrets, seq: u64) -> Result<RecordKey, rustls::Error> {
        let (algorithm, gcm, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, true, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, true, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (&aead::CHACHA20_POLY1305, false, key, iv),
            _ => {
                return Err(rustls::Error::General("traffic secrets of an AEAD this record layer does not know".into()))
            }
        };
        let key = aead::UnboundKey::new(algorithm, key.as_ref())
            .map_err(|_| rustls::Error::General("an extracted traffic key of the wrong length".into()))?;
        let iv =
            iv.as_ref().try_into().map_err(|_| rustls::Error::General("an extracted IV of the wrong length".into()))?;
        Ok(RecordKey { key: aead::LessSafeKey::new(key), iv, tls13, explicit_nonce: gcm && !tls13, seq })
    }

    /// The sequence number of the next record.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The IV XOR the sequence number.
    fn xor_nonce(&self) -> [u8; aead::NONCE_LEN] {
        let mut nonce = self.iv;
        for (byte, seq) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *byte ^= seq;
        }
        nonce
    }

    /// Bytes before the ciphertext: TLS 1.2 AES-GCM's explicit nonce, or none.
    fn explicit_bytes(&self) -> usize {
        if self.explicit_nonce {
            EXPLICIT_NONCE_BYTES
        } else {
            0
        }
    }

    /// TLS 1.2's additional data: seq_num, type, version, length of the plaintext (RFC 5246
    /// 6.2.3.3).
    fn tls12_aad(&self, typ: u8, version: [u8; 2], plaintext_len: usize) -> aead::Aad<[u8; 13]> {
        let mut aad = [0u8; 13];
        aad[..8].copy_from_slice(&self.seq.to_be_bytes());
        aad[8..11].copy_from_slice(&[typ, version[0], version[1]]);
        aad[11..].copy_from_slice(&(plaintext_len as u16).to_be_bytes());
        aead::Aad::from(aad)
    }

    /// Seals one record of content type `typ` holding the `len` plaintext bytes that `fill`
    /// appends to `out` (at most 2^14), in place at the end of `out`: the header (and TLS 1.2
    /// AES-GCM's explicit nonce) first, then the plaintext, encrypted where `fill` put it, then
    /// the tag. On an error `out` is as it was and the sequence number unchanged.
    pub fn seal(
        &mut self,
        typ: u8,
        len: usize,
        out: &mut Vec<u8>,
        fill: impl FnOnce(&mut Vec<u8>),
    ) -> Result<(), Fatal> {
        assert!(len <= MAX_PLAINTEXT_BYTES, "a record holds at most 2^14 bytes of plaintext");
        let nonce = self.xor_nonce();
        let explicit = self.explicit_bytes();
        // TLS 1.3 hides the type after the plaintext, and every record says application data.
        let inner = usize::from(self.tls13);
        let body = explicit + len + inner + self.key.algorithm().tag_len();
        debug_assert!(body <= MAX_CIPHERTEXT_BYTES, "a sealed record is within the record limit");
        let outer = if self.tls13 { APPLICATION_DATA } else { typ };
        // The version is TLS 1.2's in both (TLS 1.3's legacy_record_version).
        let header = [outer, 3, 3, (body >> 8) as u8, body as u8];
        let start = out.len();
        out.reserve(HEADER_BYTES + body);
        out.extend_from_slice(&header);
        if explicit > 0 {
            out.extend_from_slice(&nonce[4..]);
        }
        let plaintext = out.len();
        fill(out);
        assert_eq!(out.len() - plaintext, len, "the record's plaintext is as long as announced");
        if self.tls13 {
            out.push(typ);
        }
        let sealed = if self.tls13 {
            // The additional data is the record's header (RFC 8446 5.2).
            let aad = aead::Aad::from(header);
            self.key.seal_in_place_separate_tag(aead::Nonce::assume_unique_for_key(nonce), aad, &mut out[plaintext..])
        } else {
            let aad = self.tls12_aad(typ, [3, 3], len);
            self.key.seal_in_place_separate_tag(aead::Nonce::assume_unique_for_key(nonce), aad, &mut out[plaintext..])
        };
        match sealed {
            Ok(tag) => {
                out.extend_from_slice(tag.as_ref());
                self.seq += 1;
                Ok(())
            }
            Err(_) => {
                out.truncate(start);
                Err(Fatal::new(Alert::InternalError, "a record could not be encrypted"))
            }
        }
    }

    /// Opens the record whose header is `header` and whose payload is `buf[payload]`, writing
    /// its plaintext from `buf[to]` on (`to <= payload.start`: in place, or shifted toward the
    /// front over bytes already used, such as earlier records' headers and tags). Returns the
    /// record's content type (TLS 1.3's inner one, its padding stripped) and the plaintext's
    /// range. On an error the sequence number is unchanged and `buf[to..payload.end]` holds
    /// nothing of use.
    pub fn open(
        &mut self,
        header: Header,
        buf: &mut [u8],
        payload: Range<usize>,
        to: usize,
    ) -> Result<(u8, Range<usize>), Fatal> {
        assert!(to <= payload.start && payload.end <= buf.len(), "the plaintext goes at or before the payload");
        let explicit = self.explicit_bytes();
        let tag_len = self.key.algorithm().tag_len();
        if payload.len() < explicit + tag_len {
            return Err(Fatal::new(Alert::BadRecordMac, "a record too short to hold its nonce and tag"));
        }
        let plaintext_len = payload.len() - explicit - tag_len;
        let nonce = if explicit > 0 {
            let mut nonce = self.iv;
            nonce[4..].copy_from_slice(&buf[payload.start..payload.start + EXPLICIT_NONCE_BYTES]);
            nonce
        } else {
            self.xor_nonce()
        };
        let nonce = aead::Nonce::assume_unique_for_key(nonce);
        let version = header.version.to_be_bytes();
        let in_out = &mut buf[to..payload.end];
        let ciphertext = payload.start + explicit - to..;
        let opened = if self.tls13 {
            // The additional data is the record's header (RFC 8446 5.2).
            let length = (payload.len() as u16).to_be_bytes();
            let aad = [header.typ, version[0], version[1], length[0], length[1]];
            self.key.open_within(nonce, aead::Aad::from(aad), in_out, ciphertext)
        } else {
            let aad = self.tls12_aad(header.typ, version, plaintext_len);
            self.key.open_within(nonce, aad, in_out, ciphertext)
        };
        let plaintext = opened.map_err(|_| Fatal::new(Alert::BadRecordMac, "a record failed authentication"))?;
        debug_assert_eq!(plaintext.len(), plaintext_len);
        self.seq += 1;
        if !self.tls13 {
            if plaintext_len > MAX_PLAINTEXT_BYTES {
                return Err(Fatal::new(Alert::RecordOverflow, "a record with more than 2^14 bytes of plaintext"));
            }
            return Ok((header.typ, to..to + plaintext_len));
        }
        // TLSInnerPlaintext: the content, its type, then zeros (RFC 8446 5.2, 5.4).
        if plaintext_len > MAX_PLAINTEXT_BYTES + 1 {
            return Err(Fatal::new(Alert::RecordOverflow, "a record with more than 2^14 bytes of plaintext"));
        }
        let Some(typ_at) = plaintext.iter().rposition(|&byte| byte != 0) else {
            return Err(Fatal::new(Alert::UnexpectedMessage, "a protected record without a content type"));
        };
        Ok((plaintext[typ_at], to..to + typ_at))
    }
}

/// The record layer of one TLS session after its handshake. Owned by a connection's stream;
/// once the connection is split, its reader opens records and its writer seals them, one at a
/// time (the stream shares it in an `Rc<RefCell<..>>`, borrowed between awaits only).
pub struct RecordLayer {
    version: Version,
    suite: SupportedCipherSuite,
    kernel: KernelConnection<ServerConnectionData>,
    rx: RecordKey,
    tx: RecordKey,
    /// The sequence number at which the write keys are refreshed (1.3) or the session closes
    /// (1.2): the suite's confidentiality limit, or [`SEQ_LIMIT`].
    tx_limit: u64,
    /// Sealed records the writer sends before anything else: the reply to a KeyUpdate, an
    /// alert. Written by the reading side, which never writes to the socket itself.
    queued: Vec<u8>,
    /// Our KeyUpdate answering the peer's request is in `queued`, not yet taken by the writer:
    /// a second request needs no second answer (RFC 8446 4.6.3 asks for one before our next
    /// application data, which that one is), so a flood of requests queues one record.
    key_update_queued: bool,
    empty_records: u32,
    peer_closed: bool,
    /// A close_notify or a fatal alert was sealed: nothing more is.
    closed: bool,
}

impl std::fmt::Debug for RecordLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // No secret is reachable from here: the ciphers are opaque boxes.
        f.debug_struct("RecordLayer")
            .field("version", &self.version)
            .field("suite", &self.suite.suite())
            .field("rx_seq", &self.rx.seq)
            .field("tx_seq", &self.tx.seq)
            .finish_non_exhaustive()
    }
}

/// Builds the opening side from the suite's own AEAD.
fn decrypter(
    suite: SupportedCipherSuite,
    secrets: ConnectionTrafficSecrets,
) -> Result<Box<dyn MessageDecrypter>, rustls::Error> {
    let (key, iv) = key_and_iv(secrets)?;
    Ok(match suite {
        SupportedCipherSuite::Tls13(suite) => suite.aead_alg.decrypter(key, iv),
        SupportedCipherSuite::Tls12(suite) => {
            let shape = suite.aead_alg.key_block_shape();
            let iv = iv.as_ref();
            if shape.fixed_iv_len + shape.explicit_nonce_len != iv.len() {
                return Err(rustls::Error::General("an extracted TLS 1.2 IV of an unexpected length".into()));
            }
            suite.aead_alg.decrypter(key, &iv[..shape.fixed_iv_len])
        }
    })
}

/// The records a key may seal (`CipherSuiteCommon::confidentiality_limit`).
fn confidentiality_limit(suite: SupportedCipherSuite) -> u64 {
    match suite {
        SupportedCipherSuite::Tls13(suite) => suite.common.confidentiality_limit,
        SupportedCipherSuite::Tls12(suite) => suite.common.confidentiality_limit,
    }
}

fn key_and_iv(
    secrets: ConnectionTrafficSecrets,
) -> Result<(rustls::crypto::cipher::AeadKey, rustls::crypto::cipher::Iv), rustls::Error> {
    match secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv }
        | ConnectionTrafficSecrets::Aes256Gcm { key, iv }
        | ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => Ok((key, iv)),
        _ => Err(rustls::Error::General("traffic secrets of an AEAD this record layer does not know".into())),
    }
}

impl RecordLayer {
    /// Takes over a session whose handshake rustls finished (and whose output was sent).
    pub fn new(
        secrets: ExtractedSecrets,
        kernel: KernelConnection<ServerConnectionData>,
    ) -> Result<RecordLayer, rustls::Error> {
        let version = match kernel.protocol_version() {
            ProtocolVersion::TLSv1_3 => Version::Tls13,
            ProtocolVersion::TLSv1_2 => Version::Tls12,
            _ => return Err(rustls::Error::General("a protocol version the record layer does not serve".into())),
        };
        let suite = kernel.negotiated_cipher_suite();
        let ExtractedSecrets { tx: (tx_seq, tx_secrets), rx: (rx_seq, rx_secrets) } = secrets;
        Ok(RecordLayer {
            version,
            suite,
            rx: RecordKey::new(version == Version::Tls13, &rx_secrets, rx_seq)?,
            tx: RecordKey::new(version == Version::Tls13, &tx_secrets, tx_seq)?,
            tx_limit: confidentiality_limit(suite).min(SEQ_LIMIT),
            kernel,
            queued: Vec::new(),
            key_update_queued: false,
            empty_records: 0,
            peer_closed: false,
            closed: false,
        })
    }

    /// The peer sent its close_notify: the reader has nothing more to open.
    pub fn peer_closed(&self) -> bool {
        self.peer_closed
    }

    /// A close_notify or a fatal alert was sealed: nothing more can be.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Lowers the write limit to `records` more records, so tests reach it in a few.
    #[doc(hidden)]
    pub fn set_write_limit_for_tests(&mut self, records: u64) {
        self.tx_limit = self.tx.seq + records;
    }

    /// Opens the record whose header is `header` and whose payload is `buf[payload]`, its
    /// plaintext written from `buf[to]` on (`to <= payload.start`; see [`RecordKey::open`]).
    /// On a [`Fatal`] error the alert it names is queued (see [`RecordLayer::take_queued`])
    /// and nothing more is opened or sealed.
    pub fn open(&mut self, header: Header, buf: &mut [u8], payload: Range<usize>, to: usize) -> Result<Opened, Fatal> {
        assert!(payload.end <= buf.len() && payload.len() == header.len, "the payload is the record's, in the buffer");
        assert!(!self.peer_closed, "no record is opened after the peer's close_notify");
        let opened = self.open_checked(header, buf, payload, to);
        if let Err(fatal) = &opened {
            self.refuse(fatal);
        }
        opened
    }

    fn open_checked(
        &mut self,
        header: Header,
        buf: &mut [u8],
        payload: Range<usize>,
        to: usize,
    ) -> Result<Opened, Fatal> {
        if self.closed {
            return Err(Fatal { alert: None, reason: "a record after the session ended" });
        }
        let allowed = match self.version {
            Version::Tls13 => header.typ == APPLICATION_DATA,
            Version::Tls12 => matches!(header.typ, APPLICATION_DATA | ALERT | HANDSHAKE),
        };
        if !allowed {
            return Err(Fatal::new(
                Alert::UnexpectedMessage,
                "a record of a content type not allowed after the handshake",
            ));
        }
        if self.rx.seq >= SEQ_LIMIT {
            return Err(Fatal { alert: None, reason: "the read sequence number reached its limit" });
        }
        let (typ, range) = self.rx.open(header, buf, payload, to)?;
        match typ {
            APPLICATION_DATA => self.application_data(range),
            ALERT => self.alert(&buf[range]),
            HANDSHAKE => self.handshake(&buf[range]),
            _ => Err(Fatal::new(Alert::UnexpectedMessage, "a protected record of a content type not allowed here")),
        }
    }

    fn application_data(&mut self, range: Range<usize>) -> Result<Opened, Fatal> {
        if range.len() > MAX_PLAINTEXT_BYTES {
            return Err(Fatal::new(Alert::RecordOverflow, "a record with more than 2^14 bytes of plaintext"));
        }
        if range.is_empty() {
            self.empty_records += 1;
            if self.empty_records > MAX_EMPTY_RECORDS {
                return Err(Fatal::new(Alert::UnexpectedMessage, "too many empty records in a row"));
            }
        } else {
            self.empty_records = 0;
        }
        Ok(Opened::Data(range))
    }

    fn alert(&mut self, alert: &[u8]) -> Result<Opened, Fatal> {
        match alert {
            [_, 0] => {
                self.peer_closed = true;
                Ok(Opened::Closed)
            }
            [_, _] => Err(Fatal { alert: None, reason: "the peer sent an alert" }),
            _ => Err(Fatal::new(Alert::DecodeError, "an alert record that is not two bytes")),
        }
    }

    /// A handshake message after the handshake: TLS 1.3 allows the client a KeyUpdate (and a
    /// few messages this server never asks for); TLS 1.2's would be a renegotiation.
    fn handshake(&mut self, message: &[u8]) -> Result<Opened, Fatal> {
        if self.version == Version::Tls12 {
            return Err(if message.get(..1) == Some(&HELLO_REQUEST_OR_CLIENT_HELLO[1..]) {
                Fatal::new(Alert::NoRenegotiation, "the client asked for a renegotiation")
            } else {
                Fatal::new(Alert::UnexpectedMessage, "a handshake message after the TLS 1.2 handshake")
            });
        }
        // A KeyUpdate is 5 bytes: type, a 24-bit length of 1, the request. It changes the keys,
        // so it must end its record (RFC 8446 5.1); it is never split (nor is anything else
        // accepted here).
        match message {
            [KEY_UPDATE, 0, 0, 1, request] => self.key_update(*request),
            [KEY_UPDATE, ..] => {
                Err(Fatal::new(Alert::DecodeError, "a malformed KeyUpdate, or one that does not end its record"))
            }
            _ => Err(Fatal::new(
                Alert::UnexpectedMessage,
                "a handshake message other than a KeyUpdate after the handshake",
            )),
        }
    }

    fn key_update(&mut self, request: u8) -> Result<Opened, Fatal> {
        let update_requested = match request {
            0 => false,
            1 => true,
            _ => return Err(Fatal::new(Alert::DecodeError, "a KeyUpdate with an unknown request")),
        };
        let (_, secrets) = self
            .kernel
            .update_rx_secret()
            .map_err(|_| Fatal::new(Alert::InternalError, "cannot derive the next read key"))?;
        self.rx = RecordKey::new(self.version == Version::Tls13, &secrets, 0)
            .map_err(|_| Fatal::new(Alert::InternalError, "cannot build the next read key"))?;
        if update_requested && !self.key_update_queued {
            // Our KeyUpdate goes out under the current write key, then the key changes: the
            // writer sends the queue before the next record it seals.
            let mut queued = std::mem::take(&mut self.queued);
            let result = self.send_key_update(&mut queued);
            self.queued = queued;
            result?;
            self.key_update_queued = true;
        }
        Ok(Opened::Nothing)
    }

    /// Seals a KeyUpdate (update_not_requested) into `out` and switches to the next write key.
    fn send_key_update(&mut self, out: &mut Vec<u8>) -> Result<(), Fatal> {
        self.seal_bytes(HANDSHAKE, &[KEY_UPDATE, 0, 0, 1, 0], out)?;
        let (_, secrets) = self
            .kernel
            .update_tx_secret()
            .map_err(|_| Fatal::new(Alert::InternalError, "cannot derive the next write key"))?;
        self.tx = RecordKey::new(self.version == Version::Tls13, &secrets, 0)
            .map_err(|_| Fatal::new(Alert::InternalError, "cannot build the next write key"))?;
        Ok(())
    }

    /// Ends the session after `fatal`: queues its alert (sealed under the current key, as TLS
    /// requires once the handshake is done) and refuses everything after. (For what the
    /// reader refuses before a record reaches [`RecordLayer::open`]: a bad header.)
    pub fn refuse(&mut self, fatal: &Fatal) {
        if let Some(alert) = fatal.alert {
            if !self.closed {
                let mut queued = std::mem::take(&mut self.queued);
                let _ = self.seal_bytes(ALERT, &[alert.level(), alert as u8], &mut queued);
                self.queued = queued;
            }
        }
        self.closed = true;
    }

    /// Appends the records the reading side sealed (a KeyUpdate, an alert) to `out`: they
    /// leave before anything sealed after them.
    pub fn take_queued(&mut self, out: &mut Vec<u8>) {
        if !self.queued.is_empty() {
            out.append(&mut self.queued);
        }
        self.key_update_queued = false;
    }

    /// Seals one record of application data from the front of `slices` (up to 2^14 bytes),
    /// appended to `out` (its plaintext copied there once and encrypted in place); returns the
    /// plaintext bytes taken (0 only when `slices` hold none).
    pub fn seal_application_data(&mut self, slices: &[IoSlice<'_>], out: &mut Vec<u8>) -> Result<usize, Fatal> {
        let taken = slices.iter().map(|slice| slice.len()).try_fold(0, |taken, len| {
            let taken = taken + len;
            if taken >= MAX_PLAINTEXT_BYTES {
                Err(MAX_PLAINTEXT_BYTES)
            } else {
                Ok(taken)
            }
        });
        let taken = taken.unwrap_or_else(|full| full);
        if taken == 0 {
            return Ok(0);
        }
        self.seal(APPLICATION_DATA, taken, out, |out| {
            let mut rest = taken;
            for slice in slices {
                let piece = &slice[..slice.len().min(rest)];
                out.extend_from_slice(piece);
                rest -= piece.len();
                if rest == 0 {
                    break;
                }
            }
        })?;
        Ok(taken)
    }

    /// Seals a close_notify into `out` (once; nothing is sealed after it).
    pub fn close_notify(&mut self, out: &mut Vec<u8>) {
        if !self.closed {
            let _ = self.seal_bytes(ALERT, &[1, 0], out);
            self.closed = true;
        }
    }

    /// Seals one record (see [`RecordKey::seal`]), first refreshing the write keys (TLS 1.3) if
    /// the confidentiality limit is reached; in TLS 1.2 the session ends there instead, as
    /// rustls's does.
    fn seal(&mut self, typ: u8, len: usize, out: &mut Vec<u8>, fill: impl FnOnce(&mut Vec<u8>)) -> Result<(), Fatal> {
        if self.closed {
            return Err(Fatal { alert: None, reason: "a write after the session ended" });
        }
        if self.tx.seq >= self.tx_limit {
            if self.version == Version::Tls12 {
                self.close_notify(out);
                return Err(Fatal { alert: None, reason: "the cipher suite's confidentiality limit was reached" });
            }
            self.send_key_update(out)?;
        }
        self.seal_record(typ, len, out, fill)
    }

    /// Seals `bytes` (a KeyUpdate, an alert) as one record of type `typ`.
    fn seal_bytes(&mut self, typ: u8, bytes: &[u8], out: &mut Vec<u8>) -> Result<(), Fatal> {
        self.seal_record(typ, bytes.len(), out, |out| out.extend_from_slice(bytes))
    }

    /// Seals one record appended to `out`, unless the sequence number reached its limit.
    fn seal_record(
        &mut self,
        typ: u8,
        len: usize,
        out: &mut Vec<u8>,
        fill: impl FnOnce(&mut Vec<u8>),
    ) -> Result<(), Fatal> {
        if self.tx.seq >= SEQ_LIMIT {
            self.closed = true;
            return Err(Fatal { alert: None, reason: "the write sequence number reached its limit" });
        }
        self.tx.seal(typ, len, out, fill)
    }
}

/// Seals `plaintext` (at most 2^14 bytes) as one record of content type `typ` (alert,
/// handshake or application data) at sequence number `seq`, under a fixed 32-byte key of
/// AES-256-GCM (`aes`) or ChaCha20-Poly1305, in TLS 1.3 (`tls13`) or 1.2, and opens it with
/// rustls's own decrypter of that suite. Panics unless the record is framed as its header says
/// and opens to `typ` and `plaintext`, and unless a changed byte or another sequence number
/// makes it fail to open (in TLS 1.2 the changed byte is the header's type, which the additional
/// data covers; TLS 1.3's header holds nothing the framing does not fix, so there it is a byte
/// of the ciphertext). For this module's tests and the `tls_records` fuzz target: rustls lets a
/// caller build only 32-byte keys, so AES-128-GCM is checked through real handshakes instead.
#[doc(hidden)]
pub fn seal_and_open_with_rustls(tls13: bool, aes: bool, seq: u64, typ: u8, plaintext: &[u8]) {
    assert!(plaintext.len() <= MAX_PLAINTEXT_BYTES && (ALERT..=APPLICATION_DATA).contains(&typ));
    let (suite, secrets) = test_suite_and_secrets(tls13, aes);
    let name = suite.suite();
    let mut sealer = RecordKey::new(tls13, &secrets(), seq).expect("a sealer for the suite");
    let mut opener = decrypter(suite, secrets()).expect("rustls's decrypter for the suite");
    let mut out = b"before".to_vec();
    sealer.seal(typ, plaintext.len(), &mut out, |out| out.extend_from_slice(plaintext)).expect("sealed");
    assert_eq!(&out[..6], b"before", "{name:?}: what was in the buffer stays");
    assert_eq!(sealer.seq(), seq.wrapping_add(1), "{name:?}: the sequence number advances");
    let record = &mut out[6..];
    let (header, payload) = next_record(record).expect("a record we sealed parses").expect("one whole record");
    assert_eq!(payload.end, record.len(), "{name:?}: the record is all that was appended");
    assert_eq!(header.version, 0x0303, "{name:?}: TLS 1.2 on the wire");
    assert_eq!(header.typ, if tls13 { APPLICATION_DATA } else { typ }, "{name:?}: the outer type");
    for (changed, other_seq) in [(true, false), (false, true)] {
        let mut damaged = record.to_vec();
        if changed && tls13 {
            damaged[HEADER_BYTES] ^= 0x01;
        } else if changed {
            damaged[0] = if typ == ALERT { HANDSHAKE } else { ALERT };
        }
        let message = InboundOpaqueMessage::new(
            ContentType::from(damaged[0]),
            ProtocolVersion::from(header.version),
            &mut damaged[payload.clone()],
        );
        let opened = opener.decrypt(message, if other_seq { seq ^ 1 } else { seq });
        assert!(opened.is_err(), "{name:?} seq {seq}: a damaged record opened");
    }
    let message = InboundOpaqueMessage::new(
        ContentType::from(header.typ),
        ProtocolVersion::from(header.version),
        &mut record[payload],
    );
    let opened = opener
        .decrypt(message, seq)
        .unwrap_or_else(|error| panic!("{name:?} seq {seq} type {typ}: rustls refused our record: {error:?}"));
    assert_eq!(u8::from(opened.typ), typ, "{name:?} seq {seq}: the inner type");
    assert!(opened.payload == plaintext, "{name:?} seq {seq}: another plaintext");
}

/// Seals `plaintext` (at most 2^14 bytes) as one record of content type `typ` at sequence
/// number `seq` with rustls's own encrypter of the suite (as [`seal_and_open_with_rustls`]
/// chooses it), and opens it with this module's [`RecordKey`], its plaintext shifted `shift`
/// bytes toward the front of the buffer (as the reader does to close the gaps between
/// records). Panics unless it opens to `typ` and `plaintext` at the shifted place, and unless
/// a changed byte, another sequence number, or a cut record fails to open. For this module's
/// tests and the `tls_records` fuzz target.
#[doc(hidden)]
pub fn seal_with_rustls_and_open(tls13: bool, aes: bool, seq: u64, typ: u8, plaintext: &[u8], shift: usize) {
    use rustls::crypto::cipher::{OutboundChunks, OutboundPlainMessage};
    assert!(plaintext.len() <= MAX_PLAINTEXT_BYTES && (ALERT..=APPLICATION_DATA).contains(&typ));
    let (suite, secrets) = test_suite_and_secrets(tls13, aes);
    let name = suite.suite();
    let (key, iv) = key_and_iv(secrets()).expect("a key and an IV");
    let mut encrypter = match suite {
        SupportedCipherSuite::Tls13(suite) => suite.aead_alg.encrypter(key, iv),
        SupportedCipherSuite::Tls12(suite) => {
            let fixed = suite.aead_alg.key_block_shape().fixed_iv_len;
            suite.aead_alg.encrypter(key, &iv.as_ref()[..fixed], &iv.as_ref()[fixed..])
        }
    };
    let message = OutboundPlainMessage {
        typ: ContentType::from(typ),
        version: ProtocolVersion::TLSv1_2,
        payload: OutboundChunks::from(plaintext),
    };
    let record = encrypter.encrypt(message, seq).expect("rustls sealed the record").encode();
    let opener = || RecordKey::new(tls13, &secrets(), seq).expect("an opener for the suite");
    let open = |opener: &mut RecordKey, record: &[u8]| {
        let mut buf = vec![0xee; shift];
        buf.extend_from_slice(record);
        let (header, payload) = match next_record(&buf[shift..]) {
            Ok(Some((header, payload))) => (header, shift + payload.start..shift + payload.end),
            other => return Err(format!("not one whole record: {other:?}")),
        };
        let (opened_typ, range) =
            opener.open(header, &mut buf, payload, 0).map_err(|fatal| fatal.reason.to_string())?;
        Ok((opened_typ, buf[range].to_vec()))
    };
    let mut damaged = record.clone();
    let middle = HEADER_BYTES + (damaged.len() - HEADER_BYTES) / 2;
    damaged[middle] ^= 0x20;
    assert!(open(&mut opener(), &damaged).is_err(), "{name:?} seq {seq}: a damaged record opened");
    let mut other_seq = RecordKey::new(tls13, &secrets(), seq ^ 1).expect("an opener");
    assert!(open(&mut other_seq, &record).is_err(), "{name:?} seq {seq}: a record opened at another sequence number");
    let mut cut = record[..record.len() - 1].to_vec();
    let cut_len = (cut.len() - HEADER_BYTES) as u16;
    cut[3..5].copy_from_slice(&cut_len.to_be_bytes());
    assert!(open(&mut opener(), &cut).is_err(), "{name:?} seq {seq}: a cut record opened");
    let mut opener = opener();
    let (opened_typ, opened) = open(&mut opener, &record)
        .unwrap_or_else(|error| panic!("{name:?} seq {seq}: rustls's record did not open: {error}"));
    assert_eq!(opened_typ, typ, "{name:?} seq {seq}: the content type");
    assert!(opened == plaintext, "{name:?} seq {seq}: another plaintext");
    assert_eq!(opener.seq(), seq.wrapping_add(1), "{name:?}: the sequence number advances");
}

/// A suite of TLS 1.3 (`tls13`) or 1.2, AES-256-GCM (`aes`) or ChaCha20-Poly1305, and fixed
/// secrets for it (rustls lets a caller build only 32-byte keys).
fn test_suite_and_secrets(tls13: bool, aes: bool) -> (SupportedCipherSuite, impl Fn() -> ConnectionTrafficSecrets) {
    use rustls::crypto::ring::cipher_suite as suites;
    let suite = match (tls13, aes) {
        (true, true) => suites::TLS13_AES_256_GCM_SHA384,
        (true, false) => suites::TLS13_CHACHA20_POLY1305_SHA256,
        (false, true) => suites::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        (false, false) => suites::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    };
    let secrets = move || {
        let key = rustls::crypto::cipher::AeadKey::from(std::array::from_fn(|index| index as u8 * 7 + 1));
        let iv = rustls::crypto::cipher::Iv::from(std::array::from_fn(|index| 0xa0 ^ (index as u8 * 13)));
        if aes {
            ConnectionTrafficSecrets::Aes256Gcm { key, iv }
        } else {
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv }
        }
    };
    (suite, secrets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_is_read_once_all_five_bytes_are_there() {
        let record = [23, 3, 3, 0, 2, 0xaa, 0xbb];
        for cut in 0..HEADER_BYTES {
            assert_eq!(parse_header(&record[..cut]), Ok(None), "cut at {cut}");
        }
        for cut in HEADER_BYTES..record.len() {
            assert_eq!(
                parse_header(&record[..cut]),
                Ok(Some(Header { typ: 23, version: 0x0303, len: 2 })),
                "cut at {cut}"
            );
            assert_eq!(next_record(&record[..cut]), Ok(None), "cut at {cut}");
        }
        assert_eq!(next_record(&record), Ok(Some((Header { typ: 23, version: 0x0303, len: 2 }, 5..7))));
    }

    #[test]
    fn records_follow_each_other_and_a_record_cut_at_any_byte_waits_for_the_rest() {
        // Three records of 0, 1 and 300 bytes, back to back.
        let mut wire = Vec::new();
        for len in [0usize, 1, 300] {
            wire.extend_from_slice(&[23, 3, 3, (len >> 8) as u8, len as u8]);
            wire.extend(std::iter::repeat_n(len as u8, len));
        }
        for cut in 0..=wire.len() {
            // Everything that arrived by `cut`, walked record by record.
            let (mut offset, mut lengths) = (0, Vec::new());
            while let Some((header, payload)) = next_record(&wire[offset..cut]).unwrap() {
                assert_eq!(payload.len(), header.len);
                assert!(wire[offset + payload.start..offset + payload.end]
                    .iter()
                    .all(|&byte| byte as usize == header.len % 256));
                lengths.push(header.len);
                offset += payload.end;
            }
            let whole = [0usize, 1, 300].into_iter().scan(0, |end, len| {
                *end += HEADER_BYTES + len;
                Some((*end, len))
            });
            let expected: Vec<usize> = whole.filter(|&(end, _)| end <= cut).map(|(_, len)| len).collect();
            assert_eq!(lengths, expected, "cut at {cut}");
        }
    }

    #[test]
    fn an_oversized_record_an_unknown_type_and_a_foreign_version_are_refused() {
        let overflow = ((MAX_CIPHERTEXT_BYTES + 1) as u16).to_be_bytes();
        let refused = parse_header(&[23, 3, 3, overflow[0], overflow[1]]).unwrap_err();
        assert_eq!(refused.alert, Some(Alert::RecordOverflow));
        let largest = (MAX_CIPHERTEXT_BYTES as u16).to_be_bytes();
        assert!(parse_header(&[23, 3, 3, largest[0], largest[1]]).unwrap().is_some());
        assert_eq!(parse_header(&[24, 3, 3, 0, 1]).unwrap_err().alert, Some(Alert::UnexpectedMessage));
        assert_eq!(parse_header(&[19, 3, 3, 0, 1]).unwrap_err().alert, Some(Alert::UnexpectedMessage));
        assert_eq!(parse_header(&[23, 2, 0, 0, 1]).unwrap_err().alert, Some(Alert::DecodeError));
        // An HTTP request sent to the TLS port.
        assert!(parse_header(b"GET / HTTP/1.1").is_err());
    }

    /// Records sealed in place open with rustls's own decrypter of the same suite, at sequence
    /// numbers small and large (the nonce rules), of every content type this layer seals and of
    /// every length up to a full record, in TLS 1.3 and 1.2, AES-256-GCM and ChaCha20-Poly1305
    /// (see [`seal_and_open_with_rustls`]; every suite, AES-128-GCM included, is also checked
    /// through real handshakes in `shard::tls_inplace`).
    #[test]
    fn sealed_records_open_with_rustls_decrypters_at_any_sequence_number() {
        for (tls13, aes) in [(true, true), (true, false), (false, true), (false, false)] {
            for seq in [0, 1, 255, 256, (1 << 32) + 7, 0x0123_4567_89ab_cdef, SEQ_LIMIT - 1] {
                for (index, (typ, len)) in [
                    (APPLICATION_DATA, 0),
                    (APPLICATION_DATA, 1),
                    (ALERT, 2),
                    (HANDSHAKE, 5),
                    (APPLICATION_DATA, 1000),
                    (APPLICATION_DATA, MAX_PLAINTEXT_BYTES),
                ]
                .into_iter()
                .enumerate()
                {
                    let plaintext: Vec<u8> = (0..len).map(|byte| (byte * 31 + index) as u8).collect();
                    seal_and_open_with_rustls(tls13, aes, seq, typ, &plaintext);
                }
            }
        }
    }

    /// Records sealed by rustls's own encrypters open here ([`RecordKey`], ring's AEAD called
    /// directly), in place and shifted toward the front of the buffer, at sequence numbers small
    /// and large, of every content type and length up to a full record, in TLS 1.3 and 1.2,
    /// AES-256-GCM and ChaCha20-Poly1305; damaged, cut or out-of-sequence ones do not (see
    /// [`seal_with_rustls_and_open`]).
    #[test]
    fn records_sealed_by_rustls_open_in_place_and_shifted_at_any_sequence_number() {
        for (tls13, aes) in [(true, true), (true, false), (false, true), (false, false)] {
            for seq in [0, 1, 255, 256, (1 << 32) + 7, 0x0123_4567_89ab_cdef, SEQ_LIMIT - 1] {
                for (index, (typ, len)) in [
                    (APPLICATION_DATA, 0),
                    (APPLICATION_DATA, 1),
                    (ALERT, 2),
                    (HANDSHAKE, 5),
                    (APPLICATION_DATA, 1000),
                    (APPLICATION_DATA, MAX_PLAINTEXT_BYTES),
                ]
                .into_iter()
                .enumerate()
                {
                    let plaintext: Vec<u8> = (0..len).map(|byte| (byte * 31 + index) as u8).collect();
                    for shift in [0, 1, 21, 4096] {
                        seal_with_rustls_and_open(tls13, aes, seq, typ, &plaintext, shift);
                    }
                }
            }
        }
    }

    /// One [`RecordKey`] type serves both directions: a record sealed by the writer's key opens
    /// with a key built from the same secrets at the same sequence number (in place and shifted),
    /// in TLS 1.3 and 1.2, AES-256-GCM and ChaCha20-Poly1305, for a full record too; both keys
    /// then stand at the next sequence number, and a key one record behind refuses it.
    #[test]
    fn a_record_sealed_by_one_key_opens_with_a_key_of_the_same_secrets() {
        for (tls13, aes) in [(true, true), (true, false), (false, true), (false, false)] {
            let (_, secrets) = test_suite_and_secrets(tls13, aes);
            for (seq, len, shift) in [(0, 0, 0), (7, 100, 3), (1 << 40, MAX_PLAINTEXT_BYTES, 64)] {
                let plaintext: Vec<u8> = (0..len).map(|byte| (byte * 13 + 1) as u8).collect();
                let mut sealer = RecordKey::new(tls13, &secrets(), seq).unwrap();
                let mut buf = vec![0xee; shift];
                sealer.seal(APPLICATION_DATA, len, &mut buf, |out| out.extend_from_slice(&plaintext)).unwrap();
                let (header, payload) = next_record(&buf[shift..]).unwrap().expect("one whole record");
                let payload = shift + payload.start..shift + payload.end;
                let mut behind = RecordKey::new(tls13, &secrets(), seq.wrapping_sub(1)).unwrap();
                let refused = behind.open(header, &mut buf.clone(), payload.clone(), payload.start).unwrap_err();
                assert_eq!(refused.alert, Some(Alert::BadRecordMac), "tls13 {tls13} aes {aes} seq {seq}");
                let mut opener = RecordKey::new(tls13, &secrets(), seq).unwrap();
                let (typ, range) = opener.open(header, &mut buf, payload, 0).unwrap();
                assert_eq!(typ, APPLICATION_DATA);
                assert!(buf[range] == plaintext[..], "tls13 {tls13} aes {aes} seq {seq}: another plaintext");
                assert_eq!((sealer.seq(), opener.seq()), (seq + 1, seq + 1));
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_the_parser(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..20_000)) {
            let mut offset = 0;
            while let Ok(Some((header, payload))) = next_record(&bytes[offset..]) {
                proptest::prop_assert!(header.len <= MAX_CIPHERTEXT_BYTES);
                proptest::prop_assert!(offset + payload.end <= bytes.len());
                offset += payload.end;
            }
        }
    }
}
