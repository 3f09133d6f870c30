//! How long the shard's rounds of input take: from a read's bytes reaching the shard
//! ([`Shard::bytes_read`](super::Shard::bytes_read)) to the end of the round of work they
//! started ([`Shard::run_work`](super::Shard::run_work): decoded, routed, deliveries queued,
//! writers woken). That is the broker's own share of a message's latency before its write is
//! submitted; a long one delays every message that arrives meanwhile (docs/PERFORMANCE.md,
//! "Session 15"). Wall time: a shard preempted by another process shows it too.
//!
//! One record per read, never per message, and no clock read of its own: the round's start is
//! the time `bytes_read` reads anyway, its end the time `run_work` reads anyway
//! (`crate::clock`). Bounded: a fixed array of counters per shard.

/// Upper bounds (nanoseconds) of the buckets; a last one, +Inf, takes the rest.
pub const ROUND_BUCKETS_NS: [u64; 12] = [
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    100_000_000,
];

/// Round durations counted in the buckets of [`ROUND_BUCKETS_NS`] (not cumulative: bucket i
/// counts the durations above bound i-1 and at most bound i; the last, those above them all).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RoundHistogram {
    pub buckets: [u64; ROUND_BUCKETS_NS.len() + 1],
    pub sum_ns: u64,
    pub count: u64,
}

impl RoundHistogram {
    pub fn record(&mut self, nanos: u64) {
        let bucket = ROUND_BUCKETS_NS.iter().position(|&bound| nanos <= bound).unwrap_or(ROUND_BUCKETS_NS.len());
        self.buckets[bucket] += 1;
        self.sum_ns = self.sum_ns.saturating_add(nanos);
        self.count += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_lands_in_the_first_bucket_whose_bound_it_does_not_exceed() {
        let mut rounds = RoundHistogram::default();
        rounds.record(5_000);
        rounds.record(5_001);
        rounds.record(3_000_000);
        rounds.record(200_000_000);
        assert_eq!(rounds.buckets[0], 1, "5 us is at most the first bound");
        assert_eq!(rounds.buckets[1], 1, "just over 5 us goes to the 10 us bucket");
        assert_eq!(rounds.buckets[9], 1, "3 ms goes to the 5 ms bucket");
        assert_eq!(rounds.buckets[ROUND_BUCKETS_NS.len()], 1, "beyond the last bound: +Inf");
        assert_eq!((rounds.count, rounds.sum_ns), (4, 203_010_001));
    }
}
