//! The end-to-end window: publishers stay at most `window` messages ahead of their consumers.
//!
//! Publisher and consumers share the process, so the generator knows exactly how many messages
//! are in flight through the target. Bounding that keeps every target inside its own limits
//! (an MBWS multicast backlog, mosquitto's per-client queue, a NATS slow-consumer buffer): a run
//! measures the rate a target sustains with no message refused or dropped, rather than how
//! fast it can fill its memory. The bound is per consumer when every consumer gets every
//! message of its addresses, and on the total when consumers compete.

use std::cell::Cell;
use std::rc::Rc;

use super::net::Notify;

/// How deliveries relate to publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Semantics {
    /// Each message goes to one consumer of its address.
    Competing,
    /// Each message goes to every consumer of its address.
    EveryConsumer,
}

pub struct Flow {
    semantics: Semantics,
    window: u64,
    /// Messages published per address.
    published: Vec<Cell<u64>>,
    /// Messages received per consumer.
    received: Vec<Cell<u64>>,
    /// The addresses each consumer receives from.
    consumer_addresses: Vec<Vec<usize>>,
    /// Publishers to wake when deliveries free room; only woken if one found none.
    waiters: Vec<Rc<Notify>>,
    blocked: Cell<bool>,
}

impl Flow {
    pub fn new(
        semantics: Semantics,
        window: u64,
        addresses: usize,
        consumer_addresses: Vec<Vec<usize>>,
        waiters: Vec<Rc<Notify>>,
    ) -> Flow {
        assert!(window > 0, "a zero window would never let a message out");
        assert!(
            consumer_addresses.iter().flatten().all(|&address| address < addresses),
            "consumers receive from known addresses"
        );
        Flow {
            semantics,
            window,
            published: (0..addresses).map(|_| Cell::new(0)).collect(),
            received: consumer_addresses.iter().map(|_| Cell::new(0)).collect(),
            consumer_addresses,
            waiters,
            blocked: Cell::new(false),
        }
    }

    #[inline]
    pub fn on_published(&self, address: usize) {
        let cell = &self.published[address];
        cell.set(cell.get() + 1);
    }

    /// Counts `count` deliveries to `consumer` and wakes blocked publishers.
    pub fn on_delivered(&self, consumer: usize, count: u64) {
        let cell = &self.received[consumer];
        cell.set(cell.get() + count);
        if self.blocked.replace(false) {
            for waiter in &self.waiters {
                waiter.notify();
            }
        }
    }

    pub fn published_total(&self) -> u64 {
        self.published.iter().map(Cell::get).sum()
    }

    pub fn received_total(&self) -> u64 {
        self.received.iter().map(Cell::get).sum()
    }

    /// Messages in flight: in total (competing) or for the furthest-behind consumer.
    pub fn lag(&self) -> u64 {
        match self.semantics {
            Semantics::Competing => self.published_total().saturating_sub(self.received_total()),
            Semantics::EveryConsumer => self
                .consumer_addresses
                .iter()
                .zip(&self.received)
                .map(|(addresses, received)| {
                    let expected: u64 = addresses.iter().map(|&address| self.published[address].get()).sum();
                    expected.saturating_sub(received.get())
                })
                .max()
                .unwrap_or(0),
        }
    }

    /// How many more messages a publisher may send now; marks the flow blocked at zero so the
    /// next delivery wakes the publishers.
    pub fn room(&self) -> u64 {
        let room = self.window.saturating_sub(self.lag());
        if room == 0 {
            self.blocked.set(true);
        }
        room
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn competing_consumers_share_the_window() {
        let flow = Flow::new(Semantics::Competing, 10, 2, vec![vec![0], vec![1]], Vec::new());
        for _ in 0..6 {
            flow.on_published(0);
        }
        for _ in 0..4 {
            flow.on_published(1);
        }
        assert_eq!(flow.room(), 0);
        flow.on_delivered(1, 3);
        assert_eq!(flow.lag(), 7);
        assert_eq!(flow.room(), 3);
    }

    #[test]
    fn every_consumer_is_bounded_by_the_slowest() {
        let waker = Rc::new(Notify::default());
        let flow = Flow::new(Semantics::EveryConsumer, 5, 1, vec![vec![0], vec![0]], vec![waker.clone()]);
        for _ in 0..5 {
            flow.on_published(0);
        }
        flow.on_delivered(0, 5);
        assert_eq!(flow.room(), 0, "consumer 1 has seen nothing yet");
        flow.on_delivered(1, 2);
        assert_eq!(flow.lag(), 3);
        assert_eq!(flow.room(), 2);
    }
}
