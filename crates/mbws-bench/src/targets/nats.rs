//! The NATS target: nats-server's WebSocket endpoint (no subprotocol), NATS text protocol.
//!
//! WebSocket payloads form one byte stream (an operation may span frames and a frame may hold
//! several), parsed by [`parse`]: `INFO`, `MSG`, `PING`, `PONG`, `+OK`, `-ERR`. Set-up reads
//! INFO, sends CONNECT (verbose off, echo off) and a PING, and waits for the PONG; a consumer
//! then SUBscribes (in a queue group when the run has competing consumers) and confirms with
//! another PING/PONG round trip, after which the server routes to it. Core NATS has no
//! publish acknowledgement: publishers are held back only by the end-to-end window.
//!
//! Durable runs publish to JetStream: a stream must capture the subjects (`bench.>`, file
//! storage; scripts/bench.sh creates it), every PUB carries the reply subject of the
//! publisher's acknowledgement inbox ([`ACK_SID`]), and each PubAck that arrives there
//! acknowledges the next publish (one connection's publishes are stored and acknowledged in
//! order), within a window of [`JETSTREAM_WINDOW`] unacknowledged publishes. Set-up checks
//! that JetStream answers (`$JS.API.INFO`) and fails with what to do if it does not.

use bytes::{Buf, BytesMut};

use super::{Codec, Conn, CounterRule, Failure, Inbound, PublishWire, Role, TargetConfig};
use crate::wire::{read_stamp, Template};

/// Longest protocol line accepted (INFO can be long with cluster URLs).
const MAX_LINE_BYTES: usize = 64 * 1024;
/// Largest MSG payload accepted.
const MAX_PAYLOAD_BYTES: usize = crate::targets::MAX_INBOUND_MESSAGE_BYTES;
/// The subscription id of a durable publisher's acknowledgement inbox (consumers use 1..=n).
pub const ACK_SID: u64 = 1_000_000;
/// Most JetStream publishes a publisher lets wait for their PubAck (nats.go's default for
/// asynchronous publishes is 4,000; MBWS's max-inflight-sends default is 4,096).
pub const JETSTREAM_WINDOW: u64 = 4096;

/// One server operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `max_payload` from the INFO JSON, if present.
    Info {
        max_payload: Option<u64>,
    },
    /// A delivered message: its subscription, the timestamp in its body, and where its body
    /// lies in the parsed bytes.
    Msg {
        sid: u64,
        stamp: Option<u64>,
        body: std::ops::Range<usize>,
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
        let (sid, size) = msg_sid_and_size(line)?;
        let end = after_line + size + 2;
        if buf.len() < end {
            return Ok(None);
        }
        if &buf[after_line + size..end] != b"\r\n" {
            return Err("nats-server sent a MSG whose payload is not followed by CRLF".to_string());
        }
        let body = after_line..after_line + size;
        return Ok(Some((Op::Msg { sid, stamp: read_stamp(&buf[body.clone()]), body }, end)));
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

/// The `description` of a JetStream API answer that reports an error, e.g.
/// `{"error":{"code":503,"description":"no suitable peers"}}` or a PubAck with an error.
fn api_error(payload: &[u8]) -> Option<String> {
    if payload.first() != Some(&b'{') {
        return None;
    }
    let text = std::str::from_utf8(payload).ok()?;
    let error = &text[text.find("\"error\"")?..];
    let description = error.find("\"description\"").map(|at| &error[at + "\"description\"".len()..]);
    let value = description.and_then(|rest| rest.trim_start().strip_prefix(':')?.trim_start().strip_prefix('"'));
    Some(value.and_then(|value| value.split('"').next()).unwrap_or(error).to_string())
}

/// The `<sid>` and `<#bytes>` of `MSG <subject> <sid> [reply-to] <#bytes>`.
fn msg_sid_and_size(line: &[u8]) -> Result<(u64, usize), String> {
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
    let sid = std::str::from_utf8(tokens[2])
        .ok()
        .and_then(|text| text.parse().ok())
        .ok_or_else(|| format!("nats-server sent a MSG with a bad sid \"{}\"", String::from_utf8_lossy(line)))?;
    Ok((sid, size))
}

/// The unsigned number after `"name":` in a flat JSON text, if any.
fn json_number(json: &[u8], name: &str) -> Option<u64> {
    let text = std::str::from_utf8(json).ok()?;
    let key = format!("\"{name}\"");
    let rest = text[text.find(&key)? + key.len()..].trim_start().strip_prefix(':')?.trim_start();
    let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
    rest[..digits].parse().ok()
}

/// NATS state of one connection: the byte stream not yet parsed, the PONGs seen, and a
/// durable publisher's PubAcks.
#[derive(Debug, Default)]
pub struct NatsCodec {
    stream: BytesMut,
    pongs: u64,
    pubacks: u64,
    /// The body of the last MSG [`next_op`](Self::next_op) returned (set-up only).
    last_body: Vec<u8>,
}

impl NatsCodec {
    pub fn on_unit(&mut self, payload: &[u8], cx: &mut Inbound<'_>) -> Result<(), Failure> {
        // Parse straight from the payload when nothing is pending; copy only leftovers.
        if self.stream.is_empty() {
            let used = handle_ops(payload, &mut self.pongs, &mut self.pubacks, cx)?;
            self.stream.extend_from_slice(&payload[used..]);
        } else {
            self.stream.extend_from_slice(payload);
            let used = handle_ops(&self.stream, &mut self.pongs, &mut self.pubacks, cx)?;
            self.stream.advance(used);
        }
        Ok(())
    }

    /// JetStream publishes acknowledged so far (durable runs).
    pub fn pubacks(&self) -> u64 {
        self.pubacks
    }

    /// The next operation during set-up, reading more as needed.
    async fn next_op(&mut self, conn: &mut Conn, waiting_for: &str) -> Result<Op, String> {
        loop {
            if let Some((op, used)) = parse(&self.stream)? {
                if let Op::Msg { body, .. } = &op {
                    self.last_body = self.stream[body.clone()].to_vec();
                }
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

    /// Subscribes the acknowledgement inbox and asks JetStream which streams capture
    /// `subject`: fails, saying what to do, unless JetStream is on and one does.
    async fn check_jetstream(&mut self, conn: &mut Conn, inbox: &str, subject: &str) -> Result<(), String> {
        let filter = format!("{{\"subject\":\"{subject}\"}}");
        conn.queue(
            format!("SUB {inbox} {ACK_SID}\r\nPUB $JS.API.STREAM.NAMES {inbox} {}\r\n{filter}\r\n", filter.len())
                .as_bytes(),
        );
        conn.flush().await?;
        let waiting_for = "JetStream's answer to $JS.API.STREAM.NAMES (is JetStream on? nats-server -js)";
        loop {
            match self.next_op(conn, waiting_for).await? {
                Op::Msg { sid: ACK_SID, .. } => break,
                Op::Info { .. } | Op::Pong | Op::Msg { .. } => {}
                other => return Err(format!("expected JetStream's answer, got {other:?}")),
            }
        }
        let answer = String::from_utf8_lossy(&self.last_body);
        if let Some(error) = api_error(self.last_body.as_slice()) {
            return Err(format!("durable runs need JetStream (nats-server -js): $JS.API.STREAM.NAMES said {error}"));
        }
        if answer.contains("\"streams\":null") || answer.contains("\"streams\":[]") {
            return Err(format!(
                "no JetStream stream captures {subject}: create one (file storage, subjects bench.>), as \
                 scripts/bench.sh does"
            ));
        }
        Ok(())
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
fn handle_ops(data: &[u8], pongs: &mut u64, pubacks: &mut u64, cx: &mut Inbound<'_>) -> Result<usize, Failure> {
    let mut used = 0;
    while let Some((op, length)) = parse(&data[used..]).map_err(Failure::Protocol)? {
        used += length;
        match op {
            Op::Msg { sid: ACK_SID, body, .. } => {
                if let Some(error) = api_error(&data[used - length + body.start..used - length + body.end]) {
                    return Err(Failure::Protocol(format!("JetStream refused a publish: {error}")));
                }
                *pubacks += 1;
            }
            Op::Msg { stamp, .. } => cx.delivered(stamp),
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
        Role::Publisher { addresses, durable } => {
            if let Some(max) = max_payload {
                if config.size as u64 > max {
                    return Err(format!("--size {} is over nats-server's max_payload {max}", config.size));
                }
            }
            let inbox = format!("_INBOX.{}.acks", config.run_id);
            if *durable {
                let first = addresses.first().map_or_else(String::new, |&address| config.address_name(address));
                codec.check_jetstream(conn, &inbox, &first).await?;
            }
            let reply = if *durable { format!(" {inbox}") } else { String::new() };
            let templates = addresses
                .iter()
                .map(|&address| {
                    let mut payload =
                        format!("PUB {}{reply} {}\r\n", config.address_name(address), config.size).into_bytes();
                    let stamp_offset = payload.len();
                    payload.resize(stamp_offset + config.size, 0);
                    payload.extend_from_slice(b"\r\n");
                    Template::new(conn.framing(), &payload, stamp_offset, None)
                })
                .collect();
            let window = durable.then_some(JETSTREAM_WINDOW);
            publish = Some(PublishWire { templates, counter: CounterRule::None, window });
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
        assert_eq!(parse(&msg).unwrap(), Some((Op::Msg { sid: 1, stamp: Some(42), body: 20..32 }, msg.len())));
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
        assert_eq!(parse(msg).unwrap(), Some((Op::Msg { sid: 1, stamp: None, body: 19..19 }, msg.len())));
        assert!(parse(b"MSG a 1 x\r\n").is_err());
        assert!(parse(b"WHAT\r\n").is_err());
        assert!(parse(b"MSG a 1 2\r\nxyz\r\n").is_err());
        assert!(parse(b"MSG a x 0\r\n\r\n").is_err(), "the sid is a number");
    }

    #[test]
    fn jetstream_answers_and_their_errors() {
        let ack = br#"{"stream":"BENCH","seq":7}"#;
        let mut msg = format!("MSG _INBOX.r.acks 1000000 {}\r\n", ack.len()).into_bytes();
        msg.extend_from_slice(ack);
        msg.extend_from_slice(b"\r\n");
        let (op, _) = parse(&msg).unwrap().unwrap();
        let Op::Msg { sid: ACK_SID, body, .. } = op else { panic!("{op:?}") };
        assert_eq!(&msg[body], &ack[..]);
        let refused = br#"{"error":{"code":503,"err_code":10039,"description":"jetstream not enabled"}}"#;
        assert_eq!(api_error(refused).as_deref(), Some("jetstream not enabled"));
        assert_eq!(api_error(br#"{"error":{"code":400}}"#).as_deref(), Some(r#""error":{"code":400}}"#));
        assert_eq!(api_error(b"\x00\x01 a body"), None);
    }
}
