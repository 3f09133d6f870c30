//! The broker's clocks, read only by the IO shell (the shard core and the address table take
//! the time as an input, so the simulator can pass virtual time instead).

use std::sync::OnceLock;
use std::time::Instant;

/// Milliseconds on a monotonic clock shared by all shards (message expiry is compared across
/// shards, so they must agree on the epoch).
pub fn now_ms() -> u64 {
    ms_at(Instant::now())
}

/// [`now_ms`] of an instant already read, for a caller that needs the `Instant` too (the
/// shard times its rounds with the read it makes for the round's milliseconds).
pub fn ms_at(instant: Instant) -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    instant.saturating_duration_since(*EPOCH.get_or_init(|| instant)).as_millis() as u64
}

/// Wall-clock milliseconds since the Unix epoch (for what outlives the process: the log).
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |since| since.as_millis() as u64)
}
