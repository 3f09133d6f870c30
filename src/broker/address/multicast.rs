//! The multicast backlog of one address: one shared log of the address's recent multicast
//! messages and a cursor per multicast subscriber, instead of a copy of every message in every
//! subscriber's own backlog. A message that some subscriber cannot take at once is appended to
//! the log once (one entry, whatever the number of subscribers); a subscriber takes from the
//! log at its cursor as its credit allows (`dispatch::drain_backlog`), and the log is trimmed
//! from its front as the slowest cursor passes. What must go to one subscriber alone (a
//! redelivery after an ack timeout, a NACK with requeue) waits in that subscriber's `front`,
//! and is delivered before anything of the log.
//!
//! Positions count the messages appended to the log since the address was made: the log holds
//! positions `first..end()`, and a subscriber's cursor is the position of the next log message
//! it gets. A subscriber's backlog (what waits for its credit, what the bound
//! `max_queued_messages` counts) is its front and the log from its cursor on ([`lag`]).
//!
//! Invariants (asserted in debug builds: the cursor bounds on every delivery, the rest by
//! [`MulticastLog::check`] where the table walks every subscriber anyway):
//! - every multicast subscriber's cursor is in `first..=end()`; a new one starts at `end()`,
//!   so it gets only messages published after it subscribed;
//! - with subscribers, `first` is the lowest cursor and `at_first` counts the subscribers at
//!   it (so the log holds nothing that every subscriber has passed, and the count says when
//!   the slowest moves on without a walk of the others); without, the log is empty;
//! - ids increase along the log (they are handed out in order), so what the durable log holds
//!   back (`Address::held_from`) is a suffix of it;
//! - `fronts` is the sum of the subscribers' front lengths;
//! - the log holds at most `max_queued_messages` entries once a publish is done: a subscriber
//!   whose backlog would pass the bound is ended (4429) before the message is appended, and
//!   the log is no longer than the longest backlog.

use std::collections::VecDeque;

use super::subscribers::Subscriber;
use super::{MessageId, Queued};

#[derive(Debug, Default)]
pub(super) struct MulticastLog {
    /// The messages at positions `first..end()`, oldest first.
    entries: VecDeque<Queued>,
    /// The position of `entries[0]`.
    first: u64,
    /// Multicast subscribers whose cursor is `first`.
    at_first: usize,
    /// Redeliveries waiting in the subscribers' fronts, all together.
    pub(super) fronts: usize,
}

/// What waits for `subscriber`'s credit: its front and the log from its cursor on.
#[inline]
pub(super) fn lag(log: &MulticastLog, subscriber: &Subscriber) -> usize {
    debug_assert!(log.first <= subscriber.cursor && subscriber.cursor <= log.end());
    subscriber.front.len() + (log.end() - subscriber.cursor) as usize
}

impl MulticastLog {
    /// The position after the newest message.
    #[inline]
    pub(super) fn end(&self) -> u64 {
        self.first + self.entries.len() as u64
    }

    /// The messages the log holds.
    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    /// The message at `position`, if the log holds it.
    #[inline]
    pub(super) fn get(&self, position: u64) -> Option<&Queued> {
        debug_assert!(position >= self.first, "a cursor behind the log's front");
        self.entries.get((position - self.first) as usize)
    }

    /// The messages from `position` on, oldest first (nothing if the log ends before it).
    #[inline]
    pub(super) fn from(&self, position: u64) -> std::collections::vec_deque::Iter<'_, Queued> {
        debug_assert!(self.first <= position && position <= self.end(), "a cursor outside the log");
        let offset = ((position - self.first) as usize).min(self.entries.len());
        self.entries.range(offset..)
    }

    /// Appends the address's newest message.
    #[inline]
    pub(super) fn append(&mut self, queued: Queued) {
        debug_assert!(self.entries.back().is_none_or(|last| last.id < queued.id), "ids increase along the log");
        self.entries.push_back(queued);
    }

    /// The cursor of a new subscriber: the log's end (it gets what is published from now on).
    pub(super) fn join(&mut self) -> u64 {
        if self.entries.is_empty() {
            self.at_first += 1;
        }
        self.end()
    }

    /// A subscriber moved its cursor from `from` to further on: the log drops what the slowest
    /// subscriber has passed. `subscribers` are the address's multicast subscribers.
    #[inline]
    pub(super) fn moved_from(&mut self, from: u64, subscribers: &[Subscriber]) {
        if from == self.first {
            debug_assert!(self.at_first > 0);
            self.at_first -= 1;
            if self.at_first == 0 {
                self.trim(subscribers);
            }
        }
    }

    /// A subscriber with its cursor at `cursor` and `front` redeliveries left; `subscribers`
    /// are the ones that stay.
    pub(super) fn left(&mut self, cursor: u64, front: usize, subscribers: &[Subscriber]) {
        self.fronts -= front;
        if cursor == self.first {
            self.at_first -= 1;
        }
        if self.at_first == 0 || subscribers.is_empty() {
            self.trim(subscribers);
        }
    }

    /// Drops what every subscriber has passed and counts the subscribers at the front again (a
    /// walk of every subscriber); without subscribers the log is emptied.
    pub(super) fn trim(&mut self, subscribers: &[Subscriber]) {
        let lowest = subscribers.iter().map(|subscriber| subscriber.cursor).min().unwrap_or(self.end());
        debug_assert!(self.first <= lowest && lowest <= self.end());
        self.entries.drain(..(lowest - self.first) as usize);
        self.first = lowest;
        self.at_first = subscribers.iter().filter(|subscriber| subscriber.cursor == lowest).count();
        self.check(subscribers);
    }

    /// Drops the messages with ids from `held_from` on (a suffix: ids increase along the log)
    /// and moves the cursors past the new end back to it: what a failed durable log holds back
    /// is never delivered.
    pub(super) fn drop_from(&mut self, held_from: MessageId, subscribers: &mut [Subscriber]) {
        let kept = self.entries.partition_point(|queued| queued.id < held_from);
        self.entries.truncate(kept);
        let end = self.end();
        for subscriber in subscribers.iter_mut() {
            subscriber.cursor = subscriber.cursor.min(end);
            subscriber.front.retain(|queued| queued.id < held_from);
        }
        self.fronts = subscribers.iter().map(|subscriber| subscriber.front.len()).sum();
        self.trim(subscribers);
    }

    /// Asserts the invariants that need a walk of every subscriber (module docs), in debug
    /// builds.
    pub(super) fn check(&self, subscribers: &[Subscriber]) {
        if cfg!(debug_assertions) {
            let end = self.end();
            assert!(subscribers.iter().all(|subscriber| self.first <= subscriber.cursor && subscriber.cursor <= end));
            assert_eq!(self.at_first, subscribers.iter().filter(|subscriber| subscriber.cursor == self.first).count());
            assert!(!subscribers.is_empty() || self.entries.is_empty(), "a log without subscribers");
            assert!(subscribers.is_empty() || self.at_first > 0, "the log's front is the slowest cursor");
            assert_eq!(self.fronts, subscribers.iter().map(|subscriber| subscriber.front.len()).sum::<usize>());
        }
    }
}
