//! Entries kept in the order of an increasing `u64` key: a session's unacknowledged
//! deliveries (keyed by delivery sequence) and a subscriber's unacknowledged messages in an
//! address table (keyed by message id).
//!
//! Keys are handed out in increasing order and entries arrive in that order (a session's
//! always: [`SortedRing::push`]; an address's almost always, a redelivery being the exception:
//! [`SortedRing::insert`]). Consumers almost always acknowledge in that order too (cumulative
//! ACKs, or single ACKs of the oldest), so the common operations touch only the front: a
//! `VecDeque` sorted by key, searched by binary search, does every operation without hashing,
//! tree rebalancing or per-entry allocation. Out-of-order operations shift at most half the
//! entries; the number of entries is bounded by the subscriptions' credit.
//!
//! An entry carries its own key ([`Keyed`]): an address's unacknowledged message already holds
//! its id, and storing the id again beside it made every entry a third larger (32 bytes instead
//! of 24). With fan-out to 1,000 subscribers these rings are megabytes that every delivery
//! writes into, so their size is cache misses (docs/PERFORMANCE.md, session 9).

use std::collections::VecDeque;

/// An entry of a [`SortedRing`]: the key it is sorted by.
pub trait Keyed {
    fn key(&self) -> u64;
}

/// A value stored with a key of its own.
impl<T> Keyed for (u64, T) {
    #[inline]
    fn key(&self) -> u64 {
        self.0
    }
}

/// Entries sorted by their `u64` key, each key at most once.
#[derive(Debug)]
pub struct SortedRing<T> {
    entries: VecDeque<T>,
}

impl<T> Default for SortedRing<T> {
    fn default() -> Self {
        SortedRing { entries: VecDeque::new() }
    }
}

impl<T: Keyed> SortedRing<T> {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Records `entry`, whose key must be above every key recorded so far. Inlined: it runs
    /// once per delivery, and its work is a comparison and a `push_back`.
    #[inline(always)]
    pub fn push(&mut self, entry: T) {
        let seq = entry.key();
        if self.entries.back().is_some_and(|last| last.key() >= seq) {
            Self::out_of_order(seq, self.entries.back().map(Keyed::key));
        }
        self.entries.push_back(entry);
    }

    /// Records `entries`, in increasing key order and each above every key recorded so far,
    /// as a run: what [`SortedRing::push`] does for each, with the order checked once where
    /// the run joins the ring (release builds too) and along the run in debug builds.
    #[inline(always)]
    pub fn extend_newest(&mut self, entries: impl Iterator<Item = T>) {
        let before = self.entries.len();
        self.entries.extend(entries);
        if before > 0 && before < self.entries.len() && self.entries[before - 1].key() >= self.entries[before].key() {
            Self::out_of_order(self.entries[before].key(), Some(self.entries[before - 1].key()));
        }
        debug_assert!(
            (before.max(1)..self.entries.len()).all(|i| self.entries[i - 1].key() < self.entries[i].key()),
            "a run of keys out of order"
        );
    }

    #[cold]
    #[inline(never)]
    fn out_of_order(seq: u64, last: Option<u64>) -> ! {
        panic!("delivery sequences must increase: {seq} after {last:?}")
    }

    /// Records `entry` in its place among the keys recorded so far (at the back, as
    /// [`SortedRing::push`], when its key is the highest). A key already present is a bug.
    /// Inlined: an address runs it once per client-ack delivery.
    #[inline(always)]
    pub fn insert(&mut self, entry: T) {
        let key = entry.key();
        if self.entries.back().is_none_or(|last| last.key() < key) {
            self.entries.push_back(entry);
            return;
        }
        self.insert_in_place(key, entry);
    }

    /// [`SortedRing::insert`] of a key below the highest (a redelivery): out of line.
    #[cold]
    fn insert_in_place(&mut self, key: u64, entry: T) {
        match self.entries.binary_search_by_key(&key, Keyed::key) {
            Err(position) => self.entries.insert(position, entry),
            // Each key at most once: in release builds too, since going on would drop `entry`
            // (a delivery or an unacknowledged message) without a trace. Only the rare
            // out-of-order path pays for this check.
            Ok(_) => panic!("key {key} is already in the ring"),
        }
    }

    fn position(&self, key: u64) -> Option<usize> {
        if self.entries.front().is_some_and(|first| first.key() == key) {
            return Some(0);
        }
        self.entries.binary_search_by_key(&key, Keyed::key).ok()
    }

    pub fn contains(&self, key: u64) -> bool {
        self.position(key).is_some()
    }

    /// Takes the entry of `key`, if there is one.
    pub fn remove(&mut self, key: u64) -> Option<T> {
        match self.position(key)? {
            0 => self.entries.pop_front(),
            position => self.entries.remove(position),
        }
    }

    /// Takes the entries of `keys` (a key not in the ring is skipped) and hands each to `each`.
    /// Keys that are the ring's first entries in the same order, what a cumulative ACK of the
    /// oldest deliveries sends, are taken in one step: a comparison each instead of a search
    /// and a removal each. The rest are taken one by one, as [`SortedRing::remove`].
    pub fn remove_keys(&mut self, keys: impl Iterator<Item = u64> + Clone, mut each: impl FnMut(T)) {
        let front_run = keys.clone().zip(self.entries.iter()).take_while(|(key, entry)| *key == entry.key()).count();
        for entry in self.entries.drain(..front_run) {
            each(entry);
        }
        for key in keys.skip(front_run) {
            if let Some(entry) = self.remove(key) {
                each(entry);
            }
        }
    }

    /// Takes the entries of the keys `first .. first + count` (a key not in the ring is
    /// skipped), oldest first, and hands each to `each`: what [`SortedRing::remove_keys`] does
    /// with those keys. When they are exactly the ring's first `count` entries (a cumulative
    /// ACK of the oldest deliveries, all consecutive ids), two comparisons find it: keys are
    /// distinct and increasing, so a first entry of key `first` and a `count`-th of key
    /// `first + count - 1` leave no room for another key between them.
    pub fn remove_key_run(&mut self, first: u64, count: usize, mut each: impl FnMut(T)) {
        if count == 0 {
            return;
        }
        if let Some(run) = self.take_front_run(first, count) {
            for entry in run {
                each(entry);
            }
            return;
        }
        self.remove_keys(first..first + count as u64, each);
    }

    /// Takes the ring's first `count` entries when their keys are exactly `first` to
    /// `first + count - 1` (two comparisons, as [`SortedRing::remove_key_run`]), for the
    /// caller to go through in a loop of its own; `None`, and nothing taken, otherwise (or
    /// for a count of 0). The entries the caller does not take are dropped with the iterator.
    #[inline]
    pub fn take_front_run(&mut self, first: u64, count: usize) -> Option<std::collections::vec_deque::Drain<'_, T>> {
        let last = count.checked_sub(1)?;
        let at_front = self.entries.front().is_some_and(|entry| entry.key() == first)
            && self.entries.get(last).is_some_and(|entry| entry.key() == first + last as u64);
        at_front.then(|| self.entries.drain(..count))
    }

    /// How many entries have a key up to and including `seq`. When the keys from the first
    /// to `seq` are consecutive (a session's delivery sequences before a cumulative ACK, as a
    /// rule), one look at the entry `seq - first` places in finds it: keys are distinct and
    /// increasing, so that entry holding `seq` leaves no room for another key below it. Else
    /// (and for a `seq` past the last key, one look at the back) a binary search. The binary
    /// search over a ring of a thousand entries touches about ten cache lines that fan-out
    /// has evicted since the deliveries were recorded (docs/PERFORMANCE.md, session 15).
    pub fn count_through(&self, seq: u64) -> usize {
        let (Some(first), Some(last)) = (self.entries.front(), self.entries.back()) else { return 0 };
        let count = if seq < first.key() {
            0
        } else if last.key() <= seq {
            self.entries.len()
        } else {
            let offset = usize::try_from(seq - first.key()).ok();
            match offset.filter(|&offset| self.entries.get(offset).is_some_and(|entry| entry.key() == seq)) {
                Some(offset) => offset + 1,
                None => self.entries.partition_point(|entry| entry.key() <= seq),
            }
        };
        debug_assert_eq!(count, self.entries.partition_point(|entry| entry.key() <= seq));
        count
    }

    /// Takes the first `count` entries (at most all of them), oldest first: drained at once,
    /// instead of a front test and a `pop_front` per entry.
    pub fn remove_first(&mut self, count: usize, mut each: impl FnMut(T)) {
        for entry in self.entries.drain(..count.min(self.entries.len())) {
            each(entry);
        }
    }

    /// Entries with a key above `seq`, oldest first.
    pub fn after(&self, seq: u64) -> impl Iterator<Item = &T> {
        let start = self.entries.partition_point(|entry| entry.key() <= seq);
        self.entries.range(start..)
    }

    pub fn retain(&mut self, keep: impl FnMut(&T) -> bool) {
        self.entries.retain(keep);
    }

    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// Every entry, lowest key first.
    pub fn into_values(self) -> impl DoubleEndedIterator<Item = T> {
        self.entries.into_iter()
    }
}

#[cfg(test)]
mod tests {
    use super::SortedRing;

    fn filled(seqs: &[u64]) -> SortedRing<(u64, u64)> {
        let mut unacked = SortedRing::default();
        for &seq in seqs {
            unacked.push((seq, seq * 10));
        }
        unacked
    }

    #[test]
    fn removes_from_the_front_the_middle_and_not_twice() {
        let mut unacked = filled(&[1, 2, 3, 5, 8]);
        assert_eq!(unacked.remove(1), Some((1, 10)));
        assert_eq!(unacked.remove(5), Some((5, 50)));
        assert_eq!(unacked.remove(5), None);
        assert_eq!(unacked.remove(4), None);
        assert_eq!(unacked.remove(9), None);
        assert_eq!(unacked.after(0).map(|(seq, _)| *seq).collect::<Vec<_>>(), vec![2, 3, 8]);
    }

    #[test]
    fn cumulative_removal_stops_after_the_sequence() {
        let mut unacked = filled(&[3, 4, 6, 7]);
        let mut taken = Vec::new();
        unacked.remove_first(unacked.count_through(6), |(_, value)| taken.push(value));
        assert_eq!(taken, vec![30, 40, 60]);
        assert_eq!(unacked.len(), 1);
        unacked.remove_first(unacked.count_through(2), |_| panic!("nothing at or below 2"));
        assert_eq!(unacked.after(6).copied().collect::<Vec<_>>(), vec![(7, 70)]);
    }

    #[test]
    fn the_count_through_a_key_is_right_with_and_without_gaps_before_it() {
        let empty: SortedRing<(u64, u64)> = SortedRing::default();
        assert_eq!(empty.count_through(7), 0);
        // Consecutive keys (the look at one entry), then a gap (the search).
        let ring = filled(&[10, 11, 12, 13, 20, 21, 30]);
        let expected = |seq: u64| [10, 11, 12, 13, 20, 21, 30].iter().filter(|&&key| key <= seq).count();
        for seq in [0, 9, 10, 11, 13, 14, 19, 20, 21, 25, 29, 30, 31, u64::MAX] {
            assert_eq!(ring.count_through(seq), expected(seq), "through {seq}");
        }
        // After a gap the entry `seq - first` places in holds a higher key: the search.
        let ring = filled(&[1, 3, 4, 5]);
        assert_eq!(ring.count_through(4), 3);
        assert_eq!(ring.count_through(2), 1);
        let mut ring = filled(&[1, 2, 3, 4, 5, 6]);
        let mut taken = Vec::new();
        ring.remove_first(ring.count_through(4), |(key, _)| taken.push(key));
        assert_eq!(taken, vec![1, 2, 3, 4]);
        ring.remove_first(10, |(key, _)| taken.push(key));
        assert_eq!(taken, vec![1, 2, 3, 4, 5, 6]);
        assert!(ring.is_empty());
    }

    #[test]
    fn removing_keys_takes_the_front_run_then_the_others_and_skips_unknown_ones() {
        let mut ring = filled(&[1, 2, 3, 5, 8, 9]);
        assert_eq!(ring.count_through(5), 4);
        let mut taken = Vec::new();
        // A front run (1, 2), then keys out of order, an unknown one and a repeat.
        ring.remove_keys([1, 2, 8, 4, 3, 8].into_iter(), |(_, value)| taken.push(value));
        assert_eq!(taken, vec![10, 20, 80, 30]);
        assert_eq!(ring.after(0).map(|(seq, _)| *seq).collect::<Vec<_>>(), vec![5, 9]);
        // Keys that are not the front: nothing taken in the front run.
        ring.remove_keys([9, 5].into_iter(), |(_, value)| taken.push(value));
        assert_eq!(taken, vec![10, 20, 80, 30, 90, 50]);
        assert!(ring.is_empty());
        ring.remove_keys([1].into_iter(), |_| panic!("nothing left"));
    }

    /// A run of keys takes the same entries, in the same order, as the list of those keys,
    /// whether the run is the ring's front, starts before it, has gaps in the ring, or
    /// reaches past its end.
    #[test]
    fn a_run_of_keys_takes_what_the_list_of_its_keys_takes() {
        let cases: &[(&[u64], u64, usize)] = &[
            (&[1, 2, 3, 5, 8], 1, 3),
            (&[1, 2, 3, 5, 8], 1, 5),
            (&[1, 2, 3, 5, 8], 2, 2),
            (&[4, 5, 6], 1, 5),
            (&[4, 5, 6], 4, 3),
            (&[4, 5, 6], 4, 4),
            (&[4, 5, 7, 8], 4, 4),
            (&[4, 6], 4, 2),
            (&[], 1, 3),
            (&[3], 3, 0),
        ];
        for &(keys, first, count) in cases {
            let (mut by_run, mut by_list) = (filled(keys), filled(keys));
            let (mut taken_by_run, mut taken_by_list) = (Vec::new(), Vec::new());
            by_run.remove_key_run(first, count, |(key, _)| taken_by_run.push(key));
            by_list.remove_keys(first..first + count as u64, |(key, _)| taken_by_list.push(key));
            assert_eq!(taken_by_run, taken_by_list, "keys {keys:?}, run {first} x {count}");
            assert_eq!(by_run.into_values().collect::<Vec<_>>(), by_list.into_values().collect::<Vec<_>>());
        }
        let mut ring = filled(&[7, 8, 9, 10]);
        let mut taken = Vec::new();
        ring.remove_key_run(7, 3, |(key, _)| taken.push(key));
        assert_eq!((taken, ring.len()), (vec![7, 8, 9], 1), "the front run alone, the rest kept");
    }

    #[test]
    fn after_skips_everything_up_to_the_sequence() {
        let unacked = filled(&[2, 4, 6]);
        assert_eq!(unacked.after(3).map(|(seq, _)| *seq).collect::<Vec<_>>(), vec![4, 6]);
        assert_eq!(unacked.after(6).count(), 0);
        assert_eq!(unacked.after(0).count(), 3);
    }

    #[test]
    fn insert_puts_an_older_key_in_its_place() {
        let mut ring = filled(&[2, 5, 9]);
        ring.insert((4, 40));
        ring.insert((12, 120));
        ring.insert((1, 10));
        assert!(ring.contains(4) && !ring.contains(3));
        assert_eq!(ring.into_values().map(|(_, value)| value).collect::<Vec<_>>(), vec![10, 20, 40, 50, 90, 120]);
    }

    #[test]
    fn a_run_of_newer_keys_is_appended_in_order() {
        let mut ring = filled(&[2, 5]);
        ring.extend_newest([(6, 60), (9, 90)].into_iter());
        ring.extend_newest(std::iter::empty());
        assert_eq!(ring.into_values().map(|(key, _)| key).collect::<Vec<_>>(), vec![2, 5, 6, 9]);
        let mut empty: SortedRing<(u64, u64)> = SortedRing::default();
        empty.extend_newest([(1, 10), (3, 30)].into_iter());
        assert_eq!(empty.len(), 2);
    }

    /// A run that starts at or below the highest key would break the order every search relies
    /// on: it stops the process, in release builds too.
    #[test]
    #[should_panic(expected = "delivery sequences must increase: 5 after Some(5)")]
    fn a_run_that_does_not_follow_the_highest_key_is_a_bug() {
        let mut ring = filled(&[2, 5]);
        ring.extend_newest([(5, 0), (7, 0)].into_iter());
    }

    #[test]
    #[should_panic(expected = "delivery sequences must increase")]
    fn out_of_order_insertion_is_a_bug() {
        let mut unacked = filled(&[5]);
        unacked.push((5, 0));
    }

    /// A key inserted twice would drop one entry silently: it stops the process instead, in
    /// release builds too.
    #[test]
    #[should_panic(expected = "key 5 is already in the ring")]
    fn inserting_a_key_twice_is_a_bug() {
        let mut ring = filled(&[2, 5, 9]);
        ring.insert((5, 0));
    }
}
