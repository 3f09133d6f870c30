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
#[path = "support/ws_peer.rs"]
mod ws_peer;

use std::time::{Duration, Instant};

use bytes::Bytes;
use chaos_proxy::{ChaosProxy, Schedule};
use common::Broker;
use mbws::mbws::{self as proto, AckMode, Binding, Frame};
use mbws_client::{Client, ClientError, ClientOptions};
use ws_peer::{Peer, Received};

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
    // Both are in the consumer's write queue (a RECEIPT does not say so: the first messages
    // after a start wait for the durable id reservation; when that fsync was slow, the close
    // below came first, and the broker's close frame reached the consumer before delivery 1).
    ws_peer::wait_for_deliveries(&broker, "blocker", 1);
    ws_peer::wait_for_deliveries(&broker, "big", 1);
    // The peer takes delivery 1, stalls (delivery 2 cannot be written), and closes the
    // WebSocket (no MBWS CLOSE: the session stays resumable): closing began with the write of
    // delivery 2 in flight or about to be, and the close grace drops it and the close frame.
    // Delivery 1 is taken before the close: the grace bounds every write from the close on,
    // and reading 8 MiB through a small window may take longer than that on a loaded machine.
    let first = consumer.next_delivery();
    assert_eq!((first.subscription_id, first.delivery_seq, first.body.len()), (1, 1, BIG));
    consumer.socket.close(None).expect("send the close frame");
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
