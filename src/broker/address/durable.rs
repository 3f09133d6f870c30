//! Durability: the table's side of the shard's [`DurableLog`]. Durable messages bound for an
//! anycast queue are appended before their publisher is answered, and SETTLED records follow
//! when they are done with; message ids are reserved in blocks of [`ID_RESERVATION_BLOCK`].
//! What must not be seen before the log is durable (a message's record, or the reservation of
//! its id) is held per address (`held_for_log`) and its answer in `durable_answers`;
//! [`AddressTable::durable_committed`] releases both, [`AddressTable::durable_failed`] drops
//! them with an error. At start-up [`AddressTable::restore`] puts recovered messages back.

use std::cell::RefCell;
use std::rc::Rc;

use bytes::Bytes;

use super::dispatch::Deliverable;
use super::{new_address, AddressTable, Outgoing, Queued};
use crate::broker::{ConnCommand, MessageId, Refusal, SharedMessage, StoredMessage};
use crate::mbws::ErrorCode;
use crate::store::{DurableLog, Lsn, Recovery};

/// Message ids are reserved in the log this many at a time (see the module docs). A restart
/// skips at most this many ids; 2^44 restarts fit in the id space.
pub const ID_RESERVATION_BLOCK: u64 = 1 << 20;

impl AddressTable {
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
        // Declared durable addresses (`declare_address`) may be there already.
        self.durable_addresses.extend(durable_addresses);
    }

    /// Puts recovered messages back in their queues (marked redelivered: they may have been
    /// delivered before the restart) and continues message ids above every logged one.
    pub fn restore(&mut self, recovery: Recovery, now_ms: u64, now_unix_ms: u64) {
        self.unix_offset_ms = now_unix_ms.saturating_sub(now_ms);
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
            let mut message =
                StoredMessage::from_fields(&recovered.address, &recovered.properties, &recovered.body, true);
            message.expires_at_ms = expires_at_ms;
            let message = SharedMessage::new(message);
            let state = match self.addresses.get_mut(&recovered.address) {
                Some(state) => state,
                None => new_address(&mut self.addresses, &recovered.address),
            };
            state.queued_bytes += message.body().len();
            self.queued_bytes += message.body().len();
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
        message.durable || self.is_durable_address(message.address())
    }

    /// Every message of `address` is durable (`--durable-address`), whatever its SEND says.
    pub fn is_durable_address(&self, address: &[u8]) -> bool {
        self.durable_addresses.iter().any(|pattern| match pattern.strip_suffix(b"*") {
            Some(prefix) => address.starts_with(prefix),
            None => address == pattern,
        })
    }

    /// Records that a message is done with; a no-op for messages that were never logged.
    pub(super) fn settle(&self, address: &[u8], message: &StoredMessage, id: MessageId) {
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
            super::admission::push_accepted(out, publisher, seq);
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
    pub(super) fn next_message_id(&mut self) -> (MessageId, Lsn) {
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
    /// the log is failed (no reservation can become durable any more). Inline: on the path of
    /// every SEND, where the id nearly always is reserved already (as a call returning its
    /// `Result`, about 12 instructions per message).
    #[inline(always)]
    pub(super) fn refuse_if_ids_cannot_be_reserved(&self) -> Result<(), Refusal> {
        if self.last_message_id < self.ids_durably_reserved {
            return Ok(());
        }
        self.refuse_if_log_failed_for_ids()
    }

    /// [`AddressTable::refuse_if_ids_cannot_be_reserved`] past the durable reservation.
    fn refuse_if_log_failed_for_ids(&self) -> Result<(), Refusal> {
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
            state.queued_bytes = state.queue.iter().map(|queued| queued.message.body().len()).sum();
            self.queued_bytes -= before - state.queued_bytes;
            state.multicast_log.drop_from(held_from, &mut state.multicast);
        }
    }

    /// Whether `message` must be logged; refused while the durable log is failed. Inline: on
    /// the path of every SEND, where nearly always nothing is durable (37 instructions per
    /// message as a call returning its `Result`).
    #[inline(always)]
    pub(super) fn refuse_if_log_failed(&self, message: &StoredMessage) -> Result<bool, Refusal> {
        if self.log.is_none() || (!message.durable && self.durable_addresses.is_empty()) {
            return Ok(false);
        }
        self.refuse_if_durable_and_log_failed(message)
    }

    /// [`AddressTable::refuse_if_log_failed`] for a message that may be durable.
    fn refuse_if_durable_and_log_failed(&self, message: &StoredMessage) -> Result<bool, Refusal> {
        let durable = self.is_durable(message);
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
}
