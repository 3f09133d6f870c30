//! Redelivery against the real broker: ack timeout, NACK with requeue or reject, dead-letter
//! addresses after max_deliveries (docs/PROTOCOL.md 7.5 and docs/RELIABILITY.md).

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::Broker;
use mbws::mbws::{AckMode, DeliveryMode, Frame, Message, Nack};
use mbws_client::Client;

const WAIT: Duration = Duration::from_secs(5);

fn publish(broker: &Broker, address: &str, bodies: &[&str]) {
    let mut producer = broker.client();
    let mut last = 0;
    for body in bodies {
        last = producer.send(address, body.to_string()).unwrap();
    }
    producer.wait_receipt(last).unwrap();
}

fn next(client: &mut Client) -> Message {
    client.next_message(WAIT).unwrap().expect("a message")
}

fn header<'a>(message: &'a Message, name: &str) -> Option<&'a Bytes> {
    message.properties.headers.iter().find(|(key, _)| key.as_ref() == name.as_bytes()).map(|(_, value)| value)
}

#[test]
fn an_unacknowledged_delivery_is_redelivered_to_another_consumer_after_the_ack_timeout() {
    let broker = Broker::start(&["--shards", "2", "--ack-timeout-ms", "300"]);
    publish(&broker, "slow-work", &["job"]);
    let mut sleepy = broker.client();
    sleepy.subscribe(1, "slow-work", DeliveryMode::Anycast, AckMode::Client, 1).unwrap();
    let first = next(&mut sleepy);
    assert!(!first.redelivered);
    // The sleepy consumer takes no more work, so the redelivery must go to the helper.
    sleepy.write_frame(&Frame::Flow(mbws::mbws::Flow { subscription_id: 1, credit: 0 })).unwrap();
    sleepy.flush().unwrap();
    let started = Instant::now();
    let mut helper = broker.client();
    helper.subscribe(1, "slow-work", DeliveryMode::Anycast, AckMode::Client, 1).unwrap();
    let again = next(&mut helper);
    let waited = started.elapsed();
    assert_eq!(again.body, Bytes::from_static(b"job"));
    assert!(again.redelivered, "marked redelivered");
    assert_eq!(again.message_id, first.message_id, "the same message");
    assert!(waited >= Duration::from_millis(200), "not before the timeout ({waited:?})");
    // The late ACK of the first consumer changes nothing; the helper's ACK settles it.
    sleepy.ack(first.delivery_seq, false).unwrap();
    helper.ack(again.delivery_seq, false).unwrap();
    helper.flush().unwrap();
    sleepy.flush().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(sleepy.next_message(Duration::from_millis(200)).unwrap().is_none());
    assert!(helper.next_message(Duration::from_millis(200)).unwrap().is_none(), "settled: not redelivered again");
}

#[test]
fn nack_with_requeue_redelivers_and_nack_without_requeue_dead_letters() {
    let broker = Broker::start(&["--shards", "2"]);
    publish(&broker, "orders", &["first", "second"]);
    let mut consumer = broker.client();
    consumer.subscribe(1, "orders", DeliveryMode::Anycast, AckMode::Client, 1).unwrap();
    let first = next(&mut consumer);
    consumer.write_frame(&Frame::Nack(Nack { delivery_seq: first.delivery_seq, requeue: true })).unwrap();
    let again = next(&mut consumer);
    assert_eq!(again.body, Bytes::from_static(b"first"), "requeued at the front, before \"second\"");
    assert!(again.redelivered);
    consumer.write_frame(&Frame::Nack(Nack { delivery_seq: again.delivery_seq, requeue: false })).unwrap();
    let second = next(&mut consumer);
    assert_eq!(second.body, Bytes::from_static(b"second"));
    consumer.ack(second.delivery_seq, false).unwrap();

    let mut dead = broker.client();
    dead.subscribe(1, "DLQ.orders", DeliveryMode::Anycast, AckMode::Client, 10).unwrap();
    let letter = next(&mut dead);
    assert_eq!(letter.body, Bytes::from_static(b"first"));
    assert_eq!(letter.address, Bytes::from_static(b"DLQ.orders"));
    assert_eq!(header(&letter, "x-original-address"), Some(&Bytes::from_static(b"orders")));
    let reason = String::from_utf8_lossy(header(&letter, "x-dead-letter-reason").unwrap()).into_owned();
    assert!(reason.contains("NACK"), "{reason}");
    assert!(dead.next_message(Duration::from_millis(200)).unwrap().is_none());
}

#[test]
fn a_message_delivered_max_deliveries_times_moves_to_the_dead_letter_address() {
    let broker = Broker::start(&["--shards", "1", "--max-deliveries", "3"]);
    publish(&broker, "poison", &["bad"]);
    let mut consumer = broker.client();
    consumer.subscribe(1, "poison", DeliveryMode::Anycast, AckMode::Client, 1).unwrap();
    for attempt in 1..=3 {
        let message = next(&mut consumer);
        assert_eq!(message.redelivered, attempt > 1);
        consumer.write_frame(&Frame::Nack(Nack { delivery_seq: message.delivery_seq, requeue: true })).unwrap();
    }
    assert!(consumer.next_message(Duration::from_millis(300)).unwrap().is_none(), "not a fourth time");
    let mut dead = broker.client();
    dead.subscribe(1, "DLQ.poison", DeliveryMode::Anycast, AckMode::Client, 10).unwrap();
    let letter = next(&mut dead);
    assert_eq!(letter.body, Bytes::from_static(b"bad"));
    let reason = String::from_utf8_lossy(header(&letter, "x-dead-letter-reason").unwrap()).into_owned();
    assert!(reason.contains("3 times") && reason.contains("max_deliveries"), "{reason}");
}
