//! Subscribers and the subscription index. A SUBSCRIBE adds a [`Subscriber`] to its address's
//! anycast or multicast list and records its `Place` (address, mode, index) so that an ACK,
//! NACK or credit change finds it in O(1); the index stays right as subscribers leave
//! (unsubscribe, consumer gone, or ended for falling `max_queued_messages` behind). A
//! subscriber holds its credit, its unacknowledged deliveries (sorted by id) with their ack
//! deadlines, and (multicast) its cursor in its address's multicast log and its front of
//! redeliveries (`multicast`). Leaving, an anycast subscriber gives its unacknowledged
//! messages back to the queue.

use std::collections::VecDeque;

use bytes::Bytes;

use super::dispatch::{drain_backlog, Deliverable};
use super::{new_address, Address, AddressTable, Outgoing, Queued};
use crate::broker::sorted_ring::{Keyed, SortedRing};
#[cfg(doc)]
use crate::broker::StoredMessage;
use crate::broker::{AckedMessages, ConnCommand, ConnRef, FastMap, MessageId, Refusal, SubscriptionId};
use crate::mbws::{AckMode, DeliveryMode, ErrorCode};

/// A subscriber's unacknowledged deliveries, sorted by message id (a [`SortedRing`] of
/// [`Queued`] entries, keyed by the id each holds, not by a copy of it): ids are handed out in increasing order, so an insert is nearly always at the back
/// and a (cumulative) ACK takes from the front; a redelivery (an older id) goes in its place.
/// At most `credit` entries.
#[derive(Debug, Default)]
pub(super) struct UnackedMessages {
    entries: SortedRing<Queued>,
}

impl UnackedMessages {
    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Records a delivery (in its place: a redelivery may be older than some recorded).
    /// Inlined: it runs once per client-ack delivery.
    #[inline(always)]
    pub(super) fn insert(&mut self, queued: Queued) {
        self.entries.insert(queued);
    }

    /// Records deliveries of messages newer than every one recorded, in increasing id order
    /// (a stretch of the multicast log, or a run of new messages): appended as a run
    /// ([`SortedRing::extend_newest`]).
    #[inline(always)]
    pub(super) fn extend_newest(&mut self, queued: impl Iterator<Item = Queued>) {
        self.entries.extend_newest(queued);
    }

    pub(super) fn contains(&self, id: MessageId) -> bool {
        self.entries.contains(id.0)
    }

    pub(super) fn remove(&mut self, id: MessageId) -> Option<Queued> {
        self.entries.remove(id.0)
    }

    /// Takes the entries of `ids` when they are the oldest recorded, in order (a cumulative
    /// ACK: [`SortedRing::take_front_run`]), for the caller to go through; `None`, and nothing
    /// taken, otherwise (then [`UnackedMessages::remove_all`]).
    #[inline]
    pub(super) fn take_oldest(
        &mut self,
        ids: &AckedMessages,
    ) -> Option<std::collections::vec_deque::Drain<'_, Queued>> {
        match ids {
            AckedMessages::Run { first, count } => self.entries.take_front_run(first.0, *count as usize),
            AckedMessages::List(_) => None,
        }
    }

    /// Takes the entries of `ids` (unknown ones skipped) and hands each to `each`: an ACK of
    /// the oldest deliveries in order costs a comparison per id
    /// ([`SortedRing::remove_keys`]), or two for a run of consecutive ids
    /// ([`SortedRing::remove_key_run`]).
    pub(super) fn remove_all(&mut self, ids: &AckedMessages, each: impl FnMut(Queued)) {
        match ids {
            AckedMessages::Run { first, count } => self.entries.remove_key_run(first.0, *count as usize, each),
            AckedMessages::List(ids) => self.entries.remove_keys(ids.iter().map(|id| id.0), each),
        }
    }

    pub(super) fn into_oldest_first(self) -> impl DoubleEndedIterator<Item = Queued> {
        self.entries.into_values()
    }
}

impl Keyed for Queued {
    #[inline]
    fn key(&self) -> u64 {
        self.id.0
    }
}

#[derive(Debug)]
pub(super) struct Subscriber {
    pub(super) consumer: ConnRef,
    pub(super) subscription: SubscriptionId,
    pub(super) ack_mode: AckMode,
    pub(super) credit: u32,
    /// Deliveries not yet acknowledged (client ack) or not yet written (auto ack).
    pub(super) in_flight: u32,
    /// Auto ack: bytes of the deliveries not yet written ([`StoredMessage::held_bytes`]
    /// each), given back with their credit. No more deliveries once it reaches
    /// `max_unwritten_bytes`: a consumer that never reads holds that much, not its credit's
    /// worth of messages.
    pub(super) unwritten_bytes: u64,
    /// The address table's `max_unwritten_bytes` when the subscription was made.
    pub(super) max_unwritten_bytes: u64,
    /// Deliveries made to this subscriber (for the admin API's rates).
    pub(super) delivered: u64,
    /// Client-ack deliveries not yet acknowledged, kept for NACK and (anycast) for requeueing
    /// when the subscription ends. At most `credit` entries.
    pub(super) unacked: UnackedMessages,
    /// Ack deadlines of client-ack deliveries, in delivery order (so in deadline order).
    /// Entries already acknowledged are dropped lazily; kept under 2 x `unacked` + 16.
    pub(super) deadlines: VecDeque<(u64, MessageId)>,
    /// Multicast only: the position in its address's multicast log of the next message it
    /// gets from there (`multicast`).
    pub(super) cursor: u64,
    /// Multicast only: redeliveries for this subscriber alone (given back after an ack
    /// timeout or a NACK), delivered before anything of the log.
    pub(super) front: VecDeque<Queued>,
}

impl Subscriber {
    pub(super) fn key(&self) -> (ConnRef, SubscriptionId) {
        (self.consumer, self.subscription)
    }

    /// Whether one more delivery may be handed out: credit left, and (auto ack) unwritten
    /// bytes under the bound. A subscriber with nothing unwritten always takes one, however
    /// large (so a message larger than the bound is delivered, alone).
    pub(super) fn has_credit(&self) -> bool {
        self.in_flight < self.credit && self.unwritten_bytes < self.max_unwritten_bytes
    }

    /// How many deliveries the subscriber takes at once, going by credit (0 if its unwritten
    /// bytes are at their bound; an estimate otherwise, since the bytes bound may stop it
    /// earlier).
    pub(super) fn credit_left(&self) -> u32 {
        if self.unwritten_bytes >= self.max_unwritten_bytes {
            return 0;
        }
        self.credit.saturating_sub(self.in_flight)
    }

    /// How many of `messages` (in order) the subscriber takes at once: its credit left, or
    /// fewer where the unwritten bytes reach their bound first.
    pub(super) fn takes_at_once(&self, messages: &[Queued], batch_bytes: u64) -> usize {
        let credit_left = self.credit_left() as usize;
        if self.ack_mode == AckMode::Client || self.unwritten_bytes + batch_bytes < self.max_unwritten_bytes {
            return credit_left;
        }
        let mut unwritten_bytes = self.unwritten_bytes;
        let within_bytes = messages
            .iter()
            .take_while(|queued| {
                let takes = unwritten_bytes < self.max_unwritten_bytes;
                unwritten_bytes += queued.message.held_bytes() as u64;
                takes
            })
            .count();
        within_bytes.min(credit_left)
    }

    /// Drops deadlines of settled deliveries: from the front, and all of them when the list has
    /// grown to twice what is unacknowledged (a stuck delivery at the front).
    pub(super) fn trim_deadlines(&mut self) {
        while self.deadlines.front().is_some_and(|(_, id)| !self.unacked.contains(*id)) {
            self.deadlines.pop_front();
        }
        if self.deadlines.len() > 2 * self.unacked.len() + 16 {
            let unacked = &self.unacked;
            self.deadlines.retain(|(_, id)| unacked.contains(*id));
        }
    }
}

/// Where a subscription is: its address, and its index in that address's subscribers of its
/// mode. Invariant: `addresses[address]`'s anycast or multicast list holds the subscription
/// at `index` (kept by `subscribe` and `remove_subscriber`), so an ACK finds its subscriber
/// without walking the others.
#[derive(Debug, Clone)]
pub(super) struct Place {
    pub(super) address: Bytes,
    pub(super) mode: DeliveryMode,
    pub(super) index: usize,
}

pub(super) type Places = FastMap<(ConnRef, SubscriptionId), Place>;

/// Takes the subscriber at `index` of `mode` out of `state`, keeping the places of the others
/// right (the caller forgets the removed one's place). Anycast keeps its order (round robin);
/// multicast order means nothing, so the last subscriber takes the free index.
fn remove_subscriber(state: &mut Address, places: &mut Places, mode: DeliveryMode, index: usize) -> Subscriber {
    let removed = match mode {
        DeliveryMode::Anycast => state.anycast.remove(index),
        DeliveryMode::Multicast => state.multicast.swap_remove(index),
    };
    state.delivered_by_departed += removed.delivered;
    if mode == DeliveryMode::Multicast {
        state.multicast_log.left(removed.cursor, removed.front.len(), &state.multicast);
    }
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

impl AddressTable {
    pub(super) fn subscribe(
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
            unwritten_bytes: 0,
            max_unwritten_bytes: self.limits.max_unwritten_bytes as u64,
            delivered: 0,
            unacked: UnackedMessages::default(),
            deadlines: VecDeque::new(),
            cursor: 0,
            front: VecDeque::new(),
        };
        self.check_address_room(&address)?;
        let state = match self.addresses.get_mut(&address) {
            Some(state) => state,
            None => new_address(&mut self.addresses, &address),
        };
        let mut subscriber = subscriber;
        if mode == DeliveryMode::Multicast {
            subscriber.cursor = state.multicast_log.join();
        }
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
    pub(super) fn change_credit<R>(
        &mut self,
        consumer: ConnRef,
        subscription: SubscriptionId,
        now_ms: u64,
        out: &mut Vec<Outgoing>,
        change: impl FnOnce(&mut Subscriber) -> R,
    ) -> Option<(Bytes, R)> {
        let ack_deadline = (self.limits.ack_timeout_ms > 0).then(|| now_ms + self.limits.ack_timeout_ms);
        let delivered = out.len();
        let key = (consumer, subscription);
        let place = self.subscriptions.get(&key)?;
        let state = self.addresses.get_mut(&place.address)?;
        let held_from = state.held_from(self.durable_lsn);
        let changed = change(state.subscriber_at(place, key)?);
        if place.mode == DeliveryMode::Multicast {
            drain_backlog(state, place.index, ack_deadline, held_from, now_ms, out);
        }
        let (address, mode) = (place.address.clone(), place.mode);
        self.deadline_added |= ack_deadline.is_some() && out.len() > delivered;
        if mode == DeliveryMode::Anycast {
            self.dispatch(&address, Deliverable::AnycastQueue, now_ms, out);
        }
        Some((address, changed))
    }

    /// Runs `change` on one subscriber (if it still exists), with its mode and the lowest id
    /// of its address held for the log (see `Address::held_from`), and returns its address and what `change`
    /// returned; `None` if the subscription is gone (unsubscribed, or ended).
    pub(super) fn change_subscriber<R>(
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

    pub(super) fn remove_subscription(
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
}

/// Policy: a multicast subscriber that falls `max_queued_messages` behind is ended on its own
/// (`slow` holds indexes into `state.multicast`, ascending, each with how many messages it
/// fell behind); the publisher and the other subscribers are not slowed by it.
pub(super) fn end_slow_subscribers(
    state: &mut Address,
    address: &[u8],
    slow: &[(usize, usize)],
    subscriptions: &mut Places,
    out: &mut Vec<Outgoing>,
) {
    // Descending, so that the subscriber moved into a freed index is never one still to end.
    debug_assert!(slow.windows(2).all(|pair| pair[0].0 < pair[1].0));
    for &(index, behind) in slow.iter().rev() {
        let subscriber = remove_subscriber(state, subscriptions, DeliveryMode::Multicast, index);
        subscriptions.remove(&subscriber.key());
        let refusal = Refusal::new(
            ErrorCode::Overloaded,
            format!(
                "subscription {} to \"{}\" fell {} messages behind (max_queued_messages) and was \
                 ended; acknowledge faster or raise its credit, then subscribe again",
                subscriber.subscription.0,
                String::from_utf8_lossy(address),
                behind
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
