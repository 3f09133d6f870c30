//! Redelivery and dead-lettering: what becomes of a client-ack delivery that ends without
//! acknowledgement (its ack deadline passes, a NACK, its subscription ends). It goes back to
//! the front of its queue (anycast) or backlog (multicast), marked redelivered, or, after
//! `max_deliveries` or when rejected, leaves the table as a copy published to `DLQ.<address>`
//! (a forward to the shard that owns that address, drained by the shard with `take_forwards`).

use bytes::Bytes;
use smallvec::SmallVec;

use super::dispatch::Deliverable;
use super::{AddressTable, Outgoing, Queued};
use crate::broker::{
    owner_of, AddressCommand, ConnCommand, ConnId, ConnRef, SharedMessage, StoredMessage, SubscriptionId,
};
use crate::mbws::DeliveryMode;

/// Dead-letter addresses are named `DLQ.<address>`.
pub const DEAD_LETTER_PREFIX: &[u8] = b"DLQ.";
/// Headers dead-lettering adds to a message (defined beside `config::MAX_HEADERS`, which
/// leaves room for them).
pub use crate::config::DEAD_LETTER_HEADER_COUNT;

/// The publisher of dead-lettered messages: answers to it are dropped on arrival (no
/// connection has this slot).
const SYSTEM: ConnId = ConnId { index: u32::MAX, generation: u32::MAX };

impl AddressTable {
    /// The earliest ack deadline of any delivery on this shard, if any (ms, broker clock).
    pub fn next_ack_deadline(&self) -> Option<u64> {
        self.addresses
            .values()
            .flat_map(|state| state.anycast.iter().chain(state.multicast.iter()))
            .filter_map(|subscriber| subscriber.deadlines.front().map(|(deadline, _)| *deadline))
            .min()
    }

    /// Takes back every client-ack delivery whose ack deadline has passed: the consumer is told
    /// (so a late ACK changes nothing) and the message is redelivered (or dead-lettered).
    pub fn expire_acks(&mut self, now_ms: u64, out: &mut Vec<Outgoing>) {
        let mut expired: Vec<(Bytes, ConnRef, SubscriptionId, DeliveryMode, Queued)> = Vec::new();
        for (address, state) in self.addresses.iter_mut() {
            for (mode, subscribers) in
                [(DeliveryMode::Anycast, &mut state.anycast), (DeliveryMode::Multicast, &mut state.multicast)]
            {
                for subscriber in subscribers.iter_mut() {
                    while let Some(&(deadline, id)) = subscriber.deadlines.front() {
                        if deadline > now_ms {
                            break;
                        }
                        subscriber.deadlines.pop_front();
                        if let Some(queued) = subscriber.unacked.remove(id) {
                            subscriber.in_flight -= 1;
                            expired.push((address.clone(), subscriber.consumer, subscriber.subscription, mode, queued));
                        }
                    }
                }
            }
        }
        let mut touched: SmallVec<[Bytes; 4]> = SmallVec::new();
        for (address, consumer, subscription, _, queued) in &expired {
            out.push((
                consumer.shard,
                ConnCommand::DeliveryExpired {
                    consumer: consumer.conn,
                    subscription: *subscription,
                    message_id: queued.id,
                },
            ));
            if !touched.contains(address) {
                touched.push(address.clone());
            }
        }
        // Each subscriber's expired deliveries are listed oldest first. Those delivered too
        // often leave for the dead-letter address in that order; the others go back to the
        // front of their queue or backlog one at a time, so they are given back newest first
        // and wait oldest first, in the order they were delivered (as a removed subscription's
        // are).
        let (exhausted, returning): (Vec<_>, Vec<_>) =
            expired.into_iter().partition(|(address, _, _, _, queued)| self.delivered_too_often(address, queued));
        for (_, _, _, _, queued) in exhausted {
            self.dead_letter_exhausted(queued);
        }
        for (address, consumer, subscription, mode, queued) in returning.into_iter().rev() {
            self.give_back(&address, (consumer, subscription), mode, queued);
        }
        for address in touched {
            self.dispatch(&address, Deliverable::Everything, now_ms, out);
        }
    }

    /// A delivery ended without acknowledgement: back to the front of the queue (anycast) or
    /// of the subscriber's backlog (multicast: its own front, before the shared log), or to the dead-letter address after
    /// `max_deliveries`.
    pub(super) fn give_back(
        &mut self,
        address: &Bytes,
        key: (ConnRef, SubscriptionId),
        mode: DeliveryMode,
        mut queued: Queued,
    ) {
        if self.delivered_too_often(address, &queued) {
            self.dead_letter_exhausted(queued);
            return;
        }
        queued.redelivered = true;
        let Some(state) = self.addresses.get_mut(address) else { return };
        match mode {
            DeliveryMode::Anycast => {
                // O(queue) and so debug only: this path runs once per redelivery, not per message.
                debug_assert!(
                    state.queue.iter().all(|waiting| waiting.id != queued.id),
                    "message {} given back to a queue that already holds it",
                    queued.id.0
                );
                state.queued_bytes += queued.message.body().len();
                self.queued_bytes += queued.message.body().len();
                state.queue.push_front(queued);
            }
            DeliveryMode::Multicast => {
                let found = self.subscriptions.get(&key).and_then(|place| state.subscriber_at(place, key));
                if let Some(subscriber) = found {
                    subscriber.front.push_front(queued);
                    state.multicast_log.fronts += 1;
                }
            }
        }
    }

    /// Whether `queued` has been delivered `max_deliveries` times (the address's own setting,
    /// else the broker's; 0 is no limit): it is dead-lettered instead of given back.
    fn delivered_too_often(&self, address: &Bytes, queued: &Queued) -> bool {
        let declared = self.addresses.get(address).and_then(|state| state.declared.as_deref());
        let max_deliveries = declared.map_or(self.limits.max_deliveries, |settings| settings.max_deliveries);
        max_deliveries > 0 && queued.deliveries >= max_deliveries
    }

    /// Dead-letters a message [`delivered too often`](AddressTable::delivered_too_often).
    fn dead_letter_exhausted(&mut self, queued: Queued) {
        let reason = format!("delivered {} times without acknowledgement (max_deliveries)", queued.deliveries);
        self.dead_letter(queued, &reason);
    }

    /// Publishes a copy of the message (same body, no copy) to `DLQ.<address>`. A message that
    /// is already on a dead-letter address is dropped instead, so nothing loops; so is one whose
    /// MESSAGE would exceed `max_frame_bytes` with the two added headers.
    pub(super) fn dead_letter(&mut self, queued: Queued, reason: &str) {
        self.settle(queued.message.address(), &queued.message, queued.id);
        let original = queued.message.address();
        if original.starts_with(DEAD_LETTER_PREFIX) || original.len() + DEAD_LETTER_PREFIX.len() > 255 {
            return;
        }
        let mut address = Vec::with_capacity(DEAD_LETTER_PREFIX.len() + original.len());
        address.extend_from_slice(DEAD_LETTER_PREFIX);
        address.extend_from_slice(original);
        let address = Bytes::from(address);
        // The copy is a new publication of this node (not marked as come over a cluster link,
        // even when the original was: a `DLQ.` address another node owns gets it forwarded).
        let mut properties = queued.message.properties();
        if properties.headers.len() + 2 > crate::mbws::binary::MAX_HEADER_COUNT {
            return; // No room for the two headers in a MESSAGE: dropped, like one too large.
        }
        properties.headers.push((Bytes::from_static(b"x-original-address"), Bytes::copy_from_slice(original)));
        properties.headers.push((Bytes::from_static(b"x-dead-letter-reason"), Bytes::from(reason.to_string())));
        let body = queued.message.body();
        if crate::mbws::largest_message_bytes(&address, &properties, body.len()) > self.limits.max_frame_bytes {
            return; // Its MESSAGE would exceed max-frame-bytes: dropped, as when DLQ.<address> is full.
        }
        // A copy of the body: the message keeps one buffer (its tail), and dead-lettering is rare.
        let mut message = StoredMessage::from_fields(&address, &properties, body, queued.message.durable);
        message.body_is_text = queued.message.body_is_text;
        let message = SharedMessage::new(message);
        let owner = owner_of(&address, self.limits.shard_count);
        let publisher = ConnRef { shard: self.shard, conn: SYSTEM };
        self.forwards.push((owner, AddressCommand::Publish { publisher, seq: 0, message }));
    }
}
