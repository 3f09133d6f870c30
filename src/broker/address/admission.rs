//! Admission: how a published message enters the table. A SEND is checked against the
//! address's bounds (`max_queued_messages`, `max_queued_bytes`), the shard's memory budget and
//! the durable log's health, refused with a [`Refusal`] or given an id and put in the anycast
//! queue and the address's multicast log (compacted first if it will wait there: once, for
//! every subscriber). Its answer goes
//! out at once, is held back while the queue is long (backpressure), or waits for the log.
//! [`AddressTable::publish_batch`] takes a run of SENDs to one address, with a fast path that
//! hands a pure multicast address's batch straight to its subscribers.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::planted::{planted, Bug};
use bytes::Bytes;
use smallvec::SmallVec;

use super::compaction::compact_to_wait;
use super::dispatch::{deliver_run, is_expired_at, send_deliveries, Deliverable};
use super::multicast::{lag, MulticastLog};
use super::subscribers::{end_slow_subscribers, Subscriber};
use super::{Address, AddressLimits, AddressTable, Outgoing, Publication, Queued, MAX_PUBLISH_BATCH};
use crate::broker::{ConnCommand, ConnRef, Delivered, Deliveries, Refusal, SharedMessage};
use crate::mbws::{AckMode, ErrorCode};
use crate::store::Lsn;

impl AddressTable {
    /// Publishes consecutive SENDs to one address (all of `batch`, which is left empty) and
    /// answers each. On a pure multicast address (multicast subscribers only, nothing queued
    /// or held) every subscriber gets its share of the whole batch at once: one `Deliver`
    /// command per subscriber instead of one per message and subscriber, no detour through the
    /// backlog for a subscriber with credit, and one lookup of the address for the batch. Any
    /// other address takes the publishes one at a time, as [`AddressCommand::Publish`](crate::broker::AddressCommand::Publish).
    pub fn publish_batch(&mut self, batch: &mut Vec<Publication>, now_ms: u64, out: &mut Vec<Outgoing>) {
        debug_assert!(batch.len() <= MAX_PUBLISH_BATCH, "batches are bounded by MAX_PUBLISH_BATCH");
        let Some(first) = batch.first() else { return };
        debug_assert!(batch.iter().all(|publication| publication.message.address() == first.message.address()));
        let address_name = first.message.address_bytes();
        if !self.takes_at_once(&address_name, batch.len()) {
            // Queued one by one (each admitted or refused against the bounds as they stand),
            // delivered in one dispatch, answered in order: what publishing them one at a time
            // does, without a dispatch and an answer lookup per message.
            // The address is looked up once for the batch, not once per message and step.
            let mut taken = self.take_address(&address_name);
            let room = if taken.created { self.check_address_room(&address_name) } else { Ok(()) };
            let mut bounds = QueueBounds::of(&taken.state, &self.limits);
            // The answers are gathered as the messages are queued (runs of accepted SENDs, the
            // rest one by one) and given after the dispatch, which decides whether they are
            // held: no list of one outcome per message in between.
            let mut answers = BatchAnswers::default();
            // The address's room is judged once for the batch, not once per message.
            match &room {
                Ok(()) => {
                    for Publication { publisher, seq, message } in batch.drain(..) {
                        let outcome = self.enqueue(&mut taken.state, &taken.key, &mut bounds, message, now_ms, out);
                        answers.note(publisher, seq, outcome);
                    }
                }
                Err(refusal) => {
                    for Publication { publisher, seq, .. } in batch.drain(..) {
                        answers.note(publisher, seq, Err(refusal.clone()));
                    }
                }
            }
            self.put_back_address(taken);
            self.dispatch(&address_name, Deliverable::Everything, now_ms, out);
            let state = self.addresses.get_mut(&address_name);
            answers.answer(state, &self.limits, &mut self.durable_answers, out);
            return;
        }
        let mut answers = Vec::with_capacity(batch.len());
        let mut accepted = Vec::with_capacity(batch.len());
        for Publication { publisher, seq, message } in batch.drain(..) {
            answers.push((publisher, seq, self.admit_at_once(message, now_ms, &mut accepted)));
        }
        self.deliver_at_once(&address_name, accepted, now_ms, out);
        for (publisher, seq, outcome) in answers {
            match outcome {
                Ok(()) => push_accepted(out, publisher, seq),
                Err(refusal) => out.push((
                    publisher.shard,
                    ConnCommand::PublishDone { publisher: publisher.conn, seq, outcome: Err(refusal) },
                )),
            }
        }
    }

    /// Fans out a run of messages that a cluster node relayed from the address's owner node
    /// (`crate::cluster::view`, "fed" addresses) to the multicast subscribers of their address
    /// here, in order: on a pure multicast address as one batch (one `Deliver` per subscriber
    /// for the run, as [`AddressTable::publish_batch`]), otherwise one at a time. Each
    /// subscriber's credit, backlog bound (a slow one is ended, 4429) and binding apply as for a
    /// local publish, but nothing is queued for anycast and no publisher is answered: a refused
    /// message (the memory budget, a failed log) is dropped for every subscriber here. An
    /// address without multicast subscribers here (or with anycast ones) takes nothing.
    /// Returns the multicast subscribers left at the address.
    pub fn fan_out_relayed(&mut self, messages: Vec<SharedMessage>, now_ms: u64, out: &mut Vec<Outgoing>) -> usize {
        let Some(first) = messages.first() else { return 0 };
        let address = first.address_bytes();
        debug_assert!(messages.iter().all(|message| message.address() == first.address()));
        let fed = |state: &Address| state.anycast.is_empty() && !state.multicast.is_empty();
        if !self.addresses.get(&address).is_some_and(fed) {
            return 0;
        }
        if self.takes_at_once(&address, messages.len()) {
            let mut accepted = Vec::with_capacity(messages.len());
            for message in messages {
                let _ = self.admit_at_once(message, now_ms, &mut accepted);
            }
            self.deliver_at_once(&address, accepted, now_ms, out);
        } else {
            for message in messages {
                let _ = self.publish(&address, message, now_ms, out);
            }
        }
        self.multicast_subscriber_count(&address)
    }

    /// Whether a run of `count` messages to `address_name` takes the batch path
    /// ([`AddressTable::deliver_at_once`]): a pure multicast address (multicast subscribers
    /// only, nothing queued or held), and ids for the whole run already durably reserved (the
    /// path delivers at once).
    ///
    /// Nor when the run could end every subscriber as slow (each backlog too near its bound
    /// to take what of the run its credit does not): the address would route to its anycast
    /// queue from the message that ends the last one, which only [`AddressTable::enqueue`]
    /// does. One subscriber with room is enough, so this looks at the first subscriber only,
    /// as a rule.
    fn takes_at_once(&self, address_name: &Bytes, count: usize) -> bool {
        let ids_reserved = self.last_message_id.saturating_add(count as u64) <= self.ids_durably_reserved;
        let outlives_the_run = |state: &Address| {
            let max_queued = state.max_queued_messages(self.limits.max_queued_messages);
            state.multicast.iter().any(|subscriber| {
                let behind = lag(&state.multicast_log, subscriber);
                // What of the run waits in its backlog, at most (auto ack's bytes bound may
                // take fewer at once than its credit: all of it is counted then).
                let waits = match subscriber.ack_mode {
                    AckMode::Client if behind == 0 => count.saturating_sub(subscriber.credit_left() as usize),
                    _ => count,
                };
                behind + waits <= max_queued
            })
        };
        ids_reserved
            && self
                .addresses
                .get(address_name)
                .is_some_and(|state| state.is_pure_multicast() && outlives_the_run(state))
    }

    /// Admission for the batch path: a message for multicast subscribers only waits in no
    /// queue, so only the durable log's health and the shard's memory budget can refuse it. An
    /// admitted message gets its id and joins `accepted` (unless it has expired already).
    fn admit_at_once(
        &mut self,
        message: SharedMessage,
        now_ms: u64,
        accepted: &mut Vec<Queued>,
    ) -> Result<(), Refusal> {
        let admitted = self.refuse_if_log_failed(&message).and_then(|_| self.check_memory_budget(message.body().len()));
        if admitted.is_ok() && !is_expired_at(message.expires_at_ms, now_ms) {
            let (id, visible_after) = self.next_message_id();
            debug_assert_eq!(visible_after, Lsn(0), "ids of this path are durably reserved (takes_at_once)");
            accepted.push(Queued { id, message, redelivered: false, deliveries: 0 });
        }
        admitted
    }

    /// The batch path: every multicast subscriber of the pure multicast address `address_name`
    /// gets its share of `accepted` at once: one `Deliver` command per subscriber instead of one
    /// per message and subscriber, no detour through the backlog for a subscriber with credit,
    /// and one lookup of the address for the run. A subscriber's share is a prefix of the run
    /// (what its credit takes; nothing behind a backlog), so every share is a part of one list
    /// made once for the run ([`Deliveries::shared`]), and is counted against its credit at
    /// once ([`deliver_run`]). What some subscriber does not take at once (the run past the
    /// smallest share) is appended to the multicast log once, each subscriber's cursor after
    /// its share.
    fn deliver_at_once(
        &mut self,
        address_name: &Bytes,
        mut accepted: Vec<Queued>,
        now_ms: u64,
        out: &mut Vec<Outgoing>,
    ) {
        let state = self.addresses.get_mut(address_name).expect("checked by takes_at_once");
        // held_before[i]: the held bytes of the run's first i messages (auto ack's unwritten
        // bytes of a share of i).
        let mut held_before = Vec::with_capacity(accepted.len() + 1);
        held_before.push(0u64);
        for queued in &accepted {
            held_before.push(held_before[held_before.len() - 1] + queued.message.held_bytes() as u64);
        }
        let batch_bytes = held_before[accepted.len()];
        let share_of = |subscriber: &Subscriber, log: &MulticastLog, accepted: &[Queued]| {
            if lag(log, subscriber) == 0 {
                subscriber.takes_at_once(accepted, batch_bytes).min(accepted.len())
            } else {
                0
            }
        };
        // Message i (0-based) waits in the log, so it is compacted, unless every subscriber
        // has an empty backlog and more than i deliveries of credit left.
        let log = &state.multicast_log;
        let delivered_at_once =
            state.multicast.iter().map(|subscriber| share_of(subscriber, log, &accepted)).min().unwrap_or(0);
        for queued in accepted.iter_mut().skip(delivered_at_once) {
            compact_to_wait(&mut self.arena, &mut queued.message);
        }
        let max_queued = state.max_queued_messages(self.limits.max_queued_messages);
        state.messages_in += accepted.len() as u64;
        let ack_deadline = (self.limits.ack_timeout_ms > 0).then(|| now_ms + self.limits.ack_timeout_ms);
        // One list for the run, shared by every subscriber's share; a run of one is sent as
        // a list of its own (inline in the command: no allocation).
        let shared: Option<Arc<[Delivered]>> =
            (accepted.len() > 1).then(|| accepted.iter().map(Queued::delivered).collect());
        // The run past the smallest share goes to the log, from position `appended_at` on.
        let appended_at = state.multicast_log.end();
        let mut slow = SmallVec::<[(usize, usize); 2]>::new();
        let mut delivered_any = false;
        let log = &state.multicast_log;
        for (index, subscriber) in state.multicast.iter_mut().enumerate() {
            let behind = lag(log, subscriber);
            let share = share_of(subscriber, log, &accepted);
            if share > 0 {
                deliver_run(subscriber, &accepted[..share], &held_before[..=share], ack_deadline);
                let deliveries = match &shared {
                    Some(batch) => Deliveries::shared(batch.clone(), share),
                    None => Deliveries::one(accepted[0].delivered()),
                };
                send_deliveries(out, subscriber, deliveries);
                delivered_any = true;
                // It was at the log's end (nothing behind): past its share of the run now.
                subscriber.cursor = appended_at + (share - delivered_at_once) as u64;
            }
            // Ended when the rest of the run would take its backlog past the bound (as
            // `enqueue` would, one message at a time).
            let waits = accepted.len() - share;
            if waits > 0 && behind + waits > max_queued {
                slow.push((index, behind.max(max_queued)));
            }
        }
        for queued in accepted.drain(delivered_at_once..) {
            state.multicast_log.append(queued);
        }
        end_slow_subscribers(state, address_name, &slow, &mut self.subscriptions, out);
        // Every cursor moved or the log grew: one walk (this path walks every subscriber
        // anyway) drops what all of them have passed.
        state.multicast_log.trim(&state.multicast);
        self.deadline_added |= ack_deadline.is_some() && delivered_any;
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
    pub(super) fn publish(
        &mut self,
        address: &Bytes,
        message: SharedMessage,
        now_ms: u64,
        out: &mut Vec<Outgoing>,
    ) -> Result<Option<Lsn>, Refusal> {
        let mut taken = self.take_address(address);
        let room = if taken.created { self.check_address_room(address) } else { Ok(()) };
        let mut bounds = QueueBounds::of(&taken.state, &self.limits);
        let outcome = room.and_then(|()| self.enqueue(&mut taken.state, &taken.key, &mut bounds, message, now_ms, out));
        self.put_back_address(taken);
        let outcome = outcome?;
        self.dispatch(address, Deliverable::Everything, now_ms, out);
        Ok(outcome)
    }

    /// Takes the state of address `name` out of the table (a new one if there is none), for
    /// a run of [`AddressTable::enqueue`]s that then need no lookup of their own; hand it
    /// back with [`AddressTable::put_back_address`] before anything else looks for it.
    fn take_address(&mut self, name: &Bytes) -> TakenAddress {
        match self.addresses.remove_entry(name) {
            Some((key, state)) => TakenAddress { key, state, created: false },
            // A copy: the name usually is a slice of a client's read buffer (see `new_address`).
            None => TakenAddress { key: Bytes::copy_from_slice(name), state: Address::default(), created: true },
        }
    }

    /// Puts back what [`AddressTable::take_address`] took; a new address that ended up idle
    /// (every publish refused) is not kept.
    fn put_back_address(&mut self, taken: TakenAddress) {
        if !(taken.created && taken.state.is_idle()) {
            self.addresses.insert(taken.key, taken.state);
        }
    }

    /// Admits a message and puts it in the address's queue and multicast backlogs, without
    /// delivering anything yet (the caller dispatches, once per message or once per batch);
    /// `Ok(Some(lsn))` when its answer must wait for the log. `state` is the address's state,
    /// taken out of the table by the caller ([`AddressTable::take_address`]) so that a batch
    /// looks it up once; `address_name` is its key in the table (the message's address, a
    /// compact copy, which the table's list of what waits for the log shares). `bounds` is
    /// [`QueueBounds::of`] `state`, read once for a batch and taken again here when a slow
    /// subscriber is ended. Always inlined: it runs once per message of a batch, and as a
    /// call its frame (six saved registers, a large stack frame) and its `Result` returned
    /// through memory cost about 25 instructions per message.
    #[inline(always)]
    fn enqueue(
        &mut self,
        state: &mut Address,
        address_name: &Bytes,
        bounds: &mut QueueBounds,
        message: SharedMessage,
        now_ms: u64,
        out: &mut Vec<Outgoing>,
    ) -> Result<Option<Lsn>, Refusal> {
        debug_assert_eq!(address_name, message.address());
        let durable = self.refuse_if_log_failed(&message)?;
        self.refuse_if_ids_cannot_be_reserved()?;
        // Read once: every bound below and the queued bytes count it.
        let body_bytes = message.body().len();
        // Checked after the address's own bounds (whose refusal says more), computed here
        // while `self` is free.
        let within_budget = self.check_memory_budget(body_bytes);
        let QueueBounds { max_queued, max_queued_bytes, mut to_anycast_queue, anycast_credit_left } = *bounds;
        if !to_anycast_queue {
            // Multicast subscribers whose backlog is full are ended by this message (below): it
            // is routed as the address stands without them, so the message that ends the last
            // one waits in the anycast queue instead of reaching no one. Only the end of every
            // one can change the routing, so the test stops at the first with room (a scan of
            // all of them per message cost fan-out a pass over every backlog).
            let log = &state.multicast_log;
            let ending_all = !state.multicast.is_empty() && state.multicast.iter().all(|s| lag(log, s) >= max_queued);
            to_anycast_queue = ending_all && state.routes_to_anycast_queue_without(state.multicast.len());
        }
        // What waits beyond the subscribers' credit, counting the messages of this batch
        // queued ahead of this one and not dispatched yet (none outside a batch: a queue that
        // outlives a dispatch has no credit left to meet it).
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
        if to_anycast_queue && state.queued_bytes + body_bytes > max_queued_bytes {
            return Err(Refusal::new(
                ErrorCode::Overloaded,
                format!(
                    "address \"{}\" already holds {} bytes of queued messages and this one has {body_bytes} \
                     (max_queued_bytes {}); consume from it or retry later",
                    String::from_utf8_lossy(address_name),
                    state.queued_bytes,
                    max_queued_bytes
                ),
            ));
        }
        within_budget?;
        // A message that will wait in a multicast backlog (behind others or past a subscriber's
        // credit) is compacted first (see StoredMessage::compact); one for the anycast queue
        // only if it is still there later (`compaction`).
        let mut message = message;
        let log = &state.multicast_log;
        if state.multicast.iter().any(|s| !s.has_credit() || lag(log, s) > 0) {
            compact_to_wait(&mut self.arena, &mut message);
        }
        if to_anycast_queue {
            self.queue_uncompacted(state, address_name, &mut message, now_ms);
        }
        let (id, mut visible_after) = self.next_message_id();
        // Logged before it can be delivered (and so settled), when it goes to the anycast queue;
        // delivered only once its record is durable.
        let mut lsn = None;
        if durable && to_anycast_queue {
            let log = self.log.as_ref().expect("durable implies a log");
            let expires_at_unix_ms = match message.expires_at_ms {
                0 => 0,
                at => at.max(now_ms) + self.unix_offset_ms,
            };
            let appended = log.borrow_mut().append_message(
                message.address(),
                id.0,
                expires_at_unix_ms,
                &message.properties(),
                message.body(),
            );
            match appended {
                Ok(appended) => {
                    lsn = Some(appended);
                    visible_after = appended;
                }
                Err(error) => return Err(Refusal::new(ErrorCode::TooLarge, error.to_string())),
            }
        }
        state.messages_in += 1;
        if visible_after > self.durable_lsn {
            // Held back from here on, unless an entry that holds it back longer is there.
            if state.held_for_log.back().is_none_or(|(_, lsn)| *lsn < visible_after) {
                state.held_for_log.push_back((id, visible_after));
            }
            self.waiting_for_log.push_back((visible_after, address_name.clone()));
        }
        let queued = Queued { id, message, redelivered: false, deliveries: 0 };

        // Subscribers whose backlog is at the bound are ended; the others get the message in
        // the log. None can be at the bound while the log and the fronts together are
        // shorter (no walk of the subscribers then).
        let log = &state.multicast_log;
        if log.len() + log.fronts >= max_queued {
            let slow: SmallVec<[(usize, usize); 2]> = (state.multicast.iter().enumerate())
                .map(|(index, subscriber)| (index, lag(log, subscriber)))
                .filter(|(_, behind)| *behind >= max_queued)
                .collect();
            if !slow.is_empty() {
                end_slow_subscribers(state, address_name, &slow, &mut self.subscriptions, out);
                // Without them the address may route to its anycast queue now.
                *bounds = QueueBounds::of(state, &self.limits);
            }
        }
        if to_anycast_queue {
            if !state.multicast.is_empty() {
                state.multicast_log.append(queued.clone());
            }
            state.queued_bytes += body_bytes;
            self.queued_bytes += body_bytes;
            state.queue.push_back(queued);
        } else if !state.multicast.is_empty() {
            state.multicast_log.append(queued);
        }
        Ok(lsn)
    }

    /// Answers a publish: now, held back (`publish_answer`), or once the log has it.
    pub(super) fn answer_publish(
        &mut self,
        address: &Bytes,
        publisher: ConnRef,
        seq: u64,
        outcome: Result<Option<Lsn>, Refusal>,
        out: &mut Vec<Outgoing>,
    ) {
        let state = self.addresses.get_mut(address);
        answer_publish_to(state, &self.limits, &mut self.durable_answers, publisher, seq, outcome, out);
    }

    /// Backpressure before refusal: while an address with anycast consumers holds more than
    /// half of `max_queued_messages`, the answers to its publishers are held back, so their
    /// sessions reach `max_inflight_sends` and the broker stops reading from them. The answers
    /// go out once consumers bring the queue down to a quarter (or all of them leave). Only
    /// when publishers outrun that (many publishers, or no consumer at all) does a SEND meet the
    /// hard bound and ERROR 4429. Multicast backlogs never hold publishers back: a slow
    /// multicast subscriber is ended at the bound instead (see `publish`).
    ///
    /// At most once is bounded sooner: an unnumbered MBLWS SEND (seq 0) has its answer held
    /// while the queue holds `max_light_lead` messages or more. Such a publisher gets no
    /// RECEIPT to wait for, so without this it runs as far ahead of its consumers as the bounds
    /// above allow: at most once must not mean a deeper queue than reliable. The held answers
    /// slide out one per message that leaves the queue ([`Self::release_held_answers`]): a
    /// publisher faster than its consumers keeps being read at their pace, as an MBWS one is
    /// while RECEIPTs free its window, and runs at most `max-inflight-sends` SENDs past the
    /// lead (released at half the lead, or all at once below it, the hold stopped the
    /// benchmark's publisher for thousands of deliveries in every cycle: docs/PERFORMANCE.md,
    /// session 12). Answers leave in order, so while any are held, every publisher's are.
    #[inline]
    fn publish_answer(
        state: Option<&mut Address>,
        limits: &AddressLimits,
        publisher: ConnRef,
        seq: u64,
        out: &mut Vec<Outgoing>,
    ) {
        if let Some(state) = state {
            if state.hold_answers(limits, publisher, seq, 1) {
                return;
            }
        }
        push_accepted(out, publisher, seq);
    }

    /// Lets held answers go ([`AddressTable::publish_answer`]), oldest first. A hold begun at
    /// the at-most-once lead (`held_release_at` below `low_watermark`) slides: an answer goes
    /// for each message that leaves the queue, while the queue less the messages whose answers
    /// still wait is below the lead, so the held publisher is read again in a steady stream,
    /// one SEND in for one delivery out, as RECEIPTs pace an MBWS publisher. (Releasing every
    /// answer at once when the queue fell below the lead stopped it for thousands of
    /// deliveries in every cycle: docs/PERFORMANCE.md, session 12.) A hold begun at the high
    /// watermark lets every answer go at once at `low_watermark`. Without anycast
    /// subscribers nothing holds: every answer goes.
    pub(super) fn release_held_answers(state: &mut Address, low_watermark: usize, out: &mut Vec<Outgoing>) {
        if state.held_answers.is_empty() {
            return;
        }
        match state.held_release_at {
            Some(release_at) if release_at < low_watermark && !state.anycast.is_empty() => {
                // One answer goes per message that has left the queue: while the queue less
                // the held answers is at or below `release_at`, and each answer let go raises
                // that by one, so `release_at + 1 - (queue - held)` of them, all if fewer are
                // held (the queue may hold fewer than the held answers' messages: some of them
                // have left already). Computed, not counted out one by one: the answers are
                // runs ([`HeldAnswers`]), let go a run (or the front of one) at a time.
                let held = state.held_answers.len();
                let release = (release_at + 1 + held).saturating_sub(state.queue.len()).min(held);
                state.held_answers.release_oldest(release, out);
            }
            _ => {
                if state.queue.len() > low_watermark && !state.anycast.is_empty() {
                    return;
                }
                state.held_answers.release_all(out);
            }
        }
        if state.held_answers.is_empty() {
            state.held_release_at = None;
        }
    }
}

/// What [`AddressTable::enqueue`] reads of an address's state that no enqueue changes: read
/// once for a batch instead of once per message. Only ending a slow multicast subscriber can
/// change it (the routing), and `enqueue` reads it again then; the anycast subscribers' credit
/// changes only when the batch is dispatched, after its last enqueue.
#[derive(Debug, Clone, Copy)]
struct QueueBounds {
    max_queued: usize,
    max_queued_bytes: usize,
    to_anycast_queue: bool,
    /// What the anycast subscribers' credit takes at once from the queue.
    anycast_credit_left: usize,
}

impl QueueBounds {
    fn of(state: &Address, limits: &AddressLimits) -> QueueBounds {
        QueueBounds {
            max_queued: state.max_queued_messages(limits.max_queued_messages),
            max_queued_bytes: state.max_queued_bytes(limits.max_queued_bytes),
            to_anycast_queue: state.routes_to_anycast_queue(),
            anycast_credit_left: state.anycast.iter().map(|s| s.credit_left() as usize).sum(),
        }
    }
}

/// Answers SEND `seq` of `publisher` as accepted: joined to the answer last pushed to `out`
/// when that one accepted the same publisher's SENDs just before it (the next seq, or another
/// unnumbered MBLWS SEND), otherwise as a new [`ConnCommand::PublishesAccepted`]. Only the
/// last answer is extended, so the order of everything in `out` stays as if each SEND had been
/// answered on its own.
#[inline]
pub(super) fn push_accepted(out: &mut Vec<Outgoing>, publisher: ConnRef, seq: u64) {
    push_accepted_run(out, publisher, seq, 1);
}

/// Answers `added` consecutive SENDs of `publisher` from `seq` on (`seq` 0: unnumbered ones)
/// as accepted, joined to the last answer in `out` as [`push_accepted`] does.
fn push_accepted_run(out: &mut Vec<Outgoing>, publisher: ConnRef, seq: u64, added: u32) {
    if let Some((shard, last)) = out.last_mut() {
        if *shard == publisher.shard && last.join_accepted(publisher.conn, seq, added) {
            return;
        }
    }
    out.push((
        publisher.shard,
        ConnCommand::PublishesAccepted { publisher: publisher.conn, first_seq: seq, count: added },
    ));
}

/// The answers an address holds back ([`AddressTable::publish_answer`]), oldest first, as runs:
/// `count` SENDs of one publisher from `first_seq` on, consecutive seqs or all unnumbered
/// (`first_seq` 0), as [`ConnCommand::PublishesAccepted`] answers them. A held MBLWS publisher's
/// SENDs are one run however many are held, so holding a batch of them and letting one go per
/// delivery (the sliding release) costs a run, not an entry per SEND (session 15: an entry
/// per SEND cost about 90 instructions per message in `scripts/callgrind-broker.sh --light`,
/// more than at most once saves).
///
/// Bound: at most one held SEND per queued message when it was held (`len`), so at most
/// `max_queued_messages` SENDs and as many runs.
#[derive(Debug, Default)]
pub(super) struct HeldAnswers {
    runs: VecDeque<HeldRun>,
    /// SENDs held, over every run.
    sends: usize,
}

#[derive(Debug, Clone, Copy)]
struct HeldRun {
    publisher: ConnRef,
    /// The first SEND's seq; 0: every SEND of the run is unnumbered.
    first_seq: u64,
    count: u32,
}

impl HeldAnswers {
    pub(super) fn is_empty(&self) -> bool {
        self.sends == 0
    }

    /// SENDs whose answers are held.
    pub(super) fn len(&self) -> usize {
        self.sends
    }

    /// Holds the answers to `count` consecutive SENDs of `publisher` from `first_seq` on
    /// (`first_seq` 0: unnumbered ones), after every answer held: joined to the newest run
    /// when they continue it.
    fn hold(&mut self, publisher: ConnRef, first_seq: u64, count: u32) {
        debug_assert!(count > 0, "a run holds at least one answer");
        self.sends += count as usize;
        if let Some(newest) = self.runs.back_mut() {
            let continues = match newest.first_seq {
                0 => first_seq == 0,
                first => first_seq == first + u64::from(newest.count),
            };
            if continues && newest.publisher == publisher {
                if let Some(joined) = newest.count.checked_add(count) {
                    newest.count = joined;
                    return;
                }
            }
        }
        self.runs.push_back(HeldRun { publisher, first_seq, count });
    }

    /// Lets the `release` oldest answers go, in order (at most every held one).
    fn release_oldest(&mut self, mut release: usize, out: &mut Vec<Outgoing>) {
        debug_assert!(release <= self.sends, "releasing {release} of {} held answers", self.sends);
        while release > 0 {
            let Some(oldest) = self.runs.front_mut() else { break };
            let taken = oldest.count.min(u32::try_from(release).unwrap_or(u32::MAX));
            push_accepted_run(out, oldest.publisher, oldest.first_seq, taken);
            if taken == oldest.count {
                self.runs.pop_front();
            } else {
                oldest.count -= taken;
                if oldest.first_seq != 0 {
                    oldest.first_seq += u64::from(taken);
                }
            }
            self.sends -= taken as usize;
            release -= taken as usize;
        }
    }

    /// Lets every held answer go, in order.
    pub(super) fn release_all(&mut self, out: &mut Vec<Outgoing>) {
        self.release_oldest(self.sends, out);
    }
}

impl Address {
    /// Holds the answers to `count` accepted SENDs of `publisher` from `seq` on (0:
    /// unnumbered ones) if [`Address::holds_answer`] says so: false if they go now.
    fn hold_answers(&mut self, limits: &AddressLimits, publisher: ConnRef, seq: u64, count: u32) -> bool {
        let Some(held_release_at) = self.holds_answer(limits, seq) else { return false };
        if self.held_answers.is_empty() {
            self.held_release_at = held_release_at;
        }
        self.held_answers.hold(publisher, seq, count);
        true
    }

    /// Whether the answer to an accepted SEND `seq` is held back
    /// ([`AddressTable::publish_answer`]), and if so, the queue length that releases it when it
    /// is the first held (`None`: the quarter of the bound, as for the high watermark).
    #[inline]
    fn holds_answer(&self, limits: &AddressLimits, seq: u64) -> Option<Option<usize>> {
        if !self.held_answers.is_empty() {
            return Some(self.held_release_at);
        }
        if self.anycast.is_empty() {
            return None;
        }
        let queued = self.queue.len();
        if queued >= (self.max_queued_messages(limits.max_queued_messages) / 2).max(1) {
            return Some(None);
        }
        if seq == 0 && queued >= limits.max_light_lead as usize {
            // Released one per delivery while the queue without them is below the lead.
            return Some(Some(limits.max_light_lead as usize - 1));
        }
        None
    }
}

/// The answers a batch of publishes owes, in order ([`AddressTable::publish_batch`]), noted as
/// each message is queued and given once the batch is dispatched: runs of one publisher's
/// consecutive SENDs queued without waiting for the log (one entry for a run, however long),
/// and every other outcome on its own. A publisher's batch is nearly always one run, gathered
/// in `run` (a few registers in the loop that queues the batch) without touching `answers`.
#[derive(Default)]
struct BatchAnswers {
    /// The run being gathered (publisher, first seq, count), after everything in `answers`.
    run: Option<(ConnRef, u64, u32)>,
    answers: Vec<BatchAnswer>,
}

enum BatchAnswer {
    /// `count` SENDs of `publisher` from `first_seq` on (`first_seq` 0: unnumbered ones), all
    /// queued: answered now or held back, as [`AddressTable::publish_answer`] decides.
    Queued { publisher: ConnRef, first_seq: u64, count: u32 },
    /// One SEND whose answer waits for the log, or a refusal ([`answer_publish_to`]).
    Other { publisher: ConnRef, seq: u64, outcome: Result<Option<Lsn>, Refusal> },
}

impl BatchAnswers {
    /// Notes the outcome of SEND `seq` of `publisher`, the batch's next one: it joins the run
    /// before it when it continues it (the same publisher, the next seq or another unnumbered
    /// SEND). Always inlined: it runs once per message, in the loop that queues the batch.
    #[inline(always)]
    fn note(&mut self, publisher: ConnRef, seq: u64, outcome: Result<Option<Lsn>, Refusal>) {
        let Ok(None) = outcome else {
            self.note_other(publisher, seq, outcome);
            return;
        };
        if let Some((run_publisher, first_seq, count)) = &mut self.run {
            let continues = if *first_seq == 0 { seq == 0 } else { seq == *first_seq + u64::from(*count) };
            if continues && *run_publisher == publisher && *count < u32::MAX {
                *count += 1;
                return;
            }
        }
        self.end_run();
        self.run = Some((publisher, seq, 1));
    }

    fn note_other(&mut self, publisher: ConnRef, seq: u64, outcome: Result<Option<Lsn>, Refusal>) {
        self.end_run();
        self.answers.push(BatchAnswer::Other { publisher, seq, outcome });
    }

    /// Moves the run being gathered, if any, to `answers`.
    fn end_run(&mut self) {
        if let Some((publisher, first_seq, count)) = self.run.take() {
            self.answers.push(BatchAnswer::Queued { publisher, first_seq, count });
        }
    }

    /// Answers the noted publishes in order, to the address whose state is `state` (`None` if
    /// it is gone), as [`answer_publish_to`] answers each: a run that goes now is one
    /// [`ConnCommand::PublishesAccepted`] (joined to `out`'s last when that one continues it).
    /// Whether an answer is held depends on the address's queue, which answering does not
    /// change, and on its seq only through being unnumbered (0) or not, which is the same for
    /// every SEND of a run; so a run goes whole or is held whole, and once one answer is held
    /// every later one is (answers leave in order).
    fn answer(
        mut self,
        mut state: Option<&mut Address>,
        limits: &AddressLimits,
        durable_answers: &mut std::collections::VecDeque<(Lsn, ConnRef, u64)>,
        out: &mut Vec<Outgoing>,
    ) {
        self.end_run();
        for answer in self.answers {
            match answer {
                BatchAnswer::Queued { publisher, first_seq, count } => {
                    let held = state
                        .as_deref_mut()
                        .is_some_and(|state| state.hold_answers(limits, publisher, first_seq, count));
                    if !held {
                        push_accepted_run(out, publisher, first_seq, count);
                    }
                }
                BatchAnswer::Other { publisher, seq, outcome } => {
                    answer_publish_to(state.as_deref_mut(), limits, durable_answers, publisher, seq, outcome, out)
                }
            }
        }
    }
}

/// An address's state taken out of the table for a batch ([`AddressTable::take_address`]).
struct TakenAddress {
    key: Bytes,
    state: Address,
    /// The table had no such address: it is kept only if something is left in it.
    created: bool,
}

/// Answers a publish to the address whose state is `state` (`None` if it is gone): now, held
/// back (`AddressTable::publish_answer`), or once the log has it (`durable_answers`).
fn answer_publish_to(
    state: Option<&mut Address>,
    limits: &AddressLimits,
    durable_answers: &mut std::collections::VecDeque<(Lsn, ConnRef, u64)>,
    publisher: ConnRef,
    seq: u64,
    outcome: Result<Option<Lsn>, Refusal>,
    out: &mut Vec<Outgoing>,
) {
    match outcome {
        Ok(Some(_)) if planted(Bug::ReceiptBeforeSync) => {
            AddressTable::publish_answer(state, limits, publisher, seq, out)
        }
        Ok(Some(lsn)) => durable_answers.push_back((lsn, publisher, seq)),
        Ok(None) => AddressTable::publish_answer(state, limits, publisher, seq, out),
        Err(refusal) => out.push((
            publisher.shard,
            ConnCommand::PublishDone { publisher: publisher.conn, seq, outcome: Err(refusal) },
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::{ConnId, ShardId};

    fn publisher(index: u32) -> ConnRef {
        ConnRef { shard: ShardId(0), conn: ConnId { index, generation: 0 } }
    }

    /// The answers `out` holds: (publisher, first seq, count) of each accepted run.
    fn answers(out: &[Outgoing]) -> Vec<(u32, u64, u32)> {
        out.iter()
            .map(|(_, command)| match command {
                ConnCommand::PublishesAccepted { publisher, first_seq, count } => (publisher.index, *first_seq, *count),
                other => panic!("not an accepted run: {other:?}"),
            })
            .collect()
    }

    /// Held answers keep their order and their seqs: a publisher's consecutive SENDs (or its
    /// unnumbered ones) join one run, a release may split a run (the rest keeps its seqs), and
    /// every held SEND is answered exactly once.
    #[test]
    fn held_answers_are_runs_released_in_order_and_split_where_a_release_ends() {
        let mut held = HeldAnswers::default();
        held.hold(publisher(1), 5, 2);
        held.hold(publisher(1), 7, 3); // continues 5-6: one run 5-9
        held.hold(publisher(2), 0, 4);
        held.hold(publisher(2), 0, 1); // unnumbered after unnumbered: one run
        held.hold(publisher(1), 11, 1); // a gap (10 not held here): a run of its own
        assert_eq!(held.len(), 11);
        assert_eq!(held.runs.len(), 3);
        let mut out = Vec::new();
        held.release_oldest(2, &mut out);
        assert_eq!(answers(&out), [(1, 5, 2)], "the front of the first run");
        out.clear();
        held.release_oldest(6, &mut out);
        assert_eq!(answers(&out), [(1, 7, 3), (2, 0, 3)], "the rest of it, then part of the next");
        out.clear();
        held.release_all(&mut out);
        assert_eq!(answers(&out), [(2, 0, 2), (1, 11, 1)]);
        assert!(held.is_empty());
        assert_eq!(held.runs.len(), 0);
        held.release_all(&mut out);
        assert_eq!(out.len(), 2, "nothing is answered twice");
    }
}
