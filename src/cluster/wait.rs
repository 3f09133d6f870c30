//! How a forwarder or relay thread waits: for its session's socket to become readable or its
//! queue to get a command, whichever comes first, and never longer than a bound.
//!
//! Each of these threads drives one blocking `mbws-client` session to an owner node and takes
//! commands from a crossbeam queue that the shard's thread fills. A blocking read cannot also
//! watch the queue, so the thread waits in poll(2) on two descriptors: the session's socket
//! and the queue's eventfd ([`Wake`], the shards' own mailbox wake-up). The shard pushes a
//! command, then [`QueueWake::notify`]: the eventfd is written only if the thread announced it
//! may be asleep, so a busy thread costs the shard no syscall (the protocol and its proof are
//! in [`crate::shard::mailbox`]).
//!
//! Nothing on the data path waits for a clock: a delivery from the owner or a settlement from
//! the consumer wakes the thread at once. The bound (the caller's `timeout`) is only for the
//! checks that are due at a time (a PING after silence, an answer's deadline).

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::shard::mailbox::Wake;

/// The wake-up of one forwarder's or relay's queue, shared by the thread and its senders.
#[derive(Debug, Clone)]
pub(super) struct QueueWake(Arc<Wake>);

impl QueueWake {
    pub(super) fn new() -> io::Result<QueueWake> {
        Ok(QueueWake(Arc::new(Wake::new()?)))
    }

    /// Sender side, after a push to the queue: wakes the thread if it may be asleep.
    pub(super) fn notify(&self) {
        fence(Ordering::SeqCst);
        self.0.notify();
    }

    /// Thread side: waits until `socket` (if any) is readable, the queue was notified, or
    /// `timeout` passed; `has_work` is the queue's re-check after the thread announced it
    /// sleeps (see the module doc). Returns whether the socket is readable (or closed, or in
    /// error: a read then says which).
    pub(super) fn wait(&self, socket: Option<RawFd>, timeout: Duration, has_work: impl Fn() -> bool) -> bool {
        if timeout.is_zero() {
            return socket.is_some_and(|fd| poll(&mut [pollfd(fd)], 0) > 0);
        }
        self.0.prepare_to_sleep();
        if has_work() {
            self.0.awake();
            return socket.is_some_and(|fd| poll(&mut [pollfd(fd)], 0) > 0);
        }
        let mut fds = [pollfd(self.0.eventfd()), pollfd(socket.unwrap_or(-1))];
        // Milliseconds, rounded up so that a short bound is not a busy loop.
        let timeout_ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
        poll(&mut fds, timeout_ms);
        self.0.awake();
        if fds[0].revents != 0 {
            let mut count: u64 = 0;
            // SAFETY: reads 8 bytes into a live u64 from the eventfd the Wake owns; poll said
            // it is readable (its counter is not zero), so the read does not block.
            let read = unsafe { libc::read(self.0.eventfd(), (&mut count as *mut u64).cast(), 8) };
            debug_assert_eq!(read, 8, "eventfd read failed: {}", io::Error::last_os_error());
        }
        socket.is_some() && fds[1].revents != 0
    }
}

/// A poll(2) entry for readability (a negative descriptor is ignored by poll).
fn pollfd(fd: RawFd) -> libc::pollfd {
    libc::pollfd { fd, events: libc::POLLIN, revents: 0 }
}

/// poll(2) over `fds`, at most `timeout_ms`; an interrupted or failed poll counts as a
/// wake-up with nothing ready (the caller's loop looks again, within its bound).
fn poll(fds: &mut [libc::pollfd], timeout_ms: i32) -> i32 {
    // SAFETY: `fds` is a live, exclusively borrowed slice of pollfd of the length passed.
    let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    if ready < 0 {
        for fd in fds.iter_mut() {
            fd.revents = 0;
        }
    }
    ready
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::Instant;

    #[test]
    fn a_notified_queue_or_a_readable_socket_ends_the_wait_and_nothing_else_before_the_bound() {
        let wake = QueueWake::new().unwrap();
        let (mut writer, reader) = std::os::unix::net::UnixStream::pair().unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&reader);
        let started = Instant::now();
        assert!(!wake.wait(Some(fd), Duration::from_millis(30), || false));
        assert!(started.elapsed() >= Duration::from_millis(25), "waited only {:?}", started.elapsed());

        // The queue: a flag the sender sets before it notifies (the real queue is a channel).
        let pushed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (notifier, flag) = (wake.clone(), pushed.clone());
        let thread = std::thread::spawn(move || {
            // Not a synchronisation: the wait is correct whichever runs first; this only
            // makes the eventfd path the likely one.
            std::thread::sleep(Duration::from_millis(20));
            flag.store(true, Ordering::SeqCst);
            notifier.notify();
        });
        let started = Instant::now();
        while !pushed.load(Ordering::SeqCst) {
            assert!(!wake.wait(Some(fd), Duration::from_secs(10), || pushed.load(Ordering::SeqCst)), "not the socket");
            assert!(started.elapsed() < Duration::from_secs(5), "the notification did not end the wait");
        }
        thread.join().unwrap();

        writer.write_all(b"x").unwrap();
        let started = Instant::now();
        assert!(wake.wait(Some(fd), Duration::from_secs(10), || false), "the socket is readable");
        assert!(started.elapsed() < Duration::from_secs(5));
        // Work found on the re-check: no sleep at all.
        let started = Instant::now();
        assert!(!wake.wait(None, Duration::from_secs(10), || true));
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
