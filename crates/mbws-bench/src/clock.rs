//! Time for the generator: one monotonic clock for stamps and a precise pacing timer.
//!
//! Publisher and consumer live in the same process, so a message's timestamp and its arrival
//! are read from the same clock, `CLOCK_MONOTONIC` in nanoseconds ([`now_ns`]). The pacing timer
//! is a timerfd armed at an absolute `CLOCK_MONOTONIC` deadline and read through io_uring
//! (monoio's own timer wheel has millisecond granularity, which would show up as a millisecond
//! of false latency). The timerfd is non-blocking so that io_uring waits on it with its internal
//! poll; a blocking one is read by an io-wq worker thread, one more wake-up per tick.

use std::io;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// Nanoseconds on `CLOCK_MONOTONIC` (vDSO, no system call).
pub fn now_ns() -> u64 {
    let mut spec = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec to the valid pointer we pass.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut spec) };
    debug_assert_eq!(rc, 0, "CLOCK_MONOTONIC is always available on Linux");
    spec.tv_sec as u64 * 1_000_000_000 + spec.tv_nsec as u64
}

/// A one-shot timer with nanosecond deadlines on [`now_ns`]'s clock, awaited through io_uring,
/// and a way to pass through io_uring without waiting ([`PaceTimer::poll_once`]).
pub struct PaceTimer {
    raw_fd: RawFd,
    file: monoio::fs::File,
    /// `/dev/zero`, non-blocking: a read of it completes at once, inside io_uring_enter.
    zero: monoio::fs::File,
    /// The 8 bytes a timerfd (or /dev/zero) read fills; kept to avoid an allocation per wait.
    counter: Option<Vec<u8>>,
}

impl PaceTimer {
    pub fn new() -> io::Result<PaceTimer> {
        // SAFETY: plain timerfd_create(2) call; the result is checked.
        let raw_fd = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_CLOEXEC | libc::TFD_NONBLOCK) };
        if raw_fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw_fd` is a fresh descriptor that nothing else owns; the File closes it.
        let std_file = unsafe { std::fs::File::from_raw_fd(raw_fd) };
        let file = monoio::fs::File::from_std(std_file)?;
        let zero = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/zero")?;
        let zero = monoio::fs::File::from_std(zero)?;
        Ok(PaceTimer { raw_fd, file, zero, counter: Some(vec![0u8; 8]) })
    }

    /// One trip through io_uring that completes at once: the runtime reaps every completion that
    /// is ready (socket reads included) and this task runs again. Cheaper than arming the timer
    /// in the past (timerfd_settime dominated the generator's profile when it polled that way).
    pub async fn poll_once(&mut self) -> io::Result<()> {
        let counter = self.counter.take().unwrap_or_else(|| vec![0u8; 8]);
        let (result, counter) = self.zero.read_at(counter, 0).await;
        self.counter = Some(counter);
        result.map(|_| ())
    }

    /// Waits until [`now_ns`] reaches `deadline_ns` (at once if it already has).
    pub async fn sleep_until(&mut self, deadline_ns: u64) -> io::Result<()> {
        // A zero it_value would disarm the timer instead of firing it.
        let deadline_ns = deadline_ns.max(1);
        let spec = libc::itimerspec {
            it_interval: libc::timespec { tv_sec: 0, tv_nsec: 0 },
            it_value: libc::timespec {
                tv_sec: (deadline_ns / 1_000_000_000) as libc::time_t,
                tv_nsec: (deadline_ns % 1_000_000_000) as libc::c_long,
            },
        };
        // SAFETY: `raw_fd` is the timerfd owned by `self.file` (alive as long as self); `spec`
        // is a valid itimerspec and a null old-value pointer is allowed.
        let rc = unsafe { libc::timerfd_settime(self.raw_fd, libc::TFD_TIMER_ABSTIME, &spec, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let counter = self.counter.take().unwrap_or_else(|| vec![0u8; 8]);
        let (result, counter) = self.file.read_at(counter, 0).await;
        self.counter = Some(counter);
        result.map(|_| ())
    }
}
