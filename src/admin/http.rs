//! The admin API's HTTP/1.1, by hand and kept small: one request per connection, a body only
//! with a `Content-Length` of at most [`MAX_BODY_BYTES`] (the JSON of a `PUT`), the answer then
//! `Connection: close`. The request head is parsed by the WebSocket handshake's
//! parser ([`handshake::parse_request`]), which already bounds it and names what is wrong.
//!
//! Bounds: a request head of at most [`MAX_REQUEST_BYTES`], read within [`REQUEST_TIMEOUT`]
//! (a client that sends nothing holds a connection no longer); the answer is written within
//! the same time.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::ws::handshake::{self, HttpRequest};

/// Largest request head (request line and headers) the admin API reads.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;

/// Largest request body (a `PUT`'s JSON) the admin API reads.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// How long a client has to send its request, and the broker to write the answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// An answer: status, content type and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    /// Extra header lines (`Allow: GET`), each without its CRLF.
    pub headers: Vec<String>,
}

impl Response {
    pub fn json(status: u16, value: &serde_json::Value) -> Response {
        let mut body = serde_json::to_vec_pretty(value).expect("a JSON value always serializes");
        body.push(b'\n');
        Response { status, content_type: "application/json", body, headers: Vec::new() }
    }

    /// An error as JSON: `{"error": reason}`.
    pub fn error(status: u16, reason: impl Into<String>) -> Response {
        Response::json(status, &serde_json::json!({ "error": reason.into() }))
    }

    pub fn with_header(mut self, header: String) -> Response {
        self.headers.push(header);
        self
    }

    /// The whole HTTP/1.1 answer, head and body.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n",
            self.status,
            status_text(self.status),
            self.content_type,
            self.body.len()
        );
        for header in &self.headers {
            head.push_str(header);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(&self.body);
        bytes
    }
}

fn status_text(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// Reads one request, head and body, from `stream` (bounded in bytes and time). `Err` is the
/// answer to give instead (a malformed or too large request or body, the time ran out), or
/// `None` when the client went away without a request.
pub fn read_request(stream: &mut TcpStream) -> Result<(HttpRequest, Vec<u8>), Option<Response>> {
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let mut head: Option<(HttpRequest, usize, usize)> = None;
    loop {
        match &head {
            Some((_, consumed, length)) if buf.len() >= consumed + length => {
                let (request, consumed, length) = head.take().expect("matched above");
                return Ok((request, buf[consumed..consumed + length].to_vec()));
            }
            Some(_) => {}
            None => match handshake::parse_request(&buf, MAX_REQUEST_BYTES) {
                Ok(Some((request, consumed))) => {
                    let length = body_length(&request)?;
                    head = Some((request, consumed, length));
                    continue;
                }
                Ok(None) => {}
                Err(refused) => return Err(Some(Response::error(refused.status, refused.reason))),
            },
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Some(Response::error(
                408,
                format!("the request did not arrive within {} ms", REQUEST_TIMEOUT.as_millis()),
            )));
        }
        stream.set_read_timeout(Some(left)).map_err(|_| None)?;
        match stream.read(&mut chunk) {
            Ok(0) => return Err(None),
            Ok(read) => buf.extend_from_slice(&chunk[..read]),
            Err(error) if matches!(error.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return Err(None),
        }
    }
}

/// The body's length: its `Content-Length` (0 without), at most [`MAX_BODY_BYTES`]; a chunked
/// body is refused rather than half-read.
fn body_length(request: &HttpRequest) -> Result<usize, Option<Response>> {
    if request.header("transfer-encoding").is_some() {
        return Err(Some(Response::error(
            411,
            "the admin API takes a body with a Content-Length only (Transfer-Encoding given)",
        )));
    }
    let Some(length) = request.header("content-length").map(str::trim) else { return Ok(0) };
    match length.parse::<usize>() {
        Ok(length) if length <= MAX_BODY_BYTES => Ok(length),
        Ok(_) => Err(Some(Response::error(
            413,
            format!("the request body has {length} bytes; the admin API reads at most {MAX_BODY_BYTES}"),
        ))),
        Err(_) => Err(Some(Response::error(400, format!("Content-Length: {length} is not a number of bytes")))),
    }
}

/// Writes `response` and closes the connection (bounded by [`REQUEST_TIMEOUT`]).
pub fn write_response(stream: &mut TcpStream, response: &Response) {
    let _ = stream.set_write_timeout(Some(REQUEST_TIMEOUT));
    let _ = stream.write_all(&response.to_bytes());
    let _ = stream.flush();
    let _ = stream.shutdown(std::net::Shutdown::Write);
}

/// A request target split into its path segments (percent-decoded) and its query parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub segments: Vec<String>,
    pub query: Vec<(String, String)>,
}

impl Target {
    /// Parses `/api/addresses/orders%2Feu?limit=10`; `Err` says which part is not valid.
    pub fn parse(target: &str) -> Result<Target, String> {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        if !path.starts_with('/') {
            return Err(format!("the request target {target:?} is not a path starting with /"));
        }
        let segments = path
            .split('/')
            .skip(1)
            .filter(|segment| !segment.is_empty())
            .map(percent_decode)
            .collect::<Result<Vec<_>, _>>()?;
        let query = query
            .split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| {
                let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
                Ok((percent_decode(name)?, percent_decode(value)?))
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Target { segments, query })
    }
}

/// `%2F` and friends into bytes, which must then be UTF-8 (address names are).
fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' {
            let hex = text.get(index + 1..index + 3).filter(|hex| hex.bytes().all(|byte| byte.is_ascii_hexdigit()));
            let Some(hex) = hex else {
                return Err(format!("{text:?} has a % not followed by two hex digits"));
            };
            decoded.push(u8::from_str_radix(hex, 16).expect("two hex digits"));
            index += 3;
        } else {
            decoded.push(bytes[index]);
            index += 1;
        }
    }
    String::from_utf8(decoded).map_err(|_| format!("{text:?} does not decode to UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_target_splits_into_decoded_segments_and_query() {
        let target = Target::parse("/api/addresses/orders%2Feu?limit=10&x=a%20b").unwrap();
        assert_eq!(target.segments, ["api", "addresses", "orders/eu"]);
        assert_eq!(target.query, [("limit".to_string(), "10".to_string()), ("x".to_string(), "a b".to_string())]);
        assert!(Target::parse("/api/%zz").unwrap_err().contains("two hex digits"));
        assert!(Target::parse("/api/%ff").unwrap_err().contains("UTF-8"));
        assert!(Target::parse("*").is_err());
    }
}
