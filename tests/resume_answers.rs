//! What a session owes its client across a lost connection, against the real binary: the ERROR
//! of a refused SEND (replayed on resume, before the RECEIPT that covers its seq), the binding
//! of an ERROR that answers no frame (the session's), and the credit of deliveries that the
//! close grace dropped (returned; client-ack ones are resent on resume, as first sent).
//!
//! The peer is `tungstenite`, so that the test controls exactly what is read and when the
//! connection is dropped; MBWS frames are encoded and decoded with the crate's codec.

#[path = "support/chaos_proxy.rs"]
mod chaos_proxy;
mod common;

use std::net::TcpStream;
use std::os::fd::FromRawFd;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chaos_proxy::{ChaosProxy, Schedule};
use common::Broker;
use mbws::mbws::{self as proto, AckMode, Binding, CodecLimits, DeliveryMode, Frame, PROTOCOL_VERSION};
use mbws_client::{Client, ClientError, ClientOptions};
use tungstenite::client::IntoClientRequest;
use tungstenite::{Message, WebSocket};

/// Every read on a test socket gives up after this long.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
const RELIABLE: &str = "MBWS.huawei.com";

/// One MBWS connection through tungstenite, sending in `binding`.
struct Peer {
    socket: WebSocket<TcpStream>,
    binding: Binding,
}

/// What the broker sent: an MBWS frame (with its binding) or the WebSocket close.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // One at a time, matched by value: boxing buys nothing here.
enum Received {
    Frame(Binding, Frame),
    Closed(u16),
}

impl Peer {
    fn connect(broker: &Broker, binding: Binding) -> Peer {
        Peer::connect_stream(broker, TcpStream::connect(broker.addr).expect("connect to the broker"), binding)
    }

    /// Connects with a receive buffer of about `receive_buffer_bytes`, set before the SYN so
    /// that the window stays that small: the broker's writes to this peer block soon.
    fn connect_small_window(broker: &Broker, binding: Binding, receive_buffer_bytes: i32) -> Peer {
        let std::net::SocketAddr::V4(addr) = broker.addr else { panic!("the test broker listens on IPv4") };
        // SAFETY: socket(2) touches no memory of ours; the result is checked below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        assert!(fd >= 0, "socket() failed");
        // SAFETY: `fd` is a fresh descriptor nothing else owns; the stream closes it on every
        // path from here on, a failed assertion included.
        let stream = unsafe { TcpStream::from_raw_fd(fd) };
        let size = receive_buffer_bytes;
        // SAFETY: `fd` is open (owned by `stream`); the option points at the live `size` and
        // its exact length is passed.
        let set = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&size as *const i32).cast(),
                std::mem::size_of::<i32>() as libc::socklen_t,
            )
        };
        assert_eq!(set, 0, "setsockopt(SO_RCVBUF) failed");
        let sockaddr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: addr.port().to_be(),
            sin_addr: libc::in_addr { s_addr: u32::from(*addr.ip()).to_be() },
            sin_zero: [0; 8],
        };
        // SAFETY: `fd` is open (owned by `stream`); the address points at the live `sockaddr`
        // and its exact length is passed.
        let connected = unsafe {
            libc::connect(
                fd,
                (&sockaddr as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        assert_eq!(connected, 0, "connect() to {addr} failed");
        Peer::connect_stream(broker, stream, binding)
    }

    fn connect_stream(broker: &Broker, stream: TcpStream, binding: Binding) -> Peer {
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        let mut request = broker.url().into_client_request().unwrap();
        request.headers_mut().insert("Sec-WebSocket-Protocol", RELIABLE.parse().unwrap());
        let (socket, response) = tungstenite::client(request, stream).expect("WebSocket upgrade");
        assert_eq!(response.status(), 101);
        Peer { socket, binding }
    }

    fn send(&mut self, frame: &Frame) {
        let payload = proto::encode(self.binding, frame);
        let message = match self.binding {
            Binding::Binary => Message::Binary(payload.freeze()),
            Binding::Text => Message::Text(String::from_utf8(payload.to_vec()).unwrap().into()),
        };
        self.socket.send(message).expect("send to the broker");
    }

    /// OPEN (a new session when `session_id` is empty, else a resume); returns OPENED.
    fn open(&mut self, session_id: &Bytes, last_received_seq: u64, heartbeat_ms: u32) -> proto::Opened {
        self.send(&Frame::Open(proto::Open {
            version: PROTOCOL_VERSION,
            session_id: session_id.clone(),
            last_received_seq,
            heartbeat_ms,
            ..Default::default()
        }));
        match self.next() {
            Received::Frame(_, Frame::Opened(opened)) => opened,
            other => panic!("expected OPENED, got {other:?}"),
        }
    }

    fn subscribe(&mut self, subscription_id: u32, address: &str, ack_mode: AckMode, credit: u32) {
        self.send(&Frame::Subscribe(proto::Subscribe {
            subscription_id,
            address: Bytes::copy_from_slice(address.as_bytes()),
            mode: DeliveryMode::Anycast,
            ack_mode,
            credit,
        }));
        match self.next() {
            Received::Frame(_, Frame::Subscribed(_)) => {}
            other => panic!("expected SUBSCRIBED, got {other:?}"),
        }
    }

    fn send_message(&mut self, seq: u64, address: &str, body: &'static str) {
        self.send(&Frame::Send(proto::Send {
            seq,
            address: Bytes::copy_from_slice(address.as_bytes()),
            body: Bytes::from_static(body.as_bytes()),
            ..Default::default()
        }));
    }

    /// The next MBWS frame or the close; a read that times out fails the test.
    fn next(&mut self) -> Received {
        loop {
            let (binding, payload) = match self.socket.read() {
                Ok(Message::Binary(payload)) => (Binding::Binary, payload),
                Ok(Message::Text(text)) => (Binding::Text, Bytes::copy_from_slice(text.as_bytes())),
                Ok(Message::Close(frame)) => return Received::Closed(frame.map_or(1005, |f| u16::from(f.code))),
                Ok(_) => continue,
                Err(tungstenite::Error::Io(error))
                    if matches!(error.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
                {
                    panic!("nothing from the broker within {IO_TIMEOUT:?}")
                }
                Err(error) => panic!("read from the broker failed: {error}"),
            };
            let frame =
                proto::decode(binding, payload, &CodecLimits::default()).expect("the broker sends valid MBWS frames");
            return Received::Frame(binding, frame);
        }
    }

    /// The next MESSAGE, skipping other frames.
    fn next_delivery(&mut self) -> proto::Message {
        loop {
            match self.next() {
                Received::Frame(_, Frame::Message(message)) => return message,
                Received::Frame(..) => continue,
                Received::Closed(code) => panic!("closed with {code} while waiting for a MESSAGE"),
            }
        }
    }
}

fn publisher(broker: &Broker) -> Client {
    let options = ClientOptions { max_message_bytes: 64 << 20, ..ClientOptions::default() };
    Client::connect(&broker.url(), options).expect("publisher connects")
}

/// Item 9 of issue 8: a SEND refused with non-fatal 4429 whose ERROR was lost with the
/// connection must not look receipted after resume.
#[test]
fn a_refused_send_whose_error_was_lost_gets_it_again_on_resume_before_any_receipt_covering_it() {
    let broker = Broker::start(&["--max-queued-messages", "2", "--session-expiry-ms", "30000"]);
    let mut peer = Peer::connect(&broker, Binding::Binary);
    let opened = peer.open(&Bytes::new(), 0, 0);
    // Nobody consumes "full": SENDs 1 and 2 fill its queue, SEND 3 is refused with 4429.
    for seq in 1..=3 {
        peer.send_message(seq, "full", "x");
    }
    // Everything the broker answers on this connection is lost with it: the client reads the
    // bytes (so the broker is known to have answered) but never looks at them, as if the
    // connection had died first. The broker cannot tell the difference.
    loop {
        match peer.next() {
            Received::Frame(_, Frame::Receipt(receipt)) if receipt.seq >= 3 => break,
            Received::Frame(..) => continue,
            Received::Closed(code) => panic!("closed with {code}"),
        }
    }
    drop(peer);

    let mut resumed = Peer::connect(&broker, Binding::Binary);
    let reopened = resumed.open(&opened.session_id, 0, 0);
    assert!(reopened.resumed, "the session is resumed");
    assert_eq!(reopened.last_received_seq, 3, "the broker took SENDs 1 to 3 (3 was refused)");
    let mut refused = None;
    loop {
        match resumed.next() {
            Received::Frame(_, Frame::Error(error)) if error.seq != 0 => {
                assert!(!error.fatal, "a refused SEND does not end the session: {error:?}");
                refused = Some(error);
            }
            Received::Frame(_, Frame::Receipt(receipt)) => {
                let error = refused
                    .unwrap_or_else(|| panic!("RECEIPT {} arrived with no ERROR for the refused SEND 3", receipt.seq));
                assert_eq!((error.code, error.seq), (4429, 3), "the ERROR names SEND 3: {error:?}");
                assert_eq!(receipt.seq, 3);
                break;
            }
            Received::Frame(..) => continue,
            Received::Closed(code) => panic!("closed with {code}"),
        }
    }
}

/// Item 9 of issue 8, the client's side: the crate's client passes a refusal on once, and
/// drops the replay a resume brings.
#[test]
fn the_client_reports_a_refusal_once_although_the_resume_replays_it() {
    let broker = Broker::start(&["--max-queued-messages", "2", "--session-expiry-ms", "30000"]);
    // One cut, a second after the start: after the refusal below has been seen.
    let schedule = Schedule { seed: 9, gap_ms: (1000, 1001), cut_percent: 100, stall_ms: (1, 2), max_cuts: 1 };
    let proxy = ChaosProxy::start(broker.addr, schedule);
    let options = ClientOptions { reconnect: Some(Duration::from_secs(10)), ..ClientOptions::default() };
    let mut client = Client::connect(&proxy.url(), options).expect("connect through the proxy");
    for body in ["1", "2", "3"] {
        client.send("full", body).unwrap();
    }
    match client.wait_receipt(3) {
        Err(ClientError::Broker(error)) => assert_eq!((error.code, error.seq), (4429, 3), "{error:?}"),
        other => panic!("SEND 3 to a full queue must be refused, got {other:?}"),
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while proxy.cuts() < 1 {
        assert!(Instant::now() < deadline, "the proxy did not cut the connection");
        std::thread::sleep(Duration::from_millis(10));
    }
    // The client resumes; the broker replays ERROR 3, which the client has already reported.
    let seq = client.send("free", "4").unwrap();
    client.wait_receipt(seq).expect("SEND 4 is receipted; the replayed refusal of 3 is not reported again");
    assert!(client.reconnects() >= 1, "the session was resumed");
}

/// Item 10 of issue 8: an ERROR that answers no frame (here the heartbeat timeout) goes in the
/// session's binding.
#[test]
fn a_text_session_gets_its_heartbeat_timeout_error_as_text_and_stays_resumable() {
    let broker = Broker::start(&[]);
    let mut peer = Peer::connect(&broker, Binding::Text);
    let opened = peer.open(&Bytes::new(), 0, 1000);
    assert_eq!(opened.heartbeat_ms, 1000);
    // Silence: after twice the heartbeat the broker ends the connection with fatal 4408.
    let started = Instant::now();
    match peer.next() {
        Received::Frame(binding, Frame::Error(error)) => {
            assert_eq!((error.code, error.fatal), (4408, true), "{error:?}");
            assert_eq!(binding, Binding::Text, "a text session gets its ERROR in the text binding");
        }
        other => panic!("expected ERROR 4408, got {other:?}"),
    }
    assert!(started.elapsed() >= Duration::from_millis(1500), "not before twice the heartbeat");
    assert!(matches!(peer.next(), Received::Closed(4408)));
    // Section 7.7: on MBWS the heartbeat timeout loses the connection, not the session.
    let mut again = Peer::connect(&broker, Binding::Text);
    let reopened = again.open(&opened.session_id, 0, 0);
    assert!(reopened.resumed, "the session outlives its heartbeat timeout: {reopened:?}");
}

/// Item 15 of issue 8: the close grace drops the writes a stalled peer never took; the credit
/// of the deliveries among them goes back to the address, and client-ack deliveries are resent
/// on resume as they were first sent (same delivery-seq, not marked redelivered: PROTOCOL.md 7.4).
fn deliveries_dropped_by_the_close_grace(ack_mode: AckMode) {
    const BIG: usize = 8 << 20; // Larger than the socket buffers between broker and peer.
    let broker = Broker::start(&[
        "--shards",
        "1",
        "--max-message-bytes",
        "16777216",
        "--max-frame-bytes",
        "16777216",
        "--max-outbound-bytes",
        "67108864",
        "--session-expiry-ms",
        "30000",
    ]);
    let mut consumer = Peer::connect_small_window(&broker, Binding::Binary, 16 * 1024);
    let opened = consumer.open(&Bytes::new(), 0, 0);
    // Subscription 1 only holds the write up; subscription 2 (credit 1: one delivery at a
    // time) is the one under test.
    consumer.subscribe(1, "blocker", AckMode::Client, 1);
    consumer.subscribe(2, "big", ack_mode, 1);
    let mut publisher = publisher(&broker);
    // Delivery 1 fills the socket buffers: the broker's write of it blocks.
    let seq = publisher.send("blocker", Bytes::from(vec![b'1'; BIG])).unwrap();
    publisher.wait_receipt(seq).unwrap();
    // Delivery 2 is queued behind it.
    let seq = publisher.send("big", Bytes::from(vec![b'2'; BIG])).unwrap();
    publisher.wait_receipt(seq).unwrap();
    // The peer closes the WebSocket (no MBWS CLOSE: the session stays resumable), takes
    // delivery 1, and stalls: delivery 2 and the close frame behind it cannot be written, and
    // the close grace drops them.
    consumer.socket.close(None).expect("send the close frame");
    let first = consumer.next_delivery();
    assert_eq!((first.subscription_id, first.delivery_seq, first.body.len()), (1, 1, BIG));
    broker
        .wait_for_log("close grace ran out", Duration::from_secs(10))
        .expect("the broker's write to the stalled peer timed out");
    drop(consumer);

    let mut resumed = Peer::connect(&broker, Binding::Binary);
    let reopened = resumed.open(&opened.session_id, 1, 0);
    assert!(reopened.resumed);
    if ack_mode == AckMode::Client {
        let again = resumed.next_delivery();
        assert_eq!((again.subscription_id, again.delivery_seq, again.body.len()), (2, 2, BIG), "resent");
        assert!(!again.redelivered, "a resend is the same delivery, which the client never received");
        resumed.send(&Frame::Ack(proto::Ack { delivery_seq: 2, cumulative: false }));
    }
    // Subscription 2 still has its credit: the next message is delivered.
    let seq = publisher.send("big", "after").unwrap();
    publisher.wait_receipt(seq).unwrap();
    let after = resumed.next_delivery();
    assert_eq!(after.subscription_id, 2);
    assert_eq!(after.body, Bytes::from_static(b"after"), "credit was lost with the dropped writes");
}

#[test]
fn auto_ack_credit_dropped_by_the_close_grace_comes_back() {
    deliveries_dropped_by_the_close_grace(AckMode::Auto);
}

#[test]
fn client_ack_deliveries_dropped_by_the_close_grace_are_resent_on_resume() {
    deliveries_dropped_by_the_close_grace(AckMode::Client);
}
