//! An MBWS peer over `tungstenite` whose reads and closes the test controls exactly (when the
//! connection stops reading, when its close frame goes out, when it is dropped); MBWS frames
//! are encoded and decoded with the crate's codec. A small receive window
//! ([`Peer::connect_small_window`]) makes the broker's writes to it block soon.
//!
//! Included with `#[path = "support/ws_peer.rs"] mod ws_peer;` (beside `mod common;`) by the
//! test files that need it; not every file uses every function.

#![allow(dead_code)]

use std::net::TcpStream;
use std::os::fd::FromRawFd;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mbws::mbws::{self as proto, AckMode, Binding, CodecLimits, DeliveryMode, Frame, PROTOCOL_VERSION};
use tungstenite::client::IntoClientRequest;
use tungstenite::{Message, WebSocket};

pub use crate::common::admin_request;
use crate::common::Broker;

/// Every read on a test socket gives up after this long.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
pub const RELIABLE: &str = "MBWS.huawei.com";

/// One MBWS connection through tungstenite, sending in `binding`.
pub struct Peer {
    pub socket: WebSocket<TcpStream>,
    pub binding: Binding,
}

/// What the broker sent: an MBWS frame (with its binding) or the WebSocket close.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // One at a time, matched by value: boxing buys nothing here.
pub enum Received {
    Frame(Binding, Frame),
    Closed(u16),
}

impl Peer {
    pub fn connect(broker: &Broker, binding: Binding) -> Peer {
        Peer::connect_stream(broker, TcpStream::connect(broker.addr).expect("connect to the broker"), binding)
    }

    /// Connects with a receive buffer of about `receive_buffer_bytes`, set before the SYN so
    /// that the window stays that small: the broker's writes to this peer block soon.
    pub fn connect_small_window(broker: &Broker, binding: Binding, receive_buffer_bytes: i32) -> Peer {
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

    pub fn connect_stream(broker: &Broker, stream: TcpStream, binding: Binding) -> Peer {
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        let mut request = broker.url().into_client_request().unwrap();
        request.headers_mut().insert("Sec-WebSocket-Protocol", RELIABLE.parse().unwrap());
        let (socket, response) = tungstenite::client(request, stream).expect("WebSocket upgrade");
        assert_eq!(response.status(), 101);
        Peer { socket, binding }
    }

    pub fn send(&mut self, frame: &Frame) {
        let payload = proto::encode(self.binding, frame);
        let message = match self.binding {
            Binding::Binary => Message::Binary(payload.freeze()),
            Binding::Text => Message::Text(String::from_utf8(payload.to_vec()).unwrap().into()),
        };
        self.socket.send(message).expect("send to the broker");
    }

    /// OPEN (a new session when `session_id` is empty, else a resume); returns OPENED.
    pub fn open(&mut self, session_id: &Bytes, last_received_seq: u64, heartbeat_ms: u32) -> proto::Opened {
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

    pub fn subscribe(&mut self, subscription_id: u32, address: &str, ack_mode: AckMode, credit: u32) {
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

    pub fn send_message(&mut self, seq: u64, address: &str, body: &'static str) {
        self.send(&Frame::Send(proto::Send {
            seq,
            address: Bytes::copy_from_slice(address.as_bytes()),
            body: Bytes::from_static(body.as_bytes()),
            ..Default::default()
        }));
    }

    /// The next MBWS frame or the close; a read that times out fails the test.
    pub fn next(&mut self) -> Received {
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
    pub fn next_delivery(&mut self) -> proto::Message {
        loop {
            match self.next() {
                Received::Frame(_, Frame::Message(message)) => return message,
                Received::Frame(..) => continue,
                Received::Closed(code) => panic!("closed with {code} while waiting for a MESSAGE"),
            }
        }
    }
}

/// Waits (bounded) until `address` has handed `deliveries` deliveries to its consumers' write
/// queues (its `messages_out` in `GET /api/addresses`). A RECEIPT does not say so: a message is
/// receipted once the address took it, and delivered once its id is covered by a durable
/// reservation, which the first messages after a start wait for (an fsync, slow on a loaded
/// machine).
pub fn wait_for_deliveries(broker: &Broker, address: &str, deliveries: u64) {
    let admin = broker.admin_addr();
    let deadline = Instant::now() + IO_TIMEOUT;
    loop {
        let (status, body) = admin_request(admin, "GET", "/api/addresses", "");
        assert_eq!(status, 200, "{body}");
        let listed: serde_json::Value = serde_json::from_str(&body).unwrap();
        let out = listed["addresses"]
            .as_array()
            .unwrap()
            .iter()
            .find(|entry| entry["name"] == address)
            .and_then(|entry| entry["messages_out"].as_u64())
            .unwrap_or(0);
        if out >= deliveries {
            return;
        }
        assert!(Instant::now() < deadline, "{address} made {out} of {deliveries} deliveries within {IO_TIMEOUT:?}");
        // Polled: the admin API has no event to wait on.
        std::thread::sleep(Duration::from_millis(10));
    }
}
