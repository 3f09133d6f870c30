//! The addresses one shard owns: queues, subscribers, credit, acknowledgement, redelivery.
//!
//! Routing rule (docs/PROTOCOL.md, "Addresses"): a published message goes to every multicast
//! subscription of its address, and to the address's anycast queue when the address has an
//! anycast subscriber or has no multicast subscriber at all. So a message nobody consumes yet
//! waits (bounded by `max_queued_messages`), and a pure publish/subscribe address never fills.
//!
//! Redelivery: a client-ack delivery that ends without acknowledgement (NACK with requeue, its
//! subscription or session ends, or `ack_timeout_ms` passes) goes back to the front of its
//! queue (anycast) or backlog (multicast), marked redelivered. A message delivered
//! `max_deliveries` times, or rejected (NACK without requeue), moves to the dead-letter address
//! `DLQ.<address>` instead, with headers `x-original-address` and `x-dead-letter-reason`.
//!
//! Durability: a durable message that goes to an anycast queue is recorded in the shard's
//! [`DurableLog`] before its publisher is answered, and it is neither answered nor delivered
//! to anyone before its record is durable (both wait for the group commit:
//! [`AddressTable::durable_committed`]): a consumer never sees a message that a crash can take
//! back. It waits in its queue (and backlogs) meanwhile, and what was queued after it waits
//! behind it, so order is kept. When it is settled (acknowledged, auto-ack delivered, expired,
//! dead-lettered) a SETTLED record follows. At start-up [`AddressTable::restore`] puts every
//! unsettled message back in its queue, marked redelivered. Messages that only reach
//! multicast subscribers are not logged: nobody would consume them after a restart.
//!
//! Message ids: one counter per shard (so ids are unique and increasing per address too),
//! never reused, also across restarts and crashes, for durable and in-memory messages alike.
//! Only a delivery shows an id, and an id is delivered only once the log durably holds an
//! ID_RESERVATION at or above it: the table reserves ids in blocks of
//! [`ID_RESERVATION_BLOCK`], appending the next reservation when half of the current one is
//! used, so it is durable long before it is needed (one 17-byte record per half block; a
//! message whose id is past the durable reservation waits like an unsynced durable message).
//! After a restart ids continue above the highest reservation or logged id.
//!
//! Invariants:
//! - a subscriber never has more deliveries outstanding than its credit allows (`in_flight`
//!   grows only while `in_flight < credit`): asserted at every delivery, in release builds too;
//! - an anycast message is in exactly one place: the queue, or one subscriber's `unacked`
//!   (asserted in debug builds where a message goes back to the queue, and always where it
//!   enters an `unacked` ring, which refuses a key twice);
//! - the shard's `queued_bytes` is the sum of its addresses' (the memory budget is checked
//!   against it): asserted not to go below zero where deliveries take bytes out;
//! - a publish is refused once `max_queued_messages` wait in the address queue beyond what its
//!   subscribers' credit takes at once, and a multicast subscriber whose backlog reaches
//!   `max_queued_messages` is ended. Messages taken back from consumers (redelivery) and
//!   recovered at start-up go back to their queue regardless, so a queue can exceed the bound
//!   by what was in flight.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;

use bytes::Bytes;
use smallvec::SmallVec;

use super::sorted_ring::SortedRing;
use super::{
    owner_of, AddressCommand, CompactionArena, ConnCommand, ConnId, ConnRef, Delivered, Deliveries, FastMap, MessageId,
    Refusal, ShardId, SharedMessage, StoredMessage, SubscriptionId,
};
use crate::mbws::{AckMode, DeliveryMode, ErrorCode};
use crate::store::{DurableLog, Lsn, Recovery};

/// A command for the shard that holds a connection, with that shard's id.
pub type Outgoing = (ShardId, ConnCommand);

/// One SEND for [`AddressTable::publish_batch`]: what [`AddressCommand::Publish`] carries.
#[derive(Debug)]
pub struct Publication {
    pub publisher: ConnRef,
    pub seq: u64,
    pub message: SharedMessage,
}

/// Most publications [`AddressTable::publish_batch`] takes at once (the shard gathers at most
/// this many consecutive publishes to one address), so one batch's deliveries to a subscriber
/// stay a bounded list.
pub const MAX_PUBLISH_BATCH: usize = 256;

/// What a change to an address can have made deliverable, so that `dispatch` looks only there:
/// an ACK or new credit of one multicast subscriber concerns its backlog alone, never the
/// other subscribers (an ACK costs the same with 10 subscribers as with 10,000).
#[derive(Debug, Clone, Copy)]
enum Deliverable {
    /// Every backlog and the anycast queue (subscriptions come and go, messages are given back).
    Everything,
    /// The anycast queue (a subscriber came, or an anycast subscriber got credit back).
    AnycastQueue,
    /// One multicast subscriber's backlog.
    Backlog((ConnRef, SubscriptionId)),
}

impl Deliverable {
    /// What a change of credit of subscription `key` (delivered in `mode`) can release.
    fn after_credit_of(key: (ConnRef, SubscriptionId), mode: DeliveryMode) -> Deliverable {
        match mode {
            DeliveryMode::Anycast => Deliverable::AnycastQueue,
            DeliveryMode::Multicast => Deliverable::Backlog(key),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct AddressLimits {
    pub max_queued_messages: u32,
    pub max_credit: u32,
    /// Deliveries of one message after which an unacknowledged end sends it to the dead-letter
    /// address instead of back to its queue; 0 for no limit.
    pub max_deliveries: u32,
    /// A client-ack delivery not acknowledged within this many milliseconds is taken back and
    /// redelivered; 0 for never.
    pub ack_timeout_ms: u64,
    /// For the owner of dead-letter addresses.
    pub shard_count: usize,
    /// Body bytes waiting in one address queue; a SEND past it gets ERROR 4429.
    pub max_queued_bytes: usize,
    /// Body bytes waiting in all the queues of this shard (its share of the broker's memory
    /// budget); a SEND past it gets ERROR 4429.
    pub memory_budget_bytes: usize,
    /// The `max-frame-bytes` announced to clients: a dead-lettered message whose MESSAGE would
    /// exceed it with its two added headers is dropped.
    pub max_frame_bytes: usize,
}

impl AddressLimits {
    /// The limits of one of `shard_count` shards: its share of the memory budget, the rest as
    /// configured.
    pub fn from_config(config: &crate::config::Config, shard_count: usize) -> AddressLimits {
        AddressLimits {
            max_queued_messages: config.max_queued_messages,
            max_credit: config.max_credit,
            max_deliveries: config.max_deliveries,
            ack_timeout_ms: config.ack_timeout_ms,
            shard_count,
            max_queued_bytes: config.max_queued_bytes,
            memory_budget_bytes: config.memory_budget_bytes / shard_count.max(1),
            max_frame_bytes: config.limits().max_frame_bytes as usize,
        }
    }
}

/// The limits of a one-shard broker with the default configuration ([`Config::default`](crate::config::Config)).
impl Default for AddressLimits {
    fn default() -> Self {
        AddressLimits::from_config(&crate::config::Config::default(), 1)
    }
}

/// Message ids are reserved in the log this many at a time (see the module docs). A restart
/// skips at most this many ids; 2^44 restarts fit in the id space.
pub const ID_RESERVATION_BLOCK: u64 = 1 << 20;

/// Dead-letter addresses are named `DLQ.<address>`.
pub const DEAD_LETTER_PREFIX: &[u8] = b"DLQ.";
/// Headers dead-lettering adds to a message (`x-original-address`, `x-dead-letter-reason`):
/// `max_headers` leaves room for them (see `config::MAX_HEADERS`).
pub const DEAD_LETTER_HEADER_COUNT: usize = 2;

/// The publisher of dead-lettered messages: answers to it are dropped on arrival (no
/// connection has this slot).
const SYSTEM: ConnId = ConnId { index: u32::MAX, generation: u32::MAX };

#[derive(Debug, Clone)]
struct Queued {
    id: MessageId,
    message: SharedMessage,
    redelivered: bool,
    /// Times this message has been handed to a consumer.
    deliveries: u32,
}

/// A subscriber's unacknowledged deliveries, sorted by message id (a [`SortedRing`] with typed
/// keys): ids are handed out in increasing order, so an insert is nearly always at the back
/// and a (cumulative) ACK takes from the front; a redelivery (an older id) goes in its place.
/// At most `credit` entries.
#[derive(Debug, Default)]
struct UnackedMessages {
    entries: SortedRing<Queued>,
}

impl UnackedMessages {
    fn len(&self) -> usize {
        self.entries.len()
    }

    fn insert(&mut self, queued: Queued) {
        self.entries.insert(queued.id.0, queued);
    }

    fn contains(&self, id: MessageId) -> bool {
        self.entries.contains(id.0)
    }

    fn remove(&mut self, id: MessageId) -> Option<Queued> {
        self.entries.remove(id.0)
    }

    fn into_oldest_first(self) -> impl DoubleEndedIterator<Item = Queued> {
        self.entries.into_values()
    }
}

#[derive(Debug)]
struct Subscriber {
    consumer: ConnRef,
    subscription: SubscriptionId,
    ack_mode: AckMode,
    credit: u32,
    /// Deliveries not yet acknowledged (client ack) or not yet written (auto ack).
    in_flight: u32,
    /// Client-ack deliveries not yet acknowledged, kept for NACK and (anycast) for requeueing
    /// when the subscription ends. At most `credit` entries.
    unacked: UnackedMessages,
    /// Ack deadlines of client-ack deliveries, in delivery order (so in deadline order).
    /// Entries already acknowledged are dropped lazily; kept under 2 x `unacked` + 16.
    deadlines: VecDeque<(u64, MessageId)>,
    /// Multicast only: messages for this subscriber waiting for credit.
    backlog: VecDeque<Queued>,
}

impl Subscriber {
    fn key(&self) -> (ConnRef, SubscriptionId) {
        (self.consumer, self.subscription)
    }

    fn has_credit(&self) -> bool {
        self.in_flight < self.credit
    }

    /// Drops deadlines of settled deliveries: from the front, and all of them when the list has
    /// grown to twice what is unacknowledged (a stuck delivery at the front).
    fn trim_deadlines(&mut self) {
        while self.deadlines.front().is_some_and(|(_, id)| !self.unacked.contains(*id)) {
            self.deadlines.pop_front();
        }
        if self.deadlines.len() > 2 * self.unacked.len() + 16 {
            let unacked = &self.unacked;
            self.deadlines.retain(|(_, id)| unacked.contains(*id));
        }
    }
}

#[derive(Debug, Default)]
struct Address {
    queue: VecDeque<Queued>,
    anycast: Vec<Subscriber>,
    multicast: Vec<Subscriber>,
    /// Round-robin position among anycast subscribers.
    next_anycast: usize,
    /// Body bytes in `queue`.
    queued_bytes: usize,
    /// Publishes accepted while the queue was above its high watermark, whose answers are held
    /// back (see `AddressTable::publish_answer`). At most one entry per queued message.
    held_answers: VecDeque<(ConnRef, u64)>,
    /// Messages waiting for the log: an entry (id, lsn) holds back every message of the
    /// address with that id or a higher one (so later ones keep their place behind it) until
    /// the log is durable up to `lsn` (the message's record, or the reservation of its id).
    /// Ids increase along the list. Empty on an address that never met the log.
    held_for_log: VecDeque<(MessageId, Lsn)>,
}

impl Address {
    fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.anycast.is_empty() && self.multicast.is_empty() && self.held_answers.is_empty()
    }

    /// Only multicast subscribers, and nothing queued or held: a publish goes to the
    /// subscribers' backlogs (or straight out) and nowhere else.
    fn is_pure_multicast(&self) -> bool {
        self.anycast.is_empty()
            && !self.multicast.is_empty()
            && self.queue.is_empty()
            && self.held_answers.is_empty()
            && self.held_for_log.is_empty()
    }

    /// The lowest id that may not be delivered yet, with the log durable up to `durable_lsn`.
    fn held_from(&self, durable_lsn: Lsn) -> Option<MessageId> {
        if self.held_for_log.is_empty() {
            return None; // the common case, kept cheap
        }
        self.held_for_log.iter().find(|(_, lsn)| *lsn > durable_lsn).map(|(id, _)| *id)
    }

    fn subscribers_mut(&mut self, mode: DeliveryMode) -> &mut Vec<Subscriber> {
        match mode {
            DeliveryMode::Anycast => &mut self.anycast,
            DeliveryMode::Multicast => &mut self.multicast,
        }
    }

    /// The subscriber at `place` (found in O(1), whatever the number of subscribers).
    fn subscriber_at(&mut self, place: &Place, key: (ConnRef, SubscriptionId)) -> Option<&mut Subscriber> {
        let found = self.subscribers_mut(place.mode).get_mut(place.index);
        let found = found.filter(|subscriber| subscriber.key() == key);
        debug_assert!(found.is_some(), "the place of a subscription points at its subscriber");
        found
    }
}

/// Where a subscription is: its address, and its index in that address's subscribers of its
/// mode. Invariant: `addresses[address]`'s anycast or multicast list holds the subscription
/// at `index` (kept by `subscribe` and `remove_subscriber`), so an ACK finds its subscriber
/// without walking the others.
#[derive(Debug, Clone)]
struct Place {
    address: Bytes,
    mode: DeliveryMode,
    index: usize,
}

type Places = FastMap<(ConnRef, SubscriptionId), Place>;

/// Takes the subscriber at `index` of `mode` out of `state`, keeping the places of the others
/// right (the caller forgets the removed one's place). Anycast keeps its order (round robin);
/// multicast order means nothing, so the last subscriber takes the free index.
fn remove_subscriber(state: &mut Address, places: &mut Places, mode: DeliveryMode, index: usize) -> Subscriber {
    let removed = match mode {
        DeliveryMode::Anycast => state.anycast.remove(index),
        DeliveryMode::Multicast => state.multicast.swap_remove(index),
    };
    let moved = match mode {
        DeliveryMode::Anycast => &state.anycast[index..],
        DeliveryMode::Multicast => state.multicast.get(index..index + 1).unwrap_or_default(),
    };
    for (offset, subscriber) in moved.iter().enumerate() {
        if let Some(place) = places.get_mut(&subscriber.key()) {
            place.index = index + offset;
        }
    }
    removed
}

/// Observable counters, for tests and (later) metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AddressStats {
    pub queued: usize,
    pub anycast_subscribers: usize,
    pub multicast_subscribers: usize,
    pub unacked: usize,
}

/// The state of every address owned by one shard.
pub struct AddressTable {
    shard: ShardId,
    limits: AddressLimits,
    addresses: FastMap<Bytes, Address>,
    /// Where each subscription is.
    subscriptions: Places,
    /// Subscriptions per consumer connection, for `ConsumerGone`.
    by_consumer: FastMap<ConnRef, SmallVec<[SubscriptionId; 4]>>,
    /// Commands for other address owners (dead-lettered messages), drained by the shard.
    forwards: Vec<(ShardId, AddressCommand)>,
    /// Set when a delivery with an ack deadline was made (the shard arms its ack timer).
    deadline_added: bool,
    /// Body bytes in all anycast queues of this shard.
    queued_bytes: usize,
    /// Message ids are unique per shard (so per address too), never reused: ids continue after
    /// an idle address is dropped, and after a restart (from the log; see the module docs).
    last_message_id: u64,
    /// Ids at or below this are covered by a durable ID_RESERVATION (`u64::MAX` without a
    /// log): they may be delivered at once.
    ids_durably_reserved: u64,
    /// The highest ID_RESERVATION appended (durable or not), and its Lsn.
    ids_reserved: u64,
    id_reservation_lsn: Lsn,
    /// The log is durable up to here (as `durable_committed` last said).
    durable_lsn: Lsn,
    /// Addresses holding messages that wait for the log to be durable up to the given Lsn
    /// (Lsn order): `durable_committed` delivers them.
    waiting_for_log: VecDeque<(Lsn, Bytes)>,
    /// The shard's durable log, if the broker keeps one.
    log: Option<Rc<RefCell<DurableLog>>>,
    /// Answers to durable publishes, waiting for their record to be committed (Lsn order).
    durable_answers: VecDeque<(Lsn, ConnRef, u64)>,
    /// Addresses whose every message is durable: exact names, or prefixes ending in `*`.
    durable_addresses: Vec<Bytes>,
    /// Where messages that wait are copied to (see `StoredMessage::compact`).
    arena: CompactionArena,
}

impl AddressTable {
    pub fn new(shard: ShardId, limits: AddressLimits) -> AddressTable {
        AddressTable {
            shard,
            limits,
            addresses: FastMap::default(),
            subscriptions: FastMap::default(),
            by_consumer: FastMap::default(),
            forwards: Vec::new(),
            deadline_added: false,
            queued_bytes: 0,
            last_message_id: 0,
            ids_durably_reserved: u64::MAX,
            ids_reserved: u64::MAX,
            id_reservation_lsn: Lsn(0),
            durable_lsn: Lsn(0),
            waiting_for_log: VecDeque::new(),
            log: None,
            durable_answers: VecDeque::new(),
            durable_addresses: Vec::new(),
            arena: CompactionArena::default(),
        }
    }

    /// Gives the table the shard's durable log and the addresses configured durable.
    /// Ids continue above every id the log says may have been handed out; the first new one
    /// appends a reservation.
    pub fn set_durable_log(&mut self, log: Rc<RefCell<DurableLog>>, durable_addresses: Vec<Bytes>) {
        let high_water = log.borrow().message_id_high_water();
        self.last_message_id = self.last_message_id.max(high_water);
        self.ids_durably_reserved = self.last_message_id;
        self.ids_reserved = self.last_message_id;
        self.durable_lsn = log.borrow().durable_lsn();
        self.log = Some(log);
        self.durable_addresses = durable_addresses;
    }

    /// Puts recovered messages back in their queues (marked redelivered: they may have been
    /// delivered before the restart) and continues message ids above every logged one.
    pub fn restore(&mut self, recovery: Recovery, now_ms: u64, now_unix_ms: u64) {
        debug_assert!(
            self.log.is_none() || self.last_message_id >= recovery.message_id_high_water,
            "set_durable_log continued ids above the log's high water"
        );
        self.last_message_id = self.last_message_id.max(recovery.message_id_high_water);
        for recovered in recovery.messages {
            let expires_at_ms = match recovered.expires_at_unix_ms {
                0 => 0,
                at => now_ms + at.saturating_sub(now_unix_ms).max(1),
            };
            let message = std::sync::Arc::new(StoredMessage {
                address: recovered.address.clone(),
                durable: true,
                expires_at_ms,
                properties: recovered.properties,
                body: recovered.body,
                body_is_text: false,
            });
            let state = match self.addresses.get_mut(&recovered.address) {
                Some(state) => state,
                None => new_address(&mut self.addresses, &recovered.address),
            };
            state.queued_bytes += message.body.len();
            self.queued_bytes += message.body.len();
            let queued = Queued { id: MessageId(recovered.message_id), message, redelivered: true, deliveries: 0 };
            state.queue.push_back(queued);
        }
    }

    /// Continues message ids above `floor` (the highest id a log written with another shard
    /// count used), so ids stay unique per address when the shard count changes.
    pub fn continue_ids_above(&mut self, floor: u64) {
        self.last_message_id = self.last_message_id.max(floor);
    }

    fn is_durable(&self, message: &StoredMessage) -> bool {
        message.durable
            || self.durable_addresses.iter().any(|pattern| match pattern.strip_suffix(b"*") {
                Some(prefix) => message.address.starts_with(prefix),
                None => message.address == *pattern,
            })
    }

    /// Records that a message is done with; a no-op for messages that were never logged.
    fn settle(&self, address: &[u8], message: &StoredMessage, id: MessageId) {
        if let Some(log) = &self.log {
            if message.durable || !self.durable_addresses.is_empty() {
                log.borrow_mut().append_settled(address, id.0);
            }
        }
    }

    /// The log made everything up to `lsn` durable: answer the publishes that waited for it
    /// and deliver the messages that did.
    pub fn durable_committed(&mut self, lsn: Lsn, now_ms: u64, out: &mut Vec<Outgoing>) {
        debug_assert!(lsn >= self.durable_lsn, "the durable Lsn only grows");
        self.durable_lsn = lsn;
        if lsn >= self.id_reservation_lsn {
            self.ids_durably_reserved = self.ids_reserved;
        }
        while self.durable_answers.front().is_some_and(|(waiting, _, _)| *waiting <= lsn) {
            let (_, publisher, seq) = self.durable_answers.pop_front().expect("checked above");
            out.push((publisher.shard, ConnCommand::PublishDone { publisher: publisher.conn, seq, outcome: Ok(()) }));
        }
        let mut previous: Option<Bytes> = None;
        while self.waiting_for_log.front().is_some_and(|(waiting, _)| *waiting <= lsn) {
            let (_, address) = self.waiting_for_log.pop_front().expect("checked above");
            // Consecutive entries are mostly one address; dispatching one twice is harmless.
            if previous.as_ref() != Some(&address) {
                if let Some(state) = self.addresses.get_mut(&address) {
                    while state.held_for_log.front().is_some_and(|(_, waiting)| *waiting <= lsn) {
                        state.held_for_log.pop_front();
                    }
                }
                self.dispatch(&address, Deliverable::Everything, now_ms, out);
                previous = Some(address);
            }
        }
    }

    /// The next message id, and the Lsn the log must be durable up to before a consumer may
    /// see it (`Lsn(0)`: at once). Appends the next ID_RESERVATION when half of the current
    /// one is used (see the module docs).
    fn next_message_id(&mut self) -> (MessageId, Lsn) {
        let id = self.last_message_id + 1;
        self.last_message_id = id;
        if id.saturating_add(ID_RESERVATION_BLOCK / 2) > self.ids_reserved {
            self.reserve_ids(id);
        }
        let visible_after = if id <= self.ids_durably_reserved { Lsn(0) } else { self.id_reservation_lsn };
        (MessageId(id), visible_after)
    }

    #[cold]
    fn reserve_ids(&mut self, id: u64) {
        let Some(log) = &self.log else { return };
        let reserved_up_to = id.saturating_add(ID_RESERVATION_BLOCK);
        if let Some(lsn) = log.borrow_mut().append_id_reservation(reserved_up_to) {
            self.id_reservation_lsn = lsn;
        }
        self.ids_reserved = reserved_up_to;
    }

    /// Refuses a publish whose id could never be shown: past the durable reservation while
    /// the log is failed (no reservation can become durable any more).
    fn refuse_if_ids_cannot_be_reserved(&self) -> Result<(), Refusal> {
        if self.last_message_id < self.ids_durably_reserved {
            return Ok(());
        }
        match self.log.as_ref().and_then(|log| log.borrow().failure().map(str::to_string)) {
            None => Ok(()),
            Some(failure) => Err(Refusal::new(
                ErrorCode::Internal,
                format!(
                    "the durable log failed ({failure}); it cannot reserve message ids any more, so no \
                     message is accepted until the broker restarts"
                ),
            )),
        }
    }

    /// The log failed: every publish still waiting for it is answered with an error (its
    /// message may or may not survive a restart), and later durable publishes are refused.
    pub fn durable_failed(&mut self, reason: &str, out: &mut Vec<Outgoing>) {
        for (_, publisher, seq) in self.durable_answers.drain(..) {
            let refusal = Refusal::new(
                ErrorCode::Internal,
                format!("the durable log failed before this message was made safe: {reason}"),
            );
            out.push((
                publisher.shard,
                ConnCommand::PublishDone { publisher: publisher.conn, seq, outcome: Err(refusal) },
            ));
        }
        // What waits for the log would wait forever, and hold back what is queued behind it:
        // it is dropped (its publisher got the error above; a durable one may or may not come
        // back after the restart, as that error says).
        for (_, address) in std::mem::take(&mut self.waiting_for_log) {
            let Some(state) = self.addresses.get_mut(&address) else { continue };
            let Some(held_from) = state.held_from(self.durable_lsn) else { continue };
            state.held_for_log.clear();
            let before = state.queued_bytes;
            state.queue.retain(|queued| queued.id < held_from);
            state.queued_bytes = state.queue.iter().map(|queued| queued.message.body.len()).sum();
            self.queued_bytes -= before - state.queued_bytes;
            for subscriber in &mut state.multicast {
                subscriber.backlog.retain(|queued| queued.id < held_from);
            }
        }
    }

    /// Body bytes waiting in this shard's queues (for tests and metrics).
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    /// True once after deliveries with ack deadlines were made.
    pub fn take_deadline_added(&mut self) -> bool {
        std::mem::take(&mut self.deadline_added)
    }

    /// Commands this table produced for other address owners since the last call.
    pub fn take_forwards(&mut self) -> Vec<(ShardId, AddressCommand)> {
        std::mem::take(&mut self.forwards)
    }

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
        for (address, consumer, subscription, mode, queued) in expired {
            out.push((
                consumer.shard,
                ConnCommand::DeliveryExpired { consumer: consumer.conn, subscription, message_id: queued.id },
            ));
            self.give_back(&address, (consumer, subscription), mode, queued);
            if !touched.contains(&address) {
                touched.push(address);
            }
        }
        for address in touched {
            self.dispatch(&address, Deliverable::Everything, now_ms, out);
        }
    }

    /// A delivery ended without acknowledgement: back to the front of the queue (anycast) or
    /// the subscriber's backlog (multicast), or to the dead-letter address after
    /// `max_deliveries`.
    fn give_back(&mut self, address: &Bytes, key: (ConnRef, SubscriptionId), mode: DeliveryMode, mut queued: Queued) {
        let max_deliveries = self.limits.max_deliveries;
        if max_deliveries > 0 && queued.deliveries >= max_deliveries {
            let reason = format!("delivered {} times without acknowledgement (max_deliveries)", queued.deliveries);
            self.dead_letter(queued, &reason);
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
                state.queued_bytes += queued.message.body.len();
                self.queued_bytes += queued.message.body.len();
                state.queue.push_front(queued);
            }
            DeliveryMode::Multicast => {
                let found = self.subscriptions.get(&key).and_then(|place| state.subscriber_at(place, key));
                if let Some(subscriber) = found {
                    subscriber.backlog.push_front(queued);
                }
            }
        }
    }

    /// Publishes a copy of the message (same body, no copy) to `DLQ.<address>`. A message that
    /// is already on a dead-letter address is dropped instead, so nothing loops; so is one whose
    /// MESSAGE would exceed `max_frame_bytes` with the two added headers.
    fn dead_letter(&mut self, queued: Queued, reason: &str) {
        self.settle(&queued.message.address, &queued.message, queued.id);
        let original = &queued.message.address;
        if original.starts_with(DEAD_LETTER_PREFIX) || original.len() + DEAD_LETTER_PREFIX.len() > 255 {
            return;
        }
        let mut address = Vec::with_capacity(DEAD_LETTER_PREFIX.len() + original.len());
        address.extend_from_slice(DEAD_LETTER_PREFIX);
        address.extend_from_slice(original);
        let address = Bytes::from(address);
        let mut properties = queued.message.properties.clone();
        properties.headers.push((Bytes::from_static(b"x-original-address"), original.clone()));
        properties.headers.push((Bytes::from_static(b"x-dead-letter-reason"), Bytes::from(reason.to_string())));
        let body = &queued.message.body;
        if crate::mbws::largest_message_bytes(&address, &properties, body.len()) > self.limits.max_frame_bytes {
            return; // Its MESSAGE would exceed max-frame-bytes: dropped, as when DLQ.<address> is full.
        }
        let message = std::sync::Arc::new(StoredMessage {
            address: address.clone(),
            durable: queued.message.durable,
            expires_at_ms: 0,
            properties,
            body: queued.message.body.clone(),
            body_is_text: queued.message.body_is_text,
        });
        let owner = owner_of(&address, self.limits.shard_count);
        let publisher = ConnRef { shard: self.shard, conn: SYSTEM };
        self.forwards.push((owner, AddressCommand::Publish { publisher, seq: 0, message }));
    }

    pub fn stats(&self, address: &[u8]) -> AddressStats {
        match self.addresses.get(address) {
            None => AddressStats::default(),
            Some(state) => AddressStats {
                queued: state.queue.len(),
                anycast_subscribers: state.anycast.len(),
                multicast_subscribers: state.multicast.len(),
                unacked: state.anycast.iter().map(|s| s.unacked.len()).sum(),
            },
        }
    }

    /// Applies one command; answers and deliveries are pushed to `out`.
    pub fn handle(&mut self, command: AddressCommand, now_ms: u64, out: &mut Vec<Outgoing>) {
        match command {
            AddressCommand::Publish { publisher, seq, message } => {
                // Always answered, also for seq 0: the publisher counts its publishes in flight
                // and stops reading at max_inflight_sends, which bounds every inbox.
                let address = message.address.clone();
                let outcome = self.publish(&address, message, now_ms, out);
                self.answer_publish(&address, publisher, seq, outcome, out);
            }
            AddressCommand::Subscribe { consumer, subscription, address, mode, ack_mode, credit } => {
                let outcome = self.subscribe(consumer, subscription, address.clone(), mode, ack_mode, credit);
                let accepted = outcome.is_ok();
                out.push((
                    consumer.shard,
                    ConnCommand::SubscribeDone { consumer: consumer.conn, subscription, outcome },
                ));
                if accepted {
                    // A new subscriber's backlog is empty: only the queue can have work for it.
                    self.dispatch(&address, Deliverable::AnycastQueue, now_ms, out);
                }
            }
            AddressCommand::Unsubscribe { consumer, subscription } => {
                self.remove_subscription(consumer, subscription, now_ms, out);
                if let Some(list) = self.by_consumer.get_mut(&consumer) {
                    list.retain(|id| *id != subscription);
                    if list.is_empty() {
                        self.by_consumer.remove(&consumer);
                    }
                }
            }
            AddressCommand::Ack { consumer, subscription, messages } => {
                // Only what may have been logged is kept for its SETTLED record.
                let has_log = self.log.is_some();
                let has_durable_addresses = !self.durable_addresses.is_empty();
                let logged = |queued: &Queued| has_log && (queued.message.durable || has_durable_addresses);
                let mut to_settle: SmallVec<[Queued; 4]> = SmallVec::new();
                let acknowledge = |subscriber: &mut Subscriber| {
                    for id in messages {
                        // An unknown id (already acknowledged, requeued or expired) changes nothing.
                        if let Some(queued) = subscriber.unacked.remove(id) {
                            subscriber.in_flight -= 1;
                            if logged(&queued) {
                                to_settle.push(queued);
                            }
                        }
                    }
                    subscriber.trim_deadlines();
                };
                if let Some((address, ())) = self.change_credit(consumer, subscription, now_ms, out, acknowledge) {
                    for queued in to_settle {
                        self.settle(&address, &queued.message, queued.id);
                    }
                }
            }
            AddressCommand::Nack { consumer, subscription, message, requeue } => {
                // Given back before anything is dispatched, so a requeued message keeps its place.
                let taken = self.change_subscriber(consumer, subscription, |subscriber, mode, _| {
                    let queued = subscriber.unacked.remove(message)?;
                    subscriber.in_flight -= 1;
                    subscriber.trim_deadlines();
                    Some((mode, queued))
                });
                if let Some((address, Some((mode, queued)))) = taken {
                    if requeue {
                        self.give_back(&address, (consumer, subscription), mode, queued);
                    } else {
                        self.dead_letter(queued, "rejected by a consumer (NACK without requeue)");
                    }
                    let deliverable = match (requeue, mode) {
                        // A requeued anycast message may go to any subscriber with credit.
                        (true, DeliveryMode::Anycast) => Deliverable::Everything,
                        _ => Deliverable::after_credit_of((consumer, subscription), mode),
                    };
                    self.dispatch(&address, deliverable, now_ms, out);
                }
            }
            AddressCommand::SetCredit { consumer, subscription, credit } => {
                let credit = credit.min(self.limits.max_credit);
                self.change_credit(consumer, subscription, now_ms, out, |subscriber| subscriber.credit = credit);
            }
            AddressCommand::ReturnCredit { consumer, subscription, count } => {
                self.change_credit(consumer, subscription, now_ms, out, |subscriber| {
                    subscriber.in_flight = subscriber.in_flight.saturating_sub(count);
                });
            }
            AddressCommand::ConsumerGone { consumer } => {
                for subscription in self.by_consumer.remove(&consumer).unwrap_or_default() {
                    self.remove_subscription(consumer, subscription, now_ms, out);
                }
            }
        }
    }

    /// Publishes consecutive SENDs to one address (all of `batch`, which is left empty) and
    /// answers each. On a pure multicast address (multicast subscribers only, nothing queued
    /// or held) every subscriber gets its share of the whole batch at once: one `Deliver`
    /// command per subscriber instead of one per message and subscriber, no detour through the
    /// backlog for a subscriber with credit, and one lookup of the address for the batch. Any
    /// other address takes the publishes one at a time, as [`AddressCommand::Publish`].
    pub fn publish_batch(&mut self, batch: &mut Vec<Publication>, now_ms: u64, out: &mut Vec<Outgoing>) {
        debug_assert!(batch.len() <= MAX_PUBLISH_BATCH, "batches are bounded by MAX_PUBLISH_BATCH");
        let Some(first) = batch.first() else { return };
        debug_assert!(batch.iter().all(|publication| publication.message.address == first.message.address));
        let address_name = first.message.address.clone();
        // The fast path delivers at once: only for ids already durably reserved.
        let ids_reserved = self.last_message_id.saturating_add(batch.len() as u64) <= self.ids_durably_reserved;
        if !ids_reserved || !self.addresses.get(&address_name).is_some_and(Address::is_pure_multicast) {
            // Queued one by one (each admitted or refused against the bounds as they stand),
            // delivered in one dispatch, answered in order: what publishing them one at a time
            // does, without a dispatch and an answer lookup per message.
            let mut outcomes = Vec::with_capacity(batch.len());
            for Publication { publisher, seq, message } in batch.drain(..) {
                outcomes.push((publisher, seq, self.enqueue(&address_name, message, now_ms, out)));
            }
            self.dispatch(&address_name, Deliverable::Everything, now_ms, out);
            for (publisher, seq, outcome) in outcomes {
                self.answer_publish(&address_name, publisher, seq, outcome, out);
            }
            return;
        }
        // Admission: a message for multicast subscribers only waits in no queue, so only the
        // durable log's health and the shard's memory budget can refuse it.
        let mut answers = Vec::with_capacity(batch.len());
        let mut accepted = Vec::with_capacity(batch.len());
        for Publication { publisher, seq, message } in batch.drain(..) {
            let admitted =
                self.refuse_if_log_failed(&message).and_then(|_| self.check_memory_budget(message.body.len()));
            if admitted.is_ok() && !is_expired_at(message.expires_at_ms, now_ms) {
                let (id, visible_after) = self.next_message_id();
                debug_assert_eq!(visible_after, Lsn(0), "ids of this path are durably reserved (checked above)");
                accepted.push(Queued { id, message, redelivered: false, deliveries: 0 });
            }
            answers.push((publisher, seq, admitted));
        }
        let state = self.addresses.get_mut(&address_name).expect("checked above");
        // Message i (0-based) waits in some backlog, so it is compacted, unless every
        // subscriber has an empty backlog and more than i deliveries of credit left.
        let (any_backlog, least_credit_left) =
            state.multicast.iter().fold((false, u32::MAX), |(any_backlog, least), subscriber| {
                (
                    any_backlog || !subscriber.backlog.is_empty(),
                    least.min(subscriber.credit.saturating_sub(subscriber.in_flight)),
                )
            });
        let delivered_at_once = if any_backlog { 0 } else { least_credit_left as usize };
        for queued in accepted.iter_mut().skip(delivered_at_once) {
            compact_to_wait(&mut self.arena, &mut queued.message);
        }
        let max_queued = self.limits.max_queued_messages as usize;
        let ack_deadline = (self.limits.ack_timeout_ms > 0).then(|| now_ms + self.limits.ack_timeout_ms);
        let mut slow = SmallVec::<[usize; 2]>::new();
        let mut delivered_any = false;
        for (index, subscriber) in state.multicast.iter_mut().enumerate() {
            let credit_left = subscriber.credit.saturating_sub(subscriber.in_flight) as usize;
            let mut deliveries = Deliveries::with_capacity(accepted.len().min(credit_left));
            for queued in &accepted {
                if subscriber.backlog.is_empty() && subscriber.has_credit() {
                    deliveries.push(deliver(subscriber, queued.clone(), ack_deadline));
                } else if subscriber.backlog.len() >= max_queued {
                    slow.push(index);
                    break;
                } else {
                    subscriber.backlog.push_back(queued.clone());
                }
            }
            delivered_any |= !deliveries.is_empty();
            send_deliveries(out, subscriber, deliveries);
        }
        end_slow_subscribers(state, &address_name, &slow, &mut self.subscriptions, out);
        self.deadline_added |= ack_deadline.is_some() && delivered_any;
        for (publisher, seq, outcome) in answers {
            out.push((publisher.shard, ConnCommand::PublishDone { publisher: publisher.conn, seq, outcome }));
        }
    }

    /// Whether `message` must be logged; refused while the durable log is failed.
    fn refuse_if_log_failed(&self, message: &StoredMessage) -> Result<bool, Refusal> {
        let durable = self.log.is_some() && self.is_durable(message);
        if durable {
            if let Some(failure) = self.log.as_ref().and_then(|log| log.borrow().failure().map(str::to_string)) {
                return Err(Refusal::new(
                    ErrorCode::Internal,
                    format!("the durable log failed ({failure}); durable messages cannot be accepted until the broker restarts"),
                ));
            }
        }
        Ok(durable)
    }

    /// Refuses a body that would take the shard's queued bytes past its memory budget.
    fn check_memory_budget(&self, body_bytes: usize) -> Result<(), Refusal> {
        if self.queued_bytes + body_bytes > self.limits.memory_budget_bytes {
            return Err(Refusal::new(
                ErrorCode::Overloaded,
                format!(
                    "the broker's memory budget for queued messages is used up ({} of {} bytes on this shard; \
                     --memory-budget-bytes); consume messages or retry later",
                    self.queued_bytes, self.limits.memory_budget_bytes
                ),
            ));
        }
        Ok(())
    }

    /// Queues and delivers a message; `Ok(Some(lsn))` when its answer must wait for the log.
    fn publish(
        &mut self,
        address: &Bytes,
        message: SharedMessage,
        now_ms: u64,
        out: &mut Vec<Outgoing>,
    ) -> Result<Option<Lsn>, Refusal> {
        let outcome = self.enqueue(address, message, now_ms, out)?;
        self.dispatch(address, Deliverable::Everything, now_ms, out);
        Ok(outcome)
    }

    /// Admits a message and puts it in the address's queue and multicast backlogs, without
    /// delivering anything yet (the caller dispatches, once per message or once per batch);
    /// `Ok(Some(lsn))` when its answer must wait for the log. `address_name` is the message's
    /// address (passed in so that it is not cloned again per message).
    fn enqueue(
        &mut self,
        address_name: &Bytes,
        message: SharedMessage,
        now_ms: u64,
        out: &mut Vec<Outgoing>,
    ) -> Result<Option<Lsn>, Refusal> {
        debug_assert_eq!(*address_name, message.address);
        let max_queued = self.limits.max_queued_messages as usize;
        let durable = self.refuse_if_log_failed(&message)?;
        self.refuse_if_ids_cannot_be_reserved()?;
        // Checked after the address's own bounds (whose refusal says more), computed here
        // while `self` is free.
        let within_budget = self.check_memory_budget(message.body.len());
        let state = match self.addresses.get_mut(address_name) {
            Some(state) => state,
            None => new_address(&mut self.addresses, address_name),
        };
        let to_anycast_queue = !state.anycast.is_empty() || state.multicast.is_empty();
        // What the subscribers' credit takes at once from the queue, counting the messages of
        // this batch queued ahead of this one and not dispatched yet (none outside a batch: a
        // queue that outlives a dispatch has no credit left to meet it).
        let anycast_credit_left: usize =
            state.anycast.iter().map(|s| s.credit.saturating_sub(s.in_flight) as usize).sum();
        let waiting_ahead = state.queue.len().saturating_sub(anycast_credit_left);
        if to_anycast_queue && waiting_ahead >= max_queued {
            return Err(Refusal::new(
                ErrorCode::Overloaded,
                format!(
                    "address \"{}\" already holds {} queued messages (max_queued_messages); \
                     consume from it or retry later",
                    String::from_utf8_lossy(address_name),
                    waiting_ahead
                ),
            ));
        }
        let body_bytes = message.body.len();
        if to_anycast_queue && state.queued_bytes + body_bytes > self.limits.max_queued_bytes {
            return Err(Refusal::new(
                ErrorCode::Overloaded,
                format!(
                    "address \"{}\" already holds {} bytes of queued messages and this one has {body_bytes} \
                     (max_queued_bytes {}); consume from it or retry later",
                    String::from_utf8_lossy(address_name),
                    state.queued_bytes,
                    self.limits.max_queued_bytes
                ),
            ));
        }
        within_budget?;
        // A message that will wait somewhere is compacted first (see StoredMessage::compact):
        // in the anycast queue, one that the credit left cannot take at once with the messages
        // ahead of it; in a multicast backlog, one behind others or past a subscriber's credit.
        let will_wait = (to_anycast_queue && state.queue.len() >= anycast_credit_left)
            || state.multicast.iter().any(|s| !s.has_credit() || !s.backlog.is_empty());
        let mut message = message;
        if will_wait {
            compact_to_wait(&mut self.arena, &mut message);
        }
        let (id, mut visible_after) = self.next_message_id();
        // Logged before it can be delivered (and so settled), when it goes to the anycast queue;
        // delivered only once its record is durable.
        let mut lsn = None;
        if durable && to_anycast_queue {
            let log = self.log.as_ref().expect("durable implies a log");
            let expires_at_unix_ms = match message.expires_at_ms {
                0 => 0,
                at => crate::shard::now_unix_ms() + at.saturating_sub(now_ms),
            };
            let appended = log.borrow_mut().append_message(
                &message.address,
                id.0,
                expires_at_unix_ms,
                &message.properties,
                &message.body,
            );
            match appended {
                Ok(appended) => {
                    lsn = Some(appended);
                    visible_after = appended;
                }
                Err(error) => return Err(Refusal::new(ErrorCode::TooLarge, error.to_string())),
            }
        }
        let state = self.addresses.get_mut(address_name).expect("address was just inserted");
        if visible_after > self.durable_lsn {
            // Held back from here on, unless an entry that holds it back longer is there.
            if state.held_for_log.back().is_none_or(|(_, lsn)| *lsn < visible_after) {
                state.held_for_log.push_back((id, visible_after));
            }
            self.waiting_for_log.push_back((visible_after, address_name.clone()));
        }
        let queued = Queued { id, message, redelivered: false, deliveries: 0 };

        let mut slow = SmallVec::<[usize; 2]>::new();
        for (index, subscriber) in state.multicast.iter_mut().enumerate() {
            if subscriber.backlog.len() >= max_queued {
                slow.push(index);
            } else {
                subscriber.backlog.push_back(queued.clone());
            }
        }
        end_slow_subscribers(state, address_name, &slow, &mut self.subscriptions, out);
        if to_anycast_queue {
            state.queued_bytes += queued.message.body.len();
            self.queued_bytes += queued.message.body.len();
            state.queue.push_back(queued);
        }
        Ok(lsn)
    }

    /// Answers a publish: now, held back (`publish_answer`), or once the log has it.
    fn answer_publish(
        &mut self,
        address: &Bytes,
        publisher: ConnRef,
        seq: u64,
        outcome: Result<Option<Lsn>, Refusal>,
        out: &mut Vec<Outgoing>,
    ) {
        match outcome {
            Ok(Some(lsn)) => self.durable_answers.push_back((lsn, publisher, seq)),
            Ok(None) => self.publish_answer(address, publisher, seq, out),
            Err(refusal) => out.push((
                publisher.shard,
                ConnCommand::PublishDone { publisher: publisher.conn, seq, outcome: Err(refusal) },
            )),
        }
    }

    /// Backpressure before refusal: while an address with anycast consumers holds more than
    /// half of `max_queued_messages`, the answers to its publishers are held back, so their
    /// sessions reach `max_inflight_sends` and the broker stops reading from them. The answers
    /// go out once consumers bring the queue down to a quarter (or all of them leave). Only
    /// when publishers outrun that (many publishers, or no consumer at all) does a SEND meet the
    /// hard bound and ERROR 4429. Multicast backlogs never hold publishers back: a slow
    /// multicast subscriber is ended at the bound instead (see `publish`).
    fn publish_answer(&mut self, address: &Bytes, publisher: ConnRef, seq: u64, out: &mut Vec<Outgoing>) {
        let high_watermark = (self.limits.max_queued_messages as usize / 2).max(1);
        if let Some(state) = self.addresses.get_mut(address) {
            let hold =
                !state.held_answers.is_empty() || (state.queue.len() >= high_watermark && !state.anycast.is_empty());
            if hold {
                state.held_answers.push_back((publisher, seq));
                return;
            }
        }
        out.push((publisher.shard, ConnCommand::PublishDone { publisher: publisher.conn, seq, outcome: Ok(()) }));
    }

    fn release_held_answers(state: &mut Address, low_watermark: usize, out: &mut Vec<Outgoing>) {
        if state.held_answers.is_empty() || (state.queue.len() > low_watermark && !state.anycast.is_empty()) {
            return;
        }
        for (publisher, seq) in state.held_answers.drain(..) {
            out.push((publisher.shard, ConnCommand::PublishDone { publisher: publisher.conn, seq, outcome: Ok(()) }));
        }
    }

    fn subscribe(
        &mut self,
        consumer: ConnRef,
        subscription: SubscriptionId,
        address: Bytes,
        mode: DeliveryMode,
        ack_mode: AckMode,
        credit: u32,
    ) -> Result<(), Refusal> {
        let key = (consumer, subscription);
        if self.subscriptions.contains_key(&key) {
            return Err(Refusal::new(
                ErrorCode::Conflict,
                format!("subscription id {} is already in use on this session; pick another id", subscription.0),
            ));
        }
        let subscriber = Subscriber {
            consumer,
            subscription,
            ack_mode,
            credit: credit.min(self.limits.max_credit),
            in_flight: 0,
            unacked: UnackedMessages::default(),
            deadlines: VecDeque::new(),
            backlog: VecDeque::new(),
        };
        let state = match self.addresses.get_mut(&address) {
            Some(state) => state,
            None => new_address(&mut self.addresses, &address),
        };
        let subscribers = state.subscribers_mut(mode);
        subscribers.push(subscriber);
        let index = subscribers.len() - 1;
        self.subscriptions.insert(key, Place { address, mode, index });
        self.by_consumer.entry(consumer).or_default().push(subscription);
        Ok(())
    }

    /// Runs `change` on one subscriber's credit (if the subscription still exists), then
    /// delivers what that releases: the subscriber's own backlog (multicast), right here, or
    /// the anycast queue. No other multicast subscriber is looked at. Returns the address and
    /// what `change` returned.
    fn change_credit<R>(
        &mut self,
        consumer: ConnRef,
        subscription: SubscriptionId,
        now_ms: u64,
        out: &mut Vec<Outgoing>,
        change: impl FnOnce(&mut Subscriber) -> R,
    ) -> Option<(Bytes, R)> {
        let ack_deadline = (self.limits.ack_timeout_ms > 0).then(|| now_ms + self.limits.ack_timeout_ms);
        let delivered = out.len();
        let (address, mode, changed) = self
            .change_subscriber(consumer, subscription, |subscriber, mode, held_from| {
                let changed = change(subscriber);
                if mode == DeliveryMode::Multicast {
                    drain_backlog(subscriber, ack_deadline, held_from, now_ms, out);
                }
                (mode, changed)
            })
            .map(|(address, (mode, changed))| (address, mode, changed))?;
        self.deadline_added |= ack_deadline.is_some() && out.len() > delivered;
        if mode == DeliveryMode::Anycast {
            self.dispatch(&address, Deliverable::AnycastQueue, now_ms, out);
        }
        Some((address, changed))
    }

    /// Runs `change` on one subscriber (if it still exists), with its mode and the lowest id
    /// of its address held for the log (see `Address::held_from`), and returns its address and what `change`
    /// returned; `None` if the subscription is gone (unsubscribed, or ended).
    fn change_subscriber<R>(
        &mut self,
        consumer: ConnRef,
        subscription: SubscriptionId,
        change: impl FnOnce(&mut Subscriber, DeliveryMode, Option<MessageId>) -> R,
    ) -> Option<(Bytes, R)> {
        let key = (consumer, subscription);
        let place = self.subscriptions.get(&key)?;
        let state = self.addresses.get_mut(&place.address)?;
        let held_from = state.held_from(self.durable_lsn);
        let subscriber = state.subscriber_at(place, key)?;
        Some((place.address.clone(), change(subscriber, place.mode, held_from)))
    }

    fn remove_subscription(
        &mut self,
        consumer: ConnRef,
        subscription: SubscriptionId,
        now_ms: u64,
        out: &mut Vec<Outgoing>,
    ) {
        let key = (consumer, subscription);
        let Some(Place { address, mode, index }) = self.subscriptions.remove(&key) else { return };
        let Some(state) = self.addresses.get_mut(&address) else { return };
        debug_assert!(state.subscribers_mut(mode).get(index).is_some_and(|s| s.key() == key));
        let subscriber = remove_subscriber(state, &mut self.subscriptions, mode, index);
        if mode == DeliveryMode::Anycast {
            if state.next_anycast >= state.anycast.len() {
                state.next_anycast = 0;
            }
            // Unacknowledged anycast messages go back to the front of the queue, oldest first,
            // marked redelivered (or to the dead-letter address after max_deliveries).
            for queued in subscriber.unacked.into_oldest_first().rev() {
                self.give_back(&address, key, DeliveryMode::Anycast, queued);
            }
        }
        self.dispatch(&address, Deliverable::Everything, now_ms, out);
        if self.addresses.get(&address).is_some_and(Address::is_idle) {
            self.addresses.remove(&address);
        }
    }

    /// Delivers to subscribers with credit what `deliverable` says may have become
    /// deliverable: backlogs, the anycast queue, or both.
    fn dispatch(&mut self, address: &Bytes, deliverable: Deliverable, now_ms: u64, out: &mut Vec<Outgoing>) {
        let low_watermark = self.limits.max_queued_messages as usize / 4;
        let Some(state) = self.addresses.get_mut(address) else { return };
        let held_from = state.held_from(self.durable_lsn);
        let ack_deadline = (self.limits.ack_timeout_ms > 0).then(|| now_ms + self.limits.ack_timeout_ms);
        let delivered = out.len();
        match deliverable {
            Deliverable::Everything => {
                for subscriber in state.multicast.iter_mut() {
                    drain_backlog(subscriber, ack_deadline, held_from, now_ms, out);
                }
            }
            Deliverable::AnycastQueue => {}
            Deliverable::Backlog(key) => {
                let found = self.subscriptions.get(&key).and_then(|place| state.subscriber_at(place, key));
                if let Some(subscriber) = found {
                    drain_backlog(subscriber, ack_deadline, held_from, now_ms, out);
                }
                self.deadline_added |= ack_deadline.is_some() && out.len() > delivered;
                // Nothing else changed: the queue and the held answers are as they were.
                return;
            }
        }
        let queued_before = state.queued_bytes;
        let mut settled = Vec::new();
        Self::deliver_queue(state, ack_deadline, held_from, now_ms, out, &mut settled);
        // Wrapping below zero would leave the memory budget refusing (or admitting) every
        // publish for good: stop loudly instead.
        self.queued_bytes = self
            .queued_bytes
            .checked_sub(queued_before - state.queued_bytes)
            .expect("the shard's queued bytes include every address's");
        for queued in settled {
            self.settle(address, &queued.message, queued.id);
        }
        let Some(state) = self.addresses.get_mut(address) else { return };
        self.deadline_added |= ack_deadline.is_some() && out.len() > delivered;
        Self::release_held_answers(state, low_watermark, out);
    }

    /// Delivers the anycast queue, round robin, as far as credit allows and up to the first
    /// message held for the log (`held_from`: see `Address::held_from`); auto-ack deliveries
    /// and expired messages are done with and go to `settled` (for the log).
    fn deliver_queue(
        state: &mut Address,
        ack_deadline: Option<u64>,
        held_from: Option<MessageId>,
        now_ms: u64,
        out: &mut Vec<Outgoing>,
        settled: &mut Vec<Queued>,
    ) {
        let subscriber_count = state.anycast.len();
        if subscriber_count == 0 {
            return;
        }
        while let Some(front) = state.queue.front() {
            if held_from.is_some_and(|held| front.id >= held) {
                break;
            }
            // Next subscriber with credit, round robin from where the last delivery left off.
            let Some(offset) = (0..subscriber_count)
                .find(|offset| state.anycast[(state.next_anycast + offset) % subscriber_count].has_credit())
            else {
                break;
            };
            let index = (state.next_anycast + offset) % subscriber_count;
            let queued = state.queue.pop_front().expect("queue is not empty");
            state.queued_bytes -= queued.message.body.len();
            if is_expired(&queued, now_ms) {
                settled.push(queued);
                continue;
            }
            state.next_anycast = (index + 1) % subscriber_count;
            let subscriber = &mut state.anycast[index];
            if subscriber.ack_mode == AckMode::Auto {
                settled.push(queued.clone());
            }
            let delivered = deliver(subscriber, queued, ack_deadline);
            push_delivery(out, subscriber, delivered);
        }
    }

    pub fn shard(&self) -> ShardId {
        self.shard
    }
}

fn is_expired(queued: &Queued, now_ms: u64) -> bool {
    is_expired_at(queued.message.expires_at_ms, now_ms)
}

fn is_expired_at(expires_at_ms: u64, now_ms: u64) -> bool {
    expires_at_ms != 0 && expires_at_ms <= now_ms
}

/// Compacts a message that is going to wait (see [`StoredMessage::compact`]): in place when
/// nothing else shares it, as a compacted copy otherwise.
/// Creates the state of a new address. Its key is a copy of `name`: a name usually is a slice
/// of a client's read buffer (up to 64 KiB), which the key must not keep alive for as long as
/// the address lives.
fn new_address<'a>(addresses: &'a mut FastMap<Bytes, Address>, name: &Bytes) -> &'a mut Address {
    addresses.entry(Bytes::copy_from_slice(name)).or_default()
}

fn compact_to_wait(arena: &mut CompactionArena, message: &mut SharedMessage) {
    match std::sync::Arc::get_mut(message) {
        Some(only_reference) => only_reference.compact(arena),
        None => {
            let mut copy = StoredMessage::clone(message);
            copy.compact(arena);
            *message = std::sync::Arc::new(copy);
        }
    }
}

/// Policy: a multicast subscriber that falls `max_queued_messages` behind is ended on its own
/// (`slow` holds indexes into `state.multicast`, ascending); the publisher and the other
/// subscribers are not slowed by it.
fn end_slow_subscribers(
    state: &mut Address,
    address: &[u8],
    slow: &[usize],
    subscriptions: &mut Places,
    out: &mut Vec<Outgoing>,
) {
    // Descending, so that the subscriber moved into a freed index is never one still to end.
    debug_assert!(slow.windows(2).all(|pair| pair[0] < pair[1]));
    for &index in slow.iter().rev() {
        let subscriber = remove_subscriber(state, subscriptions, DeliveryMode::Multicast, index);
        subscriptions.remove(&subscriber.key());
        let refusal = Refusal::new(
            ErrorCode::Overloaded,
            format!(
                "subscription {} to \"{}\" fell {} messages behind (max_queued_messages) and was \
                 ended; acknowledge faster or raise its credit, then subscribe again",
                subscriber.subscription.0,
                String::from_utf8_lossy(address),
                subscriber.backlog.len()
            ),
        );
        out.push((
            subscriber.consumer.shard,
            ConnCommand::SubscriptionEnded {
                consumer: subscriber.consumer.conn,
                subscription: subscriber.subscription,
                refusal,
            },
        ));
    }
}

/// Delivers what a multicast subscriber's backlog holds, as far as its credit allows and up to
/// the first message held for the log (`held_from`: see `Address::held_from`), in one command;
/// expired messages are dropped on the way.
fn drain_backlog(
    subscriber: &mut Subscriber,
    ack_deadline: Option<u64>,
    held_from: Option<MessageId>,
    now_ms: u64,
    out: &mut Vec<Outgoing>,
) {
    let mut deliveries = Deliveries::new();
    while subscriber.has_credit() {
        if held_from.is_some_and(|held| subscriber.backlog.front().is_some_and(|queued| queued.id >= held)) {
            break;
        }
        let Some(queued) = subscriber.backlog.pop_front() else { break };
        if is_expired(&queued, now_ms) {
            continue;
        }
        deliveries.push(deliver(subscriber, queued, ack_deadline));
    }
    send_deliveries(out, subscriber, deliveries);
}

/// Counts a delivery against the subscriber's credit and, in client ack mode, keeps it until
/// it is acknowledged (with its ack deadline, if there is an ack timeout).
fn deliver(subscriber: &mut Subscriber, mut queued: Queued, ack_deadline: Option<u64>) -> Delivered {
    assert!(
        subscriber.has_credit(),
        "delivery without credit: {} in flight, credit {}",
        subscriber.in_flight,
        subscriber.credit
    );
    subscriber.in_flight += 1;
    queued.deliveries += 1;
    let delivered =
        Delivered { message_id: queued.id, message: queued.message.clone(), redelivered: queued.redelivered };
    if subscriber.ack_mode == AckMode::Client {
        if let Some(deadline) = ack_deadline {
            subscriber.deadlines.push_back((deadline, queued.id));
        }
        subscriber.unacked.insert(queued);
    }
    delivered
}

/// Sends one delivery to `subscriber`, joining the command before it when that one is for the
/// same subscription (so consecutive deliveries to one subscriber travel together).
fn push_delivery(out: &mut Vec<Outgoing>, subscriber: &Subscriber, delivered: Delivered) {
    if let Some((shard, ConnCommand::Deliver { consumer, subscription, deliveries })) = out.last_mut() {
        if (*shard, *consumer, *subscription)
            == (subscriber.consumer.shard, subscriber.consumer.conn, subscriber.subscription)
        {
            deliveries.push(delivered);
            return;
        }
    }
    send_deliveries(out, subscriber, smallvec::smallvec![delivered]);
}

/// Sends `deliveries` (oldest first) to `subscriber` as one command; nothing if empty.
fn send_deliveries(out: &mut Vec<Outgoing>, subscriber: &Subscriber, deliveries: Deliveries) {
    if deliveries.is_empty() {
        return;
    }
    out.push((
        subscriber.consumer.shard,
        ConnCommand::Deliver { consumer: subscriber.consumer.conn, subscription: subscriber.subscription, deliveries },
    ));
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::broker::{ConnId, StoredMessage};
    use crate::mbws::Properties;

    const LIMITS: AddressLimits = AddressLimits {
        max_queued_messages: 3,
        max_credit: 100,
        max_deliveries: 0,
        ack_timeout_ms: 0,
        shard_count: 1,
        max_queued_bytes: 1 << 20,
        memory_budget_bytes: 1 << 30,
        max_frame_bytes: 1 << 20,
    };

    fn conn(index: u32) -> ConnRef {
        ConnRef { shard: ShardId(0), conn: ConnId { index, generation: 0 } }
    }

    fn message(address: &str, body: &str) -> SharedMessage {
        Arc::new(StoredMessage {
            address: Bytes::copy_from_slice(address.as_bytes()),
            durable: false,
            expires_at_ms: 0,
            properties: Properties::default(),
            body: Bytes::copy_from_slice(body.as_bytes()),
            body_is_text: true,
        })
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
            .map(|(consumer, delivery)| (consumer, String::from_utf8_lossy(&delivery.message.body).into_owned()))
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
        out.iter().filter(|(_, c)| matches!(c, ConnCommand::PublishDone { outcome: Ok(()), .. })).count()
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

    #[test]
    fn only_messages_that_wait_are_compacted() {
        let mut table = AddressTable::new(ShardId(0), LIMITS);
        let mut out = Vec::new();
        subscribe(&mut table, 1, DeliveryMode::Anycast, 1, &mut out);
        out.clear();
        let first = message("a", "delivered at once");
        let second = message("a", "has to wait");
        let (first_body, second_body) = (first.body.as_ptr(), second.body.as_ptr());
        table.handle(AddressCommand::Publish { publisher: conn(9), seq: 1, message: first }, 0, &mut out);
        table.handle(AddressCommand::Publish { publisher: conn(9), seq: 2, message: second }, 0, &mut out);
        let bodies: Vec<_> = delivered(&out).into_iter().map(|(_, delivery)| delivery.message.body.as_ptr()).collect();
        assert_eq!(bodies, vec![first_body], "the first goes out zero-copy");
        out.clear();
        ack(&mut table, 1, &[1], &mut out);
        let waited = deliveries(&out);
        assert_eq!(waited, vec![(1, "has to wait".to_string())]);
        let pointer = delivered(&out)[0].1.message.body.as_ptr();
        assert_ne!(pointer, second_body, "the waiting one no longer pins the publisher's buffer");
    }

    /// Publishes of `bodies` to "a" by one publisher, numbered 1, 2, 3...
    fn batch_of(bodies: &[&str]) -> Vec<Publication> {
        bodies
            .iter()
            .enumerate()
            .map(|(index, body)| Publication {
                publisher: conn(99),
                seq: index as u64 + 1,
                message: message("a", body),
            })
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
        let originals: Vec<*const u8> = batch.iter().map(|publication| publication.message.body.as_ptr()).collect();
        table.publish_batch(&mut batch, 0, &mut out);
        assert_eq!(deliveries(&out), vec![(1, "m1".to_string()), (1, "m2".to_string())]);
        let sent: Vec<*const u8> = delivered(&out).iter().map(|(_, delivery)| delivery.message.body.as_ptr()).collect();
        assert_eq!(sent, originals[..2], "messages delivered at once are not compacted");
        assert_eq!(table.stats(b"a").queued, 3);
        // The answers are decided after the batch's dispatch: the queue is above half of
        // max_queued_messages, so the accepted ones are held back; the refused one is not.
        let answers = |out: &[Outgoing]| -> Vec<(u64, bool)> {
            out.iter()
                .filter_map(|(_, command)| match command {
                    ConnCommand::PublishDone { seq, outcome, .. } => Some((*seq, outcome.is_ok())),
                    _ => None,
                })
                .collect()
        };
        assert_eq!(answers(&out), vec![(6, false)]);
        assert!(refusal_reason(&out).unwrap().contains("max_queued_messages"));
        out.clear();
        ack(&mut table, 1, &[1, 2], &mut out);
        assert_eq!(deliveries(&out), vec![(1, "m3".to_string()), (1, "m4".to_string())]);
        let waited = delivered(&out)[0].1.message.body.as_ptr();
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
        // The name and body are slices of one large "read buffer", as decoded frames are.
        let read_buffer = Bytes::from(vec![b'a'; 64 * 1024]);
        let message = Arc::new(StoredMessage {
            address: read_buffer.slice(0..1),
            durable: false,
            expires_at_ms: 0,
            properties: Properties::default(),
            body: read_buffer.slice(1..9),
            body_is_text: false,
        });
        table.handle(AddressCommand::Publish { publisher: conn(9), seq: 1, message }, 0, &mut out);
        assert_eq!(table.stats(b"a").queued, 1);
        let buffer = read_buffer.as_ptr_range();
        let key = table.addresses.keys().next().expect("the address exists").as_ptr();
        assert!(!buffer.contains(&key), "the address's key is a copy of its name");
        let queued = table.addresses[&Bytes::from_static(b"a")].queue[0].message.clone();
        assert!(!buffer.contains(&queued.body.as_ptr()), "the waiting message was compacted");
        assert!(!buffer.contains(&queued.address.as_ptr()));
    }

    fn ack(table: &mut AddressTable, consumer: u32, ids: &[u64], out: &mut Vec<Outgoing>) {
        let messages = ids.iter().map(|&id| MessageId(id)).collect();
        table.handle(
            AddressCommand::Ack { consumer: conn(consumer), subscription: SubscriptionId(1), messages },
            0,
            out,
        );
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
        let answers: Vec<u64> = out
            .iter()
            .filter_map(|(_, c)| match c {
                ConnCommand::PublishDone { seq, outcome: Ok(()), .. } => Some(*seq),
                _ => None,
            })
            .collect();
        assert_eq!(answers, [1, 2, 3, 4, 5]);
        assert!(matches!(out.last(), Some((_, ConnCommand::PublishDone { seq: 5, .. }))));
        // The rest waits in the slow subscriber's backlog and follows, in order, as it acknowledges.
        out.clear();
        ack(&mut table, 2, &[1, 2], &mut out);
        assert_eq!(deliveries(&out), [(2, "m2".to_string()), (2, "m3".to_string())]);
        assert_eq!(deliver_commands(&out), vec![(2, 2)]);
        out.clear();
        ack(&mut table, 2, &[3, 4], &mut out);
        assert_eq!(deliveries(&out), [(2, "m4".to_string())]);
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
        Arc::get_mut(&mut expiring).unwrap().expires_at_ms = 5;
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
            table.handle(
                AddressCommand::Unsubscribe { consumer: conn(consumer), subscription: SubscriptionId(1) },
                0,
                out,
            )
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
        let queued =
            |id: u64| Queued { id: MessageId(id), message: message("a", "m"), redelivered: false, deliveries: 1 };
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
        Arc::get_mut(&mut expiring).unwrap().expires_at_ms = 5;
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
        Arc::get_mut(&mut durable).unwrap().durable = true;
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
}
