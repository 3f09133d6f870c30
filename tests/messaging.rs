//! Messaging semantics against the real broker binary, through the crate's own client:
//! round trips in both bindings and both subprotocols, anycast and multicast, credit, the
//! queue bound, cross-shard routing, shutdown.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use common::Broker;
use mbws::broker::owner_of;
use mbws::mbws::{AckMode, Binding, DeliveryMode, Frame, Subprotocol};
use mbws_client::{Client, ClientError, ClientOptions};

const WAIT: Duration = Duration::from_secs(5);

fn connect(broker: &Broker, subprotocol: Subprotocol, binding: Binding) -> Client {
    let options = ClientOptions { subprotocol, binding, timeout: WAIT, ..ClientOptions::default() };
    Client::connect(&broker.url(), options).expect("connect to the broker")
}

/// Receives `count` messages, acknowledging each, and returns their bodies.
fn receive(client: &mut Client, count: usize) -> Vec<String> {
    let mut bodies = Vec::with_capacity(count);
    while bodies.len() < count {
        let message = client
            .next_message(WAIT)
            .expect("no broker error")
            .unwrap_or_else(|| panic!("only {} of {count} messages arrived", bodies.len()));
        client.ack(message.delivery_seq, false).unwrap();
        bodies.push(String::from_utf8(message.body.to_vec()).unwrap());
    }
    client.flush().unwrap();
    bodies
}

#[test]
fn round_trip_in_every_subprotocol_and_binding() {
    let broker = Broker::start(&["--shards", "1"]);
    for subprotocol in [Subprotocol::Reliable, Subprotocol::Light] {
        for binding in [Binding::Binary, Binding::Text] {
            let address = format!("round-trip-{subprotocol:?}-{binding:?}");
            let mut producer = connect(&broker, subprotocol, binding);
            let mut consumer = connect(&broker, subprotocol, binding);
            assert!(!producer.opened().session_id.is_empty());
            consumer.subscribe(1, &address, DeliveryMode::Anycast, AckMode::Client, 10).unwrap();
            let mut last = 0;
            for index in 0..50 {
                last = producer.send(&address, format!("message {index}")).unwrap();
            }
            producer.wait_receipt(last).unwrap();
            let bodies = receive(&mut consumer, 50);
            let expected: Vec<String> = (0..50).map(|index| format!("message {index}")).collect();
            assert_eq!(bodies, expected, "{subprotocol:?} {binding:?}");
            producer.close().unwrap();
            consumer.close().unwrap();
        }
    }
}

#[test]
fn messages_wait_in_the_queue_until_a_consumer_arrives() {
    let broker = Broker::start(&["--shards", "2"]);
    let mut producer = connect(&broker, Subprotocol::Reliable, Binding::Binary);
    let mut last = 0;
    for index in 0..100 {
        last = producer.send("waiting", format!("{index}")).unwrap();
    }
    producer.wait_receipt(last).unwrap();
    let mut consumer = connect(&broker, Subprotocol::Reliable, Binding::Binary);
    consumer.subscribe(1, "waiting", DeliveryMode::Anycast, AckMode::Client, 100).unwrap();
    let bodies = receive(&mut consumer, 100);
    assert_eq!(bodies, (0..100).map(|i| i.to_string()).collect::<Vec<_>>());
}

#[test]
fn anycast_shares_messages_between_consumers_without_duplicates_or_loss() {
    let broker = Broker::start(&["--shards", "2"]);
    let mut consumers: Vec<Client> = (0..3)
        .map(|index| {
            let mut consumer = connect(&broker, Subprotocol::Reliable, Binding::Binary);
            consumer.subscribe(index + 1, "work", DeliveryMode::Anycast, AckMode::Client, 5).unwrap();
            consumer
        })
        .collect();
    let mut producer = connect(&broker, Subprotocol::Reliable, Binding::Binary);
    const TOTAL: usize = 3000;
    let sender = std::thread::spawn(move || {
        let mut last = 0;
        for index in 0..TOTAL {
            last = producer.send("work", format!("{index}")).unwrap();
        }
        producer.wait_receipt(last).unwrap();
    });
    let mut seen = HashSet::new();
    let mut per_consumer = [0usize; 3];
    // Round robin over the consumers until every message has arrived somewhere.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while seen.len() < TOTAL {
        assert!(std::time::Instant::now() < deadline, "only {} of {TOTAL} messages arrived", seen.len());
        for (index, consumer) in consumers.iter_mut().enumerate() {
            while let Some(message) = consumer.next_message(Duration::from_millis(5)).unwrap() {
                consumer.ack(message.delivery_seq, false).unwrap();
                let body = String::from_utf8(message.body.to_vec()).unwrap();
                assert!(seen.insert(body.clone()), "message {body} delivered twice");
                per_consumer[index] += 1;
            }
            consumer.flush().unwrap();
        }
    }
    sender.join().unwrap();
    assert_eq!(seen.len(), TOTAL);
    assert!(per_consumer.iter().all(|&count| count > 0), "every consumer gets a share: {per_consumer:?}");
}

#[test]
fn multicast_gives_every_subscriber_every_message() {
    let broker = Broker::start(&["--shards", "2"]);
    let mut subscribers: Vec<Client> = (0..3)
        .map(|_| {
            let mut subscriber = connect(&broker, Subprotocol::Reliable, Binding::Text);
            subscriber.subscribe(1, "news", DeliveryMode::Multicast, AckMode::Client, 50).unwrap();
            subscriber
        })
        .collect();
    let mut producer = connect(&broker, Subprotocol::Reliable, Binding::Binary);
    let mut last = 0;
    for index in 0..500 {
        last = producer.send("news", format!("{index}")).unwrap();
        if index % 100 == 99 {
            producer.wait_receipt(last).unwrap();
        }
    }
    producer.wait_receipt(last).unwrap();
    let expected: Vec<String> = (0..500).map(|i| i.to_string()).collect();
    for subscriber in subscribers.iter_mut() {
        assert_eq!(receive(subscriber, 500), expected);
    }
}

#[test]
fn a_consumer_never_holds_more_unacknowledged_messages_than_its_credit() {
    let broker = Broker::start(&["--shards", "1"]);
    let mut producer = connect(&broker, Subprotocol::Reliable, Binding::Binary);
    let mut last = 0;
    for index in 0..20 {
        last = producer.send("credit", format!("{index}")).unwrap();
    }
    producer.wait_receipt(last).unwrap();
    let mut consumer = connect(&broker, Subprotocol::Reliable, Binding::Binary);
    consumer.subscribe(1, "credit", DeliveryMode::Anycast, AckMode::Client, 3).unwrap();
    let mut held = Vec::new();
    while let Some(message) = consumer.next_message(Duration::from_millis(300)).unwrap() {
        held.push(message);
    }
    assert_eq!(held.len(), 3, "credit 3 allows exactly 3 unacknowledged deliveries");
    // Acknowledging one frees exactly one slot.
    consumer.ack(held[0].delivery_seq, false).unwrap();
    let next = consumer.next_message(WAIT).unwrap().expect("a fourth message after one ack");
    assert_eq!(next.body, Bytes::from_static(b"3"));
    assert!(consumer.next_message(Duration::from_millis(300)).unwrap().is_none());
    // FLOW raises the credit.
    consumer.write_frame(&Frame::Flow(mbws::mbws::Flow { subscription_id: 1, credit: 10 })).unwrap();
    let mut more = 0;
    while consumer.next_message(Duration::from_millis(300)).unwrap().is_some() {
        more += 1;
    }
    assert_eq!(more, 10 - 3, "credit 10 with 3 still unacknowledged allows 7 more");
}

#[test]
fn unacknowledged_messages_are_redelivered_to_another_consumer_when_a_consumer_leaves() {
    let broker = Broker::start(&["--shards", "2"]);
    let mut producer = connect(&broker, Subprotocol::Reliable, Binding::Binary);
    let mut first = connect(&broker, Subprotocol::Reliable, Binding::Binary);
    first.subscribe(1, "jobs", DeliveryMode::Anycast, AckMode::Client, 2).unwrap();
    let last = {
        producer.send("jobs", "a").unwrap();
        producer.send("jobs", "b").unwrap()
    };
    producer.wait_receipt(last).unwrap();
    let got_a = first.next_message(WAIT).unwrap().unwrap();
    let _got_b = first.next_message(WAIT).unwrap().unwrap();
    first.ack(got_a.delivery_seq, false).unwrap();
    first.close().unwrap();
    let mut second = connect(&broker, Subprotocol::Reliable, Binding::Binary);
    second.subscribe(1, "jobs", DeliveryMode::Anycast, AckMode::Client, 2).unwrap();
    let again = second.next_message(WAIT).unwrap().expect("b is redelivered");
    assert_eq!(again.body, Bytes::from_static(b"b"));
    assert!(again.redelivered, "redelivered flag is set");
    assert!(second.next_message(Duration::from_millis(300)).unwrap().is_none(), "a was acknowledged");
}

#[test]
fn a_full_queue_refuses_the_send_with_an_error_and_keeps_what_was_receipted() {
    let broker = Broker::start(&["--shards", "1", "--max-queued-messages", "5"]);
    let mut producer = connect(&broker, Subprotocol::Reliable, Binding::Binary);
    for index in 0..5 {
        producer.send("bounded", format!("{index}")).unwrap();
    }
    producer.wait_receipt(5).unwrap();
    let refused = producer.send("bounded", "overflow").unwrap();
    match producer.wait_receipt(refused) {
        Err(ClientError::Broker(error)) => {
            assert_eq!(error.code, 4429);
            assert!(!error.fatal);
            assert_eq!(error.seq, refused);
            let reason = String::from_utf8_lossy(&error.reason).into_owned();
            assert!(reason.contains("max_queued_messages"), "reason names the limit: {reason}");
        }
        other => panic!("expected ERROR 4429 for the sixth SEND, got {other:?}"),
    }
    // The session goes on, and every receipted message is still there.
    let mut consumer = connect(&broker, Subprotocol::Reliable, Binding::Binary);
    consumer.subscribe(1, "bounded", DeliveryMode::Anycast, AckMode::Client, 10).unwrap();
    assert_eq!(receive(&mut consumer, 5), (0..5).map(|i| i.to_string()).collect::<Vec<_>>());
    assert!(consumer.next_message(Duration::from_millis(300)).unwrap().is_none());
}

#[test]
fn publisher_and_consumer_on_different_shards_exchange_10000_messages_in_order() {
    const SHARDS: u16 = 3;
    let broker = Broker::start(&["--shards", "3"]);
    // Open connections until two land on different shards (SO_REUSEPORT spreads them by hash).
    let mut by_shard: Vec<Option<Client>> = (0..SHARDS).map(|_| None).collect();
    for _ in 0..64 {
        let client = connect(&broker, Subprotocol::Reliable, Binding::Binary);
        let shard = broker.shard_of_connection(client.local_addr().unwrap().port());
        if by_shard[shard as usize].is_none() {
            by_shard[shard as usize] = Some(client);
        }
        if by_shard.iter().filter(|slot| slot.is_some()).count() >= 2 {
            break;
        }
    }
    let shards: Vec<u16> = (0..SHARDS).filter(|&shard| by_shard[shard as usize].is_some()).collect();
    assert!(shards.len() >= 2, "connections never landed on two shards");
    let (publisher_shard, consumer_shard) = (shards[0], shards[1]);
    let mut publisher = by_shard[publisher_shard as usize].take().unwrap();
    let mut consumer = by_shard[consumer_shard as usize].take().unwrap();
    // An address owned by the third shard: both the publish and the delivery cross a channel.
    let address = (0..)
        .map(|index| format!("cross-{index}"))
        .find(|name| {
            let owner = owner_of(name.as_bytes(), SHARDS as usize).0;
            owner != publisher_shard && owner != consumer_shard
        })
        .unwrap();
    let owner = owner_of(address.as_bytes(), SHARDS as usize).0;
    assert!(publisher_shard != consumer_shard && owner != publisher_shard && owner != consumer_shard);

    consumer.subscribe(1, &address, DeliveryMode::Anycast, AckMode::Client, 1000).unwrap();
    const TOTAL: u64 = 10_000;
    let sender_address = address.clone();
    let sender = std::thread::spawn(move || {
        let mut last = 0;
        for index in 0..TOTAL {
            last = publisher.send(&sender_address, index.to_string()).unwrap();
            if index % 1000 == 999 {
                publisher.wait_receipt(last).unwrap();
            }
        }
        publisher.wait_receipt(last).unwrap();
        last
    });
    for expected in 0..TOTAL {
        let message = consumer
            .next_message(Duration::from_secs(10))
            .unwrap()
            .unwrap_or_else(|| panic!("message {expected} of {TOTAL} never arrived"));
        assert_eq!(message.body, Bytes::from(expected.to_string()), "order across shards");
        if expected % 100 == 99 {
            consumer.ack(message.delivery_seq, true).unwrap();
        }
    }
    assert_eq!(sender.join().unwrap(), TOTAL);
    assert!(consumer.next_message(Duration::from_millis(200)).unwrap().is_none(), "no extra message");
}

#[test]
fn shutdown_closes_sessions_with_going_away() {
    let mut broker = Broker::start(&["--shards", "2"]);
    let mut client = connect(&broker, Subprotocol::Reliable, Binding::Binary);
    client.subscribe(1, "idle", DeliveryMode::Anycast, AckMode::Client, 1).unwrap();
    let status = broker.terminate();
    assert!(status.success(), "broker exits cleanly on SIGTERM: {status:?}");
    match client.next_message(WAIT) {
        Err(ClientError::Closed { code, .. }) => assert_eq!(code, 1001),
        other => panic!("expected close 1001, got {other:?}"),
    }
}

#[test]
fn auto_ack_subscriptions_flow_without_acknowledgements() {
    let broker = Broker::start(&["--shards", "2"]);
    let mut consumer = connect(&broker, Subprotocol::Light, Binding::Binary);
    // Credit 4 on auto-ack bounds what is handed to the connection but not yet written.
    consumer.subscribe(1, "auto", DeliveryMode::Anycast, AckMode::Auto, 4).unwrap();
    let mut producer = connect(&broker, Subprotocol::Light, Binding::Binary);
    for index in 0..2000 {
        producer.send("auto", index.to_string()).unwrap();
    }
    producer.wait_receipt(2000).unwrap();
    for expected in 0..2000 {
        let message = consumer.next_message(WAIT).unwrap().unwrap_or_else(|| panic!("message {expected} missing"));
        assert_eq!(message.body, Bytes::from(expected.to_string()));
    }
    assert!(consumer.next_message(Duration::from_millis(200)).unwrap().is_none());
}

#[test]
fn a_fast_publisher_is_slowed_down_instead_of_refused_while_a_consumer_drains() {
    // Queue bound 200: a publisher far ahead of its consumer gets held receipts (backpressure)
    // rather than ERROR 4429, because the address has a consumer. Past half the bound answers
    // are held, and at most 50 more SENDs are read before the broker stops reading.
    let broker = Broker::start(&["--shards", "1", "--max-queued-messages", "200", "--max-inflight-sends", "50"]);
    let mut consumer = connect(&broker, Subprotocol::Reliable, Binding::Binary);
    consumer.subscribe(1, "drain", DeliveryMode::Anycast, AckMode::Client, 10).unwrap();
    let mut producer = connect(&broker, Subprotocol::Reliable, Binding::Binary);
    const TOTAL: u64 = 5000;
    let sender = std::thread::spawn(move || {
        for index in 0..TOTAL {
            producer.send("drain", index.to_string()).unwrap();
            if index % 500 == 499 {
                producer.flush().unwrap();
            }
        }
        producer.wait_receipt(TOTAL).map_err(|error| error.to_string())
    });
    for expected in 0..TOTAL {
        let message = consumer.next_message(WAIT).unwrap().unwrap_or_else(|| panic!("message {expected} missing"));
        assert_eq!(message.body, Bytes::from(expected.to_string()));
        consumer.ack(message.delivery_seq, false).unwrap();
        if expected % 50 == 0 {
            consumer.flush().unwrap();
        }
    }
    assert_eq!(sender.join().unwrap(), Ok(()), "every SEND receipted, none refused");
}

#[test]
fn large_messages_arrive_whole_after_the_connections_went_idle() {
    // The broker shrinks an idle connection's read buffer to a few hundred bytes and gives its
    // write buffers back; a message far larger than both (and than the 64 KiB read batch) must
    // still be read, routed and written whole, at any size, in either direction.
    let broker = Broker::start(&["--shards", "1"]);
    let mut consumer = connect(&broker, Subprotocol::Reliable, Binding::Binary);
    consumer.subscribe(1, "after-idle", DeliveryMode::Anycast, AckMode::Client, 10).unwrap();
    let mut producer = connect(&broker, Subprotocol::Reliable, Binding::Binary);
    for (index, size) in [10usize, 3000, 300_000, 10, 70_000, 511, 513, 1_000_000 - 1024].into_iter().enumerate() {
        let body: Vec<u8> = (0..size).map(|at| (at * 31 + index) as u8).collect();
        let seq = producer.send("after-idle", body.clone()).unwrap();
        producer.wait_receipt(seq).unwrap();
        let message = consumer.next_message(WAIT).unwrap().unwrap_or_else(|| panic!("message of {size} bytes missing"));
        assert!(message.body == body, "message {index} of {size} bytes arrived changed ({} bytes)", message.body.len());
        consumer.ack(message.delivery_seq, false).unwrap();
        consumer.flush().unwrap();
        // Both connections go idle before the next message.
        std::thread::sleep(Duration::from_millis(20));
    }
}
