//! Unit tests of the address table, through its commands (and `UnackedMessages` directly).

use std::sync::Arc;

use super::subscribers::UnackedMessages;
use super::*;
use crate::broker::{AckedMessages, ConnId, Delivered, Deliveries, StoredMessage};
use crate::mbws::{AckMode, ErrorCode, Properties};

const LIMITS: AddressLimits = AddressLimits {
    max_queued_messages: 3,
    max_credit: 100,
    max_deliveries: 0,
    ack_timeout_ms: 0,
    shard_count: 1,
    max_queued_bytes: 1 << 20,
    memory_budget_bytes: 1 << 30,
    max_frame_bytes: 1 << 20,
    max_addresses: 1000,
    max_addresses_total: 1000,
    max_unwritten_bytes: 1 << 20,
    max_light_lead: 2048,
};

fn conn(index: u32) -> ConnRef {
    ConnRef { shard: ShardId(0), conn: ConnId { index, generation: 0 } }
}

fn message(address: &str, body: &str) -> SharedMessage {
    let mut message = StoredMessage::from_fields(address.as_bytes(), &Properties::default(), body.as_bytes(), false);
    message.body_is_text = true;
    SharedMessage::new(message)
}

fn publish(table: &mut AddressTable, address: &str, body: &str, out: &mut Vec<Outgoing>) {
    table.handle(AddressCommand::Publish { publisher: conn(99), seq: 1, message: message(address, body) }, 0, out);
}

fn subscribe(table: &mut AddressTable, consumer: u32, mode: DeliveryMode, credit: u32, out: &mut Vec<Outgoing>) {
    table.handle(
        AddressCommand::Subscribe {
            consumer: conn(consumer),
            subscription: SubscriptionId(1),
            address: Bytes::from_static(b"a"),
            mode,
            ack_mode: AckMode::Client,
            credit,
        },
        0,
        out,
    );
}

/// (consumer index, delivery) of every delivery in `out`, in order.
fn delivered(out: &[Outgoing]) -> Vec<(u32, &Delivered)> {
    out.iter()
        .filter_map(|(_, command)| match command {
            ConnCommand::Deliver { consumer, deliveries, .. } => Some((consumer.index, deliveries)),
            _ => None,
        })
        .flat_map(|(consumer, deliveries)| deliveries.iter().map(move |delivery| (consumer, delivery)))
        .collect()
}

/// (consumer index, body) of every delivery in `out`.
fn deliveries(out: &[Outgoing]) -> Vec<(u32, String)> {
    delivered(out)
        .into_iter()
        .map(|(consumer, delivery)| (consumer, String::from_utf8_lossy(delivery.message.body()).into_owned()))
        .collect()
}

#[test]
fn messages_wait_for_a_consumer_then_respect_its_credit() {
    let mut table = AddressTable::new(ShardId(0), LIMITS);
    let mut out = Vec::new();
    publish(&mut table, "a", "m1", &mut out);
    publish(&mut table, "a", "m2", &mut out);
    assert_eq!(table.stats(b"a").queued, 2);
    out.clear();
    subscribe(&mut table, 1, DeliveryMode::Anycast, 1, &mut out);
    assert_eq!(deliveries(&out), vec![(1, "m1".to_string())]);
    out.clear();
    ack(&mut table, 1, &[1], &mut out);
    assert_eq!(deliveries(&out), vec![(1, "m2".to_string())]);
}

/// An auto-ack subscriber with a large credit whose unwritten bytes reach the bound gets no
/// more deliveries (anycast messages go to the other subscriber or wait in the queue, multicast
/// ones wait in its backlog) until its connection gives the bytes back with the credit.
#[test]
fn auto_ack_deliveries_stop_at_the_unwritten_bytes_bound_until_they_are_written() {
    let limits = AddressLimits { max_unwritten_bytes: 250, max_queued_messages: 100, ..LIMITS };
    let mut table = AddressTable::new(ShardId(0), limits);
    let mut out = Vec::new();
    for (consumer, address, mode) in
        [(1, "a", DeliveryMode::Anycast), (2, "a", DeliveryMode::Anycast), (3, "b", DeliveryMode::Multicast)]
    {
        let subscribe = AddressCommand::Subscribe {
            consumer: conn(consumer),
            subscription: SubscriptionId(1),
            address: Bytes::copy_from_slice(address.as_bytes()),
            mode,
            ack_mode: AckMode::Auto,
            credit: 100,
        };
        table.handle(subscribe, 0, &mut out);
    }
    out.clear();
    let body = "x".repeat(99); // 100 bytes with the address
    for _ in 0..8 {
        publish(&mut table, "a", &body, &mut out);
        publish(&mut table, "b", &body, &mut out);
    }
    let per_consumer = |out: &[Outgoing]| {
        let delivered = deliveries(out);
        [1, 2, 3].map(|consumer| delivered.iter().filter(|(to, _)| *to == consumer).count())
    };
    // Round robin on "a" until each consumer holds 300 unwritten bytes (the third delivery
    // takes it from 200 to past the bound); the rest waits: 2 in the queue, 5 in the backlog.
    assert_eq!(per_consumer(&out), [3, 3, 3]);
    assert_eq!(table.stats(b"a").queued, 2);
    out.clear();
    for consumer in [1, 3] {
        let written = AddressCommand::ReturnCredit {
            consumer: conn(consumer),
            subscription: SubscriptionId(1),
            count: 3,
            bytes: 300,
        };
        table.handle(written, 0, &mut out);
    }
    // Written: consumer 1 takes what waited in the queue (2 is still at its bound), and 3
    // three more from its backlog.
    assert_eq!(per_consumer(&out), [2, 0, 3]);
    assert_eq!(table.stats(b"a").queued, 0);
}

#[test]
fn anycast_round_robins_and_requeues_unacked_on_consumer_gone() {
    let mut table = AddressTable::new(ShardId(0), LIMITS);
    let mut out = Vec::new();
    subscribe(&mut table, 1, DeliveryMode::Anycast, 10, &mut out);
    subscribe(&mut table, 2, DeliveryMode::Anycast, 10, &mut out);
    out.clear();
    publish(&mut table, "a", "m1", &mut out);
    publish(&mut table, "a", "m2", &mut out);
    assert_eq!(deliveries(&out), vec![(1, "m1".into()), (2, "m2".into())]);
    out.clear();
    table.handle(AddressCommand::ConsumerGone { consumer: conn(1) }, 0, &mut out);
    // m1 goes to the remaining consumer, marked redelivered.
    let redelivered: Vec<_> =
        delivered(&out).into_iter().map(|(consumer, delivery)| (consumer, delivery.redelivered)).collect();
    assert_eq!(redelivered, vec![(2, true)]);
}

#[test]
fn full_queue_refuses_the_send_and_keeps_what_it_had() {
    let mut table = AddressTable::new(ShardId(0), LIMITS);
    let mut out = Vec::new();
    for index in 0..4 {
        publish(&mut table, "a", &format!("m{index}"), &mut out);
    }
    let refused: Vec<_> = out
        .iter()
        .filter_map(|(_, c)| match c {
            ConnCommand::PublishDone { outcome: Err(refusal), .. } => Some(refusal.code),
            _ => None,
        })
        .collect();
    assert_eq!(refused, vec![ErrorCode::Overloaded]);
    assert_eq!(table.stats(b"a").queued, 3);
}

#[test]
fn multicast_gives_every_subscriber_every_message_and_ends_slow_ones() {
    let mut table = AddressTable::new(ShardId(0), LIMITS);
    let mut out = Vec::new();
    subscribe(&mut table, 1, DeliveryMode::Multicast, 100, &mut out);
    subscribe(&mut table, 2, DeliveryMode::Multicast, 0, &mut out); // paused: never keeps up
    out.clear();
    for index in 0..4 {
        publish(&mut table, "a", &format!("m{index}"), &mut out);
    }
    let to_first: Vec<_> = deliveries(&out).into_iter().filter(|(c, _)| *c == 1).collect();
    assert_eq!(to_first.len(), 4);
    assert!(out
        .iter()
        .any(|(_, c)| matches!(c, ConnCommand::SubscriptionEnded { consumer, .. } if consumer.index == 2)));
    // Pure multicast address: nothing piles up in the anycast queue.
    assert_eq!(table.stats(b"a").queued, 0);
    assert_eq!(table.stats(b"a").multicast_subscribers, 1);
}

fn answered(out: &[Outgoing]) -> usize {
    publish_answers(out).iter().filter(|(_, outcome)| outcome.is_ok()).count()
}

/// The answers to publishes in `out`, one per SEND (accepted runs taken apart), in order: the
/// seq and the refusal's code if refused.
fn publish_answers(out: &[Outgoing]) -> Vec<(u64, Result<(), ErrorCode>)> {
    let mut answers = Vec::new();
    for (_, command) in out {
        match command {
            ConnCommand::PublishDone { seq, outcome, .. } => {
                answers.push((*seq, outcome.as_ref().map(|_| ()).map_err(|refusal| refusal.code)))
            }
            ConnCommand::PublishesAccepted { first_seq: 0, count, .. } => {
                answers.extend((0..*count).map(|_| (0, Ok(()))))
            }
            ConnCommand::PublishesAccepted { first_seq, count, .. } => {
                answers.extend((*first_seq..*first_seq + u64::from(*count)).map(|seq| (seq, Ok(()))))
            }
            _ => {}
        }
    }
    answers
}

#[test]
fn publishers_are_held_back_while_consumers_drain_a_long_queue() {
    let limits = AddressLimits { max_queued_messages: 8, ..LIMITS };
    let mut table = AddressTable::new(ShardId(0), limits);
    let mut out = Vec::new();
    subscribe(&mut table, 1, DeliveryMode::Anycast, 1, &mut out);
    out.clear();
    // 1 delivered at once, then the queue grows; from 4 queued (half of 8) answers wait.
    for index in 0..7 {
        publish(&mut table, "a", &format!("m{index}"), &mut out);
    }
    assert_eq!(table.stats(b"a").queued, 6);
    assert_eq!(answered(&out), 4, "answers for the publishes past the high watermark are held");
    out.clear();
    // The consumer acknowledges until the queue is down to 2 (a quarter of 8).
    for id in 1..=4 {
        ack(&mut table, 1, &[id], &mut out);
    }
    assert_eq!(table.stats(b"a").queued, 2);
    assert_eq!(answered(&out), 3, "held answers go out at the low watermark");
}

fn refusal_reason(out: &[Outgoing]) -> Option<String> {
    out.iter().find_map(|(_, c)| match c {
        ConnCommand::PublishDone { outcome: Err(refusal), .. } => Some(refusal.reason.clone()),
        _ => None,
    })
}

/// A SEND or SUBSCRIBE that would create an address past the shard's share of
/// `--max-addresses` is refused with 4429 naming the limit; existing addresses keep working,
/// and room comes back when an address goes.
#[test]
fn new_addresses_are_bounded_per_shard() {
    let limits = AddressLimits { max_addresses: 2, max_addresses_total: 4, shard_count: 2, ..LIMITS };
    let mut table = AddressTable::new(ShardId(0), limits);
    let mut out = Vec::new();
    publish(&mut table, "a", "1", &mut out);
    publish(&mut table, "b", "1", &mut out);
    assert!(refusal_reason(&out).is_none());
    publish(&mut table, "c", "1", &mut out);
    let reason = refusal_reason(&out).expect("a third address is refused");
    assert!(reason.contains("\"c\" would be a new address") && reason.contains("max-addresses 4"), "{reason}");
    let code = out.iter().find_map(|(_, c)| match c {
        ConnCommand::PublishDone { outcome: Err(refusal), .. } => Some(refusal.code),
        _ => None,
    });
    assert_eq!(code, Some(ErrorCode::Overloaded));
    out.clear();
    publish(&mut table, "a", "2", &mut out);
    assert!(refusal_reason(&out).is_none(), "an existing address takes more");
    let refused = table.subscribe(
        conn(1),
        SubscriptionId(1),
        Bytes::from_static(b"d"),
        DeliveryMode::Multicast,
        AckMode::Auto,
        1,
    );
    assert_eq!(refused.map_err(|refusal| refusal.code), Err(ErrorCode::Overloaded));
    assert_eq!(table.addresses.len(), 2, "memory stays bounded: no state for refused addresses");
}

#[test]
fn queued_bytes_are_bounded_per_address_and_per_shard() {
    let limits = AddressLimits { max_queued_bytes: 10, memory_budget_bytes: 16, ..LIMITS };
    let mut table = AddressTable::new(ShardId(0), limits);
    let mut out = Vec::new();
    publish(&mut table, "a", "12345678", &mut out);
    publish(&mut table, "a", "123", &mut out);
    let reason = refusal_reason(&out).expect("the second body passes max_queued_bytes");
    assert!(reason.contains("max_queued_bytes"), "{reason}");
    out.clear();
    publish(&mut table, "b", "123456789", &mut out);
    let reason = refusal_reason(&out).expect("8 + 9 bytes pass the shard's budget of 16");
    assert!(reason.contains("memory budget"), "{reason}");
    assert_eq!(table.queued_bytes(), 8);
    // Consuming frees the budget.
    out.clear();
    subscribe(&mut table, 1, DeliveryMode::Anycast, 10, &mut out);
    assert_eq!(table.queued_bytes(), 0);
    out.clear();
    publish(&mut table, "b", "123456789", &mut out);
    assert!(refusal_reason(&out).is_none());
}

#[test]
fn without_consumers_nothing_is_held_and_the_bound_refuses() {
    let mut table = AddressTable::new(ShardId(0), LIMITS);
    let mut out = Vec::new();
    for index in 0..3 {
        publish(&mut table, "a", &format!("m{index}"), &mut out);
    }
    assert_eq!(answered(&out), 3);
}

/// The compaction ticks a message queued at 0 ms waits through before it is compacted: the
/// tick that finds it newly queued, then the one after.
fn wait_two_compaction_ticks(table: &mut AddressTable) {
    for tick in 1..=2 {
        assert_eq!(table.compaction_deadline(), Some(tick * compaction::COMPACTION_TICK_MS));
        table.compact_waiting(tick * compaction::COMPACTION_TICK_MS);
    }
}

#[test]
fn only_messages_that_wait_are_compacted() {
    let mut table = AddressTable::new(ShardId(0), LIMITS);
    let mut out = Vec::new();
    subscribe(&mut table, 1, DeliveryMode::Anycast, 1, &mut out);
    out.clear();
    let first = message("a", "delivered at once");
    let second = message("a", "has to wait");
    let (first_body, second_body) = (first.body().as_ptr(), second.body().as_ptr());
    table.handle(AddressCommand::Publish { publisher: conn(9), seq: 1, message: first }, 0, &mut out);
    table.handle(AddressCommand::Publish { publisher: conn(9), seq: 2, message: second }, 0, &mut out);
    let bodies: Vec<_> = delivered(&out).into_iter().map(|(_, delivery)| delivery.message.body().as_ptr()).collect();
    assert_eq!(bodies, vec![first_body], "the first goes out zero-copy");
    wait_two_compaction_ticks(&mut table);
    assert_eq!(table.compaction_deadline(), None, "nothing is left to compact: the timer rests");
    out.clear();
    ack(&mut table, 1, &[1], &mut out);
    let waited = deliveries(&out);
    assert_eq!(waited, vec![(1, "has to wait".to_string())]);
    let pointer = delivered(&out)[0].1.message.body().as_ptr();
    assert_ne!(pointer, second_body, "the waiting one no longer pins the publisher's buffer");
}

/// A message that waits in an anycast queue holds the buffer it arrived in until it has waited
/// through a whole compaction tick, and no longer than two: one queued just before a tick is
/// compacted at the tick after, and one delivered before that is never copied.
#[test]
fn a_queued_message_is_compacted_once_it_has_waited_a_whole_tick() {
    use compaction::COMPACTION_TICK_MS as TICK;
    let mut table = AddressTable::new(ShardId(0), AddressLimits { max_queued_messages: 100, ..LIMITS });
    let mut out = Vec::new();
    let original = |table: &AddressTable, index: usize, body: *const u8| {
        table.addresses[&Bytes::from_static(b"a")].queue[index].message.body().as_ptr() == body
    };
    let early = message("a", "queued at 0 ms");
    let early_body = early.body().as_ptr();
    table.handle(AddressCommand::Publish { publisher: conn(9), seq: 1, message: early }, 0, &mut out);
    assert_eq!(table.compaction_deadline(), Some(TICK), "the first waiting message schedules a tick");
    assert_eq!(table.take_compaction_scheduled(), Some(TICK), "and the core is told, to wake its timer");
    let late = message("a", "queued just before the tick");
    let late_body = late.body().as_ptr();
    table.handle(AddressCommand::Publish { publisher: conn(9), seq: 2, message: late }, TICK - 1, &mut out);
    assert_eq!(table.take_compaction_scheduled(), None, "the tick was already scheduled");
    table.compact_waiting(TICK - 1);
    assert!(original(&table, 0, early_body), "a tick not yet due compacts nothing");
    table.compact_waiting(TICK);
    assert!(original(&table, 0, early_body) && original(&table, 1, late_body), "both just started waiting");
    assert_eq!(table.compaction_deadline(), Some(2 * TICK));
    // A third message arrives, and a consumer takes the first one before the next tick.
    let third = message("a", "delivered before its tick");
    let third_body = third.body().as_ptr();
    table.handle(AddressCommand::Publish { publisher: conn(9), seq: 3, message: third }, TICK + 1, &mut out);
    out.clear();
    subscribe(&mut table, 1, DeliveryMode::Anycast, 1, &mut out);
    assert_eq!(delivered(&out)[0].1.message.body().as_ptr(), early_body, "delivered as it arrived");
    table.compact_waiting(2 * TICK);
    assert!(!original(&table, 0, late_body), "waited through a whole tick: compacted");
    assert!(original(&table, 1, third_body), "queued after the last tick: not yet");
    assert_eq!(table.compaction_deadline(), Some(3 * TICK));
    out.clear();
    ack(&mut table, 1, &[1], &mut out);
    ack(&mut table, 1, &[2], &mut out);
    assert_eq!(deliveries(&out).len(), 2);
    assert_eq!(delivered(&out)[1].1.message.body().as_ptr(), third_body, "delivered before its tick: never copied");
    table.compact_waiting(3 * TICK);
    assert_eq!(table.compaction_deadline(), None, "nothing waits: the timer rests");
}

/// SENDs to "a" decoded from one read buffer, as a connection's would be, `gap` bytes apart
/// (0: next to each other, as consecutive frames of one read).
fn sends_from_one_buffer(count: usize, gap: usize) -> Vec<SharedMessage> {
    let send = crate::mbws::Frame::Send(crate::mbws::Send {
        seq: 1,
        address: Bytes::from_static(b"a"),
        body: Bytes::from_static(b"body"),
        ..Default::default()
    });
    let payload = crate::mbws::encode(crate::mbws::Binding::Binary, &send);
    let mut buffer = bytes::BytesMut::new();
    for _ in 0..count {
        buffer.extend_from_slice(&payload);
        buffer.extend_from_slice(&vec![0; gap]);
    }
    let buffer = buffer.freeze();
    (0..count)
        .map(|index| {
            let start = index * (payload.len() + gap);
            let decoded =
                crate::mbws::binary::decode_send(buffer.slice(start..start + payload.len()), &Default::default())
                    .expect("a valid SEND");
            SharedMessage::new(StoredMessage::new(decoded.tail, false, 0, false))
        })
        .collect()
}

/// How many of `messages` are queued in "a" still where they arrived.
fn left_in_place(table: &AddressTable, messages: &[SharedMessage]) -> usize {
    let queue = &table.addresses[&Bytes::from_static(b"a")].queue;
    queue.iter().filter(|queued| messages.iter().any(|message| SharedMessage::ptr_eq(&queued.message, message))).count()
}

/// However long the ticks, the uncompacted messages of an address hold a bounded number of
/// read buffers: messages far apart each start a run, and past `MAX_UNCOMPACTED_RUNS` a
/// message is compacted as it arrives; messages next to each other (one read's SENDs) are one
/// run, however many.
#[test]
fn uncompacted_messages_hold_a_bounded_number_of_buffers() {
    use compaction::MAX_UNCOMPACTED_RUNS;
    let limits = AddressLimits { max_queued_messages: 1 << 20, ..LIMITS };
    let publish_all = |messages: &[SharedMessage]| {
        let mut table = AddressTable::new(ShardId(0), limits);
        let mut out = Vec::new();
        for (index, message) in messages.iter().enumerate() {
            let publish =
                AddressCommand::Publish { publisher: conn(9), seq: index as u64 + 1, message: message.clone() };
            table.handle(publish, 0, &mut out);
        }
        table
    };
    let apart = sends_from_one_buffer(MAX_UNCOMPACTED_RUNS + 2, 100);
    let table = publish_all(&apart);
    assert_eq!(left_in_place(&table, &apart), MAX_UNCOMPACTED_RUNS, "the runs past the bound were compacted at once");
    let queue = &table.addresses[&Bytes::from_static(b"a")].queue;
    assert!(!SharedMessage::ptr_eq(&queue[MAX_UNCOMPACTED_RUNS].message, &apart[MAX_UNCOMPACTED_RUNS]));
    let together = sends_from_one_buffer(4 * MAX_UNCOMPACTED_RUNS, 0);
    let table = publish_all(&together);
    assert_eq!(left_in_place(&table, &together), together.len(), "one read's SENDs are one run");
}

/// Publishes of `bodies` to "a" by one publisher, numbered 1, 2, 3...
fn batch_of(bodies: &[&str]) -> Vec<Publication> {
    bodies
        .iter()
        .enumerate()
        .map(|(index, body)| Publication { publisher: conn(99), seq: index as u64 + 1, message: message("a", body) })
        .collect()
}

fn publish_batch(table: &mut AddressTable, bodies: &[&str], now_ms: u64, out: &mut Vec<Outgoing>) {
    let mut batch = batch_of(bodies);
    table.publish_batch(&mut batch, now_ms, out);
    assert!(batch.is_empty(), "the batch is consumed");
}

#[test]
fn an_anycast_batch_is_bounded_like_single_publishes_and_answered_after_its_dispatch() {
    // Credit 2 and room for 3 queued: of 6 publishes, 2 go out at once, 3 wait, 1 is refused.
    let mut table = AddressTable::new(ShardId(0), LIMITS);
    let mut out = Vec::new();
    subscribe(&mut table, 1, DeliveryMode::Anycast, 2, &mut out);
    out.clear();
    let mut batch = batch_of(&["m1", "m2", "m3", "m4", "m5", "m6"]);
    let originals: Vec<*const u8> = batch.iter().map(|publication| publication.message.body().as_ptr()).collect();
    table.publish_batch(&mut batch, 0, &mut out);
    assert_eq!(deliveries(&out), vec![(1, "m1".to_string()), (1, "m2".to_string())]);
    let sent: Vec<*const u8> = delivered(&out).iter().map(|(_, delivery)| delivery.message.body().as_ptr()).collect();
    assert_eq!(sent, originals[..2], "messages delivered at once are not compacted");
    assert_eq!(table.stats(b"a").queued, 3);
    wait_two_compaction_ticks(&mut table);
    // The answers are decided after the batch's dispatch: the queue is above half of
    // max_queued_messages, so the accepted ones are held back; the refused one is not.
    let answers = |out: &[Outgoing]| -> Vec<(u64, bool)> {
        publish_answers(out).into_iter().map(|(seq, outcome)| (seq, outcome.is_ok())).collect()
    };
    assert_eq!(answers(&out), vec![(6, false)]);
    assert!(refusal_reason(&out).unwrap().contains("max_queued_messages"));
    out.clear();
    ack(&mut table, 1, &[1, 2], &mut out);
    assert_eq!(deliveries(&out), vec![(1, "m3".to_string()), (1, "m4".to_string())]);
    let waited = delivered(&out)[0].1.message.body().as_ptr();
    assert!(!originals.contains(&waited), "messages that waited were compacted");
    out.clear();
    ack(&mut table, 1, &[3, 4], &mut out);
    assert_eq!(deliveries(&out), vec![(1, "m5".to_string())]);
    assert_eq!(answers(&out), vec![(1, true), (2, true), (3, true), (4, true), (5, true)], "released in order");
}

#[test]
fn an_address_does_not_keep_the_buffer_its_first_message_arrived_in() {
    let mut table = AddressTable::new(ShardId(0), LIMITS);
    let mut out = Vec::new();
    // The message is a slice of one large "read buffer", as a decoded SEND is.
    let send = crate::mbws::Frame::Send(crate::mbws::Send {
        seq: 1,
        address: Bytes::from_static(b"a"),
        body: Bytes::from(vec![b'b'; 64 * 1024]),
        ..Default::default()
    });
    let read_buffer = crate::mbws::encode(crate::mbws::Binding::Binary, &send).freeze();
    let decoded = crate::mbws::binary::decode_send(read_buffer.clone(), &Default::default()).expect("a valid SEND");
    // In a slab, as a session puts a binary SEND's message, next to one that stays alive.
    let neighbour = SharedMessage::in_slab(StoredMessage::from_fields(b"b", &Properties::default(), b"n", false));
    let message = SharedMessage::in_slab(StoredMessage::new(decoded.tail, false, 0, false));
    table.handle(AddressCommand::Publish { publisher: conn(9), seq: 1, message }, 0, &mut out);
    assert_eq!(table.stats(b"a").queued, 1);
    wait_two_compaction_ticks(&mut table);
    assert!(read_buffer.is_unique(), "the compacted message let go of its read buffer");
    let waiting = &mut table.addresses.get_mut(&Bytes::from_static(b"a")).expect("the address exists").queue[0];
    assert!(
        SharedMessage::get_mut_own_slot(&mut waiting.message).is_some(),
        "and of its slab, which its neighbour keeps"
    );
    assert_eq!(neighbour.body(), b"n");
    let buffer = read_buffer.as_ptr_range();
    let key = table.addresses.keys().next().expect("the address exists").as_ptr();
    assert!(!buffer.contains(&key), "the address's key is a copy of its name");
    let queued = table.addresses[&Bytes::from_static(b"a")].queue[0].message.clone();
    assert!(!buffer.contains(&queued.body().as_ptr()), "the waiting message was compacted");
    assert!(!buffer.contains(&queued.address().as_ptr()));
}

/// A batch's answers go in the order of its SENDs, one command per run of one publisher's
/// consecutive SENDs; unnumbered SENDs that find the at-most-once lead queued are held as a
/// run and, with them, every answer after them, then released one per delivery, in order.
#[test]
fn a_batch_answers_each_publishers_runs_in_order_and_holds_what_follows_a_held_one() {
    let limits = AddressLimits { max_queued_messages: 100, max_light_lead: 2, ..LIMITS };
    let mut table = AddressTable::new(ShardId(0), limits);
    let mut out = Vec::new();
    subscribe(&mut table, 1, DeliveryMode::Anycast, 1, &mut out);
    out.clear();
    let publication = |publisher: u32, seq: u64, body: &str| Publication {
        publisher: conn(publisher),
        seq,
        message: message("a", body),
    };
    // Numbered SENDs are held only at the high watermark (50): every answer goes at once.
    let mut batch = vec![publication(7, 1, "p7-1"), publication(7, 2, "p7-2"), publication(8, 1, "p8-1")];
    table.publish_batch(&mut batch, 0, &mut out);
    let accepted: Vec<(u32, u64, u32)> = out
        .iter()
        .filter_map(|(_, command)| match command {
            ConnCommand::PublishesAccepted { publisher, first_seq, count } => {
                Some((publisher.index, *first_seq, *count))
            }
            _ => None,
        })
        .collect();
    assert_eq!(accepted, vec![(7, 1, 2), (8, 1, 1)], "one answer per run of a publisher, in order");
    out.clear();
    // 2 queued, the lead: the unnumbered SENDs are held, and so is the numbered one after them.
    let mut batch = vec![publication(9, 0, "light1"), publication(9, 0, "light2"), publication(7, 3, "p7-3")];
    table.publish_batch(&mut batch, 0, &mut out);
    assert_eq!(table.stats(b"a").queued, 5);
    assert_eq!(answered(&out), 0, "held from the first unnumbered SEND on");
    let mut released = Vec::new();
    for id in 1..=5 {
        out.clear();
        ack(&mut table, 1, &[id], &mut out);
        released.extend(publish_answers(&out));
    }
    assert_eq!(released, [(0, Ok(())), (0, Ok(())), (3, Ok(()))], "released in the order they were held");
}

/// A held at-most-once publisher's answers go as runs: a batch of unnumbered SENDs held at
/// the lead is let go by an ACK of several deliveries as one answer for all the SENDs that
/// release lets go (not one answer per SEND), one per message that leaves the queue, until
/// every held one has gone, once.
#[test]
fn held_unnumbered_answers_go_as_one_answer_per_release() {
    let limits = AddressLimits { max_queued_messages: 1000, max_light_lead: 8, ..LIMITS };
    let mut table = AddressTable::new(ShardId(0), limits);
    let mut out = Vec::new();
    subscribe(&mut table, 1, DeliveryMode::Anycast, 4, &mut out);
    out.clear();
    let mut batch: Vec<Publication> = (0..40)
        .map(|index| Publication { publisher: conn(9), seq: 0, message: message("a", &format!("light{index}")) })
        .collect();
    // The first batch is all answered (nothing queued when it came); the second is held whole.
    table.publish_batch(&mut batch.drain(..10).collect(), 0, &mut out);
    assert_eq!(answered(&out), 10);
    out.clear();
    table.publish_batch(&mut batch, 0, &mut out);
    assert_eq!(table.stats(b"a").queued, 36, "4 of the 40 delivered, on credit 4");
    assert_eq!(answered(&out), 0, "30 unnumbered SENDs with the lead queued, all held");
    // Ids 1-4 acknowledged as a run: 4 more delivered, 32 queued, 2 of them answered. Answers
    // go while the queue less the held ones is below the lead (8): 6 of them, as one command.
    ack_run(&mut table, 1, 1, 4, &mut out);
    let accepted = |out: &[Outgoing]| -> Vec<(u64, u32)> {
        out.iter()
            .filter_map(|(_, command)| match command {
                ConnCommand::PublishesAccepted { first_seq, count, .. } => Some((*first_seq, *count)),
                _ => None,
            })
            .collect()
    };
    assert_eq!(accepted(&out), [(0, 6)], "the answers a release lets go are one command");
    // From then on one answer per message that leaves: 4 per ACK of 4, in one command each.
    for first in (5..=25).step_by(4) {
        out.clear();
        ack_run(&mut table, 1, first, 4, &mut out);
        assert_eq!(accepted(&out), [(0, 4)], "after the ACK of ids {first}..{}", first + 3);
    }
    assert_eq!(table.stats(b"a").queued, 8);
    out.clear();
    ack_run(&mut table, 1, 29, 4, &mut out);
    assert_eq!(accepted(&out), [], "all 30 went, none twice");
}

/// An at-most-once publisher (unnumbered MBLWS SENDs, seq 0) is held back once the queue
/// reaches `max_light_lead`, far below the high watermark that holds numbered SENDs, and its
/// held answers then go one per delivery, oldest first, while the queue without their messages
/// is below the lead: the publisher is read at its consumers' pace, not in bursts.
#[test]
fn unnumbered_sends_are_held_at_the_at_most_once_lead() {
    let limits = AddressLimits { max_queued_messages: 100, max_light_lead: 4, ..LIMITS };
    let mut table = AddressTable::new(ShardId(0), limits);
    let mut out = Vec::new();
    // Numbered SENDs are not held below the high watermark (50), however long the lead.
    subscribe(&mut table, 1, DeliveryMode::Anycast, 1, &mut out);
    out.clear();
    for index in 0..7 {
        publish(&mut table, "a", &format!("numbered{index}"), &mut out);
    }
    assert_eq!(table.stats(b"a").queued, 6);
    assert_eq!(answered(&out), 7, "numbered SENDs are answered at once below the high watermark");
    out.clear();
    // With 6 queued (over the lead of 4), an unnumbered SEND waits, and so does every answer after it.
    for index in 0..3 {
        let message = message("a", &format!("light{index}"));
        table.handle(AddressCommand::Publish { publisher: conn(98), seq: 0, message }, 0, &mut out);
    }
    publish(&mut table, "a", "numbered7", &mut out);
    assert_eq!(table.stats(b"a").queued, 10, "held SENDs are queued; only their answers wait");
    assert_eq!(answered(&out), 0, "answers after an unnumbered SEND past the lead are held, in order");
    // The consumer acknowledges: while the 6 answered messages are at or over the lead, nothing
    // goes; then one answer per delivery, oldest first.
    for id in 1..=2 {
        ack(&mut table, 1, &[id], &mut out);
        assert_eq!(answered(&out), 0, "held while {} are queued", table.stats(b"a").queued);
    }
    for (id, answers) in (3..=6).zip(1..) {
        ack(&mut table, 1, &[id], &mut out);
        assert_eq!(table.stats(b"a").queued, 10 - id as usize);
        assert_eq!(answered(&out), answers, "one held answer per delivery below the lead");
    }
    assert_eq!(
        publish_answers(&out),
        [(0, Ok(())), (0, Ok(())), (0, Ok(())), (1, Ok(()))],
        "in the order they were held"
    );
    // Nothing held now. The unnumbered SEND that finds the lead queued is held, and the next
    // delivery lets it go; one below the lead is answered at once.
    out.clear();
    table.handle(AddressCommand::Publish { publisher: conn(98), seq: 0, message: message("a", "light3") }, 0, &mut out);
    assert_eq!(table.stats(b"a").queued, 5);
    assert_eq!(answered(&out), 0, "held with the lead queued");
    ack(&mut table, 1, &[7], &mut out);
    assert_eq!(table.stats(b"a").queued, 4);
    assert_eq!(answered(&out), 1, "released by the delivery that brings the rest below the lead");
    out.clear();
    ack(&mut table, 1, &[8], &mut out);
    ack(&mut table, 1, &[9], &mut out);
    table.handle(AddressCommand::Publish { publisher: conn(98), seq: 0, message: message("a", "light4") }, 0, &mut out);
    assert_eq!(table.stats(b"a").queued, 3);
    assert_eq!(answered(&out), 1, "answered at once below the lead");
    // Without anycast subscribers nothing is held: the bound refuses instead.
    let mut table = AddressTable::new(ShardId(0), limits);
    out.clear();
    for index in 0..6 {
        let message = message("b", &format!("light{index}"));
        table.handle(AddressCommand::Publish { publisher: conn(98), seq: 0, message }, 0, &mut out);
    }
    assert_eq!(answered(&out), 6);
}

/// A cumulative ACK sends the owner the acknowledged ids oldest first: those that are the
/// front of the subscriber's unacknowledged list go at once, the others (and unknown ids) as
/// single ACKs did.
#[test]
fn an_ack_of_many_ids_takes_the_known_ones_in_any_order() {
    let limits = AddressLimits { max_queued_messages: 100, ..LIMITS };
    let mut table = AddressTable::new(ShardId(0), limits);
    let mut out = Vec::new();
    subscribe(&mut table, 1, DeliveryMode::Anycast, 6, &mut out);
    for index in 0..10 {
        publish(&mut table, "a", &format!("m{index}"), &mut out);
    }
    assert_eq!(delivered(&out).len(), 6);
    out.clear();
    // Front run 1, 2; then 5 (not the front), 42 (unknown), 1 again (already taken).
    ack(&mut table, 1, &[1, 2, 5, 42, 1], &mut out);
    assert_eq!(delivered(&out).len(), 3, "three acknowledged, three more delivered");
    assert_eq!(table.stats(b"a").queued, 1);
    out.clear();
    ack(&mut table, 1, &[3, 4, 6, 7, 8, 9], &mut out);
    assert_eq!(delivered(&out).len(), 1, "the last queued message");
    assert_eq!(table.stats(b"a").queued, 0);
}

fn ack(table: &mut AddressTable, consumer: u32, ids: &[u64], out: &mut Vec<Outgoing>) {
    let messages = ids.iter().map(|&id| MessageId(id)).collect();
    table.handle(AddressCommand::Ack { consumer: conn(consumer), subscription: SubscriptionId(1), messages }, 0, out);
}

fn ack_run(table: &mut AddressTable, consumer: u32, first: u64, count: u32, out: &mut Vec<Outgoing>) {
    let messages = AckedMessages::Run { first: MessageId(first), count };
    table.handle(AddressCommand::Ack { consumer: conn(consumer), subscription: SubscriptionId(1), messages }, 0, out);
}

/// An ACK naming its ids as a run (first id, count) acknowledges what the list of those ids
/// would: each delivery once, its credit given back (what waits is delivered), ids already
/// acknowledged or never delivered to this subscriber skipped.
#[test]
fn an_ack_of_a_run_of_ids_acknowledges_each_delivered_one_once() {
    let mut table = AddressTable::new(ShardId(0), AddressLimits { max_queued_messages: 10, ..LIMITS });
    let mut out = Vec::new();
    subscribe(&mut table, 1, DeliveryMode::Anycast, 3, &mut out);
    for body in ["m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "m9"] {
        publish(&mut table, "a", body, &mut out);
    }
    assert_eq!(deliveries(&out).len(), 3, "credit 3");
    out.clear();
    ack_run(&mut table, 1, 1, 2, &mut out);
    assert_eq!(deliveries(&out), [(1, "m4".to_string()), (1, "m5".to_string())], "two acknowledged, two more");
    out.clear();
    // Ids 1 and 2 are acknowledged already, 3 to 5 are in flight: three credits come back.
    ack_run(&mut table, 1, 1, 5, &mut out);
    let expected: Vec<(u32, String)> = ["m6", "m7", "m8"].iter().map(|body| (1, body.to_string())).collect();
    assert_eq!(deliveries(&out), expected);
    out.clear();
    // 7 in the middle of the ring, then 8 at its front and 9 past its end.
    ack_run(&mut table, 1, 7, 1, &mut out);
    assert_eq!(deliveries(&out), [(1, "m9".to_string())]);
    out.clear();
    ack_run(&mut table, 1, 6, 5, &mut out);
    assert!(out.is_empty() && table.stats(b"a").queued == 0);
    // Everything is acknowledged: three new messages go out at once.
    for body in ["n1", "n2", "n3", "n4"] {
        publish(&mut table, "a", body, &mut out);
    }
    assert_eq!(deliveries(&out).len(), 3, "all of the credit is back");
}

/// Consumer index and number of deliveries of each `Deliver` command in `out`, in order.
fn deliver_commands(out: &[Outgoing]) -> Vec<(u32, usize)> {
    out.iter()
        .filter_map(|(_, command)| match command {
            ConnCommand::Deliver { consumer, deliveries, .. } => Some((consumer.index, deliveries.len())),
            _ => None,
        })
        .collect()
}

#[test]
fn a_batch_reaches_each_multicast_subscriber_in_one_command_in_order() {
    let limits = AddressLimits { max_queued_messages: 10, ..LIMITS };
    let mut table = AddressTable::new(ShardId(0), limits);
    let mut out = Vec::new();
    subscribe(&mut table, 1, DeliveryMode::Multicast, 100, &mut out);
    subscribe(&mut table, 2, DeliveryMode::Multicast, 2, &mut out);
    out.clear();
    publish_batch(&mut table, &["m0", "m1", "m2", "m3", "m4"], 0, &mut out);
    assert_eq!(deliver_commands(&out), vec![(1, 5), (2, 2)], "one command per subscriber, credit respected");
    let to = |consumer: u32, out: &[Outgoing]| -> Vec<String> {
        deliveries(out).into_iter().filter(|(c, _)| *c == consumer).map(|(_, body)| body).collect()
    };
    assert_eq!(to(1, &out), ["m0", "m1", "m2", "m3", "m4"]);
    assert_eq!(to(2, &out), ["m0", "m1"]);
    // Every SEND is answered, in order, after the deliveries it caused.
    let answers: Vec<u64> =
        publish_answers(&out).into_iter().filter(|(_, outcome)| outcome.is_ok()).map(|(seq, _)| seq).collect();
    assert_eq!(answers, [1, 2, 3, 4, 5]);
    // One command answers the whole run of accepted SENDs.
    assert!(matches!(out.last(), Some((_, ConnCommand::PublishesAccepted { first_seq: 1, count: 5, .. }))));
    // The rest waits in the slow subscriber's backlog and follows, in order, as it acknowledges.
    out.clear();
    ack(&mut table, 2, &[1, 2], &mut out);
    assert_eq!(deliveries(&out), [(2, "m2".to_string()), (2, "m3".to_string())]);
    assert_eq!(deliver_commands(&out), vec![(2, 2)]);
    out.clear();
    ack(&mut table, 2, &[3, 4], &mut out);
    assert_eq!(deliveries(&out), [(2, "m4".to_string())]);
}

/// A batch fanned out to several subscribers is one list, each subscriber's command a share of
/// it; each delivery of it is still recorded as a single one would be: a NACK with requeue
/// gives it back to its subscriber alone, marked redelivered, and once it has been delivered
/// `max_deliveries` times it goes to the dead-letter address instead.
#[test]
fn a_batch_is_one_shared_list_and_its_deliveries_are_redelivered_and_dead_lettered() {
    let limits = AddressLimits { max_deliveries: 2, max_queued_messages: 10, ..LIMITS };
    let mut table = AddressTable::new(ShardId(0), limits);
    let mut out = Vec::new();
    subscribe(&mut table, 1, DeliveryMode::Multicast, 10, &mut out);
    subscribe(&mut table, 2, DeliveryMode::Multicast, 2, &mut out);
    out.clear();
    publish_batch(&mut table, &["m0", "m1", "m2"], 0, &mut out);
    let shares: Vec<(&Arc<[Delivered]>, usize)> = out
        .iter()
        .filter_map(|(_, command)| match command {
            ConnCommand::Deliver { deliveries: Deliveries::Shared { batch, len }, .. } => Some((batch, *len)),
            _ => None,
        })
        .collect();
    assert_eq!(shares.iter().map(|(_, len)| *len).collect::<Vec<_>>(), [3, 2], "each subscriber's share");
    assert!(Arc::ptr_eq(shares[0].0, shares[1].0), "one list for the batch");
    let nack = |table: &mut AddressTable, out: &mut Vec<Outgoing>| {
        let nack = AddressCommand::Nack {
            consumer: conn(1),
            subscription: SubscriptionId(1),
            message: MessageId(2), // m1
            requeue: true,
        };
        table.handle(nack, 0, out);
    };
    out.clear();
    nack(&mut table, &mut out);
    let again: Vec<(u32, String, bool)> = delivered(&out)
        .into_iter()
        .map(|(consumer, d)| (consumer, String::from_utf8_lossy(d.message.body()).into_owned(), d.redelivered))
        .collect();
    assert_eq!(again, [(1, "m1".to_string(), true)]);
    assert!(table.take_forwards().is_empty());
    // Its second delivery was the last one max_deliveries allows.
    out.clear();
    nack(&mut table, &mut out);
    assert!(deliveries(&out).is_empty());
    let forwards = table.take_forwards();
    assert!(
        matches!(&forwards[..], [(_, AddressCommand::Publish { message, .. })] if message.address() == b"DLQ.a"),
        "{forwards:?}"
    );
    // Subscriber 2's deliveries are its own: acknowledged, they let the rest of the batch through.
    out.clear();
    ack(&mut table, 2, &[1, 2], &mut out);
    assert_eq!(deliveries(&out), [(2, "m2".to_string())]);
}

#[test]
fn an_ack_delivers_only_to_the_subscriber_that_sent_it() {
    let mut table = AddressTable::new(ShardId(0), LIMITS);
    let mut out = Vec::new();
    subscribe(&mut table, 1, DeliveryMode::Multicast, 1, &mut out);
    subscribe(&mut table, 2, DeliveryMode::Multicast, 1, &mut out);
    publish(&mut table, "a", "m1", &mut out);
    publish(&mut table, "a", "m2", &mut out);
    out.clear();
    // Subscriber 2 also has credit back only if it acknowledged; subscriber 1 acknowledges.
    ack(&mut table, 1, &[1], &mut out);
    assert_eq!(deliveries(&out), [(1, "m2".to_string())], "subscriber 2 is not touched");
    out.clear();
    ack(&mut table, 2, &[1], &mut out);
    assert_eq!(deliveries(&out), [(2, "m2".to_string())]);
}

#[test]
fn a_batch_ends_a_slow_multicast_subscriber_and_not_the_others() {
    let mut table = AddressTable::new(ShardId(0), LIMITS);
    let mut out = Vec::new();
    subscribe(&mut table, 1, DeliveryMode::Multicast, 100, &mut out);
    subscribe(&mut table, 2, DeliveryMode::Multicast, 0, &mut out); // paused: never keeps up
    out.clear();
    publish_batch(&mut table, &["m0", "m1", "m2", "m3"], 0, &mut out);
    assert_eq!(deliver_commands(&out), vec![(1, 4)]);
    let ended: Vec<u32> = out
        .iter()
        .filter_map(|(_, c)| match c {
            ConnCommand::SubscriptionEnded { consumer, refusal, .. } => {
                assert!(refusal.reason.contains("max_queued_messages"), "{}", refusal.reason);
                Some(consumer.index)
            }
            _ => None,
        })
        .collect();
    assert_eq!(ended, [2]);
    assert_eq!(table.stats(b"a").multicast_subscribers, 1);
    // Its subscription is gone: a late ACK changes nothing.
    out.clear();
    ack(&mut table, 2, &[1], &mut out);
    assert!(out.is_empty());
}

/// A batch that ends its address's last multicast subscriber as slow queues the rest of the
/// batch for anycast consumers, as single publishes would: the address's routing is read again
/// when a subscriber ends (it is read once per batch otherwise).
#[test]
fn a_batch_that_ends_the_last_multicast_subscriber_queues_the_rest_for_anycast_consumers() {
    let mut table = AddressTable::new(ShardId(0), LIMITS);
    let mut out = Vec::new();
    // Something queued first, so that the batch is not taken as pure multicast.
    publish(&mut table, "a", "early", &mut out);
    subscribe(&mut table, 2, DeliveryMode::Multicast, 0, &mut out); // paused: never keeps up
    out.clear();
    // m0-m2 fill its backlog (max_queued_messages 3), m3 ends it, m4 finds no multicast
    // subscriber left: it goes to the anycast queue.
    publish_batch(&mut table, &["m0", "m1", "m2", "m3", "m4"], 0, &mut out);
    assert_eq!(table.stats(b"a").multicast_subscribers, 0);
    out.clear();
    subscribe(&mut table, 1, DeliveryMode::Anycast, 10, &mut out);
    let delivered = deliveries(&out);
    assert_eq!(delivered.first(), Some(&(1, "early".to_string())));
    assert_eq!(delivered.last(), Some(&(1, "m4".to_string())), "m4 waited in the anycast queue: {delivered:?}");
    // m3, the message that ended it, reached no multicast subscriber: it waited too.
    assert_eq!(
        delivered,
        [(1, "early".to_string()), (1, "m3".to_string()), (1, "m4".to_string())],
        "m0-m2 went to the ended subscriber's backlog only, m3 and m4 to the queue"
    );
}

/// A batch to a pure multicast address that ends its only subscriber as slow queues the
/// message that ended it and the rest of the batch, as single publishes do.
#[test]
fn a_multicast_batch_that_ends_the_only_subscriber_queues_the_rest() {
    let mut table = AddressTable::new(ShardId(0), LIMITS);
    let mut out = Vec::new();
    subscribe(&mut table, 2, DeliveryMode::Multicast, 0, &mut out); // paused: never keeps up
    publish(&mut table, "a", "m0", &mut out);
    publish(&mut table, "a", "m1", &mut out);
    // m2 fills its backlog (max_queued_messages 3), m3 ends it: m3 and m4 wait in the queue.
    publish_batch(&mut table, &["m2", "m3", "m4"], 0, &mut out);
    assert_eq!(table.stats(b"a").multicast_subscribers, 0);
    out.clear();
    subscribe(&mut table, 1, DeliveryMode::Anycast, 10, &mut out);
    assert_eq!(deliveries(&out), [(1, "m3".to_string()), (1, "m4".to_string())]);
}

/// A single publish that ends its address's last multicast subscriber as slow is routed as the
/// address stands without it: to the anycast queue, where it waits for a consumer, instead of
/// reaching no one.
#[test]
fn the_message_that_ends_the_last_multicast_subscriber_waits_for_anycast_consumers() {
    let mut table = AddressTable::new(ShardId(0), LIMITS);
    let mut out = Vec::new();
    subscribe(&mut table, 2, DeliveryMode::Multicast, 0, &mut out); // paused: never keeps up
    for body in ["m0", "m1", "m2", "m3"] {
        publish(&mut table, "a", body, &mut out);
    }
    assert_eq!(table.stats(b"a").multicast_subscribers, 0, "m3 ended the subscriber (max_queued_messages 3)");
    assert_eq!(table.stats(b"a").queued, 1);
    out.clear();
    subscribe(&mut table, 1, DeliveryMode::Anycast, 10, &mut out);
    assert_eq!(deliveries(&out), [(1, "m3".to_string())]);
}

#[test]
fn a_batch_for_an_address_with_anycast_subscribers_is_queued_as_single_publishes() {
    let limits = AddressLimits { max_queued_messages: 10, ..LIMITS };
    let mut table = AddressTable::new(ShardId(0), limits);
    let mut out = Vec::new();
    subscribe(&mut table, 1, DeliveryMode::Anycast, 1, &mut out);
    out.clear();
    publish_batch(&mut table, &["m0", "m1", "m2"], 0, &mut out);
    assert_eq!(deliveries(&out), [(1, "m0".to_string())]);
    assert_eq!(table.stats(b"a").queued, 2);
    assert_eq!(answered(&out), 3);
}

#[test]
fn an_expired_message_in_a_batch_is_answered_but_not_delivered() {
    let mut table = AddressTable::new(ShardId(0), LIMITS);
    let mut out = Vec::new();
    subscribe(&mut table, 1, DeliveryMode::Multicast, 10, &mut out);
    out.clear();
    let mut expiring = message("a", "old");
    SharedMessage::get_mut(&mut expiring).unwrap().expires_at_ms = 5;
    let mut batch = vec![
        Publication { publisher: conn(9), seq: 1, message: expiring },
        Publication { publisher: conn(9), seq: 2, message: message("a", "fresh") },
    ];
    table.publish_batch(&mut batch, 10, &mut out);
    assert_eq!(deliveries(&out), [(1, "fresh".to_string())]);
    assert_eq!(answered(&out), 2);
}

#[test]
fn acks_find_their_subscriber_after_others_leave() {
    let mut table = AddressTable::new(ShardId(0), LIMITS);
    let mut out = Vec::new();
    for consumer in 1..=4 {
        subscribe(&mut table, consumer, DeliveryMode::Multicast, 1, &mut out);
    }
    subscribe(&mut table, 5, DeliveryMode::Anycast, 1, &mut out);
    subscribe(&mut table, 6, DeliveryMode::Anycast, 1, &mut out);
    subscribe(&mut table, 7, DeliveryMode::Anycast, 1, &mut out);
    publish(&mut table, "a", "m1", &mut out);
    publish(&mut table, "a", "m2", &mut out);
    // The first of each kind leaves: the others' positions change.
    let unsubscribe = |table: &mut AddressTable, consumer: u32, out: &mut Vec<Outgoing>| {
        table.handle(AddressCommand::Unsubscribe { consumer: conn(consumer), subscription: SubscriptionId(1) }, 0, out)
    };
    unsubscribe(&mut table, 1, &mut out);
    unsubscribe(&mut table, 5, &mut out);
    out.clear();
    for consumer in [4, 2, 3] {
        ack(&mut table, consumer, &[1], &mut out);
        assert_eq!(deliveries(&out), [(consumer, "m2".to_string())], "consumer {consumer}");
        out.clear();
    }
    // Anycast: m1 went to 5 and m2 to 6; 5 left, so m1 went again, to 7. Their ACKs find them.
    let stats = table.stats(b"a");
    assert_eq!((stats.multicast_subscribers, stats.anycast_subscribers, stats.unacked), (3, 2, 2));
    ack(&mut table, 6, &[2], &mut out);
    ack(&mut table, 7, &[1], &mut out);
    assert_eq!(table.stats(b"a").unacked, 0);
    table.handle(AddressCommand::ConsumerGone { consumer: conn(3) }, 0, &mut out);
    ack(&mut table, 2, &[2], &mut out);
    ack(&mut table, 4, &[2], &mut out);
    assert_eq!(table.stats(b"a").multicast_subscribers, 2);
}

#[test]
fn ending_several_slow_subscribers_keeps_the_others_reachable() {
    let mut table = AddressTable::new(ShardId(0), LIMITS);
    let mut out = Vec::new();
    for (consumer, credit) in [(1, 0), (2, 10), (3, 0), (4, 10), (5, 0)] {
        subscribe(&mut table, consumer, DeliveryMode::Multicast, credit, &mut out);
    }
    out.clear();
    publish_batch(&mut table, &["m0", "m1", "m2", "m3"], 0, &mut out);
    let ended: Vec<u32> = out
        .iter()
        .filter_map(|(_, c)| match c {
            ConnCommand::SubscriptionEnded { consumer, .. } => Some(consumer.index),
            _ => None,
        })
        .collect();
    assert_eq!(ended, [5, 3, 1]);
    for consumer in [2, 4] {
        out.clear();
        table.handle(
            AddressCommand::SetCredit { consumer: conn(consumer), subscription: SubscriptionId(1), credit: 20 },
            0,
            &mut out,
        );
        ack(&mut table, consumer, &[1, 2, 3, 4], &mut out);
        assert!(out.is_empty(), "nothing was waiting for consumer {consumer}");
    }
    out.clear();
    publish_batch(&mut table, &["m4"], 0, &mut out);
    let mut reached = deliveries(&out);
    reached.sort();
    assert_eq!(reached, [(2, "m4".to_string()), (4, "m4".to_string())]);
}

#[test]
fn unacked_messages_stay_sorted_when_redeliveries_arrive_late() {
    let queued = |id: u64| Queued { id: MessageId(id), message: message("a", "m"), redelivered: false, deliveries: 1 };
    let mut unacked = UnackedMessages::default();
    for id in [3, 5, 1, 4] {
        unacked.insert(queued(id));
    }
    assert!(unacked.contains(MessageId(4)) && !unacked.contains(MessageId(2)));
    assert_eq!(unacked.remove(MessageId(4)).map(|q| q.id), Some(MessageId(4)));
    assert_eq!(unacked.remove(MessageId(4)).map(|q| q.id), None, "an id is removed once");
    assert_eq!(unacked.remove(MessageId(1)).map(|q| q.id), Some(MessageId(1)));
    assert_eq!(unacked.len(), 2);
    let left: Vec<u64> = unacked.into_oldest_first().map(|q| q.id.0).collect();
    assert_eq!(left, [3, 5]);
}

#[test]
fn expired_messages_are_dropped_not_delivered() {
    let mut table = AddressTable::new(ShardId(0), LIMITS);
    let mut out = Vec::new();
    let mut expiring = message("a", "old");
    SharedMessage::get_mut(&mut expiring).unwrap().expires_at_ms = 5;
    table.handle(AddressCommand::Publish { publisher: conn(9), seq: 0, message: expiring }, 0, &mut out);
    publish(&mut table, "a", "fresh", &mut out);
    out.clear();
    table.handle(
        AddressCommand::Subscribe {
            consumer: conn(1),
            subscription: SubscriptionId(1),
            address: Bytes::from_static(b"a"),
            mode: DeliveryMode::Anycast,
            ack_mode: AckMode::Client,
            credit: 10,
        },
        10,
        &mut out,
    );
    assert_eq!(deliveries(&out), vec![(1, "fresh".to_string())]);
}

// ---- durable delivery and message ids (issue 8 item 14) ----

/// A table with a file-less durable log on which every address is durable.
fn durable_table() -> (AddressTable, Rc<RefCell<DurableLog>>) {
    let config = crate::store::LogConfig::new(std::env::temp_dir().join("mbws-address-tests-never-written"));
    let log = Rc::new(RefCell::new(DurableLog::new(config, ShardId(0)).unwrap()));
    let mut table = AddressTable::new(ShardId(0), AddressLimits { max_queued_messages: 100, ..LIMITS });
    table.set_durable_log(log.clone(), vec![Bytes::from_static(b"dur.*")]);
    (table, log)
}

/// Plays the commit shell: every pending batch is "synced", then the table is told.
fn commit(table: &mut AddressTable, log: &Rc<RefCell<DurableLog>>, out: &mut Vec<Outgoing>) {
    let mut durable = None;
    loop {
        let Some(batch) = log.borrow_mut().take_batch() else { break };
        durable = Some(log.borrow_mut().batch_committed(batch).durable_lsn);
    }
    if let Some(lsn) = durable {
        table.durable_committed(lsn, 0, out);
    }
}

fn subscribe_to(table: &mut AddressTable, address: &'static str, mode: DeliveryMode, out: &mut Vec<Outgoing>) {
    table.handle(
        AddressCommand::Subscribe {
            consumer: conn(1),
            subscription: SubscriptionId(1),
            address: Bytes::from_static(address.as_bytes()),
            mode,
            ack_mode: AckMode::Client,
            credit: 10,
        },
        0,
        out,
    );
}

fn ids_delivered(out: &[Outgoing]) -> Vec<u64> {
    delivered(out).iter().map(|(_, delivery)| delivery.message_id.0).collect()
}

#[test]
fn a_durable_message_is_delivered_and_answered_only_once_its_record_is_durable() {
    let (mut table, log) = durable_table();
    let mut out = Vec::new();
    subscribe_to(&mut table, "dur.x", DeliveryMode::Anycast, &mut out);
    out.clear();
    publish(&mut table, "dur.x", "A", &mut out);
    publish(&mut table, "dur.x", "B", &mut out);
    assert!(deliveries(&out).is_empty(), "nothing is delivered before the sync: {out:?}");
    assert_eq!(answered(&out), 0, "nor answered");
    commit(&mut table, &log, &mut out);
    assert_eq!(deliveries(&out), [(1, "A".to_string()), (1, "B".to_string())]);
    assert_eq!(answered(&out), 2);
}

#[test]
fn an_in_memory_message_queued_behind_an_unsynced_durable_one_waits_for_it() {
    let (mut table, log) = durable_table();
    let mut out = Vec::new();
    commit_reservation(&mut table, &log, &mut out);
    subscribe_to(&mut table, "mixed", DeliveryMode::Anycast, &mut out);
    out.clear();
    let mut durable = message("mixed", "durable");
    SharedMessage::get_mut(&mut durable).unwrap().durable = true;
    table.handle(AddressCommand::Publish { publisher: conn(99), seq: 1, message: durable }, 0, &mut out);
    publish(&mut table, "mixed", "in memory", &mut out);
    assert!(deliveries(&out).is_empty(), "order is kept: the in-memory one waits behind: {out:?}");
    commit(&mut table, &log, &mut out);
    assert_eq!(deliveries(&out), [(1, "durable".to_string()), (1, "in memory".to_string())]);
}

/// Publishes one in-memory message and commits, so that ids are durably reserved.
fn commit_reservation(table: &mut AddressTable, log: &Rc<RefCell<DurableLog>>, out: &mut Vec<Outgoing>) {
    publish(table, "warm-up", "x", out);
    commit(table, log, out);
}

#[test]
fn in_memory_messages_wait_only_for_the_first_reservation_of_their_ids() {
    let (mut table, log) = durable_table();
    let mut out = Vec::new();
    subscribe_to(&mut table, "plain", DeliveryMode::Multicast, &mut out);
    out.clear();
    publish(&mut table, "plain", "first", &mut out);
    assert!(deliveries(&out).is_empty(), "no id is shown before a durable reservation covers it");
    assert_eq!(answered(&out), 1, "an in-memory publish is answered at once");
    commit(&mut table, &log, &mut out);
    assert_eq!(deliveries(&out), [(1, "first".to_string())]);
    out.clear();
    // From now on, for half a block, in-memory messages go out at once, batched or not.
    publish(&mut table, "plain", "second", &mut out);
    publish_batch_to(&mut table, "plain", &["third", "fourth"], &mut out);
    assert_eq!(deliveries(&out), [(1, "second".to_string()), (1, "third".to_string()), (1, "fourth".to_string())]);
    assert!(!log.borrow().has_pending(), "no record per in-memory message");
}

fn publish_batch_to(table: &mut AddressTable, address: &str, bodies: &[&str], out: &mut Vec<Outgoing>) {
    let mut batch: Vec<Publication> = bodies
        .iter()
        .map(|body| Publication { publisher: conn(99), seq: 1, message: message(address, body) })
        .collect();
    table.publish_batch(&mut batch, 0, out);
}

#[test]
fn ids_are_reserved_a_block_ahead_and_continue_above_the_reservation_after_a_restart() {
    let (mut table, log) = durable_table();
    let mut out = Vec::new();
    subscribe_to(&mut table, "plain", DeliveryMode::Multicast, &mut out);
    publish(&mut table, "plain", "m", &mut out);
    commit(&mut table, &log, &mut out);
    assert_eq!(log.borrow().message_id_high_water(), 1 + ID_RESERVATION_BLOCK);
    // Half a block later the next reservation is appended, before its ids are needed.
    let renewing_id = 1 + ID_RESERVATION_BLOCK / 2 + 1;
    table.last_message_id = renewing_id - 1;
    out.clear();
    publish(&mut table, "plain", "renews", &mut out);
    assert_eq!(ids_delivered(&out), [renewing_id]);
    assert_eq!(deliveries(&out), [(1, "renews".to_string())], "still inside the durable reservation");
    assert!(log.borrow().has_pending(), "the next reservation is on its way");
    assert_eq!(log.borrow().message_id_high_water(), renewing_id + ID_RESERVATION_BLOCK);
    // A restart (a new table on the same log) continues above everything reserved.
    let mut restarted = AddressTable::new(ShardId(0), LIMITS);
    restarted.set_durable_log(log.clone(), Vec::new());
    subscribe_to(&mut restarted, "plain", DeliveryMode::Multicast, &mut out);
    out.clear();
    publish(&mut restarted, "plain", "after", &mut out);
    commit(&mut restarted, &log, &mut out);
    assert_eq!(ids_delivered(&out), [renewing_id + ID_RESERVATION_BLOCK + 1]);
}

#[test]
fn a_failed_log_drops_what_waits_for_it_and_refuses_ids_it_cannot_reserve() {
    let (mut table, log) = durable_table();
    let mut out = Vec::new();
    subscribe_to(&mut table, "dur.x", DeliveryMode::Anycast, &mut out);
    publish(&mut table, "dur.x", "lost", &mut out);
    let batch = log.borrow_mut().take_batch().unwrap();
    drop(batch);
    log.borrow_mut().set_failure("disk on fire".to_string());
    out.clear();
    table.durable_failed("disk on fire", &mut out);
    assert_eq!(table.stats(b"dur.x").queued, 0, "the unsynced message no longer blocks the queue");
    assert_eq!(table.queued_bytes(), 0);
    assert!(refusal_reason(&out).is_some_and(|reason| reason.contains("disk on fire")));
    out.clear();
    publish(&mut table, "plain", "in memory", &mut out);
    let reason = refusal_reason(&out).expect("no id can be reserved");
    assert!(reason.contains("restarts"), "{reason}");
}

/// The outcomes (`Ok` or the refusal's code) of the publishes answered in `out`.
fn publish_outcomes(out: &[Outgoing]) -> Vec<Result<(), u16>> {
    publish_answers(out).into_iter().map(|(_, outcome)| outcome.map_err(ErrorCode::as_u16)).collect()
}

fn declared(max_queued_messages: u32, routing: Routing) -> AddressSettings {
    AddressSettings { routing, durable: false, max_queued_messages, max_queued_bytes: 1 << 20, max_deliveries: 0 }
}

#[test]
fn a_declared_address_has_its_own_bound_and_stays_while_idle() {
    let mut table = AddressTable::new(ShardId(0), LIMITS);
    assert!(table.declare_address(b"a", declared(5, Routing::Anycast)), "new");
    assert!(!table.declare_address(b"a", declared(5, Routing::Anycast)), "changed");
    assert_eq!(table.address_info(b"a").map(|info| info.queued_messages), Some(0), "kept while idle");
    let mut out = Vec::new();
    for index in 0..6 {
        publish(&mut table, "a", &format!("m{index}"), &mut out);
    }
    // 5, not the table's 3: the sixth is refused.
    assert_eq!(publish_outcomes(&out), [Ok(()), Ok(()), Ok(()), Ok(()), Ok(()), Err(4429)]);
    out.clear();
    for index in 0..4 {
        publish(&mut table, "b", &format!("m{index}"), &mut out);
    }
    assert_eq!(publish_outcomes(&out).last(), Some(&Err(4429)), "an undeclared address keeps the table's bound");
}

#[test]
fn a_multicast_address_queues_nothing_without_an_anycast_subscriber() {
    let mut table = AddressTable::new(ShardId(0), LIMITS);
    table.declare_address(b"a", declared(3, Routing::Multicast));
    let mut out = Vec::new();
    publish(&mut table, "a", "dropped", &mut out);
    assert_eq!((publish_outcomes(&out), table.stats(b"a").queued), (vec![Ok(())], 0));
    subscribe(&mut table, 1, DeliveryMode::Anycast, 0, &mut out);
    publish(&mut table, "a", "queued for the anycast subscriber", &mut out);
    assert_eq!(table.stats(b"a").queued, 1);
    let info = table.address_info(b"a").unwrap();
    assert_eq!((info.messages_in, info.messages_out), (2, 0), "both were accepted (the first reached nobody)");
}

#[test]
fn deleting_needs_force_with_subscribers_and_ends_them_with_4405() {
    let mut table = AddressTable::new(ShardId(0), LIMITS);
    let mut out = Vec::new();
    publish(&mut table, "a", "m1", &mut out);
    publish(&mut table, "a", "m2", &mut out);
    subscribe(&mut table, 1, DeliveryMode::Anycast, 1, &mut out);
    assert_eq!(deliveries(&out).len(), 1);
    assert_eq!(table.delete_address(b"a", false, &mut out), Deleted::HasConsumers(1));
    out.clear();
    assert_eq!(table.delete_address(b"a", true, &mut out), Deleted::Deleted { messages: 1, consumers_ended: 1 });
    let ended: Vec<u16> = out
        .iter()
        .filter_map(|(_, command)| match command {
            ConnCommand::SubscriptionEnded { refusal, .. } => Some(refusal.code.as_u16()),
            _ => None,
        })
        .collect();
    assert_eq!(ended, [4405]);
    assert_eq!(table.address_info(b"a"), None);
    assert_eq!(table.queued_bytes(), 0);
    assert_eq!(table.delete_address(b"a", true, &mut out), Deleted::NotFound);
    // An ACK for a dropped delivery changes nothing, and the consumer's departure is harmless.
    table.handle(AddressCommand::ConsumerGone { consumer: conn(1) }, 0, &mut out);
}

// ---- the shared multicast log (issue 14 item 2, session 12) ----

/// Subscribes consumer `consumer` to "a" in multicast, client ack, with `credit`.
fn subscribe_multicast(table: &mut AddressTable, consumer: u32, credit: u32, out: &mut Vec<Outgoing>) {
    subscribe(table, consumer, DeliveryMode::Multicast, credit, out);
}

/// Messages in address "a"'s multicast log, and in its subscribers' backlogs all together.
fn multicast_log(table: &AddressTable) -> (usize, usize) {
    let log = table.addresses.get(&b"a"[..]).map_or(0, |state| state.multicast_log.len());
    let backlogs = table.address_info(b"a").map_or(0, |info| info.multicast_backlog);
    (log, backlogs)
}

fn bodies_to(consumer: u32, out: &[Outgoing]) -> Vec<String> {
    deliveries(out).into_iter().filter(|(c, _)| *c == consumer).map(|(_, body)| body).collect()
}

/// Subscribers at different places in the log each get every message once, in order; the log
/// holds a message once whatever the number of subscribers that wait for it, and drops it
/// once the slowest has passed it.
#[test]
fn the_multicast_log_holds_each_message_once_until_the_slowest_subscriber_passes_it() {
    let mut table = AddressTable::new(ShardId(0), LIMITS);
    let mut out = Vec::new();
    subscribe_multicast(&mut table, 1, 10, &mut out);
    subscribe_multicast(&mut table, 2, 1, &mut out);
    subscribe_multicast(&mut table, 3, 2, &mut out);
    out.clear();
    publish(&mut table, "a", "m0", &mut out);
    assert_eq!(multicast_log(&table), (0, 0), "everyone took m0: nothing waits");
    publish(&mut table, "a", "m1", &mut out);
    assert_eq!(multicast_log(&table), (1, 1), "m1 waits for subscriber 2 only");
    publish(&mut table, "a", "m2", &mut out);
    assert_eq!(multicast_log(&table), (2, 3), "m1 and m2 wait once, for 2 and 3 together");
    assert_eq!(bodies_to(1, &out), ["m0", "m1", "m2"]);
    assert_eq!(bodies_to(2, &out), ["m0"]);
    assert_eq!(bodies_to(3, &out), ["m0", "m1"]);
    out.clear();
    ack(&mut table, 2, &[1], &mut out);
    assert_eq!(bodies_to(2, &out), ["m1"]);
    assert_eq!(multicast_log(&table), (1, 2), "m1 is dropped: every cursor passed it");
    ack(&mut table, 3, &[1], &mut out);
    assert_eq!(bodies_to(3, &out), ["m2"]);
    assert_eq!(multicast_log(&table), (1, 1));
    ack(&mut table, 2, &[2], &mut out);
    assert_eq!(bodies_to(2, &out), ["m1", "m2"]);
    assert_eq!(multicast_log(&table), (0, 0));
}

/// A slow subscriber ended at the bound takes its place in the log with it: the others go on,
/// and the log is never longer than the bound.
#[test]
fn a_slow_subscriber_ends_and_the_log_follows_the_others() {
    let mut table = AddressTable::new(ShardId(0), LIMITS);
    let mut out = Vec::new();
    subscribe_multicast(&mut table, 1, 1, &mut out);
    subscribe_multicast(&mut table, 2, 0, &mut out); // paused: never keeps up
    out.clear();
    for body in ["m0", "m1", "m2", "m3"] {
        publish(&mut table, "a", body, &mut out);
        assert!(multicast_log(&table).0 <= 3, "the log stays within max_queued_messages");
    }
    assert_eq!(table.stats(b"a").multicast_subscribers, 1, "m3 ended subscriber 2");
    assert_eq!(bodies_to(1, &out), ["m0"]);
    assert_eq!(multicast_log(&table), (3, 3), "m1-m3 wait for subscriber 1 alone");
    out.clear();
    for id in 1..=4 {
        ack(&mut table, 1, &[id], &mut out);
    }
    assert_eq!(bodies_to(1, &out), ["m1", "m2", "m3"]);
    assert_eq!(multicast_log(&table), (0, 0));
}

/// A redelivery (NACK with requeue, ack timeout) goes to its subscriber alone, before what
/// waits for it in the log; the others are not touched.
#[test]
fn a_multicast_redelivery_goes_to_its_subscriber_alone_before_the_log() {
    let limits = AddressLimits { ack_timeout_ms: 1000, ..LIMITS };
    let mut table = AddressTable::new(ShardId(0), limits);
    let mut out = Vec::new();
    subscribe_multicast(&mut table, 1, 1, &mut out);
    subscribe_multicast(&mut table, 2, 1, &mut out);
    publish(&mut table, "a", "m0", &mut out);
    publish(&mut table, "a", "m1", &mut out);
    out.clear();
    let nack = AddressCommand::Nack {
        consumer: conn(1),
        subscription: SubscriptionId(1),
        message: MessageId(1),
        requeue: true,
    };
    table.handle(nack, 0, &mut out);
    let again: Vec<(u32, String, bool)> = delivered(&out)
        .into_iter()
        .map(|(consumer, d)| (consumer, String::from_utf8_lossy(d.message.body()).into_owned(), d.redelivered))
        .collect();
    assert_eq!(again, [(1, "m0".to_string(), true)], "m0 again, before m1, to subscriber 1 only");
    assert_eq!(multicast_log(&table), (1, 2), "m1 still waits once for both");
    // Subscriber 2's ack deadline passes: m0 comes back to it, before m1.
    out.clear();
    table.expire_acks(1000, &mut out);
    let to_two: Vec<(String, bool)> = delivered(&out)
        .into_iter()
        .filter(|(consumer, _)| *consumer == 2)
        .map(|(_, d)| (String::from_utf8_lossy(d.message.body()).into_owned(), d.redelivered))
        .collect();
    assert_eq!(to_two, [("m0".to_string(), true)]);
    out.clear();
    ack(&mut table, 2, &[1], &mut out);
    assert_eq!(bodies_to(2, &out), ["m1"]);
}

/// Deliveries whose ack deadline passes together come back in the order they were first
/// delivered, under both routings, and those delivered `max_deliveries` times leave for the
/// dead-letter address in that order too.
#[test]
fn deliveries_expired_together_are_redelivered_and_dead_lettered_oldest_first() {
    for mode in [DeliveryMode::Anycast, DeliveryMode::Multicast] {
        let limits = AddressLimits { ack_timeout_ms: 1000, max_deliveries: 2, max_queued_messages: 10, ..LIMITS };
        let mut table = AddressTable::new(ShardId(0), limits);
        let mut out = Vec::new();
        subscribe(&mut table, 1, mode, 10, &mut out);
        for body in ["m0", "m1", "m2"] {
            publish(&mut table, "a", body, &mut out);
        }
        assert_eq!(bodies_to(1, &out), ["m0", "m1", "m2"], "{mode:?}");
        out.clear();
        table.expire_acks(1000, &mut out);
        let again: Vec<(String, bool)> = delivered(&out)
            .into_iter()
            .map(|(_, d)| (String::from_utf8_lossy(d.message.body()).into_owned(), d.redelivered))
            .collect();
        let redelivered = |body: &str| (body.to_string(), true);
        assert_eq!(again, [redelivered("m0"), redelivered("m1"), redelivered("m2")], "{mode:?}");
        // The second delivery was the last max_deliveries allows: all three are dead-lettered.
        out.clear();
        table.expire_acks(2000, &mut out);
        assert!(deliveries(&out).is_empty(), "{mode:?}");
        let dead: Vec<String> = table
            .take_forwards()
            .into_iter()
            .map(|(_, command)| match command {
                AddressCommand::Publish { message, .. } => {
                    assert_eq!(message.address(), b"DLQ.a");
                    String::from_utf8_lossy(message.body()).into_owned()
                }
                other => panic!("not a publish to the dead-letter address: {other:?}"),
            })
            .collect();
        assert_eq!(dead, ["m0", "m1", "m2"], "{mode:?}");
    }
}

/// A subscriber that joins while the log holds messages gets only what is published after it
/// subscribed; the older subscriber still gets everything.
#[test]
fn a_late_multicast_subscriber_starts_at_the_end_of_the_log() {
    let mut table = AddressTable::new(ShardId(0), AddressLimits { max_queued_messages: 10, ..LIMITS });
    let mut out = Vec::new();
    subscribe_multicast(&mut table, 1, 0, &mut out);
    publish(&mut table, "a", "m0", &mut out);
    publish(&mut table, "a", "m1", &mut out);
    subscribe_multicast(&mut table, 2, 10, &mut out);
    publish_batch(&mut table, &["m2", "m3"], 0, &mut out);
    assert_eq!(bodies_to(2, &out), ["m2", "m3"]);
    assert_eq!(multicast_log(&table), (4, 4));
    out.clear();
    let credit = AddressCommand::SetCredit { consumer: conn(1), subscription: SubscriptionId(1), credit: 10 };
    table.handle(credit, 0, &mut out);
    assert_eq!(bodies_to(1, &out), ["m0", "m1", "m2", "m3"]);
    assert_eq!(multicast_log(&table), (0, 0));
}

/// The slowest subscriber leaving (unsubscribe, or its session ending) lets the log drop what
/// only it still needed; the last one leaving empties it, and the address goes.
#[test]
fn the_slowest_subscriber_leaving_trims_the_log() {
    let mut table = AddressTable::new(ShardId(0), AddressLimits { max_queued_messages: 10, ..LIMITS });
    let mut out = Vec::new();
    subscribe_multicast(&mut table, 1, 0, &mut out);
    subscribe_multicast(&mut table, 2, 1, &mut out);
    subscribe_multicast(&mut table, 3, 3, &mut out);
    for body in ["m0", "m1", "m2", "m3"] {
        publish(&mut table, "a", body, &mut out);
    }
    assert_eq!(multicast_log(&table), (4, 4 + 3 + 1));
    table.handle(AddressCommand::Unsubscribe { consumer: conn(1), subscription: SubscriptionId(1) }, 0, &mut out);
    assert_eq!(multicast_log(&table), (3, 3 + 1), "m0 went with the slowest");
    table.handle(AddressCommand::ConsumerGone { consumer: conn(2) }, 0, &mut out);
    assert_eq!(multicast_log(&table), (1, 1));
    out.clear();
    ack(&mut table, 3, &[1, 2, 3], &mut out);
    assert_eq!(bodies_to(3, &out), ["m3"]);
    table.handle(AddressCommand::Unsubscribe { consumer: conn(3), subscription: SubscriptionId(1) }, 0, &mut out);
    assert!(table.address_info(b"a").is_none(), "nothing is left: the address goes");
}

/// Messages whose ids wait for the durable log wait in the multicast log too, for every
/// subscriber; a failed log drops them from it.
#[test]
fn the_multicast_log_holds_back_what_waits_for_the_durable_log_and_a_failure_drops_it() {
    let (mut table, log) = durable_table();
    let mut out = Vec::new();
    subscribe_multicast(&mut table, 1, 10, &mut out);
    subscribe_multicast(&mut table, 2, 10, &mut out);
    out.clear();
    publish(&mut table, "a", "m0", &mut out);
    publish(&mut table, "a", "m1", &mut out);
    assert!(deliveries(&out).is_empty(), "no id is shown before its reservation is durable");
    assert_eq!(multicast_log(&table), (2, 4));
    commit(&mut table, &log, &mut out);
    assert_eq!(bodies_to(1, &out), ["m0", "m1"]);
    assert_eq!(bodies_to(2, &out), ["m0", "m1"]);
    assert_eq!(multicast_log(&table), (0, 0));
    // The next reservation is never made durable: what waits for it is dropped on failure.
    table.last_message_id = table.ids_durably_reserved;
    out.clear();
    publish(&mut table, "a", "lost", &mut out);
    assert!(deliveries(&out).is_empty());
    assert_eq!(multicast_log(&table), (1, 2));
    let batch = log.borrow_mut().take_batch().unwrap();
    drop(batch);
    log.borrow_mut().set_failure("disk on fire".to_string());
    table.durable_failed("disk on fire", &mut out);
    assert_eq!(multicast_log(&table), (0, 0));
    assert_eq!(table.stats(b"a").multicast_subscribers, 2, "the subscribers stay");
}

/// A client-ack subscriber catching up on the log (new credit, an ACK) takes its messages in
/// order as far as its credit goes, passes over expired ones without spending credit on them,
/// and keeps every one it takes until it is acknowledged: its ack deadline brings each back,
/// before the rest of the log, and an ACK after that releases the next.
#[test]
fn a_subscriber_catching_up_on_the_log_spends_its_credit_on_live_messages_and_keeps_them() {
    let limits = AddressLimits { ack_timeout_ms: 1000, max_queued_messages: 10, ..LIMITS };
    let mut table = AddressTable::new(ShardId(0), limits);
    let mut out = Vec::new();
    subscribe_multicast(&mut table, 1, 1, &mut out);
    publish(&mut table, "a", "m0", &mut out);
    let mut expiring = message("a", "old");
    SharedMessage::get_mut(&mut expiring).unwrap().expires_at_ms = 5;
    table.handle(AddressCommand::Publish { publisher: conn(9), seq: 0, message: expiring }, 0, &mut out);
    for body in ["m2", "m3", "m4"] {
        publish(&mut table, "a", body, &mut out);
    }
    assert_eq!(bodies_to(1, &out), ["m0"]);
    assert_eq!(multicast_log(&table), (4, 4), "old, m2, m3 and m4 wait");
    out.clear();
    let set_credit = |credit| AddressCommand::SetCredit { consumer: conn(1), subscription: SubscriptionId(1), credit };
    table.handle(set_credit(3), 10, &mut out);
    assert_eq!(bodies_to(1, &out), ["m2", "m3"], "old expired: passed over, no credit spent on it");
    assert_eq!(multicast_log(&table), (1, 1), "m4 waits");
    out.clear();
    table.expire_acks(10 + 1000, &mut out);
    let again: Vec<(String, bool)> = delivered(&out)
        .into_iter()
        .map(|(_, d)| (String::from_utf8_lossy(d.message.body()).into_owned(), d.redelivered))
        .collect();
    assert_eq!(again, [("m0".to_string(), true), ("m2".to_string(), true), ("m3".to_string(), true)]);
    out.clear();
    ack_run(&mut table, 1, 1, 1, &mut out);
    assert_eq!(bodies_to(1, &out), ["m4"], "m0 acknowledged: its credit takes m4");
    assert_eq!(multicast_log(&table), (0, 0));
}
