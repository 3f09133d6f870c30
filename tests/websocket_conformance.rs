//! RFC 6455 conformance of the real broker binary, byte by byte over a raw `TcpStream`: the HTTP
//! upgrade and its refusals, and every frame rule the broker enforces, each asserted by the
//! exact HTTP status or close code the broker answers with. Requests and frames are written by
//! hand here (masking included); nothing of the crate's WebSocket code is used.
//!
//! After each violation the test checks that the broker still serves a fresh session.

mod common;
#[path = "support/mbws_by_hand.rs"]
mod mbws_by_hand;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::Broker;
use mbws_by_hand::Reply;

/// Every read and write on a test socket gives up after this long.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
const RELIABLE: &str = "MBWS.huawei.com";
const LIGHT: &str = "MBLWS.huawei.com";
const WEBSOCKET_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

const FIN: u8 = 0x80;
const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

const PROTOCOL_ERROR: u16 = 1002;
const INVALID_PAYLOAD: u16 = 1007;
const MESSAGE_TOO_BIG: u16 = 1009;

fn start_broker() -> Broker {
    Broker::start(&["--shards", "1"])
}

// ---------------------------------------------------------------------------------------------
// Small independent helpers: pseudo-random bytes, base64, the accept key.

/// splitmix64 over a process-wide counter seeded from the clock: distinct keys and masks.
fn random_u64() -> u64 {
    static STATE: AtomicU64 = AtomicU64::new(0);
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    let mut z = STATE.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed) ^ seed;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn random_mask() -> [u8; 4] {
    let mask = (random_u64() as u32).to_be_bytes();
    // A mask of zeros would leave the payload readable as is; make masking observable.
    if mask == [0; 4] {
        [0x5a, 0xa5, 0x3c, 0xc3]
    } else {
        mask
    }
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let word = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for index in 0..4 {
            if index <= chunk.len() {
                out.push(ALPHABET[(word >> (18 - 6 * index)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn random_key() -> String {
    let mut nonce = [0u8; 16];
    nonce[..8].copy_from_slice(&random_u64().to_be_bytes());
    nonce[8..].copy_from_slice(&random_u64().to_be_bytes());
    base64(&nonce)
}

fn expected_accept(key: &str) -> String {
    let mut hasher = sha1_smol::Sha1::new();
    hasher.update(key.as_bytes());
    hasher.update(WEBSOCKET_GUID.as_bytes());
    base64(&hasher.digest().bytes())
}

#[test]
fn helpers_match_the_rfc_example() {
    // RFC 6455 section 1.3: the sample nonce and its accept value.
    assert_eq!(base64(b"the sample nonce"), "dGhlIHNhbXBsZSBub25jZQ==");
    assert_eq!(expected_accept("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
}

// ---------------------------------------------------------------------------------------------
// Raw HTTP.

fn tcp(broker: &Broker) -> TcpStream {
    let stream = TcpStream::connect(broker.addr).expect("connect to the broker");
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.set_nodelay(true).unwrap();
    stream
}

/// A valid upgrade request offering `protocols` (comma-separated as given).
fn upgrade_request(key: &str, protocols: &str) -> String {
    format!(
        "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {protocols}\r\n\r\n"
    )
}

/// A valid upgrade request (fresh key, offering MBWS) with the header `name` removed
/// (case-insensitive) and `extra` header lines added at the end.
fn request_without(name: &str, extra: &[&str]) -> String {
    let request = upgrade_request(&random_key(), RELIABLE);
    let prefix = format!("{}:", name.to_ascii_lowercase());
    let mut lines: Vec<&str> = request
        .trim_end_matches("\r\n")
        .split("\r\n")
        .filter(|line| !line.to_ascii_lowercase().starts_with(&prefix))
        .collect();
    lines.extend_from_slice(extra);
    format!("{}\r\n\r\n", lines.join("\r\n"))
}

/// A valid upgrade request with `extra` header lines added at the end.
fn request_with(extra: &[&str]) -> String {
    request_without("X-Not-Present", extra)
}

#[derive(Debug)]
struct HttpReply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
    /// Bytes read after the head (and body): the start of the WebSocket stream after a 101.
    leftover: Vec<u8>,
}

impl HttpReply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(known, _)| known.eq_ignore_ascii_case(name)).map(|(_, value)| value.as_str())
    }
}

fn read_some(stream: &mut TcpStream, buffer: &mut Vec<u8>, what: &str) -> usize {
    let mut chunk = [0u8; 16 * 1024];
    match stream.read(&mut chunk) {
        Ok(count) => {
            buffer.extend_from_slice(&chunk[..count]);
            count
        }
        Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            panic!(
                "timed out after {IO_TIMEOUT:?} waiting for {what}; got so far: {:?}",
                String::from_utf8_lossy(buffer)
            )
        }
        Err(error) => panic!("reading {what} failed: {error}; got so far: {:?}", String::from_utf8_lossy(buffer)),
    }
}

/// Reads an HTTP response head and, if it has a Content-Length, its body.
fn read_http_reply(stream: &mut TcpStream) -> HttpReply {
    let mut buffer = Vec::new();
    let head_end = loop {
        if let Some(position) = buffer.windows(4).position(|window| window == b"\r\n\r\n") {
            break position;
        }
        assert!(buffer.len() < 64 * 1024, "HTTP response head longer than 64 KiB");
        if read_some(stream, &mut buffer, "the HTTP response") == 0 {
            panic!("connection closed before a complete HTTP response; got {:?}", String::from_utf8_lossy(&buffer));
        }
    };
    let head = String::from_utf8(buffer[..head_end].to_vec()).expect("response head is UTF-8");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let mut parts = status_line.splitn(3, ' ');
    assert_eq!(parts.next(), Some("HTTP/1.1"), "status line {status_line:?}");
    let status: u16 =
        parts.next().and_then(|code| code.parse().ok()).unwrap_or_else(|| panic!("status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .map(|line| {
            let (name, value) = line.split_once(':').unwrap_or_else(|| panic!("header line {line:?}"));
            (name.trim().to_string(), value.trim().to_string())
        })
        .collect();
    let mut rest = buffer[head_end + 4..].to_vec();
    let content_length = headers
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
        .map(|(_, value)| value.parse::<usize>().expect("numeric Content-Length"));
    let mut body = Vec::new();
    if let Some(length) = content_length {
        while rest.len() < length {
            if read_some(stream, &mut rest, "the HTTP response body") == 0 {
                panic!("connection closed inside the body: {} of {length} bytes", rest.len());
            }
        }
        body = rest.drain(..length).collect();
    }
    HttpReply { status, headers, body: String::from_utf8(body).expect("body is UTF-8"), leftover: rest }
}

/// Asserts that the peer closes the TCP connection (EOF or reset) within the IO timeout,
/// discarding anything else it sends.
fn assert_tcp_closed(stream: &mut TcpStream, context: &str) {
    let deadline = Instant::now() + IO_TIMEOUT;
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => return,
            Ok(_) => {}
            Err(error) if error.kind() == ErrorKind::ConnectionReset => return,
            Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("{context}: the broker did not close the TCP connection within {IO_TIMEOUT:?}")
            }
            Err(error) => panic!("{context}: reading failed: {error}"),
        }
        assert!(Instant::now() < deadline, "{context}: the broker kept sending instead of closing");
    }
}

/// Sends `request` on a fresh connection; returns the refusal after checking that it is not a
/// 101, that it is plain text, and that the broker then closes the connection.
fn refusal(broker: &Broker, request: &[u8]) -> HttpReply {
    let mut stream = tcp(broker);
    stream.write_all(request).unwrap();
    let reply = read_http_reply(&mut stream);
    assert_ne!(reply.status, 101, "request must be refused: {:?}", String::from_utf8_lossy(request));
    let content_type = reply.header("Content-Type").unwrap_or_default().to_ascii_lowercase();
    assert!(content_type.starts_with("text/plain"), "refusal body is plain text: {reply:?}");
    assert!(!reply.body.trim().is_empty(), "refusal has a reason in its body: {reply:?}");
    assert_tcp_closed(&mut stream, &format!("after the {} refusal", reply.status));
    reply
}

fn assert_body_mentions(reply: &HttpReply, words: &[&str]) {
    let body = reply.body.to_ascii_lowercase();
    for word in words {
        assert!(
            body.contains(&word.to_ascii_lowercase()),
            "{} body must mention {word:?}: {:?}",
            reply.status,
            reply.body
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Raw WebSocket frames.

/// A frame header: `first` is FIN | RSV | opcode; a mask makes it a client frame.
fn frame_head(first: u8, mask: Option<[u8; 4]>, payload_bytes: u64) -> Vec<u8> {
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    let mut head = vec![first];
    if payload_bytes < 126 {
        head.push(mask_bit | payload_bytes as u8);
    } else if payload_bytes <= u64::from(u16::MAX) {
        head.push(mask_bit | 126);
        head.extend_from_slice(&(payload_bytes as u16).to_be_bytes());
    } else {
        head.push(mask_bit | 127);
        head.extend_from_slice(&payload_bytes.to_be_bytes());
    }
    if let Some(mask) = mask {
        head.extend_from_slice(&mask);
    }
    head
}

/// A whole client frame, masked with a fresh random key.
fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mask = random_mask();
    let mut frame = frame_head(first, Some(mask), payload.len() as u64);
    frame.extend(payload.iter().enumerate().map(|(index, byte)| byte ^ mask[index % 4]));
    frame
}

fn close_payload(code: u16, reason: &[u8]) -> Vec<u8> {
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(reason);
    payload
}

#[derive(Debug)]
struct ServerFrame {
    fin: bool,
    opcode: u8,
    payload: Vec<u8>,
}

/// An upgraded raw connection: the socket and the bytes read but not yet taken as frames.
struct WsConn {
    stream: TcpStream,
    pending: Vec<u8>,
}

impl WsConn {
    /// Upgrades a fresh connection offering `protocol`; checks 101, the accept key and the echo.
    fn open(broker: &Broker, protocol: &str) -> WsConn {
        let mut stream = tcp(broker);
        let key = random_key();
        stream.write_all(upgrade_request(&key, protocol).as_bytes()).unwrap();
        let reply = read_http_reply(&mut stream);
        assert_switched(&reply, &key, protocol);
        WsConn { stream, pending: reply.leftover }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap_or_else(|error| panic!("writing {} bytes failed: {error}", bytes.len()));
    }

    /// Writes, tolerating a broker that has already closed (it may decide before reading all).
    fn send_lenient(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes);
    }

    fn fill(&mut self, needed: usize, what: &str) {
        while self.pending.len() < needed {
            if read_some(&mut self.stream, &mut self.pending, what) == 0 {
                panic!("connection closed while waiting for {what}; pending bytes {:?}", self.pending);
            }
        }
    }

    /// Reads one frame from the broker; server frames must be unmasked and RSV-free.
    fn read_frame(&mut self) -> ServerFrame {
        self.fill(2, "a frame header");
        let first = self.pending[0];
        let second = self.pending[1];
        assert_eq!(first & 0x70, 0, "server frame has RSV bits set: {first:#04x}");
        assert_eq!(second & 0x80, 0, "server frames must not be masked");
        let (length, head_bytes) = match second & 0x7f {
            126 => {
                self.fill(4, "a 16-bit frame length");
                (u64::from(u16::from_be_bytes([self.pending[2], self.pending[3]])), 4)
            }
            127 => {
                self.fill(10, "a 64-bit frame length");
                (u64::from_be_bytes(self.pending[2..10].try_into().unwrap()), 10)
            }
            short => (u64::from(short), 2),
        };
        let total = head_bytes + usize::try_from(length).unwrap();
        self.fill(total, "a frame payload");
        let payload = self.pending[head_bytes..total].to_vec();
        self.pending.drain(..total);
        ServerFrame { fin: first & FIN != 0, opcode: first & 0x0f, payload }
    }

    /// The next frame must be a close frame with `code`; then the broker must close TCP.
    /// Returns the close reason.
    fn expect_close(&mut self, code: u16) -> String {
        self.expect_close_in(code, "")
    }

    /// [`WsConn::expect_close`], naming the case (`context`) in failure messages.
    fn expect_close_in(&mut self, code: u16, context: &str) -> String {
        let frame = self.read_frame();
        assert_eq!(frame.opcode, OP_CLOSE, "{context}: expected a close frame with {code}, got {frame:?}");
        assert!(frame.fin, "{context}: close frame must not be fragmented");
        assert!(frame.payload.len() >= 2, "{context}: close frame must carry a code, got {:?}", frame.payload);
        let got = u16::from_be_bytes([frame.payload[0], frame.payload[1]]);
        let reason = String::from_utf8(frame.payload[2..].to_vec()).expect("close reason is UTF-8");
        assert_eq!(got, code, "{context}: close code (reason {reason:?})");
        assert!(self.pending.is_empty(), "{context}: bytes after the close frame: {:?}", self.pending);
        assert_tcp_closed(&mut self.stream, &format!("{context}: after close {code}"));
        reason
    }

    /// Sends a binary MBWS frame and returns the hand-parsed binary reply.
    fn mbws_binary(&mut self, frame: &[u8]) -> Reply {
        self.send(&client_frame(FIN | OP_BINARY, frame));
        let reply = self.read_frame();
        assert_eq!(reply.opcode, OP_BINARY, "MBWS reply to a binary frame is binary: {reply:?}");
        mbws_by_hand::parse_binary(&reply.payload).unwrap_or_else(|error| panic!("bad MBWS reply: {error}"))
    }
}

fn assert_switched(reply: &HttpReply, key: &str, protocol: &str) {
    assert_eq!(reply.status, 101, "upgrade must succeed: {reply:?}");
    assert!(reply.header("Upgrade").is_some_and(|value| value.eq_ignore_ascii_case("websocket")), "{reply:?}");
    assert!(
        reply.header("Connection").is_some_and(|value| value.to_ascii_lowercase().contains("upgrade")),
        "{reply:?}"
    );
    assert_eq!(reply.header("Sec-WebSocket-Accept"), Some(expected_accept(key).as_str()), "{reply:?}");
    assert_eq!(reply.header("Sec-WebSocket-Protocol"), Some(protocol), "subprotocol echoed: {reply:?}");
}

fn assert_opened(reply: Reply) {
    match reply {
        Reply::Opened { version, session_id, .. } => {
            assert_eq!(version, 1);
            assert!(!session_id.is_empty(), "OPENED names the session");
        }
        other => panic!("expected OPENED, got {other:?}"),
    }
}

/// After a violation on another connection: a fresh session opens, answers an MBWS PING and a
/// WebSocket ping, and closes cleanly.
fn assert_broker_still_serves(broker: &Broker) {
    let mut conn = WsConn::open(broker, RELIABLE);
    assert_opened(conn.mbws_binary(&mbws_by_hand::binary_open()));
    assert_eq!(conn.mbws_binary(&mbws_by_hand::binary_ping(42)), Reply::Pong { token: 42 });
    conn.send(&client_frame(FIN | OP_PING, b"still alive"));
    let pong = conn.read_frame();
    assert_eq!((pong.opcode, pong.payload.as_slice()), (OP_PONG, &b"still alive"[..]));
    conn.send(&client_frame(FIN | OP_CLOSE, &close_payload(1000, b"")));
    conn.expect_close(1000);
}

// ---------------------------------------------------------------------------------------------
// Handshake.

#[test]
fn upgrade_answers_101_with_accept_key_and_each_subprotocol() {
    let broker = start_broker();
    for (offered, chosen) in [
        (RELIABLE, RELIABLE),
        (LIGHT, LIGHT),
        ("chat, MBLWS.huawei.com", LIGHT),
        ("MBWS.huawei.com, MBLWS.huawei.com", RELIABLE),
        ("MBLWS.huawei.com, MBWS.huawei.com", LIGHT),
    ] {
        let mut stream = tcp(&broker);
        let key = random_key();
        stream.write_all(upgrade_request(&key, offered).as_bytes()).unwrap();
        let reply = read_http_reply(&mut stream);
        assert_switched(&reply, &key, chosen);
        assert!(reply.leftover.is_empty(), "nothing follows the 101 before OPEN: {:?}", reply.leftover);
    }
}

#[test]
fn upgrade_headers_are_case_insensitive_token_lists() {
    // As browsers send them: `Connection: keep-alive, Upgrade`, `Upgrade: WebSocket`, lower-case
    // header names.
    let broker = start_broker();
    let key = random_key();
    let request = format!(
        "GET /?client=test HTTP/1.1\r\nhost: 127.0.0.1\r\nupgrade: WebSocket\r\nconnection: keep-alive, Upgrade\r\n\
         sec-websocket-key: {key}\r\nsec-websocket-version: 13\r\nsec-websocket-protocol: {LIGHT}\r\n\
         Origin: http://example.test\r\n\r\n"
    );
    let mut stream = tcp(&broker);
    stream.write_all(request.as_bytes()).unwrap();
    let reply = read_http_reply(&mut stream);
    assert_switched(&reply, &key, LIGHT);
}

#[test]
fn non_get_method_is_refused_with_405_and_allow_get() {
    let broker = start_broker();
    let request = upgrade_request(&random_key(), RELIABLE).replacen("GET", "POST", 1);
    let reply = refusal(&broker, request.as_bytes());
    assert_eq!(reply.status, 405, "{reply:?}");
    assert_eq!(reply.header("Allow"), Some("GET"), "{reply:?}");
    assert_body_mentions(&reply, &["POST", "GET"]);
    assert_broker_still_serves(&broker);
}

#[test]
fn path_other_than_root_is_refused_with_404() {
    let broker = start_broker();
    let request = upgrade_request(&random_key(), RELIABLE).replacen("GET / ", "GET /chat ", 1);
    let reply = refusal(&broker, request.as_bytes());
    assert_eq!(reply.status, 404, "{reply:?}");
    assert_body_mentions(&reply, &["/chat"]);
    assert_broker_still_serves(&broker);
}

#[test]
fn missing_host_is_refused_with_400() {
    let broker = start_broker();
    let reply = refusal(&broker, request_without("Host", &[]).as_bytes());
    assert_eq!(reply.status, 400, "{reply:?}");
    assert_body_mentions(&reply, &["Host"]);
    assert_broker_still_serves(&broker);
}

#[test]
fn missing_or_bad_websocket_key_is_refused_with_400() {
    let broker = start_broker();
    let missing = refusal(&broker, request_without("Sec-WebSocket-Key", &[]).as_bytes());
    assert_eq!(missing.status, 400, "{missing:?}");
    assert_body_mentions(&missing, &["Sec-WebSocket-Key"]);
    let fifteen_bytes = base64(b"fifteen bytes!!");
    let duplicated = request_with(&[&format!("Sec-WebSocket-Key: {}", random_key())]);
    let reply = refusal(&broker, duplicated.as_bytes());
    assert_eq!(reply.status, 400, "two keys: {reply:?}");
    assert_body_mentions(&reply, &["Sec-WebSocket-Key"]);
    for bad in ["not base64 at all!", "abc", fifteen_bytes.as_str()] {
        let header = format!("Sec-WebSocket-Key: {bad}");
        let reply = refusal(&broker, request_without("Sec-WebSocket-Key", &[&header]).as_bytes());
        assert_eq!(reply.status, 400, "key {bad:?}: {reply:?}");
        assert_body_mentions(&reply, &["Sec-WebSocket-Key"]);
    }
    assert_broker_still_serves(&broker);
}

#[test]
fn missing_upgrade_websocket_is_refused_with_400() {
    let broker = start_broker();
    for extra in [&[][..], &["Upgrade: h2c"]] {
        let reply = refusal(&broker, request_without("Upgrade", extra).as_bytes());
        assert_eq!(reply.status, 400, "{extra:?}: {reply:?}");
        assert_body_mentions(&reply, &["Upgrade", "websocket"]);
    }
    assert_broker_still_serves(&broker);
}

#[test]
fn missing_connection_upgrade_is_refused_with_400() {
    let broker = start_broker();
    for extra in [&[][..], &["Connection: keep-alive"]] {
        let reply = refusal(&broker, request_without("Connection", extra).as_bytes());
        assert_eq!(reply.status, 400, "{extra:?}: {reply:?}");
        assert_body_mentions(&reply, &["Connection"]);
    }
    assert_broker_still_serves(&broker);
}

#[test]
fn no_supported_subprotocol_is_refused_with_400_naming_both() {
    let broker = start_broker();
    let none_offered = request_without("Sec-WebSocket-Protocol", &[]);
    let others_offered = request_without("Sec-WebSocket-Protocol", &["Sec-WebSocket-Protocol: chat, mbws.huawei.com"]);
    for request in [none_offered, others_offered] {
        let reply = refusal(&broker, request.as_bytes());
        assert_eq!(reply.status, 400, "{reply:?}");
        assert!(reply.body.contains(RELIABLE) && reply.body.contains(LIGHT), "body names both subprotocols: {reply:?}");
    }
    assert_broker_still_serves(&broker);
}

#[test]
fn other_websocket_version_is_refused_with_426_and_version_13() {
    let broker = start_broker();
    for version in ["8", "14"] {
        let request = upgrade_request(&random_key(), RELIABLE).replacen(
            "Sec-WebSocket-Version: 13",
            &format!("Sec-WebSocket-Version: {version}"),
            1,
        );
        let reply = refusal(&broker, request.as_bytes());
        assert_eq!(reply.status, 426, "version {version}: {reply:?}");
        assert_eq!(reply.header("Sec-WebSocket-Version"), Some("13"), "{reply:?}");
        assert_body_mentions(&reply, &["version"]);
    }
    assert_broker_still_serves(&broker);
}

#[test]
fn header_block_over_8_kib_is_refused_with_431() {
    let broker = start_broker();
    // A complete request just over the limit.
    let filler = format!("X-Filler: {}", "a".repeat(8192));
    let reply = refusal(&broker, request_with(&[&filler]).as_bytes());
    assert_eq!(reply.status, 431, "{reply:?}");
    assert_body_mentions(&reply, &["8192"]);
    // A header block that never ends: refused once it passes the limit, without waiting for
    // the blank line.
    let unterminated = format!("GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Filler: {}", "b".repeat(9000));
    let reply = refusal(&broker, unterminated.as_bytes());
    assert_eq!(reply.status, 431, "{reply:?}");
    // Just under the limit is fine.
    let request = request_with(&[]);
    let room = 8192 - request.len() - "X-Filler: \r\n".len();
    let fits = format!("X-Filler: {}", "c".repeat(room));
    let request = request_with(&[&fits]);
    assert_eq!(request.len(), 8192);
    let mut stream = tcp(&broker);
    stream.write_all(request.as_bytes()).unwrap();
    assert_eq!(read_http_reply(&mut stream).status, 101, "an 8192-byte request is within the limit");
    assert_broker_still_serves(&broker);
}

/// Sends an incomplete request (or nothing) to a broker with a 300 ms handshake timeout and
/// checks the 408 and its timing; returns the socket for the caller's further checks.
fn expect_408(broker: &Broker, partial_request: &[u8]) -> TcpStream {
    let mut stream = tcp(broker);
    let started = Instant::now();
    stream.write_all(partial_request).unwrap();
    let reply = read_http_reply(&mut stream);
    let waited = started.elapsed();
    assert_eq!(reply.status, 408, "{reply:?}");
    assert!(waited >= Duration::from_millis(250), "408 came after {waited:?}, before the 300 ms timeout");
    assert_body_mentions(&reply, &["300", "timeout"]);
    stream
}

#[test]
fn incomplete_request_gets_408_after_the_handshake_timeout() {
    let broker = Broker::start(&["--shards", "1", "--handshake-timeout-ms", "300"]);
    expect_408(&broker, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n");
    expect_408(&broker, b"");
    assert_broker_still_serves(&broker);
}

#[test]
fn connection_is_closed_after_the_408() {
    let broker = Broker::start(&["--shards", "1", "--handshake-timeout-ms", "300"]);
    let mut stream = expect_408(&broker, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    assert_tcp_closed(&mut stream, "after 408 (incomplete request)");
    let mut stream = expect_408(&broker, b"");
    assert_tcp_closed(&mut stream, "after 408 (silent client)");
    assert_broker_still_serves(&broker);
}

#[test]
fn request_split_across_many_small_writes_succeeds() {
    let broker = start_broker();
    let mut stream = tcp(&broker);
    let key = random_key();
    let request = upgrade_request(&key, LIGHT);
    for piece in request.as_bytes().chunks(3) {
        stream.write_all(piece).unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    let reply = read_http_reply(&mut stream);
    assert_switched(&reply, &key, LIGHT);
    let mut conn = WsConn { stream, pending: reply.leftover };
    assert_opened(conn.mbws_binary(&mbws_by_hand::binary_open()));
}

#[test]
fn first_frame_in_the_same_write_as_the_request_is_processed() {
    let broker = start_broker();
    let mut stream = tcp(&broker);
    let key = random_key();
    let mut bytes = upgrade_request(&key, RELIABLE).into_bytes();
    bytes.extend_from_slice(&client_frame(FIN | OP_BINARY, &mbws_by_hand::binary_open()));
    bytes.extend_from_slice(&client_frame(FIN | OP_PING, b"same write"));
    stream.write_all(&bytes).unwrap();
    let reply = read_http_reply(&mut stream);
    assert_switched(&reply, &key, RELIABLE);
    let mut conn = WsConn { stream, pending: reply.leftover };
    let opened = conn.read_frame();
    assert_eq!(opened.opcode, OP_BINARY, "{opened:?}");
    assert_opened(mbws_by_hand::parse_binary(&opened.payload).unwrap());
    let pong = conn.read_frame();
    assert_eq!((pong.opcode, pong.payload.as_slice()), (OP_PONG, &b"same write"[..]));
}

// ---------------------------------------------------------------------------------------------
// Frame rules.

#[test]
fn unmasked_client_frame_closes_with_1002() {
    let broker = start_broker();
    let mut conn = WsConn::open(&broker, RELIABLE);
    let open = mbws_by_hand::binary_open();
    let mut frame = frame_head(FIN | OP_BINARY, None, open.len() as u64);
    frame.extend_from_slice(&open);
    conn.send(&frame);
    conn.expect_close(PROTOCOL_ERROR);
    assert_broker_still_serves(&broker);
}

#[test]
fn rsv_bits_close_with_1002() {
    let broker = start_broker();
    for rsv in [0x40u8, 0x20, 0x10] {
        let mut conn = WsConn::open(&broker, RELIABLE);
        conn.send(&client_frame(FIN | rsv | OP_BINARY, &mbws_by_hand::binary_open()));
        conn.expect_close_in(PROTOCOL_ERROR, &format!("RSV bits {rsv:#04x}"));
    }
    // Also on a control frame, after a successful OPEN.
    let mut conn = WsConn::open(&broker, RELIABLE);
    assert_opened(conn.mbws_binary(&mbws_by_hand::binary_open()));
    conn.send(&client_frame(FIN | 0x40 | OP_PING, b"x"));
    conn.expect_close(PROTOCOL_ERROR);
    assert_broker_still_serves(&broker);
}

#[test]
fn reserved_opcodes_close_with_1002() {
    let broker = start_broker();
    for opcode in (0x3u8..=0x7).chain(0xB..=0xF) {
        let mut conn = WsConn::open(&broker, RELIABLE);
        conn.send(&client_frame(FIN | opcode, b"reserved"));
        conn.expect_close_in(PROTOCOL_ERROR, &format!("opcode {opcode:#x}"));
    }
    assert_broker_still_serves(&broker);
}

#[test]
fn fragmented_control_frame_closes_with_1002() {
    let broker = start_broker();
    for opcode in [OP_PING, OP_PONG, OP_CLOSE] {
        let mut conn = WsConn::open(&broker, RELIABLE);
        // FIN clear on a control frame.
        conn.send(&client_frame(opcode, b"part"));
        conn.expect_close_in(PROTOCOL_ERROR, &format!("control opcode {opcode:#x} without FIN"));
    }
    assert_broker_still_serves(&broker);
}

#[test]
fn control_payload_over_125_bytes_closes_with_1002() {
    let broker = start_broker();
    for opcode in [OP_PING, OP_PONG] {
        let mut conn = WsConn::open(&broker, RELIABLE);
        conn.send(&client_frame(FIN | opcode, &[b'p'; 126]));
        conn.expect_close_in(PROTOCOL_ERROR, &format!("126-byte control opcode {opcode:#x}"));
    }
    // A close frame whose reason makes it 126 bytes.
    let mut conn = WsConn::open(&broker, RELIABLE);
    conn.send(&client_frame(FIN | OP_CLOSE, &close_payload(1000, &[b'r'; 124])));
    conn.expect_close(PROTOCOL_ERROR);
    // 125 bytes is allowed and echoed.
    let mut conn = WsConn::open(&broker, RELIABLE);
    conn.send(&client_frame(FIN | OP_PING, &[b'q'; 125]));
    let pong = conn.read_frame();
    assert_eq!((pong.opcode, pong.payload.len()), (OP_PONG, 125));
    assert_broker_still_serves(&broker);
}

#[test]
fn continuation_without_a_started_message_closes_with_1002() {
    let broker = start_broker();
    for first in [FIN | OP_CONTINUATION, OP_CONTINUATION] {
        let mut conn = WsConn::open(&broker, RELIABLE);
        conn.send(&client_frame(first, b"orphan"));
        conn.expect_close_in(PROTOCOL_ERROR, &format!("first byte {first:#04x}"));
    }
    assert_broker_still_serves(&broker);
}

#[test]
fn new_data_frame_inside_a_fragmented_message_closes_with_1002() {
    let broker = start_broker();
    for (started, intruder) in [(OP_TEXT, OP_TEXT), (OP_TEXT, OP_BINARY), (OP_BINARY, OP_BINARY)] {
        let mut conn = WsConn::open(&broker, RELIABLE);
        conn.send(&client_frame(started, b"OPEN\n"));
        conn.send(&client_frame(FIN | intruder, b"version:1\n\n"));
        conn.expect_close_in(PROTOCOL_ERROR, &format!("opcode {intruder:#x} inside opcode {started:#x}"));
    }
    assert_broker_still_serves(&broker);
}

#[test]
fn invalid_utf8_text_message_closes_with_1007() {
    let broker = start_broker();
    let invalid: [&[u8]; 4] = [b"OPEN\n\xff\n\n", b"\xc0\xaf", b"\xed\xa0\x80", b"OPEN\nversion:1\n\n\xe2\x82"];
    for payload in invalid {
        let mut conn = WsConn::open(&broker, RELIABLE);
        conn.send(&client_frame(FIN | OP_TEXT, payload));
        conn.expect_close_in(INVALID_PAYLOAD, &format!("text {payload:?}"));
    }
    assert_broker_still_serves(&broker);
}

#[test]
fn invalid_utf8_split_across_fragments_closes_with_1007() {
    let broker = start_broker();
    // A valid start of a 3-byte sequence at the end of one fragment, a bad continuation byte at
    // the start of the next.
    let mut conn = WsConn::open(&broker, RELIABLE);
    conn.send(&client_frame(OP_TEXT, b"OPEN\nversion:1\n\n\xe2\x82"));
    conn.send(&client_frame(FIN | OP_CONTINUATION, b"("));
    conn.expect_close(INVALID_PAYLOAD);
    // A sequence left incomplete by the final fragment.
    let mut conn = WsConn::open(&broker, RELIABLE);
    conn.send(&client_frame(OP_TEXT, b"PING\n\n"));
    conn.send(&client_frame(OP_CONTINUATION, b"\xf0\x9f"));
    conn.send(&client_frame(FIN | OP_CONTINUATION, b"\x98"));
    conn.expect_close(INVALID_PAYLOAD);
    // Invalid bytes in a first fragment fail at once, without waiting for the rest.
    let mut conn = WsConn::open(&broker, RELIABLE);
    conn.send(&client_frame(OP_TEXT, b"OPEN\n\xff"));
    conn.expect_close(INVALID_PAYLOAD);
    // Control: a multi-byte character split across fragments is fine.
    let mut conn = WsConn::open(&broker, RELIABLE);
    conn.send(&client_frame(OP_TEXT, b"OPEN\nversion:1\n\n"));
    conn.send(&client_frame(FIN | OP_CONTINUATION, b""));
    let opened = conn.read_frame();
    assert_eq!(opened.opcode, OP_TEXT, "{opened:?}");
    conn.send(&client_frame(OP_TEXT, b"SEND\nseq:1\naddress:utf8\n\n\xe2\x82"));
    conn.send(&client_frame(FIN | OP_CONTINUATION, b"\xac euro"));
    let receipt = conn.read_frame();
    assert_eq!(receipt.opcode, OP_TEXT, "{receipt:?}");
    let text = String::from_utf8(receipt.payload).unwrap();
    assert_eq!(mbws_by_hand::parse_text(&text), Ok(Reply::Receipt { seq: 1 }));
    assert_broker_still_serves(&broker);
}

#[test]
fn invalid_utf8_close_reason_closes_with_1007() {
    let broker = start_broker();
    let mut conn = WsConn::open(&broker, RELIABLE);
    conn.send(&client_frame(FIN | OP_CLOSE, &close_payload(1000, b"bye \xff\xfe")));
    conn.expect_close(INVALID_PAYLOAD);
    assert_broker_still_serves(&broker);
}

#[test]
fn invalid_close_codes_close_with_1002() {
    let broker = start_broker();
    for code in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000] {
        let mut conn = WsConn::open(&broker, RELIABLE);
        conn.send(&client_frame(FIN | OP_CLOSE, &close_payload(code, b"")));
        conn.expect_close_in(PROTOCOL_ERROR, &format!("sent close code {code}"));
    }
    // A one-byte close payload cannot hold a code.
    let mut conn = WsConn::open(&broker, RELIABLE);
    conn.send(&client_frame(FIN | OP_CLOSE, &[0x03]));
    conn.expect_close(PROTOCOL_ERROR);
    assert_broker_still_serves(&broker);
}

#[test]
fn frame_over_max_frame_bytes_closes_with_1009_from_the_header() {
    let broker = Broker::start(&["--shards", "1", "--max-frame-bytes", "65536"]);
    let mut conn = WsConn::open(&broker, RELIABLE);
    assert_opened(conn.mbws_binary(&mbws_by_hand::binary_open()));
    // Only the header, announcing 65537 bytes: the broker must decide without the payload.
    conn.send(&frame_head(FIN | OP_BINARY, Some(random_mask()), 65_537));
    conn.expect_close(MESSAGE_TOO_BIG);
    // A 64-bit length far beyond any limit, also header only.
    let mut conn = WsConn::open(&broker, RELIABLE);
    conn.send(&frame_head(FIN | OP_TEXT, Some(random_mask()), 1 << 40));
    conn.expect_close(MESSAGE_TOO_BIG);
    // Exactly at the limit is accepted: a SEND of 65536 bytes gets its receipt.
    let mut conn = WsConn::open(&broker, RELIABLE);
    assert_opened(conn.mbws_binary(&mbws_by_hand::binary_open()));
    let header = mbws_by_hand::binary_send(1, "big", b"");
    let body = vec![b'z'; 65_536 - header.len()];
    assert_eq!(conn.mbws_binary(&mbws_by_hand::binary_send(1, "big", &body)), Reply::Receipt { seq: 1 });
    assert_broker_still_serves(&broker);
}

#[test]
fn reassembled_message_over_max_message_bytes_closes_with_1009() {
    let broker = Broker::start(&["--shards", "1", "--max-frame-bytes", "65536", "--max-message-bytes", "131072"]);
    let mut conn = WsConn::open(&broker, RELIABLE);
    assert_opened(conn.mbws_binary(&mbws_by_hand::binary_open()));
    let fragment = vec![b'f'; 60_000];
    conn.send(&client_frame(OP_BINARY, &mbws_by_hand::binary_send(1, "big", &fragment)));
    conn.send(&client_frame(OP_CONTINUATION, &fragment));
    // 180 000 bytes in all, over 131 072; each frame is under 65 536.
    conn.send_lenient(&client_frame(FIN | OP_CONTINUATION, &fragment));
    conn.expect_close(MESSAGE_TOO_BIG);
    // A fragmented message under the limit is reassembled and processed.
    let mut conn = WsConn::open(&broker, RELIABLE);
    assert_opened(conn.mbws_binary(&mbws_by_hand::binary_open()));
    conn.send(&client_frame(OP_BINARY, &mbws_by_hand::binary_send(1, "big", &fragment)));
    conn.send(&client_frame(FIN | OP_CONTINUATION, &fragment));
    let receipt = conn.read_frame();
    assert_eq!(mbws_by_hand::parse_binary(&receipt.payload), Ok(Reply::Receipt { seq: 1 }));
    assert_broker_still_serves(&broker);
}

#[test]
fn ping_is_answered_with_pong_carrying_the_same_payload() {
    let broker = start_broker();
    let mut conn = WsConn::open(&broker, RELIABLE);
    for payload in [&b""[..], b"hello", &[0u8, 255, 128, 7][..]] {
        conn.send(&client_frame(FIN | OP_PING, payload));
        let pong = conn.read_frame();
        assert!(pong.fin);
        assert_eq!((pong.opcode, pong.payload.as_slice()), (OP_PONG, payload));
    }
    // An unsolicited pong is ignored: the connection goes on.
    conn.send(&client_frame(FIN | OP_PONG, b"unsolicited"));
    assert_opened(conn.mbws_binary(&mbws_by_hand::binary_open()));
}

#[test]
fn ping_between_fragments_is_answered_and_the_message_completes() {
    let broker = start_broker();
    let mut conn = WsConn::open(&broker, RELIABLE);
    conn.send(&client_frame(OP_TEXT, b"OPEN\nver"));
    conn.send(&client_frame(FIN | OP_PING, b"between"));
    let pong = conn.read_frame();
    assert_eq!((pong.opcode, pong.payload.as_slice()), (OP_PONG, &b"between"[..]));
    conn.send(&client_frame(OP_CONTINUATION, b"sion:"));
    conn.send(&client_frame(FIN | OP_PING, b"again"));
    conn.send(&client_frame(FIN | OP_CONTINUATION, b"1\n\n"));
    let pong = conn.read_frame();
    assert_eq!((pong.opcode, pong.payload.as_slice()), (OP_PONG, &b"again"[..]));
    let opened = conn.read_frame();
    assert_eq!(opened.opcode, OP_TEXT, "{opened:?}");
    assert_opened(mbws_by_hand::parse_text(&String::from_utf8(opened.payload).unwrap()).unwrap());
}

#[test]
fn client_close_is_echoed_and_tcp_closed() {
    let broker = start_broker();
    // Before OPEN, with a reason.
    let mut conn = WsConn::open(&broker, RELIABLE);
    conn.send(&client_frame(FIN | OP_CLOSE, &close_payload(1000, b"bye")));
    conn.expect_close(1000);
    // After OPEN, with an application code.
    let mut conn = WsConn::open(&broker, LIGHT);
    assert_opened(conn.mbws_binary(&mbws_by_hand::binary_open()));
    conn.send(&client_frame(FIN | OP_CLOSE, &close_payload(4000, b"")));
    conn.expect_close(4000);
    // An empty close frame gets a close frame back (empty or 1000).
    let mut conn = WsConn::open(&broker, RELIABLE);
    conn.send(&client_frame(FIN | OP_CLOSE, b""));
    let frame = conn.read_frame();
    assert_eq!(frame.opcode, OP_CLOSE, "{frame:?}");
    assert!(frame.payload.is_empty() || frame.payload.starts_with(&[0x03, 0xe8]), "{frame:?}");
    assert_tcp_closed(&mut conn.stream, "after an empty close");
    assert_broker_still_serves(&broker);
}
