//! A connection slot's lifecycle: one state, changed by named transitions (sans-IO).
//!
//! A slot holds a session from its OPEN until it ends. Sockets come and go under it: each
//! attachment of a socket has an [`Attachment`] number, and the tasks of an attachment (its
//! reader and writer) hold that number. When a resume attaches a newer socket, the older
//! tasks find their number out of date: they are *superseded* and stop touching the slot.
//!
//! ```text
//!   Opening --attach--> Running --begin_close / write_failed--> Closing
//!                          |                                       |
//!                          +------------reader_finished------------+
//!                          |                                       |
//!              resumable:  v                        not resumable: v
//!                    Detached { expires_at_ms }                  Ended
//!                          |
//!                          +--attach (resume)--> Running (a newer attachment)
//! ```
//!
//! A `Running` or `Closing` slot may also be attached anew (a resume that supersedes a
//! connection that has not noticed it is dead); `Ended` is final.

use std::os::fd::RawFd;

/// Which attachment of a socket to a slot a task belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attachment(u32);

/// Where a connection slot is in its life (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Registered, no socket attached yet.
    Opening,
    /// A socket is attached and its input is processed.
    Running { socket: RawFd },
    /// A close frame is queued, or the socket failed: no more input is processed; the writer
    /// writes what is queued (the close frame last) and ends.
    Closing { socket: RawFd },
    /// The reader has finished and the session is kept for a resume until `expires_at_ms`;
    /// the writer ends once the queue is written.
    Detached { expires_at_ms: u64 },
    /// The reader has finished and the session ended; the slot is free again.
    Ended,
}

/// A slot's state and its current attachment.
#[derive(Debug)]
pub struct Lifecycle {
    state: State,
    attachment: Attachment,
}

impl Default for Lifecycle {
    fn default() -> Lifecycle {
        Lifecycle { state: State::Opening, attachment: Attachment(0) }
    }
}

impl Lifecycle {
    pub fn state(&self) -> State {
        self.state
    }

    /// Attaches `socket` (a new connection, or a resume): the tasks of any earlier attachment
    /// are superseded from now on. Returns the new attachment, for the new tasks.
    pub fn attach(&mut self, socket: RawFd) -> Attachment {
        debug_assert!(self.state != State::Ended, "an ended session is not resumed");
        self.attachment = Attachment(self.attachment.0.wrapping_add(1));
        self.state = State::Running { socket };
        self.attachment
    }

    /// The tasks of `attachment` still own the slot (not superseded by a newer attachment).
    pub fn is_current(&self, attachment: Attachment) -> bool {
        self.attachment == attachment
    }

    /// Input of `attachment` is processed: it is current and nothing is closing it.
    pub fn accepts_input(&self, attachment: Attachment) -> bool {
        self.is_current(attachment) && matches!(self.state, State::Running { .. })
    }

    /// Not running any more: closing, or the reader finished. A reader waiting for room
    /// wakes up to stop.
    pub fn is_stopping(&self) -> bool {
        !matches!(self.state, State::Opening | State::Running { .. })
    }

    /// The reader has finished (the writer ends once the queue is written).
    pub fn reader_finished_already(&self) -> bool {
        matches!(self.state, State::Detached { .. } | State::Ended)
    }

    /// The attached socket, while the reader runs (a stale one a resume must shut down).
    pub fn socket(&self) -> Option<RawFd> {
        match self.state {
            State::Running { socket } | State::Closing { socket } => Some(socket),
            State::Opening | State::Detached { .. } | State::Ended => None,
        }
    }

    /// The connection is to be closed: true if the caller must queue the close frame (the
    /// write queue keeps only the first). A running connection starts closing; one already
    /// closing has its close frame queued.
    pub fn begin_close(&mut self) -> bool {
        match self.state {
            State::Running { socket } => {
                self.state = State::Closing { socket };
                true
            }
            State::Closing { .. } => false,
            // No reader any more: a close frame still goes to a writer that may be draining.
            State::Opening | State::Detached { .. } | State::Ended => true,
        }
    }

    /// A write failed: the peer is gone. No more input is processed; the reader sees the
    /// failure too and finishes.
    pub fn write_failed(&mut self) {
        if let State::Running { socket } = self.state {
            self.state = State::Closing { socket };
        }
    }

    /// The reader of the current attachment has finished: the session is kept for a resume
    /// until `expires_at_ms` (`Some`), or ended (`None`).
    pub fn reader_finished(&mut self, expires_at_ms: Option<u64>) {
        debug_assert!(matches!(self.state, State::Running { .. } | State::Closing { .. }), "{:?}", self.state);
        self.state = match expires_at_ms {
            Some(expires_at_ms) => State::Detached { expires_at_ms },
            None => State::Ended,
        };
    }

    /// When the detached session of `attachment` expires; `None` once it was resumed (or is
    /// not detached).
    pub fn expires_at_ms(&self, attachment: Attachment) -> Option<u64> {
        match self.state {
            State::Detached { expires_at_ms } if self.is_current(attachment) => Some(expires_at_ms),
            _ => None,
        }
    }

    /// A detached session ends before its expiry, because it can no longer be resumed (its
    /// credentials expired): true if it was detached.
    pub fn end_detached(&mut self) -> bool {
        if !matches!(self.state, State::Detached { .. }) {
            return false;
        }
        self.state = State::Ended;
        true
    }

    /// A detached session of `attachment` whose expiry is at or before `now_ms`: it ends
    /// (true). False when it was resumed meanwhile, or is not due yet.
    pub fn expire(&mut self, attachment: Attachment, now_ms: u64) -> bool {
        match self.state {
            State::Detached { expires_at_ms } if self.is_current(attachment) && expires_at_ms <= now_ms => {
                self.state = State::Ended;
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_runs_closes_and_ends() {
        let mut lifecycle = Lifecycle::default();
        assert_eq!(lifecycle.state(), State::Opening);
        assert_eq!(lifecycle.socket(), None);
        let first = lifecycle.attach(7);
        assert_eq!(lifecycle.state(), State::Running { socket: 7 });
        assert!(lifecycle.accepts_input(first) && !lifecycle.is_stopping());
        assert!(lifecycle.begin_close(), "the first close queues the close frame");
        assert!(!lifecycle.begin_close(), "and only the first");
        assert_eq!(lifecycle.state(), State::Closing { socket: 7 });
        assert!(!lifecycle.accepts_input(first) && lifecycle.is_stopping());
        assert_eq!(lifecycle.socket(), Some(7), "the writer still writes the close frame");
        lifecycle.reader_finished(None);
        assert_eq!(lifecycle.state(), State::Ended);
        assert!(lifecycle.reader_finished_already() && lifecycle.socket().is_none());
        assert!(lifecycle.is_current(first), "nothing superseded it");
    }

    #[test]
    fn a_failed_write_stops_input_without_a_close_frame() {
        let mut lifecycle = Lifecycle::default();
        let first = lifecycle.attach(3);
        lifecycle.write_failed();
        assert_eq!(lifecycle.state(), State::Closing { socket: 3 });
        assert!(!lifecycle.accepts_input(first));
        assert!(!lifecycle.begin_close(), "closing already: no close frame after a failure");
    }

    #[test]
    fn a_detached_session_expires_at_its_deadline_unless_resumed() {
        let mut lifecycle = Lifecycle::default();
        let first = lifecycle.attach(3);
        lifecycle.reader_finished(Some(1_000));
        assert_eq!(lifecycle.state(), State::Detached { expires_at_ms: 1_000 });
        assert!(lifecycle.reader_finished_already() && lifecycle.socket().is_none());
        assert!(!lifecycle.expire(first, 999), "not due yet");
        assert!(lifecycle.expire(first, 1_000));
        assert_eq!(lifecycle.state(), State::Ended);

        let mut lifecycle = Lifecycle::default();
        let first = lifecycle.attach(3);
        lifecycle.reader_finished(Some(1_000));
        let second = lifecycle.attach(4);
        assert_ne!(first, second);
        assert!(!lifecycle.expire(first, 5_000), "resumed meanwhile: the old expiry does nothing");
        assert_eq!(lifecycle.state(), State::Running { socket: 4 });
        assert!(lifecycle.accepts_input(second));
    }

    #[test]
    fn a_resume_supersedes_a_connection_still_running() {
        let mut lifecycle = Lifecycle::default();
        let first = lifecycle.attach(3);
        assert_eq!(lifecycle.socket(), Some(3), "the stale socket a resume shuts down");
        let second = lifecycle.attach(9);
        assert!(!lifecycle.is_current(first) && !lifecycle.accepts_input(first), "the old tasks stop");
        assert!(lifecycle.accepts_input(second));
        assert_eq!(lifecycle.socket(), Some(9));
        // The old reader's end does not touch the new attachment (its caller checks first).
        assert!(!lifecycle.expire(first, u64::MAX));
    }
}
