//! Slowing down repeated authentication failures from one peer address (sans-IO).
//!
//! Each shard keeps its own [`FailureTable`] (SO_REUSEPORT spreads one peer's connections over
//! the shards, so a peer gets at most `shards` times the rate; a shared table would put a lock
//! on every connection's path). A peer's first failure costs nothing; each further failure
//! within [`FORGET_AFTER_MS`] doubles the wait before its next credentials are checked, from
//! [`FIRST_DELAY_MS`] up to [`MAX_DELAY_MS`]. A success forgets the peer. The table holds at
//! most [`MAX_FAILURE_ENTRIES`] peers; a new one then replaces the one quiet for longest.

use std::collections::HashMap;
use std::net::IpAddr;

/// Most peers one shard remembers.
pub const MAX_FAILURE_ENTRIES: usize = 4096;
/// The wait after the second failure in a row; it doubles with each further one.
pub const FIRST_DELAY_MS: u64 = 250;
/// The longest wait.
pub const MAX_DELAY_MS: u64 = 5_000;
/// A peer without a failure for this long starts afresh.
pub const FORGET_AFTER_MS: u64 = 60_000;

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    last_ms: u64,
}

#[derive(Debug, Default)]
pub struct FailureTable {
    peers: HashMap<IpAddr, Failures>,
}

impl FailureTable {
    /// How long to wait, at `now_ms`, before checking credentials from `peer`.
    pub fn delay_ms(&self, peer: IpAddr, now_ms: u64) -> u64 {
        match self.peers.get(&peer) {
            Some(failures) if now_ms.saturating_sub(failures.last_ms) < FORGET_AFTER_MS && failures.count > 1 => {
                let doublings = (failures.count - 2).min(16);
                (FIRST_DELAY_MS << doublings).min(MAX_DELAY_MS)
            }
            _ => 0,
        }
    }

    pub fn record_failure(&mut self, peer: IpAddr, now_ms: u64) {
        if !self.peers.contains_key(&peer) && self.peers.len() >= MAX_FAILURE_ENTRIES {
            let quietest = self.peers.iter().min_by_key(|(_, failures)| failures.last_ms).map(|(peer, _)| *peer);
            if let Some(quietest) = quietest {
                self.peers.remove(&quietest);
            }
        }
        let entry = self.peers.entry(peer).or_insert(Failures { count: 0, last_ms: now_ms });
        if now_ms.saturating_sub(entry.last_ms) >= FORGET_AFTER_MS {
            entry.count = 0;
        }
        entry.count = entry.count.saturating_add(1);
        entry.last_ms = now_ms;
        debug_assert!(self.peers.len() <= MAX_FAILURE_ENTRIES);
    }

    pub fn record_success(&mut self, peer: IpAddr) {
        self.peers.remove(&peer);
    }

    pub fn len(&self) -> usize {
        self.peers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn repeated_failures_wait_longer_up_to_the_cap_and_a_success_or_time_forgets_them() {
        let mut table = FailureTable::default();
        table.record_failure(ip(1), 0);
        assert_eq!(table.delay_ms(ip(1), 0), 0, "one mistake is free");
        table.record_failure(ip(1), 0);
        assert_eq!(table.delay_ms(ip(1), 0), FIRST_DELAY_MS);
        table.record_failure(ip(1), 0);
        assert_eq!(table.delay_ms(ip(1), 0), 2 * FIRST_DELAY_MS);
        for _ in 0..40 {
            table.record_failure(ip(1), 0);
        }
        assert_eq!(table.delay_ms(ip(1), 0), MAX_DELAY_MS);
        assert_eq!(table.delay_ms(ip(2), 0), 0, "other peers are not slowed");
        assert_eq!(table.delay_ms(ip(1), FORGET_AFTER_MS), 0, "forgotten after a quiet minute");
        table.record_success(ip(1));
        assert_eq!(table.delay_ms(ip(1), 0), 0);
    }

    #[test]
    fn the_table_is_bounded_and_drops_the_quietest_peer() {
        let mut table = FailureTable::default();
        for index in 0..MAX_FAILURE_ENTRIES as u64 {
            let peer = IpAddr::from((index as u32 + 1).to_be_bytes());
            table.record_failure(peer, index + 1);
        }
        let first = IpAddr::from(1u32.to_be_bytes());
        table.record_failure(ip(200), 1_000_000);
        assert_eq!(table.len(), MAX_FAILURE_ENTRIES);
        assert!(!table.peers.contains_key(&first), "the peer quiet for longest made room");
    }
}
