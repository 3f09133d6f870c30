//! Rules of docs/PROTOCOL.md that an independent client relies on, each checked against the
//! real broker binary through an independent WebSocket peer (tungstenite) that sends and reads
//! frames one by one: how connections end (shutdown, a superseded connection), and the points
//! the document settles precisely (sizes, repeated SUBSCRIBE, credit, heartbeats, frame limits,
//! session ids, resume edge cases, the text binding's integers).
//!
//! Each test names the section of the document it checks.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::Broker;
use mbws::mbws::{self as proto, AckMode, Binding, DeliveryMode, ErrorFrame, Frame, Opened};
use tungstenite::Message;

const WAIT: Duration = Duration::from_secs(5);
const RELIABLE: &str = "MBWS.huawei.com";

/// What the peer read next.
#[derive(Debug)]
enum Event {
    Frame(Frame),
    /// A WebSocket close frame: code and reason.
    Close(u16, String),
    /// The connection ended without a close frame (why, for failure messages).
    Ended(#[allow(dead_code)] String),
}

/// One WebSocket connection, driven frame by frame.
struct Peer {
    socket: tungstenite::WebSocket<TcpStream>,
    binding: Binding,
    /// The binding and the size (WebSocket payload bytes) of the last frame read.
    last_binding: Option<Binding>,
    last_len: usize,
}

impl Peer {
    /// Upgrades with `subprotocol`; sends nothing else.
    fn upgrade(broker: &Broker, subprotocol: &str, binding: Binding) -> Peer {
        use tungstenite::client::IntoClientRequest;
        let mut request = broker.url().into_client_request().unwrap();
        request.headers_mut().insert("Sec-WebSocket-Protocol", subprotocol.parse().unwrap());
        let stream = TcpStream::connect(broker.addr).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let (socket, response) = tungstenite::client(request, stream).expect("the upgrade succeeds");
        assert_eq!(response.headers()["Sec-WebSocket-Protocol"], subprotocol);
        Peer { socket, binding, last_binding: None, last_len: 0 }
    }

    /// Upgrades and opens a session (or resumes `open.session_id`); returns OPENED.
    fn open_with(broker: &Broker, subprotocol: &str, binding: Binding, open: proto::Open) -> (Peer, Opened) {
        let mut peer = Peer::upgrade(broker, subprotocol, binding);
        peer.send(&Frame::Open(open));
        match peer.next() {
            Event::Frame(Frame::Opened(opened)) => (peer, opened),
            other => panic!("expected OPENED, got {other:?}"),
        }
    }

    fn open(broker: &Broker, subprotocol: &str, binding: Binding) -> (Peer, Opened) {
        Peer::open_with(broker, subprotocol, binding, proto::Open { version: 1, ..Default::default() })
    }

    fn send(&mut self, frame: &Frame) {
        let payload = proto::encode(self.binding, frame);
        self.send_raw(self.binding, &payload);
    }

    fn send_raw(&mut self, binding: Binding, payload: &[u8]) {
        let message = match binding {
            Binding::Binary => Message::Binary(Bytes::copy_from_slice(payload)),
            Binding::Text => Message::Text(String::from_utf8(payload.to_vec()).unwrap().into()),
        };
        self.socket.send(message).expect("the broker takes the frame");
    }

    /// The next MBWS frame or close, within `WAIT` (a test fails rather than hang).
    fn next(&mut self) -> Event {
        let deadline = Instant::now() + WAIT;
        loop {
            assert!(Instant::now() < deadline, "nothing from the broker within {WAIT:?}");
            let message = match self.socket.read() {
                Ok(message) => message,
                Err(tungstenite::Error::Io(error))
                    if matches!(error.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
                {
                    panic!("nothing from the broker within {WAIT:?}")
                }
                Err(error) => return Event::Ended(error.to_string()),
            };
            let limits = proto::CodecLimits { max_headers: 255, ..Default::default() };
            return match message {
                Message::Binary(payload) => {
                    self.last_binding = Some(Binding::Binary);
                    self.last_len = payload.len();
                    Event::Frame(proto::decode(Binding::Binary, payload, &limits).unwrap())
                }
                Message::Text(text) => {
                    self.last_binding = Some(Binding::Text);
                    self.last_len = text.len();
                    let payload = Bytes::copy_from_slice(text.as_bytes());
                    Event::Frame(proto::decode(Binding::Text, payload, &limits).unwrap())
                }
                Message::Close(Some(close)) => Event::Close(u16::from(close.code), close.reason.to_string()),
                Message::Close(None) => Event::Close(1005, String::new()),
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
            };
        }
    }

    /// The next frame, which must be an MBWS frame (not a close).
    fn frame(&mut self) -> Frame {
        match self.next() {
            Event::Frame(frame) => frame,
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    fn error(&mut self) -> ErrorFrame {
        match self.frame() {
            Frame::Error(error) => error,
            other => panic!("expected ERROR, got {other:?}"),
        }
    }

    fn close(&mut self) -> (u16, String) {
        match self.next() {
            Event::Close(code, reason) => (code, reason),
            other => panic!("expected a close frame, got {other:?}"),
        }
    }

    /// Frames up to (not including) the first one that `stop` accepts, which is returned last.
    fn frames_until(&mut self, stop: impl Fn(&Frame) -> bool) -> (Vec<Frame>, Frame) {
        let mut before = Vec::new();
        loop {
            let frame = self.frame();
            if stop(&frame) {
                return (before, frame);
            }
            before.push(frame);
        }
    }

    /// Sends PING and returns every frame that arrived before its PONG.
    fn frames_before_pong(&mut self, token: u64) -> Vec<Frame> {
        self.send(&Frame::Ping(proto::Ping { token }));
        self.frames_until(|frame| *frame == Frame::Pong(proto::Pong { token })).0
    }

    /// A WebSocket (not MBWS) ping, and its pong.
    fn websocket_ping(&mut self) {
        self.socket.send(Message::Ping(Bytes::from_static(b"hb"))).unwrap();
        loop {
            match self.socket.read().expect("the broker answers a WebSocket ping") {
                Message::Pong(payload) if &payload[..] == b"hb" => return,
                Message::Pong(_) => continue,
                other => panic!("expected a WebSocket pong, got {other:?}"),
            }
        }
    }

    /// Sends PING and expects PONG next: the session is alive and has nothing else queued.
    fn expect_alive(&mut self, token: u64) {
        self.send(&Frame::Ping(proto::Ping { token }));
        assert_eq!(self.frame(), Frame::Pong(proto::Pong { token }));
    }
}

fn subscribe(id: u32, address: &str, mode: DeliveryMode, ack_mode: AckMode, credit: u32) -> Frame {
    Frame::Subscribe(proto::Subscribe {
        subscription_id: id,
        address: Bytes::copy_from_slice(address.as_bytes()),
        mode,
        ack_mode,
        credit,
    })
}

fn send(seq: u64, address: &str, body: &[u8]) -> Frame {
    Frame::Send(proto::Send {
        seq,
        address: Bytes::copy_from_slice(address.as_bytes()),
        body: Bytes::copy_from_slice(body),
        ..Default::default()
    })
}

fn messages(frames: &[Frame]) -> Vec<&proto::Message> {
    frames
        .iter()
        .filter_map(|frame| match frame {
            Frame::Message(message) => Some(message),
            _ => None,
        })
        .collect()
}

fn is_message(frame: &Frame) -> bool {
    matches!(frame, Frame::Message(_))
}

const DOCUMENT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/PROTOCOL.md");

fn document() -> String {
    std::fs::read_to_string(DOCUMENT).unwrap_or_else(|error| panic!("cannot read {DOCUMENT}: {error}"))
}

/// The text of the section whose heading line starts with `heading`, up to the next heading.
fn section(document: &str, heading: &str) -> String {
    let start = document.find(heading).unwrap_or_else(|| panic!("no heading `{heading}` in {DOCUMENT}"));
    let rest = &document[start + heading.len()..];
    let end = rest.find("\n#").map_or(rest.len(), |end| end + 1);
    rest[..end].to_string()
}

// ---------------------------------------------------------------------------------------------
// How connections end (sections 7.8, 10.2, 11).

/// Section 10.2: on shutdown every WebSocket connection gets close 1001, also one that has
/// upgraded but not sent OPEN yet; a connection still in its HTTP upgrade is simply closed.
#[test]
fn shutdown_sends_going_away_to_a_connection_that_has_not_sent_open() {
    let mut broker = Broker::start(&["--shards", "1", "--open-timeout-ms", "60000"]);
    let mut upgraded = Peer::upgrade(&broker, RELIABLE, Binding::Binary);
    let mut half_request = TcpStream::connect(broker.addr).unwrap();
    half_request.set_read_timeout(Some(WAIT)).unwrap();
    half_request.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap();
    // The broker has taken both connections once it logs the upgrade of the first.
    let port = upgraded.socket.get_ref().local_addr().unwrap().port();
    broker.shard_of_connection(port);

    let status = broker.terminate();
    assert!(status.success(), "the broker exits cleanly on SIGTERM: {status:?}");
    let (code, reason) = upgraded.close();
    assert_eq!(code, 1001, "going away: {reason}");
    let mut rest = Vec::new();
    let read = half_request.read_to_end(&mut rest);
    assert!(read.is_ok() && rest.is_empty(), "a connection mid-upgrade is closed without a reply: {read:?} {rest:?}");
}

/// Section 11, resume step 3: the superseded connection gets fatal ERROR 4409 and close 4409
/// with the reason, in its own binding; the newest connection keeps the session.
#[test]
fn a_superseded_connection_is_told_why_it_is_closed() {
    let broker = Broker::start(&["--shards", "1"]);
    let (mut first, opened) = Peer::open(&broker, RELIABLE, Binding::Text);
    first.send(&subscribe(1, "superseded", DeliveryMode::Anycast, AckMode::Client, 10));
    assert_eq!(first.frame(), Frame::Subscribed(proto::Subscribed { subscription_id: 1 }));

    let resume = proto::Open { version: 1, session_id: opened.session_id.clone(), ..Default::default() };
    let (mut second, resumed) = Peer::open_with(&broker, RELIABLE, Binding::Binary, resume);
    assert!(resumed.resumed);

    let error = first.error();
    assert_eq!((error.code, error.fatal, error.seq, error.subscription_id), (4409, true, 0, 0), "{error:?}");
    assert_eq!(first.last_binding, Some(Binding::Text), "in the binding of the superseded connection's OPEN");
    let reason = String::from_utf8_lossy(&error.reason).into_owned();
    assert!(reason.contains("resumed on another connection"), "{reason}");
    let (code, close_reason) = first.close();
    assert_eq!(code, 4409);
    assert!(close_reason.contains("resumed on another connection"), "{close_reason}");

    assert_eq!(second.frame(), Frame::Subscribed(proto::Subscribed { subscription_id: 1 }));
    second.expect_alive(7);
}

// ---------------------------------------------------------------------------------------------
// Points of issue 8 item 13, each settled in the document.

/// Section 6.2: "At least N bytes" is the layout with every string empty (and no body);
/// "Exactly N bytes" is the whole frame. A shorter frame is truncated; whether an empty string
/// is allowed is a field rule of 6.4, not a size rule.
#[test]
fn the_frame_sizes_of_section_6_2_are_the_layouts_with_empty_strings() {
    let document = document();
    let mut checked = 0;
    for line in document.lines().filter(|line| line.starts_with("**") && line.contains(" bytes")) {
        let (minimum, bytes) = if let Some(at) = line.find("At least ") {
            (true, &line[at + "At least ".len()..])
        } else if let Some(at) = line.find("Exactly ") {
            (false, &line[at + "Exactly ".len()..])
        } else {
            continue;
        };
        let size: usize = bytes.split_whitespace().next().unwrap().parse().unwrap();
        let codes: Vec<u8> =
            line.split("(0x").skip(1).map(|rest| u8::from_str_radix(&rest[..2], 16).unwrap()).collect();
        assert!(!codes.is_empty(), "no kind code in `{line}`");
        for code in codes {
            let frame = |len: usize| {
                let mut bytes = vec![0u8; len];
                bytes[..2].copy_from_slice(&[1, code]);
                proto::decode(Binding::Binary, Bytes::from(bytes), &proto::CodecLimits::default())
            };
            let reason = |result: Result<Frame, proto::DecodeError>| result.err().map(|error| error.reason);
            let at_size = reason(frame(size)).unwrap_or_default();
            assert!(!at_size.contains("truncated"), "kind 0x{code:02x}: {size} bytes is not short: {at_size}");
            let shorter = reason(frame(size - 1)).unwrap_or_default();
            let truncated = shorter.contains("truncated") || shorter.contains("shorter than");
            assert!(truncated, "kind 0x{code:02x}: {} bytes is short: {shorter}", size - 1);
            if !minimum {
                let longer = reason(frame(size + 1)).unwrap_or_default();
                assert!(longer.contains("trailing"), "kind 0x{code:02x}: {} bytes is too long: {longer}", size + 1);
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 15, "every kind states its size");
}

/// Section 7.3: repeating a SUBSCRIBE whose id is live is idempotent when it names the same
/// address, mode and ack (its credit is ignored; FLOW changes credit); anything else is 4409.
#[test]
fn a_repeated_subscribe_is_idempotent_only_when_address_mode_and_ack_match() {
    let broker = Broker::start(&["--shards", "1"]);
    let (mut peer, _) = Peer::open(&broker, RELIABLE, Binding::Binary);
    let subscribed = Frame::Subscribed(proto::Subscribed { subscription_id: 1 });
    peer.send(&subscribe(1, "repeat", DeliveryMode::Anycast, AckMode::Client, 1));
    assert_eq!(peer.frame(), subscribed);
    peer.send(&subscribe(1, "repeat", DeliveryMode::Anycast, AckMode::Client, 1));
    assert_eq!(peer.frame(), subscribed, "the same SUBSCRIBE again: SUBSCRIBED again");
    peer.send(&subscribe(1, "repeat", DeliveryMode::Anycast, AckMode::Client, 5));
    assert_eq!(peer.frame(), subscribed, "another credit: still the same subscription");
    for different in [
        subscribe(1, "repeat", DeliveryMode::Anycast, AckMode::Auto, 1),
        subscribe(1, "repeat", DeliveryMode::Multicast, AckMode::Client, 1),
        subscribe(1, "elsewhere", DeliveryMode::Anycast, AckMode::Client, 1),
    ] {
        peer.send(&different);
        let error = peer.error();
        assert_eq!((error.code, error.fatal, error.subscription_id), (4409, false, 1), "{different:?}: {error:?}");
    }
    // The credit is still 1: of two messages, one arrives until FLOW raises it.
    peer.send(&send(1, "repeat", b"one"));
    peer.send(&send(2, "repeat", b"two"));
    let (_, first) = peer.frames_until(is_message);
    assert!(messages(&peer.frames_before_pong(1)).is_empty(), "credit 1 holds the second message back");
    peer.send(&Frame::Flow(proto::Flow { subscription_id: 1, credit: 2 }));
    let (_, second) = peer.frames_until(is_message);
    let bodies: Vec<&[u8]> = [&first, &second]
        .iter()
        .map(|frame| match frame {
            Frame::Message(message) => &message.body[..],
            _ => unreachable!(),
        })
        .collect();
    assert_eq!(bodies, [&b"one"[..], &b"two"[..]]);
}

/// Section 7.6: a cumulative ACK frees one credit for every delivery it settles.
#[test]
fn a_cumulative_ack_frees_one_credit_per_delivery_it_settles() {
    let broker = Broker::start(&["--shards", "1"]);
    let (mut peer, _) = Peer::open(&broker, RELIABLE, Binding::Binary);
    peer.send(&subscribe(1, "credit", DeliveryMode::Anycast, AckMode::Client, 3));
    assert_eq!(peer.frame(), Frame::Subscribed(proto::Subscribed { subscription_id: 1 }));
    for seq in 1..=6 {
        peer.send(&send(seq, "credit", format!("m{seq}").as_bytes()));
    }
    let mut received = Vec::new();
    while received.len() < 3 {
        let (_, frame) = peer.frames_until(is_message);
        received.push(frame);
    }
    assert!(messages(&peer.frames_before_pong(1)).is_empty(), "credit 3: three at a time");
    peer.send(&Frame::Ack(proto::Ack { delivery_seq: 3, cumulative: true }));
    let mut more = Vec::new();
    while more.len() < 3 {
        let (_, frame) = peer.frames_until(is_message);
        more.push(frame);
    }
    let seqs: Vec<u64> = messages(&more).iter().map(|message| message.delivery_seq).collect();
    assert_eq!(seqs, [4, 5, 6], "the cumulative ACK of 3 deliveries gave 3 credits back");
}

/// Section 7.7: any traffic from the client counts for the heartbeat, WebSocket pings
/// included; silence over twice the interval closes the connection with 4408.
#[test]
fn websocket_pings_count_as_heartbeat_traffic() {
    let broker = Broker::start(&["--shards", "1"]);
    let open = proto::Open { version: 1, heartbeat_ms: 1000, ..Default::default() };
    let (mut peer, opened) = Peer::open_with(&broker, RELIABLE, Binding::Binary, open);
    assert_eq!(opened.heartbeat_ms, 1000);
    // 3.2 s, well past twice the interval, with nothing but WebSocket pings.
    for _ in 0..8 {
        std::thread::sleep(Duration::from_millis(400));
        peer.websocket_ping();
    }
    peer.expect_alive(1);
    let silent_since = Instant::now();
    let error = peer.error();
    assert_eq!((error.code, error.fatal), (4408, true), "{error:?}");
    assert!(silent_since.elapsed() >= Duration::from_millis(1500), "ended after {:?}", silent_since.elapsed());
    assert_eq!(peer.close().0, 4408);
}

/// Section 9: max-frame-bytes bounds every frame, the broker's too. A SEND whose MESSAGE could
/// exceed it is refused with non-fatal 4413 naming its seq; the document's formula gives the
/// largest body that passes, and its MESSAGE fits.
#[test]
fn no_frame_from_the_broker_exceeds_max_frame_bytes() {
    let broker = Broker::start(&["--shards", "1", "--max-frame-bytes", "4096", "--max-message-bytes", "4096"]);
    let (mut consumer, opened) = Peer::open(&broker, RELIABLE, Binding::Text);
    assert_eq!(opened.limits.max_frame_bytes, 4096);
    consumer.send(&subscribe(1, "big", DeliveryMode::Anycast, AckMode::Auto, 10));
    assert_eq!(consumer.frame(), Frame::Subscribed(proto::Subscribed { subscription_id: 1 }));
    let (mut publisher, _) = Peer::open(&broker, RELIABLE, Binding::Binary);

    // A SEND of exactly max-frame-bytes would become a larger MESSAGE.
    let whole = 4096 - proto::encode(Binding::Binary, &send(1, "big", b"")).len();
    publisher.send(&send(1, "big", &vec![b'a'; whole]));
    let error = publisher.error();
    assert_eq!((error.code, error.fatal, error.seq), (4413, false, 1), "{error:?}");
    assert!(String::from_utf8_lossy(&error.reason).contains("max-frame-bytes 4096"), "{error:?}");
    assert_eq!(publisher.frame(), Frame::Receipt(proto::Receipt { seq: 1 }), "the RECEIPT follows its ERROR");

    // Section 9's formula, for a message without properties: 141 + address + body.
    let largest_body = 4096 - 141 - "big".len();
    publisher.send(&send(2, "big", &vec![b'b'; largest_body + 1]));
    assert_eq!(publisher.error().seq, 2, "one byte over the formula is refused");
    publisher.send(&send(3, "big", &vec![b'c'; largest_body]));
    let (_, frame) = publisher.frames_until(|frame| matches!(frame, Frame::Receipt(receipt) if receipt.seq == 3));
    assert_eq!(frame, Frame::Receipt(proto::Receipt { seq: 3 }));
    let (_, message) = consumer.frames_until(is_message);
    assert!(matches!(&message, Frame::Message(m) if m.body.len() == largest_body));
    assert_eq!(consumer.last_binding, Some(Binding::Text));
    assert!(consumer.last_len <= 4096, "MESSAGE of {} bytes", consumer.last_len);
}

/// Section 11: a session id is `<shard>-<slot>-<generation>-<token>`: three decimal numbers
/// and 16 lower-case hex digits.
#[test]
fn session_ids_have_the_documented_parts() {
    let broker = Broker::start(&["--shards", "2"]);
    for _ in 0..4 {
        let (_peer, opened) = Peer::open(&broker, RELIABLE, Binding::Binary);
        let id = String::from_utf8(opened.session_id.to_vec()).unwrap();
        let parts: Vec<&str> = id.split('-').collect();
        assert_eq!(parts.len(), 4, "{id}");
        let shard: u16 = parts[0].parse().unwrap_or_else(|_| panic!("shard of {id}"));
        assert!(shard < 2, "{id}");
        for decimal in &parts[1..3] {
            assert!(!decimal.is_empty() && decimal.bytes().all(|b| b.is_ascii_digit()), "{id}");
        }
        assert_eq!(parts[3].len(), 16, "{id}");
        assert!(parts[3].bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')), "{id}");
    }
}

/// Section 11, resume steps 2 and 5: a resume claiming a last-received-seq beyond the last
/// delivery is refused with fatal 4409 and leaves the session as it was; a resent delivery
/// keeps its delivery-seq and is not marked redelivered.
#[test]
fn a_resume_past_the_last_delivery_is_refused_and_resent_deliveries_are_not_redelivered() {
    let broker = Broker::start(&["--shards", "1"]);
    let (mut first, opened) = Peer::open(&broker, RELIABLE, Binding::Binary);
    first.send(&subscribe(1, "resend", DeliveryMode::Anycast, AckMode::Client, 10));
    first.send(&send(1, "resend", b"once"));
    let (_, delivered) = first.frames_until(is_message);
    let Frame::Message(delivered) = delivered else { unreachable!() };
    assert_eq!((delivered.delivery_seq, delivered.redelivered), (1, false));
    drop(first); // Lost, not closed.

    let resume = |last_received_seq| proto::Open {
        version: 1,
        session_id: opened.session_id.clone(),
        last_received_seq,
        ..Default::default()
    };
    let mut too_far = Peer::upgrade(&broker, RELIABLE, Binding::Binary);
    too_far.send(&Frame::Open(resume(5)));
    let error = too_far.error();
    assert_eq!((error.code, error.fatal), (4409, true), "{error:?}");
    assert!(String::from_utf8_lossy(&error.reason).contains("last-received-seq 5"), "{error:?}");
    assert_eq!(too_far.close().0, 4409);

    let (mut resumed, opened_again) = Peer::open_with(&broker, RELIABLE, Binding::Binary, resume(0));
    assert!(opened_again.resumed, "the refused resume left the session resumable");
    let (_, resent) = resumed.frames_until(is_message);
    let Frame::Message(resent) = resent else { unreachable!() };
    assert_eq!((resent.delivery_seq, resent.redelivered, &resent.body[..]), (1, false, &b"once"[..]));
}

/// Sections 5 and 7.8: a refused MBLWS SEND with seq 0 gets a non-fatal ERROR naming seq 0.
#[test]
fn a_refused_unnumbered_light_send_gets_an_error_naming_seq_0() {
    let broker = Broker::start(&["--shards", "1", "--max-queued-messages", "1"]);
    let (mut peer, _) = Peer::open(&broker, "MBLWS.huawei.com", Binding::Binary);
    peer.send(&send(0, "light", b"kept"));
    peer.send(&send(0, "light", b"refused"));
    let error = peer.error();
    assert_eq!((error.code, error.fatal, error.seq, error.subscription_id), (4429, false, 0, 0), "{error:?}");
    peer.expect_alive(1);
}

/// Section 6.3 rules 7 and 8: an empty value is "absent" for an optional string, and refused
/// (fatal 4400) for an integer.
#[test]
fn an_empty_integer_value_in_the_text_binding_is_refused() {
    let broker = Broker::start(&["--shards", "1"]);
    let (mut peer, _) = Peer::open(&broker, RELIABLE, Binding::Text);
    peer.send_raw(Binding::Text, b"SEND\nseq:1\naddress:empty\ncontent-type:\n\nbody");
    assert_eq!(peer.frame(), Frame::Receipt(proto::Receipt { seq: 1 }), "an empty string is absent");
    peer.send_raw(Binding::Text, b"SEND\nseq:\naddress:empty\n\nbody");
    let error = peer.error();
    assert_eq!((error.code, error.fatal), (4400, true), "{error:?}");
    assert!(String::from_utf8_lossy(&error.reason).contains("`seq` is empty"), "{error:?}");
    assert_eq!(peer.close().0, 4400);
}

/// Section 7.2: durable messages are logged (docs/RELIABILITY.md); the document no longer
/// calls the log a later milestone. (tests/durability.rs checks the behaviour.)
#[test]
fn section_7_2_describes_the_durable_log_that_exists() {
    let document = document();
    let publishing = section(&document, "### 7.2 SEND and RECEIPT");
    assert!(!publishing.contains("later milestone"), "7.2 still calls something a later milestone");
    assert!(publishing.contains("RELIABILITY.md"), "7.2 points to docs/RELIABILITY.md for durability");
}

/// Section 9 and the README: `max-frame-bytes` (announced) is one MBWS frame, one whole
/// WebSocket message, set by `--max-message-bytes`; `--max-frame-bytes` bounds one WebSocket
/// frame (a fragment). A message in fragments within both passes; a bigger fragment is 1009.
#[test]
fn max_frame_bytes_is_one_websocket_message_and_the_flag_bounds_fragments() {
    use tungstenite::protocol::frame::coding::{Data, OpCode};
    use tungstenite::protocol::frame::Frame as WsFrame;
    let broker = Broker::start(&["--shards", "1", "--max-frame-bytes", "1024", "--max-message-bytes", "4096"]);
    let (mut peer, opened) = Peer::open(&broker, RELIABLE, Binding::Binary);
    assert_eq!(opened.limits.max_frame_bytes, 4096, "announced: --max-message-bytes");
    let payload = proto::encode(Binding::Binary, &send(1, "fragments", &[b'f'; 3000]));
    let pieces: Vec<&[u8]> = payload.chunks(1000).collect();
    for (index, piece) in pieces.iter().enumerate() {
        let opcode = if index == 0 { OpCode::Data(Data::Binary) } else { OpCode::Data(Data::Continue) };
        let fin = index + 1 == pieces.len();
        peer.socket.send(Message::Frame(WsFrame::message(Bytes::copy_from_slice(piece), opcode, fin))).unwrap();
    }
    assert_eq!(peer.frame(), Frame::Receipt(proto::Receipt { seq: 1 }), "fragments within both bounds pass");
    let one_frame = proto::encode(Binding::Binary, &send(2, "fragments", &[b'g'; 2000]));
    peer.send_raw(Binding::Binary, &one_frame);
    assert_eq!(peer.close().0, 1009, "a WebSocket frame over --max-frame-bytes");

    for file in ["README.md", "docs/PROTOCOL.md"] {
        let text = std::fs::read_to_string(format!("{}/{file}", env!("CARGO_MANIFEST_DIR"))).unwrap();
        assert!(
            text.lines().any(|line| line.contains("--max-message-bytes")
                && line.contains("max-frame-bytes")
                && line.contains("WebSocket message")),
            "{file} says that --max-message-bytes sets max-frame-bytes, one WebSocket message"
        );
    }
}
