//! The NATS target: nats-server's WebSocket endpoint (no subprotocol), NATS text protocol.
//!
//! WebSocket payloads form one byte stream (an operation may span frames and a frame may hold
//! several), parsed by [`parse`]: `INFO`, `MSG`, `PING`, `PONG`, `+OK`, `-ERR`. Set-up reads
//! INFO, sends CONNECT (verbose off, echo off) and a PING, and waits for the PONG; a consumer
//! then SUBscribes (in a queue group when the run has competing consumers) and confirms with
//! another PING/PONG round trip, after which the server routes to it. Core NATS has no
//! publish acknowledgement: publishers are held back only by the end-to-end window.

use bytes::{Buf, BytesMut};

use super::{Codec, Conn, CounterRule, Failure, Inbound, PublishWire, Role, TargetConfig};
use crate::wire::{read_stamp, Template};

/// Longest protocol line accepted (INFO can be long with cluster URLs).
const MAX_LINE_BYTES: usize = 64 * 1024;
/// Largest MSG payload accepted.
const MAX_PAYLOAD_BYTES: usize = crate::targets::MAX_INBOUND_MESSAGE_BYTES;

/// One server operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `max_payload` from the INFO JSON, if present.
    Info {
        max_payload: Option<u64>,
    },
    /// A delivered message; only its timestamp is kept.
    Msg {
        stamp: Option<u64>,
    },
    Ping,
    Pong,
    Ok,
    Err(String),
}

/// Parses the first operation of `buf`: `Ok(None)` until it is complete; otherwise the
/// operation and the bytes it took.
pub fn parse(buf: &[u8]) -> Result<Option<(Op, usize)>, String> {
    let Some(newline) = buf.iter().take(MAX_LINE_BYTES).position(|&byte| byte == b'\n') else {
        if buf.len() >= MAX_LINE_BYTES {
            return Err(format!("nats-server sent a protocol line longer than {MAX_LINE_BYTES} bytes"));
        }
        return Ok(None);
    };
    let line_end = if newline > 0 && buf[newline - 1] == b'\r' { newline - 1 } else { newline };
    let line = &buf[..line_end];
    let after_line = newline + 1;
    let keyword_end = line.iter().position(|&byte| byte == b' ' || byte == b'\t').unwrap_or(line.len());
    let keyword = &line[..keyword_end];
    let op = if keyword.eq_ignore_ascii_case(b"MSG") {
        let size = msg_size(line)?;
        let end = after_line + size + 2;
        if buf.len() < end {
            return Ok(None);
        }
        if &buf[after_line + size..end] != b"\r\n" {
            return Err("nats-server sent a MSG whose payload is not followed by CRLF".to_string());
        }
        return Ok(Some((Op::Msg { stamp: read_stamp(&buf[after_line..after_line + size]) }, end)));
    } else if keyword.eq_ignore_ascii_case(b"PING") {
        Op::Ping
    } else if keyword.eq_ignore_ascii_case(b"PONG") {
        Op::Pong
    } else if keyword.eq_ignore_ascii_case(b"+OK") {
        Op::Ok
    } else if keyword.eq_ignore_ascii_case(b"-ERR") {
        Op::Err(String::from_utf8_lossy(&line[keyword_end..]).trim().to_string())
    } else if keyword.eq_ignore_ascii_case(b"INFO") {
        Op::Info { max_payload: json_number(&line[keyword_end..], "max_payload") }
    } else {
        return Err(format!("nats-server sent an unknown operation \"{}\"", String::from_utf8_lossy(keyword)));
    };
    Ok(Some((op, after_line)))
}

/// The `#bytes` of `MSG <subject> <sid> [reply-to] <#bytes>`: the last token.
fn msg_size(line: &[u8]) -> Result<usize, String> {
    let tokens: Vec<&[u8]> = line.split(|&byte| byte == b' ' || byte == b'\t').filter(|t| !t.is_empty()).collect();
    if !(4..=5).contains(&tokens.len()) {
        return Err(format!("nats-server sent a malformed MSG line \"{}\"", String::from_utf8_lossy(line)));
    }
    let size: usize = std::str::from_utf8(tokens[tokens.len() - 1])
        .ok()
        .and_then(|text| text.parse().ok())
        .ok_or_else(|| format!("nats-server sent a MSG with a bad size \"{}\"", String::from_utf8_lossy(line)))?;
    if size > MAX_PAYLOAD_BYTES {
        return Err(format!("nats-server sent a {size}-byte MSG, over the {MAX_PAYLOAD_BYTES}-byte limit"));
    }
    Ok(size)
}

/// The unsigned number after `"name":` in a flat JSON text, if any.
fn json_number(json: &[u8], name: &str) -> Option<u64> {
    let text = std::str::from_utf8(json).ok()?;
    let key = format!("\"{name}\"");
    let rest = text[text.find(&key)? + key.len()..].trim_start().strip_prefix(':')?.trim_start();
    let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
    rest[..digits].parse().ok()
}

/// NATS state of one connection: the byte stream not yet parsed and the PONGs seen.
#[derive(Debug, Default)]
pub struct NatsCodec {
    stream: BytesMut,
    pongs: u64,
}

impl NatsCodec {
    pub fn on_unit(&mut self, payload: &[u8], cx: &mut Inbound<'_>) -> Result<(), Failure> {
        // Parse straight from the payload when nothing is pending; copy only leftovers.
        if self.stream.is_empty() {
            let used = handle_ops(payload, &mut self.pongs, cx)?;
            self.stream.extend_from_slice(&payload[used..]);
        } else {
            self.stream.extend_from_slice(payload);
            let used = handle_ops(&self.stream, &mut self.pongs, cx)?;
            self.stream.advance(used);
        }
        Ok(())
    }

    /// The next operation during set-up, reading more as needed.
    async fn next_op(&mut self, conn: &mut Conn, waiting_for: &str) -> Result<Op, String> {
        loop {
            if let Some((op, used)) = parse(&self.stream)? {
                self.stream.advance(used);
                match op {
                    Op::Ping => {
                        conn.queue(b"PONG\r\n");
                        conn.flush().await?;
                    }
                    Op::Ok => {}
                    Op::Err(error) => {
                        return Err(format!("nats-server error while we waited for {waiting_for}: {error}"))
                    }
                    op => return Ok(op),
                }
                continue;
            }
            let (payload, _) = conn.next_unit(waiting_for).await?;
            self.stream.extend_from_slice(&payload);
        }
    }

    /// Sends PING and waits for its PONG: everything sent before it has been processed.
    async fn round_trip(&mut self, conn: &mut Conn, waiting_for: &str) -> Result<(), String> {
        conn.queue(b"PING\r\n");
        conn.flush().await?;
        loop {
            match self.next_op(conn, waiting_for).await? {
                Op::Pong => return Ok(()),
                Op::Info { .. } => {}
                other => return Err(format!("expected PONG ({waiting_for}), got {other:?}")),
            }
        }
    }
}

/// Handles every complete operation at the front of `data`; returns the bytes used.
fn handle_ops(data: &[u8], pongs: &mut u64, cx: &mut Inbound<'_>) -> Result<usize, Failure> {
    let mut used = 0;
    while let Some((op, length)) = parse(&data[used..]).map_err(Failure::Protocol)? {
        used += length;
        match op {
            Op::Msg { stamp } => cx.delivered(stamp),
            Op::Ping => cx.reply(b"PONG\r\n"),
            Op::Pong => *pongs += 1,
            Op::Ok | Op::Info { .. } => {}
            Op::Err(error) => return Err(Failure::Protocol(format!("nats-server error: {error}"))),
        }
    }
    Ok(used)
}

const CONNECT: &[u8] = b"CONNECT {\"verbose\":false,\"pedantic\":false,\"tls_required\":false,\
\"name\":\"mbws-bench\",\"lang\":\"rust\",\"version\":\"0.1.0\",\"protocol\":1,\"echo\":false}\r\n";

pub async fn setup(
    conn: &mut Conn,
    config: &TargetConfig,
    role: &Role,
) -> Result<(Codec, Option<PublishWire>), String> {
    let mut codec = NatsCodec::default();
    let max_payload = match codec.next_op(conn, "INFO").await? {
        Op::Info { max_payload } => max_payload,
        other => return Err(format!("expected INFO, got {other:?}")),
    };
    conn.queue(CONNECT);
    codec.round_trip(conn, "the answer to CONNECT").await?;
    let mut publish = None;
    match role {
        Role::Publisher { addresses, .. } => {
            if let Some(max) = max_payload {
                if config.size as u64 > max {
                    return Err(format!("--size {} is over nats-server's max_payload {max}", config.size));
                }
            }
            let templates = addresses
                .iter()
                .map(|&address| {
                    let mut payload = format!("PUB {} {}\r\n", config.address_name(address), config.size).into_bytes();
                    let stamp_offset = payload.len();
                    payload.resize(stamp_offset + config.size, 0);
                    payload.extend_from_slice(b"\r\n");
                    Template::new(conn.framing(), &payload, stamp_offset, None)
                })
                .collect();
            publish = Some(PublishWire { templates, counter: CounterRule::None, window: None });
        }
        Role::Consumer { addresses, queue_group, .. } => {
            for (index, &address) in addresses.iter().enumerate() {
                let subject = config.address_name(address);
                let sub = if *queue_group {
                    format!("SUB {subject} {subject}.group {}\r\n", index + 1)
                } else {
                    format!("SUB {subject} {}\r\n", index + 1)
                };
                conn.queue(sub.as_bytes());
            }
            codec.round_trip(conn, "the answer to SUB").await?;
        }
        Role::Idle => {}
    }
    codec.pongs = 0;
    Ok((Codec::Nats(codec), publish))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_operations_and_waits_for_whole_messages() {
        let mut msg = b"MSG bench.1.0 1 12\r\n".to_vec();
        msg.extend_from_slice(&42u64.to_be_bytes());
        msg.extend_from_slice(b"abcd\r\n");
        assert_eq!(parse(&msg[..msg.len() - 1]).unwrap(), None);
        assert_eq!(parse(&msg).unwrap(), Some((Op::Msg { stamp: Some(42) }, msg.len())));
        assert_eq!(parse(b"PING\r\nPONG\r\n").unwrap(), Some((Op::Ping, 6)));
        assert_eq!(
            parse(b"-ERR 'Authorization Violation'\r\n").unwrap().unwrap().0,
            Op::Err("'Authorization Violation'".into())
        );
        let info = b"INFO {\"server_id\":\"x\",\"max_payload\": 1048576,\"proto\":1}\r\n";
        assert_eq!(parse(info).unwrap().unwrap().0, Op::Info { max_payload: Some(1_048_576) });
    }

    #[test]
    fn msg_with_reply_subject_and_bad_input() {
        let msg = b"MSG a 1 reply.x 0\r\n\r\n";
        assert_eq!(parse(msg).unwrap(), Some((Op::Msg { stamp: None }, msg.len())));
        assert!(parse(b"MSG a 1 x\r\n").is_err());
        assert!(parse(b"WHAT\r\n").is_err());
        assert!(parse(b"MSG a 1 2\r\nxyz\r\n").is_err());
    }
}
