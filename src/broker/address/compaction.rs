//! Compaction of what waits long: a message that stays in an anycast queue is copied out of
//! the publisher's read buffer (see [`StoredMessage::compact`](crate::broker::StoredMessage::compact)),
//! so that it stops holding that buffer (64 KiB by default) alive, but only once it has waited:
//! a message delivered promptly, what a queue with consumers that keep up is made of, is never
//! copied.
//!
//! Messages enter an anycast queue as they arrived, with two bounds on the buffers they hold:
//! - time: the shard's timer (through [`AddressTable::compact_waiting`], called by the core's
//!   `on_deadline`) ticks every [`COMPACTION_TICK_MS`] while any address holds such messages,
//!   and compacts those that were already queued at the tick before: a message holds its read
//!   buffer for at most two ticks;
//! - buffers: consecutive SENDs of one read lie next to each other in its buffer (only the next
//!   frame's header and fixed fields between them), and so do the tails of consecutive text
//!   SENDs in their thread's text chunk (`broker::text_tails`, nothing between them), so a
//!   message that directly follows the one queued before it holds no buffer that one does
//!   not. A message that does not starts a *run*;
//!   an address holds at most [`MAX_UNCOMPACTED_RUNS`] runs (so as many buffers, beyond the
//!   queued bytes themselves), and a message that would start one more is compacted at once.
//!   (Two buffers that happen to lie next to each other may be taken for one run: the time
//!   bound still holds for them.)
//!
//! Multicast backlogs are compacted as they are queued (a message there is shared by every
//! backlog that holds it).
//!
//! The messages not compacted yet are always among the last `UncompactedTail::messages` of
//! their queue: they are only ever added at the back, and anything taken out of the queue
//! (deliveries from the front, a purge, a redelivery put back at the front) can only move them
//! closer to the back. So the count is clamped to the queue's length where it is used, and no
//! other code path has to maintain it.

use bytes::Bytes;

use super::{Address, AddressTable};
use crate::broker::{CompactionArena, SharedMessage, StoredMessage};

/// How often the timer compacts waiting messages, while some are not compacted yet: a message
/// is compacted after waiting between one and two of these.
pub const COMPACTION_TICK_MS: u64 = 1000;

/// The most runs (read buffers, see the module docs) that the uncompacted messages of one
/// address may hold: a message that would start one more is compacted at once.
pub const MAX_UNCOMPACTED_RUNS: usize = 256;

/// Most bytes between two SENDs of one read: the second's WebSocket header (at most 14) and
/// its SEND fields before the address (12); a message this close after the one queued before
/// it continues that one's run.
const MAX_BYTES_BETWEEN_SENDS: usize = 32;

/// The back of an anycast queue that may not be compacted yet (see the module docs).
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct UncompactedTail {
    /// The messages not compacted yet are among the last this many of the queue.
    messages: usize,
    /// Of those, the first this many were queued before the last tick: the next tick
    /// compacts them.
    before_last_tick: usize,
    /// Runs among them, at most (a message taken out may end a run or not).
    runs: usize,
    /// Where the last message queued uncompacted ends in memory (its address as a number, only
    /// compared, never read): the next one starts close after it if it continues its run.
    last_end: usize,
    /// The address is in the table's `to_compact` list.
    listed: bool,
}

impl UncompactedTail {
    /// Clamps the counts to a queue now `queue_len` long: messages taken from the front were
    /// the oldest of the tail.
    fn clamp(&mut self, queue_len: usize) {
        if self.messages > queue_len {
            let gone = self.messages - queue_len;
            self.before_last_tick = self.before_last_tick.saturating_sub(gone);
            self.messages = queue_len;
            self.runs = self.runs.min(queue_len);
        }
    }
}

impl AddressTable {
    /// Puts `message` at the back of `state`'s anycast queue as it is, or compacted when it
    /// would start a run past [`MAX_UNCOMPACTED_RUNS`]; `address_name` is the address's key in
    /// the table. Inlined: it runs once per message queued; what is rare (a compaction at once,
    /// listing the address) is called.
    #[inline(always)]
    pub(super) fn queue_uncompacted(
        &mut self,
        state: &mut Address,
        address_name: &Bytes,
        message: &mut SharedMessage,
        now_ms: u64,
    ) {
        let tail = &mut state.uncompacted;
        tail.clamp(state.queue.len());
        let bytes = message.tail().as_bytes();
        let start = bytes.as_ptr() as usize;
        let continues_run = tail.messages > 0 && start.wrapping_sub(tail.last_end) <= MAX_BYTES_BETWEEN_SENDS;
        // Counted either way: the tail must reach back over the older ones.
        tail.messages += 1;
        if !continues_run {
            if tail.runs >= MAX_UNCOMPACTED_RUNS {
                self.compact_at_once(message);
                tail.last_end = 0;
                return;
            }
            tail.runs += 1;
        }
        tail.last_end = start + bytes.len();
        if !tail.listed {
            tail.listed = true;
            self.list_for_compaction(address_name, now_ms);
        }
    }

    /// [`compact_to_wait`], out of [`AddressTable::queue_uncompacted`]'s inlined path.
    #[cold]
    fn compact_at_once(&mut self, message: &mut SharedMessage) {
        compact_to_wait(&mut self.arena, message);
    }

    /// Lists an address whose queue now holds messages not compacted yet for the timer's
    /// ticks, and schedules the next tick if none is.
    fn list_for_compaction(&mut self, address_name: &Bytes, now_ms: u64) {
        self.to_compact.push(address_name.clone());
        if self.compaction_due_at_ms.is_none() {
            let due_at_ms = now_ms + COMPACTION_TICK_MS;
            self.compaction_due_at_ms = Some(due_at_ms);
            self.compaction_scheduled = Some(due_at_ms);
        }
    }

    /// When the timer should next call [`AddressTable::compact_waiting`]; `None` while no
    /// queued message waits uncompacted.
    pub fn compaction_deadline(&self) -> Option<u64> {
        self.compaction_due_at_ms
    }

    /// A compaction tick was scheduled since the last call, at the time returned: the timer
    /// must wake by then.
    pub fn take_compaction_scheduled(&mut self) -> Option<u64> {
        self.compaction_scheduled.take()
    }

    /// The timer's compaction tick: compacts every queued message that was queued before the
    /// previous tick and is still waiting, and schedules the next tick if any wait uncompacted.
    pub fn compact_waiting(&mut self, now_ms: u64) {
        if self.compaction_due_at_ms.is_none_or(|due_at_ms| due_at_ms > now_ms) {
            return;
        }
        let mut listed = std::mem::take(&mut self.to_compact);
        // An address dropped and made again may be listed twice.
        listed.sort_unstable();
        listed.dedup();
        for name in listed {
            let Some(state) = self.addresses.get_mut(&name) else { continue };
            let queue_len = state.queue.len();
            let tail = &mut state.uncompacted;
            tail.clamp(queue_len);
            let first = queue_len - tail.messages;
            for queued in state.queue.range_mut(first..first + tail.before_last_tick) {
                compact_to_wait(&mut self.arena, &mut queued.message);
            }
            tail.messages -= tail.before_last_tick;
            tail.before_last_tick = tail.messages;
            // Those left continue at most as many runs as were started since.
            tail.runs = tail.runs.min(tail.messages);
            tail.listed = tail.messages > 0;
            if tail.listed {
                self.to_compact.push(name);
            }
        }
        self.compaction_due_at_ms = (!self.to_compact.is_empty()).then_some(now_ms + COMPACTION_TICK_MS);
    }
}

/// Compacts a message that is going to wait (see [`StoredMessage::compact`]): in place when
/// nothing else shares it and it has a slot of its own, as a compacted copy in a slot of its
/// own otherwise (a message left in its slab would keep the slab alive as long as it waits:
/// `broker::shared_message`'s memory bound).
pub(super) fn compact_to_wait(arena: &mut CompactionArena, message: &mut SharedMessage) {
    match SharedMessage::get_mut_own_slot(message) {
        Some(only_reference) => only_reference.compact(arena),
        None => {
            let mut copy = StoredMessage::clone(message);
            copy.compact(arena);
            *message = SharedMessage::new(copy);
        }
    }
}
