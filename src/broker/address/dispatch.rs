//! Dispatch: delivery to subscribers with credit. Messages enter through the anycast queue
//! (round robin among its subscribers) or a multicast subscriber's backlog (its front of
//! redeliveries, then the address's shared multicast log from its cursor: `multicast`), and leave as
//! [`ConnCommand::Deliver`] commands in `out`, consecutive deliveries to one subscription joined
//! in one command. [`Deliverable`] says where a change can have made something deliverable, so
//! that an ACK looks at one backlog only. Every delivery is counted against its subscriber's
//! credit (asserted, in release builds too) and, in auto ack, against its bound of unwritten
//! bytes; it stops at the first message held for the log, and drops expired messages;
//! client-ack deliveries are kept in the subscriber's `unacked`.

use bytes::Bytes;

use super::multicast::{lag, MulticastLog};
use super::subscribers::Subscriber;
use super::{Address, AddressTable, Outgoing, Queued};
use crate::broker::{ConnCommand, ConnRef, Delivered, Deliveries, MessageId, SharedMessage, SubscriptionId};
use crate::mbws::{AckMode, DeliveryMode};

/// What a change to an address can have made deliverable, so that `dispatch` looks only there:
/// an ACK or new credit of one multicast subscriber concerns its backlog alone, never the
/// other subscribers (an ACK costs the same with 10 subscribers as with 10,000).
#[derive(Debug, Clone, Copy)]
pub(super) enum Deliverable {
    /// Every backlog and the anycast queue (subscriptions come and go, messages are given back).
    Everything,
    /// The anycast queue (a subscriber came, or an anycast subscriber got credit back).
    AnycastQueue,
    /// One multicast subscriber's backlog.
    Backlog((ConnRef, SubscriptionId)),
}

impl Deliverable {
    /// What a change of credit of subscription `key` (delivered in `mode`) can release.
    pub(super) fn after_credit_of(key: (ConnRef, SubscriptionId), mode: DeliveryMode) -> Deliverable {
        match mode {
            DeliveryMode::Anycast => Deliverable::AnycastQueue,
            DeliveryMode::Multicast => Deliverable::Backlog(key),
        }
    }
}

impl AddressTable {
    /// Delivers to subscribers with credit what `deliverable` says may have become
    /// deliverable: backlogs, the anycast queue, or both.
    pub(super) fn dispatch(&mut self, address: &Bytes, deliverable: Deliverable, now_ms: u64, out: &mut Vec<Outgoing>) {
        let Some(state) = self.addresses.get_mut(address) else { return };
        let low_watermark = state.max_queued_messages(self.limits.max_queued_messages) / 4;
        let held_from = state.held_from(self.durable_lsn);
        let ack_deadline = (self.limits.ack_timeout_ms > 0).then(|| now_ms + self.limits.ack_timeout_ms);
        let delivered = out.len();
        match deliverable {
            Deliverable::Everything => {
                for index in 0..state.multicast.len() {
                    drain_backlog(state, index, ack_deadline, held_from, now_ms, out);
                }
            }
            Deliverable::AnycastQueue => {}
            Deliverable::Backlog(key) => {
                let found = self.subscriptions.get(&key).filter(|place| state.subscriber_at(place, key).is_some());
                if let Some(place) = found {
                    drain_backlog(state, place.index, ack_deadline, held_from, now_ms, out);
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
        if subscriber_count == 1 {
            return deliver_queue_to_one(state, ack_deadline, held_from, now_ms, out, settled);
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
            state.queued_bytes -= queued.message.body().len();
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
}

/// [`AddressTable::deliver_queue`] for an address with one anycast subscriber: the round
/// robin always comes back to it, so the queue's front goes to it as far as its credit allows,
/// into one command (the one before, when that is for this subscription, as
/// [`push_delivery`] joins them), sized once for what the credit takes.
fn deliver_queue_to_one(
    state: &mut Address,
    ack_deadline: Option<u64>,
    held_from: Option<MessageId>,
    now_ms: u64,
    out: &mut Vec<Outgoing>,
    settled: &mut Vec<Queued>,
) {
    // The round robin's position is 0, the one subscriber's index, before and after.
    debug_assert_eq!((state.anycast.len(), state.next_anycast), (1, 0));
    let subscriber = &mut state.anycast[0];
    let takes = (subscriber.credit_left() as usize).min(state.queue.len());
    if takes == 0 {
        return;
    }
    let target = (subscriber.consumer.shard, subscriber.consumer.conn, subscriber.subscription);
    let joins = matches!(out.last(), Some((shard, ConnCommand::Deliver { consumer, subscription, .. }))
        if (*shard, *consumer, *subscription) == target);
    if !joins {
        send_deliveries_unchecked(out, subscriber, Deliveries::with_capacity(takes));
    }
    let Some((_, ConnCommand::Deliver { deliveries, .. })) = out.last_mut() else {
        unreachable!("a Deliver command was pushed or found above")
    };
    while subscriber.has_credit() {
        let Some(front) = state.queue.front() else { break };
        if held_from.is_some_and(|held| front.id >= held) {
            break;
        }
        let queued = state.queue.pop_front().expect("queue is not empty");
        state.queued_bytes -= queued.message.body().len();
        if is_expired(&queued, now_ms) {
            settled.push(queued);
            continue;
        }
        if subscriber.ack_mode == AckMode::Auto {
            settled.push(queued.clone());
        }
        deliveries.push(deliver(subscriber, queued, ack_deadline));
    }
    // Nothing was deliverable (a held or expired front): no empty command.
    if !joins && deliveries.is_empty() {
        out.pop();
    }
}

fn is_expired(queued: &Queued, now_ms: u64) -> bool {
    is_expired_at(queued.message.expires_at_ms, now_ms)
}

pub(super) fn is_expired_at(expires_at_ms: u64, now_ms: u64) -> bool {
    expires_at_ms != 0 && expires_at_ms <= now_ms
}

/// Delivers what the backlog of `state`'s multicast subscriber at `index` holds (its front of
/// redeliveries, then the address's multicast log from its cursor on), as far as its credit
/// allows and up to the first message held for the log (`held_from`: see `Address::held_from`),
/// in one command; expired messages are passed over. The log drops what the slowest cursor
/// passes (`MulticastLog::moved_from`).
pub(super) fn drain_backlog(
    state: &mut Address,
    index: usize,
    ack_deadline: Option<u64>,
    held_from: Option<MessageId>,
    now_ms: u64,
    out: &mut Vec<Outgoing>,
) {
    let log = &mut state.multicast_log;
    let subscriber = &mut state.multicast[index];
    let from = subscriber.cursor;
    // Sized for what the credit takes (an ACK of a few hundred deliveries releases as many),
    // instead of growing by doubling from one.
    let takes = lag(log, subscriber).min(subscriber.credit_left() as usize);
    let mut deliveries = Deliveries::with_capacity(takes);
    let is_held = |queued: &Queued| held_from.is_some_and(|held| queued.id >= held);
    // Redeliveries first: they were given back to the front of the backlog.
    while subscriber.has_credit() {
        if subscriber.front.front().is_none_or(is_held) {
            break;
        }
        let queued = subscriber.front.pop_front().expect("checked above");
        log.fronts -= 1;
        if is_expired(&queued, now_ms) {
            continue;
        }
        deliveries.push(deliver(subscriber, queued, ack_deadline));
    }
    if subscriber.front.is_empty() && subscriber.ack_mode == AckMode::Client {
        deliver_log_stretch(log, subscriber, ack_deadline, held_from, now_ms, &mut deliveries);
    } else if subscriber.front.is_empty() {
        while subscriber.has_credit() {
            let Some(queued) = log.get(subscriber.cursor) else { break };
            if is_held(queued) {
                break;
            }
            subscriber.cursor += 1;
            if is_expired(queued, now_ms) {
                continue;
            }
            deliveries.push(deliver_shared(subscriber, queued, ack_deadline));
        }
    }
    send_deliveries(out, subscriber, deliveries);
    if subscriber.cursor != from {
        log.moved_from(from, &state.multicast);
    }
}

/// The log part of [`drain_backlog`] for a client-ack subscriber with nothing in its front:
/// what [`deliver_shared`] does for each message of the log from the cursor on, as far as the
/// credit takes and up to the first held message (expired ones passed over), done for the
/// stretch at once: one pass finds how far it goes, then its deliveries and its records are
/// appended as runs, and the credit is counted once. Every id in the log from the cursor on
/// is above every id the subscriber has been handed (those came from the log before its
/// cursor, or from its front, which holds what it was handed), so the records go at the back
/// of `unacked`, without a search. Not inlined: it runs once per drain, not per delivery, and
/// kept out of line it leaves the inlining of the address table's other paths as it was.
#[inline(never)]
fn deliver_log_stretch(
    log: &MulticastLog,
    subscriber: &mut Subscriber,
    ack_deadline: Option<u64>,
    held_from: Option<MessageId>,
    now_ms: u64,
    deliveries: &mut Deliveries,
) {
    debug_assert!(subscriber.ack_mode == AckMode::Client && subscriber.front.is_empty());
    let credit_left = subscriber.credit_left();
    // Positions passed (taken or expired) and messages taken.
    let (mut passed, mut taken) = (0usize, 0u32);
    for queued in log.from(subscriber.cursor) {
        if taken == credit_left || held_from.is_some_and(|held| queued.id >= held) {
            break;
        }
        passed += 1;
        taken += u32::from(!is_expired(queued, now_ms));
    }
    let stretch = log.from(subscriber.cursor).take(passed);
    if taken as usize == passed {
        keep_stretch(subscriber, stretch, ack_deadline, deliveries);
    } else {
        keep_stretch(subscriber, stretch.filter(|queued| !is_expired(queued, now_ms)), ack_deadline, deliveries);
    }
    subscriber.cursor += passed as u64;
    subscriber.in_flight += taken;
    subscriber.delivered += u64::from(taken);
    // What `count_delivery` asserts per delivery, once for the stretch (release builds too).
    assert!(
        subscriber.in_flight <= subscriber.credit,
        "deliveries past the credit: {} in flight, credit {}",
        subscriber.in_flight,
        subscriber.credit
    );
}

/// Delivers `stretch` (log messages newer than any the subscriber has been handed, oldest
/// first) to a client-ack subscriber: their deliveries appended to `deliveries`, their records
/// kept as a run (each one delivery more, with its ack deadline). A delivery and its record
/// share one count of the message's handles ([`SharedMessage::clone_counting`]): counted in
/// the first pass, made in the second. Two runs appended, not one pass with a push into each:
/// that cost 27 instructions more per delivery, and a closure handing the delivery on from
/// inside the records' run went out of line (docs/PERFORMANCE.md, session 15). The credit is
/// the caller's to count.
#[inline(always)]
fn keep_stretch<'a>(
    subscriber: &mut Subscriber,
    stretch: impl Iterator<Item = &'a Queued> + Clone,
    ack_deadline: Option<u64>,
    deliveries: &mut Deliveries,
) {
    keep_deadlines(subscriber, stretch.clone(), ack_deadline);
    let first = deliveries.len();
    deliveries.extend(stretch.clone().map(|queued| Delivered {
        message_id: queued.id,
        message: queued.message.clone_counting(1),
        redelivered: queued.redelivered,
    }));
    // The records follow the deliveries just made, one each: the second pass is checked
    // against the first (release builds too), so a handle is made only where it was counted.
    let records = stretch.zip(&deliveries[first..]).map(|(queued, delivered)| {
        assert!(SharedMessage::ptr_eq(&queued.message, &delivered.message), "the stretch changed between passes");
        Queued {
            id: queued.id,
            // SAFETY: `clone_counting(1)` counted one handle more for this delivery's message
            // (the assertion above: the same message), and `zip` makes at most one per delivery.
            message: unsafe { queued.message.counted_clone() },
            redelivered: queued.redelivered,
            deliveries: queued.deliveries + 1,
        }
    });
    subscriber.unacked.extend_newest(records);
}

/// Keeps a client-ack subscriber's records of a run of deliveries (messages newer than any it
/// has been handed, oldest first): each one delivery more, appended to `unacked` as a run, and
/// their ack deadlines. The credit is the caller's to count.
#[inline(always)]
fn keep_run_records<'a>(
    subscriber: &mut Subscriber,
    run: impl Iterator<Item = &'a Queued> + Clone,
    ack_deadline: Option<u64>,
) {
    keep_deadlines(subscriber, run.clone(), ack_deadline);
    subscriber.unacked.extend_newest(run.map(|queued| Queued { deliveries: queued.deliveries + 1, ..queued.clone() }));
}

/// The ack deadlines of a run of client-ack deliveries, if there is an ack timeout.
#[inline(always)]
fn keep_deadlines<'a>(subscriber: &mut Subscriber, run: impl Iterator<Item = &'a Queued>, ack_deadline: Option<u64>) {
    if let Some(deadline) = ack_deadline {
        subscriber.deadlines.extend(run.map(|queued| (deadline, queued.id)));
    }
}

/// Counts a delivery against the subscriber's credit and, in client ack mode, keeps it until
/// it is acknowledged (with its ack deadline, if there is an ack timeout). Always inlined: it
/// is the body of every delivery loop, and as a call the message went in and out through
/// memory.
#[inline(always)]
pub(super) fn deliver(subscriber: &mut Subscriber, mut queued: Queued, ack_deadline: Option<u64>) -> Delivered {
    count_delivery(subscriber, &queued.message);
    queued.deliveries += 1;
    let delivered = queued.delivered();
    if subscriber.ack_mode == AckMode::Client {
        if let Some(deadline) = ack_deadline {
            subscriber.deadlines.push_back((deadline, queued.id));
        }
        subscriber.unacked.insert(queued);
    }
    delivered
}

/// Counts one delivery of `message` against the subscriber's credit (and, auto ack, its
/// unwritten bytes), which must allow it.
#[inline(always)]
fn count_delivery(subscriber: &mut Subscriber, message: &SharedMessage) {
    assert!(
        subscriber.has_credit(),
        "delivery without credit: {} in flight, credit {}, {} bytes unwritten of {}",
        subscriber.in_flight,
        subscriber.credit,
        subscriber.unwritten_bytes,
        subscriber.max_unwritten_bytes
    );
    subscriber.in_flight += 1;
    if subscriber.ack_mode == AckMode::Auto {
        subscriber.unwritten_bytes += message.held_bytes() as u64;
    }
    subscriber.delivered += 1;
}

/// [`deliver`] of a message the subscriber shares with others (an entry of the multicast
/// log): the entry is copied only where the subscriber keeps it (client ack).
#[inline]
fn deliver_shared(subscriber: &mut Subscriber, queued: &Queued, ack_deadline: Option<u64>) -> Delivered {
    if subscriber.ack_mode == AckMode::Client {
        return deliver(subscriber, queued.clone(), ack_deadline);
    }
    count_delivery(subscriber, &queued.message);
    Delivered { message_id: queued.id, message: queued.message.clone(), redelivered: queued.redelivered }
}

/// Counts a run of deliveries (`run`, the newest messages of the address: ids above every id
/// the subscriber has been handed) against the subscriber's credit at once, as [`deliver`]
/// does one by one, and (client ack) keeps them until they are acknowledged, with their ack
/// deadlines. `held_before[i]` is the held bytes of the run's first `i` messages. The caller
/// sends the deliveries (a share of a list made once for all subscribers).
pub(super) fn deliver_run(subscriber: &mut Subscriber, run: &[Queued], held_before: &[u64], ack_deadline: Option<u64>) {
    debug_assert_eq!(held_before.len(), run.len() + 1);
    let count = run.len() as u32;
    let unwritten_before_last = subscriber.unwritten_bytes + held_before[run.len().saturating_sub(1)];
    assert!(
        count <= subscriber.credit_left()
            && (subscriber.ack_mode == AckMode::Client || unwritten_before_last < subscriber.max_unwritten_bytes),
        "a run of {count} deliveries past the credit: {} in flight, credit {}, {} bytes unwritten of {}",
        subscriber.in_flight,
        subscriber.credit,
        subscriber.unwritten_bytes,
        subscriber.max_unwritten_bytes
    );
    subscriber.in_flight += count;
    subscriber.delivered += u64::from(count);
    match subscriber.ack_mode {
        AckMode::Auto => subscriber.unwritten_bytes += held_before[run.len()],
        AckMode::Client => keep_run_records(subscriber, run.iter(), ack_deadline),
    }
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
    send_deliveries(out, subscriber, Deliveries::one(delivered));
}

/// Sends `deliveries` (oldest first) to `subscriber` as one command; nothing if empty.
pub(super) fn send_deliveries(out: &mut Vec<Outgoing>, subscriber: &Subscriber, deliveries: Deliveries) {
    if deliveries.is_empty() {
        return;
    }
    send_deliveries_unchecked(out, subscriber, deliveries);
}

/// [`send_deliveries`] of a list that may still be empty (the caller fills or removes it).
fn send_deliveries_unchecked(out: &mut Vec<Outgoing>, subscriber: &Subscriber, deliveries: Deliveries) {
    out.push((
        subscriber.consumer.shard,
        ConnCommand::Deliver { consumer: subscriber.consumer.conn, subscription: subscriber.subscription, deliveries },
    ));
}
