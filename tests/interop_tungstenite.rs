//! Interop with an independent WebSocket implementation: `tungstenite` is the peer, and the MBWS
//! frames it carries are built and parsed by hand (tests/support/mbws_by_hand.rs) from the
//! documented layouts, never by the crate's codec (which only double-checks what we parse).
//! Covers negotiation, OPEN/OPENED, send/receipt/consume in both bindings (and mixed), MBLWS
//! sends without receipts, multicast, MBWS PING/PONG, CLOSE, and fatal MBWS errors (4400,
//! 4405, 4409), each followed by the WebSocket close with the same code.

mod common;
#[path = "support/mbws_by_hand.rs"]
mod mbws_by_hand;

use std::net::TcpStream;
use std::time::Duration;

use common::Broker;
use mbws_by_hand::{AckMode, Mode, Reply};
use tungstenite::client::IntoClientRequest;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, WebSocket};

/// Every read on a test socket gives up after this long.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
const RELIABLE: &str = "MBWS.huawei.com";
const LIGHT: &str = "MBLWS.huawei.com";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Binding {
    Binary,
    Text,
}

/// One tungstenite connection speaking hand-made MBWS frames in one binding.
struct Peer {
    socket: WebSocket<TcpStream>,
    binding: Binding,
    /// The subprotocol the broker echoed.
    subprotocol: String,
}

impl Peer {
    /// Connects offering `offered` (a `Sec-WebSocket-Protocol` value) without sending OPEN.
    fn connect(broker: &Broker, offered: &str, binding: Binding) -> Peer {
        let stream = TcpStream::connect(broker.addr).expect("connect to the broker");
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        let mut request = broker.url().into_client_request().unwrap();
        request.headers_mut().insert("Sec-WebSocket-Protocol", offered.parse().unwrap());
        let (socket, response) = tungstenite::client(request, stream)
            .unwrap_or_else(|error| panic!("tungstenite handshake offering {offered:?} failed: {error}"));
        assert_eq!(response.status(), 101);
        let subprotocol = response
            .headers()
            .get("Sec-WebSocket-Protocol")
            .expect("the broker echoes a subprotocol")
            .to_str()
            .unwrap()
            .to_string();
        Peer { socket, binding, subprotocol }
    }

    /// Connects with `subprotocol`, sends OPEN in `binding` and checks OPENED.
    fn open(broker: &Broker, subprotocol: &str, binding: Binding) -> Peer {
        let mut peer = Peer::connect(broker, subprotocol, binding);
        assert_eq!(peer.subprotocol, subprotocol);
        peer.send_open();
        match peer.recv() {
            Reply::Opened { version, resumed, session_id, server, max_frame_bytes } => {
                assert_eq!(version, 1, "OPENED version");
                assert!(!resumed, "a new session is not resumed");
                assert!(!session_id.is_empty(), "OPENED names the session");
                assert!(!server.is_empty(), "OPENED names the server");
                assert!(max_frame_bytes >= 1024, "OPENED announces max-frame-bytes: {max_frame_bytes}");
            }
            other => panic!("expected OPENED, got {other:?}"),
        }
        peer
    }

    fn send_raw(&mut self, message: Message) {
        self.socket.send(message).unwrap_or_else(|error| panic!("tungstenite send failed: {error}"));
    }

    /// Sends one frame given in both bindings; the peer's binding picks which.
    fn send(&mut self, binary: Vec<u8>, text: String) {
        let message = match self.binding {
            Binding::Binary => Message::Binary(binary.into()),
            Binding::Text => Message::Text(text.into()),
        };
        self.send_raw(message);
    }

    fn send_open(&mut self) {
        self.send(mbws_by_hand::binary_open(), mbws_by_hand::text_open());
    }

    fn send_message(&mut self, seq: u64, address: &str, body: &str) {
        self.send(
            mbws_by_hand::binary_send(seq, address, body.as_bytes()),
            mbws_by_hand::text_send(seq, address, body),
        );
    }

    fn subscribe(&mut self, subscription_id: u32, address: &str, mode: Mode, ack: AckMode, credit: u32) {
        self.send(
            mbws_by_hand::binary_subscribe(subscription_id, address, mode, ack, credit),
            mbws_by_hand::text_subscribe(subscription_id, address, mode, ack, credit),
        );
        assert_eq!(self.recv(), Reply::Subscribed { subscription_id });
    }

    fn ack(&mut self, delivery_seq: u64, cumulative: bool) {
        self.send(mbws_by_hand::binary_ack(delivery_seq, cumulative), mbws_by_hand::text_ack(delivery_seq, cumulative));
    }

    /// The next WebSocket message, which must not be a timeout.
    fn next_message(&mut self) -> Message {
        match self.socket.read() {
            Ok(message) => message,
            Err(tungstenite::Error::Io(error))
                if matches!(error.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
            {
                panic!("no frame from the broker within {IO_TIMEOUT:?}")
            }
            Err(error) => panic!("tungstenite read failed: {error}"),
        }
    }

    /// The next MBWS frame; it must come in this peer's binding. Parsed by hand, then checked
    /// against the crate's decoder.
    fn recv(&mut self) -> Reply {
        loop {
            let (text, payload) = match self.next_message() {
                Message::Binary(payload) => (false, payload.to_vec()),
                Message::Text(text) => (true, text.as_bytes().to_vec()),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("expected an MBWS frame, got {other:?}"),
            };
            assert_eq!(text, self.binding == Binding::Text, "reply binding differs from the session's binding");
            let reply = if text {
                mbws_by_hand::parse_text(std::str::from_utf8(&payload).unwrap())
            } else {
                mbws_by_hand::parse_binary(&payload)
            }
            .unwrap_or_else(|error| panic!("cannot parse the broker's frame: {error}: {payload:?}"));
            mbws_by_hand::assert_crate_agrees(text, &payload, &reply);
            return reply;
        }
    }

    /// Sends `count` messages (seq 1..=count) and waits for the cumulative receipt of the last.
    /// Receipts must be increasing and never beyond what was sent.
    fn send_with_receipts(&mut self, address: &str, bodies: &[String]) {
        for (index, body) in bodies.iter().enumerate() {
            self.send_message(index as u64 + 1, address, body);
        }
        let last = bodies.len() as u64;
        let mut receipted = 0;
        while receipted < last {
            match self.recv() {
                Reply::Receipt { seq } => {
                    assert!(seq > receipted && seq <= last, "receipt {seq} after {receipted}, {last} sent");
                    receipted = seq;
                }
                other => panic!("expected RECEIPT, got {other:?}"),
            }
        }
    }

    /// Receives `count` MESSAGEs of `subscription_id` from `address` in delivery order,
    /// acknowledging each when `ack` is set; returns the bodies.
    fn consume(&mut self, subscription_id: u32, address: &str, count: usize, ack: bool) -> Vec<String> {
        let mut bodies = Vec::with_capacity(count);
        let mut last_delivery = 0;
        while bodies.len() < count {
            match self.recv() {
                Reply::Message { subscription_id: id, delivery_seq, address: from, body, .. } => {
                    assert_eq!((id, from.as_str()), (subscription_id, address));
                    assert!(delivery_seq > last_delivery, "delivery seq {delivery_seq} after {last_delivery}");
                    last_delivery = delivery_seq;
                    if ack {
                        self.ack(delivery_seq, false);
                    }
                    bodies.push(String::from_utf8(body).expect("body is the UTF-8 we sent"));
                }
                other => panic!("expected MESSAGE ({} of {count} so far), got {other:?}", bodies.len()),
            }
        }
        bodies
    }

    /// The broker's WebSocket close: the next message must be a close frame with `code`; then
    /// tungstenite answers it and the connection ends.
    fn expect_ws_close(&mut self, code: u16) {
        match self.next_message() {
            Message::Close(Some(frame)) => assert_eq!(u16::from(frame.code), code, "close reason {:?}", frame.reason),
            other => panic!("expected a WebSocket close with {code}, got {other:?}"),
        }
        // tungstenite answers the close on this read; the broker must then end the connection.
        match self.socket.read() {
            Err(tungstenite::Error::ConnectionClosed) => {}
            Err(error) => panic!("after close {code}: expected a clean end of the connection, got {error}"),
            Ok(message) => panic!("after close {code}: unexpected {message:?}"),
        }
    }
}

fn bodies(prefix: &str, count: usize) -> Vec<String> {
    (0..count).map(|index| format!("{prefix} {index}: ünïcødé ✓")).collect()
}

#[test]
fn subprotocol_is_echoed_for_both_tokens() {
    let broker = Broker::start(&["--shards", "1"]);
    // The broker picks the first supported token in the client's order.
    let offers = [
        (RELIABLE, RELIABLE),
        (LIGHT, LIGHT),
        ("chat, MBLWS.huawei.com", LIGHT),
        ("MBLWS.huawei.com, MBWS.huawei.com", LIGHT),
        ("MBWS.huawei.com, MBLWS.huawei.com", RELIABLE),
    ];
    for (offered, chosen) in offers {
        let peer = Peer::connect(&broker, offered, Binding::Binary);
        assert_eq!(peer.subprotocol, chosen, "offered {offered:?}");
    }
}

#[test]
fn open_gets_opened_in_the_binary_binding() {
    let broker = Broker::start(&["--shards", "1"]);
    for subprotocol in [RELIABLE, LIGHT] {
        Peer::open(&broker, subprotocol, Binding::Binary);
    }
}

#[test]
fn open_gets_opened_in_the_text_binding() {
    let broker = Broker::start(&["--shards", "1"]);
    for subprotocol in [RELIABLE, LIGHT] {
        Peer::open(&broker, subprotocol, Binding::Text);
    }
}

/// 100 SENDs with receipts from one session, consumed in order with acks (anycast, client ack,
/// small credit so the acks matter) by another; every frame in `binding`.
fn round_trip(binding: Binding) {
    let broker = Broker::start(&["--shards", "1"]);
    let address = format!("interop-{binding:?}");
    let mut consumer = Peer::open(&broker, RELIABLE, binding);
    consumer.subscribe(7, &address, Mode::Anycast, AckMode::Client, 10);
    let mut producer = Peer::open(&broker, RELIABLE, binding);
    let sent = bodies("message", 100);
    producer.send_with_receipts(&address, &sent);
    assert_eq!(consumer.consume(7, &address, 100, true), sent);
}

#[test]
fn send_receipt_consume_in_order_in_the_binary_binding() {
    round_trip(Binding::Binary);
}

#[test]
fn send_receipt_consume_in_order_in_the_text_binding() {
    round_trip(Binding::Text);
}

#[test]
fn binding_of_the_producer_does_not_leak_to_the_consumer() {
    // A text producer and a binary consumer (and back): each gets frames in its own binding.
    let broker = Broker::start(&["--shards", "1"]);
    for (producer_binding, consumer_binding) in [(Binding::Text, Binding::Binary), (Binding::Binary, Binding::Text)] {
        let address = format!("cross-{producer_binding:?}");
        let mut consumer = Peer::open(&broker, RELIABLE, consumer_binding);
        consumer.subscribe(1, &address, Mode::Anycast, AckMode::Client, 0);
        let mut producer = Peer::open(&broker, RELIABLE, producer_binding);
        let sent = bodies("cross", 20);
        producer.send_with_receipts(&address, &sent);
        assert_eq!(consumer.consume(1, &address, 20, true), sent);
    }
}

#[test]
fn light_send_with_seq_0_gets_no_receipt_but_is_delivered() {
    let broker = Broker::start(&["--shards", "1"]);
    let mut consumer = Peer::open(&broker, LIGHT, Binding::Binary);
    consumer.subscribe(1, "light", Mode::Anycast, AckMode::Auto, 0);
    let mut producer = Peer::open(&broker, LIGHT, Binding::Binary);
    let sent = bodies("light", 10);
    for body in &sent {
        producer.send_message(0, "light", body);
    }
    // The PING is answered after the SENDs were processed; no RECEIPT may come before its PONG.
    producer.send(mbws_by_hand::binary_ping(5), mbws_by_hand::text_ping(5));
    assert_eq!(producer.recv(), Reply::Pong { token: 5 });
    assert_eq!(consumer.consume(1, "light", 10, false), sent);
}

#[test]
fn multicast_gives_both_subscribers_every_message() {
    let broker = Broker::start(&["--shards", "1"]);
    let mut first = Peer::open(&broker, RELIABLE, Binding::Binary);
    first.subscribe(1, "news", Mode::Multicast, AckMode::Client, 0);
    let mut second = Peer::open(&broker, RELIABLE, Binding::Text);
    second.subscribe(2, "news", Mode::Multicast, AckMode::Auto, 0);
    let mut producer = Peer::open(&broker, RELIABLE, Binding::Binary);
    let sent = bodies("news", 50);
    producer.send_with_receipts("news", &sent);
    assert_eq!(first.consume(1, "news", 50, true), sent);
    assert_eq!(second.consume(2, "news", 50, false), sent);
}

#[test]
fn malformed_frame_gets_fatal_error_4400_then_close_4400() {
    let broker = Broker::start(&["--shards", "1"]);
    // Binary: kind code 0x7f does not exist.
    let mut peer = Peer::open(&broker, RELIABLE, Binding::Binary);
    peer.send_raw(Message::Binary(vec![1, 0x7f, 0].into()));
    expect_fatal(&mut peer, 4400);
    // Text: an unknown field in a SEND.
    let mut peer = Peer::open(&broker, LIGHT, Binding::Text);
    peer.send_raw(Message::Text("SEND\nadress:typo\n\nbody".into()));
    match peer.recv() {
        Reply::Error { code, fatal, reason, .. } => {
            assert_eq!((code, fatal), (4400, true), "reason {reason:?}");
            assert!(reason.contains("adress"), "the ERROR names the bad field: {reason:?}");
        }
        other => panic!("expected ERROR 4400, got {other:?}"),
    }
    peer.expect_ws_close(4400);
    // Another session still works.
    let mut peer = Peer::open(&broker, RELIABLE, Binding::Binary);
    peer.send_message(1, "after-error", "still here");
    assert_eq!(peer.recv(), Reply::Receipt { seq: 1 });
}

/// Expects the fatal ERROR `code` followed by a WebSocket close with the same code.
fn expect_fatal(peer: &mut Peer, code: u16) {
    match peer.recv() {
        Reply::Error { code: got, fatal, reason, .. } => {
            assert_eq!((got, fatal), (code, true), "reason {reason:?}");
            assert!(!reason.is_empty(), "the ERROR says what is wrong");
        }
        other => panic!("expected ERROR {code}, got {other:?}"),
    }
    peer.expect_ws_close(code);
}

#[test]
fn send_before_open_is_fatal_4405() {
    let broker = Broker::start(&["--shards", "1"]);
    for binding in [Binding::Binary, Binding::Text] {
        let mut peer = Peer::connect(&broker, RELIABLE, binding);
        peer.send_message(1, "too-early", "no session yet");
        expect_fatal(&mut peer, 4405);
    }
}

#[test]
fn sequence_gap_is_fatal_4409() {
    let broker = Broker::start(&["--shards", "1"]);
    for binding in [Binding::Binary, Binding::Text] {
        let mut peer = Peer::open(&broker, RELIABLE, binding);
        peer.send_message(1, "gap", "first");
        assert_eq!(peer.recv(), Reply::Receipt { seq: 1 });
        peer.send_message(3, "gap", "seq 2 is missing");
        expect_fatal(&mut peer, 4409);
    }
}

#[test]
fn ping_token_is_echoed_in_pong() {
    let broker = Broker::start(&["--shards", "1"]);
    for binding in [Binding::Binary, Binding::Text] {
        let mut peer = Peer::open(&broker, RELIABLE, binding);
        for token in [0, 1, 0xDEAD_BEEF_CAFE_BABE, u64::MAX] {
            peer.send(mbws_by_hand::binary_ping(token), mbws_by_hand::text_ping(token));
            assert_eq!(peer.recv(), Reply::Pong { token }, "{binding:?}");
        }
    }
}

#[test]
fn answers_to_a_frame_use_that_frames_binding_on_a_mixed_connection() {
    // A text session may send a binary PING: its PONG comes back binary, and later deferred
    // frames (RECEIPT) still use the binding of the session's OPEN.
    let broker = Broker::start(&["--shards", "1"]);
    let mut peer = Peer::open(&broker, RELIABLE, Binding::Text);
    peer.send_raw(Message::Binary(mbws_by_hand::binary_ping(77).into()));
    match peer.next_message() {
        Message::Binary(payload) => assert_eq!(mbws_by_hand::parse_binary(&payload), Ok(Reply::Pong { token: 77 })),
        other => panic!("expected a binary PONG, got {other:?}"),
    }
    peer.send_raw(Message::Binary(mbws_by_hand::binary_send(1, "mixed", b"binary send").into()));
    assert_eq!(peer.recv(), Reply::Receipt { seq: 1 }, "RECEIPT in the text binding of the OPEN");
}

#[test]
fn message_with_a_non_utf8_body_reaches_a_text_consumer_as_binary() {
    let broker = Broker::start(&["--shards", "1"]);
    let mut consumer = Peer::open(&broker, RELIABLE, Binding::Text);
    consumer.subscribe(3, "raw", Mode::Anycast, AckMode::Client, 0);
    let mut producer = Peer::open(&broker, RELIABLE, Binding::Binary);
    let body = b"\x00\xff\xfe not UTF-8";
    producer.send_raw(Message::Binary(mbws_by_hand::binary_send(1, "raw", body).into()));
    assert_eq!(producer.recv(), Reply::Receipt { seq: 1 });
    let payload = match consumer.next_message() {
        Message::Binary(payload) => payload,
        other => panic!("a non-UTF-8 body must come as a binary MESSAGE, got {other:?}"),
    };
    let reply = mbws_by_hand::parse_binary(&payload).unwrap();
    mbws_by_hand::assert_crate_agrees(false, &payload, &reply);
    match reply {
        Reply::Message { subscription_id, address, body: received, .. } => {
            assert_eq!((subscription_id, address.as_str(), received.as_slice()), (3, "raw", &body[..]));
        }
        other => panic!("expected MESSAGE, got {other:?}"),
    }
    // A UTF-8 body after it comes in the text binding again.
    producer.send_message(2, "raw", "text again");
    assert_eq!(producer.recv(), Reply::Receipt { seq: 2 });
    assert_eq!(consumer.consume(3, "raw", 1, true), ["text again"]);
}

#[test]
fn close_gets_close_then_websocket_close_1000() {
    let broker = Broker::start(&["--shards", "1"]);
    for (subprotocol, binding) in [(RELIABLE, Binding::Binary), (LIGHT, Binding::Text)] {
        let mut peer = Peer::open(&broker, subprotocol, binding);
        peer.send(mbws_by_hand::binary_close(), mbws_by_hand::text_close());
        assert_eq!(peer.recv(), Reply::Close, "{subprotocol} {binding:?}");
        peer.expect_ws_close(u16::from(CloseCode::Normal));
    }
}
