//! Cross-shard mailboxes: one crossbeam inbox per shard, and an eventfd to wake it.
//!
//! A sender pushes a batch of commands into the receiver's inbox, then writes the receiver's
//! eventfd only if the receiver announced it may be asleep (`sleeping` flag). The receiver sets
//! the flag, checks the inbox once more, and only then waits on the eventfd. With both sides
//! using sequentially consistent operations on the flag around the channel operation, either
//! the receiver sees the batch on its re-check or the sender sees the flag and writes the
//! eventfd: a batch is never left unnoticed, and a busy shard costs its senders no syscall.
//!
//! Bound: the channel itself is unbounded, on purpose, and there is no capacity setting. A
//! bounded channel would leave a sender facing a full inbox three choices, all worse: block
//! (shard A, full of B's commands, blocks posting to B while B, full of A's, blocks posting to
//! A: both stop for ever, since a shard drains its inbox only from its own event loop), drop
//! the batch (a lost delivery, ACK or RECEIPT breaks a promise made to a client), or keep the
//! batch in a local overflow queue (which is the unbounded queue again, one hop earlier). What
//! may be in flight is bounded at the sources instead: publishes by `max_inflight_sends` per
//! connection (the connection stops reading beyond it), deliveries by credit, acknowledgements
//! and settlements by deliveries, subscriptions by `max_subscriptions`; and a shard posts at
//! most one envelope per destination per round of work.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};

use crate::broker::{Command, ShardId};

/// What one shard sends another.
#[derive(Debug)]
pub enum Envelope {
    Commands(Vec<Command>),
    /// A socket whose first frame resumes a session this shard holds.
    Adopt(Box<super::connection::Adoption>),
    /// The first step of a graceful stop: stop accepting, stop processing input, and say so
    /// on the channel once every SEND taken from this shard's connections is answered.
    StopInput(Sender<ShardId>),
    /// Stop accepting, close every connection with 1001 (waiting for the closes until
    /// `close_by`), sync the durable log (until `exit_by`), and exit.
    Shutdown {
        close_by: std::time::Instant,
        exit_by: std::time::Instant,
    },
    /// Lame duck: refuse new upgrades (503), and close this shard's connections one by one
    /// over `duration` (ERROR 4503).
    Drain {
        duration: std::time::Duration,
    },
    /// New limits for the sessions opened from now on (a SIGHUP reload).
    Reload(crate::config::RuntimeLimits),
    /// Answer with the shard's [`ShardReport`](super::core::ShardReport) (the periodic summary).
    Report(Sender<super::core::ShardReport>),
    /// Answer with the shard's [`ShardSnapshot`](super::core::ShardSnapshot) (the admin API).
    Snapshot(Box<super::core::SnapshotRequest>, Sender<super::core::ShardSnapshot>),
    /// The cluster's control plane on placement and fencing (`crate::cluster`).
    Cluster(crate::cluster::view::ClusterUpdate),
    /// Do what the admin API asks, and say what came of it.
    Admin(super::core::AdminCommand, Sender<super::core::AdminOutcome>),
}

/// The receiving side's wake-up: an eventfd and the flag that says whether to write it.
#[derive(Debug)]
pub struct Wake {
    sleeping: AtomicBool,
    eventfd: OwnedFd,
}

impl Wake {
    pub(crate) fn new() -> io::Result<Wake> {
        // SAFETY: eventfd has no memory-safety preconditions; the result is checked below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        Ok(Wake { sleeping: AtomicBool::new(false), eventfd: unsafe { OwnedFd::from_raw_fd(fd) } })
    }

    /// Sender side: wake the receiver if it may be asleep.
    pub fn notify(&self) {
        if self.sleeping.swap(false, Ordering::SeqCst) {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a live u64 to an eventfd we own.
            let written = unsafe { libc::write(self.eventfd.as_raw_fd(), (&one as *const u64).cast(), 8) };
            debug_assert_eq!(written, 8, "eventfd write failed: {}", io::Error::last_os_error());
        }
    }

    /// Receiver side: announce that it is about to wait on the eventfd.
    pub fn prepare_to_sleep(&self) {
        self.sleeping.store(true, Ordering::SeqCst);
    }

    /// Receiver side: it found work after announcing sleep, or was woken.
    pub fn awake(&self) {
        self.sleeping.store(false, Ordering::SeqCst);
    }

    pub fn eventfd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }
}

/// Every shard's inbox sender and wake-up, shared by all shards.
#[derive(Debug)]
pub struct PostOffice {
    senders: Vec<Sender<Envelope>>,
    wakes: Vec<Arc<Wake>>,
    /// The broker drains (lame duck): set once by whoever starts the drain (the main thread,
    /// the admin API), read by every shard at each upgrade (it refuses new ones) and by the
    /// admin API's /readyz. Never on the message path.
    draining: AtomicBool,
}

impl PostOffice {
    /// Creates `shards` inboxes; returns the shared post office and each shard's receiver.
    pub fn new(shards: usize) -> io::Result<(Arc<PostOffice>, Vec<Receiver<Envelope>>)> {
        let mut senders = Vec::with_capacity(shards);
        let mut receivers = Vec::with_capacity(shards);
        let mut wakes = Vec::with_capacity(shards);
        for _ in 0..shards {
            let (sender, receiver) = crossbeam_channel::unbounded();
            senders.push(sender);
            receivers.push(receiver);
            wakes.push(Arc::new(Wake::new()?));
        }
        Ok((Arc::new(PostOffice { senders, wakes, draining: AtomicBool::new(false) }), receivers))
    }

    /// Marks the broker as draining; true if it was not yet.
    pub fn set_draining(&self) -> bool {
        !self.draining.swap(true, Ordering::SeqCst)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    pub fn wake(&self, shard: ShardId) -> &Arc<Wake> {
        &self.wakes[shard.0 as usize]
    }

    /// Posts `envelope` to `shard` and wakes it if needed. A closed inbox (its shard has
    /// exited during shutdown) drops the envelope.
    pub fn post(&self, shard: ShardId, envelope: Envelope) {
        if self.senders[shard.0 as usize].send(envelope).is_ok() {
            std::sync::atomic::fence(Ordering::SeqCst);
            self.wakes[shard.0 as usize].notify();
        }
    }

    pub fn shard_count(&self) -> usize {
        self.senders.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eventfd_count(wake: &Wake) -> u64 {
        let mut value: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64; the eventfd is non-blocking only if set, so
        // this test only calls it when the counter is known to be non-zero.
        let read = unsafe { libc::read(wake.eventfd(), (&mut value as *mut u64).cast(), 8) };
        assert_eq!(read, 8);
        value
    }

    #[test]
    fn eventfd_is_written_only_when_the_receiver_may_sleep() {
        let (office, receivers) = PostOffice::new(1).unwrap();
        let shard = ShardId(0);
        office.post(shard, Envelope::Commands(Vec::new()));
        office.post(shard, Envelope::Commands(Vec::new()));
        assert_eq!(receivers[0].len(), 2);
        // Awake receiver: no eventfd write happened. Now it announces sleep.
        office.wake(shard).prepare_to_sleep();
        office.post(shard, Envelope::Commands(Vec::new()));
        office.post(shard, Envelope::Commands(Vec::new()));
        // Exactly one write for the two posts after the announcement.
        assert_eq!(eventfd_count(office.wake(shard)), 1);
        assert_eq!(receivers[0].len(), 4);
    }
}
