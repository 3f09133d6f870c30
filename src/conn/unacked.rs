//! A session's unacknowledged deliveries, in delivery-sequence order.
//!
//! Delivery sequence numbers are handed out 1, 2, 3... and a delivery is recorded when it gets
//! its number, so entries only ever arrive at the back, in increasing order. Consumers almost
//! always acknowledge in that order too (cumulative ACKs, or single ACKs of the oldest), so the
//! common operations touch only the front: a `VecDeque` sorted by sequence, searched by binary
//! search, does every operation without hashing or tree rebalancing and without per-entry
//! allocation. An acknowledgement out of order removes from the middle (a shift of at most half
//! the entries); the number of entries is bounded by the subscriptions' credit.

use std::collections::VecDeque;

/// Entries keyed by an increasing `u64` sequence.
#[derive(Debug)]
pub struct Unacked<T> {
    entries: VecDeque<(u64, T)>,
}

impl<T> Default for Unacked<T> {
    fn default() -> Self {
        Unacked { entries: VecDeque::new() }
    }
}

impl<T> Unacked<T> {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Records `value` under `seq`, which must be above every sequence recorded so far.
    pub fn push(&mut self, seq: u64, value: T) {
        assert!(
            self.entries.back().is_none_or(|(last, _)| *last < seq),
            "delivery sequences must increase: {seq} after {:?}",
            self.entries.back().map(|(last, _)| *last)
        );
        self.entries.push_back((seq, value));
    }

    /// Takes the entry of `seq`, if there is one.
    pub fn remove(&mut self, seq: u64) -> Option<T> {
        if self.entries.front().is_some_and(|(first, _)| *first == seq) {
            return self.entries.pop_front().map(|(_, value)| value);
        }
        let index = self.entries.binary_search_by_key(&seq, |(entry, _)| *entry).ok()?;
        self.entries.remove(index).map(|(_, value)| value)
    }

    /// Takes every entry up to and including `seq`, oldest first.
    pub fn remove_through(&mut self, seq: u64, mut each: impl FnMut(T)) {
        while self.entries.front().is_some_and(|(first, _)| *first <= seq) {
            let (_, value) = self.entries.pop_front().expect("checked above");
            each(value);
        }
    }

    /// Entries with a sequence above `seq`, oldest first.
    pub fn after(&self, seq: u64) -> impl Iterator<Item = (u64, &T)> {
        let start = self.entries.partition_point(|(entry, _)| *entry <= seq);
        self.entries.range(start..).map(|(seq, value)| (*seq, value))
    }

    pub fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) {
        self.entries.retain(|(_, value)| keep(value));
    }

    pub fn clear(&mut self) {
        self.entries.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::Unacked;

    fn filled(seqs: &[u64]) -> Unacked<u64> {
        let mut unacked = Unacked::default();
        for &seq in seqs {
            unacked.push(seq, seq * 10);
        }
        unacked
    }

    #[test]
    fn removes_from_the_front_the_middle_and_not_twice() {
        let mut unacked = filled(&[1, 2, 3, 5, 8]);
        assert_eq!(unacked.remove(1), Some(10));
        assert_eq!(unacked.remove(5), Some(50));
        assert_eq!(unacked.remove(5), None);
        assert_eq!(unacked.remove(4), None);
        assert_eq!(unacked.remove(9), None);
        assert_eq!(unacked.after(0).map(|(seq, _)| seq).collect::<Vec<_>>(), vec![2, 3, 8]);
    }

    #[test]
    fn cumulative_removal_stops_after_the_sequence() {
        let mut unacked = filled(&[3, 4, 6, 7]);
        let mut taken = Vec::new();
        unacked.remove_through(6, |value| taken.push(value));
        assert_eq!(taken, vec![30, 40, 60]);
        assert_eq!(unacked.len(), 1);
        unacked.remove_through(2, |_| panic!("nothing at or below 2"));
        assert_eq!(unacked.after(6).map(|(seq, value)| (seq, *value)).collect::<Vec<_>>(), vec![(7, 70)]);
    }

    #[test]
    fn after_skips_everything_up_to_the_sequence() {
        let unacked = filled(&[2, 4, 6]);
        assert_eq!(unacked.after(3).map(|(seq, _)| seq).collect::<Vec<_>>(), vec![4, 6]);
        assert_eq!(unacked.after(6).count(), 0);
        assert_eq!(unacked.after(0).count(), 3);
    }

    #[test]
    #[should_panic(expected = "delivery sequences must increase")]
    fn out_of_order_insertion_is_a_bug() {
        let mut unacked = filled(&[5]);
        unacked.push(5, 0);
    }
}
