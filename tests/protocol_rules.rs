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
    /// The binding of the last frame read.
    last_binding: Option<Binding>,
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
        Peer { socket, binding, last_binding: None }
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
                    Event::Frame(proto::decode(Binding::Binary, payload, &limits).unwrap())
                }
                Message::Text(text) => {
                    self.last_binding = Some(Binding::Text);
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
