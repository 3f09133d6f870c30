//! The periodic one-line summary (`--summary-interval-secs`): message rates, sessions and
//! queue depth, so that a plain log shows the broker is alive and what it is doing.
//!
//! The main thread asks every shard for its [`ShardReport`] once per interval
//! ([`Running::report`](crate::shard::Running::report)); the shards only keep plain counters,
//! added to once per batch, so the summary costs the message path nothing it would notice.
//! [`Summary`] turns two such snapshots into rates; it reads no clock (the caller passes the
//! instants).

use std::time::Instant;

use crate::shard::core::ShardReport;

/// The totals of the last complete report, to compute rates from.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    at: Instant,
    messages_received: u64,
    messages_delivered: u64,
}

/// One summary: what [`Summary::next`] makes of the shards' reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SummaryLine {
    /// Messages per second since the previous summary (received by address owners, delivered
    /// to consumers).
    pub received_per_sec: f64,
    pub delivered_per_sec: f64,
    /// Totals since start.
    pub messages_received: u64,
    pub messages_delivered: u64,
    pub sessions: usize,
    pub queued_messages: usize,
    pub queued_bytes: usize,
    /// Shards that answered in time, of `shards`: rates and totals are over these only.
    pub shards_reporting: usize,
    pub shards: usize,
}

impl Summary {
    /// Counting from zero at `started` (the shards count from their start).
    pub fn new(started: Instant) -> Summary {
        Summary { at: started, messages_received: 0, messages_delivered: 0 }
    }

    /// The summary of `reports` (from `shards` shards) taken at `now`. Rates are over the time
    /// since the last call whose every shard answered; a partial report does not move that
    /// mark, so the next complete one gives the true rate.
    pub fn next(&mut self, reports: &[ShardReport], shards: usize, now: Instant) -> SummaryLine {
        let messages_received = reports.iter().map(|report| report.messages_received).sum();
        let messages_delivered = reports.iter().map(|report| report.messages_delivered).sum();
        let seconds = now.saturating_duration_since(self.at).as_secs_f64().max(1e-3);
        let rate = |now: u64, before: u64| (now.saturating_sub(before) as f64 / seconds * 10.0).round() / 10.0;
        let line = SummaryLine {
            received_per_sec: rate(messages_received, self.messages_received),
            delivered_per_sec: rate(messages_delivered, self.messages_delivered),
            messages_received,
            messages_delivered,
            sessions: reports.iter().map(|report| report.sessions).sum(),
            queued_messages: reports.iter().map(|report| report.queued_messages).sum(),
            queued_bytes: reports.iter().map(|report| report.queued_bytes).sum(),
            shards_reporting: reports.len(),
            shards,
        };
        if reports.len() == shards {
            *self = Summary { at: now, messages_received, messages_delivered };
        }
        line
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::broker::ShardId;

    fn report(shard: u16, received: u64, delivered: u64) -> ShardReport {
        ShardReport {
            shard: ShardId(shard),
            messages_received: received,
            messages_delivered: delivered,
            sessions: 2,
            queued_messages: 3,
            queued_bytes: 40,
        }
    }

    #[test]
    fn rates_are_per_second_since_the_last_complete_report() {
        let start = Instant::now();
        let mut summary = Summary::new(start);
        let line = summary.next(&[report(0, 100, 50), report(1, 100, 50)], 2, start + Duration::from_secs(10));
        assert_eq!((line.received_per_sec, line.delivered_per_sec), (20.0, 10.0));
        assert_eq!((line.sessions, line.queued_messages, line.queued_bytes), (4, 6, 80));
        // Shard 1 did not answer: reported as such, and the mark stays at 10 s.
        let partial = summary.next(&[report(0, 400, 50)], 2, start + Duration::from_secs(20));
        assert_eq!((partial.shards_reporting, partial.shards), (1, 2));
        let line = summary.next(&[report(0, 400, 50), report(1, 400, 50)], 2, start + Duration::from_secs(30));
        assert_eq!(line.received_per_sec, 30.0, "600 more messages over the 20 s since the last complete report");
        assert_eq!(line.messages_received, 800);
    }
}
