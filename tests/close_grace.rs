//! Every wait on a closing connection has a bound (issue 10), against the real binary: a
//! consumer that stops reading while the broker's write to it is in flight (its socket buffers
//! full), and then closes or is closed, holds nothing past the close grace (2 s): its
//! connection is torn down, its slot (and its place in `--max-sessions`) is freed, and its
//! unacknowledged deliveries go to another consumer.
//!
//! The stalled consumer is `tungstenite` with a small receive window, so that the test
//! controls exactly how much it reads (a few bytes of the delivery: the broker's write of the
//! rest is then in flight and cannot finish) and that it never reads again.

mod common;
#[path = "support/ws_peer.rs"]
mod ws_peer;

use std::io::Read;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::Broker;
use mbws::mbws::{self as proto, AckMode, Binding, Frame};
use mbws_client::{Client, ClientError, ClientOptions};
use ws_peer::{admin_request, Peer};

/// The broker's close grace (`shard::connection::CLOSE_GRACE`).
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// What the test allows beyond the close grace: scheduling on a loaded machine, and reading
/// the redelivered message. Without the bound, the wait is forever.
const MARGIN: Duration = Duration::from_secs(4);
/// Larger than every socket buffer between the broker and the stalled consumer, so the
/// broker's write of it cannot finish while the consumer does not read.
const BIG: usize = 8 << 20;

fn start_broker(max_sessions: &str) -> Broker {
    Broker::start(&[
        "--shards",
        "1",
        "--max-message-bytes",
        "16777216",
        "--max-frame-bytes",
        "16777216",
        "--max-outbound-bytes",
        "67108864",
        "--max-sessions",
        max_sessions,
    ])
}

fn client(broker: &Broker) -> Result<Client, ClientError> {
    let options = ClientOptions { max_message_bytes: 64 << 20, ..ClientOptions::default() };
    Client::connect(&broker.url(), options)
}

/// A consumer of "big" (client ack, credit 1) whose broker-side write is stuck: it has read
/// the first bytes of the 8 MiB delivery (so the write is in flight), and reads no more.
/// Returns it and the publisher (whose session stays open).
fn stalled_consumer(broker: &Broker) -> (Peer, Client) {
    let mut stalled = Peer::connect_small_window(broker, Binding::Binary, 16 * 1024);
    stalled.open(&Bytes::new(), 0, 0);
    stalled.subscribe(1, "big", AckMode::Client, 1);
    let mut publisher = client(broker).expect("the publisher connects");
    let seq = publisher.send("big", Bytes::from(vec![b'b'; BIG])).unwrap();
    publisher.wait_receipt(seq).unwrap();
    // The first bytes of the MESSAGE: the broker's write of it has begun. The frame is never
    // decoded (tungstenite is bypassed from here on for reading).
    let mut first = [0u8; 64];
    let read = stalled.socket.get_mut().read(&mut first).expect("the first bytes of the delivery");
    assert!(read > 0, "the broker closed the stalled consumer before delivering");
    (stalled, publisher)
}

/// A second consumer of "big", subscribed now (after the stalled one holds the message).
fn second_consumer(broker: &Broker) -> Peer {
    let mut second = Peer::connect(broker, Binding::Binary);
    second.open(&Bytes::new(), 0, 0);
    second.subscribe(1, "big", AckMode::Client, 1);
    second
}

/// The 8 MiB message reaches `second` by `deadline` (redelivered: the stalled consumer had it).
fn assert_redelivered_by(second: &mut Peer, deadline: Instant, what: &str) {
    let wait = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    second.socket.get_mut().set_read_timeout(Some(wait)).unwrap();
    let message = loop {
        match second.socket.read() {
            Ok(tungstenite::Message::Binary(payload)) => {
                match proto::decode(Binding::Binary, payload, &proto::CodecLimits::default()).unwrap() {
                    Frame::Message(message) => break message,
                    _ => continue,
                }
            }
            Ok(_) => continue,
            Err(tungstenite::Error::Io(error))
                if matches!(error.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
            {
                panic!("{what}: the stalled consumer's delivery did not reach another consumer within {:?} of the close (close grace {CLOSE_GRACE:?})", CLOSE_GRACE + MARGIN)
            }
            Err(error) => panic!("{what}: read failed: {error}"),
        }
    };
    assert_eq!(message.body.len(), BIG);
    assert!(message.redelivered, "{what}: the message went to the stalled consumer first");
    assert!(Instant::now() <= deadline, "{what}: redelivered too late");
}

/// A peer sends its close frame while the broker's write to it is stuck (it stopped reading:
/// its receive buffer is full), and never reads again. Closing began; the write in flight, and
/// the close frame queued behind it, may take the close grace and no more: then the connection
/// is torn down and its slot freed. Its delivery goes to another consumer when its reader ends
/// (within the grace), and a new session takes its place in `--max-sessions` (the slot was held
/// forever by the stuck write before issue 10's fix).
#[test]
fn a_peer_that_closes_while_a_write_to_it_is_stuck_frees_its_slot_and_deliveries_within_the_close_grace() {
    // The publisher, the stalled consumer and the second consumer: a fourth session needs a
    // slot given back.
    let broker = start_broker("3");
    let (mut stalled, _publisher) = stalled_consumer(&broker);
    let mut second = second_consumer(&broker);
    // An MBWS CLOSE (the session ends: its deliveries go back rather than wait for a resume),
    // then the WebSocket close frame; nothing is read again.
    stalled.send(&Frame::Close(proto::Close));
    stalled.socket.close(None).expect("send the close frame");
    let deadline = Instant::now() + CLOSE_GRACE + MARGIN;
    assert_redelivered_by(&mut second, deadline, "closed by the peer");
    let fourth = loop {
        match client(&broker) {
            Ok(client) => break client,
            Err(ClientError::Broker(error)) if error.code == 4503 => {
                assert!(
                    Instant::now() < deadline,
                    "the closed session still holds its place in --max-sessions {:?} after its close",
                    CLOSE_GRACE + MARGIN
                );
                // Polled: no event says that a slot was freed.
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(other) => panic!("a fourth session: {other:?}"),
        }
    };
    drop(fourth);
    drop(stalled); // Held to here: its socket stays open (and unread) all along.
}

/// The broker begins the close (here an operator ends the session; a token's expiry, a drain
/// or fencing take the same path) while its write to a peer that stopped reading is stuck: the
/// close frame queued behind the write can never go out, and the peer sends nothing. The write
/// gets the close grace, then the connection is torn down, and the session's delivery goes to
/// another consumer (before issue 10's fix, the reader waited on the silent peer and the writer
/// on the full socket, forever).
#[test]
fn a_session_the_broker_closes_while_a_write_to_it_is_stuck_gives_its_deliveries_back_within_the_close_grace() {
    let broker = start_broker("100");
    let admin = broker.admin_addr();
    let (stalled, _publisher) = stalled_consumer(&broker);
    let mut second = second_consumer(&broker);
    let port = stalled.socket.get_ref().local_addr().unwrap().port();
    let (status, sessions) = admin_request(admin, "GET", "/api/sessions", "");
    assert_eq!(status, 200, "{sessions}");
    let sessions: serde_json::Value = serde_json::from_str(&sessions).unwrap();
    let peer = format!("127.0.0.1:{port}");
    let id = sessions["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|session| session["peer"] == peer.as_str())
        .unwrap_or_else(|| panic!("no session from {peer} in {sessions}"))["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, body) = admin_request(admin, "DELETE", &format!("/api/sessions/{id}"), "");
    assert_eq!(status, 200, "{body}");
    let deadline = Instant::now() + CLOSE_GRACE + MARGIN;
    assert_redelivered_by(&mut second, deadline, "closed by an operator");
    drop(stalled);
}
