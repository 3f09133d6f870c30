//! The addresses one shard owns: queues, subscribers, credit, acknowledgement, redelivery.
//!
//! Routing rule (docs/PROTOCOL.md, "Addresses"): a published message goes to every multicast
//! subscription of its address, and to the address's anycast queue when the address has an
//! anycast subscriber or has no multicast subscriber at all. So a message nobody consumes yet
//! waits (bounded by `max_queued_messages`), and a pure publish/subscribe address never fills.
//!
//! Redelivery: a client-ack delivery that ends without acknowledgement (NACK with requeue, its
//! subscription or session ends, or `ack_timeout_ms` passes) goes back to the front of its
//! queue (anycast) or to its subscriber's backlog (multicast), marked redelivered. A message delivered
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
//!   grows only while `in_flight < credit`), nor (auto ack) more unwritten bytes than one
//!   delivery past `max_unwritten_bytes`: asserted at every delivery (once for a batch's
//!   share, `dispatch::deliver_run`), in release builds too;
//! - an anycast message is in exactly one place: the queue, or one subscriber's `unacked`
//!   (asserted in debug builds where a message goes back to the queue, and always where it
//!   enters an `unacked` ring, which refuses a key twice);
//! - the shard's `queued_bytes` is the sum of its addresses' (the memory budget is checked
//!   against it): asserted not to go below zero where deliveries take bytes out;
//! - a publish is refused once `max_queued_messages` wait in the address queue beyond what its
//!   subscribers' credit takes at once, and a multicast subscriber whose backlog reaches
//!   `max_queued_messages` is ended (so the shared multicast log, no longer than the longest
//!   backlog, stays within the bound too). Messages taken back from consumers (redelivery) and
//!   recovered at start-up go back to their queue regardless, so a queue can exceed the bound
//!   by what was in flight.
//!
//! Layout: this file holds the table's state ([`AddressTable`], the per-address `Address` and
//! its `Queued` messages), its public entry points ([`AddressTable::handle`] applies one
//! command) and the limits; the rest is split by responsibility, each an `impl AddressTable`
//! block or free functions over that state:
//! - `admission`: a publish enters: bounds, memory budget, held answers (backpressure),
//!   compaction of what will wait in a multicast backlog, and [`AddressTable::publish_batch`];
//! - `compaction`: messages that stay in an anycast queue stop holding their read buffer,
//!   on the timer's compaction tick ([`AddressTable::compact_waiting`]);
//! - `dispatch`: delivery to subscribers with credit: the anycast queue round robin, the
//!   multicast backlogs, and the credit check at every delivery;
//! - `multicast`: the multicast backlogs of an address: one shared log of messages and a
//!   cursor per subscriber, trimmed as the slowest passes, and each subscriber's front of
//!   redeliveries;
//! - `subscribers`: the subscribers and the subscription index (`Place`), subscribe, credit
//!   changes, unsubscribe, and ending slow multicast subscribers;
//! - `redelivery`: deliveries that end unacknowledged (ack deadlines, NACK, a subscription
//!   ending) go back to their queue or to the dead-letter address;
//! - `durable`: the durable log: message records, SETTLED records, id reservations, what is
//!   held for the log and released by [`AddressTable::durable_committed`], log failure, and
//!   recovery at start-up.

mod admission;
mod compaction;
mod declared;
mod dispatch;
mod durable;
mod inspect;
mod multicast;
mod redelivery;
mod subscribers;
#[cfg(test)]
mod tests;

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;

use bytes::Bytes;
use smallvec::SmallVec;

use super::{
    AddressCommand, CompactionArena, ConnCommand, ConnRef, FastMap, MessageId, Refusal, ShardId, SharedMessage,
    SubscriptionId,
};
use crate::mbws::{DeliveryMode, ErrorCode};
use crate::store::{DurableLog, Lsn};

pub use compaction::{COMPACTION_TICK_MS, MAX_UNCOMPACTED_RUNS};
pub use declared::{AddressSettings, Deleted, Routing};
use dispatch::Deliverable;
pub use durable::ID_RESERVATION_BLOCK;
pub use inspect::AddressInfo;
pub use redelivery::{DEAD_LETTER_HEADER_COUNT, DEAD_LETTER_PREFIX};
use subscribers::{Place, Places, Subscriber};

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
    /// Addresses this shard holds at most (its share of `--max-addresses`): a SEND or SUBSCRIBE
    /// that would create one more is refused with 4429.
    pub max_addresses: usize,
    /// The broker's `--max-addresses` and shard count, for the refusal's reason.
    pub max_addresses_total: usize,
    /// Bytes of auto-ack deliveries handed to one subscription and not yet written to its
    /// socket, past which it gets no more until they are (`--max-outbound-bytes`): what a
    /// consumer that never reads holds, per subscription, whatever its credit.
    pub max_unwritten_bytes: usize,
    /// At-most-once lead, in messages: an address with anycast subscribers that queues this many
    /// holds back the answers to unnumbered MBLWS SENDs (seq 0, no receipt wanted), and lets
    /// them go one per delivery while the queue without their messages is below the lead, so
    /// an MBLWS publisher stops at `max-inflight-sends` past the lead and is then read at its
    /// consumers' pace, as RECEIPTs pace an MBWS one, instead of running as far ahead as the
    /// queue's bound allows. Twice `--max-inflight-sends`: at half of it (session 7) the
    /// publisher went idle and busy in cycles of a few thousand messages and MBLWS ran 10-25%
    /// slower than MBWS (docs/PERFORMANCE.md, session 8); released all at once, at half the
    /// lead or below it, it still did (session 12). `publish_answer` and
    /// `release_held_answers` in `admission`.
    pub max_light_lead: u32,
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
            max_addresses: (config.max_addresses / shard_count.max(1)).max(1),
            max_addresses_total: config.max_addresses,
            max_unwritten_bytes: config.max_outbound_bytes,
            max_light_lead: light_lead(config.max_inflight_sends),
        }
    }
}

/// The at-most-once lead for a `--max-inflight-sends` of `max_inflight_sends`
/// ([`AddressLimits::max_light_lead`]).
pub fn light_lead(max_inflight_sends: u32) -> u32 {
    max_inflight_sends.saturating_mul(2).max(1)
}

/// The limits of a one-shard broker with the default configuration ([`Config::default`](crate::config::Config)).
impl Default for AddressLimits {
    fn default() -> Self {
        AddressLimits::from_config(&crate::config::Config::default(), 1)
    }
}

#[derive(Debug, Clone)]
struct Queued {
    id: MessageId,
    message: SharedMessage,
    redelivered: bool,
    /// Times this message has been handed to a consumer.
    deliveries: u32,
}

impl Queued {
    /// The delivery of this message, as a consumer gets it.
    fn delivered(&self) -> super::Delivered {
        super::Delivered { message_id: self.id, message: self.message.clone(), redelivered: self.redelivered }
    }
}

#[derive(Debug, Default)]
struct Address {
    queue: VecDeque<Queued>,
    anycast: Vec<Subscriber>,
    multicast: Vec<Subscriber>,
    /// The multicast subscribers' backlog: one log of messages shared by all, a cursor each
    /// (`multicast`). Empty without multicast subscribers.
    multicast_log: multicast::MulticastLog,
    /// Round-robin position among anycast subscribers.
    next_anycast: usize,
    /// Body bytes in `queue`.
    queued_bytes: usize,
    /// Publishes accepted while the queue was above its high watermark (or, unnumbered, at the
    /// at-most-once lead), whose answers are held back (see `AddressTable::publish_answer`), as
    /// runs of one publisher's SENDs. At most one held SEND per queued message.
    held_answers: admission::HeldAnswers,
    /// Set when an unnumbered MBLWS SEND began the holding (`max_light_lead`): one below the
    /// lead, the queue length (less the held answers' messages) at or below which held answers
    /// slide out one per delivery; `None`: all go at once at a quarter of the bound.
    held_release_at: Option<usize>,
    /// Messages waiting for the log: an entry (id, lsn) holds back every message of the
    /// address with that id or a higher one (so later ones keep their place behind it) until
    /// the log is durable up to `lsn` (the message's record, or the reservation of its id).
    /// Ids increase along the list. Empty on an address that never met the log.
    held_for_log: VecDeque<(MessageId, Lsn)>,
    /// The settings of a declared address (`declared`), which keep it while idle.
    declared: Option<Box<AddressSettings>>,
    /// Messages accepted into the address since it was created (for the admin API's rates).
    messages_in: u64,
    /// Deliveries made by subscribers that have left (those of the present ones are theirs).
    delivered_by_departed: u64,
    /// The back of `queue` that may still hold the buffers its messages arrived in.
    uncompacted: compaction::UncompactedTail,
}

impl Address {
    fn is_idle(&self) -> bool {
        self.queue.is_empty()
            && self.anycast.is_empty()
            && self.multicast.is_empty()
            && self.held_answers.is_empty()
            && self.declared.is_none()
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
    /// The wall clock (Unix ms) minus the broker's monotonic clock, taken when the log was
    /// attached: a durable message's expiry is logged in wall-clock time (it must outlive the
    /// process) without the table reading a clock.
    unix_offset_ms: u64,
    /// Answers to durable publishes, waiting for their record to be committed (Lsn order).
    durable_answers: VecDeque<(Lsn, ConnRef, u64)>,
    /// Addresses whose every message is durable: exact names, or prefixes ending in `*`.
    durable_addresses: Vec<Bytes>,
    /// Where messages that wait are copied to (see `StoredMessage::compact`).
    arena: CompactionArena,
    /// Addresses whose queue holds messages not compacted yet (`compaction`).
    to_compact: Vec<Bytes>,
    /// When the timer next compacts what waits (`compaction`); `None` while nothing waits
    /// uncompacted.
    compaction_due_at_ms: Option<u64>,
    /// A compaction tick scheduled since the core last looked (it wakes the timer for it).
    compaction_scheduled: Option<u64>,
}

impl AddressTable {
    /// A reload's `--max-outbound-bytes`: the bound of unwritten auto-ack bytes of the
    /// subscriptions made from now on (those made before keep theirs).
    pub fn set_max_unwritten_bytes(&mut self, max_unwritten_bytes: usize) {
        self.limits.max_unwritten_bytes = max_unwritten_bytes;
    }

    /// The at-most-once lead after a reload of `--max-inflight-sends` ([`light_lead`]).
    pub fn set_max_light_lead(&mut self, max_light_lead: u32) {
        self.limits.max_light_lead = max_light_lead;
    }

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
            unix_offset_ms: 0,
            durable_answers: VecDeque::new(),
            durable_addresses: Vec::new(),
            arena: CompactionArena::default(),
            to_compact: Vec::new(),
            compaction_due_at_ms: None,
            compaction_scheduled: None,
        }
    }

    /// Body bytes waiting in this shard's queues (for tests and metrics).
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    /// Messages waiting in this shard's anycast queues. Walks every address: for a periodic
    /// report, not for the message path.
    pub fn queued_messages(&self) -> usize {
        self.addresses.values().map(|address| address.queue.len()).sum()
    }

    /// True once after deliveries with ack deadlines were made.
    pub fn take_deadline_added(&mut self) -> bool {
        std::mem::take(&mut self.deadline_added)
    }

    /// Commands this table produced for other address owners since the last call.
    pub fn take_forwards(&mut self) -> Vec<(ShardId, AddressCommand)> {
        std::mem::take(&mut self.forwards)
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
                let address = message.address_bytes();
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
                    // The usual ACK: the oldest deliveries, in order, gone through in this loop
                    // (a call of a closure per message otherwise).
                    let in_order = match subscriber.unacked.take_oldest(&messages) {
                        Some(acked) => {
                            subscriber.in_flight -= acked.len() as u32;
                            for queued in acked {
                                if logged(&queued) {
                                    to_settle.push(queued);
                                }
                            }
                            true
                        }
                        None => false,
                    };
                    if !in_order {
                        // An unknown id (already acknowledged, requeued or expired) changes nothing.
                        let in_flight = &mut subscriber.in_flight;
                        subscriber.unacked.remove_all(&messages, |queued| {
                            *in_flight -= 1;
                            if logged(&queued) {
                                to_settle.push(queued);
                            }
                        });
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
            AddressCommand::ReturnCredit { consumer, subscription, count, bytes } => {
                self.change_credit(consumer, subscription, now_ms, out, |subscriber| {
                    subscriber.in_flight = subscriber.in_flight.saturating_sub(count);
                    subscriber.unwritten_bytes = subscriber.unwritten_bytes.saturating_sub(bytes);
                });
            }
            AddressCommand::ConsumerGone { consumer } => {
                for subscription in self.by_consumer.remove(&consumer).unwrap_or_default() {
                    self.remove_subscription(consumer, subscription, now_ms, out);
                }
            }
        }
    }

    /// The multicast subscribers of `address` on this shard.
    pub fn multicast_subscriber_count(&self, address: &[u8]) -> usize {
        self.addresses.get(address).map_or(0, |state| state.multicast.len())
    }

    pub fn shard(&self) -> ShardId {
        self.shard
    }

    /// Whether address `name` exists or one more address fits in this shard's share of
    /// `--max-addresses`; `Err` is the refusal (4429) of the SEND or SUBSCRIBE that would
    /// create it.
    pub(super) fn check_address_room(&self, name: &[u8]) -> Result<(), Refusal> {
        if self.addresses.len() < self.limits.max_addresses || self.addresses.contains_key(name) {
            return Ok(());
        }
        Err(Refusal::new(
            ErrorCode::Overloaded,
            format!(
                "address \"{}\" would be a new address, and its shard holds {} already (max-addresses {} split \
                 over {} shards); use an existing address, or ask the broker's operator to raise --max-addresses",
                String::from_utf8_lossy(&name[..name.len().min(64)]),
                self.addresses.len(),
                self.limits.max_addresses_total,
                self.limits.shard_count
            ),
        ))
    }
}

/// Creates the state of a new address. Its key is a copy of `name`: a name usually is a slice
/// of a client's read buffer (up to 64 KiB), which the key must not keep alive for as long as
/// the address lives.
fn new_address<'a>(addresses: &'a mut FastMap<Bytes, Address>, name: &Bytes) -> &'a mut Address {
    addresses.entry(Bytes::copy_from_slice(name)).or_default()
}
