//! The HTTP/1.1 opening handshake (RFC 6455 section 4), both sides, without IO.
//!
//! Server side: [`parse_request`] finds a complete header block in the bytes read so far (a
//! request may arrive split across reads, and the first WebSocket frame may follow it in the
//! same read: only the header block is consumed). [`validate_upgrade`] checks it and negotiates
//! the subprotocol; the result goes into [`accept_response`], or a refusal into
//! [`HandshakeError::response`]. This layer knows no subprotocol of its own: the protocol built
//! on it (MBWS) names the ones it speaks by implementing [`Subprotocol`].
//!
//! Client side: [`client_request`], [`parse_response`], [`verify_accept`].
//!
//! Limits: the header block is at most the caller's `max_request_bytes` (431 beyond it, detected
//! without waiting for the end of the block) and at most [`MAX_HEADER_COUNT`] fields. The parser
//! is stateless: it rescans the buffered block on each call, which the byte limit keeps cheap.
//! Header text must be UTF-8 (in practice ASCII); obsolete line folding is refused.
//!
//! Status codes for a refused upgrade: 405 (not GET), 404 (not `/`), 426 (missing or other
//! `Sec-WebSocket-Version`), 431 (too large), 400 for everything else, including a missing or
//! wrong `Upgrade` header (RFC 6455 allows 400 there, and the reason says what is missing). A
//! server may refuse for reasons of its own with [`HandshakeError::new`] (the broker: 403 for
//! an origin, 408 for a slow request, 503 while draining, sent with `Retry-After`).

use std::fmt;

/// A subprotocol this side speaks, named by its `Sec-WebSocket-Protocol` token. The handshake
/// negotiates among [`Subprotocol::ALL`] and hands the chosen value back, so the WebSocket layer
/// depends on no subprotocol's types (MBWS implements this for its own enum).
pub trait Subprotocol: Copy + fmt::Debug + Eq + 'static {
    /// Every subprotocol spoken, in the order a refusal lists them.
    const ALL: &'static [Self];

    /// The token exchanged in `Sec-WebSocket-Protocol`.
    fn token(self) -> &'static str;

    /// The subprotocol `token` names exactly (subprotocol tokens are case-sensitive).
    fn from_token(token: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|protocol| protocol.token() == token)
    }
}

/// Most header fields accepted in a request or response (431 beyond it).
pub const MAX_HEADER_COUNT: usize = 100;

/// Appended to the client key before hashing (RFC 6455 section 1.3).
const WEBSOCKET_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// The only protocol version this implementation speaks.
const WEBSOCKET_VERSION: &str = "13";

/// Length of the decoded `Sec-WebSocket-Key` nonce.
const KEY_NONCE_BYTES: usize = 16;

/// Longest piece of peer input echoed back inside an error reason.
const MAX_ECHOED_INPUT_BYTES: usize = 80;

/// A parsed HTTP request head. Header names keep their original case; lookups ignore it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRequest {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
}

impl HttpRequest {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        first_header(&self.headers, name)
    }

    /// Every value of header `name` (case-insensitive), in order of appearance.
    pub fn header_values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> {
        header_values(&self.headers, name)
    }
}

/// A parsed HTTP response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    pub status: u16,
    pub reason: String,
    pub headers: Vec<(String, String)>,
}

impl HttpResponse {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        first_header(&self.headers, name)
    }

    /// Every value of header `name` (case-insensitive), in order of appearance.
    pub fn header_values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> {
        header_values(&self.headers, name)
    }
}

fn header_values<'a>(headers: &'a [(String, String)], name: &'a str) -> impl Iterator<Item = &'a str> {
    headers.iter().filter(move |(field, _)| field.eq_ignore_ascii_case(name)).map(|(_, value)| value.as_str())
}

fn first_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(field, _)| field.eq_ignore_ascii_case(name)).map(|(_, value)| value.as_str())
}

/// A refused handshake: the HTTP status to answer with and a reason for the peer.
///
/// On the client side ([`parse_response`]) `status` classifies the problem the same way
/// (400 malformed, 431 too large) and is not sent anywhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakeError {
    pub status: u16,
    pub reason: String,
}

impl HandshakeError {
    pub fn new(status: u16, reason: impl Into<String>) -> HandshakeError {
        HandshakeError { status, reason: reason.into() }
    }

    fn bad_request(reason: impl Into<String>) -> HandshakeError {
        HandshakeError::new(400, reason)
    }

    /// The complete HTTP/1.1 response refusing the upgrade; the connection is closed after it.
    pub fn response(&self) -> Vec<u8> {
        let body = format!("{}\n", self.reason);
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: text/plain; charset=utf-8\r\n\
             Content-Length: {}\r\nConnection: close\r\n",
            self.status,
            status_text(self.status),
            body.len()
        );
        match self.status {
            426 => head.push_str("Sec-WebSocket-Version: 13\r\n"),
            405 => head.push_str("Allow: GET\r\n"),
            // A draining broker: try again (the fleet's load balancer picks another broker).
            503 => head.push_str("Retry-After: 1\r\n"),
            _ => {}
        }
        head.push_str("\r\n");
        let mut response = head.into_bytes();
        response.extend_from_slice(body.as_bytes());
        response
    }
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "handshake refused with {} {}: {}", self.status, status_text(self.status), self.reason)
    }
}

impl std::error::Error for HandshakeError {}

fn status_text(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        426 => "Upgrade Required",
        408 => "Request Timeout",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// Peer input for an error reason: quoted and escaped, cut to [`MAX_ECHOED_INPUT_BYTES`].
fn echo(input: &str) -> String {
    if input.len() <= MAX_ECHOED_INPUT_BYTES {
        return format!("{input:?}");
    }
    let mut end = MAX_ECHOED_INPUT_BYTES;
    while !input.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}...", &input[..end])
}

/// Parses an upgrade request from the bytes read so far.
///
/// `Ok(None)`: the header block is not complete yet; read more and call again with all bytes.
/// `Ok(Some((request, consumed)))`: `consumed` counts the bytes up to and including the blank
/// line; anything after it (such as the first frame) belongs to the WebSocket stream.
pub fn parse_request(buf: &[u8], max_request_bytes: usize) -> Result<Option<(HttpRequest, usize)>, HandshakeError> {
    let Some((block, consumed)) = find_header_block(buf, max_request_bytes, "request", "max_request_bytes")? else {
        return Ok(None);
    };
    let (start_line, headers) = parse_head(block, "request")?;
    let (method, path) = parse_request_line(start_line)?;
    let request = HttpRequest { method: method.to_owned(), path: path.to_owned(), headers };
    Ok(Some((request, consumed)))
}

/// Parses the server's handshake response from the bytes read so far; same contract as
/// [`parse_request`] (bytes after the blank line are the first frames).
pub fn parse_response(buf: &[u8], max_bytes: usize) -> Result<Option<(HttpResponse, usize)>, HandshakeError> {
    let Some((block, consumed)) = find_header_block(buf, max_bytes, "response", "max_bytes")? else {
        return Ok(None);
    };
    let (start_line, headers) = parse_head(block, "response")?;
    let (status, reason) = parse_status_line(start_line)?;
    let response = HttpResponse { status, reason: reason.to_owned(), headers };
    Ok(Some((response, consumed)))
}

/// Locates the header block within the first `max_bytes` of `buf` (`limit_name` names that
/// limit in the 431 reason). Returns the block (without the final blank line) and the number of
/// bytes it occupies including that line.
fn find_header_block<'a>(
    buf: &'a [u8],
    max_bytes: usize,
    what: &str,
    limit_name: &str,
) -> Result<Option<(&'a [u8], usize)>, HandshakeError> {
    let window = &buf[..buf.len().min(max_bytes)];
    let mut search_from = 0;
    while let Some(offset) = window[search_from..].iter().position(|&b| b == b'\n') {
        let line_feed = search_from + offset;
        // A blank line follows this line feed: "\n\n" or "\n\r\n".
        let blank_line_bytes = match window.get(line_feed + 1..) {
            Some([b'\n', ..]) => 1,
            Some([b'\r', b'\n', ..]) => 2,
            _ => 0,
        };
        if blank_line_bytes > 0 {
            let consumed = line_feed + 1 + blank_line_bytes;
            return Ok(Some((&window[..line_feed + 1], consumed)));
        }
        search_from = line_feed + 1;
    }
    if buf.len() >= max_bytes {
        return Err(HandshakeError::new(
            431,
            format!(
                "HTTP {what} head has no terminating blank line within {limit_name} \
                 ({max_bytes} bytes); send fewer or shorter header fields"
            ),
        ));
    }
    Ok(None)
}

/// Header fields in order of appearance, names in their original case.
type HeaderFields = Vec<(String, String)>;

/// Splits a header block into its start line and header fields.
fn parse_head<'a>(block: &'a [u8], what: &str) -> Result<(&'a str, HeaderFields), HandshakeError> {
    let text = std::str::from_utf8(block).map_err(|error| {
        HandshakeError::bad_request(format!("HTTP {what} head is not valid UTF-8 at byte {}", error.valid_up_to()))
    })?;
    // The block ends with a line feed, so the last piece of the split is empty.
    let mut lines = text.split('\n').map(|line| line.strip_suffix('\r').unwrap_or(line));
    let start_line = lines.next().unwrap_or("");
    if start_line.is_empty() {
        return Err(HandshakeError::bad_request(format!(
            "HTTP {what} starts with an empty line; expected a {what} line"
        )));
    }
    check_line_characters(start_line, what)?;
    let mut headers = Vec::new();
    for line in lines.filter(|line| !line.is_empty()) {
        if headers.len() == MAX_HEADER_COUNT {
            return Err(HandshakeError::new(
                431,
                format!(
                    "HTTP {what} has more than {MAX_HEADER_COUNT} header fields \
                     (MAX_HEADER_COUNT); send fewer"
                ),
            ));
        }
        headers.push(parse_header_line(line, what)?);
    }
    Ok((start_line, headers))
}

/// Refuses control characters (including a bare CR) anywhere but a horizontal tab.
fn check_line_characters(line: &str, what: &str) -> Result<(), HandshakeError> {
    match line.bytes().find(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        Some(byte) => Err(HandshakeError::bad_request(format!(
            "HTTP {what} line {} contains control character 0x{byte:02X}",
            echo(line)
        ))),
        None => Ok(()),
    }
}

fn is_token_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

fn is_token(text: &str) -> bool {
    !text.is_empty() && text.bytes().all(is_token_byte)
}

fn parse_header_line(line: &str, what: &str) -> Result<(String, String), HandshakeError> {
    if line.starts_with([' ', '\t']) {
        return Err(HandshakeError::bad_request(format!(
            "HTTP {what} uses obsolete line folding (a header line starting with whitespace: {}); \
             put each header field on one line",
            echo(line)
        )));
    }
    check_line_characters(line, what)?;
    let Some((name, value)) = line.split_once(':') else {
        return Err(HandshakeError::bad_request(format!("HTTP {what} header line {} has no colon", echo(line))));
    };
    if !is_token(name) {
        return Err(HandshakeError::bad_request(format!(
            "HTTP {what} header name {} is not a valid token (no spaces before the colon)",
            echo(name)
        )));
    }
    let value = value.trim_matches([' ', '\t']);
    Ok((name.to_owned(), value.to_owned()))
}

/// `GET /path HTTP/1.1` into method and request target.
fn parse_request_line(line: &str) -> Result<(&str, &str), HandshakeError> {
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HandshakeError::bad_request(format!(
            "request line {} is not \"METHOD TARGET HTTP/1.1\"",
            echo(line)
        )));
    };
    if !is_token(method) {
        return Err(HandshakeError::bad_request(format!("request method {} is not a valid token", echo(method))));
    }
    if target.is_empty() {
        return Err(HandshakeError::bad_request("request target is empty"));
    }
    if version != "HTTP/1.1" {
        return Err(HandshakeError::bad_request(format!(
            "request uses {}; WebSocket upgrades require HTTP/1.1",
            echo(version)
        )));
    }
    Ok((method, target))
}

/// `HTTP/1.1 101 Switching Protocols` into status code and reason phrase.
fn parse_status_line(line: &str) -> Result<(u16, &str), HandshakeError> {
    let mut parts = line.splitn(3, ' ');
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        return Err(HandshakeError::bad_request(format!("status line {} is not \"HTTP/1.1 CODE REASON\"", echo(line))));
    };
    let reason = parts.next().unwrap_or("");
    if version != "HTTP/1.1" {
        return Err(HandshakeError::bad_request(format!("response uses {}; expected HTTP/1.1", echo(version))));
    }
    let status = match code.parse::<u16>() {
        Ok(status) if code.len() == 3 && code.bytes().all(|b| b.is_ascii_digit()) => status,
        _ => return Err(HandshakeError::bad_request(format!("response status {} is not a 3-digit code", echo(code)))),
    };
    Ok((status, reason))
}

/// Whether any comma-separated token in any of the header `values` equals `token`, ignoring case.
fn has_token<'a>(mut values: impl Iterator<Item = &'a str>, token: &str) -> bool {
    values.any(|value| value.split(',').any(|item| item.trim_matches([' ', '\t']).eq_ignore_ascii_case(token)))
}

/// An accepted upgrade: what [`accept_response`] needs, and the negotiated subprotocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgrade<P> {
    /// `Sec-WebSocket-Key` as sent (already checked to be 16 base64-encoded bytes).
    pub key: String,
    pub protocol: P,
    pub origin: Option<String>,
}

/// Checks an upgrade request (RFC 6455 section 4.2.1) and negotiates the subprotocol: the first
/// token, in the client's order, that names a supported one (case-sensitive).
/// `Sec-WebSocket-Extensions` is ignored: no extension is ever negotiated.
pub fn validate_upgrade<P: Subprotocol>(req: &HttpRequest) -> Result<Upgrade<P>, HandshakeError> {
    if req.method != "GET" {
        return Err(HandshakeError::new(
            405,
            format!("method {} is not allowed; WebSocket upgrades use GET", echo(&req.method)),
        ));
    }
    let path = req.path.split_once('?').map_or(&req.path[..], |(path, _)| path);
    if path != "/" {
        return Err(HandshakeError::new(
            404,
            format!("no WebSocket endpoint at {}; upgrades are accepted at /", echo(path)),
        ));
    }
    if req.header("Host").is_none() {
        return Err(HandshakeError::bad_request("missing Host header (required by HTTP/1.1)"));
    }
    if !has_token(req.header_values("Upgrade"), "websocket") {
        return Err(HandshakeError::bad_request("not a WebSocket upgrade: send Upgrade: websocket"));
    }
    if !has_token(req.header_values("Connection"), "upgrade") {
        return Err(HandshakeError::bad_request("not a WebSocket upgrade: send Connection: Upgrade"));
    }
    match req.header("Sec-WebSocket-Version") {
        Some(WEBSOCKET_VERSION) => {}
        Some(other) => {
            return Err(HandshakeError::new(
                426,
                format!("unsupported Sec-WebSocket-Version {}; this server speaks version 13", echo(other)),
            ))
        }
        None => {
            return Err(HandshakeError::new(
                426,
                "missing Sec-WebSocket-Version header; send Sec-WebSocket-Version: 13",
            ))
        }
    }
    let key = validate_key(req)?;
    let protocol = negotiate_subprotocol(req)?;
    Ok(Upgrade { key: key.to_owned(), protocol, origin: req.header("Origin").map(str::to_owned) })
}

fn validate_key(req: &HttpRequest) -> Result<&str, HandshakeError> {
    let mut keys = req.header_values("Sec-WebSocket-Key");
    let Some(key) = keys.next() else {
        return Err(HandshakeError::bad_request("missing Sec-WebSocket-Key header"));
    };
    if keys.next().is_some() {
        return Err(HandshakeError::bad_request("Sec-WebSocket-Key header appears more than once"));
    }
    match base64_decode(key) {
        Some(nonce) if nonce.len() == KEY_NONCE_BYTES => Ok(key),
        Some(nonce) => Err(HandshakeError::bad_request(format!(
            "Sec-WebSocket-Key {} decodes to {} bytes; it must be 16 random bytes in base64",
            echo(key),
            nonce.len()
        ))),
        None => Err(HandshakeError::bad_request(format!(
            "Sec-WebSocket-Key {} is not valid base64; it must be 16 random bytes in base64",
            echo(key)
        ))),
    }
}

fn negotiate_subprotocol<P: Subprotocol>(req: &HttpRequest) -> Result<P, HandshakeError> {
    let offered = || {
        req.header_values("Sec-WebSocket-Protocol")
            .flat_map(|value| value.split(','))
            .map(|token| token.trim_matches([' ', '\t']))
            .filter(|token| !token.is_empty())
    };
    if let Some(protocol) = offered().find_map(P::from_token) {
        return Ok(protocol);
    }
    let offered_list = offered().collect::<Vec<_>>().join(", ");
    let offered_list = if offered_list.is_empty() { "none".to_owned() } else { echo(&offered_list) };
    let supported = P::ALL.iter().map(|protocol| protocol.token()).collect::<Vec<_>>().join(" or ");
    Err(HandshakeError::bad_request(format!(
        "no supported subprotocol offered: send Sec-WebSocket-Protocol: {supported} \
         (offered: {offered_list})",
    )))
}

/// `Sec-WebSocket-Accept` for a client key: base64 of SHA-1 over the key and the RFC GUID.
pub fn accept_key(key: &str) -> String {
    let mut hasher = sha1_smol::Sha1::new();
    hasher.update(key.as_bytes());
    hasher.update(WEBSOCKET_GUID.as_bytes());
    base64_encode(&hasher.digest().bytes())
}

/// The `101 Switching Protocols` response completing an accepted upgrade.
pub fn accept_response<P: Subprotocol>(upgrade: &Upgrade<P>) -> Vec<u8> {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\nSec-WebSocket-Protocol: {}\r\n\r\n",
        accept_key(&upgrade.key),
        upgrade.protocol.token()
    )
    .into_bytes()
}

/// The client's upgrade request for `path` on `host`, offering `protocols` in preference order
/// (no `Sec-WebSocket-Protocol` header when empty).
///
/// # Panics
///
/// If any argument contains CR or LF, which would inject header lines: callers pass values
/// they have validated.
pub fn client_request(host: &str, path: &str, key: &str, protocols: &[&str]) -> String {
    let has_line_break = |text: &str| text.contains(['\r', '\n']);
    assert!(
        !has_line_break(host)
            && !has_line_break(path)
            && !has_line_break(key)
            && !protocols.iter().any(|protocol| has_line_break(protocol)),
        "client_request arguments must not contain CR or LF"
    );
    let mut request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: {WEBSOCKET_VERSION}\r\n"
    );
    if !protocols.is_empty() {
        request.push_str("Sec-WebSocket-Protocol: ");
        request.push_str(&protocols.join(", "));
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    request
}

/// A `Sec-WebSocket-Key`: 16 bytes derived from `seed`, base64-encoded.
///
/// The key only has to differ between connections (it defeats caching intermediaries; it is
/// not a secret), so pass a seed that changes per connection, e.g. time mixed with a counter.
pub fn new_client_key(seed: u64) -> String {
    // SplitMix64: two well-mixed words from one seed.
    fn split_mix(state: &mut u64) -> u64 {
        *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    let mut state = seed;
    let mut nonce = [0u8; KEY_NONCE_BYTES];
    nonce[..8].copy_from_slice(&split_mix(&mut state).to_le_bytes());
    nonce[8..].copy_from_slice(&split_mix(&mut state).to_le_bytes());
    base64_encode(&nonce)
}

/// Checks the server's answer to [`client_request`] made with `key` (RFC 6455 section 4.1):
/// status 101, `Upgrade`/`Connection` tokens, `Sec-WebSocket-Accept`, no extension. Returns the
/// subprotocol the server chose, `None` if it chose none; the caller checks it was offered.
pub fn verify_accept<P: Subprotocol>(resp: &HttpResponse, key: &str) -> Result<Option<P>, String> {
    if resp.status != 101 {
        return Err(format!("server refused the WebSocket upgrade: {} {}", resp.status, resp.reason));
    }
    if !has_token(resp.header_values("Upgrade"), "websocket") {
        return Err("server response lacks Upgrade: websocket".to_owned());
    }
    if !has_token(resp.header_values("Connection"), "upgrade") {
        return Err("server response lacks Connection: Upgrade".to_owned());
    }
    let expected = accept_key(key);
    match resp.header("Sec-WebSocket-Accept") {
        Some(accept) if accept == expected => {}
        Some(accept) => {
            return Err(format!("server sent Sec-WebSocket-Accept {}, expected {expected:?} for our key", echo(accept)))
        }
        None => return Err("server response lacks Sec-WebSocket-Accept".to_owned()),
    }
    if let Some(extensions) = resp.header("Sec-WebSocket-Extensions") {
        return Err(format!("server enabled extensions {} that were not requested", echo(extensions)));
    }
    let mut protocols = resp.header_values("Sec-WebSocket-Protocol");
    let chosen = protocols.next();
    if protocols.next().is_some() {
        return Err("server sent more than one Sec-WebSocket-Protocol header".to_owned());
    }
    match chosen {
        None => Ok(None),
        Some(name) => match P::from_token(name) {
            Some(protocol) => Ok(Some(protocol)),
            None => Err(format!("server chose subprotocol {}, which this client does not speak", echo(name))),
        },
    }
}

const BASE64_ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding (RFC 4648 section 4); also HTTP Basic credentials.
pub fn base64_encode(input: &[u8]) -> String {
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b0 = chunk[0];
        let b1 = chunk.get(1).copied().unwrap_or(0);
        let b2 = chunk.get(2).copied().unwrap_or(0);
        let sextets = [b0 >> 2, (b0 & 0x03) << 4 | b1 >> 4, (b1 & 0x0f) << 2 | b2 >> 6, b2 & 0x3f];
        // A chunk of n bytes yields n + 1 significant characters, then padding.
        for (index, &sextet) in sextets.iter().enumerate() {
            if index <= chunk.len() {
                out.push(char::from(BASE64_ALPHABET[usize::from(sextet)]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn base64_value(character: u8) -> Option<u8> {
    match character {
        b'A'..=b'Z' => Some(character - b'A'),
        b'a'..=b'z' => Some(character - b'a' + 26),
        b'0'..=b'9' => Some(character - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    }
}

/// Decodes standard padded base64; `None` on a wrong length, padding or character.
pub fn base64_decode(input: &str) -> Option<Vec<u8>> {
    let bytes = input.as_bytes();
    if bytes.len() % 4 != 0 {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    let quads = bytes.len() / 4;
    for (index, quad) in bytes.chunks_exact(4).enumerate() {
        let padding = match quad {
            [_, _, b'=', b'='] => 2,
            [_, _, _, b'='] => 1,
            _ => 0,
        };
        if padding > 0 && index + 1 != quads {
            return None;
        }
        let mut word = 0u32;
        for &character in &quad[..4 - padding] {
            word = word << 6 | u32::from(base64_value(character)?);
        }
        word <<= 6 * padding;
        let [_, b0, b1, b2] = word.to_be_bytes();
        out.extend_from_slice(&[b0, b1, b2][..3 - padding]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The MBWS tokens as a stand-in subprotocol: the WebSocket layer's tests negotiate the
    /// tokens the broker speaks without depending on the MBWS types.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Subprotocol {
        Reliable,
        Light,
    }

    impl Subprotocol {
        const RELIABLE_NAME: &'static str = "MBWS.huawei.com";
        const LIGHT_NAME: &'static str = "MBLWS.huawei.com";
    }

    impl super::Subprotocol for Subprotocol {
        const ALL: &'static [Self] = &[Subprotocol::Reliable, Subprotocol::Light];

        fn token(self) -> &'static str {
            match self {
                Subprotocol::Reliable => Self::RELIABLE_NAME,
                Subprotocol::Light => Self::LIGHT_NAME,
            }
        }
    }

    fn validate_upgrade(req: &HttpRequest) -> Result<Upgrade<Subprotocol>, HandshakeError> {
        super::validate_upgrade(req)
    }

    fn verify_accept(resp: &HttpResponse, key: &str) -> Result<Option<Subprotocol>, String> {
        super::verify_accept(resp, key)
    }

    const LIMIT: usize = 8192;
    const RFC_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn request_with(extra_headers: &str) -> String {
        format!(
            "GET /?token=abc HTTP/1.1\r\nHost: broker.example\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: {RFC_KEY}\r\n\
             Sec-WebSocket-Version: 13\r\n{extra_headers}\r\n"
        )
    }

    fn valid_request() -> String {
        request_with("Sec-WebSocket-Protocol: MBWS.huawei.com\r\nOrigin: https://app.example\r\n")
    }

    fn parse(text: &str) -> HttpRequest {
        let (request, consumed) =
            parse_request(text.as_bytes(), LIMIT).expect("request parses").expect("request is complete");
        assert_eq!(consumed, text.len());
        request
    }

    fn refusal(text: &str) -> HandshakeError {
        validate_upgrade(&parse(text)).expect_err("upgrade must be refused")
    }

    /// Replaces the first header line starting with `name:` by `replacement` (or drops it).
    fn edit_header(text: &str, name: &str, replacement: Option<&str>) -> String {
        let mut out = String::new();
        let mut done = false;
        for line in text.split_inclusive("\r\n") {
            if !done && line.starts_with(&format!("{name}:")) {
                done = true;
                if let Some(replacement) = replacement {
                    out.push_str(replacement);
                    out.push_str("\r\n");
                }
            } else {
                out.push_str(line);
            }
        }
        assert!(done, "header {name} not found");
        out
    }

    #[test]
    fn accept_key_matches_rfc_example() {
        assert_eq!(accept_key(RFC_KEY), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn accept_key_matches_tungstenite() {
        for seed in 0..20 {
            let key = new_client_key(seed);
            assert_eq!(accept_key(&key), tungstenite::handshake::derive_accept_key(key.as_bytes()));
        }
    }

    #[test]
    fn base64_round_trips_and_matches_rfc_4648_vectors() {
        let vectors = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (plain, encoded) in vectors {
            assert_eq!(base64_encode(plain.as_bytes()), encoded);
            assert_eq!(base64_decode(encoded).as_deref(), Some(plain.as_bytes()));
        }
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(base64_decode(&base64_encode(&all)), Some(all));
        assert_eq!(base64_decode(RFC_KEY).as_deref(), Some(&b"the sample nonce"[..]));
        for bad in ["Zg=", "Zg=a", "Z===", "Zg==Zm9v", "Zm9v!A==", "=m9v"] {
            assert_eq!(base64_decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn valid_upgrade_is_accepted() {
        let upgrade = validate_upgrade(&parse(&valid_request())).unwrap();
        assert_eq!(upgrade.key, RFC_KEY);
        assert_eq!(upgrade.protocol, Subprotocol::Reliable);
        assert_eq!(upgrade.origin.as_deref(), Some("https://app.example"));
    }

    #[test]
    fn accept_response_completes_the_handshake() {
        let upgrade = validate_upgrade(&parse(&valid_request())).unwrap();
        let response = String::from_utf8(accept_response(&upgrade)).unwrap();
        assert_eq!(
            response,
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\
             Sec-WebSocket-Protocol: MBWS.huawei.com\r\n\r\n"
        );
        // Our own client side accepts it.
        let (parsed, consumed) = parse_response(response.as_bytes(), LIMIT).unwrap().unwrap();
        assert_eq!(consumed, response.len());
        assert_eq!(verify_accept(&parsed, RFC_KEY), Ok(Some(Subprotocol::Reliable)));
    }

    #[test]
    fn request_split_byte_by_byte_then_complete() {
        let text = valid_request();
        let bytes = text.as_bytes();
        for cut in 0..bytes.len() {
            assert_eq!(parse_request(&bytes[..cut], LIMIT), Ok(None), "cut at {cut}");
        }
        let (request, consumed) = parse_request(bytes, LIMIT).unwrap().unwrap();
        assert_eq!(consumed, bytes.len());
        assert_eq!(request.method, "GET");
        assert_eq!(request.path, "/?token=abc");
        assert!(validate_upgrade(&request).is_ok());
    }

    #[test]
    fn first_frame_in_the_same_read_is_left_for_the_caller() {
        let text = valid_request();
        let mut bytes = text.as_bytes().to_vec();
        let frame = [0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58];
        bytes.extend_from_slice(&frame);
        let (_, consumed) = parse_request(&bytes, LIMIT).unwrap().unwrap();
        assert_eq!(consumed, text.len());
        assert_eq!(&bytes[consumed..], &frame[..]);
    }

    #[test]
    fn bare_line_feeds_are_tolerated() {
        let text = valid_request().replace("\r\n", "\n");
        let request = parse(&text);
        assert!(validate_upgrade(&request).is_ok());
        assert_eq!(request.header("host"), Some("broker.example"));
    }

    #[test]
    fn header_lookup_ignores_case_and_returns_first() {
        let request = parse(&request_with("X-Thing: one\r\nx-thing:two\r\nX-THING:  three \r\n"));
        assert_eq!(request.header("x-THING"), Some("one"));
        assert_eq!(request.header_values("X-Thing").collect::<Vec<_>>(), ["one", "two", "three"]);
        assert_eq!(request.header("Missing"), None);
    }

    #[test]
    fn oversized_head_is_431_before_it_ends() {
        let mut text = String::from("GET / HTTP/1.1\r\nHost: x\r\nX-Padding: ");
        text.push_str(&"a".repeat(200));
        let error = parse_request(text.as_bytes(), 100).unwrap_err();
        assert_eq!(error.status, 431);
        assert!(error.reason.contains("max_request_bytes (100 bytes)"), "{error}");
        // Exactly at the limit is fine.
        let request = valid_request();
        assert!(parse_request(request.as_bytes(), request.len()).unwrap().is_some());
        let error = parse_request(request.as_bytes(), request.len() - 1).unwrap_err();
        assert_eq!(error.status, 431);
    }

    #[test]
    fn too_many_headers_is_431() {
        let extra: String = (0..=MAX_HEADER_COUNT).map(|n| format!("X-{n}: v\r\n")).collect();
        let error = parse_request(request_with(&extra).as_bytes(), 1 << 20).unwrap_err();
        assert_eq!(error.status, 431);
        assert!(error.reason.contains("100 header fields"), "{error}");
    }

    #[test]
    fn malformed_requests_are_400() {
        let cases = [
            "GET / HTTP/1.0\r\nHost: x\r\n\r\n",
            "GET / HTTP/2.0\r\nHost: x\r\n\r\n",
            "GET /  HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET / HTTP/1.1 extra\r\nHost: x\r\n\r\n",
            "GET\r\nHost: x\r\n\r\n",
            "G(T / HTTP/1.1\r\nHost: x\r\n\r\n",
            "\r\nGET / HTTP/1.1\r\n\r\n",
            "SSH-2.0-OpenSSH_9.0\r\n\r\n",
            "GET / HTTP/1.1\r\nHost x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost : x\r\n\r\n",
            "GET / HTTP/1.1\r\n: x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\n continued\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\n\tcontinued\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\rb\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\0b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: \u{7f}\r\n\r\n",
        ];
        for case in cases {
            let error = parse_request(case.as_bytes(), LIMIT).unwrap_err();
            assert_eq!(error.status, 400, "{case:?}: {error}");
        }
        let not_utf8 = b"GET / HTTP/1.1\r\nHost: \xff\r\n\r\n";
        assert_eq!(parse_request(not_utf8, LIMIT).unwrap_err().status, 400);
    }

    #[test]
    fn obs_fold_reason_is_explained() {
        let error = parse_request(b"GET / HTTP/1.1\r\nHost: x\r\n y\r\n\r\n", LIMIT).unwrap_err();
        assert!(error.reason.contains("obsolete line folding"), "{error}");
    }

    #[test]
    fn non_get_is_405_with_allow_header() {
        let error = refusal(&valid_request().replacen("GET", "POST", 1));
        assert_eq!(error.status, 405);
        let response = String::from_utf8(error.response()).unwrap();
        assert!(response.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"), "{response}");
        assert!(response.contains("\r\nAllow: GET\r\n"), "{response}");
    }

    #[test]
    fn other_paths_are_404() {
        for path in ["/ws", "/ws?x=1", "//", "*", "http://host/"] {
            let error = refusal(&valid_request().replacen("/?token=abc", path, 1));
            assert_eq!(error.status, 404, "{path}");
            assert!(error.reason.contains("accepted at /"), "{error}");
        }
        for path in ["/", "/?", "/?a=b&c"] {
            let text = valid_request().replacen("/?token=abc", path, 1);
            assert!(validate_upgrade(&parse(&text)).is_ok(), "{path}");
        }
    }

    #[test]
    fn missing_host_is_400() {
        let error = refusal(&edit_header(&valid_request(), "Host", None));
        assert_eq!(error.status, 400);
        assert!(error.reason.contains("Host"), "{error}");
    }

    #[test]
    fn upgrade_header_must_name_websocket() {
        let error = refusal(&edit_header(&valid_request(), "Upgrade", None));
        assert_eq!(error.status, 400);
        assert!(error.reason.contains("Upgrade: websocket"), "{error}");
        let error = refusal(&edit_header(&valid_request(), "Upgrade", Some("Upgrade: h2c")));
        assert_eq!(error.status, 400);
        let text = edit_header(&valid_request(), "Upgrade", Some("upgrade: foo, WebSocket"));
        assert!(validate_upgrade(&parse(&text)).is_ok());
    }

    #[test]
    fn connection_header_must_contain_upgrade() {
        let error = refusal(&edit_header(&valid_request(), "Connection", None));
        assert_eq!(error.status, 400);
        assert!(error.reason.contains("Connection: Upgrade"), "{error}");
        let error = refusal(&edit_header(&valid_request(), "Connection", Some("Connection: close")));
        assert_eq!(error.status, 400);
        let text = edit_header(&valid_request(), "Connection", Some("Connection: keep-alive, upgrade"));
        assert!(validate_upgrade(&parse(&text)).is_ok());
    }

    #[test]
    fn wrong_or_missing_version_is_426_with_version_header() {
        for replacement in [Some("Sec-WebSocket-Version: 8"), None] {
            let error = refusal(&edit_header(&valid_request(), "Sec-WebSocket-Version", replacement));
            assert_eq!(error.status, 426);
            let response = String::from_utf8(error.response()).unwrap();
            assert!(response.starts_with("HTTP/1.1 426 Upgrade Required\r\n"));
            assert!(response.contains("\r\nSec-WebSocket-Version: 13\r\n"), "{response}");
        }
    }

    #[test]
    fn missing_key_is_400() {
        let error = refusal(&edit_header(&valid_request(), "Sec-WebSocket-Key", None));
        assert_eq!(error.status, 400);
        assert!(error.reason.contains("missing Sec-WebSocket-Key"), "{error}");
    }

    #[test]
    fn key_must_decode_to_16_bytes() {
        for (key, expected) in [
            ("dGhlIHNhbXBsZSBub25j", "decodes to 15 bytes"),
            ("dGhlIHNhbXBsZSBub25jZXM=", "decodes to 17 bytes"),
            ("not base64 at all!!!!!==", "not valid base64"),
            ("", "not valid base64"),
        ] {
            let line = format!("Sec-WebSocket-Key: {key}");
            let text = edit_header(&valid_request(), "Sec-WebSocket-Key", Some(&line));
            let error = refusal(&text);
            assert_eq!(error.status, 400, "{key}");
            if !key.is_empty() {
                assert!(error.reason.contains(expected), "{key}: {error}");
            }
        }
    }

    #[test]
    fn repeated_key_is_400() {
        let error = refusal(&request_with(&format!(
            "Sec-WebSocket-Key: {RFC_KEY}\r\nSec-WebSocket-Protocol: MBWS.huawei.com\r\n"
        )));
        assert_eq!(error.status, 400);
        assert!(error.reason.contains("more than once"), "{error}");
    }

    #[test]
    fn no_supported_subprotocol_is_400_naming_the_offer() {
        let error = refusal(&request_with("Sec-WebSocket-Protocol: chat, mbws.huawei.com\r\n"));
        assert_eq!(error.status, 400);
        assert!(
            error.reason.starts_with(
                "no supported subprotocol offered: send Sec-WebSocket-Protocol: \
                 MBWS.huawei.com or MBLWS.huawei.com"
            ),
            "{error}"
        );
        assert!(error.reason.contains("chat, mbws.huawei.com"), "{error}");
        let error = refusal(&request_with(""));
        assert!(error.reason.ends_with("(offered: none)"), "{error}");
    }

    #[test]
    fn negotiation_picks_first_supported_in_client_order() {
        let cases = [
            ("Sec-WebSocket-Protocol: MBLWS.huawei.com, MBWS.huawei.com\r\n", Subprotocol::Light),
            ("Sec-WebSocket-Protocol: chat,MBWS.huawei.com ,MBLWS.huawei.com\r\n", Subprotocol::Reliable),
            (
                "Sec-WebSocket-Protocol: chat\r\nsec-websocket-protocol:  MBLWS.huawei.com\r\n\
                 Sec-WebSocket-Protocol: MBWS.huawei.com\r\n",
                Subprotocol::Light,
            ),
            ("Sec-WebSocket-Protocol: , ,MBWS.huawei.com\r\n", Subprotocol::Reliable),
        ];
        for (headers, expected) in cases {
            let upgrade = validate_upgrade(&parse(&request_with(headers))).unwrap();
            assert_eq!(upgrade.protocol, expected, "{headers:?}");
        }
    }

    #[test]
    fn extensions_are_ignored() {
        let text = request_with(
            "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\
             Sec-WebSocket-Protocol: MBWS.huawei.com\r\n",
        );
        let upgrade = validate_upgrade(&parse(&text)).unwrap();
        let response = String::from_utf8(accept_response(&upgrade)).unwrap();
        assert!(!response.contains("Extensions"), "{response}");
    }

    #[test]
    fn error_response_is_well_formed() {
        let error = HandshakeError::new(400, "bad thing ✓");
        let response = String::from_utf8(error.response()).unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        assert_eq!(body, "bad thing ✓\n");
        assert!(head.starts_with("HTTP/1.1 400 Bad Request\r\n"));
        assert!(head.contains("\r\nContent-Type: text/plain; charset=utf-8"));
        assert!(head.contains(&format!("\r\nContent-Length: {}", body.len())));
        assert!(head.contains("\r\nConnection: close"));
        assert!(!head.contains("Allow"));
        assert!(!head.contains("Sec-WebSocket-Version"));
        let error = HandshakeError::new(431, "too big");
        assert!(String::from_utf8(error.response())
            .unwrap()
            .starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"));
        assert_eq!(error.to_string(), "handshake refused with 431 Request Header Fields Too Large: too big");
    }

    #[test]
    fn long_peer_input_is_truncated_in_reasons() {
        let path = format!("/{}", "é".repeat(200));
        let error = refusal(&valid_request().replacen("/?token=abc", &path, 1));
        assert!(error.reason.len() < 200, "{}", error.reason);
        assert!(error.reason.contains("..."), "{}", error.reason);
    }

    #[test]
    fn client_request_is_accepted_by_server_side() {
        let key = new_client_key(42);
        let text =
            client_request("broker.example:8080", "/", &key, &[Subprotocol::LIGHT_NAME, Subprotocol::RELIABLE_NAME]);
        let upgrade = validate_upgrade(&parse(&text)).unwrap();
        assert_eq!(upgrade.key, key);
        assert_eq!(upgrade.protocol, Subprotocol::Light);
        assert_eq!(upgrade.origin, None);
        let without_protocols = client_request("h", "/", &key, &[]);
        assert!(!without_protocols.contains("Sec-WebSocket-Protocol"));
    }

    #[test]
    #[should_panic(expected = "must not contain CR or LF")]
    fn client_request_refuses_header_injection() {
        client_request("host\r\nX-Evil: 1", "/", &new_client_key(1), &[]);
    }

    #[test]
    fn client_keys_are_valid_and_differ_by_seed() {
        let keys: Vec<String> = (0..100).map(new_client_key).collect();
        for key in &keys {
            assert_eq!(base64_decode(key).map(|nonce| nonce.len()), Some(16), "{key}");
        }
        let mut unique = keys.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), keys.len());
        assert_eq!(new_client_key(7), new_client_key(7));
    }

    #[test]
    fn tungstenite_client_request_is_accepted() {
        use tungstenite::client::IntoClientRequest;
        use tungstenite::handshake::client::generate_request;

        let mut request = "ws://broker.example/".into_client_request().unwrap();
        request.headers_mut().insert("Sec-WebSocket-Protocol", "MBLWS.huawei.com".parse().unwrap());
        let (bytes, key) = generate_request(request).unwrap();
        let (parsed, consumed) = parse_request(&bytes, LIMIT).unwrap().unwrap();
        assert_eq!(consumed, bytes.len());
        let upgrade = validate_upgrade(&parsed).unwrap();
        assert_eq!(upgrade.key, key);
        assert_eq!(upgrade.protocol, Subprotocol::Light);
    }

    #[test]
    fn response_parsing_handles_splits_and_trailing_frames() {
        let upgrade = validate_upgrade(&parse(&valid_request())).unwrap();
        let mut bytes = accept_response(&upgrade);
        let head_len = bytes.len();
        bytes.extend_from_slice(&[0x81, 0x00]);
        for cut in 0..head_len {
            assert_eq!(parse_response(&bytes[..cut], LIMIT), Ok(None), "cut at {cut}");
        }
        let (response, consumed) = parse_response(&bytes, LIMIT).unwrap().unwrap();
        assert_eq!(consumed, head_len);
        assert_eq!(response.status, 101);
        assert_eq!(response.reason, "Switching Protocols");
        assert_eq!(parse_response(&bytes, 20).unwrap_err().status, 431);
        for bad in ["HTTP/1.1 1O1 Switching\r\n\r\n", "HTTP/1.0 101 x\r\n\r\n", "HTTP/1.1\r\n\r\n"] {
            assert_eq!(parse_response(bad.as_bytes(), LIMIT).unwrap_err().status, 400, "{bad}");
        }
        let (no_reason, _) = parse_response(b"HTTP/1.1 204\r\n\r\n", LIMIT).unwrap().unwrap();
        assert_eq!((no_reason.status, no_reason.reason.as_str()), (204, ""));
    }

    #[test]
    fn verify_accept_checks_the_response() {
        let response = |status: u16, headers: &[(&str, &str)]| HttpResponse {
            status,
            reason: "Whatever".to_owned(),
            headers: headers.iter().map(|(name, value)| (name.to_string(), value.to_string())).collect(),
        };
        let accept = accept_key(RFC_KEY);
        let good = [("upgrade", "WebSocket"), ("connection", "upgrade"), ("sec-websocket-accept", accept.as_str())];
        assert_eq!(verify_accept(&response(101, &good), RFC_KEY), Ok(None));
        let with_protocol = [&good[..], &[("Sec-WebSocket-Protocol", "MBLWS.huawei.com")]].concat();
        assert_eq!(verify_accept(&response(101, &with_protocol), RFC_KEY), Ok(Some(Subprotocol::Light)));

        let refused = verify_accept(&response(400, &good), RFC_KEY).unwrap_err();
        assert!(refused.contains("400 Whatever"), "{refused}");
        let wrong_key = verify_accept(&response(101, &good), &new_client_key(3)).unwrap_err();
        assert!(wrong_key.contains("Sec-WebSocket-Accept"), "{wrong_key}");
        let cases: [&[(&str, &str)]; 5] = [
            &good[1..],
            &[good[0], good[2]],
            &good[..2],
            &[&good[..], &[("Sec-WebSocket-Protocol", "chat")]].concat(),
            &[&good[..], &[("Sec-WebSocket-Extensions", "permessage-deflate")]].concat(),
        ];
        for headers in cases {
            assert!(verify_accept(&response(101, headers), RFC_KEY).is_err(), "{headers:?}");
        }
    }
}
